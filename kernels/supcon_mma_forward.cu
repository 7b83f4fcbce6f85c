/*
 * SupCon forward pass on tensor cores (sm_80+): per-anchor statistics and losses from f16, bf16
 * or split f32 features, the same outputs as supcon_forward.cu (whose header has the math; the
 * finalisation kernel there reduces these outputs too).
 *
 * supcon_mma_forward_{f16,bf16,f32x3}: grid = ceil(R / 64) x column_splits blocks of 128 threads
 * (4 warps) and 3 x 64 x (padded D + 8) elements of dynamic shared memory (twice that for f32x3,
 * whose rows are held as bf16 hi and lo parts: supcon_mma_tiles.cuh). Block (b, y) owns anchors
 * 64b .. 64b + 63 and streams share y of the N contrast rows past them (supcon_mma_tiles.cuh:
 * own rows resident, contrast tiles double-buffered with cp.async; supcon_forward.cu's "Column
 * split" for the shares and their merge). Per tile a warp forms its 16 x 64 logits with
 * mma.sync m16n8k16 (products exact, f32 accumulation), scales them by 1/tau (rounded on its
 * own, as the backward kernel forms them), and each thread folds its 2 rows x 16 columns into
 * running statistics of its two anchors. Two epilogues:
 *
 *   - class softmax, for positives from labels or SimCLR with every pair in the denominator
 *     (the paper's loss, L_out or L_in): w_ij = [class_i = class_j] in {0, 1}, so a logit needs
 *     no weight. One exponential per logit, e = 2^((s - max) log2 e) on the MUFU pipe, feeds the
 *     denominator's sum and, under a class compare, the positives' sum (the same e, relative to
 *     the same running max), their count P and their logit sum T. Tiles that are full and hold
 *     no self pair skip the validity tests. ~13 instructions per logit (scripts/sass-check.sh
 *     and docs/kernel-model.md);
 *   - weighted, for a mask, label sets, a cap or the other denominators: the online
 *     log-sum-exp over D_i, the weighted positive log-sum-exp, P, W and T
 *     (supcon_statistics.cuh, as the SIMT kernel does), ~46 instructions per logit. One
 *     positive's second pass (supcon_forward.cu) runs the same sweep into PositiveTerms.
 *
 * A positives' sum kept relative to the row's maximum underflows when every positive lies far
 * below it (|z|^2 / tau beyond ~60: huge norms or a tiny tau). Such a thread flags its row, and
 * a block with a flagged row sweeps the tiles again with the weighted epilogue, which keeps the
 * positives' own maximum: exact in every case, and free where the flag is never raised.
 *
 * After the last tile the 4 threads of a quad that share an anchor row publish their partials to
 * shared memory and one thread per anchor merges them in order and writes the anchor's outputs
 * (or, with the columns split, its share's statistics): no atomics, the same bits on every run.
 *
 * Per-class sums of Z (the CPU dense path's T and P in O(N D)) would save 4 of the 13
 * instructions but not the class compare, which the saved LSE of the positives needs anyway, and
 * they need the labels grouped by class on the device: not worth a sort.
 *
 * Cost: 2 R N D flops on the tensor cores plus 1 exponential and ~12 other instructions per logit
 * (class softmax); traffic: each block reads its 64 rows once and all N rows once (R N D / 32
 * elements over the launch, mostly L2 hits).
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
/* The class epilogue keeps a thread's positives relative to the row's maximum while their own
 * maximum lies within this of it: their largest term is then >= e^-64 (a normal float) and the
 * terms lost to underflow (< 2^-126) are below 2^-34 of it. */
constexpr float kPositiveRange = 64.0f;

/* One anchor row's running statistics under a class relation with every pair in the
 * denominator (the class softmax epilogue). */
struct ClassRowStatistics {
    float max;            /* running max of s over j != i (-inf: none yet) */
    float sum;            /* sum_j e^(s_ij - max) */
    float positive_sum;   /* sum over positives of e^(s_ij - max): the same terms */
    float positive_max;   /* max of s over positives (-inf: none yet) */
    float positives;      /* P_i, their count */
    float positive_logit; /* T_i = sum over positives of s_ij */
};

/* Moves `stats` to the running maximum of a tile row's logits (this thread's columns; excluded
 * ones are -inf), rescaling both sums, and returns the shift for the row's exponentials: while
 * no logit has been seen, -inf - -inf would be NaN, so the shift is 0 then (a NaN logit still
 * makes its sum NaN, as in the weighted epilogue). */
__device__ __forceinline__ float rescale_to_tile(ClassRowStatistics& stats, const float (&s)[kThreadCols]) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kThreadCols; ++n) tile_max = fmaxf(tile_max, s[n]);
    if (tile_max > stats.max) {
        const float scale = exp_approx(stats.max - tile_max);
        stats.sum *= scale;
        stats.positive_sum *= scale;
        stats.max = tile_max;
    }
    return stats.max == -INFINITY ? 0.0f : stats.max;
}

