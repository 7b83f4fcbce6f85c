//! Launch sequences over inputs already on the device: the device API of `CudaBackend`.
//!
//! `super::launch` holds the launch sequences for both APIs; the host-array path
//! (`super::host`) uploads, launches and downloads. Here the features and positives are
//! caller-owned device buffers, given by address, and the forward's outputs stay on the device
//! (`launch::launch_forward`): nothing is copied and nothing synchronises until the caller asks
//! for host values. The backward pass computes its per-anchor coefficients on the device too,
//! except under `NoPositivePolicy::Error` (see [`backward`]). Label sets, the cap bounds and
//! the row scales of `normalize` are prepared on the device before the forward kernels
//! (`super::prepared`), and the backward reads what the forward prepared.

use std::ops::Range;

use super::executor::{download_vec, KernelExecutor};
use super::launch::{self, DeviceUpstream, Statistics, WorkspaceLayout};
use super::prepared::{self, PreparedLayout, ResidentPositives};
use super::problem::{InputAddresses, Problem};
use crate::backend::Upstream;
use crate::config::{NoPositivePolicy, Reduction, SupConLoss};
use crate::error::{Error, Result};
use crate::inputs::BatchShape;

/// The forward pass on resident inputs, in buffers of its own: its outputs and the positives
/// it prepared, which the backward pass reads again.
#[derive(Debug)]
pub(crate) struct ResidentForward<B> {
    pub(crate) statistics: Statistics<B>,
    layout: PreparedLayout,
    /// The region of `layout`; absent when it is empty.
    prepared: Option<B>,
}

impl<B> ResidentForward<B> {
    /// The inputs of the backward kernels for `problem`: `features` and `positives` with the
    /// positives this forward prepared (label sets are not read again).
    ///
    /// # Errors
    /// [`Error::StateMismatch`] for positives of another kind than the forward's (label sets
    /// of another K, or given only to one of the passes), or a cap only one of them has.
    pub(crate) fn inputs<E: KernelExecutor<Buffer = B>>(
        &self,
        executor: &E,
        problem: &Problem,
        features: u64,
        positives: &ResidentPositives,
    ) -> Result<InputAddresses> {
        let layout = PreparedLayout::new(problem.loss(), problem.shape(), positives.set_classes());
        if layout != self.layout {
            return Err(Error::StateMismatch(
                "the positives are not of the kind the forward pass prepared".into(),
            ));
        }
        let base = self.prepared.as_ref().map_or(0, |b| executor.address(b));
        Ok(self.layout.inputs(features, positives, base))
    }

    /// The buffers the forward kernels wrote: the statistics and the prepared positives.
    // The CUDA backend's.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn written_mut(&mut self) -> impl Iterator<Item = &mut B> {
        self.statistics.written_mut().chain(self.prepared.as_mut())
    }
}

/// Queues the forward kernels on resident inputs into new buffers, after the kernels that
/// prepare the positives. Nothing is copied or awaited.
///
/// # Safety
/// As `launch::launch_forward`, with label sets as `B·K` bytes at their address.
pub(crate) unsafe fn forward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    features: u64,
    positives: &ResidentPositives,
) -> Result<ResidentForward<E::Buffer>> {
    let layout = PreparedLayout::new(problem.loss(), problem.shape(), positives.set_classes());
    let prepared = match layout.bytes() {
        0 => None,
        bytes => Some(executor.alloc(bytes)?),
    };
    let base = prepared.as_ref().map_or(0, |b| executor.address(b));
    // SAFETY: the inputs per this function's contract; the region is the buffer just
    // allocated (256-byte aligned, as every allocation), kept with the statistics.
    let statistics = unsafe {
        let inputs = prepared::prepare(executor, problem, &layout, features, positives, base)?;
        launch::launch_forward(executor, problem, &inputs)?
    };
    Ok(ResidentForward {
        statistics,
        layout,
        prepared,
    })
}

/// The caller-owned workspace of the device API: the forward's outputs ([`WorkspaceLayout`]),
/// then, on a 256-byte boundary, the prepared positives ([`PreparedLayout`]).
// The CUDA backend's; the emulated executor's tests run it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResidentWorkspace {
    pub(crate) outputs: WorkspaceLayout,
    prepared: PreparedLayout,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl ResidentWorkspace {
    /// The workspace under `loss` on a batch of `shape`, for label sets of K = `set_classes`
    /// labels or (`None`) other positives.
    pub(crate) fn new(loss: &SupConLoss, shape: BatchShape, set_classes: Option<u32>) -> Self {
        ResidentWorkspace {
            outputs: WorkspaceLayout::new(shape.anchors(loss.contrast_mode())),
            prepared: PreparedLayout::new(loss, shape, set_classes),
        }
    }

    /// Offset of the prepared positives.
    pub(crate) fn prepared_offset(&self) -> usize {
        self.outputs.bytes().next_multiple_of(256)
    }

    /// Bytes of the whole workspace.
    pub(crate) fn bytes(&self) -> usize {
        match self.prepared.bytes() {
            0 => self.outputs.bytes(),
            bytes => self.prepared_offset() + bytes,
        }
    }

    /// The inputs of the forward and backward kernels, with the positives prepared in the
    /// workspace at `base`.
    fn inputs(&self, features: u64, positives: &ResidentPositives, base: u64) -> InputAddresses {
        self.prepared
            .inputs(features, positives, base + self.prepared_offset() as u64)
    }
}

