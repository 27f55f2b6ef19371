// SPDX-License-Identifier: MIT
// postbox::stream: a retained, partitioned, replayable log with readers, consumer groups and retention.
#pragma once

// Design: docs/design/stream.md.
//
// * Partition = FNV-1a 64 of the key's bytes modulo the partition count: stable
//   across runs, builds and platforms (`stream_partition_of`).
// * Storage: each partition is a list of fixed-size chunks (256 records) of
//   uninitialized slots; an append constructs its slot in place, then
//   publishes it by storing the partition's high-water mark `end` with
//   release; readers load it with acquire and read only below it, so they
//   never see a torn record. Chunks are reference counted from a chunk table
//   (`detail::stream_dir`) that readers copy (`detail::snapshot_ptr`, a
//   critical section of a few instructions); the appender adds entries in
//   place and replaces the table only when it is full or mostly dropped
//   chunks (amortized O(1) per chunk), so retention can drop a chunk while a
//   reader still holds it: the reader finishes with intact (immutable) data,
//   and any later read gets `out_of_range` with the earliest retained offset.
// * Appends to ONE partition are serialized by a per-partition lock held for
//   the slot write and the retention step only: the clock is read before it,
//   and the next chunk is allocated and its pages faulted in ahead, outside
//   it, by the append that half-fills the current chunk (the partition's
//   `spare`), so the lock covers no allocation but a chunk's small control
//   block and no page fault of a fresh chunk. The lock
//   (`detail::stream_append_lock`) is biased to the partition's first
//   appender, which takes and releases it with plain stores and a compiler
//   fence (no RMW, no hardware fence, no syscall); the first other thread to
//   take it revokes the bias for good with one membarrier, after which it is
//   uncontended one CAS and a plain release store; a contended appender spins
//   an adaptive budget of pauses, yields a few times, and only then parks
//   with the asymmetric protocol (it pays a membarrier, the unlock pays no
//   fence). The retention
//   step is skipped when no limit is set. Appends to different partitions
//   never contend. Readers take no lock at all, so they never block appenders.
// * Timestamps: a record's timestamp is the stream's clock at its append,
//   clamped to be non-decreasing per partition. The default clock is
//   `coarse_clock` (CLOCK_REALTIME_COARSE: the kernel tick's resolution,
//   1-4 ms, never ahead of system_clock), since a system_clock read costs more
//   than the whole rest of an append; pass `default_clock()` for nanosecond
//   timestamps, a `cached_clock` for a timestamp the append loads (one load,
//   no clock call; its ticker thread refreshes it), or a manual_clock in tests.
// * Consumer groups: deterministic round-robin assignment (partition p goes to
//   the (p mod m)-th member in join order); every join/leave bumps a
//   generation. A member's commit succeeds only in the generation in which it
//   polled (else errc::conflict and it resumes from the committed offsets), so
//   no two members ever commit the same record.
// * Lifetime: partitions, retention and clock pointer live in a shared
//   `detail::stream_log`; readers, group handles and members hold it by
//   shared_ptr, so any of them may outlive the `stream` object.
// * Waiting: one event count per stream (`stream_log::appended_`). An
//   append, after its release store of `end` and outside the partition lock,
//   calls notify_light: a compiler fence and one load of the waiter word, no
//   RMW, no syscall when nobody waits. Waiters (poll_wait, async_poll) use
//   the asymmetric side (prepare_wait_asymmetric / register_waker(.., true)),
//   which pays the membarrier. Destroying the `stream` closes the log and
//   wakes every waiter, which then reports errc::closed once drained.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/event_count.hpp>
#include <postbox/detail/group_membership.hpp>
#include <postbox/detail/topic_snapshot.hpp>
#include <postbox/error.hpp>

#include <array>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <mutex>
#include <optional>
#include <string>
#include <stop_token>
#include <string_view>
#include <thread>
#include <vector>

// The append's common path is inlined into the caller (an out-of-line call
// saved and restored six callee-saved registers per record: 17 of 163
// instructions, callgrind), and its rare paths (a new chunk, a spare chunk,
// a contended lock, retention) stay out of line so the inlined part is small.
#if defined(__GNUC__) || defined(__clang__)
#  define POSTBOX_STREAM_ALWAYS_INLINE [[gnu::always_inline]] inline
#  define POSTBOX_STREAM_NOINLINE [[gnu::noinline]]
#elif defined(_MSC_VER)
#  define POSTBOX_STREAM_ALWAYS_INLINE __forceinline
#  define POSTBOX_STREAM_NOINLINE __declspec(noinline)
#else
#  define POSTBOX_STREAM_ALWAYS_INLINE inline
#  define POSTBOX_STREAM_NOINLINE
#endif

POSTBOX_BEGIN_NAMESPACE

/// FNV-1a 64 of `key`, stable across runs and platforms. Never blocks or allocates.
[[nodiscard]] constexpr std::uint64_t fnv1a_64(std::string_view key) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char c : key) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

/// The partition a key maps to among `partitions`: fnv1a_64(key) % partitions.
[[nodiscard]] constexpr std::uint32_t stream_partition_of(std::string_view key, std::size_t partitions) noexcept {
  return static_cast<std::uint32_t>(fnv1a_64(key) % partitions);
}

/// Where a record lives.
struct position {
  std::uint32_t partition = 0;
  std::uint64_t offset = 0;
  friend bool operator==(const position&, const position&) = default;
};

/// A record read from a stream (a copy; the log keeps its own).
template <class T>
struct record {
  position pos;
  /// The stream's clock at the append, clamped to be non-decreasing per
  /// partition. With the default coarse_clock: wall-clock time at the kernel
  /// tick's resolution (1-4 ms, never ahead of system_clock).
  time_point timestamp;
  std::string key;
  T value;
};

/// Retention limits; 0 means unlimited. Checked on every append and by `trim()`;
/// age is also checked by every read, so an expired record is never returned.
struct retention {
  std::size_t max_count = 0;  ///< records per partition
  std::size_t max_bytes = 0;  ///< accounted bytes per partition (size function, default sizeof(T))
  duration max_age{0};        ///< age against the stream's clock
};

/// Where a reader starts in every partition.
struct start_from {
  enum class kind { earliest, latest, offset, time };
  kind where = kind::earliest;
  std::uint64_t offset = 0;
  time_point time{};
  /// The earliest retained record.
  [[nodiscard]] static start_from earliest() noexcept { return {}; }
  /// Only records appended after the reader was created.
  [[nodiscard]] static start_from latest() noexcept { return {kind::latest, 0, {}}; }
  /// A given offset (the same in every partition).
  [[nodiscard]] static start_from at_offset(std::uint64_t o) noexcept { return {kind::offset, o, {}}; }
  /// The first record with timestamp >= t.
  [[nodiscard]] static start_from at_time(time_point t) noexcept { return {kind::time, 0, t}; }
};

/// Result of a read or poll: status ok (records, possibly none) or
/// out_of_range (the next offset of `partition` is below retention;
/// `earliest` is the first retained offset there).
template <class T>
struct read_result {
  errc status = errc::ok;
  std::vector<record<T>> records;
  std::uint32_t partition = 0;
  std::uint64_t earliest = 0;
  [[nodiscard]] bool ok() const noexcept { return status == errc::ok; }
};

/// One partition in a stream_group_stats snapshot.
struct stream_partition_lag {
  std::uint32_t partition = 0;
  std::uint64_t committed = 0;  ///< next offset the group will consume
  std::uint64_t end = 0;        ///< next offset an append gets
  std::uint64_t lag = 0;        ///< end - committed (0 when committed is ahead)
};

