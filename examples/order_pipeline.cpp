// SPDX-License-Identifier: MIT
// order_pipeline: postbox's flagship demo, an order pipeline in one process.
// A price quote by request-reply; orders accepted "202 style" by the operation
// tracker; each order row and its order.placed event committed in one SQLite
// transaction (outbox) and relayed to a topic; a saga per order (reserve stock,
// authorize the card, confirm) that releases the stock when the card is
// declined; consumers with SQLite inboxes, so the duplicate a relay crash
// produces has no second effect; a poison message dead-lettered and a rejected
// one redriven once the rule is fixed. It prints a timeline whose message
// aliases (m1, m2, ...) show how correlation and causation ids link the steps,
// then a short summary of every component's metrics (--metrics prints them as
// Prometheus text), then a summary. Output lines stay within 100 columns
// (the Prometheus text's own lines excepted).
//
//   checkout ──quote──▶ pricing                                        request-reply
//      │ submit(order, idempotency key) ──▶ 202 Accepted: operation id, pending
//      ▼
//   operations ──work──▶ BEGIN; INSERT order; outbox.stage(order.placed); COMMIT    SQLite
//                                                 │
//                                outbox_relay ◀───┘   drains; at least once, same ids
//                                      ▼
//                      topic "orders" (subject = event type)
//        ┌────────────────────┬────────┴───────────┬────────────────────┐
//   fulfillment          inventory            payment              notification
//   order.placed         order.confirmed      order.confirmed      order.>
//   runs the saga        ships                captures             e-mails
//        │               └──────────── each behind an SQLite inbox ─────┘
//        ▼
//   saga: reserve ──▶ charge ──▶ confirm: order.confirmed ──▶ outbox
//            ▲          │ declined
//            └─release◀─┘  then cancel: order.canceled ──▶ outbox
//
//   warehouse system ──JSON bytes──▶ warehouse consumer ──poison, reject──▶ dead-letter queue
//                                           ▲                                      │
//                                           └────────── redrive, once fixed ◀──────┘
//
// Usage: order_pipeline [--seed N] [--verbose] [--db PATH] [--metrics] [--all-metrics]
// Deterministic: a manual clock drives time, and consumers, relay and responder
// run on the main thread when it polls them; the operations' work runs on the
// tracker's worker while the main thread waits. The same seed prints the same
// bytes. Walkthrough: docs/design/flagship.md
#include <postbox/postbox.hpp>
#include <postbox/json.hpp>    // nlohmann/json: the outbox codec, the warehouse feed's decoder
#include <postbox/sqlite.hpp>  // sqlite3: one file for the shop's tables, outbox, inbox and sagas
#include <postbox/testing.hpp>  // postbox::manual_clock: the demo's time moves only between steps

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

using namespace std::chrono_literals;
using postbox::envelope;
using postbox::sqlite_store;

// ---------------------------------------------------------------------------
// The messages
// ---------------------------------------------------------------------------

/// Checkout asks pricing what an order would cost (request).
struct price_query {
  static constexpr const char* message_type = "pricing.quote";
  std::string sku;
  int qty = 0;
};
/// Pricing's answer (reply).
struct price_quote {
  static constexpr const char* message_type = "pricing.quoted";
  long long cents = 0;
};
/// The client's command; the operation's work carries it out.
struct place_order {
  static constexpr const char* message_type = "order.place";
  std::string order, customer, sku, card;
  int qty = 0;
  long long cents = 0;
};
/// The order's public events; the envelope's type says which:
/// order.placed, order.confirmed or order.canceled.
struct order_event {
  std::string order, customer, sku, card;
  int qty = 0;
  long long cents = 0;
  std::string reason;  ///< why it was canceled
};
void to_json(nlohmann::json& j, const order_event& o) {
  j = {{"order", o.order}, {"customer", o.customer}, {"sku", o.sku},      {"card", o.card},
       {"qty", o.qty},     {"cents", o.cents},       {"reason", o.reason}};
}
void from_json(const nlohmann::json& j, order_event& o) {
  j.at("order").get_to(o.order);
  j.at("customer").get_to(o.customer);
  j.at("sku").get_to(o.sku);
  j.at("card").get_to(o.card);
  j.at("qty").get_to(o.qty);
  j.at("cents").get_to(o.cents);
  j.at("reason").get_to(o.reason);
}
/// What the warehouse system sends, as JSON bytes: stock that arrived.
struct stock_received {
  static constexpr const char* message_type = "stock.received";
  std::string sku;
  int qty = 0;
};
void to_json(nlohmann::json& j, const stock_received& s) { j = {{"sku", s.sku}, {"qty", s.qty}}; }
void from_json(const nlohmann::json& j, stock_received& s) {
  j.at("sku").get_to(s.sku);
  j.at("qty").get_to(s.qty);
}

// ---------------------------------------------------------------------------
// Options, the seeded plan, small helpers
// ---------------------------------------------------------------------------

struct options {
  std::uint64_t seed = 42;
  bool verbose = false;      ///< print full message ids next to the aliases
  bool metrics = false;      ///< print the non-zero metrics as Prometheus text
  bool all_metrics = false;  ///< print zero-valued series and histograms too
  std::string db;            ///< empty: a temporary file, removed at exit
};

std::optional<options> parse_options(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--seed" && i + 1 < argc) {
      o.seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--db" && i + 1 < argc) {
      o.db = argv[++i];
    } else if (arg == "--verbose") {
      o.verbose = true;
    } else if (arg == "--metrics") {
      o.metrics = true;
    } else if (arg == "--all-metrics") {
      o.metrics = o.all_metrics = true;
    } else {
      std::fprintf(stderr, "usage: order_pipeline [--seed N] [--verbose] [--db PATH] [--metrics] [--all-metrics]\n");
      return std::nullopt;
    }
  }
  return o;
}

/// splitmix64: the same numbers for the same seed on every platform.
class seeded_random {
 public:
  explicit seeded_random(std::uint64_t seed) : state_(seed) {}
  int below(int n) {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return static_cast<int>((z ^ (z >> 31)) % static_cast<std::uint64_t>(n));
  }

 private:
  std::uint64_t state_;
};

/// One order the client will place; the seed picks item, quantity and which
/// card is declined.
struct order_plan {
  std::string order, customer, sku, card;
  int qty = 0;
};

constexpr const char* declined_card = "tok_chargeDeclined";

