// SPDX-License-Identifier: MIT
// NATS JetStream bridge: RAII libnats wrappers, envelope <-> NATS header mapping, a deduplicating publisher, a bounded buffered publisher and a durable pull source.
#pragma once

// Opt-in edge (layer 5): needs libnats (CMake package `cnats`, target
// `postbox::nats`) and nlohmann/json. Design notes: docs/design/nats.md.
//
// Wire format: the payload is the JSON of `T` (nlohmann to_json/from_json) in
// the message body; every other envelope field travels as a NATS header
// (names in `nats_headers`). The id is `Nats-Msg-Id`, so JetStream's duplicate
// window drops a republished message. Timeouts passed to libnats are real
// time (libnats has no injectable clock).

#include <nats/nats.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "channel.hpp"
#include "clock.hpp"
#include "config.hpp"
#include "envelope.hpp"
#include "error.hpp"
#include "json.hpp"
#include "topic.hpp"

POSTBOX_BEGIN_NAMESPACE

/// NATS header names carrying the envelope fields.
namespace nats_headers {
inline constexpr const char* id = "Nats-Msg-Id";
inline constexpr const char* type = "Postbox-Type";
inline constexpr const char* schema_version = "Postbox-Schema-Version";
inline constexpr const char* kind = "Postbox-Kind";
inline constexpr const char* occurred_at = "Postbox-Occurred-At";
inline constexpr const char* correlation_id = "Postbox-Correlation-Id";
inline constexpr const char* causation_id = "Postbox-Causation-Id";
inline constexpr const char* producer = "Postbox-Producer";
inline constexpr const char* partition_key = "Postbox-Partition-Key";
inline constexpr const char* tenant = "Postbox-Tenant";
inline constexpr const char* traceparent = "traceparent";
inline constexpr const char* tracestate = "tracestate";
inline constexpr const char* deadline = "Postbox-Deadline";
inline constexpr const char* attempt = "Postbox-Attempt";
/// User header `k` travels as `Postbox-H-k`.
inline constexpr std::string_view user_prefix = "Postbox-H-";
}  // namespace nats_headers

/// The schema version and kind a NATS message without `Postbox-Schema-Version`
/// or `Postbox-Kind` carries (the envelope's defaults): `to_nats_msg` leaves
/// those headers out for them and `from_nats_msg` reads their absence so.
inline constexpr std::uint32_t nats_default_schema_version = 1;
inline constexpr message_kind nats_default_kind = message_kind::event;

namespace detail {

/// Maps a libnats status to a postbox error code.
[[nodiscard]] inline errc nats_errc(natsStatus s) noexcept {
  switch (s) {
    case NATS_OK: return errc::ok;
    case NATS_TIMEOUT: return errc::timeout;
    case NATS_CONNECTION_CLOSED: return errc::closed;
    case NATS_NOT_FOUND: return errc::not_found;
    case NATS_INVALID_ARG: return errc::invalid_argument;
    case NATS_NO_RESPONDERS: return errc::busy;
    case NATS_NO_MEMORY: return errc::too_large;
    case NATS_INSUFFICIENT_BUFFER: return errc::full;  // reconnect buffer full while disconnected
    case NATS_NOT_PERMITTED: return errc::permission_denied;  // the server's authorization refused a subject
    // A refused login, and every way TLS cannot be set up: a failed handshake
    // or certificate check, a server that requires TLS from a client not
    // configured for it, a server without TLS when the options require it.
    // None of them goes away by retrying with the same options.
    case NATS_CONNECTION_AUTH_FAILED:
    case NATS_SSL_ERROR:
    case NATS_SECURE_CONNECTION_WANTED:
    case NATS_SECURE_CONNECTION_REQUIRED: return errc::unauthenticated;
    default: return errc::store_error;
  }
}

/// Throws postbox::error for a failed libnats call made at the API boundary.
inline void nats_check(natsStatus s, const char* what) {
  if (s != NATS_OK)
    POSTBOX_THROW(postbox::error(nats_errc(s), std::string("postbox::nats: ") + what + ": " + natsStatus_GetText(s)));
}

/// Initializes libnats once per process (natsMsg_Create does not do it
/// itself, and its message pool needs it). Thread-safe (static init).
inline void nats_library_open() {
  static const natsStatus s = nats_Open(-1);
  nats_check(s, "nats_Open");
}

struct nats_msg_deleter {
  void operator()(natsMsg* m) const noexcept { natsMsg_Destroy(m); }
};
struct nats_conn_deleter {
  void operator()(natsConnection* c) const noexcept { natsConnection_Destroy(c); }
};
struct nats_js_deleter {
  void operator()(jsCtx* j) const noexcept { jsCtx_Destroy(j); }
};
/// Unsubscribes `s`, waits (up to 5 s) until `nc`'s read loop can no longer
/// be handing it a message, then destroys it. libnats before 3.6 (Debian 12
/// ships 3.4) looks a subscription up and drops the connection's lock before
/// locking the subscription, so a destroy racing an arriving message frees
/// the mutex the read loop is about to take (nats.c issue 637, fixed in 3.6).
/// The read loop handles a message before a PONG that follows it on the
/// wire; once the unsubscribe has removed `s` from the connection's table
/// and a flush's PONG came back, no message in flight can still reach it.
/// When the connection is not connected no read loop is reading, and when
/// the flush fails while connected the subscription is kept rather than
/// freed under the read loop (a small leak on a connection that has just
/// failed, instead of a use after free). Blocks for one round trip.
inline void nats_retire_subscription(natsConnection* nc, natsSubscription* s) noexcept {
  if (s == nullptr) return;
  (void)natsSubscription_Unsubscribe(s);  // fails only when already closed: still out of the table
  if (nc != nullptr && natsConnection_Status(nc) == NATS_CONN_STATUS_CONNECTED &&
      natsConnection_FlushTimeout(nc, 5000) != NATS_OK &&
      natsConnection_Status(nc) == NATS_CONN_STATUS_CONNECTED)
    return;  // NOLINT: deliberately leaked, see above
  natsSubscription_Destroy(s);
}

/// Owns a subscription made on `nc`; retires it as nats_retire_subscription.
struct nats_sub_deleter {
  natsConnection* nc = nullptr;
  void operator()(natsSubscription* s) const noexcept { nats_retire_subscription(nc, s); }
};

/// True when `v` may be a NATS header value (no CR or LF).
[[nodiscard]] inline bool nats_header_value_ok(std::string_view v) noexcept {
  return v.find_first_of("\r\n") == std::string_view::npos;
}

}  // namespace detail

/// An owned libnats message. Move-only; not thread-safe.
using nats_msg_ptr = std::unique_ptr<natsMsg, detail::nats_msg_deleter>;

/// Builds a NATS message on `subject` from `env`: JSON payload in the body,
/// the other fields as headers (schema version 1 and kind `event` left out);
/// `reply` (when not empty) is the NATS reply subject. `invalid_argument` when a header value holds CR/LF or the payload
/// cannot be encoded. Allocates. Thread-safe.
template <class T>
[[nodiscard]] result<nats_msg_ptr> to_nats_msg(const envelope<T>& env, const std::string& subject,
                                               const std::string& reply = {}) {
  detail::nats_library_open();
  std::string body;
  POSTBOX_TRY { body = nlohmann::json(env.payload).dump(); }
  POSTBOX_CATCH_ALL { return errc::invalid_argument; }
  natsMsg* raw = nullptr;
  if (natsMsg_Create(&raw, subject.c_str(), reply.empty() ? nullptr : reply.c_str(), body.data(),
                     static_cast<int>(body.size())) != NATS_OK)
    return errc::invalid_argument;
  nats_msg_ptr msg(raw);
  bool ok = true;
  auto set = [&](const char* k, const std::string& v) {
    if (!ok || v.empty()) return;
    if (!detail::nats_header_value_ok(v) || natsMsgHeader_Set(msg.get(), k, v.c_str()) != NATS_OK) ok = false;
  };
  set(nats_headers::id, env.id.to_string());
  set(nats_headers::type, env.type);
  // Schema version 1 and kind `event` are the envelope's defaults, which
  // from_nats_msg gives a message without the header: they are left out
  // (two fewer headers for the server to parse and store per message).
  // Messages that carry them, as this function wrote them before, read the same.
  if (env.schema_version != nats_default_schema_version)
    set(nats_headers::schema_version, std::to_string(env.schema_version));
  if (env.kind != nats_default_kind) set(nats_headers::kind, std::string(to_string(env.kind)));
  set(nats_headers::occurred_at, json::detail::format_time(env.occurred_at));
  if (!env.correlation_id.is_nil()) set(nats_headers::correlation_id, env.correlation_id.to_string());
  if (!env.causation_id.is_nil()) set(nats_headers::causation_id, env.causation_id.to_string());
  set(nats_headers::producer, env.producer);
  set(nats_headers::partition_key, env.partition_key);
  set(nats_headers::tenant, env.tenant);
  set(nats_headers::traceparent, env.trace.traceparent);
  set(nats_headers::tracestate, env.trace.tracestate);
  if (env.deadline) set(nats_headers::deadline, json::detail::format_time(*env.deadline));
  if (env.attempt != 0) set(nats_headers::attempt, std::to_string(env.attempt));
  for (const auto& [k, v] : env.headers) {
    if (k.empty() || k.find_first_of(":\r\n ") != std::string::npos) ok = false;
    set((std::string(nats_headers::user_prefix) + k).c_str(), v);
  }
  if (!ok) return errc::invalid_argument;
  return msg;
}

/// Why `from_nats_msg` failed: code and the header or "payload" concerned.
struct nats_decode_error {
  errc code = errc::ok;
  std::string field;
};

