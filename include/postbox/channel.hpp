// SPDX-License-Identifier: MIT
// postbox::channel: a bounded, lock-free, typed point-to-point queue with competing consumers.
#pragma once

#include <postbox/config.hpp>
#include <postbox/detail/asymmetric_fence.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/event_count.hpp>
#include <postbox/detail/relocation.hpp>
#include <postbox/error.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <new>
#include <optional>
#include <stop_token>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// Channel shapes: how many threads may send and receive at once. A shape
/// with "s" on a side lets that side skip compare-and-swap retries; using it
/// from two threads at once on that side is undefined behaviour.
struct spsc {
  static constexpr bool multi_producer = false;
  static constexpr bool multi_consumer = false;
};
struct mpsc {
  static constexpr bool multi_producer = true;
  static constexpr bool multi_consumer = false;
};
struct spmc {
  static constexpr bool multi_producer = false;
  static constexpr bool multi_consumer = true;
};
struct mpmc {
  static constexpr bool multi_producer = true;
  static constexpr bool multi_consumer = true;
};

/// One of the four shape tags.
template <class S>
concept channel_shape = std::is_same_v<S, spsc> || std::is_same_v<S, mpsc> || std::is_same_v<S, spmc> ||
                        std::is_same_v<S, mpmc>;

/// A point-in-time snapshot of a channel's counters. Derived from the ring's
/// own indices, so keeping it costs the fast path nothing.
struct channel_stats {
  std::size_t depth = 0;       ///< messages queued (claimed by senders, not yet by receivers)
  std::size_t capacity = 0;    ///< slots
  std::uint64_t sent = 0;      ///< successful sends since construction
  std::uint64_t received = 0;  ///< successful receives since construction
  bool closed = false;
};

namespace detail {

/// Tickets are 63-bit counters that wrap; the tail index keeps a ticket in
/// its upper 63 bits and the "closed" mark in bit 0, so one compare-and-swap
/// both claims a slot and proves the channel was open at that instant.
inline constexpr std::uint64_t ticket_mask = (std::uint64_t{1} << 63) - 1;

/// a - b for 63-bit wrapping tickets, as a signed distance.
[[nodiscard]] constexpr std::int64_t ticket_distance(std::uint64_t a, std::uint64_t b) noexcept {
  return static_cast<std::int64_t>((a - b) << 1) >> 1;
}
[[nodiscard]] constexpr std::uint64_t ticket_add(std::uint64_t a, std::uint64_t n) noexcept {
  return (a + n) & ticket_mask;
}

/// Test hook: start the ticket counters at `value` (e.g. just below the wrap).
struct initial_ticket {
  std::uint64_t value = 0;
};

/// The rings' slot array: `n` default-constructed elements made with `new[]`
/// (which honours an over-aligned element type) and freed with `delete[]`.
/// Not copyable or movable. Our own type rather than `std::unique_ptr<T[]>`
/// so that channel.hpp need not include <memory> (issue 17: compile time).
template <class E>
class owned_array {
 public:
  /// Allocates; throws std::bad_alloc when out of memory.
  explicit owned_array(std::size_t n) : p_(new E[n]) {}
  owned_array(const owned_array&) = delete;
  owned_array& operator=(const owned_array&) = delete;
  ~owned_array() { delete[] p_; }

  /// Element `i`; as `std::unique_ptr<T[]>`, constness is not deep.
  [[nodiscard]] E& operator[](std::size_t i) const noexcept { return p_[i]; }

 private:
  E* const p_;
};

#if defined(POSTBOX_CHANNEL_TEST_HOOKS)
/// Test hook, compiled only when a test defines POSTBOX_CHANNEL_TEST_HOOKS
/// before including channel.hpp: called by a send after it knows the
/// channel was open (the multi-producer claim, or the spsc open check) and
/// before it publishes, so a test can hold a sender exactly there.
inline void (*after_open_check_hook)() = nullptr;
inline void after_open_check() {
  if (after_open_check_hook != nullptr) after_open_check_hook();
}
#else
inline void after_open_check() noexcept {}
#endif

/// Slot states are counted in half-steps of a ticket: `free_state(t)` = 2t
/// (free for the sender holding ticket t) and `full_state(t)` = 2t + 1 (holds
/// the message of ticket t). With whole steps, "full for t" and "free for
/// t + 1" would be the same number when capacity is 1, and a sender could
/// overwrite an unread message; half-steps keep every state distinct for any
/// capacity. 63-bit tickets doubled wrap exactly at 2^64.
[[nodiscard]] constexpr std::uint64_t free_state(std::uint64_t ticket) noexcept { return ticket << 1; }
[[nodiscard]] constexpr std::uint64_t full_state(std::uint64_t ticket) noexcept { return (ticket << 1) | 1; }
/// Signed distance between two slot states.
[[nodiscard]] constexpr std::int64_t state_distance(std::uint64_t a, std::uint64_t b) noexcept {
  return static_cast<std::int64_t>(a - b);
}

template <class T>
struct channel_slot {
  /// Slot state (see free_state/full_state). Written with release by the
  /// sender (publish, to full_state(t); pairs with the acquire load in
  /// claim_receive) and by the receiver (to free_state(t + capacity); pairs
  /// with the acquire load in claim_send). The release/acquire pair hands the
  /// storage from one side to the other, so construction and destruction of
  /// T never race.
  std::atomic<std::uint64_t> seq;
  alignas(T) unsigned char storage[sizeof(T)];

  T* value() noexcept { return std::launder(reinterpret_cast<T*>(storage)); }
};

enum class claim_status { ok, full, empty, closed };

[[nodiscard]] inline std::size_t round_up_capacity(std::size_t requested) {
  if (requested == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::channel capacity must be at least 1"));
  if (requested > (std::size_t{1} << 40))
    POSTBOX_THROW(error(errc::invalid_argument, "postbox::channel capacity above 2^40 slots"));
  std::size_t cap = 1;
  while (cap < requested) cap <<= 1;
  return cap;
}

}  // namespace detail

namespace detail {

struct select_access;  // select.hpp: registers a select's waker with a ring's event counts

/// Lets postbox's own wrappers (topic subscriptions) wait with more than one
/// stop token; not part of the public API.
struct channel_access {
  template <class Channel>
  static auto receive_blocking(Channel& ch, std::optional<std::chrono::steady_clock::time_point> deadline,
                               stop_tokens stops) {
    return ch.receive_blocking(deadline, stops);
  }
  /// receive_quiet(): claim and take, with no notify of parked senders (the
  /// topic's queue notifies them itself, inline in its receive).
  template <class Channel>
  static auto try_receive_quiet(Channel& ch) noexcept {
    return ch.receive_quiet();
  }
  /// room_for() of the general ring (mpmc, mpsc, spmc).
  template <class Channel>
  static bool room_for(const Channel& ch, std::size_t n) noexcept {
    return ch.room_for(n);
  }
  /// The event count receivers of `ch` park on.
  template <class Channel>
  static event_count& not_empty(Channel& ch) noexcept {
    return ch.not_empty_;
  }
  /// The event count senders of `ch` park on.
  template <class Channel>
  static event_count& not_full(Channel& ch) noexcept {
    return ch.not_full_;
  }
};

/// The public operations every channel ring shares: the non-blocking forms,
/// the batch forms and the spin-then-park blocking loops, written once over
/// a ring's hooks (CRTP, no virtual calls). `Ring` provides:
///   send_status emplace_quiet(args...)  nothrow construction: claim, build, publish
///   receive_result<T> receive_quiet()   claim and take; empty/closed otherwise
///   not_empty_, not_full_               the event counts receivers and senders park on
///   asymmetric_waits                    true: parking pays a heavy fence and
///                                       notifiers a light one (event_count's
///                                       asymmetric protocol, sole-waiter
///                                       form: one wake per park); false: the
///                                       ring's own seq_cst RMWs pair with
///                                       the event count (armed protocol:
///                                       one wake of all sleepers per park)
template <class Ring, class T>
class channel_api {
  friend struct channel_access;

 public:
  // --- sending --------------------------------------------------------------

  /// Sends without waiting: `ok`, `full` or `closed`. Moves from `value` only
  /// on `ok`. Lock-free; never allocates (beyond what constructing T does).
  /// Thread-safe per the shape. If constructing T from U may throw, T is
  /// built before the slot is claimed (a throw leaves the channel untouched).
  template <class U>
    requires std::is_constructible_v<T, U&&>
  [[nodiscard]] send_status try_send(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
    const send_status status = try_send_quiet(std::forward<U>(value));
    if (status == send_status::ok) wake_receivers(1);
    return status;
  }

