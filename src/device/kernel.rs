//! The kernel entry points: their names in the fatbins (and in the emulation), the element
//! type each instantiation reads, the launch stage that plans its grid, and the fatbin
//! embedded at build time that holds it.

use super::abi::ParamsKind;
use super::plan::Stage;
use crate::element::DType;
#[cfg(feature = "cuda")]
use crate::error::Result;

/// Element type of the feature buffer a kernel instantiation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FeatureType {
    /// `float`.
    F32,
    /// `__half`.
    F16,
    /// `__nv_bfloat16`.
    Bf16,
}

impl FeatureType {
    /// The kernel type for a feature element type; `None` for f64.
    pub(crate) fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(FeatureType::F32),
            DType::F16 => Some(FeatureType::F16),
            DType::BF16 => Some(FeatureType::Bf16),
            DType::F64 => None,
        }
    }
}

/// What the tensor-core kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MmaOperands {
    /// `__half` features as they are.
    F16,
    /// `__nv_bfloat16` features as they are.
    Bf16,
    /// `float` features split into bf16 hi and lo parts, three products each
    /// ([`crate::Precision::Bf16x3`]).
    F32Split,
}

impl MmaOperands {
    /// Whether shared rows come in two parts (doubling the kernels' shared memory).
    pub(crate) fn split(self) -> bool {
        self == MmaOperands::F32Split
    }
}

/// A kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// Per-anchor statistics and losses.
    ForwardStatistics(FeatureType),
    /// `OnePositive`'s second forward pass: ℓ_i, Ψ_i and log A_i from LSE^N_i.
    ForwardPositiveTerms(FeatureType),
    /// The column shares of the forward statistics merged per anchor.
    ForwardMerge,
    /// The reduction over anchors.
    ForwardFinalize,
    /// The per-anchor gradient coefficients, on the device.
    // The device API's (CUDA only); the emulated executor runs it in tests.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    BackwardCoefficients,
    /// The feature gradient.
    Backward(FeatureType),
    /// Per-anchor statistics and losses on tensor cores.
    MmaForward(MmaOperands),
    /// `OnePositive`'s second forward pass on tensor cores.
    MmaForwardPositiveTerms(MmaOperands),
    /// The feature gradient on tensor cores; `wide`: 256 gradient columns per block (for
    /// D > 128, so that S is formed once per tile up to D = 256), else 128.
    MmaBackward { operands: MmaOperands, wide: bool },
    /// The device API's label sets: `[B, K]` multi-hot bytes packed into bitsets.
    // The device API's (CUDA only); the emulated executor runs them in tests.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    PackLabelSets,
    /// The device API's positives cap: each sample's bound.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    CapBounds,
    /// The fused normalisation's row scales 1/max(‖x_r‖, ε).
    RowScales(FeatureType),
}

