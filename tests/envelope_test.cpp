// SPDX-License-Identifier: MIT
// Specification tests for envelope.hpp: message_id, trace_context, header_map and envelope construction.
#include <postbox/channel.hpp>
#include <postbox/envelope.hpp>
#include <postbox/testing.hpp>

#include "envelope_checks.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

using postbox::message_id;

namespace {

struct order_placed {
  static constexpr std::string_view message_type = "order.placed";
  static constexpr std::uint32_t schema_version = 3;
  int order = 0;
};

struct plain_payload {
  int value = 0;
};

// Data members that happen to share the traits' names are not traits.
struct record_payload {
  std::string message_type;
  int schema_version = 9;
};

constexpr std::string_view valid_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

}  // namespace

namespace field_count {
// Converts to any member type; declared only (used in unevaluated brace-initializations).
struct any_field {
  template <class U>
  operator U() const;  // NOLINT(google-explicit-constructor)
};
// The number of initializers an aggregate accepts: its field count.
template <class T, class... A>
constexpr std::size_t of() {
  if constexpr (requires { T{A{}..., any_field{}}; }) {
    return of<T, A..., any_field>();
  } else {
    return sizeof...(A);
  }
}
}  // namespace field_count

// detail::relocated_envelope names every field of envelope<T> (designated
// initializers may leave one out silently): a field added to the envelope
// must be added there too, then this count.
static_assert(field_count::of<postbox::envelope<int>>() == 15,
              "envelope changed: update detail::relocated_envelope in envelope.hpp, then this count");

static_assert(std::is_trivially_copyable_v<message_id>);
static_assert(noexcept(message_id::generate()));
static_assert(message_id().is_nil());
static_assert(message_id::parse("00000000-0000-0000-0000-000000000000").value().is_nil());
static_assert(postbox::message_traits<order_placed>::type_name() == "order.placed");
static_assert(postbox::message_traits<order_placed>::schema_version() == 3);
static_assert(postbox::message_traits<plain_payload>::type_name().empty());
static_assert(postbox::message_traits<plain_payload>::schema_version() == 1);
static_assert(postbox::trace_context::is_valid_traceparent(valid_parent));
static_assert(postbox::message_traits<record_payload>::type_name().empty());
static_assert(postbox::message_traits<record_payload>::schema_version() == 1);

TEST_CASE("a default message_id is nil and orders before every generated id", "[envelope]") {
  const message_id nil;
  CHECK(nil.is_nil());
  CHECK(nil.to_string() == "00000000-0000-0000-0000-000000000000");
  const auto id = message_id::generate();
  CHECK_FALSE(id.is_nil());
  CHECK(nil < id);
}

TEST_CASE("a generated id has UUID version 7 and the RFC 9562 variant", "[envelope]") {
  for (int i = 0; i < 1000; ++i) {
    const auto id = message_id::generate();
    CHECK(id.version() == 7);
    CHECK((id.low() >> 62) == 0b10);
    const std::string text = id.to_string();
    CHECK(text[14] == '7');
    CHECK((text[19] == '8' || text[19] == '9' || text[19] == 'a' || text[19] == 'b'));
  }
}

TEST_CASE("a generated id carries the clock's millisecond as its timestamp", "[envelope]") {
  // A day after the latest id so far, so the process-wide last id is earlier.
  const postbox::time_point start = message_id::generate().timestamp() + std::chrono::hours(24);
  postbox::manual_clock clock(start + std::chrono::microseconds(1500));
  const auto id = message_id::generate(clock);
  CHECK(id.timestamp() == start + std::chrono::milliseconds(1));
  clock.advance(std::chrono::seconds(2));
  CHECK(message_id::generate(clock).timestamp() == start + std::chrono::milliseconds(2001));
}

