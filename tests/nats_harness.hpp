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
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
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

/// The bytes of `file`. Throws when it cannot be read.
inline std::string read_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("nats harness: cannot read " + file.string());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

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

  /// A configuration file the server reads (`-c`), for what has no
  /// command-line flag (TLS, users, permissions); the flags still set the
  /// address, port, store and name. Takes effect at the next start.
  void set_config_file(std::filesystem::path file) { config_file_ = std::move(file); }

  /// Starts the process and waits (bounded, ~10 s) until it says, in its own
  /// log, that it listens on its client port and the port accepts
  /// connections. Throws when it does not come up. (The port accepting alone
  /// is not proof: a server left running by a killed test process, whose
  /// port reservation died with it, may hold the port; this process then
  /// exits on "address already in use" and a client would talk to the other
  /// one.)
  void start() {
    if (pid_ > 0) return;
    std::vector<std::string> args{detail_binary(), "-a", "127.0.0.1", "-p", std::to_string(port_), "-js", "-sd",
                                  (dir_ / "store").string(), "--server_name", name_};
    if (!config_file_.empty()) args.insert(args.end(), {"-c", config_file_.string()});
    if (cluster_port_ > 0) {
      args.insert(args.end(), {"--cluster_name", cluster_name_, "--cluster",
                               "nats://127.0.0.1:" + std::to_string(cluster_port_)});
      std::string routes;
      for (int p : peers_) routes += (routes.empty() ? "" : ",") + std::string("nats://127.0.0.1:") + std::to_string(p);
      if (!routes.empty()) args.insert(args.end(), {"--routes", routes});
    }
    const std::string log = (dir_ / "server.log").string();
    std::error_code size_ec;
    const auto log_start = std::filesystem::file_size(log, size_ec);  // earlier runs' lines come before
    const std::uintmax_t log_from = size_ec ? 0 : log_start;
    const std::string listening = "Listening for client connections on 127.0.0.1:" + std::to_string(port_);
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
      if (detail::port_accepts(port_) && std::filesystem::exists(log)) {
        const std::string text = read_file(log);
        if (text.size() > log_from && text.find(listening, static_cast<std::size_t>(log_from)) != std::string::npos) return;
      }
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

  /// SIGTERM, then SIGKILL if the process has not exited within ~30 s.
  /// True when it exited on the SIGTERM (a clean stop: the server wrote its
  /// state); false when it had to be killed or was not running. The bound is
  /// generous because a clean stop that turns into a kill loses the durable
  /// consumers' ack state, which a loaded CI machine must not make happen.
  bool stop() {
    if (pid_ <= 0) return false;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 1500; ++i) {  // bounded: 1500 x 20 ms
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return true;
      }
      detail::pause_ms(20);
    }
    kill();
    return false;
  }

  /// SIGKILL now (a crash), and reap the process.
  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
  }

  /// Stops and starts again on the same port with the same store. True when
  /// the stop was clean (see stop()).
  bool restart() {
    const bool clean = stop();
    start();
    return clean;
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
  std::filesystem::path config_file_;
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

/// Writes `text` to `file` (replacing it). Throws when it cannot.
inline void write_file(const std::filesystem::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) throw std::runtime_error("nats harness: cannot write " + file.string());
}

/// Runs `command` through the shell with its output discarded; throws with
/// the command when it fails.
inline void run(const std::string& command) {
  if (std::system((command + " >/dev/null 2>&1").c_str()) != 0)
    throw std::runtime_error("nats harness: command failed: " + command);
}

/// True when the `openssl` command-line tool can run (certificates and
/// NKeys are generated with it at test time).
inline bool openssl_available() { return std::system("openssl version >/dev/null 2>&1") == 0; }

