// SPDX-License-Identifier: MIT
// postbox's awaitable machinery: the scheduler concept, run_queue, the waiting operation every awaitable shares, async_sleep and task<T>.
#pragma once

// Design: docs/design/async.md. <postbox/async.hpp> includes this and the
// awaitable forms of each concept (async/channel.hpp, topic.hpp, stream.hpp,
// select.hpp); a header that only needs task<T> and a scheduler (consumer.hpp)
// includes this one alone.
//
// * An awaitable operation first tries the channel's own non-blocking
//   operation. Only when that finds nothing to do does it register a waker
//   (detail::async_op) with the event count blocking callers park on, re-try,
//   and suspend. Nothing is allocated and no lock is taken on the fast path.
// * A notifier calls waker::claim() with the event count's registry lock
//   held, so it must not run the coroutine: it claims the one-shot resume
//   (a state word: a wake, a stop request and a deadline race for it and
//   exactly one wins) and returns the post of a `resumption` to the
//   operation's scheduler, which the notifier runs after releasing the lock
//   (stop callbacks and timers call wake(), which claims and posts at once).
//   The resumption runs later on a scheduler thread: it re-tries, and either
//   resumes the coroutine with the outcome or re-arms (a spurious wake).
// * There is no scheduler that resumes on the notifying thread: the notifier
//   is inside the registry mutex (and, for a blocking sender, inside code that
//   is not ours), so an inline resume would run the coroutine body under a
//   lock it may need itself. Every scheduler posts; the coroutine resumes on
//   whatever thread runs the scheduler (run_queue::run, an io_context, ...).
// * Destroying a suspended frame is safe: the awaiter's destructor
//   unregisters its waker (the registry lock orders this after any claim in
//   progress), drops its stop callbacks and timer, and cancels the
//   heap-allocated resume token a claimed wake may already have posted; the
//   scheduler then runs a canceled token, which does nothing.
// * A notifier's post may still be running after the operation it woke has
//   completed and gone: the post uses only the token (it holds a reference)
//   and the scheduler. Schedulers with a detail::post_tracker (run_queue,
//   executor_scheduler) count such posts and their destructors wait for
//   them, and a token that owns its scheduler (the Asio adapter's
//   per-operation token, resume_token::owns_scheduler) keeps it alive through
//   the post's own reference, so the woken coroutine never waits for its
//   notifier; for any other scheduler the operation waits for the post to
//   return before it goes (resume_token::posting).

#include <postbox/clock.hpp>
#include <postbox/config.hpp>
#include <postbox/detail/backoff.hpp>
#include <postbox/detail/waker.hpp>
#include <postbox/error.hpp>
#include <postbox/timer_service.hpp>

#include <atomic>
#include <concepts>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <type_traits>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

class resumption;

namespace detail {

class async_op;

/// A scheduler's count of notifiers between claiming a wake (under an event
/// count's registry lock) and returning from the deferred post into that
/// scheduler. A scheduler that has one (`postbox_post_tracker()`, see
/// async_scheduler) waits for it in its destructor, so an operation that
/// uses it need not wait for a post still in flight when it completes: the
/// woken coroutine goes on at once (see async_op::abandon). Thread-safe;
/// never allocates.
class post_tracker {
 public:
  post_tracker() = default;
  post_tracker(const post_tracker&) = delete;
  post_tracker& operator=(const post_tracker&) = delete;
  ~post_tracker() = default;

  /// A claim that will post here (under the registry lock; relaxed: the
  /// owner's unregister takes that lock after it, and whoever destroys the
  /// scheduler is ordered after the operation's end, so wait_idle sees it).
  void enter() noexcept { n_.fetch_add(1, std::memory_order_relaxed); }
  /// The claimed post has returned: the notifier touches the scheduler no
  /// more. release: pairs with the acquire in wait_idle().
  void leave() noexcept { n_.fetch_sub(1, std::memory_order_release); }
  /// Waits (yielding) until no claimed post is in flight. A post is a few
  /// non-blocking steps, so this is short.
  void wait_idle() const noexcept {
    backoff wait;
    // acquire: pairs with leave(), so the notifier's accesses to the
    // scheduler happen before the scheduler goes.
    while (n_.load(std::memory_order_acquire) != 0) wait.snooze();
  }

 private:
  /// Claimed posts not yet returned: incremented (relaxed) by a claim,
  /// decremented (release) after its post, read (acquire) by wait_idle().
  std::atomic<std::uint32_t> n_{0};
};

/// The one-shot "resume this operation" that a claimed wake posts to a
/// scheduler. Lives on the heap so a scheduler queue may outlive the frame
/// that owns the operation; the operation cancels it when it goes away.
struct resume_token {
  static constexpr std::uint32_t queued = 0;    // runnable (or not yet posted); may be canceled
  static constexpr std::uint32_t running = 1;   // a resumption is re-trying the operation
  static constexpr std::uint32_t canceled = 2;  // the operation is gone: running does nothing

