// SPDX-License-Identifier: MIT
// postbox::testing::harness: one manual clock and one driver that steps every attached component deterministically.
#pragma once

// Design notes
// * The harness owns a `manual_clock` and a `timer_service` in manual_drive
//   mode on it. Components are built on that clock (and that timer service,
//   where they take one), and the polled ones are attached; nothing runs on
//   a thread of its own, so every handler, timer and relay batch runs on the
//   thread that calls the harness.
// * Attaching needs no knowledge of the component's type, only its shape
//   (the harness sits below the patterns layer and includes none of them):
//     - `poll()` and `next_due()`: a consumer built with `threads = 0`;
//     - `poll()` alone: a responder built with 0 threads, a run_queue (where
//       a consumer's coroutine handlers resume);
//     - `run_due()` and `next_deadline()`: another manual timer_service, a
//       manual-drive scheduler;
//     - `run_once()` returning a step with `claimed`, `purged` and
//       `next_due`: an outbox relay that was not started;
//     - `sweep()` and `next_expiry()`: an operations tracker (its expiry;
//       the work itself runs on the tracker's executor threads);
//     - any pair of callables (`run` -> work done, `next_due` -> time point).
//   Components that take a `timer_service&` (requesters, dead-letter queues
//   with paced redrive, saga step deadlines) use `timers()` and need no
//   attach; streams apply age retention on every read against their clock,
//   so moving the harness clock is all they need.
// * Order: the harness timers first, then the attached components in attach
//   order, one call each per round; rounds repeat until one does nothing.
//   With the components' jitter seeded from the harness (`configure`,
//   `next_seed`), the same seed and the same test give the same events at
//   the same times, which `trace()` records.
// * Auto-advance (`harness_options::auto_advance`): a component that blocks
//   on the clock inside a call on the driving thread (a saga's compensation
//   backoff in `run`, a manual consumer's `drain` waiting for a retry) would
//   wait forever, since no other thread moves time. With auto-advance the
//   harness clock jumps to that wait's deadline instead, as tokio's paused
//   clock does when every task sleeps. Only the thread that built the harness
//   jumps; other threads wait as on any manual_clock.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/error.hpp>
#include <postbox/testing.hpp>
#include <postbox/timer_service.hpp>

#include <algorithm>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace testing {

/// Settings of a harness. A plain value.
struct harness_options {
  /// Where the harness clock starts.
  time_point start = manual_clock::default_start;
  /// Component calls that did work, per `run_until_idle` (and per stop of
  /// `advance`), after which the harness reports a livelock instead of
  /// looping forever.
  std::size_t max_steps = 100000;
  /// Record one `harness_event` per component call that did work.
  bool record_trace = true;
  /// When the thread that built the harness blocks on the harness clock with
  /// a deadline (inside a component call: a saga's compensation backoff, a
  /// consumer's drain), move the clock to that deadline at once instead of
  /// waiting for another thread to move it. Waits without a deadline block
  /// as usual. Off: the clock moves only when the harness or the test moves it.
  bool auto_advance = false;
};

namespace detail {

/// The harness clock: a manual_clock that, with auto-advance on, turns a
/// wait of the owner thread into a jump to the wait's deadline (returning as
/// a wake-up: the caller re-checks its condition). Thread-safe as manual_clock.
class harness_clock final : public manual_clock {
 public:
  harness_clock(time_point start, bool auto_advance) noexcept
      : manual_clock(start), auto_advance_(auto_advance), owner_(std::this_thread::get_id()) {}

  void wait_until(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                  time_point deadline) const override {
    if (auto_advance_ && deadline != time_point::max() && std::this_thread::get_id() == owner_) {
      // The object is never const (the harness owns it); only the owner
      // thread gets here, and set() never waits for the caller's mutex
      // unless another thread waits on this clock with that same mutex.
      if (now() < deadline) const_cast<harness_clock*>(this)->set(deadline);
      return;
    }
    manual_clock::wait_until(lock, cv, deadline);
  }

 private:
  const bool auto_advance_;
  const std::thread::id owner_;
};

}  // namespace detail

/// One component call that did work: when (harness clock), who (the name
/// given at attach time, "timers" for the harness timers) and how much
/// (handler runs, timers fired, relay messages claimed or purged).
struct harness_event {
  time_point at;
  std::string source;
  std::size_t work = 0;

  friend bool operator==(const harness_event&, const harness_event&) = default;
};

