// SPDX-License-Identifier: MIT
// async_orders_tcp: "202 Accepted" over TCP on ONE io_context thread, no thread
// per connection. A client (same program, 127.0.0.1, ephemeral port) submits an
// order and gets an operation id, watches it on a second connection, then
// polls it. The work runs through a consumer (its worker feeds coroutine
// handlers on the io_context; the first attempt fails and is retried), and the
// handler commits the order's status and its "order.shipped" event in one
// SQLite transaction; the outbox relay publishes the event to a topic that the
// watching connection awaits.
//
//   client ─POST─▶ session ─▶ channel ─▶ consumer ─▶ awaitable handler ─▶ SQLite tx + outbox
//   client ◀─202── session                                                    │ relay
//   client ─WATCH▶ session ◀── topic "order.*" ◀──────────────────────────────┘
#include <postbox/asio.hpp>  // first: it sets Asio's coroutine switches
#include <postbox/consumer.hpp>
#include <postbox/json.hpp>
#include <postbox/outbox.hpp>
#include <postbox/postbox.hpp>
#include <postbox/sqlite.hpp>

#include <asio/buffer.hpp>
#include <asio/co_spawn.hpp>
#include <asio/connect.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <chrono>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>

using asio::ip::tcp;
using namespace std::chrono_literals;

struct order { std::string id; std::string item; };
struct order_shipped {
  static constexpr const char* message_type = "order.shipped";
  std::string id;
  unsigned attempts = 0;
};
void to_json(nlohmann::json& j, const order_shipped& o) { j = {{"id", o.id}, {"attempts", o.attempts}}; }
void from_json(const nlohmann::json& j, order_shipped& o) {
  j.at("id").get_to(o.id);
  j.at("attempts").get_to(o.attempts);
}

struct app {
  asio::io_context io{1};
  postbox::executor_scheduler<asio::io_context::executor_type> sched{io.get_executor()};
  postbox::sqlite_store db{":memory:"};
  postbox::outbox<postbox::sqlite_store, postbox::json::codec> out{db, postbox::json::codec{}};
  postbox::topic<postbox::envelope<order_shipped>> shipped;
  postbox::outbox_relay<postbox::sqlite_store> relay{db, postbox::to_topic(shipped, postbox::json::codec{})};
  postbox::channel<postbox::envelope<order>> orders{64};
  postbox::dead_letter_queue<order> dead{postbox::dead_letter_options{}};
  std::map<std::string, std::string> status;  // io thread only
  int next_id = 0;

  // The consumer's handler: an asio::awaitable on the io_context.
  asio::awaitable<postbox::settlement> ship(const postbox::envelope<order>& e, postbox::consume_context& ctx) {
    if (ctx.attempt() == 1) throw std::runtime_error("warehouse busy");  // transient: retried
    auto tx = db.begin();
    (void)tx.exec("UPDATE orders SET state = 'shipped' WHERE id = ?1", e.payload.id);
    if (out.stage(tx, postbox::make_envelope(order_shipped{e.payload.id, ctx.attempt()})) != postbox::errc::ok ||
        tx.commit() != postbox::errc::ok)
      co_return postbox::settlement::retry();
    status[e.payload.id] = "shipped after " + std::to_string(ctx.attempt()) + " attempts";
    (void)relay.drain();  // publishes the committed event to `shipped`
    co_return postbox::settlement::ack();
  }

  std::string handle(const std::string& line) {
    if (line.rfind("POST /orders ", 0) == 0) {
      const std::string id = "op-" + std::to_string(++next_id);
      auto tx = db.begin();
      (void)tx.exec("INSERT INTO orders VALUES (?1, ?2, 'accepted')", id, line.substr(13));
      if (tx.commit() != postbox::errc::ok) return "503 Unavailable";
      status[id] = "accepted";
      auto e = postbox::make_envelope(std::string("order"), order{id, line.substr(13)},
                                      postbox::message_kind::command);
      if (orders.try_send(std::move(e)) != postbox::send_status::ok) return "503 Busy";
      return "202 Accepted /operations/" + id;
    }
    if (line.rfind("GET /operations/", 0) == 0) {
      const auto it = status.find(line.substr(16));
      return it == status.end() ? "404 Not Found" : "200 " + it->second;
    }
    return "400 Bad Request";
  }

