// SPDX-License-Identifier: MIT
// postbox::topic: publish-subscribe fan-out of one shared immutable message, with per-subscription overflow policies, groups and subjects.
#pragma once

// Design: docs/design/topic.md.
//
// * A publish allocates the message once (`std::shared_ptr<const item>`) and
//   pushes that pointer into each matching subscription's bounded
//   `postbox::channel`; subscribers get a `delivery<T>` handle that shares it.
// * The subscription list is a copy-on-write snapshot (`detail::snapshot_ptr`):
//   a publisher copies the current `shared_ptr<const list>` in a critical
//   section of a few instructions (what libstdc++'s atomic<shared_ptr> does
//   with a lock bit, but visible to ThreadSanitizer); subscribe/unsubscribe
//   copy the list under the writer mutex and swap in a new one. Cost:
//   subscribe/unsubscribe are O(subscriptions) and allocate; a publish pays
//   one short uncontended lock and two refcount updates, then delivers with
//   no lock of ours (each queue is a lock-free postbox::channel).
// * A subscription's state lives in a shared_ptr owned by the snapshot and by
//   the handle, so destroying the handle during an in-flight publish is safe:
//   the destructor removes it from the list and closes its channel, which
//   also releases a publisher blocked on it (`block` policy).

#include <postbox/channel.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/topic_snapshot.hpp>
#include <postbox/error.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// What a publish does when a subscription's queue is full.
enum class overflow {
  block,        ///< the publisher waits for this subscriber (only it)
  drop_oldest,  ///< the oldest queued message is discarded; the subscriber sees a lag count
  drop_newest,  ///< the new message is discarded for this subscription
  fail,         ///< the new message is discarded and the publish reports this subscription
};

namespace detail {

inline bool topic_valid_token(std::string_view t) noexcept {
  if (t.empty()) return false;
  for (char c : t)
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '*' || c == '>' || c == '.') return false;
  return true;
}

template <class F>
void topic_split(std::string_view s, F&& f) {
  std::size_t start = 0;
  for (;;) {
    const auto dot = s.find('.', start);
    const bool last = dot == std::string_view::npos;
    f(s.substr(start, last ? s.size() - start : dot - start), last);
    if (last) return;
    start = dot + 1;
  }
}

}  // namespace detail

/// Whether `subject` is a valid publish subject: non-empty dot-separated
/// tokens, no wildcards, no whitespace. Never blocks or allocates.
[[nodiscard]] inline bool is_valid_subject(std::string_view subject) noexcept {
  if (subject.empty()) return false;
  bool ok = true;
  detail::topic_split(subject, [&](std::string_view t, bool) { ok = ok && detail::topic_valid_token(t); });
  return ok;
}

/// Whether `pattern` is a valid subscription pattern: tokens as in a subject,
/// or `*` (exactly one token), or `>` as the last token (one or more tokens).
[[nodiscard]] inline bool is_valid_pattern(std::string_view pattern) noexcept {
  if (pattern.empty()) return false;
  bool ok = true;
  bool seen_tail = false;
  detail::topic_split(pattern, [&](std::string_view t, bool last) {
    if (seen_tail) ok = false;
    if (t == ">") {
      seen_tail = true;
      if (!last) ok = false;
    } else if (t != "*" && !detail::topic_valid_token(t)) {
      ok = false;
    }
  });
  return ok;
}

/// NATS-style match of a valid subject against a valid pattern. Never blocks or allocates.
[[nodiscard]] inline bool subject_matches(std::string_view pattern, std::string_view subject) noexcept {
  for (;;) {
    const auto pd = pattern.find('.');
    const auto sd = subject.find('.');
    const auto pt = pattern.substr(0, pd);
    const auto st = subject.substr(0, sd);
    if (pt == ">") return !subject.empty();
    if (subject.empty()) return false;
    if (pt != "*" && pt != st) return false;
    const bool p_end = pd == std::string_view::npos;
    const bool s_end = sd == std::string_view::npos;
    if (p_end || s_end) return p_end && s_end;
    pattern.remove_prefix(pd + 1);
    subject.remove_prefix(sd + 1);
  }
}

/// Options for `topic<T>::subscribe`.
struct subscription_options {
  std::size_t capacity = 1024;          ///< queue bound (rounded up to a power of two)
  overflow policy = overflow::block;    ///< what a publish does when the queue is full
  std::string group;                    ///< non-empty: members of this group compete for each message
  std::string pattern;                  ///< empty: every message; else a subject pattern (`orders.*`, `orders.>`)
};

/// Identifies a subscription (or a group) in a publish_result.
using subscription_id = std::uint64_t;

