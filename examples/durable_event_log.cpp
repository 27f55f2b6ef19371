// SPDX-License-Identifier: MIT
// durable_event_log: account events go into an on-disk log that survives a
// restart; the "balances" projection resumes from its committed offsets, and
// after its code changes a new consumer group rebuilds it from the beginning.
//
//   run 1: append 4 ─▶ [dir/p0 | dir/p1] ─▶ group "balances-v1" (commit)
//   run 2: reopen, append 2 ─▶ "balances-v1" resumes: only the 2 new events
//                          └─▶ "balances-v2" (new code) from earliest: all 6
#include <postbox/durable_stream.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

namespace {
// An event is "account amount"; the projection folds it into balances.
struct projection {
  std::map<std::string, long> balance;
  std::map<std::string, int> events;  // v2 also counts events per account
  int applied = 0;
  void consume(postbox::durable_stream<std::string>::consumer_group group) {
    auto member = group.join();
    for (auto batch = member.poll(); !batch.records.empty(); batch = member.poll()) {
      for (const auto& r : batch.records) {
        balance[r.key] += std::stol(r.value.substr(r.value.find(' ') + 1));
        ++events[r.key];
        ++applied;
      }
      if (member.commit() != postbox::errc::ok) std::exit(1);
    }
  }
};
}  // namespace

int main() {
  std::string dir = (std::filesystem::temp_directory_path() / "postbox_event_log_XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr) return 1;
  postbox::durable_options options;
  options.partitions = 2;  // fsync_policy::always(): an append that returned survives any crash
  {  // run 1
    postbox::durable_stream<std::string> log(dir, options);
    for (const char* e : {"alice 100", "bob 50", "alice -30", "bob 20"})
      (void)log.append(std::string(e).substr(0, std::string(e).find(' ')), e);
    projection v1;
    v1.consume(log.group("balances-v1"));
    std::printf("run 1: v1 applied %d events\n", v1.applied);
  }  // the process "restarts": everything above is on disk
  {  // run 2
    postbox::durable_stream<std::string> log(dir, options);
    (void)log.append("alice", "alice 5");
    (void)log.append("carol", "carol 70");
    projection v1;
    v1.consume(log.group("balances-v1"));
    std::printf("run 2: v1 resumed and applied %d new events\n", v1.applied);
    projection v2;  // changed code: a new group replays the log from its beginning
    v2.consume(log.group("balances-v2"));
    std::printf("run 2: v2 rebuilt from earliest with %d events:", v2.applied);
    for (const auto& [account, b] : v2.balance) std::printf(" %s=%ld (%d)", account.c_str(), b, v2.events[account]);
    std::printf("\n");
  }
  std::filesystem::remove_all(dir);
  return 0;
}
