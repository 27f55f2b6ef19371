// SPDX-License-Identifier: MIT
// Idempotent consumer (inbox): a handler runs once per message id per consumer; and version-ordered apply for projections.
// Design notes (savepoints, dedup window, concurrent duplicates, reorder buffer): docs/design/outbox.md
#pragma once

#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/store.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/dependent.hpp>

#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

namespace detail {
template <class>
inline constexpr bool inbox_always_false = false;

/// Separates the consumer name from the tenant in an inbox's store key.
inline constexpr char inbox_tenant_separator = '\x1f';

/// The store key of `consumer`'s ids for messages of `tenant`: the name
/// itself for untenanted messages (so inboxes from before tenants keep
/// their ids), else `consumer <US> tenant`. Unambiguous because a consumer
/// name never holds the separator. Allocates.
[[nodiscard]] inline std::string inbox_scope(std::string_view consumer, std::string_view tenant) {
  std::string key(consumer);
  if (!tenant.empty()) {
    key += inbox_tenant_separator;
    key.append(tenant);
  }
  return key;
}

/// The outcome of one handler call: `ok`, or the error and its text.
struct handler_result {
  errc code = errc::ok;
  std::string message;
};

/// Calls a handler returning void (success unless it throws), `errc` (`ok`
/// is success) or something convertible to bool (true is success); an
/// exception becomes `handler_error` with its text.
template <class Fn, class... Args>
handler_result run_handler(Fn& fn, Args&... args) {
  using R = std::invoke_result_t<Fn&, Args&...>;
  handler_result out;
#if POSTBOX_HAS_EXCEPTIONS
  try {
#endif
    if constexpr (std::is_void_v<R>) {
      fn(args...);
    } else if constexpr (std::is_same_v<std::remove_cvref_t<R>, errc>) {
      out.code = fn(args...);
      if (out.code != errc::ok) out.message = "handler returned " + std::string(to_string(out.code));
    } else if constexpr (std::is_convertible_v<R, bool>) {
      if (!static_cast<bool>(fn(args...))) {
        out.code = errc::handler_error;
        out.message = "handler returned false";
      }
    } else {
      static_assert(inbox_always_false<R>, "a handler returns void, postbox::errc or bool");
    }
#if POSTBOX_HAS_EXCEPTIONS
  } catch (const std::exception& e) {
    out.code = errc::handler_error;
    out.message = std::string("handler threw: ") + e.what();
  } catch (...) {
    out.code = errc::handler_error;
    out.message = "handler threw a non-standard exception";
  }
#endif
  return out;
}

/// Calls `fn(tx, env)` when it takes both, else `fn(tx)`.
template <class Fn, class Tx, class Env>
handler_result run_with(Fn& fn, Tx& tx, const Env& env) {
  if constexpr (std::is_invocable_v<Fn&, Tx&, const Env&>) {
    return run_handler(fn, tx, env);
  } else {
    static_assert(std::is_invocable_v<Fn&, Tx&>, "a handler takes (transaction&) or (transaction&, const envelope<T>&)");
    return run_handler(fn, tx);
  }
}
}  // namespace detail

/// What an inbox did with a message.
enum class inbox_status {
  processed,  ///< the handler ran and succeeded; its writes and the id are in the transaction
  duplicate,  ///< the id was already recorded for this consumer; the handler did not run
  failed,     ///< the handler or the store failed; nothing of it was kept and the id is not recorded
};

/// Stable lower-case name. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(inbox_status s) noexcept {
  switch (s) {
    case inbox_status::processed: return "processed";
    case inbox_status::duplicate: return "duplicate";
    case inbox_status::failed: return "failed";
  }
  return "unknown";
}

/// The outcome of `inbox::handle`: a status, and for `failed` the error code
/// (`handler_error` for a throwing or failing handler, or a store code) and
/// its text. A plain value.
struct inbox_outcome {
  inbox_status status = inbox_status::failed;
  errc error = errc::ok;
  std::string message;

  [[nodiscard]] bool processed() const noexcept { return status == inbox_status::processed; }
  [[nodiscard]] bool duplicate() const noexcept { return status == inbox_status::duplicate; }
  [[nodiscard]] bool failed() const noexcept { return status == inbox_status::failed; }
};

