// SPDX-License-Identifier: MIT
// Benchmark: request-reply round trip (postbox vs ZeroMQ inproc REQ/REP vs the channel's own ping-pong) and operations throughput.
//
// Round-trip rows (one requester thread, one responder thread, sequential
// requests; median ns per round trip over interleaved rounds: each round runs
// every row once, the order rotated each round):
//   channel ping-pong     postbox::channel<int> x2, blocking send/receive on both sides (the floor)
//   promise handoff       a promise pointer over a channel, the server sets it, the caller waits on the future
//   postbox requester     requester::request(payload, timeout) -> future, value(); responder thread
//   postbox callback      requester::request(payload, timeout, callback); the callback sets a flag the caller
//                         awaits as reply_future::get() awaits its word (detail::spin_until, then yields)
//   zeromq REQ/REP        ZeroMQ inproc REQ/REP, zmq_send/zmq_recv of 4 bytes (the form ZeroMQ's own
//                         inproc_lat uses, zmq_msg_send/recv, is also timed; the better of the two is the peer)
// Printed ratios (issue 18's row): postbox / best ZeroMQ (target <= 0.1) and
// postbox / channel ping-pong (target <= 3), both from medians of one run.
//
// Usage: request_reply_bench [--rounds N] [--n N] [--only ROW] [--pin]
// --pin: every row's serving thread (echo, responder, ZeroMQ REP, timer) on
// cpu 1, the requesting thread on cpu 0: the same placement for every row.
//        request_reply_bench --profile postbox|callback|zmq [n]
// --profile runs n (default 20000) round trips on ONE thread (the responder
// is polled after each request, so nobody waits) for callgrind; instructions
// per round trip = (Ir(n) - Ir(0)) / n.
//
// Profile (callgrind, g++ 12 -O3, --profile, per round trip, requester + responder):
//   ZeroMQ REQ/REP inproc, zmq_send/zmq_recv                            4,377 instructions
//   postbox before issue 18 (a timer scheduled and canceled per request,
//   mutex+condvar future behind a std::function, map nodes and the done
//   list allocated per request, a registry lookup allocating its key)  12,567
//   issue 18, first pass (one table timer; the future is one atomic
//   word; nodes recycled; the reply moved once into the future; cached
//   endpoint; the request's own fresh id is its correlation id)         6,805
//   second pass                                                         5,575
//     responder serves the channel's receive result in place and
//     builds the reply in the packet's variant (no optional, no variant
//     move): -650; generated endpoint names fit std::string's inline
//     buffer (rr. + 12 hex digits), so reply-to allocates nothing: -290;
//     one clock read per envelope (5 -> 3 per round trip): -115; the
//     request built in its channel slot (try_emplace): -165.
//   now (same run: the second pass measured 5,592, ZeroMQ 4,377)        4,312
//     an emptied table keeps its armed timer (it fires once into the idle
//     table) instead of cancel + schedule_at per round trip: -960
//     (cancel 509, arm_timer/schedule_at 449); the row reads the outcome
//     with reply_future::value() in place: envelope moves 4 -> 2 (550 ->
//     275 with their strings).
//   What is left: 2 envelope moves (the request out of its slot is served
//   in place; the reply into the future, about 140 each), envelope
//   destructors (~210), 2 ids (a process-wide CAS each, strictly
//   increasing ids are envelope.hpp's documented guarantee: ~175 both), the
//   reply-to header's vector (header_map::set ~130 plus malloc/free), the
//   table's two locks, its map, done-ring and deadline-heap bookkeeping.
//   Stop 33 (after the slots, the shared header and the pooled future
//   state had taken it to 3,172): the reply's move into its outcome and
//   the request's out of its channel slot (which had been two moves: into a
//   local, then into the result) each became one field-wise relocation that
//   skips empty strings (detail::relocated_envelope, slot_relocation):
//   3,172 -> 2,940 -> 2,453; callback form 3,505 -> 3,289 -> 2,703.
// Syscalls (perf stat -e syscalls:sys_enter_futex, --pin --rounds 3,
// --only "postbox requester", 60,000 round trips):
//   before issue 18: 3 futex calls per round trip (condvar future).
//   first pass (pause-only adaptive spin in get(), then sleep): at load
//   4-5, 54k-113k futex and 108k-227k sched_yield; at load 12-16, 18k-36k
//   futex, 37k-75k yields. The pause-only spin made the requester sleep
//   and the responder pay a futex wake on most round trips.
//   second pass (get() waits as a channel's blocking receive: backoff
//   pauses, 4 yields, then sleep): load 4-5: 6k-34k futex, 33k-120k
//   yields; load 12-16: 2.4k-2.5k futex, 8k-8.5k yields. No syscall on
//   either side when the reply comes while the requester spins.
//   now (both waits check every 4 pauses for the same 128-pause budget,
//   detail::rr_spin; a pause is 25 ns here, so backoff's doubling runs
//   noticed a 1-2 us wait's end up to 0.8-1.6 us late; the responder spins
//   so before its blocking receive), perf trace -s, 20k round trips, load
//   13.5, requester thread + responder thread: second pass 219 + 217 futex,
//   5,826 + 5,481 yields; now 105 + 105 futex, 2,740 + 1,469 yields (about
//   0.003 parks per round trip on each side). The channel ping-pong in the
//   same minutes: 27-30 futex, 650-850 yields per thread.
// Wall clock: this VM (2-core AMD EPYC) was shared with builds at load 4-17
// while this was measured, so only same-run comparisons mean anything:
//   load 4-5, 20k round trips x3: requester 42-143 us before, 30-73 us now.
//   load 15, 5k x3 (three alternating pairs): before 0.76-1.42 ms,
//   now 0.09-0.47 ms. At that load ZeroMQ (threads asleep in poll, woken
//   with the scheduler's wake-up preference) took 71 us and the channel's
//   own ping-pong 137 us; spin-and-yield waits lose to sleeping ones when
//   every core has several runnable threads.
//   Full runs (--pin --rounds 3, 20k), one after the other: first pass at
//   load 6.5: requester 99 us, ping-pong 8.0 us, ZeroMQ 211 us (12.4x,
//   0.47x); now at load 8.2: 16.9 us, 1.9 us, 202 us (8.9x, 0.084x); now at
//   load 7.4: 23.5 us, 4.0 us, 92 us (5.8x, 0.25x). A bare futex sleep in
//   get() (no yields, neither ours nor libstdc++'s atomic::wait's) was 2-4x
//   slower at load 8 with 7-15x the futex calls: waiting longer before
//   sleeping pays there. The quiet figures of the first pass (4.4 us vs
//   0.29 us ping-pong, ZeroMQ 50.5 us) still need a quiet re-run.
//   Kept timer + value() + rr_spin, against the second pass in alternating
//   runs (--pin, 20k x5; no quiet minute was to be had): load 7: requester
//   4.7-5.4 us -> 2.5-2.7 us, channel ping-pong 0.48-0.63 us (4.2-5.4x);
//   full runs at load 8-9: 5.2 us (10.7x ping-pong, 0.065x ZeroMQ) ->
//   3.1-3.3 us (3.5-7.0x, 0.036-0.043x). One thread, nobody waiting
//   (--profile postbox 200000): 0.55 -> 0.45 us per round trip, so about
//   2 us of the two-thread round trip is cache lines crossing cores (the
//   table's lock, map node, deadline heap and done ring; the future's
//   state; the channel slot; the id counter) and noticing the other side.
//   The table's layout (docs/design/request_reply.md, "Cache lines of one
//   round trip": about 24-25 lines cross per round trip, 9 of them the
//   table's; after, 19-21 and 5-6): what both sides write under the lock
//   on lines of their own, the replying side's counters and finished-id ring
//   apart, one spare node in the hot lines, a future's entry filled field by
//   field. --profile postbox 20000: 4,303 -> 4,205 instructions. The two
//   binaries alternating (same tree but pending.hpp), --only "postbox
//   requester", 20k x5, load 5.5: 10.3-12.4 us -> 8.8-11.0 us, lower in 8
//   of 8 pairs; against channel 39f40d0 at load 2.4: 1.94-2.34 -> 1.79-2.09
//   us, lower in 6 of 6. Full runs alternating do not settle the ratio to
//   the channel ping-pong (one stalled round moves a median): 9.6x / 4.9x ->
//   4.9x / 3.7x at load 3.3-4.8, 3.1x / 3.2x -> 9.4x / 5.1x at load 2.4-3.6.
//   The callback form opens with its deadline under one lock (no arm() after
//   the send): --profile callback 20000: 5,023 -> 4,910 instructions; wall
//   clock the same (1.21 us, six alternating pairs at load 1.8).
//   Slots (pending_requests::open_slot): a request's correlation id
//   addresses a slot of the table and its reply completes it with one CAS,
//   without the lock. Future form: 4,212 -> 3,776 (with the finished-id
//   ring's flat index); callback form: 4,810 -> 4,357 (3,799 for the future
//   with the slot's variant), then 4,005 with the outcome made in the
//   callback's parameter (one envelope move instead of three). Near
//   placement, alternating pairs: requester 851-868 -> 816-830 ns; callback
//   1,191-1,217 -> 1,147-1,182 ns, then 1,125-1,215 -> 909-1,035 ns.
//   The callback row's caller waited with backoff::snooze, whose doubling
//   pause runs notice the flag late; it waits as get() does now
//   (detail::spin_until): six alternating pairs at the far placement
//   2,920-3,044 -> 2,411-2,541 ns (the requester row 2,293-2,332), two near
//   1,087-1,112 -> 967-1,031.
//   The shared reply-to header (header_map copies share their entries; a
//   requester makes the header once): future 3,805 -> 3,361, callback
//   3,991 -> 3,546 instructions (3,321 and 3,509 with the entries in the
//   map's block); allocations per round trip 2 -> 1 and
//   1 -> 0 (valgrind). Alternating pairs, near placement: callback
//   1,177-1,199 -> 1,052-1,089 ns (6 of 6).
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>

