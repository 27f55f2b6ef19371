// SPDX-License-Identifier: MIT
// Tests for postbox/nats_outbox.hpp: an outbox relay publishing to JetStream, against real nats-server processes on 127.0.0.1.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/json.hpp>
#include <postbox/nats_outbox.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "support.hpp"

#include "nats_fixture.hpp"

namespace {

using order = postbox_test::nats::order;

struct refund {
  std::string reason;
};
void to_json(nlohmann::json& j, const refund& r) { j = {{"reason", r.reason}}; }
void from_json(const nlohmann::json& j, refund& r) { j.at("reason").get_to(r.reason); }

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;
using postbox::errc;

postbox::stream_options stream_of(std::string name, std::vector<std::string> subjects) {
  postbox::stream_options so;
  so.name = std::move(name);
  so.subjects = std::move(subjects);
  return so;
}

// The NATS fixture with a connection quick to notice a stopped server, plus a
// memory outbox and a manual clock for the relay.
struct rig : pn::jetstream_rig {
  postbox::manual_clock clock;
  postbox::memory_store store;
  postbox::outbox<postbox::memory_store, postbox::json::codec> box{store, postbox::json::codec{}, clock};

  rig() : pn::jetstream_rig(pn::settings().quick()) {}

  template <class T>
  postbox::message_id stage(const std::string& type, T payload, const std::string& key = {}) {
    auto env = postbox::make_envelope(type, std::move(payload), postbox::message_kind::event, clock);
    env.partition_key = key;
    auto tx = store.begin();
    REQUIRE(box.stage(tx, env) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
    return env.id;
  }

  [[nodiscard]] std::uint64_t stored(const std::string& stream = "ORDERS") {
    auto n = js.stream_messages(stream);
    REQUIRE(n.has_value());
    return *n;
  }

  // Every message of `stream` in stream order, read through a fresh durable.
  struct seen {
    std::string subject;
    postbox::envelope<nlohmann::json> env;
  };
  std::vector<seen> read(const std::string& stream, const std::string& filter, std::size_t expected) {
    postbox::jetstream_pull_source<nlohmann::json> src(js, {stream, "reader", filter, 30000ms, -1});
    std::vector<seen> out;
    for (int i = 0; i < 50 && out.size() < expected; ++i) {
      auto got = src.fetch(64, 1000ms);
      if (!got.has_value()) continue;
      for (auto& d : *got) {
        REQUIRE(d.has_value());
        out.push_back({natsMsg_GetSubject(d.native()), *d});
        (void)d.ack();
      }
    }
    return out;
  }
};

postbox::relay_options relay_opts(std::string owner = "relay-1") {
  postbox::relay_options o;
  o.owner = std::move(owner);
  o.jitter_seed = 1;
  o.retry.full_jitter = false;
  o.retry.initial_backoff = 1s;
  return o;
}

postbox::publisher_options one_attempt(std::chrono::milliseconds ack_timeout = 2000ms) {
  postbox::publisher_options o;
  o.ack_timeout = ack_timeout;
  o.max_attempts = 1;
  return o;
}

}  // namespace

TEST_CASE("a relay to JetStream marks a message dispatched only after the stream acknowledged it",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::vector<postbox::message_id> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(r.stage("orders.placed", order{i}, "cust-1"));
  postbox::jetstream_publisher pub(r.js);
  auto opts = relay_opts();
  std::vector<std::uint64_t> stored_at_publish, pending_at_publish;
  opts.on_point = [&](postbox::relay_point p, const postbox::stored_message*) {
    if (p != postbox::relay_point::published) return;
    // The destination returned ok: the stream already has it, the outbox has not marked it.
    stored_at_publish.push_back(r.stored());
    pending_at_publish.push_back(r.store.outbox_summary()->pending);
  };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}), opts, r.clock);
  const auto step = relay.run_once();
  CHECK(step.published == 3);
  CHECK(step.marked == 3);
  CHECK(stored_at_publish == std::vector<std::uint64_t>{1, 2, 3});
  CHECK(pending_at_publish == std::vector<std::uint64_t>{3, 3, 3});
  CHECK(r.store.outbox_summary()->pending == 0);
  // Nats-Msg-Id is the outbox id; type, key and payload travel with it.
  const auto got = r.read("ORDERS", "orders.>", 3);
  REQUIRE(got.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(got[i].env.id == ids[i]);
    CHECK(got[i].subject == "orders.placed");
    CHECK(got[i].env.partition_key == "cust-1");
    CHECK(got[i].env.payload.at("n") == static_cast<int>(i));
  }
}

