//! One correctness suite, instantiated for every backend in this build (reference, cpu, emulated
//! kernels, CUDA): each option a backend supports must agree with the f64 reference on fresh
//! random inputs of ragged sizes, within the one tolerance model of `common::tolerance`; each
//! option it does not support must be a typed `Error::Unsupported`, never a wrong answer.
//!
//! Inputs are fresh random values on every run (the seed is printed; SUPCON_TEST_SEED replays
//! one). What only one backend has lives in its own file: `cpu_backend.rs` (thread counts,
//! strided views), `emulated_kernels.rs` (poisoned outputs, exact zeros), `cuda.rs` (the device
//! API, streams).

mod common;

use common::tolerance::{Precision, Tolerance, Worst};
use common::upstream_for;
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3};
use rand::rngs::StdRng;
use rand::RngExt;
use supcon::{
    Backend, ContrastMode, DType, Denominator, Element, Error, LabelSetWeight, NoPositivePolicy,
    Positives, Reduction, ReferenceBackend, Summation, SupConLoss, Upstream,
};

type Shape = (usize, usize, usize);

/// A backend under test and the shapes that exercise its tiling.
struct Subject<B> {
    backend: B,
    /// Whether it implements (options, positives, element type); the rest must be
    /// `Error::Unsupported`.
    supports: fn(&SupConLoss, &Positives<'_>, DType) -> bool,
    /// The element types this suite compares (others are another suite's: the same kernels).
    covers: fn(DType) -> bool,
    precision: Precision,
    /// Small ragged shapes for the whole option grid.
    option_shapes: &'static [Shape],
    /// Shapes across several of its tiles, for one in nine of the grid's configurations (the
    /// policy and the reduction do not enter the tile loops).
    tile_shapes: &'static [Shape],
    /// Shapes on both sides of its tile, lane and stage boundaries, for the default options.
    ragged_shapes: &'static [Shape],
}

/// Which positives a case uses.
#[derive(Debug, Clone, Copy)]
enum Source {
    SimClr,
    Labels,
    Mask,
    LabelSets(LabelSetWeight),
}

const SOURCES: [Source; 6] = [
    Source::SimClr,
    Source::Labels,
    Source::Mask,
    Source::LabelSets(LabelSetWeight::Any),
    Source::LabelSets(LabelSetWeight::Jaccard),
    Source::LabelSets(LabelSetWeight::Fraction),
];

/// The label counts K the label sets are drawn over: one label, either side of a 64-bit word
/// and several words.
const LABEL_COUNTS: [usize; 5] = [1, 63, 64, 65, 200];

/// Labels, a soft asymmetric mask and label sets for one batch.
struct Relations {
    labels: Array1<i64>,
    mask: Array2<f32>,
    sets: Array2<bool>,
}

impl Relations {
    fn new(rng: &mut StdRng, batch: usize, classes: usize) -> Self {
        let labels = LABEL_COUNTS[rng.random_range(0..LABEL_COUNTS.len())];
        Relations {
            labels: common::labels(rng, batch, classes),
            mask: common::soft_mask(rng, batch),
            sets: common::label_sets(rng, batch, labels),
        }
    }

    fn positives(&self, source: Source) -> Positives<'_> {
        match source {
            Source::SimClr => Positives::SimClr,
            Source::Labels => Positives::Labels(self.labels.view()),
            Source::Mask => Positives::Mask(self.mask.view()),
            Source::LabelSets(weight) => Positives::LabelSets {
                sets: self.sets.view(),
                weight,
            },
        }
    }
}

/// The largest weight a kind of positives gives a pair.
fn max_weight(positives: &Positives<'_>) -> f64 {
    match positives {
        Positives::Mask(mask) => mask.iter().fold(1.0f64, |m, &w| m.max(f64::from(w))),
        _ => 1.0,
    }
}

