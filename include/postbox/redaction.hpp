// SPDX-License-Identifier: MIT
// postbox::redaction_policy: which header names are sensitive, and how their values and secrets in texts are hidden.
#pragma once

// Design: docs/design/security.md ("Secret-free telemetry", "Restricted dead-letter access").
//
// * A policy is a set of header names and name prefixes, matched ASCII
//   case-insensitively with '_' and '-' equal ("X_Api_Key" matches
//   "x-api-key"). The value of a sensitive header renders as "[redacted]"
//   in postbox's formatters, metrics labels, dead-letter listings and
//   observer events.
// * `scrub(text)` hides secrets inside free text (exception messages,
//   reasons): the password of a URL's user info (`scheme://user:pw@host`,
//   or the whole user info when it has no password), and the value after a
//   sensitive name followed by '=' or ':' (`token=abc`, `Authorization:
//   Bearer abc`). `scrub(text, headers)` also hides every occurrence of a
//   sensitive header's value (values shorter than `min_scrubbed_value`
//   characters are left alone: they would hide unrelated text).
// * The process-wide policy starts as `redaction_policy::defaults()`. It is
//   an immutable snapshot behind a shared_ptr: `set_redaction_policy` may be
//   called at any time, and a reader sees either the old or the new policy
//   whole. Components that take a policy of their own (dead_letter_options)
//   use it instead.

#include <postbox/config.hpp>
#include <postbox/detail/algorithm.hpp>

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// What a sensitive value is replaced with.
inline constexpr std::string_view redacted_text = "[redacted]";

namespace detail {

[[nodiscard]] constexpr char redaction_fold(char c) noexcept {
  if (c >= 'A' && c <= 'Z') return static_cast<char>(c - 'A' + 'a');
  if (c == '_') return '-';
  return c;
}

/// `a` equals `b` ignoring ASCII case, with '_' == '-'. Never allocates.
[[nodiscard]] constexpr bool redaction_equal(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (redaction_fold(a[i]) != redaction_fold(b[i])) return false;
  return true;
}

[[nodiscard]] constexpr bool redaction_key_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
         c == '.';
}

/// Ends a value in free text: whitespace, quotes, separators.
[[nodiscard]] constexpr bool redaction_value_end(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '"' || c == '\'' || c == ',' || c == ';' ||
         c == '&' || c == ')' || c == ']' || c == '}' || c == '>';
}

/// Ends a URL's authority.
[[nodiscard]] constexpr bool redaction_authority_end(char c) noexcept {
  return c == '/' || c == '?' || c == '#' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '"' ||
         c == '\'' || c == '>';
}

}  // namespace detail

/// Which header names are sensitive, and how secrets are hidden in values
/// and texts. A plain value: build it, then share it (const members are
/// thread-safe; the builders are not). See the file comment for the rules.
///
/// **Example**:
///   auto p = postbox::redaction_policy::defaults();
///   p.add_name("x-tenant-key").add_prefix("x-vault-");
///   postbox::set_redaction_policy(std::move(p));
class redaction_policy {
 public:
  /// Header values shorter than this are not searched for in texts.
  static constexpr std::size_t min_scrubbed_value = 4;

  /// A policy with nothing sensitive (URL passwords are still scrubbed from
  /// texts). Never allocates.
  redaction_policy() = default;

  /// The default policy: names authorization, proxy-authorization, cookie,
  /// set-cookie, x-api-key, api-key, apikey, x-auth-token, token,
  /// access-token, refresh-token, id-token, password, passwd, secret,
  /// client-secret, private-key, credentials; prefixes x-secret- and
  /// secret-. Allocates.
  [[nodiscard]] static redaction_policy defaults() {
    redaction_policy p;
    for (const char* n : {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
                          "apikey", "x-auth-token", "token", "access-token", "refresh-token", "id-token", "password",
                          "passwd", "secret", "client-secret", "private-key", "credentials"})
      p.add_name(n);
    p.add_prefix("x-secret-").add_prefix("secret-");
    return p;
  }

