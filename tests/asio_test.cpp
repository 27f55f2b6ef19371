// SPDX-License-Identifier: MIT
// Tests for postbox/asio.hpp: completion tokens, cancellation slots and the executor scheduler on one io_context.
#if defined(POSTBOX_WITH_ASIO)

#include <postbox/asio.hpp>
#include <postbox/consumer.hpp>
#include <postbox/testing.hpp>

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
#include <exception>
#include <memory>
#include <stdexcept>
#include <optional>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox_test::eventually;
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

// --- async_select -------------------------------------------------------------

TEST_CASE("an Asio async_select with use_awaitable completes the case whose channel receives", "[asio][select]") {
  asio::io_context io;
  postbox::channel<int> a(1);
  postbox::channel<int> b(1);
  int from_a = 0;
  int from_b = 0;
  std::optional<postbox::select_result> result;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        result = co_await postbox::async_select(postbox::on_receive(a, [&](int v) { from_a = v; }),
                                                postbox::on_receive(b, [&](int v) { from_b = v; }),
                                                asio::use_awaitable);
      },
      asio::detached);
  io.poll();
  REQUIRE_FALSE(result.has_value());
  std::thread sender([&] { (void)b.send(8); });
  sender.join();
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->ok());
  REQUIRE(result->index == 1);
  REQUIRE(from_b == 8);
  REQUIRE(from_a == 0);
  REQUIRE(a.try_send(1) == postbox::send_status::ok);
  REQUIRE(a.try_receive() == 1);
}

TEST_CASE("an Asio cancellation completes a pending async_select with canceled and consumes nothing",
          "[asio][select]") {
  asio::io_context io;
  postbox::channel<int> in(1);
  postbox::channel<int> out(1);
  REQUIRE(out.try_send(0) == postbox::send_status::ok);
  asio::cancellation_signal signal;
  std::optional<postbox::select_result> result;
  bool ran = false;
  postbox::async_select(postbox::on_receive(in, [&](int) { ran = true; }),
                        postbox::on_send(out, 1, [&] { ran = true; }),
                        asio::bind_cancellation_slot(
                            signal.slot(), asio::bind_executor(io, [&](std::exception_ptr e, postbox::select_result r) {
                              REQUIRE_FALSE(e);
                              result = r;
                            })));
  io.poll();
  REQUIRE_FALSE(result.has_value());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(in.try_send(3) == postbox::send_status::ok);
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->status == postbox::select_status::canceled);
  REQUIRE_FALSE(ran);
  REQUIRE(in.try_receive() == 3);
  REQUIRE(out.try_receive() == 0);
}

TEST_CASE("an Asio async_select completes its subscription case when a blocking thread publishes",
          "[asio][select][topic]") {
  asio::io_context io;
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(1);
  int from_sub = 0;
  int from_ch = 0;
  std::optional<postbox::select_result> result;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        result = co_await postbox::async_select(
            postbox::on_receive(sub, [&](postbox::delivery<int> d) { from_sub = *d; }),
            postbox::on_receive(ch, [&](int v) { from_ch = v; }), asio::use_awaitable);
      },
      asio::detached);
  io.poll();
  REQUIRE_FALSE(result.has_value());
  std::thread publisher([&] { (void)topic.publish(6); });
  publisher.join();
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->ok());
  REQUIRE(result->index == 0);
  REQUIRE(from_sub == 6);
  REQUIRE(from_ch == 0);
  REQUIRE(topic.publish(7).delivered == 1);
  REQUIRE(**sub.try_receive() == 7);  // the completed select left no waker on the subscription
}

