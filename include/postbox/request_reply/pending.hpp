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
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/timer_service.hpp>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
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

/// How long, and how finely, request-reply's two waits (a reply future's
/// `wait`, a responder worker before its blocking receive) spin before they
/// yield and park: as long as a channel's blocking receive pauses
/// (detail::backoff's pause phase, 1 + 2 + ... + 64 = 127 pauses, about
/// 3 us on this project's benchmark machine), but checking the condition
/// every `step` pauses instead of after pause runs doubling to 64. A round
/// trip of about 1-2 us ended its wait inside the 32- or 64-pause run, so
/// the waiter noticed the reply (or the next request) up to 0.8-1.6 us late
/// on each side; a channel ping-pong's waits end within the first few runs.
struct rr_spin : spin_budget {
  /// detail::spin_until (backoff.hpp), the channel's blocking waits' spin.
  template <class Done>
  static bool spin_until(Done done, bool yield_too) noexcept {
    return detail::spin_until(done, yield_too);
  }
};

/// One outcome, set once, and its waiters. The waiting protocol is one
/// atomic word (`word`), so a requester that finds its reply while spinning
/// makes no syscall, and set() makes one only when a thread sleeps:
///  - set() constructs `value`, then sets `ready_bit` with one RMW; the bits
///    that RMW returns say whom to wake (a sleeping thread, a coroutine).
///  - a thread waits as a channel's blocking receive does: it checks
///    `ready_bit` between the steps of a `detail::backoff` (pauses doubling
///    to 64, then a few yields), then announces itself with `sleeper_bit` in
///    one RMW and sleeps on the word (std::atomic::wait: a futex on Linux).
///  - a coroutine registers its waker in `continuation` under `mutex` and
///    then sets `continuation_bit`.
/// Every announcement and set() are RMWs of the same word, so they are
/// totally ordered: either set() sees the bit (and wakes), or the announcing
/// side's RMW returns `ready_bit` (and does not wait). No wake-up is lost.
template <class V>
struct rr_future_state {
  static constexpr std::uint32_t ready_bit = 1;         ///< value is set
  static constexpr std::uint32_t sleeper_bit = 2;       ///< a thread may sleep on word (sticky)
  static constexpr std::uint32_t continuation_bit = 4;  ///< a waker may be in continuation (sticky)
  static constexpr std::uint32_t stop_unit = 8;         ///< added by a stop callback to wake sleepers

  /// The state word. Written with RMWs only: set() (release: publishes
  /// value; acquire: sees the continuation registered before the bit),
  /// waiters (sleeper_bit), park (continuation_bit), stop callbacks
  /// (stop_unit). Read with acquire loads by waiters, which then read value.
  std::atomic<std::uint32_t> word{0};
  std::optional<V> value;  // written once by set() before ready_bit; read after seeing ready_bit
  /// Guards continuation (the coroutine side only; never taken by a thread
  /// that waits or a set() that finds no continuation_bit).
  std::mutex mutex;
  /// The continuation slot: the waker of a coroutine suspended on this
  /// outcome (async_request, async_get in request_reply.hpp), or null.
  /// set() wakes it under the mutex (a waker only posts a resumption), so
  /// unregistering under the mutex ends every wake.
  waker* continuation = nullptr;

  /// Sets the outcome (once) and wakes its waiters. Never blocks (a
  /// coroutine's waker only posts); makes a syscall only when a thread sleeps.
  void set(V&& v) {
    value.emplace(std::move(v));
    publish();
  }
  /// Makes `value`, filled in place by the one setter, visible and wakes the
  /// waiters. Never blocks; makes a syscall only when a thread sleeps.
  void publish() {
    // acq_rel: release publishes value to the acquire loads that see
    // ready_bit; acquire pairs with park_continuation's release RMW, so the
    // continuation written before it is visible below.
    const std::uint32_t old = word.fetch_or(ready_bit, std::memory_order_acq_rel);
    if ((old & continuation_bit) != 0) {
      std::lock_guard lock(mutex);
      if (continuation != nullptr) continuation->wake();
    }
    if ((old & sleeper_bit) != 0) word.notify_all();
  }

  /// Whether the outcome is set. Never blocks.
  [[nodiscard]] bool ready() const noexcept {
    // acquire: pairs with set()'s release RMW; value is readable after it.
    return (word.load(std::memory_order_acquire) & ready_bit) != 0;
  }

