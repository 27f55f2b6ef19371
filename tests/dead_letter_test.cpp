// SPDX-License-Identifier: MIT
// Specification tests for postbox::dead_letter_queue: bound policies, list and filter, remove, paced redrive.
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <type_traits>
#include <vector>

using namespace std::chrono_literals;

namespace {

using env_t = postbox::envelope<int>;

struct rig {
  postbox::manual_clock clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};

  [[nodiscard]] postbox::dead_letter<int> letter(int n, std::string reason = "retries_exhausted",
                                                 std::string type = "test.int", std::string key = {},
                                                 std::string source = "numbers") {
    postbox::dead_letter<int> d;
    auto e = postbox::make_envelope(std::move(type), n, postbox::message_kind::event, clock);
    e.partition_key = std::move(key);
    e.attempt = 3;
    d.message.emplace(std::move(e));
    d.reason = std::move(reason);
    d.error = "boom";
    d.attempts = 3;
    d.first_failure = clock.now() - 2s;
    d.last_failure = clock.now();
    d.source = std::move(source);
    return d;
  }
};

std::vector<int> payloads(const std::vector<postbox::dead_letter<int>>& v) {
  std::vector<int> out;
  for (const auto& d : v) out.push_back(d.message ? d.message->payload : -1);
  return out;
}

}  // namespace

TEST_CASE("add assigns increasing ids and the acceptance time, and list returns entries oldest first",
          "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, r.clock);
  auto a = r.letter(1);
  REQUIRE(dlq.add(std::move(a)) == postbox::errc::ok);
  r.clock.advance(1s);
  auto b = r.letter(2);
  REQUIRE(dlq.add(std::move(b)) == postbox::errc::ok);
  const auto all = dlq.list();
  REQUIRE(all.size() == 2);
  CHECK(payloads(all) == std::vector<int>{1, 2});
  CHECK(all[0].id < all[1].id);
  CHECK(all[0].dead_lettered_at == postbox::manual_clock::default_start);
  CHECK(all[1].dead_lettered_at == postbox::manual_clock::default_start + 1s);
  CHECK(dlq.get(all[1].id)->message->payload == 2);
  CHECK_FALSE(dlq.get(999).has_value());
  CHECK(dlq.stats().added == 2);
  CHECK(dlq.stats().oldest_age == 1s);
}

TEST_CASE("filters select by reason, type, key, source, age and poison", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, r.clock);
  auto add = [&](postbox::dead_letter<int> d) { REQUIRE(dlq.add(std::move(d)) == postbox::errc::ok); };
  add(r.letter(1, "expired", "order.placed", "alice"));
  r.clock.advance(10min);
  add(r.letter(2, "retries_exhausted", "order.placed", "bob"));
  add(r.letter(3, "retries_exhausted", "order.paid", "alice", "payments"));
  postbox::dead_letter<int> poison;
  poison.raw = "{not json";
  poison.reason = "parse_error";
  poison.source = "numbers";
  add(std::move(poison));

  postbox::dead_letter_filter f;
  f.reason = "retries_exhausted";
  CHECK(payloads(dlq.list(f)) == std::vector<int>{2, 3});
  f = {};
  f.type = "order.placed";
  CHECK(payloads(dlq.list(f)) == std::vector<int>{1, 2});
  f = {};
  f.key = "alice";
  CHECK(payloads(dlq.list(f)) == std::vector<int>{1, 3});
  f = {};
  f.source = "payments";
  CHECK(payloads(dlq.list(f)) == std::vector<int>{3});
  f = {};
  f.older_than = 5min;
  CHECK(payloads(dlq.list(f)) == std::vector<int>{1});
  f = {};
  f.newer_than = 5min;
  CHECK(payloads(dlq.list(f)) == std::vector<int>{2, 3, -1});
  f = {};
  f.poison = true;
  CHECK(payloads(dlq.list(f)) == std::vector<int>{-1});
  f = {};
  f.reason = "retries_exhausted";
  f.key = "alice";
  CHECK(payloads(dlq.list(f)) == std::vector<int>{3});
  CHECK(dlq.count(f) == 1);
}

