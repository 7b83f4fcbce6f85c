//! The reference backend on hand-computed cases, invariances, edge cases and every error.

mod common;

use ndarray::{arr1, arr2, array, Array1, Array3, Axis};
use supcon::{
    Backend, ContrastMode, Denominator, Error, LabelSetWeight, NoPositivePolicy, Positives,
    Reduction, ReferenceBackend, Summation, SupConLoss, Upstream,
};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

fn loss_with(f: impl FnOnce(supcon::SupConLossBuilder) -> supcon::SupConLossBuilder) -> SupConLoss {
    f(SupConLoss::builder().temperature(1.0).base_temperature(1.0))
        .build()
        .expect("valid")
}

/// B = 3, V = 1, D = 1, z = (1, 2, −1), labels (0, 0, 1), τ = τ_b = 1.
///
/// Logits s_ij = z_i z_j: s01 = 2, s02 = −1, s12 = −2.
/// Anchor 0: positive 1; LSE_0 = ln(e² + e⁻¹); ℓ_0 = −(2 − LSE_0) = ln(1 + e⁻³).
/// Anchor 1: positive 0; LSE_1 = ln(e² + e⁻²); ℓ_1 = ln(1 + e⁻⁴).
/// Anchor 2: no positive → 0. Mean (zero-and-count) = (ℓ_0 + ℓ_1)/3; exclude: /2.
///
/// Gradient of the mean: G_ij = (1/3)(q_ij − w_ij): G01 = −σ(−3)/3, G02 = σ(−3)/3,
/// G10 = −σ(−4)/3, G12 = σ(−4)/3, row 2 zero. dz_k = Σ_j (G_kj + G_jk) z_j:
/// dz0 = (G01+G10)·2 + G02·(−1) = −σ(−3) − (2/3)σ(−4)
/// dz1 = (G01+G10)·1 + G12·(−1) = −(1/3)σ(−3) − (2/3)σ(−4)
/// dz2 = G02·1 + G12·2           =  (1/3)σ(−3) + (2/3)σ(−4)
#[test]
fn three_rows_by_hand() {
    let z = Array3::from_shape_vec((3, 1, 1), vec![1.0, 2.0, -1.0]).unwrap();
    let labels = arr1(&[0i64, 0, 1]);
    let (l0, l1) = ((-3f64).exp().ln_1p(), (-4f64).exp().ln_1p());

    let loss = loss_with(|b| b);
    let (out, grad) = ReferenceBackend
        .forward_backward(
            &loss,
            z.view(),
            Positives::Labels(labels.view()),
            Upstream::Scalar(1.0),
        )
        .unwrap();
    assert!(close(out.loss.unwrap(), (l0 + l1) / 3.0));
    assert!(close(out.per_anchor[0], l0) && close(out.per_anchor[1], l1));
    assert_eq!(out.per_anchor[2], 0.0);
    let (a, b) = (sigmoid(-3.0), sigmoid(-4.0));
    let expected = [
        -a - 2.0 * b / 3.0,
        -a / 3.0 - 2.0 * b / 3.0,
        a / 3.0 + 2.0 * b / 3.0,
    ];
    for (g, e) in grad.iter().zip(expected) {
        assert!(close(*g, e), "{g} vs {e}");
    }

    let exclude = loss_with(|b| b.no_positive(NoPositivePolicy::Exclude));
    let out = ReferenceBackend
        .forward(&exclude, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    assert!(close(out.loss.unwrap(), (l0 + l1) / 2.0));
    let sum = loss_with(|b| b.reduction(Reduction::Sum));
    let out = ReferenceBackend
        .forward(&sum, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    assert!(close(out.loss.unwrap(), l0 + l1));
    let error = loss_with(|b| b.no_positive(NoPositivePolicy::Error));
    assert_eq!(
        ReferenceBackend
            .forward(&error, z.view(), Positives::Labels(labels.view()))
            .unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 2 }
    );
}

/// B = 4, V = 1, D = 1, z = (1, 1, 2, −1), labels (0, 0, 0, 1), τ = τ_b = 1: anchor 0 has
/// positives 1 (s = 1) and 2 (s = 2) and one negative 3 (s = −1), so LSE^N = −1 and
/// L = LSE over all = ln(e + e² + e⁻¹), LSE^P = ln(e + e²), P = 2.
///   outside/all:            −½[(1 − L) + (2 − L)]             = L − 1.5
///   inside/all:             L − LSE^P + ln 2
///   outside/only-negatives: −½[(1 + 1) + (2 + 1)]             = −2.5
///   inside/only-negatives:  −1 − LSE^P + ln 2
///   outside/one-positive:   ½[softplus(−2) + softplus(−3)]
///   inside/one-positive:    −ln(½[σ(2) + σ(3)])
/// Anchor 0 is also scaled by c = τ/τ_b: with τ_b = 0.5 every value doubles.
#[test]
fn every_variant_by_hand() {
    let z = Array3::from_shape_vec((4, 1, 1), vec![1.0, 1.0, 2.0, -1.0]).unwrap();
    let labels = arr1(&[0i64, 0, 0, 1]);
    let l = (1f64.exp() + 2f64.exp() + (-1f64).exp()).ln();
    let lp = (1f64.exp() + 2f64.exp()).ln();
    let softplus = |x: f64| x.exp().ln_1p();
    let cases = [
        (Summation::Outside, Denominator::All, l - 1.5),
        (Summation::Inside, Denominator::All, l - lp + 2f64.ln()),
        (Summation::Outside, Denominator::OnlyNegatives, -2.5),
        (
            Summation::Inside,
            Denominator::OnlyNegatives,
            -1.0 - lp + 2f64.ln(),
        ),
        (
            Summation::Outside,
            Denominator::OnePositive,
            0.5 * (softplus(-2.0) + softplus(-3.0)),
        ),
        (
            Summation::Inside,
            Denominator::OnePositive,
            -(0.5 * (sigmoid(2.0) + sigmoid(3.0))).ln(),
        ),
    ];
    for (summation, denominator, expected) in cases {
        for (base, scale) in [(1.0, 1.0), (0.5, 2.0)] {
            let loss = loss_with(|b| {
                b.summation(summation)
                    .denominator(denominator)
                    .base_temperature(base)
                    .reduction(Reduction::None)
            });
            let out = ReferenceBackend
                .forward(&loss, z.view(), Positives::Labels(labels.view()))
                .unwrap();
            assert!(out.loss.is_none());
            assert!(
                close(out.per_anchor[0], scale * expected),
                "{summation:?}/{denominator:?}: {} vs {}",
                out.per_anchor[0],
                scale * expected
            );
        }
    }
}

/// One class, all positives: L_in = ln P for every anchor whatever the features (the
/// positives are the whole denominator); only-negatives has an empty denominator → 0.
#[test]
fn one_class_batch_by_hand() {
    let mut rng = common::rng("one_class");
    let z = common::features(&mut rng, (5, 2, 7), 0.5..3.0);
    let labels = Array1::from_elem(5, 42i64);
    let inside = loss_with(|b| b.summation(Summation::Inside).reduction(Reduction::None));
    let out = ReferenceBackend
        .forward(&inside, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    for l in out.per_anchor.iter() {
        assert!(close(*l, 9f64.ln()), "{l}");
    }
    for summation in [Summation::Outside, Summation::Inside] {
        let only_neg = loss_with(|b| {
            b.summation(summation)
                .denominator(Denominator::OnlyNegatives)
        });
        let (out, grad) = ReferenceBackend
            .forward_backward(
                &only_neg,
                z.view(),
                Positives::Labels(labels.view()),
                Upstream::Scalar(1.0),
            )
            .unwrap();
        assert_eq!(out.loss, Some(0.0));
        assert!(grad.iter().all(|g| *g == 0.0));
    }
    // One-positive without negatives: every positive alone in its denominator → loss 0.
    let one_pos = loss_with(|b| b.denominator(Denominator::OnePositive));
    let out = ReferenceBackend
        .forward(&one_pos, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    assert!(out.loss.unwrap().abs() < 1e-300);
    // Outside/all: finite and positive.
    let out = ReferenceBackend
        .forward(
            &SupConLoss::default(),
            z.view(),
            Positives::Labels(labels.view()),
        )
        .unwrap();
    assert!(out.loss.unwrap().is_finite() && out.loss.unwrap() > 0.0);
}

/// B = 2, V = 2, D = 2 with the positives cap: z rows (view-major) r0 = s0v0, r1 = s1v0,
/// r2 = s0v1, r3 = s1v1; one class. For anchor 0 the other view (row 2) always stays; with
/// cap 1 rows 1 and 3 are dropped; with cap 2 row 1 (lowest index) is kept and row 3 dropped.
/// Outside/all, τ = τ_b = 1: ℓ_0 = −(1/P) Σ_p (s_0p − LSE over kept rows).
#[test]
fn positives_cap_by_hand() {
    let z = array![[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-0.8, 0.6]]];
    let labels = arr1(&[3i64, 3]);
    let rows: [[f64; 2]; 4] = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]];
    let s = |i: usize, j: usize| rows[i][0] * rows[j][0] + rows[i][1] * rows[j][1];
    let lse = |js: &[usize]| js.iter().map(|&j| s(0, j).exp()).sum::<f64>().ln();
    let cap1 = -(s(0, 2) - lse(&[2]));
    let l2 = lse(&[1, 2]);
    let cap2 = -0.5 * ((s(0, 1) - l2) + (s(0, 2) - l2));
    for (cap, expected) in [(1, cap1), (2, cap2)] {
        let loss = loss_with(|b| b.positives_cap(cap).reduction(Reduction::None));
        let out = ReferenceBackend
            .forward(&loss, z.view(), Positives::Labels(labels.view()))
            .unwrap();
        assert!(close(out.per_anchor[0], expected), "cap {cap}");
    }
}

