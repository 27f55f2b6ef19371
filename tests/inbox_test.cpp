// SPDX-License-Identifier: MIT
// Specification tests for postbox::inbox (idempotent consumer) and postbox::ordered_apply on the memory and SQLite stores.
#include <postbox/inbox.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"
#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::apply_status;
using postbox::errc;
using postbox::inbox_status;
using postbox::message_id;

namespace {

struct payment {
  static constexpr const char* message_type = "payment.received";
  long cents = 0;
};
using env_t = postbox::envelope<payment>;

env_t pay(long cents) { return postbox::make_envelope(payment{cents}); }

// A business write that lives in the store transaction (a version row under
// the scope "effects"), so both stores roll it back with the transaction.
template <class Store, class Tx>
void write_effect(Store& s, Tx& tx, const std::string& what, std::uint64_t value = 1) {
  REQUIRE(s.version_save(tx, "effects", what, value) == errc::ok);
}
template <class Store>
std::uint64_t effect(Store& s, const std::string& what) {
  auto tx = s.begin();
  return *s.version_load(tx, "effects", what);
}

}  // namespace

#if POSTBOX_TEST_HAVE_SQLITE
#  define STORE_FIXTURES postbox_test::memory_fixture, postbox_test::sqlite_fixture
#else
#  define STORE_FIXTURES postbox_test::memory_fixture
#endif

TEMPLATE_TEST_CASE("a new message runs the handler and records its id with the handler's writes", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto e = pay(1250);
  int runs = 0;
  const auto o = in.handle(e, [&](auto& tx, const env_t& m) {
    ++runs;
    write_effect(s, tx, "paid", static_cast<std::uint64_t>(m.payload.cents));
  });
  CHECK(o.status == inbox_status::processed);
  CHECK(o.processed());
  CHECK(runs == 1);
  CHECK(effect(s, "paid") == 1250);
  CHECK(*in.contains(e.id));
}

TEMPLATE_TEST_CASE("a redelivered message is a counted duplicate and its handler does not run", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto e = pay(10);
  int runs = 0;
  auto handler = [&](auto&) { ++runs; };
  REQUIRE(in.handle(e, handler).processed());
  const auto again = in.handle(e, handler);
  CHECK(again.status == inbox_status::duplicate);
  CHECK(again.duplicate());
  CHECK(in.handle(e, handler).duplicate());
  CHECK(runs == 1);
  const auto st = in.stats();
  CHECK(st.processed == 1);
  CHECK(st.duplicates == 2);
}

TEMPLATE_TEST_CASE("a handler that throws keeps nothing and the redelivered message runs again", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto e = pay(10);
  const auto o = in.handle(e, [&](auto& tx) {
    write_effect(s, tx, "half-done");
    throw std::runtime_error("payment service down");
  });
  CHECK(o.status == inbox_status::failed);
  CHECK(o.error == errc::handler_error);
  CHECK(o.message.find("payment service down") != std::string::npos);
  CHECK(effect(s, "half-done") == 0);  // the handler's write rolled back with the id
  CHECK_FALSE(*in.contains(e.id));
  CHECK(in.handle(e, [&](auto& tx) { write_effect(s, tx, "done"); }).processed());
  CHECK(effect(s, "done") == 1);
  CHECK(in.stats().failed == 1);
}

TEMPLATE_TEST_CASE("a handler returning an error code or false fails like one that throws", "[inbox]", STORE_FIXTURES) {
  TestType f;
  postbox::inbox in(f.get(), "billing");
  const auto e = pay(10);
  const auto code = in.handle(e, [](auto&) { return errc::busy; });
  CHECK(code.failed());
  CHECK(code.error == errc::busy);
  const auto no = in.handle(e, [](auto&) { return false; });
  CHECK(no.failed());
  CHECK(no.error == errc::handler_error);
  CHECK_FALSE(*in.contains(e.id));
  CHECK(in.handle(e, [](auto&) { return true; }).processed());
}

