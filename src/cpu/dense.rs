//! The fast path of the paper's default loss: positives from labels or SimCLR (no cap),
//! denominator all, summation outside (L_out).
//!
//! Under these options every pair j ≠ i is in anchor i's denominator and w_ij = [y_i = y_j] for
//! j ≠ i, so the positives enter the loss and its gradient only through class sums of the rows:
//!
//! - P_i = |class y_i| − 1 and Σ_j w_ij s_ij = z_i · (C_{y_i} − z_i) / τ, with C_y = Σ_{y_r = y} z_r;
//! - the positive part of dZ_k = Σ_j H_kj z_j is −pos_k (C_{y_k} − z_k) − (C'_{y_k} − pos_k z_k)
//!   with pos_k = a_k / P_k and C'_y = Σ_{y_r = y} pos_r z_r.
//!
//! All O(N·D), in f64. The tiles are left with the dense softmax terms only, which need no pair
//! weights at all:
//!
//! - forward: per entry one exponential e = exp(s − G), G = max_r ‖z_r‖²/τ ≥ every logit, one
//!   shift shared by every row and column, so e feeds the anchor's row sums and the column's
//!   sums alike without a maximum pass or rescaling. The positives' sum (for the saved LSE^P)
//!   is the same e under a class compare. Each sum tracks its set's maximum; a set whose maximum
//!   ends more than `SHARED_SHIFT_RANGE` below G (huge norms or a tiny τ, where its terms could
//!   underflow) is summed again with its own maximum;
//! - backward: H_ij = a_i e^{s − LSE_i} + a_j e^{s − LSE_j} = e^{s − M} (α_i + α_j), with M the
//!   largest LSE of the tile's active rows and columns and α_k = a_k e^{M − LSE_k}: one
//!   exponential per entry while the tile's LSEs lie within `LSE_SPREAD` of each other (an
//!   entry then underflows only if its p_ij < e^{−(87 − LSE_SPREAD)}, which no f32 sum can
//!   see); two exponentials per entry otherwise.
//!
//! Self pairs sit on the diagonal of diagonal tiles: their logits are set to −∞ after the GEMM,
//! so they vanish from every sum (and their H entries are 0), and padding columns likewise.

use rayon::prelude::*;

use super::backward::sweep;
use super::forward::{block_states, AnchorStats};
use super::math::{
    exp, fold_max, fold_sum, lane_group, max, needs_own_shift, padded, set_lane_group, Aligned,
    LANES,
};
use super::simd::TileKernel;
use super::tiles::{flatten, Tile, BLOCK};
use super::Batch;
use crate::config::{Denominator, Summation};

/// The backward's one-exponential form needs the tile's LSEs within this range of their
/// maximum: α_k ≤ a_k e^{40} stays finite, and e^{s − M} underflows only for p_ij < e^{−47}.
pub(super) const LSE_SPREAD: f32 = 40.0;

/// Whether the batch takes this path, given that its relation is a class relation without a
/// cap (`ClassPairs::is_symmetric`).
pub(super) fn applies(batch: &Batch) -> bool {
    batch.loss.denominator() == Denominator::All && batch.loss.summation() == Summation::Outside
}

/// Rows grouped by class: each row's class, padded to whole lanes with a class no row has, the
/// rows of each class and the per-class feature sums.
pub(super) struct Classes {
    /// Class of row r; `u32::MAX` past N.
    of_row: Vec<u32>,
    /// The rows of class c, ascending, are `members[starts[c]..starts[c + 1]]`.
    starts: Vec<usize>,
    members: Vec<u32>,
    /// C_y, `[classes, D]` row-major.
    sum: Vec<f64>,
}

