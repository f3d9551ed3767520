#!/usr/bin/env bash
# Prints the path of libonnxruntime.so.1.31.1, taken from the hash-pinned onnxruntime wheel
# (.ci/onnxruntime-requirements.txt) and extracted under DIR (default /tmp/mcd-onnxruntime);
# downloads only when DIR does not hold it yet. pip checks the wheel's hash; only the wheel
# is fetched (no dependencies, no install, no build).
#   export MCD_ORT_LIB="$(bash .ci/onnxruntime-lib.sh)"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="${1:-/tmp/mcd-onnxruntime}"
version=1.31.1
lib="$dir/onnxruntime/capi/libonnxruntime.so.$version"
if [[ ! -f $lib ]]; then
  rm -rf "$dir"
  mkdir -p "$dir/wheel"
  # --platform/--python-version pin the one wheel the hash names, whatever Python runs pip.
  pip3 download -q --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
    -r .ci/onnxruntime-requirements.txt -d "$dir/wheel" >&2
  python3 -m zipfile -e "$dir"/wheel/onnxruntime-"$version"-*.whl "$dir/"
  rm -rf "$dir/wheel"
fi
echo "$lib"
