//! Launch sequences over inputs already on the device: the device API of `CudaBackend`.
//!
//! `crate::kernels` runs the kernels on host arrays (upload, launch, download). Here the
//! features and positives are caller-owned device buffers, given by address, and the forward's
//! outputs stay on the device: nothing is copied and nothing synchronises until the caller asks
//! for host values, or until a backward pass needs its per-anchor coefficients (see
//! [`backward`]). Written against [`KernelExecutor`] like `crate::kernels`, with the same kernels,
//! launch plan and parameter block.
//!
//! `crate::kernels` keeps its problem validation and parameter filling private, and both take
//! host arrays, so [`Problem`] restates them for a shape; the test below pins the two to the
//! same launches.

use bytemuck::Zeroable;

use crate::backend::{reduce, ForwardOutput, SavedState, Upstream};
use crate::config::{Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::kernel_abi::{self, SupconParams};
use crate::kernels::{self, FeatureType, Kernel, KernelExecutor};
use crate::launch_plan::{launch_config, KernelShape, Stage, GRAD_CHUNK, MAX_GRID_Y};
use crate::problem::BatchShape;

/// Most rows the kernels index (`crate::kernels` has the same bound: 32-bit row arithmetic).
const MAX_ROWS: usize = i32::MAX as usize;

/// What makes two rows positives, with device addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResidentPositives {
    /// SimCLR: the other views of the same sample.
    SameSample,
    /// `const int64_t[B]` labels.
    Labels(u64),
    /// `const float[B][B]` weights.
    Mask(u64),
}

/// The device inputs of one call, by address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResidentInputs {
    /// `const T[B][V][D]`, T the problem's feature type.
    pub(crate) features: u64,
    /// The positives.
    pub(crate) positives: ResidentPositives,
}

/// A validated problem: options, shape and element type the kernels implement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Problem {
    loss: SupConLoss,
    shape: BatchShape,
    kernel_shape: KernelShape,
    feature_type: FeatureType,
}

impl Problem {
    /// Checks the shape and the options (what `validate_inputs` and `crate::kernels` check,
    /// except what needs the data: lengths of the positives and finiteness are the caller's).
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
        let feature_type = match dtype {
            DType::F32 => FeatureType::F32,
            DType::F16 => FeatureType::F16,
            DType::BF16 => FeatureType::Bf16,
            DType::F64 => {
                return Err(unsupported(
                    "f64 features (the kernels read f32, f16 or bf16: convert to f32)",
                ))
            }
        };
        if loss.denominator() == Denominator::OnePositive {
            return Err(unsupported("denominator one_positive"));
        }
        if loss.positives_cap().is_some() {
            return Err(unsupported("positives_cap"));
        }
        if shape.rows() > MAX_ROWS {
            return Err(Error::TooLarge {
                what: format!(
                    "N = B·V = {} rows exceeds the kernels' {MAX_ROWS}",
                    shape.rows()
                ),
            });
        }
        let max_dim = (MAX_GRID_Y * GRAD_CHUNK) as usize;
        if dim > max_dim {
            return Err(Error::TooLarge {
                what: format!("D = {dim} exceeds the kernels' {max_dim}"),
            });
        }
        // All fit u32: anchors ≤ rows ≤ MAX_ROWS and dim ≤ max_dim.
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
    pub(crate) fn loss(&self) -> &SupConLoss {
        &self.loss
    }

    /// The batch shape.
    pub(crate) fn shape(&self) -> BatchShape {
        self.shape
    }

    /// R.
    pub(crate) fn anchors(&self) -> usize {
        self.kernel_shape.anchors as usize
    }

