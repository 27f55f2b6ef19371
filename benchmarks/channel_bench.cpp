// SPDX-License-Identifier: MIT
// channel_bench: postbox::channel against moodycamel, atomic_queue, Boost.Lockfree and a mutex queue, in one run.
//
// Every scenario runs every peer once per round, in an order rotated each
// round, for `rounds` rounds; the table shows each peer's median and its ratio
// to the best other peer (throughput: higher is better, >= 1.0 means postbox
// wins; latency: lower is better, <= 1.0 means postbox wins). Consumers check
// the count and the sum of what they received; a mismatch aborts the run.
//
// Usage: channel_bench [--quick] [--pin] [--rounds N]
#include "peers.hpp"

#include <postbox/detail/backoff.hpp>
#include <postbox/metrics.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#  include <pthread.h>
#  include <sched.h>
#endif

namespace postbox_bench {
namespace {

using clock_type = std::chrono::steady_clock;

struct options {
  bool quick = false;
  bool pin = false;
  int rounds = 7;
};
options g_opt;

void pin_thread(unsigned index) {
#if defined(__linux__)
  if (!g_opt.pin) return;
  const unsigned n = std::max(1u, std::thread::hardware_concurrency());
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(index % n, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
#else
  (void)index;
#endif
}

/// The one waiting policy every non-blocking peer uses when full or empty:
/// pause a few times, then give the core away (the machine may have fewer
/// cores than threads).
struct spin_wait {
  unsigned n = 0;
  void operator()() {
    if (n < 64) {
      postbox::detail::cpu_relax();
      ++n;
    } else {
      std::this_thread::yield();
    }
  }
  void reset() { n = 0; }
};

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "channel_bench: verification failed: %s\n", what);
  std::exit(2);
}

/// Runs `threads` bodies, started together; returns the elapsed seconds.
double run_threads(std::vector<std::function<void()>> bodies) {
  std::atomic<unsigned> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < bodies.size(); ++i) {
    threads.emplace_back([&, i] {
      pin_thread(i);
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      bodies[i]();
    });
  }
  while (ready.load() != bodies.size()) std::this_thread::yield();
  const auto t0 = clock_type::now();
  go.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

item make_item(unsigned producer, std::uint64_t seq) { return (std::uint64_t{producer} << 40) | seq; }

std::uint64_t expected_sum(unsigned producers, std::uint64_t per_producer) {
  std::uint64_t s = 0;
  for (unsigned p = 0; p < producers; ++p) s += (std::uint64_t{p} << 40) * per_producer + per_producer * (per_producer + 1) / 2;
  return s;
}

/// Throughput (million messages per second) with P producers and C consumers
/// using the non-blocking calls; `Blocking` uses push/pop instead. With
/// `stats_reader`, a further thread calls channel::stats() every 50 us; with
/// `scraped`, the channel is registered with a metrics_registry and a further
/// thread renders the registry as Prometheus text every millisecond (15000
/// times Prometheus' default rate, so a cost to the fast path would show;
/// much faster and the scraping thread itself competes for the cores).
template <class Q, bool Blocking = false>
double throughput(unsigned producers, unsigned consumers, std::uint64_t total, std::size_t cap,
                  bool stats_reader = false, bool scraped = false) {
  Q q(cap);
  const std::uint64_t per_producer = total / producers;
  const std::uint64_t all = per_producer * producers;
  std::vector<std::uint64_t> sums(consumers, 0), counts(consumers, 0);
  std::atomic<bool> done{false};
  std::vector<std::function<void()>> bodies;
  for (unsigned p = 0; p < producers; ++p) {
    bodies.push_back([&q, p, per_producer] {
      spin_wait w;
      for (std::uint64_t i = 1; i <= per_producer; ++i) {
        const item v = make_item(p, i);
        if constexpr (Blocking) {
          q.push(v);
        } else {
          while (!q.try_push(v)) w();
          w.reset();
        }
      }
    });
  }
  for (unsigned c = 0; c < consumers; ++c) {
    const std::uint64_t quota = all / consumers + (c == 0 ? all % consumers : 0);
    bodies.push_back([&q, &sums, &counts, c, quota] {
      spin_wait w;
      std::uint64_t sum = 0;
      for (std::uint64_t k = 0; k < quota; ++k) {
        item v;
        if constexpr (Blocking) {
          v = q.pop();
        } else {
          while (!q.try_pop(v)) w();
          w.reset();
        }
        sum += v;
      }
      sums[c] = sum;
      counts[c] = quota;
    });
  }
  std::thread reader;
  if constexpr (requires { q.ch.stats(); }) {
    if (stats_reader) {
      reader = std::thread([&] {
        std::uint64_t seen = 0;
        while (!done.load(std::memory_order_relaxed)) {
          seen += q.ch.stats().sent;
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        if (seen == ~std::uint64_t{0}) std::puts("");  // keep the calls observable
      });
    }
    if (scraped) {
      reader = std::thread([&] {
        postbox::metrics_registry registry;
        auto reg = postbox::register_channel(registry, "bench", q.ch);
        std::size_t bytes = 0;
        while (!done.load(std::memory_order_relaxed)) {
          bytes += registry.render_prometheus().size();
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        if (bytes == 0) std::puts("");  // keep the calls observable
      });
    }
  }
  const double secs = run_threads(std::move(bodies));
  done.store(true);
  if (reader.joinable()) reader.join();
  std::uint64_t sum = 0, count = 0;
  for (unsigned c = 0; c < consumers; ++c) {
    sum += sums[c];
    count += counts[c];
  }
  if (count != all) fail("message count");
  if (sum != expected_sum(producers, per_producer)) fail("message checksum (lost or duplicated message)");
  return static_cast<double>(all) / secs / 1e6;
}

/// Round trip (ns): A sends to B through one queue, B answers through another.
template <class Q, bool Blocking = false>
double ping_pong(std::uint64_t trips) {
  Q there(64), back(64);
  std::uint64_t sum = 0;
  std::vector<std::function<void()>> bodies;
  bodies.push_back([&] {
    spin_wait w;
    for (std::uint64_t i = 1; i <= trips; ++i) {
      item v;
      if constexpr (Blocking) {
        there.push(i);
        v = back.pop();
      } else {
        while (!there.try_push(i)) w();
        w.reset();
        while (!back.try_pop(v)) w();
        w.reset();
      }
      sum += v;
    }
  });
  bodies.push_back([&] {
    spin_wait w;
    for (std::uint64_t i = 1; i <= trips; ++i) {
      item v;
      if constexpr (Blocking) {
        v = there.pop();
        back.push(v);
      } else {
        while (!there.try_pop(v)) w();
        w.reset();
        while (!back.try_push(v)) w();
        w.reset();
      }
    }
  });
  const double secs = run_threads(std::move(bodies));
  if (sum != trips * (trips + 1) / 2) fail("ping-pong checksum");
  return secs * 1e9 / static_cast<double>(trips);
}

/// Wake-up latency (ns, median of `samples`): the receiver is parked in pop()
/// (the sender waits 1 ms before each send so it has time to park); measured
/// from just before push to just after pop returns.
template <class Q>
double wake_up(unsigned samples) {
  Q q(64);
  std::vector<double> lat;
  lat.reserve(samples);
  auto now_ns = [] {
    return static_cast<item>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count());
  };
  std::vector<std::function<void()>> bodies;
  bodies.push_back([&] {
    for (unsigned i = 0; i < samples; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      q.push(now_ns());
    }
  });
  bodies.push_back([&] {
    for (unsigned i = 0; i < samples; ++i) {
      const item sent = q.pop();
      lat.push_back(static_cast<double>(now_ns() - sent));
    }
  });
  run_threads(std::move(bodies));
  if (lat.size() != samples) fail("wake-up sample count");
  std::sort(lat.begin(), lat.end());
  return lat[lat.size() / 2];
}

// --- the table ------------------------------------------------------------------

struct entry {
  std::string name;
  bool ours = false;
  std::function<double()> run;
  std::vector<double> samples{};
};

struct scenario {
  std::string name;
  std::string description;
  std::string unit;
  bool higher_is_better = true;
  std::vector<entry> entries;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

std::vector<scenario> make_scenarios() {
  const bool q = g_opt.quick;
  const std::uint64_t n = q ? 200'000 : 1'000'000;       // throughput messages per run
  const std::uint64_t nb = q ? 100'000 : 500'000;        // blocking throughput messages
  const std::uint64_t trips = q ? 5'000 : 20'000;         // spin ping-pong round trips
  const std::uint64_t btrips = q ? 1'000 : 5'000;         // blocking ping-pong round trips
  const unsigned wakes = q ? 30 : 100;                   // wake-up samples
  const std::size_t cap = 1024;
  using pb_spsc = postbox_channel<postbox::spsc>;
  using pb_mpmc = postbox_channel<postbox::mpmc>;
  std::vector<scenario> s;

  s.push_back({"SPSC 1P1C", "one producer, one consumer, try_send/try_receive on SPSC queues (capacity 1024)",
               "M msg/s", true, {}});
  s.back().entries.push_back({"postbox channel<spsc>", true, [=] { return throughput<pb_spsc>(1, 1, n, cap); }});
#ifdef POSTBOX_BENCH_HAVE_RWQ
  s.back().entries.push_back({"moodycamel ReaderWriterQueue", false, [=] { return throughput<moodycamel_rwq>(1, 1, n, cap); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_ATOMIC_QUEUE
  s.back().entries.push_back({"atomic_queue AtomicQueueB2 SPSC", false, [=] { return throughput<atomic_queue_b2<true>>(1, 1, n, cap); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_BOOST_LOCKFREE
  s.back().entries.push_back({"boost::lockfree::spsc_queue", false, [=] { return throughput<boost_spsc>(1, 1, n, cap); }});
#endif
  s.back().entries.push_back({"mutex+condvar queue", false, [=] { return throughput<mutex_queue>(1, 1, n, cap); }});

  for (unsigned pc : {1u, 2u}) {
    const std::string name = "MPMC " + std::to_string(pc) + "P" + std::to_string(pc) + "C";
    s.push_back({name, std::to_string(pc) + " producer(s), " + std::to_string(pc) + " consumer(s), non-blocking calls on MPMC queues",
                 "M msg/s", true, {}});
    s.back().entries.push_back({"postbox channel<mpmc>", true, [=] { return throughput<pb_mpmc>(pc, pc, n, cap); }});
#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
    s.back().entries.push_back({"moodycamel ConcurrentQueue", false, [=] { return throughput<moodycamel_cq>(pc, pc, n, cap); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_ATOMIC_QUEUE
    s.back().entries.push_back({"atomic_queue AtomicQueueB2", false, [=] { return throughput<atomic_queue_b2<false>>(pc, pc, n, cap); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_BOOST_LOCKFREE
    s.back().entries.push_back({"boost::lockfree::queue", false, [=] { return throughput<boost_queue>(pc, pc, n, cap); }});
#endif
    s.back().entries.push_back({"mutex+condvar queue", false, [=] { return throughput<mutex_queue>(pc, pc, n, cap); }});
  }

  s.push_back({"blocking 1P1C", "one producer, one consumer, blocking send/receive (parks when full/empty)", "M msg/s", true, {}});
  s.back().entries.push_back({"postbox channel<mpmc> send/receive", true, [=] { return throughput<pb_mpmc, true>(1, 1, nb, cap); }});
  s.back().entries.push_back({"postbox channel<spsc> send/receive", true, [=] { return throughput<pb_spsc, true>(1, 1, nb, cap); }});
#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
  s.back().entries.push_back({"moodycamel BlockingConcurrentQueue", false, [=] { return throughput<moodycamel_bcq, true>(1, 1, nb, cap); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_RWQ
  s.back().entries.push_back({"moodycamel BlockingReaderWriterQueue", false, [=] { return throughput<moodycamel_brwq, true>(1, 1, nb, cap); }});
#endif
  s.back().entries.push_back({"mutex+condvar queue", false, [=] { return throughput<mutex_queue, true>(1, 1, nb, cap); }});

  s.push_back({"spin ping-pong", "round trip through two queues, both sides spinning on try calls", "ns/trip", false, {}});
  s.back().entries.push_back({"postbox channel<spsc>", true, [=] { return ping_pong<pb_spsc>(trips); }});
  s.back().entries.push_back({"postbox channel<mpmc>", true, [=] { return ping_pong<pb_mpmc>(trips); }});
#ifdef POSTBOX_BENCH_HAVE_RWQ
  s.back().entries.push_back({"moodycamel ReaderWriterQueue", false, [=] { return ping_pong<moodycamel_rwq>(trips); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
  s.back().entries.push_back({"moodycamel ConcurrentQueue", false, [=] { return ping_pong<moodycamel_cq>(trips); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_ATOMIC_QUEUE
  s.back().entries.push_back({"atomic_queue AtomicQueueB2 SPSC", false, [=] { return ping_pong<atomic_queue_b2<true>>(trips); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_BOOST_LOCKFREE
  s.back().entries.push_back({"boost::lockfree::spsc_queue", false, [=] { return ping_pong<boost_spsc>(trips); }});
#endif
  s.back().entries.push_back({"mutex+condvar queue", false, [=] { return ping_pong<mutex_queue>(trips); }});

  s.push_back({"blocking ping-pong", "round trip through two queues with blocking send/receive", "ns/trip", false, {}});
  s.back().entries.push_back({"postbox channel<spsc>", true, [=] { return ping_pong<pb_spsc, true>(btrips); }});
  s.back().entries.push_back({"postbox channel<mpmc>", true, [=] { return ping_pong<pb_mpmc, true>(btrips); }});
#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
  s.back().entries.push_back({"moodycamel BlockingConcurrentQueue", false, [=] { return ping_pong<moodycamel_bcq, true>(btrips); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_RWQ
  s.back().entries.push_back({"moodycamel BlockingReaderWriterQueue", false, [=] { return ping_pong<moodycamel_brwq, true>(btrips); }});
#endif
  s.back().entries.push_back({"mutex+condvar queue", false, [=] { return ping_pong<mutex_queue, true>(btrips); }});

  s.push_back({"parked wake-up", "latency from send to a parked receiver returning (median of samples)", "ns", false, {}});
  s.back().entries.push_back({"postbox channel<mpmc>", true, [=] { return wake_up<pb_mpmc>(wakes); }});
#ifdef POSTBOX_BENCH_HAVE_MOODYCAMEL
  s.back().entries.push_back({"moodycamel BlockingConcurrentQueue", false, [=] { return wake_up<moodycamel_bcq>(wakes); }});
#endif
#ifdef POSTBOX_BENCH_HAVE_RWQ
  s.back().entries.push_back({"moodycamel BlockingReaderWriterQueue", false, [=] { return wake_up<moodycamel_brwq>(wakes); }});
#endif
  s.back().entries.push_back({"mutex+condvar queue", false, [=] { return wake_up<mutex_queue>(wakes); }});

  s.push_back({"stats() cost", "MPMC 1P1C try calls, without and with a thread reading stats() every 50 us (ratio to without)",
               "M msg/s", true, {}});
  s.back().entries.push_back({"postbox channel<mpmc>", true, [=] { return throughput<pb_mpmc>(1, 1, n, cap, false); }});
  s.back().entries.push_back({"postbox channel<mpmc> + stats() reader", true, [=] { return throughput<pb_mpmc>(1, 1, n, cap, true); }});

  s.push_back({"metrics cost", "MPMC 1P1C try calls, unregistered vs registered with a metrics_registry scraped every 1 ms "
                               "(ratio to unregistered)",
               "M msg/s", true, {}});
  s.back().entries.push_back({"postbox channel<mpmc> unregistered", true, [=] { return throughput<pb_mpmc>(1, 1, n, cap); }});
  s.back().entries.push_back({"postbox channel<mpmc> registered + scraped", true,
                              [=] { return throughput<pb_mpmc>(1, 1, n, cap, false, true); }});
  return s;
}

void print_table(const std::vector<scenario>& all) {
  std::printf("\n| scenario | queue | median | unit | vs best peer | spread |\n");
  std::printf("|---|---|---:|---|---:|---:|\n");
  for (const auto& sc : all) {
    // Reference: the best entry that is not postbox; a postbox-only row
    // compares with its first entry.
    double ref = 0;
    bool have_ref = false;
    for (const auto& e : sc.entries) {
      if (e.ours) continue;
      const double m = median(e.samples);
      if (!have_ref || (sc.higher_is_better ? m > ref : m < ref)) ref = m;
      have_ref = true;
    }
    if (!have_ref) ref = median(sc.entries.front().samples);
    for (const auto& e : sc.entries) {
      const double m = median(e.samples);
      const auto [lo, hi] = std::minmax_element(e.samples.begin(), e.samples.end());
      const double spread = m > 0 ? (*hi - *lo) / m * 100 : 0;
      std::printf("| %s | %s%s%s | %.3g | %s | %.2fx | %.0f%% |\n", sc.name.c_str(), e.ours ? "**" : "", e.name.c_str(),
                  e.ours ? "**" : "", m, sc.unit.c_str(), m / ref, spread);
    }
  }
  std::printf("\nvs best peer: median / best non-postbox median (throughput: >= 1 is a win; ns: <= 1 is a win).\n"
              "spread: (max - min) / median over the rounds, a measure of the noise.\n");
}

}  // namespace
}  // namespace postbox_bench

int main(int argc, char** argv) {
  using namespace postbox_bench;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_opt.quick = true;
      g_opt.rounds = 3;
    } else if (std::strcmp(argv[i], "--pin") == 0) {
      g_opt.pin = true;
    } else if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
      g_opt.rounds = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--pin] [--rounds N]\n", argv[0]);
      return 64;
    }
  }
#if defined(__clang__)
  const char* compiler = "clang++ " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "g++ " __VERSION__;
#else
  const char* compiler = "unknown";
#endif
  std::printf("channel_bench: %s, %s, C++ %ld, optimized %s, NDEBUG %s\n", compiler,
#if defined(__x86_64__)
              "x86-64",
#else
              "other arch",
#endif
              static_cast<long>(__cplusplus),
#if defined(__OPTIMIZE__)
              "yes",
#else
              "NO (numbers are meaningless)",
#endif
#if defined(NDEBUG)
              "yes"
#else
              "no"
#endif
  );
  std::printf("cpu: %s, %u hardware threads; rounds %d%s%s\n", cpu_model().c_str(), std::thread::hardware_concurrency(),
              g_opt.rounds, g_opt.quick ? ", quick" : "", g_opt.pin ? ", pinned" : "");

  auto scenarios = make_scenarios();
  for (const auto& sc : scenarios) std::printf("  %-18s %s\n", sc.name.c_str(), sc.description.c_str());
  const auto t0 = std::chrono::steady_clock::now();
  for (int round = 0; round < g_opt.rounds; ++round) {
    for (auto& sc : scenarios) {
      const std::size_t n = sc.entries.size();
      for (std::size_t k = 0; k < n; ++k) {
        auto& e = sc.entries[(k + static_cast<std::size_t>(round)) % n];
        e.samples.push_back(e.run());
      }
    }
    std::fprintf(stderr, "round %d/%d done (%.0f s)\n", round + 1, g_opt.rounds,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  print_table(scenarios);
  return 0;
}