  explicit resume_token(async_op* o) noexcept : op(o) {}
  resume_token(const resume_token&) = delete;
  resume_token& operator=(const resume_token&) = delete;
  /// Virtual: an operation may allocate a token that owns its scheduler
  /// (the Asio adapter's), freed by the last owner through release().
  virtual ~resume_token() = default;

  /// Owners: the operation (while it keeps the token for the next wait) and
  /// each posted resumption. Increment relaxed (a new owner is made by an
  /// existing one); decrement acq_rel so the last owner's delete follows
  /// every other owner's accesses.
  std::atomic<std::uint32_t> refs{1};
  /// queued/running/canceled. The resumption's CAS queued -> running
  /// (acquire) pairs with the operation's release stores (arming, see
  /// async_op::settle, orders the reset to `queued`); the destructor's CAS
  /// queued -> canceled (acq_rel) races the resumption's CAS: exactly one wins.
  std::atomic<std::uint32_t> state{queued};
  async_op* const op;
  /// Link in a run_queue; guarded by that queue's mutex.
  resume_token* next = nullptr;
  /// Where a claimed wake posts (async_op::claim, after the event count's
  /// registry lock is released): the operation's scheduler, copied by
  /// begin() before the arming CAS (release) publishes the token; read by
  /// the claiming notifier after its acquire load of the state.
  void* sched_self = nullptr;
  void (*sched_post)(void*, resumption&&) noexcept = nullptr;
  /// The scheduler's post_tracker, or null (then `posting` below counts the
  /// claims instead); copied by begin() with the two above.
  post_tracker* sched_posts = nullptr;
  /// Set (before the token is published) by a derived token that owns the
  /// scheduler it posts to (the Asio adapter's): a claim then counts nowhere,
  /// since the deferred post's own reference keeps that scheduler alive
  /// until it returns and nobody else waits for it.
  bool owns_scheduler = false;
  /// Notifiers between a claim and the end of its deferred post, for a
  /// scheduler without a post_tracker. Incremented
  /// (relaxed) under the registry lock, which the owner's unregister takes
  /// after it (so the owner sees it); decremented (release) after the post;
  /// abandon() waits (acquire) for zero, so no post reaches the scheduler
  /// once the operation is gone. A counter, not a flag: a re-armed operation
  /// can be claimed again before the previous notifier has finished.
  std::atomic<std::uint32_t> posting{0};
};

inline void release(resume_token* t) noexcept {
  // acq_rel: see resume_token::refs.
  if (t->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete t;
}

}  // namespace detail

/// A posted "re-try this suspended operation and resume its coroutine":
/// what a scheduler receives. Move-only; run it once with `operator()` (on
/// the scheduler's thread); destroying it without running it is allowed and
/// leaves that coroutine suspended (its frame can still be destroyed safely).
/// Running a resumption whose coroutine frame was destroyed does nothing.
class resumption {
 public:
  resumption() = default;
  resumption(resumption&& o) noexcept : t_(std::exchange(o.t_, nullptr)) {}
  resumption& operator=(resumption&& o) noexcept {
    if (this != &o) {
      if (t_ != nullptr) detail::release(t_);
      t_ = std::exchange(o.t_, nullptr);
    }
    return *this;
  }
  resumption(const resumption&) = delete;
  resumption& operator=(const resumption&) = delete;
  ~resumption() {
    if (t_ != nullptr) detail::release(t_);
  }

  /// Re-tries the operation; resumes its coroutine (or calls its completion
  /// handler) if it is done, else re-arms it. Runs at most once. Never
  /// allocates; an exception from the resumed code propagates.
  void operator()();

  explicit operator bool() const noexcept { return t_ != nullptr; }

  /// Intrusive hand-off for schedulers that queue tokens themselves.
  [[nodiscard]] detail::resume_token* release_token() noexcept { return std::exchange(t_, nullptr); }
  /// Takes back a token given away by release_token().
  [[nodiscard]] static resumption adopt(detail::resume_token* t) noexcept { return resumption(t); }

