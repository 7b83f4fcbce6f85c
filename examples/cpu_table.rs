//! Prints a markdown table of the CPU backend's forward+backward time, throughput and memory
//! for N ∈ {2048, 8192, 32768, 65536} rows (D = 128, V = 2, f32, labels of 100 classes, default
//! loss options, which take the backend's dense fast path).
//! `cargo run --release --example cpu_table [N ...] [--inside] [--variants | --shards]`; `--inside` switches
//! to summation inside (L_in), which runs the general tile loops instead. `--variants` times, at
//! each N and one after the other, the label path beside label sets (K = 64 and 200 labels,
//! 1–3 a sample, each weight mode) and the fused normalisation, as ratios to the label path.
//! `--shards` times one rank's share of the sharded loss (`forward_shard` + `backward_shard` of
//! its B/W samples, on the whole batch) for W = 1, 2, 4, 8, as a ratio to the whole
//! forward+backward in the same run (ideally 1/W).
//!
//! Throughput is given two ways: against the 4·N²·D flops the backend executes (half of S in the
//! forward, half of S again and the full H·Z in the backward; docs/math.md, "Cost model") and
//! against the conventional 6·N²·D of an unfused forward + backward (S, then G·Z and Gᵀ·Z).
//!
//! Time: wall-clock time of the call (best of three up to N = 8192), and the CPU time the
//! process spent in it, summed over its threads (Linux `/proc/self/task/*/schedstat`). On a
//! machine shared with other work the wall time stretches by an unknown factor while the CPU
//! time does not; CPU time / threads is then the estimate of the uncontended wall time.
//!
//! Memory: a counting global allocator records the peak of live heap bytes during the call,
//! minus what was live before it (inputs), so the result gradient (4·N·D bytes) is included.
//! VmHWM is the process's peak resident set, inputs and all.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ndarray::{Array3, Axis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use supcon::{Backend, CpuBackend, LabelSetWeight, Positives, Summation, SupConLoss, Upstream};

