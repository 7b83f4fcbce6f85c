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
use crate::label_sets::{LabelSetWeight, PackedSets};

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
    /// Label sets.
    Sets(SetPairs),
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

/// Label-set batches: per row its sample's set and the set's size, in row order, so that a
/// tile row of weights is one branch-free loop over contiguous words (AND, popcount, one
/// division), like a class compare.
///
/// `Fraction` (w_ij = |Y_i ∩ Y_j| / |Y_i|, asymmetric) is filled as the symmetric
/// m_ij = |Y_i ∩ Y_j| for other samples and m = f_i = max(|Y_i|, 1) for the anchor's own views,
/// so that w_ij = m_ij / f_i: each anchor's weights times one factor, which changes no loss and
/// no gradient (docs/math.md, "Mask weights"; [`Pairs::anchor_scale`] rescales P_i and LSE^P_i,
/// as for a mask). The tiles then take the symmetric path, one fill and one exponential for
/// both directions.
pub(super) struct SetPairs {
    rows: RowFacts,
    /// ⌈K/64⌉ (at least 1: K = 0 keeps one empty word).
    words: usize,
    /// Row r's set at `r·words..(r+1)·words`.
    row_sets: Vec<u64>,
    /// |Y| of row r's sample.
    sizes: Vec<u32>,
    weight: LabelSetWeight,
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
                let bounds = cap_bounds(loss, shape, &positives)?;
                let class = (0..n).map(|r| sample_class[shape.sample_of(r)]).collect();
                Ok(Pairs::Class(ClassPairs {
                    rows: RowFacts::new(sample, &bounds, shape),
                    class,
                }))
            }
            Positives::Mask(mask) => {
                let mask = ScaledMask::new("cpu", &mask, shape.views())?;
                let batch = shape.batch();
                let bounds = cap_bounds(loss, shape, &positives)?;
                let symmetric_mask = mask.weights == mask.weights.t();
                Ok(Pairs::Mask(MaskPairs {
                    rows: RowFacts::new(sample, &bounds, shape),
                    batch,
                    mask,
                    symmetric_mask,
                }))
            }
            Positives::LabelSets { sets, weight } => {
                let packed = PackedSets::new("cpu", &sets, weight)?;
                let bounds = cap_bounds(loss, shape, &positives)?;
                let words = packed.words().max(1);
                let mut row_sets = crate::alloc::filled("cpu", n * words, 0u64)?;
                for (r, set) in row_sets.chunks_exact_mut(words).enumerate() {
                    let b = shape.sample_of(r);
                    let source = &packed.bits()[b * packed.words()..(b + 1) * packed.words()];
                    set[..source.len()].copy_from_slice(source);
                }
                let sizes = (0..n)
                    .map(|r| packed.size(shape.sample_of(r)) as u32)
                    .collect();
                Ok(Pairs::Sets(SetPairs {
                    rows: RowFacts::new(sample, &bounds, shape),
                    words,
                    row_sets,
                    sizes,
                    weight,
                }))
            }
        }
    }
}

