/*
 * SupCon forward pass: per-anchor statistics, per-anchor losses, and the reduced loss.
 *
 * The math (docs/math.md). For anchor i (rows 0..R-1) and every contrast row j != i:
 *     s_ij = z_i . z_j / tau,  w_ij = positive weight (same label / same sample / mask[b_i, b_j])
 *     D_i  = { j != i }  (denominator all)   or   { j != i : w_ij = 0 }  (only negatives)
 *     LSE_i   = log sum_{j in D_i} e^{s_ij}          P_i = sum_j w_ij,  W_i = max_j w_ij
 *     LSE^P_i = log sum_j w_ij e^{s_ij}              T_i = sum_j w_ij s_ij
 *     l_i = c (LSE_i - T_i / P_i)                    (summation outside, c = tau / tau_b)
 *     l_i = c (LSE_i - LSE^P_i + log P_i)            (summation inside)
 *     l_i = 0 when P_i = 0 or D_i is empty.
 *
 * supcon_forward_{f32,f16,bf16}: grid = ceil(R / 64) x column_splits blocks of 128 threads. Block
 * b owns anchors 64b .. 64b + 63 and streams over all N contrast rows (its share of them, see
 * "Column split") in column tiles of 64; each tile of S is
 * computed from shared stages of Z (supcon_common.cuh) into registers, 8 x 4 logits per thread.
 * The thread then folds its logits into running statistics of its 8 anchor rows: an online
 * log-sum-exp over D_i (running max m and sum l = sum e^{s - m}, rescaled once per tile when the
 * max grows), the same over the weighted positives, and the plain sums P, T and max W. Nothing N x N is stored; the self pair and rows past N are masked
 * inside the tile. After the last tile the 16 threads sharing an anchor row publish their
 * partial statistics to shared memory and one thread per row merges them in a fixed order and
 * writes LSE_i, LSE^P_i - log W_i, P_i, W_i and l_i. (The positive log-sum-exp is also kept for
 * summation outside: the saved state holds it, and it costs an exponential only where w_ij > 0.)
 *
 * Exact cancellations. Where the loss of an anchor does not depend on the logits, its gradient
 * should be 0, not rounding noise, so the statistics are formed for the backward kernel to
 * reproduce them bit for bit: the logits are the same products scaled the same way, and the
 * positive log-sum-exp is kept scaled by W_i, which makes it equal LSE_i bitwise when every
 * denominator term is a positive of weight 1 (a one-class batch, summation inside) and equal
 * s_ij when anchor i has a single positive of any weight (N = 2).
 *
 * Memory traffic: per column tile a block reads 64 anchor rows and 64 contrast rows, i.e. the
 * whole launch reads 2 (R / 64) N D elements, mostly L2 hits (the anchor block is re-read from
 * L1/L2); compute is 2 R N D flops plus ~1 exponential per logit (2 for positives). Writes are
 * O(R). The mask (explicit weights) is read per logit from the [B, B] buffer, L2-resident for
 * any batch that fits a training step.
 *
 * Column split: where the anchors alone would leave SMs idle (small N), the host launches
 * column_splits blocks per anchor tile (grid.y), block y over share y of the contrast tiles
 * (column_share), each storing its anchors' partial statistics instead of their outputs. Then
 * supcon_forward_merge (one thread per anchor) merges the shares in order y = 0, 1, ... and
 * writes the outputs: the same bits on every run, no atomics.
 *
 * One positive (docs/math.md): each positive p joins the negatives alone, so its term
 * softplus(LSE^N_i - s_ip) needs LSE^N_i, the log-sum-exp over every negative, first. The host
 * launches two kernels over the same range: supcon_forward_* computes the statistics with D_i =
 * the negatives (in_denominator), then supcon_forward_positive_terms_* sweeps the tiles again,
 * starts each anchor row from its LSE^N_i, folds its positives into PositiveTerms
 * (supcon_statistics.cuh), and writes l_i and the pull Psi_i and log A_i that the backward
 * kernel needs. The second pass runs unsplit (column_splits = 1). One kernel for both passes
 * would spill: ptxas allocates the two tile loops' registers together.
 *
 * supcon_forward_finalize: one block of 256 threads. Thread t sums l_a and counts anchors with
 * P_a = 0 over a = t, t + 256, ... (f64 sums), warps combine by an xor butterfly, thread 0 adds
 * the 8 warp totals in order: a fixed summation order, so the loss is bitwise reproducible run to
 * run (no atomics). It applies the reduction and the no-positive policy's mean denominator R'
 * (R, or the anchors with P_i > 0, at least 1).
 */
