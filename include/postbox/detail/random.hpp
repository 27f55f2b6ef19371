// SPDX-License-Identifier: MIT
// Per-thread random numbers: OS randomness (getrandom) buffered per thread, and a fast xoshiro256** stream seeded from it; both re-drawn after fork().
#pragma once

#include <postbox/config.hpp>
#include <postbox/error.hpp>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include <fcntl.h>
#include <pthread.h>
#include <sys/random.h>
#include <unistd.h>

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
  explicit constexpr xoshiro256ss(std::uint64_t seed) noexcept { reseed(seed); }

  /// Replaces the state with one expanded from `seed`. Never allocates.
  constexpr void reseed(std::uint64_t seed) noexcept {
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

/// Count of fork()s this process descends through since the first use of
/// postbox's randomness. Written only by the pthread_atfork child handler
/// (which runs in the new child while it is still single-threaded); read by
/// every per-thread generator before each draw. Relaxed both ways: the child
/// handler and the later reads are on the same (only) thread of the child,
/// so program order alone makes the increment visible; nothing else is
/// published through it. Invariant: only ever increases.
inline std::atomic<std::uint64_t> fork_epoch_counter{0};

inline void on_fork_child() noexcept {
  // relaxed: see fork_epoch_counter (single-threaded child, program order).
  fork_epoch_counter.fetch_add(1, std::memory_order_relaxed);
}

/// The current fork epoch. The first call registers the pthread_atfork
/// handler that bumps it in every child, so any per-thread state that was
/// filled before a fork carries an older epoch in the child and is discarded.
/// (glibc's getpid() is a system call since 2.25, so comparing process ids
/// per draw would put a syscall on every message id; one relaxed load does
/// the same job for fork(). A child made by a raw clone(2) without fork's
/// handlers is not detected.) Never allocates after the first call.
[[nodiscard]] inline std::uint64_t fork_epoch() noexcept {
  static const bool registered = pthread_atfork(nullptr, nullptr, &on_fork_child) == 0;
  (void)registered;
  // relaxed: see fork_epoch_counter.
  return fork_epoch_counter.load(std::memory_order_relaxed);
}

/// Fills `out` with `n` bytes read from /dev/urandom: the fallback of
/// os_random_bytes() for a kernel (or a seccomp filter) without getrandom(2).
/// Retries on EINTR and short reads. Throws `postbox::error` (`not_found`)
/// when the device cannot be opened or read. Never allocates (but the throw).
/// Thread-safe.
inline void urandom_bytes(unsigned char* p, std::size_t n) {
  int fd = -1;
  do {
    fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) POSTBOX_THROW(error(errc::not_found, "postbox: no OS randomness (getrandom(2) failed, /dev/urandom cannot be opened)"));
  while (n > 0) {
    const ssize_t got = ::read(fd, p, n);
    if (got > 0) {
      p += got;
      n -= static_cast<std::size_t>(got);
    } else if (got < 0 && errno == EINTR) {
      continue;
    } else {
      ::close(fd);
      POSTBOX_THROW(error(errc::not_found, "postbox: no OS randomness (getrandom(2) failed, /dev/urandom cannot be read)"));
    }
  }
  ::close(fd);
}

/// Fills `out` with `n` bytes from the kernel's CSPRNG (getrandom(2), blocking
/// only until the pool is first initialized at boot). Retries on EINTR and
/// short reads; on a kernel without getrandom falls back to /dev/urandom
/// (`urandom_bytes`, which throws `postbox::error` when that cannot be read).
/// Never allocates. Thread-safe.
inline void os_random_bytes(void* out, std::size_t n) {
  auto* p = static_cast<unsigned char*>(out);
  while (n > 0) {
    const ssize_t got = ::getrandom(p, n, 0);
    if (got > 0) {
      p += got;
      n -= static_cast<std::size_t>(got);
      continue;
    }
    if (got < 0 && errno == EINTR) continue;
    urandom_bytes(p, n);  // ENOSYS and anything unexpected
    return;
  }
}

/// A per-thread buffer of 256 bytes of OS randomness, refilled with one
/// getrandom(2) call when drained and discarded when the fork epoch changed
/// (so a child never hands out bytes its parent also hands out). Bytes are
/// zeroed once handed out. Not thread-safe: use `random_bytes()`.
class os_random_buffer {
 public:
  static constexpr std::size_t size = 256;

  /// Copies `n` fresh bytes into `out`. Makes a syscall about once per 256
  /// bytes. Never allocates.
  void take(void* out, std::size_t n) {
    const std::uint64_t epoch = fork_epoch();
    if (epoch != epoch_) {
      buf_.fill(0);
      used_ = size;  // drawn before a fork: the parent may hand these out too
      epoch_ = epoch;
    }
    auto* p = static_cast<unsigned char*>(out);
    while (n > 0) {
      if (used_ == size) {
        os_random_bytes(buf_.data(), size);
        used_ = 0;
      }
      const std::size_t take_now = n < size - used_ ? n : size - used_;
      std::memcpy(p, buf_.data() + used_, take_now);
      std::memset(buf_.data() + used_, 0, take_now);  // burn what was handed out
      used_ += take_now;
      p += take_now;
      n -= take_now;
    }
  }

 private:
  std::array<unsigned char, size> buf_{};
  std::size_t used_ = size;  // empty: the first take refills
  std::uint64_t epoch_ = 0;
};

/// Fills `out` with `n` unguessable bytes from the calling thread's buffer of
/// OS randomness. Distinct in a parent and its fork() children.
/// Never allocates. Thread-safe (one buffer per thread).
inline void random_bytes(void* out, std::size_t n) {
  thread_local os_random_buffer buffer;
  buffer.take(out, n);
}

/// 64 bits of OS randomness. Thread-safe; never allocates.
[[nodiscard]] inline std::uint64_t entropy64() {
  std::uint64_t v = 0;
  random_bytes(&v, sizeof v);
  return v;
}

/// The calling thread's xoshiro256** generator, seeded from OS randomness on
/// first use and re-seeded when the process was forked since (a child and
/// its parent never continue one stream). Fast; not for secrets.
/// Never allocates. Thread-safe (one per thread).
[[nodiscard]] inline xoshiro256ss& thread_rng() {
  struct seeded {
    xoshiro256ss rng{entropy64()};
    std::uint64_t epoch = fork_epoch();
  };
  thread_local seeded s;
  const std::uint64_t epoch = fork_epoch();
  if (epoch != s.epoch) {
    s.rng.reseed(entropy64());
    s.epoch = epoch;
  }
  return s.rng;
}

/// 128 unguessable bits (for operation ids, tokens), straight from the
/// calling thread's buffer of OS randomness; distinct across fork().
/// Never allocates. Thread-safe.
[[nodiscard]] inline std::array<std::uint64_t, 2> unguessable128() {
  std::array<std::uint64_t, 2> bits{};
  random_bytes(bits.data(), sizeof bits);
  return bits;
}

}  // namespace detail
POSTBOX_END_NAMESPACE
