// SPDX-License-Identifier: MIT
// Specification tests for postbox::requester, responder, endpoint_registry and scatter-gather.
#include <postbox/request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include "envelope_checks.hpp"
#include "support.hpp"

#include <atomic>
#include <functional>
#include <stdexcept>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

// Requesters time out on the harness timers: `h.advance(d)` moves the clock
// and fires each timeout at its own time; `clock.advance` alone moves time
// and fires nothing (a responder sees the deadline first).
struct rig {
  postbox::testing::harness h;
  postbox::manual_clock& clock = h.get_clock();
  postbox::timer_service& timers = h.timers();
  postbox::channel<postbox::envelope<int>> requests{64};
  postbox::endpoint_registry<int> registry;
};

int twice(const postbox::envelope<int>& e) { return e.payload * 2; }

}  // namespace

TEST_CASE("a request is answered with the reply carrying correlation and causation", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto f = req.request(21, 5s);
  REQUIRE(f.has_value());
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  CHECK(sent->kind == postbox::message_kind::query);
  CHECK(sent->headers.get(postbox::header_names::reply_to) == std::optional<std::string_view>(req.endpoint()));
  REQUIRE(sent->deadline.has_value());
  CHECK(*sent->deadline == r.clock.now() + 5s);
  REQUIRE(r.requests.try_send(postbox::envelope<int>(*sent)) == postbox::send_status::ok);
  CHECK_FALSE(f->ready());
  CHECK(resp.poll() == 1);
  REQUIRE(f->ready());
  auto o = f->get();
  REQUIRE(o.ok());
  CHECK(o.reply->payload == 42);
  CHECK(o.reply->kind == postbox::message_kind::reply);
  CHECK(o.reply->correlation_id == sent->correlation_id);
  CHECK(o.reply->causation_id == sent->id);
  CHECK(req.stats().pending == 0);
}

TEST_CASE("a reply reaches the requester's future with every field its responder set", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.request(21, 5s);
  REQUIRE(f.has_value());
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  r.clock.advance(1s);
  auto reply = postbox::reply_to(*sent, "quote.priced", 42, r.clock);
  reply.schema_version = 3;
  reply.producer = "pricing-service-eu-1";  // longer than std::string's inline buffer
  reply.partition_key = "order-1";
  reply.tenant = "acme";
  reply.trace = *postbox::trace_context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "a=1");
  reply.attempt = 2;
  reply.headers.set("served-by", "node-7");
  const postbox::envelope<int> expected = reply;
  REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, std::move(reply)}) == postbox::errc::ok);
  auto o = f->get();
  REQUIRE(o.ok());
  CHECK(expected.causation_id == sent->id);
  postbox_test::check_every_field(*o.reply, expected);
}

TEST_CASE("request and reply are stamped from the clock when each is made, the reply after its handler ran",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  const postbox::time_point asked = r.clock.now();
  postbox::responder<int, int> resp(
      r.requests, r.registry,
      [&](const postbox::envelope<int>& e) {
        r.clock.advance(3s);  // a slow handler
        return e.payload + 1;
      },
      r.clock, 0);
  auto f = req.request(1, 10s);
  REQUIRE(f.has_value());
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  CHECK(sent->occurred_at == asked);
  CHECK(sent->type == postbox::message_traits<int>::type_name());
  CHECK(sent->schema_version == postbox::message_traits<int>::schema_version());
  CHECK(sent->causation_id.is_nil());
  REQUIRE(r.requests.try_send(postbox::envelope<int>(*sent)) == postbox::send_status::ok);
  CHECK(resp.poll() == 1);
  auto o = f->get();
  REQUIRE(o.ok());
  CHECK(o.reply->occurred_at == asked + 3s);
  CHECK(o.reply->id > sent->id);
  CHECK(o.reply->deadline == sent->deadline);
  CHECK(o.reply->type == postbox::message_traits<int>::type_name());
}

TEST_CASE("a request nobody answers completes with timeout from the clock", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.request(1, 2s);
  REQUIRE(f.has_value());
  CHECK(r.h.next_due() == r.clock.now() + 2s);  // the deadline's timer
  r.h.advance(1999ms);
  CHECK_FALSE(f->ready());
  r.h.advance(1ms);
  REQUIRE(f->ready());
  CHECK(f->get().status == postbox::errc::timeout);
  CHECK(req.stats().timed_out == 1);
}

TEST_CASE("a callback request times out exactly at its deadline and a refused one is never called", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> small(1);
  postbox::requester<int, int> req(small, r.registry, r.timers);
  int timed_out = 0, refused_calls = 0;
  REQUIRE(req.request(1, 2s, [&](postbox::reply_outcome<int> o) {
    timed_out += o.status == postbox::errc::timeout ? 1 : 100;
  }) == postbox::errc::ok);
  CHECK(r.h.next_due() == r.clock.now() + 2s);  // tracked when it was opened
  REQUIRE(req.request(2, 1s, [&](postbox::reply_outcome<int>) { ++refused_calls; }) == postbox::errc::full);
  r.h.advance(1999ms);
  CHECK(timed_out == 0);
  r.h.advance(1ms);
  CHECK(timed_out == 1);
  r.h.advance(10s);
  CHECK(timed_out == 1);
  CHECK(refused_calls == 0);
  const auto st = req.stats();
  CHECK(st.sent == 1);
  CHECK(st.refused == 1);
  CHECK(st.timed_out == 1);
  CHECK(st.pending == 0);
}

TEST_CASE("a reply after the timeout is dropped and counted as late", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  int calls = 0;
  REQUIRE(req.request(1, 1s, [&](postbox::reply_outcome<int> o) {
    ++calls;
    CHECK(o.status == postbox::errc::timeout);
  }) == postbox::errc::ok);
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  r.h.advance(1s);
  CHECK(calls == 1);
  // The responder answers anyway (as if it had started before the deadline).
  REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, postbox::reply_to(*sent, 2, r.clock)}) ==
          postbox::errc::ok);
  CHECK(calls == 1);
  CHECK(req.stats().late_replies == 1);
}