impl Pairs {
    /// W_i: the factor that anchor `anchor`'s weights were divided by (1 for labels and
    /// SimCLR; see [`ScaledMask`]; 1/max(|Y_i|, 1) for `Fraction`, see [`SetPairs`]).
    pub(super) fn anchor_scale(&self, anchor: usize) -> f64 {
        match self {
            Pairs::Class(_) => 1.0,
            Pairs::Mask(pairs) => f64::from(pairs.mask.scale[pairs.rows.sample[anchor] as usize]),
            Pairs::Sets(pairs) if pairs.weight == LabelSetWeight::Fraction => {
                1.0 / f64::from(pairs.sizes[anchor].max(1))
            }
            Pairs::Sets(_) => 1.0,
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

/// Per sample, the cap bound of its rows as anchors (N without a cap): a positive of another
/// sample at row j is kept iff j < bound. The CPU's tiles and the kernels read the same bounds.
///
/// # Errors
/// [`Error::OutOfMemory`] for packed label sets.
pub(crate) fn cap_bounds(
    loss: &SupConLoss,
    shape: BatchShape,
    positives: &Positives<'_>,
) -> Result<Vec<u32>> {
    let batch = shape.batch();
    let Some(cap) = loss.positives_cap() else {
        return Ok(vec![shape.rows() as u32; batch]);
    };
    let cap = cap.get();
    Ok(match positives {
        Positives::SimClr | Positives::Labels(_) => {
            let sample_class = match positives {
                Positives::Labels(labels) => dense_classes(labels.iter().copied()),
                _ => (0..batch as u32).collect(),
            };
            let members = class_members(&sample_class);
            per_sample_bounds(cap, shape, |s| {
                // Other views of one's own sample always share its class.
                let list = &members[sample_class[s] as usize];
                let own = list.binary_search(&(s as u32)).unwrap_or_default();
                let others = list.len() - 1;
                (shape.views() - 1, others, move |k: usize| {
                    list[if k < own { k } else { k + 1 }] as usize
                })
            })
        }
        // Scaling a mask row keeps its positives positive (`ScaledMask`): the raw mask decides.
        Positives::Mask(mask) => per_sample_bounds(cap, shape, |s| {
            let row = mask.row(s);
            let own = if row[s] > 0.0 { shape.views() - 1 } else { 0 };
            let others: Vec<usize> = (0..batch).filter(|&b| b != s && row[b] > 0.0).collect();
            (own, others.len(), move |k: usize| others[k])
        }),
        Positives::LabelSets { sets, weight } => {
            let packed = PackedSets::new("cpu", sets, *weight)?;
            per_sample_bounds(cap, shape, |s| {
                let others: Vec<usize> = (0..batch)
                    .filter(|&b| b != s && packed.weight(s, b) > 0.0)
                    .collect();
                (shape.views() - 1, others.len(), move |k: usize| others[k])
            })
        }
    })
}

/// Per sample s, the bound of its rows under a cap of `cap`. `positives_of(s)` gives
/// (own-sample positives of a row of s, K = positives of other samples per view,
/// k ↦ the k-th of those samples in ascending order).
///
/// With `room` = cap − own positives, the room-th positive of another sample, counting rows
/// j = v·B + b in ascending order, is in view (room−1)/K at the ((room−1) mod K)-th such sample;
/// the bound is one past its row. `Relation::cap_bound_of` walks the rows to the same answer.
fn per_sample_bounds<F, K>(cap: usize, shape: BatchShape, positives_of: F) -> Vec<u32>
where
    F: Fn(usize) -> (usize, usize, K),
    K: Fn(usize) -> usize,
{
    let n = shape.rows() as u32;
    (0..shape.batch())
        .map(|s| {
            let (own, per_view, kth_other) = positives_of(s);
            let room = cap.saturating_sub(own);
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

impl SetPairs {
    /// The entries of anchor `fixed` against the contrasts `others`, or with `CONTRAST_ROW` of
    /// contrast `fixed` against the anchors `others`, under weight mode `MODE` (0, 1, 2: any,
    /// Jaccard, fraction; a constant so that the mode's match leaves the loop).
    #[inline(always)]
    fn fill<const MODE: u8, const CONTRAST_ROW: bool>(
        &self,
        fixed: usize,
        others: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        let mode = [
            LabelSetWeight::Any,
            LabelSetWeight::Jaccard,
            LabelSetWeight::Fraction,
        ][MODE as usize];
        let words = self.words;
        let (sample, size) = (self.rows.sample[fixed], self.sizes[fixed]);
        let fixed_bound = self.rows.cap_bound[fixed];
        let fixed_set = &self.row_sets[fixed * words..(fixed + 1) * words];
        let (start, fixed) = (others.start as u32, fixed as u32);
        let samples = &self.rows.sample[others.clone()];
        let sizes = &self.sizes[others.clone()];
        let bounds = &self.rows.cap_bound[others.clone()];
        let sets = &self.row_sets[others.start * words..others.end * words];
        // Row indices as u32, as for `ClassPairs`.
        let entries = weight
            .iter_mut()
            .zip(bias.iter_mut())
            .zip(samples.iter().zip(sizes))
            .zip(bounds.iter().zip(start..));
        type Entry<'e> = ((&'e mut f32, &'e mut f32), (&'e u32, &'e u32));
        let write =
            |((w, b), (&s, &other_size)): Entry<'_>, (&bound, other): (&u32, u32), shared: u32| {
                // The weight is the anchor's view: its size is |Y_i|, its bound the cap's.
                let (anchor, contrast, anchor_size, bound) = if CONTRAST_ROW {
                    (other, fixed, other_size, bound)
                } else {
                    (fixed, other, size, fixed_bound)
                };
                let union = size + other_size - shared;
                let same_sample = s == sample;
                // Fraction's m_ij (see `SetPairs`): the shared count, f_i for the own views.
                let (raw, own) = if MODE == 2 {
                    (shared as f32, anchor_size.max(1) as f32)
                } else {
                    (
                        mode.weight(shared as f32, union as f32, anchor_size as f32),
                        1.0,
                    )
                };
                (*w, *b) = entry(
                    if same_sample { own } else { raw },
                    same_sample,
                    contrast < bound,
                    anchor == contrast,
                );
            };
        // Contiguous words, one AND and one popcount each: a loop of constant length for
        // K ≤ 256, which unrolls.
        match words {
            1 => shared_counts::<1, _, _>(MODE == 0, fixed_set, sets, entries, write),
            2 => shared_counts::<2, _, _>(MODE == 0, fixed_set, sets, entries, write),
            3 => shared_counts::<3, _, _>(MODE == 0, fixed_set, sets, entries, write),
            4 => shared_counts::<4, _, _>(MODE == 0, fixed_set, sets, entries, write),
            _ => {
                for ((entry, row), other_set) in entries.zip(sets.chunks_exact(words)) {
                    let shared = (fixed_set.iter().zip(other_set))
                        .map(|(x, y)| (x & y).count_ones())
                        .sum();
                    write(entry, row, shared);
                }
            }
        }
    }

    /// [`Self::fill`] with the mode's constant.
    #[inline(always)]
    fn fill_in_mode<const CONTRAST_ROW: bool>(
        &self,
        fixed: usize,
        others: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        match self.weight {
            LabelSetWeight::Any => self.fill::<0, CONTRAST_ROW>(fixed, others, weight, bias),
            LabelSetWeight::Jaccard => self.fill::<1, CONTRAST_ROW>(fixed, others, weight, bias),
            LabelSetWeight::Fraction => self.fill::<2, CONTRAST_ROW>(fixed, others, weight, bias),
        }
    }
}

/// Calls `write(entry, row, |fixed ∩ other|)` for each entry and its set of `WORDS` words;
/// with `any`, whether they meet (1 or 0) in place of the count, all that `Any` weighs (a
/// constant where the caller's mode is).
#[inline(always)]
fn shared_counts<const WORDS: usize, E, R>(
    any: bool,
    fixed_set: &[u64],
    sets: &[u64],
    entries: impl Iterator<Item = (E, R)>,
    write: impl Fn(E, R, u32),
) {
    let fixed: [u64; WORDS] = fixed_set.try_into().expect("one set");
    for ((entry, row), other) in entries.zip(sets.chunks_exact(WORDS)) {
        let shared = if any {
            // `Any` asks whether the sets meet, not how much.
            u32::from((0..WORDS).any(|k| fixed[k] & other[k] != 0))
        } else {
            (0..WORDS).map(|k| (fixed[k] & other[k]).count_ones()).sum()
        };
        write(entry, row, shared);
    }
}

impl PairWeights for SetPairs {
    /// Every weight mode, `Fraction` as its symmetric m_ij (see [`SetPairs`]).
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
        self.fill_in_mode::<false>(anchor, contrasts, weight, bias);
    }

    #[inline(always)]
    fn fill_contrast_row(
        &self,
        contrast: usize,
        anchors: Range<usize>,
        weight: &mut [f32],
        bias: &mut [f32],
    ) {
        self.fill_in_mode::<true>(contrast, anchors, weight, bias);
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;
    use crate::config::ContrastMode;
    use crate::reference::relation::{Pair, Relation};

    /// Every pair of every anchor, from both fills, against `Relation::pair`, whose weights
    /// the fills hold divided by the anchor's scale ([`ScaledMask`]; for label sets, whose
    /// scale is `Fraction`'s 1/f_i, in f64: the fills hold the exact count n_ij).
    fn assert_matches_relation(loss: &SupConLoss, shape: BatchShape, positives: Positives<'_>) {
        let relation = Relation::new(loss, shape, positives);
        let pairs = Pairs::new(loss, shape, positives).unwrap();
        let n = shape.rows();
        let (mut weight, mut bias) = (vec![0.0; n], vec![0.0; n]);
        for anchor in 0..shape.anchors(loss.contrast_mode()) {
            let scale = pairs.anchor_scale(anchor);
            let unscaled = |w: f64| match pairs {
                Pairs::Sets(_) => (w / scale) as f32,
                _ => w as f32 / scale as f32,
            };
            let want: Vec<(f32, f32)> = (0..n)
                .map(|j| match relation.pair(anchor, j) {
                    Pair::Positive(w) => (unscaled(w).max(f32::from_bits(1)), 0.0),
                    Pair::Negative => (0.0, 0.0),
                    Pair::Excluded => (0.0, f32::NEG_INFINITY),
                })
                .collect();
            match &pairs {
                Pairs::Class(p) => p.fill_anchor_row(anchor, 0..n, &mut weight, &mut bias),
                Pairs::Mask(p) => p.fill_anchor_row(anchor, 0..n, &mut weight, &mut bias),
                Pairs::Sets(p) => p.fill_anchor_row(anchor, 0..n, &mut weight, &mut bias),
            }
            let got: Vec<(f32, f32)> = weight.iter().copied().zip(bias.iter().copied()).collect();
            assert_eq!(got, want, "anchor {anchor}, {loss:?}");
            let symmetric = match &pairs {
                Pairs::Class(p) => p.is_symmetric(),
                Pairs::Mask(p) => p.is_symmetric(),
                Pairs::Sets(p) => p.is_symmetric(),
            };
            if symmetric {
                let (mut w, mut b) = (vec![0.0; n], vec![0.0; n]);
                match &pairs {
                    Pairs::Class(p) => p.fill_contrast_row(anchor, 0..n, &mut w, &mut b),
                    Pairs::Mask(p) => p.fill_contrast_row(anchor, 0..n, &mut w, &mut b),
                    Pairs::Sets(p) => p.fill_contrast_row(anchor, 0..n, &mut w, &mut b),
                }
                assert_eq!((w, b), (weight.clone(), bias.clone()), "symmetric {loss:?}");
            }
            for (j, &expected) in want.iter().enumerate() {
                let (mut w, mut b) = ([0.0], [0.0]);
                match &pairs {
                    Pairs::Class(p) => p.fill_contrast_row(j, anchor..anchor + 1, &mut w, &mut b),
                    Pairs::Mask(p) => p.fill_contrast_row(j, anchor..anchor + 1, &mut w, &mut b),
                    Pairs::Sets(p) => p.fill_contrast_row(j, anchor..anchor + 1, &mut w, &mut b),
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
        // Label sets over K = 3 (one word) and K = 70 (two words); sample 4 has none.
        let sets: Vec<Array2<bool>> = [3, 70]
            .map(|k| {
                Array2::from_shape_fn((batch, k), |(b, l)| {
                    b != 4 && (b * 5 + l * 3 + b * l) % 4 == 0
                })
            })
            .into();
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
                    for (sets, weight) in sets.iter().flat_map(|sets| {
                        [
                            LabelSetWeight::Any,
                            LabelSetWeight::Jaccard,
                            LabelSetWeight::Fraction,
                        ]
                        .map(|weight| (sets.view(), weight))
                    }) {
                        assert_matches_relation(
                            &loss,
                            shape,
                            Positives::LabelSets { sets, weight },
                        );
                    }
                }
            }
        }
    }
}
