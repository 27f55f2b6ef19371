// SPDX-License-Identifier: MIT
// Asymmetric fences: a compiler-only barrier on the hot side, membarrier(2) on the rare side.
#pragma once

// Dekker's pattern (each side stores its flag, then reads the other's) needs
// a full barrier between the store and the load on BOTH sides. When one side
// runs per message and the other only when parking or closing, the full
// barrier can move entirely to the rare side: Linux's
// membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) makes every running thread of
// the process execute a full barrier before the call returns (a thread not
// running passes one at its context switch). So for any hot-side thread
// there is a point B in its program order, during the call, where it
// behaves as if it had executed a seq_cst fence:
//   * hot-side accesses before B are visible to the rare side after the call;
//   * hot-side accesses after B see everything the rare side wrote before it.
// The hot side then needs only a compiler barrier to keep its store and load
// in program order (the CPU may still reorder them; B resolves that case).
//
// Cost measured on the project's VMs: 6-8 us for a heavy fence while another
// thread of the process runs, about 0.35 us otherwise; the light fence is
// free. Where membarrier is unavailable (not Linux, an old kernel, seccomp)
// both sides fall back to std::atomic_thread_fence(seq_cst), chosen once at
// run time. Under ThreadSanitizer (POSTBOX_TSAN), which sees neither
// membarrier nor std::atomic_thread_fence, both sides always use a seq_cst
// read-modify-write of one shared word instead, which TSan does model, so
// TSan checks the same protocols with a real barrier on both sides.

#include <postbox/config.hpp>

#include <atomic>
#include <cstdlib>

// membarrier's commands are enumerators, not macros, so availability is
// decided by the header's presence, never by `defined(MEMBARRIER_CMD_...)`.
#if defined(__linux__) && defined(__has_include)
#  if __has_include(<linux/membarrier.h>) && !POSTBOX_TSAN && !defined(POSTBOX_NO_MEMBARRIER)
#    define POSTBOX_HAS_MEMBARRIER 1
#    include <linux/membarrier.h>
#    include <sys/syscall.h>
#    include <unistd.h>
#  endif
#endif
#ifndef POSTBOX_HAS_MEMBARRIER
#  define POSTBOX_HAS_MEMBARRIER 0
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Whether heavy_fence() is a real membarrier (else both sides use seq_cst
/// fences). Decided once, on first use, by registering the process for
/// private expedited membarriers. Thread-safe (a function-local static).
[[nodiscard]] inline bool membarrier_available() noexcept {
#if POSTBOX_HAS_MEMBARRIER
  static const bool available = [] {
    const long cmds = ::syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    if (cmds < 0 || (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return false;
    return ::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
  }();
  return available;
#else
  return false;
#endif
}

namespace fence_detail {
#if POSTBOX_TSAN
/// Under ThreadSanitizer, which does not model std::atomic_thread_fence (g++
/// says so with -Wtsan), every fence of this header is a seq_cst RMW on this
/// one word instead. On x86 that is a full barrier as well; TSan sees the
/// RMWs as a total order with acquire and release, so it checks the
/// asymmetric protocols as if both sides fenced (a stronger model than the
/// membarrier build, which TSan cannot see at all).
inline std::atomic<unsigned> tsan_fence_word{0};
#endif
/// Cached copy of membarrier_available(), read by every light fence. Written
/// once (relaxed) before the first heavy fence can run: every protocol that
/// relies on it makes its rare side call asymmetric_fence_init() (through
/// heavy_fence, or at construction) before any hot side reads it. A hot side
/// that still reads `false` only pays a real fence, which is always safe.
inline std::atomic<bool> light_is_compiler_only{false};
}  // namespace fence_detail

/// Decides membarrier support once and publishes it to light fences. Call
/// from constructors of structures that use the fences, so no light fence
/// runs as a compiler barrier before the rare side can answer it.
inline void asymmetric_fence_init() noexcept {
  if (membarrier_available()) fence_detail::light_is_compiler_only.store(true, std::memory_order_relaxed);
}

/// Whether light_fence() is a compiler barrier alone: membarrier is the heavy
/// fence, and this is not a ThreadSanitizer build (there light_fence() is a
/// seq_cst RMW). Meaningful once asymmetric_fence_init() has run. Never
/// blocks; thread-safe.
[[nodiscard]] inline bool light_fence_is_compiler_only() noexcept {
#if POSTBOX_TSAN
  return false;
#else
  // relaxed: written once by asymmetric_fence_init(), on this thread or
  // before the structure that asks was shared.
  return fence_detail::light_is_compiler_only.load(std::memory_order_relaxed);
#endif
}

/// The hot side's half: orders this thread's preceding accesses before its
/// following ones against a concurrent heavy_fence(). A compiler barrier
/// when membarrier is available, else a seq_cst fence. Never blocks.
inline void light_fence() noexcept {
#if POSTBOX_TSAN
  // seq_cst RMW: see tsan_fence_word.
  fence_detail::tsan_fence_word.fetch_add(0, std::memory_order_seq_cst);
#else
  if (POSTBOX_LIKELY(light_fence_is_compiler_only())) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
#endif
}

/// The rare side's half: a full barrier on this thread and, through
/// membarrier(2), on every other running thread of the process. Makes a
/// syscall (microseconds); use only when parking, closing or similar.
inline void heavy_fence() noexcept {
#if POSTBOX_HAS_MEMBARRIER
  if (membarrier_available()) {
    // The call itself is a full barrier for this thread too.
    if (::syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0) return;
    // After a successful registration this does not fail (fork keeps the
    // registration; exec replaces this static with the process image). If
    // it ever does, register again and retry once: a local fence alone
    // would not order hot sides that run compiler barriers only, so a
    // second failure stops the process rather than lose a wake-up.
    if (::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0 &&
        ::syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0)
      return;
    std::abort();
  }
#endif
#if POSTBOX_TSAN
  fence_detail::tsan_fence_word.fetch_add(0, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace detail
POSTBOX_END_NAMESPACE
