// SPDX-License-Identifier: MIT
// postbox::topic's publish path (issue 18): the per-thread cached subscription
// list (stamped snapshots), its re-entrancy, and what an unsubscribed queue
// keeps while a publisher's cache still refers to it.
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using postbox::overflow;
using postbox::subscription_options;

namespace {

// Counts live instances through a pointer the test owns.
struct counted {
  std::atomic<int>* live = nullptr;
  int value = 0;
  counted(std::atomic<int>* l, int v) : live(l), value(v) { live->fetch_add(1); }
  counted(counted&& o) noexcept : live(std::exchange(o.live, nullptr)), value(o.value) {}
  counted& operator=(counted&&) = delete;
  ~counted() {
    if (live != nullptr) live->fetch_sub(1);
  }
};

// A message whose destruction runs `on_destroy` once (a moved-from one does not).
struct hook_msg {
  std::function<void()> on_destroy;
  int value = 0;
  hook_msg(std::function<void()> f, int v) : on_destroy(std::move(f)), value(v) {}
  hook_msg(hook_msg&& o) noexcept : on_destroy(std::exchange(o.on_destroy, nullptr)), value(o.value) {}
  hook_msg& operator=(hook_msg&&) = delete;
  ~hook_msg() {
    if (on_destroy) on_destroy();
  }
};

}  // namespace

TEST_CASE("one thread alternating publishes between two topics of one type reaches only each topic's subscribers",
          "[topic]") {
  // The thread's cached list must be told apart by topic, not by a per-topic
  // version that two fresh topics would share.
  postbox::topic<int> a;
  postbox::topic<int> b;
  auto sa = a.subscribe();
  auto sb = b.subscribe();
  for (int i = 0; i < 20; ++i) {
    REQUIRE(a.publish(i).delivered == 1);
    REQUIRE(b.publish(1000 + i).delivered == 1);
  }
  for (int i = 0; i < 20; ++i) {
    auto da = sa.try_receive();
    auto db = sb.try_receive();
    REQUIRE(da);
    REQUIRE(db);
    CHECK(**da == i);
    CHECK(**db == 1000 + i);
  }
  CHECK_FALSE(sa.try_receive());
  CHECK_FALSE(sb.try_receive());
}

TEST_CASE("a publish from a thread that cached the list before a subscribe reaches the new subscription", "[topic]") {
  postbox::topic<int> t;
  auto first = t.subscribe();
  REQUIRE(t.publish(1).delivered == 1);  // caches the one-subscription list
  auto second = t.subscribe();
  REQUIRE(t.publish(2).delivered == 2);
  auto d = second.try_receive();
  REQUIRE(d);
  CHECK(**d == 2);
  second.reset();
  REQUIRE(t.publish(3).delivered == 1);  // the removed subscription is not reached
}

TEST_CASE("an unsubscribe on another thread is seen by the next publish of a thread that cached the list", "[topic]") {
  postbox::topic<int> t;
  auto keep = t.subscribe();
  auto gone = t.subscribe();
  REQUIRE(t.publish(1).delivered == 2);  // this thread caches the two-subscription list
  std::thread([&] { gone.reset(); }).join();
  CHECK(t.publish(2).delivered == 1);
  CHECK(t.stats().subscriptions == 1);
}

TEST_CASE("messages queued for a removed subscription are destroyed at unsubscribe while a publisher still caches its queue",
          "[topic]") {
  std::atomic<int> live{0};
  postbox::topic<counted> t;
  auto s = t.subscribe();
  for (int i = 0; i < 3; ++i) REQUIRE(t.publish(counted(&live, i)).delivered == 1);
  REQUIRE(live.load() == 3);
  s.reset();  // this thread's cached list still holds the queue
  CHECK(live.load() == 0);
  REQUIRE(t.publish(counted(&live, 9)).delivered == 0);
  CHECK(live.load() == 0);
}

TEST_CASE("a message destroyed by drop_oldest may unsubscribe and publish on the same topic during the publish",
          "[topic]") {
  // The outer publish iterates this thread's cached list. The evicted
  // message's destructor unsubscribes (the topic's list then no longer holds
  // the one being iterated) and publishes again from inside: the inner
  // publish must not replace the list the outer one is iterating (ASan would
  // report the use after free), and both publishes complete.
  postbox::topic<hook_msg> t;
  std::vector<postbox::subscription<hook_msg>> subs;
  subs.push_back(t.subscribe({1, overflow::drop_oldest, {}, {}}));
  subs.push_back(t.subscribe({64, overflow::drop_newest, {}, {}}));
  subs.push_back(t.subscribe({64, overflow::drop_newest, {}, {}}));
  bool fired = false;
  postbox::publish_result inner;
  auto nested = [&] {
    fired = true;
    subs[2].reset();
    inner = t.publish(hook_msg(nullptr, 7));
  };
  REQUIRE(t.publish(hook_msg(nested, 1)).delivered == 3);
  const auto cap = t.stats().per_subscription.at(0).capacity;
  for (std::size_t i = 1; i < cap; ++i) REQUIRE(t.publish(hook_msg(nullptr, 100)).delivered == 3);
  REQUIRE(subs[0].size_approx() == cap);  // full, message 1 oldest
  for (std::size_t i = 1; i < subs.size(); ++i)
    while (subs[i].try_receive()) {
    }  // only subs[0] holds message 1 now
  REQUIRE_FALSE(fired);
  const auto outer = t.publish(hook_msg(nullptr, 2));  // evicts message 1 from subs[0]
  REQUIRE(fired);
  CHECK(inner.delivered == 2);  // subs[0] (into the slot the eviction freed) and subs[1]
  CHECK(outer.delivered == 2);  // subs[0] and subs[1]; subs[2] was removed before the outer publish reached it
  auto d7 = subs[1].try_receive();
  auto d2 = subs[1].try_receive();
  REQUIRE(d7);
  REQUIRE(d2);
  CHECK((*d7)->value == 7);
  CHECK((*d2)->value == 2);
  CHECK(subs[0].take_lag() == 2);  // message 1 and then message 7
}

