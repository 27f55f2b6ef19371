// SPDX-License-Identifier: MIT
// Tests for postbox/nats_request_reply.hpp: requester and responder on two connections to a real nats-server.
#ifdef POSTBOX_NATS_SERVER

#include <postbox/nats_request_reply.hpp>
#include <postbox/testing.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "support.hpp"

#include "nats_fixture.hpp"

using namespace std::chrono_literals;
namespace pn = postbox_test::nats;

namespace {

int twice(const postbox::envelope<int>& e) { return e.payload * 2; }

// The NATS fixture without a stream: its connection is the requesters'
// (client), and a second one is the responders' (service); timers and
// deadlines on a manual clock. Responders get their own manual clock (still
// at its start) unless a case wants them to see expiry.
struct rig : pn::jetstream_rig {
  postbox::nats_connection& client = conn;
  postbox::nats_connection service{pn::connect(srv.url())};
  postbox::manual_clock clock;
  postbox::manual_clock responder_clock;
  postbox::timer_service timers{clock, postbox::timer_service::manual_drive};
  rig() : pn::jetstream_rig(pn::settings().without_orders()) {}
  postbox::nats_requester_options to(std::string subject) {
    postbox::nats_requester_options o;
    o.subject = std::move(subject);
    return o;
  }
  postbox::nats_responder_options at(std::string subject, bool manual = false, std::string group = {}) {
    postbox::nats_responder_options o;
    o.subject = std::move(subject);
    o.queue_group = std::move(group);
    o.manual = manual;
    return o;
  }
};

}  // namespace

