// SPDX-License-Identifier: MIT
// Specification tests for postbox::outbox and postbox::outbox_relay on the memory and SQLite stores, plus a concurrent stress test.
#include <postbox/channel.hpp>
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"
#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::relay_point;
using postbox::stored_message;

struct order_placed {
  static constexpr const char* message_type = "order.placed";
  std::string order;
  int n = 0;
};
void to_json(nlohmann::json& j, const order_placed& o) { j = {{"order", o.order}, {"n", o.n}}; }
void from_json(const nlohmann::json& j, order_placed& o) {
  j.at("order").get_to(o.order);
  j.at("n").get_to(o.n);
}

// A payload that declares no message type: make_envelope leaves the type empty.
struct untyped_note {
  std::string text;
};
void to_json(nlohmann::json& j, const untyped_note& n) { j = {{"text", n.text}}; }
void from_json(const nlohmann::json& j, untyped_note& n) { j.at("text").get_to(n.text); }

// A payload whose serializer and deserializer disagree: it encodes, but never decodes.
struct lopsided {
  static constexpr const char* message_type = "lopsided";
  int n = 0;
};
void to_json(nlohmann::json& j, const lopsided& l) { j = {{"n", l.n}}; }
void from_json(const nlohmann::json& j, lopsided& l) { j.at("m").get_to(l.n); }

namespace {

using env_t = postbox::envelope<order_placed>;

// A codec whose encode always throws (a payload that cannot be serialized).
struct throwing_codec {
  template <class T>
  std::string encode(const postbox::envelope<T>&) const {
    throw std::runtime_error("cannot encode");
  }
  template <class T>
  postbox::result<postbox::envelope<T>> decode(std::string_view) const {
    return errc::parse_error;
  }
};

env_t order(const std::string& key, int n, const postbox::clock& clk = postbox::default_clock()) {
  auto e = postbox::make_envelope(order_placed{key, n}, clk);
  e.partition_key = key;
  return e;
}

// Records what a destination was given; can be told to fail.
struct sink {
  std::mutex mutex;
  std::vector<stored_message> got;
  std::vector<std::string> failing_keys;  // publishing these fails with `full`
  std::function<void(const stored_message&)> during;  // called inside the publish

  postbox::outbox_destination destination() {
    return [this](const stored_message& m) -> errc {
      if (during) during(m);
      std::lock_guard lock(mutex);
      if (std::find(failing_keys.begin(), failing_keys.end(), m.partition_key) != failing_keys.end()) return errc::full;
      got.push_back(m);
      return errc::ok;
    };
  }
  std::vector<std::string> labels() {
    std::lock_guard lock(mutex);
    std::vector<std::string> out;
    for (const auto& m : got) {
      auto d = postbox::json::decode<order_placed>(m.body);
      out.push_back(d ? d->payload.order + "#" + std::to_string(d->payload.n) : "?");
    }
    return out;
  }
  std::size_t size() {
    std::lock_guard lock(mutex);
    return got.size();
  }
};

postbox::relay_options fixed_options(std::size_t batch = 64) {
  postbox::relay_options o;
  o.batch_size = batch;
  o.owner = "relay-a";
  o.retry.full_jitter = false;  // exact backoff figures
  o.retry.initial_backoff = 1s;
  o.retry.multiplier = 2.0;
  o.retry.max_backoff = 8s;
  o.lease = 30s;
  o.poll_interval = 10s;
  return o;
}

template <class Store, class Box>
void stage_committed(Store& store, Box& box, const std::vector<env_t>& es) {
  auto tx = store.begin();
  for (const auto& e : es) REQUIRE(box.stage(tx, e) == errc::ok);
  REQUIRE(tx.commit() == errc::ok);
}

}  // namespace

#if POSTBOX_TEST_HAVE_SQLITE
#  define STORE_FIXTURES postbox_test::memory_fixture, postbox_test::sqlite_fixture
#else
#  define STORE_FIXTURES postbox_test::memory_fixture
#endif

TEMPLATE_TEST_CASE("stage keeps the envelope's identity, routing fields and encoded text", "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  auto e = order("o-1", 1, clock);
  e.causation_id = postbox::message_id(3, 4);
  stage_committed(f.get(), box, {e});
  auto pending = f.get().outbox_pending();
  REQUIRE(pending.has_value());
  REQUIRE(pending->size() == 1);
  const auto& m = pending->front();
  CHECK(m.id == e.id);
  CHECK(m.type == "order.placed");
  CHECK(m.partition_key == "o-1");
  CHECK(m.correlation_id == e.correlation_id);
  CHECK(m.causation_id == postbox::message_id(3, 4));
  CHECK(m.staged_at == clock.now());
  auto back = postbox::json::decode<order_placed>(m.body);
  REQUIRE(back.has_value());
  CHECK(back->id == e.id);
  CHECK(back->payload.n == 1);
}

TEMPLATE_TEST_CASE("a message staged in a transaction that rolls back is never published", "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::outbox box(f.get(), postbox::json::codec{});
  sink out;
  postbox::outbox_relay relay(f.get(), out.destination(), fixed_options());
  {
    auto tx = f.get().begin();
    REQUIRE(box.stage(tx, order("o-1", 1)) == errc::ok);
    tx.rollback();
  }
  CHECK(relay.drain() == 0);
  CHECK(out.size() == 0);
}

TEST_CASE("a staged message is invisible to a relay until its transaction commits", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  sink out;
  postbox::outbox_relay relay(store, out.destination(), fixed_options());
  auto tx = store.begin();
  REQUIRE(box.stage(tx, order("o-1", 1)) == errc::ok);
  CHECK(relay.run_once().claimed == 0);
  REQUIRE(tx.commit() == errc::ok);
  CHECK(relay.run_once().published == 1);
}

TEMPLATE_TEST_CASE("run_once publishes committed messages in staging order and marks them dispatched", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out;
  postbox::outbox_relay relay(f.get(), out.destination(), fixed_options(), clock);
  stage_committed(f.get(), box, {order("a", 1, clock), order("b", 1, clock), order("a", 2, clock)});
  const auto step = relay.run_once();
  CHECK(step.status == errc::ok);
  CHECK(step.claimed == 3);
  CHECK(step.published == 3);
  CHECK(step.marked == 3);
  CHECK_FALSE(step.more);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "b#1", "a#2"});
  CHECK(f.get().outbox_summary()->pending == 0);
  CHECK(f.get().outbox_summary()->dispatched == 3);
  CHECK(relay.run_once().claimed == 0);  // nothing published twice
  const auto st = relay.stats();
  CHECK(st.published == 3);
  CHECK(st.dispatched == 3);
  CHECK(st.batches == 1);
}

TEST_CASE("a full batch reports more and drain empties the outbox batch by batch", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  sink out;
  postbox::outbox_relay relay(store, out.destination(), fixed_options(2));
  stage_committed(store, box, {order("a", 1), order("a", 2), order("a", 3), order("a", 4), order("a", 5)});
  CHECK(relay.run_once().more);
  CHECK(relay.drain() == 3);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "a#2", "a#3", "a#4", "a#5"});
  CHECK(relay.stats().batches == 3);
}

