// SPDX-License-Identifier: MIT
// Leak test: secrets planted in handler exceptions, sensitive headers and payloads never reach formatters, metrics, dead-letter listings or observer events.
#include <postbox/consumer.hpp>
#include <postbox/dead_letter.hpp>
#include <postbox/format.hpp>
#include <postbox/inbox.hpp>
#include <postbox/metrics.hpp>
#include <postbox/observer.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;

namespace {

// Every planted secret; none may appear in any rendering.
const std::vector<std::string> secrets = {
    "hunter2",              // a database password inside a URL in an exception text
    "tok-SECRET-42",        // a token=... pair in an exception text
    "sk-live-SECRET-9f3a",  // the authorization header's credential
    "PIN-SECRET-7731",      // an x-secret-* header, also echoed by the handler's exception text
    "PAYLOAD-SECRET-BODY",  // the message body
};

using env_t = postbox::envelope<std::string>;

env_t planted(const postbox::clock& clk, int n) {
  auto e = postbox::make_envelope(std::string("payment.charge"), std::string("PAYLOAD-SECRET-BODY"),
                                  postbox::message_kind::command, clk);
  e.tenant = "acme";
  e.partition_key = "customer-" + std::to_string(n);
  e.headers.set("authorization", "Bearer sk-live-SECRET-9f3a");
  e.headers.set("x-secret-pin", "PIN-SECRET-7731");
  e.headers.set("content-type", "application/json");
  return e;
}

// The handler's failure, as a careless driver would word it.
[[noreturn]] void fail_like_a_driver(const env_t& e) {
  throw std::runtime_error("connect failed: postgres://svc:hunter2@10.0.0.7/orders token=tok-SECRET-42 pin " +
                           std::string(*e.headers.get("x-secret-pin")));
}

struct permanent_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Everything rendered, in one text, so a check names which part leaked.
struct rendered {
  std::vector<std::pair<std::string, std::string>> parts;  // (what, text)

  void add(std::string what, std::string text) { parts.emplace_back(std::move(what), std::move(text)); }

  void check_no_secret() const {
    for (const auto& [what, text] : parts) {
      for (const auto& s : secrets) {
        INFO(what << ": " << text);
        CHECK(text.find(s) == std::string::npos);
      }
    }
  }
  [[nodiscard]] bool any_contains(std::string_view needle) const {
    for (const auto& [what, text] : parts)
      if (text.find(needle) != std::string::npos) return true;
    return false;
  }
};

void render_dead_letter(rendered& out, const std::string& what, const postbox::dead_letter<std::string>& d) {
  out.add(what + ".reason", d.reason);
  out.add(what + ".error", d.error);
  for (const auto& f : d.history) out.add(what + ".history", f.error);
  if (d.message) {
    out.add(what + ".headers", fmt::format("{}", d.message->headers));
    for (const auto& [k, v] : d.message->headers) out.add(what + ".header " + k, v);
    out.add(what + ".envelope", fmt::format("{:h}", *d.message));
  }
  out.add(what + ".describe", postbox::dead_letter_queue<std::string>::describe(d));
}

}  // namespace

TEST_CASE("no planted secret appears in formatters, metrics, dead-letter listings or observer events, and the rest does",
          "[security]") {
  postbox::manual_clock clock;
  postbox::channel<env_t> ch{16};
  postbox::dead_letter_queue<std::string> dlq({}, clock);
  postbox::metrics_registry registry;
  rendered out;

  std::mutex mu;
  postbox::observer obs;
  auto record = [&](const char* hook) {
    return [&, hook](const postbox::message_event& e) {
      std::lock_guard lock(mu);
      out.add(std::string(hook) + ".describe", postbox::describe(e));
      out.add(std::string(hook) + ".reason", std::string(e.reason));
      out.add(std::string(hook) + ".fields", std::string(e.type) + " " + std::string(e.partition_key) + " " +
                                                 std::string(e.tenant) + " " + std::string(e.source) + " " +
                                                 std::string(e.traceparent));
    };
  };
  obs.on_publish = record("publish");
  obs.on_receive = record("receive");
  obs.on_settle = record("settle");

  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &clock;
  o.observer = &obs;
  o.jitter_seed = 1;
  o.retry.max_attempts = 2;
  o.retry.initial_backoff = 10ms;
  o.classify = [](std::exception_ptr ep) {
    try {
      std::rethrow_exception(ep);
    } catch (const permanent_failure&) {
      return postbox::error_class::permanent;
    } catch (...) {
      return postbox::error_class::transient;
    }
  };
  postbox::consumer c(postbox::channel_source<std::string>(ch, "payments"), [](const env_t& e) {
    if (e.partition_key == "customer-2") throw permanent_failure("card vault said: password=hunter2 for " + e.partition_key);
    if (e.partition_key == "customer-3") return postbox::settlement::reject("declined: token=tok-SECRET-42");
    fail_like_a_driver(e);
  }, dlq, o);
  auto r1 = postbox::register_consumer(registry, c);
  auto r2 = postbox::register_dead_letter_queue(registry, dlq);
  auto r3 = postbox::register_channel(registry, "payments", ch);

  for (int n = 1; n <= 3; ++n) {
    auto e = planted(clock, n);
    out.add("format.envelope", fmt::format("{}", e));
    out.add("format.envelope:h", fmt::format("{:h}", e));
    out.add("format.headers", fmt::format("{}", e.headers));
    out.add("format.ids", fmt::format("{} {} {}", e.id, e.kind, e.correlation_id));
    REQUIRE(postbox::observed_send(ch, std::move(e), &obs, "payments") == postbox::send_status::ok);
  }
  (void)c.poll();
  clock.advance(1s);
  (void)c.poll();
  REQUIRE(dlq.size() == 3);

  for (const auto& d : dlq.list()) render_dead_letter(out, "list", d);
  for (const auto& d : dlq.view("acme").list()) render_dead_letter(out, "view", d);
  if (auto d = dlq.get(dlq.list().front().id)) render_dead_letter(out, "get", *d);
  out.add("export", dlq.export_text());
  out.add("view.export", dlq.view("acme").export_text());
  out.add("metrics", registry.render_prometheus());
  for (const auto& s : registry.collect()) {
    for (const auto& [k, v] : s.labels) out.add("metrics.label " + k, v);
    out.add("metrics.help", s.help);
  }

  out.check_no_secret();

  // The test can fail: the non-secret parts of the same texts are there.
  CHECK(out.any_contains("connect failed: postgres://svc:[redacted]@10.0.0.7/orders token=[redacted] pin [redacted]"));
  CHECK(out.any_contains("password=[redacted] for customer-2"));
  CHECK(out.any_contains("declined: token=[redacted]"));
  CHECK(out.any_contains("authorization=[redacted]"));
  CHECK(out.any_contains("x-secret-pin=[redacted]"));
  CHECK(out.any_contains("content-type=application/json"));
  CHECK(out.any_contains("tenant=acme"));
  CHECK(out.any_contains("retries_exhausted"));
  CHECK(out.any_contains("permanent_error"));
  CHECK(out.any_contains("postbox_dead_letter_depth{component=\"dead_letter_queue\",name=\"dead_letters\"} 3"));
}

