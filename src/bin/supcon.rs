//! `supcon`: the SupCon loss from the command line, for interop with Python (npy in, npy out)
//! and for a quick run on a random batch.
//!
//! ```text
//! supcon run --features f.npy [--labels l.npy | --mask m.npy] [OPTIONS] --out DIR
//! supcon demo [--batch 4096 --views 2 --dim 128 --classes 64 --dtype f32] [OPTIONS]
//! ```

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3, ArrayView3};
use npyz::WriterBuilder;
use supcon::{
    AnyBackend, Backend, ContrastMode, Denominator, Element, GradElement, NoPositivePolicy,
    Positives, Reduction, Summation, SupConLoss, Upstream,
};

#[derive(Parser)]
#[command(
    version,
    about = "Supervised Contrastive loss and gradient (fused backends)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Loss and gradient of features read from .npy files; writes loss.npy, per_anchor.npy and
    /// grad.npy.
    Run(RunArgs),
    /// Loss and gradient of a random labelled batch, with timing.
    Demo(DemoArgs),
}

#[derive(Args)]
struct RunArgs {
    /// `[B, V, D]` features (.npy: float32, float64 or float16).
    #[arg(long)]
    features: PathBuf,
    /// `[B]` integer labels (.npy: int64, int32 or uint32/uint8 …). Without labels or a mask:
    /// SimCLR (only the other views of a sample are positives).
    #[arg(long, conflicts_with = "mask")]
    labels: Option<PathBuf>,
    /// `[B, B]` float positive weights (.npy: float32 or float64).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    #[command(flatten)]
    loss: LossArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// B: samples.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// V: views per sample.
    #[arg(long, default_value_t = 2)]
    views: usize,
    /// D: embedding width.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Number of classes the labels are drawn from.
    #[arg(long, default_value_t = 64)]
    classes: usize,
    /// Element type of the features.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Seed of the random batch.
    #[arg(long, default_value_t = 2020)]
    seed: u64,
    /// Forward+backward calls to time: the first (cold: allocations, page faults, thread
    /// start-up) and the fastest of all are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    #[command(flatten)]
    loss: LossArgs,
}

#[derive(Args)]
struct LossArgs {
    /// Backend: auto (the fastest available), reference, cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// τ.
    #[arg(long, default_value_t = 0.07, allow_negative_numbers = true)]
    temperature: f64,
    /// τ_b (the loss is scaled by τ/τ_b).
    #[arg(long, default_value_t = 0.07, allow_negative_numbers = true)]
    base_temperature: f64,
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    contrast_mode: ModeArg,
    #[arg(long, value_enum, default_value_t = SummationArg::Outside)]
    summation: SummationArg,
    #[arg(long, value_enum, default_value_t = DenominatorArg::All)]
    denominator: DenominatorArg,
    /// Keep at most this many positives per anchor.
    #[arg(long)]
    positives_cap: Option<usize>,
    #[arg(long, value_enum, default_value_t = PolicyArg::ZeroAndCount)]
    no_positive: PolicyArg,
    #[arg(long, value_enum, default_value_t = ReductionArg::Mean)]
    reduction: ReductionArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}
#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    All,
    One,
}
#[derive(Clone, Copy, ValueEnum)]
enum SummationArg {
    Outside,
    Inside,
}
#[derive(Clone, Copy, ValueEnum)]
enum DenominatorArg {
    All,
    OnlyNegatives,
    OnePositive,
}
#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    ZeroAndCount,
    Exclude,
    Error,
}
#[derive(Clone, Copy, ValueEnum)]
enum ReductionArg {
    Mean,
    Sum,
    None,
}

type CliResult<T> = Result<T, String>;

impl LossArgs {
    fn build(&self) -> CliResult<(SupConLoss, AnyBackend)> {
        let mut builder = SupConLoss::builder()
            .temperature(self.temperature)
            .base_temperature(self.base_temperature)
            .contrast_mode(match self.contrast_mode {
                ModeArg::All => ContrastMode::All,
                ModeArg::One => ContrastMode::One,
            })
            .summation(match self.summation {
                SummationArg::Outside => Summation::Outside,
                SummationArg::Inside => Summation::Inside,
            })
            .denominator(match self.denominator {
                DenominatorArg::All => Denominator::All,
                DenominatorArg::OnlyNegatives => Denominator::OnlyNegatives,
                DenominatorArg::OnePositive => Denominator::OnePositive,
            })
            .no_positive(match self.no_positive {
                PolicyArg::ZeroAndCount => NoPositivePolicy::ZeroAndCount,
                PolicyArg::Exclude => NoPositivePolicy::Exclude,
                PolicyArg::Error => NoPositivePolicy::Error,
            })
            .reduction(match self.reduction {
                ReductionArg::Mean => Reduction::Mean,
                ReductionArg::Sum => Reduction::Sum,
                ReductionArg::None => Reduction::None,
            });
        if let Some(cap) = self.positives_cap {
            builder = builder.positives_cap(cap);
        }
        let loss = builder.build().map_err(|e| e.to_string())?;
        let backend = AnyBackend::from_name(&self.backend).map_err(|e| e.to_string())?;
        Ok((loss, backend))
    }
}