TEST_CASE("resetting a group subscription completes a pending Asio async_select with closed for its case",
          "[asio][select][topic]") {
  asio::io_context io;
  postbox::topic<int> topic;
  postbox::subscription_options opts;
  opts.group = "g";
  auto other = topic.subscribe(opts);  // keeps the group's queue open: only the handle's detach wakes the select
  auto sub = topic.subscribe(opts);
  postbox::channel<int> ch(1);
  bool ran = false;
  std::optional<postbox::select_result> result;
  postbox::async_select(postbox::on_receive(sub, [&](postbox::delivery<int>) { ran = true; }),
                        postbox::on_receive(ch, [&](int) { ran = true; }),
                        asio::bind_executor(io, [&](std::exception_ptr e, postbox::select_result r) {
                          REQUIRE_FALSE(e);
                          result = r;
                        }));
  io.poll();
  REQUIRE_FALSE(result.has_value());
  std::thread resetter([&] { sub.reset(); });  // must not wait for the pending operation
  resetter.join();
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->status == postbox::select_status::closed);
  REQUIRE(result->index == 0);
  REQUIRE_FALSE(ran);
  REQUIRE(topic.publish(2).delivered == 1);
  REQUIRE(**other.try_receive() == 2);
}

TEST_CASE("an Asio cancellation completes a pending async_select on a subscription with canceled and takes nothing",
          "[asio][select][topic]") {
  asio::io_context io;
  postbox::topic<int> topic;
  auto sub = topic.subscribe();
  postbox::channel<int> ch(1);
  asio::cancellation_signal signal;
  bool ran = false;
  std::optional<postbox::select_result> result;
  postbox::async_select(postbox::on_receive(sub, [&](postbox::delivery<int>) { ran = true; }),
                        postbox::on_receive(ch, [&](int) { ran = true; }),
                        asio::bind_cancellation_slot(
                            signal.slot(), asio::bind_executor(io, [&](std::exception_ptr e, postbox::select_result r) {
                              REQUIRE_FALSE(e);
                              result = r;
                            })));
  io.poll();
  REQUIRE_FALSE(result.has_value());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(topic.publish(3).delivered == 1);
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->status == postbox::select_status::canceled);
  REQUIRE_FALSE(ran);
  REQUIRE(**sub.try_receive() == 3);
}

TEST_CASE("an Asio async_select's after case and deadline run on a timer service's manual clock",
          "[asio][select][timer]") {
  asio::io_context io;
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> ch(1);
  std::optional<postbox::select_result> first;
  std::optional<postbox::select_result> second;
  postbox::select_options opts;
  opts.deadline = clock.now() + 5s;
  postbox::async_select(timers, opts, postbox::on_receive(ch, [](int) {}), postbox::after(2s, [] {}),
                        asio::bind_executor(io, [&](std::exception_ptr, postbox::select_result r) { first = r; }));
  postbox::async_select(timers, opts, postbox::on_receive(ch, [](int) {}), postbox::after(1h, [] {}),
                        asio::bind_executor(io, [&](std::exception_ptr, postbox::select_result r) { second = r; }));
  io.poll();
  REQUIRE_FALSE(first.has_value());
  clock.advance(2s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(eventually([&] {
    io.poll();
    return first.has_value();
  }));
  REQUIRE(first->index == 1);
  REQUIRE(first->ok());
  REQUIRE_FALSE(second.has_value());
  clock.advance(3s);
  timers.run_due();
  REQUIRE(eventually([&] {
    io.poll();
    return second.has_value();
  }));
  REQUIRE(second->status == postbox::select_status::timeout);
  REQUIRE(timers.pending() == 0);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  REQUIRE(ch.try_receive() == 1);
}

TEST_CASE("a case handler's exception reaches a use_awaitable async_select's coroutine", "[asio][select]") {
  asio::io_context io;
  postbox::channel<int> ch(1);
  REQUIRE(ch.try_send(1) == postbox::send_status::ok);
  bool caught = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        try {
          (void)co_await postbox::async_select(postbox::on_receive(ch, [](int) { throw std::runtime_error("x"); }),
                                               asio::use_awaitable);
        } catch (const std::runtime_error&) {
          caught = true;
        }
      },
      asio::detached);
  io.run();
  REQUIRE(caught);
  REQUIRE(ch.size_approx() == 0);
}

