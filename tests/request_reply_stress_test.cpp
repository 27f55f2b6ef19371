// SPDX-License-Identifier: MIT
// Stress test for request-reply: concurrent requesters and responders, every request ends in exactly one outcome.
#include <postbox/request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

TEST_CASE("concurrent requesters and responders give every request exactly one outcome", "[request_reply][stress]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<postbox::envelope<int>> requests(256);
  postbox::endpoint_registry<int> registry;
  const int requesters = 4;
  const int per = static_cast<int>(postbox_test::scaled(5000));
  const int total = requesters * per;

  std::vector<std::atomic<int>> outcomes(static_cast<std::size_t>(total));
  std::atomic<long long> reply_sum{0}, expected_reply_sum{0};
  std::atomic<int> wrong_errors{0};
  std::atomic<int> ok{0}, errors{0}, timeouts{0}, canceled{0};

  auto responders = std::make_unique<postbox::responder<int, int>>(
      requests, registry,
      [](const postbox::envelope<int>& e) {
        if (e.payload % 7 == 0) throw std::runtime_error("multiple of seven");
        return e.payload * 2;
      },
      clock, 3);

  std::atomic<bool> done{false};
  std::thread ticker([&] {  // moves time so some requests time out while others are answered
    while (!done.load()) {
      clock.advance(1ms);
      timers.run_due();
      std::this_thread::yield();
    }
  });

  std::vector<std::thread> threads;
  std::vector<postbox::requester_stats> stats(requesters);
  for (int t = 0; t < requesters; ++t) {
    threads.emplace_back([&, t] {
      postbox::requester<int, int> req(requests, registry, timers, {.max_pending = 32});
      for (int i = 0; i < per; ++i) {
        const int id = t * per + i;
        auto cb = [&, id](postbox::reply_outcome<int> o) {
          outcomes[static_cast<std::size_t>(id)].fetch_add(1);
          if (o.ok()) {
            ++ok;
            reply_sum += o.reply->payload;
            expected_reply_sum += 2LL * id;
          } else if (o.status == postbox::errc::handler_error) {
            ++errors;
            if (id % 7 != 0) ++wrong_errors;
          } else if (o.status == postbox::errc::timeout || o.status == postbox::errc::expired) {
            ++timeouts;
          } else if (o.status == postbox::errc::canceled) {
            ++canceled;
          }
        };
        while (req.request(id, 20ms, cb) != postbox::errc::ok) std::this_thread::yield();
      }
      stats[static_cast<std::size_t>(t)] = req.stats();
    });  // requester destroyed: its still pending requests end canceled
  }
  for (auto& th : threads) th.join();
  done = true;
  ticker.join();
  responders.reset();

  int exactly_once = 0;
  for (auto& o : outcomes) exactly_once += o.load() == 1 ? 1 : 0;
  INFO("ok " << ok << " errors " << errors << " timeouts " << timeouts << " canceled " << canceled);
  CHECK(exactly_once == total);
  CHECK(wrong_errors == 0);
  CHECK(errors > 0);
  CHECK(ok + errors + timeouts + canceled == total);
  CHECK(reply_sum.load() == expected_reply_sum.load());
  std::uint64_t sent = 0;
  for (auto& s : stats) sent += s.sent;
  CHECK(sent == static_cast<std::uint64_t>(total));
}

