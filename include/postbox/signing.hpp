// SPDX-License-Identifier: MIT
// Envelope authentication: HMAC-SHA256 over a canonical form of the envelope, a signer, a key ring with rotation by key id, and consumer-source and publisher decorators.
#pragma once

// Design: docs/design/security.md ("Envelope authentication"), which also
// spells out the canonical form byte by byte.
//
// * A signer (key id + secret) writes two headers: `signature` (64 lower-case
//   hex digits of HMAC-SHA256 over the canonical form) and `signature-key-id`.
// * A verifier looks the key id up in a `key_ring` and recomputes the MAC;
//   the comparison takes constant time.
// * `verified_source` wraps any consumer source: an unsigned message, an
//   unknown key id or a MAC that does not match becomes a poison item with
//   reason `unauthenticated` (dead_letter_reasons::unauthenticated), which
//   the consumer dead-letters at once without running the handler; its
//   settle hook is kept, so a broker source terms it.
// * Rotation: add the new key to every verifier's ring, then sign with it;
//   remove the old key when no message signed with it can still arrive.

#include <postbox/config.hpp>
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/detail/sha256.hpp>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

namespace header_names {
/// HMAC-SHA256 of the envelope's canonical form: 64 lower-case hex digits.
inline constexpr std::string_view signature = "signature";
/// The id of the key that made `signature` (looked up in the verifier's key ring).
inline constexpr std::string_view signature_key_id = "signature-key-id";
/// Headers starting with this prefix (redrive bookkeeping, dead_letter.hpp)
/// are not covered by the signature: postbox adds them after signing.
inline constexpr std::string_view dead_letter_prefix = "dead-letter-";
}  // namespace header_names

/// The bytes of a payload that the signature covers. This default takes
/// payloads that are bytes already: anything convertible to
/// `std::string_view` (std::string, ...) and `std::vector` of `char`,
/// `unsigned char` or `std::byte`. For other payload types pass an encoder
/// that returns the bytes both sides agree on (over the NATS bridge: the
/// JSON body, `nlohmann::json(p).dump()`). Never allocates. Thread-safe.
struct payload_bytes {
  template <class T>
    requires std::convertible_to<const T&, std::string_view>
  [[nodiscard]] std::string_view operator()(const T& payload) const noexcept {
    return std::string_view(payload);
  }
  template <class B, class A>
    requires(std::same_as<B, char> || std::same_as<B, unsigned char> || std::same_as<B, std::byte>)
  [[nodiscard]] std::string_view operator()(const std::vector<B, A>& payload) const noexcept {
    return std::string_view(reinterpret_cast<const char*>(payload.data()), payload.size());
  }
};

/// An encoder of `T` payloads for signing: callable on `const T&`, giving
/// something convertible to `std::string_view` (a string by value is fine).
template <class E, class T>
concept payload_encoder = std::invocable<const E&, const T&> &&
                          std::convertible_to<std::invoke_result_t<const E&, const T&>, std::string_view>;

/// The outcome of verifying one envelope.
enum class verify_status : std::uint8_t {
  ok,               ///< signed by a key in the ring, nothing changed since
  unsigned_message, ///< no `signature` or no `signature-key-id` header
  unknown_key,      ///< the key id is not in the ring (never added, or removed)
  bad_signature,    ///< the MAC does not match: a field, header or payload byte changed, or another secret signed it
};

/// Stable name: "ok", "unsigned", "unknown_key", "bad_signature". Never allocates.
[[nodiscard]] constexpr std::string_view to_string(verify_status s) noexcept {
  switch (s) {
    case verify_status::ok: return "ok";
    case verify_status::unsigned_message: return "unsigned";
    case verify_status::unknown_key: return "unknown_key";
    case verify_status::bad_signature: return "bad_signature";
  }
  return "unknown";
}

/// Shortest secret a signer or key ring accepts, in bytes. HMAC-SHA256 keys
/// should carry 32 random bytes (RFC 2104 §3: at least the output length).
inline constexpr std::size_t min_secret_size = 16;

