//! The positive relation laid out per row, so that a tile row of pair weights is one
//! vectorisable loop.
//!
//! `Relation` (`src/reference/relation.rs`) answers one pair at a time and computes the positives
//! cap in O(R·N). The tile loops need a whole tile row at once, without branches, so this module stores
//! per flattened row r: its sample, its class (the dense label id, or the sample itself for
//! SimCLR) and its cap bound, and fills from them, for an anchor i and a run of contrasts j (or a
//! run of anchors and one contrast):
//!
//! - `weight[j]` = w_ij for a kept positive, 0 otherwise;
//! - `bias[j]`   = 0 if j enters some term of anchor i (negative or kept positive), −∞ if it is
//!   excluded (j = i, or a positive dropped by the cap). Adding it to a logit removes the entry
//!   from every max and sum.
//!
//! The cap bound depends only on the anchor's sample and comes in O(1) per sample for labels and
//! O(B) for masks, from the view-major row order: rows j = v·B + b ascend view by view, so the
//! k-th kept positive of another sample is found by division. The semantics are `Relation`'s
//! exactly (unit-tested pair by pair below).

use std::ops::Range;

use crate::config::SupConLoss;
use crate::error::{Error, Extent, Result};
use crate::inputs::{BatchShape, Positives, ScaledMask};

/// Fills tile rows of pair weights and biases (see the module docs).
pub(super) trait PairWeights: Sync {
    /// For anchor `anchor` and the contrasts `contrasts`: `weight[k]`, `bias[k]` of contrast
    /// `contrasts.start + k`. Both slices have `contrasts.len()` entries.
    fn fill_anchor_row(
        &self,
        anchor: usize,
        contrasts: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    );

    /// Whether w_ji = w_ij and exclusions are mutual for every pair (labels or SimCLR, or a
    /// symmetric mask, with no cap bound in effect): then a contrast row is the anchor row of
    /// the same index, and the tile loops fill once for both directions.
    fn is_symmetric(&self) -> bool;

    /// For the anchors `anchors` and contrast `contrast`: `weight[k]`, `bias[k]` of anchor
    /// `anchors.start + k`. Both slices have `anchors.len()` entries.
    fn fill_contrast_row(
        &self,
        contrast: usize,
        anchors: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    );
}

/// Whether an entry with kept-positive weight `weight` is in the anchor's denominator set:
/// every entry under denominator all, the negatives only (`NEG_ONLY`) under only-negatives and
/// one-positive. Excluded entries carry bias −∞, which removes them from every max and sum.
#[inline(always)]
pub(super) fn in_denominator<const NEG_ONLY: bool>(weight: f32) -> bool {
    !NEG_ONLY || weight == 0.0
}

/// The relation of a batch in one of its two layouts.
pub(super) enum Pairs {
    /// SimCLR or labels: positives share a class.
    Class(ClassPairs),
    /// An explicit `[B, B]` weight mask.
    Mask(MaskPairs),
}

/// Per-row facts every layout needs.
struct RowFacts {
    /// Row r's sample, r mod B.
    sample: Vec<u32>,
    /// Row r, as an anchor, keeps a positive of another sample at row j iff `j < cap_bound[r]`
    /// (N without a cap).
    cap_bound: Vec<u32>,
    /// Whether some cap bound drops a positive (bound < N): the relation is then asymmetric.
    capped: bool,
}

impl RowFacts {
    fn new(sample: Vec<u32>, per_sample_bound: &[u32], shape: BatchShape) -> Self {
        let n = shape.rows() as u32;
        RowFacts {
            capped: per_sample_bound.iter().any(|&bound| bound < n),
            cap_bound: (0..shape.rows())
                .map(|r| per_sample_bound[shape.sample_of(r)])
                .collect(),
            sample,
        }
    }
}

/// SimCLR and label batches.
pub(super) struct ClassPairs {
    rows: RowFacts,
    /// Row r's class: a dense id of its label, or its sample for SimCLR.
    class: Vec<u32>,
}

/// Explicit-mask batches.
pub(super) struct MaskPairs {
    rows: RowFacts,
    batch: usize,
    /// The `[B, B]` weights, each row divided by its largest positive weight.
    mask: ScaledMask,
    /// Whether the scaled mask equals its transpose.
    symmetric_mask: bool,
}