#[test]
fn permuting_samples_permutes_everything() {
    let mut rng = common::rng("permutation");
    let (b, v, d) = (7, 3, 5);
    let z = common::unit_features(&mut rng, (b, v, d));
    let labels = common::labels(&mut rng, b, 3);
    let mask = common::soft_mask(&mut rng, b);
    let perm = [3usize, 0, 6, 2, 5, 1, 4];
    let z_p = z.select(Axis(0), &perm);
    let labels_p = labels.select(Axis(0), &perm);
    let mask_p = mask.select(Axis(0), &perm).select(Axis(1), &perm);
    for loss in common::option_grid(0.1, 0.07, None)
        .into_iter()
        .filter(|l| l.no_positive() != NoPositivePolicy::Error && l.reduction() == Reduction::Mean)
    {
        for (pos, pos_p) in [
            (
                Positives::Labels(labels.view()),
                Positives::Labels(labels_p.view()),
            ),
            (Positives::Mask(mask.view()), Positives::Mask(mask_p.view())),
        ] {
            let (out, grad) = ReferenceBackend
                .forward_backward(&loss, z.view(), pos, Upstream::Scalar(1.0))
                .unwrap();
            let (out_p, grad_p) = ReferenceBackend
                .forward_backward(&loss, z_p.view(), pos_p, Upstream::Scalar(1.0))
                .unwrap();
            assert!(close(out.loss.unwrap(), out_p.loss.unwrap()), "{loss:?}");
            let grad_back = grad_p.clone();
            for (k, &p) in perm.iter().enumerate() {
                for (g, gp) in grad
                    .index_axis(Axis(0), p)
                    .iter()
                    .zip(grad_back.index_axis(Axis(0), k))
                {
                    assert!(close(*g, *gp), "{loss:?}");
                }
                // Anchor row v·B + b moves with its sample.
                for view in 0..loss_anchor_views(&loss, v) {
                    assert!(close(
                        out.per_anchor[view * b + p],
                        out_p.per_anchor[view * b + k]
                    ));
                }
            }
        }
    }
}