/// The upstream gradient of `objective = loss` (or Σ ℓ_i for reduction none).
fn unit_upstream(loss: &SupConLoss, anchors: usize) -> Option<Array1<f64>> {
    (loss.reduction() == Reduction::None).then(|| Array1::ones(anchors))
}

fn anchors(loss: &SupConLoss, shape: (usize, usize, usize)) -> usize {
    match loss.contrast_mode() {
        ContrastMode::All => shape.0 * shape.1,
        ContrastMode::One => shape.0,
    }
}

struct Outcome<G> {
    loss: Option<f64>,
    per_anchor: Array1<f64>,
    grad: Array3<G>,
    seconds: f64,
}

fn compute<T: Element>(
    loss: &SupConLoss,
    backend: &AnyBackend,
    features: ArrayView3<'_, T>,
    positives: Positives<'_>,
) -> CliResult<Outcome<T::Grad>> {
    let ones = unit_upstream(loss, anchors(loss, features.dim()));
    let upstream = ones
        .as_ref()
        .map_or(Upstream::Scalar(1.0), |u| Upstream::PerAnchor(u.view()));
    let start = Instant::now();
    let (out, grad) = backend
        .forward_backward(loss, features, positives, upstream)
        .map_err(|e| e.to_string())?;
    Ok(Outcome {
        loss: out.loss,
        per_anchor: out.per_anchor,
        grad,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn read_npy(path: &Path) -> CliResult<npyz::NpyFile<BufReader<File>>> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    npyz::NpyFile::new(BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))
}

fn type_code(npy: &npyz::NpyFile<BufReader<File>>) -> String {
    npy.dtype()
        .descr()
        .trim_matches('\'')
        .trim_start_matches(['<', '|', '='])
        .to_string()
}

fn read_vec<T: npyz::Deserialize>(
    npy: npyz::NpyFile<BufReader<File>>,
    path: &Path,
) -> CliResult<Vec<T>> {
    if npy.order() == npyz::Order::Fortran {
        return Err(format!(
            "{}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
            path.display()
        ));
    }
    npy.into_vec()
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn shape_of<const N: usize>(
    npy: &npyz::NpyFile<BufReader<File>>,
    path: &Path,
    what: &str,
) -> CliResult<[usize; N]> {
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    shape.clone().try_into().map_err(|_| {
        format!(
            "{}: {what} must have {N} dimensions, got shape {shape:?}",
            path.display()
        )
    })
}

fn read_labels(path: &Path) -> CliResult<Array1<i64>> {
    let npy = read_npy(path)?;
    let [b] = shape_of::<1>(&npy, path, "labels")?;
    let labels: Vec<i64> = match type_code(&npy).as_str() {
        "i8" => read_vec::<i64>(npy, path)?,
        "i4" => read_vec::<i32>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i2" => read_vec::<i16>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i1" => read_vec::<i8>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "u4" => read_vec::<u32>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "u2" => read_vec::<u16>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "u1" => read_vec::<u8>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        other => {
            return Err(format!(
                "{}: labels must be an integer array (int64/int32/…), got {other}",
                path.display()
            ))
        }
    };
    Array1::from_shape_vec(b, labels).map_err(|e| e.to_string())
}

fn read_mask(path: &Path) -> CliResult<Array2<f32>> {
    let npy = read_npy(path)?;
    let [r, c] = shape_of::<2>(&npy, path, "mask")?;
    let mask: Vec<f32> = match type_code(&npy).as_str() {
        "f4" => read_vec::<f32>(npy, path)?,
        "f8" => read_vec::<f64>(npy, path)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        other => {
            return Err(format!(
                "{}: mask must be float32 or float64, got {other}",
                path.display()
            ))
        }
    };
    Array2::from_shape_vec((r, c), mask).map_err(|e| e.to_string())
}

fn write_npy<T: npyz::AutoSerialize + Copy>(
    path: &Path,
    shape: &[usize],
    data: impl IntoIterator<Item = T>,
) -> CliResult<()> {
    let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let shape: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(|e| e.to_string())?;
    writer.extend(data).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

fn write_outputs<G: GradElement + npyz::AutoSerialize>(
    dir: &Path,
    outcome: &Outcome<G>,
) -> CliResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(loss) = outcome.loss {
        write_npy(&dir.join("loss.npy"), &[], [loss])?;
    }
    write_npy(
        &dir.join("per_anchor.npy"),
        &[outcome.per_anchor.len()],
        outcome.per_anchor.iter().copied(),
    )?;
    let grad = outcome.grad.as_standard_layout();
    write_npy(&dir.join("grad.npy"), grad.shape(), grad.iter().copied())
}

fn report<G: GradElement>(outcome: &Outcome<G>) {
    match outcome.loss {
        Some(loss) => println!("loss = {loss:.9}"),
        None => println!(
            "loss = none (reduction none); sum of per-anchor losses = {:.9}",
            outcome.per_anchor.sum()
        ),
    }
}

fn read_features<T: npyz::Deserialize>(
    npy: npyz::NpyFile<BufReader<File>>,
    path: &Path,
    [b, v, d]: [usize; 3],
) -> CliResult<Array3<T>> {
    Array3::from_shape_vec((b, v, d), read_vec::<T>(npy, path)?).map_err(|e| e.to_string())
}

fn run_with<T: Element>(
    args: &RunArgs,
    loss: &SupConLoss,
    backend: &AnyBackend,
    features: Array3<T>,
    positives: Positives<'_>,
) -> CliResult<()>
where
    T::Grad: npyz::AutoSerialize,
{
    let outcome = compute(loss, backend, features.view(), positives)?;
    write_outputs(&args.out, &outcome)?;
    report(&outcome);
    Ok(())
}

fn run(args: &RunArgs) -> CliResult<()> {
    let (loss, backend) = args.loss.build()?;
    let labels = args.labels.as_deref().map(read_labels).transpose()?;
    let mask = args.mask.as_deref().map(read_mask).transpose()?;
    let positives = match (&labels, &mask) {
        (Some(labels), _) => Positives::Labels(labels.view()),
        (_, Some(mask)) => Positives::Mask(mask.view()),
        _ => Positives::SimClr,
    };
    let path = &args.features;
    let npy = read_npy(path)?;
    let [b, v, d] = shape_of::<3>(&npy, path, "features")?;
    match type_code(&npy).as_str() {
        "f4" => run_with(
            args,
            &loss,
            &backend,
            read_features::<f32>(npy, path, [b, v, d])?,
            positives,
        ),
        "f8" => run_with(
            args,
            &loss,
            &backend,
            read_features::<f64>(npy, path, [b, v, d])?,
            positives,
        ),
        "f2" => run_with(
            args,
            &loss,
            &backend,
            read_features::<f16>(npy, path, [b, v, d])?,
            positives,
        ),
        other => Err(format!(
            "{}: features must be float32, float64 or float16, got {other}",
            path.display()
        )),
    }?;
    eprintln!("backend {}; wrote {}", backend.name(), args.out.display());
    Ok(())
}

/// A small deterministic generator (SplitMix64), so the demo needs no dev-only crate.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn demo_batch(args: &DemoArgs) -> (Array3<f32>, Array1<i64>) {
    let mut rng = SplitMix(args.seed);
    let mut z = Array3::from_shape_fn((args.batch, args.views, args.dim), |_| {
        rng.symmetric() as f32
    });
    for mut row in z.rows_mut() {
        let norm = row
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        row.mapv_inplace(|x| x / norm);
    }
    let classes = args.classes.max(1) as u64;
    let labels = Array1::from_shape_fn(args.batch, |_| (rng.next() % classes) as i64);
    (z, labels)
}

fn demo_with<T: Element>(
    args: &DemoArgs,
    loss: &SupConLoss,
    backend: &AnyBackend,
    z: &Array3<f32>,
    labels: &Array1<i64>,
) -> CliResult<()> {
    let z = z.mapv(|x| T::from_f64(f64::from(x)));
    let outcome = compute(loss, backend, z.view(), Positives::Labels(labels.view()))?;
    let first = outcome.seconds;
    let mut fastest = first;
    for _ in 1..args.repeat {
        let again = compute(loss, backend, z.view(), Positives::Labels(labels.view()))?;
        fastest = fastest.min(again.seconds);
    }
    let n = (args.batch * args.views) as f64;
    let grad_norm = outcome
        .grad
        .iter()
        .map(|g| g.to_f64().powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "backend {} | B = {}, V = {}, D = {}, N = {}, {:?} | {} classes",
        backend.name(),
        args.batch,
        args.views,
        args.dim,
        n,
        T::DTYPE,
        args.classes
    );
    report(&outcome);
    println!(
        "gradient: shape {:?}, L2 norm {grad_norm:.6e}, finite: {}",
        outcome.grad.shape(),
        outcome.grad.iter().all(|g| g.to_f64().is_finite())
    );
    let flops = 6.0 * n * n * args.dim as f64;
    println!(
        "forward+backward: first call {:.3} ms, fastest of {} {:.3} ms ({:.1} GFLOP/s counting \
         6·N²·D)",
        first * 1e3,
        args.repeat,
        fastest * 1e3,
        flops / fastest / 1e9
    );
    Ok(())
}

fn demo(args: &DemoArgs) -> CliResult<()> {
    let (loss, backend) = args.loss.build()?;
    let (z, labels) = demo_batch(args);
    match args.dtype {
        DTypeArg::F32 => demo_with::<f32>(args, &loss, &backend, &z, &labels),
        DTypeArg::F16 => demo_with::<f16>(args, &loss, &backend, &z, &labels),
        DTypeArg::Bf16 => demo_with::<bf16>(args, &loss, &backend, &z, &labels),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