impl Pairs {
    /// The relation of a validated batch, the cap applied. Fails if N does not fit in u32.
    pub(super) fn new(
        loss: &SupConLoss,
        shape: BatchShape,
        positives: Positives<'_>,
    ) -> Result<Self> {
        check_rows(shape)?;
        let n = shape.rows();
        let sample: Vec<u32> = (0..n).map(|r| shape.sample_of(r) as u32).collect();
        match positives {
            Positives::SimClr | Positives::Labels(_) => {
                let sample_class = match positives {
                    Positives::Labels(labels) => dense_classes(labels.iter().copied()),
                    _ => (0..shape.batch() as u32).collect(),
                };
                let members = class_members(&sample_class);
                let bounds = per_sample_bounds(loss, shape, |s| {
                    // Other views of one's own sample always share its class.
                    let list = &members[sample_class[s] as usize];
                    let own = list.binary_search(&(s as u32)).unwrap_or_default();
                    let others = list.len() - 1;
                    (shape.views() - 1, others, move |k: usize| {
                        list[if k < own { k } else { k + 1 }] as usize
                    })
                });
                let class = (0..n).map(|r| sample_class[shape.sample_of(r)]).collect();
                Ok(Pairs::Class(ClassPairs {
                    rows: RowFacts::new(sample, &bounds, shape),
                    class,
                }))
            }
            Positives::Mask(mask) => {
                let mask = ScaledMask::new("cpu", &mask, shape.views())?;
                let weights = mask.weights.as_slice().expect("standard layout");
                let batch = shape.batch();
                let bounds = per_sample_bounds(loss, shape, |s| {
                    let row = &weights[s * batch..(s + 1) * batch];
                    let own = if row[s] > 0.0 { shape.views() - 1 } else { 0 };
                    let others: Vec<usize> =
                        (0..batch).filter(|&b| b != s && row[b] > 0.0).collect();
                    (own, others.len(), move |k: usize| others[k])
                });
                let symmetric_mask = mask.weights == mask.weights.t();
                Ok(Pairs::Mask(MaskPairs {
                    rows: RowFacts::new(sample, &bounds, shape),
                    batch,
                    mask,
                    symmetric_mask,
                }))
            }
        }
    }
}

impl Pairs {
    /// W_i: the factor that anchor `anchor`'s weights were divided by (1 for labels and
    /// SimCLR; see [`ScaledMask`]).
    pub(super) fn anchor_scale(&self, anchor: usize) -> f64 {
        match self {
            Pairs::Class(_) => 1.0,
            Pairs::Mask(pairs) => f64::from(pairs.mask.scale[pairs.rows.sample[anchor] as usize]),
        }
    }
}

/// Fails unless the tile loops can index the batch's rows, in u32.
///
/// # Errors
/// [`Error::TooLarge`].
pub(super) fn check_rows(shape: BatchShape) -> Result<()> {
    let (rows, limit) = (shape.rows(), u32::MAX as usize);
    if rows > limit {
        return Err(Error::TooLarge {
            extent: Extent::Rows,
            requested: rows as u128,
            limit: limit as u128,
        });
    }
    Ok(())
}

/// Labels mapped to 0, 1, … in order of their values.
fn dense_classes(labels: impl Iterator<Item = i64> + Clone) -> Vec<u32> {
    let mut distinct: Vec<i64> = labels.clone().collect();
    distinct.sort_unstable();
    distinct.dedup();
    labels
        .map(|label| distinct.binary_search(&label).unwrap_or_default() as u32)
        .collect()
}

/// Per class, its samples in ascending order.
fn class_members(sample_class: &[u32]) -> Vec<Vec<u32>> {
    let classes = sample_class
        .iter()
        .map(|&c| c as usize + 1)
        .max()
        .unwrap_or(0);
    let mut members = vec![Vec::new(); classes];
    for (sample, &class) in sample_class.iter().enumerate() {
        members[class as usize].push(sample as u32);
    }
    members
}

