// SPDX-License-Identifier: MIT
// Specification tests for postbox::consumer with coroutine handlers: suspension, max_in_flight, retries, per-key order, exceptions.
#include <postbox/consumer.hpp>
#include <postbox/async.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

using env_t = postbox::envelope<int>;

// A consumer in manual-drive mode on a manual clock, whose coroutine
// handlers resume on a run_queue the test thread drains. Each message n has
// a gate channel its handler awaits; open(n, v) lets handler n go on with v.
struct rig {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{64};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};
  postbox::run_queue rq;
  std::map<int, std::unique_ptr<postbox::channel<int>>> gates;
  std::vector<int> started;   // payloads, in the order their handlers started
  std::vector<int> finished;  // payloads, in the order their handlers completed

  [[nodiscard]] postbox::consumer_options options(std::size_t max_in_flight = 64) {
    postbox::consumer_options o;
    o.threads = 0;
    o.max_in_flight = max_in_flight;
    o.jitter_seed = 7;
    o.clock = &clock;
    o.scheduler = rq;
    o.retry.max_attempts = 3;
    o.retry.initial_backoff = 10s;
    o.retry.multiplier = 1.0;
    o.retry.full_jitter = false;
    return o;
  }
  void send(int n, std::string key = {}) {
    auto e = postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, clock);
    e.partition_key = std::move(key);
    REQUIRE(ch.try_send(std::move(e)) == postbox::send_status::ok);
    gates.emplace(n, std::make_unique<postbox::channel<int>>(4));
  }
  [[nodiscard]] postbox::channel_source<int> source() { return postbox::channel_source<int>(ch, "numbers"); }
  [[nodiscard]] postbox::channel<int>& gate(int n) { return *gates.at(n); }
  // Lets handler n continue with `v`, then runs what that resumed.
  void open(int n, int v = 0) {
    REQUIRE(gate(n).try_send(v) == postbox::send_status::ok);
    (void)rq.poll();
  }
  // The handler: records its start, awaits its gate, then settles as the
  // gate's value says (0 ack, 1 retry, 2 throw std::runtime_error, 3 throw
  // std::invalid_argument).
  [[nodiscard]] auto handler() {
    return [this](const env_t& e) -> postbox::task<postbox::settlement> {
      started.push_back(e.payload);
      auto r = co_await postbox::async_receive(gate(e.payload));
      finished.push_back(e.payload);
      const int v = r.has_value() ? *r : -1;
      if (v == 2) throw std::runtime_error("transient failure");
      if (v == 3) throw std::invalid_argument("bad input");
      co_return v == 1 ? postbox::settlement::retry() : postbox::settlement::ack();
    };
  }
};

}  // namespace

TEST_CASE("two coroutine handlers are suspended at once on one thread and both are acked", "[consumer][async]") {
  rig r;
  r.send(1);
  r.send(2);
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
  CHECK(c.poll() == 2);
  CHECK(r.started == std::vector<int>{1, 2});
  CHECK(r.finished.empty());
  CHECK(c.stats().running == 2);
  CHECK(c.stats().in_flight == 2);
  r.open(2);
  r.open(1);
  CHECK(r.finished == std::vector<int>{2, 1});
  const auto s = c.stats();
  CHECK(s.acked == 2);
  CHECK(s.running == 0);
  CHECK(s.in_flight == 0);
  CHECK(r.dlq.size() == 0);
}

TEST_CASE("a task<void> coroutine handler acks when its task completes", "[consumer][async]") {
  rig r;
  r.send(1);
  int done = 0;
  postbox::consumer<int> c(
      r.source(),
      [&](const env_t& e, postbox::consume_context& ctx) -> postbox::task<void> {
        CHECK(ctx.attempt() == 1);
        (void)co_await postbox::async_receive(r.gate(e.payload));
        ++done;
      },
      r.dlq, r.options());
  CHECK(c.poll() == 1);
  CHECK(c.stats().acked == 0);
  r.open(1);
  CHECK(done == 1);
  CHECK(c.stats().acked == 1);
}

