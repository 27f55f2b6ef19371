// SPDX-License-Identifier: MIT
// The message store concepts behind outbox, inbox and version-ordered apply, a commit signal, and postbox::memory_store.
// Design notes (transactions, leases, per-key order, dedup window, failure model): docs/design/outbox.md
#pragma once

#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/dependent.hpp>

#include <atomic>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// An outgoing message as the outbox keeps it: the envelope's identity and
/// routing fields (kept apart for inspection and ordering), the encoded
/// envelope, and the publish state. A plain value; allocates for its strings.
struct stored_message {
  std::uint64_t sequence = 0;  ///< staging order, assigned by the store; increases with commit order
  message_id id;               ///< the envelope's id (unique in the outbox)
  std::string type;            ///< the envelope's type
  std::string partition_key;   ///< ordering key: one key is published in staging order
  message_id correlation_id;   ///< copied from the envelope, for inspection
  message_id causation_id;     ///< copied from the envelope, for inspection
  time_point staged_at{};      ///< when it was staged (outbox clock)
  std::string body;            ///< the encoded envelope (the codec's text)
  std::uint32_t attempts = 0;  ///< failed publish attempts so far
  /// Not published before this time (outbox clock); the default (epoch)
  /// means at once. A row not yet due is skipped by claims and does NOT hold
  /// its key: later rows of the key are published before it (delayed
  /// messages are independent, as in MassTransit and NServiceBus).
  time_point due{};
};

/// A batch taken by `outbox_claim`: messages in staging order (so each key's
/// messages in order), all leased to the claiming owner; and when nothing
/// more was claimable, the earliest time something blocked becomes free
/// (a retry time or a foreign lease's expiry), if any. A plain value.
struct outbox_batch {
  std::vector<stored_message> messages;
  std::optional<time_point> next_due;
};

/// Row counts of an outbox. A plain value.
struct outbox_counts {
  std::uint64_t pending = 0;                 ///< staged, not yet dispatched
  std::uint64_t leased = 0;                  ///< pending rows under a lease (being published)
  std::uint64_t retrying = 0;                ///< pending rows whose publication failed at least once (stuck rows)
  std::uint64_t dispatched = 0;              ///< dispatched rows kept until the retention cutoff
  std::uint64_t dead_lettered = 0;           ///< rows in the outbox dead letters
  std::optional<time_point> oldest_pending;  ///< staged_at of the oldest pending row
};

/// A row the relay gave up on, moved from the outbox to its dead letters
/// (same store): the message as staged, and why. Its id stays reserved (a
/// stage of the same id is a `conflict`) until it is redriven or removed.
/// A plain value; allocates for its strings.
struct outbox_dead_letter_entry {
  stored_message message;          ///< the row; `sequence` is its last outbox sequence, `attempts` counts every failure
  std::string reason;              ///< e.g. "retries_exhausted", or the errc name of a permanent failure ("bad_type")
  std::string error;               ///< text of the last failure
  time_point first_failure{};      ///< first failed publish of this row (outbox clock)
  time_point last_failure{};       ///< the failure that dead-lettered it
};

/// Selects outbox dead letters: every set field must match (AND); at most
/// `max` rows, oldest (lowest sequence) first. A plain value.
struct outbox_dead_letter_filter {
  std::optional<std::string> key{};     ///< exact partition key
  std::optional<std::string> reason{};  ///< exact reason
  std::optional<std::string> type{};    ///< exact message type
  std::optional<message_id> id{};       ///< one message
  std::size_t max = 100;                ///< bound on rows read, redriven or removed by one call

  /// Whether `d` matches (ignores `max`). Never allocates.
  [[nodiscard]] bool matches(const outbox_dead_letter_entry& d) const noexcept {
    return (!key || *key == d.message.partition_key) && (!reason || *reason == d.reason) &&
           (!type || *type == d.message.type) && (!id || *id == d.message.id);
  }
};

/// Counters every store keeps. A plain value.
struct store_stats {
  std::uint64_t commits = 0;    ///< transactions committed
  std::uint64_t rollbacks = 0;  ///< transactions rolled back (explicitly, on destruction or after a failure)
  std::uint64_t failures = 0;   ///< operations that returned an error
};

/// Wakes relays in this process when a transaction that staged outbox rows
/// commits, so a relay needs no polling delay for local commits. `notify`
/// makes no syscall and takes no lock when nobody waits. Thread-safe; never
/// allocates.
class commit_signal {
 public:
  commit_signal() = default;
  commit_signal(const commit_signal&) = delete;
  commit_signal& operator=(const commit_signal&) = delete;

  /// Counts a commit and wakes the waiters, if any. Never blocks when
  /// nobody waits (one atomic increment and one load); else takes the
  /// signal's mutex briefly.
  void notify() noexcept {
    // seq_cst: with the seq_cst increment of waiters_ in wait() this is a
    // Dekker pair: either this load sees the waiter, or the waiter's load of
    // sequence_ sees this increment.
    sequence_.fetch_add(1);
    if (waiters_.load() == 0) return;
    wake();
  }

  /// Commits counted so far.
  [[nodiscard]] std::uint64_t sequence() const noexcept {
    // seq_cst: see notify().
    return sequence_.load();
  }

