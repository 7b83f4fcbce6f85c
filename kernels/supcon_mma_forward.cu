/*
 * SupCon forward pass on tensor cores (sm_80+): per-anchor statistics and losses from f16, bf16
 * or split f32 features, the same outputs as supcon_forward.cu (whose header has the math; the
 * finalisation kernel there reduces these outputs too).
 *
 * supcon_mma_forward_{f16,bf16,f32x3}: grid = ceil(R / 64) blocks of 128 threads (4 warps) and
 * 3 x 64 x (padded D + 8) elements of dynamic shared memory (twice that for f32x3, whose rows
 * are held as bf16 hi and lo parts: supcon_mma_tiles.cuh). Block b owns anchors 64b .. 64b + 63
 * and streams all N contrast rows past them (supcon_mma_tiles.cuh: own rows resident, contrast
 * tiles double-buffered with cp.async). Per tile a warp forms its 16 x 64 logits with
 * mma.sync m16n8k16 (products exact, f32 accumulation), scales them by 1/tau (rounded on its
 * own, as the backward kernel forms them), and each thread folds its 2 rows x 16 columns into
 * running statistics of its two anchors: the online log-sum-exp over D_i, the weighted positive
 * log-sum-exp, P, W and T (supcon_statistics.cuh, as the SIMT kernel does). After the last tile
 * the 4 threads of a quad that share an anchor row publish their partials to shared memory and
 * one thread per anchor merges them in order and writes the anchor's outputs: no atomics, the
 * same bits on every run.
 *
 * Cost: 2 R N D flops on the tensor cores plus ~1 exponential per logit (2 for positives) and
 * ~20 other instructions per logit in the epilogue; traffic: each block reads its 64 rows once
 * and all N rows once (R N D / 32 elements over the launch, mostly L2 hits).
 */
#include "supcon_mma_tiles.cuh"
#include "supcon_statistics.cuh"

namespace supcon {
namespace tc {
/* Internal linkage: in the host emulation the __shared__ variables below become function-local
 * statics, and only statics outside COMDAT groups get AddressSanitizer redzones. */
namespace {

/* Contrast columns a thread sees per tile row: two per n-tile. */
constexpr int kThreadCols = 2 * kColTiles;
/* Threads sharing an anchor row (a quad). */
constexpr int kRowParts = 4;

template <typename T>
__device__ __forceinline__ void forward(const SupconForwardParams& f) {
    const SupconProblem& p = f.problem;
    /* Row descriptions rotate over three slots: slot (t + 1) % 3 is written during tile t, and
     * was last read by the epilogue of tile t - 2, which every thread left before the barriers
     * of tile t - 1. */
    __shared__ TileRows anchor_rows;
    __shared__ TileRows contrast_rows[3];
    __shared__ RowStatistics partial[kRows][kRowParts];

    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const SharedRows<T> shared(p);
    const FragmentLane lane;
    const uint32_t first_anchor = f.anchor_begin + blockIdx.x * kRows;
    const int anchor_count = rows_in_tile(first_anchor, f.anchor_end);
    const uint32_t tiles = (p.rows + kCols - 1) / kCols;

    describe_rows(anchor_rows, first_anchor, anchor_count, p);
    describe_rows(contrast_rows[0], 0, rows_in_tile(0, p.rows), p);
    load_rows(shared, 0, features, first_anchor, anchor_count, p);
    load_rows(shared, 1, features, 0, rows_in_tile(0, p.rows), p);
    cp_async_commit();

    RowStatistics stats[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) stats[h] = {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};

    for (uint32_t t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) {
            const uint32_t next = (t + 1) * kCols;
            describe_rows(contrast_rows[(t + 1) % 3], next, rows_in_tile(next, p.rows), p);
            load_rows(shared, 1 + (t + 1) % 2, features, next, rows_in_tile(next, p.rows), p);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        float acc[kColTiles][4];
        multiply_tile(acc, shared, t % 2, p.dim);
        __syncthreads();

        const uint32_t first_contrast = t * kCols;
        const int contrast_count = rows_in_tile(first_contrast, p.rows);
        const TileRows& contrasts = contrast_rows[t % 3];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = lane.row[h];
            if (r >= anchor_count) continue;
            float s[kThreadCols];
            float weight[kThreadCols];
            bool denominator[kThreadCols];
#pragma unroll
            for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 8 * n + 2 * lane.quad + e;
                    const int q = 2 * n + e;
                    const bool valid = c < contrast_count && first_contrast + c != first_anchor + r;
                    /* Rounded on its own, never fused into a later subtraction: the backward
                     * kernel forms the same logit the same way. */
                    s[q] = __fmul_rn(acc[n][2 * h + e], p.inv_temperature);
                    weight[q] = valid ? pair_weight(p, anchor_rows, r, contrasts, c) : 0.0f;
                    denominator[q] = valid && in_denominator(p, weight[q]);
                }
            }
            accumulate_row(stats[h], s, weight, denominator);
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) partial[lane.row[h]][lane.quad] = stats[h];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < anchor_count) {
        finish_anchor(partial[threadIdx.x], first_anchor + threadIdx.x, f);
    }
}

} // namespace
} // namespace tc
} // namespace supcon

extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads) supcon_mma_forward_f32x3(const SupconForwardParams params) {
    supcon::tc::forward<float>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads) supcon_mma_forward_f16(const SupconForwardParams params) {
    supcon::tc::forward<__half>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads) supcon_mma_forward_bf16(const SupconForwardParams params) {
    supcon::tc::forward<__nv_bfloat16>(params);
}
