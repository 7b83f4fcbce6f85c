//! The fused L2 normalisation (docs/math.md, "Fused normalisation"): the loss of
//! u = x / max(‖x‖, ε) per row, ε = 1e-12, as `torch.nn.functional.normalize(x, dim=-1)`, and
//! the chain rule back to x. Shared by the reference and the CPU backend.

/// ε of `torch.nn.functional.normalize`.
pub(crate) const EPSILON: f64 = 1e-12;

/// ‖x‖ in f64, without overflow or underflow: the squares are taken of x / max|x_k|, so rows of
/// norm 1e-200 or 1e200 (and f32 rows whose squares overflow f32) have their exact norm.
pub(crate) fn norm(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let scale = x.clone().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale == 0.0 {
        return 0.0;
    }
    scale * x.map(|v| (v / scale).powi(2)).sum::<f64>().sqrt()
}

/// The divisor of a row of norm `norm`: max(‖x‖, ε).
pub(crate) fn divisor(norm: f64) -> f64 {
    norm.max(EPSILON)
}

/// ∂L/∂x of one row, in place over g = ∂L/∂u, given u and ‖x‖:
/// (g − u (u·g)) / ‖x‖ where ‖x‖ ≥ ε, and g / ε below, where the clamp holds the divisor
/// constant (torch's `clamp_min` passes no gradient there).
pub(crate) fn chain_rule<U: Copy + Into<f64>>(g: &mut [f64], u: &[U], norm: f64) {
    if norm >= EPSILON {
        let along: f64 = u.iter().zip(g.iter()).map(|(&u, g)| u.into() * g).sum();
        for (g, &u) in g.iter_mut().zip(u) {
            *g = (*g - u.into() * along) / norm;
        }
    } else {
        g.iter_mut().for_each(|g| *g /= EPSILON);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_of_extreme_rows_are_exact() {
        for scale in [0.0, 1e-300, 1e-20, 1.0, 1e20, 1e300] {
            let row = [3.0 * scale, -4.0 * scale];
            let got = norm(row.iter().copied());
            assert!(
                (got - 5.0 * scale).abs() <= 5.0 * scale * 1e-15,
                "{scale}: {got}"
            );
        }
    }

    #[test]
    fn chain_rule_projects_out_the_row_direction() {
        // x = (3, 4): u = (0.6, 0.8); g along u vanishes, g across u is divided by ‖x‖.
        let u = [0.6, 0.8];
        let mut along = [0.6, 0.8];
        chain_rule(&mut along, &u, 5.0);
        assert!(along.iter().all(|g| g.abs() < 1e-16), "{along:?}");
        let mut across = [-0.8, 0.6];
        chain_rule(&mut across, &u, 5.0);
        assert!((across[0] + 0.16).abs() < 1e-16 && (across[1] - 0.12).abs() < 1e-16);
        let mut tiny = [1.0, 2.0];
        chain_rule(&mut tiny, &[0.0f64, 0.0], 0.0);
        assert_eq!(tiny, [1e12, 2e12]);
    }
}
