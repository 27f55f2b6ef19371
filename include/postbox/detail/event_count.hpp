// SPDX-License-Identifier: MIT
// An event count: lets threads park on "the queue changed" with no syscall on the notify side unless someone sleeps.
#pragma once

#include <postbox/config.hpp>
#include <postbox/detail/asymmetric_fence.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/waker.hpp>

#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <new>
#include <optional>
#include <stop_token>
#include <vector>

#if defined(__linux__)
#  include <linux/futex.h>
#  include <sys/syscall.h>
#  include <time.h>
#  include <unistd.h>
#else
#  include <condition_variable>
#  include <mutex>
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Parking for lock-free structures (the classic event count).
///
/// Waiter:  `key = prepare_wait()`; re-check the condition; if still false,
///          `wait(key, deadline)`; always `finish_wait()` afterwards.
/// Notifier: make the condition true with a seq_cst read-modify-write, then
///          call `notify_*`, which reads `waiters_` and does nothing else (no
///          syscall, no write) when nobody is parked.
///
/// Why no wake-up is lost: the waiter's `waiters_` increment and the
/// notifier's condition RMW are both seq_cst and each is followed (in program
/// order) by a seq_cst read of the other's location. In the single total
/// order S, either the notifier's `waiters_` read comes after the increment
/// (it sees a waiter and bumps the epoch, so the futex wait returns at once or
/// is woken), or it comes before, and then the waiter's re-check, later in S
/// than the notifier's RMW, observes the condition. This is Dekker's pattern
/// expressed through seq_cst operations only, with no standalone fence.
///
/// Three waiting protocols share the class: the symmetric one above
/// (prepare_wait / notify), the asymmetric one for rings with no RMW per
/// message (prepare_wait_asymmetric / notify_light, and its sole-waiter form
/// prepare_wait_sole / notify_light_sole: one wake per park), and the armed
/// one for several waiters (prepare_wait_armed / notify_armed: one wake of
/// all sleepers per park, not one syscall per notify). One event count uses
/// one protocol for its threads; wake_all() and registered wakers work with
/// all three.
///
/// On Linux the epoch word is a futex (private, with absolute CLOCK_MONOTONIC
/// timeouts); elsewhere a mutex and condition variable stand in, used only on
/// the slow path. All members are thread-safe and never allocate.
class event_count {
 public:
  using steady = std::chrono::steady_clock;

  /// Announces a waiter and returns the epoch to wait on.
  [[nodiscard]] std::uint32_t prepare_wait() noexcept {
    // seq_cst: the Dekker half described above; pairs with the seq_cst load
    // in has_waiters() on the notifier side.
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    // seq_cst: must be read after the increment in S, so a notify that missed
    // our increment cannot also have bumped the epoch unseen.
    return epoch_.load(std::memory_order_seq_cst);
  }

  /// prepare_wait() for a protocol whose notifiers make no seq_cst RMW per
  /// message (single-producer/single-consumer rings): the waiter pays a
  /// heavy_fence() (membarrier) after announcing itself, and notifiers use
  /// notify_light(). Its partner is the light_fence() in notify_light(): for
  /// the notifier there is a barrier point B during our heavy fence; if its
  /// condition store precedes B our re-check sees it, else its waiters_ load
  /// follows B and sees our increment. Makes a syscall; rare side only.
  [[nodiscard]] std::uint32_t prepare_wait_asymmetric() noexcept {
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    heavy_fence();
    // seq_cst: as in prepare_wait(); read after the fence.
    return epoch_.load(std::memory_order_seq_cst);
  }

