//! The candle operation (feature `candle`): its loss and gradient, through candle's autograd,
//! equal the CPU backend's bit for bit (rounded to the features' dtype) over the option grid,
//! every kind of positives and strided layouts, and the CPU backend's equal the f64
//! reference's within the tolerance model; bad inputs give this crate's typed errors; and a
//! small candle MLP trains with it.
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use ndarray::{Array1, Array3};
use rand::rngs::StdRng;
use rand::RngExt;
use supcon::candle::{loss, supcon_error, Targets};
use supcon::{
    Backend, ContrastMode, CpuBackend, Error, LabelSetWeight, NoPositivePolicy, Positives,
    Reduction, ReferenceBackend, SupConLoss, Upstream,
};

use common::tolerance::{Precision, Tolerance};

/// One random batch and its positives, as host arrays.
struct Case {
    features: Array3<f64>,
    positives: Kind,
}

enum Kind {
    SimClr,
    Labels(Array1<i64>),
    Mask(ndarray::Array2<f32>),
    LabelSets(ndarray::Array2<bool>),
}

impl Case {
    fn random(rng: &mut StdRng, kind: usize) -> Self {
        let shape = (
            rng.random_range(3..12),
            rng.random_range(1..4),
            rng.random_range(2..19),
        );
        let features = common::features(rng, shape, 0.5..1.5);
        let batch = shape.0;
        let positives = match kind {
            0 => Kind::SimClr,
            1 => Kind::Labels(common::labels(rng, batch, 3)),
            2 => Kind::Mask(common::soft_mask(rng, batch)),
            _ => Kind::LabelSets(common::label_sets(rng, batch, 4)),
        };
        Case {
            features,
            positives,
        }
    }

    fn positives(&self) -> Positives<'_> {
        match &self.positives {
            Kind::SimClr => Positives::SimClr,
            Kind::Labels(labels) => Positives::Labels(labels.view()),
            Kind::Mask(mask) => Positives::Mask(mask.view()),
            Kind::LabelSets(sets) => Positives::LabelSets {
                sets: sets.view(),
                weight: LabelSetWeight::Jaccard,
            },
        }
    }

    /// The positives as candle tensors: labels as i64 or u32, label sets as u8.
    fn targets(&self, device: &Device, labels_u32: bool) -> candle_core::Result<Option<Tensor>> {
        Ok(match &self.positives {
            Kind::SimClr => None,
            Kind::Labels(labels) if labels_u32 => {
                // Distinct u32 values for distinct labels (their rank among the classes).
                let mut classes: Vec<i64> = labels.to_vec();
                classes.sort_unstable();
                classes.dedup();
                let ranks: Vec<u32> = labels
                    .iter()
                    .map(|l| classes.binary_search(l).unwrap() as u32 * 1_000_003)
                    .collect();
                Some(Tensor::new(ranks, device)?)
            }
            Kind::Labels(labels) => Some(Tensor::new(labels.to_vec(), device)?),
            Kind::Mask(mask) => Some(Tensor::from_vec(
                mask.iter().copied().collect::<Vec<f32>>(),
                mask.dim(),
                device,
            )?),
            Kind::LabelSets(sets) => Some(Tensor::from_vec(
                sets.iter().map(|&s| u8::from(s)).collect::<Vec<u8>>(),
                sets.dim(),
                device,
            )?),
        })
    }
}

fn targets_of<'a>(case: &Case, tensor: Option<&'a Tensor>) -> Targets<'a> {
    match (&case.positives, tensor) {
        (Kind::SimClr, _) => Targets::SimClr,
        (Kind::Labels(_), Some(t)) => Targets::Labels(t),
        (Kind::Mask(_), Some(t)) => Targets::Mask(t),
        (Kind::LabelSets(_), Some(t)) => Targets::LabelSets {
            sets: t,
            weight: LabelSetWeight::Jaccard,
        },
        _ => unreachable!("a tensor for every kind but SimCLR"),
    }
}

/// How the features enter the graph: a contiguous variable, or a strided view of one.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Contiguous,
    /// `[B, D, V]` transposed to `[B, V, D]`.
    Transposed,
    /// Columns 1..=D of a `[B, V, D + 2]` variable: a start offset and a row stride ≠ D.
    Narrowed,
}

