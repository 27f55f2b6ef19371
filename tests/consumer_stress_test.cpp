// SPDX-License-Identifier: MIT
// Stress for postbox::consumer: concurrent consumers with random failures; every message acked or dead-lettered, never both, never lost.
#include <postbox/consumer.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

using env_t = postbox::envelope<int>;

// Zero-delay retries and defers: nothing ever waits on time, so the manual
// clock never has to move (timers due "now" fire at once on the timer thread).
postbox::consumer_options stress_options(postbox::manual_clock& clock, std::size_t threads, std::uint64_t seed) {
  postbox::consumer_options o;
  o.threads = threads;
  o.max_in_flight = 32;
  o.retry.max_attempts = 4;
  o.retry.initial_backoff = 0s;
  o.retry.max_backoff = 0s;
  o.jitter_seed = seed;
  o.defer_delay = 0s;
  o.clock = &clock;
  o.classify = postbox::permanent_on<std::invalid_argument>();
  o.receive_wait = 1ms;
  return o;
}

// A random outcome per call: ack, retry, transient or permanent exception,
// reject, defer. Thread-local generators, so handlers never share state.
postbox::settlement random_outcome(std::atomic<std::uint64_t>* acks, int payload) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  const auto roll = rng() % 100;
  if (roll < 60) {
    acks[payload].fetch_add(1, std::memory_order_relaxed);
    return postbox::settlement::ack();
  }
  if (roll < 75) return postbox::settlement::retry();
  if (roll < 85) throw std::runtime_error("transient");
  if (roll < 90) throw std::invalid_argument("permanent");
  if (roll < 95) return postbox::settlement::reject("rejected at random");
  return postbox::settlement::defer();
}

// Every payload in [0, n) ends exactly once among acks and dead letters.
void check_exactly_once(const std::vector<postbox::dead_letter<int>>& dead, const std::atomic<std::uint64_t>* acks,
                        int n) {
  std::vector<std::uint32_t> outcomes(static_cast<std::size_t>(n), 0);
  std::uint64_t sum = 0;
  for (const auto& d : dead) {
    REQUIRE(d.message.has_value());
    ++outcomes.at(static_cast<std::size_t>(d.message->payload));
    sum += static_cast<std::uint64_t>(d.message->payload);
  }
  std::size_t wrong = 0;
  for (int i = 0; i < n; ++i) {
    const auto a = acks[i].load();
    outcomes[static_cast<std::size_t>(i)] += static_cast<std::uint32_t>(a);
    sum += a * static_cast<std::uint64_t>(i);
    if (outcomes[static_cast<std::size_t>(i)] != 1) ++wrong;
  }
  CHECK(wrong == 0);
  CHECK(sum == static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(n - 1) / 2);  // checksum
}

// After a shutdown: every payload in [0, n) ends exactly once among acks,
// the report's returned messages, late releases, the channel's rest and
// dead letters.
void check_each_once_after_shutdown(const postbox::shutdown_report<int>& report, const std::vector<env_t>& late,
                                    postbox::channel<env_t>& ch, postbox::dead_letter_queue<int>& dlq,
                                    const std::atomic<std::uint64_t>* acks, int n) {
  std::vector<std::uint32_t> seen(static_cast<std::size_t>(n), 0);
  for (const auto& e : report.returned) ++seen.at(static_cast<std::size_t>(e.payload));
  for (const auto& e : late) ++seen.at(static_cast<std::size_t>(e.payload));
  while (auto e = ch.try_receive()) ++seen.at(static_cast<std::size_t>(e->payload));
  for (const auto& d : dlq.list()) ++seen.at(static_cast<std::size_t>(d.message->payload));
  std::size_t wrong = 0;
  std::uint64_t sum = 0;
  for (int i = 0; i < n; ++i) {
    const auto total = seen[static_cast<std::size_t>(i)] + acks[i].load();
    if (total != 1) ++wrong;
    sum += total * static_cast<std::uint64_t>(i);
  }
  CHECK(wrong == 0);
  CHECK(sum == static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(n - 1) / 2);  // checksum
}

}  // namespace

