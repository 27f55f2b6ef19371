// SPDX-License-Identifier: MIT
// Transactional outbox: stage envelopes in the caller's store transaction; a relay publishes them in order per key, at least once.
// Design notes (leases, per-key order, crash points, retention, wake-up): docs/design/outbox.md
#pragma once

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/retry.hpp>
#include <postbox/store.hpp>
#include <postbox/stream.hpp>
#include <postbox/topic.hpp>
#include <postbox/detail/random.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// A codec for envelopes of payload `T`: `encode(env)` gives the text the
/// outbox stores; `decode<T>(text)` gives something with `has_value()`,
/// `status()` and `operator*` yielding the envelope (`postbox::json::codec`
/// in <postbox/json.hpp> is one; so is any type returning `result<envelope<T>>`).
template <class C, class T>
concept envelope_codec = requires(const C& c, const envelope<T>& env, std::string_view text) {
  { c.encode(env) } -> std::convertible_to<std::string>;
  { c.template decode<T>(text).has_value() } -> std::convertible_to<bool>;
  { c.template decode<T>(text).status() } -> std::convertible_to<errc>;
  { *c.template decode<T>(text) } -> std::convertible_to<const envelope<T>&>;
};

/// Stages outgoing envelopes in a store transaction, next to the caller's
/// own writes: the message exists exactly when the transaction commits.
/// `Codec` encodes envelopes (see `envelope_codec`).
///
/// **Example** (SQLite; see examples/outbox.cpp):
///   postbox::sqlite_store db("orders.db");
///   postbox::outbox out(db, postbox::json::codec{});
///   auto tx = db.begin();
///   tx.exec("INSERT INTO orders(id, cents) VALUES (?1, ?2)", id, cents);
///   out.stage(tx, postbox::make_envelope(order_placed{id, cents}));
///   tx.commit();   // both rows or neither
///
/// Thread-safe (it holds no state of its own beyond the codec, which must be
/// safe to call concurrently); each call allocates.
template <outbox_store Store, class Codec>
class outbox {
 public:
  using transaction = typename Store::transaction;

  /// An outbox on `store` (not owned; must outlive it); `staged_at` is read
  /// from `clk`.
  explicit outbox(Store& store, Codec codec = {}, const clock& clk = default_clock())
      : store_(&store), codec_(std::move(codec)), clock_(&clk) {}

  /// Encodes `env` and adds it to `tx`. Returns `ok`; `invalid_argument`
  /// (nil id, or the codec threw), `conflict` (the id is already in the
  /// outbox) or a store error. Any failure dooms `tx`: its commit rolls back
  /// and returns that error, so business rows never commit without their
  /// message. Allocates; blocks on the store's I/O.
  template <class T>
    requires envelope_codec<Codec, T>
  [[nodiscard]] errc stage(transaction& tx, const envelope<T>& env) {
    stored_message m;
    m.id = env.id;
    m.type = env.type;
    m.partition_key = env.partition_key;
    m.correlation_id = env.correlation_id;
    m.causation_id = env.causation_id;
    m.staged_at = clock_->now();
    bool encoded = false;
    POSTBOX_TRY {
      m.body = codec_.encode(env);
      encoded = true;
    }
    POSTBOX_CATCH_ALL {}
    if (!encoded) {
      tx.fail(errc::invalid_argument, "outbox: the codec could not encode message " + env.id.to_string());
      return errc::invalid_argument;
    }
    return store_->outbox_stage(tx, m);
  }

  /// Adds an already encoded message (its `sequence` is assigned by the
  /// store; `staged_at` is set from the clock when left at its default).
  /// Same results as `stage`.
  [[nodiscard]] errc stage_encoded(transaction& tx, stored_message m) {
    if (m.staged_at == time_point{}) m.staged_at = clock_->now();
    return store_->outbox_stage(tx, m);
  }

  /// The store.
  [[nodiscard]] Store& store() const noexcept { return *store_; }
  /// The codec.
  [[nodiscard]] const Codec& codec() const noexcept { return codec_; }

 private:
  Store* store_;
  Codec codec_;
  const clock* clock_;
};

/// Where a relay publishes: called once per message, in order per key;
/// returns `ok` when the message is published, anything else to have it
/// retried later (an exception counts as `handler_error`).
using outbox_destination = std::function<errc(const stored_message&)>;

/// Points in a relay's batch, reported to `relay_options::on_point` (for
/// observation and for crash tests that stop a process exactly there).
enum class relay_point {
  claimed,        ///< a non-empty batch was leased
  published,      ///< the destination accepted one message (not yet marked)
  before_mark,    ///< every message of the batch was tried; marking comes next
  marked,         ///< the published messages are marked dispatched
};

