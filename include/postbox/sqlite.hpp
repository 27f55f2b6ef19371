// SPDX-License-Identifier: MIT
// postbox::sqlite_store: outbox, inbox, versions and saga state in one SQLite database (links the system sqlite3).
// Design notes (schema, transactions, leases, error mapping, durability settings): docs/design/outbox.md
#pragma once

// The only postbox header that includes <sqlite3.h>; link postbox::sqlite.

#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/saga.hpp>
#include <postbox/store.hpp>

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

/// The postbox code of a SQLite result code (primary or extended).
[[nodiscard]] inline errc sqlite_errc(int rc) noexcept {
  switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_ROW:
    case SQLITE_DONE: return errc::ok;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return errc::busy;
    case SQLITE_FULL: return errc::full;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return errc::corrupt;
    case SQLITE_CONSTRAINT: return errc::conflict;
    default: return errc::store_error;
  }
}

/// One prepared statement, finalized on destruction. Move-only.
class sqlite_stmt {
 public:
  sqlite_stmt() = default;
  sqlite_stmt(sqlite_stmt&& o) noexcept : stmt_(std::exchange(o.stmt_, nullptr)) {}
  sqlite_stmt& operator=(sqlite_stmt&& o) noexcept {
    if (this != &o) {
      finalize();
      stmt_ = std::exchange(o.stmt_, nullptr);
    }
    return *this;
  }
  sqlite_stmt(const sqlite_stmt&) = delete;
  sqlite_stmt& operator=(const sqlite_stmt&) = delete;
  ~sqlite_stmt() { finalize(); }

  void finalize() noexcept {
    if (stmt_ != nullptr) sqlite3_finalize(stmt_);
    stmt_ = nullptr;
  }
  /// Prepares `sql` (kept for reuse); the unused tail, if any, in `tail`.
  int prepare(sqlite3* db, std::string_view sql, const char** tail = nullptr) noexcept {
    finalize();
#if SQLITE_VERSION_NUMBER >= 3020000
    return sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT, &stmt_, tail);
#else  // SQLCipher 3.4 (SQLite 3.15): no prepare_v3; PERSISTENT is only an allocation hint
    return sqlite3_prepare_v2(db, sql.data(), static_cast<int>(sql.size()), &stmt_, tail);
#endif
  }
  [[nodiscard]] sqlite3_stmt* get() const noexcept { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

/// Resets a statement and clears its bindings when one use of it ends.
class sqlite_use {
 public:
  explicit sqlite_use(sqlite3_stmt* s) noexcept : s_(s) {}
  sqlite_use(const sqlite_use&) = delete;
  sqlite_use& operator=(const sqlite_use&) = delete;
  ~sqlite_use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }

 private:
  sqlite3_stmt* s_;
};

template <class>
inline constexpr bool sqlite_always_false = false;
template <class T>
struct sqlite_is_optional : std::false_type {};
template <class T>
struct sqlite_is_optional<std::optional<T>> : std::true_type {};

/// Binds text that stays alive until the statement is reset (an empty view
/// binds '' rather than NULL).
inline int sqlite_bind_text(sqlite3_stmt* s, int i, std::string_view v) noexcept {
  return sqlite3_bind_text(s, i, v.empty() ? "" : v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
}

/// Binds one argument of `exec`/`query_int64`: integers (and bool) as
/// INTEGER, floating point as REAL, anything convertible to string_view as
/// TEXT, nullptr and an empty optional as NULL.
template <class V>
int sqlite_bind(sqlite3_stmt* s, int i, const V& v) noexcept {
  if constexpr (std::is_same_v<V, std::nullptr_t>) {
    return sqlite3_bind_null(s, i);
  } else if constexpr (sqlite_is_optional<V>::value) {
    return v ? sqlite_bind(s, i, *v) : sqlite3_bind_null(s, i);
  } else if constexpr (std::is_integral_v<V>) {
    return sqlite3_bind_int64(s, i, static_cast<sqlite3_int64>(v));
  } else if constexpr (std::is_floating_point_v<V>) {
    return sqlite3_bind_double(s, i, static_cast<double>(v));
  } else if constexpr (std::is_convertible_v<const V&, std::string_view>) {
    return sqlite_bind_text(s, i, std::string_view(v));
  } else {
    static_assert(sqlite_always_false<V>, "bind integers, floating point, strings, nullptr or std::optional of those");
    return SQLITE_MISUSE;
  }
}

inline std::int64_t sqlite_time(time_point t) noexcept { return static_cast<std::int64_t>(t.time_since_epoch().count()); }
inline time_point sqlite_time_of(std::int64_t ns) noexcept { return time_point(duration(ns)); }

inline std::string sqlite_column_string(sqlite3_stmt* s, int i) {
  const auto* p = sqlite3_column_blob(s, i);
  const int n = sqlite3_column_bytes(s, i);
  return p != nullptr ? std::string(static_cast<const char*>(p), static_cast<std::size_t>(n)) : std::string();
}

/// One commit_signal per database file in this process, so a relay on one
/// sqlite_store object wakes for commits made through another object on the
/// same file. Private (":memory:", "") databases get their own.
[[nodiscard]] inline std::shared_ptr<commit_signal> sqlite_signal_for(const std::string& path) {
  if (path.empty() || path == ":memory:" || path.rfind("file:", 0) == 0) return std::make_shared<commit_signal>();
  std::error_code ec;
  const auto canonical = std::filesystem::weakly_canonical(std::filesystem::path(path), ec);
  const std::string key = ec ? path : canonical.string();
  static std::mutex mutex;
  static std::map<std::string, std::weak_ptr<commit_signal>> signals;
  std::lock_guard lock(mutex);
  for (auto it = signals.begin(); it != signals.end();) it = it->second.expired() ? signals.erase(it) : std::next(it);
  auto& weak = signals[key];
  auto s = weak.lock();
  if (!s) {
    s = std::make_shared<commit_signal>();
    weak = s;
  }
  return s;
}

}  // namespace detail

/// SQLite's `PRAGMA synchronous` levels, as postbox offers them.
enum class sqlite_synchronous {
  off,     ///< no syncs: a power loss may lose or corrupt recent commits (a process crash loses nothing)
  normal,  ///< WAL: durable through a process crash; a power loss may lose the last commits
  full,    ///< sync at every commit: durable through power loss (the default)
  extra,   ///< as full, and the directory too
};

/// Settings of a sqlite_store. A plain value.
struct sqlite_store_options {
  /// Durability of commits (default `full`; crash tests use `normal`).
  sqlite_synchronous synchronous = sqlite_synchronous::full;
  /// How long an operation waits for another connection's write lock before
  /// it fails with `busy`. Zero: fail at once.
  std::chrono::milliseconds busy_timeout{5000};
  /// Upper bound on the database size in pages (`PRAGMA max_page_count`); a
  /// write beyond it fails with `full`. 0 keeps SQLite's limit.
  std::uint32_t max_page_count = 0;
  /// Name of a registered sqlite3_vfs to open the file with (empty: the
  /// default VFS). Tests use a failing VFS.
  std::string vfs{};
  /// Create the file when it does not exist (else `store_error`).
  bool create = true;
  /// Called on the store's connection right after it opens, before any
  /// other statement: where an encrypted build sets its key (sqlcipher.hpp,
  /// `sqlcipher_key`). A result other than `ok` closes the connection and
  /// the constructor throws postbox::error with that code. Empty: nothing.
  std::function<errc(sqlite3*)> on_open{};
};

/// Outbox, inbox, projection versions and saga state in one SQLite database
/// file in WAL mode, next to the application's own tables. postbox creates
/// its tables (prefix `postbox_`) and records their schema version in
/// `postbox_meta`; a file written by a newer postbox is refused with
/// `unsupported_version`. The constructor throws `postbox::error` with the
/// SQLite message: `store_error` (cannot open or create the file, read-only,
/// I/O), `busy` (locked by another connection beyond the busy timeout),
/// `corrupt` (not a database, or damaged), `full`. Operations return those
/// codes; the text of the latest failure is `last_error()`.
///
/// One write connection per store, serialized by a mutex that a `transaction`
/// holds for its whole life (`BEGIN IMMEDIATE`), plus, from the first
/// `outbox_claim` on a database file, a read-only connection on which a
/// relay's claim reads pending rows (a WAL reader: it waits for no writer
/// and blocks none; only the leases go through the writer). In-process writers queue on
/// the mutex, other processes on SQLite's lock with the busy timeout. Calling
/// a store member from a thread that has a transaction of the same store
/// open would deadlock, so it throws `invalid_argument` instead. Every
/// member is thread-safe, blocks on I/O and allocates.
///
/// **Example**:
///   postbox::sqlite_store db("shop.db");
///   auto tx = db.begin();
///   tx.exec("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, cents INTEGER)");
///   tx.exec("INSERT INTO orders VALUES (?1, ?2)", "o-1", 1250);
///   if (tx.commit() != postbox::errc::ok) std::puts(tx.last_error().c_str());
class sqlite_store {
 public:
  /// The schema version this postbox writes and reads. Version 2 added the
  /// outbox dead letters (`postbox_outbox_dead`) and the outbox's
  /// `first_failure_at` column; a version 1 file is migrated on open.
  ///  Version 3 added `due_at` (scheduled rows,
  /// `stored_message::due`); version 1 and 2 files are migrated on open.
  static constexpr int schema_version = 3;