 private:
  friend class detail::async_op;
  explicit resumption(detail::resume_token* t) noexcept : t_(t) {}
  detail::resume_token* t_ = nullptr;
};

/// An async scheduler: where suspended postbox operations resume. `post(r)` must
/// queue the resumption and return without running it (it may be called
/// with a lock held: a stop callback's, a timer's, an operations registry's;
/// a destroyed frame waits for a post in progress), must not block on anything that
/// can wait for a postbox event count, and must not throw. Whoever runs the
/// queue later runs `r()`, and that is the thread the coroutine resumes on.
/// Optionally, `s.postbox_post_tracker()` returns a detail::post_tracker
/// whose wait_idle() the scheduler's destructor calls first: then an
/// operation completing on it does not wait for the notifier that woke it to
/// return from `post` (run_queue and executor_scheduler do this).
template <class S>
concept async_scheduler = requires(S& s, resumption r) {
  { s.post(std::move(r)) } noexcept;
};

namespace detail {
template <class S>
concept tracks_posts = requires(S& s) {
  { s.postbox_post_tracker() } noexcept -> std::same_as<post_tracker&>;
};
}  // namespace detail

/// A non-owning, type-erased reference to a scheduler. The scheduler must
/// outlive every operation that uses it. Trivially copyable.
class scheduler_ref {
 public:
  scheduler_ref() = default;
  template <async_scheduler S>
    requires(!std::is_same_v<std::remove_cvref_t<S>, scheduler_ref>)
  scheduler_ref(S& s) noexcept  // NOLINT(google-explicit-constructor)
      : self_(&s), post_([](void* self, resumption&& r) noexcept { static_cast<S*>(self)->post(std::move(r)); }) {
    if constexpr (detail::tracks_posts<S>) posts_ = &s.postbox_post_tracker();
  }

  void post(resumption r) const noexcept { post_(self_, std::move(r)); }
  explicit operator bool() const noexcept { return self_ != nullptr; }

 private:
  friend class detail::async_op;  // copies the scheduler into its resume token
  void* self_ = nullptr;
  void (*post_)(void*, resumption&&) noexcept = nullptr;
  detail::post_tracker* posts_ = nullptr;  // the scheduler's, if it has one
};

/// A thread-safe FIFO of resumptions: the simplest scheduler. Coroutines
/// resume on whichever thread calls `run_one`, `poll` or `run` (one thread
/// for a deterministic event loop, several for a pool). `post` takes a
/// mutex and never allocates (the queue is intrusive); it makes a futex
/// syscall only when a `run` thread sleeps. Destroying the queue first
/// waits for notifiers still inside a post into it (a few instructions
/// each), then drops what is still queued (those coroutines stay suspended).
class run_queue {
 public:
  run_queue() = default;
  run_queue(const run_queue&) = delete;
  run_queue& operator=(const run_queue&) = delete;
  ~run_queue() {
    posts_.wait_idle();
    while (detail::resume_token* t = pop()) detail::release(t);
  }

  /// See async_scheduler: lets operations leave the wait for a notifier's
  /// post to this destructor.
  [[nodiscard]] detail::post_tracker& postbox_post_tracker() noexcept { return posts_; }

  /// Queues `r`. Thread-safe; never blocks beyond the queue's mutex; never
  /// allocates; wakes one thread sleeping in `run`, if any.
  void post(resumption r) noexcept {
    detail::resume_token* t = r.release_token();
    if (t == nullptr) return;
    {
      std::lock_guard lock(mutex_);
      t->next = nullptr;
      if (tail_ != nullptr) {
        tail_->next = t;
      } else {
        head_ = t;
      }
      tail_ = t;
      ++size_;
    }
    // seq_cst: the Dekker half of post; a runner's seq_cst increment of
    // sleepers_ is followed by its re-check under mutex_ (see run), so either
    // we see it here or its re-check sees our push.
    if (sleepers_.load(std::memory_order_seq_cst) != 0) signal(false);
  }

  /// Runs one queued resumption if there is one. Never blocks (beyond the
  /// resumed code). Thread-safe.
  bool run_one() {
    detail::resume_token* t = pop();
    if (t == nullptr) return false;
    resumption r = resumption::adopt(t);
    r();
    return true;
  }

  /// Runs queued resumptions, including those posted meanwhile, until the
  /// queue is empty; returns how many ran. Thread-safe.
  std::size_t poll() {
    std::size_t n = 0;
    while (run_one()) ++n;
    return n;
  }