std::vector<order_plan> plan_orders(std::uint64_t seed) {
  seeded_random rng(seed);
  const char* customers[] = {"ada", "bob", "cyd"};
  const char* skus[] = {"desk", "lamp", "chair"};
  const int declined = rng.below(3);
  std::vector<order_plan> plan;
  for (int i = 0; i < 3; ++i) {
    order_plan p;
    p.order = "o-" + std::to_string(1001 + i);
    p.customer = customers[i];
    p.sku = skus[rng.below(3)];
    p.qty = 1 + rng.below(3);
    p.card = i == declined ? declined_card : "tok_visa";
    plan.push_back(std::move(p));
  }
  return plan;
}

std::string money(long long cents) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lld.%02lld", cents / 100, cents % 100);
  return buf;
}

/// Throws when a database call failed. Inside a saga step that fails the
/// step, inside an inbox handler it fails the delivery (nothing is kept and it
/// is retried), inside an operation's work it fails the operation.
void must(postbox::errc rc, const sqlite_store::transaction& tx, const char* what) {
  if (rc != postbox::errc::ok)
    throw std::runtime_error(std::string(what) + ": " + std::string(postbox::to_string(rc)) + " " + tx.last_error());
}

/// The text in the first column of the first row (sqlite_store's own query
/// helper reads integers only).
std::string query_text(const sqlite_store::transaction& tx, const char* sql, const std::string& arg) {
  sqlite3_stmt* stmt = nullptr;
  std::string out;
  if (sqlite3_prepare_v2(tx.connection(), sql, -1, &stmt, nullptr) == SQLITE_OK) {
    sqlite3_bind_text(stmt, 1, arg.c_str(), -1, SQLITE_TRANSIENT);
    if (sqlite3_step(stmt) == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr)
      out = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  }
  sqlite3_finalize(stmt);
  return out;
}

/// The database file: a temporary one is removed (with its WAL files) when
/// the demo ends; one given with --db is kept for the sqlite3 shell.
struct database_file {
  std::string path;
  bool keep = false;
  explicit database_file(const options& o)
      : path(o.db.empty() ? (std::filesystem::temp_directory_path() /
                             ("postbox_order_pipeline_" + std::to_string(::getpid()) + ".db"))
                                .string()
                          : o.db),
        keep(!o.db.empty()) {
    if (keep && std::filesystem::exists(path)) throw std::runtime_error(path + " exists; give a new file");
    remove();
  }
  ~database_file() {
    if (!keep) remove();
  }
  void remove() const {
    std::error_code ec;
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix, ec);
  }
};

// ---------------------------------------------------------------------------
// The timeline
// ---------------------------------------------------------------------------

/// Prints one line per step: time on the manual clock, component, message
/// ids as aliases and what happened. Aliases are given in order of first
/// appearance: mN for message ids, cN for a conversation (correlation) id
/// that is no message's own id. Thread-safe: operations' work prints from
/// the tracker's worker thread.
class timeline {
 public:
  timeline(const postbox::clock& clock, bool verbose) : clock_(&clock), start_(clock.now()), verbose_(verbose) {}

  /// "m7 (corr c1, caused by m5)".
  template <class T>
  std::string ids(const envelope<T>& e) {
    return ids(e.id, e.correlation_id, e.causation_id);
  }
  std::string ids(postbox::message_id id, postbox::message_id correlation, postbox::message_id causation) {
    std::lock_guard lock(mutex_);
    std::string out = alias_locked(id, "m");
    std::string links;
    if (!correlation.is_nil()) links = "corr " + alias_locked(correlation, "c");
    if (!causation.is_nil()) links += (links.empty() ? "caused by " : ", caused by ") + alias_locked(causation, "m");
    return links.empty() ? out : out + " (" + links + ")";
  }

  /// "op1" for an operation id (32 random hex digits).
  std::string operation(const std::string& id) {
    std::lock_guard lock(mutex_);
    auto [it, fresh] = operations_.try_emplace(id, "op" + std::to_string(operations_.size() + 1));
    return verbose_ && fresh ? it->second + " [" + id + "]" : it->second;
  }

  void section(const char* title) {
    std::lock_guard lock(mutex_);
    std::printf("\n%s\n", title);
  }

  /// One timeline entry on one line; an entry too long for `line_width`
  /// columns continues on the next line, under the component, wrapped there.
  void add(const std::string& component, const std::string& ids, const std::string& what) {
    std::lock_guard lock(mutex_);
    const double t = std::chrono::duration<double>(clock_->now() - start_).count();
    char head[128];
    std::snprintf(head, sizeof head, "+%.3fs  %-12s %-29s ", t, component.c_str(), ids.c_str());
    std::string line = head;
    if (line.size() + what.size() <= line_width) {
      std::printf("%s%s\n", head, what.c_str());
      return;
    }
    line.erase(line.find_last_not_of(' ') + 1);
    std::printf("%s\n", line.c_str());
    print_wrapped(std::string(continuation_indent, ' '), what);
  }

  /// Prints `text` after `head`, wrapped at spaces to `line_width` columns;
  /// continuation lines are indented by `continuation_indent` (a word longer
  /// than a line is cut).
  static void print_wrapped(const std::string& head, std::string_view text) {
    std::string line = head;
    while (line.size() + text.size() > line_width) {
      const std::size_t room = line_width - line.size();
      std::size_t cut = text.rfind(' ', room);
      if (cut == std::string_view::npos || cut == 0) cut = room;
      line.append(text.substr(0, cut));
      std::printf("%s\n", line.c_str());
      text.remove_prefix(cut);
      while (!text.empty() && text.front() == ' ') text.remove_prefix(1);
      line.assign(continuation_indent, ' ');
    }
    line.append(text);
    std::printf("%s\n", line.c_str());
  }

  static constexpr std::size_t line_width = 100;
  static constexpr std::size_t continuation_indent = 9;  ///< under the component column

 private:
  /// The alias of `id`, a new one (with the full id when verbose) the first time.
  std::string alias_locked(postbox::message_id id, const char* prefix) {
    if (const auto it = aliases_.find(id); it != aliases_.end()) return it->second;
    const std::string name = prefix + std::to_string(++counts_[prefix]);
    aliases_.emplace(id, name);
    return verbose_ ? name + " [" + id.to_string() + "]" : name;
  }

  const postbox::clock* clock_;
  postbox::time_point start_;
  bool verbose_;
  std::mutex mutex_;
  std::map<postbox::message_id, std::string> aliases_;
  std::map<std::string, int> counts_;
  std::map<std::string, std::string> operations_;
};

// ---------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------

