// SPDX-License-Identifier: MIT
// Crash test for the outbox: a child stages business row + outbox row per transaction and relays to an append-only sink while the parent SIGKILLs it; then the parent checks nothing was lost.
//
// Run without arguments (the parent). Each cycle starts this same program as a
// child ("child <db> <sink> <stage_until>"): it opens the SQLite store, starts
// a relay thread that appends one line per published message to the sink
// file (O_APPEND, one write(2) per line, framed as "P <id> <key> <n> E" because
// SIGKILL can cut a write to a regular file short: a torn record is a publish
// the destination never accepted, and each child first ends any torn tail with
// a newline), and stages transactions — an
// `orders` row and an outbox message, committed together — reporting "A <n>"
// to the parent after each commit. Relay points print ticks, so kills land
// anywhere: mid-transaction, between a publish and its mark, inside a claim.
// The parent kills the child after a random number of lines, 1,000 times
// (100 under sanitizers), then covers the deterministic crash points
// (POSTBOX_CRASH_AT=after_publish|before_mark|before_commit:<k>, where the
// child kills itself), then runs a last child that stages nothing and drains
// the outbox. It checks: integrity_check ok; every acknowledged order exists;
// the sink holds exactly the committed orders' message ids (nothing lost,
// nothing invented); per key, first publications follow staging order; the
// duplicates after each crash are at most one relay batch, each a copy of a
// message with the same id. The relay keeps one owner name across restarts
// (one relay process at a time), so a restarted relay takes back its own
// leases at once.
// SQLite runs with synchronous=NORMAL: a killed process loses nothing that
// was committed (only power loss could), which is what this test exercises.
#include <postbox/outbox.hpp>
#include <postbox/sqlite.hpp>

#include "../support.hpp"
#include "harness.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr const char* who = "outbox_crash";
constexpr std::size_t batch = 8;
constexpr int keys = 7;

struct order_placed {
  static constexpr const char* message_type = "crash.order_placed";
  long long n = 0;
};

// The sink line is the stored body: "<message id> <key> <n>".
struct line_codec {
  template <class T>
  std::string encode(const postbox::envelope<T>& e) const {
    return e.id.to_string() + " " + e.partition_key + " " + std::to_string(e.payload.n);
  }
  template <class T>
  postbox::result<postbox::envelope<T>> decode(std::string_view) const {
    return postbox::errc::unknown_type;  // the relay here publishes bodies as they are
  }
};

