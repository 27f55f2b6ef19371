// SPDX-License-Identifier: MIT
// postbox::stream's append path (issue 18): the per-partition append lock
// under contention, and appends without retention limits.
#include <postbox/stream.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <condition_variable>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

// Every read returns a later time than every read before it, from any
// thread, and every other read lingers before returning, so that
// appenders, which read the clock outside the append lock, often take the
// lock in another order than they read their times.
class ticking_clock final : public postbox::clock {
 public:
  [[nodiscard]] postbox::time_point now() const noexcept override {
    const auto t = ns_.fetch_add(1, std::memory_order_relaxed) + 1;
    volatile std::int64_t linger = 0;
    for (std::int64_t i = 0; i < (t % 2 == 1 ? 400 : 0); ++i) linger = linger + 1;  // odd reads linger
    return postbox::time_point(postbox::duration(t));
  }
  void wait_until(std::unique_lock<std::mutex>&, std::condition_variable&, postbox::time_point) const override {}
  [[nodiscard]] std::int64_t reads() const noexcept { return ns_.load(std::memory_order_relaxed); }

 private:
  mutable std::atomic<std::int64_t> ns_{0};
};

}  // namespace

TEST_CASE("threads appending to one partition get every offset once and every record reads back once", "[stream][stress]") {
  // Four appenders on two cores contend for one partition's lock often enough
  // to park on it. Checksum: the offsets handed out are exactly [0, total),
  // and reading the partition back gives every appended value once.
  constexpr std::uint64_t appenders = 4;
  const std::uint64_t per = postbox_test::scaled(20000);
  const std::uint64_t total = appenders * per;
  postbox::stream<std::uint64_t> s(3);
  const auto part = postbox::stream_partition_of("one", 3);
  std::vector<std::vector<std::uint64_t>> offsets(appenders);
  std::vector<std::thread> threads;
  for (std::uint64_t a = 0; a < appenders; ++a)
    threads.emplace_back([&, a] {
      auto& mine = offsets[a];
      mine.reserve(per);
      for (std::uint64_t i = 0; i < per; ++i) {
        const auto pos = s.append("one", (a << 32) | i);
        mine.push_back(pos.partition == part ? pos.offset : ~std::uint64_t{0});
      }
    });
  for (auto& t : threads) t.join();

  std::vector<int> offset_seen(total, 0);
  std::uint64_t bad_offsets = 0;
  for (const auto& v : offsets)
    for (const auto o : v) {
      if (o >= total) ++bad_offsets;
      else ++offset_seen[o];
    }
  CHECK(bad_offsets == 0);
  CHECK(std::count(offset_seen.begin(), offset_seen.end(), 1) == static_cast<std::ptrdiff_t>(total));
  REQUIRE(s.end_offset(part) == total);

  std::vector<std::uint64_t> next(appenders, 0);  // per appender, values arrive in its own order
  std::uint64_t count = 0;
  std::uint64_t sum = 0;
  std::uint64_t out_of_order = 0;
  std::uint64_t wrong_keys = 0;
  for (std::uint64_t o = 0; o < total;) {
    auto r = s.read(part, o, 1000);
    REQUIRE(r.ok());
    REQUIRE_FALSE(r.records.empty());
    for (const auto& rec : r.records) {
      const auto a = rec.value >> 32;
      const auto i = rec.value & 0xffffffffu;
      REQUIRE(a < appenders);
      if (i != next[a]) ++out_of_order;
      next[a] = i + 1;
      if (rec.key != "one") ++wrong_keys;
      ++count;
      sum += rec.value;
    }
    o += r.records.size();
  }
  std::uint64_t expected_sum = 0;
  for (std::uint64_t a = 0; a < appenders; ++a)
    for (std::uint64_t i = 0; i < per; ++i) expected_sum += (a << 32) | i;
  CHECK(count == total);
  CHECK(sum == expected_sum);
  CHECK(out_of_order == 0);
  CHECK(wrong_keys == 0);
}

