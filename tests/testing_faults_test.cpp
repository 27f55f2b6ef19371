// SPDX-License-Identifier: MIT
// Specification tests for postbox::testing::fault_injector: each fault on sources and destinations, determinism per seed, counters.
#include <postbox/channel.hpp>
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/store.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;
using postbox::receive_status;
using postbox::testing::fault_injector;
using postbox::testing::fault_plan;

struct tick {
  static constexpr const char* message_type = "tick";
  int n = 0;
};
void to_json(nlohmann::json& j, const tick& t) { j = {{"n", t.n}}; }
void from_json(const nlohmann::json& j, tick& t) { j.at("n").get_to(t.n); }

namespace {

using env_t = postbox::envelope<tick>;

// A source over a fixed list whose items carry settle hooks that record the action.
class listed_source {
 public:
  using payload_type = tick;
  static constexpr bool redelivers = false;

  listed_source(std::vector<int> ns, std::shared_ptr<std::vector<std::string>> log)
      : items_(ns.begin(), ns.end()), log_(std::move(log)) {}

  postbox::receive_result<postbox::inbound<tick>> receive(postbox::duration) {
    if (items_.empty()) return postbox::receive_result<postbox::inbound<tick>>(receive_status::closed);
    const int n = items_.front();
    items_.pop_front();
    auto log = log_;
    return postbox::inbound<tick>::of(postbox::make_envelope(tick{n}),
                                      [log, n](const postbox::settle_action& a) {
                                        log->push_back(std::to_string(n) + ":" + std::string(postbox::to_string(a.what)));
                                      });
  }
  [[nodiscard]] std::string_view name() const noexcept { return "listed"; }

 private:
  std::deque<int> items_;
  std::shared_ptr<std::vector<std::string>> log_;
};

listed_source numbers(int count, std::shared_ptr<std::vector<std::string>> log = nullptr) {
  std::vector<int> ns;
  for (int i = 0; i < count; ++i) ns.push_back(i);
  if (!log) log = std::make_shared<std::vector<std::string>>();
  return listed_source(ns, log);
}

// Everything a source yields until it reports closed (or `limit` receives), as
// numbers; poison items as -1.
template <class Source>
std::vector<int> read_all(Source& s, int limit = 1000) {
  std::vector<int> out;
  for (int i = 0; i < limit; ++i) {
    auto r = s.receive(postbox::duration{0});
    if (r.status() == receive_status::closed) break;
    if (!r.has_value()) continue;
    out.push_back(r->message ? r->message->payload.n : -1);
  }
  return out;
}

postbox::stored_message stored(int n) {
  auto e = postbox::make_envelope(tick{n});
  postbox::stored_message m;
  m.id = e.id;
  m.type = e.type;
  m.body = postbox::json::encode(e);
  return m;
}

}  // namespace

TEST_CASE("with every message duplicated a source yields each twice, the copy right after it", "[testing_faults]") {
  fault_injector faults({.seed = 1, .duplicate = {.every_nth = 1}});
  auto s = faults.source(numbers(3));
  CHECK(read_all(s) == std::vector<int>{0, 0, 1, 1, 2, 2});
  CHECK(faults.counts().duplicated == 3);
  CHECK(faults.counts().seen == 3);
}

TEST_CASE("every_nth duplicates exactly the n-th, 2n-th, ... message", "[testing_faults]") {
  fault_injector faults({.seed = 1, .duplicate = {.every_nth = 3}});
  auto s = faults.source(numbers(7));
  CHECK(read_all(s) == std::vector<int>{0, 1, 2, 2, 3, 4, 5, 5, 6});
}

TEST_CASE("the duplicate copy carries no settle hook, so the source is settled once per message",
          "[testing_faults]") {
  auto log = std::make_shared<std::vector<std::string>>();
  fault_injector faults({.seed = 1, .duplicate = {.every_nth = 1}});
  auto s = faults.source(numbers(1, log));
  auto first = s.receive(0ms);
  auto second = s.receive(0ms);
  REQUIRE(first.has_value());
  REQUIRE(second.has_value());
  CHECK(static_cast<bool>(first->settle));
  CHECK_FALSE(static_cast<bool>(second->settle));
  CHECK(first->message->id == second->message->id);
}

TEST_CASE("the same seed injects the same faults and another seed different ones", "[testing_faults]") {
  auto run = [](std::uint64_t seed) {
    fault_injector faults({.seed = seed, .duplicate = {.probability = 0.3}, .reorder_window = 4,
                           .drop = {.probability = 0.1}});
    auto s = faults.source(numbers(200));
    return read_all(s);
  };
  const auto a = run(11);
  CHECK(a == run(11));
  CHECK(a != run(12));
}

