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
#include <postbox/detail/block_pool.hpp>
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

/// A new future state (and its reference counts) in one block from
/// block_pool: a steady flow of requests allocates none, whichever thread
/// drops a state last (the waiter after get(), or the replying thread). May
/// allocate (an empty pool); thread-safe.
template <class V>
[[nodiscard]] std::shared_ptr<rr_future_state<V>> make_future_state() {
  return std::allocate_shared<rr_future_state<V>>(pool_allocator<rr_future_state<V>>{});
}
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
  auto fs = make_future_state<V>();
  return {[fs](V v) { fs->set(std::move(v)); }, reply_future<V>(fs)};
}
}  // namespace detail

namespace detail {
/// A slot callback running on this thread (pending_requests' reply path):
/// the table and the slot, on the running thread's stack, linked from
/// `slot_runs_here`. close() skips these (a callback may destroy its own
/// requester); it waits for every other slot run to end.
struct slot_run_frame {
  const void* table;
  std::size_t slot;
  slot_run_frame* next;
};
/// The innermost slot callback running on this thread, or null. Only this
/// thread reads or writes it.
inline thread_local slot_run_frame* slot_runs_here = nullptr;
}  // namespace detail

namespace detail {
/// The ids of recently finished requests and how each one finished, first
/// in, first out, at most `capacity`: a ring of entries (the FIFO) and an
/// open-addressing index of ring positions (linear probing, deletion by
/// backward shift, at most half full). Remembering an id evicts the oldest
/// once the ring is full. Allocates only while the ring and the index grow
/// to their size; a lookup or a remember is a few probes of one array. Not
/// thread-safe (the pending table's lock guards it).
template <class Kind>
class recent_ids {
 public:
  explicit recent_ids(std::size_t capacity) noexcept : capacity_(capacity == 0 ? 1 : capacity) {}

  /// Remembers `id` as finished `kind`. (An id remembered twice takes two
  /// entries; `find` returns one of them. The pending table never does that.)
  void remember(const message_id& id, Kind kind) {
    if (ring_.size() < capacity_) {
      if (2 * (ring_.size() + 1) > index_.size()) grow_index(2 * (ring_.size() + 1));
      ring_.push_back({id, kind});
      index_insert(ring_.size() - 1);
      return;
    }
    index_erase(oldest_);
    ring_[oldest_] = {id, kind};
    index_insert(oldest_);
    oldest_ = oldest_ + 1 == ring_.size() ? 0 : oldest_ + 1;
  }
  /// How `id` finished, or null if it is not (or no longer) remembered.
  [[nodiscard]] const Kind* find(const message_id& id) const noexcept {
    const std::size_t at = find_slot(id);
    return at == npos ? nullptr : &ring_[index_[at] - 1].kind;
  }

 private:
  struct item {
    message_id id;
    Kind kind;
  };
  static constexpr std::size_t npos = std::numeric_limits<std::size_t>::max();

  std::size_t home(const message_id& id) const noexcept { return std::hash<message_id>{}(id) & mask_; }
  // The index slot holding `id`'s ring position, or npos.
  std::size_t find_slot(const message_id& id) const noexcept {
    if (index_.empty()) return npos;
    for (std::size_t h = home(id);; h = (h + 1) & mask_) {
      if (index_[h] == 0) return npos;
      if (ring_[index_[h] - 1].id == id) return h;
    }
  }
  void index_insert(std::size_t pos) noexcept {
    std::size_t h = home(ring_[pos].id);
    while (index_[h] != 0) h = (h + 1) & mask_;
    index_[h] = pos + 1;
  }
  // Removes ring position `pos` from the index; the entries after it in its
  // probe run move back into the hole when the hole is on their own path.
  void index_erase(std::size_t pos) noexcept {
    std::size_t hole = home(ring_[pos].id);
    while (index_[hole] != pos + 1) hole = (hole + 1) & mask_;
    for (std::size_t j = (hole + 1) & mask_; index_[j] != 0; j = (j + 1) & mask_) {
      const std::size_t want = home(ring_[index_[j] - 1].id);
      if (((j - want) & mask_) >= ((j - hole) & mask_)) {
        index_[hole] = index_[j];
        hole = j;
      }
    }
    index_[hole] = 0;
  }
  void grow_index(std::size_t at_least) {
    std::size_t n = index_.empty() ? 16 : 2 * index_.size();
    while (n < at_least) n *= 2;
    index_.assign(n, 0);
    mask_ = n - 1;
    for (std::size_t pos = 0; pos < ring_.size(); ++pos) index_insert(pos);
  }