TEST_CASE("remove deletes one entry by id or every entry a filter matches", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, r.clock);
  for (int i = 0; i < 4; ++i) REQUIRE(dlq.add(r.letter(i, i % 2 == 0 ? "even" : "odd")) == postbox::errc::ok);
  const auto first = dlq.list().front().id;
  CHECK(dlq.remove(first));
  CHECK_FALSE(dlq.remove(first));
  postbox::dead_letter_filter odd;
  odd.reason = "odd";
  CHECK(dlq.remove(odd) == 2);
  CHECK(payloads(dlq.list()) == std::vector<int>{2});
  CHECK(dlq.stats().removed == 3);
}

TEST_CASE("a full queue with the refuse policy fails the add and leaves the entry with the caller", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = 2}, r.clock);
  REQUIRE(dlq.add(r.letter(1)) == postbox::errc::ok);
  REQUIRE(dlq.add(r.letter(2)) == postbox::errc::ok);
  auto third = r.letter(3);
  CHECK(dlq.add(std::move(third)) == postbox::errc::full);
  REQUIRE(third.message.has_value());  // not moved from
  CHECK(third.message->payload == 3);
  CHECK(dlq.size() == 2);
  CHECK(dlq.stats().refused == 1);
}

TEST_CASE("a full queue with drop_oldest evicts the oldest entry and hands it to on_evict", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(
      postbox::dead_letter_options{.capacity = 2, .when_full = postbox::dead_letter_full::drop_oldest}, r.clock);
  std::vector<int> evicted;
  dlq.on_evict([&](postbox::dead_letter<int> d) { evicted.push_back(d.message->payload); });
  for (int i = 1; i <= 4; ++i) REQUIRE(dlq.add(r.letter(i)) == postbox::errc::ok);
  CHECK(payloads(dlq.list()) == std::vector<int>{3, 4});
  CHECK(evicted == std::vector<int>{1, 2});
  CHECK(dlq.stats().evicted == 2);
  CHECK_THROWS_AS(postbox::dead_letter_queue<int>(postbox::dead_letter_options{.capacity = 0}), postbox::error);
}

TEST_CASE("redrive sends entries back to their origin at the token-bucket rate on the clock", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(r.timers, postbox::dead_letter_options{.redrive_rate = 2});
  postbox::channel<env_t> origin(16);
  dlq.set_origin("numbers", origin);
  for (int i = 0; i < 7; ++i) REQUIRE(dlq.add(r.letter(i)) == postbox::errc::ok);
  CHECK(dlq.redrive() == 7);
  CHECK(origin.size_approx() == 2);  // the bucket starts full: burst = rate = 2
  CHECK(dlq.stats().redrive_pending == 5);
  r.timers.run_due();
  CHECK(origin.size_approx() == 2);  // no time passed: no token
  r.clock.advance(1s);
  r.timers.run_due();
  CHECK(origin.size_approx() == 4);  // 2 per advanced second
  r.clock.advance(1s);
  r.timers.run_due();
  CHECK(origin.size_approx() == 6);
  r.clock.advance(1s);
  r.timers.run_due();
  CHECK(origin.size_approx() == 7);
  CHECK(dlq.size() == 0);
  CHECK(dlq.stats().redriven == 7);
  CHECK(r.timers.pending() == 0);
  std::vector<int> order;
  while (auto e = origin.try_receive()) order.push_back(e->payload);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("without a timer service redrive progresses on pump_redrive calls", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.redrive_rate = 1, .redrive_burst = 1}, r.clock);
  postbox::channel<env_t> origin(16);
  dlq.set_origin("numbers", origin);
  for (int i = 0; i < 3; ++i) REQUIRE(dlq.add(r.letter(i)) == postbox::errc::ok);
  postbox::dead_letter_filter f;
  f.reason = "retries_exhausted";
  CHECK(dlq.redrive({.filter = f, .max = 2}) == 2);
  CHECK(origin.size_approx() == 1);
  CHECK(dlq.pump_redrive() == 0);
  r.clock.advance(1s);
  CHECK(dlq.pump_redrive() == 1);
  r.clock.advance(1s);
  CHECK(dlq.pump_redrive() == 0);  // the third was not selected (max = 2)
  CHECK(dlq.size() == 1);
}

