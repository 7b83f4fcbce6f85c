//! The forward pass: per-anchor log-sum-exps, positive weights and positive logit sums, one
//! logits tile at a time, never more than a tile of S in memory.
//!
//! For each tile (schedule in `tiles`), after the GEMM `S = Z_I Z_Jᵀ / τ`, one of two tile
//! kernels does the elementwise work:
//!
//! - [`GeneralTile`], for any relation. Rows ([`row_piece`]): for each anchor i of block I, fill
//!   its pair weights w_ij and biases (0 or −∞ for excluded j) over J, then two sweeps over the
//!   row: (1) the maxima of the denominator set and of the positives, Σ w and Σ w·s; (2) with
//!   one shared shift m (the larger maximum), one exponential e = exp(s + bias − m) per entry
//!   feeds both Σ_den e and Σ_pos w·e. A set whose own maximum lies more than
//!   `SHARED_SHIFT_RANGE` below m gets its sum recomputed with its own maximum (rare: it only
//!   happens with huge logits), so nothing underflows and the shift never comes from an excluded
//!   entry (the self logit included). Columns (off-diagonal tiles): the same for the anchors of
//!   block J against the contrasts of I, with per-column running vectors (vertical, so no lane
//!   folding), fed chunks of 8 contrast rows whose weights are filled once and used by both
//!   sweeps ([`Columns::add_chunk`]); each column's shift follows its running maximum,
//!   rescaling its sums when it moves.
//! - [`SymmetricTile`], for a symmetric relation (labels or SimCLR without a biting cap,
//!   symmetric masks) on a tile with column anchors. The column weights are the row weights, so
//!   one fill per tile row serves both directions, and [`Columns::add_row`] feeds each row's
//!   exponentials e^{s − m_i} to the columns too, scaled by e^{m_i − C} with C the tile's
//!   running largest row maximum: one exponential per logit for both directions.
//!
//! A tile without column anchors (a diagonal tile, or one whose column block lies past the
//! anchors) has row work only; [`GeneralTile`] does it without the symmetric kernel's
//! column bookkeeping. Every site goes through the same two lane steps, [`LaneMaxima::add`] and
//! [`LaneSums::add`], so each lane sees the same operations in the same order in both kernels
//! and both directions; the columns end in [`Columns::finish`] for both.
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

impl Piece {
    /// A tile row's piece from its lanes: `maxima`'s weight sums and `sums`, both sets relative
    /// to `shift`.
    #[inline(always)]
    fn of_lanes(shift: f32, maxima: &LaneMaxima, sums: &LaneSums) -> Piece {
        Piece {
            den_shift: shift,
            den_sum: fold_sum(sums.den),
            pos_shift: shift,
            pos_sum: fold_sum(sums.pos),
            weight: fold_sum(maxima.weight),
            weighted_logits: fold_sum(maxima.weighted),
        }
    }
}

/// One lane group of entries (logits, weights, biases): of a tile row, or of one contrast row's
/// strip of columns. References in a plain tuple: with copies of the arrays the compiler kept
/// the copies on the stack, and a struct of the references compiled to twice the instructions.
type Group<'a> = (&'a [f32; LANES], &'a [f32; LANES], &'a [f32; LANES]);

/// A filled tile row: logits `s`, weights `w`, biases `b`, padded to whole lanes with w = 0,
/// b = −∞.
#[derive(Clone, Copy)]
struct Row<'a> {
    s: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
}

impl<'a> Row<'a> {
    const EMPTY: Self = Row {
        s: &[],
        w: &[],
        b: &[],
    };

