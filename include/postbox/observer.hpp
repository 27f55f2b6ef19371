// SPDX-License-Identifier: MIT
// Observer hooks for publish, receive and settle, so tracing and logging plug into postbox's message flow.
#pragma once

// Design: docs/design/consumer.md ("Observer hooks").
//
// The channel fast path stays hook-free: consumers call the receive and
// settle hooks themselves, and producers that want on_publish go through
// `observed_send` / `observed_publish` / `observed_append`.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/redaction.hpp>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// How one delivery ended, as `observer::on_settle` reports it and consumer
/// stats count it.
enum class settle_outcome : std::uint8_t {
  none,                 ///< not a settle event (publish, receive)
  acked,                ///< handled; the source was told to forget it
  retried,              ///< will be delivered again after a delay (by the consumer or by a broker)
  deferred,             ///< put back for later without consuming an attempt
  dead_lettered,        ///< stored in the dead-letter queue (`reason` says why)
  dead_letter_refused,  ///< the dead-letter queue refused it (full); kept by the consumer, released to the source
  released,             ///< given back unsettled (shutdown)
};

/// Stable lower-case name, e.g. "dead_lettered". Never allocates.
[[nodiscard]] constexpr std::string_view to_string(settle_outcome o) noexcept {
  switch (o) {
    case settle_outcome::none: return "none";
    case settle_outcome::acked: return "acked";
    case settle_outcome::retried: return "retried";
    case settle_outcome::deferred: return "deferred";
    case settle_outcome::dead_lettered: return "dead_lettered";
    case settle_outcome::dead_letter_refused: return "dead_letter_refused";
    case settle_outcome::released: return "released";
  }
  return "unknown";
}

/// What a hook is told about one message: envelope metadata plus, for
/// settle events, the outcome, the handler's duration (on the consumer's
/// clock) and the reason or error text. Headers and payload are never part
/// of an event, and `observer` scrubs `reason` with the process-wide
/// redaction policy before a hook sees it. The views are valid only during
/// the call; copy what you keep. A plain value.
struct message_event {
  message_id id;                             ///< the envelope id (nil for undecodable input)
  std::string_view type;                     ///< message type name
  message_id correlation_id;                 ///< conversation id
  message_id causation_id;                   ///< parent message id
  std::uint32_t attempt = 0;                 ///< deliveries started so far (this one included on receive/settle)
  std::string_view partition_key;            ///< ordering key
  std::string_view tenant;                   ///< the envelope's tenant, empty when none
  std::string_view traceparent;              ///< W3C traceparent, empty when none
  std::string_view source;                   ///< channel / topic / stream / consumer name
  settle_outcome outcome = settle_outcome::none;  ///< settle events only
  duration elapsed{0};                       ///< handler time, settle events only (zero when not started)
  std::string_view reason;                   ///< dead-letter reason or error text, settle events only
};

/// Builds an event from an envelope's metadata. Never allocates (views into `env`).
template <class T>
[[nodiscard]] message_event make_message_event(const envelope<T>& env, std::string_view source = {}) noexcept {
  message_event e;
  e.id = env.id;
  e.type = env.type;
  e.correlation_id = env.correlation_id;
  e.causation_id = env.causation_id;
  e.attempt = env.attempt;
  e.partition_key = env.partition_key;
  e.tenant = env.tenant;
  e.traceparent = env.trace.traceparent;
  e.source = source;
  return e;
}

/// A one-line text of an event, e.g. `settle dead_lettered order.placed
/// id=0190... attempt=3 source=orders tenant=acme reason=...` (the
/// outcome part only for settle events; empty fields left out). The reason
/// is scrubbed with the process-wide redaction policy. Allocates. Thread-safe.
[[nodiscard]] inline std::string describe(const message_event& e) {
  std::string out = e.outcome == settle_outcome::none ? "event" : "settle " + std::string(to_string(e.outcome));
  if (!e.type.empty()) (out += ' ') += e.type;
  out += " id=" + e.id.to_string() + " attempt=" + std::to_string(e.attempt);
  if (!e.source.empty()) (out += " source=") += e.source;
  if (!e.partition_key.empty()) (out += " key=") += e.partition_key;
  if (!e.tenant.empty()) (out += " tenant=") += e.tenant;
  if (!e.reason.empty()) out += " reason=" + current_redaction_policy()->scrub(e.reason);
  return out;
}

/// Observer hooks: set any of the three functions before sharing the
/// observer, then pass a pointer to consumers (`consumer_options::observer`)
/// and to the `observed_*` helpers. A hook that throws is caught and
/// counted (`failures()`); it never breaks the caller. Hooks run on the
/// thread that publishes, receives or settles, outside postbox's locks, and
/// may run concurrently: make them thread-safe. The `notify_*` members are
/// thread-safe once the hooks are set; do not reassign hooks while in use.
class observer {
 public:
  using hook = std::function<void(const message_event&)>;

