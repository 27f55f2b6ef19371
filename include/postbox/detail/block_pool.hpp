// SPDX-License-Identifier: MIT
// postbox::detail::block_pool: recycles fixed-size blocks across threads (a topic's shared items, a request's future state).
#pragma once

#include <postbox/config.hpp>

#include <atomic>
#include <cstddef>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#  define POSTBOX_DETAIL_POOL_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define POSTBOX_DETAIL_POOL_ASAN 1
#  endif
#endif
#ifndef POSTBOX_DETAIL_POOL_ASAN
#  define POSTBOX_DETAIL_POOL_ASAN 0
#endif
#if POSTBOX_DETAIL_POOL_ASAN
#  include <sanitizer/asan_interface.h>
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Recycles fixed-size blocks across threads, so a steady flow that makes
/// and drops one object per message does not go through malloc: a topic
/// publish's shared item (the item and its reference counts, one block) and
/// a request's future state. A thread that frees a block keeps it in its own
/// outgoing chain and hands chains of `batch` blocks to a process-wide stack
/// per block size with one CAS (release); an allocating thread takes the
/// whole stack at once (one exchange, acquire: pairs with the pushes) into
/// its own stash and pops from that with no atomics. Taking the whole stack,
/// never one node, is what keeps the stack free of ABA. Batching the frees
/// keeps the stack's line from moving between the freeing and the
/// allocating thread's core on every message (issue 18). The shared stack
/// keeps about `max_shared` (4,096) freed blocks per size, and a chain freed
/// beyond that goes back to operator delete, so a burst of objects alive at
/// once (for a topic, up to the queues' capacities plus the deliveries
/// callers keep; for requests, the futures a caller holds) does not stay
/// pooled for good. Besides the stack, each freeing thread parks up to
/// `batch - 1` blocks in its chain, and each allocating thread's stash keeps
/// what it took (at most what the stack held) until it allocates again or
/// ends; a thread that ends hands back its stash and its chain. A block of
/// up to 64 bytes is aligned to a line (see block_align), so handing such an
/// object to another core moves exactly one line. Under AddressSanitizer a
/// pooled block is poisoned beyond its link word, so a use after free is
/// still reported. Thread-safe; allocate() allocates only when the pool is
/// empty, release() frees only a chain beyond the bound; neither blocks.
template <std::size_t Size, std::size_t Align>
class block_pool {
  struct node {
    node* next;
  };
  static_assert(Size >= sizeof(node) && Align >= alignof(node));
  // A block of up to one 64-byte line (not cache_line_size, the 128-byte
  // padding for pairs of lines on x86) is aligned to the line, so it moves
  // between cores as exactly one line. Larger blocks keep their own
  // alignment: an aligned allocation of each (memalign) left the allocator's
  // bins fragmented, and a copied std::string payload's malloc and free then
  // ran about 40% slower (topic_bench --only topic, 12 alternating runs).
  static constexpr std::size_t block_align = Size <= 64 && Align < 64 ? 64 : Align;

 public:
  /// Blocks a freeing thread collects before it pushes them as one chain.
  static constexpr std::size_t batch = 32;
  /// About the most freed blocks the shared stack keeps (per block size); a
  /// chain pushed beyond it goes back to operator delete, so a burst of
  /// objects alive at once (futures a caller collects, a deep queue) does
  /// not stay in the pool for good.
  static constexpr std::size_t max_shared = 4096;

