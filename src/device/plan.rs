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
/// CUDA's limit on `gridDim.y`, which counts the backward kernel's feature chunks.
pub(crate) const MAX_GRID_Y: u32 = 65_535;
/// Threads of the single finalisation block (`kFinalizeThreads`).
pub(crate) const FINALIZE_THREADS: u32 = 256;
/// Threads per block of the backward coefficients, one anchor each (`kCoefficientThreads`).
pub(crate) const COEFFICIENT_THREADS: u32 = 256;

/// The launch stages; the element type does not change the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `supcon_forward_{f32,f16,bf16}`: per-anchor statistics and losses.
    ForwardStatistics,
    /// `supcon_forward_finalize`: the deterministic reduction.
    ForwardFinalize,
    /// `supcon_backward_coefficients`: the per-anchor gradient coefficients.
    BackwardCoefficients,
    /// `supcon_backward_{f32,f16,bf16}`: the feature gradient.
    Backward,
}

/// The sizes a launch plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelShape {
    /// N = B·V rows.
    pub rows: u32,
    /// R anchors (rows 0..R).
    pub anchors: u32,
    /// D.
    pub dim: u32,
}

/// A kernel launch configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchConfig {
    /// Blocks (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes (the kernels use static shared memory only).
    pub dynamic_shared_bytes: u32,
}

/// The launch configuration of `stage` for `shape`.
pub(crate) fn launch_config(stage: Stage, shape: KernelShape) -> LaunchConfig {
    let (grid, threads) = match stage {
        Stage::ForwardStatistics => ([shape.anchors.div_ceil(TILE_ROWS), 1, 1], TILE_THREADS),
        Stage::ForwardFinalize => ([1, 1, 1], FINALIZE_THREADS),
        Stage::BackwardCoefficients => (
            [shape.anchors.div_ceil(COEFFICIENT_THREADS), 1, 1],
            COEFFICIENT_THREADS,
        ),
        Stage::Backward => (
            [
                shape.rows.div_ceil(TILE_ROWS),
                shape.dim.div_ceil(GRAD_CHUNK),
                1,
            ],
            TILE_THREADS,
        ),
    };
    LaunchConfig {
        grid,
        block: [threads, 1, 1],
        dynamic_shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_every_row_and_column() {
        let shape = KernelShape {
            rows: 300,
            anchors: 150,
            dim: 130,
        };
        assert_eq!(
            launch_config(Stage::ForwardStatistics, shape).grid,
            [3, 1, 1]
        );
        assert_eq!(launch_config(Stage::Backward, shape).grid, [5, 2, 1]);
        assert_eq!(launch_config(Stage::ForwardFinalize, shape).grid, [1, 1, 1]);
    }

    #[test]
    fn a_large_problem_keeps_exact_grids() {
        let rows = 1 << 24;
        let shape = KernelShape {
            rows,
            anchors: rows,
            dim: MAX_GRID_Y * GRAD_CHUNK,
        };
        let backward = launch_config(Stage::Backward, shape);
        assert_eq!(backward.grid, [rows / TILE_ROWS, MAX_GRID_Y, 1]);
        assert_eq!(
            launch_config(Stage::ForwardStatistics, shape).grid,
            [rows / TILE_ROWS, 1, 1]
        );
    }
}
