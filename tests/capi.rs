//! The C ABI (feature `capi`): `include/supcon.h` declares exactly what `src/capi/` defines,
//! and a C program compiled against the header and linked with the cdylib gets the CPU
//! backend's loss and gradient bit for bit (the reference's within f32 rounding), with error
//! statuses for bad arguments (`tests/capi/check.c`).
#![cfg(feature = "capi")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array1, Array3};
use rand::RngExt;
use supcon::{
    Backend, CpuBackend, LabelSetWeight, Positives, Reduction, ReferenceBackend, SupConLoss,
    Upstream,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `name → value` of the `SUPCON_*` constants, and `name → parameter count` of the functions.
type Declarations = (BTreeMap<String, String>, BTreeMap<String, usize>);

/// What `src/capi/` defines: `pub const SUPCON_X: T = V;` and `extern "C" fn name(…)`.
fn rust_declarations(source: &str) -> Declarations {
    let mut constants = BTreeMap::new();
    let mut functions = BTreeMap::new();
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("pub const SUPCON_") {
            let (name, value) = rest.split_once(':').unwrap();
            let value = value
                .split_once('=')
                .unwrap()
                .1
                .trim()
                .trim_end_matches(';');
            constants.insert(format!("SUPCON_{name}"), value.to_string());
        }
    }
    for (at, _) in source.match_indices("extern \"C\" fn ") {
        let rest = &source[at + "extern \"C\" fn ".len()..];
        let (name, rest) = rest.split_once('(').unwrap();
        let parameters = &rest[..rest.find(')').unwrap()];
        functions.insert(name.to_string(), count_parameters(parameters));
    }
    (constants, functions)
}

/// What the header declares: `#define SUPCON_X V` and prototypes `type name(…);`.
fn header_declarations(header: &str) -> Declarations {
    let mut constants = BTreeMap::new();
    let mut functions = BTreeMap::new();
    for line in header.lines() {
        if let Some(rest) = line.strip_prefix("#define SUPCON_") {
            if let Some((name, value)) = rest.split_once(' ') {
                constants.insert(format!("SUPCON_{name}"), value.trim().to_string());
            }
        }
    }
    // Prototypes may span lines: join the text and look for `supcon_name(` outside comments.
    let text: String = header
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    for (at, _) in text
        .match_indices(" supcon_")
        .chain(text.match_indices("*supcon_"))
    {
        let rest = &text[at + 1..];
        let Some((name, parameters)) = rest.split_once('(') else {
            continue;
        };
        if name.contains(' ') {
            continue;
        }
        let parameters = &parameters[..parameters.find(')').unwrap()];
        let count = if parameters.trim() == "void" {
            0
        } else {
            count_parameters(parameters)
        };
        functions.insert(name.to_string(), count);
    }
    (constants, functions)
}

fn count_parameters(parameters: &str) -> usize {
    let parameters = parameters.trim().trim_end_matches(',');
    if parameters.is_empty() {
        0
    } else {
        parameters.split(',').count()
    }
}

#[test]
fn the_header_declares_what_the_library_defines() {
    let mut source = String::new();
    for file in ["src/capi/mod.rs", "src/capi/device.rs"] {
        source += &std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
    }
    let header = std::fs::read_to_string(Path::new(ROOT).join("include/supcon.h")).unwrap();
    let (rust_constants, rust_functions) = rust_declarations(&source);
    let (header_constants, header_functions) = header_declarations(&header);
    assert!(rust_constants.len() > 30 && rust_functions.len() >= 14);
    assert_eq!(header_constants, rust_constants, "the header's constants");
    assert_eq!(
        header_functions, rust_functions,
        "the header's functions and their parameter counts"
    );
}

