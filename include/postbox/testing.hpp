// SPDX-License-Identifier: MIT
// Test support: postbox::manual_clock, a clock that only moves when told to.
#pragma once

#include <postbox/clock.hpp>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// A clock that stands still until `advance` or `set` moves it, and then wakes
/// every thread waiting on it through `clock::wait_until`, so that retries,
/// deadlines, timeouts and expiry are tested without sleeping.
///
/// **Example**:
///   postbox::manual_clock clock;            // starts at 2026-01-01T00:00:00Z
///   postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
///   timers.schedule_after(5s, [&] { fired = true; });
///   clock.advance(5s); timers.run_due();    // fired == true
///
/// Thread-safe. `advance` must not be called while holding a mutex that a
/// thread passes to `wait_until` on this clock (it would wait for itself).
/// Not final: the test harness's clock (testing/harness.hpp) derives from it.
class manual_clock : public clock {
 public:
  /// 2026-01-01T00:00:00Z: a readable default that is not the epoch.
  static constexpr time_point default_start = time_point(std::chrono::seconds(1767225600));

  explicit manual_clock(time_point start = default_start) noexcept : now_ns_(start.time_since_epoch().count()) {}

  [[nodiscard]] time_point now() const noexcept override {
    // acquire: pairs with the release in set(), so a thread that sees the new
    // time also sees what the advancing thread wrote before advancing.
    return time_point(duration(now_ns_.load(std::memory_order_acquire)));
  }

  /// Moves time forward by `step` (negative steps are ignored) and wakes
  /// waiters. Blocks only while a waiter briefly holds its own mutex.
  void advance(duration step) {
    if (step.count() > 0) set(now() + step);
  }

  /// Moves time to `t` if it is later than now (time never goes back) and
  /// wakes every waiter.
  void set(time_point t) {
    const auto target = t.time_since_epoch().count();
    auto current = now_ns_.load(std::memory_order_relaxed);
    while (current < target &&
           // release: publishes the writes made before advancing; pairs with
           // the acquire in now().
           !now_ns_.compare_exchange_weak(current, target, std::memory_order_release,
                                          std::memory_order_relaxed)) {
    }
    wake_all();
  }

  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    // Registered before the time check, while the caller holds its mutex: an
    // advance that happens after the check must notify us, and it can only do
    // so after we released the mutex inside cv.wait (see wake_all).
    waiter w{lock.mutex(), &cv};
    {
      std::lock_guard g(registry_mutex_);
      waiters_.push_back(&w);
    }
    if (now() < deadline) cv.wait(lock);
    std::lock_guard g(registry_mutex_);
    waiters_.erase(std::find(waiters_.begin(), waiters_.end(), &w));
  }

  /// Number of threads currently waiting on this clock (for tests that must
  /// know a component has gone to sleep before they advance).
  [[nodiscard]] std::size_t waiters() const {
    std::lock_guard g(registry_mutex_);
    return waiters_.size();
  }

 private:
  struct waiter {
    std::mutex* mutex;
    std::condition_variable* cv;
  };

  // Notifies every registered waiter while holding the waiter's own mutex, so
  // a waiter cannot be between its time check and its wait. Never blocks on a
  // waiter's mutex while holding the registry (the waiter takes the registry
  // while holding its mutex): try_lock, release, yield, retry.
  void wake_all() const {
    std::vector<waiter*> done;
    for (;;) {
      bool pending = false;
      {
        std::lock_guard g(registry_mutex_);
        for (waiter* w : waiters_) {
          if (std::find(done.begin(), done.end(), w) != done.end()) continue;
          std::unique_lock l(*w->mutex, std::try_to_lock);
          if (l.owns_lock()) {
            w->cv->notify_all();
            done.push_back(w);
          } else {
            pending = true;
          }
        }
      }
      if (!pending) return;
      std::this_thread::yield();
    }
  }

  /// Nanoseconds since the epoch. Written by set() (release CAS), read by
  /// now() (acquire); only ever increases.
  std::atomic<std::int64_t> now_ns_;
  mutable std::mutex registry_mutex_;
  mutable std::vector<waiter*> waiters_;
};

POSTBOX_END_NAMESPACE

// The harness that drives time for every attached component (below manual_clock: it uses it).
#include <postbox/testing/harness.hpp>
// Capture sinks: a destination that records every envelope, with queries.
#include <postbox/testing/capture.hpp>
// Fault injectors: seeded source and destination decorators, with counters.
#include <postbox/testing/faults.hpp>
// Assertions for messaging code: idempotency, saga compensation, no message lost.
#include <postbox/testing/assertions.hpp>
