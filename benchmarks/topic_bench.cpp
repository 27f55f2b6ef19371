// SPDX-License-Identifier: MIT
// Benchmark: postbox::topic fan-out vs one postbox::channel per subscriber (a copy each) vs ZeroMQ inproc PUB/SUB.
//
// Scenarios (one publisher thread, S subscriber threads, S in {1, 4, 16};
// the payload is a 256-byte std::string; median msgs/s published over
// interleaved repetitions: every repetition runs each contender once, in turn).
// Two workloads, each compared only with its own kind:
//   copy       the payload is copied per message
//              topic     postbox::topic<std::string>, block policy: one shared item per publish
//              channels  S postbox::channel<std::string, spsc>, a copy into each
//              zmq       ZeroMQ inproc PUB/SUB, zmq_send (copies into the frame)
//   zero-copy  the shared payload (alive for the whole run) is passed by reference
//              topic     postbox::topic<std::string_view>
//              channels  S postbox::channel<std::string_view, spsc>
//              mpsc      the same with channel<std::string_view, mpsc>: the
//                        shape a subscription's queue has to have at least
//                        (any thread may publish into it); every row prints
//                        t/chan (against spsc) and t/mpsc (against mpsc)
//              zmq       zmq_msg_init_data of the payload with no free function
//                        (ZeroMQ's constant-data frame: no allocation, no count)
// ZeroMQ: unlimited HWM, zmq_msg_recv (no receive copy). Every contender's
// subscriber reads the size only, and checks the byte total at the end.
// Printed ratios: topic/channels and topic/zmq (> 1 means the topic is faster).
// Issue 18's row is zero-copy, subs = 1 (ZeroMQ at its fastest): target
// topic/zmq >= 1.0 and topic/channels >= 0.9. The copy row is printed beside it.
//
// topic_bench [--subs S] [--pin] [--only NAME [--messages N]]: only the rows
// with S subscribers; --pin puts the publisher on cpu 0 and subscriber i on
// cpu (1 + i) mod n; --only runs one contender once (N messages, 100,000
// unless given: topic, topic-view, channels, channels-view, mpsc-view, zmq,
// zmq0), for perf stat / perf record / strace.
//
// Profile mode, for instruction counts independent of the machine's load:
//   valgrind --tool=callgrind topic_bench --profile NAME [n]
// NAME: topic, topic-view, channel, channel-view, mpsc-view, zmq, zmq0. Runs n (default
// 20000) publish+receive pairs on ONE thread (the subscriber drains after
// every publish, so nobody parks) and prints nothing but a checksum;
// instructions per message = (Ir(n) - Ir(0)) / n. topic-view-receive and
// channel-view-receive (and mpsc-view-receive) take with the blocking receive() instead of
// try_receive(), as the wall-clock rows do.
//
// Profile history of issue 18's row (callgrind, g++ 12 -O2, n = 20000, 2-core VM):
//   topic     905 -> 601 instructions/msg. Per publish before: 9 atomic RMWs
//             (publishing +/-, published, the snapshot mutex lock/unlock,
//             list refcount +/-, item refcount +/-, the channel's CAS), one
//             lock, one malloc of the shared item. After: 4 RMWs (publishing
//             +/-, published, the channel's CAS), no lock (stamped per-thread
//             list cache), no malloc (pooled item block: one CAS where the
//             last holder frees it), no syscall unless a subscriber is parked.
//   channel   381 (one copy of the payload per subscriber: its malloc+copy+free
//             is about 180 of those, and the topic pays the same copy since
//             publish takes T by value)
//   zmq       1070 (zero-copy send, zmq_msg_recv)
// Second pass (this file's --only and the perf counts, 100,000 messages, one
// subscriber, pinned): the wall-clock gap was not instructions but syscalls.
// `perf stat -e syscalls:sys_enter_futex`: the topic made 114,000 futex calls
// per 100,000 messages (the channel row 112,000; ZeroMQ zero-copy 1): 80,000
// FUTEX_WAKEs, 617 parks. Whoever waited (the subscriber on empty, or the
// publisher on a full queue) left the event count's waiter count non-zero from
// its park until it ran again, and the other side made a wake syscall per
// message in that window. The topic now wakes once per park in both
// directions (see docs/design/topic.md, "Waiting"): about 80 event-count
// futex calls per 100,000 messages. The rest in the copy workload is glibc's
// arena lock (payload malloc'd on the publisher, freed on the subscriber's
// thread): FUTEX_WAIT/WAKE on main_arena, paid by ZeroMQ's zmq_send too.
// Instructions/msg now (same method): topic 630 (537 at f44442e, before the
// wake-once change, in this file's old profile loop), topic-view 378, channel
// 508, channel-view 116 (the spsc channel changed in the same stop), zmq copy
// 1323, zmq zero-copy 1070. The topic's extra is partly this loop's shape
// (the payload copy is no longer inlined into main) and the waits' bookkeeping.
// Where the zero-copy topic's time goes (perf, cpu-clock samples, --only
// topic-view --capacity 131072): on the subscriber, the first read of the
// item (a line the publisher just wrote: one cross-core miss per message that
// ZeroMQ's constant-data frame, read from the pipe's own sequential chunk,
// does not pay) and the head CAS; on the publisher, the `publishing`
// increment and the pool pop (the link word of a block the subscriber freed).
// Issue 18, second stop (same method, g++ 12 -O3, before/after built from one
// source apart from topic.hpp): a small trivially copyable payload (the
// std::string_view here) now travels inline in the queue slot instead of in a
// pooled shared item, and a push tries the channel once before its policy;
// then the publish's list refresh went out of line, a delivered push is
// counted inline and the receive's first stop check is written out.
//   topic-view          385 -> 163 -> 166 instructions/msg (channel-view
//                       51-63 in the same binaries: the TU's inlining moves it)
//   topic-view-receive  441 -> 276 -> 235 (channel-view-receive 52-67): the
//                       blocking receive() the wall-clock rows use; its extra
//                       over try_receive is the handle's call count (two RMWs,
//                       see subscription_core::calls) and the result conversions
//   topic (copy)        631 -> 531 -> 520 (channel 450-468)
// futex calls per 100,000 messages (strace -c -f, --only topic-view, pinned):
// 35 before, 19-29 after (channels-view 21-25): waking is not the gap any more.
// What is left per message against channel<std::string_view, spsc>: the
// mpmc queue's two CASes (the topic's queue serves groups and any number of
// receiving threads), three RMWs on the publisher (`publishing` in and out,
// `published`) and two on the subscriber (the handle's call count).
// With capacity 1024 on a loaded machine the rows are bound by scheduling,
// not by either side's work: a subscriber descheduled for a time slice lets
// the queue fill, the publisher parks, and each refill waits for two
// wake-ups of threads that must first get a CPU back (load 17: 73 context
// switches and 72 ms of CPU in a 264 ms run of 100,000). ZeroMQ's publisher
// with HWM 0 never waits, which is what the 0-copy/nb row reproduces.
// Wall-clock rows on the shared 2-core VM swing by 2-4x between runs with
// the load of other jobs, so read the ratios of one interleaved run together
// with the `uptime` load at the time.
#include <postbox/channel.hpp>
#include <postbox/topic.hpp>
#if POSTBOX_BENCH_HAVE_ZMQ
#  include <zmq.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#if defined(__linux__)
#  include <pthread.h>
#  include <sched.h>
#endif

