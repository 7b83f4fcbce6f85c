//! The host-array path ([`crate::Backend`] on an executor): upload the inputs, run the launch
//! sequences, download the results. The backward pass uploads the saved state as the kernels'
//! statistics, rebuilding W_i = max_j w_ij from the positives (see [`positive_weight_max`]).
//!
//! f64 features are rejected with [`crate::Error::Unsupported`]: the kernels read f32, f16 or
//! bf16, and silently rounding f64 input would hide a precision loss the caller did not ask for.

use half::{bf16, f16};
use ndarray::{Array3, ArrayView3};

use super::executor::{download_vec, upload_slice, KernelExecutor};
use super::kernel::FeatureType;
use super::launch::{grad_coefficients, launch_backward, launch_forward, to_host, SavedAddresses};
use super::problem::{InputAddresses, PositiveAddresses, Problem};
use crate::backend::{ForwardOutput, SavedState, Upstream};
use crate::config::SupConLoss;
use crate::element::{Element, GradElement};
use crate::error::Result;
use crate::inputs::{validate_inputs, BatchShape, Positives};

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
        let features = match problem.feature_type() {
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

fn narrow(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&x| x as f32).collect()
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
                .filter(|&(other, _)| other != b || shape.views() > 1)
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
    let (batch, views, dim) = (shape.batch(), shape.views(), shape.dim());
    let grad = executor.alloc(shape.elements() * size_of::<f32>())?;
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
    let grad: Vec<f32> = download_vec(executor, &grad, shape.elements())?;
    Ok(Array3::from_shape_fn((batch, views, dim), |(b, v, k)| {
        T::Grad::from_f32(grad[(b * views + v) * dim + k])
    }))
}
