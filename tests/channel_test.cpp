// SPDX-License-Identifier: MIT
// Specification tests for postbox::channel and its sender/receiver endpoints.
// Lets a test hold a sender between its open check and its publish.
#define POSTBOX_CHANNEL_TEST_HOOKS 1
#include <postbox/channel.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#  include <pthread.h>
#  include <sched.h>
#endif

using postbox::channel;
using postbox::receive_status;
using postbox::send_status;
using namespace std::chrono_literals;

namespace {

// Records the address of every live instance, so leaks and double
// destruction fail the test that caused them.
struct tracked {
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<const tracked*>& live() {
    static std::set<const tracked*> s;
    return s;
  }
  static std::size_t count() {
    std::lock_guard g(mutex());
    return live().size();
  }
  explicit tracked(int v) : value(v) { add(); }
  tracked(const tracked& o) : value(o.value) { add(); }
  tracked(tracked&& o) noexcept : value(o.value) { add(); }
  tracked& operator=(const tracked&) = default;
  ~tracked() {
    std::lock_guard g(mutex());
    if (live().erase(this) != 1) std::abort();  // destroyed twice or never built
  }
  void add() {
    std::lock_guard g(mutex());
    if (!live().insert(this).second) std::abort();
  }
  int value;
};

// Move-only and without a default constructor.
struct move_only {
  explicit move_only(int v) : value(std::make_unique<int>(v)) {}
  move_only(move_only&&) noexcept = default;
  move_only& operator=(move_only&&) noexcept = default;
  std::unique_ptr<int> value;
};

}  // namespace

// --- compile-time contracts -----------------------------------------------------

static_assert(noexcept(std::declval<channel<int>&>().try_send(1)), "try_send of a nothrow type is noexcept");
static_assert(noexcept(std::declval<channel<int>&>().try_receive()), "try_receive is noexcept");
static_assert(!noexcept(std::declval<channel<std::string>&>().try_send(std::declval<const char*>())),
              "a conversion that may throw makes try_send potentially throwing");
static_assert(!std::is_copy_constructible_v<channel<int>>, "channels are not copyable");
static_assert(std::is_copy_constructible_v<postbox::sender<int, postbox::mpmc>>, "multi-producer senders copy");
static_assert(!std::is_copy_constructible_v<postbox::sender<int, postbox::spsc>>, "a single producer is unique");
static_assert(!std::is_copy_constructible_v<postbox::receiver<int, postbox::mpsc>>, "a single consumer is unique");
static_assert(std::is_copy_constructible_v<postbox::receiver<int, postbox::spmc>>, "multi-consumer receivers copy");
static_assert(std::is_move_constructible_v<postbox::sender<int, postbox::spsc>>, "endpoints always move");

// --- construction ---------------------------------------------------------------

TEMPLATE_TEST_CASE("capacity is rounded up to a power of two and reported exactly", "[channel]", postbox::spsc,
                   postbox::mpsc, postbox::spmc, postbox::mpmc) {
  CHECK(channel<int, TestType>(1).capacity() == 1);
  CHECK(channel<int, TestType>(3).capacity() == 4);
  CHECK(channel<int, TestType>(1000).capacity() == 1024);
  CHECK(channel<int, TestType>(1024).capacity() == 1024);
}

TEST_CASE("a capacity of zero is rejected with invalid_argument", "[channel]") {
  try {
    channel<int> ch(0);
    FAIL("no exception");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::invalid_argument);
  }
}

// --- try_send / try_receive -------------------------------------------------------

TEMPLATE_TEST_CASE("try_send on a full channel returns full and keeps the message", "[channel]", postbox::spsc,
                   postbox::mpsc, postbox::spmc, postbox::mpmc) {
  channel<move_only, TestType> ch(2);
  REQUIRE(ch.try_send(move_only(1)) == send_status::ok);
  REQUIRE(ch.try_send(move_only(2)) == send_status::ok);
  move_only third(3);
  CHECK(ch.try_send(std::move(third)) == send_status::full);
  REQUIRE(third.value != nullptr);
  CHECK(*third.value == 3);
}

TEMPLATE_TEST_CASE("try_send on a closed channel returns closed and keeps the message", "[channel]",
                   postbox::spsc, postbox::mpsc, postbox::spmc, postbox::mpmc) {
  channel<move_only, TestType> ch(4);
  ch.close();
  move_only m(7);
  CHECK(ch.try_send(std::move(m)) == send_status::closed);
  REQUIRE(m.value != nullptr);
  CHECK(*m.value == 7);
}

TEMPLATE_TEST_CASE("messages come out in the order they went in", "[channel]", postbox::spsc, postbox::mpsc,
                   postbox::spmc, postbox::mpmc) {
  channel<int, TestType> ch(8);
  for (int i = 0; i < 8; ++i) REQUIRE(ch.try_send(i) == send_status::ok);
  for (int i = 0; i < 8; ++i) {
    auto v = ch.try_receive();
    REQUIRE(v);
    CHECK(*v == i);
  }
}

