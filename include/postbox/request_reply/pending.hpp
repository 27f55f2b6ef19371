// SPDX-License-Identifier: MIT
// The transport-agnostic core of request-reply: outcome types, reply futures and the pending-request table.
#pragma once

// Layer 4 (patterns). Every requester transport (in-process channels in
// request_reply.hpp, NATS in nats_request_reply.hpp) plugs into
// `pending_requests`: the transport builds and sends the request and feeds
// replies in; the table decides each request's one outcome, runs its
// deadline timer, counts late, duplicate and unmatched replies, cancels on
// destruction and waits for callbacks running elsewhere.
// Design notes: docs/design/request_reply.md.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/timer_service.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// A responder's structured error, carried back to the requester.
struct reply_error {
  errc code = errc::handler_error;
  std::string message;
};

/// What travels to a reply endpoint: the correlation id and either the reply
/// envelope or a structured error.
template <class Reply>
struct reply_packet {
  message_id correlation_id;
  std::variant<envelope<Reply>, reply_error> body;
};

/// How one request ended. `status` is `ok` (reply holds the reply), `timeout`,
/// `canceled`, or the responder's error code (error holds it). Exactly one
/// outcome is produced per accepted request.
template <class Reply>
struct reply_outcome {
  errc status = errc::ok;
  std::optional<envelope<Reply>> reply;
  std::optional<reply_error> error;
  /// True when a reply arrived. Never blocks.
  [[nodiscard]] bool ok() const noexcept { return status == errc::ok && reply.has_value(); }
};

/// How a scatter-gather ended: the replies collected (and errors) before the
/// count was reached (`ok`), the deadline passed (`timeout`) or it was canceled.
template <class Reply>
struct gather_outcome {
  errc status = errc::ok;
  std::vector<envelope<Reply>> replies;
  std::vector<reply_error> errors;
};

/// Requester counters (snapshot).
struct requester_stats {
  std::uint64_t sent = 0, replied = 0, errors = 0, timed_out = 0, canceled = 0, refused = 0;
  std::uint64_t late_replies = 0, duplicate_replies = 0, unmatched_replies = 0;
  std::size_t pending = 0;
};

namespace detail {
template <class V>
struct reply_future_access;

template <class V>
struct rr_future_state {
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<V> value;
  /// The continuation slot: the waker of a coroutine suspended on this
  /// outcome (async_request, async_get in request_reply.hpp), or null.
  /// Guarded by mutex; set() wakes it under the mutex (a waker only posts a
  /// resumption), so unregistering under the mutex ends every wake.
  waker* continuation = nullptr;
  void set(V v) {
    {
      std::lock_guard lock(mutex);
      value.emplace(std::move(v));
      if (continuation != nullptr) continuation->wake();
    }
    cv.notify_all();
  }
};
}  // namespace detail

/// A handle to one outcome, set exactly once. Move-only.
template <class V>
class reply_future {
 public:
  reply_future() = default;
  explicit reply_future(std::shared_ptr<detail::rr_future_state<V>> s) : state_(std::move(s)) {}
  /// Whether the outcome is there. Never blocks. Thread-safe.
  [[nodiscard]] bool ready() const {
    std::lock_guard lock(state_->mutex);
    return state_->value.has_value();
  }
  /// Blocks until the outcome is there (a requester always produces one:
  /// the deadline timer bounds the wait). Thread-safe.
  void wait() const {
    std::unique_lock lock(state_->mutex);
    state_->cv.wait(lock, [&] { return state_->value.has_value(); });
  }
  /// Blocks until the outcome is there (`ok`) or `stop` is stopped first
  /// (`canceled`; the request goes on and the outcome stays for a later
  /// wait or get). An outcome already there wins over a stop. Thread-safe.
  [[nodiscard]] errc wait(std::stop_token stop) const {
    // Constructed before taking the lock: a stop already requested runs the
    // callback right here, and it takes the lock itself. Taking the lock in
    // the callback orders the notify after a waiter's predicate check, so
    // the wake-up cannot be lost.
    std::stop_callback wake(stop, [s = state_.get()] {
      std::lock_guard lock(s->mutex);
      s->cv.notify_all();
    });
    std::unique_lock lock(state_->mutex);
    state_->cv.wait(lock, [&] { return state_->value.has_value() || stop.stop_requested(); });
    return state_->value.has_value() ? errc::ok : errc::canceled;
  }
  /// Waits, then moves the outcome out; call once. Blocks.
  [[nodiscard]] V get() {
    wait();
    std::lock_guard lock(state_->mutex);
    return std::move(*state_->value);
  }
  /// Waits as `wait(stop)`, then moves the outcome out; `canceled` when
  /// `stop` came first, and then nothing is consumed (a later get returns the
  /// outcome). Blocks. Thread-safe with waiters; call get once.
  [[nodiscard]] result<V> get(std::stop_token stop) {
    if (wait(std::move(stop)) != errc::ok) return errc::canceled;
    std::lock_guard lock(state_->mutex);
    return std::move(*state_->value);
  }
  /// Whether this handle refers to a request. Never blocks.
  [[nodiscard]] bool valid() const noexcept { return state_ != nullptr; }

