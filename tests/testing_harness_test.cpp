// SPDX-License-Identifier: MIT
// Specification tests for postbox::testing::harness: one clock and one driver for every attached component.
#include <postbox/testing/harness.hpp>

#include <postbox/async.hpp>
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/saga.hpp>
#include <postbox/scheduler.hpp>
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>
#include <postbox/timer_service.hpp>
#if __has_include(<nlohmann/json.hpp>)
#  include <postbox/json.hpp>
#  include <postbox/outbox.hpp>
#endif

#include <catch2/catch.hpp>

#include "support.hpp"

#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::testing::harness;

namespace {

using env_t = postbox::envelope<int>;

// A channel, a dead-letter queue and a consumer source, all on one harness.
struct rig {
  explicit rig(harness& h) : dlq(postbox::dead_letter_options{}, h.get_clock()), clk(&h.get_clock()) {}
  postbox::channel<env_t> ch{64};
  postbox::dead_letter_queue<int> dlq;
  const postbox::clock* clk;

  void send(int n) {
    REQUIRE(ch.try_send(postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, *clk)) ==
            postbox::send_status::ok);
  }
  [[nodiscard]] postbox::channel_source<int> source() { return postbox::channel_source<int>(ch, "numbers"); }
};

postbox::retry_policy jittered(std::uint32_t attempts) {
  postbox::retry_policy p;
  p.max_attempts = attempts;
  p.initial_backoff = 1s;
  p.multiplier = 2.0;
  p.max_backoff = 1min;
  p.full_jitter = true;
  return p;
}

// Two consumers with jittered retries and a periodic timer, all on one
// harness; returns what the harness recorded plus every handler start.
struct scenario_result {
  std::vector<postbox::testing::harness_event> trace;
  std::vector<std::pair<std::string, postbox::time_point>> starts;
};
scenario_result run_scenario(std::uint64_t seed) {
  harness h(seed);
  rig a(h);
  rig b(h);
  scenario_result out;
  auto handler = [&](std::string who) {
    return [&out, &h, who](const env_t& e) {
      out.starts.emplace_back(who + ":" + std::to_string(e.payload), h.now());
      return e.attempt < 3 ? postbox::settlement::retry() : postbox::settlement::ack();
    };
  };
  postbox::consumer ca(a.source(), handler("a"), a.dlq, h.configure(postbox::consumer_options{.retry = jittered(5)}));
  postbox::consumer cb(b.source(), handler("b"), b.dlq, h.configure(postbox::consumer_options{.retry = jittered(5)}));
  h.attach(ca, "a");
  h.attach(cb, "b");
  (void)h.timers().schedule_after(1500ms, [&] { out.starts.emplace_back("timer", h.now()); });
  for (int i = 0; i < 3; ++i) {
    a.send(i);
    b.send(i);
  }
  while (h.advance_to_next()) {
  }
  out.trace = h.trace();
  return out;
}

}  // namespace

TEST_CASE("advance_to_next observes a consumer's retries exactly at the backoff schedule", "[testing][harness]") {
  harness h(2026);
  rig p(h);
  std::vector<postbox::time_point> attempts;
  const auto options = h.configure(postbox::consumer_options{.retry = jittered(4)});
  postbox::consumer c(p.source(), [&](const env_t&) -> postbox::settlement {
    attempts.push_back(h.now());
    throw std::runtime_error("down");
  }, p.dlq, options);
  h.attach(c, "orders");
  const auto t0 = h.now();
  p.send(1);

  // The schedule the consumer must follow: its jitter is seeded by the harness.
  REQUIRE(options.jitter_seed.has_value());
  postbox::jitter_source jitter(*options.jitter_seed);
  std::vector<postbox::time_point> expected{t0};
  for (std::uint32_t n = 1; n < 4; ++n) expected.push_back(expected.back() + jittered(4).backoff(n, jitter.next()));

  std::vector<postbox::time_point> stops;
  while (auto t = h.advance_to_next()) stops.push_back(*t);
  CHECK(attempts == expected);
  CHECK(stops == std::vector<postbox::time_point>(expected.begin() + 1, expected.end()));
  REQUIRE(p.dlq.size() == 1);
  CHECK(p.dlq.list().front().reason == "retries_exhausted");
  CHECK(h.next_due() == postbox::time_point::max());
}

