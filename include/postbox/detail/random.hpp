// SPDX-License-Identifier: MIT
// Per-thread random numbers: a fast xoshiro256** stream and a ChaCha20 stream for unguessable ids.
#pragma once

#include <postbox/config.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <random>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// One step of splitmix64: expands a seed into well-mixed 64-bit words (used
/// to fill xoshiro's state, as its authors recommend). Never allocates.
[[nodiscard]] constexpr std::uint64_t splitmix64(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

[[nodiscard]] constexpr std::uint64_t rotl64(std::uint64_t x, int k) noexcept {
  return (x << k) | (x >> (64 - k));
}

/// xoshiro256** (Blackman and Vigna): fast, 256-bit state, statistically
/// strong, NOT cryptographic (its output can be predicted from a few words).
/// Satisfies UniformRandomBitGenerator. Never allocates. Not thread-safe:
/// use `thread_rng()` for the per-thread instance.
class xoshiro256ss {
 public:
  using result_type = std::uint64_t;

  /// Seeds the 256-bit state from one 64-bit seed through splitmix64.
  explicit constexpr xoshiro256ss(std::uint64_t seed) noexcept {
    for (auto& word : s_) word = splitmix64(seed);
  }

  static constexpr result_type min() noexcept { return 0; }
  static constexpr result_type max() noexcept { return ~result_type{0}; }

  /// Next 64 random bits.
  constexpr result_type operator()() noexcept {
    const std::uint64_t result = rotl64(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl64(s_[3], 45);
    return result;
  }

 private:
  std::array<std::uint64_t, 4> s_{};
};

/// 64 bits from `std::random_device` (the OS entropy source on Linux).
/// Slow (may make a syscall); used only for seeding. Thread-safe.
[[nodiscard]] inline std::uint64_t entropy64() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ static_cast<std::uint64_t>(rd());
}

/// The calling thread's xoshiro256** generator, seeded once per thread from
/// `std::random_device` on first use. Fast; not for secrets.
/// Never allocates after the first call. Thread-safe (one per thread).
[[nodiscard]] inline xoshiro256ss& thread_rng() {
  thread_local xoshiro256ss rng(entropy64());
  return rng;
}

/// ChaCha20 (RFC 8439) used as a keystream generator: a cryptographically
/// strong stream from a 256-bit key, here drawn from `std::random_device`.
/// Never allocates. Not thread-safe: use `unguessable128()`.
class chacha20_stream {
 public:
  /// Keys the stream from the OS entropy source.
  chacha20_stream() {
    std::random_device rd;
    for (std::size_t i = 0; i < 8; ++i) key_[i] = static_cast<std::uint32_t>(rd());
    nonce_[0] = static_cast<std::uint32_t>(rd());
    nonce_[1] = static_cast<std::uint32_t>(rd());
    nonce_[2] = static_cast<std::uint32_t>(rd());
  }

  /// Next 64 bits of keystream.
  std::uint64_t next64() noexcept {
    if (used_ + 2 > block_.size()) refill();
    const std::uint64_t v = (static_cast<std::uint64_t>(block_[used_]) << 32) | block_[used_ + 1];
    // Burn what was handed out, so a later memory disclosure cannot replay it.
    block_[used_] = 0;
    block_[used_ + 1] = 0;
    used_ += 2;
    return v;
  }

 private:
  static constexpr std::uint32_t rotl32(std::uint32_t x, int k) noexcept { return (x << k) | (x >> (32 - k)); }
  static constexpr void quarter(std::uint32_t& a, std::uint32_t& b, std::uint32_t& c, std::uint32_t& d) noexcept {
    a += b; d ^= a; d = rotl32(d, 16);
    c += d; b ^= c; b = rotl32(b, 12);
    a += b; d ^= a; d = rotl32(d, 8);
    c += d; b ^= c; b = rotl32(b, 7);
  }

  void refill() noexcept {
    std::array<std::uint32_t, 16> in{0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                                     key_[0], key_[1], key_[2], key_[3],
                                     key_[4], key_[5], key_[6], key_[7],
                                     counter_++, nonce_[0], nonce_[1], nonce_[2]};
    if (counter_ == 0) ++nonce_[0];  // 2^32 blocks used: move to a fresh nonce
    std::array<std::uint32_t, 16> x = in;
    for (int round = 0; round < 10; ++round) {
      quarter(x[0], x[4], x[8], x[12]);
      quarter(x[1], x[5], x[9], x[13]);
      quarter(x[2], x[6], x[10], x[14]);
      quarter(x[3], x[7], x[11], x[15]);
      quarter(x[0], x[5], x[10], x[15]);
      quarter(x[1], x[6], x[11], x[12]);
      quarter(x[2], x[7], x[8], x[13]);
      quarter(x[3], x[4], x[9], x[14]);
    }
    for (std::size_t i = 0; i < 16; ++i) block_[i] = x[i] + in[i];
    used_ = 0;
  }

  std::array<std::uint32_t, 8> key_{};
  std::array<std::uint32_t, 3> nonce_{};
  std::uint32_t counter_ = 0;
  std::array<std::uint32_t, 16> block_{};
  std::size_t used_ = 16;  // empty: the first call refills
};

/// 128 unguessable bits (for operation ids, tokens): ChaCha20 keystream from
/// a per-thread key drawn once from `std::random_device`. The key is not
/// re-drawn after fork(); do not share ids across a fork boundary.
/// Never allocates after the first call per thread. Thread-safe.
[[nodiscard]] inline std::array<std::uint64_t, 2> unguessable128() {
  thread_local chacha20_stream stream;
  return {stream.next64(), stream.next64()};
}

}  // namespace detail
POSTBOX_END_NAMESPACE
