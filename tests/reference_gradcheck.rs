//! The reference backend's analytic gradient against central finite differences, for every
//! combination of contrast mode × summation × denominator × positives source × no-positive
//! policy × reduction (× positives cap), label sets in each weight mode and the fused
//! normalisation included, on fresh random inputs of several ragged sizes.

mod common;

use ndarray::{Array1, Array3};
use supcon::{
    Backend, Error, LabelSetWeight, Positives, Reduction, ReferenceBackend, SupConLoss, Upstream,
};

/// Σ u_i ℓ_i (reduction none) or u·L: the objective whose gradient `backward` returns.
fn objective(
    loss: &SupConLoss,
    z: &Array3<f64>,
    positives: Positives<'_>,
    upstream: &Upstream,
) -> f64 {
    let out = ReferenceBackend
        .forward(loss, z.view(), positives)
        .expect("forward");
    match (upstream, out.loss) {
        (Upstream::Scalar(u), Some(l)) => u * l,
        (Upstream::PerAnchor(u), None) => u.dot(&out.per_anchor),
        _ => unreachable!("upstream chosen to match the reduction"),
    }
}

/// Does some anchor row lack a positive? Computed from the definitions, independently of the
/// backend.
fn some_anchor_lacks_positive(
    loss: &SupConLoss,
    shape: (usize, usize, usize),
    positives: &Positives<'_>,
) -> bool {
    let (b, v, _) = shape;
    let anchors = match loss.contrast_mode() {
        supcon::ContrastMode::All => b * v,
        supcon::ContrastMode::One => b,
    };
    (0..anchors).any(|i| {
        let si = i % b;
        !(0..b * v).any(|j| {
            let sj = j % b;
            j != i
                && match positives {
                    Positives::SimClr => si == sj,
                    Positives::Labels(l) => l[si] == l[sj],
                    Positives::Mask(m) => m[[si, sj]] > 0.0,
                    // Every weight mode makes a positive of a shared label.
                    Positives::LabelSets { sets, .. } => {
                        si == sj || sets.row(si).iter().zip(sets.row(sj)).any(|(&a, &c)| a && c)
                    }
                }
        })
    })
}

fn check_gradients(shape: (usize, usize, usize), rng: &mut rand::rngs::StdRng) -> usize {
    let z = common::features(rng, shape, 0.5..1.5);
    let labels = common::labels(rng, shape.0, 2);
    let mask = common::soft_mask(rng, shape.0);
    let sets = common::label_sets(rng, shape.0, 70);
    let set_positives = |weight| Positives::LabelSets {
        sets: sets.view(),
        weight,
    };
    // (positives, normalize): every source plain, three of them normalised too.
    let sources = [
        (Positives::SimClr, false),
        (Positives::Labels(labels.view()), false),
        (Positives::Mask(mask.view()), false),
        (set_positives(LabelSetWeight::Any), false),
        (set_positives(LabelSetWeight::Jaccard), false),
        (set_positives(LabelSetWeight::Fraction), false),
        (Positives::Labels(labels.view()), true),
        (Positives::Mask(mask.view()), true),
        (set_positives(LabelSetWeight::Jaccard), true),
    ];
    let h = 1e-5;
    let mut checked = 0;
    for (positives, normalize) in sources {
        for cap in [None, Some(1), Some(2)] {
            for loss in common::option_grid(0.3, 0.45, cap) {
                let loss = loss.to_builder().normalize(normalize).build().unwrap();
                let anchors = match loss.contrast_mode() {
                    supcon::ContrastMode::All => shape.0 * shape.1,
                    supcon::ContrastMode::One => shape.0,
                };
                let per_anchor_upstream = Array1::from_shape_fn(anchors, |i| 0.5 + 0.1 * i as f64);
                let upstream = match loss.reduction() {
                    Reduction::None => Upstream::PerAnchor(per_anchor_upstream.view()),
                    _ => Upstream::Scalar(0.7),
                };
                let result =
                    ReferenceBackend.forward_backward(&loss, z.view(), positives, upstream);
                let lacks = some_anchor_lacks_positive(&loss, shape, &positives);
                let (_, grad) = match result {
                    Err(Error::AnchorWithoutPositives { .. }) => {
                        assert!(
                            loss.no_positive() == supcon::NoPositivePolicy::Error && lacks,
                            "unexpected AnchorWithoutPositives for {loss:?}"
                        );
                        checked += 1;
                        continue;
                    }
                    other => other.expect("forward_backward"),
                };
                assert!(
                    !(loss.no_positive() == supcon::NoPositivePolicy::Error && lacks),
                    "policy Error must fail when an anchor lacks positives: {loss:?}"
                );
                let mut numeric = Array3::<f64>::zeros(shape);
                for idx in ndarray::indices(shape) {
                    let mut plus = z.clone();
                    plus[idx] += h;
                    let mut minus = z.clone();
                    minus[idx] -= h;
                    numeric[idx] = (objective(&loss, &plus, positives, &upstream)
                        - objective(&loss, &minus, positives, &upstream))
                        / (2.0 * h);
                }
                let scale = grad.iter().fold(1.0f64, |m, g| m.max(g.abs()));
                let worst = grad
                    .iter()
                    .zip(numeric.iter())
                    .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()));
                // Central differences: O(h²·f''') truncation plus O(ε/h) rounding ≈ 1e-9 here.
                assert!(
                    worst <= 1e-6 * scale,
                    "gradient off by {worst:e} (scale {scale}) for {loss:?}, positives {positives:?}, shape {shape:?}"
                );
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn analytic_gradient_matches_finite_differences_for_every_option() {
    let mut rng = common::rng("gradcheck");
    let mut checked = 0;
    for shape in [(5, 1, 3), (4, 2, 5), (3, 3, 7)] {
        checked += check_gradients(shape, &mut rng);
    }
    // 3 shapes × 9 (positives, normalize) × 3 caps × 108 option combinations.
    assert_eq!(checked, 3 * 9 * 3 * 108);
}
