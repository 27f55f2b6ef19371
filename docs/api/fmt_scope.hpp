// SPDX-License-Identifier: MIT
// For Doxygen only (docs/Doxyfile): declares the fmt namespace and its
// formatter template, so that format.hpp's fmt::formatter specializations
// have a scope to be documented in. Never compiled.
namespace fmt {
template <class T, class Char, class Enable>
struct formatter;
}  // namespace fmt
