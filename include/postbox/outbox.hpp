// SPDX-License-Identifier: MIT
// Transactional outbox: stage envelopes in the caller's store transaction; a relay publishes them in order per key, at least once.
// Design notes (leases, per-key order, crash points, retention, wake-up): docs/design/outbox.md
#pragma once

#include <postbox/channel.hpp>
#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/metrics.hpp>
#include <postbox/retry.hpp>
#include <postbox/store.hpp>
#include <postbox/stream.hpp>
#include <postbox/topic.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/chrono.hpp>
#include <postbox/detail/dependent.hpp>
#include <postbox/detail/random.hpp>

#include <atomic>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#  include <climits>
#  include <cstdlib>
#  include <fcntl.h>
#  include <sys/file.h>
#  include <sys/stat.h>
#  include <unistd.h>
#  define POSTBOX_OUTBOX_POSIX 1
#else
#  define POSTBOX_OUTBOX_POSIX 0
#endif

POSTBOX_BEGIN_NAMESPACE

/// A codec for envelopes of payload `T`: `encode(env)` gives the text the
/// outbox stores; `decode<T>(text)` gives something with `has_value()`,
/// `status()` and `operator*` yielding the envelope (`postbox::json::codec`
/// in <postbox/json.hpp> is one; so is any type returning `result<envelope<T>>`).
template <class C, class T>
concept envelope_codec = requires(const C& c, const envelope<T>& env, std::string_view text) {
  { c.encode(env) } -> std::convertible_to<std::string>;
  { c.template decode<T>(text).has_value() } -> std::convertible_to<bool>;
  { c.template decode<T>(text).status() } -> std::convertible_to<errc>;
  { *c.template decode<T>(text) } -> std::convertible_to<const envelope<T>&>;
};

/// What a postbox envelope codec would refuse in an envelope's own fields:
/// the code, the field and why. `code == ok` when nothing is wrong.
struct envelope_problem {
  errc code = errc::ok;
  std::string_view field;
  std::string_view why;
};

/// Checks `env` by the rules `json::decode<T>` applies to the envelope's own
/// fields, so an envelope that passes reads back (payload aside): a non-nil
/// id (`invalid_argument`), a non-empty type (`bad_type`), a valid W3C
/// traceparent and a tracestate only with one (`bad_type`), and, when `T`
/// declares its type (`message_traits<T>`), that type (`unknown_type`) and
/// schema version (`unsupported_version`). Never allocates. Thread-safe.
template <class T>
[[nodiscard]] envelope_problem check_envelope(const envelope<T>& env) noexcept {
  if (env.id.is_nil()) return {errc::invalid_argument, "id", "must not be nil"};
  if (env.type.empty()) return {errc::bad_type, "type", "must not be empty (declare T::message_type or pass a type)"};
  if (!env.trace.traceparent.empty() && !trace_context::is_valid_traceparent(env.trace.traceparent))
    return {errc::bad_type, "traceparent", "not a valid W3C traceparent"};
  if (!env.trace.tracestate.empty() &&
      (env.trace.traceparent.empty() || !trace_context::is_valid_tracestate(env.trace.tracestate)))
    return {errc::bad_type, "tracestate", "not a valid W3C tracestate (or no traceparent)"};
  constexpr std::string_view declared = message_traits<T>::type_name();
  if (!declared.empty()) {
    if (env.type != declared) return {errc::unknown_type, "type", "differs from the type the payload declares"};
    if (env.schema_version != message_traits<T>::schema_version())
      return {errc::unsupported_version, "schema_version", "differs from the version the payload declares"};
  }
  return {};
}

/// Stages outgoing envelopes in a store transaction, next to the caller's
/// own writes: the message exists exactly when the transaction commits.
/// `Codec` encodes envelopes (see `envelope_codec`).
///
/// **Example** (SQLite; see examples/outbox.cpp):
///   postbox::sqlite_store db("orders.db");
///   postbox::outbox out(db, postbox::json::codec{});
///   auto tx = db.begin();
///   tx.exec("INSERT INTO orders(id, cents) VALUES (?1, ?2)", id, cents);
///   out.stage(tx, postbox::make_envelope(order_placed{id, cents}));
///   tx.commit();   // both rows or neither
///
/// Thread-safe (it holds no state of its own beyond the codec, which must be
/// safe to call concurrently); each call allocates.
template <outbox_store Store, class Codec>
class outbox {
 public:
  using transaction = typename Store::transaction;

  /// An outbox on `store` (not owned; must outlive it); `staged_at` is read
  /// from `clk`.
  explicit outbox(Store& store, Codec codec = {}, const clock& clk = default_clock())
      : store_(&store), codec_(std::move(codec)), clock_(&clk) {}

  /// Checks `env` (`check_envelope`), encodes it and adds it to `tx`. Returns `ok`; the check's
  /// code for an envelope the relay could never read back (e.g. `bad_type`
  /// for an empty type: such a row would block its key); `invalid_argument`
  /// (the codec threw), `conflict` (the id is already in the outbox or its
  /// dead letters) or a store error. Any failure dooms `tx`: its commit rolls
  /// back and returns that error, so business rows never commit without
  /// their message. Allocates; blocks on the store's I/O.
  template <class T>
    requires envelope_codec<Codec, T>
  [[nodiscard]] errc stage(transaction& tx, const envelope<T>& env) {
    return stage_impl<false>(tx, env, time_point{});
  }

  /// As `stage`, for publication at `due` (outbox clock) or later: durable
  /// scheduling. The row is stored now, in `tx`; a relay does not publish it
  /// before `due` (it wakes for it: `relay_step::next_due`), also after a
  /// restart. Until it is due the row does NOT hold its partition key: rows
  /// of the key staged after it are published first, and at `due` it goes
  /// out in staging order with what is still pending of its key. Revoke it
  /// by not committing `tx`, or later by deleting the row yourself; the
  /// in-process `scheduler` is the revocable, non-durable form. Allocates;
  /// blocks on the store's I/O.
  template <class T>
    requires envelope_codec<Codec, T>
  [[nodiscard]] errc stage_at(transaction& tx, const envelope<T>& env, time_point due) {
    return stage_impl<false>(tx, env, due);
  }
  /// `stage_at(tx, env, now + delay)` on the outbox clock.
  template <class T>
    requires envelope_codec<Codec, T>
  [[nodiscard]] errc stage_after(transaction& tx, const envelope<T>& env, duration delay) {
    return stage_impl<false>(tx, env, clock_->now() + delay);
  }