  std::size_t capacity_;
  std::vector<item> ring_;           // the FIFO: grows to capacity_, then a ring from oldest_
  std::size_t oldest_ = 0;           // the next entry to evict once ring_ is full
  std::vector<std::size_t> index_;   // ring position + 1 per slot, 0 = empty; a power of two
  std::size_t mask_ = 0;             // index_.size() - 1
};
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
/// after it, outside the lock. A request can instead take a slot
/// (`open_slot`, with a future or a callback): its correlation id addresses
/// the slot, and one CAS on the slot's state word decides the outcome, so a
/// reply completes it without the lock. Finished correlation ids are
/// remembered (at most 4 x `max_pending`, FIFO; a slot's last one until the
/// slot is reused) to tell late and duplicate replies from unmatched ones;
/// all three are dropped and counted. `Stats` is `requester_stats` or a
/// transport's extension of it.
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
        on_throw_(on_throw),
        slots_usable_(max_pending < slot_limit ? max_pending : slot_limit),
        chunks_(std::make_unique<std::atomic<request_slot*>[]>((slots_usable_ + slots_per_chunk - 1) / slots_per_chunk)),
        done_(done_capacity_) {}
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
  /// As `open(corr, future, deadline)`, on a slot of the table: the reply
  /// that completes it takes no lock (one CAS on the slot). Rewrites the low
  /// 12 bits of `corr` (random bits of a UUIDv7, so the id stays unique) to
  /// the slot's index: the transport sends the `corr` it gets back. With
  /// every slot taken (4096, or `max_pending` if fewer) the request is
  /// opened as `open(corr, future, deadline)` opens it, `corr` unchanged.
  /// `busy` (counted as refused) at the pending limit. After sending,
  /// `sent()` or `abandon`. Allocates only while the slots grow (32 at a
  /// time). Thread-safe.
  [[nodiscard]] errc open_slot(message_id& corr, std::shared_ptr<future_state> future, time_point deadline) {
    return open_slot_with(corr, std::move(future), deadline);
  }
  /// As the future form of `open_slot`, completed through `cb`: a reply runs
  /// it on the replying thread after one CAS on the slot, without the
  /// table's lock; a timeout on the timer's thread, a cancel on the closing
  /// one. The slot is free for the next request (it counts no more against
  /// `max_pending`) as soon as the reply is decided; it is reused once the
  /// callback returned. `busy`: `cb` is never called. Thread-safe.
  [[nodiscard]] errc open_slot(message_id& corr, callback cb, time_point deadline) {
    return open_slot_with(corr, std::move(cb), deadline);
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
    if (pending_.erase(corr) != 0) {
      ++stats_.refused;
      forget_deadlines_if_idle();
      return why;
    }
    if (request_slot* s = slot_of(corr)) {
      std::uint64_t st = s->state.load(std::memory_order_acquire);
      if (claim_slot(*s, st)) {
        s->completion.template emplace<std::monostate>();  // (a callback is never called)
        slot_counted_[index_of(corr)] = 0;
        --slots_in_use_;
        // release: the partner of open_slot's acquire load (the completion
        // is gone); tagged free, the id is not remembered (it was never sent).
        s->state.store(make_state(gen_of(st), slot_free), std::memory_order_release);
        ++stats_.refused;
        return why;
      }
    }
    sent();
    return errc::ok;
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
    if (complete_slot(packet)) return;  // a slot's request (future or callback): no lock
    // Declared first, so destroyed last: it clears the entry (the callback
    // and everything it captured) before close() may stop waiting.
    std::optional<callback_run> run;
    {
      std::unique_lock lock(mutex_);
      auto it = pending_.find(packet.correlation_id);
      if (it == pending_.end()) {
        if (request_slot* s = slot_of(packet.correlation_id)) {
          // The slot still holds this id (ids change only under this lock).
          // acquire: pairs with the store that ended the request.
          const std::uint64_t tag = tag_of(s->state.load(std::memory_order_acquire));
          if (is_pending(tag)) {  // (not seen pending by complete_slot: cannot happen; try again)
            lock.unlock();
            on_reply(std::move(packet));
            return;
          }
          if (tag != slot_free) {  // claimed or running: another reply completed it
            ++(tag == slot_expired ? stats_.late_replies : stats_.duplicate_replies);
            return;
          }
        }
        const finished* d = done_.find(packet.correlation_id);
        if (d == nullptr) ++stats_.unmatched_replies;
        else if (*d == finished::replied) ++stats_.duplicate_replies;
        else ++stats_.late_replies;
        return;
      }
      entry& e = it->second;
      if (!e.future && e.multi) {  // (a future's entry: its multi is not read)
        if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) e.collected.replies.push_back(std::move(*env));
        else e.collected.errors.push_back(std::get<reply_error>(std::move(packet.body)));
        ++stats_.replied;
        if (e.collected.replies.size() + e.collected.errors.size() < e.want) return;
      } else {
        ++(std::holds_alternative<envelope<Reply>>(packet.body) ? stats_.replied : stats_.errors);
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
        fill_outcome(fs->value.emplace(), packet);
        lock.unlock();
        fs->publish();
        return;
      }
      run.emplace(*this, pending_.extract(it));
      forget_deadlines_if_idle();
    }
    entry& e = run->taken();
    if (e.single) {  // the outcome made in the callback's parameter, as on a slot
      call_guarded([&] { e.single(outcome_of(packet)); });
      return;
    }
    complete_with(e, errc::ok);  // a gather: its collected replies
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
    // relaxed: statistics (see sent(), slot_replied_).
    s.sent = sent_.load(std::memory_order_relaxed);
    s.replied += slot_replied_.load(std::memory_order_relaxed);
    s.errors += slot_errors_.load(std::memory_order_relaxed);
    s.pending = pending_.size();
    for (std::size_t i = 0; i < slots_allocated_; ++i) {
      // relaxed: a snapshot count; nothing is read through it.
      const std::uint64_t tag = tag_of(slot_at(i)->state.load(std::memory_order_relaxed));
      if (in_flight(tag)) ++s.pending;
    }
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
  static constexpr std::uint32_t map_item = std::numeric_limits<std::uint32_t>::max();
  struct deadline_item {
    time_point when;
    message_id corr;
    std::uint32_t slot = map_item;  // a slot's index, or map_item (the request is in pending_)
    std::uint64_t gen = 0;          // the slot's generation for this request
  };

