// SPDX-License-Identifier: MIT
// JetStream as a consumer-runtime source: a durable pull consumer whose deliveries settle through the consumer's ack, retry and reject, with an ack-deadline heartbeat.
#pragma once

// Opt-in edge (layer 5): needs libnats and nlohmann/json (CMake target
// `postbox::nats`). Design notes: docs/design/nats.md ("Consumer source").
//
// Settlement mapping (see `settle_action` in settlement.hpp):
//   ack          -> AckSync (waits for the server's confirmation; see "Ack
//                   guarantee" on jetstream_consumer_source)
//   redeliver(d) -> Nak with delay d (retry(after), retry() backoff, defer)
//   dead_letter  -> Term (the consumer already put it in its local dead-letter queue)
//   release      -> Nak now (shutdown, or the dead-letter queue refused it)
// envelope.attempt = the producer's attempt + NumDelivered - 1 (deliveries
// started before this one), where NumDelivered is raised to one more than
// the last delivery this source saw of the same stream sequence when the
// server repeats a count (the redelivery guard). Undecodable messages become
// `inbound::malformed` (dead-lettered locally, then termed).
//
// Signed messages (signing.hpp): wrap the source in `verified_source` with a
// payload encoder giving the JSON body (`nlohmann::json(p).dump()`, what
// to_nats_msg sends); unsigned, unknown-key and tampered messages are then
// dead-lettered as `unauthenticated` and termed. Publish through a
// `signing_publisher` over `jetstream_publisher`.

#include <postbox/consumer.hpp>
#include <postbox/nats.hpp>
#include <postbox/retry.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// The `max_deliver` to give a durable whose messages a consumer handles
/// under `policy`: the policy's attempts (at least 1) plus `slack`. The
/// broker's max-deliver must be at least `max_attempts`, so that the
/// consumer, not the broker, decides when a message is dead-lettered (a
/// broker that stops redelivering first leaves the message neither handled
/// nor in the local dead-letter queue). `slack` covers deliveries that end
/// without a handler decision yet count on the server: a crash or an ack
/// lost before the ack wait, a shutdown release, a defer. -1 (unlimited) is
/// always safe. Never allocates.
[[nodiscard]] constexpr int max_deliver_for(const retry_policy& policy, std::uint32_t slack = 3) noexcept {
  const std::uint64_t attempts = policy.max_attempts == 0 ? 1 : policy.max_attempts;
  const std::uint64_t n = attempts + slack;
  return n > static_cast<std::uint64_t>(INT_MAX) ? -1 : static_cast<int>(n);
}

/// Settings of a `jetstream_consumer_source` beyond the durable's own
/// (`jetstream_consumer_options`). A plain value.
struct jetstream_source_options {
  /// Source name recorded in dead letters (redrive finds the origin by it);
  /// empty: the durable name.
  std::string name{};
  /// Deliveries asked for per fetch (>= 1). They wait in a local buffer
  /// until the consumer takes them, under the heartbeat.
  int batch = 16;
  /// Period of the ack-deadline heartbeat, which sends in-progress for every
  /// unsettled delivery. Zero: ack_wait / 3; negative: no heartbeat (a
  /// handler slower than ack_wait then sees its message redelivered).
  std::chrono::milliseconds heartbeat{0};
  /// Stop extending one delivery's deadline after this long, so a handler
  /// that never returns does not hold its message forever (the server then
  /// redelivers it after ack_wait). Zero: no limit.
  std::chrono::milliseconds heartbeat_limit{std::chrono::hours(1)};
  /// After a failed fetch (connection lost, server error), `receive` waits
  /// this long (real time, at most its `wait`) before reporting empty, so a
  /// consumer does not spin while the connection is being restored.
  std::chrono::milliseconds error_pause{50};
  /// Redelivery guard: how many stream sequences the source remembers the
  /// last delivery count of, from a delivery until it is acked or termed, so
  /// a redelivery the server numbers no higher than an earlier one still
  /// counts one more attempt (nats-server 2.9.10 now and then redelivers a
  /// nak'd message with an unchanged NumDelivered). Beyond this the lowest
  /// sequence is forgotten. Zero: no guard (the server's count as given).
  std::size_t tracked_sequences = 4096;
};

