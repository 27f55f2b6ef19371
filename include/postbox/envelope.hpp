// SPDX-License-Identifier: MIT
// The message contract: message_id (UUIDv7), message_kind, trace_context, header_map and envelope<T>.
// Design notes (id layout, monotonicity, JSON form, errors): docs/design/envelope.md
#pragma once

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/random.hpp>
#include <postbox/detail/relocation.hpp>

#include <atomic>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

namespace detail {

/// Value of a hex digit (either case), or -1.
[[nodiscard]] constexpr int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

[[nodiscard]] constexpr bool is_lower_hex(char c) noexcept {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

inline constexpr char lower_hex_digits[] = "0123456789abcdef";

/// Milliseconds since the Unix epoch of `t`, clamped to the 48 bits a UUIDv7
/// timestamp holds (times before 1970 become 0).
[[nodiscard]] constexpr std::uint64_t uuid7_millis(time_point t) noexcept {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  if (ms <= 0) return 0;
  constexpr std::uint64_t max48 = (std::uint64_t{1} << 48) - 1;
  return static_cast<std::uint64_t>(ms) > max48 ? max48 : static_cast<std::uint64_t>(ms);
}

/// The last (timestamp, sequence) handed out in this process, packed as
/// `millis << 16 | seq16`. Every generator advances it with one CAS, so its
/// modification order IS the order of ids: strictly increasing, process-wide.
/// Writers and readers: message_id::generate on any thread (seq_cst CAS loop;
/// the RMW itself provides the ordering, no other data is published through
/// it). Invariant: only ever increases.
inline std::atomic<std::uint64_t> uuid7_last{0};

}  // namespace detail

/// A 128-bit message id, laid out as a UUIDv7 (RFC 9562): 48-bit Unix
/// milliseconds, version 7, a 16-bit per-millisecond sequence (12 bits in
/// rand_a, 4 at the top of rand_b), variant 0b10, 58 random bits.
/// Ids from `generate` are strictly increasing within a process, across all
/// threads. Trivially copyable; default-constructed is the nil id.
class message_id {
 public:
  /// The nil id (all zero bits). Never allocates.
  constexpr message_id() noexcept = default;
  /// An id from its two 64-bit halves (big-endian order: `high` is bytes 0..7).
  constexpr message_id(std::uint64_t high, std::uint64_t low) noexcept : high_(high), low_(low) {}

  /// A fresh UUIDv7 stamped with the real clock. Strictly greater than every
  /// id generated before it in this process. Lock-free (one CAS loop), never
  /// allocates after the calling thread's first call. Thread-safe.
  [[nodiscard]] static message_id generate() noexcept { return generate(default_clock()); }

  /// A fresh UUIDv7 stamped with `clk.now()`. Monotonicity wins over the
  /// clock: if `clk` reads earlier than the last id's millisecond (a manual or
  /// skewed clock), the id carries the last id's millisecond. When more than
  /// 2^15 ids are drawn in one millisecond, the sequence carries into the
  /// timestamp (RFC 9562 §6.2, method 1). Thread-safe, lock-free.
  [[nodiscard]] static message_id generate(const clock& clk) noexcept { return generate_at(clk.now()); }

  /// As `generate(clk)`, stamped with `now`, a time the caller just read
  /// from its clock: one read can serve both a new envelope's id and its
  /// `occurred_at`. Same guarantees. Thread-safe, lock-free.
  [[nodiscard]] static message_id generate_at(time_point now) noexcept {
    const std::uint64_t millis = detail::uuid7_millis(now);
    std::uint64_t random = 0;
    std::uint64_t extra = 0;
    POSTBOX_TRY {
      auto& rng = detail::thread_rng();
      random = rng();
      extra = rng();
    }
    POSTBOX_CATCH_ALL {  // no entropy source at all: still unique, less random
      random = detail::splitmix64(fallback_seed());
      extra = detail::splitmix64(fallback_seed());
    }
    // A new millisecond starts its sequence at a random value below 2^15, so
    // at least 2^15 ids fit in every millisecond before the carry.
    const std::uint64_t fresh = (millis << 16) | (random >> 49);
    std::uint64_t last = detail::uuid7_last.load();
    std::uint64_t next = 0;
    do {
      next = fresh > last ? fresh : last + 1;
    } while (!detail::uuid7_last.compare_exchange_weak(last, next));
    const std::uint64_t ms = next >> 16;
    const std::uint64_t seq = next & 0xffffu;
    const std::uint64_t high = (ms << 16) | 0x7000u | (seq >> 4);
    const std::uint64_t low = (std::uint64_t{0b10} << 62) | ((seq & 0xfu) << 58) | (random & ((std::uint64_t{1} << 49) - 1));
    // 58 random bits: 49 from the first draw, 9 from the second.
    return message_id(high, low | ((extra >> 55) << 49));
  }

