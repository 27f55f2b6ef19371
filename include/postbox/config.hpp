// SPDX-License-Identifier: MIT
// Feature macros and the versioned namespace used by every postbox header.
#pragma once

// Checked first, so a C++17 build stops here with one clear line instead of
// "'concept' does not name a type" from the next header. MSVC keeps
// __cplusplus at 199711L unless /Zc:__cplusplus is given; _MSVC_LANG is right.
#if defined(_MSVC_LANG) && _MSVC_LANG > __cplusplus
#  define POSTBOX_CPLUSPLUS _MSVC_LANG
#else
#  define POSTBOX_CPLUSPLUS __cplusplus
#endif
#if POSTBOX_CPLUSPLUS < 202002L
#  error "postbox needs C++20 (-std=c++20, /std:c++20 or CMake's cxx_std_20, which postbox::postbox sets)"
#endif

#include <postbox/version.hpp>

#include <cstddef>
#include <new>

/// Every declaration lives in `postbox::v0`; the inline namespace keeps two
/// incompatible versions linked into one program from colliding silently.
#define POSTBOX_BEGIN_NAMESPACE \
  namespace postbox {           \
  inline namespace v0 {
#define POSTBOX_END_NAMESPACE \
  }                           \
  }

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#  define POSTBOX_HAS_EXCEPTIONS 1
#  define POSTBOX_THROW(x) throw x
#  define POSTBOX_TRY try
#  define POSTBOX_CATCH_ALL catch (...)
#  define POSTBOX_RETHROW throw
#else
#  include <cstdlib>
#  define POSTBOX_HAS_EXCEPTIONS 0
#  define POSTBOX_THROW(x) ::std::abort()
#  define POSTBOX_TRY if (true)
#  define POSTBOX_CATCH_ALL else
#  define POSTBOX_RETHROW ::std::abort()  // unreachable: nothing throws into the else branch
#endif

#if defined(__has_feature)
#  if __has_feature(thread_sanitizer)
#    define POSTBOX_TSAN 1
#  endif
#endif
#if !defined(POSTBOX_TSAN) && defined(__SANITIZE_THREAD__)
#  define POSTBOX_TSAN 1
#endif
#ifndef POSTBOX_TSAN
#  define POSTBOX_TSAN 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define POSTBOX_LIKELY(x) __builtin_expect(!!(x), 1)
#  define POSTBOX_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#  define POSTBOX_LIKELY(x) (x)
#  define POSTBOX_UNLIKELY(x) (x)
#endif

POSTBOX_BEGIN_NAMESPACE
namespace detail {
/// Size used to pad shared atomics apart. 64 bytes on x86-64 and most ARM
/// cores; adjacent-line prefetching on Intel pairs lines, hence 128 there
/// (the spatial prefetcher pulls the neighbouring line too).
#if defined(__x86_64__) || defined(_M_X64)
inline constexpr std::size_t cache_line_size = 128;
#else
inline constexpr std::size_t cache_line_size = 64;
#endif
}  // namespace detail
POSTBOX_END_NAMESPACE
