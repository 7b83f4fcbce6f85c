//! `supcon._supcon`: the crate's backends for Python, on buffers the Python side owns.
//!
//! The Python package (`supcon/`) allocates every array (NumPy or PyTorch, inputs and outputs
//! alike), checks dtype, shape and contiguity, and passes each one here as an [`Array`]: its
//! address and its element type. Nothing is copied on the way in; the results are written into
//! the output arrays. The GIL is released while the crate computes.
//!
//! Errors become Python exceptions: `ValueError` for anything about the inputs or options,
//! `RuntimeError` for a device that cannot run, [`OutOfMemoryError`] (a `MemoryError`) when
//! memory runs out.

use half::{bf16, f16};
use ndarray::{Array3, ArrayView1, ArrayView2, ArrayView3};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use supcon::{
    AnyBackend, Backend, BatchShape, ContrastMode, Denominator, Element, Error, ForwardOutput,
    LabelSetWeight, NoPositivePolicy, Positives, Reduction, SavedState, ShardStatistics, Summation,
    SupConLoss, Upstream,
};

pyo3::create_exception!(
    _supcon,
    OutOfMemoryError,
    PyMemoryError,
    "Memory ran out (the device's or the host's): retry with a smaller batch."
);

/// The Python exception for a crate error.
fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::OutOfMemory { .. } => OutOfMemoryError::new_err(message),
        Error::NotCompiledWithCuda
        | Error::KernelsNotBuilt
        | Error::NoCudaDriver
        | Error::NoCudaDevice { .. }
        | Error::UnsupportedComputeCapability { .. }
        | Error::DriverTooOld { .. }
        | Error::Cuda { .. } => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

/// An array the Python side owns: the address of its first element, its element type's name
/// (`float32`, `float16`, `bfloat16`, `float64`, `int64`, `bool`, `uint8`) and its number of
/// elements. It is C-contiguous and stays alive, unmodified, for the whole call. An empty
/// array's address may be null (PyTorch's empty tensors have none): nothing is read there.
#[derive(FromPyObject)]
struct Array(usize, String, usize);

impl Array {
    /// The array as `len` values of `T`.
    ///
    /// # Safety
    /// The Python side's promise ([`Array`]): `address` points to `len` initialised values of
    /// the named type, alive and unmodified for the call.
    unsafe fn slice<T>(&self, dtype: &str) -> PyResult<&[T]> {
        self.check(dtype, align_of::<T>())?;
        if self.2 == 0 {
            return Ok(&[]);
        }
        // SAFETY: per this function's contract; the address is non-null and aligned (checked).
        Ok(unsafe { std::slice::from_raw_parts(self.0 as *const T, self.2) })
    }

    /// The array as `len` writable values of `T`.
    ///
    /// # Safety
    /// As [`slice`](Self::slice), and nothing else reads or writes the array during the call.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<T>(&self, dtype: &str) -> PyResult<&mut [T]> {
        self.check(dtype, align_of::<T>())?;
        if self.2 == 0 {
            return Ok(&mut []);
        }
        // SAFETY: per this function's contract; the address is non-null and aligned (checked).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.0 as *mut T, self.2) })
    }

    fn check(&self, dtype: &str, align: usize) -> PyResult<()> {
        if self.1 != dtype {
            return Err(PyValueError::new_err(format!(
                "expected a {dtype} array, got {}",
                self.1
            )));
        }
        if self.2 > 0 && (self.0 == 0 || self.0 % align != 0) {
            return Err(PyValueError::new_err("an array is not aligned"));
        }
        Ok(())
    }
}

/// The loss options, as the Python side names them: temperature, base temperature, contrast
/// mode, summation, denominator, positives cap, no-positive policy, reduction and whether the
/// loss normalises the features.
#[derive(FromPyObject)]
struct Options(
    f64,
    f64,
    String,
    String,
    String,
    Option<usize>,
    String,
    String,
    bool,
);