/* Folds logit s (shifted by `max`) into `stats`, as a positive if `positive`. */
__device__ __forceinline__ void accumulate_class_logit(ClassRowStatistics& stats, float s, float max, bool positive) {
    const float e = exp_approx(s - max);
    stats.sum += e;
    if (positive) {
        stats.positive_sum += e;
        stats.positives += 1.0f;
        stats.positive_logit += s;
        stats.positive_max = fmaxf(stats.positive_max, s);
    }
}

/* Whether `stats` lost its positives to underflow (see kPositiveRange). */
__device__ __forceinline__ bool needs_weighted_sweep(const ClassRowStatistics& stats) {
    return stats.positives > 0.0f && !(stats.positive_max >= stats.max - kPositiveRange);
}

/* The same statistics in the weighted epilogue's terms (W_i = 1 with a positive). */
__device__ __forceinline__ RowStatistics as_row_statistics(const ClassRowStatistics& stats) {
    const bool has_positive = stats.positives > 0.0f;
    return {stats.max,
            stats.sum,
            has_positive ? stats.positive_max : -INFINITY,
            has_positive ? stats.positive_sum * expf(stats.max - stats.positive_max) : 0.0f,
            stats.positives,
            has_positive ? 1.0f : 0.0f,
            stats.positive_logit};
}

/* The class softmax epilogue of one tile for this thread's two anchor rows: the logits and
 * their maxima first, then one pass that takes each column's class once for both rows.
 * kInterior: every column exists and none is a self pair (no validity tests). Rows past the
 * block's anchors are computed too (on zero rows) and never published. */
template <bool kInterior>
__device__ __forceinline__ void class_epilogue(ClassRowStatistics (&stats)[2], const float (&acc)[kColTiles][4],
                                               const TileRows& anchors, const TileRows& contrasts,
                                               uint32_t first_anchor, uint32_t first_contrast, int contrast_count,
                                               const SupconProblem& p) {
    const FragmentLane lane;
    const auto valid = [&](int h, int c) {
        return kInterior || (c < contrast_count && first_contrast + c != first_anchor + lane.row[h]);
    };
    float s[2][kThreadCols];
    float max[2];
    int64_t own_class[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                /* Rounded on its own, never fused into a later subtraction: the backward kernel
                 * forms the same logit the same way. */
                const float logit = __fmul_rn(acc[n][2 * h + e], p.inv_temperature);
                s[h][2 * n + e] = valid(h, 8 * n + 2 * lane.quad + e) ? logit : -INFINITY;
            }
        }
        max[h] = rescale_to_tile(stats[h], s[h]);
        own_class[h] = anchors.positive_class[lane.row[h]];
    }
#pragma unroll
    for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = 8 * n + 2 * lane.quad + e;
            const int64_t contrast_class = contrasts.positive_class[c];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const bool positive = own_class[h] == contrast_class && valid(h, c);
                accumulate_class_logit(stats[h], s[h][2 * n + e], max[h], positive);
            }
        }
    }
}

/* The shared state of a block's sweeps. Row descriptions rotate over three slots: slot
 * (t + 1) % 3 is written during tile t, and was last read by the epilogue of tile t - 2, which
 * every thread left before the barriers of tile t - 1. */
struct SweepShared {
    TileRows anchor_rows;
    TileRows contrast_rows[3];
};

/* Streams contrast tiles `tiles` past the block's anchors (first_anchor, anchor_count of them)
 * and folds the logits into `stats` (kClass: the class softmax epilogue, ClassRowStatistics;
 * else the weighted one, RowStatistics). Pipeline stage and description slot of tile t are
 * indexed by its position k in the range. */
template <typename T, bool kClass, typename Statistics>
__device__ __forceinline__ void sweep(Statistics (&stats)[2], SweepShared& rows, const SharedRows<T>& shared,
                                      uint32_t first_anchor, int anchor_count, TileRange tiles,
                                      const SupconProblem& p) {
    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const FragmentLane lane;
    const uint32_t count = tiles.end - tiles.begin;
    const uint32_t first = tiles.begin * kCols;

    describe_rows(rows.anchor_rows, first_anchor, anchor_count, p);
    describe_rows(rows.contrast_rows[0], first, rows_in_tile(first, p.rows), p);
    load_rows(shared, 0, features, first_anchor, anchor_count, p);
    load_rows(shared, 1, features, first, rows_in_tile(first, p.rows), p);
    cp_async_commit();

    for (uint32_t k = 0; k < count; ++k) {
        if (k + 1 < count) {
            const uint32_t next = (tiles.begin + k + 1) * kCols;
            describe_rows(rows.contrast_rows[(k + 1) % 3], next, rows_in_tile(next, p.rows), p);
            load_rows(shared, 1 + (k + 1) % 2, features, next, rows_in_tile(next, p.rows), p);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        float acc[kColTiles][4];
        multiply_tile(acc, shared, k % 2, p.dim);
        __syncthreads();

        const uint32_t first_contrast = (tiles.begin + k) * kCols;
        const int contrast_count = rows_in_tile(first_contrast, p.rows);
        const TileRows& contrasts = rows.contrast_rows[k % 3];
        /* Every column exists and none is one of the block's anchors: no validity tests. */
        const bool interior = contrast_count == kCols &&
                              (first_contrast >= first_anchor + anchor_count || first_contrast + kCols <= first_anchor);
        if constexpr (kClass) {
            if (interior) {
                class_epilogue<true>(stats, acc, rows.anchor_rows, contrasts, first_anchor, first_contrast, contrast_count, p);
            } else {
                class_epilogue<false>(stats, acc, rows.anchor_rows, contrasts, first_anchor, first_contrast, contrast_count, p);
            }
        } else {
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
                        /* Rounded on its own, never fused into a later subtraction: the
                         * backward kernel forms the same logit the same way. */
                        s[q] = __fmul_rn(acc[n][2 * h + e], p.inv_temperature);
                        weight[q] = valid ? pair_weight(p, rows.anchor_rows, r, contrasts, c) : 0.0f;
                        denominator[q] = valid && in_denominator(p, weight[q]);
                    }
                }
                accumulate_row(stats[h], s, weight, denominator, p);
            }
        }
    }
}

