// SPDX-License-Identifier: MIT
// postbox::consumer_source: the consumer runtime's source concept, the items a source yields, and the channel, subscription, stream group and raw-bytes sources.
#pragma once

// Part of the consumer concept: <postbox/consumer.hpp> includes it, and is
// the header to include. Design: docs/design/consumer.md ("The source
// concept").
//
// Include rule: this header does not include topic.hpp or stream.hpp (3% of
// the instructions clang 14 spends on a unit that includes consumer.hpp). The
// subscription and stream group sources name the topic's and the stream's
// types only inside templates, declared ahead, so they compile wherever the
// transport is there to read from: include <postbox/topic.hpp> or
// <postbox/stream.hpp> (or the umbrella) for the transport itself, before or
// after <postbox/consumer.hpp>, as you would to create the topic or stream.

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/fwd.hpp>
#include <postbox/settlement.hpp>
#include <postbox/detail/chrono.hpp>

#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

// The stream types stream_group_source names, declared as <postbox/stream.hpp>
// defines them (topic, subscription and stream are declared in fwd.hpp); only
// used inside templates, so a source is complete once the user's code, which
// holds the stream, includes stream.hpp.
template <class T>
struct record;
template <class T>
struct read_result;
template <class T>
class group_member;

// ---------------------------------------------------------------------------
// The source concept
// ---------------------------------------------------------------------------

/// Input that could not become an envelope: the decoder's reason (an errc
/// name such as "parse_error"), its error text, and the bytes as received.
struct poison_input {
  std::string reason;
  std::string error;
  std::string raw;
};

/// One item a source hands to a consumer: either an envelope (`message`) or
/// undecodable input (`poison`), plus an optional settle hook.
///
/// `message->attempt` must be the number of deliveries of this message
/// started BEFORE this one (the consumer adds one when it starts the
/// handler). A broker adapter whose broker counts deliveries including the
/// current one (JetStream's NumDelivered) subtracts one.
template <class T>
struct inbound {
  std::optional<envelope<T>> message;  ///< the envelope; empty for poison input
  poison_input poison;                 ///< why it did not decode (when `message` is empty)
  settle_hook settle;                  ///< broker-side effects; may be empty

  /// An envelope item.
  [[nodiscard]] static inbound of(envelope<T>&& env, settle_hook&& hook = {}) {
    inbound in;
    in.message.emplace(std::move(env));
    in.settle = std::move(hook);
    return in;
  }
  /// A poison item.
  [[nodiscard]] static inbound malformed(poison_input p, settle_hook hook = {}) {
    inbound in;
    in.poison = std::move(p);
    in.settle = std::move(hook);
    return in;
  }
};

/// The source concept: everything a consumer needs from a transport. A
/// source `S` provides
///
/// * `typename S::payload_type` — the `T` of the envelopes it yields;
/// * `static constexpr bool redelivers` — `true` when the transport itself
///   redelivers (a broker with ack/nak: JetStream, SQS, ...). Then a retry
///   or defer becomes `settle_action::redeliver` with the delay and the
///   consumer forgets the message; the broker's redelivery comes back
///   through `receive` with a higher attempt. `false` (in-process channels,
///   topics, streams): the consumer keeps the message and redelivers it
///   itself on its timer;
/// * `s.receive(duration wait) -> receive_result<inbound<T>>` — one item
///   (`ok`), or `empty` (nothing arrived within `wait`; `timeout` is treated
///   as `empty`), or `closed` (nothing will ever arrive; the consumer stops
///   receiving). `wait` is real time; `wait == 0` must not block. The
///   consumer calls `receive` from one thread at a time, but concurrently
///   with settle hooks and `backlog()`;
/// * `s.name() -> std::string_view` (const, stable while the source lives)
///   — the source name recorded in dead letters; redrive looks the origin
///   up by it;
/// * optionally `s.backlog() -> std::uint64_t` (const, thread-safe) —
///   messages waiting in the transport (lag), reported in consumer stats.
///
/// Each item's `settle` hook, if set, is called exactly once with `ack`,
/// `dead_letter` (after the dead-letter queue accepted the message),
/// `redeliver` (only when `redelivers`) or `release`, possibly after the
/// consumer's `shutdown` returned but never after the consumer is destroyed;
/// an item without a hook needs nothing. Sources must be move-constructible
/// (the consumer takes them by value).
template <class S>
concept consumer_source = std::move_constructible<S> && requires(S& s, const S& cs, duration wait) {
  typename S::payload_type;
  { S::redelivers } -> std::convertible_to<bool>;
  { s.receive(wait) } -> std::same_as<receive_result<inbound<typename S::payload_type>>>;
  { cs.name() } -> std::convertible_to<std::string_view>;
};

