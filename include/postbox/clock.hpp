// SPDX-License-Identifier: MIT
// The injectable clock behind every timed behaviour in postbox (the timer service on it is in timer_service.hpp).
#pragma once

#include <postbox/error.hpp>
#include <postbox/detail/chrono.hpp>

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <mutex>

#if defined(__linux__)
#  include <time.h>
#  if (defined(__x86_64__) || defined(__aarch64__)) && defined(__has_include)
#    if __has_include(<sys/auxv.h>) && __has_include(<elf.h>)
#      define POSTBOX_VDSO_CLOCK 1
#      include <elf.h>
#      include <sys/auxv.h>
#      include <cstring>
#    endif
#  endif
#endif
#ifndef POSTBOX_VDSO_CLOCK
#  define POSTBOX_VDSO_CLOCK 0
#endif

POSTBOX_BEGIN_NAMESPACE

/// postbox measures time in nanoseconds on the wall clock (UTC), because the
/// same time points travel inside envelopes (`occurred_at`, `deadline`) and
/// must mean the same thing in another process.
using duration = std::chrono::nanoseconds;
using time_point = std::chrono::time_point<std::chrono::system_clock, duration>;

/// The clock concept: every component that retries, expires, times out or
/// schedules reads `now()` from one of these and waits through `wait_until`,
/// so tests swap in `postbox::manual_clock` (testing.hpp) and never sleep.
/// Implementations are thread-safe.
class clock {
 public:
  virtual ~clock() = default;

  /// Current time. Never blocks, never allocates. Thread-safe.
  [[nodiscard]] virtual time_point now() const noexcept = 0;

  /// Blocks the caller, who holds `lock`, until `deadline` has passed on this
  /// clock, `cv` is notified, or spuriously; `lock` is released while
  /// waiting, exactly as `std::condition_variable::wait_until`. Callers loop
  /// on their own condition. Thread-safe.
  virtual void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                          time_point deadline) const = 0;

  /// For hot paths that read the time per message (postbox::stream's
  /// append): the word this clock's now() reads, in nanoseconds since the
  /// epoch, to be loaded relaxed without a virtual call, when its time is
  /// such a word (`cached_clock`); null otherwise, the default. Never blocks.
  [[nodiscard]] virtual const std::atomic<std::int64_t>* published_now() const noexcept { return nullptr; }
};

/// The real clock: `std::chrono::system_clock`. Thread-safe, never allocates.
class real_clock final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override {
    return std::chrono::time_point_cast<duration>(std::chrono::system_clock::now());
  }
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    if (deadline == time_point::max()) {
      cv.wait(lock);
    } else {
      cv.wait_until(lock, deadline);
    }
  }
};

/// The process-wide real clock used when a component is given no clock.
[[nodiscard]] inline const clock& default_clock() noexcept {
  static const real_clock instance;
  return instance;
}

namespace detail {
#if POSTBOX_VDSO_CLOCK
using vdso_gettime_fn = int (*)(clockid_t, timespec*);

/// The kernel's own clock_gettime in the vDSO (found through the ELF image
/// the kernel maps into every process, AT_SYSINFO_EHDR), or null when there
/// is none (valgrind maps none) or its symbol table cannot be read. Calling
/// it directly skips glibc's wrapper: a CLOCK_REALTIME_COARSE read took
/// 3.0 ns instead of 4.7 (thread CPU time, 2-core AMD EPYC VM). Never
/// allocates; reads only the mapped image.
inline vdso_gettime_fn vdso_clock_gettime() noexcept {
#  if defined(__x86_64__)
  const char* const name = "__vdso_clock_gettime";
#  else
  const char* const name = "__kernel_clock_gettime";
#  endif
  const unsigned long base = ::getauxval(AT_SYSINFO_EHDR);
  if (base == 0) return nullptr;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return nullptr;
  const auto* ph = reinterpret_cast<const Elf64_Phdr*>(base + eh->e_phoff);
  unsigned long bias = 0;  // run-time address minus link-time address
  bool loaded = false;
  const Elf64_Dyn* dyn = nullptr;
  for (unsigned i = 0; i < eh->e_phnum; ++i) {
    if (ph[i].p_type == PT_LOAD && !loaded) {
      bias = base + ph[i].p_offset - ph[i].p_vaddr;
      loaded = true;
    } else if (ph[i].p_type == PT_DYNAMIC) {
      dyn = reinterpret_cast<const Elf64_Dyn*>(base + ph[i].p_offset);
    }
  }
  if (!loaded || dyn == nullptr) return nullptr;
  const Elf64_Sym* syms = nullptr;
  const char* strs = nullptr;
  const Elf32_Word* hash = nullptr;  // DT_HASH: nbucket, nchain (= symbol count), ...
  for (const Elf64_Dyn* d = dyn; d->d_tag != DT_NULL; ++d) {
    if (d->d_tag == DT_SYMTAB) syms = reinterpret_cast<const Elf64_Sym*>(bias + d->d_un.d_ptr);
    if (d->d_tag == DT_STRTAB) strs = reinterpret_cast<const char*>(bias + d->d_un.d_ptr);
    if (d->d_tag == DT_HASH) hash = reinterpret_cast<const Elf32_Word*>(bias + d->d_un.d_ptr);
  }
  if (syms == nullptr || strs == nullptr || hash == nullptr) return nullptr;
  for (Elf32_Word i = 0; i < hash[1]; ++i) {
    const Elf64_Sym& sym = syms[i];
    if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || sym.st_shndx == SHN_UNDEF) continue;
    if (std::strcmp(strs + sym.st_name, name) == 0) return reinterpret_cast<vdso_gettime_fn>(bias + sym.st_value);
  }
  return nullptr;
}

