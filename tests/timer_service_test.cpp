// SPDX-License-Identifier: MIT
// Specification tests for postbox::timer_service: cancellation frees callbacks, and the service thread's wake-ups.
#include <postbox/testing.hpp>
#include <postbox/timer_service.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <memory>
#include <vector>

using namespace std::chrono_literals;

TEST_CASE("cancelling the earliest timer destroys its callback at once", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  auto token = std::make_shared<int>(0);
  const auto id = timers.schedule_after(1s, [token] { ++*token; });
  CHECK(token.use_count() == 2);
  CHECK(timers.cancel(id));
  CHECK(token.use_count() == 1);  // the callback (and its capture) is gone
  CHECK(timers.pending() == 0);
  CHECK_FALSE(timers.cancel(id));
}

TEST_CASE("timers scheduled and cancelled behind an earlier one do not pile up", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  bool early_ran = false;
  (void)timers.schedule_after(1h, [&] { early_ran = true; });  // stays at the front throughout
  auto token = std::make_shared<int>(0);
  for (int i = 0; i < 1000; ++i) {
    const auto id = timers.schedule_after(2h, [token] { ++*token; });
    REQUIRE(timers.cancel(id));
  }
  // At most 64 canceled entries more than the live one are kept; the rest
  // were swept and their callbacks destroyed.
  CHECK(token.use_count() <= 1 + 66);
  CHECK(timers.pending() == 1);
  clock.advance(2h);
  CHECK(timers.run_due() == 1);  // only the live timer runs
  CHECK(early_ran);
  CHECK(*token == 0);
  CHECK(token.use_count() == 1);
}

TEST_CASE("a cancelled timer that is not the earliest never runs, and the earliest still does", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  std::vector<int> ran;
  (void)timers.schedule_after(1s, [&] { ran.push_back(1); });
  const auto second = timers.schedule_after(2s, [&] { ran.push_back(2); });
  (void)timers.schedule_after(3s, [&] { ran.push_back(3); });
  CHECK(timers.cancel(second));
  CHECK(timers.next_deadline() == clock.now() + 1s);
  clock.advance(3s);
  CHECK(timers.run_due() == 2);
  CHECK(ran == std::vector<int>{1, 3});
  CHECK(timers.next_deadline() == postbox::time_point::max());
}

TEST_CASE("a timer due before the one the service thread sleeps for wakes it", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock);
  std::atomic<int> ran{0};
  (void)timers.schedule_after(10s, [&] { ran.fetch_add(10); });
  // The thread is asleep until the 10 s timer (or a clock advance).
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() > 0; }));
  (void)timers.schedule_at(clock.now(), [&] { ran.fetch_add(1); });  // due now: only a wake-up runs it
  CHECK(postbox_test::eventually([&] { return ran.load() == 1; }));
  CHECK(timers.pending() == 1);
}

TEST_CASE("a timer later than the one the service thread sleeps for still runs at its time", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock);
  std::atomic<int> ran{0};
  (void)timers.schedule_after(1s, [&] { ran.fetch_add(1); });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() > 0; }));
  (void)timers.schedule_after(2s, [&] { ran.fetch_add(10); });  // later: no wake-up needed
  clock.advance(1s);
  CHECK(postbox_test::eventually([&] { return ran.load() == 1; }));
  clock.advance(1s);
  CHECK(postbox_test::eventually([&] { return ran.load() == 11; }));
  CHECK(timers.pending() == 0);
}

TEST_CASE("a timer cancelled while the service thread sleeps for it never runs", "[timer_service]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock);
  std::atomic<int> ran{0};
  const auto id = timers.schedule_after(1s, [&] { ran.fetch_add(1); });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() > 0; }));
  CHECK(timers.cancel(id));
  (void)timers.schedule_after(2s, [&] { ran.fetch_add(10); });
  clock.advance(2s);
  CHECK(postbox_test::eventually([&] { return ran.load() == 10; }));
  CHECK(timers.pending() == 0);
}
