//! The loss on candle tensors, with autograd (feature `candle`).
//!
//! [`loss`] applies a candle custom operation to the features `[B, V, D]`. Its forward pass runs
//! this crate's forward on the tensor's own storage (any strides: a strided view, no copy) and
//! keeps the O(N) [`SavedState`]. When `backward()` reaches it, its `bwd` applies a second
//! operation to the same features, which runs this crate's backward from that state with the
//! incoming gradient. The positives are read before the operation and are not one of its
//! inputs, so they get no gradient.
//!
//! CPU tensors run on [`CpuBackend`]. CUDA tensors are refused with
//! [`Error::NotCompiledWithCuda`]: candle's CUDA build links the CUDA libraries at build time
//! (cudarc's `dynamic-linking`), which this crate's builds for machines without a driver
//! cannot.
//!
//! Errors of this crate travel inside candle's error as its `WrappedContext` variant (`?`
//! converts them); [`supcon_error`] gives the typed [`Error`] back.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3, ArrayView1, ArrayView3, ShapeBuilder};

use crate::backend::{Backend, SavedState, Upstream};
use crate::config::{Reduction, SupConLoss};
use crate::cpu::CpuBackend;
use crate::element::Element;
use crate::error::Error;
use crate::inputs::OwnedPositives;
use crate::label_sets::LabelSetWeight;

/// What makes two rows positives, as candle tensors (docs/math.md, "Inputs"); see
/// [`Positives`](crate::Positives) for the meaning of each.
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    /// Only the other views of the same sample.
    SimClr,
    /// `[B]` class labels, of an integer dtype.
    Labels(&'a Tensor),
    /// `[B, B]` pair weights, of a float dtype.
    Mask(&'a Tensor),
    /// A `[B, K]` multi-hot matrix (0 or 1, any dtype) and how overlaps weigh.
    LabelSets {
        /// `[B, K]`: 1 where the sample has the label.
        sets: &'a Tensor,
        /// How the overlap of two sets weighs a pair.
        weight: LabelSetWeight,
    },
}

/// The SupCon loss of `features` (`[B, V, D]` on the CPU, f32, f16, bf16 or f64), as a tensor
/// in the features' dtype: a scalar under [`Reduction::Mean`] and [`Reduction::Sum`], the R
/// per-anchor losses (`[R]`, row r = v·B + b) under [`Reduction::None`]. Calling `backward()` on anything computed from it
/// gives the features this crate's gradient.
///
/// # Errors
/// This crate's errors ([`supcon_error`] recovers them) for bad features or positives, as
/// [`Backend::forward`] returns them, and [`Error::InvalidArgument`] for tensors of the wrong
/// rank or dtype and [`Error::NotCompiledWithCuda`] for CUDA tensors; candle's own errors from
/// reading the targets.
pub fn loss(
    config: &SupConLoss,
    features: &Tensor,
    targets: Targets<'_>,
) -> candle_core::Result<Tensor> {
    if features.rank() != 3 {
        return Err(wrap(invalid(format!(
            "features must be [B, V, D], got shape {:?}",
            features.dims()
        ))));
    }
    match features.device() {
        Device::Cpu => {
            let positives = host_positives(targets)?;
            features.apply_op1(SupConForward {
                config: *config,
                positives: Arc::new(positives),
                state: Mutex::new(None),
            })
        }
        Device::Cuda(_) => Err(wrap(Error::NotCompiledWithCuda)),
        Device::Metal(_) => Err(wrap(invalid("Metal tensors are not supported".into()))),
    }
}

/// The error of this crate that `error` carries, if any: what [`loss`] or a backward pass
/// through it refused, typed, through candle's context and backtrace wrappers.
pub fn supcon_error(error: &candle_core::Error) -> Option<&Error> {
    match error {
        candle_core::Error::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<Error>(),
        candle_core::Error::Context { inner, .. }
        | candle_core::Error::WithPath { inner, .. }
        | candle_core::Error::WithBacktrace { inner, .. } => supcon_error(inner),
        _ => None,
    }
}

/// This crate's errors inside candle's (its `WrappedContext` variant), so that `?` passes them
/// on in candle code and [`supcon_error`] gives them back.
impl From<Error> for candle_core::Error {
    fn from(error: Error) -> Self {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(error),
            context: "supcon".into(),
        }
    }
}

