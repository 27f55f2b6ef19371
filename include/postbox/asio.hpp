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
//   A channel send or receive that cannot complete at once polls the channel
//   a bounded, per-thread adaptive number of times before it suspends
//   (detail::adapter_spin); once suspended it costs no thread and no syscall.
// * Cancellation: the handler's associated cancellation slot (for example
//   from asio::bind_cancellation_slot, or awaitable operators) maps to a
//   stop request: the operation completes with `canceled` and has consumed
//   or sent nothing.
// * The same holds for async_poll (stream readers and group members),
//   async_get / async_request (request-reply), async_watch / async_wait
//   (operations) and async_sleep_until / async_sleep_for (timer service):
//   each runs the operation of its coroutine form (async.hpp and the pattern
//   headers) as an Asio operation.

#include <postbox/async.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/operations.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/settlement.hpp>
#include <postbox/stream.hpp>
#include <postbox/timer_service.hpp>

// Asio 1.22 looks for <experimental/coroutine> to enable co_await under
// clang; clang 14+ with libstdc++ has the standard <coroutine>, which Asio
// uses once it knows co_await works (as it does for g++). Include this
// header before other Asio headers so the choice is consistent.
#if defined(__clang__) && defined(__cpp_impl_coroutine) && __has_include(<coroutine>) && !defined(ASIO_HAS_CO_AWAIT)
#  define ASIO_HAS_CO_AWAIT 1
#endif

#include <asio/associated_cancellation_slot.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/post.hpp>
#include <asio/require.hpp>
#include <asio/execution/blocking.hpp>
#include <asio/execution/execute.hpp>
#include <asio/prefer.hpp>
#include <asio/system_executor.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <stop_token>
#include <tuple>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// A postbox scheduler that posts resumptions to an Asio executor: the
/// coroutine resumes on a thread running that executor (an io_context's
/// run()). `post` allocates (Asio's handler); an allocation failure there
/// terminates, since it happens inside a notifier's noexcept wake-up.
/// Thread-safe as the executor is. Must outlive the operations using it,
/// and its execution context must outlive it (declare it after its
/// io_context): its destructor waits for notifiers still inside a post into
/// it, so the coroutine such a post resumed need not wait for them.
template <class Executor>
class executor_scheduler {
 public:
  explicit executor_scheduler(Executor ex) noexcept(std::is_nothrow_move_constructible_v<Executor>)
      : ex_(std::move(ex)) {}
  executor_scheduler(const executor_scheduler&) = delete;
  executor_scheduler& operator=(const executor_scheduler&) = delete;
  ~executor_scheduler() { posts_.wait_idle(); }

  void post(resumption r) noexcept {
    ::asio::post(ex_, [r = std::move(r)]() mutable { r(); });
  }

  [[nodiscard]] const Executor& get_executor() const noexcept { return ex_; }

  /// See async_scheduler.
  [[nodiscard]] detail::post_tracker& postbox_post_tracker() noexcept { return posts_; }

 private:
  Executor ex_;
  detail::post_tracker posts_;
};

namespace detail {

/// Turns an Asio cancellation (any type) into a stop request.
struct asio_cancel_to_stop {
  std::stop_source src;
  void operator()(::asio::cancellation_type type) noexcept {
    if (type != ::asio::cancellation_type::none) src.request_stop();
  }
};

/// The resume token of an asio_op: it owns the scheduler the operation
/// posts to, a work-tracked copy of the handler's executor. A notifier's
/// deferred post keeps the token (so the executor) alive until it returns,
/// and the tracked work keeps the io_context's run() from returning
/// meanwhile, so the operation may complete and free itself while that post
/// is still in flight (no wait for it, and no count of it:
/// resume_token::owns_scheduler).
template <class Executor>
struct asio_resume_token final : resume_token {
  /// The handler's executor with blocking.never required (what asio::post
  /// requires on every call, converted once here) and outstanding work
  /// tracked.
  using tracked_executor = std::decay_t<decltype(::asio::prefer(
      ::asio::require(std::declval<const Executor&>(), ::asio::execution::blocking.never),
      ::asio::execution::outstanding_work.tracked))>;
  struct poster {
    tracked_executor ex;
    /// Queues `r` on the executor (never runs it here: blocking.never).
    void post(resumption r) noexcept {
      ::asio::execution::execute(ex, [r = std::move(r)]() mutable { r(); });
    }
  };

