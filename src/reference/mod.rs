//! The reference backend: naive, f64 throughout, straight from the formulas of docs/math.md.
//!
//! It is the oracle every other backend is tested against, so it favours the obvious over the
//! fast: one anchor at a time, a full row of logits, the analytic gradient written term by term.
//! O(R·N·D) time, O(N·D) memory (one row of logits at a time).

pub(crate) mod relation;

use ndarray::{Array1, Array3, ArrayView3};

use crate::backend::{
    check_finite_gradient, check_finite_loss, reduce, Backend, ForwardOutput, SavedState, Upstream,
};
use crate::config::{Denominator, Summation, SupConLoss};
use crate::element::{Element, GradElement};
use crate::error::Result;
use crate::inputs::{check_logit_range, largest_logit_of, validate_inputs, BatchShape, Positives};
use crate::math::{sigmoid, softplus};
use crate::normalize;
use relation::{Pair, Relation};

/// The f64 reference backend (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferenceBackend;

/// Largest |s_ij| the f64 arithmetic accepts: sums of N logits and their differences stay far
/// below f64::MAX (1.8e308).
const LOGIT_LIMIT: f64 = 1e300;

/// The flattened rows z_r (row `v·B + b` = view v of sample b) in f64: the features, or under
/// `normalize` the rows u_r = x_r / max(‖x_r‖, ε).
struct Rows {
    dim: usize,
    data: Vec<f64>,
    /// ‖x_r‖ per row under `normalize`.
    norms: Option<Vec<f64>>,
}

impl Rows {
    /// The rows in f64.
    ///
    /// # Errors
    /// [`crate::Error::OutOfMemory`]; [`crate::Error::Unsupported`] for logits beyond
    /// [`LOGIT_LIMIT`].
    fn new<T: Element>(
        features: &ArrayView3<'_, T>,
        shape: BatchShape,
        loss: &SupConLoss,
    ) -> Result<Self> {
        let dim = shape.dim();
        let mut data = crate::alloc::filled("reference", shape.elements(), 0.0)?;
        let mut norms = loss.normalize().then(Vec::new);
        for (row, values) in data.chunks_exact_mut(dim).enumerate() {
            let (b, v) = (shape.sample_of(row), shape.view_of(row));
            let source = features.slice(ndarray::s![b, v, ..]);
            for (value, x) in values.iter_mut().zip(source) {
                *value = x.to_f64();
            }
            if let Some(norms) = &mut norms {
                let norm = normalize::norm(values.iter().copied());
                let divisor = normalize::divisor(norm);
                values.iter_mut().for_each(|x| *x /= divisor);
                norms.push(norm);
            }
        }
        let largest_square_norm = data
            .chunks_exact(dim)
            .map(|row| row.iter().map(|x| x * x).sum::<f64>())
            .fold(0.0, f64::max);
        check_logit_range(
            "reference",
            largest_logit_of(largest_square_norm, loss.temperature()),
            LOGIT_LIMIT,
        )?;
        Ok(Rows { dim, data, norms })
    }

    fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.dim..(r + 1) * self.dim]
    }

    /// s_ij = z_i·z_j/τ for every contrast j.
    fn logits(&self, i: usize, temperature: f64) -> Vec<f64> {
        let zi = self.row(i);
        (0..self.data.len() / self.dim)
            .map(|j| zi.iter().zip(self.row(j)).map(|(a, b)| a * b).sum::<f64>() / temperature)
            .collect()
    }
}

/// log Σ e^x over the given values; `-inf` for none.
fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// One anchor's view of the batch: its logits row and how each contrast relates to it.
struct AnchorRow {
    logits: Vec<f64>,
    pairs: Vec<Pair>,
}

impl AnchorRow {
    fn new(rows: &Rows, relation: &Relation<'_>, loss: &SupConLoss, i: usize) -> Self {
        let logits = rows.logits(i, loss.temperature());
        let pairs = (0..logits.len()).map(|j| relation.pair(i, j)).collect();
        AnchorRow { logits, pairs }
    }