  /// A write transaction (`BEGIN IMMEDIATE`) on the store's connection,
  /// holding the store's mutex until it ends. Write your own rows with
  /// `exec` or with plain sqlite3 calls on `connection()`; stage outbox
  /// messages and handle inbox messages with it. Move-only; rolls back on
  /// destruction if still active. Not thread-safe (use it on the thread
  /// that began it).
  class transaction {
   public:
    transaction(transaction&& o) noexcept
        : store_(std::exchange(o.store_, nullptr)), lock_(std::move(o.lock_)), staged_(o.staged_),
          depth_(o.depth_), failure_(o.failure_), error_(std::move(o.error_)) {}
    transaction& operator=(transaction&& o) noexcept {
      if (this != &o) {
        rollback();
        store_ = std::exchange(o.store_, nullptr);
        lock_ = std::move(o.lock_);
        staged_ = o.staged_;
        depth_ = o.depth_;
        failure_ = o.failure_;
        error_ = std::move(o.error_);
      }
      return *this;
    }
    transaction(const transaction&) = delete;
    transaction& operator=(const transaction&) = delete;
    /// Rolls back if still active.
    ~transaction() { rollback(); }

    /// Commits and ends the transaction. Returns `ok`, or (after rolling
    /// back) the doom code (`fail`, or a failed postbox operation),
    /// `store_error` when SQLite already rolled it back after an error, or
    /// the commit's own error (`full`, `busy`, `store_error`, `corrupt`);
    /// `last_error()` then has the SQLite message. `invalid_argument` when
    /// not active. Blocks on I/O (fsync with synchronous=full).
    [[nodiscard]] errc commit() {
      if (store_ == nullptr) return errc::invalid_argument;
      return store_->commit(*this);
    }
    /// Rolls back and ends the transaction (idempotent). Never throws.
    void rollback() noexcept {
      if (store_ != nullptr) store_->rollback(*this);
    }
    /// True until commit or rollback.
    [[nodiscard]] bool active() const noexcept { return store_ != nullptr; }
    /// `ok`, or the code that dooms this transaction.
    [[nodiscard]] errc failure() const noexcept { return failure_; }
    /// Text of the latest failure in this transaction (empty when none).
    [[nodiscard]] const std::string& last_error() const noexcept { return error_; }
    /// Dooms the transaction: commit() will roll back and return `code`
    /// (`store_error` for `ok`). The first doom wins.
    void fail(errc code, std::string_view text) {
      if (failure_ != errc::ok) return;
      failure_ = code == errc::ok ? errc::store_error : code;
      error_.assign(text);
      if (store_ != nullptr) store_->count_failure();
    }

    /// The connection, for the caller's own sqlite3 calls inside this
    /// transaction (do not BEGIN/COMMIT on it, do not keep it afterwards).
    [[nodiscard]] sqlite3* connection() const noexcept { return store_ != nullptr ? store_->db_ : nullptr; }

    /// Runs one SQL statement with `args` bound to ?1, ?2, ... (see
    /// `detail::sqlite_bind`); without arguments the text may hold several
    /// statements. Returns `ok` or the mapped error (`conflict` for a
    /// constraint violation), with the SQLite message in `last_error()`; a
    /// failed statement is undone by SQLite and does not doom the
    /// transaction unless SQLite rolled the whole transaction back.
    /// Statements are prepared once and cached. Blocks on I/O.
    template <class... Args>
    [[nodiscard]] errc exec(std::string_view sql, const Args&... args) {
      if (store_ == nullptr) return errc::invalid_argument;
      sqlite3_stmt* s = nullptr;
      if (const errc p = prepare_user(sql, sizeof...(Args) != 0, s); p != errc::ok || s == nullptr) return p;
      detail::sqlite_use use(s);
      bind_all(s, args...);
      int rc = SQLITE_ROW;
      while (rc == SQLITE_ROW) rc = sqlite3_step(s);
      if (rc != SQLITE_DONE) return user_error(rc, sql);
      return errc::ok;
    }

    /// Runs a query whose first row's first column is an integer and
    /// returns it; `not_found` when there is no row. Blocks on I/O.
    template <class... Args>
    [[nodiscard]] result<std::int64_t> query_int64(std::string_view sql, const Args&... args) {
      if (store_ == nullptr) return errc::invalid_argument;
      sqlite3_stmt* s = nullptr;
      if (const errc p = prepare_user(sql, true, s); p != errc::ok || s == nullptr)
        return p == errc::ok ? errc::invalid_argument : p;
      detail::sqlite_use use(s);
      bind_all(s, args...);
      const int rc = sqlite3_step(s);
      if (rc == SQLITE_DONE) return errc::not_found;
      if (rc != SQLITE_ROW) return user_error(rc, sql);
      return static_cast<std::int64_t>(sqlite3_column_int64(s, 0));
    }

    /// Opens a savepoint (they nest). Returns `ok` or the error.
    [[nodiscard]] errc savepoint() {
      if (store_ == nullptr) return errc::invalid_argument;
      const errc r = store_->step_internal(*this, store_->sp_begin_, "savepoint");
      if (r == errc::ok) ++depth_;
      return r;
    }
    /// Closes the innermost savepoint, keeping its writes.
    [[nodiscard]] errc release_savepoint() {
      if (store_ == nullptr || depth_ == 0) return errc::invalid_argument;
      --depth_;
      return store_->step_internal(*this, store_->sp_release_, "release savepoint");
    }
    /// Undoes the writes since the innermost savepoint and closes it.
    [[nodiscard]] errc rollback_to_savepoint() {
      if (store_ == nullptr || depth_ == 0) return errc::invalid_argument;
      --depth_;
      const errc r = store_->step_internal(*this, store_->sp_rollback_, "rollback to savepoint");
      if (r != errc::ok) return r;
      return store_->step_internal(*this, store_->sp_release_, "release savepoint");
    }

   private:
    friend class sqlite_store;
    transaction(sqlite_store* s, std::unique_lock<std::mutex> lock) noexcept : store_(s), lock_(std::move(lock)) {}

    template <class... Args>
    static void bind_all([[maybe_unused]] sqlite3_stmt* s, const Args&... args) {
      [[maybe_unused]] int i = 0;
      ((void)detail::sqlite_bind(s, ++i, args), ...);
    }

    errc prepare_user(std::string_view sql, bool single, sqlite3_stmt*& out) {
      out = store_->cached(sql);
      if (out != nullptr) return errc::ok;
      detail::sqlite_stmt stmt;
      const char* tail = nullptr;
      const int rc = stmt.prepare(store_->db_, sql, &tail);
      if (rc != SQLITE_OK) return user_error(rc, sql);
      const std::size_t used = tail != nullptr ? static_cast<std::size_t>(tail - sql.data()) : sql.size();
      const bool more = sql.substr(used).find_first_not_of(" \t\r\n;") != std::string_view::npos;
      if (more) {
        if (single) {
          error_ = "sqlite_store: exec with arguments takes one statement";
          return errc::invalid_argument;
        }
        // Several statements, no arguments: run them as a script.
        stmt.finalize();
        const std::string script(sql);
        const int r = sqlite3_exec(store_->db_, script.c_str(), nullptr, nullptr, nullptr);
        if (r != SQLITE_OK) return user_error(r, sql);
        return errc::ok;
      }
      out = store_->cache(sql, std::move(stmt));
      return errc::ok;
    }

    errc user_error(int rc, std::string_view sql) {
      const errc code = detail::sqlite_errc(rc);
      std::string text = "sqlite_store: " + std::string(sql.substr(0, 80)) + ": " + sqlite3_errmsg(store_->db_);
      store_->count_failure();
      if (sqlite3_get_autocommit(store_->db_) != 0) {
        fail(code, text);  // SQLite rolled the transaction back
      } else if (failure_ == errc::ok) {
        error_ = std::move(text);
      }
      return code;
    }

    sqlite_store* store_;
    std::unique_lock<std::mutex> lock_;
    bool staged_ = false;  // an outbox row was staged: notify relays at commit
    int depth_ = 0;        // open savepoints
    errc failure_ = errc::ok;
    std::string error_;
  };

