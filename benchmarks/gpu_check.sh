#!/usr/bin/env bash
# Checks the scan and the model on CUDA, then measures img/s of T, S, B (docs/benchmarks.md records the output).
# Runs from the source tree with whatever python3 has torch and timm (no install, no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cd benchmarks
PYTHONPATH=../src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 timeout 480 "$PY" gpu_check.py "$@"