  /// As `stage`, and also decodes what it encoded before adding it, so a
  /// payload whose serializer and deserializer disagree is refused too (the
  /// decode's code, e.g. `bad_type` on "payload"). Costs one decode per
  /// message (about 1.7 times the encode with the JSON codec; see
  /// docs/design/outbox.md) and needs `T` to be decodable. Allocates; blocks
  /// on the store's I/O.
  template <class T>
    requires envelope_codec<Codec, T>
  [[nodiscard]] errc stage_round_trip(transaction& tx, const envelope<T>& env) {
    return stage_impl<true>(tx, env, time_point{});
  }

  /// Adds an already encoded message (its `sequence` is assigned by the
  /// store; `staged_at` is set from the clock when left at its default;
  /// `m.due` schedules it as `stage_at` does).
  /// Same results as `stage`, without the envelope check: the caller vouches
  /// that `m.body` decodes (a row that does not is dead-lettered by the relay).
  [[nodiscard]] errc stage_encoded(transaction& tx, stored_message m) {
    if (m.staged_at == time_point{}) m.staged_at = clock_->now();
    return store_->outbox_stage(tx, m);
  }

  /// The store.
  [[nodiscard]] Store& store() const noexcept { return *store_; }
  /// The codec.
  [[nodiscard]] const Codec& codec() const noexcept { return codec_; }

 private:
  // RoundTrip is a template parameter so that `stage` never instantiates a
  // decode (a producer's payload type need not be decodable).
  template <bool RoundTrip, class T>
  errc stage_impl(transaction& tx, const envelope<T>& env, time_point due) {
    if (const envelope_problem p = check_envelope(env); p.code != errc::ok) {
      tx.fail(p.code, "outbox: message " + env.id.to_string() + " cannot be read back: " + std::string(p.field) +
                          ": " + std::string(p.why));
      return p.code;
    }
    stored_message m;
    m.id = env.id;
    m.type = env.type;
    m.partition_key = env.partition_key;
    m.correlation_id = env.correlation_id;
    m.causation_id = env.causation_id;
    m.staged_at = clock_->now();
    m.due = due;
    bool encoded = false;
    POSTBOX_TRY {
      m.body = codec_.encode(env);
      encoded = true;
    }
    POSTBOX_CATCH_ALL {}
    if (!encoded) {
      tx.fail(errc::invalid_argument, "outbox: the codec could not encode message " + env.id.to_string());
      return errc::invalid_argument;
    }
    if constexpr (RoundTrip) {
      auto back = codec_.template decode<T>(m.body);
      if (!back.has_value()) {
        const errc code = back.status() == errc::ok ? errc::parse_error : back.status();
        std::string text = "outbox: message " + env.id.to_string() + " does not decode back: " +
                           std::string(to_string(code));
        if constexpr (requires { back.error().field; back.error().message; }) {
          const auto& e = back.error();
          text += (e.field.empty() ? std::string() : " at '" + e.field + "'") + ": " + e.message;
        }
        tx.fail(code, text);
        return code;
      }
    }
    return store_->outbox_stage(tx, m);
  }

  Store* store_;
  Codec codec_;
  const clock* clock_;
};

/// Where a relay publishes: called once per message, in order per key;
/// returns `ok` when the message is published; a code that
/// `relay_options::is_permanent` calls permanent moves the row to the outbox
/// dead letters at once, anything else has it retried later (an exception
/// counts as `handler_error`, transient).
using outbox_destination = std::function<errc(const stored_message&)>;

/// A destination that may block (e.g. on a full channel): it gets the
/// relay's stop token and returns `canceled` when it is stopped first; the
/// relay then releases the row without counting an attempt.
using outbox_stoppable_destination = std::function<errc(const stored_message&, std::stop_token)>;

/// A destination that takes a whole leased batch at once (to pipeline it):
/// it fills `results[i]` for `batch[i]`, `ok` only once that message is
/// published. A key's messages must reach the destination in batch order;
/// once one of a key fails the relay ignores the results of that key's later
/// messages (it releases them unmarked, retried in order), so the destination
/// should stop sending them. `canceled` when the stop token fired first.
/// The relay renews the batch's lease only after the call: one that outlasts
/// the lease lets another relay lease and publish the same rows meanwhile
/// (same ids), so keep a batch's worst case well below the lease.
using outbox_batch_destination =
    std::function<void(std::span<const stored_message> batch, std::span<errc> results, std::stop_token)>;

/// The default `relay_options::is_permanent`: the codes that retrying cannot
/// change, i.e. a body the codec refuses (`parse_error`, `too_deep`,
/// `too_large`, `missing_field`, `bad_type`, `invalid_utf8`, `unknown_type`,
/// `unsupported_version`) and `invalid_argument` (e.g. an envelope NATS
/// headers cannot carry). Never allocates. Thread-safe.
[[nodiscard]] constexpr bool outbox_permanent_error(errc code) noexcept {
  switch (code) {
    case errc::parse_error:
    case errc::too_deep:
    case errc::too_large:
    case errc::missing_field:
    case errc::bad_type:
    case errc::invalid_utf8:
    case errc::unknown_type:
    case errc::unsupported_version:
    case errc::invalid_argument: return true;
    default: return false;
  }
}

/// The reason of a row dead-lettered because it failed `max_attempts` times
/// (a permanent failure uses its errc name, e.g. "bad_type").
inline constexpr std::string_view outbox_retries_exhausted = "retries_exhausted";

/// Points in a relay's batch, reported to `relay_options::on_point` (for
/// observation and for crash tests that stop a process exactly there).
enum class relay_point {
  claimed,        ///< a non-empty batch was leased
  published,      ///< the destination accepted one message (not yet marked)
  before_mark,    ///< every message of the batch was tried; marking comes next
  marked,         ///< the published messages are marked dispatched
};

