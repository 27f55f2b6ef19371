// SPDX-License-Identifier: MIT
// Cross-tenant tests: a consumer accepts only its tenants, inbox ids are kept per tenant, a dead-letter view never crosses tenants.
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/inbox.hpp>
#include <postbox/observer.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "crash/store_fixtures.hpp"
#include "support.hpp"

#include <mutex>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using postbox::errc;

namespace {

using env_t = postbox::envelope<int>;

struct rig {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{64};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, clock};

  [[nodiscard]] postbox::consumer_options options() {
    postbox::consumer_options o;
    o.threads = 0;
    o.clock = &clock;
    o.jitter_seed = 7;
    return o;
  }
  void send(int n, std::string tenant) {
    auto e = postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, clock);
    e.tenant = std::move(tenant);
    REQUIRE(ch.try_send(std::move(e)) == postbox::send_status::ok);
  }
  [[nodiscard]] postbox::channel_source<int> source() { return postbox::channel_source<int>(ch, "numbers"); }
};

std::vector<int> payloads(const std::vector<postbox::dead_letter<int>>& v) {
  std::vector<int> out;
  for (const auto& d : v) out.push_back(d.message ? d.message->payload : -1);
  return out;
}

postbox::dead_letter<int> letter(const postbox::clock& clk, int n, std::string tenant, std::string reason = "rejected") {
  postbox::dead_letter<int> d;
  auto e = postbox::make_envelope(std::string("test.int"), n, postbox::message_kind::event, clk);
  e.tenant = std::move(tenant);
  d.message.emplace(std::move(e));
  d.reason = std::move(reason);
  d.attempts = 1;
  d.source = "numbers";
  return d;
}

struct payment {
  static constexpr const char* message_type = "payment.received";
  long cents = 0;
};

}  // namespace

#if POSTBOX_TEST_HAVE_SQLITE
#  define STORE_FIXTURES postbox_test::memory_fixture, postbox_test::sqlite_fixture
#else
#  define STORE_FIXTURES postbox_test::memory_fixture
#endif

TEST_CASE("a consumer accepting tenant a dead-letters a tenant b message with reason tenant without running the handler",
          "[tenant][consumer]") {
  rig r;
  auto o = r.options();
  o.tenants = {"a"};
  std::vector<int> handled;
  postbox::consumer c(r.source(), [&](const env_t& e) { handled.push_back(e.payload); }, r.dlq, o);
  r.send(1, "a");
  r.send(2, "b");
  r.send(3, "a");
  (void)c.poll();
  CHECK(handled == std::vector<int>{1, 3});
  const auto dead = r.dlq.list();
  REQUIRE(dead.size() == 1);
  CHECK(dead[0].message->payload == 2);
  CHECK(dead[0].message->tenant == "b");
  CHECK(dead[0].reason == postbox::dead_letter_reasons::tenant);
  CHECK(dead[0].attempts == 0);
  CHECK(dead[0].source == "numbers");
  const auto s = c.stats();
  CHECK(s.received == 3);
  CHECK(s.acked == 2);
  CHECK(s.dead_lettered == 1);
  CHECK(s.in_flight == 0);
}

TEST_CASE("a consumer's accept_tenant predicate admits tenants the list does not name", "[tenant][consumer]") {
  rig r;
  auto o = r.options();
  o.tenants = {"a"};
  o.accept_tenant = [](std::string_view t) { return t.substr(0, 4) == "eu-1"; };
  std::vector<int> handled;
  postbox::consumer c(r.source(), [&](const env_t& e) { handled.push_back(e.payload); }, r.dlq, o);
  r.send(1, "a");
  r.send(2, "eu-1-shop");
  r.send(3, "us-2-shop");
  r.send(4, "");
  (void)c.poll();
  CHECK(handled == std::vector<int>{1, 2});
  CHECK(payloads(r.dlq.list({.reason = "tenant"})) == std::vector<int>{3, 4});
}

TEST_CASE("a consumer with no tenant options handles every tenant", "[tenant][consumer]") {
  rig r;
  std::vector<int> handled;
  postbox::consumer c(r.source(), [&](const env_t& e) { handled.push_back(e.payload); }, r.dlq, r.options());
  r.send(1, "a");
  r.send(2, "b");
  r.send(3, "");
  (void)c.poll();
  CHECK(handled == std::vector<int>{1, 2, 3});
  CHECK(r.dlq.size() == 0);
}

