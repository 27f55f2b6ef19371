// SPDX-License-Identifier: MIT
// fmt formatters for message ids, postbox's status enums, header maps and a one-line envelope summary.
#pragma once

#include <postbox/envelope.hpp>
#include <postbox/error.hpp>
#include <postbox/redaction.hpp>

#include <fmt/format.h>

#include <string_view>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

/// Formats an enum through its `to_string`, honouring string specs
/// (width, fill, alignment) as `std::string_view` does.
template <class Enum>
struct enum_formatter : fmt::formatter<std::string_view> {
  template <class FormatContext>
  auto format(Enum value, FormatContext& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(to_string(value), ctx);
  }
};

}  // namespace detail
POSTBOX_END_NAMESPACE

/// `message_id` as its lower-case canonical form; string specs apply
/// (`{:>40}`). Never allocates beyond fmt's buffer. Thread-safe.
template <>
struct fmt::formatter<postbox::message_id> : fmt::formatter<std::string_view> {
  template <class FormatContext>
  auto format(const postbox::message_id& id, FormatContext& ctx) const -> decltype(ctx.out()) {
    char buf[36];
    id.write_to(buf);
    return fmt::formatter<std::string_view>::format(std::string_view(buf, sizeof buf), ctx);
  }
};

/// `message_kind` by name ("command", "event", "query", "reply").
template <>
struct fmt::formatter<postbox::message_kind> : postbox::detail::enum_formatter<postbox::message_kind> {};
/// `errc` by name ("missing_field", ...).
template <>
struct fmt::formatter<postbox::errc> : postbox::detail::enum_formatter<postbox::errc> {};
/// `send_status` by name ("ok", "full", "closed", "timeout").
template <>
struct fmt::formatter<postbox::send_status> : postbox::detail::enum_formatter<postbox::send_status> {};
/// `receive_status` by name ("ok", "empty", "closed", "timeout").
template <>
struct fmt::formatter<postbox::receive_status> : postbox::detail::enum_formatter<postbox::receive_status> {};

/// A header map as `{name=value, ...}` in key order, the value of every
/// header the process-wide redaction policy calls sensitive shown as
/// `[redacted]` (see redaction.hpp). Only the empty spec `{}` is accepted.
/// Allocates nothing beyond fmt's buffer (takes the policy snapshot's mutex
/// briefly). Thread-safe.
template <>
struct fmt::formatter<postbox::header_map> {
  constexpr auto parse(fmt::format_parse_context& ctx) -> decltype(ctx.begin()) {
    auto it = ctx.begin();
    if (it != ctx.end() && *it != '}') FMT_THROW(fmt::format_error("postbox::header_map takes no format spec"));
    return it;
  }

  template <class FormatContext>
  auto format(const postbox::header_map& headers, FormatContext& ctx) const -> decltype(ctx.out()) {
    const auto policy = postbox::current_redaction_policy();
    auto out = ctx.out();
    *out++ = '{';
    bool first = true;
    for (const auto& [k, v] : headers) {
      out = fmt::format_to(out, "{}{}={}", first ? "" : ", ", k, policy->render(k, v));
      first = false;
    }
    *out++ = '}';
    return out;
  }
};

/// A one-line summary of an envelope's metadata; the payload is never
/// printed (it may be large or sensitive). Specs: `{}`, or `{:h}` to append
/// the headers as ` headers={...}` with sensitive values redacted (as the
/// header_map formatter does). Example output:
///   `event order.placed v2 id=0190... corr=0190... attempt=0`
/// followed, when set, by ` cause=<id>`, ` key=<partition key>`,
/// ` tenant=<tenant>` and ` trace=<trace-id>`. Thread-safe.
template <class T>
struct fmt::formatter<postbox::envelope<T>> {
  bool headers_ = false;  ///< `{:h}`: append the (redacted) headers

  constexpr auto parse(fmt::format_parse_context& ctx) -> decltype(ctx.begin()) {
    auto it = ctx.begin();
    if (it != ctx.end() && *it == 'h') {
      headers_ = true;
      ++it;
    }
    if (it != ctx.end() && *it != '}') FMT_THROW(fmt::format_error("postbox::envelope takes {} or {:h}"));
    return it;
  }

  template <class FormatContext>
  auto format(const postbox::envelope<T>& env, FormatContext& ctx) const -> decltype(ctx.out()) {
    auto out = fmt::format_to(ctx.out(), "{} {} v{} id={} corr={}", env.kind,
                              env.type.empty() ? std::string_view("(untyped)") : std::string_view(env.type),
                              env.schema_version, env.id, env.correlation_id);
    if (!env.causation_id.is_nil()) out = fmt::format_to(out, " cause={}", env.causation_id);
    out = fmt::format_to(out, " attempt={}", env.attempt);
    if (!env.partition_key.empty()) out = fmt::format_to(out, " key={}", env.partition_key);
    if (!env.tenant.empty()) out = fmt::format_to(out, " tenant={}", env.tenant);
    if (const auto trace = env.trace.trace_id(); !trace.empty()) out = fmt::format_to(out, " trace={}", trace);
    if (headers_) out = fmt::format_to(out, " headers={}", env.headers);
    return out;
  }
};