/// Where a source that fills the consumer's item in place puts one item
/// (the consumer implements it). Called on the receiving thread from inside
/// the source's `receive_into`, at most once per call; either member may
/// allocate and throw (the consumer's item node), in which case the item is
/// lost to the consumer: call it after the transport's own bookkeeping.
template <class T>
class inbound_sink {
 public:
  /// Takes an envelope, moved from (the consumer constructs its item from
  /// it: one move), and its settle hook (may be empty).
  virtual void accept(envelope<T>&& env, settle_hook&& hook) = 0;
  /// Takes undecodable input and its settle hook.
  virtual void accept_poison(poison_input&& poison, settle_hook&& hook) = 0;

 protected:
  inbound_sink() = default;
  inbound_sink(const inbound_sink&) = default;
  inbound_sink& operator=(const inbound_sink&) = default;
  ~inbound_sink() = default;
};

/// The optional in-place form of a source's `receive`: `s.receive_into(wait,
/// sink) -> receive_status` behaves as `receive(wait)` but hands its item to
/// `sink` (exactly one `accept` or `accept_poison` call, then `ok`) instead
/// of returning it, so the envelope is moved once into the consumer's item
/// rather than through an `inbound` and a `receive_result`. Returns `empty`,
/// `timeout` or `closed` (no sink call) as `receive` would. A source without
/// it works unchanged: the consumer adapts `receive`.
template <class S>
concept in_place_consumer_source =
    consumer_source<S> && requires(S& s, duration wait, inbound_sink<typename S::payload_type>& sink) {
      { s.receive_into(wait, sink) } -> std::same_as<receive_status>;
    };

namespace detail {
template <class T>
receive_result<inbound<T>> empty_or_closed(receive_status s) {
  return receive_result<inbound<T>>(s == receive_status::closed ? receive_status::closed : receive_status::empty);
}
}  // namespace detail

/// Source over a `channel<envelope<T>, Shape>`. No settle hook (the
/// channel has no broker state); `backlog()` is the channel's depth.
/// The channel must outlive the source.
template <class T, class Shape = mpmc>
class channel_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = false;

  /// Reads from `ch`; `name` is the source name for dead letters and redrive.
  explicit channel_source(channel<envelope<T>, Shape>& ch, std::string name = "channel")
      : ch_(&ch), name_(std::move(name)) {}

  /// `try_receive` when `wait` is zero, else `receive_for(wait)`. Never allocates.
  [[nodiscard]] receive_result<inbound<T>> receive(duration wait) {
    auto r = wait.count() <= 0 ? ch_->try_receive_result() : ch_->receive_for(wait);
    if (!r.has_value()) return detail::empty_or_closed<T>(r.status());
    return inbound<T>::of(std::move(*r));
  }
  /// As `receive`, handing the envelope to `sink` (one move from the
  /// channel's slot into the consumer's item). Never allocates itself. A
  /// template so the consumer's own (final) sink is called directly.
  template <class Sink>
    requires std::derived_from<Sink, inbound_sink<T>>
  [[nodiscard]] receive_status receive_into(duration wait, Sink& sink) {
    if constexpr (requires { Sink::takes_receive_results; }) {
      // The consumer's own sink keeps the envelope inside the result the
      // channel returned: no move at all after the channel's own.
      if (wait.count() <= 0) return sink.emplace_returned([this] { return ch_->try_receive_result(); });
      return sink.emplace_returned([this, wait] { return ch_->receive_for(wait); });
    }
    auto r = wait.count() <= 0 ? ch_->try_receive_result() : ch_->receive_for(wait);
    if (!r.has_value()) return r.status();
    sink.accept(std::move(*r), settle_hook{});
    return receive_status::ok;
  }
  /// The source name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return name_; }
  /// Messages queued in the channel (approximate). Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const noexcept { return ch_->size_approx(); }

 private:
  channel<envelope<T>, Shape>* ch_;
  std::string name_;
};

