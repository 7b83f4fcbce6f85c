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