  /// Constructs the message in place from `args` if there is room.
  template <class... Args>
    requires std::is_constructible_v<T, Args&&...>
  [[nodiscard]] send_status try_emplace(Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args&&...>) {
    if constexpr (std::is_nothrow_constructible_v<T, Args&&...>) {
      const send_status status = ring().emplace_quiet(std::forward<Args>(args)...);
      if (status == send_status::ok) wake_receivers(1);
      return status;
    } else {
      return try_send(T(std::forward<Args>(args)...));
    }
  }

  /// Sends, blocking while the channel is full: `ok` or `closed`.
  /// Spins briefly, then parks. Thread-safe per the shape.
  template <class U>
    requires std::is_constructible_v<T, U&&>
  send_status send(U&& value) {
    return send_blocking(std::forward<U>(value), std::nullopt);
  }

  /// As `send`, also returning `canceled` (nothing sent, `value` untouched)
  /// once `stop` is stopped: before the call, or while it waits.
  template <class U>
    requires std::is_constructible_v<T, U&&>
  send_status send(U&& value, std::stop_token stop) {
    return send_blocking(std::forward<U>(value), std::nullopt, stop_tokens{&stop});
  }

  /// As `send`, giving up after `timeout` (returns `timeout`); with `stop`,
  /// also `canceled`.
  template <class U, class Rep, class Period>
    requires std::is_constructible_v<T, U&&>
  send_status send_for(U&& value, std::chrono::duration<Rep, Period> timeout, std::stop_token stop = {}) {
    return send_until(std::forward<U>(value), std::chrono::steady_clock::now() + timeout, std::move(stop));
  }

  /// As `send`, giving up at `deadline` (returns `timeout`); with `stop`,
  /// also `canceled`.
  template <class U, class Clock, class Duration>
    requires std::is_constructible_v<T, U&&>
  send_status send_until(U&& value, std::chrono::time_point<Clock, Duration> deadline, std::stop_token stop = {}) {
    return send_blocking(std::forward<U>(value), to_steady_deadline(deadline), stop_tokens{&stop});
  }

  /// Sends a prefix of [first, last) without waiting, moving from each element
  /// sent; returns how many were sent (stops at the first full/closed).
  /// Wakes parked receivers once for the whole batch.
  template <class InputIt>
  std::size_t try_send_batch(InputIt first, InputIt last) {
    std::size_t sent = 0;
    for (; first != last; ++first) {
      if (try_send_quiet(std::move(*first)) != send_status::ok) break;
      ++sent;
    }
    if (sent != 0) wake_receivers(sent > 1 ? static_cast<int>(sent) : 1);
    return sent;
  }

  // --- receiving ------------------------------------------------------------

  /// Receives without waiting; empty optional if nothing is queued (or the
  /// channel is closed and drained). Lock-free, never allocates.
  /// Thread-safe per the shape.
  [[nodiscard]] std::optional<T> try_receive() noexcept {
    return to_optional(try_receive_result());
  }

  /// Receives without waiting and says why nothing came: `empty` or `closed`.
  [[nodiscard]] receive_result<T> try_receive_result() noexcept {
    receive_result<T> out = ring().receive_quiet();
    if (out.has_value()) wake_senders(1);
    return out;
  }

  /// Receives, blocking while the channel is empty; an empty optional only
  /// once the channel is closed and drained.
  [[nodiscard]] std::optional<T> receive() { return to_optional(receive_blocking(std::nullopt)); }

  /// As `receive`, also returning an empty optional (nothing taken) once
  /// `stop` is stopped, before the call or while it waits; tell that from
  /// closed with `stop.stop_requested()` or use `receive_until(max, stop)`.
  [[nodiscard]] std::optional<T> receive(std::stop_token stop) {
    return to_optional(receive_blocking(std::nullopt, stop_tokens{&stop}));
  }

  /// As `receive`, giving up after `timeout`: status ok, closed or timeout
  /// (and `canceled`, nothing taken, once `stop` is stopped).
  template <class Rep, class Period>
  [[nodiscard]] receive_result<T> receive_for(std::chrono::duration<Rep, Period> timeout, std::stop_token stop = {}) {
    return receive_until(std::chrono::steady_clock::now() + timeout, std::move(stop));
  }

  /// As `receive`, giving up at `deadline`: status ok, closed or timeout
  /// (and `canceled`, nothing taken, once `stop` is stopped).
  template <class Clock, class Duration>
  [[nodiscard]] receive_result<T> receive_until(std::chrono::time_point<Clock, Duration> deadline,
                                                std::stop_token stop = {}) {
    return receive_blocking(to_steady_deadline(deadline), stop_tokens{&stop});
  }

  /// Receives up to `max` messages without waiting, writing them to `out`;
  /// returns how many. Wakes parked senders once for the batch.
  template <class OutputIt>
  std::size_t try_receive_batch(OutputIt out, std::size_t max) {
    std::size_t got = 0;
    while (got < max) {
      receive_result<T> r = ring().receive_quiet();
      if (!r.has_value()) break;
      *out = std::move(*r);
      ++out;
      ++got;
    }
    if (got != 0) wake_senders(got > 1 ? static_cast<int>(got) : 1);
    return got;
  }

  /// Waits until at least one message is queued, then takes up to `max`
  /// without waiting for more, writing them to `out` (tokio's recv_many).
  /// Returns how many (>= 1), or `closed` (closed and drained), `timeout`
  /// (`deadline` passed first) or `canceled` (`stop`), having taken nothing.
  /// Blocks; allocates nothing. Thread-safe per the shape.
  template <class OutputIt, class Clock, class Duration>
  [[nodiscard]] result<std::size_t, receive_status> receive_many(OutputIt out, std::size_t max,
                                                                 std::chrono::time_point<Clock, Duration> deadline,
                                                                 std::stop_token stop = {}) {
    return receive_many_until(out, max, to_steady_deadline(deadline), stop_tokens{&stop});
  }

  /// As above with no deadline: waits until a message, close or stop.
  template <class OutputIt>
  [[nodiscard]] result<std::size_t, receive_status> receive_many(OutputIt out, std::size_t max,
                                                                 std::stop_token stop = {}) {
    return receive_many_until(out, max, std::nullopt, stop_tokens{&stop});
  }

 protected:
  channel_api() = default;
  ~channel_api() = default;

 private:
  Ring& ring() noexcept { return static_cast<Ring&>(*this); }

