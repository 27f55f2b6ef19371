// SPDX-License-Identifier: MIT
// Conformance suite of the message store concept: every case runs against memory_store and sqlite_store; a new store must pass it.
#include <postbox/store.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"
#include "support.hpp"

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::message_id;
using postbox::stored_message;
using postbox::time_point;

namespace {

constexpr time_point t0 = postbox::manual_clock::default_start;

stored_message msg(const std::string& key, int n, time_point staged = t0) {
  stored_message m;
  m.id = message_id::generate();
  m.type = "test.event";
  m.partition_key = key;
  m.correlation_id = m.id;
  m.causation_id = message_id(1, 2);
  m.staged_at = staged;
  m.body = key + "#" + std::to_string(n);
  return m;
}

template <class Store>
void commit_staged(Store& store, const std::vector<stored_message>& ms) {
  auto tx = store.begin();
  for (const auto& m : ms) REQUIRE(store.outbox_stage(tx, m) == errc::ok);
  REQUIRE(tx.commit() == errc::ok);
}

std::vector<std::string> bodies(const std::vector<stored_message>& ms) {
  std::vector<std::string> out;
  for (const auto& m : ms) out.push_back(m.body);
  return out;
}

std::vector<std::uint64_t> seqs(const std::vector<stored_message>& ms) {
  std::vector<std::uint64_t> out;
  for (const auto& m : ms) out.push_back(m.sequence);
  return out;
}

template <class Store>
std::vector<stored_message> claim(Store& store, const char* owner, std::size_t max = 100, time_point now = t0,
                                  postbox::duration lease = 30s) {
  auto c = store.outbox_claim(owner, now, now + lease, max);
  REQUIRE(c.has_value());
  return c->messages;
}

}  // namespace

#if POSTBOX_TEST_HAVE_SQLITE
#  define STORE_FIXTURES postbox_test::memory_fixture, postbox_test::sqlite_fixture
#else
#  define STORE_FIXTURES postbox_test::memory_fixture
#endif

static_assert(postbox::message_store<postbox::memory_store>);

TEMPLATE_TEST_CASE("a committed transaction's staged messages are claimed in staging order with every field",
                   "[store]", STORE_FIXTURES) {
  TestType f;
  auto a = msg("k1", 1, t0 + 1s);
  auto b = msg("k2", 1, t0 + 2s);
  auto c = msg("k1", 2, t0 + 3s);
  c.body = std::string("binary\0body", 11);
  commit_staged(f.get(), {a, b, c});
  const auto got = claim(f.get(), "r1");
  REQUIRE(got.size() == 3);
  CHECK(bodies(got) == std::vector<std::string>{"k1#1", "k2#1", std::string("binary\0body", 11)});
  CHECK(got[0].sequence < got[1].sequence);
  CHECK(got[1].sequence < got[2].sequence);
  CHECK(got[0].id == a.id);
  CHECK(got[0].type == "test.event");
  CHECK(got[0].partition_key == "k1");
  CHECK(got[0].correlation_id == a.id);
  CHECK(got[0].causation_id == message_id(1, 2));
  CHECK(got[0].staged_at == t0 + 1s);
  CHECK(got[0].attempts == 0);
}

TEMPLATE_TEST_CASE("a rolled back transaction leaves no message, inbox record or version", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("k", 1)) == errc::ok);
    REQUIRE(s.inbox_record(tx, "c", message_id(9, 9), t0) == errc::ok);
    REQUIRE(s.version_save(tx, "proj", "a-1", 5) == errc::ok);
    tx.rollback();
    CHECK_FALSE(tx.active());
  }
  CHECK(claim(s, "r1").empty());
  CHECK_FALSE(*s.inbox_contains("c", message_id(9, 9)));
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "proj", "a-1") == 0);
}

TEMPLATE_TEST_CASE("destroying an active transaction rolls it back", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("k", 1)) == errc::ok);
    REQUIRE(s.inbox_record(tx, "c", message_id(7, 7), t0) == errc::ok);
  }
  CHECK(claim(s, "r1").empty());
  CHECK_FALSE(*s.inbox_contains("c", message_id(7, 7)));
  CHECK(s.stats().rollbacks >= 1);
}

