//! The C ABI (feature `capi`): `include/supcon.h` declares exactly what `src/capi.rs` defines,
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

/// What `src/capi.rs` defines: `pub const SUPCON_X: T = V;` and `extern "C" fn name(…)`.
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
    let source = std::fs::read_to_string(Path::new(ROOT).join("src/capi.rs")).unwrap();
    let header = std::fs::read_to_string(Path::new(ROOT).join("include/supcon.h")).unwrap();
    let (rust_constants, rust_functions) = rust_declarations(&source);
    let (header_constants, header_functions) = header_declarations(&header);
    assert!(rust_constants.len() > 30 && rust_functions.len() >= 11);
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
