// SPDX-License-Identifier: MIT
// postbox::scheduler: delayed and scheduled sends (send_at / send_after) to channels, topics and streams, revocable.
#pragma once

// * A schedule is a heap node holding the message, the target and one atomic
//   state word: (generation << 3) | phase. A timer on the scheduler's
//   `timer_service` (postbox's clock; its own thread, or `manual_drive` and
//   `run_due()`) carries the generation it was armed for.
// * Delivery and `cancel()` contend on that word: the timer claims the
//   schedule with one CAS from (gen, pending); `cancel()` with one CAS from
//   (any gen, pending) to canceled. Exactly one CAS wins, so a canceled
//   message is never sent, even when it was already due and its timer is
//   running, and a `cancel()` that returns false means the delivery claimed it.
// * `reschedule(t)` moves (gen, pending) to (gen + 1, pending) and arms a new
//   timer: the old timer, if it still fires, finds another generation and
//   does nothing.
// * Channel targets are tried with `try_send`: the timer thread never blocks
//   on a full channel. While the try runs the phase is `firing`; on `full` it
//   goes back to (gen, pending) and a retry timer is armed with exponential
//   backoff (`scheduler_options`), so the message stays cancelable between
//   tries. A `cancel()` that finds `firing` waits for that one try (never
//   longer than a try_send) and then decides.
// * Topic and stream targets cannot be "full" (a topic's `block`
//   subscription makes the publisher wait; a stream append always succeeds),
//   so their delivery claims the word straight to `delivered` and then
//   publishes: a `block` subscription that is full at due time stalls the
//   scheduler's timer thread until its subscriber catches up. Prefer
//   `drop_oldest`/`drop_newest`/`fail` subscriptions on topics that receive
//   scheduled messages.
// * A closed channel or topic at due time: the message is dropped and
//   counted (`scheduler_stats::dropped_closed`); `state()` says `dropped`.

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/error.hpp>
#include <postbox/stream.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/topic.hpp>
#include <postbox/detail/algorithm.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// Where a scheduled message is. `pending`: waiting for its due time (or for
/// a retry after its channel was full); `delivered`: handed to its target
/// (for topics and streams: being handed, then handed); `canceled`: a
/// `cancel()` won, it is never delivered; `dropped`: its target was closed at
/// due time, or it ran out of retries on a full channel.
enum class schedule_state : std::uint8_t { pending, delivered, canceled, dropped };

/// Stable lower-case name of a schedule state. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(schedule_state s) noexcept {
  switch (s) {
    case schedule_state::pending: return "pending";
    case schedule_state::delivered: return "delivered";
    case schedule_state::canceled: return "canceled";
    case schedule_state::dropped: return "dropped";
  }
  return "unknown";
}

/// What a scheduler does when a channel is full at due time. A plain value.
struct scheduler_options {
  /// First retry delay after a `full` try; doubled per retry up to `retry_max`.
  duration retry_initial = std::chrono::milliseconds(1);
  /// Largest retry delay.
  duration retry_max = std::chrono::seconds(1);
  /// Retries after which the message is dropped (`dropped_full`); 0: retry
  /// until delivered, canceled or the channel closes.
  std::uint32_t max_retries = 0;
};

/// A scheduler's counters (snapshot; each exact, the set not one instant).
struct scheduler_stats {
  std::uint64_t scheduled = 0;       ///< schedules created
  std::uint64_t delivered = 0;       ///< handed to their target
  std::uint64_t canceled = 0;        ///< cancel() calls that won
  std::uint64_t rescheduled = 0;     ///< reschedule() calls that won
  std::uint64_t retried = 0;         ///< tries that found the channel full
  std::uint64_t dropped_closed = 0;  ///< target closed at due time
  std::uint64_t dropped_full = 0;    ///< out of retries on a full channel
  std::uint64_t pending = 0;         ///< scheduled and not yet delivered, canceled or dropped
};

