#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/gpu-check.sh runs on one, into one
# folder (default gpu-bundle/, git-ignored):
#   tests/    the release test binaries that hold CUDA tests (the library's unit tests and every
#             tests/*.rs that uses the CUDA backend), built by `cargo test --release --no-run`
#   benches/  the CUDA criterion benchmark (`cargo bench --no-run`)
#   bin/      examples/cuda_table.rs and the supcon command line (for the PyTorch cross-check)
#   python/   the Python package as a wheel (wheels/), its pytest suite (tests/) and its
#             benchmark (bench.py); examples/python/digits.py and README.md, which tests read
#   gpu-check.sh, torch_baseline.py, BUILD_INFO
# tests/, benches/ and bin/ travel packed in binaries.tar.xz (gpu-check.sh unpacks them).
# All with --all-features and the kernels compiled by the pinned nvcc 13.0
# (scripts/install-nvcc.sh), by default for sm_90 only (the H200; SUPCON_CUDA_ARCHS overrides),
# which keeps the bundle small. Binaries are x86-64 Linux, stripped of debug info.
#
# Usage: scripts/build-gpu-bundle.sh [BUNDLE_DIR]
# Environment: SUPCON_CUDA_ARCHS (default sm_90), NVCC (default: the pinned wheel),
#              SUPCON_BUNDLE_TARGET_DIR (default target/gpu-bundle-build: a target directory of
#              its own, so that the sm_90-only kernels do not replace a normal build's).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-gpu-bundle}
max_mib=48

export SUPCON_CUDA_ARCHS=${SUPCON_CUDA_ARCHS:-sm_90}
NVCC=${NVCC:-$(scripts/install-nvcc.sh)}
export NVCC
export CARGO_TARGET_DIR=$(realpath -m "${SUPCON_BUNDLE_TARGET_DIR:-target/gpu-bundle-build}")
# One fatbin cache for the tests' build and the wheel's (build/fatbins.rs): nvcc runs once.
export SUPCON_FATBIN_CACHE=${SUPCON_FATBIN_CACHE:-$CARGO_TARGET_DIR/fatbin-cache}
export CARGO_TERM_COLOR=never
echo "== nvcc: $NVCC ($SUPCON_CUDA_ARCHS); target directory $CARGO_TARGET_DIR" >&2

messages=$(mktemp -d)
wheels=$(mktemp -d)
trap 'rm -rf "$messages" "$wheels"' EXIT
json=(--message-format=json-render-diagnostics)
echo "== cargo test --release --all-features --no-run" >&2
cargo test --release --all-features --no-run "${json[@]}" >"$messages/test.json"
echo "== cargo bench --all-features --no-run" >&2
cargo bench --all-features --no-run "${json[@]}" >"$messages/bench.json"
echo "== cargo build --release --all-features --example cuda_table --bin supcon" >&2
cargo build --release --all-features --example cuda_table --bin supcon "${json[@]}" \
    >"$messages/build.json"

# Picks the artifacts out of cargo's JSON messages; fails unless the build script
# (build/fatbins.rs) embedded the kernels.
# Prints "DESTINATION<TAB>EXECUTABLE" lines.
select_artifacts() {
    python3 - "$messages" <<'PY'
import json, os, re, sys

folder = sys.argv[1]

def messages(name):
    with open(os.path.join(folder, name)) as f:
        for line in f:
            if line.startswith("{"):
                yield json.loads(line)

def uses_cuda(src_path):
    with open(src_path, encoding="utf-8") as f:
        return re.search(r"CudaBackend|supcon::cuda", f.read()) is not None

kernels_built = False
out = []
for m in messages("test.json"):
    # package_id: "path+file:///…#supcon@0.1.0" (older cargo: "supcon 0.1.0 (path+…)").
    package = m.get("package_id", "")
    if m.get("reason") == "build-script-executed" and (
        "#supcon@" in package or package.startswith("supcon ")
    ):
        kernels_built |= "supcon_kernels_built" in m.get("cfgs", [])
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    target = m["target"]
    if not m["profile"]["test"]:
        continue
    # The library's kinds: ["lib"], or the crate types ["rlib", "cdylib"].
    if {"lib", "rlib", "cdylib"} & set(target["kind"]):
        out.append(("tests/lib", m["executable"]))
    elif "test" in target["kind"] and uses_cuda(target["src_path"]):
        out.append((f"tests/{target['name']}", m["executable"]))
for m in messages("bench.json"):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
            "bench" in m["target"]["kind"] and m["target"]["name"] == "cuda":
        out.append(("benches/cuda", m["executable"]))
for m in messages("build.json"):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
            m["target"]["name"] in ("cuda_table", "supcon"):
        out.append((f"bin/{m['target']['name']}", m["executable"]))
if not kernels_built:
    sys.exit("the build script (build/fatbins.rs) did not embed the CUDA kernels "
             "(no cfg supcon_kernels_built): is nvcc there?")
wanted = {"tests/lib", "benches/cuda", "bin/cuda_table", "bin/supcon"}
missing = wanted - {d for d, _ in out}
if missing:
    sys.exit(f"artifacts not found in cargo's messages: {sorted(missing)}")
for destination, executable in out:
    print(f"{destination}\t{executable}")
PY
}
artifacts=$(select_artifacts)

