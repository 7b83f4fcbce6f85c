//! The launch sequences, written once for every executor and both APIs: the forward kernels
//! with their outputs left on the device ([`launch_forward`]), those outputs as the crate's
//! [`ForwardOutput`] ([`to_host`]), the backward kernel's per-anchor coefficients (on the host,
//! [`grad_coefficients`], or on the device, [`launch_coefficients`]: the same arithmetic, the
//! same bits, nothing read back) and the backward kernel ([`launch_backward`]).
//!
//! Forward: `supcon_forward_<type>` (per-anchor statistics and losses), then
//! `supcon_forward_finalize` (the deterministic reduction and the count of anchors without
//! positives). Backward: `supcon_backward_<type>`, fed with the saved statistics and the
//! coefficients c·u_i/R'.

use ndarray::Array1;

use super::abi::SupconParams;
use super::executor::{download_vec, upload_slice, KernelExecutor};
use super::kernel::Kernel;
use super::problem::{InputAddresses, Problem};
use crate::backend::{check_upstream, reduce, ForwardOutput, SavedState, Upstream};
use crate::config::{NoPositivePolicy, Reduction};
use crate::error::Result;

/// The forward pass's outputs, on the device.
#[derive(Debug)]
pub(crate) struct Statistics<B> {
    /// `float[R]` LSE_i, hi and lo (`kernels/supcon_params.h`).
    pub(crate) lse: B,
    pub(crate) lse_lo: B,
    /// `float[R]` LSE^P_i − log W_i (see [`saved_positive_lse`]), hi and lo.
    pub(crate) scaled_positive_lse: B,
    pub(crate) scaled_positive_lse_lo: B,
    /// `float[R]` P_i.
    pub(crate) positive_weight: B,
    /// `float[R]` W_i = max_j w_ij over positives (0: none).
    pub(crate) positive_weight_max: B,
    /// `float[R]` ℓ_i.
    pub(crate) anchor_loss: B,
    /// `double[1]` the reduced loss (Σℓ_i for reduction none).
    pub(crate) reduced_loss: B,
    /// `uint32_t[1]` anchors without positives.
    pub(crate) anchors_without_positives: B,
}

impl<B> Statistics<B> {
    /// The buffers by address.
    pub(crate) fn addresses<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
    ) -> StatisticsAddresses {
        StatisticsAddresses {
            lse: executor.address(&self.lse),
            lse_lo: executor.address(&self.lse_lo),
            scaled_positive_lse: executor.address(&self.scaled_positive_lse),
            scaled_positive_lse_lo: executor.address(&self.scaled_positive_lse_lo),
            positive_weight: executor.address(&self.positive_weight),
            positive_weight_max: executor.address(&self.positive_weight_max),
            anchor_loss: executor.address(&self.anchor_loss),
            reduced_loss: executor.address(&self.reduced_loss),
            anchors_without_positives: executor.address(&self.anchors_without_positives),
        }
    }
}

/// Where the forward kernels write their outputs: a [`Statistics`]' buffers, or regions of one
/// caller-provided workspace ([`WorkspaceLayout`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatisticsAddresses {
    /// `float[R]` LSE_i, hi and lo.
    pub(crate) lse: u64,
    pub(crate) lse_lo: u64,
    /// `float[R]` LSE^P_i − log W_i, hi and lo.
    pub(crate) scaled_positive_lse: u64,
    pub(crate) scaled_positive_lse_lo: u64,
    /// `float[R]` P_i.
    pub(crate) positive_weight: u64,
    /// `float[R]` W_i.
    pub(crate) positive_weight_max: u64,
    /// `float[R]` ℓ_i.
    pub(crate) anchor_loss: u64,
    /// `double[1]` the reduced loss.
    pub(crate) reduced_loss: u64,
    /// `uint32_t[1]` anchors without positives.
    pub(crate) anchors_without_positives: u64,
}

