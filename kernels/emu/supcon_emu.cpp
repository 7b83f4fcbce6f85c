/*
 * The C interface of the emulated SupCon kernels, for the Rust side (src/emulated.rs):
 *   - supcon_emu_launch: launch a kernel by its CUDA name;
 *   - supcon_emu_params_size / supcon_emu_params_field: the layout of each parameter block as
 *     this compiler sees it, so a Rust test can check its mirror field by field;
 *   - supcon_emu_constant: the option codes and tile sizes the Rust launch plan relies on.
 */
#include <stddef.h>
#include <string.h>

#include "../supcon_common.cuh"
#include "../supcon_mma_tiles.cuh"
#include "../supcon_statistics.cuh"
#include "cuda_emu_runtime.h"

/* The kernels' entry points, defined in the .cu files compiled as C++. */
extern "C" {
void supcon_forward_f32(SupconForwardParams);
void supcon_forward_f16(SupconForwardParams);
void supcon_forward_bf16(SupconForwardParams);
void supcon_forward_positive_terms_f32(SupconForwardParams);
void supcon_forward_positive_terms_f16(SupconForwardParams);
void supcon_forward_positive_terms_bf16(SupconForwardParams);
void supcon_forward_merge(SupconForwardParams);
void supcon_forward_finalize(SupconFinalizeParams);
void supcon_backward_f32(SupconBackwardParams);
void supcon_backward_f16(SupconBackwardParams);
void supcon_backward_bf16(SupconBackwardParams);
void supcon_backward_coefficients(SupconCoefficientParams);
void supcon_mma_forward_f32x3(SupconForwardParams);
void supcon_mma_forward_f16(SupconForwardParams);
void supcon_mma_forward_bf16(SupconForwardParams);
void supcon_mma_forward_positive_terms_f32x3(SupconForwardParams);
void supcon_mma_forward_positive_terms_f16(SupconForwardParams);
void supcon_mma_forward_positive_terms_bf16(SupconForwardParams);
void supcon_mma_backward_f32x3(SupconBackwardParams);
void supcon_mma_backward_wide_f16(SupconBackwardParams);
void supcon_mma_backward_wide_bf16(SupconBackwardParams);
void supcon_mma_backward_wide_f32x3(SupconBackwardParams);
void supcon_mma_backward_f16(SupconBackwardParams);
void supcon_mma_backward_bf16(SupconBackwardParams);
void supcon_pack_label_sets(SupconPositivesParams);
void supcon_cap_bounds(SupconPositivesParams);
void supcon_row_scales_f32(SupconRowScalesParams);
void supcon_row_scales_f16(SupconRowScalesParams);
void supcon_row_scales_bf16(SupconRowScalesParams);
}

