// SPDX-License-Identifier: MIT
// consumer/sources.hpp's include rule: the subscription and stream group sources work with
// <postbox/consumer.hpp> included BEFORE topic.hpp and stream.hpp (alphabetical order), and
// with nothing else that brings them in first (no testing.hpp, no umbrella). The umbrella
// and testing.hpp include them before consumer.hpp; the other consumer tests cover that order.
#include <postbox/consumer.hpp>
#include <postbox/stream.hpp>
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace {

using env_t = postbox::envelope<int>;

static_assert(postbox::in_place_consumer_source<postbox::subscription_source<int>>);
static_assert(postbox::consumer_source<postbox::stream_group_source<int>>);

postbox::consumer_options manual_options() {
  postbox::consumer_options o;
  o.threads = 0;  // poll() drives it: deterministic, no threads
  return o;
}

env_t msg(int n, std::string key) {
  env_t e;
  e.type = "test.int";
  e.payload = n;
  e.partition_key = std::move(key);
  return e;
}

}  // namespace

TEST_CASE("a subscription source delivers with topic.hpp included after consumer.hpp", "[consumer][source]") {
  postbox::topic<env_t> prices;
  auto sub = prices.subscribe();
  postbox::dead_letter_queue<int> dlq;
  std::vector<int> seen;
  postbox::subscription_source<int> source(sub, "prices");
  CHECK(source.backlog() == 0);
  for (int i = 1; i <= 3; ++i) (void)prices.publish(msg(i, ""));
  CHECK(source.backlog() == 3);
  postbox::consumer c(std::move(source), [&](const env_t& e) { seen.push_back(e.payload); }, dlq, manual_options());
  CHECK(c.poll() == 3);
  CHECK(seen == std::vector<int>{1, 2, 3});
  CHECK(c.source_name() == "prices");
}

TEST_CASE("a stream group source commits what it settled with stream.hpp included after consumer.hpp",
          "[consumer][source]") {
  postbox::stream<env_t> orders(1);
  for (int i = 0; i < 3; ++i) (void)orders.append("k", msg(i, "k"));
  auto group = orders.group("billing");
  postbox::dead_letter_queue<int> dlq;
  std::vector<int> seen;
  postbox::consumer c(postbox::stream_group_source<int>(orders, "billing", "orders"),
                      [&](const env_t& e) { seen.push_back(e.payload); }, dlq, manual_options());
  CHECK(c.poll() == 3);
  CHECK(seen == std::vector<int>{0, 1, 2});
  CHECK(group.committed(0) == 3);
  CHECK(group.lag() == 0);
}