  template <class OutputIt>
  result<std::size_t, receive_status> receive_many_until(OutputIt out, std::size_t max,
                                                         std::optional<std::chrono::steady_clock::time_point> deadline,
                                                         stop_tokens stops) {
    if (max == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::channel::receive_many: max must be at least 1"));
    receive_result<T> first = receive_blocking(deadline, stops);
    if (!first.has_value()) return first.status();
    *out = std::move(*first);
    ++out;
    return 1 + try_receive_batch(out, max - 1);
  }

  template <class U>
  send_status try_send_quiet(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
    if constexpr (std::is_nothrow_constructible_v<T, U&&>) {
      return ring().emplace_quiet(std::forward<U>(value));
    } else {
      // Construct first: a throwing conversion must not strand a claimed slot.
      T converted(std::forward<U>(value));
      return ring().emplace_quiet(std::move(converted));
    }
  }

  void wake_receivers(int n) noexcept {
    if constexpr (Ring::asymmetric_waits) {
      ring().not_empty_.notify_light_sole(n);
    } else {
      ring().not_empty_.notify_armed(n);
    }
  }
  void wake_senders(int n) noexcept {
    if constexpr (Ring::asymmetric_waits) {
      ring().not_full_.notify_light_sole(n);
    } else {
      ring().not_full_.notify_armed(n);
    }
  }
  static std::uint32_t prepare(event_count& ec) noexcept {
    if constexpr (Ring::asymmetric_waits) {
      // One receiving and one sending thread: each event count has a sole
      // waiting thread, which gets one futex wake per wait (event_count::
      // prepare_wait_sole).
      return ec.prepare_wait_sole();
    } else {
      // Any number of waiting threads per side: each park arms the event
      // count, and the first notify after it wakes every sleeper once
      // (event_count::prepare_wait_armed), not one syscall per message.
      return ec.prepare_wait_armed();
    }
  }

  /// Pauses between two tries while a blocking call spins (detail::
  /// spin_until). A hand-off between two running threads takes about 100 ns
  /// (4 pauses): checking every pause noticed it soonest. Blocking ping-pong,
  /// 15 alternating runs at load 2 (b1-probe, spsc, median ns per round
  /// trip): doubling runs (backoff::snooze) 546, every 4 pauses 611, every
  /// 2: 449, every pause 345; blocking 1P1C was the same for 1, 2 and 4.
  static constexpr unsigned spin_step = 1;

  /// Pauses in a row with no move of the other side's index after which a
  /// waiting thread of the general ring (mpmc, mpsc, spmc) stops spinning
  /// and yields (detail::spin_until_idle). About 0.8 us at 48 ns a pause:
  /// twice the blocking mpmc ping-pong's round trip, so a partner running
  /// on another core is still waited for by spinning, while one that shares
  /// this core (four threads on two cores in MPMC 2P2C) gets it after 16
  /// pauses rather than after the whole 128-pause spin (6 us).
  static constexpr unsigned idle_pauses = 16;

  /// The spin of a blocking wait, before parking; `ready()` tries the
  /// operation. The spsc ring spins its whole budget (its one partner is
  /// on another core or parked); the general ring gives up early when the
  /// other side's index stands still (see idle_pauses). Never blocks beyond
  /// yielding.
  template <bool Sending, class Ready>
  bool spin(Ready&& ready) {
    if constexpr (Ring::asymmetric_waits) {
      return spin_until<spin_step>(ready);
    } else {
      return spin_until_idle<idle_pauses>(ready, [this]() noexcept { return ring().wait_progress(Sending); });
    }
  }

  /// The optional the optional-returning receives give back, built from the
  /// result's value (detail::slot_relocation: for an envelope, a move of the
  /// strings that are set only). A trivially copyable T takes the result's
  /// own optional: built in place, the u64 mpmc try_receive took 1.5
  /// instructions more per message (callgrind).
  static std::optional<T> to_optional(receive_result<T>&& r) noexcept {
    if constexpr (std::is_trivially_copyable_v<T>) {
      return std::move(r).optional();
    } else {
      if (!r.has_value()) return std::nullopt;
      return std::optional<T>(std::in_place, detail::slot_relocation<T>::source(*r));
    }
  }

  /// stop_tokens::stop_requested(), inline: with no token (send(), receive())
  /// it folds away; out of line it cost every blocking call a call.
  [[gnu::always_inline]] static bool stop_now(const stop_tokens& stops) noexcept {
    return (stops.first != nullptr && stops.first->stop_requested()) ||
           (stops.second != nullptr && stops.second->stop_requested());
  }

  // The blocking calls are the try path inline (plus a stop check that folds
  // away without a token) and, once it finds the channel full or empty, an
  // out-of-line wait: the wait's several retries made g++ keep the try path
  // itself out of line (callgrind, channel_bench --profile send spsc: 83
  // instructions per message against try_send's 35).
  template <class U>
  send_status send_blocking(U&& value, std::optional<std::chrono::steady_clock::time_point> deadline,
                            stop_tokens stops = {}) {
    if constexpr (!std::is_nothrow_constructible_v<T, U&&>) {
      T converted(std::forward<U>(value));
      return send_blocking(std::move(converted), deadline, stops);
    } else {
      if (POSTBOX_UNLIKELY(stop_now(stops))) return send_status::canceled;
      const send_status s = ring().emplace_quiet(std::forward<U>(value));
      if (POSTBOX_LIKELY(s == send_status::ok)) {
        wake_receivers(1);
        return s;
      }
      if (s != send_status::full) return s;
      return send_wait(std::forward<U>(value), deadline, stops);
    }
  }

  /// send_blocking() once the channel was found full: spins (checking every
  /// few pauses, detail::spin_until), then parks. The stop callback is
  /// registered only right before the first park: a wait the spin ends
  /// makes no RMW on the token.
  template <class U>
  [[gnu::noinline]] send_status send_wait(U&& value, std::optional<std::chrono::steady_clock::time_point> deadline,
                                          stop_tokens stops) {
    send_status s = send_status::full;
    cpu_relax();  // the try just failed: pause before the first re-check
    const bool done = spin<true>([&] {
      if (stop_now(stops)) return true;
      // A ring that can tell (the spsc ring) keeps a sender that found it
      // full spinning until the receiver has freed a batch of slots, not
      // just one: refilling each slot as soon as it frees hands that slot's
      // cache line between the two cores once per message. The try before
      // parking below ignores the batch, so the batch never costs a park.
      if constexpr (requires(Ring& r) { r.room_ahead(); }) {
        if (!ring().room_ahead()) return false;
      }
      s = try_send(std::forward<U>(value));
      return s != send_status::full;
    });
    if (done) return s != send_status::full ? s : send_status::canceled;
    stop_wakeup wakeup;
    for (;;) {
      wakeup.arm(ring().not_full_, stops);
      const std::uint32_t key = prepare(ring().not_full_);
      s = try_send(std::forward<U>(value));
      if (s != send_status::full || stop_now(stops)) {
        ring().not_full_.finish_wait();
        return s != send_status::full ? s : send_status::canceled;
      }
      const bool woke = ring().not_full_.wait(key, deadline);
      ring().not_full_.finish_wait();
      s = try_send(std::forward<U>(value));
      if (s != send_status::full) return s;
      if (!woke) return send_status::timeout;
      if (stop_now(stops)) return send_status::canceled;
    }
  }

  // Never reassigns a result (T need not be move-assignable): each outcome is
  // returned from where it was produced.
  receive_result<T> receive_blocking(std::optional<std::chrono::steady_clock::time_point> deadline,
                                     stop_tokens stops = {}) {
    // One named result, returned in place (a status return beside it kept
    // g++ from eliding it: one more move of T per receive); a wait's result
    // replaces it.
    receive_result<T> r = POSTBOX_UNLIKELY(stop_now(stops)) ? receive_result<T>(receive_status::canceled)
                                                            : ring().receive_quiet();
    if (POSTBOX_LIKELY(r.has_value())) {
      wake_senders(1);
    } else if (r.status() == receive_status::empty) {
      detail::replace_result(r, receive_wait(deadline, stops));
    }
    return r;
  }

  /// receive_blocking() once the channel was found empty: spins (checking
  /// every few pauses, detail::spin_until), then parks; the stop callback is
  /// registered only right before the first park.
  [[gnu::noinline]] receive_result<T> receive_wait(std::optional<std::chrono::steady_clock::time_point> deadline,
                                                   stop_tokens stops) {
    // try_receive_result() without the call: one more caller of it made g++
    // keep it out of line in try_receive() too (mpmc: +2.5 instructions).
    auto take = [this]() noexcept {
      receive_result<T> out = ring().receive_quiet();
      if (out.has_value()) wake_senders(1);
      return out;
    };
    {
      std::optional<receive_result<T>> got;
      unsigned polls = 0;
      cpu_relax();  // the try just failed: pause before the first re-check
      const bool done = spin<false>([&] {
        if (stop_now(stops)) return true;
        if constexpr (requires(const Ring& r) { r.head_looks_published(); }) {
          // A single-consumer ring: try once the head slot looks published,
          // and on every eighth poll (Ring::head_looks_published).
          if (!ring().head_looks_published() && (++polls & 7) != 0) return false;
        }
        receive_result<T> r = take();
        if (r.status() == receive_status::empty) return false;
        got.emplace(std::move(r));
        return true;
      });
      if (done) {
        if (got) return std::move(*got);
        return receive_status::canceled;
      }
    }
    stop_wakeup wakeup;
    for (;;) {
      wakeup.arm(ring().not_empty_, stops);
      const std::uint32_t key = prepare(ring().not_empty_);
      {
        receive_result<T> r = take();
        if (r.status() != receive_status::empty) {
          ring().not_empty_.finish_wait();
          return r;
        }
      }
      if (stop_now(stops)) {
        ring().not_empty_.finish_wait();
        return receive_status::canceled;
      }
      const bool woke = ring().not_empty_.wait(key, deadline);
      ring().not_empty_.finish_wait();
      {
        receive_result<T> r = take();
        if (r.status() != receive_status::empty) return r;
      }
      if (!woke) return receive_status::timeout;
      if (stop_now(stops)) return receive_status::canceled;
    }
  }

};

}  // namespace detail

/// A bounded multi/single-producer, multi/single-consumer channel.
///
/// **Algorithm.** A ring of `capacity()` slots, each with a sequence number
/// (Vyukov's bounded queue, in the form crossbeam's array channel uses).
/// Senders claim ticket `t` by advancing `tail_` with one compare-and-swap,
/// construct the message in slot `t % capacity`, and publish it by storing
/// "full for t" into the slot's sequence. Receivers claim ticket `h` from
/// `head_` once the slot at `h` is published, move the message out, and free
/// the slot for the next lap by storing "free for h + capacity". States count
/// in half-tickets so that capacity 1 is unambiguous (see detail::free_state).
///
/// **Linearizable emptiness.** A plain Vyukov ring reports "empty" whenever
/// the slot at the head is not yet published, even if a *later* sender has
/// already completed: sender A claims ticket 5 and is preempted, sender B
/// claims 6 and returns; a receiver looking at slot 5 says "empty" while B's
/// message waits. postbox never does that: when the head slot is unpublished,
/// `try_receive` reads `tail_`, and reports empty (or closed) only if no
/// ticket has been claimed past the head, that is, only when the channel
/// really is empty at the instant of that read. Otherwise a send is in flight
/// (claimed, constructing) and the receiver backs off briefly until it is
/// published. The same rule makes `full` exact: `try_send` reports full only
/// when `tail - head == capacity` at the instant it reads `head_`.
///
/// **Closing.** `close()` sets bit 0 of `tail_`. A send's claim is a CAS that
/// expects that bit clear, so every send either completed its claim before
/// the close (and will be received) or fails with `closed`. Receivers drain,
/// then see `closed` once the head reaches the final tail.
///
/// **Waiting.** Blocking calls spin briefly, yield, then park on an event
/// count (`detail::event_count`, a futex on Linux) under its armed protocol:
/// a thread about to park sets the arm bit of the futex word, and the first
/// send (or receive, for parked senders) that finds it set clears it and
/// wakes every parked thread of that side; later ones find it clear and make
/// no RMW and no syscall until a thread parks again. A send or receive makes
/// no syscall and no extra write when nobody waits (one load), nor while the
/// parked side has not yet run since its wake (two loads); see
/// event_count::prepare_wait_armed for why no wake-up is lost.
///
/// **Cost.** One compare-and-swap (or exchange) per send and per receive, no
/// allocation after construction, no lock.
///
/// Requirements on T: nothrow move construction and nothrow destruction (a
/// message half-moved into a slot could otherwise be neither sent nor kept).
template <class T, channel_shape Shape = mpmc>
class channel : public detail::channel_api<channel<T, Shape>, T> {
  friend class detail::channel_api<channel<T, Shape>, T>;
  friend struct detail::select_access;
  friend struct detail::channel_access;
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "postbox::channel<T>: T must be nothrow move constructible, so a claimed slot is always filled");
  static_assert(std::is_nothrow_destructible_v<T>, "postbox::channel<T>: T must be nothrow destructible");

