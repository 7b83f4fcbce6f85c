/*
 * Device code shared by the SupCon forward and backward kernels: tile geometry, the element
 * types, row bookkeeping, the positive relation and the S-tile product.
 *
 * Both kernels walk the implicit N x N logit matrix S = Z Z^T / tau in 64 x 64 tiles without ever
 * storing it. A tile is the product of a 64-row block of Z (the block's own rows) with a 64-row
 * block of contrast rows, accumulated over the feature dimension D in stages of 32 elements:
 *
 *     for each stage k0 = 0, 32, 64, ... < D:
 *         own[k][r]      = Z[own row r][k0 + k]       (shared memory, f32, zero beyond D)
 *         contrast[k][c] = Z[contrast row c][k0 + k]
 *         __syncthreads()
 *         acc[m][n] += sum_k own[k][row m] * contrast[k][col n]   (registers, f32)
 *         __syncthreads()
 *
 * 128 threads form a 8 x 16 grid; thread (ty, tx) owns the 8 x 4 micro-tile of rows ty + 8m and
 * columns tx + 16n (strided, so that the 16 threads of a half-warp read 16 consecutive shared
 * words: no bank conflicts; the two half-warps of a warp read two words 65 floats apart).
 * Shared tiles are stored k-major with one float of padding per row of 64 so that the
 * transposing stores (consecutive threads: consecutive k) hit 32 distinct banks.
 *
 * Global traffic per tile and stage: 2 x 64 x 32 elements, read coalesced (32 consecutive
 * threads read 32 consecutive elements of one row), converted to f32 on the way into shared
 * memory; every arithmetic operation after that is f32. Rows are addressed in place in the
 * [B, V, D] buffer (row r = v*B + b lives at (b*V + v)*D): no transpose copy; offsets are 64-bit.
 *
 * Fused normalisation: under `normalize` every staged element is multiplied by its row's scale
 * 1/max(|x_r|, eps) (SupconProblem::row_scales, 1 otherwise), so Z is u = x / max(|x|, eps) for
 * everything after the load and nothing normalised is ever stored.
 */
#ifndef SUPCON_COMMON_CUH
#define SUPCON_COMMON_CUH

#include "supcon_params.h"

#if !defined(SUPCON_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace supcon {

/* Threads per block of the forward-statistics and backward kernels (src/launch_plan.rs). */
constexpr int kThreads = 128;
/* Rows of S per tile: the block's own rows (anchors in the forward pass, gradient rows in the
 * backward pass) and the contrast rows of one column tile. */
constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
/* Feature elements per shared-memory stage. */
constexpr int kTileDepth = 32;
constexpr int kThreadGridCols = 16;
constexpr int kThreadGridRows = kThreads / kThreadGridCols;
constexpr int kMicroRows = kTileRows / kThreadGridRows;
constexpr int kMicroCols = kTileCols / kThreadGridCols;
/* Threads of the single finalisation block. */
constexpr int kFinalizeThreads = 256;
/* Threads per block of supcon_backward_coefficients (one anchor each). */
constexpr int kCoefficientThreads = 256;
/* Threads per block of supcon_forward_merge (one anchor each). */
constexpr int kMergeThreads = 256;
/* Threads per block of supcon_pack_label_sets (one sample each) and supcon_cap_bounds (one
 * block per sample). */
constexpr int kPositivesThreads = 256;
/* Threads per block of supcon_row_scales_* (one warp per row). */
constexpr int kRowScalesThreads = 256;
/* Gradient columns (feature elements) per backward block: grid.y = ceil(D / kGradChunk). */
constexpr int kGradChunk = 128;
/* Padded length of one k-row of a shared tile (bank-conflict-free transposing stores). */
constexpr int kTileStride = kTileRows + 1;

static_assert(kTileRows == kTileCols, "own and contrast tiles share the row bookkeeping");
static_assert(kThreads % kTileDepth == 0 && kTileRows % (kThreads / kTileDepth) == 0,
              "the stage loader covers a tile with whole passes");
static_assert(kThreadGridRows * kMicroRows == kTileRows && kThreadGridCols * kMicroCols == kTileCols,
              "the thread grid covers the tile");

/* R', what the reduction divides the sum of the losses by: R, or under the "exclude" policy the
 * anchors with P_i > 0 (at least 1), for the mean; 1 for sum and none. Shared by the
 * finalisation and the gradient coefficients, so the loss and its gradient agree. */
__device__ __forceinline__ double mean_denominator(const SupconReduction& p, uint32_t without_positive) {
    if (p.reduction != SUPCON_REDUCTION_MEAN) return 1.0;
    if (p.no_positive_policy != SUPCON_NO_POSITIVE_EXCLUDE) return p.anchors;
    const uint32_t with_positive = p.anchors - without_positive;
    return with_positive > 0 ? with_positive : 1;
}

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

