"""``supcon.loss_and_grad`` for NumPy arrays: the same loss and gradient as the torch path and
as the float64 reference; float16 and float64 input; reduction none with an upstream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers as h
import supcon

CASES = [
    ("labels", "labels", {}),
    ("simclr", "simclr", {}),
    ("soft_mask", "soft_mask", {}),
    ("one_labels", "labels", {"contrast_mode": "one"}),
    ("inside_mask", "soft_mask", {"summation": "inside"}),
    ("only_neg_cap", "labels", {"denominator": "only_negatives", "positives_cap": 2}),
    ("one_positive", "labels", {"denominator": "one_positive"}),
    ("tau_sum", "labels", {"temperature": 0.2, "base_temperature": 0.5, "reduction": "sum"}),
    ("exclude", "labels", {"no_positive": "exclude"}),
]


def positives(kind, batch, gen):
    if kind == "labels":
        return h.labels(batch, gen=gen), None
    if kind == "soft_mask":
        return None, h.soft_mask(batch, gen=gen)
    return None, None


def np_or_none(x):
    return None if x is None else x.numpy()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_and_reference_f32(gen, case):
    """float32 arrays: the loss (a Python float) and the float32 gradient equal the torch
    path's (same backend: to f32 rounding of the returned loss) and match the reference to
    1e-5."""
    _, kind, options = case
    z = h.features(11, 2, 13, torch.float32, gen=gen)
    labels, mask = positives(kind, 11, gen)
    loss, grad = supcon.loss_and_grad(z.numpy(), np_or_none(labels), np_or_none(mask), **options)
    assert isinstance(loss, float)
    assert grad.dtype == np.float32 and grad.shape == (11, 2, 13)
    torch_loss, torch_grad = h.package(z, labels, mask, **options)
    assert abs(loss - float(torch_loss)) <= h.eps(torch.float32) * max(abs(loss), 1e-30)
    np.testing.assert_array_equal(grad, torch_grad.numpy())
    ref_loss, ref_grad = h.reference(z, labels, mask, **options)
    h.assert_close(torch.tensor(loss, dtype=torch.float64), ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(torch.from_numpy(grad), ref_grad, h.F32_TOL, "gradient",
                   floor=h.gradient_floor(z, **options))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float64_uses_reference_backend(gen, case):
    """float64 arrays run the f64 reference backend: loss and float64 gradient within 1e-10
    of the test's reference."""
    _, kind, options = case
    z = h.features(7, 3, 5, torch.float64, norm=2.0, gen=gen)
    labels, mask = positives(kind, 7, gen)
    loss, grad = supcon.loss_and_grad(z.numpy(), np_or_none(labels), np_or_none(mask), **options)
    assert grad.dtype == np.float64
    ref_loss, ref_grad = h.reference(z, labels, mask, **options)
    h.assert_close(torch.tensor(loss, dtype=torch.float64), ref_loss, h.F64_TOL, "loss")
    h.assert_close(torch.from_numpy(grad), ref_grad, h.F64_TOL, "gradient")


