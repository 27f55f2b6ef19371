// SPDX-License-Identifier: MIT
// Tests of postbox::scheduler: send_at / send_after with cancel and reschedule, driven by postbox::testing::harness.
#include <postbox/scheduler.hpp>
#include <postbox/testing.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::schedule_state;

namespace {
// A manual-drive scheduler attached to a harness: `h.advance(d)` moves the
// clock and runs each delivery at its own due time; `clock.advance` alone
// moves time without running anything.
struct fixture {
  explicit fixture(postbox::scheduler_options options = {})
      : sched(h.get_clock(), postbox::timer_service::manual_drive, options) {
    h.attach(sched, "scheduler");
  }
  postbox::testing::harness h;
  postbox::manual_clock& clock = h.get_clock();
  postbox::scheduler sched;
  postbox::time_point t0 = h.now();
};
}  // namespace

TEST_CASE("send_at delivers exactly at its due time and not a nanosecond before", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_at(ch, f.t0 + 5s, 42);
  CHECK(h.due() == f.t0 + 5s);
  f.h.advance(5s - 1ns);
  CHECK_FALSE(ch.try_receive().has_value());
  CHECK(h.state() == schedule_state::pending);
  f.h.advance(1ns);
  CHECK(ch.try_receive() == 42);
  CHECK(h.state() == schedule_state::delivered);
  CHECK(f.sched.stats().delivered == 1);
  CHECK(f.sched.stats().pending == 0);
}

TEST_CASE("send_after measures the delay on the scheduler's clock", "[scheduler]") {
  fixture f;
  postbox::channel<std::string> ch(4);
  f.clock.advance(1h);
  auto h = postbox::send_after(f.sched, ch, 10s, std::string("ping"));
  CHECK(h.due() == f.t0 + 1h + 10s);
  f.h.advance(9s);
  CHECK(ch.size_approx() == 0);
  f.h.advance(1s);
  CHECK(ch.try_receive() == std::string("ping"));
}

TEST_CASE("a canceled message is never delivered, even when its due time passes", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_after(ch, 1s, 7);
  CHECK(h.cancel());
  CHECK(h.state() == schedule_state::canceled);
  f.h.advance(10s);
  CHECK_FALSE(ch.try_receive().has_value());
  CHECK_FALSE(h.cancel());  // only the first cancel wins
  CHECK(f.sched.stats().canceled == 1);
  CHECK(f.sched.stats().pending == 0);
}

TEST_CASE("cancel after delivery returns false", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_after(ch, 1s, 7);
  f.h.advance(1s);
  CHECK_FALSE(h.cancel());
  CHECK(h.state() == schedule_state::delivered);
  CHECK(ch.try_receive() == 7);
}

TEST_CASE("a message that is due but whose timer has not run yet can still be canceled", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_after(ch, 1s, 7);
  f.clock.advance(2s);  // due, not yet run
  CHECK(h.cancel());
  CHECK(f.sched.run_due() == 0);  // the canceled timer is gone
  CHECK_FALSE(ch.try_receive().has_value());
}

TEST_CASE("reschedule moves the due time later and the old time delivers nothing", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_at(ch, f.t0 + 5s, 1);
  CHECK(h.reschedule(f.t0 + 20s));
  CHECK(h.due() == f.t0 + 20s);
  f.h.advance(5s);
  CHECK_FALSE(ch.try_receive().has_value());
  f.h.advance(15s - 1ns);
  CHECK_FALSE(ch.try_receive().has_value());
  f.h.advance(1ns);
  CHECK(ch.try_receive() == 1);
  CHECK_FALSE(ch.try_receive().has_value());  // exactly once
  CHECK(f.sched.stats().rescheduled == 1);
}

TEST_CASE("reschedule moves the due time earlier", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_at(ch, f.t0 + 1h, 1);
  CHECK(h.reschedule_after(2s));
  f.h.advance(2s);
  CHECK(ch.try_receive() == 1);
  f.h.advance(1h);
  CHECK_FALSE(ch.try_receive().has_value());
}

TEST_CASE("reschedule after delivery or cancel returns false", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto a = f.sched.send_after(ch, 1s, 1);
  auto b = f.sched.send_after(ch, 1s, 2);
  CHECK(b.cancel());
  f.h.advance(1s);
  CHECK_FALSE(a.reschedule(f.t0 + 1h));
  CHECK_FALSE(b.reschedule(f.t0 + 1h));
}

