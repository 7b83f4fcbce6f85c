/*
 * Tensor-core building blocks (sm_80 and newer) as inline PTX, with host twins for the emulation
 * (emu/tensor_core_emu.h) that follow the PTX ISA's fragment layouts, so the emulated kernels
 * compute what the GPU computes and a wrong fragment mapping fails the emulated tests.
 *
 *   mma_m16n8k16<T>   D += A B: A 16 x 16 (row), B 16 x 8 (col), T = __half or __nv_bfloat16,
 *                     f32 accumulators (mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32)
 *   ldmatrix_x4       four 8 x 8 b16 matrices from shared memory (ldmatrix...x4.shared.b16)
 *   ldmatrix_x4_trans the same, each matrix transposed (.trans)
 *   cp_async_16       16 bytes global -> shared without a register round trip (cp.async.cg),
 *                     zero-filled when `fill` is false; cp_async_commit / cp_async_wait<N>
 *                     group and retire them (commit_group, wait_group N)
 *   pack_bf16x2       two floats rounded to bf16, as one A/B register (cvt.rn.bf16x2.f32)
 *   exp2_approx       2^x in one MUFU instruction (ex2.approx.ftz.f32: within ~2 ulp, the
 *                     CUDA guide's bound for exp2f, which is this instruction plus the scaling
 *                     that keeps subnormal results; here results below 2^-126 are zero);
 *                     exp_approx(x) = exp2_approx(x log2 e), one FMUL more
 *
 * Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"), for
 * lane = 4 * group + quad (group 0..7, quad 0..3); each 32-bit register holds two consecutive
 * elements, the lower-indexed one in its low half:
 *   A (4 registers): a0 = A[group][2quad, +1]      a1 = A[group + 8][2quad, +1]
 *                    a2 = A[group][2quad + 8, +9]  a3 = A[group + 8][2quad + 8, +9]
 *   B (2 registers): b0 = B[2quad, +1][group]      b1 = B[2quad + 8, +9][group]
 *   C, D (4 floats): c0, c1 = C[group][2quad, +1]  c2, c3 = C[group + 8][2quad, +1]
 * ldmatrix: lane 8m + i gives the address of row i of matrix m; register m of lane l receives
 * row l / 4, elements 2 (l % 4), +1 of matrix m (with .trans: elements [2 (l % 4)][l / 4] and
 * [2 (l % 4) + 1][l / 4], i.e. row l / 4 of the transposed matrix).
 *
 * So a row-major 16 x 16 tile of A loads with one ldmatrix_x4 whose lanes point at row
 * (l % 16), column 8 (l / 16); a 16 x 8 B stored n-major (each of the 8 columns contiguous in k,
 * like rows of Z) loads with ldmatrix_x4 as two n-tiles; a k-major B (rows of Z indexed by k,
 * the backward's H Z) loads with ldmatrix_x4_trans. Two adjacent n-tiles of a C accumulator
 * are, element for element, the A fragment of one 16-wide k-step (FlashAttention-2's P V):
 * H never leaves the registers.
 */
#ifndef SUPCON_MMA_CUH
#define SUPCON_MMA_CUH

#include <stdint.h>

#if defined(SUPCON_EMULATION)
#include "emu/tensor_core_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace supcon {
namespace tc {

#if defined(SUPCON_EMULATION)

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    supcon_emu::mma_m16n8k16<T>(d, a, b);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    supcon_emu::ldmatrix_x4(r, row, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    supcon_emu::ldmatrix_x4(r, row, true);
}
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool fill) {
    supcon_emu::async_copy(shared, global, 16, fill ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { supcon_emu::async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    supcon_emu::async_wait(kPending);
}
/* Two floats rounded to nearest bf16, `low` in the low half: an mma operand register. */
__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
    return static_cast<uint32_t>(__float2bfloat16_rn(low).bits) | static_cast<uint32_t>(__float2bfloat16_rn(high).bits) << 16;
}
/* 2^x with ex2.approx.ftz's flush of subnormal results (NaN and infinities as exp2f). */
__device__ __forceinline__ float exp2_approx(float x) {
    const float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.0f : y;
}

#else

__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

/* src-size 0 reads nothing and fills the 16 bytes with zeros. */
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
                 "r"(fill ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

/* Two floats rounded to nearest bf16, `low` in the low half: an mma operand register (one
 * cvt.rn.bf16x2.f32). */
__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#endif

/* e^x as 2^(x log2 e): callers pass a difference (s - max), exact near the maximum at any
 * logit scale, rather than fold the shift into an FMA with log2 e. */
__device__ __forceinline__ float exp_approx(float x) {
    constexpr float kLog2e = 1.4426950408889634f;
    return exp2_approx(x * kLog2e);
}

} // namespace tc
} // namespace supcon

#endif /* SUPCON_MMA_CUH */
