#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU and a CUDA 13 driver (>= 580), from the
# bundle that scripts/build-gpu-bundle.sh built on a machine without one (nothing is compiled
# or downloaded here). In under 8 minutes it runs
#   1. every CUDA correctness test (the bundled test binaries, SUPCON_REQUIRE_CUDA=1 so that
#      none can skip),
#   2. the Python package's pytest suite on the bundled wheel (SUPCON_REQUIRE_CUDA=1 again),
#   3. compute-sanitizer memcheck and racecheck over a small ragged run, where the tool exists,
#   4. the performance table of our kernels (bin/cuda_table),
#   5. the same table for the unfused PyTorch baseline (torch_baseline.py, eager and
#      torch.compile), after checking its loss and gradient against our CUDA backend, and
#   6. python/bench.py --device cuda: supcon.torch.SupConLoss in a PyTorch training step
#      against the original formula and a lean one, in one process,
# and prints a markdown report, also written to $OUT/gpu-check.md when OUT is set (with the
# full logs in $OUT/gpu-check.log).
#
# Usage: bash gpu-bundle/gpu-check.sh        (the bundle's own copy; any working directory)
# Environment: SUPCON_GPU_SIZES (default 4096,16384,32768,65536,262144; 32768 is about the
# largest N the PyTorch original fits on one H200: ~34 GB of N x N matrices), SUPCON_GPU_DIM (128).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sizes=${SUPCON_GPU_SIZES:-4096,16384,32768,65536,262144}
dim=${SUPCON_GPU_DIM:-128}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
report=$work/report.md
log=$work/log.txt
last=$work/last.txt
failures=0

say() { printf '%s\n' "$*" >>"$report"; }
# Runs a command with a time limit; its output goes to $last and is appended to the log.
# Returns the command's status.
logged() {
    local limit=$1 status
    shift
    timeout --kill-after=10 "$limit" "$@" >"$last" 2>&1
    status=$?
    printf '\n==== %s (exit %s)\n' "$*" "$status" >>"$log"
    cat "$last" >>"$log"
    return "$status"
}
# Seconds left until second $1 of the run (at least 10): every stage ends by a fixed deadline,
# so the whole check ends within 8 minutes (the last deadline is 460 s, plus 10 s of kill grace)
# whatever hangs.
until_second() {
    local left=$(($1 - SECONDS))
    echo $((left > 10 ? left : 10))
}
describe_status() {
    case $1 in
        0) echo "ok" ;;
        124 | 137) echo "TIMED OUT" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

# The binaries travel packed (scripts/build-gpu-bundle.sh): unpacked once, beside this script.
if [[ ! -x $here/bin/cuda_table && -f $here/binaries.tar.xz ]]; then
    tar -C "$here" -xJf "$here/binaries.tar.xz" ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$here/binaries.tar.xz" "$here"
fi
if [[ ! -x $here/bin/cuda_table ]]; then
    echo "gpu-check: no bundle next to this script ($here/bin/cuda_table is missing):" \
        "build it with scripts/build-gpu-bundle.sh and run gpu-bundle/gpu-check.sh" >&2
    exit 2
fi

say "# supcon GPU check, $(date -u +%Y-%m-%d\ %H:%M\ UTC)"
say ""
card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    head -n 1)
say "- card: ${card:-unknown (nvidia-smi failed)}"
while IFS= read -r line; do say "- $line"; done <"$here/BUILD_INFO"
# NCCL for the sharded loss's test: cudarc loads libnccl.so, and PyTorch's nvidia-nccl wheel
# ships only libnccl.so.2, so a link in the work folder goes on the loader's path.
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib", "libnccl.so.2"))' 2>/dev/null ||
    ls /usr/lib/x86_64-linux-gnu/libnccl.so.2 2>/dev/null)
if [[ -n $nccl && -e $nccl ]]; then
    mkdir -p "$work/nccl" && ln -sf "$nccl" "$work/nccl/libnccl.so"
    export LD_LIBRARY_PATH="$work/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "- NCCL: $nccl"
