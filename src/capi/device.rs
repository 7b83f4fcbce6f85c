//! The C ABI on device pointers: the CUDA backend's kernels queued on the caller's `CUstream`
//! (a trainer's own stream, e.g. `at::cuda::getCurrentCUDAStream()`), reading and writing
//! memory the caller allocated. Nothing is allocated, copied or awaited.
//!
//! 1. `supcon_device_layout` gives the bytes of the workspace (the loss, ℓ_i and the
//!    backward's O(N) statistics) and of the backward's scratch, and where the outputs lie in
//!    the workspace.
//! 2. `supcon_forward_device` queues the forward pass into the workspace.
//! 3. `supcon_backward_device` queues the backward pass from it, with the upstream gradient on
//!    the device, into a `float[B·V·D]` gradient.
//!
//! The handle must be of the CUDA backend; the stream must belong to the primary context of
//! GPU 0 (the one the CUDA runtime, and so PyTorch, uses), which the handle's backend uses.
//! Without feature `cuda` every function returns `SUPCON_NO_CUDA`.

use std::ffi::c_void;

use super::{guard, input, out, SupconHandle, SupconPositives};
use crate::BatchShape;

/// Where `supcon_forward_device` puts its outputs, and the buffers the passes need.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SupconDeviceLayout {
    /// Bytes of the workspace (256-byte aligned, as `cudaMalloc` gives).
    pub workspace_bytes: usize,
    /// Bytes of the backward pass's scratch.
    pub scratch_bytes: usize,
    /// Offset in the workspace of the loss (`double`: the reduced loss, Σℓ_i under reduction
    /// none).
    pub loss_offset: usize,
    /// Offset of ℓ_i (`float[anchors]`).
    pub per_anchor_offset: usize,
    /// Offset of the count of anchors without positives (`uint32_t`), which the caller reads
    /// under `SUPCON_NO_POSITIVE_ERROR` (the device pass does not stop on it).
    pub anchors_without_positives_offset: usize,
    /// R, the anchors: the length of ℓ_i and of the upstream gradient.
    pub anchors: usize,
}

/// The layout of the workspace and scratch for the handle's loss on a batch of `batch` ×
/// `views` × `dim` with `positives` (only its `kind` and `classes` are read).
///
/// # Safety
/// `handle` null or live; `positives` null or a `SupconPositives`; `layout` null or writable.
#[no_mangle]
pub unsafe extern "C" fn supcon_device_layout(
    handle: *const SupconHandle,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    layout: *mut SupconDeviceLayout,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null.
        let (handle, positives, layout) = unsafe {
            (
                input(handle, "handle")?,
                input(positives, "positives")?,
                out(layout, "layout")?,
            )
        };
        let shape = BatchShape::new(batch, views, dim)?;
        *layout = on_device::layout(handle, shape, positives)?;
        Ok(())
    })
}

/// Queues the forward pass on `stream` (a `CUstream`; null: the legacy default stream):
/// `features` (`B·V·D` elements of `dtype`: f32, f16 or bf16) and `positives` (whose `data` is
/// a device pointer) into `workspace` (`workspace_bytes` as `supcon_device_layout` says).
///
/// # Safety
/// `handle` null or live; `stream` a live stream of GPU 0's primary context; every device
/// pointer null or holding what its description says in that context, alive until the work
/// queued on `stream` is done.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn supcon_forward_device(
    handle: *const SupconHandle,
    stream: *mut c_void,
    features: *const c_void,
    dtype: u32,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    workspace: *mut c_void,
    workspace_bytes: usize,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null; the device pointers per this
        // function's contract.
        unsafe {
            let handle = input(handle, "handle")?;
            let workspace = (workspace, workspace_bytes);
            let buffers = Buffers::new(features, dtype, (batch, views, dim), positives, workspace)?;
            on_device::forward(handle, stream, &buffers)
        }
    })
}

