//! Test helpers shared by the integration tests: fresh random inputs of ragged sizes and the
//! option grid.
#![allow(dead_code)] // each test crate uses its own subset

use ndarray::{Array1, Array2, Array3};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use supcon::{
    ContrastMode, Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss, Upstream,
};

/// A fresh seed per run (SUPCON_TEST_SEED replays one); printed so a failure can be replayed.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SUPCON_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
    eprintln!("{test}: SUPCON_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// An approximately Gaussian value (Irwin–Hall with 4 terms), never exactly zero in practice.
pub fn gaussian(rng: &mut StdRng) -> f64 {
    (0..4).map(|_| rng.random::<f64>()).sum::<f64>() - 2.0
}

/// `[B, V, D]` features with each row's norm drawn uniformly from `norms`.
pub fn features(
    rng: &mut StdRng,
    (batch, views, dim): (usize, usize, usize),
    norms: std::ops::Range<f64>,
) -> Array3<f64> {
    let mut z = Array3::from_shape_fn((batch, views, dim), |_| gaussian(rng));
    for mut row in z.rows_mut() {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
        let target = rng.random_range(norms.clone());
        row.mapv_inplace(|x| x * target / norm);
    }
    z
}

/// Unit-norm features.
pub fn unit_features(rng: &mut StdRng, shape: (usize, usize, usize)) -> Array3<f64> {
    features(rng, shape, 1.0..1.0 + 1e-12)
}

/// Labels from `classes` distinct values spread over the whole i64 range (negative and huge).
pub fn labels(rng: &mut StdRng, batch: usize, classes: usize) -> Array1<i64> {
    let values: Vec<i64> = (0..classes)
        .map(|c| match c % 3 {
            0 => -(c as i64) - 7,
            1 => i64::MAX - c as i64,
            _ => c as i64 * 1_000_003,
        })
        .collect();
    Array1::from_shape_fn(batch, |_| values[rng.random_range(0..classes)])
}

/// A soft, asymmetric `[B, B]` mask with about 40 % zeros.
pub fn soft_mask(rng: &mut StdRng, batch: usize) -> Array2<f32> {
    Array2::from_shape_fn((batch, batch), |_| {
        if rng.random::<f64>() < 0.4 {
            0.0
        } else {
            rng.random_range(0.1..2.0)
        }
    })
}

/// A multi-hot `[B, K]` matrix of label sets: each sample takes each of a small pool of labels
/// (spread over 0..K, the last one and those either side of a 64-bit word boundary included)
/// with probability ½, so that many pairs share a label, many do not, and some sets are empty.
pub fn label_sets(rng: &mut StdRng, batch: usize, labels: usize) -> Array2<bool> {
    let mut pool: Vec<usize> = (0..6).map(|_| rng.random_range(0..labels.max(1))).collect();
    pool.extend(
        [labels.saturating_sub(1), 63, 64]
            .into_iter()
            .filter(|&k| k < labels),
    );
    pool.sort_unstable();
    pool.dedup();
    let mut sets = Array2::from_elem((batch, labels), false);
    for b in 0..batch {
        for &k in pool.iter().filter(|&&k| k < labels) {
            sets[[b, k]] = rng.random::<f64>() < 0.5;
        }
    }
    sets
}

/// The `[B, B]` mask of label-set weights that `Positives::LabelSets` defines (docs/math.md,
/// "Label sets"): 1 on the diagonal (the other views of a sample), else the weight of the two
/// sets, computed naively here as an independent check.
pub fn label_set_mask(sets: &Array2<bool>, weight: supcon::LabelSetWeight) -> Array2<f32> {
    let b = sets.nrows();
    Array2::from_shape_fn((b, b), |(i, j)| {
        if i == j {
            return 1.0;
        }
        let count = |f: fn(bool, bool) -> bool| {
            sets.row(i)
                .iter()
                .zip(sets.row(j))
                .filter(|&(&x, &y)| f(x, y))
                .count()
        };
        let (shared, union, size) = (count(|x, y| x && y), count(|x, y| x || y), count(|x, _| x));
        match weight {
            supcon::LabelSetWeight::Any => f32::from(u8::from(shared > 0)),
            supcon::LabelSetWeight::Jaccard if union > 0 => shared as f32 / union as f32,
            supcon::LabelSetWeight::Fraction if size > 0 => shared as f32 / size as f32,
            _ => 0.0,
        }
    })
}

/// The 0/1 mask equal to the label relation.
pub fn label_mask(labels: &Array1<i64>) -> Array2<f32> {
    let b = labels.len();
    Array2::from_shape_fn((b, b), |(i, j)| f32::from(u8::from(labels[i] == labels[j])))
}

/// Every combination of contrast mode × summation × denominator × policy × reduction (108),
/// with the given temperatures and cap.
pub fn option_grid(temperature: f64, base_temperature: f64, cap: Option<usize>) -> Vec<SupConLoss> {
    let mut grid = vec![];
    for contrast_mode in [ContrastMode::All, ContrastMode::One] {
        for summation in [Summation::Outside, Summation::Inside] {
            for denominator in [
                Denominator::All,
                Denominator::OnlyNegatives,
                Denominator::OnePositive,
            ] {
                for policy in [
                    NoPositivePolicy::ZeroAndCount,
                    NoPositivePolicy::Exclude,
                    NoPositivePolicy::Error,
                ] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        let mut builder = SupConLoss::builder()
                            .temperature(temperature)
                            .base_temperature(base_temperature)
                            .contrast_mode(contrast_mode)
                            .summation(summation)
                            .denominator(denominator)
                            .no_positive(policy)
                            .reduction(reduction);
                        if let Some(cap) = cap {
                            builder = builder.positives_cap(cap);
                        }
                        grid.push(builder.build().expect("valid options"));
                    }
                }
            }
        }
    }
    grid
}

/// ‖a − b‖∞ / max(‖b‖∞, floor).
pub fn relative_error<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
    floor: f64,
) -> f64 {
    let (mut diff, mut scale) = (0.0f64, floor);
    for (x, y) in a.into_iter().zip(b) {
        diff = diff.max((x - y).abs());
        scale = scale.max(y.abs());
    }
    diff / scale
}

pub mod tolerance;

/// The upstream gradient a test passes: 0.75 for a reduced loss, `per_anchor` (values chosen by
/// the test, one per anchor) for reduction none.
pub fn upstream_for<'a>(loss: &SupConLoss, per_anchor: &'a Array1<f64>) -> Upstream<'a> {
    match loss.reduction() {
        Reduction::None => Upstream::PerAnchor(per_anchor.view()),
        Reduction::Mean | Reduction::Sum => Upstream::Scalar(0.75),
    }
}
