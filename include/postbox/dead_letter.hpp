// SPDX-License-Identifier: MIT
// postbox::dead_letter_queue: bounded store of messages that could not be handled, with filters and paced redrive.
#pragma once

// Design: docs/design/consumer.md ("Dead letters", "Redrive").
//
// * Entries live in an ordered map keyed by a queue-assigned id (insertion
//   order), under one mutex: dead-lettering is the slow path.
// * Bound: `capacity` entries. When full, `dead_letter_full::refuse` makes
//   `add` fail with `errc::full` and leaves the entry with the caller (the
//   consumer then releases the message to its source and keeps the entry,
//   see consumer.hpp); `drop_oldest` evicts the oldest entry, counts it and
//   hands it to the `on_evict` callback. Nothing leaves silently.
// * Redrive sends entries back to the origin registered under their source
//   name, paced by a token bucket on the queue's clock. With a timer service
//   the queue schedules itself at the next token; without one, call
//   `pump_redrive()`. A redriven envelope gets a fresh retry budget
//   (`attempt = 0`) and carries its history in headers (see below).
// * Secrets: `add` scrubs the reason and error texts (exception messages)
//   with the queue's redaction policy and the message's sensitive header
//   values, so they are never stored; listings (`list`, `get`, `describe`,
//   `export_text`) show sensitive header values as "[redacted]". The stored
//   envelope keeps its headers whole for redrive (and `on_evict`).
// * Tenants: the queue itself is the operator's interface and sees every
//   tenant; `view(tenant)` is what a tenant gets: every query through it is
//   pinned to that tenant and cannot widen. A queue built with
//   `dead_letter_options::tenant` refuses other tenants' entries.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/redaction.hpp>
#include <postbox/retry.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/dependent.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// Reasons postbox itself gives when it dead-letters a message. A handler's
/// `settlement::reject(reason)` uses its own text; a decoder failure uses
/// the decoder's `errc` name (e.g. "parse_error", "missing_field").
namespace dead_letter_reasons {
/// The message passed its deadline before a delivery started.
inline constexpr std::string_view expired = "expired";  // = to_string(errc::expired)
/// The retry policy allowed no further attempt.
inline constexpr std::string_view retries_exhausted = "retries_exhausted";
/// The handler threw an exception the classifier called permanent.
inline constexpr std::string_view permanent_error = "permanent_error";
/// `settlement::reject()` without a reason.
inline constexpr std::string_view rejected = "rejected";
/// The message's tenant is not one the consumer accepts
/// (`consumer_options::tenants` / `accept_tenant`).
inline constexpr std::string_view tenant = "tenant";
/// A source that requires signatures refused it: unsigned, unknown key id, or tampered (signing.hpp).
inline constexpr std::string_view unauthenticated = "unauthenticated";  // = to_string(errc::unauthenticated)
}  // namespace dead_letter_reasons

/// The `errc` of a send outcome: ok, full, closed, timeout or canceled. Never allocates.
[[nodiscard]] constexpr errc to_errc(send_status s) noexcept {
  switch (s) {
    case send_status::ok: return errc::ok;
    case send_status::full: return errc::full;
    case send_status::closed: return errc::closed;
    case send_status::timeout: return errc::timeout;
    case send_status::canceled: return errc::canceled;
  }
  return errc::invalid_argument;
}

/// One failed attempt: its number, when it failed (consumer clock) and why.
struct failure_record {
  std::uint32_t attempt = 0;
  time_point at{};
  std::string error;
};

