// SPDX-License-Identifier: MIT
// JetStream as an outbox relay destination: each stored message is published with Nats-Msg-Id = its id and counts as sent only after the PubAck.
#pragma once

// Opt-in edge (layer 5): needs libnats and nlohmann/json (CMake target
// `postbox::nats`). Design notes: docs/design/nats.md ("Outbox destination").

#include <postbox/nats.hpp>
#include <postbox/outbox.hpp>

#include <functional>
#include <string>
#include <utility>

POSTBOX_BEGIN_NAMESPACE

/// Settings of `to_jetstream`. A plain value.
struct jetstream_destination_options {
  /// Subject of a stored message; empty: the publisher's `subject_mapping`
  /// applied to the envelope type.
  std::function<std::string(const stored_message&)> subject{};
  /// Called after each PubAck (on the relay's thread, before the relay marks
  /// the message): `ack.duplicate` says the stream already had this id — a
  /// republish after a crash between publish and mark, absorbed by the
  /// duplicate window. Must not throw or block for long.
  std::function<void(const stored_message&, const publish_ack&)> on_ack{};
};

/// An `outbox_destination` that decodes each stored message with `codec`
/// and publishes it through `publisher` with `Nats-Msg-Id` = the message id,
/// returning `ok` only after the stream's PubAck — so `outbox_relay` marks a
/// message dispatched only once JetStream stored it.
///
/// * Unknown outcomes (PubAck timeout, no responders during an election, a
///   connection being restored) are republished with the same id by the
///   publisher (up to its `max_attempts`); if the outcome stays unknown the
///   destination returns `timeout`/`busy`, the relay keeps the message and
///   retries it with backoff, again with the same id. Either way the stream's
///   duplicate window stores it once. Keep the publisher's `max_attempts *
///   ack_timeout` well below the relay's lease.
/// * Order: one synchronous publish per call, so the relay's per-key order
///   is the stream's order (a failure holds back the rest of that key).
/// * A body the codec cannot decode, or an envelope NATS headers cannot
///   carry (CR/LF in a value), fails with the decode or `invalid_argument`
///   code, which the relay's default classifier calls permanent: the row
///   moves to the outbox dead letters (fix the data, then redrive it).
///
/// `T = nlohmann::json` with `json::codec` relays every message type through
/// one destination (the payload JSON goes out as it was staged).
/// `publisher` (and its jetstream and connection) must outlive the relay.
/// Blocks on the PubAck; allocates per message; thread-safe as the publisher.
template <class T, class Codec>
  requires envelope_codec<Codec, T>
[[nodiscard]] outbox_destination to_jetstream(jetstream_publisher& publisher, Codec codec,
                                              jetstream_destination_options options = {}) {
  return [&publisher, codec = std::move(codec), options = std::move(options)](const stored_message& m) -> errc {
    envelope<T> env;
    errc rc = errc::ok;
    if (!detail::outbox_decode<T>(codec, m, env, rc)) return rc;
    env.id = m.id;  // the outbox row's id is the dedup identity, whatever the codec kept
    auto ack = options.subject ? publisher.publish(env, options.subject(m)) : publisher.publish(env);
    if (!ack.has_value()) return ack.status();
    if (options.on_ack) options.on_ack(m, *ack);
    return errc::ok;
  };
}

POSTBOX_END_NAMESPACE
