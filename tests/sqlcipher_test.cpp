// SPDX-License-Identifier: MIT
// Tests for postbox/sqlcipher.hpp: the SQLite store encrypted at rest (the key callback, no plaintext in the files, wrong and missing keys). The store conformance suite runs encrypted as store_sqlcipher_test.
#include <postbox/saga_sqlite.hpp>
#include <postbox/sqlcipher.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>

namespace {

const std::string planted = "PLANTED-PLAINTEXT-5f1c2e9a";
const std::string passphrase = "correct horse battery staple 2026";

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Everything on disk for the store at `path`: the database, its WAL and its shared-memory index.
std::string all_bytes(const std::string& path) {
  std::string out;
  for (const char* suffix : {"", "-wal", "-shm", "-journal"})
    if (std::filesystem::exists(path + suffix)) out += file_bytes(path + suffix);
  return out;
}

postbox::sqlite_store_options keyed(const std::string& key) {
  return postbox::with_sqlcipher_key({}, [key] { return key; });
}

// Writes the planted text into an application table and an outbox message,
// and checkpoints nothing on purpose: the WAL is checked too.
void plant(postbox::sqlite_store& store) {
  auto tx = store.begin();
  REQUIRE(tx.exec("CREATE TABLE IF NOT EXISTS notes (body TEXT)") == postbox::errc::ok);
  REQUIRE(tx.exec("INSERT INTO notes VALUES (?1)", planted) == postbox::errc::ok);
  postbox::stored_message m;
  m.id = postbox::message_id::generate();
  m.type = "secret.note";
  m.correlation_id = m.id;
  m.body = "{\"note\":\"" + planted + "\"}";
  REQUIRE(store.outbox_stage(tx, m) == postbox::errc::ok);
  REQUIRE(tx.commit() == postbox::errc::ok);
}

}  // namespace

TEST_CASE("the linked library is SQLCipher", "[sqlcipher]") {
  CHECK_FALSE(postbox::sqlcipher_version().empty());
}

TEST_CASE("an encrypted store's files do not contain a planted plaintext, while an unkeyed store's do",
          "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string enc = dir.file("encrypted.db");
  const std::string plain = dir.file("plain.db");
  {
    postbox::sqlite_store store(enc, keyed(passphrase));
    plant(store);
    CHECK(all_bytes(enc).find(planted) == std::string::npos);  // with the WAL still open
  }
  {
    postbox::sqlite_store store(plain);
    plant(store);
  }
  CHECK(all_bytes(enc).find(planted) == std::string::npos);
  CHECK(all_bytes(enc).find(passphrase) == std::string::npos);
  CHECK(file_bytes(enc).substr(0, 16) != std::string("SQLite format 3\0", 16));
  // The control: the same writes without a key are readable on disk, so the check above can fail.
  CHECK(all_bytes(plain).find(planted) != std::string::npos);
}

TEST_CASE("an encrypted store reopened with its key reads back what it wrote", "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  {
    postbox::sqlite_store store(path, keyed(passphrase));
    plant(store);
  }
  postbox::sqlite_store store(path, keyed(passphrase));
  auto pending = store.outbox_pending();
  REQUIRE(pending.has_value());
  REQUIRE(pending->size() == 1);
  CHECK(pending->front().body.find(planted) != std::string::npos);
  auto check = store.integrity_check();
  REQUIRE(check.has_value());
  CHECK(*check == "ok");
}

TEST_CASE("opening an encrypted store with a wrong key fails with corrupt and never shows either key",
          "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  {
    postbox::sqlite_store store(path, keyed(passphrase));
    plant(store);
  }
  const std::string wrong = "wrong horse battery staple 2026";
  try {
    postbox::sqlite_store store(path, keyed(wrong));
    FAIL("a wrong key opened the store");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::corrupt);
    const std::string text = e.what();
    CHECK(text.find(wrong) == std::string::npos);
    CHECK(text.find(passphrase) == std::string::npos);
  }
}

TEST_CASE("opening an encrypted store without a key fails with corrupt", "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  {
    postbox::sqlite_store store(path, keyed(passphrase));
    plant(store);
  }
  CHECK_THROWS_MATCHES(postbox::sqlite_store(path), postbox::error,
                       Catch::Matchers::Predicate<postbox::error>(
                           [](const postbox::error& e) { return e.code() == postbox::errc::corrupt; }));
}

TEST_CASE("an empty key is refused with unauthenticated before the file is touched", "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  CHECK_THROWS_MATCHES(postbox::sqlite_store(path, keyed("")), postbox::error,
                       Catch::Matchers::Predicate<postbox::error>(
                           [](const postbox::error& e) { return e.code() == postbox::errc::unauthenticated; }));
  CHECK(all_bytes(path).empty());
}

TEST_CASE("the key provider is asked once per opened connection", "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  int calls = 0;
  auto opts = postbox::with_sqlcipher_key({}, [&] {
    ++calls;
    return passphrase;
  });
  { postbox::sqlite_store a(path, opts); }
  CHECK(calls == 1);
  { postbox::sqlite_store b(path, opts); }
  CHECK(calls == 2);
}

TEST_CASE("outbox claims on an encrypted store read through a second connection that is keyed too",
          "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("store.db");
  int calls = 0;
  postbox::sqlite_store store(path, postbox::with_sqlcipher_key({}, [&] {
                                ++calls;
                                return passphrase;
                              }));
  plant(store);
  CHECK(calls == 1);  // the writer
  const auto now = postbox::default_clock().now();
  auto batch = store.outbox_claim("relay-1", now, now + std::chrono::seconds(30), 10);
  REQUIRE(batch.has_value());
  REQUIRE(batch->messages.size() == 1);
  CHECK(batch->messages.front().body.find(planted) != std::string::npos);
  CHECK(calls == 2);  // the read-only reader the first claim opens
  CHECK(all_bytes(path).find(planted) == std::string::npos);
}

TEST_CASE("a saga store keyed through its options keeps saga data encrypted and reads it back", "[sqlcipher]") {
  postbox_test::temp_dir dir("postbox_sqlcipher");
  const std::string path = dir.file("sagas.db");
  postbox::sqlite_saga_store_options o;
  o.on_open = postbox::sqlcipher_key([] { return passphrase; });
  postbox::saga_state st;
  st.saga_id = "saga-1";
  st.definition = "order";
  st.data = planted;
  st.correlation_id = postbox::message_id::generate();
  {
    postbox::sqlite_saga_store sagas(path, o);
    REQUIRE(sagas.create(st) == postbox::errc::ok);
  }
  CHECK(all_bytes(path).find(planted) == std::string::npos);
  postbox::sqlite_saga_store sagas(path, o);
  auto back = sagas.load("saga-1");
  REQUIRE(back.has_value());
  CHECK(back->data == planted);
  CHECK_THROWS_AS(postbox::sqlite_saga_store(path), postbox::error);
}

TEST_CASE("sqlcipher_key refuses an empty provider with invalid_argument", "[sqlcipher]") {
  CHECK_THROWS_MATCHES(postbox::sqlcipher_key({}), postbox::error,
                       Catch::Matchers::Predicate<postbox::error>(
                           [](const postbox::error& e) { return e.code() == postbox::errc::invalid_argument; }));
}
