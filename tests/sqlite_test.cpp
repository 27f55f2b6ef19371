// SPDX-License-Identifier: MIT
// Specification tests for postbox::sqlite_store: WAL, synchronous, schema version, typed errors for unwritable, locked, full and corrupt files, injected I/O failures.
#include <postbox/sqlite.hpp>

#if __has_include(<nlohmann/json.hpp>)
#  include <postbox/json.hpp>
#endif
#include <postbox/saga_sqlite.hpp>
#include <postbox/inbox.hpp>
#include <postbox/outbox.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"
#include "support.hpp"

#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::message_id;
using postbox::sqlite_store;
using postbox::sqlite_store_options;
using postbox::stored_message;
using postbox_test::faulty_vfs;

namespace {

constexpr postbox::time_point t0 = postbox::manual_clock::default_start;

sqlite_store_options fast() {
  sqlite_store_options o;
  o.synchronous = postbox::sqlite_synchronous::normal;
  return o;
}

stored_message msg(const std::string& key, int n) {
  stored_message m;
  m.id = message_id::generate();
  m.type = "test";
  m.partition_key = key;
  m.staged_at = t0;
  m.body = key + "#" + std::to_string(n);
  return m;
}

// A plain connection to the same file, as another process would have.
struct raw_db {
  sqlite3* db = nullptr;
  explicit raw_db(const std::string& path) {
    REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
  }
  raw_db(const raw_db&) = delete;
  raw_db& operator=(const raw_db&) = delete;
  ~raw_db() { sqlite3_close(db); }
  int exec(const std::string& sql) { return sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr); }
  std::string text(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &s, nullptr) == SQLITE_OK);
    std::string out;
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0) != nullptr)
      out = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
    sqlite3_finalize(s);
    return out;
  }
};

void write_garbage(const std::string& path, std::size_t offset, std::size_t bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f.good());
  f.seekp(static_cast<std::streamoff>(offset));
  const std::string junk(bytes, '\x5a');
  f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
}

errc open_error(const std::string& path, sqlite_store_options o = fast(), std::string* what = nullptr) {
  try {
    sqlite_store s(path, o);
  } catch (const postbox::error& e) {
    if (what != nullptr) *what = e.what();
    return e.code();
  }
  return errc::ok;
}

}  // namespace

TEST_CASE("a new database is in WAL mode and records postbox's schema version in postbox_meta", "[sqlite]") {
  postbox_test::temp_dir dir;
  { sqlite_store s(dir.file("a.db"), fast()); }
  raw_db raw(dir.file("a.db"));
  CHECK(raw.text("PRAGMA journal_mode") == "wal");
  CHECK(raw.text("SELECT value FROM postbox_meta WHERE key = 'schema_version'") ==
        std::to_string(sqlite_store::schema_version));
  CHECK(raw.text("PRAGMA user_version") == "0");  // left to the application
  for (const char* table : {"postbox_outbox", "postbox_outbox_dead", "postbox_inbox", "postbox_versions", "postbox_saga"}) {
    CHECK(raw.text(std::string("SELECT name FROM sqlite_master WHERE name = '") + table + "'") == table);
  }
}

TEST_CASE("synchronous is FULL by default and follows the option", "[sqlite]") {
  postbox_test::temp_dir dir;
  auto level = [&](sqlite_store_options o) {
    sqlite_store s(dir.file("sync.db"), o);
    auto tx = s.begin();
    return *tx.query_int64("PRAGMA synchronous");
  };
  CHECK(level({}) == 2);
  sqlite_store_options o;
  o.synchronous = postbox::sqlite_synchronous::normal;
  CHECK(level(o) == 1);
  o.synchronous = postbox::sqlite_synchronous::off;
  CHECK(level(o) == 0);
  o.synchronous = postbox::sqlite_synchronous::extra;
  CHECK(level(o) == 3);
}

