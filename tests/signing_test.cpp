// SPDX-License-Identifier: MIT
// Specification tests for envelope authentication: SHA-256 and HMAC-SHA256 test vectors, the canonical form, signer, key ring and verified_source.
#include <postbox/signing.hpp>
#include <postbox/testing.hpp>
#if __has_include(<nlohmann/json.hpp>)
#  include <postbox/json.hpp>
#endif

#include <catch2/catch.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

std::string hex(const postbox::detail::sha256_digest& d) { return postbox::detail::to_hex(d); }

std::string bytes(std::size_t n, unsigned char b) { return std::string(n, static_cast<char>(b)); }

const std::string key_a = "key-a-0123456789abcdef0123456789";  // 32 bytes
const std::string key_b = "key-b-fedcba9876543210fedcba9876";

using env_t = postbox::envelope<std::string>;

// A fully populated envelope: every covered field has a value to change.
env_t sample(const postbox::clock& clk) {
  auto parent = postbox::make_envelope(std::string("order.requested"), std::string("{}"),
                                       postbox::message_kind::command, clk);
  auto e = postbox::caused_by(parent, std::string("order.placed"), std::string(R"({"id":42,"total":1999})"),
                              postbox::message_kind::event, clk);
  e.schema_version = 3;
  e.producer = "orders-service";
  e.partition_key = "customer-7";
  e.tenant = "acme";
  e.deadline = clk.now() + 30s;
  e.headers.set("content-type", "application/json");
  e.headers.set("x-region", "eu-west");
  return e;
}

// A consumer in manual-drive mode behind a verified_source over a channel.
struct rig {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{64};
  postbox::key_ring keys;
  postbox::dead_letter_queue<std::string> dlq{postbox::dead_letter_options{}, clock};
  std::vector<std::string> handled;

  rig() { keys.add("k1", key_a); }

  [[nodiscard]] postbox::consumer_options options() {
    postbox::consumer_options o;
    o.threads = 0;
    o.clock = &clock;
    return o;
  }
  [[nodiscard]] auto make_consumer() {
    return postbox::consumer(postbox::verified_source(postbox::channel_source<std::string>(ch, "orders"), keys),
                             [this](const env_t& e) {
                               handled.push_back(e.payload);
                               return postbox::settlement::ack();
                             },
                             dlq, options());
  }
  void send(env_t e) { REQUIRE(ch.try_send(std::move(e)) == postbox::send_status::ok); }
};

}  // namespace