TEST_CASE("a duplicate reply is dropped and counted and never delivered twice", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  int calls = 0;
  REQUIRE(req.request(1, 1s, [&](postbox::reply_outcome<int>) { ++calls; }) == postbox::errc::ok);
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  for (int i = 0; i < 3; ++i)
    REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, postbox::reply_to(*sent, 2, r.clock)}) ==
            postbox::errc::ok);
  CHECK(calls == 1);
  CHECK(req.stats().duplicate_replies == 2);
  r.h.advance(2s);
  CHECK(calls == 1);
}

TEST_CASE("destroying a requester completes its pending requests with canceled", "[request_reply]") {
  rig r;
  std::vector<postbox::reply_future<postbox::reply_outcome<int>>> fs;
  {
    postbox::requester<int, int> req(r.requests, r.registry, r.timers);
    for (int i = 0; i < 3; ++i) fs.push_back(*req.request(i, 1s));
    CHECK_FALSE(fs[0].ready());
  }
  for (auto& f : fs) {
    REQUIRE(f.ready());
    CHECK(f.get().status == postbox::errc::canceled);
  }
  CHECK(r.h.advance(2s) == 0);
}

TEST_CASE("a requester at its pending limit refuses with busy", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 2});
  REQUIRE(req.request(1, 1s).has_value());
  REQUIRE(req.request(2, 1s).has_value());
  auto third = req.request(3, 1s);
  CHECK(third.status() == postbox::errc::busy);
  CHECK(req.stats().refused == 1);
  r.h.advance(1s);
  CHECK(req.request(4, 1s).has_value());
}

TEST_CASE("a request to a closed channel is refused with closed", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  r.requests.close();
  CHECK(req.request(1, 1s).status() == postbox::errc::closed);
  CHECK(req.stats().pending == 0);
}

TEST_CASE("a request to a full channel is refused with full and leaves the queued requests as they were",
          "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> small(1);
  postbox::requester<int, int> req(small, r.registry, r.timers);
  auto first = req.request(1, 1s);
  REQUIRE(first.has_value());
  bool called = false;
  CHECK(req.request(2, 1s, [&](postbox::reply_outcome<int>) { called = true; }) == postbox::errc::full);
  CHECK(req.request(3, 1s).status() == postbox::errc::full);
  const auto s = req.stats();
  CHECK(s.refused == 2);
  CHECK(s.pending == 1);
  CHECK(s.sent == 1);
  auto queued = small.try_receive();
  REQUIRE(queued.has_value());
  CHECK(queued->payload == 1);
  CHECK(queued->correlation_id == queued->id);
  CHECK_FALSE(small.try_receive().has_value());
  CHECK_FALSE(called);
}


TEST_CASE("a handler exception becomes an error reply with its code", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(
      r.requests, r.registry,
      [](const postbox::envelope<int>& e) -> int {
        if (e.payload < 0) throw postbox::error(postbox::errc::invalid_argument, "negative");
        throw std::runtime_error("boom");
      },
      r.clock, 0);
  auto a = req.request(-1, 1s);
  auto b = req.request(1, 1s);
  CHECK(resp.poll() == 2);
  auto oa = a->get();
  CHECK(oa.status == postbox::errc::invalid_argument);
  REQUIRE(oa.error.has_value());
  CHECK(oa.error->message == "negative");
  auto ob = b->get();
  CHECK(ob.status == postbox::errc::handler_error);
  CHECK(ob.error->message == "boom");
  CHECK(resp.stats().failed == 2);
}

TEST_CASE("an expired request is not started and is answered expired", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  int handled = 0;
  postbox::responder<int, int> resp(
      r.requests, r.registry, [&](const postbox::envelope<int>& e) { ++handled; return e.payload; }, r.clock, 0);
  auto f = req.request(1, 1s);
  r.clock.advance(1001ms);  // timer not yet run: the responder sees it first
  CHECK(resp.poll() == 1);
  CHECK(handled == 0);
  CHECK(resp.stats().expired == 1);
  CHECK(f->get().status == postbox::errc::expired);
}

TEST_CASE("a reply to an unknown endpoint is counted unroutable", "[request_reply]") {
  rig r;
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto e = postbox::make_envelope(std::string("n"), 1, postbox::message_kind::query, r.clock);
  e.headers.set(std::string(postbox::header_names::reply_to), "nobody");
  REQUIRE(r.requests.try_send(std::move(e)) == postbox::send_status::ok);
  CHECK(resp.poll() == 1);
  CHECK(resp.stats().unroutable == 1);
}

TEST_CASE("two requesters cannot register the same endpoint name", "[request_reply]") {
  rig r;
  postbox::requester<int, int> a(r.requests, r.registry, r.timers, {.endpoint = "svc"});
  CHECK_THROWS_AS((postbox::requester<int, int>(r.requests, r.registry, r.timers, {.endpoint = "svc"})),
                  postbox::error);
}

// The requester makes its reply-to header once; each request's header_map
// shares it (no allocation per request), so two requests' headers begin at
// the same address.
TEST_CASE("a requester's requests share one reply-to header", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto first_future = req.request(1, 1s);
  REQUIRE(req.request(2, 1s, [](postbox::reply_outcome<int>) {}) == postbox::errc::ok);
  REQUIRE(first_future.has_value());
  auto first = r.requests.try_receive();
  auto second = r.requests.try_receive();
  REQUIRE(first.has_value());
  REQUIRE(second.has_value());
  CHECK(first->headers.get(postbox::header_names::reply_to) == req.endpoint());
  CHECK(first->headers.begin() == second->headers.begin());
}

TEST_CASE("generated reply endpoint names are short, distinct and registered", "[request_reply]") {
  rig r;
  postbox::requester<int, int> a(r.requests, r.registry, r.timers);
  postbox::requester<int, int> b(r.requests, r.registry, r.timers);
  for (const std::string& name : {a.endpoint(), b.endpoint()}) {
    CHECK(name.size() == 15);  // "rr." and 12 hex digits
    CHECK(name.rfind("rr.", 0) == 0);
    CHECK(name.find_first_not_of("0123456789abcdef", 3) == std::string::npos);
    CHECK(r.registry.contains(name));
  }
  CHECK(a.endpoint() != b.endpoint());
  auto f = a.request(4, 1s);
  REQUIRE(f.has_value());
  auto req = r.requests.try_receive();
  REQUIRE(req.has_value());
  CHECK(req->headers.get(postbox::header_names::reply_to) == std::optional<std::string_view>(a.endpoint()));
}

