// SPDX-License-Identifier: MIT
// Wing–Gong linearizability check of postbox::channel over many short recorded histories.
#include <postbox/channel.hpp>
#include <postbox/select.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace {

enum class op_kind { send, receive, close };

// One completed operation: what was called, what it returned, and when.
// `value` is the sent value (send) or the received one (receive, -1 = nullopt).
struct op {
  op_kind kind = op_kind::close;
  int value = -1;
  postbox::send_status status = postbox::send_status::ok;
  std::uint64_t invoked = 0;
  std::uint64_t returned = 0;
  bool saw_closed = false;  ///< a receive that reported closed (not just empty)
};

// Sequential specification: a FIFO with a capacity and a closed flag.
struct model {
  std::size_t capacity = 1;
  std::deque<int> items;
  bool closed = false;

  // Applies `o`; false when the sequential object could not have answered so.
  bool apply(const op& o) {
    switch (o.kind) {
      case op_kind::send: {
        postbox::send_status expected = closed                      ? postbox::send_status::closed
                                        : items.size() == capacity ? postbox::send_status::full
                                                                    : postbox::send_status::ok;
        if (expected != o.status) return false;
        if (expected == postbox::send_status::ok) items.push_back(o.value);
        return true;
      }
      case op_kind::receive:
        if (o.saw_closed) return items.empty() && closed;
        if (items.empty()) return o.value == -1;
        if (items.front() != o.value) return false;
        items.pop_front();
        return true;
      case op_kind::close:
        closed = true;
        return true;
    }
    return false;
  }
  [[nodiscard]] std::vector<int> key() const {
    std::vector<int> k(items.begin(), items.end());
    k.push_back(closed ? -2 : -3);
    return k;
  }
};

// Wing–Gong search: pick any pending operation that no other pending operation
// precedes in real time, apply it to the model, recurse; memoize visited
// (linearized set, model state) pairs so each is explored once.
class checker {
 public:
  checker(std::vector<op> history, std::size_t capacity) : ops_(std::move(history)), capacity_(capacity) {}

  [[nodiscard]] bool linearizable() {
    REQUIRE(ops_.size() <= 64);
    model m;
    m.capacity = capacity_;
    return search(0, m);
  }

 private:
  bool search(std::uint64_t done, const model& m) {
    if (done == full_mask()) return true;
    if (!seen_.emplace(done, m.key()).second) return false;
    std::uint64_t first_return = UINT64_MAX;
    for (std::size_t i = 0; i < ops_.size(); ++i)
      if (!(done >> i & 1)) first_return = std::min(first_return, ops_[i].returned);
    for (std::size_t i = 0; i < ops_.size(); ++i) {
      if (done >> i & 1) continue;
      if (ops_[i].invoked > first_return) continue;  // some pending op finished before this one began
      model next = m;
      if (next.apply(ops_[i]) && search(done | (std::uint64_t{1} << i), next)) return true;
    }
    return false;
  }
  [[nodiscard]] std::uint64_t full_mask() const {
    return ops_.size() == 64 ? UINT64_MAX : (std::uint64_t{1} << ops_.size()) - 1;
  }

  std::vector<op> ops_;
  std::size_t capacity_;
  std::set<std::pair<std::uint64_t, std::vector<int>>> seen_;
};

op make_op(op_kind k, int value, postbox::send_status s, std::uint64_t inv, std::uint64_t ret) {
  op o;
  o.kind = k;
  o.value = value;
  o.status = s;
  o.invoked = inv;
  o.returned = ret;
  return o;
}

// Random pause between operations: nothing, a few spins, or a yield.
void perturb(std::mt19937& rng) {
  switch (rng() % 3) {
    case 0: break;
    case 1:
      for (unsigned n = rng() % 64; n > 0; --n) std::atomic_signal_fence(std::memory_order_seq_cst);
      break;
    default: std::this_thread::yield();
  }
}

