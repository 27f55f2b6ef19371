// SPDX-License-Identifier: MIT
// JetStream as an outbox relay destination: each stored message is published with Nats-Msg-Id = its id and counts as sent only after the PubAck.
#pragma once

// Opt-in edge (layer 5): needs libnats and nlohmann/json (CMake target
// `postbox::nats`). Design notes: docs/design/nats.md ("Outbox destination").

#include <postbox/json/envelope_view.hpp>
#include <postbox/nats.hpp>
#include <postbox/outbox.hpp>

#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// libnats' own constructor of a message from wire bytes (its received
// messages are built with it): the header block "NATS/1.0\r\n...\r\n\r\n"
// is kept as those bytes, and a publish copies them as they are. Exported by
// libnats but not in its public header; the same signature since 2.2 (the
// first release with headers) through 3.x, and used only for those major
// versions: a later libnats could change it unseen. Declared weak, so a libnats that
// does not export it leaves it null and the pipelined relay sets each header
// with natsMsgHeader_Set instead. Define POSTBOX_NATS_RAW_HEADERS to 0 to
// never use it.
#ifndef POSTBOX_NATS_RAW_HEADERS
#if defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && defined(NATS_VERSION_NUMBER) && \
    NATS_VERSION_NUMBER >= 0x020200 && NATS_VERSION_NUMBER < 0x040000
#define POSTBOX_NATS_RAW_HEADERS 1
#else
#define POSTBOX_NATS_RAW_HEADERS 0
#endif
#endif
#if POSTBOX_NATS_RAW_HEADERS
extern "C" __attribute__((weak)) natsStatus natsMsg_create(natsMsg** newMsg, const char* subject, int subjLen,
                                                           const char* reply, int replyLen, const char* buf,
                                                           int bufLen, int hdrLen);
#endif

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
  /// With `json::codec` and a typed `T`: convert each stored payload to `T`
  /// (as a consumer will) before sending its bytes, so a payload that does
  /// not convert fails here with `bad_type` (permanent: dead-lettered) as
  /// the full decode reports it. Off: the stored payload bytes go out
  /// unconverted (saves one payload parse per message); a payload that does
  /// not convert then fails at the consumer. No effect for `nlohmann::json`.
  bool check_payload = true;
  /// Chain each batch: every message sent after the batch's first carries
  /// `Nats-Expected-Last-Msg-Id` = the id sent just before it, so the stream
  /// refuses a message whose predecessor it does not hold. This keeps each
  /// key's order across a lost connection, where the publishes still in the
  /// dead socket are lost while libnats resends those it had buffered (which
  /// could otherwise store a key's later message before the retried earlier
  /// one). Needs every message of a batch to go to one stream that nothing
  /// else publishes to meanwhile; another publisher's message breaks the
  /// chain and the rest of that batch is refused (retried later).
  bool expect_last_id = false;
};

namespace detail {

/// One NATS message's header block built as wire bytes, "NATS/1.0\r\n" then
/// "Key: value\r\n" per header and "\r\n", and the message made from it
/// with the payload in one libnats call (no header map, no allocation per
/// header). Keys must be valid header names and values free of CR/LF (the
/// caller's checks); an empty value adds nothing, as the envelope's
/// absent fields. Reused across messages: the buffers keep their capacity,
/// so a steady flow allocates only the libnats message. Not thread-safe.
class nats_header_block {
 public:
  /// True when libnats exports the constructor that takes the block as
  /// bytes (see POSTBOX_NATS_RAW_HEADERS); else `make` sets each header.
  [[nodiscard]] static bool raw_available() noexcept {
#if POSTBOX_NATS_RAW_HEADERS
    return &::natsMsg_create != nullptr;
#else
    return false;
#endif
  }

  /// True once the libnats library is open, opening it on the first call
  /// (nats_Open(-1), what creating a connection does; a no-op when already
  /// open). A message built from bytes belongs to libnats' garbage collector:
  /// natsMsg_Destroy hands it to the library's collector thread, whose lock
  /// exists only while the library is open. Thread-safe (a function-local
  /// static); blocks only on the first call.
  [[nodiscard]] static bool library_open() noexcept {
    static const bool open = nats_Open(-1) == NATS_OK;
    return open;
  }