 public:
  using value_type = T;
  using shape = Shape;

  /// A channel with room for at least `capacity` messages (rounded up to a
  /// power of two; `capacity()` reports the exact figure). Allocates the ring
  /// once. Throws `postbox::error(errc::invalid_argument)` for 0.
  explicit channel(std::size_t capacity) : channel(capacity, detail::initial_ticket{}) {}

  /// Test hook: as above, with the ticket counters starting at `start`.
  channel(std::size_t capacity, detail::initial_ticket start)
      : capacity_(detail::round_up_capacity(capacity)),
        mask_(capacity_ - 1),
        start_(start.value & detail::ticket_mask),
        slots_(capacity_) {
    // Ticket start_ lives in slot start_ & mask_, so each slot starts out
    // expecting the first ticket of the first lap that maps to it.
    for (std::size_t k = 0; k < capacity_; ++k) {
      const std::uint64_t t = detail::ticket_add(start_, k);
      slots_[t & mask_].seq.store(detail::free_state(t), std::memory_order_relaxed);
    }
    tail_.store(start_ << 1, std::memory_order_relaxed);
    head_.store(start_, std::memory_order_relaxed);
  }

  channel(const channel&) = delete;
  channel& operator=(const channel&) = delete;

  /// Destroys the messages still queued. Must not race with other calls.
  ~channel() {
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed) >> 1;
    for (std::uint64_t h = head_.load(std::memory_order_relaxed); h != tail; h = detail::ticket_add(h, 1)) {
      slots_[h & mask_].value()->~T();
    }
  }

  // --- state ----------------------------------------------------------------

  /// Closes the channel: later sends return `closed`; receivers drain what is
  /// queued and then see `closed`. Wakes every parked thread. Idempotent.
  /// Lock-free, thread-safe.
  void close() noexcept {
    // seq_cst: the mark must be ordered with claims (same location, so any
    // order would do for that) and before the has_waiters() reads below, so a
    // thread parking concurrently sees the mark in its re-check.
    tail_.fetch_or(1, std::memory_order_seq_cst);
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  /// Whether close() has been called. Lock-free, thread-safe.
  [[nodiscard]] bool is_closed() const noexcept {
    // acquire: pairs with the seq_cst fetch_or in close().
    return (tail_.load(std::memory_order_acquire) & 1) != 0;
  }

  /// Messages queued, as of some recent instant (claimed sends count).
  [[nodiscard]] std::size_t size_approx() const noexcept {
    // relaxed: a snapshot; head is read first so the difference is never
    // negative except across a concurrent wrap, which is clamped.
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed) >> 1;
    const std::int64_t d = detail::ticket_distance(tail, head);
    if (d <= 0) return 0;
    return static_cast<std::size_t>(d) > capacity_ ? capacity_ : static_cast<std::size_t>(d);
  }

  /// Whether size_approx() is 0. Never blocks; thread-safe.
  [[nodiscard]] bool empty_approx() const noexcept { return size_approx() == 0; }

  /// Slots in the ring (the requested capacity rounded up to a power of two).
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

  /// Counter snapshot, derived from the indices: costs nothing to keep.
  [[nodiscard]] channel_stats stats() const noexcept {
    channel_stats s;
    // relaxed: statistics only.
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t tail_word = tail_.load(std::memory_order_relaxed);
    s.received = static_cast<std::uint64_t>(detail::ticket_distance(head, start_));
    s.sent = static_cast<std::uint64_t>(detail::ticket_distance(tail_word >> 1, start_));
    s.depth = s.sent > s.received ? static_cast<std::size_t>(s.sent - s.received) : 0;
    s.capacity = capacity_;
    s.closed = (tail_word & 1) != 0;
    return s;
  }

 private:
  using slot_type = detail::channel_slot<T>;

  static constexpr send_status to_send_status(detail::claim_status c) noexcept {
    return c == detail::claim_status::closed ? send_status::closed : send_status::full;
  }

  static constexpr bool asymmetric_waits = false;

  template <class... Args>
  send_status emplace_quiet(Args&&... args) noexcept {
    std::uint64_t ticket = 0;
    const auto claim = claim_send(ticket);
    if (claim != detail::claim_status::ok) return to_send_status(claim);
    detail::after_open_check();
    publish(ticket, std::forward<Args>(args)...);
    return send_status::ok;
  }

  receive_result<T> receive_quiet() noexcept {
    std::uint64_t ticket = 0;
    const auto claim = claim_receive(ticket);
    if (claim != detail::claim_status::ok)
      return claim == detail::claim_status::closed ? receive_status::closed : receive_status::empty;
    return take(ticket);
  }

  /// What a waiting sender (`sender`) or receiver watches while it spins
  /// (channel_api::spin): the other side's index, which moves while a thread
  /// of that side runs; for the one receiver of a single-consumer ring, the
  /// state of its head slot (see head_looks_published). Relaxed: a hint
  /// only; the retried claim decides.
  std::uint64_t wait_progress(bool sender) const noexcept {
    if (sender) return head_.load(std::memory_order_relaxed);
    if constexpr (!Shape::multi_consumer) {
      // relaxed: our own index.
      const std::uint64_t head = head_.load(std::memory_order_relaxed);
      return slots_[head & mask_].seq.load(std::memory_order_relaxed);
    } else {
      return tail_.load(std::memory_order_relaxed);
    }
  }

  /// Single-consumer rings (mpsc): whether the head slot holds its message,
  /// by a relaxed peek. A waiting receiver polls this, the line the next
  /// message arrives on, and makes its full try (which reads `tail_`, the
  /// line every sender's claim writes) only once the slot looks published
  /// or every eighth poll (so a close is still seen within a few pauses):
  /// a receiver that read `tail_` on every poll pulled that line from the
  /// sender once per poll, and the sender's next claim waited to take it
  /// back. topic_bench --only mpsc-view (10 M messages, pinned, blocking
  /// send and receive, six interleaved pairs): 20.7-26.5 -> 22.9-27.9 M
  /// msg/s, higher in five. The multi-consumer rings keep trying on every
  /// poll: their head slot changes under them (and MPMC 2P2C, the row they
  /// would change, was too noisy here to tell). Never blocks; receiver only.
  [[nodiscard]] bool head_looks_published() const noexcept
    requires(!Shape::multi_consumer)
  {
    // relaxed: our own index; the slot state is a hint (the claim re-reads it with acquire).
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t seq = slots_[head & mask_].seq.load(std::memory_order_relaxed);
    return seq == detail::full_state(head);
  }

