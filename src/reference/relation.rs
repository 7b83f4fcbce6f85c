//! How a contrast row relates to an anchor row, one pair at a time, the positives cap applied:
//! the reference backend's view of the positives (docs/math.md, "Inputs" and "Positives cap").
//! The CPU backend lays the same relation out per row (`src/cpu/relation.rs`) and is tested
//! pair by pair against this one.

use crate::config::SupConLoss;
use crate::inputs::{BatchShape, Positives};

/// How a contrast row j relates to an anchor row i.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pair {
    /// A positive with weight `w > 0`.
    Positive(f64),
    /// A negative (weight 0): in every denominator.
    Negative,
    /// The anchor itself, or a positive dropped by the cap: in no term at all.
    Excluded,
}

/// The positive relation of one batch, the positives cap applied.
pub(crate) struct Relation<'a> {
    positives: Positives<'a>,
    shape: BatchShape,
    /// Per anchor: a positive of *another* sample at row j is kept iff `j < cap_bound[i]`.
    cap_bound: Option<Vec<usize>>,
    /// Label sets as 0/1 bytes, one row per sample.
    sets: Option<SetRows>,
}

/// Label sets, counted label by label: row b holds `sets[b, k]` as 0 or 1.
struct SetRows {
    labels: usize,
    members: Vec<u8>,
    /// |Y_b|.
    sizes: Vec<u64>,
}

impl SetRows {
    fn new(sets: &ndarray::ArrayView2<'_, bool>) -> Self {
        let labels = sets.ncols();
        let members: Vec<u8> = sets.iter().map(|&m| u8::from(m)).collect();
        let sizes = (0..sets.nrows())
            .map(|b| {
                members[b * labels..(b + 1) * labels]
                    .iter()
                    .map(|&m| u64::from(m))
                    .sum()
            })
            .collect();
        SetRows {
            labels,
            members,
            sizes,
        }
    }

    fn row(&self, b: usize) -> &[u8] {
        &self.members[b * self.labels..(b + 1) * self.labels]
    }
}

impl<'a> Relation<'a> {
    pub(crate) fn new(loss: &SupConLoss, shape: BatchShape, positives: Positives<'a>) -> Self {
        let sets = match &positives {
            Positives::LabelSets { sets, .. } => Some(SetRows::new(sets)),
            _ => None,
        };
        let mut relation = Relation {
            positives,
            shape,
            cap_bound: None,
            sets,
        };
        if let Some(cap) = loss.positives_cap() {
            let anchors = shape.anchors(loss.contrast_mode());
            let bounds = (0..anchors)
                .map(|i| relation.cap_bound_of(i, cap.get()))
                .collect();
            relation.cap_bound = Some(bounds);
        }
        relation
    }

    /// The weight before the cap; the caller guarantees `i != j`.
    fn raw_weight(&self, i: usize, j: usize) -> f64 {
        let (si, sj) = (self.shape.sample_of(i), self.shape.sample_of(j));
        match &self.positives {
            Positives::SimClr => f64::from(u8::from(si == sj)),
            Positives::Labels(labels) => f64::from(u8::from(labels[si] == labels[sj])),
            Positives::Mask(mask) => f64::from(mask[[si, sj]]),
            // The other views of the anchor's own sample always weigh 1.
            Positives::LabelSets { .. } if si == sj => 1.0,
            Positives::LabelSets { weight, .. } => {
                let sets = self.sets.as_ref().expect("label sets are copied in `new`");
                let shared: u64 = sets
                    .row(si)
                    .iter()
                    .zip(sets.row(sj))
                    .map(|(&a, &c)| u64::from(a & c))
                    .sum();
                let (anchor, contrast) = (sets.sizes[si], sets.sizes[sj]);
                let union = anchor + contrast - shared;
                f64::from(weight.weight(shared as f32, union as f32, anchor as f32))
            }
        }
    }

    /// The first row index from which positives of other samples are dropped for anchor i:
    /// the other views of i's sample always stay, then the lowest-index positives fill up to `cap`.
    fn cap_bound_of(&self, i: usize, cap: usize) -> usize {
        let n = self.shape.rows();
        let sample = self.shape.sample_of(i);
        let own_views = (0..n)
            .filter(|&j| j != i && self.shape.sample_of(j) == sample && self.raw_weight(i, j) > 0.0)
            .count();
        let mut room = cap.saturating_sub(own_views);
        if room == 0 {
            return 0;
        }
        for j in 0..n {
            if self.shape.sample_of(j) != sample && self.raw_weight(i, j) > 0.0 {
                room -= 1;
                if room == 0 {
                    return j + 1;
                }
            }
        }
        n
    }

    /// How contrast row j relates to anchor row i.
    pub(crate) fn pair(&self, i: usize, j: usize) -> Pair {
        if i == j {
            return Pair::Excluded;
        }
        let weight = self.raw_weight(i, j);
        if weight <= 0.0 {
            return Pair::Negative;
        }
        if let Some(bounds) = &self.cap_bound {
            if self.shape.sample_of(i) != self.shape.sample_of(j) && j >= bounds[i] {
                return Pair::Excluded;
            }
        }
        Pair::Positive(weight)
    }
}
