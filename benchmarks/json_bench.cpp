// SPDX-License-Identifier: MIT
// Benchmark: postbox::json encode/decode of an envelope vs the same struct through hand-written nlohmann/json.
//
// Scenarios (each reports the median ns per message over interleaved repetitions):
//   encode/raw      hand-written nlohmann to_json of envelope<order> + dump(): the same JSON text,
//                   no checks (what a user would write without postbox)
//   encode/postbox  postbox::json::encode (adds UTF-8 replacement on dump)
//   decode/raw      nlohmann::json::parse + at()/get() of every field (throws on bad input)
//   decode/postbox  postbox::json::decode<order> (size/depth/UTF-8 pre-scan, typed errors, validation)
// The ratio postbox/raw is the codec's overhead; the target is <= 1.2x.
#include <postbox/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

struct order {
  static constexpr std::string_view message_type = "order.placed";
  std::string order_id;
  std::int64_t cents = 0;
  std::vector<std::string> items;
};
void to_json(nlohmann::json& j, const order& o) {
  j = nlohmann::json{{"order_id", o.order_id}, {"cents", o.cents}, {"items", o.items}};
}
void from_json(const nlohmann::json& j, order& o) {
  j.at("order_id").get_to(o.order_id);
  j.at("cents").get_to(o.cents);
  j.at("items").get_to(o.items);
}

using env_t = postbox::envelope<order>;
namespace pd = postbox::json::detail;

// The baseline: the same struct and the same JSON text, written the way a
// user would with nlohmann alone (operator[], at(), get<>()), no limits.
std::string raw_encode(const env_t& e) {
  nlohmann::json j;
  j["id"] = e.id.to_string();
  j["type"] = e.type;
  j["schema_version"] = e.schema_version;
  j["kind"] = std::string(postbox::to_string(e.kind));
  j["occurred_at"] = pd::format_time(e.occurred_at);
  j["correlation_id"] = e.correlation_id.to_string();
  if (!e.causation_id.is_nil()) j["causation_id"] = e.causation_id.to_string();
  j["producer"] = e.producer;
  j["partition_key"] = e.partition_key;
  j["tenant"] = e.tenant;
  j["traceparent"] = e.trace.traceparent;
  j["tracestate"] = e.trace.tracestate;
  if (e.deadline) j["deadline"] = pd::format_time(*e.deadline);
  j["attempt"] = e.attempt;
  for (const auto& [k, v] : e.headers) j["headers"][k] = v;
  j["payload"] = e.payload;
  return j.dump();
}

env_t raw_decode(const std::string& text) {
  const auto j = nlohmann::json::parse(text);
  env_t e;
  e.id = *postbox::message_id::parse(j.at("id").get<std::string>());
  e.type = j.at("type").get<std::string>();
  e.schema_version = j.at("schema_version").get<std::uint32_t>();
  e.kind = *postbox::parse_message_kind(j.at("kind").get<std::string>());
  e.occurred_at = *pd::parse_time(j.at("occurred_at").get<std::string>());
  e.correlation_id = *postbox::message_id::parse(j.at("correlation_id").get<std::string>());
  if (j.contains("causation_id")) e.causation_id = *postbox::message_id::parse(j.at("causation_id").get<std::string>());
  e.producer = j.at("producer").get<std::string>();
  e.partition_key = j.at("partition_key").get<std::string>();
  e.tenant = j.at("tenant").get<std::string>();
  e.trace.traceparent = j.at("traceparent").get<std::string>();
  e.trace.tracestate = j.at("tracestate").get<std::string>();
  if (j.contains("deadline")) e.deadline = pd::parse_time(j.at("deadline").get<std::string>());
  e.attempt = j.at("attempt").get<std::uint32_t>();
  for (const auto& [k, v] : j.at("headers").items()) e.headers.set(k, v.get<std::string>());
  e.payload = j.at("payload").get<order>();
  return e;
}

template <class F>
double ns_per_op(int n, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) f(i);
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / n;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  std::vector<env_t> messages;
  for (int i = 0; i < 64; ++i) {
    auto e = postbox::make_envelope(order{"order-" + std::to_string(i), 1999 + i, {"book", "pen", "lamp"}});
    e.producer = "shop-frontend";
    e.partition_key = e.payload.order_id;
    e.tenant = "acme";
    e.trace = postbox::trace_context::generate();
    e.trace.tracestate = "congo=t61rcWkgMzE";
    e.deadline = e.occurred_at + std::chrono::seconds(30);
    e.attempt = 1;
    e.headers.set("content-type", "application/json");
    e.headers.set("reply-to", "orders.replies");
    messages.push_back(std::move(e));
  }
  std::vector<std::string> texts;
  for (const auto& m : messages) texts.push_back(postbox::json::encode(m));
  // Both codecs must agree on the text, or the comparison is meaningless.
  for (std::size_t i = 0; i < messages.size(); ++i) {
    if (raw_encode(messages[i]) != texts[i]) {
      std::fprintf(stderr, "baseline and postbox disagree on the JSON text\n");
      return 1;
    }
  }

  constexpr int ops = 4000;
  constexpr int reps = 15;
  std::vector<double> enc_raw, enc_pb, dec_raw, dec_pb;
  std::size_t sink = 0;
  for (int r = 0; r < reps; ++r) {
    enc_raw.push_back(ns_per_op(ops, [&](int i) { sink += raw_encode(messages[i % 64]).size(); }));
    enc_pb.push_back(ns_per_op(ops, [&](int i) { sink += postbox::json::encode(messages[i % 64]).size(); }));
    dec_raw.push_back(ns_per_op(ops, [&](int i) { sink += raw_decode(texts[i % 64]).attempt; }));
    dec_pb.push_back(ns_per_op(ops, [&](int i) { sink += postbox::json::decode<order>(texts[i % 64])->attempt; }));
  }

  std::printf("json_bench: envelope<order> (%zu bytes of JSON), %d ops x %d interleaved reps, medians\n",
              texts[0].size(), ops, reps);
#if defined(__clang__)
  std::printf("compiler: clang %s", __clang_version__);
#elif defined(__GNUC__)
  std::printf("compiler: g++ %s", __VERSION__);
#endif
#ifdef NDEBUG
  std::printf(", NDEBUG\n");
#else
  std::printf(", assertions on (time only Release builds)\n");
#endif
  const double er = median(enc_raw), ep = median(enc_pb), dr = median(dec_raw), dp = median(dec_pb);
  std::printf("%-16s %10s %10s\n", "scenario", "ns/msg", "ratio");
  std::printf("%-16s %10.0f %10s\n", "encode/raw", er, "1.00x");
  std::printf("%-16s %10.0f %9.2fx\n", "encode/postbox", ep, ep / er);
  std::printf("%-16s %10.0f %10s\n", "decode/raw", dr, "1.00x");
  std::printf("%-16s %10.0f %9.2fx\n", "decode/postbox", dp, dp / dr);
  std::printf("(checksum %zu)\n", sink);
  return 0;
}
