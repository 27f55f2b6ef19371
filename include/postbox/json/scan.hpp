// SPDX-License-Identifier: MIT
// Internal to postbox/json.hpp: a non-recursive pre-scan of JSON text (nesting depth, UTF-8 validity, top-level member count).
#pragma once

#include <postbox/error.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// What the pre-scan found. `code` is ok, too_deep or invalid_utf8;
/// `offset` is the byte where it stopped. `top_level_colons` counts `:`
/// outside strings at depth 1: for a top-level object it equals the number of
/// members as written, so a smaller parsed size means a duplicate key.
struct json_scan_result {
  errc code = errc::ok;
  std::size_t offset = 0;
  std::size_t top_level_colons = 0;
};

/// Length of the valid UTF-8 sequence starting at `p` (at most `n` bytes
/// available), or 0 if it is invalid (overlong, surrogate, above U+10FFFF,
/// truncated). `p[0]` must be >= 0x80. Never allocates.
[[nodiscard]] constexpr std::size_t utf8_sequence_length(const unsigned char* p, std::size_t n) noexcept {
  const unsigned char c = p[0];
  auto cont = [&](std::size_t i, unsigned char lo = 0x80, unsigned char hi = 0xbf) {
    return i < n && p[i] >= lo && p[i] <= hi;
  };
  if (c >= 0xc2 && c <= 0xdf) return cont(1) ? 2 : 0;
  if (c == 0xe0) return cont(1, 0xa0) && cont(2) ? 3 : 0;
  if ((c >= 0xe1 && c <= 0xec) || c == 0xee || c == 0xef) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xed) return cont(1, 0x80, 0x9f) && cont(2) ? 3 : 0;
  if (c == 0xf0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xf1 && c <= 0xf3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xf4) return cont(1, 0x80, 0x8f) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

/// True when `text` is valid UTF-8. Never allocates.
[[nodiscard]] inline bool is_valid_utf8(std::string_view text) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const std::size_t len = utf8_sequence_length(p + i, n - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

/// One linear pass over `text`, with no recursion and no allocation: stops
/// at the first container nested deeper than `max_depth` (too_deep) or the
/// first byte that is not valid UTF-8 (invalid_utf8). It does not check the
/// JSON grammar; the parser that runs afterwards does. Strings and their
/// escapes are skipped, so brackets inside strings do not count.
[[nodiscard]] inline json_scan_result scan_json(std::string_view text, std::size_t max_depth) noexcept {
  json_scan_result r;
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c >= 0x80) {
      const std::size_t len = utf8_sequence_length(p + i, n - i);
      if (len == 0) {
        r.code = errc::invalid_utf8;
        r.offset = i;
        return r;
      }
      i += len;
      continue;
    }
    if (in_string) {
      if (c == '\\') {
        // Skip the escaped character when it is ASCII; anything else is a
        // grammar error the parser reports, but still gets UTF-8 checked.
        i += (i + 1 < n && p[i + 1] < 0x80) ? 2 : 1;
        continue;
      }
      if (c == '"') in_string = false;
      ++i;
      continue;
    }
    switch (c) {
      case '"': in_string = true; break;
      case '{':
      case '[':
        if (++depth > max_depth) {
          r.code = errc::too_deep;
          r.offset = i;
          return r;
        }
        break;
      case '}':
      case ']':
        if (depth > 0) --depth;
        break;
      case ':':
        if (depth == 1) ++r.top_level_colons;
        break;
      default: break;
    }
    ++i;
  }
  r.offset = n;
  return r;
}

}  // namespace detail
POSTBOX_END_NAMESPACE
