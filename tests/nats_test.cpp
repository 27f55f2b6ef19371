// SPDX-License-Identifier: MIT
// Tests for postbox/nats.hpp against real nats-server processes started on 127.0.0.1.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/nats.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "support.hpp"

#include "nats_fixture.hpp"

namespace {

struct order {
  int n = 0;
  std::string what;
};
void to_json(nlohmann::json& j, const order& o) { j = {{"n", o.n}, {"what", o.what}}; }
void from_json(const nlohmann::json& j, order& o) {
  j.at("n").get_to(o.n);
  j.at("what").get_to(o.what);
}

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;

// Every stored message of ORDERS in stream order (payload n), through a fresh durable.
std::vector<int> stored_orders(postbox::jetstream& js, const std::string& durable, std::size_t expected) {
  postbox::jetstream_pull_source<order> src(js, {"ORDERS", durable, "orders.>", 30000ms, -1});
  std::vector<int> out;
  for (int i = 0; i < 50 && out.size() < expected; ++i) {
    auto got = src.fetch(256, 1000ms);
    if (!got.has_value()) continue;
    for (auto& d : *got) {
      out.push_back(d->payload.n);
      (void)d.ack();
    }
  }
  return out;
}

postbox::buffered_publisher_options buffer_of(std::size_t capacity, postbox::overflow policy) {
  postbox::buffered_publisher_options o;
  o.capacity = capacity;
  o.policy = policy;
  o.ack_timeout = 1000ms;
  return o;
}

// Outcomes reported by a buffered publisher, in callback order.
struct outcome_log {
  mutable std::mutex m;
  std::vector<postbox::buffered_outcome> all;
  postbox::buffered_jetstream_publisher::callback cb() {
    return [this](const postbox::buffered_outcome& o) {
      std::lock_guard lock(m);
      all.push_back(o);
    };
  }
  std::size_t count(postbox::errc s) const {
    std::lock_guard lock(m);
    return static_cast<std::size_t>(std::count_if(all.begin(), all.end(), [&](auto& o) { return o.status == s; }));
  }
  std::size_t size() const {
    std::lock_guard lock(m);
    return all.size();
  }
};

// Stops the server and waits until the publisher's connection noticed.
void take_down(pn::server& srv, postbox::buffered_jetstream_publisher& pub) {
  srv.stop();
  REQUIRE(postbox_test::eventually([&] { return pub.status() == postbox::connection_status::reconnecting; }));
}

}  // namespace

TEST_CASE("an envelope survives the NATS header mapping field by field", "[nats]") {
  auto env = postbox::make_envelope("orders.placed", order{7, "book"}, postbox::message_kind::command);
  env.schema_version = 3;
  env.causation_id = postbox::message_id::generate();
  env.producer = "shop";
  env.partition_key = "cust-1";
  env.tenant = "t1";
  env.trace = postbox::trace_context::generate();
  env.deadline = env.occurred_at + 5s;
  env.attempt = 2;
  env.headers.set("x-user", "alice");
  auto msg = postbox::to_nats_msg(env, "orders.placed");
  REQUIRE(msg.has_value());
  postbox::nats_decode_error err;
  auto back = postbox::from_nats_msg<order>(msg->get(), err);
  REQUIRE(back.has_value());
  CHECK(back->id == env.id);
  CHECK(back->type == env.type);
  CHECK(back->schema_version == 3);
  CHECK(back->kind == postbox::message_kind::command);
  CHECK(back->occurred_at == env.occurred_at);
  CHECK(back->correlation_id == env.correlation_id);
  CHECK(back->causation_id == env.causation_id);
  CHECK(back->producer == "shop");
  CHECK(back->partition_key == "cust-1");
  CHECK(back->tenant == "t1");
  CHECK(back->trace.traceparent == env.trace.traceparent);
  CHECK(back->deadline == env.deadline);
  CHECK(back->attempt == 2);
  CHECK(back->headers.get("x-user") == std::optional<std::string_view>("alice"));
  CHECK(back->payload.n == 7);
  CHECK(back->payload.what == "book");
}

