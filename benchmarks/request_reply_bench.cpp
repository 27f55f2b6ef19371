// SPDX-License-Identifier: MIT
// Benchmark: request-reply round trip (postbox vs ZeroMQ inproc REQ/REP vs a bare promise/future) and operations throughput.
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <thread>
#include <vector>

#if POSTBOX_BENCH_HAVE_ZMQ
#include <zmq.h>
#endif

namespace {

using bench_clock = std::chrono::steady_clock;

double seconds_since(bench_clock::time_point t0) {
  return std::chrono::duration<double>(bench_clock::now() - t0).count();
}

void report(const char* name, const char* desc, int n, double secs, double base_ns) {
  const double ns = secs * 1e9 / n;
  std::printf("%-28s %10.0f ns/op %12.0f op/s  x%.2f vs promise  (%s)\n", name, ns, n / secs,
              base_ns > 0 ? ns / base_ns : 1.0, desc);
}

// Bare handoff: the caller passes a promise to a server thread and waits on its future.
double promise_round_trip(int n) {
  postbox::channel<std::promise<int>*> ch(64);
  std::thread server([&] {
    while (auto p = ch.receive()) (*p)->set_value(1);
  });
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    std::promise<int> p;
    auto f = p.get_future();
    while (ch.try_send(&p) != postbox::send_status::ok) std::this_thread::yield();
    (void)f.get();
  }
  const double s = seconds_since(t0);
  ch.close();
  server.join();
  return s;
}

double postbox_round_trip(int n) {
  postbox::timer_service timers;
  postbox::channel<postbox::envelope<int>> requests(64);
  postbox::endpoint_registry<int> registry;
  postbox::responder<int, int> resp(requests, registry, [](const postbox::envelope<int>& e) { return e.payload + 1; },
                                    postbox::default_clock(), 1);
  postbox::requester<int, int> req(requests, registry, timers);
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    auto f = req.request(i, std::chrono::seconds(10));
    if (!f.has_value() || !f->get().ok()) std::abort();
  }
  return seconds_since(t0);
}

#if POSTBOX_BENCH_HAVE_ZMQ
double zmq_round_trip(int n) {
  void* ctx = zmq_ctx_new();
  void* rep = zmq_socket(ctx, ZMQ_REP);
  zmq_bind(rep, "inproc://rr-bench");
  std::thread server([&] {
    int v = 0;
    for (int i = 0; i < n; ++i) {
      zmq_recv(rep, &v, sizeof v, 0);
      ++v;
      zmq_send(rep, &v, sizeof v, 0);
    }
  });
  void* req = zmq_socket(ctx, ZMQ_REQ);
  zmq_connect(req, "inproc://rr-bench");
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    int v = i;
    zmq_send(req, &v, sizeof v, 0);
    zmq_recv(req, &v, sizeof v, 0);
  }
  const double s = seconds_since(t0);
  server.join();
  zmq_close(req);
  zmq_close(rep);
  zmq_ctx_term(ctx);
  return s;
}
#endif

double operations_throughput(int n) {
  postbox::operations<int> ops(postbox::default_clock(), {.workers = 2, .queue_capacity = 1024, .retention = postbox::duration::zero()});
  std::atomic<int> completed{0};
  const auto t0 = bench_clock::now();
  for (int i = 0; i < n; ++i) {
    for (;;) {
      auto s = ops.submit("bench", "", "", [&completed](postbox::operation_context&) {
        completed.fetch_add(1, std::memory_order_relaxed);
        return 1;
      });
      if (s.has_value()) break;
      std::this_thread::yield();
    }
    if (i % 1024 == 1023) ops.sweep();
  }
  while (completed.load() < n) std::this_thread::yield();
  return seconds_since(t0);
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const int n = 20000;
  std::printf("request-reply round trip, %d sequential requests, one responder thread; %u hardware threads\n", n,
              std::thread::hardware_concurrency());
  const double base = promise_round_trip(n);
  const double base_ns = base * 1e9 / n;
  report("promise/future handoff", "promise pointer over a channel, server sets it", n, base, base_ns);
  const double pb = postbox_round_trip(n);
  report("postbox requester", "envelope + correlation + timer + registry", n, pb, base_ns);
#if POSTBOX_BENCH_HAVE_ZMQ
  const double zq = zmq_round_trip(n);
  report("zeromq inproc REQ/REP", "4-byte message each way", n, zq, base_ns);
  std::printf("postbox / zeromq round-trip time ratio: %.2f\n", pb / zq);
#else
  std::printf("zeromq inproc REQ/REP: skipped (libzmq not found)\n");
#endif
  const int m = 100000;
  const double s = operations_throughput(m);
  std::printf("%-28s %10.0f ns/op %12.0f op/s  (submit + run + complete, 2 workers)\n", "operations submit+complete",
              s * 1e9 / m, m / s);
  return 0;
}
