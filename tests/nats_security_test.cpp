// SPDX-License-Identifier: MIT
// Tests for nats.hpp's TLS, credentials and permission errors against nats-servers configured at test time.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/nats.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "support.hpp"

#include "nats_fixture.hpp"

namespace {

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;
using pn::order;

#define NATS_REQUIRE_OPENSSL()                         \
  if (!pn::openssl_available()) {                      \
    WARN("openssl CLI not found: skipping");           \
    return;                                            \
  }

// Secrets planted in the configurations; none may appear in any text postbox produces.
const std::string admin_password = "adm1n-Pa55-d0-not-leak";
const std::string orders_password = "0rders-Pa55-d0-not-leak";
const std::string wrong_password = "wr0ng-Pa55-d0-not-leak";
const std::string good_token = "t0ken-d0-not-leak-1234";
const std::string wrong_token = "t0ken-wr0ng-d0-not-leak";

// A nats-server that requires TLS and verifies client certificates, with
// users: admin (everything), orders (publishes only orders.>, subscribes
// only to reply inboxes), reader (may not subscribe to reply inboxes),
// puller (may create consumers but not pull from them) and an NKey user.
// Certificates and the NKey are generated for this rig.
// Generated once per process (openssl runs take most of a rig's setup).
struct shared_keys {
  pn::temp_dir dir;
  pn::test_pki pki;
  pn::user_nkey nkey;
  shared_keys() : pki(pn::make_test_pki(dir)), nkey(pn::make_user_nkey(dir, "alice")) {}
};
const shared_keys& keys() {
  static const shared_keys k;
  return k;
}

struct secure_rig {
  pn::temp_dir dir;
  const pn::test_pki& pki = keys().pki;
  const pn::user_nkey& nkey = keys().nkey;
  pn::server srv;

  secure_rig() {
    pn::write_file(dir.file("server.conf"),
                   "tls {\n"
                   "  cert_file: \"" + pki.server_cert + "\"\n"
                   "  key_file: \"" + pki.server_key + "\"\n"
                   "  ca_file: \"" + pki.ca + "\"\n"
                   "  verify: true\n"
                   "  timeout: 2\n"
                   "}\n"
                   "authorization {\n"
                   "  users = [\n"
                   "    { user: admin, password: \"" + admin_password + "\" }\n"
                   "    { user: orders, password: \"" + orders_password + "\",\n"
                   "      permissions: { publish: { allow: [\"orders.>\"] }, subscribe: { allow: [\"_INBOX.>\"] } } }\n"
                   "    { user: reader, password: \"" + orders_password + "\",\n"
                   "      permissions: { subscribe: { deny: [\"_INBOX.>\"] } } }\n"
                   "    { user: puller, password: \"" + orders_password + "\",\n"
                   "      permissions: { publish: { allow: [\"$JS.API.CONSUMER.>\"], deny: [\"$JS.API.CONSUMER.MSG.NEXT.>\"] },\n"
                   "                     subscribe: { allow: [\"_INBOX.>\"] } } }\n"
                   "    { nkey: \"" + nkey.public_key + "\" }\n"
                   "  ]\n"
                   "}\n");
    srv.set_config_file(dir.file("server.conf"));
    srv.start();
  }

