// SPDX-License-Identifier: MIT
// The Asio adapter: postbox's waits as Asio asynchronous operations (any completion token) and an executor scheduler.
#pragma once

// Opt-in: link the CMake target postbox::asio (standalone Asio, as Debian's
// libasio-dev ships it, 1.22 or later; the target defines ASIO_STANDALONE).
// Nothing in the core includes this header. Design: docs/design/async.md.
//
// * executor_scheduler<Executor> posts postbox resumptions to an Asio
//   executor, so postbox::task coroutines (and awaitables given `.on(s)`)
//   resume on an io_context.
// * async_receive(ch, token) / async_send(ch, value, token) /
//   async_receive(subscription, token) are initiating functions in Asio's
//   style (asio::async_initiate): the completion token may be
//   asio::use_awaitable, asio::experimental::deferred, a callback, or any
//   other token. The handler runs on its associated executor (bind one with
//   asio::bind_executor; a bare callback gets asio::system_executor), never
//   inside the initiating call. A pending operation keeps that executor's
//   work count up, so io_context::run() does not return while it waits.
// * Cancellation: the handler's associated cancellation slot (for example
//   from asio::bind_cancellation_slot, or awaitable operators) maps to a
//   stop request: the operation completes with `canceled` and has consumed
//   or sent nothing.

#include <postbox/async.hpp>
#include <postbox/config.hpp>

// Asio 1.22 looks for <experimental/coroutine> to enable co_await under
// clang; clang 14+ with libstdc++ has the standard <coroutine>, which Asio
// uses once it knows co_await works (as it does for g++). Include this
// header before other Asio headers so the choice is consistent.
#if defined(__clang__) && defined(__cpp_impl_coroutine) && __has_include(<coroutine>) && !defined(ASIO_HAS_CO_AWAIT)
#  define ASIO_HAS_CO_AWAIT 1
#endif

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <asio/system_executor.hpp>

#include <optional>
#include <stop_token>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// A postbox scheduler that posts resumptions to an Asio executor: the
/// coroutine resumes on a thread running that executor (an io_context's
/// run()). `post` allocates (Asio's handler); an allocation failure there
/// terminates, since it happens inside a notifier's noexcept wake-up.
/// Thread-safe as the executor is. Must outlive the operations using it.
template <class Executor>
class executor_scheduler {
 public:
  explicit executor_scheduler(Executor ex) noexcept(std::is_nothrow_move_constructible_v<Executor>)
      : ex_(std::move(ex)) {}

  void post(resumption r) noexcept {
    ::asio::post(ex_, [r = std::move(r)]() mutable { r(); });
  }

  [[nodiscard]] const Executor& get_executor() const noexcept { return ex_; }

 private:
  Executor ex_;
};

namespace detail {

/// Turns an Asio cancellation (any type) into a stop request.
struct asio_cancel_to_stop {
  std::stop_source src;
  void operator()(::asio::cancellation_type type) noexcept {
    if (type != ::asio::cancellation_type::none) src.request_stop();
  }
};

/// One pending Asio operation: an async_op on the heap that owns the handler.
/// Deleted just before the handler runs (or is posted, on immediate completion).
template <class Op, class Handler>
class asio_op final : public async_op {
 public:
  using result_type = typename Op::result_type;
  using executor_type = ::asio::associated_executor_t<Handler, ::asio::system_executor>;

  /// Tries `op` at once (then only the handler's post allocates); otherwise
  /// allocates the operation and waits.
  static void start(Op op, Handler handler) {
    // A cancellation is an event, not a state: none can be pending before
    // the slot has a handler, so the first try needs no stop check.
    if (std::optional<result_type> r = op.try_once()) {
      post_result(std::move(handler), std::move(*r));
      return;
    }
    auto slot = ::asio::get_associated_cancellation_slot(handler);
    std::stop_token stop;
    if (slot.is_connected()) {
      // The slot keeps its own copy of the stop source: no pointer into us.
      auto& cancel = slot.template emplace<asio_cancel_to_stop>();
      stop = cancel.src.get_token();
    }
    auto* self = new asio_op(std::move(op), std::move(handler), std::move(stop));
    if (self->try_complete()) {
      self->finish();
      return;
    }
    if (self->begin(self->sched_)) self->finish();
    // else armed: `self` may already be completing on another thread.
  }

  ~asio_op() { abandon(); }

 private:
  asio_op(Op op, Handler handler, std::stop_token stop)
      : op_(std::move(op)),
        limits_(std::move(stop), {}),
        handler_(std::move(handler)),
        sched_(::asio::get_associated_executor(handler_, ::asio::system_executor())),
        work_(::asio::prefer(sched_.get_executor(), ::asio::execution::outstanding_work.tracked)) {}

