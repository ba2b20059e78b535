#!/usr/bin/env bash
# kvferry's main job: builds the release preset and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
cmake --preset release >/dev/null
cmake --build --preset release --target kvferry_demo >/dev/null
exec ./build/release/examples/kvferry_demo "$@"
