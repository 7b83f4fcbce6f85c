"""``supcon.torch.SupConLoss`` on CPU tensors against the float64 reference: loss and
``features.grad`` for every option, ragged shapes, every dtype, and the calling convention of
the original (trailing dimensions, labels and mask forms, positional arguments)."""

from __future__ import annotations

import pytest
import torch

import helpers as h
from supcon.torch import SupConLoss, supcon_loss

# (id, positives, options). Labels draw about B/2 classes, so that some anchors lack
# positives when V = 1 and the cap drops positives.
CASES = [
    ("labels", "labels", {}),
    ("simclr", "simclr", {}),
    ("soft_mask", "soft_mask", {}),
    ("binary_mask", "binary_mask", {}),
    ("one_labels", "labels", {"contrast_mode": "one"}),
    ("one_simclr", "simclr", {"contrast_mode": "one"}),
    ("one_soft_mask", "soft_mask", {"contrast_mode": "one"}),
    ("tau_ne_base", "labels", {"temperature": 0.1, "base_temperature": 0.07}),
    ("tau_base_1_mask", "soft_mask", {"temperature": 0.2, "base_temperature": 1.0}),
    ("inside_labels", "labels", {"summation": "inside"}),
    ("inside_mask", "soft_mask", {"summation": "inside"}),
    ("inside_one_simclr", "simclr", {"summation": "inside", "contrast_mode": "one"}),
    ("only_neg_labels", "labels", {"denominator": "only_negatives"}),
    ("only_neg_inside_mask", "soft_mask", {"denominator": "only_negatives",
                                            "summation": "inside"}),
    ("one_positive", "labels", {"denominator": "one_positive"}),
    ("one_positive_inside_mask", "soft_mask", {"denominator": "one_positive",
                                                "summation": "inside"}),
    ("cap1", "labels", {"positives_cap": 1}),
    ("cap2_inside", "labels", {"positives_cap": 2, "summation": "inside"}),
    ("cap1_only_neg_mask", "binary_mask", {"positives_cap": 1,
                                           "denominator": "only_negatives"}),
    ("exclude", "labels", {"no_positive": "exclude"}),
    ("exclude_one_mask", "soft_mask", {"no_positive": "exclude", "contrast_mode": "one"}),
    ("sum", "labels", {"reduction": "sum"}),
    ("none", "labels", {"reduction": "none"}),
    ("none_inside_mask", "soft_mask", {"reduction": "none", "summation": "inside"}),
    ("none_one_simclr", "simclr", {"reduction": "none", "contrast_mode": "one"}),
]
CASE_IDS = [c[0] for c in CASES]

# Ragged shapes (B, V, D): N and D off every tile size, V = 1, D = 1, N > 256 (several CPU
# blocks), and the smallest valid batch (2, 1, 1).
SHAPES = [(7, 2, 17), (13, 1, 3), (5, 3, 130), (33, 2, 64), (2, 1, 1), (100, 3, 20)]


def positives(kind, batch, gen):
    """Labels or a mask with at least one anchor without positives: the last sample's label is
    unique (so with V = 1 it has none), and the last mask row is all zero."""
    if kind == "labels":
        labels = h.labels(batch, gen=gen)
        labels[-1] = batch
        return labels, None
    if kind in ("soft_mask", "binary_mask"):
        mask = h.soft_mask(batch, gen=gen) if kind == "soft_mask" else h.binary_mask(batch, gen=gen)
        mask[-1] = 0.0
        return None, mask
    return None, None


def upstream_for(options, batch, views, dtype, gen):
    """A random upstream gradient: [R] values for reduction none, else a scalar."""
    if options.get("reduction") == "none":
        anchors = batch * views if options.get("contrast_mode", "all") == "all" else batch
        return torch.randn(anchors, generator=gen, dtype=torch.float64).to(dtype)
    return (0.5 + torch.rand((), generator=gen, dtype=torch.float64)).to(dtype)


