#!/usr/bin/env bash
# The main job: installs what is missing, builds postbox in Release and runs
# the flagship demo (for now the channel example, then the channel benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j "$(nproc)" >/dev/null
if [ -x build/release/examples/order_pipeline ]; then
  exec build/release/examples/order_pipeline "$@"
fi
build/release/examples/spsc_channel
build/release/benchmarks/channel_bench --quick