/// Settings of an outbox_relay. A plain value.
struct relay_options {
  /// Most messages leased and published per batch; also the bound on
  /// duplicates after a crash.
  std::size_t batch_size = 64;
  /// How long a claimed batch stays leased to this relay. Before each
  /// publish, once half of it has passed on the relay's clock, the relay
  /// renews the lease of the rows it still holds (`outbox_renew`); if another
  /// relay has re-leased any of them, or the lease has run out without a
  /// renewal, the batch stops there and the rest is released.
  duration lease = std::chrono::seconds(30);
  /// Fallback wake-up period, for commits made by other processes (commits
  /// in this process wake the relay at once).
  duration poll_interval = std::chrono::seconds(1);
  /// Dispatched rows are deleted once they are older than this.
  duration retention = std::chrono::hours(1);
  /// How often the relay deletes expired dispatched rows.
  duration purge_interval = std::chrono::minutes(1);
  /// Backoff of a failing destination (per message: `attempts` so far).
  /// Its `max_attempts` is ignored; the relay's own `max_attempts` counts.
  retry_policy retry{.max_attempts = 0,
                     .initial_backoff = std::chrono::milliseconds(100),
                     .multiplier = 2.0,
                     .max_backoff = std::chrono::seconds(30),
                     .full_jitter = true};
  /// Failed publishes of one row after which it moves to the outbox dead
  /// letters (reason "retries_exhausted"), so the rest of its key is
  /// published. 0: retry forever (the key waits). The default, with the
  /// default backoff, gives a destination outage about 47 minutes before the
  /// head row of each waiting key is dead-lettered (redrive it afterwards).
  std::uint32_t max_attempts = 100;
  /// Which destination results are permanent: such a row is dead-lettered
  /// at its first failure, with the code's name as reason. Empty:
  /// `outbox_permanent_error`. Called on the relay's thread; must not throw.
  std::function<bool(errc)> is_permanent{};
  /// Lease owner name; must be unique among running relays on one database.
  /// Empty: a name that survives restarts, `<hostname>:<executable path>:<store>#<slot>`
  /// (`<store>` is the SQLite path made canonical, or the
  /// memory store's address), so a relay restarted after a crash reclaims its
  /// predecessor's leases at once. The slot is the lowest one not held by a
  /// running relay of the same name on this host (a lock file in the temp
  /// directory for a SQLite store, held while the relay lives), so two
  /// processes never share a name; without a usable lock file the name is
  /// random (as before: a crashed relay's leases then wait out `lease`).
  std::string owner{};
  /// Release this relay's leases when it stops (`stop()`, destruction), so
  /// another relay may take its keys at once. Off: leases stay until they
  /// expire, as after a crash (crash tests use this).
  bool release_on_stop = true;
  /// Seed of the backoff jitter; 0 draws one.
  std::uint64_t jitter_seed = 0;
  /// Called at each `relay_point` on the thread running the batch, with the
  /// message for `published`. Must not call back into this relay. An
  /// exception from it leaves `run_once` at that point, as a crash would
  /// (rows stay leased until the lease ends); on the relay's own thread it
  /// would end the process, so only tests that call `run_once` throw.
  std::function<void(relay_point, const stored_message*)> on_point{};
};

/// What one `run_once` did. A plain value.
struct relay_step {
  errc status = errc::ok;             ///< `ok`, or the store error that cut the step short
  std::size_t claimed = 0;            ///< messages leased
  std::size_t published = 0;          ///< destination calls that returned ok
  std::size_t failed = 0;             ///< destination calls that failed (dead-lettered or waiting for a retry)
  std::size_t dead_lettered = 0;      ///< rows moved to the outbox dead letters
  std::size_t marked = 0;             ///< messages marked dispatched
  std::size_t purged = 0;             ///< dispatched rows deleted
  bool more = false;                  ///< more may be claimable right now (a full batch, or a cut-short one)
  std::optional<time_point> next_due; ///< when a blocked key may become claimable
};

/// Counters of a relay since it was built, and a snapshot of its store's
/// outbox. A plain value.
struct relay_stats {
  std::uint64_t batches = 0;           ///< non-empty claims
  std::uint64_t claimed = 0;           ///< messages leased
  std::uint64_t published = 0;         ///< successful destination calls
  std::uint64_t dispatched = 0;        ///< messages marked dispatched
  std::uint64_t publish_failures = 0;  ///< failed destination calls
  std::uint64_t store_errors = 0;      ///< store operations that failed
  std::uint64_t lease_lost = 0;        ///< batch rows another relay had re-leased (found at renewal or marking; published ones will be republished)
  std::uint64_t lease_renewals = 0;    ///< successful lease renewals of a batch
  std::uint64_t purged = 0;            ///< dispatched rows deleted
  std::uint64_t dead_lettered = 0;     ///< rows this relay moved to the outbox dead letters
  std::string last_error;              ///< text of the latest failure (destination or store)
  // Snapshot of the store when stats() was called (all relays on the store):
  errc snapshot = errc::ok;            ///< `ok`, or the store error that left the fields below at zero
  std::uint64_t pending = 0;           ///< rows not yet dispatched
  std::uint64_t stuck = 0;             ///< pending rows that failed at least once and wait for a retry
  std::uint64_t dead_letters = 0;      ///< rows in the outbox dead letters
  std::optional<time_point> oldest_pending;  ///< staged_at of the oldest pending row
  duration oldest_pending_age{0};      ///< the relay clock's now minus `oldest_pending` (0 when none)
};

