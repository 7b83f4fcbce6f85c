/*
 * The per-anchor statistics of both passes, shared by the SIMT and the tensor-core kernels.
 *
 * Forward: a thread folds the logits it sees of an anchor row into running RowStatistics
 * (accumulate_row); the partial statistics of one anchor are merged in a fixed order
 * (merge_parts) and turned into the saved state and the anchor's loss (write_anchor), or, when
 * the columns are split across blocks, stored for supcon_forward_merge (publish_anchor). Backward: the saved state of the
 * rows of a tile (TileStatistics) and the logit gradient G_ij / coef_i (logit_gradient).
 * docs/math.md has the formulas; supcon_forward.cu and supcon_backward.cu explain the exact
 * cancellations these functions preserve.
 */
#ifndef SUPCON_STATISTICS_CUH
#define SUPCON_STATISTICS_CUH

#include "supcon_common.cuh"

namespace supcon {

/* One anchor row's running statistics over the contrasts seen so far. */
struct RowStatistics {
    float max;             /* running max of s over D_i (-inf: none yet) */
    float sum;             /* sum_{j in D_i} e^(s_ij - max) */
    float positive_max;    /* running max of s over positives */
    float positive_sum;    /* sum_j w_ij e^(s_ij - positive_max) */
    float positive_weight;     /* P_i */
    float positive_weight_max; /* W_i (0: none yet) */
    float positive_logit;      /* T_i = sum_j w_ij s_ij */
};

/* (max, sum) <- the log-sum-exp pair of the union of two disjoint sets. */
__device__ __forceinline__ void merge_log_sum(float& max, float& sum, float other_max, float other_sum) {
    const float merged = fmaxf(max, other_max);
    if (merged == -INFINITY) return; /* both sets empty */
    sum = sum * expf(max - merged) + other_sum * expf(other_max - merged);
    max = merged;
}

/* Folds one tile row of logits (this thread's kCols columns of it) into `stats`. */
template <int kCols>
__device__ __forceinline__ void accumulate_row(RowStatistics& stats, const float (&s)[kCols],
                                               const float (&weight)[kCols], const bool (&denominator)[kCols],
                                               const SupconProblem&) {
    float tile_max = -INFINITY;
    float tile_positive_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kCols; ++n) {
        if (denominator[n]) tile_max = fmaxf(tile_max, s[n]);
        if (weight[n] > 0.0f) tile_positive_max = fmaxf(tile_positive_max, s[n]);
    }
    if (tile_max > stats.max) {
        stats.sum *= expf(stats.max - tile_max);
        stats.max = tile_max;
    }
    if (tile_positive_max > stats.positive_max) {
        stats.positive_sum *= expf(stats.positive_max - tile_positive_max);
        stats.positive_max = tile_positive_max;
    }
#pragma unroll
    for (int n = 0; n < kCols; ++n) {
        if (denominator[n]) stats.sum += expf(s[n] - stats.max);
        if (weight[n] > 0.0f) {
            stats.positive_sum = fmaf(weight[n], expf(s[n] - stats.positive_max), stats.positive_sum);
            stats.positive_weight += weight[n];
            stats.positive_weight_max = fmaxf(stats.positive_weight_max, weight[n]);
            stats.positive_logit = fmaf(weight[n], s[n], stats.positive_logit);
        }
    }
}

/* Adds the statistics of a disjoint set of contrasts to `s`. */
__device__ __forceinline__ void merge_into(RowStatistics& s, const RowStatistics& other) {
    merge_log_sum(s.max, s.sum, other.max, other.sum);
    merge_log_sum(s.positive_max, s.positive_sum, other.positive_max, other.positive_sum);
    s.positive_weight += other.positive_weight;
    s.positive_weight_max = fmaxf(s.positive_weight_max, other.positive_weight_max);
    s.positive_logit += other.positive_logit;
}

/* The kParts partial statistics of one anchor merged in order (a fixed summation order). */
template <int kParts, typename Statistics>
__device__ __forceinline__ Statistics merge_parts(const Statistics (&partial)[kParts]) {
    Statistics s = partial[0];
    for (int q = 1; q < kParts; ++q) merge_into(s, partial[q]);
    return s;
}

