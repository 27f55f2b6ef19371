// SPDX-License-Identifier: MIT
// Tests for postbox::async_select: the awaitable select over channels, timers, deadline and stop token.
#include <postbox/async.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox_test::eventually;
using postbox_test::scaled;

namespace {

template <class Task>
bool drive_until_done(postbox::run_queue& q, Task& t) {
  return eventually([&] {
    q.poll();
    return t.done();
  });
}

/// Which case fired and what it received.
struct picked {
  postbox::select_result result;
  int from_a = 0;
  int from_b = 0;
};

/// Selects over a receive on `a` and one on `b`.
postbox::task<picked> receive_either(postbox::channel<int>& a, postbox::channel<int>& b) {
  picked p;
  p.result = co_await postbox::async_select(postbox::on_receive(a, [&](int v) { p.from_a = v; }),
                                            postbox::on_receive(b, [&](int v) { p.from_b = v; }));
  co_return p;
}

/// The same, with a timer service, its options (deadline, stop) and an after case.
postbox::task<picked> receive_either_or_after(postbox::timer_service& timers, postbox::select_options opts,
                                              postbox::channel<int>& a, postbox::channel<int>& b,
                                              postbox::duration delay, bool* timer_fired) {
  picked p;
  p.result = co_await postbox::async_select(timers, opts, postbox::on_receive(a, [&](int v) { p.from_a = v; }),
                                            postbox::on_receive(b, [&](int v) { p.from_b = v; }),
                                            postbox::after(delay, [&] { *timer_fired = true; }));
  co_return p;
}

/// A pool of threads running one run_queue.
class pool {
 public:
  explicit pool(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this](std::stop_token st) { q.run(st); });
  }
  ~pool() {
    for (auto& t : threads_) t.request_stop();
  }
  postbox::run_queue q;

 private:
  std::vector<std::jthread> threads_;
};

}  // namespace

TEST_CASE("async_select completes a ready case without suspending and leaves the other channel alone",
          "[async][select]") {
  postbox::channel<int> a(2);
  postbox::channel<int> b(2);
  REQUIRE(a.try_send(7) == postbox::send_status::ok);
  postbox::run_queue q;
  auto t = receive_either(a, b);
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(q.size_approx() == 0);
  auto p = t.get();
  REQUIRE(p.result.ok());
  REQUIRE(p.result.index == 0);
  REQUIRE(p.from_a == 7);
  REQUIRE(p.from_b == 0);
}

TEST_CASE("a suspended async_select resumes with the case whose channel a blocking thread sends to",
          "[async][select]") {
  postbox::channel<int> a(2);
  postbox::channel<int> b(2);
  postbox::run_queue q;
  const bool second = GENERATE(false, true);
  auto t = receive_either(a, b);
  t.start(q);
  REQUIRE_FALSE(t.done());
  std::thread sender([&] { (void)(second ? b : a).send(42); });
  REQUIRE(drive_until_done(q, t));
  sender.join();
  auto p = t.get();
  REQUIRE(p.result.ok());
  REQUIRE(p.result.index == (second ? 1u : 0u));
  REQUIRE((second ? p.from_b : p.from_a) == 42);
  REQUIRE((second ? p.from_a : p.from_b) == 0);
  REQUIRE(a.size_approx() == 0);
  REQUIRE(b.size_approx() == 0);
}

TEST_CASE("an async_select send case sends only when chosen and a receive case takes nothing then",
          "[async][select]") {
  postbox::channel<int> out(1);
  postbox::channel<int> in(1);
  REQUIRE(out.try_send(1) == postbox::send_status::ok);
  postbox::run_queue q;
  int value = 2;
  bool sent = false;
  bool received = false;
  auto body = [&]() -> postbox::task<postbox::select_result> {
    co_return co_await postbox::async_select(postbox::on_send(out, value, [&] { sent = true; }),
                                             postbox::on_receive(in, [&](int) { received = true; }));
  };
  auto t = body();
  t.start(q);
  REQUIRE_FALSE(t.done());
  REQUIRE(out.try_receive() == 1);  // makes room: the send case can complete
  REQUIRE(drive_until_done(q, t));
  const auto r = t.get();
  REQUIRE(r.ok());
  REQUIRE(r.index == 0);
  REQUIRE(sent);
  REQUIRE_FALSE(received);
  REQUIRE(out.try_receive() == 2);
  REQUIRE(in.try_send(3) == postbox::send_status::ok);
  REQUIRE(in.try_receive() == 3);  // the finished select withdrew its waker from `in`
}

