#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod any_backend;
mod backend;
mod config;
mod cpu;
pub mod cuda;
mod element;
#[cfg(feature = "emulation")]
mod emulated;
mod error;
#[cfg(any(feature = "cuda", feature = "emulation"))]
mod kernel_abi;
#[cfg(any(feature = "cuda", feature = "emulation"))]
mod kernels;
#[cfg(any(feature = "cuda", feature = "emulation"))]
mod launch_plan;
mod problem;
pub mod reference;

pub use any_backend::AnyBackend;
pub use backend::{Backend, ForwardOutput, SavedState, Upstream};
pub use config::{
    ContrastMode, Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss,
    SupConLossBuilder,
};
pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
pub use element::{DType, Element, GradElement};
#[cfg(feature = "emulation")]
pub use emulated::EmulatedBackend;
pub use error::{Error, Result};
pub use problem::{validate_inputs, BatchShape, Positives};
pub use reference::ReferenceBackend;
