// SPDX-License-Identifier: MIT
// Umbrella header: includes every public postbox header, nothing else.
#pragma once

#include <postbox/version.hpp>
#include <postbox/config.hpp>
#include <postbox/fwd.hpp>
#include <postbox/error.hpp>
#include <postbox/clock.hpp>
#include <postbox/testing.hpp>
#include <postbox/channel.hpp>
