// SPDX-License-Identifier: MIT
// Specification tests for postbox::saga_coordinator, its state stores and its events.
#include <postbox/saga_sqlite.hpp>
#include <postbox/saga.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::saga_outcome;
using postbox::saga_phase;
using postbox::step_context;
using postbox::step_result;

namespace {

using event_env = postbox::envelope<postbox::saga_event>;

// Records every call, in order, and captures every event, for assertions.
struct recorder {
  std::mutex mutex;
  std::vector<std::string> calls;  // "do:<step>" / "undo:<step>"
  postbox::testing::capture_sink events{"saga-events"};

  void call(std::string what) {
    std::lock_guard lock(mutex);
    calls.push_back(std::move(what));
  }
  std::vector<std::string> calls_copy() {
    std::lock_guard lock(mutex);
    return calls;
  }
  std::vector<std::string> event_types() const {
    std::vector<std::string> out;
    for (const auto& c : events.all()) out.push_back(c.type);
    return out;
  }
  std::function<void(const event_env&)> sink() {
    return [this](const event_env& e) { (void)events.record(e); };
  }
};

// Four steps a, b, c, d; the step named `fail_at` fails (none when empty).
postbox::saga_definition four_steps(recorder& rec, std::string fail_at = {}) {
  postbox::saga_definition def("four");
  for (std::string name : {"a", "b", "c", "d"}) {
    def.step(
        name,
        [&rec, name, fail_at](step_context&) {
          rec.call("do:" + name);
          return name == fail_at ? step_result::failure("boom at " + name) : step_result::success();
        },
        [&rec, name](step_context&) { rec.call("undo:" + name); });
  }
  return def;
}

postbox::saga_retry_policy no_wait_policy(std::uint32_t attempts) {
  postbox::saga_retry_policy p;
  p.max_attempts = attempts;
  p.initial_backoff = postbox::duration::zero();
  p.max_backoff = postbox::duration::zero();
  p.full_jitter = false;
  return p;
}

// Coordinator options built field by field (designated initializers that
// skip members trip -Wmissing-field-initializers on GCC).
postbox::saga_options options(std::function<void(const event_env&)> sink = {},
                              std::optional<postbox::saga_retry_policy> policy = std::nullopt,
                              postbox::timer_service* timers = nullptr) {
  postbox::saga_options o;
  o.on_event = std::move(sink);
  if (policy) o.compensation_retry = *policy;
  o.timers = timers;
  return o;
}

postbox::saga_start with_id(std::string id) {
  postbox::saga_start s;
  s.saga_id = std::move(id);
  return s;
}

// A temporary SQLite file, removed (with its WAL files) at the end.
struct temp_db {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("postbox_saga_test_" + postbox::message_id::generate().to_string() + ".db");
  ~temp_db() {
    std::error_code ec;
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix, ec);
  }
};

// Wraps the memory store and fails every write after the first `good_writes`.
struct failing_store {
  postbox::memory_saga_store inner;
  int good_writes = 1000;
  int writes = 0;
  errc create(const postbox::saga_state& st) { return ++writes > good_writes ? errc::store_error : inner.create(st); }
  errc save(const postbox::saga_state& st) { return ++writes > good_writes ? errc::store_error : inner.save(st); }
  postbox::result<postbox::saga_state> load(std::string_view id) const { return inner.load(id); }
  postbox::result<std::vector<postbox::saga_state>> load_unfinished() const { return inner.load_unfinished(); }
};
static_assert(postbox::saga_state_store<failing_store>);
static_assert(postbox::saga_state_store<postbox::memory_saga_store>);

postbox::saga_state sample_state() {
  postbox::saga_state st;
  st.saga_id = "order-42";
  st.definition = "four";
  st.data = std::string("binary\0data", 11);
  st.correlation_id = postbox::message_id::generate();
  st.last_event_id = postbox::message_id::generate();
  st.phase = saga_phase::compensating;
  st.outcome = saga_outcome::running;
  st.step_count = 4;
  st.current_step = 2;
  st.completed_steps = 3;
  st.attempt = 2;
  st.step_deadline = postbox::manual_clock::default_start + 5s;
  st.next_attempt_at = postbox::manual_clock::default_start + 7s;
  st.failure_reason = "d: card declined";
  st.started_at = postbox::manual_clock::default_start;
  st.updated_at = postbox::manual_clock::default_start + 1s;
  st.version = 9;
  return st;
}