/// Source over a topic subscription of envelopes (`subscription<envelope<T>>`).
/// Each delivery's shared envelope is copied (the consumer increments
/// `attempt`). No settle hook. The subscription must outlive the source.
/// Used with <postbox/topic.hpp> included (see the include rule at the top).
template <class T>
class subscription_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = false;

  /// Reads from `sub`; `name` is the source name for dead letters and redrive.
  explicit subscription_source(subscription<envelope<T>>& sub, std::string name = "topic")
      : sub_(&sub), name_(std::move(name)) {}

  /// `try_receive` when `wait` is zero, else `receive_for(wait)`. Copies the envelope.
  [[nodiscard]] receive_result<inbound<T>> receive(duration wait) {
    if (wait.count() <= 0) {
      auto d = sub_->try_receive();
      if (!d) return receive_result<inbound<T>>(receive_status::empty);
      return inbound<T>::of(envelope<T>(**d));
    }
    auto r = sub_->receive_for(wait);
    if (!r.has_value()) return detail::empty_or_closed<T>(r.status());
    return inbound<T>::of(envelope<T>(**r));
  }
  /// As `receive`, handing the copy to `sink` (copied, then moved once).
  [[nodiscard]] receive_status receive_into(duration wait, inbound_sink<T>& sink) {
    if (wait.count() <= 0) {
      auto d = sub_->try_receive();
      if (!d) return receive_status::empty;
      sink.accept(envelope<T>(**d), settle_hook{});
      return receive_status::ok;
    }
    auto r = sub_->receive_for(wait);
    if (!r.has_value()) return r.status();
    sink.accept(envelope<T>(**r), settle_hook{});
    return receive_status::ok;
  }
  /// The source name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return name_; }
  /// Messages queued in the subscription (approximate). Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const noexcept { return sub_->size_approx(); }

 private:
  subscription<envelope<T>>* sub_;
  std::string name_;
};

