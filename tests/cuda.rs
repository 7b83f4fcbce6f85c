//! What only the CUDA backend has (feature `cuda`): the device API against the host API, its
//! validation and stream handling, shared kernels per context, and the error paths of a machine
//! without a GPU. Both APIs' agreement with the reference is `tests/backends.rs` (the host API)
//! and `device_api_equals_host_api` here.
//!
//! Without a usable GPU the GPU tests print why and pass, except under `SUPCON_REQUIRE_CUDA=1`
//! (set by scripts/gpu-check.sh), where they fail: a GPU run must not skip silently.
#![cfg(feature = "cuda")]

mod common;

use cudarc::driver::{CudaSlice, CudaStream};
use half::{bf16, f16};
use ndarray::{Array1, Array3};
use std::sync::Arc;
use supcon::cuda::{CudaFeature, DevicePositives};
use supcon::{
    AnyBackend, Backend, BatchShape, Error, LabelSetWeight, NoPositivePolicy, Positives,
    SupConLoss, Upstream,
};

/// The CUDA backend on GPU 0, or `None` (with the reason printed) where it cannot run.
fn cuda() -> Option<supcon::CudaBackend> {
    match supcon::CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(error) if std::env::var_os("SUPCON_REQUIRE_CUDA").is_some_and(|v| v != "0") => {
            panic!("SUPCON_REQUIRE_CUDA is set, but the CUDA backend cannot run: {error}")
        }
        Err(error) => {
            eprintln!("skipped: the CUDA backend cannot run here ({error})");
            None
        }
    }
}

/// Features, labels, mask and label sets (multi-hot bytes) uploaded by the caller.
struct DeviceBatch<T> {
    shape: BatchShape,
    features: CudaSlice<T>,
    labels: CudaSlice<i64>,
    mask: CudaSlice<f32>,
    memberships: CudaSlice<u8>,
}

impl<T: CudaFeature> DeviceBatch<T> {
    fn upload(
        stream: &Arc<CudaStream>,
        z: &Array3<T>,
        labels: &Array1<i64>,
        mask: &ndarray::Array2<f32>,
        sets: &ndarray::Array2<bool>,
    ) -> Self {
        let (batch, views, dim) = z.dim();
        let memberships: Vec<u8> = sets.iter().map(|&m| u8::from(m)).collect();
        DeviceBatch {
            shape: BatchShape::new(batch, views, dim).unwrap(),
            features: stream.clone_htod(z.as_slice().unwrap()).unwrap(),
            labels: stream.clone_htod(labels.as_slice().unwrap()).unwrap(),
            mask: stream.clone_htod(mask.as_slice().unwrap()).unwrap(),
            memberships: stream.clone_htod(&memberships).unwrap(),
        }
    }
}

