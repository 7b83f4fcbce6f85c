//! Shards: the one computation behind the single-device loss, the sharded loss and the memory
//! bank (docs/math.md, "Shards").
//!
//! A shard is a run of samples `b0..b1` of a batch. Its anchors are the anchor rows of those
//! samples (every view under contrast mode `All`, view 0 under `One`); its rows are all their
//! views. [`Backend::forward_shard`](crate::Backend::forward_shard) computes the statistics of a
//! shard's anchors against every row of the batch; [`ForwardOutput::from_shards`] assembles
//! disjoint shards into the forward output of the whole batch, and
//! [`Backend::backward_shard`](crate::Backend::backward_shard) computes the gradient of one
//! shard's rows from that output's state.
//!
//! - Single device: one shard of all samples.
//! - Sharded over W ranks: rank r's samples are its shard; the statistics are all-gathered.
//! - Memory bank: the batch's samples are the one shard, the bank's samples follow them in the
//!   batch and belong to no shard, so they are contrasts only and get no gradient.
//!
//! Samples that no shard covers are not anchors: their state entries are those of an anchor
//! without positives (P = 0, so the backward gives them no term), and the reduction counts
//! only covered anchors.

use std::ops::Range;

use ndarray::{s, Array1, Array3};

use crate::backend::{reduce, ForwardOutput, SavedState};
use crate::config::{ContrastMode, NoPositivePolicy, SupConLoss};
use crate::error::{Error, Result};
use crate::inputs::BatchShape;

/// The statistics of one shard's anchors (see the module docs): per anchor ℓ_i, LSE_i,
/// LSE^P_i and P_i, in shard order: for each anchor view v, the samples in order, so entry
/// `v·(b1 − b0) + (b − b0)` belongs to row `v·B + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardStatistics {
    samples: Range<usize>,
    per_anchor: Vec<f64>,
    lse: Vec<f64>,
    lse_positive: Vec<f64>,
    positive_weight: Vec<f64>,
}

impl ShardStatistics {
    /// Statistics from their parts, for engines that move them between processes:
    /// `[ℓ, LSE, LSE^P, P]`, each with one value per anchor of `samples` (shard order).
    ///
    /// # Errors
    /// [`Error::InvalidShard`] if `samples` do not fit `shape` or a vector has the wrong
    /// length.
    pub fn from_parts(
        loss: &SupConLoss,
        shape: BatchShape,
        samples: Range<usize>,
        [per_anchor, lse, lse_positive, positive_weight]: [Vec<f64>; 4],
    ) -> Result<Self> {
        let parts = [&per_anchor, &lse, &lse_positive, &positive_weight];
        check_parts(loss, shape, &samples, parts.map(Vec::as_slice))?;
        Ok(ShardStatistics {
            samples,
            per_anchor,
            lse,
            lse_positive,
            positive_weight,
        })
    }

    /// The shard's samples.
    pub fn samples(&self) -> Range<usize> {
        self.samples.clone()
    }
    /// ℓ_i per anchor (0 for an anchor without positives).
    pub fn per_anchor(&self) -> &[f64] {
        &self.per_anchor
    }
    /// LSE_i per anchor.
    pub fn lse(&self) -> &[f64] {
        &self.lse
    }
    /// LSE^P_i per anchor.
    pub fn lse_positive(&self) -> &[f64] {
        &self.lse_positive
    }
    /// P_i per anchor.
    pub fn positive_weight(&self) -> &[f64] {
        &self.positive_weight
    }

    /// The statistics of `samples` picked out of a whole batch's per-anchor ℓ, LSE, LSE^P and
    /// P (entries of other anchors are not read).
    ///
    /// # Errors
    /// [`Error::InvalidShard`] for samples outside the batch; [`Error::Overflow`] for a
    /// non-finite ℓ_i, as the whole forward pass reports it.
    pub(crate) fn pick(
        loss: &SupConLoss,
        shape: BatchShape,
        samples: Range<usize>,
        all: [&[f64]; 4],
    ) -> Result<Self> {
        check_samples(shape, &samples)?;
        let [per_anchor, lse, lse_positive, positive_weight] =
            all.map(|values| pick(loss, shape, &samples, values));
        if per_anchor.iter().any(|l| !l.is_finite()) {
            return Err(Error::Overflow { output: "loss" });
        }
        Ok(ShardStatistics {
            samples,
            per_anchor,
            lse,
            lse_positive,
            positive_weight,
        })
    }

