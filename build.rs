//! Build script.
//!
//! - Feature `cuda`: compiles every `kernels/*.cu` with nvcc into a fatbin in `OUT_DIR` (SASS for
//!   each `sm_XX` and PTX for each `compute_XX` of `SUPCON_CUDA_ARCHS`, default
//!   `sm_80,sm_86,sm_89,sm_90,compute_90`), writes the `-Xptxas -v` resource usage to
//!   `OUT_DIR/ptxas-report.txt` (and to `$SUPCON_PTXAS_REPORT` if set), warns about register
//!   spills and stack frames (`SUPCON_DENY_SPILLS=1` turns them into a build failure) and sets
//!   `cfg(supcon_kernels_built)`. Without nvcc the build still succeeds, with a warning, and the
//!   CUDA backend reports `Error::KernelsNotBuilt`. nvcc is looked up in `NVCC`, then
//!   `CUDA_HOME`/`CUDA_PATH` (`bin/nvcc`), then `PATH`, then the `nvidia/cu13/bin` of a Python
//!   environment (`$SUPCON_PYTHON` or `python3`, then the repository's `.cuda-venv`).
//! - Feature `emulation` (tests only): compiles the same, unmodified `.cu` files as C++20 against
//!   the host emulation in `kernels/emu/` into a static library. `SUPCON_EMU_SANITIZE=thread` or
//!   `address` builds it with that sanitizer and links its runtime
//!   (`scripts/sanitize-emulated.sh`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "kernels";
const DEFAULT_CUDA_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90,compute_90";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={KERNEL_DIR}");
    println!("cargo::rustc-check-cfg=cfg(supcon_kernels_built)");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let kernels = kernel_sources(&manifest_dir.join(KERNEL_DIR));
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_fatbins(&manifest_dir, &out_dir, &kernels);
    }
    // The `cc` build-dependency exists only with the feature.
    #[cfg(feature = "emulation")]
    build_emulation(&manifest_dir, &kernels);
}

/// Reads an environment variable and tells cargo to rerun when it changes.
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

/// nvcc, in the documented search order.
fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    if let Some(nvcc) = tracked_env("NVCC") {
        let nvcc = PathBuf::from(nvcc);
        assert!(nvcc.is_file(), "NVCC={} does not exist", nvcc.display());
        return Some(nvcc);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = tracked_env(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return Some(nvcc);
            }
        }
    }
    if let Some(path) = tracked_env("PATH") {
        if let Some(nvcc) = env::split_paths(&path)
            .map(|dir| dir.join("nvcc"))
            .find(|nvcc| nvcc.is_file())
        {
            return Some(nvcc);
        }
    }
    python_nvcc(manifest_dir)
}

/// nvcc from the `nvidia-cuda-nvcc` wheel (`site-packages/nvidia/cu13/bin/nvcc`) of the active
/// Python, else of the repository's `.cuda-venv`.
fn python_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let python = tracked_env("SUPCON_PYTHON").unwrap_or_else(|| "python3".into());
    let listing = Command::new(&python)
        .args(["-c", "import nvidia; print('\\n'.join(nvidia.__path__))"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    let from_python = listing
        .lines()
        .map(|dir| Path::new(dir.trim()).join("cu13/bin/nvcc"))
        .find(|nvcc| nvcc.is_file());
    from_python.or_else(|| {
        let lib = manifest_dir.join(".cuda-venv/lib");
        let mut candidates: Vec<PathBuf> = fs::read_dir(&lib)
            .ok()?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .map(|python_dir| python_dir.join("site-packages/nvidia/cu13/bin/nvcc"))
            .filter(|nvcc| nvcc.is_file())
            .collect();
        candidates.sort();
        candidates.pop()
    })
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

/// One kernel's resources on one architecture, from `ptxas -v`.
#[derive(Default)]
struct PtxasEntry {
    kernel: String,
    arch: String,
    registers: u64,
    shared_bytes: u64,
    stack_bytes: u64,
    spill_store_bytes: u64,
    spill_load_bytes: u64,
}

/// The number right before `unit` in `line` ("Used 40 registers" → 40 for "registers").
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|pair| pair[1] == unit)
        .and_then(|pair| pair[0].parse().ok())
}

/// Parses the `ptxas info` lines of an nvcc run with `-Xptxas -v`.
fn parse_ptxas(log: &str) -> Vec<PtxasEntry> {
    let mut entries: Vec<PtxasEntry> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            entries.push(PtxasEntry {
                kernel,
                arch,
                ..PtxasEntry::default()
            });
        } else if let Some(entry) = entries.last_mut() {
            if line.contains("bytes stack frame") {
                let fields: Vec<u64> = line
                    .split(',')
                    .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                    .collect();
                if let [stack, stores, loads] = fields[..] {
                    entry.stack_bytes = stack;
                    entry.spill_store_bytes = stores;
                    entry.spill_load_bytes = loads;
                }
            } else if line.contains("Used") && line.contains("registers") {
                entry.registers = number_before(line, "registers").unwrap_or_default();
                entry.shared_bytes = line
                    .split(',')
                    .find(|part| part.trim_end().ends_with("bytes smem"))
                    .and_then(|part| part.split_whitespace().next()?.parse().ok())
                    .unwrap_or_default();
            }
        }
    }
    entries
}

