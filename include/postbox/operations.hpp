// SPDX-License-Identifier: MIT
// postbox::operations: an in-process "202 Accepted + status resource" tracker for long-running work.
#pragma once

#include <postbox/async/core.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/operations/executor.hpp>
#include <postbox/operations/poll_limit.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/dependent.hpp>
#include <postbox/detail/random.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

// Design notes: docs/design/request_reply.md ("operations") and, for the
// security properties (error split, polling rate limit, tenants, ids),
// docs/design/operations.md.

POSTBOX_BEGIN_NAMESPACE

/// Lifecycle: pending -> running -> succeeded | failed | canceled (canceled
/// also straight from pending). The first terminal transition wins.
enum class operation_state { pending, running, succeeded, failed, canceled };

/// Name of a state. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(operation_state s) noexcept {
  switch (s) {
    case operation_state::pending: return "pending";
    case operation_state::running: return "running";
    case operation_state::succeeded: return "succeeded";
    case operation_state::failed: return "failed";
    case operation_state::canceled: return "canceled";
  }
  return "unknown";
}

/// True for succeeded, failed and canceled. Never allocates.
[[nodiscard]] constexpr bool is_terminal(operation_state s) noexcept {
  return s == operation_state::succeeded || s == operation_state::failed || s == operation_state::canceled;
}

/// A failed operation's structured error, as the polling client sees it.
/// `message` is the work's own text only when it threw `public_error`;
/// otherwise it is "the operation failed; reference <incident>" and the
/// detail went to `operations_options::on_incident` only. `incident` is an
/// unguessable 32-hex-digit handle naming the failure in both places (empty
/// for cancellations, which are not incidents).
struct operation_error {
  errc code = errc::handler_error;
  std::string message;
  std::string incident{};
};

/// Thrown by an operation's work to fail it with a message meant for the
/// client: the only exception whose text reaches `get`/`watch`/`wait`.
/// Everything else a work throws is internal (see `operation_error`).
/// Say nothing in it you would not show the client.
class public_error : public error {
 public:
  /// A public failure with `code` (handler_error unless given).
  explicit public_error(const std::string& message, errc code = errc::handler_error) : error(code, message) {}
  public_error(errc code, const std::string& message) : error(code, message) {}
};

/// The full detail of one failed operation, for operators only: passed to
/// `operations_options::on_incident`, never to `get`/`watch`/`wait`. The
/// views are valid only during the call; copy what you keep.
struct operation_incident {
  std::string_view incident;      ///< as in the snapshot's `error->incident`
  std::string_view operation_id;  ///< the failed operation
  std::string_view tenant;        ///< its tenant (empty: the default tenant)
  std::string_view owner;         ///< its owner
  errc code = errc::handler_error;  ///< as in the snapshot
  std::string_view detail;        ///< the exception's full what() ("unknown exception" for a non-std one)
  bool is_public = false;         ///< thrown as public_error (its text is also in the snapshot)
  time_point at{};                ///< on the tracker's clock
};

/// Who reads or writes an operation: an `owner` inside a `tenant`. Every call
/// matches both, so another owner's or another tenant's operation answers
/// `not_found`, exactly as a missing one, and listing never crosses either.
/// Implicit from one string, the owner in the default (empty) tenant, so
/// `ops.get("alice", id)` keeps its meaning; `{"acme", "alice"}` names a tenant.
struct operation_caller {
  std::string tenant;
  std::string owner;

  operation_caller() = default;
  operation_caller(const char* owner_name) : owner(owner_name) {}  // NOLINT(google-explicit-constructor)
  operation_caller(std::string owner_name) : owner(std::move(owner_name)) {}  // NOLINT(google-explicit-constructor)
  operation_caller(std::string_view owner_name) : owner(owner_name) {}  // NOLINT(google-explicit-constructor)
  operation_caller(std::string tenant_name, std::string owner_name)
      : tenant(std::move(tenant_name)), owner(std::move(owner_name)) {}

  friend bool operator==(const operation_caller&, const operation_caller&) = default;
};

