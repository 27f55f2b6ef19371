// SPDX-License-Identifier: MIT
// Coroutine channels: postbox's awaitables (run_queue, io_context, Asio adapter) against asio::experimental::concurrent_channel.
//
// Same workload, same binary, same run; rounds interleave every row, and the
// table prints each row's median and its ratio to Asio's concurrent_channel
// in the same workload. Items are std::uint64_t; every row checks the count
// and the sum of what it received.
//
// Workloads (N = --items, T = --trips):
//   ping_pong/1t   one thread: ping sends i and awaits the echo, pong echoes;
//                  round trip in ns (lower is better)
//   ping_pong/2t   ping on one thread, pong on another (every hop crosses threads)
//   stream/1t      one thread: a producer coroutine sends N, a consumer coroutine
//                  receives N, capacity 1024; million items/s (higher is better)
//   stream/2t      producer and consumer each on their own thread
//   sync_producer  a plain thread sends N with a blocking send, a coroutine
//                  consumer on another thread receives them; million items/s
//
// Rows:
//   postbox spsc run_queue   postbox::task + async_send/async_receive on a
//                            channel<item, spsc>; each thread runs its own run_queue
//   postbox mpmc run_queue   the same on channel<item, mpmc>
//   postbox mpmc io_context  postbox::task on an executor_scheduler per io_context
//   postbox adapter          asio::awaitable coroutines awaiting postbox's Asio
//                            adapter (async_receive(ch, use_awaitable)) on channel<item, mpmc>
//   asio concurrent_channel  asio::awaitable coroutines, async_send/async_receive
//                            with use_awaitable on concurrent_channel<void(error_code, item)>
// With 2 threads every row uses two schedulers with one thread each (two
// run_queues, two io_contexts with concurrency hint 1): a producer/consumer
// pipeline gains nothing from letting both coroutines migrate, and with one
// io_context run by two threads Asio often resumes both on one thread, which
// measures a 1-thread run with extra contention rather than a hand-off. The
// sync producer of the Asio row uses try_send and, when the channel is full,
// async_send with a callback that wakes it through a C++20 atomic wait
// (a futex, as postbox's blocking send parks on one).
//
// Options: --rounds R (default 7), --items N (default 200000), --trips T
// (default 50000), --only S (rows whose "workload row" contains S).

#include <postbox/asio.hpp>  // first: it sets Asio's coroutine switches
#include <postbox/async.hpp>
#include <postbox/channel.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/error_code.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/concurrent_channel.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef POSTBOX_BENCH_CXX_FLAGS
#  define POSTBOX_BENCH_CXX_FLAGS "(not recorded: built outside benchmarks/CMakeLists.txt)"
#endif

namespace {

using item = std::uint64_t;
constexpr std::size_t capacity = 1024;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "async_bench: %s\n", what);
  std::exit(1);
}

void check(std::uint64_t count, std::uint64_t want, std::uint64_t sum) {
  if (count != want || sum != want * (want + 1) / 2) fail("lost or duplicated items");
}

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// Runs each body on its own thread; returns the wall time until all joined.
double run_threads(std::vector<std::function<void()>> bodies) {
  const auto t0 = clock_type::now();
  std::vector<std::thread> ts;
  for (auto& b : bodies) ts.emplace_back(std::move(b));
  for (auto& t : ts) t.join();
  return seconds_since(t0);
}

// Every consumer and ping coroutine below (postbox's, the adapter's and
// Asio's alike) adds up what it receives in its own frame and stores the
// totals through `sum` and `count` once, when it finishes; every sync
// producer copies its count before its loop. Those totals live on the frame
// of the function that launched the run, next to the channels and whatever
// else the other thread reaches there: updated per message (as they were),
// they could put a line crossing the cores on every message, depending on
// where the stack landed.

// --- postbox tasks ----------------------------------------------------------------

