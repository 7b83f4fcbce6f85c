//! Feature `cuda`: every `kernels/*.cu` compiled by nvcc into `OUT_DIR/<stem>.fatbin`, which
//! `src/kernels.rs` embeds with `include_bytes!` under `cfg(supcon_kernels_built)`.
//!
//! A fatbin holds SASS for each `sm_XX` and PTX for each `compute_XX` of `SUPCON_CUDA_ARCHS`
//! (comma-separated, default [`DEFAULT_CUDA_ARCHS`]). Without nvcc the build succeeds with a
//! warning and without the cfg, so the CUDA backend reports `Error::KernelsNotBuilt` instead of
//! the build failing on machines that never run CUDA.

use crate::{nvcc, ptxas, tracked_env};
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS for Ampere (sm_80, sm_86), Ada (sm_89) and Hopper (sm_90), plus compute_90 PTX that the
/// driver can JIT for newer GPUs. `src/cuda/enabled/checks.rs` relies on sm_80 being the oldest.
const DEFAULT_CUDA_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90,compute_90";

/// Builds the fatbins into `out_dir` and sets `cfg(supcon_kernels_built)`, or warns if there is
/// no nvcc.
pub fn build(manifest_dir: &Path, kernel_dir: &Path, out_dir: &Path, kernels: &[PathBuf]) {
    let archs = tracked_env("SUPCON_CUDA_ARCHS").unwrap_or_else(|| DEFAULT_CUDA_ARCHS.into());
    let policy = ptxas::Policy::from_env();
    // Checked before looking for nvcc, so that a bad value fails on every machine.
    let gencode = gencode_args(&archs);
    let Some(nvcc) = nvcc::find(manifest_dir) else {
        println!(
            "cargo::warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, Python nvidia/cu13, \
             .cuda-venv): the CUDA kernels are not built and the CUDA backend will report \
             KernelsNotBuilt"
        );
        return;
    };
    let expects_sass = gencode.iter().any(|arg| arg.contains("code=sm_"));
    let mut report = ptxas::Report::new(&nvcc, &archs, expects_sass);
    for source in kernels {
        let stem = source.file_stem().expect("a file name").to_string_lossy();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let output = Command::new(&nvcc)
            .arg("--fatbin")
            // `--threads 0`: the architectures compile in parallel, on every CPU; `-lineinfo`:
            // source lines for profilers and compute-sanitizer; `-Xptxas -v`: the report.
            .args(["-std=c++17", "-O3", "-lineinfo", "--threads", "0"])
            .args(["-Xptxas", "-v"])
            .args(&gencode)
            .arg("-I")
            .arg(kernel_dir)
            .arg("-o")
            .arg(&fatbin)
            .arg(source)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "nvcc failed on {} ({}):\n{log}",
            source.display(),
            output.status
        );
        report.add(source, &log);
    }
    report.finish(out_dir, &policy);
    println!("cargo::rustc-cfg=supcon_kernels_built");
}

/// `-gencode` arguments for a comma-separated list of `sm_XX` (SASS) and `compute_XX` (PTX).
fn gencode_args(archs: &str) -> Vec<String> {
    let mut args = Vec::new();
    for arch in archs
        .split(',')
        .map(str::trim)
        .filter(|arch| !arch.is_empty())
    {
        let (kind, number) = arch.split_once('_').unwrap_or(("", ""));
        assert!(
            matches!(kind, "sm" | "compute")
                && !number.is_empty()
                && number.chars().all(|c| c.is_ascii_alphanumeric()),
            "SUPCON_CUDA_ARCHS: `{arch}` is neither sm_XX nor compute_XX"
        );
        args.push("-gencode".into());
        args.push(format!("arch=compute_{number},code={arch}"));
    }
    assert!(!args.is_empty(), "SUPCON_CUDA_ARCHS names no architecture");
    args
}