void require_same(const postbox::saga_state& a, const postbox::saga_state& b) {
  CHECK(a.saga_id == b.saga_id);
  CHECK(a.definition == b.definition);
  CHECK(a.data == b.data);
  CHECK(a.correlation_id == b.correlation_id);
  CHECK(a.last_event_id == b.last_event_id);
  CHECK(a.phase == b.phase);
  CHECK(a.outcome == b.outcome);
  CHECK(a.step_count == b.step_count);
  CHECK(a.current_step == b.current_step);
  CHECK(a.completed_steps == b.completed_steps);
  CHECK(a.attempt == b.attempt);
  CHECK(a.step_deadline == b.step_deadline);
  CHECK(a.next_attempt_at == b.next_attempt_at);
  CHECK(a.failure_reason == b.failure_reason);
  CHECK(a.started_at == b.started_at);
  CHECK(a.updated_at == b.updated_at);
  CHECK(a.version == b.version);
}

template <class Store>
void check_round_trip(Store& store) {
  const auto st = sample_state();
  REQUIRE(store.create(st) == errc::ok);
  CHECK(store.create(st) == errc::conflict);
  auto loaded = store.load("order-42");
  REQUIRE(loaded.has_value());
  require_same(*loaded, st);
  auto changed = st;
  changed.outcome = saga_outcome::compensated;
  changed.step_deadline.reset();
  changed.version = 10;
  REQUIRE(store.save(changed) == errc::ok);
  auto again = store.load("order-42");
  REQUIRE(again.has_value());
  require_same(*again, changed);
  CHECK(store.load("nope").status() == errc::not_found);
}

template <class Store>
void check_unfinished(Store& store) {
  auto st = sample_state();
  const char* const names[] = {"s0", "s1", "s2", "s3"};  // (GCC 12 warns falsely on "s" + to_string)
  for (int i = 0; i < 4; ++i) {
    st.saga_id = names[i];
    st.started_at = postbox::manual_clock::default_start + std::chrono::seconds(10 - i);
    st.outcome = i == 1 ? saga_outcome::completed : saga_outcome::running;
    REQUIRE(store.save(st) == errc::ok);
  }
  auto list = store.load_unfinished();
  REQUIRE(list.has_value());
  std::vector<std::string> ids;
  for (const auto& s : *list) ids.push_back(s.saga_id);
  CHECK(ids == std::vector<std::string>{"s3", "s2", "s0"});
}

}  // namespace

TEST_CASE("a saga whose steps all succeed runs every action in order and completes", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options(rec.sink()));
  coord.add(four_steps(rec));
  auto r = coord.run("four", "order-1");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::completed);
  CHECK(r->completed_steps == 4);
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:a", "do:b", "do:c", "do:d"});
  auto stored = store.load(r->saga_id);
  REQUIRE(stored.has_value());
  CHECK(stored->outcome == saga_outcome::completed);
  CHECK(stored->version == r->version);
}

TEST_CASE("a failure at any step runs the compensations of the completed steps in reverse order", "[saga]") {
  const auto fail_index = GENERATE(0, 1, 2, 3);
  const std::vector<std::string> names{"a", "b", "c", "d"};
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  coord.add(four_steps(rec, names[fail_index]));
  auto r = coord.run("four");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(r->phase == saga_phase::compensating);
  CHECK(r->completed_steps == static_cast<std::uint32_t>(fail_index));
  CHECK(r->failure_reason == names[fail_index] + ": boom at " + names[fail_index]);
  std::vector<std::string> expected;
  for (int i = 0; i <= fail_index; ++i) expected.push_back("do:" + names[i]);
  for (int i = fail_index - 1; i >= 0; --i) expected.push_back("undo:" + names[i]);
  CHECK(rec.calls_copy() == expected);
}

TEST_CASE("an exception thrown by an action is a step failure whose text is the reason", "[saga]") {
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  int undone = 0;
  postbox::saga_definition def("throws");
  def.step("first", [](step_context&) {}, [&](step_context&) { ++undone; })
      .step("second", [](step_context&) -> step_result { throw std::runtime_error("disk on fire"); }, nullptr);
  coord.add(std::move(def));
  auto r = coord.run("throws");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(r->failure_reason == "second: disk on fire");
  CHECK(undone == 1);
}

