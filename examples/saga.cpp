// An order saga: reserve stock, charge the card, ship. The charge is declined,
// so the reservation is released (compensated), and every transition prints
// as a timeline linked by correlation and causation ids.
//
//   reserve ──> charge ✗
//      ▲           │
//      └─ release ◀┘   (compensations run in reverse order)
//
// State lives in a memory store here; postbox::sqlite_saga_store
// (postbox/saga_sqlite.hpp) keeps it in SQLite so that
// saga_coordinator::resume_all() continues sagas after a crash.
#include <postbox/postbox.hpp>
#include <postbox/saga.hpp>

#include <cstdio>
#include <string>

int main() {
  postbox::memory_saga_store store;
  postbox::message_id previous;
  int linked = 0;
  int events = 0;

  postbox::saga_options options;
  options.on_event = [&](const postbox::envelope<postbox::saga_event>& e) {
    ++events;
    if (e.causation_id == previous) ++linked;  // each event is caused by the one before
    previous = e.id;
    std::printf("%-22s %s %s\n", e.type.c_str(), e.payload.step.c_str(), e.payload.reason.c_str());
  };
  postbox::saga_coordinator coordinator(store, options);

  int stock = 10;
  postbox::saga_definition order("order");
  order
      .step("reserve", [&](postbox::step_context&) { stock -= 2; },  // actions and compensations
            [&](postbox::step_context&) { stock += 2; })               // must be idempotent
      .step("charge",
            [](postbox::step_context& ctx) {
              return ctx.data() == "card:declined" ? postbox::step_result::failure("card declined")
                                                   : postbox::step_result::success();
            },
            nullptr)
      .step("ship", [](postbox::step_context&) {}, nullptr);
  coordinator.add(std::move(order));

  // The message that asked for the order: the saga joins its correlation.
  const auto request = postbox::message_id::generate();
  postbox::saga_start start;
  start.saga_id = "order-1001";
  start.correlation_id = request;
  start.causation_id = request;
  previous = request;

  auto result = coordinator.run("order", "card:declined", start);
  if (!result) return 1;
  std::printf("outcome: %s, stock back to %d, %d of %d events causally linked\n",
              std::string(postbox::to_string(result->outcome)).c_str(), stock, linked, events);
  return result->outcome == postbox::saga_outcome::compensated && stock == 10 && linked == events ? 0 : 1;
}
