// SPDX-License-Identifier: MIT
// Teardown stress: consumers shut down, drained or destroyed mid-flight; stream readers, members and streams destroyed under load.
#include <postbox/consumer.hpp>
#include <postbox/stream.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;

namespace {

using env_t = postbox::envelope<int>;

// Iterations: 1000, scaled down under sanitizers (at least 100).
std::uint64_t iterations() { return std::max<std::uint64_t>(100, postbox_test::scaled(1000)); }

// What happened to each message (by payload): the settle actions the
// consumer gave it. Every message the consumer took must end with exactly one.
struct ledger {
  std::mutex mu;
  std::map<int, std::vector<postbox::settle_action::kind>> actions;
  void record(int n, postbox::settle_action::kind k) {
    std::lock_guard lock(mu);
    actions[n].push_back(k);
  }
  std::size_t count(postbox::settle_action::kind k) {
    std::lock_guard lock(mu);
    std::size_t c = 0;
    for (const auto& [n, v] : actions) c += static_cast<std::size_t>(std::count(v.begin(), v.end(), k));
    return c;
  }
};

// A channel source whose items carry a settle hook that writes to a ledger.
struct tracked_source {
  using payload_type = int;
  static constexpr bool redelivers = false;
  postbox::channel<env_t>* ch;
  std::shared_ptr<ledger> book;
  [[nodiscard]] postbox::receive_result<postbox::inbound<int>> receive(postbox::duration wait) {
    auto r = wait.count() <= 0 ? ch->try_receive_result() : ch->receive_for(wait);
    if (!r.has_value())
      return postbox::receive_result<postbox::inbound<int>>(
          r.status() == postbox::receive_status::closed ? postbox::receive_status::closed : postbox::receive_status::empty);
    const int n = r->payload;
    return postbox::inbound<int>::of(std::move(*r), postbox::settle_hook([b = book, n](const postbox::settle_action& a) {
                                       b->record(n, a.what);
                                     }));
  }
  [[nodiscard]] std::string_view name() const noexcept { return "tracked"; }
  [[nodiscard]] std::uint64_t backlog() const noexcept { return ch->size_approx(); }
};

enum class teardown { destroy, shutdown, drain_open, drain_closed };
enum class moment { blocked_in_receive, handlers_running, waiting_for_retry };

// One consumer life: `msgs` messages, a handler that acks, rejects, retries
// (1 h: still waiting at teardown) or blocks until released or stopped, and
// the teardown at the given moment. Checks every message ends exactly once:
// acked, dead-lettered, released (returned in a report or later), or never
// taken (still in the channel).
void one_life(teardown how, moment when, std::uint64_t seed) {
  constexpr int msgs = 8;
  postbox::manual_clock clock;
  postbox::channel<env_t> ch(16);
  auto book = std::make_shared<ledger>();
  postbox::dead_letter_queue<int> dlq({}, clock);
  std::atomic<bool> release{false};
  std::atomic<int> started{0};
  std::atomic<int> handled{0};
  postbox::consumer_options o;
  o.threads = 2;
  o.clock = &clock;
  o.jitter_seed = seed;
  o.receive_wait = 1ms;  // shutdown waits for a receiving worker's slice
  o.max_in_flight = 4;
  std::vector<int> returned;
  std::size_t left_in_source = 0;
  {
    postbox::consumer<int> c(tracked_source{&ch, book}, [&](const env_t& e, postbox::consume_context& ctx) {
      started.fetch_add(1);
      postbox::settlement s = postbox::settlement::ack();
      switch ((static_cast<std::uint64_t>(e.payload) + seed) % 4) {
        case 0: break;
        case 1: s = postbox::settlement::reject("no"); break;
        case 2: s = postbox::settlement::retry(1h); break;
        default:
          if (when == moment::handlers_running)
            while (!release.load() && !ctx.stop_requested()) std::this_thread::yield();
          break;
      }
      handled.fetch_add(1);
      return s;
    }, dlq, o);
    for (int i = 0; i < msgs; ++i) REQUIRE(ch.try_send(postbox::make_envelope("t", i, postbox::message_kind::event, clock)) ==
                                           postbox::send_status::ok);
    switch (when) {
      case moment::blocked_in_receive:
        // Everything taken and decided; the workers are back in the source's receive.
        REQUIRE(postbox_test::eventually([&] {
          const auto s = c.stats();
          return s.received == msgs && s.running == 0 && s.queued == 0;
        }));
        break;
      case moment::handlers_running:
        REQUIRE(postbox_test::eventually([&] { return c.stats().running > 0; }));
        break;
      case moment::waiting_for_retry:
        REQUIRE(postbox_test::eventually([&] { return c.stats().waiting_retry > 0; }));
        break;
    }
    if (how == teardown::drain_closed) ch.close();
    switch (how) {
      case teardown::destroy: break;
      case teardown::shutdown: {
        auto r = c.shutdown(0s);
        for (const auto& e : r.returned) returned.push_back(e.payload);
        break;
      }
      case teardown::drain_open:
      case teardown::drain_closed: {
        auto r = c.drain(0s);
        for (const auto& e : r.returned) returned.push_back(e.payload);
        REQUIRE(r.source_left.has_value());
        CHECK(*r.source_left == ch.size_approx());
        break;
      }
    }
    release.store(true);  // abandoned handlers return; the destructor waits for them
  }
  while (ch.try_receive()) ++left_in_source;
  // Exactly one terminal action for every message taken; the rest are still in the channel.
  std::size_t taken = 0;
  {
    std::lock_guard lock(book->mu);
    for (const auto& [n, v] : book->actions) {
      INFO("message " << n);
      REQUIRE(v.size() == 1);
      ++taken;
    }
  }
  CHECK(taken + left_in_source == static_cast<std::size_t>(msgs));
  CHECK(book->count(postbox::settle_action::kind::dead_letter) == dlq.size());
  for (int n : returned) {
    std::lock_guard lock(book->mu);
    REQUIRE(book->actions.count(n) == 1);
    CHECK(book->actions[n].front() == postbox::settle_action::kind::release);
  }
  CHECK(handled.load() == started.load());
}

}  // namespace