/// The backend against the reference on the same values: within the tolerance model, the same
/// error, or `Unsupported` where the subject says so. Returns the error/bound ratio.
fn compare<B: Backend, T: Element>(
    subject: &Subject<B>,
    loss: &SupConLoss,
    z: &Array3<T>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
    what: &str,
) -> f64 {
    if !(subject.covers)(T::DTYPE) {
        return 0.0;
    }
    let name = subject.backend.name();
    let result = subject
        .backend
        .forward_backward(loss, z.view(), positives, upstream);
    if !(subject.supports)(loss, &positives, T::DTYPE) {
        assert!(
            matches!(result, Err(Error::Unsupported { backend, .. }) if backend == name),
            "{name}: {what}: unsupported options must be a typed error, got {result:?}"
        );
        return 0.0;
    }
    let expected = ReferenceBackend.forward_backward(loss, z.view(), positives, upstream);
    match (result, expected) {
        (Ok(got), Ok(want)) => {
            let r_prime = want.0.state.mean_denominator();
            Tolerance::new(
                subject.precision,
                loss,
                z,
                max_weight(&positives),
                upstream,
                r_prime,
            )
            .check(&format!("{name}: {what}"), &got, &want)
        }
        (Err(got), Err(want)) => {
            assert_eq!(got, want, "{name}: {what}: a different error");
            0.0
        }
        (got, want) => panic!(
            "{name}: {what}: {:?} vs the reference's {:?}",
            got.map(|o| o.0.loss),
            want.map(|o| o.0.loss)
        ),
    }
}

fn anchors_of(loss: &SupConLoss, (b, v, _): Shape) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => b * v,
        ContrastMode::One => b,
    }
}

/// Every option combination (contrast mode × summation × denominator × cap × policy ×
/// reduction) × every kind of positives, f32 features: the whole grid on the option shapes, one
/// configuration in nine on the tile shapes. With `SUPCON_TEST_REDUCED_GRID=1` (the CI's second
/// emulated run, compiled with FMA contraction), one in nine on every shape: each pairing of
/// contrast mode, summation and denominator still runs; only the policy and the reduction,
/// which do not enter the kernels, are thinned.
fn every_option_matches_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    let mut compared = 0;
    let whole_grid = std::env::var_os("SUPCON_TEST_REDUCED_GRID").is_none_or(|v| v == "0");
    let shapes = subject
        .option_shapes
        .iter()
        .map(|&shape| (shape, true))
        .chain(subject.tile_shapes.iter().map(|&shape| (shape, false)));
    for ((b, v, d), every_configuration) in shapes {
        let z = common::unit_features(rng, (b, v, d)).mapv(|x| x as f32);
        // Few classes: most anchors have positives, some samples are alone in their class.
        let relations = Relations::new(rng, b, (b / 3).clamp(2, 40));
        let upstream = Array1::from_shape_fn(b * v, |i| 1.0 - 0.37 * (i % 5) as f64);
        for cap in [None, Some(1), Some(3)] {
            let grid = common::option_grid(0.1, 0.07, cap);
            let kept = grid
                .iter()
                .enumerate()
                .filter(|(k, _)| (every_configuration && whole_grid) || k % 9 == (k / 9) % 9);
            for (k, loss) in kept {
                let per_anchor = upstream
                    .slice(ndarray::s![..anchors_of(loss, (b, v, d))])
                    .to_owned();
                for source in SOURCES {
                    // Caps and label sets: one configuration in nine, as on the tile shapes
                    // (the policy and the reduction do not enter the tile loops; the
                    // normalisation test covers caps and label sets under every summation
                    // and denominator again).
                    let reduced = cap.is_some() || matches!(source, Source::LabelSets(_));
                    if reduced && k % 9 != (k / 9) % 9 {
                        continue;
                    }
                    let what = format!("{loss:?} {source:?} {:?}", (b, v, d));
                    let ratio = compare(
                        subject,
                        loss,
                        &z,
                        relations.positives(source),
                        upstream_for(loss, &per_anchor),
                        &what,
                    );
                    worst.record(ratio, &what);
                    compared += 1;
                }
            }
        }
    }
    eprintln!("{}: {compared} cases", subject.backend.name());
    worst.report("every_option");
}

/// The default options on the subject's ragged shapes: f32 with every kind of positives, f16 and
/// bf16 with one.
fn ragged_shapes_match_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    let loss = SupConLoss::default();
    let up = Upstream::Scalar(1.0);
    for (index, &(b, v, d)) in subject.ragged_shapes.iter().enumerate() {
        let z = common::unit_features(rng, (b, v, d));
        let relations = Relations::new(rng, b, (b / 4).max(2));
        for source in SOURCES {
            let what = format!("f32 {:?} {source:?}", (b, v, d));
            let ratio = compare(
                subject,
                &loss,
                &z.mapv(|x| x as f32),
                relations.positives(source),
                up,
                &what,
            );
            worst.record(ratio, &what);
        }
        let positives = relations.positives(SOURCES[index % SOURCES.len()]);
        let what = format!("{:?} {positives:?}", (b, v, d));
        let ratio = compare(subject, &loss, &z.mapv(f16::from_f64), positives, up, &what);
        worst.record(ratio, &format!("f16 {what}"));
        let ratio = compare(
            subject,
            &loss,
            &z.mapv(bf16::from_f64),
            positives,
            up,
            &what,
        );
        worst.record(ratio, &format!("bf16 {what}"));
    }
    worst.report("ragged_shapes");
}

