// SPDX-License-Identifier: MIT
// Two-process crash test over NATS JetStream: a producer relays a SQLite outbox to JetStream, a consumer handles the stream through a SQLite inbox, the parent SIGKILLs both; every staged message must end with exactly one effect.
//
// Run without arguments (the parent). It starts a nats-server (127.0.0.1,
// random port, temporary store) with stream CRASH on crash.>, then runs two
// kinds of children of this same program side by side:
//
// * producer ("producer <db> <url> <n>"): stages orders 1..n, one transaction
//   each holding an `orders` row and an outbox message (SQLite, one file),
//   printing "A <n>" after each commit; an outbox_relay thread publishes them
//   through `to_jetstream` (Nats-Msg-Id = the outbox id) and prints "p" after
//   each PubAck, "m" before marking a batch, "R" for a PubAck that says
//   duplicate. It exits with "DONE" once everything staged is dispatched.
// * consumer ("consumer <db> <url> <n>"): a postbox::consumer (two workers)
//   over `jetstream_consumer_source` on durable crash-worker (ack wait 2 s,
//   heartbeat), whose handler runs an inbox on its own SQLite file; the
//   handler's effect is `effects(id, n, count)` += 1 in the inbox's
//   transaction (not idempotent by itself). Every 17th order fails on its
//   first delivery after its write (rolled back, retried by a nak with
//   delay). It prints "h" entering the handler, "H <n>" after a commit, "D"
//   for a duplicate the inbox absorbed, "F" for a planned failure, and exits
//   with "DONE" once all n orders have an effect.
//
// The producer is killed at deterministic points between publish and mark
// (POSTBOX_CRASH_AT=before_mark:<k>, after_publish:<k>: the child SIGKILLs
// itself there) and once after a random number of lines, then run to the
// end. The consumer is SIGKILLed after a random number of lines 50 times (5
// under sanitizers), plus once at in_handler and after_commit, while the
// producer is still producing, then run to the end. The parent checks:
// integrity of both databases; n orders committed, none pending in the
// outbox; the stream holds exactly n messages (republished batches were
// absorbed by the duplicate window, and some were republished); every order
// has exactly one effect row with count 1 and no effect belongs to an
// unknown id; the inbox holds n ids; nothing was dead-lettered.
#include <postbox/consumer.hpp>
#include <postbox/inbox.hpp>
#include <postbox/json.hpp>
#include <postbox/nats_consumer.hpp>
#include <postbox/nats_outbox.hpp>
#include <postbox/sqlite.hpp>

#include "../nats_harness.hpp"
#include "../support.hpp"
#include "harness.hpp"

#include <poll.h>
#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;

constexpr const char* who = "nats_crash";
constexpr const char* stream_name = "CRASH";
constexpr const char* durable_name = "crash-worker";
constexpr const char* inbox_name = "crash-consumer";

struct crash_order {
  long long n = 0;
};
void to_json(nlohmann::json& j, const crash_order& o) { j = {{"n", o.n}}; }
void from_json(const nlohmann::json& j, crash_order& o) { j.at("n").get_to(o.n); }

postbox::sqlite_store open_store(const std::string& path) {
  postbox::sqlite_store_options options;
  options.synchronous = postbox::sqlite_synchronous::normal;  // a killed process loses nothing committed
  options.busy_timeout = std::chrono::milliseconds(10000);
  return postbox::sqlite_store(path, options);
}

void exec_or_die(postbox::sqlite_store& store, const char* sql) {
  auto tx = store.begin();
  if (tx.exec(sql) != postbox::errc::ok || tx.commit() != postbox::errc::ok) postbox_crash::die(who, tx.last_error());
}

postbox::nats_connection connect(const std::string& url) {
  postbox::nats_connection_options o;
  o.urls = url;
  o.name = "nats-crash";
  return postbox::nats_connection(std::move(o));
}

