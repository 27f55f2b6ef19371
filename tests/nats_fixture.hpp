// SPDX-License-Identifier: MIT
// The NATS tests' one fixture: a started nats-server with JetStream, a connection to it, a JetStream context and stream ORDERS.
#pragma once

#include <postbox/nats.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <functional>
#include <string>
#include <utility>

#include "nats_harness.hpp"

/// Ends the test case with a warning when no nats-server binary can run
/// (the case then checks nothing; CMake defines POSTBOX_NATS_SERVER only when
/// it found one, so this guards a binary removed after configuring).
#define NATS_REQUIRE_SERVER()                      \
  if (!::postbox_test::nats::available()) {        \
    WARN("nats-server not found: skipping");       \
    return;                                        \
  }

namespace postbox_test::nats {

/// The payload most NATS cases publish on ORDERS: `{"n": n}` in JSON.
struct order {
  int n = 0;
};
inline void to_json(nlohmann::json& j, const order& o) { j = {{"n", o.n}}; }
inline void from_json(const nlohmann::json& j, order& o) { j.at("n").get_to(o.n); }

/// How a fixture connects, and whether it creates stream ORDERS. Chainable:
/// `settings().quick().without_orders()`.
struct settings {
  bool quick_reconnect = false;  ///< notice a stopped server at once and retry every 20 ms (up to 200 ms)
  bool orders_stream = true;     ///< create stream ORDERS on `orders.>`
  std::function<void(postbox::connection_status)> on_status{};  ///< the connection's status callback

  settings& quick() {
    quick_reconnect = true;
    return *this;
  }
  settings& without_orders() {
    orders_stream = false;
    return *this;
  }
  settings& status(std::function<void(postbox::connection_status)> cb) {
    on_status = std::move(cb);
    return *this;
  }
};

/// A connection to `urls` (comma-separated) with `s`'s reconnect behaviour.
inline postbox::nats_connection connect(const std::string& urls, const settings& s = {}) {
  using namespace std::chrono_literals;
  postbox::nats_connection_options o;
  o.urls = urls;
  if (s.quick_reconnect) {
    o.reconnect_wait = 20ms;
    o.reconnect_wait_max = 200ms;
  }
  o.on_status = s.on_status;
  return postbox::nats_connection(std::move(o));
}

/// Creates (or updates) a stream, retrying for up to ~10 s: JetStream may
/// lag the client port by a moment, and a cluster first elects a leader.
inline void ensure_stream(postbox::jetstream& js, const postbox::stream_options& so) {
  auto rc = postbox::errc::timeout;
  for (int i = 0; i < 100 && rc != postbox::errc::ok; ++i) {
    rc = js.ensure_stream(so);
    if (rc != postbox::errc::ok) detail::pause_ms(100);
  }
  REQUIRE(rc == postbox::errc::ok);
}

/// Stream ORDERS on subjects `orders.>`, the one most cases use.
inline postbox::stream_options orders_stream() {
  postbox::stream_options so;
  so.name = "ORDERS";
  so.subjects = {"orders.>"};
  return so;
}

/// One nats-server (started; stopped and its store removed at the end), a
/// connection to it and a JetStream context, with stream ORDERS unless the
/// settings say otherwise. Tests derive from it to add their own members.
struct jetstream_rig {
  server srv;
  postbox::nats_connection conn;
  postbox::jetstream js;

  explicit jetstream_rig(const settings& s = {}) : conn(connect(started(srv), s)), js(conn) {
    if (s.orders_stream) ensure_stream(js, orders_stream());
  }

  /// Creates another stream on this server (retrying as ensure_stream does).
  void ensure(const postbox::stream_options& so) { ensure_stream(js, so); }

 private:
  static std::string started(server& s) {
    s.start();
    return s.url();
  }
};

}  // namespace postbox_test::nats
