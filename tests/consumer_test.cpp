// SPDX-License-Identifier: MIT
// Specification tests for postbox::consumer: settlement, retries, deadlines, order, sources, metrics, observer, shutdown.
#include <postbox/consumer.hpp>
#include <postbox/testing.hpp>
#if __has_include(<nlohmann/json.hpp>)
#  include <postbox/json.hpp>
#endif

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <latch>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

using env_t = postbox::envelope<int>;

// A channel source that cannot tell how much it holds (no backlog()), and
// has `receive` only, as users' own sources do: the consumer builds a node
// for each message it receives, so poll() runs them from its ready queue,
// never straight from the channel.
struct opaque_source {
  using payload_type = int;
  static constexpr bool redelivers = false;
  postbox::channel<env_t>* ch;
  [[nodiscard]] postbox::receive_result<postbox::inbound<int>> receive(postbox::duration wait) {
    auto r = wait.count() <= 0 ? ch->try_receive_result() : ch->receive_for(wait);
    if (!r.has_value())
      return postbox::receive_result<postbox::inbound<int>>(
          r.status() == postbox::receive_status::closed ? postbox::receive_status::closed : postbox::receive_status::empty);
    return postbox::inbound<int>::of(std::move(*r));
  }
  [[nodiscard]] std::string_view name() const noexcept { return "opaque"; }
};

// A consumer in manual-drive mode on a manual clock with a seeded jitter. A
// test that drives time attaches its consumer to `h` (postbox::testing::harness)
// and lets it jump to each due retry; `clock` is the harness clock.
struct rig {
  postbox::testing::harness h;
  postbox::manual_clock& clock = h.get_clock();
  postbox::channel<env_t> ch{256};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};

  [[nodiscard]] postbox::consumer_options options(postbox::retry_policy policy = {}) {
    postbox::consumer_options o;
    o.threads = 0;
    o.retry = policy;
    o.jitter_seed = 42;
    o.clock = &clock;
    return o;
  }
  [[nodiscard]] env_t msg(int n, std::string key = {}) {
    auto e = postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, clock);
    e.partition_key = std::move(key);
    return e;
  }
  void send(int n, std::string key = {}) { REQUIRE(ch.try_send(msg(n, std::move(key))) == postbox::send_status::ok); }
  [[nodiscard]] postbox::channel_source<int> source() { return postbox::channel_source<int>(ch, "numbers"); }

  // A consumer over the channel: `straight` through channel_source (a poll
  // with nothing queued runs what it receives without queueing it), else
  // through opaque_source.
  template <class H>
  std::unique_ptr<postbox::consumer<int>> consumer_over(bool straight, H&& handler, postbox::consumer_options o) {
    if (straight) return std::make_unique<postbox::consumer<int>>(source(), std::forward<H>(handler), dlq, o);
    return std::make_unique<postbox::consumer<int>>(opaque_source{&ch}, std::forward<H>(handler), dlq, o);
  }
};

postbox::retry_policy policy(std::uint32_t attempts, postbox::duration initial, bool jitter = true) {
  postbox::retry_policy p;
  p.max_attempts = attempts;
  p.initial_backoff = initial;
  p.multiplier = 2.0;
  p.max_backoff = 10s;
  p.full_jitter = jitter;
  return p;
}

}  // namespace

TEST_CASE("a handler that acks settles the message once and the consumer counts it", "[consumer]") {
  rig r;
  std::vector<int> seen;
  postbox::consumer c(r.source(), [&](const env_t& e) { seen.push_back(e.payload); return postbox::settlement::ack(); },
                      r.dlq, r.options());
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  CHECK(c.poll() == 0);
  CHECK(seen == std::vector<int>{1, 2});
  const auto s = c.stats();
  CHECK(s.received == 2);
  CHECK(s.acked == 2);
  CHECK(s.in_flight == 0);
  CHECK(r.dlq.size() == 0);
}

TEST_CASE("a handler returning void acks, and the context carries attempt, clock and source", "[consumer]") {
  rig r;
  std::uint32_t attempt = 0;
  std::string source;
  postbox::consumer c(r.source(), [&](const env_t&, postbox::consume_context& ctx) {
    attempt = ctx.attempt();
    source = std::string(ctx.source());
    CHECK(&ctx.get_clock() == &r.clock);
    CHECK_FALSE(ctx.stop_requested());
  }, r.dlq, r.options());
  r.send(1);
  CHECK(c.poll() == 1);
  CHECK(attempt == 1);
  CHECK(source == "numbers");
  CHECK(c.stats().acked == 1);
}

TEST_CASE("retries follow the policy's exact backoff schedule with a seeded jitter", "[consumer]") {
  rig r;
  const auto p = policy(4, 100ms);
  std::vector<postbox::time_point> starts;
  std::vector<std::uint32_t> attempts;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    starts.push_back(r.clock.now());
    attempts.push_back(e.attempt);
    throw std::runtime_error("database unavailable");
  }, r.dlq, r.options(p));

  postbox::jitter_source expected_jitter(42);
  std::vector<postbox::duration> expected;
  for (std::uint32_t n = 1; n < 4; ++n) expected.push_back(p.backoff(n, expected_jitter.next()));

  r.h.attach(c);
  const auto t0 = r.clock.now();
  r.send(7);
  while (r.h.advance_to_next()) {
  }
  REQUIRE(starts.size() == 4);
  CHECK(attempts == std::vector<std::uint32_t>{1, 2, 3, 4});
  auto t = t0;
  CHECK(starts[0] == t);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    t += expected[i];
    CHECK(starts[i + 1] == t);
    CHECK(expected[i] < p.ceiling(static_cast<std::uint32_t>(i + 1)));  // full jitter stays below the bound
  }
  CHECK(c.stats().retried == 3);
}

TEST_CASE("after the last attempt the message is dead-lettered with attempts and failure times", "[consumer]") {
  rig r;
  postbox::consumer c(r.source(), [&](const env_t&) -> postbox::settlement { throw std::runtime_error("boom"); },
                      r.dlq, r.options(policy(3, 1s, false)));
  r.h.attach(c);
  const auto t0 = r.clock.now();
  r.send(5);
  while (r.h.advance_to_next()) {  // each attempt at its due time, until the dead letter
  }
  REQUIRE(r.dlq.size() == 1);
  const auto d = r.dlq.list().front();
  CHECK(d.reason == "retries_exhausted");
  CHECK(d.error == "boom");
  CHECK(d.attempts == 3);
  CHECK(d.first_failure == t0);
  CHECK(d.last_failure == t0 + 3s);
  CHECK(d.source == "numbers");
  REQUIRE(d.message.has_value());
  CHECK(d.message->payload == 5);
  CHECK(d.message->attempt == 3);
  REQUIRE(d.history.size() == 3);
  CHECK(d.history[1].attempt == 2);
  CHECK(d.history[1].at == t0 + 1s);
  CHECK(c.stats().dead_lettered == 1);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("retry(after) redelivers after exactly that delay, bounded by max attempts", "[consumer]") {
  rig r;
  std::vector<postbox::time_point> starts;
  postbox::consumer c(r.source(), [&](const env_t&) {
    starts.push_back(r.clock.now());
    return postbox::settlement::retry(250ms);
  }, r.dlq, r.options(policy(2, 10s)));
  r.h.attach(c);
  const auto t0 = r.clock.now();
  r.send(1);
  CHECK(r.h.run_until_idle() == 1);
  CHECK(c.next_due() == t0 + 250ms);
  CHECK(r.h.advance_to_next() == t0 + 250ms);
  CHECK_FALSE(r.h.advance_to_next());  // dead-lettered: nothing more is scheduled
  CHECK(starts == std::vector<postbox::time_point>{t0, t0 + 250ms});
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().reason == "retries_exhausted");
  CHECK(r.dlq.list().front().error == "retry requested");
}

TEST_CASE("reject dead-letters at once with the handler's reason", "[consumer]") {
  rig r;
  postbox::consumer c(r.source(), [&](const env_t&) { return postbox::settlement::reject("invalid address"); },
                      r.dlq, r.options());
  r.send(1);
  CHECK(c.poll() == 1);
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().reason == "invalid address");
  CHECK(r.dlq.list().front().attempts == 1);
  CHECK(c.stats().retried == 0);
}

TEST_CASE("an exception the classifier calls permanent dead-letters at once with its text", "[consumer]") {
  rig r;
  auto o = r.options(policy(5, 1s));
  o.classify = postbox::permanent_on<std::invalid_argument>();
  int calls = 0;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    ++calls;
    if (e.payload == 1) throw std::invalid_argument("quantity must be positive");
    throw std::runtime_error("try again");
  }, r.dlq, o);
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  CHECK(calls == 2);
  REQUIRE(r.dlq.size() == 1);
  const auto d = r.dlq.list().front();
  CHECK(d.reason == "permanent_error");
  CHECK(d.error == "quantity must be positive");
  CHECK(d.message->payload == 1);
  CHECK(c.stats().waiting_retry == 1);  // the transient one waits for its retry
  CHECK(c.stats().handler_errors == 2);
}

