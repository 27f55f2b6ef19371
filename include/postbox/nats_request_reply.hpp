// SPDX-License-Identifier: MIT
// Request-reply across processes over NATS: a requester with one wildcard reply inbox and a responder on a subject or queue group.
#pragma once

// Opt-in edge (layer 5), built on postbox/nats.hpp (libnats, target
// `postbox::nats`) and the in-process semantics of postbox/request_reply.hpp:
// the same `reply_outcome`, `reply_error`, `reply_future`, statuses and
// counters. Design notes: docs/design/nats.md, "Request-reply across processes".
//
// Addressing: a requester owns one inbox prefix (`_INBOX.<nuid>` unless
// named) and one subscription on `<inbox>.*`; each request's NATS reply
// subject, also written to the envelope's `reply-to` header, is
// `<inbox>.<correlation id>`, so a reply is matched by its subject even when
// it carries no envelope. A reply is an envelope (nats.hpp's wire format) or,
// for a responder error, an empty body with `Postbox-Error` (the errc name)
// and `Postbox-Error-Message` headers.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/nats.hpp>
#include <postbox/request_reply.hpp>

#include <nats/nats.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>

POSTBOX_BEGIN_NAMESPACE

namespace nats_headers {
/// On an error reply: the responder's error code (`to_string(errc)`).
inline constexpr const char* error_code = "Postbox-Error";
/// On an error reply: the error text (CR and LF replaced by spaces).
inline constexpr const char* error_message = "Postbox-Error-Message";
}  // namespace nats_headers

namespace detail {

/// The errc whose `to_string` is `name`; `handler_error` for an unknown name.
[[nodiscard]] inline errc parse_errc(std::string_view name) noexcept {
  for (int i = 1; i <= static_cast<int>(errc::stopped); ++i)
    if (to_string(static_cast<errc>(i)) == name) return static_cast<errc>(i);
  return errc::handler_error;
}

/// True when `s` can be a NATS subject prefix we subscribe under (no
/// whitespace or wildcards, no empty tokens).
[[nodiscard]] inline bool nats_plain_subject(std::string_view s) noexcept {
  if (s.empty() || s.front() == '.' || s.back() == '.' || s.find("..") != std::string_view::npos) return false;
  return s.find_first_of(" \t\r\n*>") == std::string_view::npos;
}

/// An asynchronous libnats subscription whose handler runs on the
/// subscription's delivery thread. The destructor unsubscribes and waits for
/// libnats' completion callback, so the handler is not running and never
/// runs again once it returns. Not copyable or movable.
class nats_async_subscription {
 public:
  using handler = std::function<void(nats_msg_ptr)>;

  /// Subscribes to `subject` (in `queue` when not empty). Throws
  /// postbox::error when libnats refuses. Allocates.
  nats_async_subscription(natsConnection* nc, const std::string& subject, const std::string& queue, handler h)
      : shared_(std::make_unique<shared>()) {
    shared_->fn = std::move(h);
    natsSubscription* sub = nullptr;
    nats_check(queue.empty()
                   ? natsConnection_Subscribe(&sub, nc, subject.c_str(), &on_msg, shared_.get())
                   : natsConnection_QueueSubscribe(&sub, nc, subject.c_str(), queue.c_str(), &on_msg, shared_.get()),
               "subscribe");
    const natsStatus s = natsSubscription_SetOnCompleteCB(sub, &on_complete, shared_.get());
    if (s != NATS_OK) {
      natsSubscription_Destroy(sub);
      nats_check(s, "subscription completion callback");
    }
    sub_.reset(sub);
  }
  nats_async_subscription(const nats_async_subscription&) = delete;
  nats_async_subscription& operator=(const nats_async_subscription&) = delete;