  /// prepare_wait_asymmetric() for an event count on which at most one thread
  /// waits at a time (the single consumer or the single producer of an spsc
  /// ring), paired with notify_light_sole(). Besides announcing the waiter it
  /// re-arms the wake: its read of the epoch also clears `wake_pending`, so
  /// the first notify_light_sole() after it wakes the thread and later ones,
  /// until the next prepare, make no syscall. Makes a syscall; rare side only.
  [[nodiscard]] std::uint32_t prepare_wait_sole() noexcept {
    waiters_.fetch_add(1, std::memory_order_seq_cst);  // seq_cst: as in prepare_wait_asymmetric()
    heavy_fence();
    // seq_cst RMW: reads the epoch to wait on and clears the pending mark in
    // one step; pairs with the fetch_or in notify_light_sole(). A notifier
    // whose fetch_or precedes this RMW in the epoch's modification order is
    // synchronized with (RMWs continue its release sequence), so our
    // re-check sees its condition; one that follows it finds the mark clear
    // (and wakes us) or set by a later notifier (who wakes us), and either
    // way the futex word no longer equals our key.
    return epoch_.fetch_and(~wake_pending, std::memory_order_seq_cst) & ~wake_pending;
  }

  /// prepare_wait() for the armed protocol, paired with notify_armed(): any
  /// number of waiting threads (competing receivers or senders of an mpmc
  /// ring, the members of a topic group), one futex wake per park instead of
  /// one per notify. Announces the waiter, then sets the `armed` bit of the
  /// futex word and returns the armed word as the key. The first
  /// notify_armed() that finds the bit set clears it (and advances the
  /// epoch) with one CAS and wakes every sleeping thread; later notifies see
  /// it clear and make no RMW and no syscall until a waiter arms again.
  /// Rare side only (one RMW more than prepare_wait()).
  ///
  /// Why every thread and not one: with the arm consumed, a second message
  /// finds the bit clear and wakes nobody; had the wake taken only one of two
  /// sleepers, that one takes the first message and the second sleeper stays
  /// asleep beside the second message (the stranding the test
  /// "two parked receivers and two sends: both messages are received" rules
  /// out). Waking all costs the parked threads a herd, but once per arm, not
  /// per message: each woken thread drains what it finds or re-arms; a
  /// wake-one hand-off (the woken thread re-arms and re-checks for the
  /// sleepers left) would add an RMW and a re-check to every woken receive.
  [[nodiscard]] std::uint32_t prepare_wait_armed() noexcept {
    // seq_cst: the Dekker half of prepare_wait(), for the notifier's gate
    // load of waiters_ in notify_armed().
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    // seq_cst RMW: the arm; pairs with the seq_cst load of the word in
    // wake_armed(). Dekker with the caller's re-check (a seq_cst read of the
    // condition): in the single total order S, if the re-check misses a
    // notifier's condition RMW, that RMW, then its waiters_ gate load and its
    // load of the word, all follow this arm; the load reads the arm or a
    // later value: armed (the notifier takes it and wakes), or already taken
    // by another notifier, which moved the word off our key and wakes every
    // sleeper. A notifier whose load precedes the arm in S (it read a value
    // before the arm in the word's modification order) had its condition RMW
    // earlier still, so our re-check sees it.
    return epoch_.fetch_or(armed_bit, std::memory_order_seq_cst) | armed_bit;
  }

  /// notify() for prepare_wait_armed(): after the caller's seq_cst RMW that
  /// made the condition true. Nobody announced: one load (as notify()).
  /// Threads announced but the arm already taken: one more load, no RMW, no
  /// syscall. Armed: one CAS that disarms, then a FUTEX_WAKE of every
  /// sleeper. Registered wakers (selects) are woken as by notify(). Never
  /// blocks, never allocates; thread-safe.
  void notify_armed(int n) noexcept {
    // seq_cst: the gate, as in notify(); pairs with the waiters_ increment
    // in prepare_wait_armed() (and register_waker()).
    const std::uint64_t w = waiters_.load(std::memory_order_seq_cst);
    if (POSTBOX_LIKELY(w == 0)) return;
    wake_armed(n, w);
  }