TEST_CASE("a JetStream ack subject gives the delivery count, stream sequence and pending count in both forms",
          "[nats]") {
  const auto v1 = postbox::detail::parse_js_ack_subject("$JS.ACK.ORDERS.worker.3.42.17.1700000000000000000.5");
  REQUIRE(v1.has_value());
  CHECK(v1->delivered == 3);
  CHECK(v1->stream_sequence == 42);
  CHECK(v1->pending == 5);
  const auto v2 =
      postbox::detail::parse_js_ack_subject("$JS.ACK._.ACCHASH.ORDERS.worker.2.7.6.1700000000000000000.0.rnd");
  REQUIRE(v2.has_value());
  CHECK(v2->delivered == 2);
  CHECK(v2->stream_sequence == 7);
  CHECK(v2->pending == 0);
  CHECK_FALSE(postbox::detail::parse_js_ack_subject("_INBOX.abc.1").has_value());
  CHECK_FALSE(postbox::detail::parse_js_ack_subject("$JS.ACK.ORDERS.worker.x.42.17.1.5").has_value());
  CHECK_FALSE(postbox::detail::parse_js_ack_subject("$JS.ACK.ORDERS.worker.3.42.17.1").has_value());
  CHECK_FALSE(postbox::detail::parse_js_ack_subject("$JS.ACK.ORDERS.worker.3.42.17.1.").has_value());
  CHECK_FALSE(postbox::detail::parse_js_ack_subject("").has_value());
}

TEST_CASE("a header value with a line break is rejected as invalid_argument", "[nats]") {
  auto env = postbox::make_envelope("t", order{1, "x"});
  env.producer = "a\r\nb";
  CHECK(postbox::to_nats_msg(env, "t").status() == postbox::errc::invalid_argument);
}

TEST_CASE("a message without Nats-Msg-Id fails to decode naming the header", "[nats]") {
  postbox::detail::nats_library_open();
  natsMsg* raw = nullptr;
  REQUIRE(natsMsg_Create(&raw, "t", nullptr, "{}", 2) == NATS_OK);
  postbox::nats_msg_ptr msg(raw);
  postbox::nats_decode_error err;
  CHECK_FALSE(postbox::from_nats_msg<order>(msg.get(), err).has_value());
  CHECK(err.code == postbox::errc::missing_field);
  CHECK(err.field == "Nats-Msg-Id");
}

TEST_CASE("publishing the same id twice stores one message", "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher pub(r.js);
  auto env = postbox::make_envelope("orders.placed", order{1, "a"});
  auto a = pub.publish(env);
  auto b = pub.publish(env);
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK_FALSE(a->duplicate);
  CHECK(b->duplicate);
  CHECK(r.js.stream_messages("ORDERS").value() == 1);
}

TEST_CASE("pull ack nak-with-delay and term settle messages as JetStream does", "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher pub(r.js);
  for (int i = 0; i < 3; ++i) REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{i, "x"})).has_value());
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "worker", "orders.>", 30000ms, -1});
  auto first = src.fetch(3, 2000ms);
  REQUIRE(first.has_value());
  REQUIRE(first->size() == 3);
  for (auto& d : *first) {
    REQUIRE(d.has_value());
    CHECK(d.delivered() == 1);
    CHECK(d->attempt == 1);
    if (d->payload.n == 0) CHECK(d.ack() == postbox::errc::ok);
    if (d->payload.n == 1) CHECK(d.nak(200ms) == postbox::errc::ok);
    if (d->payload.n == 2) CHECK(d.term() == postbox::errc::ok);
  }
  // Only the nak'ed message comes back, as its second delivery.
  auto again = src.fetch(3, 5000ms);
  REQUIRE(again.has_value());
  REQUIRE(again->size() == 1);
  CHECK((*again)[0]->payload.n == 1);
  CHECK((*again)[0].delivered() == 2);
  CHECK((*again)[0].ack() == postbox::errc::ok);
  CHECK(src.fetch(3, 500ms).status() == postbox::errc::timeout);
}

