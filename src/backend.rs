//! The backend abstraction every implementation (reference, cpu, cuda, emulated kernels)
//! implements with the same signatures, and the values that cross it.

use std::ops::Range;

use ndarray::{Array1, Array3, ArrayView1, ArrayView3};
use rayon::prelude::*;

use crate::config::{NoPositivePolicy, Reduction, SupConLoss};

use crate::element::{Element, GradElement};
use crate::error::{Error, Result};
use crate::inputs::{BatchShape, Positives, Validated};
use crate::shard::{self, ShardStatistics};

/// The gradient flowing into the loss from above (`∂(objective)/∂(loss output)`).
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'a> {
    /// For [`Reduction::Mean`] and [`Reduction::Sum`]: the scalar gradient (1.0 for plain
    /// minimisation).
    Scalar(f64),
    /// For [`Reduction::None`]: one entry per anchor.
    PerAnchor(ArrayView1<'a, f64>),
}

impl Default for Upstream<'_> {
    fn default() -> Self {
        Upstream::Scalar(1.0)
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// The reduced loss; `None` for [`Reduction::None`] (use `per_anchor`).
    pub loss: Option<f64>,
    /// ℓ_i for each of the R anchors (anchors without positives hold 0).
    pub per_anchor: Array1<f64>,
    /// O(N) state for [`Backend::backward`].
    pub state: SavedState,
}

/// The O(R) per-anchor statistics a backward pass needs (nothing N×N), and a fingerprint of
/// the forward batch, so that a backward pass on another batch is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    pub(crate) loss: SupConLoss,
    pub(crate) shape: BatchShape,
    /// log-sum-exp of s_ij over anchor i's denominator set (`-inf` when it is empty).
    pub(crate) lse: Vec<f64>,
    /// log Σ_j w_ij e^{s_ij} over i's kept positives (`-inf` when it has none).
    pub(crate) lse_positive: Vec<f64>,
    /// P_i = Σ_j w_ij over kept positives.
    pub(crate) positive_weight: Vec<f64>,
    /// R', the mean's denominator (1 for sum and none).
    pub(crate) mean_denominator: f64,
    /// The forward batch's fingerprint (`inputs::Validated`); `None` where the forward pass read
    /// device memory (the CUDA device API), which no backward pass can re-hash on the host.
    pub(crate) fingerprint: Option<u64>,
}

impl SavedState {
    /// A state from its parts, for bindings that keep it between the passes as plain arrays
    /// (PyTorch's `save_for_backward`): per anchor LSE_i, LSE^P_i and P_i, then R', and the
    /// forward batch's [`fingerprint`](Self::fingerprint) if it had one.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] unless each vector holds one value per anchor of `shape`
    /// under `loss`, and R' is ≥ 1.
    pub fn from_parts(
        loss: SupConLoss,
        shape: BatchShape,
        [lse, lse_positive, positive_weight]: [Vec<f64>; 3],
        mean_denominator: f64,
        fingerprint: Option<u64>,
    ) -> Result<Self> {
        let anchors = shape.anchors(loss.contrast_mode());
        if [&lse, &lse_positive, &positive_weight]
            .iter()
            .any(|values| values.len() != anchors)
        {
            return Err(Error::StateMismatch(format!(
                "a state of {anchors} anchors needs {anchors} values of each statistic"
            )));
        }
        if mean_denominator.is_nan() || mean_denominator < 1.0 {
            return Err(Error::StateMismatch(format!(
                "R' = {mean_denominator} is below 1"
            )));
        }
        Ok(SavedState {
            loss,
            shape,
            lse,
            lse_positive,
            positive_weight,
            mean_denominator,
            fingerprint,
        })
    }

    /// The forward batch's fingerprint (a hash of its features and positives), which a
    /// backward pass compares with its own batch's; `None` for states of the CUDA device API.
    pub fn fingerprint(&self) -> Option<u64> {
        self.fingerprint
    }

