#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels from PyPI into ./.cuda-venv (git-ignored) and
# prints the path of nvcc. Only the 13.0 wheels ship nvcc, and every part must be pinned or pip
# mixes in newer parts whose PTX a 580 driver cannot load.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-venv
nvcc="$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc"
if ! ls $nvcc >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
realpath $nvcc
