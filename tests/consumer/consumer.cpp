// SPDX-License-Identifier: MIT
// A tiny program that consumes postbox the way a user would; exits 0 on success.
// The consumer projects define POSTBOX_CONSUMER_<COMPONENT> for each optional
// component they link, and this file checks that its usage requirements came along.
#include <postbox/channel.hpp>

#if defined(POSTBOX_CONSUMER_JSON) && !defined(POSTBOX_WITH_JSON)
#  error "the json component did not define POSTBOX_WITH_JSON"
#endif
#if defined(POSTBOX_CONSUMER_FMT) && !defined(POSTBOX_WITH_FMT)
#  error "the fmt component did not define POSTBOX_WITH_FMT"
#endif
#if defined(POSTBOX_CONSUMER_SQLITE)
#  include <sqlite3.h>
#endif
#if defined(POSTBOX_CONSUMER_NATS)
#  include <nats/nats.h>
#endif

int main() {
  postbox::channel<int> ch(4);
  if (ch.try_send(42) != postbox::send_status::ok) return 1;
  auto v = ch.try_receive();
  if (!v || *v != 42) return 2;
#if defined(POSTBOX_CONSUMER_SQLITE)
  if (sqlite3_libversion_number() <= 0) return 3;  // links: the component brought SQLite
#endif
#if defined(POSTBOX_CONSUMER_NATS)
  if (nats_GetVersionNumber() <= 0) return 4;  // links: the component brought libnats
#endif
  return 0;
}
