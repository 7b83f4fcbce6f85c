//! The CUDA kernels, run through the host emulation of the CUDA execution model (feature
//! `emulation`), against the f64 reference backend: every kernel entry point (forward,
//! finalisation, backward for f32, f16 and bf16), ragged shapes that cut the 64-row tiles, the
//! 32-element depth stages and the 128-column gradient chunks at every possible place, and
//! every option the kernels implement. The emulation runs the real launch plan.
//!
//! Inputs are fresh random values (the seed is printed; SUPCON_TEST_SEED replays a run). The
//! emulated "device" memory starts as NaN bytes, so every output element a kernel fails to
//! write shows up as non-finite; the checks below require finite outputs first.
#![cfg(feature = "emulation")]

mod common;

use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3};
use rand::rngs::StdRng;
use rand::RngExt;
use supcon::{
    Backend, ContrastMode, Denominator, Element, EmulatedBackend, Error, ForwardOutput,
    GradElement, NoPositivePolicy, Positives, Reduction, ReferenceBackend, Summation, SupConLoss,
    Upstream,
};

/// Error model, as a bound on |emulated − reference| (the reference sees the very same input
/// values widened to f64, so input rounding is no error source; half inputs multiply exactly in
/// f32).
///
/// With ε = f32::EPSILON and s_max = max_r |z_r|²/τ ≥ |s_ij|: a logit is a D-term f32 dot product
/// whose rounding errors add up like a random walk, |Δs| ≈ √D·ε·s_max; LSE_i and T_i/P_i inherit
/// it, plus their own rounding, ~ε·s_max each, and sums over N terms add ~√N·ε. So
///     |Δℓ_i| ≲ c·ε·((√D + 4)·s_max + √N)                                   (loss unit)
/// and a gradient entry (1/τ)Σ_j H_kj z_j, whose weights H carry relative errors of |Δs| on
/// terms of total size a few (c·|u|/R')·|z|/τ, is off by at most
///     |Δg| ≲ (c·max|u_i|/R')·(max|z|/τ)·ε·((√D + 4)·s_max + √N)·(2 + R/N·2)  (gradient unit)
/// We allow SAFETY_FACTOR times these; the suite prints the largest error/bound ratio it saw.
/// (A wrong mask, term or scale is an O(1) relative error, orders of magnitude above.)
const SAFETY_FACTOR: f64 = 4.0;

/// The bounds above for one problem.
struct Tolerance {
    loss: f64,
    grad: f64,
}

impl Tolerance {
    fn new<T: Element>(
        loss: &SupConLoss,
        z: &Array3<T>,
        upstream: &Upstream<'_>,
        r_prime: f64,
    ) -> Self {
        let (b, v, d) = z.dim();
        let n = (b * v) as f64;
        let norms: Vec<f64> = z
            .rows()
            .into_iter()
            .map(|row| row.iter().map(|x| x.to_f64().powi(2)).sum::<f64>().sqrt())
            .collect();
        let max_norm = norms.iter().fold(0.0f64, |m, &x| m.max(x));
        let tau = loss.temperature();
        let s_max = max_norm * max_norm / tau;
        let eps = f64::from(f32::EPSILON);
        let logit_error = eps * (((d as f64).sqrt() + 4.0) * s_max + n.sqrt());
        let c = loss.loss_scale();
        let max_upstream = match upstream {
            Upstream::Scalar(u) => u.abs(),
            Upstream::PerAnchor(u) => u.iter().fold(0.0f64, |m, x| m.max(x.abs())),
        };
        let anchors = match loss.contrast_mode() {
            ContrastMode::All => n,
            ContrastMode::One => b as f64,
        };
        let grad_unit = c * max_upstream / r_prime * max_norm / tau * (2.0 + 2.0 * anchors / n);
        Tolerance {
            loss: SAFETY_FACTOR * c * logit_error,
            grad: SAFETY_FACTOR * grad_unit * logit_error,
        }
    }
}

/// Which positives a case uses.
#[derive(Debug, Clone, Copy)]
enum Source {
    SimClr,
    Labels,
    Mask,
}