TEST_CASE("a database written by a newer postbox is refused with unsupported_version", "[sqlite]") {
  postbox_test::temp_dir dir;
  { sqlite_store s(dir.file("new.db"), fast()); }
  {
    raw_db raw(dir.file("new.db"));
    REQUIRE(raw.exec("UPDATE postbox_meta SET value = 99 WHERE key = 'schema_version'") == SQLITE_OK);
  }
  std::string what;
  CHECK(open_error(dir.file("new.db"), fast(), &what) == errc::unsupported_version);
  CHECK(what.find("99") != std::string::npos);
}

TEST_CASE("a version 1 database migrates to version 2 on open and keeps its outbox rows and failures", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("v1.db");
  const auto id = message_id::generate();
  {
    raw_db raw(path);  // the version 1 schema of the outbox, as postbox 0.x wrote it
    REQUIRE(raw.exec("PRAGMA journal_mode=WAL") == SQLITE_OK);
    REQUIRE(raw.exec("CREATE TABLE postbox_meta (key TEXT PRIMARY KEY, value ANY NOT NULL) WITHOUT ROWID;"
                     "CREATE TABLE postbox_outbox ("
                     " seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
                     " partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL,"
                     " staged_at INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
                     " lease_owner TEXT, lease_until INTEGER, next_attempt_at INTEGER, dispatched_at INTEGER,"
                     " last_error TEXT);"
                     "INSERT INTO postbox_meta VALUES ('schema_version', 1);") == SQLITE_OK);
    REQUIRE(raw.exec("INSERT INTO postbox_outbox (message_id, type, partition_key, correlation_id, causation_id,"
                     " staged_at, body, attempts, next_attempt_at, last_error) VALUES ('" +
                     id.to_string() + "', 'test', 'a', '', '', 0, 'a#1', 2, 0, 'down')") == SQLITE_OK);
  }
  {
    sqlite_store s(path, fast());
    auto c = s.outbox_claim("r1", t0, t0 + std::chrono::seconds(30), 10);
    REQUIRE(c.has_value());
    REQUIRE(c->messages.size() == 1);
    CHECK(c->messages[0].id == id);
    CHECK(c->messages[0].attempts == 2);
    REQUIRE(s.outbox_dead_letter("r1", c->messages[0].sequence, t0, "retries_exhausted", "down") == errc::ok);
    auto dead = s.outbox_dead_letters({});
    REQUIRE(dead.has_value());
    REQUIRE(dead->size() == 1);
    CHECK(dead->front().message.attempts == 3);
    CHECK(dead->front().first_failure == t0);  // unknown before the migration: the dead-lettering time
  }
  raw_db raw(path);
  CHECK(raw.text("SELECT value FROM postbox_meta WHERE key = 'schema_version'") ==
        std::to_string(sqlite_store::schema_version));
  CHECK(raw.text("SELECT COUNT(*) FROM pragma_table_info('postbox_outbox') WHERE name = 'first_failure_at'") == "1");
  CHECK(raw.text("SELECT COUNT(*) FROM pragma_table_info('postbox_outbox') WHERE name = 'due_at'") == "1");
  sqlite_store again(path, fast());  // a second open finds the current version and changes nothing
  CHECK(again.outbox_summary()->dead_lettered == 1);
}

