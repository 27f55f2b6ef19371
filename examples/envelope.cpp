// SPDX-License-Identifier: MIT
// envelope: a command causes an event in the same conversation; the event goes
// to JSON and back, and a damaged message is refused with the field it lacks.
//
//   place_order (command) ──caused_by──▶ order.placed (event) ──encode/decode──▶ JSON
#include <postbox/postbox.hpp>
#include <postbox/json.hpp>

#include <cstdio>
#include <string>

struct order_placed {
  static constexpr const char* message_type = "order.placed";  // envelope type name
  static constexpr int schema_version = 1;
  std::string order_id;
  long long cents = 0;
};
void to_json(nlohmann::json& j, const order_placed& o) { j = {{"order_id", o.order_id}, {"cents", o.cents}}; }
void from_json(const nlohmann::json& j, order_placed& o) {
  j.at("order_id").get_to(o.order_id);
  j.at("cents").get_to(o.cents);
}

int main() {
  auto command = postbox::make_envelope("place_order", std::string("o-17"), postbox::message_kind::command);
  command.trace = postbox::trace_context::generate();  // a new W3C trace
  command.tenant = "acme";

  auto event = postbox::caused_by(command, order_placed{"o-17", 1999});  // same conversation
  event.producer = "orders";
  const bool linked = event.correlation_id == command.id && event.causation_id == command.id &&
                      event.trace == command.trace && command.id < event.id;
  std::printf("command %s -> event %s (linked: %s)\n", command.id.to_string().c_str(),
              event.id.to_string().c_str(), linked ? "yes" : "no");

  const std::string text = postbox::json::encode(event);
  std::printf("json: %s\n", text.c_str());

  const auto back = postbox::json::decode<order_placed>(text);  // never throws
  if (!back) return 1;
  std::printf("decoded %s %s cents=%lld tenant=%s\n", back->type.c_str(), back->payload.order_id.c_str(),
              back->payload.cents, back->tenant.c_str());

  nlohmann::json damaged = nlohmann::json::parse(text);
  damaged.erase("payload");
  const auto bad = postbox::json::decode<order_placed>(damaged.dump());
  std::printf("damaged: %s at '%s'\n", std::string(postbox::to_string(bad.error().code)).c_str(),
              bad.error().field.c_str());
  return linked && !bad ? 0 : 1;
}