  /// Blocks on `clk` until `sequence() != seen`, `stop()` holds, `deadline`
  /// passes, or `wake()` is called. `stop` is evaluated under the signal's
  /// mutex, so a flag set before `wake()` is never missed. Thread-safe.
  template <class Stop>
  void wait(const clock& clk, std::uint64_t seen, time_point deadline, Stop&& stop) {
    std::unique_lock lock(mutex_);
    // seq_cst: pairs with the load of waiters_ in notify() (see there).
    waiters_.fetch_add(1);
    while (sequence_.load() == seen && !stop() && clk.now() < deadline) clk.wait_until(lock, cv_, deadline);
    waiters_.fetch_sub(1);
  }

  /// Wakes every waiter (e.g. to let it see a stop flag). Takes the mutex.
  void wake() noexcept {
    // Taking the mutex orders this notify after a waiter's check: a waiter
    // holds it from its check until the condition variable releases it.
    { std::lock_guard lock(mutex_); }
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  /// Commits counted. Written by notify() (seq_cst RMW), read by wait() and
  /// sequence() (seq_cst); only increases.
  std::atomic<std::uint64_t> sequence_{0};
  /// Threads inside wait(). Incremented/decremented under mutex_ (seq_cst),
  /// read by notify() without the mutex (seq_cst; the Dekker partner of the
  /// increment of sequence_).
  std::atomic<std::uint32_t> waiters_{0};
};

/// A store with RAII transactions: `begin()` (throws `postbox::error` with
/// `busy` or `store_error` when no transaction can start) or `try_begin()`;
/// `tx.commit()` returns `ok` or the error (and then the transaction is rolled
/// back); destroying an active transaction rolls it back. `tx.fail(code,
/// text)` dooms a transaction: commit then rolls back and returns `code`.
/// Savepoints nest inside a transaction (used by inbox and ordered apply to
/// undo one handler's writes only).
template <class S>
concept transactional_store = requires(S& s) {
  typename S::transaction;
  { s.begin() } -> std::same_as<typename S::transaction>;
  { s.try_begin() } -> std::same_as<result<typename S::transaction>>;
  { s.stats() } -> std::same_as<store_stats>;
} && requires(typename S::transaction& tx, errc code, std::string_view text) {
  { tx.commit() } -> std::same_as<errc>;
  tx.rollback();
  { tx.active() } -> std::same_as<bool>;
  { tx.failure() } -> std::same_as<errc>;
  { tx.last_error() } -> std::convertible_to<std::string_view>;
  tx.fail(code, text);
  { tx.savepoint() } -> std::same_as<errc>;
  { tx.release_savepoint() } -> std::same_as<errc>;
  { tx.rollback_to_savepoint() } -> std::same_as<errc>;
};

/// The outbox part of a store. `outbox_stage` adds a row inside the caller's
/// transaction (`conflict` if the id is already in the outbox; any failure
/// dooms the transaction). The rest runs in short transactions of their own
/// and is used by relays: `outbox_claim(owner, now, lease_until, max)` leases
/// up to `max` pending rows in staging order, skipping every key that has a
/// row leased by another owner (lease not expired) or waiting for a retry, so
/// one key is never published by two relays or out of order; rows whose
/// `due` is after `now` are skipped without blocking their key, and the
/// earliest such `due` counts for `next_due`;
/// `outbox_renew(owner, seqs, now, lease_until)` extends the owner's lease on
/// the rows of `seqs` it still leases (expired or not: a row nobody took
/// since is still its own) to `lease_until` and returns how many it renewed,
/// so fewer than `seqs.size()` means another owner re-leased (and may have
/// dispatched) the rest; `invalid_argument` when `lease_until` is not after
/// `now`;
/// `outbox_mark_dispatched` marks rows the owner still leases;
/// `outbox_release` drops the owner's leases on some rows and
/// `outbox_release_owner` on all of them; `outbox_retry_later(owner, seq,
/// now, retry_at, text)` drops the lease of one row, counts a failed attempt
/// (remembering the first failure time) and blocks its key until `retry_at`;
/// `outbox_dead_letter(owner, seq, now, reason, text)` moves a leased row to
/// the outbox dead letters, so the rest of its key is claimable at once;
/// `outbox_dead_letters(filter)` lists them, `outbox_redrive(filter, now)`
/// stages them again as pending at the end of their key's order (same id,
/// attempts reset, `staged_at` = now; the commit signal is notified) and
/// `outbox_dead_letter_remove(filter)` deletes them; `outbox_purge` deletes up
/// to `max` rows dispatched before a cutoff. `commits()` is notified after
/// each commit that staged rows.
template <class S>
concept outbox_store =
    transactional_store<S> &&
    requires(S& s, typename S::transaction& tx, const stored_message& m, std::string_view text, time_point t,
             std::size_t n, std::span<const std::uint64_t> seqs, const outbox_dead_letter_filter& f) {
      { s.outbox_stage(tx, m) } -> std::same_as<errc>;
      { s.outbox_claim(text, t, t, n) } -> std::same_as<result<outbox_batch>>;
      { s.outbox_renew(text, seqs, t, t) } -> std::same_as<result<std::size_t>>;
      { s.outbox_mark_dispatched(text, seqs, t) } -> std::same_as<result<std::size_t>>;
      { s.outbox_release(text, seqs) } -> std::same_as<errc>;
      { s.outbox_release_owner(text) } -> std::same_as<result<std::size_t>>;
      { s.outbox_retry_later(text, std::uint64_t{}, t, t, text) } -> std::same_as<errc>;
      { s.outbox_dead_letter(text, std::uint64_t{}, t, text, text) } -> std::same_as<errc>;
      { s.outbox_dead_letters(f) } -> std::same_as<result<std::vector<outbox_dead_letter_entry>>>;
      { s.outbox_redrive(f, t) } -> std::same_as<result<std::size_t>>;
      { s.outbox_dead_letter_remove(f) } -> std::same_as<result<std::size_t>>;
      { s.outbox_purge(t, n) } -> std::same_as<result<std::size_t>>;
      { s.outbox_summary() } -> std::same_as<result<outbox_counts>>;
      { s.commits() } -> std::same_as<commit_signal&>;
    };

/// The inbox part of a store: processed message ids per consumer name.
/// `inbox_record(tx, consumer, id, now)` records the id in the transaction
/// and returns `conflict` when it is already recorded (a duplicate); the
/// record becomes visible to others only when the transaction commits, and a
/// concurrent transaction recording the same id waits for this one to end.
/// `inbox_prune` forgets ids recorded before a cutoff and all but the newest
/// `keep`; `inbox_contains` and `inbox_size` inspect.
template <class S>
concept inbox_store =
    transactional_store<S> && requires(S& s, typename S::transaction& tx, std::string_view name, message_id id,
                                       time_point t, std::size_t n) {
      { s.inbox_record(tx, name, id, t) } -> std::same_as<errc>;
      { s.inbox_contains(name, id) } -> std::same_as<result<bool>>;
      { s.inbox_prune(name, t, n) } -> std::same_as<result<std::size_t>>;
      { s.inbox_size(name) } -> std::same_as<result<std::size_t>>;
    };

/// The version part of a store: the last applied version per (scope, key),
/// read and written inside a transaction (0 when none was saved).
template <class S>
concept version_store = transactional_store<S> && requires(S& s, typename S::transaction& tx, std::string_view name,
                                                          std::uint64_t v) {
  { s.version_load(tx, name, name) } -> std::same_as<result<std::uint64_t>>;
  { s.version_save(tx, name, name, v) } -> std::same_as<errc>;
};

/// Everything outbox, inbox and ordered apply need: `memory_store` and
/// `sqlite_store` (<postbox/sqlite.hpp>) both model it, and
/// tests/store_test.cpp is the conformance suite a new store must pass.
template <class S>
concept message_store = outbox_store<S> && inbox_store<S> && version_store<S>;

/// A message store in process memory: for tests and for processes that need
/// no durability. Transactions buffer their writes and apply them atomically
/// at commit under the store's mutex; they do not block each other, except
/// that recording an inbox id another open transaction has recorded waits
/// until that transaction ends (so two threads handling one message never
/// both take effect), and a version saved by a transaction that was changed
/// by another commit since this transaction read it makes the commit fail
/// with `conflict`. Every member is thread-safe and allocates; none blocks
/// on I/O. A transaction object itself is not thread-safe.
///
/// Use it as `memory_store`. It is a class template only so that its member
/// bodies (and the containers they instantiate) are compiled in the
/// translation units that use a memory store, not in every one that includes
/// this header (issue 17); `Dummy` has no meaning.
template <class Dummy = void>
class basic_memory_store {
  struct staged_op {
    stored_message message;
  };
  struct inbox_op {
    std::string consumer;
    message_id id;
    time_point at;
  };
  struct version_op {
    std::string scope;
    std::string key;
    std::uint64_t version;
  };
  using op = std::variant<staged_op, inbox_op, version_op>;