TEMPLATE_TEST_CASE("inside the caller's transaction a failed handler undoes only its own part", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto good = pay(1);
  const auto bad = pay(2);
  auto tx = s.begin();
  write_effect(s, tx, "before");
  CHECK(in.handle(tx, good, [&](auto& t) { write_effect(s, t, "good"); }).processed());
  const auto o = in.handle(tx, bad, [&](auto& t) {
    write_effect(s, t, "bad");
    return errc::invalid_argument;
  });
  CHECK(o.failed());
  CHECK(tx.failure() == errc::ok);  // the transaction stays usable
  REQUIRE(tx.commit() == errc::ok);
  CHECK(effect(s, "before") == 1);
  CHECK(effect(s, "good") == 1);
  CHECK(effect(s, "bad") == 0);
  CHECK(*in.contains(good.id));
  CHECK_FALSE(*in.contains(bad.id));
}

TEMPLATE_TEST_CASE("nothing is recorded when the caller rolls back its transaction", "[inbox]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto e = pay(1);
  {
    auto tx = s.begin();
    CHECK(in.handle(tx, e, [&](auto& t) { write_effect(s, t, "x"); }).processed());
  }  // rolled back
  CHECK_FALSE(*in.contains(e.id));
  CHECK(effect(s, "x") == 0);
  CHECK(in.handle(e, [](auto&) {}).processed());
}

TEMPLATE_TEST_CASE("message ids are deduplicated per consumer name", "[inbox]", STORE_FIXTURES) {
  TestType f;
  postbox::inbox billing(f.get(), "billing");
  postbox::inbox shipping(f.get(), "shipping");
  const auto e = pay(1);
  CHECK(billing.handle(e, [](auto&) {}).processed());
  CHECK(shipping.handle(e, [](auto&) {}).processed());
  CHECK(billing.handle(e, [](auto&) {}).duplicate());
}

TEMPLATE_TEST_CASE("a message with a nil id or an inactive transaction is refused", "[inbox]", STORE_FIXTURES) {
  TestType f;
  postbox::inbox in(f.get(), "billing");
  auto e = pay(1);
  e.id = message_id{};
  int runs = 0;
  const auto o = in.handle(e, [&](auto&) { ++runs; });
  CHECK(o.failed());
  CHECK(o.error == errc::invalid_argument);
  auto tx = f.get().begin();
  tx.rollback();
  CHECK(in.handle(tx, pay(2), [&](auto&) { ++runs; }).error == errc::invalid_argument);
  CHECK(runs == 0);
  CHECK_THROWS_AS(postbox::inbox(f.get(), ""), postbox::error);
}

TEMPLATE_TEST_CASE("the dedup window forgets ids older than the window and beyond the count", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::inbox_options opts;
  opts.window = 1h;
  opts.max_ids = 3;
  opts.prune_interval = postbox::duration::zero();  // explicit prune() only
  postbox::inbox in(f.get(), "billing", opts, clock);
  std::vector<env_t> es;
  for (int i = 0; i < 5; ++i) {
    es.push_back(pay(i));
    REQUIRE(in.handle(es.back(), [](auto&) {}).processed());
    clock.advance(20min);
  }
  // Recorded at 0, 20, 40, 60, 80 minutes; now is 100 minutes.
  auto n = in.prune();
  REQUIRE(n.has_value());
  CHECK(*n == 2);  // 0 and 20 are outside the hour; 40, 60, 80 are the newest three
  CHECK(*f.get().inbox_size("billing") == 3);
  CHECK(in.handle(es[0], [](auto&) {}).processed());  // forgotten: it runs again
  CHECK(in.handle(es[4], [](auto&) {}).duplicate());
  CHECK(in.stats().pruned == 2);
  CHECK(*in.prune() == 1);  // four ids now (40, 60, 80, and es[0] at 100): the count keeps three
}