  asio_resume_token(async_op* o, const Executor& ex)
      : resume_token(o),
        sched{::asio::prefer(::asio::require(ex, ::asio::execution::blocking.never),
                             ::asio::execution::outstanding_work.tracked)} {
    owns_scheduler = true;
  }

  poster sched;
};

/// Whether `Op` is a channel send or receive (a plain re-try is cheap and
/// has no side effect until it succeeds): those spin briefly before they
/// suspend (see adapter_spin).
template <class Op>
inline constexpr bool spins_before_suspending = false;
template <class T, class Shape>
inline constexpr bool spins_before_suspending<channel_receive_op<T, Shape>> = true;
template <class T, class Shape, class Holder>
inline constexpr bool spins_before_suspending<channel_send_op<T, Shape, Holder>> = true;

/// A thread's adaptive budget of re-tries before an adapter channel
/// operation suspends. A wait costs a pending operation, a token, a
/// registration and, when the io_context sleeps, a futex wake-up; when the
/// other side runs on another thread (a blocking producer feeding a
/// coroutine consumer) the next item is often a few hundred nanoseconds
/// away, and a short poll takes it without suspending. A successful spin
/// doubles the budget (up to max_polls); a failed one halves it, so on one
/// thread (the peer cannot run while we spin) it falls to zero after a few
/// suspensions, and then only every probe_every-th suspension polls
/// probe_polls times to notice a change. Thread-local: no synchronization.
/// Never blocks, never allocates; the suspended operation still costs no
/// thread and no syscall.
struct adapter_spin {
  static constexpr std::uint32_t max_polls = 128;
  static constexpr std::uint32_t probe_polls = 8;
  static constexpr std::uint32_t probe_every = 64;
  std::uint32_t budget = probe_polls;
  std::uint32_t idle = 0;  // suspensions since the budget reached zero

  template <class Op>
  std::optional<typename Op::result_type> poll(Op& op) noexcept {
    std::uint32_t polls = budget;
    if (polls == 0) {
      if (++idle % probe_every != 0) return std::nullopt;
      polls = probe_polls;
    }
    for (std::uint32_t i = 0; i < polls; ++i) {
      cpu_relax();
      if (std::optional<typename Op::result_type> r = op.try_once()) {
        budget = std::min(max_polls, std::max(probe_polls, polls * 2));
        idle = 0;
        return r;
      }
    }
    budget /= 2;
    return std::nullopt;
  }
};

inline adapter_spin& this_thread_spin() noexcept {
  static thread_local adapter_spin s;
  return s;
}

/// One pending Asio operation: an async_op on the heap that owns the handler.
/// Deleted just before the handler runs (or is posted, on immediate completion).
template <class Op, class Handler>
class asio_op final : public async_op {
 public:
  using result_type = typename Op::result_type;
  using executor_type = ::asio::associated_executor_t<Handler, ::asio::system_executor>;
  using token_type = asio_resume_token<executor_type>;

  /// Tries `op` at once (then only the handler's post allocates); otherwise
  /// allocates the operation and waits.
  static void start(Op op, Handler handler, async_deadline deadline = {}) {
    // A cancellation is an event, not a state: none can be pending before
    // the slot has a handler, so the first try needs no stop check.
    if (std::optional<result_type> r = op.try_once()) {
      post_result(std::move(handler), std::move(*r));
      return;
    }
    if constexpr (spins_before_suspending<Op>) {
      if (std::optional<result_type> r = this_thread_spin().poll(op)) {
        post_result(std::move(handler), std::move(*r));
        return;
      }
    }
    auto slot = ::asio::get_associated_cancellation_slot(handler);
    std::stop_token stop;
    if (slot.is_connected()) {
      // The slot keeps its own copy of the stop source: no pointer into us.
      auto& cancel = slot.template emplace<asio_cancel_to_stop>();
      stop = cancel.src.get_token();
    }
    auto* self = new asio_op(std::move(op), std::move(handler), std::move(stop), deadline);
    if (self->try_complete()) {
      self->finish();
      return;
    }
    if (self->begin(self->token_sched_)) self->finish();
    // else armed: `self` may already be completing on another thread.
  }