TEST_CASE("a failing compensation is retried after the policy's backoff on the clock and then succeeds", "[saga]") {
  postbox::manual_clock clock;
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_retry_policy policy;
  policy.max_attempts = 5;
  policy.initial_backoff = 10s;
  policy.multiplier = 2.0;
  policy.max_backoff = 60s;
  policy.full_jitter = false;
  postbox::saga_coordinator coord(store, options(rec.sink(), policy), clock);
  std::atomic<int> undo_calls{0};
  postbox::saga_definition def("retry");
  def.step("reserve", [](step_context&) {},
           [&](step_context& ctx) {
             undo_calls.fetch_add(1);
             return ctx.attempt() == 1 ? step_result::failure("inventory service down") : step_result::success();
           })
      .step("charge", [](step_context&) { return false; }, nullptr);
  coord.add(std::move(def));

  std::optional<postbox::result<postbox::saga_state>> out;
  std::thread runner([&] { out.emplace(coord.run("retry")); });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  CHECK(undo_calls.load() == 1);
  clock.advance(10s - 1ns);  // not yet: the waiter wakes, sees time short, waits again
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  CHECK(undo_calls.load() == 1);
  clock.advance(1ns);
  runner.join();
  REQUIRE(out.has_value());
  REQUIRE(out->has_value());
  CHECK((*out)->outcome == saga_outcome::compensated);
  CHECK(undo_calls.load() == 2);
  const auto failed = rec.events.published_where(
      [](const postbox::testing::captured_message& c) { return c.type == "saga.compensation_failed"; });
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].as<postbox::saga_event>()->payload.attempt == 1);
  CHECK(failed[0].as<postbox::saga_event>()->payload.reason == "inventory service down");
}

TEST_CASE("a compensation that keeps failing exhausts the policy and the saga ends failed", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options(rec.sink(), no_wait_policy(3)));
  int first_undo = 0;
  int second_undo = 0;
  postbox::saga_definition def("stuck");
  def.step("first", [](step_context&) {}, [&](step_context&) { ++first_undo; })
      .step("second", [](step_context&) {}, [&](step_context&) { return ++second_undo < 0; })
      .step("third", [](step_context&) { return false; }, nullptr);
  coord.add(std::move(def));
  auto r = coord.run("stuck");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::failed);
  CHECK(second_undo == 3);
  CHECK(first_undo == 0);  // the saga stops at the exhausted compensation
  CHECK(r->current_step == 2);
  CHECK(r->failure_reason == "second: compensation exhausted after 3 attempts: returned false");
  CHECK(rec.event_types().back() == "saga.failed");
  CHECK(store.load_unfinished()->empty());
}

TEST_CASE("a step that runs past its deadline fails and is compensated together with the steps before it",
          "[saga]") {
  postbox::manual_clock clock;
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, {}, clock);
  postbox::saga_definition def("slow");
  std::optional<postbox::time_point> seen_deadline;
  def.step("reserve", [&](step_context&) { rec.call("do:reserve"); }, [&](step_context&) { rec.call("undo:reserve"); })
      .step(
          "charge",
          [&](step_context& ctx) {
            rec.call("do:charge");
            seen_deadline = ctx.deadline();
            clock.advance(5s);  // the payment provider takes exactly the timeout
            CHECK(ctx.expired());
          },
          [&](step_context&) { rec.call("undo:charge"); }, 5s);
  coord.add(std::move(def));
  const auto start = clock.now();
  auto r = coord.run("slow");
  REQUIRE(r.has_value());
  CHECK(seen_deadline == start + 5s);
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(r->failure_reason == "charge: deadline passed");
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:reserve", "do:charge", "undo:charge", "undo:reserve"});
}

TEST_CASE("a step that finishes before its deadline completes normally", "[saga]") {
  postbox::manual_clock clock;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, {}, clock);
  postbox::saga_definition def("quick");
  def.step("charge", [&](step_context&) { clock.advance(5s - 1ns); }, nullptr, 5s);
  coord.add(std::move(def));
  auto r = coord.run("quick");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::completed);
}