TEST_CASE("a coroutine handler that completes without suspending is settled within poll", "[consumer][async]") {
  rig r;
  r.send(1);
  r.send(2);
  postbox::consumer<int> c(
      r.source(),
      [](const env_t& e) -> postbox::task<postbox::settlement> {
        co_return e.payload == 1 ? postbox::settlement::ack() : postbox::settlement::reject("no");
      },
      r.dlq, r.options());
  CHECK(c.poll() == 2);
  const auto s = c.stats();
  CHECK(s.acked == 1);
  CHECK(s.dead_lettered == 1);
  CHECK(s.running == 0);
  CHECK(r.rq.size_approx() == 0);
}

TEST_CASE("shutdown abandons a suspended coroutine handler, whose later ack still settles", "[consumer][async]") {
  rig r;
  r.send(1);
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
  CHECK(c.poll() == 1);
  const auto report = c.shutdown(0s);
  CHECK(report.abandoned == 1);
  CHECK(report.returned.empty());
  CHECK(c.stats().acked == 0);
  r.open(1);
  CHECK(r.finished == std::vector<int>{1});
  const auto s = c.stats();
  CHECK(s.acked == 1);
  CHECK(s.in_flight == 0);
}

TEST_CASE("a coroutine consumer without a scheduler is refused", "[consumer][async]") {
  rig r;
  auto o = r.options();
  o.scheduler = {};
  CHECK_THROWS_AS(postbox::consumer<int>(r.source(), r.handler(), r.dlq, o), postbox::error);
}

TEST_CASE("with max_in_flight 1 the second handler starts only after the first settled", "[consumer][async]") {
  rig r;
  r.send(1);
  r.send(2);
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options(1));
  CHECK(c.poll() == 1);
  CHECK(c.poll() == 0);  // the budget is held by the suspended handler
  CHECK(r.started == std::vector<int>{1});
  CHECK(c.stats().received == 1);
  r.open(1);
  CHECK(c.stats().acked == 1);
  CHECK(c.poll() == 1);
  CHECK(r.started == std::vector<int>{1, 2});
  r.open(2);
  CHECK(c.stats().acked == 2);
}

TEST_CASE("a coroutine handler that returns retry is retried on the clock's schedule", "[consumer][async]") {
  rig r;
  r.send(1);
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
  CHECK(c.poll() == 1);
  r.open(1, 1);  // retry: backoff 10 s
  CHECK(c.stats().retried == 1);
  CHECK(c.stats().waiting_retry == 1);
  r.clock.advance(9s);
  CHECK(c.poll() == 0);
  CHECK(r.started == std::vector<int>{1});
  r.clock.advance(1s);
  CHECK(c.poll() == 1);
  CHECK(r.started == std::vector<int>{1, 1});
  r.open(1, 0);
  const auto s = c.stats();
  CHECK(s.acked == 1);
  CHECK(s.started == 2);
  CHECK(s.in_flight == 0);
}

TEST_CASE("per-key order holds while a coroutine handler of that key is suspended", "[consumer][async]") {
  rig r;
  r.send(1, "k");
  r.send(2, "k");
  r.send(3, "other");
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
  CHECK(c.poll() == 2);
  CHECK(r.started == std::vector<int>{1, 3});  // 2 waits behind 1; another key proceeds
  r.open(3);
  CHECK(c.poll() == 0);
  CHECK(r.started == std::vector<int>{1, 3});
  r.open(1);
  CHECK(c.poll() == 1);
  CHECK(r.started == std::vector<int>{1, 3, 2});
  r.open(2);
  CHECK(r.finished == std::vector<int>{3, 1, 2});
  CHECK(c.stats().acked == 3);
}

TEST_CASE("a retried coroutine handler keeps the later messages of its key behind it", "[consumer][async]") {
  rig r;
  r.send(1, "k");
  r.send(2, "k");
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
  CHECK(c.poll() == 1);
  r.open(1, 1);  // retry in 10 s: the key stays parked
  CHECK(c.poll() == 0);
  CHECK(r.started == std::vector<int>{1});
  r.clock.advance(10s);
  CHECK(c.poll() == 1);
  r.open(1, 0);
  CHECK(c.poll() == 1);
  CHECK(r.started == std::vector<int>{1, 1, 2});
  r.open(2);
  CHECK(c.stats().acked == 2);
}

