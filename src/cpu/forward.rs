//! The forward pass: per-anchor log-sum-exps, positive weights and positive logit sums, one
//! logits tile at a time, never more than a tile of S in memory.
//!
//! For each tile (schedule in `tiles`), after the GEMM `S = Z_I Z_Jᵀ / τ`:
//!
//! - rows: for each anchor i of block I, fill its pair weights w_ij and biases (0 or −∞ for
//!   excluded j) over J, then two sweeps over the row: (1) the maxima of the denominator set and
//!   of the positives, Σ w and Σ w·s; (2) with one shared shift m (the larger maximum), one
//!   exponential e = exp(s + bias − m) per entry feeds both Σ_den e and Σ_pos w·e. A set whose
//!   own maximum lies more than `SHARED_SHIFT_RANGE` below m gets its sum recomputed with its own
//!   maximum (rare: it only happens with huge logits), so nothing underflows and the shift never
//!   comes from an excluded entry (the self logit included).
//! - columns (off-diagonal tiles): the same for the anchors of block J against the contrasts of
//!   I, with per-column running vectors (vertical, so no lane folding), fed chunks of 8 rows
//!   whose weights are filled once and used by both sweeps; each column's shift follows its
//!   running maximum, rescaling its sums when it moves. With a symmetric relation (labels or
//!   SimCLR without a biting cap, symmetric masks) the column weights are the row weights, and
//!   [`Columns::add_row`] instead feeds each row's exponentials e^{s − m_i} to the columns too,
//!   scaled by e^{m_i − C} with C the tile's running largest row maximum: one exponential per
//!   logit for both directions.
//!
//! Each (shift, sum) piece goes into the anchor's f64 [`LogSumExp`]; pieces arrive in the
//! schedule's fixed order. `one_positive` needs LSE^N_i before its positive terms, so it runs
//! a second sweep over the tiles ([`positive_sums`]), scalar f64 over the positive entries only.

use std::sync::Mutex;

use super::math::{
    exp, fold_max, fold_sum, lane_group, lanes, max, needs_own_shift, neutral_padding, padded,
    set_lane_group, shift_of, sigmoid, softplus, Aligned, LogSumExp, LANES,
};
use super::relation::{in_denominator, PairWeights};
use super::simd::TileKernel;
use super::tiles::{flatten, Tile, BLOCK};
use super::Batch;

/// One anchor's forward statistics, accumulated tile by tile.
#[derive(Debug, Clone, Copy)]
pub(super) struct AnchorStats {
    /// log Σ e^{s_ij} over the denominator set.
    pub(super) denominator: LogSumExp,
    /// log Σ w_ij e^{s_ij} over the kept positives.
    pub(super) positive: LogSumExp,
    /// P_i = Σ w_ij.
    pub(super) positive_weight: f64,
    /// Σ w_ij s_ij.
    pub(super) weighted_logits: f64,
}

impl AnchorStats {
    pub(super) const EMPTY: Self = AnchorStats {
        denominator: LogSumExp::EMPTY,
        positive: LogSumExp::EMPTY,
        positive_weight: 0.0,
        weighted_logits: 0.0,
    };

    fn absorb(&mut self, piece: Piece) {
        self.denominator
            .add(f64::from(piece.den_shift), f64::from(piece.den_sum));
        self.positive
            .add(f64::from(piece.pos_shift), f64::from(piece.pos_sum));
        self.positive_weight += f64::from(piece.weight);
        self.weighted_logits += f64::from(piece.weighted_logits);
    }
}

/// One tile row's (or column's) share of an anchor's statistics.
#[derive(Debug, Clone, Copy)]
struct Piece {
    den_shift: f32,
    den_sum: f32,
    pos_shift: f32,
    pos_sum: f32,
    weight: f32,
    weighted_logits: f32,
}

