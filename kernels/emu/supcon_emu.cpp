/*
 * The C interface of the emulated SupCon kernels, for the Rust side (src/emulated.rs):
 *   - supcon_emu_launch: launch a kernel by its CUDA name;
 *   - supcon_emu_params_size / supcon_emu_params_field: the layout of SupconParams as this
 *     compiler sees it, so a Rust test can check its mirror field by field;
 *   - supcon_emu_constant: the option codes and tile sizes the Rust launch plan relies on.
 */
#include <stddef.h>
#include <string.h>

#include "../supcon_common.cuh"
#include "../supcon_mma_tiles.cuh"
#include "cuda_emu_runtime.h"

/* The kernels' entry points, defined in the .cu files compiled as C++. */
extern "C" {
void supcon_forward_f32(SupconParams);
void supcon_forward_f16(SupconParams);
void supcon_forward_bf16(SupconParams);
void supcon_forward_finalize(SupconParams);
void supcon_backward_f32(SupconParams);
void supcon_backward_f16(SupconParams);
void supcon_backward_bf16(SupconParams);
void supcon_backward_coefficients(SupconParams);
void supcon_mma_forward_f16(SupconParams);
void supcon_mma_forward_bf16(SupconParams);
void supcon_mma_backward_f16(SupconParams);
void supcon_mma_backward_bf16(SupconParams);
}

namespace {

struct NamedKernel {
    const char* name;
    supcon_emu::Kernel kernel;
};

constexpr NamedKernel kKernels[] = {
    {"supcon_forward_f32", supcon_forward_f32},   {"supcon_forward_f16", supcon_forward_f16},
    {"supcon_forward_bf16", supcon_forward_bf16}, {"supcon_forward_finalize", supcon_forward_finalize},
    {"supcon_backward_f32", supcon_backward_f32}, {"supcon_backward_f16", supcon_backward_f16},
    {"supcon_backward_bf16", supcon_backward_bf16}, {"supcon_backward_coefficients", supcon_backward_coefficients},
    {"supcon_mma_forward_f16", supcon_mma_forward_f16}, {"supcon_mma_forward_bf16", supcon_mma_forward_bf16},
    {"supcon_mma_backward_f16", supcon_mma_backward_f16}, {"supcon_mma_backward_bf16", supcon_mma_backward_bf16},
};

struct FieldLayout {
    const char* name;
    size_t offset;
    size_t size;
};

#define SUPCON_FIELD(field) {#field, offsetof(SupconParams, field), sizeof(SupconParams::field)}
constexpr FieldLayout kFields[] = {
    SUPCON_FIELD(features),
    SUPCON_FIELD(labels),
    SUPCON_FIELD(mask),
    SUPCON_FIELD(anchor_lse),
    SUPCON_FIELD(anchor_lse_lo),
    SUPCON_FIELD(anchor_scaled_positive_lse),
    SUPCON_FIELD(anchor_scaled_positive_lse_lo),
    SUPCON_FIELD(anchor_positive_weight),
    SUPCON_FIELD(anchor_positive_weight_max),
    SUPCON_FIELD(anchor_loss),
    SUPCON_FIELD(reduced_loss),
    SUPCON_FIELD(anchors_without_positives),
    SUPCON_FIELD(anchor_grad_coef),
    SUPCON_FIELD(grad_features),
    SUPCON_FIELD(anchor_upstream),
    SUPCON_FIELD(upstream_scalar),
    SUPCON_FIELD(loss_scale_exact),
    SUPCON_FIELD(batch),
    SUPCON_FIELD(views),
    SUPCON_FIELD(dim),
    SUPCON_FIELD(rows),
    SUPCON_FIELD(anchors),
    SUPCON_FIELD(positive_kind),
    SUPCON_FIELD(denominator),
    SUPCON_FIELD(summation),
    SUPCON_FIELD(reduction),
    SUPCON_FIELD(no_positive_policy),
    SUPCON_FIELD(inv_temperature),
    SUPCON_FIELD(loss_scale),
};
#undef SUPCON_FIELD

constexpr size_t listed_bytes() {
    size_t total = 0;
    for (const FieldLayout& field : kFields) total += field.size;
    return total;
}
/* With no padding (the header's rule), the list is complete exactly when the sizes add up. */
static_assert(listed_bytes() == sizeof(SupconParams), "kFields must list every SupconParams field");

struct NamedConstant {
    const char* name;
    int64_t value;
};

constexpr NamedConstant kConstants[] = {
    {"SUPCON_POSITIVES_SAME_SAMPLE", SUPCON_POSITIVES_SAME_SAMPLE},
    {"SUPCON_POSITIVES_LABELS", SUPCON_POSITIVES_LABELS},
    {"SUPCON_POSITIVES_MASK", SUPCON_POSITIVES_MASK},
    {"SUPCON_DENOMINATOR_ALL", SUPCON_DENOMINATOR_ALL},
    {"SUPCON_DENOMINATOR_ONLY_NEGATIVES", SUPCON_DENOMINATOR_ONLY_NEGATIVES},
    {"SUPCON_SUMMATION_OUTSIDE", SUPCON_SUMMATION_OUTSIDE},
    {"SUPCON_SUMMATION_INSIDE", SUPCON_SUMMATION_INSIDE},
    {"SUPCON_REDUCTION_MEAN", SUPCON_REDUCTION_MEAN},
    {"SUPCON_REDUCTION_SUM", SUPCON_REDUCTION_SUM},
    {"SUPCON_REDUCTION_NONE", SUPCON_REDUCTION_NONE},
    {"SUPCON_NO_POSITIVE_ZERO_AND_COUNT", SUPCON_NO_POSITIVE_ZERO_AND_COUNT},
    {"SUPCON_NO_POSITIVE_EXCLUDE", SUPCON_NO_POSITIVE_EXCLUDE},
    {"SUPCON_NO_POSITIVE_ERROR", SUPCON_NO_POSITIVE_ERROR},
    {"kThreads", supcon::kThreads},
    {"kTileRows", supcon::kTileRows},
    {"kGradChunk", supcon::kGradChunk},
    {"kFinalizeThreads", supcon::kFinalizeThreads},
    {"kCoefficientThreads", supcon::kCoefficientThreads},
    {"tc::kThreads", supcon::tc::kThreads},
    /* The tensor-core kernels' dynamic shared memory at D = 130 (padded to 144): 3 rows of 64. */
    {"tc::kSharedBytesD130", 3 * supcon::tc::kRows * static_cast<int64_t>(supcon::tc::row_stride(130)) * 2},
    {"kMaxDynamicSharedBytes", static_cast<int64_t>(supcon_emu::kMaxDynamicSharedBytes)},
};

} // namespace

