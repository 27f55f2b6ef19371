// SPDX-License-Identifier: MIT
// postbox request-reply: requester, responder, reply endpoints and scatter-gather over channels.
#pragma once

#include <postbox/async.hpp>
#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/request_reply/pending.hpp>
#include <postbox/timer_service.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

// Design notes: docs/design/request_reply.md.

POSTBOX_BEGIN_NAMESPACE

/// Maps reply endpoint names to sinks, so a `reply-to` header is a name that
/// could later cross a broker. All members thread-safe; add allocates.
template <class Reply>
class endpoint_registry {
 public:
  /// Takes the packet by rvalue reference: delivery moves it only where the
  /// sink keeps it (a sink taking it by value still converts).
  using sink = std::function<void(reply_packet<Reply>&&)>;

  /// A caller's memo of the last endpoint it delivered to (see `deliver`
  /// with a cache): one per thread, never shared.
  struct delivery_cache {
    std::string name;
    std::shared_ptr<sink> target;
    std::uint64_t generation = 0;
  };

  /// Registers `name`; false if the name is taken. Allocates. Thread-safe.
  [[nodiscard]] bool add(const std::string& name, sink s) {
    std::lock_guard lock(mutex_);
    const bool added = sinks_.emplace(name, std::make_shared<sink>(std::move(s))).second;
    // release: a cache that reads this generation also sees the new map
    // (it re-resolves under the mutex anyway); pairs with the acquire in deliver.
    if (added) generation_.fetch_add(1, std::memory_order_release);
    return added;
  }
  /// Removes `name`; true if it existed. A delivery that read the registry
  /// before the removal may still reach the removed sink. Thread-safe.
  bool remove(const std::string& name) {
    std::lock_guard lock(mutex_);
    const bool removed = sinks_.erase(name) > 0;
    // release: see add().
    if (removed) generation_.fetch_add(1, std::memory_order_release);
    return removed;
  }
  /// Delivers `packet` to `name`: `ok`, or `not_found` (packet dropped). The
  /// sink runs on the calling thread, outside the registry lock. Thread-safe.
  [[nodiscard]] errc deliver(std::string_view name, reply_packet<Reply> packet) {
    std::shared_ptr<sink> s;
    {
      std::lock_guard lock(mutex_);
      auto it = sinks_.find(std::string(name));
      if (it == sinks_.end()) return errc::not_found;
      s = it->second;
    }
    (*s)(std::move(packet));
    return errc::ok;
  }
  /// As `deliver`, remembering the resolved sink in `cache`: a delivery to
  /// the endpoint delivered to last, with no add or remove since, takes no
  /// lock and allocates nothing. Thread-safe; `cache` belongs to the caller.
  [[nodiscard]] errc deliver(std::string_view name, reply_packet<Reply>&& packet, delivery_cache& cache) {
    // acquire: pairs with the release increments in add() and remove().
    const std::uint64_t g = generation_.load(std::memory_order_acquire);
    if (cache.target == nullptr || cache.generation != g || cache.name != name) {
      std::lock_guard lock(mutex_);
      cache.target.reset();
      cache.name.assign(name);
      auto it = sinks_.find(cache.name);
      if (it == sinks_.end()) return errc::not_found;
      cache.target = it->second;
      cache.generation = g;
    }
    (*cache.target)(std::move(packet));
    return errc::ok;
  }
  /// Whether `name` is registered. Thread-safe.
  [[nodiscard]] bool contains(const std::string& name) const {
    std::lock_guard lock(mutex_);
    return sinks_.count(name) > 0;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<sink>> sinks_;  // guarded by mutex_
  /// Bumped (release, under mutex_) by every add and remove that changed
  /// sinks_; read (acquire) by a cached deliver to see whether its cached
  /// sink may be stale. Only ever grows.
  std::atomic<std::uint64_t> generation_{0};
};

namespace detail {
template <class V>
struct reply_future_access {
  static std::shared_ptr<rr_future_state<V>>& state(reply_future<V>& f) noexcept { return f.state_; }
};

/// Registers `w` in a future's continuation slot (one coroutine at a time).
template <class V>
void park_on_future(rr_future_state<V>& s, waker& w) {
  s.park_continuation(w);
}
template <class V>
void unpark_from_future(rr_future_state<V>& s, waker& w) noexcept {
  s.unpark_continuation(w);
}

/// async_get's operation: takes the outcome from a future the caller keeps.
template <class V>
struct future_get_op {
  using result_type = result<V>;
  rr_future_state<V>* s;

