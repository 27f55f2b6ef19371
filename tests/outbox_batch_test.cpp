// SPDX-License-Identifier: MIT
// Tests for outbox_relay with an outbox_batch_destination (a destination that takes each leased batch at once).
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::stored_message;

namespace {

struct item {
  static constexpr const char* message_type = "item";
  int n = 0;
};
void to_json(nlohmann::json& j, const item& i) { j = {{"n", i.n}}; }

struct rig {
  postbox::manual_clock clock;
  postbox::memory_store store;
  postbox::outbox<postbox::memory_store, postbox::json::codec> box{store, postbox::json::codec{}, clock};
  std::map<postbox::message_id, std::string> label;  // id -> "<key><n>"

  void stage(const std::string& key, int n) {
    auto env = postbox::make_envelope(item{n}, clock);
    env.partition_key = key;
    label[env.id] = key + std::to_string(n);
    auto tx = store.begin();
    REQUIRE(box.stage(tx, env) == errc::ok);
    REQUIRE(tx.commit() == errc::ok);
  }
};

postbox::relay_options opts() {
  postbox::relay_options o;
  o.owner = "batch-relay";
  o.jitter_seed = 1;
  o.retry.full_jitter = false;
  o.retry.initial_backoff = 1s;
  return o;
}

}  // namespace

TEST_CASE("a batch destination gets the whole leased batch in one call and only rows reported ok are marked",
          "[outbox][outbox_batch]") {
  rig r;
  for (int i = 1; i <= 3; ++i) r.stage("a", i);
  for (int i = 1; i <= 2; ++i) r.stage("b", i);
  std::vector<std::vector<std::string>> calls;
  postbox::outbox_batch_destination dest = [&](std::span<const stored_message> batch, std::span<errc> results,
                                               std::stop_token) {
    calls.emplace_back();
    for (std::size_t i = 0; i < batch.size(); ++i) {
      calls.back().push_back(r.label[batch[i].id]);
      results[i] = r.label[batch[i].id] == "b2" ? errc::timeout : errc::ok;
    }
  };
  postbox::outbox_relay relay(r.store, dest, opts(), r.clock);
  const auto step = relay.run_once();
  REQUIRE(calls.size() == 1);
  CHECK(calls[0] == std::vector<std::string>{"a1", "a2", "a3", "b1", "b2"});
  CHECK(step.published == 4);
  CHECK(step.failed == 1);
  CHECK(step.marked == 4);
  CHECK(r.store.outbox_summary()->pending == 1);
  CHECK(r.store.outbox_summary()->retrying == 1);
}

TEST_CASE("after a batch destination fails a key's message, that key's later rows stay pending and go again in order",
          "[outbox][outbox_batch]") {
  rig r;
  for (int i = 1; i <= 4; ++i) r.stage("a", i);
  r.stage("b", 1);
  std::vector<std::string> delivered;  // what the destination reported ok, in call order
  bool fail_a2 = true;
  postbox::outbox_batch_destination dest = [&](std::span<const stored_message> batch, std::span<errc> results,
                                               std::stop_token) {
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const std::string l = r.label[batch[i].id];
      if (l == "a2" && fail_a2) {
        fail_a2 = false;
        results[i] = errc::busy;
        continue;
      }
      // a3 and a4 report ok (a pipelined destination may already have sent
      // them), yet the relay must not mark them behind the failed a2.
      results[i] = errc::ok;
      delivered.push_back(l);
    }
  };
  postbox::outbox_relay relay(r.store, dest, opts(), r.clock);
  const auto first = relay.run_once();
  CHECK(first.marked == 2);  // a1, b1
  CHECK(first.failed == 1);  // a2
  CHECK(r.store.outbox_summary()->pending == 3);
  CHECK(r.store.outbox_summary()->retrying == 1);  // only a2 counts an attempt; a3, a4 were released
  CHECK(relay.run_once().claimed == 0);  // the key waits for a2's backoff
  r.clock.advance(1s);
  delivered.clear();
  const auto second = relay.run_once();
  CHECK(second.marked == 3);
  CHECK(delivered == std::vector<std::string>{"a2", "a3", "a4"});
  CHECK(r.store.outbox_summary()->pending == 0);
}

TEST_CASE("a batch destination that throws leaves the batch pending as a transient failure", "[outbox][outbox_batch]") {
  rig r;
  r.stage("a", 1);
  r.stage("b", 1);
  int calls = 0;
  postbox::outbox_batch_destination dest = [&](std::span<const stored_message> batch, std::span<errc> results,
                                               std::stop_token) {
    if (++calls == 1) throw std::runtime_error("broken destination");
    for (std::size_t i = 0; i < batch.size(); ++i) results[i] = errc::ok;
  };
  postbox::outbox_relay relay(r.store, dest, opts(), r.clock);
  const auto first = relay.run_once();
  CHECK(first.failed == 2);
  CHECK(first.dead_lettered == 0);
  CHECK(first.marked == 0);
  CHECK(relay.stats().last_error.find("handler_error") != std::string::npos);
  r.clock.advance(1s);
  CHECK(relay.run_once().marked == 2);
  CHECK(calls == 2);
}

TEST_CASE("an empty batch destination is refused at construction", "[outbox][outbox_batch]") {
  rig r;
  CHECK_THROWS_AS(postbox::outbox_relay(r.store, postbox::outbox_batch_destination{}, opts(), r.clock),
                  postbox::error);
}
