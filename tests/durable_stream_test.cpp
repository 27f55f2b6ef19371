// SPDX-License-Identifier: MIT
// Tests for postbox::durable_stream: replay across reopen, persisted group offsets, retention by segment, torn tails, the lock file, fsync policies.
#include <postbox/durable_stream.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using postbox::durable_options;
using postbox::durable_stream;
using postbox::errc;
using postbox::fsync_policy;
using postbox::start_from;

/// A fresh directory (mkdtemp) removed at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string tmpl = (fs::temp_directory_path() / "postbox_durable_XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  [[nodiscard]] fs::path log() const { return path / "log"; }
};

durable_options opts(std::size_t partitions, fsync_policy sync = fsync_policy::never()) {
  durable_options o;
  o.partitions = partitions;
  o.sync = sync;
  return o;
}

fs::path segment(const fs::path& log, std::uint32_t p, std::uint64_t base) {
  std::string digits = std::to_string(base);
  return log / ("p" + std::to_string(p)) / (std::string(20 - digits.size(), '0') + digits + ".log");
}

std::vector<std::string> read_values(const durable_stream<std::string>& s, std::uint32_t p, std::uint64_t from = 0) {
  auto r = s.read(p, from, 1000000);
  REQUIRE(r.ok());
  std::vector<std::string> out;
  for (auto& rec : r.records) out.push_back(rec.value);
  return out;
}

// Size on disk of a record: header 8, offset 8, timestamp 8, key length 4, key, payload.
std::size_t record_size(std::size_t key, std::size_t payload) { return 28 + key + payload; }

}  // namespace

TEST_CASE("crc32c matches the Castagnoli check value in the table and the hardware path", "[durable_stream]") {
  const std::string check = "123456789";
  CHECK(postbox::detail::crc32c(check.data(), check.size()) == 0xE3069283U);
  CHECK(~postbox::detail::crc32c_update_sw(~0U, check.data(), check.size()) == 0xE3069283U);
  // Continuation over two pieces equals the whole.
  CHECK(postbox::detail::crc32c(check.data() + 4, 5, postbox::detail::crc32c(check.data(), 4)) == 0xE3069283U);
#if POSTBOX_DURABLE_HW_CRC
  if (postbox::detail::cpu_has_crc32c()) {
    CHECK(~postbox::detail::crc32c_update_hw(~0U, check.data(), check.size()) == 0xE3069283U);
  }
#endif
}

TEST_CASE("records appended before close are replayed in order after reopen", "[durable_stream]") {
  temp_dir tmp;
  std::vector<postbox::position> at;
  {
    durable_stream<std::string> s(tmp.log(), opts(3));
    for (int i = 0; i < 30; ++i) at.push_back(s.append("key" + std::to_string(i % 5), "value" + std::to_string(i)));
  }
  durable_stream<std::string> s(tmp.log(), opts(3));
  CHECK(s.recovery().truncated_bytes() == 0);
  for (int i = 0; i < 30; ++i) {
    const auto key = "key" + std::to_string(i % 5);
    CHECK(at[static_cast<std::size_t>(i)].partition == postbox::stream_partition_of(key, 3));
    auto r = s.read(at[static_cast<std::size_t>(i)].partition, at[static_cast<std::size_t>(i)].offset, 1);
    REQUIRE(r.ok());
    REQUIRE(r.records.size() == 1);
    CHECK(r.records[0].key == key);
    CHECK(r.records[0].value == "value" + std::to_string(i));
  }
  // Appends continue after the recovered end.
  const auto next = s.append("key0", "later");
  CHECK(next.offset == s.end_offset(next.partition) - 1);
  CHECK(read_values(s, next.partition, next.offset) == std::vector<std::string>{"later"});
}

TEST_CASE("a key lands in the same partition as in the in-memory stream", "[durable_stream]") {
  temp_dir tmp;
  durable_stream<std::string> d(tmp.log(), opts(7));
  postbox::stream<std::string> m(7);
  for (const char* key : {"", "a", "orders", "customer-42", "\xff\x01"})
    CHECK(d.append(key, "x").partition == m.append(key, "x").partition);
}

