// SPDX-License-Identifier: MIT
// Relacy model of channel<T, spsc> (per-slot states, in_send_/closed_ close protocol, asymmetric event count) plus a mutation check.
//
// A transcription of the spsc ring in include/postbox/channel.hpp
// (emplace_quiet, receive_quiet, close), of the blocking loops of
// detail::channel_api (try, prepare_wait_sole, re-check, wait) and of
// detail::event_count's asymmetric protocol in its sole-waiter form (prepare_wait_sole,
// notify_light_sole, wake_all) into Relacy's rl::atomic / rl::var, with the same
// memory orders. Every order the algorithm depends on is read from
// `g_order[site]`, and so is the presence of every fence of the asymmetric
// barrier, so the mutation driver (`--mutants`) can weaken one site at a time
// (an order to relaxed, a fence to nothing) and demand that some test fails.
// Keep the transcription in step with channel.hpp: each site names the
// function it mirrors.
//
// How the asymmetric barrier is modelled (detail/asymmetric_fence.hpp)
// ---------------------------------------------------------------------
// light_fence() is a compiler barrier only, so in the model it is nothing:
// the hot side's accesses keep their real orders (relaxed, release, acquire)
// and the processor may reorder the store before a light fence with the load
// after it. This is the membarrier build, where channel<T, spsc>'s closed_
// never carries fence_bit: emplace_quiet's compiler barrier, then its one
// relaxed closed_ load, exactly as modelled below. (With fence_bit set, no
// membarrier or TSan, a send that sees it runs a seq_cst fence and loads
// closed_ again: the symmetric fallback, not modelled. So does a notify,
// whose waiters_ word carries light_fence_bit in that build only: wake_sole
// fences and loads waiters_ again.)
//
// heavy_fence() is membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED): the caller
// passes a full barrier on entry and on return (the kernel's smp_mb() around
// the IPIs), and every other thread of the process passes a full barrier at
// some point B during the call (a running thread in the IPI handler, a
// thread that is not running at its context switch, a thread blocked in a
// futex has passed one). The model (barrier_hub):
//   caller:  seq_cst fence (entry); for every other thread t, bump req[t]
//            (relaxed RMW) and wait (yielding) until ack[t] reaches that
//            ticket; seq_cst fence (exit). While it waits it
//            answers requests addressed to itself (two heavy fences may run at
//            once: close() and a parking thread).
//   others:  before EVERY atomic access of the protocol (and every access to a
//            slot), and inside every wait loop (the modelled futex sleep, the
//            close()'s wait for a send in progress, a heavy fence's own wait),
//            poll(): a relaxed load of req[self]; on a new request, a seq_cst
//            fence, then a relaxed store of the ticket into ack[self]. So B may
//            fall between any two accesses of a thread, wherever the scheduler
//            and the (possibly stale) relaxed read of req put it.
//   finish:  a thread that ends its part of a test keeps polling (so it still
//            answers, with its barrier during the call) until every thread of
//            the test has ended its part.
// Why this is sound (adds no ordering the real code lacks): the req/ack
// accesses are relaxed, so they create no happens-before by themselves; the
// only ordering the protocol can draw from the handshake comes from the three
// seq_cst fences: entry fence -> (req read by t) -> t's fence -> (ack read
// by caller) -> exit fence. In C++20 terms the entry fence precedes t's fence
// in S and t's fence precedes the exit fence ([atomics.order]p4.4, through the
// coherence of req and ack), which is exactly membarrier's "B during the
// call". The mutants that drop the hot-side fence or the caller's entry or
// exit fence check that nothing else in the handshake carries the ordering.
// Over-approximations: (1) Relacy orders all seq_cst fences by their
// execution order and lets each one acquire what the earlier ones released
// (a global fence order), which is stronger than C++'s S but is what the
// full barriers of membarrier give on real hardware; (2) the poll is a
// scheduling point, so the model explores more interleavings than the code
// has, never fewer.
//
// The futex. event_count::wait is modelled as a loop: read the epoch with a
// relaxed read-modify-write that adds 0 (an RMW reads the last value in the
// modification order, as the kernel's compare under the bucket lock does,
// but it carries no ordering: a conservative stand-in for the kernel's
// barriers), return if it moved past the key, else poll the barrier and
// yield. If it has not moved and every other thread of the test has
// finished, nobody can ever wake the thread: the model asserts (a lost
// wake-up). finish_wait is the real relaxed decrement.
//
// Not modelled: the select waker registry of event_count (register_waker,
// registered_, the wakers' own wake-ups), size_approx() (the same loads as
// stats(), which test 6 models), a second concurrent close() (its acquire wait for `closed`), T's constructors
// (a slot is an rl::var<int>: Relacy reports any unsynchronized access to it),
// the spin/yield phase of the blocking loops (only more attempts of the same
// try), deadlines and stop tokens.
//
// Relacy implements C++11 release sequences (a later plain store by the same
// thread continues a release sequence). C++20 removed that rule, so a
// model that passes here may still rely on it; see the note at
// `send_fail_end` below (those stores release, as channel.hpp now does).
//
// Usage: relacy_spsc_model [--mutants [--part K/N]] [--quick] [--weaken N]: the command
// line and the mutation check are model_driver.hpp's.
#include <relacy/relacy.hpp>

