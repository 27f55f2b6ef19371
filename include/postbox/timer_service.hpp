// SPDX-License-Identifier: MIT
// A timer service: runs callbacks at time points of a postbox::clock, on its own thread or driven by run_due().
#pragma once

#include <postbox/clock.hpp>
#include <postbox/error.hpp>
#include <postbox/detail/algorithm.hpp>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// Runs callbacks at time points of a `postbox::clock`: delayed redelivery,
/// retry backoff, request timeouts, expiry. One background thread per service
/// (or none, in `manual_drive` mode, where only `run_due()` runs timers).
/// A callback that throws is caught and counted; the service keeps running.
/// All members are thread-safe; `schedule_*` allocates (one heap node).
/// A canceled timer's callback (and what it captured) is destroyed by
/// `cancel` on the canceling thread, outside the service's lock, when that
/// timer was the earliest; otherwise once it reaches the front or when the
/// service sweeps canceled entries (kept at most 64 more than the live
/// ones), so schedule-and-cancel pairs leave no growing heap behind.
class timer_service {
 public:
  using timer_id = std::uint64_t;
  using callback = std::function<void()>;

  /// Tag: construct without a thread; timers run only from `run_due()`.
  struct manual_drive_t {};
  static constexpr manual_drive_t manual_drive{};

  /// Starts the service's thread, which waits on `clk`.
  explicit timer_service(const clock& clk = default_clock()) : clock_(&clk) {
    thread_ = std::thread([this] { run(); });
  }
  /// A service with no thread: deterministic tests call `run_due()`.
  timer_service(const clock& clk, manual_drive_t) noexcept : clock_(&clk) {}

  timer_service(const timer_service&) = delete;
  timer_service& operator=(const timer_service&) = delete;

  /// Stops the thread; timers still pending never run.
  ~timer_service() { stop(); }

  /// Runs `fn` once at or after `when`. Returns an id for `cancel`.
  /// Allocates. Thread-safe; may be called from inside a callback.
  timer_id schedule_at(time_point when, callback fn) {
    std::vector<callback> swept;  // canceled callbacks, destroyed after the lock
    std::lock_guard lock(mutex_);
    const timer_id id = ++last_id_;
    if (heap_.size() > 2 * live_.size() + 64) sweep_canceled(swept);
    heap_.push_back(entry{when, id, std::move(fn)});
    std::push_heap(heap_.begin(), heap_.end(), later{});
    live_.insert(id);
    // The service thread sleeps until the deadline it saw first; only a
    // timer due before that needs to wake it (a table of requests that
    // cancels and re-arms its one timer per request never does).
    if (when < sleeping_until_) cv_.notify_all();
    return id;
  }

  /// Runs `fn` once after `delay` has passed on the clock.
  timer_id schedule_after(duration delay, callback fn) {
    return schedule_at(clock_->now() + delay, std::move(fn));
  }

  /// Cancels a pending timer. Returns true if it had not started and now
  /// never will; false if it already ran, is running, or was canceled.
  /// When it was the earliest, its callback is destroyed here, after the
  /// service's lock is released (see the class comment). Never blocks on a
  /// running callback.
  bool cancel(timer_id id) {
    // At most this many canceled entries leave the front per call (no
    // allocation); the rest go with later calls or the sweep.
    constexpr std::size_t front_batch = 4;
    callback dropped[front_batch];
    std::lock_guard lock(mutex_);
    if (live_.erase(id) != 1) return false;
    for (std::size_t i = 0; i < front_batch && !heap_.empty() && live_.count(heap_.front().id) == 0; ++i) {
      dropped[i] = pop_front();
    }
    return true;
  }  // lock released first, then `dropped` destroyed (declared before it)

  /// Runs, in the calling thread, every timer due at `clock.now()`.
  /// Returns how many ran. Thread-safe (each timer runs exactly once).
  std::size_t run_due() {
    std::size_t ran = 0;
    std::unique_lock lock(mutex_);
    while (auto fn = pop_due(lock)) {
      lock.unlock();
      invoke(*fn);
      ++ran;
      lock.lock();
    }
    return ran;
  }

