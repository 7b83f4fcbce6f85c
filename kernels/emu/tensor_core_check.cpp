/*
 * Checks of the tensor-core twins and of the kernels' fragment plumbing against plain matrix
 * products (run by src/device/emulated.rs's tests through supcon_emu_tensor_core_check):
 *
 *   mma_layout       each lane builds its A, B and C registers from the PTX ISA's fragment
 *                    layouts, written out here independently of the twin; D must be C + A B
 *   ldmatrix_layout  every lane's registers after ldmatrix_x4 and ldmatrix_x4_trans of a matrix
 *                    of distinct values must be the elements the PTX ISA assigns it
 *   multiply_tile    the kernels' S tile (supcon_mma_tiles.cuh) from shared rows with a ragged D
 *                    must equal own x contrast^T, for f16 and bf16
 *   multiply_h_tile  pack_a_fragments + multiply_h_tile (the wide, 256-column form) on full and
 *                    partial gradient chunks must equal C x tile[:, chunk]
 *   split_tile       f32 rows through the kernels' loader (split into bf16 hi and lo in shared
 *                    memory) and multiply_tile: hh + (hl + lh), with exact values chosen so that
 *                    x = hi + lo, must equal the exact product less the lo x lo terms
 *
 * Values are small integers (and halves), so every product and sum is exact: results must agree
 * exactly, and a wrong lane, register or half in any mapping shows as a mismatch. Each check
 * returns the number of mismatching elements.
 */
#include <string.h>

#include <vector>

#include "../supcon_mma_tiles.cuh"
#include "cuda_emu_runtime.h"

namespace {

using supcon::tc::kColTiles;
using supcon::tc::kTileSteps;

/* A value in -8..8 (and halves for bf16-exact fractions) from a seed. */
float test_value(unsigned i, unsigned salt) { return static_cast<float>(static_cast<int>((i * 2654435761u + salt * 40503u) >> 27) - 16) / 2.0f; }

uint16_t bits_of(float x, bool bf16) {
    if (bf16) return __float2bfloat16_rn(x).bits;
    /* x is a small multiple of 1/2: exact in binary16. */
    uint32_t f;
    memcpy(&f, &x, sizeof f);
    if ((f & 0x7fffffffu) == 0) return static_cast<uint16_t>(f >> 16);
    const uint32_t sign = (f >> 16) & 0x8000u;
    const int exponent = static_cast<int>((f >> 23) & 0xff) - 127 + 15;
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent) << 10) | ((f >> 13) & 0x3ffu));
}

/* Shared state of one check (one launch at a time). */
std::vector<uint16_t> g_a, g_b;
std::vector<float> g_c, g_out;
std::vector<uint32_t> g_registers;
unsigned g_dim, g_width, g_first_column;

/* ---- mma_layout: one warp, A 16 x 16, B 16 x 8, C 16 x 8. */
template <typename T>
void mma_layout_kernel(const void*) {
    const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    const auto a = [&](int row, int k) { return static_cast<uint32_t>(g_a[row * 16 + k]); };
    const auto b = [&](int k, int col) { return static_cast<uint32_t>(g_b[k * 8 + col]); };
    const uint32_t a_regs[4] = {a(group, 2 * quad) | a(group, 2 * quad + 1) << 16,
                                a(group + 8, 2 * quad) | a(group + 8, 2 * quad + 1) << 16,
                                a(group, 2 * quad + 8) | a(group, 2 * quad + 9) << 16,
                                a(group + 8, 2 * quad + 8) | a(group + 8, 2 * quad + 9) << 16};
    const uint32_t b_regs[2] = {b(2 * quad, group) | b(2 * quad + 1, group) << 16,
                                b(2 * quad + 8, group) | b(2 * quad + 9, group) << 16};
    float d[4] = {g_c[group * 8 + 2 * quad], g_c[group * 8 + 2 * quad + 1], g_c[(group + 8) * 8 + 2 * quad],
                  g_c[(group + 8) * 8 + 2 * quad + 1]};
    supcon::tc::mma_m16n8k16<T>(d, a_regs, b_regs);
    g_out[group * 8 + 2 * quad] = d[0];
    g_out[group * 8 + 2 * quad + 1] = d[1];
    g_out[(group + 8) * 8 + 2 * quad] = d[2];
    g_out[(group + 8) * 8 + 2 * quad + 1] = d[3];
}