  /// Unsubscribes and waits for a running handler to return. Blocks.
  ~nats_async_subscription() {
    // Fails only when the connection already closed the subscription, in
    // which case libnats has run (or is running) the completion callback.
    (void)natsSubscription_Unsubscribe(sub_.get());
    bool seen = false;
    {
      std::unique_lock<std::mutex> lock(shared_->m);
      // Shutdown hang guard in real time, not a timed behaviour: libnats
      // always runs the completion callback after the last handler call.
      seen = shared_->cv.wait_for(lock, std::chrono::seconds(30), [&] { return shared_->done; });
    }
    sub_.reset();
    if (!seen) (void)shared_.release();  // NOLINT: keep it alive rather than risk a use after free
  }

 private:
  struct shared {
    handler fn;
    std::mutex m;                // guards done
    std::condition_variable cv;  // signalled when done becomes true
    bool done = false;
  };
  static void on_msg(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    nats_msg_ptr owned(msg);
    POSTBOX_TRY { static_cast<shared*>(closure)->fn(std::move(owned)); }
    POSTBOX_CATCH_ALL {}  // a handler exception must not unwind into libnats
  }
  static void on_complete(void* closure) {
    auto* s = static_cast<shared*>(closure);
    // Notify under the lock: the destructor cannot free `s` before this
    // scope releases the mutex, and nothing touches it afterwards.
    std::lock_guard<std::mutex> lock(s->m);
    s->done = true;
    s->cv.notify_all();
  }

  std::unique_ptr<shared> shared_;
  std::unique_ptr<natsSubscription, nats_sub_deleter> sub_;
};

/// A header-only error reply to `subject` (see the file comment). Allocates.
[[nodiscard]] inline result<nats_msg_ptr> nats_error_reply(const std::string& subject, const message_id& correlation,
                                                           const message_id& causation, const reply_error& e) {
  nats_library_open();
  natsMsg* raw = nullptr;
  if (natsMsg_Create(&raw, subject.c_str(), nullptr, "", 0) != NATS_OK) return errc::invalid_argument;
  nats_msg_ptr msg(raw);
  std::string text = e.message;
  for (char& c : text)
    if (c == '\r' || c == '\n') c = ' ';
  const errc code = e.code == errc::ok ? errc::handler_error : e.code;
  bool ok = natsMsgHeader_Set(msg.get(), nats_headers::error_code, std::string(to_string(code)).c_str()) == NATS_OK &&
            natsMsgHeader_Set(msg.get(), nats_headers::kind, "reply") == NATS_OK;
  if (ok && !text.empty()) ok = natsMsgHeader_Set(msg.get(), nats_headers::error_message, text.c_str()) == NATS_OK;
  if (ok && !correlation.is_nil())
    ok = natsMsgHeader_Set(msg.get(), nats_headers::correlation_id, correlation.to_string().c_str()) == NATS_OK;
  if (ok && !causation.is_nil())
    ok = natsMsgHeader_Set(msg.get(), nats_headers::causation_id, causation.to_string().c_str()) == NATS_OK;
  if (!ok) return errc::invalid_argument;
  return msg;
}

}  // namespace detail

/// NATS requester configuration. A plain value.
struct nats_requester_options {
  std::string subject{};           ///< request subject; empty: the envelope's type
  std::string inbox{};             ///< reply subject prefix; `_INBOX.<nuid>` when empty
  std::size_t max_pending = 1024;  ///< requests in flight before refusing with `busy`
  std::string producer{};          ///< stamped on request envelopes
};

/// NATS requester counters: the in-process ones plus the server's "no
/// responders" notices (the request still ends in `timeout` at its deadline).
struct nats_requester_stats : requester_stats {
  std::uint64_t no_responders = 0;
};

/// Sends request envelopes on NATS and matches replies arriving on its inbox
/// by correlation id, with the semantics of `postbox::requester`: each
/// accepted request completes exactly once with the reply, the responder's
/// error, `timeout` (a timer on `timers`, on its clock; also when nobody
/// answers) or `canceled` (destruction); late, duplicate and unknown replies
/// are dropped and counted. Outcomes run on the inbox delivery thread, a
/// timer thread or the destroying thread. Thread-safe.
template <class Request, class Reply>
class nats_requester {
 public:
  using callback = std::function<void(reply_outcome<Reply>)>;

