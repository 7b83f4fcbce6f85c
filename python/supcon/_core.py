"""What the NumPy and PyTorch front ends share: the options, their checks, and the calls into the
extension on arrays they own (by address, never copied)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import _supcon

CONTRAST_MODES = ("all", "one")
SUMMATIONS = ("outside", "inside")
DENOMINATORS = ("all", "only_negatives", "one_positive")
NO_POSITIVE = ("zero_and_count", "exclude", "error")
REDUCTIONS = ("mean", "sum", "none")
LABEL_SET_WEIGHTS = ("any", "jaccard", "fraction")
BACKENDS = ("auto", "cpu", "reference", "cuda")


@dataclass(frozen=True)
class Options:
    """The loss options (docs/math.md), checked when made. ``label_set_weight`` applies to
    label sets only, and travels to the extension with them rather than with the options."""

    temperature: float = 0.07
    base_temperature: float = 0.07
    contrast_mode: str = "all"
    summation: str = "outside"
    denominator: str = "all"
    positives_cap: Optional[int] = None
    no_positive: str = "zero_and_count"
    reduction: str = "mean"
    label_set_weight: str = "any"
    normalize: bool = False

    def __post_init__(self) -> None:
        for name, choices in (
            ("contrast_mode", CONTRAST_MODES),
            ("summation", SUMMATIONS),
            ("denominator", DENOMINATORS),
            ("no_positive", NO_POSITIVE),
            ("reduction", REDUCTIONS),
            ("label_set_weight", LABEL_SET_WEIGHTS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("temperature", "base_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        cap = self.positives_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"positives_cap must be None or a whole number >= 1, got {cap!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")

    def anchors(self, batch: int, views: int) -> int:
        """R: the number of anchors of a [B, V, D] batch."""
        return batch * views if self.contrast_mode == "all" else batch

    def as_tuple(self):
        """The extension's view of the options."""
        return (
            float(self.temperature),
            float(self.base_temperature),
            self.contrast_mode,
            self.summation,
            self.denominator,
            self.positives_cap,
            self.no_positive,
            self.reduction,
            self.normalize,
        )


def is_label_sets(ndim: int, shape, is_bool: bool) -> bool:
    """Whether ``labels`` of this rank, shape and dtype are label sets: a 2-D array ``[bsz, K]``
    with K ≠ 1, or any 2-D bool array. A ``[bsz, 1]`` array of another dtype stays class labels,
    as the original SupContrast code takes them."""
    return ndim == 2 and (is_bool or shape[1] != 1)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def host_backend(backend: str, dtype: str) -> str:
    """The backend that runs host arrays: `auto` is the fused CPU backend, or the f64 reference
    for float64 features (so that gradients can be checked numerically)."""
    if backend == "cuda":
        raise ValueError("backend 'cuda' needs CUDA tensors; these arrays are on the host")
    if backend == "auto":
        return "reference" if dtype == "float64" else "cpu"
    return backend


def array(address: int, dtype: str, length: int):
    """An array by address, as the extension takes it."""
    return (address, dtype, length)


def forward(backend, options, features, shape, positives, per_anchor, state):
    """`_supcon.forward` (see its docs); all arguments are `array(...)` tuples."""
    return _supcon.forward(
        backend, options.as_tuple(), features, shape, positives, per_anchor, state
    )


def backward(
    backend, options, features, shape, positives, state, mean_denominator, fingerprint,
    upstream, grad,
):
    """`_supcon.backward` (see its docs)."""
    _supcon.backward(
        backend,
        options.as_tuple(),
        features,
        shape,
        positives,
        state,
        mean_denominator,
        fingerprint,
        upstream,
        grad,
    )


def forward_shard(backend, options, features, shape, positives, samples, outputs):
    """`_supcon.forward_shard` (see its docs): the statistics of the anchors of ``samples``
    ``(b0, b1)`` against the whole batch, into ``outputs`` (four ``float64`` arrays)."""
    _supcon.forward_shard(
        backend, options.as_tuple(), features, shape, positives, samples, outputs
    )


def assemble(options, shape, shards, per_anchor, state):
    """`_supcon.assemble` (see its docs): the whole batch's loss and R' from the statistics of
    disjoint shards, each ``(b0, b1, [ℓ, LSE, LSE^P, P])``."""
    return _supcon.assemble(options.as_tuple(), shape, shards, per_anchor, state)


def backward_shard(
    backend, options, features, shape, positives, state, mean_denominator, upstream, samples,
    grad,
):
    """`_supcon.backward_shard` (see its docs): the gradient of the rows of ``samples``
    ``(b0, b1)`` from the whole batch's state."""
    _supcon.backward_shard(
        backend,
        options.as_tuple(),
        features,
        shape,
        positives,
        state,
        mean_denominator,
        upstream,
        samples,
        grad,
    )
