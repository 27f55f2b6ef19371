// SPDX-License-Identifier: MIT
// postbox::durable_stream: the stream<T> API (partitions, readers, consumer groups, retention) over an on-disk log.
#pragma once

// Design: docs/design/durable_stream.md. Linux (POSIX + fdatasync + flock + mmap);
// little-endian hosts only (the record format is little-endian).
//
// * Layout: `<dir>/LOCK` (flock: one process per log; a second open gets
//   error(errc::busy)), `<dir>/META` (partition count), `<dir>/p<N>/<base>.log`
//   segment files (base = offset of the first record, 20 digits), and
//   `<dir>/groups/<hex name>.offsets` (a group's committed offsets, replaced
//   atomically: temp file, fsync, rename, fsync of the directory).
// * Record: [len u32][crc32c u32][offset u64][timestamp i64 ns][key len u32][key][payload];
//   `len` counts the bytes after the crc, the crc covers `len` and those bytes.
// * Index: in memory, rebuilt on open by walking every segment's length
//   fields (one u32 position per record); the last segment is also CRC-checked
//   and truncated at its first record that does not check out (torn tail).
//   Reads go through an mmap of each segment and verify every record's CRC,
//   so a corrupt record is reported (errc::corrupt), never served.
// * Appends to one partition are serialized by its `append_mu` (pwrite of
//   one record); the index and the visible end change under `meta_mu`, which
//   readers take for a lookup of a few instructions, never across I/O.
//   fdatasync runs under `sync_mu` and outside `append_mu`, so concurrent
//   `always` appenders share one fdatasync (group commit).
// * Partition = stream_partition_of(key, partitions), the same FNV-1a 64 as
//   postbox::stream (stream.hpp), so a key lands in the same partition number.

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/group_membership.hpp>
#include <postbox/error.hpp>
#include <postbox/stream.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

static_assert(std::endian::native == std::endian::little,
              "postbox::durable_stream writes its record format little-endian with memcpy: little-endian hosts only");

POSTBOX_BEGIN_NAMESPACE

/// When appends reach the disk (fdatasync). What each loses on a crash:
/// - `always`: append returns after fdatasync of its record: nothing that
///   returned is lost, on a process kill or a power loss.
/// - `batch`: fdatasync after `batch_records` appends or when the oldest
///   unsynced append is `batch_interval` old (checked at each append and
///   `sync()`, on the stream's clock); a process kill loses nothing (each
///   append is written to the kernel before it returns); a power or OS
///   crash loses at most the records above `durable_end(p)`, i.e. the window.
/// - `never`: no fdatasync except an explicit `sync()`; a process kill loses
///   nothing; a power or OS crash may lose anything not synced before.
/// Recovery never serves a torn or corrupt record under any policy.
enum class fsync_mode { always, batch, never };

/// An fsync policy: the mode, plus the batch window for `fsync_mode::batch`.
struct fsync_policy {
  fsync_mode mode = fsync_mode::always;
  std::size_t batch_records = 0;  ///< batch: sync after this many unsynced appends (0: no count bound)
  duration batch_interval{0};     ///< batch: sync once the oldest unsynced append is this old (0: no time bound)

  /// fdatasync before every append returns.
  [[nodiscard]] static fsync_policy always() noexcept { return {}; }
  /// Group commit: fdatasync every `n` records or once the oldest unsynced one is `interval` old.
  [[nodiscard]] static fsync_policy batch(std::size_t n, duration interval = duration{0}) noexcept {
    return {fsync_mode::batch, n, interval};
  }
  /// Never fdatasync (the OS writes back when it likes); `sync()` still works.
  [[nodiscard]] static fsync_policy never() noexcept { return {fsync_mode::never, 0, duration{0}}; }
};

/// How a durable stream is opened.
struct durable_options {
  /// Partition count (>= 1). When the log exists, 0 takes its count; any other
  /// value must match it (else error(invalid_argument)).
  std::size_t partitions = 1;
  /// Retention by count, bytes (file bytes) and age, applied by whole segments
  /// (the active segment is never dropped); age also hides expired records from reads.
  retention keep{};
  fsync_policy sync = fsync_policy::always();
  std::size_t segment_bytes = std::size_t{64} << 20;  ///< a segment rolls once it would exceed this
  const clock* clk = nullptr;                          ///< nullptr: default_clock()
};

/// What opening the log found, per partition.
struct durable_recovery {
  struct partition_report {
    std::uint64_t records = 0;          ///< records recovered (retained)
    std::uint64_t segments = 0;         ///< segment files
    std::uint64_t truncated_bytes = 0;  ///< torn or corrupt tail cut from the last segment
  };
  std::vector<partition_report> partitions;
  [[nodiscard]] std::uint64_t truncated_bytes() const noexcept {
    std::uint64_t t = 0;
    for (const auto& p : partitions) t += p.truncated_bytes;
    return t;
  }
};

/// A codec for durable_stream<T, Codec>: `encode(const T&)` returns bytes
/// (anything convertible to std::string_view, e.g. std::string or a const
/// reference to one) and `decode(std::string_view)` returns result<T>.
template <class C, class T>
concept durable_codec = requires(const C& c, const T& v, std::string_view bytes) {
  { c.encode(v) } -> std::convertible_to<std::string_view>;
  { c.decode(bytes) } -> std::same_as<result<T>>;
};

/// The identity codec for std::string records. Stateless.
struct string_codec {
  /// The string itself (no copy).
  [[nodiscard]] const std::string& encode(const std::string& s) const noexcept { return s; }
  /// A copy of the bytes. Allocates.
  [[nodiscard]] result<std::string> decode(std::string_view b) const { return std::string(b); }
};

namespace detail {

// ---- CRC-32C (Castagnoli): SSE4.2 instruction when the CPU has it, else a table.

constexpr std::array<std::uint32_t, 256> make_crc32c_table() noexcept {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1U) ? (c >> 1) ^ 0x82F63B78U : c >> 1;
    t[i] = c;
  }
  return t;
}
inline constexpr std::array<std::uint32_t, 256> crc32c_table = make_crc32c_table();

/// Table-driven CRC-32C update (no final xor). Never allocates.
inline std::uint32_t crc32c_update_sw(std::uint32_t crc, const void* data, std::size_t n) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) crc = crc32c_table[(crc ^ p[i]) & 0xFFU] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#  define POSTBOX_DURABLE_HW_CRC 1
__attribute__((target("sse4.2"))) inline std::uint32_t crc32c_update_hw(std::uint32_t crc, const void* data,
                                                                         std::size_t n) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n-- > 0) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