int mma_layout(bool bf16) {
    std::vector<float> a(16 * 16), b(16 * 8);
    g_a.resize(a.size());
    g_b.resize(b.size());
    g_c.resize(16 * 8);
    g_out.assign(16 * 8, 0.0f);
    for (unsigned i = 0; i < a.size(); ++i) g_a[i] = bits_of(a[i] = test_value(i, 1), bf16);
    for (unsigned i = 0; i < b.size(); ++i) g_b[i] = bits_of(b[i] = test_value(i, 2), bf16);
    for (unsigned i = 0; i < g_c.size(); ++i) g_c[i] = test_value(i, 3);
    supcon_emu::launch(bf16 ? mma_layout_kernel<__nv_bfloat16> : mma_layout_kernel<__half>, dim3{1, 1, 1},
                       dim3{32, 1, 1}, 0, &g_dim);
    int mismatches = 0;
    for (int row = 0; row < 16; ++row) {
        for (int col = 0; col < 8; ++col) {
            float expected = g_c[row * 8 + col];
            for (int k = 0; k < 16; ++k) expected += a[row * 16 + k] * b[k * 8 + col];
            mismatches += g_out[row * 8 + col] != expected;
        }
    }
    return mismatches;
}

/* ---- ldmatrix_layout: one warp, a 16 x 16 matrix M[r][c] = r * 16 + c (raw b16 values). */
void ldmatrix_layout_kernel(const void*) {
    __shared__ uint16_t matrix[16][24]; /* a padded row stride, like the kernels' */
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < 16 * 16; e += 32) matrix[e / 16][e % 16] = static_cast<uint16_t>(e);
    __syncthreads();
    /* Lane 8m + i: row i of matrix m; matrices m = 0..3 are the quadrants (8 (m % 2), 8 (m / 2)). */
    const int m = lane / 8, i = lane % 8;
    const void* row = &matrix[8 * (m % 2) + i][8 * (m / 2)];
    uint32_t plain[4], transposed[4];
    supcon::tc::ldmatrix_x4(plain, row);
    supcon::tc::ldmatrix_x4_trans(transposed, row);
    for (int r = 0; r < 4; ++r) {
        g_registers[lane * 8 + r] = plain[r];
        g_registers[lane * 8 + 4 + r] = transposed[r];
    }
}

int ldmatrix_layout() {
    g_registers.assign(32 * 8, 0);
    supcon_emu::launch(ldmatrix_layout_kernel, dim3{1, 1, 1}, dim3{32, 1, 1}, 0, &g_dim);
    int mismatches = 0;
    for (int lane = 0; lane < 32; ++lane) {
        for (int m = 0; m < 4; ++m) {
            const auto element = [&](int r, int c) { return static_cast<uint32_t>((8 * (m % 2) + r) * 16 + 8 * (m / 2) + c); };
            const uint32_t plain = element(lane / 4, 2 * (lane % 4)) | element(lane / 4, 2 * (lane % 4) + 1) << 16;
            const uint32_t transposed =
                element(2 * (lane % 4), lane / 4) | element(2 * (lane % 4) + 1, lane / 4) << 16;
            mismatches += g_registers[lane * 8 + m] != plain;
            mismatches += g_registers[lane * 8 + 4 + m] != transposed;
        }
    }
    return mismatches;
}

/* ---- multiply_tile: 4 warps, own and contrast 64 x D rows in the kernels' shared layout. */
template <typename T>
void multiply_tile_kernel(const void*) {
    const uint32_t stride = supcon::tc::row_stride(g_dim);
    static std::vector<T> own, contrast; /* "shared": one per block, blocks run one at a time */
    if (threadIdx.x == 0) {
        own.assign(64 * stride, T{});
        contrast.assign(64 * stride, T{});
        for (unsigned r = 0; r < 64; ++r) {
            for (unsigned k = 0; k < g_dim; ++k) {
                memcpy(&own[r * stride + k], &g_a[r * g_dim + k], 2);
                memcpy(&contrast[r * stride + k], &g_b[r * g_dim + k], 2);
            }
        }
    }
    __syncthreads();
    float acc[kColTiles][4];
    supcon::tc::multiply_single(acc, own.data(), contrast.data(), g_dim);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int n = 0; n < kColTiles; ++n) {
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + lane / 4 + 8 * (e / 2);
            const int col = 8 * n + 2 * (lane % 4) + e % 2;
            g_out[row * 64 + col] = acc[n][e];
        }
    }
}