TEST_CASE("the settle event of a refused tenant's message names the tenant and the reason", "[tenant][consumer]") {
  rig r;
  std::mutex mu;
  std::vector<std::string> seen;
  postbox::observer obs;
  obs.on_settle = [&](const postbox::message_event& e) {
    std::lock_guard lock(mu);
    seen.push_back(std::string(to_string(e.outcome)) + "/" + std::string(e.tenant) + "/" + std::string(e.reason));
  };
  auto o = r.options();
  o.tenants = {"a"};
  o.observer = &obs;
  postbox::consumer c(r.source(), [](const env_t&) {}, r.dlq, o);
  r.send(1, "b");
  r.send(2, "a");
  (void)c.poll();
  std::lock_guard lock(mu);
  CHECK(seen == std::vector<std::string>{"dead_lettered/b/tenant", "acked/a/"});
}

TEMPLATE_TEST_CASE("inbox dedup is per tenant: one message id in two tenants is processed once in each", "[tenant][inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::manual_clock clock;
  postbox::inbox in(s, "billing", {}, clock);
  auto a = postbox::make_envelope(payment{100}, clock);
  a.tenant = "a";
  auto b = a;  // the same id
  b.tenant = "b";
  int runs = 0;
  auto fn = [&](auto&) { ++runs; };
  CHECK(in.handle(a, fn).processed());
  CHECK(in.handle(b, fn).processed());
  CHECK(in.handle(a, fn).duplicate());
  CHECK(in.handle(b, fn).duplicate());
  CHECK(runs == 2);
  CHECK(*in.contains("a", a.id));
  CHECK(*in.contains("b", a.id));
  CHECK_FALSE(*in.contains(a.id));  // the untenanted scope never saw it
  CHECK(*in.size() == 2);
}

TEMPLATE_TEST_CASE("an inbox scoped to a tenant fails another tenant's message with permission_denied and records nothing",
                   "[tenant][inbox]", STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::manual_clock clock;
  postbox::inbox_options o;
  o.tenant = "a";
  postbox::inbox in(s, "billing", o, clock);
  auto b = postbox::make_envelope(payment{1}, clock);
  b.tenant = "b";
  int runs = 0;
  const auto out = in.handle(b, [&](auto&) { ++runs; });
  CHECK(out.failed());
  CHECK(out.error == errc::permission_denied);
  CHECK(runs == 0);
  CHECK_FALSE(*in.contains("b", b.id));
  auto a = postbox::make_envelope(payment{2}, clock);
  a.tenant = "a";
  CHECK(in.handle(a, [&](auto&) { ++runs; }).processed());
  CHECK(*in.contains(a.id));  // a scoped inbox's contains(id) looks in its tenant
  CHECK(runs == 1);
}

TEMPLATE_TEST_CASE("inbox prune keeps max_ids per tenant and reaches every tenant it handled", "[tenant][inbox]",
                   STORE_FIXTURES) {
  TestType f;
  auto& s = f.get();
  postbox::manual_clock clock;
  postbox::inbox_options o;
  o.max_ids = 2;
  o.prune_interval = postbox::duration::zero();
  postbox::inbox in(s, "billing", o, clock);
  for (const char* t : {"a", "b"}) {
    for (int i = 0; i < 3; ++i) {
      auto e = postbox::make_envelope(payment{i}, clock);
      e.tenant = t;
      REQUIRE(in.handle(e, [](auto&) {}).processed());
      clock.advance(1ms);
    }
  }
  REQUIRE(*in.size() == 6);
  CHECK(*in.prune() == 2);  // one per tenant
  CHECK(*in.size() == 4);
}

TEST_CASE("a consumer name holding the tenant separator is refused", "[tenant][inbox]") {
  postbox::memory_store s;
  CHECK_THROWS_AS(postbox::inbox(s, std::string("bill\x1fing")), postbox::error);
}