TEST_CASE("sha256 matches the FIPS 180-4 examples", "[signing]") {
  using postbox::detail::sha256;
  CHECK(hex(sha256::of("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(hex(sha256::of("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex(sha256::of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(hex(sha256::of("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmn"
                       "opqrstnopqrstu")) == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  CHECK(hex(sha256::of(std::string(1000000, 'a'))) ==
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("sha256 gives the same digest whatever the split of its input into updates", "[signing]") {
  const std::string msg = std::string(200, 'x') + "tail";
  const auto whole = postbox::detail::sha256::of(msg);
  for (std::size_t cut : {std::size_t{0}, std::size_t{1}, std::size_t{55}, std::size_t{56}, std::size_t{63},
                          std::size_t{64}, std::size_t{65}, std::size_t{128}, msg.size()}) {
    postbox::detail::sha256 h;
    h.update(std::string_view(msg).substr(0, cut));
    h.update(std::string_view(msg).substr(cut));
    CHECK(h.finish() == whole);
  }
}

TEST_CASE("hmac_sha256 matches RFC 4231 test cases 1 to 7", "[signing]") {
  using postbox::detail::hmac_sha256;
  std::string key4;
  for (int i = 1; i <= 25; ++i) key4 += static_cast<char>(i);
  CHECK(hex(hmac_sha256::of(bytes(20, 0x0b), "Hi There")) ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  CHECK(hex(hmac_sha256::of("Jefe", "what do ya want for nothing?")) ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  CHECK(hex(hmac_sha256::of(bytes(20, 0xaa), bytes(50, 0xdd))) ==
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
  CHECK(hex(hmac_sha256::of(key4, bytes(50, 0xcd))) ==
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
  // Test case 5 truncates the output to 128 bits.
  CHECK(hex(hmac_sha256::of(bytes(20, 0x0c), "Test With Truncation")).substr(0, 32) ==
        "a3b6167473100ee06e0c796c2955552b");
  CHECK(hex(hmac_sha256::of(bytes(131, 0xaa), "Test Using Larger Than Block-Size Key - Hash Key First")) ==
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  CHECK(hex(hmac_sha256::of(bytes(131, 0xaa),
                            "This is a test using a larger than block-size key and a larger than block-size data. "
                            "The key needs to be hashed before being used by the HMAC algorithm.")) ==
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
}

TEST_CASE("constant_time_equal is true only for identical bytes of equal length", "[signing]") {
  using postbox::detail::constant_time_equal;
  CHECK(constant_time_equal("", ""));
  CHECK(constant_time_equal("abc", "abc"));
  CHECK_FALSE(constant_time_equal("abc", "abd"));
  CHECK_FALSE(constant_time_equal("abc", "xbc"));
  CHECK_FALSE(constant_time_equal("abc", "abcd"));
  CHECK_FALSE(constant_time_equal(std::string("a\0b", 3), std::string("a\0c", 3)));
}

TEST_CASE("the canonical form lists every covered field length-prefixed, headers sorted, signature headers left out",
          "[signing]") {
  env_t e;
  e.id = postbox::message_id(0x0123456789abcdefULL, 0x0011223344556677ULL);
  e.type = "t";
  e.schema_version = 2;
  e.kind = postbox::message_kind::command;
  e.occurred_at = postbox::time_point(1500ns);
  e.tenant = "acme";
  e.headers.set("z", "last");
  e.headers.set("a", "first");
  e.headers.set("signature", "ffff");
  e.headers.set("signature-key-id", "k1");
  e.headers.set("dead-letter-redrives", "1");
  e.payload = "hi\n";
  const std::string expected =
      "postbox-envelope-v1\n"
      "key-id:2:k1\n"
      "id:36:01234567-89ab-cdef-0011-223344556677\n"
      "type:1:t\n"
      "schema-version:1:2\n"
      "kind:7:command\n"
      "occurred-at:4:1500\n"
      "correlation-id:36:00000000-0000-0000-0000-000000000000\n"
      "causation-id:36:00000000-0000-0000-0000-000000000000\n"
      "producer:0:\n"
      "partition-key:0:\n"
      "tenant:4:acme\n"
      "deadline:0:\n"
      "headers:1:2\n"
      "header-name:1:a\n"
      "header-value:5:first\n"
      "header-name:1:z\n"
      "header-value:4:last\n"
      "payload:3:hi\n\n";
  CHECK(postbox::canonical_form(e, "k1") == expected);
}

TEST_CASE("a signed envelope verifies against a ring holding its key", "[signing]") {
  postbox::manual_clock clk;
  postbox::envelope_signer signer("k1", key_a);
  auto e = sample(clk);
  signer.sign(e);
  CHECK(e.headers.get("signature-key-id") == "k1");
  REQUIRE(e.headers.get("signature").has_value());
  CHECK(e.headers.get("signature")->size() == 64);
  postbox::key_ring ring;
  ring.add("k1", key_a);
  CHECK(ring.verify(e) == postbox::verify_status::ok);
}

TEST_CASE("the signature does not cover attempt, trace context or dead-letter bookkeeping headers", "[signing]") {
  postbox::manual_clock clk;
  postbox::envelope_signer signer("k1", key_a);
  postbox::key_ring ring;
  ring.add("k1", key_a);
  auto e = signer.sign_copy(sample(clk));
  e.attempt = 5;
  e.trace = postbox::trace_context::generate();
  e.headers.set("dead-letter-redrives", "2");
  CHECK(ring.verify(e) == postbox::verify_status::ok);
}

#if __has_include(<nlohmann/json.hpp>)
TEST_CASE("a signed envelope still verifies after a round trip through the JSON codec (the outbox's form)",
          "[signing]") {
  postbox::manual_clock clk;
  postbox::key_ring ring;
  ring.add("k1", key_a);
  auto e = sample(clk);
  e.occurred_at += 123ns;  // sub-millisecond precision must survive
  const auto sent = postbox::envelope_signer("k1", key_a).sign_copy(e);
  auto back = postbox::json::decode<std::string>(postbox::json::encode(sent));
  REQUIRE(back.has_value());
  CHECK(ring.verify(*back) == postbox::verify_status::ok);
  back->payload += "!";
  CHECK(ring.verify(*back) == postbox::verify_status::bad_signature);
}
#endif

TEST_CASE("signing again replaces the earlier signature", "[signing]") {
  postbox::manual_clock clk;
  postbox::key_ring ring;
  ring.add("k2", key_b);
  auto e = postbox::envelope_signer("k1", key_a).sign_copy(sample(clk));
  postbox::envelope_signer("k2", key_b).sign(e);
  CHECK(e.headers.get("signature-key-id") == "k2");
  CHECK(ring.verify(e) == postbox::verify_status::ok);
}

TEST_CASE("a signer or key ring refuses an empty key id and a secret shorter than 16 bytes, naming no secret",
          "[signing]") {
  CHECK_THROWS_MATCHES(postbox::envelope_signer("", key_a), postbox::error,
                       Catch::Matchers::Predicate<postbox::error>(
                           [](const postbox::error& e) { return e.code() == postbox::errc::invalid_argument; }));
  CHECK_THROWS_AS(postbox::envelope_signer("has space", key_a), postbox::error);
  try {
    postbox::key_ring ring;
    ring.add("k1", "short-secret-15");
    FAIL("a 15-byte secret was accepted");
  } catch (const postbox::error& e) {
    CHECK(e.code() == postbox::errc::invalid_argument);
    CHECK(std::string(e.what()).find("short-secret-15") == std::string::npos);
    CHECK(std::string(e.what()).find("k1") != std::string::npos);
  }
}

TEST_CASE("a key ring lists key ids and never secrets, and removal forgets a key", "[signing]") {
  postbox::key_ring ring;
  ring.add("k2", key_b);
  ring.add("k1", key_a);
  CHECK(ring.key_ids() == std::vector<std::string>{"k1", "k2"});
  CHECK(ring.contains("k1"));
  CHECK(ring.remove("k1"));
  CHECK_FALSE(ring.remove("k1"));
  CHECK_FALSE(ring.contains("k1"));
  CHECK(ring.key_ids() == std::vector<std::string>{"k2"});
}

TEST_CASE("a non-string payload is signed over the bytes its encoder gives", "[signing]") {
  struct order {
    int id;
    int total;
  };
  auto encode = [](const order& o) { return std::to_string(o.id) + "/" + std::to_string(o.total); };
  postbox::manual_clock clk;
  postbox::envelope_signer signer("k1", key_a, encode);
  postbox::key_ring ring;
  ring.add("k1", key_a);
  auto e = postbox::make_envelope(std::string("order.placed"), order{42, 1999}, postbox::message_kind::event, clk);
  signer.sign(e);
  CHECK(ring.verify(e, encode) == postbox::verify_status::ok);
  e.payload.total = 1;
  CHECK(ring.verify(e, encode) == postbox::verify_status::bad_signature);
}

TEST_CASE("a verified source hands signed messages to the handler", "[signing]") {
  rig r;
  postbox::envelope_signer signer("k1", key_a);
  auto c = r.make_consumer();
  r.send(signer.sign_copy(sample(r.clock)));
  CHECK(c.poll() == 1);
  CHECK(r.handled.size() == 1);
  CHECK(r.dlq.size() == 0);
}

TEST_CASE("an unsigned message is dead-lettered as unauthenticated and never handled", "[signing]") {
  rig r;
  auto c = r.make_consumer();
  auto e = sample(r.clock);
  const auto id = e.id.to_string();
  r.send(std::move(e));
  CHECK(c.poll() == 1);
  CHECK(r.handled.empty());
  REQUIRE(r.dlq.size() == 1);
  const auto d = r.dlq.list().front();
  CHECK(d.reason == "unauthenticated");
  CHECK(d.reason == postbox::to_string(postbox::errc::unauthenticated));
  CHECK(d.error.find(id) != std::string::npos);
  CHECK(d.error.find("not signed") != std::string::npos);
  CHECK(d.source == "orders");
}

TEST_CASE("changing any covered field, header or payload byte after signing dead-letters the message as "
          "unauthenticated",
          "[signing]") {
  struct tamper {
    const char* what;
    std::function<void(env_t&)> apply;
  };
  const std::vector<tamper> tampers = {
      {"id", [](env_t& e) { e.id = postbox::message_id::generate(); }},
      {"type", [](env_t& e) { e.type = "order.cancelled"; }},
      {"schema version", [](env_t& e) { e.schema_version = 4; }},
      {"kind", [](env_t& e) { e.kind = postbox::message_kind::command; }},
      {"occurred_at by one nanosecond", [](env_t& e) { e.occurred_at += 1ns; }},
      {"correlation id", [](env_t& e) { e.correlation_id = postbox::message_id::generate(); }},
      {"causation id", [](env_t& e) { e.causation_id = postbox::message_id(); }},
      {"producer", [](env_t& e) { e.producer = "mallory"; }},
      {"partition key", [](env_t& e) { e.partition_key = "customer-8"; }},
      {"tenant", [](env_t& e) { e.tenant = "globex"; }},
      {"deadline moved", [](env_t& e) { *e.deadline += 1h; }},
      {"deadline removed", [](env_t& e) { e.deadline.reset(); }},
      {"header value", [](env_t& e) { e.headers.set("x-region", "us-east"); }},
      {"header added", [](env_t& e) { e.headers.set("x-admin", "true"); }},
      {"header removed", [](env_t& e) { e.headers.erase("content-type"); }},
      {"header renamed", [](env_t& e) {
         e.headers.erase("x-region");
         e.headers.set("x-regioN", "eu-west");
       }},
      {"first payload byte", [](env_t& e) { e.payload[0] = '['; }},
      {"last payload byte", [](env_t& e) { e.payload.back() = ']'; }},
      {"payload truncated", [](env_t& e) { e.payload.pop_back(); }},
      {"payload extended", [](env_t& e) { e.payload += ' '; }},
      {"signature byte", [](env_t& e) {
         std::string sig(*e.headers.get("signature"));
         sig[10] = sig[10] == '0' ? '1' : '0';
         e.headers.set("signature", sig);
       }},
      {"signature upper-cased", [](env_t& e) {
         std::string sig(*e.headers.get("signature"));
         for (auto& ch : sig) ch = static_cast<char>(ch >= 'a' && ch <= 'f' ? ch - 32 : ch);
         e.headers.set("signature", sig);
       }},
  };
  postbox::envelope_signer signer("k1", key_a);
  for (const auto& t : tampers) {
    DYNAMIC_SECTION("tampered: " << t.what) {
      rig r;
      auto c = r.make_consumer();
      auto e = signer.sign_copy(sample(r.clock));
      REQUIRE(r.keys.verify(e) == postbox::verify_status::ok);
      t.apply(e);
      CHECK(r.keys.verify(e) == postbox::verify_status::bad_signature);
      r.send(std::move(e));
      CHECK(c.poll() == 1);
      CHECK(r.handled.empty());
      REQUIRE(r.dlq.size() == 1);
      CHECK(r.dlq.list().front().reason == "unauthenticated");
      CHECK(r.dlq.list().front().error.find("does not match") != std::string::npos);
    }
  }
}

TEST_CASE("a message signed with the right key id but another secret is dead-lettered as unauthenticated",
          "[signing]") {
  rig r;
  auto c = r.make_consumer();
  r.send(postbox::envelope_signer("k1", key_b).sign_copy(sample(r.clock)));
  CHECK(c.poll() == 1);
  CHECK(r.handled.empty());
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().reason == "unauthenticated");
}

TEST_CASE("a message signed with a key id the ring does not hold is dead-lettered as unauthenticated", "[signing]") {
  rig r;
  auto c = r.make_consumer();
  r.send(postbox::envelope_signer("k9", key_a).sign_copy(sample(r.clock)));
  CHECK(c.poll() == 1);
  CHECK(r.handled.empty());
  REQUIRE(r.dlq.size() == 1);
  CHECK(r.dlq.list().front().reason == "unauthenticated");
  CHECK(r.dlq.list().front().error.find("unknown key id 'k9'") != std::string::npos);
}

TEST_CASE("the dead letter of a refused message holds its canonical form and never a secret", "[signing]") {
  rig r;
  auto c = r.make_consumer();
  auto e = postbox::envelope_signer("k1", key_b).sign_copy(sample(r.clock));
  const std::string canonical = postbox::canonical_form(e, "k1");
  r.send(std::move(e));
  CHECK(c.poll() == 1);
  REQUIRE(r.dlq.size() == 1);
  const auto d = r.dlq.list().front();
  CHECK(d.raw == canonical);
  for (const auto& text : {d.raw, d.error}) {
    CHECK(text.find(key_a) == std::string::npos);
    CHECK(text.find(key_b) == std::string::npos);
  }
}

TEST_CASE("key rotation: old-key messages verify until the old key is removed, new-key messages after it is added",
          "[signing]") {
  rig r;
  auto c = r.make_consumer();
  postbox::envelope_signer old_signer("k1", key_a);
  postbox::envelope_signer new_signer("k2", key_b);
  auto old_msg = [&](const char* p) {
    auto e = sample(r.clock);
    e.payload = p;
    return old_signer.sign_copy(e);
  };
  auto new_msg = [&](const char* p) {
    auto e = sample(r.clock);
    e.payload = p;
    return new_signer.sign_copy(e);
  };
  // Before the ring knows k2, a k2 message is refused.
  r.send(new_msg("new-too-early"));
  CHECK(c.poll() == 1);
  CHECK(r.dlq.size() == 1);
  // Step 1: add the new key; both verify (messages in flight under k1 still pass).
  r.keys.add("k2", key_b);
  r.send(old_msg("old-in-flight"));
  r.send(new_msg("new"));
  CHECK(c.poll() == 2);
  CHECK(r.handled == std::vector<std::string>{"old-in-flight", "new"});
  // Step 2: retire the old key; a late k1 message is refused, k2 still passes.
  CHECK(r.keys.remove("k1"));
  r.send(old_msg("old-too-late"));
  r.send(new_msg("new-again"));
  CHECK(c.poll() == 2);
  CHECK(r.handled == std::vector<std::string>{"old-in-flight", "new", "new-again"});
  REQUIRE(r.dlq.size() == 2);
  CHECK(r.dlq.list().back().error.find("unknown key id 'k1'") != std::string::npos);
}

TEST_CASE("a verified source passes the inner source's poison through and counts every outcome", "[signing]") {
  postbox::manual_clock clock;
  postbox::channel<std::string> raw{16};
  postbox::key_ring keys;
  keys.add("k1", key_a);
  postbox::envelope_signer signer("k1", key_a);
  // A decoder that reads "<payload>|<signature>" as a signed envelope with a fixed id, and fails on empty input.
  const env_t base = sample(clock);
  auto decode = [&](std::string_view text) -> postbox::decode_outcome<std::string> {
    if (text.empty()) return postbox::decode_failure{postbox::errc::parse_error, "", "empty"};
    env_t e = base;
    e.payload = std::string(text);
    return signer.sign_copy(e);
  };
  auto source = postbox::verified_source(postbox::make_raw_source<std::string>(raw, decode, "raw"), keys);
  auto monitor = source.monitor();
  postbox::dead_letter_queue<std::string> dlq{postbox::dead_letter_options{}, clock};
  int handled = 0;
  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &clock;
  postbox::consumer c(std::move(source), [&](const env_t&) { ++handled; return postbox::settlement::ack(); }, dlq, o);
  REQUIRE(raw.try_send(std::string("ok")) == postbox::send_status::ok);
  REQUIRE(raw.try_send(std::string()) == postbox::send_status::ok);
  CHECK(c.poll() == 2);
  CHECK(handled == 1);
  REQUIRE(dlq.size() == 1);
  CHECK(dlq.list().front().reason == "parse_error");
  const auto s = monitor();
  CHECK(s.verified == 1);
  CHECK(s.passed_poison == 1);
  CHECK(s.bad_signature + s.unknown_key + s.unsigned_messages == 0);
}

TEST_CASE("a signing publisher signs a copy and passes it with the extra arguments to the inner publisher",
          "[signing]") {
  struct recorder {
    std::vector<std::pair<env_t, std::string>> sent;
    int publish(const env_t& e, const std::string& subject) {
      sent.emplace_back(e, subject);
      return 7;
    }
  };
  postbox::manual_clock clk;
  recorder inner;
  postbox::signing_publisher pub(inner, postbox::envelope_signer("k1", key_a));
  const auto e = sample(clk);
  CHECK(pub.publish(e, std::string("orders.placed")) == 7);
  CHECK_FALSE(e.headers.contains("signature"));
  REQUIRE(inner.sent.size() == 1);
  CHECK(inner.sent[0].second == "orders.placed");
  postbox::key_ring ring;
  ring.add("k1", key_a);
  CHECK(ring.verify(inner.sent[0].first) == postbox::verify_status::ok);
}

TEST_CASE("a key ring may rotate while consumers verify on other threads", "[signing]") {
  postbox::manual_clock clk;
  postbox::key_ring ring;
  ring.add("k1", key_a);
  postbox::envelope_signer signer("k1", key_a);
  const auto e = signer.sign_copy(sample(clk));
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> ok{0}, other{0};
  std::vector<std::thread> verifiers;
  for (int t = 0; t < 2; ++t) {
    verifiers.emplace_back([&] {
      while (!stop.load()) {
        if (ring.verify(e) == postbox::verify_status::ok) ok.fetch_add(1);
        else other.fetch_add(1);
      }
    });
  }
  for (int i = 0; i < 200; ++i) {
    ring.add("k2", key_b);
    ring.remove("k2");
  }
  stop.store(true);
  for (auto& t : verifiers) t.join();
  // k1 never left the ring: every verification succeeded, whatever else changed.
  CHECK(other.load() == 0);
  CHECK(ring.verify(e) == postbox::verify_status::ok);
}
