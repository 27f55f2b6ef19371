// SPDX-License-Identifier: MIT
// postbox::operations: an in-process "202 Accepted + status resource" tracker for long-running work.
#pragma once

#include <postbox/async.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/operations/executor.hpp>
#include <postbox/detail/random.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>

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

// Design notes: docs/design/request_reply.md ("operations").

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

/// A failed operation's structured error.
struct operation_error {
  errc code = errc::handler_error;
  std::string message;
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
};

/// Tracks long-running work: idempotent submit, owner-scoped get, cooperative
/// cancel, push watch, clock-driven expiry (lazily on access and by
/// `sweep()`). Work runs on a bounded executor. All members thread-safe.
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

  /// Submits `fn` for `caller`. Same (caller, key) and fingerprint returns the
  /// existing id; other fingerprint is `conflict`. An empty key disables
  /// deduplication. Status `busy` when the executor queue is full (nothing
  /// recorded). Allocates. Never blocks on the work.
  [[nodiscard]] result<submission> submit(const std::string& caller, const std::string& idempotency_key,
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
    r.caller = caller;
    r.key = idempotency_key;
    r.fingerprint = fingerprint;
    r.snap.id = id;
    r.snap.created_at = r.snap.updated_at = clock_->now();
    r.snap.retry_after = opts_.poll_interval;
    records_.emplace(id, std::move(r));
    if (!idempotency_key.empty()) keys_.emplace(key_of(caller, idempotency_key), id);
    return submission{std::move(id), submit_disposition::created};
  }

  /// The record of `id` if it belongs to `caller` and has not expired;
  /// otherwise `not_found` (another caller's operation looks absent).
  /// Allocates (a copy). Thread-safe.
  [[nodiscard]] result<operation_snapshot<Result>> get(const std::string& caller, const std::string& id) {
    std::lock_guard lock(mutex_);
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || it->second.caller != caller) return errc::not_found;
    return it->second.snap;
  }

  /// Blocks until `caller`'s operation `id` is terminal and returns that
  /// snapshot. `canceled` when `stop` is stopped first (nothing changes: the
  /// operation goes on and can be waited for again); `not_found` as get (also
  /// when the record is swept meanwhile); `stopped` when the tracker is
  /// destroyed first (its destructor wakes every waiter and waits for it to
  /// leave). Allocates (a copy). Thread-safe.
  [[nodiscard]] result<operation_snapshot<Result>> wait(const std::string& caller, const std::string& id,
                                                        std::stop_token stop = {}) {
    std::unique_lock lock(mutex_);
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || it->second.caller != caller) return errc::not_found;
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
  [[nodiscard]] result<operation_state> cancel(const std::string& caller, const std::string& id) {
    std::vector<watcher> ws;
    operation_snapshot<Result> snap;
    {
      std::lock_guard lock(mutex_);
      expire_locked();
      auto it = records_.find(id);
      if (it == records_.end() || it->second.caller != caller) return errc::not_found;
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
  /// `version`). `not_found` as get. Allocates. Thread-safe.
  [[nodiscard]] result<watch_handle> watch(const std::string& caller, const std::string& id, watcher fn) {
    std::lock_guard lock(mutex_);
    expire_locked();
    auto it = records_.find(id);
    if (it == records_.end() || it->second.caller != caller) return errc::not_found;
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
  [[nodiscard]] auto async_watch(const std::string& caller, const std::string& id, std::uint64_t after_version,
                                 std::stop_token stop = {}) {
    return detail::op_awaiter<watch_op>(watch_op{this, caller, id, after_version, false}, {std::move(stop), {}});
  }
  /// `co_await ops.async_wait(caller, id)`: the awaitable form of `wait`: the
  /// terminal snapshot, or `canceled` or `not_found` as async_watch.
  [[nodiscard]] auto async_wait(const std::string& caller, const std::string& id, std::stop_token stop = {}) {
    return detail::op_awaiter<watch_op>(watch_op{this, caller, id, 0, true}, {std::move(stop), {}});
  }

  /// Removes terminal records older than the retention period (their
  /// idempotency keys with them); returns how many. Thread-safe.
  std::size_t sweep() {
    std::lock_guard lock(mutex_);
    return expire_locked();
  }

  /// Records held (including expired ones not yet swept). Thread-safe.
  [[nodiscard]] std::size_t size_approx() const {
    std::lock_guard lock(mutex_);
    return records_.size();
  }

  /// Threads blocked in `wait` right now (so a caller can know they went to
  /// sleep, e.g. before destroying the tracker). Thread-safe.
  [[nodiscard]] std::size_t waiting_approx() const {
    std::lock_guard lock(mutex_);
    return waiting_;
  }

 private:
  struct record {
    std::string caller, key, fingerprint;
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
    std::string caller, id;
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
    if (it == records_.end() || it->second.caller != w.caller) {
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

  static std::string key_of(const std::string& caller, const std::string& key) {
    std::string k = caller;
    k.push_back('\0');
    k += key;
    return k;
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
    r.snap.retry_after = is_terminal(r.snap.state) ? duration::zero() : opts_.poll_interval;
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
    if (!it->second.key.empty()) keys_.erase(key_of(it->second.caller, it->second.key));
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
    {
      std::lock_guard lock(mutex_);
      auto it = records_.find(id);
      if (it == records_.end()) return;
      token = it->second.stop.get_token();
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
    } catch (const error& e) {
      fail(id, e.code(), e.what());
    } catch (const std::exception& e) {
      fail(id, errc::handler_error, e.what());
    } catch (...) {
      fail(id, errc::handler_error, "unknown exception");
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

  void fail(const std::string& id, errc code, std::string msg) {
    transition(id, [&](auto& s) {
      s.state = operation_state::failed;
      s.error = operation_error{code, std::move(msg)};
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
  std::unordered_map<std::string, std::string> keys_;  // caller '\0' key -> id
  std::multimap<time_point, std::string> expiry_;       // expiry time -> id of a terminal record
  std::uint64_t next_watch_ = 0;
  // Signalled (under mutex_) when a record turns terminal or is removed, when
  // the destructor starts closing, and by the last waiter to leave after
  // that. _any: it waits with a std::stop_token.
  std::condition_variable_any changed_;
  std::size_t waiting_ = 0;  // threads inside wait(); guarded by mutex_
  std::vector<detail::waker*> async_waiters_;  // suspended async_watch/async_wait; guarded by mutex_
  bool closing_ = false;     // set once by the destructor; guarded by mutex_
  std::shared_ptr<watch_link> link_ = make_link(this);
  std::unique_ptr<detail::op_executor> executor_;  // last: joined before the maps go
};

/// Registers an operation tracker's record count under `name`. `ops` must
/// outlive the handle. Allocates; thread-safe.
template <class Result>
[[nodiscard]] metrics_registry::registration register_operations(metrics_registry& registry, std::string name,
                                                                 const operations<Result>& ops) {
  return registry.add("operations", std::move(name), [&ops](metric_writer& w) {
    w.gauge("postbox_operations_records", "Operations tracked (expired ones not yet swept included).",
            static_cast<double>(ops.size_approx()));
  });
}

POSTBOX_END_NAMESPACE
