//! The safe layer: [`CudaBackend`] and its device API.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{
    sys, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, DeviceSlice, SyncOnDrop,
};
use half::{bf16, f16};
use ndarray::{Array3, ArrayView3};

use super::checks::{
    check_compute_capability, check_device_ordinal, check_driver_version, check_kernels_built,
};
use super::executor::{allocation_error, driver_error, LoadedKernels, StreamExecutor};
use super::raw::{self, DriverLibrary};
use crate::backend::{Backend, ForwardOutput, SavedState, Upstream};
use crate::config::SupConLoss;
use crate::device::launch::{self, WorkspaceLayout};
use crate::device::prepared::{PreparedLayout, ResidentPositives};
use crate::device::problem::{PositiveAddresses, Problem};
use crate::device::resident::{ResidentForward, ResidentWorkspace};
use crate::device::{host, resident};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::inputs::{BatchShape, Positives};
use crate::label_sets::LabelSetWeight;
use crate::precision::Precision;
use crate::shard::ShardStatistics;

const NAME: &str = "cuda";

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A feature element type the CUDA kernels read from device memory: `f32`, [`half::f16`] or
/// [`half::bf16`]. (The host API, [`Backend`], also takes these; it rejects f64.)
pub trait CudaFeature: Element + DeviceRepr + sealed::Sealed {}
impl CudaFeature for f32 {}
impl CudaFeature for f16 {}
impl CudaFeature for bf16 {}

/// What makes two rows positives, for the device API (see [`Positives`]).
#[derive(Debug, Clone, Copy)]
pub enum DevicePositives<'a> {
    /// SimCLR: only the other views of the same sample.
    SimClr,
    /// `[B]` labels, one per sample.
    Labels(&'a CudaView<'a, i64>),
    /// `[B, B]` weights, row-major, finite and ≥ 0 (not checked on the device: a negative or
    /// NaN weight gives a meaningless loss rather than an error).
    Mask(&'a CudaView<'a, f32>),
    /// Label sets: a `[B, classes]` multi-hot matrix of bytes, row-major, a nonzero byte
    /// making label k a member of sample b's set (a `bool` tensor's layout), weighed by
    /// `weight` (see [`Positives::LabelSets`]). The forward pass packs them into bitsets on
    /// the device; the backward pass reads those and not the matrix again.
    LabelSets {
        /// `[B, classes]` bytes, nonzero: a member.
        memberships: &'a CudaView<'a, u8>,
        /// K, the labels of the multi-hot rows.
        classes: usize,
        /// How the overlap of two sets weighs.
        weight: LabelSetWeight,
    },
}

impl DevicePositives<'_> {
    /// K for label sets, else `None`: what the layout of a workspace
    /// ([`CudaBackend::workspace`]) depends on.
    pub fn label_set_classes(&self) -> Option<usize> {
        match *self {
            DevicePositives::LabelSets { classes, .. } => Some(classes),
            _ => None,
        }
    }
}

/// The SupCon loss on an NVIDIA GPU (compute capability 8.0 or newer, CUDA 13.0 driver).
///
/// All work runs on one CUDA stream: a new stream of the device or context it was created
/// from, or the caller's own ([`from_stream`](Self::from_stream)), so the loss slots into a
/// training step without extra synchronisation. Kernels are loaded once per context and shared
/// by every backend on it. Cloning is cheap (two `Arc`s) and keeps the stream.
///
/// Two APIs:
/// - [`Backend`] (host arrays): copies the inputs in and the results out, synchronising.
/// - the device API: features and positives as [`CudaView`]s, the loss left on the device
///   ([`forward_device`](Self::forward_device) → [`DeviceForward`]), the gradient into a
///   [`CudaViewMut`] or a new [`CudaSlice`] ([`backward_device_into`](Self::backward_device_into),
///   [`backward_device`](Self::backward_device)).
///
/// Shapes and options are validated on the host before anything is launched. Not supported
/// (→ [`Error::Unsupported`]): `normalize` and f64 features. Label sets and a positives cap
/// are prepared on the device (`kernels/supcon_positives.cu`), so the device API reads no
/// positive back either.
/// On the device API, NaN/Inf features are not detected (they propagate to the loss).
///
/// A training step on the trainer's stream:
///
/// ```no_run
/// use cudarc::driver::CudaContext;
/// use supcon::cuda::DevicePositives;
/// use supcon::{BatchShape, CudaBackend, SupConLoss, Upstream};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let stream = CudaContext::new(0)?.new_stream()?; // the trainer's stream
/// let cuda = CudaBackend::from_stream(stream.clone())?;
/// let shape = BatchShape::new(256, 2, 128)?;
/// // [B, V, D] embeddings and [B] labels, as the model wrote them on `stream`.
/// let features = stream.alloc_zeros::<half::bf16>(256 * 2 * 128)?;
/// let labels = stream.alloc_zeros::<i64>(256)?;
/// let (features, labels) = (features.as_view(), labels.as_view());
/// let positives = DevicePositives::Labels(&labels);
///
/// let forward = cuda.forward_device(&SupConLoss::default(), &features, shape, positives)?;
/// let grad = cuda.backward_device(&forward, &features, positives, Upstream::Scalar(1.0))?;
/// let loss = forward.loss(); // a device scalar: no synchronisation
/// println!("loss = {:?}", forward.loss_host()?); // synchronises
/// # let _ = (grad, loss);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Arc<LoadedKernels>,
    precision: Precision,
}