const SOURCES: [Source; 3] = [Source::SimClr, Source::Labels, Source::Mask];

/// Labels and a soft asymmetric mask for a batch of `batch` samples.
struct Relations {
    labels: Array1<i64>,
    mask: Array2<f32>,
}

impl Relations {
    fn new(rng: &mut StdRng, batch: usize, classes: usize) -> Self {
        Relations {
            labels: common::labels(rng, batch, classes),
            mask: common::soft_mask(rng, batch),
        }
    }

    fn positives(&self, source: Source) -> Positives<'_> {
        match source {
            Source::SimClr => Positives::SimClr,
            Source::Labels => Positives::Labels(self.labels.view()),
            Source::Mask => Positives::Mask(self.mask.view()),
        }
    }
}

/// The largest error/bound ratio a test saw, for the report.
struct Worst {
    ratio: f64,
    what: String,
}

impl Worst {
    fn new() -> Self {
        Worst {
            ratio: 0.0,
            what: String::new(),
        }
    }

    fn record(&mut self, ratio: f64, what: &str) {
        if ratio > self.ratio {
            self.ratio = ratio;
            self.what = what.to_string();
        }
    }

    fn report(&self, test: &str) {
        eprintln!(
            "{test}: largest error/bound ratio {:.3} ({})",
            self.ratio, self.what
        );
    }
}

/// An upstream gradient that fits the reduction: 0.75, or mixed-sign values per anchor.
fn upstream_for<'a>(loss: &SupConLoss, per_anchor: &'a Array1<f64>) -> Upstream<'a> {
    match loss.reduction() {
        Reduction::None => Upstream::PerAnchor(per_anchor.view()),
        Reduction::Mean | Reduction::Sum => Upstream::Scalar(0.75),
    }
}

fn anchors_of(loss: &SupConLoss, (b, v, _): (usize, usize, usize)) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => b * v,
        ContrastMode::One => b,
    }
}

fn mixed_upstream(rng: &mut StdRng, anchors: usize) -> Array1<f64> {
    Array1::from_shape_fn(anchors, |_| rng.random_range(-1.5..1.5))
}

fn assert_forward_written(out: &ForwardOutput, what: &str) {
    let state = &out.state;
    assert!(
        out.per_anchor.iter().all(|x| x.is_finite()),
        "{what}: non-finite ℓ_i"
    );
    assert!(
        out.loss.is_none_or(f64::is_finite),
        "{what}: non-finite loss"
    );
    assert!(
        state.positive_weight().iter().all(|p| p.is_finite()),
        "{what}: non-finite P_i"
    );
    // −∞ marks an empty set; NaN (the poison) never appears.
    assert!(
        state
            .lse()
            .iter()
            .chain(state.lse_positive())
            .all(|x| !x.is_nan() && *x != f64::INFINITY),
        "{what}: unwritten log-sum-exp"
    );
}

/// |a − b| for two per-anchor log-sum-exps, 0 when both are −∞ (an empty set).
fn lse_difference(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY && b == f64::NEG_INFINITY {
        0.0
    } else {
        (a - b).abs()
    }
}