TEST_CASE("a publish no stream acknowledges fails, stays pending and is retried with backoff under the same id",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const auto id = r.stage("returns.opened", order{1});  // no stream listens on returns.> yet
  postbox::jetstream_publisher pub(r.js, one_attempt());
  postbox::outbox_relay relay(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}), relay_opts(),
                              r.clock);
  const auto first = relay.run_once();
  CHECK(first.failed == 1);
  CHECK(first.marked == 0);
  REQUIRE(first.next_due.has_value());
  CHECK(*first.next_due == r.clock.now() + 1s);
  CHECK(r.store.outbox_summary()->pending == 1);
  CHECK(r.store.outbox_summary()->retrying == 1);
  r.ensure(stream_of("RETURNS", {"returns.>"}));
  CHECK(relay.run_once().claimed == 0);  // its backoff has not passed
  r.clock.advance(1s);
  const auto second = relay.run_once();
  CHECK(second.published == 1);
  CHECK(second.marked == 1);
  CHECK(r.stored("RETURNS") == 1);
  const auto got = r.read("RETURNS", "returns.>", 1);
  REQUIRE(got.size() == 1);
  CHECK(got[0].env.id == id);
}

TEST_CASE("an ack timeout while the server is down is an unknown outcome: republished with the same id, stored once",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.stage("orders.placed", order{1});
  postbox::jetstream_publisher pub(r.js, one_attempt(300ms));
  std::vector<bool> duplicates;
  postbox::jetstream_destination_options dopts;
  dopts.on_ack = [&](const postbox::stored_message&, const postbox::publish_ack& a) {
    duplicates.push_back(a.duplicate);
  };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}, dopts),
                              relay_opts(), r.clock);
  r.srv.stop();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::reconnecting; }));
  const auto first = relay.run_once();  // libnats keeps the publish for the reconnect; no PubAck comes
  CHECK(first.failed == 1);
  CHECK(r.store.outbox_summary()->pending == 1);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::connected; }));
  r.clock.advance(1s);
  postbox::relay_step second;
  // JetStream may need a moment after the restart before it answers publishes.
  for (int i = 0; i < 50 && second.marked == 0; ++i) {
    second = relay.run_once();
    if (second.marked == 0) {
      pn::detail::pause_ms(100);
      r.clock.advance(60s);
    }
  }
  CHECK(second.marked == 1);
  CHECK(r.store.outbox_summary()->pending == 0);
  CHECK(r.stored() == 1);  // whether or not the first attempt landed, the stream has it once
  REQUIRE(duplicates.size() == 1);
  // libnats sent the first attempt after reconnecting, so the stream had
  // stored it: the republish is absorbed as a duplicate.
  CHECK(duplicates[0]);
}

TEST_CASE("a relay crash between publish and mark republishes the batch and the duplicate window keeps one copy",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const int n = 5;
  for (int i = 0; i < n; ++i) r.stage("orders.placed", order{i}, "k" + std::to_string(i % 2));
  postbox::jetstream_publisher pub(r.js);
  std::vector<bool> duplicates;
  postbox::jetstream_destination_options dopts;
  dopts.on_ack = [&](const postbox::stored_message&, const postbox::publish_ack& a) {
    duplicates.push_back(a.duplicate);
  };
  {
    auto opts = relay_opts("relay-crashing");
    opts.on_point = [](postbox::relay_point p, const postbox::stored_message*) {
      if (p == postbox::relay_point::before_mark) throw std::runtime_error("crash before mark");
    };
    postbox::outbox_relay relay(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}, dopts), opts,
                                r.clock);
    CHECK_THROWS_AS(relay.run_once(), std::runtime_error);
  }
  CHECK(r.stored() == static_cast<std::uint64_t>(n));
  CHECK(r.store.outbox_summary()->pending == static_cast<std::uint64_t>(n));  // published, never marked
  // The restarted relay (same owner) takes its leases back and publishes the batch again.
  postbox::outbox_relay restarted(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}, dopts),
                                  relay_opts("relay-crashing"), r.clock);
  CHECK(restarted.run_once().marked == static_cast<std::size_t>(n));
  REQUIRE(duplicates.size() == static_cast<std::size_t>(2 * n));
  for (int i = 0; i < n; ++i) {
    CHECK_FALSE(duplicates[static_cast<std::size_t>(i)]);
    CHECK(duplicates[static_cast<std::size_t>(n + i)]);  // the same ids again: absorbed by the stream
  }
  CHECK(r.stored() == static_cast<std::uint64_t>(n));
  CHECK(r.store.outbox_summary()->pending == 0);
}