/// Settings of an inbox. A plain value.
struct inbox_options {
  /// Ids recorded longer ago than this are forgotten by `prune`: a duplicate
  /// arriving later than this runs again.
  duration window = std::chrono::hours(24 * 7);
  /// At most this many ids are kept per consumer (the newest).
  std::size_t max_ids = 1'000'000;
  /// `handle(envelope, fn)` prunes when this much clock time has passed
  /// since the last prune (zero or negative: only explicit `prune()` calls).
  /// Pruning by count walks the consumer's ids in SQLite, so it is paced by
  /// time rather than run per message.
  duration prune_interval = std::chrono::minutes(1);
  /// Scope: when set, a message of any other tenant is `failed` with
  /// `errc::permission_denied` before anything is recorded or run.
  std::optional<std::string> tenant{};
};

/// Counters of an inbox since it was built. A plain value.
struct inbox_stats {
  std::uint64_t processed = 0;   ///< handlers that succeeded
  std::uint64_t duplicates = 0;  ///< messages skipped as already processed
  std::uint64_t failed = 0;      ///< handler or store failures (the message will be retried)
  std::uint64_t pruned = 0;      ///< ids forgotten by the dedup window
};

/// Idempotent consumer: runs a handler only for a message id that is new for
/// this consumer name, and records the id in the same transaction as the
/// handler's own writes, never before the handler succeeds. If the handler
/// fails (throws, returns an error or false) its writes and the id record
/// are rolled back together, so the redelivered message runs again. With
/// the SQLite store a record is durable exactly when the handler's rows are;
/// with the memory store it is atomic with completion, and two threads
/// handling one id at the same time produce one effect (the second waits,
/// then sees a duplicate). Ids are kept per tenant: the same message id in
/// two tenants is two entries (and each tenant has its own `max_ids`); an
/// inbox may be scoped to one tenant (`inbox_options::tenant`).
/// Thread-safe; allocates; blocks on the store.
///
/// **Example**:
///   postbox::inbox in(db, "billing");
///   auto outcome = in.handle(env, [&](auto& tx) { return tx.exec("UPDATE ...", env.payload.cents); });
///   if (outcome.failed()) { /* retry later: nothing was kept */ }
template <inbox_store Store>
class inbox {
 public:
  using transaction = typename Store::transaction;

  /// An inbox for `consumer` (a stable name: ids are recorded per name and
  /// tenant) on `store` (not owned; must outlive it); times on `clk`. Throws
  /// `invalid_argument` for an empty name or one holding the byte 0x1f
  /// (the separator of the tenant in the store key).
  inbox(Store& store, std::string consumer, inbox_options options = {}, const clock& clk = default_clock())
      : store_(&store), consumer_(std::move(consumer)), options_(std::move(options)), clock_(&clk),
        next_prune_(clk.now() + options_.prune_interval) {
    if (consumer_.empty()) POSTBOX_THROW(error(errc::invalid_argument, "inbox: the consumer name is empty"));
    if (consumer_.find(detail::inbox_tenant_separator) != std::string::npos)
      POSTBOX_THROW(error(errc::invalid_argument, "inbox: the consumer name holds the byte 0x1f"));
    if (options_.tenant) scopes_.insert(detail::inbox_scope(consumer_, *options_.tenant));
  }
  inbox(const inbox&) = delete;
  inbox& operator=(const inbox&) = delete;

  /// Handles `env` inside the caller's transaction `tx`: inside a savepoint,
  /// records the id, then calls `fn(tx, env)` (or `fn(tx)`), which writes its
  /// own rows through `tx`. `processed`: both are in `tx` and become durable
  /// when the caller commits. `duplicate`: nothing ran. `failed`: everything
  /// since the savepoint is undone and `tx` stays usable (a store failure
  /// dooms it). Blocks on the store; with the memory store, waits while
  /// another transaction handles the same id.
  template <class T, class Fn>
  inbox_outcome handle(transaction& tx, const envelope<T>& env, Fn&& fn) {
    inbox_outcome o = handle_in(tx, env, fn);
    count(o);
    return o;
  }

