// SPDX-License-Identifier: MIT
// Test harness: starts, stops, restarts and clusters nats-server processes on 127.0.0.1 with temporary storage.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace postbox_test::nats {

/// Path of the nats-server binary: the one CMake found, else empty.
inline std::string server_binary() {
#ifdef POSTBOX_NATS_SERVER
  const std::string path = POSTBOX_NATS_SERVER;
  if (!path.empty() && ::access(path.c_str(), X_OK) == 0) return path;
#endif
  return {};
}

/// True when tests can start a server.
inline bool available() { return !server_binary().empty(); }

namespace detail {

/// Bounded pause between polls of an external process (not a timing
/// assertion: every loop using it also has an iteration bound).
inline void pause_ms(int ms) { ::poll(nullptr, 0, ms); }

/// A loopback port that was free a moment ago (bind to port 0, read it back).
inline int bind_any_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("nats harness: socket() failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("nats harness: cannot bind a loopback port");
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

/// Takes an exclusive lock on <tmp>/postbox-nats-ports/<port> for the rest of
/// this process (the kernel drops it when the process ends, killed or not).
/// False when another test process holds that port.
inline bool reserve_port(int port) {
  const auto dir = std::filesystem::temp_directory_path() / "postbox-nats-ports";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  const auto file = dir / std::to_string(port);
  const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) return true;  // no lock directory: fall back to the kernel's choice alone
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return false;
  }
  return true;  // fd stays open on purpose: it holds the reservation
}

/// A loopback port that was free a moment ago and that no other test process
/// has reserved. CTest runs NATS test cases in parallel: between this call and
/// the server's bind (and while a test restarts its server on the same port)
/// another process could be handed the same port by bind(0); the reservation
/// makes that process pick again instead of talking to the wrong server.
inline int free_port() {
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int port = bind_any_loopback_port();
    if (reserve_port(port)) return port;
  }
  throw std::runtime_error("nats harness: no unreserved loopback port in 1000 attempts");
}

/// True when something accepts TCP connections on 127.0.0.1:port.
inline bool port_accepts(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

inline std::filesystem::path make_temp_dir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "postbox-nats-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("nats harness: mkdtemp failed");
  return tmpl;
}

}  // namespace detail

/// One nats-server process with JetStream and file storage in its own
/// temporary directory. Start/stop/restart keep the port and the store.
/// Not thread-safe; the destructor stops the process and removes the store.
class server {
 public:
  /// A standalone server (no cluster) on a fresh port; not started.
  explicit server(std::string name = "pb") : name_(std::move(name)), port_(detail::free_port()) {
    dir_ = detail::make_temp_dir();
  }
  server(const server&) = delete;
  server& operator=(const server&) = delete;
  ~server() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  /// Cluster settings: this server's route port and the route ports of its peers.
  void set_cluster(std::string cluster_name, int cluster_port, std::vector<int> peer_ports) {
    cluster_name_ = std::move(cluster_name);
    cluster_port_ = cluster_port;
    peers_ = std::move(peer_ports);
  }

  /// Starts the process and waits (bounded, ~10 s) until its client port
  /// accepts connections. Throws when it does not come up.
  void start() {
    if (pid_ > 0) return;
    std::vector<std::string> args{detail_binary(), "-a", "127.0.0.1", "-p", std::to_string(port_), "-js", "-sd",
                                  (dir_ / "store").string(), "--server_name", name_};
    if (cluster_port_ > 0) {
      args.insert(args.end(), {"--cluster_name", cluster_name_, "--cluster",
                               "nats://127.0.0.1:" + std::to_string(cluster_port_)});
      std::string routes;
      for (int p : peers_) routes += (routes.empty() ? "" : ",") + std::string("nats://127.0.0.1:") + std::to_string(p);
      if (!routes.empty()) args.insert(args.end(), {"--routes", routes});
    }
    const std::string log = (dir_ / "server.log").string();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("nats harness: fork failed");
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;
    for (int i = 0; i < 500; ++i) {  // bounded: 500 x 20 ms
      if (detail::port_accepts(port_)) return;
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("nats harness: nats-server exited at start; see " + log);
      }
      detail::pause_ms(20);
    }
    kill();
    throw std::runtime_error("nats harness: nats-server did not accept on port " + std::to_string(port_));
  }

  /// SIGTERM, then SIGKILL if the process has not exited within ~5 s.
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 250; ++i) {  // bounded: 250 x 20 ms
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      detail::pause_ms(20);
    }
    kill();
  }

  /// SIGKILL now (a crash), and reap the process.
  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
  }

  /// Stops and starts again on the same port with the same store.
  void restart() {
    stop();
    start();
  }

  [[nodiscard]] bool running() const noexcept { return pid_ > 0; }
  [[nodiscard]] int port() const noexcept { return port_; }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] std::string url() const { return "nats://127.0.0.1:" + std::to_string(port_); }
  [[nodiscard]] std::filesystem::path log_path() const { return dir_ / "server.log"; }

 private:
  static std::string detail_binary() {
    auto b = server_binary();
    if (b.empty()) throw std::runtime_error("nats harness: nats-server not found");
    return b;
  }

  std::string name_;
  int port_;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
  std::string cluster_name_;
  int cluster_port_ = 0;
  std::vector<int> peers_;
};

/// A three-node JetStream cluster on loopback: routes between all nodes,
/// one cluster name, server names n0..n2. Started by the constructor.
class cluster {
 public:
  explicit cluster(std::size_t nodes = 3) {
    std::vector<int> route_ports;
    for (std::size_t i = 0; i < nodes; ++i) route_ports.push_back(detail::free_port());
    for (std::size_t i = 0; i < nodes; ++i) {
      std::string node_name = "n";  // appended, not operator+: g++ 12 warns falsely on "n" + to_string
      node_name += std::to_string(i);
      auto s = std::make_unique<server>(node_name);
      std::vector<int> peers;
      for (std::size_t j = 0; j < nodes; ++j)
        if (j != i) peers.push_back(route_ports[j]);
      s->set_cluster("pbc", route_ports[i], peers);
      servers_.push_back(std::move(s));
    }
    for (auto& s : servers_) s->start();
  }

  [[nodiscard]] server& node(std::size_t i) { return *servers_.at(i); }
  [[nodiscard]] std::size_t size() const noexcept { return servers_.size(); }
  /// Comma-separated URLs of every node (for a client's server list).
  [[nodiscard]] std::string urls() const {
    std::string out;
    for (auto& s : servers_) out += (out.empty() ? "" : ",") + s->url();
    return out;
  }
  /// The node whose server name is `name`, or null.
  [[nodiscard]] server* find(const std::string& name) {
    for (auto& s : servers_)
      if (s->name() == name) return s.get();
    return nullptr;
  }

 private:
  std::vector<std::unique_ptr<server>> servers_;
};

/// A crash and a recovery: SIGKILL `s` (nothing is flushed) and start it
/// again on the same port with the same store. Throws as `start` does.
inline void crash_restart(server& s) {
  s.kill();
  s.start();
}

}  // namespace postbox_test::nats