TEST_CASE("a version 2 database migrates to version 3 on open: old rows are due at once, new rows can wait",
          "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("v2.db");
  const auto old_id = message_id::generate();
  {
    raw_db raw(path);  // the version 2 outbox tables, as postbox wrote them before scheduled rows
    REQUIRE(raw.exec("PRAGMA journal_mode=WAL") == SQLITE_OK);
    REQUIRE(raw.exec("CREATE TABLE postbox_meta (key TEXT PRIMARY KEY, value ANY NOT NULL) WITHOUT ROWID;"
                     "CREATE TABLE postbox_outbox ("
                     " seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
                     " partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL,"
                     " staged_at INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
                     " lease_owner TEXT, lease_until INTEGER, next_attempt_at INTEGER, dispatched_at INTEGER,"
                     " last_error TEXT, first_failure_at INTEGER);"
                     "CREATE TABLE postbox_outbox_dead ("
                     " seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
                     " partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL,"
                     " staged_at INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL,"
                     " error TEXT NOT NULL, first_failure_at INTEGER NOT NULL, last_failure_at INTEGER NOT NULL);"
                     "INSERT INTO postbox_meta VALUES ('schema_version', 2);") == SQLITE_OK);
    REQUIRE(raw.exec("INSERT INTO postbox_outbox (message_id, type, partition_key, correlation_id, causation_id,"
                     " staged_at, body) VALUES ('" +
                     old_id.to_string() + "', 'test', 'a', '', '', 0, 'a#1')") == SQLITE_OK);
  }
  sqlite_store s(path, fast());
  {
    raw_db raw(path);
    CHECK(raw.text("SELECT value FROM postbox_meta WHERE key = 'schema_version'") == "3");
    CHECK(raw.text("SELECT COUNT(*) FROM pragma_table_info('postbox_outbox') WHERE name = 'due_at'") == "1");
  }
  auto tx = s.begin();
  stored_message later;
  later.id = message_id::generate();
  later.type = "test";
  later.partition_key = "a";
  later.staged_at = t0;
  later.body = "a#2";
  later.due = t0 + std::chrono::seconds(10);
  REQUIRE(s.outbox_stage(tx, later) == errc::ok);
  REQUIRE(tx.commit() == errc::ok);
  auto c = s.outbox_claim("r1", t0, t0 + std::chrono::seconds(30), 10);
  REQUIRE(c.has_value());
  REQUIRE(c->messages.size() == 1);  // the migrated row; the scheduled one waits without holding key "a"
  CHECK(c->messages[0].id == old_id);
  REQUIRE(c->next_due.has_value());
  CHECK(*c->next_due == t0 + std::chrono::seconds(10));
  const std::uint64_t seqs[] = {c->messages[0].sequence};
  REQUIRE(s.outbox_mark_dispatched("r1", seqs, t0).has_value());
  auto d = s.outbox_claim("r1", t0 + std::chrono::seconds(10), t0 + std::chrono::seconds(40), 10);
  REQUIRE(d.has_value());
  REQUIRE(d->messages.size() == 1);
  CHECK(d->messages[0].id == later.id);
  CHECK(d->messages[0].due == later.due);
}

TEST_CASE("a database made by the saga-only store gains the outbox tables and keeps its sagas", "[sqlite]") {
  postbox_test::temp_dir dir;
  {
    raw_db raw(dir.file("old.db"));
    REQUIRE(raw.exec("PRAGMA journal_mode=WAL") == SQLITE_OK);
    REQUIRE(raw.exec("CREATE TABLE postbox_saga (saga_id TEXT PRIMARY KEY, definition TEXT NOT NULL, data BLOB NOT "
                     "NULL, correlation_id TEXT NOT NULL, last_event_id TEXT NOT NULL, phase INTEGER NOT NULL, "
                     "outcome INTEGER NOT NULL, step_count INTEGER NOT NULL, current_step INTEGER NOT NULL, "
                     "completed_steps INTEGER NOT NULL, attempt INTEGER NOT NULL, step_deadline INTEGER, "
                     "next_attempt_at INTEGER, failure_reason TEXT NOT NULL, started_at INTEGER NOT NULL, "
                     "updated_at INTEGER NOT NULL, version INTEGER NOT NULL)") == SQLITE_OK);
    REQUIRE(raw.exec("INSERT INTO postbox_saga VALUES ('s-1', 'order', '', '" + message_id(1, 1).to_string() +
                     "', '" + message_id(1, 2).to_string() + "', 0, 0, 3, 1, 1, 1, NULL, NULL, '', 5, 6, 2)") ==
            SQLITE_OK);
  }
  sqlite_store s(dir.file("old.db"), fast());
  auto saga = s.load("s-1");
  REQUIRE(saga.has_value());
  CHECK(saga->definition == "order");
  auto tx = s.begin();
  CHECK(s.outbox_stage(tx, msg("a", 1)) == errc::ok);
  CHECK(tx.commit() == errc::ok);
}

