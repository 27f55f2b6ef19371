// SPDX-License-Identifier: MIT
// Tests for waiting on postbox::stream: reader/group member poll_wait (blocking) and async_poll (coroutines).
#include <postbox/async.hpp>
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox_test::eventually;
using postbox_test::scaled;

namespace {

using reader_t = postbox::stream<int>::reader;

postbox::task<postbox::read_result<int>> poll_one(reader_t& r, std::size_t max, std::stop_token stop = {}) {
  co_return co_await postbox::async_poll(r, max, stop);
}

postbox::task<postbox::read_result<int>> poll_member(postbox::group_member<int>& m, std::size_t max,
                                                     std::stop_token stop = {}) {
  co_return co_await postbox::async_poll(m, max, stop);
}

template <class Task>
bool drive_until_done(postbox::run_queue& q, Task& t) {
  return eventually([&] {
    q.poll();
    return t.done();
  });
}

}  // namespace

TEST_CASE("a suspended stream reader resumes with the record an append adds", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(2, {}, clock);
  auto r = s.read_from();
  postbox::run_queue q;
  auto t = poll_one(r, 8);
  t.start(q);
  REQUIRE_FALSE(t.done());
  REQUIRE(q.size_approx() == 0);
  (void)s.append("k", 7);
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  auto res = t.get();
  REQUIRE(res.ok());
  REQUIRE(res.records.size() == 1);
  REQUIRE(res.records[0].value == 7);
  REQUIRE(r.poll().records.empty());  // the awaited poll advanced the reader
}

TEST_CASE("async_poll returns retained records without suspending or posting", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  (void)s.append("a", 1);
  (void)s.append("a", 2);
  auto r = s.read_from();
  postbox::run_queue q;
  auto t = poll_one(r, 8);
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(q.size_approx() == 0);
  REQUIRE(t.get().records.size() == 2);
}

TEST_CASE("a stop request cancels a suspended stream poll, which reads nothing", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto r = s.read_from();
  postbox::run_queue q;
  std::stop_source stop;
  auto t = poll_one(r, 8, stop.get_token());
  t.start(q);
  stop.request_stop();
  (void)s.append("a", 3);  // appended after the stop, before the resume: not read
  q.poll();
  REQUIRE(t.done());
  auto res = t.get();
  REQUIRE(res.status == postbox::errc::canceled);
  REQUIRE(res.records.empty());
  REQUIRE(r.position_of(0) == 0);
  REQUIRE(r.poll().records.size() == 1);
}

TEST_CASE("async_poll_until times out on a manual clock and reads nothing", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::stream<int> s(1, {}, clock);
  auto r = s.read_from();
  postbox::run_queue q;
  auto body = [](reader_t& rd, postbox::timer_service& ts) -> postbox::task<postbox::read_result<int>> {
    co_return co_await postbox::async_poll_until(rd, 4, ts, ts.get_clock().now() + 5s);
  };
  auto t = body(r, timers);
  t.start(q);
  clock.advance(4s);
  REQUIRE(timers.run_due() == 0);
  REQUIRE(q.poll() == 0);
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  q.poll();
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::timeout);
}

TEST_CASE("destroying the stream wakes a suspended reader with closed after it drained", "[async][stream]") {
  postbox::manual_clock clock;
  auto s = std::make_unique<postbox::stream<int>>(1, postbox::retention{}, clock);
  auto r = s->read_from();
  postbox::run_queue q;
  auto t = poll_one(r, 8);
  t.start(q);
  REQUIRE_FALSE(t.done());
  s.reset();
  q.poll();
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::closed);
}

TEST_CASE("a reader of a destroyed stream first gets the retained records, then closed", "[async][stream]") {
  postbox::manual_clock clock;
  auto s = std::make_unique<postbox::stream<int>>(1, postbox::retention{}, clock);
  (void)s->append("a", 1);
  auto r = s->read_from();
  s.reset();
  auto first = r.poll_wait(8);
  REQUIRE(first.ok());
  REQUIRE(first.records.size() == 1);
  REQUIRE(r.poll_wait(8).status == postbox::errc::closed);
}

TEST_CASE("a suspended group member resumes with an append to its partition", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto m = s.group("g").join();
  postbox::run_queue q;
  auto t = poll_member(m, 8);
  t.start(q);
  REQUIRE_FALSE(t.done());
  (void)s.append("k", 11);
  REQUIRE(drive_until_done(q, t));
  auto res = t.get();
  REQUIRE(res.records.size() == 1);
  REQUIRE(res.records[0].value == 11);
  REQUIRE(m.commit() == postbox::errc::ok);
}

