"""The fused L2 normalisation (``normalize=True``, docs/math.md "Fused normalisation"): the
loss and the autograd gradient equal those of ``F.normalize(features, dim=-1)`` followed by the
plain loss, both differentiated by torch.autograd in float64 (``reference.supcon_reference``
with ``normalize=True``), for features of any scale, rows of norm 0, 1e-20 and 1e20 included,
on both host backends; gradcheck; the module; and the errors."""

from __future__ import annotations

import pytest
import torch

import helpers as h
import supcon
from reference import label_set_mask
from supcon.torch import SupConLoss, supcon_loss

BACKENDS = ["cpu", "reference"]


def tolerance(backend: str, dtype: torch.dtype = torch.float32) -> float:
    """The fused CPU backend computes in f32 (float64 features rounded to f32); the reference
    computes in f64 and rounds only its results to the features' dtype."""
    if backend == "reference":
        return h.F64_TOL if dtype == torch.float64 else 2 * h.eps(dtype)
    return h.F32_TOL if dtype == torch.float64 else h.tolerance(dtype)


def scaled_features(batch, views, dim, gen, dtype=torch.float32):
    """Gaussian rows scaled to norms spread log-uniformly over [0.1, 10]."""
    z = h.features(batch, views, dim, torch.float64, gen=gen)
    scale = 10.0 ** (2 * torch.rand(batch, views, 1, generator=gen, dtype=torch.float64) - 1)
    return (z * scale).to(dtype)


def unit(z):
    """The rows the loss sees: ``F.normalize(z, dim=-1)`` in float64."""
    return torch.nn.functional.normalize(z.detach().to(torch.float64), dim=-1)


def row_scaled(grad, z):
    """∂L/∂x times max(‖x‖, ε), row by row: the projected ∂L/∂u, of order 1 whatever the row's
    norm, so that every row is compared at its own scale (the gradient of a row of norm 1e20 is
    1e-20 times smaller than that of a unit row)."""
    norms = z.detach().to(torch.float64).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return grad.detach().to(torch.float64) * norms