TEST_CASE("a stream without retention limits keeps every record across chunk boundaries", "[stream]") {
  postbox::stream<std::uint64_t> s(1);
  const std::uint64_t n = 3 * 256 + 17;
  for (std::uint64_t i = 0; i < n; ++i) REQUIRE(s.append("k", i * 3).offset == i);
  s.trim();
  CHECK(s.earliest_offset(0) == 0);
  CHECK(s.end_offset(0) == n);
  auto r = s.read(0, 0, n);
  REQUIRE(r.ok());
  REQUIRE(r.records.size() == n);
  for (std::uint64_t i = 0; i < n; ++i) CHECK(r.records[i].value == i * 3);
}

TEST_CASE("a count limit still trims on append once limits are set", "[stream]") {
  postbox::stream<int> s(1, postbox::retention{.max_count = 300});
  for (int i = 0; i < 1000; ++i) (void)s.append("k", i);
  CHECK(s.earliest_offset(0) == 700);
  auto r = s.read(0, 699, 1);
  CHECK(r.status == postbox::errc::out_of_range);
  CHECK(r.earliest == 700);
}

TEST_CASE("the append lock excludes and wakes parked threads: a plain counter incremented under it ends exact", "[stream][stress]") {
  // Every 16th critical section is long (tens of thousands of instructions),
  // so waiters exhaust their spins and park (about 40 parks a run on 2 cores,
  // counted with a temporary probe) while the holder
  // releases with a plain store: a lost wake-up would hang here (the test's
  // timeout), a missing exclusion would lose increments (and TSan would
  // report the race on `counter`).
  constexpr int threads = 4;
  const std::uint64_t per = postbox_test::scaled(50000);
  postbox::detail::stream_append_lock lock;
  std::uint64_t counter = 0;   // guarded by lock
  std::uint64_t checksum = 0;  // guarded by lock
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (std::uint64_t i = 0; i < per; ++i) {
        std::lock_guard guard(lock);
        ++counter;
        checksum += static_cast<std::uint64_t>(t) * per + i;
        if (i % 16 == 0) {
          volatile std::uint64_t spin = 0;
          for (int k = 0; k < 20000; ++k) spin = spin + 1;
        }
      }
    });
  for (auto& th : ts) th.join();
  const std::uint64_t total = threads * per;
  CHECK(counter == total);
  CHECK(checksum == total * (total - 1) / 2);
}

TEST_CASE("appenders racing on one partition stamp timestamps that never decrease along its offsets", "[stream][stress]") {
  // The clock is read before the append lock is taken, so a thread can hold
  // an earlier time than the record the lock lets in before it; the clamp
  // under the lock must still keep timestamps non-decreasing. Checksum: every
  // value reads back once, and every timestamp is one the clock handed out.
  constexpr std::uint64_t appenders = 4;
  const std::uint64_t per = postbox_test::scaled(20000);
  const std::uint64_t total = appenders * per;
  ticking_clock clk;
  postbox::stream<std::uint64_t> s(1, {}, clk);
  std::atomic<std::uint64_t> ready{0};
  std::vector<std::thread> threads;
  for (std::uint64_t a = 0; a < appenders; ++a)
    threads.emplace_back([&, a] {
      // Start together, so the appends overlap instead of running one thread after another.
      ready.fetch_add(1);
      while (ready.load() < appenders) std::this_thread::yield();
      for (std::uint64_t i = 0; i < per; ++i) (void)s.append("k", a * per + i);
    });
  for (auto& t : threads) t.join();
  REQUIRE(s.end_offset(0) == total);
  const auto last_read = clk.reads();
  std::uint64_t decreasing = 0;
  std::uint64_t out_of_clock = 0;
  std::uint64_t count = 0;
  std::uint64_t sum = 0;
  std::int64_t prev = 0;
  for (std::uint64_t o = 0; o < total;) {
    auto r = s.read(0, o, 1000);
    REQUIRE(r.ok());
    REQUIRE_FALSE(r.records.empty());
    for (const auto& rec : r.records) {
      const auto ts = rec.timestamp.time_since_epoch().count();
      if (ts < prev) ++decreasing;
      if (ts < 1 || ts > last_read) ++out_of_clock;
      prev = ts;
      ++count;
      sum += rec.value;
    }
    o += r.records.size();
  }
  CHECK(decreasing == 0);
  CHECK(out_of_clock == 0);
  CHECK(count == total);
  CHECK(sum == total * (total - 1) / 2);
}

