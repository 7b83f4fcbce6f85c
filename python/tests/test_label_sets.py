"""Label sets (``labels`` as a multi-hot ``[bsz, K]`` tensor, docs/math.md "Label sets")
through ``supcon.torch`` and ``supcon.loss_and_grad``: loss and gradient against the float64
reference on the ``[bsz, bsz]`` mask the sets stand for (``reference.label_set_mask``), for
each weight, K around the 64-bit word of the packed sets, empty sets, both contrast modes and
the other options, on both host backends; the compatibility rule for 2-D labels; gradcheck;
torch.compile; and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers as h
import supcon
from reference import label_set_mask
from supcon.torch import SupConLoss, supcon_loss

BACKENDS = ["cpu", "reference"]
WEIGHTS = ["any", "jaccard", "fraction"]


def tolerance(backend: str, dtype: torch.dtype = torch.float32) -> float:
    """The fused CPU backend computes in f32 (float64 features rounded to f32); the reference
    computes in f64 and rounds only its results to the features' dtype."""
    if backend == "reference":
        return h.F64_TOL if dtype == torch.float64 else 2 * h.eps(dtype)
    return h.F32_TOL if dtype == torch.float64 else h.tolerance(dtype)


def random_sets(batch, labels, gen, dtype=torch.int64):
    """Random ``[batch, labels]`` 0/1 sets of about 3 labels each (so that some pairs overlap and
    some do not), in ``dtype``. Sample 1 has the empty set; samples 0 and 2 share the last label
    (the last bit of the last 64-bit word)."""
    sets = torch.rand(batch, labels, generator=gen) < min(0.4, 3.0 / max(labels, 1))
    sets[1] = False
    if labels:
        sets[0, -1] = sets[2, -1] = True
    return sets.to(dtype)


def check(z, sets, weight, options, backend, gen, tol=None):
    """The package on label sets against the mask reference: loss and gradient (with a random
    upstream, per anchor for reduction none)."""
    batch, views = z.shape[0], z.shape[1]
    anchors = batch * views if options.get("contrast_mode", "all") == "all" else batch
    if options.get("reduction") == "none":
        u = torch.randn(anchors, generator=gen, dtype=torch.float64).to(z.dtype)
    else:
        u = (0.5 + torch.rand((), generator=gen, dtype=torch.float64)).to(z.dtype)
    loss, grad = h.package(z, sets, upstream=u, label_set_weight=weight, backend=backend,
                           **options)
    ref_loss, ref_grad = h.reference(z, None, label_set_mask(sets, weight), upstream=u,
                                     **options)
    assert loss.dtype == z.dtype and grad.shape == z.shape and loss.shape == ref_loss.shape
    tol = tolerance(backend, z.dtype) if tol is None else tol
    h.assert_close(loss, ref_loss, tol, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, tol, "gradient", floor=h.gradient_floor(z, u, **options))
    return loss, grad


# (K, dtype): K = 1 as bool (a [bsz, 1] bool tensor is label sets), 3 in int64, 64 (one full
# word) in uint8, 65 (a second word with one label) in int32.
SIZES = [(1, torch.bool), (3, torch.int64), (64, torch.uint8), (65, torch.int32)]


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"K{s[0]}")
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_sets_match_the_mask_reference(gen, backend, weight, size, contrast_mode):
    """Each weight, K = 1, 3, 64, 65, a sample with the empty set, contrast modes all and one:
    loss and gradient equal the reference's on the equivalent mask (1e-5 on the fused CPU
    backend, f32 rounding on the reference backend)."""
    labels, dtype = size
    z = h.features(10, 2, 8, gen=gen)
    sets = random_sets(10, labels, gen, dtype)
    check(z, sets, weight, {"contrast_mode": contrast_mode, "temperature": 0.1}, backend, gen)


