// SPDX-License-Identifier: MIT
// postbox::sqlite_saga_store: saga state in a SQLite database (links the system sqlite3).
#pragma once

// Kept apart from saga.hpp so that the saga core compiles with the standard
// library alone; include this header (and link postbox::sqlite) to use it.
// It speaks to sqlite3 directly through a few calls of its own.

#include <postbox/error.hpp>
#include <postbox/saga.hpp>

#include <sqlite3.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

namespace detail {
inline errc saga_sqlite_errc(int rc) noexcept {
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return errc::busy;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return errc::corrupt;
    default: return errc::store_error;
  }
}

// One prepared statement; reset on destruction of each use.
class saga_sqlite_stmt {
 public:
  saga_sqlite_stmt() = default;
  saga_sqlite_stmt(const saga_sqlite_stmt&) = delete;
  saga_sqlite_stmt& operator=(const saga_sqlite_stmt&) = delete;
  ~saga_sqlite_stmt() { finalize(); }
  void finalize() noexcept {
    sqlite3_finalize(stmt_);
    stmt_ = nullptr;
  }
  int prepare(sqlite3* db, const char* sql) noexcept { return sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); }
  [[nodiscard]] sqlite3_stmt* get() const noexcept { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

// Resets and clears a statement's bindings when a use ends.
class saga_sqlite_use {
 public:
  explicit saga_sqlite_use(sqlite3_stmt* s) noexcept : s_(s) {}
  saga_sqlite_use(const saga_sqlite_use&) = delete;
  saga_sqlite_use& operator=(const saga_sqlite_use&) = delete;
  ~saga_sqlite_use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }

 private:
  sqlite3_stmt* s_;
};
}  // namespace detail

/// Settings of a sqlite_saga_store.
struct sqlite_saga_store_options {
  /// `PRAGMA synchronous`: "FULL" (default; durable through power loss),
  /// "NORMAL" (WAL: durable through a process crash, not power loss) or "OFF".
  std::string synchronous = "FULL";
  /// How long a statement waits on another connection's lock before `busy`.
  int busy_timeout_ms = 5000;
};

