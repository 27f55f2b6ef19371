// SPDX-License-Identifier: MIT
// A test helper: every field of an envelope checked against another's.
#pragma once

#include <postbox/envelope.hpp>

#include <catch2/catch.hpp>

namespace postbox_test {

/// One CHECK per field of `got` against `want`, so a failure names the field
/// (envelope_test.cpp's field count keeps the list complete).
template <class T>
void check_every_field(const postbox::envelope<T>& got, const postbox::envelope<T>& want) {
  CHECK(got.id == want.id);
  CHECK(got.type == want.type);
  CHECK(got.schema_version == want.schema_version);
  CHECK(got.kind == want.kind);
  CHECK(got.occurred_at == want.occurred_at);
  CHECK(got.correlation_id == want.correlation_id);
  CHECK(got.causation_id == want.causation_id);
  CHECK(got.producer == want.producer);
  CHECK(got.partition_key == want.partition_key);
  CHECK(got.tenant == want.tenant);
  CHECK(got.trace == want.trace);
  CHECK(got.deadline == want.deadline);
  CHECK(got.attempt == want.attempt);
  CHECK(got.headers == want.headers);
  CHECK(got.payload == want.payload);
}

}  // namespace postbox_test