/// A message that could not be handled. Either `message` holds the
/// envelope, or (undecodable input) `message` is empty and `raw` holds the
/// bytes as received. A plain value: copyable when `T` is.
template <class T>
struct dead_letter {
  std::uint64_t id = 0;                   ///< assigned by the queue on `add` (insertion order)
  std::optional<envelope<T>> message;     ///< the envelope (attempt = deliveries started); empty for poison input
  std::string raw;                        ///< the undecodable bytes (poison input only)
  std::string reason;                     ///< why: see dead_letter_reasons, a reject reason, or a decoder errc name
  std::string error;                      ///< error text (exception what(), decoder message)
  std::uint32_t attempts = 0;             ///< deliveries started in this round
  std::uint32_t prior_attempts = 0;       ///< attempts of earlier rounds (before redrives)
  std::uint32_t redrives = 0;             ///< times redriven before this dead-lettering
  time_point first_failure{};             ///< first failure ever (earlier rounds included)
  time_point last_failure{};              ///< the failure that dead-lettered it
  time_point dead_lettered_at{};          ///< when the queue accepted it (queue clock)
  std::string source;                     ///< the source name: where redrive sends it back
  std::vector<failure_record> history;    ///< the failures of this round, oldest first

  /// Message type (empty for poison input). Never allocates.
  [[nodiscard]] std::string_view type() const noexcept {
    return message ? std::string_view(message->type) : std::string_view{};
  }
  /// Partition key (empty for poison input). Never allocates.
  [[nodiscard]] std::string_view key() const noexcept {
    return message ? std::string_view(message->partition_key) : std::string_view{};
  }
  /// The message's tenant (empty for poison input and untenanted messages). Never allocates.
  [[nodiscard]] std::string_view tenant() const noexcept {
    return message ? std::string_view(message->tenant) : std::string_view{};
  }
  /// Attempts over every round.
  [[nodiscard]] std::uint32_t total_attempts() const noexcept { return prior_attempts + attempts; }
};

/// Selects dead letters; every set field must match (AND). A plain value.
struct dead_letter_filter {
  std::optional<std::string> reason{};    ///< exact reason
  std::optional<std::string> type{};      ///< exact message type
  std::optional<std::string> key{};       ///< exact partition key
  std::optional<std::string> source{};    ///< exact source name
  std::optional<duration> older_than{};   ///< dead-lettered at least this long ago
  std::optional<duration> newer_than{};   ///< dead-lettered less than this long ago
  std::optional<bool> poison{};           ///< true: only undecodable input; false: only envelopes
  /// Exact tenant of the message ("" = untenanted messages); poison input
  /// has no tenant and never matches a set tenant.
  std::optional<std::string> tenant{};

  /// Whether `d` matches at time `now`. Never allocates.
  template <class T>
  [[nodiscard]] bool matches(const dead_letter<T>& d, time_point now) const noexcept {
    if (tenant && (!d.message || d.message->tenant != *tenant)) return false;
    if (reason && d.reason != *reason) return false;
    if (type && d.type() != *type) return false;
    if (key && d.key() != *key) return false;
    if (source && d.source != *source) return false;
    if (older_than && now - d.dead_lettered_at < *older_than) return false;
    if (newer_than && now - d.dead_lettered_at >= *newer_than) return false;
    if (poison && *poison == d.message.has_value()) return false;
    return true;
  }
};

/// What `add` does on a full queue.
enum class dead_letter_full : std::uint8_t {
  refuse,       ///< `add` returns `errc::full`; the caller keeps the entry (default)
  drop_oldest,  ///< the oldest entry is evicted (counted, passed to on_evict) to make room
};

/// Dead-letter queue configuration. A plain value.
struct dead_letter_options {
  std::string name = "dead_letters";                 ///< metrics label
  std::size_t capacity = 10000;                      ///< entries held at most (>= 1)
  dead_letter_full when_full = dead_letter_full::refuse;
  double redrive_rate = 10;                          ///< redriven messages per second (> 0)
  double redrive_burst = 0;                          ///< token bucket depth; 0 = the rate (at least 1)
  /// Scope: when set, `add` refuses envelopes of any other tenant with
  /// `errc::permission_denied` (poison input, which has no tenant, is kept).
  std::optional<std::string> tenant{};
  /// Redaction for stored texts and listings; null: the process-wide policy
  /// at the time of each call (redaction.hpp).
  std::shared_ptr<const redaction_policy> redaction{};
};

/// What `redrive` sends back. A plain value.
struct redrive_options {
  dead_letter_filter filter{};                       ///< which entries
  std::size_t max = std::numeric_limits<std::size_t>::max();  ///< at most this many
  bool clear_deadline = false;                       ///< drop the deadline (else an expired message expires again)
};

