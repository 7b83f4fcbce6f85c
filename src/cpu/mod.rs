//! The fast CPU backend: fused, tiled, symmetric, multithreaded and deterministic.
//!
//! The algorithm is the GPU kernels' (docs/math.md), on tiles sized for a CPU cache:
//!
//! 1. The features become one contiguous f32 `[N, D]` buffer in view-major row order
//!    (r = v·B + b), whatever their element type and strides, plus Zᵀ packed once into column
//!    panels for the logits product. f64 features are rounded to f32 too: this backend computes
//!    in f32 (exponentials included) and combines per-anchor statistics in f64; the gradient
//!    comes back in the features' gradient type.
//! 2. Rows are cut into blocks of 256; a tile is a pair of blocks (I ≤ J) and its logits
//!    `S_IJ = Z_I Z_Jᵀ / τ` come from one register-blocked product (`gemm`; a 256×256 f32 tile,
//!    256 KiB, stays in L2). S is symmetric, so a tile serves the anchors of I against J *and*
//!    the anchors of J against I: half of S is ever computed.
//! 3. Forward (`forward`): per anchor, an online masked log-sum-exp over the denominator set,
//!    the weighted log-sum-exp over the positives, P and Σ w·s, with exponentials taken only
//!    relative to maxima of non-excluded entries. `one_positive` sweeps the tiles a second time
//!    for its positive terms, which need LSE^N first.
//! 4. Backward (`backward`): each tile recomputes S, turns it in place into the symmetric
//!    H_ij = G_ij + G_ji from the saved per-anchor LSEs and P, and adds H Z_J to dZ_I and
//!    Hᵀ Z_I to dZ_J with two more products.
//! 5. The paper's default loss — positives from labels or SimCLR without a cap, denominator
//!    all, L_out — takes a fast path (`dense`) in both passes: its positive terms reduce to
//!    class sums of the rows (O(N·D)), so the tiles carry only the dense softmax terms, with one
//!    exponential per logit under a shift shared by all rows and columns and no pair weights.
//!    `CpuBackend::forward_backward` converts the batch once for both passes.
//!
//! Work: forward N²·D flops (half of S), backward 3·N²·D (half of S again, then H Z in full),
//! plus N² exponentials each (on the fast path about N²/2 in each pass). Memory beyond the
//! inputs and the result: the f32 rows and their panels (~8·N·D bytes), the f64 gradient
//! accumulators (8·N·D), O(N) per-anchor values (and, on the fast path, per-class sums: at
//! most 16·N·D/V bytes for SimCLR) and, per thread, one tile with its buffers (~0.5 MiB at
//! D = 128). Nothing N×N.
//!
//! Threads: `tiles::Schedule` runs tiles in rounds of block-disjoint pairs on the ambient rayon
//! pool; every accumulator receives its tiles in an order fixed by N alone, and the elementwise
//! loops fold their lanes in a fixed order, so results are bitwise identical for any number of
//! threads (and the same on the AVX2 and AVX-512 paths `simd::Isa` picks).

mod backward;
mod dense;
mod forward;
mod gemm;
mod math;
pub(crate) mod relation;
mod simd;
mod tiles;

use std::ops::Range;

use ndarray::{s, Array1, Array3, ArrayView3};
use rayon::prelude::*;

use crate::backend::{
    check_finite_gradient, check_finite_loss, reduce, Backend, ForwardOutput, SavedState, Upstream,
};
use crate::config::{Denominator, Summation, SupConLoss};
use crate::element::{Element, GradElement};
use crate::error::Result;
use crate::inputs::{
    check_logit_range, largest_logit_of, validate_inputs, BatchShape, Positives, Validated,
    F32_LOGIT_LIMIT,
};
use crate::normalize;
use crate::shard::{self, ShardStatistics};
use forward::{AnchorStats, PositiveSums};
use math::Aligned;
use relation::{PairWeights, Pairs};
use simd::Isa;
use tiles::{Rows, Schedule};

