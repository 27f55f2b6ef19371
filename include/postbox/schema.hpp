// SPDX-License-Identifier: MIT
// Schema registry: (type, version) decoders and upcasters, so old messages replay as the newest type.
// Design notes: docs/design/envelope.md ("Schema evolution")
#pragma once

#include <postbox/json.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>

POSTBOX_BEGIN_NAMESPACE
namespace json {

/// Knows, per message type name, which schema versions have a decoder and
/// how to upcast a payload from one version to the next. Decoding through it
/// upcasts an old payload step by step (v1 -> v2 -> ... -> newest) and then
/// converts it to the newest type; a type it does not know fails with
/// `unknown_type` and keeps the raw envelope for the dead-letter queue.
///
/// **Example**:
///   registry.add<order_v1>().add<order_v2>()
///           .add_upcaster<order_v1, order_v2>([](order_v1 o) { return order_v2{o.id, "EUR"}; });
///   auto r = registry.decode<order_v2>(text);   // v1 and v2 messages both work
///
/// Registration allocates and is not thread-safe; once built, the const
/// members (`decode`, `upcast`, ...) are thread-safe and may run concurrently.
class schema_registry {
 public:
  /// Turns a payload of one version into the next version's JSON. May throw;
  /// the registry reports that as `bad_type` on field "payload".
  using upcaster = std::function<nlohmann::json(nlohmann::json)>;

  /// Registers `T` (its `message_traits` type name and version) as the
  /// decoder for that (type, version). The newest registered version of a
  /// type is what `decode` yields. Returns *this for chaining.
  template <class T>
  schema_registry& add() {
    static_assert(!message_traits<T>::type_name().empty(),
                  "add<T>() needs T::message_type (or a message_traits specialization) naming the type");
    return add_version(std::string(message_traits<T>::type_name()), message_traits<T>::schema_version());
  }

  /// Registers a decoder for `(type, version)` by name, for payloads kept as
  /// JSON or decoded with `check_type` off.
  schema_registry& add_version(std::string type, std::uint32_t version) {
    auto& known = types_[std::move(type)];
    known.versions.insert(version);
    if (version > known.latest) known.latest = version;
    return *this;
  }

  /// Registers an upcaster from `from_version` to `to_version` (> from) of
  /// `type`, on JSON payloads. Replaces an earlier one for the same start.
  schema_registry& add_upcaster(std::string type, std::uint32_t from_version, std::uint32_t to_version, upcaster fn) {
    if (to_version <= from_version) {
      POSTBOX_THROW(postbox::error(errc::invalid_argument, "schema_registry: an upcaster must raise the version"));
    }
    types_[std::move(type)].upcasters.insert_or_assign(from_version, step{to_version, std::move(fn)});
    return *this;
  }

  /// Registers a typed upcaster `fn: From -> To` (both with traits naming the
  /// same type): the payload is read as `From` (nlohmann `from_json`),
  /// converted, and written back as `To` (`to_json`).
  template <class From, class To, class F>
  schema_registry& add_upcaster(F fn) {
    static_assert(message_traits<From>::type_name() == message_traits<To>::type_name(),
                  "an upcaster converts between versions of one message type");
    static_assert(message_traits<From>::schema_version() < message_traits<To>::schema_version(),
                  "an upcaster must raise the schema version");
    return add_upcaster(std::string(message_traits<From>::type_name()), message_traits<From>::schema_version(),
                        message_traits<To>::schema_version(),
                        [f = std::move(fn)](nlohmann::json payload) -> nlohmann::json {
                          return nlohmann::json(To(f(payload.template get<From>())));
                        });
  }

  /// True when a decoder is registered for some version of `type`.
  [[nodiscard]] bool knows(std::string_view type) const { return types_.find(type) != types_.end(); }

  /// The newest registered version of `type`, if any.
  [[nodiscard]] std::optional<std::uint32_t> latest_version(std::string_view type) const {
    const auto it = types_.find(type);
    if (it == types_.end()) return std::nullopt;
    return it->second.latest;
  }

