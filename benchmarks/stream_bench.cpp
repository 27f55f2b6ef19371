// SPDX-License-Identifier: MIT
// Benchmark: postbox::stream append, replay read and consumer-group poll throughput.
//
// Scenarios (median records/s over 9 interleaved repetitions; 8-byte values):
//   append/1p     one producer appending to 4 partitions (default coarse clock)
//   append/ns     the same with nanosecond timestamps (default_clock: system_clock)
//   append/cached the same with a cached_clock (system_clock read by its
//                 ticker every millisecond; the append loads the cached time)
//   chan/1p       the same records ({key, value}) sent by one producer into a
//                 postbox::channel (default shape) large enough never to fill:
//                 the transport baseline for an append. The channel allocates
//                 and faults in its whole ring in its constructor, outside the
//                 timed loop, while a stream grows and meets its memory inside
//                 its appends (a stream that grows must fault somewhere)
//   chan/ctor     chan/1p with the channel's construction timed too: like
//                 with like for a fresh stream
//   append/2p     two producers appending to the same partition (serialized by its lock)
//   read          one reader replaying everything from earliest, 256 per poll
//   group/1m      one group member poll(256)+commit over 4 partitions
//   group/2m      two members (2 partitions each) polling concurrently
//   (last lines)  the coarse clock's read alone (coarse_clock::now(), n
//                 times, interleaved with the rows), in ns, next to the ns
//                 per record of append/1p and chan/1p; then those two rows
//                 in the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), which
//                 a loaded machine's descheduling does not inflate
// Printed ratios: every row vs append/1p, and append/1p vs chan/1p (issue
// 18's row: at least 0.8) and vs chan/ctor. Rows that append or send also
// print the minor page faults their timed part took, per million records.
//
// Profile mode, for instruction counts independent of the machine's load:
//   valgrind --tool=callgrind stream_bench --profile append|channel [n]
// appends (or sends) n records (default 20000) on one thread and prints a
// checksum; instructions per record = (Ir(n) - Ir(0)) / n. Also:
//   --profile append2 n   append/2p's workload (count parks with
//                         strace -f -c -e trace=futex,membarrier)
//   --profile retain n    4 partitions keeping their last 4096 records (faults
//                         of a stream whose retention frees chunks:
//                         /usr/bin/time -f %R)
//
// Profile of issue 18's row (callgrind, g++ 12 -O2, 2-core VM; instructions
// per record at n = 20000 / 400000):
//   before    405 -> 225 / 251 (std::mutex -> inline futex-word lock, no
//             shared_ptr copy of the directory per append, no retention step
//             without limits, no 16 KB memset per chunk). Wall-clock 0.16x to
//             0.67x chan/1p: per append a system_clock read (25-60 ns here,
//             more than a whole channel send), 2 RMWs for the lock, a copy of
//             the whole chunk directory per 256 records (O(n): about 1.5
//             refcount RMWs per record at 100k records a partition) and
//             default-constructed slots touched twice.
//   now       163 / 163: slots constructed in place in uninitialized chunks,
//             a chunk table grown in place and replaced in amortized O(1),
//             lock released by a plain store (contended appenders park with
//             a membarrier instead), a mask for 4 partitions instead of a
//             64-bit division, and the default coarse_clock (about 2-5 ns per
//             read; rdtsc alone costs about 25 ns on this VM, so a TSC clock
//             could not reach the row). append/ns keeps system_clock.
//   then      147 (n = 20000; 162 for the code before, channel 137, in the
//             same build of this file): the append's common path inlined
//             into the caller (out of line it saved and restored six
//             callee-saved registers per record), the clock read before the
//             lock and the default coarse clock called directly, the next
//             chunk allocated and faulted in outside the lock by the append
//             that half-fills the current one
//   biased    159 (n = 20000; 147 before, channel 137, same build): the
//             append lock biased to the partition's first appender (plain
//             stores and a compiler fence instead of a CAS: a dozen plain
//             instructions for one locked one) and the coarse clock calling
//             the vDSO directly. Callgrind sees neither clock path (valgrind
//             maps no vDSO), so time them in thread CPU time instead (the
//             last line this prints; 3 alternating runs at load 12): append
//             12.8-13.0 -> 11.6 ns a record, channel 8.7: 0.67-0.68x ->
//             0.74-0.75x; the clock read alone 4.7 -> 3.0 ns
//             (docs/design/stream.md, "The biased append lock")
//   tail      145 (n = 20000; 159 before, channel 137, same build): the
//             tail chunk's slot count kept in the partition and written into
//             the chunk only when the partition lets it go (was a store per
//             record to the chunk's first line), the coarse clock read
//             inline, one retention test, no fence-mode load when biased.
//             Thread CPU time, 8 alternating pairs at load 8: append
//             11.5-11.8 -> 10.5-10.6 ns, channel 8.7: 0.73-0.75x ->
//             0.82-0.83x (docs/design/stream.md, "Reaching 0.8")
//   array     143 (n = 200000 -> 400000; 144 before, same build): the
//             partitions in one array, each on its own line(s), instead
//             of one allocation each reached through a pointer
//             (docs/design/stream.md, "Stop 32")
//   channel   134 / 128 (one CAS and a slot write into a preallocated ring)
// Faults per 1M records (fresh process): stream 11.8k in the appends (was
// 20.0k; 48-byte slots touched once), channel 12.3k, all in its constructor
// outside the timed loop. In this benchmark only the first repetition
// faults (glibc keeps the freed heap afterwards), so the medians compare
// the appends themselves; the printed faults column shows it. The stream's
// faults now happen in the append that prepares the next chunk, outside the
// lock (11.9k per 1M, as before). Under retention (--profile retain) 0.65k
// per 1M (3.2k before): malloc reuses the freed chunks.
// Two appenders (--profile append2, 1M records): 360 membarriers (parks) and
// about 620 futex calls before the adaptive spin, none (2 membarrier calls:
// the process's registration) and 5-8 (thread start and join) after.
#include <postbox/cached_clock.hpp>
#include <postbox/channel.hpp>
#include <postbox/stream.hpp>