  /// Marks header `name` sensitive (exact match, case-insensitive). Allocates.
  redaction_policy& add_name(std::string name) {
    if (!name.empty()) names_.push_back(std::move(name));
    return *this;
  }
  /// Marks every header whose name starts with `prefix` sensitive. Allocates.
  redaction_policy& add_prefix(std::string prefix) {
    if (!prefix.empty()) prefixes_.push_back(std::move(prefix));
    return *this;
  }
  /// The exact names, as added.
  [[nodiscard]] const std::vector<std::string>& names() const noexcept { return names_; }
  /// The prefixes, as added.
  [[nodiscard]] const std::vector<std::string>& prefixes() const noexcept { return prefixes_; }

  /// Whether a header (or label, or key in a text) called `name` is
  /// sensitive. Never allocates. Thread-safe.
  [[nodiscard]] bool is_sensitive(std::string_view name) const noexcept {
    for (const auto& n : names_)
      if (detail::redaction_equal(name, n)) return true;
    for (const auto& p : prefixes_)
      if (name.size() >= p.size() && detail::redaction_equal(name.substr(0, p.size()), p)) return true;
    return false;
  }

  /// `value`, or "[redacted]" when `name` is sensitive. Never allocates. Thread-safe.
  [[nodiscard]] std::string_view render(std::string_view name, std::string_view value) const noexcept {
    return is_sensitive(name) ? redacted_text : value;
  }

  /// A copy of `headers` (a header_map, or any map with `set(key, value)`
  /// and iteration over (key, value) pairs) with every sensitive value
  /// replaced by "[redacted]". Allocates. Thread-safe.
  template <class Headers>
  [[nodiscard]] Headers redact(const Headers& headers) const {
    Headers out = headers;
    for (const auto& [k, v] : headers)
      if (is_sensitive(k)) out.set(k, redacted_text);
    return out;
  }

  /// `text` with URL passwords and the values of sensitive `name=value` /
  /// `name: value` pairs replaced by "[redacted]". Allocates. Thread-safe.
  [[nodiscard]] std::string scrub(std::string_view text) const {
    std::string out = scrub_urls(text);
    return scrub_pairs(out);
  }

  /// As `scrub(text)`, and every occurrence of the value of a sensitive
  /// header in `headers` (values of at least `min_scrubbed_value`
  /// characters) is replaced too. Allocates. Thread-safe.
  template <class Headers>
  [[nodiscard]] std::string scrub(std::string_view text, const Headers& headers) const {
    std::string out(text);
    for (const auto& [k, v] : headers) {
      if (!is_sensitive(k) || std::string_view(v).size() < min_scrubbed_value) continue;
      replace_all(out, v);
    }
    return scrub(out);
  }

 private:
  static void replace_all(std::string& text, std::string_view secret) {
    std::size_t pos = 0;
    while ((pos = text.find(secret, pos)) != std::string::npos) {
      text.replace(pos, secret.size(), redacted_text);
      pos += redacted_text.size();
    }
  }

  // `scheme://userinfo@host`: the password after the user's ':' (or the
  // whole user info when it has no ':') becomes "[redacted]".
  static std::string scrub_urls(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    std::size_t pos = 0;
    for (;;) {
      const std::size_t sep = text.find("://", pos);
      if (sep == std::string_view::npos) break;
      const std::size_t start = sep + 3;
      std::size_t end = start;
      while (end < text.size() && !detail::redaction_authority_end(text[end])) ++end;
      const std::string_view authority = text.substr(start, end - start);
      const std::size_t at = authority.rfind('@');
      out.append(text.substr(pos, start - pos));
      if (at == std::string_view::npos || at == 0) {
        out.append(authority);
      } else {
        const std::string_view userinfo = authority.substr(0, at);
        const std::size_t colon = userinfo.find(':');
        if (colon == std::string_view::npos) {
          out.append(redacted_text);
        } else {
          out.append(userinfo.substr(0, colon + 1));
          out.append(redacted_text);
        }
        out.append(authority.substr(at));
      }
      pos = end;
    }
    out.append(text.substr(pos));
    return out;
  }

