// SPDX-License-Identifier: MIT
// co_await forms of polling stream readers and consumer group members.
#pragma once

// Design: docs/design/async.md; the machinery is in async/core.hpp.

#include <postbox/async/core.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/stream.hpp>
#include <postbox/timer_service.hpp>

#include <cstddef>
#include <optional>
#include <stop_token>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

/// A poll of a stream reader or group member (`Poller`): returns records, an
/// out_of_range, `closed` once the stream is gone and everything was read,
/// or `not_found` for a member that left. Registers on the stream's event
/// count with the asymmetric protocol (appends only load its waiter word).
/// The poll copies records, so an allocation failure while re-trying
/// terminates (the re-try is noexcept).
template <class T, class Poller>
struct stream_poll_op {
  using result_type = read_result<T>;
  Poller* poller;
  const stream_log<T>* log;
  std::size_t max;

  std::optional<result_type> try_once() noexcept {
    if (log == nullptr) return stream_status<T>(errc::not_found);
    // Read before the poll: once closed nothing is appended, so an empty
    // poll after it means drained.
    const bool was_closed = log->closed();
    read_result<T> r = poller->poll(max);
    if (!r.ok() || !r.records.empty()) return std::optional<result_type>(std::move(r));
    if (was_closed) return stream_status<T>(errc::closed);
    return std::nullopt;
  }
  void park(waker& w) {
    if (log != nullptr) log->appended().register_waker(w, true);
  }
  void unpark(waker& w) noexcept {
    if (log != nullptr) log->appended().unregister_waker(w);
  }
  static result_type canceled() noexcept { return stream_status<T>(errc::canceled); }
  static result_type timeout() noexcept { return stream_status<T>(errc::timeout); }
};

/// A stream<T>::reader (whose T is not deducible from the nested type).
template <class R>
concept stream_reader = requires { typename R::value_type; } &&
                        std::is_same_v<R, typename stream<typename R::value_type>::reader>;

template <class Reader>
using reader_poll_op = stream_poll_op<typename Reader::value_type, Reader>;
template <class T>
using member_poll_op = stream_poll_op<T, group_member<T>>;

}  // namespace detail

/// `co_await async_poll(reader, max)`: up to `max` records as reader.poll()
/// returns them, once there are any (or an out_of_range); `closed` once the
/// stream object is destroyed and this reader has read everything;
/// `canceled` (nothing read) once `stop` is stopped, before or while
/// waiting. Suspends (no thread blocks; appends pay nothing while nobody
/// waits) and resumes on the awaiting task's scheduler. Allocates the result,
/// and a registration and resume token when it suspends (plus a membarrier).
/// The reader must outlive the wait and not be used meanwhile.
template <class Reader>
  requires detail::stream_reader<Reader>
[[nodiscard]] detail::op_awaiter<detail::reader_poll_op<Reader>> async_poll(Reader& r, std::size_t max = 64,
                                                                            std::stop_token stop = {}) {
  return {{&r, detail::stream_wait_access::log_of(r), max}, {std::move(stop), {}}};
}
/// As above; `timeout` (nothing read) once `deadline` passes on `timers`' clock.
template <class Reader>
  requires detail::stream_reader<Reader>
[[nodiscard]] detail::op_awaiter<detail::reader_poll_op<Reader>> async_poll_until(Reader& r, std::size_t max,
                                                                                  timer_service& timers,
                                                                                  time_point deadline,
                                                                                  std::stop_token stop = {}) {
  return {{&r, detail::stream_wait_access::log_of(r), max}, {std::move(stop), {&timers, deadline}}};
}
/// As above, for a consumer group member's records (its assignment, as
/// group_member::poll); `not_found` at once after leave().
template <class T>
[[nodiscard]] detail::op_awaiter<detail::member_poll_op<T>> async_poll(group_member<T>& m, std::size_t max = 64,
                                                                       std::stop_token stop = {}) {
  return {{&m, detail::stream_wait_access::log_of(m), max}, {std::move(stop), {}}};
}
template <class T>
[[nodiscard]] detail::op_awaiter<detail::member_poll_op<T>> async_poll_until(group_member<T>& m, std::size_t max,
                                                                             timer_service& timers, time_point deadline,
                                                                             std::stop_token stop = {}) {
  return {{&m, detail::stream_wait_access::log_of(m), max}, {std::move(stop), {&timers, deadline}}};
}


POSTBOX_END_NAMESPACE