/* The weighted sweep of the block, its partials published to `partial`. */
template <typename T>
__device__ __forceinline__ void weighted_sweep(RowStatistics (&partial)[kRows][kRowParts], SweepShared& rows,
                                               const SharedRows<T>& shared, uint32_t first_anchor, int anchor_count,
                                               TileRange tiles, const SupconProblem& p) {
    const FragmentLane lane;
    RowStatistics stats[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) stats[h] = {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
    sweep<T, false>(stats, rows, shared, first_anchor, anchor_count, tiles, p);
#pragma unroll
    for (int h = 0; h < 2; ++h) partial[lane.row[h]][lane.quad] = stats[h];
}

template <typename T>
__device__ __forceinline__ void forward(const SupconForwardParams& f) {
    const SupconProblem& p = f.problem;
    __shared__ SweepShared rows;
    __shared__ RowStatistics partial[kRows][kRowParts];
    __shared__ bool flagged[kRows][kRowParts];

    const SharedRows<T> shared(p);
    const FragmentLane lane;
    const uint32_t first_anchor = f.anchor_begin + blockIdx.x * kRows;
    const int anchor_count = rows_in_tile(first_anchor, f.anchor_end);
    const TileRange tiles = column_share(f);

    if (positives_are_classes(p) && p.denominator == SUPCON_DENOMINATOR_ALL) {
        ClassRowStatistics stats[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) stats[h] = {-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f, 0.0f};
        sweep<T, true>(stats, rows, shared, first_anchor, anchor_count, tiles, p);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            partial[lane.row[h]][lane.quad] = as_row_statistics(stats[h]);
            flagged[lane.row[h]][lane.quad] = lane.row[h] < anchor_count && needs_weighted_sweep(stats[h]);
        }
        __syncthreads();
        bool any_flagged = false;
        for (int r = 0; r < kRows; ++r) {
            for (int q = 0; q < kRowParts; ++q) any_flagged = any_flagged || flagged[r][q];
        }
        if (any_flagged) { /* the same decision in every thread */
            __syncthreads(); /* every thread has read the flags */
            weighted_sweep(partial, rows, shared, first_anchor, anchor_count, tiles, p);
        }
    } else {
        weighted_sweep(partial, rows, shared, first_anchor, anchor_count, tiles, p);
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < anchor_count) {
        publish_anchor(merge_parts(partial[threadIdx.x]), first_anchor + threadIdx.x, f);
    }
}

/* One positive's second pass (supcon_forward.cu, "One positive"): the positives of each anchor
 * against its LSE^N_i, in the weighted sweep, unsplit. */
template <typename T>
__device__ __forceinline__ void forward_positive_terms(const SupconForwardParams& f) {
    const SupconProblem& p = f.problem;
    __shared__ SweepShared rows;
    __shared__ PositiveTerms partial[kRows][kRowParts];

    const SharedRows<T> shared(p);
    const FragmentLane lane;
    const uint32_t first_anchor = f.anchor_begin + blockIdx.x * kRows;
    const int anchor_count = rows_in_tile(first_anchor, f.anchor_end);

    PositiveTerms terms[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        start_anchor(terms[h], first_anchor + (lane.row[h] < anchor_count ? lane.row[h] : 0), f);
    }
    sweep<T, false>(terms, rows, shared, first_anchor, anchor_count, column_share(f), p);
#pragma unroll
    for (int h = 0; h < 2; ++h) partial[lane.row[h]][lane.quad] = terms[h];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < anchor_count) {
        publish_anchor(merge_parts(partial[threadIdx.x]), first_anchor + threadIdx.x, f);
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

/* minBlocksPerSM = 1: without it ptxas caps the f32x3 instance at 96 registers on sm_80 and
 * spills. */
extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads, 1)
    supcon_mma_forward_positive_terms_f32x3(const SupconForwardParams params) {
    supcon::tc::forward_positive_terms<float>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads, 1)
    supcon_mma_forward_positive_terms_f16(const SupconForwardParams params) {
    supcon::tc::forward_positive_terms<__half>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads, 1)
    supcon_mma_forward_positive_terms_bf16(const SupconForwardParams params) {
    supcon::tc::forward_positive_terms<__nv_bfloat16>(params);
}
