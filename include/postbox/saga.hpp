// SPDX-License-Identifier: MIT
// Orchestrated sagas: ordered steps with compensations, state persisted at every transition, resume after a crash.
#pragma once

// Design, state machine and crash reasoning: docs/design/saga.md.

#include <postbox/clock.hpp>
#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/timer_service.hpp>

#include <atomic>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stop_token>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <postbox/retry.hpp>
#include <postbox/scheduler.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/dependent.hpp>

POSTBOX_BEGIN_NAMESPACE
/// The policy sagas retry compensations with (postbox/retry.hpp).
using saga_retry_policy = retry_policy;
namespace detail {
using saga_jitter = jitter_source;
}  // namespace detail
POSTBOX_END_NAMESPACE

POSTBOX_BEGIN_NAMESPACE

/// Which way a saga is moving: running actions forward, or undoing them.
enum class saga_phase { forward = 0, compensating = 1 };

/// Where a saga ended. `running` until it ends; `completed`: every action
/// applied; `compensated`: a step failed and every applied step was undone;
/// `failed`: a compensation exhausted its retry policy (needs an operator).
enum class saga_outcome { running = 0, completed = 1, compensated = 2, failed = 3 };

/// Stable lower-case name ("forward", "compensating"). Never allocates.
[[nodiscard]] constexpr std::string_view to_string(saga_phase p) noexcept {
  return p == saga_phase::forward ? "forward" : "compensating";
}

/// Stable lower-case name ("running", "completed", ...). Never allocates.
[[nodiscard]] constexpr std::string_view to_string(saga_outcome o) noexcept {
  switch (o) {
    case saga_outcome::running: return "running";
    case saga_outcome::completed: return "completed";
    case saga_outcome::compensated: return "compensated";
    case saga_outcome::failed: return "failed";
  }
  return "unknown";
}

/// What an action or a compensation reports. A failure says the call had no
/// effect (an action that fails must leave nothing to undo). Throwing from a
/// step is the same as returning `failure(what())`.
/// Plain value; allocates only for the reason text.
struct step_result {
  bool ok = true;
  std::string reason;

  /// The call succeeded.
  [[nodiscard]] static step_result success() { return {}; }
  /// The call failed and had no effect; `why` travels in the saga's events.
  [[nodiscard]] static step_result failure(std::string why) { return {false, std::move(why)}; }
};

/// The persisted state of one saga: enough to continue it in another process.
/// `current_step` means, forward: the index of the step to run next (equal to
/// `completed_steps`); compensating: how many steps remain to undo, the next
/// being index `current_step - 1`. Plain value, not thread-safe.
struct saga_state {
  std::string saga_id;          ///< unique key in the store
  std::string definition;       ///< name of the registered saga_definition
  std::string data;             ///< the saga's own data, given at start, updated by steps
  message_id correlation_id;    ///< copied onto every event of this saga
  message_id last_event_id;     ///< causation id of the next event
  saga_phase phase = saga_phase::forward;
  saga_outcome outcome = saga_outcome::running;
  std::uint32_t step_count = 0;       ///< steps of the definition when it started
  std::uint32_t current_step = 0;     ///< see the class comment
  std::uint32_t completed_steps = 0;  ///< actions that completed (never decreases)
  /// Forward: starts of the current action (more than 1 means it is re-run
  /// after a crash). Compensating: failed tries of the current compensation.
  std::uint32_t attempt = 0;
  std::optional<time_point> step_deadline;    ///< forward: deadline of the current step
  std::optional<time_point> next_attempt_at;  ///< compensating: retry not before this time
  std::string failure_reason;                 ///< why it compensates or failed
  time_point started_at{};
  time_point updated_at{};
  std::uint64_t version = 0;  ///< transitions persisted so far

  /// True once the outcome is no longer `running`.
  [[nodiscard]] bool finished() const noexcept { return outcome != saga_outcome::running; }
};