TEST_CASE("a request over NATS is answered with the reply carrying correlation and causation", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::mutex m;
  std::optional<postbox::envelope<int>> seen;
  postbox::nats_responder<int, int> resp(
      r.service,
      [&](const postbox::envelope<int>& e) {
        std::lock_guard lock(m);
        seen = e;
        return e.payload * 2;
      },
      r.at("svc.double"), r.responder_clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.double"));
  auto f = req.request(21, 5s);
  REQUIRE(f.has_value());
  REQUIRE(postbox_test::eventually([&] { return f->ready(); }));
  auto o = f->get();
  REQUIRE(o.ok());
  CHECK(o.reply->payload == 42);
  CHECK(o.reply->kind == postbox::message_kind::reply);
  std::lock_guard lock(m);
  REQUIRE(seen.has_value());
  CHECK(seen->kind == postbox::message_kind::query);
  REQUIRE(seen->deadline.has_value());
  CHECK(*seen->deadline == r.clock.now() + 5s);
  CHECK(seen->headers.get(postbox::header_names::reply_to) ==
        std::optional<std::string_view>(req.inbox() + "." + seen->correlation_id.to_string()));
  CHECK(o.reply->correlation_id == seen->correlation_id);
  CHECK(o.reply->causation_id == seen->id);
  CHECK(req.stats().replied == 1);
  CHECK(req.stats().pending == 0);
  CHECK(resp.stats().handled == 1);
}

TEST_CASE("a NATS request nobody answers completes with timeout from the clock", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.nobody"));
  auto f = req.request(1, 2s);
  REQUIRE(f.has_value());
  // The server says nobody listens; the request still ends only at its deadline.
  REQUIRE(postbox_test::eventually([&] { return req.stats().no_responders == 1; }));
  CHECK_FALSE(f->ready());
  r.clock.advance(1999ms);
  r.timers.run_due();
  CHECK_FALSE(f->ready());
  r.clock.advance(1ms);
  r.timers.run_due();
  REQUIRE(f->ready());
  CHECK(f->get().status == postbox::errc::timeout);
  CHECK(req.stats().timed_out == 1);
}

TEST_CASE("a NATS reply after the timeout is dropped and counted as late", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  // Manual responder: it holds the request until the test lets it reply.
  postbox::nats_responder<int, int> resp(r.service, twice, r.at("svc.slow", true), r.responder_clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.slow"));
  std::atomic<int> calls{0};
  std::atomic<postbox::errc> status{postbox::errc::ok};
  REQUIRE(req.request(1, 1s, [&](postbox::reply_outcome<int> o) {
    status.store(o.status);
    calls.fetch_add(1);
  }) == postbox::errc::ok);
  r.clock.advance(1s);
  r.timers.run_due();
  CHECK(calls.load() == 1);
  CHECK(status.load() == postbox::errc::timeout);
  CHECK(resp.poll(30000ms) == 1);  // now the responder answers
  REQUIRE(postbox_test::eventually([&] { return req.stats().late_replies == 1; }));
  CHECK(calls.load() == 1);
  CHECK(resp.stats().handled == 1);
}

TEST_CASE("a duplicate NATS reply is dropped and counted and never delivered twice", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  // Two responders outside any queue group: both answer the one request.
  postbox::nats_responder<int, int> a(r.service, twice, r.at("svc.twice"), r.responder_clock);
  postbox::nats_responder<int, int> b(r.service, twice, r.at("svc.twice"), r.responder_clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.twice"));
  std::atomic<int> calls{0}, ok{0};  // callbacks run on a libnats thread: no Catch2 there
  REQUIRE(req.request(3, 5s, [&](postbox::reply_outcome<int> o) {
    if (o.ok()) ok.fetch_add(1);
    calls.fetch_add(1);
  }) == postbox::errc::ok);
  REQUIRE(postbox_test::eventually([&] { return req.stats().duplicate_replies == 1; }));
  CHECK(calls.load() == 1);
  CHECK(ok.load() == 1);
  CHECK(req.stats().replied == 1);
  r.clock.advance(6s);
  r.timers.run_due();
  CHECK(calls.load() == 1);
  CHECK(req.stats().timed_out == 0);
}

TEST_CASE("destroying a NATS requester completes its pending requests with canceled", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::vector<postbox::reply_future<postbox::reply_outcome<int>>> fs;
  {
    postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.nobody"));
    for (int i = 0; i < 3; ++i) fs.push_back(*req.request(i, 1s));
    CHECK_FALSE(fs[0].ready());
  }
  for (auto& f : fs) {
    REQUIRE(f.ready());
    CHECK(f.get().status == postbox::errc::canceled);
  }
  r.clock.advance(2s);
  CHECK(r.timers.run_due() == 0);
}

TEST_CASE("destroying a NATS requester waits for a callback running on another thread", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::atomic<bool> entered{false}, release{false}, destroyed{false};
  std::optional<postbox::nats_requester<int, int>> req;
  req.emplace(r.client, r.timers, r.to("svc.nobody"));
  REQUIRE(req->request(1, 1s, [&](postbox::reply_outcome<int>) {
    entered = true;
    (void)postbox_test::eventually([&] { return release.load(); });
  }) == postbox::errc::ok);
  auto other = req->request(2, 10s);  // still pending when the requester goes: completed canceled
  REQUIRE(other.has_value());
  r.clock.advance(1s);
  std::thread timer_thread([&] { (void)r.timers.run_due(); });  // times request 1 out; its callback blocks
  REQUIRE(postbox_test::eventually([&] { return entered.load(); }));
  std::thread destroyer([&] {
    req.reset();
    destroyed = true;
  });
  REQUIRE(postbox_test::eventually([&] { return other->ready(); }));  // the destructor is past the cancel
  CHECK_FALSE(postbox_test::eventually([&] { return destroyed.load(); }, 1s));
  release = true;
  CHECK(postbox_test::eventually([&] { return destroyed.load(); }));
  destroyer.join();
  timer_thread.join();
  CHECK(other->get().status == postbox::errc::canceled);
}

TEST_CASE("a timeout callback may destroy its own NATS requester", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::optional<postbox::nats_requester<int, int>> req;
  req.emplace(r.client, r.timers, r.to("svc.nobody"));
  postbox::errc status = postbox::errc::ok;
  REQUIRE(req->request(1, 1s, [&](postbox::reply_outcome<int> o) {
    status = o.status;
    req.reset();  // on the timer's thread, inside the callback
  }) == postbox::errc::ok);
  r.clock.advance(1s);
  CHECK(r.timers.run_due() == 1);
  CHECK(status == postbox::errc::timeout);
  CHECK_FALSE(req.has_value());
}

TEST_CASE("a NATS requester at its pending limit refuses with busy", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  auto o = r.to("svc.nobody");
  o.max_pending = 2;
  postbox::nats_requester<int, int> req(r.client, r.timers, o);
  REQUIRE(req.request(1, 1s).has_value());
  REQUIRE(req.request(2, 1s).has_value());
  CHECK(req.request(3, 1s).status() == postbox::errc::busy);
  CHECK(req.stats().refused == 1);
  r.clock.advance(1s);
  r.timers.run_due();
  CHECK(req.request(4, 1s).has_value());
}

TEST_CASE("a NATS request on a closed connection is refused with closed", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.double"));
  natsConnection_Close(r.client.native());
  CHECK(req.request(1, 1s).status() == postbox::errc::closed);
  CHECK(req.stats().pending == 0);
  CHECK(req.stats().refused == 1);
}

TEST_CASE("a request without a subject is refused as invalid_argument", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_requester<int, int> req(r.client, r.timers);  // no subject, and int has no type name
  CHECK(req.request(1, 1s).status() == postbox::errc::invalid_argument);
  CHECK(req.stats().refused == 1);
}

TEST_CASE("a handler exception over NATS becomes an error reply with its code and text", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_responder<int, int> resp(
      r.service,
      [](const postbox::envelope<int>& e) -> int {
        if (e.payload < 0) throw postbox::error(postbox::errc::invalid_argument, "negative");
        throw std::runtime_error("boom\r\nline two");
      },
      r.at("svc.fail"), r.responder_clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.fail"));
  auto a = req.request(-1, 5s);
  auto b = req.request(1, 5s);
  REQUIRE(postbox_test::eventually([&] { return a->ready() && b->ready(); }));
  auto oa = a->get();
  CHECK(oa.status == postbox::errc::invalid_argument);
  REQUIRE(oa.error.has_value());
  CHECK(oa.error->message == "negative");
  auto ob = b->get();
  CHECK(ob.status == postbox::errc::handler_error);
  REQUIRE(ob.error.has_value());
  CHECK(ob.error->message == "boom  line two");
  CHECK(resp.stats().failed == 2);
  CHECK(req.stats().errors == 2);
}

TEST_CASE("an expired NATS request is not started and is answered expired", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  std::atomic<int> handled{0};
  // This responder reads the requester's clock, so it sees the deadline pass.
  postbox::nats_responder<int, int> resp(
      r.service, [&](const postbox::envelope<int>& e) { handled.fetch_add(1); return e.payload; },
      r.at("svc.late", true), r.clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.late"));
  auto f = req.request(1, 1s);
  REQUIRE(f.has_value());
  r.clock.advance(1001ms);  // the timer is not run yet: the responder sees it first
  CHECK(resp.poll(30000ms) == 1);
  CHECK(handled.load() == 0);
  CHECK(resp.stats().expired == 1);
  REQUIRE(postbox_test::eventually([&] { return f->ready(); }));
  CHECK(f->get().status == postbox::errc::expired);
}

TEST_CASE("responders in one queue group share the requests and each is answered once", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_responder<int, int> a(r.service, twice, r.at("svc.pool", false, "workers"), r.responder_clock);
  postbox::nats_responder<int, int> b(r.service, twice, r.at("svc.pool", false, "workers"), r.responder_clock);
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.pool"));
  std::vector<postbox::reply_future<postbox::reply_outcome<int>>> fs;
  for (int i = 0; i < 40; ++i) fs.push_back(*req.request(i, 30s));
  REQUIRE(postbox_test::eventually([&] { return req.stats().replied == 40; }));
  for (int i = 0; i < 40; ++i) {
    auto o = fs[static_cast<std::size_t>(i)].get();
    REQUIRE(o.ok());
    CHECK(o.reply->payload == 2 * i);
  }
  CHECK(a.stats().handled + b.stats().handled == 40);
  CHECK(a.stats().handled > 0);  // 2^-39 chance of a false failure with a fair split
  CHECK(b.stats().handled > 0);
  CHECK(req.stats().duplicate_replies == 0);
}

TEST_CASE("a request that does not decode gets its decode error as the reply", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_responder<int, int> resp(r.service, twice, r.at("svc.int"), r.responder_clock);
  postbox::nats_requester<std::string, int> req(r.client, r.timers, r.to("svc.int"));
  auto f = req.request("not a number", 5s);
  REQUIRE(postbox_test::eventually([&] { return f->ready(); }));
  auto o = f->get();
  CHECK(o.status == postbox::errc::parse_error);
  REQUIRE(o.error.has_value());
  CHECK(o.error->message == "request did not decode: payload");
  CHECK(resp.stats().failed == 1);
}

TEST_CASE("a reply that does not decode completes the request with its decode error", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_responder<int, int> resp(r.service, twice, r.at("svc.int"), r.responder_clock);
  postbox::nats_requester<int, std::string> req(r.client, r.timers, r.to("svc.int"));
  auto f = req.request(2, 5s);
  REQUIRE(postbox_test::eventually([&] { return f->ready(); }));
  auto o = f->get();
  CHECK(o.status == postbox::errc::parse_error);
  REQUIRE(o.error.has_value());
  CHECK(o.error->message == "reply did not decode: payload");
}

TEST_CASE("messages on the inbox that match no request are counted unmatched", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_requester<int, int> req(r.client, r.timers, r.to("svc.double"));
  const std::string stranger = req.inbox() + "." + postbox::message_id::generate().to_string();
  const std::string garbage = req.inbox() + ".not-an-id";
  REQUIRE(natsConnection_PublishString(r.service.native(), stranger.c_str(), "{}") == NATS_OK);
  REQUIRE(natsConnection_PublishString(r.service.native(), garbage.c_str(), "{}") == NATS_OK);
  REQUIRE(postbox_test::eventually([&] { return req.stats().unmatched_replies == 2; }));
  CHECK(req.stats().replied == 0);
}

TEST_CASE("a NATS request with no reply address is handled and counted unroutable", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::nats_responder<int, int> resp(r.service, twice, r.at("svc.oneway", true), r.responder_clock);
  auto env = postbox::make_envelope(std::string("n"), 1, postbox::message_kind::command, r.clock);
  auto msg = postbox::to_nats_msg(env, "svc.oneway");
  REQUIRE(msg.has_value());
  REQUIRE(natsConnection_PublishMsg(r.client.native(), msg->get()) == NATS_OK);
  CHECK(resp.poll(30000ms) == 1);
  CHECK(resp.stats().handled == 1);
  CHECK(resp.stats().unroutable == 1);
}

TEST_CASE("a bad inbox subject is refused at construction", "[nats_request_reply]") {
  NATS_REQUIRE_SERVER();
  rig r;
  auto o = r.to("svc.double");
  o.inbox = "bad inbox.*";
  CHECK_THROWS_AS((postbox::nats_requester<int, int>(r.client, r.timers, o)), postbox::error);
}

TEST_CASE("concurrent NATS requests each end in exactly one outcome with the right reply", "[nats_request_reply][stress]") {
  NATS_REQUIRE_SERVER();
  rig r;
  postbox::timer_service timers;  // real clock: every request here is answered well before 60 s
  auto plus = [](const postbox::envelope<int>& e) { return e.payload + 1; };
  postbox::nats_responder_options ro;
  ro.subject = "svc.plus";
  ro.queue_group = "workers";
  postbox::nats_responder<int, int> a(r.service, plus, ro);
  postbox::nats_responder<int, int> b(r.service, plus, ro);
  postbox::nats_requester_options qo;
  qo.subject = "svc.plus";
  qo.max_pending = 100000;
  postbox::nats_requester<int, int> req(r.client, timers, qo);
  const int threads = 4;
  const int per = static_cast<int>(postbox_test::scaled(500));
  std::atomic<long long> sum{0};
  std::atomic<int> outcomes{0}, not_ok{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < per; ++i) {
        const int v = t * per + i;
        const auto s = req.request(v, 60s, [&](postbox::reply_outcome<int> o) {
          if (o.ok()) sum.fetch_add(o.reply->payload);
          else not_ok.fetch_add(1);
          outcomes.fetch_add(1);
        });
        if (s != postbox::errc::ok) not_ok.fetch_add(1000000);
      }
    });
  for (auto& t : ts) t.join();
  const int n = threads * per;
  REQUIRE(postbox_test::eventually([&] { return outcomes.load() == n; }, 60s));
  CHECK(not_ok.load() == 0);
  CHECK(sum.load() == static_cast<long long>(n) * (n - 1) / 2 + n);  // sum of (v + 1)
  const auto st = req.stats();
  CHECK(st.sent == static_cast<std::uint64_t>(n));
  CHECK(st.replied == static_cast<std::uint64_t>(n));
  CHECK(st.duplicate_replies + st.late_replies + st.unmatched_replies == 0);
  CHECK(st.pending == 0);
  CHECK(a.stats().handled + b.stats().handled == static_cast<std::uint64_t>(n));
  CHECK(outcomes.load() == n);  // still exactly one outcome each
}

#endif  // POSTBOX_NATS_SERVER
