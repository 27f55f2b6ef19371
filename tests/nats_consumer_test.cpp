// SPDX-License-Identifier: MIT
// Tests for postbox/nats_consumer.hpp: the consumer runtime over a JetStream durable, against real nats-server processes on 127.0.0.1.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/inbox.hpp>
#include <postbox/nats_consumer.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "support.hpp"

#include "nats_fixture.hpp"

namespace {

using order = postbox_test::nats::order;

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;
using source_t = postbox::jetstream_consumer_source<order>;

static_assert(postbox::consumer_source<source_t>, "the adapter satisfies the consumer's source concept");
static_assert(source_t::redelivers, "JetStream redelivers: the consumer hands retries to the server");
static_assert(std::is_same_v<source_t::payload_type, order>);

// The NATS fixture (server, connection, context, stream ORDERS on orders.>),
// plus publishing and reading a durable's state.
struct rig : pn::jetstream_rig {
  using pn::jetstream_rig::jetstream_rig;

  std::vector<postbox::message_id> publish(int from, int to) {
    postbox::jetstream_publisher pub(js);
    std::vector<postbox::message_id> ids;
    for (int i = from; i < to; ++i) {
      auto env = postbox::make_envelope("orders.placed", order{i});
      REQUIRE(pub.publish(env).has_value());
      ids.push_back(env.id);
    }
    return ids;
  }

  [[nodiscard]] postbox::durable_state state(const std::string& durable) {
    auto s = js.consumer_state("ORDERS", durable);
    REQUIRE(s.has_value());
    return *s;
  }
};

postbox::jetstream_consumer_options durable(const std::string& name, std::chrono::milliseconds ack_wait = 30s,
                                            int max_deliver = -1) {
  return {"ORDERS", name, "orders.>", ack_wait, max_deliver};
}

postbox::consumer_options threaded(std::size_t threads = 1, std::size_t max_in_flight = 16) {
  postbox::consumer_options o;
  o.threads = threads;
  o.max_in_flight = max_in_flight;
  o.jitter_seed = 7;
  return o;
}

// Handler invocations, recorded from worker threads.
struct journal {
  mutable std::mutex m;
  std::vector<std::pair<int, std::uint32_t>> runs;  // (payload n, attempt)
  void add(int n, std::uint32_t attempt) {
    std::lock_guard lock(m);
    runs.emplace_back(n, attempt);
  }
  std::size_t size() const {
    std::lock_guard lock(m);
    return runs.size();
  }
  std::vector<std::pair<int, std::uint32_t>> all() const {
    std::lock_guard lock(m);
    return runs;
  }
};

// A consumer of one durable with its own dead-letter queue and the source's
// monitor, whose handler journals (payload n, attempt) and then runs `then`
// (which may return a settlement). Members in construction order: the
// consumer last, so it is stopped first.
struct journaled {
  journal j;
  postbox::dead_letter_queue<order> dlq;
  postbox::jetstream_source_monitor mon;
  postbox::consumer<order> c;

  template <class Then>
  journaled(source_t src, Then then, postbox::consumer_options o = threaded())
      : mon(src.monitor()),
        c(
            std::move(src),
            [this, then](const postbox::envelope<order>& e, postbox::consume_context& ctx) {
              j.add(e.payload.n, ctx.attempt());
              return then(e, ctx);
            },
            dlq, std::move(o)) {}
};

// A consumer of one durable whose handler applies each message through an
// idempotent inbox (memory store, outliving the consumer's restarts):
// `effects` counts the handler's effect per payload n (run only for an id new
// to the inbox), `runs` the deliveries handed to the handler per n.
struct inboxed {
  postbox::memory_store store;
  postbox::inbox<postbox::memory_store> in{store, "effects"};
  mutable std::mutex m;
  std::map<int, int> effects, runs;  // guarded by m
  postbox::dead_letter_queue<order> dlq;
  std::optional<postbox::jetstream_source_monitor> mon;
  std::optional<postbox::consumer<order>> c;  // stopped before the inbox goes
  std::string durable_name;
  std::function<void(int)> gate;  // when set, runs first in the handler with the payload n