impl Classes {
    /// The classes of the batch's rows (`of_row` has N entries, dense ids).
    pub(super) fn new(batch: &Batch, of_row: &[u32]) -> Self {
        let class_count = of_row.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
        // A counting sort of the rows by class keeps each class's rows ascending.
        let mut starts = vec![0; class_count + 1];
        for &c in of_row {
            starts[c as usize + 1] += 1;
        }
        for c in 0..class_count {
            starts[c + 1] += starts[c];
        }
        let mut next = starts.clone();
        let mut members = vec![0; of_row.len()];
        for (r, &c) in of_row.iter().enumerate() {
            members[next[c as usize]] = r as u32;
            next[c as usize] += 1;
        }
        let mut of_row = of_row.to_vec();
        of_row.resize(padded(of_row.len()) + BLOCK, u32::MAX);
        let mut classes = Classes {
            of_row,
            starts,
            members,
            sum: Vec::new(),
        };
        classes.sum = classes.weighted_sums(batch, |_| 1.0);
        classes
    }

    /// Per class, Σ_{y_r = y} weight(r)·z_r in f64, `[classes, D]` (each in row order, so the
    /// result does not depend on the thread count).
    fn weighted_sums(&self, batch: &Batch, weight: impl Fn(usize) -> f64 + Sync) -> Vec<f64> {
        let dim = batch.rows.dim;
        let mut sums = vec![0.0; (self.starts.len() - 1) * dim];
        sums.par_chunks_mut(dim).enumerate().for_each(|(c, total)| {
            for r in self.members[self.starts[c]..self.starts[c + 1]]
                .iter()
                .map(|&r| r as usize)
            {
                let (w, row) = (weight(r), batch.rows.block(r..r + 1));
                if w != 0.0 {
                    for (t, &x) in total.iter_mut().zip(row) {
                        *t += w * f64::from(x);
                    }
                }
            }
        });
        sums
    }

    /// The number of rows of class c.
    fn count(&self, c: usize) -> usize {
        self.starts[c + 1] - self.starts[c]
    }

    /// P_i and Σ_j w_ij s_ij of every anchor.
    fn positive_statistics(&self, batch: &Batch) -> Vec<(f64, f64)> {
        let (dim, tau) = (batch.rows.dim, batch.loss.temperature());
        (0..batch.anchors)
            .into_par_iter()
            .map(|i| {
                let c = self.of_row[i] as usize;
                let z = batch.rows.block(i..i + 1);
                let dot: f64 = z
                    .iter()
                    .zip(&self.sum[c * dim..][..dim])
                    .map(|(&x, &total)| f64::from(x) * (total - f64::from(x)))
                    .sum();
                (self.count(c) as f64 - 1.0, dot / tau)
            })
            .collect()
    }
}

/// u32 lane group `v[start..start + LANES]`.
#[inline(always)]
fn class_group(v: &[u32], start: usize) -> [u32; LANES] {
    *<&[u32; LANES]>::try_from(&v[start..start + LANES]).expect("a whole lane group")
}

/// Sets the logits of excluded entries to −∞: padding columns and, on a diagonal tile, self
/// pairs.
fn exclude_self_and_padding(tile: &Tile, logits: &mut [f32]) {
    let (stride, width) = (tile.stride(), tile.cols.len());
    for (a, row) in logits
        .chunks_exact_mut(stride)
        .take(tile.rows.len())
        .enumerate()
    {
        row[width..].fill(f32::NEG_INFINITY);
        if tile.rows == tile.cols {
            row[a] = f32::NEG_INFINITY;
        }
    }
}

/// Per-column running sums of the forward, for the anchors of block J.
struct ColumnSums {
    den: Vec<f32>,
    den_max: Vec<f32>,
    pos: Vec<f32>,
    pos_max: Vec<f32>,
}

/// Per-thread buffers of the forward sweep.
struct ForwardScratch {
    logits: Aligned,
    columns: ColumnSums,
}

impl ForwardScratch {
    fn new() -> Self {
        let v = || vec![0.0; padded(BLOCK)];
        ForwardScratch {
            logits: Aligned::zeros(BLOCK * padded(BLOCK)),
            columns: ColumnSums {
                den: v(),
                den_max: v(),
                pos: v(),
                pos_max: v(),
            },
        }
    }
}

