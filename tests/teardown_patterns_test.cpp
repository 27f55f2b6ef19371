// SPDX-License-Identifier: MIT
// Teardown stress: responders, requesters and operation trackers destroyed while their threads, callbacks and waiters are busy.
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

int iterations() { return static_cast<int>(postbox_test::scaled(1000)); }

struct rig {
  postbox::manual_clock clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
};

// One count per request: each outcome must arrive exactly once.
template <std::size_t N>
struct outcomes {
  std::array<std::atomic<int>, N> calls{};
  std::atomic<int> replied{0}, canceled{0}, other{0};
  void record(std::size_t i, const postbox::reply_outcome<int>& o) {
    calls[i].fetch_add(1);
    if (o.ok()) replied.fetch_add(1);
    else if (o.status == postbox::errc::canceled) canceled.fetch_add(1);
    else other.fetch_add(1);
  }
  bool each_once() const {
    for (auto& c : calls)
      if (c.load() != 1) return false;
    return true;
  }
};

}  // namespace

TEST_CASE("a responder destroyed while its handler runs answers that request once and stops", "[teardown]") {
  constexpr std::size_t n = 4;
  for (int it = 0; it < iterations(); ++it) {
    rig r;
    outcomes<n> seen;
    std::atomic<bool> entered{false}, release{false};
    std::atomic<int> handled{0};
    std::optional<postbox::requester<int, int>> req;
    req.emplace(r.requests, r.registry, r.timers);
    for (std::size_t i = 0; i < n; ++i)
      REQUIRE(req->request(static_cast<int>(i), 10s, [&seen, i](postbox::reply_outcome<int> o) { seen.record(i, o); }) ==
              postbox::errc::ok);
    std::optional<postbox::responder<int, int>> resp;
    resp.emplace(r.requests, r.registry,
                 [&](const postbox::envelope<int>& e) {
                   entered = true;
                   (void)postbox_test::eventually([&] { return release.load(); });
                   handled.fetch_add(1);
                   return e.payload;
                 },
                 r.clock, 2);
    REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
    std::thread destroyer([&] { resp.reset(); });
    release = true;  // races with the destructor's stop: both orders are valid
    destroyer.join();
    const int answered = handled.load();
    CHECK(answered >= 1);
    CHECK(seen.replied.load() == answered);
    req.reset();  // what the responder left queued is canceled now
    REQUIRE(seen.each_once());
    CHECK(seen.replied.load() + seen.canceled.load() == static_cast<int>(n));
    CHECK(seen.other.load() == 0);
    CHECK(r.requests.size_approx() == n - static_cast<std::size_t>(answered));
  }
}

TEST_CASE("a responder destroyed with requests queued stops without losing or doubling answers", "[teardown]") {
  constexpr std::size_t n = 16;
  for (int it = 0; it < iterations(); ++it) {
    rig r;
    outcomes<n> seen;
    std::atomic<int> handled{0};
    postbox::requester<int, int> req(r.requests, r.registry, r.timers);
    {
      postbox::responder<int, int> resp(
          r.requests, r.registry,
          [&](const postbox::envelope<int>& e) {
            handled.fetch_add(1);
            return e.payload;
          },
          r.clock, 2);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE(req.request(static_cast<int>(i), 10s, [&seen, i](postbox::reply_outcome<int> o) { seen.record(i, o); }) ==
                postbox::errc::ok);
    }  // destroyed while its workers are taking the queue
    CHECK(seen.replied.load() == handled.load());
    CHECK(r.requests.size_approx() == n - static_cast<std::size_t>(handled.load()));
    r.clock.advance(10s);
    r.timers.run_due();  // the rest time out, once each
    REQUIRE(seen.each_once());
    CHECK(seen.replied.load() + seen.other.load() == static_cast<int>(n));
    CHECK(seen.canceled.load() == 0);
  }
}