TEST_CASE("a redriven envelope gets a fresh retry budget and carries its history in headers", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, r.clock);
  auto d = r.letter(5);
  d.message->deadline = r.clock.now();
  const auto first = d.first_failure;
  const auto env = postbox::dead_letter_queue<int>::redriven_envelope(d, true);
  CHECK(env.attempt == 0);
  CHECK(env.payload == 5);
  CHECK(env.id == d.message->id);
  CHECK_FALSE(env.deadline.has_value());
  CHECK(env.headers.get(postbox::header_names::dead_letter_attempts) == std::optional<std::string_view>("3"));
  CHECK(env.headers.get(postbox::header_names::dead_letter_redrives) == std::optional<std::string_view>("1"));
  CHECK(env.headers.get(postbox::header_names::dead_letter_reason) == std::optional<std::string_view>("retries_exhausted"));
  CHECK(env.headers.get(postbox::header_names::dead_letter_source) == std::optional<std::string_view>("numbers"));
  CHECK(env.headers.get(postbox::header_names::dead_letter_first_failure) ==
        std::optional<std::string_view>(std::to_string(first.time_since_epoch().count())));
}

TEST_CASE("a message redriven into a consumer is retried afresh and a second dead letter keeps the full history",
          "[dead_letter][consumer]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(r.timers, postbox::dead_letter_options{});
  postbox::channel<env_t> ch(16);
  dlq.set_origin("numbers", ch);
  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &r.clock;
  o.retry.max_attempts = 2;
  o.retry.initial_backoff = 1s;
  o.retry.full_jitter = false;
  std::vector<std::uint32_t> attempts;
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"), [&](const env_t& e) {
    attempts.push_back(e.attempt);
    return postbox::settlement::retry();
  }, dlq, o);
  const auto t0 = r.clock.now();
  REQUIRE(ch.try_send(postbox::make_envelope(std::string("test.int"), 1, postbox::message_kind::event, r.clock)) ==
          postbox::send_status::ok);
  CHECK(c.poll() == 1);
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  REQUIRE(dlq.size() == 1);
  r.clock.advance(1h);
  CHECK(dlq.redrive() == 1);
  CHECK(c.poll() == 1);
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  CHECK(attempts == std::vector<std::uint32_t>{1, 2, 1, 2});  // a fresh budget after the redrive
  REQUIRE(dlq.size() == 1);
  const auto d = dlq.list().front();
  CHECK(d.attempts == 2);
  CHECK(d.prior_attempts == 2);
  CHECK(d.total_attempts() == 4);
  CHECK(d.redrives == 1);
  CHECK(d.first_failure == t0);  // from the first round
  CHECK(d.last_failure == t0 + 1h + 2s);
}

TEST_CASE("an origin that refuses keeps the entry at the head of the line and tries again at the next token",
          "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(r.timers, postbox::dead_letter_options{.redrive_rate = 1, .redrive_burst = 1});
  postbox::channel<env_t> origin(1);
  dlq.set_origin("numbers", origin);
  for (int i = 0; i < 2; ++i) REQUIRE(dlq.add(r.letter(i)) == postbox::errc::ok);
  REQUIRE(dlq.redrive() == 2);
  CHECK(origin.size_approx() == 1);
  r.clock.advance(2s);
  r.timers.run_due();  // a token, but the origin is full: entry 1 stays
  CHECK(dlq.size() == 1);
  CHECK(dlq.stats().redrive_failed == 1);
  CHECK(dlq.stats().redrive_pending == 1);
  CHECK(origin.try_receive()->payload == 0);
  r.clock.advance(2s);
  r.timers.run_due();
  CHECK(dlq.size() == 0);
  CHECK(origin.try_receive()->payload == 1);
}