    fn in_denominator(&self, loss: &SupConLoss, j: usize) -> bool {
        match loss.denominator() {
            Denominator::All => self.pairs[j] != Pair::Excluded,
            Denominator::OnlyNegatives | Denominator::OnePositive => {
                self.pairs[j] == Pair::Negative
            }
        }
    }

    /// (j, w_ij, s_ij) for each kept positive.
    fn positives(&self) -> impl Iterator<Item = (usize, f64, f64)> + Clone + '_ {
        self.pairs
            .iter()
            .enumerate()
            .filter_map(|(j, pair)| match pair {
                Pair::Positive(w) => Some((j, *w, self.logits[j])),
                _ => None,
            })
    }

    /// (LSE over the denominator set, weighted LSE over positives, P).
    fn statistics(&self, loss: &SupConLoss) -> (f64, f64, f64) {
        let denominator = (0..self.logits.len())
            .filter(|&j| self.in_denominator(loss, j))
            .map(|j| self.logits[j]);
        let lse = log_sum_exp(denominator);
        let lse_positive = log_sum_exp(self.positives().map(|(_, w, s)| w.ln() + s));
        let positive_weight = self.positives().map(|(_, w, _)| w).sum();
        (lse, lse_positive, positive_weight)
    }

    /// For one-positive: log(w_p · σ(s_p − LSE^N)) per positive, the log-terms of L_in's sum.
    fn one_positive_log_terms(&self, lse: f64) -> impl Iterator<Item = f64> + Clone + '_ {
        self.positives()
            .map(move |(_, w, s)| w.ln() - softplus(lse - s))
    }

    /// ℓ_i / c. Zero without positives, and zero for an empty denominator under
    /// all/only-negatives (a one-class batch under only-negatives).
    fn unscaled_loss(&self, loss: &SupConLoss, (lse, lse_positive, p): (f64, f64, f64)) -> f64 {
        if p <= 0.0 {
            return 0.0;
        }
        match (loss.denominator(), loss.summation()) {
            (Denominator::All | Denominator::OnlyNegatives, _) if lse == f64::NEG_INFINITY => 0.0,
            (Denominator::All | Denominator::OnlyNegatives, Summation::Outside) => {
                -self.positives().map(|(_, w, s)| w * (s - lse)).sum::<f64>() / p
            }
            (Denominator::All | Denominator::OnlyNegatives, Summation::Inside) => {
                lse - lse_positive + p.ln()
            }
            (Denominator::OnePositive, Summation::Outside) => {
                self.positives()
                    .map(|(_, w, s)| w * softplus(lse - s))
                    .sum::<f64>()
                    / p
            }
            (Denominator::OnePositive, Summation::Inside) => {
                p.ln() - log_sum_exp(self.one_positive_log_terms(lse))
            }
        }
    }

    /// ∂(ℓ_i / c)/∂s_ij for every j, from the saved statistics.
    fn unscaled_logit_gradient(
        &self,
        loss: &SupConLoss,
        (lse, lse_positive, p): (f64, f64, f64),
    ) -> Vec<f64> {
        let n = self.logits.len();
        let mut grad = vec![0.0; n];
        if p <= 0.0 {
            return grad;
        }
        match loss.denominator() {
            Denominator::All | Denominator::OnlyNegatives => {
                if lse == f64::NEG_INFINITY {
                    return grad;
                }
                for j in (0..n).filter(|&j| self.in_denominator(loss, j)) {
                    grad[j] += (self.logits[j] - lse).exp();
                }
                for (j, w, s) in self.positives() {
                    grad[j] -= match loss.summation() {
                        Summation::Outside => w / p,
                        Summation::Inside => (w.ln() + s - lse_positive).exp(),
                    };
                }
            }
            Denominator::OnePositive => {
                // Per positive: its pull on s_p and its weight on the negatives' softmax.
                let pulls: Vec<(usize, f64)> = match loss.summation() {
                    // d/ds_p [ (w/P) softplus(LSE^N − s_p) ] = −(w/P) σ(LSE^N − s_p)
                    Summation::Outside => self
                        .positives()
                        .map(|(j, w, s)| (j, w / p * sigmoid(lse - s)))
                        .collect(),
                    // ℓ = ln P − ln A, A = Σ w_p π_p, π_p = σ(s_p − LSE^N):
                    // d/ds_p = −(w_p π_p / A)(1 − π_p)
                    Summation::Inside => {
                        let log_a = log_sum_exp(self.one_positive_log_terms(lse));
                        self.positives()
                            .map(|(j, w, s)| {
                                let share = (w.ln() - softplus(lse - s) - log_a).exp();
                                (j, share * sigmoid(lse - s))
                            })
                            .collect()
                    }
                };
                let total_pull: f64 = pulls.iter().map(|(_, pull)| pull).sum();
                for (j, pull) in pulls {
                    grad[j] -= pull;
                }
                if lse > f64::NEG_INFINITY {
                    for j in (0..n).filter(|&j| self.in_denominator(loss, j)) {
                        grad[j] += total_pull * (self.logits[j] - lse).exp();
                    }
                }
            }
        }
        grad
    }
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        let batch = validate_inputs(&features, &positives)?;
        let shape = batch.shape;
        let rows = Rows::new(&features, shape, loss)?;
        let relation = Relation::new(loss, shape, positives);
        let anchors = shape.anchors(loss.contrast_mode());
        let c = loss.loss_scale();
        let (mut lse, mut lse_positive, mut positive_weight, mut per_anchor) =
            (vec![], vec![], vec![], vec![]);
        for i in 0..anchors {
            let row = AnchorRow::new(&rows, &relation, loss, i);
            let stats = row.statistics(loss);
            per_anchor.push(c * row.unscaled_loss(loss, stats));
            lse.push(stats.0);
            lse_positive.push(stats.1);
            positive_weight.push(stats.2);
        }
        let (reduced, mean_denominator) = reduce(loss, &per_anchor, &positive_weight)?;
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
                fingerprint: Some(batch.fingerprint),
            },
        };
        check_finite_loss(&output)?;
        Ok(output)
    }

    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        let batch = validate_inputs(&features, &positives)?;
        state.check(loss, &batch)?;
        let shape = batch.shape;
        let coefficients = state.anchor_coefficients(upstream)?;
        let rows = Rows::new(&features, shape, loss)?;
        let relation = Relation::new(loss, shape, positives);
        let (n, d, tau) = (shape.rows(), shape.dim(), loss.temperature());
        let mut dz = crate::alloc::filled("reference", n * d, 0.0)?;
        for (i, coefficient) in coefficients.iter().enumerate() {
            let row = AnchorRow::new(&rows, &relation, loss, i);
            let stats = (
                state.lse[i],
                state.lse_positive[i],
                state.positive_weight[i],
            );
            let grad = row.unscaled_logit_gradient(loss, stats);
            // s_ij = z_i·z_j/τ: ∂/∂z_i += G_ij z_j/τ and ∂/∂z_j += G_ij z_i/τ.
            for (j, g) in grad.iter().enumerate().filter(|(_, g)| **g != 0.0) {
                let g = coefficient * g / tau;
                for k in 0..d {
                    dz[i * d + k] += g * rows.row(j)[k];
                    dz[j * d + k] += g * rows.row(i)[k];
                }
            }
        }
        // Back from u to x, row by row.
        if let Some(norms) = &rows.norms {
            for (r, norm) in norms.iter().enumerate() {
                normalize::chain_rule(&mut dz[r * d..(r + 1) * d], rows.row(r), *norm);
            }
        }
        // Output row (sample b, view v) is feature row v·B + b.
        let (batch, views) = (shape.batch(), shape.views());
        let mut grad = crate::alloc::filled("reference", n * d, T::Grad::from_f64(0.0))?;
        for (out, values) in grad.chunks_exact_mut(d).enumerate() {
            let row = (out % views) * batch + out / views;
            for (g, &x) in values.iter_mut().zip(&dz[row * d..(row + 1) * d]) {
                *g = T::Grad::from_f64(x);
            }
        }
        check_finite_gradient(&grad)?;
        Ok(Array3::from_shape_vec((batch, views, d), grad)
            .expect("the gradient has the features' shape"))
    }
}