/// f16, bf16 and f64 features under every contrast mode, summation and denominator, every kind
/// of positives.
fn element_types_under_every_variant_match_reference<B: Backend>(
    subject: &Subject<B>,
    rng: &mut StdRng,
) {
    let mut worst = Worst::default();
    let (b, v, d) = (45, 2, 40);
    let z = common::unit_features(rng, (b, v, d));
    let relations = Relations::new(rng, b, 9);
    let up = Upstream::Scalar(1.0);
    let variants = common::option_grid(0.2, 0.07, None)
        .into_iter()
        .filter(|loss| {
            loss.no_positive() == NoPositivePolicy::ZeroAndCount
                && loss.reduction() == Reduction::Mean
        });
    for loss in variants {
        for source in SOURCES {
            let positives = relations.positives(source);
            let what = format!("{loss:?} {source:?}");
            let ratios = [
                compare(subject, &loss, &z.mapv(f16::from_f64), positives, up, &what),
                compare(
                    subject,
                    &loss,
                    &z.mapv(bf16::from_f64),
                    positives,
                    up,
                    &what,
                ),
                compare(subject, &loss, &z, positives, up, &what),
            ];
            for (dtype, ratio) in ["f16", "bf16", "f64"].iter().zip(ratios) {
                worst.record(ratio, &format!("{dtype} {what}"));
            }
        }
    }
    worst.report("element_types");
}

/// τ = 0.005 and norms 5–100: logits up to 2·10⁶, far beyond the half range (65504), in every
/// element type. Everything stays finite and within the model (whose bound grows with s_max).
fn large_logits_stay_finite_and_accurate<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    // N = 460: 8 contrast tiles, so the kernels' forward splits its columns in 2 shares.
    let (b, v, d) = (230, 2, 24);
    let z = common::features(rng, (b, v, d), 5.0..100.0);
    let relations = Relations::new(rng, b, 5);
    let variants = common::option_grid(0.005, 0.07, None)
        .into_iter()
        .filter(|loss| {
            loss.contrast_mode() == ContrastMode::All
                && loss.no_positive() == NoPositivePolicy::ZeroAndCount
                && loss.reduction() == Reduction::Mean
        });
    for loss in variants {
        for source in [Source::Labels, Source::SimClr] {
            let positives = relations.positives(source);
            let up = Upstream::Scalar(1.0);
            let what = format!("τ = 0.005 {loss:?} {source:?}");
            let ratios = [
                compare(subject, &loss, &z.mapv(|x| x as f32), positives, up, &what),
                compare(subject, &loss, &z.mapv(f16::from_f64), positives, up, &what),
                compare(
                    subject,
                    &loss,
                    &z.mapv(bf16::from_f64),
                    positives,
                    up,
                    &what,
                ),
            ];
            for (dtype, ratio) in ["f32", "f16", "bf16"].iter().zip(ratios) {
                worst.record(ratio, &format!("{dtype} {what}"));
            }
        }
    }
    worst.report("large_logits");
}

