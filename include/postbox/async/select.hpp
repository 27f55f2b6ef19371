// SPDX-License-Identifier: MIT
// async_select: the awaitable postbox::select, on channels, endpoints, topic subscriptions and timer cases.
#pragma once

// Design: docs/design/async.md; the machinery is in async/core.hpp.

#include <postbox/async/core.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/select.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/topic.hpp>

#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <stop_token>
#include <tuple>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

/// What an awaitable select stores: the select's result and, when the chosen
/// case's handler threw, that exception (the case has completed).
struct select_outcome {
  select_result result;
  std::exception_ptr error;
};

/// A topic subscription case as an awaitable select holds it. As
/// subscription_receive_op, it enters the handle's call count only while it
/// copies the queue and the detach token out of the handle (when the
/// operation is created), never while suspended: a reset() of the handle
/// would otherwise wait for a coroutine that only its scheduler may resume.
/// The copy keeps the queue alive after the handle or the topic is gone; the
/// handle's reset() (or destruction) stops the detach token, which wakes the
/// select and makes this case `closed`; a topic closed or destroyed closes
/// the queue, which wakes it too (the case is `closed` once drained).
template <class T, class F>
struct async_subscription_case {
  std::shared_ptr<topic_queue<T>> q;
  std::stop_token detached;
  F handler;
  std::optional<std::stop_callback<wake_waker>> on_detach{};

  /// From the case on_receive(sub, f) made (its handler is moved from an
  /// rvalue, copied from an lvalue). The subscription handle must be alive.
  template <class C>
    requires std::is_same_v<std::remove_cvref_t<C>, subscription_case<T, F>>
  explicit async_subscription_case(C&& c) : handler(std::forward<C>(c).handler) {
    subscription_core<T>* core = c.core;
    if (core == nullptr) return;
    // seq_cst: the Dekker increment of the handle's call count; pairs with
    // reset()'s seq_cst reads (see subscription_core::calls).
    core->calls.fetch_add(1, std::memory_order_seq_cst);
    // seq_cst: pairs with the exchange in reset().
    if (!core->detached.load(std::memory_order_seq_cst)) {
      q = core->q;
      detached = core->detach.get_token();
    }
    // release: our last touch of the core; pairs with reset()'s loads.
    core->calls.fetch_sub(1, std::memory_order_release);
  }
  /// Only before park() (the stop callback is not moved).
  async_subscription_case(async_subscription_case&& o) noexcept(std::is_nothrow_move_constructible_v<F>)
      : q(std::move(o.q)), detached(std::move(o.detached)), handler(std::move(o.handler)) {}
  async_subscription_case& operator=(async_subscription_case&&) = delete;
  ~async_subscription_case() = default;

  void enter(select_frame&) noexcept {}
  void leave() noexcept {}
  attempt try_complete(select_frame&) {
    if (!q || detached.stop_requested()) return attempt::closed;
    auto r = q->ch.try_receive_result();
    if (r.has_value()) {
      handler(delivery<T>(std::move(*r)));
      return attempt::ok;
    }
    return r.status() == receive_status::closed ? attempt::closed : attempt::not_ready;
  }
  /// Registers on the queue, then on the detach token (a stop already
  /// requested wakes `w` right here, which asks the owner to re-try).
  void park(waker& w) {
    if (!q) return;
    select_access::not_empty(q->ch).register_waker(w, false);
    on_detach.emplace(detached, wake_waker{&w});
  }
  /// Once it returns no wake from this case is running on `w` (the registry
  /// lock, and the stop callback's destructor, which waits for a running one).
  void unpark(waker& w) noexcept {
    if (!q) return;
    select_access::not_empty(q->ch).unregister_waker(w);
    on_detach.reset();
  }
  std::optional<time_point> due(const select_frame&) const noexcept { return std::nullopt; }
};

/// The case type an awaitable select stores for an argument of type `Case`.
template <class Case>
struct async_case {
  using type = Case;
};
template <class T, class F>
struct async_case<subscription_case<T, F>> {
  using type = async_subscription_case<T, F>;
};
template <class Case>
using async_case_t = typename async_case<std::remove_cvref_t<Case>>::type;

