// Scaling out: the same envelopes across two processes over NATS JetStream.
// Starts its own nats-server on a random loopback port (skips when none is
// installed) and forks a worker process; the parent publishes orders to a
// JetStream stream, the worker drains them from a durable pull consumer, and
// the parent asks the worker for the total with request-reply over NATS.
//
//   parent ──publish (Nats-Msg-Id)──> stream ORDERS ──pull + ack──> worker
//   parent ──request billing.total (reply: _INBOX.x.<corr>)──> worker ──reply─┘
#include <postbox/postbox.hpp>
#include <postbox/nats.hpp>
#include <postbox/nats_request_reply.hpp>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

using namespace std::chrono_literals;
namespace fs = std::filesystem;
extern char** environ;

struct order {
  int qty = 0;
  NLOHMANN_DEFINE_TYPE_INTRUSIVE(order, qty)
};

#ifndef POSTBOX_NATS_SERVER  // CMake passes the path it found
#define POSTBOX_NATS_SERVER "nats-server"
#endif

// Runs `nats-server -js` on 127.0.0.1 with a random port; its URL, or "" when none is installed.
std::string start_server(const fs::path& dir, pid_t& pid) {
  const std::string store = (dir / "store").string(), ports = dir.string(), log = (dir / "log").string();
  const char* argv[] = {POSTBOX_NATS_SERVER, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", store.c_str(),
                        "--ports_file_dir", ports.c_str(), "-l", log.c_str(), nullptr};
  if (::posix_spawnp(&pid, argv[0], nullptr, nullptr, const_cast<char**>(argv), environ) != 0) return "";
  for (int i = 0; i < 500; ++i, std::this_thread::sleep_for(20ms))  // the server writes its ports file when up
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".ports")
        if (auto j = nlohmann::json::parse(std::ifstream(e.path()), nullptr, false); j.contains("nats"))
          return j["nats"][0].get<std::string>();
  return "";
}

int worker(const std::string& url, int ready_fd) {  // the second process
  postbox::nats_connection conn({.urls = url});
  postbox::jetstream js(conn);
  (void)js.ensure_stream({"ORDERS", {"orders.>"}});
  postbox::jetstream_pull_source<order> orders(js, {"ORDERS", "billing", "orders.>"});
  int total = 0, got = 0;
  postbox::nats_responder<std::string, int> billing(
      conn, [&](const postbox::envelope<std::string>&) { return total; }, {.subject = "billing.total", .manual = true});
  (void)!::write(ready_fd, "r", 1);
  for (int i = 0; i < 20 && got < 3; ++i)
    if (auto batch = orders.fetch(3, 1s))
      for (auto& d : *batch) total += d->payload.qty, got += d.ack() == postbox::errc::ok;
  return billing.poll(30s) == 1 ? 0 : 1;  // answer once all orders are in
}

int main() {
  std::string tmpl = (fs::temp_directory_path() / "postbox-example-XXXXXX").string();
  const fs::path dir = ::mkdtemp(tmpl.data());
  pid_t server = 0;
  const std::string url = start_server(dir, server);
  if (url.empty()) {  // not installed (0), or installed but it never came up (1)
    if (server > 0) ::kill(server, SIGKILL), ::waitpid(server, nullptr, 0);
    fs::remove_all(dir);
    return server > 0 ? 1 : (std::puts("nats-server not installed: skipping the NATS bridge example"), 0);
  }
  int ready[2];
  if (::pipe(ready) != 0) return 1;
  const pid_t child = ::fork();  // before any libnats thread exists
  if (child == 0) ::_exit(worker(url, ready[1]));
  char c = 0;
  (void)!::read(ready[0], &c, 1);  // the worker has subscribed
  {
    postbox::nats_connection conn({.urls = url});
    postbox::jetstream js(conn);
    (void)js.ensure_stream({"ORDERS", {"orders.>"}});
    postbox::jetstream_publisher pub(js);
    int acked = 0;
    for (int qty : {2, 3, 5}) acked += pub.publish(postbox::make_envelope("orders.placed", order{qty})).has_value();
    std::printf("published %d orders to JetStream\n", acked);
    postbox::timer_service timers;  // request timeouts on the real clock
    postbox::nats_requester<std::string, int> ask(conn, timers, {.subject = "billing.total"});
    auto total = ask.request("total?", 30s)->get();
    std::printf("worker process replied: %s total=%d\n", std::string(postbox::to_string(total.status)).c_str(),
                total.ok() ? total.reply->payload : -1);
  }
  int st = 0;
  ::waitpid(child, &st, 0);
  ::kill(server, SIGTERM);
  ::waitpid(server, nullptr, 0);
  fs::remove_all(dir);
  std::printf("worker exited %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}