TEST_CASE("an exception thrown inside a coroutine handler is settled as the classifier says", "[consumer][async]") {
  rig r;
  r.send(1);
  r.send(2);
  auto o = r.options();
  o.classify = postbox::permanent_on<std::invalid_argument>();
  postbox::consumer<int> c(r.source(), r.handler(), r.dlq, o);
  CHECK(c.poll() == 2);
  r.open(1, 2);  // runtime_error: transient, retried
  r.open(2, 3);  // invalid_argument: permanent, dead-lettered now
  auto s = c.stats();
  CHECK(s.handler_errors == 2);
  CHECK(s.retried == 1);
  CHECK(s.dead_lettered == 1);
  const auto dead = r.dlq.list();
  REQUIRE(dead.size() == 1);
  CHECK(dead[0].reason == "permanent_error");
  CHECK(dead[0].error == "bad input");
  REQUIRE(dead[0].message);
  CHECK(dead[0].message->payload == 2);
  r.clock.advance(10s);
  CHECK(c.poll() == 1);
  r.open(1, 0);
  s = c.stats();
  CHECK(s.acked == 1);
  CHECK(s.in_flight == 0);
}

TEST_CASE("destroying a consumer destroys its suspended coroutine handlers and releases their messages",
          "[consumer][async]") {
  rig r;
  r.send(1);
  {
    postbox::consumer<int> c(r.source(), r.handler(), r.dlq, r.options());
    CHECK(c.poll() == 1);
    CHECK(c.stats().running == 1);
  }
  CHECK(r.finished.empty());
  // The gate's waiter was abandoned with the frame: a later message wakes nothing.
  REQUIRE(r.gate(1).try_send(0) == postbox::send_status::ok);
  CHECK(r.rq.poll() == 0);
  CHECK(r.finished.empty());
}

TEST_CASE("coroutine handlers resumed on another thread settle every message once, in key order",
          "[consumer][async]") {
  // Worker threads start the handlers, a run_queue thread resumes them; each
  // handler awaits one token from a shared channel. Nothing lost or
  // duplicated (checksum), and each key's messages complete in order.
  constexpr int n = 400;
  constexpr int keys = 8;
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{1024};
  postbox::channel<int> tokens{1024};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};
  postbox::run_queue rq;
  std::mutex mu;
  std::map<std::string, std::vector<int>> done_by_key;  // guarded by mu
  long long sum = 0;                                    // guarded by mu
  for (int i = 0; i < n; ++i) {
    auto e = postbox::make_envelope(std::string("test.int"), i, postbox::message_kind::event, clock);
    e.partition_key = "k" + std::to_string(i % keys);
    REQUIRE(ch.try_send(std::move(e)) == postbox::send_status::ok);
  }
  ch.close();
  postbox::consumer_options o;
  o.threads = 2;
  o.max_in_flight = 16;
  o.clock = &clock;
  o.scheduler = rq;
  o.receive_wait = 1ms;
  postbox::consumer<int> c(
      postbox::channel_source<int>(ch, "numbers"),
      [&](const env_t& e) -> postbox::task<void> {
        auto t = co_await postbox::async_receive(tokens);
        std::lock_guard lock(mu);
        done_by_key[e.partition_key].push_back(e.payload);
        sum += e.payload + (t.has_value() ? *t : 1'000'000);
      },
      dlq, o);
  std::jthread resumer([&](std::stop_token st) { (void)rq.run(st); });
  for (int i = 0; i < n; ++i) REQUIRE(tokens.send(0) == postbox::send_status::ok);
  const auto report = c.drain(std::chrono::hours(1));  // on the manual clock: ends when finished
  resumer.request_stop();
  resumer.join();
  CHECK(report.finished);
  CHECK(report.clean());
  const auto s = c.stats();
  CHECK(s.acked == static_cast<std::uint64_t>(n));
  CHECK(s.started == static_cast<std::uint64_t>(n));
  std::lock_guard lock(mu);
  CHECK(sum == static_cast<long long>(n) * (n - 1) / 2);
  REQUIRE(done_by_key.size() == static_cast<std::size_t>(keys));
  for (const auto& [key, seq] : done_by_key) {
    CHECK(seq.size() == static_cast<std::size_t>(n / keys));
    CHECK(std::is_sorted(seq.begin(), seq.end()));
  }
}