  // The slots (open_slot). A slot's correlation id carries its index in
  // its low 12 bits; its state word decides the outcome, so a reply
  // completes it with one CAS, without the table's lock.
  static constexpr unsigned slot_index_bits = 12;
  static constexpr std::size_t slot_limit = std::size_t{1} << slot_index_bits;
  static constexpr std::uint64_t slot_index_mask = slot_limit - 1;
  static constexpr std::size_t slots_per_chunk = 32;
  static constexpr std::size_t no_slot = std::numeric_limits<std::size_t>::max();
  // state = generation << 4 | tag. A request is free/replied/expired(g) ->
  // pending(g + 1) (open_slot; pending_callback when it holds a callback)
  // -> claimed (one CAS: the one outcome is decided) -> replied, expired,
  // or free (canceled, abandoned). A callback completed by a reply goes
  // pending_callback -> running (that CAS) -> replied once the callback
  // returned; close() marks a running slot watched, and the reply that ends
  // a watched run wakes it.
  static constexpr std::uint64_t slot_free = 0;
  static constexpr std::uint64_t slot_pending = 1;
  static constexpr std::uint64_t slot_claimed = 2;
  static constexpr std::uint64_t slot_replied = 3;
  static constexpr std::uint64_t slot_expired = 4;
  static constexpr std::uint64_t slot_running = 5;
  static constexpr std::uint64_t slot_running_watched = 6;
  static constexpr std::uint64_t slot_pending_callback = 7;
  static constexpr std::uint64_t tag_of(std::uint64_t state) noexcept { return state & 15u; }
  static constexpr std::uint64_t gen_of(std::uint64_t state) noexcept { return state >> 4; }
  static constexpr std::uint64_t make_state(std::uint64_t gen, std::uint64_t tag) noexcept { return gen << 4 | tag; }
  static constexpr bool is_pending(std::uint64_t tag) noexcept {
    return tag == slot_pending || tag == slot_pending_callback;
  }
  static constexpr bool is_running(std::uint64_t tag) noexcept {
    return tag == slot_running || tag == slot_running_watched;
  }
  // One cache line (with libstdc++'s 32-byte std::function): what a round
  // trip writes of the table, on both sides.
  struct alignas(detail::cache_line_size) request_slot {
    /// Written by open_slot under mutex_ (release: publishes id_* and the
    /// completion; partner: claim_slot's and the classifiers' acquire
    /// loads), by claim_slot's CAS (acquire: pairs with that release) and,
    /// once claimed, by the claimer's release store of the final tag
    /// (partner: open_slot's acquire load before it reuses the slot, so the
    /// completion was moved out before it is written again); by close()'s
    /// CAS running -> running_watched (slot_runs_ended) and the reply's
    /// release exchange that ends a run (partner: slot_runs_ended's acquire
    /// load and CAS, so the callback's effects are visible once close()
    /// sees the run ended).
    std::atomic<std::uint64_t> state{0};
    /// The request's correlation id. Relaxed: written only under mutex_
    /// while the slot is not pending (ordered by state's release store);
    /// a claimer reads them between its acquire load of pending(g) and its
    /// CAS, whose success proves no later request's id was written since.
    std::atomic<std::uint64_t> id_high{0};
    std::atomic<std::uint64_t> id_low{0};
    // Written while free (open_slot, under mutex_); moved out by the claimer.
    std::variant<std::monostate, std::shared_ptr<future_state>, callback> completion;
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