TEST_CASE("Asio async_select cancel racing delivery: every message is taken once or left", "[asio][select][stress]") {
  const int rounds = static_cast<int>(scaled(1000));
  asio::io_context io;
  postbox::channel<int> a(4);
  postbox::channel<int> b(4);
  std::int64_t taken = 0;
  std::int64_t left = 0;
  for (int i = 1; i <= rounds; ++i) {
    asio::cancellation_signal signal;
    std::optional<postbox::select_result> result;
    int handled = 0;
    postbox::async_select(
        postbox::on_receive(a, [&](int v) { taken += v; ++handled; }),
        postbox::on_receive(b, [&](int v) { taken += v; ++handled; }),
        asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, [&](std::exception_ptr,
                                                                                postbox::select_result r) {
                                       result = r;
                                     })));
    io.restart();
    io.poll();
    std::thread sender([&] { (void)((i % 2) != 0 ? a : b).try_send(i); });
    signal.emit(asio::cancellation_type::terminal);  // the slot is used on this (the io) thread only
    sender.join();
    io.restart();
    io.run();
    REQUIRE(result.has_value());
    REQUIRE(handled == (result->ok() ? 1 : 0));
    if (!result->ok()) REQUIRE(result->status == postbox::select_status::canceled);
    while (auto v = a.try_receive()) left += *v;
    while (auto v = b.try_receive()) left += *v;
  }
  REQUIRE(taken + left == static_cast<std::int64_t>(rounds) * (rounds + 1) / 2);
}

// --- deadlines --------------------------------------------------------------------

TEST_CASE("Asio async_receive_until and async_send_until time out on a manual clock and move nothing",
          "[asio][timer]") {
  asio::io_context io;
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> empty(1);
  postbox::channel<int> full(1);
  REQUIRE(full.try_send(1) == postbox::send_status::ok);
  std::optional<postbox::receive_status> r;
  std::optional<postbox::send_status> s;
  postbox::async_receive_until(empty, timers, clock.now() + 1s,
                               asio::bind_executor(io, [&](postbox::receive_result<int> x) { r = x.status(); }));
  postbox::async_send_until(full, 2, timers, clock.now() + 2s,
                            asio::bind_executor(io, [&](postbox::send_status x) { s = x; }));
  io.poll();
  REQUIRE(timers.pending() == 2);
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(eventually([&] {
    io.poll();
    return r.has_value();
  }));
  REQUIRE(r == postbox::receive_status::timeout);
  REQUIRE_FALSE(s.has_value());
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  io.restart();
  io.run();
  REQUIRE(s == postbox::send_status::timeout);
  REQUIRE(full.try_receive() == 1);
  REQUIRE(full.size_approx() == 0);
}

TEST_CASE("an Asio receive completing before its deadline withdraws its timer", "[asio][timer]") {
  asio::io_context io;
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<int> ch(1);
  std::optional<int> got;
  postbox::async_receive_until(ch, timers, clock.now() + 1s,
                               asio::bind_executor(io, [&](postbox::receive_result<int> x) { got = *x; }));
  io.poll();
  REQUIRE(timers.pending() == 1);
  REQUIRE(ch.try_send(4) == postbox::send_status::ok);
  io.run();
  REQUIRE(got == 4);
  REQUIRE(timers.pending() == 0);
}

// --- consumer handlers as asio::awaitable ----------------------------------------------

namespace {

using env_t = postbox::envelope<int>;

struct awaitable_rig {
  asio::io_context io;
  postbox::executor_scheduler<asio::io_context::executor_type> sched{io.get_executor()};
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{16};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};
  postbox::channel<int> gate{16};

