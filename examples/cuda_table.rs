//! The CUDA rows of the GPU check's performance table (scripts/gpu-check.sh): forward+backward
//! time, achieved TFLOP/s (counting 6·N²·D) and peak device memory of the SupCon loss for each
//! N and element type, one markdown row each, on device-resident inputs (no host copies timed).
//!
//! ```sh
//! cargo run --release --features cuda --example cuda_table -- \
//!     --sizes 4096,16384,65536,262144 --dim 128 --dtypes f32,bf16 --header
//! ```
//!
//! Each dtype comes on every kernel family that reads it, side by side: half-precision rows on
//! the tensor-core kernels (`Precision::Auto`, "mma") and on the f32 SIMT kernels
//! (`Precision::F32`, "simt"); f32 rows on the SIMT kernels and on tensor cores with split
//! operands (`Precision::Bf16x3`, "mma bf16x3"). `--precisions auto,f32,bf16x3` (the default)
//! chooses among them.
//!
//! Batches are `[N/2, 2, D]` unit-norm features with labels from `--classes` classes, the
//! default loss options (τ = τ_b = 0.07, contrast mode all, mean; `--denominator all |
//! only-negatives | one-positive` changes the denominator). `--label-sets K` gives each sample
//! a set of two of K labels instead (a `[B, K]` byte matrix on the device, packed by the
//! forward), `--positives-cap k` caps the positives (bounds found on the device): both time
//! the device-side preparation with the loss. `--normalize` runs the fused normalisation (its
//! row scales computed by the forward; the SIMT kernels, whatever the precision; the features
//! are then scaled by 3, so that they are not unit rows already). Each row is the median of
//! up to `--repeats` timed iterations after a warm-up, stopping early past `--cap-s` seconds;
//! rows past `--budget-s` are reported as skipped. Peak memory is the high-water mark of the
//! device's memory pool (cudarc allocates from it), reset after the inputs are uploaded: inputs,
//! outputs and every temporary, as PyTorch's `max_memory_allocated` counts them.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys, CudaContext};
use half::bf16;
use supcon::cuda::{CudaFeature, DevicePositives};
use supcon::{
    BatchShape, CudaBackend, Denominator, LabelSetWeight, Precision, SupConLoss, Upstream,
};

struct Args {
    sizes: Vec<usize>,
    dim: usize,
    dtypes: Vec<String>,
    precisions: Vec<Precision>,
    classes: i64,
    denominator: Denominator,
    label_sets: Option<usize>,
    positives_cap: Option<usize>,
    normalize: bool,
    repeats: usize,
    cap: Duration,
    budget: Duration,
    header: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sizes: vec![4096, 16384, 65536, 262_144],
        dim: 128,
        dtypes: vec!["f32".into(), "bf16".into()],
        precisions: vec![Precision::Auto, Precision::F32, Precision::Bf16x3],
        classes: 100,
        denominator: Denominator::All,
        label_sets: None,
        positives_cap: None,
        normalize: false,
        repeats: 10,
        cap: Duration::from_secs(10),
        budget: Duration::from_secs(120),
        header: false,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        if flag == "--header" {
            args.header = true;
            continue;
        }
        if flag == "--normalize" {
            args.normalize = true;
            continue;
        }
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        let seconds = |v: &str| {
            v.parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| format!("{flag} {v}: not a number of seconds"))
        };
        match flag.as_str() {
            "--sizes" => args.sizes = value.split(',').map(number).collect::<Result<_, _>>()?,
            "--dim" => args.dim = number(&value)?,
            "--dtypes" => args.dtypes = value.split(',').map(str::to_string).collect(),
            "--precisions" => {
                args.precisions = value
                    .split(',')
                    .map(|p| match p {
                        "auto" => Ok(Precision::Auto),
                        "f32" => Ok(Precision::F32),
                        "bf16x3" => Ok(Precision::Bf16x3),
                        other => Err(format!("--precisions {other}: auto, f32 or bf16x3")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--classes" => args.classes = number(&value)?.max(1) as i64,
            "--denominator" => {
                args.denominator = match value.as_str() {
                    "all" => Denominator::All,
                    "only-negatives" => Denominator::OnlyNegatives,
                    "one-positive" => Denominator::OnePositive,
                    other => {
                        return Err(format!(
                            "--denominator {other}: all, only-negatives or one-positive"
                        ))
                    }
                }
            }
            "--label-sets" => args.label_sets = Some(number(&value)?.max(1)),
            "--positives-cap" => args.positives_cap = Some(number(&value)?),
            "--repeats" => args.repeats = number(&value)?,
            "--cap-s" => args.cap = seconds(&value)?,
            "--budget-s" => args.budget = seconds(&value)?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if let Some(odd) = args.sizes.iter().find(|&&n| n < 4 || n % 2 == 1) {
        return Err(format!(
            "--sizes: N = {odd} must be even and at least 4 (V = 2 views)"
        ));
    }
    Ok(args)
}

/// SplitMix64: deterministic inputs without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The device memory pool's high-water mark, for peak-memory measurement.
struct PoolWatermark {
    pool: sys::CUmemoryPool,
}

impl PoolWatermark {
    /// `None` where the device has no memory pools (then cudarc does not allocate from one).
    fn new(context: &CudaContext) -> Option<Self> {
        if !context.has_async_alloc() {
            return None;
        }
        // SAFETY: `cu_device` is a device handle of a live context.
        let pool = unsafe { result::device::get_mem_pool(context.cu_device()) }.ok()?;
        Some(PoolWatermark { pool })
    }

    /// Restarts the high-water mark from the memory in use now.
    fn reset(&self) {
        let mut zero: u64 = 0;
        // SAFETY: the pool is valid; USED_MEM_HIGH takes a u64, and only 0 is allowed.
        let reset = unsafe {
            result::mem_pool::set_attribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&raw mut zero).cast(),
            )
        };
        if let Err(error) = reset {
            eprintln!("resetting the pool's high-water mark failed: {error}");
        }
    }

    fn peak_bytes(&self) -> Option<u64> {
        let mut value: u64 = 0;
        // SAFETY: the pool is valid; USED_MEM_HIGH is a u64.
        unsafe {
            result::mem_pool::get_attribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&raw mut value).cast(),
            )
        }
        .ok()?;
        Some(value)
    }
}

