// SPDX-License-Identifier: MIT
// consumer_bench: what postbox::consumer costs per message over a bare channel receive loop, same workload, one run.
//
// Each scenario drains the same N envelopes from a postbox::channel, once
// with a bare loop (`while (auto e = ch.try_receive()) sum += e->payload;`)
// and once through a consumer whose handler does the same sum and acks.
// Variants run interleaved, order rotated per round; the table shows the
// median ns per message, the ratio to the bare loop and the overhead per
// message (consumer - bare). Sums are checked; a mismatch aborts.
//
// Usage: consumer_bench [--quick] [--rounds N] [--callgrind bare|consumer|keyed|worker]
//
// `--callgrind X` drains 20,000 messages once through X only (keyed: the
// consumer with 16 partition keys; worker: a consumer with one worker
// thread), for
//   valgrind --tool=callgrind --toggle-collect='*drain_loop*' consumer_bench --callgrind X
// (instructions per message = the total / 20,000; for `worker`, collect
// '*work_loop*' instead).
//
// Profile of the "consumer poll(), unkeyed" row (issue 18; callgrind, g++ 12
// -O2, 20,000 messages, only the drain loop collected; the bare loop
// measured in the same build):
//
// | step | consumer instr/msg | bare loop |
// |---|---:|---:|
// | before (5 envelope moves, a malloc'd item node, 3 lock pairs) | 3,195 | 949 |
// | sources fill the item in place, pooled nodes, admission 16 per lock, ack counted under the next message's lock, no stop-token copy | 1,410 | 911 |
// | the channel's receive_result kept inside the item (no move after the channel's own) | 1,134 | 917 |
//
// 1.24x now (target 1.5x). What remains over the bare loop (~220): one lock
// pair per message (the handler runs unlocked), two list splices, the pooled
// node's allocation and free (one CAS), the handler's std::function call,
// two clock reads and the duration histogram (two relaxed RMWs), and the
// receive loop's bookkeeping. Both sides pay the channel's own two envelope
// moves (slot -> value -> receive_result) and one envelope destruction.
//
// Stop 33: a channel receive now builds its result in place and moves an
// envelope field by field, skipping empty strings (slot_relocation), and the
// optional of try_receive is built the same way. Callgrind (g++ -O3): consumer 1,247 ->
// 721, bare loop 1,108 -> 366 instructions per message; wall clock (one full
// run each) 111.5 -> 75.5 and 97.2 -> 24.6 ns. The bare loop had paid one
// envelope move more than the consumer (its optional), which hid most of the
// consumer's own ~355 instructions: the row is 3.1x now, 1.15x before.
//
// Stop 34: claimed runs. A poll (or worker) that finds several messages
// ready claims up to 16 under one lock, runs their handlers without it and
// settles the acks under one lock at the end (docs/design/consumer.md, "Runs
// of ready messages"). Callgrind: consumer 721 -> 548 instructions per
// message (bare loop 366: 1.50x in instructions); lock operations per
// message 2 -> 2/16. Wall clock moves less: in two sets of four alternating
// full runs the row read 2.06-2.77x and 2.19-3.73x (medians 2.1x, 2.7x)
// against 2.29-3.15x and 2.83-3.19x (2.9x, 3.2x) for the build before, the
// 16-key row 2.29-4.19x against 3.97-4.87x (first set). Timed
// in phases (rdtsc around poll's receive and run steps), the run step is
// now ~50 cycles per message and the receive step ~105-140: building the
// item node around the channel's receive (a virtual call into the source,
// the pooled node, the item's fields, admission) is most of what remains.
//
// Also tried in stop 34 and taken out again, measured no faster: claiming a
// run of channel slots with one CAS (slower with the backlog in DRAM; see
// docs/design/channel.md), and returning a run's freed nodes to the pool
// with one CAS (within noise).
//
// "drain, 2 threads" (added in stop 34): two try_receive loops against a
// consumer with two workers, both on a pre-filled channel. On this 2-vCPU VM
// it swings 0.8-3.5x run to run (2.2-3.5x in most), before and after the
// change alike.
//
// Stop 35: direct runs. A poll() with nothing queued receives up to 16
// messages from a channel source into buffers on its stack and runs them as
// a claimed run, with no item node unless one is needed (a message that
// does not ack, that shutdown takes back, or that the run does not reach;
// keyed messages still go through ready_). docs/design/consumer.md, "Runs
// straight from a channel". Callgrind: consumer 548 -> 428 instructions per
// message (bare loop 366: 1.17x); the 16-key row 988 -> 999 (keyed messages
// take the old path; the run stops at them). Wall clock, alternating full
// runs against the build before: four pairs at the near placement (probe
// 105-119 ns) read 1.27-1.37x against 2.53-2.66x; four more (probe 110-128
// ns, a noisier stretch, the final build: it adds the keyed check to the
// receive loop, which alternating runs could not tell apart) 1.10-2.01x
// (median 1.30x) against 1.69-2.16x (median 1.76x). The consumer took
// 33-39 ns a message in seven of the eight new runs, 61-85 ns before; the
// bare loop's own swing (24-49 ns) moves the ratio. A first build without
// the claim bookkeeping (no shutdown, no stats, no receive lock: not a
// contract the consumer could keep) read 0.74-1.38x in the same
// conditions: the node was most of what remained.
//
// Also stop 35: "consumer, 1 worker" drains the same channel on a
// consumer's only worker, which now runs direct runs too, with the default
// clock (system_clock: 25 ns a read on this VM, where the poll() rows use a
// manual_clock). A claimed run reads the clock once per message instead of
// twice (one handler's end is the next one's start). Callgrind
// (`--callgrind worker`, collecting '*work_loop*'; valgrind runs glibc's
// clock path): 610 -> 474 instructions per message; four alternating pairs
// at the near placement: 111-133 -> 62-70 ns a message (4.5-5.6x -> 2.6-2.9x
// the bare loop), with poll() at 1.29-1.40x in both builds.
#include <postbox/consumer.hpp>
#include <postbox/testing.hpp>

