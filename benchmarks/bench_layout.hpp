// SPDX-License-Identifier: MIT
// Data layout helpers shared by the benchmarks.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <utility>

namespace postbox_bench {

/// An object on cache lines of its own: nothing else on the stack frame (or
/// in the array) that holds it shares a line with it, so a thread that only
/// reaches this object never moves a line another thread writes for its own
/// reasons (see topic_bench's subscriber_local).
template <class T>
struct alignas(64) own_lines {
  template <class... A>
  explicit own_lines(A&&... a) : value(std::forward<A>(a)...) {}
  T value;
};

/// The calling thread's element of `slots` (`count` of them): a thread
/// claims the next free one through `claimed` on its first call for this
/// array and keeps it, so each worker of a pool updates a line of its own
/// (the elements being own_lines or aligned alike). Aborts if more threads
/// than `count` call it. Allocates nothing; the claim is one RMW per thread.
template <class Slot>
Slot& thread_slot(Slot* slots, std::size_t count, std::atomic<std::size_t>& claimed) {
  thread_local const Slot* array = nullptr;  // the array this thread's element belongs to
  thread_local Slot* mine = nullptr;
  if (array != slots) {
    const std::size_t k = claimed.fetch_add(1, std::memory_order_relaxed);  // relaxed: only uniqueness matters
    if (k >= count) {
      std::fprintf(stderr, "benchmark: more threads than slots called thread_slot\n");
      std::abort();
    }
    array = slots;
    mine = &slots[k];
  }
  return *mine;
}

}  // namespace postbox_bench
