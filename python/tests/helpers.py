"""Input generators, runners and error measures shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import supcon.torch as st
from reference import supcon_reference

# Norm-wise relative tolerances of the package against the float64 reference.
F32_TOL = 1e-5
F64_TOL = 1e-10
HALF_TOL = 1e-3  # the f32 computation on half inputs, before the result is rounded to half
# Below these magnitudes, errors are measured absolutely (scaled by them) rather than
# relatively: a loss is a difference of logit-sized terms (~1/τ), so one that is exactly 0 in
# exact arithmetic comes out at rounding level of those terms.
FLOOR = 1e-2
LOSS_FLOOR = 1.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(dtype: torch.dtype) -> float:
    """The norm-wise relative error allowed for a result returned in ``dtype``: the f32
    computation's error, plus for half types the rounding of the returned value (at most half
    an ulp, eps/2 relative)."""
    if dtype == torch.float64:
        return F64_TOL
    if dtype == torch.float32:
        return F32_TOL
    return HALF_TOL + eps(dtype) / 2


def tensor_core_tolerance(dtype: torch.dtype) -> float:
    """What the CUDA kernels' tensor cores add to a half-precision gradient: the backward rounds
    each weight H_kj to bf16 (2^-9 relative) and, for f16 features, the z_j it multiplies too
    (docs/math.md, "Precision of the kernels"); 4x that rounding, norm-wise (the emulated kernels
    measure about 1x on unit-norm batches)."""
    rounding = {torch.float16: 2 * 2.0**-9, torch.bfloat16: 2.0**-9}.get(dtype, 0.0)
    return 4 * rounding


def logit_tolerance(z, temperature) -> float:
    """The f32 tolerance for features of any scale: 1e-5, plus eps32·max|s| for the rounding
    of logits of size max|s| = max‖z‖²/τ (which every f32 backend forms)."""
    norm = float(z.detach().reshape(z.shape[0], z.shape[1], -1).to(torch.float64).norm(dim=-1).max())
    return F32_TOL + eps(torch.float32) * norm**2 / temperature


def _f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    return torch.as_tensor(x, dtype=torch.float64)  # a float or an array, never via float32


def rel_err(actual, expected, floor: float = FLOOR) -> float:
    """max|a − b| / max(max|b|, floor), in float64; inf if ``actual`` has a NaN or ±∞."""
    a, b = _f64(actual), _f64(expected)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(float(b.abs().max()), floor)
    return float((a - b).abs().max()) / scale


def features(batch, views, dim, dtype=torch.float32, norm=1.0, gen=None, device="cpu"):
    """Random ``[batch, views, dim]`` features of L2 norm ``norm`` (``None``: un-normalised
    Gaussian), drawn in float64 and then rounded to ``dtype``."""
    z = torch.randn(batch, views, dim, dtype=torch.float64, generator=gen)
    if norm is not None:
        z = F.normalize(z, dim=-1) * norm
    return z.to(dtype).to(device)


def labels(batch, classes=None, gen=None):
    """Random int64 labels; ``classes`` defaults to about batch/2 so that some labels are seen
    once (anchors without positives when V = 1)."""
    classes = classes or max(1, batch // 2)
    return torch.randint(0, classes, (batch,), generator=gen)


def soft_mask(batch, gen=None, density=0.5, dyadic=False):
    """A soft, asymmetric ``[batch, batch]`` float32 mask: weights in [0.1, 1) on a random
    subset of entries, 0 elsewhere (some rows may be all zero). ``dyadic``: weights k/8,
    k = 1..8, whose sums are exact in float32 (the original sums its mask in float32)."""
    if dyadic:
        weights = torch.randint(1, 9, (batch, batch), generator=gen) / 8.0
    else:
        weights = 0.1 + 0.9 * torch.rand(batch, batch, generator=gen)
    keep = torch.rand(batch, batch, generator=gen) < density
    return torch.where(keep, weights, torch.zeros(())).to(torch.float32)


def binary_mask(batch, gen=None, density=0.4):
    """An asymmetric 0/1 float32 mask."""
    return (torch.rand(batch, batch, generator=gen) < density).to(torch.float32)


def package(z, labels=None, mask=None, upstream=None, **options):
    """``SupConLoss(**options)(z, labels, mask)`` and ∂J/∂z by autograd (J the loss, or
    Σ_i u_i ℓ_i for ``reduction="none"`` with upstream u), for a fresh leaf with z's values."""
    leaf = z.detach().clone().requires_grad_(True)
    loss = st.SupConLoss(**options)(leaf, labels, mask)
    objective = (loss if upstream is None else loss * upstream.to(loss.dtype)).sum()
    objective.backward()
    return loss.detach(), leaf.grad


def reference(z, labels=None, mask=None, upstream=None, **options):
    """The float64 reference on z's values widened to float64 (on the CPU): loss and ∂J/∂z."""
    leaf = z.detach().cpu().to(torch.float64).requires_grad_(True)
    options.pop("backend", None)
    loss = supcon_reference(leaf, labels, mask, **options)
    objective = (loss if upstream is None else loss * upstream.cpu().to(torch.float64)).sum()
    objective.backward()
    return loss.detach(), leaf.grad


def gradient_floor(z, upstream=None, temperature=0.07, base_temperature=0.07,
                   contrast_mode="all", reduction="mean", **_):
    """Half the natural scale of a gradient entry, c·max|u|·max‖z_r‖/(τ·R') (each row of dZ is
    (1/τ)·Σ_j H_kj z_j with |H_kj| of order c·u/R'): entries that cancel to 0 in exact
    arithmetic come out at f32 rounding level of this scale, not of 0 (for example B = 2,
    V = 1, one label: the exact gradient is 0, the fused f32 path gives ~1e-6 of the scale)."""
    batch, views = z.shape[0], z.shape[1]
    anchors = batch * views if contrast_mode == "all" else batch
    count = anchors if reduction == "mean" else 1
    u = 1.0 if upstream is None else float(torch.as_tensor(upstream).abs().max())
    norm = float(z.detach().reshape(batch, views, -1).to(torch.float64).norm(dim=-1).max())
    c = temperature / base_temperature
    return max(0.5 * c * u * norm / (temperature * count), 1e-30)


def assert_close(actual, expected, tol, what="", floor=FLOOR):
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\nactual={actual}\nexpected={expected}"
