// SPDX-License-Identifier: MIT
// Specification tests for postbox::operations' security properties: internal errors never reach clients, polling rate limits, tenants, unguessable ids.
#include <postbox/operations.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstddef>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::operation_state;

namespace {

// What on_incident was told, copied out of the views.
struct incident_log {
  struct entry {
    std::string incident, operation_id, tenant, owner, detail;
    errc code = errc::ok;
    bool is_public = false;
  };
  std::mutex mutex;
  std::vector<entry> entries;

  std::function<void(const postbox::operation_incident&)> hook() {
    return [this](const postbox::operation_incident& e) {
      std::lock_guard lock(mutex);
      entries.push_back({std::string(e.incident), std::string(e.operation_id), std::string(e.tenant),
                         std::string(e.owner), std::string(e.detail), e.code, e.is_public});
    };
  }
  std::vector<entry> copy() {
    std::lock_guard lock(mutex);
    return entries;
  }
};

// Every text a client can read from a snapshot.
std::string client_text(const postbox::operation_snapshot<int>& s) {
  std::string t = s.id + "|" + s.message;
  if (s.error) t += "|" + s.error->message + "|" + s.error->incident;
  return t;
}

constexpr const char* leaky = "connect failed: postgres://svc:hunter2@10.0.0.7/orders";

postbox::task<postbox::result<postbox::operation_snapshot<int>>> wait_async(postbox::operations<int>& ops,
                                                                            postbox::operation_caller caller,
                                                                            std::string id) {
  co_return co_await ops.async_wait(caller, id);
}

// Runs the queue on the test thread until `t` is done (the resumption may be
// posted from a worker thread, so it waits for it).
template <class Task>
bool drive_until_done(postbox::run_queue& q, Task& t) {
  return postbox_test::eventually([&] {
    q.poll();
    return t.done();
  });
}

}  // namespace

// --- public / internal error split -------------------------------------------

TEST_CASE("an internal exception's text never reaches the client and goes to on_incident under the same incident id",
          "[operations][security]") {
  postbox::manual_clock clock;
  incident_log log;
  // Before ops: a watcher's last notification may still run when wait returns;
  // ops' destructor joins the worker that runs it.
  std::mutex m;
  std::vector<postbox::operation_snapshot<int>> pushed;
  std::atomic<bool> go{false};
  postbox::operations<int> ops(clock, {.on_incident = log.hook()});
  auto sub = ops.submit({"acme", "alice"}, "", "", [&](postbox::operation_context&) -> int {
    (void)postbox_test::eventually([&] { return go.load(); });
    throw std::runtime_error(leaky);
  });
  REQUIRE(sub.has_value());
  auto w = ops.watch({"acme", "alice"}, sub->id, [&](const postbox::operation_snapshot<int>& s) {
    std::lock_guard lock(m);
    pushed.push_back(s);
  });
  REQUIRE(w.has_value());
  go = true;
  auto waited = ops.wait({"acme", "alice"}, sub->id);
  REQUIRE(waited.has_value());
  auto got = ops.get({"acme", "alice"}, sub->id);
  REQUIRE(got.has_value());
  auto listed = ops.list({"acme", "alice"});
  REQUIRE(listed.has_value());
  REQUIRE(listed->size() == 1);

  std::vector<postbox::operation_snapshot<int>> seen{*waited, *got, listed->front()};
  {
    std::lock_guard lock(m);
    seen.insert(seen.end(), pushed.begin(), pushed.end());
  }
  for (const auto& s : seen) {
    CHECK_THAT(client_text(s), !Catch::Contains("hunter2") && !Catch::Contains("postgres"));
  }
  REQUIRE(got->state == operation_state::failed);
  REQUIRE(got->error.has_value());
  CHECK(got->error->code == errc::handler_error);
  CHECK(got->error->incident.size() == 32);
  CHECK(got->error->message == "the operation failed; reference " + got->error->incident);

  const auto incidents = log.copy();
  REQUIRE(incidents.size() == 1);
  CHECK(incidents[0].detail == leaky);
  CHECK(incidents[0].incident == got->error->incident);
  CHECK(incidents[0].operation_id == sub->id);
  CHECK(incidents[0].tenant == "acme");
  CHECK(incidents[0].owner == "alice");
  CHECK(incidents[0].code == errc::handler_error);
  CHECK_FALSE(incidents[0].is_public);
}

