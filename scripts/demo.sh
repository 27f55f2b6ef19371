#!/usr/bin/env bash
# The main job: installs what the flagship needs, builds only the flagship,
# examples/order_pipeline, in Release (-O3), and runs it (arguments go to it:
# --seed N, --metrics, --verbose). Shows the build's progress, and its errors
# when it fails. Without SQLite's headers there is no flagship; the channel
# example runs instead. Benchmarks: build their targets from the same build
# directory (README "Benchmarks"); tests: bash scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh demo

dir=build/release
mkdir -p "$dir"
log=$dir/demo-build.log

# Prints ninja's "[n/N] ..." progress on one line when on a terminal, every
# other line (compiler errors and warnings: ninja writes them to stdout) as is.
progress() {
  local line tty=0
  [ -t 1 ] && tty=1
  while IFS= read -r line; do
    if [[ $line =~ ^\[[0-9]+/[0-9]+\] ]]; then
      if [ $tty -eq 1 ]; then printf '\r\033[K%s' "${line:0:100}"; else printf '%s\n' "${line:0:100}"; fi
    else
      [ $tty -eq 1 ] && printf '\n'
      printf '%s\n' "$line"
    fi
  done
  [ $tty -eq 1 ] && printf '\r\033[K'
  return 0
}

echo "postbox demo: configuring (Release) in $dir"
if ! cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPOSTBOX_BUILD_TESTS=OFF \
    -DPOSTBOX_BUILD_EXAMPLES=ON -DPOSTBOX_BUILD_BENCHMARKS=OFF >"$dir/demo-configure.log" 2>&1; then
  cat "$dir/demo-configure.log"
  echo "postbox demo: configure failed (log: $dir/demo-configure.log)" >&2
  exit 1
fi

target=example_order_pipeline
if ! grep -q '^SQLite3_INCLUDE_DIR:PATH=/' "$dir/CMakeCache.txt"; then
  echo "postbox demo: no SQLite headers, so no flagship; building the channel example instead"
  target=example_spsc_channel
fi

echo "postbox demo: building $target (one translation unit: about a minute from scratch)"
started=$SECONDS
if ! cmake --build "$dir" --target "$target" -j "$(nproc)" 2>&1 | tee "$log" | progress; then
  echo "postbox demo: build failed (full log: $log)" >&2
  exit 1
fi
echo "postbox demo: built in $((SECONDS - started)) s"
echo

if [ "$target" = example_order_pipeline ]; then
  exec "$dir/examples/order_pipeline" "$@"
fi
exec "$dir/examples/spsc_channel"