/// Settings of an outbox_relay. A plain value.
struct relay_options {
  /// Most messages leased and published per batch; also the bound on
  /// duplicates after a crash.
  std::size_t batch_size = 64;
  /// How long a claimed batch stays leased to this relay. The relay checks
  /// the lease before each publish and stops the batch when it has run out.
  duration lease = std::chrono::seconds(30);
  /// Fallback wake-up period, for commits made by other processes (commits
  /// in this process wake the relay at once).
  duration poll_interval = std::chrono::seconds(1);
  /// Dispatched rows are deleted once they are older than this.
  duration retention = std::chrono::hours(1);
  /// How often the relay deletes expired dispatched rows.
  duration purge_interval = std::chrono::minutes(1);
  /// Backoff of a failing destination (per message: `attempts` so far).
  /// `max_attempts` is ignored: the outbox never drops a message; it retries
  /// at the capped backoff until the destination takes it.
  retry_policy retry{.max_attempts = 0,
                     .initial_backoff = std::chrono::milliseconds(100),
                     .multiplier = 2.0,
                     .max_backoff = std::chrono::seconds(30),
                     .full_jitter = true};
  /// Lease owner name; must be unique among relays on one database. Empty:
  /// a random one.
  std::string owner;
  /// Seed of the backoff jitter; 0 draws one.
  std::uint64_t jitter_seed = 0;
  /// Called at each `relay_point` on the thread running the batch, with the
  /// message for `published`. Must not call back into this relay. An
  /// exception from it leaves `run_once` at that point, as a crash would
  /// (rows stay leased until the lease ends); on the relay's own thread it
  /// would end the process, so only tests that call `run_once` throw.
  std::function<void(relay_point, const stored_message*)> on_point;
};

/// What one `run_once` did. A plain value.
struct relay_step {
  errc status = errc::ok;             ///< `ok`, or the store error that cut the step short
  std::size_t claimed = 0;            ///< messages leased
  std::size_t published = 0;          ///< destination calls that returned ok
  std::size_t failed = 0;             ///< destination calls that failed (their keys wait for a retry)
  std::size_t marked = 0;             ///< messages marked dispatched
  std::size_t purged = 0;             ///< dispatched rows deleted
  bool more = false;                  ///< more may be claimable right now (a full batch, or a cut-short one)
  std::optional<time_point> next_due; ///< when a blocked key may become claimable
};

/// Counters of a relay since it was built. A plain value.
struct relay_stats {
  std::uint64_t batches = 0;           ///< non-empty claims
  std::uint64_t claimed = 0;           ///< messages leased
  std::uint64_t published = 0;         ///< successful destination calls
  std::uint64_t dispatched = 0;        ///< messages marked dispatched
  std::uint64_t publish_failures = 0;  ///< failed destination calls
  std::uint64_t store_errors = 0;      ///< store operations that failed
  std::uint64_t lease_lost = 0;        ///< published messages another relay had re-leased (will be republished)
  std::uint64_t purged = 0;            ///< dispatched rows deleted
  std::string last_error;              ///< text of the latest failure (destination or store)
};

/// Publishes what an outbox staged, in staging order per partition key, at
/// least once, and marks it dispatched. Several relays (threads or
/// processes) may share one store: a batch is leased (owner + expiry on the
/// clock) and a key with a message leased elsewhere or waiting for a retry
/// is skipped as a whole, so no two relays publish one message at the same
/// time and no key is published out of order. A crash between publishing and
/// marking republishes at most one batch, with the same message ids.
///
/// Drive it with `run_once()` / `drain()` (deterministic, for tests and
/// manual loops) or `start()` its thread, which runs a batch whenever a local
/// commit stages messages (`commit_signal`), at the earliest retry time, and
/// every `poll_interval` for other processes' commits, all on the clock.
/// Thread-safe: `run_once` calls are serialized; `stats()` may be called
/// from anywhere. Allocates per batch.
template <outbox_store Store>
class outbox_relay {
 public:
  /// A relay from `store` to `destination` (both must outlive it); timing on
  /// `clk`. Throws `invalid_argument` for a zero batch size or lease, or an
  /// empty destination.
  outbox_relay(Store& store, outbox_destination destination, relay_options options = {},
               const clock& clk = default_clock())
      : store_(&store), destination_(std::move(destination)), options_(std::move(options)), clock_(&clk),
        jitter_(options_.jitter_seed != 0 ? options_.jitter_seed : detail::entropy64()) {
    if (options_.batch_size == 0) POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: batch_size must be > 0"));
    if (options_.lease <= duration::zero())
      POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: lease must be positive"));
    if (!destination_) POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: no destination"));
    if (options_.owner.empty()) options_.owner = "relay-" + message_id::generate().to_string();
    next_purge_ = clock_->now();
  }
  outbox_relay(const outbox_relay&) = delete;
  outbox_relay& operator=(const outbox_relay&) = delete;
  /// Stops the thread if started (the batch in progress finishes first).
  ~outbox_relay() { stop(); }