inline bool cpu_has_crc32c() noexcept {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#else
#  define POSTBOX_DURABLE_HW_CRC 0
#endif

/// CRC-32C of `n` bytes continuing `crc` (pass 0 to start). Never allocates. Thread-safe.
inline std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0) noexcept {
  crc = ~crc;
#if POSTBOX_DURABLE_HW_CRC
  if (cpu_has_crc32c()) return ~crc32c_update_hw(crc, data, n);
#endif
  return ~crc32c_update_sw(crc, data, n);
}

inline constexpr std::size_t durable_header = 8;                     // len + crc
inline constexpr std::size_t durable_body_fixed = 8 + 8 + 4;         // offset + timestamp + key len
inline constexpr std::uint32_t durable_max_body = std::uint32_t{1} << 30;  // sanity bound for recovery

template <class U>
inline U load_le(const unsigned char* p) noexcept {
  U v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class U>
inline void store_le(unsigned char* p, U v) noexcept {
  std::memcpy(p, &v, sizeof v);
}

[[noreturn]] inline void durable_fail(errc code, const std::string& what, int err = 0) {
  std::string msg = "postbox::durable_stream: " + what;
  if (err != 0) msg += ": " + std::error_code(err, std::generic_category()).message();
  POSTBOX_THROW(error(code, msg));
}

inline void write_all(int fd, const void* data, std::size_t n, off_t at, const char* what) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, at);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) durable_fail(errc::store_error, what, w < 0 ? errno : ENOSPC);
    p += w;
    n -= static_cast<std::size_t>(w);
    at += w;
  }
}

inline void fsync_dir(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) durable_fail(errc::store_error, "open directory " + dir.string(), errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) durable_fail(errc::store_error, "fsync directory " + dir.string(), err);
}

/// Replaces `path` with `bytes` atomically (temp file, optional fsync, rename, fsync of the directory).
inline void replace_file(const std::filesystem::path& path, std::string_view bytes, bool durable) {
  const auto tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) durable_fail(errc::store_error, "create " + tmp, errno);
  POSTBOX_TRY { write_all(fd, bytes.data(), bytes.size(), 0, "write temp file"); }
  POSTBOX_CATCH_ALL {
    ::close(fd);
#if POSTBOX_HAS_EXCEPTIONS
    throw;
#endif
  }
  if (durable && ::fdatasync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    durable_fail(errc::store_error, "fdatasync " + tmp, err);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) durable_fail(errc::store_error, "rename " + tmp, errno);
  if (durable) fsync_dir(path.parent_path());
}

inline std::optional<std::string> read_whole_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

/// One segment file: its descriptor, a read-only mapping (reserved at
/// `map_len`, which may exceed the file: only bytes below the published end
/// are ever read), and the in-memory index of record positions.
struct durable_segment {
  std::uint64_t base = 0;          // offset of the first record
  std::filesystem::path path;
  int fd = -1;
  const unsigned char* map = nullptr;
  std::size_t map_len = 0;
  std::uint64_t size = 0;          // bytes written; appender under append_mu, readers under meta_mu
  std::vector<std::uint32_t> index;  // position of record base+i; guarded by meta_mu (appended by the writer)
  time_point last_ts{};            // timestamp of the last record; guarded by meta_mu

  durable_segment() = default;
  durable_segment(const durable_segment&) = delete;
  durable_segment& operator=(const durable_segment&) = delete;
  ~durable_segment() {
    if (map != nullptr) ::munmap(const_cast<unsigned char*>(map), map_len);
    if (fd >= 0) ::close(fd);
  }
  void map_at_least(std::size_t len) {
    map_len = std::max<std::size_t>(len, 4096);
    void* m = ::mmap(nullptr, map_len, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) durable_fail(errc::store_error, "mmap " + path.string(), errno);
    map = static_cast<const unsigned char*>(m);
  }
};

struct durable_partition {
  std::filesystem::path dir;
  // Serializes appenders (record write, segment roll, retention). Held across
  // pwrite and the fdatasync of a segment being rolled, never by readers.
  std::mutex append_mu;
  // Guards `segments`, every segment's index/size/last_ts, and `begin`.
  // Readers hold it for a lookup only; appenders to publish a record.
  mutable std::mutex meta_mu;
  // Serializes fdatasync calls (group commit leader). Taken before append_mu, never after.
  std::mutex sync_mu;
  std::vector<std::shared_ptr<durable_segment>> segments;  // oldest first; guarded by meta_mu (changed under append_mu too)
  // Next offset an append gets = records visible to readers. Writer: appender
  // under append_mu and meta_mu (release after the record's pwrite and index
  // entry; pairs with the acquire in end_offset). Readers that need the
  // record itself read it under meta_mu.
  std::atomic<std::uint64_t> end{0};
  // Records below this are on disk (fdatasync returned). Writer: sync_to under
  // sync_mu (release; pairs with the acquire in durable_end and in append's
  // batch check). Invariant: synced <= end.
  std::atomic<std::uint64_t> synced{0};
  std::uint64_t begin = 0;           // earliest retained offset; guarded by meta_mu
  std::uint64_t bytes = 0;           // file bytes of all segments; guarded by append_mu
  time_point last_ts{};              // guarded by append_mu
  time_point oldest_unsynced{};      // batch interval start; guarded by append_mu
  std::string buf;                   // record being encoded; guarded by append_mu
};

