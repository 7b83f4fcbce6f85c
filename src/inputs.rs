//! Inputs: the batch shape, what makes two rows positives, and the validation every backend
//! runs first.

use ndarray::{ArrayView1, ArrayView2, ArrayView3};
use rayon::prelude::*;

use crate::config::ContrastMode;
use crate::element::Element;
use crate::error::{Error, Extent, Result};

/// What makes two rows positives (docs/math.md, "Inputs").
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

/// The shape of a batch of features `[B, V, D]`, valid by construction: B, V, D ≥ 1, at least
/// two rows (N = B·V ≥ 2) and B·V·D elements that an array can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchShape {
    batch: usize,
    views: usize,
    dim: usize,
}

impl BatchShape {
    /// The shape `[batch, views, dim]`.
    ///
    /// # Errors
    /// [`Error::EmptyFeatures`] (a dimension is 0), [`Error::TooLarge`] (B·V·D beyond
    /// `isize::MAX`, the most elements an array can hold), [`Error::SingleRow`] (B·V = 1: a
    /// single row has nothing to contrast with).
    ///
    /// ```
    /// use supcon::{BatchShape, Error};
    /// let shape = BatchShape::new(256, 2, 128)?;
    /// assert_eq!((shape.rows(), shape.elements()), (512, 65536));
    /// assert_eq!(BatchShape::new(1, 1, 128), Err(Error::SingleRow));
    /// # Ok::<(), supcon::Error>(())
    /// ```
    pub fn new(batch: usize, views: usize, dim: usize) -> Result<Self> {
        if batch == 0 || views == 0 || dim == 0 {
            return Err(Error::EmptyFeatures {
                shape: [batch, views, dim],
            });
        }
        let elements = (batch as u128)
            .saturating_mul(views as u128)
            .saturating_mul(dim as u128);
        let limit = isize::MAX as u128;
        if elements > limit {
            return Err(Error::TooLarge {
                extent: Extent::Elements,
                requested: elements,
                limit,
            });
        }
        if batch * views == 1 {
            return Err(Error::SingleRow);
        }
        Ok(BatchShape { batch, views, dim })
    }

    /// B: samples.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// V: views per sample.
    pub fn views(&self) -> usize {
        self.views
    }
    /// D: embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// N = V·B flattened rows (view-major: row `v·B + b` is view v of sample b).
    pub fn rows(&self) -> usize {
        self.batch * self.views
    }
    /// B·V·D, the elements of the features and of their gradient.
    pub fn elements(&self) -> usize {
        self.rows() * self.dim
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

/// Checks everything a backend needs before touching the data: shape, positives, finiteness.
/// Returns the batch shape.
///
/// # Errors
/// Those of [`BatchShape::new`], [`Error::LabelsLength`], [`Error::MaskShape`],
/// [`Error::InvalidMaskWeight`], [`Error::NonFiniteFeature`].
pub(crate) fn validate_inputs<T: Element>(
    features: &ArrayView3<'_, T>,
    positives: &Positives<'_>,
) -> Result<BatchShape> {
    let (batch, views, dim) = features.dim();
    let shape = BatchShape::new(batch, views, dim)?;
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