TEST_CASE("with a timer service a step's deadline requests the step's stop token", "[saga]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options({}, std::nullopt, &timers), clock);
  bool stopped_before = true;
  bool stopped_after = false;
  postbox::saga_definition def("watched");
  def.step(
      "poll",
      [&](step_context& ctx) {
        stopped_before = ctx.stop_token().stop_requested();
        clock.advance(3s);
        timers.run_due();  // the deadline timer fires here
        stopped_after = ctx.stop_token().stop_requested();
        return step_result::failure("gave up on stop");
      },
      nullptr, 3s);
  coord.add(std::move(def));
  auto r = coord.run("watched");
  REQUIRE(r.has_value());
  CHECK_FALSE(stopped_before);
  CHECK(stopped_after);
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(timers.pending() == 0);
}

TEST_CASE("the deadline timer of a step that finished in time is canceled", "[saga]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options({}, std::nullopt, &timers), clock);
  postbox::saga_definition def("fast");
  def.step("one", [](step_context&) {}, nullptr, 3s);
  coord.add(std::move(def));
  REQUIRE(coord.run("fast")->outcome == saga_outcome::completed);
  CHECK(timers.pending() == 0);
}

TEST_CASE("with a scheduler a step's timeout requests its stop token when due", "[saga][scheduler]") {
  postbox::manual_clock clock;
  postbox::scheduler sched(clock, postbox::timer_service::manual_drive);
  postbox::memory_saga_store store;
  postbox::saga_options o;
  o.step_scheduler = &sched;
  postbox::saga_coordinator coord(store, o, clock);
  bool stopped_after = false;
  postbox::saga_definition def("watched");
  def.step(
      "poll",
      [&](step_context& ctx) {
        clock.advance(3s);
        sched.run_due();  // the step's timeout fires here
        stopped_after = ctx.stop_token().stop_requested();
        return step_result::failure("gave up on stop");
      },
      nullptr, 3s);
  coord.add(std::move(def));
  auto r = coord.run("watched");
  REQUIRE(r.has_value());
  CHECK(stopped_after);
  CHECK(r->outcome == saga_outcome::compensated);
}

TEST_CASE("a step that completes revokes its scheduled timeout, which then never fires", "[saga][scheduler]") {
  postbox::manual_clock clock;
  postbox::scheduler sched(clock, postbox::timer_service::manual_drive);
  postbox::memory_saga_store store;
  postbox::saga_options o;
  o.step_scheduler = &sched;
  postbox::saga_coordinator coord(store, o, clock);
  postbox::saga_definition def("fast");
  def.step("one", [](step_context&) {}, nullptr, 3s);
  coord.add(std::move(def));
  REQUIRE(coord.run("fast")->outcome == saga_outcome::completed);
  clock.advance(10s);
  CHECK(sched.run_due() == 0);  // nothing due: the timeout was revoked
  CHECK(sched.stats().canceled == 1);
  CHECK(sched.stats().delivered == 0);
}

TEST_CASE("saga state round-trips through the memory store", "[saga]") {
  postbox::memory_saga_store store;
  check_round_trip(store);
}

TEST_CASE("saga state round-trips through the SQLite store across connections", "[saga]") {
  temp_db db;
  {
    postbox::sqlite_saga_store store(db.path.string());
    check_round_trip(store);
  }
  postbox::sqlite_saga_store reopened(db.path.string());
  auto loaded = reopened.load("order-42");
  REQUIRE(loaded.has_value());
  CHECK(loaded->outcome == saga_outcome::compensated);
  CHECK(loaded->data == std::string("binary\0data", 11));
}

TEST_CASE("load_unfinished lists only running sagas oldest first in the memory store", "[saga]") {
  postbox::memory_saga_store store;
  check_unfinished(store);
}

TEST_CASE("load_unfinished lists only running sagas oldest first in the SQLite store", "[saga]") {
  temp_db db;
  postbox::sqlite_saga_store_options normal;
  normal.synchronous = "NORMAL";
  postbox::sqlite_saga_store store(db.path.string(), normal);
  check_unfinished(store);
}

TEST_CASE("the SQLite store rejects a file that is not a database with a typed error", "[saga]") {
  temp_db db;
  {
    std::FILE* f = std::fopen(db.path.string().c_str(), "wb");
    REQUIRE(f != nullptr);
    const std::string junk(4096, 'x');
    std::fwrite(junk.data(), 1, junk.size(), f);
    std::fclose(f);
  }
  try {
    postbox::sqlite_saga_store store(db.path.string());
    FAIL("opened a corrupt file");
  } catch (const postbox::error& e) {
    CHECK(e.code() == errc::corrupt);
  }
}

