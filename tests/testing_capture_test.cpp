// SPDX-License-Identifier: MIT
// Specification tests for postbox::testing::capture_sink: recording from every publishing shape, the queries, thread safety.
#include <postbox/channel.hpp>
#include <postbox/json.hpp>
#include <postbox/observer.hpp>
#include <postbox/outbox.hpp>
#include <postbox/store.hpp>
#include <postbox/testing.hpp>
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <cstdint>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::testing::capture_sink;
using postbox::testing::captured_message;

struct order_placed {
  static constexpr const char* message_type = "order.placed";
  std::string order;
  int cents = 0;
};
void to_json(nlohmann::json& j, const order_placed& o) { j = {{"order", o.order}, {"cents", o.cents}}; }
void from_json(const nlohmann::json& j, order_placed& o) {
  j.at("order").get_to(o.order);
  j.at("cents").get_to(o.cents);
}

struct payment_taken {
  static constexpr const char* message_type = "payment.taken";
  int cents = 0;
};

TEST_CASE("a capture sink records an envelope with all of its metadata", "[testing_capture]") {
  postbox::manual_clock clock;
  capture_sink sink("orders", clock);
  auto e = postbox::make_envelope(order_placed{"o-1", 250}, clock);
  e.kind = postbox::message_kind::command;
  e.partition_key = "o-1";
  e.tenant = "acme";
  e.producer = "shop";
  e.deadline = clock.now() + 5s;
  e.attempt = 2;
  e.headers.set("x-trace", "yes");
  e.causation_id = postbox::message_id(1, 2);
  clock.advance(1s);
  REQUIRE(sink.record(e) == 0);

  const auto all = sink.all();
  REQUIRE(all.size() == 1);
  const captured_message& c = all.front();
  CHECK(c.sequence == 0);
  CHECK(c.destination == "orders");
  CHECK(c.id == e.id);
  CHECK(c.type == "order.placed");
  CHECK(c.kind == postbox::message_kind::command);
  CHECK(c.correlation_id == e.correlation_id);
  CHECK(c.causation_id == postbox::message_id(1, 2));
  CHECK(c.deadline == e.deadline);
  CHECK(c.partition_key == "o-1");
  CHECK(c.tenant == "acme");
  CHECK(c.producer == "shop");
  CHECK(c.attempt == 2);
  CHECK(c.headers.get("x-trace") == std::optional<std::string_view>("yes"));
  CHECK(c.occurred_at == e.occurred_at);
  CHECK(c.captured_at == clock.now());
  REQUIRE(c.as<order_placed>() != nullptr);
  CHECK(c.as<order_placed>()->payload.cents == 250);
  CHECK(c.as<payment_taken>() == nullptr);
}

TEST_CASE("published<T> returns only the envelopes of that payload type, in capture order", "[testing_capture]") {
  capture_sink sink;
  (void)sink.try_send(postbox::make_envelope(order_placed{"o-1", 1}));
  (void)sink.try_send(postbox::make_envelope(payment_taken{7}));
  (void)sink.try_send(postbox::make_envelope(order_placed{"o-2", 2}));

  const auto orders = sink.published<order_placed>();
  REQUIRE(orders.size() == 2);
  CHECK(orders[0].payload.order == "o-1");
  CHECK(orders[1].payload.order == "o-2");
  CHECK(sink.published<payment_taken>().size() == 1);
  CHECK(sink.count() == 3);
  CHECK(sink.count<order_placed>() == 2);
}

TEST_CASE("published_where selects by any metadata and keeps the typed view", "[testing_capture]") {
  capture_sink sink;
  auto a = postbox::make_envelope(order_placed{"o-1", 100});
  a.partition_key = "k1";
  auto b = postbox::make_envelope(order_placed{"o-2", 900});
  b.partition_key = "k2";
  (void)sink.record(a);
  (void)sink.record(b);

  const auto big = sink.published_where([](const captured_message& c) {
    const auto* e = c.as<order_placed>();
    return e != nullptr && e->payload.cents > 500;
  });
  REQUIRE(big.size() == 1);
  CHECK(big.front().partition_key == "k2");
  CHECK(sink.count_where([](const captured_message& c) { return c.partition_key == "k1"; }) == 1);
}

