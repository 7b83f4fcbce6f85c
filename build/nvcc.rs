//! Finding nvcc, first match wins:
//!
//! 1. `NVCC` (the path of nvcc itself; a build failure if it does not exist, since it was asked
//!    for explicitly);
//! 2. `CUDA_HOME`, then `CUDA_PATH`: `bin/nvcc` under it;
//! 3. `nvcc` in a directory of `PATH`;
//! 4. the `nvidia-cuda-nvcc` wheel (`nvidia/cu13/bin/nvcc`) of the Python environment of
//!    `$SUPCON_PYTHON` (default `python3`);
//! 5. the same wheel in the repository's `./.cuda-venv` (what `scripts/install-nvcc.sh` fills).

use crate::tracked_env;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc, in the order above; `None` if there is none.
pub fn find(manifest_dir: &Path) -> Option<PathBuf> {
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
    python_nvcc().or_else(|| cuda_venv_nvcc(manifest_dir))
}

/// nvcc from the `nvidia-cuda-nvcc` wheel of the active Python: asks the interpreter where the
/// `nvidia` namespace package lives, since wheels land in whichever site-packages it uses.
fn python_nvcc() -> Option<PathBuf> {
    let python = tracked_env("SUPCON_PYTHON").unwrap_or_else(|| "python3".into());
    let listing = Command::new(&python)
        .args(["-c", "import nvidia; print('\\n'.join(nvidia.__path__))"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    listing
        .lines()
        .map(|dir| Path::new(dir.trim()).join("cu13/bin/nvcc"))
        .find(|nvcc| nvcc.is_file())
}

/// nvcc from the wheel in `./.cuda-venv`, found by looking rather than by running the venv's
/// Python; with several `lib/python3.*`, the last in sort order.
fn cuda_venv_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let lib = manifest_dir.join(".cuda-venv/lib");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&lib)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .map(|python_dir| python_dir.join("site-packages/nvidia/cu13/bin/nvcc"))
        .filter(|nvcc| nvcc.is_file())
        .collect();
    candidates.sort();
    candidates.pop()
}