TEST_CASE("scatter-gather completes once the wanted count of replies arrived", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> c1(8), c2(8), c3(8);
  postbox::responder<int, int> s1(c1, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 1; }, r.clock, 0);
  postbox::responder<int, int> s2(c2, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 2; }, r.clock, 0);
  postbox::responder<int, int> s3(c3, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 3; }, r.clock, 0);
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.gather({&c1, &c2, &c3}, 10, 2, 1s);
  REQUIRE(f.has_value());
  s1.poll();
  CHECK_FALSE(f->ready());
  s3.poll();
  REQUIRE(f->ready());
  auto o = f->get();
  CHECK(o.status == postbox::errc::ok);
  REQUIRE(o.replies.size() == 2);
  CHECK(o.replies[0].payload + o.replies[1].payload == 24);
  s2.poll();  // the third reply comes after completion
  CHECK(req.stats().duplicate_replies == 1);
}

TEST_CASE("a recycled pending entry carries nothing over from a finished request of any form",
          "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> c1(8), c2(8), c3(8);
  postbox::responder<int, int> s1(c1, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 1; }, r.clock, 0);
  postbox::responder<int, int> s2(c2, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 2; }, r.clock, 0);
  postbox::responder<int, int> s3(c3, r.registry, [](const postbox::envelope<int>& e) { return e.payload + 3; }, r.clock, 0);
  postbox::responder<int, int> direct(r.requests, r.registry, twice, r.clock, 0);
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  // One request at a time: each reuses the map node the one before left.
  auto g1 = req.gather({&c1, &c2, &c3}, 10, 2, 1s);
  REQUIRE(g1.has_value());
  s1.poll();
  s2.poll();
  REQUIRE(g1->ready());
  CHECK(g1->get().replies.size() == 2);
  s3.poll();  // after completion: a duplicate
  auto f1 = req.request(5, 1s);
  REQUIRE(f1.has_value());
  CHECK(direct.poll() == 1);
  REQUIRE(f1->ready());
  CHECK(f1->get().reply->payload == 10);
  int calls = 0;
  REQUIRE(req.request(7, 1s, [&](postbox::reply_outcome<int> o) { calls += o.ok() && o.reply->payload == 14 ? 1 : 100; }) ==
          postbox::errc::ok);
  CHECK(direct.poll() == 1);
  CHECK(calls == 1);
  auto g2 = req.gather({&c1, &c2, &c3}, 20, 3, 1s);  // wants 3, not the 2 of the first gather
  REQUIRE(g2.has_value());
  s1.poll();
  s2.poll();
  CHECK_FALSE(g2->ready());
  s3.poll();
  REQUIRE(g2->ready());
  auto o = g2->get();
  REQUIRE(o.replies.size() == 3);  // none left over from the first gather
  CHECK(o.replies[0].payload + o.replies[1].payload + o.replies[2].payload == 66);
  auto f2 = req.request(8, 1s);
  REQUIRE(f2.has_value());
  CHECK(direct.poll() == 1);
  REQUIRE(f2->ready());
  CHECK(f2->get().reply->payload == 16);
  CHECK(calls == 1);  // the callback form's callback did not stay behind
  const auto st = req.stats();
  CHECK(st.pending == 0);
  CHECK(st.duplicate_replies == 1);
  CHECK(st.unmatched_replies == 0);
}

TEST_CASE("scatter-gather returns what it has at the deadline", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> c1(8), c2(8);
  postbox::responder<int, int> s1(c1, r.registry, twice, r.clock, 0);
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.gather({&c1, &c2}, 5, 2, 1s);
  s1.poll();
  r.h.advance(1s);
  auto o = f->get();
  CHECK(o.status == postbox::errc::timeout);
  REQUIRE(o.replies.size() == 1);
  CHECK(o.replies[0].payload == 10);
}

TEST_CASE("a threaded responder answers requests until it is destroyed", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 2);
  auto f = req.request(4, 10s);
  auto o = f->get();
  REQUIRE(o.ok());
  CHECK(o.reply->payload == 8);
}

TEST_CASE("requester and responder counters render as Prometheus text", "[request_reply][metrics]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::metrics_registry metrics;
  auto a = postbox::register_requester(metrics, "shop", req);
  auto b = postbox::register_responder(metrics, "prices", resp);
  auto f = req.request(1, 5s);
  REQUIRE(f.has_value());
  CHECK(resp.poll() == 1);
  const std::string text = metrics.render_prometheus();
  CHECK_THAT(text, Catch::Contains("postbox_requester_sent_total{component=\"requester\",name=\"shop\"} 1"));
  CHECK_THAT(text, Catch::Contains("postbox_requester_replied_total{component=\"requester\",name=\"shop\"} 1"));
  CHECK_THAT(text, Catch::Contains("postbox_requester_pending{component=\"requester\",name=\"shop\"} 0"));
  CHECK_THAT(text, Catch::Contains("postbox_responder_handled_total{component=\"responder\",name=\"prices\"} 1"));
}

TEST_CASE("a request whose deadline equals now is not started and is answered expired", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  int handled = 0;
  postbox::responder<int, int> resp(
      r.requests, r.registry, [&](const postbox::envelope<int>& e) { ++handled; return e.payload; }, r.clock, 0);
  auto f = req.request(1, 1s);
  REQUIRE(f.has_value());
  r.clock.advance(1s);  // now == deadline; the timer has not run: the responder sees it first
  CHECK(resp.poll() == 1);
  CHECK(handled == 0);
  CHECK(resp.stats().expired == 1);
  CHECK(f->get().status == postbox::errc::expired);
}

