// SPDX-License-Identifier: MIT
// postbox::topic: publish-subscribe fan-out of one shared immutable message, with per-subscription overflow policies, groups and subjects.
#pragma once

// Design: docs/design/topic.md.
//
// * A publish makes the message once (`std::shared_ptr<const item>`, one
//   block from `detail::block_pool`, so no malloc in a steady flow) and
//   pushes that pointer into each matching subscription's bounded
//   `postbox::channel`; subscribers get a `delivery<T>` handle that shares it.
//   A small trivially copyable `T` (detail::topic_inline_v: at most two
//   pointers wide, e.g. std::string_view) skips the shared item: the value
//   itself goes into each queue slot (with the subject, when there is one, in
//   a pooled shared string), so such a publish allocates nothing.
// * The subscription list is a copy-on-write snapshot (`detail::snapshot_ptr`):
//   a publisher copies the current `shared_ptr<const list>` in a critical
//   section of a few instructions (what libstdc++'s atomic<shared_ptr> does
//   with a lock bit, but visible to ThreadSanitizer); subscribe/unsubscribe
//   copy the list under the writer mutex and swap in a new one, stamped with
//   a process-wide unique number. A publishing thread caches the last list it
//   used with its stamp (thread-local, per message type): while the topic's
//   stamp is unchanged a publish reads the list with one acquire load, no
//   lock and no reference count; after a change it copies the list once under
//   the writer mutex. Cost: subscribe/unsubscribe are O(subscriptions) and
//   allocate; a publish allocates the shared item (pooled; none for an
//   inline `T` without a subject), makes no syscall when no
//   subscriber is parked, and delivers with no lock of ours (each queue is a
//   lock-free postbox::channel); the last matching queue gets the publish's
//   own item pointer (no reference-count round trip with one subscriber).
//   An unsubscribed queue may stay referenced by a thread's cache until that
//   thread publishes on a changed list or exits; it is drained when removed,
//   so only its empty buffer lingers.
// * Waiting wakes once per park, not once per message: a blocking receive
//   spins briefly, then parks on its queue's channel under the event count's
//   armed protocol (event_count::prepare_wait_armed); the first publish that
//   finds the arm wakes it, later ones make no syscall until it parks again.
//   A `block` publisher on a full queue does the same on the channel's
//   not-full event count, woken by the subscription's receives (topic_queue).
// * A subscription's state lives in a shared_ptr owned by the snapshot and by
//   the handle, so destroying the handle during an in-flight publish is safe:
//   the destructor removes it from the list and closes its channel, which
//   also releases a publisher blocked on it (`block` policy).

#include <postbox/channel.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/block_pool.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/topic_snapshot.hpp>
#include <postbox/error.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <type_traits>
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
  std::string group{};                  ///< non-empty: members of this group compete for each message
  std::string pattern{};                ///< empty: every message; else a subject pattern (`orders.*`, `orders.>`)
};

/// Identifies a subscription (or a group) in a publish_result.
using subscription_id = std::uint64_t;

/// Outcome of a publish.
struct publish_result {
  std::size_t delivered = 0;              ///< subscriptions/groups that queued the message
  std::size_t dropped = 0;                ///< drop_newest subscriptions that discarded it
  std::vector<subscription_id> refused;   ///< `fail` subscriptions that were full (allocates only then)
  /// The topic was closed: nothing was delivered (or, for a publish racing
  /// close(), only to the subscriptions counted in `delivered`).
  bool closed = false;
  /// True when the topic was open and no `fail` subscription refused the message.
  [[nodiscard]] bool ok() const noexcept { return !closed && refused.empty(); }
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
  std::size_t publishing = 0;     ///< publishes in progress (e.g. blocked on a full `block` subscription)
  std::vector<topic_subscription_stats> per_subscription;
};

