//! The kernels' parameter block and option codes, mirrored from `kernels/supcon_params.h`.
//!
//! Every kernel takes one [`SupconParams`] by value. Its layout is pinned by a test against what
//! the C++ compiler reports (`super::emulated`, feature `emulation`); the option codes and tile
//! sizes likewise.

use bytemuck::{Pod, Zeroable};

/// `SupconParams` of `kernels/supcon_params.h`, field for field. Device buffers are `u64`
/// addresses (0: absent); see the header for what each kernel reads and writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct SupconParams {
    /// `const T[B][V][D]`.
    pub features: u64,
    /// `const int64_t[B]` (labels), else 0.
    pub labels: u64,
    /// `const float[B][B]` (explicit weights), else 0.
    pub mask: u64,
    /// `float[R]`: LSE_i over the denominator set (−∞: empty).
    pub anchor_lse: u64,
    /// `float[R]`: the lo part of LSE_i (0 for an empty set): LSE_i = hi + lo.
    pub anchor_lse_lo: u64,
    /// `float[R]`: log Σ_j (w_ij/W_i) e^{s_ij} = LSE^P_i − log W_i (−∞: no positive); see
    /// [`super::launch::saved_positive_lse`].
    pub anchor_scaled_positive_lse: u64,
    /// `float[R]`: its lo part (0 without a positive).
    pub anchor_scaled_positive_lse_lo: u64,
    /// `float[R]`: P_i.
    pub anchor_positive_weight: u64,
    /// `float[R]`: W_i = max_j w_ij (0: no positive).
    pub anchor_positive_weight_max: u64,
    /// `float[R]`: ℓ_i.
    pub anchor_loss: u64,
    /// `double[1]`: the reduced loss.
    pub reduced_loss: u64,
    /// `uint32_t[1]`: anchors with P_i = 0.
    pub anchors_without_positives: u64,
    /// `float[R]`: `c·u_i/R'·[P_i > 0]·[denominator non-empty]`; read by the backward kernel,
    /// written by `supcon_backward_coefficients`.
    pub anchor_grad_coef: u64,
    /// `float[B][V][D]`: ∂L/∂features.
    pub grad_features: u64,
    /// `const double[R]`: u_i under reduction none, else 0 (`supcon_backward_coefficients`).
    pub anchor_upstream: u64,
    /// u of a reduced loss (`supcon_backward_coefficients`).
    pub upstream_scalar: f64,
    /// c = τ/τ_b in f64 (`supcon_backward_coefficients`).
    pub loss_scale_exact: f64,
    /// B.
    pub batch: u32,
    /// V.
    pub views: u32,
    /// D.
    pub dim: u32,
    /// N = B·V.
    pub rows: u32,
    /// R.
    pub anchors: u32,
    /// One of [`positives`].
    pub positive_kind: u32,
    /// One of [`denominator`].
    pub denominator: u32,
    /// One of [`summation`].
    pub summation: u32,
    /// One of [`reduction`].
    pub reduction: u32,
    /// One of [`no_positive`].
    pub no_positive_policy: u32,
    /// 1/τ.
    pub inv_temperature: f32,
    /// c = τ/τ_b.
    pub loss_scale: f32,
}

/// `positive_kind` codes (`SUPCON_POSITIVES_*`).
pub(crate) mod positives {
    /// SimCLR: the other views of the same sample.
    pub const SAME_SAMPLE: u32 = 0;
    /// Equal labels.
    pub const LABELS: u32 = 1;
    /// Weights from a `[B, B]` mask.
    pub const MASK: u32 = 2;
}

/// `denominator` codes (`SUPCON_DENOMINATOR_*`).
pub(crate) mod denominator {
    /// Every contrast but the anchor.
    pub const ALL: u32 = 0;
    /// Contrasts with weight 0.
    pub const ONLY_NEGATIVES: u32 = 1;
}

/// `summation` codes (`SUPCON_SUMMATION_*`).
pub(crate) mod summation {
    /// L_out.
    pub const OUTSIDE: u32 = 0;
    /// L_in.
    pub const INSIDE: u32 = 1;
}

/// `reduction` codes (`SUPCON_REDUCTION_*`).
pub(crate) mod reduction {
    /// Σℓ/R'.
    pub const MEAN: u32 = 0;
    /// Σℓ.
    pub const SUM: u32 = 1;
    /// Per anchor (the finalisation kernel still writes Σℓ).
    pub const NONE: u32 = 2;
}

/// `no_positive_policy` codes (`SUPCON_NO_POSITIVE_*`).
pub(crate) mod no_positive {
    /// R' = R.
    pub const ZERO_AND_COUNT: u32 = 0;
    /// R' = anchors with a positive (at least 1).
    pub const EXCLUDE: u32 = 1;
    /// Like zero-and-count on the device; the host fails on a non-zero count.
    pub const ERROR: u32 = 2;
}
