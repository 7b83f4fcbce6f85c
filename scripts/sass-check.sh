#!/usr/bin/env bash
# Reads the SASS of the built fatbins (no GPU needed): fails unless every tensor-core kernel
# (supcon_mma_*) holds HMMA instructions on sm_80 and sm_90 and the f32 kernels hold none, and
# prints each kernel's static instruction mix and that of its loops (scripts/sass_mix.py).
#
# Usage: scripts/sass-check.sh [FATBIN_DIR]; the default is the OUT_DIR of the newest release
# build with feature cuda. Installs the pinned cuobjdump and nvdisasm wheels into ./.cuda-venv
# (cuobjdump 13.2 disassembles through the nvdisasm it finds on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-venv
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
bin=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13/bin)
if [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.5.37
    bin=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13/bin)
fi
export PATH="$PWD/$bin:$PATH"

dir=${1:-}
if [ -z "$dir" ]; then
    newest=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/build/supcon-*/out/supcon_mma_forward.fatbin 2>/dev/null | head -n 1)
    [ -n "$newest" ] || { echo "sass-check: no fatbins; build with --release --features cuda first" >&2; exit 1; }
    dir=$(dirname "$newest")
fi

for arch in sm_80 sm_90; do
    for fatbin in "$dir"/*.fatbin; do
        cuobjdump -sass -arch "$arch" "$fatbin"
    done | python3 scripts/sass_mix.py --arch "$arch" --require-hmma supcon_mma_ \
        --forbid-hmma supcon_forward --forbid-hmma supcon_backward
done
