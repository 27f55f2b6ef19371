// SPDX-License-Identifier: MIT
// Umbrella header: includes every public postbox header, nothing else.
// Headers that need an optional library are included when it is installed;
// the NATS bridge (<postbox/nats.hpp>) is opt-in and never included here.
#pragma once

#include <postbox/version.hpp>
#include <postbox/config.hpp>
#include <postbox/fwd.hpp>
#include <postbox/error.hpp>
#include <postbox/clock.hpp>
#include <postbox/testing.hpp>
#include <postbox/channel.hpp>
#include <postbox/envelope.hpp>
#include <postbox/topic.hpp>
#include <postbox/stream.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/operations.hpp>
#include <postbox/saga.hpp>

#if __has_include(<nlohmann/json.hpp>)
#  include <postbox/json.hpp>
#  include <postbox/schema.hpp>
#endif
#if __has_include(<fmt/format.h>)
#  include <postbox/format.hpp>
#endif
