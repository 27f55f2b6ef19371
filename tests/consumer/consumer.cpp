// SPDX-License-Identifier: MIT
// A tiny program that consumes postbox the way a user would; exits 0 on success.
#include <postbox/channel.hpp>

int main() {
  postbox::channel<int> ch(4);
  if (ch.try_send(42) != postbox::send_status::ok) return 1;
  auto v = ch.try_receive();
  return (v && *v == 42) ? 0 : 2;
}