#include "model_driver.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

namespace model {

// --- sites: memory orders and fences ----------------------------------------

enum site : int {
  // channel<T, spsc>
  send_full_acquire,      // emplace_quiet: cell.full.load(acquire) (is the cell free?)
  publish_full_release,   // emplace_quiet: cell.full.store(1, release)
  send_end_release,       // emplace_quiet: in_send_.store(0, release) after publishing
  recv_full_acquire,      // receive_quiet: cell.full.load(acquire) (is there a message?)
  recv_closed_acquire,    // receive_quiet: closed_.load(acquire)
  recv_final_full_acquire,  // receive_quiet: cell.full.load(acquire) again after seeing closed
  take_full_release,      // receive_quiet: cell.full.store(0, release)
  take_head_release,      // receive_quiet: head_.store(h + 1, release) (for stats)
  stats_head_acquire,     // stats: head_.load(acquire) before the relaxed tail_ load
  close_cas_acq_rel,      // close: closed_ CAS open -> closing (acq_rel / acquire)
  close_in_send_acquire,  // close: in_send_.load(acquire) while a send is in progress
  close_closed_release,   // close: closed_.store(closed, release)
  is_closed_acquire,      // is_closed: closed_.load(acquire)
  // event_count
  ec_waiters_inc,         // prepare_wait_sole: waiters_.fetch_add(seq_cst)
  ec_epoch_load,          // prepare_wait_sole: epoch_.fetch_and(~wake_pending, seq_cst)
  ec_epoch_bump,          // wake: epoch_.fetch_add(seq_cst)
  ec_notify_acquire,      // notify_light_sole: waiters_.load(acquire)
  ec_pending_set,         // notify_light_sole: epoch_.fetch_or(wake_pending, seq_cst)
  // asymmetric fences (seq_cst = present, relaxed = removed)
  close_heavy_fence,      // close: heavy_fence() after marking closing
  park_recv_heavy_fence,  // prepare_wait_sole on not_empty_ (a receiver parks)
  park_send_heavy_fence,  // prepare_wait_sole on not_full_ (the sender parks)
  hot_barrier_fence,      // membarrier's barrier in every other thread (B)
  heavy_entry_fence,      // membarrier's barrier in the caller, on entry
  heavy_exit_fence,       // membarrier's barrier in the caller, on return
  site_count
};

const char* const site_names[] = {
    "emplace_quiet cell.full acquire load",
    "emplace_quiet cell.full=1 release store",
    "emplace_quiet in_send_=0 release store",
    "receive_quiet cell.full acquire load",
    "receive_quiet closed_ acquire load",
    "receive_quiet cell.full acquire re-load after closed",
    "receive_quiet cell.full=0 release store",
    "receive_quiet head_ release store",
    "stats head_ acquire load",
    "close closed_ CAS acq_rel",
    "close in_send_ acquire load",
    "close closed_=closed release store",
    "is_closed closed_ acquire load",
    "prepare_wait_sole waiters_ fetch_add seq_cst",
    "prepare_wait_sole epoch_ fetch_and seq_cst (clears wake_pending)",
    "wake epoch_ fetch_add seq_cst",
    "notify_light_sole waiters_ acquire load",
    "notify_light_sole epoch_ fetch_or seq_cst (sets wake_pending)",
    "close heavy fence (removed)",
    "receiver park heavy fence (removed)",
    "sender park heavy fence (removed)",
    "membarrier: other threads' barrier (removed)",
    "membarrier: caller's entry barrier (removed)",
    "membarrier: caller's exit barrier (removed)",
};

// In the order of `site` (checked by the static_assert below).
const rl::memory_order real_order[] = {
    rl::mo_acquire, rl::mo_release, rl::mo_release, rl::mo_acquire, rl::mo_acquire, rl::mo_acquire, rl::mo_release,
    rl::mo_release, rl::mo_acquire, rl::mo_acq_rel, rl::mo_acquire, rl::mo_release, rl::mo_acquire, rl::mo_seq_cst, rl::mo_seq_cst, rl::mo_seq_cst,
    rl::mo_acquire, rl::mo_seq_cst, rl::mo_seq_cst,
    rl::mo_seq_cst, rl::mo_seq_cst, rl::mo_seq_cst, rl::mo_seq_cst, rl::mo_seq_cst,
};

static_assert(sizeof(real_order) / sizeof(real_order[0]) == site_count, "one real order per site");
static_assert(sizeof(site_names) / sizeof(site_names[0]) == site_count, "one name per site");

// Relacy runs every simulated thread on one OS thread, so plain globals are
// safe here; g_order is set only between simulations.
rl::memory_order g_order[site_count];

inline rl::memory_order mo(site s) { return g_order[s]; }
inline bool fence_present(site s) { return g_order[s] != rl::mo_relaxed; }
inline void seq_cst_fence_if(site s) {
  if (fence_present(s)) rl::atomic_thread_fence(rl::mo_seq_cst, $);
}

using u64 = unsigned long long;
constexpr u64 ticket_mask = (u64{1} << 63) - 1;
// A ticket just below the 63-bit wrap; the spsc ring doubles it, so its
// 64-bit indices wrap after two messages.
constexpr u64 near_wrap = ticket_mask - 1;

constexpr int max_threads = 3;

// --- the asymmetric barrier (see the file comment) ----------------------------

struct barrier_hub {
  // Requests addressed to thread t (a count); bumped by heavy-fence callers.
  rl::atomic<unsigned> req[max_threads];
  // The last request count thread t has answered with a barrier.
  rl::atomic<unsigned> ack[max_threads];
  // Thread t's own copy of what it last answered (only t touches it).
  unsigned answered[max_threads];
  // Thread t has finished its part of the test. A test-harness fact, not a
  // model variable: it ends the finish loops and feeds the lost wake-up check.
  bool finished[max_threads];
  int threads = 0;

