// SPDX-License-Identifier: MIT
// Specification tests for postbox::select: one case completes, the others are untouched; fairness, timers, stop, close.
#include <postbox/select.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::after;
using postbox::on_receive;
using postbox::on_send;
using postbox::select_status;

TEST_CASE("select completes the one ready case and leaves the others untouched", "[select]") {
  postbox::channel<int> empty(4);
  postbox::channel<int> ready(4);
  postbox::channel<int> room(4);
  REQUIRE(ready.try_send(7) == postbox::send_status::ok);
  int got = 0;
  auto unsent = std::make_unique<int>(1);
  postbox::channel<std::unique_ptr<int>> full(1);
  REQUIRE(full.try_send(std::make_unique<int>(0)) == postbox::send_status::ok);
  const auto r = postbox::select(on_receive(empty, [&](int v) { got = -v; }),
                                 on_receive(ready, [&](int v) { got = v; }),
                                 on_send(full, std::move(unsent), [&] { got = -100; }));
  CHECK(r.status == select_status::ok);
  CHECK(r.index == 1);
  CHECK(got == 7);
  CHECK(ready.size_approx() == 0);
  CHECK(full.size_approx() == 1);
  REQUIRE(unsent);  // the send case that was not chosen did not move its value
  CHECK(*unsent == 1);
}

TEST_CASE("select rotates among ready cases so that none is starved", "[select]") {
  postbox::channel<int> a(64);
  postbox::channel<int> b(64);
  for (int i = 0; i < 20; ++i) {
    REQUIRE(a.try_send(i) == postbox::send_status::ok);
    REQUIRE(b.try_send(i) == postbox::send_status::ok);
  }
  int from_a = 0;
  int from_b = 0;
  for (int i = 0; i < 20; ++i) {
    REQUIRE(postbox::select(on_receive(a, [&](int) { ++from_a; }), on_receive(b, [&](int) { ++from_b; })).ok());
  }
  CHECK(from_a == 10);
  CHECK(from_b == 10);
}

TEST_CASE("select rotates among three and among five ready cases, each chosen in turn", "[select]") {
  // Up to four cases the first pass is unrolled, beyond that it is a loop:
  // both keep the round robin.
  std::vector<std::unique_ptr<postbox::channel<int>>> chans;
  for (int c = 0; c < 5; ++c) {
    chans.push_back(std::make_unique<postbox::channel<int>>(64));
    for (int i = 0; i < 20; ++i) REQUIRE(chans.back()->try_send(i) == postbox::send_status::ok);
  }
  int from[5] = {0, 0, 0, 0, 0};
  auto take = [&](int c) { return on_receive(*chans[static_cast<std::size_t>(c)], [&from, c](int) { ++from[c]; }); };
  for (int i = 0; i < 15; ++i) REQUIRE(postbox::select(take(0), take(1), take(2)).ok());
  CHECK(from[0] == 5);
  CHECK(from[1] == 5);
  CHECK(from[2] == 5);
  for (int& f : from) f = 0;
  for (int i = 0; i < 20; ++i) REQUIRE(postbox::select(take(0), take(1), take(2), take(3), take(4)).ok());
  for (int f : from) CHECK(f == 4);
}

TEST_CASE("a case passed as an lvalue keeps its handler's state when the select waits", "[select]") {
  // A temporary case may be copied into the select's waiting part; a named
  // one is used in place, so its handler's own state carries over.
  postbox::manual_clock clk;
  postbox::channel<int> a(4);
  std::atomic<int> seen{0};
  auto c = on_receive(a, [n = 0, &seen](int) mutable { seen.store(++n); });
  const postbox::select_options opts{.clock = &clk};
  REQUIRE(a.try_send(1) == postbox::send_status::ok);
  REQUIRE(postbox::select(opts, c).ok());  // first pass
  CHECK(seen.load() == 1);
  std::thread selector([&] { (void)postbox::select(opts, c); });  // waits: the channel is empty
  REQUIRE(postbox_test::eventually([&] { return clk.waiters() == 1; }));
  REQUIRE(a.try_send(2) == postbox::send_status::ok);
  selector.join();
  CHECK(seen.load() == 2);
  REQUIRE(a.try_send(3) == postbox::send_status::ok);
  REQUIRE(postbox::select(opts, c).ok());
  CHECK(seen.load() == 3);  // the waiting select ran c's own handler, not a copy
}

