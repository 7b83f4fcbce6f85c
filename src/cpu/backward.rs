//! The backward pass: dZ = H Z / τ with the symmetric H of docs/math.md ("The gradient"),
//! recomputing S tile by tile.
//!
//! With G_ij = ∂L/∂s_ij (zero unless i is an active anchor) and s_ij = s_ji, the gradient of
//! row k collects its anchor side G_kj z_j and its contrast side G_jk z_j:
//! dZ_k = (1/τ) Σ_j H_kj z_j with H_kj = G_kj + G_jk. That covers contrast mode one (G is zero
//! on non-anchor rows) and asymmetric masks (G_kj and G_jk are each computed from their own
//! weights). For a tile (I, J), after `S = Z_I Z_Jᵀ / τ`, each entry becomes
//!
//!   H_ij = g(anchor i, contrast j) + g(anchor j, contrast i),
//!   g(a, c) = den_a · [c ∈ den(a)] · e^{s − LSE_a} − positive term(a, w_ac, s)
//!
//! in place (two exponentials per entry; the positive term is w·a/P for L_out and
//! w·a·e^{s − LSE^P_a} for L_in, with a = c·u_a/(R'·τ)). Then two GEMMs,
//! dZ_I += H Z_J and dZ_J += Hᵀ Z_I (a diagonal tile holds both halves: dZ_I += H Z_I).
//! `one_positive`'s positive terms (a pull per positive, from a softplus and a sigmoid) are
//! computed in f64 on the positive entries only, after a sweep for each anchor's total pull.
//!
//! Each tile's GEMMs write f32 partials, added into f64 row accumulators in the schedule's
//! fixed order: deterministic, and the cancellation in the anchor side Σ_j G_kj z_j (whose
//! coefficients sum to 0) costs f32 precision only within one tile.

use super::forward::PositiveSums;
use super::math::{exp, lane_group, neutral_padding, padded, sigmoid, softplus, Aligned, LANES};
use super::relation::{in_denominator, PairWeights};
use super::simd::TileKernel;
use super::tiles::{block_chunks, Tile, BLOCK};
use super::Batch;
use crate::config::{Denominator, Summation};

/// How a positive entry enters g(a, c) besides the denominator term.
trait PositiveTerm {
    /// Whether the pulls are computed separately in f64 (`one_positive`).
    const SCALAR_PULLS: bool;
    /// The term subtracted for weight `w` and logit `s`, given the anchor's `scale` and its
    /// LSE^P as `hi + lo` ([`split`]).
    fn term(w: f32, s: f32, scale: f32, lse_positive: (f32, f32)) -> f32;
}

/// L_out with denominator all / only-negatives: w·a/P (`scale` = a/P).
struct Outside;
/// L_in with denominator all / only-negatives: w·a·e^{s − LSE^P} (`scale` = a).
struct Inside;
/// `one_positive`: pulls come from [`Pulls`].
struct OnePositive;

impl PositiveTerm for Outside {
    const SCALAR_PULLS: bool = false;
    #[inline(always)]
    fn term(w: f32, _: f32, scale: f32, _: (f32, f32)) -> f32 {
        w * scale
    }
}

impl PositiveTerm for Inside {
    const SCALAR_PULLS: bool = false;
    #[inline(always)]
    fn term(w: f32, s: f32, scale: f32, (hi, lo): (f32, f32)) -> f32 {
        w * scale * exp(s - hi - lo)
    }
}

impl PositiveTerm for OnePositive {
    const SCALAR_PULLS: bool = true;
    #[inline(always)]
    fn term(_: f32, _: f32, _: f32, _: (f32, f32)) -> f32 {
        0.0
    }
}