TEST_CASE("readers start at earliest, latest, an offset or a time after reopen", "[durable_stream]") {
  temp_dir tmp;
  postbox::manual_clock clk;
  auto o = opts(1);
  o.clk = &clk;
  {
    durable_stream<std::string> s(tmp.log(), o);
    for (int i = 0; i < 10; ++i) {
      (void)s.append("k", std::to_string(i));
      clk.advance(std::chrono::seconds(1));
    }
  }
  durable_stream<std::string> s(tmp.log(), o);
  auto all = s.read_from(start_from::earliest()).poll(100);
  REQUIRE(all.records.size() == 10);
  CHECK(all.records.front().value == "0");
  CHECK(all.records.back().value == "9");
  auto latest = s.read_from(start_from::latest());
  CHECK(latest.poll(100).records.empty());
  (void)s.append("k", "10");
  auto l = latest.poll(100);
  REQUIRE(l.records.size() == 1);
  CHECK(l.records[0].value == "10");
  auto from7 = s.read_from(start_from::at_offset(7)).poll(100);
  REQUIRE(from7.records.size() == 4);
  CHECK(from7.records[0].value == "7");
  auto t = s.read_from(start_from::at_time(postbox::manual_clock::default_start + std::chrono::seconds(4))).poll(100);
  REQUIRE(!t.records.empty());
  CHECK(t.records[0].value == "4");
}

TEST_CASE("group offsets persist across reopen and lag is exact", "[durable_stream]") {
  temp_dir tmp;
  {
    durable_stream<std::string> s(tmp.log(), opts(2, fsync_policy::always()));
    for (int i = 0; i < 20; ++i) (void)s.append("k" + std::to_string(i), std::to_string(i));
    auto g = s.group("billing");
    auto m = g.join();
    auto r = m.poll(7);
    REQUIRE(r.records.size() == 7);
    REQUIRE(m.commit() == errc::ok);
    CHECK(g.lag() == 13);
  }
  durable_stream<std::string> s(tmp.log(), opts(2, fsync_policy::always()));
  auto g = s.group("billing");
  CHECK(g.lag() == 13);
  CHECK(g.committed(0) + g.committed(1) == 7);
  auto m = g.join();
  auto r = m.poll(100);
  CHECK(r.records.size() == 13);
  REQUIRE(m.commit() == errc::ok);
  CHECK(g.lag() == 0);
  // Another group starts from the beginning.
  CHECK(s.group("audit").lag() == 20);
}

TEST_CASE("a commit never moves a group offset backwards or past the end", "[durable_stream]") {
  temp_dir tmp;
  durable_stream<std::string> s(tmp.log(), opts(1));
  for (int i = 0; i < 10; ++i) (void)s.append("k", std::to_string(i));
  auto g = s.group("g");
  auto m = g.join();
  REQUIRE(m.poll(6).records.size() == 6);
  REQUIRE(m.commit() == errc::ok);
  CHECK(g.committed(0) == 6);
  REQUIRE(m.seek(0, 2));
  REQUIRE(m.poll(1).records.size() == 1);
  REQUIRE(m.commit() == errc::ok);
  CHECK(g.committed(0) == 6);  // not 3
  REQUIRE(m.seek(0, 500));
  REQUIRE(m.commit() == errc::ok);
  CHECK(g.committed(0) == 10);  // clamped to the end
}

TEST_CASE("a commit after a rebalance is a conflict and commits nothing", "[durable_stream]") {
  temp_dir tmp;
  durable_stream<std::string> s(tmp.log(), opts(2));
  for (int i = 0; i < 10; ++i) (void)s.append("k" + std::to_string(i), "v");
  auto g = s.group("g");
  auto a = g.join();
  REQUIRE(!a.poll(100).records.empty());
  auto b = g.join();
  CHECK(a.commit() == errc::conflict);
  CHECK(g.lag() == 10);
  CHECK(a.assignment().size() == 1);
  CHECK(b.assignment().size() == 1);
}

TEST_CASE("retention by count drops whole segments and a reader behind it gets out_of_range", "[durable_stream]") {
  temp_dir tmp;
  auto o = opts(1);
  o.segment_bytes = 4096;
  o.keep.max_count = 100;
  const std::string payload(100, 'x');  // 129 bytes a record: 31 per segment
  durable_stream<std::string> s(tmp.log(), o);
  auto behind = s.read_from(start_from::earliest());
  for (int i = 0; i < 400; ++i) (void)s.append("k", payload);
  const auto first = s.earliest_offset(0);
  CHECK(first > 0);
  CHECK(first % 31 == 0);              // a segment boundary
  CHECK(s.end_offset(0) - first >= 100);  // at least max_count kept
  CHECK(s.end_offset(0) - first < 100 + 31 + 31);
  CHECK(!fs::exists(segment(tmp.log(), 0, 0)));
  CHECK(fs::exists(segment(tmp.log(), 0, first)));
  auto r = behind.poll(10);
  CHECK(r.status == errc::out_of_range);
  CHECK(r.earliest == first);
}