else
    say "- NCCL: not found (the sharded loss's NCCL test fails under SUPCON_REQUIRE_CUDA)"
fi
say ""

# 1. Correctness: every test of the CUDA backend.
say "## Correctness (CUDA backend tests)"
say ""
say "| test binary | filter | passed | failed | ignored | result | seconds |"
say "|---|---|---|---|---|---|---|"
for binary in "$here"/tests/*; do
    name=$(basename "$binary")
    # Binaries of CUDA tests run whole; the others only their tests with `cuda` in the path.
    filter=cuda
    [[ $name == *cuda* ]] && filter=""
    start=$SECONDS
    SUPCON_REQUIRE_CUDA=1 logged "$(until_second 100)" "$binary" ${filter:+"$filter"}
    status=$?
    counts=$(grep -E '^test result:' "$last" | tail -n 1 |
        sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 | \2 | \3/')
    [[ $counts == *"|"* ]] || counts="? | ? | ?"
    ((status == 0)) || failures=$((failures + 1))
    say "| $name | ${filter:-(all)} | $counts | $(describe_status $status) | $((SECONDS - start)) |"
done
say ""

# 2. The Python package: the bundled wheel installed into a folder of this run, then pytest.
say "## Python package (pytest on the bundled wheel)"
say ""
python_ok=0
if ! python3 -c 'import torch, numpy, pytest' 2>/dev/null; then
    say "not available (no python3 with torch, numpy and pytest)"
elif ! logged 60 python3 -m pip install --quiet --no-index --no-deps --target "$work/site" \
    "$here"/python/wheels/supcon-*.whl; then
    failures=$((failures + 1))
    say "the wheel did not install: FAILED (see the log)"
else
    python_ok=1
    start=$SECONDS
    SUPCON_REQUIRE_CUDA=1 PYTHONPATH="$work/site" logged "$(until_second 160)" \
        python3 -m pytest -q -p no:cacheprovider "$here/python/tests"
    status=$?
    ((status == 0)) || failures=$((failures + 1))
    summary=$(grep -E '[0-9]+ (passed|failed)' "$last" | tail -n 1)
    say "pytest python/tests: ${summary:-no summary} — $(describe_status $status) in $((SECONDS - start)) s"
    grep -E '^FAILED' "$last" | head -n 20 | sed 's/^/    /' >>"$report"
fi
say ""

# 3. compute-sanitizer over a ragged problem (N = 666, D = 136: partial tiles everywhere, 16-byte
#    copies with a zero-filled partial k-step on the tensor-core path).
say "## compute-sanitizer"
say ""
sanitizer=$(command -v compute-sanitizer)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [[ -z $sanitizer && -x $candidate ]] && sanitizer=$candidate
done
if [[ -z $sanitizer ]]; then
    say "not available (no compute-sanitizer on this machine)"
else
    say "| tool | run | result | summary |"
    say "|---|---|---|---|"
    deadline=160
    for tool in memcheck racecheck; do
        deadline=$((deadline + 40))
        logged "$(until_second $deadline)" "$sanitizer" --tool "$tool" --error-exitcode 3 \
            "$here/bin/cuda_table" --sizes 666 --dim 136 --dtypes f32,bf16 --repeats 1 --cap-s 1
        status=$?
        summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$last" | tail -n 1 | sed 's/^=* *//')
        ((status == 0)) || failures=$((failures + 1))
        say "| $tool | cuda_table N = 666, D = 136, f32 + bf16 (simt and mma), fwd + bwd | $(describe_status $status) | ${summary:-} |"
    done
fi
say ""

# 4, 5 and 6. Performance.
say "## Performance: forward + backward, D = $dim, V = 2, labels from 100 classes"
say ""
say "| implementation | dtype | N | D | fwd+bwd (ms) | TFLOP/s (6·N²·D) | peak memory (MiB) |"
say "|---|---|---|---|---|---|---|"
logged "$(until_second 290)" "$here/bin/cuda_table" --sizes "$sizes" --dim "$dim" \
    --dtypes f32,bf16 --cap-s 8 --budget-s 45
