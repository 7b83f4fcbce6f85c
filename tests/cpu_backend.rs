//! The fast CPU backend against the f64 reference: ragged sizes, every option, every element
//! type, determinism across thread counts, and the numerical edge cases of SPEC.md.
//!
//! Inputs are fresh random data on every run; each test prints its seed (shown on failure) and
//! takes `SUPCON_TEST_SEED` to replay one.
//!
//! Tolerance: 1e-5, norm-wise: ‖x − x_ref‖∞ / max(‖x_ref‖∞, natural scale of x). The floor is
//! the size a quantity has without cancellation: c = τ/τ_b for losses, max‖z‖²/τ for
//! log-sum-exps, c·|u|/R'·max‖z‖/τ for the gradient. For generic data ‖x_ref‖∞ is at least that
//! large and the floor changes nothing; it matters for degenerate tiny batches (D = 1, all
//! logits ±1/τ) where an anchor's positive wins by a margin of ~28, its true loss and gradient
//! are ~e^-28 and f32 (q ≈ 1 rounds to 1) cannot resolve them in any implementation.

mod common;

use half::{bf16, f16};
use ndarray::{Array1, Array3, ArrayView3, Axis};
use rand::rngs::StdRng;
use rand::RngExt;
use supcon::{
    Backend, ContrastMode, CpuBackend, Denominator, Element, Error, ForwardOutput, GradElement,
    NoPositivePolicy, Positives, Reduction, ReferenceBackend, Summation, SupConLoss, Upstream,
};

const TOLERANCE: f64 = 1e-5;

/// ‖a − b‖∞ / max(‖b‖∞, floor); equal entries (equal infinities included) count as exact.
fn relative_error(
    a: impl IntoIterator<Item = f64>,
    b: impl IntoIterator<Item = f64>,
    floor: f64,
) -> f64 {
    let (mut diff, mut scale) = (0.0_f64, floor);
    for (x, y) in a.into_iter().zip(b) {
        if y.is_finite() {
            scale = scale.max(y.abs());
        }
        if x != y {
            diff = diff.max((x - y).abs());
        }
    }
    if diff == 0.0 {
        0.0
    } else {
        diff / scale
    }
}

/// The natural scales of a problem's outputs (see the module docs).
struct Scales {
    /// Of one ℓ_i: c.
    loss: f64,
    /// Of the reduced loss: c for mean, c·R for sum.
    reduced: f64,
    /// Of a logit: max‖z‖²/τ.
    logit: f64,
    /// Of a gradient row: c·|u|/R'·max‖z‖/τ.
    gradient: f64,
}

impl Scales {
    fn new<T: Element>(
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        reference: &ForwardOutput,
        upstream: &Option<Array1<f64>>,
    ) -> Self {
        let largest_square_norm = features
            .lanes(Axis(2))
            .into_iter()
            .map(|z| z.iter().map(|x| x.to_f64().powi(2)).sum::<f64>())
            .fold(0.0, f64::max);
        let c = loss.loss_scale();
        let anchors = reference.per_anchor.len() as f64;
        let u = upstream
            .as_ref()
            .map_or(0.75, |u| u.iter().fold(0.0, |m: f64, x| m.max(x.abs())));
        Scales {
            loss: c,
            reduced: if loss.reduction() == Reduction::Sum {
                c * anchors
            } else {
                c
            },
            logit: largest_square_norm / loss.temperature(),
            gradient: c * u / reference.state.mean_denominator() * largest_square_norm.sqrt()
                / loss.temperature(),
        }
    }
}