  void init(int n) {
    threads = n;
    for (int t = 0; t < max_threads; ++t) {
      req[t]($).store(0, rl::mo_relaxed);
      ack[t]($).store(0, rl::mo_relaxed);
      answered[t] = 0;
      finished[t] = false;
    }
  }

  // A possible barrier point B of the calling thread.
  void poll() {
    const int me = static_cast<int>(rl::thread_index());
    // relaxed: the request carries no ordering; the fences do.
    const unsigned r = req[me]($).load(rl::mo_relaxed);
    if (r != answered[me]) {
      seq_cst_fence_if(hot_barrier_fence);
      answered[me] = r;
      // relaxed: as above.
      ack[me]($).store(r, rl::mo_relaxed);
    }
  }

  void heavy_fence(site s) {
    if (!fence_present(s)) return;
    const int me = static_cast<int>(rl::thread_index());
    seq_cst_fence_if(heavy_entry_fence);
    unsigned ticket[max_threads] = {};
    for (int t = 0; t < threads; ++t) {
      // relaxed: the IPI; ordering comes from the fences on both ends.
      if (t != me) ticket[t] = req[t]($).fetch_add(1, rl::mo_relaxed) + 1;
    }
    for (int t = 0; t < threads; ++t) {
      if (t == me) continue;
      // relaxed: see poll().
      while (ack[t]($).load(rl::mo_relaxed) < ticket[t]) {
        poll();
        rl::yield(1, $);
      }
    }
    seq_cst_fence_if(heavy_exit_fence);
  }

  // The end of a thread's part: it stays alive, answering requests (a
  // barrier during the call, as a real thread that runs other code or sleeps
  // would pass one), until every thread of the test has finished; no heavy
  // fence can start after that.
  void finish() {
    finished[rl::thread_index()] = true;
    while (!all_finished()) {
      poll();
      rl::yield(1, $);
    }
  }

