//! Inputs: what makes two rows positives, and the validation every backend runs first.

use ndarray::{ArrayView1, ArrayView2, ArrayView3};
use rayon::prelude::*;

use crate::config::{ContrastMode, SupConLoss};
use crate::element::Element;
use crate::error::{Error, Result};

/// What makes two rows positives (SPEC.md "Inputs").
#[derive(Debug, Clone, Copy)]
pub enum Positives<'a> {
    /// SimCLR / unsupervised: only the other views of the same sample.
    SimClr,
    /// One integer class per sample (`[B]`): rows of samples with equal labels are positives.
    /// Any `i64` is a label, negative and huge values included.
    Labels(ArrayView1<'a, i64>),
    /// Explicit `[B, B]` weights: row i (sample b_i) and row j (sample b_j) get weight
    /// `mask[b_i, b_j]`. Soft (any finite weight ≥ 0) and asymmetric masks are allowed; 0 marks a
    /// negative. The diagonal weighs the other views of the same sample; the self pair is always
    /// excluded, as in the original code.
    Mask(ArrayView2<'a, f32>),
}

impl<'a> Positives<'a> {
    /// Labels from a slice.
    pub fn labels(labels: &'a [i64]) -> Self {
        Positives::Labels(ArrayView1::from(labels))
    }
}

/// The shape of a batch of features `[B, V, D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchShape {
    /// B: samples.
    pub batch: usize,
    /// V: views per sample.
    pub views: usize,
    /// D: embedding width.
    pub dim: usize,
}

impl BatchShape {
    /// N = V·B flattened rows (view-major: row `v·B + b` is view v of sample b).
    pub fn rows(&self) -> usize {
        self.batch * self.views
    }
    /// R: the number of anchors (N, or B for [`ContrastMode::One`]).
    pub fn anchors(&self, mode: ContrastMode) -> usize {
        match mode {
            ContrastMode::All => self.rows(),
            ContrastMode::One => self.batch,
        }
    }
    /// The sample a flattened row belongs to.
    pub fn sample_of(&self, row: usize) -> usize {
        row % self.batch
    }
    /// The view a flattened row is.
    pub fn view_of(&self, row: usize) -> usize {
        row / self.batch
    }
}

/// Checks everything a backend needs before touching the data: shapes, positives, finiteness.
/// Returns the batch shape.
///
/// # Errors
/// [`Error::EmptyFeatures`], [`Error::SingleRow`], [`Error::LabelsLength`], [`Error::MaskShape`],
/// [`Error::InvalidMaskWeight`], [`Error::NonFiniteFeature`].
pub fn validate_inputs<T: Element>(
    features: &ArrayView3<'_, T>,
    positives: &Positives<'_>,
) -> Result<BatchShape> {
    let (batch, views, dim) = features.dim();
    if batch == 0 || views == 0 || dim == 0 {
        return Err(Error::EmptyFeatures {
            shape: [batch, views, dim],
        });
    }
    let shape = BatchShape { batch, views, dim };
    if batch.checked_mul(views).is_none() {
        return Err(Error::TooLarge {
            what: format!("B·V = {batch}·{views} overflows usize"),
        });
    }
    if shape.rows() == 1 {
        return Err(Error::SingleRow);
    }
    match positives {
        Positives::SimClr => {}
        Positives::Labels(labels) => {
            if labels.len() != batch {
                return Err(Error::LabelsLength {
                    expected: batch,
                    got: labels.len(),
                });
            }
        }
        Positives::Mask(mask) => {
            let (rows, cols) = mask.dim();
            if rows != batch || cols != batch {
                return Err(Error::MaskShape {
                    expected: batch,
                    got: [rows, cols],
                });
            }
            if let Some(((row, col), &value)) = mask
                .indexed_iter()
                .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
            {
                return Err(Error::InvalidMaskWeight { row, col, value });
            }
        }
    }
    // A branch-free pass over the memory (in parallel) first; the position only if it fails.
    let all_finite = |chunk: &[T]| chunk.iter().fold(true, |ok, x| ok & x.to_f64().is_finite());
    let finite = match features.as_slice_memory_order() {
        Some(data) => data.par_chunks(1 << 14).all(all_finite),
        None => features.iter().all(|x| x.to_f64().is_finite()),
    };
    if !finite {
        if let Some(((sample, view, dim), _)) = features
            .indexed_iter()
            .find(|(_, x)| !x.to_f64().is_finite())
        {
            return Err(Error::NonFiniteFeature { sample, view, dim });
        }
    }
    Ok(shape)
}

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

/// The positive relation of one batch, the positives cap applied (shared by the CPU backends).
pub(crate) struct Relation<'a> {
    positives: Positives<'a>,
    shape: BatchShape,
    /// Per anchor: a positive of *another* sample at row j is kept iff `j < cap_bound[i]`.
    cap_bound: Option<Vec<usize>>,
}

impl<'a> Relation<'a> {
    pub(crate) fn new(loss: &SupConLoss, shape: BatchShape, positives: Positives<'a>) -> Self {
        let mut relation = Relation {
            positives,
            shape,
            cap_bound: None,
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