/// The fast fused CPU backend (see the module docs). Uses the ambient rayon thread pool;
/// results do not depend on its size.
///
/// Every option of [`SupConLoss`] and every kind of [`Positives`] is supported. Features are
/// computed in f32 whatever their type (f64 features are rounded to f32); dot products or
/// logits beyond 1e36 (features of enormous norm) are refused with
/// [`crate::Error::Unsupported`] instead of overflowing f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// A validated batch as the tile loops see it.
struct Batch {
    loss: SupConLoss,
    shape: BatchShape,
    /// R: rows `0..anchors` are the anchors.
    anchors: usize,
    /// 1/τ in f32, the GEMM's scale.
    inverse_temperature: f32,
    /// max_r ‖z_r‖²/τ, the largest logit any pair can have.
    largest_logit: f32,
    /// The rows z_r: the features, or under `normalize` u_r = x_r / max(‖x_r‖, ε).
    rows: Rows,
    /// ‖x_r‖ per row under `normalize`.
    norms: Option<Vec<f64>>,
    pairs: Pairs,
    schedule: Schedule,
    isa: Isa,
    /// The batch's fingerprint, for the state of its forward pass.
    fingerprint: u64,
}

impl Batch {
    /// Lays out the relation and converts the features. `features` must have passed
    /// `validate_inputs`, which returned `validated`.
    ///
    /// # Errors
    /// [`crate::Error::TooLarge`] (N beyond u32, checked before anything of size N·D is allocated),
    /// [`crate::Error::OutOfMemory`], [`crate::Error::Unsupported`] (logits beyond `F32_LOGIT_LIMIT`).
    fn new<T: Element>(
        loss: &SupConLoss,
        features: &ArrayView3<'_, T>,
        validated: Validated,
        positives: Positives<'_>,
        isa: Isa,
    ) -> Result<Self> {
        let shape = validated.shape;
        let pairs = Pairs::new(loss, shape, positives)?;
        let (n, dim) = (shape.rows(), shape.dim());
        let mut data = Aligned::try_zeros(n * dim)?;
        let row_of = |r: usize| features.slice(s![shape.sample_of(r), shape.view_of(r), ..]);
        let norms: Option<Vec<f64>> = loss.normalize().then(|| {
            (0..n)
                .into_par_iter()
                .map(|r| normalize::norm(row_of(r).iter().map(|x| x.to_f64())))
                .collect()
        });
        let largest_square_norm = data
            .par_chunks_mut(dim)
            .enumerate()
            .map(|(r, row)| {
                let source = row_of(r);
                match &norms {
                    // u = x / max(‖x‖, ε), the norm in f64 and the quotient rounded once.
                    Some(norms) => {
                        let divisor = normalize::divisor(norms[r]);
                        for (z, x) in row.iter_mut().zip(source) {
                            *z = (x.to_f64() / divisor) as f32;
                        }
                    }
                    None => {
                        for (z, x) in row.iter_mut().zip(source) {
                            *z = x.to_f32();
                        }
                    }
                }
                row.iter()
                    .map(|&z| f64::from(z) * f64::from(z))
                    .sum::<f64>()
            })
            .reduce(|| 0.0, f64::max);
        let largest_logit = largest_square_norm / loss.temperature();
        check_logit_range(
            "cpu",
            largest_logit_of(largest_square_norm, loss.temperature()),
            F32_LOGIT_LIMIT,
        )?;
        let anchors = shape.anchors(loss.contrast_mode());
        Ok(Batch {
            loss: *loss,
            shape,
            anchors,
            inverse_temperature: (1.0 / loss.temperature()) as f32,
            largest_logit: largest_logit as f32,
            rows: Rows::new(data, dim, isa)?,
            norms,
            pairs,
            schedule: Schedule::new(n, anchors),
            isa,
            fingerprint: validated.fingerprint,
        })
    }