TEST_CASE("a dead-letter view lists, counts and gets only its tenant's entries", "[tenant][dead_letter]") {
  postbox::manual_clock clock;
  postbox::dead_letter_queue<int> dlq({}, clock);
  REQUIRE(dlq.add(letter(clock, 1, "a")) == errc::ok);
  REQUIRE(dlq.add(letter(clock, 2, "b")) == errc::ok);
  REQUIRE(dlq.add(letter(clock, 3, "a")) == errc::ok);
  postbox::dead_letter<int> poison;
  poison.raw = "{not json";
  poison.reason = "parse_error";
  poison.source = "numbers";
  REQUIRE(dlq.add(std::move(poison)) == errc::ok);

  auto a = dlq.view("a");
  CHECK(payloads(a.list()) == std::vector<int>{1, 3});
  CHECK(a.count() == 2);
  const auto b_id = dlq.list({.tenant = "b"}).at(0).id;
  CHECK_FALSE(a.get(b_id).has_value());
  CHECK(dlq.view("b").get(b_id).has_value());
  // A filter naming another tenant cannot widen the view.
  CHECK(a.list({.tenant = "b"}).empty());
  CHECK(a.count({.tenant = "b"}) == 0);
  CHECK(a.list({.poison = true}).empty());
  // The operator's queue sees every tenant and the poison entry.
  CHECK(dlq.size() == 4);
  CHECK(a.export_text().find("tenant=b") == std::string::npos);
  CHECK(a.export_text().find("tenant=a") != std::string::npos);
}

TEST_CASE("a dead-letter view removes and redrives only its tenant's entries", "[tenant][dead_letter]") {
  postbox::manual_clock clock;
  postbox::dead_letter_queue<int> dlq({.redrive_rate = 1000, .redrive_burst = 1000}, clock);
  std::vector<int> redriven;
  dlq.set_origin("numbers", [&](env_t e) {
    redriven.push_back(e.payload);
    return errc::ok;
  });
  for (int i = 1; i <= 4; ++i) REQUIRE(dlq.add(letter(clock, i, i % 2 == 0 ? "b" : "a")) == errc::ok);
  auto a = dlq.view("a");
  CHECK(a.redrive({.filter = {.tenant = "b"}}) == 0);
  CHECK(a.redrive() == 2);
  CHECK(redriven == std::vector<int>{1, 3});
  CHECK(a.remove({}) == 0);  // a's entries left with the redrive
  CHECK(dlq.view("b").remove({}) == 2);
  CHECK(dlq.size() == 0);
}

TEST_CASE("a dead-letter queue scoped to a tenant refuses another tenant's entry with permission_denied",
          "[tenant][dead_letter]") {
  postbox::manual_clock clock;
  postbox::dead_letter_options o;
  o.tenant = "a";
  postbox::dead_letter_queue<int> dlq(o, clock);
  auto b = letter(clock, 2, "b");
  CHECK(dlq.add(std::move(b)) == errc::permission_denied);
  CHECK(b.message.has_value());  // untouched on refusal
  CHECK(dlq.add(letter(clock, 1, "a")) == errc::ok);
  CHECK(dlq.size() == 1);
  CHECK(dlq.stats().refused == 1);
}

TEST_CASE("a threaded consumer under load handles every accepted tenant's message once and dead-letters every other once",
          "[tenant][consumer][stress]") {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{256};
  const auto n = static_cast<int>(postbox_test::scaled(4000));
  postbox::dead_letter_queue<int> dlq({.capacity = static_cast<std::size_t>(n)}, clock);
  std::mutex mu;
  std::vector<int> handled;  // under mu
  postbox::consumer_options o;
  o.threads = 2;
  o.clock = &clock;
  o.tenants = {"a"};
  o.receive_wait = 1ms;
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"), [&](const env_t& e) {
    std::lock_guard lock(mu);
    handled.push_back(e.payload);
  }, dlq, o);
  long long want_a = 0, want_b = 0;
  for (int i = 1; i <= n; ++i) {
    auto e = postbox::make_envelope(std::string("test.int"), i, postbox::message_kind::event, clock);
    e.tenant = i % 3 == 0 ? "b" : "a";
    (i % 3 == 0 ? want_b : want_a) += i;
    REQUIRE(ch.send(std::move(e)) == postbox::send_status::ok);
  }
  REQUIRE(postbox_test::eventually([&] {
    const auto s = c.stats();
    return s.acked + s.dead_lettered == static_cast<std::uint64_t>(n);
  }));
  long long got_a = 0, got_b = 0;
  {
    std::lock_guard lock(mu);
    for (int v : handled) got_a += v;
    CHECK(handled.size() == static_cast<std::size_t>(n - n / 3));
  }
  const auto dead = dlq.list();
  for (const auto& d : dead) {
    got_b += d.message->payload;
    CHECK(d.message->tenant == "b");
    CHECK(d.reason == "tenant");
  }
  CHECK(dead.size() == static_cast<std::size_t>(n / 3));
  CHECK(got_a == want_a);  // nothing lost, nothing handled twice
  CHECK(got_b == want_b);
}
