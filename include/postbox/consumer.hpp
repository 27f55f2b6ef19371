// SPDX-License-Identifier: MIT
// postbox::consumer: runs a handler per message with settlement, retries, dead letters, deadlines, per-key order and graceful shutdown.
#pragma once

// Design: docs/design/consumer.md.
//
// This header is the whole consumer runtime and the one to include: it also
// brings settlement.hpp (settlement values, error classification, settle
// actions and hooks) and consumer/sources.hpp (the source concept and its
// adapters). It does not bring topic.hpp or stream.hpp: code that consumes a
// topic subscription or a stream group includes the transport's header too,
// in either order (the include rule in consumer/sources.hpp).
//
// * A consumer pulls `inbound<T>` items from a source (see `consumer_source`
//   in consumer/sources.hpp: channel, topic subscription, stream consumer
//   group, raw bytes with a decoder, or a broker adapter), runs the handler, and settles each
//   delivery: ack, retry (after a delay), reject (dead-letter now) or defer.
// * All bookkeeping sits behind one mutex; items live in std::list nodes that
//   move between the ready, running and waiting lists and per-key backlogs by
//   splicing. The nodes come from a per-consumer pool (no allocation in a
//   steady flow) and a source fills its node in place (`receive_into`: one
//   envelope move, none for a channel source); received items are admitted
//   up to 16 per lock, and a synchronous ack is counted under the lock the
//   next message takes anyway. Handlers, source calls, settle hooks, the
//   dead-letter queue and observer hooks always run outside that mutex, and
//   so does freeing an item (its envelope).
// * Every timed behaviour reads `options.clock`: retry and defer delays are
//   timers on a `timer_service` on that clock (its own thread, or driven by
//   `poll()` when `threads == 0`), deadlines compare with its `now()`, and
//   shutdown's grace period waits on it. The only real-time wait is a
//   worker's `receive_wait` slice in the source, a stop-check interval.
// * Workers receive for themselves: a worker with nothing ready becomes the
//   one receiver (the others wait), so with one worker a message goes from
//   the source to the handler on one thread, with no hand-off.

#include <postbox/async/core.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/consumer/sources.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/observer.hpp>
#include <postbox/retry.hpp>
#include <postbox/settlement.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/asymmetric_fence.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/dependent.hpp>
#include <postbox/detail/random.hpp>

#include <array>
#include <atomic>
#include <concepts>
#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#  define POSTBOX_DETAIL_CONSUMER_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define POSTBOX_DETAIL_CONSUMER_ASAN 1
#  endif
#endif
#ifndef POSTBOX_DETAIL_CONSUMER_ASAN
#  define POSTBOX_DETAIL_CONSUMER_ASAN 0
#endif
#if POSTBOX_DETAIL_CONSUMER_ASAN
#  include <sanitizer/asan_interface.h>
#endif

POSTBOX_BEGIN_NAMESPACE

// ---------------------------------------------------------------------------
// The consumer
// ---------------------------------------------------------------------------

/// What a handler may ask about the delivery it runs: the attempt number,
/// a stop token (requested when shutdown's grace period ends), the clock,
/// the source name and the message deadline. Valid during the handler call
/// (for a coroutine handler: until its task completes).
class consume_context {
 public:
  consume_context(std::uint32_t attempt, std::stop_token stop, const clock& clk, std::string_view source,
                  std::optional<time_point> deadline) noexcept
      : attempt_(attempt), stop_(std::move(stop)), clock_(&clk), source_(source), deadline_(deadline) {}
  /// As above, reading stop from `stop` (which must outlive the context):
  /// no stop-state reference is taken unless the handler asks for the token.
  consume_context(std::uint32_t attempt, const std::stop_source& stop, const clock& clk, std::string_view source,
                  std::optional<time_point> deadline) noexcept
      : attempt_(attempt), stop_source_(&stop), clock_(&clk), source_(source), deadline_(deadline) {}

  /// Deliveries started so far, this one included (1 on the first).
  [[nodiscard]] std::uint32_t attempt() const noexcept { return attempt_; }
  /// Requested when the consumer abandons running handlers (end of shutdown grace).
  [[nodiscard]] std::stop_token stop_token() const noexcept {
    return stop_source_ != nullptr ? stop_source_->get_token() : stop_;
  }
  /// Whether stop was requested. Never blocks.
  [[nodiscard]] bool stop_requested() const noexcept {
    return stop_source_ != nullptr ? stop_source_->stop_requested() : stop_.stop_requested();
  }
  /// The consumer's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }
  /// The source name.
  [[nodiscard]] std::string_view source() const noexcept { return source_; }
  /// The message's deadline, if any.
  [[nodiscard]] std::optional<time_point> deadline() const noexcept { return deadline_; }

 private:
  std::uint32_t attempt_;
  std::stop_token stop_;
  const std::stop_source* stop_source_ = nullptr;  // set: the stop state is read from it
  const clock* clock_;
  std::string_view source_;
  std::optional<time_point> deadline_;
};

/// Consumer configuration. A plain value.
struct consumer_options {
  std::string name = "consumer";  ///< metrics label
  /// Worker threads running handlers. 0: no threads at all; nothing happens
  /// until `poll()` (deterministic tests, single-threaded programs).
  std::size_t threads = 1;
  /// Messages taken from the source and not yet settled (running, ready,
  /// queued behind their key, waiting for a retry) at most; the consumer
  /// stops receiving at this bound (JetStream's max_ack_pending). >= 1.
  std::size_t max_in_flight = 64;
  retry_policy retry{};  ///< attempts and backoff
  /// Seed of the backoff jitter; empty: a random seed.
  std::optional<std::uint64_t> jitter_seed{};
  /// How long `defer()` puts a message aside.
  duration defer_delay = std::chrono::seconds(1);
  /// Exception classifier; empty: every exception is transient.
  error_classifier classify{};
  /// The clock of every timed behaviour; null: `default_clock()`. Must outlive the consumer.
  const postbox::clock* clock = nullptr;
  /// Observer hooks; null: none. Must outlive the consumer.
  const postbox::observer* observer = nullptr;
  /// Tenants whose messages the consumer handles (exact `envelope::tenant`,
  /// "" = untenanted messages). Empty, with no `accept_tenant`: every
  /// tenant. A message of any other tenant is dead-lettered with reason
  /// `dead_letter_reasons::tenant` without running the handler (attempts 0).
  std::vector<std::string> tenants{};
  /// Accepts a tenant the `tenants` list does not name; runs on the
  /// receiving thread for each message, must be thread-safe and not throw
  /// (a throw counts as refusal).
  std::function<bool(std::string_view)> accept_tenant{};
  /// Real-time slice a receiving worker blocks in the source before it
  /// re-checks for ready work and shutdown (a stop-check interval, not a
  /// timed behaviour; a retry that falls due meanwhile waits at most this
  /// long when every worker is busy receiving or running).
  duration receive_wait = std::chrono::milliseconds(20);
  /// Where coroutine handlers (returning `task<settlement>` or `task<void>`)
  /// resume after they suspend; required for them, unused otherwise. Must
  /// outlive the consumer. A `run_queue` drained by the caller keeps every
  /// handler on one thread (with `threads == 0`: the thread calling `poll()`
  /// and the queue's `poll()`).
  scheduler_ref scheduler{};
};

/// A consumer's counters and gauges (snapshot).
struct consumer_stats {
  std::uint64_t received = 0;             ///< items taken from the source (poison included)
  std::uint64_t started = 0;              ///< deliveries started (a batch starts one per message)
  std::uint64_t batches = 0;              ///< batch handler invocations (batch consumers)
  std::uint64_t acked = 0;
  std::uint64_t retried = 0;              ///< retry decisions (in-process or handed to the broker)
  std::uint64_t deferred = 0;
  std::uint64_t dead_lettered = 0;        ///< accepted by the dead-letter queue (all reasons)
  std::uint64_t expired = 0;              ///< dead-lettered (or refused) because the deadline passed
  std::uint64_t poison = 0;               ///< undecodable items
  std::uint64_t handler_errors = 0;       ///< handler exceptions
  std::uint64_t dead_letter_refused = 0;  ///< dead letters the full queue refused
  std::uint64_t released = 0;             ///< given back unsettled (shutdown)
  std::uint64_t hook_failures = 0;        ///< settle hooks or classifiers that threw
  std::uint64_t observer_failures = 0;    ///< observer hooks that threw (all users of that observer)
  std::size_t in_flight = 0;              ///< taken and not settled (bounded by max_in_flight)
  std::size_t max_in_flight = 0;
  std::size_t running = 0;                ///< handlers running now
  std::size_t queued = 0;                 ///< ready or queued behind their key
  std::size_t waiting_retry = 0;          ///< waiting for a retry or defer timer
  duration oldest_in_flight_age{0};       ///< since the oldest unsettled message was received
  duration oldest_waiting_age{0};         ///< same, among those waiting for a retry
  std::optional<std::uint64_t> lag;       ///< the source's backlog, when it reports one
  bool accepting = true;                  ///< false after shutdown began
  bool source_closed = false;             ///< the source reported closed
  histogram_snapshot handle_duration;     ///< handler durations on the consumer's clock
};

/// What `shutdown` leaves behind. Nothing is lost: every message the
/// consumer had taken is either settled, in `returned`, or still running
/// (`abandoned_ids`): an abandoned handler's ack or dead letter is applied
/// when it returns, and a retry or defer it asks for releases the message
/// to `consumer::take_released()`.
template <class T>
struct shutdown_report {
  std::size_t completed = 0;              ///< deliveries settled during the grace period
  std::size_t abandoned = 0;              ///< handlers still running at the deadline
  std::vector<message_id> abandoned_ids;  ///< their message ids
  /// Never settled: ready, queued behind a key, or waiting for a retry (in
  /// that order; per key in order). Their settle hooks got `release`.
  std::vector<envelope<T>> returned;
  std::size_t returned_waiting_retry = 0;  ///< how many of `returned` were waiting for a retry
  std::vector<dead_letter<T>> refused_dead_letters;  ///< dead letters the full queue refused, kept for you
  /// Whether nothing was left.
  [[nodiscard]] bool clean() const noexcept {
    return abandoned == 0 && returned.empty() && refused_dead_letters.empty();
  }
};

/// What `drain` leaves behind: everything a `shutdown_report` says (what
/// was still in the consumer when the grace ended), plus whether the drain
/// finished and what is still in the source.
template <class T>
struct drain_report : shutdown_report<T> {
  /// The source reported closed and every message taken was settled (acked
  /// or dead-lettered, retries included) before the grace ended.
  bool finished = false;
  /// The source reported closed (nothing more will arrive).
  bool source_closed = false;
  /// What the source still holds when drain returns, for a source that can
  /// tell (its `backlog()`: a channel's or subscription's depth, a stream
  /// group member's uncommitted records, which include the `returned` ones
  /// the stream will deliver again); empty: unknown.
  std::optional<std::uint64_t> source_left;

  /// `source_left` as text: the number, or "unknown". Allocates.
  [[nodiscard]] std::string source_left_text() const {
    return source_left ? std::to_string(*source_left) : std::string("unknown");
  }
  /// Whether the drain finished and left nothing (in the consumer or the source).
  [[nodiscard]] bool clean() const noexcept {
    return finished && shutdown_report<T>::clean() && source_left.value_or(0) == 0;
  }
};

/// How a batch consumer groups messages: a batch is handed to the handler
/// when `max_size` messages are ready, or when the first ready one has waited
/// `window` on the consumer's clock, whichever comes first (and at once when
/// no more can arrive: the source closed, shutdown or drain began, or
/// `max_in_flight` is reached). A plain value.
struct batch_options {
  /// Most messages per batch; 1 <= max_size <= consumer_options::max_in_flight
  /// (a larger batch could never fill: the consumer refuses it).
  std::size_t max_size = 16;
  /// How long the first ready message waits for the batch to fill; >= 0
  /// (0: hand over whatever is ready). `duration::max()`: size only.
  duration window = std::chrono::milliseconds(10);
};

/// The messages of one batch, as a batch handler sees them (in the order
/// they became ready; at most one per partition key), with the delivery
/// context. Valid during the handler call only. Not thread-safe.
template <class T>
class message_batch {
 public:
  /// Iterates the envelopes (forward; each `const envelope<T>&`).
  class iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = envelope<T>;
    using difference_type = std::ptrdiff_t;
    using pointer = const envelope<T>*;
    using reference = const envelope<T>&;
    iterator() noexcept = default;
    explicit iterator(const envelope<T>* const* p) noexcept : p_(p) {}
    reference operator*() const noexcept { return **p_; }
    pointer operator->() const noexcept { return *p_; }
    iterator& operator++() noexcept {
      ++p_;
      return *this;
    }
    iterator operator++(int) noexcept {
      iterator old = *this;
      ++p_;
      return old;
    }
    friend bool operator==(const iterator&, const iterator&) = default;

   private:
    const envelope<T>* const* p_ = nullptr;
  };

  message_batch(std::vector<const envelope<T>*> items, std::stop_token stop, const clock& clk,
                std::string_view source) noexcept
      : items_(std::move(items)), stop_(std::move(stop)), clock_(&clk), source_(source) {}

  /// Messages in the batch (>= 1).
  [[nodiscard]] std::size_t size() const noexcept { return items_.size(); }
  /// Always false for a batch handed to a handler.
  [[nodiscard]] bool empty() const noexcept { return items_.empty(); }
  /// The `i`-th envelope (its `attempt` already counts this delivery).
  [[nodiscard]] const envelope<T>& operator[](std::size_t i) const noexcept { return *items_[i]; }
  [[nodiscard]] iterator begin() const noexcept { return iterator(items_.data()); }
  [[nodiscard]] iterator end() const noexcept { return iterator(items_.data() + items_.size()); }
  /// Requested when the consumer abandons running handlers (end of shutdown grace).
  [[nodiscard]] std::stop_token stop_token() const noexcept { return stop_; }
  /// Whether stop was requested. Never blocks.
  [[nodiscard]] bool stop_requested() const noexcept { return stop_.stop_requested(); }
  /// The consumer's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }
  /// The source name.
  [[nodiscard]] std::string_view source() const noexcept { return source_; }

 private:
  std::vector<const envelope<T>*> items_;
  std::stop_token stop_;
  const clock* clock_;
  std::string_view source_;
};