/// An f64 log-sum-exp as two f32, `hi` (its rounding) and `lo` (the rest), for exponentials of
/// logits relative to it: a logit s near the LSE differs from `hi` exactly in f32 (Sterbenz),
/// so `e^{(s − hi) − lo}` keeps the f64 value's precision at any logit scale, where `e^{s − hi}`
/// alone would lose up to half an f32 ulp of the LSE: 0.06 at logits of 2·10⁶, 6 % of the term.
pub(super) fn split(lse: f64) -> (f32, f32) {
    let hi = lse as f32;
    (hi, (lse - f64::from(hi)) as f32)
}

/// Per-row coefficients of g, padded past N with inactive rows. An inactive row (not an
/// anchor, no positive, or an empty denominator) has LSEs of +∞ (`lo` 0) and scales of 0, so
/// every term it contributes is exactly 0 (e^{−∞} = 0, never ∞·0). Log-sum-exps come as
/// [`split`] pairs.
pub(super) struct AnchorTerms {
    pub(super) lse: Vec<f32>,
    pub(super) lse_lo: Vec<f32>,
    pub(super) den_scale: Vec<f32>,
    pub(super) positive_scale: Vec<f32>,
    lse_positive: Vec<f32>,
    lse_positive_lo: Vec<f32>,
}

/// `one_positive`'s per-anchor f64 values for the pulls (anchors only).
pub(super) struct Pulls {
    summation: Summation,
    lse: Vec<f64>,
    /// a (L_in) or a/P (L_out); 0 for inactive anchors.
    scale: Vec<f64>,
    /// log A (L_in).
    log_share: Vec<f64>,
}

impl Pulls {
    /// The pull of a positive (weight w, logit s) on anchor `a`.
    fn pull(&self, a: usize, w: f32, s: f32) -> f64 {
        let (w, s, lse) = (f64::from(w), f64::from(s), self.lse[a]);
        match self.summation {
            Summation::Outside => self.scale[a] * w * sigmoid(lse - s),
            Summation::Inside => {
                let share = (w.ln() - softplus(lse - s) - self.log_share[a]).exp();
                self.scale[a] * share * sigmoid(lse - s)
            }
        }
    }
}

/// What the forward pass saved, per anchor.
pub(super) struct Saved<'a> {
    pub(super) lse: &'a [f64],
    pub(super) lse_positive: &'a [f64],
    pub(super) positive_weight: &'a [f64],
    /// c·u_i/R' per anchor.
    pub(super) coefficients: &'a [f64],
}

/// The coefficients of g for every row (and the pulls for `one_positive`, which need the
/// `positive_sums` sweep).
pub(super) fn anchor_terms(
    batch: &Batch,
    saved: &Saved<'_>,
    positive_sums: Option<&[PositiveSums]>,
) -> (AnchorTerms, Option<Pulls>) {
    let len = padded(batch.shape.rows());
    let mut terms = AnchorTerms {
        lse: vec![f32::INFINITY; len],
        lse_lo: vec![0.0; len],
        den_scale: vec![0.0; len],
        positive_scale: vec![0.0; len],
        lse_positive: vec![f32::INFINITY; len],
        lse_positive_lo: vec![0.0; len],
    };
    let summation = batch.loss.summation();
    let mut pulls = positive_sums.map(|_| Pulls {
        summation,
        lse: saved.lse.to_vec(),
        scale: vec![0.0; batch.anchors],
        log_share: vec![0.0; batch.anchors],
    });
    let tau = batch.loss.temperature();
    for i in 0..batch.anchors {
        let (lse, p) = (saved.lse[i], saved.positive_weight[i]);
        if !(p > 0.0 && lse > f64::NEG_INFINITY) {
            continue;
        }
        let a = saved.coefficients[i] / tau;
        (terms.lse[i], terms.lse_lo[i]) = split(lse);
        match (positive_sums, &mut pulls) {
            (Some(sums), Some(pulls)) => {
                let sums = &sums[i];
                let total_pull = match summation {
                    Summation::Outside => sums.sigmoid / p,
                    Summation::Inside => (sums.log_pull.value() - sums.log_share.value()).exp(),
                };
                terms.den_scale[i] = (a * total_pull) as f32;
                pulls.scale[i] = match summation {
                    Summation::Outside => a / p,
                    Summation::Inside => a,
                };
                pulls.log_share[i] = sums.log_share.value();
            }
            _ => {
                terms.den_scale[i] = a as f32;
                match summation {
                    Summation::Outside => terms.positive_scale[i] = (a / p) as f32,
                    Summation::Inside => {
                        terms.positive_scale[i] = a as f32;
                        (terms.lse_positive[i], terms.lse_positive_lo[i]) =
                            split(saved.lse_positive[i]);
                    }
                }
            }
        }
    }
    (terms, pulls)
}

