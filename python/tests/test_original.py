"""The package against the authors' SupContrast formula itself: the same loss and gradient on
the original's domain (where it is finite), and finite results where the original breaks
(un-normalised features, small temperature)."""

from __future__ import annotations

import pytest
import torch

import helpers as h
from reference import original_supcon


def original(z, labels=None, mask=None, **options):
    leaf = z.detach().to(torch.float64).requires_grad_(True)
    loss = original_supcon(leaf, labels, mask, **options)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_same_as_original_labels_v2(gen, dtype):
    """The claim "on the original's domain it gives the same loss and gradient": normalised
    features, τ = 0.1, labels, V = 2; SupConLoss against the original formula run in float64
    on the same values (f32: 1e-5, f64: 1e-10)."""
    z = h.features(16, 2, 32, dtype, gen=gen)
    labels = h.labels(16, classes=4, gen=gen)
    expected_loss, expected_grad = original(z, labels, temperature=0.1)
    assert torch.isfinite(expected_loss)
    loss, grad = h.package(z, labels, temperature=0.1)
    tol = h.tolerance(dtype)
    h.assert_close(loss, expected_loss, tol, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, expected_grad, tol, "gradient")


ORIGINAL_OPTIONS = [
    ("simclr", None, {}),
    ("mask", "mask", {}),
    ("one", "labels", {"contrast_mode": "one"}),
    ("tau_ne_base", "labels", {"base_temperature": 0.5}),
    ("v1", "labels_v1", {}),
]


@pytest.mark.parametrize("case", ORIGINAL_OPTIONS, ids=[c[0] for c in ORIGINAL_OPTIONS])
def test_same_as_original_other_options(gen, case):
    """The same claim for the original's other options (SimCLR, an asymmetric soft mask,
    contrast_mode one, τ ≠ τ_b, V = 1 with anchors without positives) in float32."""
    _, kind, options = case
    views = 1 if kind == "labels_v1" else 3
    z = h.features(10, views, 12, torch.float32, gen=gen)
    labels = h.labels(10, gen=gen) if kind in ("labels", "labels_v1") else None
    mask = h.soft_mask(10, gen=gen, dyadic=True) if kind == "mask" else None
    options = {"temperature": 0.1, **options}
    expected_loss, expected_grad = original(z, labels, mask, **options)
    assert torch.isfinite(expected_loss)
    loss, grad = h.package(z, labels, mask, **options)
    h.assert_close(loss, expected_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, expected_grad, h.F32_TOL, "gradient",
                   floor=h.gradient_floor(z, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["labels", "simclr"])
def test_finite_where_original_breaks(gen, dtype, kind):
    """Un-normalised features (norm 50) at τ = 0.01: the original subtracts a row maximum that
    includes the self logit ‖z‖²/τ = 2.5e5, every other exponential underflows, and it returns
    NaN or ∞ (asserted, in the features' dtype and in float64). SupConLoss stays finite and
    matches the stable reference: to 1e-10 in f64; in f32 the loss to 1e-5 and the gradient
    to 1e-5 plus the rounding of logits of that size."""
    z = h.features(8, 2, 16, dtype, norm=50.0, gen=gen)
    labels = h.labels(8, classes=3, gen=gen) if kind == "labels" else None
    options = {"temperature": 0.01}
    broken = original_supcon(z.clone(), labels, **options)
    assert not bool(torch.isfinite(broken)), broken
    broken64, _ = original(z, labels, **options)
    assert not bool(torch.isfinite(broken64)), broken64

    loss, grad = h.package(z, labels, **options)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    ref_loss, ref_grad = h.reference(z, labels, **options)
    assert float(ref_loss) > 100  # a large, but finite, loss
    if dtype == torch.float64:
        h.assert_close(loss, ref_loss, h.F64_TOL, "loss")
        h.assert_close(grad, ref_grad, h.F64_TOL, "gradient")
    else:
        # The loss moves at most by the logits' f32 rounding (~0.1 here, on a loss > 100);
        # the gradient, through near-tied softmax terms, by up to eps32·max|s| relative.
        h.assert_close(loss, ref_loss, h.F32_TOL, "loss")
        h.assert_close(grad, ref_grad, h.logit_tolerance(z, 0.01), "gradient")


@pytest.mark.parametrize("temperature", [0.05, 0.02, 0.005])
def test_small_temperature_normalised(gen, temperature):
    """Unit-norm features at small τ (down to 0.005, as docs/math.md claims) in f32: finite
    loss and gradient, matching the reference to 1e-5 plus the rounding of logits of size
    1/τ."""
    z = h.features(12, 2, 8, torch.float32, gen=gen)
    labels = h.labels(12, classes=3, gen=gen)
    loss, grad = h.package(z, labels, temperature=temperature)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    ref_loss, ref_grad = h.reference(z, labels, temperature=temperature)
    tol = h.logit_tolerance(z, temperature)
    h.assert_close(loss, ref_loss, tol, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, tol, "gradient", floor=h.gradient_floor(z, temperature=temperature))
