/*
 * SupCon backward pass on tensor cores (sm_80+): dL/dZ from f16, bf16 or split f32 features and
 * the saved per-anchor statistics, the same result as supcon_backward.cu (whose header has the
 * math):
 *     dL/dz_k = (1/tau) sum_j H_kj z_j,   H_kj = G_kj + G_jk.
 *
 * supcon_mma_backward_{f16,bf16,f32x3}: grid (ceil(N / 64), ceil(D / 128)) blocks of 128
 * threads (4 warps) with the forward kernel's dynamic shared memory; the _wide_ kernels, for
 * D > 128, take 256 columns per block (grid.y = ceil(D / 256)), so that S and H are formed once
 * per tile up to D = 256, not once per 128 columns. Block (x, y) owns gradient rows
 * 64x .. 64x + 63 (16 per warp) and a chunk of feature columns, and streams the contrast rows
 * past them as the forward kernel does (supcon_mma_tiles.cuh). Per tile a warp
 *     1. forms S for its 16 rows x 64 contrasts with mma.sync: the instruction sequence of the
 *        forward kernel, so the logits are the forward's bit for bit (a product is symmetric);
 *     2. turns each logit into H in f32, in registers (below);
 *     3. rounds H to bf16 and feeds it, still in registers, as the A operand of
 *        dZ[16 x 128] += H[16 x 64] Z_tile[64 x 128] (two adjacent n-tiles of the S accumulator
 *        are one k-step's A fragment, supcon_mma.cuh), with the tile's rows as a k-major B via
 *        ldmatrix.trans, f32 accumulators: 64 per thread (128 for the wide kernels).
 * Each gradient element is written once, by one thread: no atomics, deterministic.
 *
 * H in step 2, for positives from labels or SimCLR with every pair in the denominator and L_out
 * (the paper's loss): with L_k = LSE_k (hi + lo), a_k the row's coefficient and P_k its count of
 * positives, H_ij = a_i e^(s - L_i) + a_j e^(s - L_j) - [class_i = class_j] (a_i / P_i + a_j / P_j)
 *                = e^(s - M) (alpha_i + alpha_j) - [class_i = class_j] (beta_i + beta_j)
 * with M the largest LSE of the tile's active rows and columns, alpha_k = a_k e^(M - L_k) and
 * beta_k = a_k / P_k: one exponential per logit (2^((s - M) log2 e) on the MUFU pipe) and ~11
 * other instructions. The loaders precompute a_k e^(B - L_k) per half tile of 32 rows, B the
 * half's largest LSE, and every thread rescales by e^(M - B) once per tile. This holds while the
 * tile's active LSEs lie within kLseSpread of M: alpha_k <= a_k e^40 is finite, and e^(s - M)
 * underflows only for entries with p_ij < e^-47, which no f32 sum can see. Otherwise (a wider
 * spread, a NaN LSE), and for a mask, the only-negatives denominator or L_in, each logit takes
 * both terms from the saved statistics of both rows (supcon_statistics.cuh's logit_gradient:
 * two exponentials, ~95 instructions per logit).
 *
 * Precision: S is exact products with f32 sums, as in the forward kernel. H is rounded to bf16
 * (relative error <= 2^-9 per term; f16 would underflow, since H ~ 1/(R' N)); for f16 features
 * the tile's gradient columns are converted to bf16 in shared memory after step 1 (the mma
 * takes one type for both operands), another 2^-9 per term. docs/math.md derives the bound the
 * tests assert.
 *
 * Cost: 2 N^2 D flops for S per chunk of D (one chunk up to D = 256) and 2 N^2 D for H Z, on
 * the tensor cores; for H one exponential and ~11 other instructions per logit (the paper's
 * loss), two and ~90 otherwise. With contrast mode one, tiles where neither side holds an
 * anchor are skipped.
 */
#include <type_traits>

#include "supcon_mma_tiles.cuh"
#include "supcon_statistics.cuh"