#include "bench_layout.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using env_t = postbox::envelope<int>;
using steady = std::chrono::steady_clock;

struct options {
  bool quick = false;
  int rounds = 7;
};
options g_opt;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "consumer_bench: verification failed: %s\n", what);
  std::exit(2);
}

std::vector<env_t> make_messages(std::size_t n, unsigned keys) {
  std::vector<env_t> v;
  v.reserve(n);
  const auto proto = postbox::make_envelope(std::string("bench.int"), 0);
  for (std::size_t i = 0; i < n; ++i) {
    env_t e = proto;
    e.payload = static_cast<int>(i);
    if (keys > 0) e.partition_key = "key-" + std::to_string(i % keys);
    v.push_back(std::move(e));
  }
  return v;
}

std::uint64_t expected(std::size_t n) { return static_cast<std::uint64_t>(n) * (n - 1) / 2; }

// The timed loops, kept out of line so callgrind can collect them alone.
[[gnu::noinline]] std::uint64_t bare_drain_loop(postbox::channel<env_t>& ch) {
  std::uint64_t sum = 0;
  while (auto e = ch.try_receive()) sum += static_cast<std::uint64_t>(e->payload);
  return sum;
}
template <class Consumer>
[[gnu::noinline]] void consumer_drain_loop(Consumer& c) {
  while (c.poll() > 0) {
  }
}

// Single thread: fill the channel (untimed), then drain it (timed). ns/msg.
double bare_drain(std::size_t n) {
  postbox::channel<env_t> ch(n);
  for (auto& e : make_messages(n, 0)) (void)ch.try_send(std::move(e));
  const auto t0 = steady::now();
  const std::uint64_t sum = bare_drain_loop(ch);
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  if (sum != expected(n)) fail("bare drain sum");
  return ns / static_cast<double>(n);
}