  /// Parses the canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
  /// (hex digits of either case; any version). Empty optional on anything
  /// else. Never allocates, never throws. Thread-safe.
  [[nodiscard]] static constexpr std::optional<message_id> parse(std::string_view text) noexcept {
    if (text.size() != 36) return std::nullopt;
    std::uint64_t half[2] = {0, 0};
    int nibble = 0;
    for (std::size_t i = 0; i < 36; ++i) {
      const char c = text[i];
      if (i == 8 || i == 13 || i == 18 || i == 23) {
        if (c != '-') return std::nullopt;
        continue;
      }
      const int v = detail::hex_value(c);
      if (v < 0) return std::nullopt;
      auto& h = half[nibble / 16];
      h = (h << 4) | static_cast<std::uint64_t>(v);
      ++nibble;
    }
    return message_id(half[0], half[1]);
  }

  /// Lower-case canonical text form (36 characters). Allocates the string.
  [[nodiscard]] std::string to_string() const {
    std::string out(36, '-');
    write_to(out.data());
    return out;
  }

  /// Writes the 36-character canonical form to `out` (no terminator).
  /// Never allocates. Thread-safe.
  constexpr void write_to(char* out) const noexcept {
    std::size_t pos = 0;
    for (int nib = 0; nib < 32; ++nib) {
      if (nib == 8 || nib == 12 || nib == 16 || nib == 20) out[pos++] = '-';
      const std::uint64_t h = nib < 16 ? high_ : low_;
      const int shift = 60 - 4 * (nib % 16);
      out[pos++] = detail::lower_hex_digits[(h >> shift) & 0xf];
    }
  }

  /// True for the nil id. Never allocates.
  [[nodiscard]] constexpr bool is_nil() const noexcept { return high_ == 0 && low_ == 0; }
  /// Bytes 0..7 as a big-endian integer.
  [[nodiscard]] constexpr std::uint64_t high() const noexcept { return high_; }
  /// Bytes 8..15 as a big-endian integer.
  [[nodiscard]] constexpr std::uint64_t low() const noexcept { return low_; }
  /// The UUID version field (7 for generated ids, 0 for nil).
  [[nodiscard]] constexpr unsigned version() const noexcept { return static_cast<unsigned>((high_ >> 12) & 0xf); }

  /// The millisecond embedded in a UUIDv7 (meaningless for other versions).
  [[nodiscard]] constexpr time_point timestamp() const noexcept {
    return time_point(std::chrono::milliseconds(static_cast<std::int64_t>(high_ >> 16)));
  }

  /// Ordering by (high, low): for generated ids this is generation order.
  friend constexpr auto operator<=>(const message_id&, const message_id&) = default;

 private:
  static std::uint64_t& fallback_seed() noexcept {
    thread_local std::uint64_t seed = reinterpret_cast<std::uintptr_t>(&seed) ^ 0x5bd1e9955bd1e995ULL;
    return seed;
  }

  std::uint64_t high_ = 0;
  std::uint64_t low_ = 0;
};

static_assert(std::is_trivially_copyable_v<message_id>, "message_id travels by memcpy in stores and rings");
static_assert(sizeof(message_id) == 16, "message_id is exactly 128 bits");

/// What a message asks of its receiver.
enum class message_kind {
  command,  ///< do something (one handler)
  event,    ///< something happened (any number of subscribers)
  query,    ///< answer something (expects a reply)
  reply,    ///< the answer to a command or query
};

/// Stable lower-case name: "command", "event", "query", "reply".
/// Never allocates. Thread-safe.
[[nodiscard]] constexpr std::string_view to_string(message_kind kind) noexcept {
  switch (kind) {
    case message_kind::command: return "command";
    case message_kind::event: return "event";
    case message_kind::query: return "query";
    case message_kind::reply: return "reply";
  }
  return "unknown";
}

/// The kind named by `text` (as `to_string` spells it), or empty.
[[nodiscard]] constexpr std::optional<message_kind> parse_message_kind(std::string_view text) noexcept {
  if (text == "command") return message_kind::command;
  if (text == "event") return message_kind::event;
  if (text == "query") return message_kind::query;
  if (text == "reply") return message_kind::reply;
  return std::nullopt;
}

/// W3C Trace Context carried with a message: `traceparent`
/// (`00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`) and `tracestate`
/// (vendor list). Both empty means "no trace". Build one through `parse` to
/// get a validated value; the fields are public so codecs can fill them.
/// A plain value: not thread-safe, allocates for its strings.
struct trace_context {
  std::string traceparent;
  std::string tracestate;

