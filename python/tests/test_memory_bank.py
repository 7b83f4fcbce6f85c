"""``supcon.torch.MemoryBank``: the FIFO ring buffer of past embeddings, and the loss against
it (``memory_bank=``). The loss's oracle is built independently, with the existing
single-process API: the batch followed by the bank's samples as one batch, with a mask whose
rows for the bank's samples are all zero (no positives, so under ``no_positive="exclude"`` they
are no anchors: contrasts only). Loss and batch gradient must match it over several steps, as
the bank fills and wraps around."""

from __future__ import annotations

import pytest
import torch

import helpers as h
from reference import label_set_mask
from supcon.torch import MemoryBank, SupConLoss, supcon_loss


def draw_positives(kind, batch, gen, classes=3):
    """Labels of few classes (so that the bank holds positives), label sets ``[B, 4]`` (some
    empty), or None (SimCLR)."""
    if kind == "labels":
        return torch.randint(0, classes, (batch,), generator=gen)
    if kind == "label_sets":
        return torch.rand(batch, 4, generator=gen) < 0.4
    return None


def oracle_mask(kind, labels, batch, total, weight="any"):
    """The ``[total, total]`` mask of the batch (its first ``batch`` samples) followed by the
    bank's: the batch's rows weigh every sample as its labels say, the bank's rows are zero."""
    if kind == "labels":
        mask = (labels[:, None] == labels[None, :]).to(torch.float32)
    elif kind == "label_sets":
        mask = label_set_mask(labels, weight).to(torch.float32)
    else:
        mask = torch.eye(total)
    mask[batch:] = 0.0
    return mask