TEST_CASE("two consumers with random failures on one channel settle every message once: acked or dead-lettered",
          "[consumer][stress]") {
  const int n = static_cast<int>(postbox_test::scaled(20000));
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(1024);
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n)}, clock);
  auto acks = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(n));
  auto handler = [&](const env_t& e) { return random_outcome(acks.get(), e.payload); };
  postbox::consumer a(postbox::channel_source<int>(ch, "numbers"), handler, dlq, stress_options(clock, 3, 1));
  postbox::consumer b(postbox::channel_source<int>(ch, "numbers"), handler, dlq, stress_options(clock, 3, 2));

  std::atomic<int> send_failures{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < 2; ++p)
    producers.emplace_back([&, p] {
      for (int i = p; i < n; i += 2)
        if (ch.send(postbox::make_envelope(std::string("test.int"), i)) != postbox::send_status::ok) send_failures.fetch_add(1);
    });
  for (auto& t : producers) t.join();
  REQUIRE(send_failures.load() == 0);

  auto settled = [&] {
    const auto sa = a.stats();
    const auto sb = b.stats();
    return sa.acked + sb.acked + sa.dead_lettered + sb.dead_lettered == static_cast<std::uint64_t>(n);
  };
  REQUIRE(postbox_test::eventually(settled, std::chrono::seconds(100)));
  const auto ra = a.shutdown(0s);
  const auto rb = b.shutdown(0s);
  CHECK(ra.clean());
  CHECK(rb.clean());
  const auto sa = a.stats();
  const auto sb = b.stats();
  CHECK(sa.in_flight + sb.in_flight == 0);
  CHECK(sa.dead_letter_refused + sb.dead_letter_refused == 0);
  CHECK(sa.received + sb.received == static_cast<std::uint64_t>(n));
  CHECK(sa.retried + sb.retried > 0);
  CHECK(sa.deferred + sb.deferred > 0);
  check_exactly_once(dlq.list(), acks.get(), n);
}

TEST_CASE("worker threads keep per-key order and exclusivity under random retries", "[consumer][stress]") {
  constexpr int keys = 16;
  const int n = static_cast<int>(postbox_test::scaled(20000));
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(1024);
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n)}, clock);
  auto acks = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(n));
  std::atomic<bool> busy[keys] = {};
  std::vector<int> last_started(keys, -1);  // per key; handed between threads by the consumer's lock
  std::atomic<int> violations{0};
  auto o = stress_options(clock, 4, 3);
  o.max_in_flight = 64;
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"), [&](const env_t& e) {
    const int k = e.payload % keys;
    if (busy[k].exchange(true)) violations.fetch_add(1);  // two handlers of one key at once
    if (e.payload < last_started[static_cast<std::size_t>(k)]) violations.fetch_add(1);  // out of order
    last_started[static_cast<std::size_t>(k)] = e.payload;
    busy[k].store(false);
    return random_outcome(acks.get(), e.payload);
  }, dlq, o);

  std::atomic<int> send_failures{0};
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      auto e = postbox::make_envelope(std::string("test.int"), i);
      e.partition_key = "k";  // (two steps: g++ 12 warns falsely on "k" + to_string at -O2)
      e.partition_key += std::to_string(i % keys);
      if (ch.send(std::move(e)) != postbox::send_status::ok) send_failures.fetch_add(1);
    }
  });
  producer.join();
  REQUIRE(send_failures.load() == 0);
  REQUIRE(postbox_test::eventually([&] {
    const auto s = c.stats();
    return s.acked + s.dead_lettered == static_cast<std::uint64_t>(n);
  }, std::chrono::seconds(100)));
  CHECK(c.shutdown(0s).clean());
  CHECK(violations.load() == 0);
  check_exactly_once(dlq.list(), acks.get(), n);
}

