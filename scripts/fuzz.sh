#!/usr/bin/env bash
# Builds the clang preset (-Wthread-safety -Werror, libFuzzer) and fuzzes the
# wire decoder for FUZZ_SECONDS (default 30) from a generated seed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
cmake --preset clang >/dev/null
cmake --build --preset clang -j "$(nproc)"
corpus=build/clang/wire-corpus
rm -rf "$corpus" && mkdir -p "$corpus"
./build/clang/tests/fuzz/wire_make_seeds "$corpus"
./build/clang/tests/fuzz/wire_fuzzer -max_total_time="$seconds" -print_final_stats=1 \
  -max_len=4096 "$corpus" 2>&1 | tail -n 15
