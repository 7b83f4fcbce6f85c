//! The checked layer: the kernels, loaded once per CUDA context, and [`StreamExecutor`], which
//! runs the crate's launch sequences on a stream with every allocation, copy and launch checked
//! and turned into a typed [`Error`].

use std::sync::{Arc, Mutex, PoisonError, Weak};

use cudarc::driver::result::DriverError;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
};
use cudarc::nvrtc::Ptx;

use super::raw;
use crate::device::abi::KernelParams;
use crate::device::executor::KernelExecutor;
use crate::device::kernel::{fatbin, Kernel};
use crate::device::plan::LaunchConfig;
use crate::error::{Error, Result};

/// [`Error::Cuda`] for a failed driver call while doing `operation`: the driver's code and its
/// symbolic name (the `CUresult` variant; formatting the error's message would ask the driver
/// again, which a missing or broken driver cannot answer).
pub(crate) fn driver_error(operation: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |error| Error::Cuda {
        operation: operation.to_string(),
        code: error.0 as i32,
        name: format!("{:?}", error.0),
    }
}

/// [`Error::OutOfMemory`] for an allocation of `bytes` that failed for lack of memory, else
/// [`driver_error`].
pub(crate) fn allocation_error(
    bytes: usize,
    operation: impl std::fmt::Display,
) -> impl FnOnce(DriverError) -> Error {
    move |error| {
        if error.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory {
                backend: "cuda",
                bytes,
            }
        } else {
            driver_error(operation)(error)
        }
    }
}

/// The SupCon kernels loaded into one CUDA context.
#[derive(Debug)]
pub(crate) struct LoadedKernels {
    /// In [`Kernel::ALL`] order (all resolved when a context's kernels are loaded, so a
    /// missing one fails backend creation rather than a later call); each function keeps its
    /// module loaded.
    functions: Vec<(Kernel, CudaFunction)>,
    /// The dynamic shared memory every tensor-core kernel may use on this device: the opt-in
    /// maximum per block less the kernel's static shared memory (the smallest over them).
    max_dynamic_shared_bytes: u64,
}

impl LoadedKernels {
    /// The kernels of `context`: loaded on first use, then shared by every backend on that
    /// context for as long as one of them lives.
    ///
    /// The cache holds weak references, so dropping the last backend unloads the modules and
    /// lets the context go. It is keyed by the driver's context handle: all `CudaContext`s of a
    /// device's primary context share one entry, and a live entry keeps its context retained,
    /// so the handle of a live entry is never reused by another context.
    pub(crate) fn for_context(context: &Arc<CudaContext>) -> Result<Arc<Self>> {
        static LOADED: Mutex<Vec<(usize, Weak<LoadedKernels>)>> = Mutex::new(Vec::new());
        let key = context.cu_ctx() as usize;
        // A panic elsewhere while holding the lock leaves the list valid: keep using it.
        let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.retain(|(_, kernels)| kernels.strong_count() > 0);
        if let Some(kernels) = loaded
            .iter()
            .filter(|(handle, _)| *handle == key)
            .find_map(|(_, kernels)| kernels.upgrade())
        {
            return Ok(kernels);
        }
        let kernels = Arc::new(Self::load(context)?);
        loaded.push((key, Arc::downgrade(&kernels)));
        Ok(kernels)
    }

    /// Loads every fatbin once and resolves every entry point.
    fn load(context: &Arc<CudaContext>) -> Result<Self> {
        let mut modules: Vec<(&'static [u8], Arc<CudaModule>)> = Vec::new();
        let mut functions = Vec::with_capacity(Kernel::ALL.len());
        for kernel in Kernel::ALL {
            let image = fatbin(kernel)?;
            let module = match modules
                .iter()
                .find(|(loaded, _)| std::ptr::eq(*loaded, image))
            {
                Some((_, module)) => module.clone(),
                None => {
                    let module = context
                        .load_module(Ptx::from_binary(image.to_vec()))
                        .map_err(driver_error(format_args!(
                            "loading the module of {}",
                            kernel.name()
                        )))?;
                    modules.push((image, module.clone()));
                    module
                }
            };
            let function = module
                .load_function(kernel.name())
                .map_err(driver_error(format_args!("resolving {}", kernel.name())))?;
            functions.push((kernel, function));
        }
        let opt_in = context
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(driver_error("reading the shared memory per block"))?;
        let mut max_dynamic_shared_bytes = u64::MAX;
        for (kernel, function) in &functions {
            if !matches!(kernel, Kernel::MmaForward(_) | Kernel::MmaBackward { .. }) {
                continue;
            }
            let what = |action| format!("{action} of {}", kernel.name());
            let fixed = function
                .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(driver_error(what("reading the static shared memory")))?;
            let dynamic = (opt_in - fixed).max(0);
            // Above 48 KiB a launch needs the kernel's consent (the opt-in attribute).
            function
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic,
                )
                .map_err(driver_error(what("allowing the dynamic shared memory")))?;
            max_dynamic_shared_bytes = max_dynamic_shared_bytes.min(dynamic as u64);
        }
        Ok(LoadedKernels {
            functions,
            max_dynamic_shared_bytes,
        })
    }

