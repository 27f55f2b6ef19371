// SPDX-License-Identifier: MIT
// postbox's error type, error codes, status enums and the small result<T> type.
#pragma once

#include <postbox/config.hpp>

#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// Every error condition postbox names. Expected outcomes of try-operations
/// are returned as values; these codes also travel inside `postbox::error`
/// when a call has to throw (misuse, bad configuration, resource failure).
enum class errc {
  ok = 0,
  invalid_argument,     ///< a precondition on an argument does not hold
  closed,               ///< the transport is closed
  full,                 ///< a bounded structure is at capacity
  empty,                ///< nothing to take right now
  timeout,              ///< a deadline passed first
  canceled,             ///< the operation was canceled
  expired,              ///< the message or record passed its deadline or retention
  not_found,            ///< no such id, key or entry
  conflict,             ///< same key, different request
  out_of_range,         ///< offset outside what a stream retains
  parse_error,          ///< malformed input text
  too_deep,             ///< input nests deeper than allowed
  too_large,            ///< input larger than allowed
  missing_field,        ///< a required field is absent
  bad_type,             ///< a field has the wrong type or an invalid value
  invalid_utf8,         ///< a string is not valid UTF-8
  unknown_type,         ///< no decoder for this message type
  unsupported_version,  ///< no decoder or upcaster for this schema version
  store_error,          ///< the durable store failed (I/O, constraint, SQL)
  busy,                 ///< the store is locked by another connection
  corrupt,              ///< the store's file is not a valid database
  handler_error,        ///< a user handler failed
  stopped,              ///< the component was stopped
  permission_denied,    ///< the caller (or its credentials) may not do this: a server's authorization, another tenant's data
  unauthenticated,      ///< no valid credentials or signature: a refused login, an unsigned or tampered message
  rate_limited,         ///< too many calls for this caller right now; retry later (keep last: parse_errc iterates to it)
};

/// Stable lower-case name of an error code, e.g. "missing_field".
/// Never allocates. Thread-safe.
[[nodiscard]] constexpr std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::ok: return "ok";
    case errc::invalid_argument: return "invalid_argument";
    case errc::closed: return "closed";
    case errc::full: return "full";
    case errc::empty: return "empty";
    case errc::timeout: return "timeout";
    case errc::canceled: return "canceled";
    case errc::expired: return "expired";
    case errc::not_found: return "not_found";
    case errc::conflict: return "conflict";
    case errc::out_of_range: return "out_of_range";
    case errc::parse_error: return "parse_error";
    case errc::too_deep: return "too_deep";
    case errc::too_large: return "too_large";
    case errc::missing_field: return "missing_field";
    case errc::bad_type: return "bad_type";
    case errc::invalid_utf8: return "invalid_utf8";
    case errc::unknown_type: return "unknown_type";
    case errc::unsupported_version: return "unsupported_version";
    case errc::store_error: return "store_error";
    case errc::busy: return "busy";
    case errc::corrupt: return "corrupt";
    case errc::handler_error: return "handler_error";
    case errc::stopped: return "stopped";
    case errc::permission_denied: return "permission_denied";
    case errc::unauthenticated: return "unauthenticated";
    case errc::rate_limited: return "rate_limited";
  }
  return "unknown";
}

/// The one exception type postbox throws, only at the API boundary (misuse,
/// bad configuration, resource failure). Carries an `errc`.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

/// Outcome of a send. `ok`: the message is in the transport (and the argument
/// was moved from); `full`: no room and the caller did not wait; `closed`: the
/// transport is closed; `timeout`: a timed send's deadline passed first;
/// `canceled`: the caller's `std::stop_token` was stopped first (nothing sent).
enum class send_status { ok, full, closed, timeout, canceled };

/// Outcome of a receive: `ok` (a value is present), `empty` (nothing queued
/// right now), `closed` (closed and drained), `timeout` (deadline passed),
/// `canceled` (the caller's `std::stop_token` was stopped first; nothing taken).
enum class receive_status { ok, empty, closed, timeout, canceled };

[[nodiscard]] constexpr std::string_view to_string(send_status s) noexcept {
  switch (s) {
    case send_status::ok: return "ok";
    case send_status::full: return "full";
    case send_status::closed: return "closed";
    case send_status::timeout: return "timeout";
    case send_status::canceled: return "canceled";
  }
  return "unknown";
}

