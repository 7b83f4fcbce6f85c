//! Tiles, the deterministic parallel schedule over them, and the GEMMs on them.
//!
//! The N rows are cut into blocks of [`BLOCK`] rows (the last one ragged). A tile is a pair of
//! blocks (I, J) with I ≤ J: S is symmetric (s_ij = s_ji), so tile (I, J) serves
//! the anchors of I against the contrasts of J (its rows) *and* the anchors of J against the
//! contrasts of I (its columns), and tiles with I > J are never computed. A diagonal tile (I, I)
//! is computed in full and serves its rows only.
//!
//! Determinism: a tile updates the per-anchor accumulators of both its blocks, so two tiles
//! sharing a block must not run at once, and each block must see its tiles in a fixed order.
//! The schedule is a round-robin tournament (the circle method): round 0 holds the diagonal
//! tiles, and each further round pairs every block with a different partner, so the tiles of a
//! round touch disjoint blocks and run in parallel without atomics; rounds run one after the
//! other. The schedule depends on N only, so results are bitwise the same for any thread count.

use std::ops::Range;
use std::sync::Mutex;

use rayon::prelude::*;

use super::gemm::{pack_panels, Product, Right};
use super::math::{padded, Aligned};
use super::simd::Isa;

/// Rows per block. 256 keeps a tile's logits (256 KiB), its two feature blocks (2 × 128 KiB at
/// D = 128) and the gradient partials in a 1–2 MiB L2, and gives the GEMMs enough work per call.
pub(super) const BLOCK: usize = 256;

/// Two blocks of rows; `rows` index the logits tile's rows, `cols` its columns.
#[derive(Debug, Clone)]
pub(super) struct Tile {
    /// Block I's rows.
    pub(super) rows: Range<usize>,
    /// Block J's rows.
    pub(super) cols: Range<usize>,
}

impl Tile {
    /// The row stride of the tile's logits: columns padded to whole lanes.
    pub(super) fn stride(&self) -> usize {
        padded(self.cols.len())
    }
}

/// The tiles of a batch in rounds of block-disjoint tiles (see the module docs).
pub(super) struct Schedule {
    rows: usize,
    rounds: Vec<Vec<(usize, usize)>>,
}

impl Schedule {
    /// Tiles for `rows` rows of which the first `anchors` are anchors: a tile whose blocks hold
    /// no anchor has nothing to do and is left out.
    pub(super) fn new(rows: usize, anchors: usize) -> Self {
        Self::touching(rows, anchors, std::slice::from_ref(&(0..rows)))
    }

    /// The tiles of [`new`](Self::new) that touch a block holding a row of `runs`: all the tiles
    /// those rows' accumulators receive, in the same order, so their results are bitwise those of
    /// the whole schedule (a shard's anchors and gradient rows, `crate::shard`).
    pub(super) fn touching(rows: usize, anchors: usize, runs: &[Range<usize>]) -> Self {
        let blocks = rows.div_ceil(BLOCK);
        let anchor_blocks = anchors.div_ceil(BLOCK);
        let mut active = vec![false; blocks];
        for run in runs.iter().filter(|run| !run.is_empty()) {
            active[run.start / BLOCK..=(run.end - 1) / BLOCK].fill(true);
        }
        let mut rounds = vec![(0..anchor_blocks)
            .filter(|&b| active[b])
            .map(|b| (b, b))
            .collect::<Vec<_>>()];
        // Circle method on an even number of seats; a pair with the empty seat sits out.
        let seats = blocks + blocks % 2;
        for round in 0..seats.saturating_sub(1) {
            let mut pairs = Vec::new();
            let mut push = |a: usize, b: usize| {
                let (i, j) = (a.min(b), a.max(b));
                if j < blocks && i < anchor_blocks && (active[i] || active[j]) {
                    pairs.push((i, j));
                }
            };
            push(seats - 1, round);
            for k in 1..seats / 2 {
                let m = seats - 1;
                push((round + k) % m, (round + m - k) % m);
            }
            rounds.push(pairs);
        }
        Schedule { rows, rounds }
    }