  // TLS with the test CA and the client certificate, TLS required, the
  // certificate's host name checked; no credentials.
  postbox::nats_connection_options tls_options() const {
    postbox::nats_connection_options o;
    o.urls = srv.url();
    o.max_reconnect = 0;
    o.tls.required = true;
    o.tls.ca_file = pki.ca;
    o.tls.cert_file = pki.client_cert;
    o.tls.key_file = pki.client_key;
    o.tls.expected_hostname = "localhost";
    return o;
  }
  postbox::nats_connection_options as(const std::string& user, const std::string& password) const {
    auto o = tls_options();
    o.credentials.user = user;
    o.credentials.password = password;
    return o;
  }
};

// A plaintext server with token authorization.
struct token_rig {
  pn::temp_dir dir;
  pn::server srv;
  token_rig() {
    pn::write_file(dir.file("server.conf"), "authorization { token: \"" + good_token + "\" }\n");
    srv.set_config_file(dir.file("server.conf"));
    srv.start();
  }
};

// How connecting with `o` failed: the error's code and text (nullopt when it connected).
struct connect_failure {
  postbox::errc code;
  std::string text;
};
std::optional<connect_failure> connect_fails(postbox::nats_connection_options o) {
  o.max_reconnect = 0;
  try {
    postbox::nats_connection c(std::move(o));
    return std::nullopt;
  } catch (const postbox::error& e) {
    return connect_failure{e.code(), e.what()};
  }
}

// True when `text` holds none of the planted secrets.
bool no_secret_in(const std::string& text) {
  for (const auto& s : {admin_password, orders_password, wrong_password, good_token, wrong_token})
    if (text.find(s) != std::string::npos) return false;
  return true;
}

void ensure_orders(postbox::jetstream& js) { pn::ensure_stream(js, pn::orders_stream()); }

void ensure_payments(postbox::jetstream& js) {
  postbox::stream_options so;
  so.name = "PAYMENTS";
  so.subjects = {"payments.>"};
  pn::ensure_stream(js, so);
}

}  // namespace

TEST_CASE("the right user and password over TLS with a client certificate connect and publish",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  postbox::nats_connection conn(rig.as("admin", admin_password));
  CHECK(conn.status() == postbox::connection_status::connected);
  postbox::jetstream js(conn);
  ensure_orders(js);
  postbox::jetstream_publisher pub(js);
  auto ack = pub.publish(postbox::make_envelope("orders.placed", order{1}), "orders.placed");
  REQUIRE(ack.has_value());
  CHECK(ack->sequence == 1);
  CHECK(conn.last_error().code == postbox::errc::ok);
}

TEST_CASE("a wrong password is refused with unauthenticated and the error text holds no secret",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  const auto failed = connect_fails(rig.as("admin", wrong_password));
  REQUIRE(failed);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(failed->text));
  const auto unknown = connect_fails(rig.as("nobody", admin_password));
  REQUIRE(unknown);
  CHECK(unknown->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(unknown->text));
}

TEST_CASE("a server that verifies clients refuses a TLS client without a certificate", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  auto o = rig.as("admin", admin_password);
  o.tls.cert_file.clear();
  o.tls.key_file.clear();
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(failed->text));
}

TEST_CASE("a server that verifies clients refuses a client certificate its CA did not sign", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  auto o = rig.as("admin", admin_password);
  o.tls.cert_file = rig.pki.rogue_server_cert;  // signed by the rogue CA
  o.tls.key_file = rig.pki.rogue_server_key;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
}

TEST_CASE("a server certificate from a CA the client does not trust fails with unauthenticated",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  auto o = rig.as("admin", admin_password);
  o.tls.ca_file = rig.pki.rogue_ca;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(failed->text));
}

TEST_CASE("an expected hostname the server certificate does not name fails with unauthenticated",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  auto o = rig.as("admin", admin_password);
  o.tls.expected_hostname = "orders.example.com";
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
}

TEST_CASE("a client without TLS settings cannot connect to a server that requires TLS", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  postbox::nats_connection_options o;
  o.urls = rig.srv.url();
  o.credentials.user = "admin";
  o.credentials.password = admin_password;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(failed->text));
}

TEST_CASE("tls.required refuses a server that offers no TLS with unauthenticated", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  pn::server plain;
  plain.start();
  postbox::nats_connection_options o;
  o.urls = plain.url();
  o.tls.required = true;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  // The same options without `required` talk plaintext to it.
  o.tls.required = false;
  CHECK_FALSE(connect_fails(o));
}

TEST_CASE("an NKey seed logs in and an NKey the server does not know is refused", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  auto o = rig.tls_options();
  o.credentials.nkey = rig.nkey.public_key;
  o.credentials.nkey_seed_file = rig.nkey.seed_file;
  {
    postbox::nats_connection conn(o);
    CHECK(conn.status() == postbox::connection_status::connected);
    CHECK(conn.flush(2000ms) == postbox::errc::ok);
  }
  const auto stranger = pn::make_user_nkey(rig.dir, "mallory");
  o.credentials.nkey = stranger.public_key;
  o.credentials.nkey_seed_file = stranger.seed_file;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(failed->text.find(stranger.seed) == std::string::npos);
  CHECK(failed->text.find(rig.nkey.seed) == std::string::npos);
}

