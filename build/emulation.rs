//! Feature `emulation` (tests only): the same, unmodified `kernels/*.cu` compiled as C++20
//! against the host emulation of the CUDA execution model in `kernels/emu/` (force-included
//! `cuda_emu.h`, plus `cuda_emu.cpp` and the launch table `supcon_emu.cpp`) into the static
//! library `supcon_emulation`, linked into the crate for `src/device/emulated.rs`
//! (`EmulatedBackend`).
//!
//! `SUPCON_EMU_SANITIZE=thread` or `address` builds it with that sanitizer (at `-O1`, with debug
//! information and frame pointers, for readable reports) and links the sanitizer's runtime;
//! `scripts/sanitize-emulated.sh` runs the tests that way.
//!
//! g++ in ISO mode (`-std=c++20`) never fuses `a * b + c` into one FMA; ptxas does, wherever it
//! can. `SUPCON_EMU_FP_CONTRACT=fast` builds the emulation with `-ffp-contract=fast -mfma`
//! (a CPU with FMA, x86-64), so that it contracts like the GPU and a kernel that relies on a
//! product being rounded on its own fails its tests; `.ci/run` runs the emulated tests this way
//! too.

use crate::tracked_env;
use std::path::{Path, PathBuf};

/// Compiles and links the emulation library; warnings are errors.
pub fn build(kernel_dir: &Path, kernels: &[PathBuf]) {
    let emu_dir = kernel_dir.join("emu");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(kernel_dir)
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
        .file(emu_dir.join("supcon_emu.cpp"))
        .file(emu_dir.join("tensor_core_check.cpp"));
    match tracked_env("SUPCON_EMU_FP_CONTRACT").as_deref() {
        None | Some("off") => {}
        Some("fast") => {
            build.flag("-ffp-contract=fast").flag("-mfma");
        }
        Some(other) => panic!("SUPCON_EMU_FP_CONTRACT must be `fast` or `off`, not `{other}`"),
    }
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
