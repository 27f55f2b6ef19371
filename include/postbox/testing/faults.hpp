// SPDX-License-Identifier: MIT
// postbox::testing::fault_injector: seeded source and destination decorators that duplicate, reorder, delay, fail, drop and poison messages, and count what they injected.
#pragma once

// Part of the test kit: <postbox/testing.hpp> includes it.
//
// One injector holds the plan, one seeded generator and the counters; the
// decorators it makes (`source(...)`, `destination(...)`) share them, so the
// test keeps the injector and reads `counts()` / `report()` after the
// decorated source has moved into a consumer. Every decision is drawn from
// the generator in a fixed order per message, so the same seed and the same
// input give the same faults.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/consumer/sources.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/settlement.hpp>
#include <postbox/store.hpp>
#include <postbox/detail/random.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace testing {

/// When one kind of fault hits a message: with `probability` (0 to 1, drawn
/// per message from the injector's seed) or on every `every_nth` message
/// (1 = every message, 3 = the 3rd, 6th, ...), whichever says yes. Both zero:
/// never. A plain value.
struct fault_rule {
  double probability = 0.0;
  std::uint64_t every_nth = 0;

  /// Whether the rule can ever hit. Never allocates.
  [[nodiscard]] constexpr bool active() const noexcept { return probability > 0.0 || every_nth > 0; }
};

/// What an injector does to the messages that pass it. Every fault is off by
/// default. A plain value.
///
/// * `duplicate`: the message passes twice (a source yields a copy without
///   the settle hook right after it; a destination is called twice).
/// * `reorder_window` > 1: up to that many messages are held and let out in
///   a seeded random order (a destination holds them until the window is
///   full or `flush()`; a source releases when it has nothing more to read).
/// * `delay` / `delay_by`: the message is held until `delay_by` has passed on
///   the injector's clock (a destination returns `ok` at once and publishes
///   it on a later call, `release_due()` or `flush()`).
/// * `fail` / `fail_with` / `fail_permanent`: a destination returns
///   `fail_with` instead of publishing; transient (the default) fails that
///   call only, permanent fails every later call for the same message id
///   too. A source: transient makes one `receive` report `empty` (the
///   message comes on the next one); permanent turns the message into a
///   poison item (reason = `fail_with`'s name), which a consumer dead-letters.
/// * `drop`: the message vanishes (a destination returns `ok` without
///   publishing; a source acks it through its settle hook, so a broker
///   forgets it too): for at-least-once tests of the caller.
/// * `poison`: the encoded bytes are corrupted (cut at a seeded point and
///   ended with a control character, so a JSON decoder fails with
///   `parse_error`): a destination of `stored_message` passes the corrupted
///   body on; a source given a codec yields a poison item with the
///   decoder's reason and the corrupted bytes.
///
/// Per message the rules are tried in this order, the first that hits wins:
/// drop, fail, poison; then delay and duplicate may both apply.
struct fault_plan {
  std::uint64_t seed = 1;            ///< seed of every random decision
  fault_rule duplicate{};
  std::size_t reorder_window = 0;    ///< 0 or 1: in order
  fault_rule delay{};
  duration delay_by{0};              ///< how long a delayed message is held (injector's clock)
  fault_rule fail{};
  errc fail_with = errc::busy;       ///< the error an injected failure reports
  bool fail_permanent = false;       ///< see above
  fault_rule drop{};
  fault_rule poison{};
};

/// What an injector did so far. A plain value (a snapshot).
struct fault_counts {
  std::uint64_t seen = 0;        ///< messages that reached the injector
  std::uint64_t duplicated = 0;  ///< extra copies passed on
  std::uint64_t reordered = 0;   ///< messages let out ahead of an older held one
  std::uint64_t delayed = 0;     ///< messages held for `delay_by`
  std::uint64_t failed = 0;      ///< injected failures (every failing call or receive)
  std::uint64_t dropped = 0;     ///< messages that vanished
  std::uint64_t poisoned = 0;    ///< messages whose bytes were corrupted
  std::uint64_t late_errors = 0; ///< a held (delayed or reordered) publish that the destination refused later

