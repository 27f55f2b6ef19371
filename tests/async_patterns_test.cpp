// SPDX-License-Identifier: MIT
// Tests for the awaitable forms of the patterns: timer sleeps, operations watch/wait, request-reply.
#include <postbox/async.hpp>
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>

using namespace std::chrono_literals;
using postbox_test::eventually;

namespace {

/// Runs the queue on the test thread until `t` is done (the resumption may
/// be posted from another thread, so it waits for it).
template <class Task>
bool drive_until_done(postbox::run_queue& q, Task& t) {
  return eventually([&] {
    q.poll();
    return t.done();
  });
}

postbox::task<postbox::errc> sleep_until(postbox::timer_service& timers, postbox::time_point at,
                                         std::stop_token stop = {}) {
  co_return co_await postbox::async_sleep_until(timers, at, stop);
}

// Work that waits until released (or stopped), so tests choose the order.
struct gate {
  std::atomic<bool> open{false};
  postbox::operations<int>::work make(int value) {
    return [this, value](postbox::operation_context& ctx) {
      ctx.report_progress(10, "started");
      postbox_test::eventually([&] { return open.load() || ctx.stop_token().stop_requested(); });
      return value;
    };
  }
};

using snapshot_result = postbox::result<postbox::operation_snapshot<int>>;

postbox::task<snapshot_result> watch_after(postbox::operations<int>& ops, std::string caller, std::string id,
                                           std::uint64_t after, std::stop_token stop = {}) {
  co_return co_await ops.async_watch(caller, id, after, stop);
}

postbox::task<snapshot_result> wait_for(postbox::operations<int>& ops, std::string caller, std::string id,
                                        std::stop_token stop = {}) {
  co_return co_await ops.async_wait(caller, id, stop);
}

struct rr_rig {
  postbox::manual_clock clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
};

int twice(const postbox::envelope<int>& e) { return e.payload * 2; }

using outcome = postbox::reply_outcome<int>;

postbox::task<outcome> ask(postbox::requester<int, int>& req, int v, std::stop_token stop = {}) {
  co_return co_await req.async_request(v, 5s, stop);
}

}  // namespace

// --- timers ---------------------------------------------------------------------

TEST_CASE("async_sleep_until resumes once the timer service runs the due timer", "[async][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  auto t = sleep_until(timers, clock.now() + 10s);
  t.start(q);
  REQUIRE_FALSE(t.done());
  REQUIRE(timers.pending() == 1);
  clock.advance(9s);
  timers.run_due();
  q.poll();
  REQUIRE_FALSE(t.done());
  clock.advance(1s);
  REQUIRE(timers.run_due() == 1);
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  REQUIRE(t.get() == postbox::errc::ok);
}

TEST_CASE("a deadline already passed completes async_sleep_until without suspending", "[async][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  auto t = sleep_until(timers, clock.now());
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(q.size_approx() == 0);
  REQUIRE(timers.pending() == 0);
  REQUIRE(t.get() == postbox::errc::ok);
}

TEST_CASE("a stop request ends async_sleep_for with canceled and withdraws its timer", "[async][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  std::stop_source stop;
  auto body = [](postbox::timer_service& ts, std::stop_token st) -> postbox::task<postbox::errc> {
    co_return co_await postbox::async_sleep_for(ts, 1h, st);
  };
  auto t = body(timers, stop.get_token());
  t.start(q);
  REQUIRE_FALSE(t.done());
  stop.request_stop();
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get() == postbox::errc::canceled);
  REQUIRE(timers.pending() == 0);
}

TEST_CASE("destroying a sleeping frame cancels its timer, which then never resumes it", "[async][timer]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::run_queue q;
  {
    auto t = sleep_until(timers, clock.now() + 5s);
    t.start(q);
    REQUIRE(timers.pending() == 1);
  }
  REQUIRE(timers.pending() == 0);
  clock.advance(10s);
  REQUIRE(timers.run_due() == 0);
  REQUIRE(q.poll() == 0);
}

// --- operations -------------------------------------------------------------------