  /// Upcasts `raw`'s payload to the newest registered version of its type
  /// and sets `schema_version` accordingly. Errors (the raw envelope, as it
  /// came in, travels with each): `unknown_type` (type not registered),
  /// `unsupported_version` (newer than every decoder, or a missing upcaster
  /// step), `bad_type` on "payload" (an upcaster threw). Never throws.
  [[nodiscard]] decode_result<nlohmann::json> upcast(raw_envelope raw) const noexcept {
    POSTBOX_TRY {
      const auto it = types_.find(std::string_view(raw.type));
      if (it == types_.end()) {
        auto msg = "no decoder registered for type '" + raw.type + "'";
        return fail(errc::unknown_type, "type", std::move(msg), std::move(raw));
      }
      const entry& e = it->second;
      if (raw.schema_version > e.latest) {
        auto msg = "version " + std::to_string(raw.schema_version) + " is newer than the newest decoder (" +
                   std::to_string(e.latest) + ")";
        return fail(errc::unsupported_version, "schema_version", std::move(msg), std::move(raw));
      }
      if (raw.schema_version == e.latest) return decode_result<nlohmann::json>(std::move(raw));
      auto original = std::make_shared<const raw_envelope>(raw);
      std::uint32_t version = raw.schema_version;
      while (version < e.latest) {
        const auto up = e.upcasters.find(version);
        if (up == e.upcasters.end() || up->second.to > e.latest) {
          auto msg = "no upcaster from version " + std::to_string(version) + " of '" + raw.type + "'";
          return decode_result<nlohmann::json>(
              decode_error{errc::unsupported_version, "schema_version", std::move(msg)}, std::move(original));
        }
        std::string why;
#if POSTBOX_HAS_EXCEPTIONS
        try {
          raw.payload = up->second.fn(std::move(raw.payload));
        } catch (const std::exception& ex) {
          why = ex.what();
        } catch (...) {
          why = "upcaster threw";
        }
#else
        raw.payload = up->second.fn(std::move(raw.payload));
#endif
        if (!why.empty()) {
          auto msg = "upcasting from version " + std::to_string(version) + " failed: " + why;
          return decode_result<nlohmann::json>(decode_error{errc::bad_type, "payload", std::move(msg)},
                                               std::move(original));
        }
        version = up->second.to;
      }
      raw.schema_version = version;
      return decode_result<nlohmann::json>(std::move(raw));
    }
    POSTBOX_CATCH_ALL {
      return decode_result<nlohmann::json>(decode_error{errc::too_large, "", "out of memory while upcasting"});
    }
  }

  /// Decodes text, then upcasts (see `upcast`), keeping the payload as JSON.
  /// Never throws.
  [[nodiscard]] decode_result<nlohmann::json> decode_raw(std::string_view text,
                                                         const decode_options& options = {}) const noexcept {
    auto raw = json::decode_raw(text, options);
    if (!raw.has_value()) return raw;
    return upcast(std::move(*raw));
  }

  /// Decodes text into the newest type `T` of its message type: parse,
  /// upcast, then `from_json`. `T` must be the newest registered version
  /// (else `unsupported_version`). On every failure after the envelope
  /// parsed, `raw()` holds it as received. Never throws.
  template <class T>
  [[nodiscard]] decode_result<T> decode(std::string_view text, const decode_options& options = {}) const noexcept {
    auto raw = json::decode_raw(text, options);
    if (!raw.has_value()) return decode_result<T>(raw.error());
    auto up = upcast(*raw);
    if (!up.has_value()) return decode_result<T>(up.error(), up.shared_raw());
    decode_options strict = options;
    strict.check_type = true;
    auto typed = json::detail::finish<T>(std::move(*up), strict);
    if (typed.has_value()) return typed;
    // Report failures against the envelope as received, not the upcast one.
    POSTBOX_TRY { return decode_result<T>(typed.error(), std::make_shared<const raw_envelope>(std::move(*raw))); }
    POSTBOX_CATCH_ALL { return typed; }
  }

 private:
  struct step {
    std::uint32_t to;
    upcaster fn;
  };
  struct entry {
    std::set<std::uint32_t> versions;
    std::uint32_t latest = 0;
    std::map<std::uint32_t, step> upcasters;  // keyed by the version it starts from
  };

  static decode_result<nlohmann::json> fail(errc code, const char* field, std::string message, raw_envelope&& raw) {
    return decode_result<nlohmann::json>(decode_error{code, field, std::move(message)},
                                         std::make_shared<const raw_envelope>(std::move(raw)));
  }

  std::map<std::string, entry, std::less<>> types_;
};

}  // namespace json
POSTBOX_END_NAMESPACE