@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_float16_input(gen, case):
    """float16 arrays are widened to f32: the loss (a float) and the float32 gradient match the
    reference on the rounded values to the f32 tolerance (nothing is rounded back to half)."""
    _, kind, options = case
    z = h.features(9, 2, 10, torch.float16, gen=gen)
    labels, mask = positives(kind, 9, gen)
    loss, grad = supcon.loss_and_grad(z.numpy(), np_or_none(labels), np_or_none(mask), **options)
    assert z.numpy().dtype == np.float16 and grad.dtype == np.float32
    ref_loss, ref_grad = h.reference(z, labels, mask, **options)
    h.assert_close(torch.tensor(loss, dtype=torch.float64), ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(torch.from_numpy(grad), ref_grad, h.F32_TOL, "gradient",
                   floor=h.gradient_floor(z, **options))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_reduction_none_with_upstream(gen, rng, dtype, contrast_mode):
    """reduction="none": [R] float64 per-anchor losses, and the gradient of Σ u_i ℓ_i for a
    random upstream u, as the reference; the default upstream is all ones."""
    z = h.features(8, 2, 6, torch.float32 if dtype == np.float32 else torch.float64, gen=gen)
    labels = h.labels(8, gen=gen)
    anchors = 16 if contrast_mode == "all" else 8
    u = rng.standard_normal(anchors)
    options = {"reduction": "none", "contrast_mode": contrast_mode}
    per_anchor, grad = supcon.loss_and_grad(z.numpy(), labels.numpy(), upstream=u, **options)
    assert per_anchor.dtype == np.float64 and per_anchor.shape == (anchors,)
    ref_loss, ref_grad = h.reference(z, labels, upstream=torch.from_numpy(u), **options)
    tol = h.F32_TOL if dtype == np.float32 else h.F64_TOL
    h.assert_close(torch.from_numpy(per_anchor), ref_loss, tol, "per-anchor losses",
                   floor=h.LOSS_FLOOR)
    h.assert_close(torch.from_numpy(grad), ref_grad, tol, "gradient",
                   floor=h.gradient_floor(z, u, **options))
    _, ones_grad = supcon.loss_and_grad(z.numpy(), labels.numpy(), **options)
    _, ref_ones = h.reference(z, labels, **options)
    h.assert_close(torch.from_numpy(ones_grad), ref_ones, tol, "gradient, default upstream",
                   floor=h.gradient_floor(z, **options))


def test_scalar_upstream_scales_gradient(gen):
    """A scalar upstream multiplies the gradient (mean and sum) and leaves the loss as is."""
    z = h.features(6, 2, 5, torch.float64, gen=gen).numpy()
    labels = np.array([0, 1, 0, 1, 2, 2])
    for reduction in ("mean", "sum"):
        loss1, grad1 = supcon.loss_and_grad(z, labels, reduction=reduction)
        loss2, grad2 = supcon.loss_and_grad(z, labels, reduction=reduction, upstream=-2.5)
        assert loss1 == loss2
        assert np.abs(grad1).max() > 0
        np.testing.assert_allclose(grad2, -2.5 * grad1, rtol=0,
                                   atol=1e-13 * 2.5 * np.abs(grad1).max())


def test_input_forms(gen):
    """Labels as a list or int32 array, a mask as a nested list, trailing dimensions and
    non-contiguous arrays: the same results as the canonical inputs; the gradient has the
    input's shape."""
    z = h.features(6, 2, 8, torch.float32, gen=gen).numpy()
    labels = np.array([0, 1, 0, 1, 2, 2])
    loss, grad = supcon.loss_and_grad(z, labels)
    for other in (labels.tolist(), labels.astype(np.int32), labels.astype(np.uint8)):
        other_loss, other_grad = supcon.loss_and_grad(z, other)
        assert other_loss == loss and np.array_equal(other_grad, grad)
    loss4, grad4 = supcon.loss_and_grad(z.reshape(6, 2, 2, 4), labels)
    assert loss4 == loss and grad4.shape == (6, 2, 2, 4)
    assert np.array_equal(grad4.reshape(6, 2, 8), grad)
    transposed = np.ascontiguousarray(z.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not transposed.flags.c_contiguous
    t_loss, t_grad = supcon.loss_and_grad(transposed, labels)
    assert t_loss == loss and np.array_equal(t_grad, grad)
    mask = (labels[:, None] == labels[None, :]).astype(np.float32)
    m_loss, m_grad = supcon.loss_and_grad(z, mask=mask.tolist())
    np.testing.assert_allclose(m_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(m_grad, grad, rtol=1e-5, atol=1e-6 * np.abs(grad).max())


def test_explicit_backends(gen):
    """backend="reference" on float32 arrays and "cpu" on float64 arrays both agree with the
    default backends to f32 precision; they are really different code paths (their float32
    results are not all bitwise equal)."""
    z = h.features(9, 2, 7, torch.float32, gen=gen).numpy()
    labels = h.labels(9, gen=gen).numpy()
    loss, grad = supcon.loss_and_grad(z, labels)
    r_loss, r_grad = supcon.loss_and_grad(z, labels, backend="reference")
    ref_loss, ref_grad = h.reference(torch.from_numpy(z), torch.from_numpy(labels))
    assert abs(r_loss - float(ref_loss)) <= 1e-12 * max(1.0, abs(float(ref_loss)))
    h.assert_close(torch.from_numpy(r_grad), ref_grad, 2 * h.eps(torch.float32), "gradient")
    np.testing.assert_allclose(r_loss, loss, rtol=1e-5)
    c_loss, c_grad = supcon.loss_and_grad(z.astype(np.float64), labels, backend="cpu")
    assert c_grad.dtype == np.float64
    np.testing.assert_allclose(c_loss, float(ref_loss), rtol=1e-5)
    h.assert_close(torch.from_numpy(c_grad), ref_grad, h.F32_TOL, "gradient")