namespace detail {

enum class schedule_phase : std::uint32_t { pending = 0, firing = 1, delivered = 2, canceled = 3, dropped = 4 };

[[nodiscard]] constexpr std::uint32_t schedule_word(std::uint32_t gen, schedule_phase p) noexcept {
  return (gen << 3) | static_cast<std::uint32_t>(p);
}
[[nodiscard]] constexpr schedule_phase phase_of(std::uint32_t word) noexcept {
  return static_cast<schedule_phase>(word & 7U);
}
[[nodiscard]] constexpr std::uint32_t generation_of(std::uint32_t word) noexcept { return word >> 3; }

struct scheduler_core;

/// One schedule. The payload is touched only by the thread that won the
/// state word: the delivery (pending -> firing or delivered) or a cancel
/// (pending -> canceled), so it needs no lock of its own.
struct schedule_node {
  enum class outcome : std::uint8_t { delivered, full, closed };

  schedule_node(std::weak_ptr<scheduler_core> c, bool may_be_full, time_point due) noexcept
      : core(std::move(c)), retriable(may_be_full), due_ns(due.time_since_epoch().count()) {}
  virtual ~schedule_node() = default;
  schedule_node(const schedule_node&) = delete;
  schedule_node& operator=(const schedule_node&) = delete;

  /// Hands the payload to the target. Called once per try by the winner.
  virtual outcome attempt() = 0;
  /// Destroys the payload early (the winner of a cancel or a drop).
  virtual void release() noexcept = 0;

  /// (generation << 3) | phase. Writers: the delivery (CAS pending->firing or
  /// ->delivered, then a store of the result), cancel (CAS pending->canceled)
  /// and reschedule (CAS pending->pending of the next generation). Every
  /// transition is acq_rel (CAS) or release (store), and every reader loads
  /// with acquire, so whoever sees a phase also sees the payload as the
  /// thread that set it left it. Waiters on `firing` use atomic wait/notify.
  std::atomic<std::uint32_t> state{0};
  /// Id of the timer last armed for this node, for a best-effort
  /// timer_service::cancel (a stale id only delays freeing the node until
  /// the old timer's time: that timer finds another generation and returns).
  /// Relaxed both ways: nothing is published through it.
  std::atomic<std::uint64_t> timer{0};
  /// Retries after `full`; touched only by the delivery thread holding `firing`.
  std::uint32_t retries = 0;
  std::weak_ptr<scheduler_core> core;
  const bool retriable;  ///< may report `full` (channels): uses the `firing` phase
  /// Due time in ns since the epoch. Written by the creator and by
  /// reschedule (relaxed), read by `scheduled::due()` (relaxed): informative.
  std::atomic<std::int64_t> due_ns;
};

/// Shared by the scheduler and (weakly) by its schedules, so a handle that
/// outlives the scheduler finds it gone instead of dangling.
struct scheduler_core {
  scheduler_core(const clock& clk, scheduler_options o) : options(o), timers(clk) {}
  scheduler_core(const clock& clk, timer_service::manual_drive_t m, scheduler_options o) noexcept
      : options(o), timers(clk, m) {}

  // relaxed: every counter below is a statistic; no data is published through it.
  void count(std::atomic<std::uint64_t>& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }

  void arm(const std::shared_ptr<schedule_node>& n, std::uint32_t gen, time_point at) {
    const auto id = timers.schedule_at(at, [this, n, gen] { fire(n, gen); });
    n->timer.store(id, std::memory_order_relaxed);  // relaxed: best-effort id (see schedule_node::timer)
  }

