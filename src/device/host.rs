//! The host-array path ([`crate::Backend`] on an executor): upload the inputs, run the launch
//! sequences, download the results.
//!
//! A mask is uploaded scaled row by row ([`ScaledMask`]): the kernels then see weights of at
//! most 1, whose f32 sums neither overflow nor vanish, and P_i and LSE^P_i are rescaled by
//! W_i on the way back (forward) and in (backward). With the largest weight of every anchor's
//! positives 1, the kernels' W_i is 1 too, so the backward pass uploads the saved state as the
//! kernels' statistics directly.
//!
//! f64 features are rejected with [`crate::Error::Unsupported`]: the kernels read f32, f16 or
//! bf16, and silently rounding f64 input would hide a precision loss the caller did not ask for.

use std::ops::Range;

use half::{bf16, f16};
use ndarray::{Array3, ArrayView3};

use super::executor::{upload_slice, KernelExecutor};
use super::kernel::FeatureType;
use super::launch::{
    anchor_launches, grad_coefficients, launch_backward_rows, launch_forward,
    launch_forward_statistics, launch_positive_terms, launch_row_scales, row_launches, split,
    statistics_to_host, to_host, SavedAddresses, Statistics, StatisticsAddresses,
};
use super::problem::{InputAddresses, PositiveAddresses, Problem};
use crate::backend::{
    check_finite_gradient, check_finite_loss, ForwardOutput, SavedState, Upstream,
};
use crate::config::{Denominator, SupConLoss};
use crate::cpu::relation::cap_bounds;
use crate::element::{Element, GradElement};
use crate::error::Result;
use crate::inputs::{
    check_logit_range, largest_logit, largest_logit_of, validate_inputs, Positives, ScaledMask,
    Validated, F32_LOGIT_LIMIT,
};
use crate::label_sets::PackedSets;
use crate::precision::Precision;
use crate::shard::{self, ShardStatistics};

/// Host inputs uploaded to the device (the host-array path), and the row scales of
/// `normalize` computed there from the uploaded features.
struct UploadedInputs<B> {
    features: B,
    positives: Option<B>,
    cap_bounds: Option<B>,
    row_scales: Option<B>,
}

impl<B> UploadedInputs<B> {
    /// Uploads the features (in `[B, V, D]` order, whatever the view's strides, converted
    /// exactly to the kernel's element type) and the positives, and queues the row scales
    /// under `normalize`.
    fn upload<E: KernelExecutor<Buffer = B>, T: Element>(
        executor: &mut E,
        backend: &'static str,
        batch: &Prepared,
        features: &ArrayView3<'_, T>,
        positives: &Positives<'_>,
    ) -> Result<Self> {
        // Every f32/f16/bf16 value survives the trip through f32 unchanged.
        let features = match batch.problem.feature_type() {
            FeatureType::F32 => upload_slice(executor, &converted(backend, features, |x| x)?)?,
            FeatureType::F16 => {
                upload_slice(executor, &converted(backend, features, f16::from_f32)?)?
            }
            FeatureType::Bf16 => {
                upload_slice(executor, &converted(backend, features, bf16::from_f32)?)?
            }
        };
        let positives = match positives {
            Positives::SimClr => None,
            Positives::Labels(labels) => {
                let labels: Vec<i64> = labels.iter().copied().collect();
                Some(upload_slice(executor, &labels)?)
            }
            Positives::Mask(_) => {
                let mask = batch.mask.as_ref().expect("a mask is uploaded scaled");
                Some(upload_slice(
                    executor,
                    mask.weights.as_slice().expect("standard layout"),
                )?)
            }
            Positives::LabelSets { .. } => {
                let sets = batch.sets.as_ref().expect("label sets are packed");
                Some(upload_slice(executor, &sets.words)?)
            }
        };
        let cap_bounds = match &batch.cap_bounds {
            Some(bounds) => Some(upload_slice(executor, bounds)?),
            None => None,
        };
        let problem = &batch.problem;
        let row_scales = if problem.loss().normalize() {
            let scales = executor.alloc(problem.shape().rows() * size_of::<f32>())?;
            let (features, at) = (executor.address(&features), executor.address(&scales));
            // SAFETY: the features were just uploaded in the kernel's type and `scales` holds
            // N floats; both live as long as these inputs, past every kernel that reads them.
            unsafe { launch_row_scales(executor, problem, features, at)? };
            Some(scales)
        } else {
            None
        };
        Ok(UploadedInputs {
            features,
            positives,
            cap_bounds,
            row_scales,
        })
    }