/// Reads an envelope back from a NATS message made by `to_nats_msg` (or by
/// any producer that sets the same headers). `attempt` is the header value;
/// a missing `Postbox-Schema-Version` / `Postbox-Kind` reads as 1 / `event`.
/// Never throws; on failure `error` names the field. Allocates. Thread-safe
/// for distinct messages.
template <class T>
[[nodiscard]] std::optional<envelope<T>> from_nats_msg(natsMsg* msg, nats_decode_error& error) {
  envelope<T> env;
  auto get = [&](const char* k) -> std::optional<std::string> {
    const char* v = nullptr;
    if (natsMsgHeader_Get(msg, k, &v) != NATS_OK || v == nullptr) return std::nullopt;
    return std::string(v);
  };
  auto fail = [&](errc c, const char* f) {
    error = {c, f};
    return std::nullopt;
  };
  auto id_field = [&](const char* k, message_id& out, bool required) {
    auto v = get(k);
    if (!v) return !required;
    auto id = message_id::parse(*v);
    if (!id) return false;
    out = *id;
    return true;
  };
  if (!id_field(nats_headers::id, env.id, true)) return fail(errc::missing_field, nats_headers::id);
  env.schema_version = nats_default_schema_version;  // when the headers are absent (to_nats_msg omits these)
  env.kind = nats_default_kind;
  if (auto v = get(nats_headers::type)) env.type = *v;
  if (auto v = get(nats_headers::schema_version)) {
    POSTBOX_TRY { env.schema_version = static_cast<std::uint32_t>(std::stoul(*v)); }
    POSTBOX_CATCH_ALL { return fail(errc::bad_type, nats_headers::schema_version); }
  }
  if (auto v = get(nats_headers::kind)) {
    auto k = parse_message_kind(*v);
    if (!k) return fail(errc::bad_type, nats_headers::kind);
    env.kind = *k;
  }
  if (auto v = get(nats_headers::occurred_at)) {
    auto t = json::detail::parse_time(*v);
    if (!t) return fail(errc::bad_type, nats_headers::occurred_at);
    env.occurred_at = *t;
  }
  if (!id_field(nats_headers::correlation_id, env.correlation_id, false))
    return fail(errc::bad_type, nats_headers::correlation_id);
  if (!id_field(nats_headers::causation_id, env.causation_id, false))
    return fail(errc::bad_type, nats_headers::causation_id);
  if (auto v = get(nats_headers::producer)) env.producer = *v;
  if (auto v = get(nats_headers::partition_key)) env.partition_key = *v;
  if (auto v = get(nats_headers::tenant)) env.tenant = *v;
  {
    auto tp = get(nats_headers::traceparent).value_or("");
    auto ts = get(nats_headers::tracestate).value_or("");
    auto tc = trace_context::parse(tp, ts);
    if (!tc) return fail(errc::bad_type, nats_headers::traceparent);
    env.trace = std::move(*tc);
  }
  if (auto v = get(nats_headers::deadline)) {
    auto t = json::detail::parse_time(*v);
    if (!t) return fail(errc::bad_type, nats_headers::deadline);
    env.deadline = *t;
  }
  if (auto v = get(nats_headers::attempt)) {
    POSTBOX_TRY { env.attempt = static_cast<std::uint32_t>(std::stoul(*v)); }
    POSTBOX_CATCH_ALL { return fail(errc::bad_type, nats_headers::attempt); }
  }
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK && keys != nullptr) {
    for (int i = 0; i < count; ++i) {
      std::string_view k(keys[i]);
      if (k.substr(0, nats_headers::user_prefix.size()) == nats_headers::user_prefix) {
        if (auto v = get(keys[i])) env.headers.set(std::string(k.substr(nats_headers::user_prefix.size())), *v);
      }
    }
    std::free(static_cast<void*>(keys));
  }
  const char* data = natsMsg_GetData(msg);
  const int len = natsMsg_GetDataLength(msg);
  POSTBOX_TRY {
    auto j = nlohmann::json::parse(std::string_view(data ? data : "", static_cast<std::size_t>(len)));
    env.payload = j.template get<T>();
  }
  POSTBOX_CATCH_ALL { return fail(errc::parse_error, "payload"); }
  return env;
}

/// Connection state as seen by libnats' callbacks.
enum class connection_status { connected, reconnecting, closed };

/// `connected`, `reconnecting` or `closed`.
[[nodiscard]] constexpr std::string_view to_string(connection_status s) noexcept {
  switch (s) {
    case connection_status::connected: return "connected";
    case connection_status::reconnecting: return "reconnecting";
    case connection_status::closed: return "closed";
  }
  return "unknown";
}

/// TLS settings of a `nats_connection` (`nats_connection_options::tls`). A
/// plain value. TLS is used when `required` is set, when the server demands
/// it, or for `tls://` URLs; the files configure it whenever it is used.
struct nats_tls_options {
  /// Refuse a server that does not offer TLS (connect fails with
  /// `unauthenticated`) instead of talking plaintext to it. Set it in production.
  bool required = false;
  std::string ca_file{};    ///< PEM CA certificates the server's certificate must chain to (empty: OpenSSL's defaults)
  std::string cert_file{};  ///< PEM client certificate chain, for servers that verify clients (needs `key_file`)
  std::string key_file{};   ///< PEM private key of `cert_file`
  /// Check the server's certificate chain. `false` accepts any certificate
  /// (an attacker's too): for tests only.
  bool verify_server = true;
  /// When set, the server's certificate must name this host. libnats 3.4
  /// checks no name otherwise: any certificate the CA signed is accepted.
  std::string expected_hostname{};
  std::string ciphers{};        ///< TLS 1.2 cipher list in OpenSSL syntax (empty: OpenSSL's default)
  std::string cipher_suites{};  ///< TLS 1.3 cipher suites (empty: OpenSSL's default)
};

/// How a `nats_connection` logs in (`nats_connection_options::credentials`):
/// at most one form, user and password, a token, an NKey, or a `.creds`
/// file (JWT and seed, as nsc writes them); none for an open server. A plain
/// value. Secrets never appear in postbox's error texts or in `to_string`.
struct nats_credentials {
  std::string user{};      ///< user name (with `password`)
  std::string password{};  ///< the user's password (secret)
  std::string token{};     ///< an authorization token (secret)
  std::string nkey{};             ///< public user NKey ("U..."), with `nkey_seed_file`
  std::string nkey_seed_file{};   ///< file holding that NKey's seed ("SU...", secret); read by libnats at connect
  std::string creds_file{};       ///< `.creds` file: the user JWT and, normally, its seed
  std::string creds_seed_file{};  ///< the seed's file when `creds_file` holds only the JWT
};

/// Options for `nats_connection`. A plain value.
struct nats_connection_options {
  std::string urls = "nats://127.0.0.1:4222";  ///< comma-separated server URLs
  std::string name = "postbox";                ///< client name shown by the server
  int max_reconnect = -1;                      ///< -1: reconnect forever
  std::chrono::milliseconds reconnect_wait{100};  ///< first reconnect delay
  std::chrono::milliseconds reconnect_wait_max{2000};  ///< backoff cap (doubles per attempt)
  std::chrono::milliseconds connect_timeout{2000};
  int reconnect_buffer_bytes = 8 << 20;  ///< bytes buffered while reconnecting; beyond it publishes fail
  bool retry_on_failed_connect = false;   ///< keep trying when the first connect fails
  /// Send each core publish at once instead of letting libnats batch writes
  /// (its flusher waits about 1 ms first). On by default: postbox's core
  /// publishes are requests, replies and pull-fetch requests, each waited
  /// for, so batching only adds latency (JetStream publishes and acks are
  /// sent at once either way). Turn it off for bulk core publishing through
  /// `native()`.
  bool send_asap = true;
  /// Called from a libnats thread on every status change; must not block.
  std::function<void(connection_status)> on_status{};
  nats_tls_options tls{};            ///< TLS: CA, client certificate, verification
  nats_credentials credentials{};    ///< login: at most one form (see nats_credentials)
  /// Called from a libnats thread on every asynchronous error the server or
  /// libnats reports (a permission violation: `permission_denied`, with the
  /// server's text naming the subject); must not block. Also kept in
  /// `nats_connection::last_error()`.
  std::function<void(errc, std::string_view)> on_error{};
};

namespace detail {

/// `text` with every occurrence of each non-empty `secrets` entry replaced by
/// "***", and the user information of any URL in it ("nats://u:p@h" becomes
/// "nats://***@h"). Allocates. Thread-safe.
[[nodiscard]] inline std::string nats_redact(std::string text, const std::vector<std::string>& secrets) {
  for (const auto& secret : secrets) {
    if (secret.empty()) continue;
    for (auto pos = text.find(secret); pos != std::string::npos; pos = text.find(secret, pos + 3))
      text.replace(pos, secret.size(), "***");
  }
  for (auto scheme = text.find("://"); scheme != std::string::npos; scheme = text.find("://", scheme + 3)) {
    const auto start = scheme + 3;
    const auto end = text.find_first_of(" ,/\"'", start);
    const auto at = text.rfind('@', end == std::string::npos ? text.size() : end);
    if (at != std::string::npos && at >= start && (end == std::string::npos || at < end))
      text.replace(start, at - start, "***");
  }
  return text;
}

/// The secrets in `o` (password, token), for nats_redact.
[[nodiscard]] inline std::vector<std::string> nats_secrets(const nats_connection_options& o) {
  return {o.credentials.password, o.credentials.token};
}

/// Which credential form `c` uses ("" for none); throws postbox::error
/// (`invalid_argument`) when it sets more than one form or half of one. The
/// message names the fields, never their values.
inline std::string nats_credential_form(const nats_credentials& c) {
  std::vector<std::string> forms;
  if (!c.user.empty() || !c.password.empty()) forms.emplace_back("user/password");
  if (!c.token.empty()) forms.emplace_back("token");
  if (!c.nkey.empty() || !c.nkey_seed_file.empty()) forms.emplace_back("nkey");
  if (!c.creds_file.empty() || !c.creds_seed_file.empty()) forms.emplace_back("creds_file");
  auto fail = [](const std::string& why) {
    POSTBOX_THROW(postbox::error(errc::invalid_argument, "postbox::nats_connection_options: credentials: " + why));
  };
  if (forms.size() > 1) {
    std::string all;
    for (const auto& f : forms) all += (all.empty() ? "" : ", ") + f;
    fail("set exactly one form, not several (" + all + ")");
  }
  if (forms.empty()) return {};
  if (forms[0] == "user/password" && c.user.empty()) fail("a password needs a user");
  if (forms[0] == "nkey" && (c.nkey.empty() || c.nkey_seed_file.empty()))
    fail("an nkey needs both the public key and nkey_seed_file");
  if (forms[0] == "creds_file" && c.creds_file.empty()) fail("creds_seed_file needs creds_file");
  return forms[0];
}

/// Whether a login with credential form `form` can be refused although its
/// key is right: libnats before 3.8.0 (Debian 12 ships 3.4.1) sends no
/// signature of the server's nonce when that signature's first byte is 0 (its
/// base64 encoder took a leading 0 byte for an empty input; fixed upstream in
/// nats.c #705), so one NKey or .creds login in 256 gets "Authorization
/// Violation". Never blocks.
inline bool nats_may_drop_signature(const std::string& form) noexcept {
  return (form == "nkey" || form == "creds_file") && nats_GetVersionNumber() < 0x030800;
}

}  // namespace detail

/// `o` for logs: URLs (user information replaced by "***"), name, TLS
/// settings and the credential form with public parts only (user name, NKey,
/// file names); passwords, tokens and seeds never appear. Allocates;
/// thread-safe.
[[nodiscard]] inline std::string to_string(const nats_connection_options& o) {
  const auto secrets = detail::nats_secrets(o);
  std::string out = "urls=" + detail::nats_redact(o.urls, secrets) + " name=" + detail::nats_redact(o.name, secrets);
  const auto& t = o.tls;
  out += std::string(" tls={required=") + (t.required ? "true" : "false");
  if (!t.ca_file.empty()) out += " ca_file=" + t.ca_file;
  if (!t.cert_file.empty()) out += " cert_file=" + t.cert_file;
  if (!t.key_file.empty()) out += " key_file=" + t.key_file;
  out += std::string(" verify_server=") + (t.verify_server ? "true" : "false");
  if (!t.expected_hostname.empty()) out += " expected_hostname=" + t.expected_hostname;
  out += "}";
  const auto& c = o.credentials;
  out += " credentials=";
  if (!c.user.empty() || !c.password.empty()) out += "{user=" + c.user + " password=***}";
  if (!c.token.empty()) out += "{token=***}";
  if (!c.nkey.empty() || !c.nkey_seed_file.empty())
    out += "{nkey=" + c.nkey + " nkey_seed_file=" + c.nkey_seed_file + "}";
  if (!c.creds_file.empty() || !c.creds_seed_file.empty())
    out += "{creds_file=" + c.creds_file + (c.creds_seed_file.empty() ? "" : " creds_seed_file=" + c.creds_seed_file) +
           "}";
  if (out.back() == '=') out += "none";
  return detail::nats_redact(std::move(out), secrets);
}

