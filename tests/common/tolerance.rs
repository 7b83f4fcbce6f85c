//! The one tolerance model every backend is held to against the f64 reference.
//!
//! The reference runs on the very values a backend reads: f32, f16 and bf16 features widen to f64
//! exactly, so their rounding is no error source. What separates a backend from the reference is
//! its own arithmetic, of unit roundoff ε (2⁻²³ for f32), and, for f64 features that the backend
//! rounds to f32, that rounding. With s_max = max_r ‖z_r‖²/τ ≥ |s_ij| (the logit range), a logit
//! is a D-term dot product whose rounding errors add like a random walk; the log-sum-exps and
//! T_i/P_i inherit that error plus their own, ~ε·s_max each, and N-term sums add ~√N·ε:
//!
//!     δs = ε·((√D + 4)·s_max + √N) + [f64 features rounded to f32]·ε·s_max
//!
//! Every output is held to SAFETY times its bound, in absolute terms (so a quantity that is 0 in
//! theory costs no relative blow-up):
//!
//! | output | bound |
//! |---|---|
//! | ℓ_i, the mean | c·δs |
//! | the sum | R·c·δs |
//! | LSE_i, LSE^P_i | δs (−∞, an empty set, must match exactly) |
//! | P_i | ε·N·max_j w_ij |
//! | R' | exact |
//! | ∂L/∂z | (c·max|u|/R')·(max‖z‖/τ)·(2 + 2R/N)·(δs + ρ) |
//!
//! Under `normalize` the loss sees u_r = x_r / max(‖x_r‖, 1e-12): s_max and max‖z‖ use
//! ‖u_r‖ ≤ 1, and the gradient's unit gains the chain rule's 1 / min_r max(‖x_r‖, 1e-12).
//!
//! The gradient's unit is the size of one row's gradient: weights H that carry relative errors
//! δs, on terms of total size (c·|u|/R')·‖z‖/τ from both sides of the pair. ρ is the rounding of
//! the product's operands: 0, except on tensor cores (H in bf16: 2⁻⁹; f16 features: 2·2⁻⁹; f32
//! features split into bf16 hi + lo: 2⁻¹⁶, which adds 2⁻¹⁶·s_max to δs as well). A wrong mask, term or
//! scale is an O(1) relative error, orders of magnitude above these bounds. Each test prints the
//! largest error/bound ratio it saw ([`Worst`]).

use ndarray::Array3;
use supcon::{
    ContrastMode, DType, Element, ForwardOutput, GradElement, Reduction, SupConLoss, Upstream,
};

/// Headroom over the error model.
const SAFETY: f64 = 4.0;

/// The arithmetic a backend computes in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Precision {
    /// f64 throughout (the reference).
    F64,
    /// f32 products, exponentials and sums (the CPU backend, the kernels); f64 features, where
    /// accepted, are rounded to f32 first.
    F32,
    /// The kernels under `supcon::Precision::Auto`: as [`Precision::F32`] for f32 features;
    /// f16 and bf16 features on tensor cores, whose backward rounds each weight H_kj to bf16
    /// (and, for f16 features, the z_j it multiplies): see [`Precision::operand_rounding`].
    TensorCores,
    /// The kernels under `supcon::Precision::Bf16x3`: as [`Precision::TensorCores`], and f32
    /// features on tensor cores too, split into bf16 hi + lo: every product to 2⁻¹⁶ relative
    /// (x = hi + lo to 2⁻¹⁸, the lo·lo term dropped), the logits to 2⁻¹⁶·s_max.
    Bf16x3,
}

impl Precision {
    fn epsilon(self) -> f64 {
        match self {
            Precision::F64 => f64::EPSILON,
            Precision::F32 | Precision::TensorCores | Precision::Bf16x3 => f64::from(f32::EPSILON),
        }
    }

    /// The relative rounding of each term H_kj z_j of the gradient's product: bf16's unit
    /// roundoff 2⁻⁹ for H (bf16 features), twice that when z_j is rounded from f16 to bf16 too.
    /// |Σ_j δH_kj z_jd| ≤ ρ (max‖z‖/τ) Σ_j |H_kj|, and Σ_j |H_kj| is what the gradient unit
    /// bounds, so the gradient's bound gains ρ next to δs.
    fn operand_rounding(self, dtype: DType) -> f64 {
        match (self, dtype) {
            (Precision::TensorCores | Precision::Bf16x3, DType::BF16) => 2f64.powi(-9),
            (Precision::TensorCores | Precision::Bf16x3, DType::F16) => 2.0 * 2f64.powi(-9),
            (Precision::Bf16x3, DType::F32) => 2f64.powi(-16),
            _ => 0.0,
        }
    }

    /// The relative error of a split product (f32 features under `Bf16x3`), which adds
    /// ρ·s_max to every logit's error.
    fn split_products(self, dtype: DType) -> f64 {
        match (self, dtype) {
            (Precision::Bf16x3, DType::F32) => 2f64.powi(-16),
            _ => 0.0,
        }
    }
}

/// The bounds of the module docs for one problem.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    per_anchor: f64,
    reduced: f64,
    lse: f64,
    weight: f64,
    gradient: f64,
}