TEST_CASE("a key's messages reach the stream in staging order while a failure holds back only that key",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::map<postbox::message_id, std::string> label;
  for (const auto& [key, i] : std::vector<std::pair<std::string, int>>{{"a", 1}, {"b", 1}, {"a", 2}, {"b", 2}, {"a", 3}})
    label[r.stage("orders.placed", order{i}, key)] = key + std::to_string(i);
  postbox::jetstream_publisher pub(r.js);
  auto to_js = postbox::to_jetstream<order>(pub, postbox::json::codec{});
  bool failed_once = false;
  // The first publish of a1 has an unknown outcome (as an ack timeout would).
  postbox::outbox_destination flaky = [&](const postbox::stored_message& m) {
    if (!failed_once && label[m.id] == "a1") {
      failed_once = true;
      return errc::timeout;
    }
    return to_js(m);
  };
  postbox::outbox_relay relay(r.store, flaky, relay_opts(), r.clock);
  CHECK(relay.run_once().published == 2);  // b1, b2
  r.clock.advance(1s);
  CHECK(relay.run_once().published == 3);  // a1, a2, a3
  const auto got = r.read("ORDERS", "orders.>", 5);
  std::vector<std::string> order_seen;
  for (const auto& s : got) order_seen.push_back(label[s.env.id]);
  CHECK(order_seen == std::vector<std::string>{"b1", "b2", "a1", "a2", "a3"});
}

TEST_CASE("one relay with json payloads carries every message type, each to its mapped subject",
          "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.ensure(stream_of("SHOP", {"shop.>"}));
  r.stage("order.placed", order{7});
  r.stage("refund.issued", refund{"damaged"});
  postbox::publisher_options po;
  po.subjects.prefix = "shop.";  // subject = prefix + envelope type
  postbox::jetstream_publisher pub(r.js, po);
  postbox::outbox_relay relay(r.store, postbox::to_jetstream<nlohmann::json>(pub, postbox::json::codec{}),
                              relay_opts(), r.clock);
  CHECK(relay.run_once().marked == 2);
  const auto got = r.read("SHOP", "shop.>", 2);
  REQUIRE(got.size() == 2);
  CHECK(got[0].subject == "shop.order.placed");
  CHECK(got[0].env.payload == nlohmann::json{{"n", 7}});
  CHECK(got[1].subject == "shop.refund.issued");
  CHECK(got[1].env.payload.get<refund>().reason == "damaged");
}

TEST_CASE("a subject function maps each stored message to its subject", "[nats][nats_outbox]") {
  NATS_REQUIRE_SERVER();
  rig r;
  r.stage("orders.placed", order{1}, "eu");
  r.stage("orders.placed", order{2}, "us");
  postbox::jetstream_publisher pub(r.js);
  postbox::jetstream_destination_options dopts;
  dopts.subject = [](const postbox::stored_message& m) { return "orders.by-region." + m.partition_key; };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream<order>(pub, postbox::json::codec{}, dopts),
                              relay_opts(), r.clock);
  CHECK(relay.run_once().marked == 2);
  const auto got = r.read("ORDERS", "orders.>", 2);
  REQUIRE(got.size() == 2);
  CHECK(got[0].subject == "orders.by-region.eu");
  CHECK(got[1].subject == "orders.by-region.us");
}

// ---- Pipelined relay (issue 18): a bounded window of PubAcks outstanding ----

namespace {

postbox::jetstream_pipeline_options pipeline(std::size_t window, std::chrono::milliseconds ack_timeout = 2000ms) {
  postbox::jetstream_pipeline_options o;
  o.window = window;
  o.ack_timeout = ack_timeout;
  return o;
}

// The stream's messages grouped by key, as labels "<key>:<n>" in stream order.
std::map<std::string, std::vector<int>> per_key(const std::vector<rig::seen>& got) {
  std::map<std::string, std::vector<int>> out;
  for (const auto& s : got) out[s.env.partition_key].push_back(s.env.payload.at("n").get<int>());
  return out;
}

std::vector<int> one_to(int n) {
  std::vector<int> v;
  for (int i = 1; i <= n; ++i) v.push_back(i);
  return v;
}

}  // namespace

