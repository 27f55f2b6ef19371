// A batch consumer: orders are handled four at a time (one database round
// trip per batch, say), or after a 100 ms window when fewer are waiting.
// One settlement per message: an order with a bad quantity is dead-lettered
// while the rest of its batch is acked. A manual clock makes the output exact.
//
//   orders ──> consumer ──batch of <= 4 (or the window)──> handler
//                                  └── reject ──> dead_letter_queue
#include <postbox/postbox.hpp>
#include <postbox/testing.hpp>  // postbox::manual_clock

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

using namespace std::chrono_literals;
struct order { int id = 0; int qty = 0; };

int main() {
  postbox::manual_clock clock;
  postbox::channel<postbox::envelope<order>> orders(64);
  postbox::dead_letter_queue<order> dlq(postbox::dead_letter_options{}, clock);
  postbox::consumer_options opts;
  opts.threads = 0;  // driven by poll(): deterministic
  opts.max_in_flight = 16;  // a batch larger than this is refused: it could never fill
  opts.clock = &clock;

  postbox::consumer c(
      postbox::channel_source<order>(orders, "orders"), postbox::batch_options{.max_size = 4, .window = 100ms},
      [](const postbox::message_batch<order>& batch) {
        std::vector<postbox::settlement> out;
        std::string ids;
        for (const auto& e : batch) {
          ids += " " + std::to_string(e.payload.id);
          out.push_back(e.payload.qty > 0 ? postbox::settlement::ack() : postbox::settlement::reject("bad quantity"));
        }
        std::printf("batch of %zu:%s\n", batch.size(), ids.c_str());
        return out;  // one settlement per message, in batch order
      },
      dlq, opts);

  for (int id = 1; id <= 10; ++id)
    (void)orders.try_send(postbox::make_envelope(std::string("order.placed"), order{id, id == 6 ? 0 : 1},
                                                 postbox::message_kind::event, clock));
  std::printf("poll: %zu handled\n", c.poll());  // two full batches; 9 and 10 wait for the window
  clock.advance(100ms);
  std::printf("after the window: %zu handled\n", c.poll());
  for (const auto& d : dlq.list()) std::printf("dead letter: order %d (%s)\n", d.message->payload.id, d.reason.c_str());
  const auto s = c.stats();
  std::printf("batches=%llu acked=%llu dead_lettered=%llu\n", static_cast<unsigned long long>(s.batches),
              static_cast<unsigned long long>(s.acked), static_cast<unsigned long long>(s.dead_lettered));
  return s.acked == 9 && s.dead_lettered == 1 ? 0 : 1;
}