def check_against_reference(z, labels, mask, options, gen, tol, backend=None):
    batch, views = z.shape[0], z.shape[1]
    u = upstream_for(options, batch, views, z.dtype, gen)
    opts = dict(options) if backend is None else {**options, "backend": backend}
    loss, grad = h.package(z, labels, mask, upstream=u, **opts)
    ref_loss, ref_grad = h.reference(z, labels, mask, upstream=u, **options)
    assert loss.dtype == z.dtype and grad.dtype == z.dtype
    assert loss.shape == ref_loss.shape and grad.shape == z.shape
    h.assert_close(loss, ref_loss, tol, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(grad, ref_grad, tol, "gradient", floor=h.gradient_floor(z, u, **options))
    return loss, grad, ref_loss, ref_grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_f32_matches_reference(gen, case, shape):
    """float32 features (fused CPU backend): loss and features.grad (with a random upstream,
    per anchor for reduction none) within 1e-5 norm-wise relative error of the float64
    reference on the same values, for every option and ragged shapes."""
    _, kind, options = case
    batch, views, dim = shape
    z = h.features(batch, views, dim, torch.float32, gen=gen)
    labels, mask = positives(kind, batch, gen)
    check_against_reference(z, labels, mask, options, gen, h.F32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dtypes_match_reference(gen, case, dtype):
    """float16 and bfloat16 features (computed in f32, returned in the input dtype) match the
    reference on the rounded values within 1e-3 plus half an ulp of the dtype; float64 features
    (the f64 reference backend) within 1e-10. Loss and gradient come back in the input dtype.
    (V = 1 for the exclude cases, so that anchors without positives change the mean.)"""
    name, kind, options = case
    batch, views, dim = (9, 1, 24) if "exclude" in name else (9, 2, 24)
    z = h.features(batch, views, dim, dtype, gen=gen)
    labels, mask = positives(kind, batch, gen)
    check_against_reference(z, labels, mask, options, gen, h.tolerance(dtype))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[9], CASES[16], CASES[22]],
                         ids=lambda c: c[0])
def test_explicit_backends(gen, case):
    """backend="reference" on float32 features is the f64 reference (only the f32 rounding
    of the results differs); backend="cpu" on float64 features rounds them to f32 and stays
    within the f32 tolerance."""
    _, kind, options = case
    labels, mask = positives(kind, 11, gen)
    z = h.features(11, 2, 9, torch.float32, gen=gen)
    check_against_reference(z, labels, mask, options, gen, 2 * h.eps(torch.float32),
                            backend="reference")
    z = h.features(11, 2, 9, torch.float64, gen=gen)
    check_against_reference(z, labels, mask, options, gen, h.F32_TOL, backend="cpu")


@pytest.mark.parametrize("norm,temperature", [(3.0, 0.07), (None, 0.5), (10.0, 0.05)])
@pytest.mark.parametrize("kind", ["labels", "soft_mask"])
def test_unnormalised_features(gen, norm, temperature, kind):
    """Features that are not unit vectors (norm 3 and 10, or raw Gaussians) still match the
    reference in f32, to 1e-5 plus the f32 rounding of logits of that size (eps32·max|s|)."""
    z = h.features(12, 2, 16, torch.float32, norm=norm, gen=gen)
    labels, mask = positives(kind, 12, gen)
    tol = h.logit_tolerance(z, temperature)
    assert tol < 3e-4
    check_against_reference(z, labels, mask, {"temperature": temperature}, gen, tol)


@pytest.mark.parametrize("options", [{}, {"contrast_mode": "one"}, {"reduction": "none"}],
                         ids=["all", "one", "none"])
def test_reduction_none_random_upstream(gen, options):
    """reduction="none": the per-anchor losses match the reference and
    (loss * u).sum().backward() with a random u gives the reference's gradient of Σ u_i ℓ_i."""
    options = {**options, "reduction": "none"}
    z = h.features(10, 3, 8, torch.float32, gen=gen)
    labels = h.labels(10, gen=gen)
    anchors = 30 if options.get("contrast_mode", "all") == "all" else 10
    u = torch.randn(anchors, generator=gen)
    leaf = z.clone().requires_grad_(True)
    loss = SupConLoss(**options)(leaf, labels)
    assert loss.shape == (anchors,)
    (loss * u).sum().backward()
    ref_loss, ref_grad = h.reference(z, labels, upstream=u, **options)
    h.assert_close(loss, ref_loss, h.F32_TOL, "per-anchor losses")
    h.assert_close(leaf.grad, ref_grad, h.F32_TOL, "gradient")
    # A different upstream gives a different gradient (the upstream is really used).
    other = torch.randn(anchors, generator=gen)
    _, other_grad = h.package(z, labels, upstream=other, **options)
    assert not torch.allclose(other_grad, leaf.grad)