  /// Injected faults of every kind.
  [[nodiscard]] constexpr std::uint64_t injected() const noexcept {
    return duplicated + reordered + delayed + failed + dropped + poisoned;
  }
  /// One line, e.g. "seen=10 duplicated=3 reordered=0 delayed=0 failed=1
  /// dropped=0 poisoned=0 late_errors=0". Allocates.
  [[nodiscard]] std::string report() const {
    std::string s;
    auto add = [&](std::string_view name, std::uint64_t v) {
      if (!s.empty()) s += ' ';
      s.append(name);
      s += '=';
      s += std::to_string(v);
    };
    add("seen", seen);
    add("duplicated", duplicated);
    add("reordered", reordered);
    add("delayed", delayed);
    add("failed", failed);
    add("dropped", dropped);
    add("poisoned", poisoned);
    add("late_errors", late_errors);
    return s;
  }
  friend bool operator==(const fault_counts&, const fault_counts&) = default;
};

/// The faults chosen for one message. A plain value.
struct fault_decision {
  bool drop = false;
  bool fail = false;
  bool poison = false;
  bool delay = false;
  bool duplicate = false;
};

namespace detail {

/// The shared core of an injector and its decorators: plan, generator,
/// counters, permanent failures, held destination calls. Every member is
/// guarded by `mutex`.
struct fault_engine {
  fault_plan plan;
  const clock* clk;
  postbox::detail::xoshiro256ss rng;
  std::mutex mutex;
  std::uint64_t index = 0;  // messages seen (1-based numbering of the current one)
  fault_counts counts;
  std::vector<message_id> failing_forever;  // permanent failures by id (destinations)
  struct held_call {
    time_point due;
    std::uint64_t order;
    std::function<errc()> publish;
  };
  std::vector<held_call> held;  // destination calls held by delay or reorder
  std::uint64_t held_order = 0;

  fault_engine(fault_plan p, const clock& c) : plan(p), clk(&c), rng(p.seed) {}

  // Draws for one rule: a probability draw is made whenever the rule has a
  // probability, so the sequence of draws depends only on the plan.
  bool hits(const fault_rule& r) {
    bool yes = r.every_nth > 0 && index % r.every_nth == 0;
    if (r.probability > 0.0) {
      const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
      yes = yes || u < r.probability;
    }
    return yes;
  }

  /// Decides the faults of the next message (caller holds `mutex`).
  fault_decision decide() {
    ++index;
    ++counts.seen;
    fault_decision d;
    const bool drop = hits(plan.drop);
    const bool fail = hits(plan.fail);
    const bool poison = hits(plan.poison);
    const bool delay = hits(plan.delay);
    const bool duplicate = hits(plan.duplicate);
    if (drop) {
      d.drop = true;
    } else if (fail) {
      d.fail = true;
    } else if (poison) {
      d.poison = true;
    } else {
      d.delay = delay && plan.delay_by.count() > 0;
      d.duplicate = duplicate;
    }
    return d;
  }

  /// A seeded index below `n` (n > 0; caller holds `mutex`).
  std::size_t pick(std::size_t n) { return static_cast<std::size_t>(rng() % n); }

  /// Cuts `bytes` at a seeded point in its first half and ends it with a
  /// control character (caller holds `mutex`).
  void corrupt(std::string& bytes) {
    const std::size_t half = bytes.size() / 2;
    bytes.resize(half == 0 ? 0 : 1 + pick(half));
    bytes.push_back('\x01');
  }