  /// Subscribes to `<inbox>.*` and flushes so the server knows the inbox.
  /// Throws postbox::error (`invalid_argument` for a bad inbox, or a libnats
  /// failure). `conn` and `timers` must outlive this. Allocates.
  nats_requester(nats_connection& conn, timer_service& timers, nats_requester_options opts = {})
      : conn_(&conn), state_(std::make_shared<state>(timers, std::move(opts))) {
    auto& o = state_->opts;
    if (o.inbox.empty()) {
      detail::nats_library_open();
      natsInbox* inbox = nullptr;
      detail::nats_check(natsInbox_Create(&inbox), "inbox");
      o.inbox = inbox;
      natsInbox_Destroy(inbox);
    }
    if (!detail::nats_plain_subject(o.inbox))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::nats_requester: bad inbox subject: " + o.inbox));
    state_->prefix = o.inbox + ".";
    std::weak_ptr<state> weak = state_;
    sub_ = std::make_unique<detail::nats_async_subscription>(conn.native(), state_->prefix + "*", std::string(),
                                                             [weak](nats_msg_ptr m) {
                                                               if (auto s = weak.lock()) s->on_message(std::move(m));
                                                             });
    (void)conn.flush(std::chrono::milliseconds(5000));  // best effort: the SUB is resent after a reconnect
  }
  nats_requester(const nats_requester&) = delete;
  nats_requester& operator=(const nats_requester&) = delete;

  /// Unsubscribes (waiting for a reply being handled), then completes every
  /// pending request with `canceled` on this thread. Blocks.
  ~nats_requester() {
    sub_.reset();
    state_->cancel_all();
  }

  /// The reply subject prefix; reply subjects are `<inbox>.<correlation id>`.
  [[nodiscard]] const std::string& inbox() const noexcept { return state_->opts.inbox; }

