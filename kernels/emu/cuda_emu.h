/*
 * Host emulation of the little of CUDA the SupCon kernels use, so that the unmodified .cu files
 * compile with g++ (-x c++ -include cuda_emu.h) and run on the CPU in tests.
 *
 * Execution model (cuda_emu.cpp): one OS thread per CUDA thread, taken from a pool that lives
 * across launches; the blocks of a grid run one after another, all threads of a block at once.
 * Hence:
 *   - __shared__ becomes `static`: a __shared__ variable declared in a kernel (or device
 *     function) is one object shared by every thread running that function, exactly the
 *     per-block storage CUDA gives it, since only one block runs at a time (launches are
 *     serialised too). Dynamic shared memory is one buffer per launch of exactly the size asked
 *     for (supcon::dynamic_shared() in the kernels).
 *   - __syncthreads() is a std::barrier across the block's threads.
 *   - Warp shuffles exchange values through a per-warp buffer guarded by a per-warp barrier; the
 *     warp-wide tensor-core instructions (mma.sync, ldmatrix) gather their lanes' registers the
 *     same way and compute each lane's share by the PTX ISA's fragment layouts
 *     (tensor_core_emu.cpp).
 *   - cp.async copies are deferred: a thread's copies land when its cp.async.wait_group retires
 *     their group, so a kernel that reads a stage before waiting for it reads stale data.
 *   - threadIdx / blockIdx / blockDim / gridDim are thread_local variables.
 *   - __half and __nv_bfloat16 are our own storage types with exact widening to float (the
 *     kernels only read half-precision data), so the emulation needs no CUDA headers.
 * Real data races in a kernel stay data races here (threads really run concurrently), so the
 * emulated kernels can be checked with ThreadSanitizer and AddressSanitizer
 * (scripts/sanitize-emulated.sh).
 */
#ifndef SUPCON_CUDA_EMU_H
#define SUPCON_CUDA_EMU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#define SUPCON_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

/* a * b rounded to float on its own, as on the GPU: the volatile store keeps g++ from fusing it
 * into a following addition even when built with -ffp-contract=fast. */
inline float __fmul_rn(float a, float b) {
    volatile float product = a * b;
    return product;
}

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace supcon_emu {

/* Waits until every thread of the current block has arrived. */
void sync_block();

/* Returns `bits` of lane (this lane ^ lane_mask) of the current warp. All lanes of the warp
 * must take part (`mask` must name them all); anything else aborts. */
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask);

/* Copies `bytes` (at most 32) from `mine` of every lane of the current warp into `all`, lane by
 * lane. The warp must be full and every lane must take part. */
void warp_gather(const void* mine, size_t bytes, void* all);

/* The current block's dynamic shared memory (the launch must have asked for some). */
unsigned char* dynamic_shared();

/* cp.async: queues a copy of `source_bytes` from `source` to `destination`, zero-filling up to
 * `bytes`, in this thread's uncommitted group. */
void async_copy(void* destination, const void* source, size_t bytes, size_t source_bytes);
/* cp.async.commit_group. */
void async_commit();
/* cp.async.wait_group: performs this thread's oldest committed groups until at most `pending`
 * remain. */
void async_wait(unsigned pending);

} // namespace supcon_emu

inline void __syncthreads() { supcon_emu::sync_block(); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= sizeof(uint64_t), "shuffles move at most 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof value);
    bits = supcon_emu::shuffle_xor(mask, bits, lane_mask);
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* IEEE binary16 storage. */
struct __half {
    uint16_t bits;
};

/* bfloat16 storage (the upper half of a binary32). */
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float supcon_emu_float_from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Exact: every binary16 value is a binary32 value. */
inline float __half2float(__half h) {
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    const uint32_t exponent = (h.bits >> 10) & 0x1fu;
    const uint32_t mantissa = h.bits & 0x3ffu;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        const float magnitude = ldexpf(static_cast<float>(mantissa), -24);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) { /* infinity or NaN (payload kept) */
        return supcon_emu_float_from_bits(sign | 0x7f800000u | (mantissa << 13));
    }
    return supcon_emu_float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float __bfloat162float(__nv_bfloat16 h) { return supcon_emu_float_from_bits(static_cast<uint32_t>(h.bits) << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN of the same sign. */
/* Bit counts and exactly rounded conversions and division (g++ in ISO mode rounds each to
 * nearest, as these intrinsics do). */
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return __nv_bfloat16{static_cast<uint16_t>(bits >> 16)};
}

#endif /* SUPCON_CUDA_EMU_H */
