//! The sharded loss on device buffers over NCCL (feature `nccl`): [`ShardedSupCon`] with a
//! [`CudaBackend`] and an [`NcclGroup`] on one stream.
//!
//! The steps are those of `crate::distributed`, with every O(N·D) and O(N) value staying on
//! the GPU:
//!
//! 1. The ranks exchange a header of their sizes and kinds of positives (host bytes, one
//!    synchronisation), so that bad input fails on every rank at once.
//! 2. The features and positives are all-gathered into buffers of the whole batch: one
//!    `ncclBroadcast` per rank, rooted there, into its run of rows (NCCL's all-gather takes
//!    equal counts; the ranks' are ragged).
//! 3. Each rank runs the statistics kernel for its own anchors
//!    ([`CudaBackend::forward_shard_device_into`]); one in-place broadcast per statistic, rank
//!    and anchor view copies every rank's entries into every workspace; every rank then
//!    reduces the same loss ([`CudaBackend::finalize_device`]).
//! 4. Backward: the upstream gradients are combined on the host (they are host values in this
//!    API), uploaded as R doubles, and each rank writes its own rows of the gradient
//!    ([`CudaBackend::backward_shard_device_from`]).
//!
//! NCCL runs on the group's stream and the kernels on the backend's, which must be the same
//! stream: then every step is ordered after the one before without events.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::Comm;

use super::backend::{CudaBackend, CudaFeature, DevicePositives, DeviceWorkspace};
use super::executor::{allocation_error, driver_error};
use super::nccl::{nccl_error, NcclGroup};
use crate::backend::Upstream;
use crate::config::{NoPositivePolicy, Reduction};
use crate::device::problem::Problem;
use crate::distributed::{agree, all_gather, header, GlobalUpstream, ShardedSupCon};
use crate::error::{Error, Result};
use crate::inputs::BatchShape;
use crate::label_sets::LabelSetWeight;
use crate::shard::anchor_runs;

/// The whole batch's positives, gathered on this rank's GPU.
#[derive(Debug)]
enum GatheredPositives {
    SimClr,
    Labels(CudaSlice<i64>),
    Mask(CudaSlice<f32>),
    LabelSets {
        memberships: CudaSlice<u8>,
        classes: usize,
        weight: LabelSetWeight,
    },
}

impl GatheredPositives {
    fn view(&self) -> (DevicePositivesOwned<'_>, Option<usize>) {
        match self {
            GatheredPositives::SimClr => (DevicePositivesOwned::SimClr, None),
            GatheredPositives::Labels(labels) => {
                (DevicePositivesOwned::Labels(labels.as_view()), None)
            }
            GatheredPositives::Mask(mask) => (DevicePositivesOwned::Mask(mask.as_view()), None),
            GatheredPositives::LabelSets {
                memberships,
                classes,
                weight,
            } => (
                DevicePositivesOwned::LabelSets(memberships.as_view(), *classes, *weight),
                Some(*classes),
            ),
        }
    }
}

/// Views of [`GatheredPositives`], which [`DevicePositives`] borrows.
enum DevicePositivesOwned<'a> {
    SimClr,
    Labels(CudaView<'a, i64>),
    Mask(CudaView<'a, f32>),
    LabelSets(CudaView<'a, u8>, usize, LabelSetWeight),
}

impl DevicePositivesOwned<'_> {
    fn positives(&self) -> DevicePositives<'_> {
        match self {
            DevicePositivesOwned::SimClr => DevicePositives::SimClr,
            DevicePositivesOwned::Labels(labels) => DevicePositives::Labels(labels),
            DevicePositivesOwned::Mask(mask) => DevicePositives::Mask(mask),
            DevicePositivesOwned::LabelSets(memberships, classes, weight) => {
                DevicePositives::LabelSets {
                    memberships,
                    classes: *classes,
                    weight: *weight,
                }
            }
        }
    }
}

/// One rank's sharded forward pass on the device: the whole batch gathered on this rank's GPU
/// (O(N·D)), and the forward's workspace with every anchor's statistics and the loss, kept
/// for [`ShardedSupCon::backward_device`]. Nothing N × N.
#[derive(Debug)]
pub struct ShardedDeviceForward<T: DeviceRepr> {
    features: CudaSlice<T>,
    positives: GatheredPositives,
    workspace: CudaSlice<u8>,
    layout: DeviceWorkspace,
    shape: BatchShape,
    /// Every rank's samples, in rank order.
    shards: Vec<Range<usize>>,
    rank: usize,
}