  std::optional<result_type> try_once() noexcept {
    if (!s->ready()) return std::nullopt;  // acquire: the value is readable after it
    return result_type(std::move(*s->value));
  }
  void park(waker& w) { park_on_future(*s, w); }
  void unpark(waker& w) noexcept { unpark_from_future(*s, w); }
  static result_type canceled() noexcept { return errc::canceled; }
  static result_type timeout() noexcept { return errc::timeout; }
};

/// async_request's operation: owns the request's future (or its refusal).
template <class Reply>
struct request_op {
  using result_type = reply_outcome<Reply>;
  errc refused = errc::ok;
  std::shared_ptr<rr_future_state<result_type>> s;

  static result_type with(errc status) noexcept {
    result_type r;
    r.status = status;
    return r;
  }
  std::optional<result_type> try_once() noexcept {
    if (!s) return with(refused);
    if (!s->ready()) return std::nullopt;  // acquire: the value is readable after it
    return std::move(*s->value);
  }
  void park(waker& w) {
    if (s) park_on_future(*s, w);
  }
  void unpark(waker& w) noexcept {
    if (s) unpark_from_future(*s, w);
  }
  static result_type canceled() noexcept { return with(errc::canceled); }
  static result_type timeout() noexcept { return with(errc::timeout); }
};
}  // namespace detail

/// `co_await async_get(f)`: the outcome of a reply future, taken from it
/// (call once), without blocking a thread: the future's completion posts the
/// coroutine to its scheduler instead of notifying a condition variable.
/// `canceled` when `stop` is stopped first, and then nothing is consumed (a
/// later get or async_get returns the outcome). One coroutine at a time may
/// await a future (a second gets error(busy) thrown into it). Allocates only
/// when it suspends. `f` must be valid and outlive the wait. Thread-safe
/// with the completing thread.
template <class V>
[[nodiscard]] detail::op_awaiter<detail::future_get_op<V>> async_get(reply_future<V>& f, std::stop_token stop = {}) {
  if (!f.valid()) POSTBOX_THROW(error(errc::invalid_argument, "postbox::async_get: the future refers to no request"));
  return {{detail::reply_future_access<V>::state(f).get()}, {std::move(stop), {}}};
}

/// Requester configuration.
struct requester_options {
  std::string endpoint{};          ///< reply endpoint name; generated (`rr.` + 12 hex digits) when empty
  std::size_t max_pending = 1024;  ///< requests in flight before refusing with `busy`
  std::string producer{};          ///< stamped on request envelopes
};

/// Sends requests on a channel and matches replies by correlation id. Each
/// accepted request completes exactly once: reply, responder error, timeout
/// (a timer on `timers`, on its clock) or canceled (destruction). The
/// bookkeeping is `pending_requests` (request_reply/pending.hpp); this class
/// is its in-process transport. Thread-safe.
template <class Request, class Reply>
class requester {
 public:
  using request_channel = channel<envelope<Request>>;
  using callback = std::function<void(reply_outcome<Reply>)>;
  using gather_callback = std::function<void(gather_outcome<Reply>)>;