/// The device API runs the same kernels as the host API: identical numbers, with the label
/// sets packed and the cap bounds found on the device where the host API computes them on the
/// host (both compute `normalize`'s row scales on the device).
#[test]
fn device_api_equals_host_api() {
    let Some(cuda) = cuda() else { return };
    let mut rng = common::rng("device_api_equals_host_api");
    let (b, v, d) = (45, 2, 33);
    let z = common::unit_features(&mut rng, (b, v, d)).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, b, 5);
    let mask = common::soft_mask(&mut rng, b);
    let sets = common::label_sets(&mut rng, b, 70);
    let batch = DeviceBatch::upload(cuda.stream(), &z, &labels, &mask, &sets);
    let per_anchor = Array1::from_shape_fn(b * v, |i| 0.5 + 0.01 * i as f64);
    let grids = [None, Some(3)].map(|cap| common::option_grid(0.2, 0.1, cap));
    for (index, loss) in grids
        .into_iter()
        .flatten()
        .filter(|l| l.no_positive() != NoPositivePolicy::Error)
        .enumerate()
    {
        // Every other configuration under `normalize`, its row scales computed on the device.
        let loss = loss.to_builder().normalize(index % 2 == 1).build().unwrap();
        let upstream = common::upstream_for(&loss, &per_anchor);
        let weight = [
            LabelSetWeight::Any,
            LabelSetWeight::Jaccard,
            LabelSetWeight::Fraction,
        ][index % 3];
        for (host_positives, device_positives) in [
            (Positives::SimClr, DevicePositives::SimClr),
            (
                Positives::Labels(labels.view()),
                DevicePositives::Labels(&batch.labels.as_view()),
            ),
            (
                Positives::Mask(mask.view()),
                DevicePositives::Mask(&batch.mask.as_view()),
            ),
            (
                Positives::LabelSets {
                    sets: sets.view(),
                    weight,
                },
                DevicePositives::LabelSets {
                    memberships: &batch.memberships.as_view(),
                    classes: 70,
                    weight,
                },
            ),
        ] {
            let what = format!("{loss:?} {host_positives:?}");
            let (host_out, host_grad) = cuda
                .forward_backward(&loss, z.view(), host_positives, upstream)
                .unwrap();
            let features = batch.features.as_view();
            let forward = cuda
                .forward_device(&loss, &features, batch.shape, device_positives)
                .unwrap();
            let grad = cuda
                .backward_device(&forward, &features, device_positives, upstream)
                .unwrap();
            let device_out = forward.to_host().unwrap();
            assert_eq!(device_out.loss, host_out.loss, "{what}");
            assert_eq!(device_out.per_anchor, host_out.per_anchor, "{what}");
            assert_eq!(device_out.state, host_out.state, "{what}");
            assert_eq!(forward.loss_host().unwrap(), host_out.loss, "{what}");
            let scalar = cuda.stream().clone_dtoh(&forward.loss()).unwrap();
            let per_anchor_device = cuda.stream().clone_dtoh(&forward.per_anchor()).unwrap();
            assert_eq!(per_anchor_device.len(), host_out.per_anchor.len());
            if let Some(l) = host_out.loss {
                assert_eq!(scalar, [l], "{what}");
            }
            // The host path rebuilds the kernels' scaled positive log-sum-exp from the f64 saved
            // state, which may move it by an ulp; the device path passes the kernel's on.
            let grad: Vec<f64> = cuda
                .stream()
                .clone_dtoh(&grad)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let host_grad: Vec<f64> = host_grad.iter().map(|&g| f64::from(g)).collect();
            let error = common::relative_error(&grad, &host_grad, 1e-3);
            assert!(error <= 1e-6, "{what}: gradient differs by {error:e}");
        }
    }
}

/// A trainer's own stream, inputs written on another stream of the context, the gradient into
/// a sub-view of a larger buffer.
#[test]
fn device_api_runs_on_the_callers_stream() {
    let Some(probe) = cuda() else { return };
    let context = probe.context().clone();
    let trainer_stream = context.new_stream().unwrap();
    let upload_stream = context.new_stream().unwrap();
    let cuda = supcon::CudaBackend::from_stream(trainer_stream.clone()).unwrap();
    assert!(Arc::ptr_eq(cuda.stream(), &trainer_stream));
    let from_context = supcon::CudaBackend::from_context(context.clone()).unwrap();
    assert_eq!(from_context.context(), &context);

    let mut rng = common::rng("device_api_runs_on_the_callers_stream");
    let (b, v, d) = (80, 2, 64);
    let z = common::unit_features(&mut rng, (b, v, d)).mapv(bf16::from_f64);
    let labels = common::labels(&mut rng, b, 7);
    let mask = common::label_mask(&labels);
    let sets = ndarray::Array2::from_shape_fn((z.dim().0, 3), |(b, k)| (b + k) % 4 == 0);
    let batch = DeviceBatch::upload(&upload_stream, &z, &labels, &mask, &sets);
    let loss = SupConLoss::builder().temperature(0.1).build().unwrap();
    let features = batch.features.as_view();
    let labels_view = batch.labels.as_view();
    let positives = DevicePositives::Labels(&labels_view);
    let forward = cuda
        .forward_device(&loss, &features, batch.shape, positives)
        .unwrap();
    let elements = b * v * d;
    let mut padded = trainer_stream.alloc_zeros::<f32>(elements + 64).unwrap();
    cuda.backward_device_into(
        &forward,
        &features,
        positives,
        Upstream::Scalar(1.0),
        &mut padded.slice_mut(32..32 + elements),
    )
    .unwrap();
    let padded = trainer_stream.clone_dtoh(&padded).unwrap();
    assert!(padded[..32]
        .iter()
        .chain(&padded[32 + elements..])
        .all(|&x| x == 0.0));
    let (host_out, host_grad) = cuda
        .forward_backward(
            &loss,
            z.view(),
            Positives::Labels(labels.view()),
            Upstream::Scalar(1.0),
        )
        .unwrap();
    assert_eq!(forward.loss_host().unwrap(), host_out.loss);
    let grad: Vec<f64> = padded[32..32 + elements]
        .iter()
        .map(|&g| f64::from(g))
        .collect();
    let host_grad: Vec<f64> = host_grad.iter().map(|&g| f64::from(g)).collect();
    assert!(common::relative_error(&grad, &host_grad, 1e-3) <= 1e-6);
    // Read on a third stream, ordered after the kernels by cudarc's events alone.
    let fresh = cuda
        .forward_device(&loss, &features, batch.shape, positives)
        .unwrap();
    let on_reader = upload_stream.clone_dtoh(&fresh.loss()).unwrap();
    assert_eq!(Some(on_reader[0]), host_out.loss);
}

