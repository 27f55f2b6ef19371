// SPDX-License-Identifier: MIT
// Specification tests for format.hpp: fmt output of ids, status enums and envelope summaries.
#include <postbox/format.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <string>

TEST_CASE("a message_id formats as its canonical text and honours width", "[format]") {
  const postbox::message_id id(0x0190f2a41b2c7d3eULL, 0x8f400123456789abULL);
  CHECK(fmt::format("{}", id) == "0190f2a4-1b2c-7d3e-8f40-0123456789ab");
  CHECK(fmt::format("[{:>38}]", id) == "[  0190f2a4-1b2c-7d3e-8f40-0123456789ab]");
  CHECK(fmt::format("{}", postbox::message_id()) == "00000000-0000-0000-0000-000000000000");
}

TEST_CASE("status enums format by name", "[format]") {
  CHECK(fmt::format("{}", postbox::errc::missing_field) == "missing_field");
  CHECK(fmt::format("{}", postbox::errc::unsupported_version) == "unsupported_version");
  CHECK(fmt::format("{}", postbox::send_status::full) == "full");
  CHECK(fmt::format("{}", postbox::receive_status::closed) == "closed");
  CHECK(fmt::format("{}", postbox::message_kind::query) == "query");
  CHECK(fmt::format("{:<8}|", postbox::send_status::ok) == "ok      |");
}

TEST_CASE("an envelope formats as a one-line summary without its payload", "[format]") {
  postbox::manual_clock clk;
  auto env = postbox::make_envelope("order.placed", std::string("SECRET"), postbox::message_kind::command, clk);
  const std::string id = env.id.to_string();
  CHECK(fmt::format("{}", env) == "command order.placed v1 id=" + id + " corr=" + id + " attempt=0");

  env.attempt = 2;
  env.partition_key = "o-1";
  env.tenant = "acme";
  env.trace = *postbox::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  const auto child = postbox::caused_by(env, "order.audited", 1, postbox::message_kind::event, clk);
  const std::string text = fmt::format("{}", child);
  CHECK(text == "event order.audited v1 id=" + child.id.to_string() + " corr=" + id + " cause=" + id +
                    " attempt=0 key=o-1 tenant=acme trace=4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(fmt::format("{}", env).find("SECRET") == std::string::npos);
}

TEST_CASE("an envelope rejects a format spec", "[format]") {
  const auto env = postbox::make_envelope(1);
  CHECK_THROWS_AS(fmt::format(fmt::runtime("{:x}"), env), fmt::format_error);
  CHECK(fmt::format("{}", env).rfind("event (untyped) v1", 0) == 0);
}

TEST_CASE("a header map formats in key order with sensitive values redacted", "[format]") {
  const postbox::header_map h{{"content-type", "text/plain"}, {"Authorization", "Bearer abc"}, {"x-secret-pin", "42"}};
  CHECK(fmt::format("{}", h) == "{Authorization=[redacted], content-type=text/plain, x-secret-pin=[redacted]}");
  CHECK(fmt::format("{}", postbox::header_map{}) == "{}");
}

TEST_CASE("an envelope formatted with {:h} appends its redacted headers, and {} leaves them out", "[format]") {
  postbox::manual_clock clock;
  auto e = postbox::make_envelope(std::string("order.placed"), 7, postbox::message_kind::event, clock);
  e.headers.set("cookie", "session=s3cr3t");
  e.headers.set("reply-to", "orders.replies");
  const std::string with = fmt::format("{:h}", e);
  CHECK(with.size() > fmt::format("{}", e).size());
  CHECK(with.find(" headers={cookie=[redacted], reply-to=orders.replies}") != std::string::npos);
  CHECK(fmt::format("{}", e).find("headers") == std::string::npos);
  CHECK(with.find("s3cr3t") == std::string::npos);
}