#include "bench_layout.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if POSTBOX_BENCH_HAVE_ZMQ
#include <zmq.h>
#endif

namespace {

using bench_clock = std::chrono::steady_clock;
bool g_pin = false;

void pin_to(int cpu) {
#if defined(__linux__)
  if (!g_pin) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
  (void)cpu;
#endif
}

// Threads started inside a row inherit cpu 1; the requesting thread moves
// to cpu 0 once they are started (requester_side()).
struct placement {
  placement() { pin_to(1); }
  void requester_side() const { pin_to(0); }
};

double seconds_since(bench_clock::time_point t0) {
  return std::chrono::duration<double>(bench_clock::now() - t0).count();
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "request_reply_bench: %s\n", what);
  std::abort();
}

// The floor: one round trip through two channels, blocking on both sides.
double channel_ping_pong(int n) {
  postbox::channel<int> there(64), back(64);
  placement p;
  std::thread echo([&] {
    while (auto v = there.receive()) (void)back.send(*v + 1);
  });
  p.requester_side();
  long long sum = 0;
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    (void)there.send(i);
    sum += *back.receive();
  }
  const double s = seconds_since(t0);
  there.close();
  echo.join();
  if (sum != static_cast<long long>(n) * (n + 1) / 2) fail("channel ping-pong lost a message");
  return s;
}