namespace detail {

#if POSTBOX_OUTBOX_POSIX
/// realpath(3) of `path` as a string, or nothing when it cannot be resolved.
template <class = void>  // a template: compiled only where a relay is (issue 17)
[[nodiscard]] std::optional<std::string> real_path(const std::string& path) {
  char* resolved = ::realpath(path.c_str(), nullptr);  // malloc'd: no PATH_MAX limit
  if (resolved == nullptr) return std::nullopt;
  std::string out(resolved);
  std::free(resolved);
  return out;
}
#endif

/// A store file's path made absolute with every symbolic link resolved: the
/// file's own realpath(3), or, for a file that does not exist (yet), its
/// directory's realpath joined with its name; `path` unchanged when neither
/// resolves. (The plain POSIX calls keep <filesystem> out of this header:
/// issue 17.) Allocates.
template <class = void>  // a template: compiled only where a relay is (issue 17)
[[nodiscard]] std::string canonical_store_path(const std::string& path) {
#if POSTBOX_OUTBOX_POSIX
  if (auto whole = real_path(path)) return *whole;
  const std::size_t slash = path.find_last_of('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..") return path;
  const std::string dir = slash == std::string::npos ? std::string(".") : slash == 0 ? std::string("/") : path.substr(0, slash);
  if (auto parent = real_path(dir)) return *parent + (parent->back() == '/' ? "" : "/") + name;
#endif
  return path;
}

/// The part of a default relay owner name that names the store: a SQLite
/// store's path (canonical), else the store object's address (a memory store
/// lives and dies with its process).
template <class Store>
[[nodiscard]] std::string relay_store_identity(Store& store) {
  if constexpr (requires { { store.path() } -> std::convertible_to<std::string>; }) {
    const std::string path = store.path();
    if (!path.empty() && path != ":memory:" && path.rfind("file:", 0) != 0) return canonical_store_path(path);
  }
  char text[2 + 2 * sizeof(void*) + 1];
  std::snprintf(text, sizeof text, "%p", static_cast<const void*>(&store));
  return std::string("memory@") + text;
}

/// "<hostname>:<executable path>", both read from the system ("?" when unknown).
template <class = void>  // a template: compiled only where a relay is (issue 17)
[[nodiscard]] std::string relay_host_and_executable() {
  std::string host = "?", exe = "?";
#if POSTBOX_OUTBOX_POSIX
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) == 0 && name[0] != '\0') host = name;
  std::string self(256, '\0');
  for (;;) {  // readlink(2) truncates silently: grow until the link fits
    const ssize_t n = ::readlink("/proc/self/exe", self.data(), self.size());
    if (n < 0) break;
    if (static_cast<std::size_t>(n) < self.size()) {
      self.resize(static_cast<std::size_t>(n));
      if (!self.empty()) exe = std::move(self);
      break;
    }
    self.resize(self.size() * 2);
  }
#endif
  return host + ":" + exe;
}

/// Holds one slot of a default relay owner name for as long as the relay
/// lives: an in-process registry, and for names shared across processes an
/// exclusive flock(2) on "<temp>/postbox-relay-<hash>-<slot>.lock", which the
/// kernel drops when the process dies, so a restarted relay gets its slot
/// back. Move-only; not thread-safe (one owner). A class template only so that
/// its bodies compile where a relay is used (issue 17); `Dummy` is unused.
template <class Dummy = void>
class basic_relay_owner_slot {
 public:
  basic_relay_owner_slot() = default;
  basic_relay_owner_slot(const basic_relay_owner_slot&) = delete;
  basic_relay_owner_slot& operator=(const basic_relay_owner_slot&) = delete;
  ~basic_relay_owner_slot() { release(); }

  /// The name "<base>#<slot>" for the lowest free slot (1..64), or empty
  /// when none could be held (every slot busy, or `cross_process` and no
  /// lock file could be opened). Allocates; opens files.
  [[nodiscard]] std::string acquire(const std::string& base, bool cross_process) {
    release();
    for (int slot = 1; slot <= 64; ++slot) {
      std::string name = base + "#" + std::to_string(slot);
      {
        std::lock_guard lock(registry_mutex());
        if (!registry().insert(name).second) continue;  // held by a relay of this process
      }
      if (!cross_process || lock_file(base, slot)) {
        name_ = std::move(name);
        return name_;
      }
      {
        std::lock_guard lock(registry_mutex());
        registry().erase(name);
      }
      if (fd_failed_) return {};
    }
    return {};
  }

  /// Gives the slot up (idempotent). Never throws.
  void release() noexcept {
#if POSTBOX_OUTBOX_POSIX
    if (fd_ >= 0) ::close(fd_);  // drops the flock
    fd_ = -1;
#endif
    if (!name_.empty()) {
      std::lock_guard lock(registry_mutex());
      registry().erase(name_);
      name_.clear();
    }
  }

 private:
  static std::mutex& registry_mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<std::string>& registry() {
    static std::set<std::string> names;
    return names;
  }

#if POSTBOX_OUTBOX_POSIX
  // The directory for temporary files, as std::filesystem::temp_directory_path
  // chooses it: $TMPDIR, $TMP, $TEMP or $TEMPDIR (the first one set), else
  // "/tmp"; empty when that is not a directory.
  static std::string temp_directory() {
    const char* dir = nullptr;
    for (const char* var : {"TMPDIR", "TMP", "TEMP", "TEMPDIR"}) {
#  if defined(__GLIBC__)
      dir = ::secure_getenv(var);
#  else
      dir = std::getenv(var);
#  endif
      if (dir != nullptr) break;
    }
    if (dir == nullptr) dir = "/tmp";
    struct stat st {};
    if (::stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return {};
    return dir;
  }
#endif

  // Takes the slot's lock file; false when another process holds it or the
  // file cannot be opened (then fd_failed_).
  bool lock_file([[maybe_unused]] const std::string& base, [[maybe_unused]] int slot) {
#if POSTBOX_OUTBOX_POSIX
    std::uint64_t h = 14695981039346656037ull;  // FNV-1a: a short, stable file name for a long base
    for (const char ch : base) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    char file[64];
    std::snprintf(file, sizeof file, "postbox-relay-%016llx-%d.lock", static_cast<unsigned long long>(h), slot);
    std::string path = temp_directory();
    if (path.empty()) {
      fd_failed_ = true;
      return false;
    }
    if (path.back() != '/') path.push_back('/');
    path += file;
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
      fd_failed_ = true;
      return false;
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      return false;
    }
    fd_ = fd;
    return true;
#else
    fd_failed_ = true;
    return false;
#endif
  }