TEMPLATE_TEST_CASE("try_receive on an empty channel returns nothing and says empty", "[channel]", postbox::spsc,
                   postbox::mpsc, postbox::spmc, postbox::mpmc) {
  channel<int, TestType> ch(4);
  CHECK_FALSE(ch.try_receive());
  CHECK(ch.try_receive_result().status() == receive_status::empty);
}

TEST_CASE("a capacity-one channel alternates between full and empty", "[channel]") {
  channel<int> ch(1);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(ch.try_send(i) == send_status::ok);
    CHECK(ch.try_send(99) == send_status::full);
    auto v = ch.try_receive();
    REQUIRE(v);
    CHECK(*v == i);
    CHECK_FALSE(ch.try_receive());
  }
}

TEST_CASE("try_emplace constructs the message in place", "[channel]") {
  channel<std::pair<int, std::string>> ch(2);
  REQUIRE(ch.try_emplace(1, "one") == send_status::ok);
  auto v = ch.try_receive();
  REQUIRE(v);
  CHECK(v->first == 1);
  CHECK(v->second == "one");
}

TEST_CASE("a message type without a default constructor travels", "[channel]") {
  channel<move_only, postbox::spsc> ch(2);
  REQUIRE(ch.try_send(move_only(5)) == send_status::ok);
  auto v = ch.try_receive();
  REQUIRE(v);
  CHECK(*v->value == 5);
}

// --- close ----------------------------------------------------------------------

TEMPLATE_TEST_CASE("after close receivers drain what is queued and then see closed", "[channel]", postbox::spsc,
                   postbox::mpsc, postbox::spmc, postbox::mpmc) {
  channel<int, TestType> ch(4);
  REQUIRE(ch.try_send(1) == send_status::ok);
  REQUIRE(ch.try_send(2) == send_status::ok);
  ch.close();
  CHECK(ch.is_closed());
  CHECK(ch.receive() == std::optional<int>(1));
  CHECK(ch.receive() == std::optional<int>(2));
  CHECK_FALSE(ch.receive());
  CHECK(ch.try_receive_result().status() == receive_status::closed);
}

TEST_CASE("close is idempotent", "[channel]") {
  channel<int> ch(2);
  ch.close();
  ch.close();
  CHECK(ch.is_closed());
  CHECK(ch.try_send(1) == send_status::closed);
}

TEMPLATE_TEST_CASE("close wakes a receiver parked on an empty channel", "[channel]", postbox::spsc, postbox::mpsc,
                   postbox::spmc, postbox::mpmc) {
  channel<int, TestType> ch(2);
  std::atomic<bool> returned{false};
  std::optional<int> got = 42;
  std::thread t([&] {
    got = ch.receive();
    returned = true;
  });
  // The receiver may or may not have parked yet; close must release it either way.
  ch.close();
  REQUIRE(postbox_test::eventually([&] { return returned.load(); }));
  t.join();
  CHECK_FALSE(got);
}

TEST_CASE("close wakes a sender blocked on a full channel with closed", "[channel]") {
  channel<int> ch(1);
  REQUIRE(ch.try_send(1) == send_status::ok);
  std::atomic<int> status{-1};
  std::thread t([&] { status = static_cast<int>(ch.send(2)); });
  ch.close();
  REQUIRE(postbox_test::eventually([&] { return status.load() != -1; }));
  t.join();
  CHECK(status.load() == static_cast<int>(send_status::closed));
  CHECK(ch.receive() == std::optional<int>(1));  // the queued one is still delivered
}

// --- blocking and timed operations -------------------------------------------------

TEST_CASE("send blocks while full and completes when a receiver makes room", "[channel]") {
  channel<int> ch(1);
  REQUIRE(ch.try_send(1) == send_status::ok);
  std::atomic<bool> sent{false};
  std::atomic<send_status> status{send_status::timeout};
  std::thread t([&] {
    status = ch.send(2);  // Catch2 assertions stay on the test's own thread
    sent = true;
  });
  CHECK(ch.receive() == std::optional<int>(1));
  REQUIRE(postbox_test::eventually([&] { return sent.load(); }));
  t.join();
  CHECK(status.load() == send_status::ok);
  CHECK(ch.receive() == std::optional<int>(2));
}

TEST_CASE("receive blocks while empty and returns the next message sent", "[channel]") {
  channel<std::string> ch(4);
  std::optional<std::string> got;
  std::thread t([&] { got = ch.receive(); });
  REQUIRE(ch.send(std::string("hello")) == send_status::ok);
  t.join();
  REQUIRE(got);
  CHECK(*got == "hello");
}

TEST_CASE("receive_for on an empty channel reports timeout, not closed", "[channel]") {
  channel<int> ch(2);
  CHECK(ch.receive_for(1ms).status() == receive_status::timeout);
  CHECK(ch.receive_until(std::chrono::system_clock::now()).status() == receive_status::timeout);
}

TEST_CASE("receive_for on a closed and drained channel reports closed", "[channel]") {
  channel<int> ch(2);
  ch.close();
  CHECK(ch.receive_for(1h).status() == receive_status::closed);
}