class order_pipeline {
 public:
  explicit order_pipeline(const options& opt) : opt_(opt), plan_(plan_orders(opt.seed)) {
    open_shop();
    define_order_saga();
    observer_.on_settle = [this](const postbox::message_event& e) { on_settle(e); };
    warehouse_dead_letters_.set_origin("warehouse", [this](envelope<stock_received> e) {
      // Redrive sends the message back as the bytes the feed carries.
      return warehouse_feed_.try_send(postbox::json::encode(e)) == postbox::send_status::ok ? postbox::errc::ok
                                                                                            : postbox::errc::full;
    });
    register_metrics();
  }
  ~order_pipeline() { open_desk(); }  // never leave a worker waiting for the desk
  order_pipeline(const order_pipeline&) = delete;
  order_pipeline& operator=(const order_pipeline&) = delete;

  /// The whole story; returns the exit code.
  int run() {
    std::printf("postbox order pipeline: seed %llu\n", static_cast<unsigned long long>(opt_.seed));
    std::printf("+time on a manual clock; mN = message ids, cN = conversations\n");
    tl_.section("1. checkout asks pricing for quotes (request-reply)");
    request_quotes();
    tl_.section("2. checkout submits the orders; the operation tracker answers 202 Accepted");
    submit_orders();
    tl_.section("3. the order desk runs the operations: order row + order.placed in one SQLite transaction");
    run_order_desk();
    tl_.section("4. the relay publishes the outbox to the topic; fulfillment runs a saga per order");
    relay_outbox();
    deliver_events();
    tl_.section("5. the relay crashes after one publish; the restarted relay publishes it again");
    relay_crashes_ = true;
    relay_outbox();
    deliver_events();
    tl_.section("6. the warehouse feed: a poison message, a rule violation, the fix and the redrive");
    warehouse_feed();
    fix_catalog_and_redrive();
    tl_.section("7. the clients read their operations and orders");
    clients_read_final_state();
    const std::vector<std::string> broken = check_invariants();
    print_metrics();
    print_summary(broken);
    return broken.empty() ? 0 : 1;
  }

 private:
  // -- setup ----------------------------------------------------------------

  void open_shop() {
    auto tx = db_.begin();
    must(tx.exec("CREATE TABLE catalog (sku TEXT PRIMARY KEY);"
                 "CREATE TABLE stock (sku TEXT PRIMARY KEY, initial INTEGER NOT NULL, received INTEGER NOT NULL,"
                 "  available INTEGER NOT NULL, reserved INTEGER NOT NULL, shipped INTEGER NOT NULL);"
                 "CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, sku TEXT NOT NULL,"
                 "  qty INTEGER NOT NULL, cents INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL);"
                 "CREATE TABLE reservations (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL,"
                 "  state TEXT NOT NULL);"
                 "CREATE TABLE payments (order_id TEXT PRIMARY KEY, cents INTEGER NOT NULL, state TEXT NOT NULL,"
                 "  captures INTEGER NOT NULL);"
                 "CREATE TABLE emails (message_id TEXT NOT NULL, order_id TEXT NOT NULL, kind TEXT NOT NULL);"
                 "INSERT INTO catalog VALUES ('desk'), ('lamp'), ('chair');"
                 "INSERT INTO stock VALUES ('desk', 10, 0, 10, 0, 0), ('lamp', 10, 0, 10, 0, 0),"
                 "  ('chair', 10, 0, 10, 0, 0);"),
         tx, "create the shop's tables");
    must(tx.commit(), tx, "commit");
  }

  void define_order_saga() {
    postbox::saga_definition order("order");
    order
        .step(
            "reserve", [this](postbox::step_context& c) { return reserve_stock(c); },
            [this](postbox::step_context& c) { return release_stock(c); })
        .step(
            "charge", [this](postbox::step_context& c) { return authorize_card(c); },
            [this](postbox::step_context& c) { return void_authorization(c); })
        .step(
            "confirm", [this](postbox::step_context& c) { return confirm_order(c); }, nullptr);
    sagas_.add(std::move(order));
  }

  static postbox::sqlite_store_options store_options() {
    postbox::sqlite_store_options o;
    o.synchronous = postbox::sqlite_synchronous::normal;  // survives a process crash; no fsync per commit
    return o;
  }

  postbox::consumer_options polled_consumer(std::string name) {
    postbox::consumer_options o;
    o.name = std::move(name);
    o.threads = 0;  // driven by poll() on the main thread
    o.clock = &clock_;
    o.observer = &observer_;
    o.jitter_seed = opt_.seed;
    return o;
  }

  /// One queue per service on the topic: a group of one member (a second
  /// instance of the service would join it and share the work).
  postbox::subscription<envelope<order_event>> subscribe(const char* group, const char* pattern) {
    return orders_topic_.subscribe(
        {.capacity = 64, .policy = postbox::overflow::block, .group = group, .pattern = pattern});
  }

  postbox::relay_options make_relay_options() {
    postbox::relay_options o;
    o.owner = "orders-relay";  // a restarted relay takes its own leases back at once
    o.jitter_seed = opt_.seed;
    o.on_point = [this](postbox::relay_point p, const postbox::stored_message* m) { on_relay_point(p, m); };
    return o;
  }

  postbox::saga_options make_saga_options() {
    postbox::saga_options o;
    o.producer = "fulfillment";
    o.on_event = [this](const envelope<postbox::saga_event>& e) { on_saga_event(e); };
    return o;
  }

  /// Lets time pass between steps, so the timeline's clock moves.
  void pause(postbox::duration d = 10ms) { clock_.advance(d); }

  // -- 1. request-reply -----------------------------------------------------

  price_quote serve_quote(const envelope<price_query>& q) {
    static const std::map<std::string, long long> unit_cents = {{"desk", 24900}, {"lamp", 3950}, {"chair", 8900}};
    const auto it = unit_cents.find(q.payload.sku);
    if (it == unit_cents.end()) throw postbox::error(postbox::errc::not_found, "no price for " + q.payload.sku);
    const long long cents = it->second * q.payload.qty;
    tl_.add("pricing", tl_.ids(q),
            "quotes " + std::to_string(q.payload.qty) + " x " + q.payload.sku + " = " + money(cents) +
                ", replies to '" + std::string(*q.headers.get(postbox::header_names::reply_to)) + "'");
    return {cents};
  }