/// A copy of one operation's record at one moment. `version` grows by one per
/// change, so watchers can order snapshots.
template <class Result>
struct operation_snapshot {
  std::string id;
  operation_state state = operation_state::pending;
  int progress = 0;  ///< percent, 0..100
  std::string message;
  std::optional<Result> result;
  std::optional<operation_error> error;
  time_point created_at{}, updated_at{};
  duration retry_after{};  ///< suggested poll interval; zero once terminal
  std::uint64_t version = 0;
};

/// How `submit` matched the idempotency key.
enum class submit_disposition { created, existing, conflict };

/// `submit`'s answer: the operation id and how the key matched (on conflict,
/// the id of the operation that holds the key).
struct submission {
  std::string id;
  submit_disposition disposition = submit_disposition::created;
};

/// Given to the work: the cancellation token and a progress reporter.
class operation_context {
 public:
  operation_context(std::stop_token token, std::function<void(int, std::string)> report)
      : token_(std::move(token)), report_(std::move(report)) {}
  /// Stop requested by `cancel` (or shutdown). Never blocks. Thread-safe.
  [[nodiscard]] const std::stop_token& stop_token() const noexcept { return token_; }
  /// Records progress (clamped to 0..100) and notifies watchers. Allocates.
  void report_progress(int percent, std::string message = {}) { report_(percent, std::move(message)); }

 private:
  std::stop_token token_;
  std::function<void(int, std::string)> report_;
};

/// Options for `operations`.
struct operations_options {
  std::size_t workers = 2;          ///< executor threads
  std::size_t queue_capacity = 256; ///< queued (not started) operations before `submit` refuses with `busy`
  duration retention = std::chrono::hours(1);  ///< a terminal record lives this long after its last change
  duration poll_interval = std::chrono::seconds(1);  ///< retry_after suggested while not terminal
  /// Polls (`get`, `watch`, `list`) per second allowed to each owner of each
  /// tenant, refilled on the tracker's clock; beyond it they answer
  /// `rate_limited` with `retry_after()`. 0 (the default) disables the limit:
  /// set it when these calls serve untrusted clients.
  double poll_rate = 0;
  std::size_t poll_burst = 10;  ///< polls an owner may make at once (bucket size); 0 counts as 1
  /// Told every failure of a work, with its full text (unscrubbed: see
  /// redaction.hpp before logging it somewhere less trusted) and incident id,
  /// on the worker thread that ran the work, outside the tracker's lock. Must
  /// be thread-safe; an exception from it is caught and counted. May be empty.
  std::function<void(const operation_incident&)> on_incident{};
};

/// Tracks long-running work: idempotent submit, owner- and tenant-scoped
/// reads, cooperative cancel, push watch, clock-driven expiry (lazily on
/// access and by `sweep()`), an optional per-owner polling rate limit, and
/// failures whose internal detail goes to `on_incident`, never to the
/// client. Work runs on a bounded executor. All members thread-safe.
template <class Result>
class operations {
 public:
  using work = std::function<Result(operation_context&)>;
  using watcher = std::function<void(const operation_snapshot<Result>&)>;

  /// Shared by a tracker and its watch handles: `owner` is cleared (under
  /// `mutex`) by the tracker's destructor, so a handle outliving the tracker
  /// does nothing. Lock order: `mutex`, then the tracker's lock.
  struct watch_link {
    std::mutex mutex;
    operations* owner = nullptr;
  };

  /// RAII watch: destroying it stops notifications. Move-only. May outlive
  /// the tracker (then it does nothing): the tracker's destructor detaches
  /// every handle after its last notification.
  class watch_handle {
   public:
    watch_handle() = default;
    watch_handle(std::shared_ptr<watch_link> link, std::string id, std::uint64_t token)
        : link_(std::move(link)), id_(std::move(id)), token_(token) {}
    watch_handle(watch_handle&& o) noexcept : link_(std::move(o.link_)), id_(std::move(o.id_)), token_(o.token_) {}
    watch_handle& operator=(watch_handle&& o) noexcept {
      if (this != &o) {
        reset();
        link_ = std::move(o.link_);
        id_ = std::move(o.id_);
        token_ = o.token_;
      }
      return *this;
    }
    ~watch_handle() { reset(); }
    /// Stops notifications now (a notification already running on another
    /// thread may finish). Blocks on the tracker's lock. Thread-safe.
    void reset() {
      if (!link_) return;
      {
        std::lock_guard lock(link_->mutex);
        if (link_->owner) link_->owner->unwatch(id_, token_);
      }
      link_.reset();
    }

