//! The command line end to end: npy files in, npy files out, compared with the library.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array3, ArrayD};
use npyz::WriterBuilder;
use supcon::{Backend, Positives, ReferenceBackend, SupConLoss, Upstream};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supcon-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(
            std::fs::File::create(path).unwrap(),
        ))
        .begin_nd()
        .unwrap();
    writer.extend(data.iter().copied()).unwrap();
    writer.finish().unwrap();
}

fn read<T: npyz::Deserialize>(path: &Path) -> ArrayD<T> {
    let npy = npyz::NpyFile::new(std::fs::File::open(path).unwrap()).unwrap();
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    ArrayD::from_shape_vec(shape, npy.into_vec().unwrap()).unwrap()
}

fn supcon(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_supcon"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn run_writes_loss_per_anchor_and_gradient() {
    let mut rng = common::rng("cli");
    let dir = scratch("labels");
    let z = common::unit_features(&mut rng, (6, 2, 5)).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, 6, 3);
    write(&dir.join("features.npy"), &[6, 2, 5], z.as_slice().unwrap());
    write(&dir.join("labels.npy"), &[6], labels.as_slice().unwrap());
    let out = supcon(&[
        "run",
        "--features",
        dir.join("features.npy").to_str().unwrap(),
        "--labels",
        dir.join("labels.npy").to_str().unwrap(),
        "--temperature",
        "0.1",
        "--backend",
        "reference",
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let loss = SupConLoss::builder().temperature(0.1).build().unwrap();
    let (expected, grad) = ReferenceBackend
        .forward_backward(
            &loss,
            z.view(),
            Positives::Labels(labels.view()),
            Upstream::Scalar(1.0),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("loss = {:.9}", expected.loss.unwrap())),
        "{stdout}"
    );
    assert_eq!(
        read::<f64>(&dir.join("out/loss.npy"))
            .into_raw_vec_and_offset()
            .0,
        vec![expected.loss.unwrap()]
    );
    assert_eq!(
        read::<f64>(&dir.join("out/per_anchor.npy")),
        expected.per_anchor.into_dyn()
    );
    assert_eq!(read::<f32>(&dir.join("out/grad.npy")), grad.into_dyn());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn run_accepts_masks_half_features_and_reduction_none() {
    let mut rng = common::rng("cli_mask");
    let dir = scratch("mask");
    let z = common::unit_features(&mut rng, (4, 3, 7)).mapv(half::f16::from_f64);
    let mask = common::soft_mask(&mut rng, 4);
    write(&dir.join("features.npy"), &[4, 3, 7], z.as_slice().unwrap());
    write(&dir.join("mask.npy"), &[4, 4], mask.as_slice().unwrap());
    let out = supcon(&[
        "run",
        "--features",
        dir.join("features.npy").to_str().unwrap(),
        "--mask",
        dir.join("mask.npy").to_str().unwrap(),
        "--reduction",
        "none",
        "--contrast-mode",
        "one",
        "--summation",
        "inside",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.join("loss.npy").exists(),
        "reduction none writes no scalar loss"
    );
    let per_anchor = read::<f64>(&dir.join("per_anchor.npy"));
    assert_eq!(per_anchor.shape(), &[4]);
    let grad: Array3<f32> = read::<f32>(&dir.join("grad.npy"))
        .into_dimensionality()
        .unwrap();
    assert_eq!(grad.dim(), (4, 3, 7));
    assert!(grad.iter().all(|g| g.is_finite()) && grad.iter().any(|g| *g != 0.0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn demo_reports_the_loss_and_both_timings() {
    let out = supcon(&[
        "demo",
        "--batch",
        "300",
        "--views",
        "2",
        "--dim",
        "24",
        "--classes",
        "7",
        "--repeat",
        "2",
        "--backend",
        "cpu",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "backend cpu | B = 300, V = 2, D = 24, N = 600",
        "finite: true",
        "first call",
        "fastest of 2",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    let loss: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss = "))
        .and_then(|l| l.trim().parse().ok())
        .expect("a loss line");
    assert!(loss.is_finite() && loss > 0.0, "{stdout}");
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let dir = scratch("bad");
    write(
        &dir.join("flat.npy"),
        &[6],
        &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0],
    );
    write(&dir.join("ints.npy"), &[1, 2, 3], &[1i64, 2, 3, 4, 5, 6]);
    write(&dir.join("one.npy"), &[1, 1, 2], &[1.0f32, 0.5]);
    let cases = [
        (
            vec!["run", "--features", "flat.npy"],
            "must have 3 dimensions",
        ),
        (vec!["run", "--features", "ints.npy"], "must be float32"),
        (vec!["run", "--features", "one.npy"], "B·V = 1"),
        (vec!["run", "--features", "missing.npy"], "missing.npy"),
        (vec!["demo", "--temperature", "-1"], "temperature"),
        (vec!["demo", "--backend", "gpu9000"], "unknown backend"),
        (vec!["demo", "--repeat", "0"], "--repeat"),
    ];
    for (args, message) in cases {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".npy") {
                    dir.join(a).display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_supcon"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