  /// True when `text` is a valid traceparent: lower-case hex, version not
  /// `ff`, trace-id and parent-id not all zero; version 00 must be exactly 55
  /// characters, later versions may append `-...`. Never allocates.
  [[nodiscard]] static constexpr bool is_valid_traceparent(std::string_view text) noexcept {
    if (text.size() < 55) return false;
    if (text[2] != '-' || text[35] != '-' || text[52] != '-') return false;
    auto hex_run = [&](std::size_t from, std::size_t n, bool& all_zero) {
      all_zero = true;
      for (std::size_t i = from; i < from + n; ++i) {
        if (!detail::is_lower_hex(text[i])) return false;
        if (text[i] != '0') all_zero = false;
      }
      return true;
    };
    bool zero = false;
    if (!hex_run(0, 2, zero)) return false;
    if (text.substr(0, 2) == "ff") return false;
    if (text.substr(0, 2) == "00" && text.size() != 55) return false;
    if (text.size() > 55 && text[55] != '-') return false;
    if (!hex_run(3, 32, zero) || zero) return false;
    if (!hex_run(36, 16, zero) || zero) return false;
    if (!hex_run(53, 2, zero)) return false;
    return true;
  }

  /// True when `text` is a valid tracestate list: at most 32 comma-separated
  /// `key=value` members (optional spaces/tabs around commas, empty members
  /// allowed), W3C key and value grammar, no duplicate keys. Empty is valid.
  /// Never allocates.
  [[nodiscard]] static constexpr bool is_valid_tracestate(std::string_view text) noexcept {
    std::string_view keys[32] = {};
    std::size_t members = 0;
    std::size_t pos = 0;
    while (pos <= text.size()) {
      std::size_t end = text.find(',', pos);
      if (end == std::string_view::npos) end = text.size();
      std::string_view member = text.substr(pos, end - pos);
      while (!member.empty() && (member.front() == ' ' || member.front() == '\t')) member.remove_prefix(1);
      while (!member.empty() && (member.back() == ' ' || member.back() == '\t')) member.remove_suffix(1);
      if (!member.empty()) {
        const std::size_t eq = member.find('=');
        if (eq == std::string_view::npos) return false;
        const std::string_view key = member.substr(0, eq);
        if (!valid_tracestate_key(key) || !valid_tracestate_value(member.substr(eq + 1))) return false;
        if (members == 32) return false;
        for (std::size_t i = 0; i < members; ++i) {
          if (keys[i] == key) return false;
        }
        keys[members++] = key;
      }
      pos = end + 1;
    }
    return true;
  }

  /// A validated trace context, or empty if either part is invalid. An empty
  /// `traceparent` with an empty `tracestate` is the valid "no trace" value;
  /// a tracestate without a traceparent is rejected. Allocates. Thread-safe.
  [[nodiscard]] static std::optional<trace_context> parse(std::string_view traceparent,
                                                          std::string_view tracestate = {}) {
    if (traceparent.empty() && tracestate.empty()) return trace_context{};
    if (!is_valid_traceparent(traceparent) || !is_valid_tracestate(tracestate)) return std::nullopt;
    return trace_context{std::string(traceparent), std::string(tracestate)};
  }

  /// A new trace (fresh random trace-id and parent-id) with the sampled flag
  /// as given. Allocates. Thread-safe.
  [[nodiscard]] static trace_context generate(bool sampled = true) {
    auto& rng = detail::thread_rng();
    std::uint64_t a = 0, b = 0, c = 0;
    while (a == 0 && b == 0) a = rng(), b = rng();
    while (c == 0) c = rng();
    std::string out = "00-";
    append_hex(out, a);
    append_hex(out, b);
    out += '-';
    append_hex(out, c);
    out += sampled ? "-01" : "-00";
    return trace_context{std::move(out), {}};
  }

  /// True when there is no trace (empty traceparent). Never allocates.
  [[nodiscard]] bool empty() const noexcept { return traceparent.empty(); }
  /// True when both parts are valid (or both empty). Never allocates.
  [[nodiscard]] bool valid() const noexcept {
    if (traceparent.empty()) return tracestate.empty();
    return is_valid_traceparent(traceparent) && is_valid_tracestate(tracestate);
  }
  /// The 32-hex trace-id, or empty if the traceparent is invalid.
  [[nodiscard]] std::string_view trace_id() const noexcept {
    return is_valid_traceparent(traceparent) ? std::string_view(traceparent).substr(3, 32) : std::string_view{};
  }
  /// The 16-hex parent-id (span id), or empty if the traceparent is invalid.
  [[nodiscard]] std::string_view parent_id() const noexcept {
    return is_valid_traceparent(traceparent) ? std::string_view(traceparent).substr(36, 16) : std::string_view{};
  }
  /// The trace-flags byte (0 if the traceparent is invalid).
  [[nodiscard]] std::uint8_t flags() const noexcept {
    if (!is_valid_traceparent(traceparent)) return 0;
    return static_cast<std::uint8_t>(detail::hex_value(traceparent[53]) * 16 + detail::hex_value(traceparent[54]));
  }
  /// The sampled bit of the flags.
  [[nodiscard]] bool sampled() const noexcept { return (flags() & 1u) != 0; }