    /// The batch shape the state belongs to.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }
    /// Per anchor: the log-sum-exp over its denominator set.
    pub fn lse(&self) -> &[f64] {
        &self.lse
    }
    /// Per anchor: the weighted log-sum-exp over its positives.
    pub fn lse_positive(&self) -> &[f64] {
        &self.lse_positive
    }
    /// Per anchor: P_i.
    pub fn positive_weight(&self) -> &[f64] {
        &self.positive_weight
    }
    /// R'.
    pub fn mean_denominator(&self) -> f64 {
        self.mean_denominator
    }

    /// Fails unless this state came from a forward pass of `loss` on this batch: the same shape
    /// and, where the state has a fingerprint, the same values of features and positives.
    pub(crate) fn check(&self, loss: &SupConLoss, batch: &Validated) -> Result<()> {
        let shape = batch.shape;
        if self.loss != *loss {
            return Err(Error::StateMismatch(
                "the loss configuration differs from the forward pass".into(),
            ));
        }
        if self.shape != shape {
            return Err(Error::StateMismatch(format!(
                "features have shape {:?}, the forward pass saw {:?}",
                shape, self.shape
            )));
        }
        if self.fingerprint.is_some_and(|f| f != batch.fingerprint) {
            return Err(Error::StateMismatch(
                "the features or positives differ from those of the forward pass".into(),
            ));
        }
        Ok(())
    }

    /// Per anchor: `c · u_i / R'`, the factor in front of ∂ℓ_i/∂s_ij (before `[P_i > 0]`).
    pub(crate) fn anchor_coefficients(&self, upstream: Upstream<'_>) -> Result<Vec<f64>> {
        let anchors = self.lse.len();
        check_upstream(self.loss.reduction(), anchors, upstream)?;
        let scale = self.loss.loss_scale() / self.mean_denominator;
        Ok(match upstream {
            Upstream::Scalar(u) => vec![scale * u; anchors],
            Upstream::PerAnchor(u) => u.iter().map(|x| scale * x).collect(),
        })
    }
}

/// Fails unless `upstream` fits a loss of `reduction` over `anchors` anchors: a finite scalar
/// for mean and sum, `anchors` finite values for none.
///
/// # Errors
/// [`Error::UpstreamMismatch`], [`Error::NonFiniteUpstream`].
pub(crate) fn check_upstream(
    reduction: Reduction,
    anchors: usize,
    upstream: Upstream<'_>,
) -> Result<()> {
    match (upstream, reduction) {
        (Upstream::Scalar(u), Reduction::Mean | Reduction::Sum) => {
            if u.is_finite() {
                Ok(())
            } else {
                Err(Error::NonFiniteUpstream)
            }
        }
        (Upstream::PerAnchor(u), Reduction::None) => {
            if u.len() != anchors {
                return Err(Error::UpstreamMismatch {
                    reduction,
                    reason: format!("{} entries for {anchors} anchors", u.len()),
                });
            }
            if u.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFiniteUpstream);
            }
            Ok(())
        }
        (Upstream::Scalar(_), Reduction::None) => Err(Error::UpstreamMismatch {
            reduction,
            reason: "reduction none needs a per-anchor upstream gradient".into(),
        }),
        (Upstream::PerAnchor(_), _) => Err(Error::UpstreamMismatch {
            reduction,
            reason: "a reduced loss needs a scalar upstream gradient".into(),
        }),
    }
}

/// Applies the no-positive policy and the reduction to per-anchor losses: returns the reduced
/// loss and R'. Sums run in anchor order (deterministic).
///
/// # Errors
/// [`Error::AnchorWithoutPositives`] under [`NoPositivePolicy::Error`].
pub(crate) fn reduce(
    loss: &SupConLoss,
    per_anchor: &[f64],
    positive_weight: &[f64],
) -> Result<(Option<f64>, f64)> {
    let without = positive_weight.iter().position(|&p| p <= 0.0);
    let with_positive = positive_weight.iter().filter(|&&p| p > 0.0).count();
    let mean_denominator = match (loss.reduction(), loss.no_positive()) {
        (_, NoPositivePolicy::Error) if without.is_some() => {
            return Err(Error::AnchorWithoutPositives {
                anchor: without.unwrap_or_default(),
            })
        }
        (Reduction::Sum | Reduction::None, _) => 1.0,
        (Reduction::Mean, NoPositivePolicy::Exclude) => with_positive.max(1) as f64,
        (Reduction::Mean, _) => per_anchor.len() as f64,
    };
    let total: f64 = per_anchor.iter().sum();
    let reduced = match loss.reduction() {
        Reduction::None => None,
        _ => Some(total / mean_denominator),
    };
    Ok((reduced, mean_denominator))
}

