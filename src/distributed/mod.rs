//! Beyond one device: the exact sharded loss over a group of ranks (docs/scaling.md).
//!
//! Rank r holds B_r samples (`[B_r, V, D]` features and their positives); the batch is the
//! ranks' samples concatenated in rank order, B = Σ B_r. Each step, on every rank:
//!
//! 1. Forward: all-gather the features and positives (N·D + O(B) elements); compute the
//!    statistics of the rank's own anchors against all N rows
//!    ([`Backend::forward_shard`], n × N logits); all-gather those O(n) statistics; assemble
//!    them ([`ForwardOutput::from_shards`]). Every rank holds the same global loss.
//! 2. Backward: all-reduce the upstream gradient (a scalar; per-anchor values are
//!    all-gathered), then compute the rank's rows of ∂L/∂Z from every anchor's statistics
//!    ([`Backend::backward_shard`]). No N × D gradient is communicated.
//!
//! On device buffers, with a [`crate::CudaBackend`] and an `NcclGroup` on one stream,
//! `ShardedSupCon::forward_device` and `backward_device` (feature `nccl`) run the same steps
//! with the features, the statistics and the gradient on the GPU.
//!
//! The gradient is that of the sum of every rank's objective, Σ_r u_r·L: each rank's L is the
//! whole batch's loss, as with gather-with-grad, whose reduce-scatter sums the same terms. So
//! under data parallelism, which averages parameter gradients over W ranks, a plain
//! `loss.backward()` on every rank gives exactly the one-process gradient of the whole batch:
//! no scaling by the world size.

mod in_process;

use std::ops::Range;

use ndarray::{Array1, Array2, Array3, ArrayView3};

use crate::backend::{Backend, ForwardOutput, Upstream};
use crate::config::SupConLoss;
use crate::element::{Element, GradElement};
use crate::error::{Error, Result};
use crate::inputs::{BatchShape, OwnedPositives, Positives};
use crate::shard::{self, anchor_rows, ShardStatistics};

#[cfg(feature = "nccl")]
pub use crate::cuda::{NcclGroup, NcclId, ShardedDeviceForward};
pub use in_process::InProcessGroup;

/// The collective operations a sharded loss needs, over a fixed group of ranks. Every rank of
/// the group calls the same operations in the same order (as with NCCL or
/// `torch.distributed`).
pub trait Collectives {
    /// This rank's index, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `bytes`, in rank order; ranks may contribute different lengths.
    ///
    /// # Errors
    /// [`Error::Collective`] when the operation fails (a rank left the group, a transport
    /// error).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// The sum over ranks of each entry of `values` (the same length on every rank), written
    /// back in place. The default all-gathers and adds in rank order, so every rank gets the
    /// same bits.
    ///
    /// # Errors
    /// [`Error::Collective`], also when the ranks' lengths differ.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let gathered = all_gather(self, values)?;
        if gathered.iter().any(|other| other.len() != values.len()) {
            return Err(Error::Collective {
                operation: "all_reduce",
                reason: "the ranks reduce vectors of different lengths".into(),
            });
        }
        for (k, value) in values.iter_mut().enumerate() {
            *value = gathered.iter().map(|other| other[k]).sum();
        }
        Ok(())
    }
}

/// [`Collectives::all_gather_bytes`] of typed values.
///
/// # Errors
/// As `all_gather_bytes`, and [`Error::Collective`] for a rank's bytes that are not whole values.
pub fn all_gather<T: bytemuck::Pod, C: Collectives + ?Sized>(
    group: &C,
    values: &[T],
) -> Result<Vec<Vec<T>>> {
    let gathered = group.all_gather_bytes(bytemuck::cast_slice(values))?;
    gathered
        .into_iter()
        .map(|bytes| {
            if bytes.len() % size_of::<T>() == 0 {
                let mut values = vec![T::zeroed(); bytes.len() / size_of::<T>()];
                bytemuck::cast_slice_mut(&mut values).copy_from_slice(&bytes);
                Ok(values)
            } else {
                Err(Error::Collective {
                    operation: "all_gather",
                    reason: format!("{} bytes are not whole values", bytes.len()),
                })
            }
        })
        .collect()
}

