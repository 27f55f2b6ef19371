// testing_handlers: the test kit (<postbox/testing.hpp>) on three things users test. An order
// handler is run under the duplicate injector (idempotent, and a naive one is caught); a saga
// gets an injected failure at each step (its compensations run in reverse); a consumer's retry
// schedule is stepped with the harness's advance_to_next(), and what the handler published is
// captured. Deterministic per seed, no sleeps; prints each check and exits 1 if one fails.
//
//   orders ──▶ fault_injector(duplicate) ──▶ handler ──▶ effect == effect of each once?
//   saga: reserve ─▶ charge ─▶ ship   (fail at k) ──▶ undo k-1 … 0
//   channel ──▶ consumer (harness clock) ──retry 100/200/400 ms──▶ capture_sink
#include <postbox/postbox.hpp>
#include <postbox/testing.hpp>

#include <cstdio>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;
namespace pt = postbox::testing;

struct order_placed { static constexpr const char* message_type = "order.placed"; std::string order; long long cents = 0; };
struct order_shipped { static constexpr const char* message_type = "order.shipped"; std::string order; };
using order_env = postbox::envelope<order_placed>;

// Handlers under test: one books revenue once per message id, the other on every delivery.
struct order_handler {
  std::set<postbox::message_id> seen;
  long long revenue = 0;
  void handle(const order_env& e) { if (seen.insert(e.id).second) revenue += e.payload.cents; }
  [[nodiscard]] long long effect() const { return revenue; }
};
struct naive_handler {
  long long revenue = 0;
  void handle(const order_env& e) { revenue += e.payload.cents; }
  [[nodiscard]] long long effect() const { return revenue; }
};

int main() {
  int failed = 0;
  auto expect = [&](bool ok, const std::string& what) {
    std::printf("[%s] %s\n", ok ? "ok" : "FAILED", what.c_str());
    if (!ok) ++failed;
  };
  postbox::manual_clock clock;
  const std::vector<order_env> orders = {postbox::make_envelope(order_placed{"o-1", 1200}, clock),
                                         postbox::make_envelope(order_placed{"o-2", 800}, clock)};

  // 1. Idempotency under the duplicate injector (every message delivered twice, seed 7).
  const auto idem = pt::handler_is_idempotent(orders, [] { return order_handler{}; }, {.seed = 7});
  expect(idem.passed, idem.explanation);
  const auto naive = pt::handler_is_idempotent(orders, [] { return naive_handler{}; }, {.seed = 7});
  expect(!naive.passed, "a naive handler is caught: " + naive.explanation);

  // 2. A saga's compensation, with an injected failure at each step in turn.
  std::vector<std::string> stock;
  postbox::saga_definition saga("checkout");
  saga.step("reserve", [&](postbox::step_context&) { stock.push_back("reserved"); },
            [&](postbox::step_context&) { stock.push_back("released"); })
      .step("charge", [](postbox::step_context&) {}, [](postbox::step_context&) {})
      .step("ship", [](postbox::step_context&) {}, nullptr);
  const auto comp = pt::saga_compensates_in_reverse(saga);
  expect(comp.passed && stock.size() == 4, comp.explanation);

  // 3. A retry schedule on the harness clock: the handler fails twice, then ships.
  pt::harness h(7);
  postbox::channel<order_env> inbox(8);
  postbox::dead_letter_queue<order_placed> dead({.capacity = 8}, h.get_clock());
  pt::capture_sink sent("shipping", h.get_clock());
  pt::settlement_log settled;
  auto opts = h.configure(postbox::consumer_options{});
  opts.retry = {.max_attempts = 4, .initial_backoff = 100ms, .multiplier = 2.0, .max_backoff = 1s, .full_jitter = false};
  opts.observer = &settled.observer();
  const auto start = h.now();
  std::vector<long long> attempts_at;
  postbox::consumer c(postbox::channel_source<order_placed>(inbox, "orders"),
                      [&](const order_env& e) {
                        attempts_at.push_back(std::chrono::duration_cast<std::chrono::milliseconds>(h.now() - start).count());
                        if (attempts_at.size() < 3) throw std::runtime_error("warehouse busy");
                        (void)sent.try_send(postbox::caused_by(e, order_shipped{e.payload.order}, h.get_clock()));
                        return postbox::settlement::ack();
                      },
                      dead, opts);
  h.attach(c, "orders");
  auto order = postbox::make_envelope(order_placed{"o-3", 500}, h.get_clock());
  const auto order_id = order.id;
  (void)inbox.try_send(std::move(order));
  h.run_until_idle();
  while (h.advance_to_next()) {}
  expect(attempts_at == std::vector<long long>{0, 100, 300},
         "retry schedule: attempts at t+0, t+100, t+300 ms (got " + std::to_string(attempts_at.size()) + " attempts)");
  const auto chain = sent.causation_chain(sent.all().empty() ? postbox::message_id{} : sent.all().back().id);
  expect(sent.published<order_shipped>().size() == 1 && chain.size() == 1 && chain[0].causation_id == order_id,
         "one order.shipped captured, caused by the order");
  const auto lost = pt::no_message_lost({order_id}, settled);
  expect(lost.passed, lost.explanation);

  std::printf("%s\n", failed == 0 ? "all checks passed" : "some checks FAILED");
  return failed == 0 ? 0 : 1;
}