/// Saga state in one table (`postbox_saga`, created if missing) of a SQLite
/// database in WAL mode; each `create`/`save` is one committed statement, so
/// the state survives a crash of the process at any point. Several processes
/// may share the file. The constructor throws `postbox::error` (`store_error`,
/// `busy` or `corrupt`) when the file cannot be opened or the schema created;
/// operations return those codes. Every member blocks on I/O and allocates;
/// thread-safe (one connection behind a mutex).
class sqlite_saga_store {
 public:
  explicit sqlite_saga_store(const std::string& path, sqlite_saga_store_options options = {}) {
    const int rc = sqlite3_open_v2(path.c_str(), &db_,
                                   SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
    if (rc != SQLITE_OK) fail(rc, "open " + path);
    sqlite3_busy_timeout(db_, options.busy_timeout_ms);
    if (options.synchronous != "FULL" && options.synchronous != "NORMAL" && options.synchronous != "OFF") {
      close();
      POSTBOX_THROW(error(errc::invalid_argument, "sqlite_saga_store: synchronous must be FULL, NORMAL or OFF"));
    }
    exec("PRAGMA journal_mode=WAL");
    exec(("PRAGMA synchronous=" + options.synchronous).c_str());
    exec(
        "CREATE TABLE IF NOT EXISTS postbox_saga ("
        " saga_id TEXT PRIMARY KEY, definition TEXT NOT NULL, data BLOB NOT NULL,"
        " correlation_id TEXT NOT NULL, last_event_id TEXT NOT NULL,"
        " phase INTEGER NOT NULL, outcome INTEGER NOT NULL, step_count INTEGER NOT NULL,"
        " current_step INTEGER NOT NULL, completed_steps INTEGER NOT NULL, attempt INTEGER NOT NULL,"
        " step_deadline INTEGER, next_attempt_at INTEGER, failure_reason TEXT NOT NULL,"
        " started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, version INTEGER NOT NULL)");
    exec("CREATE INDEX IF NOT EXISTS postbox_saga_running ON postbox_saga(outcome, started_at)");
    static constexpr const char* columns =
        "saga_id, definition, data, correlation_id, last_event_id, phase, outcome, step_count, current_step,"
        " completed_steps, attempt, step_deadline, next_attempt_at, failure_reason, started_at, updated_at, version";
    static constexpr const char* values = " VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)";
    prepare(insert_, std::string("INSERT INTO postbox_saga (") + columns + ")" + values);
    prepare(upsert_, std::string("INSERT OR REPLACE INTO postbox_saga (") + columns + ")" + values);
    prepare(select_, std::string("SELECT ") + columns + " FROM postbox_saga WHERE saga_id = ?1");
    prepare(unfinished_, std::string("SELECT ") + columns +
                             " FROM postbox_saga WHERE outcome = 0 ORDER BY started_at, saga_id");
  }

  sqlite_saga_store(const sqlite_saga_store&) = delete;
  sqlite_saga_store& operator=(const sqlite_saga_store&) = delete;
  ~sqlite_saga_store() { close(); }

  /// Inserts a new saga; `conflict` if the id exists.
  [[nodiscard]] errc create(const saga_state& st) {
    std::lock_guard lock(mutex_);
    const int rc = write(insert_.get(), st);
    if ((rc & 0xff) == SQLITE_CONSTRAINT) return errc::conflict;
    return rc == SQLITE_DONE ? errc::ok : detail::saga_sqlite_errc(rc);
  }

  /// Inserts or replaces the saga's row (one committed statement).
  [[nodiscard]] errc save(const saga_state& st) {
    std::lock_guard lock(mutex_);
    const int rc = write(upsert_.get(), st);
    return rc == SQLITE_DONE ? errc::ok : detail::saga_sqlite_errc(rc);
  }

  /// The saga's stored state, or `not_found`.
  [[nodiscard]] result<saga_state> load(std::string_view saga_id) const {
    std::lock_guard lock(mutex_);
    sqlite3_stmt* s = select_.get();
    detail::saga_sqlite_use use(s);
    sqlite3_bind_text(s, 1, saga_id.data(), static_cast<int>(saga_id.size()), SQLITE_TRANSIENT);
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) return errc::not_found;
    if (rc != SQLITE_ROW) return detail::saga_sqlite_errc(rc);
    auto st = read(s);
    if (!st) return errc::corrupt;
    return std::move(*st);
  }

  /// Every saga whose outcome is `running`, oldest first.
  [[nodiscard]] result<std::vector<saga_state>> load_unfinished() const {
    std::lock_guard lock(mutex_);
    sqlite3_stmt* s = unfinished_.get();
    detail::saga_sqlite_use use(s);
    std::vector<saga_state> out;
    for (;;) {
      const int rc = sqlite3_step(s);
      if (rc == SQLITE_DONE) return out;
      if (rc != SQLITE_ROW) return detail::saga_sqlite_errc(rc);
      auto st = read(s);
      if (!st) return errc::corrupt;
      out.push_back(std::move(*st));
    }
  }