/// A consumer group's state (snapshot, taken at one instant of the group lock).
struct stream_group_stats {
  std::size_t members = 0;
  std::uint64_t generation = 0;  ///< bumped by every join and leave
  std::uint64_t lag = 0;         ///< sum over partitions
  std::vector<stream_partition_lag> partitions;
};

namespace detail {

inline constexpr std::size_t stream_chunk_size = 256;

/// One record as the log keeps it: constructed in place by its append, never
/// changed afterwards, destroyed with its chunk.
template <class T>
struct stream_slot {
  time_point ts;
  std::string key;
  T value;
};

/// 256 slots of uninitialized storage. An append constructs its slot in
/// place, so a fresh chunk is neither zero-filled nor default-constructed
/// first (either would touch all of its memory once more). Slots
/// [0, constructed) are live and are destroyed with the chunk.
template <class T>
class stream_chunk {
 public:
  stream_chunk() noexcept {}  // user-provided: make_shared leaves storage_ uninitialized
  ~stream_chunk() {
    for (std::size_t i = 0; i < constructed; ++i) std::destroy_at(&slot(i));
  }
  stream_chunk(const stream_chunk&) = delete;
  stream_chunk& operator=(const stream_chunk&) = delete;

  /// Slot `i`; only below `constructed` (or the partition's `end`) is it live.
  [[nodiscard]] const stream_slot<T>& slot(std::size_t i) const noexcept {
    return *std::launder(reinterpret_cast<const stream_slot<T>*>(storage_ + i * sizeof(stream_slot<T>)));
  }
  /// Constructs slot `i` (the next one). On an exception nothing is constructed.
  void construct(std::size_t i, time_point ts, std::string_view key, T&& value) {
    ::new (static_cast<void*>(storage_ + i * sizeof(stream_slot<T>)))
        stream_slot<T>{ts, std::string(key), std::move(value)};
  }

  /// Touches every page of the slot storage once (one byte per 4 KiB page),
  /// so the page faults of a fresh chunk are paid here, by the thread that
  /// prepares it outside the append lock, not by the append that fills the
  /// slot. Writes raw bytes no slot is constructed in yet. Never blocks.
  void prefault() noexcept {
    auto* bytes = static_cast<volatile unsigned char*>(storage_);
    for (std::size_t i = 0; i < sizeof(storage_); i += 4096) bytes[i] = 0;
    bytes[sizeof(storage_) - 1] = 0;
  }

  // Slots constructed, for the destructor. Kept by the partition as its
  // tail_fill while the chunk is its tail, and written here (under the
  // append lock) only when the partition lets the chunk go: when the next
  // chunk is added, when a rebuild may drop it, and by ~stream_partition
  // (stream_partition::release_tail), not by every append. Read by the
  // destructor, which runs once the last reference is gone (the
  // shared_ptr count's acq_rel decrement orders it after that write).
  std::size_t constructed = 0;

 private:
  alignas(stream_slot<T>) unsigned char storage_[stream_chunk_size * sizeof(stream_slot<T>)];
};

/// A partition's chunk table: entries [0, used) hold the chunks from offset
/// `base` on (`used` is the appender's, in stream_partition). An entry is
/// written once, in place, while it is past every reader's `end`, and the
/// release store of `end` that covers its first slot publishes it. The table
/// itself is replaced (copy-on-write, through the partition's snapshot_ptr)
/// only when it is full, or when retention left it more dropped than live
/// chunks: each replacement copies the live entries only and at least
/// doubles the room, so a chunk costs O(1) amortized (copying the whole
/// directory for every chunk made a long stream's appends O(n)).
template <class T>
struct stream_dir {
  stream_dir(std::uint64_t b, std::size_t cap)
      : base(b), chunks(std::make_unique<std::shared_ptr<stream_chunk<T>>[]>(cap)), capacity(cap) {}
  std::uint64_t base;  // offset of chunks[0]'s slot 0
  std::unique_ptr<std::shared_ptr<stream_chunk<T>>[]> chunks;
  std::size_t capacity;
};

/// A process-unique, nonzero identity of the calling thread: a counter
/// handed out on the thread's first call, never an address, so a thread
/// started later never takes over a finished thread's identity. One
/// thread-local load after the first call. Never blocks; thread-safe.
POSTBOX_STREAM_NOINLINE inline std::uint64_t stream_new_thread_token() noexcept {
  // relaxed: only uniqueness matters; no other memory is published with it.
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}
inline std::uint64_t stream_thread_token() noexcept {
  thread_local std::uint64_t token = 0;
  if (POSTBOX_UNLIKELY(token == 0)) token = stream_new_thread_token();
  return token;
}

/// The per-partition append lock, biased towards the first thread that takes
/// it (the usual single appender of a partition). That owner takes and gives
/// it back with no read-modify-write and no hardware fence: a plain store of
/// its `busy` flag, a compiler fence and a re-check of the bias, then a
/// release store and one load to see whether a thread waits. The first
/// other thread that takes the lock (a second appender, a trim() from
/// another thread) revokes the bias for good: it takes the CAS word, marks
/// the bias revoked, pays one heavy fence (membarrier: the asymmetric Dekker
/// pair of the owner's compiler fence, see asymmetric_fence.hpp), and waits
/// until the owner is not inside. From then on every thread uses the CAS
/// word: uncontended one CAS and a plain release store; contended it spins
/// an adaptive budget of pauses, yields a few times, then parks on an event
/// count with the asymmetric protocol (the parking thread pays a membarrier,
/// so that unlock needs no fence). BasicLockable (std::lock_guard; the
/// append path uses stream_append_guard). Not recursive. Never allocates.
class stream_append_lock {
 public:
  stream_append_lock() noexcept : bias_(bias_supported() ? unbiased : revoked) {}
  stream_append_lock(const stream_append_lock&) = delete;
  stream_append_lock& operator=(const stream_append_lock&) = delete;

  /// Takes the lock; returns whether it holds through the bias (pass that
  /// to leave()). Spins, yields, then parks while another thread holds it.
  POSTBOX_STREAM_ALWAYS_INLINE bool enter() noexcept {
    const std::uint64_t me = stream_thread_token();
    // relaxed: bias_ equals `me` only if this thread stored it (under held_);
    // a revocation by another thread is caught by the re-check below.
    if (POSTBOX_LIKELY(bias_.load(std::memory_order_relaxed) == me)) {
      // relaxed store, then the light fence: the hot half of the Dekker pair
      // whose heavy half is revoke()'s store of `revoked` and heavy fence.
      // Either revoke() sees this `true` (and waits for our release store of
      // false), or our re-check sees `revoked`.
      busy_.store(true, std::memory_order_relaxed);
      bias_fence();
      if (POSTBOX_LIKELY(bias_.load(std::memory_order_relaxed) == me)) return true;  // relaxed: see above
      release_bias();  // revoked meanwhile: back out, take the CAS word
    }
    lock_unbiased(me);
    return false;
  }
  /// Gives the lock back; `biased` is what enter() returned. Never blocks.
  POSTBOX_STREAM_ALWAYS_INLINE void leave(bool biased) noexcept {
    if (POSTBOX_LIKELY(biased)) {
      release_bias();
      return;
    }
    // release: pairs with the acquire CAS in try_lock_word().
    held_.store(false, std::memory_order_release);
    // A light fence, then one load of the waiter count: wakes a parked thread
    // only if one announced itself. Partner: the heavy fence in
    // prepare_wait_asymmetric (lock_contended): either that thread's CAS
    // after its fence sees our store, or our load after the fence's point
    // in this thread sees its announcement.
    parked_.notify_light(1);
  }