  /// Takes the held destination calls to run now: those due (all with
  /// `everything`), and with a reorder window, only while more than the
  /// window minus one are held. Ordered by due time, then a seeded pick
  /// within the window. Caller holds `mutex`.
  std::vector<std::function<errc()>> take_ready(bool everything) {
    std::vector<std::function<errc()>> out;
    const time_point now = clk->now();
    const std::size_t window = plan.reorder_window > 1 ? plan.reorder_window : 1;
    for (;;) {
      std::vector<std::size_t> ready;
      for (std::size_t i = 0; i < held.size(); ++i) {
        if (everything || held[i].due <= now) ready.push_back(i);
      }
      if (ready.empty()) break;
      if (!everything && window > 1 && held.size() < window) break;
      std::sort(ready.begin(), ready.end(), [&](std::size_t a, std::size_t b) {
        return held[a].due != held[b].due ? held[a].due < held[b].due : held[a].order < held[b].order;
      });
      std::size_t chosen = 0;
      if (window > 1) chosen = pick(std::min(window, ready.size()));
      if (chosen != 0) ++counts.reordered;
      const std::size_t at = ready[chosen];
      out.push_back(std::move(held[at].publish));
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(at));
    }
    return out;
  }

  /// Runs held calls outside the mutex; counts refusals. Returns how many ran.
  std::size_t run(std::vector<std::function<errc()>>& calls) {
    std::uint64_t refused = 0;
    for (auto& c : calls) {
      errc rc = errc::handler_error;
      POSTBOX_TRY { rc = c(); }
      POSTBOX_CATCH_ALL {}
      if (rc != errc::ok) ++refused;
    }
    if (refused > 0) {
      std::lock_guard g(mutex);
      counts.late_errors += refused;
    }
    return calls.size();
  }
};

/// No codec: a source decorator without poison support.
struct no_codec {};

}  // namespace detail

/// A consumer source decorator (see `fault_injector::source`): yields what
/// `Source` yields, with the injector's faults. Move-only (as the consumer
/// needs); not thread-safe beyond the source concept's contract (one
/// `receive` at a time; `backlog()` and settle hooks from any thread).
/// Items it still holds when destroyed are released through their settle
/// hooks.
template <class Source, class Codec = detail::no_codec>
class faulty_source {
 public:
  using payload_type = typename Source::payload_type;
  static constexpr bool redelivers = Source::redelivers;

  /// Decorates `inner` with `engine`'s faults (made by `fault_injector::source`;
  /// `codec` encodes and decodes for poison). Allocates the holding queue.
  faulty_source(Source inner, std::shared_ptr<detail::fault_engine> engine, Codec codec = {})
      : inner_(std::move(inner)), engine_(std::move(engine)), codec_(std::move(codec)),
        held_(std::make_unique<std::deque<held_item>>()) {}

  /// Moves the decorator (the consumer takes its source by value, before
  /// any concurrent use).
  faulty_source(faulty_source&& o)
      : inner_(std::move(o.inner_)), engine_(std::move(o.engine_)), codec_(std::move(o.codec_)),
        held_(std::move(o.held_)), inner_closed_(o.inner_closed_),
        held_count_(o.held_count_.load(std::memory_order_relaxed)) {}  // relaxed: not yet shared
  faulty_source& operator=(faulty_source&&) = delete;
  faulty_source(const faulty_source&) = delete;
  faulty_source& operator=(const faulty_source&) = delete;

  ~faulty_source() {
    if (!held_) return;
    for (auto& h : *held_) {
      POSTBOX_TRY { h.item.settle(settle_action{settle_action::kind::release, duration{0}}); }
      POSTBOX_CATCH_ALL {}
    }
  }