template <class Ch>
postbox::task<void> pb_produce(Ch& ch, std::uint64_t n) {
  for (item i = 1; i <= n; ++i) {
    if (co_await postbox::async_send(ch, item(i)) != postbox::send_status::ok) fail("postbox send failed");
  }
}

template <class Ch>
postbox::task<void> pb_consume(Ch& ch, std::uint64_t n, std::uint64_t* sum, std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (std::uint64_t k = 0; k < n; ++k) {
    auto r = co_await postbox::async_receive(ch);
    if (!r.has_value()) fail("postbox receive failed");
    s += *r;
    ++c;
  }
  *sum += s;
  *count += c;
}

template <class Ch>
postbox::task<void> pb_ping(Ch& there, Ch& back, std::uint64_t trips, std::uint64_t* sum, std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (item i = 1; i <= trips; ++i) {
    if (co_await postbox::async_send(there, item(i)) != postbox::send_status::ok) fail("postbox send failed");
    auto r = co_await postbox::async_receive(back);
    if (!r.has_value() || *r != i) fail("postbox ping-pong answered out of turn");
    s += *r;
    ++c;
  }
  *sum += s;
  *count += c;
}

template <class Ch>
postbox::task<void> pb_pong(Ch& there, Ch& back, std::uint64_t trips) {
  for (std::uint64_t k = 0; k < trips; ++k) {
    auto r = co_await postbox::async_receive(there);
    if (!r.has_value()) fail("postbox receive failed");
    if (co_await postbox::async_send(back, item(*r)) != postbox::send_status::ok) fail("postbox send failed");
  }
}

/// Awaits `t`, then calls `f` (on the scheduler's thread).
postbox::task<void> then(postbox::task<void> t, std::function<void()> f) {
  co_await std::move(t);
  f();
}

/// Where postbox tasks run: run_queues or io_contexts, one per thread.
enum class pb_sched { run_queue, io_context };

/// Runs tasks on `threads` schedulers of one kind; task i goes to scheduler
/// i mod threads. Returns the wall time.
double run_pb_tasks(pb_sched kind, int threads, std::vector<postbox::task<void>> tasks,
                    std::function<void()> extra_thread = {}) {
  const int n = threads;
  std::vector<std::function<void()>> bodies;
  if (kind == pb_sched::run_queue) {
    std::vector<std::unique_ptr<postbox::run_queue>> qs;
    std::vector<std::unique_ptr<std::stop_source>> stops;
    std::vector<std::vector<postbox::task<void>>> per(static_cast<std::size_t>(n));
    std::vector<std::unique_ptr<std::atomic<int>>> left;
    for (int i = 0; i < n; ++i) {
      qs.push_back(std::make_unique<postbox::run_queue>());
      stops.push_back(std::make_unique<std::stop_source>());
      left.push_back(std::make_unique<std::atomic<int>>(0));
    }
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      const std::size_t k = i % static_cast<std::size_t>(n);
      left[k]->fetch_add(1);
      per[k].push_back(then(std::move(tasks[i]), [s = stops[k].get(), l = left[k].get()] {
        if (l->fetch_sub(1) == 1) s->request_stop();
      }));
    }
    for (int i = 0; i < n; ++i) {
      const auto k = static_cast<std::size_t>(i);
      bodies.emplace_back([&, k] {
        for (auto& t : per[k]) t.start(*qs[k]);
        qs[k]->run(stops[k]->get_token());
      });
    }
    if (extra_thread) bodies.push_back(std::move(extra_thread));
    return run_threads(std::move(bodies));
  }
  using ex_type = asio::io_context::executor_type;
  std::vector<std::unique_ptr<asio::io_context>> ctxs;
  std::vector<std::unique_ptr<postbox::executor_scheduler<ex_type>>> scheds;
  std::vector<std::optional<asio::executor_work_guard<ex_type>>> guards(static_cast<std::size_t>(n));
  std::vector<std::vector<postbox::task<void>>> per(static_cast<std::size_t>(n));
  std::vector<std::unique_ptr<std::atomic<int>>> left;
  for (int i = 0; i < n; ++i) {
    ctxs.push_back(std::make_unique<asio::io_context>(1));
    scheds.push_back(std::make_unique<postbox::executor_scheduler<ex_type>>(ctxs.back()->get_executor()));
    guards[static_cast<std::size_t>(i)].emplace(ctxs.back()->get_executor());
    left.push_back(std::make_unique<std::atomic<int>>(0));
  }
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const std::size_t k = i % static_cast<std::size_t>(n);
    left[k]->fetch_add(1);
    per[k].push_back(then(std::move(tasks[i]), [g = &guards[k], l = left[k].get()] {
      if (l->fetch_sub(1) == 1) g->reset();
    }));
  }
  for (int i = 0; i < n; ++i) {
    const auto k = static_cast<std::size_t>(i);
    bodies.emplace_back([&, k] {
      for (auto& t : per[k]) t.start(*scheds[k]);
      ctxs[k]->run();
    });
  }
  if (extra_thread) bodies.push_back(std::move(extra_thread));
  return run_threads(std::move(bodies));
}

