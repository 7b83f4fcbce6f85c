//! `supcon`: the SupCon loss from the command line, for interop with Python (npy in, npy out)
//! and for a quick run on a random batch.
//!
//! ```text
//! supcon run --features f.npy [--labels l.npy | --mask m.npy | --label-sets s.npy]
//!     [OPTIONS] --out DIR
//! supcon demo [--batch 4096 --views 2 --dim 128 --classes 64 --dtype f32] [OPTIONS]
//! ```

mod npy;
mod output;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3, ArrayView3};
use npy::{Kind, Npy};
use output::{Output, OutputDir};
use supcon::{
    AnyBackend, Backend, BatchShape, ContrastMode, Denominator, Element, GradElement,
    LabelSetWeight, NoPositivePolicy, Positives, Reduction, Summation, SupConLoss, Upstream,
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
    /// `[B, V, D]` features (.npy: float32, float64 or float16, either byte order).
    #[arg(long)]
    features: PathBuf,
    /// `[B]` integer labels (.npy: any int or uint type; uint64 values up to 2⁶³ − 1). Without
    /// labels, a mask or label sets: SimCLR (only the other views of a sample are positives).
    #[arg(long, conflicts_with = "mask")]
    labels: Option<PathBuf>,
    /// `[B, B]` float positive weights (.npy: float16, float32, or float64 within the float32
    /// range).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// `[B, K]` multi-hot label sets, any K ≥ 0 (.npy: bool, or 0/1 of any int or uint type):
    /// sample b has label k where [b, k] is 1. Other samples weigh by how their sets overlap
    /// (--label-set-weight); the other views of a sample always weigh 1.
    #[arg(long, conflicts_with_all = ["labels", "mask"])]
    label_sets: Option<PathBuf>,
    /// How two label sets weigh a pair: any (1 if they share a label), jaccard (|∩|/|∪|) or
    /// fraction (|∩| / the anchor's set size).
    #[arg(long, value_enum, default_value_t = WeightArg::Any, requires = "label_sets")]
    label_set_weight: WeightArg,
    /// Output folder (created if missing; checked before the computation). Writes
    /// loss.npy (not under --reduction none, which removes an old one), per_anchor.npy and
    /// grad.npy, each replacing an old one only once all are complete.
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
    /// Number of classes the labels are drawn from (≥ 1).
    #[arg(long, default_value_t = 64, value_parser = at_least_one, allow_negative_numbers = true)]
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
    /// Cap the positives per anchor at this many (≥ 1); the anchor's other views always stay.
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    positives_cap: Option<usize>,
    #[arg(long, value_enum, default_value_t = PolicyArg::ZeroAndCount)]
    no_positive: PolicyArg,
    #[arg(long, value_enum, default_value_t = ReductionArg::Mean)]
    reduction: ReductionArg,
    /// Normalise each feature row inside the loss, u = x / max(‖x‖, 1e-12) as
    /// torch.nn.functional.normalize(x, dim=-1); the gradient is with respect to x.
    #[arg(long)]
    normalize: bool,
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
#[derive(Clone, Copy, ValueEnum)]
enum WeightArg {
    Any,
    Jaccard,
    Fraction,
}

type CliResult<T> = Result<T, String>;

/// A whole number ≥ 1.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<i128>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|_| format!("{n} is too large")),
        Ok(n) => Err(format!("must be at least 1, got {n}")),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

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
            })
            .normalize(self.normalize);
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

/// `[B]` labels of any integer type, as i64.
fn read_labels(path: &Path) -> CliResult<Array1<i64>> {
    let npy = Npy::open(path)?;
    let [b] = npy.dims::<1>("labels")?;
    let dtype = npy.dtype;
    let labels: Vec<i64> = match (dtype.kind, dtype.size) {
        (Kind::Signed, 8) => npy.read::<i64>()?,
        (Kind::Signed, 4) => widen(npy.read::<i32>()?),
        (Kind::Signed, 2) => widen(npy.read::<i16>()?),
        (Kind::Signed, 1) => widen(npy.read::<i8>()?),
        (Kind::Unsigned, 8) => npy
            .read::<u64>()?
            .into_iter()
            .enumerate()
            .map(|(index, label)| {
                i64::try_from(label).map_err(|_| {
                    format!(
                        "{}: labels[{index}] = {label} is beyond the int64 range",
                        path.display()
                    )
                })
            })
            .collect::<CliResult<_>>()?,
        (Kind::Unsigned, 4) => widen(npy.read::<u32>()?),
        (Kind::Unsigned, 2) => widen(npy.read::<u16>()?),
        (Kind::Unsigned, 1) => widen(npy.read::<u8>()?),
        _ => {
            return Err(format!(
                "{}: labels must be integers, got {}",
                path.display(),
                dtype.name()
            ))
        }
    };
    Ok(Array1::from_shape_vec(b, labels).expect("the length is the shape's"))
}

