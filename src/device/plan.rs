//! Grid, block and dynamic shared memory of every kernel launch, from the problem's shape.
//!
//! The one place that knows the kernels' tile sizes (`kernels/supcon_common.cuh`; a test checks
//! the constants against the compiled kernels). The emulated and the real CUDA launches both
//! use [`launch_config`], so the emulated tests exercise the real plan.

/// Threads per block of the forward-statistics and backward kernels (`kThreads`).
pub(crate) const TILE_THREADS: u32 = 128;
/// Anchor rows per forward block, gradient rows per backward block (`kTileRows`).
pub(crate) const TILE_ROWS: u32 = 64;
/// Feature columns per backward block (`kGradChunk`).
pub(crate) const GRAD_CHUNK: u32 = 128;
/// Feature columns per block of the wide tensor-core backward kernels (`tc::kWideGradCols`).
pub(crate) const WIDE_GRAD_CHUNK: u32 = 256;
/// CUDA's limit on `gridDim.y`, which counts the backward kernel's feature chunks.
pub(crate) const MAX_GRID_Y: u32 = 65_535;
/// Threads of the single finalisation block (`kFinalizeThreads`).
pub(crate) const FINALIZE_THREADS: u32 = 256;
/// Threads per block of the backward coefficients, one anchor each (`kCoefficientThreads`).
pub(crate) const COEFFICIENT_THREADS: u32 = 256;
/// Threads per block of the forward's merge of column shares, one anchor each
/// (`kMergeThreads`).
pub(crate) const MERGE_THREADS: u32 = 256;
/// Threads per block of the device-side positives: one sample each when packing label sets,
/// one block per sample for the cap bounds (`kPositivesThreads`).
pub(crate) const POSITIVES_THREADS: u32 = 256;
/// Threads per block of the row scales, one warp per row (`kRowScalesThreads`).
pub(crate) const ROW_SCALES_THREADS: u32 = 256;
/// Bytes of one anchor's partial statistics in a column share (`sizeof(RowStatistics)`).
pub(crate) const ROW_STATISTICS_BYTES: usize = 7 * size_of::<f32>();
/// Blocks the forward aims for before it splits the columns: about 4 per SM of an H200 (132
/// SMs, 3 resident blocks each), so that a launch fills the device in at least one wave. A
/// constant rather than the device's count, so that the split (and with it the bits of the
/// result) is the same on every device and the workspace size follows from the shape alone.
const FORWARD_TARGET_BLOCKS: u32 = 512;
/// Fewest contrast tiles per column share: the pipeline's prologue and the merge are worth it.
const MIN_TILES_PER_SHARE: u32 = 4;
/// Threads per block of the tensor-core kernels (`tc::kThreads`: 4 warps).
pub(crate) const MMA_THREADS: u32 = 128;
/// Shared rows the tensor-core kernels keep: the block's own 64, two stages of 64 contrasts.
const MMA_SHARED_ROWS: u32 = 3 * 64;
/// Zero elements after each shared row (`tc::kRowSlack`).
const MMA_ROW_SLACK: u32 = 8;

/// Dynamic shared memory of a tensor-core kernel for rows of `dim` elements: 3 × 64 rows of D
/// padded to a multiple of 16, plus 8, two bytes each, twice that for split operands (a hi and
/// a lo part per row: `kernels/supcon_mma_tiles.cuh`).
pub(crate) fn mma_shared_bytes(dim: u32, split: bool) -> u64 {
    let parts = if split { 2 } else { 1 };
    parts
        * u64::from(MMA_SHARED_ROWS)
        * (u64::from(dim.div_ceil(16) * 16) + u64::from(MMA_ROW_SLACK))
        * 2
}

/// Most column shares the forward of `anchors` anchors uses for any number of rows: the
/// shares that bring its anchor tiles up to [`FORWARD_TARGET_BLOCKS`] blocks (1 once they
/// reach it alone).
pub(crate) fn column_splits_bound(anchors: u32) -> u32 {
    FORWARD_TARGET_BLOCKS.div_ceil(anchors.div_ceil(TILE_ROWS).max(1))
}