template <class Shape>
double pb_stream(pb_sched kind, int threads, std::uint64_t n) {
  postbox::channel<item, Shape> ch(capacity);
  std::uint64_t sum = 0, count = 0;
  std::vector<postbox::task<void>> ts;
  ts.push_back(pb_produce(ch, n));
  ts.push_back(pb_consume(ch, n, &sum, &count));
  const double secs = run_pb_tasks(kind, threads, std::move(ts));
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}

template <class Shape>
double pb_ping_pong(pb_sched kind, int threads, std::uint64_t trips) {
  postbox::channel<item, Shape> there(capacity), back(capacity);
  std::uint64_t sum = 0, count = 0;
  std::vector<postbox::task<void>> ts;
  ts.push_back(pb_ping(there, back, trips, &sum, &count));
  ts.push_back(pb_pong(there, back, trips));
  const double secs = run_pb_tasks(kind, threads, std::move(ts));
  check(count, trips, sum);
  return secs * 1e9 / static_cast<double>(trips);
}

template <class Shape>
double pb_sync_producer(pb_sched kind, std::uint64_t n) {
  postbox::channel<item, Shape> ch(capacity);
  std::uint64_t sum = 0, count = 0;
  std::vector<postbox::task<void>> ts;
  ts.push_back(pb_consume(ch, n, &sum, &count));
  const double secs = run_pb_tasks(kind, 1, std::move(ts), [&] {
    auto& mine = ch;
    const std::uint64_t total = n;
    for (item i = 1; i <= total; ++i) {
      if (mine.send(i) != postbox::send_status::ok) fail("postbox blocking send failed");
    }
  });
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}

// --- asio::awaitable coroutines: postbox's adapter and Asio's channel -----------

using pb_chan = postbox::channel<item, postbox::mpmc>;
using asio_chan = asio::experimental::concurrent_channel<void(asio::error_code, item)>;