namespace supcon {
namespace tc {
/* Internal linkage: in the host emulation the __shared__ variables below become function-local
 * statics, and only statics outside COMDAT groups get AddressSanitizer redzones. */
namespace {

/* Widest spread of a tile's active LSEs that takes one exponential per logit (see above). */
constexpr float kLseSpread = 40.0f;
/* Rows per half tile: one warp's loads, reduced with shuffles. */
constexpr int kHalfRows = 32;

/* The one-exponential terms of a tile's 64 rows (zeros for rows that are not active: past N,
 * not anchors, or with a vanishing coefficient). */
struct ClassTerms {
    float scaled[kRows]; /* a_k e^(B - L_k), B the half tile's base */
    float beta[kRows];   /* a_k / P_k */
    float base[2];       /* B: the half's largest active LSE (-inf: none) */
    float low[2];        /* the half's smallest active LSE (+inf: none; -inf: a NaN among them) */
};

/* Threads 0..63 (two whole warps) fill `terms` for rows first_row .. first_row + count - 1. The
 * caller synchronises before they are read. */
__device__ __forceinline__ void load_class_terms(ClassTerms& terms, uint32_t first_row, int count,
                                                 const SupconBackwardParams& b) {
    const int t = threadIdx.x;
    if (t >= kRows) return; /* whole warps: the shuffles below need every lane */
    const uint32_t row = first_row + t;
    float coef = 0.0f, lse = 0.0f, lse_lo = 0.0f, positives = 1.0f;
    if (t < count && row < b.problem.anchors) {
        coef = reinterpret_cast<const float*>(b.grad_coef)[row];
        lse = reinterpret_cast<const float*>(b.statistics.lse)[row];
        lse_lo = reinterpret_cast<const float*>(b.statistics.lse_lo)[row];
        positives = reinterpret_cast<const float*>(b.statistics.positive_weight)[row];
    }
    const bool active = coef != 0.0f;
    float base = active ? lse : -INFINITY;
    float low = active ? (lse == lse ? lse : -INFINITY) : INFINITY;
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes /= 2) {
        base = fmaxf(base, __shfl_xor_sync(0xffffffffu, base, lanes));
        low = fminf(low, __shfl_xor_sync(0xffffffffu, low, lanes));
    }
    terms.scaled[t] = active ? coef * expf((base - lse) - lse_lo) : 0.0f;
    terms.beta[t] = active ? coef / positives : 0.0f;
    if (t % kHalfRows == 0) {
        terms.base[t / kHalfRows] = base;
        terms.low[t / kHalfRows] = low;
    }
}

/* e^(M - B) for a half tile with base B (0 for a half without active rows, whose terms are 0). */
__device__ __forceinline__ float rescale(float shared_base, float base) {
    return base == -INFINITY ? 0.0f : expf(shared_base - base);
}

/* Rewrites columns [first, first + width) of the 64 rows of an f16 tile as bf16, in place. */
__device__ __forceinline__ void convert_to_bf16(__half* tile, uint32_t stride, uint32_t first, uint32_t width) {
    for (uint32_t e = threadIdx.x; e < kRows * width; e += kThreads) {
        const uint32_t r = e / width;
        __half* element = tile + r * stride + first + (e - r * width);
        const __nv_bfloat16 converted = __float2bfloat16_rn(__half2float(*element));
        memcpy(element, &converted, sizeof converted);
    }
}

template <typename T, int kGradCols>
__device__ __forceinline__ void backward(const SupconBackwardParams& b) {
    constexpr int kGradTiles = kGradCols / 8;
    const SupconProblem& p = b.problem;
    /* Descriptions and statistics of the contrast tiles rotate over three slots, as in the
     * forward kernel. */
    __shared__ TileRows own_rows;
    __shared__ TileStatistics own_stats;
    __shared__ TileRows contrast_rows[3];
    __shared__ TileStatistics contrast_stats[3];
    __shared__ ClassTerms own_terms;
    __shared__ ClassTerms contrast_terms[3];

    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const SharedRows<T> shared(p);
    const FragmentLane lane;
    const uint32_t first_row = b.grad_begin + blockIdx.x * kRows;
    const int own_count = rows_in_tile(first_row, b.grad_end);
    const uint32_t first_column = blockIdx.y * kGradCols;
    /* Columns of this chunk that the shared rows hold (whole 16-column pairs of n-tiles). */
    const uint32_t padded = padded_dim(p.dim);
    const uint32_t chunk_width = padded - first_column < kGradCols ? padded - first_column : kGradCols;
    /* Anchors are rows 0..R-1: once neither side has one, H is zero. */
    const uint32_t contrast_limit = first_row < p.anchors ? p.rows : p.anchors;
    const uint32_t tiles = (contrast_limit + kCols - 1) / kCols;
    /* The one-exponential form of H applies (tile by tile, see above). */
    const bool class_terms = positives_are_classes(p) && p.denominator == SUPCON_DENOMINATOR_ALL &&
                             p.summation == SUPCON_SUMMATION_OUTSIDE;

    describe_rows(own_rows, first_row, own_count, p);
    load_statistics(own_stats, first_row, own_count, b);
    describe_rows(contrast_rows[0], 0, rows_in_tile(0, p.rows), p);
    load_statistics(contrast_stats[0], 0, rows_in_tile(0, p.rows), b);
    if (class_terms) {
        load_class_terms(own_terms, first_row, own_count, b);
        load_class_terms(contrast_terms[0], 0, rows_in_tile(0, p.rows), b);
    }
    load_rows(shared, 0, features, first_row, own_count, p);
    load_rows(shared, 1, features, 0, rows_in_tile(0, p.rows), p);
    cp_async_commit();

    float grad[kGradTiles][4];
#pragma unroll
    for (int n = 0; n < kGradTiles; ++n) grad[n][0] = grad[n][1] = grad[n][2] = grad[n][3] = 0.0f;

    for (uint32_t t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) {
            const uint32_t next = (t + 1) * kCols;
            const int next_count = rows_in_tile(next, p.rows);
            describe_rows(contrast_rows[(t + 1) % 3], next, next_count, p);
            load_statistics(contrast_stats[(t + 1) % 3], next, next_count, b);
            if (class_terms) load_class_terms(contrast_terms[(t + 1) % 3], next, next_count, b);
            load_rows(shared, 1 + (t + 1) % 2, features, next, next_count, p);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        auto* tile = shared.contrast(t % 2);
        float acc[kColTiles][4];
        multiply_tile(acc, shared, t % 2, p.dim);

        const uint32_t first_contrast = t * kCols;
        const int contrast_count = rows_in_tile(first_contrast, p.rows);
        const TileRows& cols = contrast_rows[t % 3];
        const TileStatistics& col_stats = contrast_stats[t % 3];
        float h[kColTiles][4];
        float shared_base = -INFINITY;
        bool one_exponential = false;
        if (class_terms) {
            const ClassTerms& col_terms = contrast_terms[t % 3];
            shared_base = fmaxf(fmaxf(own_terms.base[0], own_terms.base[1]),
                                fmaxf(col_terms.base[0], col_terms.base[1]));
            const float low =
                fminf(fminf(own_terms.low[0], own_terms.low[1]), fminf(col_terms.low[0], col_terms.low[1]));
            one_exponential = low >= shared_base - kLseSpread;
        }
        if (one_exponential) {
            const ClassTerms& col_terms = contrast_terms[t % 3];
            /* A self pair's entry must be 0; columns past N multiply zero rows (and stay
             * finite: e <= 1), rows past the block's count are never written. */
            const bool diagonal = first_contrast < first_row + own_count && first_row < first_contrast + contrast_count;
            const float own_scale = rescale(shared_base, own_terms.base[lane.row[0] / kHalfRows]);
            /* Scalars, not an array: a not fully unrolled loop would index it in local memory. */
            const float low_scale = rescale(shared_base, col_terms.base[0]);
            const float high_scale = rescale(shared_base, col_terms.base[1]);
            float own_alpha[2], own_beta[2];
            int64_t own_class[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                own_alpha[i] = own_terms.scaled[lane.row[i]] * own_scale;
                own_beta[i] = own_terms.beta[lane.row[i]];
                own_class[i] = own_rows.positive_class[lane.row[i]];
            }
#pragma unroll
            for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 8 * n + 2 * lane.quad + e;
                    const float col_alpha = col_terms.scaled[c] * (c < kHalfRows ? low_scale : high_scale);
                    const float col_beta = col_terms.beta[c];
                    const int64_t col_class = cols.positive_class[c];
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const float s = __fmul_rn(acc[n][2 * i + e], p.inv_temperature);
                        /* s <= L_k of an active side, so s - M <= 0 up to rounding; the clamp
                         * keeps e finite where no side is active (their terms are 0). */
                        float entry = exp_approx(fminf(s - shared_base, 0.0f)) * (own_alpha[i] + col_alpha);
                        if (own_class[i] == col_class) entry -= own_beta[i] + col_beta;
                        if (diagonal && first_row + lane.row[i] == first_contrast + c) entry = 0.0f;
                        h[n][2 * i + e] = entry;
                    }
                }
            }
        } else {
#pragma unroll
            for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = lane.row[e / 2];
                    const int c = 8 * n + 2 * lane.quad + e % 2;
                    h[n][e] = 0.0f;
                    if (r < own_count && c < contrast_count && first_row + r != first_contrast + c) {
                        /* As the forward kernel forms it: rounded, never fused (ptxas would
                         * contract it into the subtractions below). */
                        const float s = __fmul_rn(acc[n][e], p.inv_temperature);
                        if (own_stats.coef[r] != 0.0f) {
                            const float w = pair_weight(p, own_rows, r, cols, c);
                            h[n][e] = own_stats.coef[r] * logit_gradient(p, own_stats, r, s, w);
                        }
                        if (col_stats.coef[c] != 0.0f) {
                            const float w = pair_weight(p, cols, c, own_rows, r);
                            h[n][e] = fmaf(col_stats.coef[c], logit_gradient(p, col_stats, c, s, w), h[n][e]);
                        }
                    }
                }
            }
        }
        if constexpr (Operand<T>::kParts == 2) {
            /* H Z = H_hi Z_hi + H_hi Z_lo + H_lo Z_hi (H_lo Z_lo, below 2^-16, dropped). */
            uint32_t h_hi[kTileSteps][4], h_lo[kTileSteps][4];
            pack_a_fragments_split(h_hi, h_lo, h);
            const auto* tile_lo = shared.contrast(t % 2, 1);
            multiply_h_tile(grad, h_hi, tile, shared.stride, first_column, chunk_width);
            multiply_h_tile(grad, h_hi, tile_lo, shared.stride, first_column, chunk_width);
            multiply_h_tile(grad, h_lo, tile, shared.stride, first_column, chunk_width);
        } else {
            uint32_t h_fragment[kTileSteps][4];
            pack_a_fragments(h_fragment, h);
            if constexpr (std::is_same_v<T, __half>) {
                __syncthreads(); /* every warp's S is done with the f16 values */
                convert_to_bf16(tile, shared.stride, first_column, chunk_width);
                __syncthreads();
            }
            multiply_h_tile(grad, h_fragment, tile, shared.stride, first_column, chunk_width);
        }
        __syncthreads();
    }

    float* grad_features = reinterpret_cast<float*>(b.grad_features);