TEST_CASE("a pipelined relay publishes every row once, in staging order per key, and marks each after its PubAck",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const int per = 100;
  const std::vector<std::string> keys{"k1", "k2", "k3"};
  for (int i = 1; i <= per; ++i)
    for (const auto& k : keys) r.stage("orders.placed", order{i}, k);
  const auto total = static_cast<std::size_t>(per) * keys.size();
  auto opts = relay_opts();
  opts.batch_size = total;
  std::set<postbox::message_id> acked;
  bool every_ok_was_acked = true;
  auto popts = pipeline(16);
  popts.on_ack = [&](const postbox::stored_message& m, const postbox::publish_ack& a) {
    CHECK(a.stream == "ORDERS");
    CHECK_FALSE(a.duplicate);
    acked.insert(m.id);
  };
  opts.on_point = [&](postbox::relay_point p, const postbox::stored_message* m) {
    // The relay counts a row published only when its PubAck came.
    if (p == postbox::relay_point::published && acked.count(m->id) == 0) every_ok_was_acked = false;
  };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, popts),
                              opts, r.clock);
  const auto step = relay.run_once();
  CHECK(step.published == total);
  CHECK(step.marked == total);
  CHECK(every_ok_was_acked);
  CHECK(acked.size() == total);
  CHECK(r.store.outbox_summary()->pending == 0);
  CHECK(r.stored() == total);
  const auto got = r.read("ORDERS", "orders.>", total);
  REQUIRE(got.size() == total);
  std::set<postbox::message_id> ids;
  for (const auto& s : got) ids.insert(s.env.id);
  CHECK(ids == acked);  // each row once, under its outbox id
  for (const auto& [key, ns] : per_key(got)) {
    INFO(key);
    CHECK(ns == one_to(per));
  }
}

TEST_CASE("a pipelined relay marks nothing the stream did not acknowledge and holds back only the failing key",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  for (int i = 1; i <= 3; ++i) {
    r.stage("orders.placed", order{i}, "ret");  // routed to returns.>: no stream listens there yet
    r.stage("orders.placed", order{i}, "ord");
  }
  auto popts = pipeline(4);
  popts.subject = [](const postbox::stored_message& m) {
    return m.partition_key == "ret" ? std::string("returns.opened") : std::string("orders.placed");
  };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, popts),
                              relay_opts(), r.clock);
  const auto first = relay.run_once();
  CHECK(first.marked == 3);  // ord 1..3
  CHECK(first.failed == 1);  // ret 1 (no responders); ret 2 and 3 are released, not attempted
  CHECK(r.store.outbox_summary()->pending == 3);
  CHECK(r.store.outbox_summary()->retrying == 1);
  CHECK(relay.stats().last_error.find("busy") != std::string::npos);
  r.ensure(stream_of("RETURNS", {"returns.>"}));
  r.clock.advance(1s);
  const auto second = relay.run_once();
  CHECK(second.marked == 3);
  CHECK(r.store.outbox_summary()->pending == 0);
  const auto got = r.read("RETURNS", "returns.>", 3);
  REQUIRE(got.size() == 3);
  CHECK(per_key(got)["ret"] == one_to(3));
  CHECK(r.stored("ORDERS") == 3);
}

