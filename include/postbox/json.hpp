// SPDX-License-Identifier: MIT
// JSON codec for envelopes (nlohmann/json): encode, and a decode that never crashes and names the bad field.
// Field names, limits and the error model: docs/design/envelope.md
#pragma once

#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/json/scan.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

POSTBOX_BEGIN_NAMESPACE
namespace json {

/// Limits and checks applied by `decode`. A plain value.
struct decode_options {
  /// Inputs longer than this are rejected with `too_large` before parsing.
  std::size_t max_bytes = std::size_t{4} << 20;
  /// Containers nested deeper than this (the envelope object is depth 1) are
  /// rejected with `too_deep` before parsing: nlohmann's parser and
  /// destructor would otherwise recurse on hostile input.
  std::size_t max_depth = 64;
  /// When `message_traits<T>` names a type, `decode<T>` requires the
  /// envelope's `type` to match (`unknown_type`) and its `schema_version` to
  /// equal the traits' version (`unsupported_version`).
  bool check_type = true;
};

/// Why a decode failed: the code, the field it concerns (dotted path, e.g.
/// "headers.x", or empty for the whole document) and a human-readable text.
struct decode_error {
  errc code = errc::ok;
  std::string field;
  std::string message;
};

/// The envelope with its payload left as JSON: what `decode_raw` yields,
/// and what a failed typed decode keeps so the message can be dead-lettered.
using raw_envelope = envelope<nlohmann::json>;

/// Either a decoded `envelope<T>` or a `decode_error`. When the envelope
/// itself was well-formed but its payload could not become a `T` (type or
/// version mismatch, payload conversion failure), `raw()` also holds the
/// envelope with its JSON payload, so nothing is lost: dead-letter it with
/// `error()` as the reason. Copyable (the raw envelope is shared, immutable).
/// A plain value: not thread-safe.
template <class T>
class [[nodiscard]] decode_result {
 public:
  using value_type = envelope<T>;

  /// A success.
  decode_result(envelope<T> value) : state_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  /// A failure; `raw` is the well-formed envelope when there is one.
  decode_result(decode_error error, std::shared_ptr<const raw_envelope> raw = nullptr)  // NOLINT
      : state_(std::move(error)), raw_(std::move(raw)) {}

  /// True when an envelope is present. Never allocates.
  [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }
  /// Same as `has_value()`.
  explicit operator bool() const noexcept { return has_value(); }
  /// `errc::ok` on success, else the error's code.
  [[nodiscard]] errc status() const noexcept { return has_value() ? errc::ok : std::get<1>(state_).code; }

  /// The envelope; precondition: `has_value()`.
  [[nodiscard]] envelope<T>& operator*() & noexcept { return *std::get_if<0>(&state_); }
  [[nodiscard]] const envelope<T>& operator*() const& noexcept { return *std::get_if<0>(&state_); }
  [[nodiscard]] envelope<T>&& operator*() && noexcept { return std::move(*std::get_if<0>(&state_)); }
  [[nodiscard]] envelope<T>* operator->() noexcept { return std::get_if<0>(&state_); }
  [[nodiscard]] const envelope<T>* operator->() const noexcept { return std::get_if<0>(&state_); }

  /// The envelope; throws `postbox::error` (with the decode error's code) if
  /// there is none.
  [[nodiscard]] envelope<T>& value() & {
    check();
    return **this;
  }
  [[nodiscard]] envelope<T>&& value() && {
    check();
    return std::move(**this);
  }

  /// The error; precondition: `!has_value()`.
  [[nodiscard]] const decode_error& error() const noexcept { return *std::get_if<1>(&state_); }
  /// The envelope with its JSON payload, when the failure came after the
  /// envelope itself decoded; else null.
  [[nodiscard]] const raw_envelope* raw() const noexcept { return raw_.get(); }
  /// Shared ownership of `raw()`, to keep it past this result.
  [[nodiscard]] std::shared_ptr<const raw_envelope> shared_raw() const noexcept { return raw_; }

 private:
  void check() const {
    if (!has_value()) {
      const auto& e = error();
      POSTBOX_THROW(postbox::error(e.code, "postbox::json::decode: " + std::string(to_string(e.code)) +
                                               (e.field.empty() ? "" : " at '" + e.field + "'") + ": " + e.message));
    }
  }