  void request_quotes() {
    for (std::size_t i = 0; i < plan_.size(); ++i) {
      const auto& p = plan_[i];
      const auto sent =
          checkout_.request(price_query{p.sku, p.qty}, 2s, [this, i](postbox::reply_outcome<price_quote> r) {
            if (!r.ok()) {
              tl_.add("checkout", "", "gets no quote: " + std::string(postbox::to_string(r.status)));
              return;
            }
            tl_.add("checkout", tl_.ids(*r.reply),
                    "gets the quote for " + plan_[i].order + ": " + money(r.reply->payload.cents));
            quotes_[i] = std::move(*r.reply);
          });
      if (sent != postbox::errc::ok) throw std::runtime_error("quote request refused");
      pricing_.poll();  // the responder serves the request on this thread; the reply completes it
      pause();
    }
  }

  // -- 2. operations, 202 style ---------------------------------------------

  void submit_orders() {
    for (std::size_t i = 0; i < plan_.size(); ++i) {
      const auto& p = plan_[i];
      const auto& quote = quotes_.at(i);
      auto command = postbox::caused_by(quote, "order.place",
                                        place_order{p.order, p.customer, p.sku, p.card, p.qty, quote.payload.cents},
                                        postbox::message_kind::command, clock_);
      command.partition_key = p.order;
      const std::string key = "order-" + p.order;  // the client's idempotency key
      const std::string fingerprint = p.sku + "/" + std::to_string(p.qty) + "/" + std::to_string(quote.payload.cents);
      auto submit = [&] {
        return ops_.submit(p.customer, key, fingerprint,
                           [this, command, open = desk_open_](postbox::operation_context&) {
                             open.wait();
                             return place(command);
                           });
      };
      const auto accepted = submit();
      if (!accepted) throw std::runtime_error("submit refused: " + std::string(postbox::to_string(accepted.status())));
      operation_ids_.push_back(accepted->id);
      // A created operation starts pending; the 202 answer carries its id.
      tl_.add("checkout", tl_.ids(command),
              p.customer + " submits " + p.order + " (key " + key + "): 202 Accepted, " + tl_.operation(accepted->id) +
                  " pending");
      if (i == 0) {  // the client's connection dropped: it sends the same request again
        const auto again = submit();
        const bool same =
            again && again->disposition == postbox::submit_disposition::existing && again->id == accepted->id;
        tl_.add("checkout", tl_.ids(command),
                p.customer + " retries with the same key: " +
                    (same ? "the same operation " + tl_.operation(accepted->id) : std::string("a different answer!")));
      }
      auto watch = ops_.watch(p.customer, accepted->id,
                              [this](const postbox::operation_snapshot<std::string>& s) { on_operation_change(s); });
      if (!watch) throw std::runtime_error("cannot watch the operation");
      watches_.push_back(std::move(*watch));
      pause();
    }
  }

  // -- 3. the operation's work: order row + event in one transaction --------

  /// Runs on the tracker's worker thread.
  std::string place(const envelope<place_order>& command) {
    const auto& c = command.payload;
    auto placed =
        postbox::caused_by(command, "order.placed", order_event{c.order, c.customer, c.sku, c.card, c.qty, c.cents, ""},
                           postbox::message_kind::event, clock_);
    placed.producer = "orders";
    auto tx = db_.begin();
    must(tx.exec("INSERT INTO orders VALUES (?1, ?2, ?3, ?4, ?5, 'placed', '')", c.order, c.customer, c.sku, c.qty,
                 c.cents),
         tx, "insert order");
    must(outbox_.stage(tx, placed), tx, "stage order.placed");
    must(tx.commit(), tx, "commit");  // both rows or neither
    tl_.add("orders", tl_.ids(placed), "stores " + c.order + " and stages order.placed: one transaction");
    return c.order;
  }

  void on_operation_change(const postbox::operation_snapshot<std::string>& s) {
    if (!postbox::is_terminal(s.state)) return;
    tl_.add("operations", "",
            tl_.operation(s.id) + " " + std::string(postbox::to_string(s.state)) +
                (s.result ? " with result " + *s.result : " (" + s.error->message + ")"));
    std::lock_guard lock(ops_mutex_);
    ++ops_finished_;
    ops_done_.notify_all();
  }

  void open_desk() {
    if (!desk_opened_) desk_opens_.set_value();
    desk_opened_ = true;
  }

  void run_order_desk() {
    open_desk();  // until now the work waited
    std::unique_lock lock(ops_mutex_);
    ops_done_.wait(lock, [&] { return ops_finished_ == plan_.size(); });
    pause();
  }

  // -- 4. relay and consumers ----------------------------------------------

  struct relay_crash {};

  void on_relay_point(postbox::relay_point p, const postbox::stored_message* m) {
    if (p != postbox::relay_point::published) return;
    const bool again = !published_.insert(m->id).second;
    if (again) ++republished_;
    tl_.add("outbox-relay", tl_.ids(m->id, m->correlation_id, m->causation_id),
            "publishes " + m->type + (again ? " AGAIN (same id: at-least-once)" : ""));
    if (relay_crashes_) {
      relay_crashes_ = false;
      tl_.add("outbox-relay", "", "crashes before marking it dispatched (simulated)");
      throw relay_crash{};  // leaves run_once here, as a crash would; the rows stay leased
    }
  }

  void relay_outbox() {
    try {
      relay_.drain();
    } catch (const relay_crash&) {
      pause();
      tl_.add("outbox-relay", "", "restarts as the same owner and takes its leased rows back");
      relay_.drain();
    }
    pause();
  }

  void deliver_events() {
    for (auto* c : {&fulfillment_, &inventory_, &payment_, &notification_}) {
      (void)c->poll();
      pause();
    }
  }

  /// The consumer's answer to an inbox outcome: processed (the effect and
  /// the id committed together), duplicate (skipped), or failed (nothing
  /// kept; retried).
  template <class T>
  postbox::settlement settle(const char* component, const envelope<T>& e, const postbox::inbox_outcome& outcome,
                             const std::string& effect) {
    if (outcome.processed()) {
      tl_.add(component, tl_.ids(e), effect);
    } else if (outcome.duplicate()) {
      ++duplicates_skipped_;
      tl_.add(component, tl_.ids(e), "skips " + e.type + ": the inbox has its id (no second effect)");
    } else {
      tl_.add(component, tl_.ids(e), "fails (" + outcome.message + "); retried later");
      return postbox::settlement::retry();
    }
    return postbox::settlement::ack();
  }