/// Asserts that the cpu output and gradient match the reference's within `tolerance`.
fn assert_close<G: GradElement, H: GradElement>(
    what: &str,
    (out, grad): &(ForwardOutput, Array3<G>),
    (want, want_grad): &(ForwardOutput, Array3<H>),
    scales: &Scales,
    tolerance: f64,
) {
    assert_eq!(out.loss.is_some(), want.loss.is_some(), "{what}");
    if let (Some(a), Some(b)) = (out.loss, want.loss) {
        let error = relative_error([a], [b], scales.reduced);
        assert!(error <= tolerance, "{what}: loss {a} vs {b} ({error:e})");
    }
    let checks = [
        (
            "per-anchor",
            out.per_anchor.to_vec(),
            want.per_anchor.to_vec(),
            scales.loss,
        ),
        (
            "lse",
            out.state.lse().to_vec(),
            want.state.lse().to_vec(),
            scales.logit,
        ),
        (
            "lse_positive",
            out.state.lse_positive().to_vec(),
            want.state.lse_positive().to_vec(),
            scales.logit,
        ),
        (
            "positive_weight",
            out.state.positive_weight().to_vec(),
            want.state.positive_weight().to_vec(),
            0.0,
        ),
    ];
    for (name, a, b, floor) in checks {
        let error = relative_error(a.iter().copied(), b.iter().copied(), floor);
        assert!(error <= tolerance, "{what}: {name} error {error:e}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.is_finite(), y.is_finite(), "{what}: {name} {x} vs {y}");
        }
    }
    assert_eq!(
        out.state.mean_denominator(),
        want.state.mean_denominator(),
        "{what}"
    );
    assert_eq!(grad.dim(), want_grad.dim(), "{what}");
    assert!(
        grad.iter().all(|g| g.to_f64().is_finite()),
        "{what}: gradient not finite"
    );
    let error = relative_error(
        grad.iter().map(|g| g.to_f64()),
        want_grad.iter().map(|g| g.to_f64()),
        scales.gradient,
    );
    assert!(error <= tolerance, "{what}: gradient error {error:e}");
}

/// An upstream gradient that fits the reduction: a scalar, or a random per-anchor vector.
fn upstream_for(rng: &mut StdRng, loss: &SupConLoss, anchors: usize) -> Option<Array1<f64>> {
    (loss.reduction() == Reduction::None)
        .then(|| Array1::from_shape_fn(anchors, |_| rng.random_range(-2.0..2.0)))
}

fn upstream_of(vector: &Option<Array1<f64>>) -> Upstream<'_> {
    match vector {
        Some(v) => Upstream::PerAnchor(v.view()),
        None => Upstream::Scalar(0.75),
    }
}

/// Forward and backward on one backend.
fn run<B: Backend, T: Element>(
    backend: &B,
    loss: &SupConLoss,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
) -> supcon::Result<(ForwardOutput, Array3<T::Grad>)> {
    backend.forward_backward(loss, features, positives, upstream)
}

/// Runs both backends on f32 features (the reference on the same values in f64) and compares.
fn check_f32(
    what: &str,
    rng: &mut StdRng,
    loss: &SupConLoss,
    features: &Array3<f32>,
    positives: Positives<'_>,
) {
    let anchors = match loss.contrast_mode() {
        ContrastMode::All => features.dim().0 * features.dim().1,
        ContrastMode::One => features.dim().0,
    };
    let upstream = upstream_for(rng, loss, anchors);
    let got = run(
        &CpuBackend,
        loss,
        features.view(),
        positives,
        upstream_of(&upstream),
    );
    let want = run(
        &ReferenceBackend,
        loss,
        features.mapv(f64::from).view(),
        positives,
        upstream_of(&upstream),
    );
    match (got, want) {
        (Ok(got), Ok(want)) => {
            let scales = Scales::new(loss, features.view(), &want.0, &upstream);
            assert_close(what, &got, &want, &scales, TOLERANCE)
        }
        (Err(got), Err(want)) => assert_eq!(got, want, "{what}"),
        (got, want) => panic!(
            "{what}: cpu {:?} but reference {:?}",
            got.map(|o| o.0.loss),
            want.map(|o| o.0.loss)
        ),
    }
}

#[test]
fn matches_reference_on_ragged_sizes() {
    let mut rng = common::rng("matches_reference_on_ragged_sizes");
    let loss = SupConLoss::default();
    // N = B·V ∈ {2, 3, 17, 97, 300, 1000}, V ∈ {1, 2, 3}; D ∈ {1, 3, 17, 64, 130}.
    let shapes = [
        (2, 1),
        (1, 2),
        (3, 1),
        (1, 3),
        (17, 1),
        (97, 1),
        (300, 1),
        (150, 2),
        (100, 3),
        (1000, 1),
        (500, 2),
    ];
    for (k, &(batch, views)) in shapes.iter().enumerate() {
        for dim in [1, 3, 17, 64, 130] {
            if batch * views * dim > 300 * 130 && (k + dim) % 2 == 0 {
                continue; // Keep the largest shapes to every other width.
            }
            let features = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
            let classes = (batch / 4).max(1);
            let y = common::labels(&mut rng, batch, classes).to_vec();
            let what = format!("B={batch} V={views} D={dim}");
            check_f32(&what, &mut rng, &loss, &features, Positives::labels(&y));
            check_f32(&what, &mut rng, &loss, &features, Positives::SimClr);
        }
    }
}