@pytest.mark.parametrize("kind", ["labels", "simclr", "soft_mask"])
def test_reductions_are_consistent(gen, kind):
    """mean = Σℓ_i/R (zero_and_count), sum = Σℓ_i, exclude = Σℓ_i / #(anchors with P_i > 0),
    all from the same per-anchor losses; anchors without positives have ℓ_i = 0 exactly."""
    z = h.features(8, 1 if kind == "labels" else 2, 6, torch.float64, gen=gen)
    labels, mask = positives(kind, 8, gen)
    if kind == "labels":
        labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # anchors 2, 6, 7 have no positive
    per_anchor = supcon_loss(z, labels, mask, reduction="none")
    r = per_anchor.numel()
    mean = supcon_loss(z, labels, mask)
    total = supcon_loss(z, labels, mask, reduction="sum")
    exclude = supcon_loss(z, labels, mask, no_positive="exclude")
    ref_per_anchor = h.reference(z, labels, mask, reduction="none")[0]
    has_positive = h.reference(z, labels, mask, reduction="none", denominator="all",
                               summation="outside")[0] != 0
    torch.testing.assert_close(mean, per_anchor.sum() / r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total, per_anchor.sum(), rtol=1e-12, atol=1e-14)
    count = max(int(has_positive.sum()), 1)
    torch.testing.assert_close(exclude, per_anchor.sum() / count, rtol=1e-12, atol=1e-14)
    assert bool((per_anchor[ref_per_anchor == 0] == 0).all())
    if kind == "labels":
        assert per_anchor[[2, 6, 7]].tolist() == [0.0, 0.0, 0.0]
        assert count == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trailing_dims_are_flattened(gen, dtype):
    """[bsz, n_views, 4, 4] features give exactly the loss of their [bsz, n_views, 16]
    reshape, and a gradient of the input's shape equal to the reshaped one's."""
    z = h.features(6, 2, 16, dtype, gen=gen)
    labels = h.labels(6, gen=gen)
    flat_loss, flat_grad = h.package(z, labels)
    loss, grad = h.package(z.reshape(6, 2, 4, 4), labels)
    assert grad.shape == (6, 2, 4, 4)
    assert torch.equal(loss, flat_loss)
    assert torch.equal(grad.reshape(6, 2, 16), flat_grad)
    loss5, grad5 = h.package(z.reshape(6, 2, 2, 2, 4), labels)
    assert torch.equal(loss5, flat_loss) and grad5.shape == (6, 2, 2, 2, 4)


def test_non_contiguous_features(gen):
    """A non-contiguous (transposed) features tensor gives the same loss and gradient as its
    contiguous copy."""
    base = h.features(3, 5, 8, torch.float32, gen=gen)  # [V, B, D]
    z = base.transpose(0, 1)
    assert not z.is_contiguous()
    labels = h.labels(5, gen=gen)
    loss, grad = h.package(z, labels)
    ref_loss, ref_grad = h.package(z.contiguous(), labels)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    strided = h.features(5, 3, 16, torch.float32, gen=gen)[:, :, ::2]
    loss, grad = h.package(strided, labels)
    ref_loss, ref_grad = h.package(strided.contiguous(), labels)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_features_are_copied_at_most_once(gen):
    """Contiguous features are saved for the backward pass as they are (the same storage, no
    copy); non-contiguous ones are copied once, and that copy is what the backward reads."""
    labels = h.labels(5, gen=gen)
    for z, copies in ((h.features(5, 3, 8, torch.float32, gen=gen), 0),
                      (h.features(3, 5, 8, torch.float32, gen=gen).transpose(0, 1), 1)):
        x = z.clone().requires_grad_(True) if copies == 0 else z.requires_grad_(True)
        saved = []

        def pack(tensor):
            if tensor.is_floating_point() and tensor.dim() == 3:
                saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = supcon_loss(x, labels)
        assert len(saved) == 1 and saved[0].is_contiguous()
        shares_storage = saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert shares_storage == (copies == 0)
        loss.backward()
        assert x.grad.shape == x.shape


def test_label_forms(gen):
    """Labels in any integer dtype, shaped [bsz] or [bsz, 1], negative or huge, give the same
    loss: they are only compared for equality."""
    z = h.features(8, 2, 5, torch.float32, gen=gen)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 2, 1])
    expected = supcon_loss(z, labels)
    for other in (labels.to(torch.int32), labels.to(torch.int16), labels.to(torch.uint8),
                  labels.reshape(-1, 1), labels * -7 - 3, labels * (2**62) + 5):
        assert torch.equal(supcon_loss(z, other), expected), other
    assert not torch.equal(supcon_loss(z, torch.tensor([0, 1, 1, 2, 0, 3, 2, 2])), expected)