  /// Opens (creating if allowed) the database at `path`, switches it to WAL,
  /// applies the options and creates or checks postbox's schema. Throws
  /// `postbox::error` as described for the class; `invalid_argument` for a
  /// bad option. Blocks on I/O.
  explicit sqlite_store(std::string path, sqlite_store_options options = {})
      : path_(std::move(path)), options_(std::move(options)) {
    const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX | (options_.create ? SQLITE_OPEN_CREATE : 0);
    const int rc = sqlite3_open_v2(path_.c_str(), &db_, flags, options_.vfs.empty() ? nullptr : options_.vfs.c_str());
    if (rc != SQLITE_OK) fail_open(rc, "open");
    if (options_.on_open) {
      const errc e = options_.on_open(db_);
      if (e != errc::ok) {
        close();
        POSTBOX_THROW(error(e, "sqlite_store: open " + path_ + ": the on_open callback failed"));
      }
    }
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, static_cast<int>(options_.busy_timeout.count()));
    if (sqlite3_db_readonly(db_, "main") == 1) {
      close();
      POSTBOX_THROW(error(errc::store_error, "sqlite_store: open " + path_ + ": the file is read-only"));
    }
    exec_setup("PRAGMA journal_mode=WAL");
    static constexpr const char* levels[] = {"OFF", "NORMAL", "FULL", "EXTRA"};
    const auto level = static_cast<std::size_t>(options_.synchronous);
    if (level >= 4) {
      close();
      POSTBOX_THROW(error(errc::invalid_argument, "sqlite_store: unknown synchronous level"));
    }
    exec_setup(std::string("PRAGMA synchronous=") + levels[level]);
    if (options_.max_page_count != 0) exec_setup("PRAGMA max_page_count=" + std::to_string(options_.max_page_count));
    ensure_schema();
    prepare_all();
    signal_ = detail::sqlite_signal_for(path_);
  }

  sqlite_store(const sqlite_store&) = delete;
  sqlite_store& operator=(const sqlite_store&) = delete;
  /// Closes the connection. Precondition: no transaction is active.
  ~sqlite_store() { close(); }

  /// Begins a write transaction: waits for the store's mutex (other
  /// transactions of this store), then for SQLite's write lock up to the
  /// busy timeout. Throws `postbox::error` (`busy`, `store_error`, ...)
  /// when it cannot begin, or `invalid_argument` when this thread already
  /// has one open on this store.
  [[nodiscard]] transaction begin() {
    auto t = try_begin();
    if (!t) POSTBOX_THROW(error(t.status(), last_error()));
    return std::move(*t);
  }

  /// As `begin()`, returning the error instead of throwing it (misuse
  /// still throws).
  [[nodiscard]] result<transaction> try_begin() {
    std::unique_lock lock = lock_for("begin");
    const int rc = step_once(begin_.get());
    if (rc != SQLITE_DONE) {
      const errc code = note(rc, "begin");
      if (sqlite3_get_autocommit(db_) == 0) step_once(rollback_.get());
      return code;
    }
    // relaxed: only compared with the reading thread's own id; see owner_.
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    return transaction(this, std::move(lock));
  }

  /// Counters. Thread-safe; never blocks.
  [[nodiscard]] store_stats stats() const noexcept {
    store_stats s;
    // relaxed: statistics.
    s.commits = commits_n_.load(std::memory_order_relaxed);
    s.rollbacks = rollbacks_n_.load(std::memory_order_relaxed);
    s.failures = failures_n_.load(std::memory_order_relaxed);
    return s;
  }

  /// Text of the latest failure of a store member (any thread). Allocates.
  [[nodiscard]] std::string last_error() const {
    std::lock_guard lock(error_mutex_);
    return last_error_;
  }

  /// The database path as given.
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

  /// Runs `PRAGMA integrity_check` (or `quick_check`) and returns its
  /// report: "ok" when the database is sound, else the problems found; an
  /// error when the check cannot run. Reads the whole file.
  [[nodiscard]] result<std::string> integrity_check(bool quick = false) {
    auto lock = lock_for("integrity_check");
    detail::sqlite_stmt s;
    int rc = s.prepare(db_, quick ? "PRAGMA quick_check" : "PRAGMA integrity_check");
    if (rc != SQLITE_OK) return note(rc, "integrity_check");
    std::string report;
    while ((rc = sqlite3_step(s.get())) == SQLITE_ROW) {
      if (!report.empty()) report += '\n';
      report += detail::sqlite_column_string(s.get(), 0);
    }
    if (rc != SQLITE_DONE) return note(rc, "integrity_check");
    return report;
  }

  // ---- outbox ----

  /// Inserts `m` into `postbox_outbox` inside `tx` (the sequence is the new
  /// row's id). `conflict` for an id already in the outbox,
  /// `invalid_argument` for a nil id; any failure dooms `tx`.
  [[nodiscard]] errc outbox_stage(transaction& tx, const stored_message& m) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    if (m.id.is_nil()) {
      tx.fail(errc::invalid_argument, "sqlite_store: outbox message with a nil id");
      return errc::invalid_argument;
    }
    char id[36], corr[36], cause[36];
    m.id.write_to(id);
    {
      sqlite3_stmt* d = dead_exists_.get();
      detail::sqlite_use use_d(d);
      detail::sqlite_bind_text(d, 1, std::string_view(id, 36));
      const int rc = sqlite3_step(d);
      if (rc == SQLITE_ROW) {
        tx.fail(errc::conflict, "sqlite_store: outbox stage " + std::string(id, 36) +
                                    ": message id is in the outbox dead letters");
        note_text(tx.last_error());
        return errc::conflict;
      }
      if (rc != SQLITE_DONE) {
        const errc code = detail::sqlite_errc(rc);
        tx.fail(code, "sqlite_store: outbox stage " + std::string(id, 36) + ": " + sqlite3_errmsg(db_));
        note_text(tx.last_error());
        return code;
      }
    }
    sqlite3_stmt* s = stage_.get();
    detail::sqlite_use use(s);
    m.correlation_id.write_to(corr);
    m.causation_id.write_to(cause);
    detail::sqlite_bind_text(s, 1, std::string_view(id, 36));
    detail::sqlite_bind_text(s, 2, m.type);
    detail::sqlite_bind_text(s, 3, m.partition_key);
    detail::sqlite_bind_text(s, 4, m.correlation_id.is_nil() ? std::string_view() : std::string_view(corr, 36));
    detail::sqlite_bind_text(s, 5, m.causation_id.is_nil() ? std::string_view() : std::string_view(cause, 36));
    sqlite3_bind_int64(s, 6, detail::sqlite_time(m.staged_at));
    sqlite3_bind_blob(s, 7, m.body.empty() ? "" : m.body.data(), static_cast<int>(m.body.size()), SQLITE_STATIC);
    if (m.due == time_point{}) {
      sqlite3_bind_null(s, 8);  // due at once
    } else {
      sqlite3_bind_int64(s, 8, detail::sqlite_time(m.due));
    }
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) {
      const errc code = detail::sqlite_errc(rc);
      tx.fail(code, "sqlite_store: outbox stage " + std::string(id, 36) + ": " +
                        (code == errc::conflict ? std::string("message id already in the outbox") : sqlite3_errmsg(db_)));
      note_text(tx.last_error());
      return code;
    }
    tx.staged_ = true;
    return errc::ok;
  }

  /// Leases up to `max` claimable rows to `owner` until `lease_until` in one
  /// short write transaction (see `outbox_store`).
  ///
  /// For a database file the candidate rows are read on the store's second,
  /// read-only connection (a WAL reader: it neither waits for nor blocks the
  /// writer), outside the store's mutex; only the leases are written, each
  /// row leased only if it is still claimable (a key whose row another relay
  /// took meanwhile is dropped from the batch from that row on). Nothing
  /// claimable: no write transaction at all.
  [[nodiscard]] result<outbox_batch> outbox_claim(std::string_view owner, time_point now, time_point lease_until,
                                                  std::size_t max) {
    auto lock = lock_for("outbox_claim");
    if (has_reader()) {
      lock.unlock();
      return claim_through_reader(std::move(lock), owner, now, lease_until, max);
    }
    postbox::outbox_batch out;
    const errc r = write_tx("outbox claim", [&]() -> int {
      out.messages.clear();
      {
        sqlite3_stmt* s = claim_select_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, detail::sqlite_time(now));
        detail::sqlite_bind_text(s, 2, owner);
        sqlite3_bind_int64(s, 3, static_cast<sqlite3_int64>(max));
        int rc = 0;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) out.messages.push_back(read_message(s));
        if (rc != SQLITE_DONE) return rc;
      }
      for (const auto& m : out.messages) {
        sqlite3_stmt* s = claim_update_.get();
        detail::sqlite_use use(s);
        detail::sqlite_bind_text(s, 1, owner);
        sqlite3_bind_int64(s, 2, detail::sqlite_time(lease_until));
        sqlite3_bind_int64(s, 3, static_cast<sqlite3_int64>(m.sequence));
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
      }
      if (out.messages.size() < max) {
        sqlite3_stmt* s = next_due_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, detail::sqlite_time(now));
        detail::sqlite_bind_text(s, 2, owner);
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_ROW) return rc;
        if (sqlite3_column_type(s, 0) != SQLITE_NULL) out.next_due = detail::sqlite_time_of(sqlite3_column_int64(s, 0));
      }
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    return out;
  }

  /// Extends `owner`'s lease on the rows of `seqs` it still leases to
  /// `lease_until` in one short write transaction; returns how many (see
  /// `outbox_store`). `invalid_argument` when `lease_until` is not after
  /// `now`. Blocks on the database.
  [[nodiscard]] result<std::size_t> outbox_renew(std::string_view owner, std::span<const std::uint64_t> seqs,
                                                 time_point now, time_point lease_until) {
    if (lease_until <= now) return errc::invalid_argument;
    auto lock = lock_for("outbox_renew");
    return update_leased_rows("outbox renew", renew_, owner, seqs, lease_until);
  }

  /// Marks the rows of `seqs` that `owner` still leases as dispatched at
  /// `now`; returns how many.
  [[nodiscard]] result<std::size_t> outbox_mark_dispatched(std::string_view owner, std::span<const std::uint64_t> seqs,
                                                           time_point now) {
    auto lock = lock_for("outbox_mark_dispatched");
    return update_leased_rows("outbox mark dispatched", mark_, owner, seqs, now);
  }

  /// Drops `owner`'s leases on `seqs`.
  [[nodiscard]] errc outbox_release(std::string_view owner, std::span<const std::uint64_t> seqs) {
    auto lock = lock_for("outbox_release");
    return write_tx("outbox release", [&]() -> int {
      for (const std::uint64_t seq : seqs) {
        sqlite3_stmt* s = release_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(seq));
        detail::sqlite_bind_text(s, 2, owner);
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
      }
      return SQLITE_DONE;
    });
  }

  /// Drops every lease `owner` holds; returns how many.
  [[nodiscard]] result<std::size_t> outbox_release_owner(std::string_view owner) {
    auto lock = lock_for("outbox_release_owner");
    std::size_t n = 0;
    const errc r = write_tx("outbox release owner", [&]() -> int {
      sqlite3_stmt* s = release_owner_.get();
      detail::sqlite_use use(s);
      detail::sqlite_bind_text(s, 1, owner);
      const int rc = sqlite3_step(s);
      n = rc == SQLITE_DONE ? static_cast<std::size_t>(sqlite3_changes(db_)) : 0;
      return rc;
    });
    if (r != errc::ok) return r;
    return n;
  }

  /// Drops `owner`'s lease on `seq`, counts a failed attempt (the first one
  /// at `now`) and holds the row's key back until `retry_at`; `not_found`
  /// when `owner` does not lease it.
  [[nodiscard]] errc outbox_retry_later(std::string_view owner, std::uint64_t seq, time_point now, time_point retry_at,
                                        std::string_view error_text) {
    auto lock = lock_for("outbox_retry_later");
    bool found = false;
    const errc r = write_tx("outbox retry later", [&]() -> int {
      sqlite3_stmt* s = retry_.get();
      detail::sqlite_use use(s);
      sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(seq));
      detail::sqlite_bind_text(s, 2, owner);
      sqlite3_bind_int64(s, 3, detail::sqlite_time(retry_at));
      detail::sqlite_bind_text(s, 4, error_text);
      sqlite3_bind_int64(s, 5, detail::sqlite_time(now));
      const int rc = sqlite3_step(s);
      found = rc == SQLITE_DONE && sqlite3_changes(db_) == 1;
      return rc;
    });
    if (r != errc::ok) return r;
    return found ? errc::ok : errc::not_found;
  }

  /// Moves the row `seq` that `owner` leases to `postbox_outbox_dead` in
  /// one write transaction, counting this failure (at `now`) as an attempt;
  /// the rest of its key is claimable at once. `not_found` when `owner` does
  /// not lease it.
  [[nodiscard]] errc outbox_dead_letter(std::string_view owner, std::uint64_t seq, time_point now,
                                        std::string_view reason, std::string_view error_text) {
    auto lock = lock_for("outbox_dead_letter");
    bool found = false;
    const errc r = write_tx("outbox dead letter", [&]() -> int {
      {
        sqlite3_stmt* s = dead_insert_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(seq));
        detail::sqlite_bind_text(s, 2, owner);
        detail::sqlite_bind_text(s, 3, reason);
        detail::sqlite_bind_text(s, 4, error_text);
        sqlite3_bind_int64(s, 5, detail::sqlite_time(now));
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
        found = sqlite3_changes(db_) == 1;
      }
      if (!found) return SQLITE_DONE;
      sqlite3_stmt* s = dead_delete_pending_.get();
      detail::sqlite_use use(s);
      sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(seq));
      return sqlite3_step(s);
    });
    if (r != errc::ok) return r;
    return found ? errc::ok : errc::not_found;
  }

  /// The dead letters matching `filter`, oldest first, at most `filter.max`.
  /// Reads only.
  [[nodiscard]] result<std::vector<outbox_dead_letter_entry>> outbox_dead_letters(const outbox_dead_letter_filter& filter) {
    auto lock = lock_for("outbox_dead_letters");
    std::vector<outbox_dead_letter_entry> out;
    const int rc = select_dead(filter, out);
    if (rc != SQLITE_DONE) return note(rc, "outbox dead letters");
    return out;
  }

  /// Stages the dead letters matching `filter` (oldest first, at most
  /// `filter.max`) again as pending rows with new sequences, at the end of
  /// their keys' order: same id, attempts 0, `staged_at` = `now`; one write
  /// transaction. Notifies the commit signal when any moved. Returns how many.
  [[nodiscard]] result<std::size_t> outbox_redrive(const outbox_dead_letter_filter& filter, time_point now) {
    auto lock = lock_for("outbox_redrive");
    std::size_t n = 0;
    const errc r = write_tx("outbox redrive", [&]() -> int {
      n = 0;
      std::vector<outbox_dead_letter_entry> rows;
      if (const int rc = select_dead(filter, rows); rc != SQLITE_DONE) return rc;
      for (const auto& d : rows) {
        {
          sqlite3_stmt* s = redrive_insert_.get();
          detail::sqlite_use use(s);
          sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(d.message.sequence));
          sqlite3_bind_int64(s, 2, detail::sqlite_time(now));
          if (const int rc = sqlite3_step(s); rc != SQLITE_DONE) return rc;
        }
        sqlite3_stmt* s = dead_delete_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(d.message.sequence));
        if (const int rc = sqlite3_step(s); rc != SQLITE_DONE) return rc;
        ++n;
      }
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    if (n != 0) signal_->notify();
    return n;
  }

  /// Deletes the dead letters matching `filter` (oldest first, at most
  /// `filter.max`); their ids may be staged again. Returns how many.
  [[nodiscard]] result<std::size_t> outbox_dead_letter_remove(const outbox_dead_letter_filter& filter) {
    auto lock = lock_for("outbox_dead_letter_remove");
    std::size_t n = 0;
    const errc r = write_tx("outbox dead letter remove", [&]() -> int {
      n = 0;
      std::vector<outbox_dead_letter_entry> rows;
      if (const int rc = select_dead(filter, rows); rc != SQLITE_DONE) return rc;
      for (const auto& d : rows) {
        sqlite3_stmt* s = dead_delete_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(d.message.sequence));
        if (const int rc = sqlite3_step(s); rc != SQLITE_DONE) return rc;
        ++n;
      }
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    return n;
  }

  /// Deletes up to `max` rows dispatched before `cutoff`; returns how many.
  [[nodiscard]] result<std::size_t> outbox_purge(time_point cutoff, std::size_t max) {
    auto lock = lock_for("outbox_purge");
    std::size_t n = 0;
    const errc r = write_tx("outbox purge", [&]() -> int {
      sqlite3_stmt* s = purge_.get();
      detail::sqlite_use use(s);
      sqlite3_bind_int64(s, 1, detail::sqlite_time(cutoff));
      sqlite3_bind_int64(s, 2, static_cast<sqlite3_int64>(max));
      const int rc = sqlite3_step(s);
      n = rc == SQLITE_DONE ? static_cast<std::size_t>(sqlite3_changes(db_)) : 0;
      return rc;
    });
    if (r != errc::ok) return r;
    return n;
  }

  /// Current row counts. Reads only (never waits for writers).
  [[nodiscard]] result<outbox_counts> outbox_summary() {
    auto lock = lock_for("outbox_summary");
    postbox::outbox_counts c;
    sqlite3_stmt* s = counts_.get();
    detail::sqlite_use use(s);
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) return note(rc, "outbox summary");
    c.pending = static_cast<std::uint64_t>(sqlite3_column_int64(s, 0));
    c.leased = static_cast<std::uint64_t>(sqlite3_column_int64(s, 1));
    c.retrying = static_cast<std::uint64_t>(sqlite3_column_int64(s, 2));
    if (sqlite3_column_type(s, 3) != SQLITE_NULL) c.oldest_pending = detail::sqlite_time_of(sqlite3_column_int64(s, 3));
    c.dispatched = static_cast<std::uint64_t>(sqlite3_column_int64(s, 4));
    c.dead_lettered = static_cast<std::uint64_t>(sqlite3_column_int64(s, 5));
    return c;
  }

  /// Every pending row in staging order (for inspection and tests).
  [[nodiscard]] result<std::vector<stored_message>> outbox_pending() {
    auto lock = lock_for("outbox_pending");
    sqlite3_stmt* s = pending_.get();
    detail::sqlite_use use(s);
    std::vector<stored_message> out;
    int rc = 0;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) out.push_back(read_message(s));
    if (rc != SQLITE_DONE) return note(rc, "outbox pending");
    return out;
  }

  /// Notified after every commit (through any store object on this file in
  /// this process) that staged outbox rows.
  [[nodiscard]] commit_signal& commits() noexcept { return *signal_; }

  // ---- inbox ----

  /// Inserts (consumer, id) into `postbox_inbox` inside `tx`; `conflict`
  /// when it is already there (the transaction stays usable); any other
  /// failure dooms `tx`.
  [[nodiscard]] errc inbox_record(transaction& tx, std::string_view consumer, message_id id, time_point now) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    sqlite3_stmt* s = inbox_insert_.get();
    detail::sqlite_use use(s);
    char text[36];
    id.write_to(text);
    detail::sqlite_bind_text(s, 1, consumer);
    detail::sqlite_bind_text(s, 2, std::string_view(text, 36));
    sqlite3_bind_int64(s, 3, detail::sqlite_time(now));
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) return errc::ok;
    if ((rc & 0xff) == SQLITE_CONSTRAINT) return errc::conflict;
    const errc code = detail::sqlite_errc(rc);
    tx.fail(code, std::string("sqlite_store: inbox record: ") + sqlite3_errmsg(db_));
    note_text(tx.last_error());
    return code;
  }

  /// Whether `id` is recorded (committed) for `consumer`.
  [[nodiscard]] result<bool> inbox_contains(std::string_view consumer, message_id id) {
    auto lock = lock_for("inbox_contains");
    sqlite3_stmt* s = inbox_contains_.get();
    detail::sqlite_use use(s);
    char text[36];
    id.write_to(text);
    detail::sqlite_bind_text(s, 1, consumer);
    detail::sqlite_bind_text(s, 2, std::string_view(text, 36));
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return note(rc, "inbox contains");
  }

  /// Forgets ids of `consumer` recorded before `cutoff`, then all but the
  /// newest `keep` (this walks up to `keep` index entries); returns how many.
  [[nodiscard]] result<std::size_t> inbox_prune(std::string_view consumer, time_point cutoff, std::size_t keep) {
    auto lock = lock_for("inbox_prune");
    std::size_t n = 0;
    const errc r = write_tx("inbox prune", [&]() -> int {
      n = 0;
      {
        sqlite3_stmt* s = inbox_prune_time_.get();
        detail::sqlite_use use(s);
        detail::sqlite_bind_text(s, 1, consumer);
        sqlite3_bind_int64(s, 2, detail::sqlite_time(cutoff));
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
        n += static_cast<std::size_t>(sqlite3_changes(db_));
      }
      sqlite3_stmt* s = inbox_prune_count_.get();
      detail::sqlite_use use(s);
      detail::sqlite_bind_text(s, 1, consumer);
      sqlite3_bind_int64(s, 2, static_cast<sqlite3_int64>(std::min<std::size_t>(keep, INT64_MAX)));
      const int rc = sqlite3_step(s);
      if (rc != SQLITE_DONE) return rc;
      n += static_cast<std::size_t>(sqlite3_changes(db_));
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    return n;
  }

  /// Ids recorded for `consumer`.
  [[nodiscard]] result<std::size_t> inbox_size(std::string_view consumer) {
    auto lock = lock_for("inbox_size");
    sqlite3_stmt* s = inbox_size_.get();
    detail::sqlite_use use(s);
    detail::sqlite_bind_text(s, 1, consumer);
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) return note(rc, "inbox size");
    return static_cast<std::size_t>(sqlite3_column_int64(s, 0));
  }

  // ---- versions ----

  /// The version of (scope, key) inside `tx`, 0 when none.
  [[nodiscard]] result<std::uint64_t> version_load(transaction& tx, std::string_view scope, std::string_view key) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    sqlite3_stmt* s = version_select_.get();
    detail::sqlite_use use(s);
    detail::sqlite_bind_text(s, 1, scope);
    detail::sqlite_bind_text(s, 2, key);
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) return std::uint64_t{0};
    if (rc == SQLITE_ROW) return static_cast<std::uint64_t>(sqlite3_column_int64(s, 0));
    const errc code = detail::sqlite_errc(rc);
    tx.fail(code, std::string("sqlite_store: version load: ") + sqlite3_errmsg(db_));
    return code;
  }

  /// Writes version `v` of (scope, key) inside `tx`; a failure dooms `tx`.
  [[nodiscard]] errc version_save(transaction& tx, std::string_view scope, std::string_view key, std::uint64_t v) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    sqlite3_stmt* s = version_upsert_.get();
    detail::sqlite_use use(s);
    detail::sqlite_bind_text(s, 1, scope);
    detail::sqlite_bind_text(s, 2, key);
    sqlite3_bind_int64(s, 3, static_cast<sqlite3_int64>(v));
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) return errc::ok;
    const errc code = detail::sqlite_errc(rc);
    tx.fail(code, std::string("sqlite_store: version save: ") + sqlite3_errmsg(db_));
    return code;
  }

  // ---- saga state (saga_state_store) ----

  /// Inserts a new saga; `conflict` if the id exists. One committed write.
  [[nodiscard]] errc create(const saga_state& st) {
    auto lock = lock_for("saga create");
    return write_tx("saga create", [&] { return write_saga(saga_insert_.get(), st); });
  }

  /// Inserts or replaces the saga's row. One committed write.
  [[nodiscard]] errc save(const saga_state& st) {
    auto lock = lock_for("saga save");
    return write_tx("saga save", [&] { return write_saga(saga_upsert_.get(), st); });
  }

  /// The saga's stored state, or `not_found`.
  [[nodiscard]] result<saga_state> load(std::string_view saga_id) const {
    auto& self = const_cast<sqlite_store&>(*this);
    auto lock = self.lock_for("saga load");
    sqlite3_stmt* s = saga_select_.get();
    detail::sqlite_use use(s);
    detail::sqlite_bind_text(s, 1, saga_id);
    const int rc = sqlite3_step(s);
    if (rc == SQLITE_DONE) return errc::not_found;
    if (rc != SQLITE_ROW) return self.note(rc, "saga load");
    auto st = read_saga(s);
    if (!st) return errc::corrupt;
    return std::move(*st);
  }

  /// Every saga whose outcome is `running`, oldest first.
  [[nodiscard]] result<std::vector<saga_state>> load_unfinished() const {
    auto& self = const_cast<sqlite_store&>(*this);
    auto lock = self.lock_for("saga load_unfinished");
    sqlite3_stmt* s = saga_unfinished_.get();
    detail::sqlite_use use(s);
    std::vector<saga_state> out;
    for (;;) {
      const int rc = sqlite3_step(s);
      if (rc == SQLITE_DONE) return out;
      if (rc != SQLITE_ROW) return self.note(rc, "saga load_unfinished");
      auto st = read_saga(s);
      if (!st) return errc::corrupt;
      out.push_back(std::move(*st));
    }
  }

 private:
  // Runs `stmt` (parameters: sequence, owner, time) once per row of `seqs`
  // in one write transaction and counts the rows it changed: the rows
  // `owner` still leases. Caller holds the connection lock.
  result<std::size_t> update_leased_rows(const char* what, detail::sqlite_stmt& stmt, std::string_view owner,
                                         std::span<const std::uint64_t> seqs, time_point at) {
    std::size_t n = 0;
    const errc r = write_tx(what, [&]() -> int {
      n = 0;
      for (const std::uint64_t seq : seqs) {
        sqlite3_stmt* s = stmt.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, static_cast<sqlite3_int64>(seq));
        detail::sqlite_bind_text(s, 2, owner);
        sqlite3_bind_int64(s, 3, detail::sqlite_time(at));
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
        n += static_cast<std::size_t>(sqlite3_changes(db_));
      }
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    return n;
  }

  // ---- the relay's read connection ----

  // Opens the read connection at the first claim (a store that never relays
  // never opens it); true when there is one.
  bool has_reader() {
    std::lock_guard read(reader_mutex_);
    if (!reader_tried_) {
      reader_tried_ = true;
      open_reader();
    }
    return reader_ != nullptr;
  }

  // A second connection, read-only, for outbox_claim's read of pending rows:
  // only for a database file (":memory:" and URI names would open another
  // database). Without it (or when it cannot be opened) claims read on the
  // writer connection as before. Under reader_mutex_.
  void open_reader() noexcept {
    if (path_.empty() || path_ == ":memory:" || path_.rfind("file:", 0) == 0) return;
    sqlite3* r = nullptr;
    const int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_FULLMUTEX;
    bool ok = sqlite3_open_v2(path_.c_str(), &r, flags, options_.vfs.empty() ? nullptr : options_.vfs.c_str()) ==
              SQLITE_OK;
    if (ok && options_.on_open) {
      errc e = errc::store_error;
      POSTBOX_TRY { e = options_.on_open(r); }
      POSTBOX_CATCH_ALL { e = errc::store_error; }
      ok = e == errc::ok;
    }
    if (ok) {
      sqlite3_extended_result_codes(r, 1);
      sqlite3_busy_timeout(r, static_cast<int>(options_.busy_timeout.count()));
      ok = reader_claim_select_.prepare(r, claim_select_sql()) == SQLITE_OK &&
           reader_next_due_.prepare(r, next_due_sql) == SQLITE_OK;
    }
    if (!ok) {
      reader_claim_select_.finalize();
      reader_next_due_.finalize();
      if (r != nullptr) sqlite3_close_v2(r);
      return;
    }
    reader_ = r;
  }

  result<outbox_batch> claim_through_reader(std::unique_lock<std::mutex> lock, std::string_view owner, time_point now,
                                            time_point lease_until, std::size_t max) {
    postbox::outbox_batch out;
    {
      std::lock_guard read(reader_mutex_);
      sqlite3_stmt* s = reader_claim_select_.get();
      int rc = 0;
      {
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, detail::sqlite_time(now));
        detail::sqlite_bind_text(s, 2, owner);
        sqlite3_bind_int64(s, 3, static_cast<sqlite3_int64>(max));
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) out.messages.push_back(read_message(s));
      }
      if (rc == SQLITE_DONE && out.messages.size() < max) {
        sqlite3_stmt* d = reader_next_due_.get();
        detail::sqlite_use use(d);
        sqlite3_bind_int64(d, 1, detail::sqlite_time(now));
        detail::sqlite_bind_text(d, 2, owner);
        rc = sqlite3_step(d);
        if (rc == SQLITE_ROW) {
          if (sqlite3_column_type(d, 0) != SQLITE_NULL) out.next_due = detail::sqlite_time_of(sqlite3_column_int64(d, 0));
          rc = SQLITE_DONE;
        }
      }
      if (rc != SQLITE_DONE) {
        count_failure();
        note_text(std::string("sqlite_store: outbox claim (read): ") + sqlite3_errmsg(reader_) + " (" + path_ + ")");
        return detail::sqlite_errc(rc) == errc::ok ? errc::store_error : detail::sqlite_errc(rc);
      }
    }
    if (out.messages.empty()) return out;
    lock.lock();
    std::vector<stored_message> kept;
    const errc r = write_tx("outbox claim", [&]() -> int {
      kept.clear();
      // Keys with a row leased elsewhere or waiting for a retry now, and the
      // first such row: a key whose blocking row comes before its first row
      // in the batch (one that was not due at the read and was taken or
      // failed since) is dropped whole. A later row of the key follows the
      // first one's fate: another relay can take it only by taking the
      // first one too, which the conditional lease below notices.
      std::vector<std::pair<std::string, std::uint64_t>> blocked;
      {
        sqlite3_stmt* s = claim_blocked_.get();
        detail::sqlite_use use(s);
        sqlite3_bind_int64(s, 1, detail::sqlite_time(now));
        detail::sqlite_bind_text(s, 2, owner);
        int rc = 0;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW)
          blocked.emplace_back(detail::sqlite_column_string(s, 0), static_cast<std::uint64_t>(sqlite3_column_int64(s, 1)));
        if (rc != SQLITE_DONE) return rc;
      }
      std::vector<std::string_view> seen_keys, dropped_keys;
      for (const auto& m : out.messages) {
        const std::string_view key(m.partition_key);
        if (std::find(dropped_keys.begin(), dropped_keys.end(), key) != dropped_keys.end()) continue;
        if (std::find(seen_keys.begin(), seen_keys.end(), key) == seen_keys.end()) {
          seen_keys.push_back(key);
          const auto b = std::find_if(blocked.begin(), blocked.end(), [&](const auto& e) { return e.first == key; });
          if (b != blocked.end() && b->second < m.sequence) {
            dropped_keys.push_back(key);
            continue;
          }
        }
        sqlite3_stmt* s = claim_lease_.get();
        detail::sqlite_use use(s);
        detail::sqlite_bind_text(s, 1, owner);
        sqlite3_bind_int64(s, 2, detail::sqlite_time(lease_until));
        sqlite3_bind_int64(s, 3, static_cast<sqlite3_int64>(m.sequence));
        sqlite3_bind_int64(s, 4, detail::sqlite_time(now));
        sqlite3_bind_int64(s, 5, static_cast<sqlite3_int64>(m.attempts));
        const int rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) return rc;
        if (sqlite3_changes(db_) == 1) {
          kept.push_back(m);
        } else {
          dropped_keys.push_back(key);  // taken, failed or dispatched meanwhile: the rest of the key waits
        }
      }
      return SQLITE_DONE;
    });
    if (r != errc::ok) return r;
    if (kept.size() < out.messages.size() && !out.next_due) out.next_due = now;  // some were dropped: look again soon
    out.messages = std::move(kept);
    return out;
  }

  // ---- connection plumbing ----

  std::unique_lock<std::mutex> lock_for(const char* what) {
    // relaxed: a thread only ever finds its own id here if it stored it
    // itself (in try_begin), which is sequenced before this load.
    if (owner_.load(std::memory_order_relaxed) == std::this_thread::get_id())
      POSTBOX_THROW(error(errc::invalid_argument, std::string("sqlite_store: ") + what +
                                                      " called while this thread has a transaction open on the "
                                                      "same store (it would wait for itself)"));
    return std::unique_lock<std::mutex>(mutex_);
  }

  void count_failure() noexcept {
    // relaxed: statistic.
    failures_n_.fetch_add(1, std::memory_order_relaxed);
  }

  void note_text(const std::string& text) {
    std::lock_guard lock(error_mutex_);
    last_error_ = text;
  }

  // Records the failure of `what` with SQLite's message; returns its code.
  errc note(int rc, const char* what) {
    count_failure();
    note_text(std::string("sqlite_store: ") + what + ": " + (db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc)) +
              " (" + path_ + ")");
    return detail::sqlite_errc(rc);
  }

  static int step_once(sqlite3_stmt* s) {
    detail::sqlite_use use(s);
    return sqlite3_step(s);
  }

  errc step_internal(transaction& tx, detail::sqlite_stmt& stmt, const char* what) {
    const int rc = step_once(stmt.get());
    if (rc == SQLITE_DONE) return errc::ok;
    const errc code = detail::sqlite_errc(rc);
    tx.fail(code, std::string("sqlite_store: ") + what + ": " + sqlite3_errmsg(db_));
    return code;
  }

  // Runs `body` (returning SQLITE_DONE or an error code) between BEGIN
  // IMMEDIATE and COMMIT; rolls back on failure. Caller holds mutex_.
  template <class Body>
  errc write_tx(const char* what, Body&& body) {
    int rc = step_once(begin_.get());
    if (rc != SQLITE_DONE) {
      const errc code = note(rc, what);
      if (sqlite3_get_autocommit(db_) == 0) step_once(rollback_.get());
      return code;
    }
    rc = body();
    if (rc == SQLITE_DONE || rc == SQLITE_OK) rc = step_once(commit_.get());
    if (rc != SQLITE_DONE) {
      const errc code = note(rc, what);
      if (sqlite3_get_autocommit(db_) == 0) step_once(rollback_.get());
      // relaxed: statistic.
      rollbacks_n_.fetch_add(1, std::memory_order_relaxed);
      return code;
    }
    return errc::ok;
  }

  errc commit(transaction& tx) {
    errc code = tx.failure_;
    if (code == errc::ok && sqlite3_get_autocommit(db_) != 0) {
      tx.fail(errc::store_error, "sqlite_store: SQLite rolled the transaction back after an earlier error: " +
                                     std::string(tx.error_.empty() ? sqlite3_errmsg(db_) : tx.error_));
      code = tx.failure_;
    }
    if (code == errc::ok) {
      const int rc = step_once(commit_.get());
      if (rc != SQLITE_DONE) {
        code = detail::sqlite_errc(rc);
        tx.fail(code, std::string("sqlite_store: commit: ") + sqlite3_errmsg(db_) + " (" + path_ + ")");
      }
    }
    if (code != errc::ok) {
      note_text(tx.error_);
      rollback(tx);
      return code;
    }
    // relaxed: statistic.
    commits_n_.fetch_add(1, std::memory_order_relaxed);
    const bool staged = tx.staged_;
    end(tx);
    if (staged) signal_->notify();
    return errc::ok;
  }

  void rollback(transaction& tx) noexcept {
    if (sqlite3_get_autocommit(db_) == 0) step_once(rollback_.get());
    // relaxed: statistic.
    rollbacks_n_.fetch_add(1, std::memory_order_relaxed);
    end(tx);
  }

  void end(transaction& tx) noexcept {
    // relaxed: see owner_.
    owner_.store(std::thread::id(), std::memory_order_relaxed);
    tx.store_ = nullptr;
    if (tx.lock_.owns_lock()) tx.lock_.unlock();
  }

  sqlite3_stmt* cached(std::string_view sql) {
    auto it = user_stmts_.find(std::string(sql));
    return it == user_stmts_.end() ? nullptr : it->second.get();
  }
  sqlite3_stmt* cache(std::string_view sql, detail::sqlite_stmt stmt) {
    if (user_stmts_.size() >= 64) user_stmts_.clear();
    auto [it, inserted] = user_stmts_.emplace(std::string(sql), std::move(stmt));
    return it->second.get();
  }

  [[noreturn]] void fail_open(int rc, const std::string& what) {
    std::string msg = "sqlite_store: " + what + " " + path_ + ": " + (db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc));
    const errc code = detail::sqlite_errc(rc);
    close();
    POSTBOX_THROW(error(code == errc::ok ? errc::store_error : code, msg));
  }

  void exec_setup(const std::string& sql) {
    const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) fail_open(rc, sql + " on");
  }

  // The schema version recorded in the file: 0 when postbox_meta is absent.
  int read_schema_version() {
    detail::sqlite_stmt s;
    int rc = s.prepare(db_, "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'postbox_meta'");
    if (rc != SQLITE_OK) fail_open(rc, "read schema of");
    rc = sqlite3_step(s.get());
    if (rc == SQLITE_DONE) return 0;
    if (rc != SQLITE_ROW) fail_open(rc, "read schema of");
    rc = s.prepare(db_, "SELECT value FROM postbox_meta WHERE key = 'schema_version'");
    if (rc != SQLITE_OK) fail_open(rc, "read schema version of");
    rc = sqlite3_step(s.get());
    if (rc == SQLITE_DONE) return 0;
    if (rc != SQLITE_ROW) fail_open(rc, "read schema version of");
    return sqlite3_column_int(s.get(), 0);
  }

  void check_version(int v) {
    if (v > schema_version) {
      close();
      POSTBOX_THROW(error(errc::unsupported_version, "sqlite_store: " + path_ + " has postbox schema version " +
                                                         std::to_string(v) + ", newer than this postbox knows (" +
                                                         std::to_string(schema_version) + ")"));
    }
  }

  void ensure_schema() {
    const int found = read_schema_version();
    check_version(found);
    if (found == schema_version) return;
    // Create (or upgrade) under the write lock; another process may be doing
    // the same, so check again inside.
    exec_setup("BEGIN IMMEDIATE");
    const int inside = read_schema_version();
    if (inside > schema_version) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    check_version(inside);
    if (inside == schema_version) {  // another connection created or migrated it meanwhile
      exec_setup("COMMIT");
      return;
    }
    static constexpr const char* ddl =
        "CREATE TABLE IF NOT EXISTS postbox_meta (key TEXT PRIMARY KEY, value ANY NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE IF NOT EXISTS postbox_outbox ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
        " partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL,"
        " staged_at INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " lease_owner TEXT, lease_until INTEGER, next_attempt_at INTEGER, dispatched_at INTEGER, last_error TEXT,"
        " first_failure_at INTEGER, due_at INTEGER);"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_pending ON postbox_outbox(seq) WHERE dispatched_at IS NULL;"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_leased ON postbox_outbox(lease_until)"
        " WHERE dispatched_at IS NULL AND lease_until IS NOT NULL;"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_retry ON postbox_outbox(next_attempt_at)"
        " WHERE dispatched_at IS NULL AND next_attempt_at IS NOT NULL;"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_dispatched ON postbox_outbox(dispatched_at)"
        " WHERE dispatched_at IS NOT NULL;"
        "CREATE TABLE IF NOT EXISTS postbox_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
        " recorded_at INTEGER NOT NULL, PRIMARY KEY (consumer, message_id));"
        "CREATE INDEX IF NOT EXISTS postbox_inbox_age ON postbox_inbox(consumer, recorded_at);"
        "CREATE TABLE IF NOT EXISTS postbox_versions (scope TEXT NOT NULL, key TEXT NOT NULL,"
        " version INTEGER NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID;"
        "CREATE TABLE IF NOT EXISTS postbox_saga ("
        " saga_id TEXT PRIMARY KEY, definition TEXT NOT NULL, data BLOB NOT NULL,"
        " correlation_id TEXT NOT NULL, last_event_id TEXT NOT NULL,"
        " phase INTEGER NOT NULL, outcome INTEGER NOT NULL, step_count INTEGER NOT NULL,"
        " current_step INTEGER NOT NULL, completed_steps INTEGER NOT NULL, attempt INTEGER NOT NULL,"
        " step_deadline INTEGER, next_attempt_at INTEGER, failure_reason TEXT NOT NULL,"
        " started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, version INTEGER NOT NULL);"
        "CREATE INDEX IF NOT EXISTS postbox_saga_running ON postbox_saga(outcome, started_at);";
    // Version 2: the outbox dead letters (seq is the row's last outbox
    // sequence, unique because AUTOINCREMENT never reuses one).
    static constexpr const char* dead_ddl =
        "CREATE TABLE IF NOT EXISTS postbox_outbox_dead ("
        " seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
        " partition_key TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL,"
        " staged_at INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL,"
        " error TEXT NOT NULL, first_failure_at INTEGER NOT NULL, last_failure_at INTEGER NOT NULL);"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_dead_key ON postbox_outbox_dead(partition_key, seq);"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_dead_reason ON postbox_outbox_dead(reason, seq);"
        "CREATE INDEX IF NOT EXISTS postbox_outbox_due ON postbox_outbox(due_at)"
        " WHERE dispatched_at IS NULL AND due_at IS NOT NULL;"
        "INSERT OR REPLACE INTO postbox_meta (key, value) VALUES ('schema_version', 3);";
    // A version 1 file has postbox_outbox without first_failure_at; versions
    // 1 and 2 have it without due_at (NULL: due at once, as every old row is).
    // The ALTERs run before dead_ddl, which indexes due_at.
    const std::string script = std::string(ddl) +
                               (inside == 1 ? "ALTER TABLE postbox_outbox ADD COLUMN first_failure_at INTEGER;" : "") +
                               (inside == 1 || inside == 2 ? "ALTER TABLE postbox_outbox ADD COLUMN due_at INTEGER;" : "") +
                               dead_ddl;
    const int rc = sqlite3_exec(db_, script.c_str(), nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) {
      std::string msg = sqlite3_errmsg(db_);
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      const errc code = detail::sqlite_errc(rc);
      close();
      POSTBOX_THROW(error(code == errc::ok ? errc::store_error : code,
                          "sqlite_store: create schema in " + path_ + ": " + msg));
    }
    exec_setup("COMMIT");
  }

  void prepare(detail::sqlite_stmt& stmt, std::string_view sql) {
    const int rc = stmt.prepare(db_, sql);
    if (rc != SQLITE_OK) fail_open(rc, "prepare statements for");
  }

  static std::string claim_select_sql() {
    return std::string("SELECT ") + message_columns +
           " FROM postbox_outbox WHERE dispatched_at IS NULL AND partition_key NOT IN ("
           " SELECT partition_key FROM postbox_outbox WHERE dispatched_at IS NULL"
           " AND lease_until > ?1 AND lease_owner <> ?2"
           " UNION SELECT partition_key FROM postbox_outbox WHERE dispatched_at IS NULL"
           " AND next_attempt_at > ?1)"
           " AND (due_at IS NULL OR due_at <= ?1)"  // not yet due: skipped, key not held
           " ORDER BY seq LIMIT ?3";
  }
  static constexpr const char* next_due_sql =
      "SELECT MIN(t) FROM ("
      " SELECT MIN(lease_until) AS t FROM postbox_outbox WHERE dispatched_at IS NULL"
      " AND lease_until > ?1 AND lease_owner <> ?2"
      " UNION ALL SELECT MIN(next_attempt_at) FROM postbox_outbox WHERE dispatched_at IS NULL"
      " AND next_attempt_at > ?1"
      " UNION ALL SELECT MIN(due_at) FROM postbox_outbox WHERE dispatched_at IS NULL AND due_at > ?1)";
  // Leases row ?3 to ?1 until ?2 if it is still claimable at ?4 and has not
  // failed since it was read (attempts = ?5).
  static constexpr const char* claim_lease_sql =
      "UPDATE postbox_outbox SET lease_owner = ?1, lease_until = ?2"
      " WHERE seq = ?3 AND dispatched_at IS NULL AND attempts = ?5"
      " AND (lease_owner IS NULL OR lease_owner = ?1 OR lease_until IS NULL OR lease_until <= ?4)"
      " AND (next_attempt_at IS NULL OR next_attempt_at <= ?4)";

  static constexpr const char* message_columns =
      "seq, message_id, type, partition_key, correlation_id, causation_id, staged_at, body, attempts, due_at";
  static constexpr const char* saga_columns =
      "saga_id, definition, data, correlation_id, last_event_id, phase, outcome, step_count, current_step,"
      " completed_steps, attempt, step_deadline, next_attempt_at, failure_reason, started_at, updated_at, version";

  void prepare_all() {
    prepare(begin_, "BEGIN IMMEDIATE");
    prepare(commit_, "COMMIT");
    prepare(rollback_, "ROLLBACK");
    prepare(sp_begin_, "SAVEPOINT postbox_sp");
    prepare(sp_release_, "RELEASE postbox_sp");
    prepare(sp_rollback_, "ROLLBACK TO postbox_sp");
    prepare(stage_,
            "INSERT INTO postbox_outbox (message_id, type, partition_key, correlation_id, causation_id, staged_at, body,"
            " due_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
    prepare(claim_select_, claim_select_sql());
    prepare(claim_update_, "UPDATE postbox_outbox SET lease_owner = ?1, lease_until = ?2 WHERE seq = ?3");
    prepare(claim_lease_, std::string(claim_lease_sql));
    prepare(claim_blocked_,
            "SELECT partition_key, MIN(seq) FROM ("
            " SELECT partition_key, seq FROM postbox_outbox WHERE dispatched_at IS NULL"
            " AND lease_until > ?1 AND lease_owner <> ?2"
            " UNION ALL SELECT partition_key, seq FROM postbox_outbox WHERE dispatched_at IS NULL"
            " AND next_attempt_at > ?1) GROUP BY partition_key");
    prepare(next_due_, next_due_sql);
    prepare(mark_,
            "UPDATE postbox_outbox SET dispatched_at = ?3, lease_owner = NULL, lease_until = NULL"
            " WHERE seq = ?1 AND lease_owner = ?2 AND dispatched_at IS NULL");
    prepare(renew_,
            "UPDATE postbox_outbox SET lease_until = ?3"
            " WHERE seq = ?1 AND lease_owner = ?2 AND dispatched_at IS NULL");
    prepare(release_,
            "UPDATE postbox_outbox SET lease_owner = NULL, lease_until = NULL"
            " WHERE seq = ?1 AND lease_owner = ?2 AND dispatched_at IS NULL");
    prepare(retry_,
            "UPDATE postbox_outbox SET lease_owner = NULL, lease_until = NULL, attempts = attempts + 1,"
            " next_attempt_at = ?3, last_error = ?4, first_failure_at = COALESCE(first_failure_at, ?5)"
            " WHERE seq = ?1 AND lease_owner = ?2 AND dispatched_at IS NULL");
    prepare(release_owner_,
            "UPDATE postbox_outbox SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_owner = ?1 AND dispatched_at IS NULL");
    prepare(dead_exists_, "SELECT 1 FROM postbox_outbox_dead WHERE message_id = ?1");
    prepare(dead_insert_,
            "INSERT INTO postbox_outbox_dead (seq, message_id, type, partition_key, correlation_id, causation_id,"
            " staged_at, body, attempts, reason, error, first_failure_at, last_failure_at)"
            " SELECT seq, message_id, type, partition_key, correlation_id, causation_id, staged_at, body,"
            " attempts + 1, ?3, ?4, COALESCE(first_failure_at, ?5), ?5 FROM postbox_outbox"
            " WHERE seq = ?1 AND lease_owner = ?2 AND dispatched_at IS NULL");
    prepare(dead_delete_pending_, "DELETE FROM postbox_outbox WHERE seq = ?1");
    prepare(dead_select_,
            "SELECT seq, message_id, type, partition_key, correlation_id, causation_id, staged_at, body, attempts,"
            " reason, error, first_failure_at, last_failure_at FROM postbox_outbox_dead"
            " WHERE (?1 IS NULL OR partition_key = ?1) AND (?2 IS NULL OR reason = ?2)"
            " AND (?3 IS NULL OR type = ?3) AND (?4 IS NULL OR message_id = ?4) ORDER BY seq LIMIT ?5");
    prepare(redrive_insert_,
            "INSERT INTO postbox_outbox (message_id, type, partition_key, correlation_id, causation_id, staged_at, body)"
            " SELECT message_id, type, partition_key, correlation_id, causation_id, ?2, body"
            " FROM postbox_outbox_dead WHERE seq = ?1");
    prepare(dead_delete_, "DELETE FROM postbox_outbox_dead WHERE seq = ?1");
    prepare(purge_,
            "DELETE FROM postbox_outbox WHERE seq IN (SELECT seq FROM postbox_outbox"
            " WHERE dispatched_at IS NOT NULL AND dispatched_at < ?1 LIMIT ?2)");
    prepare(counts_,
            "SELECT COUNT(*), COUNT(lease_owner), COALESCE(SUM(attempts > 0), 0), MIN(staged_at),"
            " (SELECT COUNT(*) FROM postbox_outbox WHERE dispatched_at IS NOT NULL),"
            " (SELECT COUNT(*) FROM postbox_outbox_dead)"
            " FROM postbox_outbox WHERE dispatched_at IS NULL");
    prepare(pending_, std::string("SELECT ") + message_columns +
                          " FROM postbox_outbox WHERE dispatched_at IS NULL ORDER BY seq");
    prepare(inbox_insert_, "INSERT INTO postbox_inbox (consumer, message_id, recorded_at) VALUES (?1, ?2, ?3)");
    prepare(inbox_contains_, "SELECT 1 FROM postbox_inbox WHERE consumer = ?1 AND message_id = ?2");
    prepare(inbox_prune_time_, "DELETE FROM postbox_inbox WHERE consumer = ?1 AND recorded_at < ?2");
    prepare(inbox_prune_count_,
            "DELETE FROM postbox_inbox WHERE rowid IN (SELECT rowid FROM postbox_inbox WHERE consumer = ?1"
            " ORDER BY recorded_at DESC, rowid DESC LIMIT -1 OFFSET ?2)");
    prepare(inbox_size_, "SELECT COUNT(*) FROM postbox_inbox WHERE consumer = ?1");
    prepare(version_select_, "SELECT version FROM postbox_versions WHERE scope = ?1 AND key = ?2");
    prepare(version_upsert_,
#if SQLITE_VERSION_NUMBER >= 3024000
            "INSERT INTO postbox_versions (scope, key, version) VALUES (?1, ?2, ?3)"
            " ON CONFLICT (scope, key) DO UPDATE SET version = excluded.version");
#else  // no upsert before SQLite 3.24 (SQLCipher 3.4); the same row results (three columns, key = PK)
            "INSERT OR REPLACE INTO postbox_versions (scope, key, version) VALUES (?1, ?2, ?3)");
#endif
    static constexpr const char* values = " VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)";
    prepare(saga_insert_, std::string("INSERT INTO postbox_saga (") + saga_columns + ")" + values);
    prepare(saga_upsert_, std::string("INSERT OR REPLACE INTO postbox_saga (") + saga_columns + ")" + values);
    prepare(saga_select_, std::string("SELECT ") + saga_columns + " FROM postbox_saga WHERE saga_id = ?1");
    prepare(saga_unfinished_, std::string("SELECT ") + saga_columns +
                                  " FROM postbox_saga WHERE outcome = 0 ORDER BY started_at, saga_id");
  }

  void close() noexcept {
    user_stmts_.clear();
    for (auto* s : {&begin_, &commit_, &rollback_, &sp_begin_, &sp_release_, &sp_rollback_, &stage_, &claim_select_,
                    &claim_update_, &next_due_, &renew_, &mark_, &release_, &retry_, &purge_, &counts_, &pending_,
                    &release_owner_, &dead_exists_, &dead_insert_, &dead_delete_pending_, &dead_select_,
                    &redrive_insert_, &dead_delete_,
                    &inbox_insert_, &inbox_contains_, &inbox_prune_time_, &inbox_prune_count_, &inbox_size_,
                    &version_select_, &version_upsert_, &saga_insert_, &saga_upsert_, &saga_select_,
                    &saga_unfinished_, &claim_lease_, &claim_blocked_, &reader_claim_select_,
                    &reader_next_due_}) {
      s->finalize();
    }
    if (reader_ != nullptr) sqlite3_close_v2(reader_);
    reader_ = nullptr;
    if (db_ != nullptr) sqlite3_close_v2(db_);
    db_ = nullptr;
  }

  static stored_message read_message(sqlite3_stmt* s) {
    stored_message m;
    m.sequence = static_cast<std::uint64_t>(sqlite3_column_int64(s, 0));
    m.id = message_id::parse(detail::sqlite_column_string(s, 1)).value_or(message_id{});
    m.type = detail::sqlite_column_string(s, 2);
    m.partition_key = detail::sqlite_column_string(s, 3);
    m.correlation_id = message_id::parse(detail::sqlite_column_string(s, 4)).value_or(message_id{});
    m.causation_id = message_id::parse(detail::sqlite_column_string(s, 5)).value_or(message_id{});
    m.staged_at = detail::sqlite_time_of(sqlite3_column_int64(s, 6));
    m.body = detail::sqlite_column_string(s, 7);
    m.attempts = static_cast<std::uint32_t>(sqlite3_column_int64(s, 8));
    if (sqlite3_column_type(s, 9) != SQLITE_NULL) m.due = detail::sqlite_time_of(sqlite3_column_int64(s, 9));
    return m;
  }

  // Reads the dead letters matching `f` into `out`; SQLITE_DONE or the error.
  int select_dead(const outbox_dead_letter_filter& f, std::vector<outbox_dead_letter_entry>& out) {
    sqlite3_stmt* s = dead_select_.get();
    detail::sqlite_use use(s);
    char id[36];
    if (f.key) detail::sqlite_bind_text(s, 1, *f.key);
    if (f.reason) detail::sqlite_bind_text(s, 2, *f.reason);
    if (f.type) detail::sqlite_bind_text(s, 3, *f.type);
    if (f.id) {
      f.id->write_to(id);
      detail::sqlite_bind_text(s, 4, std::string_view(id, 36));
    }
    sqlite3_bind_int64(s, 5, static_cast<sqlite3_int64>(std::min<std::size_t>(f.max, INT64_MAX)));
    int rc = 0;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      outbox_dead_letter_entry d;
      d.message = read_message(s);
      d.reason = detail::sqlite_column_string(s, 9);
      d.error = detail::sqlite_column_string(s, 10);
      d.first_failure = detail::sqlite_time_of(sqlite3_column_int64(s, 11));
      d.last_failure = detail::sqlite_time_of(sqlite3_column_int64(s, 12));
      out.push_back(std::move(d));
    }
    return rc;
  }

  // ---- saga rows ----

  static void bind_time(sqlite3_stmt* s, int i, std::optional<time_point> t) {
    if (t) {
      sqlite3_bind_int64(s, i, detail::sqlite_time(*t));
    } else {
      sqlite3_bind_null(s, i);
    }
  }

  static int write_saga(sqlite3_stmt* s, const saga_state& st) {
    detail::sqlite_use use(s);
    const std::string corr = st.correlation_id.to_string();
    const std::string last = st.last_event_id.to_string();
    detail::sqlite_bind_text(s, 1, st.saga_id);
    detail::sqlite_bind_text(s, 2, st.definition);
    sqlite3_bind_blob(s, 3, st.data.empty() ? "" : st.data.data(), static_cast<int>(st.data.size()), SQLITE_STATIC);
    detail::sqlite_bind_text(s, 4, corr);
    detail::sqlite_bind_text(s, 5, last);
    sqlite3_bind_int(s, 6, static_cast<int>(st.phase));
    sqlite3_bind_int(s, 7, static_cast<int>(st.outcome));
    sqlite3_bind_int64(s, 8, st.step_count);
    sqlite3_bind_int64(s, 9, st.current_step);
    sqlite3_bind_int64(s, 10, st.completed_steps);
    sqlite3_bind_int64(s, 11, st.attempt);
    bind_time(s, 12, st.step_deadline);
    bind_time(s, 13, st.next_attempt_at);
    detail::sqlite_bind_text(s, 14, st.failure_reason);
    bind_time(s, 15, st.started_at);
    bind_time(s, 16, st.updated_at);
    sqlite3_bind_int64(s, 17, static_cast<sqlite3_int64>(st.version));
    return sqlite3_step(s);
  }

  static std::optional<time_point> column_time(sqlite3_stmt* s, int i) {
    if (sqlite3_column_type(s, i) == SQLITE_NULL) return std::nullopt;
    return detail::sqlite_time_of(sqlite3_column_int64(s, i));
  }
  static std::uint32_t column_u32(sqlite3_stmt* s, int i) {
    return static_cast<std::uint32_t>(sqlite3_column_int64(s, i));
  }

  // Decodes one saga row; nullopt when a field is out of its domain.
  static std::optional<saga_state> read_saga(sqlite3_stmt* s) {
    saga_state st;
    st.saga_id = detail::sqlite_column_string(s, 0);
    st.definition = detail::sqlite_column_string(s, 1);
    st.data = detail::sqlite_column_string(s, 2);
    const auto corr = message_id::parse(detail::sqlite_column_string(s, 3));
    const auto last = message_id::parse(detail::sqlite_column_string(s, 4));
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
    st.failure_reason = detail::sqlite_column_string(s, 13);
    st.started_at = column_time(s, 14).value_or(time_point{});
    st.updated_at = column_time(s, 15).value_or(time_point{});
    st.version = static_cast<std::uint64_t>(sqlite3_column_int64(s, 16));
    return st;
  }

  std::string path_;
  sqlite_store_options options_;
  sqlite3* db_ = nullptr;
  std::mutex mutex_;  // the connection; held by a transaction for its whole life
  /// The thread holding a transaction of this store, or none. Written by
  /// that thread (relaxed) right after it takes mutex_ and right before it
  /// releases it; read (relaxed) by lock_for() only to ask "is it me?",
  /// which a thread can answer from its own writes alone: another thread's
  /// id never equals ours, and the mutex orders our own earlier clear.
  std::atomic<std::thread::id> owner_{};
  std::shared_ptr<commit_signal> signal_;
  mutable std::mutex error_mutex_;
  std::string last_error_;
  /// Statistics; each written with relaxed fetch_add by whichever thread
  /// commits, rolls back or fails, read relaxed by stats().
  std::atomic<std::uint64_t> commits_n_{0}, rollbacks_n_{0}, failures_n_{0};
  std::unordered_map<std::string, detail::sqlite_stmt> user_stmts_;  // under mutex_
  detail::sqlite_stmt begin_, commit_, rollback_, sp_begin_, sp_release_, sp_rollback_;
  detail::sqlite_stmt stage_, claim_select_, claim_update_, next_due_, renew_, mark_, release_, retry_, purge_, counts_,
      pending_;
  detail::sqlite_stmt release_owner_, dead_exists_, dead_insert_, dead_delete_pending_, dead_select_, redrive_insert_,
      dead_delete_;
  detail::sqlite_stmt inbox_insert_, inbox_contains_, inbox_prune_time_, inbox_prune_count_, inbox_size_;
  detail::sqlite_stmt version_select_, version_upsert_;
  detail::sqlite_stmt saga_insert_, saga_upsert_, saga_select_, saga_unfinished_;
  detail::sqlite_stmt claim_lease_, claim_blocked_;  // the writer's half of a claim through reader_
  /// The relay's read connection (read-only; a WAL reader), or null (see
  /// open_reader). It and its statements are used under reader_mutex_ only,
  /// never under mutex_, so a claim's read waits for no transaction of the store.
  sqlite3* reader_ = nullptr;
  bool reader_tried_ = false;  // under reader_mutex_: open_reader ran (at the first claim)
  std::mutex reader_mutex_;
  detail::sqlite_stmt reader_claim_select_, reader_next_due_;
};

static_assert(message_store<sqlite_store>);
static_assert(saga_state_store<sqlite_store>);

POSTBOX_END_NAMESPACE