  ~inboxed() { c.reset(); }

  // Starts a consumer over `src` (stopping the previous one first).
  void start(source_t src, std::string durable, postbox::consumer_options opts = threaded(2)) {
    c.reset();
    durable_name = std::move(durable);
    mon.emplace(src.monitor());
    c.emplace(
        std::move(src),
        [this](const postbox::envelope<order>& e) {
          if (gate) gate(e.payload.n);
          {
            std::lock_guard lock(m);
            ++runs[e.payload.n];
          }
          const auto outcome = in.handle(e, [&](postbox::memory_store::transaction&) {
            std::lock_guard lock(m);
            ++effects[e.payload.n];
          });
          return outcome.failed() ? postbox::settlement::retry() : postbox::settlement::ack();
        },
        dlq, std::move(opts));
  }
  [[nodiscard]] int runs_of(int n) const {
    std::lock_guard lock(m);
    auto it = runs.find(n);
    return it == runs.end() ? 0 : it->second;
  }
  [[nodiscard]] std::size_t total_runs() const {
    std::lock_guard lock(m);
    std::size_t k = 0;
    for (const auto& [n, r] : runs) k += static_cast<std::size_t>(r);
    return k;
  }
  [[nodiscard]] std::map<int, int> effect_counts() const {
    std::lock_guard lock(m);
    return effects;
  }
  // Nothing more will happen: `distinct` messages had their effect, the
  // durable has nothing to deliver or redeliver (false while the server
  // cannot answer), and every delivery handed to the handler was settled by
  // an ack the server confirmed or refused.
  [[nodiscard]] bool quiet(int distinct, postbox::jetstream& js) const {
    if (effect_counts().size() != static_cast<std::size_t>(distinct)) return false;
    auto s = js.consumer_state("ORDERS", durable_name);
    if (!s.has_value() || s->pending != 0 || s->ack_pending != 0) return false;
    const auto st = mon->stats();
    return st.acked + st.ack_failures == static_cast<std::uint64_t>(total_runs());
  }
};

}  // namespace

TEST_CASE("max_deliver_for gives the retry policy's attempts plus slack so the consumer decides dead-lettering",
          "[nats][nats_consumer]") {
  postbox::retry_policy p;
  p.max_attempts = 5;
  STATIC_REQUIRE(postbox::max_deliver_for(postbox::retry_policy{}) == 8);
  CHECK(postbox::max_deliver_for(p) == 8);
  CHECK(postbox::max_deliver_for(p, 0) == 5);
  p.max_attempts = 0;  // the consumer then allows one attempt
  CHECK(postbox::max_deliver_for(p, 0) == 1);
  p.max_attempts = 0xffffffffu;
  CHECK(postbox::max_deliver_for(p) == -1);  // beyond the server's int: unlimited
}

TEST_CASE("the redelivery guard counts a repeated NumDelivered as one more delivery", "[nats][nats_consumer]") {
  postbox::detail::js_delivery_counts counts(16);
  CHECK(counts.observe(7, 1) == 1);
  CHECK(counts.observe(7, 2) == 2);
  CHECK(counts.observe(7, 2) == 3);  // the server repeated 2: the third delivery here
  CHECK(counts.observe(7, 2) == 4);
  CHECK(counts.observe(9, 1) == 1);  // another sequence counts on its own
  CHECK(counts.size() == 2);
}

TEST_CASE("the redelivery guard takes the server's count when it is ahead", "[nats][nats_consumer]") {
  postbox::detail::js_delivery_counts counts(16);
  CHECK(counts.observe(7, 1) == 1);
  CHECK(counts.observe(7, 5) == 5);  // deliveries this source never saw (another member, an expired pull)
  CHECK(counts.observe(7, 3) == 6);
}

TEST_CASE("the redelivery guard forgets a sequence once it is settled for good", "[nats][nats_consumer]") {
  postbox::detail::js_delivery_counts counts(16);
  CHECK(counts.observe(7, 1) == 1);
  counts.forget(7);
  CHECK(counts.size() == 0);
  CHECK(counts.observe(7, 1) == 1);  // e.g. a new durable delivering it again
  counts.forget(8);                  // unknown: nothing happens
  CHECK(counts.size() == 1);
}

