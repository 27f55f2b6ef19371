// SPDX-License-Identifier: MIT
// The SQLite store encrypted at rest with SQLCipher: a key callback for sqlite_store_options and a check of the linked library.
#pragma once

// Opt-in (CMake target `postbox::sqlcipher`, built when Debian's
// libsqlcipher-dev is found): compiles sqlite.hpp against SQLCipher's
// <sqlite3.h> and links libsqlcipher instead of libsqlite3. A program uses
// one or the other, never both (they define the same symbols). Design and
// measurements: docs/design/security.md ("At rest").

#include <postbox/config.hpp>
#include <postbox/error.hpp>
#include <postbox/sqlite.hpp>

#include <sqlite3.h>

#if !defined(SQLITE_HAS_CODEC)
#  error "postbox/sqlcipher.hpp needs SQLCipher's sqlite3.h with SQLITE_HAS_CODEC: link the postbox::sqlcipher target"
#endif

#include <cstddef>
#include <functional>
#include <string>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// Where a store's key comes from: called once each time a store opens its
/// connection, so the key can be fetched from a secret manager and need not
/// stay in memory. It returns the passphrase (SQLCipher derives the page key
/// with PBKDF2) or a raw key as SQLCipher spells it, `x'<64 hex digits>'`.
/// An empty key is refused (`unauthenticated`).
using sqlcipher_key_provider = std::function<std::string()>;

/// An `on_open` callback for `sqlite_store_options` that keys the connection
/// with `sqlcipher_key` before anything else reads the file. The key
/// string is wiped after use and never appears in an error text. A wrong key
/// surfaces as the store constructor's postbox::error with `corrupt`
/// (SQLite's "file is not a database": an encrypted page cannot be told from
/// a damaged one). Allocates. The callback is thread-safe if `provider` is.
[[nodiscard]] inline std::function<errc(sqlite3*)> sqlcipher_key(sqlcipher_key_provider provider) {
  if (!provider) POSTBOX_THROW(error(errc::invalid_argument, "sqlcipher_key: no key provider"));
  return [provider = std::move(provider)](sqlite3* db) -> errc {
    std::string key = provider();
    if (key.empty()) return errc::unauthenticated;
    const int rc = sqlite3_key(db, key.data(), static_cast<int>(key.size()));
    volatile char* p = key.data();
    for (std::size_t i = 0; i < key.size(); ++i) p[i] = 0;
    return rc == SQLITE_OK ? errc::ok : errc::unauthenticated;
  };
}

/// `options` with its `on_open` set to `sqlcipher_key(provider)`. Allocates.
[[nodiscard]] inline sqlite_store_options with_sqlcipher_key(sqlite_store_options options,
                                                             sqlcipher_key_provider provider) {
  options.on_open = sqlcipher_key(std::move(provider));
  return options;
}

/// SQLCipher's version ("3.4.1" on Debian 12) as the linked library reports
/// it (`PRAGMA cipher_version` on an in-memory database), or empty when the
/// linked library is plain SQLite: a check that encryption is really there.
/// Allocates. Thread-safe.
[[nodiscard]] inline std::string sqlcipher_version() {
  sqlite3* db = nullptr;
  std::string out;
  if (sqlite3_open_v2(":memory:", &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) == SQLITE_OK) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA cipher_version", -1, &st, nullptr) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
      const unsigned char* text = sqlite3_column_text(st, 0);
      if (text != nullptr) out = reinterpret_cast<const char*>(text);
    }
    sqlite3_finalize(st);
  }
  sqlite3_close_v2(db);
  return out;
}

POSTBOX_END_NAMESPACE
