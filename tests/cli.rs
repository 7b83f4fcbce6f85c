//! The command line end to end: npy files in, npy files out, compared with the library.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array2, Array3, ArrayD};
use npyz::WriterBuilder;
use supcon::{
    AnyBackend, Backend, ContrastMode, LabelSetWeight, Positives, ReferenceBackend, Summation,
    SupConLoss, Upstream,
};

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
        (
            vec!["demo", "--batch", "64", "--base-temperature", "1e-308"],
            "the loss overflows",
        ),
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

/// Runs the binary through `sh` under an address-space limit of `megabytes` and, with
/// `file_blocks`, a file-size limit (in the shell's blocks).
fn supcon_limited(args: &[&str], megabytes: u64, file_blocks: Option<u64>) -> std::process::Output {
    let file_limit = file_blocks.map_or(String::new(), |b| format!("ulimit -f {b}; "));
    let script = format!(
        "ulimit -v {}; {file_limit}exec \"$0\" \"$@\"",
        megabytes * 1024
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_supcon"))
        .args(args)
        .output()
        .unwrap()
}

/// The header a .npy file of this version would carry (no padding needed by the reader).
fn npy_bytes(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend([version, 0]);
    if version == 1 {
        bytes.extend((header.len() as u16).to_le_bytes());
    } else {
        bytes.extend((header.len() as u32).to_le_bytes());
    }
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

/// Crafted and broken .npy files: each is refused within a second and 256 MB of address
/// space, with a short message that names the file, and nothing is allocated for a size the
/// file does not hold.
#[test]
fn malformed_npy_files_fail_fast_with_short_messages() {
    let dir = scratch("malformed");
    let f32_header =
        |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let mut files: Vec<(&str, Vec<u8>, &str)> = vec![
        // The header length field claims 4 GiB.
        (
            "huge-header.npy",
            npy_bytes(2, "", &[])
                .into_iter()
                .take(8)
                .chain(0xFFFF_FFF0u32.to_le_bytes())
                .collect(),
            "above the limit of 10000",
        ),
        (
            "wrong-magic.npy",
            b"\x93NUMPX\x01\x00\x00\x00".to_vec(),
            "not a .npy file",
        ),
        (
            "version-9.npy",
            npy_bytes(2, &f32_header("(1,)"), &[0; 4])
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 6 { 9 } else { b })
                .collect(),
            "version 9.0",
        ),
        ("empty.npy", Vec::new(), "truncated"),
        (
            "cut-header.npy",
            npy_bytes(1, &f32_header("(2, 2, 2)"), &[])
                .into_iter()
                .take(30)
                .collect(),
            "truncated",
        ),
        (
            "huge-shape.npy",
            npy_bytes(1, &f32_header("(1000000, 1000000, 1000000)"), &[]),
            "needs 4000000000000000000 bytes",
        ),
        (
            "overflowing-shape.npy",
            npy_bytes(1, &f32_header("(4294967296, 4294967296, 4294967296)"), &[]),
            "overflows",
        ),
        (
            "many-dims.npy",
            npy_bytes(
                1,
                &f32_header(&format!("({})", "1, ".repeat(1500))),
                &[0; 4],
            ),
            "more than 64 dimensions",
        ),
        (
            "truncated-data.npy",
            npy_bytes(1, &f32_header("(2, 2, 3)"), &[0; 40]),
            "needs 48 bytes of data, the file holds 40",
        ),
        (
            "trailing-data.npy",
            npy_bytes(1, &f32_header("(2, 2, 3)"), &[0; 52]),
            "the file holds 52",
        ),
        (
            "fortran.npy",
            npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2, 3), }",
                &[0; 48],
            ),
            "Fortran",
        ),
        (
            "structured.npy",
            npy_bytes(
                1,
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 2, 3), }",
                &[0; 48],
            ),
            "structured",
        ),
        (
            "pickle.npy",
            npy_bytes(
                1,
                "{'descr': '|O', 'fortran_order': False, 'shape': (2, 2, 3), }",
                &[0; 48],
            ),
            "unsupported dtype",
        ),
        (
            "not-a-dict.npy",
            npy_bytes(1, &"x".repeat(9000), &[]),
            "not a dict",
        ),
    ];
    // A sparse 2.2 GB file: the v2 prefix with a zero header length, then a hole.
    files.push(("sparse.npy", npy_bytes(2, "", &[]), "the header ends early"));
    for (name, bytes, message) in &files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        if *name == "sparse.npy" {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(2_200_000_000)
                .unwrap();
        }
        let start = std::time::Instant::now();
        let out = supcon_limited(
            &[
                "run",
                "--features",
                path.to_str().unwrap(),
                "--out",
                dir.join("out").to_str().unwrap(),
            ],
            256,
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains(message),
            "{name}: {stderr}"
        );
        assert!(
            stderr.len() < 300,
            "{name}: a {}-byte message",
            stderr.len()
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("memory allocation"),
            "{stderr}"
        );
        assert!(
            start.elapsed().as_secs_f64() < 1.0,
            "{name}: {:?}",
            start.elapsed()
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Random corruptions of a valid file (truncations, flipped bytes, overwritten header bytes):
/// every run ends in a clean error or a result, never a crash, within the same bounds.
#[test]
fn corrupted_npy_files_never_crash() {
    let mut rng = common::rng("corrupted_npy_files_never_crash");
    use rand::RngExt;
    let dir = scratch("corrupted");
    let z = common::unit_features(&mut rng, (5, 2, 3)).mapv(|x| x as f32);
    let good = dir.join("good.npy");
    write(&good, &[5, 2, 3], z.as_slice().unwrap());
    let bytes = std::fs::read(&good).unwrap();
    for round in 0..40 {
        let mut broken = bytes.clone();
        match round % 3 {
            0 => broken.truncate(rng.random_range(0..bytes.len())),
            1 => {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    broken[at] ^= 1 << rng.random_range(0..8);
                }
            }
            _ => {
                let at = rng.random_range(8..bytes.len().min(128));
                broken[at] = rng.random_range(0..=255);
            }
        }
        let path = dir.join(format!("broken-{round}.npy"));
        std::fs::write(&path, &broken).unwrap();
        let out = supcon_limited(
            &[
                "run",
                "--features",
                path.to_str().unwrap(),
                "--backend",
                "cpu",
                "--out",
                dir.join("out").to_str().unwrap(),
            ],
            512,
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code().is_some(),
            "round {round}: killed by a signal: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "round {round}: {stderr}");
        assert!(
            out.status.success() || stderr.len() < 300,
            "round {round}: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Big-endian features and mask and uint64 labels are read as numpy writes them: the result is
/// the little-endian one's; a uint64 label beyond int64 and an f64 weight beyond f32 are
/// refused with the value as given.
#[test]
fn byte_orders_and_wide_types_are_read_or_refused_as_given() {
    let mut rng = common::rng("byte_orders");
    let dir = scratch("byte-orders");
    let z = common::unit_features(&mut rng, (6, 2, 5)).mapv(|x| x as f32);
    let labels = [3u64, 1, 3, 0, 1, 1];
    write(&dir.join("little.npy"), &[6, 2, 5], z.as_slice().unwrap());
    let big: Vec<u8> = z.iter().flat_map(|x| x.to_be_bytes()).collect();
    std::fs::write(
        dir.join("big.npy"),
        npy_bytes(
            1,
            "{'descr': '>f4', 'fortran_order': False, 'shape': (6, 2, 5), }",
            &big,
        ),
    )
    .unwrap();
    write(&dir.join("labels.npy"), &[6], &labels);
    let run = |features: &str, out: &str| {
        supcon(&[
            "run",
            "--features",
            dir.join(features).to_str().unwrap(),
            "--labels",
            dir.join("labels.npy").to_str().unwrap(),
            "--backend",
            "reference",
            "--out",
            dir.join(out).to_str().unwrap(),
        ])
    };
    for (features, out) in [("little.npy", "a"), ("big.npy", "b")] {
        let output = run(features, out);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        std::fs::read(dir.join("a/grad.npy")).unwrap(),
        std::fs::read(dir.join("b/grad.npy")).unwrap()
    );
    write(
        &dir.join("huge-labels.npy"),
        &[6],
        &[1u64, 2, 3, u64::MAX, 5, 6],
    );
    let out = supcon(&[
        "run",
        "--features",
        dir.join("little.npy").to_str().unwrap(),
        "--labels",
        dir.join("huge-labels.npy").to_str().unwrap(),
        "--out",
        dir.join("c").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("labels[3] = 18446744073709551615"),
        "{stderr}"
    );
    let mut mask = vec![0.5f64; 36];
    mask[7] = 1e39;
    write(&dir.join("mask.npy"), &[6, 6], &mask);
    let out = supcon(&[
        "run",
        "--features",
        dir.join("little.npy").to_str().unwrap(),
        "--mask",
        dir.join("mask.npy").to_str().unwrap(),
        "--out",
        dir.join("d").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mask[1, 1] = 1e39"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The output folder: checked before any computation; a run writes all its outputs or none
/// (a file-size limit hit half-way leaves the previous run's files intact and no temporary
/// file), and never leaves a file of an earlier run that its options do not produce.
#[test]
fn outputs_are_written_all_or_nothing_and_never_stale() {
    let mut rng = common::rng("outputs");
    let dir = scratch("outputs");
    let z = common::unit_features(&mut rng, (40, 2, 30)).mapv(|x| x as f32);
    write(
        &dir.join("features.npy"),
        &[40, 2, 30],
        z.as_slice().unwrap(),
    );
    let features = dir.join("features.npy");
    let out_dir = dir.join("out");
    let run = |extra: &[&str], blocks: Option<u64>| {
        let mut args = vec![
            "run",
            "--features",
            features.to_str().unwrap(),
            "--backend",
            "cpu",
        ];
        args.extend(extra);
        supcon_limited(&args, 2048, blocks)
    };
    let out = run(&["--out", out_dir.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = ["loss.npy", "per_anchor.npy", "grad.npy"];
    let before: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(out_dir.join(n)).unwrap())
        .collect();

    // grad.npy (40·2·30 f32 ≈ 9.7 kB) exceeds a 4 kB file-size limit; the other two fit.
    let out = run(
        &["--out", out_dir.to_str().unwrap(), "--temperature", "0.5"],
        Some(8),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write must fail: {stderr}");
    assert!(stderr.contains("grad.npy"), "{stderr}");
    for (name, old) in names.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(out_dir.join(name)).unwrap(),
            old,
            "{name} changed"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !names.contains(&name.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Reduction none produces no loss.npy, and removes the earlier one.
    let out = run(
        &[
            "--out",
            out_dir.to_str().unwrap(),
            "--reduction",
            "none",
            "--temperature",
            "0.5",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out_dir.join("loss.npy").exists());
    assert!(
        std::fs::read(out_dir.join("per_anchor.npy")).unwrap() != before[1],
        "per_anchor.npy is this run's"
    );

    // Unusable folders fail before the computation, with the folder named.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for (out, message) in [
        (file.to_str().unwrap(), "not a folder"),
        ("/proc/supcon-cannot-be-here", "cannot create it"),
    ] {
        let output = run(&["--out", out], None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(out) && stderr.contains(message),
            "{stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("loss ="),
            "computed first"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Sizes and counts a user can mistype are typed errors before anything large is allocated.
#[test]
fn impossible_sizes_and_counts_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["demo", "--batch", "18446744073709551615"],
            "exceeds the limit",
        ),
        (
            &["demo", "--batch", "100000000"],
            "cannot allocate 102400000000 bytes",
        ),
        (&["demo", "--batch", "0"], "empty dimension"),
        (&["demo", "--classes", "0"], "--classes"),
        (
            &["demo", "--positives-cap", "-1"],
            "must be at least 1, got -1",
        ),
    ];
    for (args, message) in cases {
        let out = supcon_limited(args, 4096, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("memory allocation"),
            "{stderr}"
        );
        assert!(stderr.len() < 400, "{args:?}: {stderr}");
    }
}

/// The arguments for `run` on `features` with `extra`, writing to `out`, all under `dir`.
fn run_args<'a>(dir: &'a Path, features: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--features".to_string(),
        dir.join(features).display().to_string(),
        "--out".to_string(),
        dir.join(out).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| {
        if a.ends_with(".npy") {
            dir.join(a).display().to_string()
        } else {
            a.to_string()
        }
    }));
    args
}

/// Runs `supcon` with `args`, which must succeed.
fn supcon_ok(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_supcon"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `supcon` with `args`, which must fail with `message` in a short, panic-free error.
fn supcon_fails(args: &[String], message: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_supcon"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(message),
        "{args:?}: expected {message:?} in: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && stderr.len() < 400,
        "{stderr}"
    );
}

/// A run's outputs in `dir`: the loss, the per-anchor losses and the f32 gradient.
fn outputs(dir: &Path) -> (f64, ArrayD<f64>, ArrayD<f32>) {
    let loss = read::<f64>(&dir.join("loss.npy"))
        .into_raw_vec_and_offset()
        .0;
    (
        loss[0],
        read::<f64>(&dir.join("per_anchor.npy")),
        read::<f32>(&dir.join("grad.npy")),
    )
}

/// `[B, K]` random label sets with about `density` of the labels set, and sample 2's set empty.
fn random_sets(
    rng: &mut rand::rngs::StdRng,
    batch: usize,
    labels: usize,
    density: f64,
) -> Array2<bool> {
    use rand::RngExt;
    Array2::from_shape_fn((batch, labels), |(b, _)| {
        b != 2 && rng.random::<f64>() < density
    })
}

/// `--label-sets` with each `--label-set-weight`, on the reference and the CPU backend, with
/// K = 67 (two bitset words) and an empty set: the loss, the per-anchor losses and the gradient
/// are the library's on the same inputs, exactly.
#[test]
fn label_sets_give_the_library_result_for_each_weight() {
    let mut rng = common::rng("cli_label_sets");
    let dir = scratch("label-sets");
    let (batch, views, dim, labels) = (9, 2, 6, 67);
    let z = common::unit_features(&mut rng, (batch, views, dim)).mapv(|x| x as f32);
    let sets = random_sets(&mut rng, batch, labels, 0.08);
    write(&dir.join("features.npy"), &[9, 2, 6], z.as_slice().unwrap());
    write(&dir.join("sets.npy"), &[9, 67], sets.as_slice().unwrap());
    let weights = [
        ("any", LabelSetWeight::Any),
        ("jaccard", LabelSetWeight::Jaccard),
        ("fraction", LabelSetWeight::Fraction),
    ];
    let variants: [(&[&str], SupConLoss); 2] = [
        (&[], SupConLoss::builder().temperature(0.1).build().unwrap()),
        (
            &["--contrast-mode", "one", "--summation", "inside"],
            SupConLoss::builder()
                .temperature(0.1)
                .contrast_mode(ContrastMode::One)
                .summation(Summation::Inside)
                .build()
                .unwrap(),
        ),
    ];
    for backend in ["reference", "cpu"] {
        for (name, weight) in weights {
            for (index, (extra, loss)) in variants.iter().enumerate() {
                let out = format!("out-{backend}-{name}-{index}");
                let mut args = vec![
                    "--label-sets",
                    "sets.npy",
                    "--label-set-weight",
                    name,
                    "--backend",
                    backend,
                    "--temperature",
                    "0.1",
                ];
                args.extend_from_slice(extra);
                supcon_ok(&run_args(&dir, "features.npy", &out, &args));
                let (expected, grad) = AnyBackend::from_name(backend)
                    .unwrap()
                    .forward_backward(
                        loss,
                        z.view(),
                        Positives::LabelSets {
                            sets: sets.view(),
                            weight,
                        },
                        Upstream::Scalar(1.0),
                    )
                    .unwrap();
                let (got_loss, got_per_anchor, got_grad) = outputs(&dir.join(&out));
                let what = format!("{backend} {name} {extra:?}");
                assert_eq!(got_loss, expected.loss.unwrap(), "{what}");
                assert_eq!(got_per_anchor, expected.per_anchor.into_dyn(), "{what}");
                assert_eq!(got_grad, grad.into_dyn(), "{what}");
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Label sets as numpy bools or 0/1 integers of several types give the same result; K = 0 is
/// SimCLR; a value other than 0 or 1 (in an integer file or a crafted bool byte), a wrong
/// row count, a wrong rank or dtype, and misused options are refused with a message that says
/// which.
#[test]
fn label_set_files_are_bools_or_01_integers() {
    let mut rng = common::rng("cli_label_set_files");
    let dir = scratch("label-set-files");
    let z = common::unit_features(&mut rng, (7, 2, 4)).mapv(|x| x as f32);
    write(&dir.join("features.npy"), &[7, 2, 4], z.as_slice().unwrap());
    let sets = random_sets(&mut rng, 7, 3, 0.5);
    let as_u8: Vec<u8> = sets.iter().map(|&s| u8::from(s)).collect();
    write(&dir.join("bool.npy"), &[7, 3], sets.as_slice().unwrap());
    write(&dir.join("u8.npy"), &[7, 3], &as_u8);
    let as_i64: Vec<i64> = as_u8.iter().map(|&s| i64::from(s)).collect();
    write(&dir.join("i64.npy"), &[7, 3], &as_i64);
    let as_u32: Vec<u32> = as_u8.iter().map(|&s| u32::from(s)).collect();
    write(&dir.join("u32.npy"), &[7, 3], &as_u32);
    for (file, out) in [
        ("bool.npy", "bool"),
        ("u8.npy", "u8"),
        ("i64.npy", "i64"),
        ("u32.npy", "u32"),
    ] {
        let args = ["--label-sets", file, "--backend", "reference"];
        supcon_ok(&run_args(&dir, "features.npy", out, &args));
    }
    let grad = std::fs::read(dir.join("bool/grad.npy")).unwrap();
    for out in ["u8", "i64", "u32"] {
        assert_eq!(
            std::fs::read(dir.join(out).join("grad.npy")).unwrap(),
            grad,
            "{out}"
        );
    }
    // K = 0: no sample has a label, so only the other views are positives, as in SimCLR.
    write::<bool>(&dir.join("k0.npy"), &[7, 0], &[]);
    let args = [
        "--label-sets",
        "k0.npy",
        "--label-set-weight",
        "jaccard",
        "--backend",
        "reference",
    ];
    supcon_ok(&run_args(&dir, "features.npy", "k0", &args));
    supcon_ok(&run_args(
        &dir,
        "features.npy",
        "simclr",
        &["--backend", "reference"],
    ));
    assert_eq!(
        std::fs::read(dir.join("k0/grad.npy")).unwrap(),
        std::fs::read(dir.join("simclr/grad.npy")).unwrap()
    );

    let mut two: Vec<i16> = as_u8.iter().map(|&s| i16::from(s)).collect();
    two[3 * 3 + 1] = 2;
    write(&dir.join("two.npy"), &[7, 3], &two);
    let mut negative: Vec<i8> = as_u8.iter().map(|&s| s as i8).collect();
    negative[5] = -1;
    write(&dir.join("negative.npy"), &[7, 3], &negative);
    let mut byte = as_u8.clone();
    byte[2] = 2;
    std::fs::write(
        dir.join("byte.npy"),
        npy_bytes(
            1,
            "{'descr': '|b1', 'fortran_order': False, 'shape': (7, 3), }",
            &byte,
        ),
    )
    .unwrap();
    let eight = random_sets(&mut rng, 8, 3, 0.5);
    write(&dir.join("eight.npy"), &[8, 3], eight.as_slice().unwrap());
    write(&dir.join("flat.npy"), &[21], &as_u8);
    write(&dir.join("float.npy"), &[7, 3], &[0.0f32; 21]);
    write(&dir.join("labels.npy"), &[7], &[0i64, 1, 0, 1, 2, 2, 3]);
    let cases: [(&[&str], &str); 8] = [
        (
            &["--label-sets", "two.npy"],
            "two.npy: label_sets[3, 1] = 2 is not 0 or 1",
        ),
        (
            &["--label-sets", "negative.npy"],
            "negative.npy: label_sets[1, 2] = -1 is not 0 or 1",
        ),
        (
            &["--label-sets", "byte.npy"],
            "byte.npy: label_sets[0, 2] = 2 is not 0 or 1",
        ),
        (
            &["--label-sets", "eight.npy"],
            "label sets have shape [8, 3], expected [7, K]",
        ),
        (
            &["--label-sets", "flat.npy"],
            "label sets must have 2 dimensions",
        ),
        (
            &["--label-sets", "float.npy"],
            "must be bool or 0/1 integers, got float32",
        ),
        (&["--label-set-weight", "jaccard"], "--label-sets"),
        (
            &["--label-sets", "bool.npy", "--labels", "labels.npy"],
            "cannot be used with",
        ),
    ];
    for (args, message) in cases {
        supcon_fails(&run_args(&dir, "features.npy", "bad", args), message);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--normalize` on features of norms 0.3 to 4: the result differs from the plain run and is
/// the library's with `normalize(true)` exactly, on each backend; its loss is the reference's
/// loss of the normalised rows.
#[test]
fn normalize_gives_the_library_result() {
    let mut rng = common::rng("cli_normalize");
    let dir = scratch("normalize");
    let z = common::features(&mut rng, (8, 2, 5), 0.3..4.0).mapv(|x| x as f32);
    let labels = common::labels(&mut rng, 8, 3);
    write(&dir.join("features.npy"), &[8, 2, 5], z.as_slice().unwrap());
    write(&dir.join("labels.npy"), &[8], labels.as_slice().unwrap());
    let loss = SupConLoss::builder()
        .temperature(0.2)
        .normalize(true)
        .build()
        .unwrap();
    for backend in ["reference", "cpu"] {
        let common_args = [
            "--labels",
            "labels.npy",
            "--temperature",
            "0.2",
            "--backend",
            backend,
        ];
        let plain = format!("plain-{backend}");
        supcon_ok(&run_args(&dir, "features.npy", &plain, &common_args));
        let normalized = format!("normalized-{backend}");
        let mut args = common_args.to_vec();
        args.push("--normalize");
        supcon_ok(&run_args(&dir, "features.npy", &normalized, &args));
        let (plain_loss, _, plain_grad) = outputs(&dir.join(&plain));
        let (got_loss, got_per_anchor, got_grad) = outputs(&dir.join(&normalized));
        assert_ne!(got_loss, plain_loss, "{backend}");
        assert_ne!(got_grad, plain_grad, "{backend}");
        let (expected, grad) = AnyBackend::from_name(backend)
            .unwrap()
            .forward_backward(
                &loss,
                z.view(),
                Positives::Labels(labels.view()),
                Upstream::Scalar(1.0),
            )
            .unwrap();
        assert_eq!(got_loss, expected.loss.unwrap(), "{backend}");
        assert_eq!(got_per_anchor, expected.per_anchor.into_dyn(), "{backend}");
        assert_eq!(got_grad, grad.into_dyn(), "{backend}");

        let mut u = z.mapv(f64::from);
        for mut row in u.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row.mapv_inplace(|x| x / norm);
        }
        let of_unit_rows = ReferenceBackend
            .forward(
                &SupConLoss::builder().temperature(0.2).build().unwrap(),
                u.view(),
                Positives::Labels(labels.view()),
            )
            .unwrap()
            .loss
            .unwrap();
        let tolerance = if backend == "reference" { 1e-12 } else { 1e-5 };
        assert!(
            (got_loss - of_unit_rows).abs() <= tolerance * of_unit_rows.abs(),
            "{backend}: {got_loss} vs {of_unit_rows}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
