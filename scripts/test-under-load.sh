#!/usr/bin/env bash
# Runs the test command (scripts/test.sh) several times in a row while
# CPU-bound processes compete for the cores, the way a serving host or a
# shared CI machine is loaded. Any failing run fails the script.
# Usage: scripts/test-under-load.sh [RUNS=3] [LOAD_PROCESSES=2] [test.sh args...]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
load=${2:-2}
shift $(( $# > 2 ? 2 : $# )) || true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq 1 "$load"); do
  ( while :; do :; done ) &
  pids+=($!)
done
echo "test-under-load: $load CPU-bound processes running (pids ${pids[*]})"
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  echo "=== test-under-load: run $i of $runs"
  bash scripts/test.sh "$@"
  echo "=== test-under-load: run $i passed in $(( $(date +%s) - start )) s"
done
echo "test-under-load: $runs of $runs runs passed under $load competing processes"