fn loss_anchor_views(loss: &SupConLoss, views: usize) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => views,
        ContrastMode::One => 1,
    }
}

#[test]
fn relabelling_simclr_label_sets_and_equivalent_masks_agree() {
    let mut rng = common::rng("relabel");
    let (b, v, d) = (9, 2, 6);
    let z = common::unit_features(&mut rng, (b, v, d));
    let labels = common::labels(&mut rng, b, 4);
    let relabelled = labels.mapv(|y| y.wrapping_mul(-3).wrapping_add(i64::MIN / 3));
    let identity = Array1::from_iter(0..b as i64);
    let mask = common::label_mask(&labels);
    let eye = common::label_mask(&identity);
    let classes: Vec<i64> = {
        let mut distinct = labels.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        distinct
    };
    let one_hot = ndarray::Array2::from_shape_fn((b, 70), |(s, k)| {
        classes.binary_search(&labels[s]) == Ok(k)
    });
    // Sets over K = 1, 64, 65 and 200; sample 2 has the empty set.
    let sets: Vec<ndarray::Array2<bool>> = [1, 64, 65, 200]
        .map(|k| {
            let mut sets = common::label_sets(&mut rng, b, k);
            sets.row_mut(2).fill(false);
            sets
        })
        .into();
    for cap in [None, Some(2)] {
        for loss in common::option_grid(0.2, 0.07, cap).into_iter().filter(|l| {
            l.no_positive() != NoPositivePolicy::Error && l.reduction() != Reduction::None
        }) {
            let run = |p: Positives<'_>| {
                ReferenceBackend
                    .forward_backward(&loss, z.view(), p, Upstream::Scalar(1.0))
                    .unwrap()
            };
            let same = |(a, ga): (supcon::ForwardOutput, Array3<f64>),
                        (b, gb): (supcon::ForwardOutput, Array3<f64>)| {
                assert_eq!(a.loss, b.loss, "{loss:?}");
                assert_eq!(ga, gb, "{loss:?}");
            };
            same(
                run(Positives::Labels(labels.view())),
                run(Positives::Labels(relabelled.view())),
            );
            same(
                run(Positives::Labels(labels.view())),
                run(Positives::Mask(mask.view())),
            );
            same(
                run(Positives::SimClr),
                run(Positives::Labels(identity.view())),
            );
            same(run(Positives::SimClr), run(Positives::Mask(eye.view())));
            for weight in WEIGHTS {
                // One label per sample (a one-hot row of the class index): the label relation.
                same(
                    run(Positives::Labels(labels.view())),
                    run(Positives::LabelSets {
                        sets: one_hot.view(),
                        weight,
                    }),
                );
                // Any sets: the B×B mask of their weights, built naively by the test.
                for sets in &sets {
                    let mask = common::label_set_mask(sets, weight);
                    same(
                        run(Positives::Mask(mask.view())),
                        run(Positives::LabelSets {
                            sets: sets.view(),
                            weight,
                        }),
                    );
                }
            }
        }
    }
}

