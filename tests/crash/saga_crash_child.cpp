// SPDX-License-Identifier: MIT
// Crash test for sagas: a child runs sagas on a SQLite file, the parent SIGKILLs it at random points, then checks outcomes.
//
// Run without arguments (the parent). Each cycle the parent starts this same
// program as a child ("child <db> <sagas>"), which resumes every unfinished
// saga and then starts the sagas not yet stored, writing one byte to its
// stdout (a pipe) at every saga event and around every effect. The parent
// reads a random number of bytes and kills the child with SIGKILL, so the
// kill lands anywhere: inside an action, between an effect and its state
// write, while compensating. After the cycles one last child runs to the end
// and the parent checks, for every saga, from the same database: completed
// with every step's effect applied, or compensated with every applied step
// undone, the failing step never applied, and nothing undone that was not
// applied. Effects are idempotent rows (saga, step, kind) that also count how
// often the step function ran, so re-runs after a crash are visible.
// SQLite runs with synchronous=NORMAL: a killed process loses nothing that
// was committed (only power loss could), which is what this test exercises.
#include <postbox/saga_sqlite.hpp>
#include <postbox/saga.hpp>

#include "support.hpp"

#include <sqlite3.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int steps = 4;

// Saga i fails at step i % 5 (5 - 1 = 4 means it does not fail); the
// compensations of every third saga fail on their first try.
int fail_at(int i) { return i % 5; }
bool flaky_undo(int i) { return i % 3 == 0; }

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "saga_crash: %s\n", what.c_str());
  std::exit(2);
}

void tick() {
  // One byte per interesting point; the parent kills after a random count.
  const char c = '.';
  (void)!::write(1, &c, 1);
}

// The child's own connection for effects, in the same database file.
class effects_db {
 public:
  explicit effects_db(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) die("open effects");
    sqlite3_busy_timeout(db_, 10000);
    exec("PRAGMA journal_mode=WAL");
    exec("PRAGMA synchronous=NORMAL");
    exec("CREATE TABLE IF NOT EXISTS effects (saga TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL,"
         " calls INTEGER NOT NULL, PRIMARY KEY (saga, step, kind))");
    if (sqlite3_prepare_v2(db_,
                           "INSERT INTO effects VALUES (?1, ?2, ?3, 1)"
                           " ON CONFLICT (saga, step, kind) DO UPDATE SET calls = calls + 1",
                           -1, &apply_, nullptr) != SQLITE_OK) {
      die("prepare");
    }
  }
  effects_db(const effects_db&) = delete;
  effects_db& operator=(const effects_db&) = delete;
  ~effects_db() {
    sqlite3_finalize(apply_);
    sqlite3_close(db_);
  }

  // Idempotent in effect: the row exists once whatever the number of calls.
  void apply(const std::string& saga, int step, const char* kind) {
    sqlite3_bind_text(apply_, 1, saga.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(apply_, 2, step);
    sqlite3_bind_text(apply_, 3, kind, -1, SQLITE_STATIC);
    const int rc = sqlite3_step(apply_);
    sqlite3_reset(apply_);
    if (rc != SQLITE_DONE) die(std::string("apply: ") + sqlite3_errmsg(db_));
  }

  // Rows of one saga: kind -> steps, and the total number of calls.
  struct rows {
    std::vector<int> done, undone;
    int calls = 0;
  };
  rows read(const std::string& saga) {
    sqlite3_stmt* s = nullptr;
    sqlite3_prepare_v2(db_, "SELECT step, kind, calls FROM effects WHERE saga = ?1 ORDER BY step", -1, &s, nullptr);
    sqlite3_bind_text(s, 1, saga.c_str(), -1, SQLITE_TRANSIENT);
    rows out;
    while (sqlite3_step(s) == SQLITE_ROW) {
      const int step = sqlite3_column_int(s, 0);
      const std::string kind = reinterpret_cast<const char*>(sqlite3_column_text(s, 1));
      (kind == "do" ? out.done : out.undone).push_back(step);
      out.calls += sqlite3_column_int(s, 2);
    }
    sqlite3_finalize(s);
    return out;
  }

 private:
  void exec(const char* sql) {
    if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) die(std::string(sql) + ": " + sqlite3_errmsg(db_));
  }
  sqlite3* db_ = nullptr;
  sqlite3_stmt* apply_ = nullptr;
};