    /// The uploaded inputs by address; `positives` says which kind was uploaded.
    fn addresses<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
        batch: &Prepared,
        positives: &Positives<'_>,
    ) -> InputAddresses {
        let address = || self.positives.as_ref().map_or(0, |b| executor.address(b));
        InputAddresses {
            features: executor.address(&self.features),
            positives: match positives {
                Positives::SimClr => PositiveAddresses::SameSample,
                Positives::Labels(_) => PositiveAddresses::Labels(address()),
                Positives::Mask(_) => PositiveAddresses::Mask(address()),
                Positives::LabelSets { weight, .. } => PositiveAddresses::LabelSets {
                    address: address(),
                    words: batch.sets.as_ref().map_or(1, |sets| sets.per_set),
                    weight: *weight,
                },
            },
            cap_bounds: self.cap_bounds.as_ref().map_or(0, |b| executor.address(b)),
            row_scales: self.row_scales.as_ref().map_or(0, |b| executor.address(b)),
        }
    }
}

/// A validated batch and what its launches need: the problem, for a mask its scaled weights
/// and, per anchor, the factor W_i they were divided by (1 without a mask), and for label sets
/// their bitsets.
struct Prepared {
    validated: Validated,
    problem: Problem,
    mask: Option<ScaledMask>,
    scales: Vec<f64>,
    sets: Option<SetWords>,
    /// Per sample, the row bound of kept positives of other samples, under a cap.
    cap_bounds: Option<Vec<u32>>,
}

/// Label sets as the kernels read them: per sample its size |Y_b|, then its `per_set` 64-bit
/// words (at least one, so that K = 0 is one empty word).
struct SetWords {
    words: Vec<u64>,
    per_set: u32,
}

impl SetWords {
    /// # Errors
    /// [`crate::Error::OutOfMemory`]; [`crate::Error::TooLarge`] for sets of more than 2³²
    /// words (the kernels count words in u32).
    fn new(backend: &'static str, sets: &PackedSets, batch: usize) -> Result<Self> {
        let per_set = sets.words().max(1);
        let too_large = || crate::Error::TooLarge {
            extent: crate::Extent::Bytes,
            requested: (per_set as u128) * 8,
            limit: u128::from(u32::MAX) * 8,
        };
        let mut words = crate::alloc::filled(backend, batch * (per_set + 1), 0u64)?;
        for (b, row) in words.chunks_exact_mut(per_set + 1).enumerate() {
            let set = &sets.bits()[b * sets.words()..(b + 1) * sets.words()];
            row[0] = sets.size(b);
            row[1..=set.len()].copy_from_slice(set);
        }
        Ok(SetWords {
            words,
            per_set: u32::try_from(per_set).map_err(|_| too_large())?,
        })
    }
}

impl Prepared {
    /// P_i and LSE^P_i of the kernels' statistics, which saw the mask scaled row by row,
    /// scaled back to the caller's weights (every anchor's entries).
    fn scale_back(&self, positive_weight: &mut [f64], lse_positive: &mut [f64]) {
        for ((p, lse), scale) in positive_weight
            .iter_mut()
            .zip(lse_positive)
            .zip(&self.scales)
        {
            *p *= scale;
            *lse += scale.ln();
        }
    }

    /// Validates the batch and checks it against what the kernels implement and represent.
    fn new<T: Element>(
        backend: &'static str,
        precision: Precision,
        loss: &SupConLoss,
        features: &ArrayView3<'_, T>,
        positives: &Positives<'_>,
    ) -> Result<Self> {
        let validated = validate_inputs(features, positives)?;
        let problem = Problem::new(backend, loss, validated.shape, T::DTYPE, precision)?;
        // Unit rows under `normalize` (up to rounding, which the limit's margin covers).
        let largest = if loss.normalize() {
            largest_logit_of(1.0, loss.temperature())
        } else {
            largest_logit(features, loss.temperature())
        };
        check_logit_range(backend, largest, F32_LOGIT_LIMIT)?;
        let shape = validated.shape;
        let mask = match positives {
            Positives::Mask(mask) => Some(ScaledMask::new(backend, mask, shape.views())?),
            _ => None,
        };
        let sets = match positives {
            Positives::LabelSets { sets, weight } => Some(SetWords::new(
                backend,
                &PackedSets::new(backend, sets, *weight)?,
                shape.batch(),
            )?),
            _ => None,
        };
        let cap_bounds = match loss.positives_cap() {
            Some(_) => Some(cap_bounds(loss, shape, positives)?),
            None => None,
        };
        let scales = (0..problem.anchors())
            .map(|i| {
                mask.as_ref()
                    .map_or(1.0, |mask| f64::from(mask.scale[shape.sample_of(i)]))
            })
            .collect();
        Ok(Prepared {
            validated,
            problem,
            mask,
            scales,
            sets,
            cap_bounds,
        })
    }
}

