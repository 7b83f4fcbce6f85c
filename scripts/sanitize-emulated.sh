#!/usr/bin/env bash
# Runs the emulated CUDA kernels under ThreadSanitizer and AddressSanitizer (CI calls this).
#
#   1. Self-test (kernels/emu/sanitizer_selftest.cpp): a correct toy kernel must run clean under
#      both sanitizers, a toy kernel missing a __syncthreads() must be reported by TSan, and one
#      writing past a shared array must be reported by ASan. This proves the checks can fail.
#   2. The emulated-kernel suite (tests/emulated_kernels.rs), and the device API's positives
#      kernels (the unit test `device::prepared`, on its reduced grid), with the emulation
#      library built with -fsanitize=thread, then -fsanitize=address (SUPCON_EMU_SANITIZE, see
#      build/emulation.rs): any report fails the run.
#
# Needs a C++20 g++ with libtsan and libasan, and cargo; no GPU, no nvcc.
# Environment: SANITIZE_TARGET_DIR (default target/sanitize: one cargo target dir per
# sanitizer), SANITIZE_TEST_FILTER (a cargo test name filter, default: every test), CXX.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${SANITIZE_TARGET_DIR:-$repo/target/sanitize}
mkdir -p "$out"
cxx=${CXX:-g++}
suppressions=$repo/scripts/tsan-suppressions.txt
cxx_flags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -pthread -Wall -Wextra -Werror
           -include kernels/emu/cuda_emu.h -I kernels)

fail() {
    echo "sanitize-emulated: FAILED: $*" >&2
    exit 1
}

# run_selftest SANITIZER MODE: runs the self-test binary, output in $log, exit status in $status.
run_selftest() {
    log=$out/selftest-$1-$2.log
    set +e
    TSAN_OPTIONS="exitcode=66" "$out/selftest-$1" "$2" >"$log" 2>&1
    status=$?
    set -e
}

echo "== sanitizer self-test"
for sanitizer in thread address; do
    "$cxx" "${cxx_flags[@]}" -fsanitize=$sanitizer kernels/emu/sanitizer_selftest.cpp kernels/emu/cuda_emu.cpp \
        -o "$out/selftest-$sanitizer"
    run_selftest $sanitizer synchronised
    if [ $status -ne 0 ] || grep -q "Sanitizer" "$log"; then
        cat "$log" >&2
        fail "the correct toy kernel is reported by -fsanitize=$sanitizer"
    fi
done
run_selftest thread racy
if [ $status -eq 0 ] || ! grep -q "WARNING: ThreadSanitizer: data race" "$log"; then
    cat "$log" >&2
    fail "ThreadSanitizer did not report the toy kernel that lacks a __syncthreads()"
fi
run_selftest address out_of_bounds
if [ $status -eq 0 ] || ! grep -q "ERROR: AddressSanitizer: global-buffer-overflow" "$log"; then
    cat "$log" >&2
    fail "AddressSanitizer did not report the toy kernel that writes past its shared array"
fi
echo "ok: clean kernel passes, missing barrier and shared-memory overflow are reported"

filter=(${SANITIZE_TEST_FILTER:+"$SANITIZE_TEST_FILTER"})
echo "== emulated kernels under ThreadSanitizer"
SUPCON_EMU_SANITIZE=thread CARGO_TARGET_DIR=$out/thread \
    TSAN_OPTIONS="suppressions=$suppressions exitcode=66" \
    cargo test --features emulation --test emulated_kernels -- "${filter[@]}" ||
    fail "the emulated kernels under ThreadSanitizer"
SUPCON_EMU_SANITIZE=thread CARGO_TARGET_DIR=$out/thread SUPCON_TEST_REDUCED_GRID=1 \
    TSAN_OPTIONS="suppressions=$suppressions exitcode=66" \
    cargo test --features emulation --lib device::prepared ||
    fail "the prepared-inputs kernels under ThreadSanitizer"

echo "== emulated kernels under AddressSanitizer"
SUPCON_EMU_SANITIZE=address CARGO_TARGET_DIR=$out/address \
    ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1" \
    cargo test --features emulation --test emulated_kernels -- "${filter[@]}" ||
    fail "the emulated kernels under AddressSanitizer"
SUPCON_EMU_SANITIZE=address CARGO_TARGET_DIR=$out/address SUPCON_TEST_REDUCED_GRID=1 \
    ASAN_OPTIONS="detect_leaks=1:strict_string_checks=1" \
    cargo test --features emulation --lib device::prepared ||
    fail "the prepared-inputs kernels under AddressSanitizer"

echo "sanitize-emulated: all checks passed"