  /// The same trace with a fresh parent-id (span), for a hop that creates
  /// its own span; tracestate is kept. Empty stays empty. Allocates.
  [[nodiscard]] trace_context child() const {
    if (!is_valid_traceparent(traceparent)) return *this;
    std::uint64_t span = 0;
    while (span == 0) span = detail::thread_rng()();
    std::string out = "00-";
    out.append(trace_id());
    out += '-';
    append_hex(out, span);
    out += '-';
    out.append(std::string_view(traceparent).substr(53, 2));
    return trace_context{std::move(out), tracestate};
  }

  /// Both strings equal.
  friend bool operator==(const trace_context&, const trace_context&) = default;

 private:
  static void append_hex(std::string& out, std::uint64_t v) {
    for (int shift = 60; shift >= 0; shift -= 4) out += detail::lower_hex_digits[(v >> shift) & 0xf];
  }
  static constexpr bool key_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '*' || c == '/';
  }
  static constexpr bool valid_tracestate_key(std::string_view key) noexcept {
    const std::size_t at = key.find('@');
    if (at == std::string_view::npos) {
      if (key.empty() || key.size() > 256 || !(key[0] >= 'a' && key[0] <= 'z')) return false;
      return std::all_of(key.begin(), key.end(), key_char);
    }
    const std::string_view tenant = key.substr(0, at);
    const std::string_view system = key.substr(at + 1);
    if (tenant.empty() || tenant.size() > 241 || system.empty() || system.size() > 14) return false;
    if (!((tenant[0] >= 'a' && tenant[0] <= 'z') || (tenant[0] >= '0' && tenant[0] <= '9'))) return false;
    if (!(system[0] >= 'a' && system[0] <= 'z')) return false;
    return std::all_of(tenant.begin(), tenant.end(), key_char) && std::all_of(system.begin(), system.end(), key_char);
  }
  static constexpr bool valid_tracestate_value(std::string_view value) noexcept {
    if (value.empty() || value.size() > 256) return false;
    for (const char c : value) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x20 || u > 0x7e || c == ',' || c == '=') return false;
    }
    return value.back() != ' ';
  }
};

/// A small string-to-string map kept sorted by key: cheap to iterate for
/// the handful of headers a message carries; lookups are binary searches.
/// Keys compare byte-wise (case-sensitive; postbox's own names in
/// `header_names` are lower-case).
///
/// Copies share one immutable block of entries (reference counted): copying
/// a map, as every copy of an envelope does (a topic's fan-out, a
/// requester's reply-to header on every request), allocates nothing and
/// makes one atomic increment. The first change to a shared copy copies the
/// block for that copy alone (copy on write); a change to an unshared map
/// works in place. A value type: copies may be read, changed and destroyed
/// on different threads at once; one map is not thread-safe.
class header_map {
 public:
  using value_type = std::pair<std::string, std::string>;
  using const_iterator = const value_type*;

  /// An empty map. Never allocates.
  header_map() noexcept = default;
  /// A map from a list of pairs; later duplicates replace earlier ones.
  header_map(std::initializer_list<value_type> items) {
    for (const auto& [k, v] : items) set(k, v);
  }
  /// Shares `other`'s entries: no allocation, one atomic increment.
  header_map(const header_map& other) noexcept : block_(other.block_) {
    // relaxed: `other` holds a reference, so the count cannot reach zero
    // meanwhile; nothing is published through the increment.
    if (block_ != nullptr) block_->refs.fetch_add(1, std::memory_order_relaxed);
  }
  /// Takes `other`'s entries; `other` is left empty. Never allocates.
  header_map(header_map&& other) noexcept : block_(std::exchange(other.block_, nullptr)) {}
  header_map& operator=(const header_map& other) noexcept {
    header_map(other).swap(*this);
    return *this;
  }
  header_map& operator=(header_map&& other) noexcept {
    header_map(std::move(other)).swap(*this);
    return *this;
  }
  ~header_map() { release(block_); }
  void swap(header_map& other) noexcept { std::swap(block_, other.block_); }