namespace detail {

template <class T>
struct source_base {
  virtual ~source_base() = default;
  // One item into `sink` (ok), or empty/timeout/closed with no sink call.
  virtual receive_status receive_into(duration wait, inbound_sink<T>& sink) = 0;
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  [[nodiscard]] virtual std::optional<std::uint64_t> backlog() const = 0;
};

// `Sink`: the consumer's own sink type (the only sink passed in), so a
// source whose receive_into is a template calls it without a virtual call.
template <class T, class S, class Sink = inbound_sink<T>>
struct source_model final : source_base<T> {
  explicit source_model(S s) : src(std::move(s)) {}
  receive_status receive_into(duration wait, inbound_sink<T>& sink) override {
    if constexpr (requires(Sink& k) { { src.receive_into(wait, k) } -> std::same_as<receive_status>; }) {
      return src.receive_into(wait, static_cast<Sink&>(sink));
    } else if constexpr (in_place_consumer_source<S>) {
      return src.receive_into(wait, sink);
    } else {
      // A source with `receive` only (users' own, broker adapters): unpack its item.
      auto r = src.receive(wait);
      if (!r.has_value()) return r.status();
      if (r->message) {
        sink.accept(std::move(*r->message), std::move(r->settle));
      } else {
        sink.accept_poison(std::move(r->poison), std::move(r->settle));
      }
      return receive_status::ok;
    }
  }
  [[nodiscard]] std::string_view name() const noexcept override { return std::string_view(src.name()); }
  [[nodiscard]] std::optional<std::uint64_t> backlog() const override {
    if constexpr (requires(const S& s) { static_cast<std::uint64_t>(s.backlog()); }) {
      return static_cast<std::uint64_t>(src.backlog());
    } else {
      return std::nullopt;
    }
  }
  S src;
};

/// Whether a handler's result makes it a coroutine handler.
template <class R>
inline constexpr bool is_consumer_task_v = false;
template <>
inline constexpr bool is_consumer_task_v<task<settlement>> = true;
template <>
inline constexpr bool is_consumer_task_v<task<void>> = true;

/// Whether a batch handler's result makes it a coroutine batch handler.
template <class R>
inline constexpr bool is_batch_task_v = false;
template <>
inline constexpr bool is_batch_task_v<task<void>> = true;
template <>
inline constexpr bool is_batch_task_v<task<settlement>> = true;
template <>
inline constexpr bool is_batch_task_v<task<std::vector<settlement>>> = true;
template <>
inline constexpr bool is_batch_task_v<task<batch_settlement>> = true;

/// A handler callable as `(const envelope<T>&[, consume_context&])` that
/// returns `task<settlement>` or `task<void>`.
template <class H, class T>
concept coroutine_consumer_handler =
    (std::is_invocable_v<std::decay_t<H>&, const envelope<T>&, consume_context&> &&
     is_consumer_task_v<std::invoke_result_t<std::decay_t<H>&, const envelope<T>&, consume_context&>>) ||
    (!std::is_invocable_v<std::decay_t<H>&, const envelope<T>&, consume_context&> &&
     std::is_invocable_v<std::decay_t<H>&, const envelope<T>&> &&
     is_consumer_task_v<std::invoke_result_t<std::decay_t<H>&, const envelope<T>&>>);

/// The coroutine that runs one coroutine handler to its settlement. The
/// consumer creates it suspended, starts it, and destroys it only when it is
/// still suspended at the consumer's destruction; otherwise it destroys
/// itself when it ends. Exposes its scheduler so the awaited task inherits it.
struct consumer_handler_run {
  struct promise_type {
    consumer_handler_run get_return_object() noexcept {
      return consumer_handler_run{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    // The body catches the handler's exceptions; only the consumer's own
    // bookkeeping (an allocation failure) could get here.
    [[noreturn]] void unhandled_exception() const noexcept { std::terminate(); }
    [[nodiscard]] scheduler_ref postbox_scheduler() const noexcept { return sched; }
    scheduler_ref sched;
  };
  std::coroutine_handle<promise_type> handle;
};

/// A consumer's handler-duration histogram: duration_histogram's buckets as
/// plain counters, guarded by the consumer's mutex, which the consumer holds
/// right after every handler anyway: an observation costs no atomic RMW.
class locked_duration_histogram {
 public:
  /// Records one duration (negative counts as zero). Caller holds the consumer's mutex.
  void observe(duration d) noexcept {
    const std::int64_t ns = d.count() < 0 ? 0 : d.count();
    const auto& bounds = duration_histogram::default_bounds;
    std::size_t i = 0;
    while (i < bounds.size() && static_cast<double>(ns) > bounds[i] * 1e9) ++i;
    ++buckets_[i];
    sum_ns_ += static_cast<std::uint64_t>(ns);
  }
  /// The buckets as duration_histogram::snapshot gives them. Caller holds the consumer's mutex; allocates.
  [[nodiscard]] histogram_snapshot snapshot() const {
    const auto& bounds = duration_histogram::default_bounds;
    histogram_snapshot s;
    s.bounds.assign(bounds.begin(), bounds.end());
    s.cumulative.reserve(bounds.size());
    std::uint64_t running = 0;
    for (std::size_t i = 0; i < bounds.size(); ++i) {
      running += buckets_[i];
      s.cumulative.push_back(running);
    }
    s.count = running + buckets_[bounds.size()];
    s.sum = static_cast<double>(sum_ns_) / 1e9;
    return s;
  }

 private:
  std::array<std::uint64_t, duration_histogram::default_bounds.size() + 1> buckets_{};  // the last: beyond every bound
  std::uint64_t sum_ns_ = 0;
};

/// The pool of one consumer's item nodes, so a steady flow allocates none:
/// a freed node is pushed onto a lock-free stack by whichever thread frees
/// it (release CAS), and the consumer's receiving side, one thread at a time
/// (the consumer's receive mutex), takes the whole stack with one acquire
/// exchange and allocates from its private list with no atomics. Push-only
/// on the shared stack, so no ABA. Every block starts with a header naming
/// its pool (null: an ordinary heap block), so any list may free any node.
/// It never shrinks: it holds as many nodes as were ever live at once (about
/// max_in_flight plus one receive chunk); the consumer frees them all when
/// it is destroyed, after its last node. Under ASan a pooled block is
/// poisoned past its header.
class consumer_node_pool {
 public:
  consumer_node_pool() = default;
  consumer_node_pool(const consumer_node_pool&) = delete;
  consumer_node_pool& operator=(const consumer_node_pool&) = delete;
  ~consumer_node_pool() {
    free_list(local_);
    // acquire: pairs with the release CAS in deallocate (every push is done: no node outlives the consumer).
    free_list(shared_.exchange(nullptr, std::memory_order_acquire));
  }

  /// A block for `bytes`; only the consumer's receiving side calls it
  /// (serialized). Allocates only while the pool grows.
  void* allocate(std::size_t bytes) {
    if (size_ == 0) size_ = bytes;
    if (bytes == size_) {
      // acquire: pairs with the release CAS in deallocate (the node's last use happens before its reuse).
      if (local_ == nullptr) local_ = shared_.exchange(nullptr, std::memory_order_acquire);
      if (header* h = local_) {
#if POSTBOX_DETAIL_CONSUMER_ASAN
        ASAN_UNPOISON_MEMORY_REGION(h + 1, size_);
#endif
        local_ = h->next;
        h->next = nullptr;
        return h + 1;
      }
    }
    auto* h = static_cast<header*>(::operator new(sizeof(header) + bytes));
    h->pool = bytes == size_ ? this : nullptr;
    h->next = nullptr;
    return h + 1;
  }

  /// A heap block with a header naming no pool (any thread).
  static void* allocate_unpooled(std::size_t bytes) {
    auto* h = static_cast<header*>(::operator new(sizeof(header) + bytes));
    h->pool = nullptr;
    h->next = nullptr;
    return h + 1;
  }

  /// Frees a block from `allocate` (any thread): back to its pool, or to the heap.
  static void deallocate(void* p) noexcept {
    header* h = static_cast<header*>(p) - 1;
    consumer_node_pool* pool = h->pool;
    if (pool == nullptr) {
      ::operator delete(h);
      return;
    }
#if POSTBOX_DETAIL_CONSUMER_ASAN
    // Before the push: afterwards the receiving side may already own it.
    ASAN_POISON_MEMORY_REGION(h + 1, pool->size_);
#endif
    h->next = pool->shared_.load(std::memory_order_relaxed);  // relaxed: the CAS re-reads it
    // release: publishes h->next and the node's last use; pairs with the acquire exchange in allocate.
    while (!pool->shared_.compare_exchange_weak(h->next, h, std::memory_order_release, std::memory_order_relaxed)) {
    }
  }

 private:
  struct alignas(std::max_align_t) header {
    consumer_node_pool* pool;  // null: a heap block (another size)
    header* next;              // the next free block while pooled
  };
  static void free_list(header* h) noexcept {
    while (h != nullptr) {
#if POSTBOX_DETAIL_CONSUMER_ASAN
      ASAN_UNPOISON_MEMORY_REGION(h, sizeof(header));
#endif
      header* next = h->next;
      ::operator delete(h);
      h = next;
    }
  }

  /// Freed blocks, pushed by any thread with a release CAS, taken whole by
  /// the receiving side with an acquire exchange (or by the destructor).
  std::atomic<header*> shared_{nullptr};
  header* local_ = nullptr;  // the receiving side's private free list (serialized by the consumer)
  std::size_t size_ = 0;     // the pooled block size, fixed by the first allocation (receiving side)
};

/// The allocator of the consumer's item lists: blocks from a
/// consumer_node_pool (a default-constructed one never allocates: only the
/// receiver's list does). Every instance frees every block, so lists splice
/// freely.
template <class U>
struct consumer_node_allocator {
  using value_type = U;
  using is_always_equal = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;

  consumer_node_allocator() noexcept = default;
  explicit consumer_node_allocator(consumer_node_pool* p) noexcept : pool(p) {}
  template <class V>
  consumer_node_allocator(const consumer_node_allocator<V>& o) noexcept : pool(o.pool) {}  // NOLINT

  U* allocate(std::size_t n) {
    if constexpr (alignof(U) > alignof(std::max_align_t)) {
      return std::allocator<U>().allocate(n);
    } else {
      return static_cast<U*>(pool != nullptr ? pool->allocate(n * sizeof(U))
                                             : consumer_node_pool::allocate_unpooled(n * sizeof(U)));
    }
  }
  void deallocate(U* p, std::size_t n) noexcept {
    if constexpr (alignof(U) > alignof(std::max_align_t)) {
      std::allocator<U>().deallocate(p, n);
    } else {
      consumer_node_pool::deallocate(p);
    }
  }
  friend bool operator==(const consumer_node_allocator&, const consumer_node_allocator&) noexcept { return true; }

  consumer_node_pool* pool = nullptr;
};

// The decimal integer at the start of header `name` (a '-' first for a signed
// Int), read as std::from_chars reads it; 0 when the header is absent, has no
// digits or overflows Int. A loop, since <charconv> cost every includer of
// this header about 1% of its compile time (issue 17).
template <class Int>
Int header_number(const header_map& h, std::string_view name) noexcept {
  const auto v = h.get(name);
  if (!v) return Int{0};
  std::string_view s = *v;
  bool negative = false;
  if constexpr (std::is_signed_v<Int>) {
    negative = !s.empty() && s.front() == '-';
    if (negative) s.remove_prefix(1);
  }
  using U = std::make_unsigned_t<Int>;
  // The largest magnitude: max for a positive value, max + 1 for a negative one.
  const U bound = static_cast<U>(static_cast<U>(std::numeric_limits<Int>::max()) + (negative ? 1U : 0U));
  U magnitude = 0;
  std::size_t digits = 0;
  for (; digits < s.size() && s[digits] >= '0' && s[digits] <= '9'; ++digits) {
    const auto d = static_cast<U>(s[digits] - '0');
    if (magnitude > static_cast<U>((bound - d) / 10U)) return Int{0};  // out of range
    magnitude = static_cast<U>(magnitude * 10U + d);
  }
  if (digits == 0 || magnitude == 0) return Int{0};
  if (!negative) return static_cast<Int>(magnitude);
  return static_cast<Int>(-static_cast<Int>(magnitude - 1U) - 1);  // -max - 1 without overflow
}

}  // namespace detail

/// Runs a handler for every message of a source, settles each delivery and
/// never stops because a handler threw.
///
/// * Handler: callable as `h(const envelope<T>&)` or `h(const envelope<T>&,
///   consume_context&)`, returning `settlement` or void (= ack). An exception
///   is classified (`consumer_options::classify`, transient by default):
///   transient retries by policy, permanent dead-letters ("permanent_error");
///   its `what()` is kept as the error text.
/// * Coroutine handler: the same signatures returning `task<settlement>` or
///   `task<void>` (= ack). The consumer starts the task on the calling
///   worker (or `poll()`) and it resumes on `consumer_options::scheduler`;
///   it counts as running (and in flight) until it completes, so several
///   may be suspended at once, bounded by `max_in_flight`. Its result (or
///   exception, classified as above) settles exactly like a synchronous
///   handler's: retries, dead letters, deadlines and per-key order are the
///   same. The envelope and the context stay valid until the task completes.
/// * Attempts: `envelope.attempt` is incremented when a delivery starts;
///   after a failure, `retry.exhausted(attempt)` dead-letters it
///   ("retries_exhausted"), else it waits `retry.backoff(attempt,
///   jitter.next())` (seeded by `jitter_seed`) or the handler's explicit delay.
/// * Deadlines: a message whose deadline is at or before `clock.now()` is
///   not started; it is dead-lettered as "expired" — also when the deadline
///   passes while it waits for a retry (its timer fires at the deadline).
/// * Order: messages with the same non-empty `partition_key` are handled one
///   at a time in arrival order; a key waiting for a retry or defer parks
///   only itself (later messages of that key queue behind it), other keys
///   and unkeyed messages proceed. (With a `redelivers` source the broker
///   owns redelivery, so a retried message leaves the line.)
/// * Poison input is dead-lettered with the decoder's reason and raw bytes.
/// * Tenants: with `tenants` or `accept_tenant` set, a message of another
///   tenant is dead-lettered with reason "tenant" when it is received,
///   without a delivery (attempts 0, no receive event).
/// * Concurrency: `threads` workers, which also take turns receiving (one
///   at a time), and a timer thread; at most `max_in_flight` unsettled
///   messages. With `threads == 0` nothing runs until `poll()`.
/// * Shutdown: `shutdown(grace)` stops receiving, lets work finish until
///   the deadline on the consumer's clock and returns what was left
///   (`shutdown_report`). The destructor is `shutdown(0)` and then waits for
///   abandoned handlers to return.
///
/// The dead-letter queue, the source's transport, the clock and the
/// observer must outlive the consumer. Member functions are thread-safe.
template <class T>
class consumer {
 public:
  using payload_type = T;
  /// The handler in its normalized form.
  using handler_type = std::function<settlement(const envelope<T>&, consume_context&)>;