/// The forward pass on `executor` (see [`crate::Backend::forward`]).
pub(crate) fn forward<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    precision: Precision,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
) -> Result<ForwardOutput> {
    let batch = Prepared::new(backend, precision, loss, &features, &positives)?;
    let uploaded = UploadedInputs::upload(executor, backend, &batch, &features, &positives)?;
    let inputs = uploaded.addresses(executor, &batch, &positives);
    // SAFETY: the uploaded inputs hold B·V·D features of the kernel's type, B labels or B·B
    // weights, and stay alive until the downloads of `to_host`.
    let statistics = unsafe { launch_forward(executor, &batch.problem, &inputs)? };
    let mut output = to_host(executor, &batch.problem, &statistics)?;
    let state = &mut output.state;
    batch.scale_back(&mut state.positive_weight, &mut state.lse_positive);
    state.fingerprint = Some(batch.validated.fingerprint);
    check_finite_loss(&output)?;
    Ok(output)
}

/// The statistics of a shard's anchors on `executor` (see [`crate::Backend::forward_shard`]):
/// the statistics kernel runs over the shard's anchor rows only, one launch per run of them
/// (a view's rows of the shard's samples), with bitwise the values of the whole pass.
pub(crate) fn forward_shard<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    precision: Precision,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
    samples: Range<usize>,
) -> Result<ShardStatistics> {
    // The policy's error applies to the assembled batch; no kernel reads the policy.
    let relaxed = shard::without_policy_error(loss);
    let batch = Prepared::new(backend, precision, &relaxed, &features, &positives)?;
    let shape = batch.validated.shape;
    shard::check_samples(shape, &samples)?;
    let uploaded = UploadedInputs::upload(executor, backend, &batch, &features, &positives)?;
    let inputs = uploaded.addresses(executor, &batch, &positives);
    let statistics = Statistics::alloc(executor, &batch.problem)?;
    let at = statistics.addresses(executor);
    for run in anchor_launches(&batch.problem, &samples) {
        let run = run.start as u32..run.end as u32;
        // SAFETY: the uploaded inputs as in `forward`; the statistics just allocated hold R
        // floats each (and the column shares' partials), alive until the downloads below.
        unsafe { launch_forward_statistics(executor, &batch.problem, &inputs, &at, run)? };
    }
    let [per_anchor, lse, mut lse_positive, mut positive_weight] =
        statistics_to_host(executor, &batch.problem, &statistics)?;
    batch.scale_back(&mut positive_weight, &mut lse_positive);
    let all = [&per_anchor, &lse, &lse_positive, &positive_weight].map(Vec::as_slice);
    ShardStatistics::pick(loss, shape, samples, all)
}

/// The backward pass on `executor` (see [`crate::Backend::backward`]).
#[allow(clippy::too_many_arguments)] // the trait method's arguments plus who runs it, and how
pub(crate) fn backward<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    precision: Precision,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
    state: &SavedState,
    upstream: Upstream<'_>,
) -> Result<Array3<T::Grad>> {
    let batch = features.dim().0;
    backward_shard(
        executor,
        backend,
        precision,
        loss,
        features,
        positives,
        state,
        upstream,
        0..batch,
    )
}