  postbox::settlement start_saga(const envelope<order_event>& placed) {
    const auto& o = placed.payload;
    tl_.add("fulfillment", tl_.ids(placed), "runs the order saga for " + o.order);
    postbox::saga_start start{.saga_id = o.order, .correlation_id = placed.correlation_id, .causation_id = placed.id};
    const auto done = sagas_.run("order", nlohmann::json(o).dump(), start);
    if (!done) {
      if (done.status() != postbox::errc::conflict) return postbox::settlement::retry();  // the store failed
      tl_.add("fulfillment", tl_.ids(placed), o.order + " has its saga already (the saga id is the order id)");
    }
    if (done->outcome == postbox::saga_outcome::compensated) cancel_order(o, done->failure_reason);
    return postbox::settlement::ack();
  }

  postbox::settlement ship(const envelope<order_event>& e) {
    const auto& o = e.payload;
    const auto outcome = inventory_inbox_.handle(e, [&](sqlite_store::transaction& tx) {
      must(tx.exec("UPDATE reservations SET state = 'shipped' WHERE order_id = ?1 AND state = 'reserved'", o.order), tx,
           "ship reservation");
      must(tx.exec("UPDATE stock SET reserved = reserved - ?2, shipped = shipped + ?2 WHERE sku = ?1", o.sku, o.qty),
           tx, "ship stock");
    });
    return settle("inventory", e, outcome, "ships " + std::to_string(o.qty) + " x " + o.sku + " for " + o.order);
  }

  postbox::settlement capture(const envelope<order_event>& e) {
    const auto& o = e.payload;
    const auto outcome = payment_inbox_.handle(e, [&](sqlite_store::transaction& tx) {
      // Not idempotent by itself (it counts every capture): the inbox makes it so.
      must(tx.exec("UPDATE payments SET state = 'captured', captures = captures + 1 WHERE order_id = ?1", o.order), tx,
           "capture");
    });
    return settle("payment", e, outcome, "captures " + money(o.cents) + " for " + o.order);
  }

  postbox::settlement notify(const envelope<order_event>& e) {
    const auto& o = e.payload;
    std::string text = "\"" + o.order + " received\"";
    if (e.type == "order.confirmed") text = "\"" + o.order + " is on its way\"";
    if (e.type == "order.canceled") text = "\"" + o.order + " canceled: " + o.reason + "\"";
    const auto outcome = notification_inbox_.handle(e, [&](sqlite_store::transaction& tx) {
      must(tx.exec("INSERT INTO emails VALUES (?1, ?2, ?3)", e.id.to_string(), o.order, e.type), tx, "e-mail");
    });
    return settle("notification", e, outcome, "e-mails " + o.customer + ": " + text);
  }

  // -- 5. the saga's steps (actions and compensations are idempotent) --------

  static order_event order_of(postbox::step_context& ctx) {
    return nlohmann::json::parse(ctx.data()).get<order_event>();
  }

  postbox::step_result reserve_stock(postbox::step_context& ctx) {
    const auto o = order_of(ctx);
    auto tx = db_.begin();
    if (tx.query_int64("SELECT COUNT(*) FROM reservations WHERE order_id = ?1", o.order).value_or(0) == 0) {
      if (tx.query_int64("SELECT available FROM stock WHERE sku = ?1", o.sku).value_or(0) < o.qty)
        return postbox::step_result::failure("out of stock");
      must(
          tx.exec("UPDATE stock SET available = available - ?2, reserved = reserved + ?2 WHERE sku = ?1", o.sku, o.qty),
          tx, "reserve");
      must(tx.exec("INSERT INTO reservations VALUES (?1, ?2, ?3, 'reserved')", o.order, o.sku, o.qty), tx, "reserve");
    }
    must(tx.commit(), tx, "commit");
    tl_.add("inventory", "", "reserves " + std::to_string(o.qty) + " x " + o.sku + " for " + o.order);
    return postbox::step_result::success();
  }

  postbox::step_result release_stock(postbox::step_context& ctx) {
    const auto o = order_of(ctx);
    auto tx = db_.begin();
    if (tx.query_int64("SELECT COUNT(*) FROM reservations WHERE order_id = ?1 AND state = 'reserved'", o.order)
            .value_or(0) > 0) {
      must(
          tx.exec("UPDATE stock SET available = available + ?2, reserved = reserved - ?2 WHERE sku = ?1", o.sku, o.qty),
          tx, "release");
      must(tx.exec("UPDATE reservations SET state = 'released' WHERE order_id = ?1", o.order), tx, "release");
    }
    must(tx.commit(), tx, "commit");
    tl_.add("inventory", "",
            "releases the " + std::to_string(o.qty) + " x " + o.sku + " held for " + o.order + " (compensation)");
    return postbox::step_result::success();
  }

  postbox::step_result authorize_card(postbox::step_context& ctx) {
    const auto o = order_of(ctx);
    if (o.card == declined_card) {  // the simulated payment failure
      tl_.add("payment", "", "the bank declines " + o.customer + "'s card for " + money(o.cents));
      return postbox::step_result::failure("card declined");
    }
    auto tx = db_.begin();
    must(tx.exec("INSERT OR IGNORE INTO payments VALUES (?1, ?2, 'authorized', 0)", o.order, o.cents), tx, "authorize");
    must(tx.commit(), tx, "commit");
    tl_.add("payment", "", "authorizes " + money(o.cents) + " on " + o.customer + "'s card");
    return postbox::step_result::success();
  }

  postbox::step_result void_authorization(postbox::step_context& ctx) {
    const auto o = order_of(ctx);
    auto tx = db_.begin();
    must(tx.exec("UPDATE payments SET state = 'voided' WHERE order_id = ?1 AND state = 'authorized'", o.order), tx,
         "void");
    must(tx.commit(), tx, "commit");
    tl_.add("payment", "", "voids the authorization for " + o.order + " (compensation)");
    return postbox::step_result::success();
  }

  postbox::step_result confirm_order(postbox::step_context& ctx) {
    const auto o = order_of(ctx);
    // Caused by the saga's step_started event, in the order's conversation.
    auto confirmed = postbox::caused_by(last_saga_event_.at(ctx.saga_id()), "order.confirmed", o,
                                        postbox::message_kind::event, clock_);
    confirmed.partition_key = o.order;
    confirmed.producer = "orders";
    auto tx = db_.begin();
    must(tx.exec("UPDATE orders SET status = 'confirmed' WHERE id = ?1", o.order), tx, "confirm");
    must(outbox_.stage(tx, confirmed), tx, "stage order.confirmed");
    must(tx.commit(), tx, "commit");
    tl_.add("orders", tl_.ids(confirmed), "confirms " + o.order + " and stages order.confirmed: one transaction");
    return postbox::step_result::success();
  }