fn wrap(error: Error) -> candle_core::Error {
    error.into()
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// The targets read into host arrays (one copy each, before the operation).
fn host_positives(targets: Targets<'_>) -> candle_core::Result<OwnedPositives> {
    Ok(match targets {
        Targets::SimClr => OwnedPositives::SimClr,
        Targets::Labels(labels) => {
            if labels.rank() != 1 || !is_integer(labels.dtype()) {
                return Err(wrap(invalid(format!(
                    "labels must be a [B] tensor of an integer dtype, got {:?} of shape {:?}",
                    labels.dtype(),
                    labels.dims()
                ))));
            }
            let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            OwnedPositives::Labels(Array1::from(labels))
        }
        Targets::Mask(mask) => {
            if mask.rank() != 2 || is_integer(mask.dtype()) {
                return Err(wrap(invalid(format!(
                    "a mask must be a [B, B] tensor of a float dtype, got {:?} of shape {:?}",
                    mask.dtype(),
                    mask.dims()
                ))));
            }
            OwnedPositives::Mask(host_matrix::<f32>(&mask.to_dtype(DType::F32)?)?)
        }
        Targets::LabelSets { sets, weight } => {
            if sets.rank() != 2 {
                return Err(wrap(invalid(format!(
                    "label sets must be a [B, K] tensor, got shape {:?}",
                    sets.dims()
                ))));
            }
            let values = host_matrix::<f64>(&sets.to_dtype(DType::F64)?)?;
            if let Some(value) = values.iter().find(|&&v| v != 0.0 && v != 1.0) {
                return Err(wrap(invalid(format!(
                    "label sets must hold 0 or 1, got {value}"
                ))));
            }
            OwnedPositives::LabelSets {
                sets: values.mapv(|v| v == 1.0),
                weight,
            }
        }
    })
}

fn is_integer(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64
    )
}

fn host_matrix<T: candle_core::WithDType>(matrix: &Tensor) -> candle_core::Result<Array2<T>> {
    let (rows, columns) = matrix.dims2()?;
    let values = matrix.flatten_all()?.to_vec1::<T>()?;
    Array2::from_shape_vec((rows, columns), values).map_err(candle_core::Error::wrap)
}

/// The upstream gradient of the loss tensor, as [`Upstream`] wants it.
enum OwnedUpstream {
    Scalar(f64),
    PerAnchor(Vec<f64>),
}

impl OwnedUpstream {
    fn of(config: &SupConLoss, gradient: &Tensor) -> candle_core::Result<Self> {
        let gradient = gradient.to_dtype(DType::F64)?;
        Ok(match config.reduction() {
            Reduction::None => Self::PerAnchor(gradient.to_vec1::<f64>()?),
            Reduction::Mean | Reduction::Sum => Self::Scalar(gradient.to_scalar::<f64>()?),
        })
    }

    fn view(&self) -> Upstream<'_> {
        match self {
            Self::Scalar(value) => Upstream::Scalar(*value),
            Self::PerAnchor(values) => Upstream::PerAnchor(ArrayView1::from(values.as_slice())),
        }
    }
}

/// The forward operation on CPU storage; it keeps the state its backward needs.
struct SupConForward {
    config: SupConLoss,
    positives: Arc<OwnedPositives>,
    /// Filled by `cpu_fwd`, read by `bwd` (which may run more than once).
    state: Mutex<Option<SavedState>>,
}

/// The backward operation: the gradient of the features of a [`SupConForward`].
struct SupConBackward {
    config: SupConLoss,
    positives: Arc<OwnedPositives>,
    state: SavedState,
    upstream: OwnedUpstream,
}

impl CustomOp1 for SupConForward {
    fn name(&self) -> &'static str {
        "supcon"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (output, dtype) = match storage {
            CpuStorage::F32(values) => (self.forward(values, layout)?, DType::F32),
            CpuStorage::F64(values) => (self.forward(values, layout)?, DType::F64),
            CpuStorage::F16(values) => (self.forward(values, layout)?, DType::F16),
            CpuStorage::BF16(values) => (self.forward(values, layout)?, DType::BF16),
            other => return Err(wrap(unsupported_dtype(other.dtype()))),
        };
        let values = match (self.config.reduction(), output.loss) {
            (Reduction::None, _) => output.per_anchor.to_vec(),
            (_, Some(loss)) => vec![loss],
            (_, None) => unreachable!("mean and sum always reduce"),
        };
        let shape = match self.config.reduction() {
            Reduction::None => Shape::from(values.len()),
            Reduction::Mean | Reduction::Sum => Shape::from(()),
        };
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(output.state);
        Ok((storage_of(dtype, &values), shape))
    }

    fn bwd(
        &self,
        features: &Tensor,
        _loss: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| candle_core::Error::msg("supcon: backward before forward"))?;
        let backward = SupConBackward {
            config: self.config,
            positives: Arc::clone(&self.positives),
            state,
            upstream: OwnedUpstream::of(&self.config, gradient)?,
        };
        Ok(Some(features.apply_op1_no_bwd(&backward)?))
    }
}