TEST_CASE("a recreated pull source resumes from the durable position", "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher pub(r.js);
  for (int i = 0; i < 10; ++i) REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{i, "x"})).has_value());
  std::vector<int> seen;
  {
    postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "resume", "orders.>", 30000ms, -1});
    auto got = src.fetch(4, 2000ms);
    REQUIRE(got.has_value());
    for (auto& d : *got) {
      seen.push_back(d->payload.n);
      REQUIRE(d.ack() == postbox::errc::ok);
    }
  }
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "resume", "orders.>", 30000ms, -1});
  for (int i = 0; i < 20 && seen.size() < 10; ++i) {
    auto got = src.fetch(10, 2000ms);
    if (!got.has_value()) continue;
    for (auto& d : *got) {
      seen.push_back(d->payload.n);
      REQUIRE(d.ack() == postbox::errc::ok);
    }
  }
  REQUIRE(seen.size() == 10);
  for (int i = 0; i < 10; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("after a file-storage server restart every acknowledged publish is still stored", "[nats]") {
  NATS_REQUIRE_SERVER();
  std::atomic<int> reconnecting{0};
  pn::jetstream_rig r(pn::settings().status([&](postbox::connection_status s) {
    if (s == postbox::connection_status::reconnecting) reconnecting.fetch_add(1);
  }));
  postbox::jetstream_publisher pub(r.js, {{}, 1000ms, 30});
  std::set<postbox::message_id> acked;
  const int n = 200;
  for (int i = 0; i < n; ++i) {
    if (i == n / 2) r.srv.restart();
    auto env = postbox::make_envelope("orders.placed", order{i, "x"});
    if (pub.publish(env).has_value()) acked.insert(env.id);
  }
  CHECK(reconnecting.load() >= 1);
  REQUIRE(acked.size() >= static_cast<std::size_t>(n / 2));
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "check", "orders.>", 30000ms, -1});
  std::set<postbox::message_id> stored;
  for (int i = 0; i < 50 && stored.size() < acked.size(); ++i) {
    auto got = src.fetch(100, 1000ms);
    if (!got.has_value()) continue;
    for (auto& d : *got) {
      stored.insert(d->id);
      (void)d.ack();
    }
  }
  for (const auto& id : acked) CHECK(stored.count(id) == 1);
}

TEST_CASE("destroying pull sources while messages stream into their inboxes never frees one the read loop still holds",
          "[nats][stress]") {
  // libnats 3.4 looks a subscription up, drops the connection lock, then
  // locks the subscription: a destroy in between freed that lock under the
  // read loop (TSan: use of an invalid mutex; plain build: abort). Every
  // source here is destroyed while another connection floods its inbox.
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  auto flood_conn = pn::connect(r.srv.url());
  const int rounds = 100;  // not scaled: the cost is round trips, and the race needs the count
  std::uint64_t delivered_total = 0;
  for (int round = 0; round < rounds; ++round) {
    std::optional<postbox::jetstream_pull_source<order>> src;
    src.emplace(r.js, postbox::jetstream_consumer_options{"ORDERS", "flood", "orders.>", 30000ms, -1});
    const std::string inbox = natsSubscription_GetSubject(src->native());
    const std::string target = inbox.substr(0, inbox.size() - 1) + "x";  // "<inbox>.x"
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> sent{0};
    std::thread flood([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        if (natsConnection_PublishString(flood_conn.native(), target.c_str(), "x") == NATS_OK)
          sent.fetch_add(1, std::memory_order_relaxed);
        if (sent.load(std::memory_order_relaxed) % 64 == 0) (void)natsConnection_FlushTimeout(flood_conn.native(), 1000);
      }
    });
    // Destroy only once messages are arriving, so the read loop is busy with this subscription.
    REQUIRE(postbox_test::eventually([&] {
      int pending = 0;
      (void)natsSubscription_GetPending(src->native(), &pending, nullptr);
      return pending > 0;
    }));
    int pending = 0;
    (void)natsSubscription_GetPending(src->native(), &pending, nullptr);
    delivered_total += static_cast<std::uint64_t>(pending);
    src.reset();
    stop = true;
    flood.join();
  }
  CHECK(delivered_total >= static_cast<std::uint64_t>(rounds));
  CHECK(r.conn.status() == postbox::connection_status::connected);
}