/// Per sample s, the cap bound of its rows (N without a cap). `positives_of(s)` gives
/// (own-sample positives of a row of s, K = positives of other samples per view,
/// k ↦ the k-th of those samples in ascending order).
///
/// With `room` = cap − own positives, the room-th positive of another sample, counting rows
/// j = v·B + b in ascending order, is in view (room−1)/K at the ((room−1) mod K)-th such sample;
/// the bound is one past its row. `Relation::cap_bound_of` walks the rows to the same answer.
fn per_sample_bounds<F, K>(loss: &SupConLoss, shape: BatchShape, positives_of: F) -> Vec<u32>
where
    F: Fn(usize) -> (usize, usize, K),
    K: Fn(usize) -> usize,
{
    let n = shape.rows() as u32;
    let Some(cap) = loss.positives_cap() else {
        return vec![n; shape.batch()];
    };
    (0..shape.batch())
        .map(|s| {
            let (own, per_view, kth_other) = positives_of(s);
            let room = cap.get().saturating_sub(own);
            if room == 0 {
                return 0;
            }
            if per_view == 0 || (room - 1) / per_view >= shape.views() {
                return n;
            }
            let view = (room - 1) / per_view;
            (view * shape.batch() + kth_other((room - 1) % per_view) + 1) as u32
        })
        .collect()
}

/// Writes one entry from the pair's facts: `raw` is the weight before the cap, `same_sample`
/// whether both rows are views of one sample, `below_bound` whether the contrast lies below the
/// anchor's cap bound, `is_self` whether it is the anchor itself.
#[inline(always)]
fn entry(raw: f32, same_sample: bool, below_bound: bool, is_self: bool) -> (f32, f32) {
    let positive = raw > 0.0;
    let kept = positive & (same_sample | below_bound) & !is_self;
    let excluded = is_self | (positive & !kept);
    (
        if kept { raw } else { 0.0 },
        if excluded { f32::NEG_INFINITY } else { 0.0 },
    )
}

impl ClassPairs {
    /// Each row's class (dense ids).
    pub(super) fn classes(&self) -> &[u32] {
        &self.class
    }
}

impl PairWeights for ClassPairs {
    fn is_symmetric(&self) -> bool {
        !self.rows.capped
    }

    #[inline(always)]
    fn fill_anchor_row(
        &self,
        anchor: usize,
        contrasts: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        let (class, sample, bound) = (
            self.class[anchor],
            self.rows.sample[anchor],
            self.rows.cap_bound[anchor],
        );
        // Row indices as u32 (N fits, `Pairs::new` checked): 32-bit lanes compare twice as
        // many per vector as usize ones.
        let (start, anchor) = (contrasts.start as u32, anchor as u32);
        let classes = &self.class[contrasts.clone()];
        let samples = &self.rows.sample[contrasts];
        for ((((w, b), &c), &s), j) in weight
            .iter_mut()
            .zip(bias.iter_mut())
            .zip(classes)
            .zip(samples)
            .zip(start..)
        {
            (*w, *b) = entry(
                f32::from(u8::from(c == class)),
                s == sample,
                j < bound,
                j == anchor,
            );
        }
    }

    #[inline(always)]
    fn fill_contrast_row(
        &self,
        contrast: usize,
        anchors: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        let (class, sample) = (self.class[contrast], self.rows.sample[contrast]);
        let start = anchors.start;
        let classes = &self.class[anchors.clone()];
        let samples = &self.rows.sample[anchors.clone()];
        let bounds = &self.rows.cap_bound[anchors];
        for (k, ((((w, b), &c), &s), &bound)) in weight
            .iter_mut()
            .zip(bias.iter_mut())
            .zip(classes)
            .zip(samples)
            .zip(bounds)
            .enumerate()
        {
            (*w, *b) = entry(
                f32::from(u8::from(c == class)),
                s == sample,
                (contrast as u32) < bound,
                start + k == contrast,
            );
        }
    }
}

impl PairWeights for MaskPairs {
    fn is_symmetric(&self) -> bool {
        self.symmetric_mask && !self.rows.capped
    }

    #[inline(always)]
    fn fill_anchor_row(
        &self,
        anchor: usize,
        contrasts: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        let (sample, bound) = (self.rows.sample[anchor], self.rows.cap_bound[anchor]);
        let mask = self.mask.weights.as_slice().unwrap_or_default();
        let mask_row = &mask[sample as usize * self.batch..][..self.batch];
        // Row indices as u32, as for `ClassPairs`.
        let (start, anchor) = (contrasts.start as u32, anchor as u32);
        let samples = &self.rows.sample[contrasts];
        for (((w, b), &s), j) in weight
            .iter_mut()
            .zip(bias.iter_mut())
            .zip(samples)
            .zip(start..)
        {
            (*w, *b) = entry(mask_row[s as usize], s == sample, j < bound, j == anchor);
        }
    }