namespace {

// The first read (the overtaken appender's) returns 1 and then holds its
// thread until released; every later read returns 2. (An append that read
// its clock under the append lock would hang here, the test's timeout.)
class gate_clock final : public postbox::clock {
 public:
  [[nodiscard]] postbox::time_point now() const noexcept override {
    if (calls_.fetch_add(1) == 0) {
      first_read_.store(true);
      while (!released_.load()) std::this_thread::yield();
      return postbox::time_point(postbox::duration(1));
    }
    return postbox::time_point(postbox::duration(2));
  }
  void wait_until(std::unique_lock<std::mutex>&, std::condition_variable&, postbox::time_point) const override {}
  [[nodiscard]] bool first_read() const noexcept { return first_read_.load(); }
  void release() noexcept { released_.store(true); }

 private:
  mutable std::atomic<int> calls_{0};
  mutable std::atomic<bool> first_read_{false};
  std::atomic<bool> released_{false};
};

}  // namespace

TEST_CASE("an append overtaken between its clock read and the lock takes the later timestamp of the append before it", "[stream]") {
  gate_clock clk;
  postbox::stream<int> s(1, {}, clk);
  std::thread overtaken([&] { (void)s.append("k", 1); });  // reads time 1, then waits
  while (!clk.first_read()) std::this_thread::yield();
  CHECK(s.append("k", 2).offset == 0);  // reads time 2 and appends first
  clk.release();
  overtaken.join();
  auto r = s.read(0, 0, 2);
  REQUIRE(r.records.size() == 2);
  CHECK(r.records[0].value == 2);
  CHECK(r.records[1].value == 1);
  CHECK(r.records[0].timestamp == postbox::time_point(postbox::duration(2)));
  CHECK(r.records[1].timestamp == postbox::time_point(postbox::duration(2)));  // clamped, not 1
}

TEST_CASE("the append lock is biased to the first thread that takes it until another thread takes it", "[stream]") {
  postbox::detail::stream_append_lock lock;
  CHECK_FALSE(lock.biased_approx());  // nobody took it yet
  { std::lock_guard guard(lock); }
  if (!postbox::detail::stream_append_lock::bias_supported()) {
    // No membarrier: every lock takes the CAS word, never a bias.
    CHECK_FALSE(lock.biased_approx());
    return;
  }
  CHECK(lock.biased_approx());  // claimed by this thread
  { std::lock_guard guard(lock); }  // the owner's biased path, again
  CHECK(lock.biased_approx());
  std::thread other([&] { std::lock_guard guard(lock); });
  other.join();
  CHECK_FALSE(lock.biased_approx());  // revoked for good
  { std::lock_guard guard(lock); }  // the former owner now takes the CAS word
  CHECK_FALSE(lock.biased_approx());
}

namespace {
struct biased_box {
  postbox::detail::stream_append_lock lock;
  std::uint64_t counter = 0;  // guarded by lock
  std::uint64_t sum = 0;      // guarded by lock
  bool claimed = false;       // written by the owner thread only
};
}  // namespace