  ~asio_op() { abandon(); }

 private:
  asio_op(Op op, Handler handler, std::stop_token stop, async_deadline deadline)
      : op_(std::move(op)), limits_(std::move(stop), deadline), handler_(std::move(handler)) {
    auto* t = new token_type(this, ::asio::get_associated_executor(handler_, ::asio::system_executor()));
    adopt_token(t);
    token_sched_ = scheduler_ref(t->sched);
  }

  bool try_complete() noexcept override { return detail::complete_op_once(limits_, op_, result_); }
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
    // The running resumption holds the token, whose tracked executor keeps
    // the io_context's work count up until the handler has returned.
    delete this;
    invoke(std::move(handler), std::move(result));
  }

  /// For an operation completing inside the initiating call: frees the
  /// operation, then posts the handler with the outcome (a handler never runs
  /// inside the initiating function).
  void finish() {
    ::asio::get_associated_cancellation_slot(handler_).clear();
    Handler handler = std::move(handler_);
    result_type result = std::move(*result_);
    // The token's tracked work (released by `delete this`) must not end
    // before post_result has queued the handler: `keep` bridges the two.
    auto ex = ::asio::get_associated_executor(handler, ::asio::system_executor());
    auto keep = ::asio::prefer(ex, ::asio::execution::outstanding_work.tracked);
    delete this;
    post_result(std::move(handler), std::move(result));
  }

  /// Posts `handler(result)` to the handler's associated executor. A
  /// function queued on an executor is outstanding work there until it has
  /// run (an io_context counts it), so no tracked copy rides along.
  static void post_result(Handler handler, result_type result) {
    auto ex = ::asio::get_associated_executor(handler, ::asio::system_executor());
    ::asio::post(ex, [h = std::move(handler), r = std::move(result)]() mutable { invoke(std::move(h), std::move(r)); });
  }

  /// Calls the handler with the outcome: one argument, or as the operation
  /// says (async_select completes with an exception_ptr and its result).
  static void invoke(Handler&& handler, result_type&& result) {
    if constexpr (requires { Op::complete_with(std::move(handler), std::move(result)); }) {
      Op::complete_with(std::move(handler), std::move(result));
    } else {
      std::move(handler)(std::move(result));
    }
  }

  Op op_;
  op_limits limits_;
  Handler handler_;
  scheduler_ref token_sched_;  // the token's poster (the token outlives us while a post is in flight)
  std::optional<result_type> result_;
};

