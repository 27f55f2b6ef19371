// SPDX-License-Identifier: MIT
// Tests for postbox/json/envelope_view.hpp: the relay's in-place view of a stored JSON envelope agrees with json::decode wherever it answers, and refuses the rest.
#include <postbox/json.hpp>
#include <postbox/json/envelope_view.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace pj = postbox::json;
namespace pd = postbox::detail;
using nlohmann::json;

namespace {

constexpr std::string_view parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// An envelope with every optional field set and a payload exercising the
// JSON grammar (nesting, escapes, non-ASCII text, numbers of each kind).
postbox::envelope<json> full_envelope(const postbox::clock& clk) {
  json payload = {{"n", -12},
                  {"big", 18446744073709551615ull},
                  {"x", 0.1},
                  {"huge", 1e300},
                  {"tiny", -2.5e-300},
                  {"text", "quote \" back \\ tab \t nl \n ctl \x01 del \x7f é 日本 😀"},
                  {"list", json::array({1, "two", nullptr, true, false, json::object(), json::array()})},
                  {"nested", {{"a", {{"b", {{"c", json::array({json::array({1})})}}}}}}}};
  auto env = postbox::make_envelope("orders.placed", payload, postbox::message_kind::command, clk);
  env.schema_version = 7;
  env.causation_id = postbox::message_id::generate();
  env.producer = "shop";
  env.partition_key = "cust-42";
  env.tenant = "acme";
  env.trace = *postbox::trace_context::parse(parent, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
  env.deadline = env.occurred_at + std::chrono::seconds(30);
  env.attempt = 3;
  env.headers.set("x-region", "eu-west");
  env.headers.set("x-empty", "");
  return env;
}

// Every field of the view equals the decoded envelope's, and the payload
// text is the decoded payload.
void check_same(const pd::json_envelope_view& v, const postbox::envelope<json>& d) {
  CHECK(v.id == d.id);
  CHECK(v.type == d.type);
  CHECK(v.schema_version == d.schema_version);
  CHECK(v.kind == d.kind);
  CHECK(v.occurred_at == d.occurred_at);
  CHECK(v.correlation_id == d.correlation_id);
  CHECK(v.causation_id == d.causation_id);
  CHECK(v.producer == d.producer);
  CHECK(v.partition_key == d.partition_key);
  CHECK(v.tenant == d.tenant);
  CHECK(v.traceparent == d.trace.traceparent);
  CHECK(v.tracestate == d.trace.tracestate);
  CHECK(v.deadline == d.deadline);
  CHECK(v.attempt == d.attempt);
  REQUIRE(v.header_count == d.headers.size());
  for (std::size_t i = 0; i < v.header_count; ++i) {
    const auto got = d.headers.get(v.headers[i].first);
    REQUIRE(got.has_value());
    CHECK(*got == v.headers[i].second);
  }
  CHECK(json::parse(v.payload) == d.payload);
}

}  // namespace

TEST_CASE("the envelope view reads every field json::encode writes exactly as json::decode reads it",
          "[json][envelope_view]") {
  postbox::manual_clock clk;
  const auto env = full_envelope(clk);
  const std::string text = pj::encode(env);
  pd::json_envelope_view v;
  REQUIRE(pd::view_json_envelope(text, v));
  auto decoded = pj::decode_raw(text);
  REQUIRE(decoded.has_value());
  check_same(v, *decoded);
  CHECK(v.payload == env.payload.dump(-1, ' ', false, json::error_handler_t::replace));
  CHECK(pd::json_view_canonical_time(v.occurred_at_text));
  CHECK(v.occurred_at_text == pj::detail::format_time(env.occurred_at));
}

TEST_CASE("the envelope view takes a minimal envelope and leaves the absent fields at their defaults",
          "[json][envelope_view]") {
  postbox::manual_clock clk;
  pd::json_envelope_view v;
  // A view reused after a full envelope must not keep its fields.
  REQUIRE(pd::view_json_envelope(pj::encode(full_envelope(clk)), v));
  const std::string minimal = R"({"id":"0190a5b2-7c3d-7e4f-8a1b-2c3d4e5f6a7b","type":"t","occurred_at":"2026-12-06T10:00:00Z","payload":null})";
  REQUIRE(pd::view_json_envelope(minimal, v));
  auto decoded = pj::decode_raw(minimal);
  REQUIRE(decoded.has_value());
  check_same(v, *decoded);
  CHECK(v.schema_version == 1);
  CHECK(v.kind == postbox::message_kind::event);
  CHECK(v.header_count == 0);
  CHECK_FALSE(v.deadline.has_value());
  CHECK_FALSE(pd::json_view_canonical_time(v.occurred_at_text));  // valid, but not as format_time writes it
}

TEST_CASE("the envelope view refuses texts the decode refuses and those it leaves to the decode",
          "[json][envelope_view]") {
  const std::string id = R"("id":"0190a5b2-7c3d-7e4f-8a1b-2c3d4e5f6a7b")";
  const std::string at = R"("occurred_at":"2026-12-06T10:00:00.000000000Z")";
  auto env = [&](const std::string& extra, const std::string& payload = "1") {
    return "{" + id + R"(,"type":"t",)" + at + (extra.empty() ? "" : "," + extra) + R"(,"payload":)" + payload + "}";
  };
  pd::json_envelope_view v;
  REQUIRE(pd::view_json_envelope(env(""), v));  // the base case is taken
  const std::vector<std::pair<std::string, std::string>> refused{
      {"duplicate member", env(R"("type":"u")")},
      {"unknown member", env(R"("extra":1)")},
      {"null member", env(R"("producer":null)")},
      {"escaped field", env(R"("producer":"a\"b")")},
      {"escaped key", env(R"("\u0070roducer":"a")")},
      {"empty type", "{" + id + R"(,"type":"",)" + at + R"(,"payload":1})"},
      {"missing payload", "{" + id + R"(,"type":"t",)" + at + "}"},
      {"missing id", R"({"type":"t",)" + at + R"(,"payload":1})"},
      {"bad id", env(R"("correlation_id":"not-a-uuid")")},
      {"bad time", env(R"("deadline":"2026-13-06T10:00:00Z")")},
      {"bad kind", env(R"("kind":"rumour")")},
      {"negative version", env(R"("schema_version":-1)")},
      {"fractional version", env(R"("schema_version":1.0)")},
      {"version over 32 bits", env(R"("schema_version":4294967296)")},
      {"string attempt", env(R"("attempt":"1")")},
      {"bad traceparent", env(R"("traceparent":"00-zz")")},
      {"tracestate without traceparent", env(R"("tracestate":"a=b")")},
      {"header not a string", env(R"("headers":{"a":1})")},
      {"duplicate header", env(R"("headers":{"a":"1","a":"2"})")},
      {"headers not an object", env(R"("headers":[])")},
      {"lone low surrogate in payload", env("", R"("\udc00")")},
      {"unpaired high surrogate in payload", env("", R"("\ud800x")")},
      {"number beyond double", env("", "1e400")},
      {"very small number", env("", "1e-400")},
      {"leading zero", env("", "01")},
      {"bare minus", env("", "-")},
      {"fraction without digits", env("", "1.")},
      {"trailing comma", env("", "[1,]")},
      {"control character in a string", env("", "\"a\x01\"")},
      {"invalid UTF-8", env("", "\"\xc3\x28\"")},
      {"overlong UTF-8", env("", "\"\xc0\xaf\"")},
      {"unknown escape", env("", R"("\q")")},
      {"bad literal", env("", "nul")},
      {"too deep", env("", std::string(64, '[') + std::string(64, ']'))},
      {"trailing text", env("") + "x"},
      {"not an object", "[" + env("") + "]"},
      {"truncated", env("").substr(0, 60)},
  };
  for (const auto& [why, text] : refused) {
    INFO(why << ": " << text);
    CHECK_FALSE(pd::view_json_envelope(text, v));
  }
  // The deepest payload the decode allows (the envelope is depth 1) is taken.
  const std::string deepest = env("", std::string(63, '[') + std::string(63, ']'));
  CHECK(pd::view_json_envelope(deepest, v));
  CHECK(pj::decode_raw(deepest).has_value());
}

TEST_CASE("wherever the envelope view answers on mutated texts, json::decode succeeds with the same fields",
          "[json][envelope_view]") {
  postbox::manual_clock clk;
  std::vector<std::string> seeds{pj::encode(full_envelope(clk))};
  auto plain = postbox::make_envelope("t", json{{"a", 1}}, postbox::message_kind::event, clk);
  seeds.push_back(pj::encode(plain));
  std::mt19937 rng(20261206);
  const std::string alphabet = "{}[]\":,\\ 0123456789.eE+-tfnulx\x01\x7f\xc3\xa9\xff";
  std::size_t taken = 0, refused = 0;
  for (int round = 0; round < 20000; ++round) {
    std::string text = seeds[static_cast<std::size_t>(round) % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits && !text.empty(); ++e) {
      const std::size_t at = rng() % text.size();
      switch (rng() % 4) {
        case 0: text.erase(at, 1); break;
        case 1: text.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
        case 2: text[at] = alphabet[rng() % alphabet.size()]; break;
        default: text.insert(at, text.substr(at, rng() % 12)); break;  // repeat a stretch (duplicates members)
      }
    }
    pd::json_envelope_view v;
    if (!pd::view_json_envelope(text, v)) {
      ++refused;
      continue;
    }
    ++taken;
    INFO(text);
    auto decoded = pj::decode_raw(text);
    REQUIRE(decoded.has_value());
    check_same(v, *decoded);
  }
  // Both answers occurred, so both sides of the property were exercised.
  CHECK(taken > 100);
  CHECK(refused > 1000);
}

namespace {

// Equal values and the same number kinds all the way down (json's == takes
// 1 == 1u == 1.0, and from_json may tell them apart).
bool same_kinds(const json& a, const json& b) {
  if (a.type() != b.type() || a != b) return false;
  if (a.is_object()) {
    for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib)
      if (ia.key() != ib.key() || !same_kinds(*ia, *ib)) return false;
  }
  if (a.is_array())
    for (std::size_t i = 0; i < a.size(); ++i)
      if (!same_kinds(a[i], b[i])) return false;
  return true;
}

}  // namespace

TEST_CASE("the envelope view keeps each id's stored text only when it is the canonical lowercase form",
          "[json][envelope_view]") {
  postbox::manual_clock clk;
  auto env = postbox::make_envelope("t", json{{"a", 1}}, postbox::message_kind::event, clk);
  env.causation_id = postbox::message_id::generate();
  pd::json_envelope_view v;
  const std::string text = pj::encode(env);
  REQUIRE(pd::view_json_envelope(text, v));
  CHECK(v.id_text == env.id.to_string());
  CHECK(v.correlation_id_text == env.correlation_id.to_string());
  CHECK(v.causation_id_text == env.causation_id.to_string());
  // The same ids in uppercase: the values are read, the texts are not kept.
  std::string upper = text;
  for (const auto* id : {&env.id, &env.causation_id}) {
    const std::string lower = id->to_string();
    std::string up = lower;
    for (char& c : up)
      if (c >= 'a' && c <= 'f') c = static_cast<char>(c - 'a' + 'A');
    for (std::size_t at = upper.find(lower); at != std::string::npos; at = upper.find(lower)) upper.replace(at, 36, up);
  }
  REQUIRE(pd::view_json_envelope(upper, v));
  CHECK(v.id == env.id);
  CHECK(v.causation_id == env.causation_id);
  CHECK(v.id_text.empty());
  CHECK(v.causation_id_text.empty());
  // Absent ids have no text.
  const std::string minimal = R"({"id":"0190a5b2-7c3d-7e4f-8a1b-2c3d4e5f6a7b","type":"t","occurred_at":"2026-12-06T10:00:00Z","payload":null})";
  REQUIRE(pd::view_json_envelope(minimal, v));
  CHECK(v.id_text == "0190a5b2-7c3d-7e4f-8a1b-2c3d4e5f6a7b");
  CHECK(v.correlation_id_text.empty());
  CHECK(v.causation_id_text.empty());
}

TEST_CASE("the in-place payload value equals nlohmann's parse with the same number kinds, whatever it held before",
          "[json][envelope_view]") {
  const std::vector<std::string> texts{
      R"({"n":0,"what":"widget"})",
      R"({"n":1,"what":"gadget with a longer name than the last one"})",
      R"({"n":-1,"what":""})",
      R"({"n":-0,"what":"x"})",
      R"({"a":18446744073709551615,"b":-9223372036854775808,"c":9223372036854775807,"d":0.1,"e":1e300,"f":-2.5E-300,"g":1E2,"h":-0.0})",
      R"({"list":[1,"two",null,true,false,{},[]],"nested":{"a":{"b":[[1]]}}})",
      R"({"list":[1],"nested":{"a":{"b":[[1,2,3]],"c":"d"}}})",
      R"({"list":[],"z":1})",
      R"({"n":"now a string","what":7})",
      R"([{"a":1},{"b":2},3])",
      R"([{"b":2}])",
      R"("text é 日本 😀")",
      "42",
      "-42",
      "4.5",
      "true",
      "null",
      R"({})",
      R"([])",
      R"( { "a" : [ 1 , 2 ] , "b" : { } } )",
  };
  json j;
  // Every text after every other, so each update starts from each shape.
  for (const auto& before : texts) {
    for (const auto& text : texts) {
      INFO(before << " then " << text);
      REQUIRE(pd::json_view_dom::assign(before, j));
      REQUIRE(pd::json_view_dom::assign(text, j));
      CHECK(same_kinds(j, json::parse(text)));
    }
  }
}

TEST_CASE("the in-place payload value leaves escapes, unsorted or repeated members and 64-bit overflow to the parser",
          "[json][envelope_view]") {
  json j = json::parse(R"({"a":1,"b":2})");
  for (const std::string text : {R"({"b":1,"a":2})", R"({"a":1,"a":2})", R"({"a":"q\"uote"})", R"({"a\u0062":1})",
                                 "18446744073709551616", "-9223372036854775809", R"([1,{"z":1,"y":2}])"}) {
    INFO(text);
    CHECK_FALSE(pd::json_view_dom::assign(text, j));
    // Whatever it left, the next taken text makes it whole again.
    REQUIRE(pd::json_view_dom::assign(R"({"a":[1,2],"c":"d"})", j));
    CHECK(same_kinds(j, json::parse(R"({"a":[1,2],"c":"d"})")));
  }
}