/// The reduced loss alone (synchronises); `None` for reduction none.
///
/// # Errors
/// [`crate::Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`] (then the
/// per-anchor statistics are read too, to name the anchor).
pub(crate) fn reduced_loss<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    statistics: &Statistics<E::Buffer>,
) -> Result<Option<f64>> {
    if problem.loss().no_positive() == NoPositivePolicy::Error {
        return Ok(launch::to_host(executor, problem, statistics)?.loss);
    }
    let loss = download_vec::<_, f64>(executor, &statistics.reduced_loss, 1)?[0];
    Ok((problem.loss().reduction() != Reduction::None).then_some(loss))
}

/// Queues the backward pass, writing `∂L/∂features` (`float[B][V][D]`) at `grad`.
///
/// The per-anchor coefficients `c·u_i/R'·[P_i > 0]·[LSE_i > −∞]` come from
/// `supcon_backward_coefficients` on the device (`launch::launch_coefficients`): nothing is
/// read back and nothing synchronises. Under [`NoPositivePolicy::Error`] the policy's error
/// needs the count of anchors without positives on the host, so there the O(R) statistics are
/// read back (one synchronisation) and the coefficients computed on the host, as on the
/// host-array path.
///
/// # Errors
/// [`crate::Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`]; upstream
/// mismatches as `SavedState::anchor_coefficients`.
///
/// # Safety
/// As `launch::launch_forward` for `inputs`, which must be the inputs `statistics` was
/// computed from; `grad` must address `B·V·D` writable `f32` of `executor`'s device memory that
/// nothing else reads or writes until the queued kernel has finished.
pub(crate) unsafe fn backward<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    inputs: &InputAddresses,
    statistics: &Statistics<E::Buffer>,
    upstream: Upstream<'_>,
    grad: u64,
) -> Result<()> {
    let coefficients = if problem.loss().no_positive() == NoPositivePolicy::Error {
        let state = launch::to_host(executor, problem, statistics)?.state;
        executor.upload(bytemuck::cast_slice(&launch::grad_coefficients(
            &state, upstream,
        )?))?
    } else {
        // SAFETY: the statistics are this problem's forward outputs, alive for the borrow and
        // freed in stream order.
        unsafe { launch::launch_coefficients(executor, problem, statistics, upstream)? }
    };
    let saved = statistics.addresses(executor).saved;
    let coefficients = executor.address(&coefficients);
    // SAFETY: inputs and `grad` per this function's contract; the statistics and the
    // coefficients are R floats of the same problem, alive for the borrow (the coefficients
    // until the end of this function, freed in stream order after the launch).
    unsafe { launch::launch_backward(executor, problem, inputs, saved, coefficients, grad) }
}

/// Queues the kernels that prepare the positives (for the whole batch) and the statistics
/// kernel over the anchors of the shard `samples` (`crate::shard::anchor_runs`), writing
/// both into the workspace at `workspace` ([`ResidentWorkspace`]: memory the caller owns,
/// nothing allocated). Only the shard's anchors' statistics are written, bitwise those of
/// the whole batch's pass: a sharded loss fills every other anchor's with the other ranks'
/// statistics, then calls [`finalize_into`], as the whole batch's pass does after its one
/// shard of every sample.
///
/// # Errors
/// [`Error::InvalidShard`] unless `samples` is a non-empty run of the batch's samples.
///
/// # Safety
/// As [`forward`] for the inputs; `workspace` must address `ResidentWorkspace::bytes`
/// writable bytes of `executor`'s memory, 256-byte aligned, that nothing else reads or writes
/// until the kernels have finished.
pub(crate) unsafe fn forward_shard_into<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    features: u64,
    positives: &ResidentPositives,
    workspace: u64,
    samples: Range<usize>,
) -> Result<()> {
    let shape = problem.shape();
    crate::shard::check_samples(shape, &samples)?;
    let layout = ResidentWorkspace::new(problem.loss(), shape, positives.set_classes());
    let at = layout.outputs.addresses(workspace);
    let base = workspace + layout.prepared_offset() as u64;
    // SAFETY: per this function's contract.
    unsafe {
        let inputs = prepared::prepare(
            executor,
            problem,
            &layout.prepared,
            features,
            positives,
            base,
        )?;
        for run in launch::anchor_launches(problem, &samples) {
            let run = run.start as u32..run.end as u32;
            launch::launch_forward_statistics(executor, problem, &inputs, &at, run)?;
        }
    }
    Ok(())
}

/// Queues `supcon_forward_finalize` on the workspace's statistics of every anchor: the
/// reduced loss and the count of anchors without positives.
///
/// # Safety
/// As [`forward_shard_into`], with every anchor's statistics in the workspace written (by
/// [`forward_shard_into`] on this rank or another's, copied in) before the kernel runs.
pub(crate) unsafe fn finalize_into<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    set_classes: Option<u32>,
    workspace: u64,
) -> Result<()> {
    let layout = ResidentWorkspace::new(problem.loss(), problem.shape(), set_classes);
    let at = layout.outputs.addresses(workspace);
    // SAFETY: per this function's contract.
    unsafe { launch::launch_finalize(executor, problem, &at) }
}

