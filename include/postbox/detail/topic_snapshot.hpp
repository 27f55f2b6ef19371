// SPDX-License-Identifier: MIT
// detail::snapshot_ptr: a shared_ptr slot that readers copy and writers replace (copy-on-write snapshots).
#pragma once

#include <postbox/config.hpp>

#include <memory>
#include <mutex>
#include <utility>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Holds a `std::shared_ptr<const T>` that many threads load and a writer
/// replaces. A load is a short critical section (an uncontended mutex: two
/// atomic operations, no syscall, no allocation) plus one refcount increment.
/// libstdc++ 12's `std::atomic<std::shared_ptr>` does the same with a lock bit,
/// but ThreadSanitizer cannot see that protocol and reports false races, so
/// postbox uses a plain mutex it can check. Thread-safe.
template <class T>
class snapshot_ptr {
 public:
  explicit snapshot_ptr(std::shared_ptr<const T> p) : p_(std::move(p)) {}
  /// A copy of the current pointer. Never allocates; blocks only for a concurrent load/store.
  [[nodiscard]] std::shared_ptr<const T> load() const {
    std::lock_guard lock(mu_);
    return p_;
  }
  /// Replaces the pointer; the old object dies when its last reader drops it.
  void store(std::shared_ptr<const T> p) {
    std::shared_ptr<const T> old;
    {
      std::lock_guard lock(mu_);
      old = std::exchange(p_, std::move(p));
    }  // `old` is released outside the lock
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const T> p_;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