/// The fused normalisation on rows of norms 0.2–5, under both summations and every
/// denominator, caps, both contrast modes and every kind of positives, in every element type;
/// and rows of norm 0, 1e-20 and 1e20 among ordinary ones (f32: the squares of 1e20 overflow f32).
fn normalization_matches_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    let (b, v, d) = (37, 2, 19);
    let z = common::features(rng, (b, v, d), 0.2..5.0);
    let relations = Relations::new(rng, b, 6);
    let upstream = Array1::from_shape_fn(b * v, |i| 0.4 + 0.1 * (i % 7) as f64);
    for cap in [None, Some(2)] {
        let variants = common::option_grid(0.1, 0.07, cap)
            .into_iter()
            .filter(|loss| loss.no_positive() == NoPositivePolicy::ZeroAndCount);
        for loss in variants {
            let loss = loss.to_builder().normalize(true).build().unwrap();
            let per_anchor = upstream
                .slice(ndarray::s![..anchors_of(&loss, (b, v, d))])
                .to_owned();
            let up = upstream_for(&loss, &per_anchor);
            for source in SOURCES {
                let positives = relations.positives(source);
                let what = format!("normalize {loss:?} {source:?}");
                let ratio = compare(subject, &loss, &z.mapv(|x| x as f32), positives, up, &what);
                worst.record(ratio, &what);
            }
        }
    }
    let loss = SupConLoss::builder().normalize(true).build().unwrap();
    let up = Upstream::Scalar(1.0);
    let labels = relations.positives(Source::Labels);
    let f16s = compare(subject, &loss, &z.mapv(f16::from_f64), labels, up, "f16");
    worst.record(f16s, "normalize f16");
    let bf16s = compare(subject, &loss, &z.mapv(bf16::from_f64), labels, up, "bf16");
    worst.record(bf16s, "normalize bf16");
    worst.record(
        compare(subject, &loss, &z, labels, up, "f64"),
        "normalize f64",
    );
    worst.report("normalization");

    // Extreme norms: the loss matches, and each gradient row matches relative to its own size
    // (the rows of norm 0 and 1e-20 have gradients ~1e12 times the others').
    let mut z = common::features(rng, (11, 2, 7), 0.5..2.0);
    for (b, scale) in [(0, 0.0), (3, 1e-20), (7, 1e20)] {
        z.slice_mut(ndarray::s![b, 0, ..])
            .mapv_inplace(|x| x * scale);
    }
    let z = z.mapv(|x| x as f32);
    let positives = Positives::Labels(relations.labels.slice(ndarray::s![..11]));
    if !(subject.supports)(&loss, &positives, DType::F32) {
        return;
    }
    let name = subject.backend.name();
    let (got, got_grad) = subject
        .backend
        .forward_backward(&loss, z.view(), positives, up)
        .unwrap();
    let (want, want_grad) = ReferenceBackend
        .forward_backward(&loss, z.view(), positives, up)
        .unwrap();
    let (got, want) = (got.loss.unwrap(), want.loss.unwrap());
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{name}: extreme norms: loss {got} vs {want}"
    );
    for (row, want_row) in got_grad.rows().into_iter().zip(want_grad.rows()) {
        let size = want_row.iter().fold(0.0f64, |m, g| m.max(g.to_f64().abs()));
        for (g, w) in row.iter().zip(want_row) {
            assert!(
                (g.to_f64() - w.to_f64()).abs() <= 1e-4 * size,
                "{name}: extreme norms: gradient {g:?} vs {w:e} (row size {size:e})"
            );
        }
    }
}

/// Anchors without positives under each policy, a batch without any positive, one-class batches
/// (no negatives), V = 1 SimCLR; and the exact values these cases must have.
fn positive_and_negative_edge_cases<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    let z = common::unit_features(rng, (70, 1, 9)).mapv(|x| x as f32);
    // Labels 0..29 twice, then singletons: some anchors have positives, some none.
    let mixed = Array1::from_shape_fn(70, |i| {
        if i < 60 {
            (i % 30) as i64
        } else {
            1000 + i as i64
        }
    });
    let distinct = Array1::from_shape_fn(70, |i| i as i64 * 7 - 300);
    let one_class = Array1::from_elem(70, i64::MIN);
    let two_views = common::unit_features(rng, (9, 2, 5)).mapv(|x| x as f32);
    let nine_of_one_class = Array1::from_elem(9, -5i64);
    let up = Upstream::Scalar(1.0);
    let variants = common::option_grid(0.07, 0.07, None)
        .into_iter()
        .filter(|loss| {
            loss.contrast_mode() == ContrastMode::All && loss.reduction() != Reduction::None
        });
    for loss in variants {
        let cases = [
            ("mixed labels", &z, Positives::Labels(mixed.view())),
            ("distinct labels", &z, Positives::Labels(distinct.view())),
            ("one class", &z, Positives::Labels(one_class.view())),
            ("V = 1 SimCLR", &z, Positives::SimClr),
            (
                "one class, V = 2",
                &two_views,
                Positives::Labels(nine_of_one_class.view()),
            ),
        ];
        for (name, features, positives) in cases {
            let what = format!("{name} {loss:?}");
            let ratio = compare(subject, &loss, features, positives, up, &what);
            worst.record(ratio, &what);
        }
    }
    worst.report("edge_cases");

    let supported = |loss: &SupConLoss| (subject.supports)(loss, &Positives::SimClr, DType::F32);
    let error = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    assert_eq!(
        subject
            .backend
            .forward(&error, z.view(), Positives::Labels(mixed.view()))
            .unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 60 }
    );
    // No anchor has a positive: the loss and the gradient are exactly 0.
    for policy in [NoPositivePolicy::ZeroAndCount, NoPositivePolicy::Exclude] {
        let loss = SupConLoss::builder().no_positive(policy).build().unwrap();
        let (out, grad) = subject
            .backend
            .forward_backward(&loss, z.view(), Positives::SimClr, up)
            .unwrap();
        assert_eq!(out.loss, Some(0.0), "{policy:?}");
        assert!(grad.iter().all(|g| g.to_f64() == 0.0), "{policy:?}");
    }
    // One class and only negatives in the denominator: every denominator is empty.
    for denominator in [Denominator::OnlyNegatives, Denominator::OnePositive] {
        let loss = SupConLoss::builder()
            .denominator(denominator)
            .build()
            .unwrap();
        if !supported(&loss) {
            continue;
        }
        let (out, grad) = subject
            .backend
            .forward_backward(
                &loss,
                two_views.view(),
                Positives::Labels(nine_of_one_class.view()),
                up,
            )
            .unwrap();
        assert_eq!(out.loss, Some(0.0), "{denominator:?}");
        assert!(grad.iter().all(|g| g.to_f64() == 0.0), "{denominator:?}");
    }
}