TEST_CASE("a thousand NKey logins in a row all get in, though libnats before 3.8 drops one signature in 256",
          "[nats_security]") {
  // libnats 3.4.1 sends no signature when its first byte is 0 (1 nonce in
  // 256): the server then refuses the right key. Without the connection's
  // retry, 1,024 logins all get in about 1 time in 55.
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  pn::temp_dir dir;
  const auto key = pn::make_user_nkey(dir, "steady");
  pn::write_file(dir.file("server.conf"),
                 "authorization {\n  users = [\n    { nkey: \"" + key.public_key + "\" }\n  ]\n}\n");
  pn::server srv;
  srv.set_config_file(dir.file("server.conf"));
  srv.start();
  postbox::nats_connection_options o;
  o.urls = srv.url();
  o.credentials.nkey = key.public_key;
  o.credentials.nkey_seed_file = key.seed_file;
  int refused = 0;
  for (int i = 0; i < 1024; ++i) {
    if (const auto failed = connect_fails(o)) {
      ++refused;
      UNSCOPED_INFO(failed->text);
    }
  }
  CHECK(refused == 0);
}

TEST_CASE("a .creds file logs in to an operator-mode server and a user of another operator is refused",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  pn::temp_dir dir;
  const auto trusted = pn::make_operator_setup(dir, "trusted");
  const auto foreign = pn::make_operator_setup(dir, "foreign");
  pn::write_file(dir.file("server.conf"), trusted.config);
  pn::server srv;
  srv.set_config_file(dir.file("server.conf"));
  srv.start();
  postbox::nats_connection_options o;
  o.urls = srv.url();
  o.credentials.creds_file = trusted.creds_file;
  {
    postbox::nats_connection conn(o);
    CHECK(conn.status() == postbox::connection_status::connected);
    CHECK(conn.flush(2000ms) == postbox::errc::ok);
  }
  o.credentials.creds_file = foreign.creds_file;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(failed->text.find(foreign.user.seed) == std::string::npos);
  CHECK(failed->text.find(trusted.user.seed) == std::string::npos);
  CHECK(postbox::to_string(o).find(foreign.user.seed) == std::string::npos);
}

TEST_CASE("a token logs in and a wrong token is refused with unauthenticated", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  token_rig rig;
  postbox::nats_connection_options o;
  o.urls = rig.srv.url();
  o.credentials.token = good_token;
  {
    postbox::nats_connection conn(o);
    CHECK(conn.flush(2000ms) == postbox::errc::ok);
  }
  o.credentials.token = wrong_token;
  const auto failed = connect_fails(o);
  REQUIRE(failed);
  INFO(failed->text);
  CHECK(failed->code == postbox::errc::unauthenticated);
  CHECK(no_secret_in(failed->text));
  o.credentials.token.clear();
  const auto anonymous = connect_fails(o);
  REQUIRE(anonymous);
  CHECK(anonymous->code == postbox::errc::unauthenticated);
}

