// SPDX-License-Identifier: MIT
// Test support for the stores: a temporary directory, a SQLite VFS that fails chosen writes and syncs, and one fixture per store.
//
// Shared by tests/store_test.cpp (the conformance suite), the outbox, inbox and
// SQLite tests and the crash harnesses in this directory.
#pragma once

#include <postbox/envelope.hpp>
#include <postbox/store.hpp>

#if __has_include(<sqlite3.h>)
#  include <postbox/sqlite.hpp>
#  include <sqlite3.h>
#  ifdef POSTBOX_TEST_SQLCIPHER_KEY  // store_sqlcipher_test: the conformance suite on encrypted files
#    include <postbox/sqlcipher.hpp>
#  endif
#  define POSTBOX_TEST_HAVE_SQLITE 1
#else
#  define POSTBOX_TEST_HAVE_SQLITE 0
#endif

#include <atomic>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>

namespace postbox_test {

/// A fresh directory under the system temp directory, removed with
/// everything in it when the object goes.
struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& prefix = "postbox_store") {
    path = std::filesystem::temp_directory_path() / (prefix + "_" + postbox::message_id::generate().to_string());
    std::filesystem::create_directories(path);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  [[nodiscard]] std::string file(const std::string& name) const { return (path / name).string(); }
};

#if POSTBOX_TEST_HAVE_SQLITE

/// A SQLite VFS named "postbox_faulty" that forwards everything to the
/// default VFS, except that an armed countdown makes one chosen xWrite or
/// xSync (on any file: database, WAL, journal) fail with a given I/O error.
/// This is a real failure path: SQLite sees the error from the OS layer
/// exactly as it would from a failing disk. Thread-safe countdowns.
class faulty_vfs {
 public:
  static constexpr const char* name = "postbox_faulty";

  /// The process-wide instance, registered with SQLite on first use.
  static faulty_vfs& instance() {
    static faulty_vfs v;
    return v;
  }

  /// The write after the next `n` writes fails with `code` (once).
  void fail_write_after(int n, int code = SQLITE_IOERR_WRITE) {
    write_code_.store(code);
    write_countdown_.store(n);
  }
  /// The sync after the next `n` syncs fails with `code` (once).
  void fail_sync_after(int n, int code = SQLITE_IOERR_FSYNC) {
    sync_code_.store(code);
    sync_countdown_.store(n);
  }
  /// Main database files open read-only from now on (what the unix VFS
  /// does when opening read-write fails with EACCES), or normally again.
  void open_read_only(bool on) { read_only_.store(on); }
  /// No more injected failures.
  void disarm() {
    write_countdown_.store(-1);
    sync_countdown_.store(-1);
    read_only_.store(false);
  }
  /// Failures injected so far.
  [[nodiscard]] int injected() const { return injected_.load(); }
  /// Writes and syncs seen so far (all files).
  [[nodiscard]] long writes() const { return writes_.load(); }
  [[nodiscard]] long syncs() const { return syncs_.load(); }

 private:
  struct file {
    sqlite3_file base;
    sqlite3_file* real;
  };