  bool try_complete() noexcept override {
    if (limits_.stop_requested()) {
      result_.emplace(Op::canceled());
      return true;
    }
    if (std::optional<result_type> r = op_.try_once()) {
      result_.emplace(std::move(*r));
      return true;
    }
    return false;
  }
  void register_sources() override { detail::register_op_sources(limits_, op_, *this); }
  void unregister_sources() noexcept override {
    op_.unpark(*this);
    limits_.unregister_sources();
  }
  // Runs in a resumption that executor_scheduler posted to the handler's
  // associated executor, so this is already the handler's context (not the
  // initiating call): the handler runs here, as Asio's own operations run
  // theirs from the scheduler's queue, saving a second post per wait.
  void complete() override {
    ::asio::get_associated_cancellation_slot(handler_).clear();
    Handler handler = std::move(handler_);
    result_type result = std::move(*result_);
    auto work = std::move(work_);
    delete this;
    std::move(handler)(std::move(result));
  }

  /// For an operation completing inside the initiating call: frees the
  /// operation, then posts the handler with the outcome (a handler never runs
  /// inside the initiating function).
  void finish() {
    ::asio::get_associated_cancellation_slot(handler_).clear();
    Handler handler = std::move(handler_);
    result_type result = std::move(*result_);
    auto keep = std::move(work_);  // the work count never drops to zero in between
    delete this;
    post_result(std::move(handler), std::move(result));
  }

  /// Posts `handler(result)` to the handler's associated executor, keeping
  /// that executor's work count up until it has run.
  static void post_result(Handler handler, result_type result) {
    auto ex = ::asio::get_associated_executor(handler, ::asio::system_executor());
    auto work = ::asio::prefer(ex, ::asio::execution::outstanding_work.tracked);
    ::asio::post(ex, [h = std::move(handler), r = std::move(result), w = std::move(work)]() mutable {
      std::move(h)(std::move(r));
    });
  }

  Op op_;
  op_limits limits_;
  Handler handler_;
  executor_scheduler<executor_type> sched_;
  std::decay_t<decltype(::asio::prefer(std::declval<const executor_type&>(),
                                       ::asio::execution::outstanding_work.tracked))>
      work_;
  std::optional<result_type> result_;
};

template <class Op, class Sig>
struct asio_initiation {
  template <class Handler>
  void operator()(Handler&& handler, Op op) const {
    asio_op<Op, std::decay_t<Handler>>::start(std::move(op), std::forward<Handler>(handler));
  }
};

}  // namespace detail

/// Receives from `ch` as an Asio operation; completes with
/// `void(receive_result<T>)`: ok, closed (closed and drained) or canceled
/// (nothing taken). Allocates the pending operation when it must wait.
template <class T, class Shape, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(receive_result<T>)>
auto async_receive(channel<T, Shape>& ch, CompletionToken&& token) {
  using op = detail::channel_receive_op<T, Shape>;
  return ::asio::async_initiate<CompletionToken, void(receive_result<T>)>(
      detail::asio_initiation<op, void(receive_result<T>)>{}, token, op{&ch});
}

/// As above, on a `make_channel` receiver endpoint.
template <class T, class Shape, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(receive_result<T>)>
auto async_receive(receiver<T, Shape>& rx, CompletionToken&& token) {
  return async_receive(detail::select_access::channel_of(rx), std::forward<CompletionToken>(token));
}

/// Sends `value` (converted to a T the operation owns) as an Asio operation;
/// completes with `void(send_status)`: ok, closed or canceled (nothing sent).
template <class T, class Shape, class U, class CompletionToken>
  requires std::is_constructible_v<T, U&&> && ::asio::completion_token_for<CompletionToken, void(send_status)>
auto async_send(channel<T, Shape>& ch, U&& value, CompletionToken&& token) {
  using op = detail::channel_send_op<T, Shape, T>;
  return ::asio::async_initiate<CompletionToken, void(send_status)>(detail::asio_initiation<op, void(send_status)>{},
                                                                    token, op{&ch, T(std::forward<U>(value))});
}

/// As above, on a `make_channel` sender endpoint.
template <class T, class Shape, class U, class CompletionToken>
  requires std::is_constructible_v<T, U&&> && ::asio::completion_token_for<CompletionToken, void(send_status)>
auto async_send(sender<T, Shape>& tx, U&& value, CompletionToken&& token) {
  return async_send(detail::select_access::channel_of(tx), std::forward<U>(value),
                    std::forward<CompletionToken>(token));
}

/// Receives from a topic subscription as an Asio operation; completes with
/// `void(receive_result<delivery<T>>)`: ok, closed (topic closed and drained,
/// or the handle reset or destroyed, also while waiting) or canceled.
template <class T, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(receive_result<delivery<T>>)>
auto async_receive(subscription<T>& sub, CompletionToken&& token) {
  using op = detail::subscription_receive_op<T>;
  using sig = void(receive_result<delivery<T>>);
  // The handle is read when the operation is initiated (for a deferred
  // token, when it is launched): it must be alive then.
  return ::asio::async_initiate<CompletionToken, sig>(
      [](auto handler, subscription<T>* s) {
        detail::asio_initiation<op, sig>{}(std::move(handler), op(detail::select_access::core_of(*s)));
      },
      token, &sub);
}

POSTBOX_END_NAMESPACE
