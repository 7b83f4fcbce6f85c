"""The test oracle itself: ``supcon_reference`` against the authors' formula (where that is
finite) and against a term-by-term loop over the formulas of docs/math.md (for the options the
original lacks). The package is not involved here."""

from __future__ import annotations

import math

import pytest
import torch

import helpers as h
from reference import kept_positives, original_supcon, pair_weights, rows, supcon_reference

# The options the original code has, on normalised features at τ = 0.5 (where it is finite).
ORIGINAL_CASES = [
    ("labels_v2", 8, 2, "labels", {}),
    ("labels_v3", 6, 3, "labels", {}),
    ("simclr", 7, 2, "simclr", {}),
    ("soft_mask", 6, 2, "soft_mask", {}),
    ("binary_mask", 6, 3, "binary_mask", {}),
    ("one_labels", 8, 2, "labels", {"contrast_mode": "one"}),
    ("one_simclr", 5, 3, "simclr", {"contrast_mode": "one"}),
    ("one_soft_mask", 6, 2, "soft_mask", {"contrast_mode": "one"}),
    ("tau_ne_base", 8, 2, "labels", {"base_temperature": 0.07}),
    ("tau_ne_base_mask", 6, 2, "soft_mask", {"base_temperature": 1.0}),
    ("v1_no_positives", 9, 1, "labels", {}),
    ("v1_simclr_all_zero", 5, 1, "simclr", {}),
]


def make_positives(kind, batch, gen):
    if kind == "labels":
        return h.labels(batch, gen=gen), None
    if kind == "soft_mask":
        return None, h.soft_mask(batch, gen=gen, dyadic=True)
    if kind == "binary_mask":
        return None, h.binary_mask(batch, gen=gen)
    return None, None


@pytest.mark.parametrize("name,batch,views,kind,options", ORIGINAL_CASES,
                         ids=[c[0] for c in ORIGINAL_CASES])
def test_reference_equals_original_formula(gen, name, batch, views, kind, options):
    """Where the original is finite (unit-norm features, τ = 0.5), the stable reference gives
    the original's loss and autograd gradient to ~1e-10 in float64, for every option the
    original has (labels, SimCLR, soft/asymmetric masks, contrast one, τ ≠ τ_b, V = 1 with
    anchors without positives)."""
    z = h.features(batch, views, 11, torch.float64, gen=gen)
    labels, mask = make_positives(kind, batch, gen)
    options = {"temperature": 0.5, **options}
    z1 = z.clone().requires_grad_(True)
    expected = original_supcon(z1, labels, mask, **options)
    expected.backward()
    z2 = z.clone().requires_grad_(True)
    actual = supcon_reference(z2, labels, mask, **options)
    actual.backward()
    actual, expected = actual.detach(), expected.detach()
    assert torch.isfinite(expected)
    assert abs(float(actual) - float(expected)) <= 1e-10 * max(1.0, abs(float(expected)))
    h.assert_close(z2.grad, z1.grad, 1e-10, "gradient", floor=1.0)
    if name == "v1_simclr_all_zero":  # no anchor has a positive: the loss is exactly 0
        assert float(actual) == 0.0 and bool((z2.grad == 0).all())


def naive_per_anchor(z, labels, mask, temperature, base_temperature, contrast_mode,
                     summation, denominator, positives_cap):
    """ℓ_i by explicit loops over the definitions of docs/math.md, section 2 (math.exp/log
    on Python floats; only for moderate logits)."""
    batch, views = z.shape[0], z.shape[1]
    x = rows(z).tolist()
    n = len(x)
    anchors = n if contrast_mode == "all" else batch
    w = pair_weights(batch, views, labels, mask)
    kept = kept_positives(w, batch, positives_cap)
    c = temperature / base_temperature
    out = []
    for i in range(anchors):
        s = [sum(a * b for a, b in zip(x[i], x[j])) / temperature for j in range(n)]
        pos = [j for j in range(n) if j != i and kept[i, j]]
        neg = [j for j in range(n) if j != i and float(w[i, j]) == 0.0]
        dropped = [j for j in range(n) if j != i and float(w[i, j]) > 0 and not kept[i, j]]
        if denominator == "all":
            den = [j for j in range(n) if j != i and j not in dropped]
        else:
            den = neg
        p = sum(float(w[i, j]) for j in pos)
        if p == 0 or (denominator != "one_positive" and not den):
            out.append(0.0)
            continue
        if denominator == "one_positive":
            neg_sum = sum(math.exp(s[j]) for j in neg)
            pi = {j: math.exp(s[j]) / (math.exp(s[j]) + neg_sum) for j in pos}
            if summation == "outside":
                loss = c / p * sum(float(w[i, j]) * -math.log(pi[j]) for j in pos)
            else:
                loss = c * (math.log(p) - math.log(sum(float(w[i, j]) * pi[j] for j in pos)))
        else:
            lse = math.log(sum(math.exp(s[j]) for j in den))
            if summation == "outside":
                loss = -c / p * sum(float(w[i, j]) * (s[j] - lse) for j in pos)
            else:
                loss = -c * math.log(sum(float(w[i, j]) * math.exp(s[j] - lse) for j in pos) / p)
        out.append(loss)
    return torch.tensor(out, dtype=torch.float64)