TEST_CASE("an after case fires when the timer service runs its timer on a manual clock", "[async][select][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  bool fired = false;
  postbox::select_options opts;
  opts.clock = &clock;
  auto t = receive_either_or_after(timers, opts, a, b, 10s, &fired);
  t.start(q);
  REQUIRE_FALSE(t.done());
  REQUIRE(timers.pending() == 1);
  clock.advance(9s);
  timers.run_due();
  q.poll();
  REQUIRE_FALSE(t.done());
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(drive_until_done(q, t));
  const auto p = t.get();
  REQUIRE(p.result.ok());
  REQUIRE(p.result.index == 2);
  REQUIRE(fired);
  REQUIRE(timers.pending() == 0);
}

TEST_CASE("a ticker case fires with the tick's time on the timer service's clock", "[async][select][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> a(1);
  postbox::ticker tk(5s, clock);
  postbox::run_queue q;
  std::optional<postbox::time_point> tick_at;
  const auto start = clock.now();
  auto body = [&]() -> postbox::task<postbox::select_result> {
    co_return co_await postbox::async_select(timers, postbox::select_options{},
                                             postbox::on_receive(a, [](int) {}),
                                             postbox::on_receive(tk, [&](postbox::time_point at) { tick_at = at; }));
  };
  auto t = body();
  t.start(q);
  REQUIRE_FALSE(t.done());
  clock.advance(5s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get().index == 1);
  REQUIRE(tick_at == start + 5s);
}

TEST_CASE("the deadline ends a suspended async_select with timeout and consumes nothing", "[async][select][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  bool fired = false;
  postbox::select_options opts;
  opts.deadline = clock.now() + 3s;
  auto t = receive_either_or_after(timers, opts, a, b, 1h, &fired);
  t.start(q);
  REQUIRE_FALSE(t.done());
  clock.advance(3s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(drive_until_done(q, t));
  const auto p = t.get();
  REQUIRE(p.result.status == postbox::select_status::timeout);
  REQUIRE_FALSE(fired);
  REQUIRE(timers.pending() == 0);  // the after case's timer is withdrawn too
  REQUIRE(a.try_send(1) == postbox::send_status::ok);
  REQUIRE(a.try_receive() == 1);
}

TEST_CASE("a stop request cancels a suspended async_select, which consumes and sends nothing", "[async][select]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> in(1);
  postbox::channel<int> out(1);
  REQUIRE(out.try_send(0) == postbox::send_status::ok);
  postbox::run_queue q;
  std::stop_source stop;
  postbox::select_options opts;
  opts.stop = stop.get_token();
  int value = 5;
  bool ran = false;
  auto body = [&]() -> postbox::task<postbox::select_result> {
    co_return co_await postbox::async_select(timers, opts, postbox::on_receive(in, [&](int) { ran = true; }),
                                             postbox::on_send(out, value, [&] { ran = true; }));
  };
  auto t = body();
  t.start(q);
  REQUIRE_FALSE(t.done());
  stop.request_stop();
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get().status == postbox::select_status::canceled);
  REQUIRE_FALSE(ran);
  REQUIRE(value == 5);
  REQUIRE(out.try_receive() == 0);
  REQUIRE(out.size_approx() == 0);
  REQUIRE(in.try_send(1) == postbox::send_status::ok);
  q.poll();
  REQUIRE(in.try_receive() == 1);
}

TEST_CASE("a closed channel ends async_select with closed for its case and runs no handler", "[async][select]") {
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  auto t = receive_either(a, b);
  t.start(q);
  REQUIRE_FALSE(t.done());
  b.close();
  REQUIRE(drive_until_done(q, t));
  const auto p = t.get();
  REQUIRE(p.result.status == postbox::select_status::closed);
  REQUIRE(p.result.index == 1);
  REQUIRE(p.from_a == 0);
  REQUIRE(p.from_b == 0);
}

TEST_CASE("destroying a suspended async_select frame withdraws its wakers and timer", "[async][select][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  bool fired = false;
  {
    auto t = receive_either_or_after(timers, postbox::select_options{}, a, b, 1s, &fired);
    t.start(q);
    REQUIRE_FALSE(t.done());
    REQUIRE(timers.pending() == 1);
  }
  REQUIRE(timers.pending() == 0);
  REQUIRE(a.try_send(1) == postbox::send_status::ok);
  REQUIRE(b.try_send(2) == postbox::send_status::ok);
  clock.advance(1s);
  timers.run_due();
  REQUIRE(q.poll() == 0);
  REQUIRE_FALSE(fired);
  REQUIRE(a.try_receive() == 1);
  REQUIRE(b.try_receive() == 2);
}