const WEIGHTS: [LabelSetWeight; 3] = [
    LabelSetWeight::Any,
    LabelSetWeight::Jaccard,
    LabelSetWeight::Fraction,
];

/// Un-normalised features (norms 8–100) with τ = 0.005: logits up to 2·10⁶. Every option must
/// stay finite (the original code's max-including-self goes NaN here).
#[test]
fn no_nan_for_extreme_logits() {
    let mut rng = common::rng("extreme");
    for shape in [(6, 2, 5), (5, 1, 3), (4, 3, 9)] {
        let z = common::features(&mut rng, shape, 8.0..100.0);
        let labels = common::labels(&mut rng, shape.0, 2);
        let mask = common::soft_mask(&mut rng, shape.0);
        for positives in [
            Positives::SimClr,
            Positives::Labels(labels.view()),
            Positives::Mask(mask.view()),
        ] {
            for loss in common::option_grid(0.005, 0.07, None)
                .into_iter()
                .filter(|l| {
                    l.no_positive() != NoPositivePolicy::Error && l.reduction() != Reduction::None
                })
            {
                let (out, grad) = ReferenceBackend
                    .forward_backward(&loss, z.view(), positives, Upstream::Scalar(1.0))
                    .unwrap();
                assert!(out.loss.unwrap().is_finite(), "{loss:?}");
                assert!(out.per_anchor.iter().all(|l| l.is_finite()));
                assert!(grad.iter().all(|g| g.is_finite()), "{loss:?}");
            }
        }
    }
}

