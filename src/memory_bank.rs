//! A memory bank of extra contrasts: MoCo's queue, pytorch-metric-learning's `CrossBatchMemory`
//! (requested in SupContrast #30), on the shard primitive (`crate::shard`).
//!
//! The bank is a FIFO of up to `capacity` past samples (their V views, detached) and their
//! positives. A step's loss has the batch's anchors and, as contrasts, the batch's rows followed
//! by the bank's (oldest first): the bank's samples join the batch as samples that no shard
//! covers, so they are contrasts only and get no gradient, and R' counts the batch's anchors
//! only. Positives come from labels or label sets (bank rows of the same class are positives),
//! or SimCLR (bank rows are negatives: another sample's views). A mask has no entries for the
//! bank's rows, so it is refused.
//!
//! Memory: the bank holds capacity·V·D elements in a ring; a step copies batch and bank into one
//! `[B + S, V, D]` batch for the backend (O((B + S)·D)), nothing (B + S)².

use ndarray::{s, Array1, Array2, Array3, ArrayView3};

use crate::backend::{Backend, ForwardOutput, Upstream};
use crate::config::SupConLoss;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::inputs::{BatchShape, OwnedPositives, Positives};
use crate::label_sets::LabelSetWeight;
use crate::shard;

/// What a bank stores of each sample's positives.
#[derive(Debug, Clone, PartialEq)]
enum Stored {
    /// Nothing yet (an empty bank takes the kind of its first push).
    Unset,
    SimClr,
    Labels(Vec<i64>),
    /// Row-major `[capacity, K]`.
    Sets {
        classes: usize,
        weight: LabelSetWeight,
        sets: Vec<bool>,
    },
}

/// A FIFO of past samples, used as extra contrasts (see the module docs).
#[derive(Debug, Clone)]
pub struct MemoryBank<T> {
    capacity: usize,
    dim: usize,
    /// V, fixed by the first push.
    views: Option<usize>,
    /// Ring of `[capacity, V, D]`, allocated at the first push.
    features: Vec<T>,
    positives: Stored,
    /// The slot of the oldest sample, and how many are held.
    head: usize,
    len: usize,
}

/// A step's forward pass against a bank: the joined batch and its output, kept for
/// [`MemoryBank::backward`].
#[derive(Debug, Clone)]
pub struct BankForward<T> {
    features: Array3<T>,
    positives: OwnedPositives,
    batch: usize,
    output: ForwardOutput,
}

impl<T> BankForward<T> {
    /// The loss over the batch's anchors; `None` under reduction none.
    pub fn loss(&self) -> Option<f64> {
        self.output.loss
    }

    /// ℓ_i of the batch's anchors, in the order of the batch alone (row v·B + b).
    pub fn per_anchor(&self) -> Array1<f64> {
        let state = &self.output.state;
        let all = self.output.per_anchor.as_slice().expect("a vector");
        Array1::from(shard::pick(&state.loss, state.shape, &(0..self.batch), all))
    }

    /// The joined batch's forward output (batch then bank samples).
    pub fn output(&self) -> &ForwardOutput {
        &self.output
    }
}

impl<T: Element> MemoryBank<T> {
    /// An empty bank of up to `capacity` samples of `dim` features per view.
    ///
    /// # Errors
    /// [`Error::MemoryBank`] for a capacity or dim of 0.
    pub fn new(capacity: usize, dim: usize) -> Result<Self> {
        if capacity == 0 || dim == 0 {
            return Err(Error::MemoryBank(format!(
                "capacity {capacity} and dim {dim} must be at least 1"
            )));
        }
        Ok(MemoryBank {
            capacity,
            dim,
            views: None,
            features: Vec::new(),
            positives: Stored::Unset,
            head: 0,
            len: 0,
        })
    }

    /// The samples held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bank holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most samples the bank holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The held samples' features, `[len, V, D]`, oldest first (`None` before the first push).
    pub fn features(&self) -> Option<Array3<T>> {
        let views = self.views?;
        let mut out = Vec::with_capacity(self.len * views * self.dim);
        for k in 0..self.len {
            out.extend_from_slice(self.sample(k));
        }
        Some(Array3::from_shape_vec((self.len, views, self.dim), out).expect("whole samples"))
    }

    /// The held samples' labels, oldest first, if the bank holds labels.
    pub fn labels(&self) -> Option<Vec<i64>> {
        match &self.positives {
            Stored::Labels(labels) => Some((0..self.len).map(|k| labels[self.slot(k)]).collect()),
            _ => None,
        }
    }