/// Drives time for everything attached to it, deterministically, on the
/// calling thread (tokio's paused time, for postbox):
///
///   postbox::testing::harness h(42);
///   postbox::consumer<order> c(source, handle, dlq,
///                              h.configure(postbox::consumer_options{.retry = policy}));
///   h.attach(c, "orders");
///   h.run_until_idle();                    // first attempt, at h.now()
///   while (h.advance_to_next()) {}         // every retry, at its exact time
///
/// The harness must outlive the components built on its clock and timers
/// (declare it first), or they must be `detach`ed before it goes. Not
/// thread-safe: one thread builds, attaches and drives; attached components
/// must not run threads of their own. Allocates (attach, trace).
class harness {
 public:
  /// Identifies one attached component (for `detach`).
  using attachment = std::size_t;
  /// What a component does when driven: work done (0: nothing was runnable).
  using run_function = std::function<std::size_t()>;
  /// When a component next has timed work; `time_point::max()`: never.
  using due_function = std::function<time_point()>;

  /// A harness whose clock starts at `options.start`; `seed` seeds every
  /// jitter handed out by `configure` and `next_seed`. Allocates.
  explicit harness(std::uint64_t seed = 0, harness_options options = {})
      : options_(options),
        seed_(seed),
        clock_(options.start, options.auto_advance),
        timers_(clock_, timer_service::manual_drive) {
    participants_.push_back(participant{"timers", [this] { return timers_.run_due(); },
                                        [this] { return timers_.next_deadline(); }, true});
  }

  harness(const harness&) = delete;
  harness& operator=(const harness&) = delete;

  /// The harness clock: build every component on it. Never blocks.
  [[nodiscard]] manual_clock& get_clock() noexcept { return clock_; }
  /// A manual-drive timer service on the harness clock, run by the harness:
  /// give it to requesters, dead-letter queues and saga options. Never blocks.
  [[nodiscard]] timer_service& timers() noexcept { return timers_; }
  /// The harness clock's current time. Never blocks.
  [[nodiscard]] time_point now() const noexcept { return clock_.now(); }
  /// The seed the harness was built with. Never blocks.
  [[nodiscard]] std::uint64_t seed() const noexcept { return seed_; }