TEST_CASE("two pull sources sharing a durable name split the messages without overlap", "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher pub(r.js);
  for (int i = 0; i < 20; ++i) REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{i, "x"})).has_value());
  postbox::jetstream_consumer_options co{"ORDERS", "group", "orders.>", 30000ms, -1};
  postbox::jetstream_pull_source<order> a(r.js, co);
  postbox::jetstream_pull_source<order> b(r.js, co);
  std::multiset<int> seen;
  std::size_t from_a = 0, from_b = 0;
  for (int round = 0; round < 20 && seen.size() < 20; ++round) {
    for (auto* src : {&a, &b}) {
      auto got = src->fetch(5, 1000ms);
      if (!got.has_value()) continue;
      for (auto& d : *got) {
        seen.insert(d->payload.n);
        (src == &a ? from_a : from_b) += 1;
        REQUIRE(d.ack() == postbox::errc::ok);
      }
    }
  }
  REQUIRE(seen.size() == 20);
  for (int i = 0; i < 20; ++i) CHECK(seen.count(i) == 1);
  CHECK(from_a > 0);
  CHECK(from_b > 0);
}

TEST_CASE("a stopped server shows as reconnecting and a restarted one as connected again", "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick().without_orders());
  REQUIRE(r.conn.status() == postbox::connection_status::connected);
  r.srv.stop();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::reconnecting; }));
  CHECK(r.conn.flush(100ms) != postbox::errc::ok);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::connected; }));
  CHECK(r.conn.flush(2000ms) == postbox::errc::ok);
}

TEST_CASE("a fetch while the connection is reconnecting waits out its timeout with a bounded backoff and returns timeout",
          "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "outage", "orders.>", 30000ms, -1});
  r.srv.stop();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::reconnecting; }));
  auto got = src.fetch(10, 300ms);
  CHECK(got.status() == postbox::errc::timeout);  // not busy at once: the caller's loop does not spin
  // It slept between checks (1, 2, 4, 8, 16, then 32 ms steps): at least once,
  // and at most 14 times within 300 ms (63 ms + 7 x 32 ms < 300 ms), however
  // slow the machine, since every sleep lasts at least its step.
  CHECK(src.reconnect_polls() >= 1);
  CHECK(src.reconnect_polls() <= 14);
  // A zero timeout still reports the state at once without waiting.
  const auto polls = src.reconnect_polls();
  CHECK(src.fetch(10, 0ms).status() == postbox::errc::busy);
  CHECK(src.reconnect_polls() == polls);
}

TEST_CASE("a fetch waiting for a reconnect sends its request once the server is back and returns the message",
          "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  postbox::jetstream_publisher pub(r.js);
  REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{7, "x"})).has_value());
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "comeback", "orders.>", 30000ms, -1});
  r.srv.stop();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::reconnecting; }));
  std::optional<postbox::result<std::vector<postbox::jetstream_delivery<order>>>> got;
  std::thread fetcher([&] { got.emplace(src.fetch(1, 20000ms)); });
  r.srv.start();  // while the fetch waits for the connection
  fetcher.join();
  REQUIRE(got.has_value());
  CHECK(src.reconnect_polls() >= 1);  // it waited for the reconnect instead of returning busy
  // Right after the reconnect JetStream may still be recovering the stream, so
  // the first request can come back empty (timeout), never busy.
  if (!got->has_value()) CHECK(got->status() == postbox::errc::timeout);
  for (int i = 0; i < 20 && !(got->has_value() && !(*got)->empty()); ++i) got.emplace(src.fetch(1, 1000ms));
  REQUIRE(got->has_value());
  REQUIRE((*got)->size() == 1);
  CHECK((**got)[0]->payload.n == 7);
  CHECK((**got)[0].ack() == postbox::errc::ok);
}

