// SPDX-License-Identifier: MIT
// Specification tests for schema.hpp: versioned decoders, upcaster chains and unknown types.
#include <postbox/schema.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>

namespace pj = postbox::json;
using postbox::errc;
using nlohmann::json;

namespace {

// Three generations of one message type.
struct order_v1 {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 1;
  int cents = 0;
};
struct order_v2 {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 2;
  int cents = 0;
  std::string currency;
};
struct order_v3 {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 3;
  std::string amount;  // "12.34 EUR"
};
void to_json(json& j, const order_v1& o) { j = json{{"cents", o.cents}}; }
void from_json(const json& j, order_v1& o) { j.at("cents").get_to(o.cents); }
void to_json(json& j, const order_v2& o) { j = json{{"cents", o.cents}, {"currency", o.currency}}; }
void from_json(const json& j, order_v2& o) {
  j.at("cents").get_to(o.cents);
  j.at("currency").get_to(o.currency);
}
void to_json(json& j, const order_v3& o) { j = json{{"amount", o.amount}}; }
void from_json(const json& j, order_v3& o) { j.at("amount").get_to(o.amount); }

pj::schema_registry make_registry() {
  pj::schema_registry r;
  r.add<order_v1>().add<order_v2>().add<order_v3>();
  r.add_upcaster<order_v1, order_v2>([](const order_v1& o) { return order_v2{o.cents, "EUR"}; });
  r.add_upcaster<order_v2, order_v3>([](const order_v2& o) {
    return order_v3{std::to_string(o.cents / 100) + "." + (o.cents % 100 < 10 ? "0" : "") +
                    std::to_string(o.cents % 100) + " " + o.currency};
  });
  return r;
}

template <class T>
std::string encoded(T payload) {
  postbox::manual_clock clk;
  return pj::encode(postbox::make_envelope(std::move(payload), clk));
}

}  // namespace

TEST_CASE("a v1 message decodes as the newest type through the upcaster chain", "[schema]") {
  const auto registry = make_registry();
  const auto r = registry.decode<order_v3>(encoded(order_v1{1234}));
  REQUIRE(r.has_value());
  CHECK(r->payload.amount == "12.34 EUR");
  CHECK(r->schema_version == 3);
  CHECK(r->type == "order.placed");
}

TEST_CASE("messages of the newest and middle versions decode too", "[schema]") {
  const auto registry = make_registry();
  CHECK(registry.decode<order_v3>(encoded(order_v2{705, "USD"}))->payload.amount == "7.05 USD");
  CHECK(registry.decode<order_v3>(encoded(order_v3{"1.00 CHF"}))->payload.amount == "1.00 CHF");
  CHECK(registry.latest_version("order.placed") == 3u);
  CHECK(registry.knows("order.placed"));
  CHECK_FALSE(registry.knows("order.shipped"));
}

TEST_CASE("decoding into an older type than the newest is unsupported_version", "[schema]") {
  const auto registry = make_registry();
  const auto r = registry.decode<order_v2>(encoded(order_v1{1}));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::unsupported_version);
  REQUIRE(r.raw() != nullptr);
  CHECK(r.raw()->schema_version == 1);  // the envelope as received
}

TEST_CASE("an unknown type yields the raw envelope with the reason, for dead-lettering", "[schema]") {
  const auto registry = make_registry();
  const std::string text = pj::encode(postbox::make_envelope("order.shipped", json{{"box", 3}}));
  const auto typed = registry.decode<order_v3>(text);
  REQUIRE_FALSE(typed.has_value());
  CHECK(typed.error().code == errc::unknown_type);
  CHECK(typed.error().field == "type");
  REQUIRE(typed.raw() != nullptr);
  CHECK(typed.raw()->payload == json{{"box", 3}});

  const auto raw = registry.decode_raw(text);
  REQUIRE_FALSE(raw.has_value());
  CHECK(raw.error().code == errc::unknown_type);
  REQUIRE(raw.raw() != nullptr);
  CHECK(raw.raw()->type == "order.shipped");
  // The raw envelope re-encodes unchanged, so the dead letter can be redriven.
  CHECK(pj::encode(*raw.raw()) == text);
}

TEST_CASE("a version newer than every decoder is unsupported_version", "[schema]") {
  const auto registry = make_registry();
  json j = json::parse(encoded(order_v3{"x"}));
  j["schema_version"] = 4;
  const auto r = registry.decode<order_v3>(j.dump());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::unsupported_version);
  CHECK(r.raw() != nullptr);
}

TEST_CASE("a gap in the upcaster chain is unsupported_version", "[schema]") {
  pj::schema_registry registry;
  registry.add<order_v1>().add<order_v3>();
  registry.add_upcaster<order_v2, order_v3>([](const order_v2& o) { return order_v3{o.currency}; });
  const auto r = registry.decode<order_v3>(encoded(order_v1{1}));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::unsupported_version);
  CHECK(r.error().message.find("from version 1") != std::string::npos);
}

TEST_CASE("an upcaster that throws is bad_type on the payload, never an exception", "[schema]") {
  pj::schema_registry registry;
  registry.add<order_v1>().add<order_v2>();
  registry.add_upcaster("order.placed", 1, 2, [](json) -> json { throw std::runtime_error("boom"); });
  const auto r = registry.decode<order_v2>(encoded(order_v1{1}));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::bad_type);
  CHECK(r.error().field == "payload");
  CHECK(r.error().message.find("boom") != std::string::npos);
  REQUIRE(r.raw() != nullptr);
  CHECK(r.raw()->payload == json{{"cents", 1}});
}

TEST_CASE("a typed upcaster whose input does not convert is bad_type with the raw envelope", "[schema]") {
  const auto registry = make_registry();
  json j = json::parse(encoded(order_v1{1}));
  j["payload"] = json{{"cents", "one"}};
  const auto r = registry.decode<order_v3>(j.dump());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::bad_type);
  CHECK(r.raw() != nullptr);
}

TEST_CASE("an upcaster that does not raise the version is rejected at registration", "[schema]") {
  pj::schema_registry registry;
  CHECK_THROWS_AS(registry.add_upcaster("t", 2, 2, [](json j) { return j; }), postbox::error);
}

TEST_CASE("decode errors before the envelope parses carry no raw envelope", "[schema]") {
  const auto registry = make_registry();
  const auto r = registry.decode<order_v3>("{\"id\":");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::parse_error);
  CHECK(r.raw() == nullptr);
}
