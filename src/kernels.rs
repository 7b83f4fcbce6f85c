//! The launch sequence of the SupCon kernels, written once for every executor.
//!
//! An executor ([`KernelExecutor`]) owns device memory, copies to and from it and launches a
//! kernel by name: the emulated executor (`src/emulated.rs`) uses host memory and the C++
//! emulation, the CUDA backend uses cudarc. [`forward`] and [`backward`] do everything else:
//! validation, the unsupported options, uploads, the launches with the plan of
//! [`launch_config`], downloads and the crate's outputs.
//!
//! Forward: `supcon_forward_<type>` (per-anchor statistics and losses), then
//! `supcon_forward_finalize` (the deterministic reduction and the count of anchors without
//! positives). Backward: `supcon_backward_<type>`, fed with the saved state and the per-anchor
//! coefficients c·u_i/R' computed here in f64.
//!
//! f64 features are rejected with [`Error::Unsupported`]: the kernels read f32, f16 or bf16 and
//! silently rounding f64 input would hide a precision loss the caller did not ask for.

use bytemuck::Zeroable;
use half::{bf16, f16};
use ndarray::{Array1, Array3, ArrayView3};

use crate::backend::{ForwardOutput, SavedState, Upstream};
use crate::config::{Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss};
use crate::element::{DType, Element, GradElement};
use crate::error::{Error, Result};
use crate::kernel_abi::{self, SupconParams};
use crate::launch_plan::{launch_config, KernelShape, LaunchConfig, Stage, GRAD_CHUNK, MAX_GRID_Y};
use crate::problem::{validate_inputs, BatchShape, Positives};

/// Most rows the kernels index (32-bit row arithmetic with room for one tile).
const MAX_ROWS: usize = i32::MAX as usize;

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
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(FeatureType::F32),
            DType::F16 => Some(FeatureType::F16),
            DType::BF16 => Some(FeatureType::Bf16),
            DType::F64 => None,
        }
    }
}

/// A kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// Per-anchor statistics and losses.
    ForwardStatistics(FeatureType),
    /// The reduction over anchors.
    ForwardFinalize,
    /// The feature gradient.
    Backward(FeatureType),
}

impl Kernel {
    /// The `extern "C"` name in the fatbin (and in the emulation).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::ForwardStatistics(FeatureType::F32) => "supcon_forward_f32",
            Kernel::ForwardStatistics(FeatureType::F16) => "supcon_forward_f16",
            Kernel::ForwardStatistics(FeatureType::Bf16) => "supcon_forward_bf16",
            Kernel::ForwardFinalize => "supcon_forward_finalize",
            Kernel::Backward(FeatureType::F32) => "supcon_backward_f32",
            Kernel::Backward(FeatureType::F16) => "supcon_backward_f16",
            Kernel::Backward(FeatureType::Bf16) => "supcon_backward_bf16",
        }
    }

    fn stage(self) -> Stage {
        match self {
            Kernel::ForwardStatistics(_) => Stage::ForwardStatistics,
            Kernel::ForwardFinalize => Stage::ForwardFinalize,
            Kernel::Backward(_) => Stage::Backward,
        }
    }
}

/// The fatbin (compiled by build.rs from `kernels/<module>.cu`) that holds `kernel`.
///
/// # Errors
/// [`Error::KernelsNotBuilt`] when nvcc was not found at build time.
#[cfg(feature = "cuda")]
pub(crate) fn fatbin(kernel: Kernel) -> Result<&'static [u8]> {
    #[cfg(supcon_kernels_built)]
    {
        Ok(match kernel {
            Kernel::ForwardStatistics(_) | Kernel::ForwardFinalize => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_forward.fatbin"))
            }
            Kernel::Backward(_) => {
                include_bytes!(concat!(env!("OUT_DIR"), "/supcon_backward.fatbin"))
            }
        })
    }
    #[cfg(not(supcon_kernels_built))]
    {
        let _ = kernel;
        Err(Error::KernelsNotBuilt)
    }
}

/// Device memory, copies and launches: what [`forward`] and [`backward`] need from a device.
pub(crate) trait KernelExecutor {
    /// An owned device allocation, freed on drop.
    type Buffer;

