// SPDX-License-Identifier: MIT
// A waker: one parking spot that several event counts can wake (a select in progress).
#pragma once

#include <postbox/config.hpp>


POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// The part of a wake a notifier finishes after releasing the event count's
/// registry lock (see waker::claim): `fn(arg)`, where `arg` is owned by the
/// deferred wake (never the waker itself, which may be gone by then). Empty
/// when nothing is left to do. Trivially copyable; never allocates.
struct deferred_wake {
  void (*fn)(void*) noexcept = nullptr;
  void* arg = nullptr;
  explicit operator bool() const noexcept { return fn != nullptr; }
  void operator()() const noexcept { fn(arg); }
};

/// Something an event count wakes when it notifies, besides the threads
/// parked on its futex: a select in progress (thread_waker) or, in the async
/// layer, a suspended coroutine. event_count::register_waker keeps a pointer
/// until unregister_waker; wake() and claim() are called with the event
/// count's registry lock held, so they must be short, must not block on
/// anything that can wait for that registry, and must not unregister.
class waker {
 public:
  /// Called by a notifying event count. Thread-safe; never throws.
  virtual void wake() noexcept = 0;

  /// What a notifying event count calls: the part of the wake that needs
  /// this object, done under the registry lock, and the rest (a scheduler
  /// post) returned to run after the lock is released. The default does the
  /// whole wake here. Thread-safe; never throws.
  virtual deferred_wake claim() noexcept {
    wake();
    return {};
  }

 protected:
  waker() = default;
  ~waker() = default;
  waker(const waker&) = default;
  waker& operator=(const waker&) = default;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
