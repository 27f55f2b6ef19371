// SPDX-License-Identifier: MIT
// Stand-in retry policy for sagas, used only while postbox/retry.hpp is absent from the tree.
#pragma once

// saga.hpp uses postbox::retry_policy and postbox::jitter_source from
// <postbox/retry.hpp> whenever that header exists; this file keeps sagas
// buildable without it, with the same member names and meaning, so the two
// are interchangeable for saga code. It can be deleted once retry.hpp lands.

#include <postbox/clock.hpp>

#include <algorithm>
#include <cstdint>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Exponential backoff with an optional full jitter and a cap. `backoff(n,
/// bits)` is the wait after the n-th failed attempt (n >= 1):
/// min(initial * multiplier^(n-1), max), scaled by a uniform fraction in
/// [0, 1) taken from `bits` when `full_jitter`. `exhausted(n)`: n attempts
/// have failed and no more are allowed. Never allocates; a plain value.
struct saga_fallback_retry_policy {
  std::uint32_t max_attempts = 5;
  duration initial_backoff = std::chrono::milliseconds(100);
  double multiplier = 2.0;
  duration max_backoff = std::chrono::seconds(30);
  bool full_jitter = true;

  [[nodiscard]] duration backoff(std::uint32_t attempt, std::uint64_t random_bits) const noexcept {
    const double cap = static_cast<double>(max_backoff.count());
    double d = static_cast<double>(initial_backoff.count());
    for (std::uint32_t i = 1; i < attempt && d < cap; ++i) d *= multiplier;
    d = std::min(d, cap);
    if (full_jitter) d *= static_cast<double>(random_bits >> 11) * 0x1.0p-53;  // uniform in [0, 1)
    return duration(static_cast<duration::rep>(d));
  }
  [[nodiscard]] bool exhausted(std::uint32_t attempt) const noexcept { return attempt >= max_attempts; }
};

/// splitmix64: a seeded source of jitter bits. Never allocates; not thread-safe.
class saga_fallback_jitter {
 public:
  explicit saga_fallback_jitter(std::uint64_t seed) noexcept : state_(seed) {}
  [[nodiscard]] std::uint64_t next() noexcept {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

 private:
  std::uint64_t state_;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
