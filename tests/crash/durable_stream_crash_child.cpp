// SPDX-License-Identifier: MIT
// Crash test for postbox::durable_stream: a child appends and commits a consumer group while the parent SIGKILLs it; every acknowledged append must survive, in order, exactly once.
//
// Run without arguments (the parent). Each cycle starts this program as a
// child ("child <dir> always|batch"): it opens the log (3 partitions, 16 KiB
// segments so segments roll and retention-free replay crosses files), reports
// what it recovered ("O <p> <end> <committed>" per partition, "T <bytes>"
// truncated), then appends records numbered on from the highest number in the
// log and reports "A <n> <partition> <offset>" after each append returns; every
// 7 appends a group member polls and commits and reports "C <p> <committed>".
// The parent kills the child after a random number of lines, 50 times (5 under
// sanitizers), alternating the always and batch(16) policies, then checks:
// every acknowledged append is present at its acknowledged position, exactly
// once; numbers increase along each partition (order); at most one
// unacknowledged record per kill (the append that was cut off); committed
// offsets reported at each open never went below a committed value acknowledged
// before and never past the end. A kill loses no written record under batch
// either (the kernel has it): batch's window only matters on an OS crash or
// power loss, which tests/durable_stream_test.cpp simulates by truncation.
#include <postbox/durable_stream.hpp>

#include "../support.hpp"
#include "harness.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr const char* who = "durable_stream_crash";
constexpr std::size_t partitions = 3;

postbox::durable_options options(const std::string& policy) {
  postbox::durable_options o;
  o.partitions = partitions;
  o.segment_bytes = 16 * 1024;
  o.sync = policy == "batch" ? postbox::fsync_policy::batch(16) : postbox::fsync_policy::always();
  return o;
}

// Deterministic torn write: POSTBOX_CRASH_AT=torn:<k> makes the child, before
// its k-th append, write the first bytes of a record (a plausible length, then
// junk, cut short) to the end of partition 0's last segment, as a kill inside
// write(2) could, and die.
void tear_and_die(const std::string& dir, long long n) {
  std::filesystem::path last;
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(dir) / "p0"))
    if (e.path().extension() == ".log" && e.path() > last) last = e.path();
  if (last.empty()) postbox_crash::die(who, "no segment to tear");
  unsigned char torn[24] = {};
  const std::uint32_t body = 40 + static_cast<std::uint32_t>(n % 7);
  std::memcpy(torn, &body, 4);
  for (std::size_t i = 4; i < sizeof torn; ++i) torn[i] = static_cast<unsigned char>(n + static_cast<long long>(i));
  const auto len = 1 + static_cast<std::size_t>(n % static_cast<long long>(sizeof torn));
  const int fd = ::open(last.c_str(), O_WRONLY | O_APPEND);
  if (fd < 0 || ::write(fd, torn, len) != static_cast<ssize_t>(len)) postbox_crash::die(who, "torn write");
  ::kill(::getpid(), SIGKILL);
}

int run_child(const std::string& dir, const std::string& policy) {
  postbox::durable_stream<std::string> log(dir, options(policy));
  auto group = log.group("crash");
  long long next = 0;
  for (std::uint32_t p = 0; p < partitions; ++p) {
    postbox_crash::emit("O " + std::to_string(p) + " " + std::to_string(log.end_offset(p)) + " " +
                        std::to_string(group.committed(p)));
    const auto end = log.end_offset(p);
    if (end > 0) {
      auto r = log.read(p, end - 1, 1);
      if (!r.ok() || r.records.size() != 1) postbox_crash::die(who, "cannot read the last record");
      next = std::max(next, std::stoll(r.records[0].value) + 1);
    }
  }
  postbox_crash::emit("T " + std::to_string(log.recovery().truncated_bytes()));
  auto member = group.join();
  const char* crash_at = std::getenv("POSTBOX_CRASH_AT");
  const long long tear_at =
      crash_at != nullptr && std::string(crash_at).rfind("torn:", 0) == 0 ? std::atoll(crash_at + 5) : 0;
  long long appended = 0;
  for (long long n = next;; ++n) {
    if (++appended == tear_at) tear_and_die(dir, n);
    // Payloads of varying length, so kills land at varying byte positions.
    const std::string value = std::to_string(n) + std::string(static_cast<std::size_t>(n % 53), '.');
    const auto at = log.append("key" + std::to_string(n % 11), value);
    postbox_crash::emit("A " + std::to_string(n) + " " + std::to_string(at.partition) + " " +
                        std::to_string(at.offset));
    if (n % 7 == 0) {
      (void)member.poll(64);
      if (member.commit() != postbox::errc::ok) postbox_crash::die(who, "commit failed");
      for (std::uint32_t p = 0; p < partitions; ++p)
        postbox_crash::emit("C " + std::to_string(p) + " " + std::to_string(group.committed(p)));
    }
  }
}

struct acked {
  std::uint32_t partition = 0;
  std::uint64_t offset = 0;
};