TEST_CASE("ids keep increasing when the clock stands still or goes back", "[envelope]") {
  postbox::manual_clock clock(message_id::generate().timestamp() + std::chrono::hours(1));
  postbox::manual_clock early;  // 2026-01-01, before every id already generated
  message_id last = message_id::generate(clock);
  for (int i = 0; i < 100000; ++i) {
    const auto next = message_id::generate(i % 2 == 0 ? static_cast<const postbox::clock&>(clock) : early);
    REQUIRE(last < next);
    last = next;
  }
}

TEST_CASE("message_id text form round-trips and parse rejects malformed text", "[envelope]") {
  const auto id = message_id::generate();
  const auto back = message_id::parse(id.to_string());
  REQUIRE(back.has_value());
  CHECK(*back == id);

  const auto upper = message_id::parse("0190F2A4-1B2C-7D3E-8F40-0123456789AB");
  REQUIRE(upper.has_value());
  CHECK(upper->to_string() == "0190f2a4-1b2c-7d3e-8f40-0123456789ab");
  CHECK(upper->high() == 0x0190f2a41b2c7d3eULL);
  CHECK(upper->low() == 0x8f400123456789abULL);

  CHECK_FALSE(message_id::parse(""));
  CHECK_FALSE(message_id::parse("0190f2a41b2c7d3e8f400123456789ab"));        // no dashes
  CHECK_FALSE(message_id::parse("0190f2a4-1b2c-7d3e-8f40-0123456789a"));      // short
  CHECK_FALSE(message_id::parse("0190f2a4-1b2c-7d3e-8f40-0123456789abc"));    // long
  CHECK_FALSE(message_id::parse("0190f2a4-1b2c-7d3e-8f40_0123456789ab"));     // wrong separator
  CHECK_FALSE(message_id::parse("0190f2a4-1b2c-7d3e-8f40-0123456789ag"));     // not hex
  CHECK_FALSE(message_id::parse("{0190f2a4-1b2c-7d3e-8f40-0123456789a}"));    // braces
}

TEST_CASE("message_id orders by its 128 bits and hashes equal ids equally", "[envelope]") {
  const message_id a(1, 5), b(1, 6), c(2, 0);
  CHECK(a < b);
  CHECK(b < c);
  CHECK(a == message_id(1, 5));
  CHECK(a != b);
  const std::hash<message_id> h;
  CHECK(h(a) == h(message_id(1, 5)));
  std::unordered_set<message_id> set;
  for (int i = 0; i < 10000; ++i) set.insert(message_id::generate());
  CHECK(set.size() == 10000);
}

TEST_CASE("a million ids from several threads are unique and increase in every thread", "[envelope]") {
  constexpr int threads = 4;
  const auto per_thread = static_cast<std::size_t>(postbox_test::scaled(250000));
  std::vector<std::vector<message_id>> ids(threads);
  std::atomic<int> ready{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      auto& mine = ids[static_cast<std::size_t>(t)];
      mine.reserve(per_thread);
      ready.fetch_add(1);
      while (ready.load() < threads) std::this_thread::yield();
      for (std::size_t i = 0; i < per_thread; ++i) mine.push_back(message_id::generate());
    });
  }
  for (auto& w : workers) w.join();

  std::vector<message_id> all;
  for (const auto& mine : ids) {
    REQUIRE(mine.size() == per_thread);
    CHECK(std::is_sorted(mine.begin(), mine.end()));
    CHECK(std::adjacent_find(mine.begin(), mine.end()) == mine.end());  // strictly increasing
    all.insert(all.end(), mine.begin(), mine.end());
  }
  std::sort(all.begin(), all.end());
  CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
  CHECK(all.size() == per_thread * threads);

  // Generation order across threads: an id generated after the workers were
  // joined is greater than every id they generated.
  CHECK(all.back() < message_id::generate());
}

