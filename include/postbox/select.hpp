// SPDX-License-Identifier: MIT
// postbox::select: wait on several channel operations and timers at once; exactly one completes.
#pragma once

// Design: docs/design/select.md.
//
// * A select tries its cases in an order that rotates with every call (round
//   robin per thread), so when several are ready none is starved. Trying a
//   case is the channel's own non-blocking operation: it either completes
//   (the message is taken or sent, then the case's handler runs) or changes
//   nothing. So exactly one case completes and the others are untouched.
// * When nothing is ready the select spins briefly, then registers one
//   detail::waker with the event count of every channel case (the same event
//   counts blocking receivers and senders park on), re-tries every case, and
//   parks on the waker through the select's postbox clock until a
//   notification, the earliest timer, the deadline or a stop. The waker is
//   unregistered before the select returns.

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/topic.hpp>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

// The first pass of a select inlines into its caller; the waiting part stays
// out of line and cold (see run_select).
#if defined(__GNUC__) || defined(__clang__)
#  define POSTBOX_SELECT_ALWAYS_INLINE [[gnu::always_inline]] inline
#  define POSTBOX_SELECT_NOINLINE [[gnu::noinline, gnu::cold]]
#elif defined(_MSC_VER)
#  define POSTBOX_SELECT_ALWAYS_INLINE __forceinline
#  define POSTBOX_SELECT_NOINLINE __declspec(noinline)
#else
#  define POSTBOX_SELECT_ALWAYS_INLINE inline
#  define POSTBOX_SELECT_NOINLINE
#endif

POSTBOX_BEGIN_NAMESPACE

/// How a select ended. `ok`: the case at `index` completed (its handler ran);
/// `closed`: the case at `index` is a receive on a closed and drained source
/// or a send on a closed channel (its handler did not run, nothing changed);
/// `timeout`: the select's deadline passed first; `canceled`: its stop token
/// was stopped first; `empty`: `try_select` found nothing ready.
enum class select_status { ok, closed, timeout, canceled, empty };

/// Stable lower-case name of a select status. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(select_status s) noexcept {
  switch (s) {
    case select_status::ok: return "ok";
    case select_status::closed: return "closed";
    case select_status::timeout: return "timeout";
    case select_status::canceled: return "canceled";
    case select_status::empty: return "empty";
  }
  return "unknown";
}

/// The outcome of a select: which case (its position in the argument list)
/// and how. `index` is meaningful for `ok` and `closed`.
struct select_result {
  std::size_t index = 0;
  select_status status = select_status::empty;
  [[nodiscard]] bool ok() const noexcept { return status == select_status::ok; }
};

/// Options of a blocking select. `clock`: the clock timer cases, tickers and
/// the deadline are measured on (default: the real clock; a manual_clock in
/// tests); `deadline`: give up with `timeout` at this time on that clock
/// (default: never); `stop`: give up with `canceled` once stopped.
struct select_options {
  const postbox::clock* clock = nullptr;
  time_point deadline = time_point::max();
  std::stop_token stop{};
};

/// A periodic timer usable as a select case (`on_receive(ticker, f)`) or on
/// its own: it is ready once per `period` on its clock, the first time one
/// period after construction. Ticks missed while nobody received are dropped
/// (one tick is delivered, stamped with the latest missed tick time), as
/// crossbeam's tick does. Not thread-safe: one receiving thread at a time.
class ticker {
 public:
  /// Allocates nothing. Throws error(invalid_argument) for a period <= 0.
  explicit ticker(duration period, const clock& clk = default_clock())
      : clock_(&clk), period_(period), next_(clk.now() + period) {
    if (period <= duration::zero()) POSTBOX_THROW(error(errc::invalid_argument, "postbox::ticker: period must be positive"));
  }

  /// The tick's time if one is due now (and moves to the next), else empty.
  /// Never blocks.
  [[nodiscard]] std::optional<time_point> try_receive() {
    const time_point now = clock_->now();
    if (now < next_) return std::nullopt;
    // Drop missed ticks: deliver the latest due one, schedule the one after.
    const auto missed = (now - next_) / period_;
    const time_point fired = next_ + missed * period_;
    next_ = fired + period_;
    return fired;
  }

