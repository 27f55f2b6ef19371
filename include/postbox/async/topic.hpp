// SPDX-License-Identifier: MIT
// co_await forms of receive on topic subscriptions.
#pragma once

// Design: docs/design/async.md; the machinery is in async/core.hpp.

#include <postbox/async/core.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/select.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/topic.hpp>

#include <atomic>
#include <memory>
#include <optional>
#include <stop_token>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

/// A receive on a topic subscription. It enters the handle's call count only
/// while it copies the queue and the detach token out of the handle (at
/// construction), never while suspended: a reset() of the handle would
/// otherwise wait for a coroutine that only its own thread may resume. The
/// copies keep the queue alive, and reset() (or destroying the handle)
/// stops the detach token, which wakes the wait with `closed`.
template <class T>
struct subscription_receive_op {
  using result_type = receive_result<delivery<T>>;
  std::shared_ptr<topic_queue<T>> q;
  std::stop_token detached;
  std::optional<std::stop_callback<wake_waker>> on_detach{};

  explicit subscription_receive_op(subscription_core<T>* core) {
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
  subscription_receive_op(subscription_receive_op&& o) noexcept : q(std::move(o.q)), detached(std::move(o.detached)) {}

  std::optional<result_type> try_once() noexcept {
    if (!q || detached.stop_requested()) return result_type(receive_status::closed);
    auto r = q->ch.try_receive_result();
    if (r.has_value()) return result_type(delivery<T>(std::move(*r)));
    if (r.status() == receive_status::closed) return result_type(receive_status::closed);
    return std::nullopt;
  }
  void park(waker& w) {
    if (!q) return;
    on_detach.emplace(detached, wake_waker{&w});
    select_access::not_empty(q->ch).register_waker(w, false);
  }
  void unpark(waker& w) noexcept {
    if (!q) return;
    select_access::not_empty(q->ch).unregister_waker(w);
    on_detach.reset();
  }
  static result_type canceled() noexcept { return receive_status::canceled; }
  static result_type timeout() noexcept { return receive_status::timeout; }
};

}  // namespace detail

/// `co_await async_receive(sub)`: the next delivery, or `closed` once the
/// topic is closed and this subscription drained, or the handle was reset
/// or destroyed (also while the coroutine waits: that wakes it). The handle
/// must be alive when the operation is created; it may go away while the
/// coroutine is suspended. Allocates only when it suspends.
template <class T>
[[nodiscard]] detail::op_awaiter<detail::subscription_receive_op<T>> async_receive(subscription<T>& sub,
                                                                                   std::stop_token stop = {}) {
  return {detail::subscription_receive_op<T>(detail::select_access::core_of(sub)), {std::move(stop), {}}};
}
template <class T>
[[nodiscard]] detail::op_awaiter<detail::subscription_receive_op<T>> async_receive_until(
    subscription<T>& sub, timer_service& timers, time_point deadline, std::stop_token stop = {}) {
  return {detail::subscription_receive_op<T>(detail::select_access::core_of(sub)),
          {std::move(stop), {&timers, deadline}}};
}


POSTBOX_END_NAMESPACE