    /// Rows of block `b`.
    pub(super) fn block_rows(&self, b: usize) -> Range<usize> {
        b * BLOCK..((b + 1) * BLOCK).min(self.rows)
    }

    /// The number of blocks.
    pub(super) fn blocks(&self) -> usize {
        self.rows.div_ceil(BLOCK)
    }

    /// Runs `task` on every tile: rounds in order, the tiles of a round in parallel. `task`
    /// gets the tile, this thread's scratch (from `scratch`), block I's state and, for an
    /// off-diagonal tile, block J's.
    ///
    /// Each pool thread makes its scratch once for the whole sweep: rayon's `for_each_init`
    /// would make one per split job, i.e. several per round, each a fresh ~0.5 MiB to zero and
    /// fault in. A task overwrites what it reads of the scratch, so reuse changes no result.
    pub(super) fn for_each_tile<B, S>(
        &self,
        states: &[Mutex<B>],
        scratch: impl Fn() -> S + Sync + Send,
        task: impl Fn(&Tile, &mut S, &mut B, Option<&mut B>) + Sync + Send,
    ) where
        B: Send,
        S: Send,
    {
        let scratches: Vec<Mutex<Option<S>>> = (0..rayon::current_num_threads())
            .map(|_| Mutex::new(None))
            .collect();
        for round in &self.rounds {
            round.par_iter().for_each(|&(i, j)| {
                let tile = Tile {
                    rows: self.block_rows(i),
                    cols: self.block_rows(j),
                };
                // Never waits: a thread only takes its own scratch (and a caller outside the
                // pool, index 0, runs alone).
                let slot = rayon::current_thread_index().unwrap_or(0) % scratches.len();
                let mut own = lock(&scratches[slot]);
                let scratch = own.get_or_insert_with(&scratch);
                // The locks never wait: the tiles of a round share no block.
                let mut rows = lock(&states[i]);
                if i == j {
                    task(&tile, scratch, &mut rows, None);
                } else {
                    let mut cols = lock(&states[j]);
                    task(&tile, scratch, &mut rows, Some(&mut cols));
                }
            });
        }
    }
}

/// Per-block states over one buffer of `per_row` values per row, in row order: the blocks'
/// chunks of `data`, for [`Schedule::for_each_tile`] (no copy to gather them afterwards).
pub(super) fn block_chunks<T>(data: &mut [T], per_row: usize) -> Vec<Mutex<&mut [T]>> {
    data.chunks_mut(BLOCK * per_row).map(Mutex::new).collect()
}

