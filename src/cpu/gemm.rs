//! The tile products C = α·A·B, with no per-call packing.
//!
//! A general sgemm (matrixmultiply) copies both operands into packed panels on every call;
//! with this backend's shapes (k = D or 256, three products per 256×256 tile) that copying took
//! ~18% of the run time. Here neither operand is copied per call:
//!
//! - A (m×k) is read in place with any row and column steps, one broadcast per element: Z_I's
//!   rows (S = Z_I Z_Jᵀ), H's rows (H Z_J) or H's columns (Hᵀ Z_I);
//! - B (k×n) must have n contiguous per k: Z's rows are (H Z, n = D); Zᵀ is not, so it is
//!   packed once per call of the backend into column panels ([`pack_panels`]).
//!
//! The micro-kernel keeps an MR×NR block of C in registers (AVX-512: 8×32 = 16 zmm, AVX2: 6×16
//! = 12 ymm, baseline: 4×8 = 8 xmm) and walks k: NR/lanes vector loads of B, MR broadcasts of
//! A, MR·NR fused multiply-adds. Every element of C is a sum over k in increasing order, so all
//! FMA paths round identically (the baseline has no FMA and rounds each product).

use super::math::Aligned;
use super::simd::Isa;

/// How the micro-kernel multiplies and adds.
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding per multiply-add (`vfmadd`; only where the CPU has FMA).
struct Fused;
/// A rounded product, then a rounded sum (the baseline has no FMA instruction).
struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

impl Isa {
    /// The width NR of the kernel's C block (and of the packed panels) on this ISA.
    pub(super) fn panel_width(self) -> usize {
        match self {
            Isa::Baseline => 8,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 16,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 32,
        }
    }
}

/// The right operand B (k×n).
#[derive(Clone, Copy)]
pub(super) enum Right<'a> {
    /// Row-major: element (p, c) at `data[p·stride + c]`.
    Rows { data: &'a [f32], stride: usize },
    /// From [`pack_panels`] with the ISA's panel width NR: columns q·NR.. form panel q, a k×NR
    /// row-major block at `data[q·k·NR..]`.
    Panels { data: &'a [f32] },
}

/// Zᵀ in column panels for [`Right::Panels`]: `rows` (n×k row-major) becomes, for each group of
/// `width` rows (zero-padded at the end), a k×width row-major block.
pub(super) fn pack_panels(rows: &[f32], k: usize, width: usize) -> crate::Result<Aligned> {
    let n = rows.len() / k;
    let panels = n.div_ceil(width);
    let mut packed = Aligned::try_zeros(panels * k * width)?;
    for (q, panel) in packed.chunks_mut(k * width).enumerate() {
        for c in 0..width.min(n - q * width) {
            let row = &rows[(q * width + c) * k..][..k];
            for (p, &x) in row.iter().enumerate() {
                panel[p * width + c] = x;
            }
        }
    }
    Ok(packed)
}

/// One product `C = α·A·B` (C overwritten).
pub(super) struct Product<'a> {
    /// Rows of A and C.
    pub(super) m: usize,
    /// Columns of B and C.
    pub(super) n: usize,
    /// Columns of A, rows of B.
    pub(super) k: usize,
    pub(super) alpha: f32,
    /// A: element (r, p) at `a[r·a_row_step + p·a_col_step]`.
    pub(super) a: &'a [f32],
    pub(super) a_row_step: usize,
    pub(super) a_col_step: usize,
    pub(super) b: Right<'a>,
    /// C: element (r, c) at `c[r·c_stride + c]`.
    pub(super) c: &'a mut [f32],
    pub(super) c_stride: usize,
}

impl Product<'_> {
    /// Computes the product on `isa`.
    ///
    /// # Panics
    /// If an operand slice is too short for its shape (a bug in the caller, never user input).
    pub(super) fn run(self, isa: Isa) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        assert!(k > 0);
        assert!(self.a.len() > (m - 1) * self.a_row_step + (k - 1) * self.a_col_step);
        assert!(self.c.len() >= (m - 1) * self.c_stride + n);
        match self.b {
            Right::Rows { data, stride } => assert!(data.len() >= (k - 1) * stride + n),
            Right::Panels { data } => {
                assert!(data.len() >= n.div_ceil(isa.panel_width()) * k * isa.panel_width())
            }
        }
        match isa {
            Isa::Baseline => product::<4, 8, Separate>(self),
            // SAFETY: `Isa::Avx2` exists only where the CPU has AVX2 and FMA (`Isa::detect`).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { product_avx2(self) },
            // SAFETY: `Isa::Avx512` exists only where the CPU has AVX-512 F/BW/DQ/VL, AVX2 and
            // FMA (`Isa::detect`).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { product_avx512(self) },
        }
    }
}

/// [`product`] with 6×16 blocks, compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_avx2(p: Product<'_>) {
    product::<6, 16, Fused>(p);
}

/// [`product`] with 8×32 blocks, compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn product_avx512(p: Product<'_>) {
    product::<8, 32, Fused>(p);
}