impl Options {
    fn loss(&self) -> PyResult<SupConLoss> {
        let Options(
            temperature,
            base_temperature,
            contrast_mode,
            summation,
            denominator,
            positives_cap,
            no_positive,
            reduction,
            normalize,
        ) = self;
        let mode = choice("contrast_mode", contrast_mode, &["all", "one"])?;
        let summation = choice("summation", summation, &["outside", "inside"])?;
        let denominator = choice(
            "denominator",
            denominator,
            &["all", "only_negatives", "one_positive"],
        )?;
        let policy = choice(
            "no_positive",
            no_positive,
            &["zero_and_count", "exclude", "error"],
        )?;
        let reduction = choice("reduction", reduction, &["mean", "sum", "none"])?;
        let mut builder = SupConLoss::builder()
            .temperature(*temperature)
            .base_temperature(*base_temperature)
            .contrast_mode([ContrastMode::All, ContrastMode::One][mode])
            .summation([Summation::Outside, Summation::Inside][summation])
            .denominator(
                [
                    Denominator::All,
                    Denominator::OnlyNegatives,
                    Denominator::OnePositive,
                ][denominator],
            )
            .no_positive(
                [
                    NoPositivePolicy::ZeroAndCount,
                    NoPositivePolicy::Exclude,
                    NoPositivePolicy::Error,
                ][policy],
            )
            .reduction([Reduction::Mean, Reduction::Sum, Reduction::None][reduction])
            .normalize(*normalize);
        if let Some(cap) = *positives_cap {
            builder = builder.positives_cap(cap);
        }
        builder.build().map_err(to_py)
    }
}

/// The `choices` entry named `value`, or a `ValueError` naming the option and its choices.
fn choice(name: &str, value: &str, choices: &[&str]) -> PyResult<usize> {
    choices.iter().position(|c| *c == value).ok_or_else(|| {
        PyValueError::new_err(format!("{name} must be one of {choices:?}, got {value:?}"))
    })
}

/// What makes rows positives: `None` (SimCLR), an `int64[B]` array of labels, a
/// `float32[B, B]` mask, or a `bool[B, K]` (or `uint8`, 0/1) array of label sets with how their
/// overlaps weigh (`"any"`, `"jaccard"`, `"fraction"`; `None` for the other kinds), told apart
/// by `kind` (`"simclr"`, `"labels"`, `"mask"`, `"label_sets"`).
#[derive(FromPyObject)]
struct PositivesArg(String, Option<Array>, Option<String>);

/// `bool[B, K]` label sets (or `uint8`): every byte is checked to be 0 or 1 before it is read as
/// a `bool`, so a stray value is a `ValueError`, never undefined behaviour.
///
/// # Safety
/// The array's promise ([`Array`]).
unsafe fn label_sets(array: &Array, batch: usize) -> PyResult<ArrayView2<'_, bool>> {
    let dtype = if array.1 == "uint8" { "uint8" } else { "bool" };
    // SAFETY: the array's promise.
    let bytes = unsafe { array.slice::<u8>(dtype)? };
    let labels = bytes.len() / batch.max(1);
    if let Some(index) = bytes.iter().position(|&byte| byte > 1) {
        return Err(PyValueError::new_err(format!(
            "label_sets[{}, {}] = {} is not 0 or 1",
            index / labels,
            index % labels,
            bytes[index]
        )));
    }
    // SAFETY: every byte is 0 or 1, the two bit patterns of `bool`, which has the size and
    // alignment of `u8`.
    let sets = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<bool>(), bytes.len()) };
    ArrayView2::from_shape((batch, labels), sets)
        .map_err(|e| PyValueError::new_err(format!("label sets: {e}")))
}

impl PositivesArg {
    /// How label sets weigh (`label_set_weight`).
    fn set_weight(&self) -> PyResult<LabelSetWeight> {
        let weight = choice(
            "label_set_weight",
            self.2.as_deref().unwrap_or_default(),
            &["any", "jaccard", "fraction"],
        )?;
        Ok([
            LabelSetWeight::Any,
            LabelSetWeight::Jaccard,
            LabelSetWeight::Fraction,
        ][weight])
    }

    /// # Safety
    /// The array's promise ([`Array`]).
    unsafe fn view(&self, batch: usize) -> PyResult<Positives<'_>> {
        let PositivesArg(kind, array, _) = self;
        let array = || {
            array
                .as_ref()
                .ok_or_else(|| PyValueError::new_err(format!("{kind} need an array")))
        };
        Ok(match kind.as_str() {
            "simclr" => Positives::SimClr,
            // SAFETY: the array's promise.
            "labels" => {
                Positives::Labels(ArrayView1::from(unsafe { array()?.slice::<i64>("int64")? }))
            }
            "mask" => {
                // SAFETY: the array's promise.
                let weights = unsafe { array()?.slice::<f32>("float32")? };
                let mask = ArrayView2::from_shape((batch, weights.len() / batch.max(1)), weights)
                    .map_err(|e| PyValueError::new_err(format!("mask: {e}")))?;
                Positives::Mask(mask)
            }
            "label_sets" => {
                Positives::LabelSets {
                    // SAFETY: the array's promise.
                    sets: unsafe { label_sets(array()?, batch)? },
                    weight: self.set_weight()?,
                }
            }
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown positives {other:?}"
                )))
            }
        })
    }
}