/// Outcome of a publish.
struct publish_result {
  std::size_t delivered = 0;              ///< subscriptions/groups that queued the message
  std::size_t dropped = 0;                ///< drop_newest subscriptions that discarded it
  std::vector<subscription_id> refused;   ///< `fail` subscriptions that were full (allocates only then)
  /// True when no `fail` subscription refused the message.
  [[nodiscard]] bool ok() const noexcept { return refused.empty(); }
};

/// One subscription (or group) in a topic_stats snapshot.
struct topic_subscription_stats {
  subscription_id id = 0;
  std::string group;           ///< empty for a plain subscription
  std::string pattern;         ///< empty: every message
  overflow policy = overflow::block;
  std::size_t members = 0;     ///< handles sharing the queue (group members)
  std::size_t depth = 0;       ///< messages queued
  std::size_t capacity = 0;    ///< queue bound
  std::uint64_t delivered = 0; ///< messages queued into it since it was created
  std::uint64_t received = 0;  ///< messages taken out by its subscribers
  std::uint64_t lag = 0;       ///< messages discarded by drop_oldest since it was created
  std::uint64_t dropped = 0;   ///< messages discarded by drop_newest / fail
};

/// A topic's counters (snapshot). `delivered` and `dropped` sum over the
/// current subscriptions (a subscription's counts leave with it).
struct topic_stats {
  std::size_t subscriptions = 0;  ///< current subscriptions (a group counts once)
  std::uint64_t published = 0;    ///< publishes since the topic was created
  std::uint64_t delivered = 0;    ///< copies queued into current subscriptions
  std::uint64_t dropped = 0;      ///< copies discarded by current subscriptions (any policy)
  std::vector<topic_subscription_stats> per_subscription;
};

namespace detail {

template <class T>
struct topic_item {
  std::string subject;
  T value;
};

}  // namespace detail

/// A received message: a cheap handle sharing the one immutable copy made by
/// the publish (no per-subscriber copy of `T`). Copying it never copies `T`.
template <class T>
class delivery {
 public:
  delivery() = default;
  explicit delivery(std::shared_ptr<const detail::topic_item<T>> p) noexcept : item_(std::move(p)) {}
  /// The message. Never blocks; thread-safe (immutable).
  [[nodiscard]] const T& operator*() const noexcept { return item_->value; }
  [[nodiscard]] const T* operator->() const noexcept { return &item_->value; }
  /// The subject it was published on (empty for `publish(value)`).
  [[nodiscard]] const std::string& subject() const noexcept { return item_->subject; }
  /// A shared pointer to the message, aliasing the shared item.
  [[nodiscard]] std::shared_ptr<const T> share() const noexcept {
    return std::shared_ptr<const T>(item_, &item_->value);
  }
  explicit operator bool() const noexcept { return item_ != nullptr; }

 private:
  std::shared_ptr<const detail::topic_item<T>> item_;
};

namespace detail {

template <class T>
struct topic_queue {
  using item_ptr = std::shared_ptr<const topic_item<T>>;
  topic_queue(subscription_id i, const subscription_options& o) : id(i), opts(o), ch(o.capacity) {}
  const subscription_id id;
  const subscription_options opts;
  channel<item_ptr, mpmc> ch;
  // Messages discarded by drop_oldest not yet reported. Writers: publishers
  // (fetch_add); reader: the subscriber (exchange). Relaxed: a pure counter,
  // nothing else is published through it.
  std::atomic<std::uint64_t> lag{0};
  // Messages discarded by drop_newest/fail (statistics). Relaxed counter.
  std::atomic<std::uint64_t> dropped{0};
  // Messages discarded by drop_oldest since creation (statistics; `lag` is
  // reset by take_lag, this is not). Writers: publishers (relaxed fetch_add
  // next to `lag`); reader: stats(). Relaxed: a pure counter.
  std::atomic<std::uint64_t> lag_total{0};
  std::size_t members = 0;  // group members; guarded by the topic's writer mutex