TEST_CASE("a publish outside the user's permissions returns permission_denied and the connection reports it",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  {  // the streams exist, so only the permission can refuse the publish
    postbox::nats_connection admin(rig.as("admin", admin_password));
    postbox::jetstream js(admin);
    ensure_orders(js);
    ensure_payments(js);
  }
  std::mutex m;
  std::vector<std::pair<postbox::errc, std::string>> reported;
  auto o = rig.as("orders", orders_password);
  o.on_error = [&](postbox::errc code, std::string_view text) {
    std::lock_guard<std::mutex> lock(m);
    reported.emplace_back(code, std::string(text));
  };
  postbox::nats_connection conn(o);
  postbox::jetstream js(conn);
  postbox::publisher_options po;
  po.ack_timeout = 300ms;
  postbox::jetstream_publisher pub(js, po);
  REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{1}), "orders.placed").has_value());
  CHECK(conn.permission_violations() == 0);

  auto denied = pub.publish(postbox::make_envelope("payments.made", order{2}), "payments.made");
  REQUIRE_FALSE(denied.has_value());
  CHECK(denied.status() == postbox::errc::permission_denied);
  // The callback runs on libnats' own thread; await it.
  REQUIRE(postbox_test::eventually([&] {
    std::lock_guard<std::mutex> lock(m);
    return !reported.empty();
  }));
  CHECK(conn.permission_violations() == 1);
  const auto last = conn.last_error();
  CHECK(last.code == postbox::errc::permission_denied);
  CHECK(last.text.find("payments.made") != std::string::npos);
  {
    std::lock_guard<std::mutex> lock(m);
    CHECK(reported.front().first == postbox::errc::permission_denied);
    CHECK(reported.front().second.find("payments.made") != std::string::npos);
    CHECK(no_secret_in(reported.front().second));
  }
  // Still connected: a refused subject does not end the session, and a
  // second refusal of the same subject is reported again.
  CHECK(conn.status() == postbox::connection_status::connected);
  auto again = pub.publish(postbox::make_envelope("payments.made", order{3}), "payments.made");
  REQUIRE_FALSE(again.has_value());
  CHECK(again.status() == postbox::errc::permission_denied);
  CHECK(pub.publish(postbox::make_envelope("orders.placed", order{4}), "orders.placed").has_value());
  CHECK(postbox_test::eventually([&] { return conn.permission_violations() == 2; }));
}

TEST_CASE("the buffered publisher completes a publish outside the permissions with permission_denied",
          "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  {
    postbox::nats_connection admin(rig.as("admin", admin_password));
    postbox::jetstream js(admin);
    ensure_payments(js);
  }
  postbox::nats_connection conn(rig.as("orders", orders_password));
  postbox::jetstream js(conn);
  postbox::buffered_publisher_options bo;
  bo.ack_timeout = 300ms;
  std::atomic<int> outcome{-1};
  postbox::buffered_jetstream_publisher pub(js, bo);
  REQUIRE(pub.enqueue(postbox::make_envelope("payments.made", order{1}), "payments.made",
                      [&](const postbox::buffered_outcome& r) { outcome = static_cast<int>(r.status); }) ==
          postbox::errc::ok);
  REQUIRE(pub.flush(std::chrono::seconds(10)) == postbox::errc::ok);
  CHECK(outcome.load() == static_cast<int>(postbox::errc::permission_denied));
  CHECK(pub.stats().failed == 1);
  CHECK(pub.stats().republished == 0);
}

TEST_CASE("a pull source a user may not create throws permission_denied", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  {
    postbox::nats_connection admin(rig.as("admin", admin_password));
    postbox::jetstream js(admin);
    ensure_orders(js);
  }
  postbox::nats_connection conn(rig.as("orders", orders_password));  // may not publish to $JS.API.>
  postbox::jetstream js(conn, 500ms);
  try {
    postbox::jetstream_pull_source<order> src(js, {"ORDERS", "billing", "orders.>"});
    FAIL("the pull source was created");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::permission_denied);
  }
}

TEST_CASE("a fetch whose pull request the server refuses returns permission_denied", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  {
    postbox::nats_connection admin(rig.as("admin", admin_password));
    postbox::jetstream js(admin);
    ensure_orders(js);
    postbox::jetstream_publisher pub(js);
    REQUIRE(pub.publish(postbox::make_envelope("orders.placed", order{1}), "orders.placed").has_value());
  }
  postbox::nats_connection conn(rig.as("puller", orders_password));
  postbox::jetstream js(conn, 2000ms);
  postbox::jetstream_pull_source<order> src(js, {"ORDERS", "billing", "orders.>"});  // allowed
  auto got = src.fetch(1, 300ms);
  REQUIRE_FALSE(got.has_value());
  CHECK(got.status() == postbox::errc::permission_denied);
  auto now = src.fetch_available(1, 300ms);
  REQUIRE_FALSE(now.has_value());
  CHECK(now.status() == postbox::errc::permission_denied);
}