    /// The held samples' label sets, `[len, K]`, oldest first, if the bank holds label sets.
    pub fn label_sets(&self) -> Option<Array2<bool>> {
        match &self.positives {
            Stored::Sets { classes, sets, .. } => {
                let rows = (0..self.len).flat_map(|k| {
                    let slot = self.slot(k);
                    sets[slot * classes..(slot + 1) * classes].iter().copied()
                });
                Some(Array2::from_shape_vec((self.len, *classes), rows.collect()).expect("rows"))
            }
            _ => None,
        }
    }

    /// Appends a batch's samples (features are copied: the bank never sees a gradient). The
    /// oldest samples drop out when the bank is full; a batch larger than the capacity leaves
    /// its newest `capacity` samples.
    ///
    /// # Errors
    /// [`Error::MemoryBank`] for other views or dim than the bank's, or positives of another
    /// kind (or label sets of another K or weight); the labels' and sets' shape errors; the
    /// bank is unchanged on error.
    pub fn push(&mut self, features: ArrayView3<'_, T>, positives: Positives<'_>) -> Result<()> {
        let (batch, views, dim) = features.dim();
        self.check_fits(views, dim, &positives, batch)?;
        if self.views.is_none() {
            self.views = Some(views);
            self.features = vec![T::zeroed(); self.capacity * views * dim];
            self.positives = match positives {
                Positives::SimClr => Stored::SimClr,
                Positives::Labels(_) => Stored::Labels(vec![0; self.capacity]),
                Positives::LabelSets { sets, weight } => Stored::Sets {
                    classes: sets.ncols(),
                    weight,
                    sets: vec![false; self.capacity * sets.ncols()],
                },
                Positives::Mask(_) => unreachable!("check_fits refuses masks"),
            };
        }
        for b in batch.saturating_sub(self.capacity)..batch {
            let slot = if self.len < self.capacity {
                self.len += 1;
                self.slot(self.len - 1)
            } else {
                let slot = self.head;
                self.head = (self.head + 1) % self.capacity;
                slot
            };
            let width = views * dim;
            let target = &mut self.features[slot * width..(slot + 1) * width];
            for (t, x) in target.iter_mut().zip(features.slice(s![b, .., ..]).iter()) {
                *t = *x;
            }
            match (&mut self.positives, &positives) {
                (Stored::Labels(labels), Positives::Labels(new)) => labels[slot] = new[b],
                (Stored::Sets { classes, sets, .. }, Positives::LabelSets { sets: new, .. }) => {
                    for k in 0..*classes {
                        sets[slot * *classes + k] = new[[b, k]];
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes every sample (the views, dim and kind of positives stay).
    pub fn clear(&mut self) {
        (self.head, self.len) = (0, 0);
    }

    /// The loss of a batch (`[B, V, D]` and its positives) against the batch and the bank's
    /// samples (see the module docs). Does not push the batch: call [`push`](Self::push) after
    /// the step, as `CrossBatchMemory` enqueues after its loss.
    ///
    /// # Errors
    /// As [`push`](Self::push) for a batch that does not fit the bank; the backend's.
    pub fn forward<B: Backend>(
        &self,
        backend: &B,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<BankForward<T>> {
        let (batch, views, dim) = features.dim();
        self.check_fits(views, dim, &positives, batch)?;
        // The batch's samples, then the held ones oldest first: one copy of each.
        let mut joined: Vec<T> = Vec::with_capacity((batch + self.len) * views * dim);
        joined.extend(features.iter().copied());
        for k in 0..self.len {
            joined.extend_from_slice(self.sample(k));
        }
        let joined =
            Array3::from_shape_vec((batch + self.len, views, dim), joined).expect("whole samples");
        let positives = self.joined_positives(&positives);
        let shape = BatchShape::new(batch + self.len, views, dim)?;
        let shard = backend.forward_shard(loss, joined.view(), positives.view(), 0..batch)?;
        let output = ForwardOutput::from_shards(loss, shape, &[shard])?;
        Ok(BankForward {
            features: joined,
            positives,
            batch,
            output,
        })
    }

    /// ∂(objective)/∂ the batch's features, `[B, V, D]`, from the state of
    /// [`forward`](Self::forward): `upstream` is a scalar, or one value per batch anchor in the
    /// batch's order (row v·B + b) under reduction none.
    ///
    /// # Errors
    /// [`Error::UpstreamMismatch`], [`Error::NonFiniteUpstream`]; the backend's.
    pub fn backward<B: Backend>(
        &self,
        backend: &B,
        loss: &SupConLoss,
        forward: &BankForward<T>,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        let state = &forward.output.state;
        let samples = 0..forward.batch;
        let anchors = shard::anchor_rows(loss, state.shape, &samples).count();
        crate::backend::check_upstream(loss.reduction(), anchors, upstream)?;
        let placed = match upstream {
            Upstream::PerAnchor(values) => {
                let mut all = Array1::zeros(state.shape.anchors(loss.contrast_mode()));
                let (values, all_values) = (values.to_vec(), all.as_slice_mut().expect("a vector"));
                shard::place(loss, state.shape, &samples, &values, all_values);
                Some(all)
            }
            Upstream::Scalar(_) => None,
        };
        let run = |upstream: Upstream<'_>| {
            backend.backward_shard(
                loss,
                forward.features.view(),
                forward.positives.view(),
                state,
                upstream,
                0..forward.batch,
            )
        };
        match &placed {
            Some(all) => run(Upstream::PerAnchor(all.view())),
            None => run(upstream),
        }
    }

    /// The ring slot of the k-th oldest sample.
    fn slot(&self, k: usize) -> usize {
        (self.head + k) % self.capacity
    }

    fn sample(&self, k: usize) -> &[T] {
        let width = self.views.unwrap_or(0) * self.dim;
        let slot = self.slot(k);
        &self.features[slot * width..(slot + 1) * width]
    }

    /// Fails unless a batch of `views` × `dim` features and these positives fits the bank.
    fn check_fits(
        &self,
        views: usize,
        dim: usize,
        positives: &Positives<'_>,
        batch: usize,
    ) -> Result<()> {
        let misfit = |what: String| Err(Error::MemoryBank(what));
        if dim != self.dim || self.views.is_some_and(|v| v != views) {
            return misfit(format!(
                "a batch of {views} views × {dim} dims, the bank holds {:?} views × {}",
                self.views, self.dim
            ));
        }
        match positives {
            Positives::Mask(_) => {
                return misfit("a mask has no weights for the bank's rows: use labels".into())
            }
            Positives::Labels(labels) if labels.len() != batch => {
                return Err(Error::LabelsLength {
                    expected: batch,
                    got: labels.len(),
                })
            }
            Positives::LabelSets { sets, .. } if sets.nrows() != batch => {
                return Err(Error::LabelSetsShape {
                    expected: batch,
                    got: [sets.nrows(), sets.ncols()],
                })
            }
            _ => {}
        }
        let same_kind = match (&self.positives, positives) {
            (Stored::Unset, _) => true,
            (Stored::SimClr, Positives::SimClr) | (Stored::Labels(_), Positives::Labels(_)) => true,
            (
                Stored::Sets {
                    classes, weight, ..
                },
                Positives::LabelSets { sets, weight: w },
            ) => *classes == sets.ncols() && weight == w,
            _ => false,
        };
        if !same_kind {
            return misfit(format!(
                "the bank holds {}, the batch has other positives",
                match &self.positives {
                    Stored::Unset => "nothing".to_string(),
                    Stored::SimClr => "SimCLR samples".into(),
                    Stored::Labels(_) => "labels".into(),
                    Stored::Sets {
                        classes, weight, ..
                    } => format!("label sets of {classes} classes weighed {weight:?}"),
                }
            ));
        }
        Ok(())
    }

    /// The batch's positives followed by the bank's (a batch that passed `check_fits`).
    fn joined_positives(&self, positives: &Positives<'_>) -> OwnedPositives {
        match positives {
            // `check_fits` refuses masks.
            Positives::SimClr | Positives::Mask(_) => OwnedPositives::SimClr,
            Positives::Labels(labels) => {
                let mut all: Vec<i64> = labels.iter().copied().collect();
                all.extend(self.labels().unwrap_or_default());
                OwnedPositives::Labels(Array1::from(all))
            }
            Positives::LabelSets { sets, weight } => {
                let classes = sets.ncols();
                let mut all: Vec<bool> = sets.iter().copied().collect();
                if let Stored::Sets { sets: held, .. } = &self.positives {
                    for k in 0..self.len {
                        let slot = self.slot(k);
                        all.extend_from_slice(&held[slot * classes..(slot + 1) * classes]);
                    }
                }
                let rows = sets.nrows() + self.len;
                OwnedPositives::LabelSets {
                    sets: Array2::from_shape_vec((rows, classes), all).expect("whole rows"),
                    weight: *weight,
                }
            }
        }
    }
}