  // Pushes `p` under this queue's policy. Returns 0 delivered, 1 dropped, 2 refused, 3 closed.
  int push(const item_ptr& p) {
    item_ptr copy = p;
    switch (opts.policy) {
      case overflow::block:
        return ch.send(std::move(copy)) == send_status::ok ? 0 : 3;
      case overflow::drop_oldest:
        for (;;) {
          const auto s = ch.try_send(std::move(copy));
          if (s == send_status::ok) return 0;
          if (s == send_status::closed) return 3;
          if (ch.try_receive()) {
            lag.fetch_add(1, std::memory_order_relaxed);        // relaxed: counter only
            lag_total.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
          }
        }
      case overflow::drop_newest: {
        const auto s = ch.try_send(std::move(copy));
        if (s == send_status::ok) return 0;
        if (s == send_status::closed) return 3;
        dropped.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
        return 1;
      }
      case overflow::fail: {
        const auto s = ch.try_send(std::move(copy));
        if (s == send_status::ok) return 0;
        if (s == send_status::closed) return 3;
        dropped.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
        return 2;
      }
    }
    return 3;
  }
};

template <class T>
struct topic_state {
  using queue_ptr = std::shared_ptr<topic_queue<T>>;
  using list = std::vector<queue_ptr>;
  // The current subscription list (copy-on-write). Writers: subscribe and
  // unsubscribe, under `mu`, store a fresh list. Readers: publishers load it.
  // A publish that starts after an unsubscribe returned never sees the
  // removed queue (the snapshot's mutex orders them).
  snapshot_ptr<list> subs{std::make_shared<const list>()};
  std::mutex mu;
  subscription_id next_id = 1;  // guarded by mu
  // Publishes since creation (statistics). Writers: publishers (relaxed
  // fetch_add, one per publish); reader: topic::stats(). Relaxed: a pure
  // counter, nothing is published through it.
  std::atomic<std::uint64_t> published{0};

  queue_ptr add(const subscription_options& o) {
    if (!o.pattern.empty() && !is_valid_pattern(o.pattern))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::topic: invalid subject pattern '" + o.pattern + "'"));
    if (o.capacity == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::topic: capacity must be at least 1"));
    std::lock_guard lock(mu);
    auto cur = subs.load();
    if (!o.group.empty()) {
      for (const auto& q : *cur) {
        if (q->opts.group == o.group) {
          if (q->opts.pattern != o.pattern)
            POSTBOX_THROW(error(errc::conflict, "postbox::topic: group '" + o.group + "' uses another pattern"));
          ++q->members;
          return q;
        }
      }
    }
    auto q = std::make_shared<topic_queue<T>>(next_id++, o);
    q->members = 1;
    auto next = std::make_shared<list>(*cur);
    next->push_back(q);
    subs.store(std::move(next));
    return q;
  }

  void remove(const queue_ptr& q) {
    std::lock_guard lock(mu);
    if (--q->members != 0) return;
    auto cur = subs.load();
    auto next = std::make_shared<list>();
    next->reserve(cur->size());
    for (const auto& e : *cur)
      if (e != q) next->push_back(e);
    subs.store(std::move(next));
    q->ch.close();  // releases a publisher blocked on it
  }
};

}  // namespace detail

template <class T>
class topic;

/// A subscription handle (RAII): destroying or resetting it unsubscribes,
/// also while a publish is in flight on another thread. Move-only.
/// Receive operations are thread-safe (a group's members share one queue).
template <class T>
class subscription {
 public:
  subscription() = default;
  subscription(subscription&&) noexcept = default;
  subscription& operator=(subscription&& o) noexcept {
    if (this != &o) {
      reset();
      state_ = std::move(o.state_);
      q_ = std::move(o.q_);
    }
    return *this;
  }
  subscription(const subscription&) = delete;
  subscription& operator=(const subscription&) = delete;
  ~subscription() { reset(); }

  /// Unsubscribes now (idempotent). Blocks only on the topic's writer mutex; allocates the new list.
  void reset() {
    if (q_) state_->remove(q_);
    q_.reset();
    state_.reset();
  }

  /// Next message or an empty handle. Never blocks or allocates.
  [[nodiscard]] std::optional<delivery<T>> try_receive() noexcept {
    auto p = q_->ch.try_receive();
    if (!p) return std::nullopt;
    return delivery<T>(std::move(*p));
  }
  /// Blocks until a message arrives; empty only after unsubscribe.
  [[nodiscard]] std::optional<delivery<T>> receive() {
    auto p = q_->ch.receive();
    if (!p) return std::nullopt;
    return delivery<T>(std::move(*p));
  }
  /// Blocks at most `timeout` (real time, as the channel); status ok, timeout or closed.
  template <class Rep, class Period>
  [[nodiscard]] receive_result<delivery<T>> receive_for(std::chrono::duration<Rep, Period> timeout) {
    auto r = q_->ch.receive_for(timeout);
    if (!r.has_value()) return receive_result<delivery<T>>(r.status());
    return receive_result<delivery<T>>(delivery<T>(std::move(*r)));
  }
  /// drop_oldest: messages discarded since the last call (and resets the count). Never blocks.
  [[nodiscard]] std::uint64_t take_lag() noexcept {
    return q_->lag.exchange(0, std::memory_order_relaxed);  // relaxed: counter only
  }
  /// Messages discarded by drop_newest / fail so far. Never blocks.
  [[nodiscard]] std::uint64_t dropped() const noexcept {
    return q_->dropped.load(std::memory_order_relaxed);  // relaxed: counter only
  }
  /// The id reported in publish_result::refused (shared by a group's members).
  [[nodiscard]] subscription_id id() const noexcept { return q_->id; }
  /// Queued messages (approximate under concurrency). Never blocks.
  [[nodiscard]] std::size_t size_approx() const noexcept { return q_->ch.size_approx(); }
  /// Whether this handle is subscribed.
  explicit operator bool() const noexcept { return q_ != nullptr; }

