// SPDX-License-Identifier: MIT
// postbox::settlement: a handler's outcome for a delivery or a batch, exception classification, and the settle action and hook that carry the outcome to the source.
#pragma once

// Design: docs/design/consumer.md ("Settlement semantics"; settle actions
// under "The source concept"). The consumer runtime, consumer.hpp, includes
// this header; the sources that receive settle actions are in
// consumer/sources.hpp.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>

#include <concepts>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

// ---------------------------------------------------------------------------
// Settlement
// ---------------------------------------------------------------------------

/// A handler's outcome for one delivery, as a value.
///
/// * `ack()`: done; the source forgets the message.
/// * `retry()`: deliver again after the retry policy's backoff
///   (`policy.backoff(attempt, jitter.next())`); `retry(after)`: after
///   `after` instead. Either way the policy's `max_attempts` bounds the
///   attempts: when `exhausted(attempt)`, the message is dead-lettered with
///   reason "retries_exhausted".
/// * `reject(reason)`: dead-letter now with `reason` ("rejected" when empty).
/// * `defer()`: put the message back for later without consuming an
///   attempt: its `attempt` is restored and it is delivered again after
///   `consumer_options::defer_delay`, still first in line for its partition
///   key. (A broker source counts the delivery anyway: see `redelivers`.)
///
/// A plain value; the factories never allocate except `reject`'s reason.
class settlement {
 public:
  /// The four outcomes.
  enum class kind : std::uint8_t { ack, retry, reject, defer };

  /// An ack.
  settlement() noexcept = default;

  /// Done.
  [[nodiscard]] static settlement ack() noexcept { return settlement(kind::ack); }
  /// Again, after the retry policy's backoff.
  [[nodiscard]] static settlement retry() noexcept { return settlement(kind::retry); }
  /// Again, after `after` (negative counts as zero).
  [[nodiscard]] static settlement retry(duration after) noexcept {
    settlement s(kind::retry);
    s.after_ = after.count() < 0 ? duration::zero() : after;
    return s;
  }
  /// Dead-letter now with `reason`. Allocates the reason.
  [[nodiscard]] static settlement reject(std::string reason = {}) {
    settlement s(kind::reject);
    s.reason_ = std::move(reason);
    return s;
  }
  /// Later, without consuming an attempt.
  [[nodiscard]] static settlement defer() noexcept { return settlement(kind::defer); }

  /// Which outcome. Never allocates.
  [[nodiscard]] kind what() const noexcept { return kind_; }
  /// The explicit delay of `retry(after)`; empty for `retry()` and others.
  [[nodiscard]] std::optional<duration> after() const noexcept { return after_; }
  /// The reason of `reject(reason)`; empty otherwise.
  [[nodiscard]] const std::string& reason() const noexcept { return reason_; }

 private:
  explicit settlement(kind k) noexcept : kind_(k) {}
  kind kind_ = kind::ack;
  std::optional<duration> after_;
  std::string reason_;
};

/// Stable lower-case name of a settlement kind. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(settlement::kind k) noexcept {
  switch (k) {
    case settlement::kind::ack: return "ack";
    case settlement::kind::retry: return "retry";
    case settlement::kind::reject: return "reject";
    case settlement::kind::defer: return "defer";
  }
  return "unknown";
}

/// How a handler's exception is treated: `transient` retries by policy,
/// `permanent` dead-letters at once (reason "permanent_error").
enum class error_class : std::uint8_t { transient, permanent };

/// Classifies a handler's exception. Called on the worker thread; if it
/// throws, the error counts as transient.
using error_classifier = std::function<error_class(std::exception_ptr)>;