TEST_CASE("the redelivery guard is bounded and forgets the lowest sequence first", "[nats][nats_consumer]") {
  postbox::detail::js_delivery_counts counts(2);
  CHECK(counts.observe(1, 1) == 1);
  CHECK(counts.observe(2, 1) == 1);
  CHECK(counts.observe(3, 1) == 1);
  CHECK(counts.size() == 2);
  CHECK(counts.observe(3, 1) == 2);  // still remembered
  CHECK(counts.observe(2, 1) == 2);
  CHECK(counts.observe(1, 1) == 1);  // forgotten (it was the lowest)
  CHECK(counts.size() == 2);
}

TEST_CASE("the redelivery guard with capacity zero passes the server's count through", "[nats][nats_consumer]") {
  postbox::detail::js_delivery_counts counts(0);
  CHECK(counts.observe(7, 2) == 2);
  CHECK(counts.observe(7, 2) == 2);
  CHECK(counts.size() == 0);
}

TEST_CASE("attempts strictly increase across naks until the handler acks", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const int n = 4;
  constexpr std::uint32_t last = 5;
  r.publish(0, n);
  postbox::retry_policy policy;
  policy.max_attempts = 20;  // the handler, not the policy, ends the retries
  auto opts = threaded(2);
  opts.retry = policy;
  journaled t(
      source_t(r.js, durable("naks", 30s, postbox::max_deliver_for(policy))),
      [](const postbox::envelope<order>&, postbox::consume_context& ctx) {
        return ctx.attempt() < last ? postbox::settlement::retry(postbox::duration(0)) : postbox::settlement::ack();
      },
      opts);
  REQUIRE(postbox_test::eventually([&] { return t.c.stats().acked == static_cast<std::uint64_t>(n); }));
  std::map<int, std::vector<std::uint32_t>> attempts;
  for (const auto& [k, attempt] : t.j.all()) attempts[k].push_back(attempt);
  CAPTURE(t.mon.stats().recounted, t.mon.stats().naked);
  REQUIRE(attempts.size() == static_cast<std::size_t>(n));
  for (const auto& [k, seen] : attempts) {
    CAPTURE(k);
    CHECK(seen.front() == 1);
    CHECK(std::adjacent_find(seen.begin(), seen.end(), std::greater_equal<>()) == seen.end());  // strictly increasing
    CHECK(seen.back() == last);
  }
  REQUIRE(postbox_test::eventually([&] { return r.state("naks").ack_pending == 0; }));
  CHECK(t.dlq.size() == 0);
}

TEST_CASE("an acked delivery is confirmed by the server before the consumer counts it, first attempt 1",
          "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 3);
  journaled t(source_t(r.js, durable("acker")), [](auto&, auto&) { return postbox::settlement::ack(); });
  REQUIRE(postbox_test::eventually([&] { return t.c.stats().acked == 3; }));
  // AckSync returned before the consumer counted: the server has nothing pending.
  const auto st = r.state("acker");
  CHECK(st.ack_pending == 0);
  CHECK(st.redelivered == 0);
  CHECK(t.mon.stats().acked == 3);
  for (const auto& [n, attempt] : t.j.all()) CHECK(attempt == 1);
  CHECK(t.c.source_name() == "acker");
}

TEST_CASE("after a clean server stop and restart no acknowledged message is delivered again",
          "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r(pn::settings().quick());
  const int n = 200;
  r.publish(0, n);
  inboxed t;
  t.start(source_t(r.js, durable("clean", 1000ms)), "clean");
  REQUIRE(postbox_test::eventually([&] { return t.quiet(n, r.js); }));
  const std::size_t before = t.total_runs();  // n, unless an ack wait ran out under load
  // SIGTERM: the server writes the durable's state before it exits. A stop
  // that had to end in SIGKILL would be the crash case below, not this one.
  const bool clean_stop = r.srv.restart();
  REQUIRE(clean_stop);
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::connected; }));
  r.publish(n, n + 1);  // a marker behind the acknowledged ones
  REQUIRE(postbox_test::eventually([&] { return t.quiet(n + 1, r.js); }, 60s));
  CHECK(t.runs_of(n) == 1);
  CHECK(t.total_runs() - before == 1);  // the marker alone: no acknowledged message came back
  CHECK(t.effect_counts().size() == static_cast<std::size_t>(n + 1));
}