  faulty_vfs() {
    real_ = sqlite3_vfs_find(nullptr);
    vfs_ = sqlite3_vfs{};
    vfs_.iVersion = 3;
    vfs_.szOsFile = static_cast<int>(sizeof(file)) + real_->szOsFile;
    vfs_.mxPathname = real_->mxPathname;
    vfs_.zName = name;
    vfs_.pAppData = this;
    vfs_.xOpen = &x_open;
    vfs_.xDelete = [](sqlite3_vfs*, const char* z, int sync) { return self().real_->xDelete(self().real_, z, sync); };
    vfs_.xAccess = [](sqlite3_vfs*, const char* z, int f, int* out) {
      return self().real_->xAccess(self().real_, z, f, out);
    };
    vfs_.xFullPathname = [](sqlite3_vfs*, const char* z, int n, char* out) {
      return self().real_->xFullPathname(self().real_, z, n, out);
    };
    vfs_.xDlOpen = [](sqlite3_vfs*, const char* z) { return self().real_->xDlOpen(self().real_, z); };
    vfs_.xDlError = [](sqlite3_vfs*, int n, char* out) { self().real_->xDlError(self().real_, n, out); };
    vfs_.xDlSym = [](sqlite3_vfs*, void* h, const char* z) { return self().real_->xDlSym(self().real_, h, z); };
    vfs_.xDlClose = [](sqlite3_vfs*, void* h) { self().real_->xDlClose(self().real_, h); };
    vfs_.xRandomness = [](sqlite3_vfs*, int n, char* out) { return self().real_->xRandomness(self().real_, n, out); };
    vfs_.xSleep = [](sqlite3_vfs*, int us) { return self().real_->xSleep(self().real_, us); };
    vfs_.xCurrentTime = [](sqlite3_vfs*, double* t) { return self().real_->xCurrentTime(self().real_, t); };
    vfs_.xGetLastError = [](sqlite3_vfs*, int n, char* out) { return self().real_->xGetLastError(self().real_, n, out); };
    vfs_.xCurrentTimeInt64 = [](sqlite3_vfs*, sqlite3_int64* t) {
      return self().real_->xCurrentTimeInt64(self().real_, t);
    };
    vfs_.xSetSystemCall = [](sqlite3_vfs*, const char* z, sqlite3_syscall_ptr p) {
      return self().real_->xSetSystemCall(self().real_, z, p);
    };
    vfs_.xGetSystemCall = [](sqlite3_vfs*, const char* z) { return self().real_->xGetSystemCall(self().real_, z); };
    vfs_.xNextSystemCall = [](sqlite3_vfs*, const char* z) { return self().real_->xNextSystemCall(self().real_, z); };

    io_ = sqlite3_io_methods{};
    io_.iVersion = 3;
    io_.xClose = [](sqlite3_file* f) {
      const int rc = real(f)->pMethods->xClose(real(f));
      f->pMethods = nullptr;
      return rc;
    };
    io_.xRead = [](sqlite3_file* f, void* p, int n, sqlite3_int64 off) { return real(f)->pMethods->xRead(real(f), p, n, off); };
    io_.xWrite = [](sqlite3_file* f, const void* p, int n, sqlite3_int64 off) {
      self().writes_.fetch_add(1);
      if (const int rc = self().trip(self().write_countdown_, self().write_code_); rc != SQLITE_OK) return rc;
      return real(f)->pMethods->xWrite(real(f), p, n, off);
    };
    io_.xTruncate = [](sqlite3_file* f, sqlite3_int64 size) { return real(f)->pMethods->xTruncate(real(f), size); };
    io_.xSync = [](sqlite3_file* f, int flags) {
      self().syncs_.fetch_add(1);
      if (const int rc = self().trip(self().sync_countdown_, self().sync_code_); rc != SQLITE_OK) return rc;
      return real(f)->pMethods->xSync(real(f), flags);
    };
    io_.xFileSize = [](sqlite3_file* f, sqlite3_int64* out) { return real(f)->pMethods->xFileSize(real(f), out); };
    io_.xLock = [](sqlite3_file* f, int l) { return real(f)->pMethods->xLock(real(f), l); };
    io_.xUnlock = [](sqlite3_file* f, int l) { return real(f)->pMethods->xUnlock(real(f), l); };
    io_.xCheckReservedLock = [](sqlite3_file* f, int* out) { return real(f)->pMethods->xCheckReservedLock(real(f), out); };
    io_.xFileControl = [](sqlite3_file* f, int op, void* arg) { return real(f)->pMethods->xFileControl(real(f), op, arg); };
    io_.xSectorSize = [](sqlite3_file* f) { return real(f)->pMethods->xSectorSize(real(f)); };
    io_.xDeviceCharacteristics = [](sqlite3_file* f) { return real(f)->pMethods->xDeviceCharacteristics(real(f)); };
    io_.xShmMap = [](sqlite3_file* f, int pg, int sz, int extend, void volatile** out) {
      return real(f)->pMethods->xShmMap(real(f), pg, sz, extend, out);
    };
    io_.xShmLock = [](sqlite3_file* f, int off, int n, int flags) {
      return real(f)->pMethods->xShmLock(real(f), off, n, flags);
    };
    io_.xShmBarrier = [](sqlite3_file* f) { real(f)->pMethods->xShmBarrier(real(f)); };
    io_.xShmUnmap = [](sqlite3_file* f, int del) { return real(f)->pMethods->xShmUnmap(real(f), del); };
    io_.xFetch = [](sqlite3_file* f, sqlite3_int64 off, int n, void** out) {
      return real(f)->pMethods->xFetch(real(f), off, n, out);
    };
    io_.xUnfetch = [](sqlite3_file* f, sqlite3_int64 off, void* p) { return real(f)->pMethods->xUnfetch(real(f), off, p); };
    sqlite3_vfs_register(&vfs_, 0);
  }