  bool all_finished() const {
    for (int t = 0; t < threads; ++t)
      if (!finished[t]) return false;
    return true;
  }

  bool others_finished() const {
    const int me = static_cast<int>(rl::thread_index());
    for (int t = 0; t < threads; ++t)
      if (t != me && !finished[t]) return false;
    return true;
  }
};

// The hub of the running test (set in each test's before()).
barrier_hub* g_hub = nullptr;

// An atomic of the protocol: every access is preceded by a possible barrier
// point of the accessing thread.
template <class T>
struct hot_atomic {
  rl::atomic<T> a;
  void init(T v) { a($).store(v, rl::mo_relaxed); }
  T load(rl::memory_order m) {
    g_hub->poll();
    return a($).load(m);
  }
  void store(T v, rl::memory_order m) {
    g_hub->poll();
    a($).store(v, m);
  }
  T fetch_add(T v, rl::memory_order m) {
    g_hub->poll();
    return a($).fetch_add(v, m);
  }
  T fetch_sub(T v, rl::memory_order m) {
    g_hub->poll();
    return a($).fetch_sub(v, m);
  }
  T fetch_and(T v, rl::memory_order m) {
    g_hub->poll();
    return a($).fetch_and(v, m);
  }
  T fetch_or(T v, rl::memory_order m) {
    g_hub->poll();
    return a($).fetch_or(v, m);
  }
  bool compare_exchange_strong(T& expected, T desired, rl::memory_order m, rl::memory_order fail) {
    g_hub->poll();
    return a($).compare_exchange_strong(expected, desired, m, fail);
  }
};

// A failure order no stronger than the success order (Relacy checks it).
inline rl::memory_order failure_order(rl::memory_order m) {
  return m == rl::mo_relaxed || m == rl::mo_release ? rl::mo_relaxed : rl::mo_acquire;
}

// --- event_count, asymmetric protocol -----------------------------------------

struct event_count {
  hot_atomic<unsigned> epoch;
  hot_atomic<unsigned> waiters;
  site heavy_site = park_recv_heavy_fence;

  void init(site s) {
    heavy_site = s;
    epoch.init(0);
    waiters.init(0);
  }
  static constexpr unsigned wake_pending = 1;
  unsigned prepare_wait_sole() {
    waiters.fetch_add(1, mo(ec_waiters_inc));
    g_hub->heavy_fence(heavy_site);
    return epoch.fetch_and(~wake_pending, mo(ec_epoch_load)) & ~wake_pending;
  }
  void finish_wait() { waiters.fetch_sub(1, rl::mo_relaxed); }
  void wake() {
    epoch.fetch_add(1, mo(ec_epoch_bump));
    // FUTEX_WAKE follows: modelled by the waiter's loop in wait().
  }
  void notify_light_sole() {
    // light_fence(): a compiler barrier, nothing in the model.
    if (waiters.load(mo(ec_notify_acquire)) == 0) return;
    // Only the notifier that sets wake_pending makes the FUTEX_WAKE (modelled
    // by the waiter's loop in wait()); the others change nothing.
    (void)epoch.fetch_or(wake_pending, mo(ec_pending_set));
    // The select waker registry (registered_, register_waker) is not modelled.
  }
  void wake_all() { wake(); }
  // FUTEX_WAIT on epoch_ == key (see the file comment).
  void wait(unsigned key) {
    for (;;) {
      if (epoch.fetch_add(0, rl::mo_relaxed) != key) return;
      // Asleep with the epoch at our key and nobody left to bump it.
      RL_ASSERT(!g_hub->others_finished() && "lost wake-up: parked forever");
      rl::yield(1, $);
    }
  }
};

// --- channel<T, spsc> ---------------------------------------------------------

enum class status { ok, full, empty, closed };

template <unsigned Capacity>
struct spsc_channel {
  static constexpr u64 capacity = Capacity;
  static constexpr u64 mask = Capacity - 1;
  static constexpr unsigned open_state = 0;
  static constexpr unsigned closing_state = 1;
  static constexpr unsigned closed_state = 2;

