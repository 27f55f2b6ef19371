// SPDX-License-Identifier: MIT
// Relacy model of pending_requests' slots (request-reply: one CAS decides a request's outcome; a callback runs on its slot; close() waits for it) plus a mutation check.
//
// A transcription of the slot protocol in
// include/postbox/request_reply/pending.hpp into Relacy's rl::atomic /
// rl::var, with the same memory orders:
//   open_slot_with    under the table's mutex: the acquire load of the slot's
//                     state (is it reusable?), the relaxed id store, the
//                     completion written, the release store of pending(g+1)
//   complete_slot     no lock: the acquire load of pending(g), the relaxed id
//                     check, the claim CAS, the completion read, the release
//                     store of replied(g)
//   run_slot_callback the claim CAS to running(g), the callback (it writes
//                     the user's state), the release exchange to replied(g),
//                     and wake_closer (the table's lock, then notify_all) if
//                     the exchange replaced running_watched
//   on_deadline       under the mutex: the acquire load, the claim CAS, the
//                     completion read, the release store of expired(g)
//   cancel_all +      under the mutex: claim every pending slot (free), then
//   slot_runs_ended   wait on the condition variable while a slot's callback
//                     runs on another thread, marking it running_watched
// The two id words (id_high, id_low: both relaxed) are one word here; the
// future and the callback are one rl::var<int> each (Relacy reports any
// access to them that the protocol does not order), and so is the state a
// callback writes (the user's, which close()'s caller may read or destroy
// once close() returned). Every order the protocol depends on is read from
// `g_order[site]`, and so is whether wake_closer takes the lock before it
// notifies, so the mutation driver (`--mutants`) can weaken one site at a
// time and demand that some test fails. Keep the transcription in step with
// pending.hpp: each site names the function it mirrors.
//
// Not modelled: the map path (the table's mutex orders it), the finished-id
// FIFO and the counters (under the mutex, or relaxed statistics),
// slots_in_use_ and the pending limit (requesting side, under the mutex),
// the chunks' publication (a release/acquire pair of its own), the thread's
// own runs (detail::slot_runs_here: a thread-local list), and the
// generation wrap (60 bits).
//
// Usage: relacy_request_slot_model [--mutants [--part K/N]] [--quick] [--weaken N]: the command
// line and the mutation check are model_driver.hpp's.
#include <relacy/relacy.hpp>

#include "model_driver.hpp"

#include <cstdint>