/// An asynchronous error of a `nats_connection` (`last_error()`): its code
/// (`ok` when none happened yet), the text libnats or the server gave
/// (secrets removed) and how many asynchronous errors there were so far.
struct nats_error_info {
  errc code = errc::ok;
  std::string text{};
  std::uint64_t count = 0;
};

namespace detail {

/// The operation ("Publish", "Subscription") and subject of a server's
/// permission violation text (`Permissions Violation for Publish to "a.b"`),
/// or nullopt for another text. Allocates; thread-safe.
[[nodiscard]] inline std::optional<std::pair<std::string, std::string>> parse_violation(std::string_view text) {
  constexpr std::string_view head = "Violation for ";
  const auto h = text.find(head);
  if (h == std::string_view::npos) return std::nullopt;
  text.remove_prefix(h + head.size());
  const auto to = text.find(" to ");
  if (to == std::string_view::npos) return std::nullopt;
  std::string op(text.substr(0, to));
  text.remove_prefix(to + 4);
  std::string_view subject;
  if (!text.empty() && text.front() == '"') {
    const auto close = text.find('"', 1);
    if (close == std::string_view::npos) return std::nullopt;
    subject = text.substr(1, close - 1);
  } else {
    subject = text.substr(0, text.find(' '));
  }
  return std::make_pair(std::move(op), std::string(subject));
}

}  // namespace detail

/// A NATS connection with reconnect and exponential backoff. Move-only;
/// `status()` is thread-safe; the connection may be shared by threads
/// (libnats connections are thread-safe).
class nats_connection {
 public:
  /// Connects (blocks up to `connect_timeout` per server). Throws
  /// postbox::error when it cannot: `invalid_argument` for contradictory
  /// options (two credential forms, half of one, a certificate without its
  /// key) or unreadable TLS files; `unauthenticated` when the server refuses
  /// the login or TLS cannot be set up (handshake or certificate check failed,
  /// TLS required by one side and not offered by the other, or a TLS server
  /// ending the session during login without a reason, as one that rejects
  /// the client's certificate under TLS 1.3 does); `timeout`,
  /// `closed`, `store_error` otherwise. Error texts never hold secrets. An
  /// NKey or `.creds` login the server refuses is tried up to 3 more times
  /// with libnats before 3.8, which drops one nonce signature in 256
  /// (detail::nats_may_drop_signature).
  explicit nats_connection(nats_connection_options opts) : state_(std::make_shared<state>()) {
    state_->on_status = std::move(opts.on_status);
    state_->on_error = std::move(opts.on_error);
    state_->secrets = detail::nats_secrets(opts);
    const std::string form = detail::nats_credential_form(opts.credentials);
    if (opts.tls.cert_file.empty() != opts.tls.key_file.empty())
      POSTBOX_THROW(error(errc::invalid_argument, "postbox::nats_connection_options: tls: cert_file and key_file go together"));
    detail::nats_library_open();
    natsOptions* o = nullptr;
    detail::nats_check(natsOptions_Create(&o), "options");
    std::unique_ptr<natsOptions, void (*)(natsOptions*)> guard(o, natsOptions_Destroy);
    state_->wait_ms = opts.reconnect_wait.count();
    state_->wait_max_ms = opts.reconnect_wait_max.count();
    std::vector<std::string> urls;
    for (std::size_t pos = 0; pos <= opts.urls.size();) {
      auto end = opts.urls.find(',', pos);
      if (end == std::string::npos) end = opts.urls.size();
      if (end > pos) urls.push_back(opts.urls.substr(pos, end - pos));
      pos = end + 1;
    }
    std::vector<const char*> cs;
    for (auto& u : urls) cs.push_back(u.c_str());
    detail::nats_check(natsOptions_SetServers(o, cs.data(), static_cast<int>(cs.size())), "servers");
    detail::nats_check(natsOptions_SetName(o, opts.name.c_str()), "name");
    detail::nats_check(natsOptions_SetMaxReconnect(o, opts.max_reconnect), "max reconnect");
    detail::nats_check(natsOptions_SetTimeout(o, opts.connect_timeout.count()), "timeout");
    detail::nats_check(natsOptions_SetReconnectBufSize(o, opts.reconnect_buffer_bytes), "reconnect buffer");
    detail::nats_check(natsOptions_SetCustomReconnectDelay(o, &nats_connection::delay_cb, state_.get()),
                       "reconnect delay");
    detail::nats_check(natsOptions_SetDisconnectedCB(o, &nats_connection::disconnected_cb, state_.get()),
                       "disconnected cb");
    detail::nats_check(natsOptions_SetReconnectedCB(o, &nats_connection::reconnected_cb, state_.get()),
                       "reconnected cb");
    detail::nats_check(natsOptions_SetClosedCB(o, &nats_connection::closed_cb, state_.get()), "closed cb");
    detail::nats_check(natsOptions_SetSendAsap(o, opts.send_asap), "send asap");
    detail::nats_check(natsOptions_SetErrorHandler(o, &nats_connection::error_cb, state_.get()), "error handler");
    if (opts.retry_on_failed_connect)
      detail::nats_check(natsOptions_SetRetryOnFailedConnect(o, true, &nats_connection::reconnected_cb, state_.get()), "retry connect");
    configure_tls(o, opts.tls);
    configure_credentials(o, opts.credentials, form);
    natsConnection* c = nullptr;
    natsStatus s = natsConnection_Connect(&c, o);
    // A login that signs the server's nonce is tried again when refused, up
    // to 3 more times, where libnats may have dropped the signature (see
    // detail::nats_may_drop_signature): each attempt signs a fresh nonce, so
    // a right key gets in (all four dropped: about 1 in 4e9) and a wrong one
    // is still refused. Reconnects need no help: libnats itself gives up only
    // on a second refusal in a row.
    for (int retry = 0; retry < 3 && s == NATS_CONNECTION_AUTH_FAILED && detail::nats_may_drop_signature(form); ++retry)
      s = natsConnection_Connect(&c, o);
    // Under TLS 1.3 a server that rejects the client's certificate (or its
    // absence) does so after the client's handshake has finished: libnats
    // then sees the connection end during its first PING, with no -ERR as a
    // refused login would send. With TLS in use that is the server refusing us.
    const bool tls_in_use = opts.tls.required || !opts.tls.ca_file.empty() || !opts.tls.cert_file.empty() ||
                            opts.urls.find("tls://") != std::string::npos;
    if (tls_in_use && (s == NATS_PROTOCOL_ERROR || s == NATS_IO_ERROR || s == NATS_CONNECTION_CLOSED))
      fail(s, "connect: the server ended the TLS session during login (is a client certificate it trusts missing?)",
           errc::unauthenticated);
    if (s != NATS_OK && !(opts.retry_on_failed_connect && s == NATS_NOT_YET_CONNECTED))
      fail(s, "connect");
    conn_.reset(c);
    state_->status.store(s == NATS_OK ? connection_status::connected : connection_status::reconnecting);
  }

  nats_connection(nats_connection&&) noexcept = default;
  nats_connection& operator=(nats_connection&&) = delete;

  /// Closes the connection and waits for libnats' closed callback (which
  /// runs on its own thread, after natsConnection_Destroy would return), so
  /// no callback touches freed state. Blocks briefly; not thread-safe.
  ~nats_connection() {
    if (!conn_) return;
    natsConnection_Close(conn_.get());
    bool seen = false;
    {
      std::unique_lock<std::mutex> lock(state_->m);
      // Shutdown safety bound in real time, not a timed behaviour: libnats
      // always runs the closed callback; the bound only guards a hang.
      seen = state_->cv.wait_for(lock, std::chrono::seconds(10), [&] { return state_->closed_seen; });
    }
    conn_.reset();
    // If the callback never came, keep the state alive rather than risk a use after free.
    if (!seen) new std::shared_ptr<state>(state_);  // NOLINT: deliberate leak
  }

  /// Latest status; never blocks. Thread-safe.
  [[nodiscard]] connection_status status() const noexcept { return state_->status.load(); }

  /// Registers `fn`, run on a libnats thread after every status change (after
  /// `on_status`); returns an id for `remove_status_listener`. `fn` must not
  /// block for long nor add or remove listeners. Allocates. Thread-safe.
  [[nodiscard]] std::uint64_t add_status_listener(std::function<void(connection_status)> fn) {
    std::lock_guard<std::mutex> lock(state_->listeners_m);
    const std::uint64_t id = ++state_->last_listener;
    state_->listeners.emplace_back(id, std::move(fn));
    return id;
  }
  /// Unregisters a listener. Once this returns the listener is not running
  /// and never runs again (it blocks while a status change is calling it).
  /// Thread-safe; must not be called from a listener.
  void remove_status_listener(std::uint64_t id) {
    std::lock_guard<std::mutex> lock(state_->listeners_m);
    auto& ls = state_->listeners;
    ls.erase(std::remove_if(ls.begin(), ls.end(), [&](const auto& l) { return l.first == id; }), ls.end());
  }
  /// The libnats handle, for calls postbox does not wrap. Not owned by the caller.
  [[nodiscard]] natsConnection* native() const noexcept { return conn_.get(); }
  /// Flushes and waits for the server's PONG (blocks up to `timeout`).
  [[nodiscard]] errc flush(std::chrono::milliseconds timeout) const noexcept {
    return detail::nats_errc(natsConnection_FlushTimeout(conn_.get(), timeout.count()));
  }