impl<T: DeviceRepr> ShardedDeviceForward<T> {
    /// The loss of the whole batch as a one-element device buffer (f64; Σℓ_i for reduction
    /// none), the same bits on every rank, valid once the stream has run the kernels. Under
    /// `NoPositivePolicy::Error` it is computed as under `ZeroAndCount`, and
    /// [`loss_host`](Self::loss_host) raises the error.
    pub fn loss(&self) -> CudaView<'_, f64> {
        let at = self.layout.loss_offset();
        // SAFETY: the workspace holds an f64 at its 256-byte aligned loss offset.
        unsafe { self.workspace.slice(at..at + 8).transmute::<f64>(1) }
            .expect("the workspace holds the loss")
    }

    /// ℓ_i of every anchor of the whole batch (f32, anchor i = v·B + b), on the device.
    pub fn per_anchor(&self) -> CudaView<'_, f32> {
        let (at, anchors) = (self.layout.per_anchor_offset(), self.anchors());
        // SAFETY: the workspace holds R f32 at its 256-byte aligned per-anchor offset.
        unsafe {
            self.workspace
                .slice(at..at + 4 * anchors)
                .transmute::<f32>(anchors)
        }
        .expect("the workspace holds ℓ_i")
    }

    /// The loss on the host (synchronises); `None` for reduction none.
    ///
    /// # Errors
    /// [`Error::AnchorWithoutPositives`] under `NoPositivePolicy::Error` (the first anchor of
    /// the whole batch without positives); [`Error::Cuda`].
    pub fn loss_host(&self, loss: &crate::SupConLoss) -> Result<Option<f64>> {
        let stream = self.workspace.stream();
        let copy = |what: &'static str| driver_error(format!("copy the {what} to the host"));
        if loss.no_positive() == NoPositivePolicy::Error {
            let at = self.layout.anchors_without_positives_offset();
            let count = stream
                .clone_dtoh(&self.workspace.slice(at..at + 4))
                .map_err(copy("count"))?;
            if u32::from_le_bytes(count.try_into().expect("four bytes")) > 0 {
                // P_i is the sixth statistic (ℓ, LSE hi and lo, LSE^P hi and lo, P).
                let at = self.layout.statistics_offset() + 5 * self.layout.statistics_stride();
                let weights = stream
                    .clone_dtoh(&self.workspace.slice(at..at + 4 * self.anchors()))
                    .map_err(copy("positive weights"))?;
                let anchor = bytemuck::cast_slice::<u8, f32>(&weights)
                    .iter()
                    .position(|&p| p <= 0.0)
                    .unwrap_or(0);
                return Err(Error::AnchorWithoutPositives { anchor });
            }
        }
        let at = self.layout.loss_offset();
        let bytes = stream
            .clone_dtoh(&self.workspace.slice(at..at + 8))
            .map_err(copy("loss"))?;
        let value = f64::from_le_bytes(bytes.try_into().expect("eight bytes"));
        Ok((loss.reduction() != Reduction::None).then_some(value))
    }

    /// The whole batch's shape.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// This rank's samples in the whole batch.
    pub fn samples(&self) -> &Range<usize> {
        &self.shards[self.rank]
    }

    fn anchors(&self) -> usize {
        self.layout.scratch_bytes() / size_of::<f32>()
    }
}

