// SPDX-License-Identifier: MIT
// A waker: one parking spot that several event counts can wake (a select in progress).
#pragma once

#include <postbox/config.hpp>

#include <condition_variable>
#include <mutex>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Something an event count wakes when it notifies, besides the threads
/// parked on its futex: a select in progress (thread_waker) or, in the async
/// layer, a suspended coroutine. event_count::register_waker keeps a pointer
/// until unregister_waker; wake() is called with the event count's registry
/// mutex held, so it must be short, must not block on anything that can wait
/// for that registry, and must not unregister itself.
class waker {
 public:
  /// Called by a notifying event count. Thread-safe; never throws.
  virtual void wake() noexcept = 0;

 protected:
  waker() = default;
  ~waker() = default;
  waker(const waker&) = default;
  waker& operator=(const waker&) = default;
};

/// A parking spot for a thread that waits on several things at once
/// (`postbox::select`): every event count the thread registers it with calls
/// `wake()` when it notifies, and timers reach it through the clock, which
/// waits on the same mutex and condition variable (`clock::wait_until`).
/// The flag under the mutex makes a wake-up sticky: one that arrives before
/// the thread parks is not lost. Thread-safe; never allocates.
class thread_waker final : public waker {
 public:
  thread_waker() = default;
  thread_waker(const thread_waker&) = delete;
  thread_waker& operator=(const thread_waker&) = delete;
  ~thread_waker() = default;

  /// Marks the waker woken and wakes its thread. Takes the waker's mutex
  /// briefly (lock order: an event count's registry, then this mutex).
  void wake() noexcept override {
    std::lock_guard lock(mutex_);
    woken_ = true;
    cv_.notify_one();
  }

  /// The waiting thread's mutex, condition variable and flag: it holds the
  /// mutex, checks `woken()`, and waits on the condition variable (through a
  /// postbox clock, so a manual clock can wake it too).
  [[nodiscard]] std::mutex& mutex() noexcept { return mutex_; }
  [[nodiscard]] std::condition_variable& cv() noexcept { return cv_; }
  /// Whether wake() ran since the last reset(). Caller holds mutex().
  [[nodiscard]] bool woken() const noexcept { return woken_; }
  /// Clears the flag before the next round of checks. Caller holds mutex().
  void reset() noexcept { woken_ = false; }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool woken_ = false;  // guarded by mutex_
};

}  // namespace detail
POSTBOX_END_NAMESPACE