  /// Starts consuming `source` (taken by value) with `handler`, dead-lettering
  /// into `dead_letters`. Starts `options.threads` workers and a timer
  /// thread (none when `threads == 0`). Throws error(invalid_argument) when
  /// `max_in_flight` is 0. Allocates.
  ///
  /// A coroutine handler (returning `task<settlement>` or `task<void>`)
  /// resumes on `options.scheduler` (see the class comment); without one
  /// this throws error(invalid_argument). Suspended handlers still there
  /// when the consumer is destroyed are destroyed with it (their messages
  /// released): destroy the consumer where no resumption of them can run
  /// concurrently (on the scheduler's thread, or after its threads stopped).
  /// Each delivery then allocates a driver frame (plus the handler's own).
  template <consumer_source Source, class Handler>
    requires std::same_as<typename Source::payload_type, T>
  consumer(Source source, Handler&& handler, dead_letter_queue<T>& dead_letters, consumer_options options = {})
      : consumer(std::make_unique<detail::source_model<T, Source, receiver>>(std::move(source)),
                 wrap_single(std::forward<Handler>(handler)), batch_handlers{}, std::nullopt, dead_letters,
                 std::move(options), static_cast<bool>(Source::redelivers)) {}

  /// A batch consumer: runs `handler` on batches of up to `batch.max_size`
  /// messages, handed over on size or on the `batch.window` (consumer's
  /// clock). The handler is callable as `h(const message_batch<T>&)` and
  /// returns void (ack all), a `settlement` (for the whole batch),
  /// `std::vector<settlement>` (one per message) or `batch_settlement`. An
  /// exception settles the whole batch as `classify` says (retry or
  /// dead-letter each message). Retries, dead letters, deadlines and per-key
  /// order work per message as in the single-message consumer; a batch holds
  /// at most one message per partition key. Throws error(invalid_argument)
  /// when `max_in_flight` is 0, `batch.max_size` is 0 or larger than
  /// `max_in_flight` (such a batch could never fill), or `batch.window` < 0.
  ///
  /// A coroutine batch handler returns `task<void>`, `task<settlement>`,
  /// `task<std::vector<settlement>>` or `task<batch_settlement>` and resumes
  /// on `options.scheduler` (required, else error(invalid_argument)); its
  /// messages count as running until the task completes, then each is
  /// settled by its result (an exception as `classify` says), as for a
  /// synchronous batch handler. The batch stays valid until then. Shutdown
  /// while it is suspended abandons its messages (in `abandoned_ids`; its
  /// later result still settles them, a retry releasing them to
  /// `take_released()`); destroying the consumer destroys the suspended
  /// task once and releases each of its messages.
  template <consumer_source Source, class BatchHandler>
    requires std::same_as<typename Source::payload_type, T>
  consumer(Source source, batch_options batch, BatchHandler&& handler, dead_letter_queue<T>& dead_letters,
           consumer_options options = {})
      : consumer(std::make_unique<detail::source_model<T, Source, receiver>>(std::move(source)), single_handler{},
                 wrap_batch_any(std::forward<BatchHandler>(handler)), validate(batch, options), dead_letters,
                 std::move(options), static_cast<bool>(Source::redelivers)) {}

  consumer(const consumer&) = delete;
  consumer& operator=(const consumer&) = delete;

 private:
  using batch_handler_type = std::function<batch_settlement(const message_batch<T>&)>;
  using async_batch_handler_type = std::function<task<batch_settlement>(const message_batch<T>&)>;
  // A batch consumer's handler: at most one of the two is set.
  struct batch_handlers {
    batch_handler_type sync;
    async_batch_handler_type async;
  };
  // A coroutine handler's task: awaited directly by run_async (task<void>
  // too: no adapter coroutine, one frame less per delivery).
  using async_task = detail::dependent_t<std::variant<task<settlement>, task<void>>, T>;  // dependent_t: detail/dependent.hpp
  using async_handler_type = std::function<async_task(const envelope<T>&, consume_context&)>;
  // A single-message consumer's handler: one of the two is set.
  struct single_handler {
    handler_type sync;
    async_handler_type async;
  };

  template <class H>
  static single_handler wrap_single(H&& h) {
    if constexpr (detail::coroutine_consumer_handler<H, T>) {
      return single_handler{handler_type{}, wrap_async(std::forward<H>(h))};
    } else {
      return single_handler{wrap(std::forward<H>(h)), async_handler_type{}};
    }
  }

  static batch_options validate(batch_options b, const consumer_options& o) {
    if (b.max_size == 0)
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::consumer: batch max_size must be at least 1"));
    if (o.max_in_flight != 0 && b.max_size > o.max_in_flight)
      POSTBOX_THROW(error(errc::invalid_argument,
                          "postbox::consumer: batch max_size " + std::to_string(b.max_size) +
                              " exceeds max_in_flight " + std::to_string(o.max_in_flight) +
                              ": the batch could never fill"));
    if (b.window.count() < 0)
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::consumer: batch window must not be negative"));
    return b;
  }

  consumer(std::unique_ptr<detail::source_base<T>> source, single_handler handler, batch_handlers batch_handler,
           std::optional<batch_options> batch, dead_letter_queue<T>& dead_letters, consumer_options options,
           bool redelivers)
      : source_(std::move(source)),
        handler_(std::move(handler.sync)),
        async_handler_(std::move(handler.async)),
        batch_handler_(std::move(batch_handler.sync)),
        async_batch_handler_(std::move(batch_handler.async)),
        batch_(batch),
        dlq_(&dead_letters),
        opts_(std::move(options)),
        clock_(opts_.clock != nullptr ? opts_.clock : &default_clock()),
        obs_(opts_.observer),
        redelivers_(redelivers),
        threaded_(opts_.threads > 0),
        jitter_(opts_.jitter_seed ? *opts_.jitter_seed : detail::entropy64()) {
    if (opts_.max_in_flight == 0)
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::consumer: max_in_flight must be at least 1"));
    if ((async_handler_ || async_batch_handler_) && !opts_.scheduler)
      POSTBOX_THROW(error(errc::invalid_argument,
                          "postbox::consumer: a coroutine handler needs consumer_options::scheduler"));
    source_name_ = std::string(source_->name());
    detail::asymmetric_fence_init();  // before any runner's light_fence(): shutdown's heavy_fence() answers it
    if (threaded_) {
      timers_ = std::make_unique<timer_service>(*clock_);
      workers_.reserve(opts_.threads);
      for (std::size_t i = 0; i < opts_.threads; ++i) workers_.emplace_back([this] { work_loop(); });
    } else {
      timers_ = std::make_unique<timer_service>(*clock_, timer_service::manual_drive);
    }
  }

 public:
  /// `shutdown(0)` if not done yet (its report is dropped: call shutdown
  /// yourself to get returned messages back), then waits for abandoned
  /// handlers to return and stops the timer thread. Coroutine handlers
  /// still suspended are destroyed and their messages released.
  ~consumer() {
    bool done = false;
    {
      std::lock_guard lock(mu_);
      done = shut_down_;
    }
    if (!done) (void)shutdown(duration::zero());
    for (auto& w : workers_)
      if (w.joinable()) w.join();
    timers_->stop();
    destroy_suspended_handlers();
  }

  /// Manual drive (`threads == 0` only): runs due retry/defer timers, then
  /// receives (without blocking, up to `max_in_flight`) and handles messages
  /// on the calling thread until nothing is ready; messages waiting for a
  /// timer wait for a later poll. Returns the deliveries processed (handler
  /// runs, expiries and poison items; a coroutine handler counts when it
  /// starts: it resumes on `options.scheduler`, not in this call). Throws error(invalid_argument) when
  /// the consumer has threads. Thread-safe (concurrent polls run handlers
  /// concurrently, still one per key). Once the consumer has run its first
  /// messages it allocates nothing for a message its handler acks (a
  /// partition key takes an entry in the key table while in flight; a
  /// retry keeps a failure record); with nothing queued and a channel
  /// source, it runs up to 16 messages at a time straight from buffers on
  /// its own stack (docs/design/consumer.md, "Runs straight from a channel").
  std::size_t poll() {
    if (threaded_) POSTBOX_THROW(error(errc::invalid_argument, "postbox::consumer::poll: the consumer has threads"));
    const poller_count counted(pollers_);
    timers_->run_due();
    std::size_t n = 0;
    item_list trash;  // declared before the lock: emptied after it is released
    for (;;) {
      if (const std::optional<std::size_t> direct = run_direct(duration::zero(), trash, false)) {
        n += *direct;
        continue;
      }
      n += receive_some(duration::zero());
      std::unique_lock lock(mu_);
      if (stopped_ || !work_ready_locked()) break;
      // Receive again once half the budget is free: batches, not one by one.
      do {
        n += run_next(lock, trash);
      } while (!stopped_ && work_ready_locked() && held_ * 2 > opts_.max_in_flight);
    }
    return n;
  }

  /// Stops receiving, lets work finish until `grace` has passed on the
  /// consumer's clock (threaded: everything taken, retries due before the
  /// deadline included; `threads == 0`: only handlers running in a
  /// concurrent `poll()`), then requests stop on the handlers' stop tokens,
  /// releases what is left to the source and returns it. A second call
  /// returns an empty report (plus dead letters refused since). Blocks up
  /// to `grace` (and for a worker's current `receive_wait` in the source).
  shutdown_report<T> shutdown(duration grace) {
    shutdown_report<T> report;
    std::unique_lock lock(mu_);
    if (shut_down_) {
      report.refused_dead_letters = std::move(refused_);
      refused_.clear();
      return report;
    }
    shut_down_ = true;
    accepting_ = false;
    if (settle_waiters_ > 0) idle_cv_.notify_all();  // a drain in progress stops waiting
    if (batch_) work_cv_.notify_all();  // workers waiting for a batch window flush now
    const time_point deadline = clock_->now() + grace;
    lock.unlock();
    { std::lock_guard receiving(receive_mu_); }  // whoever was receiving has admitted its items
    lock.lock();
    item_list acked_in_runs;  // freed outside the lock
    settle_claimed_acks_locked(acked_in_runs);  // acked before shutdown: not completed during it
    const std::uint64_t settled_before = settled_;
    while (!drained_locked(deadline) && clock_->now() < deadline) {
      ++settle_waiters_;
      clock_->wait_until(lock, idle_cv_, deadline);
      --settle_waiters_;
    }
    stopped_ = true;
    stop_.request_stop();
    item_list left;
    revoke_claims_locked(report, left, acked_in_runs);
    report.completed = static_cast<std::size_t>(settled_ - settled_before);
    report.abandoned += running_count_;
    for (const auto& it : running_) report.abandoned_ids.push_back(it.env().id);
    left.splice(left.end(), ready_);
    for (auto& it : waiting_) {
      timers_->cancel(it.timer);
      ++report.returned_waiting_retry;
    }
    waiting_index_.clear();
    left.splice(left.end(), waiting_);
    for (auto& [key, backlog] : keys_) left.splice(left.end(), backlog);
    keys_.clear();
    work_cv_.notify_all();
    lock.unlock();
    acked_in_runs.clear();
    for (auto& it : left) {
      call_hook(it, settle_action{settle_action::kind::release, {}});
      notify_settle(it.env(), settle_outcome::released, {}, {});
      report.returned.push_back(std::move(it.env()));
    }
    lock.lock();
    held_ -= left.size();
    released_ += left.size();
    report.refused_dead_letters = std::move(refused_);
    refused_.clear();
    return report;
  }

  /// Runs until the source is closed and every message taken has settled
  /// (acked or dead-lettered; retries and defers included, on the consumer's
  /// clock), then stops the consumer as `shutdown` does. If that has not
  /// happened when `grace` has passed on the consumer's clock (the source
  /// never closes, or a retry is due later), it stops there: running
  /// handlers are abandoned, messages ready or waiting for a retry are
  /// released and returned, and the report says what the source still holds.
  /// With worker threads it blocks the caller while the workers run; with
  /// `threads == 0` the caller runs the handlers and due timers itself, a
  /// batch (up to `max_in_flight`) at a time, checking the grace between
  /// batches (the wait for more input is a `receive_wait` slice in real time,
  /// the wait for a retry is on the clock). A stream group source never reports closed, so draining one
  /// always ends at `grace`. Concurrent drains each wait for their own
  /// grace; the first to end stops the consumer and gets its report. After a
  /// `shutdown` (or a drain) it returns an empty, unfinished report (plus
  /// dead letters refused since). Thread-safe; allocates the report.
  drain_report<T> drain(duration grace) {
    drain_report<T> report;
    time_point deadline{};
    std::uint64_t settled_before = 0;
    bool mine = false;
    item_list acked_in_runs;  // declared before the lock: freed after it is released
    {
      std::lock_guard lock(mu_);
      if (!shut_down_) {
        mine = true;
        deadline = clock_->now() + grace;
        settle_claimed_acks_locked(acked_in_runs);  // acked before the drain: not completed during it
        settled_before = settled_;
      }
    }
    // After a shutdown (or another drain's end) there is nothing to wait for.
    if (mine) report.finished = threaded_ ? drain_threaded(deadline) : drain_manual(deadline);
    static_cast<shutdown_report<T>&>(report) = shutdown(duration::zero());
    {
      std::lock_guard lock(mu_);
      if (mine) report.completed = static_cast<std::size_t>(settled_ - settled_before);
      report.source_closed = source_closed_;
    }
    report.source_left = source_->backlog();
    return report;
  }