// Step "c" stops the coordinator from inside its action on the first run,
// as a crash would cut it off; a new coordinator on the same store resumes.
template <class Store>
void check_resume_forward(Store& store) {
  recorder rec;
  std::string saga_id;
  {
    postbox::saga_coordinator first(store);
    postbox::saga_definition def("four");
    for (std::string name : {"a", "b", "c", "d"}) {
      def.step(
          name,
          [&rec, &first, name](step_context& ctx) {
            rec.call("do:" + name);
            if (name == "c") {
              first.stop();
              return step_result::failure("cut off");
            }
            ctx.data() += name;
            return step_result::success();
          },
          nullptr);
    }
    first.add(std::move(def));
    auto r = first.run("four", "", with_id("resume-me"));
    CHECK(r.status() == errc::stopped);
  }
  auto mid = store.load("resume-me");
  REQUIRE(mid.has_value());
  CHECK(mid->phase == saga_phase::forward);
  CHECK(mid->current_step == 2);
  CHECK(mid->attempt == 1);
  CHECK(mid->data == "ab");

  std::vector<std::uint32_t> attempts;
  std::string data_seen_by_c;
  postbox::saga_coordinator second(store, options(rec.sink()));
  postbox::saga_definition def("four");
  for (std::string name : {"a", "b", "c", "d"}) {
    def.step(
        name,
        [&, name](step_context& ctx) {
          rec.call("do:" + name);
          attempts.push_back(ctx.attempt());
          if (name == "c") data_seen_by_c = ctx.data();
        },
        nullptr);
  }
  second.add(std::move(def));
  auto resumed = second.resume_all();
  REQUIRE(resumed.size() == 1);
  CHECK(resumed[0].saga_id == "resume-me");
  REQUIRE(resumed[0].state.has_value());
  CHECK(resumed[0].state->outcome == saga_outcome::completed);
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:a", "do:b", "do:c", "do:c", "do:d"});
  CHECK(attempts == std::vector<std::uint32_t>{2, 1});  // c is re-run (at-least-once), d runs once
  CHECK(data_seen_by_c == "ab");
  CHECK(rec.event_types().front() == "saga.resumed");
  CHECK(store.load_unfinished()->empty());
}

TEST_CASE("a saga cut off mid-action resumes forward from the memory store and re-runs that step", "[saga]") {
  postbox::memory_saga_store store;
  check_resume_forward(store);
}

TEST_CASE("a saga cut off mid-action resumes forward from the SQLite store and re-runs that step", "[saga]") {
  temp_db db;
  postbox::sqlite_saga_store store(db.path.string());
  check_resume_forward(store);
}

template <class Store>
void check_resume_compensating(Store& store) {
  recorder rec;
  {
    postbox::saga_coordinator first(store);
    postbox::saga_definition def("four");
    def.step("a", [](step_context&) {}, [&](step_context&) { rec.call("undo:a"); })
        .step("b", [](step_context&) {},
              [&](step_context&) {
                rec.call("undo:b");
                first.stop();
                return step_result::failure("cut off");
              })
        .step("c", [](step_context&) {}, [&](step_context&) { rec.call("undo:c"); })
        .step("d", [](step_context&) { return false; }, nullptr);
    first.add(std::move(def));
    CHECK(first.run("four", "", with_id("undo-me")).status() == errc::stopped);
  }
  auto mid = store.load("undo-me");
  REQUIRE(mid.has_value());
  CHECK(mid->phase == saga_phase::compensating);
  CHECK(mid->current_step == 2);  // b (index 1) is next to undo
  CHECK(mid->attempt == 0);       // the interrupted try is not counted as a failure

  postbox::saga_coordinator second(store);
  postbox::saga_definition def("four");
  def.step("a", [](step_context&) { FAIL("forward action re-run while compensating"); },
           [&](step_context&) { rec.call("undo:a"); })
      .step("b", [](step_context&) { FAIL("forward action re-run while compensating"); },
            [&](step_context&) { rec.call("undo:b"); })
      .step("c", [](step_context&) { FAIL("forward action re-run while compensating"); },
            [&](step_context&) { rec.call("undo:c"); })
      .step("d", [](step_context&) { FAIL("forward action re-run while compensating"); }, nullptr);
  second.add(std::move(def));
  auto r = second.resume("undo-me");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(rec.calls_copy() == std::vector<std::string>{"undo:c", "undo:b", "undo:b", "undo:a"});
}