    /// The lane group at `start`.
    #[inline(always)]
    fn group(self, start: usize) -> Group<'a> {
        (
            lane_at(self.s, start),
            lane_at(self.w, start),
            lane_at(self.b, start),
        )
    }

    /// The row's lane groups in order.
    #[inline(always)]
    fn groups(self) -> impl Iterator<Item = Group<'a>> {
        lanes(self.s)
            .zip(lanes(self.w))
            .zip(lanes(self.b))
            .map(|((s, w), b)| (s, w, b))
    }

    /// The starts of the row's lane groups, in order (for loops that also index the columns:
    /// there `groups().enumerate()` compiled to about 15% more instructions).
    #[inline(always)]
    fn starts(self) -> impl Iterator<Item = usize> {
        (0..self.s.len()).step_by(LANES)
    }

    /// The row's lane maxima and weight sums.
    #[inline(always)]
    fn maxima<const NEG_ONLY: bool>(self) -> LaneMaxima {
        let mut maxima = LaneMaxima::EMPTY;
        for group in self.groups() {
            maxima.add::<NEG_ONLY>(group);
        }
        maxima
    }

    /// The row's lane sums of exponentials relative to `shift`.
    #[inline(always)]
    fn sums<const NEG_ONLY: bool>(self, shift: f32) -> LaneSums {
        let mut sums = LaneSums::ZERO;
        for group in self.groups() {
            sums.add::<NEG_ONLY>(group, [shift; LANES]);
        }
        sums
    }
}

/// The lane group `v[start..start + LANES]`, by reference.
#[inline(always)]
fn lane_at(v: &[f32], start: usize) -> &[f32; LANES] {
    <&[f32; LANES]>::try_from(&v[start..start + LANES]).expect("a whole lane group")
}

/// Per-lane running maxima and weight sums: of a tile row's lanes (folded at the end of the
/// row), or of one strip of columns, one lane per column.
#[derive(Clone, Copy)]
struct LaneMaxima {
    /// The maximum of the denominator set.
    max_den: [f32; LANES],
    /// The maximum of the kept positives.
    max_pos: [f32; LANES],
    /// Σ w.
    weight: [f32; LANES],
    /// Σ w·s.
    weighted: [f32; LANES],
}

impl LaneMaxima {
    const EMPTY: Self = LaneMaxima {
        max_den: [f32::NEG_INFINITY; LANES],
        max_pos: [f32::NEG_INFINITY; LANES],
        weight: [0.0; LANES],
        weighted: [0.0; LANES],
    };

    /// The first sweep's step: adds one lane group. An entry outside the denominator set (or
    /// excluded, bias −∞) and one that is no kept positive (w = 0) count as −∞ in the maxima.
    /// Returns the group as maxima and sums of one entry per lane (for [`Columns::add_row`],
    /// which passes them on to the columns). One loop does both: with the entries made in a
    /// loop of their own, some instantiations compiled to twice the instructions.
    #[inline(always)]
    fn add<const NEG_ONLY: bool>(&mut self, (s, w, b): Group<'_>) -> LaneMaxima {
        let mut entries = LaneMaxima::EMPTY;
        for l in 0..LANES {
            entries.max_den[l] = if in_denominator::<NEG_ONLY>(w[l]) {
                s[l] + b[l]
            } else {
                f32::NEG_INFINITY
            };
            entries.max_pos[l] = if w[l] > 0.0 { s[l] } else { f32::NEG_INFINITY };
            entries.weight[l] = w[l];
            entries.weighted[l] = w[l] * s[l];
            self.max_den[l] = max(self.max_den[l], entries.max_den[l]);
            self.max_pos[l] = max(self.max_pos[l], entries.max_pos[l]);
            self.weight[l] += entries.weight[l];
            self.weighted[l] += entries.weighted[l];
        }
        entries
    }

    /// Adds `other`'s entries lane by lane.
    #[inline(always)]
    fn merge(&mut self, other: &LaneMaxima) {
        for l in 0..LANES {
            self.max_den[l] = max(self.max_den[l], other.max_den[l]);
            self.max_pos[l] = max(self.max_pos[l], other.max_pos[l]);
            self.weight[l] += other.weight[l];
            self.weighted[l] += other.weighted[l];
        }
    }

    /// The maxima over all lanes: (denominator set, positives).
    #[inline(always)]
    fn fold(&self) -> (f32, f32) {
        (fold_max(self.max_den), fold_max(self.max_pos))
    }
}

/// Per-lane sums of exponentials relative to a shift, laid out as [`LaneMaxima`].
#[derive(Clone, Copy)]
struct LaneSums {
    /// Σ e over the denominator set.
    den: [f32; LANES],
    /// Σ w·e over the kept positives.
    pos: [f32; LANES],
}