  static faulty_vfs& self() { return instance(); }
  static sqlite3_file* real(sqlite3_file* f) { return reinterpret_cast<file*>(f)->real; }

  static int x_open(sqlite3_vfs*, const char* z, sqlite3_file* f, int flags, int* out_flags) {
    auto* ff = reinterpret_cast<file*>(f);
    ff->real = reinterpret_cast<sqlite3_file*>(reinterpret_cast<char*>(f) + sizeof(file));
    std::memset(ff->real, 0, static_cast<std::size_t>(self().real_->szOsFile));
    if (self().read_only_.load() && (flags & SQLITE_OPEN_MAIN_DB) != 0)
      flags = (flags & ~(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)) | SQLITE_OPEN_READONLY;
    const int rc = self().real_->xOpen(self().real_, z, ff->real, flags, out_flags);
    ff->base.pMethods = ff->real->pMethods != nullptr ? &self().io_ : nullptr;
    return rc;
  }

  // Counts down; the call that takes it from 0 to -1 fails.
  int trip(std::atomic<int>& countdown, std::atomic<int>& code) {
    int c = countdown.load();
    while (c >= 0) {
      if (countdown.compare_exchange_weak(c, c - 1)) {
        if (c == 0) {
          injected_.fetch_add(1);
          return code.load();
        }
        return SQLITE_OK;
      }
    }
    return SQLITE_OK;
  }

  sqlite3_vfs* real_ = nullptr;
  sqlite3_vfs vfs_{};
  sqlite3_io_methods io_{};
  // Seq_cst throughout: test plumbing, not a hot path.
  std::atomic<int> write_countdown_{-1}, sync_countdown_{-1};
  std::atomic<int> write_code_{SQLITE_IOERR_WRITE}, sync_code_{SQLITE_IOERR_FSYNC};
  std::atomic<int> injected_{0};
  std::atomic<bool> read_only_{false};
  std::atomic<long> writes_{0}, syncs_{0};
};

#endif

/// The memory store as the conformance suite sees it.
struct memory_fixture {
  static constexpr const char* name = "memory";
  using store_type = postbox::memory_store;
  postbox::memory_store store;
  postbox::memory_store& get() { return store; }
  /// The next commit fails with an I/O-like error.
  void inject_commit_failure() { store.inject_commit_failure(postbox::errc::store_error); }
  void disarm() {}
  /// Memory has nothing to reopen: the same store.
  void reopen() {}
};

#if POSTBOX_TEST_HAVE_SQLITE
/// A SQLite store in a temporary directory, on the failing VFS (disarmed),
/// with synchronous=NORMAL (durability through a process crash is enough for
/// these tests; power loss is not simulated).
struct sqlite_fixture {
  static constexpr const char* name = "sqlite";
  using store_type = postbox::sqlite_store;
  temp_dir dir{"postbox_store_test"};
  std::optional<postbox::sqlite_store> store;

  static postbox::sqlite_store_options options() {
    postbox::sqlite_store_options o;
    o.synchronous = postbox::sqlite_synchronous::normal;
    o.vfs = faulty_vfs::instance().name;
#ifdef POSTBOX_TEST_SQLCIPHER_KEY
    o.on_open = postbox::sqlcipher_key([] { return std::string(POSTBOX_TEST_SQLCIPHER_KEY); });
#endif
    return o;
  }
  sqlite_fixture() {
    faulty_vfs::instance().disarm();
    store.emplace(dir.file("store.db"), options());
  }
  ~sqlite_fixture() {
    store.reset();
    faulty_vfs::instance().disarm();
  }
  postbox::sqlite_store& get() { return *store; }
  /// The next write to any file fails with SQLITE_IOERR_WRITE: in WAL mode
  /// the first write of a small transaction is its commit.
  void inject_commit_failure() { faulty_vfs::instance().fail_write_after(0); }
  void disarm() { faulty_vfs::instance().disarm(); }
  /// Closes and opens the file again (a new connection).
  void reopen() {
    store.reset();
    store.emplace(dir.file("store.db"), options());
  }
};
#endif

}  // namespace postbox_test