#[test]
fn device_buffers_are_validated_before_any_launch() {
    let Some(cuda) = cuda() else { return };
    let stream = cuda.stream();
    let shape = BatchShape::new(6, 2, 4).unwrap();
    let features = stream.alloc_zeros::<f32>(48).unwrap();
    let short = stream.alloc_zeros::<f32>(47).unwrap();
    let labels = stream.alloc_zeros::<i64>(6).unwrap();
    let few_labels = stream.alloc_zeros::<i64>(5).unwrap();
    let mask = stream.alloc_zeros::<f32>(35).unwrap();
    let loss = SupConLoss::default();
    let (fv, sv) = (features.as_view(), short.as_view());

    let error = cuda
        .forward_device(&loss, &sv, shape, DevicePositives::SimClr)
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidDeviceBuffer {
                buffer: "features",
                ..
            }
        ),
        "{error}"
    );
    let error = cuda
        .forward_device(
            &loss,
            &fv,
            shape,
            DevicePositives::Labels(&few_labels.as_view()),
        )
        .unwrap_err();
    assert_eq!(
        error,
        Error::LabelsLength {
            expected: 6,
            got: 5
        }
    );
    let error = cuda
        .forward_device(&loss, &fv, shape, DevicePositives::Mask(&mask.as_view()))
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidDeviceBuffer { buffer: "mask", .. }),
        "{error}"
    );
    assert_eq!(BatchShape::new(1, 1, 48), Err(Error::SingleRow));

    let labels_view = labels.as_view();
    let positives = DevicePositives::Labels(&labels_view);
    let forward = cuda.forward_device(&loss, &fv, shape, positives).unwrap();
    let mut small_grad = stream.alloc_zeros::<f32>(47).unwrap();
    let error = cuda
        .backward_device_into(
            &forward,
            &fv,
            positives,
            Upstream::Scalar(1.0),
            &mut small_grad.as_view_mut(),
        )
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidDeviceBuffer { buffer: "grad", .. }),
        "{error}"
    );
    let half_features = stream.alloc_zeros::<f16>(48).unwrap();
    let error = cuda
        .backward_device(
            &forward,
            &half_features.as_view(),
            positives,
            Upstream::Scalar(1.0),
        )
        .unwrap_err();
    assert!(matches!(error, Error::StateMismatch(_)), "{error}");
    let ones = Array1::<f64>::ones(12);
    let error = cuda
        .backward_device(&forward, &fv, positives, Upstream::PerAnchor(ones.view()))
        .unwrap_err();
    assert!(matches!(error, Error::UpstreamMismatch { .. }), "{error}");
}