/// The elementwise work of one forward tile.
struct ForwardTile<'a> {
    tile: &'a Tile,
    classes: &'a [u32],
    shift: f32,
    scratch: &'a mut ForwardScratch,
    row_stats: &'a mut [AnchorStats],
    col_stats: Option<&'a mut [AnchorStats]>,
}

impl TileKernel for ForwardTile<'_> {
    #[inline(always)]
    fn run(self) {
        let ForwardTile {
            tile,
            classes,
            shift,
            scratch,
            row_stats,
            col_stats,
        } = self;
        let ForwardScratch { logits, columns } = scratch;
        let stride = tile.stride();
        exclude_self_and_padding(tile, logits);
        let count = col_stats.as_ref().map_or(0, |c| c.len());
        let span = padded(count);
        columns.den[..span].fill(0.0);
        columns.pos[..span].fill(0.0);
        columns.den_max[..span].fill(f32::NEG_INFINITY);
        columns.pos_max[..span].fill(f32::NEG_INFINITY);
        let col_classes = &classes[tile.cols.start..][..stride];
        for (a, i) in tile.rows.clone().enumerate() {
            let class = classes[i];
            let s = &logits[a * stride..][..stride];
            let mut den = [0.0; LANES];
            let mut den_max = [f32::NEG_INFINITY; LANES];
            let mut pos = [0.0; LANES];
            let mut pos_max = [f32::NEG_INFINITY; LANES];
            for start in (0..stride).step_by(LANES) {
                let (sv, cv) = (lane_group(s, start), class_group(col_classes, start));
                let mut e = [0.0; LANES];
                let mut pe = [0.0; LANES];
                let mut ps = [0.0; LANES];
                for l in 0..LANES {
                    e[l] = exp(sv[l] - shift);
                    let positive = cv[l] == class;
                    pe[l] = if positive { e[l] } else { 0.0 };
                    ps[l] = if positive { sv[l] } else { f32::NEG_INFINITY };
                    den[l] += e[l];
                    den_max[l] = max(den_max[l], sv[l]);
                    pos[l] += pe[l];
                    pos_max[l] = max(pos_max[l], ps[l]);
                }
                if start < span {
                    let mut c_den = lane_group(&columns.den, start);
                    let mut c_den_max = lane_group(&columns.den_max, start);
                    let mut c_pos = lane_group(&columns.pos, start);
                    let mut c_pos_max = lane_group(&columns.pos_max, start);
                    for l in 0..LANES {
                        c_den[l] += e[l];
                        c_den_max[l] = max(c_den_max[l], sv[l]);
                        c_pos[l] += pe[l];
                        c_pos_max[l] = max(c_pos_max[l], ps[l]);
                    }
                    set_lane_group(&mut columns.den, start, c_den);
                    set_lane_group(&mut columns.den_max, start, c_den_max);
                    set_lane_group(&mut columns.pos, start, c_pos);
                    set_lane_group(&mut columns.pos_max, start, c_pos_max);
                }
            }
            let Some(stats) = row_stats.get_mut(a) else {
                continue;
            };
            let sums = SetSums {
                den: fold_sum(den),
                den_max: fold_max(den_max),
                pos: fold_sum(pos),
                pos_max: fold_max(pos_max),
            };
            let entries = s.iter().zip(col_classes).map(|(&s, &c)| (s, c == class));
            sums.absorb_into(stats, shift, entries);
        }
        let Some(col_stats) = col_stats else {
            return;
        };
        for (k, stats) in col_stats.iter_mut().enumerate() {
            let sums = SetSums {
                den: columns.den[k],
                den_max: columns.den_max[k],
                pos: columns.pos[k],
                pos_max: columns.pos_max[k],
            };
            let class = col_classes[k];
            let entries = tile
                .rows
                .clone()
                .enumerate()
                .map(|(a, i)| (logits[a * stride + k], classes[i] == class));
            sums.absorb_into(stats, shift, entries);
        }
    }
}

