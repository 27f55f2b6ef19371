// SPDX-License-Identifier: MIT
// postbox::testing::capture_sink: a destination that records every envelope published to it, with queries for tests.
#pragma once

// Part of the test kit: <postbox/testing.hpp> includes it. The sink has the
// publishing shape of a channel (`try_send`, `send`), a topic (`publish`) and
// a stream (`append`), so `observed_send` / `observed_publish` /
// `observed_append` and code templated on its target publish into it; it
// makes an outbox relay destination (`outbox_destination`), and it drains
// what code under test left in a real channel or subscription. Queries
// return copies and work with any test framework.

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/outbox.hpp>
#include <postbox/store.hpp>
#include <postbox/stream.hpp>
#include <postbox/topic.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace testing {

namespace detail {
/// One distinct address per payload type (no RTTI needed): identifies the
/// `envelope<T>` a captured message holds.
template <class T>
struct payload_tag {
  static constexpr char id = 0;
};
template <class T>
[[nodiscard]] constexpr const void* tag_of() noexcept {
  return &payload_tag<std::remove_cvref_t<T>>::id;
}
}  // namespace detail

/// One recorded message: its envelope metadata, where it was published, the
/// capture order, the encoded body when it came through an outbox relay, and
/// a shared copy of the typed envelope (`as<T>()`). A plain value; copies
/// share the immutable envelope. Not thread-safe to modify.
struct captured_message {
  std::uint64_t sequence = 0;          ///< capture order in its sink, from 0
  std::string destination;             ///< the name given at publish (a subject, a stream key, the sink's name)
  message_id id;                       ///< the envelope's id
  std::string type;                    ///< message type name
  std::uint32_t schema_version = 1;    ///< payload schema version
  message_kind kind = message_kind::event;
  time_point occurred_at{};            ///< when the producer created it
  message_id correlation_id;           ///< the conversation
  message_id causation_id;             ///< the message that caused it (nil for an original)
  std::string producer;
  std::string partition_key;
  std::string tenant;
  trace_context trace;
  std::optional<time_point> deadline;  ///< not started after this time
  std::uint32_t attempt = 0;
  header_map headers;
  std::string body;                    ///< encoded form (outbox relay captures only), else empty
  time_point captured_at{};            ///< the sink's clock when it was recorded

  /// The typed envelope when the payload is a `T`, else null. Valid as long as
  /// this value (or a copy of it) lives. Never allocates.
  template <class T>
  [[nodiscard]] const envelope<T>* as() const noexcept {
    return tag_ == detail::tag_of<T>() ? static_cast<const envelope<T>*>(payload_.get()) : nullptr;
  }
  /// Whether the payload is a `T`. Never allocates.
  template <class T>
  [[nodiscard]] bool is() const noexcept {
    return tag_ == detail::tag_of<T>();
  }

 private:
  friend class capture_sink;
  const void* tag_ = nullptr;
  std::shared_ptr<const void> payload_;
};

/// Records every envelope published to it, in order, with its metadata.
///
/// **Example**:
///   postbox::testing::capture_sink sent;
///   handle(order_env, sent);                        // code under test publishes into `sent`
///   REQUIRE(sent.published<order_placed>().size() == 1);
///   auto chain = sent.causation_chain(sent.all().back().id);
///
/// Thread-safe: any number of threads may publish and query at once (one
/// mutex). Every record allocates (a copy of the envelope and its strings);
/// queries allocate their results. Publishing never blocks beyond the mutex.
class capture_sink {
 public:
  /// A sink named `name` (the default destination of what it records);
  /// `captured_at` is read from `clk`, which must outlive the sink.
  explicit capture_sink(std::string name = "capture", const clock& clk = default_clock())
      : name_(std::move(name)), clock_(&clk) {}

  capture_sink(const capture_sink&) = delete;
  capture_sink& operator=(const capture_sink&) = delete;

  /// The name given at construction.
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

  /// Records a copy of `env` under `destination` (empty: the sink's name).
  /// Returns its capture sequence. Allocates. Thread-safe.
  template <class T>
  std::uint64_t record(const envelope<T>& env, std::string_view destination = {}) {
    return add(make(env, destination, {}));
  }

  // --- the publishing shapes of channels, topics and streams ---------------

