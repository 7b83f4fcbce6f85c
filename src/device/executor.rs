//! What the launch sequences need from a device: [`KernelExecutor`], implemented by the
//! emulated executor (`super::emulated`: host memory, the C++ emulation) and by the CUDA
//! backend (`crate::cuda`: cudarc on a stream).

use super::abi::KernelParams;
use super::kernel::Kernel;
use super::plan::LaunchConfig;
use crate::error::Result;

/// Device memory, copies and launches: what the launch sequences need from a device.
pub(crate) trait KernelExecutor {
    /// An owned device allocation, freed on drop.
    type Buffer;

    /// A buffer of `bytes` bytes with unspecified contents.
    fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer>;

    /// A buffer holding a copy of `bytes`.
    fn upload(&mut self, bytes: &[u8]) -> Result<Self::Buffer>;

    /// Copies the first `out.len()` bytes of `buffer` into `out`, after all launches so far.
    fn download(&mut self, buffer: &Self::Buffer, out: &mut [u8]) -> Result<()>;

    /// The address kernels see for `buffer`.
    fn address(&self, buffer: &Self::Buffer) -> u64;

    /// The most dynamic shared memory a launch of the tensor-core kernels may ask for.
    fn max_dynamic_shared_bytes(&self) -> u64;

    /// Launches `kernel` with `config` and `params`, the parameter block it takes
    /// ([`Kernel::params`]), asynchronously or not.
    ///
    /// # Safety
    /// Every address in `params` that `kernel` reads or writes (kernels/supcon_params.h) must be
    /// the [`address`](Self::address) of a live buffer of this executor, at least as large as
    /// the kernel's accesses for the shape in `params`, and must stay alive until the launch
    /// has completed (a later [`download`](Self::download) waits for it).
    unsafe fn launch<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        config: LaunchConfig,
        params: &P,
    ) -> Result<()>;
}

/// A buffer holding a copy of `values`.
pub(crate) fn upload_slice<E: KernelExecutor, T: bytemuck::Pod>(
    executor: &mut E,
    values: &[T],
) -> Result<E::Buffer> {
    executor.upload(bytemuck::cast_slice(values))
}

/// The first `len` values of type `T` of `buffer`, after all launches so far.
pub(crate) fn download_vec<E: KernelExecutor, T: bytemuck::Pod>(
    executor: &mut E,
    buffer: &E::Buffer,
    len: usize,
) -> Result<Vec<T>> {
    let mut values = vec![<T as bytemuck::Zeroable>::zeroed(); len];
    executor.download(buffer, bytemuck::cast_slice_mut(&mut values))?;
    Ok(values)
}