namespace detail {

template <class T>
struct topic_item {
  // Built in place by make_shared from the publish's own arguments (one move
  // of each, not a temporary item moved again).
  topic_item(std::string&& s, T&& v) : subject(std::move(s)), value(std::move(v)) {}
  // publish(value): no subject to move (an empty string is built in place).
  explicit topic_item(T&& v) : value(std::move(v)) {}
  std::string subject;
  T value;
};

/// Whether topic<T> carries each message inline in its queue slots (a copy
/// per matching subscription) instead of in one shared item block: T is
/// trivially copyable, default constructible without throwing and at most
/// two pointers wide (a std::string_view, an int, a pointer). Copying such a
/// T costs less than the shared block's pool round trip and reference count,
/// and the subscriber reads the message from the queue slot it takes instead
/// of from a second line the publisher just wrote (issue 18).
template <class T>
inline constexpr bool topic_inline_v = std::is_trivially_copyable_v<T> && std::is_nothrow_default_constructible_v<T> &&
                                       sizeof(T) <= 2 * sizeof(void*) && alignof(T) <= alignof(std::max_align_t);

/// What a subscription's queue holds per message. Shared form: the pointer
/// to the one immutable item of the publish (subject and value).
template <class T, bool Inline = topic_inline_v<T>>
struct topic_slot {
  std::shared_ptr<const topic_item<T>> item;
  [[nodiscard]] const T& value() const noexcept { return item->value; }
  [[nodiscard]] const std::string* subject_ptr() const noexcept { return &item->subject; }
  [[nodiscard]] std::shared_ptr<const T> share() const noexcept { return std::shared_ptr<const T>(item, &item->value); }
};

/// Inline form (topic_inline_v): the value itself, and the subject (shared by
/// the publish's copies; null for publish(value), so that publish allocates
/// nothing).
template <class T>
struct topic_slot<T, true> {
  T val{};
  std::shared_ptr<const std::string> subject;
  [[nodiscard]] const T& value() const noexcept { return val; }
  [[nodiscard]] const std::string* subject_ptr() const noexcept { return subject.get(); }
  // A new shared copy of the value (allocates).
  [[nodiscard]] std::shared_ptr<const T> share() const { return std::make_shared<const T>(val); }
};

/// Takes the place of delivery's flag in the shared form.
struct topic_no_flag {
  constexpr topic_no_flag() noexcept = default;
  constexpr explicit topic_no_flag(bool) noexcept {}
};

/// Counts a publish as not published when what follows it throws (making the
/// queue element allocates): disarmed once that succeeded. On the normal path
/// the compiler drops it; only the landing pad keeps the increment.
struct topic_uncount_on_throw {
  std::atomic<std::uint64_t>& none;
  bool armed = true;
  ~topic_uncount_on_throw() {
    if (armed) none.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic, read by stats()
  }
};

/// An empty subject, for a delivery of publish(value) in the inline form.
inline const std::string& topic_no_subject() noexcept {
  static const std::string empty;
  return empty;
}

}  // namespace detail

/// A received message: a cheap handle sharing the one immutable copy made by
/// the publish (no per-subscriber copy of `T`); copying it never copies `T`.
/// A small trivially copyable `T` (detail::topic_inline_v: at most two
/// pointers wide, e.g. std::string_view or int) is instead carried by value
/// in the queue and in the handle, so each subscription has its own copy.
template <class T>
class delivery {
  static constexpr bool inline_value = detail::topic_inline_v<T>;

 public:
  delivery() = default;
  explicit delivery(detail::topic_slot<T>&& s) noexcept : slot_(std::move(s)), engaged_(true) {}
  /// The message. Never blocks; thread-safe (immutable).
  [[nodiscard]] const T& operator*() const noexcept { return slot_.value(); }
  [[nodiscard]] const T* operator->() const noexcept { return &slot_.value(); }
  /// The subject it was published on (empty for `publish(value)`).
  [[nodiscard]] const std::string& subject() const noexcept {
    const std::string* s = slot_.subject_ptr();
    return s != nullptr ? *s : detail::topic_no_subject();
  }
  /// A shared pointer to the message: aliasing the shared item (never
  /// allocates), or for an inline `T` a new shared copy (allocates).
  [[nodiscard]] std::shared_ptr<const T> share() const noexcept(!inline_value) { return slot_.share(); }
  explicit operator bool() const noexcept {
    if constexpr (inline_value) return engaged_;
    else return slot_.item != nullptr;
  }

 private:
  detail::topic_slot<T> slot_{};
  // Inline form only: whether the handle holds a message (the shared form
  // tests its pointer).
  [[no_unique_address]] std::conditional_t<inline_value, bool, detail::topic_no_flag> engaged_{};
};

namespace detail {

template <class T>
struct topic_queue {
  using slot_type = topic_slot<T>;  // a queue element: the shared item's pointer, or the value inline
  topic_queue(subscription_id i, const subscription_options& o) : id(i), opts(o), ch(o.capacity) {}
  const subscription_id id;
  const subscription_options opts;
  channel<slot_type, mpmc> ch;
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

  // Waiting wakes once per park, not once per message, in both directions,
  // through the channel's own event counts and their armed protocol
  // (event_count::prepare_wait_armed): a blocking receiver parks on the
  // channel's not-empty event count, a `block` publisher on its not-full one,
  // each arming it first; the channel's send (receive) wakes the parked side
  // only when it finds the arm, then every thread parked there (a group's
  // members included). So a close(), a select's or an awaitable's receive
  // through the channel's own API, and the subscription's own calls all wake
  // the same way, with no flag or event count of the queue's own.

  // Takes one message (waking parked publishers once per park). Never blocks.
  // What try_receive_result() does, written out so that it inlines into the
  // subscription's receive (callgrind, topic_bench --profile topic: 635
  // instructions per message, 643 through the channel's out-of-line call,
  // 630 with the topic's own armed flags before).
  receive_result<slot_type> try_take() noexcept {
    receive_result<slot_type> r = channel_access::try_receive_quiet(ch);
    if (r.has_value()) not_full().notify_armed(1);
    return r;
  }

  // The event counts of the channel's two sides.
  event_count& not_empty() noexcept { return channel_access::not_empty(ch); }
  event_count& not_full() noexcept { return channel_access::not_full(ch); }