TEST_CASE("publishers racing subscribe and unsubscribe lose and duplicate nothing on a steady subscription", "[topic][stress]") {
  // Checksum on the steady subscription: every message of every publisher,
  // once. Temporary subscriptions churn beside it (each change gives the
  // publishers a new list to pick up) and never receive a value twice.
  const auto per_publisher = postbox_test::scaled(20000);
  constexpr std::uint64_t publishers = 2;
  postbox::topic<std::uint64_t> t;
  auto steady = t.subscribe({64, overflow::block, {}, {}});
  std::atomic<std::uint64_t> temp_duplicates{0};
  std::atomic<std::uint64_t> churns{0};
  std::atomic<int> running{static_cast<int>(publishers)};
  std::vector<std::thread> threads;
  for (std::uint64_t p = 0; p < publishers; ++p)
    threads.emplace_back([&, p] {
      for (std::uint64_t i = 0; i < per_publisher; ++i) (void)t.publish((p << 32) | i);
      running.fetch_sub(1);
    });
  threads.emplace_back([&] {
    while (running.load() != 0) {
      auto temp = t.subscribe({16, overflow::drop_newest, {}, {}});
      std::vector<std::uint64_t> last(publishers, 0);
      std::vector<bool> seen_any(publishers, false);
      for (int k = 0; k < 4; ++k)
        while (auto d = temp.try_receive()) {
          const auto p = **d >> 32;
          const auto i = **d & 0xffffffffu;
          // Per publisher, a subscription's messages arrive in publish order.
          if (seen_any[p] && i <= last[p]) temp_duplicates.fetch_add(1);
          seen_any[p] = true;
          last[p] = i;
        }
      churns.fetch_add(1);
    }
  });
  std::uint64_t count = 0;
  std::uint64_t sum = 0;
  std::uint64_t expected_sum = 0;
  for (std::uint64_t p = 0; p < publishers; ++p)
    for (std::uint64_t i = 0; i < per_publisher; ++i) expected_sum += (p << 32) | i;
  while (count < publishers * per_publisher) {
    auto d = steady.receive();
    REQUIRE(d);
    ++count;
    sum += **d;
  }
  for (auto& th : threads) th.join();
  CHECK(count == publishers * per_publisher);
  CHECK(sum == expected_sum);
  CHECK_FALSE(steady.try_receive());
  CHECK(temp_duplicates.load() == 0);
  CHECK(churns.load() > 0);
}

namespace {
// A size no other test's item has, so this test sees its own pool blocks only.
struct odd_sized {
  char bytes[333] = {};
  int value = 0;
};
}  // namespace

TEST_CASE("a publish reuses the block of an item every holder has released", "[topic]") {
  postbox::topic<odd_sized> t;
  auto s = t.subscribe();
  odd_sized m;
  m.value = 1;
  REQUIRE(t.publish(m).delivered == 1);
  const void* first = nullptr;
  {
    auto d = s.try_receive();
    REQUIRE(d);
    CHECK((*d)->value == 1);
    first = &**d;
  }  // the last holder lets the item go: its block returns to the pool
  m.value = 2;
  REQUIRE(t.publish(m).delivered == 1);
  auto d = s.try_receive();
  REQUIRE(d);
  CHECK((*d)->value == 2);
  CHECK(static_cast<const void*>(&**d) == first);
}

namespace {
// Another size of its own (see odd_sized).
struct odd_sized_2 {
  char bytes[555] = {};
  int value = 0;
};
}  // namespace