impl ShardedSupCon<CudaBackend, NcclGroup> {
    /// This rank's forward pass on its device features (`[B_r, V, D]`, `dims`, row-major) and
    /// their positives: labels or label sets of its samples (`[B_r]`, `[B_r, K]`), SimCLR, or
    /// its rows of the whole batch's mask (`[B_r, B]`). B_r may be 0. Every rank of the group
    /// calls it, with the same V, D and kind of positives; the group and the backend must run
    /// on one stream.
    ///
    /// # Errors
    /// As [`ShardedSupCon::forward`]; [`Error::InvalidDeviceBuffer`] for buffers of the wrong
    /// length; [`Error::Collective`] for a group on another stream than the backend.
    pub fn forward_device<T: CudaFeature + cudarc::nccl::NcclType + ValidAsZeroBits>(
        &self,
        features: &CudaView<'_, T>,
        dims: (usize, usize, usize),
        positives: DevicePositives<'_>,
    ) -> Result<ShardedDeviceForward<T>> {
        let (backend, comm) = (self.backend(), self.group().comm());
        if comm.stream().cu_stream() != backend.stream().cu_stream() {
            return Err(Error::Collective {
                operation: "forward",
                reason: "the NCCL group and the CUDA backend run on different streams".into(),
            });
        }
        let (rows, views, dim) = dims;
        let (kind, width) = kind_of(&positives);
        let local = check_local(features, dims, &positives);
        let shards = agree(
            self.group(),
            header(dims, (kind, width), local.is_ok()),
            local,
        )?;
        let batch = shards.last().map_or(0, |last| last.end);
        let shape = BatchShape::new(batch, views, dim)?;
        // What the kernels refuse for the whole batch, every rank refuses before the next
        // collective (those without samples run no kernel that would check it).
        Problem::new("cuda", self.loss(), shape, T::DTYPE, backend.precision())?;
        if let DevicePositives::Mask(mask) = positives {
            // A mask's columns are known once B is: the ranks check them, then learn whether
            // every rank's fit, so that all fail together.
            let fits = mask.len() == rows * batch;
            let all = all_gather(self.group(), &[u64::from(fits)])?;
            if !fits {
                return Err(Error::MaskShape {
                    expected: batch,
                    got: [rows, mask.len().checked_div(rows).unwrap_or(0)],
                });
            }
            if let Some(rank) = all.iter().position(|fit| fit[..] != [1]) {
                return Err(Error::Collective {
                    operation: "forward",
                    reason: format!("rank {rank}'s mask rows are not [B_r, {batch}]"),
                });
            }
        }
        let row = views * dim;
        let gathered_features = gather_rows(comm, features, &shards, row)?;
        let positives = match positives {
            DevicePositives::SimClr => GatheredPositives::SimClr,
            DevicePositives::Labels(labels) => {
                GatheredPositives::Labels(gather_rows(comm, labels, &shards, 1)?)
            }
            DevicePositives::Mask(mask) => {
                GatheredPositives::Mask(gather_rows(comm, mask, &shards, batch)?)
            }
            DevicePositives::LabelSets {
                memberships,
                classes,
                weight,
            } => GatheredPositives::LabelSets {
                memberships: gather_rows(comm, memberships, &shards, classes)?,
                classes,
                weight,
            },
        };
        let loss = self.loss();
        let (views_of_positives, set_classes) = positives.view();
        let layout = CudaBackend::workspace(loss, shape, set_classes)?;
        let mut workspace = alloc::<u8>(comm, layout.bytes())?;
        let rank = comm.rank();
        let features_view = gathered_features.as_view();
        if !shards[rank].is_empty() {
            backend.forward_shard_device_into(
                loss,
                &features_view,
                shape,
                views_of_positives.positives(),
                shards[rank].clone(),
                &mut workspace.as_view_mut(),
            )?;
        }
        // Every rank's entries of the nine statistics, into every rank's workspace.
        for (root, samples) in shards.iter().enumerate() {
            for run in anchor_runs(loss, shape, samples).filter(|run| !run.is_empty()) {
                for k in 0..DeviceWorkspace::STATISTICS {
                    let at = layout.statistics_offset()
                        + k * layout.statistics_stride()
                        + run.start * size_of::<f32>();
                    let mut region = workspace.slice_mut(at..at + run.len() * size_of::<f32>());
                    comm.broadcast_in_place(&mut region, root as i32)
                        .map_err(nccl_error("ncclBroadcast"))?;
                }
            }
        }
        backend.finalize_device(loss, shape, set_classes, &mut workspace.as_view_mut())?;
        Ok(ShardedDeviceForward {
            features: gathered_features,
            positives,
            workspace,
            layout,
            shape,
            shards,
            rank,
        })
    }

