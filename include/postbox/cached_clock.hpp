// SPDX-License-Identifier: MIT
// postbox::cached_clock: a clock read with one load, refreshed by a ticker thread.
#pragma once

#include <postbox/clock.hpp>
#include <postbox/config.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

POSTBOX_BEGIN_NAMESPACE

/// A clock whose `now()` is one relaxed load of a time that a ticker thread
/// of its own refreshes from a source clock every `period` (default 1 ms).
/// For hot paths that stamp every message and can take a time that lags by
/// up to a period: postbox::stream reads it inline per append (see
/// `clock::published_now()`), where its default `coarse_clock` makes a vDSO
/// call per record (about 3 ns, a quarter of an append).
///
/// - `now()` is never ahead of the source and lags it by up to one period
///   plus the ticker's scheduling delay. It follows the source, steps back
///   included (postbox::stream clamps its timestamps per partition).
/// - The ticker wakes once per period and makes one source read then (about
///   1,000 wake-ups a second at the default period: the price of the cheap
///   read). Over postbox's real clocks (`default_clock()`,
///   `coarse_default_clock()`) it sleeps each period on the steady clock, so
///   a step of the wall clock (NTP) never stalls it; over any other clock it
///   waits through that clock's own `wait_until`, so with a `manual_clock`
///   source a test drives it by advancing that clock.
/// - `wait_until` returns once the deadline has passed on this clock: a
///   caller that finds the source past the deadline before the ticker
///   noticed refreshes the time itself, so loops on `now() < deadline`
///   never spin.
///
/// Construction starts the thread (throws `std::system_error` when it cannot)
/// and reads the source once, so `now()` is valid at once; destruction stops
/// and joins it. `now()` never blocks or allocates; every member is
/// thread-safe. The source must outlive this clock, and this clock every
/// component that reads it.
class cached_clock final : public clock {
 public:
  /// Reads `source` now and then every `period` (at least 1 ns) on a thread
  /// of its own. Allocates the thread; may block briefly to start it.
  explicit cached_clock(const clock& source = default_clock(),
                        duration period = std::chrono::milliseconds(1))
      : source_(source),
        period_(period > duration::zero() ? period : duration(1)),
        steady_ticks_(&source == &default_clock() || &source == &coarse_default_clock()) {
    // relaxed: before the clock is shared (the thread start orders it).
    now_.store(source_.now().time_since_epoch().count(), std::memory_order_relaxed);
    ticker_ = std::thread([this] { tick_until_stopped(); });
  }
  cached_clock(const cached_clock&) = delete;
  cached_clock& operator=(const cached_clock&) = delete;

  /// Stops the ticker and joins it. Blocks until it has returned from its
  /// wait (a notify away); no thread may be inside this clock's members.
  ~cached_clock() override {
    {
      std::lock_guard lock(mutex_);
      stopped_ = true;
    }
    wake_.notify_all();
    ticker_.join();
  }

  /// The source's time at the last refresh. One relaxed load: never blocks,
  /// never allocates. Thread-safe.
  [[nodiscard]] time_point now() const noexcept override {
    // relaxed: a time value only; no data is published with it.
    return time_point(duration(now_.load(std::memory_order_relaxed)));
  }

  /// Blocks until `deadline` has passed on this clock, `cv` is notified, or
  /// spuriously (callers loop on their own condition): waits on the source;
  /// a caller that finds the source past the deadline while the cached time
  /// is not refreshes it and returns. Thread-safe.
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    if (now() >= deadline) return;
    const time_point source_now = source_.now();
    if (source_now >= deadline) {
      refresh_to(source_now);
      return;
    }
    source_.wait_until(lock, cv, deadline);
  }

  /// The word now() reads, for hot paths that read it inline (see
  /// clock::published_now()). Never blocks.
  [[nodiscard]] const std::atomic<std::int64_t>* published_now() const noexcept override { return &now_; }

 private:
  // The ticker: waits a period (on the steady clock, or on the source),
  // then stores the source's time.
  void tick_until_stopped() {
    std::unique_lock lock(mutex_);
    time_point next = source_.now() + period_;
    while (!stopped_) {
      if (steady_ticks_) {
        wake_.wait_for(lock, period_);
      } else {
        source_.wait_until(lock, wake_, next);
      }
      if (stopped_) return;
      const time_point t = source_.now();
      if (!steady_ticks_ && t < next) continue;  // woken early (spuriously): wait out the period
      refresh_to(t);
      next = t + period_;
    }
  }

  void refresh_to(time_point t) const noexcept {
    // relaxed: see now(). The ticker and a waiter (wait_until) may both
    // store; either stores a source reading, and the next tick corrects an
    // older one that landed last.
    now_.store(t.time_since_epoch().count(), std::memory_order_relaxed);
  }

  const clock& source_;
  const duration period_;
  // The source is one of postbox's real clocks: the ticker sleeps on the
  // steady clock (a wall-clock step back would stall a wait on the source).
  const bool steady_ticks_;
  // The cached time, ns since the epoch. Written by the ticker (and by
  // wait_until when the ticker lags), read by now(): relaxed everywhere.
  // On a line of its own: readers on every core keep it shared, and only
  // the ticker's store, once a period, moves it.
  alignas(64) mutable std::atomic<std::int64_t> now_{0};
  alignas(64) std::mutex mutex_;      // guards stopped_; the ticker waits under it
  std::condition_variable wake_;      // notified by the destructor
  bool stopped_ = false;              // guarded by mutex_
  std::thread ticker_;
};

POSTBOX_END_NAMESPACE