  // `block` on a full queue: sends, waiting while the queue is full; ok or
  // closed. While it spins on a full queue it waits for a batch of free slots
  // (a quarter of the queue, at most 32) before trying again: refilling each
  // slot the moment the subscriber frees it moves that slot's line between
  // the two cores once per message. It watches the slot a batch ahead
  // (room_for), not size_approx(), whose read of the receive index took
  // that index's line from the subscriber once per poll (topic_bench --only
  // topic-view, 10 M messages, pinned, six interleaved pairs: 28.5-30.1 ->
  // 30.5-32.6 M msg/s in five; the sixth, disturbed in both rows of the
  // round, read 17.8 after). The last spin step tries anyway, so the batch
  // never delays a publish past the spin nor adds a park.
  send_status send_when_room(slot_type&& copy) {
    const std::size_t cap = ch.capacity();
    const std::size_t room = cap / 4 == 0 ? 1 : cap / 4 < 32 ? cap / 4 : 32;
    for (backoff spin; !spin.completed();) {
      spin.snooze();
      while (!spin.completed() && !channel_access::room_for(ch, room)) spin.snooze();
      const send_status s = ch.try_send(std::move(copy));  // the last spin step tries anyway
      if (s != send_status::full) return s;
    }
    event_count& ev = not_full();
    for (;;) {
      // Arms the not-full event count before the re-check: the first receive
      // after it wakes us (and every publisher parked on this queue).
      const std::uint32_t key = ev.prepare_wait_armed();
      send_status s = ch.try_send(std::move(copy));
      if (s != send_status::full) {
        ev.finish_wait();
        return s;
      }
      (void)ev.wait(key, std::nullopt);
      ev.finish_wait();
      s = ch.try_send(std::move(copy));
      if (s != send_status::full) return s;
    }
  }

  // Closes the queue and wakes every thread parked on it (the channel's
  // close wakes both event counts: threads, selects and awaitables).
  void close() noexcept { ch.close(); }