    /// The statistics of `samples` out of a whole batch's forward output.
    ///
    /// # Errors
    /// As [`pick`](Self::pick).
    pub(crate) fn of_output(
        loss: &SupConLoss,
        shape: BatchShape,
        samples: Range<usize>,
        output: &ForwardOutput,
    ) -> Result<Self> {
        let state = &output.state;
        let per_anchor = output.per_anchor.as_slice().expect("a vector");
        let all = [
            per_anchor,
            &state.lse,
            &state.lse_positive,
            &state.positive_weight,
        ];
        Self::pick(loss, shape, samples, all)
    }
}

/// Fails unless `samples` fit `shape` and each part holds one value per anchor of theirs.
fn check_parts(
    loss: &SupConLoss,
    shape: BatchShape,
    samples: &Range<usize>,
    parts: [&[f64]; 4],
) -> Result<()> {
    check_samples(shape, samples)?;
    let anchors = anchor_views(loss, shape) * samples.len();
    if parts.iter().any(|values| values.len() != anchors) {
        return Err(Error::InvalidShard(format!(
            "samples {samples:?} have {anchors} anchors, so each statistic needs {anchors} values"
        )));
    }
    Ok(())
}

/// The entries of a shard's anchors out of per-anchor `values` of the whole batch, in shard
/// order.
pub(crate) fn pick(
    loss: &SupConLoss,
    shape: BatchShape,
    samples: &Range<usize>,
    values: &[f64],
) -> Vec<f64> {
    anchor_rows(loss, shape, samples)
        .map(|i| values[i])
        .collect()
}

/// A shard's per-anchor `values` (shard order) written at its anchors' entries of the whole
/// batch's `all`.
pub(crate) fn place(
    loss: &SupConLoss,
    shape: BatchShape,
    samples: &Range<usize>,
    values: &[f64],
    all: &mut [f64],
) {
    for (i, &value) in anchor_rows(loss, shape, samples).zip(values) {
        all[i] = value;
    }
}

/// Fails unless `samples` is a non-empty run of `shape`'s samples.
///
/// # Errors
/// [`Error::InvalidShard`].
pub(crate) fn check_samples(shape: BatchShape, samples: &Range<usize>) -> Result<()> {
    if samples.is_empty() || samples.end > shape.batch() {
        return Err(Error::InvalidShard(format!(
            "samples {samples:?} are not a non-empty run of the batch's {} samples",
            shape.batch()
        )));
    }
    Ok(())
}

/// The number of anchor views: V under `All`, 1 under `One`.
fn anchor_views(loss: &SupConLoss, shape: BatchShape) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => shape.views(),
        ContrastMode::One => 1,
    }
}

/// The anchor rows (`v·B + b`) of a shard, in shard order.
pub(crate) fn anchor_rows(
    loss: &SupConLoss,
    shape: BatchShape,
    samples: &Range<usize>,
) -> impl Iterator<Item = usize> {
    anchor_runs(loss, shape, samples).flatten()
}

/// The anchor rows of a shard as runs of consecutive rows, one per anchor view (the kernels'
/// launches): the first of its [`row_runs`].
pub(crate) fn anchor_runs(
    loss: &SupConLoss,
    shape: BatchShape,
    samples: &Range<usize>,
) -> impl Iterator<Item = Range<usize>> {
    row_runs(shape, samples).take(anchor_views(loss, shape))
}

/// The rows of a shard's views as view-major row runs `v·B + b0 .. v·B + b1`, one per view.
pub(crate) fn row_runs(
    shape: BatchShape,
    samples: &Range<usize>,
) -> impl Iterator<Item = Range<usize>> {
    let (batch, samples) = (shape.batch(), samples.clone());
    (0..shape.views()).map(move |v| v * batch + samples.start..v * batch + samples.end)
}