/// The system allocator, counting live bytes and their peak.
struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (the caller upholds `alloc`'s contract).
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The process's peak resident set size in bytes (Linux), if readable.
fn peak_resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time consumed so far by all of this process's threads, in seconds (Linux), if readable.
fn process_cpu_seconds() -> Option<f64> {
    let mut nanoseconds = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let schedstat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        nanoseconds += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanoseconds as f64 * 1e-9)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One timed call: (best wall seconds, least CPU seconds, peak extra heap bytes) over `repeats`.
fn measure(
    loss: &SupConLoss,
    features: &Array3<f32>,
    positives: Positives<'_>,
    repeats: usize,
) -> (f64, f64, usize) {
    let (mut best, mut cpu, mut extra) = (f64::INFINITY, f64::INFINITY, 0);
    for _ in 0..repeats {
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let cpu_before = process_cpu_seconds().unwrap_or(f64::NAN);
        let start = Instant::now();
        let (out, grad) = CpuBackend
            .forward_backward(loss, features.view(), positives, Upstream::Scalar(1.0))
            .expect("forward+backward");
        best = best.min(start.elapsed().as_secs_f64());
        cpu = cpu.min(process_cpu_seconds().unwrap_or(f64::NAN) - cpu_before);
        extra = extra.max(PEAK.load(Ordering::Relaxed) - before);
        assert!(out.loss.is_some_and(f64::is_finite) && grad.iter().all(|g| g.is_finite()));
    }
    (best, cpu, extra)
}

/// `[batch, views, dim]` unit rows, uniform directions.
fn unit_rows(rng: &mut StdRng, (batch, views, dim): (usize, usize, usize)) -> Array3<f32> {
    let mut features =
        Array3::from_shape_fn((batch, views, dim), |_| rng.random_range(-1.0f32..1.0));
    for mut row in features.lanes_mut(Axis(2)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    features
}

/// Multi-hot `[batch, labels]` sets of 1–3 labels each.
fn label_sets(rng: &mut StdRng, batch: usize, labels: usize) -> ndarray::Array2<bool> {
    let mut sets = ndarray::Array2::from_elem((batch, labels), false);
    for mut set in sets.rows_mut() {
        for _ in 0..rng.random_range(1..=3) {
            set[rng.random_range(0..labels)] = true;
        }
    }
    sets
}

/// `--shards`: rank 0's shard of W ranks against the whole pass, at each N.
fn shards(sizes: &[usize], views: usize, dim: usize, loss: &SupConLoss) {
    let threads = rayon::current_num_threads();
    println!(
        "CPU backend, one rank's shard of the sharded loss (samples 0..B/W; forward_shard + \
         backward_shard on the whole batch, collectives left out), D = {dim}, V = {views}, f32, \
         labels (100 classes), {threads} rayon threads; best of 3\n"
    );
    println!("| N | W | shard wall (s) | whole fwd+bwd wall (s) | shard / whole | 1/W |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut rng = StdRng::seed_from_u64(7);
    for &n in sizes {
        let batch = n / views;
        let features = unit_rows(&mut rng, (batch, views, dim));
        let labels: Vec<i64> = (0..batch).map(|_| rng.random_range(0..100)).collect();
        let positives = Positives::labels(&labels);
        let (whole, _, _) = measure(loss, &features, positives, 3);
        let state = CpuBackend
            .forward(loss, features.view(), positives)
            .expect("forward")
            .state;
        for ranks in [1, 2, 4, 8] {
            let samples = 0..batch / ranks;
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let start = Instant::now();
                let statistics = CpuBackend
                    .forward_shard(loss, features.view(), positives, samples.clone())
                    .expect("forward_shard");
                let grad = CpuBackend
                    .backward_shard(
                        loss,
                        features.view(),
                        positives,
                        &state,
                        Upstream::Scalar(1.0),
                        samples.clone(),
                    )
                    .expect("backward_shard");
                best = best.min(start.elapsed().as_secs_f64());
                assert!(statistics.per_anchor().iter().all(|l| l.is_finite()));
                assert!(grad.iter().all(|g| g.is_finite()));
            }
            println!(
                "| {n} | {ranks} | {best:.3} | {whole:.3} | {:.3} | {:.3} |",
                best / whole,
                1.0 / ranks as f64
            );
        }
    }
}

/// `--variants`: the label path beside label sets and normalisation, at each N.
fn variants(sizes: &[usize], views: usize, dim: usize) {
    let threads = rayon::current_num_threads();
    println!(
        "CPU backend, forward+backward, D = {dim}, V = {views}, f32, default options, \
         {threads} rayon threads; each row the best of 3 calls, run one after the other\n"
    );
    println!(
        "| N | positives | normalize | fwd+bwd wall (s) | CPU time / {threads} threads (s) \
         | × labels (wall) | × labels (CPU) | peak extra heap (MiB) |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    let mut rng = StdRng::seed_from_u64(7);
    let plain = SupConLoss::default();
    let normalized = SupConLoss::builder()
        .normalize(true)
        .build()
        .expect("valid");
    for &n in sizes {
        let batch = n / views;
        let features = unit_rows(&mut rng, (batch, views, dim));
        // Raw rows of norms 0.5–2 for the normalised runs.
        let raw = features.mapv(|x| x * rng.random_range(0.5f32..2.0));
        let labels: Vec<i64> = (0..batch).map(|_| rng.random_range(0..100)).collect();
        let sets_64 = label_sets(&mut rng, batch, 64);
        let sets_200 = label_sets(&mut rng, batch, 200);
        fn sets(sets: &ndarray::Array2<bool>, weight: LabelSetWeight) -> Positives<'_> {
            Positives::LabelSets {
                sets: sets.view(),
                weight,
            }
        }
        let cases = [
            (
                "labels (100 classes)",
                &plain,
                &features,
                Positives::labels(&labels),
            ),
            (
                "label sets K = 64, any",
                &plain,
                &features,
                sets(&sets_64, LabelSetWeight::Any),
            ),
            (
                "label sets K = 64, jaccard",
                &plain,
                &features,
                sets(&sets_64, LabelSetWeight::Jaccard),
            ),
            (
                "label sets K = 64, fraction",
                &plain,
                &features,
                sets(&sets_64, LabelSetWeight::Fraction),
            ),
            (
                "label sets K = 200, any",
                &plain,
                &features,
                sets(&sets_200, LabelSetWeight::Any),
            ),
            (
                "labels (100 classes)",
                &normalized,
                &raw,
                Positives::labels(&labels),
            ),
            (
                "label sets K = 64, any",
                &normalized,
                &raw,
                sets(&sets_64, LabelSetWeight::Any),
            ),
        ];
        let mut baseline = None;
        for (name, loss, features, positives) in cases {
            let (wall, cpu, extra) = measure(loss, features, positives, 3);
            let (base_wall, base_cpu) = *baseline.get_or_insert((wall, cpu));
            println!(
                "| {n} | {name} | {} | {wall:.3} | {:.3} | {:.2} | {:.2} | {:.1} |",
                if loss.normalize() { "yes" } else { "no" },
                cpu / threads as f64,
                wall / base_wall,
                cpu / base_cpu,
                mib(extra),
            );
        }
    }
}

fn main() {
    let inside = std::env::args().any(|a| a == "--inside");
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2048, 8192, 32768, 65536]
    } else {
        sizes
    };
    let (views, dim) = (2, 128);
    if std::env::args().any(|a| a == "--variants") {
        return variants(&sizes, views, dim);
    }
    let loss = if inside {
        SupConLoss::builder()
            .summation(Summation::Inside)
            .build()
            .expect("valid options")
    } else {
        SupConLoss::default()
    };
    if std::env::args().any(|a| a == "--shards") {
        return shards(&sizes, views, dim, &loss);
    }
    println!(
        "CPU backend, forward+backward, D = {dim}, V = {views}, f32, labels (100 classes), {}, \
         {} rayon threads\n",
        if inside {
            "L_in (general tile loops)"
        } else {
            "default options (dense fast path)"
        },
        rayon::current_num_threads()
    );
    let threads = rayon::current_num_threads();
    println!(
        "| N | fwd+bwd wall (s) | CPU time (s) | CPU time / {threads} threads (s) \
         | GFLOP/s (4·N²·D) | GFLOP/s (6·N²·D) | peak extra heap (MiB) | extra / (N·D) (bytes) \
         | VmHWM (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rng = StdRng::seed_from_u64(7);
    for n in sizes {
        let batch = n / views;
        let features = unit_rows(&mut rng, (batch, views, dim));
        let labels: Vec<i64> = (0..batch).map(|_| rng.random_range(0..100)).collect();
        // Small sizes: best of three runs; large ones run once.
        let repeats = if n <= 8192 { 3 } else { 1 };
        let (best, cpu, extra) = measure(&loss, &features, Positives::labels(&labels), repeats);
        let flops = (n as f64).powi(2) * dim as f64;
        println!(
            "| {n} | {best:.3} | {cpu:.3} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
            cpu / threads as f64,
            4.0 * flops / best / 1e9,
            6.0 * flops / best / 1e9,
            mib(extra),
            extra as f64 / (n * dim) as f64,
            peak_resident_bytes().map_or(f64::NAN, mib),
        );
    }
}
