/*
 * Host twins of the warp-wide tensor-core instructions of supcon_mma.cuh (see its header for
 * the fragment layouts they implement).
 *
 * Every lane of the warp calls the twin with its own registers; warp_gather hands each lane all
 * 32 lanes' registers (or row addresses), from which it computes its own result registers by
 * the layouts. mma: D[row][col] = C[row][col] + sum_k A[row][k] B[k][col] in f32, k in order,
 * each product exact (two 8- or 11-bit significands fit f32's 24), so fused or not it rounds
 * once per addition. The GPU's tensor cores add in an unspecified order (and Hopper's
 * align-and-add keeps fewer bits): the kernels' results agree with the GPU to f32 rounding, not
 * bitwise, which is all the tests assume. What must agree bitwise (a logit the forward and the
 * backward kernels both form) is formed by the same instruction sequence in both.
 */
#ifndef SUPCON_TENSOR_CORE_EMU_H
#define SUPCON_TENSOR_CORE_EMU_H

#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace supcon_emu {

inline unsigned lane_id() { return threadIdx.x % 32; }

/* Element `half` (0: low, 1: high) of a register holding two b16 values, widened to float. */
template <typename T>
inline float register_element(uint32_t reg, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    if constexpr (std::is_same_v<T, __half>) {
        return __half2float(__half{bits});
    } else {
        static_assert(std::is_same_v<T, __nv_bfloat16>, "mma inputs are f16 or bf16");
        return __bfloat162float(__nv_bfloat16{bits});
    }
}

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    struct Fragments {
        uint32_t a[4];
        uint32_t b[2];
    };
    Fragments mine;
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    Fragments all[32];
    warp_gather(&mine, sizeof mine, all);
    /* A[row][k] lives in lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8);
     * B[k][col] in lane 4 col + (k % 8) / 2, register k / 8; half k % 2 for both. */
    const auto a_at = [&](int row, int k) {
        return register_element<T>(all[4 * (row % 8) + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2);
    };
    const auto b_at = [&](int k, int col) {
        return register_element<T>(all[4 * col + (k % 8) / 2].b[k / 8], k % 2);
    };
    const int group = static_cast<int>(lane_id() / 4);
    const int quad = static_cast<int>(lane_id() % 4);
    for (int r = 0; r < 4; ++r) {
        const int row = group + 8 * (r / 2);
        const int col = 2 * quad + r % 2;
        float sum = d[r];
        for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
        d[r] = sum;
    }
}

inline uint16_t shared_b16(const unsigned char* row, int element) {
    uint16_t bits;
    memcpy(&bits, row + 2 * element, sizeof bits);
    return bits;
}

/* ldmatrix .x4 (transposed or not): lane 8m + i points at row i of matrix m. */
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool transposed) {
    const unsigned char* rows[32];
    const unsigned char* mine = static_cast<const unsigned char*>(row);
    warp_gather(&mine, sizeof mine, rows);
    const int lane = static_cast<int>(lane_id());
    for (int m = 0; m < 4; ++m) {
        const unsigned char* const* matrix = rows + 8 * m;
        uint32_t low, high;
        if (transposed) { /* elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4] */
            low = shared_b16(matrix[2 * (lane % 4)], lane / 4);
            high = shared_b16(matrix[2 * (lane % 4) + 1], lane / 4);
        } else { /* elements [l / 4][2 (l % 4)] and [l / 4][2 (l % 4) + 1] */
            low = shared_b16(matrix[lane / 4], 2 * (lane % 4));
            high = shared_b16(matrix[lane / 4], 2 * (lane % 4) + 1);
        }
        r[m] = low | high << 16;
    }
}

} // namespace supcon_emu

#endif /* SUPCON_TENSOR_CORE_EMU_H */