TEST_CASE("a public_error's message and code reach the client", "[operations][security]") {
  postbox::manual_clock clock;
  incident_log log;
  postbox::operations<int> ops(clock, {.on_incident = log.hook()});
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) -> int {
    throw postbox::public_error(errc::invalid_argument, "quantity must be positive");
  });
  REQUIRE(sub.has_value());
  auto s = ops.wait("alice", sub->id);
  REQUIRE(s.has_value());
  REQUIRE(s->error.has_value());
  CHECK(s->error->code == errc::invalid_argument);
  CHECK(s->error->message == "quantity must be positive");
  const auto incidents = log.copy();
  REQUIRE(incidents.size() == 1);
  CHECK(incidents[0].is_public);
  CHECK(incidents[0].incident == s->error->incident);
}

TEST_CASE("a postbox::error keeps its code for the client but its text goes only to on_incident",
          "[operations][security]") {
  postbox::manual_clock clock;
  incident_log log;
  postbox::operations<int> ops(clock, {.on_incident = log.hook()});
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) -> int {
    throw postbox::error(errc::store_error, "sqlite: /var/lib/orders/secret.db is locked");
  });
  auto s = ops.wait("alice", sub->id);
  REQUIRE(s.has_value());
  REQUIRE(s->error.has_value());
  CHECK(s->error->code == errc::store_error);
  CHECK_THAT(s->error->message, !Catch::Contains("secret"));
  const auto incidents = log.copy();
  REQUIRE(incidents.size() == 1);
  CHECK(incidents[0].detail == "sqlite: /var/lib/orders/secret.db is locked");
  CHECK(incidents[0].code == errc::store_error);
}

TEST_CASE("a non-std exception fails the operation with a generic message and an incident", "[operations][security]") {
  postbox::manual_clock clock;
  incident_log log;
  postbox::operations<int> ops(clock, {.on_incident = log.hook()});
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) -> int { throw 42; });
  auto s = ops.wait("alice", sub->id);
  REQUIRE(s.has_value());
  REQUIRE(s->error.has_value());
  CHECK(s->error->message == "the operation failed; reference " + s->error->incident);
  const auto incidents = log.copy();
  REQUIRE(incidents.size() == 1);
  CHECK(incidents[0].detail == "unknown exception");
}

TEST_CASE("an incident hook that throws is counted and the operation still fails", "[operations][security]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.on_incident = [](const postbox::operation_incident&) {
                                         throw std::runtime_error("log sink down");
                                       }});
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) -> int { throw std::runtime_error("x"); });
  auto s = ops.wait("alice", sub->id);
  REQUIRE(s.has_value());
  CHECK(s->state == operation_state::failed);
  CHECK(ops.incident_hook_failures() == 1);
}

TEST_CASE("failures are counted by error code in the metrics page, which carries no error text",
          "[operations][security][metrics]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  postbox::metrics_registry metrics;
  auto reg = postbox::register_operations(metrics, "jobs", ops);
  auto a = ops.submit("alice", "", "", [](postbox::operation_context&) -> int { throw std::runtime_error(leaky); });
  auto b = ops.submit("alice", "", "", [](postbox::operation_context&) -> int {
    throw postbox::error(errc::store_error, leaky);
  });
  REQUIRE(ops.wait("alice", a->id).has_value());
  REQUIRE(ops.wait("alice", b->id).has_value());
  CHECK(ops.failures(errc::handler_error) == 1);
  CHECK(ops.failures(errc::store_error) == 1);
  const std::string page = metrics.render_prometheus();
  CHECK_THAT(page, Catch::Contains("postbox_operations_failures_total{component=\"operations\",name=\"jobs\",code=\"handler_error\"} 1"));
  CHECK_THAT(page, Catch::Contains("postbox_operations_failures_total{component=\"operations\",name=\"jobs\",code=\"store_error\"} 1"));
  CHECK_THAT(page, !Catch::Contains("hunter2") && !Catch::Contains("postgres"));
}