  std::variant<envelope<T>, decode_error> state_;
  std::shared_ptr<const raw_envelope> raw_;
};

namespace detail {

inline void put_digits(char*& out, long long value, int width) noexcept {
  for (int i = width - 1; i >= 0; --i) {
    out[i] = static_cast<char>('0' + value % 10);
    value /= 10;
  }
  out += width;
}

/// RFC 3339 UTC text with nanoseconds: "2026-11-22T09:30:00.123456789Z".
/// Allocates the string. Thread-safe.
[[nodiscard]] inline std::string format_time(time_point t) {
  using namespace std::chrono;
  const auto day = floor<days>(t);
  const year_month_day ymd{day};
  const auto in_day = duration_cast<nanoseconds>(t - day).count();
  char buf[32];
  char* out = buf;
  put_digits(out, static_cast<int>(ymd.year()), 4);
  *out++ = '-';
  put_digits(out, static_cast<unsigned>(ymd.month()), 2);
  *out++ = '-';
  put_digits(out, static_cast<unsigned>(ymd.day()), 2);
  *out++ = 'T';
  const long long secs = in_day / 1'000'000'000;
  put_digits(out, secs / 3600, 2);
  *out++ = ':';
  put_digits(out, secs / 60 % 60, 2);
  *out++ = ':';
  put_digits(out, secs % 60, 2);
  *out++ = '.';
  put_digits(out, in_day % 1'000'000'000, 9);
  *out++ = 'Z';
  return std::string(buf, out);
}

/// Parses RFC 3339 date-time (`T`/`t`, fraction of any length, `Z`/`z` or a
/// numeric offset) into a UTC time point; empty when malformed or outside
/// the years 1678..2261 that nanosecond time points hold. Never throws.
[[nodiscard]] inline std::optional<time_point> parse_time(std::string_view s) noexcept {
  using namespace std::chrono;
  std::size_t pos = 0;
  auto number = [&](std::size_t digits, int& value) {
    if (pos + digits > s.size()) return false;
    value = 0;
    for (std::size_t i = 0; i < digits; ++i) {
      const char c = s[pos + i];
      if (c < '0' || c > '9') return false;
      value = value * 10 + (c - '0');
    }
    pos += digits;
    return true;
  };
  auto expect = [&](char a, char b = '\0') {
    if (pos < s.size() && (s[pos] == a || (b != '\0' && s[pos] == b))) {
      ++pos;
      return true;
    }
    return false;
  };
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0;
  if (!(number(4, y) && expect('-') && number(2, mo) && expect('-') && number(2, d) && expect('T', 't') &&
        number(2, h) && expect(':') && number(2, mi) && expect(':') && number(2, sec))) {
    return std::nullopt;
  }
  if (y < 1678 || y > 2261 || h > 23 || mi > 59 || sec > 59) return std::nullopt;
  const year_month_day ymd{year{y}, month{static_cast<unsigned>(mo)}, day{static_cast<unsigned>(d)}};
  if (!ymd.ok()) return std::nullopt;
  long long frac = 0;
  if (expect('.')) {
    std::size_t digits = 0;
    while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
      if (digits < 9) frac = frac * 10 + (s[pos] - '0');
      ++digits;
      ++pos;
    }
    if (digits == 0) return std::nullopt;
    for (std::size_t i = digits; i < 9; ++i) frac *= 10;
  }
  long long offset_minutes = 0;
  if (expect('Z', 'z')) {
  } else if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) {
    const bool negative = s[pos] == '-';
    ++pos;
    int oh = 0, om = 0;
    if (!(number(2, oh) && expect(':') && number(2, om)) || oh > 23 || om > 59) return std::nullopt;
    offset_minutes = (negative ? -1 : 1) * (oh * 60 + om);
  } else {
    return std::nullopt;
  }
  if (pos != s.size()) return std::nullopt;
  const auto local = sys_days(ymd).time_since_epoch() + hours(h) + minutes(mi) + seconds(sec);
  return time_point(duration_cast<nanoseconds>(local - minutes(offset_minutes)) + nanoseconds(frac));
}

[[nodiscard]] inline decode_error make_error(errc code, std::string field, std::string message) {
  return decode_error{code, std::move(field), std::move(message)};
}

using object_t = nlohmann::json::object_t;

/// Reads an optional string member; absent and null give "". Returns false
/// (and fills `err`) on a wrong type.
inline bool read_string(object_t& obj, const char* name, std::string& out, decode_error& err) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->second.is_null()) return true;
  if (auto* s = it->second.get_ptr<std::string*>()) {
    out = std::move(*s);
    return true;
  }
  err = make_error(errc::bad_type, name, "expected a string");
  return false;
}

