// SPDX-License-Identifier: MIT
// Specification tests for postbox::topic: fan-out, overflow policies, groups, subjects, unsubscribe.
#include <postbox/topic.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <string>
#include <iterator>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>
#include <thread>

using postbox::overflow;
using postbox::subscription_options;

TEST_CASE("publish delivers one shared message to every subscription in order", "[topic]") {
  postbox::topic<std::string> t;
  auto a = t.subscribe();
  auto b = t.subscribe();
  for (int i = 0; i < 3; ++i) REQUIRE(t.publish(std::to_string(i)).delivered == 2);
  for (int i = 0; i < 3; ++i) {
    auto da = a.try_receive();
    auto db = b.try_receive();
    REQUIRE(da);
    REQUIRE(db);
    CHECK(**da == std::to_string(i));
    CHECK(&**da == &**db);  // one immutable copy shared by both
  }
  CHECK_FALSE(a.try_receive());
}

TEST_CASE("destroying a subscription unsubscribes it", "[topic]") {
  postbox::topic<int> t;
  {
    auto s = t.subscribe();
    CHECK(t.subscriber_count() == 1);
  }
  CHECK(t.subscriber_count() == 0);
  CHECK(t.publish(1).delivered == 0);
}

TEST_CASE("unsubscribing releases a publisher blocked on that subscription", "[topic]") {
  postbox::topic<int> t;
  auto s = std::make_unique<postbox::subscription<int>>(t.subscribe(subscription_options{1, overflow::block, {}, {}}));
  REQUIRE(t.publish(1).delivered == 1);
  std::atomic<bool> done{false};
  std::thread pub([&] {
    (void)t.publish(2);  // blocks: the queue is full
    done = true;
  });
  s.reset();  // unsubscribe during the publish
  REQUIRE(postbox_test::eventually([&] { return done.load(); }));
  pub.join();
}

TEST_CASE("a block subscriber makes the publisher wait until it receives", "[topic]") {
  postbox::topic<int> t;
  auto s = t.subscribe(subscription_options{1, overflow::block, {}, {}});
  REQUIRE(t.publish(1).delivered == 1);
  std::atomic<bool> done{false};
  std::thread pub([&] {
    (void)t.publish(2);
    done = true;
  });
  auto first = s.receive();
  REQUIRE(first);
  CHECK(**first == 1);
  auto second = s.receive();
  REQUIRE(second);
  CHECK(**second == 2);
  pub.join();
  CHECK(done);
}

TEST_CASE("drop_oldest keeps the newest messages and reports the lag", "[topic]") {
  postbox::topic<int> t;
  auto s = t.subscribe(subscription_options{2, overflow::drop_oldest, {}, {}});
  for (int i = 0; i < 5; ++i) REQUIRE(t.publish(i).delivered == 1);
  CHECK(s.take_lag() == 3);
  CHECK(s.take_lag() == 0);
  CHECK(**s.try_receive() == 3);
  CHECK(**s.try_receive() == 4);
}

TEST_CASE("drop_newest discards new messages when full", "[topic]") {
  postbox::topic<int> t;
  auto s = t.subscribe(subscription_options{2, overflow::drop_newest, {}, {}});
  for (int i = 0; i < 4; ++i) (void)t.publish(i);
  CHECK(s.dropped() == 2);
  CHECK(**s.try_receive() == 0);
  CHECK(**s.try_receive() == 1);
  CHECK_FALSE(s.try_receive());
}

TEST_CASE("fail makes publish report the refusing subscription", "[topic]") {
  postbox::topic<int> t;
  auto full = t.subscribe(subscription_options{1, overflow::fail, {}, {}});
  auto roomy = t.subscribe(subscription_options{8, overflow::fail, {}, {}});
  CHECK(t.publish(1).ok());
  auto r = t.publish(2);
  CHECK_FALSE(r.ok());
  REQUIRE(r.refused.size() == 1);
  CHECK(r.refused[0] == full.id());
  CHECK(r.delivered == 1);
}