  /// Blocks until the next tick (on the ticker's clock) and returns its time.
  time_point receive() {
    std::mutex m;
    std::condition_variable cv;
    std::unique_lock lock(m);
    for (;;) {
      if (auto t = try_receive()) return *t;
      clock_->wait_until(lock, cv, next_);
    }
  }

  /// When the next tick is due.
  [[nodiscard]] time_point next() const noexcept { return next_; }
  [[nodiscard]] duration period() const noexcept { return period_; }
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }

 private:
  const clock* clock_;
  duration period_;
  time_point next_;
};

namespace detail {

/// A parking spot for a thread that waits on several things at once
/// (`postbox::select`): every event count the thread registers it with calls
/// `wake()` when it notifies, and timers reach it through the clock, which
/// waits on the same mutex and condition variable (`clock::wait_until`).
/// The flag under the mutex makes a wake-up sticky: one that arrives before
/// the thread parks is not lost. Thread-safe; never allocates.
class thread_waker final : public waker {
 public:
  thread_waker() = default;
  thread_waker(const thread_waker&) = delete;
  thread_waker& operator=(const thread_waker&) = delete;
  ~thread_waker() = default;

  /// Marks the waker woken and wakes its thread. Takes the waker's mutex
  /// briefly (lock order: an event count's registry, then this mutex).
  void wake() noexcept override {
    std::lock_guard lock(mutex_);
    woken_ = true;
    cv_.notify_one();
  }

  /// The waiting thread's mutex, condition variable and flag: it holds the
  /// mutex, checks `woken()`, and waits on the condition variable (through a
  /// postbox clock, so a manual clock can wake it too).
  [[nodiscard]] std::mutex& mutex() noexcept { return mutex_; }
  [[nodiscard]] std::condition_variable& cv() noexcept { return cv_; }
  /// Whether wake() ran since the last reset(). Caller holds mutex().
  [[nodiscard]] bool woken() const noexcept { return woken_; }
  /// Clears the flag before the next round of checks. Caller holds mutex().
  void reset() noexcept { woken_ = false; }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool woken_ = false;  // guarded by mutex_
};

/// What the select needs of a channel, an endpoint or a subscription that
/// their public API does not show: the event counts to register with.
struct select_access {
  template <class Ring>
  static event_count& not_empty(Ring& ring) noexcept {
    return ring.not_empty_;
  }
  template <class Ring>
  static event_count& not_full(Ring& ring) noexcept {
    return ring.not_full_;
  }
  template <class Ring>
  static constexpr bool asymmetric() noexcept {
    return Ring::asymmetric_waits;
  }
  template <class T, class Shape>
  static channel<T, Shape>& channel_of(receiver<T, Shape>& r) noexcept {
    return r.state_->ch;
  }
  template <class T, class Shape>
  static channel<T, Shape>& channel_of(sender<T, Shape>& s) noexcept {
    return s.state_->ch;
  }
  template <class T>
  static subscription_core<T>* core_of(subscription<T>& s) noexcept {
    return s.core_.get();
  }
};

enum class attempt { not_ready, ok, closed };

/// Everything a case may need while the select runs. `started` is when the
/// select began on `clk`, or `not_started` while a blocking select makes its
/// first, clock-free pass over the cases (see run_select): timer cases are
/// then ready only if their delay is not positive.
struct select_frame {
  static constexpr time_point not_started = time_point::min();
  /// The select's clock; null in a blocking select's first pass when no
  /// clock was given (default_clock(), resolved only once the select waits:
  /// a select whose case is ready does not touch it).
  const clock* clk;
  time_point started;
  waker* wake = nullptr;
  [[nodiscard]] bool timing() const noexcept { return started != not_started; }
  [[nodiscard]] const clock& the_clock() const noexcept { return clk != nullptr ? *clk : default_clock(); }
};

/// Wakes a select's waker from a stop callback.
struct wake_waker {
  waker* w;
  void operator()() const noexcept { w->wake(); }
};

template <class T, class Shape, class F>
struct receive_case {
  channel<T, Shape>* ch;
  F handler;

