#!/usr/bin/env bash
# Installs the Debian 12 packages postbox needs (apt-get when run as root);
# otherwise names the missing ones and fails.
#   bash scripts/deps.sh        everything scripts/test.sh uses: both compilers,
#                               the test and benchmark dependencies, Doxygen
#   bash scripts/deps.sh demo   only what scripts/demo.sh's flagship needs
set -euo pipefail
case "${1:-all}" in
  demo)
    # The flagship (examples/order_pipeline.cpp): nlohmann/json and SQLite.
    packages=(cmake ninja-build g++ nlohmann-json3-dev libsqlite3-dev)
    ;;
  all)
    packages=(
      cmake ninja-build g++ clang-14 libclang-rt-14-dev lld-14
      catch2 libfmt-dev nlohmann-json3-dev libsqlite3-dev libsqlcipher-dev relacy-dev
      libconcurrentqueue-dev libreaderwriterqueue-dev libatomic-queue-dev
      libboost-dev libtbb-dev libzmq3-dev
      nats-server libnats-dev openssl libasio-dev
      doxygen pkg-config git
    )
    ;;
  *)
    echo "usage: bash scripts/deps.sh [demo]" >&2
    exit 2
    ;;
esac
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