 public:
  /// `result<V>`, spelled through `Dummy` so that the bodies below compile only
  /// where a memory store is used (issue 17; detail/dependent.hpp).
  template <class V>
  using result_t = result<detail::dependent_t<V, Dummy>>;

  /// A unit of work on a memory_store. Move-only; rolls back on destruction
  /// if still active. Not thread-safe (one thread at a time).
  class transaction {
   public:
    transaction(transaction&& o) noexcept
        : store_(std::exchange(o.store_, nullptr)), id_(o.id_), ops_(std::move(o.ops_)),
          savepoints_(std::move(o.savepoints_)), read_versions_(std::move(o.read_versions_)), failure_(o.failure_),
          error_(std::move(o.error_)) {}
    transaction& operator=(transaction&& o) noexcept {
      if (this != &o) {
        rollback();
        store_ = std::exchange(o.store_, nullptr);
        id_ = o.id_;
        ops_ = std::move(o.ops_);
        savepoints_ = std::move(o.savepoints_);
        read_versions_ = std::move(o.read_versions_);
        failure_ = o.failure_;
        error_ = std::move(o.error_);
      }
      return *this;
    }
    transaction(const transaction&) = delete;
    transaction& operator=(const transaction&) = delete;
    /// Rolls back if still active.
    ~transaction() { rollback(); }