// --- polling rate limit ------------------------------------------------------------

TEST_CASE("an owner may poll a burst at once and the next poll is refused with the exact retry_after",
          "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 2, .poll_burst = 3});  // a token per 500 ms
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) { return 1; });
  REQUIRE(sub.has_value());
  for (int i = 0; i < 3; ++i) CHECK(ops.get("alice", sub->id).has_value());
  auto refused = ops.get("alice", sub->id);
  CHECK(refused.status() == errc::rate_limited);
  CHECK_FALSE(refused.has_value());
  CHECK(refused.retry_after() == 500ms);
  auto watch_refused = ops.watch("alice", sub->id, [](const auto&) {});
  CHECK(watch_refused.status() == errc::rate_limited);
  CHECK(watch_refused.retry_after() == 500ms);
  CHECK(ops.polls_refused() == 2);
}

TEST_CASE("a refused owner may poll again once retry_after has passed on the clock", "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 2, .poll_burst = 3});
  for (int i = 0; i < 3; ++i) CHECK(ops.get("alice", "no-such-id").status() == errc::not_found);  // unknown ids cost too
  clock.advance(499ms);
  auto early = ops.get("alice", "no-such-id");
  CHECK(early.status() == errc::rate_limited);
  CHECK(early.retry_after() == 1ms);
  clock.advance(1ms);
  CHECK(ops.get("alice", "no-such-id").status() == errc::not_found);
  CHECK(ops.get("alice", "no-such-id").status() == errc::rate_limited);
  clock.advance(1500ms);  // a full bucket again: three polls, not more
  for (int i = 0; i < 3; ++i) CHECK(ops.get("alice", "no-such-id").status() == errc::not_found);
  CHECK(ops.get("alice", "no-such-id").status() == errc::rate_limited);
}

TEST_CASE("owners and tenants have independent polling budgets", "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 1, .poll_burst = 1});
  CHECK(ops.get("alice", "x").status() == errc::not_found);
  CHECK(ops.get("alice", "x").status() == errc::rate_limited);
  CHECK(ops.get("bob", "x").status() == errc::not_found);
  CHECK(ops.get({"acme", "alice"}, "x").status() == errc::not_found);
  CHECK(ops.get({"acme", "alice"}, "x").status() == errc::rate_limited);
  CHECK(ops.get({"globex", "alice"}, "x").status() == errc::not_found);
}

TEST_CASE("list counts against the same polling budget as get", "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 1, .poll_burst = 2});
  CHECK(ops.list("alice").has_value());
  CHECK(ops.get("alice", "x").status() == errc::not_found);
  auto refused = ops.list("alice");
  CHECK(refused.status() == errc::rate_limited);
  CHECK(refused.retry_after() == 1s);
}

TEST_CASE("polling buckets of idle owners are dropped, so memory follows the active owners",
          "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 10, .poll_burst = 5});  // full again 500 ms after a poll
  const auto owners = postbox_test::scaled(5000);
  for (std::uint64_t i = 0; i < owners; ++i) CHECK(ops.get("owner-" + std::to_string(i), "x").status() == errc::not_found);
  CHECK(ops.poll_buckets_approx() == owners);
  clock.advance(500ms);
  CHECK(ops.get("late", "x").status() == errc::not_found);
  CHECK(ops.poll_buckets_approx() == 1);  // only the owner that just polled
  clock.advance(500ms);
  CHECK(ops.sweep() == 0);
  CHECK(ops.poll_buckets_approx() == 0);
}

TEST_CASE("extreme polling settings are capped instead of overflowing the clock arithmetic",
          "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> slow(clock, {.poll_rate = 1e-30, .poll_burst = 1});
  CHECK(slow.get("alice", "x").status() == errc::not_found);
  auto refused = slow.get("alice", "x");
  CHECK(refused.status() == errc::rate_limited);
  CHECK(refused.retry_after() == postbox::duration(static_cast<postbox::duration::rep>(1e18)));
  postbox::operations<int> wide(clock, {.poll_rate = 1, .poll_burst = static_cast<std::size_t>(-1)});
  for (int i = 0; i < 100; ++i) CHECK(wide.get("alice", "x").status() == errc::not_found);
  clock.advance(std::chrono::hours(24 * 365 * 10));  // years on: every bucket is full again
  CHECK(wide.get("alice", "x").status() == errc::not_found);
  CHECK(wide.poll_buckets_approx() == 1);
}