  /// Blocks until the outcome is set or `stopped()` is true after a wake of
  /// the word (a stop callback adds stop_unit). True when set. Spins and
  /// yields first, as long as a channel's blocking receive (rr_spin: about
  /// 130 pauses, checking every 4, then 4 yields), so a reply that comes
  /// within a few microseconds costs no syscall on either side and is seen
  /// within 4 pauses; then sleeps. The yields matter on a machine with more
  /// runnable threads than cores: they let the responder (or anyone) run
  /// instead of this thread pausing, where a pause-only spin of the same
  /// length made the waiter sleep, and the replier pay a futex wake, on most
  /// round trips.
  template <class Stop>
  bool wait(Stop stopped) noexcept {
    bool stop_seen = false;
    const bool set = rr_spin::spin_until(
        [&] {
          if (ready()) return true;
          stop_seen = stopped();
          return stop_seen;
        },
        true);
    if (!set) return sleep(stopped);
    return !stop_seen;  // done: set (true) or stopped first (false)
  }

  /// The sleeping half of wait().
  template <class Stop>
  bool sleep(Stop stopped) noexcept {
    // acq_rel: announces the sleeper to set() (same word); acquire sees value.
    std::uint32_t w = word.fetch_or(sleeper_bit, std::memory_order_acq_rel) | sleeper_bit;
    while ((w & ready_bit) == 0) {
      if (stopped()) return false;
      word.wait(w, std::memory_order_acquire);
      // acquire: pairs with set() (value) and with a stop callback's release
      // RMW (the stop request made before it is visible to stopped()).
      w = word.load(std::memory_order_acquire);
    }
    return true;
  }

  /// Wakes threads sleeping in wait() so they re-check their stop token.
  void poke() noexcept {
    // release: pairs with the acquire reload in wait(): the stop request
    // that ran this is visible to the woken thread's stop check.
    const std::uint32_t old = word.fetch_add(stop_unit, std::memory_order_acq_rel);
    if ((old & sleeper_bit) != 0) word.notify_all();
  }