/// One table row: median seconds per forward+backward and peak bytes.
fn measure<T: CudaFeature>(
    cuda: &CudaBackend,
    watermark: Option<&PoolWatermark>,
    args: &Args,
    rows: usize,
    convert: fn(f32) -> T,
) -> Result<(f64, Option<u64>, f64), supcon::Error> {
    let stream = cuda.stream();
    let cuda_error = |e: cudarc::driver::DriverError| supcon::Error::Cuda {
        operation: "preparing the benchmark's buffers".into(),
        code: e.0 as i32,
        name: format!("{:?}", e.0),
    };
    let shape = BatchShape::new(rows / 2, 2, args.dim)?;
    let mut rng = SplitMix(rows as u64);
    let mut features = Vec::with_capacity(rows * args.dim);
    for _ in 0..rows {
        let row: Vec<f32> = (0..args.dim).map(|_| rng.symmetric()).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        let scale = if args.normalize { 3.0 } else { 1.0 } / norm;
        features.extend(row.iter().map(|&x| convert(x * scale)));
    }
    let labels: Vec<i64> = (0..shape.batch())
        .map(|_| (rng.next() % args.classes as u64) as i64)
        .collect();
    // Two labels per sample: its class and one drawn at random.
    let classes = args.label_sets.unwrap_or(1);
    let mut memberships = vec![0u8; shape.batch() * classes];
    for (b, &label) in labels.iter().enumerate() {
        memberships[b * classes + label as usize % classes] = 1;
        memberships[b * classes + (rng.next() % classes as u64) as usize] = 1;
    }
    let features = stream.clone_htod(&features).map_err(cuda_error)?;
    let labels = stream.clone_htod(&labels).map_err(cuda_error)?;
    let memberships = stream.clone_htod(&memberships).map_err(cuda_error)?;
    let mut grad = stream
        .alloc_zeros::<f32>(rows * args.dim)
        .map_err(cuda_error)?;
    stream.synchronize().map_err(cuda_error)?;
    if let Some(w) = watermark {
        w.reset();
    }

    let mut builder = SupConLoss::builder()
        .denominator(args.denominator)
        .normalize(args.normalize);
    if let Some(cap) = args.positives_cap {
        builder = builder.positives_cap(cap);
    }
    let loss = builder.build()?;
    let features = features.as_view();
    let labels = labels.as_view();
    let memberships = memberships.as_view();
    let positives = match args.label_sets {
        Some(classes) => DevicePositives::LabelSets {
            memberships: &memberships,
            classes,
            weight: LabelSetWeight::Any,
        },
        None => DevicePositives::Labels(&labels),
    };
    let mut step = || -> Result<Duration, supcon::Error> {
        let start = Instant::now();
        let forward = cuda.forward_device(&loss, &features, shape, positives)?;
        cuda.backward_device_into(
            &forward,
            &features,
            positives,
            Upstream::Scalar(1.0),
            &mut grad.as_view_mut(),
        )?;
        stream.synchronize().map_err(cuda_error)?;
        Ok(start.elapsed())
    };
    let warm_up = step()?;
    let mut times = Vec::new();
    let mut spent = warm_up;
    while times.len() < args.repeats && spent < args.cap {
        let t = step()?;
        spent += t;
        times.push(t);
    }
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or(warm_up);
    let peak = watermark.and_then(PoolWatermark::peak_bytes);
    let sample_loss = cuda
        .forward_device(&loss, &features, shape, positives)?
        .loss_host()?
        .unwrap_or(f64::NAN);
    Ok((median.as_secs_f64(), peak, sample_loss))
}

