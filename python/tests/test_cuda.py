"""CUDA tensors (the crate's kernels): the same properties as on the CPU, against the float64
reference computed on the CPU. Every test skips without a CUDA device. (That the CUDA path
needs no host synchronisation is not tested here.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import helpers as h
from reference import label_set_mask
from supcon.torch import SupConLoss, supcon_loss

# The GPU check sets SUPCON_REQUIRE_CUDA=1: then these tests run (and fail) without a device.
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("SUPCON_REQUIRE_CUDA") != "1",
    reason="needs a CUDA device",
)


def test_cuda_build_runs_the_kernels():
    """The package was built with the kernels, and SupConLoss picks them for CUDA features."""
    from supcon import _supcon

    assert hasattr(_supcon, "forward_cuda")
    assert SupConLoss().backend_for(torch.empty(0, device="cuda")) == "cuda"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]

# Options on device tensors (label sets and caps: PREPARED and the label-set tests below).
CASES = [
    ("labels", "labels", {}),
    ("simclr", "simclr", {}),
    ("soft_mask", "soft_mask", {}),
    ("one_labels", "labels", {"contrast_mode": "one"}),
    ("tau_ne_base", "labels", {"temperature": 0.1, "base_temperature": 0.07}),
    ("inside_mask", "soft_mask", {"summation": "inside"}),
    ("only_neg", "labels", {"denominator": "only_negatives"}),
    ("one_positive", "labels", {"denominator": "one_positive"}),
    ("one_positive_inside_mask", "soft_mask", {"denominator": "one_positive", "summation": "inside"}),
    ("exclude_v1", "labels_v1", {"no_positive": "exclude"}),
    ("sum", "labels", {"reduction": "sum"}),
    ("none", "labels", {"reduction": "none"}),
]

SHAPES = [(7, 2, 17), (13, 1, 3), (33, 2, 64), (70, 3, 130), (2, 1, 1)]


def positives(kind, batch, gen, device):
    if kind in ("labels", "labels_v1"):
        return h.labels(batch, gen=gen).to(device), None
    if kind == "soft_mask":
        return None, h.soft_mask(batch, gen=gen).to(device)
    return None, None


def upstream_for(options, batch, views, dtype, gen):
    if options.get("reduction") == "none":
        anchors = batch * views if options.get("contrast_mode", "all") == "all" else batch
        return torch.randn(anchors, generator=gen, dtype=torch.float64).to(dtype).cuda()
    return None


@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_reference(gen, case, dtype, backend):
    """CUDA features (f32, f16, bf16), backend auto or cuda: loss and gradient, in the input
    dtype and on the input's device, match the float64 CPU reference on the same (rounded)
    values: 1e-5 for f32, 1e-3 plus half an ulp for half types, whose gradient comes from
    tensor cores (plus their operands' rounding)."""
    _, kind, options = case
    batch, views, dim = (12, 1, 20) if kind == "labels_v1" else (11, 2, 24)
    z = h.features(batch, views, dim, dtype, gen=gen, device="cuda")
    labels, mask = positives(kind, batch, gen, "cuda")
    u = upstream_for(options, batch, views, dtype, gen)
    loss, grad = h.package(z, labels, mask, upstream=u, backend=backend, **options)
    assert loss.device == z.device and grad.device == z.device
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = h.reference(z, None if labels is None else labels.cpu(),
                                     None if mask is None else mask.cpu(), upstream=u, **options)
    tol = h.tolerance(dtype)
    h.assert_close(loss, ref_loss, tol, "loss", floor=h.LOSS_FLOOR)
    grad_tol = tol + h.tensor_core_tolerance(dtype)
    h.assert_close(grad, ref_grad, grad_tol, "gradient", floor=h.gradient_floor(z, u, **options))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_ragged_shapes(gen, shape):
    """Ragged shapes (N, D off the tile sizes, D up to 130 > 128, V = 1, the smallest batch) on
    CUDA in f32 match the reference to 1e-5."""
    batch, views, dim = shape
    z = h.features(batch, views, dim, torch.float32, gen=gen, device="cuda")
    labels = h.labels(batch, gen=gen).cuda()
    loss, grad = h.package(z, labels)
    ref_loss, ref_grad = h.reference(z, labels.cpu())
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, h.F32_TOL, "gradient", floor=h.gradient_floor(z))