  /// Number of timers scheduled and not yet run or canceled.
  [[nodiscard]] std::size_t pending() const {
    std::lock_guard lock(mutex_);
    return live_.size();
  }

  /// Earliest pending deadline, or `time_point::max()` when none.
  [[nodiscard]] time_point next_deadline() const {
    std::lock_guard lock(mutex_);
    auto& self = const_cast<timer_service&>(*this);
    self.drop_canceled_top();
    return heap_.empty() ? time_point::max() : heap_.front().when;
  }

  /// Callbacks that threw (the exception was swallowed).
  [[nodiscard]] std::uint64_t callback_failures() const noexcept {
    // relaxed: a statistic; no data is published through it.
    return failures_.load(std::memory_order_relaxed);
  }

  /// Stops the background thread (idempotent). Pending timers stay pending
  /// and can still be run with `run_due()`.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }

 private:
  struct entry {
    time_point when;
    timer_id id;
    callback fn;
  };
  struct later {
    bool operator()(const entry& a, const entry& b) const noexcept {
      return a.when != b.when ? a.when > b.when : a.id > b.id;  // FIFO among equal deadlines
    }
  };

  // Under mutex_: removes the front entry, returning its callback.
  callback pop_front() {
    std::pop_heap(heap_.begin(), heap_.end(), later{});
    callback fn = std::move(heap_.back().fn);
    heap_.pop_back();
    return fn;
  }

  void drop_canceled_top() {
    while (!heap_.empty() && live_.count(heap_.front().id) == 0) (void)pop_front();
  }

  // Under mutex_: moves every canceled entry's callback to `out` (for the
  // caller to destroy after unlocking) and rebuilds the heap of live ones.
  // O(heap); runs once the canceled entries outnumber the live ones by more
  // than 64, so amortized O(1) per cancel.
  void sweep_canceled(std::vector<callback>& out) {
    auto dead = std::partition(heap_.begin(), heap_.end(), [&](const entry& e) { return live_.count(e.id) != 0; });
    out.reserve(static_cast<std::size_t>(heap_.end() - dead));
    for (auto it = dead; it != heap_.end(); ++it) out.push_back(std::move(it->fn));
    heap_.erase(dead, heap_.end());
    std::make_heap(heap_.begin(), heap_.end(), later{});
  }

  std::optional<callback> pop_due(std::unique_lock<std::mutex>&) {
    drop_canceled_top();
    if (heap_.empty() || heap_.front().when > clock_->now()) return std::nullopt;
    live_.erase(heap_.front().id);
    return pop_front();
  }

  void invoke(callback& fn) noexcept {
    POSTBOX_TRY { fn(); }
    POSTBOX_CATCH_ALL {
      // relaxed: a statistic only.
      failures_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void run() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      if (auto fn = pop_due(lock)) {
        lock.unlock();
        invoke(*fn);
        lock.lock();
        continue;
      }
      const time_point next = heap_.empty() ? time_point::max() : heap_.front().when;
      sleeping_until_ = next;
      clock_->wait_until(lock, cv_, next);
      sleeping_until_ = time_point::min();
    }
  }

  const clock* clock_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<entry> heap_;  // a heap by later{}: the earliest at front(); may hold canceled entries
  std::unordered_set<timer_id> live_;
  // The deadline the service thread sleeps until (max: no timer), or min()
  // while it is not asleep: schedule_at wakes it only for an earlier timer.
  time_point sleeping_until_ = time_point::min();
  timer_id last_id_ = 0;
  bool stopping_ = false;
  /// Count of callbacks that threw. Written by whichever thread ran the
  /// callback, read by `callback_failures()`; relaxed both ways (statistic).
  std::atomic<std::uint64_t> failures_{0};
  std::thread thread_;
};

POSTBOX_END_NAMESPACE
