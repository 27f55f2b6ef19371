// SPDX-License-Identifier: MIT
// Specification tests for postbox::operations: idempotent submit, states, cancel races, watch and expiry.
#include <postbox/operations.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::operation_state;

namespace {

// Work that waits until released (or stopped), so tests choose the order.
struct gate {
  std::atomic<bool> started{false};
  std::atomic<bool> open{false};
  postbox::operations<int>::work make(int value) {
    return [this, value](postbox::operation_context& ctx) {
      started = true;
      postbox_test::eventually([&] { return open.load() || ctx.stop_token().stop_requested(); });
      return value;
    };
  }
};

template <class Ops>
postbox::operation_snapshot<int> wait_terminal(Ops& ops, const std::string& caller, const std::string& id) {
  postbox::operation_snapshot<int> s;
  REQUIRE(postbox_test::eventually([&] {
    auto r = ops.get(caller, id);
    if (!r.has_value()) return false;
    s = *r;
    return postbox::is_terminal(s.state);
  }));
  return s;
}

}  // namespace

TEST_CASE("a submitted operation runs to succeeded with its result", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("alice", "k1", "fp", [](postbox::operation_context& ctx) {
    ctx.report_progress(50, "half");
    return 7;
  });
  REQUIRE(sub.has_value());
  CHECK(sub->disposition == postbox::submit_disposition::created);
  CHECK(sub->id.size() == 32);
  auto s = wait_terminal(ops, "alice", sub->id);
  CHECK(s.state == operation_state::succeeded);
  REQUIRE(s.result.has_value());
  CHECK(*s.result == 7);
  CHECK(s.progress == 100);
  CHECK(s.message == "half");
  CHECK(s.created_at == clock.now());
  CHECK(s.retry_after == postbox::duration::zero());
}

TEST_CASE("the same key and fingerprint returns the existing operation", "[operations]") {
  postbox::manual_clock clock;
  gate g;  // before ops: ops' destructor joins workers that may still run the gate's work
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "k", "fp", g.make(1));
  auto b = ops.submit("alice", "k", "fp", g.make(2));
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK(b->disposition == postbox::submit_disposition::existing);
  CHECK(b->id == a->id);
  g.open = true;
  CHECK(*wait_terminal(ops, "alice", a->id).result == 1);
}

TEST_CASE("the same key with another fingerprint is a conflict", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  g.open = true;
  auto a = ops.submit("alice", "k", "fp1", g.make(1));
  auto b = ops.submit("alice", "k", "fp2", g.make(2));
  REQUIRE(b.has_value());
  CHECK(b->disposition == postbox::submit_disposition::conflict);
  CHECK(b->id == a->id);
}

TEST_CASE("the same key from another caller is a separate operation", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  g.open = true;
  auto a = ops.submit("alice", "k", "fp", g.make(1));
  auto b = ops.submit("bob", "k", "fp", g.make(2));
  CHECK(b->disposition == postbox::submit_disposition::created);
  CHECK(a->id != b->id);
}

TEST_CASE("another caller's operation is reported as not found", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "k", "fp", g.make(1));
  CHECK(ops.get("bob", a->id).status() == postbox::errc::not_found);
  CHECK(ops.cancel("bob", a->id).status() == postbox::errc::not_found);
  CHECK(ops.watch("bob", a->id, [](const auto&) {}).status() == postbox::errc::not_found);
  CHECK(ops.get("alice", "00000000000000000000000000000000").status() == postbox::errc::not_found);
  g.open = true;
}

TEST_CASE("cancel of a running operation wins and signals the stop token", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "k", "fp", g.make(1));
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  auto c = ops.cancel("alice", a->id);
  REQUIRE(c.has_value());
  CHECK(*c == operation_state::canceled);
  auto s = wait_terminal(ops, "alice", a->id);
  CHECK(s.state == operation_state::canceled);
  CHECK_FALSE(s.result.has_value());  // the work's value, returned after the stop, is discarded
  REQUIRE(s.error.has_value());
  CHECK(s.error->code == postbox::errc::canceled);
}

TEST_CASE("cancel after completion reports the completed state", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "", "", [](postbox::operation_context&) { return 3; });
  wait_terminal(ops, "alice", a->id);
  auto c = ops.cancel("alice", a->id);
  REQUIRE(c.has_value());
  CHECK(*c == operation_state::succeeded);
  CHECK(ops.get("alice", a->id)->state == operation_state::succeeded);
}