/// The backend called `name` for CPU arrays (`auto` is the fused CPU backend).
fn host_backend(name: &str) -> PyResult<AnyBackend> {
    match name {
        "auto" | "cpu" => AnyBackend::from_name("cpu"),
        "reference" => AnyBackend::from_name("reference"),
        other => Err(Error::UnknownBackend(other.to_string())),
    }
    .map_err(to_py)
}

/// The features `[B, V, D]` as element type T.
///
/// # Safety
/// The array's promise ([`Array`]).
unsafe fn features_view<'a, T: Element>(
    features: &'a Array,
    dtype: &str,
    shape: (usize, usize, usize),
) -> PyResult<ArrayView3<'a, T>> {
    // SAFETY: the array's promise.
    let values = unsafe { features.slice::<T>(dtype)? };
    ArrayView3::from_shape(shape, values)
        .map_err(|e| PyValueError::new_err(format!("features: {e}")))
}

/// Runs `$body` with `$T` the element type of the features' dtype.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            "float32" => {
                type $T = f32;
                $body
            }
            "float16" => {
                type $T = f16;
                $body
            }
            "bfloat16" => {
                type $T = bf16;
                $body
            }
            "float64" => {
                type $T = f64;
                $body
            }
            other => Err(PyValueError::new_err(format!(
                "features must be float32, float16, bfloat16 or float64, got {other}"
            ))),
        }
    };
}

/// The forward pass on CPU arrays. Writes ℓ_i, LSE_i, LSE^P_i and P_i (`float64[R]` each) into
/// `per_anchor` and `state`; returns the reduced loss (`None` for reduction none), R' and the
/// batch's fingerprint.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    backend: &str,
    options: Options,
    features: Array,
    shape: (usize, usize, usize),
    positives: PositivesArg,
    per_anchor: Array,
    state: [Array; 3],
) -> PyResult<(Option<f64>, f64, Option<u64>)> {
    let loss = options.loss()?;
    let backend = host_backend(backend)?;
    let dtype = features.1.clone();
    with_dtype!(dtype.as_str(), T => {
        // SAFETY: the arrays' promise ([`Array`]); the outputs are not read by Python during
        // the call (it waits for it).
        unsafe {
            let z = features_view::<T>(&features, &dtype, shape)?;
            let positives = positives.view(shape.0)?;
            let out = py.detach(|| backend.forward(&loss, z, positives)).map_err(to_py)?;
            let s = &out.state;
            per_anchor.slice_mut::<f64>("float64")?.copy_from_slice(out.per_anchor.as_slice().expect("a vector"));
            for (array, values) in state.iter().zip([s.lse(), s.lse_positive(), s.positive_weight()]) {
                array.slice_mut::<f64>("float64")?.copy_from_slice(values);
            }
            Ok((out.loss, s.mean_denominator(), s.fingerprint()))
        }
    })
}

/// The upstream gradient: a scalar, or a `float64[R]` array for reduction none.
#[derive(FromPyObject)]
enum UpstreamArg {
    Scalar(f64),
    PerAnchor(Array),
}

impl UpstreamArg {
    /// # Safety
    /// The array's promise ([`Array`]).
    unsafe fn view(&self) -> PyResult<Upstream<'_>> {
        Ok(match self {
            UpstreamArg::Scalar(u) => Upstream::Scalar(*u),
            // SAFETY: the array's promise.
            UpstreamArg::PerAnchor(array) => {
                Upstream::PerAnchor(ArrayView1::from(unsafe { array.slice::<f64>("float64")? }))
            }
        })
    }
}

/// The saved state from the Python side's arrays: LSE_i, LSE^P_i and P_i (`float64[R]` each),
/// R' and the fingerprint.
///
/// # Safety
/// The arrays' promise ([`Array`]).
unsafe fn saved_state(
    loss: SupConLoss,
    shape: BatchShape,
    state: &[Array; 3],
    mean_denominator: f64,
    fingerprint: Option<u64>,
) -> PyResult<SavedState> {
    // SAFETY: the arrays' promise.
    let [lse, lse_positive, positive_weight] = state
        .each_ref()
        .map(|array| unsafe { array.slice::<f64>("float64") }.map(<[f64]>::to_vec));
    SavedState::from_parts(
        loss,
        shape,
        [lse?, lse_positive?, positive_weight?],
        mean_denominator,
        fingerprint,
    )
    .map_err(to_py)
}

