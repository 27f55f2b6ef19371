// SPDX-License-Identifier: MIT
// Benchmark: outbox stage+commit against raw SQLite inserts of the same rows, relay throughput, inbox check throughput.
//
// Scenarios (median of 5 interleaved repetitions, each on a fresh database
// file in a temporary directory; SQLite in WAL mode):
//   stage/tx=N     postbox: per transaction, N x (tx.exec INSERT orders + outbox.stage(JSON)), commit
//   raw/tx=N       raw sqlite3: the same rows (orders + an outbox table with postbox's columns and
//                  indexes), prepared statements, json::encode, BEGIN IMMEDIATE ... COMMIT
//                  (ratio stage/raw: what postbox's plumbing costs over hand-written SQL)
//   relay/sqlite/B relay.drain() of pre-staged messages to a no-op destination, batch B
//   relay/memory   the same on memory_store
//   relay/raw/B    raw sqlite3 on the same pre-staged file (written by postbox, closed, reopened raw):
//                  per batch BEGIN IMMEDIATE; SELECT seq, id, type, key, body of the next B pending rows;
//                  UPDATE dispatched_at per row; COMMIT (prepared statements). No leases, one
//                  connection, so no second relay could share it: the floor postbox's leases
//                  (claim tx, mark tx) are measured against (ratio relay/sqlite/B over relay/raw/B).
//                  postbox reads pending rows on its own read-only connection (a WAL reader).
//   relay+producer one thread stages 10000 rows (10 per transaction) while the relay drains them in a
//                  run_once loop (batch 64) on another: the producer's staging rate and the rate at
//                  which everything is dispatched. An empty claim reads only (no write lock), so the
//                  relay's polling does not queue the producer behind it.
//   inbox/sqlite/new, /dup   inbox.handle(env, noop) in its own transaction: new ids, then redeliveries
//   inbox/raw/new  raw sqlite3: BEGIN IMMEDIATE; INSERT (consumer, id); COMMIT per message
//   inbox/memory/new, /dup   the same on memory_store
// synchronous=NORMAL unless named /full (synchronous=FULL: one fsync per commit).
#include <postbox/inbox.hpp>
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/sqlite.hpp>

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using bench_clock = std::chrono::steady_clock;

struct order_placed {
  static constexpr const char* message_type = "order.placed";
  std::string order;
  long long cents = 0;
};
void to_json(nlohmann::json& j, const order_placed& o) { j = {{"order", o.order}, {"cents", o.cents}}; }

double seconds_since(bench_clock::time_point t0) {
  return std::chrono::duration<double>(bench_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct temp_dir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("postbox_outbox_bench_" + postbox::message_id::generate().to_string());
  temp_dir() { std::filesystem::create_directories(path); }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string fresh() { return (path / (postbox::message_id::generate().to_string() + ".db")).string(); }
};

postbox::sqlite_store_options opts(bool full) {
  postbox::sqlite_store_options o;
  o.synchronous = full ? postbox::sqlite_synchronous::full : postbox::sqlite_synchronous::normal;
  return o;
}

postbox::envelope<order_placed> make(long long i) {
  auto e = postbox::make_envelope(order_placed{"o-" + std::to_string(i), i * 10});
  e.partition_key = "customer-" + std::to_string(i % 64);
  return e;
}

// ---- stage + commit ----

double stage_commit(temp_dir& dir, int rows, int per_tx, bool full) {
  postbox::sqlite_store store(dir.fresh(), opts(full));
  {
    auto tx = store.begin();
    (void)tx.exec("CREATE TABLE orders (id TEXT PRIMARY KEY, cents INTEGER NOT NULL)");
    (void)tx.commit();
  }
  postbox::outbox box(store, postbox::json::codec{});
  const auto t0 = bench_clock::now();
  for (int i = 0; i < rows; i += per_tx) {
    auto tx = store.begin();
    for (int k = i; k < i + per_tx; ++k) {
      const auto e = make(k);
      (void)tx.exec("INSERT INTO orders VALUES (?1, ?2)", e.payload.order, e.payload.cents);
      (void)box.stage(tx, e);
    }
    if (tx.commit() != postbox::errc::ok) std::abort();
  }
  return rows / seconds_since(t0);
}

void check(int rc, sqlite3* db) {
  if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
    std::fprintf(stderr, "sqlite: %s\n", sqlite3_errmsg(db));
    std::abort();
  }
}

