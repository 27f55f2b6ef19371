// SPDX-License-Identifier: MIT
// Benchmark: postbox over NATS JetStream (envelopes, dedup publish, durable pull, request-reply) vs raw libnats on the same server.
//
// Starts its own nats-server (JetStream, file storage in a temporary
// directory, 127.0.0.1, random port) through tests/nats_harness.hpp and stops
// it at the end. Each scenario runs postbox and raw libnats alternately
// (which goes first flips per round); medians over the rounds and their
// ratio are printed. Absolute numbers on a shared VM swing a lot; quote ratios.
//
// Scenarios (same payload bytes both ways: the JSON of {n, what}):
//   publish    sync JetStream publish, one PubAck awaited per message.
//              postbox: jetstream_publisher (envelope headers + Nats-Msg-Id).
//              raw:     js_Publish of the JSON bytes, no headers.
//   e2e        end-to-end throughput: one thread publishes N (sync), another
//              fetches batches from a durable pull consumer and acks each
//              (AckSync); time until the last ack. postbox decodes envelopes.
//   latency    one message at a time: publish, fetch(1), decode, AckSync;
//              with default connections (a fetch's pull request is a plain
//              publish, so libnats' ~1 ms write batching shows) and with send_asap.
//   relay      outbox -> JetStream: N envelopes staged in a memory outbox
//              (not timed), then an outbox_relay drains them through
//              to_jetstream (decode the stored JSON, publish with Nats-Msg-Id,
//              PubAck each, mark dispatched per batch of 256).
//              raw: js_Publish of the same JSON bytes with a Nats-Msg-Id.
//   relay-pipe outbox -> JetStream pipelined (issue 18): the same staged
//              outbox drained by an outbox_relay through to_jetstream_pipelined
//              (js_PublishMsgAsync with Nats-Msg-Id, window 512 PubAcks,
//              batches of 4096, a row marked only after its PubAck; each NATS
//              message built from the stored JSON bytes, the payload checked
//              to convert to the typed payload unless --no-check-payload).
//              raw: the peer in its strongest configuration, js_PublishMsgAsync
//              of the same JSON bytes with a Nats-Msg-Id on a context with
//              MaxPending 4096, then js_PublishAsyncComplete (no store at all).
//              relay-hdr: the same raw loop sending postbox's exact NATS messages
//              (to_nats_msg: envelope headers + payload), to separate the cost of
//              the envelope format from the relay's own. Each round runs the
//              relay-pipe pair in two halves of N/2, ABBA (BAAB on odd rounds),
//              so a load that drifts through the round cancels; CPU per message
//              (client, server) is printed for all three, and the header
//              count and bytes each side puts on the wire.
//   relay-sql  relay-pipe drained from a SQLite outbox (WAL, synchronous=normal)
//              instead of the memory store, against the same raw figure.
//              `--only relay` runs just the relay scenarios, `--only pipe` just
//              relay-pipe and its raw peer; the stream is purged before each
//              pipelined run (not timed), `--messages N` sets the run length
//              (default 50000, about half a second), and the median of the
//              per-round ratios is printed with the load average. For callgrind,
//              the inclusive counts of postbox_relay_pipelined_drain,
//              raw_relay_async_plain and raw_relay_async_headers are the timed
//              parts alone (divide by the message count). The PubAck callback
//              runs on libnats' thread: js_pipeline::on_pub_ack's count adds to it.
//   request    request-reply round trip over core NATS: nats_requester /
//              nats_responder vs natsConnection_Request / a raw responder;
//              once with libnats' default write batching (its flusher waits
//              about 1 ms before a plain publish goes out; natsConnection_Request
//              skips it for the request), once on connections with send_asap.
#include <postbox/json.hpp>
#include <postbox/nats.hpp>
#include <postbox/nats_outbox.hpp>
#include <postbox/nats_request_reply.hpp>

#if __has_include(<sqlite3.h>)
#include <postbox/sqlite.hpp>
#define NATS_BENCH_SQLITE 1
#include <filesystem>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include "nats_harness.hpp"

namespace {

using bench_clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace pn = postbox_test::nats;

struct order {
  int n = 0;
  std::string what;
};
void to_json(nlohmann::json& j, const order& o) { j = {{"n", o.n}, {"what", o.what}}; }
void from_json(const nlohmann::json& j, order& o) {
  j.at("n").get_to(o.n);
  j.at("what").get_to(o.what);
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "nats_bench: %s\n", what);
  std::exit(1);
}