TEST_CASE("a consumer's next_due is its earliest pending retry and max when none", "[testing][harness][consumer]") {
  harness h(1);
  rig p(h);
  postbox::consumer c(p.source(), [](const env_t&) { return postbox::settlement::retry(250ms); }, p.dlq,
                      h.configure(postbox::consumer_options{.retry = jittered(2)}));
  CHECK(c.next_due() == postbox::time_point::max());
  p.send(1);
  CHECK(c.poll() == 1);
  CHECK(c.next_due() == h.now() + 250ms);
  h.get_clock().advance(250ms);
  CHECK(c.poll() == 1);  // the second and last attempt: dead-lettered, nothing pending
  CHECK(c.next_due() == postbox::time_point::max());
}

TEST_CASE("next_due across two components is the earliest of their due times", "[testing][harness]") {
  harness h;
  rig p(h);
  postbox::consumer c(p.source(), [](const env_t&) { return postbox::settlement::retry(5s); }, p.dlq,
                      h.configure(postbox::consumer_options{}));
  postbox::scheduler sched(h.get_clock(), postbox::timer_service::manual_drive);
  h.attach(c);
  h.attach(sched);
  CHECK(h.next_due() == postbox::time_point::max());

  const auto t0 = h.now();
  auto reminder = sched.call_at(t0 + 3s, [] {});
  p.send(1);
  CHECK(h.run_until_idle() == 1);
  CHECK(c.next_due() == t0 + 5s);
  CHECK(sched.next_deadline() == t0 + 3s);
  CHECK(h.next_due() == t0 + 3s);
  CHECK(reminder.cancel());
  CHECK(h.next_due() == t0 + 5s);
}

TEST_CASE("run_until_idle drains a pipeline of an outbox relay feeding a consumer", "[testing][harness][outbox]") {
#if __has_include(<nlohmann/json.hpp>)
  harness h(3);
  rig p(h);
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{}, h.get_clock());
  postbox::outbox_relay relay(store, postbox::to_channel(p.ch, postbox::json::codec{}),
                              h.configure(postbox::relay_options{.batch_size = 4, .owner = "relay-1"}),
                              h.get_clock());
  std::map<int, int> handled;  // payload -> times handled
  postbox::consumer c(p.source(), [&](const env_t& e) { ++handled[e.payload]; }, p.dlq,
                      h.configure(postbox::consumer_options{.max_in_flight = 3}));
  h.attach(relay, "relay");
  h.attach(c, "consumer");

  constexpr int n = 25;
  {
    auto tx = store.begin();
    for (int i = 1; i <= n; ++i)
      REQUIRE(box.stage(tx, postbox::make_envelope(std::string("test.int"), i, postbox::message_kind::event,
                                                   h.get_clock())) == postbox::errc::ok);
    REQUIRE(tx.commit() == postbox::errc::ok);
  }
  const auto t0 = h.now();
  CHECK(h.run_until_idle() >= 2 * static_cast<std::size_t>(n));  // n claimed by the relay, n handled
  CHECK(h.now() == t0);                                          // no time passed

  long sum = 0;
  for (const auto& [payload, times] : handled) {
    CHECK(times == 1);
    sum += payload;
  }
  CHECK(handled.size() == static_cast<std::size_t>(n));
  CHECK(sum == n * (n + 1) / 2);  // nothing lost, nothing duplicated
  CHECK(relay.stats().dispatched == static_cast<std::uint64_t>(n));
  CHECK(c.stats().acked == static_cast<std::uint64_t>(n));
  CHECK(p.ch.size_approx() == 0);
  // Both took turns: the relay ran in several batches of 4 between consumer polls.
  std::size_t relay_steps = 0;
  for (const auto& e : h.trace()) relay_steps += e.source == "relay" ? 1 : 0;
  CHECK(relay_steps == (n + 3) / 4);
#else
  SUCCEED("nlohmann/json not installed: the outbox needs a codec");
#endif
}