  /// Lockable: enter() and leave(), the mode kept in the lock.
  void lock() noexcept { biased_hold_ = enter(); }
  void unlock() noexcept { leave(biased_hold_); }
  /// Whether locks are biased at all: where membarrier(2) serves as the
  /// heavy fence (and under ThreadSanitizer, whose fences are real RMWs on
  /// both sides); elsewhere every lock() takes the CAS word. Never blocks.
  [[nodiscard]] static bool bias_supported() noexcept {
#if POSTBOX_TSAN
    return true;
#else
    return membarrier_available();
#endif
  }

  /// The owner's fence between its busy_ store and its re-check of the bias,
  /// and a light fence (asymmetric_fence.hpp) for any thread that holds or
  /// held the lock through the bias. The bias exists only where membarrier
  /// is the heavy fence (see bias_supported()), so a compiler fence
  /// suffices; under ThreadSanitizer both sides are seq_cst RMWs of one
  /// word (see asymmetric_fence.hpp). Never blocks.
  POSTBOX_STREAM_ALWAYS_INLINE static void bias_fence() noexcept {
#if POSTBOX_TSAN
    light_fence();
#else
    std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
  }

  /// Whether the lock is still biased to a thread (false once revoked).
  /// For tests; a snapshot. Never blocks.
  [[nodiscard]] bool biased_approx() const noexcept {
    const auto b = bias_.load(std::memory_order_relaxed);  // relaxed: a snapshot
    return b != unbiased && b != revoked;
  }

 private:
  // Takes the CAS word if free.
  [[nodiscard]] bool try_lock_word() noexcept {
    bool expected = false;
    // acquire: pairs with the release store in leave(); the previous
    // holder's writes to the partition happen before ours.
    return held_.compare_exchange_strong(expected, true, std::memory_order_acquire, std::memory_order_relaxed);
  }

  static constexpr std::uint64_t unbiased = 0;           // no owner yet: the next lock() through held_ claims it
  static constexpr std::uint64_t revoked = UINT64_MAX;   // a second thread came: held_ only, for good

  // The owner leaves (or backs out of) its biased hold.
  POSTBOX_STREAM_ALWAYS_INLINE void release_bias() noexcept {
    // release: pairs with the acquire load in revoke(); the owner's writes
    // under the lock happen before the revoking thread's.
    busy_.store(false, std::memory_order_release);
    // A revoking thread may be parked until busy_ is false (revoke()): the
    // fence, then one load of the waiter count, as notify_light does but
    // inline (g++ called notify_light out of line). Partner: the heavy fence
    // in prepare_wait_asymmetric (revoke()). Only threads wait here (no
    // registered wakers), so the thread count is the whole answer. Wakes
    // every parked thread, since threads waiting for held_ park here too.
    bias_fence();
    if (POSTBOX_UNLIKELY(parked_.threads_waiting_approx() != 0)) parked_.notify_light(INT_MAX);
  }

  // lock() through held_: claims the bias when nobody has it, revokes it
  // when another thread has it.
  POSTBOX_STREAM_NOINLINE void lock_unbiased(std::uint64_t me) noexcept {
    if (!try_lock_word()) lock_contended();
    // relaxed: bias_ is written only under held_, which we now hold.
    const std::uint64_t b = bias_.load(std::memory_order_relaxed);
    if (POSTBOX_LIKELY(b == revoked)) return;
    if (b == unbiased) {
      // relaxed: read by other threads only under held_ (ordered by its
      // release/acquire), and by this thread itself in lock().
      bias_.store(me, std::memory_order_relaxed);
      return;
    }
    revoke();
  }

  // Under held_: ends the bias for good and waits until its owner is outside.
  POSTBOX_STREAM_NOINLINE void revoke() noexcept {
    // relaxed store, then the heavy fence: see lock()'s biased path.
    bias_.store(revoked, std::memory_order_relaxed);
    heavy_fence();
    // acquire: pairs with release_bias(): the owner's writes before its
    // release happen before our critical section.
    const auto outside = [this] { return !busy_.load(std::memory_order_acquire); };
    for (std::uint32_t i = 0; i < spin_cap; ++i) {
      if (outside()) return;
      cpu_relax();
    }
    for (int i = 0; i < yield_rounds; ++i) {
      if (outside()) return;
      std::this_thread::yield();
    }
    for (;;) {
      const std::uint32_t key = parked_.prepare_wait_asymmetric();
      if (outside()) {
        parked_.finish_wait();
        return;
      }
      parked_.wait(key, std::nullopt);
      parked_.finish_wait();
    }
  }

  // Spinning before parking, in pause instructions (about 60 ns each on the
  // project's VMs). An appender holds the lock for tens of nanoseconds, so a
  // waiter normally gets it within a pause or two; parking costs a
  // membarrier (6-8 us with another thread running) plus a futex wake paid
  // by the holder. The budget adapts as glibc's PTHREAD_MUTEX_ADAPTIVE_NP
  // does: twice the recent average of pauses a waiter needed plus a floor
  // (about 4 us), capped (about 16 us, twice a park).
  static constexpr std::uint32_t spin_floor = 64;
  static constexpr std::uint32_t spin_cap = 256;
  // Yields after the spin, for a holder that lost its core (2 cores shared by
  // more runnable threads): a sched_yield lets it run and finish its few
  // instructions for far less than a park.
  static constexpr int yield_rounds = 4;

  POSTBOX_STREAM_NOINLINE void lock_contended() noexcept {
    // relaxed: a hint shared by waiters; a stale value only changes how long one spins.
    const std::uint32_t hint = spin_hint_.load(std::memory_order_relaxed);
    const std::uint32_t budget = std::min(spin_cap, 2 * hint + spin_floor);
    std::uint32_t spins = 0;
    while (spins < budget) {
      cpu_relax();
      ++spins;
      // relaxed load: only a hint; the CAS acquires.
      if (!held_.load(std::memory_order_relaxed) && try_lock_word()) {
        learn(hint, spins);
        return;
      }
    }
    learn(hint, budget);
    for (int i = 0; i < yield_rounds; ++i) {
      std::this_thread::yield();
      if (!held_.load(std::memory_order_relaxed) && try_lock_word()) return;  // relaxed: as above
    }
    for (;;) {
      const std::uint32_t key = parked_.prepare_wait_asymmetric();
      if (try_lock_word()) {
        parked_.finish_wait();
        return;
      }
      parked_.wait(key, std::nullopt);
      parked_.finish_wait();
      if (try_lock_word()) return;
    }
  }

  // Moves the spin hint an eighth of the way towards `spins` (glibc's rule).
  void learn(std::uint32_t hint, std::uint32_t spins) noexcept {
    const auto next = static_cast<std::int64_t>(hint) + (static_cast<std::int64_t>(spins) - static_cast<std::int64_t>(hint)) / 8;
    spin_hint_.store(static_cast<std::uint32_t>(next), std::memory_order_relaxed);  // relaxed: see spin_hint_
  }

