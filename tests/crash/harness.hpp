// SPDX-License-Identifier: MIT
// Crash-test plumbing: start this program as a child, read its event lines, SIGKILL it after a chosen number of them.
//
// A child writes one line per event to its stdout (a pipe): "A <n>" when
// transaction n is committed (an acknowledgement the parent may rely on),
// anything else as a tick that only marks a point where a kill may land. The
// parent counts lines and kills the child after a random count; after the
// kill it still reads what the child wrote before dying, so no
// acknowledgement is missed. Deterministic crash points: the parent passes
// POSTBOX_CRASH_AT=<point>:<k> and the child kills itself at the k-th time it
// reaches <point> (see crash_point).
#pragma once

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace postbox_crash {

/// Run by die() before the process exits: a parent that owns what exit()
/// would leave behind (a nats-server it started: std::exit runs no
/// destructors of the stack it leaves) releases it here. Children start from
/// exec, so they never inherit it.
inline void (*before_die)() = nullptr;

[[noreturn]] inline void die(const char* who, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", who, what.c_str());
  if (before_die != nullptr) {
    void (*const release)() = before_die;
    before_die = nullptr;  // once, even if it dies itself
    release();
  }
  std::exit(2);
}

/// Writes one event line to stdout (fd 1) with a single write(2), so a kill
/// never leaves half a line.
inline void emit(const std::string& line) {
  const std::string l = line + "\n";
  std::size_t done = 0;
  while (done < l.size()) {
    const ssize_t n = ::write(1, l.data() + done, l.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) std::_Exit(3);  // the parent went away
    done += static_cast<std::size_t>(n);
  }
}

/// The child's deterministic crash point from POSTBOX_CRASH_AT, if any:
/// `hit(name)` kills the process with SIGKILL at the k-th call for `name`.
/// Thread-safe: a consumer with several workers reaches its points from each.
class crash_point {
 public:
  crash_point() {
    const char* v = std::getenv("POSTBOX_CRASH_AT");
    if (v == nullptr) return;
    const std::string s(v);
    const auto colon = s.find(':');
    name_ = s.substr(0, colon);
    at_ = colon == std::string::npos ? 1 : std::strtoll(s.c_str() + colon + 1, nullptr, 10);
  }
  void hit(const char* name) {
    if (name_ != name) return;
    // relaxed: only the count matters; the kill needs no other memory.
    if (count_.fetch_add(1, std::memory_order_relaxed) + 1 >= at_) ::kill(::getpid(), SIGKILL);
  }

 private:
  std::string name_;
  long long at_ = 0;
  std::atomic<long long> count_{0};
};

/// A running child: its pid and the read end of its stdout.
struct child {
  pid_t pid = -1;
  int out = -1;
  std::string pending;  // bytes read but not yet a whole line
};

/// Starts /proc/self/exe with `args` (argv[1...]); `crash_at` (if not
/// empty) goes to the child's POSTBOX_CRASH_AT.
inline child spawn(const char* who, const std::vector<std::string>& args, const std::string& crash_at = {}) {
  int fds[2];
  if (::pipe(fds) != 0) die(who, "pipe");
  const pid_t pid = ::fork();
  if (pid < 0) die(who, "fork");
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    if (crash_at.empty()) {
      ::unsetenv("POSTBOX_CRASH_AT");
    } else {
      ::setenv("POSTBOX_CRASH_AT", crash_at.c_str(), 1);
    }
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(who));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv("/proc/self/exe", argv.data());
    std::_Exit(127);
  }
  ::close(fds[1]);
  return child{pid, fds[0], {}};
}

/// Reads event lines until `max_lines` were read (0: until the child's end)
/// and passes each to `on_line`. Returns the number of lines read.
template <class OnLine>
std::uint64_t read_lines(child& c, std::uint64_t max_lines, OnLine&& on_line) {
  std::uint64_t lines = 0;
  char buf[4096];
  for (;;) {
    std::size_t nl = 0;
    while ((max_lines == 0 || lines < max_lines) && (nl = c.pending.find('\n')) != std::string::npos) {
      on_line(c.pending.substr(0, nl));
      c.pending.erase(0, nl + 1);
      ++lines;
    }
    if (max_lines != 0 && lines >= max_lines) return lines;
    const ssize_t n = ::read(c.out, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return lines;
    c.pending.append(buf, static_cast<std::size_t>(n));
  }
}

/// Waits for the child to end; returns the raw wait status.
inline int wait_exit(const char* who, pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) die(who, "waitpid");
  }
  return status;
}

/// SIGKILLs the child (if still running), reads everything it wrote before
/// dying, and reaps it. Returns the wait status.
template <class OnLine>
int kill_and_reap(const char* who, child& c, OnLine&& on_line) {
  ::kill(c.pid, SIGKILL);
  read_lines(c, 0, on_line);
  ::close(c.out);
  return wait_exit(who, c.pid);
}

/// Reads the child to its end and reaps it. Returns the wait status.
template <class OnLine>
int run_to_end(const char* who, child& c, OnLine&& on_line) {
  read_lines(c, 0, on_line);
  ::close(c.out);
  return wait_exit(who, c.pid);
}

inline bool killed_by_sigkill(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL; }
inline bool exited_ok(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

}  // namespace postbox_crash
