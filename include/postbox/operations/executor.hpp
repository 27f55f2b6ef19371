// SPDX-License-Identifier: MIT
// The executor internal to postbox::operations: fixed worker threads and a bounded queue that refuses when full.
#pragma once

#include <postbox/config.hpp>

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Fixed worker threads and a queue of at most `capacity` tasks. `try_post`
/// refuses when full. The destructor runs `on_drop` for queued tasks never
/// started, then joins. Thread-safe.
template <class Dummy = void>  // a template so that its bodies compile only where it is used (issue 17)
class basic_op_executor {
 public:
  using task = std::function<void(bool run)>;  // run == false: dropped at shutdown

  basic_op_executor(std::size_t threads, std::size_t capacity) : capacity_(capacity == 0 ? 1 : capacity) {
    if (threads == 0) threads = 1;
    for (std::size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  }
  basic_op_executor(const basic_op_executor&) = delete;
  basic_op_executor& operator=(const basic_op_executor&) = delete;
  ~basic_op_executor() { shutdown(); }

  /// Queues `t`, moving from it only on success; false when the queue is
  /// full or shut down, and then `t` is left intact, so the caller decides
  /// where (outside which lock) the refused task and what it captured are
  /// destroyed. Never calls `t`. May be called under a caller's lock: it takes
  /// only this executor's mutex, which is never held while a task runs.
  /// Allocates. Thread-safe.
  [[nodiscard]] bool try_post(task& t) {
    {
      std::lock_guard lock(mutex_);
      if (stopping_ || queue_.size() >= capacity_) return false;
      queue_.push_back(std::move(t));
    }
    cv_.notify_one();
    return true;
  }

  /// Stops taking work, tells queued tasks they were dropped, joins workers.
  void shutdown() {
    std::deque<task> dropped;
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
      dropped.swap(queue_);
    }
    cv_.notify_all();
    for (auto& t : dropped) t(false);
    for (auto& w : workers_) w.join();
  }

 private:
  void run() {
    for (;;) {
      task t;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        t = std::move(queue_.front());
        queue_.pop_front();
      }
      t(true);
    }
  }

  std::size_t capacity_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};
using op_executor = basic_op_executor<void>;

}  // namespace detail
POSTBOX_END_NAMESPACE