fn max_difference<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Forward and backward on the emulated kernels and on the reference; asserts agreement within
/// the error model and returns the largest error/bound ratio.
fn check<T: Element>(
    loss: &SupConLoss,
    z: &Array3<T>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
    what: &str,
) -> f64 {
    let emulated = EmulatedBackend.forward(loss, z.view(), positives);
    let reference = ReferenceBackend.forward(loss, z.view(), positives);
    let (out, ref_out) = match (emulated, reference) {
        (Ok(out), Ok(ref_out)) => (out, ref_out),
        (Err(e), Err(r)) => {
            assert_eq!(e, r, "{what}: a different error than the reference's");
            return 0.0;
        }
        (e, r) => panic!("{what}: emulated {e:?}, reference {r:?}"),
    };
    assert_forward_written(&out, what);
    let r_prime = ref_out.state.mean_denominator();
    assert_eq!(out.state.mean_denominator(), r_prime, "{what}: R'");
    let tolerance = Tolerance::new(loss, z, &upstream, r_prime);
    let reduced_scale = match loss.reduction() {
        Reduction::Sum => out.per_anchor.len() as f64,
        Reduction::Mean | Reduction::None => 1.0,
    };
    let per_anchor_error = max_difference(&out.per_anchor, &ref_out.per_anchor);
    let loss_error = match (out.loss, ref_out.loss) {
        (Some(a), Some(b)) => (a - b).abs() / reduced_scale,
        (None, None) => 0.0,
        (a, b) => panic!("{what}: reduced loss {a:?}, reference {b:?}"),
    };
    let lse_error = out
        .state
        .lse()
        .iter()
        .zip(ref_out.state.lse())
        .chain(
            out.state
                .lse_positive()
                .iter()
                .zip(ref_out.state.lse_positive()),
        )
        .map(|(&a, &b)| lse_difference(a, b) * loss.loss_scale())
        .fold(0.0, f64::max);
    // P_i sums mask weights in f32 (exact for 0/1 weights).
    let weight_error = max_difference(out.state.positive_weight(), ref_out.state.positive_weight())
        / (z.dim().0 * z.dim().1) as f64;
    assert!(
        weight_error <= 1e-6,
        "{what}: P_i off by {weight_error:e} per contrast"
    );
    let forward_ratio = per_anchor_error.max(loss_error).max(lse_error) / tolerance.loss;
    assert!(
        forward_ratio <= 1.0,
        "{what}: forward error {:e} (ℓ_i {per_anchor_error:e}, loss {loss_error:e}, LSE {lse_error:e}) above the bound {:e}",
        per_anchor_error.max(loss_error).max(lse_error),
        tolerance.loss
    );

    let grad = EmulatedBackend
        .backward(loss, z.view(), positives, &out.state, upstream)
        .unwrap_or_else(|e| panic!("{what}: backward failed: {e}"));
    let ref_grad = ReferenceBackend
        .backward(loss, z.view(), positives, &ref_out.state, upstream)
        .expect("reference backward");
    let grad: Vec<f64> = grad.iter().map(|g| g.to_f64()).collect();
    assert!(
        grad.iter().all(|g| g.is_finite()),
        "{what}: non-finite gradient"
    );
    let ref_grad: Vec<f64> = ref_grad.iter().map(|g| g.to_f64()).collect();
    let grad_error = max_difference(&grad, &ref_grad);
    let grad_ratio = grad_error / tolerance.grad;
    assert!(
        grad_ratio <= 1.0,
        "{what}: gradient error {grad_error:e} above the bound {:e}",
        tolerance.grad
    );
    forward_ratio.max(grad_ratio)
}

/// Runs `check` on f32, f16 and bf16 versions of `z`.
fn check_all_types(
    loss: &SupConLoss,
    z: &Array3<f64>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
    what: &str,
    worst: &mut Worst,
) {
    let cases = [
        (
            "f32",
            check(
                loss,
                &z.mapv(|x| x as f32),
                positives,
                upstream,
                &format!("f32 {what}"),
            ),
        ),
        (
            "f16",
            check(
                loss,
                &z.mapv(f16::from_f64),
                positives,
                upstream,
                &format!("f16 {what}"),
            ),
        ),
        (
            "bf16",
            check(
                loss,
                &z.mapv(bf16::from_f64),
                positives,
                upstream,
                &format!("bf16 {what}"),
            ),
        ),
    ];
    for (name, ratio) in cases {
        worst.record(ratio, &format!("{name} {what}"));
    }
}

/// Shapes (B, V, D) that put N = B·V on both sides of every tile boundary (64 rows), D on both
/// sides of the depth stages (32) and the gradient chunks (128), with V = 1, 2, 3 and prime N.
const RAGGED_SHAPES: [(usize, usize, usize); 12] = [
    (2, 1, 1),     // N = 2: the smallest problem
    (1, 2, 3),     // one sample, two views (SimCLR pairs only)
    (3, 1, 17),    // N = 3, no label positives likely
    (7, 2, 64),    // N = 14
    (13, 3, 128),  // N = 39
    (31, 2, 130),  // N = 62, D one past a gradient chunk
    (67, 1, 3),    // N = 67 (prime): two tiles
    (43, 3, 17),   // N = 129 = 64 + 64 + 1
    (32, 2, 33),   // N = 64: exactly one tile, D one past a stage
    (101, 2, 64),  // N = 202
    (97, 3, 1),    // N = 291
    (293, 1, 130), // N = 293 (prime): five tiles, two gradient chunks
];

