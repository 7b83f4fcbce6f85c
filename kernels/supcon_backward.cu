/*
 * SupCon backward pass: dL/dZ from Z and the saved O(R) per-anchor statistics, without the
 * N x N matrices.
 *
 * The math (docs/math.md). With q_ij = e^{s_ij - LSE_i} and r_ij = w_ij e^{s_ij - LSE^P_i},
 * computed as (w_ij / W_i) e^{s_ij - (LSE^P_i - log W_i)} from the forward kernel's scaled
 * statistic (see "Exact cancellations" in supcon_forward.cu; w_ij / P_i is likewise a division):
 *     G_ij = dL/ds_ij = coef_i (q_ij [j in D_i] - w_ij / P_i)     (summation outside)
 *                     = coef_i (q_ij [j in D_i] - r_ij)           (summation inside)
 * where coef_i = c u_i / R' [P_i > 0] [D_i non-empty] (u: upstream gradient) is precomputed, on the
 * host or by supcon_backward_coefficients, and G_ij = 0 for rows i that are not anchors.
 * As s_kj = s_jk = z_k . z_j / tau,
 *     dL/dz_k = (1/tau) sum_j H_kj z_j,    H_kj = G_kj + G_jk,
 * which covers contrast mode all and one (G_jk = 0 when j is no anchor) and asymmetric masks
 * (G_jk uses w_jk = mask[b_j, b_k]).
 *
 * supcon_backward_{f32,f16,bf16}: grid (ceil(N / 64), ceil(D / 128)) blocks of 128 threads.
 * Block (x, y) owns gradient rows 64x .. 64x + 63 and feature columns 128y .. 128y + 127 and keeps
 * that 64 x 128 slab of dZ in registers (8 x 8 per thread) for the whole pass: every gradient
 * element is written once, by one thread, after a fixed-order sum: no atomics, deterministic.
 * For each column tile of 64 contrast rows j:
 *     1. the S tile from shared stages of Z (supcon_common.cuh), 8 x 4 logits per thread;
 *     2. the H tile (both terms; weights from labels / sample / mask inside the tile) into
 *        shared memory;
 *     3. slab += H tile x Z[tile rows, slab columns], Z staged through shared memory 32 rows
 *        at a time.
 * With contrast mode one, tiles where neither side holds an anchor are zero and skipped.
 *
 * Fused normalisation (docs/math.md): Z is u = x r, r = 1/max(|x|, eps) per row, applied on load
 * (supcon_common.cuh), and the gradient with respect to x is
 *     dL/dx_k = r_k (g_k - u_k (u_k . g_k)),   g_k = dL/du_k = (1/tau) sum_j H_kj u_j,
 * or r_k g_k where |x_k| < eps (the clamp passes no gradient to the norm). The projection needs
 * u_k . g_k = (1/tau) sum_j H_kj (u_k . u_j) = sum_j H_kj s_kj, which step 2 accumulates beside
 * H from the logits it already holds; the 16 threads of a row add their shares (an xor
 * butterfly: IEEE addition commutes, so all 16 get the same bits), and every block has all of
 * it, whatever its feature columns. The epilogue reads x_k again for its own columns. No pass
 * over memory beyond the row scales (supcon_normalize.cu) is added.
 *
 * supcon_backward_coefficients: grid ceil(R / 256) blocks of 256 threads, one anchor each. It
 * computes coef_i on the device from the forward's statistics and its count of anchors without
 * positives (R' as supcon_forward_finalize finds it), so that a backward pass queued after a
 * forward pass needs nothing from the host. The arithmetic is the host's, in double, in the same
 * order ((c / R') * u_i, then rounded to float): both give the same bits.
 *
 * Cost: 2 N^2 D flops for the products with Z plus 2 N^2 D per column chunk for recomputing S
 * (one chunk for D <= 128), ~2 exponentials per logit (one per anchor side). Memory traffic:
 * per column tile 2 x 64 x D elements for S and 64 x min(D, 128) for step 3, mostly L2 hits;
 * the gradient (f32) is written once.
 */