asio::awaitable<void> ad_produce(pb_chan* ch, std::uint64_t n) {
  for (item i = 1; i <= n; ++i) {
    if (co_await postbox::async_send(*ch, i, asio::use_awaitable) != postbox::send_status::ok) fail("adapter send");
  }
}
asio::awaitable<void> ad_consume(pb_chan* ch, std::uint64_t n, std::uint64_t* sum, std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (std::uint64_t k = 0; k < n; ++k) {
    auto r = co_await postbox::async_receive(*ch, asio::use_awaitable);
    if (!r.has_value()) fail("adapter receive");
    s += *r;
    ++c;
  }
  *sum += s;
  *count += c;
}
asio::awaitable<void> ad_ping(pb_chan* there, pb_chan* back, std::uint64_t trips, std::uint64_t* sum,
                              std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (item i = 1; i <= trips; ++i) {
    if (co_await postbox::async_send(*there, i, asio::use_awaitable) != postbox::send_status::ok) fail("adapter send");
    auto r = co_await postbox::async_receive(*back, asio::use_awaitable);
    if (!r.has_value() || *r != i) fail("adapter ping-pong answered out of turn");
    s += *r;
    ++c;
  }
  *sum += s;
  *count += c;
}
asio::awaitable<void> ad_pong(pb_chan* there, pb_chan* back, std::uint64_t trips) {
  for (std::uint64_t k = 0; k < trips; ++k) {
    auto r = co_await postbox::async_receive(*there, asio::use_awaitable);
    if (!r.has_value()) fail("adapter receive");
    if (co_await postbox::async_send(*back, *r, asio::use_awaitable) != postbox::send_status::ok) fail("adapter send");
  }
}

asio::awaitable<void> as_produce(asio_chan* ch, std::uint64_t n) {
  for (item i = 1; i <= n; ++i) co_await ch->async_send(asio::error_code{}, i, asio::use_awaitable);
}
asio::awaitable<void> as_consume(asio_chan* ch, std::uint64_t n, std::uint64_t* sum, std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (std::uint64_t k = 0; k < n; ++k) {
    s += co_await ch->async_receive(asio::use_awaitable);
    ++c;
  }
  *sum += s;
  *count += c;
}
asio::awaitable<void> as_ping(asio_chan* there, asio_chan* back, std::uint64_t trips, std::uint64_t* sum,
                              std::uint64_t* count) {
  std::uint64_t s = 0, c = 0;
  for (item i = 1; i <= trips; ++i) {
    co_await there->async_send(asio::error_code{}, i, asio::use_awaitable);
    const item v = co_await back->async_receive(asio::use_awaitable);
    if (v != i) fail("asio ping-pong answered out of turn");
    s += v;
    ++c;
  }
  *sum += s;
  *count += c;
}
asio::awaitable<void> as_pong(asio_chan* there, asio_chan* back, std::uint64_t trips) {
  for (std::uint64_t k = 0; k < trips; ++k) {
    const item v = co_await there->async_receive(asio::use_awaitable);
    co_await back->async_send(asio::error_code{}, v, asio::use_awaitable);
  }
}

/// One io_context per thread (concurrency hint 1); the first coroutine goes
/// to the first, the second to the last.
struct asio_runner {
  explicit asio_runner(int threads) {
    for (int i = 0; i < threads; ++i) ctxs.push_back(std::make_unique<asio::io_context>(1));
  }
  asio::io_context& first() { return *ctxs.front(); }
  asio::io_context& last() { return *ctxs.back(); }
  double run(std::function<void()> extra = {}) {
    std::vector<std::function<void()>> bodies;
    for (auto& c : ctxs) bodies.emplace_back([c = c.get()] { c->run(); });
    if (extra) bodies.push_back(std::move(extra));
    return run_threads(std::move(bodies));
  }
  std::vector<std::unique_ptr<asio::io_context>> ctxs;
};

double ad_stream(int threads, std::uint64_t n) {
  asio_runner r(threads);
  pb_chan ch(capacity);
  std::uint64_t sum = 0, count = 0;
  asio::co_spawn(r.first(), ad_produce(&ch, n), asio::detached);
  asio::co_spawn(r.last(), ad_consume(&ch, n, &sum, &count), asio::detached);
  const double secs = r.run();
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}
double ad_ping_pong(int threads, std::uint64_t trips) {
  asio_runner r(threads);
  pb_chan there(capacity), back(capacity);
  std::uint64_t sum = 0, count = 0;
  asio::co_spawn(r.first(), ad_ping(&there, &back, trips, &sum, &count), asio::detached);
  asio::co_spawn(r.last(), ad_pong(&there, &back, trips), asio::detached);
  const double secs = r.run();
  check(count, trips, sum);
  return secs * 1e9 / static_cast<double>(trips);
}
double ad_sync_producer(std::uint64_t n) {
  asio_runner r(1);
  pb_chan ch(capacity);
  std::uint64_t sum = 0, count = 0;
  asio::co_spawn(r.first(), ad_consume(&ch, n, &sum, &count), asio::detached);
  const double secs = r.run([&] {
    pb_chan& mine = ch;
    const std::uint64_t total = n;
    for (item i = 1; i <= total; ++i) {
      if (mine.send(i) != postbox::send_status::ok) fail("postbox blocking send failed");
    }
  });
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}

