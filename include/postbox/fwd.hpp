// SPDX-License-Identifier: MIT
// Forward declarations of postbox's public types, for headers that only name them.
#pragma once

#include <postbox/config.hpp>

#include <cstdint>

POSTBOX_BEGIN_NAMESPACE
enum class errc;
enum class send_status;
enum class receive_status;
class error;
template <class T, class Status>
class result;
class clock;
class real_clock;
class manual_clock;
class timer_service;
struct spsc;
struct mpsc;
struct spmc;
struct mpmc;
class message_id;
template <class T>
struct envelope;
POSTBOX_END_NAMESPACE
