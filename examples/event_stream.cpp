// SPDX-License-Identifier: MIT
// event_stream: account events go into a 3-partition retained stream (one
// key, one partition, in order); a consumer group commits its progress, a new
// member resumes exactly where the old one committed, and a replay reader
// reads the whole history again without consuming it.
//
//   append(key) ─▶ [p0 | p1 | p2] ─▶ group "billing" (commit, lag)
//                                 └─▶ reader from earliest (replay)
#include <postbox/stream.hpp>

#include <cstdio>
#include <string>

int main() {
  postbox::stream<int> events(3);
  for (int i = 0; i < 12; ++i) {
    const std::string account = "acct-" + std::to_string(i % 4);
    const auto pos = events.append(account, i * 10);
    if (i < 4) std::printf("%s -> partition %u offset %llu\n", account.c_str(), pos.partition,
                           static_cast<unsigned long long>(pos.offset));
  }

  auto billing = events.group("billing");
  {
    auto first = billing.join();
    const auto batch = first.poll(5);
    (void)first.commit();
    std::printf("first member handled %zu, lag now %llu\n", batch.records.size(),
                static_cast<unsigned long long>(billing.lag()));
  }  // leaves the group; committed offsets stay
  auto second = billing.join();
  std::size_t rest = 0;
  for (auto r = second.poll(); !r.records.empty(); r = second.poll()) rest += r.records.size();
  (void)second.commit();
  std::printf("second member resumed and handled %zu, lag now %llu\n", rest,
              static_cast<unsigned long long>(billing.lag()));

  auto replay = events.read_from(postbox::start_from::earliest());
  std::size_t replayed = 0;
  for (auto r = replay.poll(); !r.records.empty(); r = replay.poll()) replayed += r.records.size();
  std::printf("replayed %zu events without consuming them\n", replayed);
  return rest == 7 && replayed == 12 ? 0 : 1;
}
