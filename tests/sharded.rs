//! Shards and the sharded loss: the statistics of disjoint shards assemble into the whole
//! batch's forward output, their gradients into the whole gradient, and `ShardedSupCon` over
//! 1–4 in-process ranks of ragged sizes equals one device on the concatenated batch, for
//! labels, SimCLR, label sets and masks, both contrast modes and every reduction.

mod common;

use std::ops::Range;
use std::thread;

use common::tolerance::{Precision, Tolerance};
use common::{label_sets, labels, rng, soft_mask, unit_features};
use ndarray::{concatenate, s, Array1, Array2, Array3, Axis};
use rand::rngs::StdRng;
use rand::RngExt;
use supcon::distributed::{InProcessGroup, ShardedSupCon};
use supcon::{
    Backend, ContrastMode, CpuBackend, Denominator, Error, ForwardOutput, LabelSetWeight,
    NoPositivePolicy, Positives, Reduction, ReferenceBackend, Summation, SupConLoss, Upstream,
};

/// Ragged runs of samples covering `0..batch`, `parts` of them (some may be empty when
/// `allow_empty`).
fn ragged_runs(
    rng: &mut StdRng,
    batch: usize,
    parts: usize,
    allow_empty: bool,
) -> Vec<Range<usize>> {
    let low = usize::from(!allow_empty);
    let mut cuts: Vec<usize> = (1..parts)
        .map(|_| rng.random_range(low..batch.saturating_sub(low).max(low + 1)))
        .collect();
    cuts.sort_unstable();
    if !allow_empty {
        cuts.dedup();
    }
    let mut runs = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([batch]) {
        runs.push(start..cut.max(start));
        start = cut.max(start);
    }
    runs
}

/// The positives a test draws, owned.
enum Drawn {
    SimClr,
    Labels(Array1<i64>),
    Mask(Array2<f32>),
    Sets(Array2<bool>, LabelSetWeight),
}

impl Drawn {
    fn all(rng: &mut StdRng, batch: usize) -> Vec<(&'static str, Drawn)> {
        vec![
            ("SimCLR", Drawn::SimClr),
            ("labels", Drawn::Labels(labels(rng, batch, batch / 3 + 1))),
            ("mask", Drawn::Mask(soft_mask(rng, batch))),
            (
                "jaccard sets",
                Drawn::Sets(label_sets(rng, batch, 5), LabelSetWeight::Jaccard),
            ),
            (
                "fraction sets",
                Drawn::Sets(label_sets(rng, batch, 4), LabelSetWeight::Fraction),
            ),
        ]
    }

    fn whole(&self) -> Positives<'_> {
        match self {
            Drawn::SimClr => Positives::SimClr,
            Drawn::Labels(labels) => Positives::Labels(labels.view()),
            Drawn::Mask(mask) => Positives::Mask(mask.view()),
            Drawn::Sets(sets, weight) => Positives::LabelSets {
                sets: sets.view(),
                weight: *weight,
            },
        }
    }

    /// A rank's part: its labels or sets, or its rows of the mask.
    fn local(&self, samples: &Range<usize>) -> Positives<'_> {
        let rows = samples.clone();
        match self {
            Drawn::SimClr => Positives::SimClr,
            Drawn::Labels(labels) => Positives::Labels(labels.slice(s![rows])),
            Drawn::Mask(mask) => Positives::Mask(mask.slice(s![rows, ..])),
            Drawn::Sets(sets, weight) => Positives::LabelSets {
                sets: sets.slice(s![rows, ..]),
                weight: *weight,
            },
        }
    }
}