TEST_CASE("a handler's exception never stops the consumer", "[consumer]") {
  rig r;
  std::vector<int> handled;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    if (e.payload % 2 == 0) throw 42;  // not even a std::exception
    handled.push_back(e.payload);
  }, r.dlq, r.options(postbox::retry_policy::no_retry()));
  for (int i = 1; i <= 5; ++i) r.send(i);
  CHECK(c.poll() == 5);
  CHECK(handled == std::vector<int>{1, 3, 5});
  REQUIRE(r.dlq.size() == 2);
  CHECK(r.dlq.list().front().error == "unknown exception");
  r.send(7);
  CHECK(c.poll() == 1);
  CHECK(handled.back() == 7);
}

TEST_CASE("a message past its deadline is not started and is dead-lettered as expired", "[consumer]") {
  rig r;
  int calls = 0;
  postbox::consumer c(r.source(), [&](const env_t&) { ++calls; }, r.dlq, r.options());
  auto e = r.msg(1);
  e.deadline = r.clock.now() + 1s;
  REQUIRE(r.ch.try_send(std::move(e)) == postbox::send_status::ok);
  r.clock.advance(1s);  // deadline <= now: expired
  CHECK(c.poll() == 1);
  CHECK(calls == 0);
  REQUIRE(r.dlq.size() == 1);
  const auto d = r.dlq.list().front();
  CHECK(d.reason == "expired");
  CHECK(d.reason == postbox::to_string(postbox::errc::expired));
  CHECK(d.attempts == 0);
  CHECK(c.stats().expired == 1);
  CHECK(c.stats().started == 0);
}

TEST_CASE("a message whose deadline passes while it waits for a retry is dead-lettered as expired at the deadline",
          "[consumer]") {
  rig r;
  int calls = 0;
  postbox::consumer c(r.source(), [&](const env_t&) {
    ++calls;
    return postbox::settlement::retry(10s);
  }, r.dlq, r.options(policy(5, 1s)));
  r.h.attach(c);
  auto e = r.msg(1);
  e.deadline = r.clock.now() + 3s;
  REQUIRE(r.ch.try_send(std::move(e)) == postbox::send_status::ok);
  CHECK(r.h.run_until_idle() == 1);
  CHECK(c.next_due() == postbox::manual_clock::default_start + 3s);  // the retry would be at 10s; the deadline comes first
  CHECK(r.h.advance_to_next() == postbox::manual_clock::default_start + 3s);
  CHECK_FALSE(r.h.advance_to_next());  // the retry at 10 s never comes
  CHECK(calls == 1);
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().reason == "expired");
  CHECK(r.dlq.list().front().attempts == 1);
  CHECK(r.dlq.list().front().dead_lettered_at == postbox::manual_clock::default_start + 3s);
}

TEST_CASE("defer puts a message aside for defer_delay without consuming an attempt", "[consumer]") {
  rig r;
  auto o = r.options(policy(1, 1s));  // one attempt: a retry would dead-letter at once
  o.defer_delay = 5s;
  std::vector<std::uint32_t> attempts;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    attempts.push_back(e.attempt);
    return attempts.size() < 3 ? postbox::settlement::defer() : postbox::settlement::ack();
  }, r.dlq, o);
  r.h.attach(c);
  const auto t0 = r.clock.now();
  r.send(1);
  std::vector<postbox::time_point> stops;
  while (auto t = r.h.advance_to_next()) stops.push_back(*t);
  CHECK(stops == std::vector<postbox::time_point>{t0 + 5s, t0 + 10s});
  CHECK(attempts == std::vector<std::uint32_t>{1, 1, 1});
  CHECK(c.stats().deferred == 2);
  CHECK(c.stats().acked == 1);
  CHECK(r.dlq.size() == 0);
}

TEST_CASE("messages of one key run in order while a key waiting for a retry parks only itself", "[consumer]") {
  rig r;
  std::vector<std::string> log;
  bool fail_a1 = true;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    log.push_back(e.partition_key + std::to_string(e.payload));
    if (e.partition_key == "a" && e.payload == 1 && fail_a1) {
      fail_a1 = false;
      return postbox::settlement::retry(1s);
    }
    return postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s)));
  r.send(1, "a");
  r.send(1, "b");
  r.send(2, "a");
  r.send(2, "b");
  r.send(3, "a");
  r.send(9);  // unkeyed
  CHECK(c.poll() == 4);  // a1 (fails), b1, b2, 9; a2 and a3 wait behind a1
  CHECK(log == std::vector<std::string>{"a1", "b1", "9", "b2"});
  const auto s = c.stats();
  CHECK(s.waiting_retry == 1);
  CHECK(s.queued == 2);
  r.clock.advance(1s);
  CHECK(c.poll() == 3);
  CHECK(log == std::vector<std::string>{"a1", "b1", "9", "b2", "a1", "a2", "a3"});
}

TEST_CASE("the consumer takes at most max_in_flight unsettled messages from its source", "[consumer]") {
  rig r;
  auto o = r.options(policy(3, 1s, false));
  o.max_in_flight = 2;
  int calls = 0;
  postbox::consumer c(r.source(), [&](const env_t&) {
    ++calls;
    return calls <= 2 ? postbox::settlement::retry() : postbox::settlement::ack();
  }, r.dlq, o);
  for (int i = 0; i < 5; ++i) r.send(i);
  CHECK(c.poll() == 2);
  CHECK(c.stats().in_flight == 2);
  CHECK(r.ch.size_approx() == 3);  // budget exhausted: nothing more received
  CHECK(c.poll() == 0);
  r.clock.advance(1s);
  CHECK(c.poll() == 5);  // both retries ack, then the remaining three
  CHECK(c.stats().acked == 5);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("worker threads never run more handlers at once than max_in_flight", "[consumer]") {
  rig r;
  postbox::consumer_options o = r.options();
  o.threads = 4;
  o.max_in_flight = 2;
  std::atomic<int> running{0}, peak{0}, done{0};
  std::atomic<bool> release{false};
  postbox::consumer c(r.source(), [&](const env_t&) {
    const int now = running.fetch_add(1) + 1;
    int p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
    while (!release.load()) std::this_thread::yield();
    running.fetch_sub(1);
    done.fetch_add(1);
  }, r.dlq, o);
  for (int i = 0; i < 6; ++i) r.send(i);
  REQUIRE(postbox_test::eventually([&] { return running.load() == 2; }));
  CHECK(c.stats().in_flight == 2);
  release.store(true);
  REQUIRE(postbox_test::eventually([&] { return done.load() == 6; }));
  CHECK(peak.load() == 2);
  REQUIRE(postbox_test::eventually([&] { return c.stats().acked == 6; }));
}

TEST_CASE("poll on a consumer with worker threads is a usage error", "[consumer]") {
  rig r;
  auto o = r.options();
  o.threads = 1;
  postbox::consumer c(r.source(), [](const env_t&) {}, r.dlq, o);
  CHECK_THROWS_AS(c.poll(), postbox::error);
}

TEST_CASE("a dead letter the full queue refuses is kept by the consumer and released, never lost", "[consumer]") {
  rig r;
  postbox::dead_letter_queue<int> tiny(postbox::dead_letter_options{.capacity = 1}, r.clock);
  postbox::observer obs;
  std::vector<postbox::settle_outcome> outcomes;
  obs.on_settle = [&](const postbox::message_event& e) { outcomes.push_back(e.outcome); };
  auto o = r.options();
  o.observer = &obs;
  postbox::consumer c(r.source(), [](const env_t&) { return postbox::settlement::reject("no"); }, tiny, o);
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  CHECK(tiny.size() == 1);
  CHECK(c.stats().dead_lettered == 1);
  CHECK(c.stats().dead_letter_refused == 1);
  CHECK(outcomes == std::vector<postbox::settle_outcome>{postbox::settle_outcome::dead_lettered,
                                                          postbox::settle_outcome::dead_letter_refused});
  auto kept = c.take_refused_dead_letters();
  REQUIRE(kept.size() == 1);
  CHECK(kept.front().message->payload == 2);
  CHECK(kept.front().reason == "no");
}

TEST_CASE("consumer stats and Prometheus text show counters, gauges and the handler duration histogram",
          "[consumer][metrics]") {
  rig r;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    r.clock.advance(3ms);  // handler time, on the consumer's clock
    return e.payload == 1 ? postbox::settlement::retry(1s) : postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s)));
  postbox::metrics_registry registry;
  auto reg = postbox::register_consumer(registry, c);
  r.send(1);
  r.send(2);
  r.send(3);
  CHECK(c.poll() == 3);
  r.clock.advance(10s);
  const auto s = c.stats();
  CHECK(s.received == 3);
  CHECK(s.acked == 2);
  CHECK(s.retried == 1);
  CHECK(s.waiting_retry == 1);
  CHECK(s.in_flight == 1);
  CHECK(s.oldest_waiting_age == 10s + 9ms);
  CHECK(s.handle_duration.count == 3);
  CHECK(s.handle_duration.sum == Approx(0.009));
  REQUIRE(s.lag.has_value());
  CHECK(*s.lag == 0);
  const std::string text = registry.render_prometheus();
  CHECK_THAT(text, Catch::Contains("# TYPE postbox_consumer_acked_total counter"));
  CHECK_THAT(text, Catch::Contains("postbox_consumer_acked_total{component=\"consumer\",name=\"consumer\"} 2"));
  CHECK_THAT(text, Catch::Contains("postbox_consumer_waiting_retry{component=\"consumer\",name=\"consumer\"} 1"));
  CHECK_THAT(text, Catch::Contains(
                       "postbox_consumer_handle_duration_seconds_bucket{component=\"consumer\",name=\"consumer\",le=\"0.005\"} 3"));
  CHECK_THAT(text, Catch::Contains("postbox_consumer_handle_duration_seconds_count{component=\"consumer\",name=\"consumer\"} 3"));
}