    /// Applies every buffered write atomically and ends the transaction.
    /// Returns `ok`; or, with nothing applied, the doom code (`fail`), an
    /// injected failure, or `conflict` (an id staged by another commit
    /// meanwhile, or a version changed since this transaction read it).
    /// `invalid_argument` when not active. Takes the store's mutex.
    [[nodiscard]] errc commit() {
      if (store_ == nullptr) return errc::invalid_argument;
      return store_->commit(*this);
    }
    /// Discards every buffered write and ends the transaction (idempotent).
    void rollback() noexcept {
      if (store_ != nullptr) store_->end(*this, false);
    }
    /// True until commit or rollback.
    [[nodiscard]] bool active() const noexcept { return store_ != nullptr; }
    /// `ok`, or the code that dooms this transaction.
    [[nodiscard]] errc failure() const noexcept { return failure_; }
    /// Text of the last failure in this transaction (empty when none).
    [[nodiscard]] const std::string& last_error() const noexcept { return error_; }
    /// Dooms the transaction: commit() will roll back and return `code`
    /// (`store_error` for `ok`). The first doom wins (code and text).
    void fail(errc code, std::string_view text) {
      if (failure_ != errc::ok) return;
      failure_ = code == errc::ok ? errc::store_error : code;
      error_.assign(text);
    }
    /// Opens a savepoint (they nest). Never blocks.
    [[nodiscard]] errc savepoint() {
      if (store_ == nullptr) return errc::invalid_argument;
      savepoints_.push_back(ops_.size());
      return errc::ok;
    }
    /// Closes the innermost savepoint, keeping its writes.
    [[nodiscard]] errc release_savepoint() {
      if (store_ == nullptr || savepoints_.empty()) return errc::invalid_argument;
      savepoints_.pop_back();
      return errc::ok;
    }
    /// Undoes the writes since the innermost savepoint and closes it.
    [[nodiscard]] errc rollback_to_savepoint() {
      if (store_ == nullptr || savepoints_.empty()) return errc::invalid_argument;
      const std::size_t mark = savepoints_.back();
      savepoints_.pop_back();
      store_->truncate(*this, mark);
      return errc::ok;
    }

   private:
    friend class basic_memory_store;
    transaction(basic_memory_store* s, std::uint64_t id) noexcept : store_(s), id_(id) {}

    basic_memory_store* store_;
    std::uint64_t id_;
    std::vector<op> ops_;
    detail::dependent_t<std::vector<std::size_t>, Dummy> savepoints_;
    // (scope '\0' key) -> committed version when this transaction first read
    // or wrote it; checked at commit (optimistic concurrency).
    detail::dependent_t<std::map<std::string, std::uint64_t>, Dummy> read_versions_;
    errc failure_ = errc::ok;
    std::string error_;
  };

  basic_memory_store() = default;
  basic_memory_store(const basic_memory_store&) = delete;
  basic_memory_store& operator=(const basic_memory_store&) = delete;
  /// Precondition: no transaction of this store is still active.
  ~basic_memory_store() = default;

  /// Starts a transaction. Never fails, never blocks.
  [[nodiscard]] transaction begin() {
    std::lock_guard lock(mutex_);
    return transaction(this, ++last_tx_);
  }
  /// As `begin()`, for the store concept (always has a value).
  [[nodiscard]] result<transaction> try_begin() { return begin(); }

  /// Counters. Thread-safe.
  [[nodiscard]] store_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  /// Test hook: the commit after the next `after` commits fails with `code`
  /// (and "memory_store: injected failure") and applies nothing.
  void inject_commit_failure(errc code = errc::store_error, std::size_t after = 0) {
    std::lock_guard lock(mutex_);
    inject_code_ = code;
    inject_after_ = after;
  }

  // ---- outbox ----

  /// Buffers `m` in `tx` (the sequence is assigned at commit). `conflict` if
  /// the id is already in the outbox or in `tx`; `invalid_argument` for a nil
  /// id; a failure dooms the transaction.
  [[nodiscard]] errc outbox_stage(transaction& tx, const stored_message& m) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    if (m.id.is_nil()) return doom(tx, errc::invalid_argument, "memory_store: outbox message with a nil id");
    {
      std::lock_guard lock(mutex_);
      if (outbox_ids_.count(m.id) != 0) return doom_locked(tx, errc::conflict, "memory_store: message id already in the outbox");
    }
    for (const auto& o : tx.ops_) {
      if (const auto* s = std::get_if<staged_op>(&o); s != nullptr && s->message.id == m.id)
        return doom(tx, errc::conflict, "memory_store: message id staged twice in one transaction");
    }
    tx.ops_.emplace_back(staged_op{m});
    return errc::ok;
  }