TEST_CASE("threads blocked in get() on their futures each take exactly their own outcome", "[request_reply][stress]") {
  postbox::manual_clock clock;
  postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
  postbox::channel<postbox::envelope<int>> requests(64);
  postbox::endpoint_registry<int> registry;
  const int requesters = 3;
  const int per = static_cast<int>(postbox_test::scaled(4000));
  const int total = requesters * per;
  std::atomic<long long> reply_sum{0}, expected_sum{0};
  std::atomic<int> ok{0}, timeouts{0}, wrong{0};
  // Two workers: the requesters' get() calls alternately find their reply
  // while spinning and sleep for it.
  auto responders = std::make_unique<postbox::responder<int, int>>(
      requests, registry, [](const postbox::envelope<int>& e) { return e.payload * 3; }, clock, 2);
  std::atomic<bool> done{false};
  std::thread ticker([&] {  // some requests (every 16th, 1 ms timeout) expire before an answer
    while (!done.load()) {
      clock.advance(1ms);
      timers.run_due();
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  std::vector<postbox::requester_stats> stats(requesters);
  for (int t = 0; t < requesters; ++t) {
    threads.emplace_back([&, t] {
      postbox::requester<int, int> req(requests, registry, timers);
      for (int i = 0; i < per; ++i) {
        const int id = t * per + i;
        const auto timeout = i % 16 == 0 ? 1ms : 10min;
        auto f = req.request(id, timeout);
        while (!f.has_value()) {
          std::this_thread::yield();
          f = req.request(id, timeout);
        }
        auto o = f->get();
        if (o.ok()) {
          ++ok;
          if (o.reply->payload != 3 * id) ++wrong;
          reply_sum += o.reply->payload;
          expected_sum += 3LL * id;
        } else if (o.status == postbox::errc::timeout || o.status == postbox::errc::expired) {
          ++timeouts;
        } else {
          ++wrong;
        }
      }
      stats[static_cast<std::size_t>(t)] = req.stats();
    });
  }
  for (auto& th : threads) th.join();
  done = true;
  ticker.join();
  responders.reset();
  INFO("ok " << ok << " timeouts " << timeouts);
  CHECK(wrong == 0);
  CHECK(ok + timeouts == total);
  CHECK(ok > 0);
  CHECK(reply_sum.load() == expected_sum.load());
  std::uint64_t replied = 0, timed_out = 0, errors = 0, sent = 0;
  for (auto& s : stats) {
    replied += s.replied;
    timed_out += s.timed_out;
    errors += s.errors;  // `expired` error replies
    sent += s.sent;
  }
  CHECK(sent == static_cast<std::uint64_t>(total));
  CHECK(replied == static_cast<std::uint64_t>(ok.load()));
  CHECK(replied + timed_out + errors == static_cast<std::uint64_t>(total));
}

namespace {

// The slot stress cases' world: eight slots (max_pending 8) shared by three
// requesting threads; repliers answer each request twice, every 5th with an
// error, never every 11th; a ticker moves the manual clock 1 ms at a time
// and fires due timers; most requests time out after 1-3 ms, every 4th
// waits for its answer (so some are answered, and answered twice, however
// slow the repliers), and the unanswered ones always time out.
struct slot_stress_rig {
  static constexpr int threads_n = 3;
  postbox::manual_clock clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
  const int per = static_cast<int>(postbox_test::scaled(6000));
  std::unique_ptr<postbox::requester<int, int>> req = std::make_unique<postbox::requester<int, int>>(
      requests, registry, timers, postbox::requester_options{.max_pending = 8});
  std::atomic<long long> deliveries{0};
  std::atomic<long long> ok{0}, errors{0}, timeouts{0}, wrong{0}, accepted{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> repliers;
  std::thread ticker;

  explicit slot_stress_rig(int replier_threads) {
    for (int i = 0; i < replier_threads; ++i) repliers.emplace_back([this] { answer_twice(); });
    ticker = std::thread([this] {
      while (!done.load()) {
        clock.advance(1ms);
        timers.run_due();
        std::this_thread::yield();
      }
    });
  }
  slot_stress_rig(const slot_stress_rig&) = delete;
  slot_stress_rig& operator=(const slot_stress_rig&) = delete;
  ~slot_stress_rig() { stop(); }

  void answer_twice() {
    postbox::endpoint_registry<int>::delivery_cache cache;
    while (auto env = requests.receive()) {
      if (env->payload % 11 == 0) continue;
      const auto to = env->headers.get(postbox::header_names::reply_to);
      for (int copy = 0; copy < 2; ++copy) {
        postbox::reply_packet<int> p{env->correlation_id, {}};
        if (env->payload % 5 == 0) {
          p.body = postbox::reply_error{postbox::errc::handler_error, "fifth"};
        } else {
          p.body = postbox::reply_to(*env, env->payload * 2, clock);
        }
        if (registry.deliver(*to, std::move(p), cache) == postbox::errc::ok) ++deliveries;
      }
    }
  }
  // The timeout of thread-local request i with global id `id`.
  static postbox::duration timeout_of(int id, int i) {
    return id % 11 != 0 && i % 4 == 3 ? postbox::duration(10min) : postbox::duration(std::chrono::milliseconds(1 + i % 3));
  }
  // Counts one outcome of request `id`; a wrong one (an answer to an
  // unanswered request, an error for a good one, a bad payload) in `wrong`.
  void count(int id, const postbox::reply_outcome<int>& o) {
    if (o.ok()) {
      ++ok;
      if (id % 5 == 0 || id % 11 == 0 || o.reply->payload != 2 * id) ++wrong;
    } else if (o.status == postbox::errc::handler_error) {
      ++errors;
      if (id % 5 != 0 || id % 11 == 0) ++wrong;
    } else if (o.status == postbox::errc::timeout) {
      ++timeouts;
    } else {
      ++wrong;
    }
  }
  // Stops the ticker and the repliers (every delivery is in; the requester
  // is still there).
  void stop() {
    done = true;
    if (ticker.joinable()) ticker.join();
    requests.close();
    for (auto& t : repliers)
      if (t.joinable()) t.join();
  }
  // After stop(): every request had one outcome, the right one, and the
  // counters account for every delivery.
  void check_accounts() {
    const auto st = req->stats();
    req.reset();
    INFO("ok " << ok << " errors " << errors << " timeouts " << timeouts << " deliveries " << deliveries);
    CHECK(wrong == 0);
    CHECK(accepted == threads_n * per);
    CHECK(ok + errors + timeouts == accepted);
    CHECK(st.sent == static_cast<std::uint64_t>(accepted.load()));
    CHECK(st.replied == static_cast<std::uint64_t>(ok.load()));
    CHECK(st.errors == static_cast<std::uint64_t>(errors.load()));
    CHECK(st.timed_out == static_cast<std::uint64_t>(timeouts.load()));
    CHECK(st.pending == 0);
    CHECK(ok > 0);
    CHECK(timeouts > 0);
    // Every delivery that did not complete its request was dropped and counted.
    const auto dropped = st.late_replies + st.duplicate_replies + st.unmatched_replies;
    CHECK(dropped + st.replied + st.errors == static_cast<std::uint64_t>(deliveries.load()));
    CHECK(st.duplicate_replies > 0);
  }
};

}  // namespace

TEST_CASE("future requests on a few reused slots, with replies racing timeouts and duplicates, each end once",
          "[request_reply][stress]") {
  // The future form completes on slots without the table's lock (issue 18):
  // the slots are reused thousands of times, and replies and the timer race
  // for the same slot. Each future must get exactly one outcome.
  slot_stress_rig r(1);
  std::vector<std::thread> threads;
  for (int t = 0; t < r.threads_n; ++t) {
    threads.emplace_back([&, t] {
      using pending = std::pair<int, postbox::reply_future<postbox::reply_outcome<int>>>;
      std::vector<pending> outstanding;
      auto finish_first = [&] {
        r.count(outstanding.front().first, outstanding.front().second.get());
        outstanding.erase(outstanding.begin());
      };
      for (int i = 0; i < r.per; ++i) {
        const int id = t * r.per + i;
        auto f = r.req->request(id, slot_stress_rig::timeout_of(id, i));
        if (!f.has_value()) {  // busy (eight in flight) or full (the channel): finish one first
          if (f.status() != postbox::errc::busy && f.status() != postbox::errc::full) ++r.wrong;
          if (!outstanding.empty()) finish_first();
          std::this_thread::yield();
          --i;
          continue;
        }
        ++r.accepted;
        outstanding.emplace_back(id, std::move(*f));
        if (outstanding.size() > 2) finish_first();
      }
      while (!outstanding.empty()) finish_first();
    });
  }
  for (auto& th : threads) th.join();
  r.stop();
  r.check_accounts();
}

TEST_CASE("callback requests on a few reused slots, with replies racing timeouts and duplicates, each call back once",
          "[request_reply][stress]") {
  // The callback form runs on slots as the future form does: a reply claims
  // its slot with one CAS and runs the callback there, without the table's
  // lock. Two repliers, so a request's two answers race each other too:
  // each callback is called exactly once, with the right outcome.
  slot_stress_rig r(2);
  const int total = r.threads_n * r.per;
  std::vector<std::atomic<int>> calls(static_cast<std::size_t>(total));
  std::atomic<long long> outcomes{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < r.threads_n; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < r.per; ++i) {
        const int id = t * r.per + i;
        const postbox::errc s = r.req->request(id, slot_stress_rig::timeout_of(id, i), [&, id](postbox::reply_outcome<int> o) {
          calls[static_cast<std::size_t>(id)].fetch_add(1);
          r.count(id, o);
          ++outcomes;
        });
        if (s != postbox::errc::ok) {  // busy (eight in flight) or full (the channel): try again
          if (s != postbox::errc::busy && s != postbox::errc::full) ++r.wrong;
          std::this_thread::yield();
          --i;
          continue;
        }
        ++r.accepted;
      }
    });
  }
  for (auto& th : threads) th.join();
  REQUIRE(postbox_test::eventually([&] { return outcomes.load() == r.accepted.load(); }));
  r.stop();
  int exactly_once = 0;
  for (auto& c : calls) exactly_once += c.load() == 1 ? 1 : 0;
  CHECK(exactly_once == total);
  r.check_accounts();
}

TEST_CASE("destroying a requester while reply callbacks run on other threads returns after they ended",
          "[request_reply][stress]") {
  // Teardown: the destructor cancels what is pending and waits for every
  // callback a reply is running on another thread (on its slot). What the
  // callbacks touch dies right after the destructor returns, so a callback
  // still running, or starting, after it would be a use after free
  // (AddressSanitizer, ThreadSanitizer) and is counted here too.
  const int rounds = static_cast<int>(postbox_test::scaled(300));
  const int per_round = 24;
  long long replied = 0, canceled = 0, late_calls = 0, not_once = 0;
  for (int round = 0; round < rounds; ++round) {
    postbox::manual_clock clock;
    postbox::timer_service timers(clock, postbox::timer_service::manual_drive);
    postbox::channel<postbox::envelope<int>> requests(64);
    postbox::endpoint_registry<int> registry;
    auto req = std::make_unique<postbox::requester<int, int>>(requests, registry, timers,
                                                              postbox::requester_options{.max_pending = 64});
    auto touched = std::make_unique<std::vector<int>>(per_round, 0);  // what the callbacks use
    std::vector<std::atomic<int>> calls(per_round);
    std::atomic<int> inside{0}, started{0};
    std::atomic<bool> gone{false};
    std::atomic<int> outcome_ok{0}, outcome_canceled{0}, after_gone{0};
    auto replier = [&] {
      postbox::endpoint_registry<int>::delivery_cache cache;
      while (auto env = requests.receive()) {
        const auto to = env->headers.get(postbox::header_names::reply_to);
        (void)registry.deliver(*to, {env->correlation_id, postbox::reply_to(*env, env->payload, clock)}, cache);
      }
    };
    std::thread replier_a(replier), replier_b(replier);
    for (int i = 0; i < per_round; ++i) {
      REQUIRE(req->request(i, 10min, [&, i](postbox::reply_outcome<int> o) {
        if (gone.load()) ++after_gone;
        ++inside;
        ++started;
        (*touched)[static_cast<std::size_t>(i)] += 1;
        for (int k = 0; k < 3; ++k) std::this_thread::yield();  // keep running while the destructor comes
        calls[static_cast<std::size_t>(i)].fetch_add(1);
        ++(o.ok() ? outcome_ok : outcome_canceled);
        --inside;
      }) == postbox::errc::ok);
    }
    REQUIRE(postbox_test::eventually([&] { return started.load() > 0; }));
    req.reset();  // races the repliers' callbacks
    if (inside.load() != 0) ++late_calls;
    gone = true;
    touched.reset();
    requests.close();
    replier_a.join();
    replier_b.join();
    late_calls += after_gone.load();
    for (auto& c : calls) not_once += c.load() == 1 ? 0 : 1;
    replied += outcome_ok.load();
    canceled += outcome_canceled.load();
  }
  INFO("replied " << replied << " canceled " << canceled);
  CHECK(late_calls == 0);
  CHECK(not_once == 0);
  CHECK(replied + canceled == static_cast<long long>(rounds) * per_round);
  CHECK(replied > 0);
}
