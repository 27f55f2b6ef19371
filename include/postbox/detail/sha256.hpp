// SPDX-License-Identifier: MIT
// SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104) and a constant-time byte comparison, for envelope signing.
#pragma once

// Design: docs/design/security.md ("Envelope authentication"). Standard
// library only. Inputs are bytes viewed through std::string_view (a char is
// taken as its unsigned value), so strings, payloads and keys need no copy.

#include <postbox/config.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// A SHA-256 digest: 32 bytes.
using sha256_digest = std::array<std::uint8_t, 32>;

/// Incremental SHA-256 (FIPS 180-4 §6.2). `update` any number of times, then
/// `finish` once. Never allocates, never throws. Not thread-safe (a plain
/// value; use one per thread).
class sha256 {
 public:
  sha256() noexcept { reset(); }

  /// Back to the empty message.
  void reset() noexcept {
    state_ = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
              0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    length_ = 0;
    used_ = 0;
  }

  /// Appends `bytes` to the message. Never allocates.
  void update(std::string_view bytes) noexcept {
    for (const char c : bytes) {
      block_[used_++] = static_cast<std::uint8_t>(c);
      if (used_ == 64) {
        compress();
        used_ = 0;
      }
    }
    length_ += static_cast<std::uint64_t>(bytes.size());
  }

  /// Pads, processes the last block(s) and returns the digest. The object
  /// must be `reset` before it hashes another message. Never allocates.
  [[nodiscard]] sha256_digest finish() noexcept {
    const std::uint64_t bits = length_ * 8;
    block_[used_++] = 0x80;
    if (used_ > 56) {
      while (used_ < 64) block_[used_++] = 0;
      compress();
      used_ = 0;
    }
    while (used_ < 56) block_[used_++] = 0;
    for (int i = 7; i >= 0; --i) block_[used_++] = static_cast<std::uint8_t>(bits >> (8 * i));
    compress();
    used_ = 0;
    sha256_digest out{};
    for (std::size_t i = 0; i < 8; ++i) {
      out[4 * i] = static_cast<std::uint8_t>(state_[i] >> 24);
      out[4 * i + 1] = static_cast<std::uint8_t>(state_[i] >> 16);
      out[4 * i + 2] = static_cast<std::uint8_t>(state_[i] >> 8);
      out[4 * i + 3] = static_cast<std::uint8_t>(state_[i]);
    }
    return out;
  }

  /// The digest of `bytes` in one call. Never allocates.
  [[nodiscard]] static sha256_digest of(std::string_view bytes) noexcept {
    sha256 h;
    h.update(bytes);
    return h.finish();
  }

 private:
  static constexpr std::uint32_t rotr(std::uint32_t x, int n) noexcept { return (x >> n) | (x << (32 - n)); }

  // One 64-byte block (FIPS 180-4 §6.2.2).
  void compress() noexcept {
    static constexpr std::array<std::uint32_t, 64> k = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};
    std::array<std::uint32_t, 64> w{};
    for (std::size_t t = 0; t < 16; ++t) {
      w[t] = (std::uint32_t{block_[4 * t]} << 24) | (std::uint32_t{block_[4 * t + 1]} << 16) |
             (std::uint32_t{block_[4 * t + 2]} << 8) | std::uint32_t{block_[4 * t + 3]};
    }
    for (std::size_t t = 16; t < 64; ++t) {
      const std::uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const std::uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    std::uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
    std::uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
    for (std::size_t t = 0; t < 64; ++t) {
      const std::uint32_t big_s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const std::uint32_t ch = (e & f) ^ (~e & g);
      const std::uint32_t t1 = h + big_s1 + ch + k[t] + w[t];
      const std::uint32_t big_s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const std::uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      const std::uint32_t t2 = big_s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state_[0] += a;
    state_[1] += b;
    state_[2] += c;
    state_[3] += d;
    state_[4] += e;
    state_[5] += f;
    state_[6] += g;
    state_[7] += h;
  }

  std::array<std::uint32_t, 8> state_{};
  std::array<std::uint8_t, 64> block_{};
  std::uint64_t length_ = 0;  // bytes hashed so far
  std::size_t used_ = 0;      // bytes in block_
};

/// Incremental HMAC-SHA256 (RFC 2104 with SHA-256, as RFC 4231 tests it):
/// keys longer than the 64-byte block are hashed first. Never allocates.
/// Not thread-safe (a plain value).
class hmac_sha256 {
 public:
  /// Starts a MAC under `key` (any length, empty allowed).
  explicit hmac_sha256(std::string_view key) noexcept {
    std::array<std::uint8_t, 64> k{};
    if (key.size() > 64) {
      const sha256_digest d = sha256::of(key);
      for (std::size_t i = 0; i < d.size(); ++i) k[i] = d[i];
    } else {
      for (std::size_t i = 0; i < key.size(); ++i) k[i] = static_cast<std::uint8_t>(key[i]);
    }
    std::array<char, 64> pad{};
    for (std::size_t i = 0; i < 64; ++i) pad[i] = static_cast<char>(k[i] ^ 0x36u);
    inner_.update(std::string_view(pad.data(), pad.size()));
    for (std::size_t i = 0; i < 64; ++i) pad[i] = static_cast<char>(k[i] ^ 0x5cu);
    outer_.update(std::string_view(pad.data(), pad.size()));
    pad.fill(0);
    k.fill(0);
  }

  /// Appends `bytes` to the message. Never allocates.
  void update(std::string_view bytes) noexcept { inner_.update(bytes); }

  /// The MAC of everything appended. Call once. Never allocates.
  [[nodiscard]] sha256_digest finish() noexcept {
    const sha256_digest in = inner_.finish();
    outer_.update(std::string_view(reinterpret_cast<const char*>(in.data()), in.size()));
    return outer_.finish();
  }

  /// The MAC of `message` under `key` in one call. Never allocates.
  [[nodiscard]] static sha256_digest of(std::string_view key, std::string_view message) noexcept {
    hmac_sha256 h(key);
    h.update(message);
    return h.finish();
  }

 private:
  sha256 inner_;
  sha256 outer_;
};

/// Lower-case hex of `bytes` (two characters per byte). Allocates.
[[nodiscard]] inline std::string to_hex(const sha256_digest& bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const std::uint8_t b : bytes) {
    out += digits[b >> 4];
    out += digits[b & 0xf];
  }
  return out;
}

/// Whether `a` and `b` hold the same bytes, in time that depends only on
/// their lengths, never on where they first differ (so a forger cannot learn
/// a MAC byte by byte from timing). Lengths are not secret. Never allocates.
[[nodiscard]] inline bool constant_time_equal(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  // volatile: the compiler may not stop at the first difference.
  volatile std::uint8_t diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    diff = static_cast<std::uint8_t>(diff | (static_cast<std::uint8_t>(a[i]) ^ static_cast<std::uint8_t>(b[i])));
  return diff == 0;
}

}  // namespace detail
POSTBOX_END_NAMESPACE