# The wheel: pip fetches maturin into an isolated build environment; the kernels come from
# the same nvcc and architectures as above.
echo "== pip wheel ./python" >&2
# Its own target directory: the Python crate's dependency graph unifies other features, and
# its builds in the tests' directory left two ndarray builds there that later test builds
# could not tell apart.
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/wheel" \
    python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$wheels" ./python >&2
python3 - "$wheels" <<'PY'
import sys, zipfile, pathlib
wheel, = pathlib.Path(sys.argv[1]).glob("supcon-*.whl")
names = zipfile.ZipFile(wheel).namelist()
extension = [n for n in names if n.startswith("supcon/_supcon") and n.endswith(".so")]
if not extension:
    sys.exit(f"{wheel.name} holds no extension module: {names}")
# A fatbin's magic number (little-endian 0xBA55ED50): the kernels are embedded.
if b"\x50\xed\x55\xba" not in zipfile.ZipFile(wheel).read(extension[0]):
    sys.exit(f"{wheel.name}: the extension holds no CUDA fatbin (was nvcc found?)")
PY

rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/benches" "$bundle/bin"
while IFS=$'\t' read -r destination executable; do
    cp "$executable" "$bundle/$destination"
    strip --strip-debug "$bundle/$destination"
done <<<"$artifacts"
cp scripts/gpu-check.sh scripts/torch_baseline.py README.md "$bundle/"
chmod +x "$bundle/gpu-check.sh"
mkdir -p "$bundle/python/wheels" "$bundle/python/tests" "$bundle/examples/python"
mv "$wheels"/supcon-*.whl "$bundle/python/wheels/"
cp python/tests/*.py "$bundle/python/tests/"
cp python/bench.py "$bundle/python/"
cp examples/python/digits.py "$bundle/examples/python/"

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD 2>/dev/null; then
    commit="$commit+uncommitted-changes"
fi
{
    echo "commit: $commit"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "rustc: $(rustc --version)"
    echo "nvcc: $("$NVCC" --version | tail -n 1)"
    echo "cuda archs: $SUPCON_CUDA_ARCHS"
} >"$bundle/BUILD_INFO"

# The binaries each embed the same ~22 MiB of fatbins: one solid xz archive (a 64 MiB window)
# keeps them once, ~5 MiB in all; gpu-check.sh unpacks it beside itself.
echo "== packing the binaries into binaries.tar.xz" >&2
tar -C "$bundle" -cf - tests benches bin | xz -9 -T1 >"$bundle/binaries.tar.xz"
rm -rf "$bundle/tests" "$bundle/benches" "$bundle/bin"

size_kib=$(du -sk "$bundle" | cut -f1)
echo "== $bundle: $((size_kib / 1024)) MiB" >&2
find "$bundle" -type f -printf '%P\t%s\n' | sort >&2
if ((size_kib > max_mib * 1024)); then
    echo "the bundle exceeds $max_mib MiB: the device machine takes 64 MiB with the tree" >&2
    exit 1
fi