    fn function(&self, kernel: Kernel) -> Result<&CudaFunction> {
        self.functions
            .iter()
            .find_map(|(k, function)| (*k == kernel).then_some(function))
            .ok_or_else(|| Error::Cuda {
                operation: format!("looking up {}", kernel.name()),
                code: sys::CUresult::CUDA_ERROR_NOT_FOUND as i32,
                name: format!("{:?}", sys::CUresult::CUDA_ERROR_NOT_FOUND),
            })
    }
}

/// Runs launch sequences on one stream. Buffers are stream-ordered allocations of that stream
/// (freed in stream order on drop); downloads synchronise the stream.
pub(crate) struct StreamExecutor<'a> {
    stream: &'a Arc<CudaStream>,
    kernels: &'a LoadedKernels,
}

impl<'a> StreamExecutor<'a> {
    pub(crate) fn new(stream: &'a Arc<CudaStream>, kernels: &'a LoadedKernels) -> Self {
        StreamExecutor { stream, kernels }
    }

    /// Surfaces an error cudarc recorded asynchronously (event bookkeeping, frees).
    fn check_recorded(&self, what: &str) -> Result<()> {
        self.stream
            .context()
            .check_err()
            .map_err(driver_error(what))
    }
}

impl KernelExecutor for StreamExecutor<'_> {
    type Buffer = CudaSlice<u8>;

    /// Zero-filled rather than uninitialised: a kernel bug then reads zeros, never stale data,
    /// and the fill costs one memset of at most the gradient's size.
    fn alloc(&mut self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(bytes)
            .map_err(allocation_error(
                bytes,
                format_args!("allocating {bytes} bytes"),
            ))
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream.clone_htod(bytes).map_err(allocation_error(
            bytes.len(),
            format_args!("copying {} bytes to the device", bytes.len()),
        ))
    }

    fn download(&mut self, buffer: &CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
        let source = buffer.try_slice(..out.len()).ok_or_else(|| {
            driver_error(format_args!(
                "copying {} bytes from a {}-byte buffer",
                out.len(),
                buffer.len()
            ))(DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE))
        })?;
        self.stream
            .memcpy_dtoh(&source, out)
            .map_err(driver_error("copying from the device"))?;
        // The copy into pageable memory is complete on return; the synchronisation makes that
        // explicit and reports errors of the kernels queued before it.
        self.stream
            .synchronize()
            .map_err(driver_error("running the SupCon kernels"))?;
        self.check_recorded("after a device-to-host copy")
    }

    fn address(&self, buffer: &CudaSlice<u8>) -> u64 {
        // Our buffers live on `self.stream` only, so the read event the guard records is not
        // needed for ordering.
        let (address, _record) = buffer.device_ptr(self.stream);
        address
    }

    fn max_dynamic_shared_bytes(&self) -> u64 {
        self.kernels.max_dynamic_shared_bytes
    }

    unsafe fn launch<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        config: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let function = self.kernels.function(kernel)?;
        // SAFETY: `function` is `kernel`'s entry point; the caller guarantees the addresses in
        // `params` (KernelExecutor::launch), and every buffer of this executor is in the
        // stream's context and freed in stream order, after the launch.
        unsafe { raw::launch(self.stream, function, config, params) }
            .map_err(driver_error(format_args!("launching {}", kernel.name())))?;
        self.check_recorded(kernel.name())
    }
}