/// The byte log: partitions of segment files, the lock file, group offset files.
/// Shared (shared_ptr) by the stream, its readers and its groups.
class durable_log {
 public:
  durable_log(std::filesystem::path dir, durable_options opt)
      : dir_(std::move(dir)), opt_(opt), clock_(opt.clk != nullptr ? opt.clk : &default_clock()) {
    if (opt_.segment_bytes < 4096 || opt_.segment_bytes > (std::size_t{1} << 31))
      durable_fail(errc::invalid_argument, "segment_bytes must be in [4 KiB, 2 GiB]");
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    if (ec) durable_fail(errc::store_error, "create " + dir_.string(), ec.value());
    lock_fd_ = ::open((dir_ / "LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd_ < 0) durable_fail(errc::store_error, "open LOCK", errno);
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(lock_fd_);
      lock_fd_ = -1;
      if (err == EWOULDBLOCK) durable_fail(errc::busy, dir_.string() + " is open in another durable_stream");
      durable_fail(errc::store_error, "flock LOCK", err);
    }
    POSTBOX_TRY { open_locked(); }
    POSTBOX_CATCH_ALL {
      release();
#if POSTBOX_HAS_EXCEPTIONS
      throw;
#endif
    }
  }
  durable_log(const durable_log&) = delete;
  durable_log& operator=(const durable_log&) = delete;
  /// Syncs (unless the policy is never), unmaps, closes, releases the lock.
  ~durable_log() {
    if (opt_.sync.mode != fsync_mode::never && !failed_.load(std::memory_order_relaxed)) {
      POSTBOX_TRY { sync(); }
      POSTBOX_CATCH_ALL {}
    }
    release();
  }

  /// Appends one record; returns its position. Blocks on the partition's
  /// append mutex and, per policy, on fdatasync. Allocates only when the
  /// record outgrows the reusable buffer or a segment rolls. Thread-safe.
  /// Throws error(store_error) on an I/O failure (the log then refuses appends).
  position append(std::string_view key, std::string_view payload) {
    if (failed_.load(std::memory_order_acquire))  // acquire: pairs with the release in mark_failed
      durable_fail(errc::store_error, "an earlier write or fdatasync failed; reopen the log");
    const auto body = durable_body_fixed + key.size() + payload.size();
    if (body > durable_max_body) durable_fail(errc::too_large, "record larger than 1 GiB");
    const auto p = stream_partition_of(key, parts_.size());
    auto& part = *parts_[p];
    std::uint64_t off = 0;
    bool sync_now = false;
    {
      std::lock_guard lock(part.append_mu);
      off = part.end.load(std::memory_order_relaxed);  // relaxed: only writers (under append_mu) store it
      const auto now = clock_->now();
      const auto ts = std::max(now, part.last_ts);
      auto& b = part.buf;
      b.resize(durable_header + body);
      auto* u = reinterpret_cast<unsigned char*>(b.data());
      store_le(u, static_cast<std::uint32_t>(body));
      store_le(u + 8, off);
      store_le(u + 16, static_cast<std::int64_t>(ts.time_since_epoch().count()));
      store_le(u + 24, static_cast<std::uint32_t>(key.size()));
      if (!key.empty()) std::memcpy(u + 28, key.data(), key.size());
      if (!payload.empty()) std::memcpy(u + 28 + key.size(), payload.data(), payload.size());
      std::uint32_t crc = crc32c(u, 4);
      crc = crc32c(u + 8, body, crc);
      store_le(u + 4, crc);

      auto seg = active_for(part, off, b.size());
      const auto at = seg->size;
      POSTBOX_TRY { write_all(seg->fd, b.data(), b.size(), static_cast<off_t>(at), "write record"); }
      POSTBOX_CATCH_ALL {
        if (::ftruncate(seg->fd, static_cast<off_t>(at)) != 0) mark_failed();  // cut a partial record
#if POSTBOX_HAS_EXCEPTIONS
        throw;
#endif
      }
      {
        std::lock_guard meta(part.meta_mu);
        seg->index.push_back(static_cast<std::uint32_t>(at));
        seg->size = at + b.size();
        seg->last_ts = ts;
        part.end.store(off + 1, std::memory_order_release);  // release: publishes the record; pairs with end_offset's acquire
      }
      part.bytes += b.size();
      part.last_ts = ts;
      if (opt_.sync.mode == fsync_mode::batch) {
        const auto synced = part.synced.load(std::memory_order_acquire);  // acquire: pairs with sync_to's release
        if (off <= synced) part.oldest_unsynced = now;
        const auto pending = off + 1 - std::min(synced, off + 1);
        sync_now = (opt_.sync.batch_records != 0 && pending >= opt_.sync.batch_records) ||
                   (opt_.sync.batch_interval.count() > 0 && now - part.oldest_unsynced >= opt_.sync.batch_interval);
      }
      apply_retention_locked(part, now);
    }
    if (opt_.sync.mode == fsync_mode::always || sync_now) sync_to(part, off + 1);
    return {p, off};
  }

  /// Makes every appended record durable (fdatasync of what is unsynced, in
  /// every partition), whatever the policy. Blocks on I/O. Thread-safe.
  void sync() {
    for (auto& part : parts_) sync_to(*part, part->end.load(std::memory_order_acquire));  // acquire: pairs with append
  }

  /// Makes records of `p` below `target` durable (group commit: one
  /// fdatasync covers every record written before it started).
  void sync_to(std::uint32_t p, std::uint64_t target) { sync_to(*parts_.at(p), target); }

  /// Applies retention to every partition now (drops whole segments). Thread-safe.
  void trim() {
    const auto now = clock_->now();
    for (auto& part : parts_) {
      std::lock_guard lock(part->append_mu);
      apply_retention_locked(*part, now);
    }
  }

  /// A visitor over raw records: `fn(offset, timestamp, key, payload) -> bool` (false stops).
  /// Reads records of `p` from `offset`, at most `max`, through the segment
  /// mappings. Returns ok, out_of_range (offset below retention; `earliest`
  /// set) or corrupt (a record failed its CRC: nothing from it is passed on).
  /// Takes meta_mu per segment lookup only. Never blocks appenders across I/O.
  template <class Fn>
  errc visit(std::uint32_t p, std::uint64_t offset, std::size_t max, std::uint64_t& earliest, Fn&& fn) const {
    check_partition(p);
    const auto& part = *parts_[p];
    const auto first = earliest_offset(p);
    earliest = first;
    if (offset < first) return errc::out_of_range;
    std::size_t done = 0;
    while (done < max) {
      std::shared_ptr<durable_segment> seg;
      std::uint64_t pos = 0;
      std::uint64_t seg_end = 0;
      {
        std::lock_guard meta(part.meta_mu);
        const auto end = part.end.load(std::memory_order_relaxed);  // relaxed: writers store it under meta_mu too
        if (offset >= end) return errc::ok;
        if (offset < part.begin) {  // dropped by retention after our check
          earliest = part.begin;
          return done == 0 ? errc::out_of_range : errc::ok;
        }
        auto it = std::upper_bound(part.segments.begin(), part.segments.end(), offset,
                                   [](std::uint64_t o, const auto& s) { return o < s->base; });
        seg = *(it - 1);
        pos = seg->index[offset - seg->base];
        seg_end = seg->base + seg->index.size();
      }
      for (; offset < seg_end && done < max; ++offset, ++done) {
        const unsigned char* r = seg->map + pos;
        const auto body = load_le<std::uint32_t>(r);
        std::uint32_t crc = crc32c(r, 4);
        crc = crc32c(r + 8, body, crc);
        if (crc != load_le<std::uint32_t>(r + 4) || load_le<std::uint64_t>(r + 8) != offset) return errc::corrupt;
        const auto ts = time_point(duration(load_le<std::int64_t>(r + 16)));
        const auto klen = load_le<std::uint32_t>(r + 24);
        const std::string_view key(reinterpret_cast<const char*>(r + 28), klen);
        const std::string_view payload(reinterpret_cast<const char*>(r + 28 + klen), body - durable_body_fixed - klen);
        pos += durable_header + body;
        if (!fn(offset, ts, key, payload)) return errc::ok;
      }
    }
    return errc::ok;
  }

  /// First retained offset of `p` (age applied against the clock). Takes meta_mu.
  [[nodiscard]] std::uint64_t earliest_offset(std::uint32_t p) const {
    check_partition(p);
    const auto& part = *parts_[p];
    std::lock_guard meta(part.meta_mu);
    if (opt_.keep.max_age.count() <= 0) return part.begin;
    return first_at_or_after_locked(part, clock_->now() - opt_.keep.max_age);
  }
  /// Offset the next append to `p` gets. Lock-free.
  [[nodiscard]] std::uint64_t end_offset(std::uint32_t p) const {
    check_partition(p);
    return parts_[p]->end.load(std::memory_order_acquire);  // acquire: pairs with the release in append
  }
  /// Records of `p` below this offset are known to be on disk (fdatasync returned). Lock-free.
  [[nodiscard]] std::uint64_t durable_end(std::uint32_t p) const {
    check_partition(p);
    return parts_[p]->synced.load(std::memory_order_acquire);  // acquire: pairs with the release in sync_to
  }
  /// First retained offset with timestamp >= t (end_offset when none). Takes meta_mu.
  [[nodiscard]] std::uint64_t offset_for_time(std::uint32_t p, time_point t) const {
    check_partition(p);
    std::uint64_t at = 0;
    {
      std::lock_guard meta(parts_[p]->meta_mu);
      at = first_at_or_after_locked(*parts_[p], t);
    }
    return std::max(at, earliest_offset(p));
  }
  /// Number of segment files of `p` (retention works by whole segments). Takes meta_mu.
  [[nodiscard]] std::size_t segment_count(std::uint32_t p) const {
    check_partition(p);
    std::lock_guard meta(parts_[p]->meta_mu);
    return parts_[p]->segments.size();
  }

  [[nodiscard]] std::size_t partitions() const noexcept { return parts_.size(); }
  [[nodiscard]] const clock& get_clock() const noexcept { return *clock_; }
  [[nodiscard]] const durable_options& options() const noexcept { return opt_; }
  [[nodiscard]] const durable_recovery& recovery() const noexcept { return recovery_; }
  [[nodiscard]] const std::filesystem::path& dir() const noexcept { return dir_; }

  void check_partition(std::uint32_t p) const {
    if (p >= parts_.size()) durable_fail(errc::invalid_argument, "no such partition");
  }

  /// The file that holds group `name`'s committed offsets.
  [[nodiscard]] std::filesystem::path group_file(const std::string& name) const {
    static constexpr char hex[] = "0123456789abcdef";
    std::string h;
    for (const char c : name) {
      h += hex[static_cast<unsigned char>(c) >> 4];
      h += hex[static_cast<unsigned char>(c) & 15U];
    }
    return dir_ / "groups" / ("g" + h + ".offsets");
  }

  /// Committed offsets of a group from its file (empty when there is none).
  /// Throws error(corrupt) when the file does not check out.
  [[nodiscard]] std::vector<std::uint64_t> load_group(const std::string& name) const {
    const auto text = read_whole_file(group_file(name));
    if (!text) return {};
    const auto n = parts_.size();
    const auto* u = reinterpret_cast<const unsigned char*>(text->data());
    if (text->size() != 12 + 8 * n + 4 || std::memcmp(u, "PBGO", 4) != 0 || load_le<std::uint64_t>(u + 4) != n ||
        crc32c(u, text->size() - 4) != load_le<std::uint32_t>(u + text->size() - 4))
      durable_fail(errc::corrupt, "group file of '" + name + "' does not check out");
    std::vector<std::uint64_t> out(n);
    for (std::size_t i = 0; i < n; ++i) out[i] = load_le<std::uint64_t>(u + 12 + 8 * i);
    return out;
  }

  /// Writes a group's committed offsets atomically (temp, fsync, rename, fsync
  /// dir; no fsync under the never policy). Blocks on I/O.
  void store_group(const std::string& name, const std::vector<std::uint64_t>& committed) const {
    std::string b(12 + 8 * committed.size() + 4, '\0');
    auto* u = reinterpret_cast<unsigned char*>(b.data());
    std::memcpy(u, "PBGO", 4);
    store_le(u + 4, static_cast<std::uint64_t>(committed.size()));
    for (std::size_t i = 0; i < committed.size(); ++i) store_le(u + 12 + 8 * i, committed[i]);
    store_le(u + b.size() - 4, crc32c(u, b.size() - 4));
    replace_file(group_file(name), b, opt_.sync.mode != fsync_mode::never);
  }

 private:
  void release() noexcept {
    parts_.clear();
    if (lock_fd_ >= 0) {
      ::flock(lock_fd_, LOCK_UN);
      ::close(lock_fd_);
      lock_fd_ = -1;
    }
  }

  void mark_failed() noexcept { failed_.store(true, std::memory_order_release); }  // release: pairs with append's acquire

  void sync_to(durable_partition& part, std::uint64_t target) {
    std::lock_guard s(part.sync_mu);
    if (part.synced.load(std::memory_order_relaxed) >= target) return;  // relaxed: only we (under sync_mu) store it
    std::vector<std::shared_ptr<durable_segment>> to_sync;
    std::uint64_t upto = 0;
    {
      std::lock_guard a(part.append_mu);
      std::lock_guard meta(part.meta_mu);
      upto = part.end.load(std::memory_order_relaxed);  // relaxed: under append_mu, the writers' mutex
      if (opt_.sync.mode == fsync_mode::never) {
        to_sync = part.segments;  // rolls did not sync: every segment may hold unsynced bytes
      } else if (!part.segments.empty()) {
        to_sync.push_back(part.segments.back());  // older segments were synced when they rolled
      }
    }
    for (const auto& seg : to_sync) {
      if (::fdatasync(seg->fd) != 0) {
        const int err = errno;
        mark_failed();  // after a failed fdatasync the page state is unknown: refuse further appends
        durable_fail(errc::store_error, "fdatasync " + seg->path.string(), err);
      }
    }
    part.synced.store(upto, std::memory_order_release);  // release: pairs with durable_end's acquire
  }

  // The segment the next record goes to, rolling when it would not fit. Caller holds append_mu.
  std::shared_ptr<durable_segment> active_for(durable_partition& part, std::uint64_t off, std::size_t rec) {
    std::shared_ptr<durable_segment> cur;
    {
      std::lock_guard meta(part.meta_mu);
      if (!part.segments.empty()) cur = part.segments.back();
    }
    if (cur && (cur->size == 0 || cur->size + rec <= opt_.segment_bytes) && cur->size + rec <= cur->map_len)
      return cur;
    if (cur && cur->size != 0 && opt_.sync.mode != fsync_mode::never && ::fdatasync(cur->fd) != 0) {
      const int err = errno;
      mark_failed();
      durable_fail(errc::store_error, "fdatasync " + cur->path.string(), err);
    }
    if (cur && cur->size == 0) {  // an empty active segment mapped too small for this record: map more
      std::lock_guard meta(part.meta_mu);  // no reader touches an empty segment's mapping
      ::munmap(const_cast<unsigned char*>(cur->map), cur->map_len);
      cur->map = nullptr;
      cur->map_at_least(rec);
      return cur;
    }
    auto seg = create_segment(part, off, rec);
    std::lock_guard meta(part.meta_mu);
    part.segments.push_back(seg);
    return seg;
  }

  std::shared_ptr<durable_segment> create_segment(durable_partition& part, std::uint64_t base, std::size_t rec) {
    auto seg = std::make_shared<durable_segment>();
    seg->base = base;
    seg->path = part.dir / segment_name(base);
    seg->fd = ::open(seg->path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (seg->fd < 0) durable_fail(errc::store_error, "create " + seg->path.string(), errno);
    seg->map_at_least(std::max(opt_.segment_bytes, rec));
    if (opt_.sync.mode != fsync_mode::never) fsync_dir(part.dir);  // the new name survives a crash
    return seg;
  }

  static std::string segment_name(std::uint64_t base) {
    std::string digits = std::to_string(base);
    return std::string(20 - digits.size(), '0') + digits + ".log";
  }

  // Drops whole non-active segments past retention. Caller holds append_mu.
  void apply_retention_locked(durable_partition& part, time_point now) {
    const auto& k = opt_.keep;
    if (k.max_count == 0 && k.max_bytes == 0 && k.max_age.count() <= 0) return;
    const auto end = part.end.load(std::memory_order_relaxed);  // relaxed: under append_mu, the writers' mutex
    std::vector<std::shared_ptr<durable_segment>> dropped;
    {
      std::lock_guard meta(part.meta_mu);
      while (part.segments.size() > 1) {
        const auto& oldest = part.segments.front();
        const auto next_base = part.segments[1]->base;
        // A segment goes once the records after it alone still satisfy the
        // limit: retention keeps at least max_count records / max_bytes bytes.
        const bool count = k.max_count != 0 && end - next_base >= k.max_count;
        const bool bytes = k.max_bytes != 0 && part.bytes - oldest->size >= k.max_bytes;
        const bool age = k.max_age.count() > 0 && oldest->last_ts < now - k.max_age;
        if (!count && !bytes && !age) break;
        part.bytes -= oldest->size;
        dropped.push_back(oldest);
        part.segments.erase(part.segments.begin());
        part.begin = next_base;
      }
    }
    // Unlinking keeps the mappings valid for readers still holding a segment.
    for (const auto& s : dropped) ::unlink(s->path.c_str());
  }

  // First offset with timestamp >= t among retained records. Caller holds meta_mu.
  static std::uint64_t first_at_or_after_locked(const durable_partition& part, time_point t) {
    for (const auto& seg : part.segments) {
      if (seg->index.empty() || seg->last_ts < t) continue;
      std::size_t lo = seg->base < part.begin ? static_cast<std::size_t>(part.begin - seg->base) : 0;
      std::size_t hi = seg->index.size();
      while (lo < hi) {
        const auto mid = lo + (hi - lo) / 2;
        const auto ts = load_le<std::int64_t>(seg->map + seg->index[mid] + 16);
        if (time_point(duration(ts)) < t) lo = mid + 1; else hi = mid;
      }
      return seg->base + lo;
    }
    return part.end.load(std::memory_order_relaxed);  // relaxed: readers of end under meta_mu see the latest store
  }

  void open_locked() {
    const auto meta_path = dir_ / "META";
    std::size_t n = opt_.partitions;
    if (const auto text = read_whole_file(meta_path)) {
      const std::string prefix = "postbox durable_stream 1 partitions ";
      if (text->rfind(prefix, 0) != 0) durable_fail(errc::corrupt, "META does not check out");
      const auto have = static_cast<std::size_t>(std::strtoull(text->c_str() + prefix.size(), nullptr, 10));
      if (have == 0) durable_fail(errc::corrupt, "META names no partitions");
      if (n != 0 && n != have)
        durable_fail(errc::invalid_argument, "the log has " + std::to_string(have) + " partitions, not " +
                                                 std::to_string(n));
      n = have;
    } else {
      if (n == 0 || n > (std::size_t{1} << 16)) durable_fail(errc::invalid_argument, "partitions must be in [1, 65536]");
      replace_file(meta_path, "postbox durable_stream 1 partitions " + std::to_string(n) + "\n", true);
    }
    std::error_code ec;
    std::filesystem::create_directories(dir_ / "groups", ec);
    if (ec) durable_fail(errc::store_error, "create groups directory", ec.value());
    recovery_.partitions.resize(n);
    parts_.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      parts_.push_back(std::make_unique<durable_partition>());
      auto& part = *parts_.back();
      // append rather than "p" + to_string: GCC 12 at -O2 flags the latter with a false -Wrestrict.
      part.dir = dir_ / std::string("p").append(std::to_string(i));
      std::filesystem::create_directories(part.dir, ec);
      if (ec) durable_fail(errc::store_error, "create " + part.dir.string(), ec.value());
      recover_partition(part, recovery_.partitions[i]);
    }
  }

  void recover_partition(durable_partition& part, durable_recovery::partition_report& report) {
    std::map<std::uint64_t, std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(part.dir)) {
      const auto name = e.path().filename().string();
      if (name.size() != 24 || name.substr(20) != ".log" ||
          name.find_first_not_of("0123456789") != 20)
        continue;
      files.emplace(std::strtoull(name.c_str(), nullptr, 10), e.path());
    }
    std::uint64_t expect = files.empty() ? 0 : files.begin()->first;
    part.begin = expect;
    std::size_t i = 0;
    for (const auto& [base, path] : files) {
      const bool last = ++i == files.size();
      if (base != expect) durable_fail(errc::corrupt, path.string() + " starts at " + std::to_string(base) +
                                                          ", expected " + std::to_string(expect));
      auto seg = std::make_shared<durable_segment>();
      seg->base = base;
      seg->path = path;
      seg->fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (seg->fd < 0) durable_fail(errc::store_error, "open " + path.string(), errno);
      struct stat st {};
      if (::fstat(seg->fd, &st) != 0) durable_fail(errc::store_error, "stat " + path.string(), errno);
      const auto file_size = static_cast<std::uint64_t>(st.st_size);
      seg->map_at_least(last ? std::max<std::uint64_t>(file_size, opt_.segment_bytes) : file_size);
      // Walk the records; the last segment is CRC-checked and cut at its first bad record.
      std::uint64_t pos = 0;
      while (pos + durable_header + durable_body_fixed <= file_size) {
        const unsigned char* r = seg->map + pos;
        const auto body = load_le<std::uint32_t>(r);
        if (body < durable_body_fixed || body > durable_max_body || pos + durable_header + body > file_size) break;
        if (load_le<std::uint64_t>(r + 8) != expect) break;
        if (load_le<std::uint32_t>(r + 24) > body - durable_body_fixed) break;
        if (last) {
          std::uint32_t crc = crc32c(r, 4);
          crc = crc32c(r + 8, body, crc);
          if (crc != load_le<std::uint32_t>(r + 4)) break;
        }
        seg->index.push_back(static_cast<std::uint32_t>(pos));
        seg->last_ts = time_point(duration(load_le<std::int64_t>(r + 16)));
        pos += durable_header + body;
        ++expect;
      }
      if (pos != file_size) {
        if (!last) durable_fail(errc::corrupt, path.string() + " has a bad record at byte " + std::to_string(pos));
        if (::ftruncate(seg->fd, static_cast<off_t>(pos)) != 0 || ::fdatasync(seg->fd) != 0)
          durable_fail(errc::store_error, "truncate torn tail of " + path.string(), errno);
        report.truncated_bytes += file_size - pos;
      }
      seg->size = pos;
      part.bytes += pos;
      if (!seg->index.empty()) part.last_ts = seg->last_ts;
      part.segments.push_back(std::move(seg));
    }
    // An empty non-first segment left by a crash right after a roll stays as the active one.
    report.segments = part.segments.size();
    report.records = expect - part.begin;
    part.end.store(expect, std::memory_order_release);     // release: before any reader exists; pairs with end_offset
    part.synced.store(expect, std::memory_order_release);  // what recovery found is what the disk holds
  }