  /// Runs resumptions as they arrive, blocking while the queue is empty,
  /// until `stop` is stopped; returns how many ran. Thread-safe: several
  /// threads may run one queue (a pool).
  std::size_t run(std::stop_token stop) {
    std::size_t n = 0;
    const std::stop_callback on_stop(stop, [this] { signal(true); });
    for (;;) {
      if (detail::resume_token* t = pop()) {
        resumption r = resumption::adopt(t);
        r();
        ++n;
        continue;
      }
      if (stop.stop_requested()) return n;
      // acquire: pairs with signal()'s release bump, though the mutex in the
      // re-check below already orders what matters; read before announcing
      // ourselves, so a signal after the re-check changes it and wait returns.
      const std::uint32_t key = epoch_.load(std::memory_order_acquire);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);  // seq_cst: see post()
      bool idle = false;
      {
        std::lock_guard lock(mutex_);
        idle = head_ == nullptr;
      }
      if (idle && !stop.stop_requested()) epoch_.wait(key, std::memory_order_acquire);
      // relaxed: only gates whether post() signals; a stale count costs one
      // spurious signal, never a lost one.
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  /// Queued resumptions right now (a snapshot). Thread-safe.
  [[nodiscard]] std::size_t size_approx() const {
    std::lock_guard lock(mutex_);
    return size_;
  }

 private:
  detail::resume_token* pop() {
    std::lock_guard lock(mutex_);
    return pop_locked();
  }
  detail::resume_token* pop_locked() noexcept {
    detail::resume_token* t = head_;
    if (t == nullptr) return nullptr;
    head_ = t->next;
    if (head_ == nullptr) tail_ = nullptr;
    --size_;
    return t;
  }

  /// Bumps the epoch and wakes one sleeping runner (a post: one resumption
  /// to run) or all of them (a stop request). A runner not yet in its wait
  /// sees the new epoch and does not sleep.
  void signal(bool all) noexcept {
    // release: pairs with the acquire loads in run(); the futex word changes
    // before the wake, so a runner about to wait on the old value returns.
    epoch_.fetch_add(1, std::memory_order_release);
    if (all) {
      epoch_.notify_all();
    } else {
      epoch_.notify_one();
    }
  }

  detail::post_tracker posts_;
  mutable std::mutex mutex_;
  /// Futex word of the sleeping runners: bumped (release) by signal(), read
  /// (acquire) by run() before it announces itself and waits on it.
  std::atomic<std::uint32_t> epoch_{0};
  /// Runners between announcing themselves and leaving the wait. Incremented
  /// seq_cst in run() (then the queue is re-checked under mutex_), read
  /// seq_cst by post() after its push: the Dekker pair that keeps a post from
  /// going unseen by a runner about to sleep.
  std::atomic<std::uint32_t> sleepers_{0};
  detail::resume_token* head_ = nullptr;  // guarded by mutex_
  detail::resume_token* tail_ = nullptr;  // guarded by mutex_
  std::size_t size_ = 0;                  // guarded by mutex_
};

static_assert(async_scheduler<run_queue>);

/// A deadline for an awaitable operation: the operation gives up with
/// `timeout` once `timers` has run the timer set for `at` (on the timer
/// service's clock; a manual_clock in tests, with `run_due()`), or when it
/// finds `at` passed on that clock while re-trying.
struct async_deadline {
  timer_service* timers = nullptr;
  time_point at = time_point::max();
};

namespace detail {

/// A waiting operation: the waker event counts call, the one-shot claim, the
/// resume token and the re-try loop, shared by the coroutine awaitables and
/// the Asio adapter's completion-handler operations. See the file comment.
class async_op : public waker {
 public:
  /// Called by a notifying event count (registry mutex held), a stop
  /// callback or a timer: claims the resume if the operation is suspended
  /// and posts it; if the operation is re-trying, tells it to re-try again.
  /// Thread-safe; never blocks beyond the scheduler's post; never allocates.
  void wake() noexcept final {
    // acquire: pairs with the release CAS that armed the operation, so
    // token_ and sched_ (written before it) are visible here.
    std::uint32_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (s == checking) {
        // acq_rel: the notifier's condition write happens before the
        // owner's failed arming CAS reads `notified`, so its re-try sees it.
        if (state_.compare_exchange_weak(s, notified, std::memory_order_acq_rel, std::memory_order_acquire)) return;
      } else if (s == armed) {
        if (state_.compare_exchange_weak(s, fired, std::memory_order_acq_rel, std::memory_order_acquire)) {
          // relaxed: the posted resumption is a new owner made from ours.
          token_->refs.fetch_add(1, std::memory_order_relaxed);
          sched_.post(resumption(token_));
          return;
        }
      } else {
        return;  // notified or fired: a re-try is already due
      }
    }
  }