TEST_CASE("a server stop in the middle of a pipelined batch loses nothing, duplicates nothing and keeps each key's order",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const int per = 60;
  const std::vector<std::string> keys{"a", "b", "c", "d"};
  for (int i = 1; i <= per; ++i)
    for (const auto& k : keys) r.stage("orders.placed", order{i}, k);
  const auto total = static_cast<std::size_t>(per) * keys.size();
  auto opts = relay_opts();
  opts.batch_size = total;
  std::size_t sent = 0;
  auto popts = pipeline(8, 500ms);
  // The publishes still in the dead socket are lost while libnats resends
  // those it had buffered: without the chain, a key's later message could be
  // stored before the retried earlier one (seen in about 1 run in 6 before
  // the chain existed).
  popts.expect_last_id = true;
  popts.subject = [&](const postbox::stored_message&) {
    // Called on the relay's thread as each message is sent: stop the server
    // with part of the batch acknowledged and part in flight.
    if (++sent == total / 2) r.srv.stop();
    return std::string("orders.placed");
  };
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, popts),
                              opts, r.clock);
  const auto first = relay.run_once();
  CHECK(first.marked < total / 2 + 8);  // nothing past the stop was acknowledged
  CHECK(first.failed >= 1);
  CHECK(r.store.outbox_summary()->pending == total - first.marked);
  r.srv.start();
  REQUIRE(postbox_test::eventually([&] { return r.conn.status() == postbox::connection_status::connected; }));
  // Retry (each failed key after its backoff) until the outbox is empty;
  // JetStream may refuse publishes for a moment after its restart.
  std::size_t marked = first.marked;
  REQUIRE(postbox_test::eventually([&] {
    r.clock.advance(60s);
    marked += relay.run_once().marked;
    return r.store.outbox_summary()->pending == 0;
  }));
  CHECK(marked == total);
  CHECK(r.stored() == total);  // every retry of a stored message was absorbed by the duplicate window
  const auto got = r.read("ORDERS", "orders.>", total);
  REQUIRE(got.size() == total);
  std::set<postbox::message_id> ids;
  for (const auto& s : got) ids.insert(s.env.id);
  CHECK(ids.size() == total);
  for (const auto& [key, ns] : per_key(got)) {
    INFO(key);
    CHECK(ns == one_to(per));
  }
}

// ---- Pipelined relay: NATS messages built from the stored bytes ----

namespace {

// The headers of a NATS message, name -> value.
std::map<std::string, std::string> headers_of(natsMsg* msg) {
  std::map<std::string, std::string> out;
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) != NATS_OK || keys == nullptr) return out;
  for (int i = 0; i < count; ++i) {
    const char* v = nullptr;
    if (natsMsgHeader_Get(msg, keys[i], &v) == NATS_OK && v != nullptr) out[keys[i]] = v;
  }
  std::free(static_cast<void*>(keys));
  return out;
}

nlohmann::json body_of(natsMsg* msg) {
  return nlohmann::json::parse(std::string_view(natsMsg_GetData(msg), static_cast<std::size_t>(natsMsg_GetDataLength(msg))));
}

}  // namespace

TEST_CASE("a NATS header block is the wire bytes of its headers, without the empty ones", "[nats][nats_outbox]") {
  postbox::detail::nats_header_block b;
  b.clear();
  b.add("Nats-Msg-Id", "abc");
  b.add("Postbox-Producer", "");  // absent, as an envelope's empty field
  b.add("Postbox-H-", "x-region", "eu");
  CHECK(b.size() == 2);
  CHECK(b.bytes() == "NATS/1.0\r\nNats-Msg-Id: abc\r\nPostbox-H-x-region: eu\r\n\r\n");
  b.clear();
  CHECK(b.size() == 0);
  CHECK(b.bytes() == "NATS/1.0\r\n\r\n");
}

TEST_CASE("a message made from a NATS header block carries the same subject, headers and body either way libnats "
          "builds it",
          "[nats][nats_outbox]") {
  postbox::detail::nats_header_block b;
  const std::string payload = R"({"n":1})";
  for (int round = 0; round < 2; ++round) {  // the second reuses the first's buffers
    INFO("round " << round);
    b.clear();
    b.add("Nats-Msg-Id", round == 0 ? "id-0" : "id-1");
    b.add("Postbox-Type", "orders.placed");
    b.add("Postbox-H-", "x-region", "eu");
    auto raw = b.make("orders.placed", payload, true);
    auto set = b.make("orders.placed", payload, false);
    REQUIRE(raw.has_value());
    REQUIRE(set.has_value());
    const std::map<std::string, std::string> want{{"Nats-Msg-Id", round == 0 ? "id-0" : "id-1"},
                                                  {"Postbox-Type", "orders.placed"},
                                                  {"Postbox-H-x-region", "eu"}};
    for (natsMsg* m : {raw->get(), set->get()}) {
      CHECK(std::string(natsMsg_GetSubject(m)) == "orders.placed");
      CHECK(std::string_view(natsMsg_GetData(m), static_cast<std::size_t>(natsMsg_GetDataLength(m))) == payload);
      std::map<std::string, std::string> got;
      const char** keys = nullptr;
      int count = 0;
      REQUIRE(natsMsgHeader_Keys(m, &keys, &count) == NATS_OK);
      for (int i = 0; i < count; ++i) {
        const char* v = nullptr;
        REQUIRE(natsMsgHeader_Get(m, keys[i], &v) == NATS_OK);
        got[keys[i]] = v;
      }
      std::free(static_cast<void*>(keys));
      CHECK(got == want);
    }
  }
  CHECK(b.make("", payload).status() == errc::invalid_argument);
  // Without headers the message has none (a plain PUB), either way.
  b.clear();
  auto bare = b.make("orders.placed", payload);
  REQUIRE(bare.has_value());
  const char* v = nullptr;
  CHECK(natsMsgHeader_Get(bare->get(), "Nats-Msg-Id", &v) == NATS_NOT_FOUND);
}