  // The delivery step, on the timer thread (or in run_due): claims the node
  // for generation `gen` or does nothing.
  void fire(const std::shared_ptr<schedule_node>& n, std::uint32_t gen) {
    std::uint32_t expect = schedule_word(gen, schedule_phase::pending);
    const auto claim = n->retriable ? schedule_phase::firing : schedule_phase::delivered;
    // acq_rel: wins against cancel/reschedule (their CAS on the same word);
    // acquire sees the payload as the scheduling thread wrote it.
    if (!n->state.compare_exchange_strong(expect, schedule_word(gen, claim), std::memory_order_acq_rel,
                                          std::memory_order_acquire))
      return;  // canceled, rescheduled (another generation armed) or already delivered
    if (!n->retriable) {
      // Claimed straight to delivered: cannot be full. A closed topic is
      // recorded as dropped afterwards (no cancel or reschedule contends
      // with a word that left `pending`).
      if (n->attempt() == schedule_node::outcome::closed) {
        settle(*n, gen, schedule_phase::dropped);
        count(dropped_closed);
      } else {
        count(delivered);
      }
      return;
    }
    const auto r = n->attempt();
    if (r == schedule_node::outcome::delivered) {
      settle(*n, gen, schedule_phase::delivered);
      count(delivered);
      return;
    }
    if (r == schedule_node::outcome::closed) {
      n->release();
      settle(*n, gen, schedule_phase::dropped);
      count(dropped_closed);
      return;
    }
    count(retried);
    ++n->retries;
    if (options.max_retries != 0 && n->retries > options.max_retries) {
      n->release();
      settle(*n, gen, schedule_phase::dropped);
      count(dropped_full);
      return;
    }
    const time_point at = timers.get_clock().now() + backoff(n->retries);
    settle(*n, gen, schedule_phase::pending);  // cancelable again between tries
    if (!stopped.load(std::memory_order_acquire)) arm(n, gen, at);
  }

  static void settle(schedule_node& n, std::uint32_t gen, schedule_phase p) noexcept {
    // release: publishes the try's effect on the payload; pairs with the
    // acquire of cancel/reschedule waiting on `firing`.
    n.state.store(schedule_word(gen, p), std::memory_order_release);
    n.state.notify_all();
  }

  [[nodiscard]] duration backoff(std::uint32_t retry) const noexcept {
    duration d = options.retry_initial.count() > 0 ? options.retry_initial : duration(1);
    for (std::uint32_t i = 1; i < retry && d < options.retry_max; ++i) d *= 2;
    return std::min(d, options.retry_max);
  }

  const scheduler_options options;
  timer_service timers;
  /// Set once by ~scheduler (release) before it stops the timers; read
  /// (acquire) by reschedule and the retry path so nothing is armed on a
  /// stopped service. A race only arms a timer that never runs.
  std::atomic<bool> stopped{false};
  std::atomic<std::uint64_t> scheduled{0}, delivered{0}, canceled{0}, rescheduled{0}, retried{0},
      dropped_closed{0}, dropped_full{0};
};

template <class T, class Shape>
struct channel_schedule final : schedule_node {
  template <class U>
  channel_schedule(std::weak_ptr<scheduler_core> c, time_point due, channel<T, Shape>& ch, U&& v)
      : schedule_node(std::move(c), true, due), target(&ch), value(std::in_place, std::forward<U>(v)) {}
  outcome attempt() override {
    // try_send moves from the value only on ok: a full try keeps it for the next.
    switch (target->try_send(std::move(*value))) {
      case send_status::ok: value.reset(); return outcome::delivered;
      case send_status::full: return outcome::full;
      default: return outcome::closed;
    }
  }
  void release() noexcept override { value.reset(); }
  channel<T, Shape>* target;
  std::optional<T> value;
};

template <class T>
struct topic_schedule final : schedule_node {
  topic_schedule(std::weak_ptr<scheduler_core> c, time_point due, topic<T>& t, std::optional<std::string> s, T v)
      : schedule_node(std::move(c), false, due), target(&t), subject(std::move(s)), value(std::in_place, std::move(v)) {}
  outcome attempt() override {
    T v = std::move(*value);
    value.reset();
    const publish_result r = subject ? target->publish(std::move(*subject), std::move(v)) : target->publish(std::move(v));
    return r.closed && r.delivered == 0 ? outcome::closed : outcome::delivered;
  }
  void release() noexcept override { value.reset(); }
  topic<T>* target;
  std::optional<std::string> subject;
  std::optional<T> value;
};

template <class T>
struct stream_schedule final : schedule_node {
  stream_schedule(std::weak_ptr<scheduler_core> c, time_point due, stream<T>& s, std::string k, T v)
      : schedule_node(std::move(c), false, due), target(&s), key(std::move(k)), value(std::in_place, std::move(v)) {}
  outcome attempt() override {
    (void)target->append(key, std::move(*value));
    value.reset();
    return outcome::delivered;
  }
  void release() noexcept override { value.reset(); }
  stream<T>* target;
  std::string key;
  std::optional<T> value;
};

struct call_schedule final : schedule_node {
  call_schedule(std::weak_ptr<scheduler_core> c, time_point due, std::function<void()> f)
      : schedule_node(std::move(c), false, due), fn(std::move(f)) {}
  outcome attempt() override {
    auto f = std::move(fn);
    fn = nullptr;
    if (f) f();  // an exception reaches timer_service, which counts it
    return outcome::delivered;
  }
  void release() noexcept override { fn = nullptr; }
  std::function<void()> fn;
};

}  // namespace detail