namespace detail {
/// Whether `ep` holds an exception of type `E` (or derived from it).
template <class E>
[[nodiscard]] bool exception_is(const std::exception_ptr& ep) noexcept {
#if POSTBOX_HAS_EXCEPTIONS
  try {
    std::rethrow_exception(ep);
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
#else
  (void)ep;
  return false;
#endif
}
}  // namespace detail

/// A classifier that calls exceptions of the listed types (or derived from
/// them) permanent and everything else transient. Allocates the function.
template <class... Permanent>
[[nodiscard]] error_classifier permanent_on() {
  return [](std::exception_ptr ep) {
    const bool hit = (detail::exception_is<Permanent>(ep) || ...);
    return hit ? error_class::permanent : error_class::transient;
  };
}

/// A batch handler's outcome: one settlement for the whole batch, or one per
/// message in batch order. A plain value; allocates only the vector.
class batch_settlement {
 public:
  /// Every message acked.
  batch_settlement() noexcept = default;
  /// One settlement for every message of the batch.
  batch_settlement(settlement all) : all_(std::move(all)) {}  // NOLINT(google-explicit-constructor)
  /// One settlement per message, in batch order. A size other than the
  /// batch's is a handler error (every message is retried by policy).
  batch_settlement(std::vector<settlement> each)  // NOLINT(google-explicit-constructor)
      : each_(std::move(each)), per_message_(true) {}

  /// Whether it holds one settlement per message.
  [[nodiscard]] bool per_message() const noexcept { return per_message_; }
  /// The settlement for the whole batch (when `!per_message()`).
  [[nodiscard]] const settlement& for_batch() const noexcept { return all_; }
  /// The per-message settlements (when `per_message()`).
  [[nodiscard]] const std::vector<settlement>& each() const noexcept { return each_; }

 private:
  settlement all_{};
  std::vector<settlement> each_;
  bool per_message_ = false;
};

// ---------------------------------------------------------------------------
// Settling with the source
// ---------------------------------------------------------------------------

/// What a consumer tells a source about one received item, through the
/// item's settle hook. Exactly one action per item, from any consumer thread.
struct settle_action {
  enum class kind : std::uint8_t {
    ack,          ///< handled: forget it (broker: ack; stream: may commit past it)
    dead_letter,  ///< stored in the dead-letter queue: forget it (broker: term; stream: may commit past it)
    redeliver,    ///< only for `redelivers` sources: deliver again after `delay` (broker: nak with delay)
    release,      ///< given back unsettled (shutdown, or the dead-letter queue was full): redeliver
                  ///< whenever convenient (broker: nak now; stream: never commit past it)
  };
  kind what = kind::ack;
  duration delay{0};  ///< redeliver only
};

/// Stable lower-case name of a settle action. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(settle_action::kind k) noexcept {
  switch (k) {
    case settle_action::kind::ack: return "ack";
    case settle_action::kind::dead_letter: return "dead_letter";
    case settle_action::kind::redeliver: return "redeliver";
    case settle_action::kind::release: return "release";
  }
  return "unknown";
}

/// A move-only callable `void(const settle_action&)` that a source attaches
/// to a received item for its broker-side effects (ack, commit, nak). Empty
/// means "nothing to do". The consumer calls it at most once, outside its
/// locks, from any of its threads; an exception from it is caught and
/// counted (`consumer_stats::hook_failures`). Allocates once when set.
class settle_hook {
 public:
  settle_hook() noexcept = default;
  /// Wraps `f`, callable as `f(const settle_action&)`.
  template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, settle_hook> && std::invocable<F&, const settle_action&>)
  settle_hook(F&& f)  // NOLINT(google-explicit-constructor)
      : impl_(std::make_unique<model<std::decay_t<F>>>(std::forward<F>(f))) {}
  settle_hook(settle_hook&&) noexcept = default;
  settle_hook& operator=(settle_hook&&) noexcept = default;

  /// Runs the hook (no-op when empty). May throw what the hook throws.
  void operator()(const settle_action& a) {
    if (impl_) impl_->call(a);
  }
  /// Whether a hook is set.
  explicit operator bool() const noexcept { return impl_ != nullptr; }

 private:
  struct base {
    virtual ~base() = default;
    virtual void call(const settle_action&) = 0;
  };
  template <class F>
  struct model final : base {
    template <class G>
    explicit model(G&& g) : f(std::forward<G>(g)) {}
    void call(const settle_action& a) override { f(a); }
    F f;
  };
  std::unique_ptr<base> impl_;
};

POSTBOX_END_NAMESPACE