  // The slot at `index`, or null if its chunk is not there (yet). Never
  // blocks; thread-safe.
  request_slot* slot_at(std::size_t index) const noexcept {
    if (index >= slots_usable_) return nullptr;
    // acquire: pairs with take_free_slot's release store of the chunk.
    request_slot* chunk = chunks_[index / slots_per_chunk].load(std::memory_order_acquire);
    return chunk == nullptr ? nullptr : chunk + index % slots_per_chunk;
  }
  // The slot index `corr` carries (a slot's request id, or not).
  static std::size_t index_of(const message_id& corr) noexcept {
    return static_cast<std::size_t>(corr.low() & slot_index_mask);
  }
  // Under mutex_ (ids change only under it): the slot whose request had or
  // has `corr`, or null.
  request_slot* slot_of(const message_id& corr) const noexcept {
    request_slot* s = slot_at(index_of(corr));
    if (s == nullptr || s->id_high.load(std::memory_order_relaxed) != corr.high() ||
        s->id_low.load(std::memory_order_relaxed) != corr.low())
      return nullptr;
    return s;
  }
  // Decides a slot's one outcome: pending(g), as `state` read it (with an
  // acquire load), -> claimed(g) (or `to`). True for the one caller that
  // wins; it then owns the slot until it stores the final tag.
  static bool claim_slot(request_slot& s, std::uint64_t& state, std::uint64_t to = slot_claimed) noexcept {
    if (!is_pending(tag_of(state))) return false;
    // acquire: pairs with open_slot's release store (the completion is visible).
    return s.state.compare_exchange_strong(state, make_state(gen_of(state), to), std::memory_order_acquire,
                                           std::memory_order_relaxed);
  }
  // A reply on the slot path, without the lock: completes the slot's
  // request if it is still pending with this id. False: not a slot's
  // pending request (the caller takes the locked path and classifies it).
  bool complete_slot(reply_packet<Reply>& packet) {
    const message_id& corr = packet.correlation_id;
    request_slot* s = slot_at(index_of(corr));
    if (s == nullptr) return false;
    // acquire: pairs with open_slot's release store (id_* and the completion).
    std::uint64_t st = s->state.load(std::memory_order_acquire);
    if (!is_pending(tag_of(st))) return false;
    if (s->id_high.load(std::memory_order_relaxed) != corr.high() ||
        s->id_low.load(std::memory_order_relaxed) != corr.low())
      return false;
    if (tag_of(st) == slot_pending_callback) return run_slot_callback(*s, st, packet);
    if (!claim_slot(*s, st)) return false;
    std::shared_ptr<future_state> fs = std::move(*std::get_if<std::shared_ptr<future_state>>(&s->completion));
    // relaxed: statistics, read by stats().
    (std::holds_alternative<envelope<Reply>>(packet.body) ? slot_replied_ : slot_errors_)
        .fetch_add(1, std::memory_order_relaxed);
    // release: the partner of open_slot's acquire load (future moved out).
    s->state.store(make_state(gen_of(st), slot_replied), std::memory_order_release);
    fill_outcome(fs->value.emplace(), packet);  // in place: the reply moved once
    fs->publish();
    return true;
  }
  // complete_slot for a callback: claims pending_callback(g) -> running(g),
  // runs the callback on this thread, then ends the run (replied(g)),
  // waking close() if it waits for it. The slot counts no more against
  // max_pending while the callback runs (it may make the next request),
  // and is reused only after the run ended.
  bool run_slot_callback(request_slot& s, std::uint64_t st, reply_packet<Reply>& packet) {
    if (!claim_slot(s, st, slot_running)) return false;
    // Declared first, so destroyed last: the callback and its captures die
    // before the run is seen ended.
    struct run_end {
      pending_requests* table;
      request_slot* slot;
      std::uint64_t gen;
      detail::slot_run_frame frame;
      ~run_end() {
        detail::slot_runs_here = frame.next;
        // release: the partner of close()'s acquire load in
        // slot_runs_ended (the callback's effects happen before its return
        // is seen) and of open_slot's (the slot is reused after this).
        const std::uint64_t was = slot->state.exchange(make_state(gen, slot_replied), std::memory_order_release);
        if (tag_of(was) == slot_running_watched) table->wake_closer();
      }
    } end{this, &s, gen_of(st),
          {this, index_of(packet.correlation_id), detail::slot_runs_here}};
    detail::slot_runs_here = &end.frame;
    callback cb = std::move(*std::get_if<callback>(&s.completion));
    s.completion.template emplace<std::monostate>();
    // relaxed: statistics, read by stats().
    (std::holds_alternative<envelope<Reply>>(packet.body) ? slot_replied_ : slot_errors_)
        .fetch_add(1, std::memory_order_relaxed);
    // The outcome is made in the callback's parameter (one move of the reply
    // fewer than a named outcome passed on).
    call_guarded([&] { cb(outcome_of(packet)); });
    return true;
  }
  // Fills `o` (a fresh outcome) from a reply packet, its reply or error
  // moved out of it.
  static void fill_outcome(reply_outcome<Reply>& o, reply_packet<Reply>& packet) {
    if (auto* env = std::get_if<envelope<Reply>>(&packet.body)) {
      o.reply.emplace(detail::relocated_envelope<Reply>{env});  // in place; empty strings not moved
    } else {
      auto& err = std::get<reply_error>(packet.body);
      o.status = err.code == errc::ok ? errc::handler_error : err.code;
      o.error.emplace(std::move(err));
    }
  }
  // The outcome a reply packet makes (returned, for a callback's parameter).
  static reply_outcome<Reply> outcome_of(reply_packet<Reply>& packet) {
    reply_outcome<Reply> o;
    fill_outcome(o, packet);
    return o;
  }
  // A run of a watched slot callback ended: wakes close() (slot_runs_ended).
  // The lock orders the wake after close()'s check of the slot.
  void wake_closer() {
    { std::lock_guard lock(mutex_); }
    idle_.notify_all();
  }
  // open_slot: Completion is the future's state or a callback.
  template <class Completion>
  errc open_slot_with(message_id& corr, Completion&& completion, time_point deadline) {
    std::lock_guard lock(mutex_);
    if (in_flight_at_limit()) {
      ++stats_.refused;
      return errc::busy;
    }
    const std::size_t i = take_free_slot();
    if (i == no_slot) {
      entry e;
      if constexpr (std::is_same_v<std::decay_t<Completion>, callback>) e.single = std::move(completion);
      else e.future = std::move(completion);
      const errc s = insert_locked(corr, std::move(e));
      if (s == errc::ok) track(corr, deadline);
      return s;
    }
    request_slot& s = *slot_at(i);
    // acquire: pairs with the release store that ended the slot's last
    // request (the claimer's; a reply's after its callback returned), after
    // which its completion was moved out.
    const std::uint64_t old = s.state.load(std::memory_order_acquire);
    if (tag_of(old) == slot_replied || tag_of(old) == slot_expired) {
      remember(message_id(s.id_high.load(std::memory_order_relaxed), s.id_low.load(std::memory_order_relaxed)),
               tag_of(old) == slot_replied ? finished::replied : finished::expired);
    }
    forget_deadlines_if_idle();
    corr = message_id(corr.high(), (corr.low() & ~slot_index_mask) | i);
    s.id_high.store(corr.high(), std::memory_order_relaxed);
    s.id_low.store(corr.low(), std::memory_order_relaxed);
    s.completion.template emplace<std::decay_t<Completion>>(std::move(completion));
    slot_counted_[i] = 1;
    ++slots_in_use_;
    const std::uint64_t gen = gen_of(old) + 1;
    // release: publishes the id and the completion to claim_slot's acquire
    // load (a replying thread, the timer, close(), abandon()).
    constexpr std::uint64_t pending_tag =
        std::is_same_v<std::decay_t<Completion>, callback> ? slot_pending_callback : slot_pending;
    s.state.store(make_state(gen, pending_tag), std::memory_order_release);
    track_item({deadline, corr, static_cast<std::uint32_t>(i), gen});
    return errc::ok;
  }
  // Under mutex_: pending_ plus the slots taken and not yet seen finished
  // reach max_pending_ (slots seen finished first, only at the limit).
  bool in_flight_at_limit() noexcept {
    if (pending_.size() + slots_in_use_ < max_pending_) return false;
    for (std::size_t i = 0; i < slots_allocated_; ++i) (void)observe_slot(i);
    return pending_.size() + slots_in_use_ >= max_pending_;
  }
  static constexpr bool in_flight(std::uint64_t tag) noexcept { return is_pending(tag) || tag == slot_claimed; }
  // Under mutex_: slot `i`'s tag now; uncounts the slot from slots_in_use_
  // once it is seen finished (not in flight). A slot whose reply's callback
  // still runs counts as finished for max_pending but is not reused until
  // the run ended.
  std::uint64_t observe_slot(std::size_t i) noexcept {
    // relaxed: open_slot's acquire load orders the reuse itself.
    const std::uint64_t tag = tag_of(slot_at(i)->state.load(std::memory_order_relaxed));
    if (!in_flight(tag) && slot_counted_[i] != 0) {
      slot_counted_[i] = 0;
      --slots_in_use_;
    }
    return tag;
  }
  // Under mutex_: a slot that holds no request, from the last one taken on
  // (a strict ping-pong reuses one slot, one cache line), growing the slots
  // by a chunk when all are taken; no_slot at slots_usable_. Allocates
  // only to grow.
  std::size_t take_free_slot() {
    for (std::size_t k = 0; k < slots_allocated_; ++k) {
      std::size_t i = cursor_ + k;
      if (i >= slots_allocated_) i -= slots_allocated_;
      const std::uint64_t tag = observe_slot(i);
      if (!in_flight(tag) && !is_running(tag)) {
        cursor_ = i;
        return i;
      }
    }
    if (slots_allocated_ == slots_usable_) return no_slot;
    const std::size_t i = slots_allocated_;
    chunk_storage_.reserve(chunk_storage_.size() + 1);
    chunk_storage_.push_back(std::make_unique<request_slot[]>(slots_per_chunk));
    slot_counted_.resize(std::min(slots_usable_, i + slots_per_chunk), 0);
    // release: publishes the constructed slots to slot_at's acquire load.
    chunks_[i / slots_per_chunk].store(chunk_storage_.back().get(), std::memory_order_release);
    slots_allocated_ = std::min(slots_usable_, i + slots_per_chunk);
    cursor_ = i;
    return i;
  }
  // Under mutex_: a heap item's request is still waiting for its outcome.
  bool live(const deadline_item& d) const noexcept {
    if (d.slot == map_item) return pending_.find(d.corr) != pending_.end();
    // relaxed: a hint for dropping stale items; the timer claims with a CAS.
    const std::uint64_t st = slot_at(d.slot)->state.load(std::memory_order_relaxed);
    return gen_of(st) == d.gen && is_pending(tag_of(st));
  }

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
    if (in_flight_at_limit()) {
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

  // Under mutex_: the FIFO of finished ids (at most done_capacity_).
  void remember(const message_id& id, finished f) { done_.remember(id, f); }

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
  void track(const message_id& corr, time_point deadline) { track_item({deadline, corr}); }
  void track_item(const deadline_item& item) {
    if (closed_) return;
    // Stale heap items (requests finished before their deadline) are
    // dropped in bulk once they outnumber the live ones: amortized O(1).
    if (deadlines_.size() > 2 * (pending_.size() + slots_in_use_) + 64) compact_deadlines();
    deadlines_.push_back(item);
    std::push_heap(deadlines_.begin(), deadlines_.end(), later{});
    if (!armed_ || item.when < armed_at_) arm_timer(item.when);
  }

  // Under mutex_: drops heap items whose request is no longer pending.
  void compact_deadlines() {
    std::erase_if(deadlines_, [&](const deadline_item& d) { return !live(d); });
    std::make_heap(deadlines_.begin(), deadlines_.end(), later{});
  }

  // Under mutex_: with nothing pending, every heap item is stale: drop
  // them. The armed timer stays (see the class comment): it fires once
  // into the idle table, finds no deadline and is not re-armed, unless a
  // new request came first (then it re-arms for that one, or that request
  // re-armed it for an earlier deadline).
  void forget_deadlines_if_idle() noexcept {
    if (pending_.empty() && slots_in_use_ == 0) deadlines_.clear();
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
    call_guarded([&] {
      if (e.future) {
        e.future->set(std::move(o));
      } else if (e.single) {
        e.single(std::move(o));
      } else if (e.multi) {
        e.collected.status = status;
        e.multi(std::move(e.collected));
      }
    });
  }
  // Runs a completion as on_throw_ says.
  template <class Call>
  void call_guarded(Call&& call) {
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
    std::vector<std::shared_ptr<future_state>> expired_slots;
    {
      std::lock_guard lock(mutex_);
      armed_ = false;
      const time_point now = get_clock().now();
      while (!deadlines_.empty() && deadlines_.front().when <= now) {
        const deadline_item d = deadlines_.front();
        std::pop_heap(deadlines_.begin(), deadlines_.end(), later{});
        deadlines_.pop_back();
        if (d.slot != map_item) {
          request_slot& s = *slot_at(d.slot);
          // acquire: as in complete_slot.
          std::uint64_t st = s.state.load(std::memory_order_acquire);
          if (gen_of(st) != d.gen || !claim_slot(s, st)) continue;  // finished first
          take_claimed(s, d.gen, slot_expired, expired, expired_slots);
          ++stats_.timed_out;
          continue;
        }
        auto it = pending_.find(d.corr);
        if (it == pending_.end()) continue;  // finished before its deadline
        expired.push_back(std::move(it->second));
        pending_.erase(it);
        remember(d.corr, finished::expired);
        ++stats_.timed_out;
      }
      while (!deadlines_.empty() && !live(deadlines_.front())) {
        std::pop_heap(deadlines_.begin(), deadlines_.end(), later{});
        deadlines_.pop_back();
      }
      if (!closed_ && !deadlines_.empty()) arm_timer(deadlines_.front().when);
      if (expired.empty() && expired_slots.empty()) return;
      run.emplace(*this);  // a slot's callback runs as a map entry's does
    }
    // A slot's future runs no user code: set it first.
    for (auto& fs : expired_slots) complete_future(*fs, errc::timeout);
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
    std::vector<std::shared_ptr<future_state>> taken_slots;
    std::vector<entry> taken_callbacks;
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
      if (armed_) timers_->cancel(armed_id_);
      armed_ = false;
      deadlines_.clear();
      taken.swap(pending_);
      for (std::size_t i = 0; i < slots_allocated_; ++i) {
        request_slot& s = *slot_at(i);
        // acquire: as in complete_slot. A slot a reply has claimed is that
        // reply's to complete.
        std::uint64_t st = s.state.load(std::memory_order_acquire);
        if (claim_slot(s, st)) take_claimed(s, gen_of(st), slot_free, taken_callbacks, taken_slots);
      }
      stats_.canceled += taken.size() + taken_slots.size() + taken_callbacks.size();
    }
    for (auto& fs : taken_slots) complete_future(*fs, errc::canceled);
    for (auto& e : taken_callbacks) complete_with(e, errc::canceled);
    for (auto& [id, e] : taken) complete_with(e, errc::canceled);
  }
  // Under mutex_, slot `s` claimed by the caller for its request of
  // generation `gen`: moves the completion out (a callback into an entry of
  // `callbacks`, run as a map entry's is; a future's state into `futures`)
  // and ends the request with `final_tag` (expired: its id is remembered at
  // the slot's reuse; free: not).
  static void take_claimed(request_slot& s, std::uint64_t gen, std::uint64_t final_tag, std::vector<entry>& callbacks,
                           std::vector<std::shared_ptr<future_state>>& futures) {
    if (auto* cb = std::get_if<callback>(&s.completion)) {
      entry e;
      e.single = std::move(*cb);
      callbacks.push_back(std::move(e));
    } else {
      futures.push_back(std::move(*std::get_if<std::shared_ptr<future_state>>(&s.completion)));
    }
    s.completion.template emplace<std::monostate>();
    // release: the partner of open_slot's acquire load (completion moved out).
    s.state.store(make_state(gen, final_tag), std::memory_order_release);
  }
  // Sets a slot's future to an outcome without a reply. Runs no user code.
  static void complete_future(future_state& fs, errc status) {
    reply_outcome<Reply> o;
    o.status = status;
    fs.set(std::move(o));
  }