impl Tolerance {
    /// The bounds for `loss` on features `z` (as the backend reads them) and the mask weights'
    /// largest value `max_weight` (1 for labels and SimCLR), with the reference's R'.
    pub fn new<T: Element>(
        precision: Precision,
        loss: &SupConLoss,
        z: &Array3<T>,
        max_weight: f64,
        upstream: Upstream<'_>,
        r_prime: f64,
    ) -> Self {
        let (b, v, d) = z.dim();
        let n = (b * v) as f64;
        let norms: Vec<f64> = z
            .rows()
            .into_iter()
            .map(|row| row.iter().map(|x| x.to_f64().powi(2)).sum::<f64>().sqrt())
            .collect();
        // Under normalisation the loss sees rows of norm ≤ 1, and the chain rule back to x
        // divides row r's gradient by max(‖x_r‖, 1e-12).
        let (max_norm, chain_rule) = if loss.normalize() {
            let smallest = norms
                .iter()
                .fold(f64::INFINITY, |m, &x| m.min(x.max(1e-12)));
            (1.0, smallest.recip())
        } else {
            (norms.iter().fold(0.0f64, |m, &x| m.max(x)), 1.0)
        };
        let tau = loss.temperature();
        let s_max = max_norm * max_norm / tau;
        let eps = precision.epsilon();
        let rounded_input = T::DTYPE == DType::F64 && precision != Precision::F64;
        let logit = eps * (((d as f64).sqrt() + 4.0) * s_max + n.sqrt())
            + if rounded_input { eps * s_max } else { 0.0 }
            + precision.split_products(T::DTYPE) * s_max;
        let c = loss.loss_scale();
        let anchors = match loss.contrast_mode() {
            ContrastMode::All => n,
            ContrastMode::One => b as f64,
        };
        let max_upstream = match upstream {
            Upstream::Scalar(u) => u.abs(),
            Upstream::PerAnchor(u) => u.iter().fold(0.0f64, |m, x| m.max(x.abs())),
        };
        let gradient_unit =
            c * max_upstream / r_prime * max_norm / tau * (2.0 + 2.0 * anchors / n) * chain_rule;
        let reduced_scale = if loss.reduction() == Reduction::Sum {
            anchors
        } else {
            1.0
        };
        Tolerance {
            per_anchor: SAFETY * c * logit,
            reduced: SAFETY * c * logit * reduced_scale,
            lse: SAFETY * logit,
            weight: SAFETY * eps * n * max_weight.max(1.0),
            gradient: SAFETY * gradient_unit * (logit + precision.operand_rounding(T::DTYPE)),
        }
    }

    /// Asserts that a backend's forward output and gradient match the reference's within the
    /// bounds (finite where the reference is, −∞ exactly where it is); returns the largest
    /// error/bound ratio.
    pub fn check<G: GradElement, H: GradElement>(
        &self,
        what: &str,
        (out, grad): &(ForwardOutput, Array3<G>),
        (want, want_grad): &(ForwardOutput, Array3<H>),
    ) -> f64 {
        let mut worst = 0.0f64;
        let mut compare = |name: &str, got: &[f64], expected: &[f64], bound: f64| {
            assert_eq!(got.len(), expected.len(), "{what}: {name} lengths");
            for (k, (&x, &y)) in got.iter().zip(expected).enumerate() {
                if y.is_finite() {
                    let ratio = (x - y).abs() / bound;
                    assert!(
                        ratio <= 1.0,
                        "{what}: {name}[{k}] = {x:e}, reference {y:e}: off by {:e}, bound {bound:e}",
                        (x - y).abs()
                    );
                    worst = worst.max(ratio);
                } else {
                    assert_eq!(x, y, "{what}: {name}[{k}]");
                }
            }
        };
        assert_eq!(out.loss.is_some(), want.loss.is_some(), "{what}: loss");
        compare(
            "loss",
            &out.loss.into_iter().collect::<Vec<_>>(),
            &want.loss.into_iter().collect::<Vec<_>>(),
            self.reduced,
        );
        compare(
            "ℓ",
            out.per_anchor.as_slice().unwrap(),
            want.per_anchor.as_slice().unwrap(),
            self.per_anchor,
        );
        let (state, want_state) = (&out.state, &want.state);
        compare("LSE", state.lse(), want_state.lse(), self.lse);
        compare(
            "LSE^P",
            state.lse_positive(),
            want_state.lse_positive(),
            self.lse,
        );
        compare(
            "P",
            state.positive_weight(),
            want_state.positive_weight(),
            self.weight,
        );
        assert_eq!(
            state.mean_denominator(),
            want_state.mean_denominator(),
            "{what}: R'"
        );
        assert_eq!(state.shape(), want_state.shape(), "{what}: shape");
        assert_eq!(grad.dim(), want_grad.dim(), "{what}: gradient shape");
        let grad: Vec<f64> = grad.iter().map(|g| g.to_f64()).collect();
        let want_grad: Vec<f64> = want_grad.iter().map(|g| g.to_f64()).collect();
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{what}: non-finite gradient"
        );
        compare("∂L/∂z", &grad, &want_grad, self.gradient);
        worst
    }
}

/// The largest error/bound ratio a test saw, for its report.
#[derive(Debug, Default)]
pub struct Worst {
    ratio: f64,
    what: String,
}

impl Worst {
    /// Keeps `ratio` if it is the largest so far.
    pub fn record(&mut self, ratio: f64, what: &str) {
        if ratio > self.ratio {
            self.ratio = ratio;
            self.what = what.to_string();
        }
    }

    /// Prints the largest ratio.
    pub fn report(&self, test: &str) {
        eprintln!(
            "{test}: largest error/bound ratio {:.3} ({})",
            self.ratio, self.what
        );
    }
}
