// SPDX-License-Identifier: MIT
// Data layout helpers shared by the benchmarks.
#pragma once

#include <utility>

namespace postbox_bench {

/// An object on cache lines of its own: nothing else on the stack frame (or
/// in the array) that holds it shares a line with it, so a thread that only
/// reaches this object never moves a line another thread writes for its own
/// reasons (see topic_bench's subscriber_local).
template <class T>
struct alignas(64) own_lines {
  template <class... A>
  explicit own_lines(A&&... a) : value(std::forward<A>(a)...) {}
  T value;
};

}  // namespace postbox_bench
