#!/usr/bin/env bash
# Builds the clang preset (-Wthread-safety -Werror, libFuzzer) and runs each
# fuzzer for FUZZ_SECONDS (default 30; two fuzzers, so twice that in all):
#   wire_fuzzer       the wire decoder, from a generated seed corpus;
#   handshake_fuzzer  the listener's control plane over loopback sockets, from
#                     the same seeds behind its mode bytes (see the fuzzer).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
cmake --preset clang >/dev/null
cmake --build --preset clang -j "$(nproc)"
corpus=build/clang/wire-corpus
rm -rf "$corpus" && mkdir -p "$corpus"
./build/clang/tests/fuzz/wire_make_seeds "$corpus"
echo "=== wire_fuzzer, ${seconds} s"
./build/clang/tests/fuzz/wire_fuzzer -max_total_time="$seconds" -print_final_stats=1 \
  -max_len=4096 "$corpus" 2>&1 | tail -n 15

# handshake_fuzzer inputs: byte 0 = mode, byte 1 = chunk size - 1, then the
# payload. Every wire seed goes in raw (mode 0), sealed after a valid HELLO
# (mode 1), as a wrong-proof PROOF's descriptor (mode 3) and sealed after a
# whole handshake (mode 4, byte 0x08); a WELCOME's body (a whole descriptor)
# also goes in as an authenticated PROOF's descriptor (mode 2).
seeds=build/clang/wire-seeds
hs_corpus=build/clang/handshake-corpus
rm -rf "$seeds" "$hs_corpus" && mkdir -p "$seeds" "$hs_corpus"
./build/clang/tests/fuzz/wire_make_seeds "$seeds"
for seed in "$seeds"/*; do
  name=$(basename "$seed")
  for mode in 0 1 3 8; do
    { printf "\\x0${mode}\\xff"; cat "$seed"; } >"$hs_corpus/mode${mode}-${name}"
  done
  { printf '\x00\x00'; cat "$seed"; } >"$hs_corpus/mode0-bytewise-${name}"
  if [ "$(od -An -tu2 -j6 -N2 "$seed" | tr -d ' ')" = 4 ]; then  # a WELCOME
    for mode in 2 3 6; do
      { printf "\\x0${mode}\\xff"; tail -c +13 "$seed"; } >"$hs_corpus/mode${mode}-body-${name}"
    done
  fi
done
echo "=== handshake_fuzzer, ${seconds} s"
./build/clang/tests/fuzz/handshake_fuzzer -max_total_time="$seconds" -print_final_stats=1 \
  -max_len=4096 -artifact_prefix=build/clang/ "$hs_corpus" 2>&1 | grep -v '^kvferry: ' | tail -n 15
