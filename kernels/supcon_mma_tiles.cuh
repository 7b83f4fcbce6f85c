/*
 * The tile machinery of the tensor-core kernels (supcon_mma_forward.cu, supcon_mma_backward.cu):
 * a block of 4 warps owns 64 rows of Z (16 per warp), keeps them in shared memory for the whole
 * pass, and streams the contrast rows past them 64 at a time through a two-stage pipeline:
 *
 *     own[64][stride]          the block's rows, loaded once
 *     contrast[2][64][stride]  tile t + 1 is copied (cp.async) while tile t is multiplied
 *
 *     issue the copies of own rows and tile 0, commit
 *     for each tile t:
 *         issue the copies of tile t + 1 (if any), commit      -- always one group per tile
 *         wait until at most one group is pending               -- tile t has landed
 *         __syncthreads()
 *         S = own x contrast[t % 2]^T   (mma.sync, f32 accumulators in registers)
 *         ... the pass's own use of the tile ...
 *         __syncthreads()                                       -- contrast[t % 2] is free for t + 2
 *
 * Each shared row holds D elements padded with zeros to a multiple of 16 (the mma's k) plus 8
 * elements (16 bytes) of slack: with a row stride of an odd number of 16-byte units, the 8 rows
 * an ldmatrix phase reads fall in 8 distinct groups of banks (no swizzle needed). Rows past N
 * are zeros too, so that they add nothing to a product.
 *
 * Copies are 16-byte cp.async when every row starts on a 16-byte boundary (D a multiple of 8
 * and an aligned buffer, as every framework allocates); otherwise each thread loads and stores
 * elements itself (correct for any D, without the overlap). The shared memory is dynamic:
 * 3 x 64 x stride elements (52 KiB for D = 128), above the 48 KiB default from D = 121 on, which
 * the host allows per kernel (src/device/plan.rs has the limits).
 *
 * The S tile of a warp: 16 own rows x 64 contrast rows as 8 n-tiles of 16 x 8, i.e. per thread
 * acc[n][0..3] = S[group, group + 8][8n + 2 quad, +1] (supcon_mma.cuh's C layout).
 */
#ifndef SUPCON_MMA_TILES_CUH
#define SUPCON_MMA_TILES_CUH

#include "supcon_common.cuh"
#include "supcon_mma.cuh"

namespace supcon {
namespace tc {

/* Threads per block: 4 warps of 16 own rows each. */
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
/* Own rows per block and contrast rows per tile. */
constexpr int kRows = 64;
constexpr int kCols = 64;
constexpr int kWarpRows = kRows / kWarps;
/* n-tiles of 8 contrast rows per S tile. */
constexpr int kColTiles = kCols / 8;
/* Gradient columns per backward block (grid.y chunks): 128 (16 n-tiles of 8 per warp, 64
 * accumulators per thread) for D <= 128, 256 beyond, so that S and H are formed once per tile up
 * to D = 256 rather than once per 128 columns (128 accumulators; no spills, 2 blocks per SM). */
constexpr int kGradCols = 128;
constexpr int kWideGradCols = 256;
/* k-steps of 16 contrast rows per tile of the backward's H Z product. */
constexpr int kTileSteps = kCols / 16;
/* Elements of zeros after each shared row (16 bytes). */
constexpr int kRowSlack = 8;

static_assert(kWarpRows == 16, "one m16 fragment row block per warp");
static_assert(kRows == supcon::kTileRows && kCols == supcon::kTileCols, "row descriptions are 64 rows");
static_assert(kGradCols == supcon::kGradChunk, "the launch plan's gradient chunk");

/* D rounded up to the mma's k. */
__device__ __forceinline__ constexpr uint32_t padded_dim(uint32_t dim) { return (dim + 15u) / 16u * 16u; }

/* Elements between consecutive shared rows. */
__device__ __forceinline__ constexpr uint32_t row_stride(uint32_t dim) { return padded_dim(dim) + kRowSlack; }

/* The block's dynamic shared memory, 16-byte aligned (cp.async and ldmatrix need it). */
__device__ __forceinline__ unsigned char* dynamic_shared() {
#if defined(SUPCON_EMULATION)
    return supcon_emu::dynamic_shared();
#else
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    return shared_bytes;
#endif
}

/* Whether 16-byte copies may be used: every row of the buffer starts 16-byte aligned. */
__device__ __forceinline__ bool rows_are_aligned(const SupconProblem& p) {
    return p.dim % 8 == 0 && p.features % 16 == 0;
}

/* How an instantiation holds its operands in shared memory: f16 and bf16 features as they are
 * (one part); f32 features split into two bf16 parts, hi = bf16(x) and lo = bf16(x - hi), so
 * that x = hi + lo up to 2^-17 |x| and a product of two rows is hh + (hl + lh) up to ~2^-16
 * (the lo x lo term, below 2^-16, is dropped): Precision::Bf16x3. */
template <typename T>
struct Operand {
    using Tile = T;
    static constexpr int kParts = 1;
};
template <>
struct Operand<float> {
    using Tile = __nv_bfloat16;
    static constexpr int kParts = 2;
};

/* The block's shared rows: tile 0 its own 64, tiles 1 and 2 the two stages of contrast rows,
 * each in Operand<T>::kParts parts. */
template <typename T>
struct SharedRows {
    using Tile = typename Operand<T>::Tile;
    Tile* base;
    uint32_t stride;
    bool aligned; /* 16-byte copies (rows_are_aligned; f32 is always loaded and split by hand) */