TEST_CASE("destroying a requester waits for a callback running on another thread", "[request_reply]") {
  rig r;
  std::atomic<bool> entered{false}, release{false}, destroyed{false};
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  std::optional<postbox::requester<int, int>> req;
  req.emplace(r.requests, r.registry, r.timers);
  REQUIRE(req->request(1, 10s, [&](postbox::reply_outcome<int>) {
    entered = true;
    (void)postbox_test::eventually([&] { return release.load(); });
  }) == postbox::errc::ok);
  auto other = req->request(2, 10s);  // still queued when the requester goes: completed canceled
  REQUIRE(other.has_value());
  std::thread replier([&] { (void)resp.poll(); });  // serves request 1 (its callback blocks), then 2
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  std::thread destroyer([&] {
    req.reset();
    destroyed = true;
  });
  REQUIRE(postbox_test::eventually([&] { return other->ready(); }));  // the destructor is past cancel_all
  CHECK_FALSE(postbox_test::eventually([&] { return destroyed.load(); }, 1s));
  release = true;
  CHECK(postbox_test::eventually([&] { return destroyed.load(); }));
  destroyer.join();
  replier.join();
  CHECK(other->get().status == postbox::errc::canceled);
}

TEST_CASE("a callback may destroy its own requester", "[request_reply]") {
  rig r;
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  std::optional<postbox::requester<int, int>> req;
  req.emplace(r.requests, r.registry, r.timers);
  int got = 0;
  REQUIRE(req->request(4, 10s, [&](postbox::reply_outcome<int> o) {
    got = o.reply->payload;
    req.reset();  // on the replying thread, inside the callback
  }) == postbox::errc::ok);
  CHECK(resp.poll() == 1);
  CHECK(got == 8);
  CHECK_FALSE(req.has_value());
}

TEST_CASE("a callback that destroys its own requester still waits for a callback running on another thread",
          "[request_reply]") {
  rig r;
  std::optional<postbox::requester<int, int>> req;
  req.emplace(r.requests, r.registry, r.timers);
  std::atomic<bool> b_inside{false}, release_b{false}, b_done{false}, a_destroying{false}, a_returned{false};
  bool b_done_when_destroyed = false;
  REQUIRE(req->request(1, 10s, [&](postbox::reply_outcome<int>) {
    a_destroying = true;
    req.reset();  // inside its own callback: waits for B's, not for itself
    b_done_when_destroyed = b_done.load();
    a_returned = true;
  }) == postbox::errc::ok);
  REQUIRE(req->request(2, 10s, [&](postbox::reply_outcome<int>) {
    b_inside = true;
    (void)postbox_test::eventually([&] { return release_b.load(); });
    b_done = true;
  }) == postbox::errc::ok);
  auto first = r.requests.try_receive();
  auto second = r.requests.try_receive();
  REQUIRE((first.has_value() && second.has_value()));
  const std::string endpoint = req->endpoint();
  std::thread b([&] {
    (void)r.registry.deliver(endpoint, {second->correlation_id, postbox::reply_to(*second, 4, r.clock)});
  });
  REQUIRE(postbox_test::eventually([&] { return b_inside.load(); }));
  std::thread a([&] {
    (void)r.registry.deliver(endpoint, {first->correlation_id, postbox::reply_to(*first, 2, r.clock)});
  });
  REQUIRE(postbox_test::eventually([&] { return a_destroying.load(); }));
  CHECK_FALSE(postbox_test::eventually([&] { return a_returned.load(); }, 1s));
  release_b = true;
  CHECK(postbox_test::eventually([&] { return a_returned.load(); }));
  a.join();
  b.join();
  CHECK(b_done_when_destroyed);
  CHECK_FALSE(req.has_value());
}

TEST_CASE("a stop request wakes get(stop_token) with canceled and consumes nothing", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto f = req.request(3, 10s);
  REQUIRE(f.has_value());
  std::stop_source stop;
  std::optional<postbox::result<postbox::reply_outcome<int>>> got;
  std::thread waiter([&] { got.emplace(f->get(stop.get_token())); });
  stop.request_stop();
  waiter.join();
  REQUIRE(got.has_value());
  CHECK(got->status() == postbox::errc::canceled);
  CHECK(req.stats().pending == 1);  // the request goes on
  CHECK(resp.poll() == 1);
  auto o = f->get(std::stop_token{});
  REQUIRE(o.has_value());
  CHECK(o->ok());
  CHECK(o->reply->payload == 6);
}

TEST_CASE("wait(stop_token) answers ok when the outcome is there, even if stop was requested", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto f = req.request(5, 10s);
  REQUIRE(f.has_value());
  std::stop_source stop;
  CHECK(resp.poll() == 1);
  stop.request_stop();
  CHECK(f->wait(stop.get_token()) == postbox::errc::ok);
  CHECK(f->get().reply->payload == 10);
}

TEST_CASE("a stop request wakes wait(stop_token) on a gather future with canceled", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> other{8};
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.gather({&r.requests, &other}, 1, 2, 10s);
  REQUIRE(f.has_value());
  std::stop_source stop;
  std::optional<postbox::errc> got;
  std::thread waiter([&] { got = f->wait(stop.get_token()); });
  stop.request_stop();
  waiter.join();
  CHECK(got == postbox::errc::canceled);
  CHECK_FALSE(f->ready());
  CHECK(r.h.advance(10s) == 1);
  auto o = f->get(std::stop_token{});
  REQUIRE(o.has_value());
  CHECK(o->status == postbox::errc::timeout);
}

// --- deadlines share one timer; futures spin, then sleep on their word -----------

TEST_CASE("overlapping requests share one timer and each times out at its own deadline", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto a = req.request(1, 3s);
  r.clock.advance(1s);
  auto b = req.request(2, 3s);
  r.clock.advance(1s);
  auto c = req.request(3, 3s);
  REQUIRE((a.has_value() && b.has_value() && c.has_value()));
  CHECK(r.timers.pending() == 1);  // later deadlines schedule nothing
  r.h.advance(1s);                 // t = 3 s: a's deadline, equal to now, is due
  REQUIRE(a->ready());
  CHECK(a->get().status == postbox::errc::timeout);
  CHECK_FALSE(b->ready());
  CHECK(r.timers.pending() == 1);  // re-armed for b
  r.h.advance(999ms);
  CHECK_FALSE(b->ready());
  r.h.advance(1ms);
  REQUIRE(b->ready());
  CHECK(b->get().status == postbox::errc::timeout);
  CHECK_FALSE(c->ready());
  r.h.advance(1s);
  REQUIRE(c->ready());
  CHECK(c->get().status == postbox::errc::timeout);
  CHECK(req.stats().timed_out == 3);
  CHECK(r.timers.pending() == 0);
}