#include "supcon_statistics.cuh"

namespace supcon {
/* Internal linkage: in the host emulation the __shared__ variables below become function-local
 * statics, and only statics outside COMDAT groups get AddressSanitizer redzones. */
namespace {

/* Rows of Z staged per step of the H x Z product. */
constexpr int kGradStageRows = 32;
/* Gradient columns per thread: thread column tx owns columns tx + 16n. */
constexpr int kGradMicroCols = kGradChunk / kThreadGridCols;

static_assert(kTileCols % kGradStageRows == 0, "whole stages per column tile");
static_assert(kGradStageRows * kGradChunk % kThreads == 0, "the Z stage loader covers the stage in whole passes");

template <typename T>
__device__ __forceinline__ void backward(const SupconBackwardParams& b) {
    const SupconProblem& p = b.problem;
    /* The S stages and the Z stages of step 3 are never live at the same time. */
    union BackwardShared {
        StageTiles stage;
        float contrast_features[kGradStageRows][kGradChunk];
    };
    __shared__ BackwardShared shared;
    __shared__ float h_tile[kTileRows][kTileCols + 1];
    __shared__ TileRows own_rows;
    __shared__ TileRows contrast_rows;
    __shared__ TileStatistics own_stats;
    __shared__ TileStatistics contrast_stats;

    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const int ty = threadIdx.x / kThreadGridCols;
    const int tx = threadIdx.x % kThreadGridCols;
    const uint32_t first_row = b.grad_begin + blockIdx.x * kTileRows;
    const int own_count = rows_in_tile(first_row, b.grad_end);
    const uint32_t first_column = blockIdx.y * kGradChunk;

    describe_rows(own_rows, first_row, own_count, p);
    load_statistics(own_stats, first_row, own_count, b);

    float grad[kMicroRows][kGradMicroCols];
    /* This thread's share of sum_j H_kj s_kj per own row (see "Fused normalisation"). */
    float along[kMicroRows];
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m) {
        along[m] = 0.0f;
#pragma unroll
        for (int n = 0; n < kGradMicroCols; ++n) grad[m][n] = 0.0f;
    }

    for (uint32_t first_contrast = 0; first_contrast < p.rows; first_contrast += kTileCols) {
        /* Anchors are rows 0..R-1: from here on neither side has one, so H is zero. */
        if (first_row >= p.anchors && first_contrast >= p.anchors) break;
        const int contrast_count = rows_in_tile(first_contrast, p.rows);
        describe_rows(contrast_rows, first_contrast, contrast_count, p);
        load_statistics(contrast_stats, first_contrast, contrast_count, b);
        __syncthreads();

        float acc[kMicroRows][kMicroCols];
        dot_tile(acc, shared.stage, features, own_rows, own_count, contrast_rows, contrast_count, p.dim);
#pragma unroll
        for (int m = 0; m < kMicroRows; ++m) {
            const int r = ty + kThreadGridRows * m;
#pragma unroll
            for (int n = 0; n < kMicroCols; ++n) {
                const int c = tx + kThreadGridCols * n;
                float h = 0.0f;
                if (r < own_count && c < contrast_count && first_row + r != first_contrast + c) {
                    /* As the forward kernel forms it: rounded, never fused (ptxas would contract
                     * it into the subtractions below). */
                    const float s = __fmul_rn(acc[m][n], p.inv_temperature);
                    if (own_stats.coef[r] != 0.0f) {
                        const float w = pair_weight(p, own_rows, r, contrast_rows, c);
                        h = own_stats.coef[r] * logit_gradient(p, own_stats, r, s, w);
                    }
                    if (contrast_stats.coef[c] != 0.0f) {
                        const float w = pair_weight(p, contrast_rows, c, own_rows, r);
                        h = fmaf(contrast_stats.coef[c], logit_gradient(p, contrast_stats, c, s, w), h);
                    }
                    along[m] = fmaf(h, s, along[m]);
                }
                h_tile[r][c] = h;
            }
        }
        __syncthreads();

        for (int stage_row = 0; stage_row < kTileCols; stage_row += kGradStageRows) {
            for (int e = threadIdx.x; e < kGradStageRows * kGradChunk; e += kThreads) {
                const int j = e / kGradChunk;
                const uint32_t column = first_column + e % kGradChunk;
                shared.contrast_features[j][e % kGradChunk] =
                    (stage_row + j < contrast_count && column < p.dim)
                        ? load_as_float(features + contrast_rows.offset[stage_row + j] + column) *
                              contrast_rows.scale[stage_row + j]
                        : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int j = 0; j < kGradStageRows; ++j) {
                float h[kMicroRows];
                float z[kGradMicroCols];
#pragma unroll
                for (int m = 0; m < kMicroRows; ++m) h[m] = h_tile[ty + kThreadGridRows * m][stage_row + j];
#pragma unroll
                for (int n = 0; n < kGradMicroCols; ++n) z[n] = shared.contrast_features[j][tx + kThreadGridCols * n];
#pragma unroll
                for (int m = 0; m < kMicroRows; ++m)
#pragma unroll
                    for (int n = 0; n < kGradMicroCols; ++n) grad[m][n] = fmaf(h[m], z[n], grad[m][n]);
            }
            __syncthreads();
        }
    }

