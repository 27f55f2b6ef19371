// SPDX-License-Identifier: MIT
// Internal to postbox/nats_outbox.hpp: one non-allocating pass over an envelope's JSON text (as json::encode writes it) that views each field in place instead of building a document.
#pragma once

// The pipelined JetStream relay builds each NATS message from the stored
// bytes with this view: the header values are the envelope's own field
// texts and the NATS body is the payload's text as stored. Design notes:
// docs/design/nats.md ("Outbox destination").
//
// The view is deliberately narrower than `json::decode`: it accepts only
// texts for which the decode is known to succeed with the same values, and
// refuses (returns false) everything else, including texts the decode would
// accept but the view does not handle (a string field with an escape, a null
// member, a member the envelope does not define, a number near the range of
// double). A caller falls back to the full decode for a refused text, so the
// decode's result (or its exact error) still decides.

#include <postbox/envelope.hpp>
#include <postbox/json.hpp>
#include <postbox/json/scan.hpp>

#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// The fields of one envelope viewed in its JSON text (views into that
/// text: valid while it lives). A plain value.
struct json_envelope_view {
  /// User headers held at most; an envelope with more is refused.
  static constexpr std::size_t max_headers = 32;

  message_id id;
  /// The stored id texts when they are exactly what `message_id::write_to`
  /// writes (lowercase hex), so they can be sent as they are; else empty.
  std::string_view id_text;
  std::string_view correlation_id_text;  ///< as `id_text`; empty also when absent
  std::string_view causation_id_text;    ///< as `id_text`; empty also when absent
  std::string_view type;
  std::uint32_t schema_version = 1;
  message_kind kind = message_kind::event;
  time_point occurred_at{};
  std::string_view occurred_at_text;  ///< as stored
  message_id correlation_id;
  message_id causation_id;
  std::string_view producer;
  std::string_view partition_key;
  std::string_view tenant;
  std::string_view traceparent;
  std::string_view tracestate;
  std::optional<time_point> deadline;
  std::string_view deadline_text;  ///< as stored; empty without a deadline
  std::uint32_t attempt = 0;
  std::array<std::pair<std::string_view, std::string_view>, max_headers> headers{};  ///< in stored order
  std::size_t header_count = 0;
  std::string_view payload;  ///< the payload value's whole JSON text
};

/// A strict RFC 8259 reader over a text, with nlohmann's own limits: each
/// call consumes one token or value and returns false at the first thing
/// the fast path does not take (malformed, or well-formed but left to the
/// full decode). Never allocates; recursion is bounded by `max_depth`.
class json_view_reader {
 public:
  explicit json_view_reader(std::string_view text) noexcept : p_(text.data()), end_(text.data() + text.size()) {}

  void skip_ws() noexcept {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  [[nodiscard]] bool at_end() const noexcept { return p_ == end_; }
  [[nodiscard]] bool peek(char c) const noexcept { return p_ != end_ && *p_ == c; }
  [[nodiscard]] bool take(char c) noexcept {
    if (!peek(c)) return false;
    ++p_;
    return true;
  }
  [[nodiscard]] const char* pos() const noexcept { return p_; }

  /// A string at the cursor: `contents` views it without the quotes;
  /// `escaped` tells whether it holds an escape (then `contents` is the
  /// escaped text). Validates UTF-8, control characters and `\u` surrogate
  /// pairs as nlohmann does.
  [[nodiscard]] bool string(std::string_view& contents, bool& escaped) noexcept {
    escaped = false;
    if (!take('"')) return false;
    const char* start = p_;
    while (p_ != end_) {
      // Printable ASCII other than the quote and the backslash: the bulk of
      // an envelope, eight bytes per step while they last, then per byte.
      skip_plain();
      if (p_ == end_) break;
      const auto c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        contents = std::string_view(start, static_cast<std::size_t>(p_ - start));
        ++p_;
        return true;
      }
      if (c == '\\') {
        escaped = true;
        if (!escape()) return false;
        continue;
      }
      if (c < 0x20) return false;
      if (c >= 0x80) {
        const std::size_t len = utf8_sequence_length(reinterpret_cast<const unsigned char*>(p_),
                                                     static_cast<std::size_t>(end_ - p_));
        if (len == 0) return false;
        p_ += len;
        continue;
      }
      ++p_;
    }
    return false;
  }

