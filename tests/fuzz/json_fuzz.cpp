// SPDX-License-Identifier: MIT
// libFuzzer target for json.hpp and schema.hpp: decode must never crash, and what decodes must round-trip.
//
// Build and run: tests/fuzz/run_fuzz.sh (clang++-14, -fsanitize=fuzzer,address,undefined).
#include <postbox/json.hpp>
#include <postbox/schema.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

struct order {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 2;
  std::string id;
  std::int64_t cents = 0;
};
void to_json(nlohmann::json& j, const order& o) { j = nlohmann::json{{"id", o.id}, {"cents", o.cents}}; }
void from_json(const nlohmann::json& j, order& o) {
  j.at("id").get_to(o.id);
  j.at("cents").get_to(o.cents);
}

const postbox::json::schema_registry& registry() {
  static const postbox::json::schema_registry r = [] {
    postbox::json::schema_registry reg;
    reg.add_version("order.placed", 1);
    reg.add<order>();
    reg.add_upcaster("order.placed", 1, 2, [](nlohmann::json p) {
      p["cents"] = p.value("amount", std::int64_t{0}) * 100;
      return p;
    });
    return reg;
  }();
  return r;
}

void require(bool ok) {
  if (!ok) std::abort();  // an invariant broke: libFuzzer reports the input
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  postbox::json::decode_options small;
  small.max_depth = 16;
  small.max_bytes = 1 << 16;

  // Raw decode: either an error with a real code, or an envelope that
  // re-encodes to valid UTF-8 and decodes back to the same text.
  const auto raw = postbox::json::decode_raw(text, small);
  if (raw.has_value()) {
    const std::string once = postbox::json::encode(*raw);
    require(postbox::detail::is_valid_utf8(once));
    postbox::json::decode_options roomy;  // re-encoding may grow the text
    const auto again = postbox::json::decode_raw(once, roomy);
    require(again.has_value());
    require(again->id == raw->id && again->occurred_at == raw->occurred_at && again->headers == raw->headers);
    require(postbox::json::encode(*again) == once);
  } else {
    require(raw.error().code != postbox::errc::ok);
  }

  // Typed and registry decodes must not crash either.
  const auto typed = postbox::json::decode<order>(text);
  if (!typed.has_value()) require(typed.error().code != postbox::errc::ok);
  const auto upcast = registry().decode<order>(text);
  if (upcast.has_value()) require(upcast->schema_version == 2);

  // The small parsers on the same bytes.
  (void)postbox::message_id::parse(text);
  (void)postbox::json::detail::parse_time(text);
  (void)postbox::trace_context::is_valid_traceparent(text);
  (void)postbox::trace_context::is_valid_tracestate(text);
  return 0;
}