TEST_CASE("select wakes when a message arrives on any of its channels", "[select]") {
  postbox::channel<int> a(4);
  postbox::channel<int, postbox::spsc> b(4);
  std::atomic<int> got{0};
  std::atomic<bool> entered{false};
  std::thread selector([&] {
    entered.store(true);
    const auto r = postbox::select(on_receive(a, [&](int v) { got.store(v); }), on_receive(b, [&](int v) { got.store(v); }));
    if (r.index != 1 || !r.ok()) got.store(-1);
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  REQUIRE(b.send(42) == postbox::send_status::ok);
  selector.join();
  CHECK(got.load() == 42);
}

TEST_CASE("a send case waits for room and sends only the chosen value", "[select]") {
  postbox::channel<int> out(1);
  REQUIRE(out.try_send(1) == postbox::send_status::ok);
  std::atomic<bool> sent{false};
  int value = 2;
  std::thread selector([&] {
    (void)postbox::select(on_send(out, value, [&] { sent.store(true); }));
  });
  CHECK(out.receive() == 1);
  selector.join();
  CHECK(sent.load());
  CHECK(out.try_receive() == 2);
}

TEST_CASE("a receive case on a closed and drained channel completes with closed", "[select]") {
  postbox::channel<int> open(4);
  postbox::channel<int> closing(4);
  REQUIRE(closing.try_send(1) == postbox::send_status::ok);
  closing.close();
  int got = 0;
  auto r = postbox::select(on_receive(open, [&](int) { got = -1; }), on_receive(closing, [&](int v) { got = v; }));
  CHECK(r.ok());  // the queued message first
  CHECK(got == 1);
  r = postbox::select(on_receive(open, [&](int) { got = -1; }), on_receive(closing, [&](int v) { got = v; }));
  CHECK(r.status == select_status::closed);
  CHECK(r.index == 1);
  CHECK(got == 1);
}

TEST_CASE("a send case on a closed channel completes with closed and keeps the value", "[select]") {
  postbox::channel<std::string> ch(4);
  ch.close();
  std::string value = "kept";
  const auto r = postbox::try_select(on_send(ch, std::move(value), [] {}));
  CHECK(r.status == select_status::closed);
  CHECK(value == "kept");
}

TEST_CASE("try_select returns empty when no case is ready", "[select]") {
  postbox::channel<int> a(4);
  const auto r = postbox::try_select(on_receive(a, [](int) {}));
  CHECK(r.status == select_status::empty);
}

TEST_CASE("an after case fires when the select's clock reaches its delay", "[select]") {
  postbox::manual_clock clk;
  postbox::channel<int> a(4);
  std::atomic<bool> fired{false};
  std::atomic<int> index{-1};
  std::thread selector([&] {
    const auto r = postbox::select(postbox::select_options{.clock = &clk}, on_receive(a, [](int) {}),
                                   after(5s, [&] { fired.store(true); }));
    index.store(static_cast<int>(r.index));
  });
  REQUIRE(postbox_test::eventually([&] { return clk.waiters() == 1; }));
  clk.advance(4s);
  CHECK_FALSE(fired.load());
  REQUIRE(postbox_test::eventually([&] { return clk.waiters() == 1; }));
  clk.advance(1s);
  selector.join();
  CHECK(fired.load());
  CHECK(index.load() == 1);
}

TEST_CASE("a select's deadline ends it with timeout on its clock", "[select]") {
  postbox::manual_clock clk;
  postbox::channel<int> a(4);
  std::atomic<int> status{-1};
  std::thread selector([&] {
    const auto r =
        postbox::select(postbox::select_options{.clock = &clk, .deadline = clk.now() + 10s}, on_receive(a, [](int) {}));
    status.store(static_cast<int>(r.status));
  });
  REQUIRE(postbox_test::eventually([&] { return clk.waiters() == 1; }));
  clk.advance(10s);
  selector.join();
  CHECK(status.load() == static_cast<int>(select_status::timeout));
  CHECK(a.try_send(1) == postbox::send_status::ok);  // nothing was consumed or broken
}

TEST_CASE("a select's stop token ends it with canceled and consumes nothing", "[select]") {
  postbox::channel<int> a(4);
  std::stop_source stop;
  std::atomic<int> status{-1};
  std::atomic<bool> entered{false};
  std::thread selector([&] {
    entered.store(true);
    const auto r = postbox::select(postbox::select_options{.stop = stop.get_token()}, on_receive(a, [](int) {}));
    status.store(static_cast<int>(r.status));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  stop.request_stop();
  selector.join();
  CHECK(status.load() == static_cast<int>(select_status::canceled));
}

TEST_CASE("a ticker fires once per period and drops ticks nobody received", "[select]") {
  postbox::manual_clock clk;
  auto tk = postbox::tick(1s, clk);
  CHECK_FALSE(tk.try_receive());
  clk.advance(1s);
  auto first = tk.try_receive();
  REQUIRE(first);
  CHECK(*first == postbox::manual_clock::default_start + 1s);
  CHECK_FALSE(tk.try_receive());
  clk.advance(3500ms);  // ticks at 2 s, 3 s and 4 s are due: one is delivered
  auto late = tk.try_receive();
  REQUIRE(late);
  CHECK(*late == postbox::manual_clock::default_start + 4s);
  CHECK_FALSE(tk.try_receive());
  CHECK(tk.next() == postbox::manual_clock::default_start + 5s);
}

TEST_CASE("a tick case completes a select when the ticker is due", "[select]") {
  postbox::manual_clock clk;
  auto tk = postbox::tick(2s, clk);
  postbox::channel<int> a(4);
  std::atomic<bool> ticked{false};
  std::thread selector([&] {
    (void)postbox::select(postbox::select_options{.clock = &clk}, on_receive(a, [](int) {}),
                          on_receive(tk, [&](postbox::time_point) { ticked.store(true); }));
  });
  REQUIRE(postbox_test::eventually([&] { return clk.waiters() == 1; }));
  clk.advance(2s);
  selector.join();
  CHECK(ticked.load());
}

TEST_CASE("a select over a topic subscription receives its deliveries", "[select]") {
  postbox::topic<std::string> t;
  auto sub = t.subscribe();
  postbox::channel<int> other(4);
  std::string got;
  std::thread publisher([&] { (void)t.publish("hello"); });
  const auto r = postbox::select(on_receive(other, [](int) {}),
                                 on_receive(sub, [&](postbox::delivery<std::string> d) { got = *d; }));
  publisher.join();
  CHECK(r.ok());
  CHECK(r.index == 1);
  CHECK(got == "hello");
}

TEST_CASE("resetting a subscription wakes a select waiting on it with closed", "[select][teardown]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  postbox::channel<int> other(4);
  std::atomic<int> status{-1};
  std::thread selector([&] {
    const auto r = postbox::select(on_receive(other, [](int) {}), on_receive(sub, [](postbox::delivery<int>) {}));
    status.store(static_cast<int>(r.status));
  });
  REQUIRE(postbox_test::eventually([&] { return sub.blocked_receivers_approx() == 1; }));
  sub.reset();  // waits for the select to leave the handle
  selector.join();
  CHECK(status.load() == static_cast<int>(select_status::closed));
}

TEST_CASE("closing a channel wakes a select waiting on it with closed", "[select][teardown]") {
  postbox::channel<int> a(4);
  postbox::channel<int, postbox::spsc> b(4);
  std::atomic<int> index{-1};
  std::atomic<bool> entered{false};
  std::thread selector([&] {
    entered.store(true);
    const auto r = postbox::select(on_receive(a, [](int) {}), on_receive(b, [](int) {}));
    if (r.status == select_status::closed) index.store(static_cast<int>(r.index));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  b.close();
  selector.join();
  CHECK(index.load() == 1);
}