  void enter(select_frame&) noexcept {}
  void leave() noexcept {}
  attempt try_complete(select_frame&) {
    receive_result<T> r = ch->try_receive_result();
    if (r.has_value()) {
      handler(std::move(*r));
      return attempt::ok;
    }
    return r.status() == receive_status::closed ? attempt::closed : attempt::not_ready;
  }
  void park(waker& w) { select_access::not_empty(*ch).register_waker(w, select_access::asymmetric<channel<T, Shape>>()); }
  void unpark(waker& w) noexcept { select_access::not_empty(*ch).unregister_waker(w); }
  std::optional<time_point> due(const select_frame&) const noexcept { return std::nullopt; }
};

template <class T, class Shape, class U, class F>
struct send_case {
  channel<T, Shape>* ch;
  std::remove_reference_t<U>* value;
  F handler;

  void enter(select_frame&) noexcept {}
  void leave() noexcept {}
  attempt try_complete(select_frame&) {
    // try_send moves from *value only on ok.
    const send_status s = ch->try_send(static_cast<U&&>(*value));
    if (s == send_status::ok) {
      handler();
      return attempt::ok;
    }
    return s == send_status::closed ? attempt::closed : attempt::not_ready;
  }
  void park(waker& w) { select_access::not_full(*ch).register_waker(w, select_access::asymmetric<channel<T, Shape>>()); }
  void unpark(waker& w) noexcept { select_access::not_full(*ch).unregister_waker(w); }
  std::optional<time_point> due(const select_frame&) const noexcept { return std::nullopt; }
};

/// A topic subscription case: a blocking call on the handle, so it takes
/// part in the handle's reset-while-blocked protocol (see subscription_core):
/// it counts itself in, and a reset() wakes the select and reads `closed`.

template <class T, class F>
struct subscription_case {
  subscription_core<T>* core;
  F handler;
  bool entered = false;
  bool detached_at_entry = false;
  std::optional<std::stop_callback<wake_waker>> on_detach{};

  void enter(select_frame&) noexcept {
    if (core == nullptr) return;
    // seq_cst: the Dekker increment of the handle's call count (see
    // subscription_core::calls); pairs with reset()'s seq_cst reads.
    core->calls.fetch_add(1, std::memory_order_seq_cst);
    entered = true;
    // seq_cst: pairs with the exchange in reset().
    detached_at_entry = core->detached.load(std::memory_order_seq_cst);
  }
  void leave() noexcept {
    on_detach.reset();  // normally already gone (unpark)
    // release: the select's last touch of the queue; pairs with reset().
    if (entered) core->calls.fetch_sub(1, std::memory_order_release);
    entered = false;
  }
  attempt try_complete(select_frame&) {
    if (core == nullptr || detached_at_entry || core->detach.stop_requested()) return attempt::closed;
    auto r = core->q->ch.try_receive_result();
    if (r.has_value()) {
      handler(delivery<T>(std::move(*r)));
      return attempt::ok;
    }
    return r.status() == receive_status::closed ? attempt::closed : attempt::not_ready;
  }
  void park(waker& w) {
    if (core == nullptr || detached_at_entry) return;
    // A reset() of the handle wakes the select (then reads closed).
    if (!on_detach) on_detach.emplace(core->detach.get_token(), wake_waker{&w});
    select_access::not_empty(core->q->ch).register_waker(w, false);
  }
  void unpark(waker& w) noexcept {
    if (core != nullptr && !detached_at_entry) select_access::not_empty(core->q->ch).unregister_waker(w);
    // The stop callback points at `w`, which dies when the wait returns: drop
    // it here, while `w` lives. A reset() whose request_stop() is running the
    // callback right now is waited for by this destructor; dropped only in
    // leave(), the callback could still be waking `w` after the select saw
    // `closed` and returned (a use after free that hung CI once under TSan).
    on_detach.reset();
  }
  std::optional<time_point> due(const select_frame&) const noexcept { return std::nullopt; }
};

template <class F>
struct after_case {
  duration delay;
  F handler;

