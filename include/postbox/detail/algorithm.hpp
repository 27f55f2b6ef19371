// SPDX-License-Identifier: MIT
// The standard algorithms (std::sort, std::find_if, std::min ...) without the C++20 std::ranges ones.
#pragma once

// Every core header that uses a standard algorithm includes this instead of
// <algorithm> (issue 17). With libstdc++ 12, <algorithm> is
// <bits/stl_algobase.h> and <bits/stl_algo.h>, which hold every iterator
// algorithm, plus the std::ranges algorithms (<bits/ranges_algo.h>), which
// postbox does not use: 2% of the instructions clang 14 spends on the
// umbrella. Other standard libraries get <algorithm>. Code that uses
// std::ranges algorithms includes <algorithm> itself, as the standard requires.

#include <version>  // the library's identification macros (_GLIBCXX_RELEASE)

// Only libstdc++ 12, the release these internal headers were checked against
// (Debian 12's g++ 12 and clang 14 build every test with it): an internal
// header may change in another release, and then the standard header is
// the safe answer, at its full compile-time cost.
#if defined(_GLIBCXX_RELEASE) && _GLIBCXX_RELEASE == 12 && __has_include(<bits/stl_algo.h>)
#  include <bits/stl_algobase.h>
#  include <bits/stl_algo.h>
#else
#  include <algorithm>
#endif