TEST_CASE("receive_for returns a queued message at once", "[channel]") {
  channel<int> ch(2);
  REQUIRE(ch.try_send(3) == send_status::ok);
  auto r = ch.receive_for(1h);
  REQUIRE(r.has_value());
  CHECK(*r == 3);
}

TEST_CASE("send_for on a full channel reports timeout and keeps the message", "[channel]") {
  channel<move_only> ch(1);
  REQUIRE(ch.try_send(move_only(1)) == send_status::ok);
  move_only m(2);
  CHECK(ch.send_for(std::move(m), 1ms) == send_status::timeout);
  REQUIRE(m.value != nullptr);
  CHECK(ch.send_until(std::move(m), std::chrono::steady_clock::now()) == send_status::timeout);
  CHECK(*m.value == 2);
}

TEST_CASE("send_for on a closed channel reports closed", "[channel]") {
  channel<int> ch(1);
  ch.close();
  CHECK(ch.send_for(1, 1h) == send_status::closed);
}

// --- batches --------------------------------------------------------------------------

TEST_CASE("try_send_batch sends the prefix that fits and says how many", "[channel]") {
  channel<int> ch(4);
  std::vector<int> in{1, 2, 3, 4, 5, 6};
  CHECK(ch.try_send_batch(in.begin(), in.end()) == 4);
  std::vector<int> out;
  CHECK(ch.try_receive_batch(std::back_inserter(out), 10) == 4);
  CHECK(out == std::vector<int>{1, 2, 3, 4});
}

TEST_CASE("try_receive_batch takes at most max messages", "[channel]") {
  channel<int> ch(8);
  for (int i = 0; i < 6; ++i) REQUIRE(ch.try_send(i) == send_status::ok);
  std::vector<int> out;
  CHECK(ch.try_receive_batch(std::back_inserter(out), 4) == 4);
  CHECK(out == std::vector<int>{0, 1, 2, 3});
  CHECK(ch.size_approx() == 2);
}

TEST_CASE("try_send_batch on a closed channel sends nothing", "[channel]") {
  channel<int> ch(4);
  ch.close();
  std::vector<int> in{1, 2};
  CHECK(ch.try_send_batch(in.begin(), in.end()) == 0);
}

// --- observers --------------------------------------------------------------------------

TEST_CASE("stats count sends, receives, depth and closing", "[channel]") {
  channel<int> ch(4);
  REQUIRE(ch.try_send(1) == send_status::ok);
  REQUIRE(ch.try_send(2) == send_status::ok);
  REQUIRE(ch.try_send(3) == send_status::ok);
  (void)ch.try_receive();
  auto s = ch.stats();
  CHECK(s.sent == 3);
  CHECK(s.received == 1);
  CHECK(s.depth == 2);
  CHECK(s.capacity == 4);
  CHECK_FALSE(s.closed);
  CHECK(ch.size_approx() == 2);
  ch.close();
  CHECK(ch.stats().closed);
}

// --- lifetime -------------------------------------------------------------------------

TEST_CASE("messages left in a channel are destroyed with it exactly once", "[channel]") {
  {
    channel<tracked> ch(4);
    REQUIRE(ch.try_send(tracked(1)) == send_status::ok);
    REQUIRE(ch.try_send(tracked(2)) == send_status::ok);
    REQUIRE(ch.try_send(tracked(3)) == send_status::ok);
    auto v = ch.try_receive();
    REQUIRE(v);
    CHECK(tracked::count() == 3);  // two queued, one received
  }
  CHECK(tracked::count() == 0);
}

TEST_CASE("the ticket counters wrap around without breaking FIFO", "[channel]") {
  channel<int, postbox::mpmc> ch(4, postbox::detail::initial_ticket{(std::uint64_t{1} << 63) - 5});
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 3; ++i) REQUIRE(ch.try_send(round * 10 + i) == send_status::ok);
    for (int i = 0; i < 3; ++i) CHECK(ch.try_receive() == std::optional<int>(round * 10 + i));
  }
  CHECK_FALSE(ch.try_receive());
  CHECK(ch.stats().sent == 15);
  CHECK(ch.stats().received == 15);
}

TEST_CASE("room_for(n) tells whether the next n sends have free slots, across the wrap", "[channel]") {
  // The hint a topic's `block` publisher polls while a subscription is full.
  using access = postbox::detail::channel_access;
  // The 63-bit tickets wrap between the second and the third send.
  channel<int, postbox::mpmc> ch(4, postbox::detail::initial_ticket{(std::uint64_t{1} << 63) - 2});
  CHECK(access::room_for(ch, 4));
  for (int i = 0; i < 4; ++i) REQUIRE(ch.try_send(i) == send_status::ok);
  CHECK_FALSE(access::room_for(ch, 1));
  REQUIRE(ch.try_receive() == std::optional<int>(0));
  CHECK(access::room_for(ch, 1));
  CHECK_FALSE(access::room_for(ch, 2));
  REQUIRE(ch.try_receive() == std::optional<int>(1));
  CHECK(access::room_for(ch, 2));
  CHECK_FALSE(access::room_for(ch, 3));
  REQUIRE(ch.try_send(4) == send_status::ok);
  CHECK(access::room_for(ch, 1));
  CHECK_FALSE(access::room_for(ch, 2));
}

