// SPDX-License-Identifier: MIT
// Bounded spinning with exponential pause, then yielding: the "spin" half of spin-then-park.
#pragma once

#include <postbox/config.hpp>

#include <thread>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#  include <immintrin.h>
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Tells the CPU we are in a spin loop (PAUSE on x86, YIELD on ARM), which
/// frees the sibling hyper-thread and avoids a memory-order flush on exit.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

/// Exponential backoff for lock-free retry loops: `spin()` pauses 1, 2, 4 …
/// 64 times; `snooze()` spins at first and yields the time slice later, which
/// matters on machines with fewer cores than runnable threads. `completed()`
/// says the caller should park instead of spinning further.
/// Never allocates, never blocks. Not thread-safe (one per loop).
class backoff {
 public:
  static constexpr unsigned spin_limit = 6;
  static constexpr unsigned yield_limit = 10;

  void spin() noexcept {
    for (unsigned i = 0; i < (1u << (step_ < spin_limit ? step_ : spin_limit)); ++i) cpu_relax();
    if (step_ <= spin_limit) ++step_;
  }

  void snooze() noexcept {
    if (step_ <= spin_limit) {
      for (unsigned i = 0; i < (1u << step_); ++i) cpu_relax();
    } else {
      std::this_thread::yield();
    }
    if (step_ <= yield_limit) ++step_;
  }

  [[nodiscard]] bool completed() const noexcept { return step_ > yield_limit; }
  void reset() noexcept { step_ = 0; }

 private:
  unsigned step_ = 0;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
