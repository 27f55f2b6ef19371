// SPDX-License-Identifier: MIT
// outbox: each order row and its "order.placed" event commit in one SQLite
// transaction; a relay publishes the committed events to a topic, in order per
// customer. A transaction that rolls back (a declined card) leaves neither.
//
//   BEGIN ─ INSERT orders ─ outbox.stage(event) ─ COMMIT ──▶ relay ──▶ topic "order.*"
//                                                  (lease, publish, mark dispatched)
#include <postbox/postbox.hpp>
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/sqlite.hpp>

#include <cstdio>
#include <filesystem>
#include <string>

struct order_placed {
  static constexpr const char* message_type = "order.placed";
  std::string order;
  long long cents = 0;
};
void to_json(nlohmann::json& j, const order_placed& o) { j = {{"order", o.order}, {"cents", o.cents}}; }
void from_json(const nlohmann::json& j, order_placed& o) {
  j.at("order").get_to(o.order);
  j.at("cents").get_to(o.cents);
}

int main() {
  const auto path = std::filesystem::temp_directory_path() / "postbox_example_outbox.db";
  auto clean = [&] { for (const char* s : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + s); };
  clean();
  {
    postbox::sqlite_store db(path.string());  // WAL, synchronous=FULL
    auto setup = db.begin();
    (void)setup.exec("CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, cents INTEGER NOT NULL)");
    (void)setup.commit();

    postbox::outbox out(db, postbox::json::codec{});
    auto place = [&](const std::string& id, const std::string& customer, long long cents, bool card_ok) {
      auto tx = db.begin();  // BEGIN IMMEDIATE; rolls back if not committed
      (void)tx.exec("INSERT INTO orders VALUES (?1, ?2, ?3)", id, customer, cents);
      auto event = postbox::make_envelope(order_placed{id, cents});
      event.partition_key = customer;  // one customer's events are published in order
      if (out.stage(tx, event) != postbox::errc::ok || !card_ok) return;  // ~transaction: neither row stays
      if (tx.commit() != postbox::errc::ok) std::printf("commit failed: %s\n", tx.last_error().c_str());
    };

    postbox::topic<postbox::envelope<order_placed>> topic;
    auto subscriber = topic.subscribe("order.*");
    postbox::outbox_relay relay(db, postbox::to_topic(topic, postbox::json::codec{}));

    place("o-1", "ada", 1250, true);
    place("o-2", "bob", 990, false);  // declined: rolled back
    place("o-3", "ada", 400, true);
    std::printf("relayed %zu events\n", relay.drain());  // or relay.start(): wakes on each commit

    while (auto d = subscriber.try_receive()) {
      std::printf("%s  customer %s  order %s  %lld cents\n", d->subject().c_str(), (*d)->partition_key.c_str(),
                  (*d)->payload.order.c_str(), (*d)->payload.cents);
    }
    long long orders = 0;
    {
      auto tx = db.begin();
      orders = tx.query_int64("SELECT COUNT(*) FROM orders").value_or(-1);
    }
    const auto stats = relay.stats();  // stuck rows, oldest pending age, outbox dead letters
    std::printf("orders stored: %lld, events pending: %llu, dead letters: %llu\n", orders,
                static_cast<unsigned long long>(stats.pending), static_cast<unsigned long long>(stats.dead_letters));
  }
  clean();
  return 0;
}
