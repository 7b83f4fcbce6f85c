/*
 * The parameter blocks of the SupCon kernels (each takes one by value), shared with Rust
 * (src/device/abi.rs mirrors them field for field; a test compares sizeof/offsetof).
 *
 *   SupconForwardParams      supcon_forward_*, supcon_mma_forward_*, supcon_forward_merge,
 *                            supcon_forward_positive_terms_*, supcon_mma_forward_positive_terms_*
 *   SupconFinalizeParams     supcon_forward_finalize
 *   SupconCoefficientParams  supcon_backward_coefficients
 *   SupconBackwardParams     supcon_backward_*, supcon_mma_backward_*
 *   SupconPositivesParams    supcon_pack_label_sets, supcon_cap_bounds
 *   SupconRowScalesParams    supcon_row_scales_*
 *
 * ABI rules: fixed-width types only, every field naturally aligned, device pointers as
 * uint64_t addresses, explicit padding so the compiler inserts none. A kernel reads every field
 * of its block.
 *
 * Rows are view-major: flattened row r = v*B + b is view v of sample b, stored at
 * element offset (b*V + v)*D of the [B, V, D] feature buffer. Anchors are rows 0..R-1
 * (R = N for contrast mode "all", R = B for "one"); contrasts are all N rows. The statistics
 * arrays are indexed by anchor. The forward kernels compute the anchors of one range and the
 * backward kernels the gradient rows of one range, so that a launch can cover a shard of the
 * rows (the host launches [0, R) and [0, N) today).
 */
#ifndef SUPCON_PARAMS_H
#define SUPCON_PARAMS_H

#include <stdint.h>

/* What makes rows i and j positives (positive_kind). */
#define SUPCON_POSITIVES_SAME_SAMPLE 0u /* SimCLR: other views of the same sample */
#define SUPCON_POSITIVES_LABELS 1u      /* labels[b_i] == labels[b_j] */
#define SUPCON_POSITIVES_MASK 2u        /* weight mask[b_i * B + b_j] */
#define SUPCON_POSITIVES_LABEL_SETS 3u  /* overlap of label_sets[b_i] and label_sets[b_j] */

/* How two label sets weigh a pair of different samples (set_weight; docs/math.md, "Label
 * sets"): with n = |Y_i & Y_j|, u = |Y_i | Y_j|, a = |Y_i|. */
#define SUPCON_LABEL_SET_ANY 0u      /* [n > 0] */
#define SUPCON_LABEL_SET_JACCARD 1u  /* n / max(u, 1) */
#define SUPCON_LABEL_SET_FRACTION 2u /* n / max(a, 1) */

/* The softmax denominator set of anchor i (denominator). */
#define SUPCON_DENOMINATOR_ALL 0u            /* every j != i */
#define SUPCON_DENOMINATOR_ONLY_NEGATIVES 1u /* j != i with weight 0 */
#define SUPCON_DENOMINATOR_ONE_POSITIVE 2u   /* the negatives, each positive joining them alone */

/* Where the mean over positives sits (summation). */
#define SUPCON_SUMMATION_OUTSIDE 0u /* L_out, Eq. 2 */
#define SUPCON_SUMMATION_INSIDE 1u  /* L_in, Eq. 3 */

/* How the finalisation kernel reduces the per-anchor losses (reduction). */
#define SUPCON_REDUCTION_MEAN 0u
#define SUPCON_REDUCTION_SUM 1u
#define SUPCON_REDUCTION_NONE 2u

/* Which anchors the mean counts (no_positive_policy). */
#define SUPCON_NO_POSITIVE_ZERO_AND_COUNT 0u /* R' = R */
#define SUPCON_NO_POSITIVE_EXCLUDE 1u        /* R' = anchors with P_i > 0 */
#define SUPCON_NO_POSITIVE_ERROR 2u          /* host fails on a non-zero count */

/* The batch, its positives and the loss options. */
typedef struct SupconProblem {
    uint64_t features; /* const T[B][V][D], T = float, __half or __nv_bfloat16 */
    uint64_t labels;   /* const int64_t[B] (POSITIVES_LABELS), else 0 */
    uint64_t mask;     /* const float[B][B] (POSITIVES_MASK), else 0 */
    uint64_t label_sets; /* const uint64_t[B][1 + set_words] (POSITIVES_LABEL_SETS), else 0: per
                          * sample |Y_b|, then its bitset: label k is bit k % 64 of word 1 + k / 64 */
    uint64_t cap_bounds; /* const uint32_t[B] under a positives cap, else 0: an anchor of sample b
                          * keeps a positive of another sample at row j iff j < cap_bounds[b] */
    uint64_t row_scales; /* const float[N] under normalize, else 0: row r's 1/max(|x_r|, eps), by
                          * flattened row, negated where |x_r| < eps (the clamp, whose gradient
                          * has no projection); written by supcon_row_scales_*. The SIMT kernels
                          * read it; the tensor-core kernels take 0 (the host never routes
                          * normalize to them) */
    uint32_t batch;    /* B */
    uint32_t views;    /* V */
    uint32_t dim;      /* D */
    uint32_t rows;     /* N = B*V */
    uint32_t anchors;  /* R */
    /* Options (the SUPCON_* constants above). */
    uint32_t positive_kind;
    uint32_t denominator;
    uint32_t summation;
    float inv_temperature; /* 1/tau */
    float loss_scale;      /* c = tau/tau_b */
    uint32_t set_words;    /* 64-bit words per label set (POSITIVES_LABEL_SETS), else 0 */
    uint32_t set_weight;   /* SUPCON_LABEL_SET_* (POSITIVES_LABEL_SETS), else 0 */
} SupconProblem;