#include "bench_layout.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using bench_clock = std::chrono::steady_clock;
constexpr std::uint64_t n = 400000;
const std::string keys[4] = {"a", "b", "c", "d"};

double seconds_since(bench_clock::time_point t0) {
  return std::chrono::duration<double>(bench_clock::now() - t0).count();
}

// Minor page faults of the process so far.
long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Faults taken inside the timed part of the current scenario (each scenario
// function stores its count here).
long timed_faults = 0;

// This thread's CPU time in seconds: it excludes the time the thread was not
// running, so on a loaded machine (several engineers sharing 2 cores) the
// single-threaded rows can also be compared in CPU time.
double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}
// CPU seconds of the timed part of the current single-threaded scenario.
double timed_cpu = 0;

void fill(postbox::stream<std::uint64_t>& s) {
  for (std::uint64_t i = 0; i < n; ++i) (void)s.append(keys[i % 4], i);
}

// Appends n records to `s` (fresh), timed: records/s; sets timed_cpu and
// timed_faults.
double timed_fill(postbox::stream<std::uint64_t>& s) {
  const long f0 = minor_faults();
  const double c0 = thread_cpu_seconds();
  const auto t0 = bench_clock::now();
  fill(s);
  const double secs = seconds_since(t0);
  timed_cpu = thread_cpu_seconds() - c0;
  timed_faults = minor_faults() - f0;
  return static_cast<double>(n) / secs;
}

double append_1p() {
  postbox::stream<std::uint64_t> s(4);
  return timed_fill(s);
}

// As append_1p with a cached_clock (system_clock read by its ticker every
// millisecond): the stream loads the cached time, no clock call per record.
// The clock is made outside the timed part, as a program makes it once.
double append_1p_cached(const postbox::cached_clock& clk) {
  postbox::stream<std::uint64_t> s(4, {}, clk);
  return timed_fill(s);
}

// As append_1p with nanosecond timestamps (system_clock) instead of the default coarse clock.
double append_1p_precise() {
  postbox::stream<std::uint64_t> s(4, {}, postbox::default_clock());
  return timed_fill(s);
}

// The default coarse clock read alone, n times, in the same minutes as the
// rows it stamps: tells a slow clock from a slow append when append/1p
// drops in one run and chan/1p does not.
volatile std::int64_t clock_sink = 0;
double clock_coarse() {
  const postbox::coarse_clock clk;
  std::int64_t sum = 0;
  const auto t0 = bench_clock::now();
  for (std::uint64_t i = 0; i < n; ++i) sum += clk.now().time_since_epoch().count();
  const double secs = seconds_since(t0);
  clock_sink = sum;
  return static_cast<double>(n) / secs;
}