/// The store concept for saga state. `create` inserts a new saga or returns
/// `conflict` when the id exists; `save` inserts or replaces; `load` returns
/// `not_found` for an unknown id; `load_unfinished` lists every saga whose
/// outcome is `running`, oldest first. Failures are `store_error` (or `busy`,
/// `corrupt`). Implementations must be thread-safe.
template <class S>
concept saga_state_store = requires(S& s, const S& cs, const saga_state& st, std::string_view id) {
  { s.create(st) } -> std::same_as<errc>;
  { s.save(st) } -> std::same_as<errc>;
  { cs.load(id) } -> std::same_as<result<saga_state>>;
  { cs.load_unfinished() } -> std::same_as<result<std::vector<saga_state>>>;
};

/// Saga state kept in process memory: for tests and for processes that need
/// no durability. Every member allocates (copies) and is thread-safe.
/// A class template only so that its bodies compile in the translation units
/// that use it (`memory_saga_store` is the one instance; `Dummy` is unused).
template <class Dummy = void>
class basic_memory_saga_store {
 public:
  /// Inserts `st`; `conflict` if its id is already stored.
  [[nodiscard]] errc create(const saga_state& st) {
    std::lock_guard lock(mutex_);
    return sagas_.emplace(st.saga_id, st).second ? errc::ok : errc::conflict;
  }
  /// Inserts or replaces `st`. Always `ok`.
  [[nodiscard]] errc save(const saga_state& st) {
    std::lock_guard lock(mutex_);
    sagas_.insert_or_assign(st.saga_id, st);
    return errc::ok;
  }
  /// A copy of the saga's state, or `not_found`.
  [[nodiscard]] result<saga_state> load(std::string_view saga_id) const {
    std::lock_guard lock(mutex_);
    const auto it = sagas_.find(saga_id);
    if (it == sagas_.end()) return errc::not_found;
    return it->second;
  }
  /// Copies of every running saga, oldest first (ties by id).
  [[nodiscard]] result<std::vector<saga_state>> load_unfinished() const {
    detail::dependent_t<std::vector<saga_state>, Dummy> out;
    {
      std::lock_guard lock(mutex_);
      for (const auto& [id, st] : sagas_) {
        if (!st.finished()) out.push_back(st);
      }
    }
    std::stable_sort(out.begin(), out.end(),
                     [](const saga_state& a, const saga_state& b) { return a.started_at < b.started_at; });
    return out;
  }
  /// Number of sagas stored (finished or not).
  [[nodiscard]] std::size_t size() const {
    std::lock_guard lock(mutex_);
    return sagas_.size();
  }

 private:
  mutable std::mutex mutex_;
  /// dependent_t: these bodies compile only where the store is used (detail/dependent.hpp).
  detail::dependent_t<std::map<std::string, saga_state, std::less<>>, Dummy> sagas_;
};

/// The in-memory saga store (`saga_state_store`).
using memory_saga_store = basic_memory_saga_store<void>;

/// What a step's action or compensation sees: which saga and step, the
/// attempt, the step's deadline, a stop token and the saga's data, which the
/// action may change (kept when the call succeeds). Not thread-safe; valid
/// only during the call.
class step_context {
 public:
  /// Built by the coordinator for one call. Never allocates.
  step_context(const saga_state& st, std::string_view step_name, std::uint32_t step_index, std::uint32_t attempt,
               std::string& data, std::stop_token stop, const postbox::clock& clk) noexcept
      : state_(&st), step_name_(step_name), step_index_(step_index), attempt_(attempt), data_(&data),
        stop_(std::move(stop)), clock_(&clk) {}