def check(z, labels, mask, options, backend, gen, reference_mask=None):
    """The package with normalize=True against F.normalize + the reference (on
    ``reference_mask`` where given: the mask of label sets): the loss, and the gradient row by
    row at each row's scale."""
    batch, views = z.shape[0], z.shape[1]
    anchors = batch * views if options.get("contrast_mode", "all") == "all" else batch
    if options.get("reduction") == "none":
        u = torch.randn(anchors, generator=gen, dtype=torch.float64).to(z.dtype)
    else:
        u = (0.5 + torch.rand((), generator=gen, dtype=torch.float64)).to(z.dtype)
    loss, grad = h.package(z, labels, mask, upstream=u, normalize=True, backend=backend,
                           **options)
    if reference_mask is not None:
        labels, mask = None, reference_mask
    ref_loss, ref_grad = h.reference(z, labels, mask, upstream=u, normalize=True, **options)
    assert loss.dtype == z.dtype and grad.dtype == z.dtype and grad.shape == z.shape
    tol = tolerance(backend, z.dtype)
    h.assert_close(loss, ref_loss, tol, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(row_scaled(grad, z), row_scaled(ref_grad, z), tol, "gradient",
                   floor=h.gradient_floor(unit(z), u, **options))
    return loss, grad


CASES = [
    ("labels", "labels", {}),
    ("simclr", "simclr", {}),
    ("soft_mask", "soft_mask", {}),
    ("label_sets", "label_sets", {}),
    ("one", "labels", {"contrast_mode": "one"}),
    ("inside", "labels", {"summation": "inside"}),
    ("only_negatives", "labels", {"denominator": "only_negatives"}),
    ("one_positive", "soft_mask", {"denominator": "one_positive"}),
    ("cap1", "labels", {"positives_cap": 1}),
    ("none", "labels", {"reduction": "none"}),
    ("tau_ne_base_sum", "labels", {"temperature": 0.2, "base_temperature": 1.0,
                                   "reduction": "sum"}),
]


def positives(kind, batch, gen):
    """Labels, a soft mask, label sets (given to the package as labels; the reference takes
    their mask) or neither."""
    if kind == "labels":
        return h.labels(batch, gen=gen), None
    if kind == "soft_mask":
        return None, h.soft_mask(batch, gen=gen)
    if kind == "label_sets":
        return (torch.rand(batch, 5, generator=gen) < 0.4).to(torch.int64), None
    return None, None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_matches_the_composition(gen, backend, case):
    """Rows of norms 0.1 to 10: loss and gradient equal those of F.normalize + the loss, for
    each kind of positives and the options."""
    _, kind, options = case
    z = scaled_features(11, 2, 9, gen)
    labels, mask = positives(kind, 11, gen)
    reference_mask = label_set_mask(labels) if kind == "label_sets" else None
    check(z, labels, mask, options, backend, gen, reference_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_dtypes(gen, backend, dtype):
    """Half and double features: within the dtype's tolerance of the composition on the same
    (rounded) values."""
    z = scaled_features(9, 2, 16, gen, dtype)
    check(z, h.labels(9, gen=gen), None, {}, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_rows(gen, backend):
    """Rows of norm 0 (u = 0, ∂L/∂x = ∂L/∂u / ε as torch's clamp gives), 1e-20 (below ε: the
    same), 1e20 (squares beyond float32) and 1e-3 among ordinary rows: the loss and every row's
    gradient, at its own scale, match the composition."""
    z = scaled_features(8, 2, 6, gen).to(torch.float64)
    z[0, 0] = 0.0
    z[1, 1] *= 1e-20 / z[1, 1].norm()
    z[2, 0] *= 1e20 / z[2, 0].norm()
    z[3, 1] *= 1e-3 / z[3, 1].norm()
    z = z.to(torch.float32)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    loss, grad = check(z, labels, None, {"temperature": 0.1}, backend, gen)
    assert bool(torch.isfinite(grad).all())
    assert float(grad[2, 0].abs().max()) < 1e-18  # of order 1e-20: the chain rule's 1/‖x‖


def test_normalize_is_the_loss_of_unit_rows(gen):
    """normalize=True gives the loss of the normalised rows, and differs from the plain loss of
    the same un-normalised rows; on unit rows the loss is the plain one, the gradient its
    projection orthogonal to each row."""
    z = scaled_features(10, 2, 7, gen)
    labels = h.labels(10, gen=gen)
    loss = supcon_loss(z, labels, normalize=True)
    h.assert_close(loss, supcon_loss(unit(z).to(torch.float32), labels), 1e-6, "loss",
                   floor=1.0)
    assert abs(float(loss) - float(supcon_loss(z, labels))) > 1e-3
    u = unit(z).to(torch.float32)
    plain_loss, plain_grad = h.package(u, labels)
    loss, grad = h.package(u, labels, normalize=True)
    h.assert_close(loss, plain_loss, 1e-6, "loss", floor=1.0)
    u64, g64 = u.to(torch.float64), plain_grad.to(torch.float64)
    projected = g64 - u64 * (u64 * g64).sum(dim=-1, keepdim=True)
    h.assert_close(grad, projected, 1e-5, "gradient")
    assert float((grad.to(torch.float64) * u64).sum(dim=-1).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", ["labels", "label_sets"])
def test_gradcheck_f64(gen, kind):
    """torch.autograd.gradcheck (float64: the f64 reference backend) with normalize=True, on
    rows of varied norms, with labels and with label sets (Jaccard), reduced and per anchor."""
    z = scaled_features(5, 2, 3, gen, torch.float64).requires_grad_(True)
    if kind == "labels":
        labels, weight = torch.tensor([0, 1, 0, 2, 1]), {}
    else:
        labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
        weight = {"label_set_weight": "jaccard"}
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: supcon_loss(x, labels, normalize=True, temperature=0.5,
                                  reduction=reduction, **weight), (z,))


def test_module_options_and_repr(gen):
    """SupConLoss(normalize=True) shows it in its repr and equals the functional form; the
    NumPy front end takes normalize too."""
    z = scaled_features(6, 2, 5, gen)
    labels = h.labels(6, gen=gen)
    module = SupConLoss(normalize=True)
    assert "normalize=True" in repr(module) and "normalize=False" in repr(SupConLoss())
    assert torch.equal(module(z, labels), supcon_loss(z, labels, normalize=True))
    loss, grad = h.package(z, labels, normalize=True)
    value, np_grad = supcon.loss_and_grad(z.numpy(), labels.numpy(), normalize=True)
    assert value == pytest.approx(float(loss), rel=1e-6)
    h.assert_close(np_grad, grad, 1e-6, "gradient")


def test_custom_op_opcheck(gen):
    """torch.library.opcheck passes for supcon::forward with normalize."""
    z = scaled_features(4, 2, 5, gen).requires_grad_(True)
    args = (z, torch.tensor([0, 1, 0, 1]), None, None, 0.1, 0.1, "all", "outside", "all", 0,
            "zero_and_count", "mean", "any", True, "auto")
    torch.library.opcheck(torch.ops.supcon.forward.default, args)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_normalize_must_be_a_bool(value):
    """normalize other than True or False → ValueError, at construction and in the functional
    form."""
    with pytest.raises(ValueError, match="normalize"):
        SupConLoss(normalize=value)
    with pytest.raises(ValueError, match="normalize"):
        supcon_loss(torch.randn(4, 2, 3), normalize=value)