namespace model {

// --- sites ---------------------------------------------------------------------

enum site : int {
  open_reuse_acquire,     // open_slot_with: state.load(acquire) before reusing the slot
  open_pending_release,   // open_slot_with: state.store(pending(g+1), release)
  reply_pending_acquire,  // complete_slot: state.load(acquire) before the id check
  claim_acquire,          // claim_slot: CAS pending -> claimed/running (acquire on success)
  reply_end_release,      // complete_slot: state.store(replied, release) (future form)
  run_end_release,        // run_slot_callback's run_end: state.exchange(replied, release)
  timer_end_release,      // on_deadline: state.store(expired, release)
  close_runs_acquire,     // slot_runs_ended: state.load(acquire)
  close_watch_acquire,    // slot_runs_ended: CAS running -> running_watched (acquire both ways)
  wake_takes_lock,        // wake_closer: the table's lock before notify_all (relaxed = removed)
  site_count
};

const char* const site_names[] = {
    "open_slot_with state acquire load (reuse)",
    "open_slot_with state=pending release store",
    "complete_slot state acquire load",
    "claim_slot CAS acquire",
    "complete_slot state=replied release store",
    "run_end state exchange release",
    "on_deadline state=expired release store",
    "slot_runs_ended state acquire load",
    "slot_runs_ended CAS to watched acquire",
    "wake_closer takes the lock (removed)",
};

const rl::memory_order real_order[] = {
    rl::mo_acquire, rl::mo_release, rl::mo_acquire, rl::mo_acquire, rl::mo_release,
    rl::mo_release, rl::mo_release, rl::mo_acquire, rl::mo_acquire, rl::mo_seq_cst,
};

static_assert(sizeof(real_order) / sizeof(real_order[0]) == site_count, "one real order per site");
static_assert(sizeof(site_names) / sizeof(site_names[0]) == site_count, "one name per site");

// Relacy runs every simulated thread on one OS thread; g_order is set only
// between simulations.
rl::memory_order g_order[site_count];
inline rl::memory_order mo(site s) { return g_order[s]; }
inline bool present(site s) { return g_order[s] != rl::mo_relaxed; }
// A failure order no stronger than the success order (Relacy checks it).
inline rl::memory_order failure_order(rl::memory_order m) {
  return m == rl::mo_relaxed || m == rl::mo_release ? rl::mo_relaxed : rl::mo_acquire;
}

using u64 = unsigned long long;
// state = generation << 4 | tag, as in pending.hpp.
constexpr u64 slot_free = 0, slot_pending = 1, slot_claimed = 2, slot_replied = 3, slot_expired = 4, slot_running = 5,
              slot_running_watched = 6, slot_pending_callback = 7;
inline u64 tag_of(u64 s) { return s & 15u; }
inline u64 gen_of(u64 s) { return s >> 4; }
inline u64 make_state(u64 gen, u64 tag) { return gen << 4 | tag; }
inline bool is_pending(u64 tag) { return tag == slot_pending || tag == slot_pending_callback; }
inline bool is_running(u64 tag) { return tag == slot_running || tag == slot_running_watched; }

// std::lock_guard for Relacy's mutex (its calls take $).
struct guard {
  rl::mutex& m;
  explicit guard(rl::mutex& mx) : m(mx) { m.lock($); }
  ~guard() { m.unlock($); }
};
// The interface Relacy's condition_variable::wait expects of a lock.
struct cv_lock {
  rl::mutex& m;
  void lock(rl::debug_info_param info) { m.lock(info); }
  void unlock(rl::debug_info_param info) { m.unlock(info); }
};

// One slot of the table, its mutex and condition variable.
struct table {
  rl::atomic<u64> state;
  rl::atomic<u64> id;        // id_high/id_low: relaxed, ordered by state
  rl::var<int> completion;  // the future or the callback: written while the slot is free
  rl::var<int> user_state;  // what a callback writes (the caller's, after close())
  rl::mutex mutex;
  rl::condition_variable idle;

  void init() {
    state($).store(make_state(0, slot_free), rl::mo_relaxed);
    id($).store(0, rl::mo_relaxed);
    completion($) = 0;
    user_state($) = 0;
  }

  // open_slot_with, under the mutex: 0 if the slot is not reusable, else
  // the request's generation.
  u64 open(u64 request_id, int completion_value, bool callback) {
    guard g(mutex);
    const u64 old = state($).load(mo(open_reuse_acquire));
    const u64 tag = tag_of(old);
    if (is_pending(tag) || tag == slot_claimed || is_running(tag)) return 0;
    id($).store(request_id, rl::mo_relaxed);
    completion($) = completion_value;
    const u64 gen = gen_of(old) + 1;
    state($).store(make_state(gen, callback ? slot_pending_callback : slot_pending), mo(open_pending_release));
    return gen;
  }

  // claim_slot: pending(g), as `st` read it, -> `to`.
  bool claim(u64& st, u64 to) {
    if (!is_pending(tag_of(st))) return false;
    return state($).compare_exchange_strong(st, make_state(gen_of(st), to), mo(claim_acquire), rl::mo_relaxed);
  }