TEST_CASE("topic stats count publishes, deliveries, drops and per-subscription depth and lag", "[consumer][metrics]") {
  postbox::topic<int> t;
  auto keep = t.subscribe(postbox::subscription_options{4, postbox::overflow::block, {}, {}});
  auto lossy = t.subscribe(postbox::subscription_options{2, postbox::overflow::drop_oldest, {}, {}});
  for (int i = 0; i < 4; ++i) (void)t.publish(i);
  (void)keep.try_receive();
  const auto s = t.stats();
  CHECK(s.subscriptions == 2);
  CHECK(s.published == 4);
  CHECK(s.delivered == 8);
  CHECK(s.dropped == 2);
  REQUIRE(s.per_subscription.size() == 2);
  CHECK(s.per_subscription[0].depth == 3);
  CHECK(s.per_subscription[0].received == 1);
  CHECK(s.per_subscription[1].depth == 2);
  CHECK(s.per_subscription[1].lag == 2);
  CHECK(lossy.take_lag() == 2);  // the existing lag report is unchanged
  CHECK(t.stats().per_subscription[1].lag == 2);
  postbox::metrics_registry registry;
  auto reg = postbox::register_topic(registry, "prices", t);
  const std::string text = registry.render_prometheus();
  CHECK_THAT(text, Catch::Contains("postbox_topic_published_total{component=\"topic\",name=\"prices\"} 4"));
  CHECK_THAT(text, Catch::Contains("postbox_subscription_lag_total{component=\"topic\",name=\"prices\",subscription=\""));
}

TEST_CASE("stream group stats report members, committed offsets and lag per partition", "[consumer][metrics]") {
  postbox::stream<int> s(2);
  for (int i = 0; i < 6; ++i) (void)s.append("k" + std::to_string(i), i);
  auto g = s.group("billing");
  auto m = g.join();
  auto polled = m.poll(100);
  REQUIRE(polled.records.size() == 6);
  const auto before = g.stats();
  CHECK(before.members == 1);
  CHECK(before.lag == 6);
  REQUIRE(m.commit() == postbox::errc::ok);
  const auto after = g.stats();
  CHECK(after.lag == 0);
  REQUIRE(after.partitions.size() == 2);
  CHECK(after.partitions[0].committed + after.partitions[1].committed == 6);
  CHECK(after.partitions[0].end == after.partitions[0].committed);
  postbox::metrics_registry registry;
  auto reg = postbox::register_stream_group(registry, "billing", g);
  const std::string text = registry.render_prometheus();
  CHECK_THAT(text, Catch::Contains("postbox_stream_group_members{component=\"stream_group\",name=\"billing\"} 1"));
  CHECK_THAT(text, Catch::Contains("postbox_stream_group_partition_lag{component=\"stream_group\",name=\"billing\",partition=\"1\"} 0"));
}

TEST_CASE("observer hooks see each delivery's receive and settle with metadata and duration", "[consumer][observer]") {
  rig r;
  postbox::observer obs;
  std::vector<std::string> events;
  obs.on_publish = [&](const postbox::message_event& e) { events.push_back("publish " + std::string(e.type)); };
  obs.on_receive = [&](const postbox::message_event& e) {
    events.push_back("receive " + std::string(e.source) + " attempt=" + std::to_string(e.attempt));
  };
  obs.on_settle = [&](const postbox::message_event& e) {
    events.push_back("settle " + std::string(postbox::to_string(e.outcome)) + " attempt=" + std::to_string(e.attempt) +
                     " ms=" + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(e.elapsed).count()));
  };
  auto o = r.options(policy(2, 1s, false));
  o.observer = &obs;
  postbox::message_event last;  // before the consumer: its destructor may still notify
  postbox::consumer c(r.source(), [&](const env_t& e) {
    r.clock.advance(2ms);
    return e.attempt == 1 ? postbox::settlement::retry() : postbox::settlement::ack();
  }, r.dlq, o);
  auto e = r.msg(1);
  const auto id = e.id;
  REQUIRE(postbox::observed_send(r.ch, std::move(e), &obs, "numbers") == postbox::send_status::ok);
  CHECK(c.poll() == 1);
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  CHECK(events == std::vector<std::string>{"publish test.int", "receive numbers attempt=1",
                                           "settle retried attempt=1 ms=2", "receive numbers attempt=2",
                                           "settle acked attempt=2 ms=2"});
  obs.on_settle = [&](const postbox::message_event& ev) { last = ev; };
  r.send(2);
  CHECK(c.poll() == 1);
  CHECK(last.correlation_id == last.id);
  CHECK_FALSE(last.id == id);
}

TEST_CASE("an observer that throws is counted and breaks neither the consumer nor the publisher", "[consumer][observer]") {
  rig r;
  postbox::observer obs;
  obs.on_publish = [](const postbox::message_event&) { throw std::runtime_error("tracer down"); };
  obs.on_receive = [](const postbox::message_event&) { throw std::runtime_error("tracer down"); };
  obs.on_settle = [](const postbox::message_event&) { throw 1; };
  auto o = r.options();
  o.observer = &obs;
  int handled = 0;
  postbox::consumer c(r.source(), [&](const env_t&) { ++handled; }, r.dlq, o);
  REQUIRE(postbox::observed_send(r.ch, r.msg(1), &obs) == postbox::send_status::ok);
  CHECK(c.poll() == 1);
  CHECK(handled == 1);
  CHECK(obs.failures() == 3);
  CHECK(c.stats().acked == 1);
  CHECK(c.stats().observer_failures == 3);
}

TEST_CASE("graceful shutdown lets running handlers finish until the deadline and reports the rest",
          "[consumer][shutdown]") {
  rig r;
  auto o = r.options();
  o.threads = 2;
  std::atomic<bool> release_slow{false};
  std::atomic<int> started{0};
  postbox::consumer c(r.source(), [&](const env_t& e, postbox::consume_context& ctx) {
    started.fetch_add(1);
    if (e.payload == 1) {  // finishes during the grace period
      while (!release_slow.load()) std::this_thread::yield();
    } else {  // stuck until the consumer gives up on it
      while (!ctx.stop_requested()) std::this_thread::yield();
    }
  }, r.dlq, o);
  r.send(1);
  r.send(2);
  REQUIRE(postbox_test::eventually([&] { return started.load() == 2; }));
  postbox::shutdown_report<int> report;
  std::thread closer([&] { report = c.shutdown(5s); });
  // The timer thread always waits on the clock; the second waiter is shutdown's grace period.
  REQUIRE(postbox_test::eventually([&] { return r.clock.waiters() >= 2; }));
  r.send(3);  // not accepted any more: stays in the channel
  release_slow.store(true);
  REQUIRE(postbox_test::eventually([&] { return c.stats().acked == 1; }));
  r.clock.advance(5s);
  closer.join();
  CHECK(report.completed == 1);
  CHECK(report.abandoned == 1);
  REQUIRE(report.abandoned_ids.size() == 1);
  CHECK(report.returned.empty());
  CHECK_FALSE(c.stats().accepting);
  REQUIRE(postbox_test::eventually([&] { return c.stats().acked == 2; }));  // the abandoned one settles when it returns
  CHECK(r.ch.size_approx() == 1);
}

TEST_CASE("shutdown returns messages waiting for a retry and queued behind their key, in key order",
          "[consumer][shutdown]") {
  rig r;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    return e.payload == 1 ? postbox::settlement::retry(1min) : postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s)));
  r.send(1, "k");
  r.send(2, "k");
  r.send(3, "k");
  r.send(4, "other");
  CHECK(c.poll() == 2);
  auto report = c.shutdown(10s);
  CHECK(report.completed == 0);
  CHECK(report.abandoned == 0);
  REQUIRE(report.returned.size() == 3);
  CHECK(report.returned[0].payload == 1);
  CHECK(report.returned[0].attempt == 1);
  CHECK(report.returned[1].payload == 2);
  CHECK(report.returned[2].payload == 3);
  CHECK(report.returned_waiting_retry == 1);
  CHECK(c.stats().in_flight == 0);
  CHECK(c.stats().released == 3);
  CHECK(c.poll() == 0);
  CHECK(c.shutdown(0s).returned.empty());
}

TEST_CASE("a topic subscription source consumes the envelopes published to the topic", "[consumer][source]") {
  rig r;
  postbox::topic<env_t> prices;
  auto sub = prices.subscribe();
  std::vector<int> seen;
  postbox::consumer c(postbox::subscription_source<int>(sub, "prices"), [&](const env_t& e) {
    seen.push_back(e.payload);
    return e.attempt == 1 && e.payload == 2 ? postbox::settlement::retry(1s) : postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s)));
  for (int i = 1; i <= 3; ++i) (void)prices.publish(r.msg(i));
  CHECK(c.poll() == 3);
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  CHECK(seen == std::vector<int>{1, 2, 3, 2});
  CHECK(c.source_name() == "prices");
}