  /// Whether the next `n` (>= 1) send tickets have free slots, as far as the
  /// slot of the last of them shows: a hint for a sender that waits for room
  /// on a full ring (the topic's `block` publish). It reads the senders' own
  /// index and that one slot, not `head_`, which every receive writes:
  /// polling `head_` (as size_approx() does) pulls its line away from the
  /// receiver once per poll, and the receiver's next claim pulls it back.
  /// Relaxed: a hint only; the claim that follows decides. Never blocks;
  /// thread-safe.
  [[nodiscard]] bool room_for(std::size_t n) const noexcept {
    const std::uint64_t t = tail_.load(std::memory_order_relaxed) >> 1;
    const std::uint64_t last = detail::ticket_add(t, n - 1);
    const std::uint64_t seq = slots_[last & mask_].seq.load(std::memory_order_relaxed);
    return detail::state_distance(seq, detail::free_state(last)) >= 0;
  }

  /// Claims the next send ticket: ok (ticket set), full, or closed.
  detail::claim_status claim_send(std::uint64_t& ticket) noexcept {
    // relaxed: only a starting guess; the CAS below validates it.
    std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    detail::backoff backoff;
    detail::backoff contention;  // paces retries after a lost CAS; backoff paces waits for a slot
    for (;;) {
      if (tail & 1) return detail::claim_status::closed;
      const std::uint64_t t = tail >> 1;
      slot_type& slot = slots_[t & mask_];
      // acquire: pairs with the receiver's release that freed this slot, so
      // its move-out and destruction of the previous message happen before
      // our construction.
      const std::uint64_t seq = slot.seq.load(std::memory_order_acquire);
      const std::int64_t d = detail::state_distance(seq, detail::free_state(t));
      if (d == 0) {
        // seq_cst: the claim is the notifier-side RMW of the event-count
        // protocol for parked receivers, and the CAS fails if close() marked
        // the tail first. Relaxed on failure: we only retry with the new value.
        if (tail_.compare_exchange_weak(tail, detail::ticket_add(t, 1) << 1, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
          ticket = t;
          return detail::claim_status::ok;
        }
        // Another sender won the tail: back off (1, 2, 4 ... 64 pauses) so
        // that it keeps the line for a run of claims instead of both cores
        // pulling it back and forth once per message (MPMC 2P2C: 2.1-2.2x
        // the throughput of retrying at once, median at either host
        // placement; no effect with one sender, whose CAS fails only
        // spuriously or against close()).
        contention.spin();
        continue;
      }
      if (d < 0) {
        // The slot still holds the message of ticket t - capacity. Full only
        // if no receiver has claimed it: head + capacity == t right now.
        // seq_cst: the sender side of the not_full event count (Dekker with
        // the receiver's seq_cst head update).
        const std::uint64_t head = head_.load(std::memory_order_seq_cst);
        if (detail::ticket_distance(t, head) >= static_cast<std::int64_t>(capacity_)) {
          // Re-read the tail: a close() since our first read must win.
          const std::uint64_t now = tail_.load(std::memory_order_seq_cst);
          if (now & 1) return detail::claim_status::closed;
          if (now == tail) return detail::claim_status::full;
          tail = now;
          continue;
        }
        backoff.snooze();  // a receiver is moving the old message out
      }
      // relaxed: a fresh guess for the next CAS.
      tail = tail_.load(std::memory_order_relaxed);
    }
  }

  template <class... Args>
  void publish(std::uint64_t ticket, Args&&... args) noexcept {
    slot_type& slot = slots_[ticket & mask_];
    ::new (static_cast<void*>(slot.storage)) T(std::forward<Args>(args)...);
    // release: publishes the message; pairs with the acquire load in
    // claim_receive.
    slot.seq.store(detail::full_state(ticket), std::memory_order_release);
  }

  /// Claims the next receive ticket: ok (ticket set), empty, or closed.
  detail::claim_status claim_receive(std::uint64_t& ticket) noexcept {
    // relaxed: a starting guess (multi-consumer) or our own value (single).
    std::uint64_t head = head_.load(std::memory_order_relaxed);
    detail::backoff backoff;
    detail::backoff contention;  // after a lost CAS (multi-consumer only)
    for (;;) {
      slot_type& slot = slots_[head & mask_];
      // acquire: pairs with the sender's release in publish(), making the
      // constructed message visible before we move it out.
      const std::uint64_t seq = slot.seq.load(std::memory_order_acquire);
      const std::int64_t d = detail::state_distance(seq, detail::full_state(head));
      if (d == 0) {
        if constexpr (Shape::multi_consumer) {
          // seq_cst: the notifier-side RMW for parked senders (event count).
          if (head_.compare_exchange_weak(head, detail::ticket_add(head, 1), std::memory_order_seq_cst,
                                          std::memory_order_relaxed)) {
            ticket = head;
            return detail::claim_status::ok;
          }
          contention.spin();  // another receiver won the head: as in claim_send
          continue;
        } else {
          // seq_cst: as the CAS above; a single consumer needs no CAS, but the
          // store must be ordered before its has_waiters() read.
          head_.store(detail::ticket_add(head, 1), std::memory_order_seq_cst);
          ticket = head;
          return detail::claim_status::ok;
        }
      }
      if (d < 0) {
        // Unpublished head slot. Empty only if no sender has claimed it.
        // seq_cst: the receiver side of the not_empty event count.
        const std::uint64_t tail = tail_.load(std::memory_order_seq_cst);
        if ((tail >> 1) == head) return (tail & 1) ? detail::claim_status::closed : detail::claim_status::empty;
        if constexpr (Shape::multi_consumer) {
          // Our head may be stale (other receivers moved on): re-read first.
          const std::uint64_t now = head_.load(std::memory_order_relaxed);
          if (now != head) {
            head = now;
            continue;
          }
        }
        backoff.snooze();  // a send is between claim and publish
        continue;
      }
      // d > 0: another receiver took this ticket; relaxed: a fresh guess.
      head = head_.load(std::memory_order_relaxed);
    }
  }

  // The message of `ticket`, built in its result in place: one move out of
  // the slot (see detail::slot_relocation). A trivially copyable message is
  // copied out first and wrapped after the slot is freed (the in-place form
  // cost the u64 rows one instruction per receive).
  receive_result<T> take(std::uint64_t ticket) noexcept {
    if constexpr (std::is_trivially_copyable_v<T>) {
      slot_type& slot = slots_[ticket & mask_];
      const T out(*slot.value());
      free_slot(slot, ticket);
      return receive_result<T>(out);
    } else {
      return take_in_place(ticket);
    }
  }
  // (A function of its own, so that its one named result is returned in
  // place: g++ did not elide it as a branch of take().)
  receive_result<T> take_in_place(std::uint64_t ticket) noexcept {
    slot_type& slot = slots_[ticket & mask_];
    T* p = slot.value();
    receive_result<T> out(std::in_place, detail::slot_relocation<T>::source(*p));
    p->~T();
    free_slot(slot, ticket);
    return out;
  }
  void free_slot(slot_type& slot, std::uint64_t ticket) noexcept {
    // release: frees the slot for ticket + capacity; pairs with the acquire
    // load in claim_send.
    slot.seq.store(detail::free_state(detail::ticket_add(ticket, capacity_)), std::memory_order_release);
  }

  // Layout: each index on its own cache line(s) so senders and receivers do
  // not invalidate each other's lines except through the slots themselves.

  /// Send index: (next send ticket << 1) | closed. Written by senders' claim
  /// CAS (seq_cst) and by close() (seq_cst fetch_or). Read by senders
  /// (relaxed guess, validated by the CAS), by receivers to tell empty from a
  /// send in flight (seq_cst; the Dekker partner of the claim CAS through the
  /// not_empty_ event count), and by stats (relaxed). Invariant:
  /// head <= tail >> 1 <= head + capacity.
  alignas(detail::cache_line_size) std::atomic<std::uint64_t> tail_{0};
  /// Receive index: next receive ticket. Written by receivers (seq_cst CAS,
  /// or seq_cst store for a single consumer). Read by receivers (relaxed
  /// guess), by senders to tell full from a receive in flight (seq_cst; the
  /// Dekker partner through not_full_), and by stats (relaxed).
  alignas(detail::cache_line_size) std::atomic<std::uint64_t> head_{0};
  /// Receivers park here; senders notify after publishing.
  alignas(detail::cache_line_size) detail::event_count not_empty_;
  /// Senders park here; receivers notify after freeing a slot.
  alignas(detail::cache_line_size) detail::event_count not_full_;
  // Read-only after construction.
  alignas(detail::cache_line_size) const std::size_t capacity_;
  const std::size_t mask_;
  const std::uint64_t start_;
  const detail::owned_array<slot_type> slots_;

  static_assert(detail::cache_line_size >= sizeof(std::atomic<std::uint64_t>),
                "tail_ and head_ must sit on different cache lines to avoid false sharing");
};

namespace detail {
/// The spsc ring's cell: a state word and a T. A small cell is aligned to its
/// size rounded up to a power of two, so it never straddles two cache lines
/// and its state and message move as one line.
template <class T>
struct spsc_cell_layout {
  std::atomic<std::uint32_t> full;
  alignas(T) unsigned char bytes[sizeof(T)];
};
template <class T>
constexpr std::size_t spsc_cell_alignment() noexcept {
  std::size_t a = alignof(spsc_cell_layout<T>);
  if (sizeof(spsc_cell_layout<T>) > 32) return a;
  while (a < sizeof(spsc_cell_layout<T>)) a <<= 1;
  return a;
}
}  // namespace detail

/// The single-producer/single-consumer channel: per-slot states, no
/// read-modify-write and no hardware fence on the message path.
///
/// **Algorithm.** Each slot holds the message and its own state word, `full`,
/// on the same cache line for a small T. The producer, at its private index
/// t, writes slot t only once the slot reads free (acquire), constructs the
/// message, and publishes it by storing full (release). The consumer, at its
/// private index h, takes slot h only once it reads full (acquire), moves the
/// message out, destroys it and frees the slot (release). Neither side reads
/// the other's index, so a consumer that keeps up moves only the slot's line
/// per message (a ring of indices moves the index line too). `tail_` and
/// `head_` are kept (relaxed stores on each owner's own line) only for
/// stats(), size_approx() and the destructor.
///
/// **Why one flag is enough.** Slot h can hold only message h when the
/// consumer reads it: message h - capacity was taken and freed by the
/// consumer itself (so "full" can only be a later store: the producer's for
/// h), and message h + capacity cannot be written before the consumer frees
/// h. Symmetrically, "free" read by the producer at t is the consumer's store
/// for t - capacity (or the initial state on the first lap).
///
/// **Linearizable emptiness and fullness.** The producer publishes in index
/// order, so the abstract queue is the run of published, unfreed slots from
/// the consumer's index h. A send takes effect at its `full` store, a receive
/// at its `free` store. A receive that reads slot h not full reports empty:
/// at the instant of that read message h is unpublished, so no message after
/// it is either, and every message before h was freed by this consumer: the
/// queue is empty at that instant. A send that reads slot t still full (the
/// message of t - capacity) reports full: messages t - capacity .. t - 1 are
/// all published and unfreed at that instant, exactly `capacity` of them.
/// These are the same single-location arguments as for a ring of indices
/// (slot h full <=> tail > h, slot t full <=> t - head >= capacity).
///
/// **Closing without a barrier per send.** A send announces itself in the
/// producer-private `in_send_`, then reads `closed_`, separated only by a
/// light fence (a compiler barrier). `close()` marks `closing`, runs a heavy
/// fence (membarrier: every running thread of the process passes a full
/// barrier), waits until no send is in progress, and only then marks the
/// channel `closed`. So a send that saw the channel open is published before
/// receivers can see `closed`, and a send that starts later sees the mark
/// and fails: every send lands before close() or fails. The consumer reports
/// closed only when slot h reads not full again after it acquired `closed`:
/// every accepted send's `full` store happens before that re-read.
///
/// **Waiting.** Parked threads use the same event counts as the other
/// shapes with the asymmetric protocol in its sole-waiter form (one thread
/// per side): a thread about to park pays the heavy fence and re-arms its
/// wake (event_count::prepare_wait_sole), and the other side, after each
/// publish or free, pays a light fence and a relaxed read of the waiter
/// count (notify_light_sole): no syscall and no write when nobody waits, and
/// one FUTEX_WAKE per park, not one per message sent while the parked side
/// is waking up. The condition the waiter re-checks is the slot state itself.
/// Where membarrier is unavailable, and under ThreadSanitizer, both fences
/// are seq_cst fences (detail/asymmetric_fence.hpp). A send learns which from
/// the closed_ load it makes anyway (fence_bit, set at construction when the
/// light fence is a real one): with membarrier, a send that finds the channel
/// open reads no separate fence-mode flag.
///
/// **Cost.** Per message: the slot's line (message and state), stores to the
/// owner's private line (its index, and in_send_ for the producer), and
/// relaxed reads of lines that are written only when closing or parking.
template <class T>
class channel<T, spsc> : public detail::channel_api<channel<T, spsc>, T> {
  friend class detail::channel_api<channel<T, spsc>, T>;
  friend struct detail::select_access;
  friend struct detail::channel_access;
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "postbox::channel<T>: T must be nothrow move constructible, so a claimed slot is always filled");
  static_assert(std::is_nothrow_destructible_v<T>, "postbox::channel<T>: T must be nothrow destructible");