/// Every loss configuration: contrast modes, summations, denominators, caps, policies and
/// reductions, for SimCLR, labels and a soft asymmetric mask.
fn all_losses() -> Vec<SupConLoss> {
    let mut losses = Vec::new();
    for mode in [ContrastMode::All, ContrastMode::One] {
        for summation in [Summation::Outside, Summation::Inside] {
            for denominator in [
                Denominator::All,
                Denominator::OnlyNegatives,
                Denominator::OnePositive,
            ] {
                for cap in [None, Some(1), Some(3)] {
                    for policy in [
                        NoPositivePolicy::ZeroAndCount,
                        NoPositivePolicy::Exclude,
                        NoPositivePolicy::Error,
                    ] {
                        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                            let mut builder = SupConLoss::builder()
                                .temperature(0.1)
                                .base_temperature(0.07)
                                .contrast_mode(mode)
                                .summation(summation)
                                .denominator(denominator)
                                .no_positive(policy)
                                .reduction(reduction);
                            if let Some(cap) = cap {
                                builder = builder.positives_cap(cap);
                            }
                            losses.push(builder.build().unwrap());
                        }
                    }
                }
            }
        }
    }
    losses
}

/// `check_f32` on fresh unit features of `shape` for SimCLR, labels from `classes` classes and
/// a soft mask.
fn check_every_source(
    rng: &mut StdRng,
    loss: &SupConLoss,
    (batch, views, dim): (usize, usize, usize),
    classes: usize,
) {
    let features = common::unit_features(rng, (batch, views, dim)).mapv(|x| x as f32);
    let y = common::labels(rng, batch, classes).to_vec();
    let mask = common::soft_mask(rng, batch);
    let what = format!("{loss:?} B={batch} V={views}");
    check_f32(&what, rng, loss, &features, Positives::SimClr);
    check_f32(&what, rng, loss, &features, Positives::labels(&y));
    check_f32(&what, rng, loss, &features, Positives::Mask(mask.view()));
}

#[test]
fn matches_reference_for_every_option_in_one_tile() {
    let mut rng = common::rng("matches_reference_for_every_option_in_one_tile");
    for (k, loss) in all_losses().iter().enumerate() {
        // Alternate V = 1 (singleton classes: anchors without positives) and V = 2.
        let (batch, views, dim) = if k % 2 == 0 { (23, 2, 9) } else { (41, 1, 6) };
        check_every_source(&mut rng, loss, (batch, views, dim), 9);
    }
}

#[test]
fn matches_reference_for_every_option_across_tiles() {
    let mut rng = common::rng("matches_reference_for_every_option_across_tiles");
    // More than one 256-row block, so that the symmetric (column) half of the tiles runs.
    let shapes = [(263, 2, 5), (181, 3, 7), (530, 1, 4)];
    let losses = all_losses();
    // Policy and reduction do not touch the tile loops: one of the nine per tile configuration.
    for (k, loss) in losses
        .iter()
        .enumerate()
        .filter(|(k, _)| k % 9 == (k / 9) % 9)
    {
        let (batch, views, dim) = shapes[k % shapes.len()];
        check_every_source(&mut rng, loss, (batch, views, dim), 40);
    }
}

#[test]
fn matches_reference_at_4096_rows() {
    let mut rng = common::rng("matches_reference_at_4096_rows");
    let features = common::unit_features(&mut rng, (2048, 2, 32)).mapv(|x| x as f32);
    let y = common::labels(&mut rng, 2048, 100).to_vec();
    check_f32(
        "N=4096",
        &mut rng,
        &SupConLoss::default(),
        &features,
        Positives::labels(&y),
    );
}