inline bool read_id(object_t& obj, const char* name, bool required, message_id& out, decode_error& err) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->second.is_null()) {
    if (required) err = make_error(errc::missing_field, name, "required field is absent");
    return !required;
  }
  const auto* s = it->second.get_ptr<const std::string*>();
  if (s == nullptr) {
    err = make_error(errc::bad_type, name, "expected a UUID string");
    return false;
  }
  const auto id = message_id::parse(*s);
  if (!id) {
    err = make_error(errc::bad_type, name, "not a canonical UUID");
    return false;
  }
  out = *id;
  return true;
}

inline bool read_u32(object_t& obj, const char* name, std::uint32_t& out, decode_error& err) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->second.is_null()) return true;
  const auto& v = it->second;
  if (v.is_number_unsigned()) {
    const auto n = v.get<std::uint64_t>();
    if (n <= std::numeric_limits<std::uint32_t>::max()) {
      out = static_cast<std::uint32_t>(n);
      return true;
    }
  } else if (v.is_number_integer()) {
    const auto n = v.get<std::int64_t>();
    if (n >= 0 && n <= std::numeric_limits<std::uint32_t>::max()) {
      out = static_cast<std::uint32_t>(n);
      return true;
    }
  }
  err = make_error(errc::bad_type, name, "expected an unsigned 32-bit integer");
  return false;
}

inline bool read_time(object_t& obj, const char* name, bool required, std::optional<time_point>& out,
                      decode_error& err) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->second.is_null()) {
    if (required) err = make_error(errc::missing_field, name, "required field is absent");
    return !required;
  }
  const auto* s = it->second.get_ptr<const std::string*>();
  const auto t = s ? parse_time(*s) : std::nullopt;
  if (!t) {
    err = make_error(errc::bad_type, name, "expected an RFC 3339 date-time string");
    return false;
  }
  out = t;
  return true;
}

/// Checks limits, pre-scans, parses, and reads every envelope field into a
/// raw envelope (payload kept as JSON). Never throws.
[[nodiscard]] inline std::variant<raw_envelope, decode_error> decode_raw(std::string_view text,
                                                                        const decode_options& opt) noexcept {
  POSTBOX_TRY {
    if (text.size() > opt.max_bytes) {
      return make_error(errc::too_large, "", "input is " + std::to_string(text.size()) + " bytes, limit " +
                                                 std::to_string(opt.max_bytes));
    }
    const auto scan = ::postbox::detail::scan_json(text, opt.max_depth);
    if (scan.code == errc::too_deep) {
      return make_error(errc::too_deep, "", "nesting deeper than " + std::to_string(opt.max_depth) +
                                                " at byte " + std::to_string(scan.offset));
    }
    if (scan.code == errc::invalid_utf8) {
      return make_error(errc::invalid_utf8, "", "invalid UTF-8 at byte " + std::to_string(scan.offset));
    }
    nlohmann::json doc;
    POSTBOX_TRY { doc = nlohmann::json::parse(text.begin(), text.end()); }
    POSTBOX_CATCH_ALL {
      // The parser's exception text says where and why.
      std::string why = "malformed JSON";
#if POSTBOX_HAS_EXCEPTIONS
      try {
        throw;
      } catch (const std::exception& e) {
        why = e.what();
      } catch (...) {
      }
#endif
      return make_error(errc::parse_error, "", std::move(why));
    }
    auto* obj = doc.get_ptr<object_t*>();
    if (obj == nullptr) return make_error(errc::bad_type, "", "an envelope is a JSON object");
    if (obj->size() != scan.top_level_colons) {
      return make_error(errc::parse_error, "", "duplicate key in the envelope object");
    }

    raw_envelope env;
    decode_error err;
    if (!read_id(*obj, "id", true, env.id, err)) return err;
    {
      const auto it = obj->find("type");
      if (it == obj->end() || it->second.is_null()) return make_error(errc::missing_field, "type", "required field is absent");
      if (!read_string(*obj, "type", env.type, err)) return err;
      if (env.type.empty()) return make_error(errc::bad_type, "type", "must not be empty");
    }
    if (!read_u32(*obj, "schema_version", env.schema_version, err)) return err;
    {
      std::string kind;
      if (!read_string(*obj, "kind", kind, err)) return err;
      if (!kind.empty()) {
        const auto k = parse_message_kind(kind);
        if (!k) return make_error(errc::bad_type, "kind", "expected command, event, query or reply");
        env.kind = *k;
      }
    }
    {
      std::optional<time_point> t;
      if (!read_time(*obj, "occurred_at", true, t, err)) return err;
      env.occurred_at = *t;
    }
    if (!read_id(*obj, "correlation_id", false, env.correlation_id, err)) return err;
    if (!read_id(*obj, "causation_id", false, env.causation_id, err)) return err;
    if (!read_string(*obj, "producer", env.producer, err)) return err;
    if (!read_string(*obj, "partition_key", env.partition_key, err)) return err;
    if (!read_string(*obj, "tenant", env.tenant, err)) return err;
    if (!read_string(*obj, "traceparent", env.trace.traceparent, err)) return err;
    if (!read_string(*obj, "tracestate", env.trace.tracestate, err)) return err;
    if (!env.trace.traceparent.empty() && !trace_context::is_valid_traceparent(env.trace.traceparent)) {
      return make_error(errc::bad_type, "traceparent", "not a valid W3C traceparent");
    }
    if (!env.trace.tracestate.empty() &&
        (env.trace.traceparent.empty() || !trace_context::is_valid_tracestate(env.trace.tracestate))) {
      return make_error(errc::bad_type, "tracestate", "not a valid W3C tracestate (or no traceparent)");
    }
    if (!read_time(*obj, "deadline", false, env.deadline, err)) return err;
    if (!read_u32(*obj, "attempt", env.attempt, err)) return err;
    if (const auto it = obj->find("headers"); it != obj->end() && !it->second.is_null()) {
      auto* headers = it->second.get_ptr<object_t*>();
      if (headers == nullptr) return make_error(errc::bad_type, "headers", "expected an object of strings");
      for (auto& [key, value] : *headers) {
        const auto* s = value.get_ptr<const std::string*>();
        if (s == nullptr) return make_error(errc::bad_type, "headers." + key, "expected a string");
        env.headers.set(key, *s);
      }
    }
    {
      const auto it = obj->find("payload");
      if (it == obj->end()) return make_error(errc::missing_field, "payload", "required field is absent");
      env.payload = std::move(it->second);
    }
    return env;
  }
  POSTBOX_CATCH_ALL {
    // Only allocation can fail above; report it rather than crash.
    return decode_error{errc::too_large, "", "out of memory while decoding"};
  }
}