   private:
    std::shared_ptr<watch_link> link_;
    std::string id_;
    std::uint64_t token_ = 0;
  };

  /// Starts the executor's workers. Allocates. `clk` must outlive this.
  explicit operations(const clock& clk = default_clock(), operations_options opts = {})
      : clock_(&clk), opts_(opts), executor_(std::make_unique<detail::op_executor>(opts.workers, opts.queue_capacity)) {}
  operations(const operations&) = delete;
  operations& operator=(const operations&) = delete;
  /// Requests stop on running work, cancels queued work, joins the workers
  /// (so every record is terminal and no watcher runs afterwards), then wakes
  /// every thread blocked in `wait` and blocks until each has returned.
  /// Must not run concurrently with any other member call except `wait`.
  ~operations() {
    {
      std::lock_guard lock(mutex_);
      for (auto& [id, r] : records_) r.stop.request_stop();
    }
    executor_->shutdown();
    std::unique_lock lock(mutex_);
    closing_ = true;
    changed_.notify_all();
    changed_.wait(lock, [&] { return waiting_ == 0; });
    lock.unlock();
    std::lock_guard detach(link_->mutex);  // after the last notification: handles go inert
    link_->owner = nullptr;
  }

  /// Submits `fn` for `caller` (an owner, optionally in a tenant). Same
  /// (tenant, owner, key) and fingerprint returns the existing id; other
  /// fingerprint is `conflict`. An empty key disables deduplication. Status
  /// `busy` when the executor queue is full (nothing recorded). Not rate
  /// limited. Allocates. Never blocks on the work.
  [[nodiscard]] result<submission> submit(const operation_caller& caller, const std::string& idempotency_key,
                                          const std::string& fingerprint, work fn) {
    // Built before the lock and, when refused, destroyed after it (declared
    // before the lock): destroying `fn` runs user code, which must not run
    // under the tracker's lock.
    std::string id = new_id();
    detail::op_executor::task t([this, id, fn = std::move(fn)](bool run) mutable { execute(id, fn, run); });
    std::lock_guard lock(mutex_);
    expire_locked();
    if (!idempotency_key.empty()) {
      auto k = keys_.find(key_of(caller, idempotency_key));
      if (k != keys_.end()) {
        const auto& r = records_.at(k->second);
        return submission{k->second, r.fingerprint == fingerprint ? submit_disposition::existing
                                                                  : submit_disposition::conflict};
      }
    }
    // The post happens under the same lock that publishes the record and its
    // key: another submit with this key sees either no key (and races for
    // it here) or the key of a record whose work is queued. Before, the key
    // was published first and withdrawn after a refused post, so a second
    // submit could answer `existing` for work that was then dropped. The
    // worker that picks the task up takes this lock in execute(), so it finds
    // the record.
    if (!executor_->try_post(t)) return errc::busy;
    record r;
    r.tenant = caller.tenant;
    r.owner = caller.owner;
    r.key = idempotency_key;
    r.fingerprint = fingerprint;
    r.snap.id = id;
    r.snap.created_at = r.snap.updated_at = clock_->now();
    r.snap.retry_after = suggested_poll();
    records_.emplace(id, std::move(r));
    if (!idempotency_key.empty()) keys_.emplace(key_of(caller, idempotency_key), id);
    return submission{std::move(id), submit_disposition::created};
  }