TEST_CASE("destroying an async_select frame whose resumption is queued never resumes it", "[async][select]") {
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  {
    auto t = receive_either(a, b);
    t.start(q);
    REQUIRE(a.try_send(1) == postbox::send_status::ok);
    REQUIRE(q.size_approx() == 1);
  }
  REQUIRE(q.poll() == 1);  // runs the canceled token: nothing happens
  REQUIRE(a.try_receive() == 1);
}

TEST_CASE("a handler's exception propagates from co_await async_select after its case completed",
          "[async][select]") {
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  postbox::run_queue q;
  auto body = [&]() -> postbox::task<int> {
    try {
      (void)co_await postbox::async_select(postbox::on_receive(a, [](int) { throw std::runtime_error("boom"); }),
                                           postbox::on_receive(b, [](int) {}));
    } catch (const std::runtime_error&) {
      co_return 1;
    }
    co_return 0;
  };
  auto t = body();
  t.start(q);
  REQUIRE(a.try_send(9) == postbox::send_status::ok);
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get() == 1);
  REQUIRE(a.size_approx() == 0);
}

TEST_CASE("async_select rotates between cases that are both ready", "[async][select]") {
  postbox::channel<int> a(64);
  postbox::channel<int> b(64);
  for (int i = 0; i < 32; ++i) {
    REQUIRE(a.try_send(i) == postbox::send_status::ok);
    REQUIRE(b.try_send(i) == postbox::send_status::ok);
  }
  postbox::run_queue q;
  int from_a = 0;
  int from_b = 0;
  for (int i = 0; i < 32; ++i) {
    auto t = receive_either(a, b);
    t.start(q);
    REQUIRE(t.done());
    const auto p = t.get();
    (p.result.index == 0 ? from_a : from_b) += 1;
  }
  REQUIRE(from_a >= 8);
  REQUIRE(from_b >= 8);
}

TEST_CASE("a select_options clock other than the timer service's is rejected", "[async][select][timer]") {
  postbox::manual_clock clock;
  postbox::manual_clock other;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> a(1);
  postbox::select_options opts;
  opts.clock = &other;
  REQUIRE_THROWS_AS(postbox::async_select(timers, opts, postbox::on_receive(a, [](int) {})), postbox::error);
}

TEST_CASE("async_select cancel racing delivery: every message is taken once or left in its channel",
          "[async][select][stress]") {
  const int rounds = static_cast<int>(scaled(2000));
  postbox::channel<int> a(4);
  postbox::channel<int> b(4);
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  std::int64_t taken = 0;
  std::int64_t left = 0;
  int canceled = 0;
  for (int i = 1; i <= rounds; ++i) {
    std::stop_source stop;
    postbox::select_options opts;
    opts.stop = stop.get_token();
    std::int64_t got = 0;
    int handled = 0;
    auto body = [&]() -> postbox::task<postbox::select_result> {
      co_return co_await postbox::async_select(timers, opts, postbox::on_receive(a, [&](int v) { got += v; ++handled; }),
                                               postbox::on_receive(b, [&](int v) { got += v; ++handled; }));
    };
    auto t = body();
    t.start(q);
    std::thread sender([&] { REQUIRE(((i % 2) != 0 ? a : b).try_send(i) == postbox::send_status::ok); });
    std::thread stopper([&] { stop.request_stop(); });
    sender.join();
    stopper.join();
    REQUIRE(drive_until_done(q, t));
    const auto r = t.get();
    if (r.ok()) {
      REQUIRE(handled == 1);
      taken += got;
    } else {
      REQUIRE(r.status == postbox::select_status::canceled);
      REQUIRE(handled == 0);
      ++canceled;
    }
    while (auto v = a.try_receive()) left += *v;
    while (auto v = b.try_receive()) left += *v;
  }
  REQUIRE(taken + left == static_cast<std::int64_t>(rounds) * (rounds + 1) / 2);
  REQUIRE(q.size_approx() == 0);
  INFO("canceled " << canceled << " of " << rounds);
}