TEST_CASE("blocks freed on a thread that ends before a full batch are reused by the publisher", "[topic]") {
  // A freeing thread hands blocks to the shared pool in batches; when it
  // ends, it hands back what it still holds, so the publisher reuses those
  // blocks instead of allocating new ones.
  postbox::topic<odd_sized_2> t;
  auto s = t.subscribe();
  odd_sized_2 m;
  for (int k = 0; k < 3; ++k) {
    m.value = k;
    REQUIRE(t.publish(m).delivered == 1);
  }
  std::vector<const void*> freed;
  std::vector<int> values;
  std::thread receiver([&] {
    for (int k = 0; k < 3; ++k) {
      auto d = s.try_receive();
      if (!d) return;
      values.push_back((*d)->value);
      freed.push_back(&**d);
    }  // each delivery is the last holder: its block is freed on this thread
  });
  receiver.join();
  REQUIRE(values == std::vector<int>{0, 1, 2});
  std::vector<const void*> reused;
  for (int k = 0; k < 3; ++k) {
    m.value = 10 + k;
    REQUIRE(t.publish(m).delivered == 1);
  }
  std::vector<postbox::delivery<odd_sized_2>> held;
  for (int k = 0; k < 3; ++k) {
    auto d = s.try_receive();
    REQUIRE(d);
    CHECK((*d)->value == 10 + k);
    reused.push_back(&**d);
    held.push_back(std::move(*d));
  }
  std::sort(freed.begin(), freed.end());
  std::sort(reused.begin(), reused.end());
  CHECK(reused == freed);
}

namespace {
struct odd_sized_3 {
  char bytes[777] = {};
  int value = 0;
};
}  // namespace

TEST_CASE("a delivery a thread_local keeps until after the thread handed back its blocks returns its block to the pool",
          "[topic]") {
  // The thread's pool state hands its blocks back at thread exit; a delivery
  // destroyed later by another thread_local's destructor must still reach
  // the shared pool (not a destroyed object), and so be reused.
  postbox::topic<odd_sized_3> t;
  auto s = t.subscribe();
  odd_sized_3 m;
  for (int k = 1; k <= 2; ++k) {
    m.value = k;
    REQUIRE(t.publish(m).delivered == 1);
  }
  std::vector<const void*> freed;
  std::vector<int> values;
  std::thread receiver([&] {
    // Constructed before the pool's exit hook of this thread, so destroyed after it.
    thread_local std::optional<postbox::delivery<odd_sized_3>> keep;
    keep = s.try_receive();
    if (!keep || !*keep) return;
    values.push_back((*keep)->value);
    freed.push_back(&**keep);
    if (auto d = s.try_receive()) {  // freed now, on this thread: registers the pool's exit hook
      values.push_back((*d)->value);
      freed.push_back(&**d);
    }
  });
  receiver.join();
  REQUIRE(values == std::vector<int>{1, 2});
  std::vector<const void*> reused;
  std::vector<postbox::delivery<odd_sized_3>> held;
  for (int k = 3; k <= 4; ++k) {
    m.value = k;
    REQUIRE(t.publish(m).delivered == 1);
    auto d = s.try_receive();
    REQUIRE(d);
    CHECK((*d)->value == k);
    reused.push_back(&**d);
    held.push_back(std::move(*d));
  }
  std::sort(freed.begin(), freed.end());
  std::sort(reused.begin(), reused.end());
  CHECK(reused == freed);
}

TEST_CASE("items freed on subscriber threads and reused by publishers keep every message intact", "[topic][stress]") {
  // Blocks travel from the receiving threads (which drop the last reference)
  // back to the publishing threads. Checksum per subscriber over the string
  // contents: each message whole, once.
  const auto per_publisher = postbox_test::scaled(20000);
  constexpr std::uint64_t publishers = 2;
  constexpr std::size_t subscribers = 2;
  postbox::topic<std::string> t;
  std::vector<postbox::subscription<std::string>> subs;
  for (std::size_t i = 0; i < subscribers; ++i) subs.push_back(t.subscribe({32, overflow::block, {}, {}}));
  std::vector<std::uint64_t> sums(subscribers, 0);
  std::vector<std::uint64_t> counts(subscribers, 0);
  std::vector<std::uint64_t> torn(subscribers, 0);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < subscribers; ++i)
    threads.emplace_back([&, i] {
      for (std::uint64_t k = 0; k < publishers * per_publisher; ++k) {
        auto d = subs[i].receive();
        if (!d) break;
        const std::string& v = **d;
        // "<number>:" then the number's last digit repeated: a torn or reused
        // block shows as a mismatch.
        const auto colon = v.find(':');
        const auto n = std::stoull(v.substr(0, colon));
        if (v.size() != colon + 1 + 40 || v.find_first_not_of(static_cast<char>('0' + n % 10), colon + 1) != std::string::npos)
          ++torn[i];
        sums[i] += n;
        ++counts[i];
      }
    });
  std::vector<std::thread> pubs;
  for (std::uint64_t p = 0; p < publishers; ++p)
    pubs.emplace_back([&, p] {
      for (std::uint64_t k = 0; k < per_publisher; ++k) {
        const auto n = p * per_publisher + k;
        (void)t.publish(std::to_string(n) + ":" + std::string(40, static_cast<char>('0' + n % 10)));
      }
    });
  for (auto& th : pubs) th.join();
  for (auto& th : threads) th.join();
  const auto total = publishers * per_publisher;
  for (std::size_t i = 0; i < subscribers; ++i) {
    CHECK(counts[i] == total);
    CHECK(sums[i] == total * (total - 1) / 2);
    CHECK(torn[i] == 0);
  }
}