  /// Registers `w` to be woken by every notify until unregister_waker(w):
  /// the parking side of a select. Counts as a waiter for has_waiters(), so
  /// the same Dekker argument as prepare_wait() applies: the caller re-checks
  /// its condition after this returns, and a notifier that missed the
  /// re-check's window sees the waiter. `asymmetric` selects the protocol of
  /// prepare_wait_asymmetric (for rings whose notifiers use notify_light).
  /// Allocates (the registry grows); takes the registry lock. Rare side only.
  void register_waker(waker& w, bool asymmetric) {
    {
      const registry_lock lock(registry_busy_);
      wakers_.push_back(&w);
      // relaxed: read by wake() only after it has seen our waiters_ increment
      // below, which (seq_cst RMW, read by the notifier's seq_cst load)
      // makes this write and the push visible to it.
      registered_.store(static_cast<std::uint32_t>(wakers_.size()), std::memory_order_relaxed);
    }
    waiters_.fetch_add(waker_unit, std::memory_order_seq_cst);  // seq_cst: see prepare_wait()
    if (asymmetric) heavy_fence();
  }

  /// Withdraws a waker registered with register_waker(). Takes the registry
  /// lock, so no wake() or claim() is still calling `w` once this returns
  /// (a deferred wake a claim returned may still run: it does not use `w`).
  void unregister_waker(waker& w) noexcept {
    {
      const registry_lock lock(registry_busy_);
      for (auto it = wakers_.begin(); it != wakers_.end(); ++it) {
        if (*it == &w) {
          wakers_.erase(it);
          break;
        }
      }
      // relaxed: see register_waker().
      registered_.store(static_cast<std::uint32_t>(wakers_.size()), std::memory_order_relaxed);
    }
    waiters_.fetch_sub(waker_unit, std::memory_order_relaxed);  // relaxed: see finish_wait()
  }

  /// Withdraws the waiter announced by prepare_wait().
  void finish_wait() noexcept {
    // relaxed: the count only gates whether notifiers bother to wake; a stale
    // non-zero costs one spurious wake-up, never a lost one.
    waiters_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// Sleeps until the epoch moves past `key`, a notify arrives, `deadline`
  /// passes (returns false) or spuriously (returns true). Blocks.
  bool wait(std::uint32_t key, std::optional<steady::time_point> deadline) noexcept {
#if defined(__linux__)
    timespec ts{};
    timespec* tsp = nullptr;
    if (deadline) {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline->time_since_epoch()).count();
      if (ns <= 0 || *deadline <= steady::now()) return false;
      ts.tv_sec = static_cast<time_t>(ns / 1000000000);
      ts.tv_nsec = static_cast<long>(ns % 1000000000);
      tsp = &ts;
    }
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, which is
    // what std::chrono::steady_clock reads on Linux.
    const long rc = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&epoch_),
                              FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, key, tsp, nullptr,
                              FUTEX_BITSET_MATCH_ANY);
    if (rc != 0 && errno == ETIMEDOUT) return false;
    return true;
#else
    std::unique_lock lock(mutex_);
    if (deadline) {
      return cv_.wait_until(lock, *deadline, [&] { return epoch_.load(std::memory_order_seq_cst) != key; });
    }
    cv_.wait(lock, [&] { return epoch_.load(std::memory_order_seq_cst) != key; });
    return true;