TEST_CASE("two stream group consumers with random failures commit every record once all are settled",
          "[consumer][stress]") {
  const int n = static_cast<int>(postbox_test::scaled(10000));
  postbox::manual_clock clock;
  postbox::stream<env_t> orders(4, {}, clock);
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n)}, clock);
  auto acks = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(n));
  auto handler = [&](const env_t& e) { return random_outcome(acks.get(), e.payload); };
  // Both members join before either polls: no rebalance during the run, so no redelivery.
  postbox::stream_group_source<int> sa(orders, "billing", "orders", 16);
  postbox::stream_group_source<int> sb(orders, "billing", "orders", 16);
  postbox::consumer a(std::move(sa), handler, dlq, stress_options(clock, 2, 4));
  postbox::consumer b(std::move(sb), handler, dlq, stress_options(clock, 2, 5));
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      auto e = postbox::make_envelope(std::string("test.int"), i);
      e.partition_key = "customer-";
      e.partition_key += std::to_string(i % 37);
      const std::string key = e.partition_key;
      (void)orders.append(key, std::move(e));
    }
  });
  producer.join();
  auto group = orders.group("billing");
  // A record's commit (its settle hook) comes just before its consumer counts
  // it, so wait for the counts too, not only for the lag.
  const auto settled = [&] {
    const auto ta = a.stats();
    const auto tb = b.stats();
    return ta.acked + tb.acked + ta.dead_lettered + tb.dead_lettered;
  };
  REQUIRE(postbox_test::eventually([&] { return group.lag() == 0 && settled() >= static_cast<std::uint64_t>(n); },
                                   std::chrono::seconds(100)));
  CHECK(group.lag() == 0);
  CHECK(settled() == static_cast<std::uint64_t>(n));
  CHECK(a.shutdown(0s).clean());
  CHECK(b.shutdown(0s).clean());
  check_exactly_once(dlq.list(), acks.get(), n);
}

TEST_CASE("shutdown while producers run loses nothing: every message is settled, returned, or still queued",
          "[consumer][stress]") {
  const int n = static_cast<int>(postbox_test::scaled(20000));
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(static_cast<std::size_t>(n));  // producers never block
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n)}, clock);
  auto acks = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(n));
  std::atomic<int> send_failures{0};
  auto c = std::make_unique<postbox::consumer<int>>(
      postbox::channel_source<int>(ch, "numbers"),
      [&](const env_t& e) { return random_outcome(acks.get(), e.payload); }, dlq, stress_options(clock, 3, 6));
  std::vector<std::thread> producers;
  for (int p = 0; p < 2; ++p)
    producers.emplace_back([&, p] {
      for (int i = p; i < n; i += 2) {
        auto e = postbox::make_envelope(std::string("test.int"), i);
        e.partition_key = "k";
        e.partition_key += std::to_string(i % 5);
        if (ch.try_send(std::move(e)) != postbox::send_status::ok) send_failures.fetch_add(1);
      }
    });
  REQUIRE(postbox_test::eventually([&] { return c->stats().acked > static_cast<std::uint64_t>(n) / 8; }));
  auto report = c->shutdown(0s);  // while producers are still sending, and handlers run
  for (auto& t : producers) t.join();
  REQUIRE(send_failures.load() == 0);
  REQUIRE(postbox_test::eventually([&] { return c->stats().in_flight == 0; }));  // abandoned handlers returned
  auto late = c->take_released();
  c.reset();

  check_each_once_after_shutdown(report, late, ch, dlq, acks.get(), n);
}

