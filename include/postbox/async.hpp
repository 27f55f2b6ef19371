// SPDX-License-Identifier: MIT
// postbox's awaitable operations: task<T>, schedulers, and co_await forms of channel, subscription, stream and select waits.
#pragma once

// Design: docs/design/async.md. This header includes every piece:
// async/core.hpp (task, schedulers, the waiting operation they share,
// async_sleep), async/channel.hpp, async/topic.hpp, async/stream.hpp and
// async/select.hpp. Include a piece alone to compile less.

#include <postbox/async/channel.hpp>
#include <postbox/async/core.hpp>
#include <postbox/async/select.hpp>
#include <postbox/async/stream.hpp>
#include <postbox/async/topic.hpp>
