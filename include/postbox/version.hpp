// SPDX-License-Identifier: MIT
// postbox version macros; the single source of the version number (CMake parses it).
#pragma once

#define POSTBOX_VERSION_MAJOR 0
#define POSTBOX_VERSION_MINOR 1
#define POSTBOX_VERSION_PATCH 0
#define POSTBOX_VERSION (POSTBOX_VERSION_MAJOR * 10000 + POSTBOX_VERSION_MINOR * 100 + POSTBOX_VERSION_PATCH)