int multiply_tile(bool bf16, unsigned dim) {
    g_dim = dim;
    std::vector<float> a(64 * dim), b(64 * dim);
    g_a.resize(a.size());
    g_b.resize(b.size());
    for (unsigned i = 0; i < a.size(); ++i) g_a[i] = bits_of(a[i] = test_value(i, 4), bf16);
    for (unsigned i = 0; i < b.size(); ++i) g_b[i] = bits_of(b[i] = test_value(i, 5), bf16);
    g_out.assign(64 * 64, -1e30f);
    supcon_emu::launch(bf16 ? multiply_tile_kernel<__nv_bfloat16> : multiply_tile_kernel<__half>, dim3{1, 1, 1},
                       dim3{128, 1, 1}, 0, &g_dim);
    int mismatches = 0;
    for (unsigned i = 0; i < 64; ++i) {
        for (unsigned j = 0; j < 64; ++j) {
            float expected = 0.0f;
            for (unsigned k = 0; k < dim; ++k) expected += a[i * dim + k] * b[j * dim + k];
            mismatches += g_out[i * 64 + j] != expected;
        }
    }
    return mismatches;
}

/* ---- multiply_h_tile: 4 warps, C 64 x 64 in registers (C layout), tile 64 x D (bf16). */
void multiply_h_tile_kernel(const void*) {
    const uint32_t stride = supcon::tc::row_stride(g_dim);
    static std::vector<__nv_bfloat16> tile;
    if (threadIdx.x == 0) {
        tile.assign(64 * stride, __nv_bfloat16{});
        for (unsigned r = 0; r < 64; ++r)
            for (unsigned k = 0; k < g_dim; ++k) tile[r * stride + k].bits = g_b[r * g_dim + k];
    }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float c[kColTiles][4];
    for (int n = 0; n < kColTiles; ++n) {
        for (int e = 0; e < 4; ++e) {
            c[n][e] = g_c[(16 * warp + lane / 4 + 8 * (e / 2)) * 64 + 8 * n + 2 * (lane % 4) + e % 2];
        }
    }
    uint32_t h[kTileSteps][4];
    supcon::tc::pack_a_fragments(h, c);
    float grad[supcon::tc::kWideGradCols / 8][4] = {};
    supcon::tc::multiply_h_tile(grad, h, tile.data(), stride, g_first_column, g_width);
    for (int n = 0; n < supcon::tc::kWideGradCols / 8; ++n) {
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + lane / 4 + 8 * (e / 2);
            const int col = 8 * n + 2 * (lane % 4) + e % 2;
            g_out[row * 256 + col] = grad[n][e];
        }
    }
}

int multiply_h_tile(unsigned dim, unsigned first_column) {
    g_dim = dim;
    g_first_column = first_column;
    const unsigned padded = supcon::tc::padded_dim(dim);
    g_width = padded - first_column < 256 ? padded - first_column : 256;
    std::vector<float> b(64 * dim);
    g_b.resize(b.size());
    for (unsigned i = 0; i < b.size(); ++i) g_b[i] = bits_of(b[i] = test_value(i, 6), true);
    g_c.resize(64 * 64);
    for (unsigned i = 0; i < g_c.size(); ++i) g_c[i] = test_value(i, 7);
    g_out.assign(64 * 256, -1e30f);
    supcon_emu::launch(multiply_h_tile_kernel, dim3{1, 1, 1}, dim3{128, 1, 1}, 0, &g_dim);
    int mismatches = 0;
    for (unsigned i = 0; i < 64; ++i) {
        for (unsigned col = 0; col < 256; ++col) {
            const unsigned d = first_column + col;
            /* Columns past the chunk's width stay 0; past D (zero padding) they are 0 too. */
            float expected = 0.0f;
            if (col < g_width && d < dim) {
                for (unsigned j = 0; j < 64; ++j) expected += g_c[i * 64 + j] * b[j * dim + d];
            }
            mismatches += g_out[i * 256 + col] != expected;
        }
    }
    return mismatches;
}