  /// A number at the cursor; `text` views it. Refuses numbers whose value
  /// could leave the range of double (nlohmann reports those as errors).
  [[nodiscard]] bool number(std::string_view& text) noexcept {
    const char* start = p_;
    (void)take('-');
    std::size_t int_digits = 0;
    if (take('0')) {
      int_digits = 0;
    } else if (p_ != end_ && *p_ >= '1' && *p_ <= '9') {
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') {
        ++p_;
        ++int_digits;
      }
    } else {
      return false;
    }
    if (take('.')) {
      if (!digits()) return false;
    }
    long exponent = 0;
    if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      bool negative = false;
      if (p_ != end_ && (*p_ == '+' || *p_ == '-')) negative = *p_++ == '-';
      if (p_ == end_ || *p_ < '0' || *p_ > '9') return false;
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') {
        if (exponent < 100000) exponent = exponent * 10 + (*p_ - '0');
        ++p_;
      }
      if (negative) exponent = -exponent;
    }
    text = std::string_view(start, static_cast<std::size_t>(p_ - start));
    // |value| < 10^(int_digits + exponent) <= 10^308, below DBL_MAX; tiny
    // exponents (underflow to 0 or a subnormal) are left to the decode.
    return text.size() <= 400 && static_cast<long>(int_digits) + exponent <= 308 && exponent >= -300;
  }

  /// Any value at the cursor, at container depth `depth` (the envelope
  /// object is depth 1); refuses containers deeper than `max_depth`.
  [[nodiscard]] bool value(std::size_t depth, std::size_t max_depth) noexcept {
    if (p_ == end_) return false;
    switch (*p_) {
      case '"': {
        std::string_view s;
        bool escaped = false;
        return string(s, escaped);
      }
      case '{': {
        if (depth + 1 > max_depth) return false;
        ++p_;
        skip_ws();
        if (take('}')) return true;
        for (;;) {
          std::string_view key;
          bool escaped = false;
          if (!string(key, escaped)) return false;
          skip_ws();
          if (!take(':')) return false;
          skip_ws();
          if (!value(depth + 1, max_depth)) return false;
          skip_ws();
          if (take('}')) return true;
          if (!take(',')) return false;
          skip_ws();
        }
      }
      case '[': {
        if (depth + 1 > max_depth) return false;
        ++p_;
        skip_ws();
        if (take(']')) return true;
        for (;;) {
          if (!value(depth + 1, max_depth)) return false;
          skip_ws();
          if (take(']')) return true;
          if (!take(',')) return false;
          skip_ws();
        }
      }
      case 't': return word("true");
      case 'f': return word("false");
      case 'n': return word("null");
      default: {
        std::string_view n;
        return number(n);
      }
    }
  }

 private:
  // Advances over bytes that need no attention inside a string (0x20..0x7f
  // but '"' and '\\'): eight at a time while a whole word is plain (the
  // usual SWAR zero-byte test on the word xor each special byte), then one
  // at a time through the table.
  void skip_plain() noexcept {
    constexpr std::uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    while (end_ - p_ >= 8) {
      std::uint64_t w = 0;
      std::memcpy(&w, p_, 8);
      const std::uint64_t quote = w ^ (ones * '"'), slash = w ^ (ones * '\\');
      const std::uint64_t special = ((quote - ones) & ~quote) | ((slash - ones) & ~slash) |  // a '"' or '\\' byte
                                    (w - ones * 0x20) |                                    // a byte below 0x20
                                    w;                                                     // a byte >= 0x80
      if ((special & highs) != 0) break;
      p_ += 8;
    }
    while (p_ != end_ && plain_[static_cast<unsigned char>(*p_)]) ++p_;
  }

  static constexpr std::array<bool, 256> plain_ = [] {
    std::array<bool, 256> t{};
    for (unsigned c = 0x20; c < 0x80; ++c) t[c] = c != '"' && c != '\\';
    return t;
  }();

  bool digits() noexcept {
    if (p_ == end_ || *p_ < '0' || *p_ > '9') return false;
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    return true;
  }
  bool word(std::string_view w) noexcept {
    if (static_cast<std::size_t>(end_ - p_) < w.size() || std::string_view(p_, w.size()) != w) return false;
    p_ += w.size();
    return true;
  }
  // Four hex digits after "\u".
  bool hex4(unsigned& out) noexcept {
    if (end_ - p_ < 4) return false;
    out = 0;
    for (int i = 0; i < 4; ++i) {
      const int v = hex_value(*p_++);
      if (v < 0) return false;
      out = out * 16 + static_cast<unsigned>(v);
    }
    return true;
  }
  // One escape at the backslash.
  bool escape() noexcept {
    ++p_;
    if (p_ == end_) return false;
    const char e = *p_++;
    switch (e) {
      case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't': return true;
      case 'u': {
        unsigned cp = 0;
        if (!hex4(cp)) return false;
        if (cp >= 0xdc00 && cp <= 0xdfff) return false;  // a low surrogate first
        if (cp >= 0xd800 && cp <= 0xdbff) {  // a high surrogate: a low one must follow
          unsigned low = 0;
          if (!take('\\') || !take('u') || !hex4(low)) return false;
          return low >= 0xdc00 && low <= 0xdfff;
        }
        return true;
      }
      default: return false;
    }
  }

  const char* p_;
  const char* end_;
};