  /// Counters and gauges. Takes the consumer's lock (O(in flight) for the
  /// ages); allocates the histogram snapshot. Thread-safe.
  [[nodiscard]] consumer_stats stats() const {
    consumer_stats s;
    {
      std::lock_guard lock(mu_);
      s.received = received_;
      s.started = started_;
      s.batches = batches_;
      s.acked = acked_;
      s.retried = retried_;
      s.deferred = deferred_;
      s.dead_lettered = dead_lettered_;
      s.expired = expired_;
      s.poison = poison_;
      s.handler_errors = handler_errors_;
      s.dead_letter_refused = dead_letter_refused_;
      s.released = released_;
      s.in_flight = held_;
      s.max_in_flight = opts_.max_in_flight;
      s.running = running_count_;
      s.queued = ready_.size();
      s.waiting_retry = waiting_.size();
      s.accepting = accepting_;
      s.source_closed = source_closed_;
      const time_point now = clock_->now();
      time_point oldest = now;
      time_point oldest_waiting = now;
      auto scan = [&](const item_list& l) {
        for (const auto& it : l) oldest = std::min(oldest, it.received_at);
      };
      scan(ready_);
      scan(running_);
      for (const run_claim* c : claims_) {
        // The runner's progress: relaxed loads (statistics), each clamped
        // to the one before it, which the runner stores first.
        const std::size_t begun = c->begun_count();
        const std::size_t acked = std::max(std::min(c->acked.load(std::memory_order_relaxed), begun), c->settled);
        const std::size_t claimed = c->revoked.load(std::memory_order_relaxed) ? c->kept : c->size;
        s.started += begun - c->settled;
        s.running += begun - acked;  // as for run_one, a handler that did not ack runs until it is settled
        s.acked += acked - c->settled;
        s.in_flight -= acked - c->settled;
        s.queued += claimed - begun;
        scan(c->items);
        if (c->direct && c->settled < claimed) oldest = std::min(oldest, c->received_at);
      }
      for (const auto& [k, backlog] : keys_) {
        scan(backlog);
        s.queued += backlog.size();
      }
      for (const auto& it : waiting_) oldest_waiting = std::min(oldest_waiting, it.received_at);
      oldest = std::min(oldest, oldest_waiting);
      s.oldest_in_flight_age = now - oldest;
      s.oldest_waiting_age = now - oldest_waiting;
      s.handle_duration = handle_duration_.snapshot();
    }
    // relaxed: statistics.
    s.hook_failures = hook_failures_.load(std::memory_order_relaxed);
    s.observer_failures = obs_ != nullptr ? obs_->failures() : 0;
    s.lag = source_->backlog();
    return s;
  }

  /// Dead letters the full queue refused so far (removed from the consumer). Thread-safe.
  [[nodiscard]] std::vector<dead_letter<T>> take_refused_dead_letters() {
    std::lock_guard lock(mu_);
    auto out = std::move(refused_);
    refused_.clear();
    return out;
  }

  /// Messages released after `shutdown` returned: handlers it abandoned
  /// that then asked for a retry or defer (their ids were in
  /// `abandoned_ids`). Removed from the consumer. Thread-safe.
  [[nodiscard]] std::vector<envelope<T>> take_released() {
    std::lock_guard lock(mu_);
    auto out = std::move(released_late_);
    released_late_.clear();
    return out;
  }

  /// The name given in the options (metrics label). Never blocks.
  [[nodiscard]] const std::string& name() const noexcept { return opts_.name; }
  /// The source's name. Never blocks.
  [[nodiscard]] const std::string& source_name() const noexcept { return source_name_; }
  /// The consumer's clock. Never blocks.
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }
  /// When the consumer next has timed work on its clock: the earliest
  /// pending retry, defer or deadline timer, or the window end of a partial
  /// batch (`time_point::max()`: none), so a test advances the clock straight
  /// to it and calls `poll()` (postbox::testing::harness). Briefly takes the
  /// consumer's and the timer service's locks, one after the other; never
  /// allocates. Thread-safe.
  [[nodiscard]] time_point next_due() const {
    const time_point timer = timers_->next_deadline();
    std::lock_guard lock(mu_);
    if (!batch_ || ready_.empty()) return timer;
    return std::min(timer, window_end_locked());
  }

 private:
  struct item {
    struct returned_tag {};
    // Built by the receiver right from the source's envelope (one move);
    // seq and the times are set when it is admitted.
    item(envelope<T>&& e, settle_hook&& h) : hook(std::move(h)) {
      ::new (static_cast<void*>(&store_.moved)) envelope<T>(std::move(e));
      env_ = &store_.moved;
    }
    // Built around the receive_result a channel returned: `make()`'s result
    // is constructed right here, so the envelope is never moved again. Has
    // no envelope when the channel had none (the receiver drops the node).
    template <class F>
    item(returned_tag, F&& make) : in_result_(true) {
      ::new (static_cast<void*>(&store_.returned)) receive_result<envelope<T>>(std::forward<F>(make)());
      env_ = store_.returned.has_value() ? &*store_.returned : nullptr;
    }
    item(const item&) = delete;
    item& operator=(const item&) = delete;
    ~item() {
      if (in_result_) {
        store_.returned.~result();
      } else {
        store_.moved.~envelope();
      }
    }
    [[nodiscard]] envelope<T>& env() noexcept { return *env_; }
    [[nodiscard]] const envelope<T>& env() const noexcept { return *env_; }
    [[nodiscard]] bool has_env() const noexcept { return env_ != nullptr; }
    [[nodiscard]] receive_status returned_status() const noexcept { return store_.returned.status(); }

   private:
    union storage {
      storage() noexcept {}
      ~storage() {}
      envelope<T> moved;                          // handed over by a source's sink call
      receive_result<envelope<T>> returned;       // as the channel returned it
    } store_;
    envelope<T>* env_ = nullptr;
    bool in_result_ = false;

   public:
    settle_hook hook;
    std::uint64_t seq = 0;
    time_point received_at{};
    time_point ready_at{};  // batch consumers: when it last entered ready_ (the window starts there)
    time_point first_failure{};
    time_point last_failure{};
    time_point due{};  // when waiting: when its timer fires
    std::vector<failure_record> history;
    timer_service::timer_id timer = 0;
    std::coroutine_handle<> frame;  // a coroutine handler's run while it is running; else null
  };
  using item_list = std::list<item, detail::consumer_node_allocator<item>>;
  using item_iter = typename item_list::iterator;

  // What happens to a delivery after the decision: it stays in the consumer
  // (kept: parked for a retry or defer), or it leaves with a settle action.
  enum class fate : std::uint8_t { kept, ack, dead_letter, redeliver, release };
  struct conclusion {
    fate what = fate::kept;
    item_list node;  // the item when it leaves (what != kept)
    settle_outcome outcome = settle_outcome::none;
    duration delay{0};
    duration elapsed{0};
    std::string reason;
    std::string error;
    std::optional<detail::published_meta> kept_meta;  // observer data of a kept item
  };

  template <class H>
  static handler_type wrap(H&& h) {
    using F = std::decay_t<H>;
    if constexpr (std::is_invocable_v<F&, const envelope<T>&, consume_context&>) {
      using R = std::invoke_result_t<F&, const envelope<T>&, consume_context&>;
      if constexpr (std::is_void_v<R>) {
        return [f = F(std::forward<H>(h))](const envelope<T>& e, consume_context& c) mutable {
          f(e, c);
          return settlement::ack();
        };
      } else {
        static_assert(std::is_convertible_v<R, settlement>, "a handler returns postbox::settlement or void");
        return handler_type(std::forward<H>(h));
      }
    } else {
      static_assert(std::is_invocable_v<F&, const envelope<T>&>,
                    "a handler is callable as (const envelope<T>&) or (const envelope<T>&, consume_context&)");
      using R = std::invoke_result_t<F&, const envelope<T>&>;
      if constexpr (std::is_void_v<R>) {
        return [f = F(std::forward<H>(h))](const envelope<T>& e, consume_context&) mutable {
          f(e);
          return settlement::ack();
        };
      } else {
        static_assert(std::is_convertible_v<R, settlement>, "a handler returns postbox::settlement or void");
        return [f = F(std::forward<H>(h))](const envelope<T>& e, consume_context&) mutable {
          return settlement(f(e));
        };
      }
    }
  }

  template <class H>
  static async_handler_type wrap_async(H&& h) {
    using F = std::decay_t<H>;
    if constexpr (std::is_invocable_v<F&, const envelope<T>&, consume_context&>) {
      return [f = F(std::forward<H>(h))](const envelope<T>& e, consume_context& c) mutable {
        return async_task(f(e, c));
      };
    } else {
      return [f = F(std::forward<H>(h))](const envelope<T>& e, consume_context&) mutable {
        return async_task(f(e));
      };
    }
  }

  // ---- draining ------------------------------------------------------------

  // Caller holds mu_. The source is closed and nothing taken is unsettled
  // (held_ covers ready, running, waiting and keyed items until conclude
  // has settled them).
  bool drain_done_locked() const noexcept {
    return source_closed_ && held_ == 0 && running_count_ == 0 && settling_ == 0;
  }

  // Workers do the work; wait on the clock until done, the deadline, or a
  // concurrent shutdown. Returns whether the drain finished.
  bool drain_threaded(time_point deadline) {
    std::unique_lock lock(mu_);
    while (!shut_down_ && !drain_done_locked() && clock_->now() < deadline) {
      ++settle_waiters_;
      clock_->wait_until(lock, idle_cv_, deadline);
      --settle_waiters_;
    }
    return !shut_down_ && drain_done_locked();
  }

  // threads == 0: the caller runs due timers, receives and handles until done
  // or the deadline. Returns whether the drain finished.
  bool drain_manual(time_point deadline) {
    const poller_count counted(pollers_);
    item_list trash;  // declared before the lock: emptied after it is released
    for (;;) {
      timers_->run_due();
      (void)receive_some(duration::zero());
      std::unique_lock lock(mu_);
      while (!stopped_ && work_ready_locked()) (void)run_next(lock, trash);
      if (shut_down_) return false;
      if (drain_done_locked()) return true;
      if (clock_->now() >= deadline) return false;
      if (may_receive_locked()) {
        // Nothing ready and room for more: wait for input (real time).
        lock.unlock();
        (void)receive_some(opts_.receive_wait);
        continue;
      }
      // Closed, or the budget is full of messages waiting for a retry (or run
      // by a concurrent poll): wait on the clock for the next timer or the
      // deadline; a settling handler also wakes us.
      if (batch_ && !ready_.empty()) arm_window_locked();
      const time_point next = std::min(timers_->next_deadline(), deadline);
      if (clock_->now() < next && !work_ready_locked()) {
        ++settle_waiters_;
        clock_->wait_until(lock, idle_cv_, next);
        --settle_waiters_;
      }
    }
  }

  // ---- receiving -----------------------------------------------------------

  // Caller holds mu_. Whether someone may call the source now.
  bool may_receive_locked() const noexcept {
    return accepting_ && !source_closed_ && !receiving_ && held_ < opts_.max_in_flight;
  }

  // The receiving side's sink: sources construct the item right in its
  // pooled node (one envelope move), poison and foreign-tenant input is
  // dead-lettered at once. Used under receive_mu_ only.
  class receiver final : public inbound_sink<T> {
   public:
    explicit receiver(consumer& c) : self_(&c), pending_(detail::consumer_node_allocator<item>(&c.pool_)) {}
    void accept(envelope<T>&& env, settle_hook&& hook) override {
      if (self_->filters_tenants_ && !self_->tenant_accepted(env.tenant)) {
        ++handled_;
        self_->dead_letter_foreign(std::move(env), std::move(hook));
        return;
      }
      pending_.emplace_back(std::move(env), std::move(hook));
    }
    // channel_source's path: the item is built around the receive_result
    // the channel returns (no envelope move at all); `make()` receives.
    static constexpr bool takes_receive_results = true;
    template <class F>
    receive_status emplace_returned(F&& make) {
      if (direct_to_ != nullptr) {  // a direct run's buffer (run_direct): no node
        using result_type = receive_result<envelope<T>>;
        result_type* r = ::new (direct_to_) result_type(std::forward<F>(make)());
        if (!r->has_value()) {
          const receive_status st = r->status();
          r->~result_type();
          return st;
        }
        direct_filled_ = true;
        return receive_status::ok;
      }
      pending_.emplace_back(typename item::returned_tag{}, std::forward<F>(make));
      item& it = pending_.back();
      if (!it.has_env()) {
        const receive_status st = it.returned_status();
        pending_.pop_back();
        return st;
      }
      if (self_->filters_tenants_ && !self_->tenant_accepted(it.env().tenant)) {
        envelope<T> env = std::move(it.env());
        settle_hook hook = std::move(it.hook);
        pending_.pop_back();
        ++handled_;
        self_->dead_letter_foreign(std::move(env), std::move(hook));
      }
      return receive_status::ok;
    }
    void accept_poison(poison_input&& p, settle_hook&& hook) override {
      ++handled_;
      self_->dead_letter_poison(std::move(p), std::move(hook));
    }
    consumer* self_;
    void* direct_to_ = nullptr;   // set by run_direct: emplace_returned builds its result there, not in a node
    bool direct_filled_ = false;  // emplace_returned built a result at direct_to_
    bool fills_nodes_ = false;    // the source delivered through accept(): run_direct does not apply
    item_list pending_;        // received, not admitted yet
    std::size_t handled_ = 0;  // poison and foreign items dead-lettered at receipt
  };

  // Items received per admission (one lock of mu_ admits them all).
  static constexpr std::size_t admit_chunk = 16;