/// Counters of a `jetstream_consumer_source` (snapshot).
struct jetstream_source_stats {
  std::uint64_t fetched = 0;          ///< deliveries taken from the server
  std::uint64_t malformed = 0;        ///< of those, undecodable (handed over as poison)
  std::uint64_t fetch_errors = 0;     ///< fetches that failed (not counting "nothing there")
  std::uint64_t acked = 0;            ///< AckSync confirmed by the server
  std::uint64_t ack_failures = 0;     ///< AckSync not confirmed: the server redelivers after ack_wait
  std::uint64_t naked = 0;            ///< redeliver: nak with the consumer's delay
  std::uint64_t termed = 0;           ///< dead_letter: term
  std::uint64_t released = 0;         ///< release, or dropped unsettled: nak now
  std::uint64_t settle_failures = 0;  ///< nak or term calls libnats refused (the server redelivers after ack_wait)
  std::uint64_t in_progress = 0;      ///< in-progress signals sent by the heartbeat
  std::size_t unsettled = 0;          ///< deliveries taken from the server and not settled yet
  std::uint64_t lag = 0;              ///< NumPending of the latest delivery (the server's backlog then)
  std::uint64_t recounted = 0;        ///< deliveries whose NumDelivered the redelivery guard raised
};

namespace detail {

// Counters shared by a source, its deliveries and its monitors. Every member
// is a statistic written with relaxed increments by whichever thread settles,
// fetches or beats, and read (relaxed) by stats(): no data is published
// through them.
struct js_source_counters {
  std::atomic<std::uint64_t> fetched{0}, malformed{0}, fetch_errors{0}, acked{0}, ack_failures{0}, naked{0},
      termed{0}, released{0}, settle_failures{0}, in_progress{0}, lag{0}, recounted{0};
  std::atomic<std::size_t> unsettled{0};

  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    c.fetch_add(n, std::memory_order_relaxed);
  }
  [[nodiscard]] jetstream_source_stats snapshot() const noexcept {
    jetstream_source_stats s;
    // relaxed: statistics only (see the struct comment).
    s.fetched = fetched.load(std::memory_order_relaxed);
    s.malformed = malformed.load(std::memory_order_relaxed);
    s.fetch_errors = fetch_errors.load(std::memory_order_relaxed);
    s.acked = acked.load(std::memory_order_relaxed);
    s.ack_failures = ack_failures.load(std::memory_order_relaxed);
    s.naked = naked.load(std::memory_order_relaxed);
    s.termed = termed.load(std::memory_order_relaxed);
    s.released = released.load(std::memory_order_relaxed);
    s.settle_failures = settle_failures.load(std::memory_order_relaxed);
    s.in_progress = in_progress.load(std::memory_order_relaxed);
    s.unsettled = unsettled.load(std::memory_order_relaxed);
    s.lag = lag.load(std::memory_order_relaxed);
    s.recounted = recounted.load(std::memory_order_relaxed);
    return s;
  }
};

// The redelivery guard: per stream sequence, the delivery count this source
// last used for a message not yet acked or termed. A delivery counts
// max(server's NumDelivered, last count + 1), so attempts strictly increase
// per message even when the server repeats a count. Bounded: beyond
// `capacity` sequences the lowest (oldest message) is forgotten. Capacity
// zero: no guard. Thread-safe (fetches and settlements run on different
// threads); allocates in `observe`.
class js_delivery_counts {
 public:
  explicit js_delivery_counts(std::size_t capacity) : capacity_(capacity) {}

  // The count to use for a delivery of `seq` that the server numbered
  // `server_count` (0: the server gave none; passed through, not tracked).
  [[nodiscard]] std::uint32_t observe(std::uint64_t seq, std::uint32_t server_count) {
    if (capacity_ == 0 || server_count == 0) return server_count;
    std::lock_guard lock(m_);
    auto [it, fresh] = seen_.try_emplace(seq, server_count);
    if (!fresh) {
      const std::uint32_t next = it->second == UINT32_MAX ? it->second : it->second + 1;
      it->second = std::max(server_count, next);
    }
    const std::uint32_t counted = it->second;
    while (seen_.size() > capacity_) seen_.erase(seen_.begin());
    return counted;
  }
  // `seq` is settled for good (acked or termed): drop its count.
  void forget(std::uint64_t seq) {
    if (capacity_ == 0) return;
    std::lock_guard lock(m_);
    seen_.erase(seq);
  }
  [[nodiscard]] std::size_t size() const {
    std::lock_guard lock(m_);
    return seen_.size();
  }