 public:
  using value_type = T;
  using shape = spsc;

  /// A channel with room for at least `capacity` messages (rounded up to a
  /// power of two; `capacity()` reports the exact figure). Allocates the ring
  /// once. Throws `postbox::error(errc::invalid_argument)` for 0.
  explicit channel(std::size_t capacity) : channel(capacity, detail::initial_ticket{}) {}

  /// Test hook: as above, with the indices starting at `start`. This ring
  /// counts in 64 bits, so the 63-bit ticket is doubled: a start just below
  /// the 63-bit wrap is just below this ring's wrap too.
  channel(std::size_t capacity, detail::initial_ticket start)
      : capacity_(detail::round_up_capacity(capacity)),
        mask_(capacity_ - 1),
        start_((start.value & detail::ticket_mask) << 1),
        cells_(capacity_) {
    detail::asymmetric_fence_init();
    const bool real_light_fence = !detail::light_fence_is_compiler_only();
    // relaxed: before the channel is shared. See fence_bit.
    if (real_light_fence) closed_.store(open_state | fence_bit, std::memory_order_relaxed);
    // Each notify then tells from the waiter word it reads anyway whether
    // it must fence (event_count::mark_light_fence_mode()).
    not_empty_.mark_light_fence_mode(real_light_fence);
    not_full_.mark_light_fence_mode(real_light_fence);
    tail_.store(start_, std::memory_order_relaxed);
    head_.store(start_, std::memory_order_relaxed);
  }

  channel(const channel&) = delete;
  channel& operator=(const channel&) = delete;

  /// Destroys the messages still queued. Must not race with other calls.
  ~channel() {
    for (std::size_t k = 0; k < capacity_; ++k) {
      // relaxed: no other thread runs (the caller guarantees it).
      if (cells_[k].full.load(std::memory_order_relaxed) != 0) cells_[k].value()->~T();
    }
  }

