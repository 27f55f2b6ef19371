// SPDX-License-Identifier: MIT
// std::chrono's durations, time points, clocks and literals without the calendar, time zones and stream output.
#pragma once

// Every core header that names std::chrono includes this instead of <chrono>
// (issue 17). With libstdc++ 12, <chrono> is <bits/chrono.h> (all
// that postbox uses: duration, time_point, system_clock, steady_clock,
// duration_cast, floor/ceil, the literals) plus the C++20 calendar, time
// zones and `operator<<` for durations, which bring <sstream>: 4% of the
// instructions clang 14 spends on the umbrella and 6% on consumer.hpp. Other
// standard libraries get <chrono>. Code that uses the calendar, time zones
// or `<<` on a duration includes <chrono> itself, as the standard requires.

#include <version>  // the library's identification macros (_GLIBCXX_RELEASE)

// Only libstdc++ 12, the release these internal headers were checked against
// (Debian 12's g++ 12 and clang 14 build every test with it): an internal
// header may change in another release, and then the standard header is
// the safe answer, at its full compile-time cost.
#if defined(_GLIBCXX_RELEASE) && _GLIBCXX_RELEASE == 12 && __has_include(<bits/chrono.h>)
#  include <bits/chrono.h>
#else
#  include <chrono>
#endif