 private:
  friend struct detail::reply_future_access<V>;
  std::shared_ptr<detail::rr_future_state<V>> state_;
};

namespace detail {
/// A callback that sets a future, and that future: how a transport's future
/// form of a request wraps its callback form. Allocates.
template <class V>
struct future_link {
  std::function<void(V)> callback;
  reply_future<V> future;
};
template <class V>
[[nodiscard]] future_link<V> make_future_link() {
  auto fs = std::make_shared<rr_future_state<V>>();
  return {[fs](V v) { fs->set(std::move(v)); }, reply_future<V>(fs)};
}
}  // namespace detail

/// What happens to an exception thrown by a completion callback.
enum class callback_exceptions : std::uint8_t {
  propagate,  ///< it unwinds into the thread that completed the request
  contain,    ///< caught and dropped (for transports whose threads must not unwind, such as libnats')
};

/// The pending-request table a requester transport plugs into. The transport
/// stamps and sends each request; the table records it (`open`), arms its
/// deadline on `timers` (`arm`), matches replies by correlation id
/// (`on_reply`) and completes each accepted request exactly once: reply,
/// responder error, `timeout` or `canceled` (`close`). Removal of the entry
/// under the table's mutex is the single point that decides the outcome; the
/// callback runs after it, outside the lock. Finished correlation ids are
/// remembered (at most 4 x `max_pending`, FIFO) to tell late and duplicate
/// replies from unmatched ones; all three are dropped and counted. `Stats`
/// is `requester_stats` or a transport's extension of it. Held by
/// `shared_ptr` (create it with `create`): timers keep a weak reference, so a
/// timer firing after the table is gone does nothing. Thread-safe.
template <class Reply, class Stats = requester_stats>
class pending_requests : public std::enable_shared_from_this<pending_requests<Reply, Stats>> {
  static_assert(std::is_base_of_v<requester_stats, Stats>, "Stats must extend requester_stats");
  struct private_tag {};

 public:
  using callback = std::function<void(reply_outcome<Reply>)>;
  using gather_callback = std::function<void(gather_outcome<Reply>)>;

  /// A table whose deadlines run on `timers` (which must outlive it) and that
  /// refuses with `busy` beyond `max_pending` requests. Allocates.
  [[nodiscard]] static std::shared_ptr<pending_requests> create(
      timer_service& timers, std::size_t max_pending, callback_exceptions on_throw = callback_exceptions::propagate) {
    return std::make_shared<pending_requests>(private_tag{}, timers, max_pending, on_throw);
  }
  /// For `create` only (the tag is private).
  pending_requests(private_tag, timer_service& timers, std::size_t max_pending, callback_exceptions on_throw)
      : timers_(&timers), max_pending_(max_pending), on_throw_(on_throw) {}
  pending_requests(const pending_requests&) = delete;
  pending_requests& operator=(const pending_requests&) = delete;

  /// The clock deadlines are measured on (the timers'). Never blocks.
  [[nodiscard]] const clock& get_clock() const noexcept { return timers_->get_clock(); }

  /// Stamps a request envelope: a fresh correlation id (returned), the
  /// deadline now + `timeout` on the timers' clock, and `producer` when not
  /// empty. The transport sets `reply-to`. Allocates only for the producer.
  template <class Request>
  [[nodiscard]] message_id stamp(envelope<Request>& env, duration timeout, const std::string& producer) const {
    const clock& clk = get_clock();
    env.correlation_id = message_id::generate(clk);
    env.deadline = clk.now() + timeout;
    if (!producer.empty()) env.producer = producer;
    return env.correlation_id;
  }