  /// Reads from the inner source (waiting up to `wait` only while nothing is
  /// held), applies the faults and yields one item: `ok`, `empty` (nothing
  /// ready, or an injected transient failure) or `closed` (the inner source
  /// closed and nothing is held). Allocates.
  [[nodiscard]] receive_result<inbound<payload_type>> receive(duration wait) {
    const std::size_t window = engine_->plan.reorder_window > 1 ? engine_->plan.reorder_window : 1;
    bool fail_now = false;
    while (ready_count() < window && !inner_closed_) {
      auto r = inner_.receive(held_->empty() ? wait : duration{0});
      if (!r.has_value()) {
        if (r.status() == receive_status::closed) inner_closed_ = true;
        break;
      }
      fail_now = admit(std::move(*r)) || fail_now;
      if (fail_now) break;
    }
    held_count_.store(held_->size(), std::memory_order_relaxed);  // relaxed: a statistic for backlog()
    if (fail_now) return receive_result<inbound<payload_type>>(receive_status::empty);
    auto out = release();
    held_count_.store(held_->size(), std::memory_order_relaxed);  // relaxed: as above
    if (out.has_value()) return std::move(*out);
    return receive_result<inbound<payload_type>>(inner_closed_ && held_->empty() ? receive_status::closed
                                                                                 : receive_status::empty);
  }

  /// The inner source's name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return inner_.name(); }

  /// The inner source's backlog (when it has one) plus the items held here.
  /// Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const noexcept {
    std::uint64_t n = held_count_.load(std::memory_order_relaxed);  // relaxed: a statistic
    if constexpr (requires(const Source& s) { s.backlog(); }) n += inner_.backlog();
    return n;
  }

 private:
  struct held_item {
    inbound<payload_type> item;
    time_point due;
  };

  [[nodiscard]] std::size_t ready_count() const {
    const time_point now = engine_->clk->now();
    return static_cast<std::size_t>(
        std::count_if(held_->begin(), held_->end(), [&](const held_item& h) { return h.due <= now; }));
  }

  // Applies the faults to one received item; returns true for an injected
  // transient failure (the item is kept for the next receive).
  bool admit(inbound<payload_type>&& in) {
    std::unique_lock l(engine_->mutex);
    const time_point now = engine_->clk->now();
    if (!in.message) {  // already poison: passes untouched
      held_->push_back({std::move(in), now});
      return false;
    }
    const fault_decision d = engine_->decide();
    if (d.drop) {
      ++engine_->counts.dropped;
      l.unlock();
      POSTBOX_TRY { in.settle(settle_action{settle_action::kind::ack, duration{0}}); }
      POSTBOX_CATCH_ALL {}
      return false;
    }
    if (d.fail) {
      ++engine_->counts.failed;
      if (engine_->plan.fail_permanent) {
        poison_input p;
        p.reason = std::string(to_string(engine_->plan.fail_with));
        p.error = "injected permanent failure of " + in.message->id.to_string();
        held_->push_back({inbound<payload_type>::malformed(std::move(p), std::move(in.settle)), now});
        return false;
      }
      held_->push_back({std::move(in), now});
      return true;
    }
    if (d.poison) {
      if constexpr (std::is_same_v<Codec, detail::no_codec>) {
        POSTBOX_THROW(error(errc::invalid_argument,
                            "fault_injector: poison on a source needs a codec (fault_injector::source(src, codec))"));
      } else {
        ++engine_->counts.poisoned;
        std::string bytes = codec_.encode(*in.message);
        engine_->corrupt(bytes);
        auto back = codec_.template decode<payload_type>(bytes);
        if (back.has_value()) {  // the codec read the corrupted bytes: pass the result on
          in.message.emplace(std::move(*back));
          held_->push_back({std::move(in), now});
          return false;
        }
        poison_input p;
        p.reason = std::string(to_string(back.status() == errc::ok ? errc::parse_error : back.status()));
        p.error = "injected poison bytes";
        p.raw = std::move(bytes);
        held_->push_back({inbound<payload_type>::malformed(std::move(p), std::move(in.settle)), now});
        return false;
      }
    }
    const time_point due = d.delay ? now + engine_->plan.delay_by : now;
    if (d.delay) ++engine_->counts.delayed;
    std::optional<envelope<payload_type>> copy;
    if (d.duplicate) {
      ++engine_->counts.duplicated;
      copy.emplace(*in.message);
    }
    held_->push_back({std::move(in), due});
    if (copy) held_->push_back({inbound<payload_type>::of(std::move(*copy)), due});
    return false;
  }

  // Lets out one ready item: the oldest, or with a reorder window a seeded
  // pick among the first `window` ready ones.
  std::optional<inbound<payload_type>> release() {
    std::lock_guard g(engine_->mutex);
    const time_point now = engine_->clk->now();
    std::vector<std::size_t> ready;
    for (std::size_t i = 0; i < held_->size(); ++i) {
      if ((*held_)[i].due <= now) ready.push_back(i);
    }
    if (ready.empty()) return std::nullopt;
    const std::size_t window = engine_->plan.reorder_window > 1 ? engine_->plan.reorder_window : 1;
    std::size_t chosen = 0;
    if (window > 1) chosen = engine_->pick(std::min(window, ready.size()));
    if (chosen != 0) ++engine_->counts.reordered;
    const std::size_t at = ready[chosen];
    inbound<payload_type> out = std::move((*held_)[at].item);
    held_->erase(held_->begin() + static_cast<std::ptrdiff_t>(at));
    return out;
  }

  Source inner_;
  std::shared_ptr<detail::fault_engine> engine_;
  Codec codec_;
  std::unique_ptr<std::deque<held_item>> held_;  // touched by receive() only
  bool inner_closed_ = false;
  /// Items held, for backlog(). Written by receive() (relaxed store), read by
  /// backlog() on any thread (relaxed load): a statistic, nothing is
  /// published through it.
  std::atomic<std::size_t> held_count_{0};
};

