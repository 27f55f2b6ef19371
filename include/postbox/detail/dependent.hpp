// SPDX-License-Identifier: MIT
// detail::dependent_t: a type spelled through a template parameter, so that code using it compiles on instantiation only.
#pragma once

#include <postbox/config.hpp>

POSTBOX_BEGIN_NAMESPACE
namespace detail {

template <class T, class Dummy>
struct dependent_type {
  using type = T;
};

/// `T`, named so that it depends on `Dummy` (issue 17). A class template that
/// exists only to defer its bodies (`template <class Dummy = void>`) declares
/// its members and locals of standard containers with it: the compilers look
/// into an expression of a dependent type only when the class is instantiated,
/// while with `T` itself clang instantiates the container's constexpr members
/// (C++20 makes most of std::vector's) in every translation unit that merely
/// includes the header. Same type after instantiation; no cost at run time.
template <class T, class Dummy>
using dependent_t = typename dependent_type<T, Dummy>::type;

}  // namespace detail
POSTBOX_END_NAMESPACE
