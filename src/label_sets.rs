//! Multi-label positives (docs/math.md, "Label sets"): each sample b has a set of labels
//! Y_b ⊆ {0, …, K−1}, given as a multi-hot `[B, K]` matrix, and contrast j weighs anchor i by
//! how much their sets overlap.
//!
//! Every backend computes a weight from three counts, |Y_i ∩ Y_j|, |Y_i ∪ Y_j| and |Y_i|, with
//! the one expression of [`LabelSetWeight::weight`] (an f32 quotient of two counts, each rounded
//! to f32), so the B×B mask with those weights is the same relation, bit for bit. The tile
//! loops read the sets packed as bitsets ([`PackedSets`]): one AND (and one OR) plus a popcount
//! per 64 labels, O(B·K/64) memory and never a B×B mask.

use ndarray::ArrayView2;

/// How the overlap of two label sets weighs a pair of rows of different samples (the other
/// views of an anchor's own sample always weigh 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LabelSetWeight {
    /// 1 if the sets share a label, else 0.
    #[default]
    Any,
    /// |Y_i ∩ Y_j| / |Y_i ∪ Y_j| (0 when both sets are empty).
    Jaccard,
    /// |Y_i ∩ Y_j| / |Y_i|, the share of the anchor's labels the contrast has (0 when Y_i is
    /// empty). Asymmetric.
    Fraction,
}

impl LabelSetWeight {
    /// The weight of a pair of different samples from its counts, each rounded to f32:
    /// `shared` = |Y_i ∩ Y_j|, `union` = |Y_i ∪ Y_j|, `anchor` = |Y_i|. 0 marks a negative.
    ///
    /// Branch-free, so that a tile row of weights vectorises: a zero divisor comes with
    /// `shared` = 0, and 0 / max(divisor, 1) is the 0 the definition asks for.
    #[inline(always)]
    pub(crate) fn weight(self, shared: f32, union: f32, anchor: f32) -> f32 {
        match self {
            LabelSetWeight::Any => f32::from(u8::from(shared > 0.0)),
            LabelSetWeight::Jaccard => shared / union.max(1.0),
            LabelSetWeight::Fraction => shared / anchor.max(1.0),
        }
    }
}

/// The label sets of a batch as bitsets: sample b's set is the `words` 64-bit words from
/// `b · words`, label k at bit k mod 64 of word k / 64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedSets {
    words: usize,
    bits: Vec<u64>,
    /// |Y_b| per sample.
    sizes: Vec<u64>,
    weight: LabelSetWeight,
}

impl PackedSets {
    /// Packs a `[B, K]` multi-hot matrix (any strides).
    ///
    /// # Errors
    /// [`crate::Error::OutOfMemory`] for the B·⌈K/64⌉ words.
    pub(crate) fn new(
        backend: &'static str,
        sets: &ArrayView2<'_, bool>,
        weight: LabelSetWeight,
    ) -> crate::Result<Self> {
        let (batch, labels) = sets.dim();
        let words = labels.div_ceil(64);
        let mut bits = crate::alloc::filled(backend, batch * words, 0u64)?;
        for ((b, k), &member) in sets.indexed_iter() {
            bits[b * words + k / 64] |= u64::from(member) << (k % 64);
        }
        let sizes = (0..batch)
            .map(|b| {
                bits[b * words..(b + 1) * words]
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum()
            })
            .collect();
        Ok(PackedSets {
            words,
            bits,
            sizes,
            weight,
        })
    }

    /// Sample b's set.
    fn set(&self, b: usize) -> &[u64] {
        &self.bits[b * self.words..(b + 1) * self.words]
    }

    /// The weight of samples `anchor` ≠ `contrast` (see [`LabelSetWeight::weight`]).
    #[inline]
    pub(crate) fn weight(&self, anchor: usize, contrast: usize) -> f32 {
        let (a, c) = (self.set(anchor), self.set(contrast));
        let shared: u64 = a
            .iter()
            .zip(c)
            .map(|(x, y)| u64::from((x & y).count_ones()))
            .sum();
        let union = self.sizes[anchor] + self.sizes[contrast] - shared;
        let size = self.sizes[anchor];
        self.weight.weight(shared as f32, union as f32, size as f32)
    }

    /// |Y_b|.
    pub(crate) fn size(&self, b: usize) -> u64 {
        self.sizes[b]
    }

    /// The 64-bit words per set, ⌈K/64⌉.
    pub(crate) fn words(&self) -> usize {
        self.words
    }

    /// Every set, `[B][words]`.
    pub(crate) fn bits(&self) -> &[u64] {
        &self.bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The packed counts against a naive count over the bool matrix, for K around the word
    /// boundaries, empty sets included.
    #[test]
    fn packed_weights_match_the_definition() {
        for labels in [0, 1, 63, 64, 65, 200] {
            let batch = 7;
            // A deterministic but irregular pattern; sample 3 has the empty set.
            let sets = Array2::from_shape_fn((batch, labels), |(b, k)| {
                b != 3 && (b * 31 + k * 17 + (k * k) % 7) % 5 < 2
            });
            for mode in [
                LabelSetWeight::Any,
                LabelSetWeight::Jaccard,
                LabelSetWeight::Fraction,
            ] {
                let packed = PackedSets::new("test", &sets.view(), mode).unwrap();
                for a in 0..batch {
                    for c in 0..batch {
                        let count = |f: fn(bool, bool) -> bool| {
                            (0..labels)
                                .filter(|&k| f(sets[[a, k]], sets[[c, k]]))
                                .count() as u64
                        };
                        let want = mode.weight(
                            count(|x, y| x && y) as f32,
                            count(|x, y| x || y) as f32,
                            count(|x, _| x) as f32,
                        );
                        assert_eq!(
                            packed.weight(a, c),
                            want,
                            "K = {labels} {mode:?} ({a}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weights_follow_the_modes() {
        // Y_i = {0, 1}, Y_j = {1, 2, 3}: shared 1, union 4, |Y_i| 2.
        assert_eq!(LabelSetWeight::Any.weight(1.0, 4.0, 2.0), 1.0);
        assert_eq!(LabelSetWeight::Jaccard.weight(1.0, 4.0, 2.0), 0.25);
        assert_eq!(LabelSetWeight::Fraction.weight(1.0, 4.0, 2.0), 0.5);
        assert_eq!(LabelSetWeight::Any.weight(0.0, 5.0, 2.0), 0.0);
        assert_eq!(LabelSetWeight::Jaccard.weight(0.0, 0.0, 0.0), 0.0);
        assert_eq!(LabelSetWeight::Fraction.weight(0.0, 3.0, 0.0), 0.0);
    }
}