  void cancel_order(order_event o, const std::string& reason) {
    o.reason = reason;
    auto canceled =
        postbox::caused_by(last_saga_event_.at(o.order), "order.canceled", o, postbox::message_kind::event, clock_);
    canceled.partition_key = o.order;
    canceled.producer = "orders";
    auto tx = db_.begin();
    must(tx.exec("UPDATE orders SET status = 'canceled', reason = ?2 WHERE id = ?1", o.order, reason), tx, "cancel");
    must(outbox_.stage(tx, canceled), tx, "stage order.canceled");
    must(tx.commit(), tx, "commit");
    tl_.add("orders", tl_.ids(canceled), "cancels " + o.order + " and stages order.canceled: one transaction");
  }

  void on_saga_event(const envelope<postbox::saga_event>& e) {
    last_saga_event_.insert_or_assign(e.payload.saga_id, e);
    const auto& s = e.payload;
    tl_.add("saga", tl_.ids(e),
            e.type + " " + (s.step.empty() ? s.saga_id : s.step) + (s.reason.empty() ? "" : " (" + s.reason + ")"));
  }

  // -- 6. poison, rule violation, fix, redrive ------------------------------

  static postbox::json::decode_result<stock_received> decode_stock(std::string_view bytes) {
    return postbox::json::decode<stock_received>(bytes);
  }

  bool in_catalog(const std::string& sku) {
    auto tx = db_.begin();  // rolled back when it goes: a read
    return tx.query_int64("SELECT COUNT(*) FROM catalog WHERE sku = ?1", sku).value_or(0) > 0;
  }

  postbox::settlement receive_stock(const envelope<stock_received>& e) {
    const auto& s = e.payload;
    if (!in_catalog(s.sku)) {  // the rule
      tl_.add("warehouse", tl_.ids(e), "rejects " + std::to_string(s.qty) + " x " + s.sku + ": not in the catalog");
      return postbox::settlement::reject("unknown sku '" + s.sku + "'");
    }
    const auto outcome = warehouse_inbox_.handle(e, [&](sqlite_store::transaction& tx) {
      must(tx.exec("INSERT INTO stock VALUES (?1, 0, ?2, ?2, 0, 0) ON CONFLICT (sku) DO UPDATE SET "
                   "received = received + ?2, available = available + ?2",
                   s.sku, s.qty),
           tx, "receive stock");
    });
    std::string effect = "receives " + std::to_string(s.qty) + " x " + s.sku;
    if (const auto before = e.headers.get(postbox::header_names::dead_letter_attempts))
      effect += " (redriven; attempts before: " + std::string(*before) + ")";
    return settle("warehouse", e, outcome, effect);
  }

  void on_settle(const postbox::message_event& e) {
    // Acks are printed by the handlers; the observer reports the rest.
    if (e.outcome != postbox::settle_outcome::dead_lettered && e.outcome != postbox::settle_outcome::retried) return;
    const std::string who = e.id.is_nil() ? "(raw bytes, no id)" : tl_.ids(e.id, e.correlation_id, e.causation_id);
    tl_.add(
        "dead-letters", who,
        std::string(postbox::to_string(e.outcome)) + " from " + std::string(e.source) + ": " + std::string(e.reason));
  }

  void warehouse_feed() {
    auto send = [&](std::string bytes) {
      if (warehouse_feed_.try_send(std::move(bytes)) != postbox::send_status::ok) throw std::runtime_error("feed full");
    };
    auto from_warehouse = [&](stock_received s) {
      auto e = postbox::make_envelope(std::move(s), clock_);
      e.producer = "warehouse-system";
      return postbox::json::encode(e);
    };
    const std::string arrivals[] = {
        from_warehouse({"desk", 4}),
        R"({"type":"stock.received","payload":{"sku":"lamp","qty":)",  // cut off mid-write: poison
        from_warehouse({"stool", 6}),                                  // not in the catalog: rejected
    };
    for (const auto& bytes : arrivals) {
      send(bytes);
      (void)warehouse_.poll();
      pause();
    }
  }

  void fix_catalog_and_redrive() {
    for (const auto& d : warehouse_dead_letters_.list()) {
      tl_.add("operator", d.message ? tl_.ids(*d.message) : std::string("(raw bytes, no id)"),
              "inspects dead letter #" + std::to_string(d.id) + ": " + d.reason +
                  (d.message ? "" : ", raw bytes kept: " + d.raw));
    }
    {
      auto tx = db_.begin();
      must(tx.exec("INSERT INTO catalog VALUES ('stool')"), tx, "catalog");
      must(tx.commit(), tx, "commit");
    }
    pause();
    postbox::dead_letter_filter rejected;
    rejected.reason = "unknown sku 'stool'";
    const std::size_t queued = warehouse_dead_letters_.redrive({.filter = rejected});
    tl_.add(
        "operator", "",
        "adds stool to the catalog and redrives " + std::to_string(queued) + " dead letter; the poison message stays");
    (void)warehouse_.poll();
    pause();
  }

  // -- 7. the client reads the result -----------------------------------------

  void clients_read_final_state() {
    for (std::size_t i = 0; i < plan_.size(); ++i) {
      const auto& p = plan_[i];
      const auto op = ops_.get(p.customer, operation_ids_[i]);
      std::string status, reason;
      {
        auto tx = db_.begin();
        status = query_text(tx, "SELECT status FROM orders WHERE id = ?1", p.order);
        reason = query_text(tx, "SELECT reason FROM orders WHERE id = ?1", p.order);
      }
      tl_.add("checkout", "",
              p.customer + " reads " + tl_.operation(operation_ids_[i]) + ": " +
                  std::string(postbox::to_string(op->state)) + ", result " + op->result.value_or("-") +
                  "; the order is " + status + (reason.empty() ? "" : " (" + reason + ")"));
    }
    const auto other = ops_.get("bob", operation_ids_[0]);
    tl_.add("checkout", "",
            "bob reads " + tl_.operation(operation_ids_[0]) + ": " +
                (other ? "visible (wrong!)" : "not_found (owner-scoped)"));
  }

  // -- invariants, metrics, summary ------------------------------------------