TEST_CASE("an attached relay retries a failing destination at its backoff time with advance_to_next",
          "[testing][harness][outbox]") {
#if __has_include(<nlohmann/json.hpp>)
  harness h(4);
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{}, h.get_clock());
  std::vector<postbox::time_point> tries;
  auto options = h.configure(postbox::relay_options{.batch_size = 8, .owner = "relay-1"});
  options.retry.full_jitter = false;
  options.retry.initial_backoff = 1s;
  options.retry.multiplier = 2.0;
  postbox::outbox_relay relay(
      store,
      [&](const postbox::stored_message&) {
        tries.push_back(h.now());
        return tries.size() < 3 ? postbox::errc::full : postbox::errc::ok;
      },
      options, h.get_clock());
  h.attach(relay, "relay");
  const auto t0 = h.now();
  {
    auto tx = store.begin();
    REQUIRE(box.stage(tx, postbox::make_envelope(std::string("test.int"), 1, postbox::message_kind::event,
                                                 h.get_clock())) == postbox::errc::ok);
    REQUIRE(tx.commit() == postbox::errc::ok);
  }
  while (h.advance_to_next()) {
  }
  CHECK(tries == std::vector<postbox::time_point>{t0, t0 + 1s, t0 + 3s});
  CHECK(relay.stats().dispatched == 1);
#else
  SUCCEED("nlohmann/json not installed: the outbox needs a codec");
#endif
}

TEST_CASE("an attached responder answers a requester within run_until_idle", "[testing][harness][request_reply]") {
  harness h;
  postbox::channel<env_t> requests{8};
  postbox::endpoint_registry<int> registry;
  postbox::requester<int, int> req(requests, registry, h.timers());
  postbox::responder<int, int> resp(requests, registry, [](const env_t& e) { return e.payload * 2; }, h.get_clock(),
                                    0);
  h.attach(resp, "responder");
  auto f = req.request(21, 5s);
  REQUIRE(f.has_value());
  CHECK(h.run_until_idle() == 1);
  REQUIRE(f->ready());
  CHECK(f->get().reply->payload == 42);
  // The emptied table keeps its timer; it fires once into it, then is gone.
  CHECK(h.next_due() == h.now() + 5s);
  CHECK(h.advance(5s) == 1);
  CHECK(h.next_due() == postbox::time_point::max());
  CHECK(req.stats().timed_out == 0);
}

TEST_CASE("the same seed gives the same events at the same times, another seed does not",
          "[testing][harness]") {
  const auto first = run_scenario(7);
  const auto again = run_scenario(7);
  const auto other = run_scenario(8);
  REQUIRE(first.starts.size() == 19);  // 2 consumers x 3 messages x 3 attempts, and the timer
  CHECK(first.trace == again.trace);
  CHECK(first.starts == again.starts);
  CHECK(first.starts != other.starts);
  CHECK(first.trace != other.trace);
}

TEST_CASE("run_until_idle reports a livelock after max_steps instead of spinning", "[testing][harness]") {
  SECTION("a handler that retries with no delay forever") {
    harness h(1, {.max_steps = 100});
    rig p(h);
    std::size_t runs = 0;
    postbox::retry_policy forever;
    forever.max_attempts = std::numeric_limits<std::uint32_t>::max();
    postbox::consumer c(p.source(), [&](const env_t&) {
      ++runs;
      return postbox::settlement::retry(0ns);
    }, p.dlq, h.configure(postbox::consumer_options{.retry = forever}));
    h.attach(c, "spinning-consumer");
    p.send(1);
    try {
      (void)h.run_until_idle();
      FAIL("no livelock reported");
    } catch (const postbox::error& e) {
      CHECK(e.code() == postbox::errc::timeout);
      CHECK_THAT(e.what(), Catch::Contains("spinning-consumer") && Catch::Contains("100 steps"));
    }
    CHECK(runs == 101);
  }
  SECTION("any attached function that always has work") {
    harness h(1, {.max_steps = 10});
    std::size_t calls = 0;
    h.attach("busy", [&] { return ++calls; });
    CHECK_THROWS_AS(h.run_until_idle(), postbox::error);
    CHECK(calls == 11);
  }
}