  void wait_callbacks() {
    const auto self = std::this_thread::get_id();
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [&] {
      return std::all_of(running_.begin(), running_.end(), [&](const std::thread::id& t) { return t == self; }) &&
             slot_runs_ended();
    });
  }
  // Under mutex_ (close()): no slot callback runs on another thread; a
  // run found still going is marked watched, so the reply that ends it
  // wakes idle_ (wake_closer takes this lock first: no lost wake-up).
  bool slot_runs_ended() noexcept {
    for (std::size_t i = 0; i < slots_allocated_; ++i) {
      request_slot& s = *slot_at(i);
      // acquire: pairs with the release exchange that ends a run (the
      // callback's effects are visible to close()'s caller).
      std::uint64_t st = s.state.load(std::memory_order_acquire);
      for (;;) {
        const std::uint64_t tag = tag_of(st);
        if (!is_running(tag)) break;
        if (running_here(i)) break;
        if (tag == slot_running_watched) return false;
        // acquire (both ways, as the load above): a run that ended meanwhile
        // fails the CAS and is seen ended; one marked wakes us when it ends.
        if (s.state.compare_exchange_weak(st, make_state(gen_of(st), slot_running_watched),
                                          std::memory_order_acquire, std::memory_order_acquire))
          return false;
      }
    }
    return true;
  }
  // Slot `i`'s callback runs on this thread (further up its stack).
  bool running_here(std::size_t i) const noexcept {
    for (const detail::slot_run_frame* f = detail::slot_runs_here; f != nullptr; f = f->next)
      if (f->table == this && f->slot == i) return true;
    return false;
  }