  /// Registers the reply endpoint in `registry`; throws `error(conflict)` if
  /// the name is taken. Allocates. `timers` and `registry` must outlive this.
  requester(request_channel& requests, endpoint_registry<Reply>& registry, timer_service& timers,
            requester_options opts = {})
      : requests_(&requests),
        registry_(&registry),
        opts_(std::move(opts)),
        table_(pending_requests<Reply>::create(timers, opts_.max_pending)) {
    const bool generated = opts_.endpoint.empty();
    std::weak_ptr<pending_requests<Reply>> weak = table_;
    const typename endpoint_registry<Reply>::sink sink = [weak](reply_packet<Reply>&& p) {
      if (auto t = weak.lock()) t->on_reply(std::move(p));
    };
    for (;;) {
      if (generated) opts_.endpoint = generated_endpoint();
      if (registry.add(opts_.endpoint, sink)) break;
      if (!generated) POSTBOX_THROW(error(errc::conflict, "postbox::requester: endpoint name taken: " + opts_.endpoint));
    }
    reply_headers_.set(header_names::reply_to, opts_.endpoint);
  }
  requester(const requester&) = delete;
  requester& operator=(const requester&) = delete;

  /// Unregisters the endpoint, completes every pending request with
  /// `canceled` on this thread, then blocks until every callback already
  /// running on another thread (a reply or a timeout) has returned, so
  /// nothing a callback uses is destroyed under it. A callback may destroy
  /// its own requester (its own run is not waited for).
  ~requester() {
    registry_->remove(opts_.endpoint);
    table_->close();
  }

  /// The reply endpoint name put in `reply-to`. Never blocks.
  [[nodiscard]] const std::string& endpoint() const noexcept { return opts_.endpoint; }

  /// Sends `payload` as a `kind` request (query or command) with deadline
  /// now + `timeout`; `cb` gets the outcome (on the replying, timer or
  /// destroying thread). Returns `ok`, `busy` (pending limit), `full` or
  /// `closed` (request channel); on refusal `cb` is never called. Allocates
  /// nothing per request once the table has grown (32 slots at a time, and
  /// a ring of the last 4 x max_pending finished ids; the request shares
  /// the requester's reply-to header), unless
  /// `cb` is larger than std::function keeps inline, the payload allocates,
  /// or the type or producer name is too long for std::string's inline
  /// buffer (15 characters with libstdc++).
  [[nodiscard]] errc request(Request payload, duration timeout, callback cb,
                             message_kind kind = message_kind::query) {
    // On a slot, as the future form: the deadline is tracked under the one
    // lock taken before the send, and the reply runs the callback after one
    // CAS on the slot, without the table's lock.
    auto open = [&](message_id& corr, time_point deadline) { return table_->open_slot(corr, std::move(cb), deadline); };
    return send_in_place(std::move(payload), timeout, kind, open, true);
  }

  /// Future form of `request`: the refusal status, or a future of the outcome.
  /// The reply is moved once, into the future; waiting on it spins
  /// briefly, then sleeps. The future's state comes from a pool of blocks
  /// (detail::block_pool), so this allocates, as the callback form, nothing
  /// per request once the table and the pool have grown.
  [[nodiscard]] result<reply_future<reply_outcome<Reply>>> request(Request payload, duration timeout,
                                                                   message_kind kind = message_kind::query) {
    auto fs = detail::make_future_state<reply_outcome<Reply>>();
    // On a slot: the reply completes it without the table's lock. The slot
    // rewrites the id's low bits (the request carries the rewritten id).
    auto open = [&](message_id& corr, time_point deadline) { return table_->open_slot(corr, fs, deadline); };
    const errc s = send_in_place(std::move(payload), timeout, kind, open, true);
    if (s != errc::ok) return s;
    return reply_future<reply_outcome<Reply>>(std::move(fs));
  }

  /// `co_await req.async_request(payload, timeout)`: sends as `request` does
  /// (when called), then the awaiting coroutine suspends, without blocking a
  /// thread, until the one outcome: the reply (`ok()`), the responder's error,
  /// `timeout` (the deadline timer on the requester's timer service) or
  /// `canceled` (the requester destroyed). A refusal completes at once with
  /// `busy`, `full` or `closed` as the status. A stop request on `stop`
  /// completes the wait with `canceled`; the request itself stays pending
  /// until its reply or deadline, and that outcome is dropped. Resumes on the
  /// awaiting task's scheduler. Allocates (as `request`, plus a resume token
  /// when it suspends).
  [[nodiscard]] detail::op_awaiter<detail::request_op<Reply>> async_request(Request payload, duration timeout,
                                                                            std::stop_token stop = {},
                                                                            message_kind kind = message_kind::query) {
    auto f = request(std::move(payload), timeout, kind);
    detail::request_op<Reply> op;
    if (f.has_value()) {
      op.s = std::move(detail::reply_future_access<reply_outcome<Reply>>::state(*f));
    } else {
      op.refused = f.status();
    }
    return {std::move(op), {std::move(stop), {}}};
  }