TEST_CASE("advance stops at every due time on the way and then at the target", "[testing][harness]") {
  harness h;
  const auto t0 = h.now();
  std::vector<postbox::time_point> fired;
  (void)h.timers().schedule_after(2s, [&] { fired.push_back(h.now()); });
  (void)h.timers().schedule_after(1s, [&] {
    fired.push_back(h.now());
    (void)h.timers().schedule_after(500ms, [&] { fired.push_back(h.now()); });  // scheduled on the way
  });
  (void)h.timers().schedule_after(9s, [&] { fired.push_back(h.now()); });
  CHECK(h.advance(5s) == 3);
  CHECK(fired == std::vector<postbox::time_point>{t0 + 1s, t0 + 1500ms, t0 + 2s});
  CHECK(h.now() == t0 + 5s);
  CHECK(h.next_due() == t0 + 9s);
  CHECK_THROWS_AS(h.advance(-1s), postbox::error);
}

TEST_CASE("advance_to_next leaves the clock alone and returns nothing when nothing is scheduled",
          "[testing][harness]") {
  harness h;
  const auto t0 = h.now();
  CHECK_FALSE(h.advance_to_next().has_value());
  CHECK(h.now() == t0);
  (void)h.timers().schedule_after(10min, [] {});
  CHECK(h.advance_to_next() == std::optional<postbox::time_point>(t0 + 10min));
  CHECK_FALSE(h.advance_to_next().has_value());
}

TEST_CASE("run_until stops as soon as the condition holds, or when nothing more is scheduled",
          "[testing][harness]") {
  harness h;
  const auto t0 = h.now();
  int ticks = 0;
  for (int i = 1; i <= 5; ++i) (void)h.timers().schedule_after(i * 1s, [&] { ++ticks; });
  CHECK(h.run_until([&] { return ticks == 3; }));
  CHECK(h.now() == t0 + 3s);
  CHECK_FALSE(h.run_until([&] { return ticks == 99; }, 1s));  // only the 4 s timer is within the limit
  CHECK(ticks == 4);
  CHECK_FALSE(h.run_until([&] { return ticks == 99; }, postbox::duration::max()));  // saturates, no overflow
  CHECK(ticks == 5);
  CHECK(h.now() == t0 + 5s);
}

TEST_CASE("a requester's timeout and a dead-letter redrive run on the harness timers", "[testing][harness]") {
  harness h;
  const auto t0 = h.now();
  postbox::channel<env_t> requests{8};
  postbox::endpoint_registry<int> registry;
  postbox::requester<int, int> req(requests, registry, h.timers());
  postbox::reply_outcome<int> outcome;
  postbox::time_point completed_at{};
  REQUIRE(req.request(1, 2s, [&](postbox::reply_outcome<int> o) {
    outcome = std::move(o);
    completed_at = h.now();
  }) == postbox::errc::ok);

  std::vector<postbox::time_point> redriven;
  postbox::dead_letter_queue<int> dlq(h.timers(), {.redrive_rate = 1, .redrive_burst = 1});
  dlq.set_origin("numbers", [&](env_t) {
    redriven.push_back(h.now());
    return postbox::errc::ok;
  });
  for (int i = 0; i < 3; ++i) {
    postbox::dead_letter<int> d;
    d.message = postbox::make_envelope(std::string("test.int"), i, postbox::message_kind::event, h.get_clock());
    d.source = "numbers";
    REQUIRE(dlq.add(std::move(d)) == postbox::errc::ok);
  }
  CHECK(dlq.redrive() == 3);
  CHECK(redriven.size() == 1);  // one token now, then one per second
  CHECK(outcome.status == postbox::errc::ok);  // not completed yet

  while (h.advance_to_next()) {
  }
  REQUIRE(redriven.size() == 3);
  CHECK(redriven[0] == t0);
  for (std::size_t i = 1; i < 3; ++i) {  // the token bucket rounds its next token up by a nanosecond
    CHECK(redriven[i] - redriven[i - 1] >= 1s);
    CHECK(redriven[i] - redriven[i - 1] <= 1s + 1us);
  }
  CHECK(outcome.status == postbox::errc::timeout);
  CHECK(completed_at == t0 + 2s);
}