def test_simclr_forms_agree(gen):
    """SimCLR (neither labels nor mask) = labels arange(B) = mask eye(B), in loss and gradient;
    a bool or integer mask is taken as its 0/1 float weights."""
    z = h.features(9, 3, 7, torch.float32, gen=gen)
    loss, grad = h.package(z)
    for labels, mask in ((torch.arange(9), None), (None, torch.eye(9)),
                         (None, torch.eye(9, dtype=torch.bool)),
                         (None, torch.eye(9, dtype=torch.int64))):
        other_loss, other_grad = h.package(z, labels, mask)
        h.assert_close(other_loss, loss, 1e-6, "loss")
        h.assert_close(other_grad, grad, 1e-6, "gradient")


def test_mask_scale_invariance(gen):
    """Scaling every mask weight by one factor (1e30 or 1e-30, far outside the unit range)
    changes neither the loss nor the gradient, under L_out and L_in."""
    z = h.features(10, 2, 6, torch.float32, gen=gen)
    mask = h.soft_mask(10, gen=gen)
    for summation in ("outside", "inside"):
        loss, grad = h.package(z, mask=mask, summation=summation)
        ref_loss, ref_grad = h.reference(z, mask=mask, summation=summation)
        h.assert_close(loss, ref_loss, h.F32_TOL, "loss")
        for factor in (1e30, 1e-30):
            scaled_loss, scaled_grad = h.package(z, mask=mask * factor, summation=summation)
            h.assert_close(scaled_loss, ref_loss, h.F32_TOL, f"loss, mask × {factor}")
            h.assert_close(scaled_grad, ref_grad, h.F32_TOL, f"gradient, mask × {factor}")


def test_v1_anchors_without_positives(gen):
    """V = 1 with labels seen once: those anchors have ℓ_i = 0 and (with no other anchor
    pointing at them as positive) still get only contrast-side gradient; the mean counts them
    (zero_and_count); SimCLR with V = 1 has no positive at all: loss 0, gradient exactly 0."""
    z = h.features(6, 1, 5, torch.float32, gen=gen)
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    per_anchor = supcon_loss(z, labels, reduction="none")
    assert per_anchor[2] == 0 and per_anchor[3] == 0 and bool((per_anchor[[0, 1, 4, 5]] > 0).all())
    loss, grad = h.package(z, labels)
    ref_loss, ref_grad = h.reference(z, labels)
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss")
    h.assert_close(grad, ref_grad, h.F32_TOL, "gradient")
    torch.testing.assert_close(loss, per_anchor.sum() / 6)
    loss, grad = h.package(z)
    assert float(loss) == 0.0 and bool((grad == 0).all())


def test_one_class_only_negatives(gen):
    """A one-class batch under denominator="only_negatives": every denominator is empty, so
    the loss and gradient are exactly 0; under "all" the loss is finite and matches."""
    z = h.features(5, 2, 4, torch.float32, gen=gen)
    labels = torch.zeros(5, dtype=torch.int64)
    loss, grad = h.package(z, labels, denominator="only_negatives")
    assert float(loss) == 0.0 and bool((grad == 0).all())
    loss, grad = h.package(z, labels)
    ref_loss, ref_grad = h.reference(z, labels)
    h.assert_close(loss, ref_loss, h.F32_TOL, "loss")
    h.assert_close(grad, ref_grad, h.F32_TOL, "gradient")


def test_module_matches_original_signature(gen):
    """SupConLoss takes (temperature, contrast_mode, base_temperature) positionally as the
    original does, is an nn.Module with no parameters, and equals the functional form."""
    z = h.features(6, 2, 5, torch.float32, gen=gen)
    labels = h.labels(6, gen=gen)
    module = SupConLoss(0.2, "one", 0.3)
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    assert (module.temperature, module.contrast_mode, module.base_temperature) == (0.2, "one", 0.3)
    expected = supcon_loss(z, labels, temperature=0.2, contrast_mode="one", base_temperature=0.3)
    assert torch.equal(module(z, labels), expected)
    assert torch.equal(module(z, labels=labels), expected)
    assert not torch.equal(SupConLoss()(z, labels), expected)
    assert "contrast_mode='one'" in repr(module)