  /// The saga's id (the idempotency key for effects, with step_name()).
  [[nodiscard]] const std::string& saga_id() const noexcept { return state_->saga_id; }
  /// Name of the saga's definition.
  [[nodiscard]] const std::string& definition() const noexcept { return state_->definition; }
  /// Name and index of the step being run or compensated.
  [[nodiscard]] std::string_view step_name() const noexcept { return step_name_; }
  [[nodiscard]] std::uint32_t step_index() const noexcept { return step_index_; }
  /// `forward` inside an action, `compensating` inside a compensation.
  [[nodiscard]] saga_phase phase() const noexcept { return state_->phase; }
  /// 1 on the first call; an action re-run after a crash sees 2 or more, a
  /// compensation retried after failures sees 1 + the failures so far.
  [[nodiscard]] std::uint32_t attempt() const noexcept { return attempt_; }
  /// The saga's correlation id, for messages the step sends.
  [[nodiscard]] message_id correlation_id() const noexcept { return state_->correlation_id; }
  /// The id of the saga's latest event (`saga.step_started` before an
  /// action; the failure or the previous compensation before a
  /// compensation): the causation id for messages this call sends.
  [[nodiscard]] message_id last_event_id() const noexcept { return state_->last_event_id; }
  /// The step's deadline (actions with a timeout only).
  [[nodiscard]] std::optional<time_point> deadline() const noexcept {
    return state_->phase == saga_phase::forward ? state_->step_deadline : std::nullopt;
  }
  /// True once the deadline has passed on the saga's clock.
  [[nodiscard]] bool expired() const noexcept {
    const auto d = deadline();
    return d && clock_->now() >= *d;
  }
  /// Requested when the coordinator stops, or at the deadline when the
  /// coordinator was given a timer_service. Long actions should poll it.
  [[nodiscard]] const std::stop_token& stop_token() const noexcept { return stop_; }
  /// The saga's data; changes persist with the step's completion.
  [[nodiscard]] std::string& data() noexcept { return *data_; }
  /// The coordinator's clock.
  [[nodiscard]] const postbox::clock& get_clock() const noexcept { return *clock_; }

 private:
  const saga_state* state_;
  std::string_view step_name_;
  std::uint32_t step_index_;
  std::uint32_t attempt_;
  std::string* data_;
  std::stop_token stop_;
  const postbox::clock* clock_;
};

/// The payload of every saga event envelope: which saga and step, and the
/// state right after the transition. Plain value.
struct saga_event {
  std::string saga_id;
  std::string definition;
  std::string step;  ///< step name; empty for saga-level events
  std::uint32_t step_index = 0;
  saga_phase phase = saga_phase::forward;
  saga_outcome outcome = saga_outcome::running;
  std::uint32_t attempt = 0;
  std::string reason;  ///< failure text, when there is one
};

/// The `type` of each saga event envelope.
namespace saga_events {
inline constexpr std::string_view started = "saga.started";
inline constexpr std::string_view resumed = "saga.resumed";
inline constexpr std::string_view step_started = "saga.step_started";
inline constexpr std::string_view step_completed = "saga.step_completed";
inline constexpr std::string_view step_failed = "saga.step_failed";
inline constexpr std::string_view compensation_failed = "saga.compensation_failed";
inline constexpr std::string_view step_compensated = "saga.step_compensated";
inline constexpr std::string_view completed = "saga.completed";
inline constexpr std::string_view compensated = "saga.compensated";
inline constexpr std::string_view failed = "saga.failed";
}  // namespace saga_events

namespace detail {
using saga_function = std::function<step_result(step_context&)>;

// Adapts a user callable returning step_result, bool or void (or nullptr for
// "nothing to undo") to the stored function type.
template <class F>
saga_function to_saga_function(F&& f) {
  using fn_t = std::decay_t<F>;
  if constexpr (std::is_same_v<fn_t, std::nullptr_t>) {
    return {};
  } else {
    static_assert(std::is_invocable_v<fn_t&, step_context&>, "a saga step must be callable with step_context&");
    using ret = std::invoke_result_t<fn_t&, step_context&>;
    if constexpr (std::is_same_v<ret, step_result>) {
      return saga_function(std::forward<F>(f));
    } else if constexpr (std::is_same_v<ret, bool>) {
      return [g = fn_t(std::forward<F>(f))](step_context& ctx) mutable {
        return g(ctx) ? step_result::success() : step_result::failure("returned false");
      };
    } else {
      static_assert(std::is_void_v<ret>, "a saga step returns step_result, bool or void");
      return [g = fn_t(std::forward<F>(f))](step_context& ctx) mutable {
        g(ctx);
        return step_result::success();
      };
    }
  }
}
}  // namespace detail