/// Counters and gauges of a dead-letter queue (snapshot).
struct dead_letter_stats {
  std::size_t size = 0, capacity = 0;
  std::uint64_t added = 0;           ///< entries accepted
  std::uint64_t refused = 0;         ///< adds refused because the queue was full
  std::uint64_t evicted = 0;         ///< entries dropped by drop_oldest
  std::uint64_t removed = 0;         ///< entries removed by `remove`
  std::uint64_t redriven = 0;        ///< entries sent back to their origin
  std::uint64_t redrive_failed = 0;  ///< origin refused (full, closed): entry kept, tried again
  std::uint64_t unroutable = 0;      ///< redrive asked for an entry whose source has no origin
  std::size_t redrive_pending = 0;   ///< entries waiting for a token
  duration oldest_age{0};            ///< age of the oldest entry (queue clock)
};

template <class T>
class dead_letter_view;

/// A bounded, thread-safe store of dead letters with list, filter, remove
/// and redrive. All members are thread-safe; most allocate (this is the slow
/// path: one mutex, an ordered map). Callbacks (origins, on_evict) run
/// outside the queue's lock on the calling (or timer) thread.
///
/// **Example**:
///   postbox::dead_letter_queue<order> dlq({.capacity = 1000, .redrive_rate = 5});
///   dlq.set_origin("orders", orders_channel);     // or any errc(envelope<order>) callable
///   dlq.redrive({.filter = {.reason = "retries_exhausted"}});
template <class T>
class dead_letter_queue {
 public:
  /// Receives a redriven envelope; returns `ok` when accepted (else the
  /// entry stays and is tried again at the next token).
  using origin = std::function<errc(envelope<T>)>;
  /// Receives the raw bytes of a redriven poison entry.
  using raw_origin = std::function<errc(std::string)>;
  /// Receives an entry evicted by `drop_oldest`.
  using evict_handler = std::function<void(dead_letter<T>)>;

  /// A queue on `clk`; redrive progresses only through `redrive` and
  /// `pump_redrive` calls. Throws error(invalid_argument) for capacity 0.
  explicit dead_letter_queue(dead_letter_options options = {}, const clock& clk = default_clock())
      : state_(std::make_shared<state>(std::move(options), clk, nullptr)) {}

  /// A queue that schedules its own redrive pacing on `timers` (and reads
  /// its clock). `timers` must outlive the queue.
  explicit dead_letter_queue(timer_service& timers, dead_letter_options options = {})
      : state_(std::make_shared<state>(std::move(options), timers.get_clock(), &timers)) {}

  // Not copyable or movable. The deleted copy constructor takes a non-const
  // reference on purpose: `const dead_letter_queue&` would make
  // `dead_letter_queue q({})` ambiguous on g++ (the braces could also
  // value-initialize a temporary queue to copy from); a temporary cannot bind
  // to `dead_letter_queue&`, so `{}` and `{.capacity = n}` pick the options.
  dead_letter_queue(dead_letter_queue&) = delete;
  dead_letter_queue& operator=(const dead_letter_queue&) = delete;

  /// Cancels a scheduled redrive tick; entries are discarded.
  ~dead_letter_queue() {
    std::lock_guard lock(state_->mu);
    if (state_->timers != nullptr && state_->timer != 0) state_->timers->cancel(state_->timer);
  }

