#!/usr/bin/env bash
# Installs the Debian 12 packages postbox's builds, tests and benchmarks use
# (apt-get when run as root); otherwise names the missing ones and fails.
set -euo pipefail
packages=(
  cmake ninja-build g++ clang-14 libclang-rt-14-dev
  catch2 libfmt-dev nlohmann-json3-dev libsqlite3-dev relacy-dev
  libconcurrentqueue-dev libreaderwriterqueue-dev libatomic-queue-dev
  libboost-dev libtbb-dev libzmq3-dev
  nats-server libnats-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "postbox: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
else
  echo "postbox: missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