TEST_CASE("libnats builds the relay's messages from the header bytes where it exports the constructor",
          "[nats][nats_outbox]") {
  // The Debian/Ubuntu libnats used by CI exports natsMsg_create: if this
  // fails there, the relay silently fell back to one natsMsgHeader_Set per header.
  CHECK(postbox::detail::nats_header_block::raw_available() == (POSTBOX_NATS_RAW_HEADERS != 0));
}

TEST_CASE("a chained pipelined batch is stored whole: each message names the one sent before it",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  for (int i = 1; i <= 5; ++i) r.stage("orders.placed", order{i}, "k");
  auto popts = pipeline(4);
  popts.expect_last_id = true;
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, popts),
                              relay_opts(), r.clock);
  const auto got = relay.run_once();
  CHECK(got.marked == 5);
  CHECK(got.failed == 0);
  CHECK(r.stored("ORDERS") == 5);
  // A wrong predecessor is refused: the chain header is really checked.
  postbox::detail::nats_header_block b;
  b.clear();
  b.add("Nats-Msg-Id", postbox::message_id::generate().to_string());
  b.add("Nats-Expected-Last-Msg-Id", "not-the-last-one");
  auto msg = b.make("orders.placed", R"({"n":6})");
  REQUIRE(msg.has_value());
  jsErrCode jerr{};
  jsPubAck* pa = nullptr;
  CHECK(js_PublishMsg(&pa, r.js.native(), msg->get(), nullptr, &jerr) != NATS_OK);
  jsPubAck_Destroy(pa);
  CHECK(r.stored("ORDERS") == 5);
}

namespace {

// Every message of `stream` in stream order, as libnats received it.
std::vector<postbox::nats_msg_ptr> read_raw(postbox::jetstream& js, const std::string& stream, std::size_t expected) {
  postbox::jetstream_pull_source<nlohmann::json> src(js, {stream, "raw-reader", "orders.>", 30000ms, -1});
  std::vector<postbox::nats_msg_ptr> out;
  for (int i = 0; i < 50 && out.size() < expected; ++i) {
    auto got = src.fetch(64, 1000ms);
    if (!got.has_value()) continue;
    for (auto& d : *got) {
      natsMsg* copy = nullptr;
      // A copy of what arrived: subject, headers and body.
      REQUIRE(natsMsg_Create(&copy, natsMsg_GetSubject(d.native()), nullptr, natsMsg_GetData(d.native()),
                             natsMsg_GetDataLength(d.native())) == NATS_OK);
      postbox::nats_msg_ptr owned(copy);
      for (const auto& [k, v] : headers_of(d.native())) REQUIRE(natsMsgHeader_Set(copy, k.c_str(), v.c_str()) == NATS_OK);
      out.push_back(std::move(owned));
      (void)d.ack();
    }
  }
  return out;
}

// An envelope using every field the NATS headers carry.
postbox::envelope<nlohmann::json> every_field(const postbox::clock& clk, int n) {
  auto env = postbox::make_envelope("orders.placed", nlohmann::json{{"n", n}, {"text", "é \" \\ \n 😀"}, {"x", 0.25}},
                                    postbox::message_kind::command, clk);
  env.schema_version = 3;
  env.causation_id = postbox::message_id::generate();
  env.producer = "shop";
  env.partition_key = "cust-" + std::to_string(n % 2);
  env.tenant = "acme";
  env.trace = *postbox::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61rcWkgMzE");
  env.deadline = env.occurred_at + 30s;
  env.attempt = 2;
  env.headers.set("x-region", "eu");
  env.headers.set("x-empty", "");
  return env;
}

}  // namespace