/// Half-precision features against the reference on the same values widened to f64.
fn check_half<T: Element>(rng: &mut StdRng, convert: impl Fn(f32) -> T) {
    let loss = SupConLoss::builder().temperature(0.05).build().unwrap();
    for (batch, views, dim) in [(97, 2, 17), (300, 1, 64), (150, 2, 130)] {
        let features = common::unit_features(rng, (batch, views, dim))
            .mapv(|x| x as f32)
            .mapv(&convert);
        let y = common::labels(rng, batch, 11).to_vec();
        let got = run(
            &CpuBackend,
            &loss,
            features.view(),
            Positives::labels(&y),
            upstream_of(&None),
        )
        .unwrap();
        let want = run(
            &ReferenceBackend,
            &loss,
            features.mapv(|x| x.to_f64()).view(),
            Positives::labels(&y),
            upstream_of(&None),
        )
        .unwrap();
        let what = format!("{:?} B={batch} V={views} D={dim}", T::DTYPE);
        let scales = Scales::new(&loss, features.view(), &want.0, &None);
        assert_close(&what, &got, &want, &scales, TOLERANCE);
    }
}

#[test]
fn half_precision_inputs_match_reference() {
    let mut rng = common::rng("half_precision_inputs_match_reference");
    check_half(&mut rng, f16::from_f32);
    check_half(&mut rng, bf16::from_f32);
}