/// NoPositivePolicy::Error: the device scalar is computed, the error surfaces on the host.
#[test]
fn anchors_without_positives_fail_under_the_error_policy() {
    let Some(cuda) = cuda() else { return };
    let (b, v, d) = (5, 1, 4);
    let z = Array3::<f32>::from_shape_fn((b, v, d), |(i, _, k)| ((i * 7 + k) as f32).sin());
    let labels = Array1::from(vec![0i64, 1, 0, 2, 2]);
    let loss = SupConLoss::builder()
        .no_positive(NoPositivePolicy::Error)
        .build()
        .unwrap();
    let expected = Error::AnchorWithoutPositives { anchor: 1 };
    let host = cuda.forward(&loss, z.view(), Positives::Labels(labels.view()));
    assert_eq!(host.unwrap_err(), expected);
    let features = cuda.stream().clone_htod(z.as_slice().unwrap()).unwrap();
    let device_labels = cuda
        .stream()
        .clone_htod(labels.as_slice().unwrap())
        .unwrap();
    let labels_view = device_labels.as_view();
    let positives = DevicePositives::Labels(&labels_view);
    let shape = BatchShape::new(b, v, d).unwrap();
    let forward = cuda
        .forward_device(&loss, &features.as_view(), shape, positives)
        .unwrap();
    assert_eq!(forward.loss_host().unwrap_err(), expected);
    assert_eq!(forward.to_host().unwrap_err(), expected);
    let grad = cuda.backward_device(
        &forward,
        &features.as_view(),
        positives,
        Upstream::Scalar(1.0),
    );
    assert_eq!(grad.unwrap_err(), expected);
}

/// The paths a machine without a GPU takes, for real: typed errors, no panic, and `auto`
/// falls back to a CPU backend.
#[test]
fn without_a_gpu_every_entry_point_is_a_typed_error() {
    if let Ok(backend) = supcon::CudaBackend::new(0) {
        eprintln!(
            "skipped: this machine runs the CUDA backend ({})",
            backend.name()
        );
        return;
    }
    let error = supcon::CudaBackend::new(0).unwrap_err();
    assert!(
        matches!(
            error,
            Error::NoCudaDriver
                | Error::NoCudaDevice { .. }
                | Error::UnsupportedComputeCapability { .. }
                | Error::KernelsNotBuilt
                | Error::DriverTooOld { .. }
                | Error::Cuda { .. }
        ),
        "{error:?}"
    );
    assert_eq!(AnyBackend::from_name("cuda").unwrap_err(), error);
    assert_ne!(AnyBackend::best_available().name(), "cuda");
}

/// Backends on one context share the loaded kernels, and outlive each other in any order.
#[test]
fn backends_share_a_context_and_drop_in_any_order() {
    let Some(first) = cuda() else { return };
    let second = supcon::CudaBackend::from_context(first.context().clone()).unwrap();
    let z = Array3::<f32>::from_shape_fn((3, 2, 5), |(b, v, d)| ((b * 3 + v + d) as f32).cos());
    let loss = SupConLoss::default();
    let a = first.forward(&loss, z.view(), Positives::SimClr).unwrap();
    drop(first);
    let b = second.forward(&loss, z.view(), Positives::SimClr).unwrap();
    assert_eq!(a.loss, b.loss);
    let third = supcon::CudaBackend::new(0).unwrap();
    drop(second);
    let c = third.forward(&loss, z.view(), Positives::SimClr).unwrap();
    assert_eq!(a.loss, c.loss);
}