TEMPLATE_TEST_CASE("staging an id already in the outbox is a conflict that dooms the whole transaction", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto a = msg("k", 1);
  commit_staged(s, {a});
  auto tx = s.begin();
  REQUIRE(s.version_save(tx, "proj", "a-1", 1) == errc::ok);  // a "business" write in the same transaction
  CHECK(s.outbox_stage(tx, a) == errc::conflict);
  CHECK(tx.failure() == errc::conflict);
  CHECK_FALSE(tx.last_error().empty());
  CHECK(tx.commit() == errc::conflict);
  CHECK_FALSE(tx.active());
  auto check = s.begin();
  CHECK(*s.version_load(check, "proj", "a-1") == 0);  // the business write did not commit alone
}

TEMPLATE_TEST_CASE("a message with a nil id is refused with invalid_argument", "[store]", STORE_FIXTURES) {
  TestType f;
  auto m = msg("k", 1);
  m.id = message_id{};
  auto tx = f.get().begin();
  CHECK(f.get().outbox_stage(tx, m) == errc::invalid_argument);
  CHECK(tx.commit() == errc::invalid_argument);
}

TEMPLATE_TEST_CASE("a transaction of another store is refused with invalid_argument", "[store]", STORE_FIXTURES) {
  TestType f;
  TestType other;
  auto tx = other.get().begin();
  CHECK(f.get().outbox_stage(tx, msg("k", 1)) == errc::invalid_argument);
  CHECK(f.get().inbox_record(tx, "c", message_id(1, 1), t0) == errc::invalid_argument);
  CHECK(f.get().version_save(tx, "p", "k", 1) == errc::invalid_argument);
  CHECK(f.get().version_load(tx, "p", "k").status() == errc::invalid_argument);
  CHECK(tx.commit() == errc::ok);  // nothing happened to it
  CHECK(claim(f.get(), "r1").empty());
  CHECK(claim(other.get(), "r1").empty());
}

TEMPLATE_TEST_CASE("a doomed transaction commits nothing and reports the doom", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto tx = s.begin();
  REQUIRE(s.outbox_stage(tx, msg("k", 1)) == errc::ok);
  tx.fail(errc::handler_error, "the caller changed its mind");
  tx.fail(errc::busy, "a second doom does not replace the first");
  CHECK(tx.commit() == errc::handler_error);
  CHECK(tx.last_error() == "the caller changed its mind");
  CHECK(claim(s, "r1").empty());
}

TEMPLATE_TEST_CASE("a leased message's key is skipped by other owners until the lease expires", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("a", 2), msg("b", 1)});
  const auto first = claim(s, "r1", 1, t0, 10s);  // leases a#1 only
  REQUIRE(bodies(first) == std::vector<std::string>{"a#1"});
  // r2 must not take a#2 while a#1 is leased to r1: key "a" is skipped whole.
  auto second = s.outbox_claim("r2", t0 + 1s, t0 + 31s, 100);
  REQUIRE(second.has_value());
  CHECK(bodies(second->messages) == std::vector<std::string>{"b#1"});
  // After r1's lease runs out, r2 takes key "a" from its first message (and
  // b#1 again, which it still leases itself).
  const auto third = claim(s, "r2", 100, t0 + 11s);
  CHECK(bodies(third) == std::vector<std::string>{"a#1", "a#2", "b#1"});
}

TEMPLATE_TEST_CASE("a claim that finds a key blocked reports when it frees up", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1)});
  REQUIRE(claim(s, "r1", 1, t0, 10s).size() == 1);
  auto other = s.outbox_claim("r2", t0 + 1s, t0 + 31s, 100);
  REQUIRE(other.has_value());
  CHECK(other->messages.empty());
  REQUIRE(other->next_due.has_value());
  CHECK(*other->next_due == t0 + 10s);
}

TEMPLATE_TEST_CASE("the owner of a lease may claim its own leased messages again", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1)});
  REQUIRE(claim(s, "r1").size() == 1);
  CHECK(claim(s, "r1", 100, t0 + 1s).size() == 1);
}