/// The variable that gets the gradient and the `[B, V, D]` features taken from it.
fn features_of(
    z: &Array3<f64>,
    dtype: DType,
    layout: Layout,
) -> candle_core::Result<(Var, Tensor)> {
    let (b, v, d) = z.dim();
    let values: Vec<f64> = z.iter().copied().collect();
    let contiguous = Tensor::from_vec(values, (b, v, d), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(match layout {
        Layout::Contiguous => {
            let var = Var::from_tensor(&contiguous)?;
            let features = var.as_tensor().clone();
            (var, features)
        }
        Layout::Transposed => {
            let var = Var::from_tensor(&contiguous.transpose(1, 2)?.contiguous()?)?;
            let features = var.as_tensor().transpose(1, 2)?;
            // A transposition of a dimension of extent 1 moves nothing.
            assert_eq!(features.is_contiguous(), v == 1 || d == 1);
            (var, features)
        }
        Layout::Narrowed => {
            let padded = Tensor::cat(
                &[
                    &Tensor::ones((b, v, 1), dtype, &Device::Cpu)?,
                    &contiguous,
                    &Tensor::ones((b, v, 1), dtype, &Device::Cpu)?,
                ],
                2,
            )?;
            let var = Var::from_tensor(&padded)?;
            let features = var.as_tensor().narrow(2, 1, d)?;
            assert!(!features.is_contiguous());
            (var, features)
        }
    })
}

/// The gradient of the variable back in `[B, V, D]` order, as f64.
fn gradient_of(
    grads: &candle_core::backprop::GradStore,
    var: &Var,
    layout: Layout,
    d: usize,
) -> candle_core::Result<Vec<f64>> {
    let grad = grads
        .get(var.as_tensor())
        .expect("the features get a gradient");
    let grad = match layout {
        Layout::Contiguous => grad.clone(),
        Layout::Transposed => grad.transpose(1, 2)?,
        Layout::Narrowed => grad.narrow(2, 1, d)?,
    };
    grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The value a tensor of `dtype` holds for the f64 value `x`: rounded to nearest through f32,
/// as the op rounds its loss (and exactly so for f32 gradients; `half`'s `from_f64` drops low
/// bits before it rounds).
fn rounded(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F16 => f16::from_f32(x as f32).to_f64(),
        DType::BF16 => bf16::from_f32(x as f32).to_f64(),
        DType::F32 => f64::from(x as f32),
        _ => x,
    }
}

/// The features as the CPU backend reads them from a tensor of `dtype`, run through the CPU
/// backend: forward and gradient with the upstream the candle graph sends.
fn cpu_backend<T: supcon::Element>(
    config: &SupConLoss,
    z: &Array3<f64>,
    positives: Positives<'_>,
    upstream: Upstream<'_>,
) -> supcon::Result<(supcon::ForwardOutput, Vec<f64>)> {
    let z = z.mapv(T::from_f64);
    let (out, grad) = CpuBackend.forward_backward(config, z.view(), positives, upstream)?;
    let grad = grad
        .iter()
        .map(|g| supcon::GradElement::to_f64(*g))
        .collect();
    Ok((out, grad))
}

#[test]
fn the_op_equals_the_cpu_backend_and_the_reference_over_the_option_grid() {
    let mut rng = common::rng("candle_option_grid");
    let grid = common::option_grid(0.1, 0.07, None);
    let capped = common::option_grid(0.5, 0.5, Some(2));
    let dtypes = [DType::F32, DType::F16, DType::BF16, DType::F64];
    let layouts = [Layout::Contiguous, Layout::Transposed, Layout::Narrowed];
    let mut runs = 0;
    for (k, config) in grid.iter().chain(&capped).enumerate() {
        let kind = k % 4;
        let mut case = Case::random(&mut rng, kind);
        let dtype = dtypes[k % dtypes.len()];
        // Values the dtype holds exactly: candle's conversion from f64 (through f32) and the
        // backend's direct rounding could otherwise differ by one ulp.
        case.features.mapv_inplace(|x| rounded(dtype, x));
        let layout = layouts[(k / 4) % layouts.len()];
        let config = if k % 7 == 0 {
            config.to_builder().normalize(true).build().unwrap()
        } else {
            *config
        };
        let (b, v, d) = case.features.dim();
        let anchors = match config.contrast_mode() {
            ContrastMode::All => b * v,
            ContrastMode::One => b,
        };
        // The upstream weights of reduction none: multiples of 1/8, exact in every dtype.
        let weights: Vec<f64> = (0..anchors)
            .map(|_| f64::from(rng.random_range(1..16u8)) / 8.0)
            .collect();
        let weights_array = Array1::from(weights.clone());
        let upstream = common::upstream_for(&config, &weights_array);
        let what = format!("{k}: {config:?}, {dtype:?}, {layout:?}, B = {b}");

        let target_tensor = case.targets(&Device::Cpu, k % 2 == 0).unwrap();
        let (var, features) = features_of(&case.features, dtype, layout).unwrap();
        let result = loss(
            &config,
            &features,
            targets_of(&case, target_tensor.as_ref()),
        );
        let (z, positives) = (&case.features, case.positives());
        let want = match dtype {
            DType::F32 => cpu_backend::<f32>(&config, z, positives, upstream),
            DType::F16 => cpu_backend::<f16>(&config, z, positives, upstream),
            DType::BF16 => cpu_backend::<bf16>(&config, z, positives, upstream),
            _ => cpu_backend::<f64>(&config, z, positives, upstream),
        };
        let ((want, want_grad), output) = match (want, result) {
            (Ok(want), Ok(output)) => (want, output),
            // What the backend refuses, the op refuses with the same error.
            (Err(refused), Err(error)) => {
                assert_eq!(supcon_error(&error), Some(&refused), "{what}: {error}");
                assert_eq!(config.no_positive(), NoPositivePolicy::Error, "{what}");
                continue;
            }
            (want, result) => panic!("{what}: the backend gives {want:?}, the op {result:?}"),
        };
        assert_eq!(output.dtype(), dtype, "{what}");
        let objective = match config.reduction() {
            Reduction::None => {
                assert_eq!(output.dims(), [anchors], "{what}");
                let w = Tensor::new(weights.clone(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (output.clone() * w).unwrap().sum_all().unwrap()
            }
            Reduction::Mean | Reduction::Sum => {
                assert_eq!(output.rank(), 0, "{what}");
                (output.clone() * 0.75).unwrap()
            }
        };
        let values = output
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let expected: Vec<f64> = match want.loss {
            Some(l) if config.reduction() != Reduction::None => vec![l],
            _ => want.per_anchor.to_vec(),
        };
        for (got, w) in values.iter().zip(&expected) {
            assert_eq!(*got, rounded(dtype, *w), "{what}: loss");
        }
        let grads = objective.backward().unwrap();
        let grad = gradient_of(&grads, &var, layout, d).unwrap();
        assert_eq!(grad.len(), want_grad.len(), "{what}");
        for (i, (got, w)) in grad.iter().zip(&want_grad).enumerate() {
            assert_eq!(*got, rounded(dtype, *w), "{what}: gradient[{i}]");
        }
        check_reference(&config, &case, dtype, upstream, &what);
        runs += 1;
    }
    assert!(runs > grid.len(), "most configurations run: {runs}");
}

/// The CPU backend's output for this case against the f64 reference's, within the tolerance
/// model (the op's output is the CPU backend's, checked bit for bit above).
fn check_reference(
    config: &SupConLoss,
    case: &Case,
    dtype: DType,
    upstream: Upstream<'_>,
    what: &str,
) {
    fn run<T: supcon::Element>(
        config: &SupConLoss,
        case: &Case,
        upstream: Upstream<'_>,
        what: &str,
    ) {
        let z = case.features.mapv(T::from_f64);
        let got = CpuBackend
            .forward_backward(config, z.view(), case.positives(), upstream)
            .unwrap();
        let z64 = z.mapv(|x| x.to_f64());
        let want = ReferenceBackend
            .forward_backward(config, z64.view(), case.positives(), upstream)
            .unwrap();
        let max_weight = match &case.positives {
            Kind::Mask(mask) => mask.iter().fold(1f32, |m, &w| m.max(w)).into(),
            _ => 1.0,
        };
        let tolerance = Tolerance::new(
            Precision::F32,
            config,
            &z,
            max_weight,
            upstream,
            want.0.state.mean_denominator(),
        );
        tolerance.check(what, &got, &want);
    }
    match dtype {
        DType::F32 => run::<f32>(config, case, upstream, what),
        DType::F16 => run::<f16>(config, case, upstream, what),
        DType::BF16 => run::<bf16>(config, case, upstream, what),
        _ => run::<f64>(config, case, upstream, what),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut rng = common::rng("candle_bad_inputs");
    let config = SupConLoss::default();
    let z = common::features(&mut rng, (6, 2, 5), 0.5..1.5);
    let (_, features) = features_of(&z, DType::F32, Layout::Contiguous).unwrap();
    let cpu = &Device::Cpu;
    let refused = |result: candle_core::Result<Tensor>| -> Error {
        let error = result.expect_err("refused");
        supcon_error(&error)
            .unwrap_or_else(|| panic!("not a supcon error: {error}"))
            .clone()
    };
    // Labels: one too few, of a float dtype, of rank 2.
    let short = Tensor::new(&[1i64, 2, 3, 1, 2], cpu).unwrap();
    assert!(matches!(
        refused(loss(&config, &features, Targets::Labels(&short))),
        Error::LabelsLength { .. }
    ));
    let float = Tensor::new(&[1f32, 2., 3., 1., 2., 3.], cpu).unwrap();
    assert!(matches!(
        refused(loss(&config, &features, Targets::Labels(&float))),
        Error::InvalidArgument(_)
    ));
    let square = Tensor::zeros((6, 6), DType::I64, cpu).unwrap();
    assert!(matches!(
        refused(loss(&config, &features, Targets::Labels(&square))),
        Error::InvalidArgument(_)
    ));
    // A mask of integers; label sets holding a 2.
    assert!(matches!(
        refused(loss(&config, &features, Targets::Mask(&square))),
        Error::InvalidArgument(_)
    ));
    let sets = Tensor::new(&[[0u8, 1], [1, 1], [0, 0], [2, 0], [1, 0], [0, 1]], cpu).unwrap();
    assert!(matches!(
        refused(loss(
            &config,
            &features,
            Targets::LabelSets {
                sets: &sets,
                weight: LabelSetWeight::Any
            }
        )),
        Error::InvalidArgument(_)
    ));
    // Features of rank 2, of an integer dtype, and holding a NaN.
    let flat = features.flatten_from(1).unwrap();
    assert!(matches!(
        refused(loss(&config, &flat, Targets::SimClr)),
        Error::InvalidArgument(_)
    ));
    let integers = features.to_dtype(DType::U32).unwrap();
    assert!(matches!(
        refused(loss(&config, &integers, Targets::SimClr)),
        Error::InvalidArgument(_)
    ));
    let mut poisoned = z.clone();
    poisoned[[3, 1, 2]] = f64::NAN;
    let (_, poisoned) = features_of(&poisoned, DType::F32, Layout::Contiguous).unwrap();
    assert!(matches!(
        refused(loss(&config, &poisoned, Targets::SimClr)),
        Error::NonFiniteFeature { .. }
    ));
    // A CUDA tensor cannot be made without feature candle-cuda; its refusal is tested there.
}

/// Two-layer MLP weights as candle variables.
struct Mlp {
    w1: Var,
    b1: Var,
    w2: Var,
}

impl Mlp {
    fn new(rng: &mut StdRng, input: usize, hidden: usize, output: usize) -> Self {
        let mut weights = |rows: usize, columns: usize| {
            let scale = (2.0 / rows as f64).sqrt();
            let values: Vec<f32> = (0..rows * columns)
                .map(|_| (common::gaussian(rng) * scale) as f32)
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, (rows, columns), &Device::Cpu).unwrap())
                .unwrap()
        };
        let w1 = weights(input, hidden);
        let w2 = weights(hidden, output);
        let b1 =
            Var::from_tensor(&Tensor::zeros(hidden, DType::F32, &Device::Cpu).unwrap()).unwrap();
        Mlp { w1, b1, w2 }
    }

    /// `[N, input]` → `[N, output]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(self.w1.as_tensor())?
            .broadcast_add(self.b1.as_tensor())?
            .relu()?
            .matmul(self.w2.as_tensor())
    }

    fn step(&self, grads: &candle_core::backprop::GradStore, rate: f64) -> candle_core::Result<()> {
        for var in [&self.w1, &self.b1, &self.w2] {
            let grad = grads
                .get(var.as_tensor())
                .expect("every weight gets a gradient");
            var.set(&(var.as_tensor() - (grad * rate)?)?)?;
        }
        Ok(())
    }
}

/// A batch of `batch` samples of two views each (`[2·batch, input]`, sample-major) and its
/// labels: each sample a noisy copy of its class's centre, each view a noisy copy of the sample.
fn mlp_batch(rng: &mut StdRng, centres: &[Vec<f64>], batch: usize) -> (Tensor, Vec<i64>) {
    let labels: Vec<i64> = (0..batch)
        .map(|_| rng.random_range(0..centres.len() as i64))
        .collect();
    let mut x = vec![];
    for &label in &labels {
        let sample: Vec<f64> = centres[label as usize]
            .iter()
            .map(|c| c + 0.7 * common::gaussian(rng))
            .collect();
        for _view in 0..2 {
            x.extend(
                sample
                    .iter()
                    .map(|s| (s + 0.3 * common::gaussian(rng)) as f32),
            );
        }
    }
    let input = centres[0].len();
    let x = Tensor::from_vec(x, (batch * 2, input), &Device::Cpu).unwrap();
    (x, labels)
}

/// The share of rows whose nearest other row (by cosine) of another sample has their label.
fn nearest_neighbour_accuracy(embeddings: &Tensor, labels: &[i64]) -> f64 {
    let rows: Vec<Vec<f32>> = embeddings.to_vec2().unwrap();
    let unit: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| {
            let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(|x| x / norm).collect()
        })
        .collect();
    let mut hits = 0;
    for (i, a) in unit.iter().enumerate() {
        let nearest = (0..unit.len())
            .filter(|&j| j / 2 != i / 2)
            .max_by(|&j, &k| {
                let dot = |b: &Vec<f32>| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
                dot(&unit[j]).total_cmp(&dot(&unit[k]))
            })
            .unwrap();
        hits += usize::from(labels[nearest / 2] == labels[i / 2]);
    }
    hits as f64 / unit.len() as f64
}