def test_cuda_labels_and_mask_on_cpu(gen):
    """Labels or a mask given as CPU tensors with CUDA features are accepted and give the same
    result as CUDA ones."""
    z = h.features(9, 2, 16, torch.float32, gen=gen, device="cuda")
    labels = h.labels(9, gen=gen)
    mask = h.soft_mask(9, gen=gen)
    assert torch.equal(supcon_loss(z, labels), supcon_loss(z, labels.cuda()))
    assert torch.equal(supcon_loss(z, mask=mask), supcon_loss(z, mask=mask.cuda()))


def test_cuda_finite_where_original_breaks(gen):
    """Norm-50 features at τ = 0.01 on CUDA: finite, and matching the reference's loss."""
    z = h.features(8, 2, 16, torch.float32, norm=50.0, gen=gen, device="cuda")
    labels = h.labels(8, classes=3, gen=gen).cuda()
    loss, grad = h.package(z, labels, temperature=0.01)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    ref_loss, ref_grad = h.reference(z, labels.cpu(), temperature=0.01)
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss")
    h.assert_close(grad, ref_grad, h.logit_tolerance(z, 0.01), "gradient")


def test_cuda_torch_compile(gen):
    """torch.compile(fullgraph=True) of Linear + normalize + SupConLoss on CUDA matches eager."""
    torch._dynamo.reset()
    head = torch.nn.Linear(8, 6).cuda()
    loss_fn = SupConLoss(temperature=0.1)

    def step(x, y):
        return loss_fn(F.normalize(head(x), dim=-1), y)

    x = torch.randn(6, 2, 8, generator=gen).cuda()
    y = torch.randint(0, 3, (6,), generator=gen).cuda()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        head.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone()))
    (eager_loss, eager_grad), (loss, grad) = results
    h.assert_close(loss, eager_loss, 1e-6, "loss", floor=1.0)
    h.assert_close(grad, eager_grad, 1e-5, "gradient")


def test_cuda_double_backward_raises(gen):
    """Double backward raises RuntimeError on CUDA too."""
    z = h.features(4, 2, 3, torch.float32, gen=gen, device="cuda").requires_grad_(True)
    loss = supcon_loss(z, torch.tensor([0, 1, 0, 1], device="cuda"))
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.norm().backward()


def test_cuda_nan_features_error_or_propagate(gen):
    """A NaN feature on CUDA never gives a finite, silently wrong loss: either ValueError (the
    host check) or a NaN loss (the device API propagates NaN, docs/math.md)."""
    z = h.features(4, 2, 3, torch.float32, gen=gen, device="cuda")
    z[1, 0, 2] = float("nan")
    try:
        loss = supcon_loss(z, torch.tensor([0, 1, 0, 1], device="cuda"))
    except ValueError:
        return
    assert not bool(torch.isfinite(loss))


PREPARED = [
    ("cap", {"positives_cap": 1}),
    ("cap_one_positive", {"positives_cap": 3, "denominator": "one_positive"}),
    ("cap_inside", {"positives_cap": 2, "summation": "inside"}),
]


@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("options", [o for _, o in PREPARED], ids=[i for i, _ in PREPARED])
def test_cuda_positives_cap_runs_on_the_kernels(gen, options, backend):
    """A positives cap runs on the kernels (its bounds found on the device): backend_for says
    so, and loss and gradient match the reference."""
    z = h.features(70, 2, 12, torch.float32, gen=gen, device="cuda")
    labels = h.labels(70, gen=gen).cuda()
    assert SupConLoss(backend=backend, **options).backend_for(z) == "cuda"
    loss, grad = h.package(z, labels, backend=backend, **options)
    ref_loss, ref_grad = h.reference(z, labels.cpu(), **options)
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, h.F32_TOL, "gradient", floor=h.gradient_floor(z, **options))