impl Kernel {
    /// Every entry point.
    // The CUDA executor loads them all; the emulated executor's tests check them all.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) const ALL: [Kernel; 29] = [
        Kernel::ForwardStatistics(FeatureType::F32),
        Kernel::ForwardStatistics(FeatureType::F16),
        Kernel::ForwardStatistics(FeatureType::Bf16),
        Kernel::ForwardPositiveTerms(FeatureType::F32),
        Kernel::ForwardPositiveTerms(FeatureType::F16),
        Kernel::ForwardPositiveTerms(FeatureType::Bf16),
        Kernel::ForwardMerge,
        Kernel::ForwardFinalize,
        Kernel::BackwardCoefficients,
        Kernel::Backward(FeatureType::F32),
        Kernel::Backward(FeatureType::F16),
        Kernel::Backward(FeatureType::Bf16),
        Kernel::MmaForward(MmaOperands::F16),
        Kernel::MmaForward(MmaOperands::Bf16),
        Kernel::MmaForward(MmaOperands::F32Split),
        Kernel::MmaForwardPositiveTerms(MmaOperands::F16),
        Kernel::MmaForwardPositiveTerms(MmaOperands::Bf16),
        Kernel::MmaForwardPositiveTerms(MmaOperands::F32Split),
        Kernel::mma_backward(MmaOperands::F16, false),
        Kernel::mma_backward(MmaOperands::Bf16, false),
        Kernel::mma_backward(MmaOperands::F32Split, false),
        Kernel::mma_backward(MmaOperands::F16, true),
        Kernel::mma_backward(MmaOperands::Bf16, true),
        Kernel::mma_backward(MmaOperands::F32Split, true),
        Kernel::PackLabelSets,
        Kernel::CapBounds,
        Kernel::RowScales(FeatureType::F32),
        Kernel::RowScales(FeatureType::F16),
        Kernel::RowScales(FeatureType::Bf16),
    ];

    const fn mma_backward(operands: MmaOperands, wide: bool) -> Kernel {
        Kernel::MmaBackward { operands, wide }
    }

    /// The `extern "C"` name in the fatbin (and in the emulation).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::ForwardStatistics(FeatureType::F32) => "supcon_forward_f32",
            Kernel::ForwardStatistics(FeatureType::F16) => "supcon_forward_f16",
            Kernel::ForwardStatistics(FeatureType::Bf16) => "supcon_forward_bf16",
            Kernel::ForwardPositiveTerms(FeatureType::F32) => "supcon_forward_positive_terms_f32",
            Kernel::ForwardPositiveTerms(FeatureType::F16) => "supcon_forward_positive_terms_f16",
            Kernel::ForwardPositiveTerms(FeatureType::Bf16) => "supcon_forward_positive_terms_bf16",
            Kernel::ForwardMerge => "supcon_forward_merge",
            Kernel::ForwardFinalize => "supcon_forward_finalize",
            Kernel::BackwardCoefficients => "supcon_backward_coefficients",
            Kernel::Backward(FeatureType::F32) => "supcon_backward_f32",
            Kernel::Backward(FeatureType::F16) => "supcon_backward_f16",
            Kernel::Backward(FeatureType::Bf16) => "supcon_backward_bf16",
            Kernel::MmaForward(MmaOperands::F16) => "supcon_mma_forward_f16",
            Kernel::MmaForward(MmaOperands::Bf16) => "supcon_mma_forward_bf16",
            Kernel::MmaForward(MmaOperands::F32Split) => "supcon_mma_forward_f32x3",
            Kernel::MmaForwardPositiveTerms(MmaOperands::F16) => {
                "supcon_mma_forward_positive_terms_f16"
            }
            Kernel::MmaForwardPositiveTerms(MmaOperands::Bf16) => {
                "supcon_mma_forward_positive_terms_bf16"
            }
            Kernel::MmaForwardPositiveTerms(MmaOperands::F32Split) => {
                "supcon_mma_forward_positive_terms_f32x3"
            }
            Kernel::MmaBackward { operands, wide } => match (operands, wide) {
                (MmaOperands::F16, false) => "supcon_mma_backward_f16",
                (MmaOperands::Bf16, false) => "supcon_mma_backward_bf16",
                (MmaOperands::F32Split, false) => "supcon_mma_backward_f32x3",
                (MmaOperands::F16, true) => "supcon_mma_backward_wide_f16",
                (MmaOperands::Bf16, true) => "supcon_mma_backward_wide_bf16",
                (MmaOperands::F32Split, true) => "supcon_mma_backward_wide_f32x3",
            },
            Kernel::PackLabelSets => "supcon_pack_label_sets",
            Kernel::CapBounds => "supcon_cap_bounds",
            Kernel::RowScales(FeatureType::F32) => "supcon_row_scales_f32",
            Kernel::RowScales(FeatureType::F16) => "supcon_row_scales_f16",
            Kernel::RowScales(FeatureType::Bf16) => "supcon_row_scales_bf16",
        }
    }

    /// The parameter block it takes.
    pub(crate) fn params(self) -> ParamsKind {
        match self {
            Kernel::ForwardStatistics(_)
            | Kernel::ForwardPositiveTerms(_)
            | Kernel::MmaForward(_)
            | Kernel::MmaForwardPositiveTerms(_)
            | Kernel::ForwardMerge => ParamsKind::Forward,
            Kernel::ForwardFinalize => ParamsKind::Finalize,
            Kernel::BackwardCoefficients => ParamsKind::Coefficients,
            Kernel::Backward(_) | Kernel::MmaBackward { .. } => ParamsKind::Backward,
            Kernel::PackLabelSets | Kernel::CapBounds => ParamsKind::Positives,
            Kernel::RowScales(_) => ParamsKind::RowScales,
        }
    }

    pub(crate) fn stage(self) -> Stage {
        match self {
            // The second pass has the first's grid and shared memory.
            Kernel::ForwardStatistics(_) | Kernel::ForwardPositiveTerms(_) => {
                Stage::ForwardStatistics
            }
            Kernel::ForwardMerge => Stage::ForwardMerge,
            Kernel::ForwardFinalize => Stage::ForwardFinalize,
            Kernel::BackwardCoefficients => Stage::BackwardCoefficients,
            Kernel::Backward(_) => Stage::Backward,
            Kernel::MmaForward(operands) | Kernel::MmaForwardPositiveTerms(operands) => {
                Stage::MmaForward {
                    split: operands.split(),
                }
            }
            Kernel::MmaBackward { operands, wide } => Stage::MmaBackward {
                split: operands.split(),
                wide,
            },
            Kernel::PackLabelSets => Stage::PackLabelSets,
            Kernel::CapBounds => Stage::CapBounds,
            Kernel::RowScales(_) => Stage::RowScales,
        }
    }
}

/// The fatbin (compiled by the build script, `build/fatbins.rs`, from `kernels/<module>.cu`)
/// that holds `kernel`.
///
/// # Errors
/// [`crate::Error::KernelsNotBuilt`] when nvcc was not found at build time.
#[cfg(feature = "cuda")]
pub(crate) fn fatbin(kernel: Kernel) -> Result<&'static [u8]> {
    #[cfg(supcon_kernels_built)]
    {
        Ok(match kernel {
            Kernel::ForwardStatistics(_)
            | Kernel::ForwardPositiveTerms(_)
            | Kernel::ForwardMerge
            | Kernel::ForwardFinalize => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_forward.fatbin"))
            }
            Kernel::BackwardCoefficients | Kernel::Backward(_) => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_backward.fatbin"))
            }
            Kernel::MmaForward(_) | Kernel::MmaForwardPositiveTerms(_) => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_mma_forward.fatbin"))
            }
            Kernel::MmaBackward { .. } => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_mma_backward.fatbin"))
            }
            Kernel::PackLabelSets | Kernel::CapBounds => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_positives.fatbin"))
            }
            Kernel::RowScales(_) => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_normalize.fatbin"))
            }
        })
    }
    #[cfg(not(supcon_kernels_built))]
    {
        let _ = kernel;
        Err(crate::error::Error::KernelsNotBuilt)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn fatbins_are_embedded_exactly_when_nvcc_was_found() {
        for kernel in [Kernel::ForwardFinalize, Kernel::Backward(FeatureType::F32)] {
            let fatbin = fatbin(kernel);
            if cfg!(supcon_kernels_built) {
                // The fatbin container's magic number, little-endian.
                assert_eq!(fatbin.unwrap()[..4], 0xBA55_ED50_u32.to_le_bytes());
            } else {
                assert!(matches!(fatbin, Err(Error::KernelsNotBuilt)));
            }
        }
    }
}