double consumer_drain(std::size_t n, unsigned keys) {
  postbox::channel<env_t> ch(n);
  for (auto& e : make_messages(n, keys)) (void)ch.try_send(std::move(e));
  postbox::manual_clock clock;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, clock);
  std::uint64_t sum = 0;
  postbox::consumer_options o;
  o.threads = 0;
  o.max_in_flight = 256;
  o.clock = &clock;
  o.jitter_seed = 1;
  postbox::consumer c(postbox::channel_source<int>(ch, "bench"), [&](const env_t& e) {
    sum += static_cast<std::uint64_t>(e.payload);
  }, dlq, o);
  const auto t0 = steady::now();
  consumer_drain_loop(c);
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  if (sum != expected(n) || c.stats().acked != n) fail("consumer drain sum");
  return ns / static_cast<double>(n);
}

// The same drain through a batch consumer: one handler call and one
// settlement per batch of up to `batch` messages (window 0: whatever is
// ready; unkeyed, so a batch is never cut short by a repeated key).
double batch_drain(std::size_t n, std::size_t batch) {
  postbox::channel<env_t> ch(n);
  for (auto& e : make_messages(n, 0)) (void)ch.try_send(std::move(e));
  postbox::manual_clock clock;
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{}, clock);
  std::uint64_t sum = 0;
  postbox::consumer_options o;
  o.threads = 0;
  o.max_in_flight = 256;
  o.clock = &clock;
  o.jitter_seed = 1;
  postbox::batch_options b;
  b.max_size = batch;
  b.window = postbox::duration::zero();
  postbox::consumer c(postbox::channel_source<int>(ch, "bench"), b, [&](const postbox::message_batch<int>& msgs) {
    for (const auto& e : msgs) sum += static_cast<std::uint64_t>(e.payload);
    return postbox::settlement::ack();
  }, dlq, o);
  const auto t0 = steady::now();
  while (c.poll() > 0) {
  }
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  if (sum != expected(n) || c.stats().acked != n) fail("batch drain sum");
  return ns / static_cast<double>(n);
}

// Two threads or more: a producer sends (blocking) while the receiver side runs. ns/msg of wall time.
double bare_threaded(std::size_t n) {
  postbox::channel<env_t> ch(1024);
  auto msgs = make_messages(n, 0);
  std::uint64_t sum = 0;
  const auto t0 = steady::now();
  std::thread producer([&] {
    for (auto& e : msgs) (void)ch.send(std::move(e));
  });
  for (std::size_t i = 0; i < n; ++i) sum += static_cast<std::uint64_t>(ch.receive()->payload);
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  producer.join();
  if (sum != expected(n)) fail("bare threaded sum");
  return ns / static_cast<double>(n);
}

using postbox_bench::own_lines;

// One consumer worker's tally, on a line no other thread writes.
struct alignas(64) worker_tally {
  std::uint64_t sum = 0;                // its worker's; read by the main thread once `handled` says all are done
  std::atomic<std::size_t> handled{0};  // its worker's count: a plain release store per message
};

