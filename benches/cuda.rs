//! CUDA benchmarks (feature `cuda`): forward+backward of the SupCon loss on device-resident
//! `[N/2, 2, 128]` batches with labels, f32 and bf16, each on every kernel family that reads it
//! (bf16: tensor cores and SIMT; f32: SIMT and split tensor cores), compared in one group. Each sample times a batch of iterations
//! between two stream synchronisations (`iter_custom`), so the time is the GPU's, not the
//! launch queue's. The throughput column counts 6·N²·D flops as "elements": Gelem/s = GFLOP/s.
//!
//! Where the CUDA backend cannot run (no driver, no GPU, kernels not built), the group is
//! skipped with a message.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use supcon::cuda::{CudaFeature, DevicePositives};
use supcon::{BatchShape, CudaBackend, Precision, SupConLoss, Upstream};

const DIM: usize = 128;
const SIZES: [usize; 2] = [4096, 16384];

/// Deterministic unit-norm features `[rows, DIM]` (SplitMix64 values in [-1, 1)).
fn unit_rows<T: CudaFeature>(rows: usize, convert: fn(f32) -> T) -> Vec<T> {
    let mut state = rows as u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) >> 40
    };
    let mut out = Vec::with_capacity(rows * DIM);
    for _ in 0..rows {
        let row: Vec<f32> = (0..DIM)
            .map(|_| next() as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        out.extend(row.iter().map(|&x| convert(x / norm)));
    }
    out
}

fn bench_dtype<T: CudaFeature>(
    c: &mut Criterion,
    cuda: &CudaBackend,
    name: &str,
    convert: fn(f32) -> T,
) {
    let stream = cuda.stream();
    let loss = SupConLoss::default();
    let mut group = c.benchmark_group("cuda");
    group.sample_size(10);
    for rows in SIZES {
        let shape = BatchShape::new(rows / 2, 2, DIM).unwrap();
        let labels: Vec<i64> = (0..shape.batch() as i64).map(|b| b % 100).collect();
        let features = stream
            .clone_htod(&unit_rows(rows, convert))
            .expect("upload features");
        let labels = stream.clone_htod(&labels).expect("upload labels");
        let mut grad = stream
            .alloc_zeros::<f32>(rows * DIM)
            .expect("allocate the gradient");
        let (features, labels) = (features.as_view(), labels.as_view());
        let positives = DevicePositives::Labels(&labels);
        group.throughput(Throughput::Elements(6 * (rows * rows * DIM) as u64));
        group.bench_function(BenchmarkId::new(format!("fwd+bwd/{name}"), rows), |b| {
            b.iter_custom(|iters| {
                stream.synchronize().expect("synchronise");
                let start = Instant::now();
                for _ in 0..iters {
                    let forward = cuda
                        .forward_device(&loss, &features, shape, positives)
                        .expect("forward");
                    cuda.backward_device_into(
                        &forward,
                        &features,
                        positives,
                        Upstream::Scalar(1.0),
                        &mut grad.as_view_mut(),
                    )
                    .expect("backward");
                    black_box(forward);
                }
                stream.synchronize().expect("synchronise");
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn cuda_benches(c: &mut Criterion) {
    let cuda = match CudaBackend::new(0) {
        Ok(cuda) => cuda,
        Err(error) => {
            eprintln!("cuda benchmarks skipped: the CUDA backend cannot run here ({error})");
            return;
        }
    };
    let with = |precision| cuda.clone().with_precision(precision);
    bench_dtype(c, &with(Precision::F32), "f32/simt", |x| x);
    bench_dtype(c, &with(Precision::Bf16x3), "f32/mma-bf16x3", |x| x);
    bench_dtype(c, &with(Precision::F32), "bf16/simt", bf16::from_f32);
    bench_dtype(c, &with(Precision::Auto), "bf16/mma", bf16::from_f32);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = cuda_benches
}
criterion_main!(benches);