TEST_CASE("a slow drop_newest subscriber does not delay a fast one", "[topic]") {
  postbox::topic<int> t;
  auto slow = t.subscribe(subscription_options{1, overflow::drop_newest, {}, {}});
  auto fast = t.subscribe(subscription_options{128, overflow::block, {}, {}});
  for (int i = 0; i < 100; ++i) (void)t.publish(i);
  int n = 0;
  while (fast.try_receive()) ++n;
  CHECK(n == 100);
  CHECK(slow.dropped() == 99);
}

TEST_CASE("members of a group compete while other subscriptions get every message", "[topic]") {
  postbox::topic<int> t;
  subscription_options g{16, overflow::block, "workers", {}};
  auto w1 = t.subscribe(g);
  auto w2 = t.subscribe(g);
  auto solo = t.subscribe();
  CHECK(t.subscriber_count() == 2);
  for (int i = 0; i < 10; ++i) CHECK(t.publish(i).delivered == 2);
  int group_total = 0;
  for (int i = 0; i < 5; ++i) {
    if (w1.try_receive()) ++group_total;
    if (w2.try_receive()) ++group_total;
  }
  CHECK(group_total == 10);
  CHECK(solo.size_approx() == 10);
}

TEST_CASE("subject patterns match one token with star and the tail with gt", "[topic]") {
  CHECK(postbox::subject_matches("orders.*", "orders.created"));
  CHECK_FALSE(postbox::subject_matches("orders.*", "orders.eu.created"));
  CHECK_FALSE(postbox::subject_matches("orders.*", "orders"));
  CHECK(postbox::subject_matches("orders.>", "orders.eu.created"));
  CHECK_FALSE(postbox::subject_matches("orders.>", "orders"));
  CHECK(postbox::subject_matches("*.created", "orders.created"));
  CHECK(postbox::subject_matches("orders.created", "orders.created"));
  CHECK_FALSE(postbox::subject_matches("orders.created", "orders.deleted"));
}

TEST_CASE("publish on a subject reaches only matching subscriptions", "[topic]") {
  postbox::topic<int> t;
  auto star = t.subscribe("orders.*");
  auto tail = t.subscribe("orders.>");
  auto all = t.subscribe();
  (void)t.publish("orders.created", 1);
  (void)t.publish("orders.eu.created", 2);
  (void)t.publish("users.created", 3);
  CHECK(star.size_approx() == 1);
  CHECK(tail.size_approx() == 2);
  CHECK(all.size_approx() == 3);
  auto d = star.try_receive();
  REQUIRE(d);
  CHECK(d->subject() == "orders.created");
}

TEST_CASE("invalid subjects and patterns are rejected with invalid_argument", "[topic]") {
  postbox::topic<int> t;
  for (const char* bad : {"orders..x", ".orders", "orders.", "orders.>.x", "ord ers", "orders.a*"}) {
    INFO(bad);
    try {
      (void)t.subscribe(bad);
      FAIL("accepted");
    } catch (const postbox::error& e) {
      CHECK(e.code() == postbox::errc::invalid_argument);
    }
  }
  for (const char* bad : {"orders.*", "orders.>", "a..b", ""}) {
    INFO(bad);
    try {
      (void)t.publish(bad, 1);
      FAIL("accepted");
    } catch (const postbox::error& e) {
      CHECK(e.code() == postbox::errc::invalid_argument);
    }
  }
}

TEST_CASE("receive_for times out on an empty subscription and ends after unsubscribe", "[topic]") {
  postbox::topic<int> t;
  auto s = t.subscribe();
  CHECK(s.receive_for(std::chrono::milliseconds(1)).status() == postbox::receive_status::timeout);
  (void)t.publish(7);
  auto r = s.receive_for(std::chrono::milliseconds(1));
  REQUIRE(r.has_value());
  CHECK(**r == 7);
}