  std::string name_;
  int fd_ = -1;
  bool fd_failed_ = false;
};
using relay_owner_slot = basic_relay_owner_slot<void>;

}  // namespace detail

/// Publishes what an outbox staged, in staging order per partition key, at
/// least once, and marks it dispatched. Several relays (threads or
/// processes) may share one store: a batch is leased (owner + expiry on the
/// clock) and a key with a message leased elsewhere or waiting for a retry
/// is skipped as a whole, so no two relays publish one message at the same
/// time and no key is published out of order. A crash between publishing and
/// marking republishes at most one batch, with the same message ids.
///
/// Poison rows: a row that fails permanently (`is_permanent`, e.g. a body
/// the codec refuses) or `max_attempts` times moves to the outbox dead
/// letters of the same store (`Store::outbox_dead_letters`, `outbox_redrive`),
/// and the rest of its key is published, so no key stalls behind it.
///
/// Drive it with `run_once()` / `drain()` (deterministic, for tests and
/// manual loops) or `start()` its thread, which runs a batch whenever a local
/// commit stages messages (`commit_signal`), at the earliest retry time, and
/// every `poll_interval` for other processes' commits, all on the clock.
/// Thread-safe: `run_once` calls are serialized; `stats()` may be called
/// from anywhere. Allocates per batch.
template <outbox_store Store>
class outbox_relay {
 public:
  /// A relay from `store` to `destination` (both must outlive it); timing on
  /// `clk`. Throws `invalid_argument` for a zero batch size or lease, or an
  /// empty destination. With no `owner`, takes the default owner name (see
  /// `relay_options::owner`; opens a lock file for a SQLite store).
  outbox_relay(Store& store, outbox_destination destination, relay_options options = {},
               const clock& clk = default_clock())
      : outbox_relay(store, wrap(std::move(destination)), std::move(options), clk) {}

  /// A relay to a batch destination (e.g. a pipelined JetStream publisher):
  /// each leased batch goes to it in one call, then the results are treated
  /// in batch order as `run_once` treats one call per message.
  outbox_relay(Store& store, outbox_batch_destination destination, relay_options options = {},
               const clock& clk = default_clock())
      : outbox_relay(store, one_at_a_time(destination), std::move(options), clk) {
    batch_destination_ = std::move(destination);
  }

  /// A relay to a destination that may block; it gets a stop token that
  /// `stop()` (and destruction) triggers before joining the thread.
  outbox_relay(Store& store, outbox_stoppable_destination destination, relay_options options = {},
               const clock& clk = default_clock())
      : store_(&store), destination_(std::move(destination)), options_(std::move(options)), clock_(&clk),
        jitter_(options_.jitter_seed != 0 ? options_.jitter_seed : detail::entropy64()) {
    if (options_.batch_size == 0) POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: batch_size must be > 0"));
    if (options_.lease <= duration::zero())
      POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: lease must be positive"));
    if (!destination_) POSTBOX_THROW(error(errc::invalid_argument, "outbox_relay: no destination"));
    if (!options_.is_permanent) options_.is_permanent = [](errc c) { return outbox_permanent_error(c); };
    if (options_.owner.empty()) {
      const std::string store_id = detail::relay_store_identity(store);
      options_.owner = slot_.acquire(detail::relay_host_and_executable() + ":" + store_id,
                                     store_id.rfind("memory@", 0) != 0);
      if (options_.owner.empty()) options_.owner = "relay-" + message_id::generate().to_string();
    }
    next_purge_ = clock_->now();
  }
  outbox_relay(const outbox_relay&) = delete;
  outbox_relay& operator=(const outbox_relay&) = delete;
  /// Stops the thread if started (a blocked destination is asked to stop
  /// through its token; the batch in progress ends at the next message) and
  /// releases this relay's leases (`release_on_stop`). Never throws.
  ~outbox_relay() {
    POSTBOX_TRY { stop(); }
    POSTBOX_CATCH_ALL {}
  }