namespace {

// Batches of up to three messages, handed over as soon as they are ready.
postbox::batch_options batches_of_three() {
  postbox::batch_options b;
  b.max_size = 3;
  b.window = postbox::duration::zero();
  return b;
}

std::vector<int> payloads(const postbox::message_batch<int>& b) {
  std::vector<int> out;
  for (const auto& e : b) out.push_back(e.payload);
  return out;
}

// A receive-only source (adapted by the consumer) whose items carry a settle
// hook recording each action, to see what happens to messages with no
// consumer left to ask.
struct hooked_source {
  using payload_type = int;
  static constexpr bool redelivers = false;
  postbox::channel<env_t>* ch;
  std::vector<postbox::settle_action::kind>* actions;
  postbox::receive_result<postbox::inbound<int>> receive(postbox::duration) {
    auto r = ch->try_receive_result();
    if (!r.has_value()) return postbox::receive_result<postbox::inbound<int>>(postbox::receive_status::empty);
    return postbox::inbound<int>::of(std::move(*r), postbox::settle_hook([a = actions](const postbox::settle_action& x) {
                                        a->push_back(x.what);
                                      }));
  }
  [[nodiscard]] std::string_view name() const noexcept { return "hooked"; }
};

}  // namespace

TEST_CASE("a coroutine batch handler settles each message of its batch by the settlements it returns",
          "[consumer][async][batch]") {
  rig r;
  r.send(1);
  r.send(2);
  r.send(3);
  std::vector<int> seen;
  postbox::consumer<int> c(
      r.source(), batches_of_three(),
      [&](const postbox::message_batch<int>& b) -> postbox::task<std::vector<postbox::settlement>> {
        seen = payloads(b);
        (void)co_await postbox::async_receive(r.gate(b[0].payload));
        CHECK(payloads(b) == seen);  // the batch is still valid after resuming
        co_return std::vector<postbox::settlement>{postbox::settlement::ack(), postbox::settlement::retry(),
                                                   postbox::settlement::reject("no")};
      },
      r.dlq, r.options());
  CHECK(c.poll() == 3);
  CHECK(seen == std::vector<int>{1, 2, 3});
  auto s = c.stats();
  CHECK(s.batches == 1);
  CHECK(s.running == 3);
  CHECK(s.acked == 0);
  r.open(1);
  s = c.stats();
  CHECK(s.running == 0);
  CHECK(s.acked == 1);
  CHECK(s.retried == 1);
  CHECK(s.waiting_retry == 1);
  CHECK(s.dead_lettered == 1);
  const auto dead = r.dlq.list();
  REQUIRE(dead.size() == 1);
  CHECK(dead[0].reason == "no");
  REQUIRE(dead[0].message);
  CHECK(dead[0].message->payload == 3);
}

TEST_CASE("a task<void> coroutine batch handler acks its whole batch when its task completes",
          "[consumer][async][batch]") {
  rig r;
  r.send(1);
  r.send(2);
  postbox::consumer<int> c(
      r.source(), batches_of_three(),
      [&](const postbox::message_batch<int>& b) -> postbox::task<void> {
        (void)co_await postbox::async_receive(r.gate(b[0].payload));
      },
      r.dlq, r.options());
  CHECK(c.poll() == 2);
  CHECK(c.stats().acked == 0);
  r.open(1);
  const auto s = c.stats();
  CHECK(s.acked == 2);
  CHECK(s.in_flight == 0);
}

TEST_CASE("an exception thrown inside a coroutine batch handler settles every message of its batch as the classifier says",
          "[consumer][async][batch]") {
  rig r;
  for (int i = 1; i <= 6; ++i) r.send(i);
  auto o = r.options();
  o.classify = postbox::permanent_on<std::invalid_argument>();
  postbox::consumer<int> c(
      r.source(), batches_of_three(),
      [&](const postbox::message_batch<int>& b) -> postbox::task<postbox::settlement> {
        auto v = co_await postbox::async_receive(r.gate(b[0].payload));
        if (v.has_value() && *v == 2) throw std::runtime_error("transient failure");
        throw std::invalid_argument("bad batch");
      },
      r.dlq, o);
  CHECK(c.poll() == 6);
  CHECK(c.stats().batches == 2);
  r.open(1, 2);  // the batch 1, 2, 3: runtime_error, transient: each retried
  r.open(4, 3);  // the batch 4, 5, 6: invalid_argument, permanent: each dead-lettered now
  const auto s = c.stats();
  CHECK(s.handler_errors == 2);
  CHECK(s.retried == 3);
  CHECK(s.waiting_retry == 3);
  CHECK(s.dead_lettered == 3);
  const auto dead = r.dlq.list();
  REQUIRE(dead.size() == 3);
  std::vector<int> dead_payloads;
  for (const auto& d : dead) {
    CHECK(d.reason == "permanent_error");
    CHECK(d.error == "bad batch");
    REQUIRE(d.message);
    dead_payloads.push_back(d.message->payload);
  }
  std::sort(dead_payloads.begin(), dead_payloads.end());
  CHECK(dead_payloads == std::vector<int>{4, 5, 6});
}