    /// A buffer of `bytes` bytes with unspecified contents.
    fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer>;

    /// A buffer holding a copy of `bytes`.
    fn upload(&mut self, bytes: &[u8]) -> Result<Self::Buffer>;

    /// Copies the first `out.len()` bytes of `buffer` into `out`, after all launches so far.
    fn download(&mut self, buffer: &Self::Buffer, out: &mut [u8]) -> Result<()>;

    /// The address kernels see for `buffer`.
    fn address(&self, buffer: &Self::Buffer) -> u64;

    /// Launches `kernel` with `config` and `params` (asynchronously or not).
    ///
    /// # Safety
    /// Every address in `params` that `kernel` reads or writes (kernels/supcon_params.h) must be
    /// the [`address`](Self::address) of a live buffer of this executor, at least as large as
    /// the kernel's accesses for the shape in `params`, and must stay alive until the launch
    /// has completed (a later [`download`](Self::download) waits for it).
    unsafe fn launch(
        &mut self,
        kernel: Kernel,
        config: LaunchConfig,
        params: &SupconParams,
    ) -> Result<()>;
}

fn upload_slice<E: KernelExecutor, T: bytemuck::Pod>(
    executor: &mut E,
    values: &[T],
) -> Result<E::Buffer> {
    executor.upload(bytemuck::cast_slice(values))
}

fn download_vec<E: KernelExecutor, T: bytemuck::Pod>(
    executor: &mut E,
    buffer: &E::Buffer,
    len: usize,
) -> Result<Vec<T>> {
    let mut values = vec![T::zeroed(); len];
    executor.download(buffer, bytemuck::cast_slice_mut(&mut values))?;
    Ok(values)
}

/// What every launch needs to know about a validated problem.
struct Problem {
    shape: BatchShape,
    anchors: usize,
    kernel_shape: KernelShape,
    feature_type: FeatureType,
}

impl Problem {
    /// Validates the inputs, then rejects what the kernels do not implement.
    fn new<T: Element>(
        backend: &'static str,
        loss: &SupConLoss,
        features: &ArrayView3<'_, T>,
        positives: &Positives<'_>,
    ) -> Result<Self> {
        let shape = validate_inputs(features, positives)?;
        let unsupported = |what: &str| Error::Unsupported {
            backend,
            what: what.to_string(),
        };
        let feature_type = FeatureType::of(T::DTYPE).ok_or_else(|| {
            unsupported("f64 features (the kernels read f32, f16 or bf16: convert to f32)")
        })?;
        if loss.denominator() == Denominator::OnePositive {
            return Err(unsupported("denominator one_positive"));
        }
        if loss.positives_cap().is_some() {
            return Err(unsupported("positives_cap"));
        }
        let too_large = |what: String| Error::TooLarge { what };
        if shape.rows() > MAX_ROWS {
            return Err(too_large(format!(
                "N = B·V = {} rows exceeds the kernels' {MAX_ROWS}",
                shape.rows()
            )));
        }
        let max_dim = (MAX_GRID_Y * GRAD_CHUNK) as usize;
        if shape.dim > max_dim {
            return Err(too_large(format!(
                "D = {} exceeds the kernels' {max_dim}",
                shape.dim
            )));
        }
        let anchors = shape.anchors(loss.contrast_mode());
        // All three fit u32: anchors ≤ rows ≤ MAX_ROWS and dim ≤ max_dim.
        let kernel_shape = KernelShape {
            rows: shape.rows() as u32,
            anchors: anchors as u32,
            dim: shape.dim as u32,
        };
        Ok(Problem {
            shape,
            anchors,
            kernel_shape,
            feature_type,
        })
    }

    /// Launches `kernel` with the plan for this problem.
    ///
    /// # Safety
    /// As [`KernelExecutor::launch`].
    unsafe fn launch<E: KernelExecutor>(
        &self,
        executor: &mut E,
        kernel: Kernel,
        params: &SupconParams,
    ) -> Result<()> {
        let config = launch_config(kernel.stage(), self.kernel_shape);
        // SAFETY: forwarded from this function's contract.
        unsafe { executor.launch(kernel, config, params) }
    }
}