#endif
  }

  /// True when some thread is between prepare_wait() and finish_wait().
  [[nodiscard]] bool has_waiters() const noexcept {
    // seq_cst: the notifier half of the Dekker pattern; pairs with the
    // seq_cst increment in prepare_wait().
    return waiters_.load(std::memory_order_seq_cst) != 0;
  }

  /// Threads between a prepare_wait*() and its finish_wait(), as of some
  /// recent instant (a snapshot for tests and statistics: a thread counted
  /// may be about to sleep, asleep, or just woken). Never blocks; thread-safe.
  [[nodiscard]] std::uint32_t threads_waiting_approx() const noexcept {
    // relaxed: a snapshot; nothing is published through it.
    return static_cast<std::uint32_t>(waiters_.load(std::memory_order_relaxed) & thread_mask);
  }

  /// Wakes up to `n` parked threads if any waiter is announced; otherwise
  /// does nothing at all (no write, no syscall).
  void notify(int n) noexcept {
    // seq_cst: as in has_waiters().
    const std::uint64_t w = waiters_.load(std::memory_order_seq_cst);
    if (w != 0) wake(n, w);
  }
  void notify_one() noexcept { notify(1); }
  void notify_all() noexcept { notify(INT_MAX); }

  /// notify() for the asymmetric protocol (see prepare_wait_asymmetric):
  /// after the caller's plain (release) condition store, a light fence and a
  /// relaxed read of waiters_. No RMW, no hardware fence, no syscall when
  /// nobody waits.
  void notify_light(int n) noexcept {
    light_fence();
    // acquire: ordered after the caller's condition store by the light fence
    // and the waiter's heavy fence (see prepare_wait_asymmetric); acquire
    // (free on x86) so a waiter's registration (register_waker) is visible
    // to wake() once its increment is seen.
    const std::uint64_t w = waiters_.load(std::memory_order_acquire);
    if (w != 0) wake(n, w);
  }

  /// notify_light() for prepare_wait_sole(): the sole waiting thread gets one
  /// futex wake per wait, not one per notify. While it is announced but not
  /// yet running again (a wake-up takes tens of microseconds), a notifier
  /// that finds the wake already pending makes one uncontended RMW instead
  /// of a FUTEX_WAKE syscall: a fast producer used to make one syscall per
  /// message to a parked consumer (about 50,000 per million messages in
  /// the blocking 1P1C benchmark against about 60 parks). Registered wakers
  /// (selects) are woken as by notify_light().
  ///
  /// Requires mark_light_fence_mode() before the event count is shared: the
  /// notify fences only where the waiter word says light_fence() is a real
  /// fence, so with membarrier it costs one load and a branch (the flag
  /// light_fence() reads would be a second load and branch, per message).
  void notify_light_sole(int n) noexcept {
    // The light fence where it is a compiler barrier. Where it is a real
    // fence, the word read below carries light_fence_bit, and wake_sole()
    // fences and reads it again: the read that decides follows a fence
    // either way.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    // acquire: as in notify_light().
    const std::uint64_t w = waiters_.load(std::memory_order_acquire);
    // The per-message path ends here; the rest is out of line, so this
    // inlines into every send and receive of the ring.
    if (POSTBOX_LIKELY(w == 0)) return;
    wake_sole(n, w);
  }

  /// For an event count notified through notify_light_sole(): records in the
  /// waiter word whether light_fence() is a real fence (`real_fence`: no
  /// membarrier, or ThreadSanitizer; the caller asks
  /// light_fence_is_compiler_only() after asymmetric_fence_init()), so a
  /// notify learns it from the one load it makes anyway. Call once, before
  /// the event count is shared (no waiter yet). Marking one whose light fence
  /// is a compiler barrier only costs its notifies a fence (tests do).
  /// Never blocks, never allocates.
  void mark_light_fence_mode(bool real_fence) noexcept {
    // relaxed: before the event count is shared; every later RMW of the
    // word keeps the bit, so every load of it sees the bit.
    if (real_fence) waiters_.fetch_or(light_fence_bit, std::memory_order_relaxed);
  }

  /// Wakes every parked thread whether or not a waiter is announced: for a
  /// condition set without a seq_cst RMW of the notifier protocol (a stop
  /// request, a handle detached). A waiter that read the epoch before this
  /// bump does not sleep; one that reads it after synchronizes with the bump
  /// and so sees whatever was written before it. Makes a syscall.
  void wake_all() noexcept { wake(INT_MAX, thread_mask); }

 private:
  /// notify_light_sole() once it has seen waiters (`seen`, non-zero). Kept
  /// out of line and cold: inlined, its syscall set-up made the caller's
  /// send/receive loop spill registers on every message (spsc 1P1C, one
  /// send then one receive: 84 -> 68 instructions per message, callgrind).
#if defined(__GNUC__) || defined(__clang__)
  [[gnu::noinline, gnu::cold]]