NAIVE_OPTIONS = [
    {},
    {"summation": "inside"},
    {"denominator": "only_negatives"},
    {"denominator": "only_negatives", "summation": "inside"},
    {"denominator": "one_positive"},
    {"denominator": "one_positive", "summation": "inside"},
    {"positives_cap": 1},
    {"positives_cap": 2, "summation": "inside"},
    {"positives_cap": 1, "denominator": "one_positive"},
    {"contrast_mode": "one", "summation": "inside", "denominator": "only_negatives"},
    {"base_temperature": 0.3},
]


@pytest.mark.parametrize("kind", ["labels", "simclr", "soft_mask"])
@pytest.mark.parametrize("options", NAIVE_OPTIONS, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items()) or "default")
def test_reference_equals_naive_loops(gen, kind, options):
    """The reference's per-anchor losses for the options beyond the original (L_in,
    only_negatives, one_positive, the positives cap, contrast one, τ ≠ τ_b) equal a direct loop
    over the definitions, including anchors whose loss is 0 (no positive, empty denominator)."""
    batch, views = 6, 3
    z = h.features(batch, views, 5, torch.float64, norm=1.5, gen=gen)
    labels, mask = make_positives(kind, batch, gen)
    if kind == "labels":
        labels = torch.tensor([0, 0, 0, 1, 1, 2])  # a cap of 1 or 2 drops positives
    full = {"temperature": 0.5, "base_temperature": 0.5, "contrast_mode": "all",
            "summation": "outside", "denominator": "all", "positives_cap": None, **options}
    expected = naive_per_anchor(z, labels, mask, **full)
    actual = supcon_reference(z, labels, mask, reduction="none", **full)
    h.assert_close(actual, expected, 1e-12, "per-anchor losses", floor=1.0)


def test_reference_no_positive_policies(gen):
    """The reference's reductions: mean over R anchors (zero_and_count), over the anchors with
    P_i > 0 (exclude, at least 1), sum, and an error with no_positive="error"."""
    z = h.features(5, 1, 4, torch.float64, gen=gen)
    labels = torch.tensor([0, 0, 1, 2, 2])  # anchor 2 has no positive
    per_anchor = supcon_reference(z, labels, reduction="none", temperature=0.5)
    assert per_anchor[2] == 0 and bool((per_anchor[[0, 1, 3, 4]] > 0).all())
    mean = supcon_reference(z, labels, temperature=0.5)
    exclude = supcon_reference(z, labels, temperature=0.5, no_positive="exclude")
    total = supcon_reference(z, labels, temperature=0.5, reduction="sum")
    assert torch.allclose(mean, per_anchor.sum() / 5, rtol=1e-14, atol=0)
    assert torch.allclose(exclude, per_anchor.sum() / 4, rtol=1e-14, atol=0)
    assert torch.allclose(total, per_anchor.sum(), rtol=1e-14, atol=0)
    with pytest.raises(ValueError):
        supcon_reference(z, labels, no_positive="error")
    none_has = supcon_reference(z, torch.arange(5), no_positive="exclude")
    assert float(none_has) == 0.0


def test_reference_cap_keeps_own_sample_views():
    """The cap keeps every other view of the anchor's own sample, then fills the remaining room
    with other samples' positives in increasing row index."""
    batch, views = 4, 3  # rows r = v·4 + b
    w = pair_weights(batch, views, torch.tensor([0, 0, 0, 1]))
    kept = kept_positives(w, batch, 3)
    # Anchor row 0 (sample 0): own views are rows 4 and 8; room 1 goes to row 1 (sample 1).
    assert kept[0].nonzero().flatten().tolist() == [1, 4, 8]
    kept = kept_positives(w, batch, 1)
    assert kept[0].nonzero().flatten().tolist() == [4, 8]  # own views stay beyond the cap
    assert kept[3].nonzero().flatten().tolist() == [7, 11]  # label 1: only its own views