extern "C" int supcon_emu_launch(const char* kernel, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                                 unsigned block_x, unsigned block_y, unsigned block_z, size_t dynamic_shared_bytes,
                                 const SupconParams* params) {
    if (kernel == nullptr || params == nullptr) return SUPCON_EMU_NULL_ARGUMENT;
    for (const NamedKernel& entry : kKernels) {
        if (strcmp(entry.name, kernel) == 0) {
            return supcon_emu::launch(entry.kernel, dim3{grid_x, grid_y, grid_z}, dim3{block_x, block_y, block_z},
                                      dynamic_shared_bytes, *params);
        }
    }
    return SUPCON_EMU_UNKNOWN_KERNEL;
}

extern "C" size_t supcon_emu_params_size(void) { return sizeof(SupconParams); }

/* Field `index` of SupconParams in declaration order; returns 0 past the last field. */
extern "C" int supcon_emu_params_field(size_t index, const char** name, size_t* offset, size_t* size) {
    if (index >= sizeof kFields / sizeof kFields[0]) return 0;
    *name = kFields[index].name;
    *offset = kFields[index].offset;
    *size = kFields[index].size;
    return 1;
}

/* Writes the constant called `name` to *value and returns 1; returns 0 for an unknown name. */
extern "C" int supcon_emu_constant(const char* name, int64_t* value) {
    for (const NamedConstant& constant : kConstants) {
        if (strcmp(constant.name, name) == 0) {
            *value = constant.value;
            return 1;
        }
    }
    return 0;
}
