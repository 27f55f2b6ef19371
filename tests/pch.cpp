// SPDX-License-Identifier: MIT
// Anchor translation unit for the tests' shared precompiled header.
