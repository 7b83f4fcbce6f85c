//! The launch sequence of the SupCon kernels, written once for every executor and both APIs.
//!
//! An executor ([`KernelExecutor`]) owns device memory, copies to and from it and launches a
//! kernel by name: the emulated executor (`src/emulated.rs`) uses host memory and the C++
//! emulation, the CUDA backend uses cudarc. Everything else is here, shape-based so that the
//! host-array path ([`forward`], [`backward`]: upload, launch, download) and the
//! device-resident path of the CUDA backend (`src/cuda/enabled/resident.rs`: inputs by
//! address, outputs left on the device) share it: validation and the unsupported options
//! ([`Problem::new`]), the parameter block, the launches with the plan of [`launch_config`]
//! ([`launch_forward`], [`launch_backward`]) and the crate's outputs ([`to_host`]).
//!
//! Forward: `supcon_forward_<type>` (per-anchor statistics and losses), then
//! `supcon_forward_finalize` (the deterministic reduction and the count of anchors without
//! positives). Backward: `supcon_backward_<type>`, fed with the saved state and the per-anchor
//! coefficients c·u_i/R': computed on the host in f64 where the state is on the host
//! ([`grad_coefficients`]), by `supcon_backward_coefficients` where it is on the device
//! ([`launch_coefficients`]: the same arithmetic, the same bits, nothing read back).
//!
//! f64 features are rejected with [`Error::Unsupported`]: the kernels read f32, f16 or bf16 and
//! silently rounding f64 input would hide a precision loss the caller did not ask for.

use bytemuck::Zeroable;
use half::{bf16, f16};
use ndarray::{Array1, Array3, ArrayView3};

use crate::backend::{check_upstream, reduce, ForwardOutput, SavedState, Upstream};
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
    /// The per-anchor gradient coefficients, on the device.
    // The device API's (CUDA only); the emulated executor runs it in tests.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    BackwardCoefficients,
    /// The feature gradient.
    Backward(FeatureType),
}

impl Kernel {
    /// Every entry point.
    // The CUDA executor loads them all; the emulated executor's tests check them all.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) const ALL: [Kernel; 8] = [
        Kernel::ForwardStatistics(FeatureType::F32),
        Kernel::ForwardStatistics(FeatureType::F16),
        Kernel::ForwardStatistics(FeatureType::Bf16),
        Kernel::ForwardFinalize,
        Kernel::BackwardCoefficients,
        Kernel::Backward(FeatureType::F32),
        Kernel::Backward(FeatureType::F16),
        Kernel::Backward(FeatureType::Bf16),
    ];

    /// The `extern "C"` name in the fatbin (and in the emulation).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::ForwardStatistics(FeatureType::F32) => "supcon_forward_f32",
            Kernel::ForwardStatistics(FeatureType::F16) => "supcon_forward_f16",
            Kernel::ForwardStatistics(FeatureType::Bf16) => "supcon_forward_bf16",
            Kernel::ForwardFinalize => "supcon_forward_finalize",
            Kernel::BackwardCoefficients => "supcon_backward_coefficients",
            Kernel::Backward(FeatureType::F32) => "supcon_backward_f32",
            Kernel::Backward(FeatureType::F16) => "supcon_backward_f16",
            Kernel::Backward(FeatureType::Bf16) => "supcon_backward_bf16",
        }
    }

    fn stage(self) -> Stage {
        match self {
            Kernel::ForwardStatistics(_) => Stage::ForwardStatistics,
            Kernel::ForwardFinalize => Stage::ForwardFinalize,
            Kernel::BackwardCoefficients => Stage::BackwardCoefficients,
            Kernel::Backward(_) => Stage::Backward,
        }
    }
}

/// The fatbin (compiled by the build script, `build/fatbins.rs`, from `kernels/<module>.cu`) that
/// holds `kernel`.
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
            Kernel::BackwardCoefficients | Kernel::Backward(_) => {
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

pub(crate) fn download_vec<E: KernelExecutor, T: bytemuck::Pod>(
    executor: &mut E,
    buffer: &E::Buffer,
    len: usize,
) -> Result<Vec<T>> {
    let mut values = vec![T::zeroed(); len];
    executor.download(buffer, bytemuck::cast_slice_mut(&mut values))?;
    Ok(values)
}

/// A validated problem: options, shape and element type the kernels implement, and what every
/// launch needs to know about them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Problem {
    loss: SupConLoss,
    shape: BatchShape,
    kernel_shape: KernelShape,
    feature_type: FeatureType,
}