/// Per-block states concatenated in block order (so, for per-anchor states, in anchor order).
pub(super) fn flatten<T>(states: Vec<Mutex<Vec<T>>>) -> Vec<T> {
    states
        .into_iter()
        .flat_map(|state| state.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

/// Locks a block's state; a poisoned lock (a panicking task) passes its panic on.
fn lock<B>(state: &Mutex<B>) -> std::sync::MutexGuard<'_, B> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The features as f32 rows `[N, D]`, row-major and as Zᵀ panels for the logits product.
pub(super) struct Rows {
    /// Row r at `r·dim..(r+1)·dim`.
    pub(super) data: Aligned,
    /// D.
    pub(super) dim: usize,
    /// `gemm::pack_panels` of `data` for `isa`.
    panels: Aligned,
    /// The instruction set the products run on.
    isa: Isa,
}

impl Rows {
    /// Rows from their row-major data, packed for `isa`.
    ///
    /// # Errors
    /// [`crate::Error::OutOfMemory`] for the panels.
    pub(super) fn new(data: Aligned, dim: usize, isa: Isa) -> crate::Result<Self> {
        let panels = pack_panels(&data, dim, isa.panel_width())?;
        Ok(Rows {
            data,
            dim,
            panels,
            isa,
        })
    }

    /// Rows `range`, as one slice.
    pub(super) fn block(&self, range: Range<usize>) -> &[f32] {
        &self.data[range.start * self.dim..range.end * self.dim]
    }

    /// `logits[a·stride + b] = scale · z_{rows.start+a} · z_{cols.start+b}` for the tile's rows
    /// a and columns b (the padding columns are left as they were).
    pub(super) fn logits_tile(&self, tile: &Tile, scale: f32, logits: &mut [f32]) {
        // Blocks start at multiples of BLOCK, which every panel width divides, so block J's
        // panels start at panel cols.start / width, i.e. at float cols.start · D.
        debug_assert_eq!(tile.cols.start % self.isa.panel_width(), 0);
        let first_panel = tile.cols.start * self.dim;
        Product {
            m: tile.rows.len(),
            n: tile.cols.len(),
            k: self.dim,
            alpha: scale,
            a: self.block(tile.rows.clone()),
            a_row_step: self.dim,
            a_col_step: 1,
            b: Right::Panels {
                data: &self.panels[first_panel..],
            },
            c: logits,
            c_stride: tile.stride(),
        }
        .run(self.isa);
    }

    /// `out (m×D) = H · Z_block` where H is the tile `h` (m×k, row stride `stride`) or, with
    /// `transposed`, its transpose read in place, and `block` the k rows of Z it multiplies.
    pub(super) fn tile_times_block(
        &self,
        h: &[f32],
        stride: usize,
        (m, k): (usize, usize),
        transposed: bool,
        block: Range<usize>,
        out: &mut [f32],
    ) {
        let (a_row_step, a_col_step) = if transposed { (1, stride) } else { (stride, 1) };
        Product {
            m,
            n: self.dim,
            k,
            alpha: 1.0,
            a: h,
            a_row_step,
            a_col_step,
            b: Right::Rows {
                data: self.block(block),
                stride: self.dim,
            },
            c: out,
            c_stride: self.dim,
        }
        .run(self.isa);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_covers_every_tile_once_with_disjoint_rounds() {
        for rows in [1, BLOCK, BLOCK + 1, 3 * BLOCK, 7 * BLOCK - 5, 12 * BLOCK] {
            for anchors in [rows, rows.div_ceil(2), rows.div_ceil(3)] {
                let schedule = Schedule::new(rows, anchors);
                let (blocks, anchor_blocks) = (schedule.blocks(), anchors.div_ceil(BLOCK));
                let mut seen = vec![vec![0; blocks]; blocks];
                for round in &schedule.rounds {
                    let mut busy = vec![false; blocks];
                    for &(i, j) in round {
                        assert!(i <= j);
                        seen[i][j] += 1;
                        assert!(!busy[i] && !busy[j], "block reused in a round");
                        busy[i] = true;
                        busy[j] = true;
                    }
                }
                for (i, row) in seen.iter().enumerate() {
                    for (j, &count) in row.iter().enumerate() {
                        let wanted = usize::from(i <= j && i < anchor_blocks);
                        assert_eq!(count, wanted, "tile ({i}, {j}) of {rows} rows");
                    }
                }
            }
        }
    }

    /// A shard's schedule keeps exactly the tiles that touch its blocks, in the whole
    /// schedule's order.
    #[test]
    fn a_shard_keeps_the_tiles_of_its_blocks() {
        let (rows, anchors) = (7 * BLOCK + 13, 7 * BLOCK + 13);
        let whole = Schedule::new(rows, anchors);
        let shard =
            Schedule::touching(rows, anchors, &[BLOCK + 5..BLOCK + 9, 5 * BLOCK..6 * BLOCK]);
        let touches = |&(i, j): &(usize, usize)| [1, 5].contains(&i) || [1, 5].contains(&j);
        for (kept, all) in shard.rounds.iter().zip(&whole.rounds) {
            let expected: Vec<_> = all.iter().copied().filter(touches).collect();
            assert_eq!(*kept, expected);
        }
        let count: usize = shard.rounds.iter().map(Vec::len).sum();
        assert_eq!(
            count,
            2 * 8 - 1,
            "two blocks' tiles with each of 8 blocks, (1, 5) once"
        );
    }
}