TEST_CASE("a group member that left gets not_found from poll_wait and async_poll at once", "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto m = s.group("g").join();
  m.leave();
  REQUIRE(m.poll_wait(8).status == postbox::errc::not_found);
  postbox::run_queue q;
  auto t = poll_member(m, 8);
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::not_found);
}

TEST_CASE("a blocked poll_wait returns the record another thread appends", "[stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(4, {}, clock);
  auto r = s.read_from();
  std::atomic<bool> entered{false};
  postbox::read_result<int> got;
  std::thread waiter([&] {
    entered.store(true);
    got = r.poll_wait(8);
  });
  REQUIRE(eventually([&] { return entered.load(); }));
  (void)s.append("x", 5);
  waiter.join();
  REQUIRE(got.ok());
  REQUIRE(got.records.size() == 1);
  REQUIRE(got.records[0].value == 5);
}

TEST_CASE("a stop request ends a blocked poll_wait with canceled", "[stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto r = s.read_from();
  std::stop_source stop;
  std::atomic<bool> entered{false};
  postbox::read_result<int> got;
  std::thread waiter([&] {
    entered.store(true);
    got = r.poll_wait(8, stop.get_token());
  });
  REQUIRE(eventually([&] { return entered.load(); }));
  stop.request_stop();
  waiter.join();
  REQUIRE(got.status == postbox::errc::canceled);
  REQUIRE(got.records.empty());
}

TEST_CASE("poll_wait with a passed deadline returns timeout when nothing is there", "[stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto r = s.read_from();
  auto m = s.group("g").join();
  const auto past = std::chrono::steady_clock::now() - 1s;
  REQUIRE(r.poll_wait(8, past).status == postbox::errc::timeout);
  REQUIRE(m.poll_wait(8, past).status == postbox::errc::timeout);
  (void)s.append("a", 1);
  REQUIRE(r.poll_wait(8, past).records.size() == 1);
  REQUIRE(m.poll_wait(8, past).records.size() == 1);
}

TEST_CASE("a coroutine reader fed by an appender thread reads every record exactly once", "[async][stream][stress]") {
  postbox::stream<std::uint64_t> s(4);
  auto r = s.read_from();
  const std::uint64_t n = scaled(50000);
  postbox::run_queue q;
  std::uint64_t sum = 0;
  std::uint64_t count = 0;
  std::vector<std::uint64_t> last(s.partitions(), 0);
  bool in_order = true;
  auto body = [&]() -> postbox::task<void> {
    while (count < n) {
      auto res = co_await postbox::async_poll(r, 64);
      if (!res.ok()) co_return;
      for (const auto& rec : res.records) {
        if (rec.pos.offset + 1 <= last[rec.pos.partition]) in_order = false;
        last[rec.pos.partition] = rec.pos.offset + 1;
        sum += rec.value;
        ++count;
      }
    }
  };
  auto t = body();
  t.start(q);
  std::thread appender([&] {
    for (std::uint64_t i = 1; i <= n; ++i) (void)s.append(std::to_string(i % 13), i);
  });
  REQUIRE(drive_until_done(q, t));
  appender.join();
  t.get();
  REQUIRE(count == n);
  REQUIRE(sum == n * (n + 1) / 2);
  REQUIRE(in_order);
  REQUIRE(r.poll().records.empty());
}

TEST_CASE("destroying a frame suspended in async_poll withdraws it: a later append resumes nothing",
          "[async][stream]") {
  postbox::manual_clock clock;
  postbox::stream<int> s(1, {}, clock);
  auto r = s.read_from();
  postbox::run_queue q;
  {
    auto t = poll_one(r, 8);
    t.start(q);
    REQUIRE_FALSE(t.done());
  }  // the frame goes while suspended
  (void)s.append("a", 4);
  REQUIRE(q.size_approx() == 0);  // no registration left to post a resumption
  REQUIRE(r.poll().records.size() == 1);
}

TEST_CASE("destroying the stream ends a blocked poll_wait with closed", "[stream]") {
  postbox::manual_clock clock;
  auto s = std::make_unique<postbox::stream<int>>(2, postbox::retention{}, clock);
  auto m = s->group("g").join();
  std::atomic<bool> entered{false};
  postbox::read_result<int> got;
  std::thread waiter([&] {
    entered.store(true);
    got = m.poll_wait(8);
  });
  REQUIRE(eventually([&] { return entered.load(); }));
  s.reset();
  waiter.join();
  REQUIRE(got.status == postbox::errc::closed);
  REQUIRE(got.records.empty());
}