/// A slice of the option space: both contrast modes, the three denominators, both summations,
/// each reduction and policy, a cap and normalisation now and then; about one in `one_in` of
/// its 12 configurations.
fn options(rng: &mut StdRng, one_in: u32) -> Vec<SupConLoss> {
    let mut grid = Vec::new();
    for mode in [ContrastMode::All, ContrastMode::One] {
        for denominator in [
            Denominator::All,
            Denominator::OnlyNegatives,
            Denominator::OnePositive,
        ] {
            for summation in [Summation::Outside, Summation::Inside] {
                let reduction =
                    [Reduction::Mean, Reduction::Sum, Reduction::None][rng.random_range(0..3)];
                let policy = [NoPositivePolicy::ZeroAndCount, NoPositivePolicy::Exclude]
                    [rng.random_range(0..2)];
                let mut builder = SupConLoss::builder()
                    .temperature(0.1 + rng.random::<f64>() * 0.4)
                    .contrast_mode(mode)
                    .denominator(denominator)
                    .summation(summation)
                    .reduction(reduction)
                    .no_positive(policy)
                    .normalize(rng.random_range(0..3) == 0);
                if rng.random_range(0..3) == 0 {
                    builder = builder.positives_cap(rng.random_range(1..4));
                }
                if rng.random_range(0..one_in) == 0 {
                    grid.push(builder.build().unwrap());
                }
            }
        }
    }
    grid
}