// --- lifecycle: reset while blocked, close, stop tokens --------------------

TEST_CASE("resetting a subscription wakes a thread blocked in its receive with closed", "[topic][teardown]") {
  // Regression: reset() dropped the last reference to the queue while the
  // woken receiver was still inside it (heap-use-after-free under ASan, a
  // spin on freed memory at -O2).
  for (int round = 0; round < 50; ++round) {
    postbox::topic<int> t;
    auto sub = t.subscribe();
    std::atomic<bool> entered{false};
    std::atomic<int> outcome{-1};
    std::thread receiver([&] {
      entered.store(true);
      auto r = sub.receive_for(std::chrono::hours(1));
      outcome.store(static_cast<int>(r.status()));
    });
    REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
    sub.reset();
    receiver.join();
    CHECK(outcome.load() == static_cast<int>(postbox::receive_status::closed));
    CHECK_FALSE(sub);
    CHECK(t.subscriber_count() == 0);
  }
}

TEST_CASE("destroying a subscription waits for a thread blocked in its receive to leave", "[topic][teardown]") {
  for (int round = 0; round < 50; ++round) {
    postbox::topic<int> t;
    auto sub = std::make_unique<postbox::subscription<int>>(t.subscribe());
    std::atomic<bool> got_value{false};
    std::thread receiver([&, s = sub.get()] { got_value.store(s->receive().has_value()); });
    // Inside the call (spinning or parked): destruction must wait for it.
    REQUIRE(postbox_test::eventually([&] { return sub->blocked_receivers_approx() == 1; }));
    sub.reset();  // the handle's destructor: must not free what the receiver still uses
    receiver.join();
    CHECK_FALSE(got_value.load());
  }
}

