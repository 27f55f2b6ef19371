// A consumer with retries (backoff with a seeded jitter), a rejected order, an
// expired one and a poison message, all dead-lettered; then the rejected order
// is redriven once the rule is fixed. A manual clock makes the output exact.
//
//   orders ──> consumer ──handler──> ack
//   raw bytes ──decode──> consumer ─┘  │ retry: timer, then again
//                                      └──> dead_letter_queue ──redrive (1/s)──> orders
#include <postbox/postbox.hpp>
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/testing.hpp>  // postbox::manual_clock

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>

using namespace std::chrono_literals;
struct order { int id = 0; int qty = 0; };

int main() {
  postbox::manual_clock clock;
  const auto start = clock.now();
  postbox::channel<postbox::envelope<order>> orders(16);
  postbox::channel<std::string> raw(16);
  postbox::dead_letter_queue<order> dead({.capacity = 100, .redrive_rate = 1}, clock);
  dead.set_origin("orders", orders);

  bool allow_zero = false;
  auto handle = [&](const postbox::envelope<order>& e, postbox::consume_context& ctx) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(clock.now() - start).count();
    std::printf("t+%-4lld order %d attempt %u: ", static_cast<long long>(ms), e.payload.id, ctx.attempt());
    if (e.payload.id == 1 && ctx.attempt() < 3) {
      std::puts("inventory busy");
      throw std::runtime_error("inventory busy");  // transient: retried by policy
    }
    if (e.payload.qty == 0 && !allow_zero) {
      std::puts("rejected");
      return postbox::settlement::reject("quantity must be positive");
    }
    const auto earlier = e.headers.get(postbox::header_names::dead_letter_attempts);
    std::printf("shipped%s%s\n", earlier ? ", attempts before redrive: " : "", earlier ? std::string(*earlier).c_str() : "");
    return postbox::settlement::ack();
  };
  postbox::consumer_options opts;
  opts.threads = 0;  // driven by poll() below
  opts.clock = &clock;
  opts.jitter_seed = 7;
  opts.retry.max_attempts = 4;
  opts.retry.initial_backoff = 100ms;
  postbox::consumer c(postbox::channel_source<order>(orders, "orders"), handle, dead, opts);
  auto decode = [&](std::string_view text) -> postbox::decode_outcome<order> {
    int id = 0, qty = 0;
    if (std::sscanf(std::string(text).c_str(), "order %d %d", &id, &qty) != 2)
      return postbox::decode_failure{postbox::errc::parse_error, "", "expected 'order <id> <qty>'"};
    return postbox::make_envelope(std::string("order"), order{id, qty}, postbox::message_kind::command, clock);
  };
  postbox::consumer from_raw(postbox::make_raw_source<order>(raw, decode, "raw-orders"), handle, dead, opts);

  (void)orders.try_send(postbox::make_envelope(std::string("order"), order{1, 5}, postbox::message_kind::command, clock));
  (void)orders.try_send(postbox::make_envelope(std::string("order"), order{2, 0}, postbox::message_kind::command, clock));
  auto late = postbox::make_envelope(std::string("order"), order{3, 1}, postbox::message_kind::command, clock);
  late.deadline = start;  // already past: never started
  (void)orders.try_send(std::move(late));
  (void)raw.try_send("order 4 2");
  (void)raw.try_send("hello?");

  for (int step = 0; step < 6; ++step, clock.advance(50ms)) (void)(c.poll() + from_raw.poll());
  for (const auto& d : dead.list())
    std::printf("dead letter: %-25s source=%-10s attempts=%u %s\n", d.reason.c_str(), d.source.c_str(), d.attempts,
                d.message ? "" : ("raw=\"" + d.raw + "\"").c_str());

  allow_zero = true;  // the rule is fixed: redrive the rejected order
  postbox::dead_letter_filter rejected;
  rejected.reason = "quantity must be positive";
  std::printf("redriving %zu\n", dead.redrive({.filter = rejected}));
  (void)c.poll();
  const auto s = c.stats();
  std::printf("acked=%llu retried=%llu dead_lettered=%llu left=%zu\n", static_cast<unsigned long long>(s.acked),
              static_cast<unsigned long long>(s.retried), static_cast<unsigned long long>(s.dead_lettered), dead.size());
  return s.acked == 2 && dead.size() == 2 ? 0 : 1;
}