  // `key=value`, `key: value`, `key="value"` with a sensitive key: the value
  // becomes "[redacted]"; after an auth scheme word (Bearer, Basic, ...) the
  // credential that follows it too.
  std::string scrub_pairs(std::string_view text) const {
    std::string out;
    out.reserve(text.size());
    std::size_t i = 0;
    while (i < text.size()) {
      if (!detail::redaction_key_char(text[i]) || (i > 0 && detail::redaction_key_char(text[i - 1]))) {
        out += text[i++];
        continue;
      }
      std::size_t key_end = i;
      while (key_end < text.size() && detail::redaction_key_char(text[key_end])) ++key_end;
      const std::string_view key = text.substr(i, key_end - i);
      std::size_t j = key_end;
      while (j < text.size() && text[j] == ' ') ++j;
      const bool assigns = j < text.size() && (text[j] == '=' || (text[j] == ':' && text.substr(j, 3) != "://"));
      if (!assigns || !is_sensitive(key)) {
        out.append(key);
        i = key_end;
        continue;
      }
      ++j;  // past '=' or ':'
      while (j < text.size() && text[j] == ' ') ++j;
      out.append(text.substr(i, j - i));
      if (text.substr(j, redacted_text.size()) == redacted_text) {  // scrubbed before: keep it as it is
        out.append(redacted_text);
        i = j + redacted_text.size();
        continue;
      }
      char quote = 0;
      if (j < text.size() && (text[j] == '"' || text[j] == '\'')) {
        quote = text[j];
        out += quote;
        ++j;
      }
      std::size_t v_end = j;
      if (quote != 0) {
        while (v_end < text.size() && text[v_end] != quote) ++v_end;
      } else {
        while (v_end < text.size() && !detail::redaction_value_end(text[v_end])) ++v_end;
        // An auth scheme word: the credential follows it after a space.
        if (is_auth_scheme(text.substr(j, v_end - j)) && v_end < text.size() && text[v_end] == ' ') {
          out.append(text.substr(j, v_end - j + 1));
          j = v_end + 1;
          v_end = j;
          if (text.substr(j, redacted_text.size()) == redacted_text) {
            v_end = j + redacted_text.size();
          } else {
            while (v_end < text.size() && !detail::redaction_value_end(text[v_end])) ++v_end;
          }
        }
      }
      if (v_end > j) out.append(redacted_text);
      i = v_end;
    }
    return out;
  }

  static bool is_auth_scheme(std::string_view word) noexcept {
    for (const char* s : {"bearer", "basic", "digest", "token", "negotiate", "apikey"})
      if (detail::redaction_equal(word, s)) return true;
    return false;
  }

  std::vector<std::string> names_;
  std::vector<std::string> prefixes_;
};

namespace detail {
struct redaction_global {
  std::mutex mu;
  std::shared_ptr<const redaction_policy> policy = std::make_shared<const redaction_policy>(redaction_policy::defaults());
};
inline redaction_global& redaction_state() {
  static redaction_global g;
  return g;
}
}  // namespace detail

/// The process-wide policy (a snapshot: later `set_redaction_policy` calls
/// do not change it). Takes a mutex briefly; never null. Thread-safe.
[[nodiscard]] inline std::shared_ptr<const redaction_policy> current_redaction_policy() {
  auto& g = detail::redaction_state();
  std::lock_guard lock(g.mu);
  return g.policy;
}

/// Replaces the process-wide policy; later renderings use it, renderings in
/// progress finish with the old one. Allocates. Thread-safe.
inline void set_redaction_policy(redaction_policy policy) {
  auto next = std::make_shared<const redaction_policy>(std::move(policy));
  auto& g = detail::redaction_state();
  std::lock_guard lock(g.mu);
  g.policy.swap(next);
}

POSTBOX_END_NAMESPACE