  /// Runs one batch now, on the calling thread: purges expired dispatched
  /// rows when due, leases up to `batch_size` messages, publishes them in
  /// order (a transient failure holds back the rest of that key and
  /// schedules a retry with backoff; a permanent one, or the last allowed
  /// attempt, dead-letters the row and the key goes on), marks the published
  /// ones dispatched and releases the rest. Never waits for new messages;
  /// blocks on the store and the destination. Thread-safe (serialized with
  /// other calls).
  relay_step run_once() {
    std::lock_guard run(run_mutex_);
    relay_step step;
    const time_point now = clock_->now();
    if (now >= next_purge_) purge(now, step);
    time_point lease_until = now + options_.lease;
    time_point renew_at = now + options_.lease / 2;
    auto claim = store_->outbox_claim(options_.owner, now, lease_until, options_.batch_size);
    if (!claim) {
      note_store_error(claim.status(), "claim");
      step.status = claim.status();
      return step;
    }
    step.next_due = claim->next_due;
    auto& batch = claim->messages;
    step.claimed = batch.size();
    if (batch.empty()) return step;
    bump(&relay_stats::batches, 1);
    bump(&relay_stats::claimed, batch.size());
    point(relay_point::claimed, nullptr);

    const std::stop_token stop = stop_token();
    detail::dependent_t<std::vector<std::uint64_t>, Store> published, untouched;  // dependent_t: detail/dependent.hpp
    detail::dependent_t<std::vector<std::string_view>, Store> failed_keys;
    bool cut_short = false;
    std::size_t lost_at_renewal = 0;
    detail::dependent_t<std::vector<std::uint64_t>, Store> held;  // rows of the batch still leased to us: published, untouched, not yet tried
    detail::dependent_t<std::vector<errc>, Store> batch_results;  // a batch destination's answers, read in order below
    if (batch_destination_) batch_results = publish_batch(batch, stop);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const auto& m = batch[i];
      const bool key_failed =
          std::find(failed_keys.begin(), failed_keys.end(), std::string_view(m.partition_key)) != failed_keys.end();
      if (cut_short || key_failed) {
        untouched.push_back(m.sequence);
        continue;
      }
      if (const time_point t = clock_->now(); t >= renew_at && !stopping_.load(std::memory_order_relaxed)) {
        held.assign(published.begin(), published.end());
        held.insert(held.end(), untouched.begin(), untouched.end());
        for (std::size_t j = i; j < batch.size(); ++j) held.push_back(batch[j].sequence);
        auto renewed = store_->outbox_renew(options_.owner, held, t, t + options_.lease);
        if (!renewed) {
          note_store_error(renewed.status(), "renew");  // the old lease still counts below
          renew_at = t + options_.lease / 4;               // try again later, not before every message
        } else if (*renewed < held.size()) {  // another relay took some: it publishes them; stop here
          lost_at_renewal = held.size() - *renewed;
          bump(&relay_stats::lease_lost, lost_at_renewal);
          cut_short = true;
          untouched.push_back(m.sequence);
          continue;
        } else {
          lease_until = t + options_.lease;
          renew_at = t + options_.lease / 2;
          bump(&relay_stats::lease_renewals, 1);
        }
      }
      // relaxed: a hint to stop early; the batch stays consistent either way.
      if (stopping_.load(std::memory_order_relaxed) || clock_->now() >= lease_until) {
        cut_short = true;
        untouched.push_back(m.sequence);
        continue;
      }
      std::string why;
      const errc rc = batch_destination_ ? batch_result(batch_results[i], m, why) : publish(m, stop, why);
      if (rc == errc::ok) {
        published.push_back(m.sequence);
        ++step.published;
        point(relay_point::published, &m);
        continue;
      }
      if (rc == errc::canceled && stop.stop_requested()) {  // stopped while blocked: not an attempt
        cut_short = true;
        untouched.push_back(m.sequence);
        continue;
      }
      ++step.failed;
      note_failure(&relay_stats::publish_failures, why);
      const time_point failed_at = clock_->now();
      const std::uint32_t attempts = m.attempts + 1;
      const bool permanent = options_.is_permanent(rc);
      if (permanent || (options_.max_attempts != 0 && attempts >= options_.max_attempts)) {
        const std::string_view reason = permanent ? to_string(rc) : outbox_retries_exhausted;
        const errc r = store_->outbox_dead_letter(options_.owner, m.sequence, failed_at, reason, why);
        if (r == errc::ok) {  // gone from the outbox: the rest of its key may go on
          ++step.dead_lettered;
          bump(&relay_stats::dead_lettered, 1);
          continue;
        }
        if (r != errc::not_found) note_store_error(r, "dead_letter");
      }
      failed_keys.emplace_back(m.partition_key);
      const time_point retry_at = failed_at + options_.retry.backoff(attempts, jitter_next());
      step.next_due = step.next_due ? std::min(*step.next_due, retry_at) : retry_at;
      const errc r = store_->outbox_retry_later(options_.owner, m.sequence, failed_at, retry_at, why);
      if (r != errc::ok && r != errc::not_found) note_store_error(r, "retry_later");
    }
    bump(&relay_stats::published, step.published);
    point(relay_point::before_mark, nullptr);
    if (!published.empty()) {
      auto marked = store_->outbox_mark_dispatched(options_.owner, published, clock_->now());
      if (!marked) {
        // The rows stay leased to us until the lease runs out (or stop()
        // releases them), then they are published again (at-least-once; same ids).
        note_store_error(marked.status(), "mark_dispatched");
        step.status = marked.status();
      } else {
        step.marked = *marked;
        bump(&relay_stats::dispatched, *marked);
        // Rows lost at a renewal were counted then; count only losses beyond those.
        const std::size_t unmarked = published.size() - *marked;
        if (unmarked > lost_at_renewal) bump(&relay_stats::lease_lost, unmarked - lost_at_renewal);
        point(relay_point::marked, nullptr);
      }
    }
    if (!untouched.empty()) {
      const errc r = store_->outbox_release(options_.owner, untouched);
      if (r != errc::ok) note_store_error(r, "release");
    }
    step.more = step.status == errc::ok && (batch.size() >= options_.batch_size || cut_short);
    return step;
  }

  /// Runs batches until nothing is claimable right now (or a store error,
  /// or `max_batches`); returns how many messages were marked dispatched.
  /// Blocks like `run_once`.
  std::size_t drain(std::size_t max_batches = std::numeric_limits<std::size_t>::max()) {
    std::size_t total = 0;
    for (std::size_t i = 0; i < max_batches; ++i) {
      const relay_step s = run_once();
      total += s.marked;
      if (!s.more) break;
    }
    return total;
  }

  /// Starts the relay's thread (idempotent). Thread-safe.
  void start() {
    std::lock_guard lock(thread_mutex_);
    if (thread_.joinable()) return;
    {
      std::lock_guard token(token_mutex_);
      if (stop_source_.stop_requested()) stop_source_ = std::stop_source();
    }
    // relaxed: the thread is created after this store (thread start orders it).
    stopping_.store(false, std::memory_order_relaxed);
    thread_ = std::thread([this] { loop(); });
  }

  /// Stops the thread if started: the batch in progress ends before its
  /// next message, a destination blocked in a stoppable call is asked to
  /// stop through its token; then (`release_on_stop`) releases every lease
  /// this relay's owner name holds. Idempotent. Blocks until the thread has
  /// exited and on one store write. Thread-safe.
  void stop() {
    std::lock_guard lock(thread_mutex_);
    if (thread_.joinable()) {
      // release: pairs with the acquire loads in loop(); the signal's mutex
      // (taken by wake) orders it with a waiter's check.
      stopping_.store(true, std::memory_order_release);
      {
        std::lock_guard token(token_mutex_);
        stop_source_.request_stop();
      }
      store_->commits().wake();
      thread_.join();
    }
    if (options_.release_on_stop) {
      std::lock_guard run(run_mutex_);  // not while a run_once on another thread holds leases
      auto n = store_->outbox_release_owner(options_.owner);
      if (!n) note_store_error(n.status(), "release_owner");
    }
  }

  /// Counters since construction, and a snapshot of the store's outbox
  /// (pending, stuck, dead letters, oldest pending row and its age on the
  /// relay's clock). Thread-safe; blocks on one store read
  /// (`outbox_summary`); allocates (the error text).
  [[nodiscard]] relay_stats stats() const {
    relay_stats s;
    {
      std::lock_guard lock(stats_mutex_);
      s = stats_;
    }
    auto c = store_->outbox_summary();
    if (!c) {
      s.snapshot = c.status();
      return s;
    }
    s.pending = c->pending;
    s.stuck = c->retrying;
    s.dead_letters = c->dead_lettered;
    s.oldest_pending = c->oldest_pending;
    if (c->oldest_pending) s.oldest_pending_age = std::max(duration::zero(), clock_->now() - *c->oldest_pending);
    return s;
  }

  /// This relay's lease owner name.
  [[nodiscard]] const std::string& owner() const noexcept { return options_.owner; }
  /// The store.
  [[nodiscard]] Store& store() const noexcept { return *store_; }

 private:
  static outbox_stoppable_destination wrap(outbox_destination d) {
    if (!d) return {};
    return [d = std::move(d)](const stored_message& m, std::stop_token) { return d(m); };
  }

  static outbox_stoppable_destination one_at_a_time(const outbox_batch_destination& d) {
    if (!d) return {};
    return [d](const stored_message& m, std::stop_token stop) {
      errc rc = errc::handler_error;
      d(std::span<const stored_message>(&m, 1), std::span<errc>(&rc, 1), std::move(stop));
      return rc;
    };
  }

  using results_t = detail::dependent_t<std::vector<errc>, Store>;
  results_t publish_batch(const std::vector<stored_message>& batch, const std::stop_token& stop) {
    results_t results(batch.size(), errc::handler_error);
    POSTBOX_TRY { batch_destination_(std::span<const stored_message>(batch), std::span<errc>(results), stop); }
    POSTBOX_CATCH_ALL { std::fill(results.begin(), results.end(), errc::handler_error); }
    return results;
  }

  static errc batch_result(errc rc, const stored_message& m, std::string& why) {
    if (rc != errc::ok) why = "outbox_relay: publishing " + m.id.to_string() + " failed: " + std::string(to_string(rc));
    return rc;
  }

  std::stop_token stop_token() const {
    std::lock_guard token(token_mutex_);
    return stop_source_.get_token();
  }

  void loop() {
    // acquire: pairs with the release store in stop().
    while (!stopping_.load(std::memory_order_acquire)) {
      // Read before the batch: a commit during the batch changes it, so the
      // wait below returns at once instead of missing that commit.
      const std::uint64_t seen = store_->commits().sequence();
      const relay_step s = run_once();
      if (stopping_.load(std::memory_order_acquire)) break;
      if (s.more) continue;
      const time_point now = clock_->now();
      time_point deadline = now + options_.poll_interval;
      if (s.status != errc::ok) {
        ++store_failures_in_row_;
        deadline = now + options_.retry.backoff(store_failures_in_row_, jitter_next());
      } else {
        store_failures_in_row_ = 0;
        if (s.next_due && *s.next_due < deadline) deadline = *s.next_due;
        time_point purge_at;
        {
          std::lock_guard run(run_mutex_);  // run_once may also run on other threads
          purge_at = next_purge_;
        }
        if (purge_at < deadline) deadline = purge_at;
      }
      store_->commits().wait(*clock_, seen, deadline,
                             // acquire: pairs with the release store in stop().
                             [this] { return stopping_.load(std::memory_order_acquire); });
    }
  }

  void purge(time_point now, relay_step& step) {
    next_purge_ = now + options_.purge_interval;
    constexpr std::size_t chunk = 1024;
    for (;;) {
      auto n = store_->outbox_purge(now - options_.retention, chunk);
      if (!n) {
        note_store_error(n.status(), "purge");
        return;
      }
      step.purged += *n;
      bump(&relay_stats::purged, *n);
      if (*n < chunk) return;
    }
  }

  errc publish(const stored_message& m, const std::stop_token& stop, std::string& why) {
    errc rc = errc::handler_error;
    POSTBOX_TRY { rc = destination_(m, stop); }
    POSTBOX_CATCH_ALL {
      rc = errc::handler_error;
      why = "outbox_relay: the destination threw publishing " + m.id.to_string();
      return rc;
    }
    if (rc != errc::ok) why = "outbox_relay: publishing " + m.id.to_string() + " failed: " + std::string(to_string(rc));
    return rc;
  }

  void point(relay_point p, const stored_message* m) {
    if (options_.on_point) options_.on_point(p, m);
  }

  std::uint64_t jitter_next() {
    std::lock_guard lock(stats_mutex_);
    return jitter_.next();
  }

  void bump(std::uint64_t relay_stats::*field, std::uint64_t n) {
    std::lock_guard lock(stats_mutex_);
    stats_.*field += n;
  }
  void note_failure(std::uint64_t relay_stats::*field, const std::string& why) {
    std::lock_guard lock(stats_mutex_);
    ++(stats_.*field);
    stats_.last_error = why;
  }
  void note_store_error(errc code, const char* what) {
    note_failure(&relay_stats::store_errors,
                 std::string("outbox_relay: ") + what + " failed: " + std::string(to_string(code)));
  }

  Store* store_;
  outbox_stoppable_destination destination_;
  outbox_batch_destination batch_destination_;  // set: run_once hands it each batch at once
  relay_options options_;
  const clock* clock_;
  detail::relay_owner_slot slot_;  // holds the default owner name's slot while the relay lives
  std::mutex run_mutex_;  // serializes run_once
  time_point next_purge_;  // under run_mutex_
  mutable std::mutex stats_mutex_;
  relay_stats stats_;  // counters only; stats() adds the store snapshot
  jitter_source jitter_;  // under stats_mutex_
  std::uint32_t store_failures_in_row_ = 0;  // loop() only
  std::mutex thread_mutex_;  // start/stop
  mutable std::mutex token_mutex_;  // stop_source_ (start replaces it while run_once may read it)
  std::stop_source stop_source_;  // requested by stop(); its tokens go to the destination
  std::thread thread_;
  /// Set by stop() (release), read by loop() (acquire) and by run_once
  /// (relaxed: only a hint to end a batch early). The partner of the release
  /// is the acquire in loop(); commit_signal::wake() makes a waiting loop see it.
  std::atomic<bool> stopping_{false};
};