impl LaneSums {
    const ZERO: Self = LaneSums {
        den: [0.0; LANES],
        pos: [0.0; LANES],
    };

    /// The second sweep's step: adds one lane group's exponentials e = exp(s + b − shift), each
    /// lane under its own shift, e to the denominator sum of an entry in the set and w·e to the
    /// positives' sum. Returns the terms it added (for [`Columns::add_row`], which passes them
    /// on to the columns).
    #[inline(always)]
    fn add<const NEG_ONLY: bool>(&mut self, (s, w, b): Group<'_>, shift: [f32; LANES]) -> LaneSums {
        let mut terms = LaneSums::ZERO;
        for l in 0..LANES {
            let e = exp(s[l] + b[l] - shift[l]);
            terms.den[l] = if in_denominator::<NEG_ONLY>(w[l]) {
                e
            } else {
                0.0
            };
            terms.pos[l] = w[l] * e;
            self.den[l] += terms.den[l];
            self.pos[l] += terms.pos[l];
        }
        terms
    }

    /// Adds `terms`, each scaled by `factor`.
    #[inline(always)]
    fn add_scaled(&mut self, terms: &LaneSums, factor: f32) {
        for l in 0..LANES {
            self.den[l] += terms.den[l] * factor;
            self.pos[l] += terms.pos[l] * factor;
        }
    }
}

/// The statistics of one anchor's tile row.
#[inline(always)]
fn row_piece<const NEG_ONLY: bool>(row: Row<'_>) -> Piece {
    let maxima = row.maxima::<NEG_ONLY>();
    let (max_den, max_pos) = maxima.fold();
    let shift = shift_of(max(max_den, max_pos));
    let sums = row.sums::<NEG_ONLY>(shift);
    with_own_shifts::<NEG_ONLY>(
        Piece::of_lanes(shift, &maxima, &sums),
        row,
        max_den,
        max_pos,
    )
}

/// A row piece whose sums were taken relative to `piece`'s shift, with each set whose own
/// maximum lies too far below that shift (`needs_own_shift`) summed again relative to it.
#[inline(always)]
fn with_own_shifts<const NEG_ONLY: bool>(
    mut piece: Piece,
    row: Row<'_>,
    max_den: f32,
    max_pos: f32,
) -> Piece {
    let shift = piece.den_shift;
    // A kept positive has bias 0 (`relation`), so these are its terms w·e^{s − max_pos}; every
    // other entry has w = 0 and adds 0.
    if needs_own_shift(max_pos, shift) {
        let sums = row.sums::<NEG_ONLY>(max_pos);
        (piece.pos_shift, piece.pos_sum) = (max_pos, fold_sum(sums.pos));
    }
    if NEG_ONLY && needs_own_shift(max_den, shift) {
        let sums = row.sums::<NEG_ONLY>(max_den);
        (piece.den_shift, piece.den_sum) = (max_den, fold_sum(sums.den));
    }
    piece
}