/// The gradient rows of a shard's samples on `executor` (see
/// [`crate::Backend::backward_shard`]): the backward kernel runs over those rows only, one
/// launch per view's run of them (one launch for the whole batch).
#[allow(clippy::too_many_arguments)] // the trait method's arguments plus who runs it, and how
pub(crate) fn backward_shard<E: KernelExecutor, T: Element>(
    executor: &mut E,
    backend: &'static str,
    precision: Precision,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
    state: &SavedState,
    upstream: Upstream<'_>,
    samples: Range<usize>,
) -> Result<Array3<T::Grad>> {
    let batch = Prepared::new(backend, precision, loss, &features, &positives)?;
    shard::check_samples(batch.validated.shape, &samples)?;
    state.check(loss, &batch.validated)?;
    let (problem, shape, scales) = (&batch.problem, batch.validated.shape, &batch.scales);
    let coefficients = upload_slice(executor, &grad_coefficients(state, upstream)?)?;
    let uploaded = UploadedInputs::upload(executor, backend, &batch, &features, &positives)?;
    let inputs = uploaded.addresses(executor, &batch, &positives);
    // The saved state as the kernels' statistics: LSEs split into hi and lo, the scaled
    // mask's P_i and LSE^P_i (whose W_i is then 1).
    let (lse, lse_lo): (Vec<f32>, Vec<f32>) = state.lse.iter().map(|&lse| split(lse)).unzip();
    let (positive_lse, positive_lse_lo): (Vec<f32>, Vec<f32>) = (state.lse_positive.iter())
        .zip(scales)
        .map(|(&lse, &scale)| split(lse - scale.ln()))
        .unzip();
    let positive_weight: Vec<f32> = (state.positive_weight.iter())
        .zip(scales)
        .map(|(&p, &scale)| (p / scale) as f32)
        .collect();
    // Alive until the download below, which waits for the kernel.
    let uploads = [
        lse,
        lse_lo,
        positive_lse,
        positive_lse_lo,
        positive_weight,
        vec![1.0f32; problem.anchors()],
    ]
    .into_iter()
    .map(|values| upload_slice(executor, &values))
    .collect::<Result<Vec<_>>>()?;
    let [lse, lse_lo, positive_lse, positive_lse_lo, positive_weight, positive_weight_max] =
        [0, 1, 2, 3, 4, 5].map(|k| executor.address(&uploads[k]));
    // One positive's Ψ_i, log A_i and (unused) ℓ_i, which its second pass below recomputes;
    // no other denominator reads them.
    let one_positive = loss.denominator() == Denominator::OnePositive;
    let recomputed = if one_positive {
        let bytes = problem.anchors() * size_of::<f32>();
        Some([
            executor.alloc(bytes)?,
            executor.alloc(bytes)?,
            executor.alloc(bytes)?,
        ])
    } else {
        None
    };
    let [pull, log_share, anchor_loss] = (recomputed.as_ref()).map_or([0; 3], |buffers| {
        buffers.each_ref().map(|b| executor.address(b))
    });
    let saved = SavedAddresses {
        lse,
        lse_lo,
        scaled_positive_lse: positive_lse,
        scaled_positive_lse_lo: positive_lse_lo,
        positive_weight,
        positive_weight_max,
        pull,
        log_share,
    };
    if one_positive {
        let at = StatisticsAddresses {
            saved,
            anchor_loss,
            reduced_loss: 0,
            anchors_without_positives: 0,
            partials: 0,
        };
        // SAFETY: the inputs as in `forward`; the LSE^N_i and P_i just uploaded, the R floats
        // each of Ψ_i, log A_i and ℓ_i just allocated, alive until the download below.
        let anchors = 0..problem.kernel_shape().anchors;
        unsafe { launch_positive_terms(executor, problem, &inputs, &at, anchors)? };
    }
    let (views, dim) = (shape.views(), shape.dim());
    let grad = executor.alloc(shape.elements() * size_of::<f32>())?;
    let grad_address = executor.address(&grad);
    let coefficients = executor.address(&coefficients);
    for run in row_launches(shape, &samples) {
        // SAFETY: the inputs as in `forward`; the statistics and coefficients hold R floats
        // (the state matches the shape: `state.check`), the gradient B·V·D floats. All stay
        // alive until the download.
        unsafe {
            launch_backward_rows(
                executor,
                problem,
                &inputs,
                saved,
                coefficients,
                grad_address,
                run.start as u32..run.end as u32,
            )?;
        }
    }
    // The kernel writes ∂L/∂z in the features' [B, V, D] layout: the shard's samples are one
    // run of it.
    let mut on_host = crate::alloc::filled(backend, shape.elements(), 0.0f32)?;
    executor.download(&grad, bytemuck::cast_slice_mut(&mut on_host))?;
    let width = views * dim;
    let rows = &on_host[samples.start * width..samples.end * width];
    let mut grad = crate::alloc::filled(backend, rows.len(), T::Grad::from_f32(0.0))?;
    for (g, &x) in grad.iter_mut().zip(rows) {
        *g = T::Grad::from_f32(x);
    }
    check_finite_gradient(&grad)?;
    Ok(Array3::from_shape_vec((samples.len(), views, dim), grad)
        .expect("the gradient has the shard's shape"))
}

/// The features in `[B, V, D]` order (whatever the view's strides), each converted by `convert`
/// from its f32 value.
fn converted<T: Element, U: bytemuck::Pod>(
    backend: &'static str,
    features: &ArrayView3<'_, T>,
    convert: impl Fn(f32) -> U,
) -> Result<Vec<U>> {
    let mut values = crate::alloc::filled(backend, features.len(), U::zeroed())?;
    for (value, x) in values.iter_mut().zip(features.iter()) {
        *value = convert(x.to_f32());
    }
    Ok(values)
}