TEMPLATE_TEST_CASE("handle prunes by itself once the prune interval has passed on the clock", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::manual_clock clock;
  postbox::inbox_options opts;
  opts.window = 10min;
  opts.prune_interval = 5min;
  postbox::inbox in(f.get(), "billing", opts, clock);
  REQUIRE(in.handle(pay(1), [](auto&) {}).processed());
  clock.advance(11min);
  REQUIRE(in.handle(pay(2), [](auto&) {}).processed());  // past the interval: prunes the first id
  CHECK(in.stats().pruned == 1);
  CHECK(*f.get().inbox_size("billing") == 1);
}

TEMPLATE_TEST_CASE("a commit that fails is a failed outcome and the id is not recorded", "[inbox]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::inbox in(s, "billing");
  const auto e = pay(1);
  f.inject_commit_failure();
  const auto o = in.handle(e, [&](auto& tx) { write_effect(s, tx, "x"); });
  f.disarm();
  CHECK(o.failed());
  CHECK(o.error != errc::ok);
  CHECK_FALSE(o.message.empty());
  CHECK_FALSE(*in.contains(e.id));
  CHECK(effect(s, "x") == 0);
  CHECK(in.handle(e, [&](auto& tx) { write_effect(s, tx, "x"); }).processed());
}

TEMPLATE_TEST_CASE("register_inbox reports processed, duplicates, failures and the recorded ids", "[inbox]",
                   STORE_FIXTURES) {
  TestType f;
  postbox::inbox in(f.get(), "billing");
  const auto e = pay(1);
  REQUIRE(in.handle(e, [](auto&) {}).processed());
  REQUIRE(in.handle(e, [](auto&) {}).duplicate());
  postbox::metrics_registry registry;
  auto reg = postbox::register_inbox(registry, "billing", in);
  const auto text = registry.render_prometheus();
  CHECK(text.find("postbox_inbox_duplicates_total{component=\"inbox\",name=\"billing\"} 1") != std::string::npos);
  CHECK(text.find("postbox_inbox_ids{component=\"inbox\",name=\"billing\"} 1") != std::string::npos);
}

// ---- concurrent duplicates: exactly one effect ----

namespace {

template <class Store>
void concurrent_duplicates(Store& s) {
  const int threads = 4;
  const int ids = static_cast<int>(postbox_test::scaled(300));
  std::vector<env_t> messages;
  for (int i = 0; i < ids; ++i) messages.push_back(pay(i));
  postbox::inbox in(s, "billing");
  std::mutex mutex;
  std::map<message_id, int> effects;  // an effect outside the store: counts handler runs that committed
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<int> order(static_cast<std::size_t>(ids));
      for (int i = 0; i < ids; ++i) order[static_cast<std::size_t>(i)] = i;
      std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<unsigned>(t)));
      for (const int i : order) {
        const auto& m = messages[static_cast<std::size_t>(i)];
        const auto o = in.handle(m, [&](auto& tx) {
          // No Catch assertions on these threads: report through the outcome.
          if (s.version_save(tx, "effects", m.id.to_string(), 1) != errc::ok) return errc::store_error;
          std::lock_guard lock(mutex);
          ++effects[m.id];
          return errc::ok;
        });
        if (o.failed()) ++failures;
      }
    });
  }
  for (auto& th : pool) th.join();
  CHECK(failures.load() == 0);
  int wrong = 0;
  for (const auto& m : messages) {
    if (effects[m.id] != 1 || effect(s, m.id.to_string()) != 1) ++wrong;
  }
  CHECK(wrong == 0);
  const auto st = in.stats();
  CHECK(st.processed == static_cast<std::uint64_t>(ids));
  CHECK(st.duplicates == static_cast<std::uint64_t>(ids * (threads - 1)));
}

}  // namespace

TEST_CASE("stress: threads handling the same ids at once on the memory store give each id exactly one effect",
          "[inbox][stress]") {
  postbox::memory_store s;
  concurrent_duplicates(s);
}

