// SPDX-License-Identifier: MIT
// JetStream as an outbox relay destination: each stored message is published with Nats-Msg-Id = its id and counts as sent only after the PubAck.
#pragma once

// Opt-in edge (layer 5): needs libnats and nlohmann/json (CMake target
// `postbox::nats`). Design notes: docs/design/nats.md ("Outbox destination").

#include <postbox/nats.hpp>
#include <postbox/outbox.hpp>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// Settings of `to_jetstream`. A plain value.
struct jetstream_destination_options {
  /// Subject of a stored message; empty: the publisher's `subject_mapping`
  /// applied to the envelope type.
  std::function<std::string(const stored_message&)> subject{};
  /// Called after each PubAck (on the relay's thread, before the relay marks
  /// the message): `ack.duplicate` says the stream already had this id — a
  /// republish after a crash between publish and mark, absorbed by the
  /// duplicate window. Must not throw or block for long.
  std::function<void(const stored_message&, const publish_ack&)> on_ack{};
};

/// An `outbox_destination` that decodes each stored message with `codec`
/// and publishes it through `publisher` with `Nats-Msg-Id` = the message id,
/// returning `ok` only after the stream's PubAck — so `outbox_relay` marks a
/// message dispatched only once JetStream stored it.
///
/// * Unknown outcomes (PubAck timeout, no responders during an election, a
///   connection being restored) are republished with the same id by the
///   publisher (up to its `max_attempts`); if the outcome stays unknown the
///   destination returns `timeout`/`busy`, the relay keeps the message and
///   retries it with backoff, again with the same id. Either way the stream's
///   duplicate window stores it once. Keep the publisher's `max_attempts *
///   ack_timeout` well below the relay's lease.
/// * Order: one synchronous publish per call, so the relay's per-key order
///   is the stream's order (a failure holds back the rest of that key).
/// * A body the codec cannot decode, or an envelope NATS headers cannot
///   carry (CR/LF in a value), fails with the decode or `invalid_argument`
///   code, which the relay's default classifier calls permanent: the row
///   moves to the outbox dead letters (fix the data, then redrive it).
///
/// `T = nlohmann::json` with `json::codec` relays every message type through
/// one destination (the payload JSON goes out as it was staged).
/// `publisher` (and its jetstream and connection) must outlive the relay.
/// Blocks on the PubAck; allocates per message; thread-safe as the publisher.
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_jetstream(jetstream_publisher& publisher, Codec codec,
                                              jetstream_destination_options options = {}) {
  return [&publisher, codec = std::move(codec), options = std::move(options)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    env.id = m.id;  // the outbox row's id is the dedup identity, whatever the codec kept
    auto ack = options.subject ? publisher.publish(env, options.subject(m)) : publisher.publish(env);
    if (!ack.has_value()) return ack.status();
    if (options.on_ack) options.on_ack(m, *ack);
    return errc::ok;
  };
}

/// Settings of `to_jetstream_pipelined`. A plain value.
struct jetstream_pipeline_options {
  /// Subject of a stored message; empty: `subjects` applied to the envelope type.
  std::function<std::string(const stored_message&)> subject{};
  subject_mapping subjects{};  ///< envelope type -> subject when `subject` is empty
  /// Publishes awaiting their PubAck at most (at least 1). The sender waits
  /// for a PubAck before it sends past this bound.
  std::size_t window = 256;
  /// How long the batch waits without any PubAck arriving before the
  /// messages still unacknowledged count as unknown outcomes (`timeout`).
  std::chrono::milliseconds ack_timeout{2000};
  /// As in `jetstream_destination_options`: after each PubAck, on the
  /// relay's thread, in batch order, before the relay marks the batch.
  std::function<void(const stored_message&, const publish_ack&)> on_ack{};
};

namespace detail {

/// The state of a pipelined JetStream destination: its own libnats
/// JetStream context whose PubAck callback records each message's outcome.
/// One batch at a time (`run` is serialized).
class js_pipeline {
 public:
  js_pipeline(jetstream& js, jetstream_pipeline_options options) : js_(&js), options_(std::move(options)) {
    if (options_.window == 0) options_.window = 1;
    if (options_.ack_timeout <= std::chrono::milliseconds::zero()) options_.ack_timeout = std::chrono::milliseconds(1);
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = js.api_timeout().count();
    o.PublishAsync.AckHandler = &js_pipeline::on_pub_ack;
    o.PublishAsync.AckHandlerClosure = this;
    jsCtx* ctx = nullptr;
    nats_check(natsConnection_JetStream(&ctx, js.connection().native(), &o), "pipelined jetstream context");
    ctx_.reset(ctx);
  }
  js_pipeline(const js_pipeline&) = delete;
  js_pipeline& operator=(const js_pipeline&) = delete;
  ~js_pipeline() {
    // No PubAck callback may run once this is gone: take back whatever is
    // still pending (its late acks are then discarded by libnats) and wait
    // until libnats' pending count, dropped after each callback returns, is 0.
    natsMsgList pending{};
    if (js_PublishAsyncGetPendingList(&pending, ctx_.get()) == NATS_OK) natsMsgList_Destroy(&pending);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = options_.ack_timeout.count();
    (void)js_PublishAsyncComplete(ctx_.get(), &po);
  }