/// The statistics of one anchor's tile row: logits `s`, weights `w`, biases `b` (padded to
/// whole lanes with w = 0, b = −∞).
#[inline(always)]
fn row_piece<const NEG_ONLY: bool>(s: &[f32], w: &[f32], b: &[f32]) -> Piece {
    let mut max_den = [f32::NEG_INFINITY; LANES];
    let mut max_pos = [f32::NEG_INFINITY; LANES];
    let mut weight = [0.0; LANES];
    let mut weighted = [0.0; LANES];
    for ((s, w), b) in lanes(s).zip(lanes(w)).zip(lanes(b)) {
        for l in 0..LANES {
            let den = if in_denominator::<NEG_ONLY>(w[l]) {
                s[l] + b[l]
            } else {
                f32::NEG_INFINITY
            };
            max_den[l] = max(max_den[l], den);
            max_pos[l] = max(
                max_pos[l],
                if w[l] > 0.0 { s[l] } else { f32::NEG_INFINITY },
            );
            weight[l] += w[l];
            weighted[l] += w[l] * s[l];
        }
    }
    let (max_den, max_pos) = (fold_max(max_den), fold_max(max_pos));
    let shift = shift_of(max(max_den, max_pos));
    let mut den = [0.0; LANES];
    let mut pos = [0.0; LANES];
    for ((s, w), b) in lanes(s).zip(lanes(w)).zip(lanes(b)) {
        for l in 0..LANES {
            let e = exp(s[l] + b[l] - shift);
            den[l] += if in_denominator::<NEG_ONLY>(w[l]) {
                e
            } else {
                0.0
            };
            pos[l] += w[l] * e;
        }
    }
    let piece = Piece {
        den_shift: shift,
        den_sum: fold_sum(den),
        pos_shift: shift,
        pos_sum: fold_sum(pos),
        weight: fold_sum(weight),
        weighted_logits: fold_sum(weighted),
    };
    with_own_shifts::<NEG_ONLY>(piece, s, w, b, max_den, max_pos)
}

/// A row piece whose sums were taken relative to `piece`'s shift, with each set whose own
/// maximum lies too far below that shift (`needs_own_shift`) summed again relative to it.
#[inline(always)]
fn with_own_shifts<const NEG_ONLY: bool>(
    mut piece: Piece,
    s: &[f32],
    w: &[f32],
    b: &[f32],
    max_den: f32,
    max_pos: f32,
) -> Piece {
    let shift = piece.den_shift;
    if needs_own_shift(max_pos, shift) {
        let mut pos = [0.0; LANES];
        for (s, w) in lanes(s).zip(lanes(w)) {
            for l in 0..LANES {
                pos[l] += w[l] * exp(s[l] - max_pos);
            }
        }
        (piece.pos_shift, piece.pos_sum) = (max_pos, fold_sum(pos));
    }
    if NEG_ONLY && needs_own_shift(max_den, shift) {
        let mut den = [0.0; LANES];
        for ((s, w), b) in lanes(s).zip(lanes(w)).zip(lanes(b)) {
            for l in 0..LANES {
                let e = exp(s[l] + b[l] - max_den);
                den[l] += if in_denominator::<NEG_ONLY>(w[l]) {
                    e
                } else {
                    0.0
                };
            }
        }
        (piece.den_shift, piece.den_sum) = (max_den, fold_sum(den));
    }
    piece
}

/// Tile rows filled at once for the column direction. Column sums need each entry's weight
/// twice (for the maxima, then the exponentials); a chunk of 8 filled rows stays in L1 between
/// the two uses, and the running shifts are rescaled once per chunk.
const CHUNK: usize = 8;

/// Per-column running values of the column direction, one entry per anchor of block J.
struct Columns {
    max_den: Vec<f32>,
    max_pos: Vec<f32>,
    weight: Vec<f32>,
    weighted: Vec<f32>,
    /// The shift `den` and `pos` are relative to: the running max of both sets.
    shift: Vec<f32>,
    den: Vec<f32>,
    pos: Vec<f32>,
    /// [`Columns::add_row`]'s shift, shared by every column: the largest row maximum so far.
    common_shift: f32,
}