TEST_CASE("a full channel at due time is retried with backoff without blocking, and stays cancelable", "[scheduler]") {
  fixture f({.retry_initial = 10ms, .retry_max = 40ms, .max_retries = 0});
  postbox::channel<int> ch(1);
  REQUIRE(ch.try_send(0) == postbox::send_status::ok);
  auto h = f.sched.send_after(ch, 1s, 1);
  CHECK(f.h.advance(1s) == 1);  // tried once, found full, returned
  CHECK(h.state() == schedule_state::pending);
  CHECK(f.sched.stats().retried == 1);
  CHECK(f.h.next_due() == f.t0 + 1s + 10ms);
  CHECK(f.h.advance_to_next() == f.t0 + 1s + 10ms);  // second try, still full: next in 20 ms
  CHECK(f.h.next_due() == f.t0 + 1s + 30ms);
  CHECK(ch.try_receive() == 0);  // room now
  CHECK(f.h.advance_to_next() == f.t0 + 1s + 30ms);
  CHECK(ch.try_receive() == 1);
  CHECK(h.state() == schedule_state::delivered);
  CHECK(f.sched.stats().retried == 2);

  // Between retries a cancel still wins.
  REQUIRE(ch.try_send(0) == postbox::send_status::ok);
  auto g = f.sched.send_after(ch, 1s, 2);
  f.h.advance(1s);
  CHECK(g.state() == schedule_state::pending);
  CHECK(g.cancel());
  CHECK(f.h.next_due() == postbox::time_point::max());  // the retry timer went with it
  CHECK(ch.try_receive() == 0);
  f.h.advance(1s);
  CHECK_FALSE(ch.try_receive().has_value());
}

TEST_CASE("a message out of retries on a full channel is dropped and counted", "[scheduler]") {
  fixture f({.retry_initial = 1ms, .retry_max = 1ms, .max_retries = 2});
  postbox::channel<int> ch(1);
  REQUIRE(ch.try_send(0) == postbox::send_status::ok);
  auto h = f.sched.send_after(ch, 1s, 1);
  std::vector<postbox::time_point> tries;
  while (auto t = f.h.advance_to_next()) tries.push_back(*t);
  CHECK(tries == std::vector<postbox::time_point>{f.t0 + 1s, f.t0 + 1001ms, f.t0 + 1002ms});
  CHECK(h.state() == schedule_state::dropped);
  CHECK(f.sched.stats().dropped_full == 1);
  CHECK(f.sched.stats().retried == 3);
  CHECK_FALSE(h.cancel());
}

TEST_CASE("a closed channel at due time drops the message and counts it", "[scheduler]") {
  fixture f;
  postbox::channel<int> ch(4);
  auto h = f.sched.send_after(ch, 1s, 1);
  ch.close();
  f.h.advance(1s);
  CHECK(h.state() == schedule_state::dropped);
  CHECK(f.sched.stats().dropped_closed == 1);
  CHECK(f.sched.stats().delivered == 0);
}

TEST_CASE("send_at publishes on a topic at its due time, with or without a subject", "[scheduler]") {
  fixture f;
  postbox::topic<std::string> tp;
  auto all = tp.subscribe();
  auto orders = tp.subscribe("orders.*");
  (void)f.sched.send_after(tp, 1s, std::string("hello"));
  (void)f.sched.send_after(tp, 2s, std::string("orders.created"), std::string("o-1"));
  f.h.advance(1s);
  auto d = all.try_receive();
  REQUIRE(d.has_value());
  CHECK(**d == "hello");
  CHECK_FALSE(orders.try_receive().has_value());
  f.h.advance(1s);
  auto o = orders.try_receive();
  REQUIRE(o.has_value());
  CHECK(**o == "o-1");
  CHECK_THROWS_AS(f.sched.send_after(tp, 1s, std::string("bad..subject"), std::string("x")), postbox::error);
}

TEST_CASE("a closed topic at due time drops the message and counts it", "[scheduler]") {
  fixture f;
  postbox::topic<int> tp;
  auto sub = tp.subscribe();
  auto h = f.sched.send_after(tp, 1s, 5);
  tp.close();
  f.h.advance(1s);
  CHECK(h.state() == schedule_state::dropped);
  CHECK(f.sched.stats().dropped_closed == 1);
}

TEST_CASE("send_at appends to a stream under its key at its due time", "[scheduler]") {
  fixture f;
  postbox::stream<int> s(1, {}, f.clock);
  auto h = f.sched.send_at(s, f.t0 + 3s, std::string("k"), 9);
  f.h.advance(2s);
  CHECK(s.end_offset(0) == 0);
  f.h.advance(1s);
  REQUIRE(s.end_offset(0) == 1);
  auto r = s.read(0, 0, 10);
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value == 9);
  CHECK(r.records[0].key == "k");
  CHECK(h.state() == schedule_state::delivered);
}

TEST_CASE("call_at runs a revocable callback at its due time", "[scheduler]") {
  fixture f;
  int ran = 0;
  auto a = f.sched.call_after(1s, [&] { ++ran; });
  auto b = f.sched.call_after(1s, [&] { ran += 100; });
  CHECK(b.cancel());
  f.h.advance(1s);
  CHECK(ran == 1);
  CHECK_FALSE(a.cancel());
}