namespace {

struct NamedKernel {
    const char* name;
    supcon_emu::Kernel kernel;
    size_t params_bytes; /* sizeof its parameter block */
};

#define SUPCON_KERNEL(name, Params) {#name, supcon_emu::entry<Params, name>, sizeof(Params)}
constexpr NamedKernel kKernels[] = {
    SUPCON_KERNEL(supcon_forward_f32, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_f16, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_bf16, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_positive_terms_f32, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_positive_terms_f16, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_positive_terms_bf16, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_merge, SupconForwardParams),
    SUPCON_KERNEL(supcon_forward_finalize, SupconFinalizeParams),
    SUPCON_KERNEL(supcon_backward_f32, SupconBackwardParams),
    SUPCON_KERNEL(supcon_backward_f16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_backward_bf16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_backward_coefficients, SupconCoefficientParams),
    SUPCON_KERNEL(supcon_mma_forward_f32x3, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_forward_f16, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_forward_bf16, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_forward_positive_terms_f32x3, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_forward_positive_terms_f16, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_forward_positive_terms_bf16, SupconForwardParams),
    SUPCON_KERNEL(supcon_mma_backward_f32x3, SupconBackwardParams),
    SUPCON_KERNEL(supcon_mma_backward_wide_f16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_mma_backward_wide_bf16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_mma_backward_wide_f32x3, SupconBackwardParams),
    SUPCON_KERNEL(supcon_mma_backward_f16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_mma_backward_bf16, SupconBackwardParams),
    SUPCON_KERNEL(supcon_pack_label_sets, SupconPositivesParams),
    SUPCON_KERNEL(supcon_cap_bounds, SupconPositivesParams),
    SUPCON_KERNEL(supcon_row_scales_f32, SupconRowScalesParams),
    SUPCON_KERNEL(supcon_row_scales_f16, SupconRowScalesParams),
    SUPCON_KERNEL(supcon_row_scales_bf16, SupconRowScalesParams),
};
#undef SUPCON_KERNEL

struct FieldLayout {
    const char* name;
    size_t offset;
    size_t size;
};

/* Every leaf field of a parameter block, nested ones as "outer.inner". */
#define SUPCON_FIELD(Struct, field) {#field, offsetof(Struct, field), sizeof(Struct::field)}
#define SUPCON_PROBLEM_FIELDS(Struct)                                                                            \
    SUPCON_FIELD(Struct, problem.features), SUPCON_FIELD(Struct, problem.labels),                                 \
        SUPCON_FIELD(Struct, problem.mask), SUPCON_FIELD(Struct, problem.label_sets),                           \
        SUPCON_FIELD(Struct, problem.cap_bounds), SUPCON_FIELD(Struct, problem.row_scales),                     \
        SUPCON_FIELD(Struct, problem.batch),                                                                    \
        SUPCON_FIELD(Struct, problem.views),                                                                    \
        SUPCON_FIELD(Struct, problem.dim), SUPCON_FIELD(Struct, problem.rows), SUPCON_FIELD(Struct, problem.anchors), \
        SUPCON_FIELD(Struct, problem.positive_kind), SUPCON_FIELD(Struct, problem.denominator),                  \
        SUPCON_FIELD(Struct, problem.summation), SUPCON_FIELD(Struct, problem.inv_temperature),                  \
        SUPCON_FIELD(Struct, problem.loss_scale), SUPCON_FIELD(Struct, problem.set_words),                      \
        SUPCON_FIELD(Struct, problem.set_weight)
#define SUPCON_STATISTICS_FIELDS(Struct)                                                                   \
    SUPCON_FIELD(Struct, statistics.lse), SUPCON_FIELD(Struct, statistics.lse_lo),                          \
        SUPCON_FIELD(Struct, statistics.scaled_positive_lse), SUPCON_FIELD(Struct, statistics.scaled_positive_lse_lo), \
        SUPCON_FIELD(Struct, statistics.positive_weight), SUPCON_FIELD(Struct, statistics.positive_weight_max), \
        SUPCON_FIELD(Struct, statistics.pull), SUPCON_FIELD(Struct, statistics.log_share)
#define SUPCON_REDUCTION_FIELDS(Struct)                                                                      \
    SUPCON_FIELD(Struct, reduction.anchors), SUPCON_FIELD(Struct, reduction.reduction),                       \
        SUPCON_FIELD(Struct, reduction.no_positive_policy), SUPCON_FIELD(Struct, reduction.padding)

constexpr FieldLayout kForwardFields[] = {
    SUPCON_PROBLEM_FIELDS(SupconForwardParams),         SUPCON_STATISTICS_FIELDS(SupconForwardParams),
    SUPCON_FIELD(SupconForwardParams, anchor_loss),     SUPCON_FIELD(SupconForwardParams, partials),
    SUPCON_FIELD(SupconForwardParams, anchor_begin),    SUPCON_FIELD(SupconForwardParams, anchor_end),
    SUPCON_FIELD(SupconForwardParams, column_splits),   SUPCON_FIELD(SupconForwardParams, padding),
};
constexpr FieldLayout kFinalizeFields[] = {
    SUPCON_FIELD(SupconFinalizeParams, anchor_loss),
    SUPCON_FIELD(SupconFinalizeParams, positive_weight),
    SUPCON_FIELD(SupconFinalizeParams, reduced_loss),
    SUPCON_FIELD(SupconFinalizeParams, anchors_without_positives),
    SUPCON_REDUCTION_FIELDS(SupconFinalizeParams),
};
constexpr FieldLayout kCoefficientFields[] = {
    SUPCON_FIELD(SupconCoefficientParams, lse),
    SUPCON_FIELD(SupconCoefficientParams, positive_weight),
    SUPCON_FIELD(SupconCoefficientParams, anchors_without_positives),
    SUPCON_FIELD(SupconCoefficientParams, upstream),
    SUPCON_FIELD(SupconCoefficientParams, grad_coef),
    SUPCON_FIELD(SupconCoefficientParams, upstream_scalar),
    SUPCON_FIELD(SupconCoefficientParams, loss_scale),
    SUPCON_REDUCTION_FIELDS(SupconCoefficientParams),
};
constexpr FieldLayout kBackwardFields[] = {
    SUPCON_PROBLEM_FIELDS(SupconBackwardParams),       SUPCON_STATISTICS_FIELDS(SupconBackwardParams),
    SUPCON_FIELD(SupconBackwardParams, grad_coef),     SUPCON_FIELD(SupconBackwardParams, grad_features),
    SUPCON_FIELD(SupconBackwardParams, grad_begin),    SUPCON_FIELD(SupconBackwardParams, grad_end),
};
constexpr FieldLayout kPositivesFields[] = {
    SUPCON_PROBLEM_FIELDS(SupconPositivesParams),
    SUPCON_FIELD(SupconPositivesParams, memberships), SUPCON_FIELD(SupconPositivesParams, bounds),
    SUPCON_FIELD(SupconPositivesParams, classes),     SUPCON_FIELD(SupconPositivesParams, cap),
};
constexpr FieldLayout kRowScalesFields[] = {
    SUPCON_PROBLEM_FIELDS(SupconRowScalesParams),
    SUPCON_FIELD(SupconRowScalesParams, scales),
};
#undef SUPCON_REDUCTION_FIELDS
#undef SUPCON_STATISTICS_FIELDS
#undef SUPCON_PROBLEM_FIELDS
#undef SUPCON_FIELD

struct StructLayout {
    const char* name;
    size_t size;
    const FieldLayout* fields;
    size_t count;
};

template <size_t kCount>
constexpr size_t listed_bytes(const FieldLayout (&fields)[kCount]) {
    size_t total = 0;
    for (const FieldLayout& field : fields) total += field.size;
    return total;
}

#define SUPCON_STRUCT(Struct, fields)                                                                  \
    static_assert(listed_bytes(fields) == sizeof(Struct), #fields " must list every " #Struct " field"); \
    constexpr StructLayout k##Struct = {#Struct, sizeof(Struct), fields, sizeof fields / sizeof fields[0]};
/* With no padding (the header's rule), a list is complete exactly when the sizes add up. */
SUPCON_STRUCT(SupconForwardParams, kForwardFields)
SUPCON_STRUCT(SupconFinalizeParams, kFinalizeFields)
SUPCON_STRUCT(SupconCoefficientParams, kCoefficientFields)
SUPCON_STRUCT(SupconBackwardParams, kBackwardFields)
SUPCON_STRUCT(SupconPositivesParams, kPositivesFields)
SUPCON_STRUCT(SupconRowScalesParams, kRowScalesFields)
#undef SUPCON_STRUCT
constexpr const StructLayout* kStructs[] = {&kSupconForwardParams, &kSupconFinalizeParams,
                                            &kSupconCoefficientParams, &kSupconBackwardParams,
                                            &kSupconPositivesParams, &kSupconRowScalesParams};

struct NamedConstant {
    const char* name;
    int64_t value;
};

constexpr NamedConstant kConstants[] = {
    {"SUPCON_POSITIVES_SAME_SAMPLE", SUPCON_POSITIVES_SAME_SAMPLE},
    {"SUPCON_POSITIVES_LABELS", SUPCON_POSITIVES_LABELS},
    {"SUPCON_POSITIVES_MASK", SUPCON_POSITIVES_MASK},
    {"SUPCON_POSITIVES_LABEL_SETS", SUPCON_POSITIVES_LABEL_SETS},
    {"SUPCON_LABEL_SET_ANY", SUPCON_LABEL_SET_ANY},
    {"SUPCON_LABEL_SET_JACCARD", SUPCON_LABEL_SET_JACCARD},
    {"SUPCON_LABEL_SET_FRACTION", SUPCON_LABEL_SET_FRACTION},
    {"SUPCON_DENOMINATOR_ALL", SUPCON_DENOMINATOR_ALL},
    {"SUPCON_DENOMINATOR_ONLY_NEGATIVES", SUPCON_DENOMINATOR_ONLY_NEGATIVES},
    {"SUPCON_DENOMINATOR_ONE_POSITIVE", SUPCON_DENOMINATOR_ONE_POSITIVE},
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
    {"kMergeThreads", supcon::kMergeThreads},
    {"kPositivesThreads", supcon::kPositivesThreads},
    {"kRowScalesThreads", supcon::kRowScalesThreads},
    {"sizeof(RowStatistics)", sizeof(supcon::RowStatistics)},
    {"tc::kThreads", supcon::tc::kThreads},
    {"tc::kWideGradCols", supcon::tc::kWideGradCols},
    /* The tensor-core kernels' dynamic shared memory at D = 130 (padded to 144): 3 rows of 64. */
    {"tc::kSharedBytesD130", 3 * supcon::tc::kRows * static_cast<int64_t>(supcon::tc::row_stride(130)) * 2},
    {"kMaxDynamicSharedBytes", static_cast<int64_t>(supcon_emu::kMaxDynamicSharedBytes)},
};

} // namespace

extern "C" int supcon_emu_launch(const char* kernel, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                                 unsigned block_x, unsigned block_y, unsigned block_z, size_t dynamic_shared_bytes,
                                 const void* params, size_t params_bytes) {
    if (kernel == nullptr || params == nullptr) return SUPCON_EMU_NULL_ARGUMENT;
    for (const NamedKernel& entry : kKernels) {
        if (strcmp(entry.name, kernel) == 0) {
            if (params_bytes != entry.params_bytes) return SUPCON_EMU_BAD_PARAMS;
            return supcon_emu::launch(entry.kernel, dim3{grid_x, grid_y, grid_z}, dim3{block_x, block_y, block_z},
                                      dynamic_shared_bytes, params);
        }
    }
    return SUPCON_EMU_UNKNOWN_KERNEL;
}

/* The size of parameter block `structure` (e.g. "SupconForwardParams"); 0 if unknown. */
extern "C" size_t supcon_emu_params_size(const char* structure) {
    for (const StructLayout* layout : kStructs) {
        if (strcmp(layout->name, structure) == 0) return layout->size;
    }
    return 0;
}

/* Field `index` of parameter block `structure` in declaration order; returns 0 past the last. */
extern "C" int supcon_emu_params_field(const char* structure, size_t index, const char** name, size_t* offset,
                                       size_t* size) {
    for (const StructLayout* layout : kStructs) {
        if (strcmp(layout->name, structure) != 0) continue;
        if (index >= layout->count) return 0;
        *name = layout->fields[index].name;
        *offset = layout->fields[index].offset;
        *size = layout->fields[index].size;
        return 1;
    }
    return 0;
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
