// SPDX-License-Identifier: MIT
// Stress tests for postbox::channel: nothing lost, nothing duplicated, per-producer order kept.
#include <postbox/channel.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <set>
#include <thread>
#include <vector>

namespace {

using postbox::receive_status;
using postbox::send_status;

constexpr std::uint64_t encode(std::uint64_t producer, std::uint64_t seq) { return producer << 40 | seq; }
constexpr std::uint64_t producer_of(std::uint64_t v) { return v >> 40; }
constexpr std::uint64_t seq_of(std::uint64_t v) { return v & ((std::uint64_t{1} << 40) - 1); }

enum class mode { blocking, spinning, mixed };

struct stress_config {
  int producers;
  int consumers;
  std::uint64_t per_producer;
  std::size_t capacity;
  std::uint64_t start_ticket = 0;
  bool close_races_sends = false;  ///< a third thread closes mid-run
  mode how = mode::mixed;
};

struct stress_outcome {
  std::uint64_t sent_ok = 0;
  std::uint64_t received = 0;
  std::uint64_t duplicates = 0;
  std::uint64_t out_of_order = 0;
  std::uint64_t sum_sent = 0;
  std::uint64_t sum_received = 0;
  bool sends_after_close_ok = false;
  std::uint64_t unexpected_status = 0;  ///< a send returned neither ok nor closed
};

// Runs producers and consumers; every consumer records what it got, and the
// checks afterwards compare what was sent with what was received.
template <class Shape>
stress_outcome run_stress(const stress_config& cfg) {
  postbox::channel<std::uint64_t, Shape> ch(cfg.capacity, postbox::detail::initial_ticket{cfg.start_ticket});
  std::vector<std::vector<std::uint64_t>> got(static_cast<std::size_t>(cfg.consumers));
  std::vector<std::uint64_t> sent_ok(static_cast<std::size_t>(cfg.producers), 0);
  std::vector<std::uint64_t> sent_sum(static_cast<std::size_t>(cfg.producers), 0);
  std::atomic<std::uint64_t> total_ok{0};
  std::atomic<int> producers_done{0};
  std::atomic<bool> ok_after_close{false};
  std::atomic<std::uint64_t> unexpected_status{0};

  std::vector<std::thread> threads;
  for (int p = 0; p < cfg.producers; ++p) {
    threads.emplace_back([&, p] {
      const auto up = static_cast<std::uint64_t>(p);
      for (std::uint64_t i = 0; i < cfg.per_producer; ++i) {
        const std::uint64_t v = encode(up, i);
        const bool use_try = cfg.how == mode::spinning || (cfg.how == mode::mixed && i % 3 == 0);
        send_status s;
        if (use_try) {
          while ((s = ch.try_send(v)) == send_status::full) std::this_thread::yield();
        } else {
          s = ch.send(v);
        }
        if (s == send_status::closed) break;
        if (s != send_status::ok) {  // Catch2 assertions are not thread-safe: count instead
          unexpected_status.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        sent_ok[static_cast<std::size_t>(p)]++;
        sent_sum[static_cast<std::size_t>(p)] += v;
        total_ok.fetch_add(1, std::memory_order_relaxed);
      }
      if (producers_done.fetch_add(1) + 1 == cfg.producers && !cfg.close_races_sends) ch.close();
    });
  }
  std::thread closer;
  if (cfg.close_races_sends) {
    closer = std::thread([&] {
      const std::uint64_t half = cfg.per_producer * static_cast<std::uint64_t>(cfg.producers) / 2;
      while (total_ok.load(std::memory_order_relaxed) < half) std::this_thread::yield();
      ch.close();
      // Every send that starts after close() returned must fail.
      if (ch.try_send(encode(63, 0)) != send_status::closed) ok_after_close = true;
    });
  }
  for (int c = 0; c < cfg.consumers; ++c) {
    threads.emplace_back([&, c] {
      auto& mine = got[static_cast<std::size_t>(c)];
      const bool use_try = cfg.how == mode::spinning || (cfg.how == mode::mixed && c % 2 == 1);
      for (;;) {
        if (use_try) {
          auto r = ch.try_receive_result();
          if (r) {
            mine.push_back(*r);
          } else if (r.status() == receive_status::closed) {
            break;
          } else {
            std::this_thread::yield();
          }
        } else {
          auto v = ch.receive();
          if (!v) break;
          mine.push_back(*v);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  if (closer.joinable()) closer.join();

  stress_outcome out;
  out.sends_after_close_ok = ok_after_close.load();
  out.unexpected_status = unexpected_status.load();
  for (int p = 0; p < cfg.producers; ++p) {
    out.sent_ok += sent_ok[static_cast<std::size_t>(p)];
    out.sum_sent += sent_sum[static_cast<std::size_t>(p)];
  }
  std::vector<std::vector<std::uint8_t>> seen(static_cast<std::size_t>(cfg.producers),
                                              std::vector<std::uint8_t>(cfg.per_producer, 0));
  for (const auto& mine : got) {
    std::vector<std::int64_t> last(static_cast<std::size_t>(cfg.producers), -1);
    for (std::uint64_t v : mine) {
      const auto p = static_cast<std::size_t>(producer_of(v));
      const auto i = seq_of(v);
      if (seen[p][i]++ != 0) out.duplicates++;
      if (static_cast<std::int64_t>(i) <= last[p]) out.out_of_order++;
      last[p] = static_cast<std::int64_t>(i);
      out.received++;
      out.sum_received += v;
    }
  }
  return out;
}

void check(const stress_outcome& o) {
  CHECK(o.duplicates == 0);
  CHECK(o.out_of_order == 0);
  CHECK(o.received == o.sent_ok);
  CHECK(o.sum_received == o.sum_sent);
  CHECK_FALSE(o.sends_after_close_ok);
  CHECK(o.unexpected_status == 0);
}

const std::uint64_t near_wrap = (std::uint64_t{1} << 63) - 1000;

}  // namespace

TEST_CASE("spsc delivers every message once and in order", "[channel][stress]") {
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(2'000'000), 64}));
}

TEST_CASE("mpsc delivers every message once and in per-producer order", "[channel][stress]") {
  check(run_stress<postbox::mpsc>({3, 1, postbox_test::scaled(500'000), 64}));
}

TEST_CASE("spmc delivers every message once and in order at every consumer", "[channel][stress]") {
  check(run_stress<postbox::spmc>({1, 3, postbox_test::scaled(1'500'000), 64}));
}

TEST_CASE("mpmc delivers every message once and in per-producer order", "[channel][stress]") {
  check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(500'000), 64}));
}

TEST_CASE("mpmc with spinning try operations loses and duplicates nothing", "[channel][stress]") {
  check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(300'000), 16, 0, false, mode::spinning}));
}

TEST_CASE("mpmc with blocking operations on a tiny ring loses and duplicates nothing", "[channel][stress]") {
  check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(200'000), 2, 0, false, mode::blocking}));
}

TEST_CASE("every shape keeps its guarantees across the ticket counters' wrap-around", "[channel][stress]") {
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(200'000), 4, near_wrap}));
  check(run_stress<postbox::mpsc>({3, 1, postbox_test::scaled(100'000), 4, near_wrap}));
  check(run_stress<postbox::spmc>({1, 3, postbox_test::scaled(200'000), 2, near_wrap}));
  check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(100'000), 8, near_wrap}));
}

TEST_CASE("capacity one channels hand over every message exactly once", "[channel][stress]") {
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(200'000), 1}));
  check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(100'000), 1}));
}

TEST_CASE("spsc on a tiny ring with both sides spinning on try operations hands over every message once",
          "[channel][stress]") {
  // The per-slot states: the consumer keeps up, so it reads each cell's
  // state while the producer writes the next one, on every lap of the ring.
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(300'000), 1, 0, false, mode::spinning}));
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(300'000), 2, near_wrap, false, mode::spinning}));
}

TEST_CASE("spsc with both sides blocking on a capacity-one ring loses and duplicates nothing", "[channel][stress]") {
  check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(100'000), 1, near_wrap, false, mode::blocking}));
}

TEST_CASE("spsc stats never count more received than sent nor more queued than capacity while messages flow",
          "[channel][stress]") {
  postbox::channel<std::uint64_t, postbox::spsc> ch(2);
  const std::uint64_t n = postbox_test::scaled(100'000);
  std::atomic<bool> done{false};
  std::uint64_t bad = 0;
  std::uint64_t sum = 0;
  std::thread producer([&] {
    for (std::uint64_t i = 1; i <= n; ++i)
      while (ch.try_send(i) != send_status::ok) std::this_thread::yield();
  });
  std::thread consumer([&] {
    for (std::uint64_t got = 0; got < n;) {
      if (auto v = ch.try_receive()) {
        sum += *v;
        ++got;
      } else {
        std::this_thread::yield();
      }
    }
    done.store(true, std::memory_order_release);
  });
  while (!done.load(std::memory_order_acquire)) {
    const postbox::channel_stats s = ch.stats();
    if (s.received > s.sent || s.depth > s.capacity || ch.size_approx() > ch.capacity()) ++bad;
    std::this_thread::yield();  // three threads on as few as two cores
  }
  producer.join();
  consumer.join();
  CHECK(bad == 0);
  CHECK(sum == n * (n + 1) / 2);
  CHECK(ch.stats().sent == n);
  CHECK(ch.stats().received == n);
}

TEST_CASE("a close racing the senders: every ok send is received once and later sends fail", "[channel][stress]") {
  for (int round = 0; round < 3; ++round) {
    check(run_stress<postbox::mpmc>({3, 3, postbox_test::scaled(100'000), 1, near_wrap, true}));
    check(run_stress<postbox::spsc>({1, 1, postbox_test::scaled(100'000), 2, 0, true}));
    check(run_stress<postbox::mpsc>({3, 1, postbox_test::scaled(100'000), 4, 0, true}));
  }
}

// --- teardown: endpoints dropped and close() while threads block ----------

namespace {
/// One round: two senders and two receivers on a tiny endpoint channel, each
/// thread with its own endpoint; the main thread drops its own endpoints (or
/// closes) at a round-dependent moment while the others spin or park.
/// Returns false when something was lost, duplicated or reordered.
bool endpoint_teardown_round(int round, std::uint64_t per_sender) {
  constexpr std::uint64_t senders = 2;
  auto [tx, rx] = postbox::make_channel<std::uint64_t>(2);
  std::vector<std::atomic<std::uint64_t>> sent_ok(senders);
  std::vector<std::vector<std::uint64_t>> got(2);
  std::vector<std::thread> threads;
  // Receivers stop early in "receivers leave" rounds, so senders must wake
  // with closed instead of hanging on the full ring.
  const bool receivers_leave = round % 3 == 1;
  for (std::size_t r = 0; r < 2; ++r) {
    threads.emplace_back([&got, r, receivers_leave, per_sender, mine = rx]() mutable {
      auto& out = got[r];
      for (;;) {
        if (receivers_leave && out.size() >= per_sender / 2) return;  // drops its endpoint
        auto m = mine.receive();
        if (!m) return;
        out.push_back(*m);
      }
    });
  }
  for (std::uint64_t s = 0; s < senders; ++s) {
    threads.emplace_back([&sent_ok, s, per_sender, mine = tx]() mutable {
      for (std::uint64_t i = 0; i < per_sender; ++i) {
        if (mine.send((s << 32) | i) != postbox::send_status::ok) return;
        sent_ok[s].store(i + 1, std::memory_order_relaxed);
      }
    });
  }
  // Let the round reach a different point each time before the main thread
  // lets go: the threads are sending, blocked on a full ring, or parked.
  for (int k = 0; k < round % 7; ++k) std::this_thread::yield();
  if (round % 3 == 2) tx.close();
  { auto drop_tx = std::move(tx); auto drop_rx = std::move(rx); }
  for (auto& t : threads) t.join();

  // Every message received was sent ok, once, and in per-sender order; when
  // receivers stayed to the end, every ok send was received.
  std::vector<std::uint64_t> next(senders * 2, 0);
  std::set<std::uint64_t> seen;
  for (std::size_t r = 0; r < 2; ++r) {
    std::vector<std::uint64_t> last(senders, 0);
    std::vector<bool> any(senders, false);
    for (auto v : got[r]) {
      const auto s = v >> 32, i = v & 0xffffffffu;
      if (s >= senders || i >= sent_ok[s].load() || !seen.insert(v).second) return false;
      if (any[s] && i <= last[s]) return false;
      any[s] = true;
      last[s] = i;
    }
  }
  if (!receivers_leave) {
    std::uint64_t total_ok = 0;
    for (auto& n : sent_ok) total_ok += n.load();
    if (seen.size() != total_ok) return false;
  }
  return true;
}
}  // namespace

TEST_CASE("dropping endpoints and closing while senders and receivers block loses and duplicates nothing",
          "[channel][stress][teardown]") {
  const int rounds = static_cast<int>(postbox_test::scaled(1000));
  int bad = 0;
  for (int round = 0; round < rounds; ++round)
    if (!endpoint_teardown_round(round, 64)) ++bad;
  CHECK(bad == 0);
}

// The armed waiting protocol under load: in every round the consumers drain
// the ring and all of them park (the producers wait for that), then the
// producers send a burst larger than the ring, so the consumers are woken
// once per park, all together, and the producers park on full and are
// woken by receives, once per park as well. Nothing lost, nothing
// duplicated, no thread left asleep.
TEST_CASE("mpmc bursts to several parked receivers lose and duplicate nothing", "[channel][stress][armed]") {
  constexpr int producers = 2;
  constexpr int consumers = 3;
  constexpr std::uint64_t burst = 24;  // per producer per round; the ring holds 8
  const std::uint64_t rounds = postbox_test::scaled(1'000);
  postbox::channel<std::uint64_t, postbox::mpmc> ch(8);
  auto& not_empty = postbox::detail::channel_access::not_empty(ch);
  std::atomic<std::uint64_t> received{0};
  std::atomic<std::uint64_t> sum{0};
  std::atomic<std::uint64_t> order_errors{0};
  std::vector<std::atomic<std::uint8_t>> seen(static_cast<std::size_t>(producers * rounds * burst));
  const auto index_of = [&](std::uint64_t v) {
    return static_cast<std::size_t>(producer_of(v) * rounds * burst + seq_of(v) - 1);
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < consumers; ++c) {
    threads.emplace_back([&] {
      std::uint64_t last[producers] = {};
      while (auto v = ch.receive()) {
        if (seq_of(*v) <= last[producer_of(*v)]) order_errors.fetch_add(1);
        last[producer_of(*v)] = seq_of(*v);
        seen[index_of(*v)].fetch_add(1);
        sum.fetch_add(*v);
        received.fetch_add(1);
      }
    });
  }
  std::atomic<std::uint64_t> round_go{0};
  std::atomic<int> round_done{0};
  std::atomic<int> send_failures{0};
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      std::uint64_t seq = 0;
      for (std::uint64_t r = 1; r <= rounds; ++r) {
        while (round_go.load() < r) std::this_thread::yield();
        for (std::uint64_t k = 0; k < burst; ++k)
          if (ch.send(encode(static_cast<std::uint64_t>(p), ++seq)) != send_status::ok) send_failures.fetch_add(1);
        round_done.fetch_add(1);
      }
    });
  }
  bool all_parked = true;
  for (std::uint64_t r = 1; r <= rounds; ++r) {
    // Every consumer announced on the not-empty event count: the burst
    // meets consumers that are parking or asleep.
    all_parked = all_parked && postbox_test::eventually([&] { return not_empty.threads_waiting_approx() == std::uint32_t{consumers}; });
    round_go.store(r);
    const int done = static_cast<int>(r) * producers;
    REQUIRE(postbox_test::eventually([&] { return round_done.load() == done; }));
    REQUIRE(postbox_test::eventually([&] { return received.load() == r * producers * burst; }));
  }
  ch.close();
  for (auto& t : threads) t.join();
  CHECK(all_parked);
  CHECK(send_failures.load() == 0);
  const std::uint64_t total = producers * rounds * burst;
  CHECK(received.load() == total);
  std::uint64_t expected = 0;
  for (std::uint64_t p = 0; p < producers; ++p)
    for (std::uint64_t s = 1; s <= rounds * burst; ++s) expected += encode(p, s);
  CHECK(sum.load() == expected);
  CHECK(order_errors.load() == 0);
  std::uint64_t wrong = 0;
  for (auto& s : seen) wrong += s.load() != 1 ? 1 : 0;
  CHECK(wrong == 0);
}