TEST_CASE("a pipelined relay publishes each stored envelope as the same NATS message the bridge builds from it",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::vector<postbox::envelope<nlohmann::json>> staged;
  for (int n = 0; n < 4; ++n) {
    staged.push_back(every_field(r.clock, n));
    auto tx = r.store.begin();
    REQUIRE(r.box.stage(tx, staged.back()) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  // A minimal envelope too: the optional headers stay absent.
  staged.push_back(postbox::make_envelope("orders.placed", nlohmann::json{{"n", 9}}, postbox::message_kind::event, r.clock));
  {
    auto tx = r.store.begin();
    REQUIRE(r.box.stage(tx, staged.back()) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  postbox::outbox_relay relay(r.store,
                              postbox::to_jetstream_pipelined<nlohmann::json>(r.js, postbox::json::codec{}, pipeline(4)),
                              relay_opts(), r.clock);
  CHECK(relay.run_once().marked == staged.size());
  const auto got = read_raw(r.js, "ORDERS", staged.size());
  REQUIRE(got.size() == staged.size());
  for (std::size_t i = 0; i < staged.size(); ++i) {
    INFO("message " << i);
    auto want = postbox::to_nats_msg(staged[i], "orders.placed");
    REQUIRE(want.has_value());
    CHECK(std::string(natsMsg_GetSubject(got[i].get())) == "orders.placed");
    CHECK(headers_of(got[i].get()) == headers_of(want->get()));
    CHECK(body_of(got[i].get()) == body_of(want->get()));
    // And the consumer side decodes the same envelope.
    postbox::nats_decode_error e;
    auto back = postbox::from_nats_msg<nlohmann::json>(got[i].get(), e);
    REQUIRE(back.has_value());
    CHECK(back->id == staged[i].id);
    CHECK(back->payload == staged[i].payload);
    CHECK(back->headers.get("x-region") == staged[i].headers.get("x-region"));
    CHECK(back->kind == staged[i].kind);
    CHECK(back->schema_version == staged[i].schema_version);
  }
  // Schema version 1 and kind event (the minimal envelope) go without their
  // headers; version 3 and command (every_field) carry them.
  const auto minimal = headers_of(got.back().get());
  CHECK(minimal.count("Postbox-Schema-Version") == 0);
  CHECK(minimal.count("Postbox-Kind") == 0);
  CHECK(minimal.size() == 4);  // Nats-Msg-Id, Postbox-Type, Postbox-Occurred-At, Postbox-Correlation-Id
  const auto full = headers_of(got.front().get());
  CHECK(full.at("Postbox-Schema-Version") == "3");
  CHECK(full.at("Postbox-Kind") == "command");
}

TEST_CASE("a NATS message in the older layout, with schema version 1 and kind event written out, decodes as the "
          "current layout that leaves them out",
          "[nats][nats_outbox][pipelined]") {
  auto env = postbox::make_envelope("orders.placed", nlohmann::json{{"n", 1}}, postbox::message_kind::event);
  env.partition_key = "cust-1";
  auto current = postbox::to_nats_msg(env, "orders.placed");
  REQUIRE(current.has_value());
  REQUIRE(headers_of(current->get()).count("Postbox-Kind") == 0);
  auto older = postbox::to_nats_msg(env, "orders.placed");
  REQUIRE(older.has_value());
  REQUIRE(natsMsgHeader_Set(older->get(), "Postbox-Schema-Version", "1") == NATS_OK);
  REQUIRE(natsMsgHeader_Set(older->get(), "Postbox-Kind", "event") == NATS_OK);
  postbox::nats_decode_error e1, e2;
  auto a = postbox::from_nats_msg<nlohmann::json>(current->get(), e1);
  auto b = postbox::from_nats_msg<nlohmann::json>(older->get(), e2);
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  for (const auto* d : {&*a, &*b}) {
    CHECK(d->id == env.id);
    CHECK(d->type == "orders.placed");
    CHECK(d->schema_version == 1);
    CHECK(d->kind == postbox::message_kind::event);
    CHECK(d->occurred_at == env.occurred_at);
    CHECK(d->partition_key == "cust-1");
    CHECK(d->payload == env.payload);
  }
  // A written-out value other than the default still wins over it.
  REQUIRE(natsMsgHeader_Set(older->get(), "Postbox-Kind", "command") == NATS_OK);
  REQUIRE(natsMsgHeader_Set(older->get(), "Postbox-Schema-Version", "2") == NATS_OK);
  auto c = postbox::from_nats_msg<nlohmann::json>(older->get(), e2);
  REQUIRE(c.has_value());
  CHECK(c->kind == postbox::message_kind::command);
  CHECK(c->schema_version == 2);
}

TEST_CASE("a pipelined relay takes rows the stored-bytes view refuses through the full decode, with the same results",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const auto id = [] { return postbox::message_id::generate(); };
  auto stage_text = [&](postbox::message_id mid, const std::string& key, std::string body) {
    postbox::stored_message m;
    m.id = mid;
    m.type = "orders.placed";
    m.partition_key = key;
    m.body = std::move(body);
    auto tx = r.store.begin();
    REQUIRE(r.box.stage_encoded(tx, std::move(m)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  };
  const auto a = id(), b = id(), c = id();
  // Valid, but not as json::encode writes it: spaces, an escaped type, a
  // timestamp with an offset and a member the envelope does not define.
  stage_text(a, "k1",
             "{ \"id\" : \"" + a.to_string() +
                 "\", \"type\": \"orders.plac\\u0065d\", \"occurred_at\": \"2026-12-06T11:00:00+01:00\","
                 " \"extra\": true, \"payload\": { \"n\" : 1 } }");
  // A payload that does not convert to `order`: bad_type, dead-lettered.
  stage_text(b, "k2",
             "{\"id\":\"" + b.to_string() +
                 "\",\"type\":\"orders.placed\",\"occurred_at\":\"2026-12-06T10:00:00.000000000Z\",\"payload\":{\"m\":2}}");
  // Not JSON at all: parse_error, dead-lettered.
  stage_text(c, "k3", "{\"id\":");
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, pipeline(4)),
                              relay_opts(), r.clock);
  const auto step = relay.run_once();
  CHECK(step.marked == 1);
  CHECK(step.dead_lettered == 2);
  auto dead = r.store.outbox_dead_letters({});
  REQUIRE(dead.has_value());
  std::map<postbox::message_id, std::string> reason;
  for (const auto& d : *dead) reason[d.message.id] = d.reason;
  CHECK(reason[b] == "bad_type");
  CHECK(reason[c] == "parse_error");
  const auto got = read_raw(r.js, "ORDERS", 1);
  REQUIRE(got.size() == 1);
  const auto headers = headers_of(got[0].get());
  CHECK(headers.at(postbox::nats_headers::id) == a.to_string());
  CHECK(headers.at(postbox::nats_headers::type) == "orders.placed");
  CHECK(headers.at(postbox::nats_headers::occurred_at) == "2026-12-06T10:00:00.000000000Z");  // normalized, as before
  CHECK(body_of(got[0].get()) == nlohmann::json{{"n", 1}});
}

TEST_CASE("with check_payload off a pipelined relay sends a stored payload that does not convert to T unchanged",
          "[nats][nats_outbox][pipelined]") {
  NATS_REQUIRE_SERVER();
  rig r;
  const auto mid = postbox::message_id::generate();
  postbox::stored_message m;
  m.id = mid;
  m.type = "orders.placed";
  m.body = "{\"id\":\"" + mid.to_string() +
           "\",\"type\":\"orders.placed\",\"occurred_at\":\"2026-12-06T10:00:00.000000000Z\",\"payload\":{\"m\":2}}";
  {
    auto tx = r.store.begin();
    REQUIRE(r.box.stage_encoded(tx, std::move(m)) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
  auto popts = pipeline(4);
  popts.check_payload = false;
  postbox::outbox_relay relay(r.store, postbox::to_jetstream_pipelined<order>(r.js, postbox::json::codec{}, popts),
                              relay_opts(), r.clock);
  const auto step = relay.run_once();
  CHECK(step.marked == 1);
  CHECK(step.dead_lettered == 0);
  const auto got = read_raw(r.js, "ORDERS", 1);
  REQUIRE(got.size() == 1);
  CHECK(body_of(got[0].get()) == nlohmann::json{{"m", 2}});
  // The consumer is where it now fails to become an `order`.
  postbox::nats_decode_error e;
  CHECK_FALSE(postbox::from_nats_msg<order>(got[0].get(), e).has_value());
  CHECK(e.field == "payload");
}

#endif  // POSTBOX_NATS_SERVER
