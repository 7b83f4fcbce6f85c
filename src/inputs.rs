//! Inputs: the batch shape, what makes two rows positives, and the validation every backend
//! runs first.

use ndarray::{ArrayView1, ArrayView2, ArrayView3};
use rayon::prelude::*;

use crate::config::ContrastMode;
use crate::element::Element;
use crate::error::{Capability, Error, Extent, Result};
use crate::label_sets::LabelSetWeight;

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
    /// Multi-label samples: a multi-hot `[B, K]` matrix (`sets[b, k]`: sample b has label k,
    /// any K ≥ 0) and how the overlap of two sets weighs a pair ([`LabelSetWeight`];
    /// docs/math.md, "Label sets"). The other views of an anchor's own sample always weigh 1,
    /// so a sample with an empty set has only those as positives.
    LabelSets {
        /// `[B, K]`, true where the sample has the label.
        sets: ArrayView2<'a, bool>,
        /// How overlaps weigh.
        weight: LabelSetWeight,
    },
}

impl<'a> Positives<'a> {
    /// Labels from a slice.
    pub fn labels(labels: &'a [i64]) -> Self {
        Positives::Labels(ArrayView1::from(labels))
    }
}

/// [`Positives`] that own their arrays: a batch's gathered from several ranks, or a batch's
/// joined with a memory bank's.
#[derive(Debug, Clone)]
pub(crate) enum OwnedPositives {
    SimClr,
    Labels(ndarray::Array1<i64>),
    Mask(ndarray::Array2<f32>),
    LabelSets {
        sets: ndarray::Array2<bool>,
        weight: LabelSetWeight,
    },
}

impl OwnedPositives {
    pub(crate) fn view(&self) -> Positives<'_> {
        match self {
            OwnedPositives::SimClr => Positives::SimClr,
            OwnedPositives::Labels(labels) => Positives::Labels(labels.view()),
            OwnedPositives::Mask(mask) => Positives::Mask(mask.view()),
            OwnedPositives::LabelSets { sets, weight } => Positives::LabelSets {
                sets: sets.view(),
                weight: *weight,
            },
        }
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

/// A batch that passed [`validate_inputs`]: its shape and a fingerprint of its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validated {
    pub(crate) shape: BatchShape,
    /// A 64-bit hash of the features' values (in `[B, V, D]` order, whatever the layout and
    /// element type) and of the positives: a backward pass refuses a saved state whose
    /// fingerprint differs (another batch of the same shape).
    pub(crate) fingerprint: u64,
}

/// Checks everything a backend needs before touching the data: shape, positives, finiteness.
/// Returns the batch shape and the batch's fingerprint, from the same pass over the features.
///
/// # Errors
/// Those of [`BatchShape::new`], [`Error::LabelsLength`], [`Error::MaskShape`],
/// [`Error::InvalidMaskWeight`], [`Error::LabelSetsShape`], [`Error::NonFiniteFeature`].
pub(crate) fn validate_inputs<T: Element>(
    features: &ArrayView3<'_, T>,
    positives: &Positives<'_>,
) -> Result<Validated> {
    let (batch, views, dim) = features.dim();
    let shape = BatchShape::new(batch, views, dim)?;
    let positives_hash = match positives {
        Positives::SimClr => 0,
        Positives::Labels(labels) => {
            if labels.len() != batch {
                return Err(Error::LabelsLength {
                    expected: batch,
                    got: labels.len(),
                });
            }
            Hash::of(labels.iter().map(|&label| label as u64))
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
            Hash::of(mask.iter().map(|w| u64::from(w.to_bits())))
        }
        Positives::LabelSets { sets, weight } => {
            let (rows, labels) = sets.dim();
            if rows != batch {
                return Err(Error::LabelSetsShape {
                    expected: batch,
                    got: [rows, labels],
                });
            }
            let members = sets.iter().map(|&member| u64::from(member));
            Hash::of([labels as u64, *weight as u64].into_iter().chain(members))
        }
    };
    // One pass over the features, a sample at a time in parallel: finiteness (branch-free) and
    // the hash; the position of a non-finite value only if there is one.
    let samples: Vec<(bool, u64)> = (0..batch)
        .into_par_iter()
        .map(|b| {
            let sample = features.index_axis(ndarray::Axis(0), b);
            let mut finite = true;
            let hash = Hash::of(sample.iter().map(|x| {
                let x = x.to_f64();
                finite &= x.is_finite();
                x.to_bits()
            }));
            (finite, hash)
        })
        .collect();
    if samples.iter().any(|&(finite, _)| !finite) {
        if let Some(((sample, view, dim), _)) = features
            .indexed_iter()
            .find(|(_, x)| !x.to_f64().is_finite())
        {
            return Err(Error::NonFiniteFeature { sample, view, dim });
        }
    }
    let kind = match positives {
        Positives::SimClr => 1,
        Positives::Labels(_) => 2,
        Positives::Mask(_) => 3,
        Positives::LabelSets { .. } => 4,
    };
    let features_hash = Hash::of(samples.iter().map(|&(_, hash)| hash));
    let fingerprint = Hash::of([kind, positives_hash, features_hash].into_iter());
    Ok(Validated { shape, fingerprint })
}

