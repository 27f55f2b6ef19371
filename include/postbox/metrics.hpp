// SPDX-License-Identifier: MIT
// Metrics: lock-free counters and duration histograms, a registry of components and Prometheus text exposition.
#pragma once

// Samples carry numbers and labels only: no message payload or header can
// reach a metrics page except through a label a collector chose, and every
// label is redacted on the way in (metric_writer).

#include <postbox/clock.hpp>
#include <postbox/error.hpp>
#include <postbox/redaction.hpp>
#include <postbox/detail/algorithm.hpp>
#include <postbox/detail/dependent.hpp>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

POSTBOX_BEGIN_NAMESPACE

/// Prometheus metric families postbox emits.
enum class metric_type { counter, gauge, histogram };

/// Stable lower-case name, as the `# TYPE` line spells it. Never allocates.
[[nodiscard]] constexpr std::string_view to_string(metric_type t) noexcept {
  switch (t) {
    case metric_type::counter: return "counter";
    case metric_type::gauge: return "gauge";
    case metric_type::histogram: return "histogram";
  }
  return "untyped";
}

/// A copy of a histogram at one moment: bucket upper bounds (seconds, the
/// last is +Inf implicitly), cumulative counts per bound, total count and sum.
/// A plain value.
struct histogram_snapshot {
  std::vector<double> bounds;               ///< finite upper bounds, ascending
  std::vector<std::uint64_t> cumulative;    ///< observations <= bounds[i]
  std::uint64_t count = 0;                  ///< all observations (the +Inf bucket)
  double sum = 0;                           ///< sum of observed values, seconds

  /// The smallest bound at or below which `q` (0..1) of the observations
  /// fall; +Inf when they fall beyond the last bound; 0 with no data.
  [[nodiscard]] double quantile_bound(double q) const noexcept {
    if (count == 0) return 0;
    const double want = q * static_cast<double>(count);
    for (std::size_t i = 0; i < bounds.size(); ++i) {
      if (static_cast<double>(cumulative[i]) >= want) return bounds[i];
    }
    return std::numeric_limits<double>::infinity();
  }
};

/// A histogram of durations with fixed buckets, for processing times and
/// ages. `observe` is wait-free: two relaxed fetch_adds, no allocation, no
/// lock. Readers get a snapshot that may be torn across buckets by
/// concurrent observations (each bucket is exact; the set is not one
/// instant), which is what Prometheus client libraries accept too.
class duration_histogram {
 public:
  /// Bucket bounds in seconds: 50 us to 60 s, roughly x2.5 apart.
  static constexpr std::array<double, 14> default_bounds = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                            0.01,    0.025,  0.05,    0.1,    0.5,    5.0,    60.0};

  duration_histogram() noexcept = default;
  duration_histogram(const duration_histogram&) = delete;
  duration_histogram& operator=(const duration_histogram&) = delete;

  /// Records one duration (negative counts as zero). Wait-free; never
  /// allocates; thread-safe.
  void observe(duration d) noexcept {
    const std::int64_t ns = d.count() < 0 ? 0 : d.count();
    std::size_t i = 0;
    while (i < default_bounds.size() && static_cast<double>(ns) > default_bounds[i] * 1e9) ++i;
    // relaxed: independent statistics; no other data is published through them.
    buckets_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<std::uint64_t>(ns), std::memory_order_relaxed);
  }

  /// Copies the buckets. Allocates the vectors; thread-safe.
  [[nodiscard]] histogram_snapshot snapshot() const {
    histogram_snapshot s;
    s.bounds.assign(default_bounds.begin(), default_bounds.end());
    s.cumulative.reserve(default_bounds.size());
    std::uint64_t running = 0;
    for (std::size_t i = 0; i < default_bounds.size(); ++i) {
      running += buckets_[i].load(std::memory_order_relaxed);  // relaxed: statistic
      s.cumulative.push_back(running);
    }
    s.count = running + buckets_[default_bounds.size()].load(std::memory_order_relaxed);
    s.sum = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9;
    return s;
  }

 private:
  /// Per-bucket counts, the last one for values beyond every bound. Written
  /// by observe() (relaxed fetch_add), read by snapshot() (relaxed); plain
  /// counters, nothing is published through them.
  std::array<std::atomic<std::uint64_t>, default_bounds.size() + 1> buckets_{};
  /// Sum of observations in nanoseconds; relaxed like the buckets.
  std::atomic<std::uint64_t> sum_ns_{0};
};