/// Source over a member of a stream consumer group (`stream<envelope<T>>`).
/// It commits a partition's offset only past records that are settled
/// (acked or dead-lettered) with every earlier record of that partition
/// settled too, so a crash or a rebalance never skips an unsettled record
/// (at-least-once: records after an unsettled one may be delivered again).
/// After a rebalance, settles of records polled in an earlier generation
/// commit nothing, and the member resumes from the committed offsets. While
/// the stream is empty, `receive(wait)` polls it every `poll_interval` (real
/// time) up to `wait`. The member shares the stream's log, so the source
/// stays valid (reading what was retained) if the stream is destroyed first.
/// Used with <postbox/stream.hpp> included (see the include rule at the top).
template <class T>
class stream_group_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = false;

  /// Joins group `group` of `s` as a new member. `batch` records are polled at a time.
  stream_group_source(stream<envelope<T>>& s, const std::string& group, std::string name = "stream",
                      std::size_t batch = 64, duration poll_interval = std::chrono::milliseconds(1))
      : st_(std::make_shared<state>(s.group(group).join(), std::move(name), batch, poll_interval)) {}

  /// Takes over an existing member of a group of `s` (the member already
  /// shares the stream's log; `s` names the stream it belongs to).
  stream_group_source([[maybe_unused]] stream<envelope<T>>& s, group_member<envelope<T>>&& member, std::string name = "stream",
                      std::size_t batch = 64, duration poll_interval = std::chrono::milliseconds(1))
      : st_(std::make_shared<state>(std::move(member), std::move(name), batch, poll_interval)) {}

  /// The next record (polling the stream when the local batch is empty).
  /// A partition that fell behind retention is moved to its earliest
  /// retained offset (counted in `skipped_by_retention()`).
  [[nodiscard]] receive_result<inbound<T>> receive(duration wait) {
    const auto give_up = std::chrono::steady_clock::now() + wait;
    for (;;) {
      {
        std::lock_guard lock(st_->mu);
        if (auto item = st_->next()) return std::move(*item);
      }
      if (wait.count() <= 0 || std::chrono::steady_clock::now() >= give_up)
        return receive_result<inbound<T>>(receive_status::empty);
      std::unique_lock lock(st_->mu);
      // A stop-check pause between polls (the stream has no blocking poll); real time.
      st_->idle.wait_for(lock, st_->poll_interval);
    }
  }
  /// The source name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return st_->name; }
  /// Records of this member's partitions not committed yet. Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const {
    std::lock_guard lock(st_->mu);
    std::uint64_t n = 0;
    for (const auto& [p, t] : st_->track) {
      const auto end = st_->member.end_offset(p);
      n += end > t.next_commit ? end - t.next_commit : 0;
    }
    return n;
  }
  /// Successful commits so far. Thread-safe.
  [[nodiscard]] std::uint64_t commits() const {
    std::lock_guard lock(st_->mu);
    return st_->commits;
  }
  /// Records skipped because the member fell behind retention. Thread-safe.
  [[nodiscard]] std::uint64_t skipped_by_retention() const {
    std::lock_guard lock(st_->mu);
    return st_->skipped;
  }

 private:
  struct partition_track {
    std::uint64_t next_commit = 0;       // every record below is settled (and committable)
    std::set<std::uint64_t> settled;     // settled records at or above next_commit
  };
  struct state : std::enable_shared_from_this<state> {
    state(group_member<envelope<T>>&& m, std::string n, std::size_t b, duration pi)
        : member(std::move(m)), name(std::move(n)), batch(b == 0 ? 1 : b), poll_interval(pi) {}

    // Caller holds mu.
    std::optional<inbound<T>> next() {
      (void)member.assignment();  // picks up a rebalance (positions reset to committed)
      if (member.generation() != gen) {
        buffer.clear();  // polled under another assignment: drop
        retrack(nullptr);
      }
      if (buffer.empty()) {
        const std::vector<std::uint64_t> before = member.positions();
        auto r = member.poll(batch);
        if (!r.ok()) {
          // group_member::poll advanced the partitions it read before the
          // failing one and dropped those records: rewind them, and move the
          // failing partition to its earliest retained record.
          for (std::size_t i = 0; i < parts.size() && i < before.size(); ++i) (void)member.seek(parts[i], before[i]);
          if (member.seek(r.partition, r.earliest)) {
            auto& t = track[r.partition];
            if (t.next_commit < r.earliest) skipped += r.earliest - t.next_commit;
            t = partition_track{r.earliest, {}};
          }
          return std::nullopt;
        }
        if (member.generation() != gen) retrack(&r);  // rebalanced during the poll
        for (auto& rec : r.records) buffer.push_back(std::move(rec));
      }
      if (buffer.empty()) return std::nullopt;
      auto rec = std::move(buffer.front());
      buffer.pop_front();
      const auto p = rec.pos.partition;
      const auto o = rec.pos.offset;
      const auto g = gen;
      std::weak_ptr<state> weak = this->shared_from_this();
      return inbound<T>::of(std::move(rec.value), settle_hook([weak, p, o, g](const settle_action& a) {
                              if (auto self = weak.lock()) self->settled(p, o, g, a);
                            }));
    }

    // A new generation: every assigned partition restarts at the member's
    // position (= the committed offset right after a rebalance), or at the
    // first record of `r` from it when the rebalance happened inside a poll.
    void retrack(const read_result<envelope<T>>* r) {
      gen = member.generation();
      parts = member.assignment();
      track.clear();
      const auto& pos = member.positions();
      for (std::size_t i = 0; i < parts.size(); ++i) track[parts[i]].next_commit = pos[i];
      if (r == nullptr) return;
      for (const auto& rec : r->records) {
        auto& t = track[rec.pos.partition];
        if (rec.pos.offset < t.next_commit) t.next_commit = rec.pos.offset;
      }
    }

    void settled(std::uint32_t p, std::uint64_t o, std::uint64_t g, const settle_action& a) {
      if (a.what != settle_action::kind::ack && a.what != settle_action::kind::dead_letter) return;
      std::lock_guard lock(mu);
      if (g != gen) return;  // polled in an earlier generation: its partition was reassigned
      auto it = track.find(p);
      if (it == track.end() || o < it->second.next_commit) return;
      auto& t = it->second;
      t.settled.insert(o);
      bool advanced = false;
      while (!t.settled.empty() && *t.settled.begin() == t.next_commit) {
        t.settled.erase(t.settled.begin());
        ++t.next_commit;
        advanced = true;
      }
      if (advanced) commit();
    }

    // Commits every tracked partition at its settled prefix: the member
    // commits its positions, so move them there, commit, and move back.
    void commit() {
      const std::vector<std::uint64_t> saved = member.positions();
      for (std::size_t i = 0; i < parts.size(); ++i) (void)member.seek(parts[i], track[parts[i]].next_commit);
      const errc e = member.commit();
      for (std::size_t i = 0; i < parts.size() && i < saved.size(); ++i) (void)member.seek(parts[i], saved[i]);
      if (e == errc::ok) ++commits;
    }

    mutable std::mutex mu;
    std::condition_variable idle;  // never notified: the pause between empty polls
    group_member<envelope<T>> member;  // guarded by mu
    std::string name;
    std::size_t batch;
    duration poll_interval;
    std::deque<record<envelope<T>>> buffer;          // guarded by mu
    std::uint64_t gen = ~std::uint64_t{0};           // generation the tracking belongs to; guarded by mu
    std::vector<std::uint32_t> parts;                // assignment of `gen`; guarded by mu
    std::map<std::uint32_t, partition_track> track;  // guarded by mu
    std::uint64_t commits = 0, skipped = 0;          // guarded by mu
  };
  std::shared_ptr<state> st_;
};