TEST_CASE("spsc: messages left in the ring after its indices wrapped are destroyed with it exactly once",
          "[channel]") {
  {
    channel<tracked, postbox::spsc> ch(4, postbox::detail::initial_ticket{(std::uint64_t{1} << 63) - 3});
    for (int i = 0; i < 6; ++i) {
      REQUIRE(ch.try_send(tracked(i)) == send_status::ok);
      REQUIRE(ch.try_receive());
    }
    // Three queued in cells that straddle the end of the ring.
    for (int i = 0; i < 3; ++i) REQUIRE(ch.try_send(tracked(10 + i)) == send_status::ok);
    CHECK(ch.size_approx() == 3);
    CHECK(tracked::count() == 3);
  }
  CHECK(tracked::count() == 0);
}

TEST_CASE("spsc: a ring spanning many cache lines keeps FIFO, fills exactly and destroys what is left",
          "[channel]") {
  // 64 small cells over several cache lines, its indices past the wrap.
  {
    channel<tracked, postbox::spsc> ch(64, postbox::detail::initial_ticket{(std::uint64_t{1} << 63) - 40});
    int next_in = 0;
    int next_out = 0;
    for (int round = 0; round < 3; ++round) {
      while (ch.try_send(tracked(next_in)) == send_status::ok) ++next_in;
      CHECK(next_in - next_out == 64);
      for (int i = 0; i < 45; ++i) {
        auto v = ch.try_receive();
        REQUIRE(v);
        CHECK(v->value == next_out++);
      }
    }
    CHECK(ch.size_approx() == 19);
    CHECK(tracked::count() == 19);
  }
  CHECK(tracked::count() == 0);
}

TEST_CASE("spsc: FIFO, full, empty and stats hold across the wrap of its indices", "[channel]") {
  channel<int, postbox::spsc> ch(2, postbox::detail::initial_ticket{(std::uint64_t{1} << 63) - 3});
  for (int round = 0; round < 5; ++round) {
    REQUIRE(ch.try_send(round * 10) == send_status::ok);
    REQUIRE(ch.try_send(round * 10 + 1) == send_status::ok);
    CHECK(ch.try_send(-1) == send_status::full);
    CHECK(ch.stats().depth == 2);
    CHECK(ch.try_receive() == std::optional<int>(round * 10));
    CHECK(ch.try_receive() == std::optional<int>(round * 10 + 1));
    CHECK(ch.try_receive_result().status() == receive_status::empty);
  }
  CHECK(ch.stats().sent == 10);
  CHECK(ch.stats().received == 10);
  CHECK(ch.size_approx() == 0);
}

// --- endpoints ------------------------------------------------------------------------

TEST_CASE("the channel closes for receivers when the last sender is destroyed", "[channel][endpoint]") {
  auto [tx, rx] = postbox::make_channel<int>(4);
  {
    auto tx2 = tx;  // copies count as senders
    REQUIRE(tx2.try_send(1) == send_status::ok);
    { auto gone = std::move(tx); }
    CHECK_FALSE(rx.is_closed());
  }
  CHECK(rx.is_closed());
  CHECK(rx.receive() == std::optional<int>(1));
  CHECK_FALSE(rx.receive());
}

TEST_CASE("sends fail with closed once the last receiver is gone", "[channel][endpoint]") {
  auto [tx, rx] = postbox::make_channel<tracked, postbox::spsc>(4);
  REQUIRE(tx.try_send(tracked(1)) == send_status::ok);
  { auto gone = std::move(rx); }
  CHECK(tx.try_send(tracked(2)) == send_status::closed);
}

TEST_CASE("a moved-from endpoint does not close the channel", "[channel][endpoint]") {
  auto [tx, rx] = postbox::make_channel<int, postbox::spsc>(2);
  auto moved = std::move(tx);
  CHECK_FALSE(rx.is_closed());
  REQUIRE(moved.try_send(1) == send_status::ok);
  CHECK(rx.try_receive() == std::optional<int>(1));
}

// --- documented requirements and stop tokens ------------------------------

namespace {
/// Only what channel<T> documents it needs: nothrow move construction and
/// destruction. No copy, no assignment of any kind.
struct move_construct_only {
  explicit move_construct_only(int v) noexcept : value(v) {}
  move_construct_only(move_construct_only&& o) noexcept : value(o.value) {}
  move_construct_only(const move_construct_only&) = delete;
  move_construct_only& operator=(const move_construct_only&) = delete;
  move_construct_only& operator=(move_construct_only&&) = delete;
  ~move_construct_only() = default;
  int value;
};
}  // namespace