/// One label pair of a sample, e.g. {"name", "orders"}.
using metric_label = std::pair<std::string, std::string>;

/// One sample: a counter or gauge value, or a histogram, under a metric
/// family name with labels. A plain value.
struct metric_sample {
  std::string name;                          ///< family, e.g. "postbox_channel_depth"
  std::string help;                          ///< one line for `# HELP`
  metric_type type = metric_type::gauge;
  std::vector<metric_label> labels;          ///< includes the component's own labels
  double value = 0;                          ///< counter or gauge value
  std::optional<histogram_snapshot> histogram;  ///< set for histograms
};

/// What a component's collector writes its samples to; it adds the
/// component's labels to every sample. Every label passes the process-wide
/// redaction policy (redaction.hpp): a label whose name is sensitive gets
/// the value "[redacted]", and other values are scrubbed of secrets (URL
/// passwords, `token=...` pairs). Allocates; used during collection only.
/// (`metric_writer` is the one instance of this template, which exists so
/// that its bodies compile where a collector runs: issue 17.)
template <class Dummy = void>
class basic_metric_writer {
 public:
  explicit basic_metric_writer(std::vector<metric_label> base)
      : base_(std::move(base)), policy_(current_redaction_policy()) {
    for (auto& l : base_) redact(l);
  }

  /// A monotonically increasing count.
  void counter(std::string_view name, std::string_view help, double value, std::vector<metric_label> extra = {}) {
    add(name, help, metric_type::counter, value, std::move(extra), std::nullopt);
  }
  /// A value that goes up and down.
  void gauge(std::string_view name, std::string_view help, double value, std::vector<metric_label> extra = {}) {
    add(name, help, metric_type::gauge, value, std::move(extra), std::nullopt);
  }
  /// A histogram of seconds.
  void histogram(std::string_view name, std::string_view help, histogram_snapshot h,
                 std::vector<metric_label> extra = {}) {
    add(name, help, metric_type::histogram, 0, std::move(extra), std::move(h));
  }

  /// The samples written so far.
  [[nodiscard]] std::vector<metric_sample>& samples() noexcept { return samples_; }

 private:
  // Labels and samples are spelled with dependent_t so that these bodies
  // compile only where a collector runs (see detail/dependent.hpp).
  using labels_t = detail::dependent_t<std::vector<metric_label>, Dummy>;
  using sample_t = detail::dependent_t<metric_sample, Dummy>;

  void add(std::string_view name, std::string_view help, metric_type type, double value, labels_t extra,
           std::optional<detail::dependent_t<histogram_snapshot, Dummy>> h) {
    sample_t s;
    s.name = std::string(name);
    s.help = std::string(help);
    s.type = type;
    s.labels = base_;
    for (auto& l : extra) {
      redact(l);
      s.labels.push_back(std::move(l));
    }
    s.value = value;
    s.histogram = std::move(h);
    samples_.push_back(std::move(s));
  }

  void redact(detail::dependent_t<metric_label, Dummy>& l) const {
    if (policy_->is_sensitive(l.first)) {
      l.second.assign(redacted_text);
    } else if (l.second.find_first_of(":=") != std::string::npos) {  // only such values can hold a secret
      l.second = policy_->scrub(l.second);
    }
  }

  labels_t base_;
  detail::dependent_t<std::vector<metric_sample>, Dummy> samples_;
  std::shared_ptr<const redaction_policy> policy_;  ///< snapshot taken at construction
};
using metric_writer = basic_metric_writer<void>;