template <class Op, class Sig>
struct asio_initiation {
  template <class Handler>
  void operator()(Handler&& handler, Op op, async_deadline deadline = {}) const {
    asio_op<Op, std::decay_t<Handler>>::start(std::move(op), std::forward<Handler>(handler), deadline);
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

// --- deadlines ------------------------------------------------------------------
//
// The `_until` forms take their deadline on a postbox timer_service (as the
// coroutine forms in async.hpp do), not on an Asio steady_timer: one timer
// mechanism for both layers, a manual_clock in tests, and no timer object per
// operation in the io_context. The operation completes with `timeout` (nothing
// taken or sent) once the service runs the timer set for `deadline`, or when a
// re-try finds `deadline` passed on the service's clock.

/// As async_receive(ch, token); `timeout` (nothing taken) once `deadline`
/// passes on `timers`' clock. `timers` must outlive the operation.
template <class T, class Shape, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(receive_result<T>)>
auto async_receive_until(channel<T, Shape>& ch, timer_service& timers, time_point deadline, CompletionToken&& token) {
  using op = detail::channel_receive_op<T, Shape>;
  return ::asio::async_initiate<CompletionToken, void(receive_result<T>)>(
      detail::asio_initiation<op, void(receive_result<T>)>{}, token, op{&ch}, async_deadline{&timers, deadline});
}

/// As above, on a `make_channel` receiver endpoint.
template <class T, class Shape, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(receive_result<T>)>
auto async_receive_until(receiver<T, Shape>& rx, timer_service& timers, time_point deadline,
                         CompletionToken&& token) {
  return async_receive_until(detail::select_access::channel_of(rx), timers, deadline,
                             std::forward<CompletionToken>(token));
}

/// As async_send(ch, value, token); `timeout` (nothing sent) once `deadline`
/// passes on `timers`' clock. `timers` must outlive the operation.
template <class T, class Shape, class U, class CompletionToken>
  requires std::is_constructible_v<T, U&&> && ::asio::completion_token_for<CompletionToken, void(send_status)>
auto async_send_until(channel<T, Shape>& ch, U&& value, timer_service& timers, time_point deadline,
                      CompletionToken&& token) {
  using op = detail::channel_send_op<T, Shape, T>;
  return ::asio::async_initiate<CompletionToken, void(send_status)>(
      detail::asio_initiation<op, void(send_status)>{}, token, op{&ch, T(std::forward<U>(value))},
      async_deadline{&timers, deadline});
}

/// As above, on a `make_channel` sender endpoint.
template <class T, class Shape, class U, class CompletionToken>
  requires std::is_constructible_v<T, U&&> && ::asio::completion_token_for<CompletionToken, void(send_status)>
auto async_send_until(sender<T, Shape>& tx, U&& value, timer_service& timers, time_point deadline,
                      CompletionToken&& token) {
  return async_send_until(detail::select_access::channel_of(tx), std::forward<U>(value), timers, deadline,
                          std::forward<CompletionToken>(token));
}

// --- streams, request-reply, operations, timers ----------------------------------

namespace detail {
/// Runs `op` (a postbox operation, as its awaitable form builds it) as an
/// Asio operation completing with `Sig`.
template <class Sig, class Op, class CompletionToken>
auto asio_run(CompletionToken& token, Op op, async_deadline deadline = {}) {
  return ::asio::async_initiate<CompletionToken, Sig>(asio_initiation<Op, Sig>{}, token, std::move(op), deadline);
}
}  // namespace detail

/// Polls a stream reader as an Asio operation: completes with
/// `void(read_result<T>)` once there are records (up to `max`, as
/// reader.poll()) or an out_of_range; `closed` once the stream object is
/// destroyed and everything was read; `canceled` (nothing read) on an Asio
/// cancellation. Appends pay nothing while nobody waits. The reader must
/// outlive the operation and not be used meanwhile. Allocates the result
/// (and the pending operation when it must wait).
template <class Reader, class CompletionToken>
  requires detail::stream_reader<Reader> &&
           ::asio::completion_token_for<CompletionToken, void(read_result<typename Reader::value_type>)>
auto async_poll(Reader& r, std::size_t max, CompletionToken&& token) {
  using T = typename Reader::value_type;
  return detail::asio_run<void(read_result<T>)>(token, detail::reader_poll_op<Reader>{&r, detail::stream_wait_access::log_of(r), max});
}

/// As above, for a consumer group member (its assignment); `not_found` at
/// once after leave().
template <class T, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(read_result<T>)>
auto async_poll(group_member<T>& m, std::size_t max, CompletionToken&& token) {
  return detail::asio_run<void(read_result<T>)>(token, detail::member_poll_op<T>{&m, detail::stream_wait_access::log_of(m), max});
}

/// As async_poll(reader, max, token); `timeout` (nothing read) once
/// `deadline` passes on `timers`' clock. `timers` must outlive the operation.
template <class Reader, class CompletionToken>
  requires detail::stream_reader<Reader> &&
           ::asio::completion_token_for<CompletionToken, void(read_result<typename Reader::value_type>)>
auto async_poll_until(Reader& r, std::size_t max, timer_service& timers, time_point deadline, CompletionToken&& token) {
  using T = typename Reader::value_type;
  return detail::asio_run<void(read_result<T>)>(
      token, detail::reader_poll_op<Reader>{&r, detail::stream_wait_access::log_of(r), max},
      async_deadline{&timers, deadline});
}

/// Takes the outcome of a reply future as an Asio operation; completes with
/// `void(result<V>)`, or `canceled` on an Asio cancellation (nothing taken: a
/// later get returns the outcome). One wait at a time per future; `f` must
/// be valid (else error(invalid_argument) is thrown here) and outlive the
/// operation.
template <class V, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(result<V>)>
auto async_get(reply_future<V>& f, CompletionToken&& token) {
  return detail::asio_run<void(result<V>)>(token, postbox::async_get(f).release_op());
}

/// Sends `payload` through `req` as requester::async_request does, when the
/// operation is initiated (for a deferred token: when launched), and
/// completes with `void(reply_outcome<Reply>)`: the reply, the responder's
/// error, `timeout` (after `timeout` on the requester's timer service),
/// `canceled` (requester destroyed, or an Asio cancellation: the request
/// stays pending and its outcome is dropped), or a refusal (busy, full,
/// closed) at once. `req` must outlive the operation. Allocates.
template <class Request, class Reply, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(reply_outcome<Reply>)>
auto async_request(requester<Request, Reply>& req, std::type_identity_t<Request> payload, duration timeout,
                   CompletionToken&& token) {
  using sig = void(reply_outcome<Reply>);
  using op = detail::request_op<Reply>;
  return ::asio::async_initiate<CompletionToken, sig>(
      [](auto handler, requester<Request, Reply>* rq, Request p, duration to) {
        detail::asio_initiation<op, sig>{}(std::move(handler), rq->async_request(std::move(p), to).release_op());
      },
      token, &req, std::move(payload), timeout);
}

/// operations::async_watch as an Asio operation: completes with
/// `void(result<operation_snapshot<Result>>)`: the first snapshot of
/// `caller`'s operation `id` above `after_version` (or a terminal one),
/// `not_found`, `stopped` (tracker shutting down), or `canceled` on an Asio
/// cancellation. `ops` must outlive the operation. Allocates.
template <class Result, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(result<operation_snapshot<Result>>)>
auto async_watch(operations<Result>& ops, const operation_caller& caller, const std::string& id,
                 std::uint64_t after_version, CompletionToken&& token) {
  return detail::asio_run<void(result<operation_snapshot<Result>>)>(
      token, ops.async_watch(caller, id, after_version).release_op());
}

/// operations::async_wait as an Asio operation: the terminal snapshot, or
/// the outcomes of async_watch.
template <class Result, class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(result<operation_snapshot<Result>>)>
auto async_wait(operations<Result>& ops, const operation_caller& caller, const std::string& id,
                CompletionToken&& token) {
  return detail::asio_run<void(result<operation_snapshot<Result>>)>(token, ops.async_wait(caller, id).release_op());
}

/// Completes with `void(errc)`: `ok` once `timers` has run the timer set for
/// `at` (posted at once when `at` has passed on its clock), `canceled` on an
/// Asio cancellation (the timer is withdrawn). `timers` must outlive the
/// operation. Allocates one timer and the pending operation.
template <class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(errc)>
auto async_sleep_until(timer_service& timers, time_point at, CompletionToken&& token) {
  return detail::asio_run<void(errc)>(token, detail::sleep_op{}, async_deadline{&timers, at});
}

/// As async_sleep_until, `delay` from now on the timer service's clock
/// (read when called).
template <class CompletionToken>
  requires ::asio::completion_token_for<CompletionToken, void(errc)>
auto async_sleep_for(timer_service& timers, duration delay, CompletionToken&& token) {
  return async_sleep_until(timers, timers.get_clock().now() + delay, std::forward<CompletionToken>(token));
}

// --- select -----------------------------------------------------------------------

namespace detail {

template <class Tuple, std::size_t... I>
constexpr bool leading_select_cases(std::index_sequence<I...>) {
  return (is_async_select_case<std::remove_cvref_t<std::tuple_element_t<I, Tuple>>> && ...);
}

/// Arguments of the Asio async_select: one or more cases, then a token.
template <class... Args>
concept asio_select_args =
    sizeof...(Args) >= 2 &&
    leading_select_cases<std::tuple<Args...>>(std::make_index_sequence<sizeof...(Args) - 1>{}) &&
    !is_select_case<std::remove_cvref_t<std::tuple_element_t<sizeof...(Args) - 1, std::tuple<Args...>>>>;

using asio_select_signature = void(std::exception_ptr, select_result);

template <class Tuple, std::size_t... I>
auto initiate_select(timer_service* timers, const clock& clk, async_deadline deadline, Tuple&& all,
                     std::index_sequence<I...>) {
  using op = select_op<async_case_t<std::tuple_element_t<I, std::remove_reference_t<Tuple>>>...>;
  using token_type = std::tuple_element_t<sizeof...(I), std::remove_reference_t<Tuple>>;
  return ::asio::async_initiate<token_type, asio_select_signature>(
      asio_initiation<op, asio_select_signature>{}, std::get<sizeof...(I)>(all),
      op(timers, clk, std::get<I>(std::move(all))...), deadline);
}

}  // namespace detail

/// The Asio form of postbox::select: `async_select(case..., token)` waits
/// until one channel or subscription case can complete, completes exactly
/// that one (its handler runs on the completion's executor, or in the
/// initiating call if a case is ready at once) and completes with
/// `void(std::exception_ptr, select_result)`: the exception a case's handler
/// threw (the case has completed), else null. use_awaitable rethrows it.
/// Cancellation (the token's slot) completes with `canceled`, consuming and
/// sending nothing. Cases: on_receive/on_send on channels and endpoints,
/// on_receive on topic subscriptions (as in the coroutine async_select: the
/// case ends `closed` when the handle is reset or destroyed or the topic is
/// closed or destroyed, also while pending), timer cases with the form
/// taking a timer service. Allocates the pending operation when it must wait.
template <class... Args>
  requires detail::asio_select_args<Args...>
auto async_select(Args&&... args) {
  return detail::initiate_select(nullptr, default_clock(), {}, std::forward_as_tuple(std::forward<Args>(args)...),
                                 std::make_index_sequence<sizeof...(Args) - 1>{});
}

/// As above, with after/ticker cases and `options.deadline` (`timeout`) run
/// by `timers` on its clock (`options.clock` must be null or that clock).
/// The delays of `after` count from this call. Cancel through the token's
/// cancellation slot: a stoppable `options.stop` throws
/// error(invalid_argument) here (Asio has its own cancellation).
template <class... Args>
  requires detail::asio_select_args<Args...>
auto async_select(timer_service& timers, const select_options& options, Args&&... args) {
  if (options.stop.stop_possible())
    POSTBOX_THROW(error(errc::invalid_argument, "postbox::async_select (Asio): cancel through the completion "
                                                "token's cancellation slot, not select_options::stop"));
  return detail::initiate_select(&timers, detail::select_clock(timers, options), {&timers, options.deadline},
                                 std::forward_as_tuple(std::forward<Args>(args)...),
                                 std::make_index_sequence<sizeof...(Args) - 1>{});
}

// --- consumer handlers as asio::awaitable ---------------------------------------------

class consume_context;  // consumer.hpp

namespace detail {

/// What the spawned awaitable hands to the consumer's task.
struct awaitable_outcome {
  std::exception_ptr error;
  settlement result;
};

/// Shared by one handler run's task and its spawned awaitable: the
/// envelope the awaitable reads (a copy, alive as long as either side), the
/// outcome hand-off, and the cancellation signal the task emits (on the
/// executor) if it is destroyed before the awaitable completes.
template <class T>
struct awaitable_run {
  awaitable_run(const envelope<T>& e, std::shared_ptr<void> h) : env(e), handler(std::move(h)) {}
  envelope<T> env;
  /// The handler object: a coroutine lambda's frame refers to its captures
  /// through it, so it must live as long as the awaitable, also after the
  /// consumer holding the awaitable_handler is gone.
  std::shared_ptr<void> handler;
  channel<awaitable_outcome> done{1};
  ::asio::cancellation_signal cancel;  // used on the executor's thread only
};

/// The consumer's task for one awaitable handler run: spawns the awaitable
/// on `ex` and waits (suspended) for its outcome.
template <class Executor, class T, class Awaitable>
task<settlement> await_on(Executor ex, std::shared_ptr<awaitable_run<T>> run, Awaitable a) {
  struct cancel_if_abandoned {
    Executor ex;
    std::shared_ptr<awaitable_run<T>> run;
    bool armed = true;
    ~cancel_if_abandoned() {
      if (!armed) return;
      POSTBOX_TRY {
        ::asio::post(ex, [r = run] { r->cancel.emit(::asio::cancellation_type::terminal); });
      }
      POSTBOX_CATCH_ALL {}
    }
  } guard{ex, run};
  ::asio::co_spawn(ex, std::move(a),
                   ::asio::bind_cancellation_slot(run->cancel.slot(), [r = run](std::exception_ptr e, settlement s) {
                     // Capacity 1, one completion: never full.
                     (void)r->done.try_send(awaitable_outcome{std::move(e), std::move(s)});
                   }));
  receive_result<awaitable_outcome> out = co_await async_receive(run->done);
  guard.armed = false;
  if (out->error) std::rethrow_exception(out->error);
  co_return std::move(out->result);
}

template <class H, class T>
concept awaitable_handler_with_context = std::is_invocable_v<H&, const envelope<T>&, consume_context&>;

}  // namespace detail

/// A consumer handler that runs `handler`, a coroutine returning
/// `asio::awaitable<settlement>` and callable as `(const envelope<T>&)` or
/// `(const envelope<T>&, consume_context&)`, on `ex` (co_spawn), and settles
/// with its result: pass it where a consumer takes a handler, with
/// `consumer_options::scheduler` set (for instance an executor_scheduler on
/// the same io_context). It is a postbox coroutine handler (task<settlement>),
/// so max_in_flight, per-key order, retries and exception classification are
/// unchanged; an exception from the awaitable is the handler's exception.
/// The awaitable reads a copy of the envelope, and the handler object (a
/// lambda's captures) is kept alive until it completes; the consume_context is valid
/// until the awaitable completes or is canceled: when the consumer is
/// destroyed with the handler still running, a terminal cancellation is
/// emitted on `ex` and the awaitable must not touch the context after it.
/// Allocates per delivery (the spawned frame and the shared run state).
template <class Executor, class H>
class awaitable_handler {
 public:
  awaitable_handler(Executor ex, H handler) : ex_(std::move(ex)), h_(std::make_shared<H>(std::move(handler))) {}

  template <class T>
    requires(detail::awaitable_handler_with_context<H, T> || std::is_invocable_v<H&, const envelope<T>&>)
  task<settlement> operator()(const envelope<T>& env, consume_context& ctx) {
    auto run = std::make_shared<detail::awaitable_run<T>>(env, h_);
    if constexpr (detail::awaitable_handler_with_context<H, T>) {
      return detail::await_on(ex_, run, (*h_)(run->env, ctx));
    } else {
      return detail::await_on(ex_, run, (*h_)(run->env));
    }
  }

 private:
  Executor ex_;
  std::shared_ptr<H> h_;  // shared with every run still going (see awaitable_run::handler)
};


POSTBOX_END_NAMESPACE
