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
# which only have to compile here, and the examples, which run as tests of
# their output, at -O1 (17-19% less CPU, see benchmarks/CMakeLists.txt and
# examples/CMakeLists.txt). The examples
# drive their threads deterministically: all of them run in Release, the
# flagship (which uses every component) and the test-kit example (which the
# test-kit issue asks to see built by both compilers) also under ASan+UBSan
# with clang, none under TSan. ASan+UBSan links with lld: its instrumented
# programs took GNU ld about 1.05 CPU-s each, lld 0.3 (tests_consumer).
configs=(
  "release|-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O2\ -DNDEBUG -DPOSTBOX_BUILD_BENCHMARKS=ON -DPOSTBOX_BENCH_COMPILE_OPTIONS=-O1 -DPOSTBOX_EXAMPLE_COMPILE_OPTIONS=-O1"
  "tsan|-DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O1\ -g1\ -fsanitize=thread -DPOSTBOX_BUILD_BENCHMARKS=OFF -DPOSTBOX_BUILD_EXAMPLES=OFF -DPOSTBOX_SKIP_CONSUMER_TESTS=ON -DPOSTBOX_SANITIZER=thread"
  "asan|-DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O0\ -g1\ -fsanitize=address,undefined\ -fno-sanitize-recover=all\ -fno-omit-frame-pointer -DCMAKE_EXE_LINKER_FLAGS=-fuse-ld=lld -DPOSTBOX_BUILD_BENCHMARKS=OFF -DPOSTBOX_EXAMPLES_MATCHING=^\(order_pipeline\|testing_handlers\)\$ -DPOSTBOX_SKIP_CONSUMER_TESTS=ON -DPOSTBOX_SANITIZER=address"
)

export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