OPTION_CASES = [
    ("inside", {"summation": "inside"}),
    ("only_negatives", {"denominator": "only_negatives"}),
    ("one_positive_inside", {"denominator": "one_positive", "summation": "inside"}),
    ("cap2", {"positives_cap": 2}),
    ("exclude", {"no_positive": "exclude"}),
    ("none_one", {"reduction": "none", "contrast_mode": "one"}),
    ("sum_tau_ne_base", {"reduction": "sum", "temperature": 0.2, "base_temperature": 0.07}),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
@pytest.mark.parametrize("weight", ["jaccard", "fraction"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_sets_with_other_options(gen, backend, weight, case):
    """Label sets under L_in, the other denominators, a cap, exclude (V = 1, so that the empty
    set leaves an anchor without positives), reduction none and sum: as the mask reference."""
    _, options = case
    views = 1 if "no_positive" in options else 3
    z = h.features(9, views, 7, gen=gen)
    check(z, random_sets(9, 5, gen), weight, options, backend, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_sets_dtypes(gen, backend, dtype):
    """Half and double features: within the dtype's tolerance of the reference."""
    z = h.features(8, 2, 12, dtype, gen=gen)
    check(z, random_sets(8, 4, gen), "jaccard", {}, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sets_are_simclr(gen, backend):
    """K = 0, or sets that are all empty: only the other views are positives, as in SimCLR."""
    z = h.features(7, 3, 5, gen=gen)
    loss, grad = h.package(z, backend=backend)
    for sets in (torch.zeros(7, 0, dtype=torch.bool), torch.zeros(7, 4, dtype=torch.int64)):
        for weight in WEIGHTS:
            other_loss, other_grad = h.package(z, sets, label_set_weight=weight, backend=backend)
            h.assert_close(other_loss, loss, 1e-6, f"loss, K = {sets.shape[1]} {weight}")
            h.assert_close(other_grad, grad, 1e-6, f"gradient, K = {sets.shape[1]} {weight}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_sets_are_class_labels(gen, backend):
    """One-hot sets of class labels give the class labels' loss and gradient under every
    weight (two samples share their one label or nothing: every weight is 1 or 0)."""
    z = h.features(9, 2, 6, gen=gen)
    labels = h.labels(9, classes=4, gen=gen)
    loss, grad = h.package(z, labels, backend=backend)
    one_hot = F.one_hot(labels, 4)
    for weight in WEIGHTS:
        other_loss, other_grad = h.package(z, one_hot, label_set_weight=weight, backend=backend)
        h.assert_close(other_loss, loss, 1e-6, f"loss, {weight}")
        h.assert_close(other_grad, grad, 1e-6, f"gradient, {weight}")


def test_label_set_forms(gen):
    """The same sets as bool, int8, int16, int32, int64 or uint8 give the same result; a
    [bsz, 1] integer tensor stays class labels (the original's form), while a [bsz, 1] bool
    tensor is label sets; label_set_weight does nothing to class labels."""
    z = h.features(8, 2, 5, gen=gen)
    sets = random_sets(8, 6, gen, torch.bool)
    expected = supcon_loss(z, sets, label_set_weight="fraction")
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        assert torch.equal(supcon_loss(z, sets.to(dtype), label_set_weight="fraction"),
                           expected), dtype
    labels = torch.tensor([0, 1, 1, 0, 2, 1, 0, 2])
    column = labels.reshape(-1, 1)
    assert torch.equal(supcon_loss(z, column), supcon_loss(z, labels))
    assert torch.equal(supcon_loss(z, column, label_set_weight="jaccard"), supcon_loss(z, labels))
    as_sets = column == 1
    h.assert_close(supcon_loss(z, as_sets), h.reference(z, mask=label_set_mask(as_sets))[0],
                   h.F32_TOL, "a [bsz, 1] bool tensor as label sets", floor=h.LOSS_FLOOR)
    assert not torch.equal(supcon_loss(z, as_sets), supcon_loss(z, column))


def test_weights_differ(gen):
    """The three weights give three different losses on overlapping sets (the option reaches
    the backend), and fraction is not jaccard transposed: it is asymmetric."""
    z = h.features(8, 2, 5, gen=gen)
    sets = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1],
                         [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0]])
    losses = {w: float(supcon_loss(z, sets, label_set_weight=w)) for w in WEIGHTS}
    assert len(set(losses.values())) == 3, losses
    mask = label_set_mask(sets, "fraction")
    assert not torch.equal(mask, mask.T)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_gradcheck_f64(gen, weight):
    """torch.autograd.gradcheck (float64 features: the f64 reference backend) with label sets,
    reduction mean and, per anchor, none."""
    z = torch.randn(5, 2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    sets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: supcon_loss(x, sets, label_set_weight=weight, temperature=0.5,
                                  reduction=reduction), (z,))


def test_module_options_and_repr(gen):
    """SupConLoss takes label_set_weight, shows it in its repr, equals the functional form, and
    runs label sets of CPU features on the CPU backend."""
    z = h.features(6, 2, 5, gen=gen)
    sets = random_sets(6, 3, gen)
    module = SupConLoss(0.2, label_set_weight="jaccard")
    assert "label_set_weight='jaccard'" in repr(module)
    assert torch.equal(module(z, sets), supcon_loss(z, sets, temperature=0.2,
                                                    label_set_weight="jaccard"))
    assert module.backend_for(z, sets) == "cpu"


def test_torch_compile_fullgraph(gen):
    """torch.compile(fullgraph=True) (aot_eager) of Linear + SupConLoss on label sets traces
    without a graph break (the sets' values are checked inside the operator) and matches
    eager."""
    torch._dynamo.reset()
    head = torch.nn.Linear(8, 6)
    loss_fn = SupConLoss(temperature=0.1, label_set_weight="jaccard")

    def step(x, sets):
        return loss_fn(F.normalize(head(x), dim=-1), sets)

    x = torch.randn(6, 2, 8, generator=gen)
    sets = random_sets(6, 5, gen)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        head.zero_grad()
        loss = fn(x, sets)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone()))
    (eager_loss, eager_grad), (loss, grad) = results
    assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)