TEST_CASE("after a SIGKILL of the server acknowledged messages may come back and the inbox applies each effect once",
          "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r(pn::settings().quick());
  const int n = 200;
  r.publish(0, n);
  inboxed t;
  t.start(source_t(r.js, durable("killed", 1000ms)), "killed");
  REQUIRE(postbox_test::eventually([&] { return t.quiet(n, r.js); }));
  const std::size_t before = t.total_runs();  // n, unless an ack wait ran out under load
  // Every ack returned ok (AckSync: the server confirmed it). nats-server
  // 2.9.10 with file storage keeps the durable's ack state asynchronously, so
  // a crash now may forget some of those acks.
  pn::crash_restart(r.srv);
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::connected; }));
  r.publish(n, n + 1);  // a marker behind the acknowledged ones
  REQUIRE(postbox_test::eventually([&] { return t.quiet(n + 1, r.js); }, 60s));
  const auto effects = t.effect_counts();
  CHECK(effects.size() == static_cast<std::size_t>(n + 1));
  std::size_t not_once = 0;
  for (const auto& [k, count] : effects) not_once += count == 1 ? 0 : 1;
  CHECK(not_once == 0);
  // Each delivery beyond the first of a message reached the handler and was
  // absorbed by the inbox as a duplicate.
  CHECK(t.in.stats().duplicates == t.total_runs() - static_cast<std::size_t>(n + 1));
  const std::size_t again = t.total_runs() - before - 1;
  CHECK(t.dlq.size() == 0);
  // Not required: how many acknowledged messages came back depends on when the
  // server last wrote the durable's state (the issue saw 192 of 200).
  WARN("acknowledged before the SIGKILL and delivered again: " << again << " of " << n);
}

TEST_CASE("retry(after) naks with that delay and the redelivery carries the next attempt",
          "[nats][nats_consumer][realtime]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 2);  // 0 first, then 1
  // Each receive's pull request waits 5 s, longer than the nak delay below, so
  // a redelivery always finds one that has not expired. nats-server 2.9.10
  // (fixed in 2.10.16: nats-io/nats-server#5305, #5338) mishandles a
  // redelivery that falls due while the source's only pull request has just
  // expired: it keeps the message pending until the ack wait (30 s) and
  // instead delivers the durable's latest stream message again as new,
  // NumDelivered 1. With the default 20 ms slices, message 0's redelivery hit
  // that gap about once in 30 runs under ASan and load: message 1 (already
  // acked) came a third time and message 0 stayed pending. Shutdown waits for
  // the current slice (~5 s).
  auto opts = threaded();
  opts.receive_wait = 5s;
  journaled t(
      source_t(r.js, durable("retrier")),
      [](const postbox::envelope<order>& e, postbox::consume_context& ctx) {
        if (ctx.attempt() > 1) return postbox::settlement::ack();
        // Message 0 waits 2 s on the server, message 1 comes back at once:
        // the second deliveries arrive in the opposite order of the stream.
        return postbox::settlement::retry(e.payload.n == 0 ? postbox::duration(2s) : postbox::duration(0));
      },
      opts);
  REQUIRE(postbox_test::eventually([&] { return t.j.size() == 4; }));
  const auto runs = t.j.all();
  // When a redelivery is mishandled as above and the message is itself the
  // latest one, it comes back with NumDelivered 1 again; the source's
  // redelivery guard counts such a delivery one higher, so the attempts are exact.
  CHECK(runs[2] == std::pair<int, std::uint32_t>{1, 2});
  CHECK(runs[3] == std::pair<int, std::uint32_t>{0, 2});
  REQUIRE(postbox_test::eventually([&] { return t.c.stats().acked == 2; }));
  CHECK(t.mon.stats().naked == 2);
  CHECK(t.c.stats().retried == 2);
  REQUIRE(postbox_test::eventually([&] { return r.state("retrier").ack_pending == 0; }));
  CHECK(t.dlq.size() == 0);
}