TEST_CASE("a subscription outside the permissions surfaces as permission_denied", "[nats_security]") {
  NATS_REQUIRE_SERVER();
  NATS_REQUIRE_OPENSSL();
  secure_rig rig;
  {
    postbox::nats_connection admin(rig.as("admin", admin_password));
    postbox::jetstream js(admin);
    ensure_orders(js);
  }
  postbox::nats_connection conn(rig.as("reader", orders_password));  // may not subscribe to _INBOX.>
  postbox::jetstream js(conn, 500ms);
  try {
    postbox::jetstream_pull_source<order> src(js, {"ORDERS", "billing", "orders.>"});
    FAIL("the pull source was created");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::permission_denied);
  }
  // Reported by libnats' callback thread; await it.
  CHECK(postbox_test::eventually([&] { return conn.permission_violations() >= 1; }));
  CHECK(conn.last_error().text.find("Subscription") != std::string::npos);
}

TEST_CASE("two credential forms, or half of one, are invalid_argument before connecting", "[nats_security]") {
  auto code_of = [](const postbox::nats_credentials& c) {
    postbox::nats_connection_options o;
    o.urls = "nats://127.0.0.1:1";  // never dialled: the options are refused first
    o.credentials = c;
    try {
      postbox::nats_connection conn(std::move(o));
    } catch (const postbox::error& e) {
      CHECK(no_secret_in(e.what()));
      return e.code();
    }
    return postbox::errc::ok;
  };
  postbox::nats_credentials both;
  both.user = "admin";
  both.password = admin_password;
  both.token = good_token;
  CHECK(code_of(both) == postbox::errc::invalid_argument);
  postbox::nats_credentials password_only;
  password_only.password = admin_password;
  CHECK(code_of(password_only) == postbox::errc::invalid_argument);
  postbox::nats_credentials nkey_without_seed;
  nkey_without_seed.nkey = "UABC";
  CHECK(code_of(nkey_without_seed) == postbox::errc::invalid_argument);
  postbox::nats_credentials creds_seed_only;
  creds_seed_only.creds_seed_file = "/nonexistent.nk";
  CHECK(code_of(creds_seed_only) == postbox::errc::invalid_argument);

  postbox::nats_connection_options o;
  o.urls = "nats://127.0.0.1:1";
  o.tls.cert_file = "/nonexistent/client.pem";  // without key_file
  try {
    postbox::nats_connection conn(std::move(o));
    FAIL("connected");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::invalid_argument);
  }
}

TEST_CASE("to_string of connection options shows the public settings and never a secret", "[nats_security]") {
  postbox::nats_connection_options o;
  o.urls = "nats://admin:" + admin_password + "@10.0.0.7:4222,tls://nats.example.com:4222";
  o.tls.required = true;
  o.tls.ca_file = "/etc/nats/ca.pem";
  o.credentials.user = "admin";
  o.credentials.password = admin_password;
  const std::string text = postbox::to_string(o);
  CHECK(no_secret_in(text));
  CHECK(text.find("user=admin") != std::string::npos);
  CHECK(text.find("password=***") != std::string::npos);
  CHECK(text.find("nats://***@10.0.0.7:4222") != std::string::npos);
  CHECK(text.find("tls://nats.example.com:4222") != std::string::npos);
  CHECK(text.find("ca_file=/etc/nats/ca.pem") != std::string::npos);

  postbox::nats_connection_options t;
  t.credentials.token = good_token;
  CHECK(no_secret_in(postbox::to_string(t)));
  CHECK(postbox::to_string(t).find("token=***") != std::string::npos);
  postbox::nats_connection_options none;
  CHECK(postbox::to_string(none).find("credentials=none") != std::string::npos);
}

TEST_CASE("a server's permission violation text is parsed into the operation and the subject",
          "[nats_security]") {
  auto p = postbox::detail::parse_violation("Permissions Violation for Publish to \"payments.made\"");
  REQUIRE(p);
  CHECK(p->first == "Publish");
  CHECK(p->second == "payments.made");
  p = postbox::detail::parse_violation("Permissions Violation for Subscription to \"_INBOX.abc.*\" using queue \"q\"");
  REQUIRE(p);
  CHECK(p->first == "Subscription");
  CHECK(p->second == "_INBOX.abc.*");
  CHECK_FALSE(postbox::detail::parse_violation("Authorization Violation"));
}

#endif  // POSTBOX_NATS_SERVER