TEMPLATE_TEST_CASE("retry_later counts the attempt, frees the lease and holds the key until the retry time", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("a", 2), msg("b", 1)});
  const auto got = claim(s, "r1", 1);
  REQUIRE(got.size() == 1);
  CHECK(s.outbox_retry_later("r2", got[0].sequence, t0, t0 + 5s, "not mine") == errc::not_found);
  REQUIRE(s.outbox_retry_later("r1", got[0].sequence, t0, t0 + 5s, "destination down") == errc::ok);
  auto early = s.outbox_claim("r1", t0 + 1s, t0 + 31s, 100);
  REQUIRE(early.has_value());
  CHECK(bodies(early->messages) == std::vector<std::string>{"b#1"});  // key a waits, whole
  const std::vector<std::uint64_t> b_seq = seqs(early->messages);
  REQUIRE(s.outbox_release("r1", b_seq) == errc::ok);
  auto blocked = s.outbox_claim("r2", t0 + 2s, t0 + 32s, 100);
  REQUIRE(blocked.has_value());
  REQUIRE(blocked->next_due.has_value());
  CHECK(*blocked->next_due == t0 + 5s);
  const auto later = claim(s, "r2", 100, t0 + 5s);
  REQUIRE(later.size() == 3);
  CHECK(later[0].body == "a#1");
  CHECK(later[0].attempts == 1);
  CHECK(s.outbox_summary()->retrying == 1);
}

TEMPLATE_TEST_CASE("mark_dispatched marks only what the owner still leases", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("b", 1)});
  const auto r1 = claim(s, "r1", 100, t0, 10s);
  REQUIRE(r1.size() == 2);
  // r1's lease runs out and r2 re-leases key b.
  const auto r2 = claim(s, "r2", 100, t0 + 11s);
  REQUIRE(r2.size() == 2);
  REQUIRE(s.outbox_release("r2", std::vector<std::uint64_t>{r2[0].sequence}) == errc::ok);  // a is free again
  auto marked = s.outbox_mark_dispatched("r1", seqs(r1), t0 + 12s);
  REQUIRE(marked.has_value());
  CHECK(*marked == 0);  // a is no longer leased by r1 (released), b is r2's
  auto mine = s.outbox_mark_dispatched("r2", std::vector<std::uint64_t>{r2[1].sequence}, t0 + 12s);
  CHECK(*mine == 1);
  CHECK(bodies(claim(s, "r3", 100, t0 + 13s)) == std::vector<std::string>{"a#1"});
}

TEMPLATE_TEST_CASE("claims by owners in turn keep each row leased by its own owner, marked in any order", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("b", 1), msg("c", 1), msg("d", 1), msg("e", 1), msg("f", 1)});
  // Long owner names (past any small-string buffer), claimed in turn: the
  // memory store shares one name per claim between the rows it leases.
  const std::string one(40, '1'), two(40, '2');
  const auto r1 = claim(s, one.c_str(), 2);
  const auto r2 = claim(s, two.c_str(), 2);
  const auto r1b = claim(s, one.c_str(), 1);  // one's third row, after two's claim
  REQUIRE(bodies(r1) == std::vector<std::string>{"a#1", "b#1"});
  REQUIRE(bodies(r2) == std::vector<std::string>{"c#1", "d#1"});
  REQUIRE(bodies(r1b) == std::vector<std::string>{"a#1"});  // one may claim its own leased rows again
  const auto r1c = claim(s, one.c_str(), 5);
  REQUIRE(bodies(r1c) == std::vector<std::string>{"a#1", "b#1", "e#1", "f#1"});  // c and d stay two's
  // Every sequence, backwards and twice: only one's rows are marked, once.
  std::vector<std::uint64_t> all;
  for (const auto& m : r1c) all.push_back(m.sequence);
  for (const auto& m : r2) all.push_back(m.sequence);
  std::vector<std::uint64_t> backwards(all.rbegin(), all.rend());
  backwards.insert(backwards.end(), all.begin(), all.end());
  auto marked = s.outbox_mark_dispatched(one, backwards, t0 + 1s);
  REQUIRE(marked.has_value());
  CHECK(*marked == 4);
  marked = s.outbox_mark_dispatched(two, all, t0 + 1s);
  REQUIRE(marked.has_value());
  CHECK(*marked == 2);
  const auto sum = s.outbox_summary();
  REQUIRE(sum.has_value());
  CHECK(sum->pending == 0);
  CHECK(sum->leased == 0);
  CHECK(sum->dispatched == 6);
}