namespace detail {

// Writes one length-prefixed field: "<name>:<decimal length>:<bytes>\n".
template <class Sink>
void canonical_field(Sink& out, std::string_view name, std::string_view value) {
  char digits[24];
  std::size_t n = 0;
  std::size_t len = value.size();
  do {
    digits[n++] = static_cast<char>('0' + len % 10);
    len /= 10;
  } while (len != 0);
  std::reverse(digits, digits + n);
  out.update(name);
  out.update(":");
  out.update(std::string_view(digits, n));
  out.update(":");
  out.update(value);
  out.update("\n");
}

inline std::string signed_decimal(std::int64_t v) { return std::to_string(v); }

[[nodiscard]] inline bool signature_header(std::string_view name) noexcept {
  return name == header_names::signature || name == header_names::signature_key_id ||
         name.substr(0, header_names::dead_letter_prefix.size()) == header_names::dead_letter_prefix;
}

// Feeds the canonical form (docs/design/security.md) of `env` under `key_id`
// to `out`, which has `update(std::string_view)`.
template <class Sink, class T, class Encoder>
void write_canonical(Sink& out, const envelope<T>& env, std::string_view key_id, const Encoder& encode) {
  out.update("postbox-envelope-v1\n");
  canonical_field(out, "key-id", key_id);
  char id[36];
  env.id.write_to(id);
  canonical_field(out, "id", std::string_view(id, 36));
  canonical_field(out, "type", env.type);
  canonical_field(out, "schema-version", std::to_string(env.schema_version));
  canonical_field(out, "kind", to_string(env.kind));
  canonical_field(out, "occurred-at", signed_decimal(env.occurred_at.time_since_epoch().count()));
  env.correlation_id.write_to(id);
  canonical_field(out, "correlation-id", std::string_view(id, 36));
  env.causation_id.write_to(id);
  canonical_field(out, "causation-id", std::string_view(id, 36));
  canonical_field(out, "producer", env.producer);
  canonical_field(out, "partition-key", env.partition_key);
  canonical_field(out, "tenant", env.tenant);
  canonical_field(out, "deadline",
                  env.deadline ? signed_decimal(env.deadline->time_since_epoch().count()) : std::string());
  std::size_t covered = 0;
  for (const auto& [k, v] : env.headers)
    if (!signature_header(k)) ++covered;
  canonical_field(out, "headers", std::to_string(covered));
  for (const auto& [k, v] : env.headers) {  // header_map iterates in byte-wise key order
    if (signature_header(k)) continue;
    canonical_field(out, "header-name", k);
    canonical_field(out, "header-value", v);
  }
  decltype(auto) bytes = std::invoke(encode, env.payload);
  canonical_field(out, "payload", std::string_view(bytes));
}

struct string_sink {
  std::string text;
  void update(std::string_view s) { text.append(s); }
};

template <class T, class Encoder>
[[nodiscard]] sha256_digest envelope_mac(const envelope<T>& env, std::string_view key_id, std::string_view secret,
                                         const Encoder& encode) {
  hmac_sha256 mac(secret);
  write_canonical(mac, env, key_id, encode);
  return mac.finish();
}

inline void wipe(std::string& s) noexcept {
  volatile char* p = s.data();
  for (std::size_t i = 0; i < s.size(); ++i) p[i] = 0;
  s.clear();
}

}  // namespace detail

/// The canonical form of `env` that a signature under `key_id` covers (see
/// docs/design/security.md): for inspection, tests and other
/// implementations. Allocates. Thread-safe.
template <class T, class Encoder = payload_bytes>
  requires payload_encoder<Encoder, T>
[[nodiscard]] std::string canonical_form(const envelope<T>& env, std::string_view key_id, const Encoder& encode = {}) {
  detail::string_sink s;
  detail::write_canonical(s, env, key_id, encode);
  return std::move(s.text);
}