impl Columns {
    fn new() -> Self {
        let v = || vec![0.0; padded(BLOCK)];
        Columns {
            max_den: v(),
            max_pos: v(),
            weight: v(),
            weighted: v(),
            shift: v(),
            den: v(),
            pos: v(),
            common_shift: f32::NEG_INFINITY,
        }
    }

    fn reset(&mut self, span: usize) {
        self.common_shift = f32::NEG_INFINITY;
        self.max_den[..span].fill(f32::NEG_INFINITY);
        self.max_pos[..span].fill(f32::NEG_INFINITY);
        for v in [
            &mut self.weight,
            &mut self.weighted,
            &mut self.shift,
            &mut self.den,
            &mut self.pos,
        ] {
            v[..span].fill(0.0);
        }
    }

    /// Adds a chunk of contrast rows, each `(logits, weights, biases)` over `span` columns
    /// (`span` a multiple of [`LANES`]). Columns go in strips of one lane group whose running
    /// values stay in registers for the whole chunk.
    #[inline(always)]
    fn add_chunk<'r, const NEG_ONLY: bool>(
        &mut self,
        rows: impl Iterator<Item = (&'r [f32], &'r [f32], &'r [f32])> + Clone,
        span: usize,
    ) {
        for start in (0..span).step_by(LANES) {
            let mut max_den = lane_group(&self.max_den, start);
            let mut max_pos = lane_group(&self.max_pos, start);
            let mut weight = lane_group(&self.weight, start);
            let mut weighted = lane_group(&self.weighted, start);
            for (s, w, b) in rows.clone() {
                let (s, w, b) = (
                    lane_group(s, start),
                    lane_group(w, start),
                    lane_group(b, start),
                );
                for l in 0..LANES {
                    let den = if in_denominator::<NEG_ONLY>(w[l]) {
                        s[l] + b[l]
                    } else {
                        f32::NEG_INFINITY
                    };
                    max_den[l] = max(max_den[l], den);
                    let pos = if w[l] > 0.0 { s[l] } else { f32::NEG_INFINITY };
                    max_pos[l] = max(max_pos[l], pos);
                    weight[l] += w[l];
                    weighted[l] += w[l] * s[l];
                }
            }
            // Move the shifts up to the new maxima. A column still empty keeps shift 0 and sums
            // 0; a first entry rescales zero sums (exp saturates instead of overflowing, so
            // 0·e^88 = 0).
            let mut shift = lane_group(&self.shift, start);
            let mut den = lane_group(&self.den, start);
            let mut pos = lane_group(&self.pos, start);
            for l in 0..LANES {
                let new_shift = shift_of(max(max_den[l], max_pos[l]));
                let factor = exp(shift[l] - new_shift);
                den[l] *= factor;
                pos[l] *= factor;
                shift[l] = new_shift;
            }
            for (s, w, b) in rows.clone() {
                let (s, w, b) = (
                    lane_group(s, start),
                    lane_group(w, start),
                    lane_group(b, start),
                );
                for l in 0..LANES {
                    let e = exp(s[l] + b[l] - shift[l]);
                    den[l] += if in_denominator::<NEG_ONLY>(w[l]) {
                        e
                    } else {
                        0.0
                    };
                    pos[l] += w[l] * e;
                }
            }
            set_lane_group(&mut self.max_den, start, max_den);
            set_lane_group(&mut self.max_pos, start, max_pos);
            set_lane_group(&mut self.weight, start, weight);
            set_lane_group(&mut self.weighted, start, weighted);
            set_lane_group(&mut self.shift, start, shift);
            set_lane_group(&mut self.den, start, den);
            set_lane_group(&mut self.pos, start, pos);
        }
    }

