// SPDX-License-Identifier: MIT
// Specification tests for redaction.hpp: sensitive header names, scrubbing secrets from texts, the process-wide policy.
#include <postbox/envelope.hpp>
#include <postbox/metrics.hpp>
#include <postbox/redaction.hpp>

#include <catch2/catch.hpp>

#include "support.hpp"

#include <atomic>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace {

// Restores the process-wide policy when a test that replaced it ends.
struct policy_guard {
  std::shared_ptr<const postbox::redaction_policy> saved = postbox::current_redaction_policy();
  ~policy_guard() { postbox::set_redaction_policy(*saved); }
};

}  // namespace

TEST_CASE("the default policy calls authorization, cookie and token headers sensitive, ignoring case and _ versus -",
          "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  CHECK(p.is_sensitive("authorization"));
  CHECK(p.is_sensitive("Authorization"));
  CHECK(p.is_sensitive("COOKIE"));
  CHECK(p.is_sensitive("x_api_key"));
  CHECK(p.is_sensitive("token"));
  CHECK(p.is_sensitive("x-secret-pin"));
  CHECK(p.is_sensitive("X-Secret-Anything"));
  CHECK_FALSE(p.is_sensitive("content-type"));
  CHECK_FALSE(p.is_sensitive("tokens-used"));  // exact names are exact
  CHECK_FALSE(p.is_sensitive("x-secret"));     // a prefix needs its whole text
}

TEST_CASE("an empty policy has nothing sensitive, and added names and prefixes become sensitive", "[redaction]") {
  postbox::redaction_policy p;
  CHECK_FALSE(p.is_sensitive("authorization"));
  p.add_name("x-tenant-key").add_prefix("x-vault-");
  CHECK(p.is_sensitive("X-Tenant-Key"));
  CHECK(p.is_sensitive("x-vault-db"));
  CHECK_FALSE(p.is_sensitive("x-tenant"));
  CHECK(p.render("x-vault-db", "s3cr3t") == postbox::redacted_text);
  CHECK(p.render("content-type", "text/plain") == "text/plain");
}

TEST_CASE("redact replaces only the sensitive values of a header map", "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  const postbox::header_map h{{"authorization", "Bearer abc"}, {"content-type", "application/json"}};
  const auto r = p.redact(h);
  CHECK(r.get("authorization") == std::optional<std::string_view>("[redacted]"));
  CHECK(r.get("content-type") == std::optional<std::string_view>("application/json"));
  CHECK(h.get("authorization") == std::optional<std::string_view>("Bearer abc"));  // the original is untouched
}

TEST_CASE("scrub hides a URL's password and keeps the user, host and path", "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  CHECK(p.scrub("connect failed: postgres://svc:hunter2@10.0.0.7/orders") ==
        "connect failed: postgres://svc:[redacted]@10.0.0.7/orders");
  CHECK(p.scrub("nats://s3cr3ttoken@nats.internal:4222 refused") == "nats://[redacted]@nats.internal:4222 refused");
  CHECK(p.scrub("see https://example.com/a?b=c") == "see https://example.com/a?b=c");
}

TEST_CASE("scrub hides the values of sensitive name=value and name: value pairs", "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  CHECK(p.scrub("login failed password=hunter2 user=bob") == "login failed password=[redacted] user=bob");
  CHECK(p.scrub("Authorization: Bearer eyJhbGciOi.x.y rejected") == "Authorization: Bearer [redacted] rejected");
  CHECK(p.scrub("api_key = 'k-123', retry") == "api_key = '[redacted]', retry");
  CHECK(p.scrub("x-secret-pin: 4711;") == "x-secret-pin: [redacted];");
  CHECK(p.scrub("timeout: 5s") == "timeout: 5s");
}

TEST_CASE("scrubbing a scrubbed text changes nothing", "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  const std::string once = p.scrub("token=abc, postgres://u:pw@h/db, Authorization: Bearer xyz");
  CHECK(once == "token=[redacted], postgres://u:[redacted]@h/db, Authorization: Bearer [redacted]");
  CHECK(p.scrub(once) == once);
}

TEST_CASE("scrub with headers hides every occurrence of a sensitive header's value", "[redaction]") {
  const auto p = postbox::redaction_policy::defaults();
  const postbox::header_map h{{"x-secret-pin", "pin-4711"}, {"content-type", "text/plain"}, {"cookie", "abc"}};
  CHECK(p.scrub("bad pin pin-4711 (pin-4711) for text/plain", h) ==
        "bad pin [redacted] ([redacted]) for text/plain");
  // Values shorter than min_scrubbed_value would hide unrelated text: left alone.
  CHECK(p.scrub("abc", h) == "abc");
}