TEST_CASE("reject terms the message on the server after the consumer dead-lettered it locally",
          "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 1);
  journaled t(source_t(r.js, durable("rejecter")),
              [](auto&, auto&) { return postbox::settlement::reject("invalid order"); });
  REQUIRE(postbox_test::eventually([&] { return t.dlq.size() == 1; }));
  const auto d = t.dlq.list().front();
  CHECK(d.reason == "invalid order");
  CHECK(d.source == "rejecter");
  CHECK(d.attempts == 1);
  REQUIRE(d.message.has_value());
  CHECK(d.message->payload.n == 0);
  // Term is fire-and-forget: the server forgets the message shortly after.
  REQUIRE(postbox_test::eventually([&] { return t.mon.stats().termed == 1 && r.state("rejecter").ack_pending == 0; }));
  CHECK(r.state("rejecter").redelivered == 0);
  CHECK(t.j.size() == 1);
}

TEST_CASE("an undecodable message is dead-lettered locally as poison with its bytes and termed",
          "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  // A valid envelope whose payload is a string, read as an order: the payload does not decode.
  postbox::jetstream_publisher pub(r.js);
  REQUIRE(pub.publish(postbox::make_envelope("orders.placed", std::string("not an order"))).has_value());
  r.publish(1, 2);  // a good one behind it
  journaled t(source_t(r.js, durable("poison")), [](auto&, auto&) {});
  REQUIRE(postbox_test::eventually([&] { return t.dlq.size() == 1 && t.j.size() == 1; }));
  const auto d = t.dlq.list().front();
  CHECK_FALSE(d.message.has_value());
  CHECK(d.reason == "parse_error");
  CHECK(d.raw == "\"not an order\"");
  CHECK(d.source == "poison");
  CHECK(t.c.stats().poison == 1);
  REQUIRE(postbox_test::eventually([&] { return t.mon.stats().termed == 1 && r.state("poison").ack_pending == 0; }));
  CHECK(t.mon.stats().malformed == 1);
  CHECK(r.state("poison").redelivered == 0);
}

TEST_CASE("a message failing every attempt is dead-lettered after max_attempts deliveries and termed",
          "[nats][nats_consumer][realtime]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 1);
  postbox::retry_policy policy;
  policy.max_attempts = 3;
  policy.initial_backoff = 10ms;
  policy.full_jitter = false;
  auto opts = threaded();
  opts.retry = policy;
  journaled t(
      source_t(r.js, durable("exhaust", 30s, postbox::max_deliver_for(policy))),
      [](auto&, auto&) { throw std::runtime_error("downstream unavailable"); }, opts);
  REQUIRE(postbox_test::eventually([&] { return t.dlq.size() == 1; }));
  const auto d = t.dlq.list().front();
  std::string attempts_seen;
  for (const auto& run : t.j.all()) attempts_seen += std::to_string(run.second) + " ";
  CAPTURE(attempts_seen, t.mon.stats().naked, t.mon.stats().released, r.state("exhaust").redelivered);
  CHECK(d.reason == "retries_exhausted");
  CHECK(d.error == "downstream unavailable");
  REQUIRE(postbox_test::eventually([&] { return t.mon.stats().termed == 1 && r.state("exhaust").ack_pending == 0; }));
  // attempt = NumDelivered, one per delivery, also when the server repeats a
  // count (the redelivery guard; see the retry(after) case).
  const auto runs = t.j.all();
  CHECK(d.attempts == 3);
  REQUIRE(runs.size() == 3);
  for (std::size_t i = 0; i < runs.size(); ++i) CHECK(runs[i].second == i + 1);
  CHECK(t.mon.stats().naked == 2);
}