// Runs one short history. Role per thread: 's' sends, 'r' receives, 'm' mixes.
// Only 'm' threads and the last op of a sender may close.
template <class Shape>
std::vector<op> run_history(std::size_t capacity, const std::vector<char>& roles, std::uint32_t seed) {
  postbox::channel<int, Shape> ch(capacity);
  std::atomic<std::uint64_t> clock{0};
  std::atomic<int> ready{0};
  std::vector<std::vector<op>> logs(roles.size());
  std::vector<std::thread> threads;
  constexpr int ops_per_thread = 3;
  for (std::size_t t = 0; t < roles.size(); ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed * 31 + static_cast<std::uint32_t>(t));
      ready.fetch_add(1);
      while (ready.load() < static_cast<int>(roles.size())) {
      }
      for (int i = 0; i < ops_per_thread; ++i) {
        perturb(rng);
        unsigned pick = rng() % 8;
        bool may_send = roles[t] == 's' || roles[t] == 'm';
        bool may_receive = roles[t] == 'r' || roles[t] == 'm';
        op o;
        if (pick == 0 && (roles[t] == 'm' || (roles[t] == 's' && i == ops_per_thread - 1))) {
          o.kind = op_kind::close;
          o.invoked = clock.fetch_add(1);
          ch.close();
          o.returned = clock.fetch_add(1);
        } else if (may_send && (!may_receive || pick % 2 == 0)) {
          o.kind = op_kind::send;
          o.value = static_cast<int>(t * 100 + static_cast<std::size_t>(i));
          o.invoked = clock.fetch_add(1);
          o.status = ch.try_send(o.value);
          o.returned = clock.fetch_add(1);
        } else {
          o.kind = op_kind::receive;
          o.invoked = clock.fetch_add(1);
          std::optional<int> got = ch.try_receive();
          o.returned = clock.fetch_add(1);
          o.value = got ? *got : -1;
        }
        logs[t].push_back(o);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<op> all;
  for (auto& l : logs) all.insert(all.end(), l.begin(), l.end());
  return all;
}

template <class Shape>
std::vector<char> roles_for() {
  if constexpr (std::is_same_v<Shape, postbox::spsc>) return {'s', 'r'};
  if constexpr (std::is_same_v<Shape, postbox::mpsc>) return {'s', 's', 'r'};
  if constexpr (std::is_same_v<Shape, postbox::spmc>) return {'s', 'r', 'r'};
  return {'m', 'm', 'm'};
}

}  // namespace

TEST_CASE("the checker rejects a receive that reports empty after a completed send", "[channel][linearizability]") {
  std::vector<op> h{make_op(op_kind::send, 7, postbox::send_status::ok, 0, 1),
                    make_op(op_kind::receive, -1, postbox::send_status::ok, 2, 3)};
  CHECK_FALSE(checker(h, 1).linearizable());
}

TEST_CASE("the checker rejects a full report on a channel that has room", "[channel][linearizability]") {
  std::vector<op> h{make_op(op_kind::send, 1, postbox::send_status::ok, 0, 1),
                    make_op(op_kind::send, 2, postbox::send_status::full, 2, 3)};
  CHECK_FALSE(checker(h, 2).linearizable());
}

TEST_CASE("the checker rejects out-of-order delivery of sequential sends", "[channel][linearizability]") {
  std::vector<op> h{make_op(op_kind::send, 1, postbox::send_status::ok, 0, 1),
                    make_op(op_kind::send, 2, postbox::send_status::ok, 2, 3),
                    make_op(op_kind::receive, 2, postbox::send_status::ok, 4, 5)};
  CHECK_FALSE(checker(h, 2).linearizable());
}