/// vdso_clock_gettime(), found once during static initialization (null
/// before it, and wherever there is no vDSO: readers then call libc's
/// clock_gettime). Written once, before main; read by coarse_clock::now().
inline const vdso_gettime_fn vdso_gettime = vdso_clock_gettime();
#endif
}  // namespace detail

/// A real clock read at the kernel tick's resolution: CLOCK_REALTIME_COARSE
/// on Linux (the time of the last tick: 1 to 4 ms, see `resolution()`), about
/// 3 ns per read against 25-60 ns for system_clock in a VM, because it reads
/// no hardware counter (it calls the vDSO's clock_gettime directly when it
/// can find it, skipping glibc's wrapper). Its `now()` is never ahead of system_clock and lags it
/// by about one resolution (a tick; more when the kernel updates it late; plus
/// any NTP step); elsewhere it is system_clock. The default clock of postbox::stream, whose per-record
/// timestamps must cost less than the append itself. Thread-safe, never allocates.
class coarse_clock final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override { return read(); }
  /// now() without the object: what postbox::stream's append calls, forced
  /// inline there (g++ 12 -O3 called an out-of-line clone of now() per
  /// record). Never blocks, never allocates; thread-safe.
#if defined(__GNUC__)
  [[gnu::always_inline]]
#endif
  [[nodiscard]] static time_point read() noexcept {
#if defined(__linux__)
    timespec ts{};
#  if POSTBOX_VDSO_CLOCK
    // The vDSO's clock_gettime when found (see detail::vdso_gettime), else
    // libc's, which calls the same vDSO function or makes the syscall.
    const detail::vdso_gettime_fn direct = detail::vdso_gettime;
    if (direct == nullptr || direct(CLOCK_REALTIME_COARSE, &ts) != 0) ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
#  else
    ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
#  endif
    return time_point(duration(static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec));
#else
    return std::chrono::time_point_cast<duration>(std::chrono::system_clock::now());
#endif
  }
  /// Waits until this clock's own now() has reached `deadline`, `cv` is
  /// notified, or spuriously. A timed-out wait never returns early: the
  /// kernel can update the coarse time late (a busy or virtualised host has
  /// been seen trailing system_clock by several ticks), so each round waits on
  /// system_clock for the time still missing plus one resolution, and on a
  /// timeout re-reads now() before returning; callers that loop on
  /// `now() < deadline` therefore never spin. Blocks; never allocates.
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    const auto slack = resolution();
    if (deadline >= time_point::max() - slack) {
      cv.wait(lock);
      return;
    }
    for (;;) {
      const auto missing = deadline - now();
      if (missing <= duration::zero()) return;
      const auto target = std::chrono::time_point_cast<duration>(std::chrono::system_clock::now()) + missing + slack;
      if (cv.wait_until(lock, target) == std::cv_status::no_timeout) return;
    }
  }
  /// The interval at which now() advances (clock_getres; 1 ns off Linux).
  /// Never blocks, never allocates. Thread-safe.
  [[nodiscard]] static duration resolution() noexcept {
#if defined(__linux__)
    timespec ts{};
    if (::clock_getres(CLOCK_REALTIME_COARSE, &ts) != 0) return std::chrono::milliseconds(10);
    return duration(static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec);
#else
    return duration(1);
#endif
  }
};

/// The process-wide coarse clock: postbox::stream's default clock.
[[nodiscard]] inline const clock& coarse_default_clock() noexcept {
  static const coarse_clock instance;
  return instance;
}

POSTBOX_END_NAMESPACE