TEMPLATE_TEST_CASE("a failing destination holds back the rest of that key while other keys proceed", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"a"};
  postbox::outbox_relay relay(f.get(), out.destination(), fixed_options(), clock);
  stage_committed(f.get(), box, {order("a", 1), order("b", 1), order("a", 2), order("b", 2)});
  const auto step = relay.run_once();
  CHECK(step.failed == 1);  // a#1 failed; a#2 was not even tried
  CHECK(step.published == 2);
  CHECK(out.labels() == std::vector<std::string>{"b#1", "b#2"});
  REQUIRE(step.next_due.has_value());
  CHECK(*step.next_due == clock.now() + 1s);
  CHECK(relay.stats().publish_failures == 1);
  CHECK_FALSE(relay.stats().last_error.empty());
}

TEMPLATE_TEST_CASE("a failing key is retried after its backoff on the clock and keeps its order", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"a"};
  postbox::outbox_relay relay(f.get(), out.destination(), fixed_options(), clock);
  stage_committed(f.get(), box, {order("a", 1), order("a", 2)});
  CHECK(relay.run_once().failed == 1);           // attempt 1 fails: wait 1 s
  CHECK(relay.run_once().claimed == 0);          // too early
  clock.advance(1s);
  const auto second = relay.run_once();          // attempt 2 fails: wait 2 s
  CHECK(second.failed == 1);
  CHECK(*second.next_due == clock.now() + 2s);
  clock.advance(1s);
  CHECK(relay.run_once().claimed == 0);
  clock.advance(1s);
  {
    std::lock_guard lock(out.mutex);
    out.failing_keys.clear();  // the destination recovers
  }
  CHECK(relay.run_once().published == 2);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "a#2"});
}

TEST_CASE("the backoff of a failing destination grows per attempt up to the cap", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"a"};
  postbox::outbox_relay relay(store, out.destination(), fixed_options(), clock);
  stage_committed(store, box, {order("a", 1)});
  std::vector<postbox::duration> waits;
  for (int i = 0; i < 6; ++i) {
    const auto step = relay.run_once();
    REQUIRE(step.failed == 1);
    waits.push_back(*step.next_due - clock.now());
    clock.set(*step.next_due);
  }
  CHECK(waits == std::vector<postbox::duration>{1s, 2s, 4s, 8s, 8s, 8s});
  CHECK(store.outbox_pending()->front().attempts == 6);  // never dropped
}

TEST_CASE("an exception from the destination is a failed publish, retried later", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  int calls = 0;
  postbox::outbox_relay relay(
      store,
      [&](const stored_message&) -> errc {
        if (++calls == 1) throw std::runtime_error("broker exploded");
        return errc::ok;
      },
      fixed_options(), clock);
  stage_committed(store, box, {order("a", 1)});
  CHECK(relay.run_once().failed == 1);
  CHECK(relay.stats().last_error.find("threw") != std::string::npos);
  clock.advance(1s);
  CHECK(relay.run_once().published == 1);
  CHECK(calls == 2);
}

TEMPLATE_TEST_CASE("a second relay skips a key while the first is publishing it", "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out_b;
  auto opts_b = fixed_options();
  opts_b.owner = "relay-b";
  postbox::outbox_relay relay_b(f.get(), out_b.destination(), opts_b, clock);
  sink out_a;
  postbox::relay_step b_step;
  bool b_ran = false;
  auto opts_a = fixed_options(1);  // relay a leases only a#1
  postbox::outbox_relay relay_a(f.get(), out_a.destination(), opts_a, clock);
  out_a.during = [&](const stored_message&) {
    if (b_ran) return;
    b_ran = true;
    b_step = relay_b.run_once();  // while a is inside its publish of a#1
  };
  stage_committed(f.get(), box, {order("a", 1), order("a", 2), order("b", 1)});
  (void)relay_a.run_once();
  REQUIRE(b_ran);
  CHECK(b_step.published == 1);
  CHECK(out_a.labels() == std::vector<std::string>{"a#1"});
  CHECK(out_b.labels() == std::vector<std::string>{"b#1"});  // never a#2 before a#1 is done
  CHECK(relay_b.drain() == 1);
  CHECK(out_b.labels() == std::vector<std::string>{"b#1", "a#2"});
}

TEMPLATE_TEST_CASE("a relay renews its lease mid-batch so a second relay claims nothing and nothing is published twice",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out_b;
  auto opts_b = fixed_options();
  opts_b.owner = "relay-b";
  postbox::outbox_relay relay_b(f.get(), out_b.destination(), opts_b, clock);
  sink out_a;
  auto opts_a = fixed_options();
  opts_a.lease = 10s;
  postbox::outbox_relay relay_a(f.get(), out_a.destination(), opts_a, clock);
  std::size_t b_claimed = 0;
  // Each publish takes 4 s; the whole batch (24 s) outlives the 10 s lease.
  // Relay b tries to claim during every publish.
  out_a.during = [&](const stored_message&) {
    clock.advance(4s);
    b_claimed += relay_b.run_once().claimed;
  };
  stage_committed(f.get(), box, {order("a", 1), order("b", 1), order("a", 2), order("c", 1), order("a", 3), order("b", 2)});
  const auto step = relay_a.run_once();
  CHECK(step.published == 6);
  CHECK(step.marked == 6);
  CHECK(b_claimed == 0);
  CHECK(out_b.size() == 0);
  CHECK(out_a.labels() == std::vector<std::string>{"a#1", "b#1", "a#2", "c#1", "a#3", "b#2"});
  const auto stats = relay_a.stats();
  CHECK(stats.lease_renewals == 2);  // at 8 s and at 16 s, each once half the lease had passed
  CHECK(stats.lease_lost == 0);
  out_a.during = nullptr;
  CHECK(relay_b.drain() == 0);
  CHECK(relay_a.drain() == 0);
}

TEMPLATE_TEST_CASE("a relay whose rows another relay re-leased after its lease ran out stops the batch and counts lease_lost",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out_a;
  postbox::outbox_relay relay_a(f.get(), out_a.destination(), fixed_options(), clock);
  std::vector<std::uint64_t> taken;
  // The first publish takes longer than the whole 30 s lease, and meanwhile
  // relay b re-leases the expired batch.
  out_a.during = [&](const stored_message&) {
    if (!taken.empty()) return;
    clock.advance(40s);
    auto b = f.get().outbox_claim("relay-b", clock.now(), clock.now() + 30s, 100);
    REQUIRE(b.has_value());
    for (const auto& m : b->messages) taken.push_back(m.sequence);
  };
  stage_committed(f.get(), box, {order("a", 1), order("b", 1), order("c", 1)});
  const auto step = relay_a.run_once();
  REQUIRE(taken.size() == 3);
  CHECK(step.published == 1);  // b#1 and c#1 are relay b's now
  CHECK(step.marked == 0);     // a#1 too: relay b publishes it again (at-least-once)
  CHECK(step.more);
  CHECK(out_a.labels() == std::vector<std::string>{"a#1"});
  const auto stats = relay_a.stats();
  CHECK(stats.lease_lost == 3);  // counted once, at the renewal, not again at marking
  CHECK(stats.lease_renewals == 0);
  // Relay a released nothing of relay b's.
  CHECK(*f.get().outbox_renew("relay-b", taken, clock.now(), clock.now() + 30s) == 3);
}