namespace detail {
template <class T, class Codec>
bool outbox_decode(const Codec& codec, const stored_message& m, envelope<T>& out, errc& rc) {
  auto decoded = codec.template decode<T>(m.body);
  if (!decoded.has_value()) {
    rc = decoded.status() == errc::ok ? errc::parse_error : decoded.status();
    return false;
  }
  out = std::move(*decoded);
  return true;
}
}  // namespace detail

/// A destination that decodes each message with `codec` and `try_send`s it
/// into `ch`: a full channel is `full` and a closed one `closed` (both retried
/// with backoff). `ch` must outlive the relay. Allocates per message.
template <class T, class Shape, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_channel(channel<envelope<T>, Shape>& ch, Codec codec) {
  return [&ch, codec = std::move(codec)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    switch (ch.try_send(std::move(env))) {
      case send_status::ok: return errc::ok;
      case send_status::closed: return errc::closed;
      default: return errc::full;
    }
  };
}

/// A destination that decodes each message with `codec` and `send`s it into
/// `ch`, blocking while the channel is full: `ok` once sent, `closed` (retried
/// with backoff), or `canceled` when the relay stops first (the row is
/// released, not counted as an attempt). While it blocks the row's lease
/// runs on; past it another relay may publish the row too (same id). `ch`
/// must outlive the relay. Allocates per message.
template <class T, class Shape, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_stoppable_destination to_channel_blocking(channel<envelope<T>, Shape>& ch, Codec codec) {
  return [&ch, codec = std::move(codec)](const stored_message& m, std::stop_token stop) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    switch (ch.send(std::move(env), std::move(stop))) {
      case send_status::ok: return errc::ok;
      case send_status::canceled: return errc::canceled;
      case send_status::closed: return errc::closed;
      default: return errc::full;
    }
  };
}