/// Queues the backward pass on `stream` from a workspace that `supcon_forward_device` wrote for
/// the same features and positives: `upstream` (device, `double[anchors]`: R copies of the
/// scalar for a reduced loss), `scratch` (`scratch_bytes`), into `grad` (device,
/// `float[B·V·D]`).
///
/// # Safety
/// As `supcon_forward_device`, for every device pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn supcon_backward_device(
    handle: *const SupconHandle,
    stream: *mut c_void,
    features: *const c_void,
    dtype: u32,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    workspace: *const c_void,
    workspace_bytes: usize,
    upstream: *const f64,
    scratch: *mut c_void,
    scratch_bytes: usize,
    grad: *mut f32,
) -> i32 {
    guard(|| {
        // SAFETY: as in `supcon_forward_device`.
        unsafe {
            let handle = input(handle, "handle")?;
            let workspace = (workspace.cast_mut(), workspace_bytes);
            let buffers = Buffers::new(features, dtype, (batch, views, dim), positives, workspace)?;
            let backward = BackwardBuffers {
                upstream,
                scratch: (scratch, scratch_bytes),
                grad,
            };
            on_device::backward(handle, stream, &buffers, &backward)
        }
    })
}

/// A pass's features, positives and workspace, as the caller passed them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Buffers<'a> {
    features: *const c_void,
    dtype: u32,
    shape: BatchShape,
    positives: &'a SupconPositives,
    workspace: (*mut c_void, usize),
}

impl<'a> Buffers<'a> {
    /// # Safety
    /// `positives` is null or points to a `SupconPositives` alive for `'a`.
    unsafe fn new(
        features: *const c_void,
        dtype: u32,
        (batch, views, dim): (usize, usize, usize),
        positives: *const SupconPositives,
        workspace: (*mut c_void, usize),
    ) -> Result<Self, crate::Error> {
        Ok(Buffers {
            features,
            dtype,
            shape: BatchShape::new(batch, views, dim)?,
            // SAFETY: per this function's contract.
            positives: unsafe { input(positives, "positives")? },
            workspace,
        })
    }
}

/// The backward pass's other buffers.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BackwardBuffers {
    upstream: *const f64,
    scratch: (*mut c_void, usize),
    grad: *mut f32,
}

#[cfg(feature = "cuda")]
mod on_device {
    use std::ffi::c_void;
    use std::mem::ManuallyDrop;
    use std::sync::Arc;

    use cudarc::driver::{sys, CudaSlice, CudaStream, DeviceRepr};
    use half::{bf16, f16};

    use super::super::{
        invalid, SupconHandle, SupconPositives, SUPCON_BF16, SUPCON_F16, SUPCON_F32, SUPCON_F64,
        SUPCON_POSITIVES_LABELS, SUPCON_POSITIVES_LABEL_SETS, SUPCON_POSITIVES_MASK,
        SUPCON_POSITIVES_SIMCLR,
    };
    use super::{BackwardBuffers, Buffers, SupconDeviceLayout};
    use crate::cuda::{CudaBackend, CudaFeature, DevicePositives};
    use crate::{AnyBackend, BatchShape, Capability, DType, Error};

    pub(super) fn layout(
        handle: &SupconHandle,
        shape: BatchShape,
        positives: &SupconPositives,
    ) -> Result<SupconDeviceLayout, Error> {
        let classes = (positives.kind == SUPCON_POSITIVES_LABEL_SETS).then_some(positives.classes);
        let workspace = CudaBackend::workspace(&handle.loss, shape, classes)?;
        Ok(SupconDeviceLayout {
            workspace_bytes: workspace.bytes(),
            scratch_bytes: workspace.scratch_bytes(),
            loss_offset: workspace.loss_offset(),
            per_anchor_offset: workspace.per_anchor_offset(),
            anchors_without_positives_offset: workspace.anchors_without_positives_offset(),
            anchors: shape.anchors(handle.loss.contrast_mode()),
        })
    }

    /// The handle's backend on the caller's stream.
    ///
    /// # Safety
    /// `stream` is a live stream of the context of the handle's backend.
    unsafe fn backend(handle: &SupconHandle, stream: *mut c_void) -> Result<CudaBackend, Error> {
        let AnyBackend::Cuda(backend) = &handle.backend else {
            return Err(invalid(format!(
                "device pointers need a handle of SUPCON_BACKEND_CUDA; this one is {}",
                crate::Backend::name(&handle.backend)
            )));
        };
        // SAFETY: per this function's contract; the caller orders its own work with ours by
        // queueing both on this stream.
        let stream = unsafe {
            backend
                .context()
                .wrap_borrowed_stream(stream as sys::CUstream)
        };
        Ok(CudaBackend::from_stream(stream)?.with_precision(backend.precision()))
    }