#endif
  void wake_sole(int n, std::uint64_t seen) noexcept {
    if ((seen & light_fence_bit) != 0) {
      // light_fence() is a real fence (see mark_light_fence_mode): fence,
      // and decide on a read after it, as notify_light() does.
      light_fence();
      // acquire: as in notify_light().
      seen = waiters_.load(std::memory_order_acquire);
      if ((seen & ~light_fence_bit) == 0) return;
    }
    wake(n, seen & waker_mask);  // the registered wakers only: no epoch bump, no syscall
    if ((seen & thread_mask) == 0) return;
    // seq_cst RMW: marks the wake pending; pairs with the fetch_and in
    // prepare_wait_sole(). Only the notifier that sets the mark wakes; it
    // wakes every sleeper, so the argument there holds even if a second
    // thread (against the contract) waited too.
    if ((epoch_.fetch_or(wake_pending, std::memory_order_seq_cst) & wake_pending) != 0) return;
    futex_wake(INT_MAX);
  }

  /// notify_armed() once it has seen waiters (`seen`, non-zero). Out of
  /// line and cold, as wake_sole(): inlined, it cost every mpmc receive 3
  /// instructions (callgrind, channel_bench --profile receive mpmc).
#if defined(__GNUC__) || defined(__clang__)
  [[gnu::noinline, gnu::cold]]
#endif
  void wake_armed(int n, std::uint64_t seen) noexcept {
    wake(n, seen & waker_mask);  // the registered wakers only: no epoch bump, no syscall
    if ((seen & thread_mask) == 0) return;
    // seq_cst: the notifier half of the arm's Dekker pattern; pairs with the
    // fetch_or in prepare_wait_armed(). Ordered after our caller's condition
    // RMW, so a waiter whose arm this load misses re-checks after that RMW.
    std::uint32_t e = epoch_.load(std::memory_order_seq_cst);
    if ((e & armed_bit) == 0) return;  // nobody armed since the last wake: no RMW, no syscall
    // relaxed CAS: takes the arm and advances the epoch in one step, so no
    // thread sleeps on the key it armed with; only its atomicity matters
    // (one notifier takes an arm). No ordering pairs with it: the no-lost-
    // wake-up argument (prepare_wait_armed) runs through the seq_cst load
    // above and the waiter's seq_cst arm, and the futex syscall that follows
    // orders this store with a sleeper's compare in the kernel. (Relacy's
    // mutation check confirms nothing depends on a stronger order here.)
    // Failing, the word changed since our load: another notifier took the
    // arm and wakes everyone, or wake() bumped it and wakes everyone.
    if (!epoch_.compare_exchange_strong(e, (e + 1) & ~armed_bit, std::memory_order_relaxed,
                                        std::memory_order_relaxed))
      return;
    futex_wake(INT_MAX);  // every sleeper: see prepare_wait_armed()
  }

  /// `seen` is the waiters_ value the notifier read. With no thread among
  /// it (only registered wakers: coroutines, selects), the epoch bump and
  /// the futex syscall are skipped: a thread whose prepare_wait increment
  /// the read missed re-checks its condition after the notifier's change
  /// (the Dekker argument in the class comment), so it needs no wake-up.
  void wake(int n, std::uint64_t seen) noexcept {
    // relaxed: a waker registered before the waiters_ increment this
    // notifier observed is visible here (see register_waker); one registered
    // later re-checks its condition itself.
    if (registered_.load(std::memory_order_relaxed) != 0) {
      // The claims are made under the registry lock (a waker stays alive
      // while registered), the posts they return after it is released, so
      // the lock is held for a few CASes, not for a scheduler's post (a
      // mutex, an allocation, maybe a syscall) per waker. Past the buffer,
      // a claim's post runs under the lock: correct, only slower.
      std::array<deferred_wake, deferred_capacity> later{};
      std::size_t n_later = 0;
      {
        const registry_lock lock(registry_busy_);
        // Every registered select is woken, whatever `n`: a select woken for
        // one case may complete another, so waking only some could strand a
        // message while another select or thread sleeps.
        for (waker* w : wakers_) {
          const deferred_wake d = w->claim();
          if (!d) continue;
          if (n_later < later.size()) {
            later[n_later++] = d;
          } else {
            d();
          }
        }
      }
      for (std::size_t i = 0; i < n_later; ++i) later[i]();
    }
    if ((seen & thread_mask) == 0) return;
    // seq_cst: a waiter that read the old epoch in prepare_wait() either sees
    // this new value in the futex check or is woken below. (For
    // prepare_wait_sole's key, whose wake_pending bit is clear, any change
    // of the word, this one included, fails the futex compare.)
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake(n);
  }

  /// Wakes up to `n` threads sleeping in wait(). Makes a syscall.
  void futex_wake(int n) noexcept {
#if defined(__linux__)
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&epoch_), FUTEX_WAKE | FUTEX_PRIVATE_FLAG, n,
              nullptr, nullptr, 0);