#[test]
fn views_of_one_and_policies_without_positives() {
    let mut rng = common::rng("v1");
    let z = common::unit_features(&mut rng, (6, 1, 4));
    // SimCLR with V = 1: nobody has a positive.
    let zero = SupConLoss::default();
    let (out, grad) = ReferenceBackend
        .forward_backward(&zero, z.view(), Positives::SimClr, Upstream::Scalar(1.0))
        .unwrap();
    assert_eq!(out.loss, Some(0.0));
    assert!(grad.iter().all(|g| *g == 0.0));
    let exclude = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Exclude)
        .build()
        .unwrap();
    let out = ReferenceBackend
        .forward(&exclude, z.view(), Positives::SimClr)
        .unwrap();
    assert_eq!(out.loss, Some(0.0));
    let error = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    assert_eq!(
        ReferenceBackend
            .forward(&error, z.view(), Positives::SimClr)
            .unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 0 }
    );
    // V = 1 with labels: a normal supervised batch.
    let labels = arr1(&[1i64, 2, 1, 2, 1, 3]);
    let out = ReferenceBackend
        .forward(&exclude, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    let counted = ReferenceBackend
        .forward(&zero, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    // Exclude divides by the 5 anchors with a positive, zero-and-count by all 6.
    assert!(close(out.loss.unwrap() * 5.0, counted.loss.unwrap() * 6.0));
}

#[test]
fn invalid_inputs_are_typed_errors() {
    let z = Array3::from_elem((3, 2, 4), 0.5);
    let labels = arr1(&[0i64, 1, 0]);
    let loss = SupConLoss::default();
    let fwd = |z: &Array3<f64>, p: Positives<'_>| {
        ReferenceBackend.forward(&loss, z.view(), p).unwrap_err()
    };

    assert_eq!(
        fwd(&Array3::zeros((1, 1, 4)), Positives::SimClr),
        Error::SingleRow
    );
    assert_eq!(
        fwd(&Array3::zeros((0, 2, 4)), Positives::SimClr),
        Error::EmptyFeatures { shape: [0, 2, 4] }
    );
    assert_eq!(
        fwd(&Array3::zeros((3, 2, 0)), Positives::SimClr),
        Error::EmptyFeatures { shape: [3, 2, 0] }
    );
    assert_eq!(
        fwd(&z, Positives::Labels(arr1(&[0i64, 1]).view())),
        Error::LabelsLength {
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        fwd(
            &z,
            Positives::Mask(arr2(&[[1.0f32, 0.0], [0.0, 1.0]]).view())
        ),
        Error::MaskShape {
            expected: 3,
            got: [2, 2]
        }
    );
    let mut bad_mask = ndarray::Array2::<f32>::eye(3);
    bad_mask[[1, 2]] = -0.5;
    assert_eq!(
        fwd(&z, Positives::Mask(bad_mask.view())),
        Error::InvalidMaskWeight {
            row: 1,
            col: 2,
            value: -0.5
        }
    );
    bad_mask[[1, 2]] = f32::NAN;
    assert!(matches!(
        fwd(&z, Positives::Mask(bad_mask.view())),
        Error::InvalidMaskWeight { row: 1, col: 2, .. }
    ));
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut zb = z.clone();
        zb[[2, 1, 3]] = bad;
        assert_eq!(
            fwd(&zb, Positives::SimClr),
            Error::NonFiniteFeature {
                sample: 2,
                view: 1,
                dim: 3
            }
        );
    }

    // Configurations.
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            SupConLoss::builder().temperature(t).build(),
            Err(Error::InvalidTemperature(_))
        ));
        assert!(matches!(
            SupConLoss::builder().base_temperature(t).build(),
            Err(Error::InvalidBaseTemperature(_))
        ));
    }
    assert_eq!(
        SupConLoss::builder().positives_cap(0).build(),
        Err(Error::InvalidPositivesCap)
    );

    // Backward: upstream and state mismatches.
    let out = ReferenceBackend
        .forward(&loss, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    let bwd = |l: &SupConLoss, z: &Array3<f64>, u: Upstream<'_>| {
        ReferenceBackend
            .backward(l, z.view(), Positives::Labels(labels.view()), &out.state, u)
            .unwrap_err()
    };
    let per_anchor = Array1::ones(6);
    assert!(matches!(
        bwd(&loss, &z, Upstream::PerAnchor(per_anchor.view())),
        Error::UpstreamMismatch { .. }
    ));
    assert_eq!(
        bwd(&loss, &z, Upstream::Scalar(f64::NAN)),
        Error::NonFiniteUpstream
    );
    let other = SupConLoss::builder().temperature(0.5).build().unwrap();
    assert!(matches!(
        bwd(&other, &z, Upstream::Scalar(1.0)),
        Error::StateMismatch(_)
    ));
    let z_other = Array3::from_elem((3, 2, 5), 0.5);
    assert!(matches!(
        bwd(&loss, &z_other, Upstream::Scalar(1.0)),
        Error::StateMismatch(_)
    ));

    let none = SupConLoss::builder()
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let out = ReferenceBackend
        .forward(&none, z.view(), Positives::Labels(labels.view()))
        .unwrap();
    let run = |u: Upstream<'_>| {
        ReferenceBackend.backward(
            &none,
            z.view(),
            Positives::Labels(labels.view()),
            &out.state,
            u,
        )
    };
    assert!(matches!(
        run(Upstream::Scalar(1.0)),
        Err(Error::UpstreamMismatch { .. })
    ));
    assert!(matches!(
        run(Upstream::PerAnchor(Array1::ones(5).view())),
        Err(Error::UpstreamMismatch { .. })
    ));
    let mut u = Array1::ones(6);
    u[3] = f64::INFINITY;
    assert_eq!(
        run(Upstream::PerAnchor(u.view())),
        Err(Error::NonFiniteUpstream)
    );
    assert!(run(Upstream::PerAnchor(Array1::ones(6).view())).is_ok());
}