TEST_CASE("every receive form works for a type that is only move-constructible", "[channel]") {
  // Regression: receive, receive_for and receive_until reassigned a local
  // receive_result<T>, so they did not compile without move assignment.
  postbox::channel<move_construct_only> ch(4);
  REQUIRE(ch.try_send(move_construct_only(1)) == postbox::send_status::ok);
  REQUIRE(ch.send(move_construct_only(2)) == postbox::send_status::ok);
  REQUIRE(ch.send_for(move_construct_only(3), std::chrono::hours(1)) == postbox::send_status::ok);
  REQUIRE(ch.send_until(move_construct_only(4), std::chrono::steady_clock::now() + std::chrono::hours(1)) ==
          postbox::send_status::ok);
  auto a = ch.receive();
  auto b = ch.receive_for(std::chrono::hours(1));
  auto c = ch.receive_until(std::chrono::steady_clock::now() + std::chrono::hours(1));
  auto d = ch.try_receive();
  REQUIRE(a);
  REQUIRE(b.has_value());
  REQUIRE(c.has_value());
  REQUIRE(d);
  CHECK(a->value + b->value + c->value + d->value == 10);
  ch.close();
  CHECK(ch.receive_for(std::chrono::hours(1)).status() == postbox::receive_status::closed);
}