    __device__ __forceinline__ explicit SharedRows(const SupconProblem& p)
        : base(reinterpret_cast<Tile*>(dynamic_shared())), stride(row_stride(p.dim)),
          aligned(Operand<T>::kParts == 1 && rows_are_aligned(p)) {}

    /* Part `part` of tile `index` (by arithmetic: an array of pointers indexed at run time
     * would live on the stack). */
    __device__ __forceinline__ Tile* tile(uint32_t index, int part = 0) const {
        return base + (index * Operand<T>::kParts + part) * kRows * stride;
    }
    __device__ __forceinline__ Tile* own(int part = 0) const { return tile(0, part); }
    /* Contrast stage k. */
    __device__ __forceinline__ Tile* contrast(uint32_t k, int part = 0) const { return tile(1 + k, part); }
};

/* Where a thread's accumulator elements sit (the C layout): rows group and group + 8 of its
 * warp's 16, i.e. block rows row[0] and row[1], and columns 8n + 2 quad, +1 of n-tile n. */
struct FragmentLane {
    int quad;
    int row[2];

    __device__ __forceinline__ FragmentLane()
        : quad(threadIdx.x % 4),
          row{kWarpRows * static_cast<int>(threadIdx.x / 32) + static_cast<int>(threadIdx.x % 32) / 4,
              kWarpRows * static_cast<int>(threadIdx.x / 32) + static_cast<int>(threadIdx.x % 32) / 4 + 8} {}
};

/* Element offset of flattened row `row` (= v B + b) in the [B, V, D] buffer. */
__device__ __forceinline__ uint64_t row_offset(uint32_t row, const SupconProblem& p) {
    const uint32_t view = row / p.batch;
    const uint32_t sample = row - view * p.batch;
    return (static_cast<uint64_t>(sample) * p.views + view) * p.dim;
}

/* Copies rows first .. first + count - 1 into tile `index` of `shared` (zeros past D and past
 * `count`): 16-byte cp.async copies in the current group when the rows are aligned, else plain
 * loads; f32 rows are split into their bf16 hi and lo parts on the way. Each row's offset is
 * computed once (a division by B), not per element. */
template <typename T>
__device__ __forceinline__ void load_rows(const SharedRows<T>& shared, uint32_t index, const T* __restrict__ features,
                                          uint32_t first, int count, const SupconProblem& p) {
    static_assert(kThreads % kRows == 0, "whole threads per row");
    const uint32_t dim = p.dim;
    const uint32_t width = padded_dim(dim);
    if (shared.aligned) {
        /* Two threads per row, taking its 16-byte chunks in turn. */
        constexpr uint32_t kThreadsPerRow = kThreads / kRows;
        const uint32_t r = threadIdx.x / kThreadsPerRow;
        const bool row_present = static_cast<int>(r) < count;
        const T* source = features + (row_present ? row_offset(first + r, p) : 0);
        auto* destination = shared.tile(index) + r * shared.stride;
        for (uint32_t k = 8 * (threadIdx.x % kThreadsPerRow); k < width; k += 8 * kThreadsPerRow) {
            const bool fill = row_present && k < dim;
            cp_async_16(destination + k, fill ? source + k : features, fill);
        }
        return;
    }
    /* Warp w takes rows w, w + 4, ...; its lanes consecutive elements of a row (coalesced). */
    for (uint32_t r = threadIdx.x / 32; r < static_cast<uint32_t>(kRows); r += kWarps) {
        const bool row_present = static_cast<int>(r) < count;
        const T* source = features + (row_present ? row_offset(first + r, p) : 0);
        for (uint32_t k = threadIdx.x % 32; k < width; k += 32) {
            const bool present = row_present && k < dim;
            const uint32_t at = r * shared.stride + k;
            if constexpr (Operand<T>::kParts == 2) {
                const float x = present ? source[k] : 0.0f;
                const __nv_bfloat16 hi = __float2bfloat16_rn(x);
                shared.tile(index)[at] = hi;
                shared.tile(index, 1)[at] = __float2bfloat16_rn(x - __bfloat162float(hi));
            } else {
                T value;
                memset(&value, 0, sizeof value);
                if (present) value = source[k];
                shared.tile(index)[at] = value;
            }
        }
    }
}

/* acc = own rows 16 w .. 16 w + 15 (w this thread's warp) x contrast rows 0..63, over all of
 * the padded D, k in order: the same instruction sequence wherever the same pair is formed. */
template <typename T>
__device__ __forceinline__ void multiply_single(float (&acc)[kColTiles][4], const T* own, const T* contrast,
                                                uint32_t dim) {
    const uint32_t stride = row_stride(dim);
    const uint32_t depth = padded_dim(dim);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int n = 0; n < kColTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    /* A: lane l points at own row 16 w + l % 16, column 8 (l / 16) of the k-step.
     * B (two n-tiles per ldmatrix): lane l points at contrast row 16 pair + l % 8 + 8 (l / 16),
     * column 8 ((l / 8) % 2) of the k-step. */
    const T* a_row = own + (kWarpRows * warp + lane % 16) * stride + 8 * (lane / 16);
    const T* b_row = contrast + (lane % 8 + 8 * (lane / 16)) * stride + 8 * ((lane / 8) % 2);
    for (uint32_t k0 = 0; k0 < depth; k0 += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, a_row + k0);
#pragma unroll
        for (int pair = 0; pair < kColTiles / 2; ++pair) {
            uint32_t b[4];
            ldmatrix_x4(b, b_row + 16 * pair * stride + k0);
            const uint32_t first[2] = {b[0], b[1]};
            const uint32_t second[2] = {b[2], b[3]};
            mma_m16n8k16<T>(acc[2 * pair], a, first);
            mma_m16n8k16<T>(acc[2 * pair + 1], a, second);
        }
    }
}

/* The same product of split rows: S = hh + (hl + lh), the three sums kept apart until the end so
 * that S_ij and S_ji, whose hl and lh swap, come out bitwise equal. One pair of n-tiles at a time
 * (the A fragments are loaded again per pair), so that the three accumulators cost 24 registers,
 * not 96. */
__device__ __forceinline__ void multiply_split(float (&acc)[kColTiles][4], const __nv_bfloat16* own_hi,
                                               const __nv_bfloat16* own_lo, const __nv_bfloat16* contrast_hi,
                                               const __nv_bfloat16* contrast_lo, uint32_t dim) {
    const uint32_t stride = row_stride(dim);
    const uint32_t depth = padded_dim(dim);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const uint32_t a_offset = (kWarpRows * warp + lane % 16) * stride + 8 * (lane / 16);
    const uint32_t b_offset = (lane % 8 + 8 * (lane / 16)) * stride + 8 * ((lane / 8) % 2);
#pragma unroll
    for (int pair = 0; pair < kColTiles / 2; ++pair) {
        float sums[3][2][4] = {}; /* hh, hl, lh for n-tiles 2 pair and 2 pair + 1 */
        const uint32_t b_pair = b_offset + 16 * pair * stride;
        for (uint32_t k0 = 0; k0 < depth; k0 += 16) {
            uint32_t a_hi[4], a_lo[4], b_hi[4], b_lo[4];
            ldmatrix_x4(a_hi, own_hi + a_offset + k0);
            ldmatrix_x4(a_lo, own_lo + a_offset + k0);
            ldmatrix_x4(b_hi, contrast_hi + b_pair + k0);
            ldmatrix_x4(b_lo, contrast_lo + b_pair + k0);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const uint32_t hi[2] = {b_hi[2 * half], b_hi[2 * half + 1]};
                const uint32_t lo[2] = {b_lo[2 * half], b_lo[2 * half + 1]};
                mma_m16n8k16<__nv_bfloat16>(sums[0][half], a_hi, hi);
                mma_m16n8k16<__nv_bfloat16>(sums[1][half], a_hi, lo);
                mma_m16n8k16<__nv_bfloat16>(sums[2][half], a_lo, hi);
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[2 * pair + half][e] = sums[0][half][e] + (sums[1][half][e] + sums[2][half][e]);
    }
}

/* S for this warp's rows against contrast stage `stage` of `shared`. */
template <typename T>
__device__ __forceinline__ void multiply_tile(float (&acc)[kColTiles][4], const SharedRows<T>& shared,
                                              uint32_t stage, uint32_t dim) {
    if constexpr (Operand<T>::kParts == 2) {
        multiply_split(acc, shared.own(0), shared.own(1), shared.contrast(stage, 0), shared.contrast(stage, 1), dim);
    } else {
        multiply_single(acc, shared.own(), shared.contrast(stage), dim);
    }
}

/* The S accumulator of a warp (C layout, 16 x 64) as the A fragments of four 16-wide k-steps,
 * rounded to bf16: step k is n-tiles 2k and 2k + 1, element for element. */
__device__ __forceinline__ void pack_a_fragments(uint32_t (&a)[kTileSteps][4], const float (&c)[kColTiles][4]) {
#pragma unroll
    for (int n = 0; n < kColTiles; ++n) {
        a[n / 2][2 * (n % 2)] = pack_bf16x2(c[n][0], c[n][1]);
        a[n / 2][2 * (n % 2) + 1] = pack_bf16x2(c[n][2], c[n][3]);
    }
}

/* The same, split: hi = bf16(c) as pack_a_fragments, lo = bf16(c - hi). */
__device__ __forceinline__ void pack_a_fragments_split(uint32_t (&hi)[kTileSteps][4], uint32_t (&lo)[kTileSteps][4],
                                                       const float (&c)[kColTiles][4]) {
    float rest[kColTiles][4];
#pragma unroll
    for (int n = 0; n < kColTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) rest[n][e] = c[n][e] - __bfloat162float(__float2bfloat16_rn(c[n][e]));
    pack_a_fragments(hi, c);
    pack_a_fragments(lo, rest);
}

/* grad += H (this warp's 16 x 64, as A fragments) x tile[0..63][first_column ..
 * first_column + width) (bf16, k-major: the tile's rows are the k index): kGradTiles n-tiles of
 * 8 gradient columns, of which the first width / 8 exist. */
template <int kGradTiles>
__device__ __forceinline__ void multiply_h_tile(float (&grad)[kGradTiles][4], const uint32_t (&h)[kTileSteps][4],
                                                const void* tile, uint32_t stride, uint32_t first_column,
                                                uint32_t width) {
    const int lane = threadIdx.x % 32;
    /* B (two n-tiles per ldmatrix.trans): lane l points at row 16 step + l % 8 + 8 ((l / 8) % 2),
     * column 16 pair + 8 (l / 16) of the chunk. */
    const __nv_bfloat16* b_row = static_cast<const __nv_bfloat16*>(tile) +
                                 (lane % 8 + 8 * ((lane / 8) % 2)) * stride + first_column + 8 * (lane / 16);
#pragma unroll
    for (int step = 0; step < kTileSteps; ++step) {
#pragma unroll
        for (int pair = 0; pair < kGradTiles / 2; ++pair) {
            if (16u * pair >= width) continue;
            uint32_t b[4];
            ldmatrix_x4_trans(b, b_row + 16 * step * stride + 16 * pair);
            const uint32_t first[2] = {b[0], b[1]};
            const uint32_t second[2] = {b[2], b[3]};
            mma_m16n8k16<__nv_bfloat16>(grad[2 * pair], h[step], first);
            mma_m16n8k16<__nv_bfloat16>(grad[2 * pair + 1], h[step], second);
        }
    }
}

} // namespace tc
} // namespace supcon

#endif /* SUPCON_MMA_TILES_CUH */