  /// Called by a notifying event count with its registry lock held: the
  /// claim of wake(), with the post returned to run after the lock is
  /// released (the token, not this object, carries it: the operation may be
  /// gone by then, and abandon() waits for the post to finish). Thread-safe;
  /// never blocks; never allocates.
  deferred_wake claim() noexcept final {
    // acquire: as in wake().
    std::uint32_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (s == checking) {
        // acq_rel: as in wake().
        if (state_.compare_exchange_weak(s, notified, std::memory_order_acq_rel, std::memory_order_acquire)) return {};
      } else if (s == armed) {
        if (state_.compare_exchange_weak(s, fired, std::memory_order_acq_rel, std::memory_order_acquire)) {
          // relaxed: two new owners made from ours, the resumption and the
          // deferred post itself (released when it has posted).
          token_->refs.fetch_add(2, std::memory_order_relaxed);
          if (token_->owns_scheduler) {
            // nothing to count: the post's reference keeps the scheduler
          } else if (token_->sched_posts != nullptr) {
            token_->sched_posts->enter();  // the scheduler waits for it, not we
          } else {
            // relaxed: see resume_token::posting.
            token_->posting.fetch_add(1, std::memory_order_relaxed);
          }
          return {&post_claimed, token_};
        }
      } else {
        return {};
      }
    }
  }

  /// Run by a resumption on its scheduler's thread (never concurrently with
  /// the owner): re-try; re-arm, or finish and complete.
  void resumed() {
    // relaxed: published to the next resumption by the arming CAS (release).
    token_->state.store(resume_token::queued, std::memory_order_relaxed);
    // relaxed: the owner's own transition out of `fired`; no claim acts on it.
    state_.store(checking, std::memory_order_relaxed);
    if (!settle()) return;  // re-armed: this object may be resumed elsewhere now
    disarm();
    complete();  // may destroy this object: nothing may follow
  }

 protected:
  async_op() = default;
  ~async_op() = default;
  async_op(const async_op&) = delete;
  async_op& operator=(const async_op&) = delete;

  static constexpr std::uint32_t checking = 0;  // the owner is re-trying; a wake asks for another re-try
  static constexpr std::uint32_t notified = 1;  // a wake arrived while checking
  static constexpr std::uint32_t armed = 2;     // suspended: the next wake claims the resume
  static constexpr std::uint32_t fired = 3;     // claimed: a resumption is posted

  /// Stores the outcome and returns true if the operation is finished
  /// (completed, closed, canceled or timed out). Never blocks.
  virtual bool try_complete() noexcept = 0;
  /// Registers with the event counts, stop tokens and timers. May allocate.
  virtual void register_sources() = 0;
  /// Undoes register_sources(); after it returns no wake() is running or
  /// will run on this object.
  virtual void unregister_sources() noexcept = 0;
  /// Delivers the outcome (resumes the coroutine or calls the handler).
  virtual void complete() = 0;

  /// Starts waiting after the fast path found nothing: allocates the token,
  /// registers, re-tries. Returns true if the operation finished without
  /// suspending (then nothing is registered); false once it is armed (then
  /// the caller must not touch this object: it may already be resuming).
  bool begin(scheduler_ref s) {
    if (!s) POSTBOX_THROW(error(errc::invalid_argument, "postbox async operation awaited without a scheduler"));
    sched_ = s;
    if (token_ == nullptr) token_ = new resume_token(this);
    token_->sched_self = s.self_;
    token_->sched_post = s.post_;
    token_->sched_posts = s.posts_;
    // relaxed: no claim can run before register_sources publishes us.
    state_.store(checking, std::memory_order_relaxed);
    register_sources();
    registered_ = true;
    if (!settle()) return false;
    disarm();
    return true;
  }

  /// Before begin(): use `t` (made for this operation, refs 1) as the resume
  /// token, e.g. one that owns the scheduler begin() is given, so a post in
  /// flight never outlives what it posts into. Takes ownership.
  void adopt_token(resume_token* t) noexcept { token_ = t; }

  /// For the owner's destructor (the most derived one, so the virtual calls
  /// reach it): unregisters, then cancels a resumption already posted.
  void abandon() noexcept {
    disarm();
    if (token_ != nullptr) {
      // A notifier that claimed us before disarm() may still be posting:
      // unless the scheduler waits for such posts itself (post_tracker),
      // wait for it (it is inside a non-blocking post), so nothing reaches
      // the scheduler after we are gone. acquire: pairs with its release.
      backoff wait;
      while (token_->posting.load(std::memory_order_acquire) != 0) wait.snooze();
      std::uint32_t expected = resume_token::queued;
      // acq_rel: races the resumption's CAS; see resume_token::state.
      token_->state.compare_exchange_strong(expected, resume_token::canceled, std::memory_order_acq_rel,
                                            std::memory_order_relaxed);
      release(token_);
      token_ = nullptr;
    }
  }