def test_mask_gets_no_gradient(gen):
    """The mask is a constant: a mask that requires grad is accepted and gets no gradient;
    the features' gradient is the same as with a plain mask."""
    z = h.features(6, 2, 5, torch.float32, gen=gen)
    mask = h.soft_mask(6, gen=gen)
    leaf = z.clone().requires_grad_(True)
    weights = mask.clone().requires_grad_(True)
    supcon_loss(leaf, mask=weights).backward()
    assert weights.grad is None
    _, grad = h.package(z, mask=mask)
    assert torch.equal(leaf.grad, grad)


def test_fresh_forward_per_call(gen):
    """Two different batches through one module give their own losses and gradients (no state
    leaks from one call to the next)."""
    module = SupConLoss()
    z1, z2 = (h.features(7, 2, 6, torch.float32, gen=gen) for _ in range(2))
    labels = h.labels(7, gen=gen)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    l1, l2 = module(a1, labels), module(a2, labels)
    l2.backward()
    l1.backward()
    for leaf, z in ((a1, z1), (a2, z2)):
        ref_loss, ref_grad = h.reference(z, labels)
        h.assert_close(leaf.grad, ref_grad, h.F32_TOL, "gradient")
    h.assert_close(l1, h.reference(z1, labels)[0], h.F32_TOL, "loss")
    h.assert_close(l2, h.reference(z2, labels)[0], h.F32_TOL, "loss")


def test_state_from_other_features_is_refused(gen):
    """The backward operator refuses saved state from a forward pass on other features or
    other labels (ValueError) instead of returning a silently wrong gradient."""
    z = h.features(4, 2, 5, torch.float32, gen=gen)
    labels = torch.tensor([0, 1, 0, 1])
    options = (0.1, 0.1, "all", "outside", "all", 0, "zero_and_count", "mean", "any", False,
               "auto")
    out = torch.ops.supcon.forward(z, labels, None, None, *options)
    one = torch.tensor(1.0)
    grad = torch.ops.supcon.backward(one, z, labels, None, None, *out[1:], *options)
    assert grad.shape == z.shape and bool(torch.isfinite(grad).all())
    with pytest.raises(ValueError):
        torch.ops.supcon.backward(one, z + 0.01, labels, None, None, *out[1:], *options)
    with pytest.raises(ValueError):
        torch.ops.supcon.backward(one, z, torch.tensor([1, 1, 0, 1]), None, None, *out[1:],
                                  *options)


def test_custom_op_opcheck(gen):
    """torch.library.opcheck passes for supcon::forward (schema, fake tensor, autograd
    registration and AOT dispatch)."""
    z = h.features(4, 2, 5, torch.float32, gen=gen).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])
    args = (z, labels, None, None, 0.1, 0.1, "all", "outside", "all", 0, "zero_and_count", "mean",
            "any", False, "auto")
    torch.library.opcheck(torch.ops.supcon.forward.default, args)


@pytest.mark.parametrize("batch, views, mode", [
    (1, 2, "all"), (32, 2, "all"), (33, 2, "all"), (4096, 2, "all"), (8193, 2, "one"),
    (16384, 2, "all"), (40000, 1, "all"),
])
@pytest.mark.parametrize("set_classes, cap, normalize", [
    (None, 0, False), (None, 3, False), (0, 0, False), (1, 0, False), (64, 0, False),
    (65, 2, False), (200, 0, False), (None, 0, True), (65, 2, True),
])
def test_cuda_workspace_size_agrees_with_the_crate(batch, views, mode, set_classes, cap,
                                                   normalize):
    """The CUDA workspace's size that the package computes by plain arithmetic (for the
    symbolic shapes of torch.compile) is the crate's, including the room for the forward's
    column shares (none from R = 32768 anchors on) and for what the forward prepares (packed
    label sets of K labels, cap bounds, normalize's row scales). Needs no GPU: only the layout
    is asked."""
    from supcon import _supcon
    from supcon import torch as supcon_torch

    if not hasattr(_supcon, "cuda_workspace"):
        pytest.skip("built without feature cuda")
    options = supcon_torch._options(0.07, 0.07, mode, "outside", "all", cap,
                                    "zero_and_count", "mean", "any", normalize)
    anchors = batch * views if mode == "all" else batch
    size = _supcon.cuda_workspace(options.as_tuple(), (batch, views, 8), set_classes)[0]
    scaled_rows = batch * views if normalize else None
    assert size == supcon_torch._state_bytes(anchors, True, batch, set_classes, cap != 0,
                                             scaled_rows)