#[test]
fn half_and_strided_inputs_match_f64() {
    let mut rng = common::rng("dtypes");
    let z = common::unit_features(&mut rng, (5, 2, 3));
    let labels = common::labels(&mut rng, 5, 2);
    let loss = SupConLoss::default();
    let pos = Positives::Labels(labels.view());
    // Half inputs: exactly the f64 result on the rounded values.
    let z16 = z.mapv(half::f16::from_f64);
    let (o16, g16) = ReferenceBackend
        .forward_backward(&loss, z16.view(), pos, Upstream::Scalar(1.0))
        .unwrap();
    let (o64, g64) = ReferenceBackend
        .forward_backward(
            &loss,
            z16.mapv(half::f16::to_f64).view(),
            pos,
            Upstream::Scalar(1.0),
        )
        .unwrap();
    assert_eq!(o16.loss, o64.loss);
    assert!(g16.iter().zip(g64.iter()).all(|(a, b)| *a == *b as f32));
    let zb = z.mapv(half::bf16::from_f64);
    assert!(ReferenceBackend
        .forward(&loss, zb.view(), pos)
        .unwrap()
        .loss
        .unwrap()
        .is_finite());
    // A strided (transposed-storage) view gives the same answer as the contiguous one.
    let mut transposed = Array3::<f64>::zeros((3, 2, 5));
    transposed.assign(&z.view().reversed_axes());
    let strided = transposed.view().reversed_axes();
    assert!(!strided.is_standard_layout());
    let a = ReferenceBackend.forward(&loss, strided, pos).unwrap();
    let b = ReferenceBackend.forward(&loss, z.view(), pos).unwrap();
    assert_eq!(a.loss, b.loss);
}

/// The oracle refuses f64 logits it cannot represent (norm 1e160: ‖z‖² overflows) instead of
/// returning 0 or NaN.
#[test]
fn logits_beyond_the_f64_range_are_refused() {
    let z = Array3::from_shape_fn((3, 2, 4), |(b, v, d)| ((b + v + d) as f64 + 1.0) * 1e160);
    let error = ReferenceBackend
        .forward(&SupConLoss::default(), z.view(), Positives::SimClr)
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Unsupported {
                backend: "reference",
                capability: supcon::Capability::LogitRange { .. }
            }
        ),
        "{error:?}"
    );
}