TEST_CASE("a stream group source commits an offset only when every earlier record of the partition is settled",
          "[consumer][source]") {
  rig r;
  postbox::stream<env_t> orders(1);
  for (int i = 0; i < 4; ++i) (void)orders.append("k", r.msg(i, "k"));
  auto group = orders.group("billing");
  postbox::consumer c(postbox::stream_group_source<int>(orders, "billing", "orders"), [&](const env_t& e) {
    if (e.payload == 1 && e.attempt == 1) return postbox::settlement::retry(1s);
    if (e.payload == 3) return postbox::settlement::reject("bad");
    return postbox::settlement::ack();
  }, r.dlq, [&] {
    auto o = r.options(policy(3, 1s));
    o.max_in_flight = 8;
    return o;
  }());
  // One key: record 1 waits for its retry and 2, 3 queue behind it.
  CHECK(c.poll() == 2);
  CHECK(group.committed(0) == 1);  // record 0 acked; record 1 unsettled
  r.clock.advance(1s);
  CHECK(c.poll() == 3);  // 1 acked, 2 acked, 3 dead-lettered
  CHECK(group.committed(0) == 4);
  CHECK(group.lag() == 0);
  CHECK(r.dlq.size() == 1);
}

TEST_CASE("a stream group source never commits past a record released at shutdown", "[consumer][source]") {
  rig r;
  postbox::stream<env_t> orders(1);
  for (int i = 0; i < 3; ++i) (void)orders.append(std::to_string(i), r.msg(i));  // three keys, one partition
  auto group = orders.group("billing");
  {
    postbox::consumer c(postbox::stream_group_source<int>(orders, "billing", "orders"), [&](const env_t& e) {
      return e.payload == 0 ? postbox::settlement::retry(1min) : postbox::settlement::ack();
    }, r.dlq, r.options(policy(3, 1s)));
    CHECK(c.poll() == 3);
    CHECK(group.committed(0) == 0);  // records 1 and 2 acked, but 0 is not settled
    auto report = c.shutdown(0s);
    CHECK(report.returned.size() == 1);
  }
  CHECK(group.committed(0) == 0);
  // A new member resumes at record 0: nothing was skipped.
  std::vector<int> seen;
  postbox::consumer again(postbox::stream_group_source<int>(orders, "billing", "orders"),
                          [&](const env_t& e) { seen.push_back(e.payload); }, r.dlq, r.options());
  CHECK(again.poll() == 3);
  CHECK(seen == std::vector<int>{0, 1, 2});
  CHECK(group.committed(0) == 3);
}

namespace {
// "n=<int>" decodes; anything else is poison.
postbox::decode_outcome<int> decode_text(std::string_view bytes) {
  if (bytes.substr(0, 2) != "n=") return postbox::decode_failure{postbox::errc::parse_error, "", "expected n=<int>"};
  int n = 0;
  for (char ch : bytes.substr(2)) {
    if (ch < '0' || ch > '9') return postbox::decode_failure{postbox::errc::bad_type, "n", "not a number"};
    n = n * 10 + (ch - '0');
  }
  return postbox::make_envelope(std::string("test.int"), n);
}
}  // namespace

TEST_CASE("a raw source dead-letters undecodable bytes with the decoder's reason and raw bytes and keeps going",
          "[consumer][source]") {
  rig r;
  postbox::channel<std::string> raw(16);
  std::vector<int> seen;
  postbox::consumer c(postbox::make_raw_source<int>(raw, decode_text, "raw-numbers"),
                      [&](const env_t& e) { seen.push_back(e.payload); }, r.dlq, r.options());
  for (const char* s : {"n=1", "hello", "n=2", "n=x3", "n=3"}) REQUIRE(raw.try_send(std::string(s)) == postbox::send_status::ok);
  CHECK(c.poll() == 5);
  CHECK(seen == std::vector<int>{1, 2, 3});
  const auto dead = r.dlq.list();
  REQUIRE(dead.size() == 2);
  CHECK_FALSE(dead[0].message.has_value());
  CHECK(dead[0].raw == "hello");
  CHECK(dead[0].reason == "parse_error");
  CHECK(dead[0].error == "expected n=<int>");
  CHECK(dead[0].source == "raw-numbers");
  CHECK(dead[1].raw == "n=x3");
  CHECK(dead[1].reason == "bad_type");
  CHECK(dead[1].error == "n: not a number");
  CHECK(c.stats().poison == 2);
}

#if __has_include(<nlohmann/json.hpp>)
namespace {
struct order {
  static constexpr std::string_view message_type = "order.placed";
  int n = 0;
};
void to_json(nlohmann::json& j, const order& o) { j = nlohmann::json{{"n", o.n}}; }
void from_json(const nlohmann::json& j, order& o) { j.at("n").get_to(o.n); }
}  // namespace

TEST_CASE("1e5 malformed envelopes interleaved with 1e5 valid ones: each valid one handled once, each malformed "
          "one dead-lettered with its reason and bytes",
          "[consumer][poison]") {
  const auto n = static_cast<int>(postbox_test::scaled(100000));
  postbox::manual_clock clock;
  postbox::channel<std::string> raw(8192);
  postbox::dead_letter_queue<order> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n) + 1}, clock);
  std::vector<std::uint8_t> handled(static_cast<std::size_t>(n), 0);
  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &clock;
  o.max_in_flight = 256;
  postbox::consumer c(
      postbox::make_raw_source<order>(raw, [](std::string_view s) { return postbox::json::decode<order>(s); }, "orders"),
      [&](const postbox::envelope<order>& e) { ++handled.at(static_cast<std::size_t>(e.payload.n)); }, dlq, o);

  static const char* const reasons[] = {"parse_error", "missing_field", "unknown_type", "bad_type"};
  auto malformed = [&](int i) {
    switch (i % 4) {
      case 0: return "garbage #" + std::to_string(i);
      case 1: return "{\"type\":\"order.placed\",\"payload\":{\"n\":" + std::to_string(i) + "}}";  // no id
      case 2: {
        auto t = postbox::json::encode(postbox::make_envelope(order{i}, clock));
        return t.replace(t.find("order.placed"), 12, "order.zapped");
      }
      default: {
        auto t = postbox::json::encode(postbox::make_envelope(order{i}, clock));
        const std::string from = "{\"n\":" + std::to_string(i) + "}";
        return t.replace(t.find(from), from.size(), "{\"n\":\"" + std::to_string(i) + "\"}");
      }
    }
  };
  std::vector<std::string> sent_bad;
  sent_bad.reserve(static_cast<std::size_t>(n));
  int next = 0;
  while (next < n) {
    const int batch_end = std::min(n, next + 2048);
    for (int i = next; i < batch_end; ++i) {
      REQUIRE(raw.try_send(postbox::json::encode(postbox::make_envelope(order{i}, clock))) == postbox::send_status::ok);
      sent_bad.push_back(malformed(i));
      REQUIRE(raw.try_send(std::string(sent_bad.back())) == postbox::send_status::ok);
    }
    (void)c.poll();
    next = batch_end;
  }
  (void)c.poll();
  CHECK(std::count(handled.begin(), handled.end(), std::uint8_t{1}) == n);
  const auto dead = dlq.list();
  REQUIRE(dead.size() == static_cast<std::size_t>(n));
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < dead.size(); ++i) {
    if (dead[i].raw != sent_bad[i] || dead[i].reason != reasons[i % 4] || dead[i].message.has_value() ||
        dead[i].error.empty())
      ++wrong;
  }
  CHECK(wrong == 0);
  const auto s = c.stats();
  CHECK(s.poison == static_cast<std::uint64_t>(n));
  CHECK(s.acked == static_cast<std::uint64_t>(n));
  CHECK(s.accepting);
  // Still alive: one more valid message goes through.
  REQUIRE(raw.try_send(postbox::json::encode(postbox::make_envelope(order{0}, clock))) == postbox::send_status::ok);
  CHECK(c.poll() == 1);
  CHECK(handled[0] == 2);
}
#endif

namespace {
// A broker-like source: it redelivers itself. Settle actions are recorded.
struct fake_broker {
  using payload_type = int;
  static constexpr bool redelivers = true;
  std::deque<env_t>* queue;
  std::vector<std::pair<postbox::settle_action::kind, postbox::duration>>* actions;
  postbox::receive_result<postbox::inbound<int>> receive(postbox::duration) {
    if (queue->empty()) return postbox::receive_result<postbox::inbound<int>>(postbox::receive_status::empty);
    auto e = std::move(queue->front());
    queue->pop_front();
    auto* log = actions;
    return postbox::inbound<int>::of(std::move(e), [log](const postbox::settle_action& a) {
      log->emplace_back(a.what, a.delay);
    });
  }
  [[nodiscard]] std::string_view name() const noexcept { return "broker"; }
};
static_assert(postbox::consumer_source<fake_broker>);
static_assert(postbox::consumer_source<postbox::channel_source<int>>);
static_assert(postbox::consumer_source<postbox::subscription_source<int>>);
static_assert(postbox::consumer_source<postbox::stream_group_source<int>>);
}  // namespace