  /// Records `corr` as pending, completed through `cb`, before the transport
  /// sends it (a reply may come back at once). `busy` (counted as refused)
  /// at the pending limit; then `cb` is never called. Allocates. Thread-safe.
  [[nodiscard]] errc open(const message_id& corr, callback cb) {
    entry e;
    e.single = std::move(cb);
    return insert(corr, std::move(e));
  }
  /// As `open`, for a scatter-gather completing once `want` (at least 1)
  /// replies or errors arrived, or at the deadline with what it collected.
  [[nodiscard]] errc open_gather(const message_id& corr, std::size_t want, gather_callback cb) {
    entry e;
    e.want = want == 0 ? 1 : want;
    e.multi = std::move(cb);
    return insert(corr, std::move(e));
  }

  /// The transport could not send the opened request: forgets `corr` (its
  /// callback is never called), counts a refusal and returns `why`.
  /// Thread-safe.
  errc abandon(const message_id& corr, errc why) {
    std::lock_guard lock(mutex_);
    pending_.erase(corr);
    ++stats_.refused;
    return why;
  }
  /// Counts a refusal decided before `open` (say, the request did not encode)
  /// and returns `why`. Thread-safe.
  errc refuse(errc why) {
    std::lock_guard lock(mutex_);
    ++stats_.refused;
    return why;
  }

  /// The opened request was sent: counts it and arms its timer at
  /// `deadline`, unless a reply already completed it. Allocates. Thread-safe.
  void arm(const message_id& corr, time_point deadline) {
    std::weak_ptr<pending_requests> weak = this->weak_from_this();
    const auto id = timers_->schedule_at(deadline, [weak, corr] {
      if (auto self = weak.lock()) self->on_timeout(corr);
    });
    std::lock_guard lock(mutex_);
    ++stats_.sent;
    auto it = pending_.find(corr);
    if (it != pending_.end()) it->second.timer = id;
    else timers_->cancel(id);  // already completed by a fast reply
  }