TEST_CASE("a requester destroyed while callbacks run and get() waiters block completes everything once", "[teardown]") {
  constexpr std::size_t n_cb = 6, n_fut = 3;
  for (int it = 0; it < iterations(); ++it) {
    rig r;
    outcomes<n_cb> seen;
    std::atomic<bool> alive{true};
    std::atomic<int> after_destruction{0};
    std::atomic<int> fut_ok{0}, fut_canceled{0}, fut_other{0};
    std::optional<postbox::requester<int, int>> req;
    req.emplace(r.requests, r.registry, r.timers);
    postbox::responder<int, int> resp(r.requests, r.registry, [](const postbox::envelope<int>& e) { return e.payload; },
                                      r.clock, 1);
    std::vector<std::thread> waiters;
    std::vector<postbox::reply_future<postbox::reply_outcome<int>>> futures;
    for (std::size_t i = 0; i < n_fut; ++i) {
      auto f = req->request(100, 10s);
      REQUIRE(f.has_value());
      futures.push_back(std::move(*f));
    }
    for (auto& f : futures)
      waiters.emplace_back([&, fp = &f] {
        const auto o = fp->get();
        if (o.ok()) fut_ok.fetch_add(1);
        else if (o.status == postbox::errc::canceled) fut_canceled.fetch_add(1);
        else fut_other.fetch_add(1);
      });
    for (std::size_t i = 0; i < n_cb; ++i)
      REQUIRE(req->request(static_cast<int>(i), 10s, [&, i](postbox::reply_outcome<int> o) {
        seen.record(i, o);
        std::this_thread::yield();  // widen the window in which the destructor may run
        if (!alive.load()) after_destruction.fetch_add(1);
      }) == postbox::errc::ok);
    req.reset();  // while the responder thread is replying
    alive = false;
    for (auto& w : waiters) w.join();
    REQUIRE(seen.each_once());
    CHECK(after_destruction.load() == 0);  // no callback still ran after ~requester returned
    CHECK(seen.replied.load() + seen.canceled.load() == static_cast<int>(n_cb));
    CHECK(fut_ok.load() + fut_canceled.load() == static_cast<int>(n_fut));
    CHECK(fut_other.load() == 0);
  }
}

TEST_CASE("a requester destroyed while a stop-token waiter blocks wakes it with the outcome or canceled", "[teardown]") {
  for (int it = 0; it < iterations(); ++it) {
    rig r;
    std::optional<postbox::requester<int, int>> req;
    req.emplace(r.requests, r.registry, r.timers);
    auto f = req->request(1, 10s);
    REQUIRE(f.has_value());
    std::stop_source stop;
    std::optional<postbox::result<postbox::reply_outcome<int>>> got;
    std::thread waiter([&] { got.emplace(f->get(stop.get_token())); });
    if (it % 2 == 0) stop.request_stop();  // half the time the stop races the destruction
    req.reset();
    waiter.join();
    REQUIRE(got.has_value());
    if (got->has_value()) {
      CHECK((*got)->status == postbox::errc::canceled);  // the requester's own cancel
    } else {
      CHECK(got->status() == postbox::errc::canceled);  // the stop came first: the outcome stays
      CHECK(f->get().status == postbox::errc::canceled);
    }
  }
}

TEST_CASE("an operation tracker destroyed while wait() callers block and watchers run wakes each once", "[teardown]") {
  constexpr std::size_t n = 6;
  for (int it = 0; it < iterations(); ++it) {
    postbox::manual_clock clock;
    std::array<std::atomic<int>, n> terminal_pushes{};
    std::array<std::atomic<int>, n> waits_done{};
    std::atomic<int> waited_terminal{0}, waited_stopped{0}, waited_other{0};
    std::vector<postbox::operations<int>::watch_handle> handles;  // outlive the tracker: allowed
    std::vector<std::thread> waiters;
    std::vector<std::string> ids;
    std::atomic<int> running{0};
    std::optional<postbox::operations<int>> ops;
    ops.emplace(clock, postbox::operations_options{.workers = 2, .queue_capacity = 8});
    for (std::size_t i = 0; i < n; ++i) {
      auto sub = ops->submit("a", "", "", [&](postbox::operation_context& ctx) {
        running.fetch_add(1);
        (void)postbox_test::eventually([&] { return ctx.stop_token().stop_requested(); });
        return 1;
      });
      REQUIRE(sub.has_value());
      ids.push_back(sub->id);
      auto h = ops->watch("a", sub->id, [&, i](const postbox::operation_snapshot<int>& s) {
        if (postbox::is_terminal(s.state)) terminal_pushes[i].fetch_add(1);
      });
      REQUIRE(h.has_value());
      handles.push_back(std::move(*h));
    }
    for (std::size_t i = 0; i < n; ++i)
      waiters.emplace_back([&, i] {
        auto w = ops->wait("a", ids[i]);
        waits_done[i].fetch_add(1);
        if (w.has_value() && postbox::is_terminal(w->state)) waited_terminal.fetch_add(1);
        else if (w.status() == postbox::errc::stopped) waited_stopped.fetch_add(1);
        else waited_other.fetch_add(1);
      });
    REQUIRE(postbox_test::eventually([&] { return running.load() == 2; }));  // two run, four queued
    // Every waiter is inside wait() before the destruction starts: calling a
    // member of a tracker being destroyed is not allowed.
    REQUIRE(postbox_test::eventually([&] { return ops->waiting_approx() == n; }));
    ops.reset();  // stops the running two, drops the queued four, wakes every waiter
    for (auto& w : waiters) w.join();
    for (std::size_t i = 0; i < n; ++i) {
      CHECK(terminal_pushes[i].load() == 1);
      CHECK(waits_done[i].load() == 1);
    }
    CHECK(waited_terminal.load() + waited_stopped.load() == static_cast<int>(n));
    CHECK(waited_other.load() == 0);
    handles.clear();  // after the tracker: inert
  }
}