    /// Whether the denominator holds the negatives only (only-negatives and one-positive).
    fn only_negatives_in_denominator(&self) -> bool {
        self.loss.denominator() != Denominator::All
    }
}

/// Runs `$body` with `$pairs` bound to the batch's concrete relation layout.
macro_rules! with_pairs {
    ($batch:expr, $pairs:ident => $body:expr) => {
        match &$batch.pairs {
            Pairs::Class($pairs) => $body,
            Pairs::Mask($pairs) => $body,
            Pairs::Sets($pairs) => $body,
        }
    };
}

/// ℓ_i from the anchor's statistics (and its positive sums for one-positive), like the
/// reference: 0 without positives, 0 for an empty denominator under all / only-negatives.
fn anchor_loss(loss: &SupConLoss, stats: &AnchorStats, sums: Option<&PositiveSums>) -> f64 {
    let (lse, p) = (stats.denominator.value(), stats.positive_weight);
    if p <= 0.0 {
        return 0.0;
    }
    let unscaled = match (loss.denominator(), loss.summation(), sums) {
        (Denominator::OnePositive, Summation::Outside, Some(sums)) => sums.softplus / p,
        (Denominator::OnePositive, Summation::Inside, Some(sums)) => {
            p.ln() - sums.log_share.value()
        }
        (Denominator::OnePositive, _, None) => unreachable!("one-positive sums are computed"),
        _ if lse == f64::NEG_INFINITY => 0.0,
        (_, Summation::Outside, _) => lse - stats.weighted_logits / p,
        (_, Summation::Inside, _) => lse - stats.positive.value() + p.ln(),
    };
    loss.loss_scale() * unscaled
}

impl Batch {
    /// The class layout of [`dense`]'s fast path, if this batch takes it.
    fn dense_classes(&self) -> Option<dense::Classes> {
        match &self.pairs {
            Pairs::Class(pairs) if pairs.is_symmetric() && dense::applies(self) => {
                Some(dense::Classes::new(self, pairs.classes()))
            }
            _ => None,
        }
    }

    /// The forward pass on this batch.
    fn forward(&self, classes: Option<&dense::Classes>) -> Result<ForwardOutput> {
        let [per_anchor, lse, lse_positive, positive_weight] = self.anchor_statistics(classes);
        let (reduced, mean_denominator) = reduce(&self.loss, &per_anchor, &positive_weight)?;
        let output = ForwardOutput {
            loss: reduced,
            per_anchor: Array1::from(per_anchor),
            state: SavedState {
                loss: self.loss,
                shape: self.shape,
                lse,
                lse_positive,
                positive_weight,
                mean_denominator,
                fingerprint: Some(self.fingerprint),
            },
        };
        check_finite_loss(&output)?;
        Ok(output)
    }

    /// Per anchor ℓ_i, LSE_i, LSE^P_i and P_i (exact for the anchors of blocks the schedule
    /// keeps whole: all of them, or a shard's).
    fn anchor_statistics(&self, classes: Option<&dense::Classes>) -> [Vec<f64>; 4] {
        let loss = &self.loss;
        let stats = match classes {
            Some(classes) => dense::statistics(self, classes),
            None => with_pairs!(self, pairs => forward::statistics(self, pairs)),
        };
        let lse: Vec<f64> = stats.iter().map(|s| s.denominator.value()).collect();
        let sums = (loss.denominator() == Denominator::OnePositive)
            .then(|| with_pairs!(self, pairs => forward::positive_sums(self, pairs, &lse)));
        let per_anchor: Vec<f64> = stats
            .iter()
            .enumerate()
            .map(|(i, stats)| anchor_loss(loss, stats, sums.as_ref().map(|sums| &sums[i])))
            .collect();
        // The tiles saw each anchor's mask weights divided by W_i: P_i and LSE^P_i scale back.
        let scale = |i: usize| self.pairs.anchor_scale(i);
        let positive_weight: Vec<f64> = (stats.iter().enumerate())
            .map(|(i, s)| s.positive_weight * scale(i))
            .collect();
        let lse_positive = (stats.iter().enumerate())
            .map(|(i, s)| s.positive.value() + scale(i).ln())
            .collect();
        [per_anchor, lse, lse_positive, positive_weight]
    }

