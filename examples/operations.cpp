// The in-process "202 Accepted": submit a long job with an idempotency key,
// watch its progress pushed as it runs, see a retry return the same
// operation and a changed request conflict, then cancel a second job.
#include <postbox/operations.hpp>
#include <postbox/postbox.hpp>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>

int main() {
  std::atomic<bool> ready{false};  // declared before ops: ops' destructor joins
  std::atomic<bool> go{false};     // workers whose jobs still read these
  std::atomic<bool> watched_end{false};  // the watch callback has printed the final state
  postbox::operations<std::string> ops;
  auto job = [](postbox::operation_context& ctx) -> std::string {
    for (int pct = 25; pct <= 100; pct += 25) {
      if (ctx.stop_token().stop_requested()) return "stopped";
      ctx.report_progress(pct, "rendering");
    }
    return "report.pdf";
  };
  auto first = ops.submit("alice", "report-7", "fp:v1", [&](postbox::operation_context& ctx) {
    while (!ready.load()) std::this_thread::yield();  // hold until the watch is attached
    return job(ctx);
  });
  auto w = ops.watch("alice", first->id, [&](const postbox::operation_snapshot<std::string>& s) {
    std::printf("  %s %d%%\n", std::string(postbox::to_string(s.state)).c_str(), s.progress);
    if (postbox::is_terminal(s.state)) watched_end = true;
  });
  std::printf("submitted: created id of %zu hex digits\n", first->id.size());
  auto retry = ops.submit("alice", "report-7", "fp:v1", job);
  auto changed = ops.submit("alice", "report-7", "fp:v2", job);
  std::printf("retry: %s, changed: %s\n",
              retry->disposition == postbox::submit_disposition::existing ? "existing" : "?",
              changed->disposition == postbox::submit_disposition::conflict ? "conflict" : "?");
  std::printf("bob sees it: %s\n", ops.get("bob", first->id).has_value() ? "yes" : "no (not_found)");
  ready = true;
  const postbox::operation_snapshot<std::string> s = *ops.wait("alice", first->id);  // blocks until terminal
  while (!watched_end) std::this_thread::yield();  // the watcher's last line comes first in the output
  std::printf("result: %s\n", s.result->c_str());

  auto second = ops.submit("alice", "", "", [&](postbox::operation_context& ctx) -> std::string {
    while (!go.load() && !ctx.stop_token().stop_requested()) std::this_thread::yield();
    return "too late";
  });
  auto state = ops.cancel("alice", second->id);
  std::printf("cancel: %s\n", std::string(postbox::to_string(*state)).c_str());
  return s.state == postbox::operation_state::succeeded ? 0 : 1;
}
