//! How far each kernel path's gradient is from the f64 reference: the norm-wise relative error
//! max|g − g_ref| / max|g_ref| of the emulated kernels (`EmulatedBackend`) for every element type
//! and `Precision`, on unit-norm batches with labels, the default loss. One markdown row each.
//!
//! ```sh
//! cargo run --release --features emulation --example precision_table
//! ```
//!
//! The emulation forms every product exactly and sums it in f32, as a tensor core does up to
//! its summation order, so these errors are what the kernels' operand rounding costs; they are
//! not yet measured on hardware.

use half::{bf16, f16};
use ndarray::{Array1, Array3};
use supcon::{
    Backend, Element, EmulatedBackend, GradElement, Positives, Precision, ReferenceBackend,
    SupConLoss, Upstream,
};

/// Unit-norm `[B, V, D]` rows from SplitMix64.
fn unit_rows(shape: (usize, usize, usize), seed: u64) -> Array3<f64> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut z = Array3::from_shape_fn(shape, |_| next());
    for mut row in z.rows_mut() {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.mapv_inplace(|x| x / norm);
    }
    z
}

/// The gradient's norm-wise relative error against the reference on the same (rounded) values.
fn relative_error<T: Element>(precision: Precision, z: &Array3<T>, labels: &Array1<i64>) -> f64 {
    let loss = SupConLoss::default();
    let positives = Positives::Labels(labels.view());
    let up = Upstream::Scalar(1.0);
    let (_, got) = EmulatedBackend::with_precision(precision)
        .forward_backward(&loss, z.view(), positives, up)
        .expect("the emulated kernels run");
    let (_, want) = ReferenceBackend
        .forward_backward(&loss, z.view(), positives, up)
        .expect("the reference runs");
    let scale = want.iter().fold(0.0f64, |m, g| m.max(g.to_f64().abs()));
    let error = got
        .iter()
        .zip(want.iter())
        .fold(0.0f64, |m, (a, b)| m.max((a.to_f64() - b.to_f64()).abs()));
    error / scale
}

fn main() {
    println!("| B × V × D | dtype | precision | kernels | gradient error |");
    println!("|---|---|---|---|---|");
    for (index, &(b, v, d)) in [(11, 2, 24), (12, 1, 20), (64, 2, 128), (200, 2, 64)]
        .iter()
        .enumerate()
    {
        let z = unit_rows((b, v, d), index as u64 + 1);
        let labels = Array1::from_shape_fn(b, |i| (i % 3) as i64);
        let rows = [
            (
                "f32",
                Precision::F32,
                "simt",
                relative_error(Precision::F32, &z.mapv(|x| x as f32), &labels),
            ),
            (
                "f32",
                Precision::Bf16x3,
                "mma split",
                relative_error(Precision::Bf16x3, &z.mapv(|x| x as f32), &labels),
            ),
            (
                "bf16",
                Precision::Auto,
                "mma",
                relative_error(Precision::Auto, &z.mapv(bf16::from_f64), &labels),
            ),
            (
                "f16",
                Precision::Auto,
                "mma",
                relative_error(Precision::Auto, &z.mapv(f16::from_f64), &labels),
            ),
        ];
        for (dtype, precision, kernels, error) in rows {
            println!("| {b} × {v} × {d} | {dtype} | {precision:?} | {kernels} | {error:.2e} |");
        }
    }
}