/// Which kernels `precision` runs for features of `dtype` (the SIMT ones under `normalize`).
fn kernel_family(dtype: &str, precision: Precision, normalize: bool) -> &'static str {
    match (dtype, precision) {
        _ if normalize => "simt",
        ("f32", Precision::Bf16x3) => "mma bf16x3",
        ("f32", _) | (_, Precision::F32) => "simt",
        (_, Precision::Auto | Precision::Bf16x3) => "mma",
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("cuda_table: {message}");
            return ExitCode::from(2);
        }
    };
    let cuda = match CudaBackend::new(0) {
        Ok(cuda) => cuda,
        Err(error) => {
            eprintln!("cuda_table: the CUDA backend cannot run here: {error}");
            return ExitCode::FAILURE;
        }
    };
    let watermark = PoolWatermark::new(cuda.context());
    if args.header {
        println!("| implementation | dtype | N | D | fwd+bwd (ms) | TFLOP/s (6·N²·D) | peak memory (MiB) |");
        println!("|---|---|---|---|---|---|---|");
    }
    let started = Instant::now();
    let mut failed = false;
    for dtype in &args.dtypes {
        for &precision in &args.precisions {
            let kernels = kernel_family(dtype, precision, args.normalize);
            // One row per kernel family: the first precision in the list that runs it.
            let first = args
                .precisions
                .iter()
                .find(|&&p| kernel_family(dtype, p, args.normalize) == kernels);
            if first != Some(&precision) {
                continue;
            }
            let backend = cuda.clone().with_precision(precision);
            for &rows in &args.sizes {
                let denominator = match args.denominator {
                    Denominator::All => "",
                    Denominator::OnlyNegatives => ", only negatives",
                    Denominator::OnePositive => ", one positive",
                };
                let positives = match (args.label_sets, args.positives_cap) {
                    (Some(k), Some(cap)) => format!(", label sets K = {k}, cap {cap}"),
                    (Some(k), None) => format!(", label sets K = {k}"),
                    (None, Some(cap)) => format!(", cap {cap}"),
                    (None, None) => String::new(),
                };
                let normalized = if args.normalize { ", normalize" } else { "" };
                let label = format!(
                    "| supcon cuda {kernels}{denominator}{positives}{normalized} | {dtype} | {rows} | {} |",
                    args.dim
                );
                if started.elapsed() > args.budget {
                    println!("{label} skipped (time budget) | | |");
                    continue;
                }
                let watermark = watermark.as_ref();
                let result = match dtype.as_str() {
                    "f32" => measure(&backend, watermark, &args, rows, |x| x),
                    "bf16" => measure(&backend, watermark, &args, rows, bf16::from_f32),
                    "f16" => measure(&backend, watermark, &args, rows, half::f16::from_f32),
                    other => {
                        eprintln!("cuda_table: unknown dtype {other} (f32, f16, bf16)");
                        return ExitCode::from(2);
                    }
                };
                match result {
                    Ok((seconds, peak, loss)) => {
                        let flops = 6.0 * (rows as f64).powi(2) * args.dim as f64;
                        let peak = peak.map_or("n/a".to_string(), |b| {
                            format!("{:.0}", b as f64 / f64::from(1 << 20))
                        });
                        println!(
                            "{label} {:.3} | {:.1} | {peak} |",
                            seconds * 1e3,
                            flops / seconds / 1e12
                        );
                        eprintln!("{dtype} {kernels} N = {rows}: loss {loss:.6}");
                    }
                    Err(error) => {
                        println!("{label} error: {error} | | |");
                        failed = true;
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
