// SPDX-License-Identifier: MIT
// Tests of the spsc ring's parking protocol (event_count's sole-waiter form): one futex wake per park, none lost;
// and of the blocking calls' spin (detail::spin_until) and their stop callback, registered only before a park.
#include <postbox/channel.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/event_count.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <cstdint>
#include <optional>
#include <stop_token>
#include <thread>

using postbox::detail::event_count;

// wait() returns at once when the futex word differs from the key; had the
// notify left the word unchanged, it would sleep and the test would time out.
// Each runs unmarked and marked (mark_light_fence_mode(true): what an spsc
// ring's constructor does where the light fence is a real fence).
TEST_CASE("notify_light_sole after prepare_wait_sole changes the word the waiter sleeps on", "[channel]") {
  event_count ec;
  ec.mark_light_fence_mode(GENERATE(false, true));
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
  ec.mark_light_fence_mode(GENERATE(false, true));
  const std::uint32_t before = ec.prepare_wait_sole();
  ec.finish_wait();
  ec.notify_light_sole(1);
  ec.notify_light_sole(1);
  CHECK(ec.prepare_wait_sole() == before);
  ec.finish_wait();
}

// The mark lives in the waiter word, beside the count of waiting threads.
TEST_CASE("an event count marked for a real light fence counts only its waiting threads", "[channel]") {
  event_count ec;
  ec.mark_light_fence_mode(true);
  CHECK(ec.threads_waiting_approx() == 0);
  const std::uint32_t key = ec.prepare_wait_sole();
  CHECK(ec.threads_waiting_approx() == 1);
  ec.finish_wait();
  CHECK(ec.threads_waiting_approx() == 0);
  CHECK(ec.prepare_wait_sole() == key);
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

// --- the blocking calls' spin and stop callback -------------------------------------

TEST_CASE("spin_until returns as soon as its condition holds, checking it every few pauses", "[channel]") {
  unsigned calls = 0;
  CHECK(postbox::detail::spin_until([&] { return ++calls == 5; }));
  CHECK(calls == 5);  // 4 checks that failed, 4 x step pauses, then the one that held
}

TEST_CASE("spin_until checks its condition once per step of its pause budget, then before each yield", "[channel]") {
  using budget = postbox::detail::spin_budget;
  unsigned calls = 0;
  CHECK_FALSE(postbox::detail::spin_until([&] { return ++calls == 0; }));
  CHECK(calls == budget::pauses / budget::step + budget::yields + 1);
  calls = 0;
  CHECK_FALSE(postbox::detail::spin_until([&] { return ++calls == 0; }, false));
  CHECK(calls == budget::pauses / budget::step + 1);
  calls = 0;  // the channel's step: a check after every pause
  CHECK_FALSE(postbox::detail::spin_until<1>([&] { return ++calls == 0; }, false));
  CHECK(calls == budget::pauses + 1);
}

// The epoch moves on each wake_all (the stop callback's wake), so a key read
// after it differs from one read before.
TEST_CASE("a default stop_wakeup registers nothing until armed, and arms once", "[channel]") {
  event_count ec;
  auto key = [&ec] {
    const std::uint32_t k = ec.prepare_wait();  // the raw word (the sole form masks the bit a wake sets)
    ec.finish_wait();
    return k;
  };
  std::stop_source source;
  const std::stop_token token = source.get_token();
  const postbox::detail::stop_tokens tokens{&token};
  postbox::detail::stop_wakeup wakeup;
  const std::uint32_t before = key();
  source.request_stop();
  CHECK(key() == before);  // nothing registered: the stop woke nobody
  wakeup.arm(ec, tokens);  // registering on a stopped token runs the wake now
  const std::uint32_t armed = key();
  CHECK(armed != before);
  wakeup.arm(ec, tokens);  // a second arm registers nothing more
  CHECK(key() == armed);
}

namespace {

// Waits until `parked()` (the call is between prepare and finish_wait, its
// stop callback registered), then stops the token; the call must return
// canceled. If it never returns, closing the channel releases it so the test
// fails instead of hanging.
template <class Channel, class Call, class Parked>
int stop_while_parked(Channel& ch, Call call, Parked parked) {
  std::stop_source stop;
  std::atomic<int> outcome{-1};
  std::thread waiter([&] { outcome.store(call(stop.get_token())); });
  const bool was_parked = postbox_test::eventually(parked);
  stop.request_stop();
  const bool returned = postbox_test::eventually([&] { return outcome.load() != -1; });
  if (!returned) ch.close();
  waiter.join();
  CHECK(was_parked);
  CHECK(returned);
  return outcome.load();
}

template <class Shape>
void check_parked_receive_is_canceled() {
  postbox::channel<int, Shape> ch(4);
  using access = postbox::detail::channel_access;
  const int got = stop_while_parked(
      ch, [&](std::stop_token t) { return static_cast<int>(ch.receive_for(std::chrono::hours(1), t).status()); },
      [&] { return access::not_empty(ch).threads_waiting_approx() == 1; });
  CHECK(got == static_cast<int>(postbox::receive_status::canceled));
  REQUIRE(ch.try_send(7) == postbox::send_status::ok);
  CHECK(ch.try_receive() == 7);
}

template <class Shape>
void check_parked_send_is_canceled() {
  postbox::channel<std::unique_ptr<int>, Shape> ch(1);
  REQUIRE(ch.try_send(std::make_unique<int>(1)) == postbox::send_status::ok);
  auto value = std::make_unique<int>(2);
  using access = postbox::detail::channel_access;
  const int got = stop_while_parked(
      ch, [&](std::stop_token t) { return static_cast<int>(ch.send(std::move(value), t)); },
      [&] { return access::not_full(ch).threads_waiting_approx() == 1; });
  CHECK(got == static_cast<int>(postbox::send_status::canceled));
  REQUIRE(value);  // not moved from
  CHECK(*value == 2);
  CHECK(ch.size_approx() == 1);
}

}  // namespace

TEMPLATE_TEST_CASE("a stop requested after a receive has parked wakes it with canceled", "[channel]", postbox::spsc,
                   postbox::mpsc, postbox::mpmc) {
  check_parked_receive_is_canceled<TestType>();
}

TEMPLATE_TEST_CASE("a stop requested after a send has parked on a full channel wakes it with canceled", "[channel]",
                   postbox::spsc, postbox::spmc, postbox::mpmc) {
  check_parked_send_is_canceled<TestType>();
}

// --- the spsc ring's own notify (emplace_notify / receive_notify) --------------------

namespace {

// Parks `call` (a receive_for or send_for of an hour on `ch`) until `parked()`,
// then runs `act` on this thread: the parked call must return ok, woken by
// act's notify. If it never returns, closing the channel releases it, so a
// lost wake-up fails the test instead of hanging it.
template <class Channel, class Call, class Parked, class Act>
void check_woken(Channel& ch, Call call, Parked parked, Act act) {
  std::atomic<int> outcome{-1};
  std::thread waiter([&] { outcome.store(call()); });
  const bool was_parked = postbox_test::eventually(parked);
  act();
  const bool returned = postbox_test::eventually([&] { return outcome.load() != -1; });
  if (!returned) ch.close();
  waiter.join();
  CHECK(was_parked);
  CHECK(returned);
  CHECK(outcome.load() == 0);  // ok, for both status enums
}

}  // namespace

TEST_CASE("every way into an spsc channel wakes its parked receiver", "[channel]") {
  using access = postbox::detail::channel_access;
  static_assert(static_cast<int>(postbox::receive_status::ok) == 0 && static_cast<int>(postbox::send_status::ok) == 0);
  for (int way = 0; way < 4; ++way) {
    postbox::channel<int, postbox::spsc> ch(4);
    int got = 0;
    check_woken(
        ch,
        [&] {
          auto r = ch.receive_for(std::chrono::hours(1));
          if (r.has_value()) got = *r;
          return static_cast<int>(r.status());
        },
        [&] { return access::not_empty(ch).threads_waiting_approx() == 1; },
        [&] {
          const int v = 10 + way;
          if (way == 0) REQUIRE(ch.try_send(v) == postbox::send_status::ok);
          if (way == 1) REQUIRE(ch.try_emplace(v) == postbox::send_status::ok);
          if (way == 2) REQUIRE(ch.send(v) == postbox::send_status::ok);
          if (way == 3) REQUIRE(ch.try_send_batch(&v, &v + 1) == 1);
        });
    CHECK(got == 10 + way);
  }
}

TEST_CASE("every way out of a full spsc channel wakes its parked sender", "[channel]") {
  using access = postbox::detail::channel_access;
  for (int way = 0; way < 5; ++way) {
    postbox::channel<int, postbox::spsc> ch(1);
    REQUIRE(ch.try_send(1) == postbox::send_status::ok);
    check_woken(
        ch, [&] { return static_cast<int>(ch.send_for(2, std::chrono::hours(1))); },
        [&] { return access::not_full(ch).threads_waiting_approx() == 1; },
        [&] {
          if (way == 0) CHECK(ch.try_receive() == 1);
          if (way == 1) CHECK(*ch.try_receive_result() == 1);
          if (way == 2) CHECK(ch.receive() == 1);
          if (way == 3) CHECK(*ch.receive_for(std::chrono::hours(1)) == 1);
          if (way == 4) {
            int out = 0;
            CHECK(ch.try_receive_batch(&out, 1) == 1);
            CHECK(out == 1);
          }
        });
    CHECK(ch.try_receive() == 2);
  }
}