namespace detail {

template <class = void>
void prometheus_escape_label(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

template <class = void>
void prometheus_escape_help(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

template <class = void>
void prometheus_number(std::string& out, double v) {
  // Classified without <cmath>, whose declarations cost every includer of
  // consumer.hpp about 3% of its compile time: NaN is the one value unequal
  // to itself; any other value beyond the largest finite double is an
  // infinity; a magnitude under 9e15 converts to long long exactly, so the
  // round trip says whether it is integral.
  constexpr double largest = std::numeric_limits<double>::max();
  if (v != v) {
    out += "NaN";
  } else if (v > largest || v < -largest) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else if (v < 9.0e15 && v > -9.0e15 && v == static_cast<double>(static_cast<long long>(v))) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.0f", v);
    out += buf;
  } else {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    out += buf;
  }
}

template <class = void>
void prometheus_labels(std::string& out, const std::vector<metric_label>& labels,
                              const metric_label* extra = nullptr) {
  if (labels.empty() && extra == nullptr) return;
  out += '{';
  bool first = true;
  auto one = [&](const metric_label& l) {
    if (!first) out += ',';
    first = false;
    out += l.first;
    out += "=\"";
    prometheus_escape_label(out, l.second);
    out += '"';
  };
  for (const auto& l : labels) one(l);
  if (extra != nullptr) one(*extra);
  out += '}';
}

}  // namespace detail

/// Renders samples as Prometheus text exposition format 0.0.4: one `# HELP`
/// and `# TYPE` per family (families in first-seen order, all samples of a
/// family together), histograms as `_bucket{le=...}`, `_sum` and `_count`.
/// Allocates the text. Thread-safe (pure function).
/// (A function template only so that its body compiles where it is called:
/// issue 17.)
template <class = void>
[[nodiscard]] std::string render_prometheus(const std::vector<metric_sample>& samples) {
  std::vector<std::string_view> families;
  for (const auto& s : samples) {
    if (std::find(families.begin(), families.end(), std::string_view(s.name)) == families.end())
      families.emplace_back(s.name);
  }
  std::string out;
  for (auto family : families) {
    bool header = false;
    for (const auto& s : samples) {
      if (s.name != family) continue;
      if (!header) {
        out += "# HELP ";
        out += s.name;
        out += ' ';
        detail::prometheus_escape_help(out, s.help);
        out += "\n# TYPE ";
        out += s.name;
        out += ' ';
        out += to_string(s.type);
        out += '\n';
        header = true;
      }
      if (s.type == metric_type::histogram && s.histogram) {
        const auto& h = *s.histogram;
        for (std::size_t i = 0; i < h.bounds.size(); ++i) {
          std::string le;
          detail::prometheus_number(le, h.bounds[i]);
          const metric_label bound{"le", le};
          out += s.name;
          out += "_bucket";
          detail::prometheus_labels(out, s.labels, &bound);
          out += ' ';
          detail::prometheus_number(out, static_cast<double>(h.cumulative[i]));
          out += '\n';
        }
        const metric_label inf{"le", "+Inf"};
        out += s.name;
        out += "_bucket";
        detail::prometheus_labels(out, s.labels, &inf);
        out += ' ';
        detail::prometheus_number(out, static_cast<double>(h.count));
        out += '\n';
        out += s.name;
        out += "_sum";
        detail::prometheus_labels(out, s.labels);
        out += ' ';
        detail::prometheus_number(out, h.sum);
        out += '\n';
        out += s.name;
        out += "_count";
        detail::prometheus_labels(out, s.labels);
        out += ' ';
        detail::prometheus_number(out, static_cast<double>(h.count));
        out += '\n';
      } else {
        out += s.name;
        detail::prometheus_labels(out, s.labels);
        out += ' ';
        detail::prometheus_number(out, s.value);
        out += '\n';
      }
    }
  }
  return out;
}

/// Components register a collector here; `collect()` asks each for its
/// samples and `render_prometheus()` turns them into exposition text.
/// Registration is RAII: the returned handle unregisters on destruction and
/// waits for a collection in progress, so a collector never runs on a
/// destroyed component. Collectors run under the registry's lock and must
/// not register or unregister. All members thread-safe; allocates.
///
/// **Example**:
///   postbox::metrics_registry registry;
///   postbox::channel<int> orders(1024);
///   auto reg = postbox::register_channel(registry, "orders", orders);
///   std::string text = registry.render_prometheus();
class metrics_registry {
 public:
  using collector = std::function<void(metric_writer&)>;

  /// Keeps a collector registered while it lives. Move-only.
  class registration {
   public:
    registration() = default;
    registration(registration&& o) noexcept : owner_(std::exchange(o.owner_, nullptr)), id_(o.id_) {}
    registration& operator=(registration&& o) noexcept {
      if (this != &o) {
        reset();
        owner_ = std::exchange(o.owner_, nullptr);
        id_ = o.id_;
      }
      return *this;
    }
    registration(const registration&) = delete;
    registration& operator=(const registration&) = delete;
    ~registration() { reset(); }

