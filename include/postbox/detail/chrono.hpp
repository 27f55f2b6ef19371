// SPDX-License-Identifier: MIT
// std::chrono's durations, time points, clocks and literals without the calendar, time zones and stream output.
#pragma once

// Every core header that names std::chrono includes this instead of <chrono>
// (issue 17). With libstdc++ 11 and later, <chrono> is <bits/chrono.h> (all
// that postbox uses: duration, time_point, system_clock, steady_clock,
// duration_cast, floor/ceil, the literals) plus the C++20 calendar, time
// zones and `operator<<` for durations, which bring <sstream>: 4% of the
// instructions clang 14 spends on the umbrella and 6% on consumer.hpp. Other
// standard libraries get <chrono>. Code that uses the calendar, time zones
// or `<<` on a duration includes <chrono> itself, as the standard requires.

#include <version>  // the library's identification macros (_GLIBCXX_RELEASE)

#if defined(_GLIBCXX_RELEASE) && _GLIBCXX_RELEASE >= 11 && __has_include(<bits/chrono.h>)
#  include <bits/chrono.h>
#else
#  include <chrono>
#endif
