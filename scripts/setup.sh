#!/usr/bin/env bash
# Installs dopd and its test/plot extras into the current Python environment.
# Without an NVIDIA GPU it pins the CPU build of torch first (torch==2.13.0 here is the CPU wheel
# on local disk), so that resolving dopd's dependencies never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    python3 -m pip install --quiet "torch==2.13.0"
fi
python3 -m pip install --quiet -e ".[test]"