#if POSTBOX_TEST_HAVE_SQLITE
TEST_CASE("stress: threads handling the same ids at once on the SQLite store give each id exactly one effect",
          "[inbox][stress]") {
  postbox_test::temp_dir dir("postbox_inbox_stress");
  postbox::sqlite_store_options o;
  o.synchronous = postbox::sqlite_synchronous::off;
  postbox::sqlite_store s(dir.file("inbox.db"), o);
  concurrent_duplicates(s);
}
#endif

// ---- version-ordered apply ----

namespace {

struct event {
  std::uint64_t version = 0;
};
using ev_t = postbox::envelope<event>;
ev_t ev(std::uint64_t v) { return postbox::make_envelope(std::string("account.changed"), event{v}); }

// Appends the applied version to a projection row "log" (in the transaction).
template <class Store>
struct projection {
  Store* s;
  std::vector<std::uint64_t> applied;  // versions whose handler ran and was kept (SQLite/memory commit)
  template <class Tx>
  void operator()(Tx& tx, const ev_t& e) {
    write_effect(*s, tx, "balance-version", e.payload.version);
    applied.push_back(e.payload.version);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("the next version is applied and the stored version advances", "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  projection<typename TestType::store_type> p{&s, {}};
  const auto o = apply.apply("acc-1", 1, ev(1), p);
  CHECK(o.status == apply_status::applied);
  CHECK(o.current == 1);
  CHECK(o.applied == 1);
  CHECK(apply.apply("acc-1", 2, ev(2), p).current == 2);
  CHECK(p.applied == std::vector<std::uint64_t>{1, 2});
  CHECK(effect(s, "balance-version") == 2);
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "accounts", "acc-1") == 2);
}

TEMPLATE_TEST_CASE("a stale version is skipped without running the handler", "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  projection<typename TestType::store_type> p{&s, {}};
  REQUIRE(apply.apply("acc-1", 1, ev(1), p).status == apply_status::applied);
  REQUIRE(apply.apply("acc-1", 2, ev(2), p).status == apply_status::applied);
  const auto o = apply.apply("acc-1", 1, ev(1), p);
  CHECK(o.status == apply_status::stale);
  CHECK(o.current == 2);
  CHECK(apply.apply("acc-1", 2, ev(2), p).status == apply_status::stale);
  CHECK(p.applied == std::vector<std::uint64_t>{1, 2});
}

TEMPLATE_TEST_CASE("a gap is buffered and reported missing with the versions not yet seen", "[inbox][ordered]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  projection<typename TestType::store_type> p{&s, {}};
  REQUIRE(apply.apply("acc-1", 1, ev(1), p).status == apply_status::applied);
  const auto four = apply.apply("acc-1", 4, ev(4), p);
  CHECK(four.status == apply_status::missing);
  CHECK(four.current == 1);
  CHECK(four.missing == std::vector<std::uint64_t>{2, 3});
  const auto three = apply.apply("acc-1", 3, ev(3), p);
  CHECK(three.status == apply_status::missing);
  CHECK(three.missing == std::vector<std::uint64_t>{2});
  CHECK(apply.buffered() == 2);
  CHECK(p.applied == std::vector<std::uint64_t>{1});
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "accounts", "acc-1") == 1);  // nothing applied out of order
}

TEMPLATE_TEST_CASE("the missing version arriving applies the buffered successors in order in one transaction",
                   "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  projection<typename TestType::store_type> p{&s, {}};
  REQUIRE(apply.apply("acc-1", 1, ev(1), p).status == apply_status::applied);
  REQUIRE(apply.apply("acc-1", 4, ev(4), p).status == apply_status::missing);
  REQUIRE(apply.apply("acc-1", 3, ev(3), p).status == apply_status::missing);
  REQUIRE(apply.apply("acc-1", 6, ev(6), p).status == apply_status::missing);
  const auto two = apply.apply("acc-1", 2, ev(2), p);
  CHECK(two.status == apply_status::applied);
  CHECK(two.applied == 3);  // 2, then 3 and 4 from the buffer; 6 still waits for 5
  CHECK(two.current == 4);
  CHECK(p.applied == std::vector<std::uint64_t>{1, 2, 3, 4});
  CHECK(apply.buffered() == 1);
  CHECK(apply.apply("acc-1", 4, ev(4), p).status == apply_status::stale);  // the retried copy of 4
  CHECK(apply.apply("acc-1", 5, ev(5), p).current == 6);
  CHECK(effect(s, "balance-version") == 6);
  CHECK(apply.buffered() == 0);
}