impl StatisticsAddresses {
    /// What the backward kernel reads of them (the device-resident paths').
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn saved(&self) -> SavedAddresses {
        SavedAddresses {
            lse: self.lse,
            lse_lo: self.lse_lo,
            scaled_positive_lse: self.scaled_positive_lse,
            scaled_positive_lse_lo: self.scaled_positive_lse_lo,
            positive_weight: self.positive_weight,
            positive_weight_max: self.positive_weight_max,
        }
    }

    /// The forward kernels' parameter block writing here.
    fn params(&self, problem: &Problem, inputs: &InputAddresses) -> SupconParams {
        SupconParams {
            anchor_lse: self.lse,
            anchor_lse_lo: self.lse_lo,
            anchor_scaled_positive_lse: self.scaled_positive_lse,
            anchor_scaled_positive_lse_lo: self.scaled_positive_lse_lo,
            anchor_positive_weight: self.positive_weight,
            anchor_positive_weight_max: self.positive_weight_max,
            anchor_loss: self.anchor_loss,
            reduced_loss: self.reduced_loss,
            anchors_without_positives: self.anchors_without_positives,
            ..problem.params(inputs)
        }
    }
}

/// The per-anchor statistics the backward kernel reads, `float[R]` each, by address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SavedAddresses {
    /// LSE_i, hi and lo.
    pub(crate) lse: u64,
    pub(crate) lse_lo: u64,
    /// LSE^P_i − log W_i, hi and lo.
    pub(crate) scaled_positive_lse: u64,
    pub(crate) scaled_positive_lse_lo: u64,
    /// P_i.
    pub(crate) positive_weight: u64,
    /// W_i.
    pub(crate) positive_weight_max: u64,
}

/// The forward's outputs laid out in one workspace of device memory that the caller owns (a
/// framework's allocator): the reduced loss (`double`) first, the count of anchors without
/// positives (`uint32_t`), then the seven `float[R]` statistics, each region on a 256-byte
/// boundary, as the driver aligns its own allocations.
// The CUDA backend's; the emulated executor's tests run it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkspaceLayout {
    anchors: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl WorkspaceLayout {
    const ALIGN: usize = 256;

    pub(crate) fn new(anchors: usize) -> Self {
        WorkspaceLayout { anchors }
    }

    /// Bytes of one `float[R]` region.
    fn region(&self) -> usize {
        (self.anchors * size_of::<f32>()).next_multiple_of(Self::ALIGN)
    }

    /// Offset of the reduced loss (`double`).
    pub(crate) fn loss_offset(&self) -> usize {
        0
    }

    /// Offset of the count of anchors without positives (`uint32_t`).
    pub(crate) fn anchors_without_positives_offset(&self) -> usize {
        Self::ALIGN
    }

    /// Offset of statistic `k` of 7: ℓ_i, then LSE_i (hi, lo), LSE^P_i − log W_i (hi, lo), P_i
    /// and W_i.
    fn statistic_offset(&self, k: usize) -> usize {
        2 * Self::ALIGN + k * self.region()
    }

    /// Offset of ℓ_i (`float[R]`).
    pub(crate) fn per_anchor_offset(&self) -> usize {
        self.statistic_offset(0)
    }

    /// Bytes of the whole workspace.
    pub(crate) fn bytes(&self) -> usize {
        self.statistic_offset(7)
    }

    /// The outputs' addresses in a workspace at `base`.
    pub(crate) fn addresses(&self, base: u64) -> StatisticsAddresses {
        let at = |offset: usize| base + offset as u64;
        let statistic = |k| at(self.statistic_offset(k));
        StatisticsAddresses {
            anchor_loss: statistic(0),
            lse: statistic(1),
            lse_lo: statistic(2),
            scaled_positive_lse: statistic(3),
            scaled_positive_lse_lo: statistic(4),
            positive_weight: statistic(5),
            positive_weight_max: statistic(6),
            reduced_loss: at(self.loss_offset()),
            anchors_without_positives: at(self.anchors_without_positives_offset()),
        }
    }
}

