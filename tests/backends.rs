//! One correctness suite, instantiated for every backend in this build (reference, cpu,
//! emulated kernels, CUDA): each option a backend supports must agree with the f64 reference on
//! fresh random inputs of ragged sizes; each option it does not support must be a typed
//! `Error::Unsupported`, never a wrong answer.

mod common;

use half::{bf16, f16};
use ndarray::{Array1, Array3};
use rand::rngs::StdRng;
use supcon::{
    Backend, DType, Element, Error, GradElement, NoPositivePolicy, Positives, Reduction,
    ReferenceBackend, SupConLoss, Upstream,
};

/// Which positives a case uses.
#[derive(Clone, Copy, Debug)]
enum Source {
    SimClr,
    Labels,
    Mask,
}

/// A backend under test: how to build it, and which (options, element type) it implements.
struct Subject<B> {
    backend: B,
    supports: fn(&SupConLoss, DType) -> bool,
}

/// Tolerance, as ‖x − x_ref‖∞ / max(‖x_ref‖∞, floor) for the per-anchor losses, the loss and
/// the gradient.
///
/// Every backend accumulates in f32 at least. The reference runs on the *same* (rounded) inputs
/// widened to f64, so input rounding is not an error source; what is left is f32 accumulation
/// over D-long dot products and N-long sums, ~√(N)·2⁻²⁴·|terms| ≲ 1e-5 of the scale at the
/// sizes here, and the same for half inputs (their products are exact in f32).
///
/// The floor keeps a value that is exactly 0 in theory (two rows: ℓ = s − LSE = 0) from
/// turning f32 rounding of the logits into an infinite relative error: it is 10 % of the
/// natural scale of each quantity — c·max‖z‖²/τ for a loss (× R for a sum), and
/// c·|u|·max‖z‖/(τ·R') for the gradient.
const TOLERANCE: f64 = 2e-5;

/// The floors of [`TOLERANCE`]: (per-anchor loss, reduced loss, gradient).
fn error_floors<T: Element>(
    loss: &SupConLoss,
    z: &Array3<T>,
    upstream: Upstream<'_>,
    anchors: usize,
) -> (f64, f64, f64) {
    let max_norm2 = z
        .rows()
        .into_iter()
        .map(|row| row.iter().map(|x| x.to_f64().powi(2)).sum::<f64>())
        .fold(0.0, f64::max);
    let per_anchor = 0.1 * loss.loss_scale() * max_norm2 / loss.temperature();
    let (reduced, mean_denominator, upstream_max) = match (loss.reduction(), upstream) {
        (Reduction::Mean, Upstream::Scalar(u)) => (per_anchor, anchors as f64, u.abs()),
        (_, Upstream::Scalar(u)) => (per_anchor * anchors as f64, 1.0, u.abs()),
        (_, Upstream::PerAnchor(u)) => (
            per_anchor,
            1.0,
            u.iter().fold(0.0f64, |m, x| m.max(x.abs())),
        ),
    };
    let gradient = 0.1 * loss.loss_scale() * upstream_max * max_norm2.sqrt()
        / (loss.temperature() * mean_denominator);
    (per_anchor, reduced, gradient)
}

fn compare<B: Backend, T: Element>(
    subject: &Subject<B>,
    loss: &SupConLoss,
    z: &Array3<T>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
    what: &str,
) -> bool {
    let result = subject
        .backend
        .forward_backward(loss, z.view(), positives, upstream);
    if !(subject.supports)(loss, T::DTYPE) {
        assert!(
            matches!(result, Err(Error::Unsupported { .. })),
            "{}: {what}: unsupported options must be a typed error, got {result:?}",
            subject.backend.name()
        );
        return false;
    }
    let expected = ReferenceBackend.forward_backward(loss, z.view(), positives, upstream);
    let ((out, grad), (ref_out, ref_grad)) = match (result, expected) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "{}: {what}: different errors", subject.backend.name());
            return true;
        }
        (a, b) => panic!(
            "{}: {what}: {a:?} vs reference {b:?}",
            subject.backend.name()
        ),
    };
    let (anchor_floor, loss_floor, grad_floor) =
        error_floors(loss, z, upstream, ref_out.per_anchor.len());
    let loss_err = common::relative_error(
        out.per_anchor.iter(),
        ref_out.per_anchor.iter(),
        anchor_floor,
    );
    let reduced = |l: Option<f64>| l.map(|x| [x]).unwrap_or([0.0]);
    let total_err = common::relative_error(
        reduced(out.loss).iter(),
        reduced(ref_out.loss).iter(),
        loss_floor,
    );
    let grad64: Vec<f64> = grad.iter().map(|g| g.to_f64()).collect();
    let ref64: Vec<f64> = ref_grad.iter().map(|g| g.to_f64()).collect();
    let grad_err = common::relative_error(grad64.iter(), ref64.iter(), grad_floor);
    assert!(
        loss_err <= TOLERANCE && total_err <= TOLERANCE && grad_err <= TOLERANCE,
        "{}: {what}: per-anchor error {loss_err:e}, loss error {total_err:e}, gradient error {grad_err:e}",
        subject.backend.name()
    );
    assert_eq!(out.state.shape(), ref_out.state.shape());
    true
}