  // Receives while there is budget: the first call waits up to `first_wait`
  // (real time), the rest do not block. Serialized by receive_mu_ (the
  // source is called from one thread at a time). Messages are admitted in
  // chunks of up to admit_chunk under one lock. Returns poison (and
  // foreign-tenant) items handled.
  std::size_t receive_some(duration first_wait) {
    std::lock_guard receiving(receive_mu_);
    std::size_t budget = 0;
    {
      std::lock_guard lock(mu_);
      if (!accepting_ || source_closed_ || held_ >= opts_.max_in_flight) return 0;
      budget = opts_.max_in_flight - held_;  // held_ grows only here (serialized): a safe bound
    }
    receiver_.handled_ = 0;
    duration wait = first_wait;
    bool closed = false;
    for (;;) {
      const receive_status st = source_->receive_into(wait, receiver_);
      wait = duration::zero();
      if (st != receive_status::ok) {
        closed = st == receive_status::closed;
        break;
      }
      if (receiver_.pending_.size() >= budget) break;
      if (receiver_.pending_.size() >= admit_chunk) {
        budget -= receiver_.pending_.size();
        std::lock_guard lock(mu_);
        admit_pending_locked();
        if (!accepting_) break;
      }
    }
    std::lock_guard lock(mu_);
    end_receiving_locked(closed);
    return receiver_.handled_;
  }

  // Caller holds mu_ and receive_mu_, at the end of a receiving step:
  // admits what is pending, and records a source that reported closed.
  void end_receiving_locked(bool closed) {
    admit_pending_locked();
    if (closed) {
      source_closed_ = true;
      if (settle_waiters_ > 0) idle_cv_.notify_all();  // a drain may be finished now
    }
  }

  // Whether the options let the consumer handle messages of `tenant`.
  bool tenant_accepted(std::string_view tenant) const noexcept {
    if (opts_.tenants.empty() && !opts_.accept_tenant) return true;
    for (const auto& t : opts_.tenants)
      if (t == tenant) return true;
    if (!opts_.accept_tenant) return false;
    POSTBOX_TRY { return opts_.accept_tenant(tenant); }
    POSTBOX_CATCH_ALL {}
    return false;
  }

  // A message of a tenant the consumer does not accept: dead-lettered
  // (reason "tenant") without a delivery, as poison input is.
  void dead_letter_foreign(envelope<T>&& env, settle_hook&& hook) {
    {
      std::lock_guard lock(mu_);
      ++received_;
    }
    dead_letter<T> d;
    d.reason = std::string(dead_letter_reasons::tenant);
    d.error = "the consumer does not accept tenant '" + env.tenant + "'";
    d.source = source_name_;
    d.first_failure = d.last_failure = clock_->now();
    std::optional<detail::published_meta> meta;
    if (obs_ != nullptr && obs_->on_settle) meta.emplace(env);
    d.message.emplace(std::move(env));
    const bool ok = add_dead_letter(d);
    run_hook(hook, settle_action{ok ? settle_action::kind::dead_letter : settle_action::kind::release, {}});
    const auto outcome = ok ? settle_outcome::dead_lettered : settle_outcome::dead_letter_refused;
    if (meta) notify(meta->event(source_name_), outcome, {}, dead_letter_reasons::tenant);
    std::lock_guard lock(mu_);
    if (ok) {
      ++dead_lettered_;
    } else {
      ++dead_letter_refused_;
      refused_.push_back(std::move(d));
    }
  }

  // Caller holds mu_ (and receive_mu_). Takes the received items in: each
  // gets its sequence number and goes to ready_, or behind its key.
  void admit_pending_locked() {
    item_list& pending = receiver_.pending_;
    if (pending.empty()) return;
    const time_point now = clock_->now();
    std::size_t woken = 0;
    // Unkeyed items stay in `pending` and go to ready_ as one run (one
    // splice), flushed before a keyed item is placed so arrival order holds.
    for (item_iter pos = pending.begin(); pos != pending.end();) {
      pos->seq = ++last_seq_;
      pos->received_at = pos->ready_at = now;
      ++received_;
      ++held_;
      const std::string& key = pos->env().partition_key;
      if (key.empty()) {
        ++pos;
        ++woken;
        continue;
      }
      ready_.splice(ready_.end(), pending, pending.begin(), pos);  // the unkeyed run before it
      const item_iter keyed = pos++;
      auto [k, fresh] = keys_.try_emplace(key);
      if (fresh) {
        ready_.splice(ready_.end(), pending, keyed);
        ++woken;
      } else {
        k->second.splice(k->second.end(), pending, keyed);
      }
    }
    ready_.splice(ready_.end(), pending);
    for (std::size_t i = 0; i < woken && i < idle_workers_; ++i) work_cv_.notify_one();
  }

  // ---- running -------------------------------------------------------------

  // A worker runs ready messages; when there are none, it becomes the one
  // receiver (the others wait), so a message received by an idle worker
  // runs on that worker without a hand-off.
  void work_loop() {
    item_list trash;  // declared before the lock: emptied after it is released
    std::unique_lock lock(mu_);
    for (;;) {
      if (stopped_) return;
      if (work_ready_locked()) {
        (void)run_next(lock, trash);
        continue;
      }
      if (!trash.empty()) {  // free the last acked node before going idle or receiving
        lock.unlock();
        trash.clear();
        lock.lock();
        continue;
      }
      if (may_receive_locked()) {
        receiving_ = true;
        duration wait = opts_.receive_wait;
        if (batch_ && !ready_.empty()) {
          // A partial batch: wait for more input no longer than its window.
          const time_point end = window_end_locked();
          const time_point now = clock_->now();
          if (end != time_point::max()) wait = std::min(wait, end > now ? end - now : duration::zero());
        }
        lock.unlock();
        // A lone worker runs what it receives straight from the source when
        // it can (run_direct), else admits it (receive_some).
        if (!run_direct(wait, trash, true)) (void)receive_some(wait);
        lock.lock();
        receiving_ = false;
        // Another idle worker takes over receiving while this one runs what came in.
        if (idle_workers_ > 0 && !ready_.empty() && may_receive_locked()) work_cv_.notify_one();
        continue;
      }
      if (batch_ && !ready_.empty()) arm_window_locked();  // a partial batch: wake at its window
      ++idle_workers_;
      work_cv_.wait(lock);
      --idle_workers_;
    }
  }

  // ---- batches -------------------------------------------------------------

  template <class H>
  static batch_handlers wrap_batch_any(H&& h) {
    using F = std::decay_t<H>;
    static_assert(std::is_invocable_v<F&, const message_batch<T>&>,
                  "a batch handler is callable as (const message_batch<T>&)");
    using R = std::invoke_result_t<F&, const message_batch<T>&>;
    if constexpr (detail::is_batch_task_v<R>) {
      return batch_handlers{batch_handler_type{}, wrap_async_batch(std::forward<H>(h))};
    } else {
      return batch_handlers{wrap_batch(std::forward<H>(h)), async_batch_handler_type{}};
    }
  }

  // A coroutine batch handler as one returning task<batch_settlement>: the
  // adapter coroutine runs in the std::function's stored closure, which the
  // consumer keeps alive, and awaits the handler's task (which inherits the
  // consumer's scheduler through it).
  template <class H>
  static async_batch_handler_type wrap_async_batch(H&& h) {
    using F = std::decay_t<H>;
    using R = std::invoke_result_t<F&, const message_batch<T>&>;
    if constexpr (std::is_same_v<R, task<batch_settlement>>) {
      return async_batch_handler_type(F(std::forward<H>(h)));
    } else if constexpr (std::is_same_v<R, task<void>>) {
      return [f = F(std::forward<H>(h))](const message_batch<T>& b) mutable -> task<batch_settlement> {
        co_await f(b);
        co_return batch_settlement();
      };
    } else {
      return [f = F(std::forward<H>(h))](const message_batch<T>& b) mutable -> task<batch_settlement> {
        co_return batch_settlement(co_await f(b));
      };
    }
  }

  template <class H>
  static batch_handler_type wrap_batch(H&& h) {
    using F = std::decay_t<H>;
    static_assert(std::is_invocable_v<F&, const message_batch<T>&>,
                  "a batch handler is callable as (const message_batch<T>&)");
    using R = std::invoke_result_t<F&, const message_batch<T>&>;
    if constexpr (std::is_void_v<R>) {
      return [f = F(std::forward<H>(h))](const message_batch<T>& b) mutable {
        f(b);
        return batch_settlement();
      };
    } else {
      static_assert(std::is_convertible_v<R, batch_settlement>,
                    "a batch handler returns void, settlement, std::vector<settlement> or batch_settlement");
      return [f = F(std::forward<H>(h))](const message_batch<T>& b) mutable { return batch_settlement(f(b)); };
    }
  }

  // Caller holds mu_. Whether a worker has something to run now.
  bool work_ready_locked() const {
    if (!batch_) return !ready_.empty();
    if (ready_.empty()) return false;
    if (ready_.size() >= batch_->max_size) return true;
    // Nothing more can join: flush what is there.
    if (!accepting_ || source_closed_ || held_ >= opts_.max_in_flight) return true;
    return clock_->now() >= window_end_locked();
  }

  // Caller holds mu_, ready_ not empty. When the current partial batch is due.
  time_point window_end_locked() const noexcept {
    const time_point start = ready_.front().ready_at;
    if (batch_->window >= time_point::max() - start) return time_point::max();
    return start + batch_->window;
  }

  // Caller holds mu_, ready_ not empty. A timer that wakes the workers (and
  // a manual drain) when the partial batch's window ends.
  void arm_window_locked() {
    const time_point end = window_end_locked();
    if (end == time_point::max() || end == window_armed_) return;
    window_armed_ = end;
    (void)timers_->schedule_at(end, [this] {
      std::lock_guard lock(mu_);
      work_cv_.notify_all();
      if (settle_waiters_ > 0) idle_cv_.notify_all();
    });
  }

  // Caller holds `lock` and work_ready_locked(); returns holding it, with
  // the deliveries processed.
  //
  // `trash` holds a node acked on the fast path (see run_one) until the
  // caller next releases the lock: the caller empties it outside the lock.
  std::size_t run_next(std::unique_lock<std::mutex>& lock, item_list& trash) {
    if (batch_) return run_batch(lock);
    if (const std::size_t n = claimable_locked(); n >= 2) return run_claimed(lock, trash, n);
    run_one(lock, trash);
    return 1;
  }

  // Caller holds `lock`, ready_ not empty. Takes up to max_size ready
  // messages (dead-lettering the expired ones), runs the batch handler once
  // outside the lock and settles each message. Returns holding the lock.
  std::size_t run_batch(std::unique_lock<std::mutex>& lock) {
    std::vector<conclusion> expired;
    std::vector<item_iter> taken;
    taken.reserve(std::min(batch_->max_size, ready_.size()));
    while (taken.size() < batch_->max_size && !ready_.empty()) {
      const item_iter pos = ready_.begin();
      if (pos->env().expired(clock_->now())) {
        ++expired_;
        ++settled_;
        conclusion c = leave(ready_, pos, fate::dead_letter, settle_outcome::dead_lettered);
        c.reason = std::string(dead_letter_reasons::expired);
        c.error = "the deadline passed before delivery " + std::to_string(pos->env().attempt + 1) + " started";
        expired.push_back(std::move(c));
        continue;
      }
      ++pos->env().attempt;
      ++started_;
      ++running_count_;
      running_.splice(running_.end(), ready_, pos);
      taken.push_back(pos);
    }
    if (!taken.empty()) ++batches_;
    lock.unlock();
    for (auto& c : expired) conclude(std::move(c));
    if (taken.empty()) {
      lock.lock();
      return expired.size();
    }

    std::vector<const envelope<T>*> envs;
    envs.reserve(taken.size());
    for (const auto& pos : taken) {
      if (obs_ != nullptr) obs_->notify_receive(make_message_event(pos->env(), source_name_));
      envs.push_back(&pos->env());
    }
    const std::size_t n = expired.size() + taken.size();
    if (async_batch_handler_) {
      start_async_batch(std::move(taken), std::move(envs));
      lock.lock();
      return n;
    }
    const message_batch<T> batch(std::move(envs), stop_.get_token(), *clock_, source_name_);
    const time_point start = clock_->now();
    batch_settlement result;
    std::string err;
    bool threw = false;
#if POSTBOX_HAS_EXCEPTIONS
    try {
      result = batch_handler_(batch);
    } catch (...) {
      result = settlement_for(std::current_exception(), err);
      threw = true;
    }
#else
    result = batch_handler_(batch);
#endif
    settle_batch(taken, std::move(result), std::move(err), threw, clock_->now() - start);
    lock.lock();
    return n;
  }

  // Caller does not hold mu_; the batch's handler returned (or its task
  // completed) with `result`. Settles each message of `taken` (in running_).
  void settle_batch(const std::vector<item_iter>& taken, batch_settlement result, std::string err, bool threw,
                    duration elapsed) {
    if (result.per_message() && result.each().size() != taken.size()) {
      err = "the batch handler returned " + std::to_string(result.each().size()) + " settlements for " +
            std::to_string(taken.size()) + " messages";
      result = settlement::retry();
      threw = true;
    }
    std::vector<conclusion> done;
    done.reserve(taken.size());
    {
      std::lock_guard lock(mu_);
      handle_duration_.observe(elapsed);
      if (threw) ++handler_errors_;
      for (std::size_t i = 0; i < taken.size(); ++i) {
        taken[i]->frame = nullptr;
        --running_count_;
        ++settled_;
        const settlement& s = result.per_message() ? result.each()[i] : result.for_batch();
        conclusion c = decide(taken[i], s, err);
        c.elapsed = elapsed;
        done.push_back(std::move(c));
      }
      if (settle_waiters_ > 0) idle_cv_.notify_all();
    }
    for (auto& c : done) conclude(std::move(c));
  }

  // Caller does not hold mu_; `taken` was just moved to running_. Creates
  // the run of a coroutine batch handler, marks each message with its frame
  // (read by the destructor only, after every worker has stopped) and starts
  // it here: it runs until the handler's task first suspends (or completes).
  void start_async_batch(std::vector<item_iter> taken, std::vector<const envelope<T>*> envs) {
    detail::consumer_handler_run run = run_async_batch(taken, std::move(envs));
    run.handle.promise().sched = opts_.scheduler;
    for (const auto& pos : taken) pos->frame = run.handle;
    run.handle.resume();
  }

  // The run of one coroutine batch handler: the batch lives in this frame
  // until the task completes; an exception is classified as run_batch does.
  detail::consumer_handler_run run_async_batch(std::vector<item_iter> taken, std::vector<const envelope<T>*> envs) {
    const message_batch<T> batch(std::move(envs), stop_.get_token(), *clock_, source_name_);
    const time_point start = clock_->now();
    batch_settlement result;
    std::string err;
    bool threw = false;
#if POSTBOX_HAS_EXCEPTIONS
    try {
      result = co_await async_batch_handler_(batch);
    } catch (...) {
      result = settlement_for(std::current_exception(), err);
      threw = true;
    }
#else
    result = co_await async_batch_handler_(batch);
#endif
    settle_batch(taken, std::move(result), std::move(err), threw, clock_->now() - start);
  }