 private:
  const std::size_t capacity_;
  mutable std::mutex m_;                        // guards seen_
  std::map<std::uint64_t, std::uint32_t> seen_;  // stream sequence -> last delivery count used
};

template <class T>
struct js_tracked;

// What outlives the source handle as long as one delivery does: the pull
// source, the registry of unsettled deliveries the heartbeat walks, and the
// counters. (Settlements are publishes on the connection to the delivery's
// ack subject, so they need the connection, not the subscription.)
template <class T>
struct js_source_core {
  js_source_core(jetstream& js, const jetstream_consumer_options& co, std::string n, std::size_t tracked)
      : pull(js, co), name(std::move(n)), counters(std::make_shared<js_source_counters>()), deliveries(tracked) {}

  jetstream_pull_source<T> pull;  // fetched from the receiving thread only
  const std::string name;
  const std::shared_ptr<js_source_counters> counters;
  js_delivery_counts deliveries;  // the redelivery guard: observed at fetch, forgotten at ack or term
  std::mutex registry_m;  // guards registry and next_key
  std::unordered_map<std::uint64_t, std::weak_ptr<js_tracked<T>>> registry;
  std::uint64_t next_key = 0;

  std::uint64_t new_key() {
    std::lock_guard lock(registry_m);
    return ++next_key;
  }
  // Makes `t` visible to the heartbeat.
  void enroll(const std::shared_ptr<js_tracked<T>>& t) {
    std::lock_guard lock(registry_m);
    registry.emplace(t->key, t);
    counters->unsettled.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
  }
  void withdraw(std::uint64_t k) {
    std::lock_guard lock(registry_m);
    if (registry.erase(k) != 0) counters->unsettled.fetch_sub(1, std::memory_order_relaxed);  // a statistic
  }
  // The unsettled deliveries still alive, as owning pointers; the caller
  // drops them without holding registry_m (a drop may run ~js_tracked,
  // which withdraws).
  std::vector<std::shared_ptr<js_tracked<T>>> live() {
    std::vector<std::shared_ptr<js_tracked<T>>> out;
    std::lock_guard lock(registry_m);
    out.reserve(registry.size());
    for (auto& [k, w] : registry)
      if (auto p = w.lock()) out.push_back(std::move(p));
    return out;
  }
};

// One delivery from the server until it is settled. The settle hook and the
// heartbeat both reach the libnats message, always under `m`, and neither
// touches it once `settled` is set; the object (and so the message) lives
// while the hook or a heartbeat snapshot holds it. Dropped unsettled (an
// inbound destroyed without its hook called, a buffered delivery when the
// source goes), it naks the message so the server redelivers it at once.
template <class T>
struct js_tracked {
  js_tracked(std::shared_ptr<js_source_core<T>> c, jetstream_delivery<T>&& dl)
      : core(std::move(c)), d(std::move(dl)), key(core->new_key()), since(std::chrono::steady_clock::now()) {}
  js_tracked(const js_tracked&) = delete;
  js_tracked& operator=(const js_tracked&) = delete;
  ~js_tracked() {
    bool was_settled = true;
    {
      std::lock_guard lock(m);
      was_settled = settled;
      if (!settled) {
        settled = true;
        count(d.nak(), core->counters->released);
      }
    }
    if (!was_settled) core->withdraw(key);
  }

