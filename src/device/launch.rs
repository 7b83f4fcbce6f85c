//! The launch sequences, written once for every executor and both APIs: the forward kernels
//! with their outputs left on the device ([`launch_forward`]), those outputs as the crate's
//! [`ForwardOutput`] ([`to_host`]), the backward kernel's per-anchor coefficients (on the host,
//! [`grad_coefficients`], or on the device, [`launch_coefficients`]: the same arithmetic, the
//! same bits, nothing read back) and the backward kernel ([`launch_backward`]).
//!
//! Forward: `supcon_forward_<type>` (per-anchor statistics and losses; under `OnePositive`
//! followed by `supcon_forward_positive_terms_<type>`, the losses from LSE^N), then
//! `supcon_forward_finalize` (the deterministic reduction and the count of anchors without
//! positives). Backward: `supcon_backward_<type>`, fed with the saved statistics and the
//! coefficients c·u_i/R'. Under `normalize`, `supcon_row_scales_<type>` first
//! ([`launch_row_scales`]), whose scales both passes read.

use ndarray::Array1;

use std::ops::Range;

use super::abi::{
    self, BackwardParams, CoefficientParams, FinalizeParams, ForwardParams, RowScalesParams,
};
use super::executor::{download_vec, upload_slice, KernelExecutor};
use super::kernel::Kernel;
use super::plan::{column_splits_bound, ROW_STATISTICS_BYTES};
use super::problem::{InputAddresses, PositiveAddresses, Problem};
use crate::backend::{check_upstream, reduce, ForwardOutput, SavedState, Upstream};
use crate::config::{Denominator, NoPositivePolicy, Reduction};
use crate::error::Result;
use crate::inputs::BatchShape;

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
    /// `float[R]` Ψ_i and log A_i, one positive's (written only under it).
    pub(crate) pull: B,
    pub(crate) log_share: B,
    /// `float[R]` ℓ_i.
    pub(crate) anchor_loss: B,
    /// `double[1]` the reduced loss (Σℓ_i for reduction none).
    pub(crate) reduced_loss: B,
    /// `uint32_t[1]` anchors without positives.
    pub(crate) anchors_without_positives: B,
    /// `RowStatistics[S][R]`, the partial statistics of the S column shares
    /// ([`Problem::column_splits`]); absent without a split.
    pub(crate) partials: Option<B>,
}

impl<B> Statistics<B> {
    /// The buffers the forward kernels write.
    // The CUDA backend records their writes on its stream.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn written_mut(&mut self) -> impl Iterator<Item = &mut B> {
        [
            &mut self.lse,
            &mut self.lse_lo,
            &mut self.scaled_positive_lse,
            &mut self.scaled_positive_lse_lo,
            &mut self.positive_weight,
            &mut self.positive_weight_max,
            &mut self.pull,
            &mut self.log_share,
            &mut self.anchor_loss,
            &mut self.reduced_loss,
            &mut self.anchors_without_positives,
        ]
        .into_iter()
        .chain(self.partials.as_mut())
    }

    /// The buffers by address.
    pub(crate) fn addresses<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
    ) -> StatisticsAddresses {
        StatisticsAddresses {
            saved: SavedAddresses {
                lse: executor.address(&self.lse),
                lse_lo: executor.address(&self.lse_lo),
                scaled_positive_lse: executor.address(&self.scaled_positive_lse),
                scaled_positive_lse_lo: executor.address(&self.scaled_positive_lse_lo),
                positive_weight: executor.address(&self.positive_weight),
                positive_weight_max: executor.address(&self.positive_weight_max),
                pull: executor.address(&self.pull),
                log_share: executor.address(&self.log_share),
            },
            anchor_loss: executor.address(&self.anchor_loss),
            reduced_loss: executor.address(&self.reduced_loss),
            anchors_without_positives: executor.address(&self.anchors_without_positives),
            partials: self.partials.as_ref().map_or(0, |b| executor.address(b)),
        }
    }
}

/// Where the forward kernels write their outputs: a [`Statistics`]' buffers, or regions of one
/// caller-provided workspace ([`WorkspaceLayout`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatisticsAddresses {
    /// The `float[R]` statistics the backward kernel reads.
    pub(crate) saved: SavedAddresses,
    /// `float[R]` ℓ_i.
    pub(crate) anchor_loss: u64,
    /// `double[1]` the reduced loss.
    pub(crate) reduced_loss: u64,
    /// `uint32_t[1]` anchors without positives.
    pub(crate) anchors_without_positives: u64,
    /// `RowStatistics[S][R]` for the forward's column shares (0: none, S = 1).
    pub(crate) partials: u64,
}