TEST_CASE("racing cancel and completion agree on the first terminal transition", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.workers = 2, .queue_capacity = 4096});
  const int n = static_cast<int>(postbox_test::scaled(400));
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) ids.push_back(ops.submit("c", "", "", [i](postbox::operation_context&) { return i; })->id);
  std::vector<operation_state> said(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) said[i] = *ops.cancel("c", ids[i]);
  int canceled = 0, succeeded = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    auto s = wait_terminal(ops, "c", ids[i]);
    CHECK(s.state == said[i]);  // the state cancel reported is the final one
    if (s.state == operation_state::canceled) {
      ++canceled;
      CHECK_FALSE(s.result.has_value());
    } else {
      ++succeeded;
      CHECK(*s.result == static_cast<int>(i));
    }
  }
  CHECK(canceled + succeeded == n);
}

TEST_CASE("a failing operation records a structured error with a generic message and an incident", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "", "", [](postbox::operation_context&) -> int {
    throw postbox::error(postbox::errc::store_error, "disk");
  });
  auto s = wait_terminal(ops, "alice", a->id);
  CHECK(s.state == operation_state::failed);
  REQUIRE(s.error.has_value());
  CHECK(s.error->code == postbox::errc::store_error);
  CHECK(s.error->incident.size() == 32);
  CHECK(s.error->message == "the operation failed; reference " + s.error->incident);
}

TEST_CASE("a watcher is pushed every state change in version order", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  auto a = ops.submit("alice", "", "", [&](postbox::operation_context& ctx) {
    postbox_test::eventually([&] { return g.open.load(); });
    ctx.report_progress(40, "working");
    return 5;
  });
  std::mutex m;
  std::vector<postbox::operation_snapshot<int>> seen;
  auto w = ops.watch("alice", a->id, [&](const postbox::operation_snapshot<int>& s) {
    std::lock_guard lock(m);
    seen.push_back(s);
  });
  REQUIRE(w.has_value());
  g.open = true;
  wait_terminal(ops, "alice", a->id);
  std::lock_guard lock(m);
  REQUIRE_FALSE(seen.empty());
  CHECK(seen.back().state == operation_state::succeeded);
  CHECK(seen.back().result == 5);
  for (std::size_t i = 1; i < seen.size(); ++i) CHECK(seen[i].version > seen[i - 1].version);
}

TEST_CASE("a record and its idempotency key expire after retention on the clock", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.retention = 10min});
  auto a = ops.submit("alice", "k", "fp", [](postbox::operation_context&) { return 1; });
  wait_terminal(ops, "alice", a->id);
  clock.advance(9min);
  CHECK(ops.get("alice", a->id).has_value());
  CHECK(ops.sweep() == 0);
  clock.advance(1min);
  CHECK(ops.sweep() == 1);
  CHECK(ops.get("alice", a->id).status() == postbox::errc::not_found);
  auto again = ops.submit("alice", "k", "other", [](postbox::operation_context&) { return 2; });
  CHECK(again->disposition == postbox::submit_disposition::created);
  CHECK(again->id != a->id);
}

TEST_CASE("a full executor queue refuses submissions with busy", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock, {.workers = 1, .queue_capacity = 1});
  auto running = ops.submit("a", "", "", g.make(1));
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  auto queued = ops.submit("a", "", "", g.make(2));
  REQUIRE(queued.has_value());
  CHECK(ops.get("a", queued->id)->state == operation_state::pending);
  CHECK(ops.get("a", queued->id)->retry_after == std::chrono::seconds(1));
  auto refused = ops.submit("a", "key", "", g.make(3));
  CHECK(refused.status() == postbox::errc::busy);
  CHECK(ops.size_approx() == 2);
  g.open = true;
}

TEST_CASE("a pending operation canceled before it starts never runs", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock, {.workers = 1, .queue_capacity = 4});
  std::atomic<bool> second_ran{false};
  REQUIRE(ops.submit("a", "", "", g.make(1)).has_value());
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  auto b = ops.submit("a", "", "", [&](postbox::operation_context&) {
    second_ran = true;
    return 2;
  });
  CHECK(*ops.cancel("a", b->id) == operation_state::canceled);
  g.open = true;
  wait_terminal(ops, "a", b->id);
  auto c = ops.submit("a", "", "", [](postbox::operation_context&) { return 3; });
  wait_terminal(ops, "a", c->id);  // FIFO: b was dequeued before c finished
  CHECK_FALSE(second_ran.load());
}

TEST_CASE("operation ids are 128-bit hex and distinct", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.queue_capacity = 1024});
  std::vector<std::string> ids;
  for (int i = 0; i < 200; ++i) ids.push_back(ops.submit("a", "", "", [](postbox::operation_context&) { return 0; })->id);
  std::sort(ids.begin(), ids.end());
  CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());
  for (auto& id : ids) CHECK(id.find_first_not_of("0123456789abcdef") == std::string::npos);
}