TEST_CASE("a saga cut off while compensating resumes compensating from the memory store", "[saga]") {
  postbox::memory_saga_store store;
  check_resume_compensating(store);
}

TEST_CASE("a saga cut off while compensating resumes compensating from the SQLite store", "[saga]") {
  temp_db db;
  postbox::sqlite_saga_store store(db.path.string());
  check_resume_compensating(store);
}

TEST_CASE("a store failure stops the saga before the next action runs and leaves it resumable", "[saga]") {
  recorder rec;
  failing_store store;
  store.good_writes = 4;  // started, a started, a completed, b started
  postbox::saga_coordinator coord(store);
  coord.add(four_steps(rec));
  auto r = coord.run("four", "", with_id("s"));
  CHECK(r.status() == errc::store_error);
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:a", "do:b"});  // b ran; its completion was not stored
  store.good_writes = 1000;
  auto again = coord.resume("s");
  REQUIRE(again.has_value());
  CHECK(again->outcome == saga_outcome::completed);
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:a", "do:b", "do:b", "do:c", "do:d"});
}

TEST_CASE("every event carries the saga's correlation id and the previous event's id as causation", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options(rec.sink(), no_wait_policy(5)));
  coord.add(four_steps(rec, "c"));
  const auto order_id = postbox::message_id::generate();
  const auto order_event = postbox::message_id::generate();
  auto r = coord.run("four", "", postbox::saga_start{"", order_id, order_event});
  REQUIRE(r.has_value());
  const std::vector<std::string> expected{
      "saga.started",         "saga.step_started", "saga.step_completed",   "saga.step_started",
      "saga.step_completed",  "saga.step_started", "saga.step_failed",      "saga.step_compensated",
      "saga.step_compensated", "saga.compensated"};
  CHECK(rec.event_types() == expected);
  // One unbroken causation chain through every event, in emission order, from the order's event.
  const auto chain = rec.events.causation_chain(r->last_event_id);
  REQUIRE(chain.size() == expected.size());
  CHECK(chain.front().causation_id == order_event);
  for (std::size_t i = 0; i < chain.size(); ++i) {
    CHECK(chain[i].sequence == i);
    CHECK(chain[i].correlation_id == order_id);
    CHECK(chain[i].partition_key == r->saga_id);
    CHECK(chain[i].kind == postbox::message_kind::event);
    CHECK(chain[i].as<postbox::saga_event>()->payload.saga_id == r->saga_id);
  }
  const auto events = rec.events.published<postbox::saga_event>();
  CHECK(events[6].payload.step == "c");
  CHECK(events[6].payload.reason == "boom at c");
  CHECK(events[7].payload.step == "b");
}

TEST_CASE("a saga started without a correlation id is correlated by its started event", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options(rec.sink()));
  coord.add(four_steps(rec));
  auto r = coord.run("four");
  REQUIRE(r.has_value());
  const auto events = rec.events.all();
  REQUIRE_FALSE(events.empty());
  CHECK(events.front().causation_id.is_nil());
  CHECK(events.front().correlation_id == events.front().id);
  CHECK(r->correlation_id == events.front().id);
}

TEST_CASE("resume continues the causation chain from the last stored event", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  auto st = sample_state();
  st.phase = saga_phase::forward;
  st.current_step = 3;
  st.completed_steps = 3;
  st.attempt = 0;
  st.step_deadline.reset();
  st.next_attempt_at.reset();
  REQUIRE(store.save(st) == errc::ok);
  postbox::saga_coordinator coord(store, options(rec.sink()));
  coord.add(four_steps(rec));
  auto r = coord.resume("order-42");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::completed);
  CHECK(rec.calls_copy() == std::vector<std::string>{"do:d"});
  const auto events = rec.events.all();
  REQUIRE(events.size() == 4);  // resumed, step_started, step_completed, completed
  CHECK(events[0].type == "saga.resumed");
  CHECK(events[0].causation_id == st.last_event_id);
  CHECK(rec.events.count_where([&](const postbox::testing::captured_message& c) {
          return c.correlation_id == st.correlation_id;
        }) == 4);
}

TEST_CASE("resume_all reports sagas whose definition is not registered and leaves them stored", "[saga]") {
  postbox::memory_saga_store store;
  auto st = sample_state();
  st.definition = "retired";
  REQUIRE(store.save(st) == errc::ok);
  postbox::saga_coordinator coord(store);
  auto out = coord.resume_all();
  REQUIRE(out.size() == 1);
  CHECK(out[0].state.status() == errc::not_found);
  CHECK(store.load_unfinished()->size() == 1);
}