CASES = [
    ("mean", {}),
    ("none", {"reduction": "none"}),
    ("one", {"contrast_mode": "one", "views": 3}),
    ("sum_inside_cap", {"reduction": "sum", "summation": "inside", "positives_cap": 2}),
    ("exclude_v1", {"no_positive": "exclude", "views": 1}),
    ("only_negatives", {"denominator": "only_negatives", "temperature": 0.2}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["labels", "simclr", "label_sets"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_the_appended_batch(gen, case, kind, dtype):
    """Over 4 steps of ragged batches (a bank of 13 samples that fills and wraps around), the
    loss with the bank and the batch's gradient equal the single-process loss on the batch
    followed by the bank's contents, with the oracle mask (see the module docs) and
    no_positive="exclude". (V ≥ 2 gives every batch anchor a positive, so the policies agree;
    V = 1 runs exclude on both sides.) Reduction none returns the batch anchors' ℓ in the
    single-process order (row v·B + b). Afterwards the bank holds the batch's detached
    features and labels as its newest samples."""
    _, options = case
    options = dict(options)
    views = options.pop("views", 2)
    dim = 10
    bank = MemoryBank(13, dim)
    loss_fn = SupConLoss(**options)
    tol = 1e-12 if dtype == torch.float64 else h.F32_TOL
    for _ in range(4):
        batch = int(torch.randint(3, 9, (), generator=gen))
        z = h.features(batch, views, dim, dtype, gen=gen)
        labels = draw_positives(kind, batch, gen)
        past_z, past_labels = bank.features, bank.labels
        held = 0 if past_z is None else past_z.shape[0]
        total = batch + held
        combined = z if held == 0 else torch.cat([z, past_z])
        all_labels = labels if held == 0 or labels is None else torch.cat([labels, past_labels])
        mask = oracle_mask(kind, all_labels, batch, total)
        anchor_views = views if options.get("contrast_mode", "all") == "all" else 1
        upstream = None
        if options.get("reduction") == "none":
            upstream = torch.randn(anchor_views, batch, generator=gen, dtype=torch.float64)
        leaf = z.clone().requires_grad_(True)
        loss = loss_fn(leaf, labels, memory_bank=bank)
        objective = loss if upstream is None else (loss * upstream.reshape(-1).to(dtype)).sum()
        objective.backward()
        oracle_upstream = None
        if upstream is not None:
            oracle_upstream = torch.zeros(anchor_views, total, dtype=torch.float64)
            oracle_upstream[:, :batch] = upstream
            oracle_upstream = oracle_upstream.reshape(-1)
        oracle_options = {**options, "no_positive": "exclude"}
        expected, expected_grad = h.package(combined, mask=mask, upstream=oracle_upstream,
                                            **oracle_options)
        if upstream is not None:
            expected = expected.view(anchor_views, total)[:, :batch].reshape(-1)
        assert loss.shape == expected.shape and loss.dtype == dtype
        h.assert_close(loss, expected, tol, "loss", floor=h.LOSS_FLOOR)
        floor = h.gradient_floor(combined, oracle_upstream, **options)
        h.assert_close(leaf.grad, expected_grad[:batch], tol, "batch gradient", floor=floor)
        # The batch joined the bank after its loss: its newest samples, detached.
        assert len(bank) == min(13, total)
        assert not bank.features.requires_grad and torch.equal(bank.features[-batch:], z)
        if kind == "simclr":
            assert bank.labels is None
        else:
            assert torch.equal(bank.labels[-batch:], labels)


def test_first_step_is_the_plain_loss(gen):
    """With an empty bank the loss and gradient are the plain loss's (the batch's samples are
    the one shard of the batch alone)."""
    z = h.features(9, 2, 7, torch.float64, gen=gen)
    labels = h.labels(9, gen=gen)
    loss, grad = h.package(z, labels)
    leaf = z.clone().requires_grad_(True)
    with_bank = supcon_loss(leaf, labels, memory_bank=MemoryBank(20, 7))
    with_bank.backward()
    h.assert_close(with_bank, loss, 1e-14, "loss", floor=h.LOSS_FLOOR)
    h.assert_close(leaf.grad, grad, 1e-14, "gradient")


def test_bank_rows_get_no_gradient(gen):
    """The bank stores detached copies: pushing features that require a gradient keeps no
    graph, and a loss against the bank gives the batch a gradient and the bank none."""
    bank = MemoryBank(10, 6)
    past = h.features(5, 2, 6, torch.float32, gen=gen).requires_grad_(True)
    bank.push(past * 2.0, torch.arange(5))
    assert not bank.features.requires_grad and bank._features.grad_fn is None
    leaf = h.features(4, 2, 6, torch.float32, gen=gen).requires_grad_(True)
    supcon_loss(leaf, torch.arange(4) % 2, memory_bank=bank).backward()
    assert past.grad is None and leaf.grad is not None
    assert torch.equal(bank.features[:5], (past * 2.0).detach())


@pytest.mark.parametrize("kind", ["labels", "label_sets", "simclr"])
def test_ring_buffer_wraps_around(gen, kind):
    """Pushes of ragged sizes, then one larger than the bank, then more: the bank always holds
    exactly the newest ``size`` samples, oldest first, with their labels, in storage that the
    first push allocated and no push reallocates."""
    size, dim = 8, 5
    bank = MemoryBank(size, dim)
    assert len(bank) == 0 and bank.features is None and bank.labels is None
    pushed_z, pushed_labels, storage = [], [], None
    for count in (3, 5, 4, 11, 1, 7, 0, 2):
        z = h.features(count, 2, dim, torch.float32, gen=gen)
        labels = draw_positives(kind, count, gen)
        bank.push(z.reshape(count, 2, dim // 5, 5), labels)
        pushed_z.append(z)
        pushed_labels.append(labels)
        if storage is None:
            storage = bank._features.untyped_storage().data_ptr()
        assert bank._features.untyped_storage().data_ptr() == storage
        every = torch.cat(pushed_z)
        assert len(bank) == min(size, every.shape[0])
        assert torch.equal(bank.features, every[-size:])
        if kind == "simclr":
            assert bank.labels is None
        else:
            assert torch.equal(bank.labels, torch.cat(pushed_labels)[-size:])
    bank.clear()
    assert len(bank) == 0 and bank.features.shape == (0, 2, dim)
    z = h.features(2, 2, dim, torch.float32, gen=gen)
    bank.push(z, draw_positives(kind, 2, gen))
    assert torch.equal(bank.features, z)


def test_pushes_convert_to_the_banks_dtype(gen):
    """The first push fixes the bank's dtype; later pushes are converted to it, and the loss
    reads the bank in the batch's dtype."""
    bank = MemoryBank(6, 4)
    bank.push(h.features(3, 2, 4, torch.float32, gen=gen), torch.arange(3))
    z = h.features(2, 2, 4, torch.float64, gen=gen)
    bank.push(z, torch.arange(2))
    assert bank.features.dtype == torch.float32
    torch.testing.assert_close(bank.features[3:], z.to(torch.float32))
    loss = supcon_loss(z, torch.arange(2), memory_bank=bank)
    assert loss.dtype == torch.float64 and len(bank) == 6


def test_errors(gen):
    """ValueErrors: a mask with a bank; a bank with the sharded loss; a batch whose V, dim, kind
    of positives or label set classes differ from what the bank holds (the loss refuses it
    before anything changes, so the bank stays as it was); a bad size or dim."""
    bank = MemoryBank(10, 6)
    z = h.features(4, 2, 6, torch.float32, gen=gen)
    labels = torch.arange(4)
    with pytest.raises(ValueError, match="not a mask"):
        supcon_loss(z, mask=torch.eye(4), memory_bank=bank)
    with pytest.raises(ValueError, match="not supported yet"):
        SupConLoss(distributed=True)(z, labels, memory_bank=bank)
    supcon_loss(z, labels, memory_bank=bank)
    held = bank.features.clone()
    for features, positives, message in (
        (h.features(4, 3, 6, torch.float32, gen=gen), labels, "2 views"),
        (h.features(4, 2, 5, torch.float32, gen=gen), labels, r"\[n, V, 6\]"),
        (z, None, "labels positives, got simclr"),
        (z, torch.ones(4, 3, dtype=torch.bool), "labels positives, got label_sets"),
    ):
        with pytest.raises(ValueError, match=message):
            supcon_loss(features, positives, memory_bank=bank)
        with pytest.raises(ValueError, match=message):
            bank.push(features, positives)
    assert torch.equal(bank.features, held)
    sets = MemoryBank(10, 6)
    sets.push(z, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="label sets of 3 classes, got 2"):
        sets.push(z, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="one label or label set per sample"):
        bank.push(z, torch.arange(5))
    for size, dim in ((0, 4), (4, 0), (2.5, 4), (True, 4)):
        with pytest.raises(ValueError, match="whole number"):
            MemoryBank(size, dim)
