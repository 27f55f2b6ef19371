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
#include <postbox/request_reply/pending.hpp>
#include <postbox/timer_service.hpp>

#include <nats/nats.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
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
  for (int i = 1; i <= static_cast<int>(errc::rate_limited); ++i)  // the last errc
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
    sub_ = {sub, nats_sub_deleter{nc}};
    if (s != NATS_OK) {
      // No completion callback: retire it here, before the handler state goes.
      sub_.reset();
      nats_check(s, "subscription completion callback");
    }
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
/// by correlation id, with the semantics of `postbox::requester` (the same
/// `pending_requests` table, request_reply/pending.hpp, with NATS as the
/// transport): each accepted request completes exactly once with the reply,
/// the responder's error, `timeout` (a timer on `timers`, on its clock; also
/// when nobody answers) or `canceled` (destruction); late, duplicate and
/// unknown replies are dropped and counted. Outcomes run on the inbox
/// delivery thread, a timer thread or the destroying thread; an exception
/// from a callback is caught and dropped there. Thread-safe.
template <class Request, class Reply>
class nats_requester {
 public:
  using callback = std::function<void(reply_outcome<Reply>)>;

  /// Subscribes to `<inbox>.*` and flushes so the server knows the inbox.
  /// Throws postbox::error (`invalid_argument` for a bad inbox, or a libnats
  /// failure). `conn` and `timers` must outlive this. Allocates.
  nats_requester(nats_connection& conn, timer_service& timers, nats_requester_options opts = {})
      : conn_(&conn),
        opts_(std::move(opts)),
        table_(table::create(timers, opts_.max_pending, callback_exceptions::contain)) {
    if (opts_.inbox.empty()) {
      detail::nats_library_open();
      natsInbox* inbox = nullptr;
      detail::nats_check(natsInbox_Create(&inbox), "inbox");
      opts_.inbox = inbox;
      natsInbox_Destroy(inbox);
    }
    if (!detail::nats_plain_subject(opts_.inbox))
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::nats_requester: bad inbox subject: " + opts_.inbox));
    prefix_ = opts_.inbox + ".";
    // The destructor resets sub_ first, and that waits for a running handler,
    // so the handler may use `this`.
    sub_ = std::make_unique<detail::nats_async_subscription>(conn.native(), prefix_ + "*", std::string(),
                                                             [this](nats_msg_ptr m) { on_message(std::move(m)); });
    (void)conn.flush(std::chrono::milliseconds(5000));  // best effort: the SUB is resent after a reconnect
  }
  nats_requester(const nats_requester&) = delete;
  nats_requester& operator=(const nats_requester&) = delete;

  /// Unsubscribes (waiting for a reply being handled on the delivery
  /// thread), completes every pending request with `canceled` on this
  /// thread, then blocks until every callback already running on another
  /// thread (a timeout on a timer thread) has returned. A timer callback may
  /// destroy its own requester; a callback on the delivery thread must not
  /// (unsubscribing waits for that very callback). Blocks.
  ~nats_requester() {
    sub_.reset();
    table_->close();
  }

  /// The reply subject prefix; reply subjects are `<inbox>.<correlation id>`.
  [[nodiscard]] const std::string& inbox() const noexcept { return opts_.inbox; }

  /// Sends `payload` as a `kind` request on the configured subject with
  /// deadline now + `timeout` (the timers' clock); `cb` gets the outcome.
  /// Returns `ok`, or a refusal on which `cb` is never called: `busy`
  /// (pending limit), `invalid_argument` (no subject, or it cannot be
  /// encoded), `closed` (connection closed), `full` (libnats' reconnect buffer
  /// is full). While reconnecting, libnats buffers the request. Allocates.
  [[nodiscard]] errc request(Request payload, duration timeout, callback cb, message_kind kind = message_kind::query) {
    auto env = make_envelope(std::string(message_traits<Request>::type_name()), std::move(payload), kind,
                             table_->get_clock());
    return send(std::move(env), timeout, std::move(cb));
  }

  /// Future form of `request`: the refusal status, or a future of the outcome.
  [[nodiscard]] result<reply_future<reply_outcome<Reply>>> request(Request payload, duration timeout,
                                                                   message_kind kind = message_kind::query) {
    auto link = detail::make_future_link<reply_outcome<Reply>>();
    const errc s = request(std::move(payload), timeout, std::move(link.callback), kind);
    if (s != errc::ok) return s;
    return std::move(link.future);
  }

  /// Sends a caller-built request envelope on the configured subject (or its
  /// type when none is configured): id, type and headers kept; a fresh
  /// correlation id, `reply-to` and the deadline are set. As `request`.
  [[nodiscard]] errc send(envelope<Request> env, duration timeout, callback cb) {
    std::string subject = opts_.subject.empty() ? env.type : opts_.subject;
    return send(std::move(env), subject, timeout, std::move(cb));
  }

  /// As above, on `subject`.
  [[nodiscard]] errc send(envelope<Request> env, const std::string& subject, duration timeout, callback cb) {
    return dispatch(std::move(env), subject, timeout, std::move(cb));
  }

  /// Counters snapshot. Thread-safe.
  [[nodiscard]] nats_requester_stats stats() const { return table_->stats(); }

 private:
  using table = pending_requests<Reply, nats_requester_stats>;

  // Runs on the inbox subscription's delivery thread: turns a message into
  // a reply packet for the table (matched by its subject's correlation id).
  void on_message(nats_msg_ptr msg) {
    if (natsMsg_IsNoResponders(msg.get())) {
      table_->count(&nats_requester_stats::no_responders);
      return;
    }
    const char* subj = natsMsg_GetSubject(msg.get());
    const std::string_view subject = subj ? subj : "";
    std::optional<message_id> corr;
    if (subject.size() > prefix_.size() && subject.substr(0, prefix_.size()) == prefix_)
      corr = message_id::parse(subject.substr(prefix_.size()));
    if (!corr) {
      table_->count(&nats_requester_stats::unmatched_replies);
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
    table_->on_reply(std::move(packet));
  }

  // Stamps and encodes, opens the pending entry (before publishing: a reply
  // may complete the request at once), publishes, then arms the deadline.
  errc dispatch(envelope<Request> env, const std::string& subject, duration timeout, callback cb) {
    if (subject.empty()) return table_->refuse(errc::invalid_argument);
    const message_id corr = table_->stamp(env, timeout, opts_.producer);
    const std::string reply_subject = prefix_ + corr.to_string();
    env.headers.set(std::string(header_names::reply_to), reply_subject);
    auto msg = to_nats_msg(env, subject, reply_subject);
    if (!msg.has_value()) return table_->refuse(msg.status());
    if (const errc s = table_->open(corr, std::move(cb)); s != errc::ok) return s;
    const natsStatus s = natsConnection_PublishMsg(conn_->native(), msg->get());
    if (s != NATS_OK) {
      const errc e = detail::nats_errc(s);
      return table_->abandon(corr, e == errc::ok ? errc::store_error : e);
    }
    table_->arm(corr, *env.deadline);
    return errc::ok;
  }

  nats_connection* conn_;
  nats_requester_options opts_;
  std::string prefix_;  // "<inbox>."
  std::shared_ptr<table> table_;
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
      sync_ = {s, detail::nats_sub_deleter{conn.native()}};
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