 private:
  [[noreturn]] void fail(int rc, const std::string& what) {
    std::string msg = "sqlite_saga_store: " + what + ": " + (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc));
    close();
    POSTBOX_THROW(error(detail::saga_sqlite_errc(rc), msg));
  }

  void close() noexcept {
    insert_.finalize();
    upsert_.finalize();
    select_.finalize();
    unfinished_.finalize();
    if (db_) sqlite3_close(db_);
    db_ = nullptr;
  }

  void exec(const char* sql) {
    const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) fail(rc, sql);
  }

  void prepare(detail::saga_sqlite_stmt& stmt, const std::string& sql) {
    const int rc = stmt.prepare(db_, sql.c_str());
    if (rc != SQLITE_OK) fail(rc, "prepare");
  }

  static void bind_text(sqlite3_stmt* s, int i, std::string_view v) {
    sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  static void bind_time(sqlite3_stmt* s, int i, std::optional<time_point> t) {
    if (t) {
      sqlite3_bind_int64(s, i, static_cast<sqlite3_int64>(t->time_since_epoch().count()));
    } else {
      sqlite3_bind_null(s, i);
    }
  }

  static int write(sqlite3_stmt* s, const saga_state& st) {
    detail::saga_sqlite_use use(s);
    bind_text(s, 1, st.saga_id);
    bind_text(s, 2, st.definition);
    sqlite3_bind_blob(s, 3, st.data.data(), static_cast<int>(st.data.size()), SQLITE_TRANSIENT);
    bind_text(s, 4, st.correlation_id.to_string());
    bind_text(s, 5, st.last_event_id.to_string());
    sqlite3_bind_int(s, 6, static_cast<int>(st.phase));
    sqlite3_bind_int(s, 7, static_cast<int>(st.outcome));
    sqlite3_bind_int64(s, 8, st.step_count);
    sqlite3_bind_int64(s, 9, st.current_step);
    sqlite3_bind_int64(s, 10, st.completed_steps);
    sqlite3_bind_int64(s, 11, st.attempt);
    bind_time(s, 12, st.step_deadline);
    bind_time(s, 13, st.next_attempt_at);
    bind_text(s, 14, st.failure_reason);
    bind_time(s, 15, st.started_at);
    bind_time(s, 16, st.updated_at);
    sqlite3_bind_int64(s, 17, static_cast<sqlite3_int64>(st.version));
    return sqlite3_step(s);
  }

  static std::string column_text(sqlite3_stmt* s, int i) {
    const auto* p = sqlite3_column_blob(s, i);
    const int n = sqlite3_column_bytes(s, i);
    return p ? std::string(static_cast<const char*>(p), static_cast<std::size_t>(n)) : std::string();
  }
  static std::optional<time_point> column_time(sqlite3_stmt* s, int i) {
    if (sqlite3_column_type(s, i) == SQLITE_NULL) return std::nullopt;
    return time_point(duration(sqlite3_column_int64(s, i)));
  }
  static std::uint32_t column_u32(sqlite3_stmt* s, int i) {
    return static_cast<std::uint32_t>(sqlite3_column_int64(s, i));
  }

  // Decodes one row; nullopt when a field is out of its domain.
  static std::optional<saga_state> read(sqlite3_stmt* s) {
    saga_state st;
    st.saga_id = column_text(s, 0);
    st.definition = column_text(s, 1);
    st.data = column_text(s, 2);
    const auto corr = message_id::parse(column_text(s, 3));
    const auto last = message_id::parse(column_text(s, 4));
    const auto phase = sqlite3_column_int(s, 5);
    const auto outcome = sqlite3_column_int(s, 6);
    if (!corr || !last || phase < 0 || phase > 1 || outcome < 0 || outcome > 3) return std::nullopt;
    st.correlation_id = *corr;
    st.last_event_id = *last;
    st.phase = static_cast<saga_phase>(phase);
    st.outcome = static_cast<saga_outcome>(outcome);
    st.step_count = column_u32(s, 7);
    st.current_step = column_u32(s, 8);
    st.completed_steps = column_u32(s, 9);
    st.attempt = column_u32(s, 10);
    st.step_deadline = column_time(s, 11);
    st.next_attempt_at = column_time(s, 12);
    st.failure_reason = column_text(s, 13);
    st.started_at = column_time(s, 14).value_or(time_point{});
    st.updated_at = column_time(s, 15).value_or(time_point{});
    st.version = static_cast<std::uint64_t>(sqlite3_column_int64(s, 16));
    return st;
  }

  sqlite3* db_ = nullptr;
  mutable std::mutex mutex_;
  detail::saga_sqlite_stmt insert_, upsert_, select_, unfinished_;
};

static_assert(saga_state_store<sqlite_saga_store>);

POSTBOX_END_NAMESPACE