    /// One-positive's per-anchor sums (its pulls Ψ_i and shares), from the saved LSE^N_i, under
    /// this batch's schedule; `None` for the other denominators.
    fn positive_sums(&self, lse: &[f64]) -> Option<Vec<PositiveSums>> {
        (self.loss.denominator() == Denominator::OnePositive)
            .then(|| with_pairs!(self, pairs => forward::positive_sums(self, pairs, lse)))
    }

    /// Keeps only the tiles a shard of `samples` needs: those touching its rows.
    fn restrict_to(&mut self, samples: &Range<usize>) {
        let runs: Vec<Range<usize>> = shard::row_runs(self.shape, samples).collect();
        self.schedule = Schedule::touching(self.shape.rows(), self.anchors, &runs);
    }

    /// The backward pass on this batch, from a state that `check`ed against it.
    fn backward<G: GradElement>(
        &self,
        classes: Option<&dense::Classes>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<G>> {
        let sums = self.positive_sums(&state.lse);
        let grad = self.backward_unchecked(classes, state, upstream, sums.as_deref())?;
        check_finite_gradient(grad.as_slice().expect("a fresh array"))?;
        Ok(grad)
    }

    /// [`backward`](Self::backward) without the finiteness check: under a shard's schedule only
    /// the shard's rows are the gradient.
    fn backward_unchecked<G: GradElement>(
        &self,
        classes: Option<&dense::Classes>,
        state: &SavedState,
        upstream: Upstream<'_>,
        sums: Option<&[PositiveSums]>,
    ) -> Result<Array3<G>> {
        let coefficients = state.anchor_coefficients(upstream)?;
        // The tiles see each anchor's mask weights divided by W_i: so do P_i and LSE^P_i.
        let scaled = |values: &[f64], unscale: fn(f64, f64) -> f64| -> Vec<f64> {
            (values.iter().enumerate())
                .map(|(i, &x)| unscale(x, self.pairs.anchor_scale(i)))
                .collect()
        };
        let lse_positive = scaled(&state.lse_positive, |lse, w| lse - w.ln());
        let positive_weight = scaled(&state.positive_weight, |p, w| p / w);
        let saved = backward::Saved {
            lse: &state.lse,
            lse_positive: &lse_positive,
            positive_weight: &positive_weight,
            coefficients: &coefficients,
        };
        let (terms, pulls) = backward::anchor_terms(self, &saved, sums);
        let mut dz = match classes {
            Some(classes) => dense::gradient(
                self,
                classes,
                (&terms.lse, &terms.lse_lo),
                &terms.den_scale,
                &terms.positive_scale,
            )?,
            None => {
                with_pairs!(self, pairs => backward::gradient(self, pairs, &terms, pulls.as_ref()))?
            }
        };
        let (b, dim) = (self.shape.batch(), self.shape.dim());
        // Back from u to x, row by row.
        if let Some(norms) = &self.norms {
            (dz.par_chunks_mut(dim).zip(norms).enumerate()).for_each(|(r, (g, &norm))| {
                normalize::chain_rule(g, self.rows.block(r..r + 1), norm)
            });
        }
        // Output row (sample s, view v) is feature row v·B + s.
        let views = self.shape.views();
        let mut grad = crate::alloc::filled("cpu", dz.len(), G::from_f64(0.0))?;
        grad.par_chunks_mut(dim).enumerate().for_each(|(out, row)| {
            let source = &dz[((out % views) * b + out / views) * dim..][..dim];
            for (g, &x) in row.iter_mut().zip(source) {
                *g = G::from_f64(x);
            }
        });
        let grad = Array3::from_shape_vec((b, views, dim), grad)
            .expect("the gradient has the features' shape");
        Ok(grad)
    }
}

/// The batch validated, after the backend's own size limit: a batch with too many rows fails
/// before any pass over its values.
fn validated<T: Element>(
    features: &ArrayView3<'_, T>,
    positives: &Positives<'_>,
) -> Result<Validated> {
    let (batch, views, dim) = features.dim();
    relation::check_rows(BatchShape::new(batch, views, dim)?)?;
    validate_inputs(features, positives)
}

impl CpuBackend {
    fn forward_on<T: Element>(
        isa: Isa,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        let validated = validated(&features, &positives)?;
        let batch = Batch::new(loss, &features, validated, positives, isa)?;
        batch.forward(batch.dense_classes().as_ref())
    }