TEST_CASE("without poll_rate get and watch are never rate limited", "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto sub = ops.submit("alice", "", "", [](postbox::operation_context&) { return 1; });
  for (int i = 0; i < 1000; ++i) REQUIRE(ops.get("alice", sub->id).has_value());
  CHECK(ops.watch("alice", sub->id, [](const auto&) {}).has_value());
  CHECK(ops.polls_refused() == 0);
  CHECK(ops.poll_buckets_approx() == 0);
}

TEST_CASE("a live snapshot suggests a retry_after no shorter than the polling limit's refill",
          "[operations][security][rate_limit]") {
  postbox::manual_clock clock;
  std::atomic<bool> go{false};
  postbox::operations<int> ops(clock, {.poll_interval = 1s, .poll_rate = 0.5});
  auto sub = ops.submit("alice", "", "", [&](postbox::operation_context&) {
    (void)postbox_test::eventually([&] { return go.load(); });
    return 1;
  });
  auto s = ops.get("alice", sub->id);
  REQUIRE(s.has_value());
  CHECK(s->retry_after == 2s);
  go = true;
  CHECK(ops.wait("alice", sub->id)->retry_after == 0s);
}

TEST_CASE("refused polls are counted in the metrics page", "[operations][security][rate_limit][metrics]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.poll_rate = 1, .poll_burst = 1});
  postbox::metrics_registry metrics;
  auto reg = postbox::register_operations(metrics, "jobs", ops);
  (void)ops.get("alice", "x");
  (void)ops.get("alice", "x");
  const std::string page = metrics.render_prometheus();
  CHECK_THAT(page, Catch::Contains("postbox_operations_polls_refused_total{component=\"operations\",name=\"jobs\"} 1"));
  CHECK_THAT(page, Catch::Contains("postbox_operations_poll_buckets{component=\"operations\",name=\"jobs\"} 1"));
}

// --- tenants ---------------------------------------------------------------------

TEST_CASE("another tenant's operation answers not_found to get, watch, wait, cancel and list", "[operations][security][tenant]") {
  postbox::manual_clock clock;
  std::atomic<bool> go{false};
  postbox::operations<int> ops(clock);
  auto sub = ops.submit({"acme", "alice"}, "", "", [&](postbox::operation_context& ctx) {
    (void)postbox_test::eventually([&] { return go.load() || ctx.stop_token().stop_requested(); });
    return 1;
  });
  REQUIRE(sub.has_value());
  for (const postbox::operation_caller& other :
       {postbox::operation_caller("globex", "alice"), postbox::operation_caller("alice"),
        postbox::operation_caller("acme", "bob")}) {
    CHECK(ops.get(other, sub->id).status() == errc::not_found);
    CHECK(ops.watch(other, sub->id, [](const auto&) {}).status() == errc::not_found);
    CHECK(ops.wait(other, sub->id).status() == errc::not_found);
    CHECK(ops.cancel(other, sub->id).status() == errc::not_found);
    auto listed = ops.list(other);
    REQUIRE(listed.has_value());
    CHECK(listed->empty());
  }
  CHECK(ops.get({"acme", "alice"}, sub->id).has_value());
  go = true;
  CHECK(ops.wait({"acme", "alice"}, sub->id)->state == operation_state::succeeded);
}

TEST_CASE("async_wait by another tenant completes with not_found and by the owner with the result",
          "[operations][security][tenant]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  postbox::run_queue q;
  auto sub = ops.submit({"acme", "alice"}, "", "", [](postbox::operation_context&) { return 9; });
  REQUIRE(sub.has_value());
  auto other = wait_async(ops, {"globex", "alice"}, sub->id);
  other.start(q);
  REQUIRE(drive_until_done(q, other));
  CHECK(other.get().status() == errc::not_found);
  auto own = wait_async(ops, {"acme", "alice"}, sub->id);
  own.start(q);
  REQUIRE(drive_until_done(q, own));
  auto r = own.get();
  REQUIRE(r.has_value());
  CHECK(r->result == 9);
}

