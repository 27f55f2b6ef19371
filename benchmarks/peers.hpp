// SPDX-License-Identifier: MIT
// Benchmark peers: postbox::channel and other queues behind one small wrapper each.
//
// Every wrapper queues std::uint64_t and offers the same operations:
//   explicit W(std::size_t capacity);
//   bool try_push(std::uint64_t);  bool try_pop(std::uint64_t&);   // never block
//   void push(std::uint64_t);      std::uint64_t pop();            // blocking peers only
// `static constexpr bool blocking` says whether push/pop park the thread.
// Peers whose headers are missing are left out by __has_include.
#pragma once

#include <postbox/channel.hpp>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#if __has_include(<concurrentqueue/concurrentqueue.h>) && __has_include(<concurrentqueue/blockingconcurrentqueue.h>)
#  include <concurrentqueue/blockingconcurrentqueue.h>
#  include <concurrentqueue/concurrentqueue.h>
#  define POSTBOX_BENCH_HAVE_MOODYCAMEL 1
#endif
#if __has_include(<readerwriterqueue/readerwriterqueue.h>)
#  include <readerwriterqueue/readerwriterqueue.h>
#  define POSTBOX_BENCH_HAVE_RWQ 1
#endif
#if __has_include(<atomic_queue/atomic_queue.h>)
#  include <atomic_queue/atomic_queue.h>
#  define POSTBOX_BENCH_HAVE_ATOMIC_QUEUE 1
#endif
#if __has_include(<boost/lockfree/queue.hpp>) && __has_include(<boost/lockfree/spsc_queue.hpp>)
#  include <boost/lockfree/queue.hpp>
#  include <boost/lockfree/spsc_queue.hpp>
#  define POSTBOX_BENCH_HAVE_BOOST_LOCKFREE 1
#endif

namespace postbox_bench {

using item = std::uint64_t;

/// postbox::channel through its non-blocking and blocking calls.
template <class Shape>
struct postbox_channel {
  static constexpr bool blocking = true;
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
  static constexpr bool blocking = true;
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
    item v;
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
/// moodycamel::ConcurrentQueue (unbounded: enqueue may allocate; no tokens).
struct moodycamel_cq {
  static constexpr bool blocking = false;
  explicit moodycamel_cq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  moodycamel::ConcurrentQueue<item> q;
};
/// moodycamel::BlockingConcurrentQueue (unbounded; pop parks on a semaphore).
struct moodycamel_bcq {
  static constexpr bool blocking = true;
  explicit moodycamel_bcq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  void push(item v) { q.enqueue(v); }
  item pop() {
    item v;
    q.wait_dequeue(v);
    return v;
  }
  moodycamel::BlockingConcurrentQueue<item> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_RWQ
/// moodycamel::ReaderWriterQueue, SPSC only; try_push never allocates.
struct moodycamel_rwq {
  static constexpr bool blocking = false;
  explicit moodycamel_rwq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.try_enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  moodycamel::ReaderWriterQueue<item> q;
};
/// moodycamel::BlockingReaderWriterQueue, SPSC only (push may allocate).
struct moodycamel_brwq {
  static constexpr bool blocking = true;
  explicit moodycamel_brwq(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.try_enqueue(v); }
  bool try_pop(item& v) { return q.try_dequeue(v); }
  void push(item v) { q.enqueue(v); }
  item pop() {
    item v;
    q.wait_dequeue(v);
    return v;
  }
  moodycamel::BlockingReaderWriterQueue<item> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_ATOMIC_QUEUE
/// atomic_queue::AtomicQueueB2 (bounded, run-time capacity); SPSC flag per row.
template <bool Spsc>
struct atomic_queue_b2 {
  static constexpr bool blocking = false;
  explicit atomic_queue_b2(std::size_t cap) : q(static_cast<unsigned>(cap)) {}
  bool try_push(item v) { return q.try_push(v); }
  bool try_pop(item& v) { return q.try_pop(v); }
  atomic_queue::AtomicQueueB2<item, std::allocator<item>, true, false, Spsc> q;
};
#endif

#ifdef POSTBOX_BENCH_HAVE_BOOST_LOCKFREE
/// boost::lockfree::queue, bounded_push so it never allocates after construction.
struct boost_queue {
  static constexpr bool blocking = false;
  explicit boost_queue(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.bounded_push(v); }
  bool try_pop(item& v) { return q.pop(v); }
  boost::lockfree::queue<item> q;
};
/// boost::lockfree::spsc_queue with a run-time capacity.
struct boost_spsc {
  static constexpr bool blocking = false;
  explicit boost_spsc(std::size_t cap) : q(cap) {}
  bool try_push(item v) { return q.push(v); }
  bool try_pop(item& v) { return q.pop(v); }
  boost::lockfree::spsc_queue<item> q;
};
#endif

}  // namespace postbox_bench