/// A handle to one scheduled message (or call). Copies share the schedule;
/// destroying every handle does NOT cancel it (fire and forget is allowed).
/// Thread-safe: any thread may cancel or reschedule; exactly one of racing
/// calls wins. An empty (default-constructed) handle refuses everything.
class scheduled {
 public:
  scheduled() noexcept = default;
  explicit scheduled(std::shared_ptr<detail::schedule_node> n) noexcept : node_(std::move(n)) {}

  /// Revokes the message. True only if this call made it never be delivered
  /// (it was pending, including between retries on a full channel); false if
  /// it was already delivered, dropped or canceled. A cancel racing the due
  /// time: exactly one of {cancel returns true, the message is delivered}.
  /// Never blocks, except for the duration of one try_send when the delivery
  /// is trying a channel at that instant. Never allocates.
  bool cancel() noexcept {
    if (!node_) return false;
    for (;;) {
      std::uint32_t w = node_->state.load(std::memory_order_acquire);  // acquire: pairs with settle()'s release
      const auto p = detail::phase_of(w);
      if (p == detail::schedule_phase::firing) {
        node_->state.wait(w, std::memory_order_acquire);  // one try_send; settle() notifies
        continue;
      }
      if (p != detail::schedule_phase::pending) return false;
      // acq_rel: contends with the delivery's claim on the same word.
      if (node_->state.compare_exchange_weak(w, detail::schedule_word(detail::generation_of(w),
                                                                      detail::schedule_phase::canceled),
                                             std::memory_order_acq_rel, std::memory_order_acquire)) {
        node_->release();
        node_->state.notify_all();
        if (auto core = node_->core.lock()) {
          core->count(core->canceled);
          (void)core->timers.cancel(node_->timer.load(std::memory_order_relaxed));  // relaxed: best effort
        }
        return true;
      }
    }
  }

  /// Moves a pending message to `t` (its retry count restarts). True if it
  /// was pending and now is due at `t`; false if delivered, dropped,
  /// canceled, or the scheduler is gone. A `t` in the past delivers at the
  /// next timer run. Allocates a timer node. Thread-safe; blocks like cancel().
  bool reschedule(time_point t) {
    if (!node_) return false;
    auto core = node_->core.lock();
    if (!core || core->stopped.load(std::memory_order_acquire)) return false;  // acquire: pairs with ~scheduler
    for (;;) {
      std::uint32_t w = node_->state.load(std::memory_order_acquire);
      const auto p = detail::phase_of(w);
      if (p == detail::schedule_phase::firing) {
        node_->state.wait(w, std::memory_order_acquire);
        continue;
      }
      if (p != detail::schedule_phase::pending) return false;
      const std::uint32_t gen = (detail::generation_of(w) + 1) & (~std::uint32_t{0} >> 3);
      // acq_rel: contends with the delivery's claim and with cancel; the
      // old generation's timer then finds another word and returns.
      if (node_->state.compare_exchange_weak(w, detail::schedule_word(gen, detail::schedule_phase::pending),
                                             std::memory_order_acq_rel, std::memory_order_acquire)) {
        (void)core->timers.cancel(node_->timer.load(std::memory_order_relaxed));  // relaxed: best effort
        node_->due_ns.store(t.time_since_epoch().count(), std::memory_order_relaxed);  // relaxed: informative
        node_->retries = 0;  // safe: no delivery holds `firing` while the word is pending
        core->count(core->rescheduled);
        core->arm(node_, gen, t);
        return true;
      }
    }
  }