TEMPLATE_TEST_CASE("renew extends the owner's lease on the rows it still leases and counts only those", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("b", 1), msg("c", 1)});
  const auto r1 = claim(s, "r1", 100, t0, 10s);
  REQUIRE(r1.size() == 3);
  // Renewed at t0+5s until t0+25s: at t0+11s (the first lease's end) r2 finds every key still held.
  auto renewed = s.outbox_renew("r1", seqs(r1), t0 + 5s, t0 + 25s);
  REQUIRE(renewed.has_value());
  CHECK(*renewed == 3);
  auto held = s.outbox_claim("r2", t0 + 11s, t0 + 41s, 100);
  REQUIRE(held.has_value());
  CHECK(held->messages.empty());
  REQUIRE(held->next_due.has_value());
  CHECK(*held->next_due == t0 + 25s);
  // Another owner renews nothing; r1 does not renew what it released.
  CHECK(*s.outbox_renew("r2", seqs(r1), t0 + 12s, t0 + 42s) == 0);
  REQUIRE(s.outbox_release("r1", std::vector<std::uint64_t>{r1[0].sequence}) == errc::ok);
  CHECK(*s.outbox_renew("r1", seqs(r1), t0 + 12s, t0 + 30s) == 2);
  // Once r1's lease has run out and r2 re-leased the rows, r1's renewal finds none of them.
  const auto r2 = claim(s, "r2", 100, t0 + 31s);
  REQUIRE(r2.size() == 3);
  CHECK(*s.outbox_renew("r1", seqs(r1), t0 + 32s, t0 + 60s) == 0);
  REQUIRE(*s.outbox_mark_dispatched("r2", std::vector<std::uint64_t>{r2[0].sequence}, t0 + 33s) == 1);
  CHECK(*s.outbox_renew("r2", seqs(r2), t0 + 34s, t0 + 60s) == 2);  // a dispatched row is no one's lease
}

TEMPLATE_TEST_CASE("renew refuses a lease end that is not after now", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1)});
  const auto r1 = claim(s, "r1", 100, t0, 10s);
  REQUIRE(r1.size() == 1);
  CHECK(s.outbox_renew("r1", seqs(r1), t0 + 5s, t0 + 5s).status() == errc::invalid_argument);
  CHECK(*s.outbox_renew("r1", seqs(r1), t0 + 5s, t0 + 6s) == 1);
}

TEMPLATE_TEST_CASE("released messages are claimable again at once", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("a", 2)});
  const auto got = claim(s, "r1");
  REQUIRE(s.outbox_release("r1", seqs(got)) == errc::ok);
  CHECK(bodies(claim(s, "r2")) == std::vector<std::string>{"a#1", "a#2"});
}

TEMPLATE_TEST_CASE("a claim takes at most the batch size and the earliest messages of each key", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  std::vector<stored_message> ms;
  for (int i = 1; i <= 5; ++i) ms.push_back(msg("a", i));
  for (int i = 1; i <= 3; ++i) ms.push_back(msg("b", i));
  commit_staged(s, ms);
  const auto first = claim(s, "r1", 3);
  CHECK(bodies(first) == std::vector<std::string>{"a#1", "a#2", "a#3"});
  REQUIRE(*s.outbox_mark_dispatched("r1", seqs(first), t0) == 3);
  CHECK(bodies(claim(s, "r1", 3)) == std::vector<std::string>{"a#4", "a#5", "b#1"});
}

TEMPLATE_TEST_CASE("dispatched messages are purged only once older than the cutoff", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("a", 2), msg("a", 3)});
  const auto got = claim(s, "r1");
  REQUIRE(*s.outbox_mark_dispatched("r1", std::vector<std::uint64_t>{got[0].sequence}, t0 + 1s) == 1);
  REQUIRE(*s.outbox_mark_dispatched("r1", std::vector<std::uint64_t>{got[1].sequence}, t0 + 2s) == 1);
  CHECK(*s.outbox_purge(t0 + 1s, 100) == 0);  // strictly older than the cutoff
  CHECK(*s.outbox_purge(t0 + 2s, 100) == 1);
  auto summary = s.outbox_summary();
  REQUIRE(summary.has_value());
  CHECK(summary->dispatched == 1);
  CHECK(summary->pending == 1);
  CHECK(*s.outbox_purge(t0 + 1h, 100) == 1);
  CHECK(s.outbox_summary()->dispatched == 0);
}

TEMPLATE_TEST_CASE("a purged message id may be staged again", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto a = msg("a", 1);
  commit_staged(s, {a});
  const auto got = claim(s, "r1");
  REQUIRE(*s.outbox_mark_dispatched("r1", seqs(got), t0) == 1);
  REQUIRE(*s.outbox_purge(t0 + 1s, 100) == 1);
  commit_staged(s, {a});
  CHECK(claim(s, "r1").size() == 1);
}