  /// Channel shape: records `env` and returns `ok` (a sink is never full or
  /// closed). Moves from `env`. Thread-safe.
  template <class T>
  [[nodiscard]] send_status try_send(envelope<T>&& env) {
    (void)record(env);
    return send_status::ok;
  }
  /// Channel shape, blocking form: as `try_send` (never blocks).
  template <class T>
  send_status send(envelope<T>&& env) {
    return try_send(std::move(env));
  }
  /// Topic shape: records `env` under the sink's name; the result says one
  /// delivery. Thread-safe.
  template <class T>
  publish_result publish(envelope<T> env) {
    (void)record(env);
    publish_result r;
    r.delivered = 1;
    return r;
  }
  /// Topic shape with a subject: records `env` under `subject`. Thread-safe.
  template <class T>
  publish_result publish(std::string subject, envelope<T> env) {
    (void)record(env, subject);
    publish_result r;
    r.delivered = 1;
    return r;
  }
  /// Stream shape: records `env` under `key`; the position is partition 0 and
  /// the capture sequence as offset. Thread-safe.
  template <class T>
  position append(std::string_view key, envelope<T> env) {
    return position{0, record(env, key)};
  }

  /// An outbox relay destination: decodes each stored message with `codec`
  /// and records it (keeping the encoded `body` and the message type as its
  /// destination); returns `ok`, or the codec's error (the relay treats the
  /// codes of an unreadable body as permanent), recording nothing. The sink
  /// must outlive the relay. Allocates per message. Thread-safe.
  template <class T, class Codec>
    requires envelope_codec<Codec, T>
  [[nodiscard]] outbox_destination destination(Codec codec = {}) {
    return [this, codec = std::move(codec)](const stored_message& m) -> errc {
      auto decoded = codec.template decode<T>(m.body);
      if (!decoded.has_value()) return decoded.status() == errc::ok ? errc::parse_error : decoded.status();
      const envelope<T>& env = *decoded;
      (void)add(make(env, m.type, m.body));
      return errc::ok;
    };
  }

  /// Records everything queued in `ch` now (`try_receive` until empty), for
  /// code under test that publishes into a real channel. Returns how many.
  /// Never blocks. Thread-safe as the channel.
  template <class T, class Shape>
  std::size_t drain(channel<envelope<T>, Shape>& ch, std::string_view destination = {}) {
    std::size_t n = 0;
    while (auto env = ch.try_receive()) {
      (void)record(*env, destination);
      ++n;
    }
    return n;
  }
  /// Records everything queued in a topic subscription now. Returns how many.
  /// Never blocks.
  template <class T>
  std::size_t drain(subscription<envelope<T>>& sub, std::string_view destination = {}) {
    std::size_t n = 0;
    while (auto d = sub.try_receive()) {
      (void)record(**d, destination);
      ++n;
    }
    return n;
  }

  // --- queries ---------------------------------------------------------------

  /// Messages recorded so far. Never allocates. Thread-safe.
  [[nodiscard]] std::size_t count() const {
    std::lock_guard g(mutex_);
    return messages_.size();
  }
  /// Messages recorded so far whose payload is a `T`. Thread-safe.
  template <class T>
  [[nodiscard]] std::size_t count() const {
    std::lock_guard g(mutex_);
    return static_cast<std::size_t>(
        std::count_if(messages_.begin(), messages_.end(), [](const captured_message& c) { return c.is<T>(); }));
  }
  /// Messages for which `pred(const captured_message&)` holds. Thread-safe.
  template <class Pred>
  [[nodiscard]] std::size_t count_where(Pred pred) const {
    std::lock_guard g(mutex_);
    return static_cast<std::size_t>(std::count_if(messages_.begin(), messages_.end(), pred));
  }

  /// Copies of the envelopes whose payload is a `T`, in capture order.
  /// Allocates. Thread-safe.
  template <class T>
  [[nodiscard]] std::vector<envelope<T>> published() const {
    std::vector<envelope<T>> out;
    std::lock_guard g(mutex_);
    for (const captured_message& c : messages_) {
      if (const envelope<T>* e = c.as<T>()) out.push_back(*e);
    }
    return out;
  }
  /// The captured messages for which `pred(const captured_message&)` holds,
  /// in capture order (`c.as<T>()` gives a typed view). `pred` runs under the
  /// sink's mutex: it must not call back into the sink. Allocates. Thread-safe.
  template <class Pred>
  [[nodiscard]] std::vector<captured_message> published_where(Pred pred) const {
    std::vector<captured_message> out;
    std::lock_guard g(mutex_);
    for (const captured_message& c : messages_) {
      if (pred(c)) out.push_back(c);
    }
    return out;
  }
  /// Every captured message, in capture order. Allocates. Thread-safe.
  [[nodiscard]] std::vector<captured_message> all() const {
    std::lock_guard g(mutex_);
    return messages_;
  }
  /// The first message recorded with id `id` (a relay's duplicate carries
  /// the same id), or empty. Allocates. Thread-safe.
  [[nodiscard]] std::optional<captured_message> find(message_id id) const {
    std::lock_guard g(mutex_);
    return find_locked(id);
  }
  /// How many times a message with id `id` was recorded (more than 1:
  /// published again, e.g. by a relay after a crash). Thread-safe.
  [[nodiscard]] std::size_t times(message_id id) const {
    std::lock_guard g(mutex_);
    return static_cast<std::size_t>(
        std::count_if(messages_.begin(), messages_.end(), [&](const captured_message& c) { return c.id == id; }));
  }