  /// `reschedule(now + d)` on the scheduler's clock; false if the scheduler is gone.
  bool reschedule_after(duration d) {
    if (!node_) return false;
    auto core = node_->core.lock();
    if (!core) return false;
    return reschedule(core->timers.get_clock().now() + d);
  }

  /// Where the message is now (may change right after). Never blocks.
  [[nodiscard]] schedule_state state() const noexcept {
    if (!node_) return schedule_state::canceled;
    switch (detail::phase_of(node_->state.load(std::memory_order_acquire))) {  // acquire: pairs with settle()
      case detail::schedule_phase::pending:
      case detail::schedule_phase::firing: return schedule_state::pending;
      case detail::schedule_phase::delivered: return schedule_state::delivered;
      case detail::schedule_phase::canceled: return schedule_state::canceled;
      case detail::schedule_phase::dropped: return schedule_state::dropped;
    }
    return schedule_state::pending;
  }

  /// The time it is (or was) due, as last set. Never blocks.
  [[nodiscard]] time_point due() const noexcept {
    return node_ ? time_point(duration(node_->due_ns.load(std::memory_order_relaxed))) : time_point{};
  }

  /// Whether the handle refers to a schedule.
  explicit operator bool() const noexcept { return node_ != nullptr; }

 private:
  std::shared_ptr<detail::schedule_node> node_;
};

/// Delivers messages to channels, topics and streams (or runs calls) at time
/// points of a `postbox::clock`, revocably. Design notes at the top of
/// <postbox/scheduler.hpp>.
///
/// **Example**:
///   postbox::scheduler sched;                     // its own timer thread, real clock
///   auto h = sched.send_after(reminders, 30min, reminder{"standup"});
///   if (meeting_canceled) h.cancel();             // true: it will never arrive
///
/// The targets must outlive their pending schedules (cancel them, or
/// destroy the scheduler first). All members are thread-safe.
class scheduler {
 public:
  /// A scheduler with its own timer thread waiting on `clk`.
  explicit scheduler(const clock& clk = default_clock(), scheduler_options options = {})
      : core_(std::make_shared<detail::scheduler_core>(clk, options)) {}
  /// A scheduler without a thread: deliveries happen in `run_due()` only.
  scheduler(const clock& clk, timer_service::manual_drive_t m, scheduler_options options = {})
      : core_(std::make_shared<detail::scheduler_core>(clk, m, options)) {}

  scheduler(const scheduler&) = delete;
  scheduler& operator=(const scheduler&) = delete;

  /// Stops the timer thread (waits for a delivery in progress). Schedules
  /// still pending are never delivered; their handles then report
  /// `pending`, `cancel()` returns true and `reschedule()` false.
  ~scheduler() {
    core_->stopped.store(true, std::memory_order_release);  // release: pairs with the acquire in reschedule
    core_->timers.stop();
  }

  /// Sends `v` to `ch` at `t` (with `try_send`; a full channel is retried
  /// with backoff, never blocking the timer thread). Allocates one node and
  /// one timer. Thread-safe.
  template <class T, class Shape, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_at(channel<T, Shape>& ch, time_point t, U&& v) {
    return start(std::make_shared<detail::channel_schedule<T, Shape>>(core_, t, ch, std::forward<U>(v)), t);
  }
  /// `send_at(ch, now + d, v)` on the scheduler's clock.
  template <class T, class Shape, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_after(channel<T, Shape>& ch, duration d, U&& v) {
    return send_at(ch, now() + d, std::forward<U>(v));
  }