// Bare handoff: the caller passes a promise to a server thread and waits on its future.
double promise_round_trip(int n) {
  postbox::channel<std::promise<int>*> ch(64);
  placement place;
  std::thread server([&] {
    while (auto p = ch.receive()) (*p)->set_value(1);
  });
  place.requester_side();
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    std::promise<int> p;
    auto f = p.get_future();
    if (ch.send(&p) != postbox::send_status::ok) fail("promise channel refused");
    (void)f.get();
  }
  const double s = seconds_since(t0);
  ch.close();
  server.join();
  return s;
}

struct rr_rig {
  postbox::timer_service timers;
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
  postbox::responder<int, int> resp;
  postbox::requester<int, int> req;
  explicit rr_rig(std::size_t threads)
      : resp(requests, registry, [](const postbox::envelope<int>& e) { return e.payload + 1; },
             postbox::default_clock(), threads),
        req(requests, registry, timers) {}
};

double postbox_round_trip(int n) {
  placement place;
  rr_rig rig(1);
  place.requester_side();
  long long sum = 0;
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    auto f = rig.req.request(i, std::chrono::seconds(10));
    if (!f.has_value()) fail("request refused");
    const auto& o = f->value();  // the outcome read where it lies (get() would move it out)
    if (!o.ok()) fail("request failed");
    sum += o.reply->payload;
  }
  const double s = seconds_since(t0);
  if (sum != static_cast<long long>(n) * (n + 1) / 2) fail("postbox requester lost a reply");
  return s;
}