/// Per-thread buffers of the general tile kernel (besides the sweep's).
struct Scratch {
    row_weight: Vec<f32>,
    row_bias: Vec<f32>,
    col_weight: Vec<f32>,
    col_bias: Vec<f32>,
    /// `one_positive` pulls of the current tile row.
    pull: Vec<f32>,
}

impl Scratch {
    fn new() -> Self {
        let lane_row = || vec![0.0; padded(BLOCK)];
        Scratch {
            row_weight: lane_row(),
            row_bias: lane_row(),
            col_weight: lane_row(),
            col_bias: lane_row(),
            pull: lane_row(),
        }
    }
}

/// The elementwise work of one backward tile: S → H in place.
struct GradientTile<'a, R, P, const NEG_ONLY: bool> {
    pairs: &'a R,
    tile: &'a Tile,
    terms: &'a AnchorTerms,
    pulls: Option<&'a Pulls>,
    /// S, turned into H in place.
    logits: &'a mut [f32],
    scratch: &'a mut Scratch,
    positive_term: std::marker::PhantomData<P>,
}

impl<R: PairWeights, P: PositiveTerm, const NEG_ONLY: bool> TileKernel
    for GradientTile<'_, R, P, NEG_ONLY>
{
    #[inline(always)]
    fn run(self) {
        let GradientTile {
            pairs,
            tile,
            terms,
            pulls,
            logits,
            scratch,
            ..
        } = self;
        let stride = tile.stride();
        let (width, cols) = (tile.cols.len(), tile.cols.clone());
        let col_lse = &terms.lse[cols.start..][..stride];
        let col_lse_lo = &terms.lse_lo[cols.start..][..stride];
        let col_den = &terms.den_scale[cols.start..][..stride];
        let col_pos = &terms.positive_scale[cols.start..][..stride];
        let col_lse_pos = &terms.lse_positive[cols.start..][..stride];
        let col_lse_pos_lo = &terms.lse_positive_lo[cols.start..][..stride];
        let Scratch {
            row_weight,
            row_bias,
            col_weight,
            col_bias,
            pull,
        } = scratch;
        let (rw, rb) = (&mut row_weight[..stride], &mut row_bias[..stride]);
        let (col_weight, col_bias) = (&mut col_weight[..stride], &mut col_bias[..stride]);
        let pull = &mut pull[..stride];
        let symmetric = pairs.is_symmetric();
        for (a, i) in tile.rows.clone().enumerate() {
            pairs.fill_anchor_row(i, cols.clone(), &mut rw[..width], &mut rb[..width]);
            neutral_padding(rw, rb, width);
            // Symmetric: anchor j's weight against contrast i is row i's weight of j.
            let (cw, cb): (&[f32], &[f32]) = if symmetric {
                (rw, rb)
            } else {
                pairs.fill_contrast_row(
                    i,
                    cols.clone(),
                    &mut col_weight[..width],
                    &mut col_bias[..width],
                );
                neutral_padding(col_weight, col_bias, width);
                (col_weight, col_bias)
            };
            let (rw, rb): (&[f32], &[f32]) = (rw, rb);
            let h = &mut logits[a * stride..][..stride];
            if P::SCALAR_PULLS {
                pull.fill(0.0);
                if let Some(pulls) = pulls {
                    for k in 0..width {
                        let j = cols.start + k;
                        let mut total = 0.0;
                        if rw[k] > 0.0 && i < pulls.scale.len() && pulls.scale[i] != 0.0 {
                            total += pulls.pull(i, rw[k], h[k]);
                        }
                        if cw[k] > 0.0 && j < pulls.scale.len() && pulls.scale[j] != 0.0 {
                            total += pulls.pull(j, cw[k], h[k]);
                        }
                        pull[k] = total as f32;
                    }
                }
            }
            let (lse, lse_lo, den, pos) = (
                terms.lse[i],
                terms.lse_lo[i],
                terms.den_scale[i],
                terms.positive_scale[i],
            );
            let lse_pos = (terms.lse_positive[i], terms.lse_positive_lo[i]);
            // Whole lane groups with fixed-size arrays: the loop body is then one vector
            // instruction sequence on every ISA (a zip of this many slices stayed scalar).
            for start in (0..stride).step_by(LANES) {
                let group = |v: &[f32]| lane_group(v, start);
                let (x, pull) = (group(h), group(pull));
                let (row_w, row_b, col_w, col_b) = (group(rw), group(rb), group(cw), group(cb));
                let (c_lse, c_lse_lo, c_den) = (group(col_lse), group(col_lse_lo), group(col_den));
                let (c_pos, c_lse_pos, c_lse_pos_lo) =
                    (group(col_pos), group(col_lse_pos), group(col_lse_pos_lo));
                let out: &mut [f32; LANES] = (&mut h[start..start + LANES])
                    .try_into()
                    .expect("whole lanes");
                for l in 0..LANES {
                    let e_row = exp(x[l] + row_b[l] - lse - lse_lo);
                    let e_col = exp(x[l] + col_b[l] - c_lse[l] - c_lse_lo[l]);
                    let d_row = if in_denominator::<NEG_ONLY>(row_w[l]) {
                        e_row
                    } else {
                        0.0
                    };
                    let d_col = if in_denominator::<NEG_ONLY>(col_w[l]) {
                        e_col
                    } else {
                        0.0
                    };
                    let g_row = den * d_row - P::term(row_w[l], x[l], pos, lse_pos);
                    let c_lse_pos = (c_lse_pos[l], c_lse_pos_lo[l]);
                    let g_col = c_den[l] * d_col - P::term(col_w[l], x[l], c_pos[l], c_lse_pos);
                    out[l] = if P::SCALAR_PULLS {
                        g_row + g_col - pull[l]
                    } else {
                        g_row + g_col
                    };
                }
            }
        }
    }
}

