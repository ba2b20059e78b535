#!/usr/bin/env bash
# kvferry's main job: builds the release preset and runs the disaggregated
# serving engine (examples/disagg_serving/) with 2 prefill and 2 decode
# worker processes: live progress, then the summary. Extra arguments go to
# kvferry_serve (scripts/demo.sh --help lists them); they override the
# defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
cmake --preset release >/dev/null
cmake --build --preset release --target kvferry_serve kvferry_demo >/dev/null
exec ./build/release/examples/disagg_serving/kvferry_serve --prefill=2 --decode=2 --requests=48 "$@"
