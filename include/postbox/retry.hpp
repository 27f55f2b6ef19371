// SPDX-License-Identifier: MIT
// Retry policy (exponential backoff with full jitter and a cap), a seeded jitter source and a token bucket.
#pragma once

#include <postbox/clock.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/chrono.hpp>

#include <cstdint>
#include <mutex>

POSTBOX_BEGIN_NAMESPACE

/// How often and how far apart a failed delivery (or compensation, or relay
/// publish) is tried again. Attempts count from 1: attempt n is the n-th
/// start. After the n-th attempt fails the caller waits `backoff(n, bits)`,
/// unless `exhausted(n)`, in which case the work is dead-lettered (or, for a
/// saga compensation, the saga fails).
///
/// Backoff is "full jitter" (AWS Architecture Blog, "Exponential Backoff
/// And Jitter"): a uniform draw in [0, min(cap, initial * multiplier^(n-1))),
/// which spreads retries of many failing messages instead of having them
/// all return at the same instant. With `full_jitter = false` the wait is
/// the exponential value itself (useful when a test wants exact figures
/// without a seeded source).
///
/// A plain value; every member is constexpr-friendly, never allocates and
/// never blocks. Thread-safe to read concurrently.
struct retry_policy {
  /// Total attempts allowed, the first included (1 = never retry).
  std::uint32_t max_attempts = 5;
  /// Upper bound of the wait after the first failure.
  duration initial_backoff = std::chrono::milliseconds(100);
  /// Growth of the bound per further failure (>= 1).
  double multiplier = 2.0;
  /// Cap of the bound.
  duration max_backoff = std::chrono::seconds(30);
  /// Draw the wait uniformly below the bound (true) or wait the bound itself.
  bool full_jitter = true;

  /// The exponential bound after the `attempt`-th failure (attempt >= 1):
  /// min(max_backoff, initial_backoff * multiplier^(attempt-1)). Never allocates.
  [[nodiscard]] constexpr duration ceiling(std::uint32_t attempt) const noexcept {
    const double cap = static_cast<double>(max_backoff.count());
    double d = static_cast<double>(initial_backoff.count());
    for (std::uint32_t i = 1; i < attempt && d < cap; ++i) d *= (multiplier < 1.0 ? 1.0 : multiplier);
    d = std::min(d, cap);
    return duration(static_cast<duration::rep>(d < 0 ? 0 : d));
  }

  /// The wait after the `attempt`-th failure; with full jitter, `random_bits`
  /// (64 uniform bits, e.g. from `jitter_source::next()`) pick a point in
  /// [0, ceiling). Never allocates.
  [[nodiscard]] constexpr duration backoff(std::uint32_t attempt, std::uint64_t random_bits) const noexcept {
    const duration bound = ceiling(attempt);
    if (!full_jitter) return bound;
    // 53 high bits as a fraction in [0, 1): exact in a double.
    const double fraction = static_cast<double>(random_bits >> 11) * 0x1.0p-53;
    return duration(static_cast<duration::rep>(static_cast<double>(bound.count()) * fraction));
  }

  /// True when `attempt` attempts have been made and no more are allowed.
  [[nodiscard]] constexpr bool exhausted(std::uint32_t attempt) const noexcept { return attempt >= max_attempts; }

  /// A policy that never retries (one attempt).
  [[nodiscard]] static constexpr retry_policy no_retry() noexcept {
    retry_policy p;
    p.max_attempts = 1;
    return p;
  }
};

/// A seeded stream of 64-bit words for backoff jitter (splitmix64), so a
/// test with a fixed seed sees the exact same backoff schedule every run.
/// Never allocates. Not thread-safe (one per component, under its lock).
class jitter_source {
 public:
  explicit constexpr jitter_source(std::uint64_t seed) noexcept : state_(seed) {}

  /// Next 64 uniform bits.
  [[nodiscard]] constexpr std::uint64_t next() noexcept {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

 private:
  std::uint64_t state_;
};

/// A token bucket on a `postbox::clock`: `rate` tokens per second, holding at
/// most `burst`. Bounds the pace of redrives and relays. `try_take()` never
/// blocks; `next_available()` says when a token will be there, so a caller
/// can schedule a timer instead of polling. Never allocates. Thread-safe
/// (a small mutex; this is not a hot path).
class token_bucket {
 public:
  /// `rate_per_second` > 0; `burst` >= 1. The bucket starts full.
  token_bucket(double rate_per_second, double burst, const clock& clk = default_clock()) noexcept
      : rate_(rate_per_second > 0 ? rate_per_second : 1.0), burst_(burst >= 1 ? burst : 1.0), tokens_(burst_),
        clock_(&clk), last_(clk.now()) {}

  /// Takes one token if there is one. Never blocks.
  [[nodiscard]] bool try_take() noexcept {
    std::lock_guard lock(mutex_);
    refill();
    if (tokens_ < 1.0) return false;
    tokens_ -= 1.0;
    return true;
  }

  /// The time at which the next token is available (now when one is).
  [[nodiscard]] time_point next_available() noexcept {
    std::lock_guard lock(mutex_);
    refill();
    if (tokens_ >= 1.0) return last_;
    const double missing_seconds = (1.0 - tokens_) / rate_;
    return last_ + std::chrono::duration_cast<duration>(std::chrono::duration<double>(missing_seconds)) +
           duration(1);
  }

  /// Tokens per second.
  [[nodiscard]] double rate() const noexcept { return rate_; }

 private:
  void refill() noexcept {
    const time_point now = clock_->now();
    if (now <= last_) return;
    const double elapsed = std::chrono::duration<double>(now - last_).count();
    tokens_ = std::min(burst_, tokens_ + elapsed * rate_);
    last_ = now;
  }

  double rate_;
  double burst_;
  double tokens_;
  const clock* clock_;
  time_point last_;
  std::mutex mutex_;
};

POSTBOX_END_NAMESPACE
