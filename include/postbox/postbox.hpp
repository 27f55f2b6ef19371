// SPDX-License-Identifier: MIT
// Umbrella header: includes every public postbox header, nothing else.
// Headers that need a header-only optional library (nlohmann/json, fmt) are
// included when it is installed. Headers that need a library to be linked are
// opt-in and never included here: <postbox/sqlite.hpp> (link postbox::sqlite)
// and the NATS bridge <postbox/nats.hpp>, <postbox/nats_request_reply.hpp>,
// <postbox/nats_outbox.hpp>, <postbox/nats_consumer.hpp> (link postbox::nats).
#pragma once

#include <postbox/version.hpp>
#include <postbox/config.hpp>
#include <postbox/fwd.hpp>
#include <postbox/error.hpp>
#include <postbox/clock.hpp>
#include <postbox/testing.hpp>
#include <postbox/retry.hpp>
#include <postbox/metrics.hpp>
#include <postbox/channel.hpp>
#include <postbox/envelope.hpp>
#include <postbox/topic.hpp>
#include <postbox/stream.hpp>
#include <postbox/observer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/consumer.hpp>
#include <postbox/store.hpp>
#include <postbox/inbox.hpp>
#include <postbox/outbox.hpp>
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
