// SPDX-License-Identifier: MIT
// Specification tests for postbox::stream: partitioning, readers, consumer groups, lag and retention.
#include <postbox/cached_clock.hpp>
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

using postbox::start_from;

TEST_CASE("the partition of a key is the stable FNV-1a 64 hash modulo the partition count", "[stream]") {
  STATIC_REQUIRE(postbox::fnv1a_64("") == 0xcbf29ce484222325ULL);
  STATIC_REQUIRE(postbox::fnv1a_64("a") == 0xaf63dc4c8601ec8cULL);
  postbox::stream<int> s(4);
  const auto pos = s.append("a", 1);
  CHECK(pos.partition == 0xaf63dc4c8601ec8cULL % 4);
  CHECK(pos.offset == 0);
}

TEST_CASE("appends with one key keep their order within the partition", "[stream]") {
  postbox::stream<int> s(3);
  for (int i = 0; i < 600; ++i) CHECK(s.append("k", i).offset == static_cast<std::uint64_t>(i));
  const auto p = postbox::stream_partition_of("k", 3);
  auto r = s.read(p, 0, 1000);
  REQUIRE(r.ok());
  REQUIRE(r.records.size() == 600);
  for (int i = 0; i < 600; ++i) CHECK(r.records[static_cast<std::size_t>(i)].value == i);
}

TEST_CASE("a reader from earliest replays everything and replay is non-destructive", "[stream]") {
  postbox::stream<int> s(2);
  for (int i = 0; i < 10; ++i) (void)s.append(std::to_string(i), i);
  for (int round = 0; round < 2; ++round) {
    auto rd = s.read_from(start_from::earliest());
    std::set<int> seen;
    for (auto& r : rd.poll(100).records) seen.insert(r.value);
    CHECK(seen.size() == 10);
  }
}

TEST_CASE("a reader from latest sees only later appends", "[stream]") {
  postbox::stream<int> s(2);
  (void)s.append("a", 1);
  auto rd = s.read_from(start_from::latest());
  CHECK(rd.poll().records.empty());
  (void)s.append("a", 2);
  auto r = rd.poll();
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value == 2);
}

TEST_CASE("a reader from an offset starts there", "[stream]") {
  postbox::stream<int> s(1);
  for (int i = 0; i < 5; ++i) (void)s.append("k", i);
  auto rd = s.read_from(start_from::at_offset(3));
  auto r = rd.poll();
  REQUIRE(r.records.size() == 2);
  CHECK(r.records[0].value == 3);
}

TEST_CASE("a reader from a time starts at the first record at or after it", "[stream]") {
  postbox::manual_clock clk;
  postbox::stream<int> s(1, {}, clk);
  (void)s.append("k", 0);
  clk.advance(std::chrono::seconds(10));
  const auto t = clk.now();
  (void)s.append("k", 1);
  (void)s.append("k", 2);
  auto rd = s.read_from(start_from::at_time(t));
  auto r = rd.poll();
  REQUIRE(r.records.size() == 2);
  CHECK(r.records[0].value == 1);
  CHECK(r.records[0].timestamp == t);
}

TEST_CASE("a stream on a cached_clock stamps each record with the clock's cached time, not its source's",
          "[stream]") {
  postbox::manual_clock source;
  const postbox::cached_clock clk(source, std::chrono::hours(1));  // no tick within the test
  postbox::stream<int> s(2, {}, clk);
  source.advance(std::chrono::seconds(3));  // the source moves; the cached time does not
  (void)s.append("k", 1);
  std::mutex m;
  std::condition_variable cv;
  std::unique_lock lock(m);
  clk.wait_until(lock, cv, source.now());  // refreshes the cached time to the source's
  (void)s.append("k", 2);
  auto r = s.read_from(start_from::earliest()).poll();
  REQUIRE(r.records.size() == 2);
  CHECK(r.records[0].timestamp == postbox::manual_clock::default_start);
  CHECK(r.records[1].timestamp == postbox::manual_clock::default_start + std::chrono::seconds(3));
}

