// SPDX-License-Identifier: MIT
// Specification and property tests for json.hpp: envelope encode/decode, limits and typed errors.
#include <postbox/json.hpp>
#include <postbox/testing.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace pj = postbox::json;
using postbox::errc;
using nlohmann::json;

namespace {

struct order_placed {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 2;
  std::string order_id;
  std::int64_t cents = 0;
  std::vector<std::string> items;
  friend bool operator==(const order_placed&, const order_placed&) = default;
};
void to_json(json& j, const order_placed& o) { j = json{{"order_id", o.order_id}, {"cents", o.cents}, {"items", o.items}}; }
void from_json(const json& j, order_placed& o) {
  j.at("order_id").get_to(o.order_id);
  j.at("cents").get_to(o.cents);
  j.at("items").get_to(o.items);
}

constexpr std::string_view parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

postbox::envelope<order_placed> sample(const postbox::clock& clk) {
  auto env = postbox::make_envelope(order_placed{"o-1", 1999, {"book", "pen"}}, clk);
  env.producer = "shop";
  env.tenant = "acme";
  env.partition_key = "o-1";
  env.trace = *postbox::trace_context::parse(parent, "congo=t61");
  env.deadline = clk.now() + std::chrono::seconds(30);
  env.attempt = 2;
  env.headers.set("content-type", "application/json");
  return env;
}

/// The envelope JSON of `sample` with one field replaced or removed.
std::string mutate(const std::string& field, const std::optional<json>& value) {
  postbox::manual_clock clk;
  json j = json::parse(pj::encode(sample(clk)));
  if (value) {
    j[field] = *value;
  } else {
    j.erase(field);
  }
  return j.dump();
}

/// A small seeded generator (splitmix64) so property failures reproduce.
struct gen {
  std::uint64_t state;
  std::uint64_t next() { return postbox::detail::splitmix64(state); }
  std::uint64_t below(std::uint64_t n) { return next() % n; }
  std::string text() {
    static const std::vector<std::string> pieces = {"a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\x01",
                                                    "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x93\xae", "{", "]", ":"};
    std::string s;
    const auto n = below(12);
    for (std::uint64_t i = 0; i < n; ++i) s += pieces[below(pieces.size())];
    return s;
  }
};

}  // namespace

static_assert(noexcept(pj::decode<order_placed>(std::string_view{})), "decode never throws");
static_assert(noexcept(pj::decode_raw(std::string_view{})), "decode_raw never throws");

TEST_CASE("an envelope survives encode then decode with every field intact", "[json]") {
  postbox::manual_clock clk;
  clk.advance(std::chrono::nanoseconds(123456789));
  const auto env = sample(clk);
  const auto back = pj::decode<order_placed>(pj::encode(env));
  REQUIRE(back.has_value());
  CHECK(back->id == env.id);
  CHECK(back->type == "order.placed");
  CHECK(back->schema_version == 2);
  CHECK(back->kind == env.kind);
  CHECK(back->occurred_at == env.occurred_at);
  CHECK(back->correlation_id == env.correlation_id);
  CHECK(back->causation_id == env.causation_id);
  CHECK(back->producer == "shop");
  CHECK(back->partition_key == "o-1");
  CHECK(back->tenant == "acme");
  CHECK(back->trace == env.trace);
  CHECK(back->deadline == env.deadline);
  CHECK(back->attempt == 2);
  CHECK(back->headers == env.headers);
  CHECK(back->payload == env.payload);
}