/* ---- split_tile: 128 f32 rows of D elements, x = hi + lo with hi in +-[4, 8] and lo a multiple
 * of 2^-12 below 2^-9: bf16(x) = hi, x - hi = lo exactly, and every partial sum is exact. */
std::vector<float> g_rows;

void split_tile_kernel(const void*) {
    SupconProblem p{};
    p.features = reinterpret_cast<uint64_t>(g_rows.data());
    p.batch = 128;
    p.views = 1;
    p.dim = g_dim;
    p.rows = 128;
    const supcon::tc::SharedRows<float> shared(p);
    supcon::tc::load_rows(shared, 0, g_rows.data(), 0, 64, p);
    supcon::tc::load_rows(shared, 2, g_rows.data(), 64, 64, p);
    __syncthreads();
    float acc[kColTiles][4];
    supcon::tc::multiply_tile(acc, shared, 1, g_dim);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int n = 0; n < kColTiles; ++n) {
        for (int e = 0; e < 4; ++e) {
            g_out[(16 * warp + lane / 4 + 8 * (e / 2)) * 64 + 8 * n + 2 * (lane % 4) + e % 2] = acc[n][e];
        }
    }
}

int split_tile(unsigned dim) {
    g_dim = dim;
    std::vector<double> hi(128 * dim), lo(128 * dim);
    g_rows.resize(128 * dim);
    for (unsigned i = 0; i < g_rows.size(); ++i) {
        const int h = 4 + static_cast<int>((i * 2654435761u) >> 30); /* 4..7 */
        hi[i] = (i % 3 == 0) ? -h : h;
        lo[i] = static_cast<double>(static_cast<int>((i * 40503u) >> 28) - 7) / 4096.0; /* -7..8 * 2^-12 */
        g_rows[i] = static_cast<float>(hi[i] + lo[i]);
    }
    g_out.assign(64 * 64, -1e30f);
    const size_t bytes = 6 * 64 * static_cast<size_t>(supcon::tc::row_stride(dim)) * 2;
    supcon_emu::launch(split_tile_kernel, dim3{1, 1, 1}, dim3{128, 1, 1}, bytes, &g_dim);
    int mismatches = 0;
    for (unsigned i = 0; i < 64; ++i) {
        for (unsigned j = 0; j < 64; ++j) {
            double expected = 0.0;
            for (unsigned k = 0; k < dim; ++k) {
                const double a_hi = hi[i * dim + k], a_lo = lo[i * dim + k];
                const double b_hi = hi[(64 + j) * dim + k], b_lo = lo[(64 + j) * dim + k];
                expected += a_hi * b_hi + a_hi * b_lo + a_lo * b_hi;
            }
            mismatches += g_out[i * 64 + j] != static_cast<float>(expected);
        }
    }
    return mismatches;
}

} // namespace

/* Runs the check called `name`; returns its mismatch count, or -1 for an unknown name. */
extern "C" int supcon_emu_tensor_core_check(const char* name) {
    if (strcmp(name, "mma_layout") == 0) return mma_layout(false) + mma_layout(true);
    if (strcmp(name, "ldmatrix_layout") == 0) return ldmatrix_layout();
    if (strcmp(name, "multiply_tile") == 0) {
        return multiply_tile(false, 40) + multiply_tile(true, 40) + multiply_tile(true, 16) +
               multiply_tile(false, 7);
    }
    if (strcmp(name, "split_tile") == 0) return split_tile(16) + split_tile(7);
    if (strcmp(name, "multiply_h_tile") == 0) return multiply_h_tile(40, 0) + multiply_h_tile(300, 256) + multiply_h_tile(300, 0) + multiply_h_tile(200, 0);
    return -1;
}
