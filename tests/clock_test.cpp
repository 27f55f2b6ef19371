// SPDX-License-Identifier: MIT
// postbox::coarse_clock: the kernel-tick real clock behind stream timestamps;
// postbox::cached_clock: a clock read with one load, refreshed by a ticker.
#include <postbox/cached_clock.hpp>
#include <postbox/clock.hpp>
#include <postbox/testing.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <thread>

TEST_CASE("coarse_clock is never ahead of system_clock and trails it by at most a tick or so", "[clock]") {
  const postbox::coarse_clock c;
  const auto res = postbox::coarse_clock::resolution();
  REQUIRE(res > postbox::duration(0));
  REQUIRE(res <= std::chrono::milliseconds(100));
  for (int i = 0; i < 1000; ++i) {
    const auto coarse = c.now();
    const auto fine = std::chrono::time_point_cast<postbox::duration>(std::chrono::system_clock::now());
    CHECK(coarse <= fine);
    // Generous: a tick late plus a preempted thread; a wrong clock id or unit is off by far more.
    CHECK(fine - coarse < res + std::chrono::seconds(1));
  }
}

TEST_CASE("coarse_clock::wait_until returns once the coarse clock itself reached the deadline", "[clock]") {
  // Callers loop on now() < deadline; a wait that returned on system_clock's
  // deadline alone would leave the coarse clock a tick or more behind (the
  // kernel can update it late) and make that loop spin: hundreds of rounds.
  // Only spurious wake-ups may end a round before the coarse deadline.
  const postbox::coarse_clock c;
  std::mutex m;
  std::condition_variable cv;
  std::unique_lock lock(m);
  const auto deadline = c.now() + postbox::coarse_clock::resolution();
  int rounds = 0;
  while (c.now() < deadline) {
    c.wait_until(lock, cv, deadline);
    ++rounds;
  }
  CHECK(rounds <= 10);
  CHECK(&postbox::coarse_default_clock() == &postbox::coarse_default_clock());
}

#if POSTBOX_VDSO_CLOCK
TEST_CASE("coarse_clock reads the kernel's coarse time directly through the vDSO, between two libc reads of it", "[clock]") {
  // Where the process has a vDSO (not under valgrind) the clock calls its
  // clock_gettime itself; it must be the same CLOCK_REALTIME_COARSE that
  // libc reads: coarse time never goes back, so a read between two libc
  // reads lies between them (a wrong symbol, clock id or unit does not).
  if (postbox::detail::vdso_gettime != nullptr) {
    timespec probe{};
    CHECK(postbox::detail::vdso_gettime(CLOCK_REALTIME_COARSE, &probe) == 0);
  }
  const postbox::coarse_clock c;
  const auto libc = [] {
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return postbox::time_point(postbox::duration(static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec));
  };
  int outside = 0;
  for (int i = 0; i < 1000; ++i) {
    const auto before = libc();
    const auto mine = c.now();
    const auto after = libc();
    if (mine < before || mine > after) ++outside;
  }
  CHECK(outside == 0);
}
#endif

// --- cached_clock ---------------------------------------------------------------

TEST_CASE("cached_clock reads its source once at construction, before its ticker has run", "[clock]") {
  postbox::manual_clock source;
  const postbox::cached_clock c(source, std::chrono::hours(1));
  CHECK(c.now() == postbox::manual_clock::default_start);
}

TEST_CASE("cached_clock's ticker refreshes it from the source once a period has passed there", "[clock]") {
  postbox::manual_clock source;
  const postbox::cached_clock c(source, std::chrono::milliseconds(10));
  // The ticker computes its first deadline before it waits: advance only
  // once it waits, so the period counts from the start time.
  REQUIRE(postbox_test::eventually([&] { return source.waiters() == 1; }));
  source.advance(std::chrono::milliseconds(4));
  source.advance(std::chrono::milliseconds(6));
  REQUIRE(postbox_test::eventually([&] { return c.now() == source.now(); }));
  CHECK(c.now() == postbox::manual_clock::default_start + std::chrono::milliseconds(10));
}

TEST_CASE("cached_clock publishes the word its now() reads, and other clocks publish none", "[clock]") {
  postbox::manual_clock source;
  const postbox::cached_clock c(source, std::chrono::hours(1));
  const std::atomic<std::int64_t>* word = c.published_now();
  REQUIRE(word != nullptr);
  CHECK(postbox::time_point(postbox::duration(word->load())) == c.now());
  CHECK(postbox::real_clock().published_now() == nullptr);
  CHECK(postbox::coarse_default_clock().published_now() == nullptr);
  CHECK(source.published_now() == nullptr);
}

TEST_CASE("cached_clock::wait_until refreshes and returns when the source passed the deadline before the ticker did",
          "[clock]") {
  // A caller looping on now() < deadline must not spin while the ticker
  // lags: an hour-long period keeps the ticker out of this test.
  postbox::manual_clock source;
  const postbox::cached_clock c(source, std::chrono::hours(1));
  const auto deadline = source.now() + std::chrono::seconds(1);
  source.advance(std::chrono::seconds(5));
  std::mutex m;
  std::condition_variable cv;
  std::unique_lock lock(m);
  c.wait_until(lock, cv, deadline);
  CHECK(c.now() == postbox::manual_clock::default_start + std::chrono::seconds(5));
}

TEST_CASE("cached_clock::wait_until waits on its source until the deadline", "[clock]") {
  postbox::manual_clock source;
  const postbox::cached_clock c(source, std::chrono::hours(1));
  const auto deadline = source.now() + std::chrono::seconds(1);
  std::atomic<bool> done{false};
  std::thread waiter([&] {
    std::mutex m;
    std::condition_variable cv;
    std::unique_lock lock(m);
    while (c.now() < deadline) c.wait_until(lock, cv, deadline);
    done = true;
  });
  REQUIRE(postbox_test::eventually([&] { return source.waiters() == 2; }));  // the ticker and the waiter
  CHECK_FALSE(done.load());
  source.advance(std::chrono::seconds(1));
  CHECK(postbox_test::eventually([&] { return done.load(); }));
  waiter.join();
  CHECK(c.now() >= deadline);
}

TEST_CASE("a cached_clock over the default real clock keeps refreshing from it", "[clock]") {
  // Its ticker sleeps on the steady clock here (a wall-clock step back must
  // not stall it): the cached time still moves on with system_clock.
  const postbox::cached_clock c(postbox::default_clock(), std::chrono::microseconds(100));
  const auto first = c.now();
  CHECK(postbox_test::eventually([&] { return c.now() > first; }));
  CHECK(c.now() <= std::chrono::time_point_cast<postbox::duration>(std::chrono::system_clock::now()));
}

TEST_CASE("destroying a cached_clock wakes and joins its ticker, whatever clock it waits on", "[clock][teardown]") {
  {
    postbox::manual_clock source;
    std::optional<postbox::cached_clock> c(std::in_place, source, std::chrono::hours(1));
    REQUIRE(postbox_test::eventually([&] { return source.waiters() == 1; }));
    c.reset();  // would hang if the ticker slept through the stop
    CHECK(source.waiters() == 0);
  }
  for (int i = 0; i < 50; ++i) {
    const postbox::cached_clock c(postbox::default_clock(), std::chrono::microseconds(50 + i));
    CHECK(c.now() <= std::chrono::time_point_cast<postbox::duration>(std::chrono::system_clock::now()));
  }
}