fn widen<T: Into<i64>>(values: Vec<T>) -> Vec<i64> {
    values.into_iter().map(Into::into).collect()
}

/// The `[B, K]` label sets: numpy bools or 0/1 integers of any type; any other value is
/// refused with its index, as a value such as 2 is more likely a class label than a
/// membership.
fn read_label_sets(path: &Path) -> CliResult<Array2<bool>> {
    let npy = Npy::open(path)?;
    let [rows, labels] = npy.dims::<2>("label sets")?;
    let dtype = npy.dtype;
    let bytes = |bools: Vec<npy::Bool>| bools.into_iter().map(|b| b.0);
    let sets = match (dtype.kind, dtype.size) {
        (Kind::Bool, 1) => memberships(path, labels, bytes(npy.read::<npy::Bool>()?))?,
        (Kind::Signed, 8) => memberships(path, labels, npy.read::<i64>()?)?,
        (Kind::Signed, 4) => memberships(path, labels, npy.read::<i32>()?)?,
        (Kind::Signed, 2) => memberships(path, labels, npy.read::<i16>()?)?,
        (Kind::Signed, 1) => memberships(path, labels, npy.read::<i8>()?)?,
        (Kind::Unsigned, 8) => memberships(path, labels, npy.read::<u64>()?)?,
        (Kind::Unsigned, 4) => memberships(path, labels, npy.read::<u32>()?)?,
        (Kind::Unsigned, 2) => memberships(path, labels, npy.read::<u16>()?)?,
        (Kind::Unsigned, 1) => memberships(path, labels, npy.read::<u8>()?)?,
        _ => {
            return Err(format!(
                "{}: label sets must be bool or 0/1 integers, got {}",
                path.display(),
                dtype.name()
            ))
        }
    };
    Ok(Array2::from_shape_vec((rows, labels), sets).expect("the length is the shape's"))
}

/// 0/1 values of a `[B, K]` array (row-major, K = `labels`) as memberships.
fn memberships<T: Copy + Into<i128> + Display>(
    path: &Path,
    labels: usize,
    values: impl IntoIterator<Item = T>,
) -> CliResult<Vec<bool>> {
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| match value.into() {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!(
                "{}: label_sets[{}, {}] = {value} is not 0 or 1",
                path.display(),
                index / labels,
                index % labels
            )),
        })
        .collect()
}

/// The `[B, B]` mask as f32; an f64 weight beyond the f32 range is refused as it was given.
fn read_mask(path: &Path) -> CliResult<Array2<f32>> {
    let npy = Npy::open(path)?;
    let [rows, cols] = npy.dims::<2>("mask")?;
    let dtype = npy.dtype;
    let mask: Vec<f32> = match (dtype.kind, dtype.size) {
        (Kind::Float, 4) => npy.read::<f32>()?,
        (Kind::Float, 2) => npy.read::<f16>()?.into_iter().map(f32::from).collect(),
        (Kind::Float, 8) => {
            let values = npy.read::<f64>()?;
            let beyond = |x: f64| x.is_finite() && x.abs() > f64::from(f32::MAX);
            if let Some(index) = values.iter().position(|&x| beyond(x)) {
                return Err(format!(
                    "{}: mask[{}, {}] = {:e} is beyond the float32 range the mask is used in",
                    path.display(),
                    index / cols,
                    index % cols,
                    values[index]
                ));
            }
            values.into_iter().map(|x| x as f32).collect()
        }
        _ => {
            return Err(format!(
                "{}: mask must be float16, float32 or float64, got {}",
                path.display(),
                dtype.name()
            ))
        }
    };
    Ok(Array2::from_shape_vec((rows, cols), mask).expect("the length is the shape's"))
}

