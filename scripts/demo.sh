#!/usr/bin/env bash
# The main job: installs what is missing, builds postbox's examples and
# benchmarks in Release (-O3) and runs the flagship demo, examples/order_pipeline
# (arguments go to it: --seed N). Without SQLite's headers there is no
# flagship; the channel example and a quick channel benchmark run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DPOSTBOX_BUILD_TESTS=OFF >/dev/null
cmake --build build/release -j "$(nproc)" >/dev/null
if [ -x build/release/examples/order_pipeline ]; then
  exec build/release/examples/order_pipeline "$@"
fi
build/release/examples/spsc_channel
build/release/benchmarks/channel_bench --quick