/// The per-anchor statistics the backward kernel reads, `float[R]` each, by address.
pub(crate) type SavedAddresses = abi::Statistics;

/// The forward's outputs laid out in one workspace of device memory that the caller owns (a
/// framework's allocator): the reduced loss (`double`) first, the count of anchors without
/// positives (`uint32_t`), then the nine `float[R]` statistics, each region on a 256-byte
/// boundary, as the driver aligns its own allocations, and last the partial statistics of the
/// column shares, room for [`column_splits_bound`] of them (none where that is 1: R ≥ 32768).
// The CUDA backend's; the emulated executor's tests run it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkspaceLayout {
    anchors: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl WorkspaceLayout {
    const ALIGN: usize = 256;
    /// The per-anchor statistics, `float[R]` each, at [`Self::per_anchor_offset`] and every
    /// [`Self::statistics_stride`] bytes after it.
    pub(crate) const STATISTICS: usize = 9;

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

    /// Offset of statistic `k` of [`Self::STATISTICS`]: ℓ_i, then LSE_i (hi, lo), LSE^P_i − log W_i (hi, lo), P_i,
    /// W_i, Ψ_i and log A_i.
    fn statistic_offset(&self, k: usize) -> usize {
        2 * Self::ALIGN + k * self.region()
    }

    /// Offset of ℓ_i (`float[R]`), the first of the nine statistics.
    pub(crate) fn per_anchor_offset(&self) -> usize {
        self.statistic_offset(0)
    }

    /// Bytes from one statistic's region to the next's.
    pub(crate) fn statistics_stride(&self) -> usize {
        self.region()
    }

    /// Offset of the column shares' partial statistics.
    fn partials_offset(&self) -> usize {
        self.statistic_offset(Self::STATISTICS)
    }

    /// Bytes of the column shares' partial statistics: `RowStatistics[S][R]` for the largest S
    /// any number of rows can take with R anchors.
    fn partials_bytes(&self) -> usize {
        // R fits u32 wherever a workspace is laid out for kernels (`Problem::new` checks).
        let bound = column_splits_bound(u32::try_from(self.anchors).unwrap_or(u32::MAX)) as usize;
        if bound > 1 {
            bound * self.anchors * ROW_STATISTICS_BYTES
        } else {
            0
        }
    }

    /// Bytes of the whole workspace.
    pub(crate) fn bytes(&self) -> usize {
        self.partials_offset() + self.partials_bytes()
    }

    /// The outputs' addresses in a workspace at `base`.
    pub(crate) fn addresses(&self, base: u64) -> StatisticsAddresses {
        let at = |offset: usize| base + offset as u64;
        let statistic = |k| at(self.statistic_offset(k));
        StatisticsAddresses {
            anchor_loss: statistic(0),
            saved: SavedAddresses {
                lse: statistic(1),
                lse_lo: statistic(2),
                scaled_positive_lse: statistic(3),
                scaled_positive_lse_lo: statistic(4),
                positive_weight: statistic(5),
                positive_weight_max: statistic(6),
                pull: statistic(7),
                log_share: statistic(8),
            },
            reduced_loss: at(self.loss_offset()),
            anchors_without_positives: at(self.anchors_without_positives_offset()),
            partials: if self.partials_bytes() > 0 {
                at(self.partials_offset())
            } else {
                0
            },
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
    let statistics = Statistics::alloc(executor, problem)?;
    let at = statistics.addresses(executor);
    // SAFETY: the inputs per this function's contract; the outputs are the buffers just
    // allocated, which the caller keeps (dropping a buffer frees it only after the queued work).
    unsafe { launch_forward_at(executor, problem, inputs, &at)? };
    Ok(statistics)
}

impl<B> Statistics<B> {
    /// Buffers for every output of the problem's forward pass (uninitialised).
    pub(crate) fn alloc<E: KernelExecutor<Buffer = B>>(
        executor: &mut E,
        problem: &Problem,
    ) -> Result<Self> {
        let per_anchor_bytes = problem.anchors() * size_of::<f32>();
        Ok(Statistics {
            lse: executor.alloc(per_anchor_bytes)?,
            lse_lo: executor.alloc(per_anchor_bytes)?,
            scaled_positive_lse: executor.alloc(per_anchor_bytes)?,
            scaled_positive_lse_lo: executor.alloc(per_anchor_bytes)?,
            positive_weight: executor.alloc(per_anchor_bytes)?,
            positive_weight_max: executor.alloc(per_anchor_bytes)?,
            pull: executor.alloc(per_anchor_bytes)?,
            log_share: executor.alloc(per_anchor_bytes)?,
            anchor_loss: executor.alloc(per_anchor_bytes)?,
            reduced_loss: executor.alloc(size_of::<f64>())?,
            anchors_without_positives: executor.alloc(size_of::<u32>())?,
            partials: match problem.column_splits() as usize {
                1 => None,
                shares => Some(executor.alloc(shares * problem.anchors() * ROW_STATISTICS_BYTES)?),
            },
        })
    }
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
    let anchors = problem.kernel_shape().anchors;
    // SAFETY: inputs and outputs per this function's contract.
    unsafe {
        launch_forward_statistics(executor, problem, inputs, at, 0..anchors)?;
        launch_finalize(executor, problem, at)
    }
}

/// Queues `supcon_forward_finalize`: from every anchor's ℓ_i and P_i `at`, the reduced loss
/// and the count of anchors without positives, written `at`.
///
/// # Safety
/// As [`launch_forward_at`] for `at`, with every anchor's statistics written before the
/// kernel runs.
pub(crate) unsafe fn launch_finalize<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    at: &StatisticsAddresses,
) -> Result<()> {
    let params = FinalizeParams {
        anchor_loss: at.anchor_loss,
        positive_weight: at.saved.positive_weight,
        reduced_loss: at.reduced_loss,
        anchors_without_positives: at.anchors_without_positives,
        reduction: problem.reduction_block(),
    };
    let anchors = problem.kernel_shape().anchors;
    // SAFETY: the kernel reads R floats of ℓ and P and writes a double and a u32, all `at`.
    unsafe { problem.launch(executor, Kernel::ForwardFinalize, &params, anchors) }
}

/// Queues the forward statistics kernel for the anchors in `anchors` (a sub-range of 0..R),
/// writing their statistics and losses `at` (the other anchors' entries are left alone). With
/// the columns split ([`Problem::column_splits`]), the kernel writes each share's partial
/// statistics and `supcon_forward_merge` merges them in order. Under `OnePositive` the
/// positive terms follow ([`launch_positive_terms`]).
///
/// # Safety
/// As [`launch_forward_at`], with `at.partials` addressing `RowStatistics[S][R]` when the
/// problem splits its columns in S > 1 shares.
pub(crate) unsafe fn launch_forward_statistics<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    at: &StatisticsAddresses,
    anchors: Range<u32>,
) -> Result<()> {
    debug_assert!(anchors.start <= anchors.end && anchors.end <= problem.kernel_shape().anchors);
    if anchors.is_empty() {
        return Ok(());
    }
    let column_splits = problem.column_splits();
    debug_assert!(column_splits == 1 || at.partials != 0);
    let params = forward_params(problem, inputs, at, &anchors, column_splits);
    let kernel = problem.forward_kernel(executor.max_dynamic_shared_bytes());
    let rows = anchors.len() as u32;
    // SAFETY: inputs and outputs per this function's contract; the merge reads the partials
    // the statistics kernel wrote before it on the same stream, the positive terms the
    // statistics of either.
    unsafe {
        problem.launch(executor, kernel, &params, rows)?;
        if column_splits > 1 {
            problem.launch(executor, Kernel::ForwardMerge, &params, rows)?;
        }
        if problem.loss().denominator() == Denominator::OnePositive {
            launch_positive_terms(executor, problem, inputs, at, anchors)?;
        }
    }
    Ok(())
}