#pragma unroll
    for (int n = 0; n < kGradTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = lane.row[e / 2];
            const uint32_t column = first_column + 8 * n + 2 * lane.quad + e % 2;
            if (r < own_count && column < p.dim) {
                grad_features[own_rows.offset[r] + column] = grad[n][e] * p.inv_temperature;
            }
        }
    }
}

} // namespace
} // namespace tc
} // namespace supcon

/* Blocks per SM each kernel is compiled for (the register budget): 3 for the half-precision
 * kernels, which their shared memory allows (3 x 66 KiB at D = 128) and which ptxas would aim
 * for anyway; 1 for the split f32 kernels, whose doubled shared memory allows no more than 1
 * at D = 128 and which would spill at the registers of 3. The wide kernels need ~245. */
#define SUPCON_MMA_BACKWARD(name, T, columns, blocks)                                                      \
    extern "C" __global__ void __launch_bounds__(supcon::tc::kThreads, blocks)                             \
        name(const SupconBackwardParams params) {                                                          \
        supcon::tc::backward<T, columns>(params);                                                          \
    }
SUPCON_MMA_BACKWARD(supcon_mma_backward_f16, __half, supcon::tc::kGradCols, 3)
SUPCON_MMA_BACKWARD(supcon_mma_backward_bf16, __nv_bfloat16, supcon::tc::kGradCols, 3)
SUPCON_MMA_BACKWARD(supcon_mma_backward_f32x3, float, supcon::tc::kGradCols, 1)
SUPCON_MMA_BACKWARD(supcon_mma_backward_wide_f16, __half, supcon::tc::kWideGradCols, 1)
SUPCON_MMA_BACKWARD(supcon_mma_backward_wide_bf16, __nv_bfloat16, supcon::tc::kWideGradCols, 1)
SUPCON_MMA_BACKWARD(supcon_mma_backward_wide_f32x3, float, supcon::tc::kWideGradCols, 1)
#undef SUPCON_MMA_BACKWARD