namespace detail {
[[nodiscard]] inline bool valid_key_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > 128) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u < 0x7f;
  });
}
inline void check_key(std::string_view where, std::string_view id, std::string_view secret) {
  if (!valid_key_id(id))
    POSTBOX_THROW(error(errc::invalid_argument,
                        std::string(where) + ": a key id is 1 to 128 printable ASCII characters without spaces"));
  if (secret.size() < min_secret_size)
    POSTBOX_THROW(error(errc::invalid_argument, std::string(where) + ": the secret of key '" + std::string(id) +
                                                    "' is shorter than 16 bytes"));
}
}  // namespace detail

/// Signs envelopes with one key: sets `signature` and `signature-key-id`,
/// replacing an earlier signature. Keep one signer per producer and swap it
/// to rotate. The secret is held in memory only (zeroed on destruction) and
/// never appears in an error text. `sign` is const and thread-safe.
template <class Encoder = payload_bytes>
class envelope_signer {
 public:
  /// A signer for key `key_id` with `secret` (at least `min_secret_size`
  /// bytes; 32 random bytes recommended). Throws postbox::error
  /// (invalid_argument) for an empty or non-printable key id or a short
  /// secret; the text names the key id, never the secret. Allocates.
  envelope_signer(std::string key_id, std::string secret, Encoder encode = {})
      : key_id_(std::move(key_id)), secret_(std::move(secret)), encode_(std::move(encode)) {
    detail::check_key("envelope_signer", key_id_, secret_);
  }
  envelope_signer(const envelope_signer&) = default;
  envelope_signer(envelope_signer&&) noexcept = default;
  envelope_signer& operator=(const envelope_signer&) = default;
  envelope_signer& operator=(envelope_signer&&) noexcept = default;
  ~envelope_signer() { detail::wipe(secret_); }

  /// Signs `env` in place (every covered field as it is now; change nothing
  /// covered afterwards). Allocates (two headers). Thread-safe.
  template <class T>
    requires payload_encoder<Encoder, T>
  void sign(envelope<T>& env) const {
    env.headers.erase(header_names::signature);
    env.headers.set(header_names::signature_key_id, key_id_);
    env.headers.set(header_names::signature, detail::to_hex(detail::envelope_mac(env, key_id_, secret_, encode_)));
  }

  /// A signed copy of `env`. Allocates. Thread-safe.
  template <class T>
    requires payload_encoder<Encoder, T>
  [[nodiscard]] envelope<T> sign_copy(const envelope<T>& env) const {
    envelope<T> out = env;
    sign(out);
    return out;
  }

  /// The key id this signer writes. Never allocates.
  [[nodiscard]] std::string_view key_id() const noexcept { return key_id_; }

 private:
  std::string key_id_;
  std::string secret_;
  Encoder encode_;
};

/// The keys a verifier accepts, by key id. Rotation: `add` the new key
/// before any producer signs with it, `remove` the old one once nothing
/// signed with it can still arrive. Thread-safe: lookups take a shared lock,
/// `add` and `remove` an exclusive one (so a ring may change while
/// consumers verify). Secrets are zeroed when removed or destroyed.
class key_ring {
 public:
  key_ring() = default;
  key_ring(const key_ring&) = delete;
  key_ring& operator=(const key_ring&) = delete;
  ~key_ring() {
    for (auto& [id, secret] : keys_) detail::wipe(secret);
  }

  /// Adds key `id` or replaces its secret. Throws postbox::error
  /// (invalid_argument) as `envelope_signer` does. Allocates. Thread-safe.
  void add(std::string id, std::string secret) {
    detail::check_key("key_ring", id, secret);
    std::unique_lock lock(m_);
    auto [it, inserted] = keys_.try_emplace(std::move(id));
    if (!inserted) detail::wipe(it->second);
    it->second = std::move(secret);
  }

  /// Removes key `id`; returns whether it was there. Messages signed with it
  /// then verify as `unknown_key`. Thread-safe.
  bool remove(std::string_view id) {
    std::unique_lock lock(m_);
    auto it = keys_.find(id);
    if (it == keys_.end()) return false;
    detail::wipe(it->second);
    keys_.erase(it);
    return true;
  }