  /// Sends `payload` as a `kind` request on the configured subject with
  /// deadline now + `timeout` (the timers' clock); `cb` gets the outcome.
  /// Returns `ok`, or a refusal on which `cb` is never called: `busy`
  /// (pending limit), `invalid_argument` (no subject, or it cannot be
  /// encoded), `closed` (connection closed), `full` (libnats' reconnect buffer
  /// is full). While reconnecting, libnats buffers the request. Allocates.
  [[nodiscard]] errc request(Request payload, duration timeout, callback cb, message_kind kind = message_kind::query) {
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

  /// Sends a caller-built request envelope on the configured subject (or its
  /// type when none is configured): id, type and headers kept; a fresh
  /// correlation id, `reply-to` and the deadline are set. As `request`.
  [[nodiscard]] errc send(envelope<Request> env, duration timeout, callback cb) {
    std::string subject = state_->opts.subject.empty() ? env.type : state_->opts.subject;
    return send(std::move(env), subject, timeout, std::move(cb));
  }

  /// As above, on `subject`.
  [[nodiscard]] errc send(envelope<Request> env, const std::string& subject, duration timeout, callback cb) {
    return dispatch(std::move(env), subject, timeout, std::move(cb));
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] nats_requester_stats stats() const {
    std::lock_guard lock(state_->mutex);
    auto s = state_->stats;
    s.pending = state_->pending_map.size();
    return s;
  }

 private:
  struct pending {
    callback cb;
    timer_service::timer_id timer = 0;
  };
  enum class finished : std::uint8_t { replied, expired };

  // The pending table mirrors requester's in request_reply.hpp: removal
  // under `mutex` is the single point that decides a request's outcome.
  struct state {
    state(timer_service& t, nats_requester_options o) : timers(&t), opts(std::move(o)) {}
    timer_service* timers;
    nats_requester_options opts;
    std::string prefix;  // "<inbox>."
    mutable std::mutex mutex;
    std::unordered_map<message_id, pending> pending_map;
    // Recently finished correlations, to tell late and duplicate replies
    // apart from unknown ones; bounded to 4 * max_pending (FIFO eviction).
    std::unordered_map<message_id, finished> done;
    std::deque<message_id> done_order;
    nats_requester_stats stats;

    void remember(const message_id& id, finished f) {
      done[id] = f;
      done_order.push_back(id);
      while (done_order.size() > 4 * (opts.max_pending == 0 ? 1 : opts.max_pending)) {
        done.erase(done_order.front());
        done_order.pop_front();
      }
    }

    static void complete(pending& p, errc status, std::optional<envelope<Reply>> r, std::optional<reply_error> e) {
      if (!p.cb) return;
      reply_outcome<Reply> o;
      o.status = status;
      o.reply = std::move(r);
      o.error = std::move(e);
      POSTBOX_TRY { p.cb(std::move(o)); }
      POSTBOX_CATCH_ALL {}  // a callback exception must not escape a libnats or timer thread
    }

    // Runs on the inbox subscription's delivery thread.
    void on_message(nats_msg_ptr msg) {
      if (natsMsg_IsNoResponders(msg.get())) {
        std::lock_guard lock(mutex);
        ++stats.no_responders;
        return;
      }
      const char* subj = natsMsg_GetSubject(msg.get());
      const std::string_view subject = subj ? subj : "";
      std::optional<message_id> corr;
      if (subject.size() > prefix.size() && subject.substr(0, prefix.size()) == prefix)
        corr = message_id::parse(subject.substr(prefix.size()));
      if (!corr) {
        std::lock_guard lock(mutex);
        ++stats.unmatched_replies;
        return;
      }
      reply_packet<Reply> packet{*corr, reply_error{}};
      const char* code = nullptr;
      if (natsMsgHeader_Get(msg.get(), nats_headers::error_code, &code) == NATS_OK && code != nullptr) {
        const char* text = nullptr;
        (void)natsMsgHeader_Get(msg.get(), nats_headers::error_message, &text);
        packet.body = reply_error{detail::parse_errc(code), text ? text : ""};
      } else {
        nats_decode_error err;
        if (auto env = from_nats_msg<Reply>(msg.get(), err)) packet.body = std::move(*env);
        else packet.body = reply_error{err.code, "reply did not decode: " + err.field};
      }
      on_reply(std::move(packet));
    }

    void on_reply(reply_packet<Reply> packet) {
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
        if (auto* e = std::get_if<envelope<Reply>>(&packet.body)) {
          reply.emplace(std::move(*e));
          ++stats.replied;
        } else {
          err.emplace(std::get<reply_error>(std::move(packet.body)));
          status = err->code == errc::ok ? errc::handler_error : err->code;
          ++stats.errors;
        }
        finished_p.emplace(std::move(it->second));
        pending_map.erase(it);
        remember(packet.correlation_id, finished::replied);
      }
      timers->cancel(finished_p->timer);
      complete(*finished_p, status, std::move(reply), std::move(err));
    }

    void on_timeout(const message_id& id) {
      std::optional<pending> p;
      {
        std::lock_guard lock(mutex);
        auto it = pending_map.find(id);
        if (it == pending_map.end()) return;
        p.emplace(std::move(it->second));
        pending_map.erase(it);
        remember(id, finished::expired);
        ++stats.timed_out;
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

  errc refuse(errc why) {
    std::lock_guard lock(state_->mutex);
    ++state_->stats.refused;
    return why;
  }

  errc dispatch(envelope<Request> env, const std::string& subject, duration timeout, callback cb) {
    if (subject.empty()) return refuse(errc::invalid_argument);
    const auto& clk = state_->timers->get_clock();
    env.correlation_id = message_id::generate(clk);
    const message_id corr = env.correlation_id;
    const std::string reply_subject = state_->prefix + corr.to_string();
    env.headers.set(std::string(header_names::reply_to), reply_subject);
    env.deadline = clk.now() + timeout;
    if (!state_->opts.producer.empty()) env.producer = state_->opts.producer;
    auto msg = to_nats_msg(env, subject, reply_subject);
    if (!msg.has_value()) return refuse(msg.status());
    {
      std::lock_guard lock(state_->mutex);
      if (state_->pending_map.size() >= state_->opts.max_pending) {
        ++state_->stats.refused;
        return errc::busy;
      }
      pending p;
      p.cb = std::move(cb);
      state_->pending_map.emplace(corr, std::move(p));
    }
    // Publish before arming the timer: a reply may complete the request at once.
    const natsStatus s = natsConnection_PublishMsg(conn_->native(), msg->get());
    if (s != NATS_OK) {
      std::lock_guard lock(state_->mutex);
      state_->pending_map.erase(corr);
      ++state_->stats.refused;
      const errc e = detail::nats_errc(s);
      return e == errc::ok ? errc::store_error : e;
    }
    std::weak_ptr<state> weak = state_;
    const auto id = state_->timers->schedule_at(*env.deadline, [weak, corr] {
      if (auto st = weak.lock()) st->on_timeout(corr);
    });
    std::lock_guard lock(state_->mutex);
    ++state_->stats.sent;
    auto it = state_->pending_map.find(corr);
    if (it != state_->pending_map.end()) it->second.timer = id;
    else state_->timers->cancel(id);  // already completed by a fast reply
    return errc::ok;
  }

  nats_connection* conn_;
  std::shared_ptr<state> state_;
  std::unique_ptr<detail::nats_async_subscription> sub_;  // destroyed first (in the destructor)
};

/// NATS responder configuration. A plain value.
struct nats_responder_options {
  std::string subject{};      ///< subject served (wildcards allowed)
  std::string queue_group{};  ///< responders in one group compete for each request; empty: each gets every one
  bool manual = false;        ///< true: nothing runs until `poll()` (deterministic tests)
};

/// Serves requests arriving on a NATS subject with
/// `handler(const envelope<Request>&) -> Reply` and publishes
/// `reply_to(request, reply)` (correlation kept, causation = request id) to
/// the request's NATS reply subject, else its `reply-to` header. As
/// `postbox::responder`: a handler exception becomes an error reply
/// (`postbox::error` keeps its code, others `handler_error`); a request past
/// its deadline on `clk` is not started and gets an `expired` error; a request
/// that does not decode gets its decode error. Handlers run one at a time on
/// the subscription's delivery thread, or in `poll()` when `manual`; run
/// several responders in one queue group to serve in parallel. Thread-safe.
template <class Request, class Reply>
class nats_responder {
 public:
  using handler = std::function<Reply(const envelope<Request>&)>;

  /// Subscribes and flushes so the server knows the subject before this
  /// returns. Throws postbox::error when libnats refuses. `conn` must outlive
  /// this. Allocates.
  nats_responder(nats_connection& conn, handler h, nats_responder_options opts, const clock& clk = default_clock())
      : conn_(&conn), handler_(std::move(h)), clock_(&clk), opts_(std::move(opts)) {
    if (opts_.manual) {
      natsSubscription* s = nullptr;
      detail::nats_check(opts_.queue_group.empty()
                             ? natsConnection_SubscribeSync(&s, conn.native(), opts_.subject.c_str())
                             : natsConnection_QueueSubscribeSync(&s, conn.native(), opts_.subject.c_str(),
                                                                 opts_.queue_group.c_str()),
                         "subscribe");
      sync_.reset(s);
    } else {
      async_ = std::make_unique<detail::nats_async_subscription>(conn.native(), opts_.subject, opts_.queue_group,
                                                                 [this](nats_msg_ptr m) { serve(m.get()); });
    }
    (void)conn.flush(std::chrono::milliseconds(5000));  // best effort: the SUB is resent after a reconnect
  }
  nats_responder(const nats_responder&) = delete;
  nats_responder& operator=(const nats_responder&) = delete;

  /// Unsubscribes; waits for a handler that is running. Blocks.
  ~nats_responder() { async_.reset(); }

  /// Manual mode: serves every request already received, waiting up to
  /// `wait` (real time: a network handoff bound) for the first; returns how
  /// many were served (0 when not manual). Blocks. Call from one thread.
  std::size_t poll(std::chrono::milliseconds wait) {
    if (!sync_) return 0;
    std::size_t n = 0;
    for (;;) {
      natsMsg* raw = nullptr;
      if (natsSubscription_NextMsg(&raw, sync_.get(), n == 0 ? wait.count() : 0) != NATS_OK || raw == nullptr)
        return n;
      nats_msg_ptr msg(raw);
      serve(msg.get());
      ++n;
    }
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] responder_stats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  void bump(std::uint64_t responder_stats::*field) {
    std::lock_guard lock(mutex_);
    ++(stats_.*field);
  }

  std::variant<envelope<Reply>, reply_error> run_handler(const envelope<Request>& req) {
#if defined(__cpp_exceptions)
    try {
      auto r = reply_to(req, handler_(req), *clock_);
      bump(&responder_stats::handled);
      return r;
    } catch (const error& e) {
      bump(&responder_stats::failed);
      return reply_error{e.code(), e.what()};
    } catch (const std::exception& e) {
      bump(&responder_stats::failed);
      return reply_error{errc::handler_error, e.what()};
    } catch (...) {
      bump(&responder_stats::failed);
      return reply_error{errc::handler_error, "unknown exception"};
    }
#else
    auto r = reply_to(req, handler_(req), *clock_);
    bump(&responder_stats::handled);
    return r;
#endif
  }

  void serve(natsMsg* msg) {
    const char* r = natsMsg_GetReply(msg);
    std::string reply_subject = r ? r : "";
    nats_decode_error derr;
    auto req = from_nats_msg<Request>(msg, derr);
    message_id correlation, causation;
    std::variant<envelope<Reply>, reply_error> body{reply_error{}};
    if (!req) {
      bump(&responder_stats::failed);
      // Keep what the headers say, so the requester can still match by id.
      const char* v = nullptr;
      if (natsMsgHeader_Get(msg, nats_headers::correlation_id, &v) == NATS_OK && v)
        correlation = message_id::parse(v).value_or(message_id{});
      body = reply_error{derr.code, "request did not decode: " + derr.field};
    } else {
      correlation = req->correlation_id;
      causation = req->id;
      if (reply_subject.empty())
        if (auto h = req->headers.get(header_names::reply_to)) reply_subject = std::string(*h);
      if (req->expired(clock_->now())) {  // the envelope's rule: expired at its deadline
        bump(&responder_stats::expired);
        body = reply_error{errc::expired, "request expired before it was started"};
      } else {
        body = run_handler(*req);
      }
    }
    if (reply_subject.empty()) {
      bump(&responder_stats::unroutable);
      return;
    }
    result<nats_msg_ptr> out = errc::invalid_argument;
    if (auto* env = std::get_if<envelope<Reply>>(&body)) {
      out = to_nats_msg(*env, reply_subject);
      if (!out.has_value()) {
        bump(&responder_stats::failed);
        out = detail::nats_error_reply(reply_subject, correlation, causation,
                                       reply_error{errc::invalid_argument, "reply could not be encoded"});
      }
    } else {
      out = detail::nats_error_reply(reply_subject, correlation, causation, std::get<reply_error>(body));
    }
    if (!out.has_value() || natsConnection_PublishMsg(conn_->native(), out->get()) != NATS_OK)
      bump(&responder_stats::unroutable);
  }

  nats_connection* conn_;
  handler handler_;
  const clock* clock_;
  nats_responder_options opts_;
  mutable std::mutex mutex_;  // guards stats_
  responder_stats stats_;
  std::unique_ptr<natsSubscription, detail::nats_sub_deleter> sync_;
  std::unique_ptr<detail::nats_async_subscription> async_;  // last: its handler uses the members above
};

POSTBOX_END_NAMESPACE
