// SPDX-License-Identifier: MIT
// Tests for postbox/asio.hpp: completion tokens, cancellation slots and the executor scheduler on one io_context.
#if defined(POSTBOX_WITH_ASIO)

#include <postbox/asio.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <optional>
#include <thread>
#include <vector>

using postbox_test::scaled;

TEST_CASE("a use_awaitable coroutine on an io_context receives what a blocking thread sends", "[asio]") {
  const int n = static_cast<int>(scaled(20000));
  asio::io_context io;
  postbox::channel<int> ch(8);
  std::int64_t sum = 0;
  int count = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (;;) {
          auto r = co_await postbox::async_receive(ch, asio::use_awaitable);
          if (!r.has_value()) co_return;
          sum += *r;
          ++count;
        }
      },
      asio::detached);
  std::thread sender([&] {
    for (int i = 1; i <= n; ++i) (void)ch.send(i);
    ch.close();
  });
  io.run();  // returns once the coroutine ends: a pending wait keeps it running
  sender.join();
  REQUIRE(count == n);
  REQUIRE(sum == static_cast<std::int64_t>(n) * (n + 1) / 2);
}

TEST_CASE("a use_awaitable sender and receiver ping-pong on one io_context thread", "[asio]") {
  const int n = static_cast<int>(scaled(10000));
  asio::io_context io;
  postbox::channel<int, postbox::spsc> ping(1);
  postbox::channel<int, postbox::spsc> pong(1);
  int last = -1;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < n; ++i) {
          co_await postbox::async_send(ping, i, asio::use_awaitable);
          auto r = co_await postbox::async_receive(pong, asio::use_awaitable);
          last = *r;
        }
        ping.close();
      },
      asio::detached);
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (;;) {
          auto r = co_await postbox::async_receive(ping, asio::use_awaitable);
          if (!r.has_value()) co_return;
          co_await postbox::async_send(pong, *r + 1, asio::use_awaitable);
        }
      },
      asio::detached);
  io.run();
  REQUIRE(last == n);
}

TEST_CASE("a callback completes on its bound executor, never inside the initiating call", "[asio]") {
  asio::io_context io;
  postbox::channel<int> ch(2);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  std::vector<int> got;
  postbox::async_receive(ch, asio::bind_executor(io, [&](postbox::receive_result<int> r) { got.push_back(*r); }));
  REQUIRE(got.empty());  // ready at once, but posted
  postbox::async_receive(ch, asio::bind_executor(io, [&](postbox::receive_result<int> r) { got.push_back(*r); }));
  io.poll();
  REQUIRE(got == std::vector<int>{1});
  REQUIRE(ch.try_send(2) == postbox::send_status::ok);
  io.poll();
  REQUIRE(got == std::vector<int>{1, 2});
}

TEST_CASE("a deferred send runs when launched and reports closed on a closed channel", "[asio]") {
  asio::io_context io;
  postbox::channel<int> ch(1);
  auto op = postbox::async_send(ch, 5, asio::experimental::deferred);
  REQUIRE(ch.size_approx() == 0);  // nothing happens until launched
  std::optional<postbox::send_status> first;
  std::move(op)(asio::bind_executor(io, [&](postbox::send_status s) { first = s; }));
  io.run();
  REQUIRE(first == postbox::send_status::ok);
  REQUIRE(ch.try_receive() == 5);
  ch.close();
  std::optional<postbox::send_status> second;
  postbox::async_send(ch, 6, asio::bind_executor(io, [&](postbox::send_status s) { second = s; }));
  io.restart();
  io.run();
  REQUIRE(second == postbox::send_status::closed);
}

TEST_CASE("an Asio cancellation completes a pending receive with canceled and takes nothing", "[asio]") {
  asio::io_context io;
  postbox::channel<int> ch(2);
  asio::cancellation_signal signal;
  std::optional<postbox::receive_status> status;
  postbox::async_receive(ch, asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, [&](auto r) {
                                                            status = r.status();
                                                          })));
  io.poll();
  REQUIRE_FALSE(status.has_value());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(ch.try_send(3) == postbox::send_status::ok);  // arrives after the cancel: left alone
  io.run();
  REQUIRE(status == postbox::receive_status::canceled);
  REQUIRE(ch.try_receive() == 3);
}

TEST_CASE("close completes pending Asio receives and sends with closed", "[asio]") {
  asio::io_context io;
  postbox::channel<int> empty(1);
  postbox::channel<int> full(1);
  REQUIRE(full.try_send(1) == postbox::send_status::ok);
  std::optional<postbox::receive_status> r;
  std::optional<postbox::send_status> s;
  postbox::async_receive(empty, asio::bind_executor(io, [&](postbox::receive_result<int> x) { r = x.status(); }));
  postbox::async_send(full, 2, asio::bind_executor(io, [&](postbox::send_status x) { s = x; }));
  io.poll();
  REQUIRE_FALSE(r.has_value());
  REQUIRE_FALSE(s.has_value());
  std::thread closer([&] {
    empty.close();
    full.close();
  });
  closer.join();
  io.run();
  REQUIRE(r == postbox::receive_status::closed);
  REQUIRE(s == postbox::send_status::closed);
}

TEST_CASE("a subscription delivers to a use_awaitable coroutine until the topic closes", "[asio]") {
  asio::io_context io;
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  int sum = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (;;) {
          auto d = co_await postbox::async_receive(sub, asio::use_awaitable);
          if (!d.has_value()) co_return;
          sum += **d;
        }
      },
      asio::detached);
  std::thread publisher([&] {
    for (int i = 1; i <= 100; ++i) (void)topic.publish(i);
    topic.close();
  });
  io.run();
  publisher.join();
  REQUIRE(sum == 5050);
}

TEST_CASE("a postbox::task on an executor_scheduler resumes on the io_context", "[asio]") {
  asio::io_context io;
  postbox::executor_scheduler sched(io.get_executor());
  postbox::channel<int> ch(1);
  std::thread::id resumed_on;
  auto body = [&]() -> postbox::task<int> {
    auto r = co_await postbox::async_receive(ch);
    resumed_on = std::this_thread::get_id();
    co_return *r;
  };
  auto t = body();
  t.start(sched);
  REQUIRE_FALSE(t.done());
  std::thread sender([&] { (void)ch.send(11); });
  sender.join();
  io.run();
  REQUIRE(t.done());
  REQUIRE(t.get() == 11);
  REQUIRE(resumed_on == std::this_thread::get_id());
}

#endif  // POSTBOX_WITH_ASIO