    /// One tile row of a symmetric relation (the column weights are the row's): returns the
    /// row's piece and adds the row to the first `span` columns, with one exponential per entry
    /// for both directions. The row's terms e^{s − m} (m its maximum) enter the columns scaled
    /// by e^{m − C}, C the largest row maximum so far, so every column is relative to C; a
    /// column whose own maximum ends too far below C is summed again at the end of the tile.
    #[inline(always)]
    fn add_row<const NEG_ONLY: bool>(
        &mut self,
        s: &[f32],
        w: &[f32],
        b: &[f32],
        span: usize,
    ) -> Piece {
        let mut max_den = [f32::NEG_INFINITY; LANES];
        let mut max_pos = [f32::NEG_INFINITY; LANES];
        let mut weight = [0.0; LANES];
        let mut weighted = [0.0; LANES];
        for start in (0..s.len()).step_by(LANES) {
            let (sv, wv, bv) = (
                lane_group(s, start),
                lane_group(w, start),
                lane_group(b, start),
            );
            let mut den = [0.0; LANES];
            let mut pos = [0.0; LANES];
            for l in 0..LANES {
                den[l] = if in_denominator::<NEG_ONLY>(wv[l]) {
                    sv[l] + bv[l]
                } else {
                    f32::NEG_INFINITY
                };
                pos[l] = if wv[l] > 0.0 {
                    sv[l]
                } else {
                    f32::NEG_INFINITY
                };
                max_den[l] = max(max_den[l], den[l]);
                max_pos[l] = max(max_pos[l], pos[l]);
                weight[l] += wv[l];
                weighted[l] += wv[l] * sv[l];
            }
            if start < span {
                let mut col_max_den = lane_group(&self.max_den, start);
                let mut col_max_pos = lane_group(&self.max_pos, start);
                let mut col_weight = lane_group(&self.weight, start);
                let mut col_weighted = lane_group(&self.weighted, start);
                for l in 0..LANES {
                    col_max_den[l] = max(col_max_den[l], den[l]);
                    col_max_pos[l] = max(col_max_pos[l], pos[l]);
                    col_weight[l] += wv[l];
                    col_weighted[l] += wv[l] * sv[l];
                }
                set_lane_group(&mut self.max_den, start, col_max_den);
                set_lane_group(&mut self.max_pos, start, col_max_pos);
                set_lane_group(&mut self.weight, start, col_weight);
                set_lane_group(&mut self.weighted, start, col_weighted);
            }
        }
        let (max_den, max_pos) = (fold_max(max_den), fold_max(max_pos));
        let row_max = max(max_den, max_pos);
        let shift = shift_of(row_max);
        if row_max > self.common_shift {
            if self.common_shift > f32::NEG_INFINITY {
                let factor = exp(self.common_shift - row_max);
                for v in [&mut self.den, &mut self.pos] {
                    for x in &mut v[..span] {
                        *x *= factor;
                    }
                }
            }
            self.common_shift = row_max;
        }
        // An empty row (maximum −∞) has no term: its exponentials are all 0.
        let to_common = if row_max == f32::NEG_INFINITY {
            0.0
        } else {
            exp(row_max - self.common_shift)
        };
        let mut den = [0.0; LANES];
        let mut pos = [0.0; LANES];
        for start in (0..s.len()).step_by(LANES) {
            let (sv, wv, bv) = (
                lane_group(s, start),
                lane_group(w, start),
                lane_group(b, start),
            );
            let mut d = [0.0; LANES];
            let mut p = [0.0; LANES];
            for l in 0..LANES {
                let e = exp(sv[l] + bv[l] - shift);
                d[l] = if in_denominator::<NEG_ONLY>(wv[l]) {
                    e
                } else {
                    0.0
                };
                p[l] = wv[l] * e;
                den[l] += d[l];
                pos[l] += p[l];
            }
            if start < span {
                let mut col_den = lane_group(&self.den, start);
                let mut col_pos = lane_group(&self.pos, start);
                for l in 0..LANES {
                    col_den[l] += d[l] * to_common;
                    col_pos[l] += p[l] * to_common;
                }
                set_lane_group(&mut self.den, start, col_den);
                set_lane_group(&mut self.pos, start, col_pos);
            }
        }
        let piece = Piece {
            den_shift: shift,
            den_sum: fold_sum(den),
            pos_shift: shift,
            pos_sum: fold_sum(pos),
            weight: fold_sum(weight),
            weighted_logits: fold_sum(weighted),
        };
        with_own_shifts::<NEG_ONLY>(piece, s, w, b, max_den, max_pos)
    }
}

