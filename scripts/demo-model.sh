#!/usr/bin/env bash
# A tiny transformer served disaggregated through kvferry's Python API
# (examples/model/): builds the extension (release preset), serves a set of
# prompts monolithic and prefill -> decode, prints whether the outputs match
# and each request's TTFT split. Arguments go to examples/model/demo.py
# (--prefill-tp N, --decode-tp N, --requests N, --max-new N, --burst).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset release >/dev/null
cmake --build build/release -j2 --target kvferry_python >/dev/null
PYTHONPATH=build/release/python exec /usr/bin/python3 -B examples/model/demo.py "$@"