TEST_CASE("resume refuses a saga whose definition changed its number of steps", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  auto st = sample_state();
  st.step_count = 7;
  REQUIRE(store.save(st) == errc::ok);
  postbox::saga_coordinator coord(store);
  coord.add(four_steps(rec));
  CHECK(coord.resume("order-42").status() == errc::conflict);
}

TEST_CASE("run rejects an unknown definition and a saga id that already exists", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  coord.add(four_steps(rec));
  CHECK(coord.run("nope").status() == errc::not_found);
  REQUIRE(coord.run("four", "", with_id("once")).has_value());
  CHECK(coord.run("four", "", with_id("once")).status() == errc::conflict);
  CHECK(rec.calls_copy().size() == 4);
}

TEST_CASE("registering a definition twice or one without steps throws", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  coord.add(four_steps(rec));
  CHECK_THROWS_AS(coord.add(four_steps(rec)), postbox::error);
  CHECK_THROWS_AS(coord.add(postbox::saga_definition("empty")), postbox::error);
  CHECK_THROWS_AS(postbox::saga_definition(""), postbox::error);
}

TEST_CASE("an exception from the event sink is counted and the saga still completes", "[saga]") {
  recorder rec;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options([](const event_env&) { throw std::runtime_error("sink"); }));
  coord.add(four_steps(rec));
  auto r = coord.run("four");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::completed);
  CHECK(coord.sink_failures() == 10);  // started, 4 x (step_started, step_completed), completed
}

TEST_CASE("data changed by an action reaches later steps and the compensations", "[saga]") {
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  std::string refund_of;
  postbox::saga_definition def("pay");
  def.step("charge", [](step_context& ctx) { ctx.data() = "charge-7"; },
           [&](step_context& ctx) { refund_of = ctx.data(); })
      .step("ship", [](step_context& ctx) {
        ctx.data() = "garbage";  // discarded: the action fails
        return false;
      }, nullptr);
  coord.add(std::move(def));
  auto r = coord.run("pay", "order-9");
  REQUIRE(r.has_value());
  CHECK(refund_of == "charge-7");
  CHECK(r->data == "charge-7");
}

TEST_CASE("stop interrupts a compensation backoff wait and leaves the saga resumable", "[saga]") {
  postbox::manual_clock clock;
  postbox::memory_saga_store store;
  postbox::saga_retry_policy policy;
  policy.max_attempts = 5;
  policy.initial_backoff = 1h;
  policy.max_backoff = 1h;
  policy.full_jitter = false;
  postbox::saga_coordinator coord(store, options({}, policy), clock);
  postbox::saga_definition def("wait");
  def.step("a", [](step_context&) {}, [](step_context&) { return false; })
      .step("b", [](step_context&) { return false; }, nullptr);
  coord.add(std::move(def));
  std::optional<postbox::result<postbox::saga_state>> out;
  std::thread runner([&] { out.emplace(coord.run("wait", "", with_id("w"))); });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  coord.stop();
  runner.join();
  REQUIRE(out.has_value());
  CHECK(out->status() == errc::stopped);
  auto st = store.load("w");
  REQUIRE(st.has_value());
  CHECK(st->outcome == saga_outcome::running);
  CHECK(st->attempt == 1);
  CHECK(st->next_attempt_at == postbox::manual_clock::default_start + 1h);
  CHECK(coord.run("wait").status() == errc::stopped);
}

TEST_CASE("two threads cannot drive the same saga at once", "[saga]") {
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  postbox::result<postbox::saga_state> inner = errc::empty;
  postbox::saga_definition def("reentrant");
  def.step("a", [&](step_context& ctx) { inner = coord.resume(ctx.saga_id()); }, nullptr);
  coord.add(std::move(def));
  REQUIRE(coord.run("reentrant").has_value());
  CHECK(inner.status() == errc::busy);
}