/// The runs of a shard's anchors that the statistics kernel launches over: one launch for the
/// whole batch, else one per anchor view (`crate::shard::anchor_runs`).
pub(crate) fn anchor_launches(problem: &Problem, samples: &Range<usize>) -> Vec<Range<usize>> {
    if samples.len() == problem.shape().batch() {
        std::iter::once(0..problem.anchors()).collect()
    } else {
        crate::shard::anchor_runs(problem.loss(), problem.shape(), samples).collect()
    }
}

/// The runs of a shard's gradient rows that the backward kernel launches over: one launch for
/// the whole batch, else one per view (`crate::shard::row_runs`).
pub(crate) fn row_launches(shape: BatchShape, samples: &Range<usize>) -> Vec<Range<usize>> {
    if samples.len() == shape.batch() {
        std::iter::once(0..shape.rows()).collect()
    } else {
        crate::shard::row_runs(shape, samples).collect()
    }
}

/// Queues `OnePositive`'s second forward pass for the anchors in `anchors`: from their LSE^N_i
/// and P_i `at`, it writes their ℓ_i, Ψ_i and log A_i `at` (unsplit: one column share).
///
/// # Safety
/// As [`launch_forward_at`], with the range's LSE_i (hi, lo) and P_i `at` written by the
/// statistics pass (or rebuilt from a saved state) before this queues.
pub(crate) unsafe fn launch_positive_terms<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    at: &StatisticsAddresses,
    anchors: Range<u32>,
) -> Result<()> {
    debug_assert_eq!(problem.loss().denominator(), Denominator::OnePositive);
    let params = forward_params(problem, inputs, at, &anchors, 1);
    let kernel = problem.positive_terms_kernel(executor.max_dynamic_shared_bytes());
    // SAFETY: inputs and outputs per this function's contract.
    unsafe { problem.launch(executor, kernel, &params, anchors.len() as u32) }
}