[[nodiscard]] constexpr std::string_view to_string(receive_status s) noexcept {
  switch (s) {
    case receive_status::ok: return "ok";
    case receive_status::empty: return "empty";
    case receive_status::closed: return "closed";
    case receive_status::timeout: return "timeout";
    case receive_status::canceled: return "canceled";
  }
  return "unknown";
}

namespace detail {
template <class Status>
constexpr Status ok_status() noexcept {
  return static_cast<Status>(0);
}

/// Makes the result `r` hold what `other` holds, by destroying `r` and
/// constructing it again from `other` (a move of its value; the value type
/// need not be move-assignable). For code that must keep returning one named
/// result (channel_api::receive_blocking).
template <class R>
void replace_result(R& r, R&& other) noexcept(std::is_nothrow_move_constructible_v<typename R::value_type>) {
  r.~R();
  ::new (static_cast<void*>(&r)) R(std::move(other));
}
}  // namespace detail

/// A status plus an optional value: a small subset of C++23 `std::expected`
/// so a later switch is mechanical. The value is present exactly when
/// `status()` is the status type's first enumerator (`ok`).
/// Never allocates beyond what `T` does. Not thread-safe (a plain value).
template <class T, class Status = errc>
class [[nodiscard]] result {
 public:
  using value_type = T;
  using status_type = Status;

  /// A successful result holding `value`.
  result(T value) noexcept(std::is_nothrow_move_constructible_v<T>)  // NOLINT(google-explicit-constructor)
      : status_(detail::ok_status<Status>()), value_(std::move(value)) {}
  /// A successful result whose value is built in place from `args` (no
  /// move of a `T` made first).
  template <class... Args>
  explicit result(std::in_place_t, Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args&&...>)
      : status_(detail::ok_status<Status>()), value_(std::in_place, std::forward<Args>(args)...) {}
  /// A failed result; `status` must not be `ok`.
  result(Status status) noexcept : status_(status) {}  // NOLINT(google-explicit-constructor)

  [[nodiscard]] bool has_value() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return has_value(); }
  [[nodiscard]] Status status() const noexcept { return status_; }

  [[nodiscard]] T& operator*() & noexcept { return *value_; }
  [[nodiscard]] const T& operator*() const& noexcept { return *value_; }
  /// On an rvalue result, the value moved out by value (not a reference
  /// into the dying result), so `for (auto& x : *make_result())` is safe.
  [[nodiscard]] T operator*() && noexcept(std::is_nothrow_move_constructible_v<T>) { return std::move(*value_); }
  [[nodiscard]] T* operator->() noexcept { return &*value_; }
  [[nodiscard]] const T* operator->() const noexcept { return &*value_; }

  /// The value; throws `postbox::error` if there is none.
  [[nodiscard]] T& value() & {
    check();
    return *value_;
  }
  [[nodiscard]] const T& value() const& {
    check();
    return *value_;
  }
  /// As operator* on an rvalue: the value by value; throws if there is none.
  [[nodiscard]] T value() && {
    check();
    return std::move(*value_);
  }
  template <class U>
  [[nodiscard]] T value_or(U&& fallback) const& {
    return value_ ? *value_ : static_cast<T>(std::forward<U>(fallback));
  }
  /// The underlying optional, for code that prefers it.
  [[nodiscard]] std::optional<T>& optional() & noexcept { return value_; }
  [[nodiscard]] std::optional<T>&& optional() && noexcept { return std::move(value_); }

 private:
  void check() const {
    if (!value_) {
      if constexpr (std::is_same_v<Status, errc>) {
        POSTBOX_THROW(error(status_, "postbox::result has no value: " + std::string(to_string(status_))));
      } else {
        POSTBOX_THROW(error(errc::invalid_argument, "postbox::result has no value: " + std::string(to_string(status_))));
      }
    }
  }

  Status status_;
  std::optional<T> value_;
};

/// Result of `receive_for` / `receive_until` / `try_receive_result`: tells
/// `timeout` from `closed` from `empty`.
template <class T>
using receive_result = result<T, receive_status>;

POSTBOX_END_NAMESPACE
