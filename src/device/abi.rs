//! The kernels' parameter blocks and option codes, mirrored from `kernels/supcon_params.h`.
//!
//! Each kernel takes one block by value: [`ForwardParams`], [`FinalizeParams`],
//! [`CoefficientParams`], [`BackwardParams`], [`PositivesParams`] or [`RowScalesParams`]
//! ([`super::kernel::Kernel::params`] says which).
//! Their layouts are pinned by a test against what the C++ compiler reports (`super::emulated`,
//! feature `emulation`); the option codes and tile sizes likewise.

use bytemuck::{Pod, Zeroable};

/// `SupconProblem`: the batch, its positives and the loss options. Device buffers are `u64`
/// addresses (0: absent).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct Problem {
    /// `const T[B][V][D]`.
    pub features: u64,
    /// `const int64_t[B]` (labels), else 0.
    pub labels: u64,
    /// `const float[B][B]` (explicit weights), else 0.
    pub mask: u64,
    /// `const uint64_t[B][set_words]` (label-set bitsets), else 0.
    pub label_sets: u64,
    /// `const uint32_t[B]` per-sample cap bounds under a positives cap, else 0.
    pub cap_bounds: u64,
    /// `const float[N]` row scales under `normalize` (1/max(‖x_r‖, ε), negated under the
    /// clamp), else 0.
    pub row_scales: u64,
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
    /// 1/τ.
    pub inv_temperature: f32,
    /// c = τ/τ_b.
    pub loss_scale: f32,
    /// 64-bit words per label set, else 0.
    pub set_words: u32,
    /// One of [`label_set_weight`], else 0.
    pub set_weight: u32,
}

/// `SupconStatistics`: the per-anchor statistics, `float[R]` each.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct Statistics {
    /// LSE_i over the denominator set, hi (−∞: empty).
    pub lse: u64,
    /// Its lo part (0 for an empty set): LSE_i = hi + lo.
    pub lse_lo: u64,
    /// log Σ_j (w_ij/W_i) e^{s_ij} = LSE^P_i − log W_i, hi (−∞: no positive); see
    /// [`super::launch::saved_positive_lse`].
    pub scaled_positive_lse: u64,
    /// Its lo part (0 without a positive).
    pub scaled_positive_lse_lo: u64,
    /// P_i.
    pub positive_weight: u64,
    /// W_i = max_j w_ij (0: no positive).
    pub positive_weight_max: u64,
    /// One positive: Ψ_i, the positives' total pull (0 without a negative); else unused.
    pub pull: u64,
    /// One positive under L_in: log A_i (0 without a negative); else unused.
    pub log_share: u64,
}

/// `SupconReduction`: how the per-anchor losses reduce.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct Reduction {
    /// R.
    pub anchors: u32,
    /// One of [`reduction`].
    pub reduction: u32,
    /// One of [`no_positive`].
    pub no_positive_policy: u32,
    /// 0.
    pub padding: u32,
}

/// `SupconForwardParams`: statistics and losses of anchors `anchor_begin..anchor_end`, the
/// contrast columns split over `column_splits` blocks per anchor tile.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct ForwardParams {
    pub problem: Problem,
    /// Written at the range's anchors.
    pub statistics: Statistics,
    /// `float[R]`: ℓ_i, written at the range's anchors.
    pub anchor_loss: u64,
    /// `RowStatistics[column_splits][R]`: each share's partial statistics, merged by
    /// `supcon_forward_merge`; 0 when `column_splits` is 1.
    pub partials: u64,
    pub anchor_begin: u32,
    pub anchor_end: u32,
    /// 1 (no split) up to the number of 64-row contrast tiles; 1 for the positive terms.
    pub column_splits: u32,
    /// 0.
    pub padding: u32,
}

/// `SupconFinalizeParams`: the reduced loss and the count of anchors without positives.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct FinalizeParams {
    /// `const float[R]`: ℓ_i.
    pub anchor_loss: u64,
    /// `const float[R]`: P_i.
    pub positive_weight: u64,
    /// `double[1]`: the loss under the reduction (Σℓ_i for none).
    pub reduced_loss: u64,
    /// `uint32_t[1]`: anchors with P_i = 0.
    pub anchors_without_positives: u64,
    pub reduction: Reduction,
}