 private:
  /// The deferred part of claim(): posts the claimed resumption, then lets
  /// abandon() go on and drops the post's own reference.
  static void post_claimed(void* p) noexcept {
    auto* t = static_cast<resume_token*>(p);
    post_tracker* posts = t->sched_posts;
    const bool owned = t->owns_scheduler;
    t->sched_post(t->sched_self, resumption(t));
    if (owned) {
      // the release below ends the post's hold on the token's scheduler
    } else if (posts != nullptr) {
      posts->leave();  // the scheduler's destructor may go on now
    } else {
      // release: pairs with the acquire in abandon().
      t->posting.fetch_sub(1, std::memory_order_release);
    }
    release(t);
  }

  void disarm() noexcept {
    if (registered_) unregister_sources();
    registered_ = false;
  }

  /// Re-try until finished (true) or armed (false). The waker is registered.
  bool settle() noexcept {
    for (;;) {
      if (try_complete()) return true;
      std::uint32_t expected = checking;
      // release: publishes token_, sched_ and the token's reset to wake();
      // acquire on failure: pairs with the wake() that set `notified`.
      if (state_.compare_exchange_strong(expected, armed, std::memory_order_acq_rel, std::memory_order_acquire)) {
        return false;  // nothing may follow: a wake may resume us right now
      }
      // relaxed: notified -> checking is the owner's; wake() never acts on it.
      state_.store(checking, std::memory_order_relaxed);
    }
  }

  /// checking/notified/armed/fired. Written by the owner (the awaiting
  /// coroutine or a resumption: never two at once) and by wake() (CAS
  /// checking -> notified, armed -> fired); see the comments at each access.
  std::atomic<std::uint32_t> state_{checking};
  resume_token* token_ = nullptr;  // owner's; read by wake() after the arming CAS
  scheduler_ref sched_;            // owner's; read by wake() after the arming CAS
  bool registered_ = false;        // owner only
};

/// Wakes an async_op from a stop callback or a timer.
struct wake_op {
  async_op* op;
  void operator()() const noexcept { op->wake(); }
};

/// The stop token and deadline of one awaitable operation.
class op_limits {
 public:
  op_limits() = default;
  op_limits(std::stop_token stop, async_deadline deadline) noexcept : stop_(std::move(stop)), deadline_(deadline) {}
  /// Moves the token and the deadline; only before register_sources().
  op_limits(op_limits&& o) noexcept : stop_(std::move(o.stop_)), deadline_(o.deadline_) {}
  op_limits& operator=(op_limits&&) = delete;
  ~op_limits() = default;

  [[nodiscard]] bool stop_requested() const noexcept { return stop_.stop_requested(); }
  [[nodiscard]] bool timed_out() const noexcept {
    if (deadline_.timers == nullptr) return false;
    if (timeout_ && timeout_->stop_requested()) return true;
    return deadline_.timers->get_clock().now() >= deadline_.at;
  }
  void register_sources(async_op& op) {
    if (stop_.stop_possible()) on_stop_.emplace(stop_, wake_op{&op});
    if (deadline_.timers != nullptr && deadline_.at != time_point::max()) {
      timeout_.emplace();
      on_timeout_.emplace(timeout_->get_token(), wake_op{&op});
      timer_ = deadline_.timers->schedule_at(deadline_.at, [src = *timeout_]() mutable { src.request_stop(); });
    }
  }
  void unregister_sources() noexcept {
    // Each reset waits for a callback running on another thread to finish.
    on_stop_.reset();
    if (timeout_) {
      POSTBOX_TRY { (void)deadline_.timers->cancel(timer_); }
      POSTBOX_CATCH_ALL {}
      on_timeout_.reset();
      timeout_.reset();
    }
  }