TEST_CASE("a request with an earlier deadline than the armed one times out first", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto slow = req.request(1, 10s);
  auto fast = req.request(2, 1s);
  REQUIRE((slow.has_value() && fast.has_value()));
  CHECK(r.h.next_due() == r.clock.now() + 1s);
  r.h.advance(1s);
  REQUIRE(fast->ready());
  CHECK(fast->get().status == postbox::errc::timeout);
  CHECK_FALSE(slow->ready());
  CHECK(r.h.next_due() == r.clock.now() + 9s);
  r.h.advance(9s);
  REQUIRE(slow->ready());
  CHECK(slow->get().status == postbox::errc::timeout);
}

TEST_CASE("request-reply's spin checks its condition every few pauses, as long as a channel receive pauses",
          "[request_reply]") {
  using spin = postbox::detail::rr_spin;
  // A condition that holds on its 20th check is seen on that check, not
  // after a pause run doubling past it (backoff would check it ~8 times in all).
  unsigned calls = 0;
  CHECK(spin::spin_until([&] { return ++calls == 20; }, true));
  CHECK(calls == 20);
  // Never true: every step of the pause budget, every yield and a last check.
  calls = 0;
  CHECK_FALSE(spin::spin_until([&] { return ++calls == 0; }, true));
  CHECK(calls == spin::pauses / spin::step + spin::yields + 1);
  calls = 0;
  CHECK_FALSE(spin::spin_until([&] { return ++calls == 0; }, false));
  CHECK(calls == spin::pauses / spin::step + 1);
  STATIC_REQUIRE(spin::pauses >= 127);  // backoff's pause phase: 1 + 2 + ... + 64
  STATIC_REQUIRE(spin::step <= 8);
}

TEST_CASE("value() reads a future's outcome where it lies, so it can be read again and still moved out by get()",
          "[request_reply]") {
  rig r;
  postbox::endpoint_registry<std::string> registry;
  postbox::requester<int, std::string> req(r.requests, registry, r.timers);
  // Longer than any inline string buffer: a move out empties the source.
  const std::string answer(64, 'x');
  postbox::responder<int, std::string> resp(
      r.requests, registry, [&](const postbox::envelope<int>&) { return answer; }, r.clock, 0);
  auto f = req.request(21, 5s);
  REQUIRE(f.has_value());
  CHECK(resp.poll() == 1);
  auto& first = f->value();
  REQUIRE(first.ok());
  CHECK(first.reply->payload == answer);
  auto& again = f->value();
  CHECK(&again == &first);
  CHECK(again.reply->payload == answer);  // not moved from by the first read
  auto taken = f->get();
  REQUIRE(taken.ok());
  CHECK(taken.reply->payload == answer);
}

TEST_CASE("an emptied table keeps its one timer, which fires once into it and is not re-armed", "[request_reply]") {
  rig r;
  const auto t0 = r.clock.now();
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto a = req.request(1, 2s);
  auto b = req.request(2, 5s);
  REQUIRE((a.has_value() && b.has_value()));
  CHECK(r.timers.pending() == 1);
  CHECK(resp.poll() == 2);
  CHECK(a->get().reply->payload == 2);
  CHECK(b->get().reply->payload == 4);
  // Answered: the timer stays, due at the earliest deadline the table had.
  CHECK(r.timers.pending() == 1);
  CHECK(r.h.next_due() == t0 + 2s);
  CHECK(r.h.advance(2s) == 1);  // it fires into the idle table ...
  CHECK(r.timers.pending() == 0);  // ... and is not re-armed
  CHECK(r.h.next_due() == postbox::time_point::max());
  auto s = req.stats();
  CHECK(s.timed_out == 0);
  CHECK(s.replied == 2);
  CHECK(s.late_replies == 0);
}

TEST_CASE("a request made while an emptied table's timer is armed still times out exactly at its deadline",
          "[request_reply]") {
  rig r;
  const auto t0 = r.clock.now();
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto a = req.request(1, 1s);
  REQUIRE(a.has_value());
  CHECK(resp.poll() == 1);
  CHECK(a->get().reply->payload == 2);
  SECTION("a later deadline schedules nothing; the kept timer re-arms for it when it fires") {
    auto later = req.request(2, 5s);
    REQUIRE(later.has_value());
    CHECK(r.timers.pending() == 1);
    CHECK(r.h.next_due() == t0 + 1s);
    r.h.advance(1s);
    CHECK_FALSE(later->ready());
    CHECK(r.h.next_due() == t0 + 5s);
    r.h.advance(3999ms);
    CHECK_FALSE(later->ready());
    r.h.advance(1ms);
    REQUIRE(later->ready());
    CHECK(later->get().status == postbox::errc::timeout);
  }
  SECTION("an earlier deadline re-arms the timer for itself") {
    r.clock.advance(100ms);
    auto sooner = req.request(2, 500ms);
    REQUIRE(sooner.has_value());
    CHECK(r.timers.pending() == 1);
    CHECK(r.h.next_due() == t0 + 600ms);
    r.h.advance(499ms);
    CHECK_FALSE(sooner->ready());
    r.h.advance(1ms);
    REQUIRE(sooner->ready());
    CHECK(sooner->get().status == postbox::errc::timeout);
  }
  CHECK(r.timers.pending() == 0);
  CHECK(req.stats().timed_out == 1);
}

TEST_CASE("a reply after a shared timer expired its request is counted late, the others still answered",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto early = req.request(1, 1s);
  auto later = req.request(2, 5s);
  REQUIRE((early.has_value() && later.has_value()));
  r.h.advance(1s);  // only `early` is due; the responder has not run yet
  REQUIRE(early->ready());
  CHECK(early->get().status == postbox::errc::timeout);
  CHECK(resp.poll() == 2);  // answers both: early's reply is late
  CHECK(later->get().reply->payload == 4);
  auto s = req.stats();
  CHECK(s.late_replies == 1);
  CHECK(s.replied == 1);
  CHECK(s.timed_out == 1);
  CHECK(r.timers.pending() == 1);  // kept for `later`'s deadline, 4 s from now
  CHECK(r.h.advance(4s) == 1);     // fires once into the idle table
  CHECK(r.timers.pending() == 0);
  CHECK(req.stats().timed_out == 1);
}