    /// Device memory the caller owns, as a cudarc slice that is never freed.
    struct Borrowed<T: DeviceRepr>(ManuallyDrop<CudaSlice<T>>);

    impl<T: DeviceRepr> Borrowed<T> {
        /// # Safety
        /// `pointer` is null or addresses `len` values of `T` in device memory of `stream`'s
        /// context that stays allocated for the call.
        unsafe fn new(
            stream: &Arc<CudaStream>,
            pointer: *const c_void,
            len: usize,
            what: &str,
        ) -> Result<Self, Error> {
            if pointer.is_null() && len > 0 {
                return Err(invalid(format!("{what} is null")));
            }
            // SAFETY: per this function's contract.
            let slice = unsafe { stream.upgrade_device_ptr::<T>(pointer as u64, len) };
            Ok(Borrowed(ManuallyDrop::new(slice)))
        }
    }

    impl<T: DeviceRepr> Drop for Borrowed<T> {
        fn drop(&mut self) {
            // SAFETY: taken once, here; `leak` hands the allocation back without freeing it.
            let slice = unsafe { ManuallyDrop::take(&mut self.0) };
            slice.leak();
        }
    }

    /// The positives' device arrays.
    enum PositivesArrays {
        SimClr,
        Labels(Borrowed<i64>),
        Mask(Borrowed<f32>),
        LabelSets(Borrowed<u8>, usize, crate::LabelSetWeight),
    }

    impl PositivesArrays {
        /// # Safety
        /// `positives.data` as [`Borrowed::new`], for what its kind needs for `batch` samples.
        unsafe fn new(
            stream: &Arc<CudaStream>,
            positives: &SupconPositives,
            batch: usize,
        ) -> Result<Self, Error> {
            let data = positives.data;
            let cells = |columns: usize, what: &str| {
                batch
                    .checked_mul(columns)
                    .ok_or_else(|| invalid(format!("the {what} overflow")))
            };
            // SAFETY: per this function's contract.
            unsafe {
                Ok(match positives.kind {
                    SUPCON_POSITIVES_SIMCLR => PositivesArrays::SimClr,
                    SUPCON_POSITIVES_LABELS => {
                        PositivesArrays::Labels(Borrowed::new(stream, data, batch, "labels")?)
                    }
                    SUPCON_POSITIVES_MASK => PositivesArrays::Mask(Borrowed::new(
                        stream,
                        data,
                        cells(batch, "mask's B²")?,
                        "mask",
                    )?),
                    SUPCON_POSITIVES_LABEL_SETS => PositivesArrays::LabelSets(
                        Borrowed::new(
                            stream,
                            data,
                            cells(positives.classes, "label sets' B·K")?,
                            "label sets",
                        )?,
                        positives.classes,
                        super::super::set_weight(positives.set_weight)?,
                    ),
                    other => return Err(invalid(format!("unknown positives kind {other}"))),
                })
            }
        }

        fn with_view<R>(&self, body: impl FnOnce(DevicePositives<'_>) -> R) -> R {
            match self {
                PositivesArrays::SimClr => body(DevicePositives::SimClr),
                PositivesArrays::Labels(labels) => {
                    body(DevicePositives::Labels(&labels.0.as_view()))
                }
                PositivesArrays::Mask(mask) => body(DevicePositives::Mask(&mask.0.as_view())),
                PositivesArrays::LabelSets(sets, classes, weight) => {
                    body(DevicePositives::LabelSets {
                        memberships: &sets.0.as_view(),
                        classes: *classes,
                        weight: *weight,
                    })
                }
            }
        }
    }

    /// Runs `$body` with `$T` the element type of `$dtype`.
    macro_rules! with_dtype {
        ($dtype:expr, $T:ident => $body:expr) => {
            match $dtype {
                SUPCON_F32 => {
                    type $T = f32;
                    $body
                }
                SUPCON_F16 => {
                    type $T = f16;
                    $body
                }
                SUPCON_BF16 => {
                    type $T = bf16;
                    $body
                }
                SUPCON_F64 => Err(Error::Unsupported {
                    backend: "cuda",
                    capability: Capability::ElementType(DType::F64),
                }),
                other => Err(invalid(format!("unknown dtype {other}"))),
            }
        };
    }