/// What every rank must agree on: the kind of positives (and a label set weight), V, D and K
/// (the label sets' classes, or the mask's columns); after B_r, and before whether the rank's
/// own inputs are valid (1) or not (0).
pub(crate) fn header(
    (batch, views, dim): (usize, usize, usize),
    (kind, width): (u64, usize),
    valid: bool,
) -> [u64; 6] {
    [
        batch as u64,
        views as u64,
        dim as u64,
        kind,
        width as u64,
        u64::from(valid),
    ]
}

/// The kind of host positives and their width, as [`header`] takes them.
fn kind_of(positives: &Positives<'_>) -> (u64, usize) {
    match positives {
        Positives::SimClr => (0, 0),
        Positives::Labels(_) => (1, 0),
        Positives::Mask(mask) => (2, mask.ncols()),
        Positives::LabelSets { sets, weight } => (3 + *weight as u64, sets.ncols()),
    }
}

/// Every rank's samples in the whole batch, once the ranks have exchanged their [`header`]s
/// (`mine`) and found them valid and in agreement: each rank learns of every other's bad
/// inputs before the next collective, so that all return an error instead of some waiting
/// forever. `local` is this rank's own check, returned after the exchange.
pub(crate) fn agree<C: Collectives + ?Sized>(
    group: &C,
    mine: [u64; 6],
    local: Result<()>,
) -> Result<Vec<Range<usize>>> {
    let headers = all_gather(group, &mine)?;
    local?;
    if let Some(rank) = headers.iter().position(|h| h.len() != 6 || h[5] != 1) {
        return Err(Error::Collective {
            operation: "forward",
            reason: format!("rank {rank}'s inputs are invalid"),
        });
    }
    if headers.iter().any(|h| h[1..5] != mine[1..5]) {
        return Err(Error::Collective {
            operation: "forward",
            reason: "the ranks' views, dim or positives differ".into(),
        });
    }
    let mut shards = Vec::with_capacity(headers.len());
    let mut batch = 0usize;
    for h in &headers {
        let size = usize::try_from(h[0]).expect("a rank's batch fits usize");
        shards.push(batch..batch + size);
        batch += size;
    }
    Ok(shards)
}

/// The SupCon loss over a group of ranks, each holding its own samples (see the module docs):
/// exact, the same loss and gradient as one device on the concatenated batch.
#[derive(Debug, Clone)]
pub struct ShardedSupCon<B, C> {
    loss: SupConLoss,
    backend: B,
    group: C,
}

/// One rank's forward pass: the batch gathered from every rank and the global state, kept for
/// [`ShardedSupCon::backward`]. O(N·D) memory (the gathered features), nothing N × N.
#[derive(Debug, Clone)]
pub struct ShardedForward<T> {
    features: Array3<T>,
    positives: OwnedPositives,
    /// Every rank's samples, in rank order.
    shards: Vec<Range<usize>>,
    rank: usize,
    output: ForwardOutput,
}

impl<T> ShardedForward<T> {
    /// The loss of the whole batch (the same on every rank); `None` under reduction none.
    pub fn loss(&self) -> Option<f64> {
        self.output.loss
    }
    /// ℓ_i of this rank's anchors, in shard order (`crate::ShardStatistics`): for each anchor
    /// view, this rank's samples in order.
    pub fn local_per_anchor(&self) -> Vec<f64> {
        let state = &self.output.state;
        let all = self.output.per_anchor.as_slice().expect("a vector");
        shard::pick(&state.loss, state.shape, self.samples(), all)
    }
    /// The whole batch's forward output (ℓ_i of every anchor, the state).
    pub fn output(&self) -> &ForwardOutput {
        &self.output
    }
    /// This rank's samples in the whole batch.
    pub fn samples(&self) -> &Range<usize> {
        &self.shards[self.rank]
    }
}

impl<B: Backend, C: Collectives> ShardedSupCon<B, C> {
    /// The loss `loss` on `backend`, over the ranks of `group`.
    pub fn new(loss: SupConLoss, backend: B, group: C) -> Self {
        ShardedSupCon {
            loss,
            backend,
            group,
        }
    }