  /// Sends a caller-built request envelope (its id, type, headers kept; the
  /// correlation id is replaced by a fresh one, reply-to and deadline set).
  /// On a slot, as `request` with a callback.
  [[nodiscard]] errc send(envelope<Request> env, duration timeout, callback cb) {
    return dispatch(
        one_target(), std::move(env), timeout,
        [&](message_id& corr, time_point deadline) { return table_->open_slot(corr, std::move(cb), deadline); }, true);
  }

  /// Scatter-gather: one request to every channel in `targets`; completes
  /// with `ok` once `want` replies or errors arrived, or `timeout` at the
  /// deadline with what was collected. Same refusals as `request`.
  [[nodiscard]] errc gather(const std::vector<request_channel*>& targets, Request payload, std::size_t want,
                            duration timeout, gather_callback cb, message_kind kind = message_kind::query) {
    auto env = make_request(std::move(payload), kind);
    return dispatch(targets, std::move(env), timeout,
                    [&](const message_id& corr, time_point) { return table_->open_gather(corr, want, std::move(cb)); },
                    false, true);
  }

  /// Future form of `gather`.
  [[nodiscard]] result<reply_future<gather_outcome<Reply>>> gather(const std::vector<request_channel*>& targets,
                                                                   Request payload, std::size_t want,
                                                                   duration timeout) {
    auto link = detail::make_future_link<gather_outcome<Reply>>();
    const errc s = gather(targets, std::move(payload), want, timeout, std::move(link.callback));
    if (s != errc::ok) return s;
    return std::move(link.future);
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] requester_stats stats() const { return table_->stats(); }

 private:
  std::span<request_channel* const> one_target() const noexcept { return {&requests_, 1}; }

  // A new request envelope, as make_envelope(type name, payload, kind, the
  // table's clock) makes it, with one clock read for its id and occurred_at.
  envelope<Request> make_request(Request&& payload, message_kind kind) const {
    return detail::make_envelope_at(std::string(message_traits<Request>::type_name()), std::move(payload), kind,
                                    table_->get_clock().now());
  }

  // The pieces of a request envelope, made before the channel slot is
  // claimed (everything that allocates); the channel builds the envelope
  // from them in its slot (try_emplace), moving each piece once, with
  // nothing that can throw. As make_request + stamp_fresh + the reply-to
  // header: correlation id = id, deadline = occurred_at + timeout.
  struct request_parts {
    message_id id;
    message_kind kind;
    time_point occurred_at;
    time_point deadline;
    std::string type;
    std::string producer;
    header_map headers;
    Request* payload;

    operator envelope<Request>() && noexcept {  // NOLINT(google-explicit-constructor)
      // (A channel's message type is nothrow move constructible, so Request is.)
      static_assert(std::is_nothrow_move_constructible_v<header_map> &&
                        std::is_nothrow_move_constructible_v<Request>,
                    "building the request in its slot must not throw");
      return envelope<Request>{.id = id,
                               .type = std::move(type),
                               .schema_version = message_traits<Request>::schema_version(),
                               .kind = kind,
                               .occurred_at = occurred_at,
                               .correlation_id = id,
                               .causation_id = {},
                               .producer = std::move(producer),
                               .partition_key = {},
                               .tenant = {},
                               .trace = {},
                               .deadline = deadline,
                               .attempt = 0,
                               .headers = std::move(headers),
                               .payload = std::move(*payload)};
    }
  };