namespace {
// Whether a thread is asleep (past its spin) on `f`'s word.
bool has_sleeper(postbox::reply_future<postbox::reply_outcome<int>>& f) {
  auto& s = postbox::detail::reply_future_access<postbox::reply_outcome<int>>::state(f);
  using state = postbox::detail::rr_future_state<postbox::reply_outcome<int>>;
  return (s->word.load() & state::sleeper_bit) != 0;
}
}  // namespace

TEST_CASE("a thread asleep in get() wakes with the reply delivered on another thread", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  auto f = req.request(8, 10s);
  REQUIRE(f.has_value());
  std::atomic<int> got{0};
  std::thread waiter([&] { got = f->get().reply->payload; });
  REQUIRE(postbox_test::eventually([&] { return has_sleeper(*f); }));  // spun, then went to sleep
  CHECK(got.load() == 0);
  CHECK(resp.poll() == 1);
  waiter.join();
  CHECK(got.load() == 16);
}

TEST_CASE("a stop request wakes a thread asleep in wait(stop_token) with canceled", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.request(1, 10s);
  REQUIRE(f.has_value());
  std::stop_source stop;
  std::optional<postbox::errc> got;
  std::thread waiter([&] { got = f->wait(stop.get_token()); });
  REQUIRE(postbox_test::eventually([&] { return has_sleeper(*f); }));
  stop.request_stop();
  waiter.join();
  CHECK(got == postbox::errc::canceled);
  CHECK_FALSE(f->ready());
  r.h.advance(10s);
  CHECK(f->get().status == postbox::errc::timeout);
}

TEST_CASE("a timeout on the timer's thread wakes a thread asleep in get()", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.request(1, 2s);
  REQUIRE(f.has_value());
  std::optional<postbox::errc> got;
  std::thread waiter([&] { got = f->get().status; });
  REQUIRE(postbox_test::eventually([&] { return has_sleeper(*f); }));
  r.h.advance(2s);
  waiter.join();
  CHECK(got == postbox::errc::timeout);
}

TEST_CASE("a responder thread delivers to a re-registered endpoint name, not the removed one", "[request_reply]") {
  rig r;
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 1);  // one worker, one cache
  auto first = std::make_unique<postbox::requester<int, int>>(r.requests, r.registry, r.timers,
                                                                postbox::requester_options{.endpoint = "ep"});
  auto a = first->request(1, 5s);
  REQUIRE(a.has_value());
  REQUIRE(postbox_test::eventually([&] { return a->ready(); }));  // the worker now caches "ep"
  CHECK(a->get().reply->payload == 2);
  first.reset();  // "ep" removed
  postbox::requester<int, int> second(r.requests, r.registry, r.timers, {.endpoint = "ep"});
  auto b = second.request(2, 5s);
  REQUIRE(b.has_value());
  REQUIRE(postbox_test::eventually([&] { return b->ready(); }));
  CHECK(b->get().reply->payload == 4);
  CHECK(resp.stats().unroutable == 0);
  CHECK(resp.stats().handled == 2);
}

// The future form's slots (issue 18): a future request takes a slot of the
// table, addressed by the low bits of its correlation id, and its reply
// completes it without the table's lock.

TEST_CASE("a future request's id is its correlation id and ids still increase", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto a = req.request(1, 1s);
  auto b = req.request(2, 1s);
  REQUIRE((a.has_value() && b.has_value()));
  auto first = r.requests.try_receive();
  auto second = r.requests.try_receive();
  REQUIRE((first.has_value() && second.has_value()));
  CHECK(first->correlation_id == first->id);
  CHECK(second->correlation_id == second->id);
  CHECK(first->id < second->id);
  CHECK(postbox::message_id::generate() > second->id);
}

TEST_CASE("a late reply to a future request is counted late, also after its slot served the next request",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});  // one slot
  auto first = req.request(1, 1s);
  REQUIRE(first.has_value());
  auto first_sent = r.requests.try_receive();
  REQUIRE(first_sent.has_value());
  r.h.advance(1s);
  REQUIRE(first->ready());
  CHECK(first->get().status == postbox::errc::timeout);
  auto late = [&] {
    REQUIRE(r.registry.deliver(req.endpoint(), {first_sent->correlation_id, postbox::reply_to(*first_sent, 2, r.clock)}) ==
            postbox::errc::ok);
  };
  late();  // the slot still holds the timed-out request
  CHECK(req.stats().late_replies == 1);
  auto second = req.request(2, 1s);  // reuses the one slot
  REQUIRE(second.has_value());
  late();
  CHECK(req.stats().late_replies == 2);
  CHECK_FALSE(second->ready());
  auto second_sent = r.requests.try_receive();
  REQUIRE(second_sent.has_value());
  REQUIRE(r.registry.deliver(req.endpoint(), {second_sent->correlation_id, postbox::reply_to(*second_sent, 4, r.clock)}) ==
          postbox::errc::ok);
  REQUIRE(second->ready());
  CHECK(second->get().reply->payload == 4);
  const auto s = req.stats();
  CHECK(s.late_replies == 2);
  CHECK(s.replied == 1);
  CHECK(s.unmatched_replies == 0);
}

TEST_CASE("a duplicate reply to a future request is counted duplicate, also after its slot served the next request",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});
  auto first = req.request(1, 1s);
  REQUIRE(first.has_value());
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  auto reply = [&](int v) {
    REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, postbox::reply_to(*sent, v, r.clock)}) ==
            postbox::errc::ok);
  };
  reply(2);
  reply(3);
  REQUIRE(first->ready());
  CHECK(first->get().reply->payload == 2);
  auto second = req.request(2, 1s);
  REQUIRE(second.has_value());
  reply(4);
  CHECK_FALSE(second->ready());
  const auto s = req.stats();
  CHECK(s.duplicate_replies == 2);
  CHECK(s.replied == 1);
  CHECK(s.pending == 1);
}