/// The features and positives on the device.
struct DeviceInputs<B> {
    features: B,
    labels: Option<B>,
    mask: Option<B>,
}

impl<B> DeviceInputs<B> {
    /// Uploads the features (in `[B, V, D]` order, whatever the view's strides, converted
    /// exactly to the kernel's element type) and the positives.
    fn upload<E: KernelExecutor<Buffer = B>, T: Element>(
        executor: &mut E,
        problem: &Problem,
        features: &ArrayView3<'_, T>,
        positives: &Positives<'_>,
    ) -> Result<Self> {
        // Every f32/f16/bf16 value survives the trip through f32 unchanged.
        let values = features.iter().map(|x| x.to_f32());
        let features = match problem.feature_type {
            FeatureType::F32 => upload_slice(executor, &values.collect::<Vec<f32>>())?,
            FeatureType::F16 => {
                upload_slice(executor, &values.map(f16::from_f32).collect::<Vec<_>>())?
            }
            FeatureType::Bf16 => {
                upload_slice(executor, &values.map(bf16::from_f32).collect::<Vec<_>>())?
            }
        };
        let (labels, mask) = match positives {
            Positives::SimClr => (None, None),
            Positives::Labels(labels) => {
                let labels: Vec<i64> = labels.iter().copied().collect();
                (Some(upload_slice(executor, &labels)?), None)
            }
            Positives::Mask(mask) => {
                let weights: Vec<f32> = mask.iter().copied().collect();
                (None, Some(upload_slice(executor, &weights)?))
            }
        };
        Ok(DeviceInputs {
            features,
            labels,
            mask,
        })
    }

    /// The parameter block with the inputs, shape and options filled in (outputs 0).
    fn params<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
        loss: &SupConLoss,
        problem: &Problem,
    ) -> SupconParams {
        let address = |buffer: &Option<B>| buffer.as_ref().map_or(0, |b| executor.address(b));
        let positive_kind = match (&self.labels, &self.mask) {
            (Some(_), _) => kernel_abi::positives::LABELS,
            (_, Some(_)) => kernel_abi::positives::MASK,
            (None, None) => kernel_abi::positives::SAME_SAMPLE,
        };
        let shape = problem.shape;
        SupconParams {
            features: executor.address(&self.features),
            labels: address(&self.labels),
            mask: address(&self.mask),
            // Fit u32: rows ≤ MAX_ROWS (checked in Problem::new).
            batch: shape.batch as u32,
            views: shape.views as u32,
            dim: problem.kernel_shape.dim,
            rows: problem.kernel_shape.rows,
            anchors: problem.kernel_shape.anchors,
            positive_kind,
            denominator: match loss.denominator() {
                Denominator::All => kernel_abi::denominator::ALL,
                // OnePositive is rejected in Problem::new.
                Denominator::OnlyNegatives | Denominator::OnePositive => {
                    kernel_abi::denominator::ONLY_NEGATIVES
                }
            },
            summation: match loss.summation() {
                Summation::Outside => kernel_abi::summation::OUTSIDE,
                Summation::Inside => kernel_abi::summation::INSIDE,
            },
            reduction: match loss.reduction() {
                Reduction::Mean => kernel_abi::reduction::MEAN,
                Reduction::Sum => kernel_abi::reduction::SUM,
                Reduction::None => kernel_abi::reduction::NONE,
            },
            no_positive_policy: match loss.no_positive() {
                NoPositivePolicy::ZeroAndCount => kernel_abi::no_positive::ZERO_AND_COUNT,
                NoPositivePolicy::Exclude => kernel_abi::no_positive::EXCLUDE,
                NoPositivePolicy::Error => kernel_abi::no_positive::ERROR,
            },
            inv_temperature: loss.temperature().recip() as f32,
            loss_scale: loss.loss_scale() as f32,
            ..SupconParams::zeroed()
        }
    }
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&x| f64::from(x)).collect()
}

fn narrow(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&x| x as f32).collect()
}