TEST_CASE("an operation tracker's record count renders as Prometheus text", "[operations][metrics]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  postbox::metrics_registry metrics;
  auto reg = postbox::register_operations(metrics, "jobs", ops);
  CHECK_THAT(metrics.render_prometheus(), Catch::Contains("postbox_operations_records{component=\"operations\",name=\"jobs\"} 0"));
  auto sub = ops.submit("alice", "k1", "fp", [](postbox::operation_context&) { return 1; });
  REQUIRE(sub.has_value());
  (void)wait_terminal(ops, "alice", sub->id);
  CHECK_THAT(metrics.render_prometheus(), Catch::Contains("postbox_operations_records{component=\"operations\",name=\"jobs\"} 1"));
}

namespace {

// Work whose last copy signals when it is destroyed and then waits for the
// test's go-ahead: destroying a refused submission's work marks the moment
// submit() has given up on it, which is where the old code still published
// the idempotency key.
struct dropped_work {
  std::shared_ptr<int> last = std::make_shared<int>(0);
  std::atomic<bool>* dropping = nullptr;
  std::atomic<bool>* go_on = nullptr;
  dropped_work(std::atomic<bool>* d, std::atomic<bool>* g) : dropping(d), go_on(g) {}
  dropped_work(const dropped_work&) = default;
  dropped_work(dropped_work&&) noexcept = default;
  dropped_work& operator=(const dropped_work&) = delete;
  dropped_work& operator=(dropped_work&&) = delete;
  ~dropped_work() {
    if (last && last.use_count() == 1) {
      dropping->store(true);
      (void)postbox_test::eventually([&] { return go_on->load(); });
    }
  }
  int operator()(postbox::operation_context&) const { return 3; }
};

}  // namespace

TEST_CASE("a submit racing a refused submit of the same key never answers existing for dropped work",
          "[operations]") {
  postbox::manual_clock clock;
  gate g;
  std::atomic<bool> dropping{false}, go_on{false};
  postbox::operations<int> ops(clock, {.workers = 1, .queue_capacity = 1});
  REQUIRE(ops.submit("a", "", "", g.make(1)).has_value());
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  REQUIRE(ops.submit("a", "", "", g.make(2)).has_value());  // the queue is now full
  std::optional<postbox::result<postbox::submission>> first;
  std::thread t([&] { first.emplace(ops.submit("alice", "k", "fp", dropped_work(&dropping, &go_on))); });
  // The first submit was refused and is destroying its work: the second one
  // runs exactly now.
  REQUIRE(postbox_test::eventually([&] { return dropping.load(); }));
  auto second = ops.submit("alice", "k", "fp", [](postbox::operation_context&) { return 4; });
  go_on = true;
  t.join();
  REQUIRE(first.has_value());
  CHECK(first->status() == postbox::errc::busy);
  CHECK(second.status() == postbox::errc::busy);
  if (second.has_value()) CHECK(ops.get("alice", second->id).has_value());  // the defect: not_found
  CHECK(ops.size_approx() == 2);
  g.open = true;
}

TEST_CASE("wait blocks until the operation is terminal and returns its final snapshot", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("a", "", "", g.make(5));
  REQUIRE(sub.has_value());
  std::atomic<bool> returned{false};
  std::optional<postbox::result<postbox::operation_snapshot<int>>> got;
  std::thread waiter([&] {
    got.emplace(ops.wait("a", sub->id));
    returned = true;
  });
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  CHECK_FALSE(returned.load());  // the work is held by the gate
  g.open = true;
  waiter.join();
  REQUIRE(got.has_value());
  REQUIRE(got->has_value());
  CHECK((*got)->state == operation_state::succeeded);
  CHECK((*got)->result == 5);
}

TEST_CASE("a stop request wakes wait with canceled and leaves the operation running", "[operations]") {
  postbox::manual_clock clock;
  gate g;
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("a", "", "", g.make(6));
  REQUIRE(sub.has_value());
  REQUIRE(postbox_test::eventually([&] { return g.started.load(); }));
  std::stop_source stop;
  std::optional<postbox::result<postbox::operation_snapshot<int>>> got;
  std::thread waiter([&] { got.emplace(ops.wait("a", sub->id, stop.get_token())); });
  stop.request_stop();
  waiter.join();
  REQUIRE(got.has_value());
  CHECK(got->status() == postbox::errc::canceled);
  CHECK(ops.get("a", sub->id)->state == operation_state::running);  // nothing consumed or changed
  g.open = true;
  auto final_state = ops.wait("a", sub->id);
  REQUIRE(final_state.has_value());
  CHECK(final_state->state == operation_state::succeeded);
}

TEST_CASE("wait on an unknown or another caller's operation is not found", "[operations]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("a", "", "", [](postbox::operation_context&) { return 1; });
  REQUIRE(sub.has_value());
  CHECK(ops.wait("b", sub->id).status() == postbox::errc::not_found);
  CHECK(ops.wait("a", "nope").status() == postbox::errc::not_found);
  CHECK(ops.wait("a", sub->id).has_value());
}
