"""Plain PyTorch SupCon losses the package is tested against (autograd gives their gradients).

- :func:`supcon_reference`: the loss of docs/math.md written from the formulas, in float64,
  with a stable masked log-sum-exp over j ≠ i only (the self logit is in no max and no sum),
  for every option the package has; ``normalize`` is ``F.normalize`` on its input.
- :func:`label_set_mask`: the ``[B, B]`` mask that label sets stand for, so that label sets
  are checked through the mask path.
- :func:`original_supcon`: the authors' SupContrast ``SupConLoss.forward``
  (github.com/HobbitLong/SupContrast, losses.py, December 2023 version, the one that zeroes
  anchors without positives), verbatim in spirit: its row maximum includes the self logit, so
  it under- and overflows on un-normalised features or small temperatures.

Nothing here calls the package.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rows", "pair_weights", "label_set_mask", "kept_positives", "supcon_reference",
           "original_supcon"]


def rows(features: torch.Tensor) -> torch.Tensor:
    """``[bsz, n_views, ...]`` as the ``[N, D]`` rows, view-major: row v·B + b is view v of
    sample b (the original's ``torch.cat(torch.unbind(features, dim=1), dim=0)``)."""
    features = features.reshape(features.shape[0], features.shape[1], -1)
    return torch.cat(torch.unbind(features, dim=1), dim=0)


def pair_weights(batch: int, views: int, labels=None, mask=None) -> torch.Tensor:
    """w_ij (float64 ``[N, N]``, zero diagonal): label equality, the mask entry
    ``mask[b_i, b_j]``, or (neither) same sample, with b_r = r mod B."""
    n = batch * views
    sample = torch.arange(n) % batch
    if labels is not None and mask is not None:
        raise ValueError("both labels and mask")
    if labels is not None:
        y = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        w = (y[sample][:, None] == y[sample][None, :]).to(torch.float64)
    elif mask is not None:
        m = torch.as_tensor(mask).to(torch.float64)
        w = m[sample][:, sample]
    else:
        w = (sample[:, None] == sample[None, :]).to(torch.float64)
    return w * (1.0 - torch.eye(n, dtype=torch.float64))


def label_set_mask(sets, weight: str = "any") -> torch.Tensor:
    """The float64 ``[B, B]`` mask of multi-hot ``[B, K]`` label sets (docs/math.md, "Label
    sets"): 1 on the diagonal (the other views of a sample always weigh 1) and, for samples
    b ≠ c with shared = |Y_b ∩ Y_c|, union = |Y_b ∪ Y_c|: ``"any"`` 1 if shared > 0,
    ``"jaccard"`` shared / union, ``"fraction"`` shared / |Y_b| (b the anchor), 0 where the
    divisor is 0. The quotients are rounded to float32, as the package defines them, so that
    float64 comparisons need no slack for them."""
    y = torch.as_tensor(sets).to(torch.float64)
    shared = y @ y.T
    size = y.sum(dim=1)
    if weight == "any":
        w = (shared > 0).to(torch.float64)
    elif weight in ("jaccard", "fraction"):
        union = size[:, None] + size[None, :] - shared
        divisor = union if weight == "jaccard" else size[:, None].expand_as(shared)
        quotient = shared.to(torch.float32) / divisor.to(torch.float32).clamp_min(1.0)
        w = torch.where(divisor > 0, quotient.to(torch.float64), torch.zeros(()))
    else:
        raise ValueError(f"unknown label set weight {weight!r}")
    return w.fill_diagonal_(1.0)


def kept_positives(w: torch.Tensor, batch: int, cap: Optional[int]) -> torch.Tensor:
    """Which positives (w_ij > 0) the cap k keeps, per anchor row: the other views of the
    anchor's own sample always stay; the remaining room, k minus their count, goes to the
    positives of other samples in increasing row index (docs/math.md, section 1)."""
    positive = w > 0
    if cap is None:
        return positive
    n = w.shape[1]
    sample = torch.arange(n) % batch
    kept = torch.zeros_like(positive)
    for i in range(w.shape[0]):
        same = positive[i] & (sample == sample[i])
        kept[i] |= same
        room = cap - int(same.sum())
        for j in range(n):
            if room <= 0:
                break
            if positive[i, j] and not same[j]:
                kept[i, j] = True
                room -= 1
    return kept


def _masked_lse(x: torch.Tensor, member: torch.Tensor):
    """Per row, log Σ_{j: member} e^{x_ij}, shifted by the largest member of the row itself.
    Returns (lse, empty); lse is 0 (not −∞) on empty rows so that nothing becomes NaN, and the
    gradient never sees a non-member term."""
    masked = x.masked_fill(~member, float("-inf"))
    empty = ~member.any(dim=1)
    shift = masked.max(dim=1).values.detach()
    shift = torch.where(empty, torch.zeros_like(shift), shift)
    total = torch.exp(masked - shift[:, None]).sum(dim=1)
    total = torch.where(empty, torch.ones_like(total), total)
    return shift + torch.log(total), empty


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without torch's linear threshold (exact in float64)."""
    return torch.logaddexp(torch.zeros_like(x), x)


def supcon_reference(
    features: torch.Tensor,
    labels=None,
    mask=None,
    *,
    temperature: float = 0.07,
    contrast_mode: str = "all",
    base_temperature: float = 0.07,
    summation: str = "outside",
    denominator: str = "all",
    positives_cap: Optional[int] = None,
    no_positive: str = "zero_and_count",
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """The SupCon loss of docs/math.md in float64 (differentiable with respect to
    ``features``): a 0-dim tensor, or ``[R]`` per-anchor losses for ``reduction="none"``.
    ``normalize``: the loss of ``F.normalize(features, dim=-1)`` (trailing dimensions
    flattened first)."""
    if features.dim() < 3:
        raise ValueError("features must be [bsz, n_views, ...]")
    batch, views = features.shape[0], features.shape[1]
    x = features.to(torch.float64).reshape(batch, views, -1)
    z = rows(F.normalize(x, dim=-1) if normalize else x)
    n = z.shape[0]
    anchors = n if contrast_mode == "all" else batch
    c = temperature / base_temperature

    s = z[:anchors] @ z.T / temperature
    w = pair_weights(batch, views, labels, mask)[:anchors]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)[:anchors]
    kept = kept_positives(w, batch, positives_cap) & off_diagonal
    dropped = (w > 0) & ~kept
    wk = torch.where(kept, w, torch.zeros_like(w))
    negative = (w == 0) & off_diagonal
    p = wk.sum(dim=1)
    has_positive = p > 0
    p_safe = torch.where(has_positive, p, torch.ones_like(p))

    if denominator == "all":
        members = off_diagonal & ~dropped
    elif denominator in ("only_negatives", "one_positive"):
        members = negative
    else:
        raise ValueError(f"unknown denominator {denominator!r}")
    lse, empty = _masked_lse(s, members)

    if denominator in ("all", "only_negatives"):
        if summation == "outside":
            t = (wk * s).sum(dim=1)
            loss = c * (lse - t / p_safe)
        elif summation == "inside":
            log_w = torch.log(torch.where(kept, w, torch.ones_like(w)))
            lse_positive, _ = _masked_lse(s + log_w, kept)
            loss = c * (lse - lse_positive + torch.log(p_safe))
        else:
            raise ValueError(f"unknown summation {summation!r}")
    else:  # one_positive: each positive p against the negatives, softmax π_ip = σ(s_ip − LSE^N_i)
        x = lse[:, None] - s
        if summation == "outside":
            terms = torch.where(kept, wk * _softplus(x), torch.zeros_like(s))
            loss = c * terms.sum(dim=1) / p_safe
        elif summation == "inside":
            log_w = torch.log(torch.where(kept, w, torch.ones_like(w)))
            log_pi = -_softplus(x)  # log σ(s − LSE^N)
            log_sum, _ = _masked_lse(log_w + log_pi, kept)
            loss = c * (torch.log(p_safe) - log_sum)
        else:
            raise ValueError(f"unknown summation {summation!r}")

    valid = has_positive & ~empty
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    if no_positive == "error" and not bool(has_positive.all()):
        raise ValueError("an anchor has no positive")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    if no_positive == "exclude":
        count = max(int(has_positive.sum()), 1)
    else:
        count = anchors
    return loss.sum() / count


def original_supcon(features, labels=None, mask=None, temperature=0.07, contrast_mode="all",
                    base_temperature=0.07):
    """``SupConLoss.forward`` of the authors' SupContrast code (losses.py), as written there,
    in the dtype of ``features``; only ``device`` handling is dropped."""
    if len(features.shape) < 3:
        raise ValueError("`features` needs to be [bsz, n_views, ...],"
                         "at least 3 dimensions are required")
    if len(features.shape) > 3:
        features = features.view(features.shape[0], features.shape[1], -1)

    batch_size = features.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    elif labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float32)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        if labels.shape[0] != batch_size:
            raise ValueError("Num of labels does not match num of features")
        mask = torch.eq(labels, labels.T).float()
    else:
        mask = mask.float()

    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature = features[:, 0]
        anchor_count = 1
    elif contrast_mode == "all":
        anchor_feature = contrast_feature
        anchor_count = contrast_count
    else:
        raise ValueError("Unknown mode: {}".format(contrast_mode))

    # compute logits
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    # for numerical stability
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()

    # tile mask
    mask = mask.repeat(anchor_count, contrast_count)
    # mask-out self-contrast cases
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0
    )
    mask = mask * logits_mask

    # compute log_prob
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))

    # compute mean of log-likelihood over positive
    # (modified upstream to handle anchors without a positive pair)
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs

    # loss
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    loss = loss.view(anchor_count, batch_size).mean()
    return loss