  // One request to this requester's channel, built in place in the slot
  // (one move fewer than dispatch). Opens the pending entry first (a reply
  // may complete it at once); on a full or closed channel nothing was
  // built and the entry is abandoned. `tracked`: as in dispatch.
  template <class Open>
  errc send_in_place(Request&& payload, duration timeout, message_kind kind, Open& open, bool tracked) {
    const time_point now = table_->get_clock().now();
    request_parts parts{.id = message_id::generate_at(now),
                        .kind = kind,
                        .occurred_at = now,
                        .deadline = now + timeout,
                        .type = std::string(message_traits<Request>::type_name()),
                        .producer = opts_.producer,
                        .headers = reply_headers_,  // shared: no allocation (see reply_headers_)
                        .payload = &payload};
    message_id corr = parts.id;
    const time_point deadline = parts.deadline;
    if (const errc s = open(corr, deadline); s != errc::ok) return s;
    parts.id = corr;  // (open_slot addresses its slot in the id's low bits)
    const send_status sent = requests_->try_emplace(std::move(parts));
    if (sent != send_status::ok) return table_->abandon(corr, sent == send_status::closed ? errc::closed : errc::full);
    if (tracked) {
      table_->sent();
    } else {
      table_->arm(corr, deadline);
    }
    return errc::ok;
  }

  // "rr." and 12 hex digits (48 random bits). A name already taken is drawn
  // again (the constructor's loop).
  static std::string generated_endpoint() {
    constexpr char digits[] = "0123456789abcdef";
    std::uint64_t bits = detail::thread_rng()();
    std::string name = "rr.";
    for (int i = 0; i < 12; ++i, bits >>= 4) name.push_back(digits[bits & 0xfu]);
    return name;
  }

  // Stamps, opens the pending entry (before sending: a reply may complete
  // the request at once), sends to every target, then arms the deadline.
  // The last target gets the envelope itself (try_send moves only on ok),
  // the others a copy each.
  // `tracked`: `open` also took the deadline (then only `sent` remains).
  // `fresh`: `env` was made just now by make_request (see stamp_fresh).
  template <class Open>
  errc dispatch(std::span<request_channel* const> targets, envelope<Request>&& env, duration timeout, Open open,
                bool tracked = false, bool fresh = false) {
    message_id corr =
        fresh ? table_->stamp_fresh(env, timeout, opts_.producer) : table_->stamp(env, timeout, opts_.producer);
    const time_point deadline = *env.deadline;
    if (env.headers.empty()) {
      env.headers = reply_headers_;  // shared: no allocation (see reply_headers_)
    } else {
      env.headers.set(header_names::reply_to, opts_.endpoint);
    }
    if (const errc s = open(corr, deadline); s != errc::ok) return s;
    env.correlation_id = corr;  // (open_slot addresses its slot in the id's low bits)
    std::size_t delivered = 0;
    send_status last = send_status::ok;
    for (std::size_t i = 0; i < targets.size(); ++i) {
      if (i + 1 < targets.size()) {
        envelope<Request> copy = env;
        last = targets[i]->try_send(std::move(copy));
      } else {
        last = targets[i]->try_send(std::move(env));
      }
      if (last == send_status::ok) ++delivered;
    }
    if (delivered == 0) return table_->abandon(corr, last == send_status::closed ? errc::closed : errc::full);
    if (tracked) {
      table_->sent();
    } else {
      table_->arm(corr, deadline);
    }
    return errc::ok;
  }

  request_channel* requests_;
  endpoint_registry<Reply>* registry_;
  requester_options opts_;
  // The reply-to header every request carries, made once: each request's
  // header_map shares its entries (one atomic increment, no allocation).
  header_map reply_headers_;
  std::shared_ptr<pending_requests<Reply>> table_;
};

/// Responder counters (snapshot).
struct responder_stats {
  std::uint64_t handled = 0, failed = 0, expired = 0, unroutable = 0;
};

/// Serves a request channel with `handler(const envelope<Request>&) -> Reply`
/// and sends `reply_to(request, reply)` to the request's `reply-to` endpoint.
/// A handler exception becomes an error reply (`postbox::error` keeps its
/// code, others `handler_error`); a request past its deadline is not started
/// and gets an `expired` error reply. With `threads == 0` nothing runs until
/// `poll()`. Thread-safe.
template <class Request, class Reply>
class responder {
 public:
  using handler = std::function<Reply(const envelope<Request>&)>;