  template <class T, class Codec>
  void run(const Codec& codec, std::span<const stored_message> batch, std::span<errc> results, std::stop_token stop) {
    std::lock_guard one(run_mutex_);
    const std::size_t n = batch.size();
    {
      std::lock_guard lock(m_);
      slots_.assign(n, slot{});
      index_.clear();
      for (std::size_t i = 0; i < n; ++i) index_.emplace(batch[i].id.to_string(), i);
      failed_keys_.clear();
      outstanding_ = 0;
    }
    const std::uint64_t mark = js_->connection().permission_violations();
    bool stalled = false;
    for (std::size_t i = 0; i < n && !stalled; ++i) {
      const stored_message& m = batch[i];
      if (stop.stop_requested()) break;  // the rest stays `canceled`
      {
        std::unique_lock lock(m_);
        if (failed_keys_.count(m.partition_key) != 0) continue;  // held back: the relay releases it
        stalled = !await_locked(lock, options_.window - 1);
        if (stalled) break;
      }
      envelope<T> env;
      errc rc = errc::ok;
      if (!outbox_decode<T>(codec, m, env, rc)) {
        fail(i, m, rc);
        continue;
      }
      env.id = m.id;  // the outbox row's id is the dedup identity, whatever the codec kept
      const std::string subject = options_.subject ? options_.subject(m) : options_.subjects(env.type);
      auto msg = to_nats_msg(env, subject);
      if (!msg.has_value()) {
        fail(i, m, msg.status());
        continue;
      }
      const std::string id = m.id.to_string();
      jsPubOptions po;
      jsPubOptions_Init(&po);
      po.MsgId = id.c_str();
      {
        std::lock_guard lock(m_);
        slots_[i].sent = true;
        slots_[i].subject = subject;
        ++outstanding_;
      }
      natsMsg* raw = msg->release();
      const natsStatus s = js_PublishMsgAsync(ctx_.get(), &raw, &po);
      natsMsg_Destroy(raw);  // null when libnats took it
      if (s != NATS_OK) {
        std::lock_guard lock(m_);
        if (!slots_[i].done) {
          slots_[i].done = true;
          slots_[i].status = nats_errc(s);
          --outstanding_;
          failed_keys_.emplace(m.partition_key);
        }
      }
    }
    {
      std::unique_lock lock(m_);
      if (!stalled && !await_locked(lock, 0)) stalled = true;
    }
    if (stalled) {
      // No PubAck for ack_timeout: take the rest back from libnats (their
      // late acks are discarded); their outcome is unknown.
      natsMsgList pending{};
      if (js_PublishAsyncGetPendingList(&pending, ctx_.get()) == NATS_OK) natsMsgList_Destroy(&pending);
    }
    std::map<std::string, bool> denied;  // subject -> refused by the server's authorization
    std::lock_guard lock(m_);
    index_.clear();  // a late callback finds nothing
    outstanding_ = 0;
    for (std::size_t i = 0; i < n; ++i) {
      slot& sl = slots_[i];
      if (!sl.sent && !sl.done) {
        // Not sent: stopped (not an attempt), stalled (unknown, as for the
        // rest), or held back behind a failure of its key (ignored by the relay).
        results[i] = stop.stop_requested() ? errc::canceled : errc::timeout;
        continue;
      }
      if (!sl.done) {
        // The server reports a publish outside the user's permissions only
        // out of band; the PubAck never comes.
        auto it = denied.find(sl.subject);
        if (it == denied.end())
          it = denied.emplace(sl.subject, js_->connection().permission_denied_since(mark, "Publish", sl.subject)).first;
        results[i] = it->second ? errc::permission_denied : errc::timeout;
        continue;
      }
      results[i] = sl.status;
    }
    if (options_.on_ack)
      for (std::size_t i = 0; i < n; ++i)
        if (results[i] == errc::ok) options_.on_ack(batch[i], slots_[i].ack);
  }

 private:
  struct slot {
    bool sent = false;  // handed to libnats
    bool done = false;  // outcome known (PubAck, error answer, or a failed send)
    errc status = errc::timeout;
    publish_ack ack;
    std::string subject;
  };

