// SPDX-License-Identifier: MIT
// Bounded spinning with exponential pause, then yielding: the "spin" half of spin-then-park.
#pragma once

#include <postbox/config.hpp>

#include <thread>

// No <immintrin.h> for one instruction: it costs more to compile than the
// rest of channel.hpp. MSVC's intrinsic is declared in the much smaller <intrin.h>.
#if defined(_MSC_VER) && !defined(__clang__)
#  include <intrin.h>
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Tells the CPU we are in a spin loop (PAUSE on x86, YIELD on ARM), which
/// frees the sibling hyper-thread and avoids a memory-order flush on exit.
inline void cpu_relax() noexcept {
#if defined(_MSC_VER) && !defined(__clang__) && (defined(_M_X64) || defined(_M_IX86))
  _mm_pause();
#elif defined(_MSC_VER) && !defined(__clang__) && (defined(_M_ARM64) || defined(_M_ARM))
  __yield();
#elif defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield" ::: "memory");
#elif defined(__powerpc__) || defined(__powerpc64__)
  __asm__ __volatile__("or 27,27,27" ::: "memory");  // low thread priority hint
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

/// The budget of spin_until(): as long as backoff's snooze() phase (its
/// pauses 1 + 2 + ... + 64 = 127, then its yields), but checked more often.
struct spin_budget {
  static constexpr unsigned pauses = 128;
  static constexpr unsigned step = 4;  ///< pauses between two checks
  static constexpr unsigned yields = backoff::yield_limit - backoff::spin_limit;
  /// Yields of spin_until_idle(), which spends on yields what it saves on
  /// pauses: a waiter that parks sooner than its partner answers makes the
  /// partner's next send a FUTEX_WAKE and its own next wait a wake-up
  /// latency (blocking mpmc ping-pong under load, 10 alternating runs:
  /// median round trip 5.2 us spinning 128 pauses, 10 us after 16 idle
  /// pauses and 4 yields, 3.7 us after 16 idle pauses and 16 yields).
  static constexpr unsigned idle_yields = 16;
  static_assert(pauses >= (2u << backoff::spin_limit) - 1, "at least as long as backoff's pause phase");
};

/// Spins until `done()` returns true or the budget is spent: spin_budget::
/// pauses pauses, calling `done()` every `Step` of them, then (when
/// `yield_too`) spin_budget::yields yields, calling `done()` before each.
/// Returns true as soon as `done()` does; false after one last call found it
/// false. Unlike backoff::snooze(), whose doubling runs check only between
/// runs (a wait of 1-2 us ends inside a 32- or 64-pause run and is noticed up
/// to 0.8-1.6 us late, a pause costing about 25 ns), a condition that comes
/// true is seen within `Step` pauses. The step suits the wait: request-reply's
/// microsecond round trips use 4; a channel hand-off, a wait of about 100 ns
/// (two cache-line transfers), uses 1 (channel_api::spin_step).
/// Never blocks (beyond yielding), never allocates; `done` runs on the
/// calling thread only.
template <unsigned Step = spin_budget::step, class Done>
bool spin_until(Done&& done, bool yield_too = true) noexcept(noexcept(done())) {
  static_assert(Step >= 1 && spin_budget::pauses % Step == 0, "the budget is whole steps");
  for (unsigned spent = 0; spent < spin_budget::pauses; spent += Step) {
    if (done()) return true;
    for (unsigned i = 0; i < Step; ++i) cpu_relax();
  }
  if (yield_too) {
    for (unsigned i = 0; i < spin_budget::yields; ++i) {
      if (done()) return true;
      std::this_thread::yield();
    }
  }
  return done();
}

/// spin_until<1>() for a wait whose partner may share this core: the spin
/// also ends, and the yields begin, once `progress()` (a value the other
/// side changes as it works, such as a ring index) has stayed the same for
/// `IdleLimit` pauses in a row. A partner running on another core moves it
/// every few tens of nanoseconds; when it stands still, whoever could make
/// `done()` true is not running, most likely because it waits for this core,
/// and spinning on would only burn the time slice it needs. At most
/// spin_budget::pauses pauses, then spin_budget::idle_yields yields (more
/// than spin_until's; spin_budget::idle_yields says why). Never blocks (beyond yielding), never
/// allocates; `done` and `progress` run on the calling thread only.
template <unsigned IdleLimit, class Done, class Progress>
bool spin_until_idle(Done&& done, Progress&& progress) noexcept(noexcept(done()) && noexcept(progress())) {
  static_assert(IdleLimit >= 1 && IdleLimit <= spin_budget::pauses, "the idle limit is within the budget");
  auto seen = progress();
  unsigned idle = 0;
  for (unsigned spent = 0; spent < spin_budget::pauses; ++spent) {
    if (done()) return true;
    cpu_relax();
    const auto now = progress();
    if (now != seen) {
      seen = now;
      idle = 0;
    } else if (++idle == IdleLimit) {
      break;
    }
  }
  for (unsigned i = 0; i < spin_budget::idle_yields; ++i) {
    if (done()) return true;
    std::this_thread::yield();
  }
  return done();
}

}  // namespace detail
POSTBOX_END_NAMESPACE