/// The product in MR×NR blocks of C; `Product::run` has checked the operand lengths.
#[inline(always)]
fn product<const MR: usize, const NR: usize, F: MulAdd>(p: Product<'_>) {
    let Product {
        m,
        n,
        k,
        alpha,
        a,
        a_row_step,
        a_col_step,
        b,
        c,
        c_stride,
    } = p;
    // A ragged last panel of a row-major B is copied, zero-padded, so that the kernel's NR-wide
    // loads stay inside the operand.
    let mut edge = Vec::new();
    for col in (0..n).step_by(NR) {
        let cols = NR.min(n - col);
        let (panel, panel_stride): (&[f32], usize) = match b {
            Right::Panels { data } => (&data[(col / NR) * k * NR..][..k * NR], NR),
            Right::Rows { data, stride } if cols == NR => (&data[col..], stride),
            Right::Rows { data, stride } => {
                edge.clear();
                edge.resize(k * NR, 0.0);
                for (p, row) in edge.chunks_exact_mut(NR).enumerate() {
                    row[..cols].copy_from_slice(&data[p * stride + col..][..cols]);
                }
                (&edge, NR)
            }
        };
        assert!(panel.len() >= (k - 1) * panel_stride + NR);
        for row in (0..m).step_by(MR) {
            let rows = MR.min(m - row);
            // Rows past m repeat the last one (their results are dropped), so every read of A
            // stays in bounds.
            let a_rows: [usize; MR] = std::array::from_fn(|r| (row + r.min(rows - 1)) * a_row_step);
            // SAFETY: for r < MR and q < k, a_rows[r] + q·a_col_step ≤ (m−1)·a_row_step +
            // (k−1)·a_col_step < a.len() (checked by `Product::run`); panel reads
            // q·panel_stride + [0, NR) ≤ (k−1)·panel_stride + NR ≤ panel.len() (asserted above).
            let block = unsafe {
                kernel::<MR, NR, F>(
                    k,
                    a.as_ptr(),
                    &a_rows,
                    a_col_step,
                    panel.as_ptr(),
                    panel_stride,
                )
            };
            for (r, block_row) in block.iter().enumerate().take(rows) {
                let out = &mut c[(row + r) * c_stride + col..][..cols];
                for (o, &x) in out.iter_mut().zip(block_row) {
                    *o = alpha * x;
                }
            }
        }
    }
}

/// Σ_q A(r, q)·B(q, c) for an MR×NR block, q = 0, 1, … k−1 in order.
///
/// # Safety
/// For every r < MR and q < k, `a.add(a_rows[r] + q·a_col_step)` and the NR floats at
/// `b.add(q·b_stride)` must be readable.
#[inline(always)]
unsafe fn kernel<const MR: usize, const NR: usize, F: MulAdd>(
    k: usize,
    a: *const f32,
    a_rows: &[usize; MR],
    a_col_step: usize,
    b: *const f32,
    b_stride: usize,
) -> [[f32; NR]; MR] {
    let mut block = [[0.0_f32; NR]; MR];
    for q in 0..k {
        // SAFETY: in bounds by this function's contract; `read_unaligned` as rows are only
        // 4-byte aligned.
        let b_row: [f32; NR] = unsafe { b.add(q * b_stride).cast::<[f32; NR]>().read_unaligned() };
        for (r, block_row) in block.iter_mut().enumerate() {
            // SAFETY: in bounds by this function's contract.
            let a_value = unsafe { *a.add(a_rows[r] + q * a_col_step) };
            for (x, &b_value) in block_row.iter_mut().zip(&b_row) {
                *x = F::mul_add(a_value, b_value, *x);
            }
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ISA's product against a plain f64 product, for row-major and panel operands,
    /// transposed A, and ragged shapes.
    #[test]
    fn products_match_a_plain_product() {
        let value = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
        for isa in Isa::supported() {
            for (m, n, k) in [(1, 1, 1), (7, 33, 5), (256, 128, 256), (45, 17, 130)] {
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let b: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let packed = pack_panels(&bt, k, isa.panel_width()).unwrap();
                let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let want: Vec<f64> = (0..m * n)
                    .map(|i| {
                        let (r, c) = (i / n, i % n);
                        (0..k)
                            .map(|q| f64::from(a[r * k + q]) * f64::from(b[q * n + c]))
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let operands = [
                    (
                        &a,
                        k,
                        1,
                        Right::Rows {
                            data: &b,
                            stride: n,
                        },
                    ),
                    (&a, k, 1, Right::Panels { data: &packed }),
                    (
                        &at,
                        1,
                        m,
                        Right::Rows {
                            data: &b,
                            stride: n,
                        },
                    ),
                ];
                for (a, a_row_step, a_col_step, b) in operands {
                    let mut c = vec![f32::NAN; m * (n + 3)];
                    Product {
                        m,
                        n,
                        k,
                        alpha: 0.5,
                        a,
                        a_row_step,
                        a_col_step,
                        b,
                        c: &mut c,
                        c_stride: n + 3,
                    }
                    .run(isa);
                    for (i, w) in want.iter().enumerate() {
                        let got = f64::from(c[(i / n) * (n + 3) + i % n]);
                        assert!(
                            (got - w).abs() < 1e-5 * (k as f64).sqrt(),
                            "{isa:?} {m}x{n}x{k}"
                        );
                    }
                }
            }
        }
    }
}
