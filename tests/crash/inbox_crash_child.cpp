// SPDX-License-Identifier: MIT
// Crash test for the inbox: a child handles redelivered messages with a non-idempotent effect while the parent SIGKILLs it; every message id must end with exactly one effect.
//
// Run without arguments (the parent). Each cycle starts this same program as a
// child ("child <db> <messages> <seed>"). The child delivers every message
// twice, in a random order of its own, to an inbox on a SQLite store; the
// handler increments a counter row of that message (`UPDATE effects SET n =
// n + 1`, which is not idempotent) inside the inbox's transaction. Handlers of
// every eleventh message throw on their first run in a process, after their
// write, so failed handlers must be rolled back and retried, not recorded. The
// child prints a line per outcome and a tick inside each handler, so kills
// land inside transactions as well as between them. The parent first covers
// the deterministic points (POSTBOX_CRASH_AT=in_handler|after_commit, while
// most messages are still new), then kills children after a random number of
// lines (400 times, 40 under sanitizers), then runs a last child to the end.
// It checks: integrity_check ok; every message's counter is exactly 1 (one effect per id, whatever the kills and
// redeliveries); the inbox holds every id; failures were seen and retried.
#include <postbox/inbox.hpp>
#include <postbox/sqlite.hpp>

#include "../support.hpp"
#include "harness.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* who = "inbox_crash";
constexpr const char* consumer = "crash-consumer";

struct delivery {
  long long i = 0;
};

postbox::envelope<delivery> message(long long i) {
  auto e = postbox::make_envelope(std::string("crash.delivery"), delivery{i});
  e.id = postbox::message_id(0xC0FFEE, static_cast<std::uint64_t>(i) + 1);  // the same id on every redelivery
  return e;
}

int run_child(const std::string& db, long long messages, std::uint64_t seed) {
  postbox_crash::crash_point crash;
  postbox::sqlite_store_options options;
  options.synchronous = postbox::sqlite_synchronous::normal;
  options.busy_timeout = std::chrono::milliseconds(10000);
  postbox::sqlite_store store(db, options);
  {
    auto tx = store.begin();
    if (tx.exec("CREATE TABLE IF NOT EXISTS effects (i INTEGER PRIMARY KEY, n INTEGER NOT NULL)") !=
        postbox::errc::ok)
      postbox_crash::die(who, "create: " + tx.last_error());
    for (long long i = 0; i < messages; ++i) {
      if (tx.exec("INSERT OR IGNORE INTO effects VALUES (?1, 0)", i) != postbox::errc::ok)
        postbox_crash::die(who, "seed rows: " + tx.last_error());
    }
    if (tx.commit() != postbox::errc::ok) postbox_crash::die(who, "commit seed rows: " + tx.last_error());
  }
  postbox::inbox_options io;
  io.prune_interval = postbox::duration::zero();
  postbox::inbox in(store, consumer, io);
  std::set<long long> failed_once;

  auto deliver = [&](long long i) {
    const auto env = message(i);
    const bool fail = i % 11 == 0 && failed_once.insert(i).second;
    const auto o = in.handle(env, [&](postbox::sqlite_store::transaction& tx) {
      if (tx.exec("UPDATE effects SET n = n + 1 WHERE i = ?1", i) != postbox::errc::ok)
        throw std::runtime_error(tx.last_error());
      postbox_crash::emit("h");
      crash.hit("in_handler");
      if (fail) throw std::runtime_error("planned failure");
    });
    if (o.processed()) {
      crash.hit("after_commit");
      postbox_crash::emit("A " + std::to_string(i));
    } else if (o.duplicate()) {
      postbox_crash::emit("D");
    } else {
      if (o.error != postbox::errc::handler_error) postbox_crash::die(who, "store failure: " + o.message);
      postbox_crash::emit("F");
    }
  };

  std::vector<long long> order;
  for (long long i = 0; i < messages; ++i) order.insert(order.end(), {i, i});
  std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  for (const long long i : order) deliver(i);
  // Redeliver whatever is still not processed (a failed first run).
  for (long long i = 0; i < messages; ++i) {
    auto seen = in.contains(message(i).id);
    if (!seen) postbox_crash::die(who, "contains: " + store.last_error());
    if (!*seen) deliver(i);
  }
  return 0;
}