  void enter(select_frame&) noexcept {}
  void leave() noexcept {}
  attempt try_complete(select_frame& frame) {
    // Before the select has read its clock, no time has passed since it began.
    if (frame.timing() ? frame.clk->now() < frame.started + delay : delay > duration::zero()) return attempt::not_ready;
    handler();
    return attempt::ok;
  }
  void park(waker&) noexcept {}
  void unpark(waker&) noexcept {}
  std::optional<time_point> due(const select_frame& frame) const noexcept { return frame.started + delay; }
};

template <class F>
struct tick_case {
  ticker* t;
  F handler;

  void enter(select_frame& frame) {
    if (&t->get_clock() != &frame.the_clock())
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::select: a ticker must use the select's clock"));
  }
  void leave() noexcept {}
  attempt try_complete(select_frame&) {
    auto fired = t->try_receive();
    if (!fired) return attempt::not_ready;
    handler(*fired);
    return attempt::ok;
  }
  void park(waker&) noexcept {}
  void unpark(waker&) noexcept {}
  std::optional<time_point> due(const select_frame&) const noexcept { return t->next(); }
};

template <class Case>
inline constexpr bool is_select_case = false;
template <class T, class S, class F>
inline constexpr bool is_select_case<receive_case<T, S, F>> = true;
template <class T, class S, class U, class F>
inline constexpr bool is_select_case<send_case<T, S, U, F>> = true;
template <class T, class F>
inline constexpr bool is_select_case<subscription_case<T, F>> = true;
template <class F>
inline constexpr bool is_select_case<after_case<F>> = true;
template <class F>
inline constexpr bool is_select_case<tick_case<F>> = true;

/// Per-thread rotation of the first case tried: round robin, so a case that
/// is always ready cannot starve another one that is also ready. Never
/// blocks, never allocates.
///
/// The counter is reached through a pointer in a register, not by a
/// thread-pointer-relative (%fs:) access: a select that finds its case ready
/// is a handful of cycles, and its one loop-carried chain through memory is
/// this counter's load, increment and store. Through %fs that chain cost a
/// select over two ready spsc channels 2.0 ns instead of 1.4 (channel_bench
/// --profile select2 spsc, AMD EPYC VM: its store-to-load forwarding is
/// fast only for plain base-register addresses); a loop of selects computes
/// the address once. The counter is atomic (relaxed loads and stores: plain
/// moves, no read-modify-write) because a compiler may keep that address
/// across a coroutine's suspension, after which another thread may use it:
/// then two threads share a counter, which costs only an uneven rotation.
inline std::size_t next_rotation() noexcept {
  // relaxed: a per-thread round-robin hint; nothing is published through it
  // and no other access orders with it (atomic only for the case above).
  thread_local std::atomic<std::size_t> counter{0};
  std::atomic<std::size_t>* c = &counter;
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+r"(c));  // no instruction: only makes the compiler address it through a register
#endif
  const std::size_t r = c->load(std::memory_order_relaxed);
  c->store(r + 1, std::memory_order_relaxed);
  return r;
}

/// Tries the case at position `pick` once: the dispatch of one step of a pass.
template <class Tuple, std::size_t... I>
POSTBOX_SELECT_ALWAYS_INLINE attempt try_at(Tuple& cases, select_frame& frame, std::size_t pick,
                                             std::index_sequence<I...>) {
  attempt a = attempt::not_ready;
  // Runs only the case whose position is `pick`.
  (void)((pick == I ? (a = std::get<I>(cases).try_complete(frame), true) : false) || ...);
  return a;
}

/// One pass over a tuple of cases in rotation order, starting at `rotation`
/// modulo n; completes the first ready one. The compact form (a loop): the
/// waiting part and the awaitable select use it.
template <class Tuple, std::size_t... I>
select_result try_cases(Tuple& cases, select_frame& frame, std::size_t rotation, std::index_sequence<I...> seq) {
  constexpr std::size_t n = sizeof...(I);
  std::size_t pick = rotation % n;
  for (std::size_t k = 0; k < n; ++k) {
    const attempt a = try_at(cases, frame, pick, seq);
    if (a == attempt::ok) return {pick, select_status::ok};
    if (a == attempt::closed) return {pick, select_status::closed};
    if (++pick == n) pick = 0;
  }
  return {0, select_status::empty};
}

/// The first pass of a select. Up to 4 cases: try_cases always inlined with
/// its loop fully unrolled, so that once the compiler has inlined each case's
/// try (one copy per case, as in the loop) and threaded the dispatch, each
/// rotation is a straight run of tries with no loop counter and no index
/// compare. More cases: the compact loop (unrolled, its code would grow with
/// the square of the count).
template <class Tuple, std::size_t... I>
POSTBOX_SELECT_ALWAYS_INLINE select_result first_pass(Tuple& cases, select_frame& frame, std::size_t rotation,
                                                       std::index_sequence<I...> seq) {
  constexpr std::size_t n = sizeof...(I);
  if constexpr (n > 4) {
    return try_cases(cases, frame, rotation, seq);
  } else {
    std::size_t pick = rotation % n;
#if defined(__clang__)
#  pragma unroll
#elif defined(__GNUC__)
#  pragma GCC unroll 4
#endif
    for (std::size_t k = 0; k < n; ++k) {
      const attempt a = try_at(cases, frame, pick, seq);
      if (a == attempt::ok) return {pick, select_status::ok};
      if (a == attempt::closed) return {pick, select_status::closed};
      if (++pick == n) pick = 0;
    }
    return {0, select_status::empty};
  }
}

/// How the first pass hands a case to the waiting part: a temporary case
/// (an rvalue argument of select) that is trivially copyable goes by value,
/// so that its address never escapes the first pass and the compiler keeps
/// it in registers there (nobody sees the temporary's handler afterwards);
/// any other case by reference: an lvalue, whose handler's state the caller
/// keeps using in later selects, or a case that is not trivially copyable,
/// such as a subscription case, which counts itself in the handle's calls.
template <class Arg, class Case = std::remove_cvref_t<Arg>>
using wait_case_t = std::conditional_t<!std::is_lvalue_reference_v<Arg> && std::is_trivially_copyable_v<Case> &&
                                           std::is_copy_constructible_v<Case>,
                                       Case, std::remove_reference_t<Arg>&>;

/// The part of a blocking select after a first pass found nothing ready:
/// spin, then park the calling thread on a waker registered with every case.
/// Kept out of line so the first pass stays small enough to inline into the
/// caller. `opts` may be null (no stop token, no deadline).
/// Takes the cases as wait_case_t gives them (temporaries by value, the
/// rest by reference) and builds its own frame, so that neither escapes from
/// the first pass (whose stores would otherwise be paid by every select that
/// finds a case ready). Cold: reached only when no case was ready.
template <class... Cases>
POSTBOX_SELECT_NOINLINE select_result wait_cases(const select_options* opts, std::size_t rotation, Cases... case_args) {
  constexpr auto seq = std::index_sequence_for<Cases...>{};
  std::tuple<std::remove_reference_t<Cases>&...> cases(case_args...);
  const clock* given_clock = opts != nullptr ? opts->clock : nullptr;
  const clock& clk = given_clock != nullptr ? *given_clock : default_clock();
  select_frame frame{&clk, select_frame::not_started, nullptr};
  const time_point deadline = opts != nullptr ? opts->deadline : time_point::max();
  const std::stop_token* stop = opts != nullptr ? &opts->stop : nullptr;
  // The select begins, for its timer cases and deadline, here: at its first
  // clock read, right after a pass that found nothing (and so changed nothing).
  frame.started = clk.now();
  select_result r{};

  backoff spin;
  while (!spin.completed()) {
    spin.snooze();
    r = try_cases(cases, frame, rotation, seq);
    if (r.status != select_status::empty) return r;
    if (stop != nullptr && stop->stop_requested()) return {0, select_status::canceled};
  }

  // Park on the waker until a case's event count, a timer, the deadline or
  // a stop wakes us.
  thread_waker w;
  frame.wake = &w;
  std::optional<std::stop_callback<wake_waker>> on_stop;
  if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, wake_waker{&w});
  for (;;) {
    std::apply([&](auto&... c) { (c.park(w), ...); }, cases);
    struct parked_guard {
      std::tuple<std::remove_reference_t<Cases>&...>& cases;
      thread_waker& w;
      ~parked_guard() {
        std::apply([&](auto&... c) { (c.unpark(w), ...); }, cases);
      }
    } parked{cases, w};
    // Re-check after registering: a notification that came before the
    // registration was seen here (event_count::register_waker).
    r = try_cases(cases, frame, rotation, seq);
    if (r.status != select_status::empty) return r;
    if (stop != nullptr && stop->stop_requested()) return {0, select_status::canceled};
    time_point wake_at = deadline;
    std::apply(
        [&](auto&... c) {
          ((c.due(frame) ? (wake_at = std::min(wake_at, *c.due(frame)), 0) : 0), ...);
        },
        cases);
    if (clk.now() >= deadline) return {0, select_status::timeout};
    {
      std::unique_lock lock(w.mutex());
      while (!w.woken() && clk.now() < wake_at) clk.wait_until(lock, w.cv(), wake_at);
      w.reset();
    }
  }
}