  /// The latest asynchronous error (a permission violation, a slow
  /// consumer, a login refused on reconnect), secrets removed; code `ok` and
  /// count 0 when there was none. Allocates; thread-safe.
  [[nodiscard]] nats_error_info last_error() const {
    std::lock_guard<std::mutex> lock(state_->errors_m);
    return state_->last;
  }
  /// Permission violations the server reported on this connection so far;
  /// also the mark for `permission_denied_since`. Blocks only on a brief
  /// internal lock. Thread-safe.
  [[nodiscard]] std::uint64_t permission_violations() const {
    std::lock_guard<std::mutex> lock(state_->errors_m);
    return state_->violations_seen;
  }
  /// True when, after `mark` (a `permission_violations()` value), the server
  /// refused `op` ("Publish", "Subscription"; empty: either) on a subject for which `matches(subject)` holds (the
  /// last 64 violations are kept). The server reports a violation
  /// asynchronously and otherwise drops the message, so callers that waited
  /// in vain ask this to tell `permission_denied` from a timeout. First
  /// flushes (one round trip, at most 1 s): the server answers in order, so a
  /// refusal it sent before the PONG has been read by then. Blocks; thread-safe.
  template <class Match>
    requires std::is_invocable_r_v<bool, Match&, std::string_view> &&
             (!std::is_convertible_v<Match, std::string_view>)
  [[nodiscard]] bool permission_denied_since(std::uint64_t mark, std::string_view op, Match&& matches) const {
    if (conn_ && natsConnection_Status(conn_.get()) == NATS_CONN_STATUS_CONNECTED)
      (void)natsConnection_FlushTimeout(conn_.get(), 1000);  // best effort: a failed flush leaves what is known
    std::vector<std::string> texts;
    std::string recorded_last;  // the newest violation the callback has recorded
    {
      std::lock_guard<std::mutex> lock(state_->errors_m);
      const std::uint64_t kept = state_->violations.size();
      const std::uint64_t first = state_->violations_seen - kept;
      for (std::uint64_t i = std::max(mark, first); i < state_->violations_seen; ++i)
        texts.push_back(state_->violations[static_cast<std::size_t>(i - first)]);
      if (!state_->violations.empty()) recorded_last = state_->violations.back();
    }
    // libnats also keeps the latest error on the connection, set by its read
    // loop before the error callback runs on another thread: it covers a
    // caller that asks before that callback has recorded the violation. Only
    // a text the callback has not recorded yet counts, so an old refusal of
    // the same subject does not turn a later timeout into permission_denied
    // (a repeat of it is then caught by the caller's next attempt).
    const char* latest = nullptr;
    if (conn_ && natsConnection_GetLastError(conn_.get(), &latest) == NATS_NOT_PERMITTED && latest != nullptr &&
        detail::nats_redact(latest, state_->secrets) != recorded_last)
      texts.emplace_back(latest);
    for (const auto& t : texts) {
      const auto v = detail::parse_violation(t);
      if (v && (op.empty() || v->first == op) && matches(std::string_view(v->second))) return true;
    }
    return false;
  }
  /// permission_denied_since for one subject.
  [[nodiscard]] bool permission_denied_since(std::uint64_t mark, std::string_view op, std::string_view subject) const {
    return permission_denied_since(mark, op, [subject](std::string_view s) { return s == subject; });
  }

 private:
  [[noreturn]] void fail(natsStatus s, const char* what, std::optional<errc> code = std::nullopt) const {
    // libnats' thread-local detail ("SSL handshake error: certificate verify
    // failed") helps; it names files and hosts, and is scrubbed of secrets anyway.
    std::string text = std::string("postbox::nats: ") + what + ": " + natsStatus_GetText(s);
    natsStatus ignored = NATS_OK;
    if (const char* d = nats_GetLastError(&ignored); d != nullptr && *d != '\0') text += std::string(" (") + d + ")";
    POSTBOX_THROW(error(code.value_or(detail::nats_errc(s)), detail::nats_redact(std::move(text), state_->secrets)));
  }
  void check(natsStatus s, const char* what) const {
    if (s != NATS_OK) fail(s, what);
  }

  void configure_tls(natsOptions* o, const nats_tls_options& t) const {
    if (t.required) check(natsOptions_SetSecure(o, true), "tls: secure");
    if (!t.ca_file.empty()) check(natsOptions_LoadCATrustedCertificates(o, t.ca_file.c_str()), "tls: ca_file");
    if (!t.cert_file.empty())
      check(natsOptions_LoadCertificatesChain(o, t.cert_file.c_str(), t.key_file.c_str()), "tls: cert_file/key_file");
    if (!t.verify_server) check(natsOptions_SkipServerVerification(o, true), "tls: verify_server");
    if (!t.expected_hostname.empty())
      check(natsOptions_SetExpectedHostname(o, t.expected_hostname.c_str()), "tls: expected_hostname");
    if (!t.ciphers.empty()) check(natsOptions_SetCiphers(o, t.ciphers.c_str()), "tls: ciphers");
    if (!t.cipher_suites.empty()) check(natsOptions_SetCipherSuites(o, t.cipher_suites.c_str()), "tls: cipher_suites");
  }

  void configure_credentials(natsOptions* o, const nats_credentials& c, const std::string& form) const {
    if (form == "user/password") check(natsOptions_SetUserInfo(o, c.user.c_str(), c.password.c_str()), "credentials: user");
    if (form == "token") check(natsOptions_SetToken(o, c.token.c_str()), "credentials: token");
    if (form == "nkey") check(natsOptions_SetNKeyFromSeed(o, c.nkey.c_str(), c.nkey_seed_file.c_str()), "credentials: nkey");
    if (form == "creds_file")
      check(natsOptions_SetUserCredentialsFromFiles(o, c.creds_file.c_str(),
                                                    c.creds_seed_file.empty() ? nullptr : c.creds_seed_file.c_str()),
            "credentials: creds_file");
  }

  struct state {
    // Written by libnats callback threads and the constructor; read by any
    // thread through status(). seq_cst: a lone flag, no ordering partner.
    std::atomic<connection_status> status{connection_status::reconnecting};
    std::function<void(connection_status)> on_status;
    std::int64_t wait_ms = 100, wait_max_ms = 2000;
    std::mutex m;                // guards closed_seen
    std::condition_variable cv;  // signalled when closed_seen becomes true
    bool closed_seen = false;
    // Listeners run under listeners_m, so remove_status_listener returning
    // means the listener is not running (see its comment).
    std::mutex listeners_m;
    std::vector<std::pair<std::uint64_t, std::function<void(connection_status)>>> listeners;
    std::uint64_t last_listener = 0;
    std::function<void(errc, std::string_view)> on_error;
    std::vector<std::string> secrets;  // scrubbed from error texts; set before connecting
    // Asynchronous errors, written by libnats' callback thread, read by any
    // thread through last_error() / permission_denied_since().
    mutable std::mutex errors_m;  // guards last, violations, violations_seen
    nats_error_info last;
    std::vector<std::string> violations;  // the latest permission violations' texts, at most 64, oldest first
    std::uint64_t violations_seen = 0;
    void set(connection_status s) {
      status.store(s);
      if (on_status) {
        POSTBOX_TRY { on_status(s); }
        POSTBOX_CATCH_ALL {}
      }
      std::lock_guard<std::mutex> lock(listeners_m);
      for (auto& l : listeners) {
        POSTBOX_TRY { l.second(s); }
        POSTBOX_CATCH_ALL {}
      }
    }
  };
  static std::int64_t delay_cb(natsConnection*, int attempts, void* closure) {
    auto* st = static_cast<state*>(closure);
    std::int64_t d = st->wait_ms;
    for (int i = 1; i < attempts && d < st->wait_max_ms; ++i) d *= 2;
    return d < st->wait_max_ms ? d : st->wait_max_ms;
  }
  static void error_cb(natsConnection* nc, natsSubscription*, natsStatus err, void* c) {
    auto* st = static_cast<state*>(c);
    const char* raw = nullptr;
    std::string text = natsConnection_GetLastError(nc, &raw) == err && raw != nullptr && *raw != '\0'
                           ? std::string(raw)
                           : std::string(natsStatus_GetText(err));
    POSTBOX_TRY { text = detail::nats_redact(std::move(text), st->secrets); }
    POSTBOX_CATCH_ALL { text = natsStatus_GetText(err); }
    const errc code = detail::nats_errc(err);
    {
      std::lock_guard<std::mutex> lock(st->errors_m);
      st->last.code = code;
      st->last.text = text;
      ++st->last.count;
      if (err == NATS_NOT_PERMITTED) {
        if (st->violations.size() == 64) st->violations.erase(st->violations.begin());
        st->violations.push_back(text);
        ++st->violations_seen;
      }
    }
    if (st->on_error) {
      POSTBOX_TRY { st->on_error(code, text); }
      POSTBOX_CATCH_ALL {}
    }
  }
  static void disconnected_cb(natsConnection*, void* c) { static_cast<state*>(c)->set(connection_status::reconnecting); }
  static void reconnected_cb(natsConnection*, void* c) { static_cast<state*>(c)->set(connection_status::connected); }
  static void closed_cb(natsConnection*, void* c) {
    auto* st = static_cast<state*>(c);
    st->set(connection_status::closed);
    // Notify under the lock: the destructor cannot free the state before
    // this scope releases the mutex, and nothing touches it afterwards.
    std::lock_guard<std::mutex> lock(st->m);
    st->closed_seen = true;
    st->cv.notify_all();
  }

  // Callbacks hold a raw pointer to state_, which outlives conn_ (declared first, destroyed last).
  std::shared_ptr<state> state_;
  std::unique_ptr<natsConnection, detail::nats_conn_deleter> conn_;
};

/// Stream settings for `jetstream::ensure_stream`. A plain value.
struct stream_options {
  std::string name{};
  std::vector<std::string> subjects{};
  int replicas = 1;
  bool file_storage = true;
  std::chrono::milliseconds duplicate_window{std::chrono::minutes(2)};
};

/// Durable pull consumer settings. A plain value. (Named apart from the
/// consumer runtime's `postbox::consumer_options` in consumer.hpp.)
struct jetstream_consumer_options {
  std::string stream{};
  std::string durable{};
  std::string filter_subject{};          ///< subject filter, e.g. "orders.>" (required by libnats)
  std::chrono::milliseconds ack_wait{30000};  ///< redelivery after this without ack/in-progress
  int max_deliver = -1;                  ///< -1: unlimited
};

/// Server-side counts of a durable consumer (`jetstream::consumer_state`). A plain value.
struct durable_state {
  std::uint64_t pending = 0;      ///< stream messages not yet delivered to it
  std::uint64_t ack_pending = 0;  ///< delivered, neither acked nor termed yet
  std::uint64_t redelivered = 0;  ///< of those, messages delivered more than once
  std::uint64_t waiting = 0;      ///< pull requests waiting on the server
  std::uint64_t delivered_stream_sequence = 0;  ///< last stream sequence delivered
  std::uint64_t ack_floor_stream_sequence = 0;  ///< every message up to here is settled
};

/// A JetStream context on a connection. Move-only; thread-safe as libnats' jsCtx.
class jetstream {
 public:
  /// Creates the context; `api_timeout` bounds each JetStream API call. Throws on failure.
  explicit jetstream(nats_connection& conn, std::chrono::milliseconds api_timeout = std::chrono::milliseconds(5000))
      : conn_(&conn) {
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = api_timeout.count();
    jsCtx* j = nullptr;
    detail::nats_check(natsConnection_JetStream(&j, conn.native(), &o), "jetstream context");
    js_.reset(j);
    api_timeout_ = api_timeout;
  }

