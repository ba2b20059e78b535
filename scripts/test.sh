#!/usr/bin/env bash
# kvferry's test command: builds and runs the suite in the release, asan
# (ASan+LSan+UBSan) and tsan presets, runs the memory soak gate and checks
# find_package(kvferry) from an outside project (with release), then builds
# the clang preset (-Wthread-safety -Werror) and fuzzes the wire decoder.
# Usage: scripts/test.sh [release|asan|tsan|clang ...]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(release asan tsan clang)
jobs=$(nproc)
for preset in "${presets[@]}"; do
  [ "$preset" != clang ] || continue  # below
  echo "=== preset $preset: build"
  start=$(date +%s)
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  echo "=== preset $preset: test"
  ctest --preset "$preset" -j "$jobs" | tee "build/$preset/ctest.log"
  ran=$(sed -n 's/.* tests passed, 0 tests failed out of \([0-9]*\).*/\1/p' "build/$preset/ctest.log")
  skipped_here=$(grep -c "(Skipped)" "build/$preset/ctest.log" || true)
  total=$(( ${total:-0} + ${ran:-0} - skipped_here ))
  skipped=$(( ${skipped:-0} + skipped_here ))
  echo "=== preset $preset: done in $(( $(date +%s) - start )) s"
done
if [[ " ${presets[*]} " == *" release "* ]]; then
  echo "=== memory soak gate (release, ${SOAK_SECONDS:-120} s of shared-memory transfers)"
  ./build/release/bench/kvferry_soak --seconds="${SOAK_SECONDS:-120}"
  echo "=== find_package(kvferry) from an outside project"
  rm -rf build/install build/consumer
  cmake --install build/release --prefix build/install >/dev/null
  cmake -S tests/consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
  cmake --build build/consumer
  ./build/consumer/consumer
fi
if [[ " ${presets[*]} " == *" asan "* ]]; then
  # An installed sanitizer build must carry its flags to whoever links it.
  echo "=== find_package(kvferry) from an outside project, asan install"
  rm -rf build/install-asan build/consumer-asan
  cmake --install build/asan --prefix build/install-asan >/dev/null
  cmake -S tests/consumer -B build/consumer-asan -G Ninja \
    -DCMAKE_PREFIX_PATH="$PWD/build/install-asan" >/dev/null
  cmake --build build/consumer-asan
  ASAN_OPTIONS=detect_leaks=1 ./build/consumer-asan/consumer
fi
if [[ " ${presets[*]} " == *" clang "* ]]; then
  echo "=== clang -Wthread-safety -Werror build; ${FUZZ_SECONDS:-30} s each of wire-decoder and handshake fuzzing"
  bash scripts/fuzz.sh
fi
echo "kvferry: ${total:-0} passed, 0 failed, ${skipped:-0} skipped"