/// [`SavedState`]'s LSE^P_i = log Σ_j w_ij e^{s_ij} from the kernels' scaled statistic
/// LSE^P_i − log W_i and W_i = max_j w_ij (0: no positive).
///
/// The kernels scale by W_i so that the backward kernel reproduces the forward's softmaxes bit
/// for bit in the cases where a loss does not depend on the logits (a one-class batch under
/// L_in, a single positive of any weight): their gradients are then exactly zero
/// (kernels/supcon_forward.cu, "Exact cancellations").
pub(crate) fn saved_positive_lse(scaled_lse: f32, positive_weight_max: f32) -> f64 {
    if positive_weight_max > 0.0 {
        f64::from(scaled_lse) + f64::from(positive_weight_max).ln()
    } else {
        f64::NEG_INFINITY
    }
}

/// W_i for every anchor, as the forward kernel finds it (the largest weight among i's positives),
/// from the positives alone; 1 where i has no positive (any positive value works there).
///
/// Only the exactness of the cancellations above depends on matching the kernel: any W_i > 0
/// gives the same gradient up to rounding.
fn positive_weight_max(positives: &Positives<'_>, shape: BatchShape, anchors: usize) -> Vec<f32> {
    let Positives::Mask(mask) = positives else {
        return vec![1.0; anchors];
    };
    // Anchor i's contrasts j ≠ i cover every sample but its own, which they cover only
    // through other views (V ≥ 2).
    let per_sample: Vec<f32> = mask
        .rows()
        .into_iter()
        .enumerate()
        .map(|(b, weights)| {
            let largest = weights
                .iter()
                .enumerate()
                .filter(|&(other, _)| other != b || shape.views > 1)
                .fold(0.0f32, |largest, (_, &w)| largest.max(w));
            if largest > 0.0 {
                largest
            } else {
                1.0
            }
        })
        .collect();
    (0..anchors)
        .map(|i| per_sample[shape.sample_of(i)])
        .collect()
}

/// The forward pass on `executor` (see [`crate::Backend::forward`]).
pub(crate) fn forward<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
) -> Result<ForwardOutput> {
    let problem = Problem::new(backend, loss, &features, &positives)?;
    let inputs = DeviceInputs::upload(executor, &problem, &features, &positives)?;
    let anchors = problem.anchors;
    let per_anchor_bytes = anchors * size_of::<f32>();
    let lse = executor.alloc(per_anchor_bytes)?;
    let scaled_positive_lse = executor.alloc(per_anchor_bytes)?;
    let positive_weight = executor.alloc(per_anchor_bytes)?;
    let positive_weight_max = executor.alloc(per_anchor_bytes)?;
    let anchor_loss = executor.alloc(per_anchor_bytes)?;
    let reduced_loss = executor.alloc(size_of::<f64>())?;
    let without_positives = executor.alloc(size_of::<u32>())?;
    let params = SupconParams {
        anchor_lse: executor.address(&lse),
        anchor_scaled_positive_lse: executor.address(&scaled_positive_lse),
        anchor_positive_weight: executor.address(&positive_weight),
        anchor_positive_weight_max: executor.address(&positive_weight_max),
        anchor_loss: executor.address(&anchor_loss),
        reduced_loss: executor.address(&reduced_loss),
        anchors_without_positives: executor.address(&without_positives),
        ..inputs.params(executor, loss, &problem)
    };
    // SAFETY: the inputs hold B·V·D features of the kernel's type, B labels, B·B weights; the
    // per-anchor outputs R floats, the reduced loss one f64, the count one u32 — exactly what
    // the forward kernels touch for this shape. All stay alive until the downloads below.
    unsafe {
        problem.launch(
            executor,
            Kernel::ForwardStatistics(problem.feature_type),
            &params,
        )?;
        problem.launch(executor, Kernel::ForwardFinalize, &params)?;
    }
    let lse: Vec<f32> = download_vec(executor, &lse, anchors)?;
    let scaled_positive_lse: Vec<f32> = download_vec(executor, &scaled_positive_lse, anchors)?;
    let positive_weight: Vec<f32> = download_vec(executor, &positive_weight, anchors)?;
    let positive_weight_max: Vec<f32> = download_vec(executor, &positive_weight_max, anchors)?;
    let anchor_loss: Vec<f32> = download_vec(executor, &anchor_loss, anchors)?;
    let reduced_loss = download_vec::<_, f64>(executor, &reduced_loss, 1)?[0];
    let without_positives = download_vec::<_, u32>(executor, &without_positives, 1)?[0];

    if loss.no_positive() == NoPositivePolicy::Error && without_positives > 0 {
        let anchor = positive_weight.iter().position(|&p| p <= 0.0).unwrap_or(0);
        return Err(Error::AnchorWithoutPositives { anchor });
    }
    let with_positive = anchors.saturating_sub(without_positives as usize);
    let mean_denominator = match (loss.reduction(), loss.no_positive()) {
        (Reduction::Sum | Reduction::None, _) => 1.0,
        (Reduction::Mean, NoPositivePolicy::Exclude) => with_positive.max(1) as f64,
        (Reduction::Mean, _) => anchors as f64,
    };
    Ok(ForwardOutput {
        loss: (loss.reduction() != Reduction::None).then_some(reduced_loss),
        per_anchor: Array1::from(widen(&anchor_loss)),
        state: SavedState {
            loss: *loss,
            shape: problem.shape,
            lse: widen(&lse),
            lse_positive: scaled_positive_lse
                .iter()
                .zip(&positive_weight_max)
                .map(|(&lse, &w)| saved_positive_lse(lse, w))
                .collect(),
            positive_weight: widen(&positive_weight),
            mean_denominator,
        },
    })
}