TEST_CASE("an id generated after another thread's id was observed is greater", "[envelope]") {
  // Happens-before across threads implies id order: hand an id over through
  // an atomic flag and generate on the receiving side.
  const auto rounds = postbox_test::scaled(20000);
  std::atomic<std::uint64_t> published_high{0}, published_low{0};
  std::atomic<std::uint64_t> turn{0};
  std::thread other([&] {
    for (std::uint64_t r = 0; r < rounds; ++r) {
      while (turn.load() != 2 * r + 1) std::this_thread::yield();
      const auto id = message_id::generate();
      published_high.store(id.high());
      published_low.store(id.low());
      turn.store(2 * r + 2);
    }
  });
  message_id last;
  bool ordered = true;
  for (std::uint64_t r = 0; r < rounds; ++r) {
    const auto mine = message_id::generate();
    ordered = ordered && last < mine;
    turn.store(2 * r + 1);
    while (turn.load() != 2 * r + 2) std::this_thread::yield();
    const message_id theirs(published_high.load(), published_low.load());
    ordered = ordered && mine < theirs;
    last = theirs;
  }
  other.join();
  CHECK(ordered);
}

TEST_CASE("message_kind names are stable and parse back", "[envelope]") {
  using postbox::message_kind;
  for (auto k : {message_kind::command, message_kind::event, message_kind::query, message_kind::reply}) {
    CHECK(postbox::parse_message_kind(postbox::to_string(k)) == k);
  }
  CHECK(postbox::to_string(message_kind::command) == "command");
  CHECK(postbox::to_string(message_kind::reply) == "reply");
  CHECK_FALSE(postbox::parse_message_kind("Event"));
}