/// The driver library, checked to speak the API version the kernels and cudarc need.
fn usable_driver() -> Result<DriverLibrary> {
    let driver = DriverLibrary::find().ok_or(Error::NoCudaDriver)?;
    check_driver_version(driver.version().map_err(version_error)?)?;
    Ok(driver)
}

/// The error of a failed `cuDriverGetVersion`: the toolkit's link stub (`stubs/libcuda.so`,
/// found where no driver is installed) is no driver.
fn version_error(error: DriverError) -> Error {
    if error.0 == sys::CUresult::CUDA_ERROR_STUB_LIBRARY {
        Error::NoCudaDriver
    } else {
        driver_error("cuDriverGetVersion")(error)
    }
}

/// The error of a failed `cuInit` for device `ordinal`: no device is a typed error of its own.
fn init_error(ordinal: usize, error: DriverError) -> Error {
    if error.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE {
        Error::NoCudaDevice { ordinal, count: 0 }
    } else {
        driver_error("cuInit")(error)
    }
}

impl CudaBackend {
    /// A backend on a new stream of device `ordinal`'s primary context.
    ///
    /// # Errors
    /// [`Error::NoCudaDriver`] (no libcuda), [`Error::DriverTooOld`] (older than CUDA 13.0),
    /// [`Error::NoCudaDevice`], [`Error::UnsupportedComputeCapability`] (below 8.0),
    /// [`Error::KernelsNotBuilt`] (nvcc was missing when supcon was built), [`Error::Cuda`] (a
    /// driver call failed).
    pub fn new(ordinal: usize) -> Result<Self> {
        let driver = usable_driver()?;
        driver.init().map_err(|e| init_error(ordinal, e))?;
        let count = driver
            .device_count()
            .map_err(driver_error("cuDeviceGetCount"))?;
        check_device_ordinal(ordinal, count)?;
        let context = CudaContext::new(ordinal).map_err(driver_error(format_args!(
            "creating a context on device {ordinal}"
        )))?;
        Self::from_context(context)
    }

    /// A backend on a new stream of the caller's context.
    ///
    /// # Errors
    /// As [`new`](Self::new), less the device lookup.
    pub fn from_context(context: Arc<CudaContext>) -> Result<Self> {
        usable_driver()?;
        let stream = context
            .new_stream()
            .map_err(driver_error("creating a stream"))?;
        Self::from_stream(stream)
    }