  /// A reply (or a responder error) for `packet.correlation_id`: completes
  /// its request on the calling thread (running its callback, outside the
  /// lock), or is dropped and counted as late, duplicate or unmatched. A
  /// gather completes once `want` replies or errors are in. Thread-safe.
  void on_reply(reply_packet<Reply> packet) {
    // Declared first, so destroyed last: the callback and everything it
    // captured are gone before close() may stop waiting.
    std::optional<callback_run> run;
    std::optional<entry> finished_e;
    errc status = errc::ok;
    std::optional<envelope<Reply>> reply;
    std::optional<reply_error> err;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(packet.correlation_id);
      if (it == pending_.end()) {
        auto d = done_.find(packet.correlation_id);
        if (d == done_.end()) ++stats_.unmatched_replies;
        else if (d->second == finished::replied) ++stats_.duplicate_replies;
        else ++stats_.late_replies;
        return;
      }
      entry& e = it->second;
      if (e.multi) {
        if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) e.collected.replies.push_back(std::move(*env));
        else e.collected.errors.push_back(std::get<reply_error>(std::move(packet.body)));
        ++stats_.replied;
        if (e.collected.replies.size() + e.collected.errors.size() < e.want) return;
      } else if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) {
        reply.emplace(std::move(*env));
        ++stats_.replied;
      } else {
        err.emplace(std::get<reply_error>(std::move(packet.body)));
        status = err->code == errc::ok ? errc::handler_error : err->code;
        ++stats_.errors;
      }
      finished_e.emplace(std::move(e));
      pending_.erase(it);
      remember(packet.correlation_id, finished::replied);
      run.emplace(*this);
    }
    timers_->cancel(finished_e->timer);
    complete(*finished_e, status, std::move(reply), std::move(err));
  }

  /// Adds one to a counter (a transport's own, or a requester_stats one)
  /// under the table's lock. Thread-safe.
  void count(std::uint64_t Stats::*field) {
    std::lock_guard lock(mutex_);
    ++(stats_.*field);
  }

  /// For the requester's destructor, after the transport stopped feeding
  /// replies: completes every pending request with `canceled` on this
  /// thread, then blocks until every callback already running on another
  /// thread (a reply or a timeout) has returned. A callback running on this
  /// thread (one that destroys its own requester) is not waited for.
  /// Blocks. Call once.
  void close() {
    cancel_all();
    wait_callbacks();
  }

  /// Counters, with `pending` the requests in flight now. Thread-safe.
  [[nodiscard]] Stats stats() const {
    std::lock_guard lock(mutex_);
    Stats s = stats_;
    s.pending = pending_.size();
    return s;
  }

 private:
  struct entry {
    callback single;
    gather_callback multi;
    std::size_t want = 1;
    gather_outcome<Reply> collected;
    timer_service::timer_id timer = 0;
  };
  enum class finished : std::uint8_t { replied, expired };

  // Registers the calling thread as running a callback (construct under
  // mutex_, in the critical section that takes the entry out of pending_, so
  // close() sees every request either pending or running) and unregisters it
  // when destroyed, also when the callback throws.
  class callback_run {
   public:
    explicit callback_run(pending_requests& t) : t_(&t) { t.running_.push_back(std::this_thread::get_id()); }
    callback_run(const callback_run&) = delete;
    callback_run& operator=(const callback_run&) = delete;
    ~callback_run() {
      {
        std::lock_guard lock(t_->mutex_);
        auto it = std::find(t_->running_.begin(), t_->running_.end(), std::this_thread::get_id());
        if (it != t_->running_.end()) t_->running_.erase(it);
      }
      t_->idle_.notify_all();
    }

   private:
    pending_requests* t_;
  };

  errc insert(const message_id& corr, entry e) {
    std::lock_guard lock(mutex_);
    if (pending_.size() >= max_pending_) {
      ++stats_.refused;
      return errc::busy;
    }
    pending_.emplace(corr, std::move(e));
    return errc::ok;
  }

  void remember(const message_id& id, finished f) {
    done_[id] = f;
    done_order_.push_back(id);
    while (done_order_.size() > 4 * (max_pending_ == 0 ? 1 : max_pending_)) {
      done_.erase(done_order_.front());
      done_order_.pop_front();
    }
  }

  void complete(entry& e, errc status, std::optional<envelope<Reply>> r, std::optional<reply_error> err) {
    auto call = [&] {
      if (e.single) {
        reply_outcome<Reply> o;
        o.status = status;
        o.reply = std::move(r);
        o.error = std::move(err);
        e.single(std::move(o));
      } else if (e.multi) {
        e.collected.status = status;
        e.multi(std::move(e.collected));
      }
    };
    if (on_throw_ == callback_exceptions::propagate) {
      call();
      return;
    }
    POSTBOX_TRY { call(); }
    POSTBOX_CATCH_ALL {}  // contained: the completing thread must not unwind
  }

  void on_timeout(const message_id& id) {
    std::optional<callback_run> run;  // first: destroyed after the callback (see on_reply)
    std::optional<entry> e;
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(id);
      if (it == pending_.end()) return;
      e.emplace(std::move(it->second));
      pending_.erase(it);
      remember(id, finished::expired);
      ++stats_.timed_out;
      run.emplace(*this);
    }
    complete(*e, errc::timeout, std::nullopt, std::nullopt);
  }

  void cancel_all() {
    std::unordered_map<message_id, entry> taken;
    {
      std::lock_guard lock(mutex_);
      taken.swap(pending_);
      stats_.canceled += taken.size();
    }
    for (auto& [id, e] : taken) {
      timers_->cancel(e.timer);
      complete(e, errc::canceled, std::nullopt, std::nullopt);
    }
  }

  void wait_callbacks() {
    const auto self = std::this_thread::get_id();
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [&] {
      return std::all_of(running_.begin(), running_.end(), [&](const std::thread::id& t) { return t == self; });
    });
  }

  timer_service* timers_;
  const std::size_t max_pending_;
  const callback_exceptions on_throw_;
  mutable std::mutex mutex_;  // guards everything below
  std::unordered_map<message_id, entry> pending_;
  std::unordered_map<message_id, finished> done_;  // recently finished, for late/duplicate
  std::deque<message_id> done_order_;             // done_'s FIFO eviction order
  Stats stats_;
  // Threads running a completion callback now (one entry per run); close()
  // waits on idle_ until only its own thread is left.
  std::vector<std::thread::id> running_;
  std::condition_variable idle_;
};

POSTBOX_END_NAMESPACE