TEST_CASE("a reorder window lets messages out of order, none lost or duplicated, none later than the window allows",
          "[testing_faults]") {
  constexpr int count = 500;
  constexpr std::size_t window = 5;
  fault_injector faults({.seed = 3, .reorder_window = window});
  auto s = faults.source(numbers(count));
  const auto got = read_all(s, 10 * count);
  REQUIRE(got.size() == count);
  auto sorted = got;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < count; ++i) REQUIRE(sorted[static_cast<std::size_t>(i)] == i);  // a permutation
  CHECK(got != sorted);
  CHECK(faults.counts().reordered > 0);
  // A message can be overtaken, but never let out more than window-1 places early.
  for (std::size_t pos = 0; pos < got.size(); ++pos) {
    CHECK(static_cast<std::size_t>(got[pos]) <= pos + window - 1);
  }
}

TEST_CASE("a delayed message is held until delay_by has passed on the injector's clock", "[testing_faults]") {
  postbox::manual_clock clock;
  fault_injector faults({.seed = 1, .delay = {.every_nth = 1}, .delay_by = 5s}, clock);
  auto s = faults.source(numbers(1));
  CHECK(s.receive(0ms).status() == receive_status::empty);
  CHECK(s.backlog() == 1);
  clock.advance(4s);
  CHECK(s.receive(0ms).status() == receive_status::empty);
  clock.advance(1s);
  auto r = s.receive(0ms);
  REQUIRE(r.has_value());
  CHECK(r->message->payload.n == 0);
  CHECK(s.receive(0ms).status() == receive_status::closed);
  CHECK(faults.counts().delayed == 1);
}

TEST_CASE("a transient failure makes one receive empty and the message comes with the next", "[testing_faults]") {
  fault_injector faults({.seed = 1, .fail = {.every_nth = 2}});
  auto s = faults.source(numbers(3));
  CHECK(s.receive(0ms)->message->payload.n == 0);
  CHECK(s.receive(0ms).status() == receive_status::empty);  // message 1 failed once
  CHECK(s.receive(0ms)->message->payload.n == 1);
  CHECK(s.receive(0ms)->message->payload.n == 2);
  CHECK(faults.counts().failed == 1);
}

TEST_CASE("a permanent failure turns the message into a poison item naming the error", "[testing_faults]") {
  fault_injector faults({.seed = 1, .fail = {.every_nth = 1}, .fail_with = errc::bad_type, .fail_permanent = true});
  auto s = faults.source(numbers(1));
  auto r = s.receive(0ms);
  REQUIRE(r.has_value());
  CHECK_FALSE(r->message.has_value());
  CHECK(r->poison.reason == "bad_type");
  CHECK(static_cast<bool>(r->settle));
}

TEST_CASE("a dropped message is never yielded and is acked at its source", "[testing_faults]") {
  auto log = std::make_shared<std::vector<std::string>>();
  fault_injector faults({.seed = 1, .drop = {.every_nth = 2}});
  auto s = faults.source(numbers(4, log));
  CHECK(read_all(s) == std::vector<int>{0, 2});
  CHECK(*log == std::vector<std::string>{"1:ack", "3:ack"});
  CHECK(faults.counts().dropped == 2);
}

TEST_CASE("poison bytes make the codec fail typed, and a consumer dead-letters the message with that reason",
          "[testing_faults]") {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(8);
  REQUIRE(ch.try_send(postbox::make_envelope(tick{1}, clock)) == postbox::send_status::ok);
  REQUIRE(ch.try_send(postbox::make_envelope(tick{2}, clock)) == postbox::send_status::ok);
  ch.close();
  fault_injector faults({.seed = 5, .poison = {.every_nth = 2}}, clock);
  postbox::dead_letter_queue<tick> dead({.capacity = 10}, clock);
  postbox::consumer_options opts;
  opts.threads = 0;
  opts.clock = &clock;
  int handled = 0;
  postbox::consumer c(faults.source(postbox::channel_source<tick>(ch, "ticks"), postbox::json::codec{}),
                      [&](const env_t&) {
                        ++handled;
                        return postbox::settlement::ack();
                      },
                      dead, opts);
  for (int i = 0; i < 4; ++i) (void)c.poll();
  CHECK(handled == 1);
  const auto letters = dead.list();
  REQUIRE(letters.size() == 1);
  CHECK(letters.front().reason == "parse_error");
  CHECK_FALSE(letters.front().raw.empty());
  CHECK(faults.counts().poisoned == 1);
}

TEST_CASE("poison on a source without a codec is refused with invalid_argument", "[testing_faults]") {
  fault_injector faults({.seed = 1, .poison = {.every_nth = 1}});
  auto s = faults.source(numbers(1));
  CHECK_THROWS_AS(s.receive(0ms), postbox::error);
}