TEST_CASE("a consumer torn down by destroy, shutdown or drain settles every message exactly once, whatever it was "
          "doing",
          "[teardown][consumer]") {
  const auto n = iterations();
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto how = static_cast<teardown>(i % 4);
    const auto when = static_cast<moment>((i / 4) % 3);
    INFO("iteration " << i);
    one_life(how, when, i);
  }
}

TEST_CASE("drain with worker threads under a live producer settles everything once the channel closes",
          "[teardown][consumer][drain]") {
  const auto n = std::max<std::uint64_t>(20, postbox_test::scaled(200));
  for (std::uint64_t i = 0; i < n; ++i) {
    postbox::manual_clock clock;
    postbox::channel<env_t> ch(8);
    auto book = std::make_shared<ledger>();
    postbox::dead_letter_queue<int> dlq({}, clock);
    postbox::consumer_options o;
    o.threads = 2;
    o.clock = &clock;
    o.receive_wait = 1ms;
    o.classify = postbox::permanent_on<std::runtime_error>();
    constexpr int msgs = 50;
    postbox::consumer<int> c(tracked_source{&ch, book}, [&](const env_t& e) {
      if (e.payload % 7 == 3) throw std::runtime_error("boom");  // permanent below: dead-lettered
      return postbox::settlement::ack();
    }, dlq, o);
    std::thread producer([&] {
      for (int k = 0; k < msgs; ++k)
        while (ch.send_for(postbox::make_envelope("t", k, postbox::message_kind::event, clock), 1s) !=
               postbox::send_status::ok) {
        }
      ch.close();
    });
    const auto report = c.drain(1h);  // the manual clock stands still: only the closed, empty channel ends it
    producer.join();
    CHECK(report.finished);
    CHECK(report.clean());
    std::lock_guard lock(book->mu);
    REQUIRE(book->actions.size() == static_cast<std::size_t>(msgs));
    for (const auto& [k, v] : book->actions) {
      REQUIRE(v.size() == 1);
      CHECK(v.front() == (k % 7 == 3 ? postbox::settle_action::kind::dead_letter : postbox::settle_action::kind::ack));
    }
  }
}

namespace {

// Each committed record (partition, offset) -> the number of successful commits covering it.
struct commit_book {
  std::mutex mu;
  std::map<std::pair<std::uint32_t, std::uint64_t>, int> committed;
  void add(const std::vector<postbox::record<int>>& recs) {
    std::lock_guard lock(mu);
    for (const auto& r : recs) ++committed[{r.pos.partition, r.pos.offset}];
  }
};

// Polls and commits with `m` `polls` times; a batch whose commit is refused
// (the group rebalanced) is not counted: another member gets it again.
void work_member(postbox::group_member<int>& m, commit_book& book, int polls) {
  for (int i = 0; i < polls; ++i) {
    auto r = m.poll(4);
    if (!r.ok()) {
      (void)m.seek(r.partition, r.earliest);
      continue;
    }
    if (r.records.empty()) {
      std::this_thread::yield();
      continue;
    }
    if (m.commit() == postbox::errc::ok) book.add(r.records);
  }
}

}  // namespace