TEST_CASE("the checker accepts an empty receive that overlaps the send", "[channel][linearizability]") {
  std::vector<op> h{make_op(op_kind::send, 7, postbox::send_status::ok, 0, 3),
                    make_op(op_kind::receive, -1, postbox::send_status::ok, 1, 2),
                    make_op(op_kind::receive, 7, postbox::send_status::ok, 4, 5)};
  CHECK(checker(h, 1).linearizable());
}

TEST_CASE("the checker accepts a send that fails closed while overlapping close", "[channel][linearizability]") {
  std::vector<op> h{make_op(op_kind::close, -1, postbox::send_status::ok, 0, 3),
                    make_op(op_kind::send, 1, postbox::send_status::closed, 1, 2),
                    make_op(op_kind::receive, -1, postbox::send_status::ok, 4, 5)};
  CHECK(checker(h, 1).linearizable());
}

TEMPLATE_TEST_CASE("every recorded short history of try operations and close is linearizable",
                   "[channel][linearizability]", postbox::spsc, postbox::mpsc, postbox::spmc, postbox::mpmc) {
  const auto runs = postbox_test::scaled(1000);
  std::size_t failures = 0;
  for (std::uint64_t run = 0; run < runs; ++run) {
    std::size_t capacity = run % 2 == 0 ? 1 : 2;
    auto history = run_history<TestType>(capacity, roles_for<TestType>(), static_cast<std::uint32_t>(run));
    if (!checker(history, capacity).linearizable()) ++failures;
  }
  CHECK(failures == 0);
}

// --- select: histories over two channels ----------------------------------
//
// A select that completes case i is, to the checker, the single operation it
// performed on channel i (a send, a receive, or an operation that found the
// channel closed); the rest of the select must have changed nothing, which
// the model checks by applying nothing else. try_select's "empty" is not an
// atomic snapshot of every channel (no select here or in crossbeam promises
// one), so those outcomes are left out of the history.

namespace {

struct op2 {
  op inner;
  int channel = 0;
};

struct model2 {
  model ch[2];
  bool apply(const op2& o) { return ch[o.channel].apply(o.inner); }
  [[nodiscard]] std::vector<int> key() const {
    auto k = ch[0].key();
    auto k1 = ch[1].key();
    k.push_back(-9);
    k.insert(k.end(), k1.begin(), k1.end());
    return k;
  }
};

class checker2 {
 public:
  checker2(std::vector<op2> history, std::size_t capacity) : ops_(std::move(history)) {
    m_.ch[0].capacity = capacity;
    m_.ch[1].capacity = capacity;
  }
  [[nodiscard]] bool linearizable() {
    REQUIRE(ops_.size() <= 64);
    return search(0, m_);
  }

