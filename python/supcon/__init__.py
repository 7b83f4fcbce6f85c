"""The Supervised Contrastive loss (Khosla et al., NeurIPS 2020) from fused kernels.

- :func:`loss_and_grad`: the loss and its gradient for NumPy arrays.
- :mod:`supcon.torch`: ``SupConLoss``, a drop-in ``torch.nn.Module`` with autograd, for CPU
  and CUDA tensors (``import supcon.torch``; PyTorch is optional); also sharded over the ranks
  of a ``torch.distributed`` group, or against a ``MemoryBank`` of past embeddings.

Errors: ``ValueError`` for bad inputs or options, ``RuntimeError`` for a device that cannot run,
:class:`OutOfMemoryError` (a ``MemoryError``) when memory runs out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import _core
from ._supcon import OutOfMemoryError

__all__ = ["loss_and_grad", "OutOfMemoryError"]

_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                 np.dtype(np.float64): "float64"}


def _label_sets(batch: int, sets: np.ndarray, weight: str):
    """``[bsz, K]`` label sets (bool, or 0/1 integers) as the extension takes them."""
    if sets.shape[0] != batch:
        raise ValueError(f"label sets (2-D labels) must be [{batch}, K], got {list(sets.shape)}")
    if sets.dtype != np.bool_:
        stray = (sets != 0) & (sets != 1)
        if stray.any():
            b, k = np.argwhere(stray)[0]
            raise ValueError(
                f"label sets (2-D labels) hold 0 or 1, got labels[{b}, {k}] = {sets[b, k]}")
    sets = np.ascontiguousarray(sets, dtype=np.bool_)
    return ("label_sets", _core.array(sets.ctypes.data, "bool", sets.size), weight), sets


def _positives(batch: int, labels, mask, label_set_weight: str):
    """The positives as the extension takes them, and the arrays that must stay alive."""
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind in "iub" and _core.is_label_sets(
                labels.ndim, labels.shape, labels.dtype == np.bool_):
            return _label_sets(batch, labels, label_set_weight)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = np.ascontiguousarray(labels.reshape(-1), dtype=np.int64)
        if labels.shape[0] != batch:
            raise ValueError("Num of labels does not match num of features")
        return ("labels", _core.array(labels.ctypes.data, "int64", labels.size), None), labels
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (batch, batch):
            raise ValueError(f"mask must be [{batch}, {batch}], got {list(mask.shape)}")
        too_large = np.isfinite(mask) & (np.abs(mask) > np.finfo(np.float32).max)
        if too_large.any():
            row, col = np.argwhere(too_large)[0]
            raise ValueError(f"mask[{row}, {col}] = {mask[row, col]!r} is beyond float32")
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        return ("mask", _core.array(mask.ctypes.data, "float32", mask.size), None), mask
    return ("simclr", None, None), None


def loss_and_grad(
    features,
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
    label_set_weight: str = "any",
    normalize: bool = False,
    upstream=None,
    backend: str = "auto",
):
    """The SupCon loss of ``features`` ``[bsz, n_views, ...]`` and its gradient.

    Positives come from ``labels`` (``[bsz]`` integers), ``labels`` as label sets (multi-hot
    ``[bsz, K]``, 0/1 or bool: a 2-D array with K ≠ 1, or any 2-D bool array; weighed as
    ``label_set_weight`` says, see ``supcon.torch.SupConLoss``), ``mask`` (``[bsz, bsz]``
    weights) or, with neither, the other views of each sample (SimCLR). ``normalize``: the
    loss of the L2-normalised rows, with the gradient with respect to the raw ``features``. ``upstream`` is the gradient of the
    objective with respect to the loss: a scalar (default 1), or ``[R]`` values for
    ``reduction="none"`` (default ones). Returns ``(loss, grad)``: ``loss`` a float (an
    ``[R]`` float64 array for ``reduction="none"``), ``grad`` shaped like ``features``
    (float64 for float64 features, float32 otherwise). ``backend``: ``"auto"`` (the fused CPU
    backend; the f64 reference for float64 features), ``"cpu"`` or ``"reference"``.
    """
    options = _core.Options(
        temperature, base_temperature, contrast_mode, summation, denominator, positives_cap,
        no_positive, reduction, label_set_weight, normalize,
    )
    _core.check_backend(backend)
    z = np.asarray(features)
    if z.ndim < 3:
        raise ValueError("`features` needs to be [bsz, n_views, ...], at least 3 dimensions are required")
    dtype = _NUMPY_DTYPES.get(z.dtype)
    if dtype is None:
        raise ValueError(f"features must be float32, float16 or float64, got {z.dtype}")
    if z.size == 0:
        raise ValueError(f"features have an empty dimension: shape {list(z.shape)}")
    z = np.ascontiguousarray(z.reshape(z.shape[0], z.shape[1], -1))
    batch, views, dim = z.shape
    positives, keep = _positives(batch, labels, mask, options.label_set_weight)
    anchors = options.anchors(batch, views)
    backend = _core.host_backend(backend, dtype)
    per_anchor = np.empty(anchors, dtype=np.float64)
    state = [np.empty(anchors, dtype=np.float64) for _ in range(3)]
    arrays = [_core.array(a.ctypes.data, "float64", a.size) for a in state]
    features_array = _core.array(z.ctypes.data, dtype, z.size)
    loss, mean_denominator, fingerprint = _core.forward(
        backend, options, features_array, (batch, views, dim), positives,
        _core.array(per_anchor.ctypes.data, "float64", anchors), arrays,
    )
    if reduction == "none":
        u = np.ones(anchors) if upstream is None else np.ascontiguousarray(upstream, dtype=np.float64)
        if u.shape != (anchors,):
            raise ValueError(f"upstream must have {anchors} values for reduction='none'")
        upstream_arg = _core.array(u.ctypes.data, "float64", anchors)
    else:
        u = None
        upstream_arg = 1.0 if upstream is None else float(upstream)
    grad_dtype = np.float64 if dtype == "float64" else np.float32
    grad = np.empty(z.shape, dtype=grad_dtype)
    _core.backward(
        backend, options, features_array, (batch, views, dim), positives, arrays,
        mean_denominator, fingerprint, upstream_arg,
        _core.array(grad.ctypes.data, "float64" if dtype == "float64" else "float32", grad.size),
    )
    del keep, u
    return (per_anchor if reduction == "none" else loss), grad.reshape(np.shape(features))