/// Seeded fault injection for sources and destinations, with counters.
///
/// **Example**:
///   postbox::testing::fault_injector faults({.seed = 7, .duplicate = {.every_nth = 2}}, clock);
///   postbox::consumer c(faults.source(postbox::channel_source<order>(ch, "orders")), handler, dead, opts);
///   postbox::outbox_relay relay(store, faults.destination(sink.destination<order>(codec)));
///   std::puts(faults.report().c_str());
///
/// Thread-safe: decorators on several threads share one mutex-guarded
/// engine. Making a decorator allocates; each decision allocates nothing
/// (holding a message allocates).
class fault_injector {
 public:
  /// An injector with `plan`; delays are measured on `clk`, which must outlive
  /// the injector and its decorators.
  explicit fault_injector(fault_plan plan = {}, const clock& clk = default_clock())
      : engine_(std::make_shared<detail::fault_engine>(plan, clk)) {}

  /// A consumer source that yields what `src` yields, with the faults.
  /// Poison needs the codec form; without it a poison hit throws
  /// `invalid_argument` from `receive`.
  template <consumer_source Source>
  [[nodiscard]] faulty_source<Source> source(Source src) const {
    return faulty_source<Source>(std::move(src), engine_);
  }
  /// As above; poison encodes the envelope with `codec`, corrupts the bytes
  /// and yields the decoder's typed failure as a poison item.
  template <consumer_source Source, class Codec>
  [[nodiscard]] faulty_source<Source, Codec> source(Source src, Codec codec) const {
    return faulty_source<Source, Codec>(std::move(src), engine_, std::move(codec));
  }

