// SPDX-License-Identifier: MIT
// co_await forms of send and receive on channels and their endpoints.
#pragma once

// Design: docs/design/async.md; the machinery is in async/core.hpp.

#include <postbox/async/core.hpp>
#include <postbox/channel.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/select.hpp>
#include <postbox/timer_service.hpp>

#include <optional>
#include <stop_token>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

template <class T, class Shape>
struct channel_receive_op {
  using result_type = receive_result<T>;
  channel<T, Shape>* ch;

  std::optional<result_type> try_once() noexcept {
    receive_result<T> r = ch->try_receive_result();
    if (r.status() == receive_status::empty) return std::nullopt;
    return std::optional<result_type>(std::move(r));
  }
  void park(waker& w) {
    select_access::not_empty(*ch).register_waker(w, select_access::asymmetric<channel<T, Shape>>());
  }
  void unpark(waker& w) noexcept { select_access::not_empty(*ch).unregister_waker(w); }
  static result_type canceled() noexcept { return receive_status::canceled; }
  static result_type timeout() noexcept { return receive_status::timeout; }
};

/// `Holder` is T (the operation owns the message) or T* (the caller's
/// lvalue, moved from only when the send succeeds).
template <class T, class Shape, class Holder>
struct channel_send_op {
  using result_type = send_status;
  channel<T, Shape>* ch;
  Holder value;

  T&& message() noexcept {
    if constexpr (std::is_pointer_v<Holder>) {
      return std::move(*value);
    } else {
      return std::move(value);
    }
  }
  std::optional<result_type> try_once() noexcept {
    // try_send moves from the message only on ok.
    const send_status s = ch->try_send(message());
    if (s == send_status::full) return std::nullopt;
    return s;
  }
  void park(waker& w) {
    select_access::not_full(*ch).register_waker(w, select_access::asymmetric<channel<T, Shape>>());
  }
  void unpark(waker& w) noexcept { select_access::not_full(*ch).unregister_waker(w); }
  static result_type canceled() noexcept { return send_status::canceled; }
  static result_type timeout() noexcept { return send_status::timeout; }
};

}  // namespace detail

/// `co_await async_receive(ch)`: the next message, or `closed` once the
/// channel is closed and drained. Suspends (never blocks a thread) while the
/// channel is empty, and resumes on the awaiting task's scheduler (or the
/// one given with `.on(s)`). Allocates only when it suspends (a registration
/// and a small resume token). Usable alongside blocking receivers and
/// senders on the same channel; the shape's rules count coroutines as
/// callers (spsc: one receiver at a time). The channel must outlive the wait.
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive(channel<T, Shape>& ch) {
  return {{&ch}, {}};
}
/// As above; `canceled` (nothing taken) once `stop` is stopped, before or
/// while waiting.
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive(channel<T, Shape>& ch,
                                                                                     std::stop_token stop) {
  return {{&ch}, {std::move(stop), {}}};
}
/// As above; `timeout` (nothing taken) once `deadline` passes (see async_deadline).
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive_until(
    channel<T, Shape>& ch, timer_service& timers, time_point deadline, std::stop_token stop = {}) {
  return {{&ch}, {std::move(stop), {&timers, deadline}}};
}
/// As async_receive_until, `timeout` after `delay` on the timer service's clock.
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive_for(
    channel<T, Shape>& ch, timer_service& timers, duration delay, std::stop_token stop = {}) {
  return async_receive_until(ch, timers, timers.get_clock().now() + delay, std::move(stop));
}

/// The endpoint forms: as on the channel; the receiver must outlive the wait.
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive(receiver<T, Shape>& rx,
                                                                                     std::stop_token stop = {}) {
  return async_receive(detail::select_access::channel_of(rx), std::move(stop));
}
template <class T, class Shape>
[[nodiscard]] detail::op_awaiter<detail::channel_receive_op<T, Shape>> async_receive_until(
    receiver<T, Shape>& rx, timer_service& timers, time_point deadline, std::stop_token stop = {}) {
  return async_receive_until(detail::select_access::channel_of(rx), timers, deadline, std::move(stop));
}

namespace detail {
template <class T, class U>
using send_holder = std::conditional_t<std::is_same_v<U, T&>, T*, T>;

template <class T, class Shape, class U>
op_awaiter<channel_send_op<T, Shape, send_holder<T, U>>> make_send(channel<T, Shape>& ch, U&& value, op_limits limits) {
  if constexpr (std::is_same_v<U, T&>) {
    return {{&ch, &value}, std::move(limits)};
  } else {
    return {{&ch, T(std::forward<U>(value))}, std::move(limits)};
  }
}
}  // namespace detail

/// `co_await async_send(ch, value)`: `ok` once sent, `closed` if the channel
/// is closed. Suspends while the channel is full. An lvalue `T` is moved
/// from only when the send succeeds (it is yours again on any other
/// outcome); any other argument is converted into a `T` the awaiter owns.
/// Allocates only when it suspends. The channel must outlive the wait.
template <class T, class Shape, class U>
  requires std::is_constructible_v<T, U&&>
[[nodiscard]] auto async_send(channel<T, Shape>& ch, U&& value) {
  return detail::make_send(ch, std::forward<U>(value), {});
}
/// As above; `canceled` (nothing sent) once `stop` is stopped.
template <class T, class Shape, class U>
  requires std::is_constructible_v<T, U&&>
[[nodiscard]] auto async_send(channel<T, Shape>& ch, U&& value, std::stop_token stop) {
  return detail::make_send(ch, std::forward<U>(value), {std::move(stop), {}});
}
/// As above; `timeout` (nothing sent) once `deadline` passes.
template <class T, class Shape, class U>
  requires std::is_constructible_v<T, U&&>
[[nodiscard]] auto async_send_until(channel<T, Shape>& ch, U&& value, timer_service& timers, time_point deadline,
                                    std::stop_token stop = {}) {
  return detail::make_send(ch, std::forward<U>(value), {std::move(stop), {&timers, deadline}});
}
/// The endpoint forms; the sender must outlive the wait.
template <class T, class Shape, class U>
  requires std::is_constructible_v<T, U&&>
[[nodiscard]] auto async_send(sender<T, Shape>& tx, U&& value, std::stop_token stop = {}) {
  return detail::make_send(detail::select_access::channel_of(tx), std::forward<U>(value), {std::move(stop), {}});
}
template <class T, class Shape, class U>
  requires std::is_constructible_v<T, U&&>
[[nodiscard]] auto async_send_until(sender<T, Shape>& tx, U&& value, timer_service& timers, time_point deadline,
                                    std::stop_token stop = {}) {
  return detail::make_send(detail::select_access::channel_of(tx), std::forward<U>(value),
                           {std::move(stop), {&timers, deadline}});
}

POSTBOX_END_NAMESPACE