    /// A backend that queues all its work on the caller's `stream`.
    ///
    /// # Errors
    /// As [`from_context`](Self::from_context).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        usable_driver()?;
        let context = stream.context();
        let (major, minor) = context
            .compute_capability()
            .map_err(driver_error("reading the compute capability"))?;
        check_compute_capability(major, minor)?;
        check_kernels_built(cfg!(supcon_kernels_built))?;
        let kernels = LoadedKernels::for_context(context)?;
        Ok(CudaBackend {
            stream,
            kernels,
            precision: Precision::Auto,
        })
    }

    /// The same backend running the kernels of `precision` (default [`Precision::Auto`]:
    /// tensor cores for f16 and bf16 features).
    pub fn with_precision(self, precision: Precision) -> Self {
        CudaBackend { precision, ..self }
    }

    /// Which kernels it runs.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context of the stream.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    fn executor(&self) -> StreamExecutor<'_> {
        StreamExecutor::new(&self.stream, &self.kernels)
    }

    /// Queues the forward pass on device-resident inputs; nothing is copied or awaited.
    ///
    /// `features` holds `[B, V, D]` (`shape`) row-major, contiguous. The result keeps the loss
    /// and the per-anchor losses on the device, plus the O(N) state of the backward pass.
    ///
    /// # Errors
    /// Shape and option errors as [`Backend::forward`] (checked before any launch),
    /// [`Error::InvalidDeviceBuffer`] (a buffer of the wrong length or of another context),
    /// [`Error::OutOfMemory`], [`Error::Cuda`] (a failed launch or allocation).
    pub fn forward_device<T: CudaFeature>(
        &self,
        loss: &SupConLoss,
        features: &CudaView<'_, T>,
        shape: BatchShape,
        positives: DevicePositives<'_>,
    ) -> Result<DeviceForward> {
        let problem = Problem::new(NAME, loss, shape, T::DTYPE, self.precision)?;
        let bound = self.bind_inputs(shape, features, positives)?;
        let mut executor = self.executor();
        // SAFETY: `bind_inputs` checked that the features hold B·V·D elements of T and the
        // labels B i64 / the mask B·B f32 / the label sets B·K bytes in this stream's context;
        // the views borrow them for this call, and their guards (dropped after the launches)
        // make later work on other streams wait for the kernels (cudarc's event tracking).
        let mut resident = unsafe {
            resident::forward(&mut executor, &problem, bound.features, &bound.positives)?
        };
        drop(bound);
        record_writes(&mut resident, &self.stream);
        Ok(DeviceForward {
            backend: self.clone(),
            problem,
            resident,
        })
    }

    /// Queues the backward pass and writes `∂(objective)/∂features` (`[B, V, D]`, f32) into
    /// `grad`.
    ///
    /// `features` and `positives` must be those of `forward`; `upstream` is host data (a
    /// scalar, or R values for `Reduction::None`, uploaded). Everything is queued: the
    /// per-anchor coefficients come from a kernel reading the forward's statistics on the
    /// device, so nothing synchronises — except under `NoPositivePolicy::Error`, whose error
    /// needs the count of anchors without positives on the host (one synchronisation).
    ///
    /// # Errors
    /// As [`forward_device`](Self::forward_device); [`Error::StateMismatch`] (`forward` came
    /// from other features or another context), upstream errors as [`Backend::backward`],
    /// [`Error::AnchorWithoutPositives`] under `NoPositivePolicy::Error`.
    pub fn backward_device_into<T: CudaFeature>(
        &self,
        forward: &DeviceForward,
        features: &CudaView<'_, T>,
        positives: DevicePositives<'_>,
        upstream: Upstream<'_>,
        grad: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let problem = forward.problem_for::<T>(self)?;
        let shape = problem.shape();
        let bound = self.bind_inputs(shape, features, positives)?;
        let inputs = forward.resident.inputs(
            &self.executor(),
            &problem,
            bound.features,
            &bound.positives,
        )?;
        self.check_buffer("grad", grad.len(), grad.stream(), shape.elements())?;
        let (grad_address, grad_guard) = grad.device_ptr_mut(&self.stream);
        let mut executor = self.executor();
        // SAFETY: inputs as in `forward_device`; `grad` holds B·V·D f32 of this context
        // (checked) and is borrowed mutably for this call, its guard recording the write after
        // the launch; the statistics belong to this problem (`problem_for`).
        unsafe {
            resident::backward(
                &mut executor,
                &problem,
                &inputs,
                &forward.resident.statistics,
                upstream,
                grad_address,
            )?;
        }
        drop(grad_guard);
        drop(bound);
        Ok(())
    }

    /// [`backward_device_into`](Self::backward_device_into) into a new buffer on this
    /// backend's stream.
    ///
    /// # Errors
    /// As [`backward_device_into`](Self::backward_device_into).
    pub fn backward_device<T: CudaFeature>(
        &self,
        forward: &DeviceForward,
        features: &CudaView<'_, T>,
        positives: DevicePositives<'_>,
        upstream: Upstream<'_>,
    ) -> Result<CudaSlice<f32>> {
        let elements = forward.problem.shape().elements();
        let mut grad = self
            .stream
            .alloc_zeros::<f32>(elements)
            .map_err(allocation_error(
                elements * size_of::<f32>(),
                format_args!("allocating {elements} f32"),
            ))?;
        self.backward_device_into(
            forward,
            features,
            positives,
            upstream,
            &mut grad.as_view_mut(),
        )?;
        Ok(grad)
    }

    /// The layout of the workspace that [`forward_device_into`](Self::forward_device_into)
    /// writes for `loss` on a batch of `shape`, with label sets of K = `label_set_classes`
    /// labels or (`None`) other positives
    /// ([`DevicePositives::label_set_classes`]), and of the backward's scratch. The workspace
    /// holds the positives the forward prepares on the device (packed label sets, cap bounds).
    ///
    /// # Errors
    /// [`Error::TooLarge`] for label sets of more than `u32::MAX` labels.
    pub fn workspace(
        loss: &SupConLoss,
        shape: BatchShape,
        label_set_classes: Option<usize>,
    ) -> Result<DeviceWorkspace> {
        let set_classes = label_set_classes.map(PreparedLayout::classes).transpose()?;
        Ok(DeviceWorkspace {
            layout: ResidentWorkspace::new(loss, shape, set_classes),
            anchors: shape.anchors(loss.contrast_mode()),
        })
    }

    /// Queues the forward pass into memory the caller owns (a framework's allocator): the
    /// loss, the per-anchor losses and the backward's statistics go into `workspace`, laid out
    /// as [`workspace`](Self::workspace) describes. Nothing is allocated, copied or awaited,
    /// and nothing is checked on the device (NaN features reach the loss; under
    /// `NoPositivePolicy::Error` the caller reads the count of anchors without positives at
    /// [`DeviceWorkspace::anchors_without_positives_offset`]).
    ///
    /// # Errors
    /// As [`forward_device`](Self::forward_device); [`Error::InvalidDeviceBuffer`] for a
    /// workspace of another length or context, or not 256-byte aligned.
    pub fn forward_device_into<T: CudaFeature>(
        &self,
        loss: &SupConLoss,
        features: &CudaView<'_, T>,
        shape: BatchShape,
        positives: DevicePositives<'_>,
        workspace: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        let samples = 0..shape.batch();
        self.forward_shard_device_into(loss, features, shape, positives, samples, workspace)?;
        self.finalize_device(loss, shape, positives.label_set_classes(), workspace)
    }

    /// Queues the backward pass from a `workspace` that
    /// [`forward_device_into`](Self::forward_device_into) wrote for the same `loss`, shape,
    /// features and positives, with the upstream gradient on the device (`upstream`: R values,
    /// R copies of the scalar for a reduced loss), `scratch` for the per-anchor coefficients
    /// ([`DeviceWorkspace::scratch_bytes`]), writing `∂(objective)/∂features` (`[B, V, D]`,
    /// f32) into `grad`. Nothing is allocated, copied or awaited.
    ///
    /// # Errors
    /// As [`forward_device_into`](Self::forward_device_into), for every buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_device_from<T: CudaFeature>(
        &self,
        loss: &SupConLoss,
        features: &CudaView<'_, T>,
        shape: BatchShape,
        positives: DevicePositives<'_>,
        workspace: &CudaView<'_, u8>,
        upstream: &CudaView<'_, f64>,
        scratch: &mut CudaViewMut<'_, u8>,
        grad: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let samples = 0..shape.batch();
        self.backward_shard_device_from(
            loss, features, shape, positives, samples, workspace, upstream, scratch, grad,
        )
    }

    /// [`forward_device_into`](Self::forward_device_into) for one shard of the batch, the
    /// samples `samples` (a non-empty run of `0..B`; `crate::shard` in the docs of the
    /// sharded loss): the positives are prepared for the whole batch, and the statistics
    /// kernel runs over the shard's anchors only (anchor i = v·B + b for b in the run, each
    /// anchor view v), writing their entries of the workspace's per-anchor statistics
    /// ([`DeviceWorkspace::statistics_offset`]) bit for bit as the whole pass does, and
    /// nothing else: no loss is reduced.
    ///
    /// A sharded loss runs it on the whole batch gathered on every rank, each rank for its own
    /// samples; copies every rank's entries of the nine statistics into every other rank's
    /// workspace (a collective: NCCL, `torch.distributed`); then reduces the loss with
    /// [`finalize_device`](Self::finalize_device) and takes its own rows of the gradient with
    /// [`backward_shard_device_from`](Self::backward_shard_device_from). Every rank's
    /// workspace then holds the whole pass's bytes.
    ///
    /// # Errors
    /// As [`forward_device_into`](Self::forward_device_into); [`Error::InvalidShard`] for
    /// an empty run or one past the batch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_shard_device_into<T: CudaFeature>(
        &self,
        loss: &SupConLoss,
        features: &CudaView<'_, T>,
        shape: BatchShape,
        positives: DevicePositives<'_>,
        samples: Range<usize>,
        workspace: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        let problem = Problem::new(NAME, loss, shape, T::DTYPE, self.precision)?;
        let layout = Self::workspace(loss, shape, positives.label_set_classes())?;
        let bound = self.bind_inputs(shape, features, positives)?;
        let (base, guard) = self.bind_workspace("workspace", workspace, layout.bytes())?;
        let mut executor = self.executor();
        // SAFETY: the inputs as in `forward_device`; the workspace holds the layout's bytes of
        // this context (checked), 256-byte aligned (checked), borrowed mutably for this call,
        // its guard recording the kernels' writes.
        unsafe {
            resident::forward_shard_into(
                &mut executor,
                &problem,
                bound.features,
                &bound.positives,
                base,
                samples,
            )?;
        }
        drop(guard);
        drop(bound);
        Ok(())
    }

    /// Queues the forward pass's last kernel on a workspace whose per-anchor statistics are
    /// all written (by [`forward_shard_device_into`](Self::forward_shard_device_into) on
    /// every shard, gathered): the reduced loss and the count of anchors without positives,
    /// as [`forward_device_into`](Self::forward_device_into) ends. Deterministic: every rank
    /// of a sharded loss reduces the same bits.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceBuffer`] for a workspace of another length or context, or not
    /// 256-byte aligned; option and shape errors as [`Backend::forward`].
    pub fn finalize_device(
        &self,
        loss: &SupConLoss,
        shape: BatchShape,
        label_set_classes: Option<usize>,
        workspace: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        // The kernel reads no feature: any element type gives the same problem here.
        let problem = Problem::new(NAME, loss, shape, crate::DType::F32, self.precision)?;
        let layout = Self::workspace(loss, shape, label_set_classes)?;
        let set_classes = label_set_classes.map(PreparedLayout::classes).transpose()?;
        let (base, guard) = self.bind_workspace("workspace", workspace, layout.bytes())?;
        // SAFETY: the workspace holds the layout's bytes of this context (checked), 256-byte
        // aligned (checked), borrowed mutably for this call; its statistics are the caller's
        // to have written (documented).
        unsafe {
            resident::finalize_into(&mut self.executor(), &problem, set_classes, base)?;
        }
        drop(guard);
        Ok(())
    }

    /// [`backward_device_from`](Self::backward_device_from) for the rows of one shard's
    /// samples `samples`: from a workspace holding every anchor's statistics and the reduced
    /// loss ([`finalize_device`](Self::finalize_device)) and the upstream gradient of every
    /// anchor (`upstream`, R doubles), it writes `∂(objective)/∂features` of the shard's
    /// samples, `[b1 − b0, V, D]` f32, into `grad`: bit for bit those rows of the whole
    /// pass's gradient.
    ///
    /// # Errors
    /// As [`backward_device_from`](Self::backward_device_from); [`Error::InvalidShard`] as
    /// [`forward_shard_device_into`](Self::forward_shard_device_into).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_shard_device_from<T: CudaFeature>(
        &self,
        loss: &SupConLoss,
        features: &CudaView<'_, T>,
        shape: BatchShape,
        positives: DevicePositives<'_>,
        samples: Range<usize>,
        workspace: &CudaView<'_, u8>,
        upstream: &CudaView<'_, f64>,
        scratch: &mut CudaViewMut<'_, u8>,
        grad: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let problem = Problem::new(NAME, loss, shape, T::DTYPE, self.precision)?;
        let layout = Self::workspace(loss, shape, positives.label_set_classes())?;
        crate::shard::check_samples(shape, &samples)?;
        let bound = self.bind_inputs(shape, features, positives)?;
        self.check_buffer(
            "workspace",
            workspace.len(),
            workspace.stream(),
            layout.bytes(),
        )?;
        self.check_buffer(
            "upstream",
            upstream.len(),
            upstream.stream(),
            layout.anchors,
        )?;
        let rows = samples.len() * shape.views() * shape.dim();
        self.check_buffer("grad", grad.len(), grad.stream(), rows)?;
        let (workspace_address, workspace_guard) = workspace.device_ptr(&self.stream);
        check_alignment("workspace", workspace_address)?;
        let (upstream_address, upstream_guard) = upstream.device_ptr(&self.stream);
        let (scratch_address, scratch_guard) =
            self.bind_workspace("scratch", scratch, layout.scratch_bytes())?;
        let (grad_address, grad_guard) = grad.device_ptr_mut(&self.stream);
        let mut executor = self.executor();
        // SAFETY: inputs as in `forward_device`; the workspace holds a forward's outputs for
        // this problem (the caller's promise, documented), the upstream R doubles, the scratch
        // R floats and `grad` the shard's (b1 − b0)·V·D floats, all of this context (checked)
        // and borrowed for the call, their guards ordering other streams' work after the
        // kernels.
        unsafe {
            resident::backward_shard_from(
                &mut executor,
                &problem,
                bound.features,
                &bound.positives,
                workspace_address,
                upstream_address,
                scratch_address,
                grad_address,
                samples,
            )?;
        }
        drop((
            workspace_guard,
            upstream_guard,
            scratch_guard,
            grad_guard,
            bound,
        ));
        Ok(())
    }

    /// A writable workspace of `bytes` bytes of this context, 256-byte aligned, by address.
    fn bind_workspace<'a>(
        &'a self,
        buffer: &'static str,
        workspace: &'a mut CudaViewMut<'_, u8>,
        bytes: usize,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.check_buffer(buffer, workspace.len(), workspace.stream(), bytes)?;
        let (address, guard) = workspace.device_ptr_mut(&self.stream);
        check_alignment(buffer, address)?;
        Ok((address, guard))
    }

    /// Fails unless a buffer of `len` elements on `stream` fits an argument needing `expected`.
    fn check_buffer(
        &self,
        buffer: &'static str,
        len: usize,
        stream: &Arc<CudaStream>,
        expected: usize,
    ) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidDeviceBuffer { buffer, reason });
        if stream.context() != self.context() {
            return invalid(format!(
                "memory of device {}'s context, the backend runs on device {}'s",
                stream.context().ordinal(),
                self.context().ordinal()
            ));
        }
        if len != expected {
            return invalid(format!("{len} elements, the shape needs {expected}"));
        }
        Ok(())
    }

    /// Checks the device inputs against `shape` and takes their addresses for this stream.
    fn bind_inputs<'a, T: CudaFeature>(
        &'a self,
        shape: BatchShape,
        features: &'a CudaView<'a, T>,
        positives: DevicePositives<'a>,
    ) -> Result<BoundInputs<'a>> {
        self.check_buffer(
            "features",
            features.len(),
            features.stream(),
            shape.elements(),
        )?;
        let mut guards = Vec::with_capacity(2);
        let (features, guard) = features.device_ptr(&self.stream);
        guards.push(guard);
        let positives = match positives {
            DevicePositives::SimClr => PositiveAddresses::SameSample,
            DevicePositives::Labels(labels) => {
                if labels.len() != shape.batch() {
                    return Err(Error::LabelsLength {
                        expected: shape.batch(),
                        got: labels.len(),
                    });
                }
                self.check_buffer("labels", labels.len(), labels.stream(), shape.batch())?;
                let (address, guard) = labels.device_ptr(&self.stream);
                guards.push(guard);
                PositiveAddresses::Labels(address)
            }
            DevicePositives::Mask(mask) => {
                self.check_buffer("mask", mask.len(), mask.stream(), shape.batch().pow(2))?;
                let (address, guard) = mask.device_ptr(&self.stream);
                guards.push(guard);
                PositiveAddresses::Mask(address)
            }
            DevicePositives::LabelSets {
                memberships,
                classes,
                weight,
            } => {
                let expected = shape.batch().checked_mul(classes);
                let expected = expected.ok_or_else(|| Error::InvalidDeviceBuffer {
                    buffer: "label sets",
                    reason: format!("B·K = {}·{classes} overflows usize", shape.batch()),
                })?;
                self.check_buffer(
                    "label sets",
                    memberships.len(),
                    memberships.stream(),
                    expected,
                )?;
                let classes = PreparedLayout::classes(classes)?;
                let (address, guard) = memberships.device_ptr(&self.stream);
                guards.push(guard);
                return Ok(BoundInputs {
                    features,
                    positives: ResidentPositives::Memberships {
                        address,
                        classes,
                        weight,
                    },
                    _guards: guards,
                });
            }
        };
        Ok(BoundInputs {
            features,
            positives: ResidentPositives::Direct(positives),
            _guards: guards,
        })
    }
}