/// A temporary directory removed with everything in it at destruction.
class temp_dir {
 public:
  temp_dir() : path_(detail::make_temp_dir()) {}
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

/// Certificates made at test time with the openssl CLI (P-256 keys, valid
/// one day): a CA, a server certificate it signs for 127.0.0.1 and localhost,
/// a client certificate it signs, and a second, unrelated CA ("rogue") with
/// its own server certificate, for verification failures. File paths.
struct test_pki {
  std::string ca, server_cert, server_key, client_cert, client_key, rogue_ca, rogue_server_cert, rogue_server_key;
};

/// Generates a `test_pki` in `dir`. Throws when openssl fails.
inline test_pki make_test_pki(const temp_dir& dir) {
  const std::string p = (dir.path() / "").string();  // "<dir>/"
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  auto ca = [&](const std::string& name, const std::string& cn) {
    run("openssl req -x509 " + key + " -keyout " + p + name + ".key -out " + p + name + ".pem -days 1 -subj /CN=" +
        cn);
  };
  auto leaf = [&](const std::string& name, const std::string& cn, const std::string& issuer, const std::string& ext) {
    write_file(p + name + ".ext", ext + "\n");
    run("openssl req -new " + key + " -keyout " + p + name + ".key -out " + p + name + ".csr -subj /CN=" + cn);
    run("openssl x509 -req -in " + p + name + ".csr -CA " + p + issuer + ".pem -CAkey " + p + issuer +
        ".key -CAcreateserial -out " + p + name + ".pem -days 1 -extfile " + p + name + ".ext");
  };
  ca("ca", "postbox-test-ca");
  ca("rogue", "postbox-rogue-ca");
  const std::string server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth";
  leaf("server", "localhost", "ca", server_ext);
  leaf("rogue-server", "localhost", "rogue", server_ext);
  leaf("client", "postbox-client", "ca", "extendedKeyUsage=clientAuth");
  return {p + "ca.pem", p + "server.pem", p + "server.key", p + "client.pem", p + "client.key", p + "rogue.pem",
          p + "rogue-server.pem", p + "rogue-server.key"};
}

namespace detail {

/// CRC-16/XMODEM (polynomial 0x1021, initial 0), as NKeys append it.
inline std::uint16_t crc16(const std::string& bytes) {
  std::uint16_t crc = 0;
  for (const unsigned char c : bytes) {
    crc = static_cast<std::uint16_t>(crc ^ (c << 8));
    for (int i = 0; i < 8; ++i)
      crc = static_cast<std::uint16_t>((crc & 0x8000) != 0 ? (crc << 1) ^ 0x1021 : crc << 1);
  }
  return crc;
}

/// RFC 4648 base32 without padding, as NKeys are written.
inline std::string base32(const std::string& bytes) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  std::string out;
  unsigned buffer = 0;
  int bits = 0;
  for (const unsigned char c : bytes) {
    buffer = (buffer << 8) | c;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(buffer >> (bits - 5)) & 31u];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(buffer << (5 - bits)) & 31u];
  return out;
}

/// `payload` framed as an NKey: prefix bytes, payload, CRC-16 little-endian, base32.
inline std::string nkey_encode(std::string prefix, const std::string& payload) {
  std::string raw = std::move(prefix) + payload;
  const std::uint16_t crc = crc16(raw);
  raw += static_cast<char>(crc & 0xff);
  raw += static_cast<char>(crc >> 8);
  return base32(raw);
}

}  // namespace detail

/// An NKey: the public key ("U..." for a user, "A..." an account, "O..." an
/// operator) a server config or JWT names, the seed ("SU...") its owner signs
/// with, written to `seed_file`, and the same key as a PEM file for openssl.
struct user_nkey {
  std::string public_key, seed, seed_file, pem;
};

/// NKey type prefixes (the first base32 letter of a public key).
namespace nkey_type {
inline constexpr unsigned char user = 20 << 3;      // 'U'
inline constexpr unsigned char account = 0;         // 'A'
inline constexpr unsigned char operator_ = 14 << 3;  // 'O'
}  // namespace nkey_type

/// Generates an NKey of `type` (an Ed25519 key made by the openssl CLI,
/// framed as NKeys frame it) and writes its seed to `<dir>/<name>.nk`.
inline user_nkey make_nkey(const temp_dir& dir, const std::string& name, unsigned char type) {
  const std::string pem = dir.file(name + ".ed25519.pem");
  run("openssl genpkey -algorithm ed25519 -out " + pem);
  run("openssl pkey -in " + pem + " -outform DER -out " + pem + ".der");
  run("openssl pkey -in " + pem + " -pubout -outform DER -out " + pem + ".pub.der");
  const std::string priv = read_file(pem + ".der"), pub = read_file(pem + ".pub.der");
  if (priv.size() < 32 || pub.size() < 32) throw std::runtime_error("nats harness: unexpected Ed25519 DER");
  const std::string raw_seed = priv.substr(priv.size() - 32), raw_pub = pub.substr(pub.size() - 32);
  constexpr unsigned char seed_prefix = 18 << 3;  // 'S' in base32
  user_nkey k;
  k.public_key = detail::nkey_encode(std::string(1, static_cast<char>(type)), raw_pub);
  std::string two;
  two += static_cast<char>(seed_prefix | (type >> 5));
  two += static_cast<char>((type & 31) << 3);
  k.seed = detail::nkey_encode(two, raw_seed);
  k.seed_file = dir.file(name + ".nk");
  k.pem = pem;
  write_file(k.seed_file, k.seed + "\n");
  return k;
}