  [[nodiscard]] postbox::consumer_options options() {
    postbox::consumer_options o;
    o.threads = 0;
    o.max_in_flight = 8;
    o.jitter_seed = 7;
    o.clock = &clock;
    o.scheduler = sched;
    o.retry.max_attempts = 3;
    o.retry.initial_backoff = 10s;
    o.retry.multiplier = 1.0;
    o.retry.full_jitter = false;
    return o;
  }
  void send(int n) {
    REQUIRE(ch.try_send(postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, clock)) ==
            postbox::send_status::ok);
  }
  // Runs the io_context until `done` holds (the handlers wait on the gate).
  template <class Cond>
  bool drive(Cond done) {
    return eventually([&] {
      io.restart();
      io.poll();
      return done();
    });
  }
};

}  // namespace

TEST_CASE("a consumer handler returning asio::awaitable<settlement> settles with its result", "[asio][consumer]") {
  awaitable_rig r;
  r.send(1);
  r.send(2);
  std::vector<int> seen;
  auto handler = [&](const env_t& e, postbox::consume_context& ctx) -> asio::awaitable<postbox::settlement> {
    const int payload = e.payload;  // read before suspending
    const auto attempt = ctx.attempt();
    auto g = co_await postbox::async_receive(r.gate, asio::use_awaitable);
    seen.push_back(payload);
    co_return (*g == 1 && attempt == 1) ? postbox::settlement::retry() : postbox::settlement::ack();
  };
  postbox::consumer<int> c(postbox::channel_source<int>(r.ch, "numbers"),
                           postbox::awaitable_handler(r.io.get_executor(), handler), r.dlq, r.options());
  REQUIRE(c.poll() == 2);
  REQUIRE(r.drive([&] { return c.stats().running == 2; }));
  REQUIRE(r.gate.try_send(0) == postbox::send_status::ok);
  REQUIRE(r.gate.try_send(1) == postbox::send_status::ok);
  REQUIRE(r.drive([&] { return c.stats().running == 0; }));
  REQUIRE(seen.size() == 2);
  const auto s = c.stats();
  REQUIRE(s.acked == 1);
  REQUIRE(s.retried == 1);
}

TEST_CASE("an exception from an asio::awaitable handler is the handler's exception: a transient one retries",
          "[asio][consumer]") {
  awaitable_rig r;
  r.send(1);
  auto handler = [&](const env_t&) -> asio::awaitable<postbox::settlement> {
    (void)co_await postbox::async_receive(r.gate, asio::use_awaitable);
    throw std::runtime_error("transient");
  };
  postbox::consumer<int> c(postbox::channel_source<int>(r.ch, "numbers"),
                           postbox::awaitable_handler(r.io.get_executor(), handler), r.dlq, r.options());
  REQUIRE(c.poll() == 1);
  REQUIRE(r.gate.try_send(0) == postbox::send_status::ok);
  REQUIRE(r.drive([&] { return c.stats().running == 0; }));
  REQUIRE(c.stats().retried == 1);
  REQUIRE(c.stats().acked == 0);
}

TEST_CASE("destroying the consumer cancels a still running asio::awaitable handler on its executor",
          "[asio][consumer]") {
  awaitable_rig r;
  r.send(1);
  std::optional<postbox::receive_status> seen;
  auto handler = [&](const env_t&) -> asio::awaitable<postbox::settlement> {
    auto g = co_await postbox::async_receive(r.gate, asio::use_awaitable);
    seen = g.status();
    co_return postbox::settlement::ack();
  };
  {
    postbox::consumer<int> c(postbox::channel_source<int>(r.ch, "numbers"),
                             postbox::awaitable_handler(r.io.get_executor(), handler), r.dlq, r.options());
    REQUIRE(c.poll() == 1);
    r.io.poll();  // the awaitable starts and suspends on the gate
    REQUIRE_FALSE(seen.has_value());
  }  // the consumer destroys the suspended task, which posts a terminal cancellation
  r.io.restart();
  r.io.run();  // returns once the canceled awaitable has completed
  REQUIRE(seen == postbox::receive_status::canceled);
  REQUIRE(r.gate.try_send(5) == postbox::send_status::ok);
  REQUIRE(r.gate.try_receive() == 5);  // the canceled wait took nothing
}