TEST_CASE("the dead-letter queue stores scrubbed error texts but redrives the envelope with its headers whole",
          "[security]") {
  postbox::manual_clock clock;
  postbox::dead_letter_queue<std::string> dlq({.redrive_rate = 100}, clock);
  std::vector<env_t> redriven;
  dlq.set_origin("payments", [&](env_t e) {
    redriven.push_back(std::move(e));
    return postbox::errc::ok;
  });
  postbox::dead_letter<std::string> d;
  d.message.emplace(planted(clock, 1));
  d.reason = "retries_exhausted";
  d.error = "pin PIN-SECRET-7731 refused";
  d.history.push_back({1, clock.now(), "pin PIN-SECRET-7731 refused"});
  d.source = "payments";
  REQUIRE(dlq.add(std::move(d)) == postbox::errc::ok);
  REQUIRE(dlq.redrive() == 1);
  REQUIRE(redriven.size() == 1);
  // The handler gets its credentials back on the redelivery ...
  CHECK(redriven[0].headers.get("authorization") == std::optional<std::string_view>("Bearer sk-live-SECRET-9f3a"));
  CHECK(redriven[0].payload == "PAYLOAD-SECRET-BODY");
  // ... but the error history it carries was scrubbed when it was stored.
  CHECK(redriven[0].headers.get(postbox::header_names::dead_letter_error) ==
        std::optional<std::string_view>("pin [redacted] refused"));
}

TEST_CASE("a dead-letter queue with its own redaction policy uses it instead of the process-wide one", "[security]") {
  postbox::manual_clock clock;
  postbox::redaction_policy mine;
  mine.add_name("x-card");
  postbox::dead_letter_queue<std::string> dlq({.redaction = std::make_shared<const postbox::redaction_policy>(mine)},
                                             clock);
  postbox::dead_letter<std::string> d;
  auto e = postbox::make_envelope(std::string("p"), clock);
  e.headers.set("x-card", "4111-1111");
  e.headers.set("authorization", "visible-here");
  d.message.emplace(std::move(e));
  d.error = "card 4111-1111 declined";
  REQUIRE(dlq.add(std::move(d)) == postbox::errc::ok);
  const auto listed = dlq.list().at(0);
  CHECK(listed.error == "card [redacted] declined");
  CHECK(listed.message->headers.get("x-card") == std::optional<std::string_view>("[redacted]"));
  CHECK(listed.message->headers.get("authorization") == std::optional<std::string_view>("visible-here"));
}

TEST_CASE("an inbox's failure text and metrics carry no payload", "[security]") {
  postbox::memory_store s;
  postbox::manual_clock clock;
  postbox::inbox in(s, "billing", {}, clock);
  postbox::metrics_registry registry;
  auto reg = postbox::register_inbox(registry, "billing", in);
  auto e = planted(clock, 1);
  const auto outcome = in.handle(e, [](auto&) { return false; });
  CHECK(outcome.failed());
  CHECK(outcome.message.find("PAYLOAD-SECRET-BODY") == std::string::npos);
  const std::string page = registry.render_prometheus();
  CHECK(page.find("PAYLOAD-SECRET-BODY") == std::string::npos);
  CHECK(page.find("postbox_inbox_failed_total{component=\"inbox\",name=\"billing\"} 1") != std::string::npos);
}
