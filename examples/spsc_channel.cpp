// SPDX-License-Identifier: MIT
// spsc_channel: one producer thread hands numbers to one consumer thread
// through a bounded lock-free channel, then closes it; the consumer drains.
//
//   producer ──send──▶ [ channel<int, spsc>, 1024 slots ] ──receive──▶ consumer
#include <postbox/postbox.hpp>

#include <cstdio>
#include <thread>

int main() {
  postbox::channel<int, postbox::spsc> numbers(1000);  // rounded up to 1024

  std::thread producer([&] {
    for (int i = 1; i <= 100000; ++i) numbers.send(i);  // blocks while full
    numbers.close();                                     // receivers drain, then see closed
  });

  long long sum = 0;
  int count = 0;
  while (auto n = numbers.receive()) {  // empty optional: closed and drained
    sum += *n;
    ++count;
  }
  producer.join();

  std::printf("received %d messages, sum %lld (capacity %zu)\n", count, sum, numbers.capacity());
  return sum == 100000LL * 100001 / 2 ? 0 : 1;
}
