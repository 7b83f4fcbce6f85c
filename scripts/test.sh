#!/usr/bin/env bash
# Every test: the Rust crate's (all features) and the Python package's (pytest, in the
# environment scripts/python-env.sh prepares).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --all-features
python=$(scripts/python-env.sh)
"$python" -m pytest python/tests -q