TEST_CASE("the heartbeat keeps a slow handler's message from being redelivered past its ack wait",
          "[nats][nats_consumer][realtime]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 1);
  // Two workers: a redelivery would run on the second while the first is held.
  journaled t(
      source_t(r.js, durable("slow", 1000ms)),  // heartbeat every ~333 ms
      [&](auto&, auto&) {
        // Hold the message for six heartbeats (~2 s, twice the ack wait).
        (void)postbox_test::eventually([&] { return t.mon.stats().in_progress >= 6; });
      },
      threaded(2));
  REQUIRE(postbox_test::eventually([&] { return t.c.stats().acked == 1; }));
  CHECK(t.mon.stats().in_progress >= 6);
  CHECK(t.j.size() == 1);
  const auto st = r.state("slow");
  CHECK(st.redelivered == 0);
  CHECK(st.ack_pending == 0);
}

TEST_CASE("without the heartbeat a handler slower than the ack wait sees its message redelivered",
          "[nats][nats_consumer][realtime]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 1);
  postbox::jetstream_source_options so;
  so.heartbeat = -1ms;
  journaled t(
      source_t(r.js, durable("unbeaten", 1000ms), so),
      [&](const postbox::envelope<order>&, postbox::consume_context& ctx) {
        // The first run waits for the server's redelivery to reach the second worker.
        if (ctx.attempt() == 1) (void)postbox_test::eventually([&] { return t.j.size() == 2; });
      },
      threaded(2));
  REQUIRE(postbox_test::eventually([&] { return t.j.size() == 2; }));
  const auto runs = t.j.all();
  CHECK(runs[0].second == 1);
  // The server's redelivery, while the first run still held it, normally
  // carries NumDelivered 2. Once in about 15 runs (ASan, -O0) nats-server
  // 2.9 sent it with NumDelivered 1; the redelivery guard (the first
  // delivery of that sequence is not settled yet) counts it as the second.
  CHECK(runs[1].second == 2);
  // The first delivery's late ack may or may not be accepted; the second settles the message.
  REQUIRE(postbox_test::eventually([&] { return t.c.stats().acked == 2; }, 60s));
}

TEST_CASE("two consumers on one durable split the messages without overlap", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const int n = 40;
  r.publish(0, n);
  auto conn_b = pn::connect(r.srv.url());  // as if in another process
  postbox::jetstream js_b(conn_b);
  std::mutex m;
  std::multiset<int> seen_a, seen_b;
  postbox::dead_letter_queue<order> dlq_a, dlq_b;
  postbox::jetstream_source_options one;
  one.batch = 1;
  // A holds its first message until B has handled one, so both get work.
  postbox::consumer<order> a(
      source_t(r.js, durable("group"), one),
      [&](const postbox::envelope<order>& e) {
        bool first = false;
        {
          std::lock_guard lock(m);
          first = seen_a.empty();
          seen_a.insert(e.payload.n);
        }
        if (first)
          (void)postbox_test::eventually([&] {
            std::lock_guard lock(m);
            return !seen_b.empty();
          });
      },
      dlq_a, threaded(1, 1));
  postbox::consumer<order> b(
      source_t(js_b, durable("group")),
      [&](const postbox::envelope<order>& e) {
        std::lock_guard lock(m);
        seen_b.insert(e.payload.n);
      },
      dlq_b, threaded());
  REQUIRE(postbox_test::eventually([&] { return a.stats().acked + b.stats().acked == static_cast<std::uint64_t>(n); }));
  std::lock_guard lock(m);
  CHECK(seen_a.size() + seen_b.size() == static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) CHECK(seen_a.count(i) + seen_b.count(i) == 1);
  CHECK_FALSE(seen_a.empty());
  CHECK_FALSE(seen_b.empty());
}

