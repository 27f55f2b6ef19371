// SPDX-License-Identifier: MIT
// A replaced global operator new that counts this thread's allocations and can fail a chosen one.
//
// Include from exactly one file of a test executable of its own: it replaces
// the global allocation functions, which would disturb other test files.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace counting_new {
/// Allocations made by this thread through the global operator new.
inline thread_local std::size_t allocations = 0;
/// When non-zero, the allocation that brings `allocations` to this count
/// fails: the throwing forms throw std::bad_alloc, the nothrow forms return
/// null.
inline thread_local std::size_t fail_at = 0;
}  // namespace counting_new

// Every form, aligned ones included (detail::block_pool allocates aligned
// blocks), so that no allocation escapes the count and every block is freed
// by the function family that made it (ASan checks that). The
// plain new and the plain and sized deletes stay out of line: inlined into a
// test, g++ 12 saw a malloc/delete or new/free pair and warned
// (-Wmismatched-new-delete; delete inlined under -fsanitize=thread, new at
// -O2), not knowing that this file's new is malloc and its delete free.
[[gnu::noinline]] void* operator new(std::size_t n) {
  if (++counting_new::allocations == counting_new::fail_at) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (++counting_new::allocations == counting_new::fail_at) return nullptr;
  return std::malloc(n == 0 ? 1 : n);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace counting_new {
// aligned_alloc wants a size that is a multiple of the alignment.
inline void* aligned(std::size_t n, std::align_val_t a) noexcept {
  const auto align = static_cast<std::size_t>(a);
  const std::size_t rounded = (n == 0 ? align : (n + align - 1) / align * align);
  return std::aligned_alloc(align, rounded);
}
}  // namespace counting_new
[[gnu::noinline]] void* operator new(std::size_t n, std::align_val_t a) {
  if (++counting_new::allocations == counting_new::fail_at) throw std::bad_alloc();
  if (void* p = counting_new::aligned(n, a)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
[[gnu::noinline]] void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  if (++counting_new::allocations == counting_new::fail_at) return nullptr;
  return counting_new::aligned(n, a);
}
[[gnu::noinline]] void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  return operator new(n, a, t);
}
[[gnu::noinline]] void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