double seconds_since(bench_clock::time_point t0) { return std::chrono::duration<double>(bench_clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

// CPU time of this process (all its threads: the relay or raw loop, libnats'
// reader and flusher) and of the nats-server child, in seconds. On a shared
// VM wall-clock rates swing with the load; the CPU both sides burn per
// message swings much less, and on 2 cores it is what bounds the rate.
double self_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// utime + stime of `pid` from /proc (clock ticks); 0 when unreadable.
double proc_cpu_seconds(long pid) {
  if (pid <= 0) return 0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return 0;
  std::vector<std::string> f;  // fields after the command name: state is f[0], utime f[11], stime f[12]
  std::size_t at = close + 2;
  while (at < stat.size() && f.size() < 13) {
    const auto sp = stat.find(' ', at);
    f.push_back(stat.substr(at, sp - at));
    if (sp == std::string::npos) break;
    at = sp + 1;
  }
  if (f.size() < 13) return 0;
  return static_cast<double>(std::atoll(f[11].c_str()) + std::atoll(f[12].c_str())) /
         static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// The nats-server this process started (a child named nats-server).
long find_server_pid() {
  const std::string self = std::to_string(::getpid());
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto open = stat.find('('), close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    if (stat.substr(open + 1, close - open - 1) != "nats-server") continue;
    // after ") ": state, then ppid
    const auto ppid_at = stat.find(' ', close + 2);
    if (ppid_at == std::string::npos) continue;
    if (stat.substr(ppid_at + 1, stat.find(' ', ppid_at + 1) - ppid_at - 1) == self) return std::atol(name.c_str());
  }
  return 0;
}

long server_pid = 0;
// Client + server CPU seconds of the last pipelined run's timed part, and the server's share.
double last_run_cpu = 0, last_run_server_cpu = 0;
struct cpu_meter {
  double c0 = self_cpu_seconds(), s0 = proc_cpu_seconds(server_pid);
  void stop() const {
    last_run_server_cpu = proc_cpu_seconds(server_pid) - s0;
    last_run_cpu = self_cpu_seconds() - c0 + last_run_server_cpu;
  }
};

// The raw side's payload: exactly the bytes postbox puts in the body.
std::string raw_payload(int i) { return nlohmann::json(order{i, "widget"}).dump(); }

// One server and two connections (producer side, consumer side).
struct rig {
  pn::server srv;
  std::optional<postbox::nats_connection> a, b, fast_a, fast_b;  // a, b: libnats batching; fast_*: send_asap (postbox default)
  std::optional<postbox::jetstream> ja, jb, fast_ja, fast_jb;
  int run = 0;
  rig() {
    srv.start();
    postbox::nats_connection_options o;
    o.urls = srv.url();
    o.send_asap = false;  // libnats' default write batching
    a.emplace(o);
    b.emplace(o);
    o.send_asap = true;
    fast_a.emplace(o);
    fast_b.emplace(o);
    ja.emplace(*a);
    jb.emplace(*b);
    fast_ja.emplace(*fast_a);
    fast_jb.emplace(*fast_b);
    auto rc = postbox::errc::timeout;
    for (int i = 0; i < 100 && rc != postbox::errc::ok; ++i) {
      rc = ja->ensure_stream({"BENCH", {"bench.>"}});
      if (rc != postbox::errc::ok) pn::detail::pause_ms(100);
    }
    if (rc != postbox::errc::ok) die("cannot create the stream");
  }
  // A fresh subject and durable name per run, so runs do not see each other's messages.
  std::string next_subject() { return "bench.r" + std::to_string(++run); }
  // Empties the stream (not timed), so every pipelined run starts against
  // the same server state instead of a store that grows run after run.
  void purge() {
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (js_PurgeStream(ja->native(), "BENCH", nullptr, &jerr) != NATS_OK) die("purge the stream");
  }
};

// --- publish ---------------------------------------------------------------

double postbox_publish(rig& r, int n) {
  postbox::jetstream_publisher pub(*r.ja);
  const std::string subject = r.next_subject();
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i)
    if (!pub.publish(postbox::make_envelope(subject, order{i, "widget"}), subject).has_value()) die("postbox publish");
  return seconds_since(t0);
}

double raw_publish(rig& r, int n) {
  const std::string subject = r.next_subject();
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    const std::string body = raw_payload(i);
    jsPubAck* pa = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (js_Publish(&pa, r.ja->native(), subject.c_str(), body.data(), static_cast<int>(body.size()), nullptr,
                   &jerr) != NATS_OK)
      die("raw publish");
    jsPubAck_Destroy(pa);
  }
  return seconds_since(t0);
}

// --- end-to-end and latency ---------------------------------------------------

struct raw_pull {
  natsSubscription* sub = nullptr;
  raw_pull(postbox::jetstream& js, const std::string& subject) {
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = "BENCH";
    so.Config.AckPolicy = js_AckExplicit;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const std::string durable = "d" + subject.substr(subject.rfind('.') + 1);
    if (js_PullSubscribe(&sub, js.native(), subject.c_str(), durable.c_str(), nullptr, &so, &jerr) != NATS_OK)
      die("raw pull subscribe");
  }
  ~raw_pull() { natsSubscription_Destroy(sub); }
  // Fetches up to max, acks each; returns how many; sums n into checksum.
  int take(int max, long long& checksum) {
    natsMsgList list{};
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (natsSubscription_Fetch(&list, sub, max, 2000, &jerr) != NATS_OK) return 0;
    for (int i = 0; i < list.Count; ++i) {
      // The raw consumer parses the same JSON body (what any consumer must do).
      const auto j = nlohmann::json::parse(
          std::string_view(natsMsg_GetData(list.Msgs[i]), static_cast<std::size_t>(natsMsg_GetDataLength(list.Msgs[i]))));
      checksum += j.at("n").get<int>();
      if (natsMsg_AckSync(list.Msgs[i], nullptr, nullptr) != NATS_OK) die("raw ack");
    }
    const int c = list.Count;
    natsMsgList_Destroy(&list);
    return c;
  }
};