  /// The record of `id` if it belongs to `caller` (owner and tenant) and has
  /// not expired; otherwise `not_found` (another owner's or tenant's
  /// operation looks absent). With `poll_rate` set, a poll beyond the
  /// owner's budget answers `rate_limited` and `retry_after()` before any
  /// lookup (unknown ids cost a poll too). Allocates (a copy). Thread-safe.
  [[nodiscard]] poll_result<operation_snapshot<Result>> get(const operation_caller& caller, const std::string& id) {
    std::lock_guard lock(mutex_);
    if (const duration delay = charge_locked(caller); delay > duration::zero()) return {errc::rate_limited, delay};
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || !owned_by(it->second, caller)) return errc::not_found;
    return it->second.snap;
  }

  /// Snapshots of every live operation of `caller` (its owner in its tenant
  /// only; never another tenant's), oldest first. Rate limited as `get`.
  /// Scans every record. Allocates (copies). Thread-safe.
  [[nodiscard]] poll_result<std::vector<operation_snapshot<Result>>> list(const operation_caller& caller) {
    std::vector<operation_snapshot<Result>> out;
    std::lock_guard lock(mutex_);
    if (const duration delay = charge_locked(caller); delay > duration::zero()) return {errc::rate_limited, delay};
    expire_locked();
    for (const auto& [id, r] : records_) {
      if (owned_by(r, caller)) out.push_back(r.snap);
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
      return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id;
    });
    return out;
  }

  /// Blocks until `caller`'s operation `id` is terminal and returns that
  /// snapshot. `canceled` when `stop` is stopped first (nothing changes: the
  /// operation goes on and can be waited for again); `not_found` as get (also
  /// when the record is swept meanwhile); `stopped` when the tracker is
  /// destroyed first (its destructor wakes every waiter and waits for it to
  /// leave). Allocates (a copy). Thread-safe.
  [[nodiscard]] result<operation_snapshot<Result>> wait(const operation_caller& caller, const std::string& id,
                                                        std::stop_token stop = {}) {
    std::unique_lock lock(mutex_);
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || !owned_by(it->second, caller)) return errc::not_found;
    if (closing_) return errc::stopped;
    ++waiting_;
    // Re-found after each wake: the record may be swept while we sleep.
    const bool woken = changed_.wait(lock, stop, [&] {
      it = records_.find(id);
      return closing_ || it == records_.end() || is_terminal(it->second.snap.state);
    });
    result<operation_snapshot<Result>> out = errc::canceled;
    if (woken) {
      if (it == records_.end()) out = errc::not_found;
      else if (is_terminal(it->second.snap.state)) out = it->second.snap;
      else out = errc::stopped;
    }
    if (--waiting_ == 0 && closing_) changed_.notify_all();  // the destructor waits for this
    return out;
  }

  /// Cancels cooperatively: a pending operation becomes canceled at once; a
  /// running one becomes canceled and its stop_token is signalled (a result
  /// it returns later is discarded). Returns the final state: `canceled`
  /// if cancel won, or the terminal state that came first; `not_found` as get.
  [[nodiscard]] result<operation_state> cancel(const operation_caller& caller, const std::string& id) {
    std::vector<watcher> ws;
    operation_snapshot<Result> snap;
    {
      std::lock_guard lock(mutex_);
      expire_locked();
      auto it = records_.find(id);
      if (it == records_.end() || !owned_by(it->second, caller)) return errc::not_found;
      record& r = it->second;
      if (is_terminal(r.snap.state)) return r.snap.state;
      r.stop.request_stop();
      r.snap.state = operation_state::canceled;
      r.snap.error = operation_error{errc::canceled, "canceled by caller"};
      touch_locked(r);
      snap = r.snap;
      ws = watchers_of(r);
    }
    notify(ws, snap);
    return operation_state::canceled;
  }

  /// Calls `fn` with a snapshot after every change of `caller`'s operation
  /// `id` (on the thread making the change, outside the lock; order by
  /// `version`). `not_found` and `rate_limited` as get. Allocates. Thread-safe.
  [[nodiscard]] poll_result<watch_handle> watch(const operation_caller& caller, const std::string& id, watcher fn) {
    std::lock_guard lock(mutex_);
    if (const duration delay = charge_locked(caller); delay > duration::zero()) return {errc::rate_limited, delay};
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || !owned_by(it->second, caller)) return errc::not_found;
    const auto token = ++next_watch_;
    it->second.watchers.emplace(token, std::make_shared<watcher>(std::move(fn)));
    return watch_handle(link_, id, token);
  }

  /// `co_await ops.async_watch(caller, id, after_version)`: the first
  /// snapshot of `caller`'s operation `id` whose `version` is above
  /// `after_version` (pass the version you have seen to await the next
  /// change; a terminal snapshot always completes it). `canceled` when `stop`
  /// is stopped first (nothing changes), `not_found` as get (also when the
  /// record is swept meanwhile). Suspends (no thread blocks) and resumes on the awaiting task's
  /// scheduler. Allocates a copy, and a registration when it suspends.
  /// The tracker must outlive the wait (destroy a suspended frame first).
  [[nodiscard]] auto async_watch(const operation_caller& caller, const std::string& id, std::uint64_t after_version,
                                 std::stop_token stop = {}) {
    return detail::op_awaiter<watch_op>(watch_op{this, caller, id, after_version, false}, {std::move(stop), {}});
  }
  /// `co_await ops.async_wait(caller, id)`: the awaitable form of `wait`: the
  /// terminal snapshot, or `canceled` or `not_found` as async_watch.
  [[nodiscard]] auto async_wait(const operation_caller& caller, const std::string& id, std::stop_token stop = {}) {
    return detail::op_awaiter<watch_op>(watch_op{this, caller, id, 0, true}, {std::move(stop), {}});
  }

  /// Removes terminal records older than the retention period (their
  /// idempotency keys with them) and the polling buckets that are full
  /// again; returns how many records. Thread-safe.
  std::size_t sweep() {
    std::lock_guard lock(mutex_);
    if (limiter_.enabled()) limiter_.scan(clock_->now());
    return expire_locked();
  }

  /// Failures of work so far (each one an incident) whose code is `code`:
  /// `handler_error` for std::exception and unknown ones, the thrown code
  /// for postbox::error and public_error. Thread-safe.
  [[nodiscard]] std::uint64_t failures(errc code) const {
    std::lock_guard lock(mutex_);
    return failures_[static_cast<std::size_t>(code)];
  }

  /// Polls (`get`, `watch`, `list`) refused with `rate_limited` so far. Thread-safe.
  [[nodiscard]] std::uint64_t polls_refused() const {
    std::lock_guard lock(mutex_);
    return polls_refused_;
  }

  /// Polling buckets held: owners that polled within one refill period
  /// (plus full ones not yet dropped). Zero when the limit is off. Thread-safe.
  [[nodiscard]] std::size_t poll_buckets_approx() const {
    std::lock_guard lock(mutex_);
    return limiter_.size();
  }

  /// Calls of `on_incident` that threw so far. Thread-safe.
  [[nodiscard]] std::uint64_t incident_hook_failures() const {
    std::lock_guard lock(mutex_);
    return incident_hook_failures_;
  }

  /// Records held (including expired ones not yet swept). Thread-safe.
  [[nodiscard]] std::size_t size_approx() const {
    std::lock_guard lock(mutex_);
    return records_.size();
  }

  /// When the earliest terminal record expires on the clock
  /// (`time_point::max()`: none), so a test advances the clock to it and
  /// calls `sweep()` (postbox::testing::harness attaches both). Takes the
  /// tracker's lock; never allocates. Thread-safe.
  [[nodiscard]] time_point next_expiry() const {
    std::lock_guard lock(mutex_);
    return expiry_.empty() ? time_point::max() : expiry_.begin()->first;
  }

  /// Threads blocked in `wait` right now (so a caller can know they went to
  /// sleep, e.g. before destroying the tracker). Thread-safe.
  [[nodiscard]] std::size_t waiting_approx() const {
    std::lock_guard lock(mutex_);
    return waiting_;
  }

 private:
  struct record {
    std::string tenant, owner, key, fingerprint;
    operation_snapshot<Result> snap;
    std::stop_source stop;
    std::map<std::uint64_t, std::shared_ptr<watcher>> watchers;
  };

  /// What async_watch/async_wait try and where they register (see
  /// detail::op_awaiter): a waker in async_waiters_, woken under mutex_ by
  /// every change and removal.
  struct watch_op {
    using result_type = result<operation_snapshot<Result>>;
    operations* self;
    operation_caller caller;
    std::string id;
    std::uint64_t after = 0;
    bool terminal_only = false;

    std::optional<result_type> try_once() noexcept { return self->poll_watch(*this); }
    void park(detail::waker& w) {
      std::lock_guard lock(self->mutex_);
      self->async_waiters_.push_back(&w);
    }
    void unpark(detail::waker& w) noexcept {
      std::lock_guard lock(self->mutex_);
      auto& v = self->async_waiters_;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (*it == &w) {
          v.erase(it);
          break;
        }
      }
    }
    static result_type canceled() noexcept { return errc::canceled; }
    static result_type timeout() noexcept { return errc::timeout; }
  };

  // The snapshot a watch_op is waiting for, if it is there. Copies under the
  // lock; an allocation failure here terminates (it runs in a noexcept re-try).
  std::optional<result<operation_snapshot<Result>>> poll_watch(const watch_op& w) noexcept {
    std::lock_guard lock(mutex_);
    expire_locked();
    if (closing_) return result<operation_snapshot<Result>>(errc::stopped);
    auto it = records_.find(w.id);
    if (it == records_.end() || !owned_by(it->second, w.caller)) {
      return result<operation_snapshot<Result>>(errc::not_found);
    }
    const operation_snapshot<Result>& snap = it->second.snap;
    if (is_terminal(snap.state) || (!w.terminal_only && snap.version > w.after)) {
      return result<operation_snapshot<Result>>(snap);
    }
    return std::nullopt;
  }

  // Wakes every suspended async_watch/async_wait (each re-checks). Under
  // mutex_: wake() only posts to the waiter's scheduler.
  void wake_async_locked() noexcept {
    for (detail::waker* w : async_waiters_) w->wake();
  }

  static std::shared_ptr<watch_link> make_link(operations* self) {
    auto l = std::make_shared<watch_link>();
    l->owner = self;
    return l;
  }

  // tenant and owner length-prefixed, so no two (tenant, owner, key)
  // triples share a string whatever bytes they hold.
  static std::string key_of(const std::string& tenant, const std::string& owner, const std::string& key) {
    std::string k = std::to_string(tenant.size());
    k.push_back(':');
    k += tenant;
    k += std::to_string(owner.size());
    k.push_back(':');
    k += owner;
    k += key;
    return k;
  }
  static std::string key_of(const operation_caller& c, const std::string& key) { return key_of(c.tenant, c.owner, key); }

  static bool owned_by(const record& r, const operation_caller& c) noexcept {
    return r.owner == c.owner && r.tenant == c.tenant;
  }

  // Takes one poll from `caller`'s bucket: zero when allowed, else the wait.
  duration charge_locked(const operation_caller& caller) {
    if (!limiter_.enabled()) return duration::zero();
    const duration delay = limiter_.charge(key_of(caller, {}), clock_->now());
    if (delay > duration::zero()) ++polls_refused_;
    return delay;
  }

  // The poll interval a live snapshot suggests: never shorter than one
  // token's refill, so a client that follows it is never refused.
  [[nodiscard]] duration suggested_poll() const noexcept {
    return std::max(opts_.poll_interval, limiter_.interval());
  }

  static std::string new_id() {
    const auto bits = detail::unguessable128();
    static constexpr char hex[] = "0123456789abcdef";
    std::string s(32, '0');
    for (int w = 0; w < 2; ++w)
      for (int i = 0; i < 16; ++i) s[static_cast<std::size_t>(w * 16 + i)] = hex[(bits[static_cast<std::size_t>(w)] >> (60 - 4 * i)) & 0xF];
    return s;
  }

  void touch_locked(record& r) {
    r.snap.updated_at = clock_->now();
    r.snap.retry_after = is_terminal(r.snap.state) ? duration::zero() : suggested_poll();
    ++r.snap.version;
    wake_async_locked();
    // A record turns terminal exactly once (transitions refuse to leave a
    // terminal state), so it gets exactly one expiry entry.
    if (is_terminal(r.snap.state)) {
      expiry_.emplace(r.snap.updated_at + opts_.retention, r.snap.id);
      if (waiting_ > 0) changed_.notify_all();  // wakes `wait` callers
    }
  }

  static std::vector<watcher> watchers_of(const record& r) {
    std::vector<watcher> ws;
    for (auto& [t, w] : r.watchers) ws.push_back(*w);
    return ws;
  }

  static void notify(const std::vector<watcher>& ws, const operation_snapshot<Result>& snap) {
    for (auto& w : ws) {
#if defined(__cpp_exceptions)
      try {
        w(snap);
      } catch (...) {  // a watcher's exception never unwinds the tracker
      }
#else
      w(snap);
#endif
    }
  }

  void drop_locked(const std::string& id) {
    auto it = records_.find(id);
    if (it == records_.end()) return;
    if (!it->second.key.empty()) keys_.erase(key_of(it->second.tenant, it->second.owner, it->second.key));
    records_.erase(it);
    wake_async_locked();
    if (waiting_ > 0) changed_.notify_all();  // a waiter on this record sees not_found
  }

  std::size_t expire_locked() {
    const auto now = clock_->now();
    std::size_t n = 0;
    while (!expiry_.empty() && expiry_.begin()->first <= now) {
      drop_locked(expiry_.begin()->second);
      expiry_.erase(expiry_.begin());
      ++n;
    }
    return n;
  }

  // Applies `change` to the record if it is not terminal; notifies watchers.
  template <class F>
  bool transition(const std::string& id, F&& change) {
    std::vector<watcher> ws;
    operation_snapshot<Result> snap;
    {
      std::lock_guard lock(mutex_);
      auto it = records_.find(id);
      if (it == records_.end() || is_terminal(it->second.snap.state)) return false;
      change(it->second.snap);
      touch_locked(it->second);
      snap = it->second.snap;
      ws = watchers_of(it->second);
    }
    notify(ws, snap);
    return true;
  }

  void execute(const std::string& id, work& fn, bool run) {
    if (!run) {
      transition(id, [](auto& s) {
        s.state = operation_state::canceled;
        s.error = operation_error{errc::stopped, "tracker shut down before the operation started"};
      });
      return;
    }
    std::stop_token token;
    std::string tenant, owner;  // for the incident report
    {
      std::lock_guard lock(mutex_);
      auto it = records_.find(id);
      if (it == records_.end()) return;
      token = it->second.stop.get_token();
      tenant = it->second.tenant;
      owner = it->second.owner;
    }
    if (!transition(id, [](auto& s) { s.state = operation_state::running; })) return;  // canceled while pending
    operation_context ctx(token, [this, &id](int pct, std::string msg) {
      transition(id, [&](auto& s) {
        s.progress = pct < 0 ? 0 : (pct > 100 ? 100 : pct);
        s.message = std::move(msg);
      });
    });
#if defined(__cpp_exceptions)
    try {
      Result r = fn(ctx);
      transition(id, [&](auto& s) {
        s.state = operation_state::succeeded;
        s.progress = 100;
        s.result.emplace(std::move(r));
      });
    } catch (const public_error& e) {
      fail(id, tenant, owner, e.code(), e.what(), true);
    } catch (const error& e) {
      fail(id, tenant, owner, e.code(), e.what(), false);
    } catch (const std::exception& e) {
      fail(id, tenant, owner, errc::handler_error, e.what(), false);
    } catch (...) {
      fail(id, tenant, owner, errc::handler_error, "unknown exception", false);
    }
#else
    Result r = fn(ctx);
    transition(id, [&](auto& s) {
      s.state = operation_state::succeeded;
      s.progress = 100;
      s.result.emplace(std::move(r));
    });
#endif
  }

  // Records a failure: the detail goes to on_incident (first, so an
  // operator has it by the time the client sees the failure) and the counters;
  // the snapshot carries the detail only when the work declared it public.
  // The incident is reported even when a cancel already won the record.
  void fail(const std::string& id, const std::string& tenant, const std::string& owner, errc code,
            std::string_view text, bool is_public) {
    std::string incident = new_id();
    {
      std::lock_guard lock(mutex_);
      ++failures_[static_cast<std::size_t>(code)];
    }
    if (opts_.on_incident) {
      operation_incident e;
      e.incident = incident;
      e.operation_id = id;
      e.tenant = tenant;
      e.owner = owner;
      e.code = code;
      e.detail = text;
      e.is_public = is_public;
      e.at = clock_->now();
      POSTBOX_TRY { opts_.on_incident(e); }
      POSTBOX_CATCH_ALL {
        std::lock_guard lock(mutex_);
        ++incident_hook_failures_;
      }
    }
    std::string message = is_public ? std::string(text) : "the operation failed; reference " + incident;
    transition(id, [&](auto& s) {
      s.state = operation_state::failed;
      s.error = operation_error{code, std::move(message), std::move(incident)};
    });
  }

  void unwatch(const std::string& id, std::uint64_t token) {
    std::lock_guard lock(mutex_);
    auto it = records_.find(id);
    if (it != records_.end()) it->second.watchers.erase(token);
  }

  const clock* clock_;
  operations_options opts_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, record> records_;
  std::unordered_map<std::string, std::string> keys_;  // key_of(tenant, owner, key) -> id
  std::multimap<time_point, std::string> expiry_;       // expiry time -> id of a terminal record
  std::uint64_t next_watch_ = 0;
  // Signalled (under mutex_) when a record turns terminal or is removed, when
  // the destructor starts closing, and by the last waiter to leave after
  // that. _any: it waits with a std::stop_token.
  std::condition_variable_any changed_;
  std::size_t waiting_ = 0;  // threads inside wait(); guarded by mutex_
  std::vector<detail::waker*> async_waiters_;  // suspended async_watch/async_wait; guarded by mutex_
  bool closing_ = false;     // set once by the destructor; guarded by mutex_
  detail::poll_limiter limiter_{opts_.poll_rate, opts_.poll_burst};  // guarded by mutex_
  std::array<std::uint64_t, static_cast<std::size_t>(errc::rate_limited) + 1> failures_{};  // by errc; guarded by mutex_
  std::uint64_t polls_refused_ = 0;           // guarded by mutex_
  std::uint64_t incident_hook_failures_ = 0;  // guarded by mutex_
  std::shared_ptr<watch_link> link_ = make_link(this);
  // last: joined before the maps go; dependent_t (detail/dependent.hpp) defers its instantiation
  detail::dependent_t<std::unique_ptr<detail::op_executor>, Result> executor_;
};

