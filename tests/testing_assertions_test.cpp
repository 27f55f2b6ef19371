// SPDX-License-Identifier: MIT
// Specification tests for the test kit's assertions: handler_is_idempotent, saga_compensates_in_reverse, no_message_lost.
#include <postbox/channel.hpp>
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/inbox.hpp>
#include <postbox/saga.hpp>
#include <postbox/store.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using postbox::testing::check_result;

struct payment {
  static constexpr const char* message_type = "payment";
  std::string account;
  long long cents = 0;
};

namespace {

using pay_env = postbox::envelope<payment>;

std::vector<pay_env> payments() {
  return {postbox::make_envelope(payment{"a", 100}), postbox::make_envelope(payment{"b", 250}),
          postbox::make_envelope(payment{"a", 5})};
}

// Credits every delivery: not idempotent.
struct naive_ledger {
  long long total = 0;
  void handle(const pay_env& e) { total += e.payload.cents; }
  [[nodiscard]] long long effect() const { return total; }
};

// Credits through an inbox on a memory store: a redelivered id has no effect.
struct inbox_ledger {
  postbox::memory_store store;
  postbox::inbox<postbox::memory_store> in{store, "ledger"};
  long long total = 0;
  void handle(const pay_env& e) {
    (void)in.handle(e, [&](auto&) {
      total += e.payload.cents;
      return postbox::errc::ok;
    });
  }
  [[nodiscard]] long long effect() const { return total; }
};

struct throwing_handler {
  void handle(const pay_env&) { throw std::runtime_error("ledger offline"); }
  [[nodiscard]] int effect() const { return 0; }
};

postbox::saga_definition three_steps(std::vector<std::string>& calls, bool first_action_fails = false) {
  postbox::saga_definition def("order");
  def.step(
         "reserve",
         [&calls, first_action_fails](postbox::step_context&) {
           calls.push_back("reserve");
           return !first_action_fails;
         },
         [&calls](postbox::step_context&) { calls.push_back("release"); })
      .step("notify", [&calls](postbox::step_context&) { calls.push_back("notify"); }, nullptr)
      .step("charge", [&calls](postbox::step_context&) { calls.push_back("charge"); },
            [&calls](postbox::step_context&) { calls.push_back("refund"); });
  return def;
}

}  // namespace

TEST_CASE("handler_is_idempotent passes for a handler guarded by an inbox", "[testing_assertions]") {
  const auto r = postbox::testing::handler_is_idempotent(payments(), [] { return inbox_ledger{}; });
  CHECK(r.passed);
  CHECK(static_cast<bool>(r));
  CHECK(r.explanation.find("3 duplicate(s)") != std::string::npos);
}

TEST_CASE("handler_is_idempotent fails for a handler that credits every delivery, showing both effects",
          "[testing_assertions]") {
  const auto r = postbox::testing::handler_is_idempotent(payments(), [] { return naive_ledger{}; });
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("each input once: 355") != std::string::npos);
  CHECK(r.explanation.find("with duplicates: 710") != std::string::npos);
}

TEST_CASE("handler_is_idempotent with one duplicate in three finds the naive handler too", "[testing_assertions]") {
  postbox::testing::idempotency_options o;
  o.duplicate = {0.0, 3};
  const auto r = postbox::testing::handler_is_idempotent(payments(), [] { return naive_ledger{}; }, o);
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("with duplicates: 360") != std::string::npos);
}

TEST_CASE("handler_is_idempotent refuses to pass when no duplicate was delivered", "[testing_assertions]") {
  postbox::testing::idempotency_options o;
  o.duplicate = {};
  const auto r = postbox::testing::handler_is_idempotent(payments(), [] { return naive_ledger{}; }, o);
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("nothing was proven") != std::string::npos);
}

TEST_CASE("handler_is_idempotent reports a throwing handler with its message", "[testing_assertions]") {
  const auto r = postbox::testing::handler_is_idempotent(payments(), [] { return throwing_handler{}; });
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("ledger offline") != std::string::npos);
}

