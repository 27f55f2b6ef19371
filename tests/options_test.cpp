// SPDX-License-Identifier: MIT
// Every call that takes an options struct accepts `{}` and braced designated initializers, with g++ and clang.
//
// g++ 12 once found `subscribe({.group = ...})` and `dead_letter_queue<T> q({})` ambiguous while clang
// accepted them; the README shows exactly these forms. This file is compiled by both compilers in the test
// command (g++ for the Release and TSan builds, clang for ASan+UBSan), so an overload set that breaks
// them fails the build, and each case checks the option took effect.
#include <postbox/postbox.hpp>
#include <postbox/select.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <string>

using namespace std::chrono_literals;

TEST_CASE("topic subscribe takes {} and designated options", "[options]") {
  postbox::topic<int> t;
  auto a = t.subscribe({});
  auto b = t.subscribe({.capacity = 2, .policy = postbox::overflow::drop_newest});
  auto c = t.subscribe({.group = "billing"});
  auto d = t.subscribe("orders.*", {.capacity = 8});
  CHECK(t.stats().per_subscription.at(1).capacity == 2);
}

TEST_CASE("dead_letter_queue takes {} and designated options", "[options]") {
  postbox::manual_clock clock;
  postbox::dead_letter_queue<int> a({});
  postbox::dead_letter_queue<int> b({.capacity = 3}, clock);
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::dead_letter_queue<int> c(timers, {.capacity = 4});
  CHECK(b.stats().capacity == 3);
  CHECK(c.stats().capacity == 4);
}

TEST_CASE("consumer takes {} and designated options", "[options]") {
  postbox::manual_clock clock;
  postbox::channel<postbox::envelope<int>> ch(8);
  postbox::dead_letter_queue<int> dlq({}, clock);
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"),
                      [](const postbox::envelope<int>&) { return postbox::settlement::ack(); }, dlq,
                      {.name = "designated", .threads = 0, .clock = &clock});
  REQUIRE(ch.try_send(postbox::make_envelope(std::string("test.int"), 1, postbox::message_kind::event, clock)) ==
          postbox::send_status::ok);
  CHECK(c.poll() == 1);  // threads = 0 took effect: the caller runs the work
}

TEST_CASE("inbox, outbox relay, operations and saga coordinator take {} and designated options", "[options]") {
  postbox::manual_clock clock;
  postbox::memory_store store;
  postbox::inbox a(store, "a", {});
  postbox::inbox b(store, "b", {.max_ids = 10}, clock);
  postbox::channel<postbox::stored_message> sink(8);
  postbox::outbox_relay r1(store, [](const postbox::stored_message&) { return postbox::errc::ok; }, {}, clock);
  postbox::outbox_relay r2(store, [](const postbox::stored_message&) { return postbox::errc::ok; },
                           {.batch_size = 2}, clock);
  postbox::operations<int> ops1(clock, {});
  postbox::operations<int> ops2(clock, {.workers = 1, .queue_capacity = 1});
  postbox::memory_saga_store saga_store;
  postbox::saga_coordinator sagas1(saga_store, {});
  postbox::saga_coordinator sagas2(saga_store, {.jitter_seed = 7});
  CHECK(r2.stats().claimed == 0);
}

TEST_CASE("requester and stream take {} and designated options", "[options]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::endpoint_registry<int> registry;
  postbox::channel<postbox::envelope<int>> requests(8);
  postbox::requester<int, int> a(requests, registry, timers, {});
  postbox::requester<int, int> b(requests, registry, timers, {.endpoint = "replies.b", .max_pending = 2});
  CHECK(b.endpoint() == "replies.b");
  postbox::stream<int> s1(2, {});
  postbox::stream<int> s2(2, {.max_count = 10}, clock);
  CHECK(s2.partitions() == 2);
}

TEST_CASE("select takes designated options", "[options]") {
  postbox::manual_clock clock;
  postbox::channel<int> ch(2);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  const auto r = postbox::select({.clock = &clock, .deadline = clock.now() + 1s}, postbox::on_receive(ch, [](int) {}));
  CHECK(r.ok());
}