template <class T>
envelope<T> rebind(raw_envelope&& raw, T&& payload) {
  return envelope<T>{.id = raw.id,
                     .type = std::move(raw.type),
                     .schema_version = raw.schema_version,
                     .kind = raw.kind,
                     .occurred_at = raw.occurred_at,
                     .correlation_id = raw.correlation_id,
                     .causation_id = raw.causation_id,
                     .producer = std::move(raw.producer),
                     .partition_key = std::move(raw.partition_key),
                     .tenant = std::move(raw.tenant),
                     .trace = std::move(raw.trace),
                     .deadline = raw.deadline,
                     .attempt = raw.attempt,
                     .headers = std::move(raw.headers),
                     .payload = std::move(payload)};
}

/// Turns a raw envelope into an `envelope<T>`: type/version checks per
/// `opt`, then nlohmann's `from_json` for the payload. On failure the raw
/// envelope travels with the error. Never throws.
template <class T>
[[nodiscard]] decode_result<T> finish(raw_envelope&& raw, const decode_options& opt) noexcept {
  POSTBOX_TRY {
    if constexpr (std::is_same_v<T, nlohmann::json>) {
      return decode_result<T>(std::move(raw));
    } else {
      constexpr std::string_view want = message_traits<T>::type_name();
      if (opt.check_type && !want.empty()) {
        if (raw.type != want) {
          auto msg = "expected type '" + std::string(want) + "', got '" + raw.type + "'";
          return decode_result<T>(make_error(errc::unknown_type, "type", std::move(msg)),
                                  std::make_shared<const raw_envelope>(std::move(raw)));
        }
        if (raw.schema_version != message_traits<T>::schema_version()) {
          auto msg = "expected schema version " + std::to_string(message_traits<T>::schema_version()) + ", got " +
                     std::to_string(raw.schema_version);
          return decode_result<T>(make_error(errc::unsupported_version, "schema_version", std::move(msg)),
                                  std::make_shared<const raw_envelope>(std::move(raw)));
        }
      }
      std::optional<T> payload;
      std::string why;
#if POSTBOX_HAS_EXCEPTIONS
      try {
        payload.emplace(raw.payload.template get<T>());
      } catch (const std::exception& e) {
        why = e.what();
      } catch (...) {
        why = "payload conversion threw";
      }
#else
      payload.emplace(raw.payload.template get<T>());
#endif
      if (!payload) {
        return decode_result<T>(make_error(errc::bad_type, "payload", std::move(why)),
                                std::make_shared<const raw_envelope>(std::move(raw)));
      }
      return decode_result<T>(rebind<T>(std::move(raw), std::move(*payload)));
    }
  }
  POSTBOX_CATCH_ALL { return decode_result<T>(decode_error{errc::too_large, "", "out of memory while decoding"}); }
}

}  // namespace detail