TEST_CASE("a destination duplicate publishes the message twice", "[testing_faults]") {
  fault_injector faults({.seed = 1, .duplicate = {.every_nth = 1}});
  std::vector<postbox::message_id> got;
  auto dest = faults.destination([&](const postbox::stored_message& m) {
    got.push_back(m.id);
    return errc::ok;
  });
  const auto m = stored(1);
  CHECK(dest(m) == errc::ok);
  CHECK(got == std::vector<postbox::message_id>{m.id, m.id});
}

TEST_CASE("a transient destination failure fails that call only", "[testing_faults]") {
  fault_injector faults({.seed = 1, .fail = {.every_nth = 1}, .fail_with = errc::busy});
  int calls = 0;
  auto dest = faults.destination([&](const postbox::stored_message&) {
    ++calls;
    return errc::ok;
  });
  const auto m = stored(1);
  CHECK(dest(m) == errc::busy);
  CHECK(calls == 0);
}

TEST_CASE("a permanent destination failure fails every later call for the same message", "[testing_faults]") {
  fault_injector faults({.seed = 1, .fail = {.every_nth = 2}, .fail_with = errc::bad_type, .fail_permanent = true});
  int calls = 0;
  auto dest = faults.destination([&](const postbox::stored_message&) {
    ++calls;
    return errc::ok;
  });
  const auto a = stored(1);
  const auto b = stored(2);
  CHECK(dest(a) == errc::ok);
  CHECK(dest(b) == errc::bad_type);
  CHECK(dest(b) == errc::bad_type);  // the retry fails again
  CHECK(dest(a) == errc::ok);
  CHECK(calls == 2);
  CHECK(faults.counts().failed == 2);
}

TEST_CASE("a dropped publish returns ok and publishes nothing", "[testing_faults]") {
  fault_injector faults({.seed = 1, .drop = {.every_nth = 1}});
  int calls = 0;
  auto dest = faults.destination([&](const postbox::stored_message&) {
    ++calls;
    return errc::ok;
  });
  CHECK(dest(stored(1)) == errc::ok);
  CHECK(calls == 0);
  CHECK(faults.counts().dropped == 1);
}

TEST_CASE("a delayed publish happens once delay_by has passed, on a later call or release_due", "[testing_faults]") {
  postbox::manual_clock clock;
  fault_injector faults({.seed = 1, .delay = {.every_nth = 2}, .delay_by = 10s}, clock);
  std::vector<int> got;
  auto dest = faults.destination([&](const postbox::stored_message& m) {
    got.push_back(postbox::json::decode<tick>(m.body)->payload.n);
    return errc::ok;
  });
  CHECK(dest(stored(1)) == errc::ok);
  CHECK(dest(stored(2)) == errc::ok);  // held
  CHECK(faults.held() == 1);
  CHECK(faults.release_due() == 0);
  clock.advance(10s);
  CHECK(dest(stored(3)) == errc::ok);  // publishes 3, then the due 2
  CHECK(got == std::vector<int>{1, 3, 2});
  CHECK(faults.held() == 0);
}

TEST_CASE("a destination reorder window holds messages and flush lets the rest out", "[testing_faults]") {
  fault_injector faults({.seed = 9, .reorder_window = 3});
  std::vector<int> got;
  auto dest = faults.destination([&](const postbox::stored_message& m) {
    got.push_back(postbox::json::decode<tick>(m.body)->payload.n);
    return errc::ok;
  });
  for (int i = 0; i < 40; ++i) CHECK(dest(stored(i)) == errc::ok);
  CHECK(faults.held() == 2);
  CHECK(faults.flush() == 2);
  REQUIRE(got.size() == 40);
  auto sorted = got;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 40; ++i) CHECK(sorted[static_cast<std::size_t>(i)] == i);
  CHECK(got != sorted);
}

TEST_CASE("poison on a destination corrupts the stored body so a decoding destination fails with parse_error",
          "[testing_faults]") {
  postbox::channel<env_t> ch(8);
  fault_injector faults({.seed = 2, .poison = {.every_nth = 1}});
  auto dest = faults.destination(postbox::to_channel(ch, postbox::json::codec{}));
  CHECK(dest(stored(1)) == errc::parse_error);
  CHECK(ch.size_approx() == 0);
  CHECK(faults.counts().poisoned == 1);
}