/// Copies a gradient into `grad`: float64 for float64 features, float32 otherwise.
///
/// # Safety
/// The array's promise ([`Array`]), and nothing else reads or writes it during the call.
unsafe fn write_gradient<T: Element>(grad: &Array, values: &Array3<T::Grad>) -> PyResult<()> {
    let dtype = if T::DTYPE == supcon::DType::F64 {
        "float64"
    } else {
        "float32"
    };
    let values = values.as_slice().expect("a fresh array");
    // SAFETY: per this function's contract.
    let target = unsafe { grad.slice_mut::<T::Grad>(dtype)? };
    if target.len() != values.len() {
        return Err(PyValueError::new_err(format!(
            "the gradient array holds {} values, the gradient {}",
            target.len(),
            values.len()
        )));
    }
    target.copy_from_slice(values);
    Ok(())
}

/// The backward pass on CPU arrays, from the state of [`forward`]: writes ∂(objective)/∂z into
/// `grad` (`[B, V, D]`, float64 for float64 features, float32 otherwise).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    backend: &str,
    options: Options,
    features: Array,
    shape: (usize, usize, usize),
    positives: PositivesArg,
    state: [Array; 3],
    mean_denominator: f64,
    fingerprint: Option<u64>,
    upstream: UpstreamArg,
    grad: Array,
) -> PyResult<()> {
    let loss = options.loss()?;
    let backend = host_backend(backend)?;
    let batch_shape = BatchShape::new(shape.0, shape.1, shape.2).map_err(to_py)?;
    let dtype = features.1.clone();
    with_dtype!(dtype.as_str(), T => {
        // SAFETY: the arrays' promise ([`Array`]); `grad` is not read by Python during the
        // call (it waits for it).
        unsafe {
            let z = features_view::<T>(&features, &dtype, shape)?;
            let positives = positives.view(shape.0)?;
            let saved = saved_state(loss, batch_shape, &state, mean_denominator, fingerprint)?;
            let upstream = upstream.view()?;
            let result = py
                .detach(|| backend.backward(&loss, z, positives, &saved, upstream))
                .map_err(to_py)?;
            write_gradient::<T>(&grad, &result)
        }
    })
}

/// The statistics of one shard's anchors (the anchors of samples `b0..b1`) against every row
/// of the whole batch `features` `[B, V, D]`: writes ℓ_i, LSE_i, LSE^P_i and P_i
/// (`float64[A]` each, A the shard's anchors) into `outputs`, in shard order (for each anchor
/// view v, the shard's samples in order). Nothing is reduced: [`assemble`] applies the
/// no-positive policy and the reduction to the whole batch.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn forward_shard(
    py: Python<'_>,
    backend: &str,
    options: Options,
    features: Array,
    shape: (usize, usize, usize),
    positives: PositivesArg,
    samples: (usize, usize),
    outputs: [Array; 4],
) -> PyResult<()> {
    let loss = options.loss()?;
    let backend = host_backend(backend)?;
    let dtype = features.1.clone();
    with_dtype!(dtype.as_str(), T => {
        // SAFETY: the arrays' promise ([`Array`]); the outputs are not read by Python during
        // the call (it waits for it).
        unsafe {
            let z = features_view::<T>(&features, &dtype, shape)?;
            let positives = positives.view(shape.0)?;
            let shard = py
                .detach(|| backend.forward_shard(&loss, z, positives, samples.0..samples.1))
                .map_err(to_py)?;
            let values = [
                shard.per_anchor(),
                shard.lse(),
                shard.lse_positive(),
                shard.positive_weight(),
            ];
            for (array, values) in outputs.iter().zip(values) {
                copy_into(array, values)?;
            }
            Ok(())
        }
    })
}

/// Copies `values` into the `float64` array `array`, which must hold as many.
///
/// # Safety
/// The array's promise ([`Array`]), and nothing else reads or writes it during the call.
unsafe fn copy_into(array: &Array, values: &[f64]) -> PyResult<()> {
    // SAFETY: per this function's contract.
    let target = unsafe { array.slice_mut::<f64>("float64")? };
    if target.len() != values.len() {
        return Err(PyValueError::new_err(format!(
            "an output array holds {} values, the result {}",
            target.len(),
            values.len()
        )));
    }
    target.copy_from_slice(values);
    Ok(())
}