/// ∂L/∂z for every row, in f64, `[N, D]` row-major.
pub(super) fn gradient<R: PairWeights>(
    batch: &Batch,
    pairs: &R,
    terms: &AnchorTerms,
    pulls: Option<&Pulls>,
) -> crate::Result<Vec<f64>> {
    let neg_only = batch.only_negatives_in_denominator();
    match (batch.loss.denominator(), batch.loss.summation(), neg_only) {
        (Denominator::OnePositive, ..) => {
            gradient_with::<R, OnePositive, true>(batch, pairs, terms, pulls)
        }
        (_, Summation::Outside, false) => {
            gradient_with::<R, Outside, false>(batch, pairs, terms, pulls)
        }
        (_, Summation::Outside, true) => {
            gradient_with::<R, Outside, true>(batch, pairs, terms, pulls)
        }
        (_, Summation::Inside, false) => {
            gradient_with::<R, Inside, false>(batch, pairs, terms, pulls)
        }
        (_, Summation::Inside, true) => {
            gradient_with::<R, Inside, true>(batch, pairs, terms, pulls)
        }
    }
}

fn gradient_with<R: PairWeights, P: PositiveTerm, const NEG_ONLY: bool>(
    batch: &Batch,
    pairs: &R,
    terms: &AnchorTerms,
    pulls: Option<&Pulls>,
) -> crate::Result<Vec<f64>> {
    sweep(batch, Scratch::new, |tile, logits, scratch| {
        batch.isa.run(GradientTile::<R, P, NEG_ONLY> {
            pairs,
            tile,
            terms,
            pulls,
            logits,
            scratch,
            positive_term: std::marker::PhantomData,
        });
    })
}

