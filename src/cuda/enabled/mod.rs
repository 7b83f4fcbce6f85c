//! The CUDA backend, compiled with feature `cuda`. Layers, like cudarc's:
//!
//! - `raw`: the only unsafe driver calls and the kernel launch, each with its safety contract;
//! - `executor` (checked): kernels loaded once per context, and the executor that runs the
//!   crate's launch sequences on a stream, every call's result checked;
//! - `backend` (safe): [`CudaBackend`], the host API ([`crate::Backend`]) and the device API;
//! - `checks`: the decisions of backend creation as pure, unit-tested functions.

mod backend;
mod checks;
mod executor;
#[cfg(feature = "nccl")]
mod nccl;
mod raw;
#[cfg(feature = "nccl")]
mod sharded;

pub use backend::{CudaBackend, CudaFeature, DeviceForward, DevicePositives, DeviceWorkspace};
pub use checks::{MIN_COMPUTE_CAPABILITY, MIN_DRIVER_VERSION};
#[cfg(feature = "nccl")]
pub use nccl::{NcclGroup, NcclId};
#[cfg(feature = "nccl")]
pub use sharded::ShardedDeviceForward;
