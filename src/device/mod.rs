//! What runs the CUDA kernels of `kernels/`, for every executor: the emulated one here
//! (feature `emulation`) and the CUDA backend's (`crate::cuda`, feature `cuda`).
//!
//! - `abi`: the kernels' parameter blocks and option codes, mirrored from
//!   `kernels/supcon_params.h`;
//! - `plan`: grid, block and shared memory of every launch (the one place that knows the
//!   kernels' tile sizes);
//! - `kernel`: the entry points, their names, and the fatbins embedded at build time;
//! - `problem`: a loss and shape checked against what the kernels implement, as the parameter
//!   block;
//! - `executor`: [`executor::KernelExecutor`], what a device must offer (memory, copies,
//!   launches);
//! - `launch`: the launch sequences of both passes, written once;
//! - `host`: the host-array path ([`crate::Backend`]: upload, launch, download);
//! - `resident`: the device-resident path (the CUDA backend's device API);
//! - `positives`: that path's label sets and cap bounds, prepared on the device;
//! - `emulated`: [`EmulatedBackend`], the kernels compiled as C++ against a host emulation of
//!   the CUDA execution model, run on host memory.

pub(crate) mod abi;
#[cfg(feature = "emulation")]
pub(crate) mod emulated;
pub(crate) mod executor;
pub(crate) mod host;
pub(crate) mod kernel;
pub(crate) mod launch;
pub(crate) mod plan;
// The CUDA backend's device API; its tests run it through the emulation.
#[cfg(any(feature = "cuda", test))]
pub(crate) mod prepared;
pub(crate) mod problem;
// The CUDA backend's device API; its tests run it through the emulation.
#[cfg(any(feature = "cuda", test))]
pub(crate) mod resident;

#[cfg(feature = "emulation")]
pub use emulated::EmulatedBackend;