/// The loss for a backend's whole-batch forward pass behind a shard: the no-positive policy's
/// error applies to the assembled batch ([`ForwardOutput::from_shards`]), not to anchors of
/// other shards.
pub(crate) fn without_policy_error(loss: &SupConLoss) -> SupConLoss {
    match loss.no_positive() {
        NoPositivePolicy::Error => loss
            .to_builder()
            .no_positive(NoPositivePolicy::ZeroAndCount)
            .build()
            .expect("a valid loss stays valid"),
        _ => *loss,
    }
}

/// The rows of `samples` out of a whole batch's gradient `[B, V, D]`.
pub(crate) fn gradient_rows<G: Clone>(grad: &Array3<G>, samples: &Range<usize>) -> Array3<G> {
    grad.slice(s![samples.clone(), .., ..]).to_owned()
}

impl ForwardOutput {
    /// The forward output of a whole batch of `shape` from the statistics of disjoint shards
    /// (see the module docs): the loss reduced over the covered anchors, ℓ_i for every anchor of
    /// the batch (0 where no shard covers it), and the state every shard's
    /// [`backward_shard`](crate::Backend::backward_shard) needs. The state has no fingerprint.
    ///
    /// # Errors
    /// [`Error::InvalidShard`] (a shard outside the batch, overlapping shards, statistics of the
    /// wrong length, no shard); [`Error::AnchorWithoutPositives`] under
    /// [`NoPositivePolicy::Error`] (the anchor row is the batch's); [`Error::Overflow`].
    pub fn from_shards(
        loss: &SupConLoss,
        shape: BatchShape,
        shards: &[ShardStatistics],
    ) -> Result<ForwardOutput> {
        let anchors = shape.anchors(loss.contrast_mode());
        let mut covered = vec![false; anchors];
        let mut per_anchor = vec![0.0; anchors];
        // An uncovered row is an anchor without positives: P = 0 zeroes its gradient terms.
        let mut lse = vec![0.0; anchors];
        let mut lse_positive = vec![f64::NEG_INFINITY; anchors];
        let mut positive_weight = vec![0.0; anchors];
        if shards.is_empty() {
            return Err(Error::InvalidShard("no shard covers any sample".into()));
        }
        for shard in shards {
            let parts = [
                &shard.per_anchor[..],
                &shard.lse,
                &shard.lse_positive,
                &shard.positive_weight,
            ];
            check_parts(loss, shape, &shard.samples, parts)?;
            for (k, i) in anchor_rows(loss, shape, &shard.samples).enumerate() {
                if std::mem::replace(&mut covered[i], true) {
                    return Err(Error::InvalidShard(format!(
                        "shards overlap at sample {}",
                        shape.sample_of(i)
                    )));
                }
                per_anchor[i] = shard.per_anchor[k];
                lse[i] = shard.lse[k];
                lse_positive[i] = shard.lse_positive[k];
                positive_weight[i] = shard.positive_weight[k];
            }
        }
        let rows: Vec<usize> = (0..anchors).filter(|&i| covered[i]).collect();
        let pick = |values: &[f64]| -> Vec<f64> { rows.iter().map(|&i| values[i]).collect() };
        let (reduced, mean_denominator) = reduce(loss, &pick(&per_anchor), &pick(&positive_weight))
            .map_err(|error| match error {
                Error::AnchorWithoutPositives { anchor } => Error::AnchorWithoutPositives {
                    anchor: rows[anchor],
                },
                other => other,
            })?;
        let output = ForwardOutput {
            loss: reduced,
            per_anchor: Array1::from(per_anchor),
            state: SavedState {
                loss: *loss,
                shape,
                lse,
                lse_positive,
                positive_weight,
                mean_denominator,
                fingerprint: None,
            },
        };
        crate::backend::check_finite_loss(&output)?;
        Ok(output)
    }
}