namespace {

using bench_clock = std::chrono::steady_clock;
const std::string payload(256, 'x');
bool g_pin = false;

// --pin: the publisher on cpu 0, subscriber i on cpu (1 + i) mod n.
void pin_to(unsigned cpu) {
#if defined(__linux__)
  if (!g_pin) return;
  const unsigned n = std::max(1u, std::thread::hardware_concurrency());
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu % n, &set);
  (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
  (void)cpu;
#endif
}

// subscriber_local: a subscriber thread's loop reads nothing on the
// publisher's stack. Each one used to reach its handle through the captured
// vector (and `n` through the capture) on every message; the compiler reloads
// them after each receive, and the publisher's loop writes its temporaries
// (the V it publishes, ZeroMQ's zmq_msg_t) to the same stack, in some
// processes on the same cache line: line transfers per message that no
// contender causes. With the stack's random placement (ASLR) that made the
// zero-copy rows bimodal per process (about 8 or about 18 M msg/s for the
// topic: 13 of 24 processes under 11 M msg/s; without ASLR, `setarch -R`,
// none of 24 under 10.7), and it cost the channel rows too. With every subscriber reading only its own stack, one
// interleaved run: zero-copy topic 8-18 -> 25-26 M msg/s, channels 25-28 ->
// 47-54.
//
// The clock starts once every subscriber thread runs on its cpu, as the
// ZeroMQ run's warm-up handshake makes it do. Before, the publisher could
// start while a subscriber thread was still being created and moved to its
// cpu: with a queue that holds the whole run (0-copy/nb) the channel row read
// 91 M msg/s, the publisher's own speed into a ring nobody drained yet,
// against 25-34 M msg/s with a subscriber running from the start.
void wait_until_running(const std::atomic<int>& ready, int subs) {
  while (ready.load() < subs) std::this_thread::yield();
}

// V = std::string: each publish copies the payload into a new string (the
// copying workload). V = std::string_view: each publish passes a view of the
// shared payload, which outlives the run (the zero-copy workload).
template <class V>
double run_topic(int subs, int n, std::size_t capacity) {
  postbox::topic<V> t;
  std::vector<postbox::subscription<V>> s;
  for (int i = 0; i < subs; ++i) s.push_back(t.subscribe({capacity, postbox::overflow::block, {}, {}}));
  std::vector<std::thread> th;
  std::atomic<std::size_t> bytes{0};
  std::atomic<int> ready{0};
  for (int i = 0; i < subs; ++i)
    th.emplace_back([&, i] {
      pin_to(1 + static_cast<unsigned>(i));
      // Only this thread's own stack in the loop (see subscriber_local).
      postbox::subscription<V>& mine = s[static_cast<std::size_t>(i)];
      const int count = n;
      ready.fetch_add(1);
      std::size_t b = 0;
      for (int k = 0; k < count; ++k) b += (*mine.receive())->size();
      bytes += b;
    });
  wait_until_running(ready, subs);
  const auto t0 = bench_clock::now();
  for (int k = 0; k < n; ++k) (void)t.publish(V(payload));
  for (auto& x : th) x.join();
  const double rate = n / std::chrono::duration<double>(bench_clock::now() - t0).count();
  if (bytes.load() != static_cast<std::size_t>(n) * static_cast<std::size_t>(subs) * payload.size()) std::abort();
  return rate;
}

// Shape = spsc: the strongest channel (one producer, one consumer), the
// issue's "one channel". Shape = mpsc: the shape a topic's subscription queue
// has to have at least (any thread may publish into it), for a like-for-like
// ratio beside it.
template <class V, class Shape = postbox::spsc>
double run_channels(int subs, int n, std::size_t capacity) {
  std::vector<std::unique_ptr<postbox::channel<V, Shape>>> ch;
  for (int i = 0; i < subs; ++i) ch.push_back(std::make_unique<postbox::channel<V, Shape>>(capacity));
  std::vector<std::thread> th;
  std::atomic<std::size_t> bytes{0};
  std::atomic<int> ready{0};
  for (int i = 0; i < subs; ++i)
    th.emplace_back([&, i] {
      pin_to(1 + static_cast<unsigned>(i));
      postbox::channel<V, Shape>& mine = *ch[static_cast<std::size_t>(i)];  // see subscriber_local
      const int count = n;
      ready.fetch_add(1);
      std::size_t b = 0;
      for (int k = 0; k < count; ++k) b += mine.receive()->size();
      bytes += b;
    });
  wait_until_running(ready, subs);
  const auto t0 = bench_clock::now();
  for (int k = 0; k < n; ++k)
    for (auto& c : ch) (void)c->send(V(payload));  // one copy (or view) per subscriber
  for (auto& x : th) x.join();
  const double rate = n / std::chrono::duration<double>(bench_clock::now() - t0).count();
  if (bytes.load() != static_cast<std::size_t>(n) * static_cast<std::size_t>(subs) * payload.size()) std::abort();
  return rate;
}

#if POSTBOX_BENCH_HAVE_ZMQ
// zero_copy: each frame points at the shared payload (zmq_msg_init_data with
// no free function: the payload outlives the run); else zmq_send copies it.
double run_zmq(int subs, int n, bool zero_copy) {
  void* ctx = zmq_ctx_new();
  void* pub = zmq_socket(ctx, ZMQ_PUB);
  int zero = 0;
  zmq_setsockopt(pub, ZMQ_SNDHWM, &zero, sizeof zero);
  zmq_bind(pub, "inproc://topic_bench");
  std::atomic<int> ready{0};
  std::atomic<std::size_t> bytes{0};
  std::vector<std::thread> th;
  for (int i = 0; i < subs; ++i)
    th.emplace_back([&, i] {
      pin_to(1 + static_cast<unsigned>(i));
      void* sub = zmq_socket(ctx, ZMQ_SUB);
      zmq_setsockopt(sub, ZMQ_RCVHWM, &zero, sizeof zero);
      zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
      zmq_connect(sub, "inproc://topic_bench");
      zmq_msg_t m;
      zmq_msg_init(&m);
      // Warm-up frames (1 byte) until the subscription is live: ZeroMQ's slow joiner.
      (void)zmq_msg_recv(&m, sub, 0);  // only warm-ups are sent until all are ready
      const int count = n;  // see subscriber_local
      ready.fetch_add(1);
      int got = 0;
      std::size_t b = 0;
      while (got < count)
        if (zmq_msg_recv(&m, sub, 0) > 1) {
          b += zmq_msg_size(&m);
          ++got;
        }
      bytes += b;
      zmq_msg_close(&m);
      zmq_close(sub);
    });
  while (ready.load() < subs) {  // keep sending warm-ups until every subscriber saw one
    zmq_send(pub, "w", 1, ZMQ_DONTWAIT);
    std::this_thread::yield();
  }
  const auto t0 = bench_clock::now();
  if (zero_copy) {
    for (int k = 0; k < n; ++k) {
      zmq_msg_t m;
      zmq_msg_init_data(&m, const_cast<char*>(payload.data()), payload.size(), nullptr, nullptr);
      zmq_msg_send(&m, pub, 0);
    }
  } else {
    for (int k = 0; k < n; ++k) zmq_send(pub, payload.data(), payload.size(), 0);
  }
  for (auto& x : th) x.join();
  const double rate = n / std::chrono::duration<double>(bench_clock::now() - t0).count();
  zmq_close(pub);
  zmq_ctx_term(ctx);
  return rate;
}
#endif

// One thread: publish, then drain the one subscriber, n times (callgrind).
// topic / channel / zmq copy the payload per message; topic-view /
// channel-view / zmq0 pass the shared payload without copying it.
// Blocking = true: the subscriber takes with the blocking receive() the
// wall-clock rows use (a message is always there, so it never parks).
template <class V, bool Blocking = false>
std::size_t profile_topic(int n) {
  postbox::topic<V> t;
  auto s = t.subscribe({1024, postbox::overflow::block, {}, {}});
  std::size_t sum = 0;
  for (int k = 0; k < n; ++k) {
    (void)t.publish(V(payload));
    if constexpr (Blocking) sum += (*s.receive())->size();
    else sum += (*s.try_receive())->size();
  }
  return sum;
}

template <class V, bool Blocking = false, class Shape = postbox::spsc>
std::size_t profile_channel(int n) {
  postbox::channel<V, Shape> c(1024);
  std::size_t sum = 0;
  for (int k = 0; k < n; ++k) {
    (void)c.send(V(payload));
    if constexpr (Blocking) sum += c.receive()->size();
    else sum += c.try_receive()->size();
  }
  return sum;
}

#if POSTBOX_BENCH_HAVE_ZMQ
std::size_t profile_zmq(int n, bool zero_copy) {
  std::size_t sum = 0;
  void* ctx = zmq_ctx_new();
  void* pub = zmq_socket(ctx, ZMQ_PUB);
  void* sub = zmq_socket(ctx, ZMQ_SUB);
  int zero = 0;
  zmq_setsockopt(pub, ZMQ_SNDHWM, &zero, sizeof zero);
  zmq_setsockopt(sub, ZMQ_RCVHWM, &zero, sizeof zero);
  zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
  zmq_bind(pub, "inproc://topic_profile");
  zmq_connect(sub, "inproc://topic_profile");
  zmq_msg_t m;
  zmq_msg_init(&m);
  for (;;) {  // slow joiner: until the subscription is live
    zmq_send(pub, "w", 1, 0);
    if (zmq_msg_recv(&m, sub, ZMQ_DONTWAIT) >= 0) break;
    std::this_thread::yield();
  }
  while (zmq_msg_recv(&m, sub, ZMQ_DONTWAIT) >= 0) {
  }
  for (int k = 0; k < n; ++k) {
    if (zero_copy) {
      zmq_msg_t out;
      zmq_msg_init_data(&out, const_cast<char*>(payload.data()), payload.size(), nullptr, nullptr);
      zmq_msg_send(&out, pub, 0);
    } else {
      zmq_send(pub, payload.data(), payload.size(), 0);
    }
    if (zmq_msg_recv(&m, sub, 0) > 0) sum += zmq_msg_size(&m);
  }
  zmq_msg_close(&m);
  zmq_close(sub);
  zmq_close(pub);
  zmq_ctx_term(ctx);
  return sum;
}
#endif

std::size_t profile(const char* what, int n) {
  if (std::strcmp(what, "topic") == 0) return profile_topic<std::string>(n);
  if (std::strcmp(what, "topic-view") == 0) return profile_topic<std::string_view>(n);
  if (std::strcmp(what, "channel") == 0) return profile_channel<std::string>(n);
  if (std::strcmp(what, "channel-view") == 0) return profile_channel<std::string_view>(n);
  if (std::strcmp(what, "topic-view-receive") == 0) return profile_topic<std::string_view, true>(n);
  if (std::strcmp(what, "channel-view-receive") == 0) return profile_channel<std::string_view, true>(n);
  if (std::strcmp(what, "mpsc-view") == 0) return profile_channel<std::string_view, false, postbox::mpsc>(n);
  if (std::strcmp(what, "mpsc-view-receive") == 0) return profile_channel<std::string_view, true, postbox::mpsc>(n);
#if POSTBOX_BENCH_HAVE_ZMQ
  if (std::strcmp(what, "zmq") == 0) return profile_zmq(n, false);
  if (std::strcmp(what, "zmq0") == 0) return profile_zmq(n, true);
#endif
  std::fprintf(stderr, "unknown profile '%s'\n", what);
  std::exit(2);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::strcmp(argv[1], "--profile") == 0) {
    const int n = argc >= 4 ? std::atoi(argv[3]) : 20000;
    std::printf("%zu\n", profile(argv[2], n));
    return 0;
  }
  std::vector<int> sub_counts{1, 4, 16};
  const char* only = nullptr;
  std::size_t cap = 1024;
  int only_messages = 100000;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--subs") == 0 && a + 1 < argc) sub_counts = {std::max(1, std::atoi(argv[++a]))};
    else if (std::strcmp(argv[a], "--pin") == 0) g_pin = true;
    else if (std::strcmp(argv[a], "--only") == 0 && a + 1 < argc) only = argv[++a];
    else if (std::strcmp(argv[a], "--messages") == 0 && a + 1 < argc) only_messages = std::max(1, std::atoi(argv[++a]));
    else if (std::strcmp(argv[a], "--capacity") == 0 && a + 1 < argc) cap = std::strtoull(argv[++a], nullptr, 10);
  }
  pin_to(0);
  // The two workloads, each compared only with its own kind:
  //   copy       topic<std::string>, channel<std::string>, zmq_send (copies into the frame)
  //   zero-copy  topic<std::string_view>, channel<std::string_view>, zmq_msg_init_data
  //              of the shared payload with no free function (ZeroMQ keeps a pointer)
  if (only != nullptr) {  // one run of one contender, for strace -c -f / perf stat
    const int subs = sub_counts.front();
    const int n = only_messages;
    double rate = 0;
    if (std::strcmp(only, "topic") == 0) rate = run_topic<std::string>(subs, n, cap);
    else if (std::strcmp(only, "topic-view") == 0) rate = run_topic<std::string_view>(subs, n, cap);
    else if (std::strcmp(only, "channels") == 0) rate = run_channels<std::string>(subs, n, cap);
    else if (std::strcmp(only, "channels-view") == 0) rate = run_channels<std::string_view>(subs, n, cap);
    else if (std::strcmp(only, "mpsc-view") == 0) rate = run_channels<std::string_view, postbox::mpsc>(subs, n, cap);
#if POSTBOX_BENCH_HAVE_ZMQ
    else if (std::strcmp(only, "zmq") == 0) rate = run_zmq(subs, n, false);
    else if (std::strcmp(only, "zmq0") == 0) rate = run_zmq(subs, n, true);
#endif
    else {
      std::fprintf(stderr, "unknown contender '%s'\n", only);
      return 2;
    }
    std::printf("%s subs=%d: %.0f msg/s\n", only, subs, rate);
    return 0;
  }
  std::printf("topic_bench: 1 publisher, 256-byte payload, block policy, capacity %zu; median of 5 interleaved runs\n",
              cap);
  std::printf("compiler: %s; pinned: %s\n", __VERSION__, g_pin ? "yes" : "no");
  std::printf("Each row compares one workload only: 'copy' copies the payload per message (topic<std::string>,\n"
              "channel<std::string> per subscriber, zmq_send); 'zero-copy' passes the shared payload\n"
              "(topic<std::string_view>, channel<std::string_view>, zmq_msg_init_data without a free function).\n"
              "'0-copy/nb': zero-copy with queues that hold the whole run (never block), as ZeroMQ's unlimited\n"
              "HWM never blocks its publisher; same ZeroMQ figure as 'zero-copy'.\n"
              "Issue 18's row is 'zero-copy' with subs = 1 (ZeroMQ's fastest mode): target t/zmq >= 1.0, t/chan >= 0.9.\n"
              "'channels' are spsc (the strongest channel); 'mpsc' is channel<V, mpsc>, the shape a subscription's\n"
              "queue must at least have (any thread may publish): t/chan is against spsc, t/mpsc against mpsc.\n");
  std::printf("%-10s %-5s %14s %14s %14s %14s %8s %8s %8s\n", "workload", "subs", "topic msg/s", "channels", "mpsc", "zmq",
              "t/chan", "t/mpsc", "t/zmq");
  for (int subs : sub_counts) {
    const int n = subs == 1 ? 1000000 : subs == 4 ? 100000 : 20000;  // a run of 25-250 ms at subs 1
    const std::size_t whole_run = static_cast<std::size_t>(n);  // rounded up to a power of two by the queues
    std::vector<double> tc, cc, mc, zc, tv, cv, mv, zv, tn, cn, mn;
    for (int rep = 0; rep < 5; ++rep) {
      tc.push_back(run_topic<std::string>(subs, n, cap));
      cc.push_back(run_channels<std::string>(subs, n, cap));
      mc.push_back(run_channels<std::string, postbox::mpsc>(subs, n, cap));
#if POSTBOX_BENCH_HAVE_ZMQ
      zc.push_back(run_zmq(subs, n, false));
#endif
      tv.push_back(run_topic<std::string_view>(subs, n, cap));
      cv.push_back(run_channels<std::string_view>(subs, n, cap));
      mv.push_back(run_channels<std::string_view, postbox::mpsc>(subs, n, cap));
#if POSTBOX_BENCH_HAVE_ZMQ
      zv.push_back(run_zmq(subs, n, true));
#endif
      tn.push_back(run_topic<std::string_view>(subs, n, whole_run));
      cn.push_back(run_channels<std::string_view>(subs, n, whole_run));
      mn.push_back(run_channels<std::string_view, postbox::mpsc>(subs, n, whole_run));
    }
    const auto row = [&](const char* name, const std::vector<double>& t, const std::vector<double>& c,
                         const std::vector<double>& m, const std::vector<double>& z) {
      const double mt = median(t), ms = median(c), mm = median(m), mz = z.empty() ? 0.0 : median(z);
      std::printf("%-10s %-5d %14.0f %14.0f %14.0f %14.0f %8.2f %8.2f %8.2f\n", name, subs, mt, ms, mm, mz, mt / ms,
                  mt / mm, mz > 0 ? mt / mz : 0.0);
    };
    row("copy", tc, cc, mc, zc);
    row("zero-copy", tv, cv, mv, zv);
    row("0-copy/nb", tn, cn, mn, zv);
  }
  return 0;
}