  /// The causation chain of message `id`: its captured ancestors, root
  /// first, followed by the message itself, found by following
  /// `causation_id` through what this sink recorded. It starts at the
  /// first ancestor this sink did not see, so a message whose parent was
  /// never captured is a chain of one; empty when `id` was not captured.
  /// Stops on a cycle. Allocates. Thread-safe.
  [[nodiscard]] std::vector<captured_message> causation_chain(message_id id) const {
    std::vector<captured_message> chain;
    std::lock_guard g(mutex_);
    for (auto at = find_locked(id); at.has_value(); at = find_locked(at->causation_id)) {
      const message_id current = at->id;
      if (std::any_of(chain.begin(), chain.end(), [&](const captured_message& c) { return c.id == current; })) break;
      const message_id parent = at->causation_id;
      chain.push_back(std::move(*at));
      if (parent.is_nil()) break;
    }
    std::reverse(chain.begin(), chain.end());
    return chain;
  }
  /// The messages directly caused by `id` (their `causation_id` is `id`), in
  /// capture order. Allocates. Thread-safe.
  [[nodiscard]] std::vector<captured_message> caused_by(message_id id) const {
    return published_where([id](const captured_message& c) { return c.causation_id == id; });
  }

  /// Waits until at least `n` messages are recorded, at most `bound` of real
  /// time (a generous bound for a hand-off from another thread, not a
  /// timing assertion). Returns whether `n` were reached. Blocks. Thread-safe.
  [[nodiscard]] bool wait_for_count(std::size_t n, std::chrono::milliseconds bound = std::chrono::seconds(10)) const {
    std::unique_lock l(mutex_);
    return recorded_.wait_for(l, bound, [&] { return messages_.size() >= n; });
  }

  /// Forgets everything recorded; sequences start again from 0. Thread-safe.
  void clear() {
    std::lock_guard g(mutex_);
    messages_.clear();
  }

 private:
  template <class T>
  captured_message make(const envelope<T>& env, std::string_view destination, std::string_view body) const {
    captured_message c;
    c.destination = destination.empty() ? name_ : std::string(destination);
    c.id = env.id;
    c.type = env.type;
    c.schema_version = env.schema_version;
    c.kind = env.kind;
    c.occurred_at = env.occurred_at;
    c.correlation_id = env.correlation_id;
    c.causation_id = env.causation_id;
    c.producer = env.producer;
    c.partition_key = env.partition_key;
    c.tenant = env.tenant;
    c.trace = env.trace;
    c.deadline = env.deadline;
    c.attempt = env.attempt;
    c.headers = env.headers;
    c.body = std::string(body);
    c.captured_at = clock_->now();
    c.tag_ = detail::tag_of<T>();
    c.payload_ = std::make_shared<const envelope<T>>(env);
    return c;
  }

  std::uint64_t add(captured_message c) {
    std::uint64_t seq = 0;
    {
      std::lock_guard g(mutex_);
      seq = messages_.size();
      c.sequence = seq;
      messages_.push_back(std::move(c));
    }
    recorded_.notify_all();
    return seq;
  }

  std::optional<captured_message> find_locked(message_id id) const {
    if (id.is_nil()) return std::nullopt;
    for (const captured_message& c : messages_) {
      if (c.id == id) return c;
    }
    return std::nullopt;
  }

  std::string name_;
  const clock* clock_;
  mutable std::mutex mutex_;
  mutable std::condition_variable recorded_;
  std::vector<captured_message> messages_;
};

}  // namespace testing
POSTBOX_END_NAMESPACE