struct postbox_pull {
  postbox::jetstream_pull_source<order> src;
  postbox_pull(postbox::jetstream& js, const std::string& subject)
      : src(js, {"BENCH", "d" + subject.substr(subject.rfind('.') + 1), subject, 30000ms, -1}) {}
  int take(int max, long long& checksum) {
    auto got = src.fetch(max, 2000ms);
    if (!got.has_value()) return 0;
    for (auto& d : *got) {
      if (!d.has_value()) die("postbox decode");
      checksum += d->payload.n;
      if (d.ack() != postbox::errc::ok) die("postbox ack");
    }
    return static_cast<int>(got->size());
  }
};

template <class Pull, class Publish>
double end_to_end(rig& r, int n, Publish publish_one) {
  const std::string subject = r.next_subject();
  Pull pull(*r.jb, subject);
  long long checksum = 0;
  const auto t0 = bench_clock::now();
  std::thread consumer([&] {
    for (int got = 0, idle = 0; got < n && idle < 10;) {
      const int c = pull.take(256, checksum);
      got += c;
      idle = c == 0 ? idle + 1 : 0;
    }
  });
  for (int i = 0; i < n; ++i) publish_one(subject, i);
  consumer.join();
  const double s = seconds_since(t0);
  if (checksum != static_cast<long long>(n) * (n - 1) / 2) die("end-to-end checksum");
  return s;
}

double postbox_e2e(rig& r, int n) {
  postbox::jetstream_publisher pub(*r.ja);
  return end_to_end<postbox_pull>(r, n, [&](const std::string& subject, int i) {
    if (!pub.publish(postbox::make_envelope(subject, order{i, "widget"}), subject).has_value()) die("postbox publish");
  });
}

double raw_e2e(rig& r, int n) {
  return end_to_end<raw_pull>(r, n, [&](const std::string& subject, int i) {
    const std::string body = raw_payload(i);
    jsPubAck* pa = nullptr;
    if (js_Publish(&pa, r.ja->native(), subject.c_str(), body.data(), static_cast<int>(body.size()), nullptr,
                   nullptr) != NATS_OK)
      die("raw publish");
    jsPubAck_Destroy(pa);
  });
}

// Per-message latency samples in microseconds: publish one, fetch it, ack it.
template <class Pull, class Publish>
std::vector<double> latency(rig& r, int m, bool asap, Publish publish_one) {
  const std::string subject = r.next_subject();
  Pull pull(asap ? *r.fast_jb : *r.jb, subject);
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(m));
  long long checksum = 0;
  for (int i = 0; i < m; ++i) {
    const auto t0 = bench_clock::now();
    publish_one(subject, i);
    if (pull.take(1, checksum) != 1) die("latency fetch");
    us.push_back(seconds_since(t0) * 1e6);
  }
  return us;
}

std::vector<double> postbox_latency(rig& r, int m, bool asap) {
  postbox::jetstream_publisher pub(asap ? *r.fast_ja : *r.ja);
  return latency<postbox_pull>(r, m, asap, [&](const std::string& subject, int i) {
    if (!pub.publish(postbox::make_envelope(subject, order{i, "widget"}), subject).has_value()) die("postbox publish");
  });
}

std::vector<double> raw_latency(rig& r, int m, bool asap) {
  jsCtx* js = (asap ? *r.fast_ja : *r.ja).native();
  return latency<raw_pull>(r, m, asap, [&](const std::string& subject, int i) {
    const std::string body = raw_payload(i);
    jsPubAck* pa = nullptr;
    if (js_Publish(&pa, js, subject.c_str(), body.data(), static_cast<int>(body.size()), nullptr,
                   nullptr) != NATS_OK)
      die("raw publish");
    jsPubAck_Destroy(pa);
  });
}

// --- relay ------------------------------------------------------------------------

double postbox_relay(rig& r, int n) {
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{});
  const std::string subject = r.next_subject();
  for (int i = 0; i < n; ++i) {
    auto tx = store.begin();
    if (box.stage(tx, postbox::make_envelope(subject, order{i, "widget"})) != postbox::errc::ok ||
        tx.commit() != postbox::errc::ok)
      die("stage");
  }
  postbox::jetstream_publisher pub(*r.ja);  // subject = the envelope type
  postbox::relay_options ro;
  ro.batch_size = 256;
  postbox::outbox_relay relay(store, postbox::to_jetstream<order>(pub, postbox::json::codec{}), ro);
  const auto t0 = bench_clock::now();
  if (relay.drain() != static_cast<std::size_t>(n)) die("relay drain");
  return seconds_since(t0);
}