fn write_outputs<G: GradElement + npy::Element>(
    dir: &OutputDir,
    outcome: &Outcome<G>,
) -> CliResult<()> {
    let loss = outcome.loss.map(|loss| [loss]);
    let per_anchor = outcome.per_anchor.as_slice().expect("a fresh vector");
    let grad = outcome.grad.as_standard_layout();
    let mut outputs = Vec::new();
    if let Some(loss) = &loss {
        outputs.push(Output::new("loss.npy", vec![], loss));
    }
    outputs.push(Output::new(
        "per_anchor.npy",
        vec![per_anchor.len()],
        per_anchor,
    ));
    outputs.push(Output::new(
        "grad.npy",
        grad.shape().to_vec(),
        grad.as_slice().expect("standard layout"),
    ));
    dir.commit(&outputs)
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

fn run_with<T: Element + npy::Element>(
    args: &RunArgs,
    out: &OutputDir,
    loss: &SupConLoss,
    backend: &AnyBackend,
    features: Npy,
    positives: Positives<'_>,
) -> CliResult<()>
where
    T::Grad: npy::Element,
{
    let [b, v, d] = features.dims::<3>("features")?;
    let features = Array3::from_shape_vec((b, v, d), features.read::<T>()?)
        .expect("the length is the shape's");
    let outcome = compute(loss, backend, features.view(), positives)?;
    write_outputs(out, &outcome)?;
    report(&outcome);
    eprintln!("backend {}; wrote {}", backend.name(), args.out.display());
    Ok(())
}

fn run(args: &RunArgs) -> CliResult<()> {
    let (loss, backend) = args.loss.build()?;
    let labels = args.labels.as_deref().map(read_labels).transpose()?;
    let mask = args.mask.as_deref().map(read_mask).transpose()?;
    let label_sets = args
        .label_sets
        .as_deref()
        .map(read_label_sets)
        .transpose()?;
    let positives = match (&labels, &mask, &label_sets) {
        (Some(labels), _, _) => Positives::Labels(labels.view()),
        (_, Some(mask), _) => Positives::Mask(mask.view()),
        (_, _, Some(sets)) => Positives::LabelSets {
            sets: sets.view(),
            weight: match args.label_set_weight {
                WeightArg::Any => LabelSetWeight::Any,
                WeightArg::Jaccard => LabelSetWeight::Jaccard,
                WeightArg::Fraction => LabelSetWeight::Fraction,
            },
        },
        _ => Positives::SimClr,
    };
    let features = Npy::open(&args.features)?;
    features.dims::<3>("features")?;
    let dtype = features.dtype;
    let out = OutputDir::prepare(&args.out)?;
    match (dtype.kind, dtype.size) {
        (Kind::Float, 4) => run_with::<f32>(args, &out, &loss, &backend, features, positives),
        (Kind::Float, 8) => run_with::<f64>(args, &out, &loss, &backend, features, positives),
        (Kind::Float, 2) => run_with::<f16>(args, &out, &loss, &backend, features, positives),
        _ => Err(format!(
            "{}: features must be float32, float64 or float16, got {}",
            args.features.display(),
            dtype.name()
        )),
    }
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

/// A random batch of unit rows and labels, its size checked (and its memory reserved) before
/// anything is written to it.
fn demo_batch(args: &DemoArgs) -> CliResult<(Array3<f32>, Array1<i64>)> {
    let shape =
        BatchShape::new(args.batch, args.views, args.dim).map_err(|e| format!("demo: {e}"))?;
    let no_memory = |bytes: usize| format!("demo: cannot allocate {bytes} bytes for the batch");
    let mut values: Vec<f32> = npy::zeroed(shape.elements()).map_err(no_memory)?;
    let mut labels: Vec<i64> = npy::zeroed(args.batch).map_err(no_memory)?;
    let mut rng = SplitMix(args.seed);
    for row in values.chunks_exact_mut(args.dim) {
        for x in row.iter_mut() {
            *x = rng.symmetric() as f32;
        }
        let norm = row
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    for label in &mut labels {
        *label = (rng.next() % args.classes as u64) as i64;
    }
    let z = Array3::from_shape_vec((args.batch, args.views, args.dim), values)
        .expect("the length is the shape's");
    Ok((z, Array1::from(labels)))
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
    let (z, labels) = demo_batch(args)?;
    match args.dtype {
        DTypeArg::F32 => demo_with::<f32>(args, &loss, &backend, &z, &labels),
        DTypeArg::F16 => demo_with::<f16>(args, &loss, &backend, &z, &labels),
        DTypeArg::Bf16 => demo_with::<bf16>(args, &loss, &backend, &z, &labels),
    }
}

fn main() -> ExitCode {
    // A write beyond the file-size limit then fails with EFBIG, which the output folder cleans
    // up after, instead of killing the process with a half-written file behind.
    #[cfg(unix)]
    // SAFETY: sets a signal disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
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