TEST_CASE("with a source that redelivers itself, a retry becomes a redeliver action with the backoff and the consumer "
          "forgets the message",
          "[consumer][source]") {
  rig r;
  std::deque<env_t> queue;
  std::vector<std::pair<postbox::settle_action::kind, postbox::duration>> actions;
  postbox::consumer c(fake_broker{&queue, &actions}, [&](const env_t& e) {
    if (e.payload == 1) throw std::runtime_error("later");
    if (e.payload == 2) return postbox::settlement::reject("no");
    return postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s, false)));
  for (int i = 1; i <= 3; ++i) queue.push_back(r.msg(i));
  auto again = r.msg(1);
  again.attempt = 2;  // the broker's third delivery: two started before
  queue.push_back(std::move(again));
  CHECK(c.poll() == 4);
  using k = postbox::settle_action::kind;
  REQUIRE(actions.size() == 4);
  CHECK(actions[0] == std::pair{k::redeliver, postbox::duration(1s)});
  CHECK(actions[1].first == k::dead_letter);
  CHECK(actions[2].first == k::ack);
  CHECK(actions[3].first == k::dead_letter);  // attempt 3 of 3 failed
  CHECK(c.stats().in_flight == 0);
  CHECK(c.stats().waiting_retry == 0);
  CHECK(r.dlq.count({.reason = "retries_exhausted"}) == 1);
}

TEST_CASE("observed_publish and observed_append report on_publish with the envelope's metadata", "[consumer][observer]") {
  rig r;
  postbox::observer obs;
  std::vector<std::string> seen;
  obs.on_publish = [&](const postbox::message_event& e) {
    seen.push_back(std::string(e.source) + ":" + std::string(e.type) + ":" + std::string(e.partition_key));
  };
  postbox::topic<env_t> t;
  auto sub = t.subscribe();
  postbox::stream<env_t> s(2);
  const auto pr = postbox::observed_publish(t, r.msg(1, "a"), &obs, "prices");
  CHECK(pr.delivered == 1);
  const auto pos = postbox::observed_append(s, r.msg(2, "b"), &obs, "orders");
  CHECK(pos.partition == postbox::stream_partition_of("b", 2));
  (void)postbox::observed_append(s, r.msg(3, "c"), nullptr);  // no observer: plain append
  CHECK(seen == std::vector<std::string>{"prices:test.int:a", "orders:test.int:b"});
  CHECK(s.end_offset(postbox::stream_partition_of("c", 2)) >= 1);
}

namespace {
// An in-process source with hooks (like the stream source): records actions.
struct hooked_source {
  using payload_type = int;
  static constexpr bool redelivers = false;
  std::deque<env_t>* queue;
  std::vector<postbox::settle_action::kind>* actions;
  postbox::receive_result<postbox::inbound<int>> receive(postbox::duration) {
    if (queue->empty()) return postbox::receive_result<postbox::inbound<int>>(postbox::receive_status::empty);
    auto e = std::move(queue->front());
    queue->pop_front();
    auto* log = actions;
    return postbox::inbound<int>::of(std::move(e), [log](const postbox::settle_action& a) { log->push_back(a.what); });
  }
  [[nodiscard]] std::string_view name() const noexcept { return "hooked"; }
};
}  // namespace

TEST_CASE("destroying a consumer releases the messages it holds to their source", "[consumer][shutdown]") {
  rig r;
  std::deque<env_t> queue;
  std::vector<postbox::settle_action::kind> actions;
  {
    postbox::consumer c(hooked_source{&queue, &actions}, [](const env_t& e) {
      return e.payload == 1 ? postbox::settlement::retry(1min) : postbox::settlement::ack();
    }, r.dlq, r.options(policy(3, 1s)));
    queue.push_back(r.msg(1));
    queue.push_back(r.msg(2));
    CHECK(c.poll() == 2);
    CHECK(actions == std::vector<postbox::settle_action::kind>{postbox::settle_action::kind::ack});
  }
  CHECK(actions == std::vector<postbox::settle_action::kind>{postbox::settle_action::kind::ack,
                                                              postbox::settle_action::kind::release});
}

TEST_CASE("after a stream group rebalance, settles from the earlier assignment commit nothing and no record is skipped",
          "[consumer][source]") {
  rig r;
  postbox::stream<env_t> orders(2);
  std::vector<std::string> keys[2];
  for (int i = 0; keys[0].size() < 2 || keys[1].size() < 2; ++i) {
    std::string k = "key-" + std::to_string(i);
    auto& bucket = keys[postbox::stream_partition_of(k, 2)];
    if (bucket.size() < 2) bucket.push_back(std::move(k));
  }
  int n = 0;
  for (int p = 0; p < 2; ++p)
    for (const auto& k : keys[p]) (void)orders.append(k, r.msg(n++, k));
  auto group = orders.group("billing");
  bool park = true;
  std::vector<int> seen_a, seen_b;
  postbox::consumer a(postbox::stream_group_source<int>(orders, "billing", "orders"), [&](const env_t& e) {
    seen_a.push_back(e.payload);
    return park ? postbox::settlement::retry(1min) : postbox::settlement::ack();
  }, r.dlq, r.options(policy(5, 1s)));
  CHECK(a.poll() == 4);  // a alone owns both partitions; all four wait for a retry
  postbox::consumer b(postbox::stream_group_source<int>(orders, "billing", "orders"), [&](const env_t& e) {
    seen_b.push_back(e.payload);
  }, r.dlq, r.options());
  CHECK(b.poll() == 2);  // b now owns partition 1 and reads it from the committed offset
  park = false;
  r.clock.advance(1min);
  CHECK(a.poll() == 6);  // a's four retries (old assignment) plus partition 0 again
  CHECK(group.committed(0) == 2);
  CHECK(group.committed(1) == 2);
  CHECK(group.lag() == 0);
  CHECK(seen_b == std::vector<int>{2, 3});
  CHECK(seen_a.size() == 10);  // 4 parked, 4 retried, 2 redelivered after the rebalance
}

TEST_CASE("drain with worker threads returns once the source is closed and every message is acked or dead-lettered, "
          "retries and handler exceptions included",
          "[consumer][drain]") {
  rig r;
  auto o = r.options(policy(3, 1s));
  o.threads = 2;
  o.classify = postbox::permanent_on<std::logic_error>();
  postbox::consumer c(r.source(), [&](const env_t& e) {
    switch (e.payload % 3) {
      case 0: throw std::logic_error("bad order");          // dead-lettered at once
      case 1: if (e.attempt == 1) return postbox::settlement::retry(1s); break;
      default: break;
    }
    return postbox::settlement::ack();
  }, r.dlq, o);
  postbox::drain_report<int> report;
  std::thread drainer([&] { report = c.drain(1h); });
  // The timer thread always waits on the clock; the second waiter is the drain.
  REQUIRE(postbox_test::eventually([&] { return r.clock.waiters() >= 2; }));
  for (int i = 0; i < 9; ++i) r.send(i);
  r.ch.close();
  REQUIRE(postbox_test::eventually([&] {
    const auto s = c.stats();
    return s.waiting_retry == 3 && s.acked == 3 && s.dead_lettered == 3;
  }));
  r.clock.advance(1s);  // the three retries fall due
  drainer.join();
  CHECK(report.finished);
  CHECK(report.source_closed);
  REQUIRE(report.source_left.has_value());
  CHECK(*report.source_left == 0);
  CHECK(report.returned.empty());
  CHECK(report.abandoned == 0);
  CHECK(report.completed == 12);  // nine first deliveries and three retries
  CHECK(report.clean());
  const auto s = c.stats();
  CHECK(s.acked == 6);
  CHECK(s.dead_lettered == 3);
  CHECK(s.handler_errors == 3);
  CHECK(s.in_flight == 0);
  CHECK_FALSE(s.accepting);
  CHECK(r.dlq.count({.reason = "permanent_error"}) == 3);
}