TEST_CASE("one sqlite_store holds saga state next to outbox and inbox, and sqlite_saga_store reads it", "[sqlite]") {
  postbox_test::temp_dir dir;
  postbox::saga_state st;
  st.saga_id = "s-9";
  st.definition = "order";
  st.correlation_id = message_id(1, 1);
  st.last_event_id = message_id(1, 2);
  st.step_count = 2;
  {
    sqlite_store s(dir.file("one.db"), fast());
    REQUIRE(s.create(st) == errc::ok);
    CHECK(s.create(st) == errc::conflict);
    REQUIRE(s.load_unfinished()->size() == 1);
  }
  postbox::sqlite_saga_store_options o;
  o.synchronous = "NORMAL";
  postbox::sqlite_saga_store sagas(dir.file("one.db"), o);
  CHECK(sagas.load("s-9")->step_count == 2);
  CHECK(*sagas.store().inbox_size("anyone") == 0);
}

TEST_CASE("a path in a missing directory is a store_error naming the path", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("no/such/dir/x.db");
  std::string what;
  CHECK(open_error(path, fast(), &what) == errc::store_error);
  CHECK(what.find(path) != std::string::npos);
  CHECK(what.find("unable to open") != std::string::npos);
}

TEST_CASE("a file that can only be opened read-only is a store_error saying so", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("ro.db");
  { sqlite_store s(path, fast()); }
  auto o = fast();
  o.vfs = faulty_vfs::name;
  faulty_vfs::instance().open_read_only(true);  // as when the file is not writable for this user
  std::string what;
  const errc code = open_error(path, o, &what);
  faulty_vfs::instance().disarm();
  CHECK(code == errc::store_error);
  CHECK(what.find("read-only") != std::string::npos);
  CHECK(what.find(path) != std::string::npos);
}

TEST_CASE("a directory given as the database path is a store_error", "[sqlite]") {
  postbox_test::temp_dir dir;
  std::string what;
  CHECK(open_error(dir.path.string(), fast(), &what) == errc::store_error);
  CHECK_FALSE(what.empty());
}

TEST_CASE("a missing file without create is a store_error", "[sqlite]") {
  postbox_test::temp_dir dir;
  auto o = fast();
  o.create = false;
  CHECK(open_error(dir.file("missing.db"), o) == errc::store_error);
}

TEST_CASE("a file that is not a database is refused as corrupt", "[sqlite]") {
  postbox_test::temp_dir dir;
  {
    std::ofstream f(dir.file("junk.db"), std::ios::binary);
    f << std::string(8192, 'x');
  }
  std::string what;
  CHECK(open_error(dir.file("junk.db"), fast(), &what) == errc::corrupt);
  CHECK(what.find("not a database") != std::string::npos);
}

TEST_CASE("damaged pages inside a database are found and reported as corrupt", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("damaged.db");
  {
    sqlite_store s(path, fast());
    for (int batch = 0; batch < 20; ++batch) {
      auto tx = s.begin();
      for (int i = 0; i < 20; ++i) {
        auto m = msg("k", batch * 20 + i);
        m.body = std::string(300, 'b');
        REQUIRE(s.outbox_stage(tx, m) == errc::ok);
      }
      REQUIRE(tx.commit() == errc::ok);
    }
  }  // the last connection checkpoints the WAL into the file
  const auto size = std::filesystem::file_size(path);
  REQUIRE(size > 16 * 4096);
  write_garbage(path, 4096, static_cast<std::size_t>(size) - 4096);  // every page but the first
  try {
    sqlite_store s(path, fast());
    auto report = s.integrity_check();
    const bool found = !report.has_value() ? report.status() == errc::corrupt : *report != "ok";
    CHECK(found);
    auto pending = s.outbox_pending();
    REQUIRE_FALSE(pending.has_value());
    CHECK(pending.status() == errc::corrupt);
    CHECK(s.last_error().find("malformed") != std::string::npos);
  } catch (const postbox::error& e) {
    CHECK(e.code() == errc::corrupt);  // found already while opening
  }
}

