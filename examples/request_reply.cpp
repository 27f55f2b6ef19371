// Request-reply in one process: a price service answers quotes on a channel;
// a requester matches replies by correlation id, gets a structured error for
// an unknown item, and a timeout (from the clock) when nobody answers.
//
//   requester ──request (reply-to: "shop")──> channel ──> responder
//       ▲                                                    │
//       └──────────── endpoint_registry["shop"] <──reply─────┘
#include <postbox/postbox.hpp>
#include <postbox/request_reply.hpp>

#include <chrono>
#include <cstdio>
#include <string>

struct quote {
  static constexpr std::string_view message_type = "price.quote";
  std::string item;
};

int main() {
  using namespace std::chrono_literals;
  postbox::timer_service timers;  // fires timeouts on the real clock
  postbox::channel<postbox::envelope<quote>> prices(64);
  postbox::endpoint_registry<int> registry;
  postbox::responder<quote, int> service(prices, registry, [](const postbox::envelope<quote>& q) {
    if (q.payload.item == "tea") return 250;
    throw postbox::error(postbox::errc::not_found, "no price for " + q.payload.item);
  });
  postbox::requester<quote, int> shop(prices, registry, timers, {.endpoint = "shop"});

  auto tea = shop.request(quote{"tea"}, 2s)->get();
  std::printf("tea: %s cents=%d correlated=%s\n", std::string(postbox::to_string(tea.status)).c_str(),
              tea.reply->payload, tea.reply->causation_id.is_nil() ? "no" : "yes");

  auto gold = shop.request(quote{"gold"}, 2s)->get();
  std::printf("gold: %s (%s)\n", std::string(postbox::to_string(gold.status)).c_str(), gold.error->message.c_str());

  // Nobody serves this channel: the request times out.
  postbox::channel<postbox::envelope<quote>> void_channel(4);
  postbox::requester<quote, int> lonely(void_channel, registry, timers);
  auto none = lonely.request(quote{"tea"}, 50ms)->get();
  std::printf("unanswered: %s\n", std::string(postbox::to_string(none.status)).c_str());
  return tea.ok() && none.status == postbox::errc::timeout ? 0 : 1;
}