/// Queues the backward pass from the forward's outputs in `workspace` (finalised:
/// [`finalize_into`]), the upstream gradient `const double[R]`
/// at `upstream` (R copies of the scalar for a reduced loss), with `scratch` (R floats) for the
/// per-anchor coefficients, writing `∂L/∂features` of the shard `samples`
/// (`float[b1 − b0][V][D]`; all of them: `float[B][V][D]`) at `grad`, bitwise those rows of
/// the whole pass. Nothing is allocated, copied or awaited. Under
/// [`NoPositivePolicy::Error`] R' is computed as under `ZeroAndCount`: the caller reads the
/// count from the workspace to raise the error.
///
/// # Errors
/// [`Error::InvalidShard`] unless `samples` is a non-empty run of the batch's samples.
///
/// # Safety
/// As [`forward_shard_into`], with `workspace` holding the outputs of the forward for `problem` and
/// these inputs; `upstream` must address R doubles, `scratch` R writable floats and `grad`
/// `(b1 − b0)·V·D` writable floats, of `executor`'s memory, none read or written by anything
/// else until the kernels have finished.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward_shard_from<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    features: u64,
    positives: &ResidentPositives,
    workspace: u64,
    upstream: u64,
    scratch: u64,
    grad: u64,
    samples: Range<usize>,
) -> Result<()> {
    let shape = problem.shape();
    crate::shard::check_samples(shape, &samples)?;
    let layout = ResidentWorkspace::new(problem.loss(), shape, positives.set_classes());
    let at = layout.outputs.addresses(workspace);
    let inputs = layout.inputs(features, positives, workspace);
    // The kernel writes row (b, v) at ((b·V + v)·D) floats from the address it is given; the
    // shard's rows start at b0·V·D, so an address that many floats before `grad` puts them in
    // `grad`. The kernel adds the offset back and never touches the rows outside the runs.
    let before = (samples.start * shape.views() * shape.dim() * size_of::<f32>()) as u64;
    let grad = grad.wrapping_sub(before);
    // SAFETY: per this function's contract; each launch writes the rows of one run, all of
    // them within the shard's `(b1 − b0)·V·D` floats at the caller's address.
    unsafe {
        let upstream = DeviceUpstream::PerAnchor(upstream);
        launch::launch_coefficients_at(executor, problem, &at, upstream, scratch)?;
        for run in launch::row_launches(shape, &samples) {
            let run = run.start as u32..run.end as u32;
            launch::launch_backward_rows(executor, problem, &inputs, at.saved, scratch, grad, run)?;
        }
    }
    Ok(())
}

/// The device-resident sequence run through the emulated kernels: its backward pass reads the
/// forward's statistics where the host-array path uploads them rebuilt from the saved state.
#[cfg(all(test, feature = "emulation"))]
mod tests {
    use ndarray::{Array1, Array2, Array3, ArrayView3};

    use super::*;
    use crate::backend::Backend;
    use crate::config::{ContrastMode, Denominator, NoPositivePolicy, Summation, SupConLoss};
    use crate::device::emulated::{EmulatedBackend, HostExecutor};
    use crate::device::problem::PositiveAddresses;
    use crate::element::DType;
    use crate::inputs::{BatchShape, Positives};
    use crate::label_sets::LabelSetWeight;
    use crate::precision::Precision;
    use crate::reference::ReferenceBackend;

    /// The whole batch's forward pass into a workspace: its one shard, finalised.
    ///
    /// # Safety
    /// As [`forward_shard_into`].
    unsafe fn forward_into(
        executor: &mut HostExecutor,
        problem: &Problem,
        features: u64,
        positives: &ResidentPositives,
        workspace: u64,
    ) -> Result<()> {
        let samples = 0..problem.shape().batch();
        // SAFETY: per this function's contract; the shard of every sample writes every
        // anchor's statistics before the finalisation reads them.
        unsafe {
            forward_shard_into(executor, problem, features, positives, workspace, samples)?;
            finalize_into(executor, problem, positives.set_classes(), workspace)
        }
    }

