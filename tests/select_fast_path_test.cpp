// SPDX-License-Identifier: MIT
// Tests of postbox::select's first pass: a ready case completes without an allocation, a clock read or a waker.
//
// This file is its own test executable: it replaces the global operator new
// to count this thread's allocations, which would disturb other test files.
#include <postbox/select.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "counting_new.hpp"
#include "support.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>

using counting_new::allocations;

using namespace std::chrono_literals;
using postbox::after;
using postbox::on_receive;
using postbox::on_send;
using postbox::select_status;

namespace {

/// A manual clock that counts how often it is read.
class counting_clock final : public postbox::clock {
 public:
  [[nodiscard]] postbox::time_point now() const noexcept override {
    reads.fetch_add(1, std::memory_order_relaxed);  // relaxed: a test counter, read by this thread
    return inner.now();
  }
  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  postbox::time_point deadline) const override {
    inner.wait_until(lock, cv, deadline);
  }
  mutable std::atomic<int> reads{0};
  postbox::manual_clock inner;
};

}  // namespace

TEST_CASE("the allocation counter of this file counts allocations", "[select]") {
  const std::size_t before = allocations;
  // A call of the function, not a new-expression, which the optimizer may elide.
  void* p = ::operator new(sizeof(int));
  CHECK(allocations == before + 1);
  ::operator delete(p);
}

TEST_CASE("a select over ready channels allocates nothing", "[select]") {
  postbox::channel<int> a(8);
  postbox::channel<int, postbox::spsc> b(8);
  for (int i = 0; i < 4; ++i) {
    REQUIRE(a.try_send(i) == postbox::send_status::ok);
    REQUIRE(b.try_send(i) == postbox::send_status::ok);
  }
  int sum = 0;
  const std::size_t before = allocations;
  for (int i = 0; i < 8; ++i) {
    const auto r = postbox::select(on_receive(a, [&](int v) { sum += v; }), on_receive(b, [&](int v) { sum += v; }),
                                   after(1h, [] {}));
    REQUIRE(r.status == select_status::ok);
  }
  CHECK(allocations == before);
  CHECK(sum == 2 * (0 + 1 + 2 + 3));
}

TEST_CASE("a select whose case is ready does not read its clock", "[select]") {
  counting_clock clk;
  postbox::channel<int> a(4);
  postbox::channel<int> room(4);
  REQUIRE(a.try_send(5) == postbox::send_status::ok);
  int got = 0;
  const postbox::select_options opts{.clock = &clk, .deadline = clk.now() + 1s};
  clk.reads.store(0);
  auto r = postbox::select(opts, on_receive(a, [&](int v) { got = v; }), after(1s, [] {}));
  CHECK(r.status == select_status::ok);
  CHECK(r.index == 0);
  CHECK(got == 5);
  int value = 9;
  r = postbox::select(opts, on_send(room, value, [] {}), after(1s, [] {}));
  CHECK(r.index == 0);
  CHECK(room.try_receive() == 9);
  CHECK(clk.reads.load() == 0);
}

TEST_CASE("try_select fires an after case only if its delay is not positive", "[select]") {
  counting_clock clk;
  postbox::channel<int> a(4);
  const postbox::select_options opts{.clock = &clk};
  bool fired = false;
  CHECK(postbox::try_select(on_receive(a, [](int) {}), after(1ns, [&] { fired = true; })).status ==
        select_status::empty);
  CHECK_FALSE(fired);
  const auto r = postbox::try_select(on_receive(a, [](int) {}), after(0s, [&] { fired = true; }));
  CHECK(r.status == select_status::ok);
  CHECK(r.index == 1);
  CHECK(fired);
  // A blocking select with a zero delay completes on its first pass, too.
  fired = false;
  clk.reads.store(0);
  CHECK(postbox::select(opts, on_receive(a, [](int) {}), after(-1s, [&] { fired = true; })).index == 1);
  CHECK(fired);
  CHECK(clk.reads.load() == 0);
}

TEST_CASE("a select that waits measures its after case from its first clock read", "[select]") {
  counting_clock clk;
  postbox::channel<int> a(4);
  std::atomic<bool> fired{false};
  std::atomic<int> status{-1};
  std::thread selector([&] {
    const auto r = postbox::select(postbox::select_options{.clock = &clk}, on_receive(a, [](int) {}),
                                   after(3s, [&] { fired.store(true); }));
    status.store(static_cast<int>(r.index));
  });
  REQUIRE(postbox_test::eventually([&] { return clk.inner.waiters() == 1; }));
  CHECK(clk.reads.load() >= 1);  // it read the clock once nothing was ready
  clk.inner.advance(2s);
  REQUIRE(postbox_test::eventually([&] { return clk.inner.waiters() == 1; }));
  CHECK_FALSE(fired.load());
  clk.inner.advance(1s);
  selector.join();
  CHECK(fired.load());
  CHECK(status.load() == 1);
}
