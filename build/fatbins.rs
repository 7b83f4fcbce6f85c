//! Feature `cuda`: every `kernels/*.cu` compiled by nvcc into `OUT_DIR/<stem>.fatbin`, which
//! `src/kernels.rs` embeds with `include_bytes!` under `cfg(supcon_kernels_built)`.
//!
//! A fatbin holds SASS for each `sm_XX` and PTX for each `compute_XX` of `SUPCON_CUDA_ARCHS`
//! (comma-separated, default [`DEFAULT_CUDA_ARCHS`]). Without nvcc the build succeeds with a
//! warning and without the cfg, so the CUDA backend reports `Error::KernelsNotBuilt` instead of
//! the build failing on machines that never run CUDA.
//!
//! nvcc takes minutes, and cargo reruns this script for every profile and feature set (a
//! release build, clippy, the tests, the benchmarks), so each fatbin and its nvcc log are kept
//! in a cache (`SUPCON_FATBIN_CACHE`, default `<target dir>/fatbin-cache`) under a key that
//! hashes everything nvcc reads or is told: the nvcc binary and its `--version`, the
//! arguments, the source's name and every file of `kernels/` (the headers it includes). A hit
//! is the bytes nvcc wrote, and its log goes through the same ptxas report as a fresh one.

use crate::{nvcc, ptxas, tracked_env};
use std::fs;
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
    // `--threads 0`: the architectures compile in parallel, on every CPU; `-lineinfo`: source
    // lines for profilers and compute-sanitizer; `-Xptxas -v`: the report.
    let mut args: Vec<String> = ["-std=c++17", "-O3", "-lineinfo", "--threads", "0"]
        .into_iter()
        .chain(["-Xptxas", "-v"])
        .map(String::from)
        .collect();
    args.extend(gencode);
    let cache = Cache::new(&nvcc, &args, kernel_dir, out_dir);
    for source in kernels {
        let stem = source.file_stem().expect("a file name").to_string_lossy();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let key = cache.key(source);
        let log = match cache.get(&key, &fatbin) {
            Some(log) => log,
            None => {
                let log = compile(&nvcc, &args, kernel_dir, source, &fatbin);
                cache.put(&key, &fatbin, &log);
                log
            }
        };
        report.add(source, &log);
    }
    report.finish(out_dir, &policy);
    println!("cargo::rustc-cfg=supcon_kernels_built");
}

/// Compiles `source` into `fatbin`; returns nvcc's output (the ptxas report).
fn compile(
    nvcc: &Path,
    args: &[String],
    kernel_dir: &Path,
    source: &Path,
    fatbin: &Path,
) -> String {
    let output = Command::new(nvcc)
        .arg("--fatbin")
        .args(args)
        .arg("-I")
        .arg(kernel_dir)
        .arg("-o")
        .arg(fatbin)
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
    log
}

/// Fatbins and their nvcc logs by a hash of everything that went into them (see the module
/// documentation). Writes go to a temporary name first, then are renamed, so a build that
/// dies midway or runs beside another leaves no torn entry.
struct Cache {
    dir: PathBuf,
    /// The hash of what every kernel shares: nvcc, its version, the arguments, `kernels/`.
    common: u64,
}

impl Cache {
    fn new(nvcc: &Path, args: &[String], kernel_dir: &Path, out_dir: &Path) -> Self {
        let dir = tracked_env("SUPCON_FATBIN_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir(out_dir).join("fatbin-cache"));
        let version = Command::new(nvcc)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        let mut hash = Fnv::new();
        hash.add(nvcc.as_os_str().as_encoded_bytes());
        hash.add(&fs::read(nvcc).unwrap_or_default());
        hash.add(&version.stdout);
        for arg in args {
            hash.add(arg.as_bytes());
        }
        let mut files: Vec<PathBuf> = fs::read_dir(kernel_dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernel_dir.display()))
            .map(|entry| entry.expect("readable directory entry").path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        for file in files {
            hash.add(file.file_name().expect("a file name").as_encoded_bytes());
            hash.add(
                &fs::read(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display())),
            );
        }
        Cache {
            dir,
            common: hash.finish(),
        }
    }

    fn key(&self, source: &Path) -> String {
        let mut hash = Fnv::new();
        hash.add(&self.common.to_le_bytes());
        hash.add(source.file_name().expect("a file name").as_encoded_bytes());
        format!("{:016x}", hash.finish())
    }

    /// Copies a cached fatbin to `fatbin` and returns its log, if both are cached.
    fn get(&self, key: &str, fatbin: &Path) -> Option<String> {
        let log = fs::read_to_string(self.dir.join(format!("{key}.log"))).ok()?;
        fs::copy(self.dir.join(format!("{key}.fatbin")), fatbin).ok()?;
        Some(log)
    }

    /// Stores `fatbin` and its log; a cache that cannot be written only costs the next build
    /// a compile.
    fn put(&self, key: &str, fatbin: &Path, log: &str) {
        let store = || -> std::io::Result<()> {
            fs::create_dir_all(&self.dir)?;
            let temporary =
                |name: &str| self.dir.join(format!("{name}.{}.tmp", std::process::id()));
            let (bin, text) = (
                temporary(&format!("{key}.fatbin")),
                temporary(&format!("{key}.log")),
            );
            fs::copy(fatbin, &bin)?;
            fs::write(&text, log)?;
            // The fatbin first: `get` needs the log, which lands last.
            fs::rename(&bin, self.dir.join(format!("{key}.fatbin")))?;
            fs::rename(&text, self.dir.join(format!("{key}.log")))
        };
        if let Err(error) = store() {
            println!(
                "cargo::warning=the fatbin cache {} is not writable: {error}",
                self.dir.display()
            );
        }
    }
}

/// The target directory of a build whose `OUT_DIR` is `out_dir`
/// (`<target>/[<triple>/]<profile>/build/<package>-<hash>/out`).
fn target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map_or_else(|| out_dir.to_path_buf(), Path::to_path_buf)
}

/// 64-bit FNV-1a, stable across toolchains (unlike `DefaultHasher`); each added piece is
/// prefixed by its length, so that pieces cannot run into each other.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for &byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
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