  /// Closes the channel: later sends return `closed`; receivers drain what is
  /// queued and then see `closed`. Wakes every parked thread. Idempotent;
  /// thread-safe (any thread may close). Makes syscalls (a membarrier and
  /// two futex wakes) and waits for a send in progress to finish: close is
  /// the rare side that pays for the barrier-free sends.
  void close() noexcept {
    // relaxed: fence_bit is fixed at construction.
    const std::uint32_t mode = closed_.load(std::memory_order_relaxed) & fence_bit;
    std::uint32_t expected = open_state | mode;
    // acq_rel: exactly one closer runs the protocol; the others wait below.
    if (closed_.compare_exchange_strong(expected, closing_state | mode, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
      // Partner of the light fence in emplace_quiet: after this, a send
      // either is visible in in_send_ or will read `closing` and fail.
      detail::heavy_fence();
      detail::backoff backoff;
      // acquire: pairs with the release store that ends a send, so its
      // slot's `full` store is visible to whoever acquires closed_state.
      while (in_send_.load(std::memory_order_acquire) != 0) backoff.snooze();
      // release: pairs with the acquire load in receive_quiet; every
      // accepted send's publish happens before a receiver reports closed.
      closed_.store(closed_state | mode, std::memory_order_release);
      not_empty_.wake_all();
      not_full_.wake_all();
    } else {
      detail::backoff backoff;
      // acquire: as above; close() returns once the close is in effect.
      while ((closed_.load(std::memory_order_acquire) & ~fence_bit) != closed_state) backoff.snooze();
    }
  }

  /// Whether close() has been called. Lock-free, thread-safe.
  [[nodiscard]] bool is_closed() const noexcept {
    // acquire: pairs with the CAS and the store in close().
    return (closed_.load(std::memory_order_acquire) & ~fence_bit) != open_state;
  }

  /// Messages queued, as of some recent instant (a send counts from just
  /// before its publish, a receive from just before it frees the slot).
  [[nodiscard]] std::size_t size_approx() const noexcept {
    // acquire: pairs with the release store of head_ in receive_quiet, which
    // follows the consumer's acquire of the slot, which follows the
    // producer's tail_ store: the tail read below is never behind this head.
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    // relaxed: a snapshot.
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    const std::uint64_t d = tail - head;
    return d > capacity_ ? capacity_ : static_cast<std::size_t>(d);
  }

  /// Whether size_approx() is 0. Never blocks; thread-safe.
  [[nodiscard]] bool empty_approx() const noexcept { return size_approx() == 0; }

  /// Slots in the ring (the requested capacity rounded up to a power of two).
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

  /// Counter snapshot, derived from the indices: costs nothing to keep.
  [[nodiscard]] channel_stats stats() const noexcept {
    channel_stats s;
    // acquire, then relaxed: as in size_approx().
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    s.received = head - start_;
    s.sent = tail - start_;
    s.depth = s.sent > s.received ? static_cast<std::size_t>(s.sent - s.received) : 0;
    if (s.depth > capacity_) s.depth = capacity_;
    s.capacity = capacity_;
    s.closed = is_closed();
    return s;
  }

 private:
  static constexpr bool asymmetric_waits = true;
  static constexpr std::uint32_t open_state = 0;
  static constexpr std::uint32_t closing_state = 1;
  static constexpr std::uint32_t closed_state = 2;
  /// Set in closed_, beside the state, when light_fence() is not a compiler
  /// barrier alone (no membarrier, or ThreadSanitizer), so a send's one
  /// closed_ load also tells it whether to fence: with membarrier, a send
  /// that finds the channel open reads no fence-mode flag.
  static constexpr std::uint32_t fence_bit = 4;

  struct alignas(detail::spsc_cell_alignment<T>()) cell {
    /// 1 while the cell holds a message, else 0. Written by the producer
    /// (release store of 1 after constructing: publishes the message; pairs
    /// with the consumer's acquire load in receive_quiet) and by the consumer
    /// (release store of 0 after moving out and destroying: frees the cell;
    /// pairs with the producer's acquire load in emplace_quiet). Read by the
    /// producer (acquire: is the cell free?) and the consumer (acquire: is
    /// there a message?). The pairs hand the storage from one side to the
    /// other, so construction and destruction of T never race.
    std::atomic<std::uint32_t> full{0};
    alignas(T) unsigned char bytes[sizeof(T)];

    T* value() noexcept { return std::launder(reinterpret_cast<T*>(bytes)); }
  };
  static_assert(sizeof(cell) > 32 || detail::cache_line_size % sizeof(cell) == 0,
                "a small cell must not straddle two cache lines, so its state and message move together");

  /// Producer only: whether the consumer has freed the slot `batch` ahead of
  /// the next one to write (so at least batch + 1 are free). A hint for the
  /// blocking send's spin (channel_api::send_blocking); emplace_quiet decides.
  [[nodiscard]] bool room_ahead() const noexcept {
    const std::size_t batch = capacity_ / 4 < 32 ? capacity_ / 4 : 32;
    // relaxed: our own index.
    const std::uint64_t t = tail_.load(std::memory_order_relaxed);
    // relaxed: a hint only; the send that follows reads its own cell with acquire.
    return batch == 0 || cells_[(t + batch) & mask_].full.load(std::memory_order_relaxed) == 0;
  }

  /// Producer only, after its announcement in in_send_ and a closed_ load
  /// that did not read plain `open`: whether the channel is open. Where the
  /// light fence is a real fence (fence_bit set), fences and loads again.
  [[nodiscard]] bool open_after_fence() const noexcept {
    // relaxed: fence_bit is fixed at construction.
    if ((closed_.load(std::memory_order_relaxed) & fence_bit) == 0) return false;
    detail::light_fence();
    // relaxed: as in emplace_quiet, now after the fence.
    return (closed_.load(std::memory_order_relaxed) & ~fence_bit) == open_state;
  }

  /// Producer only.
  template <class... Args>
  send_status emplace_quiet(Args&&... args) noexcept {
    // relaxed: the announcement is ordered before the closed_ read by the
    // light fence; its partner is the heavy fence in close().
    in_send_.store(1, std::memory_order_relaxed);
    // The light fence: a compiler barrier where light_fence() is one (the
    // load below then finds fence_bit clear); else the load finds fence_bit
    // set, and the send fences and loads again.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    // relaxed: see above; a stale `open` is impossible after close()'s
    // heavy fence unless close() then waits for this send.
    if (POSTBOX_UNLIKELY(closed_.load(std::memory_order_relaxed) != open_state) && !open_after_fence()) {
      // release, though nothing was published: since C++20 a release
      // sequence continues only through RMWs, so a close() that reads this 0
      // must synchronize with this store itself, which the previous send's
      // publish precedes in program order.
      in_send_.store(0, std::memory_order_release);
      return send_status::closed;
    }
    // relaxed: our own index.
    const std::uint64_t t = tail_.load(std::memory_order_relaxed);
    cell& c = cells_[t & mask_];
    // acquire: pairs with the consumer's release store of 0 in receive_quiet,
    // so its move-out and destruction precede our construction.
    if (c.full.load(std::memory_order_acquire) != 0) {
      in_send_.store(0, std::memory_order_release);  // release: as on the closed return
      return send_status::full;
    }
    detail::after_open_check();
    ::new (static_cast<void*>(c.bytes)) T(std::forward<Args>(args)...);
    // relaxed: for stats() and size_approx() only; ordered before the
    // publish below, so a reader that saw the consumer take this message
    // (head_ acquire) sees this tail.
    tail_.store(t + 1, std::memory_order_relaxed);
    // release: publishes the message; pairs with the acquire loads of `full`
    // in receive_quiet.
    c.full.store(1, std::memory_order_release);
    // release: ends the send; pairs with the acquire load in close().
    in_send_.store(0, std::memory_order_release);
    return send_status::ok;
  }

  /// Consumer only.
  receive_result<T> receive_quiet() noexcept {
    // relaxed: our own index.
    const std::uint64_t h = head_.load(std::memory_order_relaxed);
    cell& c = cells_[h & mask_];
    // acquire: pairs with the producer's release store of 1 in emplace_quiet,
    // making the constructed message visible before we move it out.
    if (c.full.load(std::memory_order_acquire) == 0) {
      // acquire: pairs with the release store of closed_state in close():
      // every send accepted before the close has published by then.
      if ((closed_.load(std::memory_order_acquire) & ~fence_bit) != closed_state) return receive_status::empty;
      // acquire: as the first load; the last accepted send's publish happens
      // before this read, so "not full" now means closed and drained.
      if (c.full.load(std::memory_order_acquire) == 0) return receive_status::closed;
    }
    return take(c, h);
  }

  /// Consumer only: the message of cell `c` (index `h`), built in its result
  /// in place (one move out of the cell, detail::slot_relocation), then the
  /// cell freed. A function of its own so that its one named result is
  /// returned in place (receive_quiet's status returns kept g++ from eliding
  /// it there: one more move of T per receive).
  receive_result<T> take(cell& c, std::uint64_t h) noexcept {
    T* p = c.value();
    receive_result<T> out(std::in_place, detail::slot_relocation<T>::source(*p));
    p->~T();
    // release: for size_approx() and stats() (pairs with their acquire
    // load); never read by the producer.
    head_.store(h + 1, std::memory_order_release);
    // release: frees the cell; pairs with the acquire load in emplace_quiet.
    c.full.store(0, std::memory_order_release);
    return out;
  }

  // Layout: each side's private line, the read-mostly state and each event
  // count on separate cache lines; the slots carry the traffic.

  /// Next index to write. Written only by the producer (relaxed store per
  /// send, before the publish); read by the producer itself (relaxed) and by
  /// stats()/size_approx() (relaxed, after their acquire of head_).
  alignas(detail::cache_line_size) std::atomic<std::uint64_t> tail_{0};
  /// 1 while a send is between its announcement and its end. Written by the
  /// producer (relaxed store of 1, release store of 0; its own line), read by
  /// close() (acquire, after the heavy fence).
  std::atomic<std::uint32_t> in_send_{0};
  /// Next index to read. Written only by the consumer (release store per
  /// receive, after the move-out); read by the consumer itself (relaxed) and
  /// by stats()/size_approx() (acquire). The producer never reads it.
  alignas(detail::cache_line_size) std::atomic<std::uint64_t> head_{0};
  /// open, closing or closed, plus fence_bit (fixed at construction).
  /// Written only by close() (acq_rel CAS, then a release store of
  /// closed_state); read by the producer per send (relaxed,
  /// after its light fence), by the consumer when empty (acquire) and by
  /// is_closed (acquire). Shares its line with read-only fields only.
  alignas(detail::cache_line_size) std::atomic<std::uint32_t> closed_{open_state};
  const std::size_t capacity_;
  const std::size_t mask_;
  const std::uint64_t start_;
  const detail::owned_array<cell> cells_;
  /// The consumer parks here (its sole waiter); the producer notifies
  /// (notify_light_sole) after publishing.
  alignas(detail::cache_line_size) detail::event_count not_empty_;
  /// The producer parks here (its sole waiter); the consumer notifies
  /// (notify_light_sole) after freeing.
  alignas(detail::cache_line_size) detail::event_count not_full_;

  static_assert(detail::cache_line_size >= sizeof(std::atomic<std::uint64_t>) + sizeof(std::uint32_t),
                "tail_ and head_ must sit on different cache lines to avoid false sharing");
};

namespace detail {
template <class T, class Shape>
struct endpoint_state {
  explicit endpoint_state(std::size_t capacity) : ch(capacity) {}
  channel<T, Shape> ch;
  /// Live sender endpoints. relaxed increment on copy (a copy comes from a
  /// live endpoint, so the count cannot reach zero meanwhile); acq_rel
  /// decrement so the last one's close() follows every other sender's sends.
  std::atomic<std::size_t> senders{1};
  /// Live receiver endpoints; same discipline as `senders`.
  std::atomic<std::size_t> receivers{1};
  /// Live endpoints of either side: owns this state (an intrusive count, so
  /// channel.hpp needs no std::shared_ptr and no <memory>). relaxed increment
  /// on copy (a copy comes from a live endpoint, so it cannot reach zero
  /// meanwhile); acq_rel decrement in release_endpoint: the release half of
  /// every decrement pairs with the acquire half of the one that reaches
  /// zero, so each endpoint's last use of the state happens before `delete`.
  std::atomic<std::size_t> endpoints{2};
};

/// Drops one endpoint's reference to `s` (non-null) and frees the state with
/// the last one. Never blocks; thread-safe.
template <class T, class Shape>
void release_endpoint(endpoint_state<T, Shape>* s) noexcept {
  // acq_rel: see `endpoints`; pairs with the other endpoints' decrements.
  if (s->endpoints.fetch_sub(1, std::memory_order_acq_rel) == 1) delete s;
}
}  // namespace detail

template <class T, channel_shape Shape>
class receiver;

/// The sending end of a channel made by `make_channel`. When the last sender
/// is destroyed the channel closes, so receivers drain and then see `closed`.
/// Copyable only for multi-producer shapes; movable always. Each member has
/// the blocking and thread-safety of the channel member of the same name.
template <class T, channel_shape Shape = mpmc>
class sender {
 public:
  sender(const sender& other) noexcept
    requires Shape::multi_producer
      : state_(other.state_) {
    if (state_) {
      // relaxed: see `senders` and `endpoints` in endpoint_state.
      state_->senders.fetch_add(1, std::memory_order_relaxed);
      state_->endpoints.fetch_add(1, std::memory_order_relaxed);
    }
  }
  sender(sender&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  sender& operator=(sender other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~sender() { release(); }

  template <class U>
  [[nodiscard]] send_status try_send(U&& v) { return state_->ch.try_send(std::forward<U>(v)); }
  template <class U>
  send_status send(U&& v) { return state_->ch.send(std::forward<U>(v)); }
  template <class U>
  send_status send(U&& v, std::stop_token stop) { return state_->ch.send(std::forward<U>(v), std::move(stop)); }
  template <class U, class Rep, class Period>
  send_status send_for(U&& v, std::chrono::duration<Rep, Period> d, std::stop_token stop = {}) {
    return state_->ch.send_for(std::forward<U>(v), d, std::move(stop));
  }
  template <class U, class Clock, class Duration>
  send_status send_until(U&& v, std::chrono::time_point<Clock, Duration> t, std::stop_token stop = {}) {
    return state_->ch.send_until(std::forward<U>(v), t, std::move(stop));
  }
  template <class InputIt>
  std::size_t try_send_batch(InputIt first, InputIt last) { return state_->ch.try_send_batch(first, last); }
  /// True when the channel is closed (explicitly, or every receiver is gone).
  [[nodiscard]] bool is_closed() const noexcept { return state_->ch.is_closed(); }
  void close() noexcept { state_->ch.close(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return state_->ch.capacity(); }
  [[nodiscard]] std::size_t size_approx() const noexcept { return state_->ch.size_approx(); }

 private:
  friend struct detail::select_access;
  template <class U, channel_shape S>
  friend std::pair<sender<U, S>, receiver<U, S>> make_channel(std::size_t);
  /// Adopts one of the references `make_channel` counted in `endpoints`.
  explicit sender(detail::endpoint_state<T, Shape>* s) noexcept : state_(s) {}
  void release() noexcept {
    if (state_ == nullptr) return;  // moved from
    if (state_->senders.fetch_sub(1, std::memory_order_acq_rel) == 1) state_->ch.close();
    detail::release_endpoint(std::exchange(state_, nullptr));
  }
  /// Shared with the other endpoints; null once moved from.
  detail::endpoint_state<T, Shape>* state_;
};

/// The receiving end of a channel made by `make_channel`. When the last
/// receiver is destroyed the channel closes, so sends fail with `closed`.
/// Copyable only for multi-consumer shapes; movable always.
template <class T, channel_shape Shape = mpmc>
class receiver {
 public:
  receiver(const receiver& other) noexcept
    requires Shape::multi_consumer
      : state_(other.state_) {
    if (state_) {
      // relaxed: see `receivers` and `endpoints` in endpoint_state.
      state_->receivers.fetch_add(1, std::memory_order_relaxed);
      state_->endpoints.fetch_add(1, std::memory_order_relaxed);
    }
  }
  receiver(receiver&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  receiver& operator=(receiver other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~receiver() { release(); }

  [[nodiscard]] std::optional<T> try_receive() noexcept { return state_->ch.try_receive(); }
  [[nodiscard]] receive_result<T> try_receive_result() noexcept { return state_->ch.try_receive_result(); }
  [[nodiscard]] std::optional<T> receive() { return state_->ch.receive(); }
  [[nodiscard]] std::optional<T> receive(std::stop_token stop) { return state_->ch.receive(std::move(stop)); }
  template <class Rep, class Period>
  [[nodiscard]] receive_result<T> receive_for(std::chrono::duration<Rep, Period> d, std::stop_token stop = {}) {
    return state_->ch.receive_for(d, std::move(stop));
  }
  template <class Clock, class Duration>
  [[nodiscard]] receive_result<T> receive_until(std::chrono::time_point<Clock, Duration> t, std::stop_token stop = {}) {
    return state_->ch.receive_until(t, std::move(stop));
  }
  template <class OutputIt>
  std::size_t try_receive_batch(OutputIt out, std::size_t max) { return state_->ch.try_receive_batch(out, max); }
  [[nodiscard]] bool is_closed() const noexcept { return state_->ch.is_closed(); }
  void close() noexcept { state_->ch.close(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return state_->ch.capacity(); }
  [[nodiscard]] std::size_t size_approx() const noexcept { return state_->ch.size_approx(); }

 private:
  friend struct detail::select_access;
  template <class U, channel_shape S>
  friend std::pair<sender<U, S>, receiver<U, S>> make_channel(std::size_t);
  /// Adopts one of the references `make_channel` counted in `endpoints`.
  explicit receiver(detail::endpoint_state<T, Shape>* s) noexcept : state_(s) {}
  void release() noexcept {
    if (state_ == nullptr) return;  // moved from
    if (state_->receivers.fetch_sub(1, std::memory_order_acq_rel) == 1) state_->ch.close();
    detail::release_endpoint(std::exchange(state_, nullptr));
  }
  /// Shared with the other endpoints; null once moved from.
  detail::endpoint_state<T, Shape>* state_;
};

/// Makes a channel owned by its endpoints (crossbeam-style disconnection):
/// receivers see `closed` after the last sender is gone and the queue is
/// drained; sends fail with `closed` once the last receiver is gone (queued
/// messages are then destroyed with the channel). Allocates once.
template <class T, channel_shape Shape = mpmc>
[[nodiscard]] std::pair<sender<T, Shape>, receiver<T, Shape>> make_channel(std::size_t capacity) {
  // Counts one sender, one receiver and two endpoints: the two made here.
  auto* state = new detail::endpoint_state<T, Shape>(capacity);
  return {sender<T, Shape>(state), receiver<T, Shape>(state)};
}

POSTBOX_END_NAMESPACE