    /// The parameter block with inputs, shape and options filled in (outputs 0).
    fn params(&self, inputs: &ResidentInputs) -> SupconParams {
        let (positive_kind, labels, mask) = match inputs.positives {
            ResidentPositives::SameSample => (kernel_abi::positives::SAME_SAMPLE, 0, 0),
            ResidentPositives::Labels(address) => (kernel_abi::positives::LABELS, address, 0),
            ResidentPositives::Mask(address) => (kernel_abi::positives::MASK, 0, address),
        };
        let loss = &self.loss;
        SupconParams {
            features: inputs.features,
            labels,
            mask,
            // batch and views are factors of rows ≤ MAX_ROWS: they fit u32.
            batch: self.shape.batch as u32,
            views: self.shape.views as u32,
            dim: self.kernel_shape.dim,
            rows: self.kernel_shape.rows,
            anchors: self.kernel_shape.anchors,
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

    /// Launches `kernel` with this problem's plan.
    ///
    /// # Safety
    /// As [`KernelExecutor::launch`].
    unsafe fn launch<E: KernelExecutor>(
        &self,
        executor: &mut E,
        kernel: Kernel,
        stage: Stage,
        params: &SupconParams,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { executor.launch(kernel, launch_config(stage, self.kernel_shape), params) }
    }
}

/// The forward pass's outputs, on the device.
#[derive(Debug)]
pub(crate) struct Statistics<B> {
    /// `float[R]` LSE_i.
    pub(crate) lse: B,
    /// `float[R]` LSE^P_i − log W_i (see [`kernels::saved_positive_lse`]).
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

/// Queues the forward kernels. Nothing is copied or awaited.
///
/// # Safety
/// `inputs` must address device memory of `executor` holding the problem's `B·V·D` features of
/// its feature type and, for labels or a mask, `B` `i64` or `B·B` `f32`, alive and unmodified
/// until the queued kernels have finished.
pub(crate) unsafe fn forward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &ResidentInputs,
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
    let statistics_kernel = Kernel::ForwardStatistics(problem.feature_type);
    // SAFETY: the inputs per this function's contract; the outputs are the R-float, one-f64
    // and one-u32 buffers just allocated, which the caller keeps (dropping a buffer frees it
    // only after the queued work).
    unsafe {
        problem.launch(
            executor,
            statistics_kernel,
            Stage::ForwardStatistics,
            &params,
        )?;
        problem.launch(
            executor,
            Kernel::ForwardFinalize,
            Stage::ForwardFinalize,
            &params,
        )?;
    }
    Ok(statistics)
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

fn widen(values: Vec<f32>) -> Vec<f64> {
    values.into_iter().map(f64::from).collect()
}

/// The reduced loss alone (synchronises); `None` for reduction none.
///
/// # Errors
/// [`Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`] (then the per-anchor
/// statistics are read too, to name the anchor).
pub(crate) fn reduced_loss<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
) -> Result<Option<f64>> {
    if problem.loss.no_positive() == NoPositivePolicy::Error {
        return Ok(to_host(executor, problem, statistics)?.loss);
    }
    let loss = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
    Ok((problem.loss.reduction() != Reduction::None).then_some(loss))
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
    let lse = widen(download_vec(executor, &statistics.lse, anchors)?);
    let scaled_positive_lse: Vec<f32> =
        download_vec(executor, &statistics.scaled_positive_lse, anchors)?;
    let positive_weight_max: Vec<f32> =
        download_vec(executor, &statistics.positive_weight_max, anchors)?;
    let lse_positive = scaled_positive_lse
        .iter()
        .zip(&positive_weight_max)
        .map(|(&lse, &w)| kernels::saved_positive_lse(lse, w))
        .collect();
    let positive_weight = widen(download_vec(
        executor,
        &statistics.positive_weight,
        anchors,
    )?);
    let per_anchor = widen(download_vec(executor, &statistics.anchor_loss, anchors)?);
    let reduced = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
    // The policy and R' exactly as every other backend applies them.
    let (_, mean_denominator) = reduce(&problem.loss, &per_anchor, &positive_weight)?;
    Ok(ForwardOutput {
        loss: (problem.loss.reduction() != Reduction::None).then_some(reduced),
        per_anchor: per_anchor.into(),
        state: SavedState {
            loss: problem.loss,
            shape: problem.shape,
            lse,
            lse_positive,
            positive_weight,
            mean_denominator,
        },
    })
}

/// Queues the backward kernel, writing `∂L/∂features` (`float[B][V][D]`) at `grad`.
///
/// The per-anchor coefficients c·u_i/R'·[P_i > 0]·[LSE_i > −∞] are computed on the host, as in
/// `crate::kernels`: the kernels have no device-side step for them yet, so this reads the O(R)
/// statistics back, which synchronises the stream once.
///
/// # Errors
/// [`Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`]; upstream mismatches as
/// [`SavedState::anchor_coefficients`].
///
/// # Safety
/// As [`forward`] for `inputs`, which must be the inputs `statistics` was computed from;
/// `grad` must address `B·V·D` writable `f32` of `executor`'s device memory that nothing else
/// reads or writes until the queued kernel has finished.
pub(crate) unsafe fn backward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &ResidentInputs,
    statistics: &Statistics<E::Buffer>,
    upstream: Upstream<'_>,
    grad: u64,
) -> Result<()> {
    let state = to_host(executor, problem, statistics)?.state;
    let coefficients: Vec<f32> = state
        .anchor_coefficients(upstream)?
        .iter()
        .zip(state.positive_weight.iter().zip(&state.lse))
        .map(|(&coefficient, (&p, &lse))| {
            // ℓ_i does not depend on the logits without a positive or a denominator.
            if p > 0.0 && lse > f64::NEG_INFINITY {
                coefficient as f32
            } else {
                0.0
            }
        })
        .collect();
    let coefficients = executor.upload(bytemuck::cast_slice(&coefficients))?;
    let params = SupconParams {
        anchor_lse: executor.address(&statistics.lse),
        anchor_scaled_positive_lse: executor.address(&statistics.scaled_positive_lse),
        anchor_positive_weight: executor.address(&statistics.positive_weight),
        anchor_positive_weight_max: executor.address(&statistics.positive_weight_max),
        anchor_grad_coef: executor.address(&coefficients),
        grad_features: grad,
        ..problem.params(inputs)
    };
    let kernel = Kernel::Backward(problem.feature_type);
    // SAFETY: inputs and `grad` per this function's contract; the statistics are R floats of
    // the same problem; the coefficients buffer is freed in stream order after the launch.
    unsafe { problem.launch(executor, kernel, Stage::Backward, &params) }
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;
    use crate::config::ContrastMode;
    use crate::launch_plan::LaunchConfig;
    use crate::problem::Positives;

    /// Buffers are host vectors at made-up, distinct addresses; launches are recorded with their
    /// addresses replaced by the index of the buffer they name (or `u64::MAX` for a foreign one).
    #[derive(Default)]
    struct RecordingExecutor {
        buffers: Vec<(u64, usize)>,
        launches: Vec<(Kernel, LaunchConfig, SupconParams)>,
        /// What downloads read, repeated: f32 1.0 (P_i > 0 and LSE_i finite for every anchor).
        /// The 4-byte count of anchors without positives reads 0, consistently.
        fill: [u8; 4],
    }

    impl RecordingExecutor {
        fn new_buffer(&mut self, bytes: usize) -> (u64, usize) {
            let buffer = (0x1000 * (self.buffers.len() as u64 + 1), bytes);
            self.buffers.push(buffer);
            buffer
        }

        fn index_of(&self, address: u64) -> u64 {
            if address == 0 {
                return 0;
            }
            self.buffers
                .iter()
                .position(|&(a, _)| a == address)
                .map_or(u64::MAX, |i| i as u64 + 1)
        }
    }

    impl KernelExecutor for RecordingExecutor {
        type Buffer = (u64, usize);

        fn alloc(&mut self, bytes: usize) -> Result<(u64, usize)> {
            Ok(self.new_buffer(bytes))
        }

        fn upload(&mut self, bytes: &[u8]) -> Result<(u64, usize)> {
            Ok(self.new_buffer(bytes.len()))
        }

        fn download(&mut self, buffer: &(u64, usize), out: &mut [u8]) -> Result<()> {
            assert!(out.len() <= buffer.1);
            let fill = if buffer.1 == size_of::<u32>() {
                [0; 4]
            } else {
                self.fill
            };
            for (i, byte) in out.iter_mut().enumerate() {
                *byte = fill[i % 4];
            }
            Ok(())
        }

        fn address(&self, buffer: &(u64, usize)) -> u64 {
            buffer.0
        }

        unsafe fn launch(
            &mut self,
            kernel: Kernel,
            config: LaunchConfig,
            params: &SupconParams,
        ) -> Result<()> {
            let mut params = *params;
            for address in [
                &mut params.features,
                &mut params.labels,
                &mut params.mask,
                &mut params.anchor_lse,
                &mut params.anchor_scaled_positive_lse,
                &mut params.anchor_positive_weight,
                &mut params.anchor_positive_weight_max,
                &mut params.anchor_loss,
                &mut params.reduced_loss,
                &mut params.anchors_without_positives,
                &mut params.anchor_grad_coef,
                &mut params.grad_features,
            ] {
                *address = self.index_of(*address);
            }
            self.launches.push((kernel, config, params));
            Ok(())
        }
    }

    fn loss_grid() -> Vec<SupConLoss> {
        let mut losses = Vec::new();
        for mode in [ContrastMode::All, ContrastMode::One] {
            for summation in [Summation::Outside, Summation::Inside] {
                for denominator in [Denominator::All, Denominator::OnlyNegatives] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        for policy in [NoPositivePolicy::ZeroAndCount, NoPositivePolicy::Exclude] {
                            losses.push(
                                SupConLoss::builder()
                                    .temperature(0.2)
                                    .base_temperature(0.05)
                                    .contrast_mode(mode)
                                    .summation(summation)
                                    .denominator(denominator)
                                    .reduction(reduction)
                                    .no_positive(policy)
                                    .build()
                                    .unwrap(),
                            );
                        }
                    }
                }
            }
        }
        losses
    }

    /// The resident sequence issues the launches of `crate::kernels` (the host path of the same
    /// kernels), parameter for parameter, for every supported option and kind of positives.
    #[test]
    fn launches_match_the_host_launch_sequence() {
        let (batch, views, dim) = (5, 3, 7);
        let features = Array3::<f32>::from_shape_fn((batch, views, dim), |(b, v, d)| {
            (b * 13 + v * 5 + d) as f32 * 0.01
        });
        let labels = ndarray::Array1::from(vec![1i64, -4, 1, 9, -4]);
        let mask = ndarray::Array2::<f32>::from_elem((batch, batch), 0.5);
        let shape = BatchShape { batch, views, dim };
        for loss in loss_grid() {
            let anchors = shape.anchors(loss.contrast_mode());
            let per_anchor = ndarray::Array1::from_elem(anchors, 0.5);
            let upstream = match loss.reduction() {
                Reduction::None => Upstream::PerAnchor(per_anchor.view()),
                _ => Upstream::Scalar(0.5),
            };
            for kind in 0..3 {
                let positives = [
                    Positives::SimClr,
                    Positives::Labels(labels.view()),
                    Positives::Mask(mask.view()),
                ][kind];
                let fill = 1.0f32.to_le_bytes();
                let mut host = RecordingExecutor {
                    fill,
                    ..RecordingExecutor::default()
                };
                let output =
                    kernels::forward(&mut host, "cuda", &loss, features.view(), positives).unwrap();
                kernels::backward(
                    &mut host,
                    "cuda",
                    &loss,
                    features.view(),
                    positives,
                    &output.state,
                    upstream,
                )
                .unwrap();

                // The same inputs, "already on the device", in the order the host path uploads
                // them (features, then positives), so buffer indices line up.
                let mut resident = RecordingExecutor {
                    fill,
                    ..RecordingExecutor::default()
                };
                let problem = Problem::new("cuda", &loss, shape, DType::F32).unwrap();
                let inputs = |executor: &mut RecordingExecutor| {
                    let features = executor.new_buffer(batch * views * dim * 4).0;
                    let positives = match kind {
                        0 => ResidentPositives::SameSample,
                        1 => ResidentPositives::Labels(executor.new_buffer(batch * 8).0),
                        _ => ResidentPositives::Mask(executor.new_buffer(batch * batch * 4).0),
                    };
                    ResidentInputs {
                        features,
                        positives,
                    }
                };
                let forward_inputs = inputs(&mut resident);
                // SAFETY: the recording executor never dereferences an address.
                let statistics = unsafe { forward(&mut resident, &problem, &forward_inputs) };
                let statistics = statistics.unwrap();
                let host_state = to_host(&mut resident, &problem, &statistics).unwrap().state;
                assert_eq!(host_state, output.state, "{loss:?}");

                let host_backward = host.launches.pop().unwrap();
                let (kernel, config, params) = host_backward;
                // SAFETY: as above.
                unsafe {
                    backward(
                        &mut resident,
                        &problem,
                        &forward_inputs,
                        &statistics,
                        upstream,
                        0xdead_0000,
                    )
                }
                .unwrap();
                let (r_kernel, r_config, r_params) = resident.launches.pop().unwrap();
                assert_eq!(host.launches, resident.launches, "forward {loss:?} {kind}");
                assert_eq!((kernel, config), (r_kernel, r_config), "{loss:?}");
                // The host path uploads inputs and statistics anew for its backward; compare
                // what does not depend on which buffer holds them.
                let addressless = |p: SupconParams| SupconParams {
                    features: 0,
                    labels: 0,
                    mask: 0,
                    anchor_lse: 0,
                    anchor_scaled_positive_lse: 0,
                    anchor_positive_weight: 0,
                    anchor_positive_weight_max: 0,
                    anchor_grad_coef: 0,
                    grad_features: 0,
                    ..p
                };
                assert_eq!(addressless(params), addressless(r_params), "{loss:?}");
                assert_eq!(
                    r_params.grad_features,
                    u64::MAX,
                    "the caller's gradient buffer"
                );
                assert_eq!(r_params.features, 1);
                assert_eq!(
                    (r_params.labels != 0, r_params.mask != 0),
                    (kind == 1, kind == 2)
                );
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