/// Mask weights anywhere in the f32 range: uniform weights near f32::MAX, one huge weight
/// among small ones, rows of subnormal weights, weights from 1e-40 to 1e38 in one mask. Every
/// backend matches the reference (which sums them in f64); none returns a non-finite value.
fn extreme_mask_weights_match_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut worst = Worst::default();
    let (b, v, d) = (19, 2, 11);
    let z = common::unit_features(rng, (b, v, d)).mapv(|x| x as f32);
    let soft = common::soft_mask(rng, b);
    let uniform = Array2::from_elem((b, b), 3e38f32);
    let mut one_huge = Array2::from_elem((b, b), 0.5f32);
    one_huge[[3, 4]] = 5e37;
    let mut subnormal_rows = soft.clone();
    for row in [0, 5, 11] {
        subnormal_rows
            .row_mut(row)
            .mapv_inplace(|w| if w > 0.0 { 1e-45 } else { 0.0 });
    }
    let spread = soft.mapv(|w| {
        if w > 0.0 {
            10f32.powf(w * 39.0 - 40.0)
        } else {
            0.0
        }
    });
    let masks = [
        ("uniform 3e38", uniform),
        ("one 5e37 among 0.5", one_huge),
        ("subnormal rows", subnormal_rows),
        ("1e-40 to 1e38", spread),
    ];
    let upstream = Array1::from_shape_fn(b * v, |i| 0.5 + 0.1 * i as f64);
    for (name, mask) in &masks {
        for loss in common::option_grid(0.1, 0.07, None)
            .into_iter()
            .filter(|l| l.no_positive() != NoPositivePolicy::Error)
        {
            let per_anchor = upstream
                .slice(ndarray::s![..anchors_of(&loss, (b, v, d))])
                .to_owned();
            let what = format!("{name} {loss:?}");
            let ratio = compare(
                subject,
                &loss,
                &z,
                Positives::Mask(mask.view()),
                upstream_for(&loss, &per_anchor),
                &what,
            );
            worst.record(ratio, &what);
        }
    }
    worst.report("extreme_mask_weights");
}

/// Results beyond the floating-point range (a tiny τ_b, a huge upstream gradient) are
/// `Error::Overflow`, not ∞ or NaN.
fn overflowing_results_are_typed_errors<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let z = common::unit_features(rng, (9, 2, 5)).mapv(|x| x as f32);
    let tiny_base = SupConLoss::builder()
        .base_temperature(1e-308)
        .build()
        .unwrap();
    assert_eq!(
        subject
            .backend
            .forward(&tiny_base, z.view(), Positives::SimClr)
            .unwrap_err(),
        Error::Overflow { output: "loss" }
    );
    let loss = SupConLoss::default();
    let out = subject
        .backend
        .forward(&loss, z.view(), Positives::SimClr)
        .unwrap();
    let huge = Upstream::Scalar(1e300);
    assert_eq!(
        subject
            .backend
            .backward(&loss, z.view(), Positives::SimClr, &out.state, huge)
            .unwrap_err(),
        Error::Overflow { output: "gradient" }
    );
}