  /// Starts a new block (no headers).
  void clear() {
    buf_.assign(prefix);
    fields_.clear();
  }
  /// Appends header `key` = `value` (nothing for an empty value).
  void add(std::string_view key, std::string_view value) { add(std::string_view{}, key, value); }
  /// Appends header `key_prefix` + `key` = `value` (nothing for an empty value).
  void add(std::string_view key_prefix, std::string_view key, std::string_view value) {
    if (value.empty()) return;
    // One resize and plain copies: "prefix+key: value\r\n".
    const std::size_t k = buf_.size();
    const std::size_t kn = key_prefix.size() + key.size();
    const std::size_t v = k + kn + 2;
    buf_.resize(v + value.size() + 2);
    char* p = buf_.data() + k;
    std::char_traits<char>::copy(p, key_prefix.data(), key_prefix.size());
    std::char_traits<char>::copy(p + key_prefix.size(), key.data(), key.size());
    p += kn;
    *p++ = ':';
    *p++ = ' ';
    std::char_traits<char>::copy(p, value.data(), value.size());
    p += value.size();
    *p++ = '\r';
    *p = '\n';
    fields_.push_back(field{k, kn, v, value.size()});
  }
  /// Headers added since `clear`.
  [[nodiscard]] std::size_t size() const noexcept { return fields_.size(); }
  /// The block as it goes on the wire, with its closing empty line. Allocates.
  [[nodiscard]] std::string bytes() const { return buf_ + "\r\n"; }

  /// The message on `subject` with these headers and `payload` as its body:
  /// built from the bytes when `raw` and libnats allows, else through
  /// natsMsg_Create and natsMsgHeader_Set per header. `invalid_argument`
  /// when libnats refuses (an empty subject, a header). Allocates the
  /// message (and, when not raw, libnats' header map).
  [[nodiscard]] result<nats_msg_ptr> make(std::string_view subject, std::string_view payload, bool raw = true) {
    if (subject.empty()) return errc::invalid_argument;
    natsMsg* m = nullptr;
#if POSTBOX_NATS_RAW_HEADERS
    if (raw && raw_available() && !fields_.empty() && library_open()) {
      // libnats copies header block and body from one buffer: both are
      // appended to the open block, then cut off again.
      const std::size_t open = buf_.size();
      buf_.append("\r\n", 2).append(payload);
      const natsStatus s = ::natsMsg_create(&m, subject.data(), static_cast<int>(subject.size()), nullptr, 0,
                                            buf_.data(), static_cast<int>(buf_.size()), static_cast<int>(open + 2));
      buf_.resize(open);
      if (s != NATS_OK) return errc::invalid_argument;
      return nats_msg_ptr(m);
    }
#else
    (void)raw;
#endif
    subject_.assign(subject);
    if (natsMsg_Create(&m, subject_.c_str(), nullptr, payload.data(), static_cast<int>(payload.size())) != NATS_OK)
      return errc::invalid_argument;
    nats_msg_ptr msg(m);
    for (const field& f : fields_) {
      key_.assign(buf_, f.key, f.key_size);
      value_.assign(buf_, f.value, f.value_size);
      if (natsMsgHeader_Set(msg.get(), key_.c_str(), value_.c_str()) != NATS_OK) return errc::invalid_argument;
    }
    return msg;
  }

 private:
  static constexpr std::string_view prefix = "NATS/1.0\r\n";
  struct field {
    std::size_t key, key_size, value, value_size;  // offsets into buf_
  };

