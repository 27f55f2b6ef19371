// SPDX-License-Identifier: MIT
// postbox request-reply: requester, responder, reply endpoints and scatter-gather over channels.
#pragma once

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

// Design notes: docs/design/request_reply.md.

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

/// Maps reply endpoint names to sinks, so a `reply-to` header is a name that
/// could later cross a broker. All members thread-safe; add allocates.
template <class Reply>
class endpoint_registry {
 public:
  using sink = std::function<void(reply_packet<Reply>)>;

  /// Registers `name`; false if the name is taken. Allocates. Thread-safe.
  [[nodiscard]] bool add(const std::string& name, sink s) {
    std::lock_guard lock(mutex_);
    return sinks_.emplace(name, std::make_shared<sink>(std::move(s))).second;
  }
  /// Removes `name`; true if it existed. Thread-safe.
  bool remove(const std::string& name) {
    std::lock_guard lock(mutex_);
    return sinks_.erase(name) > 0;
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
  /// Whether `name` is registered. Thread-safe.
  [[nodiscard]] bool contains(const std::string& name) const {
    std::lock_guard lock(mutex_);
    return sinks_.count(name) > 0;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<sink>> sinks_;
};

namespace detail {
template <class V>
struct rr_future_state {
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<V> value;
  void set(V v) {
    {
      std::lock_guard lock(mutex);
      value.emplace(std::move(v));
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
  std::shared_ptr<detail::rr_future_state<V>> state_;
};

/// Requester configuration.
struct requester_options {
  std::string endpoint{};          ///< reply endpoint name; generated when empty
  std::size_t max_pending = 1024;  ///< requests in flight before refusing with `busy`
  std::string producer{};          ///< stamped on request envelopes
};

/// Requester counters (snapshot).
struct requester_stats {
  std::uint64_t sent = 0, replied = 0, errors = 0, timed_out = 0, canceled = 0, refused = 0;
  std::uint64_t late_replies = 0, duplicate_replies = 0, unmatched_replies = 0;
  std::size_t pending = 0;
};

/// Sends requests on a channel and matches replies by correlation id. Each
/// accepted request completes exactly once: reply, responder error, timeout
/// (a timer on `timers`, on its clock) or canceled (destruction). Thread-safe.
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
      : requests_(&requests), registry_(&registry), state_(std::make_shared<state>(timers, opts)) {
    if (state_->opts.endpoint.empty()) state_->opts.endpoint = "rr." + message_id::generate().to_string();
    std::weak_ptr<state> weak = state_;
    if (!registry.add(state_->opts.endpoint, [weak](reply_packet<Reply> p) {
          if (auto s = weak.lock()) s->on_reply(std::move(p));
        }))
      POSTBOX_THROW(error(errc::conflict, "postbox::requester: endpoint name taken: " + state_->opts.endpoint));
  }
  requester(const requester&) = delete;
  requester& operator=(const requester&) = delete;

  /// Unregisters the endpoint, completes every pending request with
  /// `canceled` on this thread, then blocks until every callback already
  /// running on another thread (a reply or a timeout) has returned, so
  /// nothing a callback uses is destroyed under it. A callback may destroy
  /// its own requester (its own run is not waited for).
  ~requester() {
    registry_->remove(state_->opts.endpoint);
    state_->cancel_all();
    state_->wait_callbacks();
  }

  /// The reply endpoint name put in `reply-to`. Never blocks.
  [[nodiscard]] const std::string& endpoint() const noexcept { return state_->opts.endpoint; }

  /// Sends `payload` as a `kind` request (query or command) with deadline
  /// now + `timeout`; `cb` gets the outcome (on the replying, timer or
  /// destroying thread). Returns `ok`, `busy` (pending limit), `full` or
  /// `closed` (request channel); on refusal `cb` is never called. Allocates.
  [[nodiscard]] errc request(Request payload, duration timeout, callback cb,
                             message_kind kind = message_kind::query) {
    auto env = make_envelope(std::string(message_traits<Request>::type_name()), std::move(payload), kind,
                             state_->timers->get_clock());
    return send(std::move(env), timeout, std::move(cb));
  }

  /// Future form of `request`: the refusal status, or a future of the outcome.
  [[nodiscard]] result<reply_future<reply_outcome<Reply>>> request(Request payload, duration timeout,
                                                                   message_kind kind = message_kind::query) {
    auto fs = std::make_shared<detail::rr_future_state<reply_outcome<Reply>>>();
    const errc s = request(std::move(payload), timeout, [fs](reply_outcome<Reply> o) { fs->set(std::move(o)); }, kind);
    if (s != errc::ok) return s;
    return reply_future<reply_outcome<Reply>>(fs);
  }

  /// Sends a caller-built request envelope (its id, type, headers kept; the
  /// correlation id is replaced by a fresh one, reply-to and deadline set).
  [[nodiscard]] errc send(envelope<Request> env, duration timeout, callback cb) {
    pending p;
    p.single = std::move(cb);
    return dispatch({requests_}, std::move(env), timeout, std::move(p));
  }

  /// Scatter-gather: one request to every channel in `targets`; completes
  /// with `ok` once `want` replies or errors arrived, or `timeout` at the
  /// deadline with what was collected. Same refusals as `request`.
  [[nodiscard]] errc gather(const std::vector<request_channel*>& targets, Request payload, std::size_t want,
                            duration timeout, gather_callback cb, message_kind kind = message_kind::query) {
    auto env = make_envelope(std::string(message_traits<Request>::type_name()), std::move(payload), kind,
                             state_->timers->get_clock());
    pending p;
    p.want = want == 0 ? 1 : want;
    p.multi = std::move(cb);
    return dispatch(targets, std::move(env), timeout, std::move(p));
  }

  /// Future form of `gather`.
  [[nodiscard]] result<reply_future<gather_outcome<Reply>>> gather(const std::vector<request_channel*>& targets,
                                                                   Request payload, std::size_t want,
                                                                   duration timeout) {
    auto fs = std::make_shared<detail::rr_future_state<gather_outcome<Reply>>>();
    const errc s = gather(targets, std::move(payload), want, timeout,
                          [fs](gather_outcome<Reply> o) { fs->set(std::move(o)); });
    if (s != errc::ok) return s;
    return reply_future<gather_outcome<Reply>>(fs);
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] requester_stats stats() const {
    std::lock_guard lock(state_->mutex);
    auto s = state_->stats;
    s.pending = state_->pending_map.size();
    return s;
  }

 private:
  struct pending {
    callback single;
    gather_callback multi;
    std::size_t want = 1;
    gather_outcome<Reply> collected;
    timer_service::timer_id timer = 0;
  };
  enum class finished : std::uint8_t { replied, expired };

  struct state : std::enable_shared_from_this<state> {
    state(timer_service& t, requester_options o) : timers(&t), opts(std::move(o)) {}
    timer_service* timers;
    requester_options opts;
    mutable std::mutex mutex;
    std::unordered_map<message_id, pending> pending_map;
    // Recently finished correlations, to tell late and duplicate replies
    // apart from unknown ones; bounded to 4 * max_pending (FIFO eviction).
    std::unordered_map<message_id, finished> done;
    std::deque<message_id> done_order;
    requester_stats stats;
    // Threads running a completion callback right now (one entry per run),
    // added under `mutex` in the same critical section that takes the
    // request out of pending_map, so cancel_all sees every request either
    // still pending or here. The destructor waits on `idle` until only its
    // own thread is left.
    std::vector<std::thread::id> running;
    std::condition_variable idle;

    // Registers the calling thread as running a callback (call under mutex)
    // and unregisters it when destroyed, also when the callback throws.
    class callback_run {
     public:
      explicit callback_run(state& s) : s_(&s) { s.running.push_back(std::this_thread::get_id()); }
      callback_run(const callback_run&) = delete;
      callback_run& operator=(const callback_run&) = delete;
      ~callback_run() {
        {
          std::lock_guard lock(s_->mutex);
          auto it = std::find(s_->running.begin(), s_->running.end(), std::this_thread::get_id());
          if (it != s_->running.end()) s_->running.erase(it);
        }
        s_->idle.notify_all();
      }

     private:
      state* s_;
    };

    void wait_callbacks() {
      const auto self = std::this_thread::get_id();
      std::unique_lock lock(mutex);
      idle.wait(lock, [&] {
        return std::all_of(running.begin(), running.end(), [&](const std::thread::id& t) { return t == self; });
      });
    }

    void remember(const message_id& id, finished f) {
      done[id] = f;
      done_order.push_back(id);
      while (done_order.size() > 4 * (opts.max_pending == 0 ? 1 : opts.max_pending)) {
        done.erase(done_order.front());
        done_order.pop_front();
      }
    }

    static void complete(pending& p, errc status, std::optional<envelope<Reply>> r, std::optional<reply_error> e) {
      if (p.single) {
        reply_outcome<Reply> o;
        o.status = status;
        o.reply = std::move(r);
        o.error = std::move(e);
        p.single(std::move(o));
      } else if (p.multi) {
        p.collected.status = status;
        p.multi(std::move(p.collected));
      }
    }

    void on_reply(reply_packet<Reply> packet) {
      // Declared first, so destroyed last: the callback and everything it
      // captured are gone before the destructor may stop waiting.
      std::optional<callback_run> run;
      std::optional<pending> finished_p;
      errc status = errc::ok;
      std::optional<envelope<Reply>> reply;
      std::optional<reply_error> err;
      {
        std::lock_guard lock(mutex);
        auto it = pending_map.find(packet.correlation_id);
        if (it == pending_map.end()) {
          auto d = done.find(packet.correlation_id);
          if (d == done.end()) ++stats.unmatched_replies;
          else if (d->second == finished::replied) ++stats.duplicate_replies;
          else ++stats.late_replies;
          return;
        }
        pending& p = it->second;
        if (p.multi) {
          if (auto* e = std::get_if<envelope<Reply>>(&packet.body)) p.collected.replies.push_back(std::move(*e));
          else p.collected.errors.push_back(std::get<reply_error>(std::move(packet.body)));
          ++stats.replied;
          if (p.collected.replies.size() + p.collected.errors.size() < p.want) return;
        } else if (auto* e = std::get_if<envelope<Reply>>(&packet.body)) {
          reply.emplace(std::move(*e));
          ++stats.replied;
        } else {
          err.emplace(std::get<reply_error>(std::move(packet.body)));
          status = err->code == errc::ok ? errc::handler_error : err->code;
          ++stats.errors;
        }
        finished_p.emplace(std::move(p));
        pending_map.erase(it);
        remember(packet.correlation_id, finished::replied);
        run.emplace(*this);
      }
      timers->cancel(finished_p->timer);
      complete(*finished_p, status, std::move(reply), std::move(err));
    }

    void on_timeout(const message_id& id) {
      std::optional<callback_run> run;  // first: destroyed after the callback (see on_reply)
      std::optional<pending> p;
      {
        std::lock_guard lock(mutex);
        auto it = pending_map.find(id);
        if (it == pending_map.end()) return;
        p.emplace(std::move(it->second));
        pending_map.erase(it);
        remember(id, finished::expired);
        ++stats.timed_out;
        run.emplace(*this);
      }
      complete(*p, errc::timeout, std::nullopt, std::nullopt);
    }

    void cancel_all() {
      std::unordered_map<message_id, pending> taken;
      {
        std::lock_guard lock(mutex);
        taken.swap(pending_map);
        stats.canceled += taken.size();
      }
      for (auto& [id, p] : taken) {
        timers->cancel(p.timer);
        complete(p, errc::canceled, std::nullopt, std::nullopt);
      }
    }
  };

  errc dispatch(const std::vector<request_channel*>& targets, envelope<Request> env, duration timeout, pending p) {
    const auto& clk = state_->timers->get_clock();
    env.correlation_id = message_id::generate(clk);
    env.headers.set(std::string(header_names::reply_to), state_->opts.endpoint);
    env.deadline = clk.now() + timeout;
    if (!state_->opts.producer.empty()) env.producer = state_->opts.producer;
    const message_id corr = env.correlation_id;
    {
      std::lock_guard lock(state_->mutex);
      if (state_->pending_map.size() >= state_->opts.max_pending) {
        ++state_->stats.refused;
        return errc::busy;
      }
      state_->pending_map.emplace(corr, std::move(p));
    }
    // Send before arming the timer: a reply may complete the request at once.
    std::size_t delivered = 0;
    send_status last = send_status::ok;
    for (auto* ch : targets) {
      envelope<Request> copy = env;
      last = ch->try_send(std::move(copy));
      if (last == send_status::ok) ++delivered;
    }
    if (delivered == 0) {
      std::lock_guard lock(state_->mutex);
      state_->pending_map.erase(corr);
      ++state_->stats.refused;
      return last == send_status::closed ? errc::closed : errc::full;
    }
    std::weak_ptr<state> weak = state_;
    const auto id = state_->timers->schedule_at(*env.deadline, [weak, corr] {
      if (auto s = weak.lock()) s->on_timeout(corr);
    });
    std::lock_guard lock(state_->mutex);
    ++state_->stats.sent;
    auto it = state_->pending_map.find(corr);
    if (it != state_->pending_map.end()) it->second.timer = id;
    else state_->timers->cancel(id);  // already completed by a fast reply
    return errc::ok;
  }

  request_channel* requests_;
  endpoint_registry<Reply>* registry_;
  std::shared_ptr<state> state_;
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
    while (auto req = requests_->try_receive()) {
      serve(*req);
      ++n;
    }
    return n;
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] responder_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  void run() {
    const std::stop_token stop = stop_.get_token();
    // receive(stop) answers empty when the channel is closed and drained or
    // when stop was requested first (then nothing was taken).
    while (auto r = requests_->receive(stop)) serve(*r);
  }

  void bump(std::uint64_t responder_stats::*field) {
    std::lock_guard lock(mutex_);
    ++(stats_.*field);
  }

  void serve(const envelope<Request>& req) {
    auto to = req.headers.get(header_names::reply_to);
    reply_packet<Reply> packet{req.correlation_id, reply_error{}};
    if (req.expired(clock_->now())) {  // the envelope's rule: expired at its deadline
      bump(&responder_stats::expired);
      packet.body = reply_error{errc::expired, "request expired before it was started"};
    } else {
#if defined(__cpp_exceptions)
      try {
        packet.body = reply_to(req, handler_(req), *clock_);
        bump(&responder_stats::handled);
      } catch (const error& e) {
        bump(&responder_stats::failed);
        packet.body = reply_error{e.code(), e.what()};
      } catch (const std::exception& e) {
        bump(&responder_stats::failed);
        packet.body = reply_error{errc::handler_error, e.what()};
      } catch (...) {
        bump(&responder_stats::failed);
        packet.body = reply_error{errc::handler_error, "unknown exception"};
      }
#else
      packet.body = reply_to(req, handler_(req), *clock_);
      bump(&responder_stats::handled);
#endif
    }
    if (!to || registry_->deliver(*to, std::move(packet)) != errc::ok) bump(&responder_stats::unroutable);
  }

  channel<envelope<Request>>* requests_;
  endpoint_registry<Reply>* registry_;
  handler handler_;
  const clock* clock_;
  mutable std::mutex mutex_;
  responder_stats stats_;
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
