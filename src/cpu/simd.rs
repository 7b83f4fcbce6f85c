//! Runtime choice of the instruction set the elementwise tile loops are compiled for.
//!
//! The crate is built for the default target (x86-64 baseline: SSE2), where the loops get
//! 4-wide vectors and no FMA. Each [`TileKernel`] is therefore compiled a second time inside a
//! `#[target_feature(enable = "avx2,fma")]` function and a third time for AVX-512; everything it
//! calls is `#[inline(always)]`, so it inherits those features (`gemm` does the same for the
//! products). The elementwise source is the same on every path and Rust never contracts
//! `a * b + c` into an FMA on its own; where the source asks for one (`f32::mul_add` in
//! `math::exp`) every path computes it fused — in hardware on AVX2/AVX-512, through libm's
//! correctly rounded `fmaf` on an x86-64 baseline without FMA (slower, not different). So the
//! only rounding difference between paths is the products' FMA: the AVX2 and AVX-512 paths
//! agree bitwise, the baseline to f32 precision (tested in `cpu::tests`).

/// An instruction set the tile loops can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// The target's baseline (SSE2 on x86-64), and every non-x86 target.
    Baseline,
    /// AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW/DQ/VL.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// A piece of elementwise tile work, run through [`Isa::run`]. Implementations mark `run`
/// `#[inline(always)]` (and everything it calls), so it is compiled into each ISA's wrapper.
pub(super) trait TileKernel {
    /// Runs the work.
    fn run(self);
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub(super) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Every instruction set this CPU supports (for tests comparing the paths).
    #[cfg(test)]
    pub(super) fn supported() -> Vec<Isa> {
        let mut all = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                all.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Avx512 {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    /// Runs `kernel` compiled for this instruction set.
    #[inline]
    pub(super) fn run<K: TileKernel>(self, kernel: K) {
        match self {
            Isa::Baseline => kernel.run(),
            // SAFETY: `Isa::Avx2` is only constructed by `detect`/`supported` after checking
            // that the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { run_avx2(kernel) },
            // SAFETY: `Isa::Avx512` is only constructed by `detect` after checking that the CPU
            // has AVX-512 F/BW/DQ/VL, AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { run_avx512(kernel) },
        }
    }
}

/// `kernel.run()` compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: TileKernel>(kernel: K) {
    kernel.run();
}

/// `kernel.run()` compiled with AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn run_avx512<K: TileKernel>(kernel: K) {
    kernel.run();
}