TEST_CASE("a handle that outlives its scheduler cancels nothing deliverable and cannot reschedule", "[scheduler]") {
  postbox::manual_clock clock;
  postbox::channel<int> ch(4);
  postbox::scheduled h;
  {
    postbox::scheduler sched(clock, postbox::timer_service::manual_drive);
    h = sched.send_after(ch, 1s, 1);
  }
  CHECK_FALSE(h.reschedule(clock.now()));
  CHECK(h.cancel());  // it will never be delivered
  CHECK_FALSE(ch.try_receive().has_value());
  postbox::scheduled empty;
  CHECK_FALSE(empty.cancel());
  CHECK_FALSE(empty.reschedule(clock.now()));
}

TEST_CASE("a move-only message is delivered through a scheduled send", "[scheduler]") {
  fixture f;
  postbox::channel<std::unique_ptr<int>> ch(2);
  (void)f.sched.send_after(ch, 1s, std::make_unique<int>(3));
  f.h.advance(1s);
  auto v = ch.try_receive();
  REQUIRE(v.has_value());
  CHECK(**v == 3);
}

TEST_CASE("the scheduler's own thread delivers when the manual clock reaches the due time", "[scheduler]") {
  postbox::manual_clock clock;
  postbox::scheduler sched(clock);
  postbox::channel<int> ch(4);
  auto h = sched.send_after(ch, 1s, 11);
  CHECK(postbox_test::eventually([&] { return clock.waiters() > 0; }));
  clock.advance(1s);
  auto r = ch.receive_for(30s);
  REQUIRE(r.has_value());
  CHECK(*r == 11);
  CHECK(h.state() == schedule_state::delivered);
}

TEST_CASE("cancel racing the due time: exactly one of cancel true and delivered, never both", "[scheduler]") {
  const auto rounds = postbox_test::scaled(2000);
  postbox::manual_clock clock;
  postbox::scheduler sched(clock, postbox::timer_service::manual_drive,
                           postbox::scheduler_options{.retry_initial = 1ns, .retry_max = 1ns, .max_retries = 0});
  postbox::channel<std::uint64_t> ch(4096);
  std::uint64_t canceled_sum = 0, delivered_sum = 0, canceled_n = 0;
  for (std::uint64_t i = 1; i <= rounds; ++i) {
    auto h = sched.send_at(ch, clock.now(), i);  // due now
    std::atomic<bool> go{false};
    std::thread runner([&] {
      while (!go.load()) std::this_thread::yield();
      sched.run_due();
    });
    go.store(true);
    const bool won = h.cancel();
    runner.join();
    sched.run_due();
    if (won) {
      canceled_sum += i;
      ++canceled_n;
      CHECK(h.state() == schedule_state::canceled);
    } else {
      CHECK(h.state() == schedule_state::delivered);
    }
    while (auto v = ch.try_receive()) {
      delivered_sum += *v;
      CHECK_FALSE(won);  // a successful cancel is never followed by its delivery
    }
  }
  CHECK(canceled_sum + delivered_sum == rounds * (rounds + 1) / 2);
  const auto s = sched.stats();
  CHECK(s.canceled == canceled_n);
  CHECK(s.delivered == rounds - canceled_n);
}

TEST_CASE("cancel racing retries on a full channel never delivers a canceled message", "[scheduler]") {
  const auto rounds = postbox_test::scaled(1000);
  postbox::manual_clock clock;
  postbox::scheduler sched(clock, postbox::timer_service::manual_drive,
                           postbox::scheduler_options{.retry_initial = 1ns, .retry_max = 1ns, .max_retries = 0});
  postbox::channel<std::uint64_t> ch(1);
  std::uint64_t delivered_sum = 0, canceled_sum = 0;
  for (std::uint64_t i = 1; i <= rounds; ++i) {
    REQUIRE(ch.try_send(0) == postbox::send_status::ok);  // full
    auto h = sched.send_at(ch, clock.now(), i);
    std::atomic<bool> stop{false};
    std::thread driver([&] {
      // Tries again and again; a receive below makes room at some point.
      while (!stop.load()) {
        clock.advance(1ns);
        sched.run_due();
      }
    });
    CHECK(ch.receive_for(30s).has_value());  // the filler: makes room
    const bool won = h.cancel();
    stop.store(true);
    driver.join();
    sched.run_due();
    if (won) canceled_sum += i;
    while (auto v = ch.try_receive()) {
      CHECK_FALSE(won);
      delivered_sum += *v;
    }
    CHECK(h.state() == (won ? schedule_state::canceled : schedule_state::delivered));
  }
  CHECK(delivered_sum + canceled_sum == rounds * (rounds + 1) / 2);
}