  /// Creates the stream, or updates it if it exists. Blocks on the server.
  /// Returns `ok` or an error code (`permission_denied`, after the API
  /// timeout, when the user may not manage streams). Thread-safe.
  [[nodiscard]] errc ensure_stream(const stream_options& so) {
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = so.name.c_str();
    std::vector<const char*> subs;
    for (auto& s : so.subjects) subs.push_back(s.c_str());
    cfg.Subjects = subs.data();
    cfg.SubjectsLen = static_cast<int>(subs.size());
    cfg.Replicas = static_cast<int64_t>(so.replicas);
    cfg.Storage = so.file_storage ? js_FileStorage : js_MemoryStorage;
    cfg.Duplicates = std::chrono::duration_cast<std::chrono::nanoseconds>(so.duplicate_window).count();
    jsErrCode jerr = static_cast<jsErrCode>(0);
    jsStreamInfo* si = nullptr;
    const std::uint64_t mark = conn_->permission_violations();
    natsStatus s = js_AddStream(&si, js_.get(), &cfg, nullptr, &jerr);
    if (s != NATS_OK && jerr == JSStreamNameExistErr) s = js_UpdateStream(&si, js_.get(), &cfg, nullptr, &jerr);
    if (si) jsStreamInfo_Destroy(si);
    if (s != NATS_OK && conn_->permission_denied_since(mark, "Publish", [](std::string_view subj) {
          return subj.rfind("$JS.API.STREAM.", 0) == 0;
        }))
      return errc::permission_denied;  // the API request was refused, and timed out
    return detail::nats_errc(s);
  }

  /// Messages stored in `stream`, or an error. Blocks on the server.
  [[nodiscard]] result<std::uint64_t> stream_messages(const std::string& stream) {
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s = js_GetStreamInfo(&si, js_.get(), stream.c_str(), nullptr, &jerr);
    if (s != NATS_OK) return detail::nats_errc(s);
    const std::uint64_t n = si->State.Msgs;
    jsStreamInfo_Destroy(si);
    return n;
  }

  /// Server name of the stream's cluster leader (empty when not clustered),
  /// or an error. Blocks on the server.
  [[nodiscard]] result<std::string> stream_leader(const std::string& stream) {
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s = js_GetStreamInfo(&si, js_.get(), stream.c_str(), nullptr, &jerr);
    if (s != NATS_OK) return detail::nats_errc(s);
    std::string leader = (si->Cluster && si->Cluster->Leader) ? si->Cluster->Leader : "";
    jsStreamInfo_Destroy(si);
    return leader;
  }

  /// Server-side state of durable `durable` on `stream` (what is pending,
  /// awaiting ack, redelivered), or an error (`not_found` when it does not
  /// exist). Blocks on the server. Thread-safe.
  [[nodiscard]] result<durable_state> consumer_state(const std::string& stream, const std::string& durable) {
    jsConsumerInfo* ci = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const natsStatus s = js_GetConsumerInfo(&ci, js_.get(), stream.c_str(), durable.c_str(), nullptr, &jerr);
    if (s != NATS_OK) return detail::nats_errc(s);
    durable_state out;
    out.pending = ci->NumPending;
    out.ack_pending = static_cast<std::uint64_t>(ci->NumAckPending);
    out.redelivered = static_cast<std::uint64_t>(ci->NumRedelivered);
    out.waiting = static_cast<std::uint64_t>(ci->NumWaiting);
    out.delivered_stream_sequence = ci->Delivered.Stream;
    out.ack_floor_stream_sequence = ci->AckFloor.Stream;
    jsConsumerInfo_Destroy(ci);
    return out;
  }

  /// The libnats context. Not owned by the caller.
  [[nodiscard]] jsCtx* native() const noexcept { return js_.get(); }
  /// The connection this context uses.
  [[nodiscard]] nats_connection& connection() const noexcept { return *conn_; }
  /// The bound of each JetStream API call (also of an acknowledgement's confirmation).
  [[nodiscard]] std::chrono::milliseconds api_timeout() const noexcept { return api_timeout_; }

 private:
  nats_connection* conn_;
  std::chrono::milliseconds api_timeout_{5000};
  std::unique_ptr<jsCtx, detail::nats_js_deleter> js_;
};

/// Subject for an envelope: an explicit mapping when set, else the envelope's type.
struct subject_mapping {
  std::string prefix{};  ///< prepended to the type, e.g. "orders." (empty: none)
  std::function<std::string(std::string_view type)> map{};  ///< overrides prefix+type when set
  [[nodiscard]] std::string operator()(std::string_view type) const {
    return map ? map(type) : prefix + std::string(type);
  }
};

/// What the stream answered to a publish.
struct publish_ack {
  std::string stream;
  std::uint64_t sequence = 0;
  bool duplicate = false;  ///< the id was already in the duplicate window
  int attempts = 1;        ///< publishes sent (more than 1 after ack timeouts)
};

namespace detail {

/// True when a failed JetStream publish may or may not have stored the
/// message (ack timeout, "no responders" during an election, a connection
/// being restored, a stream error such as "no leader"): republish with the
/// same id; the duplicate window absorbs a stored copy.
[[nodiscard]] inline bool js_unknown_outcome(natsStatus s) noexcept {
  return s == NATS_TIMEOUT || s == NATS_NO_RESPONDERS || s == NATS_CONNECTION_DISCONNECTED || s == NATS_ERR ||
         s == NATS_NOT_YET_CONNECTED;
}

/// One JetStream publish of `msg` with `Nats-Msg-Id` = `id`, waiting up to
/// `wait` for the PubAck, which fills `out` on NATS_OK. Blocks; thread-safe.
[[nodiscard]] inline natsStatus js_publish_once(jsCtx* js, natsMsg* msg, const std::string& id,
                                                std::chrono::milliseconds wait, publish_ack& out) {
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MsgId = id.c_str();
  po.MaxWait = wait.count();
  jsPubAck* pa = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_PublishMsg(&pa, js, msg, &po, &jerr);
  if (s == NATS_OK && pa == nullptr) s = NATS_ERR;
  if (s == NATS_OK) out = publish_ack{pa->Stream ? pa->Stream : "", pa->Sequence, pa->Duplicate, out.attempts};
  if (pa) jsPubAck_Destroy(pa);
  return s;
}

}  // namespace detail

/// Publisher settings. A plain value.
struct publisher_options {
  subject_mapping subjects{};                         ///< envelope type -> subject
  std::chrono::milliseconds ack_timeout{2000};        ///< wait for each PubAck
  int max_attempts = 20;                              ///< publishes per call before `timeout`/`busy`
  std::chrono::milliseconds retry_backoff{50};        ///< first pause after an instant failure
  std::chrono::milliseconds retry_backoff_max{1000};  ///< cap (doubles per attempt)
};

/// Publishes envelopes to JetStream with `Nats-Msg-Id` = id and waits for
/// the PubAck. A timeout is an unknown outcome: republished with the same id
/// up to `max_attempts` times (the duplicate window absorbs a stored copy).
/// Blocks. Thread-safe (no shared mutable state).
class jetstream_publisher {
 public:

  /// `clk` times the pauses between attempts (a leader election answers
  /// "no responders" at once). Never blocks.
  explicit jetstream_publisher(jetstream& js, publisher_options opts = {}, const clock& clk = default_clock())
      : js_(&js), opts_(std::move(opts)), clock_(&clk) {}

  /// Publishes on the mapped subject. `ok` only after a PubAck; `timeout`
  /// or `busy` when every attempt's outcome stayed unknown (retry later
  /// with the same id); `permission_denied` when the server refused the
  /// subject (known once the first attempt's `ack_timeout` has passed: the
  /// server reports it out of band; not retried). Blocks; allocates. Thread-safe.
  template <class T>
  [[nodiscard]] result<publish_ack> publish(const envelope<T>& env) {
    return publish(env, opts_.subjects(env.type));
  }

  /// Publishes on `subject`. Same semantics as above.
  template <class T>
  [[nodiscard]] result<publish_ack> publish(const envelope<T>& env, const std::string& subject) {
    auto msg = to_nats_msg(env, subject);
    if (!msg.has_value()) return msg.status();
    const std::string id = env.id.to_string();
    errc last = errc::timeout;
    auto pause = opts_.retry_backoff;
    for (int attempt = 1; attempt <= opts_.max_attempts; ++attempt) {
      publish_ack ack;
      ack.attempts = attempt;
      const std::uint64_t mark = js_->connection().permission_violations();
      const natsStatus s = detail::js_publish_once(js_->native(), msg->get(), id, opts_.ack_timeout, ack);
      if (s == NATS_OK) return ack;
      // The server drops a publish outside the user's permissions and says so
      // only out of band: the attempt times out, and retrying cannot help.
      if (js_->connection().permission_denied_since(mark, "Publish", subject)) return errc::permission_denied;
      last = detail::nats_errc(s);
      // Unknown outcome: republish with the same id (detail::js_unknown_outcome).
      if (!detail::js_unknown_outcome(s) || attempt == opts_.max_attempts) break;
      if (s != NATS_TIMEOUT) {  // an instant failure: back off on the clock
        std::mutex m;
        std::condition_variable cv;
        std::unique_lock<std::mutex> lock(m);
        const auto until = clock_->now() + std::chrono::duration_cast<duration>(pause);
        for (int spins = 0; clock_->now() < until && spins < 1000; ++spins) clock_->wait_until(lock, cv, until);
        pause = std::min(pause * 2, opts_.retry_backoff_max);
      }
    }
    return last;
  }

 private:
  jetstream* js_;
  publisher_options opts_;
  const clock* clock_;
};

/// How one envelope given to `buffered_jetstream_publisher` ended: `ok` (the
/// stream acknowledged it; `ack` says where), `full` (discarded by
/// drop_oldest or drop_newest), `canceled` (the publisher was destroyed
/// first: not acknowledged, so the outcome is unknown if it was in flight),
/// `closed` (the connection closed for good) or a permanent publish error
/// (`permission_denied` when the server's authorization refused the subject).
struct buffered_outcome {
  message_id id;
  errc status = errc::ok;
  publish_ack ack;
};

/// Buffered publisher settings. A plain value.
struct buffered_publisher_options {
  /// Envelopes held while the stream cannot take them (rounded up to a power
  /// of two, as `channel`), plus the one in flight.
  std::size_t capacity = 1024;
  overflow policy = overflow::block;                  ///< what `enqueue` does when the buffer is full
  subject_mapping subjects{};                         ///< envelope type -> subject
  std::chrono::milliseconds ack_timeout{2000};        ///< wait for each PubAck
  std::chrono::milliseconds retry_backoff{50};        ///< first pause after an instant failure
  std::chrono::milliseconds retry_backoff_max{1000};  ///< cap (doubles per attempt)
};

/// Counters of a buffered publisher (snapshot).
struct buffered_publisher_stats {
  std::uint64_t enqueued = 0;     ///< accepted by `enqueue` (queued, or dropped later by drop_oldest)
  std::uint64_t published = 0;    ///< completed `ok` after a PubAck
  std::uint64_t duplicates = 0;   ///< of those, acks saying the stream already had the id
  std::uint64_t republished = 0;  ///< attempts after an unknown outcome (same id)
  std::uint64_t dropped = 0;      ///< discarded by drop_oldest / drop_newest
  std::uint64_t refused = 0;      ///< refused at `enqueue` (fail policy, closed, bad envelope)
  std::uint64_t failed = 0;       ///< completed with a permanent error or `closed`
  std::uint64_t canceled = 0;     ///< still buffered or in flight at destruction
  std::size_t buffered = 0;       ///< queued now, not counting the one in flight
  std::size_t in_flight = 0;      ///< 0 or 1: taken from the buffer, not yet completed
  std::size_t waiting_producers = 0;  ///< producers blocked in `enqueue` (overflow::block)
  connection_status connection = connection_status::connected;
};