TEST_CASE("drain with threads == 0 runs every message on the calling thread until the closed source is empty",
          "[consumer][drain]") {
  rig r;
  std::vector<int> seen;
  const auto caller = std::this_thread::get_id();
  postbox::consumer c(r.source(), [&](const env_t& e) {
    CHECK(std::this_thread::get_id() == caller);
    seen.push_back(e.payload);
  }, r.dlq, r.options());
  for (int i = 0; i < 100; ++i) r.send(i);  // more than one receive batch (max_in_flight 64)
  r.ch.close();
  const auto report = c.drain(1min);  // the manual clock stands still: only the closed, empty source ends it
  CHECK(report.finished);
  CHECK(report.clean());
  CHECK(report.completed == 100);
  REQUIRE(seen.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
  CHECK(c.poll() == 0);  // stopped
}

TEST_CASE("drain with threads == 0 waits on the consumer's clock for retries and survives handler exceptions",
          "[consumer][drain]") {
  rig r;
  std::atomic<int> calls{0};
  postbox::consumer c(r.source(), [&](const env_t& e) {
    calls.fetch_add(1);
    if (e.payload % 2 == 1) throw std::runtime_error("flaky");  // transient: retried, then dead-lettered
  }, r.dlq, r.options(policy(2, 1s)));
  for (int i = 0; i < 6; ++i) r.send(i);
  r.ch.close();
  postbox::drain_report<int> report;
  std::thread drainer([&] { report = c.drain(1min); });
  // The drain thread is the only one that waits on the clock (threads == 0): it
  // waits for the retries, due within the policy's 1 s first backoff.
  REQUIRE(postbox_test::eventually([&] { return r.clock.waiters() >= 1 && c.stats().waiting_retry == 3; }));
  r.clock.advance(1s);
  drainer.join();
  CHECK(report.finished);
  CHECK(report.clean());
  CHECK(calls.load() == 9);
  const auto s = c.stats();
  CHECK(s.acked == 3);
  CHECK(s.dead_lettered == 3);
  CHECK(s.handler_errors == 6);
  CHECK(r.dlq.count({.reason = "retries_exhausted"}) == 3);
}

TEST_CASE("a message still waiting for a retry when drain's grace ends is reported left and returned",
          "[consumer][drain]") {
  rig r;
  auto o = r.options(policy(5, 1s));
  o.threads = 1;
  postbox::consumer c(r.source(), [&](const env_t& e) {
    return e.payload == 1 ? postbox::settlement::retry(1h) : postbox::settlement::ack();
  }, r.dlq, o);
  r.send(1);
  r.send(2);
  r.send(3);
  r.ch.close();
  postbox::drain_report<int> report;
  std::thread drainer([&] { report = c.drain(10s); });
  // The timer thread always waits on the clock; the second waiter is the drain.
  REQUIRE(postbox_test::eventually([&] {
    const auto s = c.stats();
    return r.clock.waiters() >= 2 && s.acked == 2 && s.waiting_retry == 1 && s.source_closed;
  }));
  r.clock.advance(10s);
  drainer.join();
  CHECK_FALSE(report.finished);
  CHECK(report.source_closed);
  REQUIRE(report.returned.size() == 1);
  CHECK(report.returned[0].payload == 1);
  CHECK(report.returned[0].attempt == 1);
  CHECK(report.returned_waiting_retry == 1);
  REQUIRE(report.source_left.has_value());
  CHECK(*report.source_left == 0);
  CHECK_FALSE(report.clean());
  CHECK(c.stats().released == 1);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("drain on a source that is never closed returns at its grace and reports what the source still holds",
          "[consumer][drain]") {
  rig r;
  auto o = r.options();
  o.max_in_flight = 2;
  postbox::consumer c(r.source(), [&](const env_t&) { return postbox::settlement::retry(1h); }, r.dlq, o);
  for (int i = 0; i < 5; ++i) r.send(i);
  postbox::drain_report<int> report;
  std::thread drainer([&] { report = c.drain(10s); });
  // With the budget full of messages waiting for a retry, the drain waits on the clock.
  REQUIRE(postbox_test::eventually([&] { return r.clock.waiters() >= 1 && c.stats().waiting_retry == 2; }));
  r.clock.advance(10s);
  drainer.join();
  CHECK_FALSE(report.finished);
  CHECK_FALSE(report.source_closed);
  CHECK(report.returned.size() == 2);
  CHECK(report.returned_waiting_retry == 2);
  REQUIRE(report.source_left.has_value());
  CHECK(*report.source_left == 3);
  CHECK(report.source_left_text() == "3");
  CHECK(r.ch.size_approx() == 3);
  CHECK_FALSE(report.clean());
}

TEST_CASE("drain on a source that cannot tell its backlog reports what it still holds as unknown", "[consumer][drain]") {
  rig r;
  postbox::consumer c(opaque_source{&r.ch}, [&](const env_t&) {}, r.dlq, r.options());
  r.send(1);
  r.ch.close();
  const auto report = c.drain(1min);
  CHECK(report.finished);
  CHECK_FALSE(report.source_left.has_value());
  CHECK(report.source_left_text() == "unknown");
  CHECK(c.stats().acked == 1);
}

TEST_CASE("drain after shutdown returns an unfinished report with nothing in it", "[consumer][drain]") {
  rig r;
  postbox::consumer c(r.source(), [&](const env_t&) {}, r.dlq, r.options());
  r.send(1);
  (void)c.shutdown(0s);
  const auto report = c.drain(1s);
  CHECK_FALSE(report.finished);
  CHECK(report.completed == 0);
  CHECK(report.returned.empty());
  REQUIRE(report.source_left.has_value());
  CHECK(*report.source_left == 1);  // never taken
}

// ---------------------------------------------------------------------------
// Batch consumers
// ---------------------------------------------------------------------------

namespace {
std::vector<int> payloads(const postbox::message_batch<int>& b) {
  std::vector<int> out;
  for (const auto& e : b) out.push_back(e.payload);
  return out;
}
}  // namespace

TEST_CASE("a batch consumer hands over a batch as soon as max_size messages are ready", "[consumer][batch]") {
  rig r;
  std::vector<std::vector<int>> batches;
  postbox::consumer c(r.source(), postbox::batch_options{.max_size = 3, .window = 1h},
                      [&](const postbox::message_batch<int>& b) { batches.push_back(payloads(b)); }, r.dlq,
                      r.options());
  for (int i = 1; i <= 7; ++i) r.send(i);
  CHECK(c.poll() == 6);
  CHECK(batches == std::vector<std::vector<int>>{{1, 2, 3}, {4, 5, 6}});
  CHECK(c.stats().acked == 6);
  CHECK(c.stats().batches == 2);
  CHECK(c.stats().in_flight == 1);  // 7 waits for a full batch or its window
}

TEST_CASE("a partial batch is handed over exactly when its window ends on the consumer's clock", "[consumer][batch]") {
  rig r;
  std::vector<std::vector<int>> batches;
  postbox::consumer c(r.source(), postbox::batch_options{.max_size = 10, .window = 50ms},
                      [&](const postbox::message_batch<int>& b) { batches.push_back(payloads(b)); }, r.dlq,
                      r.options());
  r.h.attach(c);
  const auto t0 = r.clock.now();
  r.send(1);
  CHECK(r.h.run_until_idle() == 0);  // the window starts when 1 becomes ready
  CHECK(r.h.next_due() == t0 + 50ms);
  CHECK(r.h.advance(20ms) == 0);
  r.send(2);
  CHECK(r.h.run_until_idle() == 0);  // the window is the first message's
  CHECK(r.h.advance_to_next() == t0 + 50ms);
  CHECK(batches == std::vector<std::vector<int>>{{1, 2}});
}

TEST_CASE("one settlement for the batch settles every message of it", "[consumer][batch]") {
  rig r;
  int calls = 0;
  postbox::consumer c(
      r.source(), postbox::batch_options{.max_size = 2, .window = 1h},
      [&](const postbox::message_batch<int>& b) {
        ++calls;
        for (const auto& e : b) CHECK(e.attempt == static_cast<std::uint32_t>(calls));
        return calls == 1 ? postbox::settlement::retry(1s) : postbox::settlement::ack();
      },
      r.dlq, r.options(policy(5, 1s)));
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  CHECK(c.stats().retried == 2);
  CHECK(c.stats().waiting_retry == 2);
  r.clock.advance(1s);
  CHECK(c.poll() == 2);
  CHECK(calls == 2);
  CHECK(c.stats().acked == 2);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("per-message settlements settle each message of the batch on its own", "[consumer][batch]") {
  rig r;
  postbox::consumer c(
      r.source(), postbox::batch_options{.max_size = 3, .window = 1h},
      [&](const postbox::message_batch<int>& b) {
        std::vector<postbox::settlement> out;
        for (const auto& e : b) {
          if (e.payload == 1) out.push_back(postbox::settlement::ack());
          if (e.payload == 2) out.push_back(postbox::settlement::reject("bad"));
          if (e.payload == 3) out.push_back(postbox::settlement::retry(1s));
        }
        return out;
      },
      r.dlq, r.options(policy(5, 1s)));
  r.send(1);
  r.send(2);
  r.send(3);
  CHECK(c.poll() == 3);
  const auto s = c.stats();
  CHECK(s.acked == 1);
  CHECK(s.dead_lettered == 1);
  CHECK(s.retried == 1);
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().message->payload == 2);
  CHECK(r.dlq.list().front().reason == "bad");
}

TEST_CASE("a batch handler returning the wrong number of settlements retries the whole batch", "[consumer][batch]") {
  rig r;
  postbox::consumer c(
      r.source(), postbox::batch_options{.max_size = 2, .window = 1h},
      [&](const postbox::message_batch<int>&) { return std::vector<postbox::settlement>{postbox::settlement::ack()}; },
      r.dlq, r.options(policy(5, 1s)));
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  const auto s = c.stats();
  CHECK(s.acked == 0);
  CHECK(s.retried == 2);
  CHECK(s.handler_errors == 1);
}

TEST_CASE("a batch handler that throws settles the batch as the classifier says", "[consumer][batch]") {
  rig r;
  auto o = r.options(policy(5, 1s));
  o.classify = postbox::permanent_on<std::invalid_argument>();
  bool permanent = false;
  postbox::consumer c(
      r.source(), postbox::batch_options{.max_size = 2, .window = 1h},
      [&](const postbox::message_batch<int>&) -> postbox::settlement {
        if (permanent) throw std::invalid_argument("never");
        throw std::runtime_error("later");
      },
      r.dlq, o);
  r.send(1);
  r.send(2);
  CHECK(c.poll() == 2);
  CHECK(c.stats().retried == 2);
  CHECK(c.stats().handler_errors == 1);
  permanent = true;
  r.clock.advance(10s);
  CHECK(c.poll() == 2);
  CHECK(r.dlq.size() == 2);
  CHECK(r.dlq.list().front().error == "never");
}

TEST_CASE("batch options that the in-flight limit can never fill are refused at construction", "[consumer][batch]") {
  rig r;
  auto o = r.options();
  o.max_in_flight = 8;
  auto make = [&](postbox::batch_options b) {
    postbox::consumer c(r.source(), b, [](const postbox::message_batch<int>&) {}, r.dlq, o);
  };
  CHECK_NOTHROW(make({.max_size = 8, .window = 1s}));
  try {
    make({.max_size = 9, .window = 1s});
    FAIL("a batch larger than max_in_flight was accepted");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::invalid_argument);
  }
  CHECK_THROWS_AS(make({.max_size = 0, .window = 1s}), postbox::error);
  CHECK_THROWS_AS(make({.max_size = 4, .window = -1s}), postbox::error);
}

TEST_CASE("a batch holds one message per partition key and keeps each key's order", "[consumer][batch]") {
  rig r;
  std::vector<std::vector<int>> batches;
  postbox::consumer c(r.source(), postbox::batch_options{.max_size = 4, .window = 1s},
                      [&](const postbox::message_batch<int>& b) { batches.push_back(payloads(b)); }, r.dlq,
                      r.options());
  r.send(1, "a");
  r.send(2, "a");
  r.send(3, "b");
  r.send(4, "a");
  CHECK(c.poll() == 0);  // ready: 1 (a) and 3 (b); 2 and 4 wait behind a
  r.clock.advance(1s);
  CHECK(c.poll() == 2);  // {1, 3}; then 2 becomes ready and starts its own window
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  CHECK(batches == std::vector<std::vector<int>>{{1, 3}, {2}, {4}});
}

TEST_CASE("an expired message is dead-lettered instead of joining a batch", "[consumer][batch]") {
  rig r;
  std::vector<std::vector<int>> batches;
  postbox::consumer c(r.source(), postbox::batch_options{.max_size = 2, .window = 1h},
                      [&](const postbox::message_batch<int>& b) { batches.push_back(payloads(b)); }, r.dlq,
                      r.options());
  auto e = r.msg(1);
  e.deadline = r.clock.now() + 1s;
  REQUIRE(r.ch.try_send(std::move(e)) == postbox::send_status::ok);
  CHECK(c.poll() == 0);
  r.clock.advance(1s);
  r.send(2);
  r.send(3);
  CHECK(c.poll() == 3);
  CHECK(batches == std::vector<std::vector<int>>{{2, 3}});
  CHECK(c.stats().expired == 1);
}

TEST_CASE("draining a batch consumer flushes the partial batch once the source closes", "[consumer][batch]") {
  rig r;
  std::vector<int> seen;
  postbox::consumer c(r.source(), postbox::batch_options{.max_size = 8, .window = postbox::duration::max()},
                      [&](const postbox::message_batch<int>& b) {
                        for (const auto& e : b) seen.push_back(e.payload);
                      },
                      r.dlq, r.options());
  r.send(1);
  r.send(2);
  r.ch.close();
  const auto report = c.drain(1min);
  CHECK(report.finished);
  CHECK(seen == std::vector<int>{1, 2});
}

TEST_CASE("a threaded batch consumer handles every message exactly once", "[consumer][batch]") {
  const int n = static_cast<int>(postbox_test::scaled(2000));
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(256);
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};
  postbox::consumer_options o;
  o.threads = 2;
  o.max_in_flight = 32;
  o.clock = &clock;
  o.receive_wait = 1ms;
  std::atomic<std::int64_t> sum{0};
  std::atomic<int> count{0};
  std::atomic<std::size_t> largest{0};
  std::atomic<bool> send_failed{false};
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"),
                      postbox::batch_options{.max_size = 16, .window = postbox::duration::max()},
                      [&](const postbox::message_batch<int>& b) {
                        if (b.size() > largest.load()) largest.store(b.size());
                        for (const auto& e : b) {
                          sum.fetch_add(e.payload);
                          count.fetch_add(1);
                        }
                      },
                      dlq, o);
  std::thread producer([&] {
    for (int i = 1; i <= n; ++i) {
      auto e = postbox::make_envelope(std::string("test.int"), i, postbox::message_kind::event, clock);
      if (ch.send(std::move(e)) != postbox::send_status::ok) send_failed = true;
    }
    ch.close();  // the last partial batch flushes when the source reports closed
  });
  producer.join();
  CHECK_FALSE(send_failed.load());
  CHECK(postbox_test::eventually([&] { return count.load() >= n; }));
  (void)c.shutdown(1s);
  CHECK(count.load() == n);
  CHECK(sum.load() == static_cast<std::int64_t>(n) * (n + 1) / 2);
  CHECK(largest.load() <= 16);
  CHECK(c.stats().acked == static_cast<std::uint64_t>(n));
}

