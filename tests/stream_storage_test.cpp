// SPDX-License-Identifier: MIT
// postbox::stream's storage and timestamps (issue 18): slots built in place in
// chunks, a chunk table grown and compacted in amortized O(1), the partition
// mask, and what a record's timestamp means with the default coarse clock.
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace {

// Counts live instances, so a leak or a double destruction of a record shows.
struct counted {
  static inline std::atomic<long> live{0};
  static inline bool throw_on_move = false;
  int v = 0;
  explicit counted(int x) : v(x) { ++live; }
  counted(const counted& o) : v(o.v) { ++live; }
  counted(counted&& o) : v(o.v) {
    if (throw_on_move) throw std::runtime_error("move failed");
    ++live;
  }
  counted& operator=(const counted&) = default;
  ~counted() { --live; }
};

// A clock a test sets to any time, also backwards (as a wall clock stepped by NTP).
class settable_clock final : public postbox::clock {
 public:
  [[nodiscard]] postbox::time_point now() const noexcept override {
    return postbox::time_point(postbox::duration(ns_.load(std::memory_order_relaxed)));
  }
  void wait_until(std::unique_lock<std::mutex>&, std::condition_variable&, postbox::time_point) const override {}
  void set(postbox::time_point t) noexcept { ns_.store(t.time_since_epoch().count(), std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> ns_{1767225600LL * 1000000000LL};
};

}  // namespace

TEST_CASE("every appended record is destroyed exactly once, with the stream or by retention", "[stream]") {
  counted::live = 0;
  {
    postbox::stream<counted> s(2);
    for (int i = 0; i < 3 * 256 + 5; ++i) (void)s.append(std::to_string(i % 7), counted(i));
    CHECK(counted::live == 3 * 256 + 5);
    auto r = s.read(0, 0, 10);
    REQUIRE(r.ok());
    CHECK(counted::live == 3 * 256 + 5 + static_cast<long>(r.records.size()));
  }
  CHECK(counted::live == 0);
}

TEST_CASE("an append whose value throws while moving appends nothing and the next append takes its offset", "[stream]") {
  counted::live = 0;
  {
    postbox::stream<counted> s(1);
    for (int i = 0; i < 256; ++i) (void)s.append("k", counted(i));  // the next append opens a new chunk
    counted::throw_on_move = true;
    CHECK_THROWS_AS(s.append("a key longer than the small-string buffer", counted(-1)), std::runtime_error);
    counted::throw_on_move = false;
    CHECK(s.end_offset(0) == 256);
    CHECK(s.append("k", counted(256)).offset == 256);
    auto r = s.read(0, 255, 10);
    REQUIRE(r.records.size() == 2);
    CHECK(r.records[0].value.v == 255);
    CHECK(r.records[1].value.v == 256);
  }
  CHECK(counted::live == 0);
}

TEST_CASE("count retention over many chunks frees dropped chunks and keeps the retained records intact", "[stream]") {
  counted::live = 0;
  {
    postbox::stream<counted> s(1, postbox::retention{.max_count = 300});
    for (int i = 0; i < 20000; ++i) {
      (void)s.append("k", counted(i));
      // 300 retained records span at most 3 chunks; dropped chunks are freed
      // once they outnumber the live ones, so at most 6 chunks exist.
      REQUIRE(counted::live <= 6 * 256);
    }
    CHECK(s.earliest_offset(0) == 19700);
    auto r = s.read(0, 19700, 1000);
    REQUIRE(r.ok());
    REQUIRE(r.records.size() == 300);
    for (std::size_t i = 0; i < r.records.size(); ++i) CHECK(r.records[i].value.v == 19700 + static_cast<int>(i));
  }
  CHECK(counted::live == 0);
}

TEST_CASE("trim after every record of full chunks expired destroys every record, the last chunk's too", "[stream]") {
  // The partition counts the tail chunk's records itself and writes the
  // count into the chunk only when it lets the chunk go; here the rebuild
  // drops a full tail that no append has moved past.
  counted::live = 0;
  postbox::manual_clock clk;
  postbox::stream<counted> s(1, postbox::retention{.max_age = std::chrono::seconds(10)}, clk);
  for (int i = 0; i < 2 * 256; ++i) (void)s.append("k", counted(i));
  clk.advance(std::chrono::seconds(11));
  s.trim();
  CHECK(s.earliest_offset(0) == 2 * 256);
  CHECK(counted::live == 0);
  CHECK(s.append("k", counted(7)).offset == 2 * 256);
  CHECK(counted::live == 1);
  auto r = s.read(0, 2 * 256, 10);
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value.v == 7);
}

TEST_CASE("trim after every record expired frees every chunk but the one being filled", "[stream]") {
  counted::live = 0;
  postbox::manual_clock clk;
  postbox::stream<counted> s(1, postbox::retention{.max_age = std::chrono::seconds(10)}, clk);
  for (int i = 0; i < 5 * 256 + 3; ++i) (void)s.append("k", counted(i));
  clk.advance(std::chrono::seconds(11));
  s.trim();
  CHECK(s.earliest_offset(0) == 5 * 256 + 3);
  CHECK(counted::live == 3);  // the last chunk's records, freed with their chunk
  CHECK(s.append("k", counted(7)).offset == 5 * 256 + 3);
  auto r = s.read(0, 5 * 256 + 3, 10);
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value.v == 7);
}

