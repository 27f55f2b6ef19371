// SPDX-License-Identifier: MIT
// postbox::topic's waiting: receivers and `block` publishers park on the queue and are woken once per park.
#include <postbox/select.hpp>
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

// Waits until `t` has a publish in progress (blocked on a full `block` queue).
template <class T>
bool publish_in_progress(const postbox::topic<T>& t) {
  return postbox_test::eventually([&] { return t.stats().publishing == 1; });
}

}  // namespace

TEST_CASE("two group members blocked in receive are each woken by one of two publishes", "[topic][wake]") {
  // A publish wakes every receiver parked on the queue, once per park: if it
  // woke only one and cleared the arm, the other member would sleep through
  // the second message while the first handles its own.
  const int rounds = static_cast<int>(postbox_test::scaled(200));
  int missed = 0;
  for (int round = 0; round < rounds; ++round) {
    postbox::topic<int> t;
    auto a = t.subscribe({.capacity = 8, .group = "workers"});
    auto b = t.subscribe({.capacity = 8, .group = "workers"});
    std::atomic<int> got{0};
    std::atomic<int> sum{0};
    const auto member = [&](postbox::subscription<int>& s) {
      if (auto d = s.receive()) {
        sum.fetch_add(**d);
        got.fetch_add(1);
      }
    };
    std::thread ta([&] { member(a); });
    std::thread tb([&] { member(b); });
    REQUIRE(postbox_test::eventually([&] { return a.blocked_receivers_approx() == 1 && b.blocked_receivers_approx() == 1; }));
    REQUIRE(t.publish(1).delivered == 1);
    REQUIRE(t.publish(2).delivered == 1);
    // Each member returns after one message, so both must have been woken.
    if (!postbox_test::eventually([&] { return got.load() == 2; })) {
      ++missed;
      t.close();  // lets a stranded member return
    }
    ta.join();
    tb.join();
    if (got.load() == 2) CHECK(sum.load() == 3);
  }
  CHECK(missed == 0);
}

TEST_CASE("a publisher blocked on a full block subscription is released by try_receive", "[topic][wake]") {
  postbox::topic<int> t;
  auto s = t.subscribe({.capacity = 1, .policy = postbox::overflow::block});
  REQUIRE(t.publish(1).delivered == 1);
  std::atomic<bool> done{false};
  std::thread publisher([&] {
    (void)t.publish(2);
    done.store(true);
  });
  REQUIRE(publish_in_progress(t));
  auto first = s.try_receive();
  REQUIRE(first);
  CHECK(**first == 1);
  REQUIRE(postbox_test::eventually([&] { return done.load(); }));
  publisher.join();
  auto second = s.try_receive();
  REQUIRE(second);
  CHECK(**second == 2);
}

TEST_CASE("a publisher blocked on a full block subscription is released by a select receiving from it",
          "[topic][wake]") {
  // The select takes the message through the channel's own receive, which
  // notifies the channel's parked senders: the publisher must park there.
  postbox::topic<int> t;
  auto s = t.subscribe({.capacity = 1, .policy = postbox::overflow::block});
  REQUIRE(t.publish(1).delivered == 1);
  std::atomic<bool> done{false};
  std::thread publisher([&] {
    (void)t.publish(2);
    done.store(true);
  });
  REQUIRE(publish_in_progress(t));
  int got = 0;
  const auto r = postbox::select(postbox::on_receive(s, [&](postbox::delivery<int> d) { got = *d; }));
  REQUIRE(r.ok());
  CHECK(got == 1);
  REQUIRE(postbox_test::eventually([&] { return done.load(); }));
  publisher.join();
  auto second = s.try_receive();
  REQUIRE(second);
  CHECK(**second == 2);
}

TEST_CASE("closing the topic wakes a publisher blocked on a full block subscription and a receiver of another",
          "[topic][wake][teardown]") {
  postbox::topic<int> t;
  auto full = t.subscribe({.capacity = 1, .policy = postbox::overflow::block});
  auto idle = t.subscribe({.capacity = 4, .policy = postbox::overflow::drop_newest, .pattern = "never"});
  REQUIRE(t.publish(1).delivered == 1);
  std::atomic<bool> published{false};
  std::atomic<bool> received{false};
  std::thread publisher([&] {
    (void)t.publish(2);
    published.store(true);
  });
  std::thread receiver([&] {
    CHECK_FALSE(idle.receive().has_value());  // closed and drained: empty
    received.store(true);
  });
  REQUIRE(publish_in_progress(t));
  REQUIRE(postbox_test::eventually([&] { return idle.blocked_receivers_approx() == 1; }));
  t.close();
  REQUIRE(postbox_test::eventually([&] { return published.load() && received.load(); }));
  publisher.join();
  receiver.join();
  auto first = full.try_receive();  // what was delivered before the close drains
  REQUIRE(first);
  CHECK(**first == 1);
}