impl SupConForward {
    fn forward<T: Element>(
        &self,
        values: &[T],
        layout: &Layout,
    ) -> candle_core::Result<crate::ForwardOutput> {
        with_view(values, layout, |features| {
            CpuBackend.forward(&self.config, features, self.positives.view())
        })
    }
}

impl CustomOp1 for SupConBackward {
    fn name(&self) -> &'static str {
        "supcon-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gradient = match storage {
            CpuStorage::F32(values) => {
                CpuStorage::F32(self.backward(values, layout)?.into_raw_vec_and_offset().0)
            }
            CpuStorage::F64(values) => {
                CpuStorage::F64(self.backward(values, layout)?.into_raw_vec_and_offset().0)
            }
            CpuStorage::F16(values) => CpuStorage::F16(
                self.backward(values, layout)?
                    .iter()
                    .map(|&g| f16::from_f32(g))
                    .collect(),
            ),
            CpuStorage::BF16(values) => CpuStorage::BF16(
                self.backward(values, layout)?
                    .iter()
                    .map(|&g| bf16::from_f32(g))
                    .collect(),
            ),
            other => return Err(wrap(unsupported_dtype(other.dtype()))),
        };
        Ok((gradient, layout.shape().clone()))
    }
}

impl SupConBackward {
    /// The gradient `[B, V, D]`, in standard (row-major) order.
    fn backward<T: Element>(
        &self,
        values: &[T],
        layout: &Layout,
    ) -> candle_core::Result<Array3<T::Grad>> {
        let gradient = with_view(values, layout, |features| {
            CpuBackend.backward(
                &self.config,
                features,
                self.positives.view(),
                &self.state,
                self.upstream.view(),
            )
        })?;
        Ok(if gradient.is_standard_layout() {
            gradient
        } else {
            gradient.as_standard_layout().into_owned()
        })
    }
}

/// Runs `f` on the `[B, V, D]` view of a CPU tensor's storage: a strided view where ndarray
/// takes the layout's strides, else (broadcast strides that alias elements) a contiguous copy.
fn with_view<T: Element, R>(
    values: &[T],
    layout: &Layout,
    f: impl FnOnce(ArrayView3<'_, T>) -> crate::Result<R>,
) -> candle_core::Result<R> {
    let &[batch, views, dim] = layout.dims() else {
        return Err(wrap(invalid(format!(
            "features must be [B, V, D], got shape {:?}",
            layout.dims()
        ))));
    };
    let &[s0, s1, s2] = layout.stride() else {
        unreachable!("a rank-3 layout has three strides")
    };
    let start = layout.start_offset();
    let strided = ArrayView3::from_shape(
        (batch, views, dim).strides((s0, s1, s2)),
        &values[start.min(values.len())..],
    );
    match strided {
        Ok(view) => f(view).map_err(wrap),
        Err(_) => {
            let copy = Array3::from_shape_fn((batch, views, dim), |(b, v, d)| {
                values[start + b * s0 + v * s1 + d * s2]
            });
            f(copy.view()).map_err(wrap)
        }
    }
}

fn unsupported_dtype(dtype: DType) -> Error {
    invalid(format!(
        "features must be f32, f64, f16 or bf16, got {dtype:?}"
    ))
}

/// Host values as a CPU storage of `dtype`, rounded to nearest through f32 as PyTorch rounds
/// f64 to half types (`half`'s own `from_f64` drops low bits before it rounds).
fn storage_of(dtype: DType, values: &[f64]) -> CpuStorage {
    let f32_of = |v: &f64| *v as f32;
    match dtype {
        DType::F64 => CpuStorage::F64(values.to_vec()),
        DType::F16 => CpuStorage::F16(values.iter().map(f32_of).map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.iter().map(f32_of).map(bf16::from_f32).collect()),
        _ => CpuStorage::F32(values.iter().map(|&v| v as f32).collect()),
    }
}