#[test]
fn ragged_shapes_and_element_types_match_reference() {
    let mut rng = common::rng("ragged_shapes");
    let mut worst = Worst::new();
    for (index, &(b, v, d)) in RAGGED_SHAPES.iter().enumerate() {
        let z = common::unit_features(&mut rng, (b, v, d));
        let relations = Relations::new(&mut rng, b, (b / 4).max(2));
        let source = SOURCES[index % SOURCES.len()];
        let loss = SupConLoss::default();
        let what = format!("shape {:?} {source:?} default options", (b, v, d));
        check_all_types(
            &loss,
            &z,
            relations.positives(source),
            Upstream::Scalar(1.0),
            &what,
            &mut worst,
        );
    }
    worst.report("ragged_shapes");
}

/// Every supported option combination (contrast mode × summation × denominator × no-positive
/// policy × reduction) × every kind of positives, on shapes with one, two and three tiles.
#[test]
fn every_supported_option_matches_reference() {
    let mut rng = common::rng("every_option");
    let mut worst = Worst::new();
    let mut compared = 0;
    for (b, v, d) in [(7, 2, 17), (37, 2, 33), (5, 3, 130), (71, 2, 5)] {
        let z = common::unit_features(&mut rng, (b, v, d)).mapv(|x| x as f32);
        // Few classes: most anchors have positives, some samples are alone in their class.
        let relations = Relations::new(&mut rng, b, (b / 2).max(2));
        let upstream_values = mixed_upstream(&mut rng, b * v);
        for loss in common::option_grid(0.1, 0.07, None)
            .into_iter()
            .filter(|loss| loss.denominator() != Denominator::OnePositive)
        {
            let per_anchor = upstream_values
                .slice(ndarray::s![..anchors_of(&loss, (b, v, d))])
                .to_owned();
            for source in SOURCES {
                let what = format!("{loss:?} {source:?} shape {:?}", (b, v, d));
                let ratio = check(
                    &loss,
                    &z,
                    relations.positives(source),
                    upstream_for(&loss, &per_anchor),
                    &what,
                );
                worst.record(ratio, &what);
                compared += 1;
            }
        }
    }
    eprintln!("every_option: {compared} combinations compared");
    worst.report("every_option");
}

/// Half-precision inputs under every denominator, summation and kind of positives.
#[test]
fn half_inputs_under_every_variant_match_reference() {
    let mut rng = common::rng("half_variants");
    let mut worst = Worst::new();
    let (b, v, d) = (45, 2, 40);
    let z = common::unit_features(&mut rng, (b, v, d));
    let relations = Relations::new(&mut rng, b, 9);
    for contrast_mode in [ContrastMode::All, ContrastMode::One] {
        for summation in [Summation::Outside, Summation::Inside] {
            for denominator in [Denominator::All, Denominator::OnlyNegatives] {
                let loss = SupConLoss::builder()
                    .temperature(0.2)
                    .contrast_mode(contrast_mode)
                    .summation(summation)
                    .denominator(denominator)
                    .build()
                    .unwrap();
                for source in SOURCES {
                    let what = format!("{loss:?} {source:?}");
                    let positives = relations.positives(source);
                    let up = Upstream::Scalar(1.0);
                    let f16_ratio = check(
                        &loss,
                        &z.mapv(f16::from_f64),
                        positives,
                        up,
                        &format!("f16 {what}"),
                    );
                    let bf16_ratio = check(
                        &loss,
                        &z.mapv(bf16::from_f64),
                        positives,
                        up,
                        &format!("bf16 {what}"),
                    );
                    worst.record(f16_ratio.max(bf16_ratio), &what);
                }
            }
        }
    }
    worst.report("half_variants");
}