/// Queues the forward kernels on inputs already on the device, into new buffers. Nothing is
/// copied or awaited.
///
/// # Safety
/// `inputs` must address device memory of `executor` holding the problem's `B·V·D` features of
/// its feature type and, for labels or a mask, `B` `i64` or `B·B` `f32`, alive and unmodified
/// until the queued kernels have finished.
pub(crate) unsafe fn launch_forward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
) -> Result<Statistics<E::Buffer>> {
    let per_anchor_bytes = problem.anchors() * size_of::<f32>();
    let statistics = Statistics {
        lse: executor.alloc(per_anchor_bytes)?,
        lse_lo: executor.alloc(per_anchor_bytes)?,
        scaled_positive_lse: executor.alloc(per_anchor_bytes)?,
        scaled_positive_lse_lo: executor.alloc(per_anchor_bytes)?,
        positive_weight: executor.alloc(per_anchor_bytes)?,
        positive_weight_max: executor.alloc(per_anchor_bytes)?,
        anchor_loss: executor.alloc(per_anchor_bytes)?,
        reduced_loss: executor.alloc(size_of::<f64>())?,
        anchors_without_positives: executor.alloc(size_of::<u32>())?,
    };
    let at = statistics.addresses(executor);
    // SAFETY: the inputs per this function's contract; the outputs are the buffers just
    // allocated, which the caller keeps (dropping a buffer frees it only after the queued work).
    unsafe { launch_forward_at(executor, problem, inputs, &at)? };
    Ok(statistics)
}

/// Queues the forward kernels on inputs already on the device, writing their outputs `at`.
///
/// # Safety
/// As [`launch_forward`] for `inputs`; `at` must address writable device memory of `executor`
/// (`R` floats for each statistic, a `double` and a `uint32_t`) that nothing else reads or
/// writes until the kernels have finished.
pub(crate) unsafe fn launch_forward_at<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    at: &StatisticsAddresses,
) -> Result<()> {
    let params = at.params(problem, inputs);
    // SAFETY: inputs and outputs per this function's contract.
    unsafe {
        let kernel = problem.forward_kernel(executor.max_dynamic_shared_bytes());
        problem.launch(executor, kernel, &params)?;
        problem.launch(executor, Kernel::ForwardFinalize, &params)
    }
}

/// Everything the forward pass computed, on the host (synchronises): what
/// [`crate::Backend::forward`] returns.
///
/// # Errors
/// [`crate::Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`].
pub(crate) fn to_host<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
) -> Result<ForwardOutput> {
    let anchors = problem.anchors();
    let lse = download_split(executor, (&statistics.lse, &statistics.lse_lo), anchors)?;
    let scaled_positive_lse = download_split(
        executor,
        (
            &statistics.scaled_positive_lse,
            &statistics.scaled_positive_lse_lo,
        ),
        anchors,
    )?;
    let positive_weight_max: Vec<f32> =
        download_vec(executor, &statistics.positive_weight_max, anchors)?;
    let positive_weight: Vec<f32> = download_vec(executor, &statistics.positive_weight, anchors)?;
    let anchor_loss: Vec<f32> = download_vec(executor, &statistics.anchor_loss, anchors)?;
    let reduced = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
    let (per_anchor, positive_weight) = (widen(&anchor_loss), widen(&positive_weight));
    // The policy and R' exactly as every other backend applies them (the count the finalize
    // kernel writes is the number of anchors with P_i ≤ 0 that this recounts).
    let (_, mean_denominator) = reduce(problem.loss(), &per_anchor, &positive_weight)?;
    Ok(ForwardOutput {
        loss: (problem.loss().reduction() != Reduction::None).then_some(reduced),
        per_anchor: Array1::from(per_anchor),
        state: SavedState {
            loss: *problem.loss(),
            shape: problem.shape(),
            lse,
            lse_positive: scaled_positive_lse
                .iter()
                .zip(&positive_weight_max)
                .map(|(&lse, &w)| saved_positive_lse(lse, w))
                .collect(),
            positive_weight,
            mean_denominator,
            // The host path adds the batch's fingerprint; the device API has none to give.
            fingerprint: None,
        },
    })
}

