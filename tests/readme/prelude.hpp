// SPDX-License-Identifier: MIT
// What the C++ fragments of README.md and docs/ may use without declaring it:
// every postbox header, chrono literals, and the example names the fragments
// take as given (an `order` payload, a channel of orders, a store, ...).
// Declarations only: fragments are compiled, never linked or run (see
// tests/readme/CMakeLists.txt). Keep this small and plain: a reader of a
// fragment should guess each name's type without looking here.
#pragma once

#include <postbox/postbox.hpp>
#include <postbox/json.hpp>
#include <postbox/sqlite.hpp>
#if defined(POSTBOX_README_NATS)
#include <postbox/nats.hpp>
#include <postbox/nats_consumer.hpp>
#include <postbox/nats_outbox.hpp>
#include <postbox/nats_request_reply.hpp>
#endif

#include <chrono>
#include <string>

using namespace std::chrono_literals;  // 100ms, 2s, 30s in the fragments

// Every fragment sees these through `using namespace readme_context;`; kept
// out of the global namespace so that library templates never see `id` or
// `data` (-Wshadow in postbox's own code).
namespace readme_context {

// The payloads.
struct order {
  static constexpr const char* message_type = "order";
  int qty = 0;
  long long cents = 0;
};
void to_json(nlohmann::json& j, const order& o);
void from_json(const nlohmann::json& j, order& o);

struct order_placed {
  static constexpr const char* message_type = "order.placed";
  std::string order;
  long long cents = 0;
};
void to_json(nlohmann::json& j, const order_placed& o);
void from_json(const nlohmann::json& j, order_placed& o);

struct quote {
  static constexpr const char* message_type = "quote";
  std::string item;
};
void to_json(nlohmann::json& j, const quote& q);
void from_json(const nlohmann::json& j, quote& q);

// Values and components a fragment works with.
extern postbox::envelope<order> env;
extern std::string id;
extern std::string customer;
extern long long cents;
extern std::string data;  // a saga's input
extern postbox::channel<postbox::envelope<order>> orders_channel;
extern postbox::channel<postbox::envelope<quote>> requests;
extern postbox::topic<postbox::envelope<order_placed>> events;
extern postbox::timer_service timers;
extern postbox::sqlite_store db;
extern postbox::consumer<order> billing_consumer;

// The application's functions.
void use(const postbox::envelope<order>& e);
void handle(const postbox::envelope<order>& e);
bool in_stock(const order& o);
int price_of(const postbox::envelope<quote>& request);
std::string render_report(postbox::operation_context& ctx);
void publish_event(const postbox::envelope<postbox::saga_event>& e);
postbox::step_result reserve_stock(postbox::step_context& ctx);
postbox::step_result release_stock(postbox::step_context& ctx);
postbox::step_result charge_card(postbox::step_context& ctx);
postbox::step_result refund_card(postbox::step_context& ctx);
postbox::step_result ship(postbox::step_context& ctx);

}  // namespace readme_context