namespace {

// A source with both forms: the consumer must use receive_into (the in-place
// form) and never receive.
struct in_place_only_source {
  using payload_type = int;
  static constexpr bool redelivers = false;
  postbox::channel<env_t>* ch;
  int* in_place_calls;
  int* receive_calls;
  postbox::receive_result<postbox::inbound<int>> receive(postbox::duration) {
    ++*receive_calls;
    return postbox::receive_result<postbox::inbound<int>>(postbox::receive_status::empty);
  }
  postbox::receive_status receive_into(postbox::duration, postbox::inbound_sink<int>& sink) {
    ++*in_place_calls;
    auto r = ch->try_receive_result();
    if (!r.has_value()) return r.status();
    sink.accept(std::move(*r), postbox::settle_hook{});
    return postbox::receive_status::ok;
  }
  [[nodiscard]] std::string_view name() const noexcept { return "in-place"; }
};
static_assert(postbox::in_place_consumer_source<in_place_only_source>);
static_assert(postbox::in_place_consumer_source<postbox::channel_source<int>>);

}  // namespace

TEST_CASE("a source with receive_into hands its items in place and its receive is never called", "[consumer]") {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(8);
  for (int i = 1; i <= 3; ++i)
    REQUIRE(ch.try_send(postbox::make_envelope(std::string("t"), i, postbox::message_kind::event, clock)) ==
            postbox::send_status::ok);
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};
  int in_place = 0;
  int received = 0;
  int sum = 0;
  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &clock;
  postbox::consumer<int> c(in_place_only_source{&ch, &in_place, &received}, [&](const env_t& e) { sum += e.payload; },
                           dlq, o);
  CHECK(c.poll() == 3);
  CHECK(sum == 6);
  CHECK(c.stats().acked == 3);
  CHECK(in_place >= 3);
  CHECK(received == 0);
}

TEST_CASE("the consumer's node pool hands a freed node to the next allocation of its size, and frees other sizes to the heap",
          "[consumer]") {
  postbox::detail::consumer_node_pool pool;
  void* a = pool.allocate(96);
  void* b = pool.allocate(96);
  CHECK(a != b);
  postbox::detail::consumer_node_pool::deallocate(a);
  void* other = pool.allocate(48);  // another size: a heap block, never pooled
  CHECK(other != a);
  postbox::detail::consumer_node_pool::deallocate(other);
  CHECK(pool.allocate(96) == a);  // the freed node, not the other-size block
  postbox::detail::consumer_node_pool::deallocate(a);
  postbox::detail::consumer_node_pool::deallocate(b);
}

TEST_CASE("a redriven message's counter headers are read as from_chars reads them, 0 when absent or out of range",
          "[consumer][dead_letter]") {
  const auto u32 = [](std::string text) {
    postbox::header_map h;
    h.set("n", std::move(text));
    return postbox::detail::header_number<std::uint32_t>(h, "n");
  };
  const auto i64 = [](std::string text) {
    postbox::header_map h;
    h.set("n", std::move(text));
    return postbox::detail::header_number<std::int64_t>(h, "n");
  };
  CHECK(postbox::detail::header_number<std::uint32_t>(postbox::header_map{}, "n") == 0);
  CHECK(u32("12") == 12);
  CHECK(u32("12abc") == 12);  // the leading digits, as from_chars
  CHECK(u32("4294967295") == 4294967295U);
  CHECK(u32("4294967296") == 0);  // out of range
  CHECK(u32("-1") == 0);          // no sign for an unsigned counter
  CHECK(u32("+1") == 0);
  CHECK(u32(" 1") == 0);
  CHECK(u32("") == 0);
  CHECK(i64("-12") == -12);
  CHECK(i64("-0") == 0);
  CHECK(i64("-") == 0);
  CHECK(i64("9223372036854775807") == std::numeric_limits<std::int64_t>::max());
  CHECK(i64("9223372036854775808") == 0);
  CHECK(i64("-9223372036854775808") == std::numeric_limits<std::int64_t>::min());
  CHECK(i64("-9223372036854775809") == 0);
}

// ---- several ready messages run as one claimed run --------------------------
//
// A poll that finds several messages ready runs them one after another
// under one claim (two lock operations for the run, not per message); with
// nothing queued, it runs what it receives from a channel source straight
// from its buffers (no node). What others see of the consumer meanwhile
// must be what one-by-one runs show, on either path.

TEST_CASE("stats read by a handler in a run of ready messages count the earlier ones acked and the later ones queued",
          "[consumer][claim]") {
  rig r;
  std::vector<postbox::consumer_stats> during;
  postbox::consumer<int>* self = nullptr;
  const bool straight = GENERATE(true, false);
  INFO((straight ? "received straight from the channel" : "received through a source with receive only"));
  auto made = r.consumer_over(straight, [&](const env_t&) { during.push_back(self->stats()); }, r.options());
  auto& c = *made;
  self = &c;
  for (int i = 0; i < 5; ++i) r.send(i);
  CHECK(c.poll() == 5);
  REQUIRE(during.size() == 5);
  for (std::uint64_t k = 0; k < 5; ++k) {
    INFO("message " << k);
    CHECK(during[k].acked == k);
    CHECK(during[k].started == k + 1);
    CHECK(during[k].running == 1);
    CHECK(during[k].queued == 4 - k);
    CHECK(during[k].in_flight == 5 - k);
  }
  const auto after = c.stats();
  CHECK(after.acked == 5);
  CHECK(after.running == 0);
  CHECK(after.in_flight == 0);
  CHECK(after.handle_duration.count == 5);
}

