/*
 * The one parameter block every SupCon kernel takes (by value), shared with Rust
 * (src/kernel_abi.rs mirrors it field for field; a test compares sizeof/offsetof).
 *
 * ABI rules: fixed-width types only, every field naturally aligned, device pointers as
 * uint64_t addresses, explicit padding so the compiler inserts none. Fields a kernel does
 * not use are 0.
 *
 * Rows are view-major: flattened row r = v*B + b is view v of sample b, stored at
 * element offset (b*V + v)*D of the [B, V, D] feature buffer. Anchors are rows 0..R-1
 * (R = N for contrast mode "all", R = B for "one"); contrasts are all N rows.
 */
#ifndef SUPCON_PARAMS_H
#define SUPCON_PARAMS_H

#include <stdint.h>

/* What makes rows i and j positives (positive_kind). */
#define SUPCON_POSITIVES_SAME_SAMPLE 0u /* SimCLR: other views of the same sample */
#define SUPCON_POSITIVES_LABELS 1u      /* labels[b_i] == labels[b_j] */
#define SUPCON_POSITIVES_MASK 2u        /* weight mask[b_i * B + b_j] */

/* The softmax denominator set of anchor i (denominator). */
#define SUPCON_DENOMINATOR_ALL 0u            /* every j != i */
#define SUPCON_DENOMINATOR_ONLY_NEGATIVES 1u /* j != i with weight 0 */

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

typedef struct SupconParams {
    /* Inputs. */
    uint64_t features;  /* const T[B][V][D], T = float, __half or __nv_bfloat16 */
    uint64_t labels;    /* const int64_t[B] (POSITIVES_LABELS), else 0 */
    uint64_t mask;      /* const float[B][B] (POSITIVES_MASK), else 0 */
    /* Per-anchor statistics: written by the forward kernel, read by the finalisation and
     * backward kernels. */
    /* A log-sum-exp is kept as two floats, hi (its rounding) and lo (the rest), so that the
     * backward kernel's e^{(s - hi) - lo} has float precision at any logit scale (s - hi is exact
     * for s near hi), where e^{s - hi} would lose up to half an ulp of hi. */
    uint64_t anchor_lse;                    /* float[R]: LSE_i over the denominator set, hi (-inf: empty) */
    uint64_t anchor_lse_lo;                 /* float[R]: its lo (0 for an empty set) */
    uint64_t anchor_scaled_positive_lse;    /* float[R]: log sum_j (w_ij / W_i) e^{s_ij} = LSE^P_i - log W_i,
                                             * hi (-inf: no positive) */
    uint64_t anchor_scaled_positive_lse_lo; /* float[R]: its lo (0 without a positive) */
    uint64_t anchor_positive_weight;     /* float[R]: P_i = sum_j w_ij */
    uint64_t anchor_positive_weight_max; /* float[R]: W_i = max_j w_ij (0: no positive) */
    uint64_t anchor_loss;                /* float[R]: l_i */
    /* Finalisation outputs. */
    uint64_t reduced_loss;              /* double[1]: the loss under `reduction` */
    uint64_t anchors_without_positives; /* uint32_t[1]: #anchors with P_i = 0 */
    /* Backward. */
    uint64_t anchor_grad_coef; /* float[R]: c*u_i/R' * [P_i > 0] * [denominator non-empty], read by the
                                * backward kernel, written by supcon_backward_coefficients */
    uint64_t grad_features;    /* float[B][V][D], same layout as features */
    uint64_t anchor_upstream;  /* const double[R]: u_i under reduction none, else 0 (coefficients) */
    double upstream_scalar;    /* u of a reduced loss (coefficients) */
    double loss_scale_exact;   /* c = tau/tau_b in double (coefficients) */
    /* Shape. */
    uint32_t batch;       /* B */
    uint32_t views;       /* V */
    uint32_t dim;         /* D */
    uint32_t rows;        /* N = B*V */
    uint32_t anchors;     /* R */
    /* Options (the SUPCON_* constants above). */
    uint32_t positive_kind;
    uint32_t denominator;
    uint32_t summation;
    uint32_t reduction;
    uint32_t no_positive_policy;
    float inv_temperature; /* 1/tau */
    float loss_scale;      /* c = tau/tau_b */
} SupconParams;

#endif /* SUPCON_PARAMS_H */
