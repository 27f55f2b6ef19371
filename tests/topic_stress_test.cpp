// SPDX-License-Identifier: MIT
// Stress for postbox::topic: publishers, block subscribers and churning subscriptions; order and checksum.
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

TEST_CASE("every block subscriber sees every message once in per-publisher order while others churn", "[topic][stress]") {
  constexpr int publishers = 3;
  constexpr int subscribers = 3;
  const std::uint64_t per_pub = postbox_test::scaled(20000);
  postbox::topic<std::uint64_t> t;
  std::vector<postbox::subscription<std::uint64_t>> subs;
  for (int i = 0; i < subscribers; ++i) subs.push_back(t.subscribe(postbox::subscription_options{64, postbox::overflow::block, {}, {}}));

  std::atomic<bool> stop_churn{false};
  std::atomic<std::uint64_t> churn_errors{0};
  std::thread churn([&] {
    const postbox::overflow policies[] = {postbox::overflow::block, postbox::overflow::drop_oldest,
                                          postbox::overflow::drop_newest, postbox::overflow::fail};
    for (std::uint64_t round = 0; !stop_churn.load(); ++round) {
      auto s = t.subscribe(postbox::subscription_options{8, policies[round % 4], round % 3 == 0 ? "g" : "", {}});
      std::vector<std::uint64_t> last(publishers, 0);
      for (int k = 0; k < 5; ++k) {
        if (auto d = s.try_receive()) {
          const auto pub = **d >> 32;
          const auto seq = (**d & 0xffffffffu) + 1;
          if (round % 3 != 0 && seq <= last[pub]) churn_errors.fetch_add(1);  // no duplicate or reordering
          last[pub] = seq;
        }
      }
    }  // destroyed (unsubscribed) while publishers run
  });

  std::vector<std::uint64_t> sums(subscribers, 0), counts(subscribers, 0), order_errors(subscribers, 0);
  std::vector<std::thread> readers;
  for (int i = 0; i < subscribers; ++i) {
    readers.emplace_back([&, i] {
      std::vector<std::uint64_t> next(publishers, 0);
      for (std::uint64_t n = 0; n < per_pub * publishers; ++n) {
        auto d = subs[static_cast<std::size_t>(i)].receive();
        if (!d) break;
        const auto pub = **d >> 32;
        const auto seq = **d & 0xffffffffu;
        if (seq != next[pub]) ++order_errors[static_cast<std::size_t>(i)];
        next[pub] = seq + 1;
        sums[static_cast<std::size_t>(i)] += seq;
        ++counts[static_cast<std::size_t>(i)];
      }
    });
  }
  std::vector<std::thread> pubs;
  for (int p = 0; p < publishers; ++p)
    pubs.emplace_back([&, p] {
      for (std::uint64_t s = 0; s < per_pub; ++s) (void)t.publish((std::uint64_t(p) << 32) | s);
    });
  for (auto& th : pubs) th.join();
  for (auto& th : readers) th.join();
  stop_churn = true;
  churn.join();

  for (int i = 0; i < subscribers; ++i) {
    CHECK(counts[static_cast<std::size_t>(i)] == per_pub * publishers);
    CHECK(sums[static_cast<std::size_t>(i)] == publishers * (per_pub * (per_pub - 1) / 2));
    CHECK(order_errors[static_cast<std::size_t>(i)] == 0);
  }
  CHECK(churn_errors == 0);
}