TEST_CASE("wherever the in-place payload value answers on mutated payloads, it equals nlohmann's parse",
          "[json][envelope_view]") {
  postbox::manual_clock clk;
  std::vector<std::string> seeds{pj::encode(full_envelope(clk)),
                                 pj::encode(postbox::make_envelope(
                                     "t", json{{"a", 1}, {"b", json::array({-1, 2.5, "x"})}, {"c", {{"d", nullptr}}}},
                                     postbox::message_kind::event, clk))};
  std::mt19937 rng(6122026);
  const std::string alphabet = "{}[]\":,\\ 0123456789.eE+-tfnulxabc";
  std::size_t taken = 0, left = 0;
  json j;
  for (int round = 0; round < 20000; ++round) {
    std::string text = seeds[static_cast<std::size_t>(round) % seeds.size()];
    const std::size_t from = text.find("\"payload\":") + 10;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = from + rng() % (text.size() - from - 1);
      switch (rng() % 4) {
        case 0: text.erase(at, 1); break;
        case 1: text.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
        case 2: text[at] = alphabet[rng() % alphabet.size()]; break;
        default: text.insert(at, text.substr(at, rng() % 12)); break;  // repeat a stretch (duplicates members)
      }
    }
    pd::json_envelope_view v;
    if (!pd::view_json_envelope(text, v)) continue;
    INFO(v.payload);
    if (!pd::json_view_dom::assign(v.payload, j)) {
      ++left;
      continue;
    }
    ++taken;
    CHECK(same_kinds(j, json::parse(v.payload)));
  }
  CHECK(taken > 100);
  CHECK(left > 100);
}