double raw_relay(rig& r, int n) {
  const std::string subject = r.next_subject();
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) ids.push_back(postbox::message_id::generate().to_string());
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    const std::string body = raw_payload(i);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = ids[static_cast<std::size_t>(i)].c_str();
    jsPubAck* pa = nullptr;
    if (js_Publish(&pa, r.ja->native(), subject.c_str(), body.data(), static_cast<int>(body.size()), &po,
                   nullptr) != NATS_OK)
      die("raw publish");
    jsPubAck_Destroy(pa);
  }
  return seconds_since(t0);
}

// The outbox a pipelined relay run drains: n envelopes staged (not timed).
struct staged_outbox {
  postbox::memory_store store;
  staged_outbox(rig& r, int n) {
    postbox::outbox box(store, postbox::json::codec{});
    const std::string subject = r.next_subject();
    for (int i = 0; i < n; ++i) {
      auto tx = store.begin();
      if (box.stage(tx, postbox::make_envelope(subject, order{i, "widget"})) != postbox::errc::ok ||
          tx.commit() != postbox::errc::ok)
        die("stage");
    }
  }
};

bool check_payload = true;  // --no-check-payload: jetstream_pipeline_options::check_payload off

// Only the drain (relay, lease, build, window, PubAcks, marking): what
// callgrind's inclusive count of this function measures.
[[gnu::noinline]] double postbox_relay_pipelined_drain(rig& r, staged_outbox& s, int n) {
  postbox::jetstream_pipeline_options po;  // subject = the envelope type
  po.window = 512;
  po.check_payload = check_payload;
  postbox::relay_options ro;
  ro.batch_size = 4096;
  postbox::outbox_relay relay(s.store, postbox::to_jetstream_pipelined<order>(*r.ja, postbox::json::codec{}, po), ro);
  const cpu_meter cpu;
  const auto t0 = bench_clock::now();
  if (relay.drain() != static_cast<std::size_t>(n)) die("pipelined relay drain");
  const double t = seconds_since(t0);
  cpu.stop();
  return t;
}

double postbox_relay_pipelined(rig& r, int n) {
  staged_outbox s(r, n);
  r.purge();
  return postbox_relay_pipelined_drain(r, s, n);
}

#ifdef NATS_BENCH_SQLITE
// The same drain from a SQLite outbox (WAL, synchronous=normal; claims on the
// read connection, leases and marks in write transactions): the store's share
// once the message build is cheap.
[[gnu::noinline]] double postbox_relay_pipelined_sqlite_drain(rig& r, postbox::sqlite_store& store, int n) {
  postbox::jetstream_pipeline_options po;
  po.window = 512;
  po.check_payload = check_payload;
  postbox::relay_options ro;
  ro.batch_size = 4096;
  postbox::outbox_relay relay(store, postbox::to_jetstream_pipelined<order>(*r.ja, postbox::json::codec{}, po), ro);
  const auto t0 = bench_clock::now();
  if (relay.drain() != static_cast<std::size_t>(n)) die("pipelined sqlite relay drain");
  return seconds_since(t0);
}

double postbox_relay_pipelined_sqlite(rig& r, int n) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("postbox_nats_bench_" + postbox::message_id::generate().to_string());
  std::filesystem::create_directories(dir);
  double t = 0;
  {
    postbox::sqlite_store_options so;
    so.synchronous = postbox::sqlite_synchronous::normal;
    postbox::sqlite_store store((dir / "outbox.db").string(), so);
    postbox::outbox box(store, postbox::json::codec{});
    const std::string subject = r.next_subject();
    auto tx = store.begin();
    for (int i = 0; i < n; ++i)
      if (box.stage(tx, postbox::make_envelope(subject, order{i, "widget"})) != postbox::errc::ok) die("stage");
    if (tx.commit() != postbox::errc::ok) die("stage commit");
    r.purge();
    t = postbox_relay_pipelined_sqlite_drain(r, store, n);
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return t;
}
#endif

struct raw_async_ctx {
  jsCtx* js = nullptr;
  std::atomic<int> failed{0};
  explicit raw_async_ctx(rig& r) {
    jsOptions o;
    jsOptions_Init(&o);
    o.PublishAsync.MaxPending = 4096;
    // A publish at MaxPending waits for room up to StallWait (default 200 ms)
    // and then fails: on a loaded VM, with the server still writing the
    // previous run's messages, that killed the bench. Wait as long as it takes.
    o.PublishAsync.StallWait = 30000;
    o.PublishAsync.ErrHandler = [](jsCtx*, jsPubAckErr*, void* closure) {
      static_cast<raw_async_ctx*>(closure)->failed.fetch_add(1, std::memory_order_relaxed);
    };
    o.PublishAsync.ErrHandlerClosure = this;
    if (natsConnection_JetStream(&js, r.a->native(), &o) != NATS_OK) die("raw async context");
  }
  ~raw_async_ctx() { jsCtx_Destroy(js); }
};