/// The envelope as a JSON value. Optional fields at their default (nil ids,
/// empty strings, no deadline, attempt 0, no headers) are omitted. The
/// payload goes through nlohmann's `to_json` for `T`; an exception from it
/// propagates. Allocates. Thread-safe for distinct envelopes.
template <class T>
[[nodiscard]] nlohmann::json to_value(const envelope<T>& env) {
  nlohmann::json j = nlohmann::json::object();
  auto& o = *j.get_ptr<detail::object_t*>();
  o.emplace("id", env.id.to_string());
  o.emplace("type", env.type);
  o.emplace("schema_version", env.schema_version);
  o.emplace("kind", std::string(to_string(env.kind)));
  o.emplace("occurred_at", detail::format_time(env.occurred_at));
  if (!env.correlation_id.is_nil()) o.emplace("correlation_id", env.correlation_id.to_string());
  if (!env.causation_id.is_nil()) o.emplace("causation_id", env.causation_id.to_string());
  if (!env.producer.empty()) o.emplace("producer", env.producer);
  if (!env.partition_key.empty()) o.emplace("partition_key", env.partition_key);
  if (!env.tenant.empty()) o.emplace("tenant", env.tenant);
  if (!env.trace.traceparent.empty()) o.emplace("traceparent", env.trace.traceparent);
  if (!env.trace.tracestate.empty()) o.emplace("tracestate", env.trace.tracestate);
  if (env.deadline) o.emplace("deadline", detail::format_time(*env.deadline));
  if (env.attempt != 0) o.emplace("attempt", env.attempt);
  if (!env.headers.empty()) {
    nlohmann::json h = nlohmann::json::object();
    for (const auto& [k, v] : env.headers) h.emplace(k, v);
    o.emplace("headers", std::move(h));
  }
  o.emplace("payload", nlohmann::json(env.payload));
  return j;
}

/// Compact JSON text of `env` (see `to_value`). Invalid UTF-8 in any string
/// (payload included) does not throw: each bad byte sequence is written as
/// U+FFFD (nlohmann's `error_handler_t::replace`), so the output is always
/// valid UTF-8 and a round trip may change such strings. Allocates.
/// Thread-safe for distinct envelopes.
template <class T>
[[nodiscard]] std::string encode(const envelope<T>& env) {
  return to_value(env).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// Decodes JSON text into an `envelope<T>`, or a `decode_error` naming the
/// field. Size and depth caps are checked by a non-recursive pre-scan before
/// any document is built; invalid UTF-8 anywhere is `invalid_utf8`.
/// Required fields: id, type, occurred_at, payload. Never throws, never
/// crashes on any input. Allocates. Thread-safe.
template <class T>
[[nodiscard]] decode_result<T> decode(std::string_view text, const decode_options& options = {}) noexcept {
  auto raw = detail::decode_raw(text, options);
  if (auto* err = std::get_if<decode_error>(&raw)) return decode_result<T>(std::move(*err));
  return detail::finish<T>(std::move(*std::get_if<raw_envelope>(&raw)), options);
}

/// Decodes the envelope and keeps the payload as JSON, whatever its type:
/// the form for routing, inspecting and dead-lettering. Never throws.
[[nodiscard]] inline decode_result<nlohmann::json> decode_raw(std::string_view text,
                                                              const decode_options& options = {}) noexcept {
  return decode<nlohmann::json>(text, options);
}

/// The JSON codec as one object, for components that take a codec
/// parameter (the outbox stores `encode(env)` and its relay adapters
/// `decode<T>`). Stateless; thread-safe; allocates per call.
struct codec {
  /// `json::encode(env)`.
  template <class T>
  [[nodiscard]] std::string encode(const envelope<T>& env) const {
    return json::encode(env);
  }
  /// `json::decode<T>(text)`; never throws.
  template <class T>
  [[nodiscard]] decode_result<T> decode(std::string_view text) const noexcept {
    return json::decode<T>(text);
  }
};

}  // namespace json
POSTBOX_END_NAMESPACE
