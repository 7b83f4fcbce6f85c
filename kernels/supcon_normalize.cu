/*
 * The row scales of the fused L2 normalisation (docs/math.md, "Fused normalisation"): the loss
 * of u = x / max(|x|, eps) per row, eps = 1e-12, as torch.nn.functional.normalize(x, dim=-1).
 *
 * supcon_row_scales_{f32,f16,bf16}: grid ceil(N / 8) blocks of 256 threads, one warp per
 * flattened row r = v B + b (stored at (b V + v) D). Lane l sums the squares of elements
 * l, l + 32, ... in double, where neither the square of any float nor a sum of 2^31 of them
 * overflows or underflows, so |x| is exact to double rounding at any scale the features can
 * hold; an xor butterfly adds the 32 lanes in a fixed order. Lane 0 writes
 *     scales[r] =  1 / max(|x_r|, eps)   rounded to float, where |x_r| >= eps,
 *              = -1 / eps                where |x_r| < eps,
 * the sign telling the backward kernel that the clamp holds the divisor constant, so that the
 * gradient there is dL/du / eps, without the projection (torch's clamp_min passes no gradient).
 * The forward and backward kernels multiply every element they load by |scales[r]|
 * (supcon_common.cuh): normalised rows are never stored. One read of the features, 4 N bytes
 * written.
 */
#include "supcon_common.cuh"

namespace supcon {
namespace {

constexpr double kNormEpsilon = 1e-12;

template <typename T>
__device__ __forceinline__ void row_scales(const SupconRowScalesParams& params) {
    const SupconProblem& p = params.problem;
    const T* __restrict__ features = reinterpret_cast<const T*>(p.features);
    const int lane = threadIdx.x % 32;
    const uint32_t row = blockIdx.x * (kRowScalesThreads / 32) + threadIdx.x / 32;
    /* Whole warps stay to the end: the butterfly needs every lane. */
    const bool in_rows = row < p.rows;
    const uint32_t sample = in_rows ? row % p.batch : 0;
    const uint32_t view = in_rows ? row / p.batch : 0;
    const T* x = features + (static_cast<uint64_t>(sample) * p.views + view) * p.dim;
    double squares = 0.0;
    if (in_rows) {
        for (uint32_t k = lane; k < p.dim; k += 32) {
            const double value = load_as_float(x + k);
            squares = fma(value, value, squares);
        }
    }
    for (int lanes = 16; lanes > 0; lanes /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, lanes);
    if (in_rows && lane == 0) {
        const double norm = sqrt(squares);
        const float scale = static_cast<float>(1.0 / fmax(norm, kNormEpsilon));
        reinterpret_cast<float*>(params.scales)[row] = norm < kNormEpsilon ? -scale : scale;
    }
}

} // namespace
} // namespace supcon

extern "C" __global__ void __launch_bounds__(supcon::kRowScalesThreads)
    supcon_row_scales_f32(const SupconRowScalesParams params) {
    supcon::row_scales<float>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kRowScalesThreads)
    supcon_row_scales_f16(const SupconRowScalesParams params) {
    supcon::row_scales<__half>(params);
}

extern "C" __global__ void __launch_bounds__(supcon::kRowScalesThreads)
    supcon_row_scales_bf16(const SupconRowScalesParams params) {
    supcon::row_scales<__nv_bfloat16>(params);
}
