"""Autograd integration: ``torch.autograd.gradcheck`` in float64 (where the f64 reference
backend runs), double backward refused, and ``torch.compile`` with ``fullgraph=True``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import helpers as h
from supcon.torch import SupConLoss, supcon_loss

GRADCHECK_CASES = [
    ("labels", "labels", {}),
    ("soft_mask", "soft_mask", {}),
    ("simclr", "simclr", {}),
    ("contrast_one", "labels", {"contrast_mode": "one"}),
    ("inside", "labels", {"summation": "inside"}),
    ("inside_mask_one", "soft_mask", {"summation": "inside", "contrast_mode": "one"}),
    ("only_negatives", "labels", {"denominator": "only_negatives"}),
    ("one_positive", "soft_mask", {"denominator": "one_positive"}),
    ("cap", "labels", {"positives_cap": 1}),
    ("tau_ne_base_sum", "labels", {"temperature": 0.3, "base_temperature": 0.07,
                                   "reduction": "sum"}),
    ("exclude", "labels", {"no_positive": "exclude"}),
]


def positives(kind, batch, gen):
    if kind == "labels":
        return torch.tensor([0, 1, 0, 2, 1][:batch]), None
    if kind == "soft_mask":
        return None, h.soft_mask(batch, gen=gen, density=0.7)
    return None, None


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck_f64(gen, case):
    """torch.autograd.gradcheck: the analytic gradient of the package's loss (float64 features,
    f64 reference backend) equals central finite differences, for each option."""
    _, kind, options = case
    z = torch.randn(5, 2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels, mask = positives(kind, 5, gen)
    options = {"temperature": 0.5, **options}
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, mask, **options), (z,))


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_gradcheck_reduction_none(gen, contrast_mode):
    """reduction="none": gradcheck of the full [R] Jacobian (each anchor's loss in turn as the
    output), and of Σ_i u_i ℓ_i with random weights u."""
    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])
    options = {"temperature": 0.5, "reduction": "none", "contrast_mode": contrast_mode}
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, **options), (z,))
    u = torch.randn(8 if contrast_mode == "all" else 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda x: (supcon_loss(x, labels, **options) * u).sum(), (z,))


def test_gradcheck_catches_a_wrong_gradient(gen):
    """gradcheck is able to fail here: a function whose gradient is deliberately scaled fails
    it (so the passes above are meaningful)."""
    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 1.01 * grad

    assert not torch.autograd.gradcheck(
        lambda x: supcon_loss(Scaled.apply(x), labels, temperature=0.5), (z,), raise_exception=False)


def test_double_backward_raises(gen):
    """The gradient cannot be differentiated again: a first-order gradient with
    create_graph=True is fine (and equals the plain one), but backpropagating through it raises
    RuntimeError."""
    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])
    loss = supcon_loss(z, labels, temperature=0.5)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (plain,) = torch.autograd.grad(supcon_loss(z, labels, temperature=0.5), z)
    assert torch.equal(grad.detach(), plain)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.norm().backward()
    with pytest.raises(RuntimeError):
        torch.autograd.gradgradcheck(lambda x: supcon_loss(x, labels, temperature=0.5), (z,))


class Model(torch.nn.Module):
    """Linear projection, L2 normalisation, SupCon loss: the shape of a SupCon training step."""

    def __init__(self, dim_in=8, dim_out=6, **options):
        super().__init__()
        self.head = torch.nn.Linear(dim_in, dim_out)
        self.loss = SupConLoss(**options)

    def forward(self, x, labels=None, mask=None):
        return self.loss(F.normalize(self.head(x), dim=-1), labels, mask)


def eager_and_compiled(model, backend, *inputs):
    """Loss and parameter gradients of the eager model and of torch.compile(fullgraph=True)."""
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend=backend)):
        model.zero_grad()
        loss = fn(*inputs)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def test_torch_compile_fullgraph_inductor(gen):
    """torch.compile(fullgraph=True) (inductor) of Linear + normalize + SupConLoss traces the
    custom ops without a graph break; the compiled forward and backward match eager."""
    torch._dynamo.reset()
    model = Model(temperature=0.1)
    x = torch.randn(6, 2, 8, generator=gen)
    labels = torch.randint(0, 3, (6,), generator=gen)
    (eager_loss, eager_grads), (loss, grads) = eager_and_compiled(model, "inductor", x, labels)
    h.assert_close(loss, eager_loss, 1e-6, "loss", floor=1.0)
    for g, e in zip(grads, eager_grads):
        h.assert_close(g, e, 1e-5, "parameter gradient")
    assert all(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("options,kind", [
    ({"contrast_mode": "one"}, "labels"),
    ({"reduction": "none", "summation": "inside"}, "mask"),
    ({}, "simclr"),
], ids=["one_labels", "none_inside_mask", "simclr"])
def test_torch_compile_fullgraph_options(gen, options, kind):
    """torch.compile(fullgraph=True) (aot_eager, to keep it fast) with other options and
    positives (labels, a mask, SimCLR) matches eager in loss and parameter gradients."""
    torch._dynamo.reset()
    model = Model(**options)
    x = torch.randn(5, 3, 8, generator=gen)
    labels = torch.randint(0, 2, (5,), generator=gen) if kind == "labels" else None
    mask = h.soft_mask(5, gen=gen) if kind == "mask" else None
    (eager_loss, eager_grads), (loss, grads) = eager_and_compiled(model, "aot_eager", x, labels,
                                                                  mask)
    assert loss.shape == eager_loss.shape
    assert torch.equal(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


def test_torch_compile_graph_break_would_fail():
    """fullgraph=True is strict here: a function with a real graph break fails to compile,
    so the compile tests above would catch a break inside the loss."""
    torch._dynamo.reset()

    def broken(x):
        torch._dynamo.graph_break()
        return x.sum()

    with pytest.raises(Exception):
        torch.compile(broken, fullgraph=True, backend="aot_eager")(torch.ones(2))