  // Pushes `copy` (moved in; released when not queued) under this queue's
  // policy. Returns 0 delivered, 1 dropped, 2 refused, 3 closed. Every
  // policy first tries the channel once: a queue with room takes the message
  // here, inline; only a full one goes to the policy (push_full). The
  // channel's send wakes parked receivers once per park.
  int push(slot_type&& copy) {
    const send_status s = ch.try_send(std::move(copy));  // moves only on ok
    if (POSTBOX_LIKELY(s == send_status::ok)) return 0;
    if (s == send_status::closed) return 3;
    return push_full(std::move(copy));
  }
  [[gnu::noinline]] int push_full(slot_type&& copy) {
    switch (opts.policy) {
      case overflow::block:
        return send_when_room(std::move(copy)) == send_status::ok ? 0 : 3;
      case overflow::drop_oldest:
        for (;;) {
          if (ch.try_receive()) {
            lag.fetch_add(1, std::memory_order_relaxed);        // relaxed: counter only
            lag_total.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
          }
          const auto s = ch.try_send(std::move(copy));
          if (s == send_status::ok) return 0;
          if (s == send_status::closed) return 3;
        }
      case overflow::drop_newest:
        dropped.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
        return 1;
      case overflow::fail:
        dropped.fetch_add(1, std::memory_order_relaxed);  // relaxed: counter only
        return 2;
    }
    return 3;
  }
};

/// A process-wide unique stamp for a subscription list (never 0).
inline std::uint64_t topic_next_stamp() noexcept {
  // relaxed: only uniqueness matters; the stamp is published by the release
  // store into topic_state::subs_stamp.
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

/// A publishing thread's copy of the last subscription list it used (one per
/// message type): the list stamped `stamp`, kept alive by `list`. `busy` is
/// set while a publish iterates it, so a publish re-entered from a message's
/// destructor (drop_oldest) takes its own reference instead of replacing the
/// list under the outer iteration. Holding it keeps the list's queues (and
/// what they still hold) alive until this thread publishes on another list or
/// exits. Thread-local; no synchronization.
template <class List>
struct topic_list_cache {
  std::uint64_t stamp = 0;
  std::shared_ptr<const List> list;
  bool busy = false;
};

// Line-aligned, so that no other heap object shares a line with the counters
// every publish writes (entered, left).
template <class T>
struct alignas(cache_line_size) topic_state {
  using queue_ptr = std::shared_ptr<topic_queue<T>>;
  using list = std::vector<queue_ptr>;
  // The current subscription list (copy-on-write). Writers: subscribe and
  // unsubscribe, under `mu`, store a fresh list. Readers: publishers load it.
  // A publish that starts after an unsubscribe returned never sees the
  // removed queue (the snapshot's mutex orders them).
  snapshot_ptr<list> subs{std::make_shared<const list>()};
  std::mutex mu;
  // Identity of the list in `subs`: a process-wide unique stamp
  // (topic_next_stamp), stored (release) under `mu` right after every
  // subs.store. A publisher loads it (acquire, pairing with that store) and,
  // when it equals the stamp of the list its thread cached, uses the cached
  // list without the snapshot's lock or a reference count (topic_list_cache).
  // Stamps are never reused across topics, so equality means "the same list".
  // A publish that starts after an unsubscribe returned acquires the new
  // stamp (or a later one), so it still never sees the removed queue.
  std::atomic<std::uint64_t> subs_stamp{topic_next_stamp()};
  subscription_id next_id = 1;  // guarded by mu
  bool closed_locked = false;   // guarded by mu: close() ran
  // Set once by close() (seq_cst, under mu, before any queue is closed);
  // read by publishers (seq_cst) after they announce themselves in
  // `entered`. A publish that reads false may still race the close: each
  // queue it reaches then accepts the message before its own close (and the
  // subscriber drains it) or refuses it.
  std::atomic<bool> closed{false};
  // Publishes that entered topic::publish since creation: the announcement
  // ~topic waits on and the `published` statistic in one RMW (issue 18: a
  // publish made three, in/out of a `publishing` count and a separate
  // `published` count). Incremented (seq_cst) before `closed` is read;
  // ~topic stores `closed` (seq_cst), then loads `left` and then `entered`
  // (seq_cst) and waits until they are equal: Dekker's pattern, as with one
  // in/out count. Every leave that ~topic's (acquire) load of `left` counts
  // follows its own entry, which therefore happens before the later load of
  // `entered` and is counted there: left <= entered as read, and equality
  // means every counted publish has left. A publish not counted in `entered`
  // comes after close() in the seq_cst order, so it reads `closed`.
  std::atomic<std::uint64_t> entered{0};
  // Publishes that left topic::publish (release fetch_add, the publish's
  // last touch of the state; pairs with ~topic's and stats()'s acquire load).
  std::atomic<std::uint64_t> left{0};
  // Publishes counted in `entered` that published nothing: the topic was
  // closed, or making the message threw. Writers: those publishes (relaxed
  // fetch_add, before their `left` increment); reader: stats(), for
  // published = entered - not_published. Relaxed: a pure counter.
  std::atomic<std::uint64_t> not_published{0};

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
          if (q->ch.capacity() != round_up_capacity(o.capacity) || q->opts.policy != o.policy)
            POSTBOX_THROW(error(errc::conflict, "postbox::topic: group '" + o.group +
                                                    "' uses another capacity or overflow policy"));
          ++q->members;
          return q;
        }
      }
    }
    auto q = std::make_shared<topic_queue<T>>(next_id++, o);
    q->members = 1;
    if (closed_locked) {
      // A subscription to a closed topic is born closed: receive() says so at once.
      q->close();
      return q;
    }
    auto next = std::make_shared<list>(*cur);
    next->push_back(q);
    subs.store(std::move(next));
    // release: pairs with the publishers' acquire (see subs_stamp).
    subs_stamp.store(topic_next_stamp(), std::memory_order_release);
    return q;
  }

  void remove(const queue_ptr& q) {
    {
      std::lock_guard lock(mu);
      if (!remove_locked(q)) return;
    }
    // Nobody receives from it any more, but a publishing thread's cached list
    // (topic_list_cache) may keep the queue itself alive for a while: let
    // what it still holds go now, outside the mutex (T's destructors may run).
    // The channel is closed, so nothing is queued after this.
    while (q->ch.try_receive()) {
    }
  }

  // Whether the last member left (the queue is then out of the list and closed).
  bool remove_locked(const queue_ptr& q) {
    if (--q->members != 0) return false;
    auto cur = subs.load();
    auto next = std::make_shared<list>();
    next->reserve(cur->size());
    for (const auto& e : *cur)
      if (e != q) next->push_back(e);
    subs.store(std::move(next));
    // release: pairs with the publishers' acquire (see subs_stamp).
    subs_stamp.store(topic_next_stamp(), std::memory_order_release);
    q->close();  // releases a publisher blocked on it, wakes its receivers
    return true;
  }

  void close() {
    std::lock_guard lock(mu);
    if (closed_locked) return;
    closed_locked = true;
    // seq_cst: pairs with the seq_cst load in topic::deliver (Dekker with
    // `entered`) and the acquire load in is_closed().
    closed.store(true, std::memory_order_seq_cst);
    // Queues stay in the list (stats still report them); each is closed, so
    // its subscribers drain what was delivered and then see closed, and a
    // publisher blocked on a full `block` queue wakes with closed.
    for (const auto& q : *subs.load()) q->close();
  }
};

}  // namespace detail

template <class T>
class topic;

namespace detail {

/// One subscription handle's own state, apart from the queue it may share
/// with other members of its group. Owned by the handle only. Line-aligned:
/// every blocking receive writes `calls` twice, so no heap neighbour that a
/// publish touches may share its line. (topic_bench's zero-copy row had a
/// slow mode in some processes that this alignment was first thought to
/// cure; it came from the benchmark itself, whose subscriber read the
/// publisher's stack on every message: see topic_bench's subscriber_local.)
template <class T>
struct alignas(cache_line_size) subscription_core {
  std::shared_ptr<topic_state<T>> state;
  std::shared_ptr<topic_queue<T>> q;
  /// Stopped by reset(): wakes this handle's blocked receivers (a group's
  /// queue stays open for the other members, so closing it is not enough).
  std::stop_source detach;
  /// Blocking receive calls inside this handle. Incremented (seq_cst) on
  /// entry before `detached` is read; reset() stores `detached` (seq_cst) and
  /// then waits for zero: Dekker's pattern, so either the call sees the
  /// handle detached and touches nothing more, or reset() waits for it. The
  /// decrement (release) pairs with reset()'s acquire loads, so the call's
  /// last access to the queue happens before the handle releases it.
  std::atomic<std::uint32_t> calls{0};
  /// Set once by reset() (seq_cst; see `calls`).
  std::atomic<bool> detached{false};
};

}  // namespace detail