/// Column shares of the forward of `anchors` anchors against `rows` contrast rows: up to
/// [`column_splits_bound`], with at least [`MIN_TILES_PER_SHARE`] 64-row tiles per share (so
/// never more shares than tiles).
pub(crate) fn column_splits(anchors: u32, rows: u32) -> u32 {
    let tiles = rows.div_ceil(TILE_ROWS);
    column_splits_bound(anchors)
        .min(tiles / MIN_TILES_PER_SHARE)
        .max(1)
}

/// The launch stages; the element type does not change the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `supcon_forward_{f32,f16,bf16}`: per-anchor statistics and losses.
    ForwardStatistics,
    /// `supcon_forward_merge`: the column shares of each anchor merged in order.
    ForwardMerge,
    /// `supcon_forward_finalize`: the deterministic reduction.
    ForwardFinalize,
    /// `supcon_backward_coefficients`: the per-anchor gradient coefficients.
    BackwardCoefficients,
    /// `supcon_backward_{f32,f16,bf16}`: the feature gradient.
    Backward,
    /// `supcon_mma_forward_{f16,bf16,f32x3}`: per-anchor statistics and losses on tensor
    /// cores; `split`: f32 rows in two parts.
    MmaForward { split: bool },
    /// `supcon_mma_backward_{f16,bf16,f32x3}`: the feature gradient on tensor cores.
    MmaBackward { split: bool, wide: bool },
    /// `supcon_pack_label_sets`: multi-hot rows packed into bitsets, one thread per sample.
    PackLabelSets,
    /// `supcon_cap_bounds`: the positives cap's bound of each sample, one block per sample.
    CapBounds,
    /// `supcon_row_scales_{f32,f16,bf16}`: the normalisation's row scales, a warp per row.
    RowScales,
}

/// A kernel launch configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchConfig {
    /// Blocks (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes (the tensor-core kernels'; the others use static shared
    /// memory only).
    pub dynamic_shared_bytes: u32,
}