TEST_CASE("a handler that does not ack in a run of ready messages leaves the later ones to run in order",
          "[consumer][claim]") {
  rig r;
  std::vector<std::pair<int, std::uint32_t>> seen;  // payload, attempt
  const bool straight = GENERATE(true, false);
  INFO((straight ? "received straight from the channel" : "received through a source with receive only"));
  auto made = r.consumer_over(straight, [&](const env_t& e) {
    seen.emplace_back(e.payload, e.attempt);
    return e.payload == 2 && e.attempt == 1 ? postbox::settlement::retry() : postbox::settlement::ack();
  }, r.options(policy(3, 0s)));
  auto& c = *made;
  for (int i = 0; i < 5; ++i) r.send(i);
  CHECK(c.poll() == 5);
  CHECK(seen == std::vector<std::pair<int, std::uint32_t>>{{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}});
  CHECK(c.stats().retried == 1);
  CHECK(c.stats().waiting_retry == 1);
  CHECK(c.poll() == 1);  // the retry is due at once
  CHECK(seen.back() == std::pair<int, std::uint32_t>{2, 2});
  CHECK(c.stats().acked == 5);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("a message whose deadline passes during a run of ready messages is dead-lettered and the rest still run",
          "[consumer][claim]") {
  rig r;
  std::vector<int> seen;
  const bool straight = GENERATE(true, false);
  INFO((straight ? "received straight from the channel" : "received through a source with receive only"));
  auto made = r.consumer_over(straight, [&](const env_t& e) {
    seen.push_back(e.payload);
    if (e.payload == 1) r.clock.advance(2s);
  }, r.options());
  auto& c = *made;
  for (int i = 0; i < 4; ++i) {
    auto e = r.msg(i);
    if (i == 2) e.deadline = r.clock.now() + 1s;
    REQUIRE(r.ch.try_send(std::move(e)) == postbox::send_status::ok);
  }
  CHECK(c.poll() == 4);
  CHECK(seen == std::vector<int>{0, 1, 3});
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().message->payload == 2);
  CHECK(r.dlq.list().front().reason == "expired");
  CHECK(r.dlq.list().front().attempts == 0);
  const auto s = c.stats();
  CHECK(s.expired == 1);
  CHECK(s.started == 3);
  CHECK(s.acked == 3);
}

TEST_CASE("shutdown during a run of ready messages reports the running one abandoned and returns the later ones in order",
          "[consumer][claim][shutdown]") {
  rig r;
  std::atomic<bool> entered{false};
  std::atomic<bool> release{false};
  std::atomic<bool> released{false};
  std::atomic<bool> stop_seen{false};
  const bool straight = GENERATE(true, false);
  INFO((straight ? "received straight from the channel" : "received through a source with receive only"));
  auto made = r.consumer_over(straight, [&](const env_t& e, postbox::consume_context& ctx) {
    if (e.payload == 1) {
      entered.store(true);
      released.store(postbox_test::eventually([&] { return release.load(); }));
      stop_seen.store(ctx.stop_requested());
    }
  }, r.options());
  auto& c = *made;
  std::vector<postbox::message_id> ids;
  for (int i = 0; i < 5; ++i) {
    auto e = r.msg(i);
    ids.push_back(e.id);
    REQUIRE(r.ch.try_send(std::move(e)) == postbox::send_status::ok);
  }
  std::size_t polled = 0;
  std::thread poller([&] { polled = c.poll(); });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  auto report = c.shutdown(0s);
  release.store(true);
  poller.join();
  REQUIRE(released.load());
  CHECK(report.completed == 0);  // message 0 was acked before shutdown began
  CHECK(report.abandoned == 1);
  CHECK(report.abandoned_ids == std::vector<postbox::message_id>{ids[1]});
  std::vector<int> returned;
  for (const auto& e : report.returned) returned.push_back(e.payload);
  CHECK(returned == std::vector<int>{2, 3, 4});
  CHECK(stop_seen.load());
  CHECK(polled == 2);
  const auto s = c.stats();
  CHECK(s.acked == 2);  // the abandoned handler's ack applies when it returns
  CHECK(s.released == 3);
  CHECK(s.in_flight == 0);
  CHECK(c.take_released().empty());
}

TEST_CASE("a keyed message ends a run straight from the channel and runs after the messages received before it",
          "[consumer][claim]") {
  rig r;
  std::vector<int> seen;
  postbox::consumer c(r.source(), [&](const env_t& e) { seen.push_back(e.payload); }, r.dlq, r.options());
  r.send(0);
  r.send(1);
  r.send(2, "k");
  r.send(3);
  r.send(4, "k");
  CHECK(c.poll() == 5);
  CHECK(seen == std::vector<int>{0, 1, 2, 3, 4});
  const auto s = c.stats();
  CHECK(s.received == 5);
  CHECK(s.acked == 5);
  CHECK(s.in_flight == 0);
}

TEST_CASE("a keyed message received while its key waits for a retry runs after the retry, and unkeyed ones pass it",
          "[consumer][claim]") {
  rig r;
  std::vector<std::pair<int, std::uint32_t>> seen;  // payload, attempt
  postbox::consumer c(r.source(), [&](const env_t& e) {
    seen.emplace_back(e.payload, e.attempt);
    return e.payload == 0 && e.attempt == 1 ? postbox::settlement::retry() : postbox::settlement::ack();
  }, r.dlq, r.options(policy(3, 1s, false)));
  r.send(0, "k");
  r.send(1, "k");
  r.send(2);
  CHECK(c.poll() == 2);  // 0 (parked for its retry) and 2; 1 waits behind its key
  CHECK(seen == std::vector<std::pair<int, std::uint32_t>>{{0, 1}, {2, 1}});
  CHECK(c.stats().queued == 1);
  r.send(3, "k");
  CHECK(c.poll() == 0);  // 3 waits behind the key too
  r.clock.advance(1s);
  CHECK(c.poll() == 3);
  CHECK(seen == std::vector<std::pair<int, std::uint32_t>>{{0, 1}, {2, 1}, {0, 2}, {1, 1}, {3, 1}});
  CHECK(c.stats().acked == 4);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("handler durations in a run are each handler's own time on the consumer's clock", "[consumer][claim]") {
  rig r;
  const bool straight = GENERATE(true, false);
  INFO((straight ? "received straight from the channel" : "received through a source with receive only"));
  auto made = r.consumer_over(straight, [&](const env_t& e) { r.clock.advance(std::chrono::milliseconds(e.payload)); },
                              r.options());
  auto& c = *made;
  for (int i = 1; i <= 4; ++i) r.send(i);
  CHECK(c.poll() == 4);
  const auto s = c.stats();
  CHECK(s.handle_duration.count == 4);
  CHECK(s.handle_duration.sum == Approx(0.010));  // 1 + 2 + 3 + 4 ms
}

TEST_CASE("a consumer's only worker runs what it receives from a channel as a run, counted as one-by-one runs are",
          "[consumer][claim]") {
  rig r;
  for (int i = 0; i < 5; ++i) r.send(i);
  std::mutex mu;
  std::vector<postbox::consumer_stats> during;
  postbox::consumer<int>* self = nullptr;
  std::atomic<bool> ready{false};
  auto o = r.options();
  o.threads = 1;
  postbox::consumer c(r.source(), [&](const env_t&) {
    (void)postbox_test::eventually([&] { return ready.load(); });  // `self` is set; no assertion off the test's thread
    const auto s = self->stats();
    std::lock_guard lock(mu);
    during.push_back(s);
  }, r.dlq, o);
  self = &c;
  ready.store(true);
  REQUIRE(postbox_test::eventually([&] { return c.stats().acked == 5; }));
  std::lock_guard lock(mu);
  REQUIRE(during.size() == 5);
  for (std::uint64_t k = 0; k < 5; ++k) {
    INFO("message " << k);
    CHECK(during[k].received == 5);
    CHECK(during[k].acked == k);
    CHECK(during[k].running == 1);
    CHECK(during[k].queued == 4 - k);
    CHECK(during[k].in_flight == 5 - k);
  }
}

TEST_CASE("a run straight from the channel ends at max_in_flight and the next poll step takes the rest",
          "[consumer][claim]") {
  rig r;
  std::vector<std::uint64_t> in_flight;
  postbox::consumer<int>* self = nullptr;
  auto o = r.options();
  o.max_in_flight = 3;
  postbox::consumer c(r.source(), [&](const env_t&) { in_flight.push_back(self->stats().in_flight); }, r.dlq, o);
  self = &c;
  for (int i = 0; i < 7; ++i) r.send(i);
  CHECK(c.poll() == 7);
  CHECK(in_flight == std::vector<std::uint64_t>{3, 2, 1, 3, 2, 1, 1});
  CHECK(c.stats().acked == 7);
}