TEST_CASE("retention by bytes keeps at least max_bytes in whole segments", "[durable_stream]") {
  temp_dir tmp;
  auto o = opts(1);
  o.segment_bytes = 4096;
  o.keep.max_bytes = 10000;
  const std::string payload(100, 'x');
  durable_stream<std::string> s(tmp.log(), o);
  for (int i = 0; i < 400; ++i) (void)s.append("k", payload);
  std::uintmax_t bytes = 0;
  for (const auto& e : fs::directory_iterator(tmp.log() / "p0")) bytes += fs::file_size(e.path());
  CHECK(bytes >= 10000);
  CHECK(bytes < 10000 + 2 * 4096);
  CHECK(s.segment_count(0) <= 4);
}

TEST_CASE("retention by age drops old segments and hides expired records", "[durable_stream]") {
  temp_dir tmp;
  postbox::manual_clock clk;
  auto o = opts(1);
  o.clk = &clk;
  o.segment_bytes = 4096;
  o.keep.max_age = std::chrono::minutes(1);
  const std::string payload(100, 'x');
  durable_stream<std::string> s(tmp.log(), o);
  for (int i = 0; i < 100; ++i) (void)s.append("k", payload);
  const auto segments = s.segment_count(0);
  CHECK(segments > 1);
  clk.advance(std::chrono::minutes(2));
  CHECK(s.earliest_offset(0) == 100);  // every record expired, though files remain until trim
  CHECK(s.read_from(start_from::earliest()).poll(100).records.empty());
  s.trim();
  CHECK(s.segment_count(0) == 1);  // the active segment stays
  (void)s.append("k", "fresh");
  auto r = s.read_from(start_from::earliest()).poll(100);
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value == "fresh");
}

TEST_CASE("a torn tail cut at every byte of the last record is truncated and earlier records stay", "[durable_stream]") {
  temp_dir tmp;
  const std::string last(40, 'L');
  {
    durable_stream<std::string> s(tmp.log(), opts(1));
    for (int i = 0; i < 5; ++i) (void)s.append("key", "record" + std::to_string(i));
    (void)s.append("key", last);
  }
  const auto file = segment(tmp.log(), 0, 0);
  const auto full = fs::file_size(file);
  const auto rec = record_size(3, last.size());
  const auto good = full - rec;
  const auto pristine = tmp.path / "pristine.log";
  fs::copy_file(file, pristine);
  for (std::uintmax_t cut = good; cut < full; ++cut) {
    INFO("cut at byte " << cut);
    fs::copy_file(pristine, file, fs::copy_options::overwrite_existing);
    fs::resize_file(file, cut);
    durable_stream<std::string> s(tmp.log(), opts(1));
    CHECK(s.recovery().truncated_bytes() == cut - good);
    CHECK(s.end_offset(0) == 5);
    const auto values = read_values(s, 0);
    REQUIRE(values.size() == 5);
    CHECK(values[4] == "record4");
    CHECK(fs::file_size(file) == good);
  }
}

TEST_CASE("a flipped byte anywhere in the last record drops it on reopen, never serving it", "[durable_stream]") {
  temp_dir tmp;
  const std::string last(40, 'L');
  {
    durable_stream<std::string> s(tmp.log(), opts(1));
    for (int i = 0; i < 5; ++i) (void)s.append("key", "record" + std::to_string(i));
    (void)s.append("key", last);
  }
  const auto file = segment(tmp.log(), 0, 0);
  const auto full = fs::file_size(file);
  const auto good = full - record_size(3, last.size());
  const auto pristine = tmp.path / "pristine.log";
  fs::copy_file(file, pristine);
  for (std::uintmax_t at = good; at < full; ++at) {
    INFO("flipped byte " << at);
    fs::copy_file(pristine, file, fs::copy_options::overwrite_existing);
    {
      std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(static_cast<std::streamoff>(at));
      char c = 0;
      f.read(&c, 1);
      c = static_cast<char>(c ^ 0x5A);
      f.seekp(static_cast<std::streamoff>(at));
      f.write(&c, 1);
    }
    durable_stream<std::string> s(tmp.log(), opts(1));
    CHECK(s.end_offset(0) == 5);
    const auto values = read_values(s, 0);
    REQUIRE(values.size() == 5);
    for (const auto& v : values) CHECK(v != last);
  }
}