double postbox_callback_round_trip(int n) {
  placement place;
  rr_rig rig(1);
  place.requester_side();
  long long sum = 0;
  std::atomic<int> done{0};
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    const postbox::errc s = rig.req.request(i, std::chrono::seconds(10), [&, i](postbox::reply_outcome<int> o) {
      if (o.ok()) sum += o.reply->payload;
      // release: publishes sum; pairs with the acquire below.
      done.store(i + 1, std::memory_order_release);
    });
    if (s != postbox::errc::ok) fail("request refused");
    // The caller waits for its flag as reply_future::get() waits for the
    // future's word (detail::spin_until: a check every 4 pauses, then
    // yields), so this row and the requester row differ in how the request
    // completes, not in how the caller notices it.
    // acquire: pairs with the callback's release store (sum is visible).
    while (!postbox::detail::spin_until([&] { return done.load(std::memory_order_acquire) == i + 1; }))
      std::this_thread::yield();
  }
  const double secs = seconds_since(t0);
  if (sum != static_cast<long long>(n) * (n + 1) / 2) fail("postbox callback lost a reply");
  return secs;
}

#if POSTBOX_BENCH_HAVE_ZMQ
// msg_api: zmq_msg_send/zmq_msg_recv with one reused message each side (as
// ZeroMQ's perf/inproc_lat does); else zmq_send/zmq_recv into a 4-byte buffer.
double zmq_round_trip(int n, bool msg_api) {
  void* ctx = zmq_ctx_new();
  void* rep = zmq_socket(ctx, ZMQ_REP);
  if (zmq_bind(rep, "inproc://rr-bench") != 0) fail("zmq_bind");
  placement place;
  // The server's loop reads only its own stack: it copies the count and its
  // socket first. (Read through the capture, they were reloaded after every
  // call, from this frame, where the requester writes its zmq_msg_t or int
  // every round trip: depending on where the stack landed, a line crossing
  // the cores per round trip.)
  std::thread server([&] {
    const int count = n;
    void* const sock = rep;
    if (msg_api) {
      zmq_msg_t m;
      zmq_msg_init(&m);
      for (int i = 0; i < count; ++i) {
        if (zmq_msg_recv(&m, sock, 0) < 0) fail("zmq_msg_recv");
        int v = 0;
        std::memcpy(&v, zmq_msg_data(&m), sizeof v);
        ++v;
        zmq_msg_close(&m);
        zmq_msg_init_size(&m, sizeof v);
        std::memcpy(zmq_msg_data(&m), &v, sizeof v);
        if (zmq_msg_send(&m, sock, 0) < 0) fail("zmq_msg_send");
      }
      zmq_msg_close(&m);
    } else {
      int v = 0;
      for (int i = 0; i < count; ++i) {
        zmq_recv(sock, &v, sizeof v, 0);
        ++v;
        zmq_send(sock, &v, sizeof v, 0);
      }
    }
  });
  place.requester_side();
  void* req = zmq_socket(ctx, ZMQ_REQ);
  zmq_connect(req, "inproc://rr-bench");
  long long sum = 0;
  const auto t0 = bench_clock::now();
  if (msg_api) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    for (int i = 0; i < n; ++i) {
      zmq_msg_init_size(&m, sizeof i);
      std::memcpy(zmq_msg_data(&m), &i, sizeof i);
      if (zmq_msg_send(&m, req, 0) < 0) fail("zmq_msg_send");
      if (zmq_msg_recv(&m, req, 0) < 0) fail("zmq_msg_recv");
      int v = 0;
      std::memcpy(&v, zmq_msg_data(&m), sizeof v);
      sum += v;
      zmq_msg_close(&m);
    }
  } else {
    for (int i = 0; i < n; ++i) {
      int v = i;
      zmq_send(req, &v, sizeof v, 0);
      zmq_recv(req, &v, sizeof v, 0);
      sum += v;
    }
  }
  const double s = seconds_since(t0);
  server.join();
  zmq_close(req);
  zmq_close(rep);
  zmq_ctx_term(ctx);
  if (sum != static_cast<long long>(n) * (n + 1) / 2) fail("zeromq lost a reply");
  return s;
}
#endif