TEST_CASE("integrity_check of a sound database is ok", "[sqlite]") {
  postbox_test::temp_dir dir;
  sqlite_store s(dir.file("ok.db"), fast());
  CHECK(*s.integrity_check() == "ok");
  CHECK(*s.integrity_check(true) == "ok");
}

TEST_CASE("a full database fails the write with full, keeps what was committed and stays usable", "[sqlite]") {
  postbox_test::temp_dir dir;
  auto o = fast();
  o.max_page_count = 40;  // about 160 KiB with 4 KiB pages
  sqlite_store s(dir.file("full.db"), o);
  int committed = 0;
  errc failure = errc::ok;
  std::string text;
  for (int i = 0; i < 1000 && failure == errc::ok; ++i) {
    auto tx = s.begin();
    auto m = msg("k", i);
    m.body = std::string(2000, 'f');
    errc rc = s.outbox_stage(tx, m);
    if (rc == errc::ok) rc = tx.commit();
    if (rc == errc::ok) {
      ++committed;
    } else {
      failure = rc;
      text = tx.last_error();
    }
  }
  CHECK(failure == errc::full);
  CHECK(text.find("full") != std::string::npos);
  REQUIRE(committed > 10);
  auto pending = s.outbox_pending();
  REQUIRE(pending.has_value());
  CHECK(pending->size() == static_cast<std::size_t>(committed));
  // Room comes back when dispatched rows are purged.
  auto claim = s.outbox_claim("r", t0, t0 + 1min, 1000);
  REQUIRE(claim.has_value());
  std::vector<std::uint64_t> seqs;
  for (const auto& m : claim->messages) seqs.push_back(m.sequence);
  REQUIRE(*s.outbox_mark_dispatched("r", seqs, t0) == seqs.size());
  REQUIRE(*s.outbox_purge(t0 + 1s, 10000) == seqs.size());
  auto tx = s.begin();
  CHECK(s.outbox_stage(tx, msg("k", -1)) == errc::ok);
  CHECK(tx.commit() == errc::ok);
}

TEST_CASE("another connection holding the write lock makes begin and relay calls fail with busy", "[sqlite]") {
  postbox_test::temp_dir dir;
  auto o = fast();
  o.busy_timeout = std::chrono::milliseconds(0);  // fail at once instead of waiting
  sqlite_store s(dir.file("locked.db"), o);
  {
    auto staged = s.begin();  // a claimable row: leasing it needs the write lock
    REQUIRE(s.outbox_stage(staged, msg("k", 1)) == errc::ok);
    REQUIRE(staged.commit() == errc::ok);
  }
  raw_db other(dir.file("locked.db"));
  REQUIRE(other.exec("BEGIN IMMEDIATE") == SQLITE_OK);
  auto tx = s.try_begin();
  REQUIRE_FALSE(tx.has_value());
  CHECK(tx.status() == errc::busy);
  CHECK(s.last_error().find("locked") != std::string::npos);
  CHECK_THROWS_AS(s.begin(), postbox::error);
  CHECK(s.outbox_claim("r", t0, t0 + 1s, 10).status() == errc::busy);
  CHECK(s.outbox_summary().has_value());  // reads are not blocked in WAL mode
  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  auto again = s.begin();
  CHECK(again.commit() == errc::ok);
}