/* One anchor row's sums over its positives p under the one-positive denominator, given
 * LSE^N_i (the first pass's lse): with x_p = LSE^N_i - s_ip, pi_ip = sigma(-x_p) is positive p's
 * softmax against the negatives, -log pi_ip = softplus(x_p) and -log(1 - pi_ip) =
 * softplus(-x_p) = softplus(x_p) - x_p (docs/math.md, "One positive"). The sums are
 * log-sum-exps (max, sum), so that no term underflows (pi ~ e^-x past x ~ 87), except L_out's
 * loss:
 *
 *              loss                                  pull (log of)
 *   L_out   sum_p w_p softplus(x_p) (linear)       sum_p w_p sigma(x_p)
 *   L_in    log A_i = log sum_p w_p pi_p           sum_p w_p pi_p (1 - pi_p)
 *
 * L_out's loss is the sum itself, and a log-sum-exp would cost it a relative error of
 * eps |log l_i| (a rounded log), beyond the logits' own at large logits. Its terms are at most
 * ~2 s_max + log N, so it is summed linearly, scaled by 2^-32 so that N terms of logits up to
 * the kernels' 1e36 cannot overflow; its max stays 0, so that merge_log_sum adds the sums
 * (e^0 = 1 exactly). Terms below 2^-94 lose precision to the scaling, far below any loss's
 * error. */
constexpr float kLinearLossScale = 0x1p-32f;
struct PositiveTerms {
    float lse;      /* LSE^N_i, hi (-inf: no negative; the anchor's terms are then 0) */
    float lse_lo;   /* its lo */
    float loss_max; /* the loss sum as (max, sum) */
    float loss_sum;
    float pull_max; /* the pull sum as (max, sum) */
    float pull_sum;
};

/* The sums of `anchor` before any positive: its LSE^N from the first pass. */
__device__ __forceinline__ PositiveTerms positive_terms_of(uint32_t anchor, const SupconForwardParams& f) {
    const float linear_loss = f.problem.summation == SUPCON_SUMMATION_OUTSIDE ? 0.0f : -INFINITY;
    return {reinterpret_cast<const float*>(f.statistics.lse)[anchor],
            reinterpret_cast<const float*>(f.statistics.lse_lo)[anchor], linear_loss, 0.0f, -INFINITY, 0.0f};
}

/* (max, sum) <- the log-sum-exp pair with one more term e^t (t finite or NaN). */
__device__ __forceinline__ void add_log_term(float& max, float& sum, float t) {
    if (t > max) {
        sum = fmaf(sum, expf(max - t), 1.0f);
        max = t;
    } else {
        sum += expf(t - max);
    }
}