 private:
  std::stop_token stop_;
  async_deadline deadline_;
  std::optional<std::stop_callback<wake_op>> on_stop_;
  std::optional<std::stop_source> timeout_;  // requested by the deadline's timer
  std::optional<std::stop_callback<wake_op>> on_timeout_;
  timer_service::timer_id timer_ = 0;
};

/// Finds the scheduler of the awaiting coroutine: an explicit one, else its
/// promise's `postbox_scheduler()` (postbox::task provides it).
template <class Promise>
scheduler_ref scheduler_of(std::coroutine_handle<Promise> h, scheduler_ref explicit_one) {
  if (explicit_one) return explicit_one;
  if constexpr (requires { h.promise().postbox_scheduler(); }) {
    return h.promise().postbox_scheduler();
  } else {
    return {};
  }
}

/// One attempt at an operation under its limits, in the order every waiter
/// uses: a stop request wins, then the operation itself, then the deadline
/// (so a result that is ready at the deadline is still taken). Stores the
/// outcome in `result` and returns true when there is one. Never blocks.
/// Shared by the coroutine awaiter and the Asio adapter's operation.
template <class Op, class Result>
bool complete_op_once(op_limits& limits, Op& op, std::optional<Result>& result) noexcept {
  if (limits.stop_requested()) {
    result.emplace(Op::canceled());
    return true;
  }
  if (std::optional<Result> r = op.try_once()) {
    result.emplace(std::move(*r));
    return true;
  }
  if (limits.timed_out()) {
    result.emplace(Op::timeout());
    return true;
  }
  return false;
}

/// Registers an operation's wait sources (stop token, deadline timer) and
/// the operation's own event-count waker for `waiter`. Either registration
/// may allocate; a throw leaves nothing registered. Shared by the coroutine
/// awaiter and the Asio adapter's operation.
template <class Limits, class Op, class Waiter>
void register_op_sources(Limits& limits, Op& op, Waiter& waiter) {
#if POSTBOX_HAS_EXCEPTIONS
  try {
    limits.register_sources(waiter);
    op.park(waiter);
  } catch (...) {
    limits.unregister_sources();
    throw;
  }
#else
  limits.register_sources(waiter);
  op.park(waiter);
#endif
}

/// The awaiter of every awaitable operation. Movable until awaited.
template <class Op>
class [[nodiscard]] op_awaiter final : public async_op {
 public:
  using result_type = typename Op::result_type;

  op_awaiter(Op op, op_limits limits) noexcept : op_(std::move(op)), limits_(std::move(limits)) {}
  op_awaiter(op_awaiter&& o) noexcept
      : op_(std::move(o.op_)), limits_(std::move(o.limits_)), explicit_sched_(o.explicit_sched_) {}
  op_awaiter& operator=(op_awaiter&&) = delete;
  ~op_awaiter() { abandon(); }

  /// Resume on `s` instead of the awaiting task's scheduler (for coroutine
  /// types other than postbox::task).
  op_awaiter&& on(scheduler_ref s) && noexcept {
    explicit_sched_ = s;
    return std::move(*this);
  }

  bool await_ready() noexcept { return try_complete(); }

  /// The operation, for an adapter that runs it another way (the Asio
  /// forms): only before the awaiter is awaited; the stop token and
  /// deadline stay here (the adapter brings its own).
  Op release_op() && noexcept(std::is_nothrow_move_constructible_v<Op>) { return std::move(op_); }

  template <class Promise>
  bool await_suspend(std::coroutine_handle<Promise> h) {
    handle_ = h;
    return !begin(scheduler_of(h, explicit_sched_));
  }

  /// The outcome; an operation with an `unwrap` (async_select) maps it,
  /// rethrowing a handler's exception.
  auto await_resume() noexcept(std::is_nothrow_move_constructible_v<result_type> && !has_unwrap) {
    if constexpr (has_unwrap) {
      return Op::unwrap(std::move(*result_));
    } else {
      return std::move(*result_);
    }
  }

 private:
  bool try_complete() noexcept override { return complete_op_once(limits_, op_, result_); }
  void register_sources() override { register_op_sources(limits_, op_, *this); }
  void unregister_sources() noexcept override {
    op_.unpark(*this);
    limits_.unregister_sources();
  }
  void complete() override { handle_.resume(); }

  static constexpr bool has_unwrap = requires(result_type&& r) { Op::unwrap(std::move(r)); };

  Op op_;
  op_limits limits_;
  scheduler_ref explicit_sched_;
  std::coroutine_handle<> handle_;
  std::optional<result_type> result_;
};

}  // namespace detail