  // complete_slot and run_slot_callback: the completion value taken, or 0
  // (not this slot's pending request). A callback adds 100 * its value to
  // the user's state.
  int reply(u64 request_id) {
    u64 st = state($).load(mo(reply_pending_acquire));
    if (!is_pending(tag_of(st))) return 0;
    if (id($).load(rl::mo_relaxed) != request_id) return 0;
    if (tag_of(st) == slot_pending_callback) {
      if (!claim(st, slot_running)) return 0;
      const int cb = completion($);
      completion($) = 0;  // moved out
      user_state($) = user_state($) + 100 * cb;  // the callback runs
      const u64 was = state($).exchange(make_state(gen_of(st), slot_replied), mo(run_end_release));
      if (tag_of(was) == slot_running_watched) {
        if (present(wake_takes_lock)) {
          guard g(mutex);
        }
        idle.notify_all($);
      }
      return cb;
    }
    if (!claim(st, slot_claimed)) return 0;
    const int v = completion($);
    completion($) = 0;
    state($).store(make_state(gen_of(st), slot_replied), mo(reply_end_release));
    return v;
  }

  // on_deadline's slot item, under the mutex: the completion value, or 0.
  int expire(u64 gen) {
    guard g(mutex);
    u64 st = state($).load(rl::mo_acquire);
    if (gen_of(st) != gen || !claim(st, slot_claimed)) return 0;
    const int v = completion($);
    completion($) = 0;
    state($).store(make_state(gen, slot_expired), mo(timer_end_release));
    return v;
  }

  // close(): cancel_all (a pending slot is claimed and freed; returns its
  // completion value, or 0), then wait_callbacks' slot_runs_ended until no
  // callback runs on the slot.
  int close() {
    int canceled = 0;
    {
      guard g(mutex);
      u64 st = state($).load(rl::mo_acquire);
      if (claim(st, slot_claimed)) {
        canceled = completion($);
        completion($) = 0;
        state($).store(make_state(gen_of(st), slot_free), rl::mo_release);
      }
    }
    guard g(mutex);
    cv_lock l{mutex};
    while (!runs_ended()) idle.wait(l, $);
    return canceled;
  }