template <class Case>
inline constexpr bool is_async_select_case = false;
template <class T, class S, class F>
inline constexpr bool is_async_select_case<receive_case<T, S, F>> = true;
template <class T, class F>
inline constexpr bool is_async_select_case<subscription_case<T, F>> = true;
template <class T, class F>
inline constexpr bool is_async_select_case<async_subscription_case<T, F>> = true;
template <class T, class S, class U, class F>
inline constexpr bool is_async_select_case<send_case<T, S, U, F>> = true;
template <class F>
inline constexpr bool is_async_select_case<after_case<F>> = true;
template <class F>
inline constexpr bool is_async_select_case<tick_case<F>> = true;

template <class Case>
inline constexpr bool is_timer_case = false;
template <class F>
inline constexpr bool is_timer_case<after_case<F>> = true;
template <class F>
inline constexpr bool is_timer_case<tick_case<F>> = true;

/// The operation of an awaitable select (coroutine or Asio): try every case
/// in the rotating order of postbox::select; register one waker (the
/// async_op) with the event count of every channel case, and one timer on
/// the timer service for the earliest timer case. `Cases` are the stored
/// case types (async_case_t of the arguments): a subscription case is held
/// as an async_subscription_case, so a suspended select never holds up the
/// handle's reset().
template <class... Cases>
class select_op {
  static_assert(sizeof...(Cases) > 0, "postbox::async_select needs at least one case");
  static_assert((is_async_select_case<Cases> && ...),
                "postbox::async_select: every case must be on_receive/on_send on a channel or endpoint, "
                "on_receive on a subscription or a ticker, or after");

 public:
  using result_type = select_outcome;

  /// `timers` wakes timer cases; `clk` is the clock they are measured on.
  /// Throws error(invalid_argument) for timer cases without a timer service
  /// and for a ticker on another clock.
  template <class... Args>
  explicit select_op(timer_service* timers, const clock& clk, Args&&... cases)
      : timers_(timers), frame_{&clk, clk.now(), nullptr}, rotation_(next_rotation()),
        cases_(std::forward<Args>(cases)...) {
    if (timers_ == nullptr && (is_timer_case<Cases> || ...))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::async_select: after() and ticker cases need a "
                                                  "timer_service (the form taking one)"));
    std::apply([&](auto&... c) { (c.enter(frame_), ...); }, cases_);
  }
  /// Moves the cases; only before park() (as every operation, see op_awaiter).
  select_op(select_op&& o) noexcept(std::is_nothrow_move_constructible_v<std::tuple<Cases...>>)
      : timers_(o.timers_), frame_(o.frame_), rotation_(o.rotation_), cases_(std::move(o.cases_)) {}
  select_op& operator=(select_op&&) = delete;
  ~select_op() = default;

  /// Completes the first ready case in rotation order (its handler runs
  /// here), or returns empty. A handler's exception is caught and stored.
  std::optional<result_type> try_once() noexcept {
#if POSTBOX_HAS_EXCEPTIONS
    try {
      return try_cases_once();
    } catch (...) {
      return select_outcome{{0, select_status::ok}, std::current_exception()};
    }
#else
    return try_cases_once();
#endif
  }

  /// Registers `w` with every channel case's event count and sets one timer
  /// for the earliest timer case. All or nothing: a throw (an allocation)
  /// leaves nothing registered.
  void park(waker& w) {
#if POSTBOX_HAS_EXCEPTIONS
    try {
      park_all(w);
    } catch (...) {
      unpark(w);
      throw;
    }
#else
    park_all(w);
#endif
  }

  /// Undoes park(); once it returns no wake from a case or the timer is
  /// running on `w` (the registry lock, and the stop callback's destructor).
  void unpark(waker& w) noexcept {
    if (timer_src_) {
      POSTBOX_TRY { (void)timers_->cancel(timer_); }
      POSTBOX_CATCH_ALL {}
      on_timer_.reset();  // waits for a timer callback running elsewhere
      timer_src_.reset();
    }
    unpark_from(w, std::index_sequence_for<Cases...>{});
    parked_ = 0;
  }

  static result_type canceled() noexcept { return {{0, select_status::canceled}, {}}; }
  static result_type timeout() noexcept { return {{0, select_status::timeout}, {}}; }
  /// How the Asio adapter completes: `handler(std::exception_ptr, select_result)`.
  template <class Handler>
  static void complete_with(Handler&& handler, result_type&& o) {
    std::forward<Handler>(handler)(std::move(o.error), o.result);
  }
  /// What co_await returns: the result, or the handler's exception rethrown.
  static select_result unwrap(result_type&& o) {
    if (o.error) std::rethrow_exception(o.error);
    return o.result;
  }

 private:
  std::optional<result_type> try_cases_once() {
    const select_result r = try_cases(cases_, frame_, rotation_, std::index_sequence_for<Cases...>{});
    if (r.status == select_status::empty) return std::nullopt;
    return select_outcome{r, {}};
  }

  void park_all(waker& w) {
    std::apply([&](auto&... c) { ((c.park(w), ++parked_), ...); }, cases_);
    std::optional<time_point> due;
    std::apply(
        [&](auto&... c) {
          ((c.due(frame_) ? (due = due ? std::min(*due, *c.due(frame_)) : *c.due(frame_), 0) : 0), ...);
        },
        cases_);
    if (!due) return;
    timer_src_.emplace();
    on_timer_.emplace(timer_src_->get_token(), wake_waker{&w});
    timer_ = timers_->schedule_at(*due, [src = *timer_src_]() mutable { src.request_stop(); });
  }

  /// Unregisters the first parked_ cases (park registers them in order).
  template <std::size_t... I>
  void unpark_from(waker& w, std::index_sequence<I...>) noexcept {
    ((I < parked_ ? (std::get<I>(cases_).unpark(w), 0) : 0), ...);
  }

  timer_service* timers_;
  select_frame frame_;
  std::size_t rotation_;
  std::tuple<Cases...> cases_;
  std::size_t parked_ = 0;                               // cases registered by park()
  std::optional<std::stop_source> timer_src_;            // requested by the timer case's timer
  std::optional<std::stop_callback<wake_waker>> on_timer_;
  timer_service::timer_id timer_ = 0;
};