  std::vector<std::string> check_invariants() {
    std::vector<std::string> broken;
    auto expect = [&](bool ok, const std::string& what) {
      if (!ok) broken.push_back(what);
    };
    auto tx = db_.begin();
    auto count = [&](const char* sql, const auto&... args) { return tx.query_int64(sql, args...).value_or(-1); };
    for (std::size_t i = 0; i < plan_.size(); ++i) {
      const auto& p = plan_[i];
      const bool declined = p.card == declined_card;
      const auto op = ops_.get(p.customer, operation_ids_[i]);
      expect(op && op->state == postbox::operation_state::succeeded, p.order + ": the operation succeeded");
      const std::string status = query_text(tx, "SELECT status FROM orders WHERE id = ?1", p.order);
      expect(status == (declined ? "canceled" : "confirmed"), p.order + " ends " + status);
      const std::string reservation = query_text(tx, "SELECT state FROM reservations WHERE order_id = ?1", p.order);
      expect(reservation == (declined ? "released" : "shipped"), p.order + ": reservation " + reservation);
      const std::string payment = query_text(tx, "SELECT state FROM payments WHERE order_id = ?1", p.order);
      expect(payment == (declined ? "" : "captured"), p.order + ": payment '" + payment + "'");
      expect(
          count("SELECT COALESCE(SUM(captures), 0) FROM payments WHERE order_id = ?1", p.order) == (declined ? 0 : 1),
          p.order + ": captured once");
    }
    expect(
        count(
            "SELECT COUNT(*) FROM stock WHERE available + reserved + shipped != initial + received OR reserved != 0") ==
            0,
        "stock counts add up and nothing stays reserved");
    expect(count("SELECT COALESCE(SUM(qty), 0) FROM reservations WHERE state = 'shipped'") ==
               count("SELECT SUM(shipped) FROM stock"),
           "every shipped unit belongs to one shipped reservation");
    expect(count("SELECT received FROM stock WHERE sku = ?1", "stool") == 6, "the redriven stool delivery was applied");
    expect(count("SELECT COUNT(*) FROM emails") == count("SELECT COUNT(DISTINCT message_id) FROM emails") &&
               count("SELECT COUNT(*) FROM emails") == 6,
           "one e-mail per order event (3 placed, 3 outcomes)");
    tx.rollback();
    for (std::size_t i = 0; i < plan_.size(); ++i) {
      const auto saga = db_.load(plan_[i].order);
      const bool declined = plan_[i].card == declined_card;
      expect(
          saga && saga->outcome == (declined ? postbox::saga_outcome::compensated : postbox::saga_outcome::completed),
          plan_[i].order + ": saga outcome");
    }
    expect(duplicates_skipped_ >= 1, "the relay's duplicate was skipped by the inboxes");
    const std::uint64_t confirmed = confirmed_count();
    expect(inventory_inbox_.stats().processed == confirmed && payment_inbox_.stats().processed == confirmed &&
               notification_inbox_.stats().processed == plan_.size() * 2 && warehouse_inbox_.stats().processed == 2,
           "each consumer handled each of its events once");
    postbox::dead_letter_filter poison;
    poison.poison = true;
    expect(warehouse_dead_letters_.count(poison) == 1 && warehouse_dead_letters_.size() == 1,
           "only the poison message is left in the dead-letter queue");
    expect(db_.outbox_summary() && db_.outbox_summary()->pending == 0, "the outbox is drained");
    return broken;
  }

  void register_metrics() {
    auto& r = metrics_;
    auto keep = [&](postbox::metrics_registry::registration reg) { registrations_.push_back(std::move(reg)); };
    keep(postbox::register_channel(r, "pricing-requests", price_requests_));
    keep(postbox::register_channel(r, "warehouse-feed", warehouse_feed_));
    keep(postbox::register_topic(r, "orders", orders_topic_));
    keep(postbox::register_outbox_relay(r, "orders-relay", relay_, clock_));
    keep(postbox::register_consumer(r, fulfillment_));
    keep(postbox::register_consumer(r, inventory_));
    keep(postbox::register_consumer(r, payment_));
    keep(postbox::register_consumer(r, notification_));
    keep(postbox::register_consumer(r, warehouse_));
    keep(postbox::register_inbox(r, "inventory", inventory_inbox_));
    keep(postbox::register_inbox(r, "payment", payment_inbox_));
    keep(postbox::register_inbox(r, "notification", notification_inbox_));
    keep(postbox::register_inbox(r, "warehouse", warehouse_inbox_));
    keep(postbox::register_dead_letter_queue(r, order_dead_letters_));
    keep(postbox::register_dead_letter_queue(r, warehouse_dead_letters_));
    keep(postbox::register_store(r, "shop", db_));
    keep(postbox::register_requester(r, "checkout", checkout_));
    keep(postbox::register_responder(r, "pricing", pricing_));
    keep(postbox::register_operations(r, "orders", ops_));
  }

  /// A few totals from the metrics by default; with --metrics the non-zero
  /// series as Prometheus text, with --all-metrics every series.
  void print_metrics() {
    std::vector<postbox::metric_sample> samples = metrics_.collect();
    const std::size_t all = samples.size();
    if (!opt_.all_metrics) {
      std::erase_if(samples, [](const postbox::metric_sample& s) {
        return s.type == postbox::metric_type::histogram || s.value == 0;
      });
    }
    if (opt_.metrics) {
      std::printf("\nmetrics: Prometheus text from one metrics_registry (%zu of %zu series%s)\n", samples.size(),
                  all, opt_.all_metrics ? "" : "; zeros and histograms left out, --all-metrics shows them");
      std::fputs(postbox::render_prometheus(samples).c_str(), stdout);
      return;
    }
    // Each family summed over its components (all of them are counts).
    auto total = [&](std::string_view family) {
      double sum = 0;
      for (const auto& m : samples) sum += m.name == family ? m.value : 0;
      return static_cast<long long>(sum);
    };
    std::printf("\nmetrics: %zu of %zu series from one metrics_registry are non-zero; --metrics prints them\n",
                samples.size(), all);
    std::printf("  topic: %lld published, %lld delivered; consumers: %lld received, %lld acked, %lld dead-lettered\n",
                total("postbox_topic_published_total"), total("postbox_topic_delivered_total"),
                total("postbox_consumer_received_total"), total("postbox_consumer_acked_total"),
                total("postbox_consumer_dead_lettered_total"));
    std::printf("  outbox: %lld published; inboxes: %lld processed, %lld duplicates skipped; store: %lld commits\n",
                total("postbox_outbox_published_total"), total("postbox_inbox_processed_total"),
                total("postbox_inbox_duplicates_total"), total("postbox_store_commits_total"));
    std::printf("  dead-letter queues: %lld added, %lld redriven, %lld left; request-reply: %lld replied\n",
                total("postbox_dead_letter_added_total"), total("postbox_dead_letter_redriven_total"),
                total("postbox_dead_letter_depth"), total("postbox_requester_replied_total"));
  }