/// Publishes envelopes to JetStream in enqueue order from one background
/// thread, through a bounded local buffer that absorbs a lost connection:
/// while the connection is `reconnecting` nothing is sent and envelopes wait
/// in the buffer; when it is full, `policy` applies (block / drop_oldest /
/// drop_newest / fail, as in `topic`). Each envelope is published with
/// `Nats-Msg-Id` = its id and retried with the same id after every unknown
/// outcome, for as long as the publisher lives; its callback reports `ok` only
/// after a PubAck. The buffer is memory: for crash safety stage envelopes in
/// an outbox first. `enqueue` is thread-safe; callbacks run on the publishing
/// thread (or on the enqueuing thread for drops) and must not block for long.
class buffered_jetstream_publisher {
 public:
  using callback = std::function<void(const buffered_outcome&)>;

  /// Starts the publishing thread. `js` (and its connection) must outlive
  /// this. `clk` times the pauses between failed attempts. Allocates.
  explicit buffered_jetstream_publisher(jetstream& js, buffered_publisher_options opts = {},
                                        const clock& clk = default_clock())
      : js_(&js), opts_(std::move(opts)), clock_(&clk), buffer_(opts_.capacity == 0 ? 1 : opts_.capacity) {
    listener_ = js.connection().add_status_listener([this](connection_status) {
      // Under m_, so the publishing thread cannot miss it between its status
      // check and its wait (it checks and waits holding m_).
      std::lock_guard<std::mutex> lock(m_);
      cv_.notify_all();
    });
    thread_ = std::thread([this] { run(); });
  }
  buffered_jetstream_publisher(const buffered_jetstream_publisher&) = delete;
  buffered_jetstream_publisher& operator=(const buffered_jetstream_publisher&) = delete;

  /// Stops: the attempt in flight finishes (at most `ack_timeout`), then the
  /// envelope in flight unless acknowledged and every queued one complete
  /// with `canceled`; blocked producers return `closed`. Blocks.
  ~buffered_jetstream_publisher() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stopping_ = true;
    }
    cv_.notify_all();
    buffer_.close();
    thread_.join();
    js_->connection().remove_status_listener(listener_);
  }

  /// Queues `env` for the mapped subject. `ok` when queued (drop_newest: also
  /// when it was discarded at once, `cb` then gets `full`); `full` (fail
  /// policy: refused, `cb` never called); `closed` (stopping);
  /// `invalid_argument` (the envelope cannot be encoded). overflow::block
  /// blocks while full; the others never block. Allocates. Thread-safe.
  template <class T>
  [[nodiscard]] errc enqueue(const envelope<T>& env, callback cb = {}) {
    return enqueue(env, opts_.subjects(env.type), std::move(cb));
  }

  /// Queues `env` for `subject`. Same semantics as above.
  template <class T>
  [[nodiscard]] errc enqueue(const envelope<T>& env, const std::string& subject, callback cb = {}) {
    auto msg = to_nats_msg(env, subject);
    if (!msg.has_value()) {
      bump(refused_);
      return msg.status();
    }
    // acq_rel: flush() reads it (acquire) to see the queue empty; see run().
    outstanding_.fetch_add(1, std::memory_order_acq_rel);
    item it{std::move(*msg), env.id, std::move(cb)};
    const errc r = push(std::move(it));
    if (r != errc::ok) done_one();
    return r;
  }

  /// Waits on the clock until every envelope enqueued so far has completed,
  /// up to `timeout`: `ok` or `timeout`. Blocks. Thread-safe.
  [[nodiscard]] errc flush(duration timeout) {
    const time_point until = clock_->now() + timeout;
    std::unique_lock<std::mutex> lock(m_);
    // acquire: pairs with the release decrement in done_one().
    while (outstanding_.load(std::memory_order_acquire) != 0) {
      if (clock_->now() >= until) return errc::timeout;
      clock_->wait_until(lock, cv_, until);
    }
    return errc::ok;
  }

  /// The connection's status (`reconnecting` while envelopes wait). Never
  /// blocks. Thread-safe.
  [[nodiscard]] connection_status status() const noexcept { return js_->connection().status(); }

  /// Counters snapshot. Never blocks. Thread-safe.
  [[nodiscard]] buffered_publisher_stats stats() const noexcept {
    buffered_publisher_stats s;
    // relaxed: statistics, no data published through them.
    s.enqueued = enqueued_.load(std::memory_order_relaxed);
    s.published = published_.load(std::memory_order_relaxed);
    s.duplicates = duplicates_.load(std::memory_order_relaxed);
    s.republished = republished_.load(std::memory_order_relaxed);
    s.dropped = dropped_.load(std::memory_order_relaxed);
    s.refused = refused_.load(std::memory_order_relaxed);
    s.failed = failed_.load(std::memory_order_relaxed);
    s.canceled = canceled_.load(std::memory_order_relaxed);
    s.waiting_producers = waiting_.load(std::memory_order_relaxed);
    // acquire: pairs with the release stores in run(); seeing 1 means the
    // item has left the channel.
    s.in_flight = in_flight_.load(std::memory_order_acquire);
    s.buffered = buffer_.size_approx();
    s.connection = status();
    return s;
  }

 private:
  struct item {
    nats_msg_ptr msg;
    message_id id;
    callback cb;
  };

  static void bump(std::atomic<std::uint64_t>& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }

  errc push(item&& it) {
    for (;;) {
      send_status st = buffer_.try_send(std::move(it));
      if (st == send_status::full) {
        switch (opts_.policy) {
          case overflow::block:
            waiting_.fetch_add(1, std::memory_order_relaxed);
            st = buffer_.send(std::move(it));
            waiting_.fetch_sub(1, std::memory_order_relaxed);
            break;
          case overflow::drop_oldest:
            // Make room by discarding the oldest queued envelope (the one in
            // flight is not in the buffer), then try again.
            if (auto old = buffer_.try_receive()) {
              bump(dropped_);
              complete(*old, errc::full, {});
              done_one();
            }
            continue;
          case overflow::drop_newest:
            bump(enqueued_);
            bump(dropped_);
            complete(it, errc::full, {});
            done_one();
            return errc::ok;
          case overflow::fail:
            bump(refused_);
            return errc::full;
        }
      }
      if (st == send_status::ok) {
        bump(enqueued_);
        return errc::ok;
      }
      bump(refused_);
      return errc::closed;
    }
  }

  void complete(item& it, errc status, const publish_ack& ack) {
    if (status == errc::ok) {
      bump(published_);
      if (ack.duplicate) bump(duplicates_);
    } else if (status == errc::canceled) {
      bump(canceled_);
    } else if (status != errc::full) {
      bump(failed_);
    }
    if (!it.cb) return;
    POSTBOX_TRY { it.cb(buffered_outcome{it.id, status, ack}); }
    POSTBOX_CATCH_ALL {}
  }

  void done_one() {
    // release: pairs with the acquire in flush(); the notify under m_ wakes it.
    outstanding_.fetch_sub(1, std::memory_order_acq_rel);
    std::lock_guard<std::mutex> lock(m_);
    cv_.notify_all();
  }

  void run() {
    while (auto it = buffer_.receive()) {
      // release: pairs with the acquire in stats().
      in_flight_.store(1, std::memory_order_release);
      publish_ack ack;
      const errc status = publish_until_done(*it, ack);
      complete(*it, status, ack);
      in_flight_.store(0, std::memory_order_release);
      done_one();
    }
  }

  errc publish_until_done(item& it, publish_ack& ack) {
    const std::string id = it.id.to_string();
    auto pause = opts_.retry_backoff;
    std::unique_lock<std::mutex> lock(m_);
    for (int attempt = 1;; ++attempt) {
      // Hold the envelope while the connection is down; the status listener
      // notifies cv_ under m_ on every change.
      while (!stopping_ && status() == connection_status::reconnecting) cv_.wait(lock);
      if (stopping_) return errc::canceled;
      if (status() == connection_status::closed) return errc::closed;
      lock.unlock();
      ack.attempts = attempt;
      const std::uint64_t mark = js_->connection().permission_violations();
      const natsStatus s = detail::js_publish_once(js_->native(), it.msg.get(), id, opts_.ack_timeout, ack);
      const char* subject = natsMsg_GetSubject(it.msg.get());
      const bool denied = s != NATS_OK && subject != nullptr &&
                          js_->connection().permission_denied_since(mark, "Publish", std::string_view(subject));
      lock.lock();
      if (s == NATS_OK) return errc::ok;
      if (denied) return errc::permission_denied;  // refused by the server's authorization: permanent
      if (!detail::js_unknown_outcome(s)) return detail::nats_errc(s);
      bump(republished_);
      if (s != NATS_TIMEOUT) {  // an instant failure: back off on the clock
        const time_point until = clock_->now() + std::chrono::duration_cast<duration>(pause);
        while (!stopping_ && clock_->now() < until) clock_->wait_until(lock, cv_, until);
        pause = std::min(pause * 2, opts_.retry_backoff_max);
      }
    }
  }

  jetstream* js_;
  buffered_publisher_options opts_;
  const clock* clock_;
  channel<item> buffer_;
  std::mutex m_;               // guards stopping_; cv_ waits use it
  std::condition_variable cv_;  // status changes, stop, completions (flush)
  bool stopping_ = false;
  std::uint64_t listener_ = 0;
  // Statistics: incremented by producers and the publishing thread, read by
  // stats(); relaxed (no data published through them).
  std::atomic<std::uint64_t> enqueued_{0}, published_{0}, duplicates_{0}, republished_{0}, dropped_{0},
      refused_{0}, failed_{0}, canceled_{0};
  std::atomic<std::size_t> waiting_{0};  // producers in a blocking send; relaxed statistic
  // 1 while the publishing thread holds an envelope taken from buffer_.
  // Written only by that thread (release), read by stats() (acquire).
  std::atomic<std::size_t> in_flight_{0};
  // Envelopes enqueued and not yet completed. Incremented by enqueue before
  // the push, decremented (release) once an envelope's callback has run;
  // flush() reads it (acquire) under m_ and waits on cv_.
  std::atomic<std::size_t> outstanding_{0};
  std::thread thread_;  // last: starts after every member above exists
};