// ---- producer -------------------------------------------------------------

int run_producer(const std::string& db, const std::string& url, long long n) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  postbox_crash::crash_point crash;
  auto store = open_store(db);
  exec_or_die(store, "CREATE TABLE IF NOT EXISTS orders (n INTEGER PRIMARY KEY, message_id TEXT NOT NULL)");
  auto conn = connect(url);
  postbox::jetstream js(conn);
  postbox::publisher_options po;
  po.ack_timeout = 2000ms;
  po.max_attempts = 3;
  postbox::jetstream_publisher pub(js, po);

  postbox::relay_options ro;
  ro.batch_size = 16;
  ro.owner = "crash-relay";  // one relay process at a time: a restart takes its leases back at once
  ro.poll_interval = 20ms;
  ro.lease = 60s;
  ro.retry.initial_backoff = 20ms;
  ro.retry.max_backoff = 500ms;
  ro.on_point = [&](postbox::relay_point p, const postbox::stored_message*) {
    if (p == postbox::relay_point::published) {
      crash.hit("after_publish");
      postbox_crash::emit("p");
    } else if (p == postbox::relay_point::before_mark) {
      crash.hit("before_mark");
      postbox_crash::emit("m");
    }
  };
  postbox::jetstream_destination_options dopts;
  dopts.on_ack = [](const postbox::stored_message&, const postbox::publish_ack& a) {
    if (a.duplicate) postbox_crash::emit("R");
  };
  postbox::outbox_relay relay(store, postbox::to_jetstream<crash_order>(pub, postbox::json::codec{}, dopts), ro);
  relay.start();

  postbox::outbox box(store, postbox::json::codec{});
  long long next = 1;
  {
    auto tx = store.begin();
    auto max = tx.query_int64("SELECT COALESCE(MAX(n), 0) FROM orders");
    if (!max) postbox_crash::die(who, "max: " + tx.last_error());
    next = *max + 1;
  }
  for (long long i = next; i <= n; ++i) {
    auto env = postbox::make_envelope(std::string("crash.order"), crash_order{i});
    env.partition_key = "k" + std::to_string(i % 7);
    auto tx = store.begin();
    if (tx.exec("INSERT INTO orders VALUES (?1, ?2)", i, env.id.to_string()) != postbox::errc::ok)
      postbox_crash::die(who, "insert: " + tx.last_error());
    if (box.stage(tx, env) != postbox::errc::ok) postbox_crash::die(who, "stage: " + tx.last_error());
    if (tx.commit() != postbox::errc::ok) postbox_crash::die(who, "commit: " + tx.last_error());
    postbox_crash::emit("A " + std::to_string(i));
  }
  // Let the relay dispatch everything (a child's own completion check, not a test timing).
  for (;;) {
    auto s = store.outbox_summary();
    if (!s) postbox_crash::die(who, "summary: " + store.last_error());
    if (s->pending == 0) break;
    std::this_thread::sleep_for(5ms);
  }
  relay.stop();
  postbox_crash::emit("DONE");
  return 0;
}

// ---- consumer -------------------------------------------------------------