    /// This rank's ∂(objective)/∂features, `[B_r, V, D]` f32 on the device, where the
    /// objective is the sum over ranks of each rank's `upstream` times its output, as
    /// [`ShardedSupCon::backward`]. The upstream values are combined over the group on the
    /// host (one synchronisation). Every rank of the group calls it. A rank without samples
    /// gets one element (zero): the driver allocates nothing empty.
    ///
    /// # Errors
    /// As [`ShardedSupCon::backward`]; [`Error::AnchorWithoutPositives`] under
    /// `NoPositivePolicy::Error`.
    pub fn backward_device<T: CudaFeature>(
        &self,
        forward: &ShardedDeviceForward<T>,
        upstream: Upstream<'_>,
    ) -> Result<CudaSlice<f32>> {
        let (backend, comm, loss) = (self.backend(), self.group().comm(), self.loss());
        let shape = forward.shape;
        let samples = forward.samples().clone();
        let global = self.global_upstream(shape, &forward.shards, &samples, upstream)?;
        if loss.no_positive() == NoPositivePolicy::Error {
            // The same error on every rank: every rank holds every anchor's statistics.
            forward.loss_host(loss)?;
        }
        let values = match global {
            GlobalUpstream::Scalar(u) => vec![u; forward.anchors()],
            GlobalUpstream::PerAnchor(values) => values.to_vec(),
        };
        let stream = comm.stream();
        let upstream = stream
            .clone_htod(&values)
            .map_err(driver_error("copy the upstream gradient to the device"))?;
        let mut scratch = alloc::<u8>(comm, forward.layout.scratch_bytes())?;
        let mut grad = alloc::<f32>(comm, samples.len() * shape.views() * shape.dim())?;
        if !samples.is_empty() {
            let (positives, _) = forward.positives.view();
            backend.backward_shard_device_from(
                loss,
                &forward.features.as_view(),
                shape,
                positives.positives(),
                samples,
                &forward.workspace.as_view(),
                &upstream.as_view(),
                &mut scratch.as_view_mut(),
                &mut grad.as_view_mut(),
            )?;
        }
        Ok(grad)
    }
}

/// A buffer of `len` values on the group's stream; at least one, as the driver allocates no
/// empty buffer.
fn alloc<T: DeviceRepr + ValidAsZeroBits>(comm: &Comm, len: usize) -> Result<CudaSlice<T>> {
    let bytes = len.max(1) * size_of::<T>();
    comm.stream()
        .alloc_zeros::<T>(len.max(1))
        .map_err(allocation_error(
            bytes,
            format_args!("allocating {bytes} bytes"),
        ))
}

/// Every rank's `local` rows (`width` values each, B_r of them) concatenated in rank order
/// on every rank: one broadcast per rank with samples, rooted at that rank, into its run.
fn gather_rows<T>(
    comm: &Comm,
    local: &CudaView<'_, T>,
    shards: &[Range<usize>],
    width: usize,
) -> Result<CudaSlice<T>>
where
    T: DeviceRepr + ValidAsZeroBits + cudarc::nccl::NcclType,
{
    let batch = shards.last().map_or(0, |last| last.end);
    let mut gathered = alloc::<T>(comm, batch * width)?;
    for (root, samples) in shards.iter().enumerate() {
        if samples.is_empty() {
            continue;
        }
        let mut region = gathered.slice_mut(samples.start * width..samples.end * width);
        let send = (root == comm.rank()).then_some(local);
        comm.broadcast(send, &mut region, root as i32)
            .map_err(nccl_error("ncclBroadcast"))?;
    }
    Ok(gathered)
}

/// The kind of device positives and their width, as the header takes them (the host path's
/// codes: `crate::distributed`).
fn kind_of(positives: &DevicePositives<'_>) -> (u64, usize) {
    match positives {
        DevicePositives::SimClr => (0, 0),
        DevicePositives::Labels(_) => (1, 0),
        DevicePositives::Mask(_) => (2, 0),
        DevicePositives::LabelSets {
            classes, weight, ..
        } => (3 + *weight as u64, *classes),
    }
}

/// Fails unless a rank's device inputs have one row per local sample (a mask's columns are
/// checked once B is known).
fn check_local<T>(
    features: &CudaView<'_, T>,
    (rows, views, dim): (usize, usize, usize),
    positives: &DevicePositives<'_>,
) -> Result<()> {
    let invalid = |buffer, reason: String| Err(Error::InvalidDeviceBuffer { buffer, reason });
    if Some(features.len()) != rows.checked_mul(views).and_then(|n| n.checked_mul(dim)) {
        return invalid(
            "features",
            format!("{} elements for [{rows}, {views}, {dim}]", features.len()),
        );
    }
    match positives {
        DevicePositives::Labels(labels) if labels.len() != rows => Err(Error::LabelsLength {
            expected: rows,
            got: labels.len(),
        }),
        DevicePositives::Mask(mask) if rows > 0 && mask.len() % rows != 0 => invalid(
            "mask",
            format!("{} elements are not {rows} rows", mask.len()),
        ),
        DevicePositives::LabelSets {
            memberships,
            classes,
            ..
        } if Some(memberships.len()) != rows.checked_mul(*classes) => invalid(
            "label sets",
            format!("{} elements for [{rows}, {classes}]", memberships.len()),
        ),
        _ => Ok(()),
    }
}
