// SPDX-License-Identifier: MIT
// The injectable clock behind every timed behaviour in postbox (the timer service on it is in timer_service.hpp).
#pragma once

#include <postbox/error.hpp>
#include <postbox/detail/chrono.hpp>

#include <cstdint>
#include <condition_variable>
#include <mutex>

#if defined(__linux__)
#  include <time.h>
#endif

POSTBOX_BEGIN_NAMESPACE

/// postbox measures time in nanoseconds on the wall clock (UTC), because the
/// same time points travel inside envelopes (`occurred_at`, `deadline`) and
/// must mean the same thing in another process.
using duration = std::chrono::nanoseconds;
using time_point = std::chrono::time_point<std::chrono::system_clock, duration>;

/// The clock concept: every component that retries, expires, times out or
/// schedules reads `now()` from one of these and waits through `wait_until`,
/// so tests swap in `postbox::manual_clock` (testing.hpp) and never sleep.
/// Implementations are thread-safe.
class clock {
 public:
  virtual ~clock() = default;

  /// Current time. Never blocks, never allocates. Thread-safe.
  [[nodiscard]] virtual time_point now() const noexcept = 0;

  /// Blocks the caller, who holds `lock`, until `deadline` has passed on this
  /// clock, `cv` is notified, or spuriously; `lock` is released while
  /// waiting, exactly as `std::condition_variable::wait_until`. Callers loop
  /// on their own condition. Thread-safe.
  virtual void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                          time_point deadline) const = 0;
};

/// The real clock: `std::chrono::system_clock`. Thread-safe, never allocates.
class real_clock final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override {
    return std::chrono::time_point_cast<duration>(std::chrono::system_clock::now());
  }
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    if (deadline == time_point::max()) {
      cv.wait(lock);
    } else {
      cv.wait_until(lock, deadline);
    }
  }
};

/// The process-wide real clock used when a component is given no clock.
[[nodiscard]] inline const clock& default_clock() noexcept {
  static const real_clock instance;
  return instance;
}

/// A real clock read at the kernel tick's resolution: CLOCK_REALTIME_COARSE
/// on Linux (the time of the last tick: 1 to 4 ms, see `resolution()`), about
/// 2 ns per read against 25-60 ns for system_clock in a VM, because it reads
/// no hardware counter. Its `now()` is never ahead of system_clock and lags it
/// by about one resolution (a tick; more when the kernel updates it late; plus
/// any NTP step); elsewhere it is system_clock. The default clock of postbox::stream, whose per-record
/// timestamps must cost less than the append itself. Thread-safe, never allocates.
class coarse_clock final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override {
#if defined(__linux__)
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return time_point(duration(static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec));
#else
    return std::chrono::time_point_cast<duration>(std::chrono::system_clock::now());
#endif
  }
  /// Waits until this clock's own now() has reached `deadline`, `cv` is
  /// notified, or spuriously. A timed-out wait never returns early: the
  /// kernel can update the coarse time late (a busy or virtualised host has
  /// been seen trailing system_clock by several ticks), so each round waits on
  /// system_clock for the time still missing plus one resolution, and on a
  /// timeout re-reads now() before returning; callers that loop on
  /// `now() < deadline` therefore never spin. Blocks; never allocates.
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    const auto slack = resolution();
    if (deadline >= time_point::max() - slack) {
      cv.wait(lock);
      return;
    }
    for (;;) {
      const auto missing = deadline - now();
      if (missing <= duration::zero()) return;
      const auto target = std::chrono::time_point_cast<duration>(std::chrono::system_clock::now()) + missing + slack;
      if (cv.wait_until(lock, target) == std::cv_status::no_timeout) return;
    }
  }
  /// The interval at which now() advances (clock_getres; 1 ns off Linux).
  /// Never blocks, never allocates. Thread-safe.
  [[nodiscard]] static duration resolution() noexcept {
#if defined(__linux__)
    timespec ts{};
    if (::clock_getres(CLOCK_REALTIME_COARSE, &ts) != 0) return std::chrono::milliseconds(10);
    return duration(static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec);
#else
    return duration(1);
#endif
  }
};

/// The process-wide coarse clock: postbox::stream's default clock.
[[nodiscard]] inline const clock& coarse_default_clock() noexcept {
  static const coarse_clock instance;
  return instance;
}

POSTBOX_END_NAMESPACE