/// select, select with options (`opts` non-null) and try_select (`may_wait`
/// false). `Args` are select's deduced argument types (a reference type for
/// an lvalue case). The first pass over the cases reads no clock, builds no
/// waker, allocates nothing and stores no case: when a case is ready the
/// select costs its rotation and that case's own non-blocking operation; the
/// other cases are not touched.
template <class... Args>
POSTBOX_SELECT_ALWAYS_INLINE select_result run_select(const select_options* opts, bool may_wait,
                                                      std::remove_reference_t<Args>&... case_refs) {
  static_assert(sizeof...(Args) > 0, "postbox::select needs at least one case");
  static_assert((is_select_case<std::remove_cvref_t<Args>> && ...),
                "postbox::select: every argument after the options must be a case (on_receive, on_send, after)");
  if (opts != nullptr && opts->stop.stop_requested()) return {0, select_status::canceled};
  // null clock: default_clock(), resolved only in wait_cases.
  select_frame frame{opts != nullptr ? opts->clock : nullptr, select_frame::not_started, nullptr};

  struct entered_guard {
    std::tuple<std::remove_reference_t<Args>&...> cases;
    ~entered_guard() {
      std::apply([](auto&... c) { (c.leave(), ...); }, cases);
    }
  } guard{{case_refs...}};
  (case_refs.enter(frame), ...);

  const std::size_t rotation = next_rotation();
  std::tuple<std::remove_reference_t<Args>&...> cases{case_refs...};
  const select_result r = first_pass(cases, frame, rotation, std::index_sequence_for<Args...>{});
  // try_select makes this one pass: it begins and ends at once, so an
  // after() case is ready in it only with a delay <= 0, as before any wait.
  if (r.status != select_status::empty || !may_wait) [[likely]] return r;
  return wait_cases<wait_case_t<Args>...>(opts, rotation, case_refs...);
}

}  // namespace detail