// The handler's per-message work touches only its worker's own tally
// (claimed on the worker's first message), as the bare loop's receiver keeps
// its sum to itself; the main thread yields until the tallies add up to n.
// The consumer, which its workers share, sits on lines of its own, as the
// channel does by its type. (The handler used to fetch_add a sum and a count
// on this frame, next to the consumer, with the main thread polling the
// count: two RMWs per message on a line the other threads also touched, a
// cost the bare loop does not have.)
double consumer_threaded(std::size_t n, std::size_t threads) {
  postbox::channel<env_t> ch(1024);
  auto msgs = make_messages(n, 0);
  postbox::dead_letter_queue<int> dlq;
  std::vector<worker_tally> tallies(threads);
  std::atomic<std::size_t> claimed{0};
  postbox::consumer_options o;
  o.threads = threads;
  o.max_in_flight = 256;
  o.jitter_seed = 1;
  own_lines<postbox::consumer<int>> c(
      postbox::channel_source<int>(ch, "bench"),
      [all = tallies.data(), threads, &claimed](const env_t& e) {
        worker_tally& mine = postbox_bench::thread_slot(all, threads, claimed);
        mine.sum += static_cast<std::uint64_t>(e.payload);
        // release: pairs with the main thread's acquire loads; publishes `sum`.
        mine.handled.store(mine.handled.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      },
      dlq, o);
  const auto handled = [&tallies] {
    std::size_t total = 0;
    for (const auto& t : tallies) total += t.handled.load(std::memory_order_acquire);
    return total;
  };
  const auto t0 = steady::now();
  std::thread producer([&] {
    for (auto& e : msgs) (void)ch.send(std::move(e));
  });
  while (handled() != n) std::this_thread::yield();
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  producer.join();
  std::uint64_t sum = 0;
  for (const auto& t : tallies) sum += t.sum;  // final: each worker's last store of `handled` came after its last sum
  if (sum != expected(n)) fail("consumer threaded sum");
  return ns / static_cast<double>(n);
}

// Two receivers share a pre-filled channel (untimed fill), each summing what
// it takes; timed until both see it empty. ns/msg of wall time.
double bare_drain_two(std::size_t n) {
  postbox::channel<env_t> ch(n);
  for (auto& e : make_messages(n, 0)) (void)ch.try_send(std::move(e));
  std::uint64_t sums[2] = {0, 0};
  const auto t0 = steady::now();
  std::thread other([&] { sums[1] = bare_drain_loop(ch); });
  sums[0] = bare_drain_loop(ch);
  other.join();
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  if (sums[0] + sums[1] != expected(n)) fail("bare two-thread drain sum");
  return ns / static_cast<double>(n);
}

// The same with a consumer of `threads` worker threads; the main thread
// waits for the acked count (each worker keeps its sum on its own line).
double consumer_drain_workers(std::size_t n, std::size_t threads) {
  postbox::channel<env_t> ch(n);
  for (auto& e : make_messages(n, 0)) (void)ch.try_send(std::move(e));
  postbox::dead_letter_queue<int> dlq;
  std::vector<worker_tally> tallies(threads);
  std::atomic<std::size_t> claimed{0};
  postbox::consumer_options o;
  o.threads = threads;
  o.max_in_flight = 256;
  o.jitter_seed = 1;
  const auto handled = [&tallies] {
    std::size_t total = 0;
    for (const auto& t : tallies) total += t.handled.load(std::memory_order_acquire);
    return total;
  };
  const auto t0 = steady::now();
  own_lines<postbox::consumer<int>> c(
      postbox::channel_source<int>(ch, "bench"),
      [all = tallies.data(), threads, &claimed](const env_t& e) {
        worker_tally& mine = postbox_bench::thread_slot(all, threads, claimed);
        mine.sum += static_cast<std::uint64_t>(e.payload);
        // release: pairs with the main thread's acquire loads; publishes `sum`.
        mine.handled.store(mine.handled.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      },
      dlq, o);
  while (handled() != n) std::this_thread::yield();
  const double ns = std::chrono::duration<double, std::nano>(steady::now() - t0).count();
  std::uint64_t sum = 0;
  for (const auto& t : tallies) sum += t.sum;  // final: each worker's last store of `handled` came after its last sum
  if (sum != expected(n)) fail("consumer worker drain sum");
  return ns / static_cast<double>(n);
}

struct entry {
  std::string name;
  std::function<double()> run;
  std::vector<double> samples{};
};
struct scenario {
  std::string name;
  std::string description;
  std::vector<entry> entries;  // entries[0] is the bare baseline
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t k = v.size();
  return k % 2 ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_opt.quick = true;
      g_opt.rounds = 3;
    } else if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
      g_opt.rounds = std::max(1, std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--callgrind") == 0 && i + 1 < argc) {
      const char* what = argv[++i];
      const bool bare = std::strcmp(what, "bare") == 0;
      const unsigned keys = std::strcmp(what, "keyed") == 0 ? 16 : 0;
      const double ns = bare                                  ? bare_drain(20'000)
                        : std::strcmp(what, "worker") == 0 ? consumer_drain_workers(20'000, 1)
                                                              : consumer_drain(20'000, keys);
      std::printf("%s: %.1f ns/msg (under callgrind: instructions / 20,000)\n", what, ns);
      return 0;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--rounds N] [--callgrind bare|consumer|keyed|worker]\n", argv[0]);
      return 64;
    }
  }
  const std::size_t n = g_opt.quick ? 20'000 : 100'000;
  std::printf("consumer_bench: %s, optimized %s; %zu messages per run, %d rounds\n",
#if defined(__clang__)
              "clang++ " __clang_version__,
#else
              "g++ " __VERSION__,
#endif
#if defined(__OPTIMIZE__)
              "yes",
#else
              "NO (numbers are meaningless)",
#endif
              n, g_opt.rounds);

  std::vector<scenario> all;
  all.push_back({"drain, 1 thread",
                 "pre-filled channel drained on one thread: try_receive loop vs consumer poll() or its one worker", {}});
  all.back().entries.push_back({"bare try_receive loop", [=] { return bare_drain(n); }});
  all.back().entries.push_back({"consumer poll(), unkeyed", [=] { return consumer_drain(n, 0); }});
  all.back().entries.push_back({"consumer, 1 worker, unkeyed", [=] { return consumer_drain_workers(n, 1); }});
  all.back().entries.push_back({"consumer poll(), 16 keys", [=] { return consumer_drain(n, 16); }});
  all.back().entries.push_back({"batch consumer poll(), batches of 16", [=] { return batch_drain(n, 16); }});
  all.back().entries.push_back({"batch consumer poll(), batches of 64", [=] { return batch_drain(n, 64); }});
  all.push_back({"drain, 2 threads", "pre-filled channel drained by two threads: two try_receive loops vs a consumer with 2 workers", {}});
  all.back().entries.push_back({"bare try_receive loops, 2 threads", [=] { return bare_drain_two(n); }});
  all.back().entries.push_back({"consumer, 2 workers", [=] { return consumer_drain_workers(n, 2); }});
  all.push_back({"producer + receiver", "a producer thread sends while the receiving side runs: receive loop vs consumer threads",
                 {}});
  all.back().entries.push_back({"bare receive loop", [=] { return bare_threaded(n); }});
  all.back().entries.push_back({"consumer, 1 worker", [=] { return consumer_threaded(n, 1); }});
  all.back().entries.push_back({"consumer, 2 workers", [=] { return consumer_threaded(n, 2); }});
  for (const auto& sc : all) std::printf("  %-20s %s\n", sc.name.c_str(), sc.description.c_str());

  for (int round = 0; round < g_opt.rounds; ++round) {
    for (auto& sc : all) {
      const std::size_t k = sc.entries.size();
      for (std::size_t j = 0; j < k; ++j) {
        auto& e = sc.entries[(j + static_cast<std::size_t>(round)) % k];
        e.samples.push_back(e.run());
      }
    }
    std::fprintf(stderr, "round %d/%d done\n", round + 1, g_opt.rounds);
  }

  std::printf("\n| scenario | variant | median ns/msg | vs bare | overhead ns/msg | spread |\n");
  std::printf("|---|---|---:|---:|---:|---:|\n");
  for (const auto& sc : all) {
    const double base = median(sc.entries.front().samples);
    for (const auto& e : sc.entries) {
      const double m = median(e.samples);
      const auto [lo, hi] = std::minmax_element(e.samples.begin(), e.samples.end());
      std::printf("| %s | %s | %.1f | %.2fx | %.1f | %.0f%% |\n", sc.name.c_str(), e.name.c_str(), m, m / base, m - base,
                  m > 0 ? (*hi - *lo) / m * 100 : 0.0);
    }
  }
  std::printf("\nvs bare: median / bare median (lower is better). spread: (max - min) / median over the rounds.\n");
  return 0;
}