/* The per-anchor statistics, float[R] each: written by the forward kernels, read by the
 * backward kernels. A log-sum-exp is kept as two floats, hi (its rounding) and lo (the rest),
 * so that the backward kernel's e^{(s - hi) - lo} has float precision at any logit scale (s - hi
 * is exact for s near hi), where e^{s - hi} would lose up to half an ulp of hi. */
typedef struct SupconStatistics {
    uint64_t lse;                    /* LSE_i over the denominator set, hi (-inf: empty) */
    uint64_t lse_lo;                 /* its lo (0 for an empty set) */
    uint64_t scaled_positive_lse;    /* log sum_j (w_ij / W_i) e^{s_ij} = LSE^P_i - log W_i, hi
                                      * (-inf: no positive) */
    uint64_t scaled_positive_lse_lo; /* its lo (0 without a positive) */
    uint64_t positive_weight;        /* P_i = sum_j w_ij */
    uint64_t positive_weight_max;    /* W_i = max_j w_ij (0: no positive) */
    uint64_t pull;                   /* one-positive: Psi_i = sum_p rho_ip, the total pull of the
                                      * positives (0 without a negative); else unused */
    uint64_t log_share;              /* one-positive under L_in: log A_i = log sum_p w_ip pi_ip
                                      * (0 without a negative); else unused */
} SupconStatistics;

/* How the per-anchor losses reduce. */
typedef struct SupconReduction {
    uint32_t anchors; /* R */
    uint32_t reduction;
    uint32_t no_positive_policy;
    uint32_t padding; /* 0 */
} SupconReduction;

/* Statistics and losses of anchors anchor_begin .. anchor_end - 1 against all N rows, the
 * columns split over column_splits blocks per anchor tile (1: no split). */
typedef struct SupconForwardParams {
    SupconProblem problem;
    SupconStatistics statistics; /* written at the range's anchors */
    uint64_t anchor_loss;        /* float[R]: l_i, written at the range's anchors */
    uint64_t partials;           /* RowStatistics[column_splits][R] (supcon_statistics.cuh): each
                                  * share's statistics of the range's anchors, written by the
                                  * forward kernels and merged by supcon_forward_merge; 0 when
                                  * column_splits = 1 */
    uint32_t anchor_begin;
    uint32_t anchor_end;
    uint32_t column_splits;      /* at most the number of 64-row contrast tiles; 1 for the positive
                                  * terms kernels (which read the range's lse, lse_lo and
                                  * positive_weight and write its anchor_loss, pull, log_share) */
    uint32_t padding;            /* 0 */
} SupconForwardParams;

/* The reduced loss over anchors 0..R-1, and their count without positives. */
typedef struct SupconFinalizeParams {
    uint64_t anchor_loss;               /* const float[R]: l_i */
    uint64_t positive_weight;           /* const float[R]: P_i */
    uint64_t reduced_loss;              /* double[1]: the loss under `reduction` */
    uint64_t anchors_without_positives; /* uint32_t[1]: #anchors with P_i = 0 */
    SupconReduction reduction;
} SupconFinalizeParams;

/* The backward kernels' per-anchor coefficients c*u_i/R' * [P_i > 0] * [D_i non-empty]. */
typedef struct SupconCoefficientParams {
    uint64_t lse;                       /* const float[R]: LSE_i (hi) */
    uint64_t positive_weight;           /* const float[R]: P_i */
    uint64_t anchors_without_positives; /* const uint32_t[1] */
    uint64_t upstream;                  /* const double[R]: u_i under reduction none, else 0 */
    uint64_t grad_coef;                 /* float[R]: the coefficients */
    double upstream_scalar;             /* u of a reduced loss */
    double loss_scale;                  /* c = tau/tau_b in double */
    SupconReduction reduction;
} SupconCoefficientParams;

/* dL/dZ for rows grad_begin .. grad_end - 1, from every anchor's statistics. */
typedef struct SupconBackwardParams {
    SupconProblem problem;
    SupconStatistics statistics; /* read for every anchor */
    uint64_t grad_coef;          /* const float[R]: SupconCoefficientParams' output */
    uint64_t grad_features;      /* float[B][V][D], the features' layout: the range's rows written */
    uint32_t grad_begin;
    uint32_t grad_end;
} SupconBackwardParams;

/* The positives prepared on the device (supcon_positives.cu): label sets packed from a multi-hot
 * matrix, and the per-sample bounds of a positives cap. */
typedef struct SupconPositivesParams {
    SupconProblem problem; /* the positives; label_sets: the packed sets, written by
                            * supcon_pack_label_sets and read by supcon_cap_bounds; cap_bounds 0 */
    uint64_t memberships;  /* const uint8_t[B][classes] (supcon_pack_label_sets), nonzero: a member */
    uint64_t bounds;       /* uint32_t[B]: written by supcon_cap_bounds */
    uint32_t classes;      /* K: labels per multi-hot row */
    uint32_t cap;          /* the positives cap (clamped to 2^32 - 1) */
} SupconPositivesParams;

/* The per-row scales of the fused normalisation (supcon_normalize.cu). */
typedef struct SupconRowScalesParams {
    SupconProblem problem; /* the features; row_scales 0 */
    uint64_t scales;       /* float[N]: written, the layout of SupconProblem::row_scales */
} SupconRowScalesParams;

#endif /* SUPCON_PARAMS_H */