    /// Unregisters now (idempotent). Blocks while a collection runs.
    void reset() noexcept {
      if (owner_ != nullptr) owner_->remove(id_);
      owner_ = nullptr;
    }
    /// Whether this handle holds a registration.
    explicit operator bool() const noexcept { return owner_ != nullptr; }

   private:
    friend class metrics_registry;
    registration(metrics_registry* owner, std::uint64_t id) noexcept : owner_(owner), id_(id) {}
    metrics_registry* owner_ = nullptr;
    std::uint64_t id_ = 0;
  };

  metrics_registry() = default;
  metrics_registry(const metrics_registry&) = delete;
  metrics_registry& operator=(const metrics_registry&) = delete;

  /// Registers `fn` for a component of `kind` ("channel", "consumer", ...)
  /// named `name`; every sample it writes carries `component` and `name`
  /// labels. Allocates. Thread-safe. The registry must outlive the handle.
  template <class D = void>  // a template so that its body compiles where it is called (issue 17)
  [[nodiscard]] registration add(std::string kind, std::string name, collector fn) {
    std::lock_guard lock(mutex_);
    const std::uint64_t id = ++last_id_;
    entries<D>().push_back(detail::dependent_t<entry, D>{id, std::move(kind), std::move(name), std::move(fn)});
    return registration(this, id);
  }

  /// Every registered component's samples, in registration order. A
  /// collector that throws is skipped (its samples are dropped) and counted.
  /// Allocates. Thread-safe. (A member template only so that its body
  /// compiles where it is called: issue 17.)
  template <class D = void>
  [[nodiscard]] std::vector<metric_sample> collect() const {
    detail::dependent_t<std::vector<metric_sample>, D> out;
    std::lock_guard lock(mutex_);
    for (const auto& e : entries<D>()) {
      detail::dependent_t<metric_writer, D> w({{"component", e.kind}, {"name", e.name}});
      POSTBOX_TRY {
        e.fn(w);
        for (auto& s : w.samples()) out.push_back(std::move(s));
      }
      POSTBOX_CATCH_ALL { ++collector_failures_; }
    }
    return out;
  }

  /// `collect()` rendered as Prometheus text. Allocates. Thread-safe.
  template <class = void>
  [[nodiscard]] std::string render_prometheus() const { return postbox::render_prometheus(collect()); }

  /// Registered components.
  [[nodiscard]] std::size_t size() const {
    std::lock_guard lock(mutex_);
    return entries_.size();
  }

  /// Collectors that threw during `collect()` so far.
  [[nodiscard]] std::uint64_t collector_failures() const {
    std::lock_guard lock(mutex_);
    return collector_failures_;
  }

 private:
  struct entry {
    std::uint64_t id;
    std::string kind;
    std::string name;
    collector fn;
  };

  // entries_ as a type that depends on `D`, for the member templates above:
  // their bodies then compile only where they are called (detail/dependent.hpp).
  template <class D>
  [[nodiscard]] detail::dependent_t<std::vector<entry>, D>& entries() noexcept {
    return entries_;
  }
  template <class D>
  [[nodiscard]] const detail::dependent_t<std::vector<entry>, D>& entries() const noexcept {
    return entries_;
  }

  void remove(std::uint64_t id) noexcept {
    std::lock_guard lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const entry& e) { return e.id == id; }),
                   entries_.end());
  }

  mutable std::mutex mutex_;
  std::vector<entry> entries_;
  std::uint64_t last_id_ = 0;
  mutable std::uint64_t collector_failures_ = 0;
};

/// The process-wide registry, for programs that want one place to scrape.
[[nodiscard]] inline metrics_registry& default_registry() {
  static metrics_registry instance;
  return instance;
}