namespace detail {

/// What a JetStream ack subject says about one delivery.
struct js_ack_metadata {
  std::uint64_t delivered = 0;        ///< NumDelivered (1 on first delivery)
  std::uint64_t stream_sequence = 0;  ///< the message's sequence in the stream
  std::uint64_t pending = 0;          ///< messages left for the consumer
};

/// Parses a delivery's reply subject: `$JS.ACK.<stream>.<consumer>.<delivered>.
/// <stream seq>.<consumer seq>.<time>.<pending>` (9 tokens), or the form with
/// `<domain>.<account hash>` after `$JS.ACK` (11 tokens, plus an optional
/// random one). Read from the subject string alone: libnats'
/// natsMsg_GetMetaData also needs the message's subscription pointer, which
/// postbox does not rely on. Never allocates; never throws.
[[nodiscard]] inline std::optional<js_ack_metadata> parse_js_ack_subject(std::string_view reply) noexcept {
  constexpr std::string_view prefix = "$JS.ACK.";
  if (reply.substr(0, prefix.size()) != prefix) return std::nullopt;
  reply.remove_prefix(prefix.size());
  std::string_view tokens[12];
  std::size_t n = 0;
  while (!reply.empty()) {
    if (n == 12) return std::nullopt;
    const auto dot = reply.find('.');
    tokens[n++] = reply.substr(0, dot);
    if (dot == std::string_view::npos) break;
    reply.remove_prefix(dot + 1);
    if (reply.empty()) return std::nullopt;  // a trailing dot
  }
  std::size_t first;  // index of <delivered>
  if (n == 7) first = 2;
  else if (n == 9 || n == 10) first = 4;
  else return std::nullopt;
  const auto number = [](std::string_view t, std::uint64_t& out) noexcept {
    if (t.empty() || t.size() > 19) return false;
    std::uint64_t v = 0;
    for (const char c : t) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + static_cast<std::uint64_t>(c - '0');
    }
    out = v;
    return true;
  };
  js_ack_metadata m;
  std::uint64_t consumer_sequence = 0, timestamp = 0;
  if (!number(tokens[first], m.delivered) || !number(tokens[first + 1], m.stream_sequence) ||
      !number(tokens[first + 2], consumer_sequence) || !number(tokens[first + 3], timestamp) ||
      !number(tokens[first + 4], m.pending))
    return std::nullopt;
  return m;
}

/// Publishes `body` to a JetStream ack subject (`reply` of a delivery) and,
/// when `wait` is positive, waits for the server's confirmation. Blocks
/// (up to `wait`); thread-safe.
[[nodiscard]] inline natsStatus js_ack_send(natsConnection* nc, const char* reply, const std::string& body,
                                            std::chrono::milliseconds wait) {
  if (nc == nullptr || reply == nullptr || *reply == '\0') return NATS_ILLEGAL_STATE;
  if (wait.count() <= 0) return natsConnection_Publish(nc, reply, body.data(), static_cast<int>(body.size()));
  natsMsg* confirmation = nullptr;
  const natsStatus s =
      natsConnection_Request(&confirmation, nc, reply, body.data(), static_cast<int>(body.size()), wait.count());
  natsMsg_Destroy(confirmation);
  return s;
}

}  // namespace detail

/// One message from a pull source: the decoded envelope (or why it did not
/// decode) and its settlement operations, sent on the message's JetStream
/// ack subject. The first settlement (ack, nak, term) wins; later ones are
/// no-ops that return `ok`. Move-only; settle from one thread at a time.
/// The connection must outlive it.
template <class T>
class jetstream_delivery {
 public:
  /// Decodes `msg`, received on `nc`; `ack_timeout` bounds `ack()`.
  jetstream_delivery(nats_msg_ptr msg, natsConnection* nc,
                     std::chrono::milliseconds ack_timeout = std::chrono::milliseconds(5000))
      : msg_(std::move(msg)), nc_(nc), ack_timeout_(ack_timeout) {
    env_ = from_nats_msg<T>(msg_.get(), error_);
    const char* reply = natsMsg_GetReply(msg_.get());
    if (const auto meta = detail::parse_js_ack_subject(reply != nullptr ? reply : "")) {
      delivered_ = static_cast<std::uint32_t>(meta->delivered);
      stream_sequence_ = meta->stream_sequence;
      pending_ = meta->pending;
    }
    // attempt = deliveries started so far: the producer's count plus this stream's.
    if (env_) env_->attempt += delivered_;
  }

  [[nodiscard]] bool has_value() const noexcept { return env_.has_value(); }
  /// The envelope; precondition has_value().
  [[nodiscard]] envelope<T>& operator*() noexcept { return *env_; }
  [[nodiscard]] envelope<T>* operator->() noexcept { return &*env_; }
  /// Why decoding failed (code ok when it did not).
  [[nodiscard]] const nats_decode_error& error() const noexcept { return error_; }
  /// Times the server delivered this message (1 on first delivery).
  [[nodiscard]] std::uint32_t delivered() const noexcept { return delivered_; }
  [[nodiscard]] std::uint64_t stream_sequence() const noexcept { return stream_sequence_; }
  /// Messages the server still had for this consumer after this one (its
  /// lag when this was delivered).
  [[nodiscard]] std::uint64_t pending() const noexcept { return pending_; }
  /// The message body as received (the payload JSON). Valid while this lives.
  [[nodiscard]] std::string_view data() const noexcept {
    const char* d = natsMsg_GetData(msg_.get());
    const int n = natsMsg_GetDataLength(msg_.get());
    return d != nullptr && n > 0 ? std::string_view(d, static_cast<std::size_t>(n)) : std::string_view{};
  }
  /// The libnats message. Owned by this delivery.
  [[nodiscard]] natsMsg* native() const noexcept { return msg_.get(); }

  /// Acknowledges and waits for the server to confirm (blocks up to the ack
  /// timeout). `ok`: not redelivered while the server runs or after a clean
  /// restart; after a server crash it may be (nats-server writes ack state
  /// asynchronously; see docs/design/nats.md). `timeout` leaves the outcome
  /// unknown (redelivered after its ack wait); it may be called again.
  [[nodiscard]] errc ack() { return settle("+ACK", ack_timeout_); }
  /// Redelivery after `delay` (at once when zero). Does not wait for the server.
  [[nodiscard]] errc nak(std::chrono::milliseconds delay = {}) {
    if (delay.count() <= 0) return settle("-NAK", {});
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(delay).count();
    return settle("-NAK {\"delay\": " + std::to_string(ns) + "}", {});
  }
  /// Never redeliver. Does not wait for the server.
  [[nodiscard]] errc term() { return settle("+TERM", {}); }
  /// Resets the ack-wait timer (a long handler is still working); a no-op
  /// after a settlement. Does not wait for the server.
  [[nodiscard]] errc in_progress() {
    if (settled_) return errc::ok;
    return detail::nats_errc(detail::js_ack_send(nc_, natsMsg_GetReply(msg_.get()), "+WPI", {}));
  }

 private:
  errc settle(const std::string& body, std::chrono::milliseconds wait) {
    if (settled_) return errc::ok;
    const natsStatus s = detail::js_ack_send(nc_, natsMsg_GetReply(msg_.get()), body, wait);
    if (s == NATS_OK) settled_ = true;
    return detail::nats_errc(s);
  }

  nats_msg_ptr msg_;
  natsConnection* nc_ = nullptr;
  std::chrono::milliseconds ack_timeout_{5000};
  bool settled_ = false;
  nats_decode_error error_;
  std::optional<envelope<T>> env_;
  std::uint32_t delivered_ = 0;
  std::uint64_t stream_sequence_ = 0;
  std::uint64_t pending_ = 0;
};

/// A durable pull consumer that yields envelopes. The durable keeps its
/// position on the server, so a recreated source resumes where acks stopped;
/// sources with one durable name compete (a consumer group).
///
/// Pull requests go out on postbox's own reply inbox (one subscription on
/// `<inbox>.*`, one token per request), not through libnats' fetch: libnats
/// 3.4's fetch miscounts when messages of an earlier request are still
/// queued on the subscription and writes past its result array. Messages
/// that arrive after a fetch gave up are kept for the next fetch; status
/// replies of earlier requests are recognised by their token and dropped.
/// Blocking; use one source per thread.
template <class T>
class jetstream_pull_source {
 public:
  /// Binds the durable consumer, creating it (explicit ack, deliver all)
  /// when it does not exist. An existing durable (or one another source
  /// created meanwhile) must match the options: a pull consumer with explicit
  /// ack and the same `filter_subject`, `ack_wait` and `max_deliver` (any
  /// value below 1 meaning unlimited); otherwise it throws `postbox::error`
  /// with `errc::conflict` naming each field that differs, server value
  /// first (the durable is left as it is). Throws `permission_denied` when
  /// the server's authorization refuses the consumer API or the reply inbox
  /// (after the API timeout), and on other failures. Blocks
  /// for the API round trips; allocates.
  jetstream_pull_source(jetstream& js, const jetstream_consumer_options& co)
      : nc_(js.connection().native()), conn_(&js.connection()), ack_timeout_(js.api_timeout()) {
    const std::uint64_t mark = conn_->permission_violations();
    jsConsumerInfo* ci = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_GetConsumerInfo(&ci, js.native(), co.stream.c_str(), co.durable.c_str(), nullptr, &jerr);
    bool existing = s == NATS_OK;
    if (s == NATS_NOT_FOUND || jerr == JSConsumerNotFoundErr) {
      jsConsumerConfig cfg;
      jsConsumerConfig_Init(&cfg);
      cfg.Durable = co.durable.c_str();
      cfg.AckPolicy = js_AckExplicit;
      cfg.DeliverPolicy = js_DeliverAll;
      cfg.AckWait = std::chrono::duration_cast<std::chrono::nanoseconds>(co.ack_wait).count();
      cfg.MaxDeliver = co.max_deliver;
      if (!co.filter_subject.empty()) cfg.FilterSubject = co.filter_subject.c_str();
      jerr = static_cast<jsErrCode>(0);
      s = js_AddConsumer(&ci, js.native(), co.stream.c_str(), &cfg, nullptr, &jerr);
      if (s != NATS_OK && (jerr == JSConsumerNameExistErr || jerr == JSConsumerExistingActiveErr)) {
        // Another source created it meanwhile.
        s = js_GetConsumerInfo(&ci, js.native(), co.stream.c_str(), co.durable.c_str(), nullptr, &jerr);
        existing = s == NATS_OK;
      }
    }
    const std::string mismatch =
        existing && ci != nullptr && ci->Config != nullptr ? config_mismatch(*ci->Config, co) : std::string();
    if (ci != nullptr) jsConsumerInfo_Destroy(ci);
    if (s != NATS_OK && denied_since(mark))
      POSTBOX_THROW(error(errc::permission_denied, "jetstream_pull_source: durable " + co.durable + " on stream " +
                                                       co.stream + ": the server's authorization refused the consumer API"));
    detail::nats_check(s, "bind durable consumer");
    if (!mismatch.empty())
      POSTBOX_THROW(error(errc::conflict, "jetstream_pull_source: durable " + co.durable + " on stream " + co.stream +
                                              " exists with another configuration: " + mismatch));
    next_subject_ = "$JS.API.CONSUMER.MSG.NEXT." + co.stream + "." + co.durable;
    natsInbox* inbox = nullptr;
    detail::nats_check(natsInbox_Create(&inbox), "inbox");
    inbox_ = std::string(inbox) + ".";
    natsInbox_Destroy(inbox);
    natsSubscription* sub = nullptr;
    detail::nats_check(natsConnection_SubscribeSync(&sub, nc_, (inbox_ + "*").c_str()), "subscribe inbox");
    sub_ = {sub, detail::nats_sub_deleter{nc_}};
    // Unlimited pending: deliveries are bounded by what this source asked for.
    (void)natsSubscription_SetPendingLimits(sub, -1, -1);
    // The server must know the subscription before the first request.
    detail::nats_check(natsConnection_FlushTimeout(nc_, ack_timeout_.count()), "flush");
    // The server answers a refused subscription with an error before the
    // flush's PONG, so it is known by now (or at the latest by the first fetch).
    if (denied_since(mark))
      POSTBOX_THROW(error(errc::permission_denied, "jetstream_pull_source: durable " + co.durable + " on stream " +
                                                       co.stream + ": the server's authorization refused its reply inbox"));
  }

