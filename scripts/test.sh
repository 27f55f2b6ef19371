#!/usr/bin/env bash
# Builds and runs every postbox test three times: Release, ThreadSanitizer, and
# AddressSanitizer+UBSan; ends with ctest's summary and a total line.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh || exit 1

jobs=$(nproc)
root=$PWD
out=${POSTBOX_TEST_BUILD:-$root/build/test}
mkdir -p "$out"
failed=0
passed_total=0
failed_total=0

# name | CMake flags
# Release and ThreadSanitizer build with g++ 12; AddressSanitizer+UBSan with
# clang++ 14, which puts the second supported compiler through every test,
# unoptimized: nothing optimized away hides a bad access, and it compiles in
# less than half the time of -O1 (which mattered more than its slower run:
# 4 of 7 minutes saved).
# Release builds at -O2: these binaries test, they are not timed (the
# benchmarks' figures come from scripts/demo.sh's -O3 build); the benchmarks,
# which only have to compile here, at -O1 (17% less CPU, see
# benchmarks/CMakeLists.txt). The examples
# drive their threads deterministically: all of them run in Release, the
# flagship (which uses every component) and the test-kit example (which the
# test-kit issue asks to see built by both compilers) also under ASan+UBSan
# with clang, none under TSan.
configs=(
  "release|-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O2\ -DNDEBUG -DPOSTBOX_BUILD_BENCHMARKS=ON -DPOSTBOX_BENCH_COMPILE_OPTIONS=-O1"
  "tsan|-DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O1\ -g1\ -fsanitize=thread -DPOSTBOX_BUILD_BENCHMARKS=OFF -DPOSTBOX_BUILD_EXAMPLES=OFF -DPOSTBOX_SKIP_CONSUMER_TESTS=ON -DPOSTBOX_SANITIZER=thread"
  "asan|-DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O0\ -g1\ -fsanitize=address,undefined\ -fno-sanitize-recover=all\ -fno-omit-frame-pointer -DPOSTBOX_BUILD_BENCHMARKS=OFF -DPOSTBOX_EXAMPLES_MATCHING=^\(order_pipeline\|testing_handlers\)\$ -DPOSTBOX_SKIP_CONSUMER_TESTS=ON -DPOSTBOX_SANITIZER=address"
)

# The API reference: Doxygen over include/postbox, failing on any warning (~10 s).
echo "=== postbox API reference: doxygen ==="
bash scripts/docs.sh "$out/docs" || failed=1

export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

for entry in "${configs[@]}"; do
  name=${entry%%|*}
  eval "flags=(${entry#*|})"
  dir=$out/$name
  echo "=== postbox tests: $name ==="
  started=$SECONDS
  if ! cmake -S "$root" -B "$dir" -G Ninja "${flags[@]}" >"$dir.configure.log" 2>&1; then
    cat "$dir.configure.log"; echo "configure failed: $name"; failed=1; continue
  fi
  if ! cmake --build "$dir" -j "$jobs" >"$dir.build.log" 2>&1; then
    grep -E -B2 -A12 "error|Error" "$dir.build.log" | head -80; echo "build failed: $name"; failed=1; continue
  fi
  log=$dir.ctest.log
  ctest --test-dir "$dir" -j "$jobs" --output-on-failure --timeout 300 2>&1 | tee "$log" | grep -vE "^ *[0-9]+/[0-9]+ Test +#[0-9]+: .* Passed|^ +Start +[0-9]+: " || true
  summary=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$log" | tail -1)
  if [ -z "$summary" ]; then echo "ctest did not finish: $name"; failed=1; continue; fi
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$summary")
  bad=$(sed -E 's/.* ([0-9]+) tests failed.*/\1/' <<<"$summary")
  passed_total=$((passed_total + total - bad))
  failed_total=$((failed_total + bad))
  [ "$bad" -eq 0 ] || failed=1
  echo "--- $name: built and tested in $((SECONDS - started)) s"
done

echo
echo "postbox: release, tsan and asan+ubsan runs"
echo "tests: $passed_total passed, $failed_total failed"
exit $failed