TEST_CASE("a receive whose stop token is stopped while it waits returns canceled and takes nothing",
          "[channel]") {
  postbox::channel<int> ch(4);
  std::stop_source stop;
  std::atomic<bool> entered{false};
  std::atomic<int> outcome{-1};
  std::thread receiver([&] {
    entered.store(true);
    outcome.store(static_cast<int>(ch.receive_for(std::chrono::hours(1), stop.get_token()).status()));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  stop.request_stop();
  receiver.join();
  CHECK(outcome.load() == static_cast<int>(postbox::receive_status::canceled));
  REQUIRE(ch.try_send(9) == postbox::send_status::ok);
  CHECK(ch.try_receive() == 9);
}

TEST_CASE("a receive with a token already stopped takes nothing, even when a message is queued", "[channel]") {
  postbox::channel<int> ch(4);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  std::stop_source stop;
  stop.request_stop();
  CHECK_FALSE(ch.receive(stop.get_token()));
  CHECK(ch.receive_until(std::chrono::steady_clock::now() + std::chrono::hours(1), stop.get_token()).status() ==
        postbox::receive_status::canceled);
  CHECK(ch.size_approx() == 1);
}

TEST_CASE("a send blocked on a full channel returns canceled when its token is stopped and keeps the value",
          "[channel]") {
  postbox::channel<std::unique_ptr<int>> ch(1);
  REQUIRE(ch.try_send(std::make_unique<int>(1)) == postbox::send_status::ok);
  std::stop_source stop;
  auto value = std::make_unique<int>(2);
  std::atomic<bool> entered{false};
  std::atomic<int> outcome{-1};
  std::thread sender([&] {
    entered.store(true);
    outcome.store(static_cast<int>(ch.send(std::move(value), stop.get_token())));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  stop.request_stop();
  sender.join();
  CHECK(outcome.load() == static_cast<int>(postbox::send_status::canceled));
  REQUIRE(value);  // not moved from
  CHECK(*value == 2);
  CHECK(ch.size_approx() == 1);
}

TEST_CASE("destroying the last sender endpoint wakes blocked receivers with closed", "[channel][teardown]") {
  auto [tx, rx] = postbox::make_channel<int>(4);
  auto rx2 = rx;
  std::atomic<int> closed_seen{0};
  std::vector<std::thread> receivers;
  for (auto* r : {&rx, &rx2}) {
    receivers.emplace_back([&closed_seen, r] {
      if (r->receive_for(std::chrono::hours(1)).status() == postbox::receive_status::closed) ++closed_seen;
    });
  }
  { auto gone = std::move(tx); }
  for (auto& t : receivers) t.join();
  CHECK(closed_seen.load() == 2);
}

TEST_CASE("destroying the last receiver endpoint wakes a sender blocked on a full channel with closed",
          "[channel][teardown]") {
  auto [tx, rx] = postbox::make_channel<int>(1);
  REQUIRE(tx.try_send(1) == postbox::send_status::ok);
  std::atomic<int> outcome{-1};
  std::thread sender([&, s = &tx] { outcome.store(static_cast<int>(s->send(2))); });
  { auto gone = std::move(rx); }
  sender.join();
  CHECK(outcome.load() == static_cast<int>(postbox::send_status::closed));
}

// --- the close hazard: a sender held between its open check and its publish --

namespace {
std::atomic<bool> g_sender_held{false};
std::atomic<bool> g_release_sender{false};
void hold_sender() {
  g_sender_held.store(true);
  while (!g_release_sender.load()) std::this_thread::yield();
}
struct hook_guard {
  hook_guard() {
    g_sender_held.store(false);
    g_release_sender.store(false);
    postbox::detail::after_open_check_hook = &hold_sender;
  }
  ~hook_guard() { postbox::detail::after_open_check_hook = nullptr; }
  hook_guard(const hook_guard&) = delete;
  hook_guard& operator=(const hook_guard&) = delete;
};
}  // namespace

TEST_CASE("spsc: a send that saw the channel open is received before receivers see closed", "[channel]") {
  postbox::channel<int, postbox::spsc> ch(4);
  std::atomic<int> send_outcome{-1};
  std::thread sender;
  std::thread closer;
  {
    hook_guard hook;
    sender = std::thread([&] { send_outcome.store(static_cast<int>(ch.try_send(42))); });
    REQUIRE(postbox_test::eventually([] { return g_sender_held.load(); }));
    closer = std::thread([&] { ch.close(); });  // waits for the held send to finish
    REQUIRE(postbox_test::eventually([&] { return ch.is_closed(); }));
    // The close is marked, but the held send may still publish: receivers
    // must not report closed-and-drained yet.
    CHECK(ch.try_receive_result().status() == postbox::receive_status::empty);
    CHECK(ch.try_send(7) == postbox::send_status::closed);  // a later send fails
    g_release_sender.store(true);
    sender.join();
    closer.join();
  }
  CHECK(send_outcome.load() == static_cast<int>(postbox::send_status::ok));
  CHECK(ch.try_receive() == 42);
  CHECK(ch.try_receive_result().status() == postbox::receive_status::closed);
}

TEST_CASE("mpmc: a send that claimed its slot before close is received before receivers see closed",
          "[channel]") {
  postbox::channel<int, postbox::mpmc> ch(4);
  std::atomic<int> send_outcome{-1};
  std::vector<int> received;
  std::atomic<int> final_status{-1};
  std::thread sender;
  std::thread receiver;
  {
    hook_guard hook;
    sender = std::thread([&] { send_outcome.store(static_cast<int>(ch.try_send(42))); });
    REQUIRE(postbox_test::eventually([] { return g_sender_held.load(); }));
    ch.close();
    CHECK(ch.try_send(7) == postbox::send_status::closed);
    receiver = std::thread([&] {
      for (;;) {
        auto r = ch.receive_for(std::chrono::hours(1));
        if (!r.has_value()) {
          final_status.store(static_cast<int>(r.status()));
          return;
        }
        received.push_back(*r);
      }
    });
    g_release_sender.store(true);
    sender.join();
    receiver.join();
  }
  CHECK(send_outcome.load() == static_cast<int>(postbox::send_status::ok));
  REQUIRE(received.size() == 1);
  CHECK(received[0] == 42);
  CHECK(final_status.load() == static_cast<int>(postbox::receive_status::closed));
}

TEST_CASE("mpsc: a receiver waiting behind a claimed, unpublished slot takes its message once it is published",
          "[channel]") {
  // The receiver finds the head slot claimed but not yet published: it must
  // neither report empty nor skip the slot, whether it is spinning (watching
  // the head slot) or parked when the send completes.
  postbox::channel<int, postbox::mpsc> ch(4);
  std::atomic<int> got{-1};
  std::thread sender;
  std::thread receiver;
  {
    hook_guard hook;
    sender = std::thread([&] { (void)ch.try_send(42); });
    REQUIRE(postbox_test::eventually([] { return g_sender_held.load(); }));
    receiver = std::thread([&] {
      auto r = ch.receive_for(std::chrono::hours(1));
      got.store(r.has_value() ? *r : static_cast<int>(r.status()) + 1000);
    });
    g_release_sender.store(true);
    sender.join();
    receiver.join();
  }
  CHECK(got.load() == 42);
  CHECK(ch.try_send(43) == send_status::ok);
  CHECK(ch.receive() == std::optional<int>(43));
}

TEST_CASE("receive_many waits for one message and then takes what is queued, up to max", "[channel]") {
  postbox::channel<int> ch(8);
  for (int i = 0; i < 5; ++i) REQUIRE(ch.try_send(i) == postbox::send_status::ok);
  std::vector<int> out;
  auto r = ch.receive_many(std::back_inserter(out), 3);
  REQUIRE(r.has_value());
  CHECK(*r == 3);
  CHECK(out == std::vector<int>{0, 1, 2});
  r = ch.receive_many(std::back_inserter(out), 10);
  REQUIRE(r.has_value());
  CHECK(*r == 2);
  CHECK(out == std::vector<int>{0, 1, 2, 3, 4});
}

TEST_CASE("receive_many blocks until the first message arrives", "[channel]") {
  postbox::channel<int, postbox::spsc> ch(8);
  std::vector<int> out;
  std::thread sender([&] { (void)ch.send(9); });
  auto r = ch.receive_many(std::back_inserter(out), 4);
  sender.join();
  REQUIRE(r.has_value());
  CHECK(out.front() == 9);
}

TEST_CASE("receive_many reports closed, timeout and canceled with nothing taken", "[channel]") {
  postbox::channel<int> ch(8);
  std::vector<int> out;
  CHECK(ch.receive_many(std::back_inserter(out), 4, std::chrono::steady_clock::now()).status() ==
        postbox::receive_status::timeout);
  std::stop_source stop;
  stop.request_stop();
  CHECK(ch.receive_many(std::back_inserter(out), 4, stop.get_token()).status() == postbox::receive_status::canceled);
  ch.close();
  CHECK(ch.receive_many(std::back_inserter(out), 4).status() == postbox::receive_status::closed);
  CHECK(out.empty());
}

TEST_CASE("dereferencing an rvalue result gives the value itself, so a range-for over it is safe", "[channel]") {
  // A result's operator* on an rvalue returned T&& into the dying result: a
  // range-for over `*f()` read freed memory (ThreadSanitizer found it in a
  // test). It returns the value now.
  auto make = [] { return postbox::receive_result<std::vector<int>>(std::vector<int>{1, 2, 3}); };
  static_assert(std::is_same_v<decltype(*make()), std::vector<int>>);
  int sum = 0;
  for (int v : *make()) sum += v;
  CHECK(sum == 6);
}

// --- the armed waiting protocol (event_count::prepare_wait_armed), used by every shape but spsc ---

TEST_CASE("notify_armed after prepare_wait_armed changes the word every armed waiter sleeps on", "[channel][armed]") {
  postbox::detail::event_count ec;
  const std::uint32_t first = ec.prepare_wait_armed();
  const std::uint32_t second = ec.prepare_wait_armed();  // a second waiter shares the arm
  CHECK(first == second);
  ec.notify_armed(1);
  // wait() returns at once when the word differs from the key; a word left
  // equal to either key would put that waiter to sleep (the test would hang).
  CHECK(ec.wait(first, std::nullopt));
  CHECK(ec.wait(second, std::nullopt));
  ec.finish_wait();
  ec.finish_wait();
}

TEST_CASE("only the first notify_armed after a park takes the arm; later ones leave the word alone", "[channel][armed]") {
  postbox::detail::event_count ec;
  const std::uint32_t key = ec.prepare_wait_armed();
  ec.notify_armed(1);  // takes the arm: one step of the epoch
  ec.notify_armed(1);  // finds it clear: must not move the word
  ec.notify_armed(1);
  ec.finish_wait();
  const std::uint32_t again = ec.prepare_wait_armed();
  CHECK(again != key);
  // Exactly one step between the two arms: the later notifies wrote nothing.
  constexpr std::uint32_t armed = std::uint32_t{1} << 31;
  CHECK(again == (((key + 1) & ~armed) | armed));
  ec.finish_wait();
}

TEST_CASE("notify_armed without an announced waiter, or after the waiter left, leaves the word alone", "[channel][armed]") {
  postbox::detail::event_count ec;
  ec.notify_armed(1);
  const std::uint32_t key = ec.prepare_wait_armed();
  ec.finish_wait();
  ec.notify_armed(1);  // the arm is stale but nobody is announced: the gate load ends it
  CHECK(ec.prepare_wait_armed() == key);
  ec.finish_wait();
}

TEST_CASE("wake_all wakes an armed waiter whose arm another notify already took", "[channel][armed]") {
  postbox::detail::event_count ec;
  const std::uint32_t key = ec.prepare_wait_armed();
  ec.notify_armed(1);
  const std::uint32_t rearmed = ec.prepare_wait_armed();
  ec.wake_all();
  CHECK(ec.wait(key, std::nullopt));
  CHECK(ec.wait(rearmed, std::nullopt));
  ec.finish_wait();
  ec.finish_wait();
}

// The rule "only the first notify after a park wakes" is safe only because
// that wake reaches every parked thread: had it woken one of the two, the
// second send would find the arm taken and the other receiver would sleep
// beside the second message.
TEST_CASE("two receivers parked on an mpmc channel each get one of two sends", "[channel][armed]") {
  const int rounds = static_cast<int>(postbox_test::scaled(200));
  int stranded = 0;
  for (int round = 0; round < rounds && stranded == 0; ++round) {
    channel<int> ch(8);
    std::atomic<int> got{0};
    std::atomic<int> sum{0};
    const auto receiver = [&] {
      if (auto v = ch.receive()) {
        sum.fetch_add(*v);
        got.fetch_add(1);
      }
    };
    std::thread a(receiver);
    std::thread b(receiver);
    // Both announced on the not-empty event count: past their spin, parking.
    REQUIRE(postbox_test::eventually(
        [&] { return postbox::detail::channel_access::not_empty(ch).threads_waiting_approx() == 2; }));
    REQUIRE(ch.send(1) == send_status::ok);
    REQUIRE(ch.send(2) == send_status::ok);
    if (!postbox_test::eventually([&] { return got.load() == 2; }, std::chrono::seconds(10))) {
      ++stranded;
      ch.close();  // lets the stranded receiver return
    }
    a.join();
    b.join();
    if (got.load() == 2) CHECK(sum.load() == 3);
  }
  CHECK(stranded == 0);
}

TEST_CASE("two senders parked on a full mpmc channel are each released by one of two receives", "[channel][armed]") {
  const int rounds = static_cast<int>(postbox_test::scaled(200));
  int stranded = 0;
  for (int round = 0; round < rounds && stranded == 0; ++round) {
    channel<int> ch(2);
    REQUIRE(ch.try_send(10) == send_status::ok);
    REQUIRE(ch.try_send(20) == send_status::ok);
    std::atomic<int> sent{0};
    std::thread a([&] { sent.fetch_add(ch.send(1) == send_status::ok ? 1 : 0); });
    std::thread b([&] { sent.fetch_add(ch.send(2) == send_status::ok ? 1 : 0); });
    REQUIRE(postbox_test::eventually(
        [&] { return postbox::detail::channel_access::not_full(ch).threads_waiting_approx() == 2; }));
    REQUIRE(ch.try_receive() == 10);
    REQUIRE(ch.try_receive() == 20);
    if (!postbox_test::eventually([&] { return sent.load() == 2; }, std::chrono::seconds(10))) {
      ++stranded;
      ch.close();  // lets the stranded sender return
    }
    a.join();
    b.join();
    if (sent.load() == 2) {
      const int x = ch.try_receive().value_or(0);
      const int y = ch.try_receive().value_or(0);
      CHECK(x + y == 3);
    }
  }
  CHECK(stranded == 0);
}

// --- the general ring's spin: it gives the core away once the other side stands still -----

TEST_CASE("spin_until_idle stops spinning after its idle limit of pauses with no progress, then yields", "[channel][spin]") {
  using budget = postbox::detail::spin_budget;
  unsigned calls = 0;
  CHECK_FALSE(postbox::detail::spin_until_idle<16>([&] { return ++calls == 0; }, [] { return 7; }));
  // A check before each of the 16 idle pauses, one before each of its yields, one last.
  CHECK(calls == 16 + budget::idle_yields + 1);
}

TEST_CASE("spin_until_idle spins its whole budget while the other side's progress keeps moving", "[channel][spin]") {
  using budget = postbox::detail::spin_budget;
  unsigned calls = 0;
  unsigned moves = 0;
  CHECK_FALSE(postbox::detail::spin_until_idle<16>([&] { return ++calls == 0; }, [&] { return ++moves; }));
  CHECK(calls == budget::pauses + budget::idle_yields + 1);
}

TEST_CASE("spin_until_idle counts idle pauses from the last move of the progress value", "[channel][spin]") {
  using budget = postbox::detail::spin_budget;
  unsigned calls = 0;
  unsigned reads = 0;
  // The value moves on its first 10 reads after the initial one, then stands still.
  CHECK_FALSE(postbox::detail::spin_until_idle<16>([&] { return ++calls == 0; },
                                                  [&] { return reads < 11 ? ++reads : reads; }));
  CHECK(calls == 10 + 16 + budget::idle_yields + 1);
}

TEST_CASE("spin_until_idle returns as soon as its condition holds", "[channel][spin]") {
  unsigned calls = 0;
  CHECK(postbox::detail::spin_until_idle<16>([&] { return ++calls == 5; }, [] { return 0; }));
  CHECK(calls == 5);
  calls = 0;  // and during the yields, after an idle spin
  CHECK(postbox::detail::spin_until_idle<4>([&] { return ++calls == 6; }, [] { return 0; }));
  CHECK(calls == 6);
}

namespace {
#if defined(__linux__)
// Pins the calling thread to the first CPU the process may run on, so the
// threads of a test that all call it share one core; does nothing if the
// affinity cannot be read or set.
void pin_to_first_allowed_cpu() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &allowed)) continue;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
    return;
  }
}
#else
void pin_to_first_allowed_cpu() {}
#endif
}  // namespace