TEST_CASE("a corrupt record in an older segment is reported by reads, never served", "[durable_stream]") {
  temp_dir tmp;
  auto o = opts(1);
  o.segment_bytes = 4096;
  const std::string payload(100, 'x');
  {
    durable_stream<std::string> s(tmp.log(), o);
    for (int i = 0; i < 100; ++i) (void)s.append("k", payload);
  }
  const auto file = segment(tmp.log(), 0, 0);
  {  // flip a payload byte of record 3 in the first (not the last) segment
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(3 * record_size(1, 100) + 60));
    f.put('y');
  }
  durable_stream<std::string> s(tmp.log(), o);
  auto r = s.read(0, 0, 10);
  CHECK(r.status == errc::corrupt);
  REQUIRE(r.records.size() == 3);
  for (const auto& rec : r.records) CHECK(rec.value == payload);
  CHECK(s.read(0, 4, 5).ok());
}

TEST_CASE("a second open of the same directory gets busy until the first closes", "[durable_stream]") {
  temp_dir tmp;
  {
    durable_stream<std::string> s(tmp.log(), opts(1));
    try {
      durable_stream<std::string> again(tmp.log(), opts(1));
      FAIL("the second open succeeded");
    } catch (const postbox::error& e) {
      CHECK(e.code() == errc::busy);
    }
  }
  durable_stream<std::string> s(tmp.log(), opts(1));
  CHECK(s.partitions() == 1);
}

TEST_CASE("a reopen with another partition count is refused, 0 takes the log's", "[durable_stream]") {
  temp_dir tmp;
  { durable_stream<std::string> s(tmp.log(), opts(4)); }
  try {
    durable_stream<std::string> s(tmp.log(), opts(3));
    FAIL("opened with a different partition count");
  } catch (const postbox::error& e) {
    CHECK(e.code() == errc::invalid_argument);
  }
  durable_stream<std::string> s(tmp.log(), opts(0));
  CHECK(s.partitions() == 4);
}

TEST_CASE("with always every returned append is durable", "[durable_stream]") {
  temp_dir tmp;
  durable_stream<std::string> s(tmp.log(), opts(1, fsync_policy::always()));
  for (int i = 0; i < 5; ++i) {
    const auto at = s.append("k", "v");
    CHECK(s.durable_end(0) == at.offset + 1);
  }
}

TEST_CASE("with batch of n the unsynced window never reaches n records", "[durable_stream]") {
  temp_dir tmp;
  durable_stream<std::string> s(tmp.log(), opts(1, fsync_policy::batch(4)));
  for (int i = 1; i <= 10; ++i) {
    (void)s.append("k", "v");
    CHECK(s.end_offset(0) - s.durable_end(0) < 4);
    CHECK(s.durable_end(0) == static_cast<std::uint64_t>(i / 4 * 4));
  }
  s.sync();
  CHECK(s.durable_end(0) == 10);
}

TEST_CASE("with batch by interval a sync happens once the oldest unsynced append is that old", "[durable_stream]") {
  temp_dir tmp;
  postbox::manual_clock clk;
  auto o = opts(1, fsync_policy::batch(0, std::chrono::milliseconds(10)));
  o.clk = &clk;
  durable_stream<std::string> s(tmp.log(), o);
  (void)s.append("k", "a");
  (void)s.append("k", "b");
  CHECK(s.durable_end(0) == 0);
  clk.advance(std::chrono::milliseconds(10));
  (void)s.append("k", "c");
  CHECK(s.durable_end(0) == 3);
}