#include "supcon_statistics.cuh"

namespace supcon {
/* Internal linkage: in the host emulation the __shared__ variables below become function-local
 * statics, and only statics outside COMDAT groups get AddressSanitizer redzones. */
namespace {

/* A block's shared memory, declared once per kernel for both passes' instantiations. The
 * stages are dead once the last tile is done; the partial statistics reuse them. */
struct ForwardShared {
    union {
        StageTiles stage;
        RowStatistics partial[kTileRows][kThreadGridCols];
        PositiveTerms terms[kTileRows][kThreadGridCols];
    };
    TileRows anchor_rows;
    /* Double-buffered: a tile's description is rewritten two tiles later, after barriers that
     * every thread reaches only when done reading it. */
    TileRows contrast_rows[2];
};

__device__ __forceinline__ RowStatistics (&partials_of(ForwardShared& shared, const RowStatistics&))[kTileRows][kThreadGridCols] {
    return shared.partial;
}
__device__ __forceinline__ PositiveTerms (&partials_of(ForwardShared& shared, const PositiveTerms&))[kTileRows][kThreadGridCols] {
    return shared.terms;
}

/* One pass over the range's anchors: Statistics = RowStatistics (the statistics) or
 * PositiveTerms (one-positive's second pass, which starts each row from its LSE^N). */
template <typename T, typename Statistics>
__device__ __forceinline__ void forward_pass(const SupconForwardParams& f, ForwardShared& shared) {
    const SupconProblem& p = f.problem;
    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const int ty = threadIdx.x / kThreadGridCols;
    const int tx = threadIdx.x % kThreadGridCols;
    const uint32_t first_anchor = f.anchor_begin + blockIdx.x * kTileRows;
    const int anchor_count = rows_in_tile(first_anchor, f.anchor_end);
    const TileRows& anchor_rows = shared.anchor_rows;

    describe_rows(shared.anchor_rows, first_anchor, anchor_count, p);
    Statistics stats[kMicroRows];
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m) {
        const int r = ty + kThreadGridRows * m;
        start_anchor(stats[m], first_anchor + (r < anchor_count ? r : 0), f);
    }

    const TileRange tiles = column_share(f);
    int parity = 0;
    for (uint32_t first_contrast = tiles.begin * kTileCols; first_contrast < tiles.end * kTileCols;
         first_contrast += kTileCols, parity ^= 1) {
        const int contrast_count = rows_in_tile(first_contrast, p.rows);
        const TileRows& contrasts = shared.contrast_rows[parity];
        describe_rows(shared.contrast_rows[parity], first_contrast, contrast_count, p);
        __syncthreads();
        float acc[kMicroRows][kMicroCols];
        dot_tile(acc, shared.stage, features, anchor_rows, anchor_count, contrasts, contrast_count, p.dim);
#pragma unroll
        for (int m = 0; m < kMicroRows; ++m) {
            const int r = ty + kThreadGridRows * m;
            if (r >= anchor_count) continue;
            float s[kMicroCols];
            float weight[kMicroCols];
            bool denominator[kMicroCols];
#pragma unroll
            for (int n = 0; n < kMicroCols; ++n) {
                const int c = tx + kThreadGridCols * n;
                const bool valid = c < contrast_count && first_contrast + c != first_anchor + r;
                /* Rounded on its own, never fused into a later subtraction: the backward kernel
                 * forms the same logit the same way (see "Exact cancellations"). */
                s[n] = __fmul_rn(acc[m][n], p.inv_temperature);
                weight[n] = valid ? pair_weight(p, anchor_rows, r, contrasts, c) : 0.0f;
                denominator[n] = valid && in_denominator(p, weight[n]);
            }
            accumulate_row(stats[m], s, weight, denominator, p);
        }
    }