  void settle(const settle_action& a) {
    {
      std::lock_guard lock(m);
      if (settled) return;  // the consumer settles once; this only guards misuse
      settled = true;
      auto& c = *core->counters;
      switch (a.what) {
        case settle_action::kind::ack:
          if (d.ack() == errc::ok) {
            js_source_counters::bump(c.acked);
            core->deliveries.forget(d.stream_sequence());
          } else {
            js_source_counters::bump(c.ack_failures);  // may come back: keep its count
          }
          break;
        case settle_action::kind::redeliver: {
          // Round up: a 0.4 ms retry is a 1 ms nak, not an immediate one.
          auto ms = std::chrono::ceil<std::chrono::milliseconds>(a.delay);
          if (ms.count() < 0) ms = std::chrono::milliseconds(0);
          count(d.nak(ms), c.naked);
          break;
        }
        case settle_action::kind::dead_letter:
          if (count(d.term(), c.termed)) core->deliveries.forget(d.stream_sequence());
          break;
        case settle_action::kind::release: count(d.nak(), c.released); break;
      }
    }
    core->withdraw(key);
  }

  // Heartbeat: extends the ack deadline unless settled or past `limit`.
  void beat(std::chrono::steady_clock::time_point now, std::chrono::milliseconds limit) {
    std::lock_guard lock(m);
    if (settled || (limit.count() > 0 && now - since >= limit)) return;
    if (d.in_progress() == errc::ok) js_source_counters::bump(core->counters->in_progress);
  }

  bool count(errc rc, std::atomic<std::uint64_t>& ok_counter) {
    js_source_counters::bump(rc == errc::ok ? ok_counter : core->counters->settle_failures);
    return rc == errc::ok;
  }

  const std::shared_ptr<js_source_core<T>> core;
  std::mutex m;              // guards d's message calls and settled
  jetstream_delivery<T> d;   // the libnats message; its envelope was moved out before enrolment
  bool settled = false;      // guarded by m
  const std::uint64_t key;   // registry key
  const std::chrono::steady_clock::time_point since;
};

}  // namespace detail

/// A read-only view of a source's counters that stays valid after the source
/// was moved into a consumer (and after both are gone). Copyable; thread-safe.
class jetstream_source_monitor {
 public:
  explicit jetstream_source_monitor(std::shared_ptr<const detail::js_source_counters> c) noexcept
      : counters_(std::move(c)) {}
  /// Counters snapshot. Never blocks; never allocates.
  [[nodiscard]] jetstream_source_stats stats() const noexcept { return counters_->snapshot(); }

 private:
  std::shared_ptr<const detail::js_source_counters> counters_;
};

/// A `consumer_source` over a JetStream durable pull consumer (explicit
/// ack), for `postbox::consumer<T>`: `redelivers = true`, so the server owns
/// redelivery — a retry or defer naks with the delay, and the message comes
/// back with NumDelivered one higher. See the header comment for the
/// settlement mapping.
///
/// * Consumer groups: sources (in one process or many) with the same durable
///   name share the server-side position and compete for messages.
/// * Heartbeat: a thread sends in-progress for every delivery taken from the
///   server and not yet settled (buffered or being handled) every
///   `heartbeat` (ack_wait / 3 by default), so a long handler keeps its
///   message; a settled delivery is never touched again. Real time: the
///   server's ack wait is real time.
/// * Retries: set the durable's `max_deliver` with `max_deliver_for(policy)`
///   (or -1) so the consumer's retry policy decides dead-lettering.
/// * Per-key order holds within what one source fetched, not across a
///   broker redelivery (as in JetStream).
/// * Ack guarantee: an ack counted in `acked` was confirmed by the server,
///   so the message is not redelivered while that server runs or after a
///   clean restart. After a server crash (SIGKILL) it may be: nats-server
///   writes a durable's ack state asynchronously. Delivery is at-least-once;
///   make effects exactly-once with an `inbox` in the handler.
///
/// Move-constructible (the consumer takes it by value). `receive` is for one
/// thread at a time; settle hooks may run on any thread, also after the
/// source is destroyed. The jetstream context and its connection must
/// outlive the source and every delivery it handed out.
///
/// **Example**:
///   postbox::jetstream_consumer_options co{"ORDERS", "billing", "orders.>", 30s,
///                                          postbox::max_deliver_for(opts.retry)};
///   postbox::consumer<order> c(postbox::jetstream_consumer_source<order>(js, co), handler, dlq, opts);
template <class T>
class jetstream_consumer_source {
 public:
  using payload_type = T;
  static constexpr bool redelivers = true;

