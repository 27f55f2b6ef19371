// SPDX-License-Identifier: MIT
// Polling rate limits for postbox::operations: the poll_result answer and the per-owner token buckets behind it.
#pragma once

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/error.hpp>
#include <postbox/detail/chrono.hpp>

#include <cstddef>
#include <string>
#include <unordered_map>
#include <utility>

// Design notes: docs/design/operations.md ("Polling rate limit").

POSTBOX_BEGIN_NAMESPACE

/// A `result<T>` that, when refused with `errc::rate_limited`, also says how
/// long to wait before the next call succeeds (`retry_after()`, zero on every
/// other outcome). Converts to `result<T>` (slicing off `retry_after`), so
/// code written against `result<T>` keeps working. A plain value.
template <class T>
class [[nodiscard]] poll_result : public result<T> {
 public:
  using result<T>::result;
  /// A refusal (`rate_limited`) that can be retried after `wait`.
  poll_result(errc status, duration wait) noexcept : result<T>(status), retry_after_(wait) {}

  /// Time until the caller's next poll is allowed; zero unless `status()` is
  /// `rate_limited`. Never allocates.
  [[nodiscard]] duration retry_after() const noexcept { return retry_after_; }

 private:
  duration retry_after_{};
};

namespace detail {

/// Token buckets, one per key (an owner), as a generic cell rate algorithm:
/// each key keeps the time its bucket is full again (`tat`), so the state is
/// one time_point and the arithmetic is exact in clock ticks. `rate` polls per
/// second refill it, `burst` polls may come at once. A key whose bucket is full
/// again holds no state: such buckets are dropped whenever the map outgrows
/// twice its size at the last scan, and at the latest one full refill period
/// after the last scan, so memory follows the owners active within one refill
/// period. Not thread-safe: the tracker calls it under its own mutex.
template <class Dummy = void>  // a template so that its bodies compile only where it is used (issue 17)
class basic_poll_limiter {
 public:
  /// `rate` <= 0 (or NaN) disables the limiter (every charge is allowed,
  /// nothing is stored). A `burst` of 0 counts as 1. A token's interval and
  /// the burst's span are each capped at about 31 years, so the arithmetic on
  /// time points cannot overflow. Never allocates.
  basic_poll_limiter(double rate, std::size_t burst) noexcept {
    if (rate > 0) {
      const double ticks_per_token = static_cast<double>(duration::period::den) / rate / static_cast<double>(duration::period::num);
      interval_ = ticks_per_token >= max_span ? duration(static_cast<duration::rep>(max_span))
                  : ticks_per_token < 1   ? duration(1)
                                          : duration(static_cast<duration::rep>(ticks_per_token));
      const double span = static_cast<double>(interval_.count()) * static_cast<double>((burst == 0 ? 1 : burst) - 1);
      tolerance_ = span >= max_span ? duration(static_cast<duration::rep>(max_span))
                                    : interval_ * static_cast<duration::rep>((burst == 0 ? 1 : burst) - 1);
    }
  }

  /// True when a rate was configured. Never allocates.
  [[nodiscard]] bool enabled() const noexcept { return interval_ > duration::zero(); }

  /// The time one token takes to refill (zero when disabled). Never allocates.
  [[nodiscard]] duration interval() const noexcept { return interval_; }

  /// Takes one token from `key`'s bucket at `now`: zero when allowed,
  /// otherwise the exact time until a token is there (nothing is taken).
  /// Allocates for a key seen first (and may scan out full buckets).
  [[nodiscard]] duration charge(const std::string& key, time_point now) {
    if (!enabled()) return duration::zero();
    if (now >= next_scan_ || buckets_.size() > high_water_) scan(now);
    auto it = buckets_.find(key);
    const time_point tat = (it == buckets_.end() || it->second < now) ? now : it->second;
    if (tat - now > tolerance_) return tat - now - tolerance_;
    if (it == buckets_.end()) buckets_.emplace(key, tat + interval_);
    else it->second = tat + interval_;
    return duration::zero();
  }

  /// Drops every bucket that is full again at `now` (it behaves exactly as
  /// a missing one); returns how many. Never allocates.
  std::size_t scan(time_point now) noexcept {
    std::size_t n = 0;
    for (auto it = buckets_.begin(); it != buckets_.end();) {
      if (it->second <= now) {
        it = buckets_.erase(it);
        ++n;
      } else {
        ++it;
      }
    }
    high_water_ = buckets_.size() * 2 < min_high_water ? min_high_water : buckets_.size() * 2;
    next_scan_ = now + tolerance_ + interval_;  // every bucket charged before now is full again by then
    return n;
  }

  /// Buckets held (owners that polled within one refill period, plus ones
  /// not yet scanned out). Never allocates.
  [[nodiscard]] std::size_t size() const noexcept { return buckets_.size(); }

 private:
  static constexpr std::size_t min_high_water = 64;
  static constexpr double max_span = 1e18;  // ticks (ns: ~31 years); three spans past now fit in int64

  duration interval_{};   // time per token; zero: disabled
  duration tolerance_{};  // interval_ * (burst - 1): how far ahead of now a bucket's tat may run
  std::unordered_map<std::string, time_point> buckets_;  // key -> time the bucket is full again
  std::size_t high_water_ = min_high_water;
  time_point next_scan_{};
};
using poll_limiter = basic_poll_limiter<void>;

}  // namespace detail
POSTBOX_END_NAMESPACE
