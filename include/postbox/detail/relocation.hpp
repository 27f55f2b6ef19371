// SPDX-License-Identifier: MIT
// detail::slot_relocation: what a channel ring builds a received message from when it moves it out of its slot.
#pragma once

#include <postbox/config.hpp>

#include <utility>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// What a ring constructs the receive's result from when it takes a message
/// out of its slot: `source(v)` is passed to the result's in-place
/// construction. By default the message itself as an rvalue (its own move
/// constructor). A header of a higher layer may specialize it for its type
/// with something cheaper that converts to `T` (envelope.hpp: a move field
/// by field that skips empty strings, detail::relocated_envelope). `source`
/// never blocks, allocates or throws; the ring destroys `v` afterwards.
template <class T>
struct slot_relocation {
  static T&& source(T& v) noexcept { return std::move(v); }
};

}  // namespace detail
POSTBOX_END_NAMESPACE