  /// Whether key `id` is in the ring. Thread-safe.
  [[nodiscard]] bool contains(std::string_view id) const {
    std::shared_lock lock(m_);
    return keys_.find(id) != keys_.end();
  }

  /// The key ids in the ring, sorted (never the secrets). Allocates. Thread-safe.
  [[nodiscard]] std::vector<std::string> key_ids() const {
    std::shared_lock lock(m_);
    std::vector<std::string> out;
    out.reserve(keys_.size());
    for (const auto& [id, secret] : keys_) out.push_back(id);
    return out;
  }

  /// Verifies `env`'s signature against the key its `signature-key-id`
  /// names. Never throws except from the encoder or on allocation failure.
  /// Allocates (the canonical form's small numbers). Thread-safe.
  template <class T, class Encoder = payload_bytes>
    requires payload_encoder<Encoder, T>
  [[nodiscard]] verify_status verify(const envelope<T>& env, const Encoder& encode = {}) const {
    const auto sig = env.headers.get(header_names::signature);
    const auto kid = env.headers.get(header_names::signature_key_id);
    if (!sig || !kid) return verify_status::unsigned_message;
    std::string expected;
    {
      std::shared_lock lock(m_);
      auto it = keys_.find(*kid);
      if (it == keys_.end()) return verify_status::unknown_key;
      expected = detail::to_hex(detail::envelope_mac(env, *kid, it->second, encode));
    }
    return detail::constant_time_equal(expected, *sig) ? verify_status::ok : verify_status::bad_signature;
  }

 private:
  mutable std::shared_mutex m_;                      // guards keys_
  std::map<std::string, std::string, std::less<>> keys_;  // key id -> secret
};

/// Counters of a `verified_source` (snapshot).
struct verified_source_stats {
  std::uint64_t verified = 0;        ///< envelopes whose signature matched
  std::uint64_t unsigned_messages = 0;  ///< refused: no signature
  std::uint64_t unknown_key = 0;     ///< refused: key id not in the ring
  std::uint64_t bad_signature = 0;   ///< refused: MAC mismatch (tampered, or another secret)
  std::uint64_t passed_poison = 0;   ///< undecodable items of the inner source, passed on unchanged
};

namespace detail {
// Statistics only: each member is incremented (relaxed) by the receiving
// thread and read (relaxed) by stats() on any thread; no data is published
// through them.
struct verified_source_counters {
  std::atomic<std::uint64_t> verified{0}, unsigned_messages{0}, unknown_key{0}, bad_signature{0}, passed_poison{0};
  [[nodiscard]] verified_source_stats snapshot() const noexcept {
    // relaxed: statistics (see the struct comment).
    return {verified.load(std::memory_order_relaxed), unsigned_messages.load(std::memory_order_relaxed),
            unknown_key.load(std::memory_order_relaxed), bad_signature.load(std::memory_order_relaxed),
            passed_poison.load(std::memory_order_relaxed)};
  }
};
}  // namespace detail

/// A consumer source that admits only envelopes signed by a key of `keys`:
/// it wraps any `consumer_source` (channel, topic, stream group, raw bytes,
/// `jetstream_consumer_source`) and turns each refused envelope into a
/// poison item with reason `unauthenticated`, the refusal in `error` and the
/// envelope's canonical form (under its claimed key id) in `raw`, keeping the
/// inner settle hook. The consumer dead-letters it without running the
/// handler (a broker source then terms it). Poison from the inner source
/// passes unchanged. `redelivers`, `name()` and `backlog()` are the inner
/// source's. Verification runs on the receiving thread; `keys` must outlive
/// the source and may change meanwhile (rotation).
template <consumer_source S, class Encoder = payload_bytes>
  requires payload_encoder<Encoder, typename S::payload_type>
class verified_source {
 public:
  using payload_type = typename S::payload_type;
  static constexpr bool redelivers = S::redelivers;