  /// Stores `entry` (assigning `id` and `dead_lettered_at`, scrubbing
  /// secrets from its reason and error texts, see the file comment). Returns
  /// `ok`; `full` under `refuse` when at capacity; `permission_denied` when
  /// the queue is scoped to another tenant. On failure `entry` is untouched
  /// (moved from only on `ok`). Under `drop_oldest` a full queue evicts its
  /// oldest entry to `on_evict`. Allocates. Thread-safe.
  [[nodiscard]] errc add(dead_letter<T>&& entry) {
    if (state_->opts.tenant && entry.message && entry.message->tenant != *state_->opts.tenant) {
      std::lock_guard lock(state_->mu);
      ++state_->stats.refused;
      return errc::permission_denied;
    }
    // Scrubbed before the lock; assigned only once the entry is accepted.
    const auto p = policy();
    std::string reason = scrub(*p, entry, entry.reason);
    std::string error = scrub(*p, entry, entry.error);
    std::vector<std::string> history;
    history.reserve(entry.history.size());
    for (const auto& f : entry.history) history.push_back(scrub(*p, entry, f.error));
    std::optional<dead_letter<T>> evicted;
    evict_handler on_evict;
    {
      std::lock_guard lock(state_->mu);
      auto& s = *state_;
      if (s.entries.size() >= s.opts.capacity) {
        if (s.opts.when_full == dead_letter_full::refuse || s.entries.empty()) {
          ++s.stats.refused;
          return errc::full;
        }
        auto oldest = s.entries.begin();
        evicted.emplace(std::move(oldest->second));
        s.entries.erase(oldest);
        ++s.stats.evicted;
        on_evict = s.on_evict;
      }
      entry.reason = std::move(reason);
      entry.error = std::move(error);
      for (std::size_t i = 0; i < history.size(); ++i) entry.history[i].error = std::move(history[i]);
      entry.id = ++s.last_id;
      entry.dead_lettered_at = s.clk->now();
      const auto id = entry.id;
      s.entries.emplace(id, std::move(entry));
      ++s.stats.added;
    }
    if (evicted && on_evict) {
      POSTBOX_TRY { on_evict(std::move(*evicted)); }
      POSTBOX_CATCH_ALL {}
    }
    return errc::ok;
  }

  /// Copies of the entries matching `filter`, oldest first, with sensitive
  /// header values redacted. Every tenant's entries (use `view(tenant)` for
  /// one tenant). Allocates. Thread-safe.
  [[nodiscard]] std::vector<dead_letter<T>> list(const dead_letter_filter& filter = {}) const {
    std::vector<dead_letter<T>> out;
    const auto p = policy();
    std::lock_guard lock(state_->mu);
    const auto now = state_->clk->now();
    for (const auto& [id, d] : state_->entries)
      if (filter.matches(d, now)) out.push_back(redacted(*p, d));
    return out;
  }

  /// A copy of entry `id`, if present, with sensitive header values
  /// redacted. Allocates. Thread-safe.
  [[nodiscard]] std::optional<dead_letter<T>> get(std::uint64_t id) const {
    const auto p = policy();
    std::lock_guard lock(state_->mu);
    auto it = state_->entries.find(id);
    if (it == state_->entries.end()) return std::nullopt;
    return redacted(*p, it->second);
  }

  /// One line per entry matching `filter` (see `describe`), oldest first:
  /// a listing safe to log or show an operator. Allocates. Thread-safe.
  [[nodiscard]] std::string export_text(const dead_letter_filter& filter = {}) const {
    const auto p = policy();
    std::string out;
    for (const auto& d : list(filter)) {
      out += describe(d, *p);
      out += '\n';
    }
    return out;
  }

  /// A one-line text of `d`: id, reason, source, tenant, type, message id,
  /// attempts, error and headers, with sensitive header values redacted and
  /// the texts scrubbed by `policy`. Never the payload or the raw bytes
  /// (their size only). Allocates. Thread-safe (pure).
  [[nodiscard]] static std::string describe(const dead_letter<T>& d, const redaction_policy& policy) {
    std::string out = "dead_letter " + std::to_string(d.id) + " reason=" + scrub(policy, d, d.reason);
    if (!d.source.empty()) out += " source=" + d.source;
    if (d.message) {
      if (!d.message->tenant.empty()) out += " tenant=" + d.message->tenant;
      if (!d.message->type.empty()) out += " type=" + d.message->type;
      out += " id=" + d.message->id.to_string();
    } else {
      out += " poison bytes=" + std::to_string(d.raw.size());
    }
    out += " attempts=" + std::to_string(d.total_attempts());
    if (!d.error.empty()) out += " error=" + scrub(policy, d, d.error);
    if (d.message && !d.message->headers.empty()) {
      out += " headers={";
      bool first = true;
      for (const auto& [k, v] : d.message->headers) {
        if (!first) out += ", ";
        first = false;
        out += k;
        out += '=';
        out += policy.is_sensitive(k) ? std::string(redacted_text) : scrub(policy, d, v);
      }
      out += '}';
    }
    return out;
  }
  /// As above with the process-wide policy. Allocates. Thread-safe.
  [[nodiscard]] static std::string describe(const dead_letter<T>& d) { return describe(d, *current_redaction_policy()); }