/// Every input error is a typed error, the same on every backend.
fn bad_inputs_are_typed_errors<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let backend = &subject.backend;
    let loss = SupConLoss::default();
    let z = common::unit_features(rng, (9, 2, 5)).mapv(|x| x as f32);
    let single = Array3::<f32>::ones((1, 1, 3));
    assert_eq!(
        backend
            .forward(&loss, single.view(), Positives::SimClr)
            .unwrap_err(),
        Error::SingleRow
    );
    let empty = Array3::<f32>::ones((4, 0, 3));
    assert_eq!(
        backend
            .forward(&loss, empty.view(), Positives::SimClr)
            .unwrap_err(),
        Error::EmptyFeatures { shape: [4, 0, 3] }
    );
    let mut bad = z.clone();
    bad[[4, 1, 2]] = f32::NAN;
    assert_eq!(
        backend
            .forward(&loss, bad.view(), Positives::SimClr)
            .unwrap_err(),
        Error::NonFiniteFeature {
            sample: 4,
            view: 1,
            dim: 2
        }
    );
    let short = Array1::from_elem(3, 1i64);
    assert_eq!(
        backend
            .forward(&loss, z.view(), Positives::Labels(short.view()))
            .unwrap_err(),
        Error::LabelsLength {
            expected: 9,
            got: 3
        }
    );
    let wrong = Array2::<f32>::ones((9, 8));
    assert_eq!(
        backend
            .forward(&loss, z.view(), Positives::Mask(wrong.view()))
            .unwrap_err(),
        Error::MaskShape {
            expected: 9,
            got: [9, 8]
        }
    );
    let sets = Array2::from_elem((8, 3), true);
    assert_eq!(
        backend
            .forward(
                &loss,
                z.view(),
                Positives::LabelSets {
                    sets: sets.view(),
                    weight: LabelSetWeight::Jaccard
                }
            )
            .unwrap_err(),
        Error::LabelSetsShape {
            expected: 9,
            got: [8, 3]
        }
    );
    let mut negative = Array2::<f32>::ones((9, 9));
    negative[[2, 7]] = -0.5;
    assert_eq!(
        backend
            .forward(&loss, z.view(), Positives::Mask(negative.view()))
            .unwrap_err(),
        Error::InvalidMaskWeight {
            row: 2,
            col: 7,
            value: -0.5
        }
    );
    // A state belongs to its configuration and shape; the upstream fits the reduction.
    let out = backend.forward(&loss, z.view(), Positives::SimClr).unwrap();
    let other = SupConLoss::builder().temperature(0.5).build().unwrap();
    let backward = |loss: &SupConLoss, z: &Array3<f32>, upstream| {
        backend.backward(loss, z.view(), Positives::SimClr, &out.state, upstream)
    };
    assert!(matches!(
        backward(&other, &z, Upstream::Scalar(1.0)),
        Err(Error::StateMismatch(_))
    ));
    let narrower = common::unit_features(rng, (9, 2, 4)).mapv(|x| x as f32);
    assert!(matches!(
        backward(&loss, &narrower, Upstream::Scalar(1.0)),
        Err(Error::StateMismatch(_))
    ));
    // Another batch of the same shape: other features, or the same features with other
    // positives. The same values in another element type pass.
    let mut other_batch = z.clone();
    other_batch[[8, 0, 4]] += 0.25;
    assert!(matches!(
        backward(&loss, &other_batch, Upstream::Scalar(1.0)),
        Err(Error::StateMismatch(_))
    ));
    let labels = Array1::from_shape_fn(9, |b| (b % 3) as i64);
    assert!(matches!(
        backend.backward(
            &loss,
            z.view(),
            Positives::Labels(labels.view()),
            &out.state,
            Upstream::Scalar(1.0)
        ),
        Err(Error::StateMismatch(_))
    ));
    let wide = z.mapv(f64::from);
    let same_values = backend.backward(
        &loss,
        wide.view(),
        Positives::SimClr,
        &out.state,
        Upstream::Scalar(1.0),
    );
    assert!(
        !matches!(same_values, Err(Error::StateMismatch(_))),
        "{same_values:?}"
    );
    let per_anchor = Array1::zeros(18);
    assert!(matches!(
        backward(&loss, &z, Upstream::PerAnchor(per_anchor.view())),
        Err(Error::UpstreamMismatch { .. })
    ));
    assert_eq!(
        backward(&loss, &z, Upstream::Scalar(f64::INFINITY)).unwrap_err(),
        Error::NonFiniteUpstream
    );
    let none = SupConLoss::builder()
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let out = backend.forward(&none, z.view(), Positives::SimClr).unwrap();
    let too_few = Array1::zeros(17);
    for upstream in [Upstream::Scalar(1.0), Upstream::PerAnchor(too_few.view())] {
        assert!(matches!(
            backend.backward(&none, z.view(), Positives::SimClr, &out.state, upstream),
            Err(Error::UpstreamMismatch { .. })
        ));
    }
}