/// Registers an operation tracker's record count, failures by error code
/// (`postbox_operations_failures_total{code=...}`, codes seen so far only;
/// never any error text), refused polls and polling buckets under `name`.
/// `ops` must outlive the handle. Allocates; thread-safe.
template <class Result>
[[nodiscard]] metrics_registry::registration register_operations(metrics_registry& registry, std::string name,
                                                                 const operations<Result>& ops) {
  return registry.add("operations", std::move(name), [&ops](metric_writer& w) {
    w.gauge("postbox_operations_records", "Operations tracked (expired ones not yet swept included).",
            static_cast<double>(ops.size_approx()));
    for (std::size_t i = 1; i <= static_cast<std::size_t>(errc::rate_limited); ++i) {
      const auto code = static_cast<errc>(i);
      if (const auto n = ops.failures(code); n > 0) {
        w.counter("postbox_operations_failures_total", "Operations whose work failed, by error code.",
                  static_cast<double>(n), {{"code", std::string(to_string(code))}});
      }
    }
    w.counter("postbox_operations_polls_refused_total", "get/watch/list calls refused by the polling rate limit.",
              static_cast<double>(ops.polls_refused()));
    w.gauge("postbox_operations_poll_buckets", "Owners holding a polling rate-limit bucket.",
            static_cast<double>(ops.poll_buckets_approx()));
  });
}

POSTBOX_END_NAMESPACE
