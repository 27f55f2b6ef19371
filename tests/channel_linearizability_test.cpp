// SPDX-License-Identifier: MIT
// Wing–Gong linearizability check of postbox::channel over many short recorded histories.
#include <postbox/channel.hpp>

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
