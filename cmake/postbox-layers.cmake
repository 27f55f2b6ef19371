# postbox's layer table (issue 19), the one place it is kept: every header
# under include/postbox/ and its layer. A header may include postbox headers
# of its own layer or lower ones only. tests/layers/check_layers.cmake (the
# CTest test `layering`) reads the includes of every header against this
# table, fails on an upward include and on a header the table does not name,
# and checks that the README's "Design" section shows this table.
#
# An entry is a path relative to include/postbox/, or `<folder>/*.hpp` for a
# folder that belongs to one layer as a whole: detail/ is the shared core by
# definition, and a folder named after a concept (json/, operations/,
# request_reply/, consumer/, async/) holds internals of that concept's header.
#
# Placement: the layers DESIGN.md names place the headers of its concepts
# (retry is a pattern). A header DESIGN.md does not place (clock, testing,
# metrics, observer) sits at the lowest layer its includes allow, so lower
# layers may use it: clock and redaction include only the core; metrics
# includes the clock and redaction (its labels are redacted); observer
# includes envelope. testing.hpp is the test kit (manual_clock
# plus testing/: harness, capture sinks, fault injectors, assertions), which
# drives and decorates patterns, so it sits with them; no library header
# includes it.
set(POSTBOX_LAYER_NAMES core channels messages patterns edges)

# 1. core: the lock-free core shared by several concepts; standard library
#    (and Linux syscalls) only.
set(POSTBOX_LAYER_1
  detail/*.hpp
  version.hpp config.hpp error.hpp fwd.hpp)
# 2. channels: typed in-process transports, and what waiting on them needs.
set(POSTBOX_LAYER_2
  clock.hpp cached_clock.hpp timer_service.hpp redaction.hpp metrics.hpp
  channel.hpp topic.hpp stream.hpp durable_stream.hpp select.hpp async.hpp async/*.hpp)
# 3. messages: envelopes, codecs (nlohmann/json, fmt), message hooks.
set(POSTBOX_LAYER_3
  envelope.hpp observer.hpp json.hpp json/*.hpp schema.hpp format.hpp)
# 4. patterns: consumers, settlement, retry, dead letters, stores, inbox,
#    outbox, request-reply, operations, sagas, scheduling.
set(POSTBOX_LAYER_4
  retry.hpp dead_letter.hpp settlement.hpp consumer.hpp consumer/*.hpp scheduler.hpp
  store.hpp sqlite.hpp inbox.hpp outbox.hpp
  request_reply.hpp request_reply/*.hpp operations.hpp operations/*.hpp
  saga.hpp saga_sqlite.hpp testing.hpp testing/*.hpp signing.hpp sqlcipher.hpp)
# 5. edges: opt-in bridges, each with its own target (postbox::nats, postbox::asio).
set(POSTBOX_LAYER_5
  nats.hpp nats_consumer.hpp nats_outbox.hpp nats_request_reply.hpp asio.hpp)

# Exempt: the umbrella includes every layer on purpose.
set(POSTBOX_LAYER_EXEMPT postbox.hpp)