/// `message_id::parse` of a viewed id: the canonical 8-4-4-4-12 form, hex
/// digits of either case; `lowercase` tells whether all of them are lowercase
/// (the text is then what `message_id::write_to` writes). One table load per
/// digit. Never allocates.
[[nodiscard]] inline bool json_view_id(std::string_view text, message_id& out, bool& lowercase) noexcept {
  // Digit value, plus 0x10 for an uppercase digit; -1 for anything else.
  static constexpr std::array<signed char, 256> hex = [] {
    std::array<signed char, 256> t{};
    for (auto& v : t) v = -1;
    for (int c = '0'; c <= '9'; ++c) t[static_cast<std::size_t>(c)] = static_cast<signed char>(c - '0');
    for (int c = 'a'; c <= 'f'; ++c) t[static_cast<std::size_t>(c)] = static_cast<signed char>(c - 'a' + 10);
    for (int c = 'A'; c <= 'F'; ++c) t[static_cast<std::size_t>(c)] = static_cast<signed char>(0x10 | (c - 'A' + 10));
    return t;
  }();
  if (text.size() != 36 || text[8] != '-' || text[13] != '-' || text[18] != '-' || text[23] != '-') return false;
  int bad = 0;
  auto digits = [&](std::size_t from, std::size_t count, std::uint64_t& acc) {
    for (std::size_t i = from; i < from + count; ++i) {
      const int v = hex[static_cast<unsigned char>(text[i])];
      bad |= v;  // negative once any digit is not hex; bit 0x10 once one is uppercase
      acc = (acc << 4) | static_cast<std::uint64_t>(v & 0xf);
    }
  };
  std::uint64_t half[2] = {0, 0};
  digits(0, 8, half[0]);
  digits(9, 4, half[0]);
  digits(14, 4, half[0]);
  digits(19, 4, half[1]);
  digits(24, 12, half[1]);
  if (bad < 0) return false;
  out = message_id(half[0], half[1]);
  lowercase = (bad & 0x10) == 0;
  return true;
}

/// As above, for a caller that does not need the case.
[[nodiscard]] inline bool json_view_id(std::string_view text, message_id& out) noexcept {
  bool lowercase = false;
  return json_view_id(text, out, lowercase);
}

