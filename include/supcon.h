/* supcon.h: the C ABI of the supcon crate (feature `capi`), exported by libsupcon.so.
 *
 * The Supervised Contrastive loss (Khosla et al. 2020) and its gradient from fused kernels
 * that never build the N x N similarity matrix. See src/capi/ for the contract of each
 * function; tests/capi.rs checks that this header declares exactly what the library defines.
 *
 * - Every function returns a status: SUPCON_OK, or an error code whose message is
 *   supcon_last_error() (per thread, valid until the thread's next call).
 * - A handle owns the options and the backend; a forward pass returns a state (the O(N)
 *   statistics) for the backward pass. Free both with their _free function.
 * - Arrays are row-major and contiguous: features [B][V][D] of the element type `dtype`,
 *   labels int64_t[B], a mask float[B*B], label sets uint8_t[B*K] (nonzero: a member). The
 *   gradient is float[B*V*D] (double for SUPCON_F64 features).
 * - The _device functions take device pointers and queue the CUDA kernels on the caller's
 *   CUstream (of GPU 0's primary context, the CUDA runtime's), on a handle of
 *   SUPCON_BACKEND_CUDA: supcon_device_layout sizes the workspace and scratch the caller
 *   allocates; nothing is allocated, copied or awaited.
 */
#ifndef SUPCON_H
#define SUPCON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Statuses. */
#define SUPCON_OK 0
#define SUPCON_INVALID_ARGUMENT 1
#define SUPCON_UNSUPPORTED 2
#define SUPCON_OUT_OF_MEMORY 3
#define SUPCON_NO_CUDA 4
#define SUPCON_CUDA_ERROR 5
#define SUPCON_ANCHOR_WITHOUT_POSITIVES 6
#define SUPCON_PANIC 7
#define SUPCON_ERROR 8

/* SupconOptions fields. */
#define SUPCON_CONTRAST_ALL 0
#define SUPCON_CONTRAST_ONE 1
#define SUPCON_SUMMATION_OUTSIDE 0
#define SUPCON_SUMMATION_INSIDE 1
#define SUPCON_DENOMINATOR_ALL 0
#define SUPCON_DENOMINATOR_ONLY_NEGATIVES 1
#define SUPCON_DENOMINATOR_ONE_POSITIVE 2
#define SUPCON_NO_POSITIVE_ZERO_AND_COUNT 0
#define SUPCON_NO_POSITIVE_EXCLUDE 1
#define SUPCON_NO_POSITIVE_ERROR 2
#define SUPCON_REDUCTION_MEAN 0
#define SUPCON_REDUCTION_SUM 1
#define SUPCON_REDUCTION_NONE 2

/* Backends of supcon_new. */
#define SUPCON_BACKEND_AUTO 0
#define SUPCON_BACKEND_CPU 1
#define SUPCON_BACKEND_REFERENCE 2
#define SUPCON_BACKEND_CUDA 3

/* Feature element types (f16 and bf16 as uint16_t bits). */
#define SUPCON_F32 0
#define SUPCON_F16 1
#define SUPCON_BF16 2
#define SUPCON_F64 3

/* SupconPositives fields. */
#define SUPCON_POSITIVES_SIMCLR 0
#define SUPCON_POSITIVES_LABELS 1
#define SUPCON_POSITIVES_MASK 2
#define SUPCON_POSITIVES_LABEL_SETS 3
#define SUPCON_SET_WEIGHT_ANY 0
#define SUPCON_SET_WEIGHT_JACCARD 1
#define SUPCON_SET_WEIGHT_FRACTION 2

/* The loss's options; supcon_options_default fills in the paper's. */
typedef struct SupconOptions {
    double temperature;      /* tau > 0 */
    double base_temperature; /* tau_b > 0: the loss is scaled by tau / tau_b */
    uint32_t contrast_mode;  /* SUPCON_CONTRAST_* */
    uint32_t summation;      /* SUPCON_SUMMATION_* */
    uint32_t denominator;    /* SUPCON_DENOMINATOR_* */
    uint32_t no_positive;    /* SUPCON_NO_POSITIVE_* */
    uint32_t reduction;      /* SUPCON_REDUCTION_* */
    uint32_t normalize;      /* nonzero: rows are L2-normalised inside the loss */
    uint64_t positives_cap;  /* at most this many positives per anchor; 0: no cap */
} SupconOptions;

/* What makes two rows positives. */
typedef struct SupconPositives {
    uint32_t kind;       /* SUPCON_POSITIVES_* */
    uint32_t set_weight; /* SUPCON_SET_WEIGHT_*, for label sets */
    const void *data;    /* labels, mask or label sets; unused for SimCLR */
    size_t classes;      /* K of the label sets */
} SupconPositives;

/* Where supcon_forward_device writes its outputs, and the buffers the device passes need. */
typedef struct SupconDeviceLayout {
    size_t workspace_bytes;  /* the workspace, 256-byte aligned */
    size_t scratch_bytes;    /* the backward pass's scratch */
    size_t loss_offset;      /* double: the reduced loss (sum of l_i under reduction none) */
    size_t per_anchor_offset; /* float[anchors]: l_i */
    size_t anchors_without_positives_offset; /* uint32_t, for SUPCON_NO_POSITIVE_ERROR */
    size_t anchors;          /* R: the length of l_i and of the upstream gradient */
} SupconDeviceLayout;

typedef struct SupconHandle SupconHandle;
typedef struct SupconState SupconState;

const char *supcon_last_error(void);
int32_t supcon_abi_sizes(size_t *options, size_t *positives);
int32_t supcon_options_default(SupconOptions *options);
int32_t supcon_new(const SupconOptions *options, uint32_t backend, SupconHandle **handle);
void supcon_free(SupconHandle *handle);
void supcon_state_free(SupconState *state);
const char *supcon_backend_name(const SupconHandle *handle);
int32_t supcon_anchors(const SupconHandle *handle, size_t batch, size_t views, size_t *anchors);
int32_t supcon_forward(const SupconHandle *handle, const void *features, uint32_t dtype,
                       size_t batch, size_t views, size_t dim, const SupconPositives *positives,
                       double *loss, double *per_anchor, SupconState **state);
int32_t supcon_backward(const SupconHandle *handle, const SupconState *state,
                        const void *features, uint32_t dtype, size_t batch, size_t views,
                        size_t dim, const SupconPositives *positives, const double *upstream,
                        size_t upstream_len, void *grad);
int32_t supcon_forward_backward(const SupconHandle *handle, const void *features,
                                uint32_t dtype, size_t batch, size_t views, size_t dim,
                                const SupconPositives *positives, double *loss, void *grad);
int32_t supcon_device_layout(const SupconHandle *handle, size_t batch, size_t views, size_t dim,
                             const SupconPositives *positives, SupconDeviceLayout *layout);
int32_t supcon_forward_device(const SupconHandle *handle, void *stream, const void *features,
                              uint32_t dtype, size_t batch, size_t views, size_t dim,
                              const SupconPositives *positives, void *workspace,
                              size_t workspace_bytes);
int32_t supcon_backward_device(const SupconHandle *handle, void *stream, const void *features,
                               uint32_t dtype, size_t batch, size_t views, size_t dim,
                               const SupconPositives *positives, const void *workspace,
                               size_t workspace_bytes, const double *upstream, void *scratch,
                               size_t scratch_bytes, float *grad);

#ifdef __cplusplus
}
#endif

#endif /* SUPCON_H */