TEST_CASE("group members leaving or destroyed while others poll and commit never commit a record twice or lose one",
          "[teardown][stream]") {
  const auto n = iterations();
  for (std::uint64_t i = 0; i < n; ++i) {
    INFO("iteration " << i);
    postbox::stream<int> s(4);
    auto group = s.group("g");
    commit_book book;
    constexpr int records = 64;
    std::thread appender([&] {
      for (int k = 0; k < records; ++k) (void)s.append("k" + std::to_string(k), k);
    });
    std::vector<std::thread> workers;
    for (int w = 0; w < 3; ++w) {
      workers.emplace_back([&, w] {
        if (w == 0) {  // a member that is destroyed mid-stream
          auto m = group.join();
          work_member(m, book, 5);
        } else if (w == 1) {  // a member that leaves explicitly, then polls nothing
          auto m = group.join();
          work_member(m, book, 5);
          m.leave();
          CHECK(m.poll().records.empty());
          CHECK(m.commit() == postbox::errc::not_found);
        } else {  // readers created and destroyed while the members work
          for (int k = 0; k < 4; ++k) {
            auto rd = s.read_from();
            (void)rd.poll(16);
          }
        }
      });
    }
    appender.join();
    for (auto& t : workers) t.join();
    // A last member takes everything not committed: the group ends with every record committed exactly once.
    auto last = group.join();
    while (group.lag() > 0) work_member(last, book, 1);
    std::lock_guard lock(book.mu);
    REQUIRE(book.committed.size() == static_cast<std::size_t>(records));
    for (const auto& [pos, times] : book.committed) {
      INFO("partition " << pos.first << " offset " << pos.second);
      REQUIRE(times == 1);
    }
  }
}

TEST_CASE("destroying a stream while readers and group members poll on other threads is safe and loses nothing",
          "[teardown][stream]") {
  const auto n = iterations();
  for (std::uint64_t i = 0; i < n; ++i) {
    INFO("iteration " << i);
    constexpr int records = 48;
    auto s = std::make_unique<postbox::stream<int>>(3);
    auto reader = s->read_from();
    auto group = s->group("g");
    auto member = group.join();
    std::atomic<bool> gone{false};
    std::vector<int> by_reader;
    commit_book book;
    std::thread reading([&] {
      // Reads until the stream is gone and everything it held was read.
      for (;;) {
        const bool done = gone.load();
        auto r = reader.poll(8);
        for (const auto& rec : r.records) by_reader.push_back(rec.value);
        if (done && r.records.empty()) return;
        if (r.records.empty()) std::this_thread::yield();
      }
    });
    std::thread consuming([&] {
      for (;;) {
        const bool done = gone.load();
        auto r = member.poll(8);
        if (!r.records.empty() && member.commit() == postbox::errc::ok) book.add(r.records);
        if (done && r.records.empty()) return;
        if (r.records.empty()) std::this_thread::yield();
      }
    });
    for (int k = 0; k < records; ++k) (void)s->append("k" + std::to_string(k % 5), k);
    s.reset();
    gone.store(true);
    reading.join();
    consuming.join();
    std::sort(by_reader.begin(), by_reader.end());
    REQUIRE(by_reader.size() == static_cast<std::size_t>(records));
    for (int k = 0; k < records; ++k) REQUIRE(by_reader[static_cast<std::size_t>(k)] == k);
    CHECK(book.committed.size() == static_cast<std::size_t>(records));
    for (const auto& [pos, times] : book.committed) REQUIRE(times == 1);
    CHECK(group.lag() == 0);
  }
}

TEST_CASE("a consumer on a stream group outlives its stream and drains what the stream retained",
          "[teardown][stream][consumer]") {
  const auto n = std::max<std::uint64_t>(20, postbox_test::scaled(200));
  for (std::uint64_t i = 0; i < n; ++i) {
    postbox::manual_clock clock;
    postbox::dead_letter_queue<int> dlq({}, clock);
    auto s = std::make_unique<postbox::stream<env_t>>(2, postbox::retention{}, clock);
    constexpr int records = 20;
    for (int k = 0; k < records; ++k)
      (void)s->append("k" + std::to_string(k), postbox::make_envelope("t", k, postbox::message_kind::event, clock));
    auto group = s->group("g");
    std::atomic<int> acked{0};
    postbox::consumer_options o;
    o.threads = 2;
    o.clock = &clock;
    o.receive_wait = 1ms;
    postbox::consumer<int> c(postbox::stream_group_source<int>(*s, "g", "stream", 4, std::chrono::microseconds(100)),
                             [&](const env_t&) { acked.fetch_add(1); }, dlq, o);
    if (i % 2 == 0) s.reset();  // half the time before the consumer has read anything
    REQUIRE(postbox_test::eventually([&] { return group.lag() == 0; }));
    s.reset();
    const auto report = c.drain(0s);  // a stream never closes: drain ends at its grace
    CHECK_FALSE(report.finished);
    REQUIRE(report.source_left.has_value());
    CHECK(*report.source_left == 0);
    CHECK(acked.load() == records);
  }
}