  // Waits until at most `limit` publishes await their PubAck; false when no
  // PubAck arrived for ack_timeout meanwhile.
  bool await_locked(std::unique_lock<std::mutex>& lock, std::size_t limit) {
    while (outstanding_ > limit) {
      const std::size_t before = outstanding_;
      cv_.wait_for(lock, options_.ack_timeout, [&] { return outstanding_ < before; });
      if (outstanding_ >= before) return false;
    }
    return true;
  }

  void fail(std::size_t i, const stored_message& m, errc rc) {
    std::lock_guard lock(m_);
    slots_[i].done = true;
    slots_[i].status = rc;
    failed_keys_.emplace(m.partition_key);
  }

  // libnats' PubAck callback (its reply subscription's thread): records the
  // outcome of the message named by its Nats-Msg-Id header. Owns `msg`.
  static void on_pub_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
    auto* self = static_cast<js_pipeline*>(closure);
    const char* id = nullptr;
    if (msg != nullptr && natsMsgHeader_Get(msg, nats_headers::id, &id) == NATS_OK && id != nullptr) {
      std::lock_guard lock(self->m_);
      auto it = self->index_.find(id);
      if (it != self->index_.end()) {
        slot& sl = self->slots_[it->second];
        if (sl.sent && !sl.done) {
          sl.done = true;
          if (pa != nullptr) {
            sl.status = errc::ok;
            sl.ack = publish_ack{pa->Stream ? pa->Stream : "", pa->Sequence, pa->Duplicate, 1};
          } else {
            sl.status = nats_errc(pae != nullptr ? pae->Err : NATS_ERR);
            if (sl.status == errc::ok) sl.status = errc::store_error;
            const char* key = nullptr;
            if (natsMsgHeader_Get(msg, nats_headers::partition_key, &key) == NATS_OK && key != nullptr)
              self->failed_keys_.emplace(key);
            else
              self->failed_keys_.emplace(std::string());
          }
          --self->outstanding_;
          self->cv_.notify_all();
        }
      }
    }
    natsMsg_Destroy(msg);
  }

  jetstream* js_;
  jetstream_pipeline_options options_;
  std::unique_ptr<jsCtx, nats_js_deleter> ctx_;
  std::mutex run_mutex_;  // one batch at a time
  std::mutex m_;          // guards what follows; the PubAck callback takes it
  std::condition_variable cv_;  // a PubAck arrived (outstanding_ dropped)
  std::vector<slot> slots_;
  std::unordered_map<std::string, std::size_t> index_;  // message id text -> slot (this batch only)
  std::set<std::string, std::less<>> failed_keys_;       // keys with a failure in this batch
  std::size_t outstanding_ = 0;                          // sent, outcome not yet known
};

}  // namespace detail

/// An `outbox_batch_destination` for `outbox_relay` that pipelines each
/// leased batch to JetStream: every message is published asynchronously
/// (libnats `js_PublishMsgAsync`) with `Nats-Msg-Id` = its outbox id, at most
/// `window` awaiting their PubAck at once, and its result is `ok` only after
/// its PubAck — so the relay marks a row dispatched only once JetStream stored
/// it. About one round trip per `window` messages instead of per message.
///
/// * Order: one connection, publishes sent in batch order, so each key's
///   messages reach the stream in staging order. Once a message of a key
///   fails (an error PubAck, a decode or send failure) the later messages of
///   that key are not sent; those already in flight are not marked by the
///   relay either: they are retried in order with the failed one (the
///   duplicate window absorbs a stored copy). A failure that the stream
///   reports for one message while it stores the next of the same key (e.g.
///   a stream limit reached in between) can let that next one precede the
///   retried one in the stream; a lost connection cannot (libnats resends
///   its buffered publishes in order).
/// * No PubAck for `ack_timeout`: the rest are unknown outcomes (`timeout`,
///   or `permission_denied` when the server refused the subject), retried
///   by the relay with backoff under the same ids.
/// * Decode failures and envelopes NATS headers cannot carry fail with the
///   codec's code or `invalid_argument`, permanent for the default classifier.
/// * A call lasts about batch / window PubAck round trips, plus
///   `ack_timeout` when acks stop coming: keep that below the relay's lease.
///
/// `js` (and its connection) must outlive the destination (copies share one
/// libnats context). Throws `postbox::error` when the context cannot be
/// created. Each call blocks until the batch's PubAcks are in (or
/// `ack_timeout` without one); allocates per message; calls are serialized.
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_batch_destination to_jetstream_pipelined(jetstream& js, Codec codec,
                                                              jetstream_pipeline_options options = {}) {
  auto pipe = std::make_shared<detail::js_pipeline>(js, std::move(options));
  return [pipe, codec = std::move(codec)](std::span<const stored_message> batch, std::span<errc> results,
                                          std::stop_token stop) {
    pipe->template run<T>(codec, batch, results, std::move(stop));
  };
}

POSTBOX_END_NAMESPACE
