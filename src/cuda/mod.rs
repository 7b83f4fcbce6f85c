//! The CUDA backend: the kernels of `kernels/` on an NVIDIA GPU, through cudarc.
//!
//! One module, two implementations: with feature `cuda`, [`CudaBackend`] runs the kernels
//! (compute capability ≥ 8.0, CUDA 13.0 driver ≥ 580, kernels built by nvcc at build time);
//! without it, a stand-in of the same name whose constructor returns
//! [`Error::NotCompiledWithCuda`](crate::Error::NotCompiledWithCuda). Nothing else in the crate
//! depends on the feature.
//!
//! Without a usable GPU the backend is never a panic: no driver library gives
//! [`Error::NoCudaDriver`](crate::Error::NoCudaDriver), no device
//! [`Error::NoCudaDevice`](crate::Error::NoCudaDevice), an older GPU
//! [`Error::UnsupportedComputeCapability`](crate::Error::UnsupportedComputeCapability), a build
//! without nvcc [`Error::KernelsNotBuilt`](crate::Error::KernelsNotBuilt).

#[cfg(not(feature = "cuda"))]
mod disabled;
#[cfg(feature = "cuda")]
mod enabled;

#[cfg(not(feature = "cuda"))]
pub use disabled::CudaBackend;
#[cfg(feature = "cuda")]
pub use enabled::{
    CudaBackend, CudaFeature, DeviceForward, DevicePositives, DeviceWorkspace,
    MIN_COMPUTE_CAPABILITY, MIN_DRIVER_VERSION,
};
#[cfg(feature = "nccl")]
pub use enabled::{NcclGroup, NcclId, ShardedDeviceForward};