  /// The entries of one tenant: every query through the view is pinned to
  /// `tenant` ("" = untenanted messages; poison input is never in a view).
  /// The queue must outlive the view. Never blocks; allocates the name.
  [[nodiscard]] dead_letter_view<T> view(std::string tenant) { return dead_letter_view<T>(*this, std::move(tenant)); }

  /// Number of entries matching `filter`. Thread-safe.
  [[nodiscard]] std::size_t count(const dead_letter_filter& filter = {}) const {
    std::lock_guard lock(state_->mu);
    const auto now = state_->clk->now();
    std::size_t n = 0;
    for (const auto& [id, d] : state_->entries)
      if (filter.matches(d, now)) ++n;
    return n;
  }

  /// Removes entry `id` (also from a pending redrive). Returns whether it
  /// existed. Thread-safe. (A template on the integer type so that
  /// `remove({})` means the empty filter, every entry, not id 0.)
  template <std::integral Id>
  bool remove(Id id) {
    std::lock_guard lock(state_->mu);
    if (state_->entries.erase(static_cast<std::uint64_t>(id)) == 0) return false;
    ++state_->stats.removed;
    return true;
  }

  /// Removes every entry matching `filter`; returns how many. Thread-safe.
  std::size_t remove(const dead_letter_filter& filter) {
    std::lock_guard lock(state_->mu);
    const auto now = state_->clk->now();
    std::size_t n = 0;
    for (auto it = state_->entries.begin(); it != state_->entries.end();) {
      if (filter.matches(it->second, now)) {
        it = state_->entries.erase(it);
        ++n;
      } else {
        ++it;
      }
    }
    state_->stats.removed += n;
    return n;
  }

  /// Registers where entries whose `source` is `source` are redriven.
  /// Replaces an earlier origin of that name. Thread-safe.
  void set_origin(std::string source, origin fn) {
    std::lock_guard lock(state_->mu);
    state_->origins[std::move(source)].envelope = std::move(fn);
  }
  /// Registers a channel (anything with `try_send(envelope<T>)` returning
  /// `send_status`) as the origin of `source`: redrive uses `try_send`, so a
  /// full channel keeps the entry for the next token. `ch` must outlive the queue.
  template <class Channel>
    requires requires(Channel& c, envelope<T> e) {
      { c.try_send(std::move(e)) } -> std::same_as<send_status>;
    }
  void set_origin(std::string source, Channel& ch) {
    set_origin(std::move(source), origin([&ch](envelope<T> e) { return to_errc(ch.try_send(std::move(e))); }));
  }
  /// Registers where poison entries (raw bytes) of `source` are redriven,
  /// e.g. back into a raw-bytes channel after the decoder was fixed. Thread-safe.
  void set_raw_origin(std::string source, raw_origin fn) {
    std::lock_guard lock(state_->mu);
    state_->origins[std::move(source)].raw = std::move(fn);
  }
  /// Sets the callback that receives entries evicted by `drop_oldest`. Thread-safe.
  void on_evict(evict_handler fn) {
    std::lock_guard lock(state_->mu);
    state_->on_evict = std::move(fn);
  }