/// Why a decoder failed: an errc, the field concerned (may be empty) and text.
struct decode_failure {
  errc code = errc::parse_error;
  std::string field;
  std::string message;
};

/// What a decoder for `raw_source` returns when it is not json.hpp's
/// `json::decode_result<T>`: an envelope or a `decode_failure`. A plain value.
template <class T>
class decode_outcome {
 public:
  /// A decoded envelope.
  decode_outcome(envelope<T> env) : state_(std::move(env)) {}      // NOLINT(google-explicit-constructor)
  /// A failure.
  decode_outcome(decode_failure f) : state_(std::move(f)) {}       // NOLINT(google-explicit-constructor)
  /// Whether an envelope is present. Never allocates.
  [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }
  /// The envelope; precondition `has_value()`.
  [[nodiscard]] envelope<T>& operator*() noexcept { return *std::get_if<0>(&state_); }
  /// The failure; precondition `!has_value()`.
  [[nodiscard]] const decode_failure& error() const noexcept { return *std::get_if<1>(&state_); }

 private:
  std::variant<envelope<T>, decode_failure> state_;
};

/// A decoder for `raw_source<T>`: called with the bytes, returns something
/// with `has_value()`, `*r` (an `envelope<T>&`), and `r.error()` exposing
/// `code` (errc) and `message` (and optionally `field`) — `json::decode<T>`
/// (via a lambda), `schema_registry::decode<T>` and `decode_outcome<T>` all fit.
template <class D, class T>
concept envelope_decoder =
    std::invocable<D&, std::string_view> &&
    requires(std::invoke_result_t<D&, std::string_view>& r) {
      { r.has_value() } -> std::convertible_to<bool>;
      { *r } -> std::convertible_to<envelope<T>&>;
      { r.error().code } -> std::convertible_to<errc>;
      { r.error().message } -> std::convertible_to<std::string_view>;
    };

