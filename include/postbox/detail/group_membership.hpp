// SPDX-License-Identifier: MIT
// detail::group_membership and detail::group_cursor: the consumer-group bookkeeping stream and durable_stream share.
#pragma once

// A consumer group of postbox::stream and of postbox::durable_stream keeps
// the same state: members in join order, a generation bumped by every join
// and leave, committed offsets per partition, and a deterministic
// round-robin assignment (partition p goes to the (p mod m)-th member). A
// member remembers the generation its assignment belongs to; its commit
// succeeds only in that generation, so no two members ever commit the same
// record. What differs (where records come from, how a commit is stored)
// stays with each transport. Design: docs/design/stream.md.

#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// A consumer group's members and committed offsets. A transport's group
/// state derives from it and adds its log. Every field is guarded by `mu`
/// (`generation` is also read without it, see there). Not copyable.
struct group_membership {
  explicit group_membership(std::size_t partitions = 0) : committed(partitions, 0) {}
  group_membership(const group_membership&) = delete;
  group_membership& operator=(const group_membership&) = delete;

  std::mutex mu;
  // Bumped under mu by every join and leave (group_cursor::join/leave, with
  // release). Read with acquire outside mu by group_cursor::refresh_if_rebalanced,
  // which, on a change, takes mu and reloads the assignment; read relaxed
  // under mu by commits (writers hold mu).
  std::atomic<std::uint64_t> generation{0};
  std::vector<std::uint64_t> members;    // member ids in join order; guarded by mu
  std::vector<std::uint64_t> committed;  // next offset to consume per partition; guarded by mu
  std::uint64_t next_member = 1;         // guarded by mu

  /// Partitions of `member` in the current assignment (round-robin in join
  /// order); none when it is not a member. Caller holds mu. Allocates.
  [[nodiscard]] std::vector<std::uint32_t> assignment_of(std::uint64_t member) const {
    std::vector<std::uint32_t> out;
    const auto it = std::find(members.begin(), members.end(), member);
    if (it == members.end()) return out;
    const auto idx = static_cast<std::size_t>(it - members.begin());
    for (std::size_t p = 0; p < committed.size(); ++p)
      if (p % members.size() == idx) out.push_back(static_cast<std::uint32_t>(p));
    return out;
  }
};

/// One member's side of a group: its id, the generation its assignment
/// belongs to, the assigned partitions and its next offset in each. Used by
/// one thread at a time (as the member that holds it). Movable.
class group_cursor {
 public:
  /// Joins `g` as a new member: takes g.mu, appends this member, bumps the
  /// generation. The first refresh loads the assignment. Allocates.
  void join(group_membership& g) {
    std::lock_guard lock(g.mu);
    id_ = g.next_member++;
    g.members.push_back(id_);
    g.generation.fetch_add(1, std::memory_order_release);  // release: pairs with the acquire in refresh_if_rebalanced
    gen_ = ~std::uint64_t{0};  // no generation yet: the first refresh loads the assignment
  }

  /// Leaves `g` (takes g.mu; bumps the generation, so the others rebalance).
  /// The caller keeps `g` alive until this returns.
  void leave(group_membership& g) {
    std::lock_guard lock(g.mu);
    g.members.erase(std::remove(g.members.begin(), g.members.end(), id_), g.members.end());
    g.generation.fetch_add(1, std::memory_order_release);  // release: pairs with the acquire in refresh_if_rebalanced
  }

  /// After a join or leave anywhere in `g`: reloads this member's assignment
  /// and resumes every assigned partition from its committed offset (takes
  /// g.mu). Otherwise one acquire load.
  void refresh_if_rebalanced(group_membership& g) {
    if (g.generation.load(std::memory_order_acquire) == gen_) return;  // acquire: pairs with join/leave
    std::lock_guard lock(g.mu);
    gen_ = g.generation.load(std::memory_order_relaxed);  // relaxed: under mu, writers hold mu
    parts_ = g.assignment_of(id_);
    next_.resize(parts_.size());
    for (std::size_t i = 0; i < parts_.size(); ++i) next_[i] = g.committed[parts_[i]];
  }

  /// Moves the position in an assigned partition. Returns false if not assigned.
  bool seek(std::uint32_t partition, std::uint64_t offset) noexcept {
    for (std::size_t i = 0; i < parts_.size(); ++i)
      if (parts_[i] == partition) {
        next_[i] = offset;
        return true;
      }
    return false;
  }

  /// Forgets the assignment (after leaving).
  void clear() noexcept {
    parts_.clear();
    next_.clear();
  }

  /// The member's assignment, refreshed first if `g` rebalanced; empty (and
  /// forgotten) once the member has left (`g` null). Takes g.mu only after a
  /// rebalance.
  const std::vector<std::uint32_t>& assignment(group_membership* g) {
    if (g == nullptr) {
      clear();
    } else {
      refresh_if_rebalanced(*g);
    }
    return parts_;
  }

  /// Assigned partitions as of the last refresh.
  [[nodiscard]] const std::vector<std::uint32_t>& parts() const noexcept { return parts_; }
  /// Next offset per assigned partition (parallel to parts()).
  [[nodiscard]] const std::vector<std::uint64_t>& positions() const noexcept { return next_; }
  /// Advances the position of the i-th assigned partition by `n` records.
  void advance(std::size_t i, std::uint64_t n) noexcept { next_[i] += n; }
  /// The generation the assignment belongs to (all ones before the first refresh).
  [[nodiscard]] std::uint64_t generation() const noexcept { return gen_; }

 private:
  std::uint64_t id_ = 0;
  std::uint64_t gen_ = 0;
  std::vector<std::uint32_t> parts_;
  std::vector<std::uint64_t> next_;
};

}  // namespace detail
POSTBOX_END_NAMESPACE
