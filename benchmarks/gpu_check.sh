#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py; docs/benchmarks.md records its table). Runs from the source tree with
# whatever python3 has torch, timm and triton; no install, no network; the table is rewritten into
# $OUT/gpu_check.md after every row. What each section needs beyond torch and triton:
#   scans, model img/s          timm (and its own dependencies: huggingface_hub, safetensors, pyyaml)
#   trainer, end to end         hydra-core, omegaconf, antlr4-python3-runtime (train.py's configs), tqdm, matplotlib
#                               (curves.png), Pillow and torchvision (the folder loader), scikit-learn (the digits)
#   FFCV contexts (2+ GPUs)     ffcv and numba (compiled against OpenCV and libjpeg-turbo: usually absent; skipped)
# On a machine without hydra-core, put wheels in .whl/ first (pure Python, so any machine can download them):
#   pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1 timm==1.0.31
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3      # omegaconf's parser: an sdist only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site:${PYTHONPATH:-}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
cd benchmarks
PYTHONPATH=../src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 timeout 470 "$PY" gpu_check.py "$@"