TEST_CASE("an outbox relay behind a failing destination retries and publishes each message once it passes",
          "[testing_faults]") {
  postbox::manual_clock clock;
  postbox::memory_store store;
  postbox::outbox box(store, postbox::json::codec{}, clock);
  postbox::testing::capture_sink sink;
  fault_injector faults({.seed = 4, .fail = {.every_nth = 2}, .fail_with = errc::busy}, clock);
  postbox::relay_options ro;
  ro.retry.full_jitter = false;
  ro.retry.initial_backoff = 1s;
  postbox::outbox_relay relay(store, faults.destination(sink.destination<tick>(postbox::json::codec{})), ro, clock);
  {
    auto tx = store.begin();
    for (int i = 0; i < 4; ++i) {
      auto e = postbox::make_envelope(tick{i}, clock);
      e.partition_key = "k" + std::to_string(i);
      REQUIRE(box.stage(tx, e) == errc::ok);
    }
    REQUIRE(tx.commit() == errc::ok);
  }
  for (int round = 0; round < 10 && sink.count() < 4; ++round) {
    (void)relay.run_once();
    clock.advance(1s);
  }
  CHECK(sink.count() == 4);
  CHECK(faults.counts().failed >= 2);
  for (const auto& e : sink.published<tick>()) CHECK(sink.times(e.id) == 1);
}

TEST_CASE("the report names every count", "[testing_faults]") {
  fault_injector faults({.seed = 1, .duplicate = {.every_nth = 1}});
  auto s = faults.source(numbers(2));
  (void)read_all(s);
  CHECK(faults.report() == "seen=2 duplicated=2 reordered=0 delayed=0 failed=0 dropped=0 poisoned=0 late_errors=0");
  CHECK(faults.counts().injected() == 2);
}

TEST_CASE("threads publishing through one faulty destination lose nothing: every message arrives, duplicates counted",
          "[testing_faults][stress]") {
  const int per_thread = static_cast<int>(postbox_test::scaled(1000));
  constexpr int threads = 4;
  fault_injector faults({.seed = 21, .duplicate = {.every_nth = 2}, .reorder_window = 8});
  std::mutex mutex;
  std::vector<int> arrivals(static_cast<std::size_t>(threads * per_thread), 0);
  auto dest = faults.destination<postbox::envelope<tick>>([&](const postbox::envelope<tick>& e) {
    std::lock_guard g(mutex);
    ++arrivals[static_cast<std::size_t>(e.payload.n)];
    return errc::ok;
  });
  std::atomic<int> refused{0};  // Catch2's assertions are not thread-safe: count, check after the join
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        if (dest(postbox::make_envelope(tick{t * per_thread + i})) != errc::ok) refused.fetch_add(1);
      }
    });
  }
  for (auto& th : pool) th.join();
  CHECK(refused.load() == 0);
  (void)faults.flush();
  const auto counts = faults.counts();
  CHECK(counts.seen == static_cast<std::uint64_t>(threads * per_thread));
  CHECK(counts.duplicated == counts.seen / 2);
  std::uint64_t total = 0;
  for (const int a : arrivals) {
    CHECK((a == 1 || a == 2));
    total += static_cast<std::uint64_t>(a);
  }
  CHECK(total == counts.seen + counts.duplicated);
  CHECK(faults.held() == 0);
}

TEST_CASE("a consumer with worker threads behind a faulty source handles every message, duplicates included",
          "[testing_faults][stress]") {
  const int count = static_cast<int>(postbox_test::scaled(2000));
  postbox::channel<env_t> ch(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) REQUIRE(ch.try_send(postbox::make_envelope(tick{i})) == postbox::send_status::ok);
  ch.close();
  fault_injector faults({.seed = 8, .duplicate = {.probability = 0.25}, .reorder_window = 4});
  postbox::dead_letter_queue<tick> dead({.capacity = 10});
  postbox::consumer_options opts;
  opts.threads = 2;
  std::mutex mutex;
  std::vector<int> handled(static_cast<std::size_t>(count), 0);
  std::atomic<std::uint64_t> calls{0};
  postbox::consumer c(faults.source(postbox::channel_source<tick>(ch, "ticks")),
                      [&](const env_t& e) {
                        {
                          std::lock_guard g(mutex);
                          ++handled[static_cast<std::size_t>(e.payload.n)];
                        }
                        calls.fetch_add(1);
                        return postbox::settlement::ack();
                      },
                      dead, opts);
  const auto report = c.drain(60s);
  CHECK(report.finished);
  const auto counts = faults.counts();
  CHECK(counts.seen == static_cast<std::uint64_t>(count));
  CHECK(counts.duplicated > 0);
  CHECK(calls.load() == counts.seen + counts.duplicated);
  std::uint64_t total = 0;
  for (const int h : handled) {
    CHECK((h == 1 || h == 2));  // nothing lost, nothing handled more than once beyond its one duplicate
    total += static_cast<std::uint64_t>(h);
  }
  CHECK(total == counts.seen + counts.duplicated);
  CHECK(dead.size() == 0);
}