TEST_CASE("a claim reads pending rows on its own connection: nothing claimable needs no write lock", "[sqlite]") {
  postbox_test::temp_dir dir;
  auto o = fast();
  o.busy_timeout = std::chrono::milliseconds(0);  // fail at once instead of waiting
  sqlite_store s(dir.file("reader.db"), o);
  raw_db other(dir.file("reader.db"));
  REQUIRE(other.exec("BEGIN IMMEDIATE") == SQLITE_OK);
  auto empty = s.outbox_claim("r", t0, t0 + 1s, 10);  // reads only: the writer's lock does not matter
  REQUIRE(empty.has_value());
  CHECK(empty->messages.empty());
  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("k", 1)) == errc::ok);
    REQUIRE(s.outbox_stage(tx, msg("k", 2)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  // Another relay leases the key: a claim through the read connection gets none of it.
  auto first = s.outbox_claim("r1", t0, t0 + 10s, 10);
  REQUIRE(first.has_value());
  CHECK(first->messages.size() == 2);
  auto second = s.outbox_claim("r2", t0 + 1s, t0 + 11s, 10);
  REQUIRE(second.has_value());
  CHECK(second->messages.empty());
}

TEST_CASE("a store member called while this thread has a transaction open throws instead of deadlocking", "[sqlite]") {
  postbox_test::temp_dir dir;
  sqlite_store s(dir.file("self.db"), fast());
  auto tx = s.begin();
  CHECK_THROWS_AS(s.outbox_summary(), postbox::error);
  CHECK_THROWS_AS(s.begin(), postbox::error);
  tx.rollback();
  CHECK(s.outbox_summary().has_value());
}

TEST_CASE("a relay on another connection does not see a stage until it commits", "[sqlite]") {
  postbox_test::temp_dir dir;
  sqlite_store writer(dir.file("vis.db"), fast());
  sqlite_store reader(dir.file("vis.db"), fast());
  auto tx = writer.begin();
  REQUIRE(writer.outbox_stage(tx, msg("a", 1)) == errc::ok);
  CHECK(reader.outbox_summary()->pending == 0);
  REQUIRE(tx.commit() == errc::ok);
  CHECK(reader.outbox_summary()->pending == 1);
}

TEST_CASE("exec binds arguments, runs scripts, and a constraint violation is conflict without dooming", "[sqlite]") {
  postbox_test::temp_dir dir;
  sqlite_store s(dir.file("exec.db"), fast());
  auto tx = s.begin();
  REQUIRE(tx.exec("CREATE TABLE orders (id TEXT PRIMARY KEY, cents INTEGER, note TEXT);"
                  "CREATE INDEX orders_cents ON orders(cents);") == errc::ok);
  const std::string id = "o-1";
  REQUIRE(tx.exec("INSERT INTO orders VALUES (?1, ?2, ?3)", id, 1250, nullptr) == errc::ok);
  CHECK(tx.exec("INSERT INTO orders VALUES (?1, ?2, ?3)", id, 99, "dup") == errc::conflict);
  CHECK(tx.last_error().find("UNIQUE") != std::string::npos);
  CHECK(tx.failure() == errc::ok);
  CHECK(*tx.query_int64("SELECT cents FROM orders WHERE id = ?1", id) == 1250);
  CHECK(tx.query_int64("SELECT cents FROM orders WHERE id = ?1", "none").status() == errc::not_found);
  CHECK(tx.exec("INSERT INTO orders VALUES (?1, 1, 2); SELECT 1", "x") == errc::invalid_argument);
  CHECK(tx.exec("SELEKT nonsense") == errc::store_error);
  REQUIRE(tx.commit() == errc::ok);
  auto check = s.begin();
  CHECK(*check.query_int64("SELECT COUNT(*) FROM orders") == 1);
}

TEST_CASE("business rows and outbox rows commit together or not at all", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("biz.db");
  {
    sqlite_store s(path, fast());
    auto tx = s.begin();
    REQUIRE(tx.exec("CREATE TABLE orders (id TEXT PRIMARY KEY)") == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
    auto kept = s.begin();
    REQUIRE(kept.exec("INSERT INTO orders VALUES ('kept')") == errc::ok);
    REQUIRE(s.outbox_stage(kept, msg("kept", 1)) == errc::ok);
    REQUIRE(kept.commit() == errc::ok);
    auto dropped = s.begin();
    REQUIRE(dropped.exec("INSERT INTO orders VALUES ('dropped')") == errc::ok);
    REQUIRE(s.outbox_stage(dropped, msg("dropped", 1)) == errc::ok);
    dropped.rollback();
  }
  sqlite_store s(path, fast());
  auto tx = s.begin();
  CHECK(*tx.query_int64("SELECT COUNT(*) FROM orders") == 1);
  tx.rollback();
  auto pending = s.outbox_pending();
  REQUIRE(pending->size() == 1);
  CHECK(pending->front().body == "kept#1");
}

// ---- injected I/O failures (faulty VFS) ----

namespace {

// Runs transactions of (business row, outbox row) with the n-th write or sync
// from the start of each transaction failing, for every n until one commits
// untouched. Checks after each: a failed commit reports a clear error and
// leaves no half; the store keeps working; nothing committed is lost.
void injected_failures(bool syncs) {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("faults.db");
  auto o = fast();
  o.vfs = faulty_vfs::name;
  if (syncs) o.synchronous = postbox::sqlite_synchronous::full;
  auto& vfs = faulty_vfs::instance();
  vfs.disarm();
  std::set<std::string> committed;
  int failed_commits = 0;
  {
    sqlite_store s(path, o);
    {
      auto tx = s.begin();
      REQUIRE(tx.exec("CREATE TABLE orders (id TEXT PRIMARY KEY, padding BLOB)") == errc::ok);
      REQUIRE(tx.commit() == errc::ok);
    }
    // Count the writes (WAL frames) and syncs of one clean transaction, then
    // sweep the failure over every one of those points, and a few beyond, so
    // that some commits fail at each point and the last ones get through.
    const long w0 = vfs.writes();
    const long s0 = vfs.syncs();
    {
      auto tx = s.begin();
      REQUIRE(tx.exec("INSERT INTO orders VALUES ('clean', zeroblob(6000))") == errc::ok);
      REQUIRE(s.outbox_stage(tx, msg("clean", 0)) == errc::ok);
      REQUIRE(tx.commit() == errc::ok);
      committed.insert("clean");
    }
    const int points = static_cast<int>(syncs ? vfs.syncs() - s0 : vfs.writes() - w0);
    REQUIRE(points > 0);
    for (int n = 0; n < points + 3; ++n) {
      const std::string id = "o-" + std::to_string(n);
      if (syncs) {
        vfs.fail_sync_after(n);
      } else {
        vfs.fail_write_after(n);
      }
      const int before = vfs.injected();
      auto tx = s.try_begin();
      errc rc = tx.has_value() ? errc::ok : tx.status();
      std::string text;
      if (rc == errc::ok) {
        rc = tx->exec("INSERT INTO orders VALUES (?1, zeroblob(6000))", id);  // a few pages: several writes
        if (rc == errc::ok) {
          auto m = msg(id, n);
          rc = s.outbox_stage(*tx, m);
        }
        if (rc == errc::ok) rc = tx->commit();
        text = tx->last_error();
      }
      vfs.disarm();
      if (rc == errc::ok) {
        committed.insert(id);
      } else {
        ++failed_commits;
        CHECK(vfs.injected() == before + 1);
        CHECK(rc == errc::store_error);
        INFO(text);
        CHECK(text.find("I/O error") != std::string::npos);
      }
      // The store keeps working after the failure, on the same connection.
      auto probe = s.begin();
      CHECK(probe.exec("SELECT 1") == errc::ok);
      CHECK(probe.commit() == errc::ok);
    }
  }
  CHECK(failed_commits > 0);
  CHECK_FALSE(committed.empty());
  vfs.disarm();
  sqlite_store s(path, fast());
  CHECK(*s.integrity_check() == "ok");
  auto tx = s.begin();
  std::set<std::string> rows;
  sqlite3_stmt* q = nullptr;
  REQUIRE(sqlite3_prepare_v2(tx.connection(), "SELECT id FROM orders", -1, &q, nullptr) == SQLITE_OK);
  while (sqlite3_step(q) == SQLITE_ROW) rows.insert(reinterpret_cast<const char*>(sqlite3_column_text(q, 0)));
  sqlite3_finalize(q);
  tx.rollback();
  CHECK(rows == committed);
  std::set<std::string> staged;
  const auto pending = s.outbox_pending();
  REQUIRE(pending.has_value());
  for (const auto& m : *pending) staged.insert(m.partition_key);
  CHECK(staged == committed);  // no business row without its message, and the reverse
}

}  // namespace

TEST_CASE("a write failing at any point of a transaction loses nothing committed and reports an I/O error",
          "[sqlite][faults]") {
  injected_failures(false);
}

TEST_CASE("a sync failing at commit loses nothing committed and reports an I/O error", "[sqlite][faults]") {
  injected_failures(true);
}

TEST_CASE("a store failure while marking leaves the batch leased and it is published again after the lease",
          "[sqlite][faults]") {
  postbox_test::temp_dir dir;
  auto o = fast();
  o.vfs = faulty_vfs::name;
  auto& vfs = faulty_vfs::instance();
  vfs.disarm();
  sqlite_store s(dir.file("mark.db"), o);
  {
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("a", 1)) == errc::ok);
    REQUIRE(s.outbox_stage(tx, msg("a", 2)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  postbox::manual_clock clock;
  std::vector<std::string> sink;
  postbox::relay_options ro;
  ro.lease = 10s;
  ro.on_point = [&](postbox::relay_point p, const stored_message*) {
    if (p == postbox::relay_point::before_mark) vfs.fail_write_after(0);  // the mark's commit fails
  };
  postbox::outbox_relay relay(
      s,
      [&](const stored_message& m) {
        sink.push_back(m.body);
        return errc::ok;
      },
      ro, clock);
  const auto step = relay.run_once();
  vfs.disarm();
  CHECK(step.status == errc::store_error);
  CHECK(step.published == 2);
  CHECK(step.marked == 0);
  CHECK(relay.stats().store_errors == 1);
  CHECK(relay.stats().last_error.find("mark_dispatched") != std::string::npos);
  CHECK(s.last_error().find("I/O error") != std::string::npos);
  CHECK(s.outbox_summary()->pending == 2);  // nothing lost
  ro.on_point = nullptr;
  ro.owner = "relay-2";
  postbox::outbox_relay second(
      s,
      [&](const stored_message& m) {
        sink.push_back(m.body);
        return errc::ok;
      },
      ro, clock);
  CHECK(second.drain() == 0);  // still leased by the first relay
  clock.advance(10s);
  CHECK(second.drain() == 2);
  CHECK(sink == std::vector<std::string>{"a#1", "a#2", "a#1", "a#2"});  // republished, same messages, in order
}

TEST_CASE("committed rows survive closing and reopening the file", "[sqlite]") {
  postbox_test::temp_dir dir;
  const std::string path = dir.file("durable.db");
  const message_id inbox_id(4, 2);
  {
    sqlite_store s(path);  // synchronous=FULL
    auto tx = s.begin();
    REQUIRE(s.outbox_stage(tx, msg("a", 1)) == errc::ok);
    REQUIRE(s.inbox_record(tx, "c", inbox_id, t0) == errc::ok);
    REQUIRE(s.version_save(tx, "p", "k", 7) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  sqlite_store s(path);
  CHECK(s.outbox_pending()->size() == 1);
  CHECK(*s.inbox_contains("c", inbox_id));
  auto tx = s.begin();
  CHECK(*s.version_load(tx, "p", "k") == 7);
}
