// SPDX-License-Identifier: MIT
// Tests of the spsc ring's parking protocol (event_count's sole-waiter form): one futex wake per park, none lost.
#include <postbox/channel.hpp>
#include <postbox/detail/event_count.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <optional>
#include <thread>

using postbox::detail::event_count;

// wait() returns at once when the futex word differs from the key; had the
// notify left the word unchanged, it would sleep and the test would time out.
TEST_CASE("notify_light_sole after prepare_wait_sole changes the word the waiter sleeps on", "[channel]") {
  event_count ec;
  const std::uint32_t key = ec.prepare_wait_sole();
  ec.notify_light_sole(1);
  CHECK(ec.wait(key, std::nullopt));
  ec.finish_wait();
}

TEST_CASE("a second prepare_wait_sole re-arms the wake that the first one's notify consumed", "[channel]") {
  event_count ec;
  const std::uint32_t first = ec.prepare_wait_sole();
  ec.notify_light_sole(1);
  ec.notify_light_sole(1);  // the wake is pending: this one only finds the mark set
  CHECK(ec.wait(first, std::nullopt));
  ec.finish_wait();
  const std::uint32_t second = ec.prepare_wait_sole();
  CHECK(second == first);  // the pending mark is cleared, nothing else moved
  ec.notify_light_sole(1);
  CHECK(ec.wait(second, std::nullopt));
  ec.finish_wait();
}

TEST_CASE("notify_light_sole without a waiter leaves the word alone", "[channel]") {
  event_count ec;
  const std::uint32_t before = ec.prepare_wait_sole();
  ec.finish_wait();
  ec.notify_light_sole(1);
  ec.notify_light_sole(1);
  CHECK(ec.prepare_wait_sole() == before);
  ec.finish_wait();
}

TEST_CASE("wake_all wakes a sole waiter whose wake is already pending", "[channel]") {
  event_count ec;
  const std::uint32_t key = ec.prepare_wait_sole();
  ec.notify_light_sole(1);
  ec.wake_all();
  CHECK(ec.wait(key, std::nullopt));
  ec.finish_wait();
}

// The pattern the protocol changes: the consumer drains the ring and parks,
// then the producer sends a burst, of which only the first send wakes it
// (the others find the wake pending); the consumer re-arms on its next park.
// Every message arrives once, in order.
TEST_CASE("bursts to a parking spsc consumer lose, duplicate and reorder nothing", "[channel]") {
  const std::uint64_t bursts = postbox_test::scaled(2'000);
  constexpr std::uint64_t burst = 64;
  postbox::channel<std::uint64_t, postbox::spsc> ch(burst);
  std::uint64_t sum = 0, count = 0, out_of_order = 0;
  std::thread consumer([&] {
    std::uint64_t last = 0;
    while (auto v = ch.receive()) {
      if (*v != last + 1) ++out_of_order;
      last = *v;
      sum += *v;
      ++count;
    }
  });
  std::uint64_t next = 1;
  for (std::uint64_t b = 0; b < bursts; ++b) {
    for (std::uint64_t k = 0; k < burst; ++k) REQUIRE(ch.send(next++) == postbox::send_status::ok);
    // Let the consumer drain the burst (and then park) before the next one.
    REQUIRE(postbox_test::eventually([&] { return ch.size_approx() == 0; }));
  }
  ch.close();
  consumer.join();
  const std::uint64_t n = bursts * burst;
  CHECK(count == n);
  CHECK(sum == n * (n + 1) / 2);
  CHECK(out_of_order == 0);
}