TEST_CASE("encode uses the documented field names and omits defaults", "[json]") {
  postbox::manual_clock clk;
  const auto env = postbox::make_envelope(order_placed{"o-2", 5, {}}, clk);
  const json j = json::parse(pj::encode(env));
  CHECK(j.at("id") == env.id.to_string());
  CHECK(j.at("type") == "order.placed");
  CHECK(j.at("schema_version") == 2);
  CHECK(j.at("kind") == "event");
  CHECK(j.at("occurred_at") == "2026-01-01T00:00:00.000000000Z");
  CHECK(j.at("correlation_id") == env.id.to_string());
  CHECK(j.at("payload").at("order_id") == "o-2");
  for (const char* absent : {"causation_id", "producer", "partition_key", "tenant", "traceparent", "tracestate",
                             "deadline", "attempt", "headers"}) {
    CHECK_FALSE(j.contains(absent));
  }
}

TEST_CASE("RFC 3339 times with offsets and short fractions decode to UTC", "[json]") {
  using postbox::json::detail::parse_time;
  const auto base = parse_time("2026-01-01T00:00:00Z");
  REQUIRE(base);
  CHECK(base->time_since_epoch() == std::chrono::seconds(1767225600));
  CHECK(parse_time("2026-01-01T01:30:00.5+01:30") == *base + std::chrono::milliseconds(500));
  CHECK(parse_time("2025-12-31t23:00:00z") == *base - std::chrono::hours(1));
  CHECK(parse_time("2026-01-01T00:00:00.1234567891Z") == *base + std::chrono::nanoseconds(123456789));
  CHECK_FALSE(parse_time("2026-02-30T00:00:00Z"));
  CHECK_FALSE(parse_time("2026-01-01 00:00:00Z"));
  CHECK_FALSE(parse_time("2026-01-01T00:00:00"));
  CHECK_FALSE(parse_time("2026-01-01T24:00:00Z"));
  CHECK_FALSE(parse_time("9999-01-01T00:00:00Z"));
  CHECK_FALSE(parse_time("2026-01-01T00:00:00.Z"));
}

TEST_CASE("a missing required field is reported by name", "[json]") {
  for (const char* field : {"id", "type", "occurred_at", "payload"}) {
    const auto r = pj::decode<order_placed>(mutate(field, std::nullopt));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::missing_field);
    CHECK(r.error().field == field);
  }
}

TEST_CASE("missing optional fields take their defaults", "[json]") {
  const auto r = pj::decode_raw(R"({"id":"0190f2a4-1b2c-7d3e-8f40-0123456789ab","type":"t",)"
                                R"("occurred_at":"2026-01-01T00:00:00Z","payload":null})");
  REQUIRE(r.has_value());
  CHECK(r->schema_version == 1);
  CHECK(r->kind == postbox::message_kind::event);
  CHECK(r->correlation_id.is_nil());
  CHECK_FALSE(r->deadline);
  CHECK(r->attempt == 0);
  CHECK(r->payload.is_null());
}

TEST_CASE("a field of the wrong type or with an invalid value is bad_type naming it", "[json]") {
  const std::vector<std::pair<std::string, json>> cases = {
      {"id", 42},
      {"id", "not-a-uuid"},
      {"type", ""},
      {"schema_version", -1},
      {"schema_version", 1.5},
      {"schema_version", 4294967296ULL},
      {"kind", "announcement"},
      {"occurred_at", "yesterday"},
      {"correlation_id", json::array()},
      {"traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
      {"tracestate", "Bad=1"},
      {"deadline", 5},
      {"attempt", "3"},
      {"headers", json::array()},
      {"producer", false},
  };
  for (const auto& [field, value] : cases) {
    INFO(field << " = " << value.dump());
    const auto r = pj::decode<order_placed>(mutate(field, value));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::bad_type);
    CHECK(r.error().field == field);
  }
  const auto header = pj::decode<order_placed>(mutate("headers", json{{"x", 1}}));
  REQUIRE_FALSE(header.has_value());
  CHECK(header.error().field == "headers.x");
}