TEST_CASE("binding an existing durable whose configuration differs from the options throws conflict naming the fields",
          "[nats]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  { postbox::jetstream_pull_source<order> first(r.js, {"ORDERS", "billing", "orders.>", 30000ms, 5}); }
  // The same options bind again.
  { postbox::jetstream_pull_source<order> again(r.js, {"ORDERS", "billing", "orders.>", 30000ms, 5}); }
  try {
    postbox::jetstream_pull_source<order> other(r.js, {"ORDERS", "billing", "orders.placed", 10000ms, 5});
    FAIL("bound a durable with another filter and ack wait");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::conflict);
    const std::string what = e.what();
    CHECK(what.find("filter_subject \"orders.>\" (options: \"orders.placed\")") != std::string::npos);
    CHECK(what.find("ack_wait 30000ms (options: 10000ms)") != std::string::npos);
    CHECK(what.find("max_deliver") == std::string::npos);
  }
  try {
    postbox::jetstream_pull_source<order> other(r.js, {"ORDERS", "billing", "orders.>", 30000ms, -1});
    FAIL("bound a durable with another max_deliver");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::conflict);
    CHECK(std::string(e.what()).find("max_deliver 5 (options: -1)") != std::string::npos);
  }
  // A max_deliver below 1 means unlimited on both sides: 0 matches -1.
  { postbox::jetstream_pull_source<order> unlimited(r.js, {"ORDERS", "unlimited", "orders.>", 30000ms, -1}); }
  { postbox::jetstream_pull_source<order> again(r.js, {"ORDERS", "unlimited", "orders.>", 30000ms, 0}); }
}

TEST_CASE("in_progress keeps a slow message from being redelivered past its ack wait", "[nats][realtime]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r;
  postbox::jetstream_publisher pub(r.js);
  REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{1, "slow"})).has_value());
  postbox::jetstream_pull_source<order> src(r.js, {"ORDERS", "slow", "orders.>", 1000ms, -1});
  auto got = src.fetch(1, 2000ms);
  REQUIRE(got.has_value());
  REQUIRE(got->size() == 1);
  auto& d = (*got)[0];
  // Three 600 ms waits (1.8 s > the 1 s ack wait), each preceded by in_progress:
  // the fetches see nothing because the deadline keeps moving.
  for (int i = 0; i < 3; ++i) {
    REQUIRE(d.in_progress() == postbox::errc::ok);
    CHECK(src.fetch(1, 600ms).status() == postbox::errc::timeout);
  }
  CHECK(d.ack() == postbox::errc::ok);
  CHECK(src.fetch(1, 1500ms).status() == postbox::errc::timeout);
}

TEST_CASE("killing the R3 stream leader of a three-node cluster loses and duplicates nothing", "[nats][cluster]") {
  NATS_REQUIRE_SERVER();
  pn::cluster cl(3);
  auto conn = pn::connect(cl.urls());
  postbox::jetstream js(conn);
  pn::ensure_stream(js, {"ORDERS", {"orders.>"}, 3});
  std::string leader;
  for (int i = 0; i < 100 && leader.empty(); ++i) {
    auto l = js.stream_leader("ORDERS");
    if (l.has_value()) leader = *l;
    if (leader.empty()) pn::detail::pause_ms(100);
  }
  REQUIRE(cl.find(leader) != nullptr);
  postbox::jetstream_publisher pub(js, {{}, 500ms, 60});
  const int n = static_cast<int>(postbox_test::scaled(300));
  std::set<postbox::message_id> acked;
  for (int i = 0; i < n; ++i) {
    if (i == n / 3) cl.find(leader)->kill();  // mid-run crash of the leader
    auto env = postbox::make_envelope("orders.placed", order{i, "x"});
    auto r = pub.publish(env);
    if (r.has_value()) acked.insert(env.id);
    else UNSCOPED_INFO("publish " << i << " failed: " << postbox::to_string(r.status()));
  }
  REQUIRE(acked.size() == static_cast<std::size_t>(n));
  // Checker: every acknowledged id delivered (no unseen), stored once (no
  // duplicated effects from republishes), and nothing delivered that was
  // never published (no phantom) — lost = acked but absent from the stream.
  std::map<postbox::message_id, std::set<std::uint64_t>> sequences;
  std::unique_ptr<postbox::jetstream_pull_source<order>> src;
  for (int i = 0; i < 100 && !src; ++i) {
    try {
      src = std::make_unique<postbox::jetstream_pull_source<order>>(
          js, postbox::jetstream_consumer_options{"ORDERS", "checker", "orders.>", 30000ms, -1});
    } catch (const postbox::error&) {
      pn::detail::pause_ms(100);
    }
  }
  REQUIRE(src);
  for (int i = 0; i < 60 && sequences.size() < acked.size(); ++i) {
    auto got = src->fetch(256, 1000ms);
    if (!got.has_value()) continue;
    for (auto& d : *got) {
      REQUIRE(d.has_value());
      sequences[d->id].insert(d.stream_sequence());
      (void)d.ack();
    }
  }
  std::size_t lost = 0, duplicated = 0, unseen = 0;
  for (const auto& id : acked) {
    auto it = sequences.find(id);
    if (it == sequences.end()) ++lost;
    else if (it->second.size() > 1) ++duplicated;
  }
  for (const auto& [id, seqs] : sequences)
    if (acked.count(id) == 0) ++unseen;
  CHECK(lost == 0);
  CHECK(duplicated == 0);
  CHECK(unseen == 0);
}