/// An unsigned 32-bit JSON integer as `read_u32` takes it: plain digits.
[[nodiscard]] constexpr bool json_view_u32(std::string_view text, std::uint32_t& out) noexcept {
  if (text.empty() || text.size() > 10) return false;
  std::uint64_t v = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (v > 0xffffffffu) return false;
  out = static_cast<std::uint32_t>(v);
  return true;
}

/// Views the envelope in `text`. True only when `json::decode<nlohmann::json>`
/// (default options) succeeds on `text` and yields exactly these fields, the
/// payload being the JSON value of `out.payload`; false for anything else
/// (the decode then decides). Never allocates, never throws. Thread-safe.
[[nodiscard]] inline bool view_json_envelope(std::string_view text, json_envelope_view& out) noexcept {
  const json::decode_options limits{};
  if (text.size() > limits.max_bytes) return false;
  out.schema_version = 1;
  out.kind = message_kind::event;
  out.correlation_id = message_id{};
  out.causation_id = message_id{};
  out.id_text = {};
  out.correlation_id_text = {};
  out.causation_id_text = {};
  out.deadline.reset();
  out.deadline_text = {};
  out.attempt = 0;
  out.header_count = 0;
  enum : unsigned {
    f_id, f_type, f_schema_version, f_kind, f_occurred_at, f_correlation_id, f_causation_id, f_producer,
    f_partition_key, f_tenant, f_traceparent, f_tracestate, f_deadline, f_attempt, f_headers, f_payload, f_count
  };
  static constexpr std::array<std::string_view, f_count> names{
      "id",          "type",        "schema_version", "kind",          "occurred_at", "correlation_id",
      "causation_id", "producer",   "partition_key",  "tenant",        "traceparent", "tracestate",
      "deadline",    "attempt",     "headers",        "payload"};
  std::array<std::string_view, f_count> value{};
  std::uint32_t seen = 0;
  json_view_reader r(text);
  r.skip_ws();
  if (!r.take('{')) return false;
  r.skip_ws();
  if (!r.take('}')) {
    for (;;) {
      std::string_view key;
      bool escaped = false;
      if (!r.string(key, escaped) || escaped) return false;
      // The member names differ in length or first letter but for a few
      // pairs: compare only the names of this length.
      unsigned f = f_count;
      for (unsigned c = 0; c < f_count; ++c)
        if (names[c].size() == key.size() && names[c][0] == key[0] && names[c] == key) {
          f = c;
          break;
        }
      if (f == f_count || (seen & (1u << f)) != 0) return false;  // unknown or duplicate member
      seen |= 1u << f;
      r.skip_ws();
      if (!r.take(':')) return false;
      r.skip_ws();
      switch (f) {
        case f_schema_version:
        case f_attempt:
          if (!r.number(value[f])) return false;
          break;
        case f_headers: {
          if (!r.take('{')) return false;
          r.skip_ws();
          if (r.take('}')) break;
          for (;;) {
            if (out.header_count == json_envelope_view::max_headers) return false;
            auto& [k, v] = out.headers[out.header_count];
            bool ek = false, ev = false;
            if (!r.string(k, ek) || ek) return false;
            for (std::size_t i = 0; i < out.header_count; ++i)
              if (out.headers[i].first == k) return false;  // nlohmann would keep the last one
            r.skip_ws();
            if (!r.take(':')) return false;
            r.skip_ws();
            if (!r.string(v, ev) || ev) return false;
            ++out.header_count;
            r.skip_ws();
            if (r.take('}')) break;
            if (!r.take(',')) return false;
            r.skip_ws();
          }
          break;
        }
        case f_payload: {
          const char* start = r.pos();
          if (!r.value(1, limits.max_depth)) return false;
          value[f] = std::string_view(start, static_cast<std::size_t>(r.pos() - start));
          break;
        }
        default:
          if (!r.string(value[f], escaped) || escaped) return false;
          break;
      }
      r.skip_ws();
      if (r.take('}')) break;
      if (!r.take(',')) return false;
      r.skip_ws();
    }
  }
  r.skip_ws();
  if (!r.at_end()) return false;
  constexpr std::uint32_t required = (1u << f_id) | (1u << f_type) | (1u << f_occurred_at) | (1u << f_payload);
  if ((seen & required) != required) return false;

  // The field rules of json::detail::decode_raw, on the viewed texts.
  auto id_of = [&](unsigned f, message_id& id, std::string_view& id_text) {
    if ((seen & (1u << f)) == 0) return true;
    bool lowercase = false;
    if (!json_view_id(value[f], id, lowercase)) return false;
    if (lowercase) id_text = value[f];
    return true;
  };
  if (!id_of(f_id, out.id, out.id_text) || !id_of(f_correlation_id, out.correlation_id, out.correlation_id_text) ||
      !id_of(f_causation_id, out.causation_id, out.causation_id_text))
    return false;
  out.type = value[f_type];
  if (out.type.empty()) return false;
  if ((seen & (1u << f_schema_version)) != 0 && !json_view_u32(value[f_schema_version], out.schema_version))
    return false;
  if ((seen & (1u << f_attempt)) != 0 && !json_view_u32(value[f_attempt], out.attempt)) return false;
  if (!value[f_kind].empty()) {
    const auto k = parse_message_kind(value[f_kind]);
    if (!k) return false;
    out.kind = *k;
  }
  const auto occurred = json::detail::parse_time(value[f_occurred_at]);
  if (!occurred) return false;
  out.occurred_at = *occurred;
  out.occurred_at_text = value[f_occurred_at];
  if ((seen & (1u << f_deadline)) != 0) {
    const auto d = json::detail::parse_time(value[f_deadline]);
    if (!d) return false;
    out.deadline = *d;
    out.deadline_text = value[f_deadline];
  }
  out.producer = value[f_producer];
  out.partition_key = value[f_partition_key];
  out.tenant = value[f_tenant];
  out.traceparent = value[f_traceparent];
  out.tracestate = value[f_tracestate];
  if (!out.traceparent.empty() && !trace_context::is_valid_traceparent(out.traceparent)) return false;
  if (!out.tracestate.empty() && (out.traceparent.empty() || !trace_context::is_valid_tracestate(out.tracestate)))
    return false;
  out.payload = value[f_payload];
  return true;
}