    /* dot_tile ended with a barrier: the stage memory is free for the partial statistics. */
    auto& partial = partials_of(shared, stats[0]);
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m) partial[ty + kThreadGridRows * m][tx] = stats[m];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < anchor_count) {
        publish_anchor(merge_parts(partial[threadIdx.x]), first_anchor + threadIdx.x, f);
    }
}

template <typename T, typename Statistics>
__device__ __forceinline__ void forward_kernel(const SupconForwardParams& f) {
    __shared__ ForwardShared shared;
    forward_pass<T, Statistics>(f, shared);
}

} // namespace
} // namespace supcon

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_forward_f32(const SupconForwardParams params) {
    supcon::forward_kernel<float, supcon::RowStatistics>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_forward_f16(const SupconForwardParams params) {
    supcon::forward_kernel<__half, supcon::RowStatistics>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_forward_bf16(const SupconForwardParams params) {
    supcon::forward_kernel<__nv_bfloat16, supcon::RowStatistics>(params);
}

/* One positive's second pass (see "One positive" above). */
extern "C" __global__ void __launch_bounds__(supcon::kThreads)
    supcon_forward_positive_terms_f32(const SupconForwardParams params) {
    supcon::forward_kernel<float, supcon::PositiveTerms>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads)
    supcon_forward_positive_terms_f16(const SupconForwardParams params) {
    supcon::forward_kernel<__half, supcon::PositiveTerms>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads)
    supcon_forward_positive_terms_bf16(const SupconForwardParams params) {
    supcon::forward_kernel<__nv_bfloat16, supcon::PositiveTerms>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kMergeThreads) supcon_forward_merge(const SupconForwardParams f) {
    const uint32_t anchor = f.anchor_begin + blockIdx.x * supcon::kMergeThreads + threadIdx.x;
    if (anchor >= f.anchor_end) return;
    const supcon::RowStatistics* partials = reinterpret_cast<const supcon::RowStatistics*>(f.partials);
    supcon::RowStatistics s = partials[anchor];
    for (uint32_t share = 1; share < f.column_splits; ++share) {
        supcon::merge_into(s, partials[static_cast<uint64_t>(share) * f.problem.anchors + anchor]);
    }
    supcon::write_anchor(s, anchor, f);
}

extern "C" __global__ void __launch_bounds__(supcon::kFinalizeThreads)
    supcon_forward_finalize(const SupconFinalizeParams params) {
    constexpr int kWarps = supcon::kFinalizeThreads / 32;
    __shared__ double warp_loss[kWarps];
    __shared__ uint32_t warp_without_positive[kWarps];

    const float* anchor_loss = reinterpret_cast<const float*>(params.anchor_loss);
    const float* positive_weight = reinterpret_cast<const float*>(params.positive_weight);
    double loss = 0.0;
    uint32_t without_positive = 0;
    for (uint32_t a = threadIdx.x; a < params.reduction.anchors; a += supcon::kFinalizeThreads) {
        loss += anchor_loss[a];
        without_positive += positive_weight[a] > 0.0f ? 0u : 1u;
    }
    for (int lanes = 16; lanes > 0; lanes /= 2) {
        loss += __shfl_xor_sync(0xffffffffu, loss, lanes);
        without_positive += __shfl_xor_sync(0xffffffffu, without_positive, lanes);
    }
    if (threadIdx.x % 32 == 0) {
        warp_loss[threadIdx.x / 32] = loss;
        warp_without_positive[threadIdx.x / 32] = without_positive;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        uint32_t without = 0;
        for (int w = 0; w < kWarps; ++w) {
            total += warp_loss[w];
            without += warp_without_positive[w];
        }
        /* Sum and none divide by 1, exactly. */
        *reinterpret_cast<double*>(params.reduced_loss) = total / supcon::mean_denominator(params.reduction, without);
        *reinterpret_cast<uint32_t*>(params.anchors_without_positives) = without;
    }
}
