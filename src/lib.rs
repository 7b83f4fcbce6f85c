#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod alloc;
mod any_backend;
mod backend;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "capi")]
pub mod capi;
mod config;
mod cpu;
pub mod cuda;
#[cfg(any(feature = "cuda", feature = "emulation"))]
mod device;
pub mod distributed;
mod element;
mod error;
mod inputs;
mod label_sets;
mod math;
mod memory_bank;
mod normalize;
mod precision;
pub mod reference;
mod shard;

pub use any_backend::AnyBackend;
pub use backend::{Backend, ForwardOutput, SavedState, Upstream};
pub use config::{
    ContrastMode, Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss,
    SupConLossBuilder,
};
pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
#[cfg(feature = "emulation")]
pub use device::EmulatedBackend;
pub use element::{DType, Element, GradElement};
pub use error::{Capability, Error, Extent, Result};
pub use inputs::{BatchShape, Positives};
pub use label_sets::LabelSetWeight;
pub use memory_bank::{BankForward, MemoryBank};
pub use precision::Precision;
pub use reference::ReferenceBackend;
pub use shard::ShardStatistics;