@pytest.mark.parametrize("weight", ["any", "jaccard", "fraction"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64], ids=["bool", "int64"])
@pytest.mark.parametrize("classes", [1, 65, 200])
def test_cuda_label_sets_run_on_the_kernels(gen, weight, dtype, classes):
    """Label sets run on the kernels (packed on the device), with and without a cap: loss and
    gradient match the reference on the equivalent mask."""
    z = h.features(37, 2, 20, torch.float32, gen=gen, device="cuda")
    sets = torch.rand(37, classes, generator=gen) < 2.0 / classes
    sets[5] = False  # an empty set: only the own views are positives
    assert SupConLoss().backend_for(z, sets.cuda()) == "cuda"
    mask = label_set_mask(sets.to(torch.int64), weight)
    for options in ({}, {"positives_cap": 3}):
        loss, grad = h.package(z, sets.to(dtype).cuda(), label_set_weight=weight, **options)
        ref_loss, ref_grad = h.reference(z, None, mask, **options)
        h.assert_close(loss, ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
        h.assert_close(grad, ref_grad, h.F32_TOL, "gradient",
                       floor=h.gradient_floor(z, **options))


def test_cuda_tensors_on_a_host_backend(gen):
    """An explicit host backend runs on a host copy: backend_for says so, and loss and gradient
    come back on the device and match the reference."""
    z = h.features(10, 2, 12, torch.float32, gen=gen, device="cuda")
    labels = h.labels(10, gen=gen)
    assert SupConLoss(normalize=True, backend="cpu").backend_for(z) == "cpu"
    loss, grad = h.package(3.0 * z, labels.cuda(), normalize=True, backend="cpu")
    assert loss.device == z.device and grad.device == z.device
    ref_loss, ref_grad = h.reference(3.0 * z, labels, normalize=True)
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, h.F32_TOL, "gradient", floor=h.gradient_floor(z) / 3.0)


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_cuda_normalize_on_the_kernels(gen, backend):
    """normalize=True runs the kernels (their row scales, supcon_normalize.cu): loss and
    gradient equal F.normalize + the reference, with rows of norm 0.3 to 30, 0 and 1e-20."""
    z = h.features(40, 2, 33, torch.float32, gen=gen) * torch.logspace(-0.5, 1.5, 40).view(40, 1, 1)
    z[3, 0] = 0.0
    z[7, 1] *= 1e-20 / z[7, 1].norm()
    labels = h.labels(40, gen=gen)
    assert SupConLoss(normalize=True, backend=backend).backend_for(z.cuda()) == "cuda"
    for options in ({}, {"positives_cap": 3, "summation": "inside"}):
        loss, grad = h.package(z.cuda(), labels.cuda(), normalize=True, backend=backend, **options)
        ref_loss, ref_grad = h.reference(z.to(torch.float64), labels, normalize=True, **options)
        h.assert_close(loss, ref_loss, h.F32_TOL, "loss", floor=h.LOSS_FLOOR)
        # Row by row: the rows of norm 0 and 1e-20 have gradients ~1e12 times the others'.
        size = ref_grad.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        error = ((grad.cpu().to(torch.float64) - ref_grad).abs() / size).max().item()
        assert error <= 1e-4, f"{options}: row-relative gradient error {error:e}"


def test_cuda_float64_gradcheck(gen):
    """float64 CUDA features (backend auto) run the f64 reference on the host, so gradcheck
    applies to CUDA tensors too."""
    z = h.features(5, 2, 3, torch.float64, gen=gen, device="cuda").requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 2], device="cuda")
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, temperature=0.5), (z,))


@pytest.mark.parametrize("kind", ["labels", "label_sets_capped"])
def test_cuda_step_does_not_synchronise(gen, kind):
    """A forward + backward step on CUDA tensors (labels, or bool label sets under a cap, on
    the device) makes no synchronising PyTorch call: torch's sync debug mode turns one into an
    error. (The crate's own calls are stream-ordered by design; the emulated tests count its
    downloads: zero.)"""
    z = h.features(64, 2, 32, torch.float32, gen=gen, device="cuda")
    if kind == "labels":
        labels, options = h.labels(64, gen=gen).cuda(), {}
    else:
        labels = (torch.rand(64, 70, generator=gen) < 0.05).cuda()
        options = {"positives_cap": 4}
    warm = z.clone().requires_grad_(True)
    supcon_loss(warm, labels, **options).backward()  # first call: contexts, modules
    x = z.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = supcon_loss(x, labels, **options)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(loss)) and x.grad is not None
