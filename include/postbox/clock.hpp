// SPDX-License-Identifier: MIT
// The injectable clock behind every timed behaviour in postbox (the timer service on it is in timer_service.hpp).
#pragma once

#include <postbox/error.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>

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

POSTBOX_END_NAMESPACE