fn upstream_for<'a>(loss: &SupConLoss, anchors: &'a Array1<f64>) -> Upstream<'a> {
    match loss.reduction() {
        Reduction::None => Upstream::PerAnchor(anchors.view()),
        _ => Upstream::Scalar(0.75),
    }
}

/// Every option combination on a few ragged shapes, f32 input.
fn every_option_matches_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let mut compared = 0;
    for (b, v, d) in [(7, 2, 17), (13, 1, 3), (5, 3, 130), (2, 1, 1)] {
        let z = common::unit_features(rng, (b, v, d)).mapv(|x| x as f32);
        let labels = common::labels(rng, b, 3);
        let mask = common::soft_mask(rng, b);
        let per_anchor = Array1::from_shape_fn(b * v, |i| 1.0 - 0.05 * i as f64);
        for cap in [None, Some(2)] {
            for loss in common::option_grid(0.1, 0.07, cap) {
                let anchors = per_anchor
                    .slice(ndarray::s![
                        ..match loss.contrast_mode() {
                            supcon::ContrastMode::All => b * v,
                            supcon::ContrastMode::One => b,
                        }
                    ])
                    .to_owned();
                for source in [Source::SimClr, Source::Labels, Source::Mask] {
                    let positives = match source {
                        Source::SimClr => Positives::SimClr,
                        Source::Labels => Positives::Labels(labels.view()),
                        Source::Mask => Positives::Mask(mask.view()),
                    };
                    let what = format!("{loss:?} {source:?} shape {:?}", (b, v, d));
                    compared += usize::from(compare(
                        subject,
                        &loss,
                        &z,
                        positives,
                        upstream_for(&loss, &anchors),
                        &what,
                    ));
                }
            }
        }
    }
    eprintln!(
        "{}: {compared} option combinations compared",
        subject.backend.name()
    );
    assert!(compared > 0, "the backend supports no option at all");
}

/// Larger ragged sizes (primes), every element type, the default options.
fn element_types_and_sizes_match_reference<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    for (b, v, d) in [(151, 2, 64), (97, 3, 128), (293, 1, 33)] {
        let z = common::unit_features(rng, (b, v, d));
        let labels = common::labels(rng, b, 11);
        let loss = SupConLoss::default();
        let positives = Positives::Labels(labels.view());
        let up = Upstream::Scalar(1.0);
        let what = format!("shape {:?}", (b, v, d));
        compare(
            subject,
            &loss,
            &z.mapv(|x| x as f32),
            positives,
            up,
            &format!("f32 {what}"),
        );
        compare(
            subject,
            &loss,
            &z.mapv(f16::from_f64),
            positives,
            up,
            &format!("f16 {what}"),
        );
        compare(
            subject,
            &loss,
            &z.mapv(bf16::from_f64),
            positives,
            up,
            &format!("bf16 {what}"),
        );
    }
}

/// Un-normalised features (norms 8–100) and τ = 0.005: finite everywhere, close to the reference
/// relative to the loss scale (logits reach 2·10⁶, so f32 cancellation in s − LSE costs ~1e-7 of
/// that scale).
fn extreme_logits_stay_finite<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let z = common::features(rng, (23, 2, 19), 8.0..100.0).mapv(|x| x as f32);
    let labels = common::labels(rng, 23, 4);
    for loss in common::option_grid(0.005, 0.07, None)
        .into_iter()
        .filter(|l| l.no_positive() != NoPositivePolicy::Error && l.reduction() == Reduction::Mean)
    {
        if !(subject.supports)(&loss, DType::F32) {
            continue;
        }
        let (out, grad) = subject
            .backend
            .forward_backward(
                &loss,
                z.view(),
                Positives::Labels(labels.view()),
                Upstream::Scalar(1.0),
            )
            .unwrap();
        assert!(out.loss.unwrap().is_finite(), "{loss:?}");
        assert!(grad.iter().all(|g| g.is_finite()), "{loss:?}");
        let reference = ReferenceBackend
            .forward(&loss, z.view(), Positives::Labels(labels.view()))
            .unwrap();
        let scale = reference
            .per_anchor
            .iter()
            .fold(1.0f64, |m, x| m.max(x.abs()));
        let err = (out.loss.unwrap() - reference.loss.unwrap()).abs() / scale;
        assert!(err < 1e-5, "{}: {loss:?}: {err:e}", subject.backend.name());
    }
}