// Four threads on one core: a blocking call of the general ring that finds the
// channel full or empty gives the core to the thread it waits for (yields after
// 16 idle pauses, then parks), and every message arrives once (checksum).
TEST_CASE("mpmc blocking send and receive move every message once with producers and consumers sharing a core",
          "[channel][spin]") {
  const std::uint64_t per_producer = postbox_test::scaled(20'000);
  channel<std::uint64_t> ch(8);
  std::atomic<std::uint64_t> sum{0};
  std::atomic<std::uint64_t> count{0};
  std::atomic<int> failed_sends{0};
  std::vector<std::thread> threads;
  for (std::uint64_t p = 0; p < 2; ++p) {
    threads.emplace_back([&, p] {
      pin_to_first_allowed_cpu();
      for (std::uint64_t i = 1; i <= per_producer; ++i) {
        if (ch.send((p << 32) | i) != send_status::ok) failed_sends.fetch_add(1);
      }
    });
  }
  for (int c = 0; c < 2; ++c) {
    threads.emplace_back([&] {
      pin_to_first_allowed_cpu();
      std::uint64_t local = 0, n = 0;
      while (auto v = ch.receive()) {
        local += *v;
        ++n;
      }
      sum.fetch_add(local);
      count.fetch_add(n);
    });
  }
  threads[0].join();
  threads[1].join();
  ch.close();
  for (std::size_t i = 2; i < threads.size(); ++i) threads[i].join();
  const std::uint64_t each = per_producer * (per_producer + 1) / 2;
  CHECK(failed_sends.load() == 0);
  CHECK(count.load() == 2 * per_producer);
  CHECK(sum.load() == each + ((std::uint64_t{1} << 32) * per_producer + each));
}