  // One connection: a coroutine, not a thread. "WATCH <id>" answers when the
  // order's "order.shipped" event arrives through the outbox and the topic.
  asio::awaitable<void> session(tcp::socket socket) {
    std::string buf;
    for (;;) {
      asio::error_code ec;
      const std::size_t n = co_await asio::async_read_until(socket, asio::dynamic_buffer(buf), '\n',
                                                            asio::redirect_error(asio::use_awaitable, ec));
      if (ec) co_return;
      const std::string line = buf.substr(0, n - 1);
      buf.erase(0, n);
      std::string reply;
      if (line.rfind("WATCH /operations/", 0) == 0) {
        const std::string id = line.substr(18);
        auto sub = shipped.subscribe("order.*");  // before the check: nothing is missed
        while (reply.empty()) {
          const auto it = status.find(id);
          if (it == status.end()) {
            reply = "404 Not Found";
          } else if (it->second != "accepted") {
            reply = "200 " + it->second;  // shipped before the watch came
          } else {
            auto d = co_await postbox::async_receive(sub, asio::use_awaitable);  // suspends, no thread
            if (!d.has_value()) reply = "503 Unavailable";
            else if ((*d)->payload.id == id)
              reply = "200 shipped after " + std::to_string((*d)->payload.attempts) + " attempts";
          }
        }
      } else {
        reply = handle(line);
      }
      reply += '\n';
      co_await asio::async_write(socket, asio::buffer(reply), asio::use_awaitable);
    }
  }

  asio::awaitable<void> serve(tcp::acceptor& acceptor) {
    for (;;) {
      asio::error_code ec;
      tcp::socket socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) co_return;  // closed by the client below
      asio::co_spawn(io, session(std::move(socket)), asio::detached);
    }
  }
};

asio::awaitable<std::string> ask(tcp::socket& s, std::string request) {
  std::printf("> %s\n", request.c_str());
  request += '\n';
  co_await asio::async_write(s, asio::buffer(request), asio::use_awaitable);
  std::string buf;
  const std::size_t n = co_await asio::async_read_until(s, asio::dynamic_buffer(buf), '\n', asio::use_awaitable);
  buf.resize(n - 1);
  std::printf("< %s\n", buf.c_str());
  co_return buf;
}

asio::awaitable<void> client(app& a, tcp::acceptor& acceptor) {
  const tcp::endpoint server = acceptor.local_endpoint();
  tcp::socket api(a.io), watch(a.io);
  co_await api.async_connect(server, asio::use_awaitable);
  co_await watch.async_connect(server, asio::use_awaitable);
  const std::string accepted = co_await ask(api, "POST /orders blue-widget");
  const std::string op = accepted.substr(accepted.rfind('/') + 1);
  (void)co_await ask(watch, "WATCH /operations/" + op);
  (void)co_await ask(api, "GET /operations/" + op);
  (void)co_await ask(api, "GET /operations/op-99");
  acceptor.close();
}

int main() {
  app a;
  {
    auto tx = a.db.begin();
    (void)tx.exec("CREATE TABLE orders (id TEXT PRIMARY KEY, item TEXT NOT NULL, state TEXT NOT NULL)");
    (void)tx.commit();
  }
  postbox::consumer_options opts;
  opts.threads = 1;          // takes messages and runs retries; handlers run on the io_context
  opts.scheduler = a.sched;  // where the coroutine handlers resume
  opts.retry.initial_backoff = 1ms;
  opts.retry.max_attempts = 3;
  postbox::consumer c(postbox::channel_source<order>(a.orders, "orders"),
                      postbox::awaitable_handler(a.io.get_executor(),
                                                 [&](const postbox::envelope<order>& e, postbox::consume_context& ctx) {
                                                   return a.ship(e, ctx);
                                                 }),
                      a.dead, opts);
  tcp::acceptor acceptor(a.io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  asio::co_spawn(a.io, a.serve(acceptor), asio::detached);
  asio::co_spawn(a.io, client(a, acceptor), asio::detached);
  a.io.run();  // one thread serves every connection
  c.shutdown(5s);
  const auto s = c.stats();
  std::printf("consumer: acked %llu, retried %llu; events pending %llu\n", static_cast<unsigned long long>(s.acked),
              static_cast<unsigned long long>(s.retried), static_cast<unsigned long long>(a.relay.stats().pending));
  return s.acked == 1 ? 0 : 1;
}
