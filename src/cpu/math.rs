//! Numerics for the tile loops: a branch-free `exp`, lane-parallel reductions and the f64
//! log-sum-exp accumulator that combines tile results.
//!
//! Rust never reassociates floating-point arithmetic, so a plain `sum += x` loop stays scalar.
//! The tile loops therefore keep `LANES` independent partial results (one AVX-512 register, two
//! AVX2 registers) and fold them in a fixed order at the end. The order is fixed by the code, not
//! by the instruction set or the thread count, so every compiled path gives bitwise the same
//! result. `exp` is written without branches or calls for the same reason: `f32::exp` calls libm
//! one element at a time, which would keep the loops that use it scalar.

/// f32 storage whose first element sits on a 64-byte boundary (one cache line, one AVX-512
/// register). Large `Vec`s come from `mmap` at a page plus 16 bytes, where every 64-byte load
/// of the products and tile loops would straddle two cache lines.
pub(super) struct Aligned {
    buffer: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    const SLACK: usize = 64 / std::mem::size_of::<f32>() - 1;

    /// `len` zeros (for per-thread scratch, whose size the batch does not set).
    pub(super) fn zeros(len: usize) -> Self {
        Self::from_buffer(vec![0.0; len + Self::SLACK], len)
    }

    /// `len` zeros, or [`crate::Error::OutOfMemory`] (for the buffers of size N·D).
    pub(super) fn try_zeros(len: usize) -> crate::Result<Self> {
        let buffer = crate::alloc::filled("cpu", len.saturating_add(Self::SLACK), 0.0)?;
        Ok(Self::from_buffer(buffer, len))
    }