    /// The group.
    pub fn group(&self) -> &C {
        &self.group
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The loss configuration.
    pub fn loss(&self) -> &SupConLoss {
        &self.loss
    }

    /// This rank's forward pass on its `[B_r, V, D]` features and their positives: labels or
    /// label sets of its samples (`[B_r]`, `[B_r, K]`), SimCLR, or its rows of the whole
    /// batch's mask (`[B_r, B]`, columns in the concatenated order). Every rank of the group
    /// must call it, with the same V, D and kind of positives.
    ///
    /// # Errors
    /// The backend's errors for the whole batch; [`Error::Collective`] when the ranks
    /// disagree or a collective fails; shape errors for this rank's inputs.
    pub fn forward<T: Element>(
        &self,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ShardedForward<T>> {
        let (_, views, dim) = features.dim();
        let local = check_local(features.dim().0, &positives);
        let mine = header(features.dim(), kind_of(&positives), local.is_ok());
        let shards = agree(&self.group, mine, local)?;
        let batch = shards.last().map_or(0, |last| last.end);
        let shape = BatchShape::new(batch, views, dim)?;
        if let Positives::Mask(mask) = positives {
            if mask.ncols() != batch {
                return Err(Error::MaskShape {
                    expected: batch,
                    got: [mask.nrows(), mask.ncols()],
                });
            }
        }
        let values: Vec<T> = features.iter().copied().collect();
        let gathered = all_gather(&self.group, &values)?.concat();
        let features = Array3::from_shape_vec((batch, views, dim), gathered)
            .map_err(|_| collective_error("the gathered features have the wrong length"))?;
        let positives = self.gather_positives(&positives, batch)?;
        let rank = self.group.rank();
        // A rank without samples has no anchors, and contributes no statistics.
        let flat = if shards[rank].is_empty() {
            Vec::new()
        } else {
            let statistics = self.backend.forward_shard(
                &self.loss,
                features.view(),
                positives.view(),
                shards[rank].clone(),
            )?;
            [
                statistics.per_anchor(),
                statistics.lse(),
                statistics.lse_positive(),
                statistics.positive_weight(),
            ]
            .concat()
        };
        let mut all = Vec::with_capacity(shards.len());
        for (samples, flat) in shards.iter().zip(all_gather(&self.group, &flat)?) {
            let anchors = flat.len() / 4;
            let parts = [0, 1, 2, 3].map(|k| flat[k * anchors..(k + 1) * anchors].to_vec());
            if !samples.is_empty() {
                all.push(ShardStatistics::from_parts(
                    &self.loss,
                    shape,
                    samples.clone(),
                    parts,
                )?);
            }
        }
        let output = ForwardOutput::from_shards(&self.loss, shape, &all)?;
        Ok(ShardedForward {
            features,
            positives,
            shards,
            rank,
            output,
        })
    }

    /// This rank's ∂(objective)/∂features, `[B_r, V, D]`, where the objective is the sum over
    /// ranks of each rank's `upstream` times its output (see the module docs): a scalar for a
    /// reduced loss, or one value per local anchor (shard order) under reduction none. Every
    /// rank of the group must call it.
    ///
    /// # Errors
    /// The backend's; [`Error::UpstreamMismatch`]; [`Error::Collective`].
    pub fn backward<T: Element>(
        &self,
        forward: &ShardedForward<T>,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        let state = &forward.output.state;
        let (loss, samples) = (&self.loss, forward.samples());
        let global_upstream =
            self.global_upstream(state.shape, &forward.shards, samples, upstream)?;
        let upstream = match &global_upstream {
            GlobalUpstream::Scalar(u) => Upstream::Scalar(*u),
            GlobalUpstream::PerAnchor(values) => Upstream::PerAnchor(values.view()),
        };
        if samples.is_empty() {
            let (_, views, dim) = forward.features.dim();
            return Ok(Array3::from_elem((0, views, dim), T::Grad::from_f64(0.0)));
        }
        self.backend.backward_shard(
            loss,
            forward.features.view(),
            forward.positives.view(),
            state,
            upstream,
            samples.clone(),
        )
    }

    /// The upstream gradient of the whole batch from every rank's `upstream` (a reduced loss:
    /// their sum; reduction none: each rank's values placed at its anchors). As in `forward`,
    /// every rank learns whether every other's upstream is valid before it uses the values.
    pub(crate) fn global_upstream(
        &self,
        shape: BatchShape,
        shards: &[Range<usize>],
        samples: &Range<usize>,
        upstream: Upstream<'_>,
    ) -> Result<GlobalUpstream> {
        let loss = &self.loss;
        let local_anchors = anchor_rows(loss, shape, samples).count();
        let check = crate::backend::check_upstream(loss.reduction(), local_anchors, upstream);
        let valid = f64::from(u8::from(check.is_ok()));
        Ok(match upstream {
            Upstream::Scalar(u) => {
                let mut total = [if check.is_ok() { u } else { 0.0 }, valid];
                self.group.all_reduce_sum(&mut total)?;
                check?;
                if total[1] != self.group.world() as f64 {
                    return Err(invalid_upstream());
                }
                GlobalUpstream::Scalar(total[0])
            }
            Upstream::PerAnchor(u) => {
                let mut payload = u.to_vec();
                payload.push(valid);
                let gathered = all_gather(&self.group, &payload)?;
                check?;
                let mut values = vec![0.0; shape.anchors(loss.contrast_mode())];
                for (samples, payload_of_rank) in shards.iter().zip(gathered) {
                    let anchors = anchor_rows(loss, shape, samples).count();
                    let (flag, values_of_rank) =
                        payload_of_rank.split_last().unwrap_or((&0.0, &[]));
                    if *flag != 1.0 || values_of_rank.len() != anchors {
                        return Err(invalid_upstream());
                    }
                    shard::place(loss, shape, samples, values_of_rank, &mut values);
                }
                GlobalUpstream::PerAnchor(Array1::from(values))
            }
        })
    }

    fn gather_positives(&self, positives: &Positives<'_>, batch: usize) -> Result<OwnedPositives> {
        Ok(match positives {
            Positives::SimClr => OwnedPositives::SimClr,
            Positives::Labels(labels) => {
                let values: Vec<i64> = labels.iter().copied().collect();
                OwnedPositives::Labels(Array1::from(all_gather(&self.group, &values)?.concat()))
            }
            Positives::Mask(mask) => {
                let values: Vec<f32> = mask.iter().copied().collect();
                let gathered = all_gather(&self.group, &values)?.concat();
                OwnedPositives::Mask(
                    Array2::from_shape_vec((batch, batch), gathered)
                        .map_err(|_| collective_error("the gathered mask has the wrong length"))?,
                )
            }
            Positives::LabelSets { sets, weight } => {
                let values: Vec<u8> = sets.iter().map(|&s| u8::from(s)).collect();
                let gathered = all_gather(&self.group, &values)?.concat();
                let sets = Array2::from_shape_vec(
                    (batch, sets.ncols()),
                    gathered.into_iter().map(|s| s != 0).collect(),
                )
                .map_err(|_| collective_error("the gathered label sets have the wrong length"))?;
                OwnedPositives::LabelSets {
                    sets,
                    weight: *weight,
                }
            }
        })
    }
}

/// The upstream gradient of the whole batch, owned.
pub(crate) enum GlobalUpstream {
    Scalar(f64),
    PerAnchor(Array1<f64>),
}

fn invalid_upstream() -> Error {
    Error::Collective {
        operation: "backward",
        reason: "another rank's upstream gradient is invalid".into(),
    }
}

fn collective_error(reason: &str) -> Error {
    Error::Collective {
        operation: "all_gather",
        reason: reason.into(),
    }
}

/// Fails unless a rank's positives have one row per local sample.
fn check_local(local: usize, positives: &Positives<'_>) -> Result<()> {
    match positives {
        Positives::SimClr => Ok(()),
        Positives::Labels(labels) if labels.len() != local => Err(Error::LabelsLength {
            expected: local,
            got: labels.len(),
        }),
        Positives::Mask(mask) if mask.nrows() != local => Err(Error::MaskShape {
            expected: local,
            got: [mask.nrows(), mask.ncols()],
        }),
        Positives::LabelSets { sets, .. } if sets.nrows() != local => Err(Error::LabelSetsShape {
            expected: local,
            got: [sets.nrows(), sets.ncols()],
        }),
        _ => Ok(()),
    }
}
