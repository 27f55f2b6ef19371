// SPDX-License-Identifier: MIT
// Allocation contracts: what a request-reply round trip, an envelope copy and a failed header insert allocate.
//
// This file is its own test executable: counting_new.hpp replaces the global
// operator new to count this thread's allocations (and to fail one on
// request), which would disturb other test files.
#include <postbox/consumer.hpp>
#include <postbox/detail/block_pool.hpp>
#include <postbox/envelope.hpp>
#include <postbox/request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "counting_new.hpp"

#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

using counting_new::allocations;
using counting_new::fail_at;

using namespace std::chrono_literals;

namespace {

struct rig {
  postbox::testing::harness h;
  postbox::manual_clock& clock = h.get_clock();
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
  // The table remembers the last 4 x max_pending finished ids (late replies
  // are told from unknown ones), in a ring that grows to that size.
  postbox::requester<int, int> req{requests, registry, h.timers(), {.max_pending = 16}};
  postbox::responder<int, int> resp{requests, registry, [](const postbox::envelope<int>& e) { return e.payload * 2; },
                                    clock, 0};
};

/// Round trips after which the table's slots, its timer and its ring of
/// finished ids (4 x 16) have grown to their steady size.
constexpr int warm_up = 100;

/// The allocations this thread makes in round trips 1..100, after warm_up
/// round trips of 0.
template <class RoundTrip>
std::size_t allocations_in_100(const RoundTrip& round_trip) {
  for (int i = 0; i < warm_up; ++i) round_trip(0);
  const std::size_t before = allocations;
  for (int i = 1; i <= 100; ++i) round_trip(i);
  return allocations - before;
}

}  // namespace

// The first round trips grow the table (slots, finished-id ring) and arm its
// timer; after them, a round trip (request, the responder's poll, the callback) allocates
// nothing: the request shares the requester's reply-to header, and the
// names involved (empty type, empty producer, "rr." + 12 hex digits) fit
// std::string's inline buffer.
TEST_CASE("a callback request-reply round trip allocates nothing once the table has grown", "[allocation]") {
  rig r;
  int sum = 0;
  const auto round_trip = [&](int i) {
    REQUIRE(r.req.request(i, 10s, [&sum](postbox::reply_outcome<int> o) { sum += o.ok() ? o.reply->payload : -1000; }) ==
            postbox::errc::ok);
    REQUIRE(r.resp.poll() == 1);
  };
  CHECK(allocations_in_100(round_trip) == 0);
  CHECK(sum == 2 * (100 * 101 / 2));
}

// The future's state comes from a pool of blocks (detail::block_pool) that
// the warm-up's states, dropped on this thread, have filled.
TEST_CASE("a future request-reply round trip allocates nothing once the table has grown", "[allocation]") {
  rig r;
  int sum = 0;
  const auto round_trip = [&](int i) {
    auto f = r.req.request(i, 10s);
    REQUIRE(f.has_value());
    REQUIRE(r.resp.poll() == 1);
    sum += f->value().reply->payload;
  };
  CHECK(allocations_in_100(round_trip) == 0);
  CHECK(sum == 2 * (100 * 101 / 2));
}

// A burst of blocks alive at once, all freed: the pool keeps about
// max_shared of them for later allocations and gives the rest back, so the
// next burst allocates again for all but those. (A size no other pool of
// this executable uses, so the pool starts empty.)
// A consumer's poll() over a channel: once its first poll has sized what it
// keeps, polling more messages that its handler acks allocates nothing (they
// run straight from the channel, in runs of up to 16). A retry does
// allocate (its failure record, its timer), and so does a partition key's
// entry in the key table while one of its messages is in flight.
TEST_CASE("polling a consumer over a channel allocates nothing for messages acked once it has run its first",
          "[allocation]") {
  postbox::testing::harness h;
  postbox::channel<postbox::envelope<int>> ch{256};
  postbox::dead_letter_queue<int> dlq{postbox::dead_letter_options{}, h.get_clock()};
  std::uint64_t sum = 0;
  postbox::consumer_options o;
  o.threads = 0;
  o.clock = &h.get_clock();
  o.jitter_seed = 1;
  postbox::consumer c(postbox::channel_source<int>(ch, "numbers"),
                      [&](const postbox::envelope<int>& e) { sum += static_cast<std::uint64_t>(e.payload); }, dlq, o);
  const auto fill = [&](int from) {
    for (int i = from; i < from + 100; ++i)
      REQUIRE(ch.try_send(postbox::make_envelope(std::string("t"), i, postbox::message_kind::event, h.get_clock())) ==
              postbox::send_status::ok);
  };
  fill(0);
  REQUIRE(c.poll() == 100);
  fill(100);
  const std::size_t before = allocations;
  CHECK(c.poll() == 100);
  CHECK(allocations - before == 0);
  CHECK(sum == 199 * 200 / 2);
}

TEST_CASE("a block pool keeps about max_shared freed blocks of a size and frees the rest", "[allocation]") {
  using pool = postbox::detail::block_pool<3000, 8>;
  constexpr std::size_t burst = 3 * pool::max_shared;
  std::vector<void*> blocks(burst);
  const auto allocate_burst = [&] {
    const std::size_t before = allocations;
    for (auto& b : blocks) b = pool::allocate();
    return allocations - before;
  };
  CHECK(allocate_burst() >= burst);  // every block (and, once, the pool's shared stack)
  for (void* b : blocks) pool::release(b);
  const std::size_t recycled = burst - allocate_burst();
  CHECK(recycled >= pool::max_shared);
  CHECK(recycled < pool::max_shared + pool::batch);  // the last, unpushed chain adds fewer than a batch
  for (void* b : blocks) pool::release(b);
}

TEST_CASE("copying an envelope with headers allocates nothing for the headers", "[allocation]") {
  postbox::envelope<int> original = postbox::make_envelope(7);
  original.headers.set("reply-to", "rr.0123456789ab");
  original.headers.set("tenant-hint", "eu");
  const std::size_t before = allocations;
  const postbox::envelope<int> copy = original;  // every string here fits std::string's inline buffer
  CHECK(allocations - before == 0);
  CHECK(copy.headers == original.headers);
}

// A full block (4 entries), of its own or shared with a copy: inserting a
// fifth key makes the new entry's two strings and a new block. Whichever of
// those three allocations fails, both maps are as they were.
TEST_CASE("a header insert whose allocation fails leaves the map and its copies unchanged", "[allocation]") {
  const std::size_t failing = GENERATE(1, 2, 3);
  const std::string long_value(40, 'v');  // beyond the inline buffer: its copy allocates
  postbox::header_map map{{"a", "1"}, {"b", "2"}, {"c", "3"}, {"d", "4"}};
  const postbox::header_map snapshot{{"a", "1"}, {"b", "2"}, {"c", "3"}, {"d", "4"}};  // a block of its own
  const bool shared = GENERATE(false, true);
  postbox::header_map copy;
  if (shared) copy = map;
  const std::string long_key(40, 'k');
  fail_at = allocations + failing;
  CHECK_THROWS_AS(map.set(long_key, long_value), std::bad_alloc);
  fail_at = 0;
  CHECK(map == snapshot);
  CHECK_FALSE(map.contains(long_key));
  map.set(long_key, long_value);  // and the map still works
  CHECK(map.get(long_key) == long_value);
  CHECK(map.size() == 5);
  if (shared) CHECK(copy == snapshot);
}
