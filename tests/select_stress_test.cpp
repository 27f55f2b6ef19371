// SPDX-License-Identifier: MIT
// Stress for postbox::select: senders and receivers select over 2-8 channels while a close races them; checksum and order.
#include <postbox/select.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr std::uint64_t encode(std::uint64_t producer, std::uint64_t channel, std::uint64_t seq) {
  return producer << 48 | channel << 40 | seq;
}

struct stress_outcome {
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
  std::uint64_t duplicates = 0;
  std::uint64_t out_of_order = 0;
  std::uint64_t not_sent_but_received = 0;
  std::uint64_t bad_selects = 0;  ///< a select that ran no handler on ok, or more than one
};

/// P producers each select over a send case per channel (one completes per
/// select); C consumers select over a receive case per channel; a closer
/// closes every channel after `close_after` sends. Every value names its
/// producer, the channel it went through and its per-producer sequence.
template <std::size_t K, std::size_t... I>
stress_outcome run(int producers, int consumers, std::uint64_t per_producer, std::uint64_t close_after,
                   std::index_sequence<I...>) {
  std::array<std::unique_ptr<postbox::channel<std::uint64_t>>, K> chans;
  for (auto& c : chans) c = std::make_unique<postbox::channel<std::uint64_t>>(2);
  std::vector<std::vector<std::uint64_t>> sent(static_cast<std::size_t>(producers));
  std::vector<std::vector<std::uint64_t>> got(static_cast<std::size_t>(consumers));
  std::atomic<std::uint64_t> total_sent{0};
  std::atomic<std::uint64_t> bad_selects{0};

  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      auto& mine = sent[static_cast<std::size_t>(p)];
      for (std::uint64_t i = 0; i < per_producer; ++i) {
        std::array<std::uint64_t, K> values{encode(static_cast<std::uint64_t>(p), I, i)...};
        int handlers = 0;
        std::size_t which = K;
        const auto r = postbox::select(
            postbox::on_send(*chans[I], values[I], [&handlers, &which] { ++handlers, which = I; })...);
        if (r.status == postbox::select_status::closed) return;
        if (!r.ok() || handlers != 1 || which != r.index) {
          bad_selects.fetch_add(1);
          return;
        }
        mine.push_back(values[which]);
        total_sent.fetch_add(1);
      }
    });
  }
  for (int c = 0; c < consumers; ++c) {
    threads.emplace_back([&, c] {
      auto& mine = got[static_cast<std::size_t>(c)];
      for (;;) {
        int handlers = 0;
        const auto r = postbox::select(postbox::on_receive(*chans[I], [&](std::uint64_t v) {
          ++handlers;
          mine.push_back(v);
        })...);
        if (r.status == postbox::select_status::closed) break;
        if (!r.ok() || handlers != 1) bad_selects.fetch_add(1);
      }
      // One channel is closed and drained; the closer closes them all, so
      // drain the rest with plain receives.
      for (auto& ch : chans)
        while (auto v = ch->receive()) mine.push_back(*v);
    });
  }
  threads.emplace_back([&] {
    postbox_test::eventually([&] { return total_sent.load() >= close_after; });
    for (auto& ch : chans) ch->close();
  });
  for (auto& t : threads) t.join();

  stress_outcome out;
  out.bad_selects = bad_selects.load();
  std::set<std::uint64_t> sent_set;
  for (auto& s : sent) {
    out.sent += s.size();
    sent_set.insert(s.begin(), s.end());
  }
  std::set<std::uint64_t> seen;
  for (auto& g : got) {
    std::vector<std::uint64_t> last(static_cast<std::size_t>(producers) * K, 0);
    std::vector<bool> any(static_cast<std::size_t>(producers) * K, false);
    for (auto v : g) {
      ++out.received;
      if (!seen.insert(v).second) ++out.duplicates;
      if (sent_set.count(v) == 0) ++out.not_sent_but_received;
      const auto key = static_cast<std::size_t>((v >> 48) * K + ((v >> 40) & 0xff));
      const auto seq = v & ((std::uint64_t{1} << 40) - 1);
      if (any[key] && seq <= last[key]) ++out.out_of_order;
      any[key] = true;
      last[key] = seq;
    }
  }
  return out;
}

template <std::size_t K>
void check_run(int producers, int consumers, std::uint64_t per_producer, std::uint64_t close_after) {
  const auto o = run<K>(producers, consumers, per_producer, close_after, std::make_index_sequence<K>{});
  INFO("channels " << K << ", sent " << o.sent << ", received " << o.received);
  CHECK(o.bad_selects == 0);
  CHECK(o.duplicates == 0);
  CHECK(o.not_sent_but_received == 0);
  CHECK(o.out_of_order == 0);
  CHECK(o.received == o.sent);  // every completed send was received, once
}

}  // namespace

TEST_CASE("selecting senders and receivers over 2 channels lose and duplicate nothing", "[select][stress]") {
  const auto n = postbox_test::scaled(20000);
  check_run<2>(2, 2, n, 2 * n);      // runs to the end, then closes
  check_run<2>(2, 2, n, n);          // closes mid-run
}

TEST_CASE("selecting senders and receivers over 4 channels lose and duplicate nothing", "[select][stress]") {
  const auto n = postbox_test::scaled(10000);
  check_run<4>(3, 2, n, 3 * n);
  check_run<4>(2, 3, n, n / 2);
}

TEST_CASE("selecting senders and receivers over 8 channels lose and duplicate nothing", "[select][stress]") {
  const auto n = postbox_test::scaled(5000);
  check_run<8>(2, 2, n, 2 * n);
  check_run<8>(3, 3, n, n);
}