// --- cases -------------------------------------------------------------------

/// A receive case on a channel: when chosen, takes one message and calls
/// `handler(T&&)`. Ready also when the channel is closed and drained (the
/// select then returns `closed` for it and the handler does not run).
template <class T, class Shape, class F>
  requires std::is_invocable_v<F&, T&&>
[[nodiscard]] detail::receive_case<T, Shape, F> on_receive(channel<T, Shape>& ch, F handler) {
  return {&ch, std::move(handler)};
}

/// A receive case on a `make_channel` receiver endpoint.
template <class T, class Shape, class F>
  requires std::is_invocable_v<F&, T&&>
[[nodiscard]] detail::receive_case<T, Shape, F> on_receive(receiver<T, Shape>& rx, F handler) {
  return {&detail::select_access::channel_of(rx), std::move(handler)};
}

/// A receive case on a topic subscription: `handler(delivery<T>)`. Ready
/// with `closed` once the topic is closed and the subscription drained, or
/// the subscription was reset (also while the select waits: reset wakes it).
template <class T, class F>
  requires std::is_invocable_v<F&, delivery<T>>
[[nodiscard]] detail::subscription_case<T, F> on_receive(subscription<T>& sub, F handler) {
  return {detail::select_access::core_of(sub), std::move(handler)};
}