  /// Binds (creating if needed) the durable `co` and starts the heartbeat
  /// thread (unless disabled). Throws postbox::error when the durable cannot
  /// be bound, or `invalid_argument` for a batch below 1. Allocates.
  jetstream_consumer_source(jetstream& js, const jetstream_consumer_options& co, jetstream_source_options so = {})
      : core_(std::make_shared<detail::js_source_core<T>>(js, co, so.name.empty() ? co.durable : so.name,
                                                          so.tracked_sequences)),
        local_(std::make_unique<local>()) {
    if (so.batch < 1) POSTBOX_THROW(error(errc::invalid_argument, "jetstream_consumer_source: batch must be >= 1"));
    local_->batch = so.batch;
    local_->error_pause = so.error_pause;
    local_->heartbeat_limit = so.heartbeat_limit;
    auto period = so.heartbeat;
    if (period.count() == 0) {
      const auto wait = co.ack_wait.count() > 0 ? co.ack_wait : std::chrono::milliseconds(30000);
      period = std::max(std::chrono::milliseconds(1), wait / 3);
    }
    if (period.count() > 0) {
      local* l = local_.get();
      local_->heartbeat = std::thread([l, core = core_, period] { l->beat_loop(*core, period); });
    }
  }

  jetstream_consumer_source(jetstream_consumer_source&&) noexcept = default;
  jetstream_consumer_source& operator=(jetstream_consumer_source&&) = delete;
  jetstream_consumer_source(const jetstream_consumer_source&) = delete;
  jetstream_consumer_source& operator=(const jetstream_consumer_source&) = delete;

  /// Stops the heartbeat (joins its thread) and naks every delivery fetched
  /// but not handed out, so the server redelivers them at once. Deliveries
  /// handed out keep the source's shared state (registry, counters) alive
  /// until they are settled or dropped. Blocks briefly.
  ~jetstream_consumer_source() {
    if (!local_) return;  // moved from
    {
      std::lock_guard lock(local_->beat_m);
      local_->stopping = true;
    }
    local_->beat_cv.notify_all();
    if (local_->heartbeat.joinable()) local_->heartbeat.join();
    local_->buffer.clear();
  }

  /// The next delivery: from the local buffer, else from a fetch of up to
  /// `batch`, waiting up to `wait` (real time) for the first. With `wait`
  /// zero: `empty` at once when the previous fetch left the server empty
  /// (once; the next call asks again), else a "no wait" fetch that returns
  /// what the server has (one round trip).
  /// `empty` when nothing came (also after a fetch error, following
  /// `error_pause`); `closed` once the connection is closed for good.
  /// Blocks as described; allocates. One thread at a time.
  [[nodiscard]] receive_result<inbound<T>> receive(duration wait) {
    if (local_->buffer.empty()) {
      const receive_status st = refill(wait);
      if (st == receive_status::closed) return receive_result<inbound<T>>(receive_status::closed);
    }
    if (local_->buffer.empty()) return receive_result<inbound<T>>(receive_status::empty);
    entry e = std::move(local_->buffer.front());
    local_->buffer.pop_front();
    local_->buffered.store(local_->buffer.size(), std::memory_order_relaxed);  // relaxed: a gauge
    settle_hook hook([t = std::move(e.tracked)](const settle_action& a) { t->settle(a); });
    if (e.env) return inbound<T>::of(std::move(*e.env), std::move(hook));
    return inbound<T>::malformed(std::move(e.poison), std::move(hook));
  }

  /// The source name (dead letters, redrive). Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return core_->name; }

  /// Messages waiting: the server's NumPending at the latest delivery plus
  /// the deliveries buffered here. Never blocks. Thread-safe.
  [[nodiscard]] std::uint64_t backlog() const noexcept {
    // relaxed: gauges; no data is published through them.
    return core_->counters->lag.load(std::memory_order_relaxed) + local_->buffered.load(std::memory_order_relaxed);
  }

  /// Counters snapshot. Never blocks. Thread-safe.
  [[nodiscard]] jetstream_source_stats stats() const noexcept { return core_->counters->snapshot(); }

  /// A handle on the counters that outlives moving this source into a consumer.
  [[nodiscard]] jetstream_source_monitor monitor() const { return jetstream_source_monitor(core_->counters); }

 private:
  struct entry {
    std::shared_ptr<detail::js_tracked<T>> tracked;
    std::optional<envelope<T>> env;  // empty for poison
    poison_input poison;
  };