/* Where the rows of one tile live and what class they belong to. */
struct TileRows {
    uint64_t offset[kTileRows]; /* element offset of the row in the [B, V, D] buffer */
    int64_t positive_class[kTileRows]; /* label (labels) or sample index (SimCLR) */
    uint32_t sample[kTileRows];        /* b: the mask's row/column index */
    uint32_t row[kTileRows];           /* the flattened row index */
    uint32_t cap_bound[kTileRows];     /* as an anchor: positives of other samples are kept below
                                        * this row (N without a cap) */
    float scale[kTileRows];            /* what its elements are multiplied by on load: 1/max(|x|,
                                        * eps) under normalize, else 1 */
};

/* Two shared stages of Z, k-major (see the header comment). */
struct StageTiles {
    float own[kTileDepth][kTileStride];
    float contrast[kTileDepth][kTileStride];
};

/* Fills `tile` for rows first_row .. first_row + count - 1 (threads 0..kTileRows-1 each describe
 * one row). The caller synchronises before the description is read. */
__device__ __forceinline__ void describe_rows(TileRows& tile, uint32_t first_row, int count,
                                              const SupconProblem& p) {
    const int t = threadIdx.x;
    if (t < kTileRows && t < count) {
        const uint32_t row = first_row + t;
        const uint32_t sample = row % p.batch;
        const uint32_t view = row / p.batch;
        tile.offset[t] = (static_cast<uint64_t>(sample) * p.views + view) * p.dim;
        tile.sample[t] = sample;
        tile.positive_class[t] = p.positive_kind == SUPCON_POSITIVES_LABELS
                                     ? reinterpret_cast<const int64_t*>(p.labels)[sample]
                                     : static_cast<int64_t>(sample);
        tile.row[t] = row;
        tile.cap_bound[t] = p.cap_bounds != 0 ? reinterpret_cast<const uint32_t*>(p.cap_bounds)[sample] : p.rows;
        tile.scale[t] = p.row_scales != 0 ? fabsf(reinterpret_cast<const float*>(p.row_scales)[row]) : 1.0f;
    }
}

/* What pair_weight returns for a positive that the cap drops: a weight below 0, in no sum
 * (every sum takes weights > 0) and in no denominator (in_denominator). */
constexpr float kDropped = -1.0f;

/* Whether rows are positives exactly when their classes (positive_class) are equal: SimCLR and
 * labels without a cap, which the class epilogues of the tensor-core kernels handle. */
__device__ __forceinline__ bool positives_are_classes(const SupconProblem& p) {
    return (p.positive_kind == SUPCON_POSITIVES_SAME_SAMPLE || p.positive_kind == SUPCON_POSITIVES_LABELS) &&
           p.cap_bounds == 0;
}

/* The weight of samples anchor != contrast from their label sets: the counts of the shared
 * labels, of the union and of the anchor's, each rounded to f32, and one correctly rounded
 * division, as LabelSetWeight::weight (src/label_sets.rs) computes it. Each set's size is
 * stored before it, so the loop keeps one count live (the general epilogues inline this once
 * per logit). */
__device__ __forceinline__ float label_set_weight(const SupconProblem& p, uint32_t anchor, uint32_t contrast) {
    const uint64_t* sets = reinterpret_cast<const uint64_t*>(p.label_sets);
    const uint64_t* a = sets + static_cast<uint64_t>(anchor) * (p.set_words + 1);
    const uint64_t* b = sets + static_cast<uint64_t>(contrast) * (p.set_words + 1);
    uint32_t shared = 0;
#pragma unroll 1
    for (uint32_t w = 1; w <= p.set_words; ++w) shared += __popcll(a[w] & b[w]);
    if (p.set_weight == SUPCON_LABEL_SET_ANY) return shared > 0 ? 1.0f : 0.0f;
    const uint32_t in_anchor = static_cast<uint32_t>(a[0]);
    const uint32_t divisor =
        p.set_weight == SUPCON_LABEL_SET_JACCARD ? in_anchor + static_cast<uint32_t>(b[0]) - shared : in_anchor;
    return __fdiv_rn(__uint2float_rn(shared), __uint2float_rn(divisor > 0 ? divisor : 1));
}