/// `SupconCoefficientParams`: the backward kernels' coefficients c·u_i/R'·[P_i > 0]·[D_i ≠ ∅].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct CoefficientParams {
    /// `const float[R]`: LSE_i (hi).
    pub lse: u64,
    /// `const float[R]`: P_i.
    pub positive_weight: u64,
    /// `const uint32_t[1]`.
    pub anchors_without_positives: u64,
    /// `const double[R]`: u_i under reduction none, else 0.
    pub upstream: u64,
    /// `float[R]`: the coefficients.
    pub grad_coef: u64,
    /// u of a reduced loss.
    pub upstream_scalar: f64,
    /// c = τ/τ_b in f64.
    pub loss_scale: f64,
    pub reduction: Reduction,
}

/// `SupconBackwardParams`: ∂L/∂Z for rows `grad_begin..grad_end`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct BackwardParams {
    pub problem: Problem,
    /// Read for every anchor.
    pub statistics: Statistics,
    /// `const float[R]`: the coefficients.
    pub grad_coef: u64,
    /// `float[B][V][D]`: ∂L/∂features, the range's rows written.
    pub grad_features: u64,
    pub grad_begin: u32,
    pub grad_end: u32,
}

/// `SupconPositivesParams`: label sets packed and cap bounds computed on the device.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct PositivesParams {
    /// The positives (`label_sets`: the packed sets, written by `supcon_pack_label_sets`);
    /// `cap_bounds` 0.
    pub problem: Problem,
    /// `const uint8_t[B][classes]` multi-hot rows (nonzero: a member), else 0.
    pub memberships: u64,
    /// `uint32_t[B]`: the cap bounds `supcon_cap_bounds` writes, else 0.
    pub bounds: u64,
    /// K, labels per multi-hot row.
    pub classes: u32,
    /// The positives cap, clamped to `u32::MAX`.
    pub cap: u32,
}

/// `SupconRowScalesParams`: the fused normalisation's row scales.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct RowScalesParams {
    /// The features; `row_scales` 0.
    pub problem: Problem,
    /// `float[N]`: the scales `supcon_row_scales_*` writes.
    pub scales: u64,
}

/// Which parameter block a kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamsKind {
    Forward,
    Finalize,
    Coefficients,
    Backward,
    Positives,
    RowScales,
}

/// What cudarc needs to pass a block by value (`src/cuda/enabled/raw.rs` implements it for
/// each block); nothing without feature `cuda`.
#[cfg(feature = "cuda")]
pub(crate) use cudarc::driver::DeviceRepr as DeviceArgument;
/// What cudarc needs to pass a block by value; nothing without feature `cuda`.
#[cfg(not(feature = "cuda"))]
pub(crate) trait DeviceArgument {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceArgument for T {}

/// A kernel parameter block.
pub(crate) trait KernelParams: Pod + DeviceArgument {
    /// Which one it is.
    const KIND: ParamsKind;
}

impl KernelParams for ForwardParams {
    const KIND: ParamsKind = ParamsKind::Forward;
}
impl KernelParams for FinalizeParams {
    const KIND: ParamsKind = ParamsKind::Finalize;
}
impl KernelParams for CoefficientParams {
    const KIND: ParamsKind = ParamsKind::Coefficients;
}
impl KernelParams for BackwardParams {
    const KIND: ParamsKind = ParamsKind::Backward;
}
impl KernelParams for PositivesParams {
    const KIND: ParamsKind = ParamsKind::Positives;
}
impl KernelParams for RowScalesParams {
    const KIND: ParamsKind = ParamsKind::RowScales;
}

/// `positive_kind` codes (`SUPCON_POSITIVES_*`).
pub(crate) mod positives {
    /// SimCLR: the other views of the same sample.
    pub const SAME_SAMPLE: u32 = 0;
    /// Equal labels.
    pub const LABELS: u32 = 1;
    /// Weights from a `[B, B]` mask.
    pub const MASK: u32 = 2;
    /// Weights from the overlap of label sets.
    pub const LABEL_SETS: u32 = 3;
}

/// `set_weight` codes (`SUPCON_LABEL_SET_*`).
pub(crate) mod label_set_weight {
    /// Whether the sets meet.
    pub const ANY: u32 = 0;
    /// |∩| / |∪|.
    pub const JACCARD: u32 = 1;
    /// |∩| / |Y_i|.
    pub const FRACTION: u32 = 2;
}

/// `denominator` codes (`SUPCON_DENOMINATOR_*`).
pub(crate) mod denominator {
    /// Every contrast but the anchor.
    pub const ALL: u32 = 0;
    /// Contrasts with weight 0.
    pub const ONLY_NEGATIVES: u32 = 1;
    /// The negatives, each positive joining them alone.
    pub const ONE_POSITIVE: u32 = 2;
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