 private:
  bool search(std::uint64_t done, const model2& m) {
    const std::uint64_t full = ops_.size() == 64 ? UINT64_MAX : (std::uint64_t{1} << ops_.size()) - 1;
    if (done == full) return true;
    if (!seen_.emplace(done, m.key()).second) return false;
    std::uint64_t first_return = UINT64_MAX;
    for (std::size_t i = 0; i < ops_.size(); ++i)
      if (!(done >> i & 1)) first_return = std::min(first_return, ops_[i].inner.returned);
    for (std::size_t i = 0; i < ops_.size(); ++i) {
      if (done >> i & 1) continue;
      if (ops_[i].inner.invoked > first_return) continue;
      model2 next = m;
      if (next.apply(ops_[i]) && search(done | (std::uint64_t{1} << i), next)) return true;
    }
    return false;
  }
  std::vector<op2> ops_;
  model2 m_;
  std::set<std::pair<std::uint64_t, std::vector<int>>> seen_;
};

/// Three threads; each op is a select over both channels (send cases or
/// receive cases), a try operation on one channel, or a close of one.
std::vector<op2> run_select_history(std::size_t capacity, std::uint32_t seed) {
  postbox::channel<int> chans[2] = {postbox::channel<int>(capacity), postbox::channel<int>(capacity)};
  std::atomic<std::uint64_t> clock{0};
  std::atomic<int> ready{0};
  constexpr int threads_n = 3;
  std::vector<std::vector<op2>> logs(threads_n);
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_n; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed * 131 + static_cast<std::uint32_t>(t));
      ready.fetch_add(1);
      while (ready.load() < threads_n) {
      }
      for (int i = 0; i < 4; ++i) {
        perturb(rng);
        const auto pick = static_cast<unsigned>(rng() % 10);
        op2 o;
        const int value = t * 100 + i;
        if (pick == 0) {
          o.channel = static_cast<int>(rng() % 2);
          o.inner.kind = op_kind::close;
          o.inner.invoked = clock.fetch_add(1);
          chans[o.channel].close();
          o.inner.returned = clock.fetch_add(1);
        } else if (pick <= 3) {  // select over two send cases
          int a = value;
          int b = value;
          o.inner.kind = op_kind::send;
          o.inner.value = value;
          o.inner.invoked = clock.fetch_add(1);
          const auto r = postbox::try_select(postbox::on_send(chans[0], a, [] {}), postbox::on_send(chans[1], b, [] {}));
          o.inner.returned = clock.fetch_add(1);
          if (r.status == postbox::select_status::empty) continue;
          o.channel = static_cast<int>(r.index);
          o.inner.status = r.ok() ? postbox::send_status::ok : postbox::send_status::closed;
        } else if (pick <= 6) {  // select over two receive cases
          int got = -1;
          o.inner.kind = op_kind::receive;
          o.inner.invoked = clock.fetch_add(1);
          const auto r = postbox::try_select(postbox::on_receive(chans[0], [&](int v) { got = v; }),
                                             postbox::on_receive(chans[1], [&](int v) { got = v; }));
          o.inner.returned = clock.fetch_add(1);
          if (r.status == postbox::select_status::empty) continue;
          o.channel = static_cast<int>(r.index);
          o.inner.value = r.ok() ? got : -1;
          o.inner.saw_closed = r.status == postbox::select_status::closed;
        } else if (pick <= 8) {
          o.channel = static_cast<int>(rng() % 2);
          o.inner.kind = op_kind::send;
          o.inner.value = value;
          o.inner.invoked = clock.fetch_add(1);
          o.inner.status = chans[o.channel].try_send(value);
          o.inner.returned = clock.fetch_add(1);
        } else {
          o.channel = static_cast<int>(rng() % 2);
          o.inner.kind = op_kind::receive;
          o.inner.invoked = clock.fetch_add(1);
          auto got = chans[o.channel].try_receive();
          o.inner.returned = clock.fetch_add(1);
          o.inner.value = got ? *got : -1;
        }
        logs[static_cast<std::size_t>(t)].push_back(o);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<op2> all;
  for (auto& l : logs) all.insert(all.end(), l.begin(), l.end());
  return all;
}

}  // namespace

TEST_CASE("the two-channel checker rejects a select that took from a channel out of order", "[select][linearizability]") {
  std::vector<op2> h{{make_op(op_kind::send, 1, postbox::send_status::ok, 0, 1), 0},
                     {make_op(op_kind::send, 2, postbox::send_status::ok, 2, 3), 0},
                     {make_op(op_kind::receive, 2, postbox::send_status::ok, 4, 5), 0}};
  CHECK_FALSE(checker2(h, 2).linearizable());
}

TEST_CASE("every recorded short history of selects, try operations and close over two channels is linearizable",
          "[select][linearizability]") {
  const auto runs = postbox_test::scaled(1000);
  std::size_t failures = 0;
  for (std::uint64_t run = 0; run < runs; ++run) {
    const std::size_t capacity = run % 2 == 0 ? 1 : 2;
    auto history = run_select_history(capacity, static_cast<std::uint32_t>(run));
    if (!checker2(history, capacity).linearizable()) ++failures;
  }
  CHECK(failures == 0);
}
