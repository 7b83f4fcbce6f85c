/*
 * The positives prepared on the device, for the device API: label sets packed into bitsets and
 * the per-sample bounds of a positives cap. On host arrays the host computes both
 * (src/device/host.rs, src/cpu/relation.rs); a trainer's positives live on the GPU, and reading
 * them back would synchronise its stream. Both kernels write O(B) state that the forward and
 * the backward kernels then read (SupconProblem's label_sets and cap_bounds).
 *
 * supcon_pack_label_sets: grid ceil(B / 256) blocks of 256 threads, one sample each. Sample b's
 * multi-hot row memberships[b][0..K) (bytes, nonzero: a member) becomes |Y_b| followed by
 * set_words 64-bit words, label k at bit k % 64 of word 1 + k / 64, the layout of
 * SupconProblem::label_sets. O(B K) bytes read, O(B K / 64) written.
 *
 * supcon_cap_bounds: grid B blocks of 256 threads, block s for sample s. With `own` the positives
 * of a row of s among its own sample's other views (V - 1, or 0 for a mask whose w_ss is not
 * positive) and K the other samples that are positives of s (same label; mask weight > 0; a
 * shared label), the rows j = v B + b are visited in ascending order and hold K positives of
 * other samples per view. The cap keeps room = cap - own of them: the room-th is in view
 * (room - 1) / K at the ((room - 1) mod K)-th such sample b*, so
 *     bound_s = 0                          room = 0 (the own sample's views fill the cap)
 *             = N                          K = 0 or (room - 1) / K >= V (the cap keeps all)
 *             = ((room - 1) / K) B + b* + 1 otherwise,
 * and an anchor of sample s keeps a positive of another sample at row j iff j < bound_s. This
 * is src/cpu/relation.rs's per_sample_bounds, computed by two sweeps over the samples: one
 * counts K (a block reduction), one finds b* (a block prefix count per chunk of 256 samples,
 * stopping at the chunk that holds it). O(B) work per sample, O(B^2) in all: label comparisons,
 * a mask row, or popcounts of set intersections, all L2-resident for any batch of a training
 * step.
 */
#include "supcon_common.cuh"

namespace supcon {
namespace {

/* Whether sample b != s is a positive of sample s (before the cap). */
__device__ __forceinline__ bool other_sample_is_positive(const SupconProblem& p, uint32_t s, uint32_t b) {
    switch (p.positive_kind) {
    case SUPCON_POSITIVES_LABELS: {
        const int64_t* labels = reinterpret_cast<const int64_t*>(p.labels);
        return labels[s] == labels[b];
    }
    case SUPCON_POSITIVES_MASK:
        return reinterpret_cast<const float*>(p.mask)[static_cast<uint64_t>(s) * p.batch + b] > 0.0f;
    case SUPCON_POSITIVES_LABEL_SETS: {
        /* Every weight mode is positive exactly where the sets intersect. */
        const uint64_t* sets = reinterpret_cast<const uint64_t*>(p.label_sets);
        const uint64_t* a = sets + static_cast<uint64_t>(s) * (p.set_words + 1);
        const uint64_t* c = sets + static_cast<uint64_t>(b) * (p.set_words + 1);
        uint64_t shared = 0;
#pragma unroll 1
        for (uint32_t w = 1; w <= p.set_words; ++w) shared |= a[w] & c[w];
        return shared != 0;
    }
    default: /* SimCLR: only the own sample's views */
        return false;
    }
}

/* The sum of `value` over the block, in every thread. Ends with a barrier after which `scratch`
 * may be reused. */
__device__ __forceinline__ uint32_t block_sum(uint32_t value, uint32_t (&scratch)[kPositivesThreads / 32]) {
    for (int lanes = 16; lanes > 0; lanes /= 2) value += __shfl_xor_sync(0xffffffffu, value, lanes);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
    __syncthreads();
    uint32_t total = 0;
#pragma unroll
    for (int w = 0; w < kPositivesThreads / 32; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

} // namespace
} // namespace supcon

extern "C" __global__ void __launch_bounds__(supcon::kPositivesThreads)
    supcon_pack_label_sets(const SupconPositivesParams params) {
    const SupconProblem& p = params.problem;
    const uint32_t sample = blockIdx.x * supcon::kPositivesThreads + threadIdx.x;
    if (sample >= p.batch) return;
    const uint8_t* row = reinterpret_cast<const uint8_t*>(params.memberships) + static_cast<uint64_t>(sample) * params.classes;
    uint64_t* set = reinterpret_cast<uint64_t*>(p.label_sets) + static_cast<uint64_t>(sample) * (p.set_words + 1);
    uint64_t size = 0;
    for (uint32_t w = 0; w < p.set_words; ++w) {
        uint64_t bits = 0;
        const uint32_t first = w * 64;
        for (uint32_t k = first; k < params.classes && k < first + 64; ++k) {
            bits |= static_cast<uint64_t>(row[k] != 0) << (k - first);
        }
        set[1 + w] = bits;
        size += __popcll(bits);
    }
    set[0] = size;
}

extern "C" __global__ void __launch_bounds__(supcon::kPositivesThreads)
    supcon_cap_bounds(const SupconPositivesParams params) {
    constexpr uint32_t kThreads = supcon::kPositivesThreads;
    __shared__ uint32_t scratch[kThreads / 32];
    __shared__ uint32_t prefix[kThreads];
    const SupconProblem& p = params.problem;
    const uint32_t s = blockIdx.x;
    const uint32_t t = threadIdx.x;

    uint32_t mine = 0;
    for (uint32_t b = t; b < p.batch; b += kThreads) mine += b != s && supcon::other_sample_is_positive(p, s, b);
    const uint32_t others = supcon::block_sum(mine, scratch);

    const bool own_views_positive =
        p.positive_kind != SUPCON_POSITIVES_MASK ||
        reinterpret_cast<const float*>(p.mask)[static_cast<uint64_t>(s) * p.batch + s] > 0.0f;
    const uint32_t own = own_views_positive ? p.views - 1 : 0;
    uint32_t* bounds = reinterpret_cast<uint32_t*>(params.bounds);
    const uint32_t room = params.cap > own ? params.cap - own : 0;
    if (room == 0) {
        if (t == 0) bounds[s] = 0;
        return;
    }
    if (others == 0 || (room - 1) / others >= p.views) {
        if (t == 0) bounds[s] = p.rows;
        return;
    }
    const uint32_t view = (room - 1) / others;
    /* b* is the positive sample with `wanted` positive samples before it. */
    const uint32_t wanted = (room - 1) % others;
    uint32_t before = 0; /* positive samples in the chunks already swept */
    for (uint32_t first = 0; first < p.batch; first += kThreads) {
        const uint32_t b = first + t;
        const bool positive = b < p.batch && b != s && supcon::other_sample_is_positive(p, s, b);
        /* Inclusive prefix count over the chunk (Hillis-Steele). */
        prefix[t] = positive;
        __syncthreads();
        for (uint32_t step = 1; step < kThreads; step *= 2) {
            const uint32_t add = t >= step ? prefix[t - step] : 0;
            __syncthreads();
            prefix[t] += add;
            __syncthreads();
        }
        if (positive && before + prefix[t] == wanted + 1) bounds[s] = view * p.batch + b + 1;
        const uint32_t chunk = prefix[kThreads - 1];
        __syncthreads(); /* everyone has read prefix before the next chunk rewrites it */
        before += chunk;
        if (before > wanted) return;
    }
}