TEST_CASE("resetting one group member wakes its receiver and leaves the group's queue to the others",
          "[topic][teardown]") {
  postbox::topic<int> t;
  auto a = t.subscribe({.group = "billing"});
  auto b = t.subscribe({.group = "billing"});
  std::atomic<bool> entered{false};
  std::atomic<bool> got_value{true};
  std::thread receiver([&] {
    entered.store(true);
    got_value.store(a.receive().has_value());
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  a.reset();
  receiver.join();
  CHECK_FALSE(got_value.load());
  REQUIRE(t.publish(7).delivered == 1);
  auto d = b.try_receive();
  REQUIRE(d);
  CHECK(**d == 7);
}

TEST_CASE("a closed topic refuses publishes and reports closed", "[topic]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  t.close();
  CHECK(t.is_closed());
  const auto r = t.publish(1);
  CHECK(r.closed);
  CHECK_FALSE(r.ok());
  CHECK(r.delivered == 0);
  CHECK_FALSE(sub.try_receive());
}

TEST_CASE("after close a subscription drains what was delivered, then receive returns empty", "[topic]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  REQUIRE(t.publish(1).ok());
  REQUIRE(t.publish(2).ok());
  t.close();
  auto first = sub.receive();
  auto second = sub.receive();
  REQUIRE(first);
  REQUIRE(second);
  CHECK(**first == 1);
  CHECK(**second == 2);
  CHECK_FALSE(sub.receive());
  CHECK(sub.receive_for(std::chrono::hours(1)).status() == postbox::receive_status::closed);
}

TEST_CASE("closing a topic wakes a receiver blocked on an empty subscription with closed", "[topic][teardown]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  std::atomic<bool> entered{false};
  std::atomic<int> outcome{-1};
  std::thread receiver([&] {
    entered.store(true);
    outcome.store(static_cast<int>(sub.receive_for(std::chrono::hours(1)).status()));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  t.close();
  receiver.join();
  CHECK(outcome.load() == static_cast<int>(postbox::receive_status::closed));
}

TEST_CASE("closing a topic wakes a publisher blocked on a full block subscription", "[topic][teardown]") {
  postbox::topic<int> t;
  auto sub = t.subscribe({.capacity = 1, .policy = overflow::block});
  REQUIRE(t.publish(1).ok());
  std::atomic<bool> entered{false};
  std::atomic<bool> reported_closed{false};
  std::thread publisher([&] {
    entered.store(true);
    reported_closed.store(t.publish(2).closed);
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  t.close();
  publisher.join();
  CHECK(reported_closed.load());
  auto d = sub.receive();  // the message queued before close is still delivered
  REQUIRE(d);
  CHECK(**d == 1);
  CHECK_FALSE(sub.receive());
}

TEST_CASE("destroying a topic closes it for the subscriptions that outlive it", "[topic]") {
  auto t = std::make_unique<postbox::topic<int>>();
  auto sub = t->subscribe();
  REQUIRE(t->publish(5).ok());
  t.reset();
  auto d = sub.receive();
  REQUIRE(d);
  CHECK(**d == 5);
  CHECK_FALSE(sub.receive());
}

TEST_CASE("subscribing to a closed topic gives a subscription that is already closed", "[topic]") {
  postbox::topic<int> t;
  t.close();
  auto sub = t.subscribe();
  CHECK(sub.receive_for(std::chrono::hours(1)).status() == postbox::receive_status::closed);
}

TEST_CASE("a group member that asks for another capacity or policy than its group gets conflict", "[topic]") {
  postbox::topic<int> t;
  auto first = t.subscribe({.capacity = 16, .policy = overflow::block, .group = "g"});
  auto same = t.subscribe({.capacity = 16, .policy = overflow::block, .group = "g"});  // 16 rounds to 16: joins
  auto code_of = [&](subscription_options o) {
    try {
      (void)t.subscribe(std::move(o));
    } catch (const postbox::error& e) {
      return e.code();
    }
    return postbox::errc::ok;
  };
  CHECK(code_of({.capacity = 32, .policy = overflow::block, .group = "g"}) == postbox::errc::conflict);
  CHECK(code_of({.capacity = 16, .policy = overflow::drop_oldest, .group = "g"}) == postbox::errc::conflict);
}

TEST_CASE("subscribe accepts braced designated options on every compiler", "[topic]") {
  // Regression: g++ 12 found subscribe({.group = ...}) ambiguous with the
  // pattern overload.
  postbox::topic<int> t;
  auto billing = t.subscribe({.group = "billing"});
  auto bounded = t.subscribe({.capacity = 4});
  auto everything = t.subscribe({});
  auto orders = t.subscribe("orders.*");
  auto shipped = t.subscribe(std::string("orders.shipped"), {.capacity = 8});
  CHECK(t.subscriber_count() == 5);
  auto capacity_of = [&] {
    try {
      (void)t.subscribe({.capacity = 0});
    } catch (const postbox::error& e) {
      return e.code();
    }
    return postbox::errc::ok;
  };
  CHECK(capacity_of() == postbox::errc::invalid_argument);
}

TEST_CASE("a subscription's receive returns canceled when its stop token is stopped", "[topic]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  std::stop_source stop;
  std::atomic<bool> entered{false};
  std::atomic<int> outcome{-1};
  std::thread receiver([&] {
    entered.store(true);
    outcome.store(static_cast<int>(sub.receive_for(std::chrono::hours(1), stop.get_token()).status()));
  });
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  stop.request_stop();
  receiver.join();
  CHECK(outcome.load() == static_cast<int>(postbox::receive_status::canceled));
  REQUIRE(t.publish(3).ok());  // nothing was consumed by the canceled wait
  auto d = sub.try_receive();
  REQUIRE(d);
  CHECK(**d == 3);
}

TEST_CASE("a subscription's receive_many takes up to max deliveries after waiting for the first", "[topic]") {
  postbox::topic<int> t;
  auto sub = t.subscribe();
  for (int i = 0; i < 4; ++i) REQUIRE(t.publish(i).ok());
  std::vector<postbox::delivery<int>> out;
  auto r = sub.receive_many(std::back_inserter(out), 3);
  REQUIRE(r.has_value());
  CHECK(*r == 3);
  CHECK(*out[2] == 2);
  t.close();
  r = sub.receive_many(std::back_inserter(out), 3);
  REQUIRE(r.has_value());
  CHECK(*r == 1);
  CHECK(sub.receive_many(std::back_inserter(out), 3).status() == postbox::receive_status::closed);
}

namespace {
struct three_pointers {
  void* a = nullptr;
  void* b = nullptr;
  void* c = nullptr;
};
}  // namespace

// Which messages travel inline in the queue slots (a copy per subscription)
// and which as one shared item; sharing an inline value allocates, so only
// the shared form's share() is noexcept.
static_assert(postbox::detail::topic_inline_v<int>);
static_assert(postbox::detail::topic_inline_v<std::string_view>);
static_assert(!postbox::detail::topic_inline_v<std::string>);
static_assert(!postbox::detail::topic_inline_v<three_pointers>);
static_assert(noexcept(std::declval<const postbox::delivery<std::string>&>().share()));
static_assert(!noexcept(std::declval<const postbox::delivery<int>&>().share()));
static_assert(sizeof(postbox::delivery<std::string>) == sizeof(std::shared_ptr<const std::string>),
              "the shared form's delivery is the item pointer alone");

TEST_CASE("a small trivially copyable message reaches each subscription as its own copy with its subject", "[topic]") {
  postbox::topic<std::string_view> t;
  auto all = t.subscribe();
  auto orders = t.subscribe("orders.*");
  auto other = t.subscribe("other.>");
  const std::string text = "payload";
  REQUIRE(t.publish("orders.new", std::string_view(text)).delivered == 2);
  REQUIRE(t.publish(std::string_view(text).substr(0, 3)).delivered == 1);
  auto a1 = all.try_receive();
  auto o1 = orders.try_receive();
  REQUIRE(a1);
  REQUIRE(o1);
  CHECK(**a1 == "payload");
  CHECK((*a1)->data() == text.data());  // the view itself, not a copy of the text
  CHECK(&**a1 != &**o1);                // each handle holds its own view
  CHECK(a1->subject() == "orders.new");
  CHECK(o1->subject() == "orders.new");
  a1.reset();
  CHECK(o1->subject() == "orders.new");  // the subject outlives the other subscription's delivery
  auto a2 = all.try_receive();
  REQUIRE(a2);
  CHECK(**a2 == "pay");
  CHECK(a2->subject().empty());
  CHECK_FALSE(orders.try_receive());
  CHECK_FALSE(other.try_receive());
  const auto shared = o1->share();
  REQUIRE(shared);
  CHECK(*shared == "payload");
  CHECK_FALSE(postbox::delivery<std::string_view>());
  CHECK(static_cast<bool>(*o1));
}

TEST_CASE("stats counts every publish on an open topic and none refused by close or an invalid subject", "[topic]") {
  postbox::topic<std::string> t;
  CHECK(t.publish("nobody listens").delivered == 0);  // published, delivered nowhere
  auto s = t.subscribe({.capacity = 1, .policy = overflow::drop_newest});
  CHECK(t.publish("one").delivered == 1);
  CHECK(t.publish("two").dropped == 1);  // full: dropped, still published
  CHECK(t.publish("a.b", "three").dropped == 1);
  CHECK_THROWS_AS(t.publish("bad subject", "x"), postbox::error);
  auto st = t.stats();
  CHECK(st.published == 4);
  CHECK(st.publishing == 0);
  t.close();
  CHECK(t.publish("after").closed);
  CHECK(t.publish("a.b", "after").closed);
  st = t.stats();
  CHECK(st.published == 4);
  CHECK(st.publishing == 0);
}
