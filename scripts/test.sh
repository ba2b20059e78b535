#!/usr/bin/env bash
# kvferry's test command: builds and runs the suite in the release, asan
# (ASan+LSan+UBSan) and tsan presets, then checks find_package(kvferry) from
# an outside project. Usage: scripts/test.sh [preset ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(release asan tsan)
jobs=$(nproc)
for preset in "${presets[@]}"; do
  echo "=== preset $preset: build"
  start=$(date +%s)
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  echo "=== preset $preset: test"
  ctest --preset "$preset" -j "$jobs"
  echo "=== preset $preset: done in $(( $(date +%s) - start )) s"
done
if [[ " ${presets[*]} " == *" release "* ]]; then
  echo "=== find_package(kvferry) from an outside project"
  rm -rf build/install build/consumer
  cmake --install build/release --prefix build/install >/dev/null
  cmake -S tests/consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
  cmake --build build/consumer
  ./build/consumer/consumer
fi