  rl::var<int> cells[Capacity];  // the message; rl::var: Relacy reports any unsynchronized access
  hot_atomic<unsigned> full[Capacity];  // the cell's state word: 1 holds a message, 0 free
  hot_atomic<u64> tail;  // written only by the producer; read by itself and stats
  hot_atomic<u64> head;  // written only by the consumer; read by itself and stats
  hot_atomic<unsigned> in_send;
  hot_atomic<unsigned> closed;
  event_count not_empty;
  event_count not_full;

  void init(u64 start_ticket) {
    const u64 start = (start_ticket & ticket_mask) << 1;
    tail.init(start);
    head.init(start);
    in_send.init(0);
    closed.init(open_state);
    for (unsigned k = 0; k < Capacity; ++k) full[k].init(0);
    not_empty.init(park_recv_heavy_fence);
    not_full.init(park_send_heavy_fence);
  }

  // Test set-up only (before()): a message already queued.
  void prefill(int value) {
    const u64 t = tail.a($).load(rl::mo_relaxed);
    cells[t & mask]($) = value;
    full[t & mask].a($).store(1, rl::mo_relaxed);
    tail.a($).store(t + 1, rl::mo_relaxed);
  }

  void write_cell(u64 index, int value) {
    g_hub->poll();
    cells[index & mask]($) = value;
  }
  int take_cell(u64 index) {
    g_hub->poll();
    const int out = cells[index & mask]($);
    g_hub->poll();
    cells[index & mask]($) = -1;  // the destructor's write
    return out;
  }

  // emplace_quiet (producer only).
  status emplace_quiet(int value) {
    in_send.store(1, rl::mo_relaxed);
    // light_fence(): nothing.
    if (closed.load(rl::mo_relaxed) != open_state) {
      // send_fail_end: release, as in channel.hpp. Relacy's C++11 release
      // sequences would let a later close() that reads a relaxed 0 here
      // still synchronize with the previous send's release store of 0;
      // C++20 does not, so the store itself releases.
      in_send.store(0, rl::mo_release);
      return status::closed;
    }
    const u64 t = tail.load(rl::mo_relaxed);
    if (full[t & mask].load(mo(send_full_acquire)) != 0) {
      in_send.store(0, rl::mo_release);  // send_fail_end, as above
      return status::full;
    }
    write_cell(t, value);
    tail.store(t + 1, rl::mo_relaxed);  // for stats; before the publish
    full[t & mask].store(1, mo(publish_full_release));
    in_send.store(0, mo(send_end_release));
    return status::ok;
  }

  // receive_quiet (consumer only).
  status receive_quiet(int& out) {
    const u64 h = head.load(rl::mo_relaxed);
    if (full[h & mask].load(mo(recv_full_acquire)) == 0) {
      if (closed.load(mo(recv_closed_acquire)) != closed_state) return status::empty;
      if (full[h & mask].load(mo(recv_final_full_acquire)) == 0) return status::closed;
    }
    out = take_cell(h);
    head.store(h + 1, mo(take_head_release));
    full[h & mask].store(0, mo(take_full_release));
    return status::ok;
  }

  // stats(): received and sent, as differences from the start.
  void stats(u64 start, u64& received, u64& sent) {
    received = head.load(mo(stats_head_acquire)) - start;
    sent = tail.load(rl::mo_relaxed) - start;
  }

  // close (any thread; the tests use one closer).
  void close() {
    unsigned expected = open_state;
    if (closed.compare_exchange_strong(expected, closing_state, mo(close_cas_acq_rel),
                                       failure_order(mo(close_cas_acq_rel)))) {
      g_hub->heavy_fence(close_heavy_fence);
      while (in_send.load(mo(close_in_send_acquire)) != 0) rl::yield(1, $);
      closed.store(closed_state, mo(close_closed_release));
      not_empty.wake_all();
      not_full.wake_all();
    } else {
      while (closed.load(rl::mo_acquire) != closed_state) rl::yield(1, $);
    }
  }

  bool is_closed() { return closed.load(mo(is_closed_acquire)) != open_state; }

  // channel_api: try_send / try_receive_result.
  status try_send(int value) {
    const status s = emplace_quiet(value);
    if (s == status::ok) not_empty.notify_light_sole();
    return s;
  }
  status try_receive(int& out) {
    const status s = receive_quiet(out);
    if (s == status::ok) not_full.notify_light_sole();
    return s;
  }