    fn loss_grid() -> Vec<SupConLoss> {
        let mut losses = Vec::new();
        for mode in [ContrastMode::All, ContrastMode::One] {
            for summation in [Summation::Outside, Summation::Inside] {
                for denominator in [
                    Denominator::All,
                    Denominator::OnlyNegatives,
                    Denominator::OnePositive,
                ] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        for policy in [NoPositivePolicy::ZeroAndCount, NoPositivePolicy::Exclude] {
                            losses.push(
                                SupConLoss::builder()
                                    .temperature(0.2)
                                    .base_temperature(0.05)
                                    .contrast_mode(mode)
                                    .summation(summation)
                                    .denominator(denominator)
                                    .reduction(reduction)
                                    .no_positive(policy)
                                    .build()
                                    .unwrap(),
                            );
                        }
                    }
                }
            }
        }
        losses
    }

    /// max |a − b| over max(1, max |b|).
    fn relative_difference<'a>(
        a: impl IntoIterator<Item = &'a f64>,
        b: impl IntoIterator<Item = &'a f64>,
    ) -> f64 {
        let (mut difference, mut scale) = (0.0f64, 1.0f64);
        for (a, b) in a.into_iter().zip(b) {
            difference = difference.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        difference / scale
    }

    /// The forward and backward passes over inputs "on the device" (host buffers of the
    /// emulation, by address): the forward's output, the reduced loss, the gradient.
    fn resident_passes(
        loss: &SupConLoss,
        features: ArrayView3<'_, f32>,
        positives: Positives<'_>,
        upstream: impl Fn(&Array1<f64>) -> Array1<f64>,
    ) -> (crate::backend::ForwardOutput, Option<f64>, Array3<f32>) {
        let (batch, views, dim) = features.dim();
        let shape = BatchShape::new(batch, views, dim).unwrap();
        let problem = Problem::new("emulated", loss, shape, DType::F32, Precision::Auto).unwrap();
        let executor = &mut HostExecutor;
        let upload = |executor: &mut HostExecutor, bytes: &[u8]| executor.upload(bytes).unwrap();
        let features = upload(
            executor,
            bytemuck::cast_slice(features.as_slice().expect("standard layout")),
        );
        let labels;
        let mask;
        let memberships;
        let positives = match positives {
            Positives::SimClr => ResidentPositives::Direct(PositiveAddresses::SameSample),
            Positives::Labels(values) => {
                labels = upload(executor, bytemuck::cast_slice(values.as_slice().unwrap()));
                ResidentPositives::Direct(PositiveAddresses::Labels(executor.address(&labels)))
            }
            Positives::Mask(values) => {
                mask = upload(executor, bytemuck::cast_slice(values.as_slice().unwrap()));
                ResidentPositives::Direct(PositiveAddresses::Mask(executor.address(&mask)))
            }
            Positives::LabelSets { sets, weight } => {
                // Members as any nonzero byte, as the device API reads them.
                let bytes: Vec<u8> = sets.iter().map(|&m| if m { 0x80 } else { 0 }).collect();
                memberships = upload(executor, &bytes);
                ResidentPositives::Memberships {
                    address: executor.address(&memberships),
                    classes: sets.ncols() as u32,
                    weight,
                }
            }
        };
        let features = executor.address(&features);
        // SAFETY: the buffers above hold B·V·D f32, B i64, B·B f32 or B·K bytes and outlive
        // the passes (the emulation's launches are synchronous).
        let forward = unsafe { forward(executor, &problem, features, &positives) }.unwrap();
        let inputs = forward
            .inputs(executor, &problem, features, &positives)
            .unwrap();
        // A backward pass with positives of another kind than the forward prepared fails.
        let other = match positives {
            ResidentPositives::Memberships {
                address,
                classes,
                weight,
            } => ResidentPositives::Memberships {
                address,
                classes: classes + 64,
                weight,
            },
            ResidentPositives::Direct(_) => ResidentPositives::Memberships {
                address: 0,
                classes: 1,
                weight: LabelSetWeight::Any,
            },
        };
        let mismatch = forward.inputs(executor, &problem, features, &other);
        assert!(
            matches!(mismatch, Err(Error::StateMismatch(_))),
            "{mismatch:?}"
        );
        let statistics = &forward.statistics;
        let output = launch::to_host(executor, &problem, statistics).unwrap();
        let reduced = reduced_loss(executor, &problem, statistics).unwrap();
        let grad = executor
            .alloc(batch * views * dim * size_of::<f32>())
            .unwrap();
        let upstream_values = upstream(&output.per_anchor);
        let upstream = match loss.reduction() {
            Reduction::None => Upstream::PerAnchor(upstream_values.view()),
            _ => Upstream::Scalar(0.75),
        };
        let grad_address = executor.address(&grad);
        // SAFETY: as above; `grad` holds B·V·D f32.
        unsafe {
            backward(
                executor,
                &problem,
                &inputs,
                statistics,
                upstream,
                grad_address,
            )
        }
        .unwrap();
        let grad: Vec<f32> = download_vec(executor, &grad, batch * views * dim).unwrap();

        // The same passes in caller-owned memory: one workspace, the upstream as R doubles on
        // the device, R floats of scratch. Bit for bit the same outputs.
        let workspace_layout = ResidentWorkspace::new(loss, shape, positives.set_classes());
        let layout = workspace_layout.outputs;
        let workspace = executor.alloc(workspace_layout.bytes()).unwrap();
        let workspace_address = executor.address(&workspace);
        // SAFETY: as above; the workspace holds the layout's bytes.
        unsafe { forward_into(executor, &problem, features, &positives, workspace_address) }
            .unwrap();
        let bytes: Vec<u8> = download_vec(executor, &workspace, workspace_layout.bytes()).unwrap();
        let read_f32 = |offset: usize, k: usize| {
            f32::from_le_bytes(bytes[offset + 4 * k..][..4].try_into().unwrap())
        };
        let loss_bytes: [u8; 8] = bytes[layout.loss_offset()..][..8].try_into().unwrap();
        let allocated: Vec<f64> = download_vec(executor, &statistics.reduced_loss, 1).unwrap();
        assert_eq!(
            loss_bytes,
            allocated[0].to_le_bytes(),
            "the workspace's loss"
        );
        for (k, &l) in output.per_anchor.iter().enumerate() {
            let from_workspace = f64::from(read_f32(layout.per_anchor_offset(), k));
            assert_eq!(from_workspace.to_bits(), l.to_bits(), "ℓ_{k}");
        }
        let upstream_vector: Vec<f64> = match upstream {
            Upstream::PerAnchor(u) => u.to_vec(),
            Upstream::Scalar(u) => vec![u; problem.anchors()],
        };
        let upstream_buffer = executor
            .upload(bytemuck::cast_slice(&upstream_vector))
            .unwrap();
        let scratch = executor
            .alloc(problem.anchors() * size_of::<f32>())
            .unwrap();
        let into = executor
            .alloc(batch * views * dim * size_of::<f32>())
            .unwrap();
        let addresses = [&upstream_buffer, &scratch, &into].map(|b| executor.address(b));
        // SAFETY: as above; the upstream holds R doubles, the scratch R floats, `into` B·V·D
        // floats.
        unsafe {
            backward_shard_from(
                executor,
                &problem,
                features,
                &positives,
                workspace_address,
                addresses[0],
                addresses[1],
                addresses[2],
                0..batch,
            )
        }
        .unwrap();
        let from_workspace: Vec<f32> = download_vec(executor, &into, batch * views * dim).unwrap();
        let bits = |g: &[f32]| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&from_workspace),
            bits(&grad),
            "the workspace path's gradient"
        );

        let grad = Array3::from_shape_vec((batch, views, dim), grad).unwrap();
        (output, reduced, grad)
    }

    /// For every option and kind of positives, the resident path gives the host path's results
    /// bit for bit (its backward reads the forward's own statistics, the host path their
    /// reconstruction from the saved state; its label sets and cap bounds come from the
    /// device's kernels, the host path's from the host) and the reference backend's up to f32
    /// rounding.
    #[test]
    fn resident_passes_match_the_host_path_and_the_reference() {
        let (batch, views, dim) = (5, 3, 7);
        // One row of zeros: under `normalize`, the clamp's gradient without the projection.
        let features = Array3::<f32>::from_shape_fn((batch, views, dim), |(b, v, d)| {
            if (b, v) == (3, 2) {
                0.0
            } else {
                ((b * 13 + v * 5 + d) as f32 * 0.37).sin()
            }
        });
        let labels = Array1::from(vec![1i64, -4, 1, 9, -4]);
        // Every row's largest weight is 1, so that the host path's row scaling (`ScaledMask`)
        // is the identity and the two paths see the same weights.
        let weights = [0.0f32, 0.5, 1.0, 0.25];
        let mask = Array2::from_shape_fn((batch, batch), |(i, j)| weights[(i * 3 + j) % 4]);
        // K = 70 crosses a word; sample 3's set is empty, samples 0 and 4 share only label 69.
        let sets = Array2::from_shape_fn((batch, 70), |(b, k)| match b {
            0 => k == 69 || k == 2,
            1 => k % 3 == 0,
            2 => k == 3 || k == 40,
            3 => false,
            _ => k == 69 || k == 64,
        });
        let upstream_of = |per_anchor: &Array1<f64>| {
            Array1::from_shape_fn(per_anchor.len(), |i| 0.25 + 0.5 * (i % 3) as f64)
        };
        let weights = [
            LabelSetWeight::Any,
            LabelSetWeight::Jaccard,
            LabelSetWeight::Fraction,
        ];
        // Caps that the own views fill (1, 2: V = 3), that keep some or all of the others;
        // `normalize` in two configurations of every four (every cap meets both).
        let caps = [None, Some(1), Some(2), Some(3), Some(4), Some(7)];
        for (index, loss) in loss_grid().iter().enumerate() {
            let builder = loss.to_builder().normalize(index % 4 >= 2);
            let loss = &match caps[index % caps.len()] {
                Some(cap) => builder.positives_cap(cap).build().unwrap(),
                None => builder.build().unwrap(),
            };
            for positives in [
                Positives::SimClr,
                Positives::Labels(labels.view()),
                Positives::Mask(mask.view()),
                Positives::LabelSets {
                    sets: sets.view(),
                    weight: weights[index % weights.len()],
                },
            ] {
                let what = format!("{loss:?} {positives:?}");
                let (output, reduced, grad) =
                    resident_passes(loss, features.view(), positives, upstream_of);

                let host = EmulatedBackend::default()
                    .forward(loss, features.view(), positives)
                    .unwrap();
                // The device API has no fingerprint to give its state; everything else matches.
                let host_state = crate::backend::SavedState {
                    fingerprint: None,
                    ..host.state.clone()
                };
                assert_eq!(output.state, host_state, "{what}");
                assert_eq!(output.per_anchor, host.per_anchor, "{what}");
                assert_eq!(output.loss, host.loss, "{what}");
                assert_eq!(reduced, host.loss, "{what}");
                let upstream_values = upstream_of(&host.per_anchor);
                let upstream = match loss.reduction() {
                    Reduction::None => Upstream::PerAnchor(upstream_values.view()),
                    _ => Upstream::Scalar(0.75),
                };
                let host_grad = EmulatedBackend::default()
                    .backward(loss, features.view(), positives, &host.state, upstream)
                    .unwrap();
                // The host path gives the kernels W_i = 1 with LSE^P_i rebuilt from the f64
                // state; the device path passes the forward's own. They differ where a cap
                // drops a mask row's largest weight (W_i = 0.5 for sample 1 under cap 2), and
                // then the gradients by an ulp.
                let rebuilt =
                    loss.positives_cap().is_some() && matches!(positives, Positives::Mask(_));
                if rebuilt {
                    let error =
                        relative_difference(&grad.mapv(f64::from), &host_grad.mapv(f64::from));
                    assert!(error <= 1e-6, "{what}: gradient differs by {error:e}");
                } else {
                    assert_eq!(grad, host_grad, "{what}");
                }

                let reference = ReferenceBackend
                    .forward(loss, features.view(), positives)
                    .unwrap();
                let reference_grad = ReferenceBackend
                    .backward(loss, features.view(), positives, &reference.state, upstream)
                    .unwrap();
                let forward_error = relative_difference(&output.per_anchor, &reference.per_anchor)
                    .max(relative_difference(&output.loss, &reference.loss));
                assert!(
                    forward_error < 1e-5,
                    "{what}: forward off by {forward_error:e}"
                );
                let grad_error =
                    relative_difference(&grad.mapv(f64::from), &reference_grad.mapv(f64::from));
                assert!(grad_error < 1e-5, "{what}: gradient off by {grad_error:e}");
            }
        }
    }

    /// The device path checks no feature for finiteness, so NaN and infinite features must
    /// reach the outputs: a NaN or infinite loss and a non-finite gradient, never a silently
    /// finite value (a NaN sum used to read as an empty set: LSE −∞, ℓ = 0, loss 0).
    #[test]
    fn non_finite_features_on_the_device_path_reach_the_loss_and_the_gradient() {
        let (batch, views, dim) = (6, 2, 5);
        let labels = Array1::from(vec![1i64, 2, 1, 2, 3, 3]);
        let mask =
            Array2::from_shape_fn((batch, batch), |(i, j)| [0.0f32, 0.5, 2.0][(i + 2 * j) % 3]);
        for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut features = Array3::<f32>::from_shape_fn((batch, views, dim), |(b, v, d)| {
                ((b * 7 + v * 3 + d) as f32 * 0.41).sin()
            });
            features[[2, 1, 3]] = poison;
            for (summation, normalize) in [
                (Summation::Outside, false),
                (Summation::Inside, false),
                (Summation::Outside, true),
            ] {
                let loss = SupConLoss::builder()
                    .summation(summation)
                    .normalize(normalize)
                    .build()
                    .unwrap();
                for positives in [
                    Positives::SimClr,
                    Positives::Labels(labels.view()),
                    Positives::Mask(mask.view()),
                ] {
                    let what = format!("{poison} {summation:?} {normalize} {positives:?}");
                    let (output, reduced, grad) =
                        resident_passes(&loss, features.view(), positives, |l| l.clone());
                    assert!(!reduced.unwrap().is_finite(), "{what}: loss {reduced:?}");
                    assert!(!output.loss.unwrap().is_finite(), "{what}");
                    assert!(
                        grad.iter().any(|g| !g.is_finite()),
                        "{what}: finite gradient"
                    );
                    if poison.is_nan() {
                        assert!(output.state.lse().iter().all(|l| l.is_nan()), "{what}");
                    }
                }
            }
        }
    }

    /// The sharded sequence of one rank per shard, as a sharded loss runs it: each rank
    /// writes its shard's statistics (`forward_shard_into`), the ranks copy each other's
    /// entries into their workspaces (a collective's job, here a host copy), every rank
    /// finalises and writes its shard's gradient rows (`backward_shard_from`). Every rank's
    /// workspace then equals the whole pass's bytes for bytes, and the shards' gradients are
    /// its rows bit for bit; for every kind of positives, both contrast modes, the three
    /// denominators and reductions, `normalize` and a cap.
    #[test]
    fn sharded_workspaces_match_the_whole_pass_bit_for_bit() {
        let (batch, views, dim) = (7, 2, 5);
        let features = Array3::<f32>::from_shape_fn((batch, views, dim), |(b, v, d)| {
            ((b * 11 + v * 7 + d * 3) as f32 * 0.29).sin()
        });
        let labels = Array1::from(vec![3i64, 1, 3, 8, 1, 1, 5]);
        let mask =
            Array2::from_shape_fn((batch, batch), |(i, j)| [0.0f32, 0.5, 2.0][(i * 2 + j) % 3]);
        let sets = Array2::from_shape_fn((batch, 3), |(b, k)| (b + k) % 3 == 0 || b == k + 4);
        let shape = BatchShape::new(batch, views, dim).unwrap();
        let executor = &mut HostExecutor;
        let features_buffer = executor
            .upload(bytemuck::cast_slice(features.as_slice().unwrap()))
            .unwrap();
        let labels_buffer = executor
            .upload(bytemuck::cast_slice(labels.as_slice().unwrap()))
            .unwrap();
        let mask_buffer = executor
            .upload(bytemuck::cast_slice(mask.as_slice().unwrap()))
            .unwrap();
        let set_bytes: Vec<u8> = sets.iter().map(|&m| u8::from(m)).collect();
        let sets_buffer = executor.upload(&set_bytes).unwrap();
        let features_address = executor.address(&features_buffer);
        let all_positives = [
            ResidentPositives::Direct(PositiveAddresses::SameSample),
            ResidentPositives::Direct(PositiveAddresses::Labels(executor.address(&labels_buffer))),
            ResidentPositives::Direct(PositiveAddresses::Mask(executor.address(&mask_buffer))),
            ResidentPositives::Memberships {
                address: executor.address(&sets_buffer),
                classes: 3,
                weight: LabelSetWeight::Jaccard,
            },
        ];
        let losses = [
            SupConLoss::default(),
            SupConLoss::builder()
                .contrast_mode(ContrastMode::One)
                .denominator(Denominator::OnePositive)
                .reduction(Reduction::None)
                .build()
                .unwrap(),
            SupConLoss::builder()
                .summation(Summation::Inside)
                .denominator(Denominator::OnlyNegatives)
                .reduction(Reduction::Sum)
                .normalize(true)
                .positives_cap(2)
                .build()
                .unwrap(),
            SupConLoss::builder()
                .denominator(Denominator::OnePositive)
                .no_positive(NoPositivePolicy::Exclude)
                .build()
                .unwrap(),
        ];
        for loss in &losses {
            for positives in &all_positives {
                let what = format!("{loss:?} {positives:?}");
                let problem =
                    Problem::new("emulated", loss, shape, DType::F32, Precision::Auto).unwrap();
                let layout = ResidentWorkspace::new(loss, shape, positives.set_classes());
                let anchors = problem.anchors();
                let upstream: Vec<f64> =
                    (0..anchors).map(|i| 0.5 + 0.25 * (i % 3) as f64).collect();
                let upstream = executor.upload(bytemuck::cast_slice(&upstream)).unwrap();
                let upstream_address = executor.address(&upstream);
                let scratch = executor.alloc(anchors * size_of::<f32>()).unwrap();
                let scratch_address = executor.address(&scratch);
                // The whole pass.
                let whole = executor.alloc(layout.bytes()).unwrap();
                let whole_grad = executor.alloc(shape.elements() * size_of::<f32>()).unwrap();
                let [whole_address, whole_grad_address] =
                    [&whole, &whole_grad].map(|b| executor.address(b));
                // SAFETY: the inputs hold B·V·D f32, B i64, B·B f32 or B·K bytes, the
                // workspace its layout's bytes, the upstream R doubles, the scratch R floats,
                // the gradient B·V·D floats; all outlive the synchronous emulated launches.
                unsafe {
                    forward_into(
                        executor,
                        &problem,
                        features_address,
                        positives,
                        whole_address,
                    )
                    .unwrap();
                    backward_shard_from(
                        executor,
                        &problem,
                        features_address,
                        positives,
                        whole_address,
                        upstream_address,
                        scratch_address,
                        whole_grad_address,
                        0..batch,
                    )
                    .unwrap();
                }
                let expected: Vec<u8> = download_vec(executor, &whole, layout.bytes()).unwrap();
                let expected_grad: Vec<f32> =
                    download_vec(executor, &whole_grad, shape.elements()).unwrap();
                for sizes in [vec![7], vec![3, 1, 3], vec![2, 0, 5], vec![1, 2, 1, 3]] {
                    let shards: Vec<Range<usize>> = sizes
                        .iter()
                        .scan(0, |start, &size| {
                            *start += size;
                            Some(*start - size..*start)
                        })
                        .collect();
                    let workspaces: Vec<_> = shards
                        .iter()
                        .map(|_| executor.alloc(layout.bytes()).unwrap())
                        .collect();
                    let addresses: Vec<u64> =
                        workspaces.iter().map(|w| executor.address(w)).collect();
                    for (samples, &at) in shards.iter().zip(&addresses) {
                        // Poison: every byte that no shard and no copy writes shows.
                        // SAFETY: the workspace holds the layout's bytes.
                        unsafe { std::ptr::write_bytes(at as *mut u8, 0xA5, layout.bytes()) };
                        if samples.is_empty() {
                            continue;
                        }
                        // SAFETY: as for the whole pass.
                        unsafe {
                            forward_shard_into(
                                executor,
                                &problem,
                                features_address,
                                positives,
                                at,
                                samples.clone(),
                            )
                            .unwrap();
                        }
                    }
                    // The exchange: each shard's anchors' entries of the nine statistics.
                    let outputs = layout.outputs;
                    for (source, samples) in shards.iter().enumerate() {
                        for run in crate::shard::anchor_runs(loss, shape, samples) {
                            for k in 0..WorkspaceLayout::STATISTICS {
                                let offset = outputs.per_anchor_offset()
                                    + k * outputs.statistics_stride()
                                    + run.start * size_of::<f32>();
                                for (target, &at) in addresses.iter().enumerate() {
                                    if target != source {
                                        // SAFETY: both workspaces hold the layout's bytes.
                                        unsafe {
                                            std::ptr::copy_nonoverlapping(
                                                (addresses[source] + offset as u64) as *const u8,
                                                (at + offset as u64) as *mut u8,
                                                run.len() * size_of::<f32>(),
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                    let mut grad = Vec::new();
                    for (rank, samples) in shards.iter().enumerate() {
                        let at = addresses[rank];
                        let rows = samples.len() * views * dim;
                        let shard_grad = executor.alloc(rows.max(1) * size_of::<f32>()).unwrap();
                        let shard_grad_address = executor.address(&shard_grad);
                        // SAFETY: as for the whole pass; the shard's gradient holds its
                        // (b1 − b0)·V·D floats.
                        unsafe {
                            finalize_into(executor, &problem, positives.set_classes(), at).unwrap();
                            if !samples.is_empty() {
                                backward_shard_from(
                                    executor,
                                    &problem,
                                    features_address,
                                    positives,
                                    at,
                                    upstream_address,
                                    scratch_address,
                                    shard_grad_address,
                                    samples.clone(),
                                )
                                .unwrap();
                            }
                        }
                        grad.extend(download_vec::<_, f32>(executor, &shard_grad, rows).unwrap());
                        // The loss, the count and the statistics (Ψ_i and log A_i are one
                        // positive's only); the regions' padding, the prepared positives' and
                        // the column shares' partials are no outputs (the gradient reads the
                        // prepared positives).
                        let got: Vec<u8> =
                            download_vec(executor, &workspaces[rank], layout.bytes()).unwrap();
                        let written = match loss.denominator() {
                            Denominator::OnePositive => WorkspaceLayout::STATISTICS,
                            _ => WorkspaceLayout::STATISTICS - 2,
                        };
                        let regions = (0..written).map(|k| {
                            let at = outputs.per_anchor_offset() + k * outputs.statistics_stride();
                            at..at + anchors * size_of::<f32>()
                        });
                        let count = outputs.anchors_without_positives_offset();
                        for region in [0..8, count..count + 4].into_iter().chain(regions) {
                            assert!(
                                got[region.clone()] == expected[region.clone()],
                                "{what} {sizes:?}: rank {rank}'s workspace at {region:?}"
                            );
                        }
                    }
                    let bits = |g: &[f32]| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&grad),
                        bits(&expected_grad),
                        "{what} {sizes:?}: gradient"
                    );
                }
                // An empty or out-of-range shard is refused before anything runs.
                for samples in [3..3, 5..8] {
                    // SAFETY: nothing is launched for a refused shard.
                    let refused = unsafe {
                        forward_shard_into(
                            executor,
                            &problem,
                            features_address,
                            positives,
                            whole_address,
                            samples,
                        )
                    };
                    assert!(matches!(refused, Err(Error::InvalidShard(_))), "{what}");
                }
            }
        }
    }

    /// `HostExecutor`, counting downloads: on a device each one synchronises the stream.
    struct CountingExecutor {
        downloads: usize,
    }

    impl KernelExecutor for CountingExecutor {
        type Buffer = <HostExecutor as KernelExecutor>::Buffer;

        fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer> {
            HostExecutor.alloc(bytes)
        }

        fn upload(&mut self, bytes: &[u8]) -> Result<Self::Buffer> {
            HostExecutor.upload(bytes)
        }

        fn download(&mut self, buffer: &Self::Buffer, out: &mut [u8]) -> Result<()> {
            self.downloads += 1;
            HostExecutor.download(buffer, out)
        }

        fn address(&self, buffer: &Self::Buffer) -> u64 {
            HostExecutor.address(buffer)
        }

        fn max_dynamic_shared_bytes(&self) -> u64 {
            HostExecutor.max_dynamic_shared_bytes()
        }

        unsafe fn launch<P: crate::device::abi::KernelParams>(
            &mut self,
            kernel: crate::device::kernel::Kernel,
            config: crate::device::plan::LaunchConfig,
            params: &P,
        ) -> Result<()> {
            // SAFETY: forwarded from this function's contract.
            unsafe { HostExecutor.launch(kernel, config, params) }
        }
    }

    /// The device-side coefficients equal the host's bit for bit (every reduction, both
    /// policies that allow anchors without positives — with some here: singleton labels at
    /// V = 1 —, scalar and per-anchor upstreams), and a resident backward pass downloads
    /// nothing; under `NoPositivePolicy::Error` it reads the statistics back and fails.
    #[test]
    fn device_coefficients_match_the_host_and_need_no_download() {
        let (batch, views, dim) = (300, 1, 5);
        let features = Array3::<f32>::from_shape_fn((batch, views, dim), |(b, _, d)| {
            ((b * 7 + d * 3) as f32 * 0.61).cos()
        });
        // Classes of 2–3 samples, every 10th sample alone (no positive at V = 1).
        let labels = Array1::from_shape_fn(batch, |b| {
            if b % 10 == 0 {
                1000 + b as i64
            } else {
                (b / 3) as i64
            }
        });
        let shape = BatchShape::new(batch, views, dim).unwrap();
        let executor = &mut CountingExecutor { downloads: 0 };
        let features_buffer = executor
            .upload(bytemuck::cast_slice(features.as_slice().unwrap()))
            .unwrap();
        let labels_buffer = executor
            .upload(bytemuck::cast_slice(labels.as_slice().unwrap()))
            .unwrap();
        let inputs = InputAddresses {
            features: executor.address(&features_buffer),
            positives: PositiveAddresses::Labels(executor.address(&labels_buffer)),
            cap_bounds: 0,
            row_scales: 0,
        };
        let per_anchor_upstream = Array1::from_shape_fn(batch, |i| 0.5 - (i % 7) as f64 * 0.3);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for policy in [
                NoPositivePolicy::ZeroAndCount,
                NoPositivePolicy::Exclude,
                NoPositivePolicy::Error,
            ] {
                let loss = SupConLoss::builder()
                    .temperature(0.3)
                    .base_temperature(0.07)
                    .reduction(reduction)
                    .no_positive(policy)
                    .build()
                    .unwrap();
                let what = format!("{reduction:?} {policy:?}");
                let problem =
                    Problem::new("emulated", &loss, shape, DType::F32, Precision::Auto).unwrap();
                // SAFETY: the inputs hold B·V·D f32 and B i64 and outlive the launches (the
                // emulation's launches are synchronous).
                let statistics =
                    unsafe { launch::launch_forward(executor, &problem, &inputs) }.unwrap();
                let upstream = match reduction {
                    Reduction::None => Upstream::PerAnchor(per_anchor_upstream.view()),
                    _ => Upstream::Scalar(-1.75),
                };
                let grad = executor
                    .alloc(batch * views * dim * size_of::<f32>())
                    .unwrap();
                let grad_address = executor.address(&grad);
                executor.downloads = 0;
                // SAFETY: as above; `grad` holds B·V·D f32.
                let result = unsafe {
                    backward(
                        executor,
                        &problem,
                        &inputs,
                        &statistics,
                        upstream,
                        grad_address,
                    )
                };
                if policy == NoPositivePolicy::Error {
                    assert!(
                        matches!(
                            result,
                            Err(crate::Error::AnchorWithoutPositives { anchor: 0 })
                        ),
                        "{what}: {result:?}"
                    );
                    continue;
                }
                result.unwrap();
                assert_eq!(executor.downloads, 0, "{what}: the backward pass read back");
                // SAFETY: the statistics are this problem's and alive.
                let device = unsafe {
                    launch::launch_coefficients(executor, &problem, &statistics, upstream)
                }
                .unwrap();
                let device: Vec<f32> = download_vec(executor, &device, problem.anchors()).unwrap();
                let state = launch::to_host(executor, &problem, &statistics)
                    .unwrap()
                    .state;
                let host = launch::grad_coefficients(&state, upstream).unwrap();
                assert!(host.contains(&0.0) && host.iter().any(|&c| c != 0.0));
                let differs = (0..host.len()).find(|&i| device[i].to_bits() != host[i].to_bits());
                if let Some(i) = differs {
                    panic!(
                        "{what}: anchor {i}: device {:e}, host {:e}",
                        device[i], host[i]
                    );
                }
            }
        }
    }
}