TEST_CASE("concurrent sagas on one coordinator each complete exactly once", "[saga]") {
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store);
  std::atomic<std::uint64_t> applied{0};
  std::atomic<std::uint64_t> undone{0};
  postbox::saga_definition def("count");
  def.step("add", [&](step_context&) { applied.fetch_add(1); }, [&](step_context&) { undone.fetch_add(1); })
      .step("maybe", [](step_context& ctx) { return ctx.data() != "fail"; }, nullptr);
  coord.add(std::move(def));
  const auto per_thread = postbox_test::scaled(200);
  std::vector<std::thread> threads;
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> compensated{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::uint64_t i = 0; i < per_thread; ++i) {
        auto r = coord.run("count", (i + t) % 3 == 0 ? "fail" : "ok");
        if (r && r->outcome == saga_outcome::completed) completed.fetch_add(1);
        if (r && r->outcome == saga_outcome::compensated) compensated.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(completed + compensated == 4 * per_thread);
  CHECK(applied.load() == 4 * per_thread);
  CHECK(undone.load() == compensated.load());
  CHECK(store.size() == 4 * per_thread);
}

TEST_CASE("a resumed step whose deadline has passed fails without running and is compensated", "[saga]") {
  postbox::manual_clock clock;
  recorder rec;
  postbox::memory_saga_store store;
  auto st = sample_state();
  st.phase = saga_phase::forward;
  st.current_step = 1;
  st.completed_steps = 1;
  st.attempt = 1;  // step b had started when the process died
  st.step_deadline = clock.now();
  st.next_attempt_at.reset();
  REQUIRE(store.save(st) == errc::ok);
  postbox::saga_coordinator coord(store, {}, clock);
  postbox::saga_definition def("four");
  for (std::string name : {"a", "b", "c", "d"}) {
    def.step(
        name, [&rec, name](step_context&) { rec.call("do:" + name); },
        [&rec, name](step_context&) { rec.call("undo:" + name); }, 1s);
  }
  coord.add(std::move(def));
  auto r = coord.resume("order-42");
  REQUIRE(r.has_value());
  CHECK(r->outcome == saga_outcome::compensated);
  CHECK(r->failure_reason == "b: deadline passed before the step could run");
  CHECK(rec.calls_copy() == std::vector<std::string>{"undo:b", "undo:a"});
}

TEST_CASE("compensation retries wait the policy's exponential schedule capped at the maximum", "[saga]") {
  postbox::manual_clock clock;
  postbox::memory_saga_store store;
  postbox::saga_retry_policy policy;
  policy.max_attempts = 10;
  policy.initial_backoff = 10s;
  policy.multiplier = 2.0;
  policy.max_backoff = 30s;
  policy.full_jitter = false;
  postbox::saga_coordinator coord(store, options({}, policy), clock);
  std::atomic<int> tries{0};
  postbox::saga_definition def("schedule");
  def.step("a", [](step_context&) {}, [&](step_context&) { return tries.fetch_add(1) + 1 > 3; })
      .step("b", [](step_context&) { return false; }, nullptr);
  coord.add(std::move(def));
  std::optional<postbox::result<postbox::saga_state>> out;
  std::thread runner([&] { out.emplace(coord.run("schedule", "", with_id("sched"))); });
  const std::vector<postbox::duration> expected{10s, 20s, 30s};  // 40s capped to 30s
  for (std::size_t n = 0; n < expected.size(); ++n) {
    REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1 && tries.load() == static_cast<int>(n + 1); }));
    auto st = store.load("sched");
    REQUIRE(st.has_value());
    CHECK(st->attempt == n + 1);
    REQUIRE(st->next_attempt_at.has_value());
    CHECK(*st->next_attempt_at - clock.now() == expected[n]);
    clock.advance(expected[n]);
  }
  runner.join();
  REQUIRE(out->has_value());
  CHECK((*out)->outcome == saga_outcome::compensated);
  CHECK(tries.load() == 4);
}

TEST_CASE("an action sees the id of the step_started event that announced it, for the messages it sends", "[saga]") {
  std::vector<event_env> events;
  postbox::memory_saga_store store;
  postbox::saga_coordinator coord(store, options([&](const event_env& e) { events.push_back(e); }));
  postbox::message_id seen;
  postbox::saga_definition def("one");
  def.step("only", [&](step_context& ctx) { seen = ctx.last_event_id(); }, nullptr);
  coord.add(std::move(def));
  auto r = coord.run("one");
  REQUIRE(r.has_value());
  auto started = std::find_if(events.begin(), events.end(),
                              [](const event_env& e) { return e.type == postbox::saga_events::step_started; });
  REQUIRE(started != events.end());
  CHECK(seen == started->id);
}