  // Layout (issue 18): a round trip writes the table on two threads, the
  // requesting one (open) and the replying one (on_reply). What both write
  // on that path sits together from one cache-line boundary (3 x 64 bytes
  // for requester_stats' table: mutex_, the spare node, pending_, sent_,
  // the deadline heap's header, the timer fields); what only the replying
  // side writes (counters, the finished-id ring) starts on a boundary of its
  // own, so it stays in that core's cache; the read-only fields come first.
  // The read-only fields start a line of their own: the shared_ptr control
  // block before them takes a replying thread's count increment and
  // decrement (the sink's weak_ptr lock) on every reply.
  alignas(detail::cache_line_size) timer_service* timers_;
  const std::size_t max_pending_;
  const std::size_t done_capacity_;  // 4 x max_pending_ (at least 4), saturated
  const callback_exceptions on_throw_;
  // The slots (open_slot), by chunks of slots_per_chunk: chunks_[k] is
  // null until chunk k is made (under mutex_), then never changes.
  const std::size_t slots_usable_;  // min(max_pending_, slot_limit)
  const std::unique_ptr<std::atomic<request_slot*>[]> chunks_;
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
  // The slots' (open_slot) bookkeeping, on the requesting side.
  std::vector<std::unique_ptr<request_slot[]>> chunk_storage_;  // under mutex_: owns the chunks
  std::vector<unsigned char> slot_counted_;  // under mutex_: per slot, counted in slots_in_use_
  std::size_t slots_allocated_ = 0;  // under mutex_
  std::size_t slots_in_use_ = 0;     // under mutex_: slots counted (taken, not yet seen finished)
  std::size_t cursor_ = 0;           // under mutex_: the slot taken last
  alignas(detail::cache_line_size) Stats stats_;  // all but sent and the slots' replies
  /// Replies and error replies completed on the slot path (complete_slot,
  /// without the lock). Relaxed: statistics, read by stats(); publish nothing.
  std::atomic<std::uint64_t> slot_replied_{0};
  std::atomic<std::uint64_t> slot_errors_{0};
  detail::recent_ids<finished> done_;  // recently finished, for late/duplicate
  // Threads running a completion callback now (one entry per run); close()
  // waits on idle_ until only its own thread is left.
  std::vector<std::thread::id> running_;
  std::condition_variable idle_;
};

POSTBOX_END_NAMESPACE