/// A named, ordered list of steps, each an action and a compensation. Both
/// must be idempotent: an action interrupted by a crash is run again on
/// resume, a compensation may run again after a crash or a failed try, and a
/// compensation may be called for an action that timed out and may or may not
/// have taken effect. Register definitions with the coordinator at startup,
/// under the same name in every process that may resume them.
/// Building allocates; not thread-safe (immutable once registered).
class saga_definition {
 public:
  /// One step as registered.
  struct step_spec {
    std::string name;
    detail::saga_function action;
    detail::saga_function compensation;  ///< empty: nothing to undo
    std::optional<duration> timeout;     ///< deadline = time the step first starts + timeout
  };

  /// A definition with no steps yet. Throws `invalid_argument` on an empty name.
  explicit saga_definition(std::string name) : name_(std::move(name)) {
    if (name_.empty()) POSTBOX_THROW(error(errc::invalid_argument, "saga_definition: empty name"));
  }

  /// Appends a step. `action` and `compensation` take `step_context&` and
  /// return step_result, bool or void; `compensation` may be nullptr. With a
  /// `timeout`, the step fails once that much time has passed on the clock
  /// since it first started, and its compensation runs (see class comment).
  template <class Action, class Compensation>
  saga_definition& step(std::string step_name, Action&& action, Compensation&& compensation,
                        std::optional<duration> timeout = std::nullopt) {
    if constexpr (!std::is_same_v<std::decay_t<Action>, std::nullptr_t>) {
      steps_.push_back(step_spec{std::move(step_name), detail::to_saga_function(std::forward<Action>(action)),
                                 detail::to_saga_function(std::forward<Compensation>(compensation)), timeout});
    } else {
      POSTBOX_THROW(error(errc::invalid_argument, "saga_definition: a step needs an action"));
    }
    return *this;
  }

  /// The name sagas are started and resumed by.
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  /// The steps, in order; size() of them.
  [[nodiscard]] const std::vector<step_spec>& steps() const noexcept { return steps_; }
  [[nodiscard]] std::size_t size() const noexcept { return steps_.size(); }

 private:
  std::string name_;
  std::vector<step_spec> steps_;
};

/// Coordinator settings.
struct saga_options {
  /// Retries of a failing compensation: after the n-th failed try the saga
  /// waits `backoff(n, jitter)` on the clock, until `exhausted(n)`.
  saga_retry_policy compensation_retry{};
  /// Seed of the jitter for the backoff (deterministic runs).
  std::uint64_t jitter_seed = 0x5a6a5eedULL;
  /// Receives one envelope per transition, after the state is stored.
  /// Called from the thread running the saga; exceptions are caught and counted.
  std::function<void(const envelope<saga_event>&)> on_event{};
  /// When set, a step's deadline also requests its stop token (through a
  /// timer on this service); without it the deadline is checked when the
  /// action returns. Must outlive the coordinator.
  timer_service* timers = nullptr;
  /// As `timers`, through a postbox::scheduler: the step's deadline is a
  /// revocable `call_at`, canceled as soon as the action returns, so a
  /// completed step's timeout never fires (its stats count the cancel).
  /// Used when `timers` is not set. Must outlive the coordinator.
  scheduler* step_scheduler = nullptr;
  /// `producer` of every event envelope.
  std::string producer = "postbox.saga";
};

/// How a saga is started: its id (generated when empty, a UUIDv7), and the
/// correlation and causation of the message that started it (nil: the
/// "saga.started" event opens a new correlation).
struct saga_start {
  std::string saga_id;
  message_id correlation_id;
  message_id causation_id;
};