TEST_CASE("a buffered publisher holds envelopes while the server is down and publishes them in order once it is back",
          "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(64, postbox::overflow::block));
  REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{0, "x"}), log.cb()) == postbox::errc::ok);
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 1; }));
  take_down(r.srv, pub);
  for (int i = 1; i <= 10; ++i)
    REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{i, "x"}), log.cb()) == postbox::errc::ok);
  REQUIRE(postbox_test::eventually([&] { return pub.stats().in_flight == 1 && pub.stats().buffered == 9; }));
  // Nothing is reported ok while no server can acknowledge it.
  CHECK(pub.stats().published == 1);
  CHECK(pub.stats().connection == postbox::connection_status::reconnecting);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 11; }));
  CHECK(pub.status() == postbox::connection_status::connected);
  CHECK(log.count(postbox::errc::ok) == 11);
  auto stored = stored_orders(r.js, "check", 11);
  REQUIRE(stored.size() == 11);
  for (int i = 0; i <= 10; ++i) CHECK(stored[static_cast<std::size_t>(i)] == i);
  CHECK(pub.flush(std::chrono::seconds(1)) == postbox::errc::ok);
}

TEST_CASE("a full buffer with drop_oldest discards the oldest queued envelopes and reports them full",
          "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(4, postbox::overflow::drop_oldest));
  take_down(r.srv, pub);
  std::vector<postbox::message_id> ids;
  for (int i = 0; i < 10; ++i) {
    auto env = postbox::make_envelope("orders.placed", order{i, "x"});
    ids.push_back(env.id);
    REQUIRE(pub.enqueue(env, log.cb()) == postbox::errc::ok);
    // The first one is taken by the publishing thread and held: not in the buffer.
    if (i == 0) REQUIRE(postbox_test::eventually([&] { return pub.stats().in_flight == 1; }));
  }
  CHECK(pub.stats().buffered == 4);
  CHECK(pub.stats().dropped == 5);
  {
    std::lock_guard lock(log.m);
    REQUIRE(log.all.size() == 5);
    for (std::size_t i = 0; i < 5; ++i) {
      CHECK(log.all[i].status == postbox::errc::full);
      CHECK(log.all[i].id == ids[i + 1]);
    }
  }
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 5; }));
  CHECK(stored_orders(r.js, "check", 5) == std::vector<int>{0, 6, 7, 8, 9});
}

TEST_CASE("a full buffer with drop_newest discards the new envelope and reports it full", "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(2, postbox::overflow::drop_newest));
  take_down(r.srv, pub);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{i, "x"}), log.cb()) == postbox::errc::ok);
    if (i == 0) REQUIRE(postbox_test::eventually([&] { return pub.stats().in_flight == 1; }));
  }
  CHECK(pub.stats().dropped == 2);
  CHECK(log.count(postbox::errc::full) == 2);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 3; }));
  CHECK(stored_orders(r.js, "check", 3) == std::vector<int>{0, 1, 2});
}

TEST_CASE("a full buffer with fail refuses the new envelope and never calls its callback", "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(2, postbox::overflow::fail));
  take_down(r.srv, pub);
  for (int i = 0; i < 3; ++i) {
    REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{i, "x"}), log.cb()) == postbox::errc::ok);
    if (i == 0) REQUIRE(postbox_test::eventually([&] { return pub.stats().in_flight == 1; }));
  }
  CHECK(pub.enqueue(postbox::make_envelope("orders.placed", order{3, "x"}), log.cb()) == postbox::errc::full);
  CHECK(pub.stats().refused == 1);
  CHECK(log.size() == 0);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 3; }));
  CHECK(log.size() == 3);
  CHECK(stored_orders(r.js, "check", 3) == std::vector<int>{0, 1, 2});
}