/// True when `text` is exactly what `json::detail::format_time` writes for
/// the time it names ("YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"), so it can be sent as
/// is. `text` must already parse. Never allocates.
[[nodiscard]] constexpr bool json_view_canonical_time(std::string_view text) noexcept {
  return text.size() == 30 && text[10] == 'T' && text[19] == '.' && text[29] == 'Z';
}

/// Makes `j` equal to the JSON value of `text`, a value `view_json_envelope`
/// took (its `payload`), updating `j` in place: the members, elements and
/// strings `j` already holds are reused, so a flow of payloads of one shape
/// allocates nothing. True: `j` now equals `nlohmann::json::parse(text)`,
/// number kinds included (integer, unsigned, float), whatever `j` held before.
/// False: the text holds something this pass leaves to nlohmann's parser (an
/// escaped string, object members not in strictly increasing order as
/// nlohmann writes them, an integer beyond 64 bits); `j` is then a valid but
/// unspecified value. Not thread-safe on one `j`; may throw `std::bad_alloc`.
class json_view_dom {
 public:
  [[nodiscard]] static bool assign(std::string_view text, nlohmann::json& j) {
#if defined(JSON_DIAGNOSTICS) && JSON_DIAGNOSTICS
    // Members inserted below the public API would lack their parent links.
    (void)text;
    (void)j;
    return false;
#else
    json_view_dom d(text);
    d.r_.skip_ws();
    if (!d.value(j, 1)) return false;
    d.r_.skip_ws();
    return d.r_.at_end();
#endif
  }

 private:
  explicit json_view_dom(std::string_view text) noexcept : r_(text) {}