/// A subscription handle (RAII): destroying or resetting it unsubscribes,
/// also while a publish is in flight on another thread, and also while other
/// threads are blocked in its `receive` calls: they wake with an empty result
/// (`closed`) and the handle waits until they have left before it lets the
/// queue go. Move-only; moving must not race with calls on it.
/// Receive operations are thread-safe (a group's members share one queue).
template <class T>
class subscription {
  using core = detail::subscription_core<T>;

 public:
  subscription() = default;
  subscription(subscription&&) noexcept = default;
  subscription& operator=(subscription&& o) noexcept {
    if (this != &o) {
      reset();
      core_ = std::move(o.core_);
    }
    return *this;
  }
  subscription(const subscription&) = delete;
  subscription& operator=(const subscription&) = delete;
  ~subscription() { reset(); }

  /// Unsubscribes now (idempotent). Threads blocked in this handle's
  /// `receive` calls wake with `closed`; reset() returns after they have
  /// left, and then lets the queue go. Blocks on the topic's writer mutex and
  /// for those threads; allocates the new list. Later calls on the handle
  /// report `closed`. May race with blocking calls on the handle (that is its
  /// purpose), not with try_receive or the counters.
  void reset() {
    if (!core_) return;
    core& c = *core_;
    // seq_cst: the Dekker store; pairs with the seq_cst load in wait().
    if (!c.detached.exchange(true, std::memory_order_seq_cst)) {
      c.state->remove(c.q);
      c.detach.request_stop();
    }
    // seq_cst: the Dekker read of the calls that entered; also acquire,
    // pairing with the release decrement in leave(). Woken receivers leave
    // within a wake-up, so this waits by yielding: a futex notify from
    // leave() would touch the core after its last decrement.
    detail::backoff backoff;
    while (c.calls.load(std::memory_order_seq_cst) != 0) backoff.snooze();
    // No call is inside, and every later one sees `detached` and leaves
    // without touching the queue: it can go. The core stays until the
    // handle is destroyed or assigned, since later calls still read it.
    c.q.reset();
    c.state.reset();
  }

  /// Threads inside this handle's blocking receive calls right now (a
  /// snapshot). Never blocks; thread-safe.
  [[nodiscard]] std::size_t blocked_receivers_approx() const noexcept {
    // relaxed: a snapshot.
    return core_ ? core_->calls.load(std::memory_order_relaxed) : 0;
  }

  /// Next message or an empty handle. Never blocks or allocates. Must not
  /// race with reset() or destruction of this handle (blocking calls may).
  [[nodiscard]] std::optional<delivery<T>> try_receive() noexcept {
    if (!core_ || !core_->q) return std::nullopt;
    auto p = core_->q->try_take();
    if (!p.has_value()) return std::nullopt;
    return delivery<T>(std::move(*p));
  }
  /// Blocks until a message arrives; empty once the topic is closed (or this
  /// handle unsubscribed) and what was delivered to it is drained.
  [[nodiscard]] std::optional<delivery<T>> receive() { return std::move(wait(std::nullopt, nullptr)).optional(); }
  /// As `receive`; also empty (nothing taken) once `stop` is stopped.
  [[nodiscard]] std::optional<delivery<T>> receive(std::stop_token stop) {
    return std::move(wait(std::nullopt, &stop)).optional();
  }
  /// Blocks at most `timeout` (real time, as the channel); status ok,
  /// timeout, closed (topic closed and drained, or unsubscribed) or canceled.
  template <class Rep, class Period>
  [[nodiscard]] receive_result<delivery<T>> receive_for(std::chrono::duration<Rep, Period> timeout,
                                                        std::stop_token stop = {}) {
    return receive_until(std::chrono::steady_clock::now() + timeout, std::move(stop));
  }
  /// As `receive_for`, with a deadline.
  template <class Clock, class Duration>
  [[nodiscard]] receive_result<delivery<T>> receive_until(std::chrono::time_point<Clock, Duration> deadline,
                                                          std::stop_token stop = {}) {
    return wait(detail::to_steady_deadline(deadline), &stop);
  }
  /// Waits until at least one message is queued, then takes up to `max`
  /// without waiting for more, writing `delivery<T>`s to `out`. Returns how
  /// many (>= 1), or `closed`, `timeout` or `canceled` with nothing taken.
  /// Blocks; allocates nothing beyond what `out` does.
  template <class OutputIt, class Clock, class Duration>
  [[nodiscard]] result<std::size_t, receive_status> receive_many(OutputIt out, std::size_t max,
                                                                 std::chrono::time_point<Clock, Duration> deadline,
                                                                 std::stop_token stop = {}) {
    return many(out, max, detail::to_steady_deadline(deadline), &stop);
  }
  /// As above with no deadline.
  template <class OutputIt>
  [[nodiscard]] result<std::size_t, receive_status> receive_many(OutputIt out, std::size_t max,
                                                                 std::stop_token stop = {}) {
    return many(out, max, std::nullopt, &stop);
  }