  /// Publishes `v` on `tp` at `t` (`publish(v)`; see the header notes on
  /// `block` subscriptions). Allocates. Thread-safe.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_at(topic<T>& tp, time_point t, U&& v) {
    return start(std::make_shared<detail::topic_schedule<T>>(core_, t, tp, std::nullopt, T(std::forward<U>(v))), t);
  }
  /// Publishes `v` on subject `subject` of `tp` at `t`. Throws
  /// error(invalid_argument) now for an invalid subject.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_at(topic<T>& tp, time_point t, std::string subject, U&& v) {
    if (!is_valid_subject(subject))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::scheduler: invalid subject '" + subject + "'"));
    return start(std::make_shared<detail::topic_schedule<T>>(core_, t, tp, std::move(subject), T(std::forward<U>(v))),
                 t);
  }
  /// `send_at(tp, now + d, v)`.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_after(topic<T>& tp, duration d, U&& v) {
    return send_at(tp, now() + d, std::forward<U>(v));
  }
  /// `send_at(tp, now + d, subject, v)`.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_after(topic<T>& tp, duration d, std::string subject, U&& v) {
    return send_at(tp, now() + d, std::move(subject), std::forward<U>(v));
  }

  /// Appends `v` under `key` to `s` at `t`. Allocates. Thread-safe.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_at(stream<T>& s, time_point t, std::string key, U&& v) {
    return start(std::make_shared<detail::stream_schedule<T>>(core_, t, s, std::move(key), T(std::forward<U>(v))), t);
  }
  /// `send_at(s, now + d, key, v)`.
  template <class T, class U>
    requires std::is_constructible_v<T, U&&>
  scheduled send_after(stream<T>& s, duration d, std::string key, U&& v) {
    return send_at(s, now() + d, std::move(key), std::forward<U>(v));
  }

  /// Runs `fn` at `t` on the timer thread (or in `run_due()`), revocably:
  /// the same cancel/reschedule contract, the call being the delivery. An
  /// exception from `fn` is caught and counted (`callback_failures()`).
  scheduled call_at(time_point t, std::function<void()> fn) {
    return start(std::make_shared<detail::call_schedule>(core_, t, std::move(fn)), t);
  }
  /// `call_at(now + d, fn)`.
  scheduled call_after(duration d, std::function<void()> fn) { return call_at(now() + d, std::move(fn)); }

  /// Manual drive: delivers everything due at the clock's now in the
  /// calling thread. Returns the timers that ran (retries included).
  std::size_t run_due() { return core_->timers.run_due(); }
  /// Earliest armed timer (`time_point::max()` when none); a canceled
  /// schedule's timer is gone, a rescheduled one's may still be listed.
  [[nodiscard]] time_point next_deadline() const { return core_->timers.next_deadline(); }
  /// The scheduler's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return core_->timers.get_clock(); }
  /// Calls scheduled with `call_at` that threw.
  [[nodiscard]] std::uint64_t callback_failures() const noexcept { return core_->timers.callback_failures(); }

  /// Counters. Never blocks; thread-safe.
  [[nodiscard]] scheduler_stats stats() const noexcept {
    const auto& c = *core_;
    scheduler_stats s;
    // relaxed: statistics.
    s.scheduled = c.scheduled.load(std::memory_order_relaxed);
    s.delivered = c.delivered.load(std::memory_order_relaxed);
    s.canceled = c.canceled.load(std::memory_order_relaxed);
    s.rescheduled = c.rescheduled.load(std::memory_order_relaxed);
    s.retried = c.retried.load(std::memory_order_relaxed);
    s.dropped_closed = c.dropped_closed.load(std::memory_order_relaxed);
    s.dropped_full = c.dropped_full.load(std::memory_order_relaxed);
    const std::uint64_t done = s.delivered + s.canceled + s.dropped_closed + s.dropped_full;
    s.pending = s.scheduled > done ? s.scheduled - done : 0;
    return s;
  }

 private:
  [[nodiscard]] time_point now() const noexcept { return core_->timers.get_clock().now(); }

  scheduled start(std::shared_ptr<detail::schedule_node> n, time_point t) {
    core_->count(core_->scheduled);
    core_->arm(n, 0, t);
    return scheduled(std::move(n));
  }

  std::shared_ptr<detail::scheduler_core> core_;
};

/// Free form of `sched.send_at(target, t, args...)`.
template <class Target, class... Args>
scheduled send_at(scheduler& sched, Target& target, time_point t, Args&&... args) {
  return sched.send_at(target, t, std::forward<Args>(args)...);
}
/// Free form of `sched.send_after(target, d, args...)`.
template <class Target, class... Args>
scheduled send_after(scheduler& sched, Target& target, duration d, Args&&... args) {
  return sched.send_after(target, d, std::forward<Args>(args)...);
}

POSTBOX_END_NAMESPACE