TEMPLATE_TEST_CASE("the outbox summary counts pending, leased, retrying and dispatched messages", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  CHECK_FALSE(s.outbox_summary()->oldest_pending.has_value());
  commit_staged(s, {msg("a", 1, t0 + 1s), msg("b", 1, t0 + 2s), msg("c", 1, t0 + 3s)});
  const auto a = claim(s, "r1", 1);
  REQUIRE(*s.outbox_mark_dispatched("r1", seqs(a), t0) == 1);
  const auto bc = claim(s, "r1", 2);
  REQUIRE(bodies(bc) == std::vector<std::string>{"b#1", "c#1"});
  REQUIRE(s.outbox_retry_later("r1", bc[1].sequence, t0, t0 + 9s, "down") == errc::ok);
  auto sum = s.outbox_summary();
  REQUIRE(sum.has_value());
  CHECK(sum->pending == 2);
  CHECK(sum->leased == 1);
  CHECK(sum->retrying == 1);
  CHECK(sum->dispatched == 1);
  REQUIRE(sum->oldest_pending.has_value());
  CHECK(*sum->oldest_pending == t0 + 2s);
  auto pending = s.outbox_pending();
  REQUIRE(pending.has_value());
  CHECK(bodies(*pending) == std::vector<std::string>{"b#1", "c#1"});
}

TEMPLATE_TEST_CASE("a commit that staged messages notifies the commit signal and other commits do not", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  const auto before = s.commits().sequence();
  {
    auto tx = s.begin();
    REQUIRE(s.inbox_record(tx, "c", message_id(1, 1), t0) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  CHECK(s.commits().sequence() == before);
  commit_staged(s, {msg("a", 1)});
  CHECK(s.commits().sequence() == before + 1);
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("a", 2)) == errc::ok);
    tx.rollback();
  }
  CHECK(s.commits().sequence() == before + 1);
}

TEMPLATE_TEST_CASE("an inbox id is a duplicate once committed, for that consumer only", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  const message_id id(42, 42);
  {
    auto tx = s.begin();
    REQUIRE(s.inbox_record(tx, "billing", id, t0) == errc::ok);
    CHECK(s.inbox_record(tx, "billing", id, t0) == errc::conflict);  // twice in one transaction
    CHECK(tx.failure() == errc::ok);                                 // a duplicate does not doom
    REQUIRE(tx.commit() == errc::ok);
  }
  CHECK(*s.inbox_contains("billing", id));
  CHECK_FALSE(*s.inbox_contains("shipping", id));
  auto tx = s.begin();
  CHECK(s.inbox_record(tx, "billing", id, t0) == errc::conflict);
  CHECK(s.inbox_record(tx, "shipping", id, t0) == errc::ok);
  REQUIRE(tx.commit() == errc::ok);
  CHECK(*s.inbox_size("billing") == 1);
  CHECK(*s.inbox_size("shipping") == 1);
}

TEMPLATE_TEST_CASE("an inbox record rolled back to its savepoint is not recorded and the rest commits", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto tx = s.begin();
  REQUIRE(s.version_save(tx, "proj", "k", 1) == errc::ok);
  REQUIRE(tx.savepoint() == errc::ok);
  REQUIRE(s.inbox_record(tx, "c", message_id(5, 5), t0) == errc::ok);
  REQUIRE(s.version_save(tx, "proj", "k", 2) == errc::ok);
  REQUIRE(tx.rollback_to_savepoint() == errc::ok);
  CHECK(*s.version_load(tx, "proj", "k") == 1);
  REQUIRE(tx.commit() == errc::ok);
  CHECK_FALSE(*s.inbox_contains("c", message_id(5, 5)));
  auto check = s.begin();
  CHECK(*s.version_load(check, "proj", "k") == 1);
}

TEMPLATE_TEST_CASE("savepoints nest and a released one keeps its writes", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto tx = s.begin();
  CHECK(tx.release_savepoint() == errc::invalid_argument);  // none open
  REQUIRE(tx.savepoint() == errc::ok);
  REQUIRE(s.version_save(tx, "p", "k", 1) == errc::ok);
  REQUIRE(tx.savepoint() == errc::ok);
  REQUIRE(s.version_save(tx, "p", "k", 2) == errc::ok);
  REQUIRE(tx.rollback_to_savepoint() == errc::ok);  // inner
  REQUIRE(tx.release_savepoint() == errc::ok);      // outer keeps version 1
  REQUIRE(tx.commit() == errc::ok);
  auto check = s.begin();
  CHECK(*s.version_load(check, "p", "k") == 1);
}