  /// Queues the entries matching `options.filter` (oldest first, at most
  /// `options.max`, skipping those already queued) for redrive to their
  /// origins and sends as many as the token bucket allows now; the rest go
  /// out at `redrive_rate` (scheduled on the timer service if the queue has
  /// one, else on later `pump_redrive` calls). Entries whose source has no
  /// origin stay in the queue and are counted `unroutable`. Returns how many
  /// were queued. Thread-safe.
  std::size_t redrive(const redrive_options& options = {}) {
    std::size_t queued = 0;
    {
      std::lock_guard lock(state_->mu);
      auto& s = *state_;
      const auto now = s.clk->now();
      for (auto& [id, d] : s.entries) {
        if (queued >= options.max) break;
        if (d.redrive_queued || !options.filter.matches(d, now)) continue;
        if (!s.routable(d)) {
          ++s.stats.unroutable;
          continue;
        }
        d.redrive_queued = true;
        d.redrive_clear_deadline = options.clear_deadline;
        s.pending.push_back(id);
        ++queued;
      }
    }
    pump_redrive();
    return queued;
  }

  /// Sends queued redrives while tokens are available; returns how many
  /// were accepted by their origins. Schedules the next tick on the timer
  /// service when entries remain. Origins run outside the lock. Thread-safe.
  std::size_t pump_redrive() { return state::pump(state_); }

