// SPDX-License-Identifier: MIT
// async_select: the awaitable postbox::select, on channels, endpoints and timer cases.
#pragma once

// Design: docs/design/async.md; the machinery is in async/core.hpp.

#include <postbox/async/core.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/select.hpp>
#include <postbox/timer_service.hpp>

#include <algorithm>
#include <cstddef>
#include <exception>
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

template <class Case>
inline constexpr bool is_async_select_case = false;
template <class T, class S, class F>
inline constexpr bool is_async_select_case<receive_case<T, S, F>> = true;
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
/// the timer service for the earliest timer case. Topic subscription cases
/// are not accepted: their handle's reset waits for calls in progress, and a
/// suspended coroutine is not one it can wait for (see
/// subscription_receive_op).
template <class... Cases>
class select_op {
  static_assert(sizeof...(Cases) > 0, "postbox::async_select needs at least one case");
  static_assert((is_async_select_case<Cases> && ...),
                "postbox::async_select: every case must be on_receive/on_send on a channel or endpoint, after, "
                "or on_receive on a ticker (subscription cases are not supported)");

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
using select_awaiter = op_awaiter<select_op<std::remove_cvref_t<Cases>...>>;

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
/// (suspended, no thread blocked) until one channel case can complete,
/// completes exactly that one (its handler runs on the thread that resumes
/// the coroutine, or on the awaiting thread if a case is ready at once) and
/// returns which; the other cases consume and send nothing. Cases rotate per
/// call as in select. Channel and endpoint cases only (timer cases need the
/// form with a timer service). A handler's exception propagates from the
/// co_await. Allocates only when it suspends (one registration per case and
/// a resume token). The channels must outlive the wait.
template <class... Cases>
  requires(sizeof...(Cases) > 0 && (detail::is_async_select_case<std::remove_cvref_t<Cases>> && ...))
[[nodiscard]] detail::select_awaiter<Cases...> async_select(Cases&&... cases) {
  static_assert(!(detail::is_timer_case<std::remove_cvref_t<Cases>> || ...),
                "postbox::async_select: after() and ticker cases need async_select(timer_service&, select_options, ...)");
  return detail::select_awaiter<Cases...>(
      detail::select_op<std::remove_cvref_t<Cases>...>(nullptr, default_clock(), std::forward<Cases>(cases)...), {});
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
      detail::select_op<std::remove_cvref_t<Cases>...>(&timers, detail::select_clock(timers, options),
                                                       std::forward<Cases>(cases)...),
      {options.stop, {&timers, options.deadline}});
}


POSTBOX_END_NAMESPACE