/// Per-thread buffers of [`sweep`].
struct SweepScratch<X> {
    /// S, then H in place.
    logits: Aligned,
    partials: Partials,
    /// The tile kernel's own.
    extra: X,
}

/// The backward sweep of both paths: for each tile, S; `to_h` turns it into H in place (given
/// the tile, the logits and this thread's `extra` scratch); then the gradient products. Returns
/// ∂L/∂z in f64, `[N, D]` row-major, or [`crate::Error::OutOfMemory`] for it.
pub(super) fn sweep<X: Send>(
    batch: &Batch,
    extra: impl Fn() -> X + Sync + Send,
    to_h: impl Fn(&Tile, &mut [f32], &mut X) + Sync + Send,
) -> crate::Result<Vec<f64>> {
    let dim = batch.rows.dim;
    let mut dz = crate::alloc::filled("cpu", batch.shape.rows() * dim, 0.0)?;
    let states = block_chunks(&mut dz, dim);
    batch.schedule.for_each_tile(
        &states,
        || SweepScratch {
            logits: Aligned::zeros(BLOCK * padded(BLOCK)),
            partials: Partials::new(dim),
            extra: extra(),
        },
        |tile, scratch, grad_rows, grad_cols| {
            batch
                .rows
                .logits_tile(tile, batch.inverse_temperature, &mut scratch.logits);
            to_h(tile, &mut scratch.logits, &mut scratch.extra);
            scratch.partials.add_tile(
                batch,
                tile,
                &scratch.logits,
                grad_rows,
                grad_cols.map(|g| &mut **g),
            );
        },
    );
    drop(states);
    Ok(dz)
}

/// The f32 products of one tile's H with the feature blocks, before they join the f64 totals.
struct Partials {
    /// H Z_J (block I's rows).
    rows: Aligned,
    /// Hᵀ Z_I (block J's rows).
    cols: Aligned,
}

impl Partials {
    fn new(dim: usize) -> Self {
        Partials {
            rows: Aligned::zeros(BLOCK * dim),
            cols: Aligned::zeros(BLOCK * dim),
        }
    }

    /// Adds H Z_J to block I's `grad_rows` and, for an off-diagonal tile, Hᵀ Z_I to block J's
    /// `grad_cols` (a diagonal tile's H holds both halves already), H being the tile's logits
    /// turned into H in place.
    fn add_tile(
        &mut self,
        batch: &Batch,
        tile: &Tile,
        h: &[f32],
        grad_rows: &mut [f64],
        grad_cols: Option<&mut [f64]>,
    ) {
        let (m, n, dim) = (tile.rows.len(), tile.cols.len(), batch.rows.dim);
        let products = [
            (
                Some(grad_rows),
                false,
                (m, n),
                tile.cols.clone(),
                &mut self.rows,
            ),
            (grad_cols, true, (n, m), tile.rows.clone(), &mut self.cols),
        ];
        for (total, transposed, shape, block, partial) in products {
            let Some(total) = total else {
                continue;
            };
            let partial = &mut partial[..shape.0 * dim];
            batch
                .rows
                .tile_times_block(h, tile.stride(), shape, transposed, block, partial);
            batch.isa.run(AddInto { total, partial });
        }
    }
}

/// `total += partial`, element by element (a tile kernel, so that it runs on the widest
/// vectors).
struct AddInto<'a> {
    total: &'a mut [f64],
    partial: &'a [f32],
}

impl TileKernel for AddInto<'_> {
    #[inline(always)]
    fn run(self) {
        for (t, &p) in self.total.iter_mut().zip(self.partial) {
            *t += f64::from(p);
        }
    }
}