TEST_CASE("members of a group split the partitions and rebalance on join and leave", "[stream]") {
  postbox::stream<int> s(4);
  auto g = s.group("billing");
  auto a = g.join();
  CHECK(a.assignment().size() == 4);
  {
    auto b = g.join();
    CHECK(a.assignment() == std::vector<std::uint32_t>{0, 2});
    CHECK(b.assignment() == std::vector<std::uint32_t>{1, 3});
    CHECK(g.member_count() == 2);
  }
  CHECK(a.assignment().size() == 4);
  CHECK(g.member_count() == 1);
}

TEST_CASE("committed offsets survive member changes and a new member resumes from them", "[stream]") {
  postbox::stream<int> s(1);
  for (int i = 0; i < 10; ++i) (void)s.append("k", i);
  auto g = s.group("g");
  {
    auto a = g.join();
    auto r = a.poll(4);
    REQUIRE(r.records.size() == 4);
    REQUIRE(a.commit() == postbox::errc::ok);
    (void)a.poll(3);  // polled but not committed: redelivered to the next owner
  }
  CHECK(g.committed(0) == 4);
  auto b = g.join();
  auto r = b.poll(100);
  REQUIRE(r.records.size() == 6);
  CHECK(r.records[0].value == 4);
}

TEST_CASE("a commit after a rebalance is refused with conflict", "[stream]") {
  postbox::stream<int> s(2);
  for (int i = 0; i < 10; ++i) (void)s.append(std::to_string(i), i);
  auto g = s.group("g");
  auto a = g.join();
  (void)a.poll(100);
  auto b = g.join();
  CHECK(a.commit() == postbox::errc::conflict);
  CHECK(g.committed(0) == 0);
  CHECK(g.committed(1) == 0);
}

TEST_CASE("lag is exact per partition and in total", "[stream]") {
  postbox::stream<int> s(1);
  for (int i = 0; i < 7; ++i) (void)s.append("k", i);
  auto g = s.group("g");
  CHECK(g.lag() == 7);
  auto m = g.join();
  (void)m.poll(5);
  CHECK(g.lag(0) == 7);
  REQUIRE(m.commit() == postbox::errc::ok);
  CHECK(g.lag(0) == 2);
  CHECK(g.lag() == 2);
}

TEST_CASE("count retention makes an old offset out_of_range with the earliest offset", "[stream]") {
  postbox::stream<int> s(1, postbox::retention{5, 0, {}});
  for (int i = 0; i < 1000; ++i) (void)s.append("k", i);
  auto r = s.read(0, 0, 10);
  CHECK(r.status == postbox::errc::out_of_range);
  CHECK(r.earliest == 995);
  auto ok = s.read(0, r.earliest, 10);
  REQUIRE(ok.ok());
  REQUIRE(ok.records.size() == 5);
  CHECK(ok.records[0].value == 995);
}

TEST_CASE("byte retention uses the size function", "[stream]") {
  postbox::stream<std::string> s(1, postbox::retention{0, 10, {}}, postbox::default_clock(),
                                 [](const std::string& v) { return v.size(); });
  (void)s.append("k", std::string(4, 'a'));
  (void)s.append("k", std::string(4, 'b'));
  (void)s.append("k", std::string(4, 'c'));  // 12 bytes > 10: the first goes
  CHECK(s.earliest_offset(0) == 1);
  CHECK(s.read(0, 0, 1).status == postbox::errc::out_of_range);
}

TEST_CASE("age retention hides records older than max_age on the injected clock", "[stream]") {
  postbox::manual_clock clk;
  postbox::stream<int> s(1, postbox::retention{0, 0, std::chrono::seconds(60)}, clk);
  (void)s.append("k", 0);
  clk.advance(std::chrono::seconds(30));
  (void)s.append("k", 1);
  CHECK(s.read(0, 0, 10).records.size() == 2);
  clk.advance(std::chrono::seconds(45));  // first is 75 s old, second 45 s
  auto r = s.read(0, 0, 10);
  CHECK(r.status == postbox::errc::out_of_range);
  CHECK(r.earliest == 1);
  s.trim();
  CHECK(s.earliest_offset(0) == 1);
}