#else
    std::lock_guard lock(mutex_);
    if (n == 1) {
      cv_.notify_one();
    } else {
      cv_.notify_all();
    }
#endif
  }

  /// Futex word. Bumped (seq_cst RMW) only by notifiers that saw a waiter;
  /// read (seq_cst) by waiters in prepare_wait() and by the kernel. In the
  /// sole-waiter protocol its bit `wake_pending` is set (seq_cst fetch_or)
  /// by the notifier that wakes and cleared (seq_cst fetch_and) by the
  /// waiter's prepare_wait_sole(); see there.
  /// In the armed protocol its top bit `armed_bit` is set (seq_cst
  /// fetch_or) by prepare_wait_armed() and cleared, with an epoch step, by
  /// the one notify_armed() whose CAS (relaxed: atomicity only) takes it;
  /// the arm's partner is the notifier's seq_cst load of the word in
  /// wake_armed() (see both). wake()'s increment leaves the bit alone (a
  /// stale arm costs one later wake, never a lost one).
  std::atomic<std::uint32_t> epoch_{0};
  static constexpr std::uint32_t wake_pending = 1;
  static constexpr std::uint32_t armed_bit = std::uint32_t{1} << 31;
  /// Threads between prepare_wait() and finish_wait() (low 31 bits, unit 1)
  /// plus registered wakers (high 32 bits, unit waker_unit), one word so a
  /// notifier reads both with its one Dekker load. Incremented seq_cst by
  /// waiters, read seq_cst by notifiers (has_waiters); see the class comment.
  /// Bit 31, light_fence_bit, is set once by mark_light_fence_mode() (relaxed,
  /// before sharing) and never cleared; only notify_light_sole()'s event
  /// counts carry it.
  std::atomic<std::uint64_t> waiters_{0};
  static constexpr std::uint64_t waker_unit = std::uint64_t{1} << 32;
  static constexpr std::uint64_t light_fence_bit = std::uint64_t{1} << 31;
  static constexpr std::uint64_t thread_mask = light_fence_bit - 1;
  static constexpr std::uint64_t waker_mask = ~(waker_unit - 1);
  /// Deferred wakes one notify keeps on its stack (see wake()).
  static constexpr std::size_t deferred_capacity = 8;
  /// Wakers registered by selects in progress; guarded by registry_busy_.
  std::vector<waker*> wakers_;
  /// wakers_.size(), readable without the mutex: lets wake() skip the lock
  /// when no select waits. Written under the mutex (relaxed), read by wake()
  /// (relaxed; ordered by the waiters_ handshake, see register_waker).
  std::atomic<std::uint32_t> registered_{0};
  /// Guards wakers_: a spin lock, held for a push, an erase or one round of
  /// wake() calls (each a short critical section of the waker's own). A
  /// test-and-set with acquire on lock and release on unlock.
  std::atomic<bool> registry_busy_{false};

  class registry_lock {
   public:
    explicit registry_lock(std::atomic<bool>& busy) noexcept : busy_(busy) {
      // acquire: pairs with the release in ~registry_lock, so the previous
      // holder's changes to wakers_ are visible.
      // The holder may be preempted, or wait briefly for a waker's own
      // mutex: spin, then yield the core (backoff::snooze).
      backoff wait;
      while (busy_.exchange(true, std::memory_order_acquire)) {
        while (busy_.load(std::memory_order_relaxed)) wait.snooze();
      }
    }
    ~registry_lock() { busy_.store(false, std::memory_order_release); }
    registry_lock(const registry_lock&) = delete;
    registry_lock& operator=(const registry_lock&) = delete;

   private:
    std::atomic<bool>& busy_;
  };