/// Fails unless a workspace starts on a 256-byte boundary (every allocation of the driver, and
/// of PyTorch's caching allocator, does).
fn check_alignment(buffer: &'static str, address: u64) -> Result<()> {
    if address % 256 == 0 {
        Ok(())
    } else {
        Err(Error::InvalidDeviceBuffer {
            buffer,
            reason: format!("address {address:#x} is not 256-byte aligned"),
        })
    }
}

/// Where [`CudaBackend::forward_device_into`] puts its outputs in the caller's workspace, and
/// what [`CudaBackend::backward_device_from`] needs as scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWorkspace {
    layout: ResidentWorkspace,
    anchors: usize,
}

impl DeviceWorkspace {
    /// Bytes of the workspace.
    pub fn bytes(&self) -> usize {
        self.layout.bytes()
    }

    /// Offset of the loss (`f64`: the reduced loss, or Σℓ_i for reduction none).
    pub fn loss_offset(&self) -> usize {
        self.layout.outputs.loss_offset()
    }

    /// Offset of the per-anchor losses ℓ_i (`f32[R]`).
    pub fn per_anchor_offset(&self) -> usize {
        self.layout.outputs.per_anchor_offset()
    }

    /// Offset of the count of anchors without positives (`u32`).
    pub fn anchors_without_positives_offset(&self) -> usize {
        self.layout.outputs.anchors_without_positives_offset()
    }