TEST_CASE("a deferred async_select runs its cases only when launched", "[asio][select]") {
  asio::io_context io;
  postbox::channel<int> ch(1);
  REQUIRE(ch.try_send(4) == postbox::send_status::ok);
  int got = 0;
  auto op = postbox::async_select(postbox::on_receive(ch, [&](int v) { got = v; }), asio::experimental::deferred);
  REQUIRE(ch.size_approx() == 1);  // nothing happens until launched
  std::optional<postbox::select_result> result;
  std::move(op)(asio::bind_executor(io, [&](std::exception_ptr e, postbox::select_result x) {
    REQUIRE_FALSE(e);
    result = x;
  }));
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->ok());
  REQUIRE(got == 4);
}

// --- streams, request-reply, operations, timers ----------------------------------

TEST_CASE("a use_awaitable stream reader fed by an appender thread reads every record once", "[asio][stream]") {
  const std::uint64_t n = scaled(20000);
  asio::io_context io;
  postbox::stream<std::uint64_t> s(4);
  auto reader = s.read_from();
  std::uint64_t sum = 0;
  std::uint64_t count = 0;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        while (count < n) {
          auto r = co_await postbox::async_poll(reader, 64, asio::use_awaitable);
          if (!r.ok()) co_return;
          for (const auto& rec : r.records) {
            sum += rec.value;
            ++count;
          }
        }
      },
      asio::detached);
  std::thread appender([&] {
    for (std::uint64_t i = 1; i <= n; ++i) (void)s.append(std::to_string(i % 7), i);
  });
  io.run();  // returns once the coroutine has read n records
  appender.join();
  REQUIRE(count == n);
  REQUIRE(sum == n * (n + 1) / 2);
  REQUIRE(reader.poll().records.empty());
}

TEST_CASE("a use_awaitable group member poll resumes with an append and commits it", "[asio][stream]") {
  asio::io_context io;
  postbox::stream<int> s(1);
  auto member = s.group("g").join();
  std::optional<postbox::read_result<int>> got;
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { got = co_await postbox::async_poll(member, 8, asio::use_awaitable); },
      asio::detached);
  io.poll();
  REQUIRE_FALSE(got.has_value());
  std::thread appender([&] { (void)s.append("k", 9); });
  io.run();
  appender.join();
  REQUIRE(got.has_value());
  REQUIRE(got->records.size() == 1);
  REQUIRE(got->records[0].value == 9);
  REQUIRE(member.commit() == postbox::errc::ok);
}

TEST_CASE("an Asio cancellation completes a pending stream poll with canceled and reads nothing", "[asio][stream]") {
  asio::io_context io;
  postbox::stream<int> s(1);
  auto reader = s.read_from();
  asio::cancellation_signal signal;
  std::optional<postbox::errc> status;
  postbox::async_poll(reader, 8, asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, [&](auto r) {
                                                                status = r.status;
                                                              })));
  io.poll();
  REQUIRE_FALSE(status.has_value());
  signal.emit(asio::cancellation_type::terminal);
  (void)s.append("a", 1);  // appended after the cancel: left for the next poll
  io.run();
  REQUIRE(status == postbox::errc::canceled);
  REQUIRE(reader.poll().records.size() == 1);
}

namespace {
struct asio_rr_rig {
  postbox::manual_clock clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
};
int asio_twice(const postbox::envelope<int>& e) { return e.payload * 2; }
}  // namespace