    #[inline(always)]
    fn fill_contrast_row(
        &self,
        contrast: usize,
        anchors: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        let sample = self.rows.sample[contrast];
        let mask = self.mask.weights.as_slice().unwrap_or_default();
        let start = anchors.start;
        let samples = &self.rows.sample[anchors.clone()];
        let bounds = &self.rows.cap_bound[anchors];
        for (k, (((w, b), &s), &bound)) in weight
            .iter_mut()
            .zip(bias.iter_mut())
            .zip(samples)
            .zip(bounds)
            .enumerate()
        {
            (*w, *b) = entry(
                mask[s as usize * self.batch + sample as usize],
                s == sample,
                (contrast as u32) < bound,
                start + k == contrast,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;
    use crate::config::ContrastMode;
    use crate::reference::relation::{Pair, Relation};

    /// Every pair of every anchor, from both fills, against `Relation::pair`, whose weights
    /// the fills hold divided by the anchor's scale ([`ScaledMask`]).
    fn assert_matches_relation(loss: &SupConLoss, shape: BatchShape, positives: Positives<'_>) {
        let relation = Relation::new(loss, shape, positives);
        let pairs = Pairs::new(loss, shape, positives).unwrap();
        let n = shape.rows();
        let (mut weight, mut bias) = (vec![0.0; n], vec![0.0; n]);
        for anchor in 0..shape.anchors(loss.contrast_mode()) {
            let scale = pairs.anchor_scale(anchor) as f32;
            let want: Vec<(f32, f32)> = (0..n)
                .map(|j| match relation.pair(anchor, j) {
                    Pair::Positive(w) => ((w as f32 / scale).max(f32::from_bits(1)), 0.0),
                    Pair::Negative => (0.0, 0.0),
                    Pair::Excluded => (0.0, f32::NEG_INFINITY),
                })
                .collect();
            match &pairs {
                Pairs::Class(p) => p.fill_anchor_row(anchor, 0..n, &mut weight, &mut bias),
                Pairs::Mask(p) => p.fill_anchor_row(anchor, 0..n, &mut weight, &mut bias),
            }
            let got: Vec<(f32, f32)> = weight.iter().copied().zip(bias.iter().copied()).collect();
            assert_eq!(got, want, "anchor {anchor}, {loss:?}");
            let symmetric = match &pairs {
                Pairs::Class(p) => p.is_symmetric(),
                Pairs::Mask(p) => p.is_symmetric(),
            };
            if symmetric {
                let (mut w, mut b) = (vec![0.0; n], vec![0.0; n]);
                match &pairs {
                    Pairs::Class(p) => p.fill_contrast_row(anchor, 0..n, &mut w, &mut b),
                    Pairs::Mask(p) => p.fill_contrast_row(anchor, 0..n, &mut w, &mut b),
                }
                assert_eq!((w, b), (weight.clone(), bias.clone()), "symmetric {loss:?}");
            }
            for (j, &expected) in want.iter().enumerate() {
                let (mut w, mut b) = ([0.0], [0.0]);
                match &pairs {
                    Pairs::Class(p) => p.fill_contrast_row(j, anchor..anchor + 1, &mut w, &mut b),
                    Pairs::Mask(p) => p.fill_contrast_row(j, anchor..anchor + 1, &mut w, &mut b),
                }
                assert_eq!((w[0], b[0]), expected, "anchor {anchor}, contrast {j}");
            }
        }
    }

    #[test]
    fn fills_match_relation_pair_by_pair() {
        let labels = [3i64, -7, 3, 3, i64::MAX, -7, 3, 0, 3];
        let batch = labels.len();
        let mask = Array2::from_shape_fn((batch, batch), |(a, b)| {
            [0.0, 0.5, 2.0][(a * 7 + b * 3 + a * b) % 3]
        });
        let symmetric = &mask + &mask.t();
        let masks = [mask.view(), mask.t(), symmetric.view()];
        for views in [1, 2, 3] {
            let shape = BatchShape::new(batch, views, 4).unwrap();
            for cap in [None, Some(1), Some(2), Some(3), Some(5), Some(40)] {
                for mode in [ContrastMode::All, ContrastMode::One] {
                    let mut builder = SupConLoss::builder().contrast_mode(mode);
                    if let Some(cap) = cap {
                        builder = builder.positives_cap(cap);
                    }
                    let loss = builder.build().unwrap();
                    assert_matches_relation(&loss, shape, Positives::SimClr);
                    assert_matches_relation(&loss, shape, Positives::labels(&labels));
                    for mask in masks {
                        assert_matches_relation(&loss, shape, Positives::Mask(mask));
                    }
                }
            }
        }
    }
}