/// Anchor row `a` of the tile: its logits, and its weights and biases over the tile's columns
/// filled into `weight` and `bias` (at least a tile stride long) with neutral lane padding.
#[inline(always)]
fn anchor_row<'r, R: PairWeights>(
    pairs: &R,
    tile: &Tile,
    a: usize,
    logits: &'r [f32],
    weight: &'r mut [f32],
    bias: &'r mut [f32],
) -> Row<'r> {
    let (stride, width) = (tile.stride(), tile.cols.len());
    let (w, b) = (&mut weight[..stride], &mut bias[..stride]);
    pairs.fill_anchor_row(
        tile.rows.start + a,
        tile.cols.clone(),
        &mut w[..width],
        &mut b[..width],
    );
    neutral_padding(w, b, width);
    Row {
        s: &logits[a * stride..][..stride],
        w,
        b,
    }
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

    /// The maxima and weight sums of the columns `start..start + LANES`.
    #[inline(always)]
    fn maxima(&self, start: usize) -> LaneMaxima {
        LaneMaxima {
            max_den: lane_group(&self.max_den, start),
            max_pos: lane_group(&self.max_pos, start),
            weight: lane_group(&self.weight, start),
            weighted: lane_group(&self.weighted, start),
        }
    }

    #[inline(always)]
    fn set_maxima(&mut self, start: usize, maxima: &LaneMaxima) {
        set_lane_group(&mut self.max_den, start, maxima.max_den);
        set_lane_group(&mut self.max_pos, start, maxima.max_pos);
        set_lane_group(&mut self.weight, start, maxima.weight);
        set_lane_group(&mut self.weighted, start, maxima.weighted);
    }

    /// The sums of the columns `start..start + LANES`.
    #[inline(always)]
    fn sums(&self, start: usize) -> LaneSums {
        LaneSums {
            den: lane_group(&self.den, start),
            pos: lane_group(&self.pos, start),
        }
    }

    #[inline(always)]
    fn set_sums(&mut self, start: usize, sums: &LaneSums) {
        set_lane_group(&mut self.den, start, sums.den);
        set_lane_group(&mut self.pos, start, sums.pos);
    }

    /// Adds a chunk of contrast rows over the first `span` columns (`span` a multiple of
    /// [`LANES`]). Columns go in strips of one lane group whose running values stay in
    /// registers for the whole chunk. The rows come as a slice: an iterator that builds them
    /// had its `next` compiled out of line, without the kernel's target features.
    #[inline(always)]
    fn add_chunk<const NEG_ONLY: bool>(&mut self, rows: &[Row<'_>], span: usize) {
        for start in (0..span).step_by(LANES) {
            let mut maxima = self.maxima(start);
            for row in rows {
                maxima.add::<NEG_ONLY>(row.group(start));
            }
            // Move the shifts up to the new maxima. A column still empty keeps shift 0 and sums
            // 0; a first entry rescales zero sums (exp saturates instead of overflowing, so
            // 0·e^88 = 0).
            let mut shift = lane_group(&self.shift, start);
            let mut sums = self.sums(start);
            for (l, shift) in shift.iter_mut().enumerate() {
                let new_shift = shift_of(max(maxima.max_den[l], maxima.max_pos[l]));
                let factor = exp(*shift - new_shift);
                sums.den[l] *= factor;
                sums.pos[l] *= factor;
                *shift = new_shift;
            }
            for row in rows {
                sums.add::<NEG_ONLY>(row.group(start), shift);
            }
            self.set_maxima(start, &maxima);
            set_lane_group(&mut self.shift, start, shift);
            self.set_sums(start, &sums);
        }
    }

    /// One tile row of a symmetric relation (the column weights are the row's): returns the
    /// row's piece and adds the row to the first `span` columns, with one exponential per entry
    /// for both directions. The row's terms e^{s − m} (m its maximum) enter the columns scaled
    /// by e^{m − C}, C the largest row maximum so far, so every column is relative to C; a
    /// column whose own maximum ends too far below C is summed again in [`Columns::finish`].
    #[inline(always)]
    fn add_row<const NEG_ONLY: bool>(&mut self, row: Row<'_>, span: usize) -> Piece {
        let mut maxima = LaneMaxima::EMPTY;
        for start in row.starts() {
            let group = row.group(start);
            let entries = maxima.add::<NEG_ONLY>(group);
            if start < span {
                let mut column = self.maxima(start);
                column.merge(&entries);
                self.set_maxima(start, &column);
            }
        }
        let (max_den, max_pos) = maxima.fold();
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
        let mut sums = LaneSums::ZERO;
        for start in row.starts() {
            let group = row.group(start);
            let terms = sums.add::<NEG_ONLY>(group, [shift; LANES]);
            if start < span {
                let mut column = self.sums(start);
                column.add_scaled(&terms, to_common);
                self.set_sums(start, &column);
            }
        }
        with_own_shifts::<NEG_ONLY>(
            Piece::of_lanes(shift, &maxima, &sums),
            row,
            max_den,
            max_pos,
        )
    }

    /// Adds each column's piece to the statistics of its anchor (`col_stats`, the anchors of
    /// the tile's column block, `tile.cols.start` on), once all tile rows are in.
    #[inline(always)]
    fn finish<R: PairWeights, const NEG_ONLY: bool>(
        &self,
        pairs: &R,
        tile: &Tile,
        logits: &[f32],
        col_stats: &mut [AnchorStats],
    ) {
        let stride = tile.stride();
        for (k, stats) in col_stats.iter_mut().enumerate() {
            let mut piece = Piece {
                den_shift: self.shift[k],
                den_sum: self.den[k],
                pos_shift: self.shift[k],
                pos_sum: self.pos[k],
                weight: self.weight[k],
                weighted_logits: self.weighted[k],
            };
            // (With a shift of its own, a column's denominator maximum is the shift unless it
            // excludes the positives; with `add_row`'s common shift it may lie below.)
            let (own_pos, own_den) = (
                needs_own_shift(self.max_pos[k], self.shift[k]),
                needs_own_shift(self.max_den[k], self.shift[k]),
            );
            if own_pos || own_den {
                // Rare (huge logits): redo this column alone, entry by entry.
                let j = tile.cols.start + k;
                let (mut pos, mut den) = (0.0, 0.0);
                for (a, i) in tile.rows.clone().enumerate() {
                    let s = logits[a * stride + k];
                    let (mut w, mut b) = ([0.0], [0.0]);
                    pairs.fill_contrast_row(i, j..j + 1, &mut w, &mut b);
                    if w[0] > 0.0 {
                        pos += w[0] * exp(s - self.max_pos[k]);
                    }
                    if in_denominator::<NEG_ONLY>(w[0]) {
                        den += exp(s + b[0] - self.max_den[k]);
                    }
                }
                if own_pos {
                    (piece.pos_shift, piece.pos_sum) = (self.max_pos[k], pos);
                }
                if own_den {
                    (piece.den_shift, piece.den_sum) = (self.max_den[k], den);
                }
            }
            stats.absorb(piece);
        }
    }
}