/// The parameter block of a forward launch over `anchors`, its columns in `column_splits`
/// shares (the partials `at` used only when there are several).
fn forward_params(
    problem: &Problem,
    inputs: &InputAddresses,
    at: &StatisticsAddresses,
    anchors: &Range<u32>,
    column_splits: u32,
) -> ForwardParams {
    ForwardParams {
        problem: problem.block(inputs),
        statistics: at.saved,
        anchor_loss: at.anchor_loss,
        partials: if column_splits > 1 { at.partials } else { 0 },
        anchor_begin: anchors.start,
        anchor_end: anchors.end,
        column_splits,
        padding: 0,
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
    let [per_anchor, lse, lse_positive, positive_weight] =
        statistics_to_host(executor, problem, statistics)?;
    let reduced = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
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
            lse_positive,
            positive_weight,
            mean_denominator,
            // The host path adds the batch's fingerprint; the device API has none to give.
            fingerprint: None,
        },
    })
}

/// Per anchor ℓ_i, LSE_i, LSE^P_i and P_i on the host (synchronises), as [`SavedState`] keeps
/// them.
pub(crate) fn statistics_to_host<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
) -> Result<[Vec<f64>; 4]> {
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
    let lse_positive = (scaled_positive_lse.iter().zip(&positive_weight_max))
        .map(|(&lse, &w)| saved_positive_lse(lse, w))
        .collect();
    Ok([
        widen(&anchor_loss),
        lse,
        lse_positive,
        widen(&positive_weight),
    ])
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
    let params = CoefficientParams {
        lse: at.saved.lse,
        positive_weight: at.saved.positive_weight,
        anchors_without_positives: at.anchors_without_positives,
        upstream: anchor_upstream,
        grad_coef: coefficients,
        upstream_scalar,
        loss_scale: problem.loss().loss_scale(),
        reduction: problem.reduction_block(),
    };
    let anchors = problem.kernel_shape().anchors;
    // SAFETY: the kernel reads R floats of LSE and P and one u32 at `at`, R doubles of
    // upstream for a per-anchor upstream, and writes R floats at `coefficients`: all per this
    // function's contract.
    unsafe { problem.launch(executor, Kernel::BackwardCoefficients, &params, anchors) }
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
// The device API's (`resident`, CUDA only); the host path launches row runs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) unsafe fn launch_backward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    saved: SavedAddresses,
    coefficients: u64,
    grad: u64,
) -> Result<()> {
    let rows = problem.kernel_shape().rows;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        launch_backward_rows(
            executor,
            problem,
            inputs,
            saved,
            coefficients,
            grad,
            0..rows,
        )
    }
}

/// Queues the backward kernel for the gradient rows in `rows` (a sub-range of 0..N): writes
/// their rows of `grad`, leaves the others alone.
///
/// # Safety
/// As [`launch_backward`].
pub(crate) unsafe fn launch_backward_rows<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    saved: SavedAddresses,
    coefficients: u64,
    grad: u64,
    rows: Range<u32>,
) -> Result<()> {
    debug_assert!(rows.start <= rows.end && rows.end <= problem.kernel_shape().rows);
    if rows.is_empty() {
        return Ok(());
    }
    let params = BackwardParams {
        problem: problem.block(inputs),
        statistics: saved,
        grad_coef: coefficients,
        grad_features: grad,
        grad_begin: rows.start,
        grad_end: rows.end,
    };
    let kernel = problem.backward_kernel(executor.max_dynamic_shared_bytes());
    // SAFETY: inputs, statistics, coefficients and `grad` per this function's contract.
    unsafe { problem.launch(executor, kernel, &params, rows.len() as u32) }
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

/// Queues `supcon_row_scales_*`: the `float[N]` scales of the fused normalisation at `scales`.
///
/// # Safety
/// `features` must address the problem's `B·V·D` features of its type in device memory of
/// `executor`, and `scales` `4·N` writable bytes that nothing else reads or writes until the
/// kernels that read them have finished.
pub(crate) unsafe fn launch_row_scales<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    features: u64,
    scales: u64,
) -> Result<()> {
    let params = RowScalesParams {
        problem: problem.block(&InputAddresses {
            features,
            positives: PositiveAddresses::SameSample,
            cap_bounds: 0,
            row_scales: 0,
        }),
        scales,
    };
    let kernel = Kernel::RowScales(problem.feature_type());
    let rows = problem.kernel_shape().rows;
    // SAFETY: forwarded from this function's contract.
    unsafe { problem.launch(executor, kernel, &params, rows) }
}