TEST_CASE("a reader holding a chunk table keeps its records while retention replaces the table", "[stream]") {
  postbox::stream<int> s(1, postbox::retention{.max_count = 256});
  for (int i = 0; i < 256; ++i) (void)s.append("k", i);
  auto rd = s.read_from(postbox::start_from::earliest());
  auto first = rd.poll(100);
  REQUIRE(first.records.size() == 100);
  for (int i = 256; i < 256 * 8; ++i) (void)s.append("k", i);  // drops and frees the chunks rd was reading
  auto next = rd.poll(10);
  CHECK(next.status == postbox::errc::out_of_range);
  CHECK(next.earliest == 256 * 7);
  rd.seek(0, next.earliest);
  auto again = rd.poll(256);
  REQUIRE(again.records.size() == 256);
  CHECK(again.records.front().value == 256 * 7);
  CHECK(again.records.back().value == 256 * 8 - 1);
}

TEST_CASE("an append lands in stream_partition_of's partition for power-of-two and other partition counts", "[stream]") {
  for (const std::size_t n : {1u, 2u, 3u, 4u, 5u, 7u, 8u, 16u, 100u}) {
    postbox::stream<int> s(n);
    for (int i = 0; i < 200; ++i) {
      const auto key = "key-" + std::to_string(i);
      REQUIRE(s.append(key, i).partition == postbox::stream_partition_of(key, n));
    }
  }
}

TEST_CASE("a stream's default clock is the coarse clock and a time read from it finds the records appended after", "[stream]") {
  postbox::stream<int> s(1);
  CHECK(&s.get_clock() == &postbox::coarse_default_clock());
  (void)s.append("k", 0);
  const auto t = s.get_clock().now();
  (void)s.append("k", 1);
  const auto after = s.get_clock().now();
  auto r = s.read_from(postbox::start_from::at_time(t)).poll();
  REQUIRE_FALSE(r.records.empty());
  // At the clock's resolution, records of the same tick as `t` are found too
  // (at_time is inclusive): never one appended after `t` is missed.
  CHECK(r.records.back().value == 1);
  CHECK(r.records.back().timestamp >= t);
  CHECK(r.records.back().timestamp <= after);
}

TEST_CASE("a clock stepped backwards does not make timestamps decrease within a partition", "[stream]") {
  settable_clock clk;
  postbox::stream<int> s(1, {}, clk);
  const auto t0 = clk.now();
  (void)s.append("k", 0);
  clk.set(t0 - std::chrono::seconds(5));
  (void)s.append("k", 1);
  clk.set(t0 + std::chrono::seconds(1));
  (void)s.append("k", 2);
  auto r = s.read(0, 0, 10);
  REQUIRE(r.records.size() == 3);
  CHECK(r.records[0].timestamp == t0);
  CHECK(r.records[1].timestamp == t0);  // clamped to the partition's last timestamp
  CHECK(r.records[2].timestamp == t0 + std::chrono::seconds(1));
  CHECK(s.offset_for_time(0, t0 + std::chrono::milliseconds(1)) == 2);
}

TEST_CASE("timestamps from a manual clock are exactly its time at each append", "[stream]") {
  postbox::manual_clock clk;
  postbox::stream<int> s(2, {}, clk);
  for (int i = 0; i < 600; ++i) {
    (void)s.append(i % 2 == 0 ? "a" : "b", i);
    clk.advance(std::chrono::microseconds(1));
  }
  for (std::uint32_t p = 0; p < 2; ++p) {
    auto r = s.read(p, 0, 1000);
    REQUIRE(r.ok());
    for (const auto& rec : r.records)
      CHECK(rec.timestamp == postbox::manual_clock::default_start + std::chrono::microseconds(rec.value));
  }
}