/// The whole batch's forward output from the statistics of disjoint shards, each
/// `(b0, b1, [ℓ, LSE, LSE^P, P])` as [`forward_shard`] wrote them: writes ℓ_i of all R anchors
/// into `per_anchor` (0 for anchors no shard covers) and LSE_i, LSE^P_i, P_i of all R anchors
/// into `state` (`float64[R]` each); returns the loss reduced over the covered anchors (`None`
/// for reduction none) and R'. Samples no shard covers are contrasts only: not anchors, and
/// without gradient terms.
#[pyfunction]
fn assemble(
    options: Options,
    shape: (usize, usize, usize),
    shards: Vec<(usize, usize, [Array; 4])>,
    per_anchor: Array,
    state: [Array; 3],
) -> PyResult<(Option<f64>, f64)> {
    let loss = options.loss()?;
    let batch_shape = BatchShape::new(shape.0, shape.1, shape.2).map_err(to_py)?;
    let statistics = shards
        .iter()
        .map(|(b0, b1, parts)| {
            // SAFETY: the arrays' promise ([`Array`]).
            let parts = parts
                .each_ref()
                .map(|array| unsafe { array.slice::<f64>("float64") }.map(<[f64]>::to_vec));
            let [per_anchor, lse, lse_positive, positive_weight] = parts;
            ShardStatistics::from_parts(
                &loss,
                batch_shape,
                *b0..*b1,
                [per_anchor?, lse?, lse_positive?, positive_weight?],
            )
            .map_err(to_py)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let output = ForwardOutput::from_shards(&loss, batch_shape, &statistics).map_err(to_py)?;
    let s = &output.state;
    // SAFETY: the arrays' promise ([`Array`]); the outputs are not read by Python during the
    // call (it waits for it).
    unsafe {
        copy_into(&per_anchor, output.per_anchor.as_slice().expect("a vector"))?;
        for (array, values) in state
            .iter()
            .zip([s.lse(), s.lse_positive(), s.positive_weight()])
        {
            copy_into(array, values)?;
        }
    }
    Ok((output.loss, s.mean_denominator()))
}

/// The gradient of one shard's rows (the views of samples `b0..b1`) from the *whole batch's*
/// state (of [`assemble`]; no fingerprint): writes ∂(objective)/∂z of those rows into `grad`
/// (`[b1 − b0, V, D]`, float64 for float64 features, float32 otherwise). A per-anchor upstream
/// is `float64[R]` over every anchor of the whole batch.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn backward_shard(
    py: Python<'_>,
    backend: &str,
    options: Options,
    features: Array,
    shape: (usize, usize, usize),
    positives: PositivesArg,
    state: [Array; 3],
    mean_denominator: f64,
    upstream: UpstreamArg,
    samples: (usize, usize),
    grad: Array,
) -> PyResult<()> {
    let loss = options.loss()?;
    let backend = host_backend(backend)?;
    let batch_shape = BatchShape::new(shape.0, shape.1, shape.2).map_err(to_py)?;
    let dtype = features.1.clone();
    with_dtype!(dtype.as_str(), T => {
        // SAFETY: the arrays' promise ([`Array`]); `grad` is not read by Python during the
        // call (it waits for it).
        unsafe {
            let z = features_view::<T>(&features, &dtype, shape)?;
            let positives = positives.view(shape.0)?;
            let saved = saved_state(loss, batch_shape, &state, mean_denominator, None)?;
            let upstream = upstream.view()?;
            let samples = samples.0..samples.1;
            let result = py
                .detach(|| backend.backward_shard(&loss, z, positives, &saved, upstream, samples))
                .map_err(to_py)?;
            write_gradient::<T>(&grad, &result)
        }
    })
}

/// The CUDA backend on PyTorch's memory and stream.
#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::mem::ManuallyDrop;
    use std::ops::Range;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr};
    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;
    use supcon::cuda::{CudaFeature, DevicePositives};
    use supcon::{BatchShape, CudaBackend, SupConLoss};

    use super::{to_py, Array, Options, PositivesArg};

    /// Runs `$body` with `$T` the kernel element type of the features' dtype (the kernels read
    /// float32, float16 and bfloat16).
    macro_rules! with_cuda_dtype {
        ($dtype:expr, $T:ident => $body:expr) => {
            match $dtype {
                "float32" => {
                    type $T = f32;
                    $body
                }
                "float16" => {
                    type $T = half::f16;
                    $body
                }
                "bfloat16" => {
                    type $T = half::bf16;
                    $body
                }
                other => Err(to_py(supcon::Error::Unsupported {
                    backend: "cuda",
                    capability: supcon::Capability::ElementType(match other {
                        "float64" => supcon::DType::F64,
                        _ => return Err(PyValueError::new_err(format!("unknown dtype {other}"))),
                    }),
                })),
            }
        };
    }

    /// The primary context of device `ordinal`, the one PyTorch uses: created once through
    /// `CudaBackend::new`, which checks driver, device, compute capability and kernels first.
    fn context(ordinal: usize) -> PyResult<Arc<CudaContext>> {
        static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
        let contexts = CONTEXTS.get_or_init(Default::default);
        let mut contexts = contexts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(context) = contexts.get(&ordinal) {
            return Ok(context.clone());
        }
        let context = CudaBackend::new(ordinal).map_err(to_py)?.context().clone();
        contexts.insert(ordinal, context.clone());
        Ok(context)
    }

    /// The backend on PyTorch's stream `stream` of device `ordinal`.
    fn backend(ordinal: usize, stream: usize) -> PyResult<CudaBackend> {
        let context = context(ordinal)?;
        // SAFETY: `stream` is PyTorch's current stream of this device (the Python side's
        // promise), which lives in the device's primary context, stays alive for the call,
        // and orders our work with PyTorch's because all of it is queued on it.
        let stream = unsafe { context.wrap_borrowed_stream(stream as sys::CUstream) };
        CudaBackend::from_stream(stream).map_err(to_py)
    }

    /// Device memory that PyTorch owns, as a cudarc slice that is never freed.
    struct Borrowed<T: DeviceRepr>(ManuallyDrop<CudaSlice<T>>);

    impl<T: DeviceRepr> Borrowed<T> {
        /// # Safety
        /// `array` addresses `array.2` values of `T` in device memory of `stream`'s context
        /// that stay allocated for the call (the Python side's promise).
        unsafe fn new(stream: &Arc<CudaStream>, array: &Array, dtype: &str) -> PyResult<Self> {
            if array.1 != dtype || array.0 == 0 {
                return Err(PyValueError::new_err(format!(
                    "expected a {dtype} device tensor, got {}",
                    array.1
                )));
            }
            // SAFETY: per this function's contract.
            let slice = unsafe { stream.upgrade_device_ptr::<T>(array.0 as u64, array.2) };
            Ok(Borrowed(ManuallyDrop::new(slice)))
        }
    }

    impl<T: DeviceRepr> Drop for Borrowed<T> {
        fn drop(&mut self) {
            // SAFETY: taken once, here; `leak` hands the allocation back without freeing it.
            let slice = unsafe { ManuallyDrop::take(&mut self.0) };
            slice.leak();
        }
    }

    /// The layout of the forward's workspace for a batch of `shape` with label sets of
    /// `label_set_classes` labels (`None`: other positives): (bytes, offset of the loss, of
    /// ℓ_i, of the count of anchors without positives, bytes of the backward's scratch).
    #[pyfunction]
    pub(super) fn cuda_workspace(
        options: Options,
        shape: (usize, usize, usize),
        label_set_classes: Option<usize>,
    ) -> PyResult<(usize, usize, usize, usize, usize, usize)> {
        let loss = options.loss()?;
        let shape = BatchShape::new(shape.0, shape.1, shape.2).map_err(to_py)?;
        let workspace = CudaBackend::workspace(&loss, shape, label_set_classes).map_err(to_py)?;
        Ok((
            workspace.bytes(),
            workspace.loss_offset(),
            workspace.per_anchor_offset(),
            workspace.anchors_without_positives_offset(),
            workspace.scratch_bytes(),
            workspace.statistics_stride(),
        ))
    }

    /// The forward pass's last kernel on a `workspace` whose per-anchor statistics every
    /// shard wrote ([`forward_cuda`] with `samples`, gathered): the reduced loss and the count
    /// of anchors without positives.
    #[pyfunction]
    pub(super) fn finalize_cuda(
        py: Python<'_>,
        ordinal: usize,
        stream: usize,
        options: Options,
        shape: (usize, usize, usize),
        label_set_classes: Option<usize>,
        workspace: Array,
    ) -> PyResult<()> {
        let call = Call::new(ordinal, stream, &options, shape)?;
        py.detach(|| {
            let stream = call.backend.stream();
            // SAFETY: the Python side's promise: a uint8 device tensor, alive for the call and
            // ordered on `stream`.
            let mut workspace = unsafe { Borrowed::<u8>::new(stream, &workspace, "uint8")? };
            call.backend
                .finalize_device(
                    &call.loss,
                    call.shape,
                    label_set_classes,
                    &mut workspace.0.as_view_mut(),
                )
                .map_err(to_py)
        })
    }

    /// The features, the positives and the stream's backend, for one call.
    struct Call {
        backend: CudaBackend,
        loss: SupConLoss,
        shape: BatchShape,
    }

    impl Call {
        fn new(
            ordinal: usize,
            stream: usize,
            options: &Options,
            shape: (usize, usize, usize),
        ) -> PyResult<Self> {
            Ok(Call {
                backend: backend(ordinal, stream)?,
                loss: options.loss()?,
                shape: BatchShape::new(shape.0, shape.1, shape.2).map_err(to_py)?,
            })
        }

        /// Runs `body` with the positives as device views.
        ///
        /// # Safety
        /// `positives` as [`Borrowed::new`].
        unsafe fn with_positives<R>(
            &self,
            positives: &PositivesArg,
            body: impl FnOnce(DevicePositives<'_>) -> PyResult<R>,
        ) -> PyResult<R> {
            let stream = self.backend.stream();
            let PositivesArg(kind, array, _) = positives;
            let array = || {
                array
                    .as_ref()
                    .ok_or_else(|| PyValueError::new_err(format!("{kind} need an array")))
            };
            match kind.as_str() {
                "simclr" => body(DevicePositives::SimClr),
                "labels" => {
                    // SAFETY: per this function's contract.
                    let labels = unsafe { Borrowed::<i64>::new(stream, array()?, "int64")? };
                    let view = labels.0.as_view();
                    body(DevicePositives::Labels(&view))
                }
                "mask" => {
                    // SAFETY: per this function's contract.
                    let mask = unsafe { Borrowed::<f32>::new(stream, array()?, "float32")? };
                    let view = mask.0.as_view();
                    body(DevicePositives::Mask(&view))
                }
                "label_sets" => {
                    // Bytes, nonzero a member (the Python side passes 0/1 `bool` tensors).
                    let array = array()?;
                    let batch = self.shape.batch();
                    // SAFETY: per this function's contract.
                    let sets = unsafe { Borrowed::<u8>::new(stream, array, "bool")? };
                    let view = sets.0.as_view();
                    body(DevicePositives::LabelSets {
                        memberships: &view,
                        classes: array.2.checked_div(batch).unwrap_or(0),
                        weight: positives.set_weight()?,
                    })
                }
                other => Err(PyValueError::new_err(format!(
                    "unknown positives {other:?}"
                ))),
            }
        }

        /// The forward pass into `workspace`.
        ///
        /// # Safety
        /// Every array as [`Borrowed::new`].
        unsafe fn forward<T: CudaFeature>(
            &self,
            features: &Array,
            dtype: &str,
            positives: &PositivesArg,
            workspace: &Array,
            samples: Option<Range<usize>>,
        ) -> PyResult<()> {
            let stream = self.backend.stream();
            // SAFETY: per this function's contract.
            unsafe {
                let features = Borrowed::<T>::new(stream, features, dtype)?;
                let mut workspace = Borrowed::<u8>::new(stream, workspace, "uint8")?;
                self.with_positives(positives, |positives| {
                    let (features, workspace) =
                        (&features.0.as_view(), &mut workspace.0.as_view_mut());
                    match samples {
                        None => self.backend.forward_device_into(
                            &self.loss, features, self.shape, positives, workspace,
                        ),
                        Some(samples) => self.backend.forward_shard_device_into(
                            &self.loss, features, self.shape, positives, samples, workspace,
                        ),
                    }
                    .map_err(to_py)
                })
            }
        }

        /// The backward pass from `workspace` into `grad`.
        ///
        /// # Safety
        /// Every array as [`Borrowed::new`].
        #[allow(clippy::too_many_arguments)]
        unsafe fn backward<T: CudaFeature>(
            &self,
            features: &Array,
            dtype: &str,
            positives: &PositivesArg,
            workspace: &Array,
            upstream: &Array,
            scratch: &Array,
            grad: &Array,
            samples: Range<usize>,
        ) -> PyResult<()> {
            let stream = self.backend.stream();
            // SAFETY: per this function's contract.
            unsafe {
                let features = Borrowed::<T>::new(stream, features, dtype)?;
                let workspace = Borrowed::<u8>::new(stream, workspace, "uint8")?;
                let upstream = Borrowed::<f64>::new(stream, upstream, "float64")?;
                let mut scratch = Borrowed::<u8>::new(stream, scratch, "uint8")?;
                let mut grad = Borrowed::<f32>::new(stream, grad, "float32")?;
                self.with_positives(positives, |positives| {
                    self.backend
                        .backward_shard_device_from(
                            &self.loss,
                            &features.0.as_view(),
                            self.shape,
                            positives,
                            samples,
                            &workspace.0.as_view(),
                            &upstream.0.as_view(),
                            &mut scratch.0.as_view_mut(),
                            &mut grad.0.as_view_mut(),
                        )
                        .map_err(to_py)
                })
            }
        }
    }

    /// The forward pass on PyTorch CUDA tensors, queued on PyTorch's `stream` of device
    /// `ordinal`: the loss, ℓ_i and the backward's statistics go into `workspace` (laid out as
    /// [`cuda_workspace`] says). Nothing is allocated, copied or awaited. With `samples`
    /// (b0, b1), only that shard's anchors' statistics are written, and no loss reduced
    /// ([`finalize_cuda`] does, once every shard's statistics are in the workspace).
    #[pyfunction]
    #[pyo3(signature = (ordinal, stream, options, features, shape, positives, workspace, samples=None))]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_cuda(
        py: Python<'_>,
        ordinal: usize,
        stream: usize,
        options: Options,
        features: Array,
        shape: (usize, usize, usize),
        positives: PositivesArg,
        workspace: Array,
        samples: Option<(usize, usize)>,
    ) -> PyResult<()> {
        let call = Call::new(ordinal, stream, &options, shape)?;
        let dtype = features.1.clone();
        let samples = samples.map(|(b0, b1)| b0..b1);
        py.detach(|| {
            with_cuda_dtype!(dtype.as_str(), T => {
                // SAFETY: the Python side's promise: device tensors of the named types, alive
                // for the call and ordered on `stream`.
                unsafe {
                    call.forward::<T>(&features, &dtype, &positives, &workspace, samples.clone())
                }
            })
        })
    }

    /// The backward pass on PyTorch CUDA tensors, from a [`forward_cuda`] workspace, with the
    /// upstream gradient as R doubles on the device, R floats of `scratch`, into `grad`
    /// (float32, the features' shape). With `samples` (b0, b1), the gradient of that shard's
    /// samples only, `grad` holding `[b1 − b0, V, D]`.
    #[pyfunction]
    #[pyo3(signature = (ordinal, stream, options, features, shape, positives, workspace, upstream, scratch, grad, samples=None))]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_cuda(
        py: Python<'_>,
        ordinal: usize,
        stream: usize,
        options: Options,
        features: Array,
        shape: (usize, usize, usize),
        positives: PositivesArg,
        workspace: Array,
        upstream: Array,
        scratch: Array,
        grad: Array,
        samples: Option<(usize, usize)>,
    ) -> PyResult<()> {
        let call = Call::new(ordinal, stream, &options, shape)?;
        let dtype = features.1.clone();
        let samples = samples.map_or(0..call.shape.batch(), |(b0, b1)| b0..b1);
        py.detach(|| {
            with_cuda_dtype!(dtype.as_str(), T => {
                // SAFETY: as in `forward_cuda`.
                unsafe {
                    call.backward::<T>(
                        &features,
                        &dtype,
                        &positives,
                        &workspace,
                        &upstream,
                        &scratch,
                        &grad,
                        samples.clone(),
                    )
                }
            })
        })
    }
}

/// The extension module.
#[pymodule]
fn _supcon(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(forward, module)?)?;
    module.add_function(wrap_pyfunction!(backward, module)?)?;
    module.add_function(wrap_pyfunction!(forward_shard, module)?)?;
    module.add_function(wrap_pyfunction!(assemble, module)?)?;
    module.add_function(wrap_pyfunction!(backward_shard, module)?)?;
    #[cfg(feature = "cuda")]
    {
        module.add_function(wrap_pyfunction!(cuda::cuda_workspace, module)?)?;
        module.add_function(wrap_pyfunction!(cuda::forward_cuda, module)?)?;
        module.add_function(wrap_pyfunction!(cuda::backward_cuda, module)?)?;
        module.add_function(wrap_pyfunction!(cuda::finalize_cuda, module)?)?;
    }
    module.add(
        "OutOfMemoryError",
        module.py().get_type::<OutOfMemoryError>(),
    )?;
    Ok(())
}