/// The per-anchor coefficients c·u_i/R' of the backward kernel, zeroed where ℓ_i does not
/// depend on the logits (no positive, empty denominator). A NaN LSE keeps its coefficient, as
/// in `supcon_backward_coefficients`, so that NaN features on the device API reach the gradient.
///
/// # Errors
/// Upstream mismatches as [`SavedState::anchor_coefficients`].
pub(crate) fn grad_coefficients(state: &SavedState, upstream: Upstream<'_>) -> Result<Vec<f32>> {
    Ok(state
        .anchor_coefficients(upstream)?
        .iter()
        .zip(state.positive_weight.iter().zip(&state.lse))
        .map(|(&coefficient, (&p, &lse))| {
            if p > 0.0 && lse != f64::NEG_INFINITY {
                coefficient as f32
            } else {
                0.0
            }
        })
        .collect())
}

/// Queues `supcon_backward_coefficients`, which computes the backward kernel's per-anchor
/// coefficients from the forward's `statistics` on the device into a new `float[R]` buffer:
/// bitwise [`grad_coefficients`] of the state [`to_host`] would return, without reading
/// anything back. `upstream` is checked on the host first (reduction none: uploaded as f64).
///
/// Not for [`NoPositivePolicy::Error`], whose error needs the count on the host: there the
/// caller goes through [`to_host`] and [`grad_coefficients`].
///
/// # Errors
/// Upstream mismatches as [`SavedState::anchor_coefficients`]; executor errors.
///
/// # Safety
/// `statistics` must be the outputs of [`launch_forward`] for `problem` on `executor`, alive
/// until the queued kernel has finished.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) unsafe fn launch_coefficients<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
    upstream: Upstream<'_>,
) -> Result<E::Buffer> {
    debug_assert!(problem.loss().no_positive() != NoPositivePolicy::Error);
    check_upstream(problem.loss().reduction(), problem.anchors(), upstream)?;
    let (per_anchor, scalar) = match upstream {
        Upstream::Scalar(u) => (None, u),
        Upstream::PerAnchor(u) => (Some(upload_slice(executor, &u.to_vec())?), 0.0),
    };
    let upstream = match &per_anchor {
        Some(buffer) => DeviceUpstream::PerAnchor(executor.address(buffer)),
        None => DeviceUpstream::Scalar(scalar),
    };
    let coefficients = executor.alloc(problem.anchors() * size_of::<f32>())?;
    let at = statistics.addresses(executor);
    let address = executor.address(&coefficients);
    // SAFETY: the statistics per this function's contract, the R doubles just uploaded for
    // reduction none (freed in stream order after the launch), the R floats just allocated.
    unsafe { launch_coefficients_at(executor, problem, &at, upstream, address)? };
    Ok(coefficients)
}

/// The upstream gradient as the coefficients kernel reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeviceUpstream {
    /// One value for a reduced loss, passed by value.
    Scalar(f64),
    /// `const double[R]` in device memory.
    PerAnchor(u64),
}

/// Queues `supcon_backward_coefficients` on the forward's outputs `at`, writing `float[R]` at
/// `coefficients`. Under [`NoPositivePolicy::Error`] it computes R' as under
/// `ZeroAndCount`; the error is the caller's to raise.
///
/// # Safety
/// `at` must address the outputs of the forward kernels for `problem`, `upstream` (if on the
/// device) `R` doubles and `coefficients` `R` writable floats, all of `executor`'s memory and
/// alive until the kernel has finished.
pub(crate) unsafe fn launch_coefficients_at<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    at: &StatisticsAddresses,
    upstream: DeviceUpstream,
    coefficients: u64,
) -> Result<()> {
    let (anchor_upstream, upstream_scalar) = match upstream {
        DeviceUpstream::Scalar(u) => (0, u),
        DeviceUpstream::PerAnchor(address) => (address, 0.0),
    };
    let params = SupconParams {
        anchor_lse: at.lse,
        anchor_positive_weight: at.positive_weight,
        anchors_without_positives: at.anchors_without_positives,
        anchor_grad_coef: coefficients,
        anchor_upstream,
        upstream_scalar,
        loss_scale_exact: problem.loss().loss_scale(),
        ..problem.shape_params()
    };
    // SAFETY: the kernel reads R floats of LSE and P and one u32 at `at`, R doubles of
    // upstream for a per-anchor upstream, and writes R floats at `coefficients`: all per this
    // function's contract.
    unsafe { problem.launch(executor, Kernel::BackwardCoefficients, &params) }
}