  /// Handles `env` in a transaction of its own, committed when the handler
  /// succeeds (a failed commit is `failed`: nothing kept, retry later).
  /// Prunes when `prune_interval` has passed. Blocks on the store.
  template <class T, class Fn>
  inbox_outcome handle(const envelope<T>& env, Fn&& fn) {
    auto tx = store_->try_begin();
    if (!tx) {
      inbox_outcome o{inbox_status::failed, tx.status(), "inbox: cannot begin a transaction: " +
                                                             std::string(to_string(tx.status()))};
      count(o);
      return o;
    }
    inbox_outcome o = handle_in(*tx, env, fn);
    if (o.processed()) {
      const errc c = tx->commit();
      if (c != errc::ok) o = inbox_outcome{inbox_status::failed, c, tx->last_error()};
    } else {
      tx->rollback();
    }
    count(o);
    if (o.processed() && options_.prune_interval > duration::zero()) {
      const time_point now = clock_->now();
      bool due = false;
      {
        std::lock_guard lock(mutex_);
        due = now >= next_prune_;
        if (due) next_prune_ = now + options_.prune_interval;
      }
      if (due) (void)prune();
    }
    return o;
  }

  /// Forgets ids outside the window (older than `window`, beyond `max_ids`
  /// per tenant) for the untenanted messages and every tenant this inbox
  /// has handled since it was built (a tenant seen only before a restart:
  /// `prune(tenant)`). Returns how many were forgotten, or the first store
  /// error. Must not be called while this thread has a transaction open on
  /// a SQLite store.
  result<std::size_t> prune() {
    detail::dependent_t<std::vector<std::string>, Store> scopes;  // dependent_t: detail/dependent.hpp
    {
      std::lock_guard lock(mutex_);
      scopes.assign(scopes_.begin(), scopes_.end());
    }
    if (!options_.tenant) scopes.push_back(consumer_);
    std::size_t total = 0;
    for (const auto& scope : scopes) {
      auto n = prune_scope(scope);
      if (!n) return n;
      total += *n;
    }
    return total;
  }

  /// As `prune()` for the ids of `tenant`'s messages only ("" = untenanted).
  result<std::size_t> prune(std::string_view tenant) { return prune_scope(detail::inbox_scope(consumer_, tenant)); }

  /// Whether `id` is recorded (committed) for this consumer's untenanted
  /// messages (the inbox's tenant when it is scoped to one).
  [[nodiscard]] result<bool> contains(message_id id) const {
    return contains(options_.tenant ? std::string_view(*options_.tenant) : std::string_view{}, id);
  }
  /// Whether `id` is recorded (committed) for this consumer and `tenant`.
  [[nodiscard]] result<bool> contains(std::string_view tenant, message_id id) const {
    return store_->inbox_contains(detail::inbox_scope(consumer_, tenant), id);
  }

  /// Ids recorded for the untenanted messages and every tenant handled
  /// since construction, summed. Blocks on the store.
  [[nodiscard]] result<std::size_t> size() const {
    detail::dependent_t<std::vector<std::string>, Store> scopes;  // dependent_t: detail/dependent.hpp
    {
      std::lock_guard lock(mutex_);
      scopes.assign(scopes_.begin(), scopes_.end());
    }
    if (!options_.tenant) scopes.push_back(consumer_);
    std::size_t total = 0;
    for (const auto& scope : scopes) {
      auto n = store_->inbox_size(scope);
      if (!n) return n;
      total += *n;
    }
    return total;
  }

  /// Counters since construction. Thread-safe.
  [[nodiscard]] inbox_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  /// The consumer name.
  [[nodiscard]] const std::string& consumer() const noexcept { return consumer_; }
  /// The store.
  [[nodiscard]] Store& store() const noexcept { return *store_; }

 private:
  result<std::size_t> prune_scope(const std::string& scope) {
    auto n = store_->inbox_prune(scope, clock_->now() - options_.window, options_.max_ids);
    if (n) {
      std::lock_guard lock(mutex_);
      stats_.pruned += *n;
    }
    return n;
  }