TEST_CASE("causation_chain follows causation ids back to the root, root first", "[testing_capture]") {
  capture_sink sink;
  const auto placed = postbox::make_envelope(order_placed{"o-1", 5});
  const auto paid = postbox::caused_by(placed, payment_taken{5});
  const auto shipped = postbox::caused_by(paid, order_placed{"o-1-shipped", 5});
  const auto unrelated = postbox::make_envelope(order_placed{"o-9", 1});
  (void)sink.record(shipped);  // capture order does not matter
  (void)sink.record(unrelated);
  (void)sink.record(placed);
  (void)sink.record(paid);

  const auto chain = sink.causation_chain(shipped.id);
  REQUIRE(chain.size() == 3);
  CHECK(chain[0].id == placed.id);
  CHECK(chain[1].id == paid.id);
  CHECK(chain[2].id == shipped.id);
  CHECK(chain[2].correlation_id == placed.id);
  CHECK(sink.causation_chain(unrelated.id).size() == 1);
  CHECK(sink.causation_chain(postbox::message_id(9, 9)).empty());
  const auto children = sink.caused_by(placed.id);
  REQUIRE(children.size() == 1);
  CHECK(children.front().id == paid.id);
}

TEST_CASE("a causation chain starts at the first ancestor the sink did not capture", "[testing_capture]") {
  capture_sink sink;
  const auto root = postbox::make_envelope(order_placed{"o-1", 5});
  const auto mid = postbox::caused_by(root, payment_taken{5});
  const auto leaf = postbox::caused_by(mid, payment_taken{6});
  (void)sink.record(mid);
  (void)sink.record(leaf);
  const auto chain = sink.causation_chain(leaf.id);
  REQUIRE(chain.size() == 2);
  CHECK(chain[0].id == mid.id);
}

TEST_CASE("the topic and stream shapes record under the subject or key", "[testing_capture]") {
  capture_sink sink("bus");
  const auto r = sink.publish(std::string("orders.eu"), postbox::make_envelope(order_placed{"o-1", 1}));
  CHECK(r.ok());
  CHECK(r.delivered == 1);
  (void)sink.publish(postbox::make_envelope(order_placed{"o-2", 2}));
  const auto pos = sink.append("key-7", postbox::make_envelope(order_placed{"o-3", 3}));
  CHECK(pos.offset == 2);
  const auto all = sink.all();
  REQUIRE(all.size() == 3);
  CHECK(all[0].destination == "orders.eu");
  CHECK(all[1].destination == "bus");
  CHECK(all[2].destination == "key-7");
}

TEST_CASE("observed_send into a capture sink records and calls the publish hook", "[testing_capture]") {
  capture_sink sink;
  postbox::observer obs;
  int hooks = 0;
  obs.on_publish = [&](const postbox::message_event&) { ++hooks; };
  CHECK(postbox::observed_send(sink, postbox::make_envelope(order_placed{"o-1", 1}), &obs, "orders") ==
        postbox::send_status::ok);
  CHECK(sink.count() == 1);
  CHECK(hooks == 1);
}

TEST_CASE("drain records what is queued in a channel and in a topic subscription", "[testing_capture]") {
  capture_sink sink;
  postbox::channel<postbox::envelope<order_placed>> ch(8);
  REQUIRE(ch.try_send(postbox::make_envelope(order_placed{"o-1", 1})) == postbox::send_status::ok);
  REQUIRE(ch.try_send(postbox::make_envelope(order_placed{"o-2", 2})) == postbox::send_status::ok);
  CHECK(sink.drain(ch, "orders") == 2);
  CHECK(ch.size_approx() == 0);

  postbox::topic<postbox::envelope<order_placed>> t;
  auto sub = t.subscribe();
  (void)t.publish(postbox::make_envelope(order_placed{"o-3", 3}));
  CHECK(sink.drain(sub, "topic") == 1);
  const auto all = sink.all();
  REQUIRE(all.size() == 3);
  CHECK(all[0].destination == "orders");
  CHECK(all[2].destination == "topic");
  CHECK(all[2].as<order_placed>()->payload.order == "o-3");
}