#[cfg(all(test, feature = "emulation"))]
mod tests {
    use half::bf16;

    use super::*;
    use crate::config::SupConLoss;
    use crate::device::emulated::HostExecutor;
    use crate::device::executor::download_vec;
    use crate::element::DType;
    use crate::inputs::BatchShape;
    use crate::precision::Precision;

    /// A pass split into row ranges computes what one launch over all rows computes, bit for
    /// bit, on the SIMT and the tensor-core kernels: the ranges a sharded step will launch.
    #[test]
    fn row_ranges_split_a_pass_bitwise() {
        let (batch, views, dim) = (260, 2, 24);
        let shape = BatchShape::new(batch, views, dim).unwrap();
        let rows = (batch * views) as u32;
        let values: Vec<f32> = (0..batch * views * dim)
            .map(|k| ((k * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3)
            .collect();
        let labels: Vec<i64> = (0..batch as i64).map(|b| b % 7).collect();
        let executor = &mut HostExecutor;
        let labels = executor.upload(bytemuck::cast_slice(&labels)).unwrap();
        let half: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        for (dtype, bytes) in [
            (
                DType::F32,
                bytemuck::cast_slice::<f32, u8>(&values).to_vec(),
            ),
            (
                DType::BF16,
                bytemuck::cast_slice::<bf16, u8>(&half).to_vec(),
            ),
        ] {
            let loss = SupConLoss::default();
            let problem = Problem::new("emulated", &loss, shape, dtype, Precision::Auto).unwrap();
            let features = executor.upload(&bytes).unwrap();
            let inputs = InputAddresses {
                features: executor.address(&features),
                positives: PositiveAddresses::Labels(executor.address(&labels)),
                cap_bounds: 0,
                row_scales: 0,
            };
            // SAFETY (all launches below): the buffers hold B·V·D features, B labels, R floats
            // per statistic and B·V·D gradient floats, alive across the synchronous launches.
            let whole = unsafe { launch_forward(executor, &problem, &inputs) }.unwrap();
            let split = unsafe { launch_forward(executor, &problem, &inputs) }.unwrap();
            let at = split.addresses(executor);
            for range in [0..37, 37..64, 64..rows] {
                unsafe { launch_forward_statistics(executor, &problem, &inputs, &at, range) }
                    .unwrap();
            }
            let bits = |executor: &mut HostExecutor, buffer| -> Vec<u32> {
                download_vec(executor, buffer, rows as usize).unwrap()
            };
            for (a, b) in [
                (&whole.lse, &split.lse),
                (&whole.lse_lo, &split.lse_lo),
                (&whole.scaled_positive_lse, &split.scaled_positive_lse),
                (&whole.positive_weight, &split.positive_weight),
                (&whole.anchor_loss, &split.anchor_loss),
            ] {
                assert_eq!(bits(executor, a), bits(executor, b), "{dtype:?} forward");
            }
            let coefficients =
                unsafe { launch_coefficients(executor, &problem, &whole, Upstream::Scalar(1.0)) }
                    .unwrap();
            let coefficients = executor.address(&coefficients);
            let saved = whole.addresses(executor).saved;
            let elements = batch * views * dim;
            let one = executor.alloc(elements * 4).unwrap();
            let parts = executor.alloc(elements * 4).unwrap();
            let (one_at, parts_at) = (executor.address(&one), executor.address(&parts));
            unsafe { launch_backward(executor, &problem, &inputs, saved, coefficients, one_at) }
                .unwrap();
            for range in [0..1, 1..70, 70..rows] {
                unsafe {
                    launch_backward_rows(
                        executor,
                        &problem,
                        &inputs,
                        saved,
                        coefficients,
                        parts_at,
                        range,
                    )
                }
                .unwrap();
            }
            let one: Vec<u32> = download_vec(executor, &one, elements).unwrap();
            let parts: Vec<u32> = download_vec(executor, &parts, elements).unwrap();
            assert_eq!(one, parts, "{dtype:?} backward");
            // Fresh buffers are NaN: every element was written, none is NaN.
            assert!(parts.iter().all(|&b| !f32::from_bits(b).is_nan()));
        }
    }
}