TEST_CASE("shutdown while a coroutine batch handler is suspended abandons its messages, and its later result still settles them",
          "[consumer][async][batch]") {
  rig r;
  r.send(1);
  r.send(2);
  r.send(3);
  postbox::consumer<int> c(
      r.source(), batches_of_three(),
      [&](const postbox::message_batch<int>& b) -> postbox::task<postbox::settlement> {
        (void)co_await postbox::async_receive(r.gate(b[0].payload));
        co_return postbox::settlement::ack();
      },
      r.dlq, r.options());
  CHECK(c.poll() == 3);
  const auto report = c.shutdown(0s);
  CHECK(report.abandoned == 3);
  CHECK(report.abandoned_ids.size() == 3);
  CHECK(report.returned.empty());
  CHECK(c.stats().acked == 0);
  r.open(1);
  const auto s = c.stats();
  CHECK(s.acked == 3);
  CHECK(s.in_flight == 0);
}

TEST_CASE("a retry a coroutine batch handler returns after shutdown releases its messages to take_released",
          "[consumer][async][batch]") {
  rig r;
  r.send(1);
  r.send(2);
  postbox::consumer<int> c(
      r.source(), batches_of_three(),
      [&](const postbox::message_batch<int>& b) -> postbox::task<postbox::settlement> {
        (void)co_await postbox::async_receive(r.gate(b[0].payload));
        co_return postbox::settlement::retry();
      },
      r.dlq, r.options());
  CHECK(c.poll() == 2);
  CHECK(c.shutdown(0s).abandoned == 2);
  r.open(1);
  const auto released = c.take_released();
  REQUIRE(released.size() == 2);
  CHECK(released[0].payload + released[1].payload == 3);
  CHECK(c.stats().in_flight == 0);
}

TEST_CASE("destroying a consumer destroys its suspended coroutine batch handler once and releases each message",
          "[consumer][async][batch]") {
  rig r;
  r.send(1);
  r.send(2);
  r.send(3);
  std::vector<postbox::settle_action::kind> actions;
  int frames_destroyed = 0;
  struct on_destroy {
    int* n;
    ~on_destroy() { ++*n; }
  };
  {
    postbox::consumer<int> c(
        hooked_source{&r.ch, &actions}, batches_of_three(),
        [&](const postbox::message_batch<int>& b) -> postbox::task<void> {
          on_destroy guard{&frames_destroyed};
          (void)co_await postbox::async_receive(r.gate(b[0].payload));
          FAIL_CHECK("the abandoned batch handler resumed");
        },
        r.dlq, r.options());
    CHECK(c.poll() == 3);
    CHECK(c.stats().running == 3);
    CHECK(frames_destroyed == 0);
  }
  CHECK(frames_destroyed == 1);
  CHECK(actions == std::vector<postbox::settle_action::kind>(3, postbox::settle_action::kind::release));
  // The gate's waiter went with the frame: a later value wakes nothing.
  REQUIRE(r.gate(1).try_send(0) == postbox::send_status::ok);
  CHECK(r.rq.poll() == 0);
}

TEST_CASE("a coroutine batch consumer without a scheduler is refused", "[consumer][async][batch]") {
  rig r;
  auto o = r.options();
  o.scheduler = {};
  auto handler = [](const postbox::message_batch<int>&) -> postbox::task<void> { co_return; };
  CHECK_THROWS_AS(postbox::consumer<int>(r.source(), batches_of_three(), handler, r.dlq, o), postbox::error);
}