  bool value(nlohmann::json& j, std::size_t depth) {
    if (r_.at_end()) return false;
    switch (*r_.pos()) {
      case '"': {
        std::string_view s;
        bool escaped = false;
        if (!r_.string(s, escaped) || escaped) return false;
        if (j.is_string()) {
          j.get_ref<std::string&>().assign(s.data(), s.size());  // keeps its capacity
        } else {
          j = std::string(s);
        }
        return true;
      }
      case '{': return object(j, depth);
      case '[': return array(j, depth);
      case 't':
        if (!r_.value(depth, max_depth)) return false;
        j = true;
        return true;
      case 'f':
        if (!r_.value(depth, max_depth)) return false;
        j = false;
        return true;
      case 'n':
        if (!r_.value(depth, max_depth)) return false;
        j = nullptr;
        return true;
      default: return number(j);
    }
  }

  // Members must come in strictly increasing order of their names (as
  // nlohmann, whose objects are sorted maps, writes them): then one walk
  // along `j`'s own sorted members updates, inserts and erases, and a name
  // cannot repeat.
  bool object(nlohmann::json& j, std::size_t depth) {
    if (depth + 1 > max_depth || !r_.take('{')) return false;
    if (!j.is_object()) j = nlohmann::json::object();
    auto& members = j.get_ref<nlohmann::json::object_t&>();
    auto it = members.begin();
    r_.skip_ws();
    if (!r_.take('}')) {
      std::string_view previous;
      for (bool first = true;; first = false) {
        std::string_view key;
        bool escaped = false;
        if (!r_.string(key, escaped) || escaped) return false;
        if (!first && !(previous < key)) return false;
        previous = key;
        while (it != members.end() && std::string_view(it->first) < key) it = members.erase(it);
        if (it == members.end() || std::string_view(it->first) != key)
          it = members.emplace_hint(it, std::string(key), nullptr);
        r_.skip_ws();
        if (!r_.take(':')) return false;
        r_.skip_ws();
        if (!value(it->second, depth + 1)) return false;
        ++it;
        r_.skip_ws();
        if (r_.take('}')) break;
        if (!r_.take(',')) return false;
        r_.skip_ws();
      }
    }
    members.erase(it, members.end());
    return true;
  }

  bool array(nlohmann::json& j, std::size_t depth) {
    if (depth + 1 > max_depth || !r_.take('[')) return false;
    if (!j.is_array()) j = nlohmann::json::array();
    auto& elements = j.get_ref<nlohmann::json::array_t&>();
    std::size_t n = 0;
    r_.skip_ws();
    if (!r_.take(']')) {
      for (;;) {
        if (n == elements.size()) elements.emplace_back();
        if (!value(elements[n], depth + 1)) return false;
        ++n;
        r_.skip_ws();
        if (r_.take(']')) break;
        if (!r_.take(',')) return false;
        r_.skip_ws();
      }
    }
    elements.erase(elements.begin() + static_cast<std::ptrdiff_t>(n), elements.end());
    return true;
  }

  // nlohmann's kinds: a '.' or an exponent makes a float (strtod, correctly
  // rounded as from_chars is), else a leading '-' an integer, else unsigned.
  bool number(nlohmann::json& j) {
    std::string_view t;
    if (!r_.number(t)) return false;
    if (t.find_first_of(".eE") != std::string_view::npos) {
      double d = 0;
      const auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), d);
      if (ec != std::errc{} || end != t.data() + t.size()) return false;
      j = d;
      return true;
    }
    const bool negative = t.front() == '-';
    if (negative) t.remove_prefix(1);
    std::uint64_t v = 0;
    for (const char c : t) {
      const auto digit = static_cast<std::uint64_t>(c - '0');
      if (v > (~std::uint64_t{0} - digit) / 10) return false;  // beyond 64 bits: nlohmann makes a float
      v = v * 10 + digit;
    }
    if (!negative) {
      j = v;
      return true;
    }
    constexpr std::uint64_t most_negative = std::uint64_t{1} << 63;
    if (v > most_negative) return false;
    j = v == most_negative ? std::numeric_limits<std::int64_t>::min() : -static_cast<std::int64_t>(v);
    return true;
  }

  static constexpr std::size_t max_depth = json::decode_options{}.max_depth;
  json_view_reader r_;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