    fn backward_on<T: Element>(
        isa: Isa,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        let validated = validated(&features, &positives)?;
        state.check(loss, &validated)?;
        let batch = Batch::new(loss, &features, validated, positives, isa)?;
        batch.backward(batch.dense_classes().as_ref(), state, upstream)
    }

    fn forward_shard_on<T: Element>(
        isa: Isa,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        let validated = validated(&features, &positives)?;
        shard::check_samples(validated.shape, &samples)?;
        let mut batch = Batch::new(loss, &features, validated, positives, isa)?;
        batch.restrict_to(&samples);
        let all = batch.anchor_statistics(batch.dense_classes().as_ref());
        ShardStatistics::pick(
            loss,
            batch.shape,
            samples,
            all.each_ref().map(Vec::as_slice),
        )
    }

    #[allow(clippy::too_many_arguments)] // the trait method's, plus the instruction set
    fn backward_shard_on<T: Element>(
        isa: Isa,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
        samples: Range<usize>,
    ) -> Result<Array3<T::Grad>> {
        let validated = validated(&features, &positives)?;
        shard::check_samples(validated.shape, &samples)?;
        state.check(loss, &validated)?;
        let mut batch = Batch::new(loss, &features, validated, positives, isa)?;
        // Every anchor's one-positive sums enter the shard's H rows, so they take the whole
        // sweep (one more pass over all tiles, on this denominator only).
        let sums = batch.positive_sums(&state.lse);
        batch.restrict_to(&samples);
        let classes = batch.dense_classes();
        let grad: Array3<T::Grad> =
            batch.backward_unchecked(classes.as_ref(), state, upstream, sums.as_deref())?;
        let grad = shard::gradient_rows(&grad, &samples);
        check_finite_gradient(grad.as_slice().expect("a fresh array"))?;
        Ok(grad)
    }

    /// Forward and backward on one converted batch.
    fn forward_backward_on<T: Element>(
        isa: Isa,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(ForwardOutput, Array3<T::Grad>)> {
        let validated = validated(&features, &positives)?;
        let batch = Batch::new(loss, &features, validated, positives, isa)?;
        let classes = batch.dense_classes();
        let output = batch.forward(classes.as_ref())?;
        let grad = batch.backward(classes.as_ref(), &output.state, upstream)?;
        Ok((output, grad))
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        on_pool(|| Self::forward_on(Isa::detect(), loss, features, positives))
    }

    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        on_pool(|| Self::backward_on(Isa::detect(), loss, features, positives, state, upstream))
    }

    fn forward_backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(ForwardOutput, Array3<T::Grad>)> {
        on_pool(|| Self::forward_backward_on(Isa::detect(), loss, features, positives, upstream))
    }

    fn forward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        on_pool(|| Self::forward_shard_on(Isa::detect(), loss, features, positives, samples))
    }

    fn backward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
        samples: Range<usize>,
    ) -> Result<Array3<T::Grad>> {
        on_pool(|| {
            let isa = Isa::detect();
            Self::backward_shard_on(isa, loss, features, positives, state, upstream, samples)
        })
    }
}