TEST_CASE("a use_awaitable async_request on an io_context gets the responder's reply", "[asio][request_reply]") {
  asio_rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, asio_twice, r.clock, 0);
  asio::io_context io;
  std::optional<postbox::reply_outcome<int>> got;
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { got = co_await postbox::async_request(req, 21, 5s, asio::use_awaitable); },
      asio::detached);
  io.poll();  // the request is sent; the coroutine waits
  REQUIRE_FALSE(got.has_value());
  bool replied = false;
  std::thread replier([&] { replied = eventually([&] { return resp.poll() == 1; }); });
  io.run();
  replier.join();
  REQUIRE(replied);
  REQUIRE(got.has_value());
  REQUIRE(got->ok());
  REQUIRE(got->reply->payload == 42);
}

TEST_CASE("a use_awaitable async_get on an io_context takes a future's outcome set by another thread",
          "[asio][request_reply]") {
  asio_rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, asio_twice, r.clock, 0);
  auto f = req.request(5, 5s);
  REQUIRE(f.has_value());
  asio::io_context io;
  std::optional<postbox::result<postbox::reply_outcome<int>>> got;
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { got = co_await postbox::async_get(*f, asio::use_awaitable); },
      asio::detached);
  io.poll();
  REQUIRE_FALSE(got.has_value());
  std::thread replier([&] { (void)resp.poll(); });
  io.run();
  replier.join();
  REQUIRE(got.has_value());
  REQUIRE(got->has_value());
  REQUIRE((*got)->reply->payload == 10);
}

namespace {
// Work that waits until released (or stopped), so tests choose the order.
struct asio_gate {
  std::atomic<bool> open{false};
  postbox::operations<int>::work make(int value) {
    return [this, value](postbox::operation_context& ctx) {
      ctx.report_progress(10, "started");
      postbox_test::eventually([&] { return open.load() || ctx.stop_token().stop_requested(); });
      return value;
    };
  }
};
}  // namespace

TEST_CASE("use_awaitable async_watch and async_wait on an io_context see the next and the terminal snapshot",
          "[asio][operations]") {
  postbox::manual_clock clock;
  asio_gate g;  // before ops: ops' destructor joins workers that may still run the gate's work
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("alice", "", "", g.make(42));
  REQUIRE(sub.has_value());
  REQUIRE(eventually([&] { return ops.get("alice", sub->id)->progress == 10; }));
  const std::uint64_t seen = ops.get("alice", sub->id)->version;
  asio::io_context io;
  std::optional<postbox::result<postbox::operation_snapshot<int>>> watched;
  std::optional<postbox::result<postbox::operation_snapshot<int>>> waited;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        watched = co_await postbox::async_watch(ops, "alice", sub->id, seen, asio::use_awaitable);
      },
      asio::detached);
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { waited = co_await postbox::async_wait(ops, "alice", sub->id, asio::use_awaitable); },
      asio::detached);
  io.poll();
  REQUIRE_FALSE(watched.has_value());  // nothing changed since `seen`
  REQUIRE_FALSE(waited.has_value());
  g.open = true;
  io.run();
  REQUIRE(watched.has_value());
  REQUIRE(watched->has_value());
  REQUIRE((*watched)->version > seen);
  REQUIRE(waited.has_value());
  REQUIRE(waited->has_value());
  REQUIRE((*waited)->state == postbox::operation_state::succeeded);
  REQUIRE((*waited)->result == 42);
}

TEST_CASE("use_awaitable async_sleep_for and async_sleep_until complete when the timer service runs them",
          "[asio][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  asio::io_context io;
  std::optional<postbox::errc> slept_for;
  std::optional<postbox::errc> slept_until;
  asio::co_spawn(
      io, [&]() -> asio::awaitable<void> { slept_for = co_await postbox::async_sleep_for(timers, 5s, asio::use_awaitable); },
      asio::detached);
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        slept_until = co_await postbox::async_sleep_until(timers, clock.now() + 8s, asio::use_awaitable);
      },
      asio::detached);
  io.poll();
  REQUIRE(timers.pending() == 2);
  clock.advance(4s);
  REQUIRE(timers.run_due() == 0);
  io.poll();
  REQUIRE_FALSE(slept_for.has_value());
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(eventually([&] {
    io.poll();
    return slept_for.has_value();
  }));
  REQUIRE(slept_for == postbox::errc::ok);
  REQUIRE_FALSE(slept_until.has_value());
  clock.advance(3s);
  REQUIRE(timers.run_due() == 1);
  io.restart();
  io.run();
  REQUIRE(slept_until == postbox::errc::ok);
}