TEST_CASE("a consumer keeps handling across a server restart and every message is acked", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  auto conn = pn::connect(r.srv.url(), pn::settings().quick());
  postbox::jetstream js(conn);
  const auto before = r.publish(0, 20);
  source_t src(js, durable("restart", 2000ms));
  const auto mon = src.monitor();
  std::mutex m;
  std::set<postbox::message_id> handled;
  postbox::dead_letter_queue<order> dlq;
  postbox::consumer<order> c(
      std::move(src),
      [&](const postbox::envelope<order>& e) {
        std::lock_guard lock(m);
        handled.insert(e.id);
      },
      dlq, threaded(2));
  auto count = [&] {
    std::lock_guard lock(m);
    return handled.size();
  };
  REQUIRE(postbox_test::eventually([&] { return count() == 20; }));
  r.srv.restart();  // file storage: the stream and the durable survive
  REQUIRE(postbox_test::eventually([&] { return conn.status() == postbox::connection_status::connected; }));
  // The publisher republishes while JetStream comes back (unknown outcomes, same ids).
  const auto after = r.publish(20, 40);
  // Deliveries whose ack was lost in the restart come back after the 2 s ack wait.
  // The source counts an ack after the server confirmed it (AckSync), so the
  // server's ack_pending can reach 0 just before the local count moves.
  REQUIRE(postbox_test::eventually(
      [&] { return count() == 40 && r.state("restart").ack_pending == 0 && mon.stats().acked >= 40; }, 60s));
  std::lock_guard lock(m);
  for (const auto& id : before) CHECK(handled.count(id) == 1);
  for (const auto& id : after) CHECK(handled.count(id) == 1);
  CHECK(dlq.size() == 0);
}

TEST_CASE("a released or dropped delivery is redelivered at once, not after the ack wait", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 1);
  source_t src(r.js, durable("release", 60s));  // far beyond the receive loops below
  auto next = [&]() -> std::optional<postbox::inbound<order>> {
    for (int i = 0; i < 20; ++i) {
      auto got = src.receive(1s);
      if (got.has_value()) return std::move(*got);
    }
    return std::nullopt;
  };
  auto first = next();
  REQUIRE(first);
  REQUIRE(first->message);
  CHECK(first->message->attempt == 0);  // deliveries started before this one
  first->settle(postbox::settle_action{postbox::settle_action::kind::release, {}});
  {
    auto second = next();
    REQUIRE(second);
    REQUIRE(second->message);
    CHECK(second->message->attempt == 1);
  }  // dropped without settling: naked
  auto third = next();
  REQUIRE(third);
  REQUIRE(third->message);
  CHECK(third->message->attempt == 2);
  third->settle(postbox::settle_action{postbox::settle_action::kind::ack, {}});
  CHECK(src.stats().released == 2);
  CHECK(src.stats().acked == 1);
  CHECK(src.stats().unsettled == 0);
  CHECK(r.state("release").ack_pending == 0);
}

TEST_CASE("destroying a source gives its buffered deliveries back and backlog counts them", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.publish(0, 5);
  postbox::jetstream_source_options two;
  two.batch = 2;
  std::optional<postbox::inbound<order>> held;
  {
    source_t src(r.js, durable("buffered", 60s), two);
    for (int i = 0; i < 20 && !held; ++i) {
      auto got = src.receive(1s);
      if (got.has_value()) held.emplace(std::move(*got));
    }
    REQUIRE(held);
    CHECK(src.backlog() == 4);  // one buffered here + three on the server
    CHECK(src.stats().unsettled == 2);
  }
  // The buffered one (order 1) comes back at once to a new source; the held one
  // is still unsettled and its delivery still works after its source is gone.
  source_t again(r.js, durable("buffered", 60s));
  std::set<int> got;
  for (int i = 0; i < 20 && got.size() < 4; ++i) {
    auto in = again.receive(1s);
    if (!in.has_value()) continue;
    got.insert(in->message->payload.n);
    in->settle(postbox::settle_action{postbox::settle_action::kind::ack, {}});
  }
  CHECK(got == std::set<int>{1, 2, 3, 4});
  held->settle(postbox::settle_action{postbox::settle_action::kind::ack, {}});
  CHECK(again.stats().acked == 4);
  CHECK(r.state("buffered").ack_pending == 0);
}