    fn from_buffer(buffer: Vec<f32>, len: usize) -> Self {
        // `align_offset` may decline (usize::MAX); the data is then merely unaligned.
        let start = buffer.as_ptr().align_offset(64).min(Self::SLACK);
        Aligned { buffer, start, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buffer[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

/// Independent partial results per reduction; tile rows are padded to a multiple of it.
pub(super) const LANES: usize = 16;

/// A shared shift serves a subset of a tile row only while the subset's own maximum is within
/// this distance below it: e^-64 ≈ 1.6e-28 is still a normal f32, so no term of the subset
/// underflows. Farther down, the subset's sum is recomputed with its own maximum.
pub(super) const SHARED_SHIFT_RANGE: f32 = 64.0;

/// `n` rounded up to a multiple of [`LANES`].
pub(super) fn padded(n: usize) -> usize {
    n.div_ceil(LANES) * LANES
}

/// A lane-padded slice as whole groups of [`LANES`] (its length must be a multiple of it).
#[inline(always)]
pub(super) fn lanes(x: &[f32]) -> impl Iterator<Item = &[f32; LANES]> + '_ {
    debug_assert_eq!(x.len() % LANES, 0);
    x.chunks_exact(LANES)
        .map(|c| <&[f32; LANES]>::try_from(c).expect("chunks_exact yields whole lanes"))
}

/// The lane group `v[start..start + LANES]` as an array (a copy, one vector register; an
/// `array::from_fn` here was not always inlined, which left its callers scalar).
#[inline(always)]
pub(super) fn lane_group(v: &[f32], start: usize) -> [f32; LANES] {
    *<&[f32; LANES]>::try_from(&v[start..start + LANES]).expect("a whole lane group")
}

/// Writes a lane group back to `v[start..start + LANES]`.
#[inline(always)]
pub(super) fn set_lane_group(v: &mut [f32], start: usize, values: [f32; LANES]) {
    v[start..start + LANES].copy_from_slice(&values);
}

/// Makes the lane padding of a filled tile row neutral: entries from `len` on get weight 0 and
/// bias −∞, so they drop out of every max and sum.
#[inline(always)]
pub(super) fn neutral_padding(weight: &mut [f32], bias: &mut [f32], len: usize) {
    weight[len..].fill(0.0);
    bias[len..].fill(f32::NEG_INFINITY);
}

/// The larger of two non-NaN values (one compare and select: `f32::max` adds NaN handling).
#[inline(always)]
pub(super) fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// A set's maximum as a shift for its exponentials: an empty set (maximum −∞) gets 0, so that
/// `x − shift` stays −∞ (not NaN) for its excluded entries.
#[inline(always)]
pub(super) fn shift_of(set_max: f32) -> f32 {
    if set_max == f32::NEG_INFINITY {
        0.0
    } else {
        set_max
    }
}

/// Whether a subset with maximum `set_max` needs its own shift instead of `shift`
/// (see [`SHARED_SHIFT_RANGE`]).
#[inline(always)]
pub(super) fn needs_own_shift(set_max: f32, shift: f32) -> bool {
    set_max > f32::NEG_INFINITY && set_max < shift - SHARED_SHIFT_RANGE
}

/// e^x in f32, about 1 ulp, branch-free so that loops calling it vectorise.
///
/// Inputs below ln 2^-126 ≈ −87.34 (−∞ included) give exactly 0, which is how excluded entries
/// (shifted to −∞) drop out of sums; inputs above 88 saturate at e^88, so a masked-off lane never
/// produces ∞ (and 0·∞ = NaN). Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln2/2, e^r by a degree-6
/// polynomial (Horner steps as fused multiply-adds: a third fewer operations where the CPU has
/// FMA, and the same rounding everywhere), 2^n assembled in the exponent bits.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_55;
    const HIGHEST: f32 = 88.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HIGH is exact for |n| ≤ 128.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(LOWEST, HIGHEST);
    let rounded = clamped.mul_add(LOG2_E, ROUND);
    let n = rounded - ROUND;
    let r = n.mul_add(-LN2_LOW, n.mul_add(-LN2_HIGH, clamped));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let e_r = p.mul_add(r * r, r) + 1.0;
    // The integer n sits in the low bits of `rounded`; 2^n has exponent field n + 127 ∈ [1, 254].
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let two_to_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < LOWEST {
        0.0
    } else {
        e_r * two_to_n
    }
}

/// Sums lanes pairwise in a fixed order.
#[inline(always)]
pub(super) fn fold_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for k in 0..width {
            lanes[k] += lanes[k + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The maximum of the lanes.
#[inline(always)]
pub(super) fn fold_max(lanes: [f32; LANES]) -> f32 {
    lanes.into_iter().fold(f32::NEG_INFINITY, max)
}

/// log Σ e^{x_k}, accumulated from pieces `(shift, Σ e^{x_k − shift})` in f64.
///
/// Tile partials arrive in a fixed order (the schedule's), so the result does not depend on the
/// thread count. The running shift is the largest piece shift seen, so no term overflows.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogSumExp {
    shift: f64,
    sum: f64,
}

impl LogSumExp {
    /// The log-sum-exp of no term (−∞).
    pub(super) const EMPTY: Self = LogSumExp {
        shift: f64::NEG_INFINITY,
        sum: 0.0,
    };

    /// Adds the terms whose exponentials, shifted by `shift`, sum to `sum` (0: nothing to add).
    pub(super) fn add(&mut self, shift: f64, sum: f64) {
        if sum <= 0.0 {
            return;
        }
        if shift == self.shift {
            // The common case of pieces under one shared shift: no rescaling (e^0) to compute.
            self.sum += sum;
        } else if shift > self.shift {
            self.sum = self.sum * (self.shift - shift).exp() + sum;
            self.shift = shift;
        } else {
            self.sum += sum * (shift - self.shift).exp();
        }
    }

    /// Adds one term x.
    pub(super) fn add_term(&mut self, x: f64) {
        self.add(x, 1.0);
    }

    /// log Σ e^{x_k}; −∞ for no term.
    pub(super) fn value(self) -> f64 {
        if self.sum > 0.0 {
            self.shift + self.sum.ln()
        } else {
            f64::NEG_INFINITY
        }
    }
}

pub(super) use crate::math::{sigmoid, softplus};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_saturates() {
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f32::INFINITY).is_finite());
    }

    #[test]
    fn log_sum_exp_combines_pieces_in_any_magnitude() {
        let mut lse = LogSumExp::EMPTY;
        assert_eq!(lse.value(), f64::NEG_INFINITY);
        lse.add(2.0e6, 1.0);
        lse.add(0.0, 1.0e30);
        lse.add(2.0e6, 1.0);
        assert!((lse.value() - (2.0e6 + 2f64.ln())).abs() < 1e-9);
        lse.add(1.0, 0.0);
        assert!((lse.value() - (2.0e6 + 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn folds_are_plain_sums_and_maxima() {
        let lanes: [f32; LANES] = std::array::from_fn(|k| k as f32);
        assert_eq!(fold_sum(lanes), (0..LANES).sum::<usize>() as f32);
        assert_eq!(fold_max(lanes), (LANES - 1) as f32);
    }
}
