#!/usr/bin/env bash
# Creates .venv and installs everything the project and its tests need on a fresh machine of our kind
# (Debian, Python 3.11, no GPU). Idempotent: a second run only checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] && exit 0

# System libraries that ffcv compiles against; Slurm and munge for the tests' local cluster (nothing is started).
apt_pkgs=(pkg-config libturbojpeg0-dev libopencv-dev slurmctld slurmd slurm-client munge)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$PY" ] || python3 -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" wheel setuptools
# torch first, pinned: this machine kind serves exactly these from disk.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e '.[dev]'
# mamba-ssm / causal-conv1d without their CUDA code: the numerical reference for our scan, and the
# path our dispatcher takes on GPU nodes where the real wheels are installed.
if ! "$PY" -m pip show -q mamba-ssm >/dev/null 2>&1; then
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        "${PIP[@]}" --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1
fi
# The official MambaVision package: a test-only numerical reference. It pins old versions of everything, hence --no-deps.
"${PIP[@]}" --no-deps mambavision==1.2.0
rm -f "$VENV"/.setup-*
touch "$STAMP"
echo "[setup] done: $VENV"