TEST_CASE("nodes freed on other threads come back to the consumer's node pool intact", "[consumer][stress]") {
  // The receiving side allocates blocks, stamps each with a number and hands
  // it to one of two freeing threads (as settling workers free item nodes),
  // which check the stamp and free it while the allocator keeps reusing what
  // comes back. Every number is checked once (checksum); TSan sees the pool's
  // release CAS and acquire exchange.
  const std::uint64_t n = postbox_test::scaled(100'000);
  postbox::detail::consumer_node_pool pool;
  postbox::channel<std::uint64_t*> handoff(256);
  std::atomic<std::uint64_t> sum{0};
  std::atomic<std::uint64_t> bad{0};
  auto freer = [&] {
    while (auto p = handoff.receive()) {
      std::uint64_t* block = *p;
      if (block[1] != ~block[0]) bad.fetch_add(1, std::memory_order_relaxed);
      sum.fetch_add(block[0], std::memory_order_relaxed);
      postbox::detail::consumer_node_pool::deallocate(block);
    }
  };
  std::thread f1(freer);
  std::thread f2(freer);
  for (std::uint64_t i = 1; i <= n; ++i) {
    auto* block = static_cast<std::uint64_t*>(pool.allocate(4 * sizeof(std::uint64_t)));
    block[0] = i;
    block[1] = ~i;
    REQUIRE(handoff.send(block) == postbox::send_status::ok);
  }
  handoff.close();
  f1.join();
  f2.join();
  CHECK(bad.load() == 0);
  CHECK(sum.load() == n * (n + 1) / 2);
}

namespace {

// Unkeyed messages, so each poll or worker claims runs of ready messages (a
// lone poller or worker runs them straight from the channel); a shutdown lands while
// runs are claimed, begun and half settled. Many short lives: one in
// several catches a run mid-way (its runner then hands back the messages it
// has not begun). `pollers`: threads calling poll() when `threads` is 0.
void claimed_runs_life(std::size_t threads, int pollers, std::uint64_t seed) {
  const int n = static_cast<int>(postbox_test::scaled(2000));
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(static_cast<std::size_t>(n));
  postbox::dead_letter_queue<int> dlq(postbox::dead_letter_options{.capacity = static_cast<std::size_t>(n)}, clock);
  auto acks = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    REQUIRE(ch.try_send(postbox::make_envelope(std::string("test.int"), i)) == postbox::send_status::ok);
  auto o = stress_options(clock, threads, seed);
  o.max_in_flight = 64;
  auto c = std::make_unique<postbox::consumer<int>>(
      postbox::channel_source<int>(ch, "numbers"),
      [&](const env_t& e) { return random_outcome(acks.get(), e.payload); }, dlq, o);
  std::atomic<bool> stop_polling{false};
  std::vector<std::thread> poll_threads;
  if (threads == 0)
    for (int p = 0; p < pollers; ++p)
      poll_threads.emplace_back([&] {
        while (!stop_polling.load()) (void)c->poll();
      });
  REQUIRE(postbox_test::eventually([&] { return c->stats().acked > static_cast<std::uint64_t>(n) / 4; }));
  auto report = c->shutdown(0s);
  stop_polling.store(true);
  for (auto& t : poll_threads) t.join();
  REQUIRE(postbox_test::eventually([&] { return c->stats().in_flight == 0; }));  // abandoned handlers returned
  auto late = c->take_released();
  c.reset();

  check_each_once_after_shutdown(report, late, ch, dlq, acks.get(), n);
}

}  // namespace

TEST_CASE("runs of messages claimed by one or two pollers or by one or two workers lose nothing when shutdown lands among "
          "them",
          "[consumer][stress][claim]") {
  const auto [threads, pollers] = GENERATE(std::pair<std::size_t, int>{0, 1}, std::pair<std::size_t, int>{0, 2},
                                           std::pair<std::size_t, int>{1, 0}, std::pair<std::size_t, int>{2, 0});
  for (std::uint64_t life = 0; life < 30; ++life) {
    INFO("threads " << threads << ", pollers " << pollers << ", life " << life);
    claimed_runs_life(threads, pollers, 11 + life);
  }
}