int run_parent() {
  const auto cycles = static_cast<int>(postbox_test::scaled(400));
  const long long messages = 300;
  const std::uint64_t seed = std::getenv("POSTBOX_SEED") ? std::strtoull(std::getenv("POSTBOX_SEED"), nullptr, 10)
                                                         : std::random_device{}();
  std::mt19937_64 rng(seed);
  const auto dir = std::filesystem::temp_directory_path() / ("postbox_inbox_crash_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string db = (dir / "inbox.db").string();
  const std::string n = std::to_string(messages);

  std::size_t processed = 0, duplicates = 0, failures = 0;
  auto on_line = [&](const std::string& line) {
    if (line.rfind("A ", 0) == 0) ++processed;
    if (line == "D") ++duplicates;
    if (line == "F") ++failures;
  };
  int deterministic = 0;
  for (const char* point : {"in_handler", "after_commit"}) {
    for (int r = 0; r < 4; ++r) {
      // First, while most messages are still new, so the point is reached.
      const std::string at = std::string(point) + ":" + std::to_string(1 + rng() % 5);
      auto ch = postbox_crash::spawn(who, {"child", db, n, std::to_string(rng())}, at);
      const int status = postbox_crash::run_to_end(who, ch, on_line);
      if (!postbox_crash::killed_by_sigkill(status)) postbox_crash::die(who, "never reached " + at);
      ++deterministic;
    }
  }
  int killed = 0;
  for (int c = 0; c < cycles; ++c) {
    auto ch = postbox_crash::spawn(who, {"child", db, n, std::to_string(rng())});
    postbox_crash::read_lines(ch, 1 + rng() % 40, on_line);
    const int status = postbox_crash::kill_and_reap(who, ch, on_line);
    if (postbox_crash::killed_by_sigkill(status)) ++killed;
    else if (!postbox_crash::exited_ok(status)) postbox_crash::die(who, "child failed with status " + std::to_string(status));
  }
  {
    auto last = postbox_crash::spawn(who, {"child", db, n, std::to_string(rng())});
    if (!postbox_crash::exited_ok(postbox_crash::run_to_end(who, last, on_line)))
      postbox_crash::die(who, "the final child did not finish cleanly");
  }

  int bad = 0;
  auto fail = [&](const std::string& what) {
    if (bad < 20) std::fprintf(stderr, "%s: %s\n", who, what.c_str());
    ++bad;
  };
  postbox::sqlite_store store(db);
  auto report = store.integrity_check();
  if (!report || *report != "ok") fail("integrity_check: " + (report ? *report : store.last_error()));
  long long rows = 0;
  {
    auto tx = store.begin();
    sqlite3_stmt* q = nullptr;
    sqlite3_prepare_v2(tx.connection(), "SELECT i, n FROM effects ORDER BY i", -1, &q, nullptr);
    while (sqlite3_step(q) == SQLITE_ROW) {
      ++rows;
      const long long effects = sqlite3_column_int64(q, 1);
      if (effects != 1)
        fail("message " + std::to_string(sqlite3_column_int64(q, 0)) + " took effect " + std::to_string(effects) +
             " times");
    }
    sqlite3_finalize(q);
  }
  if (rows != messages) fail("expected " + std::to_string(messages) + " effect rows, found " + std::to_string(rows));
  auto ids = store.inbox_size(consumer);
  if (!ids || *ids != static_cast<std::size_t>(messages)) fail("the inbox does not hold every id");
  if (failures == 0) fail("no handler failure was exercised");
  if (deterministic == 0) fail("no deterministic crash point was reached");

  std::printf("inbox_crash: seed %llu, %d random kills, %d deterministic (in_handler, after_commit), %lld messages "
              "delivered twice per run: %zu processed, %zu duplicates, %zu handler failures retried, "
              "every id with exactly one effect: %s\n",
              static_cast<unsigned long long>(seed), killed, deterministic, messages, processed, duplicates, failures,
              bad == 0 ? "yes" : "NO");
  std::filesystem::remove_all(dir);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "child")
    return run_child(argv[2], std::atoll(argv[3]), std::strtoull(argv[4], nullptr, 10));
  std::signal(SIGPIPE, SIG_IGN);
  return run_parent();
}