/// A destination that decodes each message and publishes it on `t` under the
/// subject `subject(m)` (default: the message type; empty publishes without a
/// subject). A `fail` subscription that refuses it makes the publish `full`,
/// and the retry delivers again to every subscription (same id).
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_topic(topic<envelope<T>>& t, Codec codec,
                                          std::function<std::string(const stored_message&)> subject = {}) {
  return [&t, codec = std::move(codec), subject = std::move(subject)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    std::string s = subject ? subject(m) : m.type;
    const publish_result r = s.empty() ? t.publish(std::move(env)) : t.publish(std::move(s), std::move(env));
    if (r.ok()) return errc::ok;
    return r.closed ? errc::closed : errc::full;
  };
}

/// A destination that decodes each message and appends it to `s` under its
/// partition key, so one key lands in one stream partition in order.
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_stream(stream<envelope<T>>& s, Codec codec) {
  return [&s, codec = std::move(codec)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    (void)s.append(m.partition_key, std::move(env));
    return errc::ok;
  };
}

/// Registers a relay's counters and its store's outbox counts (pending,
/// leased, retrying = stuck, dispatched, dead letters, oldest pending age on
/// `clk`). Reading costs two store queries per scrape. `relay` must outlive
/// the handle. Allocates.
template <class Store>
[[nodiscard]] metrics_registry::registration register_outbox_relay(metrics_registry& registry, std::string name,
                                                                   const outbox_relay<Store>& relay,
                                                                   const clock& clk = default_clock()) {
  return registry.add("outbox_relay", std::move(name), [&relay, &clk](metric_writer& w) {
    const relay_stats s = relay.stats();
    w.counter("postbox_outbox_published_total", "Successful destination calls.", static_cast<double>(s.published));
    w.counter("postbox_outbox_dispatched_total", "Messages marked dispatched.", static_cast<double>(s.dispatched));
    w.counter("postbox_outbox_publish_failures_total", "Failed destination calls.",
              static_cast<double>(s.publish_failures));
    w.counter("postbox_outbox_store_errors_total", "Store operations of the relay that failed.",
              static_cast<double>(s.store_errors));
    w.counter("postbox_outbox_lease_lost_total", "Batch rows another relay had re-leased (at renewal or marking).",
              static_cast<double>(s.lease_lost));
    w.counter("postbox_outbox_purged_total", "Dispatched rows deleted after retention.", static_cast<double>(s.purged));
    w.counter("postbox_outbox_dead_lettered_total", "Rows the relay moved to the outbox dead letters.",
              static_cast<double>(s.dead_lettered));
    if (s.snapshot == errc::ok) {
      w.gauge("postbox_outbox_stuck", "Pending rows that failed at least once and wait for a retry.",
              static_cast<double>(s.stuck));
      w.gauge("postbox_outbox_dead_letters", "Rows in the outbox dead letters.", static_cast<double>(s.dead_letters));
    }
    if (auto c = relay.store().outbox_summary()) {
      w.gauge("postbox_outbox_pending", "Staged messages not yet dispatched.", static_cast<double>(c->pending));
      w.gauge("postbox_outbox_leased", "Pending messages under a lease.", static_cast<double>(c->leased));
      w.gauge("postbox_outbox_retrying", "Pending messages whose publication failed at least once.",
              static_cast<double>(c->retrying));
      w.gauge("postbox_outbox_dispatched", "Dispatched messages kept until retention.",
              static_cast<double>(c->dispatched));
      const double age =
          c->oldest_pending ? std::chrono::duration<double>(clk.now() - *c->oldest_pending).count() : 0.0;
      w.gauge("postbox_outbox_oldest_pending_seconds", "Age of the oldest pending message.", age < 0 ? 0.0 : age);
    }
  });
}

POSTBOX_END_NAMESPACE