  /// The next seed of the sequence derived from the harness seed (never 0,
  /// which some components read as "draw a random one"). The same harness
  /// seed gives the same sequence. Never allocates.
  [[nodiscard]] std::uint64_t next_seed() noexcept {
    // splitmix64 over a counter: well-spread seeds from any harness seed.
    std::uint64_t z = seed_ + 0x9e3779b97f4a7c15ULL * ++seeds_drawn_;
    z = (z ^ (z >> 30U)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27U)) * 0x94d049bb133111ebULL;
    z ^= z >> 31U;
    return z == 0 ? 1 : z;
  }

  /// Returns `options` set up for this harness, by the members it has:
  /// `clock` (a `const postbox::clock*`) = the harness clock, `threads` = 0,
  /// `jitter_seed` = `next_seed()`, `timers` (a `timer_service*`) = `timers()`.
  /// Fits consumer_options, relay_options and saga_options; other members
  /// are kept. Never blocks; allocates as copying `Options` does.
  template <class Options>
  [[nodiscard]] Options configure(Options options) {
    if constexpr (requires { requires std::same_as<decltype(options.clock), const postbox::clock*>; })
      options.clock = &clock_;
    if constexpr (requires { requires std::integral<decltype(options.threads)>; }) options.threads = 0;
    if constexpr (requires { options.jitter_seed = next_seed(); }) options.jitter_seed = next_seed();
    if constexpr (requires { requires std::same_as<decltype(options.timers), timer_service*>; })
      options.timers = &timers_;
    return options;
  }

  /// Attaches a component by its shape (see the header's design notes): a
  /// consumer (`threads == 0`), a responder (0 threads), a run_queue, a manual-drive
  /// timer_service or scheduler, an outbox relay that was not started, an
  /// operations tracker (expiry sweeps).
  /// `name` labels its `trace()` events (default: its `name()` if it has
  /// one, else its kind, plus "#<attachment>"). `c` must stay alive until
  /// detached or the harness is no longer driven. Allocates.
  template <class Component>
  attachment attach(Component& c, std::string name = {}) {
    if constexpr (requires { c.sweep(); c.next_expiry(); }) {
      return attach(label(c, "operations", std::move(name)), [&c] { return static_cast<std::size_t>(c.sweep()); },
                    [&c]() -> time_point { return c.next_expiry(); });
    } else if constexpr (requires { c.run_due(); c.next_deadline(); }) {
      if constexpr (std::same_as<Component, timer_service>) {
        if (&c == &timers_) return 0;  // already driven
      }
      return attach(label(c, "timers", std::move(name)), [&c] { return static_cast<std::size_t>(c.run_due()); },
                    [&c]() -> time_point { return c.next_deadline(); });
    } else if constexpr (requires { c.poll(); c.next_due(); }) {
      return attach(label(c, "poller", std::move(name)), [&c] { return static_cast<std::size_t>(c.poll()); },
                    [&c]() -> time_point { return c.next_due(); });
    } else if constexpr (requires { c.poll(); }) {
      return attach(label(c, "poller", std::move(name)), [&c] { return static_cast<std::size_t>(c.poll()); },
                    due_function{});
    } else if constexpr (requires { c.run_once().claimed; c.run_once().purged; c.run_once().next_due; }) {
      // The relay tells when a blocked key may be claimed only as the result
      // of a run; the harness keeps the latest answer.
      auto due = std::make_shared<time_point>(time_point::max());
      return attach(
          label(c, "relay", std::move(name)),
          [&c, due] {
            const auto step = c.run_once();
            *due = step.next_due ? time_point(*step.next_due) : time_point::max();
            return static_cast<std::size_t>(step.claimed + step.purged);
          },
          [due] { return *due; });
    } else {
      static_assert(sizeof(Component) == 0,
                    "postbox::testing::harness::attach: the component has none of poll(), run_due() with "
                    "next_deadline(), run_once(), sweep() with next_expiry(); attach(name, run, next_due) "
                    "takes any pair of callables");
    }
  }

  /// Attaches anything: `run` does what is runnable now and returns how much
  /// it did (0: nothing, which ends a round for it); `next_due` tells when it
  /// next has timed work (empty or `time_point::max()`: never). Allocates.
  attachment attach(std::string name, run_function run, due_function next_due = {}) {
    if (!run) POSTBOX_THROW(error(errc::invalid_argument, "postbox::testing::harness::attach: no run function"));
    participants_.push_back(participant{std::move(name), std::move(run), std::move(next_due), true});
    return participants_.size() - 1;
  }

  /// Stops driving an attached component (call it before destroying one the
  /// harness would otherwise still drive). Returns whether it was attached.
  bool detach(attachment id) noexcept {
    if (id == 0 || id >= participants_.size() || !participants_[id].active) return false;
    participants_[id].active = false;
    return true;
  }

  /// The earliest time at which anything attached (or the harness timers)
  /// has timed work; `time_point::max()` when nothing is scheduled. May be
  /// at or before `now()` when something is already due. Asks each attached
  /// component (each takes its own lock briefly); never runs handlers, never
  /// allocates.
  [[nodiscard]] time_point next_due() const {
    time_point t = time_point::max();
    for (const participant& p : participants_)
      if (p.active && p.due) t = std::min(t, p.due());
    return t;
  }

  /// Runs, on the calling thread, every handler, timer and relay batch that
  /// is runnable at `now()`, round after round, until a round finds nothing
  /// to do; the clock does not move. Returns the work done. Throws
  /// error(timeout) naming the busiest component when more than
  /// `max_steps` calls did work (a livelock: e.g. a handler that retries
  /// with no delay forever), and error(invalid_argument) when called from
  /// inside a component it drives.
  std::size_t run_until_idle() {
    if (running_)
      POSTBOX_THROW(error(errc::invalid_argument,
                          "postbox::testing::harness::run_until_idle: called from inside a driven component"));
    running_ = true;
    struct reset {
      bool& flag;
      ~reset() { flag = false; }
    } guard{running_};
    std::size_t total = 0;
    std::size_t steps = 0;
    std::vector<std::size_t> busy(participants_.size(), 0);
    for (;;) {
      std::size_t round = 0;
      for (std::size_t i = 0; i < participants_.size(); ++i) {
        participant& p = participants_[i];
        if (!p.active) continue;
        const std::size_t work = p.run();
        if (work == 0) continue;
        round += work;
        if (options_.record_trace) trace_.push_back(harness_event{clock_.now(), p.name, work});
        if (busy.size() < participants_.size()) busy.resize(participants_.size(), 0);
        ++busy[i];
        if (++steps > options_.max_steps) {
          const auto top = static_cast<std::size_t>(std::max_element(busy.begin(), busy.end()) - busy.begin());
          POSTBOX_THROW(error(errc::timeout, "postbox::testing::harness: still runnable after " +
                                                 std::to_string(options_.max_steps) +
                                                 " steps without time moving (livelock?); busiest: " +
                                                 participants_[top].name));
        }
      }
      total += round;
      if (round == 0) return total;
    }
  }

  /// Moves the clock forward by `d`, stopping at every due time on the way
  /// (so each timer fires at its own time, not at the end) and running until
  /// idle at each stop and at the end. Returns the work done. Throws as
  /// `run_until_idle`, error(invalid_argument) for a negative `d`, and
  /// error(timeout) when a component reports a due time it never acts on.
  std::size_t advance(duration d) {
    if (d < duration::zero())
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::testing::harness::advance: negative duration"));
    const time_point target = later_by(clock_.now(), d);
    std::size_t total = run_until_idle();
    for (;;) {
      const time_point t = next_due();
      if (t == time_point::max() || t > target) break;
      total += step_to(t);
    }
    clock_.set(target);
    return total + run_until_idle();
  }

  /// tokio-style auto-advance: runs what is runnable now, then moves the
  /// clock to `next_due()` (never backwards) and runs what is due there.
  /// Returns the time it moved to, or nothing (and leaves the clock alone)
  /// when nothing is scheduled. Throws as `advance`.
  std::optional<time_point> advance_to_next() {
    (void)run_until_idle();
    const time_point t = next_due();
    if (t == time_point::max()) return std::nullopt;
    (void)step_to(t);
    return clock_.now();
  }

  /// Auto-advances (as `advance_to_next`) until `done()` holds, nothing is
  /// scheduled, or the next due time is more than `limit` past the start;
  /// checks `done()` before each step. Returns whether `done()` held.
  /// Throws as `advance`.
  bool run_until(const std::function<bool()>& done, duration limit = std::chrono::hours(24 * 365)) {
    const time_point end = later_by(clock_.now(), limit);
    (void)run_until_idle();
    for (;;) {
      if (done()) return true;
      const time_point t = next_due();
      if (t == time_point::max() || t > end) return false;
      (void)step_to(t);
    }
  }

  /// Every component call that did work so far, in order (when
  /// `record_trace`). Two runs of one test with one seed give equal traces.
  [[nodiscard]] const std::vector<harness_event>& trace() const noexcept { return trace_; }
  /// Forgets the recorded trace.
  void clear_trace() noexcept { trace_.clear(); }

 private:
  struct participant {
    std::string name;
    run_function run;
    due_function due;
    bool active = true;
  };

  template <class Component>
  std::string label(Component& c, const char* kind, std::string name) const {
    if (!name.empty()) return name;
    std::string base = kind;
    if constexpr (requires { std::string(c.name()); }) base = std::string(c.name());
    return base + "#" + std::to_string(participants_.size());
  }

  // `t + d`, saturating at time_point::max() (a test may pass duration::max()).
  static time_point later_by(time_point t, duration d) noexcept {
    if (d <= duration::zero()) return t;
    return d >= time_point::max() - t ? time_point::max() : t + d;
  }

  // Moves the clock to `t` (never back) and runs until idle there. When
  // something reported `t` as due, is due now and nothing ran, the report
  // would repeat forever: that is an error, not an endless loop.
  std::size_t step_to(time_point t) {
    if (t > clock_.now()) clock_.set(t);
    const std::size_t work = run_until_idle();
    if (work == 0 && next_due() <= clock_.now()) {
      std::string who;
      for (const participant& p : participants_)
        if (p.active && p.due && p.due() <= clock_.now()) who = p.name;
      POSTBOX_THROW(error(errc::timeout, "postbox::testing::harness: '" + who +
                                             "' reports work due now but does none when run"));
    }
    return work;
  }

  harness_options options_;
  std::uint64_t seed_;
  std::uint64_t seeds_drawn_ = 0;
  detail::harness_clock clock_;
  timer_service timers_;
  // A deque: a component may attach another while it runs, and the running
  // participant's functions must not move.
  std::deque<participant> participants_;
  std::vector<harness_event> trace_;
  bool running_ = false;
};

}  // namespace testing
POSTBOX_END_NAMESPACE