template <class... Cases>
using select_awaiter = op_awaiter<select_op<async_case_t<Cases>...>>;

/// The clock of an awaitable select on `timers`: the options' clock, which
/// must then be the timer service's own (timers and the deadline run there).
inline const clock& select_clock(timer_service& timers, const select_options& opts) {
  if (opts.clock != nullptr && opts.clock != &timers.get_clock())
    POSTBOX_THROW(error(errc::invalid_argument, "postbox::async_select: select_options::clock must be the timer "
                                                "service's clock"));
  return timers.get_clock();
}

}  // namespace detail

/// `co_await async_select(cases...)`: the awaitable postbox::select. Waits
/// (suspended, no thread blocked) until one channel or subscription case can
/// complete, completes exactly that one (its handler runs on the thread that
/// resumes the coroutine, or on the awaiting thread if a case is ready at
/// once) and returns which; the other cases consume and send nothing. Cases
/// rotate per call as in select. Channel, endpoint and subscription cases
/// (timer cases need the form with a timer service). A handler's exception
/// propagates from the co_await. Allocates only when it suspends (one
/// registration per case and a resume token). The channels must outlive the
/// wait. A subscription handle must be alive when async_select is called and
/// may go while the coroutine waits: its case ends `closed` once the handle
/// is reset or destroyed, or its topic is closed or destroyed and the
/// subscription drained (each wakes a suspended select).
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_async_select_case<std::remove_cvref_t<Cases>> && ...))
[[nodiscard]] detail::select_awaiter<Cases...> async_select(Cases&&... cases) {
  static_assert(!(detail::is_timer_case<std::remove_cvref_t<Cases>> || ...),
                "postbox::async_select: after() and ticker cases need async_select(timer_service&, select_options, ...)");
  return detail::select_awaiter<Cases...>(
      detail::select_op<detail::async_case_t<Cases>...>(nullptr, default_clock(), std::forward<Cases>(cases)...), {});
}

/// As above, with timer cases (`after`, tickers) and the options'
/// deadline (`timeout`, nothing consumed) run by `timers`, on its clock
/// (`options.clock` must be null or that clock; a manual_clock and
/// `run_due()` in tests), and the options' stop token (`canceled`, nothing
/// consumed, also while suspended). `after` delays count from this call.
/// Destroying the suspended frame withdraws every registration and timer.
/// Throws error(invalid_argument) for a clock other than the timer service's.
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_async_select_case<std::remove_cvref_t<Cases>> && ...))
[[nodiscard]] detail::select_awaiter<Cases...> async_select(timer_service& timers, const select_options& options,
                                                             Cases&&... cases) {
  return detail::select_awaiter<Cases...>(
      detail::select_op<detail::async_case_t<Cases>...>(&timers, detail::select_clock(timers, options),
                                                       std::forward<Cases>(cases)...),
      {options.stop, {&timers, options.deadline}});
}


POSTBOX_END_NAMESPACE
