// SPDX-License-Identifier: MIT
// A waker: one parking spot that several event counts can wake (a select in progress).
#pragma once

#include <postbox/config.hpp>


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

}  // namespace detail
POSTBOX_END_NAMESPACE