  std::filesystem::path dir_;
  durable_options opt_;
  const clock* clock_;
  int lock_fd_ = -1;
  // Set once an I/O failure left a partition's file state unknown. Writer:
  // mark_failed (release; pairs with the acquire at the top of append).
  std::atomic<bool> failed_{false};
  durable_recovery recovery_;
  std::vector<std::unique_ptr<durable_partition>> parts_;
};

/// A durable consumer group: the shared bookkeeping
/// (detail/group_membership.hpp), the open log and the group's name (its
/// offsets file). `committed` is loaded from that file when the group opens.
struct durable_group_state : group_membership {
  durable_group_state(std::shared_ptr<durable_log> l, std::string n) : log(std::move(l)), name(std::move(n)) {}
  std::shared_ptr<durable_log> log;  // the log stays open while a member or handle does
  std::string name;
};

template <class T, class Codec>
read_result<T> durable_read(const durable_log& log, const Codec& codec, std::uint32_t p, std::uint64_t offset,
                            std::size_t max) {
  read_result<T> r;
  r.partition = p;
  errc decode_status = errc::ok;
  const auto st = log.visit(p, offset, max, r.earliest,
                            [&](std::uint64_t o, time_point ts, std::string_view key, std::string_view payload) {
                              auto v = codec.decode(payload);
                              if (!v) {
                                decode_status = v.status();
                                return false;
                              }
                              r.records.push_back(record<T>{{p, o}, ts, std::string(key), std::move(*v)});
                              return true;
                            });
  r.status = st != errc::ok ? st : decode_status;
  return r;
}

}  // namespace detail