/// One saga that `resume_all` picked up, and how that went.
struct saga_resumed {
  std::string saga_id;
  result<saga_state> state;
};

/// Runs sagas against a state store. `run` executes one saga in the calling
/// thread until it finishes (or the store fails, or the coordinator stops):
/// steps in order, and on a failure the compensations of the applied steps in
/// reverse order, retrying each with the policy. Before each action or
/// compensation runs, the state that leads to it is stored, so a saga cut off
/// by a crash continues where it stopped: `resume_all()` finds them.
/// Thread-safe: different sagas may run on different threads at once.
template <saga_state_store Store>
class saga_coordinator {
 public:
  /// A coordinator on `store` (not owned, must outlive it), timing on `clk`.
  explicit saga_coordinator(Store& store, saga_options options = {}, const postbox::clock& clk = default_clock())
      : store_(&store), options_(std::move(options)), clock_(&clk), jitter_(options_.jitter_seed) {}

  saga_coordinator(const saga_coordinator&) = delete;
  saga_coordinator& operator=(const saga_coordinator&) = delete;

  /// Registers a definition under its name. Throws `conflict` if the name is
  /// taken, `invalid_argument` if it has no steps. Allocates; thread-safe.
  void add(saga_definition definition) {
    if (definition.size() == 0) POSTBOX_THROW(error(errc::invalid_argument, "saga_definition without steps"));
    std::lock_guard lock(mutex_);
    auto name = definition.name();
    auto ptr = std::make_shared<const saga_definition>(std::move(definition));
    if (!definitions_.emplace(std::move(name), std::move(ptr)).second) {
      POSTBOX_THROW(error(errc::conflict, "saga_definition registered twice"));
    }
  }

  /// Starts a saga of `definition` with `data` and runs it to its end in the
  /// calling thread (blocks, including through compensation backoff). Returns
  /// the final state, or: `not_found` (no such definition), `conflict` (the
  /// saga id exists), `store_error`/`busy` (the store failed: the saga is left
  /// as last stored, resumable), `stopped` (the coordinator stopped; resumable).
  /// Allocates; thread-safe.
  result<saga_state> run(std::string_view definition, std::string data = {}, saga_start start = {}) {
    auto def = find(definition);
    if (!def) return errc::not_found;
    if (stop_.stop_requested()) return errc::stopped;
    saga_state st;
    st.saga_id = start.saga_id.empty() ? message_id::generate(*clock_).to_string() : std::move(start.saga_id);
    st.definition = def->name();
    st.data = std::move(data);
    st.step_count = static_cast<std::uint32_t>(def->size());
    st.started_at = clock_->now();
    const message_id first = message_id::generate(*clock_);
    st.correlation_id = start.correlation_id.is_nil() ? first : start.correlation_id;
    st.last_event_id = start.causation_id;
    in_flight guard(*this, st.saga_id);
    if (!guard.owned()) return errc::busy;
    if (auto ec = transition(st, saga_events::started, {}, true, first); ec != errc::ok) return ec;
    return drive(std::move(st), *def);
  }

  /// Continues one unfinished saga from its stored state (emitting
  /// "saga.resumed") to its end, as `run` does. Returns `not_found` (unknown
  /// id or definition), `conflict` (the definition's step count changed),
  /// `busy` (the saga is running in this coordinator), or the final state of
  /// a saga that had already finished. Blocks; thread-safe.
  result<saga_state> resume(std::string_view saga_id) {
    if (stop_.stop_requested()) return errc::stopped;
    in_flight guard(*this, std::string(saga_id));
    if (!guard.owned()) return errc::busy;
    auto loaded = store_->load(saga_id);
    if (!loaded) return loaded.status();
    saga_state st = std::move(*loaded);
    if (st.finished()) return st;
    auto def = find(st.definition);
    if (!def) return errc::not_found;
    if (def->size() != st.step_count) return errc::conflict;
    if (auto ec = transition(st, saga_events::resumed, event_at(st)); ec != errc::ok) return ec;
    return drive(std::move(st), *def);
  }