 private:
  friend class topic<T>;
  subscription(std::shared_ptr<detail::topic_state<T>> s, std::shared_ptr<detail::topic_queue<T>> q) noexcept
      : state_(std::move(s)), q_(std::move(q)) {}
  std::shared_ptr<detail::topic_state<T>> state_;
  std::shared_ptr<detail::topic_queue<T>> q_;
};

/// Publish-subscribe topic. Thread-safe for any number of publishers and
/// subscribers. A subscription without a pattern receives every message;
/// one with a pattern receives only `publish(subject, ...)` whose subject matches.
template <class T>
class topic {
 public:
  topic() : state_(std::make_shared<detail::topic_state<T>>()) {}
  topic(const topic&) = delete;
  topic& operator=(const topic&) = delete;

  /// Subscribes (joins the group when `options.group` is set). Allocates; takes
  /// the writer mutex. Throws error(invalid_argument) for a bad pattern or
  /// capacity 0, error(conflict) when a group is joined with another pattern.
  [[nodiscard]] subscription<T> subscribe(subscription_options options = {}) {
    return subscription<T>(state_, state_->add(options));
  }
  /// Same, with a subject pattern.
  [[nodiscard]] subscription<T> subscribe(std::string pattern, subscription_options options = {}) {
    options.pattern = std::move(pattern);
    return subscribe(std::move(options));
  }

  /// Publishes to every subscription without a pattern. Allocates the message
  /// once; blocks only on full `block` subscriptions. Thread-safe.
  publish_result publish(T value) { return deliver({}, std::move(value)); }

  /// Publishes on `subject` (to pattern-less subscriptions and matching
  /// patterns). Throws error(invalid_argument) for an invalid subject, before
  /// anything is delivered.
  publish_result publish(std::string subject, T value) {
    if (!is_valid_subject(subject))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::topic: invalid subject '" + subject + "'"));
    return deliver(std::move(subject), std::move(value));
  }

  /// Current subscriptions (a group counts once). Never blocks on publishers.
  [[nodiscard]] std::size_t subscriber_count() const { return state_->subs.load()->size(); }

  /// Counters of the topic and of each current subscription. Reads the
  /// queues' own indices and relaxed counters; takes the writer mutex
  /// briefly (never blocks publishers). Allocates. Thread-safe.
  [[nodiscard]] topic_stats stats() const {
    topic_stats out;
    out.published = state_->published.load(std::memory_order_relaxed);  // relaxed: statistic
    std::lock_guard lock(state_->mu);
    const auto list = state_->subs.load();
    out.subscriptions = list->size();
    out.per_subscription.reserve(list->size());
    for (const auto& q : *list) {
      const auto cs = q->ch.stats();
      topic_subscription_stats t;
      t.id = q->id;
      t.group = q->opts.group;
      t.pattern = q->opts.pattern;
      t.policy = q->opts.policy;
      t.members = q->members;
      t.depth = cs.depth;
      t.capacity = cs.capacity;
      t.delivered = cs.sent;
      t.received = cs.received;
      // relaxed: statistics.
      t.lag = q->lag_total.load(std::memory_order_relaxed);
      t.dropped = q->dropped.load(std::memory_order_relaxed);
      // drop_oldest receives its victims itself: they are lag, not receptions.
      t.received = t.received >= t.lag ? t.received - t.lag : 0;
      out.delivered += t.delivered;
      out.dropped += t.lag + t.dropped;
      out.per_subscription.push_back(std::move(t));
    }
    return out;
  }

 private:
  publish_result deliver(std::string subject, T value) {
    auto item = std::make_shared<const detail::topic_item<T>>(detail::topic_item<T>{std::move(subject), std::move(value)});
    state_->published.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic, read by stats()
    const auto list = state_->subs.load();
    publish_result r;
    for (const auto& q : *list) {
      if (!q->opts.pattern.empty() && (item->subject.empty() || !subject_matches(q->opts.pattern, item->subject)))
        continue;
      switch (q->push(item)) {
        case 0: ++r.delivered; break;
        case 1: ++r.dropped; break;
        case 2: r.refused.push_back(q->id); break;
        default: break;  // unsubscribed concurrently: it is gone
      }
    }
    return r;
  }

  std::shared_ptr<detail::topic_state<T>> state_;
};

POSTBOX_END_NAMESPACE