/// Per-thread buffers of the forward sweep.
pub(super) struct Scratch {
    logits: Aligned,
    /// One tile row's weights and biases, anchor direction.
    row_weight: Vec<f32>,
    row_bias: Vec<f32>,
    /// A chunk of contrast rows' weights and biases (row c at c·span), for [`GeneralTile`]'s
    /// columns.
    col_weight: Vec<f32>,
    col_bias: Vec<f32>,
    columns: Columns,
}

impl Scratch {
    fn new() -> Self {
        let row = || vec![0.0; padded(BLOCK)];
        let chunk = || vec![0.0; CHUNK * padded(BLOCK)];
        Scratch {
            logits: Aligned::zeros(BLOCK * padded(BLOCK)),
            row_weight: row(),
            row_bias: row(),
            col_weight: chunk(),
            col_bias: chunk(),
            columns: Columns::new(),
        }
    }
}

/// The elementwise work of one forward tile (after its GEMM) for any relation: rows one at a
/// time, columns (if the column block holds anchors) in chunks of contrast rows.
struct GeneralTile<'a, R, const NEG_ONLY: bool> {
    pairs: &'a R,
    tile: &'a Tile,
    scratch: &'a mut Scratch,
    row_stats: &'a mut [AnchorStats],
    /// The column block's anchors; `None` if it has none.
    col_stats: Option<&'a mut [AnchorStats]>,
}

impl<R: PairWeights, const NEG_ONLY: bool> TileKernel for GeneralTile<'_, R, NEG_ONLY> {
    #[inline(always)]
    fn run(self) {
        let GeneralTile {
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
        let logits: &[f32] = logits;
        let stride = tile.stride();
        let count = col_stats.as_ref().map_or(0, |c| c.len());
        let (col_anchors, span) = (tile.cols.start..tile.cols.start + count, padded(count));
        columns.reset(span);
        for chunk_start in (0..tile.rows.len()).step_by(CHUNK) {
            let chunk = chunk_start..(chunk_start + CHUNK).min(tile.rows.len());
            for a in chunk.start..chunk.end.min(row_stats.len()) {
                let row = anchor_row(pairs, tile, a, logits, row_weight, row_bias);
                row_stats[a].absorb(row_piece::<NEG_ONLY>(row));
            }
            if count == 0 {
                continue;
            }
            let mut rows = [Row::EMPTY; CHUNK];
            let filled = col_weight
                .chunks_exact_mut(span)
                .zip(col_bias.chunks_exact_mut(span));
            for ((row, (w, b)), a) in rows.iter_mut().zip(filled).zip(chunk.clone()) {
                pairs.fill_contrast_row(
                    tile.rows.start + a,
                    col_anchors.clone(),
                    &mut w[..count],
                    &mut b[..count],
                );
                neutral_padding(w, b, count);
                *row = Row {
                    s: &logits[a * stride..][..span],
                    w,
                    b,
                };
            }
            columns.add_chunk::<NEG_ONLY>(&rows[..chunk.len()], span);
        }
        if let Some(col_stats) = col_stats {
            columns.finish::<R, NEG_ONLY>(pairs, tile, logits, col_stats);
        }
    }
}