/// Fails unless the forward pass's losses are finite (see [`Error::Overflow`]).
///
/// # Errors
/// [`Error::Overflow`].
pub(crate) fn check_finite_loss(output: &ForwardOutput) -> Result<()> {
    let finite =
        output.loss.is_none_or(f64::is_finite) && output.per_anchor.iter().all(|l| l.is_finite());
    if finite {
        Ok(())
    } else {
        Err(Error::Overflow { output: "loss" })
    }
}

/// Fails unless every gradient entry is finite (see [`Error::Overflow`]).
///
/// # Errors
/// [`Error::Overflow`].
pub(crate) fn check_finite_gradient<G: GradElement>(grad: &[G]) -> Result<()> {
    if grad.par_iter().all(|g| g.to_f64().is_finite()) {
        Ok(())
    } else {
        Err(Error::Overflow { output: "gradient" })
    }
}

/// A SupCon implementation. Every method validates its inputs first and returns a typed error
/// for anything wrong; none panics on user input.
///
/// Features are `[B, V, D]` views with any strides (backends copy non-contiguous views).
pub trait Backend {
    /// A short name (`"reference"`, `"cpu"`, …).
    fn name(&self) -> &'static str;

    /// The loss, the per-anchor losses and the O(N) state for [`backward`](Self::backward).
    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput>;

    /// ∂(objective)/∂features, `[B, V, D]`, from the state of [`forward`](Self::forward) on the
    /// same features and positives.
    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>>;

    /// The statistics of the anchors of the samples `samples` (a shard: see
    /// [`ShardStatistics`]) against every row of the batch. Nothing is reduced: the
    /// no-positive policy and the reduction apply where shards are assembled
    /// ([`ForwardOutput::from_shards`]).
    ///
    /// The default (the reference's) runs the whole forward pass and picks the shard's anchors.
    /// The CPU backend computes only the tiles that touch the shard's rows, the kernels only
    /// the shard's anchor rows: bitwise the whole pass's values.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and [`Error::InvalidShard`] for samples outside the
    /// batch.
    fn forward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        let (batch, views, dim) = features.dim();
        let shape = BatchShape::new(batch, views, dim)?;
        shard::check_samples(shape, &samples)?;
        let output = self.forward(&shard::without_policy_error(loss), features, positives)?;
        ShardStatistics::of_output(loss, shape, samples, &output)
    }

    /// ∂(objective)/∂ the rows of the samples `samples`, `[b1 − b0, V, D]`, from the state of
    /// the whole batch ([`ForwardOutput::from_shards`], or [`forward`](Self::forward)).
    ///
    /// The default (the reference's) runs the whole backward pass and slices it. The CPU
    /// backend computes only the tiles that touch the shard's rows, the kernels only the
    /// shard's gradient rows.
    ///
    /// # Errors
    /// As [`backward`](Self::backward), and [`Error::InvalidShard`] for samples outside the
    /// batch.
    fn backward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
        samples: Range<usize>,
    ) -> Result<Array3<T::Grad>> {
        let (batch, views, dim) = features.dim();
        shard::check_samples(BatchShape::new(batch, views, dim)?, &samples)?;
        let grad = self.backward(loss, features, positives, state, upstream)?;
        Ok(shard::gradient_rows(&grad, &samples))
    }

    /// Forward then backward in one call.
    fn forward_backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(ForwardOutput, Array3<T::Grad>)> {
        let output = self.forward(loss, features.view(), positives)?;
        let grad = self.backward(loss, features, positives, &output.state, upstream)?;
        Ok((output, grad))
    }
}