TEST_CASE("an Asio cancellation completes a pending async_sleep_for with canceled and withdraws its timer",
          "[asio][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  asio::io_context io;
  asio::cancellation_signal signal;
  std::optional<postbox::errc> status;
  postbox::async_sleep_for(timers, 5s, asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, [&](postbox::errc e) {
                                                                       status = e;
                                                                     })));
  io.poll();
  REQUIRE(timers.pending() == 1);
  signal.emit(asio::cancellation_type::terminal);
  io.run();
  REQUIRE(status == postbox::errc::canceled);
  REQUIRE(timers.pending() == 0);
}

namespace {
/// A stand-in channel operation for the adapter's spin: try_once succeeds on
/// its `ready_at`-th call (never when 0) and counts the calls.
struct counted_op {
  using result_type = int;
  std::uint32_t ready_at = 0;
  std::uint32_t calls = 0;
  std::optional<int> try_once() noexcept {
    ++calls;
    if (ready_at != 0 && calls == ready_at) return 7;
    return std::nullopt;
  }
};
}  // namespace

TEST_CASE("the adapter's spin halves its budget on each failed poll, then only probes every 64th suspension",
          "[asio]") {
  using spin = postbox::detail::adapter_spin;
  spin s;
  s.budget = 32;
  std::uint32_t expect = 32;
  while (expect != 0) {
    counted_op op;
    REQUIRE_FALSE(s.poll(op).has_value());
    REQUIRE(op.calls == expect);  // polled the whole budget
    expect /= 2;
    REQUIRE(s.budget == expect);
  }
  // Budget zero: nothing polled, except a short probe on every 64th suspension.
  std::uint32_t polled = 0;
  for (std::uint32_t k = 1; k <= 2 * spin::probe_every; ++k) {
    counted_op op;
    REQUIRE_FALSE(s.poll(op).has_value());
    polled += op.calls;
    REQUIRE(op.calls == (k % spin::probe_every == 0 ? spin::probe_polls : 0U));
  }
  REQUIRE(polled == 2 * spin::probe_polls);
  REQUIRE(s.budget == 0);
}

TEST_CASE("a spin that finds the operation ready returns its result and doubles the budget up to the cap", "[asio]") {
  using spin = postbox::detail::adapter_spin;
  spin s;
  s.budget = 0;
  s.idle = spin::probe_every - 1;  // the next suspension probes
  counted_op probe{3};
  REQUIRE(s.poll(probe) == std::optional<int>(7));
  REQUIRE(probe.calls == 3);
  REQUIRE(s.budget == 2 * spin::probe_polls);
  for (int k = 0; k < 10; ++k) {
    counted_op op{1};
    REQUIRE(s.poll(op) == std::optional<int>(7));
  }
  REQUIRE(s.budget == spin::max_polls);
}

TEST_CASE("an adapter receive pending on an empty channel still completes when a later send wakes it", "[asio]") {
  // The spin before suspending gives up (nothing arrives on this thread);
  // the operation then waits without a thread until the send.
  asio::io_context io;
  postbox::channel<int> ch(4);
  std::optional<int> got;
  postbox::async_receive(ch, asio::bind_executor(io, [&](postbox::receive_result<int> r) { got = *r; }));
  REQUIRE(io.poll() == 0);
  REQUIRE_FALSE(got.has_value());
  REQUIRE(ch.try_send(5) == postbox::send_status::ok);
  io.run();
  REQUIRE(got == std::optional<int>(5));
}

#endif  // POSTBOX_WITH_ASIO