TEMPLATE_TEST_CASE("a crash after publishing and before marking republishes that batch with the same ids", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out;
  stage_committed(f.get(), box, {order("a", 1), order("b", 1), order("a", 2), order("c", 1)});
  {
    auto opts = fixed_options(3);
    opts.release_on_stop = false;  // a crash releases nothing
    opts.on_point = [](relay_point p, const stored_message*) {
      if (p == relay_point::before_mark) throw std::runtime_error("crash");  // the process dies here
    };
    postbox::outbox_relay doomed(f.get(), out.destination(), opts, clock);
    CHECK_THROWS(doomed.run_once());
  }
  CHECK(out.size() == 3);
  auto opts = fixed_options();
  opts.owner = "relay-restarted";
  postbox::outbox_relay restarted(f.get(), out.destination(), opts, clock);
  CHECK(restarted.drain() == 1);  // c#1 only: the crashed relay's lease still holds a and b
  clock.advance(30s);             // the lease runs out
  CHECK(restarted.drain() == 3);
  const auto labels = out.labels();
  CHECK(labels == std::vector<std::string>{"a#1", "b#1", "a#2", "c#1", "a#1", "b#1", "a#2"});
  std::map<postbox::message_id, int> copies;
  {
    std::lock_guard lock(out.mutex);
    for (const auto& m : out.got) ++copies[m.id];
  }
  int duplicates = 0;
  for (const auto& [id, n] : copies) duplicates += n - 1;
  CHECK(duplicates == 3);  // at most one batch, same message ids
  CHECK(copies.size() == 4);
}

TEMPLATE_TEST_CASE("dispatched rows are deleted once the retention period has passed", "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::outbox box(f.get(), postbox::json::codec{}, clock);
  sink out;
  auto opts = fixed_options();
  opts.retention = 1h;
  opts.purge_interval = 10min;
  postbox::outbox_relay relay(f.get(), out.destination(), opts, clock);
  stage_committed(f.get(), box, {order("a", 1)});
  REQUIRE(relay.run_once().marked == 1);
  clock.advance(50min);
  CHECK(relay.run_once().purged == 0);  // 50 minutes old
  CHECK(f.get().outbox_summary()->dispatched == 1);
  clock.advance(20min);
  CHECK(relay.run_once().purged == 1);
  CHECK(f.get().outbox_summary()->dispatched == 0);
  CHECK(relay.stats().purged == 1);
}

TEST_CASE("a relay refuses a zero batch, a zero lease and a missing destination", "[outbox]") {
  postbox::memory_store store;
  auto zero_batch = fixed_options(0);
  CHECK_THROWS_AS(postbox::outbox_relay(store, [](const stored_message&) { return errc::ok; }, zero_batch),
                  postbox::error);
  auto zero_lease = fixed_options();
  zero_lease.lease = postbox::duration::zero();
  CHECK_THROWS_AS(postbox::outbox_relay(store, [](const stored_message&) { return errc::ok; }, zero_lease),
                  postbox::error);
  CHECK_THROWS_AS(postbox::outbox_relay(store, postbox::outbox_destination{}, fixed_options()), postbox::error);
}

TEST_CASE("a codec that throws fails stage and dooms the transaction", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, throwing_codec{});
  auto tx = store.begin();
  CHECK(box.stage(tx, order("a", 1)) == errc::invalid_argument);
  CHECK(tx.commit() == errc::invalid_argument);
  CHECK(store.outbox_pending()->empty());
}

TEST_CASE("the relay thread publishes a local commit at once without the clock moving", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  auto opts = fixed_options();
  opts.poll_interval = 24h;
  postbox::outbox_relay relay(store, out.destination(), opts, clock);
  relay.start();
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));  // parked on the clock
  stage_committed(store, box, {order("a", 1)});
  CHECK(postbox_test::eventually([&] { return out.size() == 1; }));
  relay.stop();
  CHECK(clock.now() == postbox::manual_clock::default_start);
}

TEST_CASE("the relay thread retries a failed key at its backoff time on the clock", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"a"};
  auto opts = fixed_options();
  opts.poll_interval = 24h;
  postbox::outbox_relay relay(store, out.destination(), opts, clock);
  stage_committed(store, box, {order("a", 1)});
  relay.start();
  REQUIRE(postbox_test::eventually([&] { return relay.stats().publish_failures == 1 && clock.waiters() == 1; }));
  {
    std::lock_guard lock(out.mutex);
    out.failing_keys.clear();
  }
  clock.advance(1s);  // the backoff after the first failure
  CHECK(postbox_test::eventually([&] { return out.size() == 1; }));
  relay.stop();
}