int run_consumer(const std::string& db, const std::string& url, long long n) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  postbox_crash::crash_point crash;
  auto store = open_store(db);
  exec_or_die(store,
              "CREATE TABLE IF NOT EXISTS effects (id TEXT PRIMARY KEY, n INTEGER NOT NULL, count INTEGER NOT NULL)");
  long long already = 0;
  {
    auto tx = store.begin();
    auto c = tx.query_int64("SELECT COUNT(*) FROM effects");
    if (!c) postbox_crash::die(who, "count: " + tx.last_error());
    already = *c;
  }
  postbox::inbox_options io;
  io.prune_interval = postbox::duration::zero();
  postbox::inbox in(store, inbox_name, io);

  std::mutex m;
  std::condition_variable cv;
  long long done = already;  // ids with an effect; guarded by m

  auto conn = connect(url);
  postbox::jetstream js(conn);
  postbox::consumer_options opts;
  opts.threads = 2;
  opts.max_in_flight = 32;
  opts.retry.max_attempts = 1000;  // failures here are planned and transient
  opts.retry.initial_backoff = 20ms;
  opts.retry.max_backoff = 200ms;
  const postbox::jetstream_consumer_options co{stream_name, durable_name, "crash.>", 2000ms,
                                               postbox::max_deliver_for(opts.retry)};
  postbox::dead_letter_queue<crash_order> dlq;
  postbox::consumer<crash_order> consumer(
      postbox::jetstream_consumer_source<crash_order>(js, co),
      [&](const postbox::envelope<crash_order>& env, postbox::consume_context& ctx) {
        postbox_crash::emit("h");
        crash.hit("in_handler");
        const bool fail = env.payload.n % 17 == 0 && ctx.attempt() == 1;
        const auto o = in.handle(env, [&](postbox::sqlite_store::transaction& tx) {
          if (tx.exec("INSERT INTO effects (id, n, count) VALUES (?1, ?2, 1)"
                      " ON CONFLICT (id) DO UPDATE SET count = count + 1",
                      env.id.to_string(), env.payload.n) != postbox::errc::ok)
            throw std::runtime_error(tx.last_error());
          if (fail) throw std::runtime_error("planned failure");
        });
        if (o.processed()) {
          crash.hit("after_commit");
          postbox_crash::emit("H " + std::to_string(env.payload.n));
          std::lock_guard lock(m);
          if (++done >= n) cv.notify_all();
        } else if (o.duplicate()) {
          postbox_crash::emit("D");
        } else {
          if (o.error != postbox::errc::handler_error) postbox_crash::die(who, "store failure: " + o.message);
          postbox_crash::emit("F");
          return postbox::settlement::retry(20ms);
        }
        return postbox::settlement::ack();
      },
      dlq, opts);
  {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return done >= n; });
  }
  (void)consumer.shutdown(2s);
  if (dlq.size() != 0) postbox_crash::emit("X " + std::to_string(dlq.size()));
  postbox_crash::emit("DONE");
  return 0;
}

// ---- parent ---------------------------------------------------------------

// One child process and what it has written.
struct proc {
  const char* role = "";
  std::optional<postbox_crash::child> c;
  std::uint64_t lines = 0;
  std::uint64_t kill_after = 0;  // 0: never killed by the parent
  std::string crash_at;          // deterministic point the child kills itself at
  bool done = false;             // printed DONE
};

struct tally {
  std::uint64_t acked = 0, published = 0, republished_dup = 0, handled = 0, duplicates = 0, failures = 0,
                dead_letters = 0;
};

