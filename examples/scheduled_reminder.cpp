// Scheduled sends with cancel and reschedule: three reminders go to a channel
// at times on a manual clock; one is canceled (it never arrives, although its
// time passes), one is moved later. The durable form is outbox::stage_at.
//
//   scheduler ──(due)──> reminders channel ──> this loop
//        │ cancel(): never delivered      reschedule(t): delivered at t instead
#include <postbox/postbox.hpp>
#include <postbox/testing.hpp>  // postbox::manual_clock

#include <chrono>
#include <cstdio>
#include <string>

using namespace std::chrono_literals;

int main() {
  postbox::manual_clock clock;  // starts 2026-01-01T00:00:00Z; moves only when told
  postbox::scheduler sched(clock, postbox::timer_service::manual_drive);
  postbox::channel<std::string> reminders(16);

  auto standup = sched.send_after(reminders, 10min, std::string("standup"));
  auto lunch = sched.send_after(reminders, 3h, std::string("lunch"));
  auto review = sched.send_after(reminders, 1h, std::string("design review"));

  std::printf("canceled lunch: %s\n", lunch.cancel() ? "yes" : "no");
  std::printf("moved review to +2h: %s\n", review.reschedule_after(2h) ? "yes" : "no");

  // Walk the day in 30-minute steps and print what arrives.
  for (int step = 1; step <= 8; ++step) {
    clock.advance(30min);
    sched.run_due();
    while (auto r = reminders.try_receive()) std::printf("+%3d min: %s\n", step * 30, r->c_str());
  }
  std::printf("standup: %s, lunch: %s, review: %s\n", std::string(to_string(standup.state())).c_str(),
              std::string(to_string(lunch.state())).c_str(), std::string(to_string(review.state())).c_str());
  std::printf("cancel after delivery: %s\n", standup.cancel() ? "yes" : "no");
  const auto s = sched.stats();
  std::printf("scheduled=%llu delivered=%llu canceled=%llu rescheduled=%llu pending=%llu\n",
              static_cast<unsigned long long>(s.scheduled), static_cast<unsigned long long>(s.delivered),
              static_cast<unsigned long long>(s.canceled), static_cast<unsigned long long>(s.rescheduled),
              static_cast<unsigned long long>(s.pending));
  return s.delivered == 2 && s.canceled == 1 ? 0 : 1;
}