  // true while a thread holds the lock through the CAS word (every thread
  // but a bias owner in its biased hold). Taken by an acquire CAS
  // (try_lock_word), given back by a release store (leave); the pair orders one
  // holder's writes before the next holder's.
  std::atomic<bool> held_{false};
  // The bias: `unbiased`, the owner's stream_thread_token(), or `revoked`
  // (final). Written only under held_ (claim: unbiased -> owner; revoke():
  // owner -> revoked, then a heavy fence); read relaxed by the owner in
  // lock(), before and after its light fence (the Dekker pair with revoke()).
  std::atomic<std::uint64_t> bias_{unbiased};
  // true while the bias owner is inside through its biased path (also,
  // briefly, while it checks the bias). Written by the owner only: relaxed
  // store of true before its light fence, release store of false
  // (release_bias); read with acquire by revoke(), after its heavy fence.
  std::atomic<bool> busy_{false};
  // Whether the current holder holds through the bias (unlock then clears
  // busy_ instead of held_). Plain: written after the lock is taken and read
  // before it is released, by the holder only; the lock orders holders.
  bool biased_hold_ = false;
  // Threads parked in lock_contended (asymmetric side); unlock notifies it
  // with notify_light.
  event_count parked_;
  // Moving average of the pauses contended lock() calls spun before taking
  // the lock (the budget when they gave up). Read and written relaxed by
  // waiters only (never by an uncontended lock or unlock): a heuristic, no
  // ordering depends on it.
  std::atomic<std::uint32_t> spin_hint_{0};
};

/// std::lock_guard for stream_append_lock with its constructor and
/// destructor forced inline: g++ kept std::lock_guard's out of line around
/// the biased path (a call each way, 36 instructions per append, callgrind).
class stream_append_guard {
 public:
  POSTBOX_STREAM_ALWAYS_INLINE explicit stream_append_guard(stream_append_lock& l) noexcept
      : l_(l), biased_(l.enter()) {}
  POSTBOX_STREAM_ALWAYS_INLINE ~stream_append_guard() { l_.leave(biased_); }
  /// Whether the lock is held through its bias (enter()'s answer).
  [[nodiscard]] bool biased() const noexcept { return biased_; }
  stream_append_guard(const stream_append_guard&) = delete;
  stream_append_guard& operator=(const stream_append_guard&) = delete;

 private:
  stream_append_lock& l_;
  bool biased_;  // how l_ was taken (enter()'s answer)
};

// Aligned to a cache line (pair): the stream keeps its partitions side by
// side in one array, and appenders on different partitions must not share
// a line.
template <class T>
struct alignas(cache_line_size) stream_partition {
  stream_append_lock append_mu;  // appenders and trim only; readers never take it
  // Earliest retained offset. Writer: appender/trim under append_mu (release:
  // pairs with the acquire in readers, who then report out_of_range below it).
  // Invariant: begin <= end.
  std::atomic<std::uint64_t> begin{0};
  // High-water mark: records [begin, end) are fully written. Writer: appender
  // under append_mu (release after the slot write; pairs with the acquire in
  // readers, which read only slots below it).
  std::atomic<std::uint64_t> end{0};
  // The appenders' (writable) handle on the current chunk table; `dir` holds
  // the same table for readers. Guarded by append_mu.
  std::shared_ptr<stream_dir<T>> writer_dir = std::make_shared<stream_dir<T>>(0, 0);
  // Chunk table (copy-on-write, see stream_dir). Writer: appender/trim under
  // append_mu, storing a new table BEFORE `end` moves into a chunk only it
  // holds (then the release on `end`); readers load it after acquiring `end`,
  // so the chunk of any offset below `end` is present unless retention
  // dropped it (then the offset is below `begin` or the table's base).
  snapshot_ptr<stream_dir<T>> dir{writer_dir};
  std::size_t used = 0;                         // entries set in writer_dir; guarded by append_mu
  stream_chunk<T>* tail = nullptr;              // writer_dir's last chunk (null: none); guarded by append_mu
  std::size_t tail_fill = stream_chunk_size;    // slots used in tail (stream_chunk_size: full or none); guarded
  // A chunk allocated and pre-faulted ahead, outside the lock, by the
  // appender whose record half-fills the tail chunk (stream_log::prepare_spare);
  // add_chunk takes it instead of allocating under the lock. Guarded by append_mu.
  std::unique_ptr<stream_chunk<T>> spare;
  std::size_t bytes = 0;   // accounted bytes of [begin, end), kept only with a byte limit; guarded by append_mu
  time_point last_ts{};    // guarded by append_mu

  stream_partition() = default;
  stream_partition(const stream_partition&) = delete;
  stream_partition& operator=(const stream_partition&) = delete;
  ~stream_partition() { release_tail(); }

  // Writes the tail chunk's slot count into the chunk (appends count in
  // tail_fill only), before the partition may drop its reference. Caller
  // holds append_mu, or is the destructor.
  void release_tail() noexcept {
    if (tail != nullptr) tail->constructed = tail_fill;
  }
};

}  // namespace detail

template <class T>
class stream;

/// A consumer group's member (RAII: destroying it leaves the group, which
/// rebalances). Use from one thread at a time; different members are independent.
template <class T>
class group_member;

namespace detail {
/// Lets the awaitable forms (async.hpp) reach a reader's or member's log.
struct stream_wait_access;
}  // namespace detail

namespace detail {

/// The log itself: partitions, retention, clock. Shared (`shared_ptr`) by the
/// stream, its readers and its consumer groups, so a reader or a group member
/// that outlives the `stream` object stays valid: it still reads the records
/// retained when the stream went away (nothing is appended any more).
template <class T>
class stream_log {
 public:
  using size_function = std::function<std::size_t(const T&)>;