struct chan_record {
  std::string key;
  std::uint64_t value;
};

double channel_1p() {
  postbox::channel<chan_record> c(n);  // faults its whole ring in here, before the timed loop
  const long f0 = minor_faults();
  const double c0 = thread_cpu_seconds();
  const auto t0 = bench_clock::now();
  for (std::uint64_t i = 0; i < n; ++i) (void)c.try_send(chan_record{keys[i % 4], i});
  const double secs = seconds_since(t0);
  timed_cpu = thread_cpu_seconds() - c0;
  timed_faults = minor_faults() - f0;
  return static_cast<double>(n) / secs;
}

// As channel_1p with the channel's construction timed too: a stream grows,
// so it meets its memory inside its appends; this row has the channel meet
// (allocate and fault in) its ring inside the timed part as well.
double channel_1p_with_ctor() {
  const long f0 = minor_faults();
  const auto t0 = bench_clock::now();
  postbox::channel<chan_record> c(n);
  for (std::uint64_t i = 0; i < n; ++i) (void)c.try_send(chan_record{keys[i % 4], i});
  const double secs = seconds_since(t0);
  timed_faults = minor_faults() - f0;
  return static_cast<double>(n) / secs;
}

using postbox_bench::own_lines;

// The stream both threads append to sits on lines of its own, and thread a
// reaches it through a reference of its own: its loop reads nothing else on
// this frame, which the main thread's own appends write (their temporaries)
// on every record. (The stream used to sit unaligned among this frame's
// locals, reached through the capture: where the stack landed decided
// whether a line it shares with those temporaries crossed the cores per
// append.)
double append_2p() {
  own_lines<postbox::stream<std::uint64_t>> held(4);
  postbox::stream<std::uint64_t>& s = held.value;
  const long f0 = minor_faults();
  const auto t0 = bench_clock::now();
  std::thread a([&s] {
    postbox::stream<std::uint64_t>& mine = s;  // n is a constant: no count to copy
    for (std::uint64_t i = 0; i < n / 2; ++i) (void)mine.append("k", i);
  });
  for (std::uint64_t i = 0; i < n / 2; ++i) (void)s.append("k", i);
  a.join();
  const double secs = seconds_since(t0);
  timed_faults = minor_faults() - f0;
  return static_cast<double>(n) / secs;
}

double read_all() {
  postbox::stream<std::uint64_t> s(4);
  fill(s);
  const auto t0 = bench_clock::now();
  auto r = s.read_from(postbox::start_from::earliest());
  std::uint64_t got = 0;
  while (got < n) got += r.poll(256).records.size();
  return static_cast<double>(n) / seconds_since(t0);
}