template <class T, class Codec>
class durable_group_member;

/// A partitioned, replayable log on disk with the API of postbox::stream<T>:
/// records survive a restart, consumer groups' committed offsets persist.
/// `Codec` turns T into bytes and back (durable_codec). All members are
/// thread-safe. One process may open a directory at a time: a second open
/// (also in the same process) throws error(errc::busy).
///
/// Lifetime: readers, group handles and members share the open log, so they
/// may outlive this object; the directory stays locked until the last goes.
template <class T, class Codec = string_codec>
  requires durable_codec<Codec, T>
class durable_stream {
 public:
  /// Opens (creating if needed) the log in `dir`, recovering it: every
  /// segment is indexed, the last one's torn tail is truncated (see
  /// recovery()). Blocks on I/O; allocates. Throws error(busy) when another
  /// durable_stream holds the directory, error(corrupt) for damage that is
  /// not a torn tail, error(invalid_argument) for bad options, error(store_error) on I/O failure.
  explicit durable_stream(const std::filesystem::path& dir, durable_options opt = {}, Codec codec = {})
      : log_(std::make_shared<detail::durable_log>(dir, opt)), codec_(std::move(codec)) {}
  durable_stream(const durable_stream&) = delete;
  durable_stream& operator=(const durable_stream&) = delete;