  std::string buf_{prefix};  // the open block: prefix and header lines, without the closing CRLF
  std::vector<field> fields_;
  std::string subject_, key_, value_;  // the natsMsgHeader_Set route's terminated copies
};

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
      index_.clear();  // built by the PubAck callback only if it needs it
      indexed_ = false;
      batch_ = batch;
      next_ack_ = 0;
      open_ = true;
      failed_keys_.clear();
      outstanding_ = 0;
      stored_ = !cautious_;
    }
    bool chained = false;  // a message of this batch was sent: the next one names it (expect_last_id)
    char last_id[40] = {};
    const std::uint64_t mark = js_->connection().permission_violations();
    bool stalled = false;
    for (std::size_t i = 0; i < n && !stalled; ++i) {
      const stored_message& m = batch[i];
      if (stop.stop_requested()) break;  // the rest stays `canceled`
      {
        std::unique_lock lock(m_);
        if (failed_keys_.count(m.partition_key) != 0) continue;  // held back: the relay releases it
        // Slow start after a troubled batch (and for the first): one message
        // at a time until a PubAck of this batch says the stream stores. A
        // stream that refuses while it starts (no responders just after a
        // restart) then fails a key's message before its next one is sent,
        // which could otherwise be stored first.
        stalled = !await_locked(lock, stored_ ? options_.window - 1 : 0);
        if (stalled) break;
      }
      // The NATS message from the stored bytes when the view takes them
      // (no decode, no re-encode); else through the full decode, which
      // also gives the exact error for a row the view refuses.
      const bool viewed = view<T, Codec>(m);
      envelope<T> env;
      if (!viewed) {
        errc rc = errc::ok;
        if (!outbox_decode<T>(codec, m, env, rc)) {
          fail(i, m, rc);
          continue;
        }
        env.id = m.id;  // the outbox row's id is the dedup identity, whatever the codec kept
      }
      std::string subject =
          options_.subject ? options_.subject(m) : options_.subjects(viewed ? view_.type : std::string_view(env.type));
      const char* expect = options_.expect_last_id && chained ? last_id : nullptr;
      auto msg = viewed ? viewed_nats_msg(m, subject, expect) : to_nats_msg(env, subject);
      if (msg.has_value() && !viewed && expect != nullptr &&
          natsMsgHeader_Set(msg->get(), expected_last_id_header, expect) != NATS_OK)
        msg = errc::invalid_argument;
      if (!msg.has_value()) {
        fail(i, m, msg.status());
        continue;
      }
      {
        std::lock_guard lock(m_);
        slots_[i].sent = true;
        slots_[i].msg = msg->get();
        slots_[i].subject = std::move(subject);
        ++outstanding_;
      }
      // The message carries Nats-Msg-Id already (no jsPubOptions::MsgId,
      // which would set the header a second time).
      jsPubOptions po;
      jsPubOptions_Init(&po);
      natsMsg* raw = msg->release();
      const natsStatus s = js_PublishMsgAsync(ctx_.get(), &raw, &po);
      if (s == NATS_OK) {
        if (options_.expect_last_id) m.id.write_to(last_id);
        chained = true;
      } else {
        std::lock_guard lock(m_);
        slots_[i].msg = nullptr;  // not libnats': destroyed below
        if (!slots_[i].done) {
          slots_[i].done = true;
          slots_[i].status = nats_errc(s);
          --outstanding_;
          failed_keys_.emplace(m.partition_key);
        }
      }
      natsMsg_Destroy(raw);  // null when libnats took it
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
    cautious_ = stalled || !failed_keys_.empty();
    open_ = false;  // a late callback finds nothing
    index_.clear();
    batch_ = {};
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
  struct message_id_hash {
    std::size_t operator()(const message_id& id) const noexcept {
      return static_cast<std::size_t>(id.low() ^ (id.high() * 0x9e3779b97f4a7c15ull));
    }
  };

  // Views the stored JSON envelope of `m` into view_ when the codec is
  // json::codec and the text is one the view takes (see
  // json/envelope_view.hpp), with the checks `json::decode<T>` makes beyond
  // the envelope itself: type and schema version against message_traits<T>
  // and, with check_payload, the payload's conversion to T. False: decode.
  template <class T, class Codec>
  bool view(const stored_message& m) {
    if constexpr (!std::is_same_v<Codec, json::codec>) {
      (void)m;
      return false;
    } else {
      if (!view_json_envelope(m.body, view_)) return false;
      for (std::size_t h = 0; h < view_.header_count; ++h) {
        const std::string_view k = view_.headers[h].first;
        if (k.empty() || k.find_first_of(":\r\n ") != std::string_view::npos) return false;  // invalid_argument
      }
      if constexpr (!std::is_same_v<T, nlohmann::json>) {
        constexpr std::string_view want = message_traits<T>::type_name();
        if (!want.empty() && (view_.type != want || view_.schema_version != message_traits<T>::schema_version()))
          return false;  // unknown_type / unsupported_version
        if (options_.check_payload) {
          // The payload's value is built into payload_ in place (its
          // members and strings reused from the last row: no allocation for
          // a flow of one shape); nlohmann's parser builds it when the
          // in-place pass leaves the text to it. Either way `get<T>` sees the
          // value the full decode would have converted.
          bool converts = false;
          POSTBOX_TRY {
            if (!json_view_dom::assign(view_.payload, payload_)) payload_ = nlohmann::json::parse(view_.payload);
            (void)payload_.template get<T>();
            converts = true;
          }
          POSTBOX_CATCH_ALL {}
          if (!converts) return false;  // bad_type on "payload"
        }
      }
      return true;
    }
  }

  static constexpr const char* expected_last_id_header = "Nats-Expected-Last-Msg-Id";

  // The NATS message of the viewed envelope: the same subject, body value
  // and headers (names, values and presence) as to_nats_msg of the decoded
  // envelope, with the stored payload text as the body, plus
  // Nats-Expected-Last-Msg-Id = `expect` when not null. The header block is
  // written as wire bytes into block_ (capacity kept: no allocation but the
  // libnats message) and handed to libnats whole, instead of one
  // natsMsgHeader_Set per header (each a copy of key and value and a hash
  // map entry, encoded again at publish and freed after the PubAck).
  // invalid_argument as to_nats_msg when libnats refuses the subject.
  result<nats_msg_ptr> viewed_nats_msg(const stored_message& m, const std::string& subject, const char* expect) {
    const json_envelope_view& v = view_;
    nats_header_block& b = block_;
    b.clear();
    // No viewed value holds CR or LF: the view takes only strings without
    // escapes, and raw control characters are not valid JSON.
    char text[40];
    // An id goes out as its stored text when that is the canonical form
    // write_to would produce (the view checked it; saves formatting it).
    auto add_id = [&](std::string_view k, const message_id& id, const message_id& viewed, std::string_view stored) {
      if (!stored.empty() && id == viewed) {
        b.add(k, stored);
        return;
      }
      id.write_to(text);
      b.add(k, std::string_view(text, 36));
    };
    auto add_u32 = [&](std::string_view k, std::uint32_t n) {
      const auto end = std::to_chars(text, text + sizeof text, n).ptr;
      b.add(k, std::string_view(text, static_cast<std::size_t>(end - text)));
    };
    auto add_time = [&](std::string_view k, std::string_view stored, time_point t) {
      if (json_view_canonical_time(stored)) {
        b.add(k, stored);
      } else {
        b.add(k, json::detail::format_time(t));
      }
    };
    add_id(nats_headers::id, m.id, v.id, v.id_text);  // the outbox row's id is the dedup identity
    b.add(nats_headers::type, v.type);
    if (v.schema_version != nats_default_schema_version) add_u32(nats_headers::schema_version, v.schema_version);
    if (v.kind != nats_default_kind) b.add(nats_headers::kind, to_string(v.kind));  // both as to_nats_msg
    add_time(nats_headers::occurred_at, v.occurred_at_text, v.occurred_at);
    if (!v.correlation_id.is_nil())
      add_id(nats_headers::correlation_id, v.correlation_id, v.correlation_id, v.correlation_id_text);
    if (!v.causation_id.is_nil()) add_id(nats_headers::causation_id, v.causation_id, v.causation_id, v.causation_id_text);
    b.add(nats_headers::producer, v.producer);
    b.add(nats_headers::partition_key, v.partition_key);
    b.add(nats_headers::tenant, v.tenant);
    b.add(nats_headers::traceparent, v.traceparent);
    b.add(nats_headers::tracestate, v.tracestate);
    if (v.deadline) add_time(nats_headers::deadline, v.deadline_text, *v.deadline);
    if (v.attempt != 0) add_u32(nats_headers::attempt, v.attempt);
    for (std::size_t h = 0; h < v.header_count; ++h) b.add(nats_headers::user_prefix, v.headers[h].first, v.headers[h].second);
    if (expect != nullptr) b.add(expected_last_id_header, expect);
    return b.make(subject, v.payload);
  }

  struct slot {
    natsMsg* msg = nullptr;  // non-null only while libnats holds the message (or is acking it): identity only
    bool sent = false;  // handed to libnats
    bool done = false;  // outcome known (PubAck, error answer, or a failed send)
    errc status = errc::timeout;
    publish_ack ack;
    std::string subject;
  };

  // Waits until at most `limit` publishes await their PubAck; false when no
  // PubAck arrived for ack_timeout meanwhile. A sender blocked by a full
  // window waits until a quarter of it is free, so the PubAck thread wakes
  // it once per window/4 acks rather than once per ack (each wake is a
  // futex call on both threads, on cores the server needs).
  bool await_locked(std::unique_lock<std::mutex>& lock, std::size_t limit) {
    if (outstanding_ <= limit) return true;
    const std::size_t target = limit - limit / 4;
    wake_at_ = target;
    waiting_ = true;
    auto deadline = std::chrono::steady_clock::now() + options_.ack_timeout;
    bool ok = true;
    for (;;) {
      const std::uint64_t seen = acks_;
      if (cv_.wait_until(lock, deadline, [&] { return outstanding_ <= target; })) break;
      if (acks_ == seen) {  // none since the deadline was set: ack_timeout without one
        ok = false;
        break;
      }
      deadline = last_ack_ + options_.ack_timeout;  // later than the passed deadline
    }
    waiting_ = false;
    return ok;
  }

  void fail(std::size_t i, const stored_message& m, errc rc) {
    std::lock_guard lock(m_);
    slots_[i].done = true;
    slots_[i].status = rc;
    failed_keys_.emplace(m.partition_key);
  }

  // The slot of a message whose PubAck came, or null. PubAcks come in
  // publish order as a rule: the message is the one after the last acked
  // (compared by address: a message libnats still holds, or hands to the
  // callback, is alive, so no other live message of the batch shares its
  // address). Otherwise (a row skipped, a resend, an ack of an earlier
  // attempt) it is found by its Nats-Msg-Id in an index built on first need.
  slot* slot_of_locked(natsMsg* msg) {
    if (msg == nullptr) return nullptr;
    if (next_ack_ < slots_.size() && slots_[next_ack_].msg == msg) return &slots_[next_ack_++];
    const char* text = nullptr;
    if (natsMsgHeader_Get(msg, nats_headers::id, &text) != NATS_OK || text == nullptr) return nullptr;
    const auto id = message_id::parse(text);
    if (!id) return nullptr;
    if (!indexed_) {
      index_.reserve(batch_.size());
      for (std::size_t i = 0; i < batch_.size(); ++i) index_.emplace(batch_[i].id, i);
      indexed_ = true;
    }
    const auto it = index_.find(*id);
    if (it == index_.end()) return nullptr;
    next_ack_ = it->second + 1;
    return &slots_[it->second];
  }

  // libnats' PubAck callback (its reply subscription's thread): records the
  // outcome of the message it acknowledges. Owns `msg`.
  static void on_pub_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
    auto* self = static_cast<js_pipeline*>(closure);
    {
      std::lock_guard lock(self->m_);
      slot* found = self->open_ ? self->slot_of_locked(msg) : nullptr;
      if (found != nullptr) {
        slot& sl = *found;
        if (sl.sent && !sl.done) {
          sl.done = true;
          sl.msg = nullptr;  // destroyed below: its address may come back for a later message
          if (pa != nullptr) {
            self->stored_ = true;
            sl.status = errc::ok;
            sl.ack = publish_ack{pa->Stream ? pa->Stream : "", pa->Sequence, pa->Duplicate, 1};
          } else {
            sl.status = nats_errc(pae != nullptr ? pae->Err : NATS_ERR);
            if (sl.status == errc::ok) sl.status = errc::store_error;
            self->failed_keys_.emplace(self->batch_[static_cast<std::size_t>(found - self->slots_.data())].partition_key);
          }
          --self->outstanding_;
          ++self->acks_;
          if (self->waiting_) {
            self->last_ack_ = std::chrono::steady_clock::now();
            if (self->outstanding_ <= self->wake_at_) self->cv_.notify_all();
          }
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
  std::condition_variable cv_;  // outstanding_ dropped to wake_at_ while the sender waits
  std::vector<slot> slots_;
  std::span<const stored_message> batch_;  // the batch being published (empty between batches)
  std::unordered_map<message_id, std::size_t, message_id_hash> index_;  // message id -> slot (this batch; lazy)
  bool indexed_ = false;      // index_ holds this batch
  std::size_t next_ack_ = 0;  // the slot after the last one acked: the next PubAck's, as a rule
  bool open_ = false;         // a batch is being published: PubAck callbacks count
  std::set<std::string, std::less<>> failed_keys_;       // keys with a failure in this batch
  std::size_t outstanding_ = 0;                          // sent, outcome not yet known
  std::uint64_t acks_ = 0;                               // PubAcks counted so far (any batch)
  bool waiting_ = false;                                 // the sender waits in await_locked
  std::size_t wake_at_ = 0;                              // ... until outstanding_ is at most this
  std::chrono::steady_clock::time_point last_ack_{};     // ... and the last PubAck since it waits came then
  bool stored_ = false;  // a PubAck of this batch said stored: the window opens (slow start before)
  bool cautious_ = true;  // the last batch stalled or failed a key (or none ran yet): slow start
  // The run's thread only (under run_mutex_): the current row's view and
  // header block, whose capacity is kept across messages.
  json_envelope_view view_;
  nats_header_block block_;  // the current row's NATS header block
  nlohmann::json payload_;  // check_payload: the current row's payload value, reused in place
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
///   messages reach the stream in staging order. The first batch, and each
///   after one that stalled or failed a key, sends one message at a time
///   until a PubAck says the stream stores (one round trip), then opens the
///   window, so a stream still refusing after a restart cannot store a key's
///   next message before the refused one. Once a message of a key
///   fails (an error PubAck, a decode or send failure) the later messages of
///   that key are not sent; those already in flight are not marked by the
///   relay either: they are retried in order with the failed one (the
///   duplicate window absorbs a stored copy). A failure that the stream
///   reports for one message while it stores the next of the same key (e.g.
///   a stream limit reached in between) can let that next one precede the
///   retried one in the stream. So can a lost connection: the publishes
///   still in the dead socket are lost while libnats resends those it had
///   buffered. `expect_last_id` closes both (the stream refuses a message
///   whose predecessor in the batch it does not hold), for a relay that is
///   its stream's only publisher.
/// * No PubAck for `ack_timeout`: the rest are unknown outcomes (`timeout`,
///   or `permission_denied` when the server refused the subject), retried
///   by the relay with backoff under the same ids.
/// * With `json::codec` each NATS message is built from the stored bytes:
///   one non-allocating pass views the envelope's fields in the row's JSON
///   text, the headers are those texts and the body is the stored payload
///   text (no decode, no re-encode); the header lines are written as one
///   wire-format block that libnats takes whole where it exports the
///   constructor for that (see POSTBOX_NATS_RAW_HEADERS), with no
///   per-header allocation. The view takes only texts the decode
///   reads with the same values (what `json::encode` writes); any other row,
///   and every row of another codec, goes through the full decode and
///   `to_nats_msg` as before. Either way the message carries the same
///   subject, headers and payload value, so consumers decode the same
///   envelope. For a typed `T`, `check_payload` keeps the decode's check that
///   the payload converts to `T`.
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
