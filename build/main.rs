//! Build script (`build = "build/main.rs"`). In order:
//!
//! 1. Always: rerun when `build/` or `kernels/` change, and declare `cfg(supcon_kernels_built)`.
//! 2. Feature `cuda`: [`fatbins::build`] compiles every `kernels/*.cu` with nvcc (found by
//!    [`nvcc::find`]) into a fatbin in `OUT_DIR`, checks the ptxas resource report
//!    ([`ptxas`]) and sets `cfg(supcon_kernels_built)`. Without nvcc it only warns, and the CUDA
//!    backend reports `Error::KernelsNotBuilt`.
//! 3. Feature `emulation` (tests only): [`emulation::build`] compiles the same `.cu` files as
//!    C++ against the host emulation in `kernels/emu/` into a static library.
//!
//! Every environment variable the script reads, other than those cargo sets, goes through
//! [`tracked_env`]; each module's documentation lists its own.

mod fatbins;
mod nvcc;
mod ptxas;

// Only with the feature, because the `cc` build-dependency exists only with it (cargo passes
// the package's features to the build script as `cfg(feature = …)`).
#[cfg(feature = "emulation")]
mod emulation;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    // `build` covers every module of this script, not just the one cargo compiles first.
    println!("cargo::rerun-if-changed=build");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rustc-check-cfg=cfg(supcon_kernels_built)");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("kernels");
    let kernels = kernel_sources(&kernel_dir);
    // A run-time check rather than a `cfg`: the nvcc path needs no build-dependency, so it is
    // compiled (and linted) in every feature set.
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        fatbins::build(&manifest_dir, &kernel_dir, &out_dir, &kernels);
    }
    #[cfg(feature = "emulation")]
    emulation::build(&kernel_dir, &kernels);
}

/// Reads an environment variable and tells cargo to rerun when it changes. Empty counts as
/// unset.
fn tracked_env(name: &str) -> Option<String> {
    println!("cargo::rerun-if-env-changed={name}");
    env::var(name).ok().filter(|value| !value.is_empty())
}

/// The kernel translation units: `kernels/*.cu`, sorted.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    assert!(!sources.is_empty(), "no .cu files in {}", dir.display());
    sources
}
