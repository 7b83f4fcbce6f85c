//! The crate's one error type.

use crate::config::Reduction;

/// Everything that can go wrong in `supcon`. No user input makes the crate panic: each failure
/// has a variant here.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// τ must be finite and > 0.
    #[error("temperature must be finite and > 0, got {0}")]
    InvalidTemperature(f64),
    /// τ_b must be finite and > 0.
    #[error("base temperature must be finite and > 0, got {0}")]
    InvalidBaseTemperature(f64),
    /// A positives cap of 0 would leave no anchor a positive.
    #[error("positives_cap must be at least 1")]
    InvalidPositivesCap,
    /// The features must have shape `[B, V, D]` with B, V, D ≥ 1.
    #[error("features have an empty dimension: shape [B, V, D] = {shape:?}")]
    EmptyFeatures {
        /// The offending shape.
        shape: [usize; 3],
    },
    /// B·V = 1: the only row has nothing to contrast with.
    #[error("B·V = 1: a single row has no contrast; at least two rows are needed")]
    SingleRow,
    /// `B·V·D` (or an index derived from it) does not fit the backend's index type.
    #[error("problem too large: {what}")]
    TooLarge {
        /// What overflowed.
        what: String,
    },
    /// The labels vector must have one entry per sample.
    #[error("labels have length {got}, expected B = {expected}")]
    LabelsLength {
        /// B.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// The explicit mask must be `[B, B]`.
    #[error("mask has shape {got:?}, expected [{expected}, {expected}]")]
    MaskShape {
        /// B.
        expected: usize,
        /// Shape given.
        got: [usize; 2],
    },
    /// Mask weights must be finite and ≥ 0.
    #[error("mask[{row}, {col}] = {value} is not a finite weight ≥ 0")]
    InvalidMaskWeight {
        /// Row (anchor sample).
        row: usize,
        /// Column (contrast sample).
        col: usize,
        /// The value.
        value: f32,
    },
    /// NaN or ±Inf in the features.
    #[error("features[{sample}, {view}, {dim}] is not finite")]
    NonFiniteFeature {
        /// Sample index b.
        sample: usize,
        /// View index v.
        view: usize,
        /// Feature index d.
        dim: usize,
    },
    /// `NoPositivePolicy::Error` and an anchor has no positive.
    #[error("anchor row {anchor} has no positive (NoPositivePolicy::Error)")]
    AnchorWithoutPositives {
        /// The flattened (view-major) anchor row.
        anchor: usize,
    },
    /// The upstream gradient does not match the reduction.
    #[error("upstream gradient does not fit reduction {reduction:?}: {reason}")]
    UpstreamMismatch {
        /// The loss's reduction.
        reduction: Reduction,
        /// Why.
        reason: String,
    },
    /// The upstream gradient holds NaN or ±Inf.
    #[error("upstream gradient is not finite")]
    NonFiniteUpstream,
    /// A saved forward state was handed to a backward call it does not belong to.
    #[error("saved state does not match this backward call: {0}")]
    StateMismatch(String),
    /// A device buffer handed to the CUDA backend does not fit the call: wrong length, or memory
    /// of another CUDA context.
    #[error("device buffer `{buffer}`: {reason}")]
    InvalidDeviceBuffer {
        /// Which argument (`features`, `labels`, `mask`, `grad`).
        buffer: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The backend does not implement this option or element type.
    #[error("backend `{backend}` does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The unsupported option.
        what: String,
    },
    /// No backend of that name (`reference`, `cpu`, `cuda`, `auto`).
    #[error("unknown backend `{0}` (expected reference, cpu, cuda or auto)")]
    UnknownBackend(String),
    /// The crate was built without the `cuda` feature.
    #[error("supcon was compiled without the `cuda` feature")]
    NotCompiledWithCuda,
    /// The CUDA kernels were not compiled (no nvcc at build time).
    #[error("the CUDA kernels were not built (nvcc was not found when supcon was compiled)")]
    KernelsNotBuilt,
    /// No CUDA driver library (libcuda) could be loaded.
    #[error("no CUDA driver (libcuda) found on this machine")]
    NoCudaDriver,
    /// The driver is present but there is no such device.
    #[error("no CUDA device with ordinal {ordinal} (found {count})")]
    NoCudaDevice {
        /// Ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// The kernels need compute capability 8.0 or newer.
    #[error("compute capability {major}.{minor} is below the required 8.0")]
    UnsupportedComputeCapability {
        /// Major.
        major: i32,
        /// Minor.
        minor: i32,
    },
    /// A CUDA driver call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