  /// Loads every unfinished saga from the store and resumes each in turn, in
  /// the calling thread (forward or compensating, where it stopped). Returns
  /// one entry per saga found; a failure to list the store throws
  /// `postbox::error`. Blocks; allocates; thread-safe.
  std::vector<saga_resumed> resume_all() {
    auto pending = store_->load_unfinished();
    if (!pending) POSTBOX_THROW(error(pending.status(), "saga_coordinator::resume_all: cannot list sagas"));
    detail::dependent_t<std::vector<saga_resumed>, Store> out;  // dependent_t: detail/dependent.hpp
    out.reserve(pending->size());
    for (const auto& st : *pending) out.push_back(saga_resumed{st.saga_id, resume(st.saga_id)});
    return out;
  }

  /// Stops the coordinator for good: running actions see their stop token,
  /// waits for a compensation retry end, and every `run`/`resume` returns
  /// `stopped` at its next transition, leaving the saga stored and resumable.
  /// Non-blocking; thread-safe.
  void stop() {
    stop_.request_stop();
    std::lock_guard lock(mutex_);  // a waiter checks the stop flag under this lock
    cv_.notify_all();
  }

  /// Number of exceptions thrown by the event sink (and swallowed).
  [[nodiscard]] std::uint64_t sink_failures() const noexcept {
    // relaxed: a statistic; publishes nothing.
    return sink_failures_.load(std::memory_order_relaxed);
  }

  /// The clock every deadline and retry reads.
  [[nodiscard]] const postbox::clock& get_clock() const noexcept { return *clock_; }

 private:
  using step_spec = saga_definition::step_spec;

  // Marks a saga id as running here for the life of a run/resume.
  class in_flight {
   public:
    in_flight(saga_coordinator& c, std::string id) : c_(c), id_(std::move(id)) {
      std::lock_guard lock(c_.mutex_);
      owned_ = c_.running_.insert(id_).second;
    }
    ~in_flight() {
      if (!owned_) return;
      std::lock_guard lock(c_.mutex_);
      c_.running_.erase(id_);
    }
    in_flight(const in_flight&) = delete;
    in_flight& operator=(const in_flight&) = delete;
    [[nodiscard]] bool owned() const noexcept { return owned_; }

   private:
    saga_coordinator& c_;
    std::string id_;
    bool owned_ = false;
  };

  std::shared_ptr<const saga_definition> find(std::string_view name) const {
    std::lock_guard lock(mutex_);
    const auto it = definitions_.find(name);
    return it == definitions_.end() ? nullptr : it->second;
  }

  // The event payload describing `st` (step fields from the current step).
  static saga_event event_at(const saga_state& st, std::string_view step_name = {}, std::uint32_t step_index = 0,
                             std::string reason = {}) {
    saga_event ev;
    ev.saga_id = st.saga_id;
    ev.definition = st.definition;
    ev.step = std::string(step_name);
    ev.step_index = step_index;
    ev.phase = st.phase;
    ev.outcome = st.outcome;
    ev.attempt = st.attempt;
    ev.reason = std::move(reason);
    return ev;
  }

  // Stores `st` as the next transition and then emits its event (causation =
  // the previous event). On a store failure nothing is emitted and the caller
  // must not run anything further: the stored state is still the previous one.
  errc transition(saga_state& st, std::string_view type, saga_event ev, bool create = false,
                  message_id id = message_id{}) {
    envelope<saga_event> env;
    env.id = id.is_nil() ? message_id::generate(*clock_) : id;
    env.type = std::string(type);
    env.kind = message_kind::event;
    env.occurred_at = clock_->now();
    env.correlation_id = st.correlation_id;
    env.causation_id = st.last_event_id;
    env.producer = options_.producer;
    env.partition_key = st.saga_id;
    if (create) ev = event_at(st);
    ev.phase = st.phase;
    ev.outcome = st.outcome;
    ev.attempt = st.attempt;
    env.payload = std::move(ev);

    saga_state next = st;
    next.last_event_id = env.id;
    next.updated_at = env.occurred_at;
    ++next.version;
    const errc ec = create ? store_->create(next) : store_->save(next);
    if (ec != errc::ok) return ec;
    st = std::move(next);
    emit(env);
    return errc::ok;
  }