/// Runs one call on a worker of the ambient rayon pool. Called from outside the pool, every
/// parallel loop of the call would be handed to the pool separately while the caller sleeps
/// (a wake-up and a sleep each, 20–50 µs, most of a call's time on a small batch); on a
/// worker, the loops fork and join in place.
fn on_pool<R: Send>(call: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| call())
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;
    use crate::config::ContrastMode;
    use crate::reference::ReferenceBackend;
    use math::SHARED_SHIFT_RANGE;

    /// Every instruction-set path agrees with the reference, and the FMA paths (AVX2, AVX-512)
    /// agree with each other bitwise; the baseline has no FMA, so its products round
    /// differently. The data is structured (sines, 7 classes) and L_in's gradient, a difference
    /// of two softmax-weighted means, loses ~1.5e-5 (norm-wise) to cancellation on every path:
    /// hence 5e-5 here; `tests/cpu_backend.rs` holds random batches to 1e-5.
    #[test]
    fn instruction_sets_agree() {
        let (batch, views, dim) = (301, 2, 37);
        let features = Array3::from_shape_fn((batch, views, dim), |(b, v, k)| {
            ((b * 131 + v * 71 + k * 29) as f32 * 0.37).sin() * 0.2
        });
        let labels: Vec<i64> = (0..batch as i64).map(|b| b % 7).collect();
        let positives = Positives::labels(&labels);
        let norm_error = |a: &[f64], b: &[f64]| {
            let scale = b.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
                / scale
        };
        for denominator in [
            Denominator::All,
            Denominator::OnlyNegatives,
            Denominator::OnePositive,
        ] {
            for summation in [Summation::Outside, Summation::Inside] {
                let loss = SupConLoss::builder()
                    .denominator(denominator)
                    .summation(summation)
                    .temperature(0.1)
                    .build()
                    .unwrap();
                let (reference, reference_grad) = ReferenceBackend
                    .forward_backward(
                        &loss,
                        features.mapv(f64::from).view(),
                        positives,
                        Upstream::Scalar(1.0),
                    )
                    .unwrap();
                let run = |isa| {
                    let out =
                        CpuBackend::forward_on(isa, &loss, features.view(), positives).unwrap();
                    let grad = CpuBackend::backward_on(
                        isa,
                        &loss,
                        features.view(),
                        positives,
                        &out.state,
                        Upstream::Scalar(1.0),
                    )
                    .unwrap();
                    (out.per_anchor, out.state, grad)
                };
                let what = format!("{denominator:?}, {summation:?}");
                let mut fused = Vec::new();
                for isa in Isa::supported() {
                    let result = run(isa);
                    let losses = norm_error(
                        result.0.as_slice().unwrap(),
                        reference.per_anchor.as_slice().unwrap(),
                    );
                    let grad: Vec<f64> = result.2.iter().map(|&g| f64::from(g)).collect();
                    let grads = norm_error(&grad, reference_grad.as_slice().unwrap());
                    assert!(
                        losses < 1e-6 && grads < 5e-5,
                        "{isa:?} {what}: {losses:e} {grads:e}"
                    );
                    if isa != Isa::Baseline {
                        fused.push(result);
                    }
                }
                for other in fused.iter().skip(1) {
                    assert!(*other == fused[0], "FMA paths differ: {what}");
                }
            }
        }
    }

    /// The dense fast path against the general tile loops on the same converted batches
    /// (ragged sizes, labels and SimCLR, both contrast modes, anchors without positives). The
    /// last shape mixes norms 1 and 40 at τ = 0.1: the shared shift 40²/τ lies far above most
    /// rows' maxima, so the forward sums those sets again with their own maxima, and the LSEs
    /// of a tile spread beyond `LSE_SPREAD`, so the backward takes its two-exponential form
    /// (both asserted, so the test cannot pass without running those branches).
    #[test]
    fn dense_path_matches_the_general_loops() {
        use rand::rngs::StdRng;
        use rand::{RngExt, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        let norm_error = |a: &[f64], b: &[f64]| {
            let scale = b.iter().fold(f64::MIN_POSITIVE, |m: f64, x| m.max(x.abs()));
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
                / scale
        };
        for (batch_size, views, dim, large_norm) in
            [(301, 2, 37, 1.0), (700, 1, 20, 3.0), (211, 3, 5, 40.0)]
        {
            let mut features =
                Array3::from_shape_fn((batch_size, views, dim), |_| rng.random_range(-1.0..1.0));
            for (r, mut row) in features.lanes_mut(ndarray::Axis(2)).into_iter().enumerate() {
                let norm = row.iter().map(|x: &f32| x * x).sum::<f32>().sqrt();
                let target = if r % 37 == 5 { large_norm } else { 1.0 };
                row.mapv_inplace(|x| x * target / norm);
            }
            // Classes of ~3 samples, with singletons (no positive when V = 1).
            let labels: Vec<i64> = (0..batch_size)
                .map(|b| {
                    if b % 11 == 0 {
                        1000 + b as i64
                    } else {
                        rng.random_range(0..batch_size as i64 / 3)
                    }
                })
                .collect();
            for (source, positives) in [
                ("labels", Positives::labels(&labels)),
                ("SimCLR", Positives::SimClr),
            ] {
                for mode in [ContrastMode::All, ContrastMode::One] {
                    let loss = SupConLoss::builder()
                        .temperature(0.1)
                        .contrast_mode(mode)
                        .build()
                        .unwrap();
                    let what = format!("{batch_size}x{views}x{dim} {source} {mode:?}");
                    let validated = validate_inputs(&features.view(), &positives).unwrap();
                    let batch =
                        Batch::new(&loss, &features.view(), validated, positives, Isa::detect())
                            .unwrap();
                    let classes = batch.dense_classes().expect("takes the dense path");
                    let general = batch.forward(None).unwrap();
                    let dense = batch.forward(Some(&classes)).unwrap();
                    let (g, d) = (&general.state, &dense.state);
                    assert_eq!(g.positive_weight, d.positive_weight, "{what}");
                    for (name, want, got) in [
                        ("ℓ", general.per_anchor.to_vec(), dense.per_anchor.to_vec()),
                        ("LSE", g.lse.clone(), d.lse.clone()),
                        ("LSE^P", g.lse_positive.clone(), d.lse_positive.clone()),
                    ] {
                        let (finite_want, finite_got): (Vec<f64>, Vec<f64>) = want
                            .iter()
                            .zip(&got)
                            .filter(|(w, _)| w.is_finite())
                            .map(|(w, g)| (*w, *g))
                            .unzip();
                        let infinite_match =
                            want.iter().zip(&got).all(|(w, g)| w.is_finite() || w == g);
                        let error = norm_error(&finite_got, &finite_want);
                        assert!(infinite_match && error < 1e-6, "{what}: {name} {error:e}");
                    }
                    let upstream = Upstream::Scalar(1.0);
                    let general_grad: Array3<f32> =
                        batch.backward(None, &general.state, upstream).unwrap();
                    let dense_grad: Array3<f32> = batch
                        .backward(Some(&classes), &general.state, upstream)
                        .unwrap();
                    let (want, got): (Vec<f64>, Vec<f64>) = general_grad
                        .iter()
                        .zip(&dense_grad)
                        .map(|(&w, &g)| (f64::from(w), f64::from(g)))
                        .unzip();
                    let error = norm_error(&got, &want);
                    assert!(error < 1e-5, "{what}: gradient {error:e}");
                    if large_norm > 10.0 {
                        let shift = f64::from(batch.largest_logit);
                        let lse = g.lse.iter().filter(|l| l.is_finite());
                        let (low, high) = lse
                            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                                (l.min(x), h.max(x))
                            });
                        assert!(shift - low > 2.0 * f64::from(SHARED_SHIFT_RANGE), "{what}");
                        assert!(high - low > 2.0 * f64::from(dense::LSE_SPREAD), "{what}");
                    }
                }
            }
        }
    }
}