  /// Appends `value` under `key` to partition stream_partition_of(key, partitions).
  /// Blocks on the partition's append mutex and, per the fsync policy, on
  /// fdatasync (always: before returning). Allocates what the codec does.
  /// Throws error(store_error) on I/O failure, error(too_large) over 1 GiB.
  position append(std::string_view key, const T& value) {
    const auto& bytes = codec_.encode(value);
    return log_->append(key, std::string_view(bytes));
  }

  /// fdatasync of everything appended so far, whatever the policy. Blocks on I/O.
  void sync() { log_->sync(); }
  /// Applies retention now (whole segments). Takes each partition's append mutex.
  void trim() { log_->trim(); }

  /// Decodes up to `max` records of `partition` from `offset`, reading the
  /// segment mapping. Status out_of_range (below retention, `earliest` set),
  /// corrupt (a record failed its CRC), or the codec's status when decoding
  /// fails; records before the failing one are returned. Never blocks on
  /// appenders' I/O; allocates the result. Throws error(invalid_argument) for a bad partition.
  [[nodiscard]] read_result<T> read(std::uint32_t partition, std::uint64_t offset, std::size_t max) const {
    return detail::durable_read<T>(*log_, codec_, partition, offset, max);
  }
  /// First retained offset of `partition` (age applied). Takes a partition mutex briefly.
  [[nodiscard]] std::uint64_t earliest_offset(std::uint32_t partition) const { return log_->earliest_offset(partition); }
  /// Offset the next append to `partition` gets. Lock-free.
  [[nodiscard]] std::uint64_t end_offset(std::uint32_t partition) const { return log_->end_offset(partition); }
  /// Records of `partition` below this are known to be on disk: what an OS crash or power loss keeps. Lock-free.
  [[nodiscard]] std::uint64_t durable_end(std::uint32_t partition) const { return log_->durable_end(partition); }
  /// First retained offset with timestamp >= t (end_offset when none). O(log n).
  [[nodiscard]] std::uint64_t offset_for_time(std::uint32_t partition, time_point t) const {
    return log_->offset_for_time(partition, t);
  }
  /// Segment files of `partition`.
  [[nodiscard]] std::size_t segment_count(std::uint32_t partition) const { return log_->segment_count(partition); }
  /// Partition count.
  [[nodiscard]] std::size_t partitions() const noexcept { return log_->partitions(); }
  /// The stream's clock.
  [[nodiscard]] const clock& get_clock() const noexcept { return log_->get_clock(); }
  /// What opening found: records and truncated tail bytes per partition.
  [[nodiscard]] const durable_recovery& recovery() const noexcept { return log_->recovery(); }