double group_poll(int members) {
  postbox::stream<std::uint64_t> s(4);
  fill(s);
  auto g = s.group("bench");
  std::vector<postbox::group_member<std::uint64_t>> ms;
  for (int i = 0; i < members; ++i) ms.push_back(g.join());
  std::atomic<std::uint64_t> total{0};
  const auto t0 = bench_clock::now();
  std::vector<std::thread> th;
  for (int i = 0; i < members; ++i)
    th.emplace_back([&, i] {
      auto& m = ms[static_cast<std::size_t>(i)];
      for (;;) {
        const auto got = m.poll(256).records.size();
        (void)m.commit();
        if (got == 0) break;
        total += got;
      }
    });
  for (auto& t : th) t.join();
  return static_cast<double>(total.load()) / seconds_since(t0);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::uint64_t profile(const char* what, std::uint64_t count) {
  std::uint64_t sum = 0;
  if (std::strcmp(what, "append") == 0) {
    postbox::stream<std::uint64_t> s(4);
    for (std::uint64_t i = 0; i < count; ++i) sum += s.append(keys[i % 4], i).offset;
  } else if (std::strcmp(what, "append2") == 0) {
    // append/2p's workload: two threads appending count/2 records each to one partition.
    postbox::stream<std::uint64_t> s(4);
    std::atomic<std::uint64_t> other{0};
    std::thread a([&] {
      std::uint64_t mine = 0;
      for (std::uint64_t i = 0; i < count / 2; ++i) mine += s.append("k", i).offset;
      other = mine;
    });
    for (std::uint64_t i = 0; i < count / 2; ++i) sum += s.append("k", i).offset;
    a.join();
    sum += other.load();
  } else if (std::strcmp(what, "retain") == 0) {
    // A stream that keeps the last 4096 records a partition: retention frees
    // chunks as fast as appends need new ones.
    postbox::stream<std::uint64_t> s(4, postbox::retention{.max_count = 4096});
    for (std::uint64_t i = 0; i < count; ++i) sum += s.append(keys[i % 4], i).offset;
  } else if (std::strcmp(what, "channel") == 0) {
    postbox::channel<chan_record> c(count == 0 ? 1 : count);
    for (std::uint64_t i = 0; i < count; ++i) sum += c.try_send(chan_record{keys[i % 4], i}) == postbox::send_status::ok;
  }
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::strcmp(argv[1], "--profile") == 0) {
    const auto count = argc >= 4 ? std::strtoull(argv[3], nullptr, 10) : 20000;
    std::printf("%llu\n", static_cast<unsigned long long>(profile(argv[2], count)));
    return 0;
  }
  std::printf("stream_bench: %llu records of 8 bytes, 4 partitions; median of 9 interleaved runs\ncompiler: %s\n",
              static_cast<unsigned long long>(n), __VERSION__);
  // The machine's load when the run started (shared cores make the ratios noisy).
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    char line[128] = {};
    if (std::fgets(line, sizeof line, f) != nullptr) std::printf("loadavg: %s", line);
    std::fclose(f);
  }
  std::vector<double> a1, ap, c1, cc, a2, rd, g1, g2, ck, ac;
  std::vector<double> fa1, fc1, fcc, fa2;  // timed faults per 1M records
  std::vector<double> ca1, cc1, cac;       // thread CPU records/s of append/1p, chan/1p and append/cached
  const postbox::cached_clock cached;      // its ticker runs through the whole run, as in a program
  const auto per_million = [] { return static_cast<double>(timed_faults) * 1e6 / static_cast<double>(n); };
  for (int rep = 0; rep < 9; ++rep) {
    a1.push_back(append_1p());
    fa1.push_back(per_million());
    ca1.push_back(static_cast<double>(n) / timed_cpu);
    c1.push_back(channel_1p());
    fc1.push_back(per_million());
    cc1.push_back(static_cast<double>(n) / timed_cpu);
    cc.push_back(channel_1p_with_ctor());
    fcc.push_back(per_million());
    ac.push_back(append_1p_cached(cached));
    cac.push_back(static_cast<double>(n) / timed_cpu);
    ap.push_back(append_1p_precise());
    ck.push_back(clock_coarse());
    a2.push_back(append_2p());
    fa2.push_back(per_million());
    rd.push_back(read_all());
    g1.push_back(group_poll(1));
    g2.push_back(group_poll(2));
  }
  const double base = median(a1);
  const struct { const char* name; double v; double faults; } rows[] = {
      {"append/1p", base, median(fa1)},        {"append/ns", median(ap), -1},  {"append/cached", median(ac), -1},
      {"chan/1p", median(c1), median(fc1)},
      {"chan/ctor", median(cc), median(fcc)},  {"append/2p", median(a2), median(fa2)},
      {"read", median(rd), -1},                {"group/1m", median(g1), -1}, {"group/2m", median(g2), -1}};
  std::printf("%-14s %14s %12s %16s\n", "scenario", "records/s", "vs append/1p", "timed faults/1M");
  for (const auto& r : rows) {
    std::printf("%-14s %14.0f %12.2f", r.name, r.v, r.v / base);
    if (r.faults >= 0) std::printf(" %16.0f", r.faults);
    std::printf("\n");
  }
  std::printf("append/1p vs chan/1p: %.2f (target >= 0.80); vs chan/ctor: %.2f\n", base / median(c1), base / median(cc));
  std::printf("coarse clock read alone: %.1f ns; append/1p %.1f ns, chan/1p %.1f ns per record\n", 1e9 / median(ck),
              1e9 / base, 1e9 / median(c1));
  std::printf("in thread CPU time: append/1p %.1f ns, chan/1p %.1f ns per record: %.2f\n", 1e9 / median(ca1),
              1e9 / median(cc1), median(ca1) / median(cc1));
  std::printf("append/cached (cached_clock, opt-in) vs chan/1p: %.2f; in thread CPU time %.1f ns per record: %.2f\n",
              median(ac) / median(c1), 1e9 / median(cac), median(cac) / median(cc1));
  return 0;
}