TEST_CASE("saga_compensates_in_reverse passes when every completed step is undone in reverse", "[testing_assertions]") {
  std::vector<std::string> calls;
  const auto r = postbox::testing::saga_compensates_in_reverse(three_steps(calls));
  INFO(r.explanation);
  CHECK(r.passed);
  // Failing at step 2 ran reserve and notify, then undid reserve only (notify has no compensation).
  CHECK(r.explanation.find("failing step 2 (charge): do reserve, do notify, undo reserve") != std::string::npos);
  CHECK(r.explanation.find("failing step 0 (reserve): (nothing)") != std::string::npos);
  // The real steps ran: reserve in the runs failing at 1 and 2, one release for each.
  CHECK(std::count(calls.begin(), calls.end(), "reserve") == 2);
  CHECK(std::count(calls.begin(), calls.end(), "release") == 2);
  CHECK(std::count(calls.begin(), calls.end(), "charge") == 0);
}

TEST_CASE("saga_compensates_in_reverse fails when a step's own action fails, naming what ran", "[testing_assertions]") {
  std::vector<std::string> calls;
  const auto r = postbox::testing::saga_compensates_in_reverse(three_steps(calls, true));
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("failing step 2 (charge): expected do reserve, do notify, undo reserve; got (nothing)") !=
        std::string::npos);
}

TEST_CASE("saga_compensates_in_reverse fails when a compensation cannot undo its step", "[testing_assertions]") {
  postbox::saga_definition def("transfer");
  def.step("debit", [](postbox::step_context&) {}, [](postbox::step_context&) { return false; })
      .step("credit", [](postbox::step_context&) {}, nullptr);
  postbox::saga_options o;
  o.compensation_retry.max_attempts = 1;  // give up at once: no waiting
  const auto r = postbox::testing::saga_compensates_in_reverse(def, {}, o);
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find("failing step 1 (credit): outcome failed") != std::string::npos);
}

TEST_CASE("no_message_lost passes when every input is acked or dead-lettered", "[testing_assertions]") {
  postbox::manual_clock clock;
  postbox::channel<pay_env> ch(8);
  postbox::testing::capture_sink inputs;
  for (auto e : payments()) {
    (void)inputs.record(e);
    REQUIRE(ch.try_send(std::move(e)) == postbox::send_status::ok);
  }
  postbox::testing::settlement_log log;
  postbox::dead_letter_queue<payment> dead({.capacity = 10}, clock);
  postbox::consumer_options opts;
  opts.threads = 0;
  opts.clock = &clock;
  opts.observer = &log.observer();
  postbox::consumer c(postbox::channel_source<payment>(ch, "payments"),
                      [](const pay_env& e) {
                        return e.payload.account == "b" ? postbox::settlement::reject("closed account")
                                                        : postbox::settlement::ack();
                      },
                      dead, opts);
  (void)c.poll();
  const auto r = postbox::testing::no_message_lost(inputs, log);
  INFO(r);
  CHECK(r.passed);
  CHECK(r.explanation.find("2 acked, 1 dead-lettered, 0 neither") != std::string::npos);
}

TEST_CASE("no_message_lost names a message waiting for a retry and one never delivered", "[testing_assertions]") {
  postbox::manual_clock clock;
  postbox::channel<pay_env> ch(8);
  const auto all = payments();
  REQUIRE(ch.try_send(pay_env(all[0])) == postbox::send_status::ok);
  postbox::testing::settlement_log log;
  postbox::dead_letter_queue<payment> dead({.capacity = 10}, clock);
  postbox::consumer_options opts;
  opts.threads = 0;
  opts.clock = &clock;
  opts.observer = &log.observer();
  postbox::consumer c(postbox::channel_source<payment>(ch, "payments"),
                      [](const pay_env&) { return postbox::settlement::retry(1min); }, dead, opts);
  (void)c.poll();
  const auto r = postbox::testing::no_message_lost({all[0].id, all[1].id}, log);
  CHECK_FALSE(r.passed);
  CHECK(r.explanation.find(all[0].id.to_string() + ": last retried") != std::string::npos);
  CHECK(r.explanation.find(all[1].id.to_string() + ": never settled") != std::string::npos);
  CHECK(log.outcomes(all[0].id) == std::vector<postbox::settle_outcome>{postbox::settle_outcome::retried});
}

TEST_CASE("a check result prints its verdict and explanation", "[testing_assertions]") {
  std::ostringstream os;
  os << check_result{false, "why"};
  CHECK(os.str() == "FAILED: why");
}