 private:
  struct shared_stack {
    // Freed blocks. Chains are pushed with a release CAS by threads freeing
    // items; the stack is taken whole with an acquire exchange by allocating
    // threads (pairs with the pushes, so every link of a chain, written
    // before its push, is visible to the thread that takes it).
    std::atomic<node*> head{nullptr};
    // About how many blocks the stack holds, for the bound max_shared:
    // raised before a push, zeroed after a take. Relaxed loads and stores,
    // no RMW: an estimate, not an exact count (pushes racing each other or
    // a take may go uncounted until the next take), and it orders nothing.
    std::atomic<std::size_t> count{0};
  };
  // Immortal (never destroyed): blocks may be freed after static destruction
  // began (a delivery kept in a static), and the pool must still be there.
  static shared_stack& shared() noexcept {
    static shared_stack* const s = new shared_stack;
    return *s;
  }
  // A thread's blocks. Trivially destructible, so it stays usable until the
  // thread's storage goes, also after the thread's destructors began (a block
  // freed by another thread_local's destructor, or on the main thread by a
  // static's, holding a delivery); `hand_back` runs at thread exit.
  struct local {
    node* stash;      // taken from the shared stack; popped by allocate()
    node* out;        // freed by this thread, not yet pushed
    node* out_last;
    std::size_t out_count;
    bool registered;  // hand_back is registered for this thread
    // Set by hand_back: later frees on this thread go straight to the
    // shared stack and later allocations to operator new.
    bool gone;
    void flush() noexcept {
      if (out == nullptr) return;
      push_chain(out, out_last, out_count);
      out = out_last = nullptr;
      out_count = 0;
    }
  };
  // Hands a thread's blocks back when the thread ends.
  struct hand_back {
    local* l;
    explicit hand_back(local* p) noexcept : l(p) {}
    hand_back(const hand_back&) = delete;
    hand_back& operator=(const hand_back&) = delete;
    ~hand_back() {
      l->gone = true;
      l->flush();
      if (node* first = l->stash) {
        node* last = first;
        std::size_t n = 1;
        for (; last->next != nullptr; ++n) last = last->next;
        push_chain(first, last, n);
        l->stash = nullptr;
      }
    }
  };
  static local& mine() noexcept {
    thread_local local l{};
    if (!l.registered) {
      l.registered = true;
      thread_local hand_back h(&l);  // constructed once per thread, here
      (void)h;
    }
    return l;
  }
  // Pushes the chain first..last of n blocks, or frees it when the stack
  // holds about max_shared already.
  static void push_chain(node* first, node* last, std::size_t n) noexcept {
    shared_stack& s = shared();
    // relaxed: see shared_stack::count.
    const std::size_t held = s.count.load(std::memory_order_relaxed);
    if (held + n > max_shared) {
      last->next = nullptr;
      free_chain(first);
      return;
    }
    // relaxed, and a store, not an RMW: see shared_stack::count (two pushes
    // at once may count one chain).
    s.count.store(held + n, std::memory_order_relaxed);
    auto& h = s.head;
    last->next = h.load(std::memory_order_relaxed);  // relaxed: the CAS below re-reads it
    // release: publishes the chain's links (and the blocks' last uses) to the taker.
    while (!h.compare_exchange_weak(last->next, first, std::memory_order_release, std::memory_order_relaxed)) {
    }
  }
  static void free_chain(node* n) noexcept {
    while (n != nullptr) {
      node* next = n->next;
#if POSTBOX_DETAIL_POOL_ASAN
      ASAN_UNPOISON_MEMORY_REGION(n, Size);
#endif
      ::operator delete(static_cast<void*>(n), std::align_val_t{block_align});
      n = next;
    }
  }

 public:
  static void* allocate() {
    local& l = mine();
    if (l.gone) return ::operator new(Size, std::align_val_t{block_align});  // see local::gone
    if (l.stash == nullptr) {
      shared_stack& s = shared();
      l.stash = s.head.exchange(nullptr, std::memory_order_acquire);  // see shared_stack
      if (l.stash != nullptr) s.count.store(0, std::memory_order_relaxed);  // relaxed: see shared_stack::count
    }
    if (l.stash == nullptr && l.out != nullptr) {  // our own frees, not yet pushed
      l.stash = l.out;
      l.out = l.out_last = nullptr;
      l.out_count = 0;
    }
    if (node* n = l.stash) {
#if POSTBOX_DETAIL_POOL_ASAN
      ASAN_UNPOISON_MEMORY_REGION(n, Size);
#endif
      l.stash = n->next;
      return n;
    }
    return ::operator new(Size, std::align_val_t{block_align});
  }
  static void release(void* p) noexcept {
    local& l = mine();
    node* n = ::new (p) node{l.out};
#if POSTBOX_DETAIL_POOL_ASAN
    // Only the part past the link, which whoever takes the block reads.
    ASAN_POISON_MEMORY_REGION(reinterpret_cast<char*>(p) + sizeof(node), Size - sizeof(node));
#endif
    if (l.gone) {
      push_chain(n, n, 1);
      return;
    }
    if (l.out == nullptr) l.out_last = n;
    l.out = n;
    if (++l.out_count == batch) l.flush();
  }
};

/// Allocator drawing single objects from block_pool (for allocate_shared:
/// the object and its reference counts in one pooled block); arrays go to
/// operator new. Stateless; every instance is interchangeable.
template <class U>
struct pool_allocator {
  using value_type = U;
  pool_allocator() = default;
  template <class V>
  pool_allocator(const pool_allocator<V>&) noexcept {}
  U* allocate(std::size_t n) {
    if (n != 1) return static_cast<U*>(::operator new(n * sizeof(U), std::align_val_t{alignof(U)}));
    return static_cast<U*>(block_pool<sizeof(U), alignof(U)>::allocate());
  }
  void deallocate(U* p, std::size_t n) noexcept {
    if (n != 1) {
      ::operator delete(p, std::align_val_t{alignof(U)});
      return;
    }
    block_pool<sizeof(U), alignof(U)>::release(p);
  }
  template <class V>
  bool operator==(const pool_allocator<V>&) const noexcept {
    return true;
  }
};

}  // namespace detail
POSTBOX_END_NAMESPACE