  /// Starts `threads` workers receiving from `requests`. Allocates.
  responder(channel<envelope<Request>>& requests, endpoint_registry<Reply>& registry, handler h,
            const clock& clk = default_clock(), std::size_t threads = 1)
      : requests_(&requests), registry_(&registry), handler_(std::move(h)), clock_(&clk) {
    for (std::size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  }
  responder(const responder&) = delete;
  responder& operator=(const responder&) = delete;
  /// Stops and joins the workers: each finishes the request it is handling
  /// (and replies to it); a worker blocked on an empty channel wakes at once;
  /// requests still queued stay in the channel. Blocks until joined.
  ~responder() {
    stop_.request_stop();  // wakes workers blocked in receive; see run()
    for (auto& t : workers_) t.join();
  }

  /// Handles every request queued now on the calling thread; returns how
  /// many were taken. Does not block on an empty channel.
  std::size_t poll() {
    std::size_t n = 0;
    typename endpoint_registry<Reply>::delivery_cache cache;
    for (;;) {
      auto req = requests_->try_receive_result();  // served in place, as run() does
      if (!req.has_value()) break;
      serve(*req, cache);
      ++n;
    }
    return n;
  }

  /// Counters snapshot (each counter exact; the four read one by one).
  /// Thread-safe.
  [[nodiscard]] responder_stats stats() const {
    responder_stats s;
    // relaxed: statistics; nothing is published through them.
    s.handled = handled_.load(std::memory_order_relaxed);
    s.failed = failed_.load(std::memory_order_relaxed);
    s.expired = expired_.load(std::memory_order_relaxed);
    s.unroutable = unroutable_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  void run() {
    const std::stop_token stop = stop_.get_token();
    // This worker's memo of the reply endpoint it delivered to last: a
    // steady requester's replies take no registry lock.
    typename endpoint_registry<Reply>::delivery_cache cache;
    // The blocking receive's own result (empty when the channel is closed
    // and drained or when stop was requested first, and then nothing was
    // taken), served where it is: no move into an optional.
    const detail::stop_tokens stops{&stop};
    for (;;) {
      // Spin first for the next request, checking every few pauses (the
      // reply future's rr_spin): the blocking receive below pauses in runs
      // doubling to 64, so a request that came 1-2 us after the last reply
      // was seen up to a 64-pause run late. What arrives meanwhile is taken
      // by the receive's first try, with no stop-callback registration; an
      // idle worker then spins the receive's own budget and parks.
      (void)detail::rr_spin::spin_until(
          [&] { return !requests_->empty_approx() || requests_->is_closed() || stop.stop_requested(); }, false);
      auto r = detail::channel_access::receive_blocking(*requests_, std::nullopt, stops);
      if (!r.has_value()) return;
      serve(*r, cache);
    }
  }

  // Converts to the reply envelope by running the handler: emplaced into the
  // packet's variant, the envelope is built in its place there (no move of
  // the envelope; g++ and clang elide the conversion's prvalue into the
  // variant's storage). The reply is reply_to(request, result), with its id
  // and occurred_at from one clock read made after the handler returned.
  struct handled_reply {
    responder* self;
    const envelope<Request>* req;
    operator envelope<Reply>() const {  // NOLINT(google-explicit-constructor)
      Reply result = self->handler_(*req);
      return detail::derive_at<Reply>(*req, std::string(message_traits<Reply>::type_name()), std::move(result),
                                      message_kind::reply, self->clock_->now());
    }
  };

  static void bump(std::atomic<std::uint64_t>& counter) noexcept {
    // relaxed: a statistic (see stats()).
    counter.fetch_add(1, std::memory_order_relaxed);
  }

  void serve(const envelope<Request>& req, typename endpoint_registry<Reply>::delivery_cache& cache) {
    auto to = req.headers.get(header_names::reply_to);
    reply_packet<Reply> packet{req.correlation_id, reply_error{}};
    if (req.expired(clock_->now())) {  // the envelope's rule: expired at its deadline
      bump(expired_);
      packet.body = reply_error{errc::expired, "request expired before it was started"};
    } else {
#if defined(__cpp_exceptions)
      try {
        packet.body.template emplace<envelope<Reply>>(handled_reply{this, &req});
        bump(handled_);
      } catch (const error& e) {
        bump(failed_);
        packet.body = reply_error{e.code(), e.what()};
      } catch (const std::exception& e) {
        bump(failed_);
        packet.body = reply_error{errc::handler_error, e.what()};
      } catch (...) {
        bump(failed_);
        packet.body = reply_error{errc::handler_error, "unknown exception"};
      }
#else
      packet.body.template emplace<envelope<Reply>>(handled_reply{this, &req});
      bump(handled_);
#endif
    }
    if (!to || registry_->deliver(*to, std::move(packet), cache) != errc::ok) bump(unroutable_);
  }

  channel<envelope<Request>>* requests_;
  endpoint_registry<Reply>* registry_;
  handler handler_;
  const clock* clock_;
  // Counters, bumped (relaxed) by whichever worker or poll() served the
  // request; read one by one (relaxed) by stats(). No data is published
  // through them.
  std::atomic<std::uint64_t> handled_{0}, failed_{0}, expired_{0}, unroutable_{0};
  // Stopped once by the destructor; every worker's blocking receive watches
  // its token (std::stop_source does its own synchronization).
  std::stop_source stop_;
  std::vector<std::thread> workers_;
};

/// Registers a requester's counters (sent, replied, errors, timed out,
/// canceled, refused, late, duplicate and unmatched replies, pending) under
/// `name`. `r` must outlive the handle. Allocates; thread-safe.
template <class Request, class Reply>
[[nodiscard]] metrics_registry::registration register_requester(metrics_registry& registry, std::string name,
                                                                const requester<Request, Reply>& r) {
  return registry.add("requester", std::move(name), [&r](metric_writer& w) {
    const requester_stats s = r.stats();
    auto c = [](std::uint64_t v) { return static_cast<double>(v); };
    w.counter("postbox_requester_sent_total", "Requests sent.", c(s.sent));
    w.counter("postbox_requester_replied_total", "Replies matched to a request.", c(s.replied));
    w.counter("postbox_requester_errors_total", "Requests answered with a responder error.", c(s.errors));
    w.counter("postbox_requester_timed_out_total", "Requests that timed out.", c(s.timed_out));
    w.counter("postbox_requester_canceled_total", "Requests canceled by the requester's destruction.", c(s.canceled));
    w.counter("postbox_requester_refused_total", "Requests refused (pending limit, full or closed channel).",
              c(s.refused));
    w.counter("postbox_requester_late_replies_total", "Replies that arrived after their request timed out.",
              c(s.late_replies));
    w.counter("postbox_requester_duplicate_replies_total", "Second replies to an answered request.",
              c(s.duplicate_replies));
    w.counter("postbox_requester_unmatched_replies_total", "Replies matching no known request.",
              c(s.unmatched_replies));
    w.gauge("postbox_requester_pending", "Requests waiting for their outcome.", static_cast<double>(s.pending));
  });
}

/// Registers a responder's counters (handled, failed, expired, unroutable)
/// under `name`. `r` must outlive the handle. Allocates; thread-safe.
template <class Request, class Reply>
[[nodiscard]] metrics_registry::registration register_responder(metrics_registry& registry, std::string name,
                                                                const responder<Request, Reply>& r) {
  return registry.add("responder", std::move(name), [&r](metric_writer& w) {
    const responder_stats s = r.stats();
    w.counter("postbox_responder_handled_total", "Requests answered.", static_cast<double>(s.handled));
    w.counter("postbox_responder_failed_total", "Requests answered with an error.", static_cast<double>(s.failed));
    w.counter("postbox_responder_expired_total", "Requests past their deadline, not started.",
              static_cast<double>(s.expired));
    w.counter("postbox_responder_unroutable_total", "Replies with no reachable reply-to endpoint.",
              static_cast<double>(s.unroutable));
  });
}

POSTBOX_END_NAMESPACE