TEST_CASE("finished future requests are remembered for four times max_pending requests, then counted unmatched",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});
  std::vector<postbox::envelope<int>> sent;
  for (int i = 0; i < 6; ++i) {  // each times out; the slot's last one plus 4 x 1 remembered
    auto f = req.request(i, 1s);
    REQUIRE(f.has_value());
    sent.push_back(*r.requests.try_receive());
    r.h.advance(1s);
    REQUIRE(f->ready());
  }
  for (auto& e : sent)
    REQUIRE(r.registry.deliver(req.endpoint(), {e.correlation_id, postbox::reply_to(e, 0, r.clock)}) ==
            postbox::errc::ok);
  const auto s = req.stats();
  CHECK(s.late_replies == 5);
  CHECK(s.unmatched_replies == 1);
}

TEST_CASE("a reply with a correlation id no request had is counted unmatched", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto f = req.request(1, 1s);
  REQUIRE(f.has_value());
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  // Same slot index (low bits), another id: not this request's reply.
  const postbox::message_id other(sent->correlation_id.high() ^ 1, sent->correlation_id.low());
  REQUIRE(r.registry.deliver(req.endpoint(), {other, postbox::reply_to(*sent, 2, r.clock)}) == postbox::errc::ok);
  CHECK_FALSE(f->ready());
  CHECK(req.stats().unmatched_replies == 1);
  CHECK(req.stats().pending == 1);
}

TEST_CASE("a future request refused by a full channel leaves its slot to the next request", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> small(1);
  postbox::requester<int, int> req(small, r.registry, r.timers, {.max_pending = 2});
  auto first = req.request(1, 1s);
  REQUIRE(first.has_value());
  CHECK(req.request(2, 1s).status() == postbox::errc::full);
  CHECK(req.stats().pending == 1);
  auto queued = small.try_receive();
  REQUIRE(queued.has_value());
  auto second = req.request(3, 1s);
  auto third = small.try_receive();
  REQUIRE((second.has_value() && third.has_value()));
  CHECK(third->payload == 3);
  CHECK(req.stats().pending == 2);
  CHECK(req.request(4, 1s).status() == postbox::errc::busy);
  r.h.advance(1s);
  CHECK(first->get().status == postbox::errc::timeout);
  CHECK(second->get().status == postbox::errc::timeout);
  const auto s = req.stats();
  CHECK(s.refused == 2);
  CHECK(s.timed_out == 2);
  CHECK(s.pending == 0);
}

TEST_CASE("future requests beyond the table's 4096 slots are answered and time out as the others", "[request_reply]") {
  rig r;
  postbox::channel<postbox::envelope<int>> big(8192);
  postbox::requester<int, int> req(big, r.registry, r.timers, {.max_pending = 5000});
  std::vector<postbox::reply_future<postbox::reply_outcome<int>>> fs;
  for (int i = 0; i < 4100; ++i) {
    auto f = req.request(i, i % 2 == 0 ? 1s : 2s);
    REQUIRE(f.has_value());
    fs.push_back(std::move(*f));
  }
  CHECK(req.stats().pending == 4100);
  // Answer the first half of the requests, let the rest time out.
  for (int i = 0; i < 4100; ++i) {
    auto e = big.try_receive();
    REQUIRE(e.has_value());
    if (e->payload < 2050)
      REQUIRE(r.registry.deliver(req.endpoint(), {e->correlation_id, postbox::reply_to(*e, 2 * e->payload, r.clock)}) ==
              postbox::errc::ok);
  }
  r.h.advance(1s);
  r.h.advance(1s);
  int ok = 0, timeouts = 0;
  for (int i = 0; i < 4100; ++i) {
    REQUIRE(fs[static_cast<std::size_t>(i)].ready());
    auto o = fs[static_cast<std::size_t>(i)].get();
    if (o.ok()) {
      ++ok;
      CHECK(o.reply->payload == 2 * i);
      CHECK(i < 2050);
    } else {
      ++timeouts;
      CHECK(o.status == postbox::errc::timeout);
      CHECK(i >= 2050);
    }
  }
  CHECK(ok == 2050);
  CHECK(timeouts == 2050);
  CHECK(req.stats().pending == 0);
}

TEST_CASE("a callback request's id is its correlation id, addressing a slot reused by the next request",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});  // one slot
  std::vector<int> got;
  auto cb = [&](postbox::reply_outcome<int> o) { got.push_back(o.ok() ? o.reply->payload : -1); };
  REQUIRE(req.request(1, 1s, cb) == postbox::errc::ok);
  auto first = r.requests.try_receive();
  REQUIRE(first.has_value());
  CHECK(first->correlation_id == first->id);
  REQUIRE(r.registry.deliver(req.endpoint(), {first->correlation_id, postbox::reply_to(*first, 2, r.clock)}) ==
          postbox::errc::ok);
  REQUIRE(req.request(2, 1s, cb) == postbox::errc::ok);
  auto second = r.requests.try_receive();
  REQUIRE(second.has_value());
  // The slot's index is in the id's 12 low bits: the same slot, another id.
  CHECK((second->correlation_id.low() & 0xfffu) == (first->correlation_id.low() & 0xfffu));
  CHECK(second->correlation_id > first->correlation_id);
  REQUIRE(r.registry.deliver(req.endpoint(), {second->correlation_id, postbox::reply_to(*second, 4, r.clock)}) ==
          postbox::errc::ok);
  CHECK(got == std::vector<int>{2, 4});
  CHECK(req.stats().replied == 2);
}