  /// Registers `w` in the continuation slot (one coroutine at a time).
  void park_continuation(waker& w) {
    {
      std::lock_guard lock(mutex);
      if (continuation != nullptr && continuation != &w) {
        POSTBOX_THROW(error(errc::busy, "postbox: a reply future is already awaited by another coroutine"));
      }
      continuation = &w;
    }
    // release: publishes continuation to set()'s acquire RMW (same word).
    word.fetch_or(continuation_bit, std::memory_order_acq_rel);
  }
  void unpark_continuation(waker& w) noexcept {
    std::lock_guard lock(mutex);
    if (continuation == &w) continuation = nullptr;
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
  [[nodiscard]] bool ready() const noexcept { return state_->ready(); }
  /// Blocks until the outcome is there (a requester always produces one:
  /// the deadline timer bounds the wait): spins briefly, then sleeps on the
  /// future's word (no syscall when the outcome comes while spinning).
  /// Thread-safe.
  void wait() const { (void)state_->wait([] { return false; }); }
  /// Blocks until the outcome is there (`ok`) or `stop` is stopped first
  /// (`canceled`; the request goes on and the outcome stays for a later
  /// wait or get). An outcome already there wins over a stop. Thread-safe.
  [[nodiscard]] errc wait(std::stop_token stop) const {
    if (state_->ready()) return errc::ok;
    // The callback only bumps the word and wakes sleepers; a stop already
    // requested runs it here, harmlessly.
    std::stop_callback wake(stop, [s = state_.get()] { s->poke(); });
    if (state_->wait([&] { return stop.stop_requested(); })) return errc::ok;
    return state_->ready() ? errc::ok : errc::canceled;
  }
  /// Waits, then moves the outcome out; call once. Blocks.
  [[nodiscard]] V get() {
    wait();
    return std::move(*state_->value);
  }
  /// Waits, then gives the outcome where it lies in the future: no move
  /// (`get()` moves it once more). The reference is valid while this future
  /// (or one it is moved to) lives, and until `get()` moves the outcome out;
  /// may be called again. Blocks. Thread-safe with other waiters.
  /// **Example**: `auto f = req.request(x, 1s); const auto& o = f->value();`
  [[nodiscard]] V& value() {
    wait();
    return *state_->value;
  }
  /// Waits as `wait(stop)`, then moves the outcome out; `canceled` when
  /// `stop` came first, and then nothing is consumed (a later get returns the
  /// outcome). Blocks. Thread-safe with waiters; call get once.
  [[nodiscard]] result<V> get(std::stop_token stop) {
    if (wait(std::move(stop)) != errc::ok) return errc::canceled;
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
/// stamps and sends each request; the table records it (`open`), tracks its
/// deadline (`arm`), matches replies by correlation id (`on_reply`) and
/// completes each accepted request exactly once: reply, responder error,
/// `timeout` or `canceled` (`close`). Removal of the entry under the table's
/// mutex is the single point that decides the outcome; the callback runs
/// after it, outside the lock. Finished correlation ids are remembered (at
/// most 4 x `max_pending`, FIFO) to tell late and duplicate replies from
/// unmatched ones; all three are dropped and counted. `Stats` is
/// `requester_stats` or a transport's extension of it.
///
/// Deadlines: the table keeps its own min-heap of deadlines and holds at most
/// one timer on `timers`, for the earliest one; that timer expires every
/// request due and re-arms for the next. While requests overlap, one with a
/// later deadline than the armed one schedules nothing. A table that empties
/// keeps its timer armed (strict ping-pong empties it on every reply, and a
/// cancel plus a schedule per round trip was a sixth of its cost): an idle
/// table holds at most one timer, due at the deadline of a request it had;
/// that timer fires once into the idle table, times out nothing and is not
/// re-armed, so it is gone by then. A request made meanwhile re-arms only if
/// its deadline is earlier; else the firing timer re-arms for it, so every
/// request still times out exactly at its deadline. `close()` cancels the
/// timer. Map nodes are recycled, so the table itself allocates only while
/// it grows.
///
/// Held by `shared_ptr` (create it with `create`): the timer keeps a weak
/// reference, so a timer firing after the table is gone does nothing.
/// Thread-safe.
template <class Reply, class Stats = requester_stats>
class pending_requests : public std::enable_shared_from_this<pending_requests<Reply, Stats>> {
  static_assert(std::is_base_of_v<requester_stats, Stats>, "Stats must extend requester_stats");
  struct private_tag {};

 public:
  using callback = std::function<void(reply_outcome<Reply>)>;
  using gather_callback = std::function<void(gather_outcome<Reply>)>;
  using future_state = detail::rr_future_state<reply_outcome<Reply>>;

  /// A table whose deadlines run on `timers` (which must outlive it) and that
  /// refuses with `busy` beyond `max_pending` requests. Allocates.
  [[nodiscard]] static std::shared_ptr<pending_requests> create(
      timer_service& timers, std::size_t max_pending, callback_exceptions on_throw = callback_exceptions::propagate) {
    return std::make_shared<pending_requests>(private_tag{}, timers, max_pending, on_throw);
  }
  /// For `create` only (the tag is private).
  pending_requests(private_tag, timer_service& timers, std::size_t max_pending, callback_exceptions on_throw)
      : timers_(&timers),
        max_pending_(max_pending),
        done_capacity_(max_pending > std::numeric_limits<std::size_t>::max() / 8 ? std::numeric_limits<std::size_t>::max() / 2
                                                                               : 4 * (max_pending == 0 ? 1 : max_pending)),
        on_throw_(on_throw) {}
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
  /// `stamp` for an envelope the transport made just now with make_envelope
  /// on the timers' clock: its own fresh id is already its correlation id,
  /// and its `occurred_at` is now, so it keeps both (no second id, no second
  /// clock read): deadline = occurred_at + `timeout`.
  template <class Request>
  [[nodiscard]] message_id stamp_fresh(envelope<Request>& env, duration timeout, const std::string& producer) const {
    env.correlation_id = env.id;
    env.deadline = env.occurred_at + timeout;
    if (!producer.empty()) env.producer = producer;
    return env.correlation_id;
  }

  /// Records `corr` as pending, completed through `cb`, before the transport
  /// sends it (a reply may come back at once). `busy` (counted as refused)
  /// at the pending limit; then `cb` is never called. Allocates only while
  /// the table grows (map nodes are recycled). Thread-safe.
  [[nodiscard]] errc open(const message_id& corr, callback cb) {
    entry e;
    e.single = std::move(cb);
    return insert(corr, std::move(e));
  }
  /// As `open`, completing `future` directly (the future form of a request:
  /// no callback object; the outcome is moved once, into the future).
  [[nodiscard]] errc open(const message_id& corr, std::shared_ptr<future_state> future) {
    entry e;
    e.future = std::move(future);
    return insert(corr, std::move(e));
  }
  /// As the future form of `open`, also tracking `deadline` at once (one
  /// lock for both); after sending, the transport calls `sent()` instead of
  /// `arm`, or `abandon`. Thread-safe.
  [[nodiscard]] errc open(const message_id& corr, std::shared_ptr<future_state> future, time_point deadline) {
    entry e;
    e.future = std::move(future);
    return open_tracked(corr, std::move(e), deadline);
  }
  /// As `open` with a callback, also tracking `deadline` at once (one lock
  /// for both, none after the send); after sending, the transport calls
  /// `sent()` instead of `arm`, or `abandon`. Thread-safe.
  [[nodiscard]] errc open(const message_id& corr, callback cb, time_point deadline) {
    entry e;
    e.single = std::move(cb);
    return open_tracked(corr, std::move(e), deadline);
  }
  /// Counts a request opened with a deadline as sent. Never blocks.
  void sent() noexcept {
    // relaxed: a statistic, read by stats().
    sent_.fetch_add(1, std::memory_order_relaxed);
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
  /// callback is never called), counts a refusal and returns `why`. A
  /// request opened with its deadline may already have reached it while the
  /// send was tried, and the timer then completed it (`timeout`): it has had
  /// its one outcome, so it counts as sent and `ok` is returned, and the
  /// caller does not send it again. Thread-safe.
  errc abandon(const message_id& corr, errc why) {
    std::lock_guard lock(mutex_);
    if (pending_.erase(corr) == 0) {
      sent();
      return errc::ok;
    }
    ++stats_.refused;
    forget_deadlines_if_idle();
    return why;
  }
  /// Counts a refusal decided before `open` (say, the request did not encode)
  /// and returns `why`. Thread-safe.
  errc refuse(errc why) {
    std::lock_guard lock(mutex_);
    ++stats_.refused;
    return why;
  }

  /// The opened request was sent: counts it and tracks its `deadline`,
  /// unless a reply already completed it. Schedules a timer only when this
  /// deadline is earlier than the one armed. Thread-safe.
  void arm(const message_id& corr, time_point deadline) {
    sent();
    std::lock_guard lock(mutex_);
    if (pending_.find(corr) == pending_.end()) return;  // already completed by a fast reply
    track(corr, deadline);
  }

  /// A reply (or a responder error) for `packet.correlation_id`: completes
  /// its request on the calling thread (running its callback or setting its
  /// future, outside the lock), or is dropped and counted as late, duplicate
  /// or unmatched. A gather completes once `want` replies or errors are in.
  /// Thread-safe.
  void on_reply(reply_packet<Reply>&& packet) {
    // Declared first, so destroyed last: it clears the entry (the callback
    // and everything it captured) before close() may stop waiting.
    std::optional<callback_run> run;
    errc status = errc::ok;
    envelope<Reply>* reply = nullptr;  // in packet, taken by the completion
    reply_error* err = nullptr;
    {
      std::unique_lock lock(mutex_);
      auto it = pending_.find(packet.correlation_id);
      if (it == pending_.end()) {
        auto d = done_.find(packet.correlation_id);
        if (d == done_.end()) ++stats_.unmatched_replies;
        else if (d->second == finished::replied) ++stats_.duplicate_replies;
        else ++stats_.late_replies;
        return;
      }
      entry& e = it->second;
      if (!e.future && e.multi) {  // (a future's entry: its multi is not read)
        if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) e.collected.replies.push_back(std::move(*env));
        else e.collected.errors.push_back(std::get<reply_error>(std::move(packet.body)));
        ++stats_.replied;
        if (e.collected.replies.size() + e.collected.errors.size() < e.want) return;
      } else if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) {
        reply = env;
        ++stats_.replied;
      } else {
        err = &std::get<reply_error>(packet.body);
        status = err->code == errc::ok ? errc::handler_error : err->code;
        ++stats_.errors;
      }
      remember(packet.correlation_id, finished::replied);
      if (it->second.future) {
        // The future form runs no user code: the outcome is built in place
        // in the future (the reply moved once), the node goes back to the
        // spares, all under this one lock; only the publication (a wake)
        // comes after it. Nothing here needs close() to wait.
        std::shared_ptr<future_state> fs = std::move(it->second.future);
        auto node = pending_.extract(it);
        recycle(std::move(node));
        forget_deadlines_if_idle();
        auto& o = fs->value.emplace();
        o.status = status;
        if (reply != nullptr) o.reply.emplace(std::move(*reply));
        if (err != nullptr) o.error.emplace(std::move(*err));
        lock.unlock();
        fs->publish();
        return;
      }
      run.emplace(*this, pending_.extract(it));
      forget_deadlines_if_idle();
    }
    entry& e = run->taken();
    reply_outcome<Reply> outcome;
    outcome.status = status;
    if (reply != nullptr) outcome.reply.emplace(std::move(*reply));
    if (err != nullptr) outcome.error.emplace(std::move(*err));
    complete(e, status, std::move(outcome));
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
    // relaxed: a statistic (see sent()).
    s.sent = sent_.load(std::memory_order_relaxed);
    s.pending = pending_.size();
    return s;
  }

 private:
  // The future form's fields first: next to the map node's link and key,
  // so a future request's round trip writes one line of its node.
  struct entry {
    std::shared_ptr<future_state> future;
    callback single;
    std::size_t want = 1;
    gather_callback multi;
    gather_outcome<Reply> collected;
    // Drops the callbacks (and what they captured) and the future. Writes
    // only the fields that hold something.
    void clear() noexcept {
      single = nullptr;  // (a no-op on an empty function: no store)
      if (future) future.reset();
      if (multi) {
        multi = nullptr;
        collected = gather_outcome<Reply>{};
        want = 1;
      }
    }
  };
  using map_type = std::unordered_map<message_id, entry>;
  using node_type = typename map_type::node_type;
  enum class finished : std::uint8_t { replied, expired };
  struct deadline_item {
    time_point when;
    message_id corr;
  };
  struct later {  // std::push_heap's "less" for a min-heap of deadlines
    bool operator()(const deadline_item& a, const deadline_item& b) const noexcept { return a.when > b.when; }
  };
  static constexpr std::size_t spare_nodes_max = 64;

  // Registers the calling thread as running a callback (construct under
  // mutex_, in the critical section that takes the entry out of pending_, so
  // close() sees every request either pending or running) and holds the
  // taken map node(s). Its destructor, also when a callback throws, clears
  // the entries (the callbacks' captures die first), then under the lock
  // unregisters the thread and keeps a node for reuse.
  class callback_run {
   public:
    callback_run(pending_requests& t, node_type node) : t_(&t) {
      t.running_.push_back(std::this_thread::get_id());
      node_ = std::move(node);
    }
    explicit callback_run(pending_requests& t) : t_(&t) { t.running_.push_back(std::this_thread::get_id()); }
    callback_run(const callback_run&) = delete;
    callback_run& operator=(const callback_run&) = delete;
    ~callback_run() {
      if (!node_.empty()) node_.mapped().clear();
      {
        std::lock_guard lock(t_->mutex_);
        auto it = std::find(t_->running_.begin(), t_->running_.end(), std::this_thread::get_id());
        if (it != t_->running_.end()) t_->running_.erase(it);
        if (!node_.empty()) t_->recycle(std::move(node_));
      }
      t_->idle_.notify_all();
    }
    entry& taken() noexcept { return node_.mapped(); }

   private:
    pending_requests* t_;
    node_type node_;
  };

  errc insert(const message_id& corr, entry&& e) {
    std::lock_guard lock(mutex_);
    return insert_locked(corr, std::move(e));
  }
  /// insert() and, when it succeeds, track(corr, deadline) under one lock.
  errc open_tracked(const message_id& corr, entry&& e, time_point deadline) {
    std::lock_guard lock(mutex_);
    const errc s = insert_locked(corr, std::move(e));
    if (s == errc::ok) track(corr, deadline);
    return s;
  }
  errc insert_locked(const message_id& corr, entry&& e) {
    if (pending_.size() >= max_pending_) {
      ++stats_.refused;
      return errc::busy;
    }
    if (!spare_.empty() || !spare_nodes_.empty()) {
      node_type n;
      if (!spare_.empty()) {
        n = std::move(spare_);
      } else {
        n = std::move(spare_nodes_.back());
        spare_nodes_.pop_back();
      }
      n.key() = corr;
      // A spare's entry is cleared: set only what this request uses.
      entry& m = n.mapped();
      if (e.future) m.future = std::move(e.future);
      if (e.single) m.single = std::move(e.single);
      if (e.multi) {
        m.multi = std::move(e.multi);
        m.want = e.want;
      }
      pending_.insert(std::move(n));
    } else {
      pending_.emplace(corr, std::move(e));
    }
    return errc::ok;
  }

  // Under mutex_. The FIFO of finished ids is a ring that grows to
  // done_capacity_; once full, the oldest id's map node is reused.
  void remember(const message_id& id, finished f) {
    if (done_ring_.size() < done_capacity_) {
      done_ring_.push_back(id);
      done_[id] = f;
      return;
    }
    message_id& slot = done_ring_[done_head_];
    done_head_ = (done_head_ + 1) % done_ring_.size();
    auto n = done_.extract(slot);
    slot = id;
    if (n.empty()) {
      done_[id] = f;
      return;
    }
    n.key() = id;
    n.mapped() = f;
    auto r = done_.insert(std::move(n));
    if (!r.inserted) r.position->second = f;
  }

  // Under mutex_: keeps a finished request's map node (its entry cleared)
  // for the next insert.
  void recycle(node_type&& n) noexcept {
    if (spare_.empty()) {
      n.mapped().clear();
      spare_ = std::move(n);
      return;
    }
    if (spare_nodes_.size() >= spare_nodes_max) return;  // n frees its node
    n.mapped().clear();
    spare_nodes_.push_back(std::move(n));
  }

  // Under mutex_: tracks a pending request's deadline, arming the timer
  // when it is the earliest.
  void track(const message_id& corr, time_point deadline) {
    if (closed_) return;
    // Stale heap items (requests finished before their deadline) are
    // dropped in bulk once they outnumber the live ones: amortized O(1).
    if (deadlines_.size() > 2 * pending_.size() + 64) compact_deadlines();
    deadlines_.push_back({deadline, corr});
    std::push_heap(deadlines_.begin(), deadlines_.end(), later{});
    if (!armed_ || deadline < armed_at_) arm_timer(deadline);
  }

  // Under mutex_: drops heap items whose request is no longer pending.
  void compact_deadlines() {
    std::erase_if(deadlines_, [&](const deadline_item& d) { return pending_.find(d.corr) == pending_.end(); });
    std::make_heap(deadlines_.begin(), deadlines_.end(), later{});
  }

  // Under mutex_: with nothing pending, every heap item is stale: drop
  // them. The armed timer stays (see the class comment): it fires once
  // into the idle table, finds no deadline and is not re-armed, unless a
  // new request came first (then it re-arms for that one, or that request
  // re-armed it for an earlier deadline).
  void forget_deadlines_if_idle() noexcept {
    if (pending_.empty()) deadlines_.clear();
  }

  // Under mutex_: (re)arms the one timer at `when`.
  void arm_timer(time_point when) {
    if (armed_) timers_->cancel(armed_id_);
    std::weak_ptr<pending_requests> weak = this->weak_from_this();
    armed_id_ = timers_->schedule_at(when, [weak] {
      if (auto self = weak.lock()) self->on_deadline();
    });
    armed_ = true;
    armed_at_ = when;
  }

  void complete(entry& e, errc status, reply_outcome<Reply>&& o) {
    auto call = [&] {
      if (e.future) {
        e.future->set(std::move(o));
      } else if (e.single) {
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
  void complete_with(entry& e, errc status) {
    reply_outcome<Reply> o;
    o.status = status;
    complete(e, status, std::move(o));
  }

  // The timer: expires every request due now (a deadline equal to now is
  // due), re-arms for the next deadline, then runs the timeouts outside the
  // lock, on this (the timer's) thread.
  void on_deadline() {
    std::optional<callback_run> run;  // first: destroyed after the callbacks (see on_reply)
    std::vector<entry> expired;
    {
      std::lock_guard lock(mutex_);
      armed_ = false;
      const time_point now = get_clock().now();
      while (!deadlines_.empty() && deadlines_.front().when <= now) {
        const message_id id = deadlines_.front().corr;
        std::pop_heap(deadlines_.begin(), deadlines_.end(), later{});
        deadlines_.pop_back();
        auto it = pending_.find(id);
        if (it == pending_.end()) continue;  // finished before its deadline
        expired.push_back(std::move(it->second));
        pending_.erase(it);
        remember(id, finished::expired);
        ++stats_.timed_out;
      }
      while (!deadlines_.empty() && pending_.find(deadlines_.front().corr) == pending_.end()) {
        std::pop_heap(deadlines_.begin(), deadlines_.end(), later{});
        deadlines_.pop_back();
      }
      if (!closed_ && !deadlines_.empty()) arm_timer(deadlines_.front().when);
      if (expired.empty()) return;
      run.emplace(*this);
    }
    // Each timeout runs even if an earlier callback throws (propagate):
    // the rest are completed first, then the first exception is rethrown.
    std::exception_ptr first;
    for (auto& e : expired) {
#if POSTBOX_HAS_EXCEPTIONS
      try {
        complete_with(e, errc::timeout);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
#else
      complete_with(e, errc::timeout);
#endif
      e = entry{};
    }
#if POSTBOX_HAS_EXCEPTIONS
    if (first) std::rethrow_exception(first);
#endif
  }

  void cancel_all() {
    map_type taken;
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
      if (armed_) timers_->cancel(armed_id_);
      armed_ = false;
      deadlines_.clear();
      taken.swap(pending_);
      stats_.canceled += taken.size();
    }
    for (auto& [id, e] : taken) complete_with(e, errc::canceled);
  }

  void wait_callbacks() {
    const auto self = std::this_thread::get_id();
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [&] {
      return std::all_of(running_.begin(), running_.end(), [&](const std::thread::id& t) { return t == self; });
    });
  }

  // Layout (issue 18): a round trip writes the table on two threads, the
  // requesting one (open) and the replying one (on_reply). What both write
  // on that path sits together from one cache-line boundary (3 x 64 bytes
  // for requester_stats' table: mutex_, the spare node, pending_, sent_,
  // the deadline heap's header, the timer fields); what only the replying
  // side writes (counters, the finished-id ring) starts on a boundary of its
  // own, so it stays in that core's cache; the read-only fields come first.
  timer_service* timers_;
  const std::size_t max_pending_;
  const std::size_t done_capacity_;  // 4 x max_pending_ (at least 4), saturated
  const callback_exceptions on_throw_;
  alignas(detail::cache_line_size) mutable std::mutex mutex_;  // guards everything below but sent_
  std::vector<node_type> spare_nodes_;  // recycled pending_ nodes beyond spare_ (at most spare_nodes_max)
  map_type pending_;
  /// Requests sent: bumped (relaxed) by sent() and arm() on the requesting
  /// thread, read (relaxed) by stats(). A statistic; publishes nothing.
  std::atomic<std::uint64_t> sent_{0};
  std::vector<deadline_item> deadlines_;  // min-heap (later{}); may hold finished requests' items
  time_point armed_at_{};
  timer_service::timer_id armed_id_ = 0;
  bool armed_ = false;   // a timer is scheduled, at armed_at_, id armed_id_
  bool closed_ = false;  // close() began: nothing is armed any more
  // The first spare node: a strict ping-pong passes one node back and forth
  // here, not through spare_nodes_' heap array (one cache line fewer).
  node_type spare_;
  alignas(detail::cache_line_size) Stats stats_;  // all but sent
  std::unordered_map<message_id, finished> done_;  // recently finished, for late/duplicate
  std::vector<message_id> done_ring_;              // done_'s FIFO eviction order (a ring once full)
  std::size_t done_head_ = 0;                      // oldest entry of done_ring_ once full
  // Threads running a completion callback now (one entry per run); close()
  // waits on idle_ until only its own thread is left.
  std::vector<std::thread::id> running_;
  std::condition_variable idle_;
};

POSTBOX_END_NAMESPACE