  template <class T, class Fn>
  inbox_outcome handle_in(transaction& tx, const envelope<T>& env, Fn& fn) {
    if (!tx.active()) return {inbox_status::failed, errc::invalid_argument, "inbox: the transaction is not active"};
    if (env.id.is_nil()) return {inbox_status::failed, errc::invalid_argument, "inbox: message with a nil id"};
    if (options_.tenant && env.tenant != *options_.tenant)
      return {inbox_status::failed, errc::permission_denied,
              "inbox: the inbox of tenant '" + *options_.tenant + "' refuses a message of tenant '" + env.tenant + "'"};
    std::string scope = detail::inbox_scope(consumer_, env.tenant);
    if (const errc sp = tx.savepoint(); sp != errc::ok)
      return {inbox_status::failed, sp, "inbox: cannot open a savepoint: " + std::string(tx.last_error())};
    const errc r = store_->inbox_record(tx, scope, env.id, clock_->now());
    if (r == errc::conflict) {
      (void)tx.rollback_to_savepoint();
      return {inbox_status::duplicate, errc::ok, {}};
    }
    if (r != errc::ok) {
      (void)tx.rollback_to_savepoint();
      return {inbox_status::failed, r, std::string(tx.last_error())};
    }
    detail::handler_result h = detail::run_with(fn, tx, env);
    if (h.code == errc::ok && tx.failure() != errc::ok) {
      h.code = tx.failure();
      h.message = std::string(tx.last_error());
    }
    if (h.code != errc::ok) {
      (void)tx.rollback_to_savepoint();
      return {inbox_status::failed, h.code, std::move(h.message)};
    }
    if (const errc rel = tx.release_savepoint(); rel != errc::ok) {
      tx.fail(rel, "inbox: cannot release the savepoint");
      return {inbox_status::failed, rel, std::string(tx.last_error())};
    }
    if (!env.tenant.empty()) {
      std::lock_guard lock(mutex_);
      scopes_.insert(std::move(scope));
    }
    return {inbox_status::processed, errc::ok, {}};
  }

  void count(const inbox_outcome& o) {
    std::lock_guard lock(mutex_);
    switch (o.status) {
      case inbox_status::processed: ++stats_.processed; break;
      case inbox_status::duplicate: ++stats_.duplicates; break;
      case inbox_status::failed: ++stats_.failed; break;
    }
  }

  Store* store_;
  std::string consumer_;
  inbox_options options_;
  const clock* clock_;
  mutable std::mutex mutex_;
  inbox_stats stats_;
  time_point next_prune_;  // under mutex_
  detail::dependent_t<std::set<std::string>, Store> scopes_;  // store keys of the tenants handled (and the scoped tenant); under mutex_
};

/// Registers an inbox's counters and its recorded-id count. `in` must
/// outlive the handle. Allocates.
template <class Store>
[[nodiscard]] metrics_registry::registration register_inbox(metrics_registry& registry, std::string name,
                                                            const inbox<Store>& in) {
  return registry.add("inbox", std::move(name), [&in](metric_writer& w) {
    const inbox_stats s = in.stats();
    w.counter("postbox_inbox_processed_total", "Handlers that succeeded.", static_cast<double>(s.processed));
    w.counter("postbox_inbox_duplicates_total", "Messages skipped as already processed.",
              static_cast<double>(s.duplicates));
    w.counter("postbox_inbox_failed_total", "Handler or store failures (retried later).", static_cast<double>(s.failed));
    w.counter("postbox_inbox_pruned_total", "Ids forgotten by the dedup window.", static_cast<double>(s.pruned));
    if (auto n = in.size())
      w.gauge("postbox_inbox_ids", "Message ids recorded for this consumer (all tenants).", static_cast<double>(*n));
  });
}

// ---------------------------------------------------------------------------
// Version-ordered apply
// ---------------------------------------------------------------------------

/// What `ordered_apply::apply` did with a message.
enum class apply_status {
  applied,      ///< it was the next version: applied (and any buffered successors after it)
  stale,        ///< its version is at or below the applied one: skipped
  missing,      ///< a gap before it: buffered; retry it later (it may be applied meanwhile)
  buffer_full,  ///< a gap before it and the reorder buffer is full: not buffered; retry it later
  failed,       ///< the handler or the store failed: nothing of it kept; retry it later
};