# Pipelined. The builds keep both cores busy; a config's tests do not: the
# NATS cases mostly wait on nats-server (under TSan they used 21 CPU-s in 190 s
# of wall), and the serial [cluster]/[realtime] ones (about 45 s per config)
# run alone at the end; run one after the other, the three ctest runs of a
# fresh clone (185 + 147 + 90 s) left close to half their core-seconds idle.
# So the first config builds in the foreground while a background chain builds
# the others one after another, then the API reference, then runs the Release
# build's Relacy model checks (label relacy: deterministic and CPU-bound, about
# 80 s of CPU). Whenever a config's tests run, the chain is at SCHED_IDLE CPU
# and idle I/O priority: the kernel gives it only the cycles the tests leave
# idle, and the tests run as if alone. Between test runs it is back at normal
# priority (when the kernel lets this user raise it again; if not, it stays
# idle class, which on an otherwise idle machine still gets every core). The
# model checks thus fill the last test run's idle cores. Every config's
# output, summary and failures still come in the old order and form.
# descendants <pid>: its children, grandchildren, ... (from /proc: no procps).
descendants() {
  local -A kids=()
  local f line pid parent queue=("$1")
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    pid=${f#/proc/}
    pid=${pid%/stat}
    line=${line##*) }  # past "pid (comm) ": state, ppid, ...
    line=${line#* }
    parent=${line%% *}
    kids[$parent]+=" $pid"
  done
  while [ ${#queue[@]} -gt 0 ]; do
    for pid in ${kids[${queue[0]}]:-}; do
      echo "$pid"
      queue+=("$pid")
    done
    queue=("${queue[@]:1}")
  done
}
chain=
# chain_class idle|other: the chain's processes (the subshell, its cmake,
# ninja, ctest, compilers and tests) to that class; new children inherit it.
# Twice: the second pass catches what was forked during the first.
chain_class() {
  [ -n "$chain" ] && kill -0 "$chain" 2>/dev/null || return 0
  local policy=-o io=2 p pass
  [ "$1" = idle ] && policy=-i io=3
  for pass in 1 2; do
    for p in "$chain" $(descendants "$chain"); do
      chrt "$policy" -p 0 "$p" >/dev/null 2>&1
      ionice -c "$io" -p "$p" >/dev/null 2>&1
    done
  done
  return 0
}
trap '[ -n "$chain" ] && kill $(descendants "$chain") "$chain" 2>/dev/null' EXIT

# run_ctest <build dir> <log> [ctest arguments]: ctest's whole output goes to
# the log and through quiet_filter (failures and the summary, not every
# passing test) to stdout.
run_ctest() {
  local dir=$1 log=$2
  shift 2
  ctest --test-dir "$dir" -j "$jobs" --output-on-failure --timeout 300 "$@" 2>&1 | tee "$log" | quiet_filter
}
quiet_filter() {
  grep -vE "^ *[0-9]+/[0-9]+ Test +#[0-9]+: .* Passed|^ +Start +[0-9]+: " || true
}
# report <name> <log>: count a finished ctest run's results.
report() {
  local name=$1 log=$2 summary total bad
  summary=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$log" | tail -1)
  if [ -z "$summary" ]; then echo "ctest did not finish: $name"; failed=1; return 1; fi
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$summary")
  bad=$(sed -E 's/.* ([0-9]+) tests failed.*/\1/' <<<"$summary")
  passed_total=$((passed_total + total - bad))
  failed_total=$((failed_total + bad))
  [ "$bad" -eq 0 ] || failed=1
  return 0
}

names=()
dirs=()
for entry in "${configs[@]}"; do
  names+=("${entry%%|*}")
  dirs+=("$out/${entry%%|*}")
  rm -f "$out/${entry%%|*}.status" "$out/${entry%%|*}.times"
done
rm -f "$out/docs.status" "$out/relacy.status" "$out/relacy.times" "${dirs[0]}.tested"
relacy_log=$out/${names[0]}-relacy.ctest.log

# build <index>: configure and build one config; writes <dir>.status (ok,
# configure or build) and <dir>.times (start and end, in $SECONDS).
build() {
  local entry=${configs[$1]} dir=${dirs[$1]} flags status=ok started=$SECONDS
  eval "flags=(${entry#*|})"
  if ! cmake -S "$root" -B "$dir" -G Ninja "${flags[@]}" >"$dir.configure.log" 2>&1; then
    status=configure
  elif ! cmake --build "$dir" -j "$jobs" >"$dir.build.log" 2>&1; then
    status=build
  fi
  echo "$started $SECONDS" >"$dir.times"
  echo "$status" >"$dir.status"
}

(
  chrt -i -p 0 "$BASHPID" >/dev/null 2>&1 || renice -n 19 -p "$BASHPID" >/dev/null 2>&1
  ionice -c 3 -p "$BASHPID" >/dev/null 2>&1
  for ((i = 1; i < ${#configs[@]}; i++)); do build "$i"; done
  # The API reference: Doxygen over include/postbox, failing on any warning (~10 s).
  bash scripts/docs.sh "$out/docs" >"$out/docs.log" 2>&1
  echo $? >"$out/docs.status"
  # The first config's Relacy model checks, when it built and has them, once
  # its other tests are done (one ctest at a time in a build directory).
  while [ ! -e "${dirs[0]}.tested" ]; do sleep 1; done
  if [ "$(cat "${dirs[0]}.status")" = ok ] &&
     ctest --test-dir "${dirs[0]}" -N -L relacy | grep -qE "Total Tests: [1-9]"; then
    started=$SECONDS
    run_ctest "${dirs[0]}" "$relacy_log" -L relacy >"$relacy_log.shown"
    echo "$started $SECONDS" >"$out/relacy.times"
    echo ran >"$out/relacy.status"
  else
    echo none >"$out/relacy.status"
  fi
) &
chain=$!

build 0
for ((i = 0; i < ${#configs[@]}; i++)); do
  # The time this config holds the foreground (the first: from the start), so
  # the "built and tested" lines add up to the total.
  foreground=$SECONDS
  [ "$i" -eq 0 ] && foreground=0
  [ "$i" -gt 0 ] && : >"${dirs[0]}.tested"
  name=${names[$i]}
  dir=${dirs[$i]}
  echo "=== postbox tests: $name ==="
  while [ ! -s "$dir.status" ] && kill -0 "$chain" 2>/dev/null; do sleep 1; done
  status=$(cat "$dir.status" 2>/dev/null || echo "missing (the build chain died)")
  read -r started built <"$dir.times" 2>/dev/null || { started=$SECONDS; built=$SECONDS; }
  case $status in
    ok) ;;
    configure) cat "$dir.configure.log"; echo "configure failed: $name"; failed=1; continue ;;
    build) grep -E -B2 -A12 "error|Error" "$dir.build.log" | head -80; echo "build failed: $name"; failed=1; continue ;;
    *) echo "build $status: $name"; failed=1; continue ;;
  esac
  chain_class idle
  tested=$SECONDS
  # The first config's Relacy checks run in the chain (above).
  run_ctest "$dir" "$dir.ctest.log" $([ "$i" -eq 0 ] && echo "-LE relacy")
  chain_class other
  report "$name" "$dir.ctest.log" || continue
  echo "--- $name: built and tested in $((SECONDS - foreground)) s (its build ran from $started s to $built s of the run; ctest $((SECONDS - tested)) s)"
done
: >"${dirs[0]}.tested"

waited=$SECONDS
wait "$chain"
chain=
echo "=== postbox tests: ${names[0]}, Relacy model checks (label relacy) ==="
if [ "$(cat "$out/relacy.status" 2>/dev/null)" = ran ]; then
  read -r started ended <"$out/relacy.times"
  cat "$relacy_log.shown"
  report "${names[0]} relacy" "$relacy_log" &&
    echo "--- ${names[0]} relacy: tested in $((ended - started)) s (from $started s of the run, beside the tests above; $((SECONDS - waited)) s after them)"
else
  echo "none: the ${names[0]} build failed or has no Relacy checks (relacy-dev)"
fi
echo "=== postbox API reference: doxygen ==="
cat "$out/docs.log" 2>/dev/null
[ "$(cat "$out/docs.status" 2>/dev/null)" = 0 ] || { echo "docs failed"; failed=1; }

echo
echo "postbox: release, tsan and asan+ubsan runs"
echo "time: $SECONDS s"
echo "tests: $passed_total passed, $failed_total failed"
exit $failed