TEMPLATE_TEST_CASE("a full reorder buffer reports buffer_full and keeps nothing more", "[inbox][ordered]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply_options opts;
  opts.max_buffered = 2;
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts", opts);
  projection<typename TestType::store_type> p{&s, {}};
  CHECK(apply.apply("acc-1", 3, ev(3), p).status == apply_status::missing);
  CHECK(apply.apply("acc-2", 5, ev(5), p).status == apply_status::missing);
  const auto full = apply.apply("acc-1", 4, ev(4), p);
  CHECK(full.status == apply_status::buffer_full);
  CHECK(full.missing == std::vector<std::uint64_t>{1, 2});
  CHECK(apply.buffered() == 2);
  CHECK(apply.apply("acc-1", 3, ev(3), p).status == apply_status::missing);  // already held: not a new entry
}

TEMPLATE_TEST_CASE("a failing handler leaves the version where it was", "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  const auto o = apply.apply("acc-1", 1, ev(1), [&](auto& tx, const ev_t&) {
    write_effect(s, tx, "balance-version", 1);
    throw std::runtime_error("projection db down");
  });
  CHECK(o.status == apply_status::failed);
  CHECK(o.error == errc::handler_error);
  CHECK(effect(s, "balance-version") == 0);
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "accounts", "acc-1") == 0);
}

TEMPLATE_TEST_CASE("a buffered successor whose handler fails is dropped and applied when redelivered",
                   "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  std::vector<std::uint64_t> applied;
  bool fail_three = true;
  auto handler = [&](auto& tx, const ev_t& e) {
    if (e.payload.version == 3 && fail_three) return errc::busy;
    write_effect(s, tx, "balance-version", e.payload.version);
    applied.push_back(e.payload.version);
    return errc::ok;
  };
  REQUIRE(apply.apply("acc-1", 3, ev(3), handler).status == apply_status::missing);
  REQUIRE(apply.apply("acc-1", 2, ev(2), handler).status == apply_status::missing);
  const auto one = apply.apply("acc-1", 1, ev(1), handler);
  CHECK(one.status == apply_status::applied);
  CHECK(one.current == 2);  // 1 and 2; 3 failed and left the buffer
  CHECK(apply.buffered() == 0);
  fail_three = false;
  CHECK(apply.apply("acc-1", 3, ev(3), handler).current == 3);  // the redelivery
  CHECK(applied == std::vector<std::uint64_t>{1, 2, 3});
}

TEMPLATE_TEST_CASE("version 0 is refused", "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  postbox::ordered_apply<typename TestType::store_type, event> apply(f.get(), "accounts");
  const auto o = apply.apply("acc-1", 0, ev(0), [](auto&, const ev_t&) {});
  CHECK(o.status == apply_status::failed);
  CHECK(o.error == errc::invalid_argument);
}

TEMPLATE_TEST_CASE("versions of different keys advance independently", "[inbox][ordered]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::ordered_apply<typename TestType::store_type, event> apply(s, "accounts");
  auto noop = [](auto&, const ev_t&) {};
  CHECK(apply.apply("a", 1, ev(1), noop).status == apply_status::applied);
  CHECK(apply.apply("b", 1, ev(1), noop).status == apply_status::applied);
  CHECK(apply.apply("b", 2, ev(2), noop).status == apply_status::applied);
  CHECK(apply.apply("a", 3, ev(3), noop).status == apply_status::missing);
  CHECK(apply.apply("a", 2, ev(2), noop).current == 3);
}