impl Problem {
    /// Checks the shape and rejects what the kernels do not implement. What needs the data
    /// (lengths of the positives, finiteness: `validate_inputs`) is the caller's, and comes
    /// first on the host path.
    ///
    /// # Errors
    /// [`Error::EmptyFeatures`], [`Error::SingleRow`], [`Error::TooLarge`],
    /// [`Error::Unsupported`] (f64 features, `OnePositive`, `positives_cap`).
    pub(crate) fn new(
        backend: &'static str,
        loss: &SupConLoss,
        shape: BatchShape,
        dtype: DType,
    ) -> Result<Self> {
        let BatchShape { batch, views, dim } = shape;
        if batch == 0 || views == 0 || dim == 0 {
            return Err(Error::EmptyFeatures {
                shape: [batch, views, dim],
            });
        }
        let elements = batch.checked_mul(views).and_then(|n| n.checked_mul(dim));
        if elements.is_none() {
            return Err(Error::TooLarge {
                what: format!("B·V·D = {batch}·{views}·{dim} overflows usize"),
            });
        }
        if shape.rows() == 1 {
            return Err(Error::SingleRow);
        }
        let unsupported = |what: &str| Error::Unsupported {
            backend,
            what: what.to_string(),
        };
        let feature_type = FeatureType::of(dtype).ok_or_else(|| {
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
        if dim > max_dim {
            return Err(too_large(format!(
                "D = {dim} exceeds the kernels' {max_dim}"
            )));
        }
        // All three fit u32: anchors ≤ rows ≤ MAX_ROWS and dim ≤ max_dim.
        let kernel_shape = KernelShape {
            rows: shape.rows() as u32,
            anchors: shape.anchors(loss.contrast_mode()) as u32,
            dim: dim as u32,
        };
        Ok(Problem {
            loss: *loss,
            shape,
            kernel_shape,
            feature_type,
        })
    }

    /// The loss configuration.
    // For the device API (CUDA only), like `shape`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn loss(&self) -> &SupConLoss {
        &self.loss
    }

    /// The batch shape.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn shape(&self) -> BatchShape {
        self.shape
    }

    /// R.
    pub(crate) fn anchors(&self) -> usize {
        self.kernel_shape.anchors as usize
    }

    /// The parameter block with the inputs, shape and options filled in (outputs 0).
    fn params(&self, inputs: &InputAddresses) -> SupconParams {
        let (positive_kind, labels, mask) = match inputs.positives {
            PositiveAddresses::SameSample => (kernel_abi::positives::SAME_SAMPLE, 0, 0),
            PositiveAddresses::Labels(address) => (kernel_abi::positives::LABELS, address, 0),
            PositiveAddresses::Mask(address) => (kernel_abi::positives::MASK, 0, address),
        };
        SupconParams {
            features: inputs.features,
            labels,
            mask,
            positive_kind,
            ..self.shape_params()
        }
    }