TEST_CASE("a payload that does not convert is bad_type and keeps the raw envelope", "[json]") {
  const auto r = pj::decode<order_placed>(mutate("payload", json{{"order_id", 7}}));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::bad_type);
  CHECK(r.error().field == "payload");
  CHECK_FALSE(r.error().message.empty());
  REQUIRE(r.raw() != nullptr);
  CHECK(r.raw()->payload == json{{"order_id", 7}});
  CHECK(r.raw()->tenant == "acme");
}

TEST_CASE("decoding another message type is unknown_type with the raw envelope", "[json]") {
  const auto r = pj::decode<order_placed>(mutate("type", "payment.failed"));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::unknown_type);
  CHECK(r.error().field == "type");
  REQUIRE(r.raw() != nullptr);
  CHECK(r.raw()->type == "payment.failed");
  pj::decode_options lax;
  lax.check_type = false;
  CHECK(pj::decode<order_placed>(mutate("type", "payment.failed"), lax).has_value());
}

TEST_CASE("decoding another schema version is unsupported_version", "[json]") {
  const auto r = pj::decode<order_placed>(mutate("schema_version", 1));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::unsupported_version);
  CHECK(r.error().field == "schema_version");
  CHECK(r.raw() != nullptr);
}

TEST_CASE("input over the size cap is too_large before parsing", "[json]") {
  pj::decode_options opt;
  opt.max_bytes = 100;
  const auto r = pj::decode<order_placed>(mutate("producer", std::string(200, 'x')), opt);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::too_large);
}

TEST_CASE("nesting past the depth cap is too_deep, even a million levels", "[json]") {
  const std::string deep = R"({"payload":)" + std::string(1'000'000, '[') + std::string(1'000'000, ']') + "}";
  const auto r = pj::decode<json>(deep);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::too_deep);

  pj::decode_options opt;
  opt.max_depth = 3;
  CHECK(pj::decode<json>(mutate("payload", json::parse("[[1]]")), opt).has_value());
  CHECK(pj::decode<json>(mutate("payload", json::parse("[[[1]]]")), opt).error().code == errc::too_deep);
  // Brackets inside strings do not count.
  CHECK(pj::decode<json>(mutate("producer", std::string(100, '[')), opt).has_value());
}

TEST_CASE("invalid UTF-8 in the input is invalid_utf8", "[json]") {
  for (const char* bad : {"\xff", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82"}) {
    std::string text = mutate("producer", "PLACEHOLDER");
    text.replace(text.find("PLACEHOLDER"), 11, bad);
    const auto r = pj::decode<order_placed>(text);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::invalid_utf8);
  }
}

TEST_CASE("malformed JSON, duplicate keys and non-objects are rejected with a code", "[json]") {
  CHECK(pj::decode_raw("").error().code == errc::parse_error);
  CHECK(pj::decode_raw("{").error().code == errc::parse_error);
  CHECK(pj::decode_raw("{\"id\":}").error().code == errc::parse_error);
  CHECK(pj::decode_raw("{} trailing").error().code == errc::parse_error);
  CHECK(pj::decode_raw("[]").error().code == errc::bad_type);
  CHECK(pj::decode_raw("\"text\"").error().code == errc::bad_type);
  CHECK(pj::decode_raw("{\"payload\":1e99999}").error().code == errc::parse_error);
  std::string twice = mutate("producer", "a");
  twice.insert(1, R"("producer":"b",)");
  const auto dup = pj::decode_raw(twice);
  REQUIRE_FALSE(dup.has_value());
  CHECK(dup.error().code == errc::parse_error);
  CHECK(dup.error().message.find("duplicate") != std::string::npos);
}

TEST_CASE("encode replaces invalid UTF-8 instead of throwing", "[json]") {
  postbox::manual_clock clk;
  auto env = postbox::make_envelope("note", std::string("bad \xff byte"), postbox::message_kind::event, clk);
  env.producer = "p\xc3";
  std::string text;
  REQUIRE_NOTHROW(text = pj::encode(env));
  CHECK(postbox::detail::is_valid_utf8(text));
  const auto back = pj::decode<std::string>(text);
  REQUIRE(back.has_value());
  CHECK(back->payload == "bad \xef\xbf\xbd byte");
  CHECK(back->producer == "p\xef\xbf\xbd");
}

