//! Prints a markdown table of the CPU backend's forward+backward time, throughput and memory
//! for N ∈ {2048, 8192, 32768, 65536} rows (D = 128, V = 2, f32, labels of 100 classes, default
//! loss options, which take the backend's dense fast path).
//! `cargo run --release --example cpu_table [N ...] [--inside]`; `--inside` switches to
//! summation inside (L_in), which runs the general tile loops instead.
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
use supcon::{Backend, CpuBackend, Positives, Summation, SupConLoss, Upstream};

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
    let loss = if inside {
        SupConLoss::builder()
            .summation(Summation::Inside)
            .build()
            .expect("valid options")
    } else {
        SupConLoss::default()
    };
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
        let mut features =
            Array3::from_shape_fn((batch, views, dim), |_| rng.random_range(-1.0f32..1.0));
        for mut row in features.lanes_mut(Axis(2)) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.mapv_inplace(|v| v / norm);
        }
        let labels: Vec<i64> = (0..batch).map(|_| rng.random_range(0..100)).collect();
        // Small sizes: best of three runs; large ones run once.
        let repeats = if n <= 8192 { 3 } else { 1 };
        let (mut best, mut cpu, mut extra) = (f64::INFINITY, f64::INFINITY, 0);
        for _ in 0..repeats {
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let cpu_before = process_cpu_seconds().unwrap_or(f64::NAN);
            let start = Instant::now();
            let (out, grad) = CpuBackend
                .forward_backward(
                    &loss,
                    features.view(),
                    Positives::labels(&labels),
                    Upstream::Scalar(1.0),
                )
                .expect("forward+backward");
            best = best.min(start.elapsed().as_secs_f64());
            cpu = cpu.min(process_cpu_seconds().unwrap_or(f64::NAN) - cpu_before);
            extra = extra.max(PEAK.load(Ordering::Relaxed) - before);
            assert!(out.loss.is_some_and(f64::is_finite) && grad.iter().all(|g| g.is_finite()));
        }
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