    /// The parameter block with the shape and options filled in (inputs and outputs 0).
    fn shape_params(&self) -> SupconParams {
        let loss = &self.loss;
        SupconParams {
            // batch and views are factors of rows ≤ MAX_ROWS (checked in `new`): they fit u32.
            batch: self.shape.batch as u32,
            views: self.shape.views as u32,
            dim: self.kernel_shape.dim,
            rows: self.kernel_shape.rows,
            anchors: self.kernel_shape.anchors,
            denominator: match loss.denominator() {
                Denominator::All => kernel_abi::denominator::ALL,
                // OnePositive is rejected in `new`.
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

/// What makes two rows positives, with device addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PositiveAddresses {
    /// SimCLR: the other views of the same sample.
    SameSample,
    /// `const int64_t[B]` labels.
    Labels(u64),
    /// `const float[B][B]` weights.
    Mask(u64),
}

/// The device inputs of one call, by address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InputAddresses {
    /// `const T[B][V][D]`, T the problem's feature type.
    pub(crate) features: u64,
    /// The positives.
    pub(crate) positives: PositiveAddresses,
}

/// Host inputs uploaded to the device (the host-array path).
struct UploadedInputs<B> {
    features: B,
    positives: Option<B>,
}

impl<B> UploadedInputs<B> {
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
        let positives = match positives {
            Positives::SimClr => None,
            Positives::Labels(labels) => {
                let labels: Vec<i64> = labels.iter().copied().collect();
                Some(upload_slice(executor, &labels)?)
            }
            Positives::Mask(mask) => {
                let weights: Vec<f32> = mask.iter().copied().collect();
                Some(upload_slice(executor, &weights)?)
            }
        };
        Ok(UploadedInputs {
            features,
            positives,
        })
    }

    /// The uploaded inputs by address; `positives` says which kind was uploaded.
    fn addresses<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
        positives: &Positives<'_>,
    ) -> InputAddresses {
        let address = || self.positives.as_ref().map_or(0, |b| executor.address(b));
        InputAddresses {
            features: executor.address(&self.features),
            positives: match positives {
                Positives::SimClr => PositiveAddresses::SameSample,
                Positives::Labels(_) => PositiveAddresses::Labels(address()),
                Positives::Mask(_) => PositiveAddresses::Mask(address()),
            },
        }
    }
}

/// The forward pass's outputs, on the device.
#[derive(Debug)]
pub(crate) struct Statistics<B> {
    /// `float[R]` LSE_i.
    pub(crate) lse: B,
    /// `float[R]` LSE^P_i − log W_i (see [`saved_positive_lse`]).
    pub(crate) scaled_positive_lse: B,
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
    /// What the backward kernel reads of them (the device API's; CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn saved<E: KernelExecutor<Buffer = B>>(&self, executor: &E) -> SavedAddresses {
        SavedAddresses {
            lse: executor.address(&self.lse),
            scaled_positive_lse: executor.address(&self.scaled_positive_lse),
            positive_weight: executor.address(&self.positive_weight),
            positive_weight_max: executor.address(&self.positive_weight_max),
        }
    }
}

/// The per-anchor statistics the backward kernel reads, `float[R]` each, by address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SavedAddresses {
    /// LSE_i.
    lse: u64,
    /// LSE^P_i − log W_i.
    scaled_positive_lse: u64,
    /// P_i.
    positive_weight: u64,
    /// W_i.
    positive_weight_max: u64,
}

/// Queues the forward kernels on inputs already on the device. Nothing is copied or awaited.
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
        scaled_positive_lse: executor.alloc(per_anchor_bytes)?,
        positive_weight: executor.alloc(per_anchor_bytes)?,
        positive_weight_max: executor.alloc(per_anchor_bytes)?,
        anchor_loss: executor.alloc(per_anchor_bytes)?,
        reduced_loss: executor.alloc(size_of::<f64>())?,
        anchors_without_positives: executor.alloc(size_of::<u32>())?,
    };
    let params = SupconParams {
        anchor_lse: executor.address(&statistics.lse),
        anchor_scaled_positive_lse: executor.address(&statistics.scaled_positive_lse),
        anchor_positive_weight: executor.address(&statistics.positive_weight),
        anchor_positive_weight_max: executor.address(&statistics.positive_weight_max),
        anchor_loss: executor.address(&statistics.anchor_loss),
        reduced_loss: executor.address(&statistics.reduced_loss),
        anchors_without_positives: executor.address(&statistics.anchors_without_positives),
        ..problem.params(inputs)
    };
    // SAFETY: the inputs per this function's contract; the outputs are the R-float, one-f64
    // and one-u32 buffers just allocated, which the caller keeps (dropping a buffer frees it
    // only after the queued work).
    unsafe {
        problem.launch(
            executor,
            Kernel::ForwardStatistics(problem.feature_type),
            &params,
        )?;
        problem.launch(executor, Kernel::ForwardFinalize, &params)?;
    }
    Ok(statistics)
}

