#!/bin/sh
# Builds tests/fuzz/json_fuzz.cpp with clang++-14 and libFuzzer (ASan+UBSan) and
# runs it for a bounded time on a copy of the seed corpus; fails on any crash.
# Usage: run_fuzz.sh <source dir> <work dir> [seconds]   (POSTBOX_FUZZ_SECONDS overrides)
set -eu
src=$1
work=$2
seconds=${POSTBOX_FUZZ_SECONDS:-${3:-60}}
cxx=${POSTBOX_FUZZ_CXX:-clang++-14}

mkdir -p "$work"
bin="$work/json_fuzz"
if [ ! -x "$bin" ] || [ -n "$(find "$src/include/postbox" "$src/tests/fuzz/json_fuzz.cpp" -newer "$bin" -print -quit)" ]; then
  echo "building $bin with $cxx"
  "$cxx" -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$src/include" "$src/tests/fuzz/json_fuzz.cpp" -o "$bin.tmp"
  mv "$bin.tmp" "$bin"
fi

rm -rf "$work/corpus"
cp -r "$src/tests/fuzz/corpus" "$work/corpus"
cd "$work"
# libFuzzer exits non-zero on a crash, leak, timeout or sanitizer report.
exec "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
  -print_final_stats=1 corpus