#[test]
fn a_candle_mlp_trains_with_the_loss() {
    // Eight classes of points in 16 dimensions. A two-layer MLP embeds them in 8 dimensions,
    // normalised inside the loss, trained by plain SGD on the SupCon loss; on a held-out batch
    // the nearest neighbour of a row then has its class far more often than before.
    let mut rng = common::rng("candle_mlp");
    let (classes, batch, input) = (8usize, 64usize, 16usize);
    let centres: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..input).map(|_| common::gaussian(&mut rng)).collect())
        .collect();
    let config = SupConLoss::builder()
        .temperature(0.2)
        .base_temperature(0.2)
        .normalize(true)
        .build()
        .unwrap();
    let mlp = Mlp::new(&mut rng, input, 32, 8);
    let (held_out, held_out_labels) = mlp_batch(&mut rng, &centres, 128);
    let before = nearest_neighbour_accuracy(&mlp.forward(&held_out).unwrap(), &held_out_labels);
    let mut losses = vec![];
    for _ in 0..200 {
        let (x, labels) = mlp_batch(&mut rng, &centres, batch);
        let embeddings = mlp.forward(&x).unwrap().reshape((batch, 2, 8)).unwrap();
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        let value = loss(&config, &embeddings, Targets::Labels(&labels)).unwrap();
        losses.push(value.to_scalar::<f32>().unwrap());
        let grads = value.backward().unwrap();
        mlp.step(&grads, 0.5).unwrap();
    }
    let after = nearest_neighbour_accuracy(&mlp.forward(&held_out).unwrap(), &held_out_labels);
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    eprintln!(
        "candle MLP: SupCon loss {first:.4} over the first 5 steps, {last:.4} over the last 5; \
         held-out nearest-neighbour accuracy {before:.3} → {after:.3}"
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    // From log(2B − 1) ≈ 4.8 for random embeddings towards log(positives) ≈ 2.7.
    assert!(last < first - 0.3, "the loss falls: {first} → {last}");
    assert!(
        after > 0.9 && after > before + 0.1,
        "accuracy {before} → {after}"
    );
}