/// τ = 0.005 with norms up to 30: logits up to 1.8·10⁵, beyond the half range (65504), in
/// every input type; the kernels accumulate and exponentiate in f32 and must stay finite and
/// accurate relative to the logit scale.
#[test]
fn large_logits_stay_finite_and_accurate() {
    let mut rng = common::rng("large_logits");
    let mut worst = Worst::new();
    let (b, v, d) = (29, 2, 24);
    let z = common::features(&mut rng, (b, v, d), 5.0..30.0);
    let relations = Relations::new(&mut rng, b, 5);
    for summation in [Summation::Outside, Summation::Inside] {
        for denominator in [Denominator::All, Denominator::OnlyNegatives] {
            let loss = SupConLoss::builder()
                .temperature(0.005)
                .summation(summation)
                .denominator(denominator)
                .build()
                .unwrap();
            let what = format!("τ = 0.005 {summation:?} {denominator:?}");
            check_all_types(
                &loss,
                &z,
                relations.positives(Source::Labels),
                Upstream::Scalar(1.0),
                &what,
                &mut worst,
            );
        }
    }
    worst.report("large_logits");
}

/// Anchors without positives under each policy, a batch without any positive, a one-class batch
/// (no negatives: the only-negatives denominator is empty), V = 1 SimCLR.
#[test]
fn positive_and_negative_edge_cases_match_reference() {
    let mut rng = common::rng("edge_cases");
    let mut worst = Worst::new();
    let policies = [
        NoPositivePolicy::ZeroAndCount,
        NoPositivePolicy::Exclude,
        NoPositivePolicy::Error,
    ];
    let z = common::unit_features(&mut rng, (70, 1, 9));
    // Labels 0..34 twice plus singletons: some anchors have positives, some none.
    let mixed = Array1::from_shape_fn(70, |i| {
        if i < 60 {
            (i % 30) as i64
        } else {
            1000 + i as i64
        }
    });
    let distinct = Array1::from_shape_fn(70, |i| i as i64 * 7 - 300);
    let one_class = Array1::from_elem(70, i64::MIN);
    for policy in policies {
        for denominator in [Denominator::All, Denominator::OnlyNegatives] {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let loss = SupConLoss::builder()
                    .no_positive(policy)
                    .denominator(denominator)
                    .reduction(reduction)
                    .build()
                    .unwrap();
                for (name, labels) in [
                    ("mixed", &mixed),
                    ("distinct", &distinct),
                    ("one class", &one_class),
                ] {
                    let what = format!("{name} labels {loss:?}");
                    let ratio = check(
                        &loss,
                        &z.mapv(|x| x as f32),
                        Positives::Labels(labels.view()),
                        Upstream::Scalar(1.0),
                        &what,
                    );
                    worst.record(ratio, &what);
                }
                let what = format!("V = 1 SimCLR {loss:?}");
                let ratio = check(
                    &loss,
                    &z.mapv(|x| x as f32),
                    Positives::SimClr,
                    Upstream::Scalar(1.0),
                    &what,
                );
                worst.record(ratio, &what);
            }
        }
    }
    // Explicitly: the typed error names the first anchor without positives; Exclude with no
    // positive at all gives loss 0 and gradient 0.
    let z32 = z.mapv(|x| x as f32);
    let error = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    assert_eq!(
        EmulatedBackend
            .forward(&error, z32.view(), Positives::Labels(mixed.view()))
            .unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 60 }
    );
    let exclude = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Exclude)
        .build()
        .unwrap();
    let (out, grad) = EmulatedBackend
        .forward_backward(
            &exclude,
            z32.view(),
            Positives::SimClr,
            Upstream::Scalar(1.0),
        )
        .unwrap();
    assert_eq!(out.loss, Some(0.0));
    assert!(grad.iter().all(|&g| g == 0.0));
    worst.report("edge_cases");
}