  std::size_t confirmed_count() const {
    std::size_t confirmed = 0;
    for (const auto& p : plan_) confirmed += p.card == declined_card ? 0 : 1;
    return confirmed;
  }

  void print_summary(const std::vector<std::string>& broken) {
    const std::size_t confirmed = confirmed_count();
    char text[512];
    std::snprintf(text, sizeof text,
                  "%zu orders: %zu confirmed, %zu canceled with its reservation released; %zu message "
                  "published twice, its copies skipped by %zu inboxes; 1 poison message dead-lettered; "
                  "1 rejected message redriven and applied",
                  plan_.size(), confirmed, plan_.size() - confirmed, republished_, duplicates_skipped_);
    std::printf("\n");
    timeline::print_wrapped("summary: ", text);
    for (const auto& b : broken) std::printf("INVARIANT BROKEN: %s\n", b.c_str());
    std::printf("%s\n", broken.empty() ? "all invariants hold" : "FAILED");
  }

  // -- members, in construction order ----------------------------------------

  options opt_;
  std::vector<order_plan> plan_;
  postbox::manual_clock clock_;
  timeline tl_{clock_, opt_.verbose};
  database_file file_{opt_};
  // One SQLite file holds the shop's tables and postbox's outbox, inbox and saga tables.
  sqlite_store db_{file_.path, store_options()};
  postbox::observer observer_;

  // request-reply
  postbox::timer_service timers_{clock_, postbox::timer_service::manual_drive};  // request timeouts
  postbox::channel<envelope<price_query>> price_requests_{16};
  postbox::endpoint_registry<price_quote> reply_endpoints_;
  postbox::responder<price_query, price_quote> pricing_{
      price_requests_, reply_endpoints_, [this](const envelope<price_query>& q) { return serve_quote(q); }, clock_, 0};
  postbox::requester<price_query, price_quote> checkout_{
      price_requests_, reply_endpoints_, timers_, {.endpoint = "checkout", .producer = "checkout"}};
  std::map<std::size_t, envelope<price_quote>> quotes_;

  // the outbox, the topic and the relay between them
  postbox::outbox<sqlite_store, postbox::json::codec> outbox_{db_, {}, clock_};
  postbox::topic<envelope<order_event>> orders_topic_;
  bool relay_crashes_ = false;
  std::set<postbox::message_id> published_;
  std::size_t republished_ = 0;
  postbox::outbox_relay<sqlite_store> relay_{db_, postbox::to_topic(orders_topic_, postbox::json::codec{}),
                                             make_relay_options(), clock_};

  // the saga
  std::map<std::string, envelope<postbox::saga_event>> last_saga_event_;
  postbox::saga_coordinator<sqlite_store> sagas_{db_, make_saga_options(), clock_};

  // consumers, their inboxes and dead-letter queues
  postbox::inbox<sqlite_store> inventory_inbox_{db_, "inventory", {}, clock_};
  postbox::inbox<sqlite_store> payment_inbox_{db_, "payment", {}, clock_};
  postbox::inbox<sqlite_store> notification_inbox_{db_, "notification", {}, clock_};
  postbox::inbox<sqlite_store> warehouse_inbox_{db_, "warehouse", {}, clock_};
  postbox::dead_letter_queue<order_event> order_dead_letters_{{.name = "order-dead-letters", .capacity = 100}, clock_};
  postbox::dead_letter_queue<stock_received> warehouse_dead_letters_{
      {.name = "warehouse-dead-letters", .capacity = 100, .redrive_rate = 1}, clock_};
  postbox::subscription<envelope<order_event>> fulfillment_queue_ = subscribe("fulfillment", "order.placed");
  postbox::subscription<envelope<order_event>> inventory_queue_ = subscribe("inventory", "order.confirmed");
  postbox::subscription<envelope<order_event>> payment_queue_ = subscribe("payment", "order.confirmed");
  postbox::subscription<envelope<order_event>> notification_queue_ = subscribe("notification", "order.>");
  postbox::channel<std::string> warehouse_feed_{16};
  std::size_t duplicates_skipped_ = 0;
  postbox::consumer<order_event> fulfillment_{
      postbox::subscription_source<order_event>(fulfillment_queue_, "fulfillment"),
      [this](const envelope<order_event>& e) { return start_saga(e); }, order_dead_letters_,
      polled_consumer("fulfillment")};
  postbox::consumer<order_event> inventory_{postbox::subscription_source<order_event>(inventory_queue_, "inventory"),
                                            [this](const envelope<order_event>& e) { return ship(e); },
                                            order_dead_letters_, polled_consumer("inventory")};
  postbox::consumer<order_event> payment_{postbox::subscription_source<order_event>(payment_queue_, "payment"),
                                          [this](const envelope<order_event>& e) { return capture(e); },
                                          order_dead_letters_, polled_consumer("payment")};
  postbox::consumer<order_event> notification_{
      postbox::subscription_source<order_event>(notification_queue_, "notification"),
      [this](const envelope<order_event>& e) { return notify(e); }, order_dead_letters_,
      polled_consumer("notification")};
  postbox::consumer<stock_received> warehouse_{
      postbox::make_raw_source<stock_received>(warehouse_feed_, decode_stock, "warehouse"),
      [this](const envelope<stock_received>& e) { return receive_stock(e); }, warehouse_dead_letters_,
      polled_consumer("warehouse")};

  // operations: one worker, whose work waits until the desk opens, so that
  // every submit prints before any work does (a server would start at once)
  std::promise<void> desk_opens_;
  std::shared_future<void> desk_open_ = desk_opens_.get_future().share();
  bool desk_opened_ = false;
  std::mutex ops_mutex_;
  std::condition_variable ops_done_;
  std::size_t ops_finished_ = 0;  // guarded by ops_mutex_
  std::vector<std::string> operation_ids_;
  postbox::operations<std::string> ops_{clock_, {.workers = 1}};
  std::vector<postbox::operations<std::string>::watch_handle> watches_;

  // metrics: the registrations go first, before the components they read
  postbox::metrics_registry metrics_;
  std::vector<postbox::metrics_registry::registration> registrations_;
};

int main(int argc, char** argv) {
  const auto opt = parse_options(argc, argv);
  if (!opt) return 2;
  try {
    order_pipeline pipeline(*opt);
    return pipeline.run();
  } catch (const std::exception& e) {
    std::printf("order_pipeline failed: %s\n", e.what());
    return 1;
  }
}