TEST_CASE("a thread revoking the append lock's bias while its owner is inside still excludes: counters end exact", "[stream][stress]") {
  // Each round has a fresh lock: the owner takes it first (so it is biased
  // to the owner), then both threads hammer it, so the other thread's first
  // lock() revokes the bias while the owner runs its biased critical
  // sections. Some of the owner's sections are long (tens of thousands of
  // instructions), so the revoking thread exhausts its spin and parks until
  // the owner's release wakes it (a lost wake-up hangs: the test's timeout).
  // A missing exclusion loses increments (and TSan reports the race).
  const std::size_t rounds = static_cast<std::size_t>(postbox_test::scaled(300));
  constexpr std::uint64_t per = 200;
  std::vector<biased_box> boxes(rounds);
  std::atomic<std::size_t> claimed{0};  // rounds whose lock the owner holds biased; release/acquire hand-off
  std::thread owner([&] {
    for (std::size_t r = 0; r < rounds; ++r) {
      auto& b = boxes[r];
      {
        std::lock_guard guard(b.lock);
        b.claimed = b.lock.biased_approx();
        claimed.store(r + 1, std::memory_order_release);
        ++b.counter;
        volatile std::uint64_t spin = 0;  // long: the other thread's revoke waits for it
        for (int k = 0; k < 20000; ++k) spin = spin + 1;
      }
      for (std::uint64_t i = 0; i < per; ++i) {
        std::lock_guard guard(b.lock);
        ++b.counter;
        b.sum += i;
        if (i % 64 == 0) {
          volatile std::uint64_t spin = 0;
          for (int k = 0; k < 20000; ++k) spin = spin + 1;
        }
      }
    }
  });
  std::thread other([&] {
    for (std::size_t r = 0; r < rounds; ++r) {
      while (claimed.load(std::memory_order_acquire) <= r) std::this_thread::yield();
      auto& b = boxes[r];
      for (std::uint64_t i = 0; i < per; ++i) {
        std::lock_guard guard(b.lock);
        ++b.counter;
        b.sum += per + i;
      }
    }
  });
  owner.join();
  other.join();
  std::size_t claimed_rounds = 0;
  std::size_t exact = 0;
  std::size_t still_biased = 0;
  for (auto& b : boxes) {
    claimed_rounds += b.claimed ? 1 : 0;
    exact += (b.counter == 2 * per + 1 && b.sum == (2 * per) * (2 * per - 1) / 2) ? 1 : 0;
    still_biased += b.lock.biased_approx() ? 1 : 0;
  }
  // every round began biased to the owner (where locks are biased at all)
  CHECK(claimed_rounds == (postbox::detail::stream_append_lock::bias_supported() ? rounds : 0));
  CHECK(exact == rounds);           // nothing lost, nothing counted twice
  CHECK(still_biased == 0);         // every round's lock was revoked
}

TEST_CASE("appends from a second thread after a first thread's keep every record once", "[stream][stress]") {
  // The first appender owns the partition lock's bias; a second appender
  // revokes it mid-stream while the first keeps appending. Checksum: every
  // value reads back once, offsets dense.
  const std::uint64_t per = postbox_test::scaled(40000);
  postbox::stream<std::uint64_t> s(1);
  std::atomic<bool> first_done{false};
  std::thread first([&] {
    for (std::uint64_t i = 0; i < per; ++i) {
      (void)s.append("k", i);
      if (i == per / 4) first_done.store(true, std::memory_order_release);
    }
  });
  while (!first_done.load(std::memory_order_acquire)) std::this_thread::yield();
  for (std::uint64_t i = 0; i < per; ++i) (void)s.append("k", per + i);
  first.join();
  REQUIRE(s.end_offset(0) == 2 * per);
  std::uint64_t sum = 0;
  std::uint64_t count = 0;
  std::uint64_t misplaced = 0;
  while (count < 2 * per) {
    auto r = s.read(0, count, 4096);
    REQUIRE(r.ok());
    REQUIRE_FALSE(r.records.empty());
    for (const auto& rec : r.records) {
      misplaced += rec.pos.offset == count ? 0 : 1;
      sum += rec.value;
      ++count;
    }
  }
  CHECK(misplaced == 0);
  CHECK(count == 2 * per);
  CHECK(sum == (2 * per) * (2 * per - 1) / 2);
}