/// Registers a channel (anything with `stats()` returning `channel_stats`):
/// depth, capacity, sent, received, closed. Reading costs the channel's fast
/// path nothing (the figures come from its indices). `ch` must outlive the
/// handle. Allocates; thread-safe.
template <class Channel>
[[nodiscard]] metrics_registry::registration register_channel(metrics_registry& registry, std::string name,
                                                              const Channel& ch) {
  return registry.add("channel", std::move(name), [&ch](metric_writer& w) {
    const auto s = ch.stats();
    w.gauge("postbox_channel_depth", "Messages queued in the channel.", static_cast<double>(s.depth));
    w.gauge("postbox_channel_capacity", "Slots in the channel's ring.", static_cast<double>(s.capacity));
    w.counter("postbox_channel_sent_total", "Messages sent into the channel.", static_cast<double>(s.sent));
    w.counter("postbox_channel_received_total", "Messages received from the channel.",
              static_cast<double>(s.received));
    w.gauge("postbox_channel_closed", "1 when the channel is closed.", s.closed ? 1.0 : 0.0);
  });
}

/// Registers a topic (anything with `stats()` returning `topic_stats`):
/// subscriptions, published, delivered, dropped, and per subscription (label
/// `subscription` = its id, plus `group` when set) depth, capacity,
/// delivered, received, lag (drop_oldest) and dropped. Costs publishers
/// nothing but the one relaxed counter they always bump. `t` must outlive
/// the handle. Allocates; thread-safe.
template <class Topic>
[[nodiscard]] metrics_registry::registration register_topic(metrics_registry& registry, std::string name,
                                                            const Topic& t) {
  return registry.add("topic", std::move(name), [&t](metric_writer& w) {
    const auto s = t.stats();
    w.gauge("postbox_topic_subscriptions", "Current subscriptions (a group counts once).",
            static_cast<double>(s.subscriptions));
    w.counter("postbox_topic_published_total", "Messages published.", static_cast<double>(s.published));
    w.counter("postbox_topic_delivered_total", "Copies queued into current subscriptions.",
              static_cast<double>(s.delivered));
    w.counter("postbox_topic_dropped_total", "Copies discarded by current subscriptions.",
              static_cast<double>(s.dropped));
    for (const auto& sub : s.per_subscription) {
      std::vector<metric_label> l{{"subscription", std::to_string(sub.id)}};
      if (!sub.group.empty()) l.emplace_back("group", sub.group);
      w.gauge("postbox_subscription_depth", "Messages queued in the subscription.", static_cast<double>(sub.depth), l);
      w.gauge("postbox_subscription_capacity", "Bound of the subscription's queue.",
              static_cast<double>(sub.capacity), l);
      w.counter("postbox_subscription_delivered_total", "Messages queued into the subscription.",
                static_cast<double>(sub.delivered), l);
      w.counter("postbox_subscription_received_total", "Messages taken by the subscription's subscribers.",
                static_cast<double>(sub.received), l);
      w.counter("postbox_subscription_lag_total", "Messages discarded by drop_oldest.", static_cast<double>(sub.lag), l);
      w.counter("postbox_subscription_dropped_total", "Messages discarded by drop_newest or fail.",
                static_cast<double>(sub.dropped), l);
    }
  });
}

/// Registers a stream consumer group handle (anything with `stats()`
/// returning `stream_group_stats`, e.g. `stream<T>::consumer_group`, copied
/// into the collector): members, generation, lag, and per partition (label
/// `partition`) committed offset, end offset and lag. Takes the group lock
/// once per scrape. Allocates; thread-safe.
template <class Group>
[[nodiscard]] metrics_registry::registration register_stream_group(metrics_registry& registry, std::string name,
                                                                   Group group) {
  return registry.add("stream_group", std::move(name), [g = std::move(group)](metric_writer& w) {
    const auto s = g.stats();
    w.gauge("postbox_stream_group_members", "Members of the consumer group.", static_cast<double>(s.members));
    w.gauge("postbox_stream_group_generation", "Rebalance generation.", static_cast<double>(s.generation));
    w.gauge("postbox_stream_group_lag", "Records not committed, all partitions.", static_cast<double>(s.lag));
    for (const auto& p : s.partitions) {
      std::vector<metric_label> l{{"partition", std::to_string(p.partition)}};
      w.gauge("postbox_stream_group_committed_offset", "Next offset the group consumes.",
              static_cast<double>(p.committed), l);
      w.gauge("postbox_stream_group_end_offset", "Next offset an append gets.", static_cast<double>(p.end), l);
      w.gauge("postbox_stream_group_partition_lag", "Records not committed.", static_cast<double>(p.lag), l);
    }
  });
}

POSTBOX_END_NAMESPACE