/// Everything the forward pass computed, on the host (synchronises): what
/// [`crate::Backend::forward`] returns.
///
/// # Errors
/// [`Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`].
pub(crate) fn to_host<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
) -> Result<ForwardOutput> {
    let anchors = problem.anchors();
    let lse: Vec<f32> = download_vec(executor, &statistics.lse, anchors)?;
    let scaled_positive_lse: Vec<f32> =
        download_vec(executor, &statistics.scaled_positive_lse, anchors)?;
    let positive_weight_max: Vec<f32> =
        download_vec(executor, &statistics.positive_weight_max, anchors)?;
    let positive_weight: Vec<f32> = download_vec(executor, &statistics.positive_weight, anchors)?;
    let anchor_loss: Vec<f32> = download_vec(executor, &statistics.anchor_loss, anchors)?;
    let reduced = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
    let (per_anchor, positive_weight) = (widen(&anchor_loss), widen(&positive_weight));
    // The policy and R' exactly as every other backend applies them (the count the finalize
    // kernel writes is the number of anchors with P_i ≤ 0 that this recounts).
    let (_, mean_denominator) = reduce(&problem.loss, &per_anchor, &positive_weight)?;
    Ok(ForwardOutput {
        loss: (problem.loss.reduction() != Reduction::None).then_some(reduced),
        per_anchor: Array1::from(per_anchor),
        state: SavedState {
            loss: problem.loss,
            shape: problem.shape,
            lse: widen(&lse),
            lse_positive: scaled_positive_lse
                .iter()
                .zip(&positive_weight_max)
                .map(|(&lse, &w)| saved_positive_lse(lse, w))
                .collect(),
            positive_weight,
            mean_denominator,
        },
    })
}

