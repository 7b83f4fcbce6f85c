//! Property-based tests: random shapes, options, element types and extreme values on every
//! backend, each either a typed error or a finite result within the tolerance model of
//! `common::tolerance` of the f64 reference.
//!
//! The draws span feature norms from 1e-3 to 1e19 (beyond every backend's accepted logit range,
//! which must then refuse), τ and τ_b from 1e-4 to 1e4, mask weights from the smallest subnormal
//! to 1e38 (within one mask a span of 1e10, the range docs/math.md guarantees: the f32 backends
//! keep an anchor's weights relative to its largest), and upstream gradients up to 1e30; half of
//! the cases run under `normalize`, where the norms reach the loss only through the row scales.
//! Bounded: a few hundred cases, seconds in the default test run. `SUPCON_TEST_SEED` replays a
//! run, `SUPCON_PROPTEST_CASES` sets the count.

mod common;

use common::tolerance::{Precision, Tolerance};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use supcon::{
    Backend, ContrastMode, Denominator, Element, Error, GradElement, NoPositivePolicy, Positives,
    Reduction, ReferenceBackend, Summation, SupConLoss, Upstream,
};

/// One drawn problem; the values come from `seed`.
#[derive(Debug, Clone)]
struct Case {
    shape: (usize, usize, usize),
    dtype: u8,
    /// log10 of the smallest and largest row norm.
    norms: (f64, f64),
    log_temperature: f64,
    log_base_temperature: f64,
    options: (u8, u8, u8, u8, u8, u8),
    /// 0 SimCLR, 1 labels, 2 mask.
    positives: u8,
    classes: usize,
    /// log10 of the mask's smallest weight (its largest is 1e10 above, capped at 1e38).
    log_weight: f64,
    /// log10 of |u|.
    log_upstream: f64,
    /// The fused normalisation (the draws' norms then reach the loss only through it).
    normalize: bool,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        (1usize..=10, 1usize..=3, 1usize..=24),
        0u8..4,
        (-3.0f64..19.0, 0.0f64..3.0),
        (-4.0f64..4.0, -4.0f64..4.0),
        (0u8..2, 0u8..2, 0u8..3, 0u8..4, 0u8..3, 0u8..3),
        (0u8..3, 1usize..=4, -45.0f64..28.0),
        (-3.0f64..30.0, any::<bool>(), any::<u64>()),
    )
        .prop_map(
            |(shape, dtype, (low, spread), temperatures, options, positives, upstream)| Case {
                shape,
                dtype,
                norms: (low, low + spread),
                log_temperature: temperatures.0,
                log_base_temperature: temperatures.1,
                options,
                positives: positives.0,
                classes: positives.1,
                log_weight: positives.2,
                log_upstream: upstream.0,
                normalize: upstream.1,
                seed: upstream.2,
            },
        )
}

impl Case {
    fn loss(&self) -> SupConLoss {
        let (mode, summation, denominator, cap, policy, reduction) = self.options;
        let mut builder = SupConLoss::builder()
            .temperature(10f64.powf(self.log_temperature))
            .base_temperature(10f64.powf(self.log_base_temperature))
            .contrast_mode([ContrastMode::All, ContrastMode::One][mode as usize])
            .summation([Summation::Outside, Summation::Inside][summation as usize])
            .denominator(
                [
                    Denominator::All,
                    Denominator::OnlyNegatives,
                    Denominator::OnePositive,
                ][denominator as usize],
            )
            .no_positive(
                [
                    NoPositivePolicy::ZeroAndCount,
                    NoPositivePolicy::Exclude,
                    NoPositivePolicy::Error,
                ][policy as usize],
            )
            .reduction([Reduction::Mean, Reduction::Sum, Reduction::None][reduction as usize])
            .normalize(self.normalize);
        if cap > 0 {
            builder = builder.positives_cap(cap as usize);
        }
        builder.build().expect("valid options")
    }

    /// Features, labels, mask and per-anchor upstream values.
    fn data(&self) -> (Array3<f64>, Array1<i64>, Array2<f32>, Array1<f64>) {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let (b, v, d) = self.shape;
        let mut z = Array3::from_shape_fn((b, v, d), |_| common::gaussian(&mut rng));
        for mut row in z.rows_mut() {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
            let target = 10f64.powf(rng.random_range(self.norms.0..=self.norms.1));
            row.mapv_inplace(|x| x * target / norm);
        }
        let labels = Array1::from_shape_fn(b, |_| rng.random_range(0..self.classes as i64));
        let mask = Array2::from_shape_fn((b, b), |_| {
            if rng.random::<f64>() < 0.3 {
                0.0
            } else {
                let exponent = self.log_weight + rng.random_range(0.0..10.0);
                (10f64.powf(exponent).min(1e38) as f32).max(f32::from_bits(1))
            }
        });
        let anchors = match self.loss().contrast_mode() {
            ContrastMode::All => b * v,
            ContrastMode::One => b,
        };
        let magnitude = 10f64.powf(self.log_upstream);
        let upstream = Array1::from_shape_fn(anchors, |_| magnitude * rng.random_range(-1.0..1.0));
        (z, labels, mask, upstream)
    }
}