/// A user NKey (see make_nkey).
inline user_nkey make_user_nkey(const temp_dir& dir, const std::string& name) {
  return make_nkey(dir, name, nkey_type::user);
}

namespace detail {

/// RFC 4648 base64url without padding, as JWTs are written.
inline std::string base64url(const std::string& bytes) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  unsigned buffer = 0;
  int bits = 0;
  for (const unsigned char c : bytes) {
    buffer = (buffer << 8) | c;
    bits += 8;
    while (bits >= 6) {
      out += alphabet[(buffer >> (bits - 6)) & 63u];
      bits -= 6;
    }
  }
  if (bits > 0) out += alphabet[(buffer << (6 - bits)) & 63u];
  return out;
}

}  // namespace detail

/// A NATS JWT (header {"typ":"JWT","alg":"ed25519-nkey"}) with `claims`
/// (a JSON object text), signed by `issuer` with the openssl CLI.
inline std::string make_jwt(const temp_dir& dir, const user_nkey& issuer, const std::string& claims) {
  static int serial = 0;
  const std::string signing_input =
      detail::base64url(R"({"typ":"JWT","alg":"ed25519-nkey"})") + "." + detail::base64url(claims);
  const std::string in = dir.file("jwt-" + std::to_string(++serial) + ".in");
  write_file(in, signing_input);
  run("openssl pkeyutl -sign -rawin -inkey " + issuer.pem + " -in " + in + " -out " + in + ".sig");
  return signing_input + "." + detail::base64url(read_file(in + ".sig"));
}

/// Decentralized ("operator mode") authentication for a test server: an
/// operator, one account it signs and one user the account signs, as JWTs,
/// the server configuration lines that trust them (memory resolver), and the
/// user's `.creds` file (its JWT and seed, as nsc writes them).
struct operator_setup {
  user_nkey op, system, account, user;
  std::string operator_jwt, system_jwt, account_jwt, user_jwt, creds_file, config;
};

/// Builds an `operator_setup` in `dir`; `name` prefixes its files.
inline operator_setup make_operator_setup(const temp_dir& dir, const std::string& name) {
  operator_setup s;
  s.op = make_nkey(dir, name + "-operator", nkey_type::operator_);
  s.system = make_nkey(dir, name + "-system", nkey_type::account);  // JetStream needs a system account
  s.account = make_nkey(dir, name + "-account", nkey_type::account);
  s.user = make_nkey(dir, name + "-user", nkey_type::user);
  auto claims = [](const std::string& jti, const std::string& iss, const std::string& sub, const std::string& nats) {
    return R"({"jti":")" + jti + R"(","iat":1700000000,"iss":")" + iss + R"(","name":"postbox-test","sub":")" + sub +
           R"(","nats":)" + nats + "}";
  };
  s.operator_jwt = make_jwt(dir, s.op, claims("OPJTI", s.op.public_key, s.op.public_key,
                                              R"({"type":"operator","version":2})"));
  const std::string account_nats =
      R"({"limits":{"subs":-1,"data":-1,"payload":-1,"imports":-1,"exports":-1,"wildcards":true,"conn":-1,"leaf":-1},"type":"account","version":2})";
  s.system_jwt = make_jwt(dir, s.op, claims("SYJTI", s.op.public_key, s.system.public_key, account_nats));
  s.account_jwt = make_jwt(dir, s.op, claims("ACJTI", s.op.public_key, s.account.public_key, account_nats));
  s.user_jwt = make_jwt(dir, s.account,
                        claims("USJTI", s.account.public_key, s.user.public_key,
                               R"({"pub":{},"sub":{},"subs":-1,"data":-1,"payload":-1,"type":"user","version":2})"));
  s.creds_file = dir.file(name + ".creds");
  write_file(s.creds_file, "-----BEGIN NATS USER JWT-----\n" + s.user_jwt +
                               "\n------END NATS USER JWT------\n\n"
                               "-----BEGIN USER NKEY SEED-----\n" + s.user.seed +
                               "\n------END USER NKEY SEED------\n");
  s.config = "operator: \"" + s.operator_jwt + "\"\nsystem_account: " + s.system.public_key +
             "\nresolver: MEMORY\nresolver_preload: {\n  " + s.system.public_key + ": \"" + s.system_jwt + "\"\n  " +
             s.account.public_key + ": \"" + s.account_jwt + "\"\n}\n";
  return s;
}

}  // namespace postbox_test::nats