  /// Inserts `key` or replaces its value. Allocates (one block for the
  /// entries, grown by doubling), unless `key` already has this value (then
  /// nothing changes, a shared map stays shared). If an allocation throws,
  /// the map is unchanged.
  void set(std::string_view key, std::string_view value) {
    const const_iterator found = find(key);
    if (found != end() && found->second == value) return;
    // Read once: a block this map alone holds stays so (no other map can
    // gain it but through this one); a shared one may become unique
    // meanwhile, and is then copied anyway, which is still right.
    const bool own = unique();
    if (found != end() && own) {
      block_->items()[found - begin()].second.assign(value);
      return;
    }
    const auto at = static_cast<std::size_t>(lower_bound(key) - begin());
    const bool replace = found != end();
    // Everything that can throw comes first: the new entry, then (for a
    // shared or full block) the new block; the moves after it cannot throw.
    value_type entry{std::string(key), std::string(value)};
    const std::size_t n = size();
    if (!replace && own && n < block_->capacity) {
      value_type* items = block_->items();
      if (at == n) {
        ::new (static_cast<void*>(items + n)) value_type(std::move(entry));
      } else {
        ::new (static_cast<void*>(items + n)) value_type(std::move(items[n - 1]));
        for (std::size_t i = n - 1; i > at; --i) items[i] = std::move(items[i - 1]);
        items[at] = std::move(entry);
      }
      ++block_->size;
      return;
    }
    const std::size_t want = replace ? n : n + 1;
    block* next = make_filled(want <= 2 ? 4 : 2 * want, [&](block* b) {
      if (own) {  // a full block of our own: its entries move
        fill(b, std::move_iterator(block_->items()), at, std::move(entry), replace, n);
      } else {  // shared (or none): its entries are copied, as a change to a copy must
        fill(b, begin(), at, std::move(entry), replace, n);
      }
    });
    release(std::exchange(block_, next));
  }
  /// The value of `key`, viewing into the map (valid until it changes).
  [[nodiscard]] std::optional<std::string_view> get(std::string_view key) const noexcept {
    const auto it = find(key);
    if (it != end()) return std::string_view(it->second);
    return std::nullopt;
  }
  /// Removes `key`; returns whether it was present. Allocates (a copy of
  /// the other entries) only to remove from a shared map.
  bool erase(std::string_view key) {
    const const_iterator found = find(key);
    if (found == end()) return false;
    const auto at = static_cast<std::size_t>(found - begin());
    const std::size_t n = size();
    if (unique()) {
      value_type* items = block_->items();
      for (std::size_t i = at; i + 1 < n; ++i) items[i] = std::move(items[i + 1]);
      items[n - 1].~value_type();
      --block_->size;
      return true;
    }
    block* next = make_filled(n, [&](block* b) {
      for (std::size_t i = 0; i < n; ++i) {
        if (i == at) continue;
        ::new (static_cast<void*>(b->items() + b->size)) value_type(begin()[i]);
        ++b->size;
      }
    });
    release(std::exchange(block_, next));
    return true;
  }
  /// Whether `key` is present. Never allocates.
  [[nodiscard]] bool contains(std::string_view key) const noexcept { return find(key) != end(); }
  /// Number of headers. Never allocates.
  [[nodiscard]] std::size_t size() const noexcept { return block_ != nullptr ? block_->size : 0; }
  /// True when there are no headers. Never allocates.
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }
  /// Removes every header (an unshared map keeps its block). Never allocates.
  void clear() noexcept {
    if (block_ == nullptr) return;
    if (unique()) {
      destroy_entries(block_);
    } else {
      release(std::exchange(block_, nullptr));
    }
  }
  /// Iteration in ascending key order.
  [[nodiscard]] const_iterator begin() const noexcept { return block_ != nullptr ? block_->items() : nullptr; }
  [[nodiscard]] const_iterator end() const noexcept { return begin() + size(); }

  /// Same keys with the same values.
  friend bool operator==(const header_map& a, const header_map& b) noexcept {
    return a.block_ == b.block_ || std::equal(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  /// One allocation: this header, then `capacity` entries, the first `size`
  /// of them constructed, in ascending key order.
  struct alignas(value_type) block {
    /// Maps sharing this block. Incremented (relaxed) by a copy; decremented
    /// (acq_rel) by a map letting go, whose release half pairs with the
    /// acquire of the last owner's decrement (its delete follows every other
    /// owner's reads) and with the acquire load in unique() (a change in
    /// place follows every former owner's reads).
    std::atomic<std::size_t> refs{1};
    std::size_t size = 0;
    std::size_t capacity = 0;

    /// The entries' storage, right after this header (as std::vector's
    /// storage, entries are constructed in it one by one).
    value_type* items() noexcept {
      return reinterpret_cast<value_type*>(reinterpret_cast<unsigned char*>(this) + sizeof(block));
    }
  };
  static_assert(sizeof(block) % alignof(value_type) == 0, "entries follow the block header, aligned");

  static block* make_block(std::size_t capacity) {
    void* raw = ::operator new(sizeof(block) + capacity * sizeof(value_type));
    block* b = ::new (raw) block;
    b->capacity = capacity;
    return b;
  }
  static void destroy_entries(block* b) noexcept {
    for (std::size_t i = 0; i < b->size; ++i) b->items()[i].~value_type();
    b->size = 0;
  }
  static void destroy(block* b) noexcept {
    destroy_entries(b);
    b->~block();
    ::operator delete(static_cast<void*>(b));
  }
  /// A fresh block of `capacity` entries that `fill_in(block*)` constructs,
  /// counting each in its size; if that throws, the block and what was
  /// built in it are destroyed and the exception goes on.
  template <class F>
  static block* make_filled(std::size_t capacity, F&& fill_in) {
    block* b = make_block(capacity);
    POSTBOX_TRY { fill_in(b); }
    POSTBOX_CATCH_ALL {
      destroy(b);
      POSTBOX_RETHROW;
    }
    return b;
  }
  static void release(block* b) noexcept {
    // acq_rel: see block::refs.
    if (b != nullptr && b->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) destroy(b);
  }
  /// Fills the fresh block `next` with the `n` entries from `from` and
  /// `entry` at index `at` (replacing entry `at` when `replace`). Only the
  /// copies `from` makes can throw; what was built is destroyed by
  /// make_filled, since next->size counts it.
  template <class It>
  static void fill(block* next, It from, std::size_t at, value_type&& entry, bool replace, std::size_t n) {
    value_type* out = next->items();
    for (std::size_t i = 0; i < n; ++i, ++from) {
      if (i == at) {
        ::new (static_cast<void*>(out + next->size)) value_type(std::move(entry));
        ++next->size;
        if (replace) continue;
      }
      ::new (static_cast<void*>(out + next->size)) value_type(*from);
      ++next->size;
    }
    if (at == n) {
      ::new (static_cast<void*>(out + next->size)) value_type(std::move(entry));
      ++next->size;
    }
  }
  [[nodiscard]] bool unique() const noexcept {
    // acquire: see block::refs. Only this map holds the block when it reads
    // 1, and no other can gain it but through this map.
    return block_ != nullptr && block_->refs.load(std::memory_order_acquire) == 1;
  }
  [[nodiscard]] const_iterator lower_bound(std::string_view key) const noexcept {
    return std::lower_bound(begin(), end(), key, key_less);
  }
  [[nodiscard]] const_iterator find(std::string_view key) const noexcept {
    const const_iterator it = lower_bound(key);
    return it != end() && it->first == key ? it : end();
  }
  static bool key_less(const value_type& item, std::string_view key) noexcept {
    return std::string_view(item.first) < key;
  }

  block* block_ = nullptr;
};

/// Header names postbox itself reads or writes.
namespace header_names {
/// Where a reply to this request goes (a channel or topic name).
inline constexpr std::string_view reply_to = "reply-to";
/// Media type of the payload, e.g. "application/json".
inline constexpr std::string_view content_type = "content-type";
/// Client-chosen key that makes a request idempotent.
inline constexpr std::string_view idempotency_key = "idempotency-key";
/// Why a message was dead-lettered (an errc name or a handler's reason).
inline constexpr std::string_view dead_letter_reason = "dead-letter-reason";
/// Human-readable error text attached to a dead letter.
inline constexpr std::string_view dead_letter_error = "dead-letter-error";
/// The channel, topic or stream a dead letter came from (for redrive).
inline constexpr std::string_view dead_letter_source = "dead-letter-source";
/// Attempts made in every earlier round, summed (decimal).
inline constexpr std::string_view dead_letter_attempts = "dead-letter-attempts";
/// How many times the message was redriven (decimal).
inline constexpr std::string_view dead_letter_redrives = "dead-letter-redrives";
/// First failure ever, nanoseconds since the Unix epoch (decimal).
inline constexpr std::string_view dead_letter_first_failure = "dead-letter-first-failure";
/// Last failure before the redrive, nanoseconds since the Unix epoch (decimal).
inline constexpr std::string_view dead_letter_last_failure = "dead-letter-last-failure";
}  // namespace header_names

namespace detail {
/// A payload argument that is really a clock would make the overloads with
/// an explicit type name ambiguous; those overloads exclude it.
template <class T>
concept not_a_clock = !std::is_base_of_v<clock, std::remove_cvref_t<T>>;
// Static members only: a payload may well have a data member of that name.
template <class T>
concept has_message_type = requires { std::string_view(T::message_type); } &&
                           !std::is_member_pointer_v<decltype(&T::message_type)>;
template <class T>
concept has_schema_version = requires { static_cast<std::uint32_t>(T::schema_version); } &&
                             !std::is_member_pointer_v<decltype(&T::schema_version)>;
}  // namespace detail

/// The message type name and schema version of payload type `T`: from
/// `T::message_type` (anything convertible to string_view) and
/// `T::schema_version` when present, else "" and 1. Specialize it for types
/// you cannot change. Never allocates. Thread-safe.
template <class T>
struct message_traits {
  /// The type name, e.g. "order.placed"; empty when `T` declares none.
  [[nodiscard]] static constexpr std::string_view type_name() noexcept {
    if constexpr (detail::has_message_type<T>) {
      return std::string_view(T::message_type);
    } else {
      return {};
    }
  }
  /// The schema version `T` represents (1 when it declares none).
  [[nodiscard]] static constexpr std::uint32_t schema_version() noexcept {
    if constexpr (detail::has_schema_version<T>) {
      return static_cast<std::uint32_t>(T::schema_version);
    } else {
      return 1;
    }
  }
};

/// A message: metadata plus a typed payload. A plain aggregate (designated
/// initializers work); copying copies the payload. Build one with
/// `make_envelope`, `caused_by` or `reply_to` so the id, time and
/// correlation are filled in. Not thread-safe (a plain value).
template <class T>
struct envelope {
  using payload_type = T;

  message_id id;                                ///< unique, time-ordered
  std::string type;                             ///< message type name, e.g. "order.placed"
  std::uint32_t schema_version = 1;             ///< version of the payload schema
  message_kind kind = message_kind::event;      ///< command, event, query or reply
  time_point occurred_at{};                     ///< when the producer created it
  message_id correlation_id;                    ///< the conversation; = id for an original
  message_id causation_id;                      ///< the message that caused this one; nil for an original
  std::string producer;                         ///< who produced it (service or component name)
  std::string partition_key;                    ///< ordering key: same key, same order
  std::string tenant;                           ///< owner scope
  trace_context trace;                          ///< W3C trace context
  std::optional<time_point> deadline;           ///< not started after this time
  std::uint32_t attempt = 0;                    ///< deliveries started so far
  header_map headers;                           ///< extra string metadata
  T payload;                                    ///< the message body

  /// True when a deadline is set and `now` is at or past it. Never allocates.
  [[nodiscard]] bool expired(time_point now) const noexcept { return deadline.has_value() && *deadline <= now; }
};

namespace detail {
/// A new original message with an explicit type name and kind: the fresh id
/// and `occurred_at` both from `now` (one clock read, made by the caller),
/// correlation id = its own id, causation nil, schema version from
/// `message_traits`. Allocates only what `type` already holds.
template <class T>
[[nodiscard]] envelope<std::decay_t<T>> make_envelope_at(std::string type, T&& payload, message_kind kind,
                                                         time_point now) {
  using U = std::decay_t<T>;
  const message_id id = message_id::generate_at(now);
  return envelope<U>{.id = id,
                     .type = std::move(type),
                     .schema_version = message_traits<U>::schema_version(),
                     .kind = kind,
                     .occurred_at = now,
                     .correlation_id = id,
                     .causation_id = {},
                     .producer = {},
                     .partition_key = {},
                     .tenant = {},
                     .trace = {},
                     .deadline = {},
                     .attempt = 0,
                     .headers = {},
                     .payload = std::forward<T>(payload)};
}
}  // namespace detail

/// A new original message for `payload`: fresh id, `occurred_at =
/// clk.now()`, correlation id = its own id, causation nil, type and schema
/// version from `message_traits`. Allocates (strings). Thread-safe.
template <class T>
[[nodiscard]] envelope<std::decay_t<T>> make_envelope(T&& payload, const clock& clk = default_clock()) {
  return detail::make_envelope_at(std::string(message_traits<std::decay_t<T>>::type_name()), std::forward<T>(payload),
                                  message_kind::event, clk.now());
}

/// As above, with an explicit type name and kind (the schema version still
/// comes from `message_traits`). Allocates. Thread-safe.
template <class T>
  requires detail::not_a_clock<T>
[[nodiscard]] envelope<std::decay_t<T>> make_envelope(std::string type, T&& payload,
                                                      message_kind kind = message_kind::event,
                                                      const clock& clk = default_clock()) {
  return detail::make_envelope_at(std::move(type), std::forward<T>(payload), kind, clk.now());
}

namespace detail {
// A copy of `s` that makes no call when it is empty (the usual case for a
// derived envelope's partition key, tenant and trace): a copy of an empty
// std::string still calls its out-of-line construction.
inline std::string copy_if_set(const std::string& s) { return s.empty() ? std::string() : s; }
inline trace_context copy_if_set(const trace_context& t) {
  return trace_context{copy_if_set(t.traceparent), copy_if_set(t.tracestate)};
}
// The move counterparts: a move of an empty std::string still copies its
// terminator through an out-of-line memcpy call.
inline std::string move_if_set(std::string& s) noexcept { return s.empty() ? std::string() : std::move(s); }
inline trace_context move_if_set(trace_context& t) noexcept {
  return trace_context{move_if_set(t.traceparent), move_if_set(t.tracestate)};
}

/// `*from` moved field by field, each string only when it is set: what the
/// envelope's own move constructor does, without a call per empty string
/// (a reply usually has four: partition key, tenant and the trace's two).
/// Converts to the envelope, so `optional::emplace(relocated_envelope{&e})`
/// builds it in place from the conversion's result.
template <class T>
struct relocated_envelope {
  envelope<T>* from;
  operator envelope<T>() const noexcept(std::is_nothrow_move_constructible_v<T>) {  // NOLINT(google-explicit-constructor)
    envelope<T>& e = *from;
    return envelope<T>{.id = e.id,
                       .type = move_if_set(e.type),
                       .schema_version = e.schema_version,
                       .kind = e.kind,
                       .occurred_at = e.occurred_at,
                       .correlation_id = e.correlation_id,
                       .causation_id = e.causation_id,
                       .producer = move_if_set(e.producer),
                       .partition_key = move_if_set(e.partition_key),
                       .tenant = move_if_set(e.tenant),
                       .trace = move_if_set(e.trace),
                       .deadline = e.deadline,
                       .attempt = e.attempt,
                       .headers = std::move(e.headers),
                       .payload = std::move(e.payload)};
  }
};

/// A channel of envelopes takes each one out of its slot field by field
/// (see slot_relocation): a request or an event usually has four empty
/// strings, each of which its own move would copy through a call.
template <class T>
struct slot_relocation<envelope<T>> {
  static relocated_envelope<T> source(envelope<T>& e) noexcept { return {&e}; }
};

/// As `derive` below, with the fresh id and `occurred_at` both from `now`
/// (one clock read, made by the caller).
template <class U, class P>
envelope<U> derive_at(const envelope<P>& parent, std::string type, U&& payload, message_kind kind, time_point now) {
  const message_id id = message_id::generate_at(now);
  return envelope<U>{.id = id,
                     .type = std::move(type),
                     .schema_version = message_traits<U>::schema_version(),
                     .kind = kind,
                     .occurred_at = now,
                     .correlation_id = parent.correlation_id.is_nil() ? parent.id : parent.correlation_id,
                     .causation_id = parent.id,
                     .producer = {},
                     .partition_key = copy_if_set(parent.partition_key),
                     .tenant = copy_if_set(parent.tenant),
                     .trace = copy_if_set(parent.trace),
                     .deadline = parent.deadline,
                     .attempt = 0,
                     .headers = {},
                     .payload = std::move(payload)};
}

template <class U, class P>
envelope<U> derive(const envelope<P>& parent, std::string type, U&& payload, message_kind kind, const clock& clk) {
  return derive_at<U>(parent, std::move(type), std::move(payload), kind, clk.now());
}
}  // namespace detail

/// A message caused by `parent` (an event a command produced, a follow-up
/// command): fresh id and time, correlation = the parent's correlation (or
/// its id if it has none), causation = the parent's id; trace, deadline,
/// tenant and partition key are kept; producer, headers and attempt are not.
/// Kind `event`; type from `message_traits`. Allocates. Thread-safe.
template <class T, class P>
[[nodiscard]] envelope<std::decay_t<T>> caused_by(const envelope<P>& parent, T&& payload,
                                                  const clock& clk = default_clock()) {
  using U = std::decay_t<T>;
  return detail::derive<U>(parent, std::string(message_traits<U>::type_name()), U(std::forward<T>(payload)),
                           message_kind::event, clk);
}

/// As above with an explicit type name and kind.
template <class T, class P>
  requires detail::not_a_clock<T>
[[nodiscard]] envelope<std::decay_t<T>> caused_by(const envelope<P>& parent, std::string type, T&& payload,
                                                  message_kind kind = message_kind::event,
                                                  const clock& clk = default_clock()) {
  using U = std::decay_t<T>;
  return detail::derive<U>(parent, std::move(type), U(std::forward<T>(payload)), kind, clk);
}

/// The reply to `request`: like `caused_by`, with kind `reply`. Type from
/// `message_traits`. Allocates. Thread-safe.
template <class T, class Q>
[[nodiscard]] envelope<std::decay_t<T>> reply_to(const envelope<Q>& request, T&& payload,
                                                 const clock& clk = default_clock()) {
  using U = std::decay_t<T>;
  return detail::derive<U>(request, std::string(message_traits<U>::type_name()), U(std::forward<T>(payload)),
                           message_kind::reply, clk);
}

/// As above with an explicit type name.
template <class T, class Q>
  requires detail::not_a_clock<T>
[[nodiscard]] envelope<std::decay_t<T>> reply_to(const envelope<Q>& request, std::string type, T&& payload,
                                                 const clock& clk = default_clock()) {
  using U = std::decay_t<T>;
  return detail::derive<U>(request, std::move(type), U(std::forward<T>(payload)), message_kind::reply, clk);
}

POSTBOX_END_NAMESPACE

/// Hash of a message id (mixes both halves). Never allocates.
template <>
struct std::hash<postbox::message_id> {
  std::size_t operator()(const postbox::message_id& id) const noexcept {
    std::uint64_t x = id.high() ^ postbox::detail::rotl64(id.low(), 29);
    x = (x ^ (x >> 32)) * 0xd6e8feb86659fd93ULL;
    x = (x ^ (x >> 32)) * 0xd6e8feb86659fd93ULL;
    return static_cast<std::size_t>(x ^ (x >> 32));
  }
};