/// Stable lower-case name. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(apply_status s) noexcept {
  switch (s) {
    case apply_status::applied: return "applied";
    case apply_status::stale: return "stale";
    case apply_status::missing: return "missing";
    case apply_status::buffer_full: return "buffer_full";
    case apply_status::failed: return "failed";
  }
  return "unknown";
}

/// The outcome of `ordered_apply::apply`. A plain value.
struct apply_outcome {
  apply_status status = apply_status::failed;
  std::uint64_t current = 0;            ///< the applied version of the key after this call (in the transaction)
  std::size_t applied = 0;              ///< messages applied by this call (it, plus drained successors)
  std::vector<std::uint64_t> missing;   ///< for missing / buffer_full: versions not yet seen before it (at most `max_missing_listed`)
  errc error = errc::ok;                ///< for failed
  std::string message;                  ///< for failed
};

/// Settings of an ordered_apply. A plain value.
struct ordered_apply_options {
  /// Messages held in the reorder buffer over all keys.
  std::size_t max_buffered = 1024;
  /// Longest `missing` list reported.
  std::size_t max_missing_listed = 64;
};

/// Applies messages to a projection in aggregate-version order per key. The
/// store keeps the last applied version of each (scope, key) in the same
/// transaction as the projection's writes; versions start at 1. A version at
/// or below it is `stale` (skipped, so redelivery is harmless); the next one
/// is applied; a later one is a gap: it is kept in a bounded in-memory
/// reorder buffer and reported `missing` with the versions not yet seen, and
/// when the next version arrives the buffered successors are applied right
/// after it, in order, in the same transaction. The buffer is only a
/// shortcut: the caller still treats `missing` as "retry later", so nothing
/// depends on it surviving a crash or a rollback (a retried message that was
/// applied from the buffer meanwhile is `stale`). Thread-safe; allocates
/// (the buffer holds copies); blocks on the store.
template <version_store Store, class T>
class ordered_apply {
 public:
  using transaction = typename Store::transaction;

  /// An applier for versions stored under `scope` (e.g. the projection's
  /// name) in `store` (not owned; must outlive it).
  ordered_apply(Store& store, std::string scope, ordered_apply_options options = {})
      : store_(&store), scope_(std::move(scope)), options_(options) {}
  ordered_apply(const ordered_apply&) = delete;
  ordered_apply& operator=(const ordered_apply&) = delete;

  /// Applies `env` as `version` of aggregate `key` inside `tx`, calling
  /// `fn(tx, envelope)` for it and for each buffered successor it unblocks
  /// (each inside its own savepoint: a failing successor is dropped from the
  /// buffer and undone, the rest stays applied). Blocks on the store.
  template <class Fn>
  apply_outcome apply(transaction& tx, std::string_view key, std::uint64_t version, const envelope<T>& env, Fn&& fn) {
    apply_outcome out;
    if (!tx.active()) return fail(out, errc::invalid_argument, "ordered_apply: the transaction is not active");
    if (version == 0) return fail(out, errc::invalid_argument, "ordered_apply: versions start at 1");
    auto cur = store_->version_load(tx, scope_, key);
    if (!cur) return fail(out, cur.status(), std::string(tx.last_error()));
    out.current = *cur;
    if (version <= *cur) {
      out.status = apply_status::stale;
      forget_upto(key, *cur);
      return out;
    }
    if (version > *cur + 1) return hold(out, key, version, env);
    detail::handler_result h = apply_one(tx, key, version, env, fn);
    if (h.code != errc::ok) return fail(out, h.code, std::move(h.message));
    out.status = apply_status::applied;
    out.current = version;
    out.applied = 1;
    // Drain buffered successors in order.
    for (;;) {
      std::optional<envelope<T>> next = take(key, out.current + 1);
      if (!next) break;
      if (apply_one(tx, key, out.current + 1, *next, fn).code != errc::ok) break;
      ++out.current;
      ++out.applied;
    }
    return out;
  }