  hook on_publish;  ///< after a message was handed to a channel, topic or stream
  hook on_receive;  ///< when a consumer starts a delivery (handler about to run)
  hook on_settle;   ///< when a delivery's outcome is decided

  observer() = default;
  observer(const observer&) = delete;
  observer& operator=(const observer&) = delete;

  /// Calls `on_publish` if set. Never throws. Thread-safe.
  void notify_publish(const message_event& e) const noexcept { call(on_publish, e); }
  /// Calls `on_receive` if set. Never throws. Thread-safe.
  void notify_receive(const message_event& e) const noexcept { call(on_receive, e); }
  /// Calls `on_settle` if set, with `reason` scrubbed of secrets by the
  /// process-wide redaction policy (URL passwords, `token=...` pairs; a
  /// copy is made only when the reason holds one). Never throws. Thread-safe.
  void notify_settle(const message_event& e) const noexcept {
    if (!on_settle) return;
    if (e.reason.find_first_of(":=") == std::string_view::npos) return call(on_settle, e);
    POSTBOX_TRY {
      const std::string scrubbed = current_redaction_policy()->scrub(e.reason);
      message_event copy = e;
      copy.reason = scrubbed;
      return call(on_settle, copy);
    }
    POSTBOX_CATCH_ALL {  // no memory to scrub: report without the reason rather than leak it
      message_event copy = e;
      copy.reason = redacted_text;
      call(on_settle, copy);
    }
  }

  /// Hook calls that threw so far. Never blocks. Thread-safe.
  [[nodiscard]] std::uint64_t failures() const noexcept {
    return failures_.load(std::memory_order_relaxed);  // relaxed: a statistic
  }

 private:
  void call(const hook& h, const message_event& e) const noexcept {
    if (!h) return;
    POSTBOX_TRY { h(e); }
    POSTBOX_CATCH_ALL {
      failures_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
    }
  }

  /// Count of hook calls that threw. Written by whichever thread called the
  /// hook (relaxed fetch_add), read by failures() (relaxed): a statistic,
  /// nothing is published through it.
  mutable std::atomic<std::uint64_t> failures_{0};
};

namespace detail {
/// The metadata of an envelope that is about to be moved away, kept so the
/// publish hook can still report it. Allocates only for long strings.
struct published_meta {
  message_id id, correlation_id, causation_id;
  std::uint32_t attempt = 0;
  std::string type, partition_key, tenant, traceparent;

  template <class T>
  explicit published_meta(const envelope<T>& env)
      : id(env.id), correlation_id(env.correlation_id), causation_id(env.causation_id), attempt(env.attempt),
        type(env.type), partition_key(env.partition_key), tenant(env.tenant), traceparent(env.trace.traceparent) {}

  [[nodiscard]] message_event event(std::string_view source) const noexcept {
    message_event e;
    e.id = id;
    e.type = type;
    e.correlation_id = correlation_id;
    e.causation_id = causation_id;
    e.attempt = attempt;
    e.partition_key = partition_key;
    e.tenant = tenant;
    e.traceparent = traceparent;
    e.source = source;
    return e;
  }
};
}  // namespace detail

/// `ch.try_send(std::move(env))`, then `obs->on_publish` when it returned
/// `ok` (with `source` as the event's source). `obs` may be null. Never
/// blocks; copies the envelope's metadata only when a publish hook is set.
/// `env` is moved from only on `ok`, as with `try_send`. Thread-safe as the channel.
template <class Channel, class T>
[[nodiscard]] send_status observed_send(Channel& ch, envelope<T>&& env, const observer* obs,
                                        std::string_view source = {}) {
  if (obs == nullptr || !obs->on_publish) return ch.try_send(std::move(env));
  const detail::published_meta meta(env);
  const send_status s = ch.try_send(std::move(env));
  if (s == send_status::ok) obs->notify_publish(meta.event(source));
  return s;
}

/// `t.publish(std::move(env))` on a `topic<envelope<T>>`, then
/// `obs->on_publish`. Returns the topic's publish_result. Blocks as the
/// topic's `block` subscriptions do. Thread-safe as the topic.
template <class Topic, class T>
auto observed_publish(Topic& t, envelope<T> env, const observer* obs, std::string_view source = {}) {
  if (obs == nullptr || !obs->on_publish) return t.publish(std::move(env));
  const detail::published_meta meta(env);
  auto r = t.publish(std::move(env));
  obs->notify_publish(meta.event(source));
  return r;
}

/// `s.append(env.partition_key, std::move(env))` on a `stream<envelope<T>>`,
/// then `obs->on_publish`. Returns the position. Thread-safe as the stream.
template <class Stream, class T>
auto observed_append(Stream& s, envelope<T> env, const observer* obs, std::string_view source = {}) {
  if (obs == nullptr || !obs->on_publish) {
    const std::string key = env.partition_key;
    return s.append(key, std::move(env));
  }
  const detail::published_meta meta(env);
  auto pos = s.append(meta.partition_key, std::move(env));
  obs->notify_publish(meta.event(source));
  return pos;
}

POSTBOX_END_NAMESPACE