/// Per-thread buffers of the forward sweep.
pub(super) struct Scratch {
    logits: Aligned,
    /// Weights and biases of a chunk of tile rows, anchor direction (row c at c·stride).
    row_weight: Vec<f32>,
    row_bias: Vec<f32>,
    /// The same in the contrast direction (row c at c·span); unused for symmetric relations.
    col_weight: Vec<f32>,
    col_bias: Vec<f32>,
    columns: Columns,
}

impl Scratch {
    fn new() -> Self {
        let chunk = || vec![0.0; CHUNK * padded(BLOCK)];
        Scratch {
            logits: Aligned::zeros(BLOCK * padded(BLOCK)),
            row_weight: chunk(),
            row_bias: chunk(),
            col_weight: chunk(),
            col_bias: chunk(),
            columns: Columns::new(),
        }
    }
}

/// The elementwise work of one forward tile (after its GEMM).
struct ForwardTile<'a, R, const NEG_ONLY: bool> {
    pairs: &'a R,
    tile: &'a Tile,
    scratch: &'a mut Scratch,
    row_stats: &'a mut [AnchorStats],
    col_stats: Option<&'a mut [AnchorStats]>,
}

impl<R: PairWeights, const NEG_ONLY: bool> TileKernel for ForwardTile<'_, R, NEG_ONLY> {
    #[inline(always)]
    fn run(self) {
        let ForwardTile {
            pairs,
            tile,
            scratch,
            row_stats,
            col_stats,
        } = self;
        let Scratch {
            logits,
            row_weight,
            row_bias,
            col_weight,
            col_bias,
            columns,
        } = scratch;
        let (stride, width, cols) = (tile.stride(), tile.cols.len(), tile.cols.clone());
        let symmetric = pairs.is_symmetric();
        let count = col_stats.as_ref().map_or(0, |c| c.len());
        let (col_anchors, span) = (cols.start..cols.start + count, padded(count));
        columns.reset(span);
        if symmetric && count > 0 {
            for (a, i) in tile.rows.clone().enumerate() {
                let (w, b) = (&mut row_weight[..stride], &mut row_bias[..stride]);
                pairs.fill_anchor_row(i, cols.clone(), &mut w[..width], &mut b[..width]);
                neutral_padding(w, b, width);
                let s = &logits[a * stride..][..stride];
                let piece = columns.add_row::<NEG_ONLY>(s, w, b, span);
                if let Some(stats) = row_stats.get_mut(a) {
                    stats.absorb(piece);
                }
            }
            columns.shift[..span].fill(shift_of(columns.common_shift));
        }
        for chunk_start in (0..tile.rows.len())
            .step_by(CHUNK)
            .filter(|_| !(symmetric && count > 0))
        {
            let chunk = chunk_start..(chunk_start + CHUNK).min(tile.rows.len());
            for (c, a) in chunk.clone().enumerate() {
                let i = tile.rows.start + a;
                let row_anchor = a < row_stats.len();
                let w = &mut row_weight[c * stride..][..stride];
                let b = &mut row_bias[c * stride..][..stride];
                if row_anchor || (symmetric && count > 0) {
                    pairs.fill_anchor_row(i, cols.clone(), &mut w[..width], &mut b[..width]);
                    neutral_padding(w, b, width);
                }
                if row_anchor {
                    let s = &logits[a * stride..][..stride];
                    row_stats[a].absorb(row_piece::<NEG_ONLY>(s, w, b));
                }
                if count > 0 && !symmetric {
                    let w = &mut col_weight[c * span..][..span];
                    let b = &mut col_bias[c * span..][..span];
                    pairs.fill_contrast_row(
                        i,
                        col_anchors.clone(),
                        &mut w[..count],
                        &mut b[..count],
                    );
                    neutral_padding(w, b, count);
                }
            }
            if count > 0 {
                // Symmetric: anchor j's weight against contrast i is row i's weight of j.
                let (weights, biases, row_step) = if symmetric {
                    (&row_weight[..], &row_bias[..], stride)
                } else {
                    (&col_weight[..], &col_bias[..], span)
                };
                let rows = chunk.clone().enumerate().map(|(c, a)| {
                    (
                        &logits[a * stride..][..span],
                        &weights[c * row_step..][..span],
                        &biases[c * row_step..][..span],
                    )
                });
                columns.add_chunk::<NEG_ONLY>(rows, span);
            }
        }
        let Some(col_stats) = col_stats else {
            return;
        };
        let c = columns;
        for (k, stats) in col_stats.iter_mut().enumerate() {
            let mut piece = Piece {
                den_shift: c.shift[k],
                den_sum: c.den[k],
                pos_shift: c.shift[k],
                pos_sum: c.pos[k],
                weight: c.weight[k],
                weighted_logits: c.weighted[k],
            };
            // (With a shift of its own, a column's denominator maximum is the shift unless it
            // excludes the positives; with `add_row`'s common shift it may lie below.)
            let (own_pos, own_den) = (
                needs_own_shift(c.max_pos[k], c.shift[k]),
                needs_own_shift(c.max_den[k], c.shift[k]),
            );
            if own_pos || own_den {
                // Rare (huge logits): redo this column alone, entry by entry.
                let j = col_anchors.start + k;
                let (mut pos, mut den) = (0.0, 0.0);
                for (a, i) in tile.rows.clone().enumerate() {
                    let s = logits[a * stride + k];
                    let (mut w, mut b) = ([0.0], [0.0]);
                    pairs.fill_contrast_row(i, j..j + 1, &mut w, &mut b);
                    if w[0] > 0.0 {
                        pos += w[0] * exp(s - c.max_pos[k]);
                    }
                    if in_denominator::<NEG_ONLY>(w[0]) {
                        den += exp(s + b[0] - c.max_den[k]);
                    }
                }
                if own_pos {
                    (piece.pos_shift, piece.pos_sum) = (c.max_pos[k], pos);
                }
                if own_den {
                    (piece.den_shift, piece.den_sum) = (c.max_den[k], den);
                }
            }
            stats.absorb(piece);
        }
    }
}