/// The backward pass on `executor` (see [`crate::Backend::backward`]).
pub(crate) fn backward<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
    state: &SavedState,
    upstream: Upstream<'_>,
) -> Result<Array3<T::Grad>> {
    let problem = Problem::new(backend, loss, &features, &positives)?;
    state.check(loss, problem.shape)?;
    // c·u_i/R', zeroed where ℓ_i does not depend on the logits (no positive, empty denominator).
    let coefficients: Vec<f32> = state
        .anchor_coefficients(upstream)?
        .iter()
        .zip(state.positive_weight.iter().zip(&state.lse))
        .map(|(&coefficient, (&p, &lse))| {
            if p > 0.0 && lse > f64::NEG_INFINITY {
                coefficient as f32
            } else {
                0.0
            }
        })
        .collect();
    let inputs = DeviceInputs::upload(executor, &problem, &features, &positives)?;
    let lse = upload_slice(executor, &narrow(&state.lse))?;
    let weight_max = positive_weight_max(&positives, problem.shape, problem.anchors);
    let scaled_positive_lse: Vec<f32> = state
        .lse_positive
        .iter()
        .zip(&weight_max)
        .map(|(&lse, &w)| (lse - f64::from(w).ln()) as f32)
        .collect();
    let scaled_positive_lse = upload_slice(executor, &scaled_positive_lse)?;
    let positive_weight_max = upload_slice(executor, &weight_max)?;
    let positive_weight = upload_slice(executor, &narrow(&state.positive_weight))?;
    let grad_coef = upload_slice(executor, &coefficients)?;
    let (rows, dim) = (problem.shape.rows(), problem.shape.dim);
    let grad = executor.alloc(rows * dim * size_of::<f32>())?;
    let params = SupconParams {
        anchor_lse: executor.address(&lse),
        anchor_scaled_positive_lse: executor.address(&scaled_positive_lse),
        anchor_positive_weight: executor.address(&positive_weight),
        anchor_positive_weight_max: executor.address(&positive_weight_max),
        anchor_grad_coef: executor.address(&grad_coef),
        grad_features: executor.address(&grad),
        ..inputs.params(executor, loss, &problem)
    };
    // SAFETY: the inputs as in `forward`; the statistics and coefficients hold R floats (the
    // state matches the shape: `state.check`), the gradient B·V·D floats. All stay alive until
    // the download below.
    unsafe { problem.launch(executor, Kernel::Backward(problem.feature_type), &params)? };
    let grad: Vec<f32> = download_vec(executor, &grad, rows * dim)?;
    let BatchShape { batch, views, dim } = problem.shape;
    Ok(Array3::from_shape_fn((batch, views, dim), |(b, v, k)| {
        T::Grad::from_f32(grad[(b * views + v) * dim + k])
    }))
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

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