  // channel_api::send_blocking without the spin phase and without deadline or
  // stop tokens: ok or closed.
  status send_blocking(int value) {
    status s = try_send(value);
    if (s != status::full) return s;
    for (;;) {
      const unsigned key = not_full.prepare_wait_sole();
      s = try_send(value);
      if (s != status::full) {
        not_full.finish_wait();
        return s;
      }
      not_full.wait(key);
      not_full.finish_wait();
      s = try_send(value);
      if (s != status::full) return s;
    }
  }

  // channel_api::receive_blocking, likewise: ok or closed.
  status receive_blocking(int& out) {
    status s = try_receive(out);
    if (s != status::empty) return s;
    for (;;) {
      const unsigned key = not_empty.prepare_wait_sole();
      s = try_receive(out);
      if (s != status::empty) {
        not_empty.finish_wait();
        return s;
      }
      not_empty.wait(key);
      not_empty.finish_wait();
      s = try_receive(out);
      if (s != status::empty) return s;
    }
  }
};

// --- tests --------------------------------------------------------------------
// Thread 0 is the producer, thread 1 the consumer, thread 2 (if any) closes.

template <class Derived, unsigned Threads>
struct spsc_test : rl::test_suite<Derived, Threads> {
  barrier_hub hub;
  void start() {
    g_hub = &hub;
    hub.init(static_cast<int>(Threads));
  }
};

// 1. Every message sent ok is received exactly once and in order, across the
// wrap of the ring (capacity 2, four messages) and of the 64-bit indices.
template <unsigned Capacity>
struct fifo_wrap : spsc_test<fifo_wrap<Capacity>, 2> {
  spsc_channel<Capacity> ch;
  static constexpr int count = 4;
  void before() {
    this->start();
    ch.init(near_wrap);
  }
  void thread(unsigned index) {
    if (index == 0) {
      for (int v = 1; v <= count; ++v)
        while (ch.try_send(v) != status::ok) rl::yield(1, $);
    } else {
      for (int want = 1; want <= count; ++want) {
        int v = 0;
        while (ch.try_receive(v) != status::ok) rl::yield(1, $);
        RL_ASSERT(v == want);
      }
    }
    this->hub.finish();
  }
};

// 1b. The same through the blocking calls on capacity 1: both sides park and
// notify, and two heavy fences may run at once.
struct fifo_blocking : spsc_test<fifo_blocking, 2> {
  spsc_channel<1> ch;
  static constexpr int count = 3;
  void before() {
    this->start();
    ch.init(near_wrap);
  }
  void thread(unsigned index) {
    if (index == 0) {
      for (int v = 1; v <= count; ++v) RL_ASSERT(ch.send_blocking(v) == status::ok);
    } else {
      for (int want = 1; want <= count; ++want) {
        int v = 0;
        RL_ASSERT(ch.receive_blocking(v) == status::ok);
        RL_ASSERT(v == want);
      }
    }
    this->hub.finish();
  }
};

// 2. close() racing sends: a send returns closed (then its message is never
// received) or ok (then the receiver gets it before it sees closed); a send
// that starts after close() returned fails. The receiver drains until closed.
template <bool BlockingReceiver>
struct close_races_send : spsc_test<close_races_send<BlockingReceiver>, 3> {
  spsc_channel<2> ch;
  rl::atomic<int> close_returned;  // test instrumentation
  rl::var<int> sent_ok;            // bit v: send of v returned ok
  rl::var<int> received;           // bit v: v received
  void before() {
    this->start();
    ch.init(near_wrap);
    close_returned($).store(0, rl::mo_relaxed);
  }
  void thread(unsigned index) {
    if (index == 0) {
      int ok = 0;
      bool saw_closed = false;
      for (int v = 1; v <= 2; ++v) {
        const bool after_close = close_returned($).load(rl::mo_seq_cst) != 0;
        const status s = ch.try_send(v);
        RL_ASSERT(s == status::ok || s == status::closed);
        RL_ASSERT(!(after_close && s == status::ok));
        RL_ASSERT(!(saw_closed && s == status::ok));
        if (s == status::ok) ok |= 1 << v;
        saw_closed = saw_closed || s == status::closed;
      }
      sent_ok($) = ok;
    } else if (index == 1) {
      int got = 0;
      int last = 0;
      for (;;) {
        int v = 0;
        const status s = BlockingReceiver ? ch.receive_blocking(v) : ch.try_receive(v);
        if (s == status::closed) break;
        if (s == status::empty) {
          rl::yield(1, $);
          continue;
        }
        RL_ASSERT(v == 1 || v == 2);
        RL_ASSERT(v > last);
        last = v;
        got |= 1 << v;
      }
      received($) = got;
    } else {
      ch.close();
      close_returned($).store(1, rl::mo_seq_cst);
    }
    this->hub.finish();
  }
  void after() { RL_ASSERT(received($) == sent_ok($)); }
};

// 3a. No lost wake-up for a parked receiver: the producer sends once; the
// receiver blocks and must get the message.
struct wakeup_receiver : spsc_test<wakeup_receiver, 2> {
  spsc_channel<2> ch;
  void before() {
    this->start();
    ch.init(near_wrap);
  }
  void thread(unsigned index) {
    if (index == 0) {
      RL_ASSERT(ch.try_send(5) == status::ok);
    } else {
      int v = 0;
      RL_ASSERT(ch.receive_blocking(v) == status::ok);
      RL_ASSERT(v == 5);
    }
    this->hub.finish();
  }
};

// 3b. No lost wake-up for the sender parked on a full ring: capacity 1,
// pre-filled; the consumer takes once; the sender must get its message in.
struct wakeup_sender : spsc_test<wakeup_sender, 2> {
  spsc_channel<1> ch;
  void before() {
    this->start();
    ch.init(near_wrap);
    ch.prefill(1);
  }
  void thread(unsigned index) {
    if (index == 0) {
      RL_ASSERT(ch.send_blocking(2) == status::ok);
    } else {
      int v = 0;
      RL_ASSERT(ch.try_receive(v) == status::ok);
      RL_ASSERT(v == 1);
    }
    this->hub.finish();
  }
  void after() {
    // The ring holds exactly the sender's message.
    RL_ASSERT(ch.tail.a($).load(rl::mo_relaxed) - ch.head.a($).load(rl::mo_relaxed) == 1);
    RL_ASSERT(ch.cells[0]($) == 2);
  }
};

// 4a. close() wakes a parked receiver (thread 0 closes here).
struct close_wakes_receiver : spsc_test<close_wakes_receiver, 2> {
  spsc_channel<2> ch;
  void before() {
    this->start();
    ch.init(near_wrap);
  }
  void thread(unsigned index) {
    if (index == 0) {
      ch.close();
    } else {
      int v = 0;
      RL_ASSERT(ch.receive_blocking(v) == status::closed);
    }
    this->hub.finish();
  }
};

// 4b. close() wakes the sender parked on a full ring (thread 1 closes here).
struct close_wakes_sender : spsc_test<close_wakes_sender, 2> {
  spsc_channel<1> ch;
  void before() {
    this->start();
    ch.init(near_wrap);
    ch.prefill(1);
  }
  void thread(unsigned index) {
    if (index == 0) {
      RL_ASSERT(ch.send_blocking(2) == status::closed);
    } else {
      ch.close();
    }
    this->hub.finish();
  }
};

// 4c. close() while the sender may be parked on a full ring and the consumer
// frees a slot: the sender ends (ok or closed) and an ok send is received
// before closed.
struct close_races_parked_sender : spsc_test<close_races_parked_sender, 3> {
  spsc_channel<1> ch;
  rl::var<int> sent;
  rl::var<int> received;
  void before() {
    this->start();
    ch.init(near_wrap);
    ch.prefill(1);
  }
  void thread(unsigned index) {
    if (index == 0) {
      const status s = ch.send_blocking(2);
      RL_ASSERT(s == status::ok || s == status::closed);
      sent($) = s == status::ok ? 1 : 0;
    } else if (index == 1) {
      int got = 0;
      for (;;) {
        int v = 0;
        const status s = ch.try_receive(v);
        if (s == status::closed) break;
        if (s == status::empty) {
          rl::yield(1, $);
          continue;
        }
        RL_ASSERT(v == got + 1);
        got = v;
      }
      received($) = got;
    } else {
      ch.close();
    }
    this->hub.finish();
  }
  void after() { RL_ASSERT(received($) == 1 + sent($)); }
};

// 5. is_closed() pairs with close(): once it reports closed, the closer's
// writes before close() are visible (the release half of close()'s CAS, or
// its later release store, with is_closed()'s acquire load).
struct is_closed_publishes : spsc_test<is_closed_publishes, 2> {
  spsc_channel<1> ch;
  rl::var<int> note;  // written by the closer before close()
  void before() {
    this->start();
    ch.init(0);
  }
  void thread(unsigned index) {
    if (index == 0) {
      note($) = 7;
      ch.close();
    } else {
      if (ch.is_closed()) RL_ASSERT(note($) == 7);
    }
    this->hub.finish();
  }
};

// 6. stats() never counts more received than sent: the tail_ store precedes
// the publish, the consumer's head_ store (release) follows its acquire of
// the cell, and stats() acquires head_ before it reads tail_.
struct stats_consistent : spsc_test<stats_consistent, 3> {
  spsc_channel<1> ch;
  static constexpr u64 first = (near_wrap & ticket_mask) << 1;
  void before() {
    this->start();
    ch.init(near_wrap);
  }
  void thread(unsigned index) {
    if (index == 0) {
      for (int v = 1; v <= 2; ++v)
        while (ch.try_send(v) != status::ok) rl::yield(1, $);
    } else if (index == 1) {
      for (int want = 1; want <= 2; ++want) {
        int v = 0;
        while (ch.try_receive(v) != status::ok) rl::yield(1, $);
        RL_ASSERT(v == want);
      }
    } else {
      for (int k = 0; k < 3; ++k) {
        u64 received = 0, sent = 0;
        ch.stats(first, received, sent);
        RL_ASSERT(received <= sent);
      }
    }
    this->hub.finish();
  }
};

// --- driver -------------------------------------------------------------------

// The tests, run by model_driver::main (see model_driver.hpp).
struct runner : model_driver::test_runner {
  runner() { name_width = 56; }