    /// # Safety
    /// As `supcon_forward_device`.
    pub(super) unsafe fn forward(
        handle: &SupconHandle,
        stream: *mut c_void,
        buffers: &Buffers<'_>,
    ) -> Result<(), Error> {
        // SAFETY: per this function's contract.
        let backend = unsafe { backend(handle, stream)? };
        with_dtype!(buffers.dtype, T => unsafe { forward_as::<T>(handle, &backend, buffers) })
    }

    /// # Safety
    /// As `supcon_forward_device`.
    unsafe fn forward_as<T: CudaFeature>(
        handle: &SupconHandle,
        backend: &CudaBackend,
        buffers: &Buffers<'_>,
    ) -> Result<(), Error> {
        let stream = backend.stream();
        let shape = buffers.shape;
        // SAFETY: per this function's contract.
        let (features, positives, mut workspace) = unsafe {
            (
                Borrowed::<T>::new(stream, buffers.features, shape.elements(), "features")?,
                PositivesArrays::new(stream, buffers.positives, shape.batch())?,
                Borrowed::<u8>::new(
                    stream,
                    buffers.workspace.0,
                    buffers.workspace.1,
                    "workspace",
                )?,
            )
        };
        positives.with_view(|positives| {
            backend.forward_device_into(
                &handle.loss,
                &features.0.as_view(),
                shape,
                positives,
                &mut workspace.0.as_view_mut(),
            )
        })
    }

    /// # Safety
    /// As `supcon_backward_device`.
    pub(super) unsafe fn backward(
        handle: &SupconHandle,
        stream: *mut c_void,
        buffers: &Buffers<'_>,
        backward: &BackwardBuffers,
    ) -> Result<(), Error> {
        // SAFETY: per this function's contract.
        let backend = unsafe { backend(handle, stream)? };
        with_dtype!(buffers.dtype, T => unsafe {
            backward_as::<T>(handle, &backend, buffers, backward)
        })
    }

    /// # Safety
    /// As `supcon_backward_device`.
    unsafe fn backward_as<T: CudaFeature>(
        handle: &SupconHandle,
        backend: &CudaBackend,
        buffers: &Buffers<'_>,
        backward: &BackwardBuffers,
    ) -> Result<(), Error> {
        let stream = backend.stream();
        let shape = buffers.shape;
        let anchors = shape.anchors(handle.loss.contrast_mode());
        // SAFETY: per this function's contract.
        let (features, positives, workspace, upstream, mut scratch, mut grad) = unsafe {
            (
                Borrowed::<T>::new(stream, buffers.features, shape.elements(), "features")?,
                PositivesArrays::new(stream, buffers.positives, shape.batch())?,
                Borrowed::<u8>::new(
                    stream,
                    buffers.workspace.0,
                    buffers.workspace.1,
                    "workspace",
                )?,
                Borrowed::<f64>::new(stream, backward.upstream.cast(), anchors, "upstream")?,
                Borrowed::<u8>::new(stream, backward.scratch.0, backward.scratch.1, "scratch")?,
                Borrowed::<f32>::new(stream, backward.grad.cast(), shape.elements(), "grad")?,
            )
        };
        positives.with_view(|positives| {
            backend.backward_device_from(
                &handle.loss,
                &features.0.as_view(),
                shape,
                positives,
                &workspace.0.as_view(),
                &upstream.0.as_view(),
                &mut scratch.0.as_view_mut(),
                &mut grad.0.as_view_mut(),
            )
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod on_device {
    use std::ffi::c_void;

    use super::super::{SupconHandle, SupconPositives};
    use super::{BackwardBuffers, Buffers, SupconDeviceLayout};
    use crate::{BatchShape, Error};

    pub(super) fn layout(
        _: &SupconHandle,
        _: BatchShape,
        _: &SupconPositives,
    ) -> Result<SupconDeviceLayout, Error> {
        Err(Error::NotCompiledWithCuda)
    }

    /// # Safety
    /// Nothing: it reads nothing.
    pub(super) unsafe fn forward(
        _: &SupconHandle,
        _: *mut c_void,
        _: &Buffers<'_>,
    ) -> Result<(), Error> {
        Err(Error::NotCompiledWithCuda)
    }

    /// # Safety
    /// Nothing: it reads nothing.
    pub(super) unsafe fn backward(
        _: &SupconHandle,
        _: *mut c_void,
        _: &Buffers<'_>,
        _: &BackwardBuffers,
    ) -> Result<(), Error> {
        Err(Error::NotCompiledWithCuda)
    }
}