using postbox_bench::own_lines;

// One worker's count of completed operations, on a line of its own.
struct alignas(64) completion_tally {
  std::atomic<int> done{0};
};

// Each worker counts the operations it ran in a tally of its own (claimed on
// its first operation), a plain store to its own line; the main thread adds
// the tallies up to tell when all n ran. The tracker, which the workers and
// the submitting thread share, sits on lines of its own. (Both workers used
// to fetch_add one counter on this frame, next to the submit loop's
// temporaries, among which the tracker also sat unaligned: a line crossing
// the cores per operation that was the benchmark's cost, not the tracker's.)
double operations_throughput(int n) {
  constexpr std::size_t workers = 2;
  std::array<completion_tally, workers> tallies{};
  std::atomic<std::size_t> claimed{0};
  own_lines<postbox::operations<int>> held(
      postbox::default_clock(),
      postbox::operations_options{.workers = workers, .queue_capacity = 1024, .retention = postbox::duration::zero()});
  postbox::operations<int>& ops = held.value;
  const auto completed = [&tallies] {
    int total = 0;
    for (const auto& t : tallies) total += t.done.load(std::memory_order_relaxed);
    return total;
  };
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    for (;;) {
      auto s = ops.submit("bench", "", "", [all = tallies.data(), &claimed](postbox::operation_context&) {
        completion_tally& mine = postbox_bench::thread_slot(all, workers, claimed);
        // relaxed: a count the main thread polls; nothing else is published through it.
        mine.done.store(mine.done.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return 1;
      });
      if (s.has_value()) break;
      std::this_thread::yield();
    }
    if (i % 1024 == 1023) ops.sweep();
  }
  while (completed() < n) std::this_thread::yield();
  return seconds_since(t0);
}

// One thread, nobody waits: request, poll the responder, take the outcome.
long long profile(const char* what, int n) {
  long long sum = 0;
  if (std::strcmp(what, "postbox") == 0) {
    rr_rig rig(0);
    for (int i = 0; i < n; ++i) {
      auto f = rig.req.request(i, std::chrono::seconds(10));
      if (!f.has_value() || rig.resp.poll() != 1) fail("profile: request not served");
      sum += f->value().reply->payload;
    }
  } else if (std::strcmp(what, "callback") == 0) {
    rr_rig rig(0);
    for (int i = 0; i < n; ++i) {
      int got = -1;
      const auto s = rig.req.request(i, std::chrono::seconds(10), [&got](postbox::reply_outcome<int> o) {
        if (o.ok()) got = o.reply->payload;
      });
      if (s != postbox::errc::ok || rig.resp.poll() != 1 || got < 0) fail("profile: request not served");
      sum += got;
    }
#if POSTBOX_BENCH_HAVE_ZMQ
  } else if (std::strcmp(what, "zmq") == 0) {
    void* ctx = zmq_ctx_new();
    void* rep = zmq_socket(ctx, ZMQ_REP);
    void* req = zmq_socket(ctx, ZMQ_REQ);
    zmq_bind(rep, "inproc://rr-profile");
    zmq_connect(req, "inproc://rr-profile");
    for (int i = 0; i < n; ++i) {
      int v = i;
      zmq_send(req, &v, sizeof v, 0);
      zmq_recv(rep, &v, sizeof v, 0);
      ++v;
      zmq_send(rep, &v, sizeof v, 0);
      zmq_recv(req, &v, sizeof v, 0);
      sum += v;
    }
    zmq_close(req);
    zmq_close(rep);
    zmq_ctx_term(ctx);
#endif
  } else {
    fail("profile: unknown row");
  }
  return sum;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct row {
  const char* name;
  const char* desc;
  std::function<double(int)> run;  // seconds for n round trips
  std::vector<double> ns;          // per round
};

double load_average() {
  double l = -1;
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &l) != 1) l = -1;
    std::fclose(f);
  }
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  int n = 20000, rounds = 5;
  const char* only = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--profile") == 0 && i + 1 < argc) {
      const int pn = i + 2 < argc ? std::atoi(argv[i + 2]) : 20000;
      std::printf("%lld\n", profile(argv[i + 1], pn));
      return 0;
    } else if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--n") == 0 && i + 1 < argc) {
      n = std::max(1, std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--pin") == 0) {
      g_pin = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--rounds N] [--n N] [--only ROW] [--pin] | --profile postbox|callback|zmq [n]\n", argv[0]);
      return 2;
    }
  }
  std::vector<row> rows;
  rows.push_back({"channel ping-pong", "channel<int> x2, blocking send/receive both sides", channel_ping_pong, {}});
  rows.push_back({"promise handoff", "promise pointer over a channel, future.get()", promise_round_trip, {}});
  rows.push_back({"postbox requester", "request -> future, value(); responder thread", postbox_round_trip, {}});
  rows.push_back({"postbox callback", "request with a callback; caller awaits a flag", postbox_callback_round_trip, {}});
