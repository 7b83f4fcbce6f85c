//! What only the CPU backend has: results bitwise independent of the thread count, strided
//! views, and its refusal of logits beyond the f32 range it computes in. Its agreement with the
//! reference on every option, shape and element type is `tests/backends.rs`.

mod common;

use ndarray::Array3;
use supcon::{
    Backend, Capability, ContrastMode, CpuBackend, Denominator, Error, Positives, ReferenceBackend,
    Summation, SupConLoss, Upstream,
};

fn run<T: supcon::Element>(
    loss: &SupConLoss,
    features: ndarray::ArrayView3<'_, T>,
    positives: Positives<'_>,
) -> (supcon::ForwardOutput, Array3<T::Grad>) {
    CpuBackend
        .forward_backward(loss, features, positives, Upstream::Scalar(1.0))
        .unwrap()
}

#[test]
fn results_are_bitwise_independent_of_thread_count() {
    let mut rng = common::rng("results_are_bitwise_independent_of_thread_count");
    let (batch, views, dim) = (700, 2, 33); // 1400 rows: 6 blocks, 6 rounds of tiles.
    let features = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
    let y = common::labels(&mut rng, batch, 30).to_vec();
    let mask = common::soft_mask(&mut rng, batch);
    let cases = [
        (SupConLoss::default(), Positives::labels(&y)),
        (
            SupConLoss::builder()
                .contrast_mode(ContrastMode::One)
                .summation(Summation::Inside)
                .denominator(Denominator::OnlyNegatives)
                .positives_cap(3)
                .build()
                .unwrap(),
            Positives::Mask(mask.view()),
        ),
        (
            SupConLoss::builder()
                .denominator(Denominator::OnePositive)
                .build()
                .unwrap(),
            Positives::SimClr,
        ),
    ];
    for (loss, positives) in cases {
        let on = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run(&loss, features.view(), positives))
        };
        let (one, two) = (on(1), on(2));
        assert_eq!(one.0.loss.map(f64::to_bits), two.0.loss.map(f64::to_bits));
        assert_eq!(one.0.per_anchor, two.0.per_anchor);
        assert_eq!(one.0.state, two.0.state);
        assert!(one
            .1
            .iter()
            .zip(&two.1)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn strided_views_give_the_same_result_as_contiguous_ones() {
    let mut rng = common::rng("strided_views_give_the_same_result_as_contiguous_ones");
    let features = common::unit_features(&mut rng, (60, 3, 20)).mapv(|x| x as f32);
    // The same values behind a permuted, non-contiguous layout: [D, V, B] reversed to [B, V, D].
    let permuted = features
        .clone()
        .permuted_axes([2, 1, 0])
        .as_standard_layout()
        .into_owned();
    let strided = permuted.view().permuted_axes([2, 1, 0]);
    assert!(!strided.is_standard_layout());
    let y = common::labels(&mut rng, 60, 7).to_vec();
    let loss = SupConLoss::default();
    let a = run(&loss, features.view(), Positives::labels(&y));
    let b = run(&loss, strided, Positives::labels(&y));
    assert_eq!(a.0.state, b.0.state);
    assert_eq!(a.1, b.1);
}

/// Finite features whose z·z/τ would overflow f32 are refused, not computed into ∞ or NaN.
#[test]
fn logits_beyond_the_f32_range_are_refused() {
    let enormous = Array3::<f32>::from_elem((3, 2, 4), 1e19);
    let loss = SupConLoss::default();
    let error = CpuBackend
        .forward(&loss, enormous.view(), Positives::SimClr)
        .unwrap_err();
    let Error::Unsupported {
        backend: "cpu",
        capability: Capability::LogitRange { largest, limit },
    } = error
    else {
        panic!("{error:?}");
    };
    assert!(largest > limit && limit >= 1e36, "{largest:e} {limit:e}");
}

/// Logits of up to 2·10⁶ (norm 100, τ = 0.005) with a soft mask under L_in: the gradient stays
/// within 1e-5 of the reference (relative to its largest entry), as at norm 1. The backward
/// pass used to subtract the saved LSE^P rounded to f32 (an ulp of 0.125 at 2·10⁶) from the
/// logits: 2–4 % off at norm 100, in every batch.
///
/// What f32 logits cannot avoid is allowed on top: a logit carries a rounding error of up to
/// δs = ε·((√D + 4)·s_max + √N), and where two terms of a softmax nearly tie, the gradient
/// moves by about e^(−gap)·δs relative to its largest entry ([`tie_sensitivity`]). Random
/// batches hold such a tie now and then (a gap of 0.8 among logits of 2·10⁴ gave 5e-5).
#[test]
fn the_gradient_keeps_its_precision_at_huge_logits() {
    let mut rng = common::rng("the_gradient_keeps_its_precision_at_huge_logits");
    let (batch, views, dim) = (24, 2, 16);
    let temperature = 0.005;
    let mask = common::soft_mask(&mut rng, batch);
    let labels = common::labels(&mut rng, batch, 5);
    for norm in [1.0, 10.0, 30.0, 100.0] {
        let z = common::features(&mut rng, (batch, views, dim), norm..norm * (1.0 + 1e-9))
            .mapv(|x| x as f32);
        let s_max = norm * norm * (1.0 + 1e-9) / temperature;
        let delta_s = f64::from(f32::EPSILON)
            * (((dim as f64).sqrt() + 4.0) * s_max + ((batch * views) as f64).sqrt());
        for summation in [Summation::Outside, Summation::Inside] {
            let loss = SupConLoss::builder()
                .temperature(temperature)
                .summation(summation)
                .build()
                .unwrap();
            let mask_weight = |i: usize, j: usize| f64::from(mask[[i, j]]);
            let label_weight = |i: usize, j: usize| f64::from(u8::from(labels[i] == labels[j]));
            let cases: [(Positives<'_>, &PairWeight<'_>); 2] = [
                (Positives::Mask(mask.view()), &mask_weight),
                (Positives::Labels(labels.view()), &label_weight),
            ];
            for (positives, weight) in cases {
                let (_, grad) = run(&loss, z.view(), positives);
                let (_, want) = ReferenceBackend
                    .forward_backward(
                        &loss,
                        z.mapv(f64::from).view(),
                        positives,
                        Upstream::Scalar(1.0),
                    )
                    .unwrap();
                let grad: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
                let error = common::relative_error(&grad, want.iter(), 0.0);
                let bound = 1e-5 + 4.0 * tie_sensitivity(&z, temperature, weight) * delta_s;
                assert!(
                    error <= bound,
                    "norm {norm} {summation:?} {positives:?}: {error:e} > {bound:e}"
                );
            }
        }
    }
}

/// The positive weight of two samples.
type PairWeight<'a> = dyn Fn(usize, usize) -> f64 + 'a;

/// e^(−gap), largest over the anchors' softmaxes (over every row j ≠ i, and over the positives
/// with their weights, log w_ij added), where gap is the distance between a softmax's two
/// largest terms: 0 where every softmax is one-hot, 1 at a tie. `weight(b_i, b_j)` is the
/// positive weight of two samples.
fn tie_sensitivity(z: &Array3<f32>, temperature: f64, weight: &PairWeight<'_>) -> f64 {
    let (batch, views, _) = z.dim();
    let rows = batch * views;
    let row = |r: usize| z.slice(ndarray::s![r % batch, r / batch, ..]);
    let gap_term = |mut terms: Vec<f64>| {
        terms.sort_by(|a, b| b.total_cmp(a));
        match terms.as_slice() {
            [first, second, ..] => (second - first).exp(),
            _ => 0.0,
        }
    };
    (0..rows)
        .map(|i| {
            let logit = |j: usize| {
                row(i)
                    .iter()
                    .zip(row(j).iter())
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
                    / temperature
            };
            let all = (0..rows).filter(|&j| j != i).map(logit).collect();
            let positives = (0..rows)
                .filter(|&j| j != i && weight(i % batch, j % batch) > 0.0)
                .map(|j| logit(j) + weight(i % batch, j % batch).ln())
                .collect();
            gap_term(all).max(gap_term(positives))
        })
        .fold(0.0, f64::max)
}

/// A batch with more rows than the tile loops index (u32) is refused before anything of its
/// size is allocated: here a broadcast view of a few bytes that would need 34 GB.
#[test]
fn too_many_rows_are_refused_before_any_allocation() {
    let rows = (u32::MAX as usize) + 2;
    let one = ndarray::Array3::<f32>::from_elem((1, 1, 2), 0.5);
    let broadcast = one.broadcast((rows, 1, 2)).unwrap();
    let error = CpuBackend
        .forward(&SupConLoss::default(), broadcast, Positives::SimClr)
        .unwrap_err();
    assert_eq!(
        error,
        Error::TooLarge {
            extent: supcon::Extent::Rows,
            requested: rows as u128,
            limit: u32::MAX as u128
        }
    );
}