/// The directory of the cdylib this test was built with: `target/<profile>/deps`, beside the
/// test binary. (The copy in `target/<profile>` is the last `cargo build`'s, whatever its
/// features.)
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// The C program `source` compiled against the header and linked with the cdylib, as
/// `program`.
fn compiled(source: &Path, program: &Path) -> PathBuf {
    let library = library_dir();
    assert!(
        library.join("libsupcon.so").exists(),
        "no libsupcon.so in {}",
        library.display()
    );
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(source)
        .arg(format!("-I{}", Path::new(ROOT).join("include").display()))
        .arg(format!("-L{}", library.display()))
        .arg(format!("-Wl,-rpath,{}", library.display()))
        .args(["-lsupcon", "-o"])
        .arg(program)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "compiling {} failed", source.display());
    program.to_path_buf()
}

/// README's C snippet compiles against the header, links and runs.
#[test]
fn the_readmes_c_snippet_runs() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme.find("```c\n").expect("README has a C snippet") + "```c\n".len();
    let snippet = &readme[start..start + readme[start..].find("```").unwrap()];
    let out = std::env::temp_dir().join(format!("supcon-readme-c-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let source = out.join("train.c");
    std::fs::write(&source, snippet).unwrap();
    let program = compiled(&source, &out.join("train"));
    let run = run_linked(&program).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.starts_with("loss = "),
        "{stdout}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// A command running `program` with this test's cdylib: cargo's `LD_LIBRARY_PATH` lists the
/// profile's directory too, whose `libsupcon.so` may come from a build without `capi`.
fn run_linked(program: &Path) -> Command {
    let mut command = Command::new(program);
    command.env("LD_LIBRARY_PATH", library_dir());
    command
}

/// One run's inputs: the features, the positives (kind code, and their bytes) and options.
struct Case {
    kind: u64,
    reduction: Reduction,
    classes: usize,
}

#[test]
fn a_c_program_gets_the_cpu_backends_loss_and_gradient() {
    let out = std::env::temp_dir().join(format!("supcon-capi-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let program = compiled(
        &Path::new(ROOT).join("tests/capi/check.c"),
        &out.join("check"),
    );
    let mut rng = common::rng("a_c_program_gets_the_cpu_backends_loss_and_gradient");
    let cases = [
        Case {
            kind: 1,
            reduction: Reduction::Mean,
            classes: 0,
        },
        Case {
            kind: 0,
            reduction: Reduction::Sum,
            classes: 0,
        },
        Case {
            kind: 2,
            reduction: Reduction::None,
            classes: 0,
        },
        Case {
            kind: 3,
            reduction: Reduction::Mean,
            classes: 5,
        },
    ];
    for (index, case) in cases.iter().enumerate() {
        let (batch, views, dim) = (rng.random_range(9..40), 2, rng.random_range(3..20));
        let z = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
        let labels = common::labels(&mut rng, batch, 4);
        let mask = common::soft_mask(&mut rng, batch);
        let sets = common::label_sets(&mut rng, batch, case.classes.max(1));
        let positives = match case.kind {
            0 => Positives::SimClr,
            1 => Positives::Labels(labels.view()),
            2 => Positives::Mask(mask.view()),
            _ => Positives::LabelSets {
                sets: sets.view(),
                weight: LabelSetWeight::Jaccard,
            },
        };
        let reduction_code = match case.reduction {
            Reduction::Mean => 0u64,
            Reduction::Sum => 1,
            _ => 2,
        };
        let mut input = Vec::new();
        for value in [
            batch as u64,
            views as u64,
            dim as u64,
            case.kind,
            reduction_code,
            case.classes as u64,
        ] {
            input.extend_from_slice(&value.to_le_bytes());
        }
        input.extend_from_slice(bytemuck::cast_slice(z.as_slice().unwrap()));
        match case.kind {
            1 => input.extend_from_slice(bytemuck::cast_slice(labels.as_slice().unwrap())),
            2 => input.extend_from_slice(bytemuck::cast_slice(mask.as_slice().unwrap())),
            3 => input.extend(sets.iter().map(|&member| u8::from(member))),
            _ => {}
        }
        let (input_path, output_path) = (
            out.join(format!("in{index}")),
            out.join(format!("out{index}")),
        );
        std::fs::write(&input_path, &input).unwrap();
        let run = run_linked(&program)
            .arg(&input_path)
            .arg(&output_path)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "case {index}: {}",
            String::from_utf8_lossy(&run.stderr)
        );

        let loss = SupConLoss::builder()
            .temperature(0.1)
            .base_temperature(0.1)
            .reduction(case.reduction)
            .build()
            .unwrap();
        let anchors = batch * views;
        let ones = Array1::from_elem(anchors, 1.0);
        let upstream = match case.reduction {
            Reduction::None => Upstream::PerAnchor(ones.view()),
            _ => Upstream::Scalar(1.0),
        };
        let (want, want_grad) = CpuBackend
            .forward_backward(&loss, z.view(), positives, upstream)
            .unwrap();
        let output = std::fs::read(&output_path).unwrap();
        let (loss_bytes, rest) = output.split_at(8);
        let (per_anchor_bytes, rest) = rest.split_at(8 * anchors);
        let (grad_bytes, fused_bytes) = rest.split_at(4 * batch * views * dim);
        let got_loss = f64::from_le_bytes(loss_bytes.try_into().unwrap());
        let want_loss = want.loss.unwrap_or_else(|| want.per_anchor.iter().sum());
        assert_eq!(
            got_loss.to_bits(),
            want_loss.to_bits(),
            "case {index}: loss"
        );
        let per_anchor: Vec<f64> = per_anchor_bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(per_anchor, want.per_anchor.to_vec(), "case {index}: ℓ_i");
        for bytes in [grad_bytes, fused_bytes] {
            let grad: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let grad = Array3::from_shape_vec((batch, views, dim), grad).unwrap();
            assert_eq!(grad, want_grad, "case {index}: gradient");
        }
        // And the reference, within the CPU backend's f32 arithmetic.
        let z64 = z.mapv(f64::from);
        let (reference, reference_grad) = ReferenceBackend
            .forward_backward(&loss, z64.view(), positives, upstream)
            .unwrap();
        let reference_loss = reference.loss.unwrap_or_else(|| reference.per_anchor.sum());
        let error = (got_loss - reference_loss).abs() / reference_loss.abs().max(1.0);
        assert!(
            error < 1e-4,
            "case {index}: loss off the reference by {error:e}"
        );
        let error = common::relative_error(&want_grad.mapv(f64::from), &reference_grad, 1e-6);
        assert!(
            error < 1e-3,
            "case {index}: gradient off the reference by {error:e}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// A handle of the C ABI for `options` on `backend`.
fn handle(options: &supcon::capi::SupconOptions, backend: u32) -> *mut supcon::capi::SupconHandle {
    let mut handle = std::ptr::null_mut();
    // SAFETY: valid pointers.
    let status = unsafe { supcon::capi::supcon_new(options, backend, &mut handle) };
    assert_eq!(status, supcon::capi::SUPCON_OK, "{}", last_error());
    handle
}

fn last_error() -> String {
    // SAFETY: the library's NUL-terminated, thread-local message.
    unsafe { std::ffi::CStr::from_ptr(supcon::capi::supcon_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn default_options() -> supcon::capi::SupconOptions {
    let mut options = std::mem::MaybeUninit::uninit();
    // SAFETY: a writable `SupconOptions`.
    let status = unsafe { supcon::capi::supcon_options_default(options.as_mut_ptr()) };
    assert_eq!(status, supcon::capi::SUPCON_OK);
    // SAFETY: filled in above.
    unsafe { options.assume_init() }
}

/// The device entry points refuse, with a status and a message, what they cannot run: a handle
/// of another backend, null pointers; and the layout is the device API's.
#[test]
fn device_entry_points_refuse_what_they_cannot_run() {
    use supcon::capi::*;
    let options = default_options();
    let cpu = handle(&options, SUPCON_BACKEND_CPU);
    let labels = [3i64, 1, 3, 2, 1];
    let positives = SupconPositives {
        kind: SUPCON_POSITIVES_LABELS,
        set_weight: 0,
        data: labels.as_ptr().cast(),
        classes: 0,
    };
    let features = [0.5f32; 5 * 2 * 4];
    let mut workspace = [0u8; 4096];
    // SAFETY: live handle and buffers (host memory: the call must refuse before any use).
    let status = unsafe {
        supcon_forward_device(
            cpu,
            std::ptr::null_mut(),
            features.as_ptr().cast(),
            SUPCON_F32,
            5,
            2,
            4,
            &positives,
            workspace.as_mut_ptr().cast(),
            workspace.len(),
        )
    };
    let message = last_error();
    if cfg!(feature = "cuda") {
        assert_eq!(status, SUPCON_INVALID_ARGUMENT, "{message}");
        assert!(message.contains("SUPCON_BACKEND_CUDA"), "{message}");
    } else {
        assert_eq!(status, SUPCON_NO_CUDA, "{message}");
    }
    // SAFETY: null handle, then null positives: refused before anything is read.
    let (null_handle, null_positives) = unsafe {
        (
            supcon_forward_device(
                std::ptr::null(),
                std::ptr::null_mut(),
                features.as_ptr().cast(),
                SUPCON_F32,
                5,
                2,
                4,
                &positives,
                workspace.as_mut_ptr().cast(),
                workspace.len(),
            ),
            supcon_backward_device(
                cpu,
                std::ptr::null_mut(),
                features.as_ptr().cast(),
                SUPCON_F32,
                5,
                2,
                4,
                std::ptr::null(),
                workspace.as_ptr().cast(),
                workspace.len(),
                std::ptr::null(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            ),
        )
    };
    assert_eq!(null_handle, SUPCON_INVALID_ARGUMENT);
    assert_eq!(null_positives, SUPCON_INVALID_ARGUMENT);
    assert!(
        last_error().contains("positives is null"),
        "{}",
        last_error()
    );

    let mut layout = SupconDeviceLayout::default();
    // SAFETY: live handle, positives and layout.
    let status = unsafe { supcon_device_layout(cpu, 5, 2, 4, &positives, &mut layout) };
    #[cfg(feature = "cuda")]
    {
        assert_eq!(status, SUPCON_OK, "{}", last_error());
        let shape = supcon::BatchShape::new(5, 2, 4).unwrap();
        let want = supcon::CudaBackend::workspace(&SupConLoss::default(), shape, None).unwrap();
        assert_eq!(
            layout,
            SupconDeviceLayout {
                workspace_bytes: want.bytes(),
                scratch_bytes: want.scratch_bytes(),
                loss_offset: want.loss_offset(),
                per_anchor_offset: want.per_anchor_offset(),
                anchors_without_positives_offset: want.anchors_without_positives_offset(),
                anchors: 10,
            }
        );
        // An empty batch is the loss's error.
        // SAFETY: as above.
        let status = unsafe { supcon_device_layout(cpu, 0, 2, 4, &positives, &mut layout) };
        assert_eq!(status, SUPCON_INVALID_ARGUMENT);
    }
    #[cfg(not(feature = "cuda"))]
    assert_eq!(status, SUPCON_NO_CUDA);
    // SAFETY: from `supcon_new`, not used again.
    unsafe { supcon_free(cpu) };
}

/// On a GPU: the device entry points, on a stream of the caller's, give the device API's
/// loss, per-anchor losses and gradient bit for bit, for f32 and bf16 features and every kind
/// of positives.
#[cfg(feature = "cuda")]
#[test]
fn cuda_device_entry_points_equal_the_device_api() {
    use cudarc::driver::CudaSlice;
    use supcon::capi::*;
    use supcon::cuda::DevicePositives;
    let backend = match supcon::CudaBackend::new(0) {
        Ok(backend) => backend,
        Err(error) if std::env::var_os("SUPCON_REQUIRE_CUDA").is_some_and(|v| v != "0") => {
            panic!("SUPCON_REQUIRE_CUDA is set, but the CUDA backend cannot run: {error}")
        }
        Err(error) => {
            eprintln!("skipped: the CUDA backend cannot run here ({error})");
            return;
        }
    };
    let mut rng = common::rng("cuda_device_entry_points_equal_the_device_api");
    // The caller's own stream, in GPU 0's primary context.
    let stream = backend.context().new_stream().unwrap();
    let (batch, views, dim, classes) = (37usize, 2usize, 45usize, 7usize);
    let shape = supcon::BatchShape::new(batch, views, dim).unwrap();
    let z = common::unit_features(&mut rng, (batch, views, dim));
    let labels = common::labels(&mut rng, batch, 4);
    let mask = common::soft_mask(&mut rng, batch);
    let sets: Vec<u8> = common::label_sets(&mut rng, batch, classes)
        .iter()
        .map(|&m| u8::from(m))
        .collect();
    let labels_d = stream.clone_htod(labels.as_slice().unwrap()).unwrap();
    let mask_d = stream.clone_htod(mask.as_slice().unwrap()).unwrap();
    let sets_d = stream.clone_htod(&sets).unwrap();
    for (index, reduction) in [
        SUPCON_REDUCTION_MEAN,
        SUPCON_REDUCTION_NONE,
        SUPCON_REDUCTION_SUM,
    ]
    .into_iter()
    .enumerate()
    {
        let mut options = default_options();
        options.temperature = 0.1;
        options.reduction = reduction;
        let cuda = handle(&options, SUPCON_BACKEND_CUDA);
        let loss = SupConLoss::builder()
            .temperature(0.1)
            .reduction([Reduction::Mean, Reduction::None, Reduction::Sum][index])
            .build()
            .unwrap();
        for kind in 0..4u32 {
            let (data, device_positives): (u64, DevicePositives<'_>) = match kind {
                SUPCON_POSITIVES_SIMCLR => (0, DevicePositives::SimClr),
                SUPCON_POSITIVES_LABELS => {
                    (raw(&labels_d), DevicePositives::Labels(&labels_d.as_view()))
                }
                SUPCON_POSITIVES_MASK => (raw(&mask_d), DevicePositives::Mask(&mask_d.as_view())),
                _ => (
                    raw(&sets_d),
                    DevicePositives::LabelSets {
                        memberships: &sets_d.as_view(),
                        classes,
                        weight: LabelSetWeight::Fraction,
                    },
                ),
            };
            let positives = SupconPositives {
                kind,
                set_weight: SUPCON_SET_WEIGHT_FRACTION,
                data: data as *const std::ffi::c_void,
                classes,
            };
            for dtype in [SUPCON_F32, SUPCON_BF16] {
                let what = format!("reduction {reduction}, positives {kind}, dtype {dtype}");
                let features: CudaSlice<u8> = match dtype {
                    SUPCON_F32 => stream
                        .clone_htod(bytemuck::cast_slice::<f32, u8>(
                            z.mapv(|x| x as f32).as_slice().unwrap(),
                        ))
                        .unwrap(),
                    _ => stream
                        .clone_htod(bytemuck::cast_slice::<half::bf16, u8>(
                            z.mapv(half::bf16::from_f64).as_slice().unwrap(),
                        ))
                        .unwrap(),
                };
                let mut layout = SupconDeviceLayout::default();
                // SAFETY: live handle, positives and layout.
                let status = unsafe {
                    supcon_device_layout(cuda, batch, views, dim, &positives, &mut layout)
                };
                assert_eq!(status, SUPCON_OK, "{what}: {}", last_error());
                let anchors = layout.anchors;
                let mut workspace = stream.alloc_zeros::<u8>(layout.workspace_bytes).unwrap();
                let mut scratch = stream.alloc_zeros::<u8>(layout.scratch_bytes).unwrap();
                let mut grad = stream
                    .clone_htod(&vec![f32::NAN; shape.elements()])
                    .unwrap();
                let upstream: Vec<f64> =
                    (0..anchors).map(|i| 0.5 + 0.25 * (i % 3) as f64).collect();
                let upstream = if reduction == SUPCON_REDUCTION_NONE {
                    upstream
                } else {
                    vec![0.75; anchors]
                };
                let upstream_d = stream.clone_htod(&upstream).unwrap();
                let cu_stream = stream.cu_stream() as *mut std::ffi::c_void;
                // SAFETY: live buffers of this context, alive until the stream is synchronised.
                unsafe {
                    let status = supcon_forward_device(
                        cuda,
                        cu_stream,
                        raw(&features) as *const std::ffi::c_void,
                        dtype,
                        batch,
                        views,
                        dim,
                        &positives,
                        raw(&workspace) as *mut std::ffi::c_void,
                        layout.workspace_bytes,
                    );
                    assert_eq!(status, SUPCON_OK, "{what}: {}", last_error());
                    let status = supcon_backward_device(
                        cuda,
                        cu_stream,
                        raw(&features) as *const std::ffi::c_void,
                        dtype,
                        batch,
                        views,
                        dim,
                        &positives,
                        raw(&workspace) as *const std::ffi::c_void,
                        layout.workspace_bytes,
                        raw(&upstream_d) as *const f64,
                        raw(&scratch) as *mut std::ffi::c_void,
                        layout.scratch_bytes,
                        raw(&grad) as *mut f32,
                    );
                    assert_eq!(status, SUPCON_OK, "{what}: {}", last_error());
                }
                stream.synchronize().unwrap();
                let bytes = stream.clone_dtoh(&workspace).unwrap();
                let got_loss = f64::from_le_bytes(
                    bytes[layout.loss_offset..layout.loss_offset + 8]
                        .try_into()
                        .unwrap(),
                );
                let got_per_anchor: Vec<f32> = bytes
                    [layout.per_anchor_offset..layout.per_anchor_offset + 4 * anchors]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let got_grad = stream.clone_dtoh(&grad).unwrap();
                let _ = (&mut workspace, &mut scratch, &mut grad);

                // The device API on the backend's own stream, from the same features.
                let own = backend.stream();
                let upstream_host = Array1::from(upstream.clone());
                let upstream_arg = if reduction == SUPCON_REDUCTION_NONE {
                    Upstream::PerAnchor(upstream_host.view())
                } else {
                    Upstream::Scalar(0.75)
                };
                stream.synchronize().unwrap();
                let (want_loss, want_per_anchor, want_grad) = match dtype {
                    SUPCON_F32 => device_api(
                        &backend,
                        &loss,
                        own,
                        &z.mapv(|x| x as f32),
                        shape,
                        device_positives,
                        upstream_arg,
                    ),
                    _ => device_api(
                        &backend,
                        &loss,
                        own,
                        &z.mapv(half::bf16::from_f64),
                        shape,
                        device_positives,
                        upstream_arg,
                    ),
                };
                assert_eq!(got_loss.to_bits(), want_loss.to_bits(), "{what}: loss");
                assert_eq!(got_per_anchor, want_per_anchor, "{what}: ℓ_i");
                assert_eq!(got_grad, want_grad, "{what}: gradient");
            }
        }
        // SAFETY: from `supcon_new`, not used again.
        unsafe { supcon_free(cuda) };
    }
}

/// A device buffer's address.
#[cfg(feature = "cuda")]
fn raw<T>(slice: &cudarc::driver::CudaSlice<T>) -> u64 {
    use cudarc::driver::DevicePtr;
    let stream = slice.stream().clone();
    let (pointer, _sync) = slice.device_ptr(&stream);
    pointer
}

/// The device API's loss, ℓ_i and gradient for features `z` on the backend's stream.
#[cfg(feature = "cuda")]
fn device_api<T: supcon::cuda::CudaFeature>(
    backend: &supcon::CudaBackend,
    loss: &SupConLoss,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    z: &Array3<T>,
    shape: supcon::BatchShape,
    positives: supcon::cuda::DevicePositives<'_>,
    upstream: Upstream<'_>,
) -> (f64, Vec<f32>, Vec<f32>) {
    let _ = loss;
    let features = stream.clone_htod(z.as_slice().unwrap()).unwrap();
    let forward = backend
        .forward_device(loss, &features.as_view(), shape, positives)
        .unwrap();
    let grad = backend
        .backward_device(&forward, &features.as_view(), positives, upstream)
        .unwrap();
    let loss_value = stream.clone_dtoh(&forward.loss()).unwrap()[0];
    let per_anchor = stream.clone_dtoh(&forward.per_anchor()).unwrap();
    let grad = stream.clone_dtoh(&grad).unwrap();
    (loss_value, per_anchor, grad)
}