/// One anchor's sums over a tile row (or column), relative to the shared shift.
struct SetSums {
    den: f32,
    den_max: f32,
    pos: f32,
    pos_max: f32,
}

impl SetSums {
    /// Adds the sums to the anchor's log-sum-exps; a set whose maximum lies too far below the
    /// shared `shift` is summed again from `entries` (logit, is positive) with its own maximum.
    fn absorb_into(
        self,
        stats: &mut AnchorStats,
        shift: f32,
        entries: impl Iterator<Item = (f32, bool)> + Clone,
    ) {
        let (mut den, mut den_shift) = (self.den, shift);
        let (mut pos, mut pos_shift) = (self.pos, shift);
        if needs_own_shift(self.den_max, shift) {
            den_shift = self.den_max;
            den = entries.clone().map(|(s, _)| exp(s - den_shift)).sum();
        }
        if needs_own_shift(self.pos_max, shift) {
            pos_shift = self.pos_max;
            pos = entries
                .filter(|&(_, positive)| positive)
                .map(|(s, _)| exp(s - pos_shift))
                .sum();
        }
        stats.denominator.add(f64::from(den_shift), f64::from(den));
        stats.positive.add(f64::from(pos_shift), f64::from(pos));
    }
}

/// Forward statistics of every anchor on this path (see the module docs).
pub(super) fn statistics(batch: &Batch, classes: &Classes) -> Vec<AnchorStats> {
    let states = block_states(batch, AnchorStats::EMPTY);
    // Every logit is at most ‖z_i‖‖z_j‖/τ; a little above the largest so that rounding in the
    // GEMM cannot put a logit past it.
    let shift = batch.largest_logit * (1.0 + 1e-5) + f32::MIN_POSITIVE;
    batch
        .schedule
        .for_each_tile(&states, ForwardScratch::new, |tile, scratch, rows, cols| {
            batch
                .rows
                .logits_tile(tile, batch.inverse_temperature, &mut scratch.logits);
            batch.isa.run(ForwardTile {
                tile,
                classes: &classes.of_row,
                shift,
                scratch,
                row_stats: rows,
                col_stats: cols.map(|c| c.as_mut_slice()),
            });
        });
    let mut stats = flatten(states);
    for (stats, (weight, weighted)) in stats.iter_mut().zip(classes.positive_statistics(batch)) {
        stats.positive_weight = weight;
        stats.weighted_logits = weighted;
    }
    stats
}

/// The elementwise work of one backward tile: S → H in place.
struct GradientTile<'a> {
    tile: &'a Tile,
    /// Per row: LSE_k as `hi + lo` (`backward::split`; +∞ and 0 for inactive rows) and a_k (0
    /// for inactive rows), padded.
    lse: &'a [f32],
    lse_lo: &'a [f32],
    scale: &'a [f32],
    logits: &'a mut [f32],
    col_alpha: &'a mut [f32],
}