TEST_CASE("a timed receive that parks still times out and a stop request still cancels it", "[topic][wake]") {
  postbox::topic<int> t;
  auto s = t.subscribe();
  const auto r = s.receive_for(1ms);
  CHECK(r.status() == postbox::receive_status::timeout);
  std::stop_source stop;
  std::atomic<bool> returned{false};
  std::thread receiver([&] {
    const auto c = s.receive_for(std::chrono::hours(1), stop.get_token());
    CHECK(c.status() == postbox::receive_status::canceled);
    returned.store(true);
  });
  REQUIRE(postbox_test::eventually([&] { return s.blocked_receivers_approx() == 1; }));
  stop.request_stop();
  REQUIRE(postbox_test::eventually([&] { return returned.load(); }));
  receiver.join();
  REQUIRE(t.publish(7).delivered == 1);  // the subscription still works after a canceled wait
  auto d = s.receive();
  REQUIRE(d);
  CHECK(**d == 7);
}

TEST_CASE("a tiny block queue with both sides parking loses and duplicates nothing", "[topic][wake][stress]") {
  // Capacity 1 and 2: the publisher parks on full and the receivers on empty
  // all the time, so every wake-up goes through the once-per-park handshake
  // in both directions. Receivers mix receive, receive_for and try_receive
  // (the quiet take that must wake a parked publisher).
  const std::uint64_t per_pub = postbox_test::scaled(20000);
  for (std::size_t capacity : {std::size_t{1}, std::size_t{2}}) {
    postbox::topic<std::uint64_t> t;
    auto plain = t.subscribe({.capacity = capacity, .policy = postbox::overflow::block});
    auto m1 = t.subscribe({.capacity = capacity, .policy = postbox::overflow::block, .group = "g"});
    auto m2 = t.subscribe({.capacity = capacity, .policy = postbox::overflow::block, .group = "g"});
    constexpr int publishers = 2;
    const std::uint64_t total = per_pub * publishers;
    const std::uint64_t expected_sum = publishers * (per_pub * (per_pub + 1) / 2);

    std::uint64_t plain_sum = 0, plain_count = 0, plain_order_errors = 0;
    std::thread plain_reader([&] {
      std::uint64_t next[publishers] = {1, 1};
      for (std::uint64_t n = 0; n < total; ++n) {
        std::optional<postbox::delivery<std::uint64_t>> d;
        switch (n % 3) {
          case 0: d = plain.receive(); break;
          case 1: {
            auto r = plain.receive_for(std::chrono::hours(1));
            if (r.has_value()) d = std::move(*r);
            break;
          }
          default:
            while (!(d = plain.try_receive())) std::this_thread::yield();
            break;
        }
        if (!d) break;
        const auto pub = **d >> 32;
        const auto seq = **d & 0xffffffffu;
        if (seq != next[pub]) ++plain_order_errors;
        next[pub] = seq + 1;
        plain_sum += seq;
        ++plain_count;
      }
    });
    std::atomic<std::uint64_t> group_sum{0}, group_count{0};
    const auto member = [&](postbox::subscription<std::uint64_t>& s) {
      for (;;) {
        auto d = s.receive();
        if (!d) return;  // closed and drained
        group_sum.fetch_add(**d & 0xffffffffu);
        group_count.fetch_add(1);
      }
    };
    std::thread r1([&] { member(m1); });
    std::thread r2([&] { member(m2); });
    std::vector<std::thread> pubs;
    for (std::uint64_t p = 0; p < publishers; ++p)
      pubs.emplace_back([&, p] {
        for (std::uint64_t k = 1; k <= per_pub; ++k) (void)t.publish((p << 32) | k);
      });
    for (auto& x : pubs) x.join();
    plain_reader.join();
    t.close();  // the group's members drain and return
    r1.join();
    r2.join();
    CHECK(plain_count == total);
    CHECK(plain_sum == expected_sum);
    CHECK(plain_order_errors == 0);
    CHECK(group_count.load() == total);
    CHECK(group_sum.load() == expected_sum);
  }
}
