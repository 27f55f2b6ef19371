// SPDX-License-Identifier: MIT
// postbox::coarse_clock: the kernel-tick real clock behind stream timestamps.
#include <postbox/clock.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

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