/// The launch configuration of `stage` for rows of `dim` elements, covering `rows` rows: the
/// anchors of a forward launch (its columns in `column_splits` shares) or of the merge, the
/// gradient rows of a backward launch, the R anchors of the coefficients, the B samples of the
/// device-side positives (the finalisation is one block whatever it reduces). `column_splits` is 1 for every stage but the forward's.
pub(crate) fn launch_config(stage: Stage, dim: u32, rows: u32, column_splits: u32) -> LaunchConfig {
    debug_assert!(
        column_splits == 1 || matches!(stage, Stage::ForwardStatistics | Stage::MmaForward { .. }),
        "{stage:?} does not split its columns"
    );
    let (grid, threads) = match stage {
        Stage::ForwardStatistics => ([rows.div_ceil(TILE_ROWS), column_splits, 1], TILE_THREADS),
        Stage::ForwardMerge => ([rows.div_ceil(MERGE_THREADS), 1, 1], MERGE_THREADS),
        Stage::ForwardFinalize => ([1, 1, 1], FINALIZE_THREADS),
        Stage::BackwardCoefficients => (
            [rows.div_ceil(COEFFICIENT_THREADS), 1, 1],
            COEFFICIENT_THREADS,
        ),
        Stage::Backward => (
            [rows.div_ceil(TILE_ROWS), dim.div_ceil(GRAD_CHUNK), 1],
            TILE_THREADS,
        ),
        Stage::MmaForward { .. } => ([rows.div_ceil(TILE_ROWS), column_splits, 1], MMA_THREADS),
        Stage::PackLabelSets => ([rows.div_ceil(POSITIVES_THREADS), 1, 1], POSITIVES_THREADS),
        Stage::CapBounds => ([rows, 1, 1], POSITIVES_THREADS),
        Stage::RowScales => (
            [rows.div_ceil(ROW_SCALES_THREADS / 32), 1, 1],
            ROW_SCALES_THREADS,
        ),
        Stage::MmaBackward { wide, .. } => {
            let chunk = if wide { WIDE_GRAD_CHUNK } else { GRAD_CHUNK };
            (
                [rows.div_ceil(TILE_ROWS), dim.div_ceil(chunk), 1],
                MMA_THREADS,
            )
        }
    };
    let dynamic_shared_bytes = match stage {
        // Callers pick the tensor-core kernels only where this fits the device (`Problem`).
        Stage::MmaForward { split } | Stage::MmaBackward { split, .. } => {
            u32::try_from(mma_shared_bytes(dim, split)).unwrap_or(u32::MAX)
        }
        _ => 0,
    };
    LaunchConfig {
        grid,
        block: [threads, 1, 1],
        dynamic_shared_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_every_row_and_column() {
        let (anchors, rows, dim) = (150, 300, 130);
        assert_eq!(
            launch_config(Stage::ForwardStatistics, dim, anchors, 1).grid,
            [3, 1, 1]
        );
        assert_eq!(launch_config(Stage::Backward, dim, rows, 1).grid, [5, 2, 1]);
        assert_eq!(
            launch_config(Stage::ForwardFinalize, dim, anchors, 1).grid,
            [1, 1, 1]
        );
        assert_eq!(
            launch_config(Stage::BackwardCoefficients, dim, anchors, 1).grid,
            [1, 1, 1]
        );
        assert_eq!(
            launch_config(Stage::MmaForward { split: false }, dim, anchors, 1).grid,
            [3, 1, 1]
        );
        let narrow = Stage::MmaBackward {
            split: false,
            wide: false,
        };
        let backward = launch_config(narrow, dim, rows, 1);
        assert_eq!(backward.grid, [5, 2, 1]);
        // D = 130 pads to 144 (+ 8 slack) elements of 2 bytes, for 3 × 64 rows.
        assert_eq!(backward.dynamic_shared_bytes, 3 * 64 * 152 * 2);
        let split = Stage::MmaBackward {
            split: true,
            wide: true,
        };
        let split = launch_config(split, dim, rows, 1);
        assert_eq!(split.dynamic_shared_bytes, 2 * 3 * 64 * 152 * 2);
        assert_eq!(split.grid, [5, 1, 1]);
        assert_eq!(
            launch_config(Stage::Backward, dim, rows, 1).dynamic_shared_bytes,
            0
        );
        // A range covers only its rows.
        assert_eq!(launch_config(Stage::Backward, dim, 65, 1).grid, [2, 2, 1]);
    }

    #[test]
    fn small_forwards_split_their_columns() {
        // 128 anchor tiles take 4 shares of their 128 contrast tiles to reach 512 blocks.
        assert_eq!(column_splits(8192, 8192), 4);
        assert_eq!(
            launch_config(Stage::MmaForward { split: false }, 128, 8192, 4).grid,
            [128, 4, 1]
        );
        assert_eq!(
            launch_config(Stage::ForwardStatistics, 128, 8192, 4).grid,
            [128, 4, 1]
        );
        // At least 4 tiles per share: 32 tiles, 8 shares (not the 16 that 512 blocks want).
        assert_eq!(column_splits(2048, 2048), 8);
        // Contrast mode one: 32 anchor tiles against 128 contrast tiles.
        assert_eq!(column_splits(2048, 8192), 16);
        // Enough anchors alone, or too few tiles to share.
        assert_eq!(column_splits(65536, 65536), 1);
        assert_eq!(column_splits(300, 300), 1);
        assert_eq!(column_splits(1, 1), 1);
        for (anchors, rows) in [
            (1, 1),
            (70, 600),
            (2048, 8192),
            (8192, 8192),
            (65536, 1 << 20),
        ] {
            let splits = column_splits(anchors, rows);
            assert!(splits <= column_splits_bound(anchors));
            assert!(splits == 1 || splits * MIN_TILES_PER_SHARE <= rows.div_ceil(TILE_ROWS));
        }
        assert_eq!(
            launch_config(Stage::ForwardMerge, 128, 300, 1).grid,
            [2, 1, 1]
        );
        // A warp per row, 8 per block.
        assert_eq!(
            launch_config(Stage::RowScales, 128, 300, 1).grid,
            [38, 1, 1]
        );
    }

    #[test]
    fn a_large_problem_keeps_exact_grids() {
        let rows = 1 << 24;
        let dim = MAX_GRID_Y * GRAD_CHUNK;
        let backward = launch_config(Stage::Backward, dim, rows, 1);
        assert_eq!(backward.grid, [rows / TILE_ROWS, MAX_GRID_Y, 1]);
        assert_eq!(
            launch_config(Stage::ForwardStatistics, dim, rows, 1).grid,
            [rows / TILE_ROWS, 1, 1]
        );
    }
}