  void emit(const envelope<saga_event>& env) noexcept {
    if (!options_.on_event) return;
    POSTBOX_TRY { options_.on_event(env); }
    POSTBOX_CATCH_ALL {
      // relaxed: a statistic only.
      sink_failures_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Calls a step function; an exception becomes a failure with its text.
  static step_result invoke(const detail::saga_function& fn, step_context& ctx) noexcept {
    if (!fn) return step_result::success();
    POSTBOX_TRY { return fn(ctx); }
#if POSTBOX_HAS_EXCEPTIONS
    catch (const std::exception& e) {
      POSTBOX_TRY { return step_result::failure(e.what()); }
      POSTBOX_CATCH_ALL { return step_result{false, {}}; }
    }
#endif
    POSTBOX_CATCH_ALL {
      POSTBOX_TRY { return step_result::failure("unknown exception"); }
      POSTBOX_CATCH_ALL { return step_result{false, {}}; }
    }
  }

  // Waits on the clock until `when` or a stop. Returns false when stopped.
  bool wait_until(time_point when) {
    std::unique_lock lock(mutex_);
    while (!stop_.stop_requested() && clock_->now() < when) clock_->wait_until(lock, cv_, when);
    return !stop_.stop_requested();
  }

  std::uint64_t next_jitter() {
    std::lock_guard lock(mutex_);
    return jitter_.next();
  }

  // The state machine. Every branch stores its transition before the next
  // action or compensation can run.
  result<saga_state> drive(saga_state st, const saga_definition& def) {
    for (;;) {
      if (st.finished()) return st;
      if (stop_.stop_requested()) return errc::stopped;
      const errc ec = st.phase == saga_phase::forward ? forward_once(st, def) : compensate_once(st, def);
      if (ec != errc::ok) return ec;
    }
  }

  errc forward_once(saga_state& st, const saga_definition& def) {
    if (st.current_step >= st.step_count) {
      st.outcome = saga_outcome::completed;
      return transition(st, saga_events::completed, event_at(st));
    }
    const std::uint32_t k = st.current_step;
    const step_spec& spec = def.steps()[k];
    ++st.attempt;
    if (!st.step_deadline && spec.timeout) st.step_deadline = clock_->now() + *spec.timeout;
    if (auto ec = transition(st, saga_events::step_started, event_at(st, spec.name, k)); ec != errc::ok) return ec;

    if (st.step_deadline && clock_->now() >= *st.step_deadline) {
      return fail_step(st, spec, k, true, "deadline passed before the step could run");
    }
    std::string data = st.data;
    step_result r;
    {
      std::stop_source step_stop;
      std::stop_callback forward_stop(stop_.get_token(), [&step_stop]() noexcept { step_stop.request_stop(); });
      std::optional<timer_service::timer_id> timer;
      detail::dependent_t<std::optional<scheduled>, Store> timeout;
      if (options_.timers && st.step_deadline) {
        timer = options_.timers->schedule_at(*st.step_deadline, [s = step_stop]() mutable { s.request_stop(); });
      } else if (options_.step_scheduler && st.step_deadline) {
        timeout = options_.step_scheduler->call_at(*st.step_deadline, [s = step_stop]() mutable { s.request_stop(); });
      }
      step_context ctx(st, spec.name, k, st.attempt, data, step_stop.get_token(), *clock_);
      r = invoke(spec.action, ctx);
      if (timer) (void)options_.timers->cancel(*timer);
      if (timeout) (void)timeout->cancel();  // revoked: a completed step's timeout never fires
    }
    const bool late = st.step_deadline && clock_->now() >= *st.step_deadline;
    if (late) {
      if (r.ok) st.data = std::move(data);  // the compensation may need what the late action recorded
      return fail_step(st, spec, k, true, r.ok ? "deadline passed" : "deadline passed: " + r.reason);
    }
    if (!r.ok && stop_.stop_requested()) return errc::stopped;  // interrupted: re-run on resume
    if (!r.ok) return fail_step(st, spec, k, false, std::move(r.reason));
    st.data = std::move(data);
    st.completed_steps = k + 1;
    st.current_step = k + 1;
    st.attempt = 0;
    st.step_deadline.reset();
    return transition(st, saga_events::step_completed, event_at(st, spec.name, k));
  }

  // Step k failed: switch to compensating. A step that failed by itself had
  // no effect; one that ran past its deadline may have, so it is undone too.
  errc fail_step(saga_state& st, const step_spec& spec, std::uint32_t k, bool undo_self, std::string reason) {
    st.phase = saga_phase::compensating;
    st.current_step = undo_self ? k + 1 : k;
    st.attempt = 0;
    st.step_deadline.reset();
    st.next_attempt_at.reset();
    st.failure_reason = spec.name + ": " + reason;
    return transition(st, saga_events::step_failed, event_at(st, spec.name, k, std::move(reason)));
  }

  errc compensate_once(saga_state& st, const saga_definition& def) {
    if (st.current_step == 0) {
      st.outcome = saga_outcome::compensated;
      return transition(st, saga_events::compensated, event_at(st, {}, 0, st.failure_reason));
    }
    const std::uint32_t k = st.current_step - 1;
    const step_spec& spec = def.steps()[k];
    if (st.next_attempt_at && !wait_until(*st.next_attempt_at)) return errc::stopped;

    std::string data = st.data;
    step_context ctx(st, spec.name, k, st.attempt + 1, data, stop_.get_token(), *clock_);
    step_result r = invoke(spec.compensation, ctx);
    if (r.ok) {
      st.data = std::move(data);
      st.current_step = k;
      st.attempt = 0;
      st.next_attempt_at.reset();
      return transition(st, saga_events::step_compensated, event_at(st, spec.name, k));
    }
    if (stop_.stop_requested()) return errc::stopped;  // interrupted: re-run on resume
    ++st.attempt;
    const bool exhausted = options_.compensation_retry.exhausted(st.attempt);
    if (exhausted) {
      st.next_attempt_at.reset();
    } else {
      st.next_attempt_at = clock_->now() + options_.compensation_retry.backoff(st.attempt, next_jitter());
    }
    if (auto ec = transition(st, saga_events::compensation_failed, event_at(st, spec.name, k, r.reason));
        ec != errc::ok) {
      return ec;
    }
    if (!exhausted) return errc::ok;
    st.outcome = saga_outcome::failed;
    st.failure_reason = spec.name + ": compensation exhausted after " + std::to_string(st.attempt) +
                        " attempts: " + r.reason;
    return transition(st, saga_events::failed, event_at(st, spec.name, k, st.failure_reason));
  }

  Store* store_;
  saga_options options_;
  const postbox::clock* clock_;
  mutable std::mutex mutex_;  // guards definitions_, running_, jitter_; the wait mutex
  std::condition_variable cv_;
  detail::dependent_t<std::map<std::string, std::shared_ptr<const saga_definition>, std::less<>>, Store> definitions_;
  detail::dependent_t<std::set<std::string, std::less<>>, Store> running_;
  detail::saga_jitter jitter_;
  std::stop_source stop_;
  /// Exceptions thrown by the event sink. Incremented by any thread running
  /// a saga, read by sink_failures(); relaxed both ways (a statistic).
  std::atomic<std::uint64_t> sink_failures_{0};
};

POSTBOX_END_NAMESPACE
