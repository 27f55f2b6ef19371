// SPDX-License-Identifier: MIT
// Benchmark peers: postbox::channel and other queues, each in the configuration its authors benchmark, behind one small wrapper.
//
// Every wrapper W queues std::uint64_t (never 0: atomic_queue's AtomicQueue
// uses 0 as its empty marker) and offers:
//   explicit W(std::size_t capacity);            // capacity is bench_capacity for compile-time peers
//   try_push(item) -> bool, try_pop(item&) -> bool   // never block, never spin
//   push(item), pop() -> item                        // where `wait_kind` is not none
//   static constexpr wait_kind waits;                // what push/pop do when full/empty
//   static constexpr bool bounded;                   // false: push may allocate and never reports full
// A peer whose authors use per-thread state (moodycamel's tokens) also has
// make_sender() / make_receiver(), each returning a handle with those calls,
// to be made once per thread; sender_of(q) / receiver_of(q) pick the handle
// or the queue itself. Peers whose headers are missing are left out by
// __has_include; Asio and TBB also need their CMake switches
// (POSTBOX_BENCH_HAVE_ASIO, POSTBOX_BENCH_HAVE_TBB), as Asio is opt-in and
// TBB needs linking.
#pragma once

#include <postbox/channel.hpp>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#if __has_include(<concurrentqueue/concurrentqueue.h>) && __has_include(<concurrentqueue/blockingconcurrentqueue.h>)
#  include <concurrentqueue/blockingconcurrentqueue.h>
#  include <concurrentqueue/concurrentqueue.h>
#  define POSTBOX_BENCH_HAVE_MOODYCAMEL 1
#endif
#if __has_include(<readerwriterqueue/readerwriterqueue.h>) && __has_include(<readerwriterqueue/readerwritercircularbuffer.h>)
#  include <readerwriterqueue/readerwritercircularbuffer.h>
#  include <readerwriterqueue/readerwriterqueue.h>
#  define POSTBOX_BENCH_HAVE_RWQ 1
#endif
#if __has_include(<atomic_queue/atomic_queue.h>)
#  include <atomic_queue/atomic_queue.h>
#  define POSTBOX_BENCH_HAVE_ATOMIC_QUEUE 1
#endif
#if __has_include(<boost/lockfree/queue.hpp>) && __has_include(<boost/lockfree/spsc_queue.hpp>)
#  include <boost/lockfree/policies.hpp>
#  include <boost/lockfree/queue.hpp>
#  include <boost/lockfree/spsc_queue.hpp>
#  define POSTBOX_BENCH_HAVE_BOOST_LOCKFREE 1
#endif
#if defined(POSTBOX_BENCH_HAVE_TBB)
#  include <tbb/concurrent_queue.h>
#endif
#if defined(POSTBOX_BENCH_HAVE_ASIO)
// Asio 1.22 recognizes coroutines on clang only in their Coroutines TS form
// (<experimental/coroutine>, which libstdc++ lacks); clang's C++20 mode has
// the standard form, which is the one Asio uses on g++.
#  if defined(__clang__) && defined(__cpp_impl_coroutine) && __has_include(<coroutine>) && !defined(ASIO_HAS_CO_AWAIT)
#    define ASIO_HAS_CO_AWAIT 1
#    define ASIO_HAS_STD_COROUTINE 1
#  endif
#  include <asio/error_code.hpp>
#  include <asio/experimental/concurrent_channel.hpp>
#  include <asio/io_context.hpp>
#endif

namespace postbox_bench {

using item = std::uint64_t;

/// The capacity every row uses; peers with a compile-time capacity are
/// instantiated with it.
inline constexpr std::size_t bench_capacity = 1024;

/// What a peer's push/pop do when the queue is full/empty.
enum class wait_kind {
  none,   ///< no push/pop: only the try calls
  park,   ///< the thread sleeps in the kernel until woken
  spin,   ///< the thread busy-waits (atomic_queue: pause instructions, never yields)
};

/// The handle a thread uses: the peer's own (tokens) or the queue itself.
template <class Q>
decltype(auto) sender_of(Q& q) {
  if constexpr (requires { q.make_sender(); }) {
    return q.make_sender();
  } else {
    return (q);
  }
}
template <class Q>
decltype(auto) receiver_of(Q& q) {
  if constexpr (requires { q.make_receiver(); }) {
    return q.make_receiver();
  } else {
    return (q);
  }
}

[[noreturn]] inline void wrong_capacity(const char* peer, std::size_t cap) {
  std::fprintf(stderr, "channel_bench: %s has a compile-time capacity of %zu, asked for %zu\n", peer, bench_capacity, cap);
  std::abort();
}

/// postbox::channel through its non-blocking and blocking calls.
template <class Shape>
struct postbox_channel {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = true;
  explicit postbox_channel(std::size_t cap) : ch(cap) {}
  bool try_push(item v) { return ch.try_send(v) == postbox::send_status::ok; }
  bool try_pop(item& v) {
    auto r = ch.try_receive();
    if (!r) return false;
    v = *r;
    return true;
  }
  void push(item v) { (void)ch.send(v); }
  item pop() { return *ch.receive(); }
  postbox::channel<item, Shape> ch;
};

/// The baseline: a bounded ring under one mutex, two condition variables.
struct mutex_queue {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = true;
  explicit mutex_queue(std::size_t cap) : ring_(cap) {}
  bool try_push(item v) {
    {
      std::lock_guard lock(m_);
      if (size_ == ring_.size()) return false;
      put(v);
    }
    not_empty_.notify_one();
    return true;
  }
  bool try_pop(item& v) {
    {
      std::lock_guard lock(m_);
      if (size_ == 0) return false;
      v = get();
    }
    not_full_.notify_one();
    return true;
  }
  void push(item v) {
    {
      std::unique_lock lock(m_);
      not_full_.wait(lock, [&] { return size_ < ring_.size(); });
      put(v);
    }
    not_empty_.notify_one();
  }
  item pop() {
    item v = 0;
    {
      std::unique_lock lock(m_);
      not_empty_.wait(lock, [&] { return size_ > 0; });
      v = get();
    }
    not_full_.notify_one();
    return v;
  }