TEST_CASE("as an outbox relay destination the sink records each decoded message with its body",
          "[testing_capture]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  capture_sink sink;
  postbox::outbox_relay relay(store, sink.destination<order_placed>(postbox::json::codec{}));
  auto e = postbox::make_envelope(order_placed{"o-1", 42});
  e.partition_key = "o-1";
  {
    auto tx = store.begin();
    REQUIRE(box.stage(tx, e) == postbox::errc::ok);
    REQUIRE(tx.commit() == postbox::errc::ok);
  }
  CHECK(relay.drain() == 1);
  const auto got = sink.published<order_placed>();
  REQUIRE(got.size() == 1);
  CHECK(got.front().id == e.id);
  CHECK(got.front().payload.cents == 42);
  const auto c = sink.find(e.id);
  REQUIRE(c.has_value());
  CHECK(c->destination == "order.placed");
  CHECK_FALSE(c->body.empty());
  CHECK(sink.times(e.id) == 1);
}

TEST_CASE("as an outbox destination the sink refuses a body the codec cannot read, with the codec's error",
          "[testing_capture]") {
  capture_sink sink;
  auto dest = sink.destination<order_placed>(postbox::json::codec{});
  postbox::stored_message m;
  m.id = postbox::message_id(1, 1);
  m.type = "order.placed";
  m.body = "{not json";
  CHECK(dest(m) == postbox::errc::parse_error);
  CHECK(sink.count() == 0);
}

TEST_CASE("clear forgets everything and sequences restart", "[testing_capture]") {
  capture_sink sink;
  (void)sink.record(postbox::make_envelope(order_placed{"o-1", 1}));
  sink.clear();
  CHECK(sink.count() == 0);
  CHECK(sink.record(postbox::make_envelope(order_placed{"o-2", 2})) == 0);
}

TEST_CASE("concurrent publishers lose and duplicate nothing in a capture sink", "[testing_capture][stress]") {
  capture_sink sink;
  const int per_thread = static_cast<int>(postbox_test::scaled(2000));
  constexpr int threads = 4;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        (void)sink.try_send(postbox::make_envelope(payment_taken{t * per_thread + i}));
      }
    });
  }
  // A reader waits on the count itself while the writers run.
  const std::size_t expected = static_cast<std::size_t>(threads) * static_cast<std::size_t>(per_thread);
  CHECK(sink.wait_for_count(expected));
  for (auto& th : pool) th.join();
  const auto got = sink.published<payment_taken>();
  REQUIRE(got.size() == expected);
  std::int64_t sum = 0;
  std::vector<bool> seen(expected, false);
  for (const auto& e : got) {
    const auto k = static_cast<std::size_t>(e.payload.cents);
    REQUIRE(k < expected);
    CHECK_FALSE(seen[k]);
    seen[k] = true;
    sum += e.payload.cents;
  }
  const auto n = static_cast<std::int64_t>(expected);
  CHECK(sum == n * (n - 1) / 2);
  const auto all = sink.all();
  for (std::size_t i = 0; i < all.size(); ++i) CHECK(all[i].sequence == i);
}

TEST_CASE("wait_for_count gives up after its bound when too few messages arrive", "[testing_capture]") {
  capture_sink sink;
  (void)sink.record(postbox::make_envelope(payment_taken{1}));
  CHECK(sink.wait_for_count(1, 0ms));
  CHECK_FALSE(sink.wait_for_count(2, 1ms));
}