TEST_CASE("async_watch resumes with the first snapshot after the version it has seen", "[async][operations]") {
  postbox::manual_clock clock;
  gate g;  // before ops: ops' destructor joins workers that may still run the gate's work
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  auto sub = ops.submit("alice", "", "", g.make(3));
  REQUIRE(sub.has_value());
  // Wait (on the condition) until the work reported its progress.
  REQUIRE(eventually([&] { return ops.get("alice", sub->id)->progress == 10; }));
  const std::uint64_t seen = ops.get("alice", sub->id)->version;
  auto t = watch_after(ops, "alice", sub->id, seen);
  t.start(q);
  REQUIRE_FALSE(t.done());  // nothing changed since `seen`
  g.open = true;
  REQUIRE(drive_until_done(q, t));
  auto r = t.get();
  REQUIRE(r.has_value());
  REQUIRE(r->version > seen);
}

TEST_CASE("async_watch with an old version completes at once with the current snapshot", "[async][operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  auto sub = ops.submit("alice", "", "", g.make(3));
  REQUIRE(sub.has_value());
  REQUIRE(eventually([&] { return ops.get("alice", sub->id)->progress == 10; }));
  auto t = watch_after(ops, "alice", sub->id, 0);
  t.start(q);
  // Running with progress reported is past version 0: completes without suspending.
  REQUIRE(t.done());
  auto r = t.get();
  REQUIRE(r.has_value());
  REQUIRE(r->version >= 1);
  g.open = true;
}

TEST_CASE("async_wait resumes with the terminal snapshot and its result", "[async][operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  auto sub = ops.submit("alice", "", "", g.make(42));
  REQUIRE(sub.has_value());
  auto t = wait_for(ops, "alice", sub->id);
  t.start(q);
  REQUIRE(eventually([&] { return ops.get("alice", sub->id)->progress == 10; }));
  q.poll();
  REQUIRE_FALSE(t.done());  // progress changes re-check, but only a terminal state completes it
  g.open = true;
  REQUIRE(drive_until_done(q, t));
  auto r = t.get();
  REQUIRE(r.has_value());
  REQUIRE(r->state == postbox::operation_state::succeeded);
  REQUIRE(r->result == 42);
}

TEST_CASE("a stop request cancels async_wait and the operation goes on", "[async][operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  std::stop_source stop;
  auto sub = ops.submit("alice", "", "", g.make(5));
  REQUIRE(sub.has_value());
  auto t = wait_for(ops, "alice", sub->id, stop.get_token());
  t.start(q);
  REQUIRE_FALSE(t.done());
  stop.request_stop();
  REQUIRE(drive_until_done(q, t));
  REQUIRE(t.get().status() == postbox::errc::canceled);
  g.open = true;
  auto done = ops.wait("alice", sub->id);
  REQUIRE(done.has_value());
  REQUIRE(done->state == postbox::operation_state::succeeded);
}

TEST_CASE("async_wait on another caller's operation is not_found without suspending", "[async][operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  auto sub = ops.submit("alice", "", "", g.make(1));
  REQUIRE(sub.has_value());
  auto t = wait_for(ops, "mallory", sub->id);
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(t.get().status() == postbox::errc::not_found);
  g.open = true;
}

TEST_CASE("async_watch completes at once on a terminal record, and with not_found on a swept one",
          "[async][operations]") {
  postbox::manual_clock clock;
  postbox::operations_options opts;
  opts.retention = 1min;
  postbox::operations<int> ops(clock, opts);
  postbox::run_queue q;
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) { return 1; });
  REQUIRE(sub.has_value());
  auto fin = ops.wait("alice", sub->id);
  REQUIRE(fin.has_value());
  auto t = watch_after(ops, "alice", sub->id, fin->version);
  t.start(q);
  REQUIRE(t.done());  // terminal: a watch never waits for a change that cannot come
  REQUIRE(t.get().has_value());
  clock.advance(2min);
  REQUIRE(ops.sweep() == 1);
  auto t2 = watch_after(ops, "alice", sub->id, fin->version);
  t2.start(q);
  REQUIRE(t2.done());
  REQUIRE(t2.get().status() == postbox::errc::not_found);
}

// --- request-reply ----------------------------------------------------------------

TEST_CASE("async_request resumes with the responder's reply", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::run_queue q;
  auto t = ask(req, 21);
  t.start(q);
  REQUIRE_FALSE(t.done());
  REQUIRE(resp.poll() == 1);  // replies on this thread: the completion posts the coroutine
  REQUIRE_FALSE(t.done());
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  auto o = t.get();
  REQUIRE(o.ok());
  REQUIRE(o.reply->payload == 42);
  REQUIRE(req.stats().replied == 1);
}

