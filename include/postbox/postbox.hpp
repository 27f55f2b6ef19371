// SPDX-License-Identifier: MIT
// Umbrella header: includes every core postbox header (standard library only).
// The optional parts are opt-in, so an include of this header stays cheap to
// compile unless a part is asked for (benchmarks/compile_time.py measures it):
//   POSTBOX_WITH_JSON     <postbox/json.hpp>, <postbox/schema.hpp> (nlohmann/json;
//                         the CMake target postbox::json and postbox-json.pc define it)
//   POSTBOX_WITH_FMT      <postbox/format.hpp> (fmt; postbox::fmt and postbox-fmt.pc define it)
//   POSTBOX_WITH_TESTING  <postbox/testing.hpp> (postbox::manual_clock)
//   POSTBOX_WITH_SIGNING  <postbox/signing.hpp> (envelope_signer, key_ring,
//                         verified_source, signing_publisher; HMAC-SHA256 in
//                         the standard library only, opt-in for its compile time)
// Define one before the include (or with -D) to add that part, or include its
// header directly. Headers that need a library linked are never included here:
// <postbox/sqlite.hpp> (link postbox::sqlite) and the NATS bridge
// <postbox/nats.hpp>, <postbox/nats_request_reply.hpp>, <postbox/nats_outbox.hpp>,
// <postbox/nats_consumer.hpp> (link postbox::nats), <postbox/asio.hpp> (link
// postbox::asio), <postbox/saga_sqlite.hpp> (link postbox::sqlite); nor is the
// POSIX-only <postbox/durable_stream.hpp> (segment files, Linux).
#pragma once

#include <postbox/version.hpp>
#include <postbox/config.hpp>
#include <postbox/fwd.hpp>
#include <postbox/error.hpp>
#include <postbox/clock.hpp>
#include <postbox/cached_clock.hpp>
#include <postbox/redaction.hpp>
#include <postbox/timer_service.hpp>
#include <postbox/retry.hpp>
#include <postbox/metrics.hpp>
#include <postbox/channel.hpp>
#include <postbox/envelope.hpp>
#include <postbox/topic.hpp>
#include <postbox/stream.hpp>
#include <postbox/select.hpp>
#include <postbox/async.hpp>
#include <postbox/scheduler.hpp>
#include <postbox/observer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/consumer.hpp>
#include <postbox/store.hpp>
#include <postbox/inbox.hpp>
#include <postbox/outbox.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/operations.hpp>
#include <postbox/saga.hpp>

#if defined(POSTBOX_WITH_JSON)
#  include <postbox/json.hpp>
#  include <postbox/schema.hpp>
#endif
#if defined(POSTBOX_WITH_FMT)
#  include <postbox/format.hpp>
#endif
#if defined(POSTBOX_WITH_TESTING)
#  include <postbox/testing.hpp>
#endif
#if defined(POSTBOX_WITH_SIGNING)
#  include <postbox/signing.hpp>
#endif