TEST_CASE("coroutine selectors on a pool and blocking senders on two channels lose and duplicate nothing",
          "[async][select][stress]") {
  const int per_sender = static_cast<int>(scaled(20000));
  constexpr int selectors = 3;
  postbox::channel<int> a(8);
  postbox::channel<int> b(8);
  std::atomic<std::int64_t> sum{0};
  std::atomic<int> count{0};
  std::vector<postbox::task<void>> tasks;
  {
    pool p(2);
    auto selector = [&]() -> postbox::task<void> {
      for (;;) {
        const auto r = co_await postbox::async_select(
            postbox::on_receive(a, [&](int v) { sum.fetch_add(v, std::memory_order_relaxed); count.fetch_add(1); }),
            postbox::on_receive(b, [&](int v) { sum.fetch_add(v, std::memory_order_relaxed); count.fetch_add(1); }));
        if (r.status == postbox::select_status::closed) {
          // One channel is closed and drained: finish the other one.
          auto& rest = r.index == 0 ? b : a;
          for (;;) {
            auto m = co_await postbox::async_receive(rest);
            if (!m.has_value()) co_return;
            sum.fetch_add(*m, std::memory_order_relaxed);
            count.fetch_add(1);
          }
        }
      }
    };
    for (int i = 0; i < selectors; ++i) tasks.push_back(selector());
    for (auto& t : tasks) t.start(p.q);
    std::thread sa([&] {
      for (int i = 1; i <= per_sender; ++i) (void)a.send(i);
      a.close();
    });
    std::thread sb([&] {
      for (int i = 1; i <= per_sender; ++i) (void)b.send(-i * 2);
      b.close();
    });
    sa.join();
    sb.join();
    REQUIRE(eventually([&] {
      for (auto& t : tasks)
        if (!t.done()) return false;
      return true;
    }));
  }
  const std::int64_t n = per_sender;
  REQUIRE(count.load() == 2 * per_sender);
  REQUIRE(sum.load() == n * (n + 1) / 2 - n * (n + 1));
}

// --- topic subscription cases ------------------------------------------------------

namespace {

/// What a select over a subscription and a channel picked.
struct picked_sub {
  postbox::select_result result;
  int from_sub = 0;
  int from_channel = 0;
};

/// Selects over a receive on `sub` (case 0) and one on `ch` (case 1).
postbox::task<picked_sub> receive_sub_or_channel(postbox::subscription<int>& sub, postbox::channel<int>& ch) {
  picked_sub p;
  p.result = co_await postbox::async_select(postbox::on_receive(sub, [&](postbox::delivery<int> d) { p.from_sub = *d; }),
                                            postbox::on_receive(ch, [&](int v) { p.from_channel = v; }));
  co_return p;
}

}  // namespace

TEST_CASE("an async_select subscription case takes a published message and the channel case takes nothing",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  REQUIRE(topic.publish(5).delivered == 1);
  postbox::run_queue q;
  auto t = receive_sub_or_channel(sub, ch);
  t.start(q);
  REQUIRE(t.done());  // ready at once: no suspension
  auto p = t.get();
  REQUIRE(p.result.ok());
  REQUIRE(p.result.index == 0);
  REQUIRE(p.from_sub == 5);
  REQUIRE(p.from_channel == 0);
  REQUIRE_FALSE(sub.try_receive().has_value());
}

TEST_CASE("a suspended async_select resumes with the subscription or the channel a blocking thread feeds",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  postbox::run_queue q;
  const bool publish = GENERATE(true, false);
  auto t = receive_sub_or_channel(sub, ch);
  t.start(q);
  REQUIRE_FALSE(t.done());
  std::thread feeder([&] {
    if (publish) {
      (void)topic.publish(42);
    } else {
      (void)ch.send(42);
    }
  });
  REQUIRE(drive_until_done(q, t));
  feeder.join();
  auto p = t.get();
  REQUIRE(p.result.ok());
  REQUIRE(p.result.index == (publish ? 0u : 1u));
  REQUIRE((publish ? p.from_sub : p.from_channel) == 42);
  REQUIRE((publish ? p.from_channel : p.from_sub) == 0);
  REQUIRE_FALSE(sub.try_receive().has_value());
  REQUIRE(ch.size_approx() == 0);
  // The finished select withdrew its wakers: a later message stays queued.
  REQUIRE(topic.publish(7).delivered == 1);
  REQUIRE(q.size_approx() == 0);
  REQUIRE(**sub.try_receive() == 7);
}

