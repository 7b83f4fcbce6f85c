#!/usr/bin/env bash
# Makes ./.venv (git-ignored) a Python environment for the package's tests, example and
# benchmark: PyTorch from PyPI (the CUDA build, ~5.6 GB; it runs on the CPU too), NumPy,
# scikit-learn, matplotlib, tqdm, maturin and pytest; then (re)installs the package from
# ./python into it. Prints the venv's own python: resolving its symlink would name the base
# interpreter, which lacks these packages.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, numpy, sklearn, matplotlib, tqdm, maturin, pytest" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        torch numpy scikit-learn matplotlib tqdm maturin pytest >&2
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python >&2
echo "$PWD/$venv/bin/python"