  /// Entries held. Thread-safe.
  [[nodiscard]] std::size_t size() const {
    std::lock_guard lock(state_->mu);
    return state_->entries.size();
  }
  /// The bound. Never blocks.
  [[nodiscard]] std::size_t capacity() const noexcept { return state_->opts.capacity; }
  /// The name given in the options (metrics label). Never blocks.
  [[nodiscard]] const std::string& name() const noexcept { return state_->opts.name; }
  /// The queue's clock. Never blocks.
  [[nodiscard]] const clock& get_clock() const noexcept { return *state_->clk; }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] dead_letter_stats stats() const {
    std::lock_guard lock(state_->mu);
    auto s = state_->stats;
    s.size = state_->entries.size();
    s.capacity = state_->opts.capacity;
    s.redrive_pending = 0;
    for (const auto& [id, d] : state_->entries)
      if (d.redrive_queued) ++s.redrive_pending;
    if (!state_->entries.empty()) s.oldest_age = state_->clk->now() - state_->entries.begin()->second.dead_lettered_at;
    return s;
  }

  /// The redaction policy in effect: the options' or the process-wide one. Thread-safe.
  [[nodiscard]] std::shared_ptr<const redaction_policy> policy() const {
    return state_->opts.redaction ? state_->opts.redaction : current_redaction_policy();
  }
  /// The tenant the queue is scoped to (options), if any. Never blocks.
  [[nodiscard]] const std::optional<std::string>& tenant() const noexcept { return state_->opts.tenant; }

  /// The envelope an entry's redrive sends: `attempt` reset to 0 (a fresh
  /// retry budget), history in the `dead-letter-*` headers (attempts of all
  /// rounds, redrive count, first and last failure, last reason, error and
  /// source), deadline dropped when `clear_deadline`. Precondition:
  /// `d.message`. Allocates. Thread-safe (pure).
  [[nodiscard]] static envelope<T> redriven_envelope(const dead_letter<T>& d, bool clear_deadline = false) {
    envelope<T> env = *d.message;
    env.attempt = 0;
    env.headers.set(header_names::dead_letter_attempts, std::to_string(d.prior_attempts + d.attempts));
    env.headers.set(header_names::dead_letter_redrives, std::to_string(d.redrives + 1));
    env.headers.set(header_names::dead_letter_first_failure, std::to_string(d.first_failure.time_since_epoch().count()));
    env.headers.set(header_names::dead_letter_last_failure, std::to_string(d.last_failure.time_since_epoch().count()));
    env.headers.set(header_names::dead_letter_reason, d.reason);
    env.headers.set(header_names::dead_letter_error, d.error);
    env.headers.set(header_names::dead_letter_source, d.source);
    if (clear_deadline) env.deadline.reset();
    return env;
  }

 private:
  static std::string scrub(const redaction_policy& p, const dead_letter<T>& d, std::string_view text) {
    if (text.empty()) return {};
    return d.message ? p.scrub(text, d.message->headers) : p.scrub(text);
  }
  static dead_letter<T> redacted(const redaction_policy& p, const dead_letter<T>& d) {
    dead_letter<T> out = d;
    if (out.message) out.message->headers = p.redact(out.message->headers);
    return out;
  }

  struct stored : dead_letter<T> {
    explicit stored(dead_letter<T>&& d) : dead_letter<T>(std::move(d)) {}
    bool redrive_queued = false;
    bool redrive_clear_deadline = false;
  };
  struct origin_pair {
    origin envelope;
    raw_origin raw;
  };

  struct state {
    state(dead_letter_options o, const clock& c, timer_service* t)
        : opts(std::move(o)), clk(&c), timers(t),
          bucket(opts.redrive_rate, opts.redrive_burst > 0 ? opts.redrive_burst : std::max(1.0, opts.redrive_rate), c) {
      if (opts.capacity == 0) POSTBOX_THROW(error(errc::invalid_argument, "postbox::dead_letter_queue: capacity must be at least 1"));
    }

    bool routable(const dead_letter<T>& d) const {
      auto it = origins.find(d.source);
      if (it == origins.end()) return false;
      return d.message ? static_cast<bool>(it->second.envelope) : static_cast<bool>(it->second.raw);
    }

    // Sends pending redrives while tokens last. The entry leaves the map
    // while its origin runs (outside the lock) and returns on failure.
    static std::size_t pump(const std::shared_ptr<state>& self) {
      std::size_t sent = 0;
      for (;;) {
        std::unique_lock lock(self->mu);
        auto& s = *self;
        while (!s.pending.empty() && s.entries.count(s.pending.front()) == 0) s.pending.pop_front();
        if (s.pending.empty()) return sent;
        if (!s.bucket.try_take()) {
          s.arm(self, s.bucket.next_available());
          return sent;
        }
        const auto id = s.pending.front();
        s.pending.pop_front();
        auto node = s.entries.extract(id);
        stored& d = node.mapped();
        if (!s.routable(d)) {  // origin removed meanwhile: keep it, stop queuing it
          d.redrive_queued = false;
          ++s.stats.unroutable;
          s.entries.insert(std::move(node));
          continue;
        }
        const auto route = s.origins.find(d.source)->second;
        lock.unlock();
        errc r = errc::invalid_argument;
        POSTBOX_TRY {
          if (d.message) {
            r = route.envelope(redriven_envelope(static_cast<const dead_letter<T>&>(d), d.redrive_clear_deadline));
          } else {
            r = route.raw(d.raw);
          }
        }
        POSTBOX_CATCH_ALL { r = errc::handler_error; }
        lock.lock();
        if (r == errc::ok) {
          ++s.stats.redriven;
          ++sent;
          continue;
        }
        // Refused (full, closed, threw): keep it at the head of the line and
        // try again at the next token.
        ++s.stats.redrive_failed;
        s.entries.insert(std::move(node));
        s.pending.push_front(id);
        s.arm(self, s.bucket.next_available());
        return sent;
      }
    }

    // Caller holds mu.
    void arm(const std::shared_ptr<state>& self, time_point when) {
      if (timers == nullptr || timer != 0) return;
      std::weak_ptr<state> weak = self;
      timer = timers->schedule_at(when, [weak] {
        if (auto s = weak.lock()) {
          {
            std::lock_guard l(s->mu);
            s->timer = 0;
          }
          pump(s);
        }
      });
    }

    dead_letter_options opts;
    const clock* clk;
    timer_service* timers;
    mutable std::mutex mu;
    std::map<std::uint64_t, stored> entries;             // guarded by mu; id order = insertion order
    detail::dependent_t<std::deque<std::uint64_t>, T> pending;  // redrive queue (ids); guarded by mu; detail/dependent.hpp
    std::unordered_map<std::string, origin_pair> origins;  // guarded by mu
    evict_handler on_evict;                              // guarded by mu
    token_bucket bucket;                                 // its own lock
    timer_service::timer_id timer = 0;                   // armed redrive tick; guarded by mu
    std::uint64_t last_id = 0;                           // guarded by mu
    dead_letter_stats stats;                             // guarded by mu
  };

  std::shared_ptr<state> state_;
};