/// Per-block state: the anchors of the block (`BLOCK` of them, fewer in the last anchor block,
/// none past the anchors).
pub(super) fn block_states<T: Clone>(batch: &Batch<'_>, empty: T) -> Vec<Mutex<Vec<T>>> {
    (0..batch.schedule.blocks())
        .map(|b| {
            let rows = batch.schedule.block_rows(b);
            let count = rows.end.min(batch.anchors).saturating_sub(rows.start);
            Mutex::new(vec![empty.clone(); count])
        })
        .collect()
}

/// Forward statistics of every anchor (see the module docs).
pub(super) fn statistics<R: PairWeights>(batch: &Batch<'_>, pairs: &R) -> Vec<AnchorStats> {
    if batch.only_negatives_in_denominator() {
        statistics_with::<R, true>(batch, pairs)
    } else {
        statistics_with::<R, false>(batch, pairs)
    }
}

fn statistics_with<R: PairWeights, const NEG_ONLY: bool>(
    batch: &Batch<'_>,
    pairs: &R,
) -> Vec<AnchorStats> {
    let states = block_states(batch, AnchorStats::EMPTY);
    batch
        .schedule
        .for_each_tile(&states, Scratch::new, |tile, scratch, rows, cols| {
            batch
                .rows
                .logits_tile(tile, batch.inverse_temperature, &mut scratch.logits);
            batch.isa.run(ForwardTile::<R, NEG_ONLY> {
                pairs,
                tile,
                scratch,
                row_stats: rows,
                col_stats: cols.map(|c| c.as_mut_slice()),
            });
        });
    flatten(states)
}