  /// Leases up to `max` claimable rows to `owner` until `lease_until`
  /// (see `outbox_store`). Never fails.
  [[nodiscard]] result_t<outbox_batch> outbox_claim(std::string_view owner, time_point now, time_point lease_until,
                                                  std::size_t max) {
    std::lock_guard lock(mutex_);
    detail::dependent_t<outbox_batch, Dummy> out;
    detail::dependent_t<std::set<std::string_view>, Dummy> blocked;
    std::optional<time_point> due;
    auto earliest = [&due](time_point t) { due = due ? std::min(*due, t) : t; };
    for (const std::uint64_t seq : encumbered_) {
      const row& r = pending_.at(seq);
      bool block = false;
      if (!r.lease_owner.empty() && r.lease_owner != owner && r.lease_until > now) {
        block = true;
        earliest(r.lease_until);
      }
      if (r.next_attempt_at > now) {
        block = true;
        earliest(r.next_attempt_at);
      }
      if (block) blocked.insert(r.message.partition_key);
    }
    // Every row of this claim shares one owner string (no allocation per
    // row); leased rows go into encumbered_ in ascending order, each after
    // the last one inserted (a hint, not a search from the root).
    const auto name = lease_name_locked(owner);
    auto hint = encumbered_.begin();
    for (auto& [seq, r] : pending_) {
      if (out.messages.size() >= max) break;
      if (r.message.due > now) {  // scheduled for later: skipped, its key not held
        earliest(r.message.due);
        continue;
      }
      if (blocked.count(r.message.partition_key) != 0) continue;
      r.lease_owner.name = name;
      r.lease_until = lease_until;
      while (hint != encumbered_.end() && *hint < seq) ++hint;
      if (hint == encumbered_.end() || *hint != seq) hint = encumbered_.emplace_hint(hint, seq);
      out.messages.push_back(r.message);
    }
    if (out.messages.size() < max) out.next_due = due;
    return out;
  }

  /// Extends `owner`'s lease on the rows of `seqs` it still leases to
  /// `lease_until`; returns how many (see `outbox_store`). `invalid_argument`
  /// when `lease_until` is not after `now`. Blocks on the store's mutex only;
  /// never allocates. Thread-safe.
  [[nodiscard]] result_t<std::size_t> outbox_renew(std::string_view owner, std::span<const std::uint64_t> seqs,
                                                 time_point now, time_point lease_until) {
    if (lease_until <= now) return errc::invalid_argument;
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (const std::uint64_t seq : seqs) {
      auto it = pending_.find(seq);
      if (it == pending_.end() || it->second.lease_owner.empty() || it->second.lease_owner != owner) continue;
      it->second.lease_until = lease_until;
      ++n;
    }
    return n;
  }

  /// Marks the rows of `seqs` that `owner` still leases as dispatched at
  /// `now`; returns how many. Never fails.
  [[nodiscard]] result_t<std::size_t> outbox_mark_dispatched(std::string_view owner, std::span<const std::uint64_t> seqs,
                                                           time_point now) {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    // A relay marks in staging order: the next row to mark is usually the
    // one after the last marked, and each dispatched entry goes at the end.
    auto next = pending_.end();
    auto next_encumbered = encumbered_.end();
    for (const std::uint64_t seq : seqs) {
      auto it = next != pending_.end() && next->first == seq ? next : pending_.find(seq);
      if (it == pending_.end() || it->second.lease_owner != owner) continue;
      dispatched_.emplace_hint(dispatched_.end(), std::make_pair(now, seq), it->second.message.id);
      auto e = next_encumbered != encumbered_.end() && *next_encumbered == seq ? next_encumbered : encumbered_.find(seq);
      if (e != encumbered_.end()) next_encumbered = encumbered_.erase(e);
      next = pending_.erase(it);
      ++n;
    }
    return n;
  }

  /// Drops `owner`'s leases on `seqs`. Never fails.
  [[nodiscard]] errc outbox_release(std::string_view owner, std::span<const std::uint64_t> seqs) {
    std::lock_guard lock(mutex_);
    for (const std::uint64_t seq : seqs) {
      auto it = pending_.find(seq);
      if (it == pending_.end() || it->second.lease_owner != owner) continue;
      clear_lease(seq, it->second);
    }
    return errc::ok;
  }

  /// Drops every lease `owner` holds; returns how many. Never fails.
  [[nodiscard]] result_t<std::size_t> outbox_release_owner(std::string_view owner) {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (auto it = encumbered_.begin(); it != encumbered_.end();) {
      const std::uint64_t seq = *it++;  // clear_lease may erase seq from encumbered_
      row& r = pending_.at(seq);
      if (r.lease_owner.empty() || r.lease_owner != owner) continue;
      clear_lease(seq, r);
      ++n;
    }
    return n;
  }

  /// Drops `owner`'s lease on `seq`, counts a failed attempt (the first one
  /// at `now`), and holds the row's key back until `retry_at`. `not_found`
  /// when `owner` does not lease it.
  [[nodiscard]] errc outbox_retry_later(std::string_view owner, std::uint64_t seq, time_point now, time_point retry_at,
                                        std::string_view error_text) {
    std::lock_guard lock(mutex_);
    auto it = pending_.find(seq);
    if (it == pending_.end() || it->second.lease_owner != owner) return errc::not_found;
    row& r = it->second;
    if (r.message.attempts == 0) r.first_failure = now;
    ++r.message.attempts;
    r.next_attempt_at = retry_at;
    r.last_error.assign(error_text);
    r.lease_owner.clear();
    r.lease_until = time_point{};
    encumbered_.insert(seq);
    return errc::ok;
  }