status=$?
grep -E '^\| supcon' "$last" >>"$report"
if ((status != 0)); then
    failures=$((failures + 1))
    say "| supcon cuda | | | | $(describe_status $status) | | |"
fi
# The one-positive denominator (two forward sweeps) beside the default, at the largest size.
logged "$(until_second 300)" "$here/bin/cuda_table" --sizes "${sizes##*,}" --dim "$dim" \
    --dtypes bf16 --precisions auto --denominator one-positive --cap-s 4 --budget-s 10
status=$?
grep -E '^\| supcon' "$last" >>"$report"
if ((status != 0)); then
    failures=$((failures + 1))
    say "| supcon cuda mma, one positive | bf16 | | | $(describe_status $status) | | |"
fi
# Label sets (K = 64, packed on the device) and a positives cap (bounds from an O(B²) kernel)
# beside the label rows, at the largest size.
logged "$(until_second 310)" "$here/bin/cuda_table" --sizes "${sizes##*,}" --dim "$dim" \
    --dtypes bf16 --precisions auto --label-sets 64 --positives-cap 8 --cap-s 4 --budget-s 10
status=$?
grep -E '^\| supcon' "$last" >>"$report"
if ((status != 0)); then
    failures=$((failures + 1))
    say "| supcon cuda mma, label sets K = 64, cap 8 | bf16 | | | $(describe_status $status) | | |"
fi
# The fused normalisation (row scales, then the SIMT kernels) beside the plain bf16 rows, at the
# largest size.
logged "$(until_second 316)" "$here/bin/cuda_table" --sizes "${sizes##*,}" --dim "$dim" \
    --dtypes bf16 --precisions f32 --normalize --cap-s 4 --budget-s 10
status=$?
grep -E '^\| supcon' "$last" >>"$report"
if ((status != 0)); then
    failures=$((failures + 1))
    say "| supcon cuda simt, normalize | bf16 | | | $(describe_status $status) | | |"
fi
# O(N·D) memory: a million rows complete on the tensor-core kernels (one timed step).
logged "$(until_second 330)" "$here/bin/cuda_table" --sizes 1048576 --dim "$dim" \
    --dtypes bf16 --precisions auto --repeats 1 --cap-s 1 --budget-s 60
status=$?
grep -E '^\| supcon' "$last" >>"$report"
if ((status != 0)); then
    failures=$((failures + 1))
    say "| supcon cuda mma | bf16 | 1048576 | | $(describe_status $status) | | |"
fi
if ! python3 -c 'import torch, numpy' 2>/dev/null; then
    say "| torch | | | | not available (no python3 with torch and numpy) | | |"
else
    limit=$(until_second 390)
    logged "$limit" python3 "$here/torch_baseline.py" --sizes "$sizes" --dim "$dim" \
        --verify-with "$here/bin/supcon" --budget-s $((limit * 2 / 3))
    status=$?
    grep -E '^\| torch' "$last" >>"$report"
    verify=$(grep -E '^verify:' "$last" | tail -n 1)
    ((status == 0)) || failures=$((failures + 1))
    say ""
    say "PyTorch baseline: $(describe_status $status). ${verify:-verify: no result}"
fi
say ""
say "## Performance in PyTorch: python/bench.py --device cuda (f32, D = 128, V = 2)"
say ""
if ((python_ok == 0)); then
    say "not run (the Python stage did not install the wheel)"
else
    PYTHONPATH="$work/site" logged "$(until_second 460)" python3 "$here/python/bench.py" \
        --device cuda --sizes 4096,16384,65536 --cap-s 5
    status=$?
    grep -E '^(\||Agreement)' "$last" >>"$report"
    ((status == 0)) || failures=$((failures + 1))
    say ""
    say "bench.py: $(describe_status $status)"
fi
say ""
say "Result: $( ((failures == 0)) && echo "all checks passed" || echo "$failures check(s) failed") in $SECONDS s."

cat "$report"
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    cp "$report" "$OUT/gpu-check.md"
    cp "$log" "$OUT/gpu-check.log"
fi
((failures == 0))
