#!/usr/bin/env bash
# Generates the API reference from the /// comments of include/postbox with
# Doxygen (docs/Doxyfile) into ${1:-build/docs}/html, and fails on any Doxygen
# warning, which it prints (scripts/test.sh runs it; about 10 s).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/docs}
command -v doxygen >/dev/null || { echo "postbox docs: doxygen not found (bash scripts/deps.sh)" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
version=$(sed -nE 's/#define POSTBOX_VERSION_(MAJOR|MINOR|PATCH) ([0-9]+)/\2/p' include/postbox/version.hpp | paste -sd.)
POSTBOX_DOXYGEN_OUT=$out POSTBOX_DOXYGEN_VERSION=$version doxygen docs/Doxyfile >"$out/doxygen.log" 2>&1
rc=$?
if [ -s "$out/warnings.log" ]; then
  cat "$out/warnings.log"
  echo "postbox docs: $(wc -l <"$out/warnings.log") Doxygen warning line(s); fix the /// comments above" >&2
  exit 1
fi
if [ $rc -ne 0 ]; then
  cat "$out/doxygen.log"
  echo "postbox docs: doxygen failed" >&2
  exit 1
fi
echo "postbox docs: no warnings; $out/html/index.html"