  /// Moves the row `seq` that `owner` leases to the outbox dead letters,
  /// counting this failure (at `now`) as an attempt; the rest of its key is
  /// claimable at once. `not_found` when `owner` does not lease it.
  [[nodiscard]] errc outbox_dead_letter(std::string_view owner, std::uint64_t seq, time_point now,
                                        std::string_view reason, std::string_view error_text) {
    std::lock_guard lock(mutex_);
    auto it = pending_.find(seq);
    if (it == pending_.end() || it->second.lease_owner != owner) return errc::not_found;
    row& r = it->second;
    outbox_dead_letter_entry d;
    d.first_failure = r.message.attempts == 0 ? now : r.first_failure;
    d.message = std::move(r.message);
    ++d.message.attempts;
    d.reason.assign(reason);
    d.error.assign(error_text);
    d.last_failure = now;
    dead_.emplace(seq, std::move(d));  // the id stays in outbox_ids_: reserved while dead-lettered
    encumbered_.erase(seq);
    pending_.erase(it);
    return errc::ok;
  }

  /// Copies of the dead letters matching `filter`, oldest first, at most
  /// `filter.max`. Never fails.
  [[nodiscard]] result_t<std::vector<outbox_dead_letter_entry>> outbox_dead_letters(
      const outbox_dead_letter_filter& filter) const {
    std::lock_guard lock(mutex_);
    detail::dependent_t<std::vector<outbox_dead_letter_entry>, Dummy> out;
    for (const auto& [seq, d] : dead_) {
      if (out.size() >= filter.max) break;
      if (filter.matches(d)) out.push_back(d);
    }
    return out;
  }

  /// Stages the dead letters matching `filter` (oldest first, at most
  /// `filter.max`) again as pending rows with new sequences, so each goes to
  /// the end of its key's order; same id, attempts 0, `staged_at` = `now`.
  /// Notifies the commit signal when any moved. Returns how many. Never fails.
  [[nodiscard]] result_t<std::size_t> outbox_redrive(const outbox_dead_letter_filter& filter, time_point now) {
    std::size_t n = 0;
    {
      std::lock_guard lock(mutex_);
      for (auto it = dead_.begin(); it != dead_.end() && n < filter.max;) {
        if (!filter.matches(it->second)) {
          ++it;
          continue;
        }
        stored_message m = std::move(it->second.message);
        it = dead_.erase(it);
        m.sequence = ++last_seq_;
        m.attempts = 0;
        m.staged_at = now;
        m.due = time_point{};  // a redriven row is due at once
        const std::uint64_t seq = m.sequence;
        pending_.emplace(seq, row{std::move(m), {}, {}, {}, {}, {}});
        ++n;
      }
    }
    if (n != 0) commits_.notify();
    return n;
  }

  /// Deletes the dead letters matching `filter` (oldest first, at most
  /// `filter.max`); their ids may be staged again. Returns how many. Never fails.
  [[nodiscard]] result_t<std::size_t> outbox_dead_letter_remove(const outbox_dead_letter_filter& filter) {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (auto it = dead_.begin(); it != dead_.end() && n < filter.max;) {
      if (!filter.matches(it->second)) {
        ++it;
        continue;
      }
      outbox_ids_.erase(it->second.message.id);
      it = dead_.erase(it);
      ++n;
    }
    return n;
  }

  /// Deletes up to `max` rows dispatched before `cutoff`; returns how many.
  [[nodiscard]] result_t<std::size_t> outbox_purge(time_point cutoff, std::size_t max) {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    while (n < max && !dispatched_.empty() && dispatched_.begin()->first.first < cutoff) {
      outbox_ids_.erase(dispatched_.begin()->second);
      dispatched_.erase(dispatched_.begin());
      ++n;
    }
    return n;
  }

  /// Current row counts.
  [[nodiscard]] result_t<outbox_counts> outbox_summary() const {
    std::lock_guard lock(mutex_);
    postbox::outbox_counts c;
    c.pending = pending_.size();
    c.dispatched = dispatched_.size();
    c.dead_lettered = dead_.size();
    for (const std::uint64_t seq : encumbered_) {
      const row& r = pending_.at(seq);
      if (!r.lease_owner.empty()) ++c.leased;
      if (r.message.attempts != 0) ++c.retrying;
    }
    if (!pending_.empty()) c.oldest_pending = pending_.begin()->second.message.staged_at;
    return c;
  }

  /// Every pending row in staging order (for inspection and tests).
  [[nodiscard]] result_t<std::vector<stored_message>> outbox_pending() const {
    std::lock_guard lock(mutex_);
    detail::dependent_t<std::vector<stored_message>, Dummy> out;
    out.reserve(pending_.size());
    for (const auto& [seq, r] : pending_) out.push_back(r.message);
    return out;
  }

  /// Notified after every commit that staged outbox rows.
  [[nodiscard]] commit_signal& commits() noexcept { return commits_; }

  // ---- inbox ----