 private:
  void put(item v) {
    ring_[(head_ + size_) % ring_.size()] = v;
    ++size_;
  }
  item get() {
    const item v = ring_[head_];
    head_ = (head_ + 1) % ring_.size();
    --size_;
    return v;
  }
  std::mutex m_;
  std::condition_variable not_empty_, not_full_;
  std::vector<item> ring_;
  std::size_t head_ = 0, size_ = 0;
};

#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
/// moodycamel::ConcurrentQueue as its README advises for speed: one
/// ProducerToken per producing thread, one ConsumerToken per consuming
/// thread, single-item enqueue/try_dequeue. Unbounded: enqueue allocates a
/// block when the preallocated ones are in use, and never reports full.
struct moodycamel_cq {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = false;
  using queue_type = moodycamel::ConcurrentQueue<item>;
  explicit moodycamel_cq(std::size_t cap) : q(cap) {}
  struct sender {
    queue_type* q;
    moodycamel::ProducerToken token;
    bool try_push(item v) { return q->enqueue(token, v); }
  };
  struct receiver {
    queue_type* q;
    moodycamel::ConsumerToken token;
    bool try_pop(item& v) { return q->try_dequeue(token, v); }
  };
  sender make_sender() { return {&q, moodycamel::ProducerToken(q)}; }
  receiver make_receiver() { return {&q, moodycamel::ConsumerToken(q)}; }
  queue_type q;
};

/// moodycamel::BlockingConcurrentQueue with tokens: enqueue(token) never
/// blocks (unbounded), wait_dequeue(token) parks on a semaphore.
struct moodycamel_bcq {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = false;
  using queue_type = moodycamel::BlockingConcurrentQueue<item>;
  explicit moodycamel_bcq(std::size_t cap) : q(cap) {}
  struct sender {
    queue_type* q;
    moodycamel::ProducerToken token;
    bool try_push(item v) { return q->enqueue(token, v); }
    void push(item v) { (void)q->enqueue(token, v); }
  };
  struct receiver {
    queue_type* q;
    moodycamel::ConsumerToken token;
    bool try_pop(item& v) { return q->try_dequeue(token, v); }
    item pop() {
      item v = 0;
      q->wait_dequeue(token, v);
      return v;
    }
  };
  sender make_sender() { return {&q, moodycamel::ProducerToken(q)}; }
  receiver make_receiver() { return {&q, moodycamel::ConsumerToken(q)}; }
  queue_type q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_RWQ
/// moodycamel::ReaderWriterQueue, SPSC; try_enqueue never allocates, so with
/// the try calls it is bounded by the capacity it was built with.
struct moodycamel_rwq {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = true;
  explicit moodycamel_rwq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.try_enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  moodycamel::ReaderWriterQueue<item> q;
};
/// moodycamel::BlockingReaderWriterQueue, SPSC, as its README uses it:
/// enqueue (allocates a block when full: unbounded), wait_dequeue parks.
struct moodycamel_brwq {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = false;
  explicit moodycamel_brwq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.try_enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  void push(item v) { (void)q.enqueue(v); }
  item pop() {
    item v = 0;
    q.wait_dequeue(v);
    return v;
  }
  moodycamel::BlockingReaderWriterQueue<item> q;
};
/// moodycamel::BlockingReaderWriterCircularBuffer, SPSC and bounded: both
/// sides park (wait_enqueue / wait_dequeue), the closest moodycamel shape to
/// a bounded blocking channel.
struct moodycamel_rwcb {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = true;
  explicit moodycamel_rwcb(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.try_enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  void push(item v) { q.wait_enqueue(v); }
  item pop() {
    item v = 0;
    q.wait_dequeue(v);
    return v;
  }
  moodycamel::BlockingReaderWriterCircularBuffer<item> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_ATOMIC_QUEUE
/// atomic_queue::AtomicQueue<T, SIZE, NIL, MINIMIZE_CONTENTION,
/// MAXIMIZE_THROUGHPUT, TOTAL_ORDER, SPSC>: the compile-time-capacity queue
/// of atomic elements the author benchmarks for integers, with NIL = 0,
/// maximized throughput, no total order; `Spsc` per row. `Spread` is
/// MINIMIZE_CONTENTION, the library's default: consecutive elements on
/// different cache lines. Both run, since neither wins every row: without
/// spreading, 8 elements share a line and the SPSC throughput row ran 2-3x
/// faster (interleaved standalone runs, 2-core VM: 500-700 against 170-250
/// M msg/s at the near host placement, 144-159 against 61-92 at the far
/// one). push/pop spin (pause instruction, never yield).
template <bool Spsc, bool Spread = true>
struct atomic_queue_aq {
  static constexpr wait_kind waits = wait_kind::spin;
  static constexpr bool bounded = true;
  explicit atomic_queue_aq(std::size_t cap) {
    if (cap != bench_capacity) wrong_capacity("atomic_queue::AtomicQueue", cap);
  }
  bool try_push(item v) { return q.try_push(v); }
  bool try_pop(item& v) { return q.try_pop(v); }
  void push(item v) { q.push(v); }
  item pop() { return q.pop(); }
  atomic_queue::AtomicQueue<item, static_cast<unsigned>(bench_capacity), item{0}, Spread, true, false, Spsc> q;
};
/// atomic_queue::AtomicQueue2: the same ring with a state byte per slot, for
/// any T (no NIL value reserved).
template <bool Spsc>
struct atomic_queue_aq2 {
  static constexpr wait_kind waits = wait_kind::spin;
  static constexpr bool bounded = true;
  explicit atomic_queue_aq2(std::size_t cap) {
    if (cap != bench_capacity) wrong_capacity("atomic_queue::AtomicQueue2", cap);
  }
  bool try_push(item v) { return q.try_push(v); }
  bool try_pop(item& v) { return q.try_pop(v); }
  void push(item v) { q.push(v); }
  item pop() { return q.pop(); }
  atomic_queue::AtomicQueue2<item, static_cast<unsigned>(bench_capacity), true, true, false, Spsc> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_BOOST_LOCKFREE
/// boost::lockfree::queue with a compile-time capacity: an array-based,
/// fixed-size free list, so it never allocates after construction.
struct boost_queue {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = true;
  explicit boost_queue(std::size_t cap) {
    if (cap != bench_capacity) wrong_capacity("boost::lockfree::queue", cap);
  }
  bool try_push(item v) { return q.bounded_push(v); }
  bool try_pop(item& v) { return q.pop(v); }
  boost::lockfree::queue<item, boost::lockfree::capacity<bench_capacity>> q;
};
/// boost::lockfree::spsc_queue with a compile-time capacity (the ring is a
/// member array, the index arithmetic folds to constants).
struct boost_spsc {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = true;
  explicit boost_spsc(std::size_t cap) {
    if (cap != bench_capacity) wrong_capacity("boost::lockfree::spsc_queue", cap);
  }
  bool try_push(item v) { return q.push(v); }
  bool try_pop(item& v) { return q.pop(v); }
  boost::lockfree::spsc_queue<item, boost::lockfree::capacity<bench_capacity>> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_TBB
/// tbb::concurrent_bounded_queue: try_push/try_pop, and push/pop that park
/// when full/empty.
struct tbb_bounded_queue {
  static constexpr wait_kind waits = wait_kind::park;
  static constexpr bool bounded = true;
  explicit tbb_bounded_queue(std::size_t cap) { q.set_capacity(static_cast<std::ptrdiff_t>(cap)); }
  bool try_push(item v) { return q.try_push(v); }
  bool try_pop(item& v) { return q.try_pop(v); }
  void push(item v) { q.push(v); }
  item pop() {
    item v = 0;
    q.pop(v);
    return v;
  }
  tbb::concurrent_bounded_queue<item> q;
};
/// tbb::concurrent_queue: TBB's faster, unbounded, non-blocking queue.
struct tbb_queue {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = false;
  explicit tbb_queue(std::size_t) {}
  bool try_push(item v) {
    q.push(v);
    return true;
  }
  bool try_pop(item& v) { return q.try_pop(v); }
  tbb::concurrent_queue<item> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_ASIO
/// asio::experimental::concurrent_channel through try_send / try_receive
/// (Asio 1.22): each is one mutex-protected step on a std::deque buffer,
/// try_receive runs its handler inline, and neither needs an io_context
/// running. The coroutine form (async_send/async_receive) is driven
/// separately in channel_bench.cpp.
struct asio_channel {
  static constexpr wait_kind waits = wait_kind::none;
  static constexpr bool bounded = true;
  using channel_type = asio::experimental::concurrent_channel<void(asio::error_code, item)>;
  explicit asio_channel(std::size_t cap) : ch(ctx, cap) {}
  bool try_push(item v) { return ch.try_send(asio::error_code{}, v); }
  bool try_pop(item& v) {
    return ch.try_receive([&v](asio::error_code, item x) { v = x; });
  }
  asio::io_context ctx{1};
  channel_type ch;
};
#endif

}  // namespace postbox_bench