/// Queues the backward kernel, writing `∂L/∂features` (`float[B][V][D]`) at `grad`, with the
/// per-anchor coefficients at `coefficients` ([`grad_coefficients`] uploaded, or
/// [`launch_coefficients`]).
///
/// # Safety
/// As [`launch_forward`] for `inputs`, which must be the inputs the statistics at `saved` were
/// computed from (or their exact host reconstruction); `saved` and `coefficients` must address
/// `R` floats each of `executor`'s memory, alive until the kernel has finished; `grad` must
/// address `B·V·D` writable `f32` that nothing else reads or writes until then.
pub(crate) unsafe fn launch_backward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    saved: SavedAddresses,
    coefficients: u64,
    grad: u64,
) -> Result<()> {
    let params = SupconParams {
        anchor_lse: saved.lse,
        anchor_lse_lo: saved.lse_lo,
        anchor_scaled_positive_lse: saved.scaled_positive_lse,
        anchor_scaled_positive_lse_lo: saved.scaled_positive_lse_lo,
        anchor_positive_weight: saved.positive_weight,
        anchor_positive_weight_max: saved.positive_weight_max,
        anchor_grad_coef: coefficients,
        grad_features: grad,
        ..problem.params(inputs)
    };
    // SAFETY: inputs, statistics, coefficients and `grad` per this function's contract.
    let kernel = problem.backward_kernel(executor.max_dynamic_shared_bytes());
    unsafe { problem.launch(executor, kernel, &params) }
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&x| f64::from(x)).collect()
}

/// [`SavedState`]'s LSE^P_i = log Σ_j w_ij e^{s_ij} from the kernels' scaled statistic
/// LSE^P_i − log W_i (as hi + lo, in f64) and W_i = max_j w_ij (0: no positive).
///
/// The kernels scale by W_i so that the backward kernel reproduces the forward's softmaxes bit
/// for bit in the cases where a loss does not depend on the logits (a one-class batch under
/// L_in, a single positive of any weight): their gradients are then exactly zero
/// (kernels/supcon_forward.cu, "Exact cancellations").
pub(crate) fn saved_positive_lse(scaled_lse: f64, positive_weight_max: f32) -> f64 {
    if positive_weight_max > 0.0 {
        scaled_lse + f64::from(positive_weight_max).ln()
    } else {
        f64::NEG_INFINITY
    }
}

/// A log-sum-exp the kernels keep as hi and lo (`float[R]` each), downloaded as hi + lo in
/// f64 (−∞ + 0 for an empty set).
fn download_split<E: KernelExecutor>(
    executor: &mut E,
    (hi, lo): (&E::Buffer, &E::Buffer),
    anchors: usize,
) -> Result<Vec<f64>> {
    let hi: Vec<f32> = download_vec(executor, hi, anchors)?;
    let lo: Vec<f32> = download_vec(executor, lo, anchors)?;
    Ok(hi
        .iter()
        .zip(&lo)
        .map(|(&hi, &lo)| f64::from(hi) + f64::from(lo))
        .collect())
}

/// An f64 log-sum-exp as the kernels keep it: hi (its rounding to f32) and lo (the rest, 0
/// for ±∞), so that a kernel's e^{(s − hi) − lo} keeps the f64 value's precision.
pub(crate) fn split(lse: f64) -> (f32, f32) {
    let hi = lse as f32;
    let lo = if hi.is_finite() {
        (lse - f64::from(hi)) as f32
    } else {
        0.0
    };
    (hi, lo)
}