  // Caller holds `lock` and ready_ is not empty; returns holding it. An ack
  // with nothing to run outside the lock (no settle hook, no settle
  // observer) is counted here, under the lock the next message needs
  // anyway, and its node goes to `trash`, freed (envelope destroyed) at the
  // next unlock, outside the lock.
  void run_one(std::unique_lock<std::mutex>& lock, item_list& trash) {
    const item_iter pos = ready_.begin();
    item& it = *pos;
    if (it.env().deadline && it.env().expired(clock_->now())) {
      ++expired_;
      ++settled_;
      conclusion c = leave(ready_, pos, fate::dead_letter, settle_outcome::dead_lettered);
      c.reason = std::string(dead_letter_reasons::expired);
      c.error = "the deadline passed before delivery " + std::to_string(it.env().attempt + 1) + " started";
      lock.unlock();
      trash.clear();
      conclude(std::move(c));
      lock.lock();
      return;
    }
    ++it.env().attempt;
    ++started_;
    ++running_count_;
    running_.splice(running_.end(), ready_, pos);
    lock.unlock();
    trash.clear();

    if (obs_ != nullptr) obs_->notify_receive(make_message_event(it.env(), source_name_));
    if (async_handler_) {
      start_async(pos);
      lock.lock();
      return;
    }
    std::string err;
    bool threw = false;
    duration elapsed{0};
    const settlement s = invoke_handler(it.env(), err, threw, elapsed);
    lock.lock();
    handle_duration_.observe(elapsed);
    if (s.what() == settlement::kind::ack && !it.hook && (obs_ == nullptr || !obs_->on_settle)) {
      --running_count_;
      ++settled_;
      ++acked_;
      if (threw) ++handler_errors_;
      trash.splice(trash.end(), running_, pos);
      release_key(it.env().partition_key);
      --held_;
      budget_returned_locked();
      return;
    }
    lock.unlock();
    settle_run(pos, s, std::move(err), threw, elapsed, false);
    lock.lock();
  }

  // Caller does not hold mu_. Runs the synchronous handler on `it` (whose
  // attempt is counted already): its settlement, or the one its exception
  // classifies as (`threw` set, the text in `err`); `elapsed` on the clock.
  settlement invoke_handler(const envelope<T>& env, std::string& err, bool& threw, duration& elapsed) {
    time_point at = clock_->now();
    return invoke_handler_from(env, err, threw, at, elapsed);
  }

  // As invoke_handler, for a handler that starts at `at` (a reading of the
  // clock just taken); sets `at` to the reading at its end, so that a run
  // reads the clock once per message: one handler's end is the next one's
  // start (the few instructions between them count as the next handler's).
  settlement invoke_handler_from(const envelope<T>& env, std::string& err, bool& threw, time_point& at,
                                 duration& elapsed) {
    consume_context ctx(env.attempt, stop_, *clock_, source_name_, env.deadline);
    const time_point start = at;
    const settlement s = [&]() -> settlement {
#if POSTBOX_HAS_EXCEPTIONS
      try {
        return handler_(env, ctx);
      } catch (...) {
        threw = true;
        return settlement_for(std::current_exception(), err);
      }
#else
      return handler_(env, ctx);
#endif
    }();
    at = clock_->now();
    elapsed = at - start;
    return s;
  }

  // ---- claimed runs ---------------------------------------------------------
  //
  // A worker (or poll) that finds several messages ready claims up to
  // claim_limit of them under one lock, runs their handlers one after
  // another without it, and settles the acked ones under one lock at the
  // end: two lock operations per run instead of two per message. Claimed
  // messages stay visible: stats() counts them as queued until their handler
  // begins, then running, then acked, from the runner's progress counters;
  // shutdown() takes back the ones not begun (Dekker's pattern over
  // asymmetric fences: the runner pays a compiler barrier per message).
  //
  // Only messages that settle on the fast path are claimed: a synchronous
  // handler, no settle hook, no settle observer. A run ends early at the
  // first handler that does not ack (that message settles as run_one's do)
  // and before a message whose deadline has passed (run_one dead-letters it
  // next); its messages not begun go back to the front of ready_. A run
  // takes keyed messages only when no other thread runs this consumer's
  // messages, since its keys are released when the run ends.

  static constexpr std::size_t claim_limit = 16;

  // One run of claimed messages. Lives on its runner's stack; listed in
  // claims_ (under mu_) from the claim until the runner settles it.
  struct run_claim {
    explicit run_claim(detail::consumer_node_pool* pool) : items(detail::consumer_node_allocator<item>(pool)) {}
    run_claim(const run_claim&) = delete;
    run_claim& operator=(const run_claim&) = delete;

    item_list items;                       // the messages not yet settled, in order; relinked under mu_ only
    std::array<envelope<T>*, claim_limit> envs{};  // message i's envelope: the runner never follows list links unlocked
    std::array<duration, claim_limit> elapsed{};  // message i's handler time; written by the runner before `acked`
    std::size_t size = 0;                  // messages claimed; set before the claim is listed
    std::size_t settled = 0;               // leading messages already settled (removed from `items`); under mu_
    std::size_t kept = claim_limit;        // once revoked: messages [kept, size) were taken back; under mu_
    // A direct run (run_direct): its envelopes live in the runner's buffers
    // and `items` stays empty; messages taken back or not acked become
    // nodes under mu_ (direct_node_locked).
    bool direct = false;
    time_point received_at{};  // direct: when its messages were received
    // Runner-written progress, read under mu_ by stats() and shutdown():
    //  * begun: i + 1 just before message i's handler starts. Relaxed: its
    //    store and the load of `revoked` that follows are Dekker's pattern
    //    with shutdown()'s store of `revoked` and load of `begun`; the
    //    runner's light_fence() pairs with shutdown()'s heavy_fence().
    //  * acked: i + 1 once message i's handler returned ack. Release: pairs
    //    with shutdown()'s acquire load, which then reads elapsed[0..i] and
    //    settles those messages itself.
    std::atomic<std::size_t> begun{0};
    std::atomic<std::size_t> acked{0};
    // Set once by shutdown() under mu_ (then heavy_fence); the runner loads
    // it after each store of `begun` and, when set, asks `kept` under mu_.
    std::atomic<bool> revoked{false};

    // Under mu_: messages begun and not taken back (a runner's store of
    // `begun` for a message shutdown took is not a start).
    [[nodiscard]] std::size_t begun_count() const noexcept {
      const std::size_t b = begun.load(std::memory_order_relaxed);
      return revoked.load(std::memory_order_relaxed) ? std::min(b, kept) : b;
    }
    [[nodiscard]] envelope<T>& env(std::size_t i) const noexcept { return *envs[i]; }
  };

  // Counts a poll() (or manual drain) while it runs: how many threads share
  // ready_ in manual mode, so that one claims only its share.
  class poller_count {
   public:
    explicit poller_count(std::atomic<std::size_t>& n) noexcept : n_(n) {
      n_.fetch_add(1, std::memory_order_relaxed);  // relaxed: only sizes claims
    }
    ~poller_count() { n_.fetch_sub(1, std::memory_order_relaxed); }
    poller_count(const poller_count&) = delete;
    poller_count& operator=(const poller_count&) = delete;

   private:
    std::atomic<std::size_t>& n_;
  };

  // Caller holds mu_, ready_ not empty, not a batch consumer. How many
  // messages at the front of ready_ this thread may claim as one run (0 or
  // 1: run them one by one).
  std::size_t claimable_locked() const {
    if (async_handler_ || (obs_ != nullptr && obs_->on_settle)) return 0;
    const std::size_t runners =
        threaded_ ? opts_.threads : std::max<std::size_t>(1, pollers_.load(std::memory_order_relaxed));
    const std::size_t share = std::min(claim_limit, ready_.size() / runners);
    if (share < 2) return 0;
    std::size_t n = 0;
    for (auto p = ready_.begin(); n < share; ++p, ++n) {
      if (p->hook) break;
      if (runners > 1 && !p->env().partition_key.empty()) break;
      if (p->env().deadline && p->env().expired(clock_->now())) break;  // run_one dead-letters it
    }
    return n;
  }

  // Caller holds `lock`; the first n (2..claim_limit) messages of ready_ are
  // claimable. Claims, runs and settles them; returns holding the lock, with
  // the deliveries processed.
  std::size_t run_claimed(std::unique_lock<std::mutex>& lock, item_list& trash, std::size_t n) {
    run_claim claim(&pool_);
    auto end = ready_.begin();
    for (std::size_t i = 0; i < n; ++i, ++end) claim.envs[i] = &end->env();
    claim.items.splice(claim.items.end(), ready_, ready_.begin(), end);
    claim.size = n;
    claims_.push_back(&claim);
    lock.unlock();
    trash.clear();
    return run_claim_handlers(lock, claim, trash);
  }

  // Caller does not hold `lock`; `claim` is listed in claims_. Runs the
  // claimed handlers in order, then settles them; returns holding the lock,
  // with the deliveries processed.
  std::size_t run_claim_handlers(std::unique_lock<std::mutex>& lock, run_claim& claim, item_list& trash) {
    const std::size_t n = claim.size;
    std::size_t i = 0;
    std::optional<settlement> refused;  // the settlement that ended the run, when it is not an ack
    std::string err;
    bool threw = false;
    time_point at = clock_->now();  // then the end of each handler: one clock read per message
    for (; i < n; ++i) {
      claim.begun.store(i + 1, std::memory_order_relaxed);
      detail::light_fence();  // partner: shutdown()'s heavy_fence() between its revoke and its load of begun
      if (claim.revoked.load(std::memory_order_relaxed)) {
        lock.lock();
        const bool mine = i < claim.kept;
        lock.unlock();
        if (!mine) break;  // shutdown took it back: not touched again
        at = clock_->now();  // the lock may have waited for shutdown
      }
      envelope<T>& env = claim.env(i);
      if (env.deadline && env.expired(at)) {
        claim.begun.store(i, std::memory_order_relaxed);  // not begun after all: run_one dead-letters it next
        break;
      }
      ++env.attempt;
      if (obs_ != nullptr) obs_->notify_receive(make_message_event(env, source_name_));
      duration elapsed{0};
      settlement s = invoke_handler_from(env, err, threw, at, elapsed);
      claim.elapsed[i] = elapsed;
      if (s.what() != settlement::kind::ack) {
        refused.emplace(std::move(s));
        break;
      }
      claim.acked.store(i + 1, std::memory_order_release);  // publishes elapsed[i]; partner: shutdown()'s acquire load
    }

    lock.lock();
    claims_.erase(std::find(claims_.begin(), claims_.end(), &claim));
    settle_claimed_acks_locked(claim, i, trash);  // messages [0, i) acked (any shutdown() settled are skipped)
    if (claim.direct) {
      // What the run did not ack and shutdown did not take back becomes
      // nodes, in order (message i first: begun, when `refused`).
      const std::size_t limit = claim.revoked.load(std::memory_order_relaxed) ? claim.kept : n;
      for (std::size_t j = i; j < limit; ++j) claim.items.splice(claim.items.end(), direct_node_locked(claim, j));
    }
    if (!refused) {
      return_unclaimed(lock, claim.items);
      return i;
    }
    // Message i settles as run_one's would, after the rest went back.
    ++started_;
    ++running_count_;
    const item_iter pos = claim.items.begin();
    running_.splice(running_.end(), claim.items, pos);
    return_unclaimed(lock, claim.items);
    lock.unlock();
    settle_run(pos, *refused, std::move(err), threw, claim.elapsed[i], true);
    lock.lock();
    return i + 1;
  }

  // Caller holds mu_. A node for a direct run's message j, its envelope
  // moved out of the runner's buffer, as admission would have made it. A
  // heap node, not a pooled one: only the receiving side (under
  // receive_mu_, which is never taken after mu_) may take from the pool.
  item_list direct_node_locked(run_claim& claim, std::size_t j) {
    item_list node;
    node.emplace_back(std::move(claim.env(j)), settle_hook{});
    item& it = node.back();
    it.seq = ++last_seq_;
    it.received_at = it.ready_at = claim.received_at;
    return node;
  }

  // ---- direct runs ----------------------------------------------------------
  //
  // A poll() (or a consumer's only worker) that finds nothing queued skips
  // the nodes altogether: it
  // receives up to claim_limit messages straight into buffers on its stack
  // (no node, no admission, no ready_), runs them as a claimed run and
  // settles their acks under one lock. A message that does not ack, that
  // shutdown takes back, or that the run does not reach becomes a node
  // then, as admission would have made it. It applies only where a claimed
  // run would: unkeyed messages (a keyed one goes through admission and the
  // key table, and ends the receiving) from a source that hands over
  // receive results (channel sources), a synchronous single-message
  // handler, no settle observer, no tenant filter, one runner (a lone
  // poll() of a consumer without threads, or the only worker of one with a
  // single thread), and nothing in ready_ or in another run. So stats(),
  // shutdown() and the order of delivery see the claimed run it is.

  // Caller holds mu_ and receive_mu_. `worker`: the caller is a worker (it
  // set receiving_ itself), else a poll().
  bool direct_allowed_locked(bool worker) const {
    const bool lone = worker ? opts_.threads == 1 : !threaded_ && pollers_.load(std::memory_order_relaxed) == 1;
    return lone && !batch_ && !async_handler_ && !(obs_ != nullptr && obs_->on_settle) && !filters_tenants_ &&
           !receiver_.fills_nodes_ && ready_.empty() && claims_.empty() && accepting_ && !source_closed_ &&
           held_ < opts_.max_in_flight;  // accepting_ is false before stopped_ is set
  }