TEST_CASE("a power loss under batch loses at most the records above durable_end", "[durable_stream]") {
  temp_dir tmp;
  const std::string payload = "0123456789";
  std::uint64_t durable = 0;
  {
    durable_stream<std::string> s(tmp.log(), opts(1, fsync_policy::batch(8)));
    for (int i = 0; i < 21; ++i) (void)s.append("k", payload);
    durable = s.durable_end(0);
    CHECK(durable == 16);
  }
  // Simulate the OS dropping unsynced page cache at a torn point in the window.
  const auto file = segment(tmp.log(), 0, 0);
  fs::resize_file(file, durable * record_size(1, payload.size()) + 7);
  durable_stream<std::string> s(tmp.log(), opts(1, fsync_policy::batch(8)));
  CHECK(s.end_offset(0) == durable);
  CHECK(read_values(s, 0).size() == durable);
}

TEST_CASE("with never nothing is synced until sync, and a lost tail is never corrupt", "[durable_stream]") {
  temp_dir tmp;
  {
    durable_stream<std::string> s(tmp.log(), opts(1));
    for (int i = 0; i < 6; ++i) (void)s.append("k", std::to_string(i));
    CHECK(s.durable_end(0) == 0);
    s.sync();
    CHECK(s.durable_end(0) == 6);
  }
  const auto file = segment(tmp.log(), 0, 0);
  fs::resize_file(file, fs::file_size(file) - 3);  // the OS wrote back only part of the last page
  durable_stream<std::string> s(tmp.log(), opts(1));
  CHECK(read_values(s, 0) == std::vector<std::string>{"0", "1", "2", "3", "4"});
}

TEST_CASE("a committed group offset above a truncated log is lowered to its end", "[durable_stream]") {
  temp_dir tmp;
  {
    durable_stream<std::string> s(tmp.log(), opts(1));
    for (int i = 0; i < 6; ++i) (void)s.append("k", std::to_string(i));
    auto g = s.group("g");
    auto m = g.join();
    REQUIRE(m.poll(100).records.size() == 6);
    REQUIRE(m.commit() == errc::ok);
  }
  const auto file = segment(tmp.log(), 0, 0);
  fs::resize_file(file, fs::file_size(file) - 1);  // power loss under never: the last record is gone
  durable_stream<std::string> s(tmp.log(), opts(1));
  CHECK(s.end_offset(0) == 5);
  CHECK(s.group("g").committed(0) == 5);
}

TEST_CASE("a codec's decode error is returned as the read's status", "[durable_stream]") {
  struct int_codec {
    [[nodiscard]] std::string encode(const int& v) const { return std::to_string(v); }
    [[nodiscard]] postbox::result<int> decode(std::string_view b) const {
      if (b.empty() || b[0] == '-') return errc::bad_type;
      return std::atoi(std::string(b).c_str());
    }
  };
  static_assert(postbox::durable_codec<int_codec, int>);
  temp_dir tmp;
  durable_stream<int, int_codec> s(tmp.log(), opts(1));
  (void)s.append("k", 1);
  (void)s.append("k", -2);
  auto r = s.read(0, 0, 10);
  CHECK(r.status == errc::bad_type);
  REQUIRE(r.records.size() == 1);
  CHECK(r.records[0].value == 1);
}

TEST_CASE("concurrent always appenders share fsyncs and every record survives reopen once", "[durable_stream]") {
  temp_dir tmp;
  const auto per_thread = static_cast<int>(postbox_test::scaled(400));
  constexpr int threads = 3;
  {
    auto o = opts(2, fsync_policy::always());
    o.segment_bytes = 8192;
    durable_stream<std::string> s(tmp.log(), o);
    std::vector<std::thread> ts;
    std::atomic<int> bad{0};
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        for (int i = 0; i < per_thread; ++i) {
          const auto at = s.append("k" + std::to_string(i % 2), std::to_string(t * 1000000 + i));
          if (s.durable_end(at.partition) <= at.offset) bad.fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
    for (auto& th : ts) th.join();
    CHECK(bad.load() == 0);
  }
  durable_stream<std::string> s(tmp.log(), opts(2));
  std::set<int> seen;
  long long sum = 0;
  for (std::uint32_t p = 0; p < 2; ++p)
    for (const auto& v : read_values(s, p)) {
      CHECK(seen.insert(std::stoi(v)).second);
      sum += std::stoi(v) % 1000000;
    }
  CHECK(seen.size() == static_cast<std::size_t>(threads * per_thread));
  CHECK(sum == static_cast<long long>(threads) * per_thread * (per_thread - 1) / 2);
}