TEST_CASE("a full buffer with block makes the producer wait until the server is back", "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(2, postbox::overflow::block));
  take_down(r.srv, pub);
  REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{0, "x"})) == postbox::errc::ok);
  REQUIRE(postbox_test::eventually([&] { return pub.stats().in_flight == 1; }));
  std::atomic<int> returned{0}, not_ok{0};  // Catch2 assertions are for the main thread only
  std::thread producer([&] {
    for (int i = 1; i <= 4; ++i) {
      if (pub.enqueue(postbox::make_envelope("orders.placed", order{i, "x"})) != postbox::errc::ok) not_ok.fetch_add(1);
      returned.fetch_add(1);
    }
  });
  REQUIRE(postbox_test::eventually([&] { return pub.stats().waiting_producers == 1; }));
  CHECK(returned.load() == 2);  // the third is waiting for room
  CHECK(pub.stats().buffered == 2);
  r.srv.start();
  producer.join();
  CHECK(not_ok.load() == 0);
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published == 5; }));
  CHECK(stored_orders(r.js, "check", 5) == std::vector<int>{0, 1, 2, 3, 4});
}

TEST_CASE("destroying a buffered publisher completes what it still holds with canceled", "[nats][buffered]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  {
    postbox::buffered_jetstream_publisher pub(r.js, buffer_of(8, postbox::overflow::block));
    take_down(r.srv, pub);
    for (int i = 0; i < 3; ++i)
      REQUIRE(pub.enqueue(postbox::make_envelope("orders.placed", order{i, "x"}), log.cb()) == postbox::errc::ok);
  }
  CHECK(log.size() == 3);
  CHECK(log.count(postbox::errc::canceled) == 3);
}

TEST_CASE("concurrent producers through a buffered publisher across a server restart lose, duplicate and reorder nothing",
          "[nats][buffered][stress]") {
  NATS_REQUIRE_SERVER();
  pn::jetstream_rig r(pn::settings().quick());
  outcome_log log;
  postbox::buffered_jetstream_publisher pub(r.js, buffer_of(8, postbox::overflow::block));
  const int producers = 3;
  const int per = static_cast<int>(postbox_test::scaled(200));
  const int n = producers * per;
  std::atomic<int> not_ok{0};  // Catch2 assertions are for the main thread only
  std::vector<std::thread> ts;
  for (int t = 0; t < producers; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < per; ++i)
        if (pub.enqueue(postbox::make_envelope("orders.placed", order{t * per + i, "x"}), log.cb()) !=
            postbox::errc::ok)
          not_ok.fetch_add(1);
    });
  REQUIRE(postbox_test::eventually([&] { return pub.stats().published >= static_cast<std::uint64_t>(n / 4); }));
  r.srv.restart();  // mid-run: attempts in flight end unknown and are republished with the same id
  for (auto& t : ts) t.join();
  CHECK(not_ok.load() == 0);
  REQUIRE(postbox_test::eventually([&] { return log.size() == static_cast<std::size_t>(n); }, 60s));
  CHECK(log.count(postbox::errc::ok) == static_cast<std::size_t>(n));
  std::set<postbox::message_id> ids;
  {
    std::lock_guard lock(log.m);
    for (auto& o : log.all) ids.insert(o.id);
  }
  CHECK(ids.size() == static_cast<std::size_t>(n));  // one outcome per envelope
  CHECK(r.js.stream_messages("ORDERS").value() == static_cast<std::uint64_t>(n));  // stored once each
  auto stored = stored_orders(r.js, "check", static_cast<std::size_t>(n));
  REQUIRE(stored.size() == static_cast<std::size_t>(n));
  std::vector<int> last(producers, -1);
  for (int v : stored) {
    auto& l = last[static_cast<std::size_t>(v / per)];
    CHECK(v > l);  // each producer's envelopes stored in its order
    l = v;
  }
}

#endif  // POSTBOX_NATS_SERVER