TEST_CASE("configure points options at the harness clock and timers with seeds from the harness seed",
          "[testing][harness]") {
  harness h(99);
  harness same(99);
  const auto c = h.configure(postbox::consumer_options{.name = "orders", .threads = 4});
  CHECK(c.name == "orders");
  CHECK(c.threads == 0);
  CHECK(c.clock == &h.get_clock());
  REQUIRE(c.jitter_seed.has_value());
  CHECK(*c.jitter_seed == same.next_seed());
  const auto again = h.configure(postbox::consumer_options{});
  CHECK(again.jitter_seed != c.jitter_seed);  // each component its own stream
  CHECK(harness(100).next_seed() != harness(99).next_seed());
}

TEST_CASE("a detached component is no longer driven", "[testing][harness]") {
  harness h;
  std::size_t calls = 0;
  const auto id = h.attach("once", [&] { return calls++ == 0 ? std::size_t{1} : std::size_t{0}; },
                           [&] { return h.now() + 1s; });
  CHECK(h.next_due() == h.now() + 1s);
  CHECK(h.run_until_idle() == 1);
  CHECK(h.detach(id));
  CHECK_FALSE(h.detach(id));
  CHECK(h.next_due() == postbox::time_point::max());
  const auto before = calls;
  (void)h.run_until_idle();
  CHECK(calls == before);
}

TEST_CASE("a component that reports due work it never does is an error, not an endless loop",
          "[testing][harness]") {
  harness h;
  h.attach("stuck", [] { return std::size_t{0}; }, [&] { return h.now(); });
  try {
    (void)h.advance_to_next();
    FAIL("no error");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::timeout);
    CHECK_THAT(e.what(), Catch::Contains("stuck"));
  }
}

TEST_CASE("with auto_advance a saga's compensation backoff jumps the clock instead of blocking the test",
          "[testing][harness][saga]") {
  harness h(5, {.auto_advance = true});
  postbox::memory_saga_store store;
  auto options = h.configure(postbox::saga_options{});
  options.compensation_retry.max_attempts = 4;
  options.compensation_retry.initial_backoff = 10s;
  options.compensation_retry.multiplier = 2.0;
  options.compensation_retry.full_jitter = false;
  postbox::saga_coordinator coord(store, options, h.get_clock());
  std::vector<postbox::time_point> undo_at;
  postbox::saga_definition def("retry");
  def.step("reserve", [](postbox::step_context&) {},
           [&](postbox::step_context&) {
             undo_at.push_back(h.now());
             return undo_at.size() < 3 ? postbox::step_result::failure("inventory down")
                                       : postbox::step_result::success();
           })
      .step("charge", [](postbox::step_context&) { return false; }, nullptr);
  coord.add(std::move(def));
  const auto t0 = h.now();
  const auto out = coord.run("retry");  // on this thread: no other thread could move the clock
  REQUIRE(out.has_value());
  CHECK(out->outcome == postbox::saga_outcome::compensated);
  CHECK(undo_at == std::vector<postbox::time_point>{t0, t0 + 10s, t0 + 30s});
  CHECK(h.now() == t0 + 30s);
}

TEST_CASE("with auto_advance a manual consumer's drain waits for its retries on the harness clock",
          "[testing][harness][consumer]") {
  harness h(6, {.auto_advance = true});
  rig p(h);
  std::vector<postbox::time_point> starts;
  postbox::consumer c(p.source(), [&](const env_t& e) {
    starts.push_back(h.now());
    return e.attempt == 1 ? postbox::settlement::retry(2s) : postbox::settlement::ack();
  }, p.dlq, h.configure(postbox::consumer_options{}));
  const auto t0 = h.now();
  p.send(1);
  p.ch.close();
  const auto report = c.drain(1min);
  CHECK(report.finished);
  CHECK(starts == std::vector<postbox::time_point>{t0, t0 + 2s});
  CHECK(h.now() == t0 + 2s);
}