TEST_CASE("resetting a subscription wakes an async_select waiting on it with closed for that case",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  // A group member's reset leaves the group's queue open for the other
  // member: only the handle's detach wakes the select then.
  const bool grouped = GENERATE(false, true);
  postbox::subscription_options opts;
  if (grouped) opts.group = "g";
  auto other = topic.subscribe(opts);
  auto sub = topic.subscribe(opts);
  postbox::channel<int> ch(2);
  postbox::run_queue q;
  auto t = receive_sub_or_channel(sub, ch);
  t.start(q);
  REQUIRE_FALSE(t.done());
  std::thread resetter([&] { sub.reset(); });  // must not wait for the suspended coroutine
  resetter.join();
  REQUIRE(drive_until_done(q, t));
  auto p = t.get();
  REQUIRE(p.result.status == postbox::select_status::closed);
  REQUIRE(p.result.index == 0);
  REQUIRE(p.from_sub == 0);
  REQUIRE(p.from_channel == 0);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  REQUIRE(ch.try_receive() == 1);  // the channel case took nothing and left no waker behind
  REQUIRE(topic.publish(4).delivered == 1);
  REQUIRE(**other.try_receive() == 4);  // the remaining subscriber (or group member) gets it
}

TEST_CASE("destroying the topic while an async_select waits on its subscription ends it with closed",
          "[async][select][topic]") {
  auto topic = std::make_unique<postbox::topic<int>>();
  auto sub = topic->subscribe();
  postbox::channel<int> ch(2);
  postbox::run_queue q;
  auto t = receive_sub_or_channel(sub, ch);
  t.start(q);
  REQUIRE_FALSE(t.done());
  std::thread destroyer([&] { topic.reset(); });
  destroyer.join();
  REQUIRE(drive_until_done(q, t));
  auto p = t.get();
  REQUIRE(p.result.status == postbox::select_status::closed);
  REQUIRE(p.result.index == 0);
  REQUIRE(p.from_channel == 0);
}

TEST_CASE("an async_select drains what a closed topic queued before its subscription case reports closed",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  REQUIRE(topic.publish(1).delivered == 1);
  REQUIRE(topic.publish(2).delivered == 1);
  topic.close();
  postbox::run_queue q;
  std::vector<int> got;
  for (int i = 0; i < 3; ++i) {
    auto t = receive_sub_or_channel(sub, ch);
    t.start(q);
    REQUIRE(t.done());
    auto p = t.get();
    REQUIRE(p.result.index == 0);
    if (!p.result.ok()) {
      REQUIRE(p.result.status == postbox::select_status::closed);
      break;
    }
    got.push_back(p.from_sub);
  }
  REQUIRE(got == std::vector<int>{1, 2});
}

TEST_CASE("an async_select on a subscription reset before the call reports closed at once",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  sub.reset();
  postbox::run_queue q;
  auto t = receive_sub_or_channel(sub, ch);
  t.start(q);
  REQUIRE(t.done());
  auto p = t.get();
  REQUIRE(p.result.status == postbox::select_status::closed);
  REQUIRE(p.result.index == 0);
}

TEST_CASE("a stop request cancels an async_select waiting on a subscription and consumes nothing",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  std::stop_source stop;
  postbox::select_options opts;
  opts.stop = stop.get_token();
  int handled = 0;
  auto body = [&]() -> postbox::task<postbox::select_result> {
    co_return co_await postbox::async_select(timers, opts,
                                             postbox::on_receive(sub, [&](postbox::delivery<int>) { ++handled; }),
                                             postbox::on_receive(ch, [&](int) { ++handled; }));
  };
  auto t = body();
  t.start(q);
  REQUIRE_FALSE(t.done());
  std::thread stopper([&] { stop.request_stop(); });
  stopper.join();
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get().status == postbox::select_status::canceled);
  REQUIRE(handled == 0);
  REQUIRE(topic.publish(3).delivered == 1);
  REQUIRE(**sub.try_receive() == 3);
}

TEST_CASE("destroying a suspended async_select frame withdraws its subscription registration",
          "[async][select][topic]") {
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(2);
  postbox::run_queue q;
  {
    auto t = receive_sub_or_channel(sub, ch);
    t.start(q);
    REQUIRE_FALSE(t.done());
  }
  REQUIRE(topic.publish(9).delivered == 1);
  REQUIRE(q.size_approx() == 0);  // nothing left registered to wake
  REQUIRE(**sub.try_receive() == 9);
  sub.reset();  // returns: the destroyed select holds no call on the handle
}