/// Two runs give bitwise identical losses, statistics and gradients (fixed reduction orders,
/// no atomics).
fn results_are_bitwise_reproducible<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let (b, v, d) = (83, 2, 70);
    let z = common::unit_features(rng, (b, v, d)).mapv(|x| x as f32);
    let relations = Relations::new(rng, b, 10);
    let inside = SupConLoss::builder()
        .summation(Summation::Inside)
        .build()
        .unwrap();
    for (loss, source) in [
        (SupConLoss::default(), Source::Labels),
        (inside, Source::Mask),
    ] {
        let run = || {
            subject
                .backend
                .forward_backward(
                    &loss,
                    z.view(),
                    relations.positives(source),
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
        assert_eq!(
            grad_bits(&first_grad),
            grad_bits(&second_grad),
            "{source:?}"
        );
    }
}

macro_rules! backend_suite {
    ($name:ident, $subject:expr) => {
        mod $name {
            use super::*;

            /// `None` (with the reason printed) when this machine cannot run the backend.
            fn subject() -> Option<Subject<impl Backend>> {
                $subject
            }

            macro_rules! case {
                ($test:ident) => {
                    #[test]
                    fn $test() {
                        if let Some(s) = subject() {
                            super::$test(&s, &mut common::rng(stringify!($test)));
                        }
                    }
                };
            }

            case!(every_option_matches_reference);
            case!(ragged_shapes_match_reference);
            case!(element_types_under_every_variant_match_reference);
            case!(large_logits_stay_finite_and_accurate);
            case!(positive_and_negative_edge_cases);
            case!(bad_inputs_are_typed_errors);
            case!(results_are_bitwise_reproducible);
            case!(extreme_mask_weights_match_reference);
            case!(overflowing_results_are_typed_errors);
            case!(normalization_matches_reference);
        }
    };
}

backend_suite!(
    reference,
    Some(Subject {
        backend: ReferenceBackend,
        supports: |_, _, _| true,
        covers: |_| true,
        precision: Precision::F64,
        option_shapes: &[(7, 2, 17), (13, 1, 3), (5, 3, 13), (2, 1, 1)],
        tile_shapes: &[],
        ragged_shapes: &[(2, 1, 1), (1, 2, 3), (17, 1, 5), (31, 2, 19)],
    })
);

// The CPU backend tiles rows in blocks of 256, lanes of 16 and product panels of 8, 16 or 32
// columns; its default options take the dense fast path.
backend_suite!(
    cpu,
    Some(Subject {
        backend: supcon::CpuBackend,
        supports: |_, _, _| true,
        covers: |_| true,
        precision: Precision::F32,
        option_shapes: &[
            (7, 2, 17),
            (13, 1, 3),
            (5, 3, 130),
            (2, 1, 1),
            (23, 2, 9),
            (41, 1, 6)
        ],
        tile_shapes: &[(263, 2, 5), (181, 3, 7), (530, 1, 4)],
        ragged_shapes: &[
            (2, 1, 1),
            (1, 2, 3),
            (3, 1, 17),
            (1, 3, 64),
            (17, 1, 130),
            (97, 1, 3),
            (300, 1, 17),
            (150, 2, 64),
            (100, 3, 1),
            (129, 2, 33),
            (1000, 1, 17),
            (500, 2, 130),
            (2048, 2, 32)
        ],
    })
);

/// What the CUDA kernels implement (emulated or on a GPU): every option, no f64 features.
#[cfg(any(feature = "emulation", feature = "cuda"))]
fn kernels_support(_: &SupConLoss, _: &Positives<'_>, dtype: DType) -> bool {
    dtype != DType::F64
}

/// The kernels tile rows in blocks of 64, the depth in stages of 32 and the gradient in chunks
/// of 128 columns.
#[cfg(any(feature = "emulation", feature = "cuda"))]
const KERNEL_OPTION_SHAPES: &[Shape] = &[(7, 2, 17), (37, 2, 33), (5, 3, 130), (71, 2, 5)];
#[cfg(any(feature = "emulation", feature = "cuda"))]
const KERNEL_RAGGED_SHAPES: &[Shape] = &[
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
    (9, 2, 256),   // D = 256: one wide gradient chunk, 16 k-steps per tile
    (5, 2, 300),   // D = 300: two wide chunks (bf16x3: rows too wide, the f32 path)
];

// The default kernels: tensor cores for f16 and bf16, the f32 path for f32.
#[cfg(feature = "emulation")]
backend_suite!(
    emulated,
    Some(Subject {
        backend: supcon::EmulatedBackend::default(),
        supports: kernels_support,
        covers: |_| true,
        precision: Precision::TensorCores,
        option_shapes: KERNEL_OPTION_SHAPES,
        tile_shapes: &[],
        ragged_shapes: KERNEL_RAGGED_SHAPES,
    })
);

// Tensor cores for f32 features too, split into bf16 hi + lo.
#[cfg(feature = "emulation")]
backend_suite!(
    emulated_bf16x3,
    Some(Subject {
        backend: supcon::EmulatedBackend::with_precision(supcon::Precision::Bf16x3),
        supports: kernels_support,
        // Half types run the `emulated` suite's kernels under Bf16x3 too.
        covers: |dtype| matches!(dtype, DType::F32 | DType::F64),
        precision: Precision::Bf16x3,
        // The whole grid on two of the kernels' option shapes, one configuration in nine on
        // the two that cross a stage and a gradient chunk (three products per step make this
        // the slowest subject).
        option_shapes: &[(7, 2, 17), (71, 2, 5)],
        tile_shapes: &[(37, 2, 33), (5, 3, 130)],
        // The kernels' boundaries, fewer rows.
        ragged_shapes: &[
            (2, 1, 1),
            (1, 2, 3),
            (3, 1, 17),
            (13, 3, 128),
            (31, 2, 130),
            (67, 1, 3),
            (32, 2, 33)
        ],
    })
);

// The f32 (SIMT) kernels for every element type.
#[cfg(feature = "emulation")]
backend_suite!(
    emulated_f32,
    Some(Subject {
        backend: supcon::EmulatedBackend::with_precision(supcon::Precision::F32),
        supports: kernels_support,
        covers: |_| true,
        precision: Precision::F32,
        option_shapes: KERNEL_OPTION_SHAPES,
        tile_shapes: &[],
        ragged_shapes: KERNEL_RAGGED_SHAPES,
    })
);

/// GPU 0, or `None` with the reason printed ("skipped") when this machine cannot run CUDA;
/// `SUPCON_REQUIRE_CUDA=1` (the GPU check) turns the skip into a failure.
#[cfg(feature = "cuda")]
fn cuda_subject(precision: supcon::Precision) -> Option<Subject<supcon::CudaBackend>> {
    match supcon::CudaBackend::new(0) {
        Ok(backend) => Some(Subject {
            backend: backend.with_precision(precision),
            supports: kernels_support,
            covers: |_| true,
            precision: match precision {
                supcon::Precision::Auto => Precision::TensorCores,
                supcon::Precision::F32 => Precision::F32,
                supcon::Precision::Bf16x3 => Precision::Bf16x3,
            },
            option_shapes: KERNEL_OPTION_SHAPES,
            tile_shapes: &[(1000, 2, 128), (300, 3, 257)],
            ragged_shapes: KERNEL_RAGGED_SHAPES,
        }),
        Err(e) if std::env::var_os("SUPCON_REQUIRE_CUDA").is_some_and(|v| v != "0") => {
            panic!("SUPCON_REQUIRE_CUDA is set but the CUDA backend cannot start: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA driver/device ({e})");
            None
        }
    }
}

#[cfg(feature = "cuda")]
backend_suite!(cuda, cuda_subject(supcon::Precision::Auto));
#[cfg(feature = "cuda")]
backend_suite!(cuda_f32, cuda_subject(supcon::Precision::F32));
#[cfg(feature = "cuda")]
backend_suite!(cuda_bf16x3, cuda_subject(supcon::Precision::Bf16x3));