TEST_CASE("idempotency keys are scoped per tenant", "[operations][security][tenant]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto a = ops.submit({"acme", "alice"}, "k", "fp", [](postbox::operation_context&) { return 1; });
  auto b = ops.submit({"globex", "alice"}, "k", "fp", [](postbox::operation_context&) { return 2; });
  auto again = ops.submit({"acme", "alice"}, "k", "fp", [](postbox::operation_context&) { return 3; });
  REQUIRE(b.has_value());
  CHECK(b->disposition == postbox::submit_disposition::created);
  CHECK(b->id != a->id);
  CHECK(again->disposition == postbox::submit_disposition::existing);
  CHECK(again->id == a->id);
}

TEST_CASE("tenant and owner names that concatenate alike stay apart", "[operations][security][tenant]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto a = ops.submit({"a", "bc"}, "k", "fp", [](postbox::operation_context&) { return 1; });
  auto b = ops.submit({"ab", "c"}, "k", "fp", [](postbox::operation_context&) { return 2; });
  auto c = ops.submit({std::string("a\0b", 3), "c"}, "k", "fp", [](postbox::operation_context&) { return 3; });
  CHECK(b->disposition == postbox::submit_disposition::created);
  CHECK(c->disposition == postbox::submit_disposition::created);
  CHECK(ops.get({"ab", "c"}, a->id).status() == errc::not_found);
  CHECK(ops.get({"a", "bc"}, b->id).status() == errc::not_found);
}

TEST_CASE("list returns the caller's own operations in its tenant, oldest first", "[operations][security][tenant]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock);
  auto first = ops.submit({"acme", "alice"}, "", "", [](postbox::operation_context&) { return 1; });
  clock.advance(1s);
  auto second = ops.submit({"acme", "alice"}, "", "", [](postbox::operation_context&) { return 2; });
  REQUIRE(ops.submit({"acme", "bob"}, "", "", [](postbox::operation_context&) { return 3; }).has_value());
  REQUIRE(ops.submit({"globex", "alice"}, "", "", [](postbox::operation_context&) { return 4; }).has_value());
  REQUIRE(ops.submit("alice", "", "", [](postbox::operation_context&) { return 5; }).has_value());
  auto listed = ops.list({"acme", "alice"});
  REQUIRE(listed.has_value());
  REQUIRE(listed->size() == 2);
  CHECK((*listed)[0].id == first->id);
  CHECK((*listed)[1].id == second->id);
}

// --- ids ---------------------------------------------------------------------------

TEST_CASE("operation and incident ids are unique and show no structure in any digit", "[operations][security]") {
  postbox::manual_clock clock;
  postbox::operations<int> ops(clock, {.queue_capacity = 1024});
  std::vector<std::string> ids;
  for (int i = 0; i < 128; ++i) {
    auto sub = ops.submit("a", "", "", [](postbox::operation_context&) -> int { throw std::runtime_error("x"); });
    REQUIRE(sub.has_value());
    ids.push_back(sub->id);
  }
  for (std::size_t i = 0, n = ids.size(); i < n; ++i) {
    auto s = ops.wait("a", ids[i]);
    REQUIRE(s.has_value());
    REQUIRE(s->error.has_value());
    ids.push_back(s->error->incident);
  }
  CHECK(std::set<std::string>(ids.begin(), ids.end()).size() == ids.size());
  // A counter, a timestamp or a UUIDv7 would hold some positions (nearly)
  // constant; 256 uniform draws show fewer than 8 of the 16 digits at one
  // position with probability below 1e-80.
  for (std::size_t pos = 0; pos < 32; ++pos) {
    std::set<char> digits;
    for (const auto& id : ids) {
      REQUIRE(id.size() == 32);
      digits.insert(id[pos]);
    }
    CHECK(digits.size() >= 8);
  }
}