/// A tick case: ready once per period of `t`, `handler(time_point)` gets the
/// tick's time. The ticker must use the select's clock.
template <class F>
  requires std::is_invocable_v<F&, time_point>
[[nodiscard]] detail::tick_case<F> on_receive(ticker& t, F handler) {
  return {&t, std::move(handler)};
}

/// A send case: when chosen, sends `value` (moving from it only then) and
/// calls `handler()`. Ready with `closed` when the channel is closed (the
/// value is untouched). `value` must outlive the select.
template <class T, class Shape, class U, class F>
  requires std::is_constructible_v<T, U&&> && std::is_invocable_v<F&>
[[nodiscard]] detail::send_case<T, Shape, U, F> on_send(channel<T, Shape>& ch, U&& value, F handler) {
  return {&ch, &value, std::move(handler)};
}

/// A send case on a `make_channel` sender endpoint.
template <class T, class Shape, class U, class F>
  requires std::is_constructible_v<T, U&&> && std::is_invocable_v<F&>
[[nodiscard]] detail::send_case<T, Shape, U, F> on_send(sender<T, Shape>& tx, U&& value, F handler) {
  return {&detail::select_access::channel_of(tx), &value, std::move(handler)};
}

/// A timer case: ready once `delay` has passed on the select's clock since
/// the select began; then calls `handler()`.
template <class F>
  requires std::is_invocable_v<F&>
[[nodiscard]] detail::after_case<F> after(duration delay, F handler) {
  return {delay, std::move(handler)};
}

/// A ticker firing every `period` on `clk`, for `on_receive(ticker, f)`.
[[nodiscard]] inline ticker tick(duration period, const clock& clk = default_clock()) { return ticker(period, clk); }

// --- select -------------------------------------------------------------------

/// Waits until one of `cases` can complete, completes exactly that one (its
/// handler runs on this thread) and returns which. The others consume and
/// send nothing. Cases are tried in an order that rotates per call, so no
/// ready case is starved. Blocks (spins briefly, then parks); allocates only
/// when it parks (registrations). Thread-safe as the cases' operations are.
/// A handler's exception propagates (its case has completed).
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_select_case<std::remove_cvref_t<Cases>> && ...))
select_result select(Cases&&... cases) {
  return detail::run_select<Cases...>(nullptr, true, cases...);
}

/// As `select`, with a clock for timer cases, a deadline (`timeout`) and a
/// stop token (`canceled`).
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_select_case<std::remove_cvref_t<Cases>> && ...))
select_result select(const select_options& options, Cases&&... cases) {
  return detail::run_select<Cases...>(&options, true, cases...);
}

/// Completes one ready case without waiting, or returns `empty`. Never
/// blocks, never allocates.
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_select_case<std::remove_cvref_t<Cases>> && ...))
[[nodiscard]] select_result try_select(Cases&&... cases) {
  return detail::run_select<Cases...>(nullptr, false, cases...);
}

POSTBOX_END_NAMESPACE