/// The per-anchor coefficients c·u_i/R' of the backward kernel, zeroed where ℓ_i does not
/// depend on the logits (no positive, empty denominator).
///
/// # Errors
/// Upstream mismatches as [`SavedState::anchor_coefficients`].
pub(crate) fn grad_coefficients(state: &SavedState, upstream: Upstream<'_>) -> Result<Vec<f32>> {
    Ok(state
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
    debug_assert!(problem.loss.no_positive() != NoPositivePolicy::Error);
    check_upstream(problem.loss.reduction(), problem.anchors(), upstream)?;
    let (per_anchor, scalar) = match upstream {
        Upstream::Scalar(u) => (None, u),
        Upstream::PerAnchor(u) => (Some(upload_slice(executor, &u.to_vec())?), 0.0),
    };
    let coefficients = executor.alloc(problem.anchors() * size_of::<f32>())?;
    let params = SupconParams {
        anchor_lse: executor.address(&statistics.lse),
        anchor_positive_weight: executor.address(&statistics.positive_weight),
        anchors_without_positives: executor.address(&statistics.anchors_without_positives),
        anchor_grad_coef: executor.address(&coefficients),
        anchor_upstream: per_anchor.as_ref().map_or(0, |b| executor.address(b)),
        upstream_scalar: scalar,
        loss_scale_exact: problem.loss.loss_scale(),
        ..problem.shape_params()
    };
    // SAFETY: the kernel reads R floats of LSE and P and one u32 of the statistics (alive per
    // this function's contract), the R doubles uploaded for reduction none, and writes the R
    // floats just allocated; the upload is freed in stream order after the launch.
    unsafe { problem.launch(executor, Kernel::BackwardCoefficients, &params)? };
    Ok(coefficients)
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
        anchor_scaled_positive_lse: saved.scaled_positive_lse,
        anchor_positive_weight: saved.positive_weight,
        anchor_positive_weight_max: saved.positive_weight_max,
        anchor_grad_coef: coefficients,
        grad_features: grad,
        ..problem.params(inputs)
    };
    // SAFETY: inputs, statistics, coefficients and `grad` per this function's contract.
    unsafe { problem.launch(executor, Kernel::Backward(problem.feature_type), &params) }
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
    let shape = validate_inputs(&features, &positives)?;
    let problem = Problem::new(backend, loss, shape, T::DTYPE)?;
    let uploaded = UploadedInputs::upload(executor, &problem, &features, &positives)?;
    let inputs = uploaded.addresses(executor, &positives);
    // SAFETY: the uploaded inputs hold B·V·D features of the kernel's type, B labels or B·B
    // weights, and stay alive until the downloads of `to_host`.
    let statistics = unsafe { launch_forward(executor, &problem, &inputs)? };
    to_host(executor, &problem, &statistics)
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
    let shape = validate_inputs(&features, &positives)?;
    let problem = Problem::new(backend, loss, shape, T::DTYPE)?;
    state.check(loss, shape)?;
    let coefficients = upload_slice(executor, &grad_coefficients(state, upstream)?)?;
    let uploaded = UploadedInputs::upload(executor, &problem, &features, &positives)?;
    let inputs = uploaded.addresses(executor, &positives);
    let lse = upload_slice(executor, &narrow(&state.lse))?;
    let weight_max = positive_weight_max(&positives, shape, problem.anchors());
    let scaled_positive_lse: Vec<f32> = state
        .lse_positive
        .iter()
        .zip(&weight_max)
        .map(|(&lse, &w)| (lse - f64::from(w).ln()) as f32)
        .collect();
    let scaled_positive_lse = upload_slice(executor, &scaled_positive_lse)?;
    let positive_weight_max = upload_slice(executor, &weight_max)?;
    let positive_weight = upload_slice(executor, &narrow(&state.positive_weight))?;
    let saved = SavedAddresses {
        lse: executor.address(&lse),
        scaled_positive_lse: executor.address(&scaled_positive_lse),
        positive_weight: executor.address(&positive_weight),
        positive_weight_max: executor.address(&positive_weight_max),
    };
    let BatchShape { batch, views, dim } = shape;
    let grad = executor.alloc(shape.rows() * dim * size_of::<f32>())?;
    let grad_address = executor.address(&grad);
    let coefficients = executor.address(&coefficients);
    // SAFETY: the inputs as in `forward`; the statistics and coefficients hold R floats (the
    // state matches the shape: `state.check`), the gradient B·V·D floats. All stay alive until
    // the download.
    unsafe {
        launch_backward(
            executor,
            &problem,
            &inputs,
            saved,
            coefficients,
            grad_address,
        )?;
    }
    let grad: Vec<f32> = download_vec(executor, &grad, shape.rows() * dim)?;
    Ok(Array3::from_shape_fn((batch, views, dim), |(b, v, k)| {
        T::Grad::from_f32(grad[(b * views + v) * dim + k])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cuda")]
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

    #[test]
    fn problems_the_kernels_do_not_implement_are_refused() {
        let shape = BatchShape {
            batch: 4,
            views: 2,
            dim: 8,
        };
        let default = SupConLoss::default();
        let unsupported = |result: Result<Problem>| {
            matches!(
                result,
                Err(Error::Unsupported {
                    backend: "cuda",
                    ..
                })
            )
        };
        assert!(unsupported(Problem::new(
            "cuda",
            &default,
            shape,
            DType::F64
        )));
        let one_positive = SupConLoss::builder()
            .denominator(Denominator::OnePositive)
            .build()
            .unwrap();
        assert!(unsupported(Problem::new(
            "cuda",
            &one_positive,
            shape,
            DType::F32
        )));
        let capped = SupConLoss::builder().positives_cap(2).build().unwrap();
        assert!(unsupported(Problem::new(
            "cuda",
            &capped,
            shape,
            DType::BF16
        )));
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(Problem::new("cuda", &default, shape, dtype).is_ok());
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let loss = SupConLoss::default();
        let problem = |batch, views, dim| {
            Problem::new("cuda", &loss, BatchShape { batch, views, dim }, DType::F32)
        };
        assert_eq!(
            problem(0, 2, 3).unwrap_err(),
            Error::EmptyFeatures { shape: [0, 2, 3] }
        );
        assert_eq!(problem(1, 1, 3).unwrap_err(), Error::SingleRow);
        assert!(matches!(
            problem(usize::MAX, 2, 3),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            problem(1 << 31, 1, 3),
            Err(Error::TooLarge { .. })
        ));
        let wide = (MAX_GRID_Y * GRAD_CHUNK) as usize + 1;
        assert!(matches!(problem(2, 2, wide), Err(Error::TooLarge { .. })));
        assert!(problem(2, 1, 1).is_ok());
    }
}