TEMPLATE_TEST_CASE("inbox prune forgets ids recorded before the cutoff and all but the newest kept", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  for (std::uint64_t i = 1; i <= 10; ++i) {
    auto tx = s.begin();
    REQUIRE(s.inbox_record(tx, "c", message_id(0, i), t0 + std::chrono::seconds(i)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  auto n = s.inbox_prune("c", t0 + 4s, 100);  // ids 1..3 are older than the cutoff
  REQUIRE(n.has_value());
  CHECK(*n == 3);
  CHECK_FALSE(*s.inbox_contains("c", message_id(0, 3)));
  CHECK(*s.inbox_contains("c", message_id(0, 4)));
  CHECK(*s.inbox_prune("c", t0, 5) == 2);  // keep the newest five: 6..10
  CHECK(*s.inbox_size("c") == 5);
  CHECK_FALSE(*s.inbox_contains("c", message_id(0, 5)));
  CHECK(*s.inbox_contains("c", message_id(0, 6)));
  CHECK(*s.inbox_prune("other", t0 + 1h, 0) == 0);
}

TEMPLATE_TEST_CASE("versions are read back inside the transaction, kept on commit and dropped on rollback", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  {
    auto tx = s.begin();
    CHECK(*s.version_load(tx, "orders", "o-1") == 0);
    REQUIRE(s.version_save(tx, "orders", "o-1", 3) == errc::ok);
    CHECK(*s.version_load(tx, "orders", "o-1") == 3);
    CHECK(*s.version_load(tx, "orders", "o-2") == 0);
    CHECK(*s.version_load(tx, "payments", "o-1") == 0);  // scopes are separate
    REQUIRE(tx.commit() == errc::ok);
  }
  {
    auto tx = s.begin();
    REQUIRE(s.version_save(tx, "orders", "o-1", 4) == errc::ok);
  }
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "orders", "o-1") == 3);
}

TEMPLATE_TEST_CASE("a commit that fails keeps everything committed before and reports a clear error", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1)});
  const auto failures_before = s.stats().failures;
  f.inject_commit_failure();
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("a", 2)) == errc::ok);
    REQUIRE(s.inbox_record(tx, "c", message_id(3, 3), t0) == errc::ok);
    const errc rc = tx.commit();
    CHECK(rc != errc::ok);
    CHECK_FALSE(tx.active());
    INFO(tx.last_error());
    CHECK_FALSE(tx.last_error().empty());
  }
  f.disarm();
  CHECK(s.stats().failures > failures_before);
  // The store still works and lost nothing committed; the failed commit left nothing.
  commit_staged(s, {msg("a", 3)});
  f.reopen();
  auto& again = f.get();
  CHECK(bodies(claim(again, "r1")) == std::vector<std::string>{"a#1", "a#3"});
  CHECK_FALSE(*again.inbox_contains("c", message_id(3, 3)));
}

TEMPLATE_TEST_CASE("begin, commit and rollback are counted in the store's stats", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  const auto before = s.stats();
  commit_staged(s, {msg("a", 1)});
  { auto tx = s.begin(); }
  const auto after = s.stats();
  CHECK(after.commits == before.commits + 1);
  CHECK(after.rollbacks == before.rollbacks + 1);
  postbox::metrics_registry registry;
  auto reg = postbox::register_store(registry, "db", s);
  CHECK(registry.render_prometheus().find("postbox_store_commits_total{component=\"store\",name=\"db\"}") !=
        std::string::npos);
}

// ---- outbox dead letters ----

TEMPLATE_TEST_CASE("dead_letter moves a leased row to the dead letters with its failures and frees its key",
                   "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1, t0), msg("a", 2, t0), msg("b", 1, t0)});
  auto got = claim(s, "r1", 1);
  REQUIRE(bodies(got) == std::vector<std::string>{"a#1"});
  REQUIRE(s.outbox_retry_later("r1", got[0].sequence, t0 + 1s, t0 + 2s, "first") == errc::ok);
  got = claim(s, "r1", 1, t0 + 2s);
  REQUIRE(bodies(got) == std::vector<std::string>{"a#1"});
  CHECK(s.outbox_dead_letter("r2", got[0].sequence, t0 + 3s, "bad_type", "not mine") == errc::not_found);
  REQUIRE(s.outbox_dead_letter("r1", got[0].sequence, t0 + 3s, "bad_type", "payload: bad") == errc::ok);
  // The rest of key a is claimable at once, with no retry wait.
  CHECK(bodies(claim(s, "r2", 100, t0 + 3s)) == std::vector<std::string>{"a#2", "b#1"});
  auto dead = s.outbox_dead_letters({});
  REQUIRE(dead.has_value());
  REQUIRE(dead->size() == 1);
  const auto& d = dead->front();
  CHECK(d.message.body == "a#1");
  CHECK(d.message.partition_key == "a");
  CHECK(d.message.type == "test.event");
  CHECK(d.message.sequence == got[0].sequence);
  CHECK(d.message.attempts == 2);
  CHECK(d.reason == "bad_type");
  CHECK(d.error == "payload: bad");
  CHECK(d.first_failure == t0 + 1s);
  CHECK(d.last_failure == t0 + 3s);
  auto sum = s.outbox_summary();
  CHECK(sum->pending == 2);
  CHECK(sum->dead_lettered == 1);
  CHECK(sum->retrying == 0);
}