  // Owned by the handle (stable address across moves): the receiving side
  // and the heartbeat thread.
  struct local {
    std::deque<entry> buffer;  // receiving thread only (and the destructor, after the last receive)
    // Deliveries in `buffer`: a gauge written by the receiving thread and
    // read by backlog() from any thread, both relaxed (nothing is published
    // through it; the buffer itself is the receiving thread's alone).
    std::atomic<std::size_t> buffered{0};
    int batch = 16;
    bool drained = false;  // the latest fetch left nothing on the server; receiving thread only
    std::chrono::milliseconds error_pause{50};
    std::chrono::milliseconds heartbeat_limit{0};
    std::mutex beat_m;             // guards stopping
    std::condition_variable beat_cv;  // stop, and the pause after a failed fetch
    bool stopping = false;
    std::thread heartbeat;

    void beat_loop(detail::js_source_core<T>& core, std::chrono::milliseconds period) {
      std::unique_lock lock(beat_m);
      for (;;) {
        // Real time on purpose: the server's ack wait runs on its clock.
        if (beat_cv.wait_for(lock, period, [&] { return stopping; })) return;
        lock.unlock();
        {
          auto live = core.live();
          const auto now = std::chrono::steady_clock::now();
          for (auto& t : live) t->beat(now, heartbeat_limit);
        }  // dropped here, registry_m not held
        lock.lock();
      }
    }
  };

  receive_status refill(duration wait) {
    auto& c = *core_->counters;
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(wait);
    if (ms.count() <= 0 && local_->drained) {
      // The last fetch saw nothing more on the server: end this drain without
      // a round trip (the next zero-wait call asks again).
      local_->drained = false;
      return receive_status::empty;
    }
    auto got = ms.count() <= 0 ? core_->pull.fetch_available(local_->batch) : core_->pull.fetch(local_->batch, ms);
    if (!got.has_value()) {
      const errc e = got.status();
      if (e == errc::timeout || e == errc::not_found) {
        local_->drained = true;
        return receive_status::empty;
      }
      if (e == errc::closed) return receive_status::closed;
      detail::js_source_counters::bump(c.fetch_errors);
      // A stop-check pause (real time), so a lost connection is not polled in a loop.
      const auto pause = std::min(local_->error_pause, std::max(ms, std::chrono::milliseconds(0)));
      std::unique_lock lock(local_->beat_m);
      local_->beat_cv.wait_for(lock, pause, [&] { return local_->stopping; });
      return receive_status::empty;
    }
    local_->drained = got->empty() || got->back().pending() == 0;
    for (auto& d : *got) {
      entry e;
      // The redelivery guard: at least one more than the last delivery of this
      // sequence seen here (the server may repeat a count).
      const std::uint32_t counted = core_->deliveries.observe(d.stream_sequence(), d.delivered());
      if (counted != d.delivered()) detail::js_source_counters::bump(c.recounted);
      if (d.has_value()) {
        envelope<T>& env = *d;
        // The delivery counts this delivery (producer's attempt + NumDelivered);
        // the consumer wants the deliveries started before it.
        env.attempt += counted - d.delivered();
        if (counted > 0 && env.attempt > 0) --env.attempt;
        e.env.emplace(std::move(env));
      } else {
        e.poison.reason = std::string(to_string(d.error().code));
        e.poison.error = "NATS message did not decode: " + d.error().field;
        e.poison.raw = std::string(d.data());
        detail::js_source_counters::bump(c.malformed);
      }
      c.lag.store(d.pending(), std::memory_order_relaxed);  // relaxed: a statistic
      e.tracked = std::make_shared<detail::js_tracked<T>>(core_, std::move(d));
      core_->enroll(e.tracked);  // now visible to the heartbeat
      local_->buffer.push_back(std::move(e));
    }
    detail::js_source_counters::bump(c.fetched, got->size());
    local_->buffered.store(local_->buffer.size(), std::memory_order_relaxed);  // relaxed: a gauge
    return receive_status::ok;
  }

  std::shared_ptr<detail::js_source_core<T>> core_;
  std::unique_ptr<local> local_;
};

POSTBOX_END_NAMESPACE