    /// Bytes of the backward pass's scratch (`f32[R]`).
    pub fn scratch_bytes(&self) -> usize {
        self.anchors * size_of::<f32>()
    }

    /// Offset of the first of the [`STATISTICS`](Self::STATISTICS) per-anchor statistics
    /// (`f32[R]` each, anchor i = v·B + b; ℓ_i first), which a sharded loss gathers between
    /// its ranks.
    pub fn statistics_offset(&self) -> usize {
        self.layout.outputs.per_anchor_offset()
    }

    /// Bytes from one per-anchor statistic to the next (R floats, rounded up to 256 bytes).
    pub fn statistics_stride(&self) -> usize {
        self.layout.outputs.statistics_stride()
    }

    /// How many per-anchor statistics the workspace holds.
    pub const STATISTICS: usize = WorkspaceLayout::STATISTICS;
}

/// Records that the forward kernels queued so far on `stream` write the statistics and the
/// prepared positives: they write through raw addresses, which cudarc does not see, and the
/// record makes work that another stream queues on these buffers (e.g. reading
/// [`DeviceForward::loss`]) wait for the kernels.
fn record_writes(forward: &mut ResidentForward<CudaSlice<u8>>, stream: &CudaStream) {
    for buffer in forward.written_mut() {
        // Dropping the guard records the buffer's write event on `stream`.
        let (_, _written) = buffer.device_ptr_mut(stream);
    }
}

