// SPDX-License-Identifier: MIT
// Tests for envelope authentication across the NATS bridge: a signing publisher, and a verified JetStream consumer source that dead-letters (and terms) unsigned, unknown-key and tampered messages, against a real nats-server.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/nats_consumer.hpp>
#include <postbox/signing.hpp>

#include <catch2/catch.hpp>

#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "support.hpp"

#include "nats_fixture.hpp"

namespace {

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;
using order = pn::order;

// The bytes both sides sign: the JSON body the bridge carries (to_nats_msg).
struct order_json {
  std::string operator()(const order& o) const { return nlohmann::json(o).dump(); }
};

using source_t = postbox::verified_source<postbox::jetstream_consumer_source<order>, order_json>;
static_assert(postbox::consumer_source<source_t>, "a verified JetStream source is a consumer source");
static_assert(source_t::redelivers, "it keeps the inner source's redelivery");

const std::string secret_1 = "nats-key-1-0123456789abcdef012345";
const std::string secret_2 = "nats-key-2-fedcba9876543210fedcba";

}  // namespace

TEST_CASE("a verified JetStream source handles signed messages and dead-letters and terms unsigned, unknown-key and "
          "tampered ones as unauthenticated",
          "[nats][signing]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher plain(r.js);
  postbox::signing_publisher<postbox::jetstream_publisher, order_json> signed_pub(
      plain, postbox::envelope_signer<order_json>("k1", secret_1));
  const postbox::envelope_signer<order_json> unknown_signer("k9", secret_2);
  const postbox::envelope_signer<order_json> signer("k1", secret_1);

  // Good: 1 and 2 (through the decorator). Bad: 10 unsigned, 11 unknown key,
  // 12 tampered payload, 13 tampered tenant, 14 tampered header.
  REQUIRE(signed_pub.publish(postbox::make_envelope("orders.placed", order{1})).has_value());
  REQUIRE(plain.publish(postbox::make_envelope("orders.placed", order{10})).has_value());
  REQUIRE(plain.publish(unknown_signer.sign_copy(postbox::make_envelope("orders.placed", order{11}))).has_value());
  {
    auto e = signer.sign_copy(postbox::make_envelope("orders.placed", order{12}));
    e.payload.n = 1200;
    REQUIRE(plain.publish(e).has_value());
  }
  {
    auto e = postbox::make_envelope("orders.placed", order{13});
    e.tenant = "acme";
    e = signer.sign_copy(e);
    e.tenant = "globex";
    REQUIRE(plain.publish(e).has_value());
  }
  {
    auto e = postbox::make_envelope("orders.placed", order{14});
    e.headers.set("x-role", "reader");
    e = signer.sign_copy(e);
    e.headers.set("x-role", "admin");
    REQUIRE(plain.publish(e).has_value());
  }
  {
    auto e = postbox::make_envelope("orders.placed", order{2});
    e.tenant = "acme";
    e.deadline = postbox::default_clock().now() + 1h;
    e.headers.set("content-type", "application/json");
    REQUIRE(signed_pub.publish(e, std::string("orders.placed")).has_value());
  }

  postbox::key_ring keys;
  keys.add("k1", secret_1);
  postbox::dead_letter_queue<order> dlq;
  std::mutex m;
  std::set<int> handled;
  postbox::consumer_options opts;
  opts.threads = 1;
  source_t source(postbox::jetstream_consumer_source<order>(r.js, {"ORDERS", "signed", "orders.>", 30s, -1}), keys);
  auto inner = source.inner().monitor();
  auto verified = source.monitor();
  postbox::consumer c(
      std::move(source),
      [&](const postbox::envelope<order>& e) {
        std::lock_guard lock(m);
        handled.insert(e.payload.n);
        return postbox::settlement::ack();
      },
      dlq, opts);
  REQUIRE(postbox_test::eventually([&] { return inner.stats().acked == 2 && inner.stats().termed == 5; }));
  {
    std::lock_guard lock(m);
    CHECK(handled == std::set<int>{1, 2});
  }
  REQUIRE(dlq.size() == 5);
  for (const auto& d : dlq.list()) {
    CHECK(d.reason == "unauthenticated");
    CHECK(d.source == "signed");
  }
  const auto s = verified();
  CHECK(s.verified == 2);
  CHECK(s.unsigned_messages == 1);
  CHECK(s.unknown_key == 1);
  CHECK(s.bad_signature == 3);
  REQUIRE(postbox_test::eventually([&] { return r.js.consumer_state("ORDERS", "signed")->ack_pending == 0; }));
}

#endif  // POSTBOX_NATS_SERVER