def test_custom_op_opcheck(gen):
    """torch.library.opcheck passes for supcon::forward with label sets."""
    z = h.features(4, 2, 5, gen=gen).requires_grad_(True)
    sets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    args = (z, None, None, sets, 0.1, 0.1, "all", "outside", "all", 0, "zero_and_count", "mean",
            "jaccard", False, "auto")
    torch.library.opcheck(torch.ops.supcon.forward.default, args)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_numpy_front_end(gen, weight):
    """supcon.loss_and_grad takes 2-D labels as label sets too (bool or 0/1 integers) and gives
    the torch front end's loss and gradient; a [bsz, 1] integer array stays class labels."""
    z = h.features(7, 2, 6, gen=gen)
    sets = random_sets(7, 4, gen)
    loss, grad = h.package(z, sets, label_set_weight=weight)
    for form in (sets.numpy(), sets.numpy().astype(bool), sets.numpy().astype(np.uint16)):
        value, np_grad = supcon.loss_and_grad(z.numpy(), form, label_set_weight=weight)
        assert value == pytest.approx(float(loss), rel=1e-6)
        h.assert_close(np_grad, grad, 1e-6, "gradient")
    labels = np.array([[0], [1], [0], [2], [1], [2], [0]])
    assert supcon.loss_and_grad(z.numpy(), labels)[0] == supcon.loss_and_grad(
        z.numpy(), labels.reshape(-1))[0]


def torch_call(features, labels, **options):
    z = features.detach().clone().requires_grad_(True)
    SupConLoss(**options)(z, labels).backward()


def numpy_call(features, labels, **options):
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    supcon.loss_and_grad(features.numpy(), labels, **options)


front_ends = pytest.mark.parametrize("call", [torch_call, numpy_call], ids=["torch", "numpy"])


@front_ends
@pytest.mark.parametrize("value", [2, -1])
def test_values_other_than_0_or_1(call, value):
    """A label set entry other than 0 or 1 → ValueError naming its position."""
    sets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    sets[2, 1] = value
    with pytest.raises(ValueError, match=rf"labels\[2, 1\] = {value}\b"):
        call(torch.randn(4, 2, 3), sets)


@front_ends
@pytest.mark.parametrize("shape", [(3, 2), (5, 4), (1, 4)])
def test_wrong_row_count(call, shape):
    """Label sets whose row count is not bsz → ValueError."""
    with pytest.raises(ValueError, match=r"label sets \(2-D labels\) must be \[4, K\]"):
        call(torch.randn(4, 2, 3), torch.zeros(*shape, dtype=torch.int64))


@front_ends
def test_float_label_sets(call):
    """Floating-point 2-D labels → ValueError (label sets are integers or bools)."""
    with pytest.raises(ValueError, match="integers"):
        call(torch.randn(4, 2, 3), torch.zeros(4, 3))


@front_ends
def test_bad_weight_name(call):
    """An unknown label_set_weight → ValueError naming the choices."""
    with pytest.raises(ValueError, match="label_set_weight"):
        call(torch.randn(4, 2, 3), torch.zeros(4, 3, dtype=torch.int64), label_set_weight="dice")


def test_stray_bool_bytes_are_refused():
    """A bool tensor whose bytes are not 0 or 1 (a uint8 tensor viewed as bool) is refused by
    the extension with a ValueError, never read as a bool."""
    raw = torch.tensor([[1, 0], [0, 1], [3, 0], [0, 0]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"label_sets\[2, 0\] = 3 is not 0 or 1"):
        supcon_loss(torch.randn(4, 2, 3), raw.view(torch.bool))


def test_state_from_other_sets_is_refused(gen):
    """The backward operator refuses saved state from a forward pass on other label sets or
    another weight (ValueError) instead of returning a silently wrong gradient."""
    z = h.features(4, 2, 5, gen=gen)
    sets = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    options = (0.1, 0.1, "all", "outside", "all", 0, "zero_and_count", "mean")
    out = torch.ops.supcon.forward(z, None, None, sets, *options, "jaccard", False, "auto")
    one = torch.tensor(1.0)
    grad = torch.ops.supcon.backward(one, z, None, None, sets, *out[1:], *options, "jaccard",
                                     False, "auto")
    assert grad.shape == z.shape and bool(torch.isfinite(grad).all())
    other = sets.clone()
    other[3, 0] = 1
    with pytest.raises(ValueError):
        torch.ops.supcon.backward(one, z, None, None, other, *out[1:], *options, "jaccard",
                                  False, "auto")
    with pytest.raises(ValueError):
        torch.ops.supcon.backward(one, z, None, None, sets, *out[1:], *options, "fraction",
                                  False, "auto")
