//! Criterion benchmarks: the fused CPU backend against the f64 reference, forward and
//! forward+backward, N ∈ {512, 2048, 8192} rows (D = 128, V = 2, f32, labels of 100 classes,
//! default options). The reference runs at N ≤ 2048 only (it is O(N²·D) scalar f64 and takes
//! seconds at 8192). Sample counts and times are kept small so that the whole run takes a few
//! minutes on 2 cores: `cargo bench --bench cpu`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array3, Axis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use supcon::{Backend, CpuBackend, Positives, ReferenceBackend, SupConLoss, Upstream};

const DIM: usize = 128;
const VIEWS: usize = 2;

/// Unit-norm random features `[N/V, V, D]` and labels of 100 classes.
fn batch(rows: usize) -> (Array3<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(rows as u64);
    let batch = rows / VIEWS;
    let mut features =
        Array3::from_shape_fn((batch, VIEWS, DIM), |_| rng.random_range(-1.0f32..1.0));
    for mut row in features.lanes_mut(Axis(2)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    let labels = (0..batch).map(|_| rng.random_range(0..100)).collect();
    (features, labels)
}

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &B, sizes: &[usize]) {
    let loss = SupConLoss::default();
    let mut group = c.benchmark_group(backend.name());
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &rows in sizes {
        let (features, labels) = batch(rows);
        // Elements of S touched per pass: N².
        group.throughput(Throughput::Elements((rows * rows) as u64));
        group.bench_with_input(BenchmarkId::new("forward", rows), &rows, |b, _| {
            b.iter(|| {
                backend
                    .forward(
                        &loss,
                        black_box(features.view()),
                        Positives::labels(&labels),
                    )
                    .expect("forward")
            })
        });
        group.bench_with_input(BenchmarkId::new("forward_backward", rows), &rows, |b, _| {
            b.iter(|| {
                backend
                    .forward_backward(
                        &loss,
                        black_box(features.view()),
                        Positives::labels(&labels),
                        Upstream::Scalar(1.0),
                    )
                    .expect("forward_backward")
            })
        });
    }
    group.finish();
}

fn reference_vs_cpu(c: &mut Criterion) {
    bench_backend(c, &ReferenceBackend, &[512, 2048]);
    bench_backend(c, &CpuBackend, &[512, 2048, 8192]);
}

criterion_group!(benches, reference_vs_cpu);
criterion_main!(benches);
