// SPDX-License-Identifier: MIT
// Stress for postbox::stream: concurrent appends, churning group members and a Jepsen-style history checker.
#include <postbox/stream.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace {

struct batch {
  std::uint32_t partition;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> items;  // (offset, value) in poll order
};

}  // namespace

TEST_CASE("a consumer group under churn has no lost write, duplicate, nonmonotonic poll or poll skip", "[stream][stress]") {
  constexpr int producers = 3;
  constexpr int consumers = 3;
  constexpr std::size_t partitions = 4;
  const std::uint64_t per_producer = postbox_test::scaled(20000);
  postbox::stream<std::uint64_t> s(partitions);
  auto group = s.group("jepsen");

  std::vector<std::vector<postbox::position>> appended(producers);
  std::atomic<int> producing{producers};
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p)
    threads.emplace_back([&, p] {
      auto& mine = appended[static_cast<std::size_t>(p)];
      mine.reserve(per_producer);
      for (std::uint64_t i = 0; i < per_producer; ++i)
        mine.push_back(s.append("key" + std::to_string(i % 13), (std::uint64_t(p) << 32) | i));
      producing.fetch_sub(1);
    });

  std::mutex log_mu;
  std::vector<batch> committed_log;
  std::atomic<std::uint64_t> nonmonotonic{0};
  std::atomic<std::uint64_t> conflicts{0};
  std::atomic<std::uint64_t> read_errors{0};
  for (int c = 0; c < consumers; ++c)
    threads.emplace_back([&, c] {
      for (int session = 0;; ++session) {
        auto m = group.join();
        for (int round = 0; round < 20 + c * 7; ++round) {
          auto r = m.poll(50);
          if (!r.ok()) read_errors.fetch_add(1);  // Catch2 assertions are not thread-safe
          std::map<std::uint32_t, batch> pending;
          for (auto& rec : r.records) {
            auto& b = pending[rec.pos.partition];
            b.partition = rec.pos.partition;
            if (!b.items.empty() && rec.pos.offset <= b.items.back().first) nonmonotonic.fetch_add(1);
            b.items.emplace_back(rec.pos.offset, rec.value);
          }
          if (m.commit() == postbox::errc::ok) {
            std::lock_guard lock(log_mu);
            for (auto& [p, b] : pending) committed_log.push_back(std::move(b));
          } else {
            conflicts.fetch_add(1);
          }
        }
        if (producing.load() == 0 && group.lag() == 0) return;
      }
    });
  for (auto& t : threads) t.join();

  // Jepsen-style check of the history.
  std::map<std::pair<std::uint32_t, std::uint64_t>, std::uint64_t> written;
  for (int p = 0; p < producers; ++p)
    for (std::uint64_t i = 0; i < per_producer; ++i) {
      const auto& pos = appended[static_cast<std::size_t>(p)][i];
      written[{pos.partition, pos.offset}] = (std::uint64_t(p) << 32) | i;
    }
  std::map<std::pair<std::uint32_t, std::uint64_t>, int> consumed;
  std::uint64_t wrong_value = 0;
  std::vector<std::vector<std::pair<std::uint64_t, std::uint64_t>>> ranges(partitions);  // per partition [first, last]
  for (const auto& b : committed_log) {
    if (b.items.empty()) continue;
    for (const auto& [off, val] : b.items) {
      ++consumed[{b.partition, off}];
      const auto it = written.find({b.partition, off});
      if (it == written.end() || it->second != val) ++wrong_value;
    }
    ranges[b.partition].emplace_back(b.items.front().first, b.items.back().first);
  }
  std::uint64_t lost = 0, duplicate = 0, poll_skip = 0;
  for (const auto& [pos, val] : written)
    if (!consumed.count(pos)) ++lost;
  for (const auto& [pos, n] : consumed)
    if (n > 1) duplicate += static_cast<std::uint64_t>(n - 1);
  for (auto& r : ranges) {
    std::sort(r.begin(), r.end());
    std::uint64_t expect = 0;
    for (const auto& [first, last] : r) {
      if (first > expect) ++poll_skip;
      expect = last + 1;
    }
  }
  INFO("conflicts (refused commits after rebalance): " << conflicts.load());
  CHECK(written.size() == producers * per_producer);
  CHECK(lost == 0);
  CHECK(duplicate == 0);
  CHECK(nonmonotonic == 0);
  CHECK(poll_skip == 0);
  CHECK(wrong_value == 0);
  CHECK(read_errors == 0);
  CHECK(group.lag() == 0);
}

TEST_CASE("readers racing appends and retention see intact records or out_of_range only", "[stream][stress]") {
  const std::uint64_t total = postbox_test::scaled(200000);
  postbox::stream<std::uint64_t> s(1, postbox::retention{1000, 0, {}});
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> torn{0}, out_of_range{0}, read_records{0}, bad_earliest{0};
  std::atomic<int> started{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r)
    readers.emplace_back([&] {
      started.fetch_add(1);
      std::uint64_t next = 0;
      while (!done.load()) {
        auto res = s.read(0, next, 300);
        if (res.status == postbox::errc::out_of_range) {
          out_of_range.fetch_add(1);
          if (res.earliest <= next) bad_earliest.fetch_add(1);
          next = res.earliest;
          continue;
        }
        for (const auto& rec : res.records) {
          if (rec.value != rec.pos.offset * 3 || rec.key != "k") torn.fetch_add(1);  // value written with its offset
          read_records.fetch_add(1);
        }
        if (!res.records.empty()) next = res.records.back().pos.offset + 1;
      }
    });
  // The appends take a few milliseconds: start them only once both readers
  // run, and stop the readers only once they have read records (at the
  // latest after the last append), so the count below does not depend on
  // how the scheduler placed the threads.
  CHECK(postbox_test::eventually([&] { return started.load() == 2; }));  // CHECK: the threads are joined below either way
  for (std::uint64_t i = 0; i < total; ++i) (void)s.append("k", i * 3);
  CHECK(postbox_test::eventually([&] { return read_records.load() > 0; }));
  done = true;
  for (auto& t : readers) t.join();
  INFO("records read " << read_records.load() << ", out_of_range " << out_of_range.load());
  CHECK(torn == 0);
  CHECK(bad_earliest == 0);
  CHECK(read_records > 0);
  CHECK(s.earliest_offset(0) == total - 1000);
}