TEST_CASE("value() on a failed decode throws postbox::error with the code", "[json]") {
  const auto r = pj::decode_raw("nope");
  CHECK(r.status() == errc::parse_error);
  try {
    (void)pj::decode_raw("nope").value();
    FAIL("value() did not throw");
  } catch (const postbox::error& e) {
    CHECK(e.code() == errc::parse_error);
  }
}

TEST_CASE("property: random envelopes round-trip through encode and decode", "[json][property]") {
  gen g{0x5eed0001};
  postbox::manual_clock clk;
  const auto rounds = postbox_test::scaled(2000);
  for (std::uint64_t i = 0; i < rounds; ++i) {
    clk.advance(std::chrono::nanoseconds(g.below(10'000'000'000ULL)));
    auto env = postbox::make_envelope(order_placed{g.text(), static_cast<std::int64_t>(g.next()), {}}, clk);
    for (auto n = g.below(4); n > 0; --n) env.payload.items.push_back(g.text());
    env.kind = static_cast<postbox::message_kind>(g.below(4));
    env.causation_id = g.below(2) ? postbox::message_id(g.next(), g.next()) : postbox::message_id();
    env.correlation_id = postbox::message_id(g.next(), g.next());
    env.producer = g.text();
    env.partition_key = g.text();
    env.tenant = g.text();
    if (g.below(2)) env.trace = postbox::trace_context::generate(g.below(2) == 1);
    if (g.below(2)) env.deadline = clk.now() + std::chrono::nanoseconds(g.below(1'000'000'000'000ULL));
    env.attempt = static_cast<std::uint32_t>(g.next());
    for (auto n = g.below(5); n > 0; --n) env.headers.set(g.text(), g.text());

    const auto text = pj::encode(env);
    const auto back = pj::decode<order_placed>(text);
    INFO("round " << i << ": " << text);
    REQUIRE(back.has_value());
    CHECK(back->id == env.id);
    CHECK(back->kind == env.kind);
    CHECK(back->occurred_at == env.occurred_at);
    CHECK(back->correlation_id == env.correlation_id);
    CHECK(back->causation_id == env.causation_id);
    CHECK(back->producer == env.producer);
    CHECK(back->partition_key == env.partition_key);
    CHECK(back->tenant == env.tenant);
    CHECK(back->trace == env.trace);
    CHECK(back->deadline == env.deadline);
    CHECK(back->attempt == env.attempt);
    CHECK(back->headers == env.headers);
    CHECK(back->payload == env.payload);
    // Encoding is a function of the value: decode then encode gives the same text.
    CHECK(pj::encode(*back) == text);
  }
}

TEST_CASE("property: decode never throws on mangled envelopes", "[json][property]") {
  gen g{0x5eed0002};
  postbox::manual_clock clk;
  const std::string good = pj::encode(sample(clk));
  const auto rounds = postbox_test::scaled(20000);
  std::uint64_t accepted = 0;
  for (std::uint64_t i = 0; i < rounds; ++i) {
    std::string text = good;
    for (auto n = 1 + g.below(4); n > 0; --n) {
      const auto at = g.below(text.size());
      switch (g.below(3)) {
        case 0: text[at] = static_cast<char>(g.next()); break;
        case 1: text.erase(at, 1 + g.below(8)); break;
        default: text.insert(at, std::string(1 + g.below(3), "{[\"]}:,\\"[g.below(8)])); break;
      }
    }
    const auto r = pj::decode<order_placed>(text);  // noexcept: a throw would terminate
    if (r.has_value()) {
      ++accepted;
    } else {
      CHECK(r.error().code != errc::ok);
    }
  }
  CHECK(accepted < rounds);
}