/// The elementwise work of one forward tile (after its GEMM) for a symmetric relation and a
/// column block with anchors: one fill per tile row, [`Columns::add_row`] for both directions.
struct SymmetricTile<'a, R, const NEG_ONLY: bool> {
    pairs: &'a R,
    tile: &'a Tile,
    scratch: &'a mut Scratch,
    row_stats: &'a mut [AnchorStats],
    /// The column block's anchors (at least one).
    col_stats: &'a mut [AnchorStats],
}

impl<R: PairWeights, const NEG_ONLY: bool> TileKernel for SymmetricTile<'_, R, NEG_ONLY> {
    #[inline(always)]
    fn run(self) {
        let SymmetricTile {
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
            columns,
            ..
        } = scratch;
        let logits: &[f32] = logits;
        let span = padded(col_stats.len());
        columns.reset(span);
        for a in 0..tile.rows.len() {
            // Anchor j's weight against contrast i is row i's weight of j.
            let row = anchor_row(pairs, tile, a, logits, row_weight, row_bias);
            let piece = columns.add_row::<NEG_ONLY>(row, span);
            if let Some(stats) = row_stats.get_mut(a) {
                stats.absorb(piece);
            }
        }
        // Every column's sums are relative to the common shift.
        columns.shift[..span].fill(shift_of(columns.common_shift));
        columns.finish::<R, NEG_ONLY>(pairs, tile, logits, col_stats);
    }
}

/// Per-block state: the anchors of the block (`BLOCK` of them, fewer in the last anchor block,
/// none past the anchors).
pub(super) fn block_states<T: Clone>(batch: &Batch, empty: T) -> Vec<Mutex<Vec<T>>> {
    (0..batch.schedule.blocks())
        .map(|b| {
            let rows = batch.schedule.block_rows(b);
            let count = rows.end.min(batch.anchors).saturating_sub(rows.start);
            Mutex::new(vec![empty.clone(); count])
        })
        .collect()
}

/// Forward statistics of every anchor (see the module docs).
pub(super) fn statistics<R: PairWeights>(batch: &Batch, pairs: &R) -> Vec<AnchorStats> {
    if batch.only_negatives_in_denominator() {
        statistics_with::<R, true>(batch, pairs)
    } else {
        statistics_with::<R, false>(batch, pairs)
    }
}

fn statistics_with<R: PairWeights, const NEG_ONLY: bool>(
    batch: &Batch,
    pairs: &R,
) -> Vec<AnchorStats> {
    let states = block_states(batch, AnchorStats::EMPTY);
    batch
        .schedule
        .for_each_tile(&states, Scratch::new, |tile, scratch, rows, cols| {
            batch
                .rows
                .logits_tile(tile, batch.inverse_temperature, &mut scratch.logits);
            // A tile without column anchors has row work only, which the general kernel does
            // without the symmetric one's column bookkeeping.
            match cols.filter(|c| !c.is_empty()) {
                Some(cols) if pairs.is_symmetric() => {
                    batch.isa.run(SymmetricTile::<R, NEG_ONLY> {
                        pairs,
                        tile,
                        scratch,
                        row_stats: rows,
                        col_stats: cols,
                    });
                }
                cols => batch.isa.run(GeneralTile::<R, NEG_ONLY> {
                    pairs,
                    tile,
                    scratch,
                    row_stats: rows,
                    col_stats: cols.map(|c| c.as_mut_slice()),
                }),
            }
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
    batch: &Batch,
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