TEST_CASE("async_request completes with timeout when the deadline timer runs", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::run_queue q;
  auto t = ask(req, 1);
  t.start(q);
  r.clock.advance(4s);
  r.timers.run_due();
  q.poll();
  REQUIRE_FALSE(t.done());
  r.clock.advance(1s);
  r.timers.run_due();
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::timeout);
}

TEST_CASE("a responder's error reaches the awaiting coroutine", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(
      r.requests, r.registry,
      [](const postbox::envelope<int>&) -> int { POSTBOX_THROW(postbox::error(postbox::errc::conflict, "taken")); },
      r.clock, 0);
  postbox::run_queue q;
  auto t = ask(req, 1);
  t.start(q);
  REQUIRE(resp.poll() == 1);
  REQUIRE(q.poll() == 1);
  auto o = t.get();
  REQUIRE(o.status == postbox::errc::conflict);
  REQUIRE(o.error.has_value());
  REQUIRE_FALSE(o.reply.has_value());
}

TEST_CASE("a refused async_request completes at once with the refusal", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::run_queue q;
  r.requests.close();
  auto t = ask(req, 1);
  t.start(q);
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::closed);
  REQUIRE(req.stats().refused == 1);
}

TEST_CASE("a stop request cancels async_request's wait while the request stays pending", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::run_queue q;
  std::stop_source stop;
  auto t = ask(req, 1, stop.get_token());
  t.start(q);
  REQUIRE_FALSE(t.done());
  stop.request_stop();
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::canceled);
  REQUIRE(req.stats().pending == 1);  // its deadline still ends it
  r.clock.advance(5s);
  r.timers.run_due();
  REQUIRE(req.stats().timed_out == 1);
}

TEST_CASE("async_get canceled by a stop consumes nothing: the outcome stays in the future",
          "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::run_queue q;
  std::stop_source stop;
  auto f = req.request(4, 5s);
  REQUIRE(f.has_value());
  auto body = [](postbox::reply_future<outcome>& fut, std::stop_token st) -> postbox::task<postbox::result<outcome>> {
    co_return co_await postbox::async_get(fut, st);
  };
  auto t = body(*f, stop.get_token());
  t.start(q);
  REQUIRE_FALSE(t.done());
  stop.request_stop();
  REQUIRE(q.poll() == 1);
  REQUIRE(t.get().status() == postbox::errc::canceled);
  REQUIRE(resp.poll() == 1);
  REQUIRE(q.poll() == 0);  // the canceled wait left the continuation slot
  auto o = f->get();
  REQUIRE(o.ok());
  REQUIRE(o.reply->payload == 8);
}

TEST_CASE("async_get resumes with an outcome set by another thread", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::run_queue q;
  auto f = req.request(5, 5s);
  REQUIRE(f.has_value());
  auto body = [](postbox::reply_future<outcome>& fut) -> postbox::task<postbox::result<outcome>> {
    co_return co_await postbox::async_get(fut);
  };
  auto t = body(*f);
  t.start(q);
  std::thread replier([&] { (void)resp.poll(); });
  REQUIRE(drive_until_done(q, t));
  replier.join();
  auto o = t.get();
  REQUIRE(o.has_value());
  REQUIRE(o->reply->payload == 10);
}

TEST_CASE("destroying a frame suspended in async_request withdraws it before the reply", "[async][request_reply]") {
  rr_rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::run_queue q;
  {
    auto t = ask(req, 1);
    t.start(q);
  }
  REQUIRE(resp.poll() == 1);
  REQUIRE(q.size_approx() == 0);  // nothing posted for the destroyed frame
  REQUIRE(req.stats().replied == 1);
}

TEST_CASE("destroying the requester completes a suspended async_request with canceled", "[async][request_reply]") {
  rr_rig r;
  auto req = std::make_unique<postbox::requester<int, int>>(r.requests, r.registry, r.timers);
  postbox::run_queue q;
  auto t = ask(*req, 1);
  t.start(q);
  req.reset();
  REQUIRE(q.poll() == 1);
  REQUIRE(t.done());
  REQUIRE(t.get().status == postbox::errc::canceled);
}