TEST_CASE("auto_advance jumps only the waits of the thread that built the harness", "[testing][harness]") {
  harness h(1, {.auto_advance = true});
  const auto t0 = h.now();
  std::mutex m;
  std::condition_variable cv;
  {
    std::unique_lock lock(m);
    h.get_clock().wait_until(lock, cv, t0 + 5s);  // this thread: returns at once, the clock at the deadline
  }
  CHECK(h.now() == t0 + 5s);
  std::thread other([&] {
    std::unique_lock lock(m);
    while (h.now() < t0 + 1h) h.get_clock().wait_until(lock, cv, t0 + 1h);
  });
  REQUIRE(postbox_test::eventually([&] { return h.get_clock().waiters() == 1; }));
  CHECK(h.now() == t0 + 5s);  // another thread waits as on any manual clock
  h.get_clock().set(t0 + 1h);
  other.join();
  CHECK(h.now() == t0 + 1h);
}

TEST_CASE("an attached operations tracker's finished records expire at their retention time",
          "[testing][harness][operations]") {
  harness h;
  postbox::operations<int> ops(h.get_clock(), {.workers = 1, .retention = 10min});
  h.attach(ops, "operations");
  const auto t0 = h.now();
  auto a = ops.submit("alice", "k", "fp", [](postbox::operation_context&) { return 1; });
  REQUIRE(a.has_value());
  auto done = ops.wait(postbox::operation_caller("alice"), a->id);  // the work runs on the tracker's executor
  REQUIRE(done.has_value());
  CHECK(h.next_due() == t0 + 10min);
  CHECK(h.advance_to_next() == t0 + 10min);
  CHECK(ops.size_approx() == 0);
  CHECK(ops.get("alice", a->id).status() == postbox::errc::not_found);
  CHECK(h.next_due() == postbox::time_point::max());
}

TEST_CASE("coroutine handlers resume on an attached run_queue and retry at the backoff time",
          "[testing][harness][consumer]") {
  harness h(8);
  rig p(h);
  postbox::run_queue rq;
  postbox::channel<int> gate{4};
  std::vector<postbox::time_point> starts;
  auto options = h.configure(postbox::consumer_options{});
  options.scheduler = rq;
  options.retry.initial_backoff = 10s;
  options.retry.full_jitter = false;
  postbox::consumer c(p.source(), [&](const env_t& e) -> postbox::task<postbox::settlement> {
    starts.push_back(h.now());
    (void)co_await postbox::async_receive(gate);
    co_return e.attempt == 1 ? postbox::settlement::retry() : postbox::settlement::ack();
  }, p.dlq, options);
  h.attach(c, "consumer");
  h.attach(rq, "run_queue");
  const auto t0 = h.now();
  p.send(1);
  CHECK(h.run_until_idle() == 1);  // started, suspended on the gate
  REQUIRE(gate.try_send(0) == postbox::send_status::ok);
  CHECK(h.run_until_idle() == 1);  // resumed on the run_queue: retry
  CHECK(h.next_due() == t0 + 10s);
  CHECK(h.advance_to_next() == t0 + 10s);  // the second attempt starts and suspends
  REQUIRE(gate.try_send(0) == postbox::send_status::ok);
  CHECK(h.run_until_idle() == 1);
  CHECK(starts == std::vector<postbox::time_point>{t0, t0 + 10s});
  CHECK(c.stats().acked == 1);
  CHECK(c.stats().retried == 1);
}

TEST_CASE("a stream's age retention and a scheduled append follow the harness clock with nothing attached for the stream",
          "[testing][harness][stream]") {
  harness h;
  postbox::stream<int> s(1, postbox::retention{0, 0, 60s}, h.get_clock());
  postbox::scheduler sched(h.get_clock(), postbox::timer_service::manual_drive);
  h.attach(sched, "scheduler");
  (void)s.append("k", 1);
  (void)sched.send_after(s, 30s, std::string("k"), 2);
  CHECK(h.advance_to_next() == postbox::manual_clock::default_start + 30s);
  CHECK(s.read(0, 0, 10).records.size() == 2);
  h.advance(31s);  // the first record is 61 s old, the second 31 s
  const auto r = s.read(0, 0, 10);
  CHECK(r.status == postbox::errc::out_of_range);
  CHECK(r.earliest == 1);
}