  /// Records `id` for `consumer` in `tx`; `conflict` when already recorded
  /// (or recorded earlier in `tx`). Waits while another active transaction
  /// holds a record of the same id, then decides. A failure other than
  /// `conflict` dooms the transaction.
  [[nodiscard]] errc inbox_record(transaction& tx, std::string_view consumer, message_id id, time_point now) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    std::unique_lock lock(mutex_);
    auto& c = inbox_[std::string(consumer)];
    for (;;) {
      if (c.ids.count(id) != 0) return errc::conflict;
      auto it = c.in_flight.find(id);
      if (it == c.in_flight.end()) break;
      if (it->second == tx.id_) return errc::conflict;
      cv_.wait(lock);
    }
    c.in_flight.emplace(id, tx.id_);
    tx.ops_.emplace_back(inbox_op{std::string(consumer), id, now});
    return errc::ok;
  }

  /// Whether `id` is recorded (committed) for `consumer`.
  [[nodiscard]] result_t<bool> inbox_contains(std::string_view consumer, message_id id) const {
    std::lock_guard lock(mutex_);
    auto it = inbox_.find(std::string(consumer));
    return it != inbox_.end() && it->second.ids.count(id) != 0;
  }

  /// Forgets ids of `consumer` recorded before `cutoff`, then all but the
  /// newest `keep`; returns how many were forgotten. Ids leave in the order
  /// they were recorded.
  [[nodiscard]] result_t<std::size_t> inbox_prune(std::string_view consumer, time_point cutoff, std::size_t keep) {
    std::lock_guard lock(mutex_);
    auto it = inbox_.find(std::string(consumer));
    if (it == inbox_.end()) return std::size_t{0};
    auto& c = it->second;
    std::size_t n = 0;
    while (!c.order.empty() && (c.order.front().second < cutoff || c.order.size() > keep)) {
      c.ids.erase(c.order.front().first);
      c.order.pop_front();
      ++n;
    }
    return n;
  }

  /// Ids recorded for `consumer`.
  [[nodiscard]] result_t<std::size_t> inbox_size(std::string_view consumer) const {
    std::lock_guard lock(mutex_);
    auto it = inbox_.find(std::string(consumer));
    return it == inbox_.end() ? std::size_t{0} : it->second.ids.size();
  }

  // ---- versions ----

  /// The version of (scope, key) as `tx` sees it (its own writes first), 0
  /// when none.
  [[nodiscard]] result_t<std::uint64_t> version_load(transaction& tx, std::string_view scope, std::string_view key) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    for (auto it = tx.ops_.rbegin(); it != tx.ops_.rend(); ++it) {
      if (const auto* v = std::get_if<version_op>(&*it); v != nullptr && v->scope == scope && v->key == key)
        return v->version;
    }
    std::lock_guard lock(mutex_);
    const std::uint64_t committed = committed_version(scope, key);
    tx.read_versions_.emplace(version_key(scope, key), committed);
    return committed;
  }

  /// Buffers version `v` of (scope, key) in `tx`.
  [[nodiscard]] errc version_save(transaction& tx, std::string_view scope, std::string_view key, std::uint64_t v) {
    if (!tx.active() || tx.store_ != this) return errc::invalid_argument;  // inactive, or another store's
    {
      std::lock_guard lock(mutex_);
      tx.read_versions_.emplace(version_key(scope, key), committed_version(scope, key));
    }
    tx.ops_.emplace_back(version_op{std::string(scope), std::string(key), v});
    return errc::ok;
  }

 private:
  // A row's lease owner, shared by the rows one claim leases (one string
  // per claim, not per row). Null or empty: not leased.
  struct lease_owner_name {
    std::shared_ptr<const std::string> name;
    [[nodiscard]] bool empty() const noexcept { return name == nullptr || name->empty(); }
    void clear() noexcept { name.reset(); }
    [[nodiscard]] bool operator==(std::string_view owner) const noexcept {
      return name == nullptr ? owner.empty() : std::string_view(*name) == owner;
    }
  };
  struct row {
    stored_message message;
    lease_owner_name lease_owner;
    time_point lease_until{};
    time_point next_attempt_at{};
    std::string last_error;
    time_point first_failure{};  // set with the first failed attempt
  };
  struct consumer_ids {
    detail::dependent_t<std::unordered_set<message_id>, Dummy> ids;
    detail::dependent_t<std::deque<std::pair<message_id, time_point>>, Dummy> order;  // recording order
    detail::dependent_t<std::unordered_map<message_id, std::uint64_t>, Dummy> in_flight;  // id -> transaction
  };

  static std::string version_key(std::string_view scope, std::string_view key) {
    std::string k(scope);
    k.push_back('\0');
    k.append(key);
    return k;
  }
  std::uint64_t committed_version(std::string_view scope, std::string_view key) const {
    auto it = versions_.find(version_key(scope, key));
    return it == versions_.end() ? 0 : it->second;
  }

  // The shared name string of `owner` (the last claim's when equal).
  std::shared_ptr<const std::string> lease_name_locked(std::string_view owner) {
    if (last_owner_ == nullptr || std::string_view(*last_owner_) != owner)
      last_owner_ = std::make_shared<const std::string>(owner);
    return last_owner_;
  }

  void clear_lease(std::uint64_t seq, row& r) {
    r.lease_owner.clear();
    r.lease_until = time_point{};
    if (r.next_attempt_at == time_point{}) encumbered_.erase(seq);
  }

  errc doom(transaction& tx, errc code, std::string_view text) {
    std::lock_guard lock(mutex_);
    return doom_locked(tx, code, text);
  }
  errc doom_locked(transaction& tx, errc code, std::string_view text) {
    ++stats_.failures;
    tx.fail(code, text);
    return code;
  }

  // Releases the inbox records of ops_[mark..] and drops them. Takes the mutex.
  void truncate(transaction& tx, std::size_t mark) {
    std::lock_guard lock(mutex_);
    release_claims(tx, mark);
    tx.ops_.erase(tx.ops_.begin() + static_cast<std::ptrdiff_t>(mark), tx.ops_.end());
    cv_.notify_all();
  }
  void release_claims(transaction& tx, std::size_t from) {
    for (std::size_t i = from; i < tx.ops_.size(); ++i) {
      if (const auto* r = std::get_if<inbox_op>(&tx.ops_[i])) {
        // find, not []: this runs in noexcept paths and the consumer exists.
        if (auto c = inbox_.find(r->consumer); c != inbox_.end()) c->second.in_flight.erase(r->id);
      }
    }
  }

  void end(transaction& tx, bool committed) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (!committed) {
        release_claims(tx, 0);
        ++stats_.rollbacks;
      }
      cv_.notify_all();
    }
    tx.store_ = nullptr;
    tx.ops_.clear();
    tx.savepoints_.clear();
    tx.read_versions_.clear();
  }

  errc commit(transaction& tx) {
    bool staged = false;
    {
      std::lock_guard lock(mutex_);
      errc bad = tx.failure_;
      std::string why = tx.error_;
      if (bad == errc::ok && inject_code_ != errc::ok) {
        if (inject_after_ == 0) {
          bad = std::exchange(inject_code_, errc::ok);
          why = "memory_store: injected failure (" + std::string(to_string(bad)) + ")";
        } else {
          --inject_after_;
        }
      }
      if (bad == errc::ok) {
        for (const auto& [k, seen] : tx.read_versions_) {
          auto it = versions_.find(k);
          if ((it == versions_.end() ? 0 : it->second) != seen) {
            bad = errc::conflict;
            why = "memory_store: a version this transaction read was changed by another commit";
            break;
          }
        }
      }
      if (bad == errc::ok) {
        for (const auto& o : tx.ops_) {
          if (const auto* s = std::get_if<staged_op>(&o); s != nullptr && outbox_ids_.count(s->message.id) != 0) {
            bad = errc::conflict;
            why = "memory_store: message id already in the outbox";
            break;
          }
        }
      }
      if (bad != errc::ok) {
        ++stats_.failures;
        tx.failure_ = bad;
        tx.error_ = why;
      } else {
        for (auto& o : tx.ops_) {
          if (auto* s = std::get_if<staged_op>(&o)) {
            const std::uint64_t seq = ++last_seq_;
            s->message.sequence = seq;
            outbox_ids_.insert(s->message.id);
            pending_.emplace(seq, row{std::move(s->message), {}, {}, {}, {}, {}});
            staged = true;
          } else if (auto* r = std::get_if<inbox_op>(&o)) {
            auto& c = inbox_[r->consumer];
            c.in_flight.erase(r->id);
            if (c.ids.insert(r->id).second) c.order.emplace_back(r->id, r->at);
          } else if (auto* v = std::get_if<version_op>(&o)) {
            versions_[version_key(v->scope, v->key)] = v->version;
          }
        }
        ++stats_.commits;
        tx.ops_.clear();
      }
    }
    const errc result_code = tx.failure_;
    end(tx, result_code == errc::ok);
    if (staged) commits_.notify();
    return result_code;
  }

  mutable std::mutex mutex_;
  std::condition_variable cv_;  // an inbox record was released or committed
  std::uint64_t last_tx_ = 0;
  std::uint64_t last_seq_ = 0;
  std::map<std::uint64_t, row> pending_;
  detail::dependent_t<std::set<std::uint64_t>, Dummy> encumbered_;  // pending rows with a lease or a retry time
  std::shared_ptr<const std::string> last_owner_;  // the last claim's owner name, shared by the rows it leased
  detail::dependent_t<std::map<std::pair<time_point, std::uint64_t>, message_id>, Dummy> dispatched_;
  detail::dependent_t<std::map<std::uint64_t, outbox_dead_letter_entry>, Dummy> dead_;  // by last outbox sequence
  detail::dependent_t<std::unordered_set<message_id>, Dummy> outbox_ids_;  // pending, dispatched (until purged) and dead-lettered ids
  std::unordered_map<std::string, consumer_ids> inbox_;
  detail::dependent_t<std::map<std::string, std::uint64_t>, Dummy> versions_;
  store_stats stats_;
  errc inject_code_ = errc::ok;
  std::size_t inject_after_ = 0;
  commit_signal commits_;
};

/// The in-memory message store (see `basic_memory_store`).
using memory_store = basic_memory_store<void>;

/// Registers a store's counters (commits, rollbacks, failures). `store`
/// must outlive the handle. Allocates.
template <transactional_store Store>
[[nodiscard]] metrics_registry::registration register_store(metrics_registry& registry, std::string name,
                                                            Store& store) {
  return registry.add("store", std::move(name), [&store](metric_writer& w) {
    const store_stats s = store.stats();
    w.counter("postbox_store_commits_total", "Transactions committed.", static_cast<double>(s.commits));
    w.counter("postbox_store_rollbacks_total", "Transactions rolled back.", static_cast<double>(s.rollbacks));
    w.counter("postbox_store_failures_total", "Store operations that failed.", static_cast<double>(s.failures));
  });
}

POSTBOX_END_NAMESPACE