  /// A destination decorator for any `errc(const M&)` callable whose message
  /// has an `id` (`outbox_destination` over `stored_message`, or a function
  /// publishing `envelope<T>`). Returns a copyable `std::function` sharing
  /// the injector. Poison needs a message with an encoded `body`
  /// (`stored_message`); a poison hit on another message type throws
  /// `invalid_argument`. Delayed and reordered calls run on a later call,
  /// `release_due()` or `flush()`, on that thread; their result is counted
  /// in `late_errors` when not `ok`.
  template <class M>
  [[nodiscard]] std::function<errc(const M&)> destination(std::function<errc(const M&)> inner) const {
    auto engine = engine_;
    return [engine, inner = std::move(inner)](const M& m) -> errc {
      std::vector<std::function<errc()>> due;
      errc rc = errc::ok;
      bool call_now = false;
      bool twice = false;
      std::optional<M> changed;
      {
        std::lock_guard g(engine->mutex);
        const bool forever = std::find(engine->failing_forever.begin(), engine->failing_forever.end(), m.id) !=
                             engine->failing_forever.end();
        if (forever) {
          ++engine->counts.failed;
          return engine->plan.fail_with;
        }
        const fault_decision d = engine->decide();
        const bool holding = engine->plan.reorder_window > 1;
        if (d.drop) {
          ++engine->counts.dropped;
        } else if (d.fail) {
          ++engine->counts.failed;
          if (engine->plan.fail_permanent) engine->failing_forever.push_back(m.id);
          rc = engine->plan.fail_with;
        } else {
          if (d.poison) {
            if constexpr (requires(M& x) { x.body.resize(0); }) {
              ++engine->counts.poisoned;
              changed.emplace(m);
              engine->corrupt(changed->body);
            } else {
              POSTBOX_THROW(error(errc::invalid_argument,
                                  "fault_injector: poison on a destination needs a message with an encoded body"));
            }
          }
          if (d.delay) ++engine->counts.delayed;
          if (d.duplicate) ++engine->counts.duplicated;
          twice = d.duplicate;
          if (d.delay || holding) {
            const time_point at = d.delay ? engine->clk->now() + engine->plan.delay_by : engine->clk->now();
            M copy = changed ? *changed : m;
            const int times = twice ? 2 : 1;
            for (int k = 0; k < times; ++k) {
              engine->held.push_back({at, engine->held_order++, [inner, copy]() { return inner(copy); }});
            }
          } else {
            call_now = true;
          }
        }
        due = engine->take_ready(false);
      }
      if (call_now) {
        const M& send = changed ? *changed : m;
        rc = inner(send);
        if (twice) {
          const errc again = inner(send);
          if (again != errc::ok) {
            std::lock_guard g(engine->mutex);
            ++engine->counts.late_errors;
          }
        }
      }
      (void)engine->run(due);
      return rc;
    };
  }
  /// `destination` for an `outbox_destination` (the common case, so the
  /// message type need not be named).
  [[nodiscard]] std::function<errc(const stored_message&)> destination(
      std::function<errc(const stored_message&)> inner) const {
    return destination<stored_message>(std::move(inner));
  }

  /// Runs the held destination calls that are due on the clock (with a
  /// reorder window: while the window is full). Returns how many ran.
  /// Runs them on the calling thread. Thread-safe.
  std::size_t release_due() {
    std::vector<std::function<errc()>> due;
    {
      std::lock_guard g(engine_->mutex);
      due = engine_->take_ready(false);
    }
    return engine_->run(due);
  }
  /// Runs every held destination call now, due or not (the reorder window's
  /// seeded order still applies). Returns how many ran. Thread-safe.
  std::size_t flush() {
    std::vector<std::function<errc()>> all;
    {
      std::lock_guard g(engine_->mutex);
      all = engine_->take_ready(true);
    }
    return engine_->run(all);
  }
  /// Destination calls held (delayed or in the reorder window). Thread-safe.
  [[nodiscard]] std::size_t held() const {
    std::lock_guard g(engine_->mutex);
    return engine_->held.size();
  }

  /// What was injected so far. Thread-safe.
  [[nodiscard]] fault_counts counts() const {
    std::lock_guard g(engine_->mutex);
    return engine_->counts;
  }
  /// `counts().report()`: one line naming each count. Allocates. Thread-safe.
  [[nodiscard]] std::string report() const { return counts().report(); }
  /// The plan given at construction.
  [[nodiscard]] const fault_plan& plan() const noexcept { return engine_->plan; }

 private:
  std::shared_ptr<detail::fault_engine> engine_;
};

}  // namespace testing
POSTBOX_END_NAMESPACE
