// SPDX-License-Identifier: MIT
// postbox::testing assertions for messaging code: handler_is_idempotent, saga_compensates_in_reverse, no_message_lost (and the settlement_log it reads).
#pragma once

// Part of the test kit: <postbox/testing.hpp> includes it. Each assertion
// returns a `check_result`: true or false plus a readable explanation of what
// was checked and, on failure, what differed. It converts to bool and prints
// with operator<<, so `CHECK(postbox::testing::no_message_lost(...))` in
// Catch2 shows the explanation, and any other framework can print
// `r.explanation`.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/consumer/sources.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/observer.hpp>
#include <postbox/saga.hpp>
#include <postbox/testing/capture.hpp>
#include <postbox/testing/faults.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace testing {

/// What an assertion found: `passed`, and an explanation (one or more lines)
/// naming what was checked and, on failure, the difference. Converts to
/// bool; prints the explanation with operator<<. A plain value.
struct check_result {
  bool passed = true;
  std::string explanation;

  /// `passed`. Never allocates.
  explicit operator bool() const noexcept { return passed; }
  /// Writes the explanation (so a test framework shows it on failure).
  friend std::ostream& operator<<(std::ostream& os, const check_result& r) {
    return os << (r.passed ? "passed: " : "FAILED: ") << r.explanation;
  }
};

namespace detail {

template <class V>
concept streamable = requires(std::ostream& os, const V& v) { os << v; };

template <class V>
std::string describe(const V& v) {
  if constexpr (streamable<V>) {
    std::ostringstream os;
    os << v;
    return os.str();
  } else {
    return "(an effect that cannot be printed: give it operator<< for details)";
  }
}

/// A source over a list of envelopes (copied on each receive), closed at the end.
template <class T>
class list_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = false;
  explicit list_source(const std::vector<envelope<T>>& items) : items_(items.begin(), items.end()) {}
  [[nodiscard]] receive_result<inbound<T>> receive(duration) {
    if (items_.empty()) return receive_result<inbound<T>>(receive_status::closed);
    envelope<T> e = std::move(items_.front());
    items_.pop_front();
    return inbound<T>::of(std::move(e));
  }
  [[nodiscard]] std::string_view name() const noexcept { return "inputs"; }

 private:
  std::deque<envelope<T>> items_;
};

/// Runs `subject.handle(env)`; an exception becomes its text.
template <class Subject, class T>
bool handle_one(Subject& subject, const envelope<T>& env, std::string& failure) {
  POSTBOX_TRY {
    (void)subject.handle(env);
    return true;
  }
  POSTBOX_CATCH_ALL {
#if POSTBOX_HAS_EXCEPTIONS
    try {
      throw;
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "a non-standard exception";
    }
#endif
    return false;
  }
  return false;
}

}  // namespace detail

/// How `handler_is_idempotent` duplicates the inputs. A plain value.
struct idempotency_options {
  std::uint64_t seed = 1;                      ///< seed of the duplicate and reorder decisions
  fault_rule duplicate{0.0, 1};                ///< which inputs come twice (default: every one)
  std::size_t reorder_window = 0;              ///< also reorder within this window (0: keep the order)
};