double as_stream(int threads, std::uint64_t n) {
  asio_runner r(threads);
  asio_chan ch(r.first(), capacity);
  std::uint64_t sum = 0, count = 0;
  asio::co_spawn(r.first(), as_produce(&ch, n), asio::detached);
  asio::co_spawn(r.last(), as_consume(&ch, n, &sum, &count), asio::detached);
  const double secs = r.run();
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}
double as_ping_pong(int threads, std::uint64_t trips) {
  asio_runner r(threads);
  asio_chan there(r.first(), capacity), back(r.first(), capacity);
  std::uint64_t sum = 0, count = 0;
  asio::co_spawn(r.first(), as_ping(&there, &back, trips, &sum, &count), asio::detached);
  asio::co_spawn(r.last(), as_pong(&there, &back, trips), asio::detached);
  const double secs = r.run();
  check(count, trips, sum);
  return secs * 1e9 / static_cast<double>(trips);
}
/// Asio's channel has no blocking send: try_send, and when full an
/// async_send whose callback (run by the consumer's io_context) wakes the
/// producer through an atomic wait.
double as_sync_producer(std::uint64_t n) {
  asio_runner r(1);
  asio_chan ch(r.first(), capacity);
  std::uint64_t sum = 0, count = 0;
  auto work = asio::make_work_guard(r.first());  // the consumer's run() must outlive the producer's waits
  asio::co_spawn(r.first(), as_consume(&ch, n, &sum, &count), asio::detached);
  const double secs = r.run([&] {
    asio_chan& mine = ch;
    const std::uint64_t total = n;
    std::atomic<bool> sent{false};
    for (item i = 1; i <= total; ++i) {
      if (mine.try_send(asio::error_code{}, i)) continue;
      sent.store(false, std::memory_order_relaxed);
      mine.async_send(asio::error_code{}, i, [&sent](asio::error_code ec) {
        if (ec) fail("asio send failed");
        sent.store(true, std::memory_order_release);
        sent.notify_one();
      });
      while (!sent.load(std::memory_order_acquire)) sent.wait(false, std::memory_order_acquire);
    }
    work.reset();
  });
  check(count, n, sum);
  return static_cast<double>(n) / secs / 1e6;
}

// --- the table --------------------------------------------------------------------