  // Runs every test; returns the number that failed.
  int run_all() {
    int failed = 0;
    failed += !run<fifo_wrap<2>>("1. FIFO exactly once across the wrap, capacity 2");
    failed += !run<fifo_wrap<1>>("1. FIFO exactly once across the wrap, capacity 1");
    failed += !run<fifo_blocking>("1. FIFO through blocking send/receive, capacity 1");
    failed += !run<close_races_send<false>>("2. close racing sends, spinning receiver");
    failed += !run<close_races_send<true>>("2. close racing sends, blocking receiver");
    failed += !run<wakeup_receiver>("3. no lost wake-up: parked receiver, one send");
    failed += !run<wakeup_sender>("3. no lost wake-up: parked sender, one receive");
    failed += !run<close_wakes_receiver>("4. close wakes a parked receiver");
    failed += !run<close_wakes_sender>("4. close wakes a parked sender");
    failed += !run<close_races_parked_sender>("4. close racing a parked sender and a receive");
    failed += !run<is_closed_publishes>("5. is_closed() sees the closer's earlier writes");
    // Scaled: a stale tail_ read needs a rare schedule (the mutation check
    // runs fewer iterations per test).
    failed += !run<stats_consistent>("6. stats() never counts more received than sent", 4);
    return failed;
  }
};

}  // namespace model