  /// Runs one batch now, on the calling thread: purges expired dispatched
  /// rows when due, leases up to `batch_size` messages, publishes them in
  /// order (a failure holds back the rest of that key and schedules a retry
  /// with backoff), marks the published ones dispatched and releases the
  /// rest. Never waits for new messages; blocks on the store and the
  /// destination. Thread-safe (serialized with other calls).
  relay_step run_once() {
    std::lock_guard run(run_mutex_);
    relay_step step;
    const time_point now = clock_->now();
    if (now >= next_purge_) purge(now, step);
    const time_point lease_until = now + options_.lease;
    auto claim = store_->outbox_claim(options_.owner, now, lease_until, options_.batch_size);
    if (!claim) {
      note_store_error(claim.status(), "claim");
      step.status = claim.status();
      return step;
    }
    step.next_due = claim->next_due;
    auto& batch = claim->messages;
    step.claimed = batch.size();
    if (batch.empty()) return step;
    bump(&relay_stats::batches, 1);
    bump(&relay_stats::claimed, batch.size());
    point(relay_point::claimed, nullptr);

    std::vector<std::uint64_t> published, untouched;
    std::vector<std::string_view> failed_keys;
    bool cut_short = false;
    for (const auto& m : batch) {
      const bool key_failed =
          std::find(failed_keys.begin(), failed_keys.end(), std::string_view(m.partition_key)) != failed_keys.end();
      if (cut_short || key_failed) {
        untouched.push_back(m.sequence);
        continue;
      }
      // relaxed: a hint to stop early; the batch stays consistent either way.
      if (stopping_.load(std::memory_order_relaxed) || clock_->now() >= lease_until) {
        cut_short = true;
        untouched.push_back(m.sequence);
        continue;
      }
      std::string why;
      const errc rc = publish(m, why);
      if (rc == errc::ok) {
        published.push_back(m.sequence);
        ++step.published;
        point(relay_point::published, &m);
        continue;
      }
      ++step.failed;
      failed_keys.emplace_back(m.partition_key);
      const time_point retry_at = clock_->now() + options_.retry.backoff(m.attempts + 1, jitter_next());
      step.next_due = step.next_due ? std::min(*step.next_due, retry_at) : retry_at;
      note_failure(&relay_stats::publish_failures, why);
      const errc r = store_->outbox_retry_later(options_.owner, m.sequence, retry_at, why);
      if (r != errc::ok && r != errc::not_found) note_store_error(r, "retry_later");
    }
    bump(&relay_stats::published, step.published);
    point(relay_point::before_mark, nullptr);
    if (!published.empty()) {
      auto marked = store_->outbox_mark_dispatched(options_.owner, published, clock_->now());
      if (!marked) {
        // The rows stay leased to us until the lease runs out, then they are
        // published again (at-least-once; same ids).
        note_store_error(marked.status(), "mark_dispatched");
        step.status = marked.status();
      } else {
        step.marked = *marked;
        bump(&relay_stats::dispatched, *marked);
        if (*marked < published.size()) bump(&relay_stats::lease_lost, published.size() - *marked);
        point(relay_point::marked, nullptr);
      }
    }
    if (!untouched.empty()) {
      const errc r = store_->outbox_release(options_.owner, untouched);
      if (r != errc::ok) note_store_error(r, "release");
    }
    step.more = step.status == errc::ok && (batch.size() >= options_.batch_size || cut_short);
    return step;
  }

  /// Runs batches until nothing is claimable right now (or a store error,
  /// or `max_batches`); returns how many messages were marked dispatched.
  /// Blocks like `run_once`.
  std::size_t drain(std::size_t max_batches = std::numeric_limits<std::size_t>::max()) {
    std::size_t total = 0;
    for (std::size_t i = 0; i < max_batches; ++i) {
      const relay_step s = run_once();
      total += s.marked;
      if (!s.more) break;
    }
    return total;
  }

