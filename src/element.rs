//! Element types the features may have.

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f64 {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The element type of a feature buffer, as a tag (for messages and kernel selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary64 (reference precision).
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

/// A feature element type: `f64`, `f32`, [`half::f16`] or [`half::bf16`].
///
/// Every backend computes in at least f32; the gradient comes back as [`Element::Grad`]
/// (`f64` for `f64` features, `f32` otherwise).
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static
{
    /// The tag of this type.
    const DTYPE: DType;
    /// The gradient's element type.
    type Grad: GradElement;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Widening (exact for all but f64) to f32.
    fn to_f32(self) -> f32;
    /// Rounds an f64 to this type (round to nearest even).
    fn from_f64(value: f64) -> Self;
}

/// The gradient's element type: `f32` or `f64`.
pub trait GradElement: sealed::Sealed + Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Rounds an f64.
    fn from_f64(value: f64) -> Self;
    /// Converts an f32 (exact).
    fn from_f32(value: f32) -> Self;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    type Grad = f64;
    fn to_f64(self) -> f64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f64(value: f64) -> Self {
        value
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    type Grad = f32;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    type Grad = f32;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f64(value: f64) -> Self {
        f16::from_f64(value)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    type Grad = f32;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f64(value: f64) -> Self {
        bf16::from_f64(value)
    }
}

impl GradElement for f64 {
    fn from_f64(value: f64) -> Self {
        value
    }
    fn from_f32(value: f32) -> Self {
        f64::from(value)
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl GradElement for f32 {
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn from_f32(value: f32) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}