TEMPLATE_TEST_CASE("dead letters are listed by key, reason, type and id, oldest first and bounded", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  auto other = msg("b", 1);
  other.type = "other.event";
  commit_staged(s, {msg("a", 1), msg("a", 2), other, msg("c", 1)});
  const auto got = claim(s, "r1");
  REQUIRE(got.size() == 4);
  const char* reasons[] = {"parse_error", "retries_exhausted", "parse_error", "retries_exhausted"};
  for (std::size_t i = 0; i < got.size(); ++i)
    REQUIRE(s.outbox_dead_letter("r1", got[i].sequence, t0, reasons[i], "x") == errc::ok);
  auto bodies_of = [&](const postbox::outbox_dead_letter_filter& flt) {
    std::vector<std::string> out;
    const auto listed = s.outbox_dead_letters(flt);
    REQUIRE(listed.has_value());
    for (const auto& d : *listed) out.push_back(d.message.body);
    return out;
  };
  CHECK(bodies_of({}) == std::vector<std::string>{"a#1", "a#2", "b#1", "c#1"});
  CHECK(bodies_of({.key = "a"}) == std::vector<std::string>{"a#1", "a#2"});
  CHECK(bodies_of({.reason = "parse_error"}) == std::vector<std::string>{"a#1", "b#1"});
  CHECK(bodies_of({.key = "a", .reason = "retries_exhausted"}) == std::vector<std::string>{"a#2"});
  CHECK(bodies_of({.type = "other.event"}) == std::vector<std::string>{"b#1"});
  CHECK(bodies_of({.id = got[3].id}) == std::vector<std::string>{"c#1"});
  CHECK(bodies_of({.max = 2}) == std::vector<std::string>{"a#1", "a#2"});
  CHECK(s.outbox_summary()->dead_lettered == 4);
}

TEMPLATE_TEST_CASE("redrive stages dead letters again at the end of their key's order with the same id", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  const auto first = msg("a", 1);
  commit_staged(s, {first, msg("b", 1)});
  auto got = claim(s, "r1", 1);
  REQUIRE(s.outbox_retry_later("r1", got[0].sequence, t0, t0, "down") == errc::ok);
  got = claim(s, "r1", 1);
  REQUIRE(s.outbox_dead_letter("r1", got[0].sequence, t0, "retries_exhausted", "down") == errc::ok);
  REQUIRE(s.outbox_release("r1", seqs(claim(s, "r1"))) == errc::ok);
  commit_staged(s, {msg("a", 2)});
  const std::uint64_t signalled = s.commits().sequence();
  auto n = s.outbox_redrive({.key = "b"}, t0 + 9s);
  REQUIRE(n.has_value());
  CHECK(*n == 0);  // nothing of key b is dead
  CHECK(s.commits().sequence() == signalled);
  n = s.outbox_redrive({.key = "a"}, t0 + 9s);
  REQUIRE(n.has_value());
  CHECK(*n == 1);
  CHECK(s.commits().sequence() > signalled);  // a waiting relay wakes
  CHECK(s.outbox_dead_letters({})->empty());
  const auto again = claim(s, "r2", 100, t0 + 9s);
  REQUIRE(bodies(again) == std::vector<std::string>{"b#1", "a#2", "a#1"});
  CHECK(again[2].id == first.id);
  CHECK(again[2].attempts == 0);
  CHECK(again[2].staged_at == t0 + 9s);
  CHECK(again[2].sequence > again[1].sequence);
}