  /// drop_oldest: messages discarded since the last call (and resets the count). Never blocks.
  [[nodiscard]] std::uint64_t take_lag() noexcept {
    if (!core_ || !core_->q) return 0;
    return core_->q->lag.exchange(0, std::memory_order_relaxed);  // relaxed: counter only
  }
  /// Messages discarded by drop_newest / fail so far. Never blocks.
  [[nodiscard]] std::uint64_t dropped() const noexcept {
    if (!core_ || !core_->q) return 0;
    return core_->q->dropped.load(std::memory_order_relaxed);  // relaxed: counter only
  }
  /// The id reported in publish_result::refused (shared by a group's members).
  [[nodiscard]] subscription_id id() const noexcept { return core_ && core_->q ? core_->q->id : 0; }
  /// Queued messages (approximate under concurrency). Never blocks.
  [[nodiscard]] std::size_t size_approx() const noexcept {
    return core_ && core_->q ? core_->q->ch.size_approx() : 0;
  }
  /// Whether this handle is subscribed.
  explicit operator bool() const noexcept {
    // relaxed: a snapshot for the caller's own thread.
    return core_ != nullptr && !core_->detached.load(std::memory_order_relaxed);
  }

 private:
  friend class topic<T>;
  friend struct detail::select_access;
  subscription(std::shared_ptr<detail::topic_state<T>> s, std::shared_ptr<detail::topic_queue<T>> q)
      : core_(std::make_unique<core>()) {
    core_->state = std::move(s);
    core_->q = std::move(q);
  }

  receive_result<delivery<T>> wait(std::optional<std::chrono::steady_clock::time_point> deadline,
                                   const std::stop_token* stop) {
    if (!core_) return receive_status::closed;
    core& c = *core_;
    // seq_cst: the Dekker increment; pairs with reset()'s seq_cst reads.
    c.calls.fetch_add(1, std::memory_order_seq_cst);
    // seq_cst: pairs with the exchange in reset().
    if (c.detached.load(std::memory_order_seq_cst)) {
      leave(c);
      return receive_status::closed;
    }
    auto r = take(c, deadline, stop);
    receive_result<delivery<T>> out = r.has_value() ? receive_result<delivery<T>>(delivery<T>(std::move(*r)))
                                      : r.status() == receive_status::canceled && c.detach.stop_requested()
                                          ? receive_result<delivery<T>>(receive_status::closed)
                                          : receive_result<delivery<T>>(r.status());
    leave(c);
    return out;
  }

  // The blocking receive: take at once if a message is queued; else spin
  // briefly (detail::backoff: pauses, then yields), re-trying; then park on
  // the channel's not-empty event count under the armed protocol (topic_queue),
  // so a burst of publishes wakes this thread once and it drains the burst.
  // `canceled` when `stop` or the handle's detach source is stopped.
  static receive_result<typename detail::topic_queue<T>::slot_type> take(
      core& c, std::optional<std::chrono::steady_clock::time_point> deadline, const std::stop_token* stop) {
    detail::topic_queue<T>& q = *c.q;
    const auto stopped = [&]() noexcept {
      return (stop != nullptr && stop->stop_requested()) || c.detach.stop_requested();
    };
    // stopped(), written out: the lambda is not inlined, and this check is on
    // every receive's path.
    if ((stop != nullptr && stop->stop_requested()) || c.detach.stop_requested()) return receive_status::canceled;
    for (detail::backoff spin;;) {
      {
        auto r = q.try_take();
        if (r.status() != receive_status::empty) return r;
      }
      if (stopped()) return receive_status::canceled;
      if (spin.completed()) break;
      spin.snooze();
    }
    // Only a receive that parks registers the stop callbacks (a stop while
    // spinning is seen by the checks above).
    const std::stop_token detached = c.detach.get_token();
    detail::event_count& parked = q.not_empty();
    const detail::stop_wakeup wakeup(parked, detail::stop_tokens{stop, &detached});
    for (;;) {
      // Arms the channel's not-empty event count before the re-check: the
      // first publish after it wakes us (and every receiver parked here).
      const std::uint32_t key = parked.prepare_wait_armed();
      {
        auto r = q.try_take();
        if (r.status() != receive_status::empty) {
          parked.finish_wait();
          return r;
        }
      }
      if (stopped()) {
        parked.finish_wait();
        return receive_status::canceled;
      }
      const bool woke = parked.wait(key, deadline);
      parked.finish_wait();
      {
        auto r = q.try_take();
        if (r.status() != receive_status::empty) return r;
      }
      if (!woke) return receive_status::timeout;
      if (stopped()) return receive_status::canceled;
    }
  }