int run_child(const std::string& db, const std::string& sink, long long stage_until) {
  postbox_crash::crash_point crash;
  postbox::sqlite_store_options options;
  options.synchronous = postbox::sqlite_synchronous::normal;
  options.busy_timeout = std::chrono::milliseconds(10000);
  postbox::sqlite_store store(db, options);
  {
    auto tx = store.begin();
    if (tx.exec("CREATE TABLE IF NOT EXISTS orders (n INTEGER PRIMARY KEY, key TEXT NOT NULL,"
                " message_id TEXT NOT NULL)") != postbox::errc::ok ||
        tx.commit() != postbox::errc::ok) {
      postbox_crash::die(who, "create orders: " + tx.last_error());
    }
  }
  const int sink_fd = ::open(sink.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (sink_fd < 0) postbox_crash::die(who, "open sink");
  if (::write(sink_fd, "\n", 1) != 1) postbox_crash::die(who, "write sink");  // ends a record torn by the last kill

  postbox::relay_options ro;
  ro.batch_size = batch;
  ro.owner = "crash-relay";
  ro.poll_interval = std::chrono::milliseconds(20);
  ro.lease = std::chrono::seconds(60);
  ro.on_point = [&](postbox::relay_point p, const postbox::stored_message*) {
    if (p == postbox::relay_point::published) {
      crash.hit("after_publish");
      postbox_crash::emit("p");
    } else if (p == postbox::relay_point::before_mark) {
      crash.hit("before_mark");
      postbox_crash::emit("m");
    }
  };
  postbox::outbox_relay relay(
      store,
      [sink_fd](const postbox::stored_message& m) {
        const std::string line = "P " + m.body + " E\n";
        return ::write(sink_fd, line.data(), line.size()) == static_cast<ssize_t>(line.size())
                   ? postbox::errc::ok
                   : postbox::errc::store_error;
      },
      ro);
  relay.start();

  long long next = 1;
  {
    auto tx = store.begin();
    auto max = tx.query_int64("SELECT COALESCE(MAX(n), 0) FROM orders");
    if (!max) postbox_crash::die(who, "max: " + tx.last_error());
    next = *max + 1;
  }
  postbox::outbox box(store, line_codec{});
  for (long long n = next; n <= stage_until; ++n) {
    auto env = postbox::make_envelope(order_placed{n});
    env.partition_key = "k" + std::to_string(n % keys);
    const std::string id = env.id.to_string();
    auto tx = store.begin();
    if (tx.exec("INSERT INTO orders VALUES (?1, ?2, ?3)", n, env.partition_key, id) != postbox::errc::ok)
      postbox_crash::die(who, "insert: " + tx.last_error());
    if (box.stage(tx, env) != postbox::errc::ok) postbox_crash::die(who, "stage: " + tx.last_error());
    crash.hit("before_commit");
    if (tx.commit() != postbox::errc::ok) postbox_crash::die(who, "commit: " + tx.last_error());
    postbox_crash::emit("A " + std::to_string(n));
  }
  // Let the relay finish what is staged (the final, unkilled run ends here).
  for (;;) {
    auto s = store.outbox_summary();
    if (!s) postbox_crash::die(who, "summary: " + store.last_error());
    if (s->pending == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  relay.stop();
  ::close(sink_fd);
  return 0;
}

struct sink_line {
  std::string id, key;
  long long n = 0;
  std::size_t segment = 0;  // which child wrote it
};

int run_parent() {
  const auto cycles = static_cast<int>(postbox_test::scaled(1000));
  const std::uint64_t seed = std::getenv("POSTBOX_SEED") ? std::strtoull(std::getenv("POSTBOX_SEED"), nullptr, 10)
                                                         : std::random_device{}();
  std::mt19937_64 rng(seed);
  const auto dir = std::filesystem::temp_directory_path() / ("postbox_outbox_crash_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string db = (dir / "outbox.db").string();
  const std::string sink = (dir / "sink.txt").string();
  const std::string forever = "1000000000";

  std::set<long long> acked;
  auto on_line = [&](const std::string& line) {
    if (line.rfind("A ", 0) == 0) acked.insert(std::stoll(line.substr(2)));
  };
  std::vector<std::uintmax_t> boundaries;  // sink size after each child
  auto sink_size = [&] {
    std::error_code ec;
    const auto s = std::filesystem::file_size(sink, ec);
    return ec ? std::uintmax_t{0} : s;
  };

  int killed = 0;
  for (int c = 0; c < cycles; ++c) {
    auto ch = postbox_crash::spawn(who, {"child", db, sink, forever});
    postbox_crash::read_lines(ch, 1 + rng() % 48, on_line);
    const int status = postbox_crash::kill_and_reap(who, ch, on_line);
    if (postbox_crash::killed_by_sigkill(status)) {
      ++killed;
    } else {
      postbox_crash::die(who, "child ended by itself with status " + std::to_string(status));
    }
    boundaries.push_back(sink_size());
  }
  int deterministic = 0;
  for (const char* point : {"after_publish", "before_mark", "before_commit"}) {
    for (int r = 0; r < 4; ++r) {
      const std::string at = std::string(point) + ":" + std::to_string(1 + rng() % 12);
      auto ch = postbox_crash::spawn(who, {"child", db, sink, forever}, at);
      const int status = postbox_crash::run_to_end(who, ch, on_line);
      if (!postbox_crash::killed_by_sigkill(status)) postbox_crash::die(who, std::string("never reached ") + at);
      ++deterministic;
      boundaries.push_back(sink_size());
    }
  }
  {
    auto last = postbox_crash::spawn(who, {"child", db, sink, "0"});
    const int status = postbox_crash::run_to_end(who, last, on_line);
    if (!postbox_crash::exited_ok(status)) postbox_crash::die(who, "the final child did not finish cleanly");
    boundaries.push_back(sink_size());
  }

  int bad = 0;
  auto fail = [&](const std::string& what) {
    if (bad < 20) std::fprintf(stderr, "%s: %s\n", who, what.c_str());
    ++bad;
  };

  postbox::sqlite_store store(db);
  auto report = store.integrity_check();
  if (!report || *report != "ok") fail("integrity_check: " + (report ? *report : store.last_error()));
  std::map<long long, std::pair<std::string, std::string>> orders;  // n -> (key, message id)
  {
    auto tx = store.begin();
    sqlite3_stmt* q = nullptr;
    sqlite3_prepare_v2(tx.connection(), "SELECT n, key, message_id FROM orders", -1, &q, nullptr);
    while (sqlite3_step(q) == SQLITE_ROW) {
      orders[sqlite3_column_int64(q, 0)] = {reinterpret_cast<const char*>(sqlite3_column_text(q, 1)),
                                            reinterpret_cast<const char*>(sqlite3_column_text(q, 2))};
    }
    sqlite3_finalize(q);
  }
  for (const long long n : acked) {
    if (orders.count(n) == 0) fail("acknowledged order " + std::to_string(n) + " is missing");
  }
  if (auto s = store.outbox_summary(); !s || s->pending != 0) fail("messages left pending after the final run");

  std::vector<sink_line> lines;
  std::size_t torn = 0;
  {
    std::ifstream in(sink);
    std::string text;
    std::uintmax_t offset = 0;
    std::size_t segment = 0;
    while (std::getline(in, text)) {
      offset += text.size() + 1;
      while (segment < boundaries.size() && offset > boundaries[segment]) ++segment;
      if (text.empty()) continue;  // a child's opening newline
      std::istringstream fields(text);
      sink_line l;
      std::string p, e, extra;
      fields >> p >> l.id >> l.key >> l.n >> e;
      if (!fields || p != "P" || e != "E" || (fields >> extra)) {
        ++torn;  // cut short by a kill: never accepted, so it does not count as published
        continue;
      }
      l.segment = segment;
      lines.push_back(l);
    }
  }
  std::map<std::string, const sink_line*> first;  // message id -> first publication
  std::map<std::string, long long> last_n;        // key -> n of its latest first publication
  std::map<std::size_t, std::size_t> duplicates_in;
  std::size_t duplicates = 0;
  for (const auto& l : lines) {
    auto [it, fresh] = first.emplace(l.id, &l);
    if (!fresh) {
      ++duplicates;
      ++duplicates_in[l.segment];
      if (it->second->key != l.key || it->second->n != l.n)
        fail("a duplicate of " + l.id + " differs: " + l.key + " " + std::to_string(l.n) + " vs " + it->second->key +
             " " + std::to_string(it->second->n));
      continue;
    }
    auto o = orders.find(l.n);
    if (o == orders.end() || o->second.second != l.id || o->second.first != l.key) {
      fail("published message " + l.id + " matches no committed order");
    }
    auto& last = last_n[l.key];
    if (l.n <= last) fail("key " + l.key + " published " + std::to_string(l.n) + " after " + std::to_string(last));
    last = l.n;
  }
  for (const auto& [n, o] : orders) {
    if (first.count(o.second) == 0) fail("committed order " + std::to_string(n) + " was never published");
  }
  std::size_t worst = 0;
  for (const auto& [segment, d] : duplicates_in) {
    worst = std::max(worst, d);
    if (d > batch) fail("child " + std::to_string(segment) + " republished " + std::to_string(d) + " messages");
  }

  std::printf(
      "outbox_crash: seed %llu, %d random kills, %d deterministic (after_publish, before_mark, before_commit), "
      "%zu orders committed, %zu acknowledged, %zu published records (%zu torn by a kill), %zu duplicates (at most "
      "%zu after one crash, batch %zu), %d problems\n",
      static_cast<unsigned long long>(seed), killed, deterministic, orders.size(), acked.size(), lines.size(), torn,
      duplicates, worst, batch, bad);
  if (bad == 0 || std::getenv("POSTBOX_KEEP") == nullptr) std::filesystem::remove_all(dir);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "child") return run_child(argv[2], argv[3], std::atoll(argv[4]));
  std::signal(SIGPIPE, SIG_IGN);
  return run_parent();
}