  // slot_runs_ended, under the mutex: no callback runs on the slot; a run
  // found going is marked watched (its end then wakes `idle`).
  bool runs_ended() {
    u64 st = state($).load(mo(close_runs_acquire));
    for (;;) {
      const u64 tag = tag_of(st);
      if (!is_running(tag)) return true;
      if (tag == slot_running_watched) return false;
      if (state($).compare_exchange_strong(st, make_state(gen_of(st), slot_running_watched), mo(close_watch_acquire),
                                            failure_order(mo(close_watch_acquire))))
        return false;
    }
  }
};

// 1. A reply and the timer race for one pending request: exactly one of
// them completes it, with its completion.
struct reply_races_timer : rl::test_suite<reply_races_timer, 2> {
  table t;
  int replied = 0, expired = 0;
  u64 gen = 0;
  void before() {
    t.init();
    gen = t.open(1, 11, false);
  }
  void thread(unsigned index) {
    if (index == 0) replied = t.reply(1);
    else expired = t.expire(gen);
  }
  void after() {
    RL_ASSERT((replied == 11) != (expired == 11));
    RL_ASSERT(replied == 0 || replied == 11);
    RL_ASSERT(expired == 0 || expired == 11);
  }
};

// 2. A slot reused while a duplicate of the last reply is still in flight:
// the requesting thread reuses it for request 2 as soon as request 1 is
// finished; two replies to request 1 race it. Request 1 is completed once,
// request 2 never by a reply to 1, and the completions are handed over
// without a data race.
struct duplicate_races_reuse : rl::test_suite<duplicate_races_reuse, 3> {
  table t;
  int got[3] = {};
  void before() {
    t.init();
    (void)t.open(1, 11, false);
  }
  void thread(unsigned index) {
    if (index == 0) {
      while (t.open(2, 22, false) == 0) rl::yield(1, $);
    } else {
      got[index] = t.reply(1);
    }
  }
  void after() {
    RL_ASSERT((got[1] == 11) != (got[2] == 11));
    RL_ASSERT(got[1] != 22 && got[2] != 22);
    const u64 st = t.state($).load(rl::mo_relaxed);
    RL_ASSERT(tag_of(st) == slot_pending && gen_of(st) == 2);
    RL_ASSERT(t.completion($) == 22);
  }
};

// 3. A callback request: its reply runs the callback while close() runs on
// another thread. close() either cancels the request (the callback never
// runs) or returns only after the callback returned, and then sees what it
// wrote (the caller may read or destroy that state).
struct close_waits_for_callback : rl::test_suite<close_waits_for_callback, 2> {
  table t;
  int canceled = 0, replied = 0, seen_at_close = -1;
  void before() {
    t.init();
    (void)t.open(1, 7, true);
  }
  void thread(unsigned index) {
    if (index == 0) {
      canceled = t.close();
      seen_at_close = t.user_state($);
    } else {
      replied = t.reply(1);
    }
  }
  void after() {
    RL_ASSERT((canceled == 7) != (replied == 7));
    RL_ASSERT(seen_at_close == (replied == 7 ? 700 : 0));
  }
};

// 4. As 3, with the slot reused by the next callback request after the
// first reply's callback ended, and that request's reply racing close():
// close() waits for whichever callback runs when it looks.
struct close_waits_for_reused_slot : rl::test_suite<close_waits_for_reused_slot, 3> {
  table t;
  int canceled = 0, first = 0, second = 0, seen_at_close = -1;
  void before() {
    t.init();
    (void)t.open(1, 1, true);
  }
  void thread(unsigned index) {
    if (index == 0) {
      first = t.reply(1);
      while (t.open(2, 2, true) == 0) rl::yield(1, $);
    } else if (index == 1) {
      for (int i = 0; i < 4 && second == 0; ++i) {  // the reply to 2, once it was sent
        second = t.reply(2);
        if (second == 0) rl::yield(1, $);
      }
    } else {
      while (gen_of(t.state($).load(rl::mo_relaxed)) < 2) rl::yield(1, $);  // request 2 was opened
      canceled = t.close();
      seen_at_close = t.user_state($);
    }
  }
  void after() {
    RL_ASSERT(first == 1);
    RL_ASSERT((canceled == 2) != (second == 2));
    RL_ASSERT(seen_at_close == 100 + (second == 2 ? 200 : 0));
  }
};

// The tests, run by model_driver::main (see model_driver.hpp).
struct runner : model_driver::test_runner {
  runner() { name_width = 64; }

  int run_all() {
    int failed = 0;
    failed += !run<reply_races_timer>("1. a reply and the timer: one outcome");
    failed += !run<duplicate_races_reuse>("2. duplicate replies racing the slot's reuse");
    failed += !run<close_waits_for_callback>("3. close() waits for a running callback");
    failed += !run<close_waits_for_reused_slot>("4. close() waits for the reused slot's callback");
    return failed;
  }
};

}  // namespace model

// Mutants no test can tell from the real protocol, with the reason. Each is
// kept in pending.hpp for the reason given.
const char* undetectable_reason(int s) {
  switch (s) {
    case model::claim_acquire:
      return "every caller of claim_slot loads the state with acquire first (complete_slot, on_deadline, "
             "cancel_all, abandon), and a successful CAS reads that same pending value, so the load already "
             "synchronizes with open_slot's release; the CAS's acquire guards a caller that would skip the load";
    case model::timer_end_release:
      return "on_deadline stores expired(g) under the table's mutex, and the only reader that then touches the "
             "slot's completion, open_slot_with's reuse, loads the state under the same mutex, which already orders "
             "the timer's read of the completion before the reuse's write; a reply that sees expired(g) reads "
             "nothing of the slot";
    default:
      return nullptr;
  }
}

int main(int argc, char** argv) {
  model::runner r;
  return model_driver::main(argc, argv, r,
                            {model::site_count, model::g_order, model::real_order, model::site_names, undetectable_reason},
                            {100000, 10000, 20000, 2000});
}