/// Two runs give bitwise identical losses, statistics and gradients (fixed reduction orders,
/// no atomics).
#[test]
fn results_are_bitwise_reproducible() {
    let mut rng = common::rng("reproducible");
    let (b, v, d) = (83, 2, 70);
    let z = common::unit_features(&mut rng, (b, v, d)).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, b, 10);
    let loss = SupConLoss::default();
    let run = || {
        EmulatedBackend
            .forward_backward(
                &loss,
                z.view(),
                Positives::Labels(labels.view()),
                Upstream::Scalar(1.0),
            )
            .unwrap()
    };
    let ((first, first_grad), (second, second_grad)) = (run(), run());
    assert_eq!(first.loss.map(f64::to_bits), second.loss.map(f64::to_bits));
    let bits = |x: &Array1<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first.per_anchor), bits(&second.per_anchor));
    assert_eq!(first.state, second.state);
    let grad_bits = |g: &Array3<f32>| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(grad_bits(&first_grad), grad_bits(&second_grad));
}

/// What the kernels do not implement is a typed error, never a wrong answer.
#[test]
fn unsupported_options_and_types_are_typed_errors() {
    let mut rng = common::rng("unsupported");
    let z = common::unit_features(&mut rng, (6, 2, 4));
    let labels = common::labels(&mut rng, 6, 2);
    let positives = Positives::Labels(labels.view());
    let unsupported = |result: supcon::Result<ForwardOutput>| {
        matches!(
            result,
            Err(Error::Unsupported {
                backend: "emulated",
                ..
            })
        )
    };
    let one_positive = SupConLoss::builder()
        .denominator(Denominator::OnePositive)
        .build()
        .unwrap();
    let capped = SupConLoss::builder().positives_cap(1).build().unwrap();
    let z32 = z.mapv(|x| x as f32);
    assert!(unsupported(EmulatedBackend.forward(
        &one_positive,
        z32.view(),
        positives
    )));
    assert!(unsupported(EmulatedBackend.forward(
        &capped,
        z32.view(),
        positives
    )));
    assert!(unsupported(EmulatedBackend.forward(
        &SupConLoss::default(),
        z.view(),
        positives
    )));
    // The state of a supported forward pass still fails a backward call of another problem.
    let out = EmulatedBackend
        .forward(&SupConLoss::default(), z32.view(), positives)
        .unwrap();
    let other = common::unit_features(&mut rng, (6, 2, 5)).mapv(|x| x as f32);
    assert!(matches!(
        EmulatedBackend.backward(
            &SupConLoss::default(),
            other.view(),
            positives,
            &out.state,
            Upstream::Scalar(1.0)
        ),
        Err(Error::StateMismatch(_))
    ));
}

/// Where an anchor's loss does not depend on the logits, its gradient is exactly zero, not
/// rounding noise: a one-class batch under L_in with the full denominator (ℓ_i = c·log P_i), and
/// two rows that are each other's only contrast and positive, with any mask weight.
#[test]
fn logit_independent_losses_have_exactly_zero_gradients() {
    let mut rng = common::rng("exact_zero");
    let one_class = Array1::from_elem(37, 42i64);
    let z = common::unit_features(&mut rng, (37, 2, 19)).mapv(|x| x as f32);
    let pair = common::unit_features(&mut rng, (2, 1, 7)).mapv(|x| x as f32);
    let pair_mask = Array2::from_shape_fn((2, 2), |_| rng.random_range(0.1f32..3.0));
    for summation in [Summation::Outside, Summation::Inside] {
        let loss = SupConLoss::builder().summation(summation).build().unwrap();
        let mut cases = vec![(
            "two rows, soft mask",
            &pair,
            Positives::Mask(pair_mask.view()),
        )];
        if summation == Summation::Inside {
            cases.push(("one class", &z, Positives::Labels(one_class.view())));
        }
        for (what, features, positives) in cases {
            let (_, grad) = EmulatedBackend
                .forward_backward(&loss, features.view(), positives, Upstream::Scalar(1.0))
                .unwrap();
            assert!(
                grad.iter().all(|&g| g == 0.0),
                "{what} {summation:?}: gradient {grad:?}"
            );
        }
    }
}