/// Whether a handler has the same effect when its inputs are duplicated.
/// `make()` builds a fresh subject: an object with `handle(const
/// envelope<T>&)` (the handler; its return value is ignored, an exception
/// fails the check) and `effect()` returning an equality-comparable value
/// (printable with operator<< for a readable difference). One subject
/// handles each input once; a second handles them through a
/// `fault_injector` duplicating per `options` (the duplicate has the same
/// id, as a redelivery has); the effects must be equal, and at least one
/// duplicate must have been delivered (or the check says it proved nothing).
/// Runs on the calling thread; blocks as the handler does; allocates.
///
/// **Example**:
///   struct ledger { std::map<std::string, long> cents; postbox::inbox<...>& ...;
///                   void handle(const postbox::envelope<payment>& e); auto effect() const { return cents; } };
///   CHECK(postbox::testing::handler_is_idempotent(inputs, [] { return ledger{}; }));
template <class T, class MakeSubject>
[[nodiscard]] check_result handler_is_idempotent(const std::vector<envelope<T>>& inputs, MakeSubject&& make,
                                                 idempotency_options options = {}) {
  check_result r;
  auto once = make();
  std::string failure;
  for (const auto& e : inputs) {
    if (!detail::handle_one(once, e, failure)) {
      r.passed = false;
      r.explanation = "handler_is_idempotent: the handler threw on the first delivery of " + e.id.to_string() +
                      ": " + failure;
      return r;
    }
  }
  fault_plan plan;
  plan.seed = options.seed;
  plan.duplicate = options.duplicate;
  plan.reorder_window = options.reorder_window;
  fault_injector faults(plan);
  auto source = faults.source(detail::list_source<T>(inputs));
  auto twice = make();
  std::size_t deliveries = 0;
  for (;;) {
    auto item = source.receive(duration{0});
    if (item.status() == receive_status::closed) break;
    if (!item.has_value() || !item->message) continue;
    ++deliveries;
    if (!detail::handle_one(twice, *item->message, failure)) {
      r.passed = false;
      r.explanation = "handler_is_idempotent: the handler threw on a redelivery of " + item->message->id.to_string() +
                      ": " + failure;
      return r;
    }
  }
  const auto counts = faults.counts();
  const std::string what = std::to_string(inputs.size()) + " input(s), " + std::to_string(counts.duplicated) +
                           " duplicate(s) delivered (seed " + std::to_string(options.seed) + ")";
  if (counts.duplicated == 0) {
    r.passed = false;
    r.explanation = "handler_is_idempotent: " + what + ": no duplicate was delivered, so nothing was proven";
    return r;
  }
  const auto a = once.effect();
  const auto b = twice.effect();
  if (a == b) {
    r.explanation = "handler_is_idempotent: " + what + ": the effect is the same as with each input once";
  } else {
    r.passed = false;
    r.explanation = "handler_is_idempotent: " + what + ": the effect differs\n  each input once: " +
                    detail::describe(a) + "\n  with duplicates: " + detail::describe(b);
  }
  (void)deliveries;
  return r;
}

/// Whether a saga undoes its completed steps in reverse order whichever step
/// fails. For each step k in turn, runs a copy of `definition` (on a
/// `memory_saga_store`, starting from `data`) whose step k fails with an
/// injected failure instead of running its action, and checks: the outcome is
/// `compensated`, the actions of steps 0..k-1 completed, and the
/// compensations ran exactly for those of them that have one, each once, in
/// reverse order. The real actions and compensations run (they must be
/// idempotent, as any saga step). A compensation that fails is retried by
/// `options.compensation_retry`, waiting on `clk`: keep compensations
/// succeeding, or give a policy and a clock that do not wait. Blocks as the
/// steps do; allocates.
[[nodiscard]] inline check_result saga_compensates_in_reverse(const saga_definition& definition,
                                                              std::string data = {}, saga_options options = {},
                                                              const clock& clk = default_clock()) {
  check_result r;
  const auto& steps = definition.steps();
  std::ostringstream out;
  out << "saga_compensates_in_reverse: '" << definition.name() << "', " << steps.size() << " step(s)";
  if (steps.empty()) {
    r.passed = false;
    out << ": no steps, nothing to check";
    r.explanation = out.str();
    return r;
  }
  for (std::size_t k = 0; k < steps.size(); ++k) {
    auto log = std::make_shared<std::vector<std::string>>();
    auto log_mutex = std::make_shared<std::mutex>();
    auto note = [log, log_mutex](std::string s) {
      std::lock_guard g(*log_mutex);
      log->push_back(std::move(s));
    };
    saga_definition copy(definition.name() + "#fail-at-" + std::to_string(k));
    for (std::size_t i = 0; i < steps.size(); ++i) {
      const auto& spec = steps[i];
      const std::string name = spec.name;
      std::function<step_result(step_context&)> action;
      if (i == k) {
        action = [name, k](step_context&) {
          return step_result::failure("injected failure at step " + std::to_string(k) + " (" + name + ")");
        };
      } else {
        action = [inner = spec.action, name, note](step_context& ctx) {
          step_result res = inner(ctx);
          if (res.ok) note("do " + name);
          return res;
        };
      }
      if (spec.compensation) {
        copy.step(name, std::move(action),
                  [inner = spec.compensation, name, note](step_context& ctx) {
                    step_result res = inner(ctx);
                    if (res.ok) note("undo " + name);
                    return res;
                  },
                  spec.timeout);
      } else {
        copy.step(name, std::move(action), nullptr, spec.timeout);
      }
    }
    std::vector<std::string> expected;
    for (std::size_t i = 0; i < k; ++i) expected.push_back("do " + steps[i].name);
    for (std::size_t i = k; i-- > 0;) {
      if (steps[i].compensation) expected.push_back("undo " + steps[i].name);
    }
    memory_saga_store store;
    saga_coordinator coordinator(store, options, clk);
    coordinator.add(std::move(copy));
    auto end = coordinator.run(definition.name() + "#fail-at-" + std::to_string(k), data);
    std::vector<std::string> got;
    {
      std::lock_guard g(*log_mutex);
      got = *log;
    }
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
      return s.empty() ? std::string("(nothing)") : s;
    };
    std::string problem;
    if (!end.has_value()) {
      problem = "the saga did not finish: " + std::string(to_string(end.status()));
    } else if (end->outcome != saga_outcome::compensated) {
      problem = "outcome " + std::string(to_string(end->outcome)) + ", expected compensated" +
                (end->failure_reason.empty() ? "" : " (" + end->failure_reason + ")");
    } else if (got != expected) {
      problem = "expected " + join(expected) + "; got " + join(got);
    }
    if (!problem.empty()) {
      r.passed = false;
      out << "\n  failing step " << k << " (" << steps[k].name << "): " << problem;
    } else {
      out << "\n  failing step " << k << " (" << steps[k].name << "): " << join(got);
    }
  }
  r.explanation = out.str();
  return r;
}