inline void resumption::operator()() {
  detail::resume_token* t = t_;
  if (t == nullptr) return;
  std::uint32_t expected = detail::resume_token::queued;
  // acquire: pairs with the arming CAS (release) that preceded the post.
  if (t->state.compare_exchange_strong(expected, detail::resume_token::running, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
    t->op->resumed();
  }
  t_ = nullptr;
  detail::release(t);
}

// --- timers ---------------------------------------------------------------------

namespace detail {
/// Waits for nothing but its deadline: the deadline's "timeout" is success.
struct sleep_op {
  using result_type = errc;
  std::optional<result_type> try_once() noexcept { return std::nullopt; }
  void park(waker&) noexcept {}
  void unpark(waker&) noexcept {}
  static result_type canceled() noexcept { return errc::canceled; }
  static result_type timeout() noexcept { return errc::ok; }
};
}  // namespace detail

/// `co_await async_sleep_until(timers, at)`: `errc::ok` once `timers` has
/// run the timer set for `at` (or at once when `at` has passed on its
/// clock), `errc::canceled` when `stop` is stopped first. Suspends, never
/// blocks a thread; resumes on the awaiting task's scheduler. Allocates one
/// timer (and a resume token) when it suspends; destroying the suspended
/// frame cancels the timer. `timers` must outlive the wait.
[[nodiscard]] inline detail::op_awaiter<detail::sleep_op> async_sleep_until(timer_service& timers, time_point at,
                                                                            std::stop_token stop = {}) {
  return {{}, {std::move(stop), {&timers, at}}};
}
/// As async_sleep_until, for `delay` from now on the timer service's clock.
[[nodiscard]] inline detail::op_awaiter<detail::sleep_op> async_sleep_for(timer_service& timers, duration delay,
                                                                          std::stop_token stop = {}) {
  return async_sleep_until(timers, timers.get_clock().now() + delay, std::move(stop));
}

// --- task -----------------------------------------------------------------------

template <class T = void>
class task;

namespace detail {

struct task_promise_base {
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    template <class Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) noexcept {
      task_promise_base& p = h.promise();
      if (p.continuation) return p.continuation;
      // release: the result and the frame's last writes happen before a
      // done() that sees true; pairs with the acquire load there. Nothing
      // may touch the frame after this store (its owner may destroy it).
      p.finished.store(true, std::memory_order_release);
      return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };

  std::suspend_always initial_suspend() const noexcept { return {}; }
  final_awaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
  [[nodiscard]] scheduler_ref postbox_scheduler() const noexcept { return sched; }

  scheduler_ref sched;
  std::coroutine_handle<> continuation;
  std::exception_ptr error;
  /// Set (release) when a started top-level task finishes; read (acquire) by
  /// task::done() on any thread.
  std::atomic<bool> finished{false};
};

template <class T>
struct task_promise : task_promise_base {
  task<T> get_return_object() noexcept;
  template <class U>
    requires std::is_convertible_v<U&&, T>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
  std::optional<T> value;
};

template <>
struct task_promise<void> : task_promise_base {
  task<void> get_return_object() noexcept;
  void return_void() const noexcept {}
  void take() const {
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace detail

/// A lazy coroutine: its body runs when it is started (`start(s)`) or
/// awaited by another task, which it then resumes by symmetric transfer when
/// it finishes. Exceptions propagate to the awaiter (or to `get()`). A task
/// carries its scheduler: postbox operations awaited in it resume there, and
/// an awaited child task inherits it. Destroying a task destroys its frame,
/// also while suspended in a postbox operation (which is then abandoned
/// safely); do that on the scheduler's thread, or when no resumption of it
/// can be running elsewhere. Move-only; one frame allocation per task.
template <class T>
class [[nodiscard]] task {
 public:
  using promise_type = detail::task_promise<T>;
  using value_type = T;

  task() = default;
  task(task&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  task& operator=(task&& o) noexcept {
    if (this != &o) {
      if (h_) h_.destroy();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  task(const task&) = delete;
  task& operator=(const task&) = delete;
  ~task() {
    if (h_) h_.destroy();
  }

  /// Runs the body on the calling thread until it first suspends (or ends);
  /// afterwards it resumes on `s`. Starts once.
  void start(scheduler_ref s) {
    h_.promise().sched = s;
    h_.resume();
  }

  /// Whether a started task has finished. Thread-safe (acquire; see the
  /// promise's `finished`).
  [[nodiscard]] bool done() const noexcept { return h_ && h_.promise().finished.load(std::memory_order_acquire); }

  /// The finished task's value, or its exception rethrown. Call once, after
  /// done().
  T get() { return h_.promise().take(); }

  /// Awaiting a task starts it; the awaiting coroutine resumes when it ends.
  struct awaiter {
    std::coroutine_handle<promise_type> child;
    bool await_ready() const noexcept { return !child || child.done(); }
    template <class Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> parent) noexcept {
      child.promise().continuation = parent;
      if constexpr (requires { parent.promise().postbox_scheduler(); }) {
        if (!child.promise().sched) child.promise().sched = parent.promise().postbox_scheduler();
      }
      return child;
    }
    T await_resume() { return child.promise().take(); }
  };
  awaiter operator co_await() && noexcept { return awaiter{h_}; }

 private:
  friend struct detail::task_promise<T>;
  explicit task(std::coroutine_handle<promise_type> h) noexcept : h_(h) {}
  std::coroutine_handle<promise_type> h_;
};

namespace detail {
template <class T>
task<T> task_promise<T>::get_return_object() noexcept {
  return task<T>(std::coroutine_handle<task_promise<T>>::from_promise(*this));
}
inline task<void> task_promise<void>::get_return_object() noexcept {
  return task<void>(std::coroutine_handle<task_promise<void>>::from_promise(*this));
}
}  // namespace detail

POSTBOX_END_NAMESPACE
