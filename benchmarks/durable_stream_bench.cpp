// SPDX-License-Identifier: MIT
// Benchmark: postbox::durable_stream append throughput per fsync policy against raw write()+fdatasync of the same bytes, and replay against the in-memory stream.
//
// Scenarios (median over 5 rounds; in each round the durable log and the raw file are written in
// alternating slices, so both see the same disk; the ratio is the median of per-round ratios;
// 100-byte payloads, key "k", one partition):
//   append/always   durable append, fdatasync before each returns   vs raw write() + fdatasync per record
//   append/batch64  durable append, fdatasync every 64 records       vs raw write() + fdatasync every 64 writes
//   append/never    durable append, no fdatasync                     vs raw write() per record
//   replay          durable reader poll(256) from earliest (mmap, CRC check, decode to std::string)
//                   vs postbox::stream<std::string> reader poll(256) over the same records
// The raw baseline writes the very bytes durable_stream writes (its record
// format, one write(2) per record, O_APPEND file); a ratio >= 0.8 is the
// issue's target. Files go to argv[1] or ./durable_bench.tmp (put it on the
// disk you care about: fdatasync on tmpfs costs nothing).
#include <postbox/durable_stream.hpp>
#include <postbox/stream.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using bench_clock = std::chrono::steady_clock;
const std::string payload(100, 'p');

double seconds_since(bench_clock::time_point t0) {
  return std::chrono::duration<double>(bench_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The bytes durable_stream writes for record `off` (same layout, same CRC work).
std::string record_bytes(std::uint64_t off) {
  const std::string key = "k";
  const auto body = static_cast<std::uint32_t>(20 + key.size() + payload.size());
  std::string b(8 + body, '\0');
  auto* u = reinterpret_cast<unsigned char*>(b.data());
  std::memcpy(u, &body, 4);
  std::memcpy(u + 8, &off, 8);
  const std::int64_t ts = 0;
  std::memcpy(u + 16, &ts, 8);
  const auto klen = static_cast<std::uint32_t>(key.size());
  std::memcpy(u + 24, &klen, 4);
  std::memcpy(u + 28, key.data(), key.size());
  std::memcpy(u + 28 + key.size(), payload.data(), payload.size());
  return b;
}

struct policy_case {
  const char* name;
  postbox::fsync_policy policy;
  std::size_t every;  // raw: fdatasync every this many writes (0: never)
  std::uint64_t n;    // records per side per round
  std::uint64_t chunk;  // records per timed slice; the two sides alternate slice by slice
};

struct round_result {
  double durable = 0;  // records/s
  double raw = 0;
};

// One round: a durable log and a raw file side by side, written in
// alternating slices so that both see the same disk (a shared machine's
// fdatasync latency swings by 10x within seconds).
round_result run_round(const fs::path& dir, const policy_case& c, bool durable_first) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  postbox::durable_options o;
  o.partitions = 1;
  o.sync = c.policy;
  postbox::durable_stream<std::string> s(dir / "log", o);
  const auto file = dir / "raw.log";
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return {};
  double t_durable = 0;
  double t_raw = 0;
  std::uint64_t raw_i = 0;
  auto durable_slice = [&] {
    const auto t0 = bench_clock::now();
    for (std::uint64_t i = 0; i < c.chunk; ++i) (void)s.append("k", payload);
    t_durable += seconds_since(t0);
  };
  auto raw_slice = [&] {
    const auto t0 = bench_clock::now();
    for (std::uint64_t i = 0; i < c.chunk; ++i, ++raw_i) {
      const auto b = record_bytes(raw_i);
      if (::write(fd, b.data(), b.size()) != static_cast<ssize_t>(b.size())) break;
      if (c.every != 0 && (raw_i + 1) % c.every == 0) (void)::fdatasync(fd);
    }
    t_raw += seconds_since(t0);
  };
  for (std::uint64_t done = 0; done < c.n; done += c.chunk) {
    if (durable_first) {
      durable_slice();
      raw_slice();
    } else {
      raw_slice();
      durable_slice();
    }
    durable_first = !durable_first;
  }
  ::close(fd);
  const auto n = static_cast<double>((c.n + c.chunk - 1) / c.chunk * c.chunk);
  return {n / t_durable, n / t_raw};
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path root = argc > 1 ? fs::path(argv[1]) : fs::current_path() / "durable_bench.tmp";
  constexpr int reps = 5;
  const std::vector<policy_case> cases = {
      {"append/always", postbox::fsync_policy::always(), 1, 1000, 10},
      {"append/batch64", postbox::fsync_policy::batch(64), 64, 32000, 640},
      {"append/never", postbox::fsync_policy::never(), 0, 200000, 1000},
  };
  std::printf("durable_stream_bench: files under %s; 100-byte payloads; median of %d rounds, sides interleaved\n",
              root.c_str(), reps);
  std::printf("%-16s %14s %14s %8s\n", "scenario", "durable rec/s", "raw rec/s", "ratio");
  for (const auto& c : cases) {
    std::vector<double> d, r, ratio;
    for (int i = 0; i < reps; ++i) {
      const auto res = run_round(root, c, i % 2 == 0);
      d.push_back(res.durable);
      r.push_back(res.raw);
      ratio.push_back(res.durable / res.raw);
    }
    std::printf("%-16s %14.0f %14.0f %8.2f\n", c.name, median(d), median(r), median(ratio));
  }

  // Replay: the same records in the durable log and in the in-memory stream.
  constexpr std::uint64_t replay_n = 400000;
  fs::remove_all(root);
  std::vector<double> d, m;
  {
    postbox::durable_options o;
    o.sync = postbox::fsync_policy::never();
    postbox::durable_stream<std::string> ds(root / "log", o);
    postbox::stream<std::string> ms(1);
    for (std::uint64_t i = 0; i < replay_n; ++i) {
      (void)ds.append("k", payload);
      (void)ms.append("k", payload);
    }
    for (int i = 0; i < reps; ++i) {
      {
        const auto t0 = bench_clock::now();
        auto rd = ds.read_from(postbox::start_from::earliest());
        std::uint64_t got = 0;
        while (got < replay_n) got += rd.poll(256).records.size();
        d.push_back(static_cast<double>(replay_n) / seconds_since(t0));
      }
      {
        const auto t0 = bench_clock::now();
        auto rd = ms.read_from(postbox::start_from::earliest());
        std::uint64_t got = 0;
        while (got < replay_n) got += rd.poll(256).records.size();
        m.push_back(static_cast<double>(replay_n) / seconds_since(t0));
      }
    }
  }
  std::printf("%-16s %14.0f %14.0f %8.2f   (in-memory stream in the second column)\n", "replay", median(d), median(m),
              median(d) / median(m));
  fs::remove_all(root);
  return 0;
}