    const bool normalized = p.row_scales != 0;
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m)
        for (int lanes = kThreadGridCols / 2; lanes > 0; lanes /= 2) {
            along[m] += __shfl_xor_sync(0xffffffffu, along[m], lanes);
        }
    float* grad_features = reinterpret_cast<float*>(b.grad_features);
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m) {
        const int r = ty + kThreadGridRows * m;
        if (r >= own_count) continue;
        /* r_k, and whether the projection applies (row_scales is negative under the clamp). */
        const float scale = own_rows.scale[r];
        const bool project =
            normalized && reinterpret_cast<const float*>(p.row_scales)[first_row + r] > 0.0f;
#pragma unroll
        for (int n = 0; n < kGradMicroCols; ++n) {
            const uint32_t column = first_column + tx + kThreadGridCols * n;
            if (column >= p.dim) continue;
            const uint64_t at = own_rows.offset[r] + column;
            const float g = grad[m][n] * p.inv_temperature;
            float dx = g;
            if (normalized) {
                const float u = load_as_float(features + at) * scale;
                dx = scale * (project ? g - u * along[m] : g);
            }
            grad_features[at] = dx;
        }
    }
}

} // namespace
} // namespace supcon

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_backward_f32(const SupconBackwardParams params) {
    supcon::backward<float>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_backward_f16(const SupconBackwardParams params) {
    supcon::backward<__half>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kThreads) supcon_backward_bf16(const SupconBackwardParams params) {
    supcon::backward<__nv_bfloat16>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kCoefficientThreads)
    supcon_backward_coefficients(const SupconCoefficientParams params) {
    const uint32_t anchor = blockIdx.x * supcon::kCoefficientThreads + threadIdx.x;
    if (anchor >= params.reduction.anchors) return;
    const double mean_denominator = supcon::mean_denominator(
        params.reduction, *reinterpret_cast<const uint32_t*>(params.anchors_without_positives));
    const double upstream = params.upstream != 0 ? reinterpret_cast<const double*>(params.upstream)[anchor]
                                                 : params.upstream_scalar;
    const float positive_weight = reinterpret_cast<const float*>(params.positive_weight)[anchor];
    const float lse = reinterpret_cast<const float*>(params.lse)[anchor];
    /* A NaN LSE (NaN features on the device API) keeps its coefficient, so that the NaN reaches
     * the gradient too. */
    const bool depends_on_logits = positive_weight > 0.0f && !(lse == -INFINITY);
    reinterpret_cast<float*>(params.grad_coef)[anchor] =
        depends_on_logits ? static_cast<float>(params.loss_scale / mean_denominator * upstream) : 0.0f;
}