impl TileKernel for GradientTile<'_> {
    #[inline(always)]
    fn run(self) {
        let GradientTile {
            tile,
            lse,
            lse_lo,
            scale,
            logits,
            col_alpha,
        } = self;
        let stride = tile.stride();
        exclude_self_and_padding(tile, logits);
        let active = |k: &usize| scale[*k] != 0.0;
        let mut lse_range = tile
            .rows
            .clone()
            .chain(tile.cols.clone())
            .filter(active)
            .map(|k| lse[k]);
        let Some(first) = lse_range.next() else {
            logits.fill(0.0);
            return;
        };
        let (low, high) = lse_range.fold((first, first), |(l, h), x| (l.min(x), h.max(x)));
        let (col_lse, col_lse_lo, col_scale) = (
            &lse[tile.cols.start..][..stride],
            &lse_lo[tile.cols.start..][..stride],
            &scale[tile.cols.start..][..stride],
        );
        // α_k = a_k e^{m − LSE_k}; m − hi_k is exact in f32 (both are f32 LSEs of the tile).
        let alpha_of = |m: f32, k: usize| {
            if scale[k] != 0.0 {
                scale[k] * exp(m - lse[k] - lse_lo[k])
            } else {
                0.0
            }
        };
        if high - low <= LSE_SPREAD {
            let m = high;
            for (c, alpha) in col_alpha.iter_mut().take(stride).enumerate() {
                *alpha = alpha_of(m, tile.cols.start + c);
            }
            let col_alpha = &col_alpha[..stride];
            for (a, i) in tile.rows.clone().enumerate() {
                let row_alpha = alpha_of(m, i);
                let h = &mut logits[a * stride..][..stride];
                for start in (0..stride).step_by(LANES) {
                    let (s, alpha) = (lane_group(h, start), lane_group(col_alpha, start));
                    let mut out = [0.0; LANES];
                    for l in 0..LANES {
                        out[l] = exp(s[l] - m) * (row_alpha + alpha[l]);
                    }
                    set_lane_group(h, start, out);
                }
            }
        } else {
            for (a, i) in tile.rows.clone().enumerate() {
                let (row_lse, row_lo, row_scale) = (lse[i], lse_lo[i], scale[i]);
                let h = &mut logits[a * stride..][..stride];
                for start in (0..stride).step_by(LANES) {
                    let s = lane_group(h, start);
                    let (c_lse, c_lo, c_scale) = (
                        lane_group(col_lse, start),
                        lane_group(col_lse_lo, start),
                        lane_group(col_scale, start),
                    );
                    let mut out = [0.0; LANES];
                    for l in 0..LANES {
                        out[l] = row_scale * exp(s[l] - row_lse - row_lo)
                            + c_scale[l] * exp(s[l] - c_lse[l] - c_lo[l]);
                    }
                    set_lane_group(h, start, out);
                }
            }
        }
    }
}

/// ∂L/∂z for every row on this path, in f64, `[N, D]` row-major. `lse` and `lse_lo` hold LSE_k
/// as `hi + lo` and `scale` a_k per row (+∞, 0 and 0 for inactive rows), `positive_scale`
/// a_k / P_k.
pub(super) fn gradient(
    batch: &Batch,
    classes: &Classes,
    (lse, lse_lo): (&[f32], &[f32]),
    scale: &[f32],
    positive_scale: &[f32],
) -> crate::Result<Vec<f64>> {
    let dim = batch.rows.dim;
    let col_alpha = || vec![0.0; padded(BLOCK)];
    let mut dz = sweep(batch, col_alpha, |tile, logits, col_alpha| {
        batch.isa.run(GradientTile {
            tile,
            lse,
            lse_lo,
            scale,
            logits,
            col_alpha,
        });
    })?;
    // The positive part: C'_y = Σ_{y_r = y} pos_r z_r (each class in row order), then per row
    // −pos_k (C_y − z_k) − (C'_y − pos_k z_k) = −pos_k C_y − C'_y + 2 pos_k z_k.
    let weighted_sum = classes.weighted_sums(batch, |r| f64::from(positive_scale[r]));
    dz.par_chunks_mut(dim).enumerate().for_each(|(r, grad)| {
        let c = classes.of_row[r] as usize;
        let pos = f64::from(positive_scale[r]);
        let (class_sum, class_weighted) = (
            &classes.sum[c * dim..][..dim],
            &weighted_sum[c * dim..][..dim],
        );
        for (((g, &z), &total), &weighted) in grad
            .iter_mut()
            .zip(batch.rows.block(r..r + 1))
            .zip(class_sum)
            .zip(class_weighted)
        {
            *g -= pos * total + weighted - 2.0 * pos * f64::from(z);
        }
    });
    Ok(dz)
}