#if !defined(__linux__)
  std::mutex mutex_;
  std::condition_variable cv_;
#endif
};

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "the futex word must be a plain 32-bit integer in memory");

/// The stop tokens a blocking call watches: the caller's, and one the
/// component may add (a subscription handle being reset). Default: none.
/// Cheap to copy around by reference; never allocates.
struct stop_tokens {
  const std::stop_token* first = nullptr;
  const std::stop_token* second = nullptr;
  [[nodiscard]] bool stop_requested() const noexcept {
    return (first != nullptr && first->stop_requested()) || (second != nullptr && second->stop_requested());
  }
};

/// While alive, a stop request on any of `tokens` wakes every thread parked
/// on `ev` (the waiter then re-checks its tokens). Registers only tokens that
/// can be stopped; the registration allocates nothing beyond std::stop_callback.
/// A registration is a few RMWs on the token's state: a waiter that may not
/// park at all (the channel's blocking calls) default-constructs one and
/// arm()s it only right before its first park. Not thread-safe (one waiter).
class stop_wakeup {
  struct wake_fn {
    event_count* ev;
    void operator()() const noexcept { ev->wake_all(); }
  };
  using callback = std::stop_callback<wake_fn>;
  // Storage for an optional callback, by hand: g++ 12 at -O1 under
  // ThreadSanitizer reports std::optional<std::stop_callback> as maybe
  // uninitialized (a false positive in its engaged check).
  union slot {
    slot() noexcept {}
    ~slot() {}
    slot(const slot&) = delete;
    slot& operator=(const slot&) = delete;
    callback cb;
  };

 public:
  /// Registers nothing yet (see arm()).
  stop_wakeup() noexcept = default;
  stop_wakeup(event_count& ev, const stop_tokens& tokens) { arm(ev, tokens); }

  /// Registers `tokens` to wake `ev`, once: a later call does nothing. A stop
  /// already requested runs the wake here, before arm() returns. Never blocks;
  /// allocates nothing (std::stop_callback keeps its node in this object).
  void arm(event_count& ev, const stop_tokens& tokens) {
    if (armed_) return;
    armed_ = true;
    if (tokens.first != nullptr && tokens.first->stop_possible()) {
      ::new (static_cast<void*>(&a_.cb)) callback(*tokens.first, wake_fn{&ev});
      has_a_ = true;
    }
    if (tokens.second != nullptr && tokens.second->stop_possible()) {
      ::new (static_cast<void*>(&b_.cb)) callback(*tokens.second, wake_fn{&ev});
      has_b_ = true;
    }
  }
  ~stop_wakeup() {
    if (has_b_) b_.cb.~callback();
    if (has_a_) a_.cb.~callback();
  }
  stop_wakeup(const stop_wakeup&) = delete;
  stop_wakeup& operator=(const stop_wakeup&) = delete;

 private:
  slot a_;
  slot b_;
  bool has_a_ = false;
  bool has_b_ = false;
  bool armed_ = false;
};

/// Converts a deadline on any clock to steady_clock (the clock futex and the
/// event count wait on); time points at the far end mean "no deadline".
template <class Clock, class Duration>
std::optional<std::chrono::steady_clock::time_point> to_steady_deadline(
    const std::chrono::time_point<Clock, Duration>& deadline) {
  using steady = std::chrono::steady_clock;
  if (deadline == std::chrono::time_point<Clock, Duration>::max()) return std::nullopt;
  if constexpr (std::is_same_v<Clock, steady>) {
    return std::chrono::time_point_cast<steady::duration>(deadline);
  } else {
    const auto remaining = deadline - Clock::now();
    const auto limit = std::chrono::hours(24 * 365 * 100);
    if (remaining > limit) return std::nullopt;
    return steady::now() + std::chrono::duration_cast<steady::duration>(remaining);
  }
}

}  // namespace detail
POSTBOX_END_NAMESPACE