TEST_CASE("topic publishers and a channel sender feed selecting coroutines: every subscription gets every "
          "message once and the channel's messages are taken once",
          "[async][select][topic][stress]") {
  const int per_publisher = static_cast<int>(scaled(5000));
  const int channel_messages = static_cast<int>(scaled(10000));
  constexpr int publishers = 2;
  constexpr int selectors = 3;
  postbox::topic<int> topic;
  postbox::channel<int> ch(8);
  std::vector<postbox::subscription<int>> subs;
  for (int i = 0; i < selectors; ++i) subs.push_back(topic.subscribe({.capacity = 16}));
  struct tally {
    std::int64_t sub_sum = 0;
    int sub_count = 0;
    bool sub_in_order = true;
    int last[publishers] = {0, 0};  // per publisher: the last sequence number seen
    std::int64_t channel_sum = 0;
    int channel_count = 0;
  };
  std::vector<tally> tallies(selectors);
  std::vector<postbox::task<void>> tasks;
  {
    pool p(2);
    // A message from publisher k carries k + publishers * sequence (sequence from 1).
    auto selector = [&](postbox::subscription<int>& sub, tally& tl) -> postbox::task<void> {
      auto on_delivery = [&tl](postbox::delivery<int> d) {
        const int v = *d;
        const int k = v % publishers;
        const int seq = v / publishers;
        if (seq <= tl.last[k]) tl.sub_in_order = false;
        tl.last[k] = seq;
        tl.sub_sum += v;
        ++tl.sub_count;
      };
      auto on_message = [&tl](int v) {
        tl.channel_sum += v;
        ++tl.channel_count;
      };
      for (;;) {
        const auto r = co_await postbox::async_select(postbox::on_receive(sub, on_delivery),
                                                      postbox::on_receive(ch, on_message));
        if (r.status != postbox::select_status::closed) continue;
        if (r.index == 0) {  // the topic is closed and this subscription drained: finish the channel
          for (;;) {
            auto m = co_await postbox::async_receive(ch);
            if (!m.has_value()) co_return;
            on_message(*m);
          }
        }
        for (;;) {  // the channel is closed and drained: finish the subscription
          auto d = co_await postbox::async_receive(sub);
          if (!d.has_value()) co_return;
          on_delivery(std::move(*d));
        }
      }
    };
    for (int i = 0; i < selectors; ++i) tasks.push_back(selector(subs[static_cast<std::size_t>(i)],
                                                                 tallies[static_cast<std::size_t>(i)]));
    for (auto& t : tasks) t.start(p.q);
    std::atomic<int> failed_sends{0};  // checked below: Catch2 assertions stay on this thread
    std::vector<std::thread> feeders;
    for (int k = 0; k < publishers; ++k) {
      feeders.emplace_back([&, k] {
        for (int s = 1; s <= per_publisher; ++s)
          if (topic.publish(k + publishers * s).delivered != selectors) failed_sends.fetch_add(1);
      });
    }
    feeders.emplace_back([&] {
      for (int i = 1; i <= channel_messages; ++i)
        if (ch.send(i) != postbox::send_status::ok) failed_sends.fetch_add(1);
      ch.close();
    });
    for (int k = 0; k < publishers; ++k) feeders[static_cast<std::size_t>(k)].join();
    topic.close();
    feeders.back().join();
    REQUIRE(failed_sends.load() == 0);
    REQUIRE(eventually([&] {
      for (auto& t : tasks)
        if (!t.done()) return false;
      return true;
    }));
  }
  std::int64_t published_sum = 0;
  for (int k = 0; k < publishers; ++k)
    for (int s = 1; s <= per_publisher; ++s) published_sum += k + publishers * s;
  std::int64_t channel_sum = 0;
  int channel_count = 0;
  for (const tally& tl : tallies) {
    REQUIRE(tl.sub_count == publishers * per_publisher);
    REQUIRE(tl.sub_sum == published_sum);
    REQUIRE(tl.sub_in_order);
    channel_sum += tl.channel_sum;
    channel_count += tl.channel_count;
  }
  const std::int64_t n = channel_messages;
  REQUIRE(channel_count == channel_messages);
  REQUIRE(channel_sum == n * (n + 1) / 2);
}