int run_child(const std::string& db, int sagas) {
  postbox::sqlite_saga_store_options store_options;
  store_options.synchronous = "NORMAL";
  postbox::sqlite_saga_store store(db, store_options);
  effects_db effects(db);

  postbox::saga_options options;
  options.compensation_retry.max_attempts = 10;
  options.compensation_retry.initial_backoff = postbox::duration::zero();
  options.compensation_retry.max_backoff = postbox::duration::zero();
  options.on_event = [](const postbox::envelope<postbox::saga_event>&) { tick(); };
  postbox::saga_coordinator coordinator(store, options);

  postbox::saga_definition def("crash");
  for (int k = 0; k < steps; ++k) {
    def.step(
        "step" + std::to_string(k),
        [&effects, k](postbox::step_context& ctx) {
          const int i = std::stoi(ctx.data());
          tick();
          if (k == fail_at(i)) return postbox::step_result::failure("planned failure");
          effects.apply(ctx.saga_id(), k, "do");
          tick();
          return postbox::step_result::success();
        },
        [&effects, k](postbox::step_context& ctx) {
          const int i = std::stoi(ctx.data());
          tick();
          if (flaky_undo(i) && ctx.attempt() == 1) return postbox::step_result::failure("transient");
          effects.apply(ctx.saga_id(), k, "undo");
          tick();
          return postbox::step_result::success();
        });
  }
  coordinator.add(std::move(def));

  for (auto& r : coordinator.resume_all()) {
    if (!r.state) die("resume " + r.saga_id + ": " + std::string(postbox::to_string(r.state.status())));
  }
  for (int i = 0; i < sagas; ++i) {
    const std::string id = "saga-" + std::to_string(i);
    if (store.load(id).has_value()) continue;
    postbox::saga_start start;
    start.saga_id = id;
    auto r = coordinator.run("crash", std::to_string(i), start);
    if (!r) die("run " + id + ": " + std::string(postbox::to_string(r.status())));
  }
  return 0;
}

struct child {
  pid_t pid;
  int out;  // read end of the child's stdout
};

child spawn(const std::string& db, int sagas) {
  int fds[2];
  if (::pipe(fds) != 0) die("pipe");
  const pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    const std::string n = std::to_string(sagas);
    ::execl("/proc/self/exe", "saga_crash", "child", db.c_str(), n.c_str(), static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

// Reads up to `bytes` bytes (all of them when 0) or until the child's end.
void drain(int fd, std::uint64_t bytes) {
  char buf[256];
  std::uint64_t seen = 0;
  while (bytes == 0 || seen < bytes) {
    const std::size_t want = bytes == 0 ? sizeof buf : std::min<std::uint64_t>(sizeof buf, bytes - seen);
    const ssize_t n = ::read(fd, buf, want);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    seen += static_cast<std::uint64_t>(n);
  }
}

int wait_exit(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) die("waitpid");
  }
  return status;
}

int run_parent() {
  const int cycles = static_cast<int>(postbox_test::scaled(200));
  const int sagas = cycles * 2;
  const std::uint64_t seed = std::getenv("POSTBOX_SEED") ? std::strtoull(std::getenv("POSTBOX_SEED"), nullptr, 10)
                                                         : std::random_device{}();
  std::mt19937_64 rng(seed);
  const auto db = (std::filesystem::temp_directory_path() /
                   ("postbox_saga_crash_" + std::to_string(::getpid()) + ".db")).string();
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(db + suffix);

  int killed = 0;
  for (int c = 0; c < cycles; ++c) {
    child ch = spawn(db, sagas);
    drain(ch.out, 1 + rng() % 80);
    if (::kill(ch.pid, SIGKILL) == 0) ++killed;
    ::close(ch.out);
    const int status = wait_exit(ch.pid);
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0) die("child failed with " + std::to_string(WEXITSTATUS(status)));
  }
  child last = spawn(db, sagas);
  drain(last.out, 0);
  ::close(last.out);
  const int status = wait_exit(last.pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die("final child did not finish cleanly");

  postbox::sqlite_saga_store store(db);
  effects_db effects(db);
  int completed = 0, compensated = 0, reruns = 0, bad = 0;
  for (int i = 0; i < sagas; ++i) {
    const std::string id = "saga-" + std::to_string(i);
    auto st = store.load(id);
    if (!st) {
      std::fprintf(stderr, "%s: missing\n", id.c_str());
      ++bad;
      continue;
    }
    const auto rows = effects.read(id);
    const int f = fail_at(i);
    std::vector<int> expected_done;
    for (int k = 0; k < std::min(f, steps); ++k) expected_done.push_back(k);
    const bool ok_outcome =
        f >= steps ? st->outcome == postbox::saga_outcome::completed : st->outcome == postbox::saga_outcome::compensated;
    const std::vector<int> expected_undone = f >= steps ? std::vector<int>{} : expected_done;
    if (!ok_outcome || rows.done != expected_done || rows.undone != expected_undone) {
      std::fprintf(stderr, "%s: outcome %s, %zu done, %zu undone (fails at %d)\n", id.c_str(),
                   std::string(postbox::to_string(st->outcome)).c_str(), rows.done.size(), rows.undone.size(), f);
      ++bad;
    }
    (st->outcome == postbox::saga_outcome::completed ? completed : compensated) += 1;
    reruns += rows.calls - static_cast<int>(rows.done.size() + rows.undone.size());
  }
  std::printf("saga_crash: seed %llu, %d cycles (%d kills), %d sagas: %d completed, %d compensated, "
              "%d effect re-runs after a kill, %d inconsistent\n",
              static_cast<unsigned long long>(seed), cycles, killed, sagas, completed, compensated, reruns, bad);
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(db + suffix);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "child") return run_child(argv[2], std::atoi(argv[3]));
  std::signal(SIGPIPE, SIG_IGN);
  return run_parent();
}