/// Records how each delivery of a consumer ended, through an observer's
/// settle hook: pass `observer()` as `consumer_options::observer` (several
/// consumers may share it). Thread-safe (one mutex); each settle allocates.
class settlement_log {
 public:
  settlement_log() {
    observer_.on_settle = [this](const message_event& e) {
      if (e.id.is_nil()) return;  // undecodable input has no id to match
      std::lock_guard g(mutex_);
      auto& v = outcomes_[e.id];
      v.push_back(e.outcome);
    };
  }
  settlement_log(const settlement_log&) = delete;
  settlement_log& operator=(const settlement_log&) = delete;

  /// The observer to give consumers. Valid while the log lives.
  [[nodiscard]] const postbox::observer& observer() const noexcept { return observer_; }
  /// Every settle outcome of message `id`, in order (empty: never settled).
  [[nodiscard]] std::vector<settle_outcome> outcomes(message_id id) const {
    std::lock_guard g(mutex_);
    auto it = outcomes_.find(id);
    return it == outcomes_.end() ? std::vector<settle_outcome>{} : it->second;
  }
  /// The last settle outcome of `id`, `none` when it never settled.
  [[nodiscard]] settle_outcome last(message_id id) const {
    std::lock_guard g(mutex_);
    auto it = outcomes_.find(id);
    return it == outcomes_.end() || it->second.empty() ? settle_outcome::none : it->second.back();
  }

 private:
  postbox::observer observer_;
  mutable std::mutex mutex_;
  std::map<message_id, std::vector<settle_outcome>> outcomes_;
};

/// Whether every input ended acked or dead-lettered: for each id in
/// `inputs`, the last outcome `log` recorded must be `acked` or
/// `dead_lettered` (a redriven message counts by its last delivery). The
/// explanation lists each message that is not, with its last outcome
/// ("never settled", "retried", "released", ...). Allocates. Thread-safe
/// as the log.
[[nodiscard]] inline check_result no_message_lost(const std::vector<message_id>& inputs, const settlement_log& log) {
  check_result r;
  std::size_t acked = 0, dead = 0;
  std::string missing;
  std::size_t lost = 0;
  for (const message_id& id : inputs) {
    const settle_outcome o = log.last(id);
    if (o == settle_outcome::acked) {
      ++acked;
    } else if (o == settle_outcome::dead_lettered) {
      ++dead;
    } else {
      ++lost;
      missing += "\n  " + id.to_string() + ": " +
                 (o == settle_outcome::none ? std::string("never settled") : "last " + std::string(to_string(o)));
    }
  }
  r.passed = lost == 0;
  r.explanation = "no_message_lost: " + std::to_string(inputs.size()) + " input(s): " + std::to_string(acked) +
                  " acked, " + std::to_string(dead) + " dead-lettered, " + std::to_string(lost) +
                  " neither" + missing;
  return r;
}

/// As above, for the inputs a capture sink recorded (what the test fed in).
[[nodiscard]] inline check_result no_message_lost(const capture_sink& inputs, const settlement_log& log) {
  std::vector<message_id> ids;
  for (const auto& c : inputs.all()) {
    if (std::find(ids.begin(), ids.end(), c.id) == ids.end()) ids.push_back(c.id);
  }
  return no_message_lost(ids, log);
}

}  // namespace testing
POSTBOX_END_NAMESPACE
