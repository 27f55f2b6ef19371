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
class cached_clock;
class manual_clock;
class timer_service;
struct spsc;
struct mpsc;
struct spmc;
struct mpmc;
class message_id;
template <class T>
struct envelope;
template <class T>
class topic;
template <class T>
class subscription;
template <class T>
class stream;
struct retry_policy;
class metrics_registry;
class observer;
class settlement;
template <class T>
class dead_letter_queue;
template <class T>
class consumer;
template <class Dummy>
class basic_memory_store;
using memory_store = basic_memory_store<void>;
template <class Request, class Reply>
class requester;
template <class Request, class Reply>
class responder;
template <class Result>
class operations;
POSTBOX_END_NAMESPACE