/// Device inputs by address, with cudarc's guards that order other streams' work after the
/// kernels that read them (dropped once those kernels are queued).
struct BoundInputs<'a> {
    features: u64,
    positives: ResidentPositives,
    _guards: Vec<SyncOnDrop<'a>>,
}

/// The result of [`CudaBackend::forward_device`]: the loss, the per-anchor losses and the O(N)
/// backward state, on the device. Reading values on the host synchronises the stream; nothing
/// else does.
#[derive(Debug)]
pub struct DeviceForward {
    backend: CudaBackend,
    problem: Problem,
    resident: ResidentForward<CudaSlice<u8>>,
}

impl DeviceForward {
    /// The loss as a one-element device buffer (f64), valid once the stream has run the
    /// kernels: the reduced loss, or Σℓ_i for `Reduction::None`. Under
    /// `NoPositivePolicy::Error` it is computed as under `ZeroAndCount`; the error comes from
    /// [`loss_host`](Self::loss_host), [`to_host`](Self::to_host) and the backward pass.
    pub fn loss(&self) -> CudaView<'_, f64> {
        raw::view_as(&self.resident.statistics.reduced_loss, 1)
            .expect("the reduced-loss buffer is allocated with 8 bytes")
    }

    /// ℓ_i for the R anchors (view-major rows), f32, on the device.
    pub fn per_anchor(&self) -> CudaView<'_, f32> {
        raw::view_as(
            &self.resident.statistics.anchor_loss,
            self.problem.anchors(),
        )
        .expect("the per-anchor buffer is allocated with R f32")
    }

    /// The loss on the host (synchronises the stream); `None` for `Reduction::None`.
    ///
    /// # Errors
    /// [`Error::AnchorWithoutPositives`] under `NoPositivePolicy::Error`; [`Error::Cuda`].
    pub fn loss_host(&self) -> Result<Option<f64>> {
        resident::reduced_loss(
            &mut self.backend.executor(),
            &self.problem,
            &self.resident.statistics,
        )
    }

    /// Everything on the host, as [`Backend::forward`] returns it (synchronises the stream).
    ///
    /// # Errors
    /// As [`loss_host`](Self::loss_host).
    pub fn to_host(&self) -> Result<ForwardOutput> {
        launch::to_host(
            &mut self.backend.executor(),
            &self.problem,
            &self.resident.statistics,
        )
    }

    /// The loss configuration of the forward pass.
    pub fn loss_config(&self) -> &SupConLoss {
        self.problem.loss()
    }

    /// The batch shape of the forward pass.
    pub fn shape(&self) -> BatchShape {
        self.problem.shape()
    }

    /// The problem for a backward pass on `backend` with features of type `T`.
    fn problem_for<T: CudaFeature>(&self, backend: &CudaBackend) -> Result<Problem> {
        if backend.context() != self.backend.context() {
            return Err(Error::StateMismatch(
                "the forward pass ran on another CUDA context".into(),
            ));
        }
        let problem = Problem::new(
            NAME,
            self.problem.loss(),
            self.problem.shape(),
            T::DTYPE,
            backend.precision,
        )?;
        if problem != self.problem {
            return Err(Error::StateMismatch(format!(
                "features are {:?} under {:?}, the forward pass read another element type or \
                 ran other kernels",
                T::DTYPE,
                backend.precision
            )));
        }
        Ok(problem)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        host::forward(
            &mut self.executor(),
            NAME,
            self.precision,
            loss,
            features,
            positives,
        )
    }

    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        host::backward(
            &mut self.executor(),
            NAME,
            self.precision,
            loss,
            features,
            positives,
            state,
            upstream,
        )
    }

    fn forward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        host::forward_shard(
            &mut self.executor(),
            NAME,
            self.precision,
            loss,
            features,
            positives,
            samples,
        )
    }

    fn backward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
        samples: Range<usize>,
    ) -> Result<Array3<T::Grad>> {
        host::backward_shard(
            &mut self.executor(),
            NAME,
            self.precision,
            loss,
            features,
            positives,
            state,
            upstream,
            samples,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cu_init_without_a_device_is_no_cuda_device() {
        // Only the no-device code: formatting any other DriverError asks the driver for its
        // message, which needs libcuda.
        let error = DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE);
        assert_eq!(
            init_error(3, error),
            Error::NoCudaDevice {
                ordinal: 3,
                count: 0
            }
        );
    }

    #[test]
    fn the_toolkits_link_stub_is_no_driver() {
        let error = DriverError(sys::CUresult::CUDA_ERROR_STUB_LIBRARY);
        assert_eq!(version_error(error), Error::NoCudaDriver);
    }

    #[test]
    fn every_constructor_reports_a_missing_driver() {
        if DriverLibrary::find().is_some() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        assert_eq!(CudaBackend::new(0).unwrap_err(), Error::NoCudaDriver);
        assert_eq!(CudaBackend::new(7).unwrap_err(), Error::NoCudaDriver);
    }
}