#if POSTBOX_BENCH_HAVE_ZMQ
  rows.push_back({"zeromq send/recv", "inproc REQ/REP, zmq_send/zmq_recv 4 bytes", [](int k) { return zmq_round_trip(k, false); }, {}});
  rows.push_back({"zeromq msg_send/recv", "inproc REQ/REP, zmq_msg_send/zmq_msg_recv", [](int k) { return zmq_round_trip(k, true); }, {}});
#endif
  if (only != nullptr) {
    rows.erase(std::remove_if(rows.begin(), rows.end(), [&](const row& r) { return std::strcmp(r.name, only) != 0; }),
               rows.end());
    if (rows.empty()) fail("--only: no such row");
  }
  std::printf("request-reply round trip: %d sequential requests per row, %d interleaved rounds, %u hardware threads, "
              "load %.2f, %s%s\n",
              n, rounds, std::thread::hardware_concurrency(), load_average(), __VERSION__,
              g_pin ? ", pinned (serving threads cpu 1, requester cpu 0)" : "");
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t k = 0; k < rows.size(); ++k) {
      auto& x = rows[(k + static_cast<std::size_t>(r)) % rows.size()];
      x.ns.push_back(x.run(n) * 1e9 / n);
    }
  }
  std::printf("%-22s %12s %12s %12s  %s\n", "row", "median ns", "best ns", "worst ns", "what");
  double pb = 0, floor_ns = 0, zq = 0;
  for (auto& x : rows) {
    const double m = median(x.ns);
    std::printf("%-22s %12.0f %12.0f %12.0f  %s\n", x.name, m, *std::min_element(x.ns.begin(), x.ns.end()),
                *std::max_element(x.ns.begin(), x.ns.end()), x.desc);
    if (std::strcmp(x.name, "postbox requester") == 0) pb = m;
    if (std::strcmp(x.name, "channel ping-pong") == 0) floor_ns = m;
    if (std::strncmp(x.name, "zeromq", 6) == 0) zq = zq == 0 ? m : std::min(zq, m);  // the peer's better form
  }
  if (pb > 0 && zq > 0) std::printf("postbox requester / best zeromq REQ/REP: %.3f (target <= 0.1)\n", pb / zq);
  if (pb > 0 && floor_ns > 0)
    std::printf("postbox requester / channel ping-pong: %.2f (target <= 3)\n", pb / floor_ns);
  std::printf("load after: %.2f\n", load_average());
  if (only == nullptr) {
    const int m = 100000;
    const double s = operations_throughput(m);
    std::printf("%-28s %10.0f ns/op %12.0f op/s  (submit + run + complete, 2 workers)\n", "operations submit+complete",
                s * 1e9 / m, m / s);
  }
  return 0;
}