  /// A reader over all partitions (non-destructive). Not thread-safe itself:
  /// one reader per thread. Shares the log.
  class reader {
   public:
    /// Decodes up to `max` records, partitions in turn; an error status names
    /// the partition (records already read are returned first, the error on the next poll).
    [[nodiscard]] read_result<T> poll(std::size_t max = 64) {
      read_result<T> out;
      for (std::size_t i = 0; i < next_.size() && out.records.size() < max; ++i) {
        const auto p = static_cast<std::uint32_t>((rr_ + i) % next_.size());
        auto r = detail::durable_read<T>(*log_, *codec_, p, next_[p], max - out.records.size());
        next_[p] += r.records.size();
        for (auto& rec : r.records) out.records.push_back(std::move(rec));
        if (!r.ok()) {
          if (out.records.empty()) {
            r.records.clear();
            return r;
          }
          break;
        }
      }
      rr_ = (rr_ + 1) % next_.size();
      return out;
    }
    /// Moves this reader's position in `partition`.
    void seek(std::uint32_t partition, std::uint64_t offset) { next_.at(partition) = offset; }
    /// This reader's next offset in `partition`.
    [[nodiscard]] std::uint64_t position_of(std::uint32_t partition) const { return next_.at(partition); }

   private:
    friend class durable_stream;
    reader(std::shared_ptr<detail::durable_log> log, std::shared_ptr<const Codec> codec, start_from from)
        : log_(std::move(log)), codec_(std::move(codec)), next_(log_->partitions()) {
      for (std::uint32_t p = 0; p < next_.size(); ++p) {
        switch (from.where) {
          case start_from::kind::earliest: next_[p] = log_->earliest_offset(p); break;
          case start_from::kind::latest: next_[p] = log_->end_offset(p); break;
          case start_from::kind::offset: next_[p] = from.offset; break;
          case start_from::kind::time: next_[p] = log_->offset_for_time(p, from.time); break;
        }
      }
    }
    std::shared_ptr<detail::durable_log> log_;
    std::shared_ptr<const Codec> codec_;
    std::vector<std::uint64_t> next_;
    std::size_t rr_ = 0;
  };

  /// A new reader starting at `from`. Allocates.
  [[nodiscard]] reader read_from(start_from from = start_from::earliest()) const {
    return reader(log_, std::make_shared<const Codec>(codec_), from);
  }

  /// Handle on a consumer group whose committed offsets persist in the log's directory.
  class consumer_group {
   public:
    /// Joins a new member; rebalances (round-robin in join order). Allocates; thread-safe.
    [[nodiscard]] durable_group_member<T, Codec> join() { return durable_group_member<T, Codec>(g_, codec_); }
    /// Committed offset of `partition` (next record to consume). Thread-safe.
    [[nodiscard]] std::uint64_t committed(std::uint32_t partition) const {
      std::lock_guard lock(g_->mu);
      return g_->committed.at(partition);
    }
    /// Exact lag of `partition`: end_offset - committed, at one instant of the group lock.
    [[nodiscard]] std::uint64_t lag(std::uint32_t partition) const {
      std::lock_guard lock(g_->mu);
      const auto end = g_->log->end_offset(partition);
      const auto c = g_->committed.at(partition);
      return end > c ? end - c : 0;
    }
    /// Sum of lag over all partitions.
    [[nodiscard]] std::uint64_t lag() const {
      std::uint64_t total = 0;
      for (std::uint32_t p = 0; p < g_->committed.size(); ++p) total += lag(p);
      return total;
    }
    /// Current member count.
    [[nodiscard]] std::size_t member_count() const {
      std::lock_guard lock(g_->mu);
      return g_->members.size();
    }
    /// Members, generation, committed offset, end and lag per partition. Allocates.
    [[nodiscard]] stream_group_stats stats() const {
      stream_group_stats out;
      std::lock_guard lock(g_->mu);
      out.members = g_->members.size();
      out.generation = g_->generation.load(std::memory_order_relaxed);  // relaxed: under mu, writers hold mu
      for (std::uint32_t p = 0; p < g_->committed.size(); ++p) {
        const auto end = g_->log->end_offset(p);
        const auto c = g_->committed[p];
        const auto lag = end > c ? end - c : 0;
        out.partitions.push_back(stream_partition_lag{p, c, end, lag});
        out.lag += lag;
      }
      return out;
    }