TEST_CASE("entries whose source has no origin stay and are counted unroutable; poison goes to a raw origin",
          "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, r.clock);
  REQUIRE(dlq.add(r.letter(1, "x", "t", "", "nowhere")) == postbox::errc::ok);
  postbox::dead_letter<int> poison;
  poison.raw = "n=?";
  poison.reason = "parse_error";
  poison.source = "raw";
  REQUIRE(dlq.add(std::move(poison)) == postbox::errc::ok);
  std::vector<std::string> raw_sent;
  dlq.set_raw_origin("raw", [&](std::string bytes) {
    raw_sent.push_back(std::move(bytes));
    return postbox::errc::ok;
  });
  CHECK(dlq.redrive() == 1);
  CHECK(raw_sent == std::vector<std::string>{"n=?"});
  CHECK(dlq.size() == 1);
  CHECK(dlq.stats().unroutable == 1);
}

TEST_CASE("a registered dead-letter queue renders its gauges and counters as Prometheus text", "[dead_letter][metrics]") {
  rig r;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.name = "orders.dlq", .capacity = 8}, r.clock);
  postbox::metrics_registry registry;
  auto reg = postbox::register_dead_letter_queue(registry, dlq);
  REQUIRE(dlq.add(r.letter(1)) == postbox::errc::ok);
  r.clock.advance(90s);
  const std::string text = registry.render_prometheus();
  CHECK_THAT(text, Catch::Contains("postbox_dead_letter_depth{component=\"dead_letter_queue\",name=\"orders.dlq\"} 1"));
  CHECK_THAT(text, Catch::Contains("postbox_dead_letter_capacity{component=\"dead_letter_queue\",name=\"orders.dlq\"} 8"));
  CHECK_THAT(text,
             Catch::Contains("postbox_dead_letter_oldest_age_seconds{component=\"dead_letter_queue\",name=\"orders.dlq\"} 90"));
}

TEST_CASE("a dead-letter queue is constructed from empty braces or designated initializers on every constructor",
          "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> from_braces({});
  postbox::dead_letter_queue<int> designated({.capacity = 10});
  postbox::dead_letter_queue<int> designated_clock({.capacity = 3, .when_full = postbox::dead_letter_full::refuse},
                                                    r.clock);
  postbox::dead_letter_queue<int> timers_braces(r.timers, {});
  postbox::dead_letter_queue<int> timers_designated(r.timers, {.capacity = 7});
  CHECK(from_braces.capacity() == postbox::dead_letter_options{}.capacity);
  CHECK(designated.capacity() == 10);
  CHECK(designated_clock.capacity() == 3);
  CHECK(&designated_clock.get_clock() == &r.clock);
  CHECK(timers_braces.capacity() == postbox::dead_letter_options{}.capacity);
  CHECK(&timers_braces.get_clock() == &r.clock);
  CHECK(timers_designated.capacity() == 7);
  // Neither copyable nor movable (the deleted copy constructor takes a non-const reference).
  static_assert(!std::is_copy_constructible_v<postbox::dead_letter_queue<int>>);
  static_assert(!std::is_move_constructible_v<postbox::dead_letter_queue<int>>);
  static_assert(!std::is_copy_assignable_v<postbox::dead_letter_queue<int>>);
}

TEST_CASE("remove with empty braces is the empty filter and removes every entry, not id 0", "[dead_letter]") {
  rig r;
  postbox::dead_letter_queue<int> dlq({}, r.clock);
  for (int i = 0; i < 3; ++i) REQUIRE(dlq.add(r.letter(i)) == postbox::errc::ok);
  CHECK(dlq.remove({}) == 3);
  CHECK(dlq.size() == 0);
  REQUIRE(dlq.add(r.letter(9)) == postbox::errc::ok);
  const auto id = dlq.list().front().id;
  CHECK(dlq.remove(id));
  CHECK_FALSE(dlq.remove(static_cast<int>(id)));
}