#[test]
fn f64_inputs_are_computed_in_f32() {
    let mut rng = common::rng("f64_inputs_are_computed_in_f32");
    let features = common::unit_features(&mut rng, (200, 2, 24))
        .mapv(|x| x as f32)
        .mapv(f64::from);
    let y = common::labels(&mut rng, 200, 13).to_vec();
    let loss = SupConLoss::default();
    let got = run(
        &CpuBackend,
        &loss,
        features.view(),
        Positives::labels(&y),
        upstream_of(&None),
    )
    .unwrap();
    let want = run(
        &ReferenceBackend,
        &loss,
        features.view(),
        Positives::labels(&y),
        upstream_of(&None),
    )
    .unwrap();
    let scales = Scales::new(&loss, features.view(), &want.0, &None);
    assert_close("f64", &got, &want, &scales, TOLERANCE);
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
                .install(|| {
                    run(
                        &CpuBackend,
                        &loss,
                        features.view(),
                        positives,
                        Upstream::Scalar(1.0),
                    )
                    .unwrap()
                })
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
    let a = run(
        &CpuBackend,
        &loss,
        features.view(),
        Positives::labels(&y),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    let b = run(
        &CpuBackend,
        &loss,
        strided,
        Positives::labels(&y),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    assert_eq!(a.0.state, b.0.state);
    assert_eq!(a.1, b.1);
}

/// Features of norm 8–100 at τ = 0.005: logits up to ~2e6, every exponential relative to a max
/// of non-excluded entries.
#[test]
fn huge_logits_stay_finite_and_close_to_reference() {
    let mut rng = common::rng("huge_logits_stay_finite_and_close_to_reference");
    let (batch, views, dim) = (150, 2, 16);
    let mut features = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
    for mut row in features.lanes_mut(Axis(2)) {
        let norm = rng.random_range(8.0f32..100.0);
        row.mapv_inplace(|v| v * norm);
    }
    let y = common::labels(&mut rng, batch, 5).to_vec();
    for summation in [Summation::Outside, Summation::Inside] {
        for denominator in [
            Denominator::All,
            Denominator::OnlyNegatives,
            Denominator::OnePositive,
        ] {
            let loss = SupConLoss::builder()
                .temperature(0.005)
                .summation(summation)
                .denominator(denominator)
                .build()
                .unwrap();
            for positives in [Positives::labels(&y), Positives::SimClr] {
                let (out, grad) = run(
                    &CpuBackend,
                    &loss,
                    features.view(),
                    positives,
                    Upstream::Scalar(1.0),
                )
                .unwrap();
                let what = format!("{loss:?}");
                assert!(out.loss.unwrap().is_finite(), "{what}");
                assert!(out.per_anchor.iter().all(|l| l.is_finite()), "{what}");
                assert!(grad.iter().all(|g| g.is_finite()), "{what}");
                // Logits of ~2e6 carry f32 rounding of ~0.1 each: compare loosely.
                let want = run(
                    &ReferenceBackend,
                    &loss,
                    features.mapv(f64::from).view(),
                    positives,
                    Upstream::Scalar(1.0),
                )
                .unwrap();
                let error = relative_error(out.loss, want.0.loss, 0.0);
                assert!(error < 1e-3, "{what}: loss error {error:e}");
            }
        }
    }
}

#[test]
fn one_class_batches_are_finite() {
    let mut rng = common::rng("one_class_batches_are_finite");
    let features = common::unit_features(&mut rng, (300, 2, 8)).mapv(|x| x as f32);
    let y = vec![-5i64; 300];
    for denominator in [
        Denominator::All,
        Denominator::OnlyNegatives,
        Denominator::OnePositive,
    ] {
        for summation in [Summation::Outside, Summation::Inside] {
            let loss = SupConLoss::builder()
                .denominator(denominator)
                .summation(summation)
                .build()
                .unwrap();
            check_f32(
                &format!("{loss:?}"),
                &mut rng,
                &loss,
                &features,
                Positives::labels(&y),
            );
            let (out, grad) = run(
                &CpuBackend,
                &loss,
                features.view(),
                Positives::labels(&y),
                Upstream::Scalar(1.0),
            )
            .unwrap();
            assert!(out.loss.unwrap().is_finite());
            if denominator != Denominator::All {
                // No negatives: every denominator is empty, so ℓ = 0 and no gradient.
                assert_eq!(out.loss, Some(0.0));
                assert!(grad.iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn anchors_without_positives_follow_the_policy() {
    let mut rng = common::rng("anchors_without_positives_follow_the_policy");
    // V = 1 and all labels distinct: no anchor has a positive.
    let features = common::unit_features(&mut rng, (40, 1, 8)).mapv(|x| x as f32);
    let y: Vec<i64> = (0..40).collect();
    let zero = SupConLoss::default();
    let (out, grad) = run(
        &CpuBackend,
        &zero,
        features.view(),
        Positives::labels(&y),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    assert_eq!(out.loss, Some(0.0));
    assert!(grad.iter().all(|&g| g == 0.0));
    let error = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    assert_eq!(
        CpuBackend
            .forward(&error, features.view(), Positives::labels(&y))
            .unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 0 }
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let loss = SupConLoss::default();
    let one_row = Array3::<f32>::ones((1, 1, 4));
    assert_eq!(
        CpuBackend
            .forward(&loss, one_row.view(), Positives::SimClr)
            .unwrap_err(),
        Error::SingleRow
    );
    let mut with_nan = Array3::<f32>::ones((3, 2, 4));
    with_nan[[1, 1, 2]] = f32::NAN;
    assert_eq!(
        CpuBackend
            .forward(&loss, with_nan.view(), Positives::SimClr)
            .unwrap_err(),
        Error::NonFiniteFeature {
            sample: 1,
            view: 1,
            dim: 2
        }
    );
    // Finite, but z·z/τ would overflow f32.
    let enormous = Array3::<f32>::from_elem((3, 2, 4), 1e19);
    assert!(matches!(
        CpuBackend.forward(&loss, enormous.view(), Positives::SimClr),
        Err(Error::Unsupported { backend: "cpu", .. })
    ));
    // A state from another configuration, and an upstream that does not fit the reduction.
    let features = Array3::<f32>::from_shape_fn((5, 2, 3), |(b, v, d)| (b + v * 2 + d) as f32);
    let out = CpuBackend
        .forward(&loss, features.view(), Positives::SimClr)
        .unwrap();
    let other = SupConLoss::builder().temperature(0.5).build().unwrap();
    assert!(matches!(
        CpuBackend.backward(
            &other,
            features.view(),
            Positives::SimClr,
            &out.state,
            Upstream::Scalar(1.0)
        ),
        Err(Error::StateMismatch(_))
    ));
    let per_anchor = Array1::zeros(10);
    assert!(matches!(
        CpuBackend.backward(
            &loss,
            features.view(),
            Positives::SimClr,
            &out.state,
            Upstream::PerAnchor(per_anchor.view())
        ),
        Err(Error::UpstreamMismatch { .. })
    ));
}