TEST_CASE("set_redaction_policy replaces the process-wide policy and earlier snapshots keep the old one",
          "[redaction]") {
  policy_guard guard;
  const auto before = postbox::current_redaction_policy();
  postbox::redaction_policy p;
  p.add_name("x-only");
  postbox::set_redaction_policy(std::move(p));
  CHECK(postbox::current_redaction_policy()->is_sensitive("x-only"));
  CHECK_FALSE(postbox::current_redaction_policy()->is_sensitive("authorization"));
  CHECK(before->is_sensitive("authorization"));
}

TEST_CASE("a metrics label with a sensitive name is redacted and other label values are scrubbed", "[redaction]") {
  postbox::metrics_registry registry;
  auto reg = registry.add("bridge", "nats://svc:pw-hunter2@nats:4222", [](postbox::metric_writer& w) {
    w.gauge("postbox_test_up", "Up.", 1, {{"token", "tok-777"}, {"server", "nats"}});
  });
  const std::string page = registry.render_prometheus();
  CHECK(page.find("pw-hunter2") == std::string::npos);
  CHECK(page.find("tok-777") == std::string::npos);
  CHECK(page.find("token=\"[redacted]\"") != std::string::npos);
  CHECK(page.find("name=\"nats://svc:[redacted]@nats:4222\"") != std::string::npos);
  CHECK(page.find("server=\"nats\"") != std::string::npos);
}

TEST_CASE("readers racing set_redaction_policy each see one whole policy, never a mix", "[redaction][stress]") {
  policy_guard guard;
  postbox::redaction_policy a;
  a.add_name("x-a");
  postbox::redaction_policy b;
  b.add_name("x-b");
  postbox::set_redaction_policy(a);
  const postbox::header_map h{{"x-a", "value-a"}, {"x-b", "value-b"}};
  const auto only_a = a.redact(h);
  const auto only_b = b.redact(h);

  const std::uint64_t per_reader = postbox_test::scaled(20000);
  constexpr int readers = 3;
  std::atomic<bool> stop{false};  // written by the test thread after the readers joined; read by the swapper (relaxed: a flag)
  std::atomic<std::uint64_t> seen_a{0}, seen_b{0}, mixed{0};  // counts only (relaxed)
  std::thread swapper([&] {
    bool flip = false;
    while (!stop.load(std::memory_order_relaxed)) {
      postbox::set_redaction_policy(flip ? a : b);
      flip = !flip;
    }
  });
  std::vector<std::thread> ts;
  for (int r = 0; r < readers; ++r) {
    ts.emplace_back([&] {
      for (std::uint64_t i = 0; i < per_reader; ++i) {
        const auto out = postbox::current_redaction_policy()->redact(h);
        if (out == only_a) {
          seen_a.fetch_add(1, std::memory_order_relaxed);
        } else if (out == only_b) {
          seen_b.fetch_add(1, std::memory_order_relaxed);
        } else {
          mixed.fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  stop.store(true, std::memory_order_relaxed);
  swapper.join();
  CHECK(mixed.load() == 0);
  CHECK(seen_a.load() + seen_b.load() == per_reader * readers);  // every rendering counted once
}

TEST_CASE("Prometheus text writes NaN, both infinities, integral and fractional values in the exposition format",
          "[metrics]") {
  auto rendered = [](double v) {
    postbox::metric_sample s;
    s.name = "postbox_test_value";
    s.help = "a value";
    s.value = v;
    const std::string text = postbox::render_prometheus({s});
    const auto line = text.rfind("postbox_test_value ");
    REQUIRE(line != std::string::npos);
    return text.substr(line + 19, text.find('\n', line) - line - 19);
  };
  CHECK(rendered(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  CHECK(rendered(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(rendered(-std::numeric_limits<double>::infinity()) == "-Inf");
  CHECK(rendered(std::numeric_limits<double>::max()) == "1.79769313e+308");
  CHECK(rendered(0.0) == "0");
  CHECK(rendered(-42.0) == "-42");
  CHECK(rendered(8.0e15) == "8000000000000000");
  CHECK(rendered(0.25) == "0.25");
  CHECK(rendered(-1.5) == "-1.5");
  CHECK(rendered(1.0e16) == "1e+16");
}