int run_parent() {
  if (!pn::available()) {
    std::printf("nats_crash: nats-server not found: skipped\n");
    return 0;
  }
  const auto started = std::chrono::steady_clock::now();
  const long long n = static_cast<long long>(postbox_test::scaled(2000));
  const auto random_consumer_kills = static_cast<int>(postbox_test::scaled(50));
  const std::uint64_t seed = std::getenv("POSTBOX_SEED") ? std::strtoull(std::getenv("POSTBOX_SEED"), nullptr, 10)
                                                         : std::random_device{}();
  std::mt19937_64 rng(seed);
  const auto dir = std::filesystem::temp_directory_path() / ("postbox_nats_crash_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string producer_db = (dir / "producer.db").string();
  const std::string consumer_db = (dir / "consumer.db").string();

  pn::server srv("crash");
  srv.start();
  // A failed check below ends the run through die() (std::exit, which runs
  // no destructor of this frame): kill the server there, or it outlives the
  // test. The guard withdraws the hook when the server goes.
  static pn::server* running_server = nullptr;
  struct kill_server_on_die {
    explicit kill_server_on_die(pn::server& s) {
      running_server = &s;
      postbox_crash::before_die = [] { running_server->kill(); };
    }
    ~kill_server_on_die() {
      postbox_crash::before_die = nullptr;
      running_server = nullptr;
    }
    kill_server_on_die(const kill_server_on_die&) = delete;
    kill_server_on_die& operator=(const kill_server_on_die&) = delete;
  } const on_die(srv);
  const std::string url = srv.url();
  {
    // The connection (and its threads) ends before any fork below.
    auto conn = connect(url);
    postbox::jetstream js(conn);
    auto rc = postbox::errc::timeout;
    for (int i = 0; i < 100 && rc != postbox::errc::ok; ++i) {
      rc = js.ensure_stream({stream_name, {"crash.>"}});
      if (rc != postbox::errc::ok) pn::detail::pause_ms(100);
    }
    if (rc != postbox::errc::ok) postbox_crash::die(who, "cannot create the stream");
  }

  // Producer runs: three stops between publish and mark (after a batch was
  // published, in the middle of one, after the first batch of a restarted
  // relay, which republishes what the last run left unmarked), one random
  // kill, then to the end. The points come first, while most of the orders
  // are still to be staged, so every run reaches its point.
  std::deque<std::pair<std::string, std::uint64_t>> producer_plan{
      {"before_mark:" + std::to_string(1 + rng() % 2), 0},
      {"after_publish:" + std::to_string(1 + rng() % 8), 0},
      {"before_mark:1", 0},
      {"", 20 + rng() % 200},
      {"", 0}};
  // Consumer runs: random kills, two deterministic points among them, then to the end.
  std::deque<std::pair<std::string, std::uint64_t>> consumer_plan;
  for (int i = 0; i < random_consumer_kills; ++i) consumer_plan.emplace_back("", 1 + rng() % 40);
  consumer_plan.insert(consumer_plan.begin() + static_cast<long>(consumer_plan.size() / 3),
                       {"in_handler:" + std::to_string(1 + rng() % 10), 0});
  consumer_plan.insert(consumer_plan.begin() + static_cast<long>(2 * consumer_plan.size() / 3),
                       {"after_commit:" + std::to_string(1 + rng() % 10), 0});
  consumer_plan.emplace_back("", 0);

  tally t;
  int producer_runs = 0, consumer_runs = 0, producer_kills = 0, producer_points = 0, consumer_kills = 0,
      consumer_points = 0;
  proc producer, consumer;
  producer.role = "producer";
  consumer.role = "consumer";
  bool producer_finished = false, consumer_finished = false;

  auto on_line = [&](proc& p, const std::string& line) {
    ++p.lines;
    if (line == "DONE") p.done = true;
    if (&p == &producer) {
      if (line.rfind("A ", 0) == 0) ++t.acked;
      else if (line == "p") ++t.published;
      else if (line == "R") ++t.republished_dup;
    } else {
      if (line.rfind("H ", 0) == 0) ++t.handled;
      else if (line == "D") ++t.duplicates;
      else if (line == "F") ++t.failures;
      else if (line.rfind("X ", 0) == 0) t.dead_letters += std::stoull(line.substr(2));
    }
  };
  auto spawn = [&](proc& p, std::deque<std::pair<std::string, std::uint64_t>>& plan, const std::string& db) {
    auto [crash_at, kill_after] = plan.front();
    plan.pop_front();
    p.crash_at = crash_at;
    p.kill_after = kill_after;
    p.lines = 0;
    p.done = false;
    p.c = postbox_crash::spawn(who, {p.role, db, url, std::to_string(n)}, crash_at);
  };
  // The child ended (EOF): reap it and account for how.
  auto ended = [&](proc& p, bool killed_by_parent, int status) {
    p.c.reset();
    const bool is_producer = &p == &producer;
    if (killed_by_parent) {
      if (!postbox_crash::killed_by_sigkill(status) && !p.done)
        postbox_crash::die(who, std::string(p.role) + " ended with status " + std::to_string(status));
      ++(is_producer ? producer_kills : consumer_kills);
    } else if (postbox_crash::killed_by_sigkill(status)) {
      if (p.crash_at.empty()) postbox_crash::die(who, std::string(p.role) + " was killed by someone else");
      ++(is_producer ? producer_points : consumer_points);
    } else if (!postbox_crash::exited_ok(status) || !p.done) {
      postbox_crash::die(who, std::string(p.role) + " failed with status " + std::to_string(status));
    } else if (!p.crash_at.empty() && is_producer) {
      postbox_crash::die(who, "the producer never reached " + p.crash_at);
    }
    if (p.done) (is_producer ? producer_finished : consumer_finished) = true;
  };

  const auto give_up = started + std::chrono::seconds(240);  // hang guard, far above the expected run
  char buf[4096];
  while (!producer_finished || !consumer_finished) {
    if (std::chrono::steady_clock::now() > give_up) postbox_crash::die(who, "no completion within the hang guard");
    if (!producer.c && !producer_finished) {
      spawn(producer, producer_plan, producer_db);
      ++producer_runs;
    }
    if (!consumer.c && !consumer_finished) {
      if (consumer_plan.empty()) consumer_plan.emplace_back("", 0);
      spawn(consumer, consumer_plan, consumer_db);
      ++consumer_runs;
    }
    std::vector<pollfd> fds;
    std::vector<proc*> owners;
    for (proc* p : {&producer, &consumer})
      if (p->c) {
        fds.push_back(pollfd{p->c->out, POLLIN, 0});
        owners.push_back(p);
      }
    if (::poll(fds.data(), fds.size(), 1000) < 0 && errno != EINTR) postbox_crash::die(who, "poll");
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      proc& p = *owners[i];
      const ssize_t got = ::read(p.c->out, buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {  // EOF: the child ended by itself (done, or a deterministic crash point)
        ::close(p.c->out);
        ended(p, false, postbox_crash::wait_exit(who, p.c->pid));
        continue;
      }
      p.c->pending.append(buf, static_cast<std::size_t>(got));
      std::size_t nl = 0;
      bool kill_now = false;
      while ((nl = p.c->pending.find('\n')) != std::string::npos) {
        on_line(p, p.c->pending.substr(0, nl));
        p.c->pending.erase(0, nl + 1);
        if (p.kill_after != 0 && p.lines >= p.kill_after) {
          kill_now = true;
          break;
        }
      }
      if (kill_now) {
        const int status = postbox_crash::kill_and_reap(who, *p.c, [&](const std::string& l) { on_line(p, l); });
        ended(p, true, status);
      }
    }
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  // ---- checks ----
  int bad = 0;
  auto fail = [&](const std::string& what) {
    if (bad < 20) std::fprintf(stderr, "%s: %s\n", who, what.c_str());
    ++bad;
  };
  std::map<std::string, long long> orders;  // message id -> n
  {
    postbox::sqlite_store store(producer_db);
    auto report = store.integrity_check();
    if (!report || *report != "ok") fail("producer integrity_check: " + (report ? *report : store.last_error()));
    auto s = store.outbox_summary();
    if (!s || s->pending != 0) fail("messages left pending in the outbox");
    auto tx = store.begin();
    sqlite3_stmt* q = nullptr;
    sqlite3_prepare_v2(tx.connection(), "SELECT n, message_id FROM orders", -1, &q, nullptr);
    while (sqlite3_step(q) == SQLITE_ROW)
      orders[reinterpret_cast<const char*>(sqlite3_column_text(q, 1))] = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
  }
  if (static_cast<long long>(orders.size()) != n)
    fail("expected " + std::to_string(n) + " orders, found " + std::to_string(orders.size()));
  std::map<std::string, std::pair<long long, long long>> effects;  // id -> (n, count)
  std::size_t inbox_ids = 0;
  {
    postbox::sqlite_store store(consumer_db);
    auto report = store.integrity_check();
    if (!report || *report != "ok") fail("consumer integrity_check: " + (report ? *report : store.last_error()));
    auto ids = store.inbox_size(inbox_name);
    inbox_ids = ids ? *ids : 0;
    auto tx = store.begin();
    sqlite3_stmt* q = nullptr;
    sqlite3_prepare_v2(tx.connection(), "SELECT id, n, count FROM effects", -1, &q, nullptr);
    while (sqlite3_step(q) == SQLITE_ROW)
      effects[reinterpret_cast<const char*>(sqlite3_column_text(q, 0))] = {sqlite3_column_int64(q, 1),
                                                                           sqlite3_column_int64(q, 2)};
    sqlite3_finalize(q);
  }
  std::size_t exactly_once = 0;
  for (const auto& [id, on] : orders) {
    auto e = effects.find(id);
    if (e == effects.end()) {
      fail("order " + std::to_string(on) + " (" + id + ") had no effect");
    } else if (e->second.second != 1) {
      fail("order " + std::to_string(on) + " took effect " + std::to_string(e->second.second) + " times");
    } else if (e->second.first != on) {
      fail("the effect of " + id + " names order " + std::to_string(e->second.first));
    } else {
      ++exactly_once;
    }
  }
  for (const auto& [id, e] : effects)
    if (orders.count(id) == 0) fail("effect for an unknown message " + id);
  if (inbox_ids != orders.size()) fail("the inbox holds " + std::to_string(inbox_ids) + " ids");
  std::uint64_t in_stream = 0;
  {
    auto conn = connect(url);
    postbox::jetstream js(conn);
    auto m = js.stream_messages(stream_name);
    in_stream = m ? *m : 0;
  }
  if (static_cast<long long>(in_stream) != n) fail("the stream holds " + std::to_string(in_stream) + " messages");
  if (t.republished_dup == 0) fail("no republished message was absorbed by the duplicate window");
  if (producer_points < 3) fail("the producer did not stop at every deterministic point");
  if (consumer_kills == 0 || consumer_points < 2) fail("the consumer was not killed as planned");
  if (t.failures == 0) fail("no planned handler failure was exercised");
  if (t.dead_letters != 0) fail(std::to_string(t.dead_letters) + " messages were dead-lettered");

  std::printf(
      "nats_crash: seed %llu, %lld orders in %.1f s; producer: %d runs, %d stopped between publish and mark "
      "(before_mark/after_publish), %d random kills, %llu PubAcks, %llu republished and absorbed as duplicates; "
      "consumer: %d runs, %d random kills, %d at in_handler/after_commit, %llu handled, %llu duplicates absorbed by "
      "the inbox, %llu planned failures retried; stream %llu messages; %zu of %zu orders with exactly one effect; "
      "%d problems\n",
      static_cast<unsigned long long>(seed), n, elapsed, producer_runs, producer_points, producer_kills,
      static_cast<unsigned long long>(t.published), static_cast<unsigned long long>(t.republished_dup),
      consumer_runs, consumer_kills, consumer_points, static_cast<unsigned long long>(t.handled),
      static_cast<unsigned long long>(t.duplicates), static_cast<unsigned long long>(t.failures),
      static_cast<unsigned long long>(in_stream), exactly_once, orders.size(), bad);
  if (bad == 0 || std::getenv("POSTBOX_KEEP") == nullptr) std::filesystem::remove_all(dir);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "producer") return run_producer(argv[2], argv[3], std::atoll(argv[4]));
  if (argc == 5 && std::string(argv[1]) == "consumer") return run_consumer(argv[2], argv[3], std::atoll(argv[4]));
  std::signal(SIGPIPE, SIG_IGN);
  return run_parent();
}