/* softplus(x) = log(1 + e^x) and sigma(x) = 1 / (1 + e^-x) without overflow at either end. */
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Folds one tile row of logits (this thread's kCols columns) into the one-positive sums: the
 * positives only (w > 0; the negatives are in LSE^N already, so `denominator` is unused). */
template <int kCols>
__device__ __forceinline__ void accumulate_row(PositiveTerms& terms, const float (&s)[kCols],
                                               const float (&weight)[kCols], const bool (&)[kCols],
                                               const SupconProblem& p) {
    /* Without a negative every pi is 1 and the anchor's loss and pulls are 0. */
    if (terms.lse == -INFINITY) return;
#pragma unroll
    for (int n = 0; n < kCols; ++n) {
        if (!(weight[n] > 0.0f)) continue;
        const float x = (terms.lse - s[n]) + terms.lse_lo;
        const float log1p_exp = log1pf(expf(-fabsf(x)));
        const float softplus_x = fmaxf(x, 0.0f) + log1p_exp;
        const float softplus_minus_x = fmaxf(-x, 0.0f) + log1p_exp;
        const float log_weight = logf(weight[n]);
        if (p.summation == SUPCON_SUMMATION_OUTSIDE) {
            terms.loss_sum += weight[n] * softplus_x * kLinearLossScale;
            add_log_term(terms.pull_max, terms.pull_sum, log_weight - softplus_minus_x);
        } else {
            const float log_share = log_weight - softplus_x;
            add_log_term(terms.loss_max, terms.loss_sum, log_share);
            add_log_term(terms.pull_max, terms.pull_sum, log_share - softplus_minus_x);
        }
    }
}

/* Adds the sums over a disjoint set of contrasts to `s` (the same LSE^N). */
__device__ __forceinline__ void merge_into(PositiveTerms& s, const PositiveTerms& other) {
    merge_log_sum(s.loss_max, s.loss_sum, other.loss_max, other.loss_sum);
    merge_log_sum(s.pull_max, s.pull_sum, other.pull_max, other.pull_sum);
}

/* Writes the one-positive outputs of `anchor` from its sums over all N contrasts and the first
 * pass's P_i: l_i, the pull Psi_i and log A_i (docs/math.md, "One positive" and "The gradient"). */
__device__ __forceinline__ void write_positive_terms(const PositiveTerms& t, uint32_t anchor,
                                                     const SupconForwardParams& f) {
    const SupconProblem& p = f.problem;
    const float positive_weight = reinterpret_cast<const float*>(f.statistics.positive_weight)[anchor];
    float loss = 0.0f;
    float pull = 0.0f;
    float log_share = 0.0f;
    if (positive_weight > 0.0f && !(t.lse == -INFINITY)) {
        const float log_pull = t.pull_max + logf(t.pull_sum);
        if (p.summation == SUPCON_SUMMATION_OUTSIDE) {
            loss = p.loss_scale * ((t.loss_sum / positive_weight) / kLinearLossScale);
            pull = expf(log_pull) / positive_weight;
        } else {
            log_share = t.loss_max + logf(t.loss_sum);
            loss = p.loss_scale * (logf(positive_weight) - log_share);
            pull = expf(log_pull - log_share);
        }
    }
    reinterpret_cast<float*>(f.anchor_loss)[anchor] = loss;
    reinterpret_cast<float*>(f.statistics.pull)[anchor] = pull;
    reinterpret_cast<float*>(f.statistics.log_share)[anchor] = log_share;
}

/* Writes the outputs of `anchor` from its statistics over all N contrasts. */
__device__ __forceinline__ void write_anchor(const RowStatistics& s, uint32_t anchor, const SupconForwardParams& f) {
    const SupconProblem& p = f.problem;
    /* sum >= 1 (the max term) whenever the set is non-empty; likewise positive_sum >= max w.
     * A NaN logit (NaN or infinite features, which the device API does not check) makes the sum
     * NaN: that set counts as non-empty, so the NaN reaches LSE_i, l_i and the loss instead of
     * vanishing into an "empty" set with l_i = 0. */
    const bool has_denominator = !(s.sum == 0.0f);
    const bool has_positive = s.positive_weight > 0.0f;
    const float log_sum = has_denominator ? logf(s.sum) : 0.0f;
    /* log sum_j (w_ij / W_i) e^(s_ij - positive_max); see "Exact cancellations" above. */
    const float log_scaled_positive_sum = has_positive ? logf(s.positive_sum / s.positive_weight_max) : 0.0f;
    float loss = 0.0f;
    if (has_denominator && has_positive) {
        /* Differences of large logits first, then the O(log N) log-sums: less cancellation. */
        loss = p.summation == SUPCON_SUMMATION_OUTSIDE
                   ? p.loss_scale * ((s.max - s.positive_logit / s.positive_weight) + log_sum)
                   : p.loss_scale * ((s.max - s.positive_max) + (log_sum - log_scaled_positive_sum) +
                                     logf(s.positive_weight / s.positive_weight_max));
    }
    /* hi = max + log_sum rounded, lo = (max - hi) + log_sum: max - hi is exact (Sterbenz). */
    const float lse = has_denominator ? s.max + log_sum : -INFINITY;
    const float positive_lse = has_positive ? s.positive_max + log_scaled_positive_sum : -INFINITY;
    reinterpret_cast<float*>(f.statistics.lse)[anchor] = lse;
    reinterpret_cast<float*>(f.statistics.lse_lo)[anchor] = has_denominator ? (s.max - lse) + log_sum : 0.0f;
    reinterpret_cast<float*>(f.statistics.scaled_positive_lse)[anchor] = positive_lse;
    reinterpret_cast<float*>(f.statistics.scaled_positive_lse_lo)[anchor] =
        has_positive ? (s.positive_max - positive_lse) + log_scaled_positive_sum : 0.0f;
    reinterpret_cast<float*>(f.statistics.positive_weight)[anchor] = s.positive_weight;
    reinterpret_cast<float*>(f.statistics.positive_weight_max)[anchor] = s.positive_weight_max;
    reinterpret_cast<float*>(f.anchor_loss)[anchor] = loss;
}

/* The contrast tiles (kTileCols rows each) of this block's share of the columns: share
 * blockIdx.y of f.column_splits (at most one per tile, so none is empty), in order. */
struct TileRange {
    uint32_t begin;
    uint32_t end;
};
__device__ __forceinline__ TileRange column_share(const SupconForwardParams& f) {
    const uint64_t tiles = (f.problem.rows + kTileCols - 1) / kTileCols;
    return {static_cast<uint32_t>(tiles * blockIdx.y / f.column_splits),
            static_cast<uint32_t>(tiles * (blockIdx.y + 1) / f.column_splits)};
}

/* Publishes an anchor's statistics over this block's share of the columns: its outputs when
 * that is every column, else its partial statistics for supcon_forward_merge. */
__device__ __forceinline__ void publish_anchor(const RowStatistics& s, uint32_t anchor, const SupconForwardParams& f) {
    if (f.column_splits == 1) {
        write_anchor(s, anchor, f);
    } else {
        reinterpret_cast<RowStatistics*>(f.partials)[static_cast<uint64_t>(blockIdx.y) * f.problem.anchors + anchor] = s;
    }
}

/* The positive terms run unsplit (column_splits = 1): their outputs at once. */
__device__ __forceinline__ void publish_anchor(const PositiveTerms& s, uint32_t anchor, const SupconForwardParams& f) {
    write_positive_terms(s, anchor, f);
}

/* The running statistics of `anchor` before any contrast. */
__device__ __forceinline__ void start_anchor(RowStatistics& s, uint32_t, const SupconForwardParams&) {
    s = {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
}
__device__ __forceinline__ void start_anchor(PositiveTerms& s, uint32_t anchor, const SupconForwardParams& f) {
    s = positive_terms_of(anchor, f);
}

/* The saved statistics of the rows of one tile. */
struct TileStatistics {
    float lse[kTileRows]; /* hi and lo (supcon_params.h) */
    float lse_lo[kTileRows];
    /* One-positive's positives need the pull and log A_i instead of the positive log-sum-exp. */
    union {
        float scaled_positive_lse[kTileRows];
        float pull[kTileRows];
    };
    union {
        float scaled_positive_lse_lo[kTileRows];
        float log_share[kTileRows];
    };
    float positive_weight[kTileRows];
    float positive_weight_max[kTileRows];
    float coef[kTileRows]; /* 0 for rows that are not anchors or whose gradient vanishes */
};

/* Threads 0..kTileRows-1 each load one row's statistics. The caller synchronises. */
__device__ __forceinline__ void load_statistics(TileStatistics& tile, uint32_t first_row, int count,
                                                const SupconBackwardParams& b) {
    const SupconStatistics& saved = b.statistics;
    const int t = threadIdx.x;
    if (t < kTileRows && t < count) {
        const uint32_t row = first_row + t;
        float coef = 0.0f;
        if (row < b.problem.anchors) {
            coef = reinterpret_cast<const float*>(b.grad_coef)[row];
            tile.lse[t] = reinterpret_cast<const float*>(saved.lse)[row];
            tile.lse_lo[t] = reinterpret_cast<const float*>(saved.lse_lo)[row];
            if (b.problem.denominator == SUPCON_DENOMINATOR_ONE_POSITIVE) {
                tile.pull[t] = reinterpret_cast<const float*>(saved.pull)[row];
                tile.log_share[t] = reinterpret_cast<const float*>(saved.log_share)[row];
            } else {
                tile.scaled_positive_lse[t] = reinterpret_cast<const float*>(saved.scaled_positive_lse)[row];
                tile.scaled_positive_lse_lo[t] = reinterpret_cast<const float*>(saved.scaled_positive_lse_lo)[row];
            }
            tile.positive_weight[t] = reinterpret_cast<const float*>(saved.positive_weight)[row];
            tile.positive_weight_max[t] = reinterpret_cast<const float*>(saved.positive_weight_max)[row];
        }
        tile.coef[t] = coef;
    }
}

/* G_ij / coef_i for the anchor whose statistics are row a of `stats`, given s_ij and w_ij. */
__device__ __forceinline__ float logit_gradient(const SupconProblem& p, const TileStatistics& stats, int a, float s,
                                                float weight) {
    if (p.denominator == SUPCON_DENOMINATOR_ONE_POSITIVE) {
        /* Psi_i q_ij on a negative, -rho_ij on a positive, with x = LSE^N_i - s_ij: rho =
         * (w / P_i) sigma(x) for L_out, (w pi / A_i)(1 - pi) = e^(log w - softplus(x) - log A_i)
         * sigma(x) for L_in. A coefficient is 0 where LSE^N_i = -inf, so x is finite here. */
        if (weight == 0.0f) return stats.pull[a] * expf((s - stats.lse[a]) - stats.lse_lo[a]);
        if (!(weight > 0.0f)) return 0.0f; /* dropped by the cap */
        const float x = (stats.lse[a] - s) + stats.lse_lo[a];
        const float pull = p.summation == SUPCON_SUMMATION_OUTSIDE
                               ? weight / stats.positive_weight[a]
                               : expf((logf(weight) - softplus(x)) - stats.log_share[a]);
        return -pull * sigmoid(x);
    }
    float g = in_denominator(p, weight) ? expf((s - stats.lse[a]) - stats.lse_lo[a]) : 0.0f;
    if (weight > 0.0f) {
        /* Divisions, not multiplications by reciprocals: w / w is exactly 1. */
        g -= p.summation == SUPCON_SUMMATION_OUTSIDE
                 ? weight / stats.positive_weight[a]
                 : weight / stats.positive_weight_max[a] *
                       expf((s - stats.scaled_positive_lse[a]) - stats.scaled_positive_lse_lo[a]);
    }
    return g;
}

} // namespace supcon

#endif /* SUPCON_STATISTICS_CUH */