  /// Starts the relay's thread (idempotent). Thread-safe.
  void start() {
    std::lock_guard lock(thread_mutex_);
    if (thread_.joinable()) return;
    // relaxed: the thread is created after this store (thread start orders it).
    stopping_.store(false, std::memory_order_relaxed);
    thread_ = std::thread([this] { loop(); });
  }

  /// Stops the thread after its current batch (idempotent). Blocks until it
  /// has exited. Thread-safe.
  void stop() {
    std::lock_guard lock(thread_mutex_);
    if (!thread_.joinable()) return;
    // release: pairs with the acquire loads in loop(); the signal's mutex
    // (taken by wake) orders it with a waiter's check.
    stopping_.store(true, std::memory_order_release);
    store_->commits().wake();
    thread_.join();
  }

  /// Counters since construction. Thread-safe; allocates (the error text).
  [[nodiscard]] relay_stats stats() const {
    std::lock_guard lock(stats_mutex_);
    return stats_;
  }

  /// This relay's lease owner name.
  [[nodiscard]] const std::string& owner() const noexcept { return options_.owner; }
  /// The store.
  [[nodiscard]] Store& store() const noexcept { return *store_; }

 private:
  void loop() {
    // acquire: pairs with the release store in stop().
    while (!stopping_.load(std::memory_order_acquire)) {
      // Read before the batch: a commit during the batch changes it, so the
      // wait below returns at once instead of missing that commit.
      const std::uint64_t seen = store_->commits().sequence();
      const relay_step s = run_once();
      if (stopping_.load(std::memory_order_acquire)) break;
      if (s.more) continue;
      const time_point now = clock_->now();
      time_point deadline = now + options_.poll_interval;
      if (s.status != errc::ok) {
        ++store_failures_in_row_;
        deadline = now + options_.retry.backoff(store_failures_in_row_, jitter_next());
      } else {
        store_failures_in_row_ = 0;
        if (s.next_due && *s.next_due < deadline) deadline = *s.next_due;
        time_point purge_at;
        {
          std::lock_guard run(run_mutex_);  // run_once may also run on other threads
          purge_at = next_purge_;
        }
        if (purge_at < deadline) deadline = purge_at;
      }
      store_->commits().wait(*clock_, seen, deadline,
                             // acquire: pairs with the release store in stop().
                             [this] { return stopping_.load(std::memory_order_acquire); });
    }
  }

  void purge(time_point now, relay_step& step) {
    next_purge_ = now + options_.purge_interval;
    constexpr std::size_t chunk = 1024;
    for (;;) {
      auto n = store_->outbox_purge(now - options_.retention, chunk);
      if (!n) {
        note_store_error(n.status(), "purge");
        return;
      }
      step.purged += *n;
      bump(&relay_stats::purged, *n);
      if (*n < chunk) return;
    }
  }

  errc publish(const stored_message& m, std::string& why) {
    errc rc = errc::handler_error;
    POSTBOX_TRY { rc = destination_(m); }
    POSTBOX_CATCH_ALL {
      rc = errc::handler_error;
      why = "outbox_relay: the destination threw publishing " + m.id.to_string();
      return rc;
    }
    if (rc != errc::ok) why = "outbox_relay: publishing " + m.id.to_string() + " failed: " + std::string(to_string(rc));
    return rc;
  }

  void point(relay_point p, const stored_message* m) {
    if (options_.on_point) options_.on_point(p, m);
  }

  std::uint64_t jitter_next() {
    std::lock_guard lock(stats_mutex_);
    return jitter_.next();
  }

  void bump(std::uint64_t relay_stats::*field, std::uint64_t n) {
    std::lock_guard lock(stats_mutex_);
    stats_.*field += n;
  }
  void note_failure(std::uint64_t relay_stats::*field, const std::string& why) {
    std::lock_guard lock(stats_mutex_);
    ++(stats_.*field);
    stats_.last_error = why;
  }
  void note_store_error(errc code, const char* what) {
    note_failure(&relay_stats::store_errors,
                 std::string("outbox_relay: ") + what + " failed: " + std::string(to_string(code)));
  }

  Store* store_;
  outbox_destination destination_;
  relay_options options_;
  const clock* clock_;
  std::mutex run_mutex_;  // serializes run_once
  time_point next_purge_;  // under run_mutex_
  mutable std::mutex stats_mutex_;
  relay_stats stats_;
  jitter_source jitter_;  // under stats_mutex_
  std::uint32_t store_failures_in_row_ = 0;  // loop() only
  std::mutex thread_mutex_;  // start/stop
  std::thread thread_;
  /// Set by stop() (release), read by loop() (acquire) and by run_once
  /// (relaxed: only a hint to end a batch early). The partner of the release
  /// is the acquire in loop(); commit_signal::wake() makes a waiting loop see it.
  std::atomic<bool> stopping_{false};
};