  /// Wraps `inner`, verifying with `keys` and `encode`. Allocates.
  verified_source(S inner, const key_ring& keys, Encoder encode = {})
      : inner_(std::move(inner)), keys_(&keys), encode_(std::move(encode)),
        counters_(std::make_shared<detail::verified_source_counters>()) {}

  /// The inner source's next item, verified. Blocks as the inner `receive`
  /// does; allocates. One thread at a time.
  [[nodiscard]] receive_result<inbound<payload_type>> receive(duration wait) {
    auto r = inner_.receive(wait);
    if (!r.has_value()) return r;
    inbound<payload_type>& in = *r;
    auto& c = *counters_;
    if (!in.message) {
      c.passed_poison.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
      return r;
    }
    const envelope<payload_type>& env = *in.message;
    const verify_status v = keys_->verify(env, encode_);
    if (v == verify_status::ok) {
      c.verified.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
      return r;
    }
    const std::string_view kid = env.headers.get(header_names::signature_key_id).value_or(std::string_view{});
    poison_input p;
    p.reason = std::string(dead_letter_reasons::unauthenticated);
    switch (v) {
      case verify_status::unsigned_message:
        c.unsigned_messages.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
        p.error = "message " + env.id.to_string() + " is not signed";
        break;
      case verify_status::unknown_key:
        c.unknown_key.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
        p.error = "message " + env.id.to_string() + " is signed with unknown key id '" + std::string(kid) + "'";
        break;
      default:
        c.bad_signature.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
        p.error = "message " + env.id.to_string() + ": signature does not match (key id '" + std::string(kid) +
                  "'): changed after signing, or signed with another secret";
        break;
    }
    p.raw = canonical_form(env, kid, encode_);
    return inbound<payload_type>::malformed(std::move(p), std::move(in.settle));
  }

  /// The inner source's name. Never blocks.
  [[nodiscard]] std::string_view name() const noexcept { return inner_.name(); }

  /// The inner source's backlog (when it has one). Thread-safe if the inner one is.
  [[nodiscard]] std::uint64_t backlog() const noexcept
    requires requires(const S& s) { s.backlog(); }
  {
    return inner_.backlog();
  }

  /// Counters snapshot. Never blocks. Thread-safe.
  [[nodiscard]] verified_source_stats stats() const noexcept { return counters_->snapshot(); }

  /// A function that reads the counters, valid after this source was moved
  /// into a consumer. Thread-safe.
  [[nodiscard]] std::function<verified_source_stats()> monitor() const {
    return [c = std::shared_ptr<const detail::verified_source_counters>(counters_)] { return c->snapshot(); };
  }

  /// The wrapped source (its own stats and monitors).
  [[nodiscard]] S& inner() noexcept { return inner_; }
  [[nodiscard]] const S& inner() const noexcept { return inner_; }

 private:
  S inner_;
  const key_ring* keys_;
  Encoder encode_;
  std::shared_ptr<detail::verified_source_counters> counters_;
};

/// A publisher decorator: `publish(env, args...)` signs a copy of `env` and
/// passes it to the inner publisher's `publish(copy, args...)` (e.g.
/// `jetstream_publisher`, whose optional second argument is the subject),
/// returning what it returns. The inner publisher must outlive this one.
/// Thread-safe when the inner `publish` is. Allocates (the copy).
template <class Publisher, class Encoder = payload_bytes>
class signing_publisher {
 public:
  signing_publisher(Publisher& inner, envelope_signer<Encoder> signer)
      : inner_(&inner), signer_(std::move(signer)) {}

  /// Signs a copy of `env` and publishes it. Blocks as the inner publisher does.
  template <class T, class... Args>
  decltype(auto) publish(const envelope<T>& env, Args&&... args) {
    return inner_->publish(signer_.sign_copy(env), std::forward<Args>(args)...);
  }

  /// The signer (its key id). Never blocks.
  [[nodiscard]] const envelope_signer<Encoder>& signer() const noexcept { return signer_; }

 private:
  Publisher* inner_;
  envelope_signer<Encoder> signer_;
};

POSTBOX_END_NAMESPACE