// with_headers: the raw side sends postbox's exact NATS message (to_nats_msg of
// a prepared envelope: its headers and payload), so the difference to the
// pipelined relay is the relay itself (lease, building the message from the
// stored row, window, marking).
// The raw side's input, prepared before the clock starts: ids and envelopes.
struct raw_async_input {
  std::string subject;
  std::vector<std::string> ids;
  std::vector<postbox::envelope<order>> envs;
  raw_async_input(rig& r, int n) : subject(r.next_subject()) {
    for (int i = 0; i < n; ++i) {
      envs.push_back(postbox::make_envelope(subject, order{i, "widget"}));
      ids.push_back(envs.back().id.to_string());
    }
  }
};

// The timed loop alone (callgrind's inclusive count of this function).
[[gnu::noinline]] double raw_relay_async_loop(raw_async_ctx& ctx, const raw_async_input& in, int n, bool with_headers) {
  const cpu_meter cpu;
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    natsMsg* msg = nullptr;
    if (with_headers) {
      auto m = postbox::to_nats_msg(in.envs[static_cast<std::size_t>(i)], in.subject);
      if (!m.has_value()) die("raw envelope msg");
      msg = m->release();
    } else {
      const std::string body = raw_payload(i);
      if (natsMsg_Create(&msg, in.subject.c_str(), nullptr, body.data(), static_cast<int>(body.size())) != NATS_OK)
        die("raw msg");
    }
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = in.ids[static_cast<std::size_t>(i)].c_str();
    if (js_PublishMsgAsync(ctx.js, &msg, &po) != NATS_OK) die("raw async publish");
    natsMsg_Destroy(msg);
  }
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = 30000;
  if (js_PublishAsyncComplete(ctx.js, &po) != NATS_OK || ctx.failed.load() != 0) die("raw async complete");
  const double t = seconds_since(t0);
  cpu.stop();
  return t;
}

// Separate symbols for the two raw forms, so callgrind's inclusive counts
// give each its own figure (raw_relay_async_plain: the peer of relay-pipe).
[[gnu::noinline]] double raw_relay_async_plain(raw_async_ctx& ctx, const raw_async_input& in, int n) {
  return raw_relay_async_loop(ctx, in, n, false);
}
[[gnu::noinline]] double raw_relay_async_headers(raw_async_ctx& ctx, const raw_async_input& in, int n) {
  return raw_relay_async_loop(ctx, in, n, true);
}

double raw_relay_async(rig& r, int n, bool with_headers = false) {
  raw_async_ctx ctx(r);
  const raw_async_input in(r, n);
  r.purge();
  return with_headers ? raw_relay_async_headers(ctx, in, n) : raw_relay_async_plain(ctx, in, n);
}

// What goes on the wire per message besides the protocol line: the header
// block (count and bytes, as libnats encodes it: "NATS/1.0\r\n", each
// "key: value\r\n", a closing "\r\n"), the subject and the payload, for the
// relay's message (to_nats_msg of a staged envelope: the test "a pipelined
// relay publishes each stored envelope as the same NATS message the bridge
// builds from it" pins that they match) and for raw with Nats-Msg-Id only.
// The server parses the header block and stores all of it with the message.
void print_wire_sizes(rig& r) {
  const std::string subject = r.next_subject();
  auto env = postbox::make_envelope(subject, order{12345, "widget"});
  auto msg = postbox::to_nats_msg(env, subject);
  if (!msg.has_value()) die("wire sizes msg");
  const char** keys = nullptr;
  int count = 0;
  std::size_t bytes = 10 + 2;  // "NATS/1.0\r\n" ... "\r\n"
  std::string names;
  if (natsMsgHeader_Keys(msg->get(), &keys, &count) == NATS_OK && keys != nullptr) {
    for (int i = 0; i < count; ++i) {
      const char* v = nullptr;
      if (natsMsgHeader_Get(msg->get(), keys[i], &v) != NATS_OK || v == nullptr) die("wire sizes header");
      bytes += std::strlen(keys[i]) + 2 + std::strlen(v) + 2;
      names += names.empty() ? "" : ", ";
      names += keys[i];
    }
    std::free(static_cast<void*>(keys));
  }
  const std::size_t raw_bytes = 10 + std::strlen("Nats-Msg-Id") + 2 + 36 + 2 + 2;
  std::printf("wire per message: relay %d headers, %zu header bytes (%s); raw 1 header, %zu header bytes; "
              "subject %zu bytes, payload %d bytes both\n",
              count, bytes, names.c_str(), raw_bytes, subject.size(), natsMsg_GetDataLength(msg->get()));
}

// --- request-reply --------------------------------------------------------------

