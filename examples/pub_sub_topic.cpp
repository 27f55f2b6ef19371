// SPDX-License-Identifier: MIT
// pub_sub_topic: one publisher fans order events out by subject; an auditor
// sees everything, a shipping group of two workers shares "orders.*", and a
// dashboard that keeps only the newest two messages reports what it missed.
//
//   publish("orders.created") ─┬─▶ auditor     (orders.>, block)
//                              ├─▶ shipping[2] (orders.*, one group, competing)
//                              └─▶ dashboard   (orders.>, drop_oldest, 2 slots)
#include <postbox/topic.hpp>

#include <cstdio>
#include <string>

int main() {
  postbox::topic<std::string> orders;
  auto auditor = orders.subscribe("orders.>");
  postbox::subscription_options shipping{16, postbox::overflow::block, "shipping", "orders.*"};
  auto worker_a = orders.subscribe(shipping);
  auto worker_b = orders.subscribe(shipping);
  auto dashboard = orders.subscribe("orders.>", {2, postbox::overflow::drop_oldest, {}, {}});

  for (int i = 1; i <= 5; ++i) (void)orders.publish("orders.created", "order #" + std::to_string(i));
  (void)orders.publish("orders.eu.refunded", "order #2");
  try {
    (void)orders.publish("orders..bad", "x");
  } catch (const postbox::error& e) {
    std::printf("rejected: %s\n", postbox::to_string(e.code()).data());
  }

  int audited = 0;
  while (auto d = auditor.try_receive()) {
    std::printf("audit %-18s %s\n", d->subject().c_str(), (**d).c_str());
    ++audited;
  }
  int shipped = 0;
  while (worker_a.try_receive() || worker_b.try_receive()) ++shipped;
  std::printf("audited %d, shipped %d (group shares each message once)\n", audited, shipped);
  std::printf("dashboard lagged by %llu, kept:", static_cast<unsigned long long>(dashboard.take_lag()));
  while (auto d = dashboard.try_receive()) std::printf(" [%s]", (**d).c_str());
  std::printf("\n");
  return audited == 6 && shipped == 5 ? 0 : 1;
}