  template <class OutputIt>
  result<std::size_t, receive_status> many(OutputIt out, std::size_t max,
                                           std::optional<std::chrono::steady_clock::time_point> deadline,
                                           const std::stop_token* stop) {
    if (max == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::subscription::receive_many: max must be at least 1"));
    auto first = wait(deadline, stop);
    if (!first.has_value()) return first.status();
    *out = std::move(*first);
    ++out;
    std::size_t got = 1;
    // The handle is still ours: wait() has left, but only reset() or
    // destruction could let the queue go, and those must not race a call
    // that is not blocked (see try_receive).
    while (got < max) {
      auto next = try_receive();
      if (!next) break;
      *out = std::move(*next);
      ++out;
      ++got;
    }
    return got;
  }

  static void leave(core& c) noexcept {
    // release: our last touch of the queue and the core happens before
    // reset() lets them go; pairs with reset()'s loads. Nothing may follow.
    c.calls.fetch_sub(1, std::memory_order_release);
  }

  std::unique_ptr<core> core_;
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
  /// Closes the topic (see close()) and waits for publishes still inside it
  /// (a publisher blocked on a full `block` subscription wakes with
  /// `closed`). Subscriptions may outlive it.
  ~topic() {
    close();
    detail::backoff backoff;
    // seq_cst: the Dekker reads after close()'s store; `left` first (also
    // acquiring the publishers' release increments), then `entered` (see
    // topic_state::entered for why equal counts mean nobody is inside).
    for (;;) {
      const std::uint64_t out = state_->left.load(std::memory_order_seq_cst);
      if (out == state_->entered.load(std::memory_order_seq_cst)) break;
      backoff.snooze();
    }
  }

  /// Closes the topic: later publishes deliver nothing and report `closed`;
  /// a publisher blocked on a full `block` subscription wakes with `closed`;
  /// every subscription drains what was delivered to it, then `receive()`
  /// returns empty and `receive_for` reports `closed`. Subscribing afterwards
  /// gives a subscription that is already closed. Idempotent. Takes the
  /// writer mutex; thread-safe; wakes every blocked thread.
  void close() { state_->close(); }

  /// Whether close() has run. Never blocks; thread-safe.
  [[nodiscard]] bool is_closed() const noexcept {
    // acquire: pairs with the release store in close().
    return state_->closed.load(std::memory_order_acquire);
  }

  /// Subscribes (joins the group when `options.group` is set). Allocates; takes
  /// the writer mutex. Throws error(invalid_argument) for a bad pattern or
  /// capacity 0, error(conflict) when a group is joined with another pattern.
  [[nodiscard]] subscription<T> subscribe(subscription_options options = {}) {
    return subscription<T>(state_, state_->add(options));
  }
  /// Same, with a subject pattern. A template so that a braced options
  /// argument, `subscribe({.group = "billing"})`, can only mean the overload
  /// above (a braced list never deduces `S`): with a plain std::string
  /// parameter g++ found the call ambiguous.
  template <class S>
    requires std::is_convertible_v<S&&, std::string_view>
  [[nodiscard]] subscription<T> subscribe(S&& pattern, subscription_options options = {}) {
    options.pattern = std::string(std::string_view(pattern));
    return subscribe(std::move(options));
  }

  /// Publishes to every subscription without a pattern. Makes the shared
  /// message once (a pooled block: allocates only while the pool grows);
  /// blocks only on full `block` subscriptions; makes a syscall only to wake
  /// a parked subscriber. Thread-safe.
  publish_result publish(T value) { return deliver(nullptr, std::move(value)); }

  /// Publishes on `subject` (to pattern-less subscriptions and matching
  /// patterns). Throws error(invalid_argument) for an invalid subject, before
  /// anything is delivered.
  publish_result publish(std::string subject, T value) {
    if (!is_valid_subject(subject))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::topic: invalid subject '" + subject + "'"));
    return deliver(&subject, std::move(value));
  }

  /// Current subscriptions (a group counts once). Never blocks on publishers.
  [[nodiscard]] std::size_t subscriber_count() const { return state_->subs.load()->size(); }

  /// Counters of the topic and of each current subscription. Reads the
  /// queues' own indices and relaxed counters; takes the writer mutex
  /// briefly (never blocks publishers). Allocates. Thread-safe.
  [[nodiscard]] topic_stats stats() const {
    topic_stats out;
    {
      // acquire: a leave counted here follows its entry, which the later load
      // of `entered` then counts too, so out_count <= in_count.
      const std::uint64_t out_count = state_->left.load(std::memory_order_acquire);
      const std::uint64_t in_count = state_->entered.load(std::memory_order_relaxed);  // relaxed: statistic
      const std::uint64_t none = state_->not_published.load(std::memory_order_relaxed);  // relaxed: statistic
      out.publishing = static_cast<std::size_t>(in_count - out_count);
      // A publish about to find the topic closed is counted until it says so.
      out.published = in_count >= none ? in_count - none : 0;
    }
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
  // `subject`: null for publish(value); else moved into the message.
  publish_result deliver(std::string* subject, T&& value) {
    // Announces the publish (one seq_cst RMW: also the `published` count)
    // and leaves on every path, also when making the message throws.
    struct inside {
      std::atomic<std::uint64_t>& out;
      // seq_cst: announces the publish before `closed` is read (see topic_state::entered).
      inside(std::atomic<std::uint64_t>& in, std::atomic<std::uint64_t>& o) noexcept : out(o) {
        in.fetch_add(1, std::memory_order_seq_cst);
      }
      // release: our last touch of the state; pairs with ~topic's loads.
      ~inside() { out.fetch_add(1, std::memory_order_release); }
      inside(const inside&) = delete;
      inside& operator=(const inside&) = delete;
    };
    detail::topic_state<T>& st = *state_;
    const inside announced(st.entered, st.left);
    return deliver_inside(st, subject, std::move(value));
  }

  // The message as a queue element: one pooled shared item (no malloc in a
  // steady flow), or for an inline T the value itself with the subject in a
  // pooled shared string (none for publish(value): nothing allocated).
  // The inline form's shared subject (out of line: publish(value) never needs it).
  [[gnu::noinline]] static std::shared_ptr<const std::string> make_subject(detail::topic_state<T>& st, std::string* subject) {
    detail::topic_uncount_on_throw uncount{st.not_published};
    auto s = std::allocate_shared<const std::string>(detail::pool_allocator<std::string>{}, std::move(*subject));
    uncount.armed = false;
    return s;
  }

  // `st.not_published` counts the publish when allocating throws (the entry
  // counted it as published).
  static detail::topic_slot<T> make_slot(detail::topic_state<T>& st, std::string* subject, T&& value) {
    using item = detail::topic_item<T>;
    if constexpr (detail::topic_inline_v<T>) {
      detail::topic_slot<T> s{std::move(value), nullptr};
      if (subject != nullptr) s.subject = make_subject(st, subject);
      return s;
    } else {
      detail::topic_uncount_on_throw uncount{st.not_published};
      detail::topic_slot<T> s = subject != nullptr
          ? detail::topic_slot<T>{std::allocate_shared<const item>(detail::pool_allocator<item>{}, std::move(*subject), std::move(value))}
          : detail::topic_slot<T>{std::allocate_shared<const item>(detail::pool_allocator<item>{}, std::move(value))};
      uncount.armed = false;
      return s;
    }
  }

  // The list when this thread's cached one is stale (or in use further up the
  // stack): a fresh copy taken under the writer mutex, which also refreshes
  // the cache unless it is in use. Out of line, so the publish's common path
  // stays small.
  template <class List>
  [[gnu::noinline]] static const List* refresh_list(detail::topic_state<T>& st, detail::topic_list_cache<List>& cache,
                                                    std::shared_ptr<const List>& own) {
    std::shared_ptr<const List> fresh;
    std::uint64_t fresh_stamp = 0;
    {
      std::lock_guard lock(st.mu);
      fresh = st.subs.load();
      fresh_stamp = st.subs_stamp.load(std::memory_order_relaxed);  // relaxed: written under mu, which we hold
    }
    if (cache.busy) {
      own = std::move(fresh);
      return own.get();
    }
    // The replaced list lives in `own` until the publish returns, so whatever
    // its release runs cannot touch the cache while the publish iterates.
    own = std::exchange(cache.list, std::move(fresh));
    cache.stamp = fresh_stamp;
    return cache.list.get();
  }

  static publish_result deliver_inside(detail::topic_state<T>& st, std::string* subject, T&& value) {
    publish_result r;
    // seq_cst: the Dekker read; pairs with the store in close().
    if (st.closed.load(std::memory_order_seq_cst)) {
      // relaxed: statistic (the entry counted this publish; it published nothing).
      st.not_published.fetch_add(1, std::memory_order_relaxed);
      r.closed = true;
      return r;
    }
    detail::topic_slot<T> item = make_slot(st, subject, std::move(value));
    const std::string* const subj = item.subject_ptr();  // null or empty: publish(value)
    using list_type = typename detail::topic_state<T>::list;
    // The subscription list: this thread's cached copy when its stamp is
    // current (no lock, no reference count), else a fresh copy taken under
    // the writer mutex, which also refreshes the cache.
    thread_local detail::topic_list_cache<list_type> cache;
    // acquire: pairs with the release store after subs.store in add/remove.
    const auto stamp = st.subs_stamp.load(std::memory_order_acquire);
    std::shared_ptr<const list_type> own;  // only when the cache is in use further up this thread's stack
    const list_type* const list =
        POSTBOX_LIKELY(!cache.busy && cache.stamp == stamp) ? cache.list.get() : refresh_list(st, cache, own);
    struct in_use {
      bool& flag;
      bool was;
      explicit in_use(bool& f) noexcept : flag(f), was(f) { flag = true; }
      ~in_use() { flag = was; }
      in_use(const in_use&) = delete;
      in_use& operator=(const in_use&) = delete;
    };
    const in_use pin(cache.busy);
    // Each matching queue gets a copy of the slot except the last, which gets
    // ours (one reference-count round trip fewer per publish; with one
    // subscriber, none).
    detail::topic_queue<T>* pending = nullptr;
    const auto record = [&](const detail::topic_queue<T>& q, int outcome) {
      switch (outcome) {
        case 0: ++r.delivered; break;
        case 1: ++r.dropped; break;
        case 2: r.refused.push_back(q.id); break;
        default:
          // Its queue was closed: unsubscribed concurrently (it is gone), or
          // the topic closed while we were publishing.
          // acquire: pairs with the store in close().
          if (st.closed.load(std::memory_order_acquire)) r.closed = true;
          break;
      }
    };
    for (const auto& q : *list) {
      if (!q->opts.pattern.empty() && (subj == nullptr || subj->empty() || !subject_matches(q->opts.pattern, *subj)))
        continue;
      if (pending != nullptr) {
        const int outcome = pending->push(detail::topic_slot<T>(item));
        if (POSTBOX_LIKELY(outcome == 0)) ++r.delivered;
        else record(*pending, outcome);
      }
      pending = q.get();
    }
    if (pending != nullptr) {
      const int outcome = pending->push(std::move(item));
      if (POSTBOX_LIKELY(outcome == 0)) ++r.delivered;
      else record(*pending, outcome);
    }
    return r;
  }

  std::shared_ptr<detail::topic_state<T>> state_;
};

POSTBOX_END_NAMESPACE