/// One tenant's window on a dead-letter queue (`dead_letter_queue::view`):
/// list, count, get, remove and redrive see only entries whose message has
/// this tenant. A filter's own `tenant` cannot widen it: a filter naming
/// another tenant matches nothing. A cheap handle (a pointer and the
/// name); the queue must outlive it. Thread-safe as the queue.
template <class T>
class dead_letter_view {
 public:
  /// A view of `queue` pinned to `tenant`. Allocates the name.
  dead_letter_view(dead_letter_queue<T>& queue, std::string tenant) : queue_(&queue), tenant_(std::move(tenant)) {}

  /// The tenant. Never allocates.
  [[nodiscard]] const std::string& tenant() const noexcept { return tenant_; }
  /// The tenant's entries matching `filter` (redacted, as `dead_letter_queue::list`).
  [[nodiscard]] std::vector<dead_letter<T>> list(const dead_letter_filter& filter = {}) const {
    return queue_->list(pinned(filter));
  }
  /// How many of the tenant's entries match `filter`.
  [[nodiscard]] std::size_t count(const dead_letter_filter& filter = {}) const { return queue_->count(pinned(filter)); }
  /// Entry `id` when it is the tenant's (redacted), else empty.
  [[nodiscard]] std::optional<dead_letter<T>> get(std::uint64_t id) const {
    auto d = queue_->get(id);
    if (d && (!d->message || d->message->tenant != tenant_)) return std::nullopt;
    return d;
  }
  /// The tenant's entries matching `filter` as text (`dead_letter_queue::export_text`).
  [[nodiscard]] std::string export_text(const dead_letter_filter& filter = {}) const {
    return queue_->export_text(pinned(filter));
  }
  /// Removes the tenant's entries matching `filter`; returns how many.
  std::size_t remove(const dead_letter_filter& filter) { return queue_->remove(pinned(filter)); }
  /// Redrives the tenant's entries matching `options.filter` (as `dead_letter_queue::redrive`).
  std::size_t redrive(redrive_options options = {}) {
    options.filter = pinned(options.filter);
    return queue_->redrive(options);
  }

 private:
  // The caller's filter AND this tenant: a different tenant in the filter
  // can match nothing, which a tenant name that no message can carry gives.
  [[nodiscard]] dead_letter_filter pinned(dead_letter_filter f) const {
    if (f.tenant && *f.tenant != tenant_) {
      f.poison = true;  // tenant set AND poison only: matches nothing
    }
    f.tenant = tenant_;
    return f;
  }

  dead_letter_queue<T>* queue_;
  std::string tenant_;
};

/// Registers a dead-letter queue under its name: size, capacity, added,
/// refused, evicted, redriven, redrive_pending, oldest age. `dlq` must
/// outlive the handle. Allocates; thread-safe.
template <class T>
[[nodiscard]] metrics_registry::registration register_dead_letter_queue(metrics_registry& registry,
                                                                        const dead_letter_queue<T>& dlq) {
  return registry.add("dead_letter_queue", dlq.name(), [&dlq](metric_writer& w) {
    const auto s = dlq.stats();
    w.gauge("postbox_dead_letter_depth", "Dead letters held.", static_cast<double>(s.size));
    w.gauge("postbox_dead_letter_capacity", "Dead letters held at most.", static_cast<double>(s.capacity));
    w.counter("postbox_dead_letter_added_total", "Dead letters accepted.", static_cast<double>(s.added));
    w.counter("postbox_dead_letter_refused_total", "Dead letters refused because the queue was full.",
              static_cast<double>(s.refused));
    w.counter("postbox_dead_letter_evicted_total", "Dead letters evicted by drop_oldest.", static_cast<double>(s.evicted));
    w.counter("postbox_dead_letter_redriven_total", "Dead letters sent back to their origin.",
              static_cast<double>(s.redriven));
    w.gauge("postbox_dead_letter_redrive_pending", "Dead letters waiting for a redrive token.",
            static_cast<double>(s.redrive_pending));
    w.gauge("postbox_dead_letter_oldest_age_seconds", "Age of the oldest dead letter.",
            std::chrono::duration<double>(s.oldest_age).count());
  });
}

POSTBOX_END_NAMESPACE