struct row {
  std::string workload;
  std::string name;
  bool higher_is_better;
  std::function<double()> run;
  std::vector<double> samples{};
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 7;
  std::uint64_t items = 200000, trips = 50000;
  std::string only;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rounds") == 0) {
      rounds = std::max(1, std::atoi(argv[i + 1]));
    } else if (std::strcmp(argv[i], "--items") == 0) {
      items = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (std::strcmp(argv[i], "--trips") == 0) {
      trips = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (std::strcmp(argv[i], "--only") == 0) {
      only = argv[i + 1];
    } else {
      fail("usage: async_bench [--rounds R] [--items N] [--trips T] [--only SUBSTRING]");
    }
  }
  using postbox::mpmc;
  using postbox::spsc;
  constexpr auto rq = pb_sched::run_queue;
  constexpr auto io = pb_sched::io_context;
  std::vector<row> rows;
  for (int th : {1, 2}) {
    const std::string w = "ping_pong/" + std::to_string(th) + "t (ns)";
    rows.push_back({w, "postbox spsc run_queue", false, [=] { return pb_ping_pong<spsc>(rq, th, trips); }});
    rows.push_back({w, "postbox mpmc run_queue", false, [=] { return pb_ping_pong<mpmc>(rq, th, trips); }});
    rows.push_back({w, "postbox mpmc io_context", false, [=] { return pb_ping_pong<mpmc>(io, th, trips); }});
    rows.push_back({w, "postbox adapter", false, [=] { return ad_ping_pong(th, trips); }});
    rows.push_back({w, "asio concurrent_channel", false, [=] { return as_ping_pong(th, trips); }});
  }
  for (int th : {1, 2}) {
    const std::string w = "stream/" + std::to_string(th) + "t (M items/s)";
    rows.push_back({w, "postbox spsc run_queue", true, [=] { return pb_stream<spsc>(rq, th, items); }});
    rows.push_back({w, "postbox mpmc run_queue", true, [=] { return pb_stream<mpmc>(rq, th, items); }});
    rows.push_back({w, "postbox mpmc io_context", true, [=] { return pb_stream<mpmc>(io, th, items); }});
    rows.push_back({w, "postbox adapter", true, [=] { return ad_stream(th, items); }});
    rows.push_back({w, "asio concurrent_channel", true, [=] { return as_stream(th, items); }});
  }
  {
    const std::string w = "sync_producer (M items/s)";
    rows.push_back({w, "postbox spsc run_queue", true, [=] { return pb_sync_producer<spsc>(rq, items); }});
    rows.push_back({w, "postbox mpmc run_queue", true, [=] { return pb_sync_producer<mpmc>(rq, items); }});
    rows.push_back({w, "postbox mpmc io_context", true, [=] { return pb_sync_producer<mpmc>(io, items); }});
    rows.push_back({w, "postbox adapter", true, [=] { return ad_sync_producer(items); }});
    rows.push_back({w, "asio concurrent_channel", true, [=] { return as_sync_producer(items); }});
  }

  if (!only.empty()) {
    std::erase_if(rows, [&](const row& x) { return (x.workload + " " + x.name).find(only) == std::string::npos; });
  }
  for (int r = 0; r < rounds; ++r) {
    for (auto& x : rows) x.samples.push_back(x.run());
  }

  std::printf("async_bench: postbox coroutine channels vs asio::experimental::concurrent_channel (Asio %d.%d.%d)\n",
              ASIO_VERSION / 100000, ASIO_VERSION / 100 % 1000, ASIO_VERSION % 100);
  std::printf("flags: %s\n", POSTBOX_BENCH_CXX_FLAGS);
  std::printf("cpu: %s, %u hardware threads; load average %s; rounds %d (interleaved), items %llu, trips %llu\n",
              cpu_model().c_str(), std::thread::hardware_concurrency(), load_average().c_str(), rounds,
              static_cast<unsigned long long>(items), static_cast<unsigned long long>(trips));
  std::printf("ratio: this row's median over Asio's in the same workload (throughput: >= 1.0 is the target; "
              "round trip: <= 1.0)\n\n");
  std::printf("| workload | row | median | min | max | ratio |\n| --- | --- | ---: | ---: | ---: | ---: |\n");
  for (const auto& x : rows) {
    double peer = 0;
    for (const auto& y : rows) {
      if (y.workload == x.workload && y.name == "asio concurrent_channel") peer = median(y.samples);
    }
    const auto [lo, hi] = std::minmax_element(x.samples.begin(), x.samples.end());
    const double m = median(x.samples);
    std::printf("| %s | %s | %.3g | %.3g | %.3g | %.2fx |\n", x.workload.c_str(), x.name.c_str(), m, *lo, *hi,
                peer > 0 ? m / peer : 0.0);
  }
  std::printf("\n(uptime load after the run: %s)\n", load_average().c_str());
  return 0;
}