TEST_CASE("traceparent validation follows the W3C grammar", "[envelope][trace]") {
  using postbox::trace_context;
  CHECK(trace_context::is_valid_traceparent(valid_parent));
  CHECK_FALSE(trace_context::is_valid_traceparent(""));
  CHECK_FALSE(trace_context::is_valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));  // upper
  CHECK_FALSE(trace_context::is_valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));  // zero trace
  CHECK_FALSE(trace_context::is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));  // zero span
  CHECK_FALSE(trace_context::is_valid_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));  // version ff
  CHECK_FALSE(trace_context::is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"));  // v00 extra
  CHECK_FALSE(trace_context::is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01"));  // dash moved
  CHECK_FALSE(trace_context::is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g"));
  // A later version may append fields after a dash.
  CHECK(trace_context::is_valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
  CHECK_FALSE(trace_context::is_valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"));
}

TEST_CASE("tracestate validation accepts W3C lists and rejects bad members", "[envelope][trace]") {
  using postbox::trace_context;
  CHECK(trace_context::is_valid_tracestate(""));
  CHECK(trace_context::is_valid_tracestate("congo=t61rcWkgMzE"));
  CHECK(trace_context::is_valid_tracestate("rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE,\t,"));
  CHECK(trace_context::is_valid_tracestate("tenant1@vendor=x"));
  CHECK_FALSE(trace_context::is_valid_tracestate("Rojo=1"));          // upper-case key
  CHECK_FALSE(trace_context::is_valid_tracestate("rojo"));            // no '='
  CHECK_FALSE(trace_context::is_valid_tracestate("rojo="));           // empty value
  CHECK_FALSE(trace_context::is_valid_tracestate("rojo=a=b"));        // '=' in value
  CHECK_FALSE(trace_context::is_valid_tracestate("rojo=1,rojo=2"));   // duplicate key
  CHECK_FALSE(trace_context::is_valid_tracestate("rojo=caf\xc3\xa9"));  // non-ASCII
  std::string many;
  for (int i = 0; i < 33; ++i) many.append("k").append(std::to_string(i)).append("=v,");
  CHECK_FALSE(trace_context::is_valid_tracestate(many));  // more than 32 members
}

TEST_CASE("trace_context::parse validates and exposes the traceparent parts", "[envelope][trace]") {
  using postbox::trace_context;
  const auto tc = trace_context::parse(valid_parent, "congo=t61rcWkgMzE");
  REQUIRE(tc.has_value());
  CHECK(tc->trace_id() == "4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(tc->parent_id() == "00f067aa0ba902b7");
  CHECK(tc->flags() == 1);
  CHECK(tc->sampled());
  CHECK(tc->valid());
  CHECK(trace_context::parse("", "")->empty());
  CHECK_FALSE(trace_context::parse("", "congo=1"));  // state without parent
  CHECK_FALSE(trace_context::parse("00-bad", ""));
  CHECK_FALSE(trace_context::parse(valid_parent, "Bad=1"));
}

TEST_CASE("a child trace keeps the trace id and flags with a new span id", "[envelope][trace]") {
  const auto root = postbox::trace_context::generate(false);
  REQUIRE(root.valid());
  CHECK_FALSE(root.sampled());
  const auto child = root.child();
  CHECK(child.valid());
  CHECK(child.trace_id() == root.trace_id());
  CHECK(child.parent_id() != root.parent_id());
  CHECK(child.flags() == root.flags());
}

TEST_CASE("header_map keeps keys sorted and unique", "[envelope][headers]") {
  postbox::header_map h;
  h.set("b", "2");
  h.set("a", "1");
  h.set("c", "3");
  h.set("b", "two");
  REQUIRE(h.size() == 3);
  CHECK(h.get("b") == "two");
  CHECK_FALSE(h.get("d"));
  CHECK(h.contains("a"));
  std::vector<std::string> keys;
  for (const auto& [k, v] : h) keys.push_back(k);
  CHECK(keys == std::vector<std::string>{"a", "b", "c"});
  CHECK(h.erase("a"));
  CHECK_FALSE(h.erase("a"));
  CHECK(h.size() == 2);
  CHECK(h == postbox::header_map{{"c", "3"}, {"b", "two"}});
}

// "k100" .. "k139" (appended, not "k" + string: g++ 12 warns falsely on that).
namespace {
std::string numbered_key(int k) {
  std::string key = "k";
  key += std::to_string(100 + k);
  return key;
}
}  // namespace

// 40 keys in a scrambled order: the block grows several times and most
// inserts shift entries; a copy taken halfway stays as it was.
TEST_CASE("a header_map keeps many headers sorted through inserts, erases and a copy taken halfway",
          "[envelope][headers]") {
  postbox::header_map h;
  postbox::header_map halfway;
  std::vector<std::string> keys;
  for (int i = 0; i < 40; ++i) {
    const int k = (i * 17) % 40;  // 17 is coprime with 40: every key once
    std::string key = numbered_key(k);
    h.set(key, std::to_string(k));
    keys.push_back(std::move(key));
    if (i == 19) halfway = h;
  }
  std::sort(keys.begin(), keys.end());
  REQUIRE(h.size() == 40);
  std::vector<std::string> seen;
  for (const auto& [k, v] : h) {
    seen.push_back(k);
    CHECK(v == std::to_string(std::stoi(k.substr(1)) - 100));
  }
  CHECK(seen == keys);
  CHECK(halfway.size() == 20);
  CHECK(std::is_sorted(halfway.begin(), halfway.end()));
  for (int k = 0; k < 40; k += 2) CHECK(h.erase(numbered_key(k)));
  CHECK(h.size() == 20);
  for (int k = 0; k < 40; ++k) CHECK(h.contains(numbered_key(k)) == (k % 2 == 1));
  CHECK(halfway.size() == 20);
}

// Copies share one block of entries: begin() of two copies is the same
// address until one of them changes.
TEST_CASE("a copied header_map shares its entries until one copy changes", "[envelope][headers]") {
  const postbox::header_map original{{"a", "1"}, {"b", "2"}};
  postbox::header_map copy = original;
  CHECK(copy.begin() == original.begin());
  copy.set("b", "two");
  CHECK(copy.begin() != original.begin());
  CHECK(original.get("b") == "2");
  CHECK(copy.get("b") == "two");
  CHECK(copy.get("a") == "1");
}

TEST_CASE("setting a header to the value it has leaves a shared header_map shared", "[envelope][headers]") {
  const postbox::header_map original{{"reply-to", "rr.1"}};
  postbox::header_map copy = original;
  copy.set("reply-to", "rr.1");
  CHECK(copy.begin() == original.begin());
  CHECK(copy == original);
}

TEST_CASE("erasing from or clearing a shared header_map leaves the other copies whole", "[envelope][headers]") {
  const postbox::header_map original{{"a", "1"}, {"b", "2"}};
  postbox::header_map erased = original;
  postbox::header_map cleared = original;
  CHECK(erased.erase("a"));
  cleared.clear();
  CHECK(original == postbox::header_map{{"a", "1"}, {"b", "2"}});
  CHECK(erased == postbox::header_map{{"b", "2"}});
  CHECK(cleared.empty());
  CHECK(cleared.begin() == cleared.end());
}

TEST_CASE("a moved-from header_map is empty and usable", "[envelope][headers]") {
  postbox::header_map from{{"a", "1"}};
  const postbox::header_map to = std::move(from);
  CHECK(to.get("a") == "1");
  CHECK(from.empty());  // NOLINT(bugprone-use-after-move): the documented moved-from state
  from.set("b", "2");
  CHECK(from.get("b") == "2");
  CHECK(to.size() == 1);
}

// Checksummed: each round's map is shared by two threads, and whichever
// lets go last frees the block; the worker changes every other copy, in
// place when the main thread has already let go, else on a copy of its own.
// Under ThreadSanitizer a weaker order on the reference count shows as a
// race between one thread's reads and the other's change or delete.
TEST_CASE("two threads sharing a header_map each read their own entries whichever lets go last",
          "[envelope][headers]") {
  const std::uint64_t rounds = postbox_test::scaled(20'000);
  postbox::channel<postbox::header_map, postbox::spsc> handoff(64);
  std::uint64_t worker_sum = 0;
  std::thread worker([&] {
    while (auto copy = handoff.receive()) {
      const std::uint64_t value = std::stoull(std::string(*copy->get("n")));
      worker_sum += value;
      if (value % 2 == 0) {
        copy->set("n", "0");
        if (copy->get("n") != "0") worker_sum += 1'000'000'000;  // a change another copy made shows here
      }
    }
  });
  std::uint64_t main_sum = 0;
  for (std::uint64_t i = 1; i <= rounds; ++i) {
    postbox::header_map mine{{"n", std::to_string(i)}, {"reply-to", "rr.0123456789ab"}};
    REQUIRE(handoff.send(postbox::header_map(mine)) == postbox::send_status::ok);
    main_sum += std::stoull(std::string(*mine.get("n")));
  }
  handoff.close();
  worker.join();
  CHECK(main_sum == rounds * (rounds + 1) / 2);
  CHECK(worker_sum == main_sum);
}

TEST_CASE("make_envelope fills id, time, correlation and type from traits", "[envelope]") {
  postbox::manual_clock clock;
  const auto env = postbox::make_envelope(order_placed{42}, clock);
  CHECK_FALSE(env.id.is_nil());
  CHECK(env.type == "order.placed");
  CHECK(env.schema_version == 3);
  CHECK(env.kind == postbox::message_kind::event);
  CHECK(env.occurred_at == clock.now());
  CHECK(env.correlation_id == env.id);
  CHECK(env.causation_id.is_nil());
  CHECK(env.attempt == 0);
  CHECK(env.payload.order == 42);

  const auto cmd = postbox::make_envelope("ship", plain_payload{7}, postbox::message_kind::command, clock);
  CHECK(cmd.type == "ship");
  CHECK(cmd.kind == postbox::message_kind::command);
  CHECK(cmd.schema_version == 1);
  CHECK(env.id < cmd.id);
}

TEST_CASE("caused_by carries correlation, trace, deadline, tenant and key; causation is the parent", "[envelope]") {
  postbox::manual_clock clock;
  auto parent = postbox::make_envelope("place", plain_payload{1}, postbox::message_kind::command, clock);
  parent.trace = *postbox::trace_context::parse(valid_parent, "a=1");
  parent.deadline = clock.now() + std::chrono::seconds(30);
  parent.tenant = "acme";
  parent.partition_key = "order-1";
  parent.producer = "web";
  parent.attempt = 3;
  parent.headers.set("x", "y");

  clock.advance(std::chrono::seconds(1));
  const auto child = postbox::caused_by(parent, order_placed{1}, clock);
  CHECK(child.id != parent.id);
  CHECK(child.correlation_id == parent.correlation_id);
  CHECK(child.causation_id == parent.id);
  CHECK(child.trace == parent.trace);
  CHECK(child.deadline == parent.deadline);
  CHECK(child.tenant == "acme");
  CHECK(child.partition_key == "order-1");
  CHECK(child.producer.empty());
  CHECK(child.attempt == 0);
  CHECK(child.headers.empty());
  CHECK(child.type == "order.placed");
  CHECK(child.kind == postbox::message_kind::event);
  CHECK(child.occurred_at == clock.now());

  const auto grandchild = postbox::caused_by(child, "audit", plain_payload{2}, postbox::message_kind::command, clock);
  CHECK(grandchild.correlation_id == parent.id);
  CHECK(grandchild.causation_id == child.id);
  CHECK(grandchild.kind == postbox::message_kind::command);
}

TEST_CASE("reply_to makes a reply in the request's conversation", "[envelope]") {
  postbox::manual_clock clock;
  auto request = postbox::make_envelope("quote", plain_payload{1}, postbox::message_kind::query, clock);
  request.deadline = clock.now() + std::chrono::seconds(5);
  const auto reply = postbox::reply_to(request, std::string("42 EUR"), clock);
  CHECK(reply.kind == postbox::message_kind::reply);
  CHECK(reply.correlation_id == request.id);
  CHECK(reply.causation_id == request.id);
  CHECK(reply.deadline == request.deadline);
  CHECK(reply.payload == "42 EUR");
  const auto typed = postbox::reply_to(request, "quote.result", 42, clock);
  CHECK(typed.type == "quote.result");
}

TEMPLATE_TEST_CASE("an envelope received from a channel carries every field it was sent with, in either receive form",
                   "[envelope][channel]", postbox::spsc, postbox::mpmc) {
  postbox::manual_clock clock;
  auto sent = postbox::make_envelope("order.placed.v2.with-a-long-name", std::string(40, 'p'),
                                     postbox::message_kind::command, clock);
  sent.schema_version = 4;
  sent.causation_id = message_id::generate(clock);
  sent.producer = "checkout-service-eu-west-1";
  sent.partition_key = "order-1";
  sent.tenant = "acme";
  sent.trace = *postbox::trace_context::parse(valid_parent, "a=1");
  sent.deadline = clock.now() + std::chrono::seconds(30);
  sent.attempt = 2;
  sent.headers.set("x", "y");
  postbox::channel<postbox::envelope<std::string>, TestType> ch(4);
  REQUIRE(ch.try_send(postbox::envelope<std::string>(sent)) == postbox::send_status::ok);
  REQUIRE(ch.try_send(postbox::envelope<std::string>(sent)) == postbox::send_status::ok);
  auto as_result = ch.try_receive_result();  // built in place from the slot
  REQUIRE(as_result.has_value());
  postbox_test::check_every_field(*as_result, sent);
  auto as_optional = ch.try_receive();  // and once more into the optional
  REQUIRE(as_optional.has_value());
  postbox_test::check_every_field(*as_optional, sent);
}

TEST_CASE("an envelope is expired at and after its deadline only", "[envelope]") {
  postbox::manual_clock clock;
  auto env = postbox::make_envelope(plain_payload{}, clock);
  CHECK_FALSE(env.expired(clock.now() + std::chrono::hours(100)));
  env.deadline = clock.now() + std::chrono::seconds(1);
  CHECK_FALSE(env.expired(clock.now()));
  CHECK(env.expired(clock.now() + std::chrono::seconds(1)));
}