fn upstream_values(rng: &mut StdRng, anchors: usize) -> Array1<f64> {
    Array1::from_shape_fn(anchors, |_| rng.random_range(0.5..1.5))
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// Asserts that `runs`' shards on `backend` assemble bitwise into its whole forward output
/// (the loss within 1e-12: the covered anchors are summed in another order) and that their
/// gradients concatenate bitwise into its whole gradient.
fn assert_shards_are_the_whole_pass<B: Backend>(
    backend: &B,
    loss: &SupConLoss,
    z: &Array3<f32>,
    positives: Positives<'_>,
    runs: &[Range<usize>],
    upstream: Upstream<'_>,
    what: &str,
) {
    let whole = backend.forward(loss, z.view(), positives).unwrap();
    let shards: Vec<_> = runs
        .iter()
        .map(|run| {
            backend
                .forward_shard(loss, z.view(), positives, run.clone())
                .unwrap()
        })
        .collect();
    let assembled = ForwardOutput::from_shards(loss, whole.state.shape(), &shards).unwrap();
    assert_eq!(assembled.per_anchor, whole.per_anchor, "{what}: ℓ");
    let (got, want) = (&assembled.state, &whole.state);
    assert_eq!(got.lse(), want.lse(), "{what}: LSE");
    assert_eq!(got.lse_positive(), want.lse_positive(), "{what}: LSE^P");
    assert_eq!(got.positive_weight(), want.positive_weight(), "{what}: P");
    assert_eq!(
        got.mean_denominator(),
        want.mean_denominator(),
        "{what}: R'"
    );
    match (assembled.loss, whole.loss) {
        (Some(got), Some(want)) => assert!(relative(got, want) < 1e-12, "{what}: {got} vs {want}"),
        (got, want) => assert_eq!(got, want, "{what}"),
    }
    let want: Array3<f32> = backend
        .backward(loss, z.view(), positives, &whole.state, upstream)
        .unwrap();
    let pieces: Vec<Array3<f32>> = runs
        .iter()
        .map(|run| {
            backend
                .backward_shard(
                    loss,
                    z.view(),
                    positives,
                    &assembled.state,
                    upstream,
                    run.clone(),
                )
                .unwrap()
        })
        .collect();
    let views_of: Vec<_> = pieces.iter().map(|p| p.view()).collect();
    assert_eq!(
        concatenate(Axis(0), &views_of).unwrap(),
        want,
        "{what}: gradient"
    );
}

/// Every shard's statistics assemble into the whole forward output, bitwise on the CPU backend
/// (a shard's tiles reach each of its accumulators in the whole pass's order), and the shards'
/// gradients concatenate into the whole gradient, bitwise too. The reference's default shard
/// methods pick from its whole passes; they are compared within 1e-12.
#[test]
fn shards_assemble_into_the_whole_batch() {
    let mut rng = rng("shards_assemble_into_the_whole_batch");
    for (batch, views, dim) in [(37, 2, 9), (300, 2, 16), (203, 3, 7)] {
        let z = unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
        for (name, drawn) in Drawn::all(&mut rng, batch) {
            for loss in options(&mut rng, 1) {
                let parts = rng.random_range(1..5);
                let runs = ragged_runs(&mut rng, batch, parts, false);
                let what = format!("{batch}x{views}x{dim} {name} {loss:?} shards {runs:?}");
                let positives = drawn.whole();
                let values = upstream_values(&mut rng, loss_anchors(&loss, batch, views));
                let upstream = common::upstream_for(&loss, &values);
                assert_shards_are_the_whole_pass(
                    &CpuBackend,
                    &loss,
                    &z,
                    positives,
                    &runs,
                    upstream,
                    &what,
                );
                // The reference's default shard methods.
                let z64 = z.mapv(f64::from);
                let whole = ReferenceBackend
                    .forward(&loss, z64.view(), positives)
                    .unwrap();
                let shards: Vec<_> = runs
                    .iter()
                    .map(|run| {
                        ReferenceBackend
                            .forward_shard(&loss, z64.view(), positives, run.clone())
                            .unwrap()
                    })
                    .collect();
                let assembled =
                    ForwardOutput::from_shards(&loss, whole.state.shape(), &shards).unwrap();
                assert_eq!(
                    assembled.per_anchor, whole.per_anchor,
                    "{what}: reference ℓ"
                );
                if let (Some(got), Some(want)) = (assembled.loss, whole.loss) {
                    assert!(
                        relative(got, want) < 1e-12,
                        "{what}: reference {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Samples that no shard covers are contrasts only: the same as a mask that gives their rows no
/// positives, under a policy that does not count them (Exclude), and no gradient reaches them.
#[test]
fn uncovered_samples_are_contrasts_only() {
    let mut rng = rng("uncovered_samples_are_contrasts_only");
    let (batch, extra, views, dim) = (41, 17, 2, 8);
    let z = unit_features(&mut rng, (batch + extra, views, dim));
    let y = labels(&mut rng, batch + extra, 6);
    let mask = Array2::from_shape_fn((batch + extra, batch + extra), |(i, j)| {
        f32::from(u8::from(i < batch && y[i] == y[j]))
    });
    for mode in [ContrastMode::All, ContrastMode::One] {
        let loss = SupConLoss::builder()
            .contrast_mode(mode)
            .no_positive(NoPositivePolicy::Exclude)
            .temperature(0.2)
            .build()
            .unwrap();
        let shard = ReferenceBackend
            .forward_shard(&loss, z.view(), Positives::Labels(y.view()), 0..batch)
            .unwrap();
        let shape = supcon::BatchShape::new(batch + extra, views, dim).unwrap();
        let assembled = ForwardOutput::from_shards(&loss, shape, &[shard]).unwrap();
        let want = ReferenceBackend
            .forward(&loss, z.view(), Positives::Mask(mask.view()))
            .unwrap();
        assert!(
            relative(assembled.loss.unwrap(), want.loss.unwrap()) < 1e-12,
            "{mode:?}"
        );
        let grad = CpuBackend
            .backward_shard(
                &loss,
                z.mapv(|x| x as f32).view(),
                Positives::Labels(y.view()),
                &assembled.state,
                Upstream::Scalar(1.0),
                0..batch,
            )
            .unwrap();
        let want_grad = ReferenceBackend
            .backward(
                &loss,
                z.view(),
                Positives::Mask(mask.view()),
                &want.state,
                Upstream::Scalar(1.0),
            )
            .unwrap();
        let want_grad = want_grad.slice(s![0..batch, .., ..]);
        let error = common::relative_error(
            &grad.mapv(f64::from).iter().copied().collect::<Vec<_>>(),
            &want_grad.iter().copied().collect::<Vec<_>>(),
            1e-30,
        );
        assert!(error < 1e-5, "{mode:?}: gradient off by {error:e}");
    }
}

/// One sharded step on `ranks` threads: each rank's forward output (the whole batch's) and its
/// gradient rows, in rank order.
fn sharded_step<B: Backend + Clone + Send + Sync>(
    backend: &B,
    loss: &SupConLoss,
    z: &Array3<f64>,
    drawn: &Drawn,
    runs: &[Range<usize>],
    upstream: &[Option<Array1<f64>>],
) -> Vec<(ForwardOutput, Option<f64>, Array3<f64>)> {
    let groups = InProcessGroup::new(runs.len());
    thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .zip(runs)
            .zip(upstream)
            .enumerate()
            .map(|(rank, ((group, run), upstream))| {
                let sharded = ShardedSupCon::new(*loss, backend.clone(), group);
                scope.spawn(move || {
                    let local = z.slice(s![run.clone(), .., ..]);
                    let forward = sharded.forward(local, drawn.local(run)).unwrap();
                    let upstream = match upstream {
                        Some(values) => Upstream::PerAnchor(values.view()),
                        None => Upstream::Scalar(0.25 * (rank as f64 + 1.0)),
                    };
                    let grad = sharded.backward(&forward, upstream).unwrap();
                    (forward.output().clone(), forward.loss(), grad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// 1, 2, 3 and 4 ranks of ragged sizes (an empty rank among them) equal one device on the
/// concatenated batch: the reference sharded against the reference whole (loss within 1e-12
/// relative), the CPU backend sharded against the reference within the shared tolerance. Each
/// rank passes its own upstream gradient; the result is the gradient of their sum.
#[test]
fn sharded_loss_equals_one_device() {
    let mut rng = rng("sharded_loss_equals_one_device");
    let mut compared = 0;
    for (batch, views, dim) in [(29, 2, 6), (90, 2, 11), (64, 1, 5)] {
        let z = unit_features(&mut rng, (batch, views, dim));
        for (name, drawn) in Drawn::all(&mut rng, batch) {
            for loss in options(&mut rng, 3) {
                let ranks = rng.random_range(1..5);
                let runs = ragged_runs(&mut rng, batch, ranks, ranks > 2);
                let what = format!("{batch}x{views}x{dim} {name} {loss:?} ranks {runs:?}");
                let anchors_of = |run: &Range<usize>| match loss.contrast_mode() {
                    ContrastMode::All => run.len() * views,
                    ContrastMode::One => run.len(),
                };
                let upstream: Vec<Option<Array1<f64>>> = runs
                    .iter()
                    .map(|run| {
                        (loss.reduction() == Reduction::None)
                            .then(|| upstream_values(&mut rng, anchors_of(run)))
                    })
                    .collect();
                // The whole batch's upstream: the scalars summed, the per-anchor values placed.
                let whole_values = whole_upstream(&loss, batch, views, &runs, &upstream);
                let whole_upstream = match &whole_values {
                    Some(values) => Upstream::PerAnchor(values.view()),
                    None => {
                        Upstream::Scalar((0..runs.len()).map(|r| 0.25 * (r as f64 + 1.0)).sum())
                    }
                };
                let want = ReferenceBackend
                    .forward_backward(&loss, z.view(), drawn.whole(), whole_upstream)
                    .unwrap();
                for (backend, precision) in [("reference", Precision::F64), ("cpu", Precision::F32)]
                {
                    let results = if backend == "cpu" {
                        sharded_step(&CpuBackend, &loss, &z, &drawn, &runs, &upstream)
                    } else {
                        sharded_step(&ReferenceBackend, &loss, &z, &drawn, &runs, &upstream)
                    };
                    let grads: Vec<_> = results.iter().map(|r| r.2.view()).collect();
                    let grad = concatenate(Axis(0), &grads).unwrap();
                    for (output, reduced, _) in &results {
                        assert_eq!(*reduced, results[0].1, "{what}: ranks disagree");
                        if let (Some(got), Some(want)) = (reduced, want.0.loss) {
                            if precision == Precision::F64 {
                                assert!(relative(*got, want) < 1e-12, "{what}: {got} vs {want}");
                            }
                        }
                        let bound = Tolerance::new(
                            precision,
                            &loss,
                            &z,
                            max_weight(&drawn),
                            whole_upstream,
                            want.0.state.mean_denominator(),
                        );
                        let got = (output.clone(), grad.clone());
                        bound.check(&format!("{backend}: {what}"), &got, &want);
                    }
                    compared += 1;
                }
            }
        }
    }
    assert!(compared >= 20, "only {compared} comparisons");
}

fn max_weight(drawn: &Drawn) -> f64 {
    match drawn {
        Drawn::Mask(mask) => mask.iter().fold(0.0f64, |m, &w| m.max(f64::from(w))),
        _ => 1.0,
    }
}

fn whole_upstream(
    loss: &SupConLoss,
    batch: usize,
    views: usize,
    runs: &[Range<usize>],
    upstream: &[Option<Array1<f64>>],
) -> Option<Array1<f64>> {
    if loss.reduction() != Reduction::None {
        return None;
    }
    let anchor_views = match loss.contrast_mode() {
        ContrastMode::All => views,
        ContrastMode::One => 1,
    };
    let mut values = Array1::zeros(anchor_views * batch);
    for (run, local) in runs.iter().zip(upstream) {
        let local = local.as_ref().expect("per-anchor values");
        for v in 0..anchor_views {
            for (k, b) in run.clone().enumerate() {
                values[v * batch + b] = local[v * run.len() + k];
            }
        }
    }
    Some(values)
}

/// Bad shards are typed errors: samples outside the batch, an empty run, overlapping shards,
/// statistics of the wrong length; `NoPositivePolicy::Error` reports the batch's anchor row.
#[test]
fn bad_shards_are_typed_errors() {
    let mut rng = rng("bad_shards_are_typed_errors");
    let (batch, views, dim) = (12, 2, 4);
    let z = unit_features(&mut rng, (batch, views, dim));
    let loss = SupConLoss::builder().build().unwrap();
    let shape = supcon::BatchShape::new(batch, views, dim).unwrap();
    for samples in [0..0, 5..13, 11..20] {
        assert!(matches!(
            CpuBackend.forward_shard(&loss, z.view(), Positives::SimClr, samples.clone()),
            Err(Error::InvalidShard(_))
        ));
        assert!(matches!(
            ReferenceBackend.forward_shard(&loss, z.view(), Positives::SimClr, samples),
            Err(Error::InvalidShard(_))
        ));
    }
    let a = CpuBackend
        .forward_shard(&loss, z.view(), Positives::SimClr, 0..7)
        .unwrap();
    let b = CpuBackend
        .forward_shard(&loss, z.view(), Positives::SimClr, 5..12)
        .unwrap();
    assert!(matches!(
        ForwardOutput::from_shards(&loss, shape, &[a.clone(), b]),
        Err(Error::InvalidShard(_))
    ));
    assert!(matches!(
        ForwardOutput::from_shards(&loss, shape, &[]),
        Err(Error::InvalidShard(_))
    ));
    let short = supcon::ShardStatistics::from_parts(
        &loss,
        shape,
        0..7,
        [vec![0.0; 13], vec![0.0; 14], vec![0.0; 14], vec![0.0; 14]],
    );
    assert!(matches!(short, Err(Error::InvalidShard(_))));
    // Sample 9 alone in its class, with V = 1: anchor row 9 has no positive.
    let single = unit_features(&mut rng, (batch, 1, dim));
    let y: Vec<i64> = (0..batch as i64)
        .map(|b| if b == 9 { 100 } else { b % 3 })
        .collect();
    let strict = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    let shape = supcon::BatchShape::new(batch, 1, dim).unwrap();
    let shards: Vec<_> = [0..4, 4..12]
        .into_iter()
        .map(|run| {
            CpuBackend
                .forward_shard(&strict, single.view(), Positives::labels(&y), run)
                .unwrap()
        })
        .collect();
    assert_eq!(
        ForwardOutput::from_shards(&strict, shape, &shards).unwrap_err(),
        Error::AnchorWithoutPositives { anchor: 9 }
    );
}

/// A memory bank equals one device on the batch with the bank's samples appended as
/// contrasts only: the reference on the joined batch with a mask whose bank rows are empty,
/// under `Exclude` (so that they do not count in R'). The bank has wrapped around before the
/// step; the CPU and reference backends, labels, label sets and SimCLR, both contrast modes.
#[test]
fn memory_bank_equals_appended_contrasts() {
    let mut rng = rng("memory_bank_equals_appended_contrasts");
    let (views, dim, capacity) = (2, 7, 23);
    for (name, kind) in [("labels", 0), ("sets", 1), ("SimCLR", 2)] {
        for mode in [ContrastMode::All, ContrastMode::One] {
            let loss = SupConLoss::builder()
                .contrast_mode(mode)
                .no_positive(NoPositivePolicy::Exclude)
                .temperature(0.15)
                .reduction([Reduction::Mean, Reduction::None][rng.random_range(0..2)])
                .build()
                .unwrap();
            let mut bank = supcon::MemoryBank::<f64>::new(capacity, dim).unwrap();
            let draw = |rng: &mut StdRng, batch: usize| -> (Array3<f64>, Drawn) {
                let z = unit_features(rng, (batch, views, dim));
                let drawn = match kind {
                    0 => Drawn::Labels(Array1::from_shape_fn(batch, |_| rng.random_range(0..5))),
                    1 => Drawn::Sets(label_sets(rng, batch, 4), LabelSetWeight::Jaccard),
                    _ => Drawn::SimClr,
                };
                (z, drawn)
            };
            for batch in [9, 11, 8] {
                let (z, drawn) = draw(&mut rng, batch);
                bank.push(z.view(), drawn.whole()).unwrap();
            }
            assert_eq!(bank.len(), capacity);
            let batch = 13;
            let (z, drawn) = draw(&mut rng, batch);
            let held = bank.features().unwrap();
            let joined = concatenate(Axis(0), &[z.view(), held.view()]).unwrap();
            let total = batch + capacity;
            // The oracle's mask over the joined batch, bank rows empty.
            let full = match (&drawn, &bank.labels()) {
                (Drawn::Labels(y), Some(held)) => {
                    let all: Vec<i64> = y.iter().copied().chain(held.iter().copied()).collect();
                    common::label_mask(&Array1::from(all))
                }
                (Drawn::Sets(sets, weight), _) => {
                    let held_sets = bank.label_sets().unwrap();
                    let all = concatenate(Axis(0), &[sets.view(), held_sets.view()]).unwrap();
                    common::label_set_mask(&all, *weight)
                }
                _ => Array2::eye(total),
            };
            let mask =
                Array2::from_shape_fn(
                    (total, total),
                    |(i, j)| if i < batch { full[[i, j]] } else { 0.0 },
                );
            let values = upstream_values(&mut rng, loss_anchors(&loss, batch, views));
            let upstream = common::upstream_for(&loss, &values);
            // The oracle's upstream: the batch anchors' values at their joined rows.
            let joined_values = Array1::from_shape_fn(loss_anchors(&loss, total, views), |i| {
                let (v, b) = (i / total, i % total);
                if b < batch {
                    values[v * batch + b]
                } else {
                    0.0
                }
            });
            let joined_upstream = common::upstream_for(&loss, &joined_values);
            let (want, want_grad) = ReferenceBackend
                .forward_backward(
                    &loss,
                    joined.view(),
                    Positives::Mask(mask.view()),
                    joined_upstream,
                )
                .unwrap();
            let what = format!("{name} {mode:?} {:?}", loss.reduction());
            let forward = bank
                .forward(&ReferenceBackend, &loss, z.view(), drawn.whole())
                .unwrap();
            let grad = bank
                .backward(&ReferenceBackend, &loss, &forward, upstream)
                .unwrap();
            assert_eq!(
                grad.dim(),
                (batch, views, dim),
                "{what}: only the batch's rows"
            );
            if let (Some(got), Some(want)) = (forward.loss(), want.loss) {
                assert!(relative(got, want) < 1e-12, "{what}: {got} vs {want}");
            }
            let want_rows: Vec<f64> = (0..loss_anchors(&loss, batch, views))
                .map(|i| want.per_anchor[(i / batch) * total + i % batch])
                .collect();
            let error =
                common::relative_error(forward.per_anchor().iter(), want_rows.iter(), 1e-12);
            assert!(error < 1e-12, "{what}: ℓ off by {error:e}");
            let want_grad = want_grad.slice(s![0..batch, .., ..]).to_owned();
            let error = common::relative_error(grad.iter(), want_grad.iter(), 1e-30);
            assert!(error < 1e-10, "{what}: gradient off by {error:e}");
            // The CPU backend on the same bank, in f32.
            let mut cpu_bank = supcon::MemoryBank::<f32>::new(capacity, dim).unwrap();
            let held32 = held.mapv(|x| x as f32);
            let (held_labels, held_sets) = (bank.labels().map(Array1::from), bank.label_sets());
            let held_positives = match (&held_labels, &held_sets, &drawn) {
                (Some(y), _, _) => Positives::Labels(y.view()),
                (_, Some(sets), Drawn::Sets(_, weight)) => Positives::LabelSets {
                    sets: sets.view(),
                    weight: *weight,
                },
                _ => Positives::SimClr,
            };
            cpu_bank.push(held32.view(), held_positives).unwrap();
            let z32 = z.mapv(|x| x as f32);
            let forward = cpu_bank
                .forward(&CpuBackend, &loss, z32.view(), drawn.whole())
                .unwrap();
            let grad = cpu_bank
                .backward(&CpuBackend, &loss, &forward, upstream)
                .unwrap();
            if let (Some(got), Some(want)) = (forward.loss(), want.loss) {
                assert!(relative(got, want) < 1e-5, "{what}: cpu {got} vs {want}");
            }
            let grad: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
            let error = common::relative_error(grad.iter(), want_grad.iter(), 1e-30);
            assert!(error < 1e-4, "{what}: cpu gradient off by {error:e}");
        }
    }
}

fn loss_anchors(loss: &SupConLoss, batch: usize, views: usize) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => batch * views,
        ContrastMode::One => batch,
    }
}

/// The ring: pushes past the capacity keep the newest samples in order, a push larger than the
/// capacity keeps its own newest; bad pushes are typed errors and change nothing.
#[test]
fn memory_bank_is_a_fifo() {
    let mut rng = rng("memory_bank_is_a_fifo");
    let (views, dim, capacity) = (2, 3, 5);
    let mut bank = supcon::MemoryBank::<f32>::new(capacity, dim).unwrap();
    assert!(bank.is_empty() && bank.features().is_none());
    let mut pushed: Vec<(Array2<f32>, i64)> = Vec::new();
    let mut next = 0i64;
    for batch in [3, 4, 2, 7, 1] {
        let z = unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
        let y = Array1::from_shape_fn(batch, |_| {
            next += 1;
            next
        });
        bank.push(z.view(), Positives::Labels(y.view())).unwrap();
        for b in 0..batch {
            pushed.push((z.slice(s![b, .., ..]).to_owned(), y[b]));
        }
        let newest = &pushed[pushed.len().saturating_sub(capacity)..];
        assert_eq!(bank.len(), newest.len());
        let held = bank.features().unwrap();
        let labels = bank.labels().unwrap();
        for (k, (features, label)) in newest.iter().enumerate() {
            assert_eq!(
                held.slice(s![k, .., ..]),
                features.view(),
                "sample {k} after {batch}"
            );
            assert_eq!(labels[k], *label);
        }
    }
    let before = (bank.features(), bank.labels());
    let z = unit_features(&mut rng, (2, views, dim)).mapv(|x| x as f32);
    let wrong_views = unit_features(&mut rng, (2, 3, dim)).mapv(|x| x as f32);
    let mask = Array2::<f32>::eye(2);
    let sets = Array2::from_elem((2, 3), true);
    for result in [
        bank.push(wrong_views.view(), Positives::labels(&[1, 2])),
        bank.push(z.view(), Positives::Mask(mask.view())),
        bank.push(z.view(), Positives::SimClr),
        bank.push(
            z.view(),
            Positives::LabelSets {
                sets: sets.view(),
                weight: LabelSetWeight::Any,
            },
        ),
    ] {
        assert!(matches!(result, Err(Error::MemoryBank(_))), "{result:?}");
    }
    assert_eq!(
        bank.push(z.view(), Positives::labels(&[1])),
        Err(Error::LabelsLength {
            expected: 2,
            got: 1
        })
    );
    assert_eq!((bank.features(), bank.labels()), before);
    assert!(matches!(
        bank.forward(
            &CpuBackend,
            &SupConLoss::default(),
            z.view(),
            Positives::Mask(mask.view())
        ),
        Err(Error::MemoryBank(_))
    ));
    bank.clear();
    assert!(bank.is_empty());
    assert!(matches!(
        supcon::MemoryBank::<f32>::new(0, 3),
        Err(Error::MemoryBank(_))
    ));
}

/// The kernels (emulated) run a shard's statistics and gradient rows only, one launch per view's
/// run of rows: bitwise the whole pass's values, for every kind of positives.
#[cfg(feature = "emulation")]
#[test]
fn kernel_shards_are_bitwise_the_whole_pass() {
    let mut rng = rng("kernel_shards_are_bitwise_the_whole_pass");
    let backend = supcon::EmulatedBackend::default();
    for (batch, views, dim) in [(37, 2, 9), (70, 3, 5)] {
        let z = unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
        for (name, drawn) in Drawn::all(&mut rng, batch) {
            for loss in options(&mut rng, 4) {
                let parts = rng.random_range(2..4);
                let runs = ragged_runs(&mut rng, batch, parts, false);
                let what = format!("{batch}x{views}x{dim} {name} {loss:?} shards {runs:?}");
                let positives = drawn.whole();
                let values = upstream_values(&mut rng, loss_anchors(&loss, batch, views));
                let upstream = common::upstream_for(&loss, &values);
                assert_shards_are_the_whole_pass(
                    &backend, &loss, &z, positives, &runs, upstream, &what,
                );
            }
        }
    }
}

/// Ranks that disagree, or one rank's bad inputs, make every rank return an error (none waits
/// forever in a collective).
#[test]
fn ranks_that_disagree_all_fail() {
    let mut rng = rng("ranks_that_disagree_all_fail");
    let loss = SupConLoss::default();
    let z = [
        unit_features(&mut rng, (5, 2, 6)),
        unit_features(&mut rng, (4, 2, 7)),
    ];
    let y = Array1::from(vec![0i64, 1, 0, 1, 1]);
    // Other dims; then rank 1's labels of the wrong length.
    for (dims, labels_of_rank_1) in [((6, 7), 4), ((6, 6), 3)] {
        let z1 = if dims.1 == 7 {
            z[1].clone()
        } else {
            unit_features(&mut rng, (4, 2, 6))
        };
        let inputs = [
            (z[0].clone(), y.clone()),
            (z1, y.slice(s![..labels_of_rank_1]).to_owned()),
        ];
        let results: Vec<_> = thread::scope(|scope| {
            let handles: Vec<_> = InProcessGroup::new(2)
                .into_iter()
                .zip(&inputs)
                .map(|(group, (features, labels))| {
                    scope.spawn(move || {
                        ShardedSupCon::new(loss, CpuBackend, group)
                            .forward(features.view(), Positives::Labels(labels.view()))
                            .map(|_| ())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            matches!(results[0], Err(Error::Collective { .. })),
            "{:?}",
            results[0]
        );
        if labels_of_rank_1 == 3 {
            assert_eq!(
                results[1],
                Err(Error::LabelsLength {
                    expected: 4,
                    got: 3
                })
            );
        } else {
            assert!(
                matches!(results[1], Err(Error::Collective { .. })),
                "{:?}",
                results[1]
            );
        }
    }
    // A NaN upstream gradient on rank 1.
    let results: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = InProcessGroup::new(2)
            .into_iter()
            .enumerate()
            .map(|(rank, group)| {
                let (features, labels) = (&z[0], &y);
                scope.spawn(move || {
                    let sharded = ShardedSupCon::new(loss, CpuBackend, group);
                    let step =
                        sharded.forward(features.view(), Positives::Labels(labels.view()))?;
                    let upstream = if rank == 1 { f64::NAN } else { 1.0 };
                    sharded
                        .backward(&step, Upstream::Scalar(upstream))
                        .map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        matches!(results[0], Err(Error::Collective { .. })),
        "{:?}",
        results[0]
    );
    assert_eq!(results[1], Err(Error::NonFiniteUpstream));
}