/// The device API on memory the caller owns (a framework's allocator): the workspace holds the
/// same loss and per-anchor losses as `forward_device`, and the backward pass from it gives
/// the same gradient, bit for bit; with labels and with label sets, with and without a cap
/// (whose prepared positives the workspace holds too).
#[test]
fn device_api_on_caller_memory_equals_the_allocating_api() {
    let Some(cuda) = cuda() else { return };
    let mut rng = common::rng("device_api_on_caller_memory");
    let (b, v, d) = (37, 2, 40);
    let z = common::unit_features(&mut rng, (b, v, d)).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, b, 5);
    let mask = common::soft_mask(&mut rng, b);
    let sets = common::label_sets(&mut rng, b, 65);
    let batch = DeviceBatch::upload(cuda.stream(), &z, &labels, &mask, &sets);
    let stream = cuda.stream();
    let grids = [None, Some(2)].map(|cap| common::option_grid(0.2, 0.1, cap));
    for (index, loss) in grids
        .into_iter()
        .flatten()
        .filter(|l| l.no_positive() != NoPositivePolicy::Error)
        .enumerate()
    {
        // Every other configuration under `normalize`, its row scales computed on the device.
        let loss = loss.to_builder().normalize(index % 2 == 1).build().unwrap();
        let labels_view = batch.labels.as_view();
        let memberships = batch.memberships.as_view();
        let positives = if index % 2 == 0 {
            DevicePositives::Labels(&labels_view)
        } else {
            DevicePositives::LabelSets {
                memberships: &memberships,
                classes: 65,
                weight: LabelSetWeight::Jaccard,
            }
        };
        let layout =
            supcon::CudaBackend::workspace(&loss, batch.shape, positives.label_set_classes())
                .unwrap();
        let anchors = batch.shape.anchors(loss.contrast_mode());
        let per_anchor_upstream = Array1::from_shape_fn(anchors, |i| 0.5 - 0.01 * i as f64);
        let upstream = common::upstream_for(&loss, &per_anchor_upstream);
        let upstream_values: Vec<f64> = match upstream {
            Upstream::PerAnchor(u) => u.to_vec(),
            Upstream::Scalar(u) => vec![u; anchors],
        };
        let features = batch.features.as_view();
        let forward = cuda
            .forward_device(&loss, &features, batch.shape, positives)
            .unwrap();
        let grad = cuda
            .backward_device(&forward, &features, positives, upstream)
            .unwrap();
        let mut workspace = stream.alloc_zeros::<u8>(layout.bytes()).unwrap();
        cuda.forward_device_into(
            &loss,
            &features,
            batch.shape,
            positives,
            &mut workspace.as_view_mut(),
        )
        .unwrap();
        let device_upstream = stream.clone_htod(&upstream_values).unwrap();
        let mut scratch = stream.alloc_zeros::<u8>(layout.scratch_bytes()).unwrap();
        let mut into = stream.alloc_zeros::<f32>(b * v * d).unwrap();
        cuda.backward_device_from(
            &loss,
            &features,
            batch.shape,
            positives,
            &workspace.as_view(),
            &device_upstream.as_view(),
            &mut scratch.as_view_mut(),
            &mut into.as_view_mut(),
        )
        .unwrap();
        let bytes = stream.clone_dtoh(&workspace).unwrap();
        let loss_value = f64::from_le_bytes(bytes[layout.loss_offset()..][..8].try_into().unwrap());
        let allocated = stream.clone_dtoh(&forward.loss()).unwrap()[0];
        assert_eq!(loss_value.to_bits(), allocated.to_bits(), "{loss:?}");
        let per_anchor = stream.clone_dtoh(&forward.per_anchor()).unwrap();
        for (k, &l) in per_anchor.iter().enumerate() {
            let at = layout.per_anchor_offset() + 4 * k;
            let from_workspace = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            assert_eq!(from_workspace.to_bits(), l.to_bits(), "{loss:?} ℓ_{k}");
        }
        let (grad, into) = (
            stream.clone_dtoh(&grad).unwrap(),
            stream.clone_dtoh(&into).unwrap(),
        );
        assert!(
            grad.iter()
                .zip(&into)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{loss:?}"
        );
    }
}