int run_parent() {
  const auto cycles = static_cast<int>(postbox_test::scaled(50));
  const std::uint64_t seed = std::getenv("POSTBOX_SEED") ? std::strtoull(std::getenv("POSTBOX_SEED"), nullptr, 10)
                                                         : std::random_device{}();
  std::mt19937_64 rng(seed);
  const auto dir = std::filesystem::temp_directory_path() / ("postbox_durable_crash_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);

  int bad = 0;
  auto fail = [&](const std::string& what) {
    if (bad < 20) std::fprintf(stderr, "%s: %s\n", who, what.c_str());
    ++bad;
  };
  std::map<long long, acked> acks;
  std::vector<std::uint64_t> committed_acked(partitions, 0);  // highest committed offset acknowledged
  std::uint64_t truncated = 0;
  std::uint64_t commits = 0;
  auto on_line = [&](const std::string& line) {
    std::istringstream in(line);
    char kind = 0;
    in >> kind;
    if (kind == 'A') {
      long long n = 0;
      acked a;
      in >> n >> a.partition >> a.offset;
      acks[n] = a;
    } else if (kind == 'C') {
      std::uint32_t p = 0;
      std::uint64_t c = 0;
      in >> p >> c;
      if (c < committed_acked.at(p)) fail("a commit moved partition " + std::to_string(p) + " backwards");
      committed_acked.at(p) = std::max(committed_acked.at(p), c);
      ++commits;
    } else if (kind == 'O') {
      std::uint32_t p = 0;
      std::uint64_t end = 0, c = 0;
      in >> p >> end >> c;
      if (c < committed_acked.at(p))
        fail("after a restart partition " + std::to_string(p) + " committed " + std::to_string(c) + " < acknowledged " +
             std::to_string(committed_acked.at(p)));
      if (c > end) fail("committed offset past the end of partition " + std::to_string(p));
    } else if (kind == 'T') {
      std::uint64_t t = 0;
      in >> t;
      truncated += t;
    }
  };

  int killed = 0;
  for (int c = 0; c < cycles; ++c) {
    auto ch = postbox_crash::spawn(who, {"child", dir.string(), c % 2 == 0 ? "always" : "batch"});
    postbox_crash::read_lines(ch, 1 + rng() % 300, on_line);
    const int status = postbox_crash::kill_and_reap(who, ch, on_line);
    if (!postbox_crash::killed_by_sigkill(status))
      postbox_crash::die(who, "child ended by itself with status " + std::to_string(status));
    ++killed;
  }
  int torn_kills = 0;
  for (int r = 0; r < 5; ++r) {
    const std::string at = "torn:" + std::to_string(1 + rng() % 40);
    auto ch = postbox_crash::spawn(who, {"child", dir.string(), r % 2 == 0 ? "always" : "batch"}, at);
    const int status = postbox_crash::run_to_end(who, ch, on_line);
    if (!postbox_crash::killed_by_sigkill(status)) postbox_crash::die(who, "never reached " + at);
    ++torn_kills;
  }
  killed += torn_kills;

  postbox::durable_stream<std::string> log(dir, options("always"));
  truncated += log.recovery().truncated_bytes();
  std::map<long long, acked> found;
  std::size_t records = 0;
  for (std::uint32_t p = 0; p < partitions; ++p) {
    auto r = log.read(p, 0, ~std::size_t{0});
    if (!r.ok()) fail("reading partition " + std::to_string(p) + ": " + std::string(postbox::to_string(r.status)));
    long long prev = -1;
    for (const auto& rec : r.records) {
      ++records;
      const long long n = std::stoll(rec.value);
      if (rec.value != std::to_string(n) + std::string(static_cast<std::size_t>(n % 53), '.'))
        fail("record " + std::to_string(n) + " has a wrong payload");
      if (rec.key != "key" + std::to_string(n % 11)) fail("record " + std::to_string(n) + " has a wrong key");
      if (n <= prev) fail("partition " + std::to_string(p) + " holds " + std::to_string(n) + " after " + std::to_string(prev));
      prev = n;
      if (!found.emplace(n, acked{p, rec.pos.offset}).second) fail("record " + std::to_string(n) + " appears twice");
    }
  }
  for (const auto& [n, a] : acks) {
    const auto it = found.find(n);
    if (it == found.end()) {
      fail("acknowledged append " + std::to_string(n) + " is missing");
    } else if (it->second.partition != a.partition || it->second.offset != a.offset) {
      fail("acknowledged append " + std::to_string(n) + " moved");
    }
  }
  const auto unacked = found.size() - std::min(found.size(), acks.size());
  if (unacked > static_cast<std::size_t>(killed)) fail(std::to_string(unacked) + " unacknowledged records after " +
                                                       std::to_string(killed) + " kills");
  auto group = log.group("crash");
  for (std::uint32_t p = 0; p < partitions; ++p) {
    if (group.committed(p) < committed_acked[p]) fail("the final committed offset went backwards");
    if (group.committed(p) > log.end_offset(p)) fail("the final committed offset is past the end");
  }

  if (truncated == 0) fail("the torn writes were never truncated");
  std::printf(
      "durable_stream_crash: seed %llu, %d kills (always and batch(16) alternating; %d after a torn write), %zu "
      "acknowledged appends, %zu records (%zu unacknowledged, at most one per kill), %llu commits, %llu torn bytes "
      "truncated, %d problems\n",
      static_cast<unsigned long long>(seed), killed, torn_kills, acks.size(), records, unacked,
      static_cast<unsigned long long>(commits), static_cast<unsigned long long>(truncated), bad);
  if (bad == 0 || std::getenv("POSTBOX_KEEP") == nullptr) std::filesystem::remove_all(dir);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "child") return run_child(argv[2], argv[3]);
  std::signal(SIGPIPE, SIG_IGN);
  return run_parent();
}