TEST_CASE("receive with zero wait returns what the server has without waiting for more", "[nats][nats_consumer]") {
  NATS_REQUIRE_SERVER();
  rig r;
  source_t src(r.js, durable("nowait"));
  CHECK(src.receive(postbox::duration::zero()).status() == postbox::receive_status::empty);
  r.publish(0, 2);
  std::vector<int> got;
  for (int i = 0; i < 50 && got.size() < 2; ++i) {
    auto in = src.receive(postbox::duration::zero());
    if (!in.has_value()) continue;
    got.push_back(in->message->payload.n);
    in->settle(postbox::settle_action{postbox::settle_action::kind::ack, {}});
  }
  CHECK(got == std::vector<int>{0, 1});
  CHECK(src.receive(postbox::duration::zero()).status() == postbox::receive_status::empty);
}

TEST_CASE("a consumer across a stream leader change in a three-node cluster loses nothing and applies each effect once",
          "[nats][nats_consumer][cluster]") {
  NATS_REQUIRE_SERVER();
  pn::cluster cl(3);
  auto conn = pn::connect(cl.urls(), pn::settings().quick());
  postbox::jetstream js(conn);
  pn::ensure_stream(js, {"ORDERS", {"orders.>"}, 3});
  std::string leader;
  for (int i = 0; i < 100 && leader.empty(); ++i) {
    auto l = js.stream_leader("ORDERS");
    if (l.has_value()) leader = *l;
    if (leader.empty()) pn::detail::pause_ms(100);
  }
  REQUIRE(cl.find(leader) != nullptr);
  const int n = static_cast<int>(postbox_test::scaled(300));
  {
    postbox::jetstream_publisher pub(js, {{}, 500ms, 60});
    for (int i = 0; i < n; ++i) REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{i})).has_value());
  }
  // The durable (replicated like its stream) may need its own election first.
  std::optional<source_t> src;
  for (int i = 0; i < 100 && !src; ++i) {
    try {
      src.emplace(js, durable("failover", 2000ms));
    } catch (const postbox::error&) {
      pn::detail::pause_ms(100);
    }
  }
  REQUIRE(src);
  // Message n/3 holds its worker until the leader is dead, so the kill falls
  // mid-run with that delivery unsettled; the other worker keeps consuming.
  std::atomic<bool> at_gate{false}, killed{false};
  inboxed t;
  t.gate = [&](int k) {
    if (k == n / 3 && !at_gate.exchange(true)) (void)postbox_test::eventually([&] { return killed.load(); });
  };
  t.start(std::move(*src), "failover");
  REQUIRE(postbox_test::eventually([&] { return at_gate.load(); }));
  cl.find(leader)->kill();
  killed = true;
  // Acks lost in the election come back after the 2 s ack wait; the inbox absorbs them.
  REQUIRE(postbox_test::eventually([&] { return t.quiet(n, js); }, 90s));
  const auto effects = t.effect_counts();
  std::size_t not_once = 0, unknown = 0;
  for (const auto& [k, count] : effects) {
    not_once += count == 1 ? 0 : 1;
    unknown += k >= 0 && k < n ? 0 : 1;
  }
  CHECK(effects.size() == static_cast<std::size_t>(n));  // nothing lost
  CHECK(not_once == 0);                                  // no effect twice
  CHECK(unknown == 0);                                   // nothing that was never published
  CHECK(t.in.stats().duplicates == t.total_runs() - static_cast<std::size_t>(n));
  CHECK(t.dlq.size() == 0);
  CAPTURE(t.total_runs(), t.mon->stats().ack_failures, t.mon->stats().fetch_errors);
  // The stream did change leader (the killed node is still down).
  std::string now_leading;
  for (int i = 0; i < 100 && now_leading.empty(); ++i) {
    auto l = js.stream_leader("ORDERS");
    if (l.has_value()) now_leading = *l;
    if (now_leading.empty()) pn::detail::pause_ms(100);
  }
  CHECK_FALSE(now_leading.empty());
  CHECK(now_leading != leader);
}

#endif  // POSTBOX_NATS_SERVER