#if POSTBOX_TEST_HAVE_SQLITE
TEST_CASE("the relay thread polls on the clock for commits made by another process", "[outbox]") {
  postbox_test::sqlite_fixture f;
  postbox::manual_clock clock;
  sink out;
  auto opts = fixed_options();
  opts.poll_interval = 5s;
  postbox::outbox_relay relay(f.get(), out.destination(), opts, clock);
  relay.start();
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  // Another process writes the row with its own connection: no signal here.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(f.dir.file("store.db").c_str(), &other) == SQLITE_OK);
  sqlite3_busy_timeout(other, 5000);
  const auto e = order("a", 1, clock);
  const std::string body = postbox::json::encode(e);
  const std::string sql =
      "INSERT INTO postbox_outbox (message_id, type, partition_key, correlation_id, causation_id, staged_at, body)"
      " VALUES ('" + e.id.to_string() + "', 'order.placed', 'a', '', '', 0, '" + body + "')";
  REQUIRE(sqlite3_exec(other, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(other);
  CHECK(out.size() == 0);
  clock.advance(5s);
  CHECK(postbox_test::eventually([&] { return out.size() == 1; }));
  relay.stop();
}

TEST_CASE("a relay on one store object wakes for commits made through another object on the same file", "[outbox]") {
  postbox_test::sqlite_fixture f;
  postbox::sqlite_store writer(f.dir.file("store.db"), postbox_test::sqlite_fixture::options());
  postbox::manual_clock clock;
  postbox::outbox box(writer, postbox::json::codec{}, clock);
  sink out;
  auto opts = fixed_options();
  opts.poll_interval = 24h;
  postbox::outbox_relay relay(f.get(), out.destination(), opts, clock);
  relay.start();
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  stage_committed(writer, box, {order("a", 1)});
  CHECK(postbox_test::eventually([&] { return out.size() == 1; }));
  relay.stop();
}
#endif

TEST_CASE("stop ends a parked relay thread and start runs it again", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  auto opts = fixed_options();
  opts.poll_interval = 24h;
  postbox::outbox_relay relay(store, out.destination(), opts, clock);
  relay.start();
  relay.start();  // idempotent
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  relay.stop();
  CHECK(clock.waiters() == 0);
  stage_committed(store, box, {order("a", 1)});
  CHECK(out.size() == 0);
  relay.start();
  CHECK(postbox_test::eventually([&] { return out.size() == 1; }));
}

TEST_CASE("to_channel decodes and sends; a full channel is retried", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  postbox::channel<env_t> ch(1);
  postbox::outbox_relay relay(store, postbox::to_channel(ch, postbox::json::codec{}), fixed_options(), clock);
  stage_committed(store, box, {order("a", 1), order("a", 2)});
  const auto step = relay.run_once();
  CHECK(step.published == 1);
  CHECK(step.failed == 1);  // capacity 1
  auto first = ch.try_receive();
  REQUIRE(first.has_value());
  CHECK(first->payload.n == 1);
  CHECK(first->partition_key == "a");
  clock.advance(1s);
  CHECK(relay.run_once().published == 1);
  CHECK(ch.try_receive()->payload.n == 2);
}

TEST_CASE("to_topic publishes on the message type as subject", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  postbox::topic<env_t> t;
  auto orders = t.subscribe("order.*");
  auto other = t.subscribe("payment.*");
  postbox::outbox_relay relay(store, postbox::to_topic(t, postbox::json::codec{}), fixed_options());
  stage_committed(store, box, {order("a", 1)});
  CHECK(relay.drain() == 1);
  auto got = orders.try_receive();
  REQUIRE(got.has_value());
  CHECK((*got)->payload.order == "a");
  CHECK(got->subject() == "order.placed");
  CHECK_FALSE(other.try_receive().has_value());
}

TEST_CASE("to_stream appends under the partition key", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  postbox::stream<env_t> s(4);
  postbox::outbox_relay relay(store, postbox::to_stream(s, postbox::json::codec{}), fixed_options());
  stage_committed(store, box, {order("k1", 1), order("k1", 2)});
  CHECK(relay.drain() == 2);
  auto r = s.read_from(postbox::start_from::earliest());
  auto batch = r.poll(10);
  REQUIRE(batch.records.size() == 2);
  CHECK(batch.records[0].key == "k1");
  CHECK(batch.records[0].value.payload.n == 1);
  CHECK(batch.records[1].value.payload.n == 2);
  CHECK(batch.records[0].pos.partition == batch.records[1].pos.partition);
}

TEMPLATE_TEST_CASE("a body the codec cannot decode moves to the outbox dead letters and the rest of its key is published",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  postbox::channel<env_t> ch(8);
  postbox::outbox_relay relay(store, postbox::to_channel(ch, postbox::json::codec{}), fixed_options(), clock);
  stored_message bad;
  bad.id = postbox::message_id::generate();
  bad.type = "order.placed";
  bad.partition_key = "a";
  bad.body = "{not json";
  {
    auto tx = store.begin();
    REQUIRE(box.stage_encoded(tx, bad) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  stage_committed(store, box, {order("a", 2), order("a", 3)});
  clock.advance(1s);
  const auto step = relay.run_once();
  CHECK(step.failed == 1);
  CHECK(step.dead_lettered == 1);
  CHECK(step.published == 2);
  REQUIRE(ch.size_approx() == 2);
  CHECK(ch.try_receive()->payload.n == 2);
  CHECK(ch.try_receive()->payload.n == 3);
  CHECK(relay.stats().last_error.find("parse_error") != std::string::npos);
  CHECK(store.outbox_summary()->pending == 0);
  auto dead = store.outbox_dead_letters({.key = "a"});
  REQUIRE(dead.has_value());
  REQUIRE(dead->size() == 1);
  CHECK(dead->front().message.id == bad.id);
  CHECK(dead->front().reason == "parse_error");
  CHECK(dead->front().error.find("parse_error") != std::string::npos);
  CHECK(dead->front().message.attempts == 1);
  CHECK(dead->front().first_failure == clock.now());
  CHECK(dead->front().last_failure == clock.now());
  CHECK(relay.stats().dead_lettered == 1);
}

// ---- stage refuses what the relay could never read back ----

TEMPLATE_TEST_CASE("stage of an envelope without a type is refused with bad_type and its transaction cannot commit",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::outbox box(store, postbox::json::codec{});
  auto tx = store.begin();
  REQUIRE(store.version_save(tx, "orders", "o-1", 1) == errc::ok);  // the business write next to it
  const auto note = postbox::make_envelope(untyped_note{"hello"});  // as in the README: no message_type
  REQUIRE(note.type.empty());
  CHECK(box.stage(tx, note) == errc::bad_type);
  CHECK(tx.failure() == errc::bad_type);
  CHECK(tx.last_error().find("type") != std::string::npos);
  CHECK(tx.commit() == errc::bad_type);
  CHECK(store.outbox_pending()->empty());
  auto check = store.begin();
  CHECK(*store.version_load(check, "orders", "o-1") == 0);  // the business write rolled back too
}

TEST_CASE("stage refuses a type or schema version other than the payload declares", "[outbox]") {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  {
    auto tx = store.begin();
    auto e = order("a", 1);
    e.type = "order.shipped";
    CHECK(box.stage(tx, e) == errc::unknown_type);
    CHECK(tx.commit() == errc::unknown_type);
  }
  {
    auto tx = store.begin();
    auto e = order("a", 1);
    e.schema_version = 7;
    CHECK(box.stage(tx, e) == errc::unsupported_version);
  }
  {
    auto tx = store.begin();
    auto e = order("a", 1);
    e.trace.tracestate = "vendor=1";  // a tracestate needs a traceparent
    CHECK(box.stage(tx, e) == errc::bad_type);
  }
  CHECK(store.outbox_pending()->empty());
}

TEST_CASE("stage_round_trip refuses a payload that encodes but does not decode back", "[outbox]") {
  postbox::memory_store store;
  const auto e = postbox::make_envelope(lopsided{3});
  {
    postbox::outbox strict(store, postbox::json::codec{});
    auto tx = store.begin();
    CHECK(strict.stage_round_trip(tx, e) == errc::bad_type);
    CHECK(tx.last_error().find("payload") != std::string::npos);
    CHECK(tx.commit() == errc::bad_type);
  }
  CHECK(store.outbox_pending()->empty());
  postbox::outbox lenient(store, postbox::json::codec{});  // the field rules alone cannot see the payload
  auto tx = store.begin();
  CHECK(lenient.stage(tx, e) == errc::ok);
  CHECK(tx.commit() == errc::ok);
}

// ---- poison rows ----

TEMPLATE_TEST_CASE("a row that fails max_attempts times is dead-lettered and the rest of its key is published",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  const auto first = order("a", 1, clock);
  stage_committed(store, box, {first, order("a", 2, clock)});
  sink out;
  std::atomic<int> refusals{0};
  out.during = [&](const stored_message& m) {
    if (m.id == first.id) {
      ++refusals;
      std::lock_guard lock(out.mutex);
      out.failing_keys = {"a"};
    } else {
      std::lock_guard lock(out.mutex);
      out.failing_keys.clear();
    }
  };
  auto opts = fixed_options();
  opts.max_attempts = 3;
  postbox::outbox_relay relay(store, out.destination(), opts, clock);
  CHECK(relay.run_once().failed == 1);  // attempt 1; retry after 1 s
  clock.advance(1s);
  CHECK(relay.run_once().failed == 1);  // attempt 2; retry after 2 s
  CHECK(out.size() == 0);
  clock.advance(2s);
  const auto step = relay.run_once();  // attempt 3: the last
  CHECK(step.dead_lettered == 1);
  CHECK(step.published == 1);
  CHECK(out.labels() == std::vector<std::string>{"a#2"});
  CHECK(refusals.load() == 3);
  auto dead = store.outbox_dead_letters({.reason = std::string(postbox::outbox_retries_exhausted)});
  REQUIRE(dead.has_value());
  REQUIRE(dead->size() == 1);
  CHECK(dead->front().message.id == first.id);
  CHECK(dead->front().message.attempts == 3);
  CHECK(dead->front().first_failure == postbox::manual_clock::default_start);
  CHECK(dead->front().last_failure == postbox::manual_clock::default_start + 3s);
  CHECK(dead->front().error.find("full") != std::string::npos);
}

TEST_CASE("a destination result the relay's classifier calls permanent is dead-lettered at its first failure",
          "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  stage_committed(store, box, {order("a", 1, clock), order("a", 2, clock)});
  int calls = 0;
  auto opts = fixed_options();
  opts.is_permanent = [](errc c) { return c == errc::closed; };
  postbox::outbox_relay relay(
      store, [&](const stored_message&) { return ++calls == 1 ? errc::closed : errc::ok; }, opts, clock);
  const auto step = relay.run_once();
  CHECK(step.dead_lettered == 1);
  CHECK(step.published == 1);
  auto dead = store.outbox_dead_letters({});
  REQUIRE(dead->size() == 1);
  CHECK(dead->front().reason == "closed");
  CHECK(dead->front().message.attempts == 1);
}

TEST_CASE("the default classifier keeps transient results retrying and dead-letters decode errors", "[outbox]") {
  STATIC_REQUIRE(postbox::outbox_permanent_error(errc::parse_error));
  STATIC_REQUIRE(postbox::outbox_permanent_error(errc::bad_type));
  STATIC_REQUIRE(postbox::outbox_permanent_error(errc::unknown_type));
  STATIC_REQUIRE(postbox::outbox_permanent_error(errc::invalid_argument));
  STATIC_REQUIRE_FALSE(postbox::outbox_permanent_error(errc::full));
  STATIC_REQUIRE_FALSE(postbox::outbox_permanent_error(errc::timeout));
  STATIC_REQUIRE_FALSE(postbox::outbox_permanent_error(errc::handler_error));
  STATIC_REQUIRE_FALSE(postbox::outbox_permanent_error(errc::canceled));
}

TEMPLATE_TEST_CASE("a redriven dead letter is published again with its id after the rows staged before the redrive",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  const auto poison = order("a", 1, clock);
  stage_committed(store, box, {poison, order("a", 2, clock)});
  bool refuse = true;  // a destination that refused this message until it was fixed
  sink out;
  auto inner = out.destination();
  postbox::outbox_relay relay(
      store,
      [&](const stored_message& m) { return refuse && m.id == poison.id ? errc::bad_type : inner(m); },
      fixed_options(), clock);
  CHECK(relay.run_once().dead_lettered == 1);
  stage_committed(store, box, {order("a", 3, clock)});
  CHECK(relay.drain() == 1);
  CHECK(out.labels() == std::vector<std::string>{"a#2", "a#3"});
  refuse = false;
  clock.advance(1min);
  auto n = store.outbox_redrive({.key = "a"}, clock.now());
  REQUIRE(n.has_value());
  CHECK(*n == 1);
  CHECK(relay.drain() == 1);
  CHECK(out.labels() == std::vector<std::string>{"a#2", "a#3", "a#1"});
  {
    std::lock_guard lock(out.mutex);
    CHECK(out.got.back().id == poison.id);
  }
  CHECK(store.outbox_dead_letters({})->empty());
  CHECK(relay.stats().dead_letters == 0);
}

TEMPLATE_TEST_CASE("relay stats show stuck rows, the oldest pending row's age and the dead letters on the clock",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"a"};
  auto slow_retry = fixed_options();
  slow_retry.retry.initial_backoff = 1min;
  postbox::outbox_relay relay(store, out.destination(), slow_retry, clock);
  auto s = relay.stats();
  CHECK(s.pending == 0);
  CHECK_FALSE(s.oldest_pending.has_value());
  CHECK(s.oldest_pending_age == postbox::duration::zero());
  stage_committed(store, box, {order("a", 1, clock), order("b", 1, clock)});
  clock.advance(2s);
  stage_committed(store, box, {order("a", 2, clock)});
  (void)relay.run_once();
  clock.advance(5s);
  s = relay.stats();
  CHECK(s.snapshot == errc::ok);
  CHECK(s.pending == 2);
  CHECK(s.stuck == 1);  // a#1 failed once and waits; a#2 waits behind it but never failed
  REQUIRE(s.oldest_pending.has_value());
  CHECK(*s.oldest_pending == postbox::manual_clock::default_start);
  CHECK(s.oldest_pending_age == 7s);
  CHECK(s.dead_letters == 0);
  stored_message bad;
  bad.id = postbox::message_id::generate();
  bad.type = "order.placed";
  bad.partition_key = "c";
  bad.body = "{}";
  {
    auto tx = store.begin();
    REQUIRE(box.stage_encoded(tx, bad) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  {
    std::lock_guard lock(out.mutex);
    out.failing_keys = {"a", "c"};
  }
  auto opts = fixed_options();
  opts.owner = "relay-b";
  opts.is_permanent = [](errc) { return true; };
  postbox::outbox_relay other(store, out.destination(), opts, clock);
  (void)other.run_once();  // key a still waits for its retry; c is refused for good
  s = relay.stats();
  CHECK(s.dead_letters == 1);
  CHECK(s.dead_lettered == 0);  // this relay moved none
  CHECK(other.stats().dead_lettered == 1);
  CHECK(s.stuck == 1);
}

// ---- relay owner and lifecycle ----

TEMPLATE_TEST_CASE("a relay restarted after a crash with the default owner reclaims its leases at once", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  stage_committed(store, box, {order("a", 1, clock), order("a", 2, clock), order("b", 1, clock)});
  sink out;
  std::string crashed_owner;
  {
    auto opts = fixed_options();
    opts.owner.clear();  // the default
    opts.release_on_stop = false;  // a crash releases nothing
    opts.on_point = [](relay_point p, const stored_message*) {
      if (p == relay_point::published) throw std::runtime_error("crash");  // dies after the first publish
    };
    postbox::outbox_relay doomed(store, out.destination(), opts, clock);
    crashed_owner = doomed.owner();
    CHECK_THROWS(doomed.run_once());
  }  // destroyed without stop: its leases stay behind
  REQUIRE(store.outbox_summary()->leased == 3);
  auto opts = fixed_options();
  opts.owner.clear();
  postbox::outbox_relay restarted(store, out.destination(), opts, clock);
  CHECK(restarted.owner() == crashed_owner);
  CHECK(restarted.drain() == 3);  // no wait for the 30 s lease: the clock has not moved
  CHECK(clock.now() == postbox::manual_clock::default_start);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "a#1", "a#2", "b#1"});  // a#1 twice: at-least-once
}

TEMPLATE_TEST_CASE("two live relays on one store get different default owners", "[outbox]", STORE_FIXTURES) {
  TestType f;
  auto opts = fixed_options();
  opts.owner.clear();
  sink out;
  std::string first_name;
  {
    postbox::outbox_relay first(f.get(), out.destination(), opts, postbox::default_clock());
    postbox::outbox_relay second(f.get(), out.destination(), opts, postbox::default_clock());
    CHECK(first.owner() != second.owner());
    CHECK(first.owner().find("#1") != std::string::npos);
    CHECK(second.owner().find("#2") != std::string::npos);
    first_name = first.owner();
  }
  postbox::outbox_relay again(f.get(), out.destination(), opts, postbox::default_clock());
  CHECK(again.owner() == first_name);  // the slot is free again
}

TEST_CASE("a store path is made canonical exactly as std::filesystem::weakly_canonical does", "[outbox]") {
  namespace fs = std::filesystem;
  postbox_test::temp_dir d{"postbox_outbox_owner"};
  fs::create_directories(d.path / "real");
  { std::FILE* f = std::fopen((d.path / "real" / "db.sqlite").c_str(), "w"); REQUIRE(f != nullptr); std::fclose(f); }
  fs::create_directory_symlink(d.path / "real", d.path / "link");
  const std::vector<fs::path> paths = {
      d.path / "link" / "db.sqlite",                // an existing file through a symbolic link
      d.path / "link" / "new.sqlite",               // not created yet: its directory resolves
      d.path / "link" / ".." / "real" / "db.sqlite",  // dot-dot after a link
      fs::relative(d.path / "link" / "db.sqlite"),  // relative to the working directory
  };
  for (const auto& p : paths) {
    CAPTURE(p.string());
    CHECK(postbox::detail::canonical_store_path(p.string()) == fs::weakly_canonical(p).string());
  }
}

TEST_CASE("the default owner's prefix names the host and the executable as /proc/self/exe links it", "[outbox]") {
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string owner = postbox::detail::relay_host_and_executable();
  REQUIRE(owner.size() > exe.size() + 1);
  CHECK(owner.substr(owner.size() - exe.size() - 1) == ":" + exe);
  CHECK(owner.substr(0, owner.size() - exe.size() - 1) != "?");
}

#if POSTBOX_TEST_HAVE_SQLITE
namespace {
/// Sets TMPDIR for one scope and puts the previous value back.
struct scoped_tmpdir {
  std::optional<std::string> old;
  explicit scoped_tmpdir(const std::string& value) {
    if (const char* v = std::getenv("TMPDIR")) old = v;
    ::setenv("TMPDIR", value.c_str(), 1);
  }
  ~scoped_tmpdir() {
    if (old) {
      ::setenv("TMPDIR", old->c_str(), 1);
    } else {
      ::unsetenv("TMPDIR");
    }
  }
};
}  // namespace

TEST_CASE("a relay on a store file locks its default owner's slot in $TMPDIR and falls back to a random owner when that is no directory",
          "[outbox]") {
  namespace fs = std::filesystem;
  postbox_test::temp_dir d{"postbox_outbox_slot"};
  fs::create_directories(d.path / "locks");
  postbox::sqlite_store store(d.file("store.db"));
  sink out;
  auto opts = fixed_options();
  opts.owner.clear();
  {
    scoped_tmpdir tmp((d.path / "locks").string());
    postbox::outbox_relay relay(store, out.destination(), opts, postbox::default_clock());
    CHECK(relay.owner() == postbox::detail::relay_host_and_executable() + ":" +
                               fs::weakly_canonical(d.file("store.db")).string() + "#1");
    std::vector<std::string> locks;
    for (const auto& e : fs::directory_iterator(d.path / "locks")) locks.push_back(e.path().filename().string());
    REQUIRE(locks.size() == 1);
    CHECK(locks.front().rfind("postbox-relay-", 0) == 0);
    CHECK(locks.front().size() > 7);
    CHECK(locks.front().substr(locks.front().size() - 7) == "-1.lock");
  }
  {
    scoped_tmpdir tmp(d.file("store.db"));  // a file, not a directory: no lock file can be made
    postbox::outbox_relay relay(store, out.destination(), opts, postbox::default_clock());
    CHECK(relay.owner().rfind("relay-", 0) == 0);
  }
}
#endif

TEST_CASE("stop releases the leases the relay still holds so another relay takes the key at once", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  stage_committed(store, box, {order("a", 1, clock), order("a", 2, clock)});
  sink out;
  auto opts = fixed_options();
  opts.on_point = [](relay_point p, const stored_message*) {
    if (p == relay_point::claimed) throw std::runtime_error("interrupted");
  };
  postbox::outbox_relay first(store, out.destination(), opts, clock);
  CHECK_THROWS(first.run_once());
  REQUIRE(store.outbox_summary()->leased == 2);
  first.stop();
  CHECK(store.outbox_summary()->leased == 0);
  auto other = fixed_options();
  other.owner = "relay-b";
  postbox::outbox_relay second(store, out.destination(), other, clock);
  CHECK(second.drain() == 2);
}

TEST_CASE("stop wakes a relay blocked on a full channel; the row is released without counting an attempt",
          "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  postbox::channel<env_t> ch(1);
  stage_committed(store, box, {order("a", 1, clock), order("a", 2, clock)});
  auto opts = fixed_options();
  opts.poll_interval = 24h;
  postbox::outbox_relay relay(store, postbox::to_channel_blocking(ch, postbox::json::codec{}), opts, clock);
  relay.start();
  REQUIRE(postbox_test::eventually([&] { return ch.size_approx() == 1; }));
  relay.stop();  // returns: the second send is canceled
  const auto pending = store.outbox_pending();
  REQUIRE(pending->size() == 1);
  CHECK(pending->front().attempts == 0);
  CHECK(store.outbox_summary()->leased == 0);
  CHECK(relay.stats().publish_failures == 0);
  CHECK(ch.try_receive()->payload.n == 1);
  relay.start();  // a fresh stop token
  REQUIRE(postbox_test::eventually([&] { return ch.size_approx() == 1; }));
  CHECK(postbox_test::eventually([&] { return store.outbox_summary()->pending == 0; }));
  relay.stop();
  CHECK(ch.try_receive()->payload.n == 2);
}

TEST_CASE("register_outbox_relay exposes the relay's counters and the outbox depth", "[outbox]") {
  postbox::memory_store store;
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  sink out;
  out.failing_keys = {"b"};
  postbox::outbox_relay relay(store, out.destination(), fixed_options(), clock);
  stage_committed(store, box, {order("a", 1), order("b", 1)});
  (void)relay.run_once();
  clock.advance(3s);
  postbox::metrics_registry registry;
  auto reg = postbox::register_outbox_relay(registry, "orders", relay, clock);
  const std::string text = registry.render_prometheus();
  CHECK(text.find("postbox_outbox_published_total{component=\"outbox_relay\",name=\"orders\"} 1") != std::string::npos);
  CHECK(text.find("postbox_outbox_publish_failures_total{component=\"outbox_relay\",name=\"orders\"} 1") !=
        std::string::npos);
  CHECK(text.find("postbox_outbox_pending{component=\"outbox_relay\",name=\"orders\"} 1") != std::string::npos);
  CHECK(text.find("postbox_outbox_oldest_pending_seconds{component=\"outbox_relay\",name=\"orders\"} 3") !=
        std::string::npos);
  CHECK(text.find("postbox_outbox_stuck{component=\"outbox_relay\",name=\"orders\"} 1") != std::string::npos);
  CHECK(text.find("postbox_outbox_dead_letters{component=\"outbox_relay\",name=\"orders\"} 0") !=
        std::string::npos);
  CHECK(text.find("postbox_outbox_dead_lettered_total{component=\"outbox_relay\",name=\"orders\"} 0") !=
        std::string::npos);
}

// ---- stress: producers and two relays at once ----

namespace {

template <class StoreA, class StoreB>
void relay_stress(StoreA& a, StoreB& b) {
  const int producers = 3;
  const int per_producer = static_cast<int>(postbox_test::scaled(600));
  const int keys = 37;  // more keys than a batch, so both relays find unleased keys
  std::mutex mutex;
  std::set<postbox::message_id> in_flight;  // being published right now, by either relay
  std::set<postbox::message_id> distinct;
  std::vector<stored_message> published;
  int overlaps = 0;
  // Progress for the waiting thread, read without the mutex so that it never
  // competes with the relays for it. Relaxed: a counter only; the final
  // checks read the data under the mutex.
  std::atomic<std::size_t> distinct_count{0};
  auto destination = [&](const stored_message& m) -> errc {
    {
      std::lock_guard lock(mutex);
      if (!in_flight.insert(m.id).second) ++overlaps;  // two relays inside one message's publish
    }
    std::this_thread::yield();
    std::lock_guard lock(mutex);
    in_flight.erase(m.id);
    published.push_back(m);
    if (distinct.insert(m.id).second) distinct_count.fetch_add(1, std::memory_order_relaxed);
    return errc::ok;
  };
  postbox::relay_options opts;
  opts.batch_size = 8;
  opts.lease = 120s;                  // never runs out here: a second relay must be kept off by the lease alone
  opts.poll_interval = 20ms;          // fallback only; local commits wake the relays
  opts.retry.initial_backoff = 1ms;
  opts.retry.max_backoff = 10ms;
  opts.owner = "stress-a";
  postbox::outbox_relay relay_a(a, destination, opts);
  opts.owner = "stress-b";
  postbox::outbox_relay relay_b(b, destination, opts);
  relay_a.start();
  relay_b.start();

  std::vector<std::thread> threads;
  std::mutex staged_mutex;
  std::set<postbox::message_id> staged;
  std::atomic<int> stage_errors{0};  // Catch's assertions are not thread-safe: count, check after join
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      postbox::outbox box(a, postbox::json::codec{});
      for (int i = 0; i < per_producer; ++i) {
        std::vector<postbox::message_id> ids;
        auto tx = a.begin();
        auto e = order("k" + std::to_string((p * 7 + i) % keys), p * 100000 + i);
        if (box.stage(tx, e) != errc::ok) ++stage_errors;
        ids.push_back(e.id);
        if (i % 3 == 0) {  // some transactions stage two messages
          auto second = order("k" + std::to_string(i % keys), p * 100000 + i + 50000);
          if (box.stage(tx, second) != errc::ok) ++stage_errors;
          ids.push_back(second.id);
        }
        if (tx.commit() != errc::ok) {
          ++stage_errors;
          continue;
        }
        std::lock_guard lock(staged_mutex);
        staged.insert(ids.begin(), ids.end());
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(stage_errors.load() == 0);
  const std::size_t total = staged.size();
  const bool all =
      postbox_test::eventually([&] { return distinct_count.load(std::memory_order_relaxed) >= total; });
  relay_a.stop();
  relay_b.stop();
  if (!all) {
    std::lock_guard lock(mutex);
    const auto sa = relay_a.stats(), sb = relay_b.stats();
    const auto sum = a.outbox_summary();
    FAIL_CHECK("published " << published.size() << " (" << distinct.size() << " distinct) of " << total
                            << "; relay a: batches " << sa.batches << " claimed " << sa.claimed << " published "
                            << sa.published << " dispatched " << sa.dispatched << " store errors " << sa.store_errors
                            << " last error " << sa.last_error << "; relay b: batches " << sb.batches << " claimed "
                            << sb.claimed << " published " << sb.published << " dispatched " << sb.dispatched
                            << "; pending " << (sum ? sum->pending : 0) << " leased " << (sum ? sum->leased : 0));
  }
  REQUIRE(all);

  std::lock_guard lock(mutex);
  CHECK(overlaps == 0);
  CHECK(distinct == staged);  // every staged id published, nothing else
  CHECK(published.size() == total);  // and, with no crash, exactly once
  // Per key, publication follows staging (commit) order.
  std::map<std::string, std::uint64_t> last_seq;
  int out_of_order = 0;
  for (const auto& m : published) {
    auto& last = last_seq[m.partition_key];
    if (m.sequence <= last) ++out_of_order;
    last = m.sequence;
  }
  CHECK(out_of_order == 0);
  CHECK(relay_a.stats().dispatched + relay_b.stats().dispatched == total);
  INFO("relay a published " << relay_a.stats().published << ", relay b " << relay_b.stats().published);
  CHECK(a.outbox_summary()->pending == 0);
}

}  // namespace

TEST_CASE("stress: producers staging while two relays publish on one memory store lose, duplicate and reorder nothing",
          "[outbox][stress]") {
  postbox::memory_store store;
  relay_stress(store, store);
}

#if POSTBOX_TEST_HAVE_SQLITE
TEST_CASE("stress: producers staging while two relays on two connections publish one SQLite file lose, duplicate and "
          "reorder nothing",
          "[outbox][stress]") {
  postbox_test::temp_dir dir("postbox_outbox_stress");
  postbox::sqlite_store_options o;
  o.synchronous = postbox::sqlite_synchronous::off;  // durability is not what is tested here
  o.busy_timeout = std::chrono::milliseconds(30000);
  postbox::sqlite_store a(dir.file("stress.db"), o);
  postbox::sqlite_store b(dir.file("stress.db"), o);
  relay_stress(a, b);
}
#endif

// ---- teardown: stop or destroy a started relay at any point ----

TEST_CASE("teardown: a started relay stopped or destroyed while parked, mid-batch or blocked on a full channel "
          "returns at once and publishes every message exactly once over its life and the next",
          "[outbox][teardown]") {
  const std::uint64_t iterations = std::max<std::uint64_t>(postbox_test::scaled(1000), 100);
  std::uint64_t parked = 0, mid_batch = 0, blocked = 0;
  for (std::uint64_t i = 0; i < iterations; ++i) {
    postbox::memory_store store;
    postbox::manual_clock clock;  // never advanced: nothing here waits on time
    postbox::outbox box(store, postbox::json::codec{}, clock);
    auto opts = fixed_options(4);
    opts.poll_interval = 24h;
    const bool explicit_stop = i % 2 == 0;  // else the destructor stops it
    std::vector<env_t> staged;
    std::mutex mutex;
    std::vector<postbox::message_id> published;  // by both lives, in order
    auto record = [&](const stored_message& m) {
      std::lock_guard lock(mutex);
      published.push_back(m.id);
      return errc::ok;
    };
    postbox::channel<env_t> ch(1);
    switch (i % 3) {
      case 0: {  // parked in the commit signal's wait on the clock
        postbox::outbox_relay relay(store, record, opts, clock);
        relay.start();
        REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
        if (explicit_stop) relay.stop();
        ++parked;
        break;
      }
      case 1: {  // mid-batch: several batches of 4 over 3 keys, stopped after a varying number of publishes
        for (int n = 0; n < 10; ++n) staged.push_back(order("k" + std::to_string(n % 3), n, clock));
        stage_committed(store, box, staged);
        std::atomic<std::size_t> calls{0};  // relaxed: a progress hint for this thread's wait
        postbox::outbox_relay relay(
            store,
            [&](const stored_message& m) {
              calls.fetch_add(1, std::memory_order_relaxed);
              return record(m);
            },
            opts, clock);
        relay.start();
        const std::size_t after = static_cast<std::size_t>(i % 11);
        REQUIRE(postbox_test::eventually([&] { return calls.load(std::memory_order_relaxed) >= after; }));
        if (explicit_stop) relay.stop();
        ++mid_batch;
        break;
      }
      default: {  // blocked in channel::send on a full channel
        for (int n = 0; n < 3; ++n) staged.push_back(order("k", n, clock));
        stage_committed(store, box, staged);
        {
          postbox::outbox_relay relay(store, postbox::to_channel_blocking(ch, postbox::json::codec{}), opts, clock);
          relay.start();
          REQUIRE(postbox_test::eventually([&] { return ch.size_approx() == 1; }));
          if (explicit_stop) relay.stop();
        }
        while (auto e = ch.try_receive()) {  // what the first life sent
          stored_message m;
          m.id = e->id;
          record(m);
        }
        ++blocked;
        break;
      }
    }
    // The relay is gone: nothing is leased, nothing counted a failed attempt.
    const auto sum = store.outbox_summary();
    REQUIRE(sum.has_value());
    CHECK(sum->leased == 0);
    CHECK(sum->retrying == 0);
    // The next life publishes the rest.
    auto next = fixed_options(64);
    next.owner = "next-life";
    postbox::outbox_relay after(store, record, next, clock);
    (void)after.drain();
    std::lock_guard lock(mutex);
    std::multiset<postbox::message_id> got(published.begin(), published.end());
    std::set<postbox::message_id> want;
    for (const auto& e : staged) want.insert(e.id);
    INFO("iteration " << i << " published " << got.size() << " pending " << store.outbox_summary()->pending);
    REQUIRE(got.size() == want.size());  // a clean stop marks what it published: no duplicate at all
    CHECK(std::set<postbox::message_id>(got.begin(), got.end()) == want);
  }
  CHECK(parked + mid_batch + blocked == iterations);
}


// ---------------------------------------------------------------------------
// Durable scheduling: stage_at
// ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a row staged with stage_at is published exactly at its due time, not before", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  {
    auto tx = store.begin();
    REQUIRE(box.stage_at(tx, order("a", 1, clock), clock.now() + 10s) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  sink out;
  postbox::outbox_relay relay(store, out.destination(), fixed_options(), clock);
  const auto early = relay.run_once();
  CHECK(early.published == 0);
  REQUIRE(early.next_due.has_value());
  CHECK(*early.next_due == postbox::manual_clock::default_start + 10s);  // the relay knows when to wake
  clock.advance(10s - 1ms);
  CHECK(relay.run_once().published == 0);
  clock.advance(1ms);
  CHECK(relay.run_once().published == 1);
  CHECK(out.labels() == std::vector<std::string>{"a#1"});
}

TEMPLATE_TEST_CASE("a row not yet due does not hold its key: later rows of the key are published first", "[outbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& store = f.get();
  postbox::manual_clock clock;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  {
    auto tx = store.begin();
    REQUIRE(box.stage(tx, order("a", 1, clock)) == errc::ok);
    REQUIRE(box.stage_after(tx, order("a", 2, clock), 5s) == errc::ok);
    REQUIRE(box.stage(tx, order("a", 3, clock)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  sink out;
  postbox::outbox_relay relay(store, out.destination(), fixed_options(), clock);
  CHECK(relay.run_once().published == 2);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "a#3"});
  clock.advance(5s);
  CHECK(relay.run_once().published == 1);
  CHECK(out.labels() == std::vector<std::string>{"a#1", "a#3", "a#2"});
}

TEMPLATE_TEST_CASE("a pending scheduled row survives a restart and is published at its due time afterwards",
                   "[outbox]", STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::message_id id;
  {
    postbox::outbox box(f.get(), postbox::json::codec{}, clock);
    auto tx = f.get().begin();
    const auto e = order("k", 7, clock);
    id = e.id;
    REQUIRE(box.stage_at(tx, e, clock.now() + 1h) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
    sink out;
    postbox::outbox_relay relay(f.get(), out.destination(), fixed_options(), clock);
    CHECK(relay.run_once().published == 0);
  }
  f.reopen();  // a restart: SQLite opens the file again
  auto& store = f.get();
  auto pending = store.outbox_pending();
  REQUIRE(pending.has_value());
  REQUIRE(pending->size() == 1);
  CHECK(pending->front().due == postbox::manual_clock::default_start + 1h);
  sink out;
  postbox::outbox_relay relay(store, out.destination(), fixed_options(), clock);
  clock.advance(59min);
  CHECK(relay.run_once().published == 0);
  clock.advance(1min);
  CHECK(relay.run_once().published == 1);
  REQUIRE(out.size() == 1);
  CHECK(out.got.front().id == id);
}