  // Storage for a direct run's receive results; destroys those built.
  struct direct_buffers {
    using result_type = receive_result<envelope<T>>;
    struct alignas(result_type) cell {
      unsigned char bytes[sizeof(result_type)];
    };
    direct_buffers() = default;
    direct_buffers(const direct_buffers&) = delete;
    direct_buffers& operator=(const direct_buffers&) = delete;
    ~direct_buffers() {
      for (std::size_t j = 0; j < built; ++j) result(j).~result_type();
    }
    void* slot(std::size_t j) noexcept { return &cells[j]; }
    result_type& result(std::size_t j) noexcept { return *std::launder(reinterpret_cast<result_type*>(&cells[j])); }

    std::array<cell, claim_limit> cells;
    std::size_t built = 0;  // results [0, built) are constructed
  };

  // A direct run; the first receive waits up to `first_wait` (real time),
  // the rest do not. Returns the deliveries processed (handler runs, and
  // poison input dead-lettered at receipt), or nullopt when it does not
  // apply, or, for a poll(), when nothing came in: the caller then takes
  // its usual path (a worker that received nothing has waited already).
  // Caller holds no lock; returns holding none.
  std::optional<std::size_t> run_direct(duration first_wait, item_list& trash, bool worker) {
    std::unique_lock receiving(receive_mu_);
    std::unique_lock lock(mu_);
    if (!direct_allowed_locked(worker)) return std::nullopt;
    const std::size_t budget = std::min(claim_limit, opts_.max_in_flight - held_);
    lock.unlock();

    // Declared before the claim: its envelopes outlive every use of it.
    direct_buffers buffers;
    run_claim claim(&pool_);
    claim.direct = true;
    receiver_.handled_ = 0;
    std::size_t m = 0;
    bool closed = false;
    duration wait = first_wait;
    while (m < budget) {
      receiver_.direct_to_ = buffers.slot(m);
      receiver_.direct_filled_ = false;
      const receive_status st = source_->receive_into(wait, receiver_);
      receiver_.direct_to_ = nullptr;
      wait = duration::zero();
      if (st != receive_status::ok) {
        closed = st == receive_status::closed;
        break;
      }
      if (!receiver_.pending_.empty()) {  // the source builds nodes (accept()): no direct runs for it
        receiver_.fills_nodes_ = true;
        break;
      }
      if (!receiver_.direct_filled_) continue;  // poison, dead-lettered at receipt
      buffers.built = m + 1;
      envelope<T>& env = *buffers.result(m);
      if (!env.partition_key.empty()) {  // keyed: admitted as a node (the key table orders it), after the run's
        receiver_.pending_.emplace_back(std::move(env), settle_hook{});
        break;
      }
      claim.envs[m++] = &env;
    }

    lock.lock();
    const bool admitted = !receiver_.pending_.empty();
    if (m > 0) {
      claim.size = m;
      claim.received_at = clock_->now();
      received_ += m;
      held_ += m;
      claims_.push_back(&claim);
    }
    end_receiving_locked(closed);
    const std::size_t handled = receiver_.handled_;
    receiving.unlock();
    lock.unlock();
    if (m == 0) {
      if (handled == 0 && !admitted && !worker) return std::nullopt;
      return handled;
    }
    trash.clear();  // a node the caller's last run_next acked, freed before the run
    const std::size_t ran = run_claim_handlers(lock, claim, trash);  // a direct run puts nothing in `trash`
    lock.unlock();
    return ran + handled;
  }

  // Caller holds `lock`; returns holding it. A run's messages not begun go
  // back to the front of ready_ in order; after a stop (shutdown() had
  // reported them abandoned) they are released to take_released().
  void return_unclaimed(std::unique_lock<std::mutex>& lock, item_list& left) {
    if (left.empty()) return;
    if (!stopped_) {
      ready_.splice(ready_.begin(), left);
      wake_worker();
      return;
    }
    detail::dependent_t<std::vector<conclusion>, T> late;
    while (!left.empty()) late.push_back(leave(left, left.begin(), fate::release, settle_outcome::released));
    lock.unlock();
    for (auto& c : late) conclude(std::move(c));
    lock.lock();
  }

  // Caller holds mu_ (shutdown, stopped_ just set). Takes every claimed
  // run back: its acked messages are settled here, its begun ones reported
  // abandoned (the runner settles them), its others go to `left`.
  void revoke_claims_locked(shutdown_report<T>& report, item_list& left, item_list& acked) {
    if (claims_.empty()) return;
    for (run_claim* c : claims_) c->revoked.store(true, std::memory_order_relaxed);
    detail::heavy_fence();  // partner: each runner's light_fence() between its store of begun and its load of revoked
    settle_claimed_acks_locked(acked);
    for (run_claim* c : claims_) {
      // Loaded after the acquire load of `acked` above: at least what was settled.
      c->kept = std::min(c->begun.load(std::memory_order_relaxed), c->size);
      for (std::size_t j = c->settled; j < c->kept; ++j) report.abandoned_ids.push_back(c->env(j).id);
      report.abandoned += c->kept - c->settled;
      if (c->direct) {
        // Its runner does not touch messages [kept, size) again (it finds
        // them not its own): moved out of its buffers here.
        for (std::size_t j = c->kept; j < c->size; ++j) left.splice(left.end(), direct_node_locked(*c, j));
      } else {
        auto p = c->items.begin();
        std::advance(p, static_cast<std::ptrdiff_t>(c->kept - c->settled));
        left.splice(left.end(), c->items, p, c->items.end());
      }
    }
  }

  // Caller holds mu_. Settles what every claimed run has acked so far (its
  // runner has let go of those messages), so counts read next include them.
  void settle_claimed_acks_locked(item_list& acked) {
    for (run_claim* c : claims_) {
      // acquire: pairs with the runner's release store; elapsed[0, done) is written.
      settle_claimed_acks_locked(*c, c->acked.load(std::memory_order_acquire), acked);
    }
  }

  // Caller holds mu_. Settles the claim's messages [claim.settled, upto),
  // whose handlers returned ack: counted as run_one counts a fast ack, their
  // nodes to `trash` (freed by the caller outside the lock).
  void settle_claimed_acks_locked(run_claim& claim, std::size_t upto, item_list& trash) {
    if (upto <= claim.settled) return;
    const std::size_t count = upto - claim.settled;
    for (std::size_t j = claim.settled; j < upto; ++j) {
      handle_duration_.observe(claim.elapsed[j]);
      release_key(claim.env(j).partition_key);
    }
    if (!claim.direct) {  // a direct run's acked envelopes are its runner's to destroy
      auto end = claim.items.begin();
      std::advance(end, static_cast<std::ptrdiff_t>(count));
      trash.splice(trash.end(), claim.items, claim.items.begin(), end);
    }
    claim.settled = upto;
    started_ += count;
    settled_ += count;
    acked_ += count;
    held_ -= count;
    budget_returned_locked(count);
  }

  // Caller does not hold mu_; `pos` is in running_ and its handler has
  // returned (or its task completed). Settles the delivery.
  // `observe`: record `elapsed` in the duration histogram (run_one already did).
  void settle_run(item_iter pos, const settlement& s, std::string err, bool threw, duration elapsed, bool observe) {
    conclusion c;
    {
      std::lock_guard lock(mu_);
      if (observe) handle_duration_.observe(elapsed);
      pos->frame = nullptr;
      --running_count_;
      if (threw) ++handler_errors_;
      ++settled_;
      c = decide(pos, s, std::move(err));
      c.elapsed = elapsed;
      if (c.what == fate::ack && !c.node.front().hook && (obs_ == nullptr || !obs_->on_settle)) {
        // An ack with nothing to run outside the lock (no settle hook, no
        // settle observer): counted here as conclude would count it, saving
        // conclude's second lock. The envelope is freed with `c`, unlocked.
        ++acked_;
        concluded_locked();
        return;
      }
      if (settle_waiters_ > 0) idle_cv_.notify_all();  // a parked message may be all that is left
    }
    conclude(std::move(c));
  }

  // Caller does not hold mu_; `pos` was just moved to running_. Creates the
  // run of a coroutine handler and starts it here: it runs until the
  // handler's task first suspends (or completes and settles).
  void start_async(item_iter pos) {
    detail::consumer_handler_run run = run_async(pos);
    run.handle.promise().sched = opts_.scheduler;
    pos->frame = run.handle;  // read by the destructor only, after every worker has stopped
    run.handle.resume();
  }

  // The run of one coroutine handler: awaits its task (which inherits the
  // consumer's scheduler), classifies an exception as run_one does, then
  // settles. The envelope and the context live until the task completes.
  detail::consumer_handler_run run_async(item_iter pos) {
    item& it = *pos;
    consume_context ctx(it.env().attempt, stop_, *clock_, source_name_, it.env().deadline);
    const time_point start = clock_->now();
    settlement s;
    std::string err;
    bool threw = false;
#if POSTBOX_HAS_EXCEPTIONS
    try {
      async_task t = async_handler_(it.env(), ctx);
      if (auto* with_settlement = std::get_if<task<settlement>>(&t)) {
        s = co_await std::move(*with_settlement);
      } else {
        co_await std::move(std::get<task<void>>(t));
        s = settlement::ack();
      }
    } catch (...) {
      s = settlement_for(std::current_exception(), err);
      threw = true;
    }
#else
    async_task t = async_handler_(it.env(), ctx);
    if (auto* with_settlement = std::get_if<task<settlement>>(&t)) {
      s = co_await std::move(*with_settlement);
    } else {
      co_await std::move(std::get<task<void>>(t));
      s = settlement::ack();
    }
#endif
    settle_run(pos, s, std::move(err), threw, clock_->now() - start, true);
  }

  // The destructor, after shutdown: coroutine handlers abandoned and still
  // suspended are destroyed (their tasks with them: a postbox operation they
  // await is abandoned safely) and their messages released to the source.
  void destroy_suspended_handlers() noexcept {
    item_list left;
    {
      std::lock_guard lock(mu_);
      for (auto p = running_.begin(); p != running_.end();) {
        const auto next = std::next(p);
        if (p->frame) left.splice(left.end(), running_, p);
        p = next;
      }
      running_count_ -= left.size();
      held_ -= left.size();
      released_ += left.size();
    }
    detail::dependent_t<std::vector<std::coroutine_handle<>>, T> destroyed;  // a batch's messages share one frame
    for (auto& it : left) {
      const std::coroutine_handle<> frame = std::exchange(it.frame, nullptr);
      if (std::find(destroyed.begin(), destroyed.end(), frame) == destroyed.end()) {
        destroyed.push_back(frame);
        frame.destroy();
      }
      call_hook(it, settle_action{settle_action::kind::release, {}});
      notify_settle(it.env(), settle_outcome::released, {}, {});
    }
  }

  static std::string describe(const std::exception_ptr& ep) {
#if POSTBOX_HAS_EXCEPTIONS
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return "unknown exception";
    }
#else
    (void)ep;
    return {};
#endif
  }

  // What a handler's exception settles as (reject when the classifier calls
  // it permanent, else retry); its text goes to `err`. One rule for the
  // synchronous, coroutine and batch handlers.
  settlement settlement_for(const std::exception_ptr& ep, std::string& err) {
    err = describe(ep);
    return classify(ep) == error_class::permanent
               ? settlement::reject(std::string(dead_letter_reasons::permanent_error))
               : settlement::retry();
  }

  error_class classify(const std::exception_ptr& ep) {
    if (!opts_.classify) return error_class::transient;
    POSTBOX_TRY { return opts_.classify(ep); }
    POSTBOX_CATCH_ALL {
      hook_failures_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
    }
    return error_class::transient;
  }

  // Caller holds mu_; `pos` is in running_. Decides what happens next.
  conclusion decide(item_iter pos, const settlement& s, std::string err) {
    item& it = *pos;
    const time_point now = clock_->now();
    switch (s.what()) {
      case settlement::kind::ack:
        return leave(running_, pos, fate::ack, settle_outcome::acked);
      case settlement::kind::reject: {
        record_failure(it, now, err.empty() ? s.reason() : err);
        conclusion c = leave(running_, pos, fate::dead_letter, settle_outcome::dead_lettered);
        c.reason = s.reason().empty() ? std::string(dead_letter_reasons::rejected) : s.reason();
        c.error = std::move(err);
        return c;
      }
      case settlement::kind::retry: {
        record_failure(it, now, err.empty() ? std::string("retry requested") : err);
        if (opts_.retry.exhausted(it.env().attempt)) {
          conclusion c = leave(running_, pos, fate::dead_letter, settle_outcome::dead_lettered);
          c.reason = std::string(dead_letter_reasons::retries_exhausted);
          c.error = err.empty() ? std::string("retry requested") : std::move(err);
          return c;
        }
        ++retried_;
        const duration delay = s.after() ? *s.after() : opts_.retry.backoff(it.env().attempt, jitter_.next());
        return put_back(pos, delay, settle_outcome::retried);
      }
      case settlement::kind::defer:
        --it.env().attempt;
        ++deferred_;
        return put_back(pos, opts_.defer_delay, settle_outcome::deferred);
    }
    return leave(running_, pos, fate::ack, settle_outcome::acked);
  }

  // Retry or defer: park it on a timer (in-process sources), hand it to the
  // broker (redelivering sources), or release it after shutdown.
  conclusion put_back(item_iter pos, duration delay, settle_outcome outcome) {
    if (stopped_) return leave(running_, pos, fate::release, settle_outcome::released);
    if (redelivers_) {
      conclusion c = leave(running_, pos, fate::redeliver, outcome);
      c.delay = delay;
      return c;
    }
    item& it = *pos;
    conclusion c;
    c.outcome = outcome;
    if (obs_ != nullptr && obs_->on_settle) c.kept_meta.emplace(it.env());
    time_point at = clock_->now() + delay;
    if (it.env().deadline && *it.env().deadline < at) at = *it.env().deadline;  // expire on time
    it.due = at;
    waiting_.splice(waiting_.end(), running_, pos);
    waiting_index_[it.seq] = pos;
    it.timer = timers_->schedule_at(at, [this, seq = it.seq] { on_timer(seq); });
    return c;
  }

  void on_timer(std::uint64_t seq) {
    std::lock_guard lock(mu_);
    auto f = waiting_index_.find(seq);
    if (f == waiting_index_.end()) return;
    const item_iter pos = f->second;
    waiting_index_.erase(f);
    pos->timer = 0;
    if (batch_) pos->ready_at = clock_->now();
    ready_.splice(ready_.end(), waiting_, pos);
    wake_worker();
  }