TEST_CASE("a group member behind retention gets out_of_range and can seek to the earliest", "[stream]") {
  postbox::stream<int> s(1, postbox::retention{3, 0, {}});
  auto g = s.group("g");
  auto m = g.join();
  for (int i = 0; i < 10; ++i) (void)s.append("k", i);
  auto r = m.poll();
  REQUIRE(r.status == postbox::errc::out_of_range);
  REQUIRE(m.seek(0, r.earliest));
  auto ok = m.poll();
  REQUIRE(ok.ok());
  CHECK(ok.records.front().value == 7);
}

TEST_CASE("zero partitions and an unknown partition are invalid arguments", "[stream]") {
  CHECK_THROWS_AS(postbox::stream<int>(0), postbox::error);
  postbox::stream<int> s(2);
  CHECK_THROWS_AS(s.read(2, 0, 1), postbox::error);
}

TEST_CASE("a member that left polls nothing and its commit is not_found", "[stream]") {
  postbox::stream<int> s(1);
  (void)s.append("k", 1);
  auto g = s.group("g");
  auto m = g.join();
  m.leave();
  CHECK(m.poll().records.empty());
  CHECK(m.commit() == postbox::errc::not_found);
  CHECK(g.member_count() == 0);
}

TEST_CASE("a group poll that reaches a partition behind retention returns what it read and reports the partition next", "[stream]") {
  postbox::stream<int> s(2, postbox::retention{3, 0, {}});
  std::string key0, key1;
  for (int i = 0; key0.empty() || key1.empty(); ++i) {
    auto k = "key" + std::to_string(i);
    (postbox::stream_partition_of(k, 2) == 0 ? key0 : key1) = k;
  }
  auto g = s.group("g");
  auto m = g.join();
  for (int i = 0; i < 2; ++i) (void)s.append(key0, i);
  for (int i = 0; i < 10; ++i) (void)s.append(key1, 100 + i);
  REQUIRE(m.assignment() == std::vector<std::uint32_t>{0, 1});
  auto first = m.poll();
  REQUIRE(first.ok());
  REQUIRE(first.records.size() == 2);
  CHECK(first.records[0].value == 0);
  CHECK(first.records[1].value == 1);
  REQUIRE(m.commit() == postbox::errc::ok);
  CHECK(g.committed(0) == 2);
  auto second = m.poll();
  CHECK(second.status == postbox::errc::out_of_range);
  CHECK(second.partition == 1);
  CHECK(second.earliest == 7);
}

TEST_CASE("readers, group handles and members outlive the stream and still read what it retained", "[stream]") {
  auto s = std::make_unique<postbox::stream<int>>(2);
  for (int i = 0; i < 10; ++i) {
    std::string key = "k";
    key += std::to_string(i);  // not "k" + to_string: GCC 12 -O3 falsely flags that with -Wstringop-overflow
    (void)s->append(key, i);
  }
  auto reader = s->read_from();
  auto group = s->group("g");
  auto member = group.join();
  const auto ends = std::vector<std::uint64_t>{s->end_offset(0), s->end_offset(1)};
  s.reset();  // the log is shared: nothing above dangles
  std::vector<int> by_reader;
  for (auto r = reader.poll(3); !r.records.empty(); r = reader.poll(3))
    for (const auto& rec : r.records) by_reader.push_back(rec.value);
  std::vector<int> by_member;
  for (auto r = member.poll(3); !r.records.empty(); r = member.poll(3)) {
    for (const auto& rec : r.records) by_member.push_back(rec.value);
    REQUIRE(member.commit() == postbox::errc::ok);
  }
  std::sort(by_reader.begin(), by_reader.end());
  std::sort(by_member.begin(), by_member.end());
  const std::vector<int> all{0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  CHECK(by_reader == all);
  CHECK(by_member == all);
  CHECK(group.lag() == 0);
  CHECK(group.committed(0) == ends[0]);
  CHECK(member.end_offset(1) == ends[1]);
  member.leave();
  CHECK(group.member_count() == 0);
}