   private:
    friend class durable_stream;
    consumer_group(std::shared_ptr<detail::durable_group_state> g, std::shared_ptr<const Codec> codec)
        : g_(std::move(g)), codec_(std::move(codec)) {}
    std::shared_ptr<detail::durable_group_state> g_;
    std::shared_ptr<const Codec> codec_;
  };

  /// The consumer group `name`: loaded from its offsets file, or created with
  /// committed offsets at each partition's earliest retained offset. A
  /// committed offset above the log's end (records lost to a power loss
  /// under `never`) is lowered to the end. Takes a mutex; allocates once;
  /// throws error(corrupt) if the group's file does not check out.
  [[nodiscard]] consumer_group group(const std::string& name) {
    std::lock_guard lock(groups_mu_);
    auto& g = groups_[name];
    if (!g) {
      auto fresh = std::make_shared<detail::durable_group_state>(log_, name);
      fresh->committed = log_->load_group(name);
      if (fresh->committed.empty()) {
        fresh->committed.resize(log_->partitions());
        for (std::uint32_t p = 0; p < log_->partitions(); ++p) fresh->committed[p] = log_->earliest_offset(p);
      } else {
        for (std::uint32_t p = 0; p < log_->partitions(); ++p)
          fresh->committed[p] = std::min(fresh->committed[p], log_->end_offset(p));
      }
      g = std::move(fresh);
    }
    return consumer_group(g, std::make_shared<const Codec>(codec_));
  }

 private:
  std::shared_ptr<detail::durable_log> log_;
  Codec codec_;
  std::mutex groups_mu_;
  std::map<std::string, std::shared_ptr<detail::durable_group_state>> groups_;
};

/// A durable consumer group's member (RAII: destroying it leaves the group).
/// Use from one thread at a time; different members are independent.
template <class T, class Codec>
class durable_group_member {
 public:
  durable_group_member(durable_group_member&& o) noexcept
      : g_(std::move(o.g_)), codec_(std::move(o.codec_)), cur_(std::move(o.cur_)) {}
  durable_group_member& operator=(durable_group_member&&) = delete;
  durable_group_member(const durable_group_member&) = delete;
  durable_group_member& operator=(const durable_group_member&) = delete;
  /// Leaves the group (rebalances). Takes the group mutex.
  ~durable_group_member() { leave(); }

  /// Leaves now (idempotent); uncommitted progress is abandoned.
  void leave() {
    if (!g_) return;
    // Ours may be the group's last reference: keep it alive until the group
    // lock is released.
    const std::shared_ptr<detail::durable_group_state> g = std::move(g_);
    cur_.leave(*g);
  }

  /// Decodes up to `max` records from this member's partitions, continuing
  /// after what it polled before; after a rebalance it resumes from the
  /// committed offsets. Errors as durable_stream::read. Allocates the result.
  [[nodiscard]] read_result<T> poll(std::size_t max = 64) {
    read_result<T> out;
    if (!g_) return out;
    cur_.refresh_if_rebalanced(*g_);
    const auto& parts = cur_.parts();
    for (std::size_t i = 0; i < parts.size() && out.records.size() < max; ++i) {
      auto r = detail::durable_read<T>(*g_->log, *codec_, parts[i], cur_.positions()[i], max - out.records.size());
      cur_.advance(i, r.records.size());
      for (auto& rec : r.records) out.records.push_back(std::move(rec));
      if (!r.ok()) {
        if (out.records.empty()) {
          r.records.clear();
          return r;
        }
        break;
      }
    }
    return out;
  }

  /// Commits everything polled so far and persists the group's offsets
  /// (first making the committed records durable, unless the policy is
  /// never). An offset never moves backwards (a member that sought back
  /// commits nothing lower) nor past the log's end. errc::ok; errc::conflict
  /// after a rebalance since this member's last poll (nothing committed);
  /// errc::not_found after leave(). Blocks on I/O under the group mutex.
  /// Throws error(store_error) when the offsets file cannot be written (the
  /// in-memory offsets then stay as they were).
  [[nodiscard]] errc commit() {
    if (!g_) return errc::not_found;
    std::lock_guard lock(g_->mu);
    if (g_->generation.load(std::memory_order_relaxed) != cur_.generation()) return errc::conflict;  // relaxed: under mu
    auto next = g_->committed;
    const auto& parts = cur_.parts();
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const auto p = parts[i];
      next[p] = std::max(next[p], std::min(cur_.positions()[i], g_->log->end_offset(p)));
    }
    if (next == g_->committed) return errc::ok;
    if (g_->log->options().sync.mode != fsync_mode::never)
      for (std::uint32_t p = 0; p < next.size(); ++p)
        if (next[p] != g_->committed[p]) g_->log->sync_to(p, next[p]);
    g_->log->store_group(g_->name, next);
    g_->committed = std::move(next);
    return errc::ok;
  }

  /// Moves this member's position in an assigned partition. Returns false if not assigned.
  bool seek(std::uint32_t partition, std::uint64_t offset) { return cur_.seek(partition, offset); }
  /// Partitions assigned to this member (refreshed after a rebalance).
  [[nodiscard]] const std::vector<std::uint32_t>& assignment() {
    return cur_.assignment(g_.get());
  }
  /// This member's next offset per assigned partition (parallel to assignment()).
  [[nodiscard]] const std::vector<std::uint64_t>& positions() const noexcept { return cur_.positions(); }
  /// The generation this member's assignment belongs to.
  [[nodiscard]] std::uint64_t generation() const noexcept { return cur_.generation(); }

 private:
  template <class U, class C>
    requires durable_codec<C, U>
  friend class durable_stream;
  durable_group_member(std::shared_ptr<detail::durable_group_state> g, std::shared_ptr<const Codec> codec)
      : g_(std::move(g)), codec_(std::move(codec)) {
    cur_.join(*g_);
  }

  std::shared_ptr<detail::durable_group_state> g_;
  std::shared_ptr<const Codec> codec_;
  detail::group_cursor cur_;  // id, generation, assignment and positions
};

POSTBOX_END_NAMESPACE