  /// As above in a transaction of its own, committed when something was
  /// applied (a failed commit is `failed`: nothing kept).
  template <class Fn>
  apply_outcome apply(std::string_view key, std::uint64_t version, const envelope<T>& env, Fn&& fn) {
    auto tx = store_->try_begin();
    if (!tx) {
      apply_outcome out;
      return fail(out, tx.status(), "ordered_apply: cannot begin a transaction");
    }
    apply_outcome out = apply(*tx, key, version, env, fn);
    if (out.status == apply_status::applied) {
      const errc c = tx->commit();
      if (c != errc::ok) {
        apply_outcome bad;
        return fail(bad, c, tx->last_error());
      }
    } else {
      tx->rollback();
    }
    return out;
  }

  /// Messages in the reorder buffer. Thread-safe.
  [[nodiscard]] std::size_t buffered() const {
    std::lock_guard lock(mutex_);
    return buffered_;
  }

  /// Drops every buffered message (they are redelivered anyway).
  void clear() {
    std::lock_guard lock(mutex_);
    buffer_.clear();
    buffered_ = 0;
  }

 private:
  template <class Fn>
  detail::handler_result apply_one(transaction& tx, std::string_view key, std::uint64_t version,
                                   const envelope<T>& env, Fn& fn) {
    if (const errc sp = tx.savepoint(); sp != errc::ok) return {sp, std::string(tx.last_error())};
    detail::handler_result h = detail::run_with(fn, tx, env);
    if (h.code == errc::ok) {
      const errc s = store_->version_save(tx, scope_, key, version);
      if (s != errc::ok) h = {s, std::string(tx.last_error())};
    }
    if (h.code == errc::ok && tx.failure() != errc::ok) h = {tx.failure(), std::string(tx.last_error())};
    if (h.code != errc::ok) {
      (void)tx.rollback_to_savepoint();
      return h;
    }
    if (const errc rel = tx.release_savepoint(); rel != errc::ok) {
      tx.fail(rel, "ordered_apply: cannot release the savepoint");
      return {rel, std::string(tx.last_error())};
    }
    return h;
  }

  apply_outcome& fail(apply_outcome& out, errc code, std::string text) {
    out.status = apply_status::failed;
    out.error = code;
    out.message = std::move(text);
    return out;
  }

  apply_outcome hold(apply_outcome& out, std::string_view key, std::uint64_t version, const envelope<T>& env) {
    std::lock_guard lock(mutex_);
    auto& versions = buffer_[std::string(key)];
    const bool known = versions.count(version) != 0;
    if (!known && buffered_ >= options_.max_buffered) {
      out.status = apply_status::buffer_full;
    } else {
      out.status = apply_status::missing;
      if (!known) {
        versions.emplace(version, env);
        ++buffered_;
      }
    }
    for (std::uint64_t v = out.current + 1; v < version && out.missing.size() < options_.max_missing_listed; ++v) {
      if (versions.count(v) == 0) out.missing.push_back(v);
    }
    if (versions.empty()) buffer_.erase(std::string(key));
    return out;
  }

  std::optional<envelope<T>> take(std::string_view key, std::uint64_t version) {
    std::lock_guard lock(mutex_);
    auto k = buffer_.find(std::string(key));
    if (k == buffer_.end()) return std::nullopt;
    auto it = k->second.find(version);
    if (it == k->second.end()) return std::nullopt;
    std::optional<envelope<T>> out(std::move(it->second));
    k->second.erase(it);
    --buffered_;
    if (k->second.empty()) buffer_.erase(k);
    return out;
  }

  void forget_upto(std::string_view key, std::uint64_t version) {
    std::lock_guard lock(mutex_);
    auto k = buffer_.find(std::string(key));
    if (k == buffer_.end()) return;
    auto& versions = k->second;
    while (!versions.empty() && versions.begin()->first <= version) {
      versions.erase(versions.begin());
      --buffered_;
    }
    if (versions.empty()) buffer_.erase(k);
  }

  Store* store_;
  std::string scope_;
  ordered_apply_options options_;
  mutable std::mutex mutex_;
  std::map<std::string, std::map<std::uint64_t, envelope<T>>, std::less<>> buffer_;
  std::size_t buffered_ = 0;
};

POSTBOX_END_NAMESPACE