/// Sums over one anchor's positives p of terms in σ(s_ip − LSE^N_i), for `one_positive`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PositiveSums {
    /// Σ w_p softplus(LSE^N − s_p): the forward loss of L_out (before / P).
    pub(super) softplus: f64,
    /// Σ w_p σ(LSE^N − s_p): the backward pull of L_out (before / P).
    pub(super) sigmoid: f64,
    /// log Σ w_p σ(s_p − LSE^N) = log A: L_in's forward loss is log P − log A.
    pub(super) log_share: LogSumExp,
    /// log Σ w_p σ(s_p − LSE^N) σ(LSE^N − s_p): L_in's total pull is its exp minus log A.
    pub(super) log_pull: LogSumExp,
}

impl PositiveSums {
    const EMPTY: Self = PositiveSums {
        softplus: 0.0,
        sigmoid: 0.0,
        log_share: LogSumExp::EMPTY,
        log_pull: LogSumExp::EMPTY,
    };

    fn add(&mut self, weight: f32, logit: f32, lse: f64) {
        let (w, s) = (f64::from(weight), f64::from(logit));
        let loss = softplus(lse - s);
        self.softplus += w * loss;
        self.sigmoid += w * sigmoid(lse - s);
        let log_share = w.ln() - loss;
        self.log_share.add_term(log_share);
        self.log_pull.add_term(log_share - softplus(s - lse));
    }
}

/// The `one_positive` sums of every anchor given LSE^N (`lse`, one per anchor): a second sweep
/// over the tiles, scalar over the positive entries.
pub(super) fn positive_sums<R: PairWeights>(
    batch: &Batch<'_>,
    pairs: &R,
    lse: &[f64],
) -> Vec<PositiveSums> {
    let states = block_states(batch, PositiveSums::EMPTY);
    batch
        .schedule
        .for_each_tile(&states, Scratch::new, |tile, scratch, rows, cols| {
            batch
                .rows
                .logits_tile(tile, batch.inverse_temperature, &mut scratch.logits);
            let stride = tile.stride();
            let (weight, bias) = (&mut scratch.row_weight, &mut scratch.row_bias);
            for (a, sums) in rows.iter_mut().enumerate() {
                let i = tile.rows.start + a;
                let (w, b) = (&mut weight[..tile.cols.len()], &mut bias[..tile.cols.len()]);
                pairs.fill_anchor_row(i, tile.cols.clone(), w, b);
                let s = &scratch.logits[a * stride..];
                for (k, &w) in w.iter().enumerate().filter(|(_, w)| **w > 0.0) {
                    sums.add(w, s[k], lse[i]);
                }
            }
            let Some(cols) = cols else {
                return;
            };
            let col_anchors = tile.cols.start..tile.cols.start + cols.len();
            for i in tile.rows.clone() {
                let (w, b) = (&mut weight[..cols.len()], &mut bias[..cols.len()]);
                pairs.fill_contrast_row(i, col_anchors.clone(), w, b);
                let s = &scratch.logits[(i - tile.rows.start) * stride..];
                for (k, &w) in w.iter().enumerate().filter(|(_, w)| **w > 0.0) {
                    cols[k].add(w, s[k], lse[col_anchors.start + k]);
                }
            }
        });
    flatten(states)
}
