//! What only the emulated kernels have. Their agreement with the reference on every option,
//! shape and element type is `tests/backends.rs`; here:
//!
//! - poisoned outputs: emulated "device" memory starts as NaN bytes, so every output element a
//!   kernel fails to write shows up as NaN, on shapes that cut the 64-row tiles, the 32-element
//!   depth stages and the 128-column gradient chunks at every possible place;
//! - exact zeros: where a loss does not depend on the logits, its gradient is exactly 0.
//!
//! Both for f32 features (the f32 kernels) and f16 and bf16 (the tensor-core kernels), with
//! rows of every alignment (16-byte copies for D a multiple of 8, element loads otherwise).
//!
//! Inputs are fresh random values (the seed is printed; SUPCON_TEST_SEED replays a run).
#![cfg(feature = "emulation")]

mod common;

use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3};
use rand::RngExt;
use supcon::{
    Backend, BatchShape, ContrastMode, Denominator, Element, EmulatedBackend, ForwardOutput,
    GradElement, Positives, Precision, Reduction, Summation, SupConLoss, Upstream,
};

/// The gradient of `z` as f32 features (the f32 kernels, and tensor cores under
/// `Precision::Bf16x3`), f16 and bf16 features (tensor cores).
fn gradients_by_type(
    loss: &SupConLoss,
    z: &Array3<f32>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
) -> Vec<(&'static str, ForwardOutput, Vec<f32>)> {
    fn run<T: Element>(
        precision: Precision,
        loss: &SupConLoss,
        z: &Array3<T>,
        positives: Positives<'_>,
        upstream: Upstream<'_>,
    ) -> (ForwardOutput, Vec<f32>) {
        let (out, grad) = EmulatedBackend::with_precision(precision)
            .forward_backward(loss, z.view(), positives, upstream)
            .unwrap();
        (out, grad.iter().map(|g| g.to_f64() as f32).collect())
    }
    let auto = Precision::Auto;
    let (f32_out, f32_grad) = run(auto, loss, z, positives, upstream);
    let (split_out, split_grad) = run(Precision::Bf16x3, loss, z, positives, upstream);
    let (f16_out, f16_grad) = run(auto, loss, &z.mapv(f16::from_f32), positives, upstream);
    let (bf16_out, bf16_grad) = run(auto, loss, &z.mapv(bf16::from_f32), positives, upstream);
    vec![
        ("f32", f32_out, f32_grad),
        ("f32 bf16x3", split_out, split_grad),
        ("f16", f16_out, f16_grad),
        ("bf16", bf16_out, bf16_grad),
    ]
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

/// Every statistic, loss and gradient entry is written (no NaN poison left), on ragged shapes,
/// for every kind of positives and the variants that take different kernel paths.
#[test]
fn every_output_element_is_written() {
    let mut rng = common::rng("every_output_element_is_written");
    let shapes = [
        (2, 1, 1),
        (1, 2, 3),
        (31, 2, 130),
        (43, 3, 17),
        (32, 2, 33),
        (97, 3, 1),
        (70, 1, 64),
        (20, 3, 136),
        // 9 contrast tiles: the forward splits its columns in 2 shares (and merges them).
        (260, 2, 9),
    ];
    for (b, v, d) in shapes {
        let z = common::unit_features(&mut rng, (b, v, d)).mapv(|x| x as f32);
        let labels = common::labels(&mut rng, b, (b / 4).max(2));
        let mask = common::soft_mask(&mut rng, b);
        let upstream = Array1::from_shape_fn(b * v, |i| 0.5 + i as f64);
        for (mode, summation, denominator, reduction) in [
            (
                ContrastMode::All,
                Summation::Outside,
                Denominator::All,
                Reduction::Mean,
            ),
            (
                ContrastMode::One,
                Summation::Inside,
                Denominator::OnlyNegatives,
                Reduction::None,
            ),
        ] {
            // The second configuration under `normalize` too: its row scales and projection.
            let loss = SupConLoss::builder()
                .contrast_mode(mode)
                .summation(summation)
                .denominator(denominator)
                .reduction(reduction)
                .normalize(mode == ContrastMode::One)
                .build()
                .unwrap();
            let anchors = BatchShape::new(b, v, d).unwrap().anchors(mode);
            let anchors = upstream.slice(ndarray::s![..anchors]);
            let upstream = match reduction {
                Reduction::None => Upstream::PerAnchor(anchors),
                _ => Upstream::Scalar(1.0),
            };
            for positives in [
                Positives::SimClr,
                Positives::Labels(labels.view()),
                Positives::Mask(mask.view()),
            ] {
                for (dtype, out, grad) in gradients_by_type(&loss, &z, positives, upstream) {
                    let what = format!("{dtype} {:?} {loss:?} {positives:?}", (b, v, d));
                    assert_forward_written(&out, &what);
                    assert!(
                        grad.iter().all(|g| g.is_finite()),
                        "{what}: unwritten gradient"
                    );
                }
            }
        }
    }
}

/// Where an anchor's loss does not depend on the logits, its gradient is exactly zero, not
/// rounding noise: a one-class batch under L_in with the full denominator (ℓ_i = c·log P_i), and
/// two rows that are each other's only contrast and positive, with any mask weight.
#[test]
fn logit_independent_losses_have_exactly_zero_gradients() {
    let mut rng = common::rng("exact_zero");
    let one_class = Array1::from_elem(37, 42i64);
    let z = common::unit_features(&mut rng, (37, 2, 19)).mapv(|x| x as f32);
    let pair = common::unit_features(&mut rng, (2, 1, 16)).mapv(|x| x as f32);
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
            let up = Upstream::Scalar(1.0);
            for (dtype, _, grad) in gradients_by_type(&loss, features, positives, up) {
                assert!(
                    grad.iter().all(|&g| g == 0.0),
                    "{dtype} {what} {summation:?}: gradient {grad:?}"
                );
            }
        }
    }
}
