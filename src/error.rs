//! The crate's one error type.

use crate::config::Reduction;
use crate::element::DType;

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
    /// A size exceeds what the crate or a backend can index or allocate.
    #[error("{extent} = {requested} exceeds the limit of {limit}")]
    TooLarge {
        /// What is too large.
        extent: Extent,
        /// Its size (saturated at `u128::MAX`).
        requested: u128,
        /// The largest size allowed.
        limit: u128,
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
    /// The label sets must be a `[B, K]` matrix, one row per sample.
    #[error("label sets have shape {got:?}, expected [{expected}, K]")]
    LabelSetsShape {
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
    /// A result is not finite although every input is valid: τ/τ_b or the upstream gradient
    /// scale it beyond the range of its floating-point type.
    #[error("the {output} overflows its floating-point type: τ/τ_b or the upstream gradient scale it beyond range")]
    Overflow {
        /// `"loss"` or `"gradient"`.
        output: &'static str,
    },
    /// A saved forward state was handed to a backward call it does not belong to.
    #[error("saved state does not match this backward call: {0}")]
    StateMismatch(String),
    /// A shard does not fit its batch: samples outside it, shards that overlap, or statistics
    /// of the wrong length (see [`crate::ShardStatistics`]).
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    /// An argument of the C ABI is invalid: a null pointer, an unknown enum value, a length
    /// that overflows (see `include/supcon.h`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A batch does not fit a memory bank: other views, dim or kind of positives than the
    /// bank holds, or a mask (which has no entries for the bank's rows).
    #[error("memory bank: {0}")]
    MemoryBank(String),
    /// A collective operation of a sharded loss failed, or the ranks disagree about the batch
    /// (views, dim, kind of positives, or a collective's length).
    #[error("collective `{operation}`: {reason}")]
    Collective {
        /// Which operation (`all_gather`, `all_reduce`) or check.
        operation: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A device buffer handed to the CUDA backend does not fit the call: wrong length, or memory
    /// of another CUDA context.
    #[error("device buffer `{buffer}`: {reason}")]
    InvalidDeviceBuffer {
        /// Which argument (`features`, `labels`, `mask`, `grad`).
        buffer: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The backend does not implement this option, element type or input range.
    #[error("backend `{backend}` does not support {capability}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What it does not support.
        capability: Capability,
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
    /// The CUDA driver is older than the kernels need.
    #[error(
        "the CUDA driver supports CUDA {}.{}; the kernels (built by nvcc 13.0) need a CUDA {}.{} \
         driver (release 580 or newer)",
        version / 1000, version % 1000 / 10, required / 1000, required % 1000 / 10
    )]
    DriverTooOld {
        /// The driver's API version, 1000·major + 10·minor (`cuDriverGetVersion`).
        version: i32,
        /// The oldest version that loads the kernels.
        required: i32,
    },
    /// Memory ran out (the device's for the CUDA backend, the host's for the others): the
    /// trainer may retry with a smaller batch.
    #[error("backend `{backend}` ran out of memory allocating {bytes} bytes")]
    OutOfMemory {
        /// The backend's name.
        backend: &'static str,
        /// The size of the allocation that failed.
        bytes: usize,
    },
    /// A CUDA driver call failed (or, for the emulated backend, its stand-in).
    #[error("CUDA error {name} ({code}) while {operation}")]
    Cuda {
        /// What the crate was doing.
        operation: String,
        /// The driver's `CUresult` code.
        code: i32,
        /// Its symbolic name (`CUDA_ERROR_LAUNCH_FAILED`, …).
        name: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A size that [`Error::TooLarge`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Extent {
    /// B·V·D, the elements of the features (and of the gradient).
    Elements,
    /// N = B·V, the flattened rows.
    Rows,
    /// D, the embedding width.
    Dim,
    /// Bytes of one allocation.
    Bytes,
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Extent::Elements => "B·V·D (feature elements)",
            Extent::Rows => "N = B·V (rows)",
            Extent::Dim => "D (embedding width)",
            Extent::Bytes => "an allocation in bytes",
        })
    }
}

/// What a backend may not support ([`Error::Unsupported`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Capability {
    /// Features of this element type (the kernels read f32, f16 and bf16: convert f64 to f32).
    ElementType(DType),
    /// Dot products or logits as large as `largest` = max(max‖z‖², max‖z‖²/τ), beyond the
    /// `limit` of the arithmetic the backend computes in.
    LogitRange {
        /// max(max_r ‖z_r‖², max_r ‖z_r‖²/τ) of the batch.
        largest: f64,
        /// The largest the backend accepts.
        limit: f64,
    },
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Capability::ElementType(dtype) => write!(f, "{dtype:?} features"),
            Capability::LogitRange { largest, limit } => write!(
                f,
                "dot products or logits up to {largest:e} (its arithmetic allows {limit:e})"
            ),
        }
    }
}
