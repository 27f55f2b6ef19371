// SPDX-License-Identifier: MIT
// Shared helpers for postbox's tests: stress scaling and waiting on a condition.
#pragma once

#include <postbox/config.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <thread>

// AddressSanitizer, as g++ (__SANITIZE_ADDRESS__) and clang++ (__has_feature) say it.
#if defined(__SANITIZE_ADDRESS__)
#  define POSTBOX_TEST_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define POSTBOX_TEST_ASAN 1
#  endif
#endif
#ifndef POSTBOX_TEST_ASAN
#  define POSTBOX_TEST_ASAN 0
#endif

namespace postbox_test {

/// Sanitizer builds run stress loops with fewer iterations: the interleavings
/// are what matters there, not the count. POSTBOX_STRESS_SCALE (a percentage)
/// overrides.
inline std::uint64_t scaled(std::uint64_t n) {
  if (const char* s = std::getenv("POSTBOX_STRESS_SCALE")) {
    const auto pct = std::strtoull(s, nullptr, 10);
    return n * pct / 100 == 0 ? 1 : n * pct / 100;
  }
#if POSTBOX_TSAN || POSTBOX_TEST_ASAN
  return n / 10 == 0 ? 1 : n / 10;
#else
  return n;
#endif
}

/// Waits until `cond()` holds, checking it repeatedly (yielding in between),
/// for at most `bound` (generous: this is a hang guard, not a timing
/// assertion). Returns whether the condition held.
template <class Cond>
bool eventually(Cond&& cond, std::chrono::seconds bound = std::chrono::seconds(30)) {
  const auto give_up = std::chrono::steady_clock::now() + bound;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace postbox_test