  // Caller holds mu_. Moves the item out of `from` into the conclusion and
  // lets the next message of its key go.
  conclusion leave(item_list& from, item_iter pos, fate f, settle_outcome outcome) {
    conclusion c;
    c.what = f;
    c.outcome = outcome;
    c.node.splice(c.node.end(), from, pos);
    ++settling_;
    release_key(c.node.front().env().partition_key);
    return c;
  }

  // Caller holds mu_.
  void release_key(const std::string& key) {
    if (key.empty() || stopped_) return;
    auto k = keys_.find(key);
    if (k == keys_.end()) return;
    if (k->second.empty()) {
      keys_.erase(k);
    } else {
      if (batch_) k->second.front().ready_at = clock_->now();
      ready_.splice(ready_.end(), k->second, k->second.begin());
      wake_worker();
    }
  }

  static void record_failure(item& it, time_point now, std::string error) {
    if (it.first_failure == time_point{}) it.first_failure = now;
    it.last_failure = now;
    it.history.push_back(failure_record{it.env().attempt, now, std::move(error)});
  }

  // Caller holds mu_.
  void wake_worker() {
    if (idle_workers_ > 0) work_cv_.notify_one();
  }

  // ---- settling (outside the lock) -----------------------------------------

  void conclude(conclusion&& c) {
    if (c.what == fate::kept) {
      if (c.kept_meta) notify(c.kept_meta->event(source_name_), c.outcome, c.elapsed, {});
      return;
    }
    item& it = c.node.front();
    settle_outcome outcome = c.outcome;
    switch (c.what) {
      case fate::ack:
        call_hook(it, settle_action{settle_action::kind::ack, {}});
        notify_settle(it.env(), outcome, c.elapsed, {});
        break;
      case fate::redeliver:
        call_hook(it, settle_action{settle_action::kind::redeliver, c.delay});
        notify_settle(it.env(), outcome, c.elapsed, {});
        break;
      case fate::release:  // an abandoned handler asked for a retry or defer after shutdown
        call_hook(it, settle_action{settle_action::kind::release, {}});
        notify_settle(it.env(), outcome, c.elapsed, {});
        break;
      case fate::dead_letter:
        outcome = dead_letter_item(it, std::move(c.reason), std::move(c.error), c.elapsed);
        break;
      case fate::kept: break;
    }
    std::lock_guard lock(mu_);
    switch (outcome) {
      case settle_outcome::acked: ++acked_; break;
      case settle_outcome::dead_lettered: ++dead_lettered_; break;
      case settle_outcome::dead_letter_refused: ++dead_letter_refused_; break;
      case settle_outcome::released: ++released_; break;
      default: break;  // retried/deferred were counted when decided
    }
    if (c.what == fate::release) released_late_.push_back(std::move(it.env()));
    concluded_locked();
  }

  // Caller holds mu_: a delivery that left (settled with its source) gives
  // its budget back.
  void concluded_locked() {
    --settling_;
    --held_;
    budget_returned_locked();
  }

  // Caller holds mu_, held_ just went down by `returned`.
  void budget_returned_locked(std::size_t returned = 1) {
    // The budget was exhausted and came back: an idle worker may receive now.
    if (held_ + returned >= opts_.max_in_flight && held_ < opts_.max_in_flight && idle_workers_ > 0 &&
        may_receive_locked())
      work_cv_.notify_one();
    if (settle_waiters_ > 0) idle_cv_.notify_all();
  }

  // Moves the item's envelope into the dead-letter queue (or, refused, into
  // refused_) and settles with the source. Kept out of conclude so the ack
  // path carries no dead_letter on its stack.
  settle_outcome dead_letter_item(item& it, std::string reason, std::string error, duration elapsed) {
    std::optional<detail::published_meta> meta;
    if (obs_ != nullptr && obs_->on_settle) meta.emplace(it.env());
    settle_hook hook = std::move(it.hook);
    dead_letter<T> d = make_dead_letter(it, std::move(reason), std::move(error));
    const std::string why = d.reason;
    settle_outcome outcome = settle_outcome::dead_lettered;
    if (add_dead_letter(d)) {
      run_hook(hook, settle_action{settle_action::kind::dead_letter, {}});
    } else {
      outcome = settle_outcome::dead_letter_refused;
      run_hook(hook, settle_action{settle_action::kind::release, {}});
      std::lock_guard lock(mu_);
      refused_.push_back(std::move(d));
    }
    if (meta) notify(meta->event(source_name_), outcome, elapsed, why);
    return outcome;
  }

  void dead_letter_poison(poison_input&& p, settle_hook&& hook) {
    {
      std::lock_guard lock(mu_);
      ++received_;
      ++poison_;
    }
    dead_letter<T> d;
    d.reason = std::move(p.reason);
    d.error = std::move(p.error);
    d.raw = std::move(p.raw);
    d.source = source_name_;
    d.first_failure = d.last_failure = clock_->now();
    const std::string reason = d.reason;
    const bool ok = add_dead_letter(d);
    run_hook(hook, settle_action{ok ? settle_action::kind::dead_letter : settle_action::kind::release, {}});
    const auto outcome = ok ? settle_outcome::dead_lettered : settle_outcome::dead_letter_refused;
    if (obs_ != nullptr && obs_->on_settle) {
      message_event e;
      e.source = source_name_;
      notify(e, outcome, {}, reason);
    }
    std::lock_guard lock(mu_);
    if (ok) {
      ++dead_lettered_;
    } else {
      ++dead_letter_refused_;
      refused_.push_back(std::move(d));
    }
  }

  dead_letter<T> make_dead_letter(item& it, std::string reason, std::string error) {
    const time_point now = clock_->now();
    dead_letter<T> d;
    d.reason = std::move(reason);
    d.error = std::move(error);
    d.attempts = it.env().attempt;
    d.prior_attempts = detail::header_number<std::uint32_t>(it.env().headers, header_names::dead_letter_attempts);
    d.redrives = detail::header_number<std::uint32_t>(it.env().headers, header_names::dead_letter_redrives);
    d.first_failure = it.first_failure == time_point{} ? now : it.first_failure;
    d.last_failure = it.last_failure == time_point{} ? now : it.last_failure;
    if (const auto first = detail::header_number<std::int64_t>(it.env().headers, header_names::dead_letter_first_failure);
        first != 0 && time_point(duration(first)) < d.first_failure)
      d.first_failure = time_point(duration(first));
    d.source = source_name_;
    d.history = std::move(it.history);
    d.message.emplace(std::move(it.env()));
    return d;
  }

  // True when the queue took it (`d` moved from), false when refused (`d` intact).
  bool add_dead_letter(dead_letter<T>& d) noexcept {
    POSTBOX_TRY { return dlq_->add(std::move(d)) == errc::ok; }
    POSTBOX_CATCH_ALL { return false; }
    return false;
  }

  void call_hook(item& it, const settle_action& a) noexcept { run_hook(it.hook, a); }

  void run_hook(settle_hook& h, const settle_action& a) noexcept {
    if (!h) return;
    POSTBOX_TRY { h(a); }
    POSTBOX_CATCH_ALL {
      hook_failures_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
    }
  }

  void notify_settle(const envelope<T>& env, settle_outcome outcome, duration elapsed, std::string_view reason) {
    if (obs_ == nullptr || !obs_->on_settle) return;
    notify(make_message_event(env, source_name_), outcome, elapsed, reason);
  }

  void notify(message_event e, settle_outcome outcome, duration elapsed, std::string_view reason) {
    if (obs_ == nullptr) return;
    e.outcome = outcome;
    e.elapsed = elapsed;
    e.reason = reason;
    obs_->notify_settle(e);
  }

  // Caller holds mu_. Whether shutdown has nothing more to wait for.
  bool drained_locked(time_point deadline) const {
    if (running_count_ != 0 || settling_ != 0 || !claims_.empty()) return false;
    if (!threaded_) return true;  // nobody else runs ready work
    if (!ready_.empty()) return false;
    // Waiting messages due before the deadline will run; keyed backlogs
    // follow their head, which is ready, running or waiting.
    for (const auto& it : waiting_)
      if (it.due < deadline) return false;
    return true;
  }

  std::unique_ptr<detail::source_base<T>> source_;
  handler_type handler_;              // single-message consumers
  async_handler_type async_handler_;  // single-message consumers of coroutine handlers
  batch_handler_type batch_handler_;  // batch consumers
  async_batch_handler_type async_batch_handler_;  // batch consumers of coroutine handlers
  const detail::dependent_t<std::optional<batch_options>, T> batch_;  // set: a batch consumer
  dead_letter_queue<T>* dlq_;
  consumer_options opts_;
  const clock* clock_;
  const observer* obs_;
  const bool redelivers_;
  const bool threaded_;
  const bool filters_tenants_ = !opts_.tenants.empty() || static_cast<bool>(opts_.accept_tenant);
  std::string source_name_;

  mutable std::mutex mu_;
  std::mutex receive_mu_;             // serializes source_->receive_into (workers, poll, shutdown)
  detail::consumer_node_pool pool_;   // item nodes; declared before every list so it outlives them
  receiver receiver_{*this};          // guarded by receive_mu_
  std::condition_variable work_cv_;   // workers: ready work, a chance to receive, or stopped_
  std::condition_variable idle_cv_;   // shutdown: work finished (waited on the clock)
  item_list ready_;                   // guarded by mu_
  item_list running_;                 // guarded by mu_; each node touched by its worker only
  item_list waiting_;                 // guarded by mu_
  std::unordered_map<std::uint64_t, item_iter> waiting_index_;  // guarded by mu_
  std::unordered_map<std::string, item_list> keys_;  // active keys -> messages queued behind; guarded by mu_
  std::vector<dead_letter<T>> refused_;              // guarded by mu_
  std::vector<envelope<T>> released_late_;           // guarded by mu_
  jitter_source jitter_;                             // guarded by mu_
  std::uint64_t last_seq_ = 0;                       // guarded by mu_
  std::size_t held_ = 0, running_count_ = 0, settling_ = 0, idle_workers_ = 0;  // guarded by mu_
  std::uint64_t received_ = 0, started_ = 0, acked_ = 0, retried_ = 0, deferred_ = 0, dead_lettered_ = 0,
                expired_ = 0, poison_ = 0, handler_errors_ = 0, dead_letter_refused_ = 0, released_ = 0,
                settled_ = 0, batches_ = 0;  // guarded by mu_
  time_point window_armed_{};  // batch consumers: the window end a timer is armed for; guarded by mu_
  bool accepting_ = true, stopped_ = false, shut_down_ = false, source_closed_ = false;  // guarded by mu_
  bool receiving_ = false;                                                              // guarded by mu_
  std::size_t settle_waiters_ = 0;  // threads in shutdown/drain waiting on idle_cv_; guarded by mu_
  detail::dependent_t<std::vector<run_claim*>, T> claims_;  // runs claimed and not settled; guarded by mu_
  /// poll() and manual drain() calls running now: the share of ready_ one
  /// claims. Relaxed: a sizing hint; no data is published through it.
  std::atomic<std::size_t> pollers_{0};
  /// Settle hooks and classifiers that threw. Written by any worker
  /// (relaxed fetch_add), read by stats() (relaxed): a statistic only.
  std::atomic<std::uint64_t> hook_failures_{0};
  detail::locked_duration_histogram handle_duration_;  // guarded by mu_
  std::stop_source stop_;
  detail::dependent_t<std::unique_ptr<timer_service>, T> timers_;
  detail::dependent_t<std::vector<std::thread>, T> workers_;
};

/// Registers a consumer under its name: received, acked, retried, deferred,
/// dead-lettered, expired, poison, refused and released counters; in-flight,
/// running, queued, waiting-retry, oldest-age and lag gauges; the handler
/// duration histogram. `c` must outlive the handle. Allocates; thread-safe.
template <class T>
[[nodiscard]] metrics_registry::registration register_consumer(metrics_registry& registry, const consumer<T>& c) {
  return registry.add("consumer", c.name(), [&c](metric_writer& w) {
    const auto s = c.stats();
    auto count = [&](const char* name, const char* help, std::uint64_t v) {
      w.counter(name, help, static_cast<double>(v));
    };
    count("postbox_consumer_received_total", "Messages taken from the source.", s.received);
    count("postbox_consumer_started_total", "Deliveries started.", s.started);
    count("postbox_consumer_batches_total", "Batch handler invocations.", s.batches);
    count("postbox_consumer_acked_total", "Deliveries acknowledged.", s.acked);
    count("postbox_consumer_retried_total", "Deliveries to be retried.", s.retried);
    count("postbox_consumer_deferred_total", "Deliveries deferred.", s.deferred);
    count("postbox_consumer_dead_lettered_total", "Messages dead-lettered.", s.dead_lettered);
    count("postbox_consumer_expired_total", "Messages past their deadline.", s.expired);
    count("postbox_consumer_poison_total", "Undecodable inputs.", s.poison);
    count("postbox_consumer_handler_errors_total", "Handler exceptions.", s.handler_errors);
    count("postbox_consumer_dead_letter_refused_total", "Dead letters refused by a full queue.",
          s.dead_letter_refused);
    count("postbox_consumer_released_total", "Messages given back unsettled.", s.released);
    w.gauge("postbox_consumer_in_flight", "Messages taken and not settled.", static_cast<double>(s.in_flight));
    w.gauge("postbox_consumer_max_in_flight", "Bound of in-flight messages.", static_cast<double>(s.max_in_flight));
    w.gauge("postbox_consumer_running", "Handlers running.", static_cast<double>(s.running));
    w.gauge("postbox_consumer_queued", "Messages ready or queued behind their key.", static_cast<double>(s.queued));
    w.gauge("postbox_consumer_waiting_retry", "Messages waiting for a retry or defer.",
            static_cast<double>(s.waiting_retry));
    w.gauge("postbox_consumer_oldest_age_seconds", "Age of the oldest unsettled message.",
            std::chrono::duration<double>(s.oldest_in_flight_age).count());
    if (s.lag) w.gauge("postbox_consumer_lag", "Messages waiting in the source.", static_cast<double>(*s.lag));
    w.histogram("postbox_consumer_handle_duration_seconds", "Handler duration.", s.handle_duration);
  });
}

POSTBOX_END_NAMESPACE