double raw_commit(temp_dir& dir, int rows, int per_tx, bool full) {
  sqlite3* db = nullptr;
  check(sqlite3_open(dir.fresh().c_str(), &db), db);
  check(sqlite3_exec(db, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr), db);
  check(sqlite3_exec(db, full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr), db);
  // The same table and indexes as postbox_outbox.
  check(sqlite3_exec(db,
                     "CREATE TABLE orders (id TEXT PRIMARY KEY, cents INTEGER NOT NULL);"
                     "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE,"
                     " type TEXT NOT NULL, partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL,"
                     " causation_id TEXT NOT NULL, staged_at INTEGER NOT NULL, body BLOB NOT NULL,"
                     " attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until INTEGER,"
                     " next_attempt_at INTEGER, dispatched_at INTEGER, last_error TEXT);"
                     "CREATE INDEX outbox_pending ON outbox(seq) WHERE dispatched_at IS NULL;"
                     "CREATE INDEX outbox_leased ON outbox(lease_until) WHERE dispatched_at IS NULL AND lease_until IS NOT NULL;"
                     "CREATE INDEX outbox_retry ON outbox(next_attempt_at) WHERE dispatched_at IS NULL AND next_attempt_at IS NOT NULL;"
                     "CREATE INDEX outbox_dispatched ON outbox(dispatched_at) WHERE dispatched_at IS NOT NULL;",
                     nullptr, nullptr, nullptr),
        db);
  sqlite3_stmt *begin = nullptr, *commit = nullptr, *order = nullptr, *out = nullptr;
  check(sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, nullptr), db);
  check(sqlite3_prepare_v2(db, "COMMIT", -1, &commit, nullptr), db);
  check(sqlite3_prepare_v2(db, "INSERT INTO orders VALUES (?1, ?2)", -1, &order, nullptr), db);
  check(sqlite3_prepare_v2(db,
                           "INSERT INTO outbox (message_id, type, partition_key, correlation_id, causation_id,"
                           " staged_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                           -1, &out, nullptr),
        db);
  const auto t0 = bench_clock::now();
  for (int i = 0; i < rows; i += per_tx) {
    check(sqlite3_step(begin), db);
    sqlite3_reset(begin);
    for (int k = i; k < i + per_tx; ++k) {
      const auto e = make(k);
      sqlite3_bind_text(order, 1, e.payload.order.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_int64(order, 2, e.payload.cents);
      check(sqlite3_step(order), db);
      sqlite3_reset(order);
      const std::string id = e.id.to_string();
      const std::string corr = e.correlation_id.to_string();
      const std::string body = postbox::json::encode(e);
      sqlite3_bind_text(out, 1, id.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(out, 2, e.type.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(out, 3, e.partition_key.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(out, 4, corr.c_str(), -1, SQLITE_STATIC);
      sqlite3_bind_text(out, 5, "", -1, SQLITE_STATIC);
      sqlite3_bind_int64(out, 6, e.occurred_at.time_since_epoch().count());
      sqlite3_bind_blob(out, 7, body.data(), static_cast<int>(body.size()), SQLITE_STATIC);
      check(sqlite3_step(out), db);
      sqlite3_reset(out);
    }
    check(sqlite3_step(commit), db);
    sqlite3_reset(commit);
  }
  const double rate = rows / seconds_since(t0);
  for (auto* s : {begin, commit, order, out}) sqlite3_finalize(s);
  sqlite3_close(db);
  return rate;
}

// ---- relay ----

template <class Store>
double relay_drain(Store& store, int rows, std::size_t batch) {
  postbox::outbox box(store, postbox::json::codec{});
  for (int i = 0; i < rows; i += 100) {
    auto tx = store.begin();
    for (int k = i; k < i + 100; ++k) (void)box.stage(tx, make(k));
    if (tx.commit() != postbox::errc::ok) std::abort();
  }
  long long sink = 0;
  postbox::relay_options ro;
  ro.batch_size = batch;
  postbox::outbox_relay relay(
      store,
      [&](const postbox::stored_message& m) {
        sink += static_cast<long long>(m.body.size());
        return postbox::errc::ok;
      },
      ro);
  const auto t0 = bench_clock::now();
  const auto n = relay.drain();
  const double rate = static_cast<double>(n) / seconds_since(t0);
  if (n != static_cast<std::size_t>(rows) || sink == 0) std::abort();
  return rate;
}

// Stages `rows` messages through postbox into a fresh file and closes it (not timed).
std::string staged_file(temp_dir& dir, int rows) {
  const std::string path = dir.fresh();
  postbox::sqlite_store store(path, opts(false));
  postbox::outbox box(store, postbox::json::codec{});
  for (int i = 0; i < rows; i += 100) {
    auto tx = store.begin();
    for (int k = i; k < i + 100; ++k) (void)box.stage(tx, make(k));
    if (tx.commit() != postbox::errc::ok) std::abort();
  }
  return path;
}

double relay_sqlite(temp_dir& dir, int rows, std::size_t batch) {
  const std::string path = staged_file(dir, rows);
  postbox::sqlite_store store(path, opts(false));
  long long sink = 0;
  postbox::relay_options ro;
  ro.batch_size = batch;
  postbox::outbox_relay relay(
      store,
      [&](const postbox::stored_message& m) {
        sink += static_cast<long long>(m.body.size());
        return postbox::errc::ok;
      },
      ro);
  const auto t0 = bench_clock::now();
  const auto n = relay.drain();
  const double rate = static_cast<double>(n) / seconds_since(t0);
  if (n != static_cast<std::size_t>(rows) || sink == 0) std::abort();
  return rate;
}

double relay_raw(temp_dir& dir, int rows, int batch) {
  const std::string path = staged_file(dir, rows);
  sqlite3* db = nullptr;
  check(sqlite3_open(path.c_str(), &db), db);
  check(sqlite3_exec(db, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr), db);
  check(sqlite3_exec(db, "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr), db);
  sqlite3_stmt *begin = nullptr, *commit = nullptr, *select = nullptr, *mark = nullptr;
  check(sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, nullptr), db);
  check(sqlite3_prepare_v2(db, "COMMIT", -1, &commit, nullptr), db);
  check(sqlite3_prepare_v2(db,
                           "SELECT seq, message_id, type, partition_key, body FROM postbox_outbox"
                           " WHERE dispatched_at IS NULL ORDER BY seq LIMIT ?1",
                           -1, &select, nullptr),
        db);
  check(sqlite3_prepare_v2(db, "UPDATE postbox_outbox SET dispatched_at = ?2 WHERE seq = ?1", -1, &mark, nullptr),
        db);
  long long sink = 0;
  int n = 0;
  std::vector<sqlite3_int64> seqs;
  const auto t0 = bench_clock::now();
  for (;;) {
    check(sqlite3_step(begin), db);
    sqlite3_reset(begin);
    seqs.clear();
    sqlite3_bind_int(select, 1, batch);
    while (sqlite3_step(select) == SQLITE_ROW) {
      seqs.push_back(sqlite3_column_int64(select, 0));
      const std::string id(reinterpret_cast<const char*>(sqlite3_column_text(select, 1)));
      const std::string type(reinterpret_cast<const char*>(sqlite3_column_text(select, 2)));
      const std::string key(reinterpret_cast<const char*>(sqlite3_column_text(select, 3)));
      const std::string body(static_cast<const char*>(sqlite3_column_blob(select, 4)),
                             static_cast<std::size_t>(sqlite3_column_bytes(select, 4)));
      sink += static_cast<long long>(body.size() + id.size() + type.size() + key.size());
    }
    sqlite3_reset(select);
    for (const auto seq : seqs) {
      sqlite3_bind_int64(mark, 1, seq);
      sqlite3_bind_int64(mark, 2, 1);
      check(sqlite3_step(mark), db);
      sqlite3_reset(mark);
    }
    check(sqlite3_step(commit), db);
    sqlite3_reset(commit);
    n += static_cast<int>(seqs.size());
    if (seqs.empty()) break;
  }
  const double rate = n / seconds_since(t0);
  for (auto* s : {begin, commit, select, mark}) sqlite3_finalize(s);
  sqlite3_close(db);
  if (n != rows || sink == 0) std::abort();
  return rate;
}

std::pair<double, double> relay_with_producer(temp_dir& dir, int rows, std::size_t batch) {
  postbox::sqlite_store store(dir.fresh(), opts(false));
  postbox::outbox box(store, postbox::json::codec{});
  long long sink = 0;
  postbox::relay_options ro;
  ro.batch_size = batch;
  postbox::outbox_relay relay(
      store,
      [&](const postbox::stored_message& m) {
        sink += static_cast<long long>(m.body.size());
        return postbox::errc::ok;
      },
      ro);
  double producer_seconds = 0;
  const auto t0 = bench_clock::now();
  std::thread producer([&] {
    for (int i = 0; i < rows; i += 10) {
      auto tx = store.begin();
      for (int k = i; k < i + 10; ++k) (void)box.stage(tx, make(k));
      if (tx.commit() != postbox::errc::ok) std::abort();
    }
    producer_seconds = seconds_since(t0);
  });
  std::size_t n = 0;
  while (n < static_cast<std::size_t>(rows)) n += relay.run_once().marked;
  const double total = seconds_since(t0);
  producer.join();
  if (sink == 0) std::abort();
  return {rows / producer_seconds, rows / total};
}

// ---- inbox ----

template <class Store>
std::pair<double, double> inbox_rates(Store& store, int rows) {
  postbox::inbox in(store, "bench");
  std::vector<postbox::envelope<order_placed>> es;
  for (int i = 0; i < rows; ++i) es.push_back(make(i));
  auto t0 = bench_clock::now();
  for (const auto& e : es)
    if (!in.handle(e, [](auto&) {}).processed()) std::abort();
  const double fresh = rows / seconds_since(t0);
  t0 = bench_clock::now();
  for (const auto& e : es)
    if (!in.handle(e, [](auto&) {}).duplicate()) std::abort();
  return {fresh, rows / seconds_since(t0)};
}

double inbox_raw(temp_dir& dir, int rows) {
  sqlite3* db = nullptr;
  check(sqlite3_open(dir.fresh().c_str(), &db), db);
  check(sqlite3_exec(db,
                     "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                     "CREATE TABLE seen (consumer TEXT NOT NULL, message_id TEXT NOT NULL, recorded_at INTEGER NOT NULL,"
                     " PRIMARY KEY (consumer, message_id)); CREATE INDEX seen_age ON seen(consumer, recorded_at);",
                     nullptr, nullptr, nullptr),
        db);
  sqlite3_stmt *begin = nullptr, *commit = nullptr, *ins = nullptr;
  check(sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, nullptr), db);
  check(sqlite3_prepare_v2(db, "COMMIT", -1, &commit, nullptr), db);
  check(sqlite3_prepare_v2(db, "INSERT INTO seen VALUES ('bench', ?1, ?2)", -1, &ins, nullptr), db);
  std::vector<std::string> ids;
  for (int i = 0; i < rows; ++i) ids.push_back(postbox::message_id::generate().to_string());
  const auto t0 = bench_clock::now();
  for (const auto& id : ids) {
    check(sqlite3_step(begin), db);
    sqlite3_reset(begin);
    sqlite3_bind_text(ins, 1, id.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 2, 1);
    check(sqlite3_step(ins), db);
    sqlite3_reset(ins);
    check(sqlite3_step(commit), db);
    sqlite3_reset(commit);
  }
  const double rate = rows / seconds_since(t0);
  for (auto* s : {begin, commit, ins}) sqlite3_finalize(s);
  sqlite3_close(db);
  return rate;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

}  // namespace

int main() {
  temp_dir dir;
  constexpr int reps = 5;
  constexpr int rows = 4000;
  std::printf("outbox_bench: median of %d interleaved runs, fresh WAL database each, %d rows per stage run\n", reps,
              rows);
  std::printf("compiler: %s, SQLite %s, cpu: %s\n\n", __VERSION__, sqlite3_libversion(), cpu_model().c_str());

  struct pair_result {
    const char* name;
    int per_tx;
    bool full;
    int rows;
    std::vector<double> postbox, raw;
  };
  std::vector<pair_result> stage = {{"tx=1", 1, false, rows, {}, {}},
                                    {"tx=10", 10, false, rows, {}, {}},
                                    {"tx=100", 100, false, rows * 5, {}, {}},
                                    {"tx=10/full", 10, true, rows / 4, {}, {}}};
  std::vector<double> concurrent_stage, concurrent_dispatch;
  std::vector<double> relay_sqlite_64, relay_raw_64, relay_sqlite_256, relay_raw_256, relay_sqlite_8, relay_memory, in_sql_new, in_sql_dup, in_raw, in_mem_new,
      in_mem_dup;
  for (int rep = 0; rep < reps; ++rep) {
    for (auto& s : stage) {
      // Alternate which one goes first, so neither always meets a warm cache.
      if (rep % 2 == 0) {
        s.postbox.push_back(stage_commit(dir, s.rows, s.per_tx, s.full));
        s.raw.push_back(raw_commit(dir, s.rows, s.per_tx, s.full));
      } else {
        s.raw.push_back(raw_commit(dir, s.rows, s.per_tx, s.full));
        s.postbox.push_back(stage_commit(dir, s.rows, s.per_tx, s.full));
      }
    }
    if (rep % 2 == 0) {
      relay_sqlite_64.push_back(relay_sqlite(dir, 10000, 64));
      relay_raw_64.push_back(relay_raw(dir, 10000, 64));
      relay_sqlite_256.push_back(relay_sqlite(dir, 10000, 256));
      relay_raw_256.push_back(relay_raw(dir, 10000, 256));
    } else {
      relay_raw_64.push_back(relay_raw(dir, 10000, 64));
      relay_sqlite_64.push_back(relay_sqlite(dir, 10000, 64));
      relay_raw_256.push_back(relay_raw(dir, 10000, 256));
      relay_sqlite_256.push_back(relay_sqlite(dir, 10000, 256));
    }
    relay_sqlite_8.push_back(relay_sqlite(dir, 10000, 8));
    {
      const auto [staged, dispatched] = relay_with_producer(dir, 10000, 64);
      concurrent_stage.push_back(staged);
      concurrent_dispatch.push_back(dispatched);
    }
    {
      postbox::memory_store store;
      relay_memory.push_back(relay_drain(store, 10000, 64));
    }
    {
      postbox::sqlite_store store(dir.fresh(), opts(false));
      const auto [n, d] = inbox_rates(store, rows);
      in_sql_new.push_back(n);
      in_sql_dup.push_back(d);
    }
    in_raw.push_back(inbox_raw(dir, rows));
    {
      postbox::memory_store store;
      const auto [n, d] = inbox_rates(store, rows * 10);
      in_mem_new.push_back(n);
      in_mem_dup.push_back(d);
    }
  }

  std::printf("%-22s %14s %14s %8s\n", "stage+commit", "postbox rows/s", "raw rows/s", "ratio");
  for (const auto& s : stage) {
    const double p = median(s.postbox), r = median(s.raw);
    std::printf("%-22s %14.0f %14.0f %8.2f\n", s.name, p, r, p / r);
  }
  std::printf("\n%-22s %14s\n", "relay (no-op sink)", "messages/s");
  std::printf("%-22s %14.0f\n", "relay/sqlite/64", median(relay_sqlite_64));
  std::printf("%-22s %14.0f   ratio relay/sqlite/64 / raw: %.2f\n", "relay/raw/64", median(relay_raw_64),
              median(relay_sqlite_64) / median(relay_raw_64));
  std::printf("%-22s %14.0f\n", "relay/sqlite/256", median(relay_sqlite_256));
  std::printf("%-22s %14.0f   ratio relay/sqlite/256 / raw: %.2f\n", "relay/raw/256", median(relay_raw_256),
              median(relay_sqlite_256) / median(relay_raw_256));
  std::printf("%-22s %14.0f\n", "relay/sqlite/8", median(relay_sqlite_8));
  std::printf("%-22s %14.0f   (producer staging alongside the relay, tx=10: %.0f rows/s)\n",
              "relay+producer/64", median(concurrent_dispatch), median(concurrent_stage));
  std::printf("%-22s %14.0f\n", "relay/memory/64", median(relay_memory));
  std::printf("ratio relay/sqlite/64 vs stage tx=100: %.2f\n", median(relay_sqlite_64) / median(stage[2].postbox));
  std::printf("\n%-22s %14s %8s\n", "inbox handle", "messages/s", "ratio");
  const double raw = median(in_raw);
  std::printf("%-22s %14.0f %8s\n", "inbox/raw/new", raw, "1.00");
  std::printf("%-22s %14.0f %8.2f\n", "inbox/sqlite/new", median(in_sql_new), median(in_sql_new) / raw);
  std::printf("%-22s %14.0f %8.2f\n", "inbox/sqlite/dup", median(in_sql_dup), median(in_sql_dup) / raw);
  std::printf("%-22s %14.0f %8.2f\n", "inbox/memory/new", median(in_mem_new), median(in_mem_new) / raw);
  std::printf("%-22s %14.0f %8.2f\n", "inbox/memory/dup", median(in_mem_dup), median(in_mem_dup) / raw);
  return 0;
}