  stream_log(std::size_t partitions, retention keep, const clock& clk, size_function size_of)
      : keep_(keep),
        retains_(keep.max_count != 0 || keep.max_bytes != 0 || keep.max_age.count() > 0),
        pow2_((partitions & (partitions - 1)) == 0),
        coarse_(&clk == &coarse_default_clock()),
        published_now_(clk.published_now()),
        clock_(&clk),
        size_of_(std::move(size_of)) {
    if (partitions == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::stream: at least one partition"));
    if (partitions > (std::size_t{1} << 20))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::stream: too many partitions"));
    parts_ = std::make_unique<stream_partition<T>[]>(partitions);
    part_count_ = partitions;
    // Before the first append: lets notify_light's fence be a compiler
    // barrier when membarrier is available (see asymmetric_fence.hpp).
    asymmetric_fence_init();
  }

  /// Appends `value` under `key` to partition fnv1a_64(key) % partitions.
  /// Takes that partition's lock briefly (never blocked by readers); allocates
  /// one chunk per 256 records, ahead of need and outside the lock. If
  /// copying the key or moving the value throws, nothing is appended.
  POSTBOX_STREAM_ALWAYS_INLINE position append(std::string_view key, T&& value) {
    // Read before taking the lock, so the lock covers no clock read; the
    // clamp under the lock keeps timestamps non-decreasing per partition.
    // The default coarse clock is read inline (coarse_clock::read()), and a
    // clock whose time is a word in memory (cached_clock) with one load.
    const auto now = POSTBOX_LIKELY(coarse_) ? coarse_clock::read() : read_other_clock();
    const auto p = partition_of(key);
    auto& part = parts_[p];
    std::uint64_t off = 0;
    bool prepare = false;
    bool biased = false;
    {
      stream_append_guard lock(part.append_mu);
      biased = lock.biased();
      off = part.end.load(std::memory_order_relaxed);  // relaxed: only writers (under the lock) store it
      if (POSTBOX_UNLIKELY(part.tail_fill == stream_chunk_size)) add_chunk(part);  // once per 256 records
      const auto ts = std::max(now, part.last_ts);
      part.tail->construct(part.tail_fill, ts, key, std::move(value));
      ++part.tail_fill;  // the chunk's own count is written once, when the partition lets it go
      part.last_ts = ts;
      part.end.store(off + 1, std::memory_order_release);  // release: publishes the slot; pairs with readers' acquire
      // Without limits there is nothing to account or trim: one test of
      // retains_ (true whenever max_bytes is set) covers both.
      if (POSTBOX_UNLIKELY(retains_)) retain_locked(part, now);
      // Exactly one append half-fills a chunk; it prepares the next one.
      prepare = part.tail_fill == stream_chunk_size / 2 && !part.spare;
    }
    // After the release store of `end` (above): a compiler fence and one
    // load when nobody waits; see stream_log::appended_. Spelled out inline
    // (g++ called notify_light out of line); notify_light repeats both
    // before it wakes anyone. A biased hold implies membarrier is the heavy
    // fence (stream_append_lock::bias_supported()), so the fence is a
    // compiler barrier without light_fence()'s run-time check of the mode.
    if (POSTBOX_LIKELY(biased)) {
      stream_append_lock::bias_fence();
    } else {
      light_fence();
    }
    if (POSTBOX_UNLIKELY(appended_.has_waiters())) appended_.notify_light(INT_MAX);
    if (POSTBOX_UNLIKELY(prepare)) prepare_spare(part);
    return {p, off};
  }

  /// The stream's wait side: readers waiting for an append park here (see
  /// appended_). Thread-safe.
  [[nodiscard]] event_count& appended() const noexcept { return appended_; }

  /// Marks the log closed (the `stream` object is gone: nothing more is
  /// appended) and wakes every waiter. Thread-safe; makes a syscall.
  void close() noexcept {
    // seq_cst: a waiter re-checks closed() after announcing itself; the
    // wake_all below reaches every waiter announced before it.
    closed_.store(true, std::memory_order_seq_cst);
    appended_.wake_all();
  }
  /// Whether close() ran: no record will be appended any more. Lock-free.
  [[nodiscard]] bool closed() const noexcept {
    return closed_.load(std::memory_order_seq_cst);  // seq_cst: pairs with the store in close()
  }

 private:
  // The time of a clock other than the default coarse one: a load when its
  // time is a published word (cached_clock), else its now().
  [[nodiscard]] time_point read_other_clock() const noexcept {
    // relaxed: a time value, as cached_clock::now() reads it.
    if (published_now_ != nullptr) return time_point(duration(published_now_->load(std::memory_order_relaxed)));
    return clock_->now();
  }

  // fnv1a_64(key) % partitions, as stream_partition_of; a mask when the
  // count is a power of two, so those appends pay no 64-bit division.
  [[nodiscard]] std::uint32_t partition_of(std::string_view key) const noexcept {
    const auto h = fnv1a_64(key);
    const auto n = part_count_;
    return static_cast<std::uint32_t>(pow2_ ? (h & (n - 1)) : (h % n));
  }

  // The retention step of an append (only with a limit set): accounts the
  // bytes of the record at offset `end - 1` (with a byte limit), then trims.
  // Caller holds the append lock.
  POSTBOX_STREAM_NOINLINE void retain_locked(stream_partition<T>& part, time_point now) {
    if (keep_.max_bytes != 0) part.bytes += bytes_of(part.tail->slot(part.tail_fill - 1).value);
    trim_locked(part, now);
  }

  // Accounted bytes of a record: the size function's answer (asked at append
  // and again when retention drops it), else sizeof(T).
  [[nodiscard]] std::size_t bytes_of(const T& v) const { return size_of_ ? size_of_(v) : sizeof(T); }

  // A fresh chunk at the end of the table (in place, or in a new table when
  // full). Caller holds the append lock; on an exception nothing changed.
  POSTBOX_STREAM_NOINLINE void add_chunk(stream_partition<T>& part) {
    part.release_tail();  // full: the next append goes to the new chunk
    // The spare prepared ahead when there is one (a control block is all
    // that is allocated here; if that throws, the spare stays), else a chunk
    // allocated and faulted in under the lock.
    std::shared_ptr<stream_chunk<T>> chunk =
        part.spare ? std::shared_ptr<stream_chunk<T>>(std::move(part.spare)) : std::make_shared<stream_chunk<T>>();
    if (part.used == part.writer_dir->capacity) {
      rebuild(part, std::move(chunk));
    } else {
      // In place: no reader reads this entry before the release store of
      // `end` that covers its first slot.
      part.writer_dir->chunks[part.used] = std::move(chunk);
      ++part.used;
      part.tail = part.writer_dir->chunks[part.used - 1].get();
    }
    part.tail_fill = 0;
  }

  // Allocates the partition's next chunk and faults its pages in, outside
  // the append lock, then installs it as the spare unless another thread
  // did first. An allocation failure is left to add_chunk, which then
  // allocates under the lock and reports it to its own append.
  POSTBOX_STREAM_NOINLINE void prepare_spare(stream_partition<T>& part) noexcept {
    std::unique_ptr<stream_chunk<T>> chunk(new (std::nothrow) stream_chunk<T>());
    if (!chunk) return;
    chunk->prefault();
    stream_append_guard lock(part.append_mu);
    if (!part.spare) part.spare = std::move(chunk);
  }  // a chunk not installed is freed here, after the unlock

  // Replaces the table by one holding the live chunks (from the one holding
  // `begin`) and `extra` (if any), with room for as many again, and publishes
  // it. Chunks dropped from it are freed once no reader's snapshot holds them.
  void rebuild(stream_partition<T>& part, std::shared_ptr<stream_chunk<T>> extra) {
    part.release_tail();  // the tail may be dropped (all of it trimmed) or stay
    const stream_dir<T>& d = *part.writer_dir;
    const auto b = part.begin.load(std::memory_order_relaxed);  // relaxed: we are the writer (under the lock)
    const auto first = static_cast<std::size_t>((b - d.base) / stream_chunk_size);
    const auto live = part.used - first;
    const auto need = live + (extra ? 1 : 0);
    auto next = std::make_shared<stream_dir<T>>(d.base + first * stream_chunk_size, std::max<std::size_t>(4, 2 * need));
    for (std::size_t i = 0; i < live; ++i) next->chunks[i] = d.chunks[first + i];
    if (extra) next->chunks[live] = std::move(extra);
    part.dir.store(next);  // before `end` moves into `extra` (the release store in append)
    part.writer_dir = std::move(next);
    part.used = need;
    if (need == 0) {
      part.tail = nullptr;
      part.tail_fill = stream_chunk_size;
    } else {
      part.tail = part.writer_dir->chunks[need - 1].get();
    }
  }

 public:

  /// Applies retention (count, bytes, age) to every partition now. Takes each
  /// partition's append mutex in turn.
  void trim() {
    const auto now = clock_->now();
    for (std::size_t i = 0; i < part_count_; ++i) {
      stream_partition<T>& part = parts_[i];
      stream_append_guard lock(part.append_mu);
      trim_locked(part, now);
    }
  }

  /// Copies up to `max` records of `partition` from `offset`. Lock-free
  /// (readers never block appenders); allocates the result. out_of_range when
  /// `offset` is below retention. Throws error(invalid_argument) for a bad partition.
  [[nodiscard]] read_result<T> read(std::uint32_t partition, std::uint64_t offset, std::size_t max) const {
    check_partition(partition);
    const auto& part = parts_[partition];
    read_result<T> r;
    r.partition = partition;
    const auto first = earliest_offset(partition);
    if (offset < first) {
      r.status = errc::out_of_range;
      r.earliest = first;
      return r;
    }
    const auto end = part.end.load(std::memory_order_acquire);  // acquire: pairs with the release in append
    const auto dir = part.dir.load();
    if (offset < dir->base) {  // dropped by a trim after our check
      r.status = errc::out_of_range;
      r.earliest = earliest_offset(partition);
      return r;
    }
    r.earliest = first;
    for (auto o = offset; o < end && r.records.size() < max; ++o) {
      const auto& s = slot_of(*dir, o);
      r.records.push_back(record<T>{{partition, o}, s.ts, s.key, s.value});
    }
    return r;
  }

  /// First retained offset of `partition` (age applied against the clock). Lock-free.
  [[nodiscard]] std::uint64_t earliest_offset(std::uint32_t partition) const {
    check_partition(partition);
    const auto& part = parts_[partition];
    const auto b = part.begin.load(std::memory_order_acquire);  // acquire: pairs with the release in trim_locked
    if (keep_.max_age.count() <= 0) return b;
    return first_at_or_after(partition, clock_->now() - keep_.max_age, b);
  }
  /// Offset the next append to `partition` gets. Lock-free.
  [[nodiscard]] std::uint64_t end_offset(std::uint32_t partition) const {
    check_partition(partition);
    return parts_[partition].end.load(std::memory_order_acquire);  // acquire: pairs with the release in append
  }
  /// First retained offset with timestamp >= t (end_offset when none). Lock-free, O(log n).
  [[nodiscard]] std::uint64_t offset_for_time(std::uint32_t partition, time_point t) const {
    return std::max(first_at_or_after(partition, t, 0), earliest_offset(partition));
  }
  /// Partition count.
  [[nodiscard]] std::size_t partitions() const noexcept { return part_count_; }
  /// The stream's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }

  void check_partition(std::uint32_t p) const {
    if (p >= part_count_) POSTBOX_THROW(error(errc::invalid_argument, "postbox::stream: no such partition"));
  }

 private:
  static const stream_slot<T>& slot_of(const stream_dir<T>& d, std::uint64_t o) noexcept {
    const auto rel = o - d.base;
    return d.chunks[rel / stream_chunk_size]->slot(rel % stream_chunk_size);
  }

  // First offset in [from, end) with ts >= t (timestamps are monotonic per partition).
  std::uint64_t first_at_or_after(std::uint32_t partition, time_point t, std::uint64_t from) const {
    const auto& part = parts_[partition];
    auto hi = part.end.load(std::memory_order_acquire);  // acquire: pairs with the release in append
    const auto dir = part.dir.load();
    auto lo = std::max(from, dir->base);
    while (lo < hi) {
      const auto mid = lo + (hi - lo) / 2;
      if (slot_of(*dir, mid).ts < t) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  POSTBOX_STREAM_NOINLINE void trim_locked(stream_partition<T>& part, time_point now) {
    const auto end = part.end.load(std::memory_order_relaxed);   // relaxed: we are the writer (under the lock)
    auto b = part.begin.load(std::memory_order_relaxed);         // relaxed: we are the writer (under the lock)
    const stream_dir<T>& dir = *part.writer_dir;
    const auto cutoff = now - keep_.max_age;
    while (b < end) {
      const auto& s = slot_of(dir, b);
      const bool over_count = keep_.max_count != 0 && end - b > keep_.max_count;
      const bool over_bytes = keep_.max_bytes != 0 && part.bytes > keep_.max_bytes;
      const bool too_old = keep_.max_age.count() > 0 && s.ts < cutoff;
      if (!over_count && !over_bytes && !too_old) break;
      if (keep_.max_bytes != 0) part.bytes -= bytes_of(s.value);
      ++b;
    }
    part.begin.store(b, std::memory_order_release);  // release: pairs with the acquire in earliest_offset
    // Free dropped chunks once they outnumber the live ones: the copy of the
    // live entries is then paid for by the dropped chunks (amortized O(1)).
    const auto dropped = static_cast<std::size_t>((b - dir.base) / stream_chunk_size);
    if (dropped > 0 && dropped >= part.used - dropped) rebuild(part, nullptr);
  }

  retention keep_;
  bool retains_;  // some limit is set: appends apply retention
  bool pow2_;     // the partition count is a power of two (partition_of masks)
  bool coarse_;   // clock_ is coarse_default_clock(): append calls it directly (final class, no virtual call)
  // clock_->published_now(): the word a cached_clock's now() loads (append
  // loads it itself, no virtual call), or null.
  const std::atomic<std::int64_t>* published_now_;
  // Waiters for an append. Notifier: append, after its release store of a
  // partition's `end`, with notify_light; its partner is the waiters' heavy
  // fence (prepare_wait_asymmetric / register_waker(w, true)), after which
  // they re-read `end` (acquire). close() wakes everyone with wake_all.
  // Mutable: readers hold the log const, and waiting changes no record.
  mutable event_count appended_;
  // Set once by close() (seq_cst store, before wake_all); read seq_cst by
  // waiters after announcing themselves.
  std::atomic<bool> closed_{false};
  const clock* clock_;
  size_function size_of_;
  std::unique_ptr<stream_partition<T>[]> parts_;  // side by side, so an append reaches its partition with no pointer load
  std::size_t part_count_ = 0;
};

/// A consumer group of a stream: the shared bookkeeping
/// (detail/group_membership.hpp) and the log it reads.
template <class T>
struct stream_group : group_membership {
  stream_group(std::shared_ptr<const stream_log<T>> log, std::size_t partitions)
      : group_membership(partitions), owner(std::move(log)) {}
  std::shared_ptr<const stream_log<T>> owner;  // the log stays alive while a member or handle does
};

/// A read_result carrying only `status`.
template <class T>
read_result<T> stream_status(errc status) {
  read_result<T> r;
  r.status = status;
  return r;
}

/// The blocking wait of reader::poll_wait and group_member::poll_wait:
/// `poll()` until it returns records or an error, the log is closed and
/// drained (`closed`), `stop` is stopped (`canceled`, nothing read) or
/// `deadline` passes (`timeout`, nothing read). Parks on the log's event
/// count (asymmetric side: a membarrier per park, none per append).
template <class T, class Poll>
read_result<T> stream_wait(const stream_log<T>& log, Poll&& poll, std::optional<std::chrono::steady_clock::time_point> deadline,
                           const std::stop_token& stop) {
  event_count& ev = log.appended();
  const stop_wakeup wake_on_stop(ev, stop_tokens{&stop, nullptr});
  for (;;) {
    if (stop.stop_requested()) return stream_status<T>(errc::canceled);
    // Read before the poll: closed means nothing is appended any more, so a
    // poll after it that finds nothing means drained.
    const bool was_closed = log.closed();
    read_result<T> r = poll();
    if (!r.ok() || !r.records.empty()) return r;
    if (was_closed) return stream_status<T>(errc::closed);
    const std::uint32_t key = ev.prepare_wait_asymmetric();
    // Re-check after announcing (the Dekker half of notify_light).
    const bool closed_now = log.closed();
    r = poll();
    if (!r.ok() || !r.records.empty() || closed_now || stop.stop_requested()) {
      ev.finish_wait();
      if (!r.ok() || !r.records.empty()) return r;
      continue;  // the loop's top reports closed or canceled
    }
    const bool woken = ev.wait(key, deadline);
    ev.finish_wait();
    if (!woken) {
      r = poll();
      if (!r.ok() || !r.records.empty()) return r;
      return stream_status<T>(errc::timeout);
    }
  }
}

}  // namespace detail

/// Retained, partitioned, replayable log. All members are thread-safe.
///
/// Lifetime: the records live in a shared log, so readers, consumer group
/// handles and group members may outlive the `stream` object (they then read
/// what was retained when it went away; nothing more is appended). The clock
/// must outlive all of them.
template <class T>
class stream {
 public:
  using size_function = std::function<std::size_t(const T&)>;

  /// A stream with `partitions` partitions (>= 1). Throws error(invalid_argument) for 0.
  /// `clk` stamps records and ages them (default: coarse_default_clock(), the
  /// kernel tick's resolution; default_clock() for nanoseconds, at about
  /// 25-60 ns per append more). `size_of` accounts bytes for a byte limit
  /// (default sizeof(T)); it is asked at the append and again when retention
  /// drops the record, so it must give the same answer for the same value.
  /// Allocates.
  explicit stream(std::size_t partitions, retention keep = {}, const clock& clk = coarse_default_clock(),
                  size_function size_of = {})
      : log_(std::make_shared<detail::stream_log<T>>(partitions, keep, clk, std::move(size_of))) {}
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  /// Closes the log: readers and group members waiting in poll_wait or
  /// async_poll wake and, once drained, get errc::closed. Readers and members
  /// still read what was retained. Makes a syscall.
  ~stream() { log_->close(); }

  /// Appends `value` under `key` to partition fnv1a_64(key) % partitions and
  /// stamps it with the stream's clock. Takes that partition's lock briefly
  /// (never blocked by readers); allocates one chunk per 256 records, ahead
  /// of need and outside the lock (so a partition keeps one spare chunk),
  /// and a key longer than std::string's inline buffer. If copying the key
  /// or moving the value throws, nothing is appended. Thread-safe.
  POSTBOX_STREAM_ALWAYS_INLINE position append(std::string_view key, T value) {
    return log_->append(key, std::move(value));
  }

  /// Applies retention (count, bytes, age) to every partition now. Takes each
  /// partition's append mutex in turn.
  void trim() { log_->trim(); }

  /// Copies up to `max` records of `partition` from `offset`. Lock-free
  /// (readers never block appenders); allocates the result. out_of_range when
  /// `offset` is below retention. Throws error(invalid_argument) for a bad partition.
  [[nodiscard]] read_result<T> read(std::uint32_t partition, std::uint64_t offset, std::size_t max) const {
    return log_->read(partition, offset, max);
  }
  /// First retained offset of `partition` (age applied against the clock). Lock-free.
  [[nodiscard]] std::uint64_t earliest_offset(std::uint32_t partition) const { return log_->earliest_offset(partition); }
  /// Offset the next append to `partition` gets. Lock-free.
  [[nodiscard]] std::uint64_t end_offset(std::uint32_t partition) const { return log_->end_offset(partition); }
  /// First retained offset with timestamp >= t (end_offset when none). Lock-free, O(log n).
  [[nodiscard]] std::uint64_t offset_for_time(std::uint32_t partition, time_point t) const {
    return log_->offset_for_time(partition, t);
  }
  /// Partition count.
  [[nodiscard]] std::size_t partitions() const noexcept { return log_->partitions(); }
  /// The stream's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return log_->get_clock(); }

  /// A reader over all partitions (non-destructive; many may coexist). Not
  /// thread-safe itself: one reader per thread. Shares the log: it stays
  /// valid after the stream is destroyed.
  class reader {
   public:
    using value_type = T;  ///< the stream's record value type
    /// Copies up to `max` records, partitions in turn. out_of_range names the
    /// first partition whose position fell behind retention; use seek(). A
    /// poll that already copied records returns them and reports the
    /// out_of_range on the next call, so nothing read is dropped.
    [[nodiscard]] read_result<T> poll(std::size_t max = 64) {
      read_result<T> out;
      for (std::size_t i = 0; i < next_.size() && out.records.size() < max; ++i) {
        const auto p = static_cast<std::uint32_t>((rr_ + i) % next_.size());
        auto r = s_->read(p, next_[p], max - out.records.size());
        // Records already copied from earlier partitions are returned first
        // (their positions advanced); the out_of_range surfaces next poll.
        if (!r.ok()) {
          if (out.records.empty()) return r;
          break;
        }
        next_[p] += r.records.size();
        for (auto& rec : r.records) out.records.push_back(std::move(rec));
      }
      rr_ = (rr_ + 1) % next_.size();
      return out;
    }
    /// Blocks until there are records to return (up to `max`, as poll()),
    /// a partition fell behind retention (out_of_range, as poll()), the
    /// stream was destroyed and this reader has read everything (closed), or
    /// `stop` is stopped (canceled, nothing read). Parks on the stream's
    /// event count (a membarrier per park; appends pay nothing while nobody
    /// waits). Allocates the result. Not thread-safe (one reader per thread).
    [[nodiscard]] read_result<T> poll_wait(std::size_t max = 64, std::stop_token stop = {}) {
      return detail::stream_wait<T>(*s_, [&] { return poll(max); }, std::nullopt, stop);
    }
    /// As above; timeout (nothing read) once `deadline` passes (a steady
    /// clock deadline, converted as channel::receive_until does).
    template <class Clock, class Duration>
    [[nodiscard]] read_result<T> poll_wait(std::size_t max, std::chrono::time_point<Clock, Duration> deadline,
                                           std::stop_token stop = {}) {
      return detail::stream_wait<T>(*s_, [&] { return poll(max); }, detail::to_steady_deadline(deadline), stop);
    }
    /// Moves this reader's position in `partition`.
    void seek(std::uint32_t partition, std::uint64_t offset) { next_.at(partition) = offset; }
    /// This reader's next offset in `partition`.
    [[nodiscard]] std::uint64_t position_of(std::uint32_t partition) const { return next_.at(partition); }

   private:
    friend class stream;
    friend struct detail::stream_wait_access;
    reader(std::shared_ptr<const detail::stream_log<T>> s, start_from from) : s_(std::move(s)), next_(s_->partitions()) {
      for (std::uint32_t p = 0; p < next_.size(); ++p) {
        switch (from.where) {
          case start_from::kind::earliest: next_[p] = s_->earliest_offset(p); break;
          case start_from::kind::latest: next_[p] = s_->end_offset(p); break;
          case start_from::kind::offset: next_[p] = from.offset; break;
          case start_from::kind::time: next_[p] = s_->offset_for_time(p, from.time); break;
        }
      }
    }
    std::shared_ptr<const detail::stream_log<T>> s_;
    std::vector<std::uint64_t> next_;
    std::size_t rr_ = 0;
  };

  /// A new reader starting at `from`. Allocates; lock-free.
  [[nodiscard]] reader read_from(start_from from = start_from::earliest()) const { return reader(log_, from); }

  /// The consumer group `name` (created on first use, committed offsets start
  /// at each partition's earliest retained offset). Takes a mutex; allocates once.
  [[nodiscard]] std::shared_ptr<detail::stream_group<T>> group_state(const std::string& name) {
    std::lock_guard lock(groups_mu_);
    auto& g = groups_[name];
    if (!g) {
      g = std::make_shared<detail::stream_group<T>>(log_, log_->partitions());
      for (std::uint32_t p = 0; p < log_->partitions(); ++p) g->committed[p] = log_->earliest_offset(p);
    }
    return g;
  }

  /// Handle on a consumer group: join members, commit, read lag.
  class consumer_group {
   public:
    /// Joins a new member; rebalances (round-robin in join order). Allocates; thread-safe.
    [[nodiscard]] group_member<T> join() { return group_member<T>(g_); }
    /// Committed offset of `partition` (next record to consume). Thread-safe.
    [[nodiscard]] std::uint64_t committed(std::uint32_t partition) const {
      std::lock_guard lock(g_->mu);
      return g_->committed.at(partition);
    }
    /// Exact lag of `partition`: end_offset - committed, at one instant of the group lock.
    [[nodiscard]] std::uint64_t lag(std::uint32_t partition) const {
      std::lock_guard lock(g_->mu);
      const auto end = g_->owner->end_offset(partition);
      const auto c = g_->committed.at(partition);
      return end > c ? end - c : 0;
    }
    /// Sum of lag over all partitions.
    [[nodiscard]] std::uint64_t lag() const {
      std::uint64_t total = 0;
      for (std::uint32_t p = 0; p < g_->committed.size(); ++p) total += lag(p);
      return total;
    }
    /// Current member count.
    [[nodiscard]] std::size_t member_count() const {
      std::lock_guard lock(g_->mu);
      return g_->members.size();
    }
    /// Members, generation, and committed offset, end and lag per partition,
    /// at one instant of the group lock. Allocates. Thread-safe.
    [[nodiscard]] stream_group_stats stats() const {
      stream_group_stats out;
      std::lock_guard lock(g_->mu);
      out.members = g_->members.size();
      out.generation = g_->generation.load(std::memory_order_relaxed);  // relaxed: under mu, writers hold mu
      out.partitions.reserve(g_->committed.size());
      for (std::uint32_t p = 0; p < g_->committed.size(); ++p) {
        const auto end = g_->owner->end_offset(p);
        const auto c = g_->committed[p];
        const auto lag = end > c ? end - c : 0;
        out.partitions.push_back(stream_partition_lag{p, c, end, lag});
        out.lag += lag;
      }
      return out;
    }

   private:
    friend class stream;
    explicit consumer_group(std::shared_ptr<detail::stream_group<T>> g) : g_(std::move(g)) {}
    std::shared_ptr<detail::stream_group<T>> g_;
  };

  /// The consumer group `name`. A group lives as long as the stream or any
  /// handle or member of it.
  [[nodiscard]] consumer_group group(const std::string& name) { return consumer_group(group_state(name)); }

 private:
  std::shared_ptr<detail::stream_log<T>> log_;
  std::mutex groups_mu_;
  std::map<std::string, std::shared_ptr<detail::stream_group<T>>> groups_;
};

template <class T>
class group_member {
 public:
  group_member(group_member&& o) noexcept : g_(std::move(o.g_)), cur_(std::move(o.cur_)) {}
  group_member& operator=(group_member&&) = delete;
  group_member(const group_member&) = delete;
  group_member& operator=(const group_member&) = delete;
  /// Leaves the group (rebalances). Takes the group mutex.
  ~group_member() { leave(); }

  /// Leaves now (idempotent); uncommitted progress is abandoned.
  void leave() {
    if (!g_) return;
    // Ours may be the group's last reference (the stream and every handle
    // gone): keep it alive until the group lock is released.
    const std::shared_ptr<detail::stream_group<T>> g = std::move(g_);
    cur_.leave(*g);
  }

  /// Copies up to `max` records from this member's partitions, continuing
  /// after what it polled before. After a rebalance it first resumes every
  /// assigned partition from the committed offset. A partition behind
  /// retention is reported as out_of_range by a poll that has no records to
  /// return yet (records already read are returned first). Never blocks appenders;
  /// takes the group mutex only after a rebalance. Allocates the result.
  [[nodiscard]] read_result<T> poll(std::size_t max = 64) {
    read_result<T> out;
    if (!g_) return out;  // left the group: nothing assigned
    cur_.refresh_if_rebalanced(*g_);
    const auto& parts = cur_.parts();
    for (std::size_t i = 0; i < parts.size() && out.records.size() < max; ++i) {
      auto r = g_->owner->read(parts[i], cur_.positions()[i], max - out.records.size());
      // Positions of earlier partitions already moved past the records in
      // `out`: hand those over (a commit then covers exactly them) and
      // report the partition behind retention on the next poll.
      if (!r.ok()) {
        if (out.records.empty()) return r;
        break;
      }
      cur_.advance(i, r.records.size());
      for (auto& rec : r.records) out.records.push_back(std::move(rec));
    }
    return out;
  }

  /// Blocks as stream::reader::poll_wait does, for this member's records;
  /// errc::not_found at once after leave(). Not thread-safe (one thread per member).
  [[nodiscard]] read_result<T> poll_wait(std::size_t max = 64, std::stop_token stop = {}) {
    if (!g_) return detail::stream_status<T>(errc::not_found);
    return detail::stream_wait<T>(*g_->owner, [&] { return poll(max); }, std::nullopt, stop);
  }
  /// As above; timeout (nothing read) once `deadline` passes.
  template <class Clock, class Duration>
  [[nodiscard]] read_result<T> poll_wait(std::size_t max, std::chrono::time_point<Clock, Duration> deadline,
                                         std::stop_token stop = {}) {
    if (!g_) return detail::stream_status<T>(errc::not_found);
    return detail::stream_wait<T>(*g_->owner, [&] { return poll(max); }, detail::to_steady_deadline(deadline), stop);
  }

  /// Commits everything polled so far. errc::ok, or errc::conflict when the
  /// group rebalanced since this member's last poll (nothing is committed; the
  /// next poll resumes from the committed offsets), or errc::not_found after
  /// leave(). Takes the group mutex.
  [[nodiscard]] errc commit() {
    if (!g_) return errc::not_found;  // left the group
    std::lock_guard lock(g_->mu);
    if (g_->generation.load(std::memory_order_relaxed) != cur_.generation()) return errc::conflict;  // relaxed: under mu, writers hold mu
    const auto& parts = cur_.parts();
    for (std::size_t i = 0; i < parts.size(); ++i) g_->committed[parts[i]] = cur_.positions()[i];
    return errc::ok;
  }

  /// Moves this member's position in an assigned partition (e.g. to the
  /// earliest offset after out_of_range). Returns false if not assigned.
  bool seek(std::uint32_t partition, std::uint64_t offset) { return cur_.seek(partition, offset); }

  /// Partitions assigned to this member as of its last poll.
  [[nodiscard]] const std::vector<std::uint32_t>& assignment() {
    return cur_.assignment(g_.get());
  }
  /// This member's next offset per assigned partition (parallel to assignment()).
  [[nodiscard]] const std::vector<std::uint64_t>& positions() const noexcept { return cur_.positions(); }
  /// The generation this member's assignment belongs to.
  [[nodiscard]] std::uint64_t generation() const noexcept { return cur_.generation(); }
  /// Offset the next append to `partition` gets (0 after leave()). Lock-free;
  /// valid after the stream is destroyed (the member shares the log).
  [[nodiscard]] std::uint64_t end_offset(std::uint32_t partition) const {
    return g_ ? g_->owner->end_offset(partition) : 0;
  }

 private:
  template <class>
  friend class stream;
  friend struct detail::stream_wait_access;
  explicit group_member(std::shared_ptr<detail::stream_group<T>> g) : g_(std::move(g)) { cur_.join(*g_); }

  std::shared_ptr<detail::stream_group<T>> g_;
  detail::group_cursor cur_;  // id, generation, assignment and positions
};

namespace detail {
struct stream_wait_access {
  /// The log `r` reads. Never null.
  template <class Reader>
  static auto log_of(const Reader& r) noexcept {
    return r.s_.get();
  }
  /// The log `m` reads; null after leave().
  template <class T>
  static const stream_log<T>* log_of(const group_member<T>& m) noexcept {
    return m.g_ ? m.g_->owner.get() : nullptr;
  }
};
}  // namespace detail

POSTBOX_END_NAMESPACE