  /// Up to `max` deliveries, waiting up to `timeout` for the first: what
  /// earlier requests left queued, else what the server has now (a "no
  /// wait" request), else a request that waits for one message (then
  /// whatever else has arrived). Returns as soon as it has any. `timeout`
  /// when none arrived, also when the connection was being restored for the
  /// whole `timeout` (it waits for the reconnect with a bounded backoff, 1 ms
  /// doubling to 32 ms, as libnats' own fetch waits out its timeout, so a
  /// fetch loop does not spin through an outage; nothing arrived, which is
  /// what `timeout` says, and the next fetch is the right retry); `busy`
  /// while reconnecting only for a zero `timeout` (no request is sent);
  /// `closed` when it is closed; `permission_denied` when the server refused
  /// the pull request's subject; other codes on server errors. Blocks up to
  /// `timeout` (a "no wait" answer is allowed the API timeout when `timeout`
  /// is zero); allocates.
  [[nodiscard]] result<std::vector<jetstream_delivery<T>>> fetch(int max, std::chrono::milliseconds timeout) {
    if (max < 1) return errc::invalid_argument;
    const std::uint64_t mark = conn_->permission_violations();
    auto denied_or = [&](errc e) -> errc { return e == errc::timeout && denied_since(mark) ? errc::permission_denied : e; };
    const auto until = std::chrono::steady_clock::now() + (timeout.count() > 0 ? timeout : ack_timeout_);
    std::vector<jetstream_delivery<T>> out;
    queued(max, out);
    if (!out.empty()) return out;
    if (const errc c = timeout.count() > 0 ? await_connected(until) : connected(); c != errc::ok) return c;
    errc e = request(max, false, until, out);
    if (!out.empty()) return out;
    if (e != errc::ok) return denied_or(e);
    if (timeout.count() <= 0) return denied_or(errc::timeout);
    e = request(1, true, until, out);
    if (!out.empty()) {
      queued(max, out);  // and whatever else is already here
      return out;
    }
    return denied_or(e == errc::ok ? errc::timeout : e);
  }

  /// Up to `max` deliveries the server has right now: what earlier requests
  /// left queued, else one "no wait" round trip (allowed up to
  /// `reply_wait`). `timeout` when there are none; `busy` / `closed` /
  /// `permission_denied` as `fetch`. Blocks for the round trip; allocates.
  [[nodiscard]] result<std::vector<jetstream_delivery<T>>> fetch_available(
      int max, std::chrono::milliseconds reply_wait = std::chrono::milliseconds(1000)) {
    if (max < 1) return errc::invalid_argument;
    std::vector<jetstream_delivery<T>> out;
    queued(max, out);
    if (!out.empty()) return out;
    if (const errc c = connected(); c != errc::ok) return c;
    const std::uint64_t mark = conn_->permission_violations();
    const errc e = request(max, false, std::chrono::steady_clock::now() + reply_wait, out);
    if (!out.empty()) return out;
    if (e == errc::timeout && denied_since(mark)) return errc::permission_denied;
    return e == errc::ok ? errc::timeout : e;
  }

  /// The reply-inbox subscription. Owned by this source.
  [[nodiscard]] natsSubscription* native() const noexcept { return sub_.get(); }

  /// How many times `fetch` has checked the connection again while waiting
  /// for a reconnect (one per backoff step), since construction. Never
  /// blocks. Not thread-safe: call it on the thread that fetches.
  [[nodiscard]] std::uint64_t reconnect_polls() const noexcept { return reconnect_polls_; }

 private:
  // The fields of an existing durable's configuration that differ from the
  // options ("" when none), as "field server-value (options: value)".
  static std::string config_mismatch(const jsConsumerConfig& cfg, const jetstream_consumer_options& co) {
    std::string out;
    auto differs = [&out](const char* field, const std::string& server, const std::string& ours) {
      if (!out.empty()) out += ", ";
      out += std::string(field) + " " + server + " (options: " + ours + ")";
    };
    if (cfg.DeliverSubject != nullptr && *cfg.DeliverSubject != '\0')
      differs("deliver_subject", cfg.DeliverSubject, "none: a pull consumer");
    if (cfg.AckPolicy != js_AckExplicit) differs("ack_policy", cfg.AckPolicy == js_AckNone ? "none" : "all", "explicit");
    const std::string filter = cfg.FilterSubject != nullptr ? cfg.FilterSubject : "";
    if (filter != co.filter_subject) differs("filter_subject", '"' + filter + '"', '"' + co.filter_subject + '"');
    const auto ack_wait = std::chrono::duration_cast<std::chrono::nanoseconds>(co.ack_wait).count();
    if (cfg.AckWait != ack_wait)
      differs("ack_wait", std::to_string(cfg.AckWait / 1000000) + "ms", std::to_string(co.ack_wait.count()) + "ms");
    const std::int64_t server_max = cfg.MaxDeliver < 1 ? -1 : cfg.MaxDeliver;
    const std::int64_t our_max = co.max_deliver < 1 ? -1 : co.max_deliver;
    if (server_max != our_max) differs("max_deliver", std::to_string(server_max), std::to_string(our_max));
    return out;
  }

  // True when the server refused, after `mark`, a subject this source uses:
  // the JetStream API (consumer info and create, pull requests) or a reply
  // inbox (its own, or libnats' request inbox). On a connection shared with
  // another denied JetStream user this may name that user's refusal.
  bool denied_since(std::uint64_t mark) const {
    auto ours = [](std::string_view s) { return s.rfind("$JS.API.", 0) == 0 || s.rfind("_INBOX.", 0) == 0; };
    return conn_->permission_denied_since(mark, "", ours);  // a publish or a subscription
  }

  // A JetStream status reply (404 no messages, 408 request expired, 409
  // conflict) carries a Status header and no ack subject.
  static bool is_status(natsMsg* m, std::string_view& code) {
    const char* reply = natsMsg_GetReply(m);
    if (reply != nullptr && *reply != '\0') return false;
    const char* v = nullptr;
    code = natsMsgHeader_Get(m, "Status", &v) == NATS_OK && v != nullptr ? std::string_view(v) : std::string_view{};
    return true;
  }

  void keep(natsMsg* m, std::vector<jetstream_delivery<T>>& out) {
    out.emplace_back(nats_msg_ptr(m), nc_, ack_timeout_);
  }

  // Takes what is already queued (deliveries of requests that ended before
  // their messages arrived), dropping stale status replies. Never blocks.
  void queued(int max, std::vector<jetstream_delivery<T>>& out) {
    while (static_cast<int>(out.size()) < max) {
      natsMsg* m = nullptr;
      if (natsSubscription_NextMsg(&m, sub_.get(), 0) != NATS_OK) return;
      std::string_view code;
      if (is_status(m, code)) natsMsg_Destroy(m);
      else keep(m, out);
    }
  }

  errc connected() const noexcept {
    switch (natsConnection_Status(nc_)) {
      case NATS_CONN_STATUS_CONNECTED: return errc::ok;
      case NATS_CONN_STATUS_CLOSED: return errc::closed;
      default: return errc::busy;  // reconnecting: a request would only be buffered
    }
  }

  // Waits until the connection is connected (`ok`), closed (`closed`) or
  // `until` passes (`timeout`), checking its status after sleeps of 1 ms
  // doubling to 32 ms (never past `until`). Blocks; never allocates.
  errc await_connected(std::chrono::steady_clock::time_point until) noexcept {
    auto step = std::chrono::milliseconds(1);
    for (;;) {
      const errc c = connected();
      if (c != errc::busy) return c;
      const auto now = std::chrono::steady_clock::now();
      if (now >= until) return errc::timeout;
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(step, until - now));
      step = std::min(step * 2, std::chrono::milliseconds(32));
      ++reconnect_polls_;
    }
  }

  // One pull request for `batch`: "no wait" (the server answers at once
  // with what it has), or `waiting` until `until` (the server expires it a
  // little earlier, so its expiry notice normally arrives in time). Reads
  // until the batch is complete, the request's own status reply ends it, or
  // `until` passes (`timeout`; what arrives later stays queued for the
  // next fetch). Returns ok, timeout or an error.
  errc request(int batch, bool waiting, std::chrono::steady_clock::time_point until,
               std::vector<jetstream_delivery<T>>& out) {
    const std::string token = std::to_string(++requests_);
    const std::string reply = inbox_ + token;
    std::string body = "{\"batch\":" + std::to_string(batch);
    if (!waiting) {
      body += ",\"no_wait\":true}";
    } else {
      auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (wait.count() <= 0) return errc::timeout;
      if (wait.count() >= 20) wait -= std::chrono::milliseconds(10);
      body += ",\"expires\":" + std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count()) +
              "}";
    }
    natsStatus s = natsConnection_PublishRequest(nc_, next_subject_.c_str(), reply.c_str(), body.data(),
                                                 static_cast<int>(body.size()));
    if (s != NATS_OK) return detail::nats_errc(s);
    const std::size_t wanted = out.size() + static_cast<std::size_t>(batch);
    while (out.size() < wanted) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return errc::timeout;
      natsMsg* m = nullptr;
      s = natsSubscription_NextMsg(&m, sub_.get(), left.count());
      if (s == NATS_TIMEOUT) return errc::timeout;
      if (s != NATS_OK) return detail::nats_errc(s);
      std::string_view code;
      if (!is_status(m, code)) {
        keep(m, out);
        continue;
      }
      const char* subject = natsMsg_GetSubject(m);
      const bool ours = subject != nullptr && reply == subject;
      const bool conflict = code == "409";
      natsMsg_Destroy(m);
      if (!ours) continue;                 // a late status of an earlier request
      if (conflict) return errc::busy;     // e.g. too many waiting requests, consumer deleted
      return errc::ok;                     // 404 / 408: this request is over
    }
    return errc::ok;
  }

  natsConnection* nc_;
  nats_connection* conn_;  // for its permission violations; outlives this source
  std::chrono::milliseconds ack_timeout_;
  std::string next_subject_;
  std::string inbox_;            // "<inbox>." ; requests reply to inbox_ + token
  std::uint64_t requests_ = 0;   // tokens; one thread at a time
  std::uint64_t reconnect_polls_ = 0;  // connection re-checks while a fetch awaited a reconnect; fetching thread only
  std::unique_ptr<natsSubscription, detail::nats_sub_deleter> sub_;
};

POSTBOX_END_NAMESPACE