TEMPLATE_TEST_CASE("a dead-lettered id cannot be staged again until its dead letter is removed", "[store]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  const auto m = msg("a", 1);
  commit_staged(s, {m, msg("a", 2)});
  const auto got = claim(s, "r1", 1);
  REQUIRE(s.outbox_dead_letter("r1", got[0].sequence, t0, "bad_type", "x") == errc::ok);
  {
    auto tx = s.begin();
    CHECK(s.outbox_stage(tx, m) == errc::conflict);
    CHECK(tx.commit() == errc::conflict);
  }
  auto removed = s.outbox_dead_letter_remove({.reason = "parse_error"});
  REQUIRE(removed.has_value());
  CHECK(*removed == 0);
  removed = s.outbox_dead_letter_remove({.id = m.id});
  REQUIRE(removed.has_value());
  CHECK(*removed == 1);
  CHECK(s.outbox_summary()->dead_lettered == 0);
  commit_staged(s, {m});
  CHECK(s.outbox_summary()->pending == 2);
}

TEMPLATE_TEST_CASE("release_owner drops every lease of that owner and no other", "[store]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  commit_staged(s, {msg("a", 1), msg("b", 1), msg("c", 1)});
  REQUIRE(claim(s, "r1", 2).size() == 2);
  REQUIRE(claim(s, "r2", 1).size() == 1);
  auto n = s.outbox_release_owner("r1");
  REQUIRE(n.has_value());
  CHECK(*n == 2);
  CHECK(s.outbox_summary()->leased == 1);
  CHECK(bodies(claim(s, "r3")) == std::vector<std::string>{"a#1", "b#1"});  // c stays r2's
  CHECK(*s.outbox_release_owner("nobody") == 0);
}

// ---- memory store specifics ----

TEST_CASE("a memory transaction whose version was changed by another commit fails with conflict", "[store]") {
  postbox::memory_store s;
  auto slow = s.begin();
  REQUIRE(*s.version_load(slow, "p", "k") == 0);
  {
    auto fast = s.begin();
    REQUIRE(s.version_save(fast, "p", "k", 1) == errc::ok);
    REQUIRE(fast.commit() == errc::ok);
  }
  REQUIRE(s.version_save(slow, "p", "k", 1) == errc::ok);
  CHECK(slow.commit() == errc::conflict);
  CHECK_FALSE(slow.last_error().empty());
}

TEST_CASE("a memory inbox record waits for another open transaction with the same id, then sees a duplicate",
          "[store]") {
  postbox::memory_store s;
  const message_id id(8, 8);
  auto first = s.begin();
  REQUIRE(s.inbox_record(first, "c", id, t0) == errc::ok);
  std::atomic<int> second_result{-1};
  std::thread second([&] {
    auto tx = s.begin();
    second_result = static_cast<int>(s.inbox_record(tx, "c", id, t0));
  });
  // The second transaction cannot decide while the first is open.
  REQUIRE(first.commit() == errc::ok);
  second.join();
  CHECK(second_result.load() == static_cast<int>(errc::conflict));
}

TEST_CASE("a memory inbox record released by a rollback lets the waiting transaction record the id", "[store]") {
  postbox::memory_store s;
  const message_id id(8, 9);
  auto first = s.begin();
  REQUIRE(s.inbox_record(first, "c", id, t0) == errc::ok);
  std::atomic<int> second_result{-1};
  std::thread second([&] {
    auto tx = s.begin();
    second_result = static_cast<int>(s.inbox_record(tx, "c", id, t0));
    if (second_result.load() == static_cast<int>(errc::ok)) (void)tx.commit();
  });
  first.rollback();
  second.join();
  CHECK(second_result.load() == static_cast<int>(errc::ok));
  CHECK(*s.inbox_contains("c", id));
}

TEST_CASE("the commit signal wakes a waiter on the clock and a stop flag ends the wait", "[store]") {
  postbox::manual_clock clock;
  postbox::commit_signal signal;
  const auto seen = signal.sequence();
  std::atomic<bool> woke{false};
  std::thread waiter([&] {
    signal.wait(clock, seen, time_point::max(), [] { return false; });
    woke = true;
  });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  signal.notify();
  waiter.join();
  CHECK(woke.load());
  CHECK(signal.sequence() == seen + 1);

  std::atomic<bool> stop{false};
  std::thread stopped([&] { signal.wait(clock, signal.sequence(), time_point::max(), [&] { return stop.load(); }); });
  REQUIRE(postbox_test::eventually([&] { return clock.waiters() == 1; }));
  stop = true;
  signal.wake();
  stopped.join();
}
