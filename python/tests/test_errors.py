"""Errors come as the documented exception types: ValueError for bad inputs and options,
RuntimeError for device problems, supcon.OutOfMemoryError (a MemoryError) for memory. Each
check runs through the torch module, and through ``supcon.loss_and_grad`` where NumPy can
express the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import supcon
import supcon.torch as st
from supcon.torch import SupConLoss


def torch_call(features, labels=None, mask=None, **options):
    """Forward and backward through SupConLoss (an error may come from either pass)."""
    z = features.detach().clone()
    if not z.is_floating_point():
        return SupConLoss(**options)(z, labels, mask)
    z.requires_grad_(True)
    loss = SupConLoss(**options)(z, labels, mask)
    loss.sum().backward()
    return loss


def numpy_call(features, labels=None, mask=None, **options):
    def arr(x):
        return None if x is None else x.numpy() if isinstance(x, torch.Tensor) else x
    return supcon.loss_and_grad(arr(features), arr(labels), arr(mask), **options)


FRONT_ENDS = [torch_call, numpy_call]
FRONT_IDS = ["torch", "numpy"]
front_ends = pytest.mark.parametrize("call", FRONT_ENDS, ids=FRONT_IDS)


def z(batch=4, views=2, dim=3):
    return torch.randn(batch, views, dim)


def test_out_of_memory_error_is_a_memory_error():
    """supcon.OutOfMemoryError is a MemoryError (so `except MemoryError` catches it) and not a
    ValueError or RuntimeError."""
    assert issubclass(supcon.OutOfMemoryError, MemoryError)
    assert not issubclass(supcon.OutOfMemoryError, (ValueError, RuntimeError))
    with pytest.raises(MemoryError):
        raise supcon.OutOfMemoryError("test")


@front_ends
def test_labels_and_mask_together(call):
    """Both labels and mask → ValueError (as the original)."""
    with pytest.raises(ValueError, match="both"):
        call(z(), torch.tensor([0, 1, 0, 1]), torch.eye(4))


@front_ends
@pytest.mark.parametrize("labels", [[0, 1, 0], [0, 1, 0, 1, 1]], ids=["short", "long"])
def test_labels_wrong_length(call, labels):
    """Labels whose count differs from bsz → ValueError."""
    with pytest.raises(ValueError, match="labels"):
        call(z(), torch.tensor(labels))


@front_ends
def test_float_labels(call):
    """Floating-point labels → ValueError (labels are compared for equality only)."""
    with pytest.raises(ValueError, match="integers"):
        call(z(), torch.tensor([0.0, 1.0, 0.0, 1.0]))


@front_ends
@pytest.mark.parametrize("shape", [(4, 3), (12,)], ids=["2d", "1d"])
def test_features_need_three_dims(call, shape):
    """Features with fewer than 3 dimensions → ValueError."""
    with pytest.raises(ValueError, match="3 dimensions"):
        call(torch.randn(*shape))


@front_ends
def test_integer_features(call):
    """Integer features → ValueError naming the supported dtypes."""
    with pytest.raises(ValueError, match="float"):
        call(torch.ones(4, 2, 3, dtype=torch.int32))


@front_ends
@pytest.mark.parametrize("shape", [(4, 3), (3, 3), (16,)])
def test_mask_wrong_shape(call, shape):
    """A mask that is not [bsz, bsz] → ValueError."""
    with pytest.raises(ValueError, match="mask"):
        call(z(), None, torch.ones(*shape))


@front_ends
@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")], ids=["neg", "nan", "inf"])
def test_bad_mask_weight(call, weight):
    """A negative, NaN or infinite mask weight → ValueError naming its position."""
    mask = torch.ones(4, 4)
    mask[2, 1] = weight
    with pytest.raises(ValueError, match=r"mask\[2, 1\]"):
        call(z(), None, mask)


@front_ends
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["f32", "f64", "f16"])
def test_non_finite_features(call, value, dtype):
    """A NaN or ±∞ feature → ValueError whose message names its [b, v, d] position."""
    features = z(4, 2, 5).to(dtype)
    features[1, 0, 3] = value
    with pytest.raises(ValueError, match=r"features\[1, 0, 3\]"):
        call(features)


def test_non_finite_bf16_features():
    """The same for bfloat16 features (torch only)."""
    features = z(3, 2, 4).to(torch.bfloat16)
    features[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features\[2, 1, 0\]"):
        torch_call(features)


@front_ends
def test_single_row(call):
    """B·V = 1 → ValueError (a single row has no contrast); (2, 1, 1) is valid."""
    with pytest.raises(ValueError):
        call(z(1, 1, 4))
    with pytest.raises(ValueError):
        call(z(1, 1, 4), torch.tensor([0]))
    call(z(2, 1, 1))
    call(z(1, 2, 3))  # one sample, two views: valid


@front_ends
@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 0, 3)], ids=["B0", "V0"])
def test_empty_batch_or_views(call, shape):
    """B = 0 or V = 0 → ValueError (bad input), not a RuntimeError."""
    with pytest.raises(ValueError):
        call(torch.zeros(*shape))


@front_ends
def test_empty_dim(call):
    """D = 0 → ValueError."""
    with pytest.raises(ValueError):
        call(torch.zeros(3, 2, 0))


@front_ends
@pytest.mark.parametrize("kind", ["labels", "mask", "simclr_v1"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_positive_error(call, kind, reduction):
    """no_positive="error" with an anchor without positives → ValueError, whatever the
    reduction; a batch where every anchor has one passes."""
    labels = mask = None
    features = z(4, 2, 3)
    if kind == "labels":
        features, labels = z(4, 1, 3), torch.tensor([0, 0, 1, 2])
        good = (z(4, 1, 3), torch.tensor([0, 0, 1, 1]), None)
    elif kind == "mask":
        mask = torch.eye(4)
        mask[3, 3] = 0.0
        good = (features, None, torch.eye(4))
    else:
        features = z(4, 1, 3)
        good = (z(4, 2, 3), None, None)
    with pytest.raises(ValueError, match="no positive"):
        call(features, labels, mask, no_positive="error", reduction=reduction)
    call(*good, no_positive="error", reduction=reduction)


BAD_OPTIONS = [
    {"contrast_mode": "two"},
    {"summation": "middle"},
    {"denominator": "negatives"},
    {"no_positive": "ignore"},
    {"reduction": "max"},
    {"backend": "gpu"},
    {"temperature": 0.0},
    {"temperature": -0.1},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"base_temperature": 0.0},
    {"base_temperature": -1.0},
    {"positives_cap": 0},
    {"positives_cap": -2},
    {"positives_cap": 1.5},
    {"positives_cap": True},
]
OPTION_IDS = ["-".join(f"{k}={v}" for k, v in o.items()) for o in BAD_OPTIONS]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_options_fail_at_construction(options):
    """Bad option values (unknown strings, τ or τ_b ≤ 0 or not finite, a cap < 1 or not a
    whole number) → ValueError when SupConLoss is constructed, before any batch."""
    with pytest.raises(ValueError):
        SupConLoss(**options)


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_options_functional_and_numpy(options):
    """The same bad options → ValueError from supcon.torch.supcon_loss and from
    supcon.loss_and_grad."""
    with pytest.raises(ValueError):
        st.supcon_loss(z(), **options)
    with pytest.raises(ValueError):
        supcon.loss_and_grad(z().numpy(), **options)


def test_good_options_construct():
    """Every documented option value constructs (so the failures above are about the values)."""
    for options in ({"contrast_mode": "one"}, {"summation": "inside"},
                    {"denominator": "only_negatives"}, {"denominator": "one_positive"},
                    {"no_positive": "exclude"}, {"no_positive": "error"}, {"reduction": "sum"},
                    {"reduction": "none"}, {"positives_cap": 1}, {"temperature": 1e-3},
                    {"backend": "cpu"}, {"backend": "reference"}, {"backend": "cuda"}):
        SupConLoss(**options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_backend_on_cpu_tensors(dtype):
    """backend="cuda" on CPU tensors (or NumPy arrays) → ValueError."""
    with pytest.raises(ValueError, match="cuda"):
        torch_call(z().to(dtype), backend="cuda")
    with pytest.raises(ValueError, match="cuda"):
        numpy_call(z().to(dtype), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_only_backends_on_cuda_tensors():
    """A host backend ("cpu" or "reference") asked to run CUDA tensors fails with a typed error
    (ValueError or RuntimeError), not a crash."""
    features = z().cuda()
    for backend in ("cpu", "reference"):
        with pytest.raises((ValueError, RuntimeError)):
            torch_call(features, backend=backend)


@front_ends
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_upstream(call, value):
    """A NaN or ∞ upstream gradient (scalar, or one of the per-anchor values) → ValueError."""
    if call is numpy_call:
        with pytest.raises(ValueError, match="upstream"):
            supcon.loss_and_grad(z().numpy(), upstream=value)
        u = np.ones(8)
        u[3] = value
        with pytest.raises(ValueError, match="upstream"):
            supcon.loss_and_grad(z().numpy(), reduction="none", upstream=u)
        return
    features = z().requires_grad_(True)
    with pytest.raises(ValueError, match="upstream"):
        (st.supcon_loss(features) * value).backward()
    u = torch.ones(8)
    u[3] = value
    with pytest.raises(ValueError, match="upstream"):
        (st.supcon_loss(features, reduction="none") * u).sum().backward()


def test_numpy_upstream_wrong_length():
    """reduction="none" with an upstream of the wrong length → ValueError."""
    with pytest.raises(ValueError, match="upstream"):
        supcon.loss_and_grad(z().numpy(), reduction="none", upstream=np.ones(5))


@front_ends
def test_logits_beyond_range(call):
    """Dot products beyond a backend's range (1e36 for the f32 CPU backend, 1e300 for the
    reference) → ValueError, not ∞ or NaN."""
    with pytest.raises(ValueError, match="logits"):
        call(torch.full((2, 2, 4), 1e19))
    with pytest.raises(ValueError, match="logits"):
        call(torch.full((2, 2, 4), 1e151, dtype=torch.float64))


@front_ends
def test_overflow_f64(call):
    """A loss beyond float64 (τ/τ_b ≈ 7e308) → ValueError (overflow), never ∞."""
    with pytest.raises(ValueError, match="overflow"):
        call(z().double(), torch.tensor([0, 0, 1, 1]), base_temperature=1e-310)


@pytest.mark.parametrize("case", ["f32_tiny_base_temperature", "f16_large_loss"])
def test_torch_forward_never_returns_inf(case):
    """A finite f64 loss beyond the features' dtype: the forward raises ValueError
    (docs/math.md: "Such a result is Error::Overflow, never ∞ or NaN") instead of returning
    ∞. f32 with τ_b = 1e-300 (loss ≈ 1e300), or float16 features of norm 200 at τ = 0.01
    (loss ≈ 1e6 > 65504)."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    if case == "f32_tiny_base_temperature":
        features, options = torch.nn.functional.normalize(torch.randn(8, 2, 4), dim=-1), {
            "base_temperature": 1e-300}
    else:
        features = (torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1) * 200).half()
        options = {"temperature": 0.01}
        reference = st.supcon_loss(features.float(), labels, **options)
        assert 65504 < float(reference) < 1e30  # finite in f32, beyond float16
    try:
        loss = st.supcon_loss(features, labels, **options)
    except ValueError:
        return
    assert bool(torch.isfinite(loss)), f"returned {loss}"
