//! The raw layer: every `unsafe` call into the CUDA driver (and cudarc) this backend makes, each
//! behind a function with a `# Safety` contract or a type that makes the call safe.
//!
//! cudarc loads libcuda lazily and *panics* when it is missing, or when a driver lacks an entry
//! point of the API version cudarc was built for. [`DriverLibrary`] is the proof that the
//! library is present: every driver query here takes one, and `CudaBackend`'s constructors check
//! the driver version with it before touching anything else.

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, PushKernelArg,
};

use crate::device::abi::{
    BackwardParams, CoefficientParams, FinalizeParams, ForwardParams, KernelParams,
    PositivesParams, RowScalesParams,
};
use crate::device::plan::LaunchConfig;

// SAFETY: each parameter block is `#[repr(C)]` and `Pod`, a field-for-field mirror of its C
// struct in kernels/supcon_params.h (fixed-width fields, explicit padding, layout pinned by a
// test), so its bytes are exactly what the kernels' by-value parameter expects.
unsafe impl DeviceRepr for ForwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for FinalizeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for CoefficientParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for BackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for PositivesParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for RowScalesParams {}

/// The CUDA driver library, known to be loadable (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverLibrary(());

impl DriverLibrary {
    /// `Some` when libcuda (nvcuda on Windows) can be loaded on this machine.
    pub(crate) fn find() -> Option<Self> {
        // SAFETY: only opens (and closes) the driver library to see that it exists; loading a
        // system library runs its initialisers, which is what any CUDA program does.
        unsafe { sys::is_culib_present() }.then_some(DriverLibrary(()))
    }

    /// The driver API version, 1000·major + 10·minor (13000 = CUDA 13.0). Valid before `cuInit`.
    pub(crate) fn version(self) -> Result<i32, DriverError> {
        let mut version = 0;
        // SAFETY: the library is present (`self`); `version` is a valid out-pointer and
        // `cuDriverGetVersion` exists in every driver release.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(version)
    }

    /// `cuInit`: idempotent; fails with `CUDA_ERROR_NO_DEVICE` on a machine without a GPU.
    pub(crate) fn init(self) -> Result<(), DriverError> {
        result::init()
    }

    /// The number of CUDA devices. Call [`init`](Self::init) first.
    pub(crate) fn device_count(self) -> Result<usize, DriverError> {
        // A negative count is impossible; read it as none.
        Ok(usize::try_from(result::device::get_count()?).unwrap_or(0))
    }
}

/// The first `len` elements of type `T` of a byte allocation (`None` if it is too small).
pub(crate) fn view_as<T: bytemuck::Pod>(
    bytes: &CudaSlice<u8>,
    len: usize,
) -> Option<CudaView<'_, T>> {
    // SAFETY: every bit pattern is a valid `T` (`Pod`), and a `CudaSlice` is a whole allocation,
    // which the driver aligns to at least 256 bytes; the length is checked by `transmute`.
    unsafe { bytes.transmute::<T>(len) }
}

/// Launches `function` on `stream` with `config` and the one by-value argument `params`.
///
/// # Safety
/// - `function` must be a SupCon kernel whose one parameter is a `P`, `config` from
///   `device::plan::launch_config` for that kernel's stage and the shape in `params`.
/// - Every address in `params` that the kernel reads or writes (kernels/supcon_params.h) must
///   point to device memory of `stream`'s context, at least as large as the kernel's accesses
///   for the shape in `params`, and stay allocated until the kernel has finished on `stream`.
/// - Nothing may read the buffers the kernel writes, or write the ones it reads, until it has
///   finished, except work ordered after it on `stream`.
pub(crate) unsafe fn launch<P: KernelParams>(
    stream: &CudaStream,
    function: &CudaFunction,
    config: LaunchConfig,
    params: &P,
) -> Result<(), DriverError> {
    let [gx, gy, gz] = config.grid;
    let [bx, by, bz] = config.block;
    let config = cudarc::driver::LaunchConfig {
        grid_dim: (gx, gy, gz),
        block_dim: (bx, by, bz),
        shared_mem_bytes: config.dynamic_shared_bytes,
    };
    let mut builder = stream.launch_builder(function);
    builder.arg(params);
    // SAFETY: this function's contract (argument types, addresses, lifetimes, ordering).
    unsafe { builder.launch(config) }.map(drop)
}