/// A fast 64-bit hash of a sequence of words (not cryptographic): four interleaved
/// multiply–rotate chains, so that a long sequence costs about one cycle a word.
struct Hash;

impl Hash {
    fn of(words: impl Iterator<Item = u64>) -> u64 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mix = |h: u64, x: u64| (h ^ x).wrapping_mul(K).rotate_left(29);
        let mut lanes = [1, 2, 3, 4];
        let mut count = 0u64;
        for (k, word) in words.enumerate() {
            lanes[k % 4] = mix(lanes[k % 4], word);
            count += 1;
        }
        lanes.into_iter().fold(count, mix)
    }
}

/// Largest |s_ij| that f32 arithmetic accepts (the CPU backend, the kernels): far enough below
/// f32::MAX (3.4e38) that sums of logits and their differences stay finite.
pub(crate) const F32_LOGIT_LIMIT: f64 = 1e36;

/// Fails unless `largest` ([`largest_logit`]) is within `limit` (a NaN `largest`, from squares
/// that overflowed, is beyond it too).
///
/// # Errors
/// [`Error::Unsupported`] with [`Capability::LogitRange`].
pub(crate) fn check_logit_range(backend: &'static str, largest: f64, limit: f64) -> Result<()> {
    if largest <= limit {
        Ok(())
    } else {
        Err(Error::Unsupported {
            backend,
            capability: Capability::LogitRange { largest, limit },
        })
    }
}

/// The bound on every dot product z_i·z_j and every logit z_i·z_j/τ of the features: the larger
/// of max_r ‖z_r‖² and max_r ‖z_r‖²/τ, in f64. (A backend forms the dot product before it
/// scales it by 1/τ, so with τ > 1 the product is the larger value.)
#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) fn largest_logit<T: Element>(features: &ArrayView3<'_, T>, temperature: f64) -> f64 {
    largest_logit_of(largest_square_norm(features), temperature)
}

/// [`largest_logit`] from max_r ‖z_r‖².
pub(crate) fn largest_logit_of(largest_square_norm: f64, temperature: f64) -> f64 {
    largest_square_norm * temperature.recip().max(1.0)
}

/// max_r ‖z_r‖² of the features, in f64.
#[cfg(any(feature = "cuda", feature = "emulation"))]
fn largest_square_norm<T: Element>(features: &ArrayView3<'_, T>) -> f64 {
    features
        .rows()
        .into_iter()
        .map(|row| row.iter().map(|x| x.to_f64().powi(2)).sum::<f64>())
        .fold(0.0, f64::max)
}

/// The weight mask with each row divided by its largest positive weight, so that no sum of
/// weights overflows (weights up to f32::MAX) or vanishes (subnormal weights) in f32: every loss
/// and gradient depends on the weights of an anchor only up to one common factor
/// (docs/math.md, "Mask weights"), and P_i and LSE^P_i are rescaled on the way out.
pub(crate) struct ScaledMask {
    /// `[B, B]`, standard layout: `mask[b, c] / scale[b]`, a positive weight never below the
    /// smallest positive f32 (so that it stays a positive).
    pub(crate) weights: ndarray::Array2<f32>,
    /// Per sample b, W_b: the largest weight an anchor row of b gives a positive, that is
    /// mask[b, c] over c ≠ b, and mask[b, b] (its other views) when V ≥ 2; 1 where none is
    /// positive.
    pub(crate) scale: Vec<f32>,
}

impl ScaledMask {
    /// Scales a validated mask.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] for the B² copy.
    pub(crate) fn new(
        backend: &'static str,
        mask: &ArrayView2<'_, f32>,
        views: usize,
    ) -> Result<Self> {
        let batch = mask.nrows();
        let scale: Vec<f32> = mask
            .rows()
            .into_iter()
            .enumerate()
            .map(|(b, row)| {
                let largest = row
                    .iter()
                    .enumerate()
                    .filter(|&(c, _)| c != b || views > 1)
                    .fold(0.0f32, |largest, (_, &w)| largest.max(w));
                if largest > 0.0 {
                    largest
                } else {
                    1.0
                }
            })
            .collect();
        let mut weights = crate::alloc::filled(backend, batch * batch, 0.0f32)?;
        for ((b, c), &w) in mask.indexed_iter() {
            weights[b * batch + c] = if w > 0.0 {
                (w / scale[b]).max(f32::from_bits(1))
            } else {
                0.0
            };
        }
        let weights = ndarray::Array2::from_shape_vec((batch, batch), weights).expect("B² weights");
        Ok(ScaledMask { weights, scale })
    }
}