fn build_fatbins(manifest_dir: &Path, out_dir: &Path, kernels: &[PathBuf]) {
    let archs = tracked_env("SUPCON_CUDA_ARCHS").unwrap_or_else(|| DEFAULT_CUDA_ARCHS.into());
    let deny_spills = tracked_env("SUPCON_DENY_SPILLS").is_some_and(|v| v != "0");
    let report_copy = tracked_env("SUPCON_PTXAS_REPORT");
    let gencode = gencode_args(&archs);
    let Some(nvcc) = find_nvcc(manifest_dir) else {
        println!(
            "cargo::warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, Python nvidia/cu13, \
             .cuda-venv): the CUDA kernels are not built and the CUDA backend will report \
             KernelsNotBuilt"
        );
        return;
    };

    let mut table = String::new();
    let mut raw_logs = String::new();
    let mut problems = Vec::new();
    let _ = writeln!(
        table,
        "ptxas resource usage (nvcc {}, targets {archs})",
        nvcc.display()
    );
    let _ = writeln!(
        table,
        "{:<28} {:<8} {:>9} {:>10} {:>11} {:>12} {:>11}",
        "kernel", "arch", "registers", "smem bytes", "stack bytes", "spill stores", "spill loads"
    );
    for source in kernels {
        let stem = source.file_stem().expect("a file name").to_string_lossy();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let output = Command::new(&nvcc)
            .arg("--fatbin")
            .args(["-std=c++17", "-O3", "-lineinfo", "--threads", "0"])
            .args(["-Xptxas", "-v"])
            .args(&gencode)
            .arg("-I")
            .arg(manifest_dir.join(KERNEL_DIR))
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
        let mut entries = parse_ptxas(&log);
        entries.sort_by(|a, b| (&a.kernel, &a.arch).cmp(&(&b.kernel, &b.arch)));
        if entries.is_empty() && gencode.iter().any(|arg| arg.contains("code=sm_")) {
            problems.push(format!(
                "{stem}.cu: no ptxas resource report could be parsed"
            ));
        }
        for e in &entries {
            let _ = writeln!(
                table,
                "{:<28} {:<8} {:>9} {:>10} {:>11} {:>12} {:>11}",
                e.kernel,
                e.arch,
                e.registers,
                e.shared_bytes,
                e.stack_bytes,
                e.spill_store_bytes,
                e.spill_load_bytes
            );
            if e.spill_store_bytes + e.spill_load_bytes > 0 || e.stack_bytes > 0 {
                problems.push(format!(
                    "{} on {}: {} bytes spill stores, {} bytes spill loads, {} bytes stack",
                    e.kernel, e.arch, e.spill_store_bytes, e.spill_load_bytes, e.stack_bytes
                ));
            }
        }
        let _ = writeln!(raw_logs, "==== nvcc {} ====\n{log}", source.display());
    }
    let report = format!("{table}\n{raw_logs}");
    let report_path = out_dir.join("ptxas-report.txt");
    fs::write(&report_path, &report)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", report_path.display()));
    if let Some(copy) = report_copy {
        fs::write(&copy, &report).unwrap_or_else(|e| panic!("cannot write {copy}: {e}"));
    }
    for problem in &problems {
        println!(
            "cargo::warning=CUDA kernels: {problem} (see {})",
            report_path.display()
        );
    }
    assert!(
        !deny_spills || problems.is_empty(),
        "SUPCON_DENY_SPILLS: register spills, stack frames or an unreadable ptxas report:\n{}",
        problems.join("\n")
    );
    println!("cargo::rustc-cfg=supcon_kernels_built");
}

#[cfg(feature = "emulation")]
fn build_emulation(manifest_dir: &Path, kernels: &[PathBuf]) {
    let kernel_dir = manifest_dir.join(KERNEL_DIR);
    let emu_dir = kernel_dir.join("emu");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(&kernel_dir)
        .flag("-include")
        .flag(emu_dir.join("cuda_emu.h").to_str().expect("UTF-8 path"))
        // The kernels are .cu files: make the C++ compiler read them as C++.
        .flag("-x")
        .flag("c++")
        .flag("-pthread")
        // `#pragma unroll` is for nvcc.
        .flag("-Wno-unknown-pragmas")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .files(kernels)
        .file(emu_dir.join("cuda_emu.cpp"))
        .file(emu_dir.join("supcon_emu.cpp"));
    match tracked_env("SUPCON_EMU_SANITIZE").as_deref() {
        None => {}
        Some(sanitizer @ ("thread" | "address")) => {
            build
                .flag(format!("-fsanitize={sanitizer}"))
                .flag("-fno-omit-frame-pointer")
                .debug(true)
                .opt_level(1);
            let runtime = if sanitizer == "thread" {
                "tsan"
            } else {
                "asan"
            };
            println!("cargo::rustc-link-lib=dylib={runtime}");
        }
        Some(other) => panic!("SUPCON_EMU_SANITIZE must be `thread` or `address`, not `{other}`"),
    }
    build.compile("supcon_emulation");
}