/// Edge cases: one class, V = 1 SimCLR (no positives), and typed input errors.
fn edge_cases<B: Backend>(subject: &Subject<B>, rng: &mut StdRng) {
    let z = common::unit_features(rng, (9, 2, 5)).mapv(|x| x as f32);
    let one_class = Array1::from_elem(9, -5i64);
    for loss in common::option_grid(0.1, 0.1, None)
        .into_iter()
        .filter(|l| l.reduction() == Reduction::Sum)
    {
        let up = Upstream::Scalar(1.0);
        compare(
            subject,
            &loss,
            &z,
            Positives::Labels(one_class.view()),
            up,
            &format!("one class {loss:?}"),
        );
        let z1 = common::unit_features(rng, (6, 1, 4)).mapv(|x| x as f32);
        compare(
            subject,
            &loss,
            &z1,
            Positives::SimClr,
            up,
            &format!("V = 1 SimCLR {loss:?}"),
        );
    }
    let loss = SupConLoss::default();
    let single = Array3::<f32>::ones((1, 1, 3));
    assert_eq!(
        subject
            .backend
            .forward(&loss, single.view(), Positives::SimClr)
            .unwrap_err(),
        Error::SingleRow
    );
    let mut bad = z.clone();
    bad[[4, 1, 2]] = f32::NAN;
    assert_eq!(
        subject
            .backend
            .forward(&loss, bad.view(), Positives::SimClr)
            .unwrap_err(),
        Error::NonFiniteFeature {
            sample: 4,
            view: 1,
            dim: 2
        }
    );
    let short = Array1::from_elem(3, 1i64);
    assert!(matches!(
        subject
            .backend
            .forward(&loss, z.view(), Positives::Labels(short.view())),
        Err(Error::LabelsLength {
            expected: 9,
            got: 3
        })
    ));
}

macro_rules! backend_suite {
    ($name:ident, $subject:expr) => {
        mod $name {
            use super::*;

            /// `None` (with the reason printed) when this machine cannot run the backend.
            fn subject() -> Option<Subject<impl Backend>> {
                $subject
            }

            #[test]
            fn every_option_matches_reference() {
                if let Some(s) = subject() {
                    super::every_option_matches_reference(&s, &mut common::rng("every_option"));
                }
            }

            #[test]
            fn element_types_and_sizes_match_reference() {
                if let Some(s) = subject() {
                    super::element_types_and_sizes_match_reference(&s, &mut common::rng("dtypes"));
                }
            }

            #[test]
            fn extreme_logits_stay_finite() {
                if let Some(s) = subject() {
                    super::extreme_logits_stay_finite(&s, &mut common::rng("extreme"));
                }
            }

            #[test]
            fn edge_cases() {
                if let Some(s) = subject() {
                    super::edge_cases(&s, &mut common::rng("edges"));
                }
            }
        }
    };
}

backend_suite!(
    reference,
    Some(Subject {
        backend: ReferenceBackend,
        supports: |_, _| true
    })
);

backend_suite!(
    cpu,
    Some(Subject {
        backend: supcon::CpuBackend,
        supports: |_, _| true
    })
);

/// What the CUDA kernels implement (emulated or on a GPU): no one-positive denominator, no
/// positives cap, no f64 features.
#[cfg(any(feature = "emulation", feature = "cuda"))]
fn kernels_support(loss: &SupConLoss, dtype: DType) -> bool {
    dtype != DType::F64
        && loss.denominator() != supcon::Denominator::OnePositive
        && loss.positives_cap().is_none()
}

#[cfg(feature = "emulation")]
backend_suite!(
    emulated,
    Some(Subject {
        backend: supcon::EmulatedBackend,
        supports: kernels_support
    })
);

/// GPU 0, or `None` with the reason printed ("skipped") when this machine cannot run CUDA;
/// `SUPCON_REQUIRE_CUDA=1` (the GPU check) turns the skip into a failure.
#[cfg(feature = "cuda")]
fn cuda_subject() -> Option<Subject<supcon::CudaBackend>> {
    match supcon::CudaBackend::new(0) {
        Ok(backend) => Some(Subject {
            backend,
            supports: kernels_support,
        }),
        Err(e) if std::env::var_os("SUPCON_REQUIRE_CUDA").is_some() => {
            panic!("SUPCON_REQUIRE_CUDA is set but the CUDA backend cannot start: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA driver/device ({e})");
            None
        }
    }
}

#[cfg(feature = "cuda")]
backend_suite!(cuda, cuda_subject());