/// The sharded loss on the CUDA backend over NCCL, one rank per GPU of this process (the GPU
/// check's machine has one), and a memory bank on the CUDA backend: both equal the CPU
/// backend's results within the f32 kernels' error. Needs libnccl (`libnccl.so` on the loader's
/// path); under `SUPCON_REQUIRE_CUDA=1` a missing library fails.
#[cfg(feature = "nccl")]
#[test]
fn nccl_sharded_loss_and_memory_bank_on_cuda() {
    use supcon::distributed::{NcclGroup, ShardedSupCon};
    let Some(cuda) = cuda() else { return };
    let mut rng = common::rng("nccl_sharded_loss_and_memory_bank_on_cuda");
    let (batch, views, dim) = (301, 2, 64);
    let z = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, batch, 40);
    let positives = Positives::Labels(labels.view());
    let loss = SupConLoss::builder().temperature(0.1).build().unwrap();
    let (want, want_grad) = supcon::CpuBackend
        .forward_backward(&loss, z.view(), positives, Upstream::Scalar(1.0))
        .unwrap();
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-5 * want.abs().max(1.0);
    // ‖got − want‖∞ / ‖want‖∞.
    let relative = |got: &Array3<f32>, want: &Array3<f32>| {
        let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    };
    let group = match NcclGroup::from_streams(vec![cuda.stream().clone()]) {
        Ok(mut groups) => groups.remove(0),
        Err(error) if std::env::var_os("SUPCON_REQUIRE_CUDA").is_some_and(|v| v != "0") => {
            panic!("SUPCON_REQUIRE_CUDA is set, but NCCL cannot start: {error}")
        }
        Err(error) => return eprintln!("skipped: NCCL cannot start here ({error})"),
    };
    let sharded = ShardedSupCon::new(loss, cuda.clone(), group);
    let step = sharded.forward(z.view(), positives).unwrap();
    let grad = sharded.backward(&step, Upstream::Scalar(1.0)).unwrap();
    assert!(close(step.loss().unwrap(), want.loss.unwrap()));
    let error = relative(&grad, &want_grad);
    assert!(error < 1e-4, "sharded: {error}");
    // The same step on device buffers: the loss and the gradient bit for bit the device
    // API's on the whole batch (one rank's shard is the whole batch).
    let stream = cuda.stream();
    let features = stream.clone_htod(z.as_slice().unwrap()).unwrap();
    let device_labels = stream.clone_htod(labels.as_slice().unwrap()).unwrap();
    let (features, device_labels) = (features.as_view(), device_labels.as_view());
    let device_positives = supcon::cuda::DevicePositives::Labels(&device_labels);
    let step = sharded
        .forward_device(&features, (batch, views, dim), device_positives)
        .unwrap();
    let grad = sharded
        .backward_device(&step, Upstream::Scalar(1.0))
        .unwrap();
    let shape = supcon::BatchShape::new(batch, views, dim).unwrap();
    let alone = cuda
        .forward_device(&loss, &features, shape, device_positives)
        .unwrap();
    let alone_grad = cuda
        .backward_device(&alone, &features, device_positives, Upstream::Scalar(1.0))
        .unwrap();
    assert_eq!(step.loss_host(&loss).unwrap(), alone.loss_host().unwrap());
    assert_eq!(
        stream.clone_dtoh(&grad).unwrap(),
        stream.clone_dtoh(&alone_grad).unwrap(),
        "the device path's gradient"
    );
    // A bank of the last 200 samples; the batch is the first 101.
    let mut bank = supcon::MemoryBank::<f32>::new(200, dim).unwrap();
    let held = z.slice(ndarray::s![101.., .., ..]);
    bank.push(held, Positives::Labels(labels.slice(ndarray::s![101..])))
        .unwrap();
    let head = z.slice(ndarray::s![..101, .., ..]);
    let head_labels = Positives::Labels(labels.slice(ndarray::s![..101]));
    let on_cuda = bank.forward(&cuda, &loss, head, head_labels).unwrap();
    let on_cpu = bank
        .forward(&supcon::CpuBackend, &loss, head, head_labels)
        .unwrap();
    assert!(close(on_cuda.loss().unwrap(), on_cpu.loss().unwrap()));
    let grad = bank
        .backward(&cuda, &loss, &on_cuda, Upstream::Scalar(1.0))
        .unwrap();
    let want = bank
        .backward(&supcon::CpuBackend, &loss, &on_cpu, Upstream::Scalar(1.0))
        .unwrap();
    let error = relative(&grad, &want);
    assert!(error < 1e-4, "bank: {error}");
}