/// Source over a channel of raw bytes (`channel<std::string, Shape>`) with a
/// decoder: bytes that decode become envelopes; bytes that do not become
/// poison items (reason = the decoder's errc name, error = its text, raw =
/// the bytes), which the consumer dead-letters at once and keeps running.
/// The decoder runs on the receiving thread, one call at a time.
template <class T, class Decoder, class Shape = mpmc>
  requires envelope_decoder<Decoder, T>
class raw_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = false;

  /// Reads bytes from `ch` and decodes them with `decoder`; `name` is the source name.
  raw_source(channel<std::string, Shape>& ch, Decoder decoder, std::string name = "raw")
      : ch_(&ch), decode_(std::move(decoder)), name_(std::move(name)) {}

  /// Receives bytes (`try_receive` when `wait` is zero) and decodes them. Allocates.
  [[nodiscard]] receive_result<inbound<T>> receive(duration wait) {
    struct collect final : inbound_sink<T> {
      std::optional<inbound<T>> out;
      void accept(envelope<T>&& env, settle_hook&& hook) override { out = inbound<T>::of(std::move(env), std::move(hook)); }
      void accept_poison(poison_input&& p, settle_hook&& hook) override {
        out = inbound<T>::malformed(std::move(p), std::move(hook));
      }
    } sink;
    const receive_status st = receive_into(wait, sink);
    if (st != receive_status::ok) return detail::empty_or_closed<T>(st);
    return std::move(*sink.out);
  }
  /// As `receive`, handing the decoded envelope (moved once) or the poison
  /// item to `sink`. Allocates (decoding).
  [[nodiscard]] receive_status receive_into(duration wait, inbound_sink<T>& sink) {
    auto r = wait.count() <= 0 ? ch_->try_receive_result() : ch_->receive_for(wait);
    if (!r.has_value()) return r.status();
    std::string bytes = std::move(*r);
    auto d = decode_(std::string_view(bytes));
    if (d.has_value()) {
      envelope<T>& env = *d;
      sink.accept(std::move(env), settle_hook{});
      return receive_status::ok;
    }
    const auto& e = d.error();
    poison_input p;
    p.reason = std::string(to_string(static_cast<errc>(e.code)));
    if constexpr (requires { std::string_view(e.field); }) {
      if (!std::string_view(e.field).empty()) {
        p.error = std::string(std::string_view(e.field));
        p.error += ": ";
      }
    }
    p.error += std::string_view(e.message);
    p.raw = std::move(bytes);
    sink.accept_poison(std::move(p), settle_hook{});
    return receive_status::ok;
  }
  /// The source name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return name_; }
  /// Byte messages queued in the channel (approximate). Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const noexcept { return ch_->size_approx(); }

 private:
  channel<std::string, Shape>* ch_;
  Decoder decode_;
  std::string name_;
};

/// Builds a `raw_source<T>` (the payload type cannot be deduced from the decoder).
template <class T, class Decoder, class Shape>
[[nodiscard]] raw_source<T, std::decay_t<Decoder>, Shape> make_raw_source(channel<std::string, Shape>& ch,
                                                                          Decoder&& decoder,
                                                                          std::string name = "raw") {
  return raw_source<T, std::decay_t<Decoder>, Shape>(ch, std::forward<Decoder>(decoder), std::move(name));
}

POSTBOX_END_NAMESPACE