std::vector<double> postbox_request(rig& r, int m, bool asap) {
  auto& client = asap ? *r.fast_a : *r.a;
  auto& service = asap ? *r.fast_b : *r.b;
  postbox::timer_service timers;
  const std::string subject = "rr.pb" + std::to_string(++r.run);
  postbox::nats_responder_options ro;
  ro.subject = subject;
  postbox::nats_responder<order, order> resp(
      service, [](const postbox::envelope<order>& e) { return order{e.payload.n + 1, e.payload.what}; }, ro);
  postbox::nats_requester_options qo;
  qo.subject = subject;
  postbox::nats_requester<order, order> req(client, timers, qo);
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(m));
  for (int i = 0; i < m; ++i) {
    const auto t0 = bench_clock::now();
    auto f = req.request(order{i, "widget"}, 10s);
    if (!f.has_value()) die("postbox request refused");
    auto o = f->get();
    if (!o.ok() || o.reply->payload.n != i + 1) die("postbox request");
    us.push_back(seconds_since(t0) * 1e6);
  }
  return us;
}

std::vector<double> raw_request(rig& r, int m, bool asap) {
  auto& client = asap ? *r.fast_a : *r.a;
  auto& service = asap ? *r.fast_b : *r.b;
  const std::string subject = "rr.raw" + std::to_string(++r.run);
  natsSubscription* sub = nullptr;
  // Raw responder: parse the JSON request, reply with n + 1 as JSON.
  auto on_msg = [](natsConnection* nc, natsSubscription*, natsMsg* msg, void*) {
    auto j = nlohmann::json::parse(
        std::string_view(natsMsg_GetData(msg), static_cast<std::size_t>(natsMsg_GetDataLength(msg))));
    const std::string body = nlohmann::json(order{j.at("n").get<int>() + 1, j.at("what").get<std::string>()}).dump();
    natsConnection_Publish(nc, natsMsg_GetReply(msg), body.data(), static_cast<int>(body.size()));
    natsMsg_Destroy(msg);
  };
  if (natsConnection_Subscribe(&sub, service.native(), subject.c_str(), on_msg, nullptr) != NATS_OK)
    die("raw subscribe");
  (void)service.flush(5000ms);
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(m));
  for (int i = 0; i < m; ++i) {
    const auto t0 = bench_clock::now();
    const std::string body = raw_payload(i);
    natsMsg* reply = nullptr;
    if (natsConnection_Request(&reply, client.native(), subject.c_str(), body.data(), static_cast<int>(body.size()),
                               10000) != NATS_OK)
      die("raw request");
    auto j = nlohmann::json::parse(
        std::string_view(natsMsg_GetData(reply), static_cast<std::size_t>(natsMsg_GetDataLength(reply))));
    if (j.at("n").get<int>() != i + 1) die("raw reply");
    natsMsg_Destroy(reply);
    us.push_back(seconds_since(t0) * 1e6);
  }
  natsSubscription_Unsubscribe(sub);
  natsSubscription_Destroy(sub);
  return us;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::string server_version() {
  std::string cmd = pn::server_binary() + " --version 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return "unknown";
  char buf[128] = {};
  const char* got = std::fgets(buf, sizeof buf, p);
  ::pclose(p);
  std::string v = got ? buf : "unknown";
  while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  int rounds = 5;
  bool quick = false;
  bool only_relay = false;
  bool only_pipe = false;  // --only pipe: just relay-pipe and its raw peer, interleaved
  int messages = 0;        // --messages N: per pipelined relay run (default 50000, quick 2000)
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else if (std::strcmp(argv[i], "--messages") == 0 && i + 1 < argc) messages = std::max(1, std::atoi(argv[++i]));
    else if (std::strcmp(argv[i], "--no-check-payload") == 0) check_payload = false;
    else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc && std::strcmp(argv[i + 1], "relay") == 0) {
      only_relay = true;
      ++i;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc && std::strcmp(argv[i + 1], "pipe") == 0) {
      only_relay = only_pipe = true;
      ++i;
    }
    else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--rounds N] [--only relay|pipe] [--messages N] [--no-check-payload]\n",
                   argv[0]);
      return 64;
    }
  }
  if (!pn::available()) {
    std::printf("nats_bench: nats-server not found: skipped\n");
    return 0;
  }
#if defined(__clang__)
  const char* compiler = "clang++ " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "g++ " __VERSION__;
#else
  const char* compiler = "unknown";