TEST_CASE("a reply's callback may make the next request at a pending limit of one", "[request_reply]") {
  // The slot's request is finished once its reply is decided; the callback
  // running on it does not count against max_pending.
  rig r;
  postbox::responder<int, int> resp(r.requests, r.registry, twice, r.clock, 0);
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});
  std::vector<int> got;
  postbox::errc next = postbox::errc::not_found;
  std::function<void(postbox::reply_outcome<int>)> cb = [&](postbox::reply_outcome<int> o) {
    got.push_back(o.ok() ? o.reply->payload : -1);
    if (got.size() < 3) next = req.request(static_cast<int>(got.size()) + 1, 1s, cb);
  };
  REQUIRE(req.request(1, 1s, cb) == postbox::errc::ok);
  CHECK(resp.poll() == 3);
  CHECK(next == postbox::errc::ok);
  CHECK(got == std::vector<int>{2, 4, 6});
  CHECK(req.stats().refused == 0);
  CHECK(req.stats().pending == 0);
}

TEST_CASE("a duplicate reply arriving while a callback runs is counted duplicate and does not call it again",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  int calls = 0;
  std::optional<postbox::envelope<int>> sent;
  auto reply = [&] {
    REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, postbox::reply_to(*sent, 2, r.clock)}) ==
            postbox::errc::ok);
  };
  REQUIRE(req.request(1, 1s, [&](postbox::reply_outcome<int>) {
    ++calls;
    reply();  // the same reply again, from inside the running callback
  }) == postbox::errc::ok);
  sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  reply();
  CHECK(calls == 1);
  CHECK(req.stats().duplicate_replies == 1);
  CHECK(req.stats().replied == 1);
}

TEST_CASE("a callback that throws still ends its slot's run: the slot serves the next request", "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers, {.max_pending = 1});
  REQUIRE(req.request(1, 1s, [](postbox::reply_outcome<int>) { throw std::runtime_error("callback"); }) ==
          postbox::errc::ok);
  auto first = r.requests.try_receive();
  REQUIRE(first.has_value());
  CHECK_THROWS_AS(
      (void)r.registry.deliver(req.endpoint(), {first->correlation_id, postbox::reply_to(*first, 2, r.clock)}),
      std::runtime_error);
  int got = 0;
  REQUIRE(req.request(2, 1s, [&](postbox::reply_outcome<int> o) { got = o.reply->payload; }) == postbox::errc::ok);
  auto second = r.requests.try_receive();
  REQUIRE(second.has_value());
  // Reused (the run ended): the same slot index in the id's low bits.
  CHECK((second->correlation_id.low() & 0xfffu) == (first->correlation_id.low() & 0xfffu));
  REQUIRE(r.registry.deliver(req.endpoint(), {second->correlation_id, postbox::reply_to(*second, 4, r.clock)}) ==
          postbox::errc::ok);
  CHECK(got == 4);
}

TEST_CASE("send() keeps a caller-built request's id and headers, stamps a fresh correlation id and calls back once",
          "[request_reply]") {
  rig r;
  postbox::requester<int, int> req(r.requests, r.registry, r.timers);
  auto env = postbox::make_envelope(21, r.clock);
  env.headers.set("tenant-hint", "eu");
  const postbox::message_id own_id = env.id;
  std::vector<int> got;
  auto cb = [&](postbox::reply_outcome<int> o) { got.push_back(o.ok() ? o.reply->payload : -1); };
  REQUIRE(req.send(env, 1s, cb) == postbox::errc::ok);
  REQUIRE(req.send(postbox::make_envelope(5, r.clock), 1s, cb) == postbox::errc::ok);  // never answered
  auto sent = r.requests.try_receive();
  REQUIRE(sent.has_value());
  CHECK(sent->id == own_id);
  CHECK(sent->headers.get("tenant-hint") == "eu");
  CHECK(sent->headers.get(postbox::header_names::reply_to) == req.endpoint());
  CHECK(sent->correlation_id != own_id);
  CHECK(sent->deadline == r.clock.now() + 1s);
  for (int i = 0; i < 2; ++i)
    REQUIRE(r.registry.deliver(req.endpoint(), {sent->correlation_id, postbox::reply_to(*sent, 42, r.clock)}) ==
            postbox::errc::ok);
  r.h.advance(1s);
  CHECK(got == std::vector<int>{42, -1});
  const auto s = req.stats();
  CHECK(s.replied == 1);
  CHECK(s.duplicate_replies == 1);
  CHECK(s.timed_out == 1);
  CHECK(s.pending == 0);
}

TEST_CASE("destroying a requester calls each pending callback once with canceled", "[request_reply]") {
  rig r;
  std::vector<postbox::errc> outcomes;
  {
    postbox::requester<int, int> req(r.requests, r.registry, r.timers);
    for (int i = 0; i < 3; ++i)
      REQUIRE(req.request(i, 1s, [&](postbox::reply_outcome<int> o) { outcomes.push_back(o.status); }) ==
              postbox::errc::ok);
    CHECK(outcomes.empty());
  }
  CHECK(outcomes == std::vector<postbox::errc>(3, postbox::errc::canceled));
  CHECK(r.h.advance(2s) == 0);
}

TEST_CASE("the finished-id FIFO finds exactly the newest ids up to its capacity", "[request_reply]") {
  // detail::recent_ids: a ring and an open-addressing index with deletion by
  // backward shift; checked against the plain FIFO it implements.
  for (const std::size_t capacity : {std::size_t{1}, std::size_t{5}, std::size_t{37}, std::size_t{300}}) {
    postbox::detail::recent_ids<int> ids(capacity);
    std::vector<postbox::message_id> all;
    int missing = 0, wrong_kind = 0, kept_too_long = 0;
    for (int i = 0; i < 3000; ++i) {
      all.push_back(postbox::message_id::generate());
      ids.remember(all.back(), i);
      const std::size_t kept = std::min(all.size(), capacity);
      // The newest `kept` are found with their kinds; the one before them is gone.
      for (std::size_t k = all.size() - kept; k < all.size(); ++k) {
        const int* kind = ids.find(all[k]);
        if (kind == nullptr) ++missing;
        else if (*kind != static_cast<int>(k)) ++wrong_kind;
      }
      if (all.size() > capacity && ids.find(all[all.size() - kept - 1]) != nullptr) ++kept_too_long;
    }
    INFO("capacity " << capacity);
    CHECK(missing == 0);
    CHECK(wrong_kind == 0);
    CHECK(kept_too_long == 0);
    CHECK(ids.find(postbox::message_id::generate()) == nullptr);
  }
}