namespace detail {
template <class T, class Codec>
bool outbox_decode(const Codec& codec, const stored_message& m, envelope<T>& out, errc& rc) {
  auto decoded = codec.template decode<T>(m.body);
  if (!decoded.has_value()) {
    rc = decoded.status() == errc::ok ? errc::parse_error : decoded.status();
    return false;
  }
  out = std::move(*decoded);
  return true;
}
}  // namespace detail

/// A destination that decodes each message with `codec` and `try_send`s it
/// into `ch`: a full channel is `full` and a closed one `closed` (both retried
/// with backoff). `ch` must outlive the relay. Allocates per message.
template <class T, class Shape, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_channel(channel<envelope<T>, Shape>& ch, Codec codec) {
  return [&ch, codec = std::move(codec)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    switch (ch.try_send(std::move(env))) {
      case send_status::ok: return errc::ok;
      case send_status::closed: return errc::closed;
      default: return errc::full;
    }
  };
}

/// A destination that decodes each message and publishes it on `t` under the
/// subject `subject(m)` (default: the message type; empty publishes without a
/// subject). A `fail` subscription that refuses it makes the publish `full`,
/// and the retry delivers again to every subscription (same id).
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_topic(topic<envelope<T>>& t, Codec codec,
                                          std::function<std::string(const stored_message&)> subject = {}) {
  return [&t, codec = std::move(codec), subject = std::move(subject)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    std::string s = subject ? subject(m) : m.type;
    const publish_result r = s.empty() ? t.publish(std::move(env)) : t.publish(std::move(s), std::move(env));
    return r.ok() ? errc::ok : errc::full;
  };
}

/// A destination that decodes each message and appends it to `s` under its
/// partition key, so one key lands in one stream partition in order.
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_stream(stream<envelope<T>>& s, Codec codec) {
  return [&s, codec = std::move(codec)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    (void)s.append(m.partition_key, std::move(env));
    return errc::ok;
  };
}

/// Registers a relay's counters and its store's outbox counts (pending,
/// leased, retrying, dispatched, oldest pending age on `clk`). Reading costs
/// one store query per scrape. `relay` must outlive the handle. Allocates.
template <class Store>
[[nodiscard]] metrics_registry::registration register_outbox_relay(metrics_registry& registry, std::string name,
                                                                   const outbox_relay<Store>& relay,
                                                                   const clock& clk = default_clock()) {
  return registry.add("outbox_relay", std::move(name), [&relay, &clk](metric_writer& w) {
    const relay_stats s = relay.stats();
    w.counter("postbox_outbox_published_total", "Successful destination calls.", static_cast<double>(s.published));
    w.counter("postbox_outbox_dispatched_total", "Messages marked dispatched.", static_cast<double>(s.dispatched));
    w.counter("postbox_outbox_publish_failures_total", "Failed destination calls.",
              static_cast<double>(s.publish_failures));
    w.counter("postbox_outbox_store_errors_total", "Store operations of the relay that failed.",
              static_cast<double>(s.store_errors));
    w.counter("postbox_outbox_lease_lost_total", "Published messages another relay had re-leased.",
              static_cast<double>(s.lease_lost));
    w.counter("postbox_outbox_purged_total", "Dispatched rows deleted after retention.", static_cast<double>(s.purged));
    if (auto c = relay.store().outbox_summary()) {
      w.gauge("postbox_outbox_pending", "Staged messages not yet dispatched.", static_cast<double>(c->pending));
      w.gauge("postbox_outbox_leased", "Pending messages under a lease.", static_cast<double>(c->leased));
      w.gauge("postbox_outbox_retrying", "Pending messages whose publication failed at least once.",
              static_cast<double>(c->retrying));
      w.gauge("postbox_outbox_dispatched", "Dispatched messages kept until retention.",
              static_cast<double>(c->dispatched));
      const double age =
          c->oldest_pending ? std::chrono::duration<double>(clk.now() - *c->oldest_pending).count() : 0.0;
      w.gauge("postbox_outbox_oldest_pending_seconds", "Age of the oldest pending message.", age < 0 ? 0.0 : age);
    }
  });
}

POSTBOX_END_NAMESPACE