#endif
  std::printf("nats_bench: %s, optimized %s; cpu: %s, %u hardware threads\n", compiler,
#if defined(__OPTIMIZE__)
              "yes",
#else
              "NO (numbers are meaningless)",
#endif
              cpu_model().c_str(), std::thread::hardware_concurrency());
  std::printf("server: %s, JetStream file storage, 127.0.0.1; rounds %d%s%s\n", server_version().c_str(), rounds,
              quick ? ", quick" : "", check_payload ? "" : ", relay-pipe without check_payload");
  const int n = quick ? 300 : 2000;  // messages per throughput run
  const int m = quick ? 200 : 1000;  // samples per latency run
  // Messages per pipelined relay run: about half a second each way on the
  // reference VM (20000 made runs of 0.2 s, where one scheduling hiccup of the
  // server moved the ratio by 0.1).
  const int np = messages > 0 ? messages : quick ? 2000 : 50000;
  std::printf("load average at start: %s\n", load_average().c_str());

  rig r;
  std::vector<double> pub_pb, pub_raw, e2e_pb, e2e_raw, relay_pb, relay_raw, pipe_pb, pipe_raw, pipe_hdr, pipe_sql;
  std::vector<double> pipe_ratio;  // relay-pipe / raw per round (the two ran back to back)
  std::vector<double> cpu_ratio;   // raw / relay-pipe CPU per message per round
  std::vector<double> cpu_pb, cpu_raw;  // client + server CPU microseconds per message, per round
  std::vector<double> srv_pb, srv_raw;  // the server's part of it
  std::vector<double> cpu_hdr, srv_hdr;  // the same for relay-hdr (raw sending postbox's headers)
  server_pid = find_server_pid();
  std::vector<double> lat_pb[2], lat_raw[2], lat99_pb[2], lat99_raw[2];  // [0]: libnats batching, [1]: send_asap
  std::vector<double> rr_pb[2], rr_raw[2], rr99_pb[2], rr99_raw[2];  // [0]: libnats batching, [1]: send_asap
  for (int round = 0; round < rounds; ++round) {
    const bool pb_first = round % 2 == 0;  // interleave: who goes first flips each round
    auto both = [&](const std::function<void()>& p, const std::function<void()>& q) {
      if (pb_first) {
        p();
        q();
      } else {
        q();
        p();
      }
    };
    if (!only_pipe)
      both([&] { relay_pb.push_back(n / postbox_relay(r, n)); }, [&] { relay_raw.push_back(n / raw_relay(r, n)); });
    {
      // The pair runs ABBA (BAAB on odd rounds) in two halves of np
      // each: a load that drifts through the round (other work on the two
      // cores, the server's own flushes) cancels to first order instead of
      // favouring whichever side ran in the quieter half.
      const int half = std::max(1, np / 2);
      double t_pb = 0, t_raw = 0, c_pb = 0, s_pb = 0, c_raw = 0, s_raw = 0;
      auto pb_half = [&] {
        t_pb += postbox_relay_pipelined(r, half);
        c_pb += last_run_cpu;
        s_pb += last_run_server_cpu;
      };
      auto raw_half = [&] {
        t_raw += raw_relay_async(r, half);
        c_raw += last_run_cpu;
        s_raw += last_run_server_cpu;
      };
      both(pb_half, raw_half);
      both(raw_half, pb_half);
      const double sent = 2.0 * half;
      pipe_pb.push_back(sent / t_pb);
      cpu_pb.push_back(c_pb * 1e6 / sent);
      srv_pb.push_back(s_pb * 1e6 / sent);
      pipe_raw.push_back(sent / t_raw);
      cpu_raw.push_back(c_raw * 1e6 / sent);
      srv_raw.push_back(s_raw * 1e6 / sent);
    }
    if (!only_pipe)
      both([&] {
#ifdef NATS_BENCH_SQLITE
             pipe_sql.push_back(np / postbox_relay_pipelined_sqlite(r, np));
#endif
           },
           [&] {
             pipe_hdr.push_back(np / raw_relay_async(r, np, true));
             cpu_hdr.push_back(last_run_cpu * 1e6 / np);
             srv_hdr.push_back(last_run_server_cpu * 1e6 / np);
           });
    pipe_ratio.push_back(pipe_pb.back() / pipe_raw.back());
    cpu_ratio.push_back(cpu_raw.back() / cpu_pb.back());
    if (only_relay) {
      std::printf("  round %d/%d done: relay-pipe %.0f/s (%.2f s), raw %.0f/s (%.2f s), ratio %.2f; cpu per message "
                  "(client + server) %.1f us vs %.1f us, raw/pb %.2f\n",
                  round + 1, rounds, pipe_pb.back(), np / pipe_pb.back(), pipe_raw.back(), np / pipe_raw.back(),
                  pipe_ratio.back(), cpu_pb.back(), cpu_raw.back(), cpu_raw.back() / cpu_pb.back());
      continue;
    }
    both([&] { pub_pb.push_back(n / postbox_publish(r, n)); }, [&] { pub_raw.push_back(n / raw_publish(r, n)); });
    both([&] { e2e_pb.push_back(n / postbox_e2e(r, n)); }, [&] { e2e_raw.push_back(n / raw_e2e(r, n)); });
    for (int asap = 0; asap < 2; ++asap)
      both(
          [&] {
            auto v = postbox_latency(r, m, asap == 1);
            lat_pb[asap].push_back(median(v));
            lat99_pb[asap].push_back(percentile(v, 0.99));
          },
          [&] {
            auto v = raw_latency(r, m, asap == 1);
            lat_raw[asap].push_back(median(v));
            lat99_raw[asap].push_back(percentile(v, 0.99));
          });
    for (int asap = 0; asap < 2; ++asap)
      both(
          [&] {
            auto v = postbox_request(r, m, asap == 1);
            rr_pb[asap].push_back(median(v));
            rr99_pb[asap].push_back(percentile(v, 0.99));
          },
          [&] {
            auto v = raw_request(r, m, asap == 1);
            rr_raw[asap].push_back(median(v));
            rr99_raw[asap].push_back(percentile(v, 0.99));
          });
    std::printf("  round %d/%d done\n", round + 1, rounds);
  }

  std::printf("\n%-10s %-44s %14s %14s %9s\n", "scenario", "measure (median over rounds)", "postbox", "raw libnats",
              "pb/raw");
  auto row = [](const char* name, const char* what, double pb, double raw, const char* unit) {
    std::printf("%-10s %-44s %11.0f %-2s %11.0f %-2s %9.2f\n", name, what, pb, unit, raw, unit, pb / raw);
  };
  if (!relay_pb.empty()) row("relay", "outbox drained to JetStream, msgs/s", median(relay_pb), median(relay_raw), "/s");
  row("relay-pipe", "pipelined relay vs js_PublishMsgAsync, msgs/s", median(pipe_pb), median(pipe_raw), "/s");
  if (!pipe_hdr.empty())
    row("relay-hdr", "same, raw sends postbox's headers, msgs/s", median(pipe_pb), median(pipe_hdr), "/s");
  if (!pipe_sql.empty())
    row("relay-sql", "pipelined relay from SQLite vs the same raw, msgs/s", median(pipe_sql), median(pipe_raw), "/s");
  {
    std::vector<double> sorted = pipe_ratio;
    std::sort(sorted.begin(), sorted.end());
    std::printf("relay-pipe per round (pb/raw of the same round): median %.2f, min %.2f, max %.2f over %zu rounds of "
                "%d messages; load average at end: %s\n",
                median(pipe_ratio), sorted.front(), sorted.back(), sorted.size(), np, load_average().c_str());
    if (server_pid > 0) {
      std::vector<double> by_cpu = cpu_ratio;
      std::sort(by_cpu.begin(), by_cpu.end());
      std::printf("relay-pipe per round by cpu per message (raw/pb, client + server): median %.2f, min %.2f, max %.2f\n",
                  median(cpu_ratio), by_cpu.front(), by_cpu.back());
    }
    if (server_pid > 0) {
      std::printf("relay-pipe cpu (this process + nats-server, per message, median over rounds): postbox %.1f us "
                  "(server %.1f), raw %.1f us (server %.1f), raw/pb %.2f (1.00 = same cost, lower = postbox costlier)\n",
                  median(cpu_pb), median(srv_pb), median(cpu_raw), median(srv_raw), median(cpu_raw) / median(cpu_pb));
      // The round with the median total (the lower middle of an even count),
      // split into this process and the server.
      auto cpu_row = [](const char* what, const std::vector<double>& all, const std::vector<double>& srv) {
        if (all.empty()) return;
        std::vector<std::size_t> at(all.size());
        for (std::size_t i = 0; i < at.size(); ++i) at[i] = i;
        std::sort(at.begin(), at.end(), [&](std::size_t a, std::size_t b) { return all[a] < all[b]; });
        const std::size_t mid = at[(at.size() - 1) / 2];
        std::printf("  %-44s client %5.1f us  server %5.1f us  total %5.1f us\n", what, all[mid] - srv[mid], srv[mid],
                    all[mid]);
      };
      std::printf("cpu per message, the round with the median total:\n");
      cpu_row("relay-pipe (postbox relay)", cpu_pb, srv_pb);
      cpu_row("raw js_PublishMsgAsync, Nats-Msg-Id only", cpu_raw, srv_raw);
      cpu_row("raw js_PublishMsgAsync, postbox's header set", cpu_hdr, srv_hdr);
    }
    print_wire_sizes(r);
  }
  if (only_relay) return 0;
  row("publish", "sync JetStream publish, msgs/s", median(pub_pb), median(pub_raw), "/s");
  row("e2e", "publish + pull + AckSync pipeline, msgs/s", median(e2e_pb), median(e2e_raw), "/s");
  row("latency", "publish -> fetch -> ack, p50 us", median(lat_pb[0]), median(lat_raw[0]), "us");
  row("latency", "publish -> fetch -> ack, p99 us", median(lat99_pb[0]), median(lat99_raw[0]), "us");
  row("lat-asap", "same, connections with send_asap, p50 us", median(lat_pb[1]), median(lat_raw[1]), "us");
  row("lat-asap", "same, connections with send_asap, p99 us", median(lat99_pb[1]), median(lat99_raw[1]), "us");
  row("request", "request-reply round trip, p50 us", median(rr_pb[0]), median(rr_raw[0]), "us");
  row("request", "request-reply round trip, p99 us", median(rr99_pb[0]), median(rr99_raw[0]), "us");
  row("req-asap", "same, connections with send_asap, p50 us", median(rr_pb[1]), median(rr_raw[1]), "us");
  row("req-asap", "same, connections with send_asap, p99 us", median(rr99_pb[1]), median(rr99_raw[1]), "us");
  std::printf("pb/raw: throughput rows, postbox rate / raw rate (1.00 = same, lower = postbox slower);\n"
              "        latency rows, postbox time / raw time (1.00 = same, higher = postbox slower).\n");
  return 0;
}
