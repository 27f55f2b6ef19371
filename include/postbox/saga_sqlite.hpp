// SPDX-License-Identifier: MIT
// postbox::sqlite_saga_store: saga state in a SQLite database, a thin wrapper over postbox::sqlite_store (links sqlite3).
#pragma once

// Opt-in, like sqlite.hpp (layer 4, patterns): kept apart from saga.hpp so
// that the saga core compiles with the standard library alone; include this
// header (and link postbox::sqlite) to use it. It lived in detail/ before,
// where it reached up from the core to the patterns and the stores.
// postbox::sqlite_store (<postbox/sqlite.hpp>) itself models saga_state_store,
// so one database file (one store object) can hold sagas next to outbox,
// inbox and the application's rows; this class keeps the older, saga-only
// spelling and its string options.

#include <postbox/error.hpp>
#include <postbox/saga.hpp>
#include <postbox/sqlite.hpp>

#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// Settings of a sqlite_saga_store.
struct sqlite_saga_store_options {
  /// `PRAGMA synchronous`: "FULL" (default; durable through power loss),
  /// "NORMAL" (WAL: durable through a process crash, not power loss) or "OFF".
  std::string synchronous = "FULL";
  /// How long a statement waits on another connection's lock before `busy`.
  int busy_timeout_ms = 5000;
  /// Called on the connection right after it opens (`sqlite_store_options::on_open`):
  /// an encrypted build's key (sqlcipher.hpp, `sqlcipher_key`). Empty: nothing.
  std::function<errc(sqlite3*)> on_open{};
};

/// Saga state in the `postbox_saga` table of a SQLite database in WAL mode,
/// through a `sqlite_store` of its own; each `create`/`save` is one committed
/// transaction, so the state survives a crash of the process at any point.
/// Several processes may share the file. The constructor throws
/// `postbox::error` (`store_error`, `busy`, `corrupt`, `unsupported_version`,
/// or `invalid_argument` for a bad option); operations return those codes.
/// Every member blocks on I/O and allocates; thread-safe.
class sqlite_saga_store {
 public:
  explicit sqlite_saga_store(const std::string& path, sqlite_saga_store_options options = {})
      : store_(path, convert(options)) {}

  sqlite_saga_store(const sqlite_saga_store&) = delete;
  sqlite_saga_store& operator=(const sqlite_saga_store&) = delete;

  /// Inserts a new saga; `conflict` if the id exists.
  [[nodiscard]] errc create(const saga_state& st) { return store_.create(st); }
  /// Inserts or replaces the saga's row (one committed transaction).
  [[nodiscard]] errc save(const saga_state& st) { return store_.save(st); }
  /// The saga's stored state, or `not_found`.
  [[nodiscard]] result<saga_state> load(std::string_view saga_id) const { return store_.load(saga_id); }
  /// Every saga whose outcome is `running`, oldest first.
  [[nodiscard]] result<std::vector<saga_state>> load_unfinished() const { return store_.load_unfinished(); }

  /// The underlying store (outbox, inbox, versions in the same file).
  [[nodiscard]] sqlite_store& store() noexcept { return store_; }

 private:
  static sqlite_store_options convert(const sqlite_saga_store_options& o) {
    sqlite_store_options out;
    if (o.synchronous == "FULL") {
      out.synchronous = sqlite_synchronous::full;
    } else if (o.synchronous == "NORMAL") {
      out.synchronous = sqlite_synchronous::normal;
    } else if (o.synchronous == "OFF") {
      out.synchronous = sqlite_synchronous::off;
    } else {
      POSTBOX_THROW(error(errc::invalid_argument, "sqlite_saga_store: synchronous must be FULL, NORMAL or OFF"));
    }
    out.busy_timeout = std::chrono::milliseconds(o.busy_timeout_ms < 0 ? 0 : o.busy_timeout_ms);
    out.on_open = o.on_open;
    return out;
  }

  sqlite_store store_;
};

static_assert(saga_state_store<sqlite_saga_store>);

POSTBOX_END_NAMESPACE