// Mutants no test can tell from the real algorithm, with the reason.
// Each is still kept in channel.hpp for the reason given; the check must not
// be read as licence to weaken it.
const char* undetectable_reason(int s) {
  switch (s) {
    case model::recv_final_full_acquire:
      return "redundant after the closed_ acquire: closed_=closed is stored (release) after close() acquired "
             "in_send_==0 from the last send's release, which follows its cell.full store, so that store already "
             "happens before this load (coherence makes it read it) and before the slot read; the acquire only "
             "guards the slot read should that chain break (see send_fail_end)";
    case model::ec_notify_acquire:
      return "the ring's futex protocol does not need it (it was relaxed before select existed): the acquire makes "
             "a select waker's registration (register_waker, not modelled) visible to wake() once its increment "
             "is seen";
    case model::ec_waiters_inc:
      return "the heavy fence right after it orders the increment: increment, caller's entry barrier, the "
             "notifier's barrier B, the notifier's relaxed waiters_ read (C++20 [atomics.order]p4.4), so relaxed "
             "would do; seq_cst costs nothing next to the membarrier syscall that follows";
    default:
      return nullptr;
  }
}

int main(int argc, char** argv) {
  model::runner r;
  return model_driver::main(argc, argv, r,
                            {model::site_count, model::g_order, model::real_order, model::site_names, undetectable_reason},
                            {100000, 10000, 10000, 2000});
}
