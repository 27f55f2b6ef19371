// SPDX-License-Identifier: MIT
// Ownership of a make_channel channel by its endpoints: the shared state lives
// until the last sender and the last receiver are gone, then goes exactly once.
#include <postbox/channel.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace {

/// Counts live instances, so a test sees when the channel holding them is freed.
struct counted {
  static std::atomic<int>& live() {
    static std::atomic<int> n{0};
    return n;
  }
  explicit counted(std::uint64_t v) noexcept : value(v) { live().fetch_add(1, std::memory_order_relaxed); }
  counted(counted&& o) noexcept : value(o.value) { live().fetch_add(1, std::memory_order_relaxed); }
  counted(const counted& o) noexcept : value(o.value) { live().fetch_add(1, std::memory_order_relaxed); }
  counted& operator=(const counted&) = delete;
  ~counted() { live().fetch_sub(1, std::memory_order_relaxed); }
  std::uint64_t value;
};

#if defined(POSTBOX_SANITIZER)
constexpr int stress_rounds = 200;
#else
constexpr int stress_rounds = 2000;
#endif

}  // namespace

TEST_CASE("queued messages outlive every endpoint but the last and are destroyed with it", "[channel][endpoint]") {
  REQUIRE(counted::live().load() == 0);
  {
    auto [tx, rx] = postbox::make_channel<counted, postbox::mpmc>(8);
    auto rx2 = rx;
    REQUIRE(tx.try_send(counted(1)) == postbox::send_status::ok);
    REQUIRE(tx.try_send(counted(2)) == postbox::send_status::ok);
    { auto gone = std::move(tx); }  // last sender: closes, state stays
    CHECK(counted::live().load() == 2);
    { auto gone = std::move(rx); }
    CHECK(counted::live().load() == 2);  // rx2 still owns the state
    CHECK(rx2.try_receive()->value == 1);
    CHECK(counted::live().load() == 1);
  }
  CHECK(counted::live().load() == 0);  // the last endpoint freed the state
}

TEST_CASE("copy-assigning an endpoint releases the state it held", "[channel][endpoint]") {
  REQUIRE(counted::live().load() == 0);
  auto [tx_a, rx_a] = postbox::make_channel<counted, postbox::mpmc>(4);
  auto [tx_b, rx_b] = postbox::make_channel<counted, postbox::mpmc>(4);
  REQUIRE(tx_a.try_send(counted(7)) == postbox::send_status::ok);
  rx_a = rx_b;  // channel a keeps only tx_a, and is closed for it
  CHECK(tx_a.is_closed());
  CHECK(counted::live().load() == 1);
  tx_a = tx_b;  // channel a has no endpoint left: freed with its message
  CHECK(counted::live().load() == 0);
  REQUIRE(tx_a.try_send(counted(8)) == postbox::send_status::ok);
  CHECK(rx_b.try_receive()->value == 8);
  CHECK(rx_a.try_receive() == std::nullopt);
}

TEST_CASE("endpoints copied and dropped on several threads free each channel once and lose no message",
          "[channel][endpoint]") {
  REQUIRE(counted::live().load() == 0);
  constexpr int threads = 4;
  std::uint64_t sent_sum = 0;
  std::uint64_t received_sum = 0;
  std::uint64_t received_count = 0;
  for (int round = 0; round < stress_rounds; ++round) {
    std::vector<std::uint64_t> got(threads, 0);
    std::vector<std::uint64_t> got_n(threads, 0);
    std::atomic<int> failed_sends{0};
    {
      auto made = postbox::make_channel<counted, postbox::mpmc>(threads * 2);
      auto rx = std::move(made.second);
      std::vector<std::thread> workers;
      {
        auto tx = std::move(made.first);
        for (int t = 0; t < threads; ++t) {
          auto my_tx = tx;  // copies on this thread's behalf, dropped on that thread
          auto my_rx = rx;
          workers.emplace_back(
              [t, round, &got, &got_n, &failed_sends, my_tx = std::move(my_tx), my_rx = std::move(my_rx)]() mutable {
                const auto v = static_cast<std::uint64_t>(round * threads + t + 1);
                if (my_tx.try_send(counted(v)) != postbox::send_status::ok) failed_sends.fetch_add(1);
                { auto gone = std::move(my_tx); }
                while (auto m = my_rx.try_receive()) {
                  got[static_cast<std::size_t>(t)] += m->value;
                  ++got_n[static_cast<std::size_t>(t)];
                }
              });
          sent_sum += static_cast<std::uint64_t>(round * threads + t + 1);
        }
      }  // the workers' copies are the senders now
      for (auto& w : workers) w.join();
      REQUIRE(failed_sends.load() == 0);
      // Every worker's sender is gone, so the channel is closed; drain the rest here.
      REQUIRE(rx.is_closed());
      while (auto m = rx.try_receive()) {
        received_sum += m->value;
        ++received_count;
      }
    }  // the last endpoint: frees the channel
    for (int t = 0; t < threads; ++t) {
      received_sum += got[static_cast<std::size_t>(t)];
      received_count += got_n[static_cast<std::size_t>(t)];
    }
    REQUIRE(counted::live().load() == 0);
  }
  CHECK(received_count == static_cast<std::uint64_t>(stress_rounds) * threads);
  CHECK(received_sum == sent_sum);
}