/// What one backend run of a case gave.
enum Outcome {
    /// Compared with the reference within the tolerance model.
    Compared,
    /// A typed error of the backend (the reference succeeded or not).
    Refused,
    /// The reference refused what the backend computed (finite, as asserted).
    ReferenceRefused,
}

fn check<B: Backend>(
    backend: &B,
    precision: Precision,
    case: &Case,
) -> Result<Outcome, TestCaseError> {
    let (z, labels, mask, per_anchor) = case.data();
    let loss = case.loss();
    let positives = match case.positives {
        0 => Positives::SimClr,
        1 => Positives::Labels(labels.view()),
        _ => Positives::Mask(mask.view()),
    };
    let upstream = match loss.reduction() {
        Reduction::None => Upstream::PerAnchor(per_anchor.view()),
        _ => Upstream::Scalar(per_anchor[0]),
    };
    match case.dtype {
        0 => check_as(
            backend,
            precision,
            &loss,
            &z.mapv(|x| x as f32),
            positives,
            upstream,
        ),
        1 => check_as(
            backend,
            precision,
            &loss,
            &z.mapv(f16::from_f64),
            positives,
            upstream,
        ),
        2 => check_as(
            backend,
            precision,
            &loss,
            &z.mapv(bf16::from_f64),
            positives,
            upstream,
        ),
        _ => check_as(backend, precision, &loss, &z, positives, upstream),
    }
}

fn check_as<B: Backend, T: Element>(
    backend: &B,
    precision: Precision,
    loss: &SupConLoss,
    z: &Array3<T>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
) -> Result<Outcome, TestCaseError> {
    let got = backend.forward_backward(loss, z.view(), positives, upstream);
    let want = ReferenceBackend.forward_backward(loss, z.view(), positives, upstream);
    Ok(match (got, want) {
        (Ok(got), Ok(want)) => {
            let max_weight = match positives {
                Positives::Mask(mask) => mask.iter().fold(1.0f64, |m, &w| m.max(f64::from(w))),
                _ => 1.0,
            };
            let tolerance = Tolerance::new(
                precision,
                loss,
                z,
                max_weight,
                upstream,
                want.0.state.mean_denominator(),
            );
            tolerance.check(backend.name(), &got, &want);
            Outcome::Compared
        }
        (Err(error), _) => {
            // Every error is a typed one; what must never happen is a panic or a non-finite Ok.
            let _: Error = error;
            Outcome::Refused
        }
        (Ok((out, grad)), Err(_)) => {
            prop_assert!(out.per_anchor.iter().all(|l| l.is_finite()));
            prop_assert!(grad.iter().all(|g| g.to_f64().is_finite()));
            Outcome::ReferenceRefused
        }
    })
}

/// The kernels' subset of a case: f32 for f64 features (what they refuse is tested in
/// `tests/backends.rs`).
#[cfg(feature = "emulation")]
fn kernel_case(mut case: Case) -> Case {
    case.dtype %= 3;
    case
}

/// Runs `cases` drawn cases, adapted by `adapt`, on `backend` (the seed as `common::rng` prints
/// it) and reports how they ended; at least a fifth must have been compared with the reference.
fn run_cases<B: Backend>(
    test: &str,
    backend: &B,
    precision: Precision,
    adapt: fn(Case) -> Case,
    cases_count: u32,
) {
    let seed: u64 = {
        let mut rng = common::rng(test);
        rng.random()
    };
    let cases_count = std::env::var("SUPCON_PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases_count);
    let config = Config {
        cases: cases_count,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let counts = std::cell::RefCell::new([0usize; 3]);
    let result = runner.run(&cases().prop_map(adapt), |case| {
        let outcome = check(backend, precision, &case)?;
        counts.borrow_mut()[outcome as usize] += 1;
        Ok(())
    });
    let [compared, refused, reference_refused] = *counts.borrow();
    eprintln!(
        "{test}: {compared} compared, {refused} refused by the backend, {reference_refused} by \
         the reference only"
    );
    if let Err(failure) = result {
        panic!("{test}: {failure}");
    }
    assert!(
        compared * 5 >= compared + refused + reference_refused,
        "{test}: too few cases reached a comparison"
    );
}

#[test]
fn cpu_results_are_typed_errors_or_within_tolerance() {
    run_cases(
        "cpu_properties",
        &supcon::CpuBackend,
        Precision::F32,
        |c| c,
        400,
    );
}

#[test]
fn reference_results_are_typed_errors_or_self_consistent() {
    run_cases(
        "reference_properties",
        &ReferenceBackend,
        Precision::F64,
        |c| c,
        200,
    );
}

/// The default kernels: tensor cores for f16 and bf16.
#[cfg(feature = "emulation")]
#[test]
fn emulated_results_are_typed_errors_or_within_tolerance() {
    run_cases(
        "emulated_properties",
        &supcon::EmulatedBackend::default(),
        Precision::TensorCores,
        kernel_case,
        150,
    );
}

/// The f32 kernels for every element type.
#[cfg(feature = "emulation")]
#[test]
fn emulated_f32_results_are_typed_errors_or_within_tolerance() {
    run_cases(
        "emulated_f32_properties",
        &supcon::EmulatedBackend::with_precision(supcon::Precision::F32),
        Precision::F32,
        kernel_case,
        150,
    );
}