/* w_ij before the cap. */
__device__ __forceinline__ float raw_pair_weight(const SupconProblem& p, const TileRows& rows, int r,
                                                 const TileRows& cols, int c) {
    if (p.positive_kind == SUPCON_POSITIVES_MASK) {
        const float* mask = reinterpret_cast<const float*>(p.mask);
        return mask[static_cast<uint64_t>(rows.sample[r]) * p.batch + cols.sample[c]];
    }
    if (p.positive_kind == SUPCON_POSITIVES_LABEL_SETS) {
        /* The other views of the anchor's own sample always weigh 1. */
        return rows.sample[r] == cols.sample[c] ? 1.0f : label_set_weight(p, rows.sample[r], cols.sample[c]);
    }
    return rows.positive_class[r] == cols.positive_class[c] ? 1.0f : 0.0f;
}

/* w_ij: the positive weight of row j (column c of `cols`) for row i (row r of `rows`), or
 * kDropped for a positive the cap drops (one of another sample at or past the anchor's bound).
 * The caller excludes i == j. */
__device__ __forceinline__ float pair_weight(const SupconProblem& p, const TileRows& rows, int r,
                                             const TileRows& cols, int c) {
    const float w = raw_pair_weight(p, rows, r, cols, c);
    const bool dropped = w > 0.0f && rows.sample[r] != cols.sample[c] && cols.row[c] >= rows.cap_bound[r];
    return dropped ? kDropped : w;
}

/* Is j in anchor i's softmax denominator, given w_ij (j != i)? Never a dropped positive. */
__device__ __forceinline__ bool in_denominator(const SupconProblem& p, float weight) {
    return p.denominator == SUPCON_DENOMINATOR_ALL ? weight >= 0.0f : weight == 0.0f;
}

/* Stages elements k0 .. k0 + kTileDepth - 1 of `count` rows of `rows` into dst[k][row], each
 * times its row's scale (zeros past D and past the last row). */
template <typename T>
__device__ __forceinline__ void load_stage(float (*dst)[kTileStride], const T* __restrict__ features,
                                           const TileRows& rows, int count, uint32_t k0, uint32_t dim) {
    const int k = threadIdx.x % kTileDepth;
    const int first = threadIdx.x / kTileDepth;
    const bool in_dim = k0 + k < dim;
#pragma unroll
    for (int r = first; r < kTileRows; r += kThreads / kTileDepth) {
        dst[k][r] = (in_dim && r < count) ? load_as_float(features + rows.offset[r] + k0 + k) * rows.scale[r] : 0.0f;
    }
}

/* acc += own-stage^T x contrast-stage for this thread's micro-tile: the inner product a
 * tensor-core MMA would replace. */
__device__ __forceinline__ void multiply_stage(float (&acc)[kMicroRows][kMicroCols], const StageTiles& stage) {
    const int ty = threadIdx.x / kThreadGridCols;
    const int tx = threadIdx.x % kThreadGridCols;
#pragma unroll 8
    for (int k = 0; k < kTileDepth; ++k) {
        float a[kMicroRows];
        float b[kMicroCols];
#pragma unroll
        for (int m = 0; m < kMicroRows; ++m) a[m] = stage.own[k][ty + kThreadGridRows * m];
#pragma unroll
        for (int n = 0; n < kMicroCols; ++n) b[n] = stage.contrast[k][tx + kThreadGridCols * n];
#pragma unroll
        for (int m = 0; m < kMicroRows; ++m)
#pragma unroll
            for (int n = 0; n < kMicroCols; ++n) acc[m][n] = fmaf(a[m], b[n], acc[m][n]);
    }
}

/* acc = (own rows) . (contrast rows)^T over all of D: this thread's 8 x 4 share of one tile of
 * Z Z^T (unscaled). Row descriptions must be visible (synchronised) on entry; ends with a
 * barrier, after which `stage` may be reused. */
template <typename T>
__device__ __forceinline__ void dot_tile(float (&acc)[kMicroRows][kMicroCols], StageTiles& stage,
                                         const T* __restrict__ features, const TileRows& own, int own_count,
                                         const TileRows& contrast, int contrast_count, uint32_t dim) {
#pragma unroll
    for (int m = 0; m < kMicroRows; ++m)
#pragma unroll
        for (int n = 0; n < kMicroCols; ++n) acc[m][n] = 0.0f;
    for (uint32_t k0 = 0; k0 < dim; k0 += kTileDepth) {
        load_stage(stage.own, features, own, own_count, k0, dim);
        load_stage(stage.contrast, features, contrast, contrast_count, k0, dim);
        __syncthreads();
        multiply_stage(acc, stage);
        __syncthreads();
    }
}

/* How many of the rows first .. first + kTileRows - 1 exist below `limit`. */
__device__ __forceinline__ int rows_in_tile(uint32_t first, uint32_t limit) {
    if (first >= limit) return 0;
    return limit - first >= static_cast<uint32_t>(kTileRows) ? kTileRows : static_cast<int>(limit - first);
}

} // namespace supcon

#endif /* SUPCON_COMMON_CUH */
