"""The SupCon loss for PyTorch: :class:`SupConLoss` (an ``nn.Module`` with the original code's
calling convention) and :func:`supcon_loss`, with autograd, on CPU and CUDA tensors.

The forward pass saves only O(N) statistics (tensors) for the backward pass; nothing N×N is
ever built. Both passes are ``torch.library`` custom operators (``supcon::forward``,
``supcon::backward``) with fake implementations, so ``torch.compile`` traces through them
without a graph break.

- CPU tensors: float32, float16 and bfloat16 features run the fused CPU backend, read in place
  (non-contiguous features are made contiguous once); float64 features run the f64 reference
  backend, so that ``torch.autograd.gradcheck`` applies. The GIL is released while it runs.
- CUDA tensors: the crate's CUDA kernels, on the tensor's device and PyTorch's current stream
  (label sets, a positives cap and ``normalize`` included: they are prepared on the device).
  What the kernels lack on device tensors (float64) runs on a host copy under
  ``backend="auto"``.

Two losses go beyond one batch on one process. Both are built on the crate's shards
(``src/shard.rs``): the statistics of a run of samples' anchors against every row of a batch
(``forward_shard``), assembled into the whole batch's output (``assemble``), and the gradient of
that run's rows from the whole batch's state (``backward_shard``).

- The sharded loss (``distributed=True``, or ``process_group=``): every rank of a
  ``torch.distributed`` group passes its own samples; its samples are its shard of the ranks'
  samples concatenated in rank order, and the result is exactly one process's on that batch
  (docs/scaling.md, "The sharded step"). CUDA tensors run the kernels on the device, the
  collectives on the group's backend (NCCL); host tensors the host backends (gloo, or any
  backend, through the group's device).
- :class:`MemoryBank`: past embeddings as extra contrasts. The batch's samples are the one shard
  of the batch followed by the bank, so the bank's samples are contrasts only.

They run as a ``torch.autograd.Function`` rather than through the custom operators: collectives
and a bank's contents cannot live inside a ``torch.library`` operator's pure function, so
``torch.compile`` breaks its graph there. The backend is chosen as on the single-process path
(CUDA tensors: the kernels; float64 features: the reference backend, else the fused CPU
backend).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _core, _supcon

__all__ = ["MemoryBank", "SupConLoss", "supcon_loss"]

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_NO_CAP = 0  # positives_cap=None, as an int for the operator schema


def _options(temperature, base_temperature, contrast_mode, summation, denominator,
             positives_cap, no_positive, reduction, label_set_weight, normalize) -> _core.Options:
    return _core.Options(
        temperature, base_temperature, contrast_mode, summation, denominator,
        None if positives_cap == _NO_CAP else positives_cap, no_positive, reduction,
        label_set_weight, normalize,
    )


def _as_batch(features: torch.Tensor) -> torch.Tensor:
    """[bsz, n_views, ...] as a contiguous [B, V, D] tensor (a view where it already is one).
    D is spelled out: a -1 would be ambiguous for a rank of the sharded loss without samples."""
    dim = math.prod(features.shape[2:])
    return features.reshape(features.shape[0], features.shape[1], dim).contiguous()


def _address(tensor: torch.Tensor, dtype: str):
    return _core.array(tensor.data_ptr(), dtype, tensor.numel())


def _memberships(label_sets: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` label sets as a contiguous bool tensor; a value other than 0 or 1 is a
    ValueError (checked here, inside the operator, where a data-dependent check breaks no
    ``torch.compile`` graph)."""
    if label_sets.dtype != torch.bool:
        stray = (label_sets != 0) & (label_sets != 1)
        if bool(stray.any()):
            b, k = (int(i) for i in torch.nonzero(stray)[0])
            raise ValueError(
                f"label sets (2-D labels) hold 0 or 1, got labels[{b}, {k}] = "
                f"{label_sets[b, k].item()}"
            )
        label_sets = label_sets.to(torch.bool)
    return label_sets.contiguous()


def _positive_rows(labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                   label_sets: Optional[torch.Tensor]):
    """The positives' kind and their one tensor with a row per sample, contiguous: labels
    (``int64``), the mask's rows (``float32``) or label sets (``bool``); ``None`` for SimCLR.
    Rows are what the shard path gathers and appends."""
    if label_sets is not None:
        return "label_sets", _memberships(label_sets)
    if labels is not None:
        return "labels", labels.reshape(-1).to(torch.int64).contiguous()
    if mask is not None:
        return "mask", mask.to(torch.float32).contiguous()
    return "simclr", None


_ROW_DTYPES = {"labels": "int64", "mask": "float32", "label_sets": "bool"}


def _as_positives(kind: str, rows: Optional[torch.Tensor], label_set_weight: str):
    """``_positive_rows``'s result as the extension takes it."""
    if rows is None:
        return ("simclr", None, None)
    weight = label_set_weight if kind == "label_sets" else None
    return (kind, _address(rows, _ROW_DTYPES[kind]), weight)


def _positives(labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               label_sets: Optional[torch.Tensor], label_set_weight: str):
    """The positives as the extension takes them, and the tensors that must stay alive."""
    kind, rows = _positive_rows(labels, mask, label_sets)
    return _as_positives(kind, rows, label_set_weight), rows


def _prepare(options, features, labels, mask, label_sets):
    """What every pass starts from: the [B, V, D] batch, its dtype name, R, the positives as
    the extension takes them, and the tensors that must stay alive while it runs."""
    z = _as_batch(features)
    positives, keep = _positives(labels, mask, label_sets, options.label_set_weight)
    return z, _DTYPES[z.dtype], options.anchors(z.shape[0], z.shape[1]), positives, keep


def _f64(tensor: torch.Tensor):
    return _address(tensor, "float64")


def _in_dtype(values: torch.Tensor, dtype: torch.dtype, output: str) -> torch.Tensor:
    """``values`` (host, finite: the crate checks) converted to ``dtype``, or the crate's
    overflow error where they leave its range (a float16 loss beyond 65504, a loss scaled by
    τ/τ_b beyond float32)."""
    if values.dtype == dtype:
        return values
    converted = values.to(dtype)
    if not bool(torch.isfinite(converted).all()):
        raise ValueError(
            f"the {output} overflows {dtype}: τ/τ_b, the features' norm or the upstream "
            f"gradient scale it beyond range"
        )
    return converted


def _state_bytes(anchors, is_cuda: bool, batch=0, set_classes=None, capped=False, scaled_rows=None):
    """Bytes of the saved state of R = ``anchors`` anchors (plain arithmetic, so that it also
    works on the symbolic sizes of ``torch.compile``): on the CPU LSE_i, LSE^P_i and P_i
    (``float64[R]`` each), R', whether there is a fingerprint, and its 64 bits; on a GPU the
    kernels' workspace (the layout of ``_supcon.cuda_workspace``): the loss, the count, nine
    ``float32[R]`` statistics and the partial statistics of the forward's column shares (room
    for the most shares R anchors can take, none where that is one), then the positives the
    forward prepares for a batch of ``batch`` samples: label sets of ``set_classes`` labels
    packed (``uint64[B][1 + words]``), under a cap (``capped``) the bounds (``uint32[B]``), and
    under ``normalize`` the row scales of its ``scaled_rows`` = N rows (``float32[N]``; ``None``
    without)."""
    if not is_cuda:
        return (3 * anchors + 3) * 8
    statistics = 2 * _CUDA_ALIGN + 9 * _aligned(4 * anchors)
    shares = (_FORWARD_TARGET_BLOCKS + (anchors + 63) // 64 - 1) // ((anchors + 63) // 64)
    # 1 - 1 // shares: 0 for one share, else 1 (arithmetic, no branch on a symbolic size).
    outputs = statistics + (1 - 1 // shares) * shares * anchors * _ROW_STATISTICS_BYTES
    if set_classes is None and not capped and scaled_rows is None:
        return outputs
    prepared = _aligned(4 * batch) if capped else 0
    if scaled_rows is not None:
        prepared = prepared + _aligned(4 * scaled_rows)
    if set_classes is not None:
        # At least one word per set: 1 // (K + 1) is 1 for K = 0, else 0.
        words = (set_classes + 63) // 64 + 1 // (set_classes + 1)
        prepared = prepared + _aligned(8 * batch * (words + 1))
    return _aligned(outputs) + prepared


def _aligned(size):
    """``size`` rounded up to the workspace's 256-byte alignment."""
    return (size + _CUDA_ALIGN - 1) // _CUDA_ALIGN * _CUDA_ALIGN


_CUDA_ALIGN = 256
# The kernels' launch plan (src/device/plan.rs): blocks the forward aims for before it splits
# its columns, and the bytes of one anchor's partial statistics in a share.
_FORWARD_TARGET_BLOCKS = 512
_ROW_STATISTICS_BYTES = 28


def _cpu_state_views(state: torch.Tensor, anchors: int):
    """The CPU state's parts: three ``float64[R]``, ``meta`` (``float64[2]``: R' and whether
    there is a fingerprint) and the fingerprint (``int64[1]``)."""
    numbers = state[: (3 * anchors + 2) * 8].view(torch.float64)
    fingerprint = state[(3 * anchors + 2) * 8 :].view(torch.int64)
    return numbers[:anchors], numbers[anchors : 2 * anchors], numbers[2 * anchors : 3 * anchors], \
        numbers[3 * anchors :], fingerprint


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on_kernels(features: torch.Tensor, backend: str) -> bool:
    """Whether a call runs the CUDA kernels: CUDA features with backend ``"cuda"``, or with
    ``"auto"`` where the kernels take the call (not float64). Every other call runs a host
    backend, on a copy of CUDA inputs where they are on a GPU."""
    if not features.is_cuda:
        return False
    if backend == "cuda":
        return True
    return backend == "auto" and features.dtype != torch.float64


def _host(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.cpu()


@torch.library.custom_op("supcon::forward", mutates_args=())
def _forward(
    features: torch.Tensor,
    labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    label_sets: Optional[torch.Tensor],
    temperature: float,
    base_temperature: float,
    contrast_mode: str,
    summation: str,
    denominator: str,
    positives_cap: int,
    no_positive: str,
    reduction: str,
    label_set_weight: str,
    normalize: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss (0-dim, or ``[R]`` for reduction none, in the features' dtype and on their
    device) and the saved state (``uint8``, see ``_state_bytes``; on the host unless the
    kernels ran). At most one of ``labels`` (int64 ``[B]``), ``mask`` and ``label_sets``
    (``[B, K]``, bool or 0/1 integers) is given."""
    options = _options(temperature, base_temperature, contrast_mode, summation, denominator,
                       positives_cap, no_positive, reduction, label_set_weight, normalize)
    if _on_kernels(features, backend):
        return _forward_cuda(options, features, labels, mask, label_sets)
    output, state = _forward_host(options, _host(features), _host(labels), _host(mask),
                                  _host(label_sets), backend)
    return output.to(features.device), state


def _forward_host(options, features, labels, mask, label_sets, backend):
    z, dtype, anchors, positives, keep = _prepare(options, features, labels, mask, label_sets)
    state = torch.empty(_state_bytes(anchors, False), dtype=torch.uint8)
    lse, lse_positive, positive_weight, meta, fingerprint_bits = _cpu_state_views(state, anchors)
    per_anchor = torch.empty(anchors, dtype=torch.float64)
    loss, mean_denominator, fingerprint = _core.forward(
        _core.host_backend(backend, dtype), options, _address(z, dtype), tuple(z.shape),
        positives, _f64(per_anchor), [_f64(s) for s in (lse, lse_positive, positive_weight)],
    )
    del keep
    meta[0] = mean_denominator
    meta[1] = 0.0 if fingerprint is None else 1.0
    fingerprint_bits[0] = 0 if fingerprint is None else fingerprint - (1 << 64) * (fingerprint >= 1 << 63)
    output = per_anchor if options.reduction == "none" else torch.tensor(loss, dtype=torch.float64)
    return _in_dtype(output, features.dtype, "loss"), state


def _forward_cuda(options, features, labels, mask, label_sets):
    """The forward pass on the tensor's device and PyTorch's current stream: the kernels write
    the loss, ℓ_i and the backward's statistics into one workspace that PyTorch allocates."""
    z, dtype, anchors, positives, keep = _prepare(options, features, labels, mask, label_sets)
    if dtype == "float64":
        raise ValueError("the CUDA kernels read float32, float16 or bfloat16 features")
    if not hasattr(_supcon, "forward_cuda"):
        raise RuntimeError("this build of supcon has no CUDA backend (built without feature cuda)")
    device = features.device
    cuda_options = options.as_tuple()
    set_classes = None if label_sets is None else label_sets.shape[1]
    size, loss_offset, per_anchor_offset, count_offset, _, _ = _supcon.cuda_workspace(
        cuda_options, tuple(z.shape), set_classes)
    scaled_rows = z.shape[0] * z.shape[1] if options.normalize else None
    assert size == _state_bytes(anchors, True, z.shape[0], set_classes,
                                options.positives_cap is not None, scaled_rows), \
        "the workspace layouts of Rust and Python differ"
    workspace = torch.empty(size, dtype=torch.uint8, device=device)
    _supcon.forward_cuda(device.index, _stream(device), cuda_options, _address(z, dtype),
                         tuple(z.shape), positives, _core.array(workspace.data_ptr(), "uint8", size))
    # Freeing the inputs' converted copies now is safe: PyTorch's allocator hands their memory
    # out again in stream order, after the queued kernels.
    del keep
    _check_positives(options, workspace, count_offset, per_anchor_offset, anchors)
    if options.reduction == "none":
        per_anchor = workspace[per_anchor_offset : per_anchor_offset + 4 * anchors]
        return per_anchor.view(torch.float32).to(features.dtype), workspace
    loss = workspace[loss_offset : loss_offset + 8].view(torch.float64)[0]
    return loss.to(features.dtype), workspace


def _check_positives(options, workspace, count_offset, per_anchor_offset, anchors):
    """Under the no-positive policy ``error``, the ValueError for the first anchor without
    positives in a CUDA workspace: the count is read on the host, the one synchronisation of a
    step."""
    if options.no_positive != "error":
        return
    count = int(workspace[count_offset : count_offset + 4].view(torch.int32).item())
    if count:
        weights = workspace[per_anchor_offset + 5 * _region(anchors):].view(torch.float32)[:anchors]
        first = int(torch.nonzero(weights <= 0)[0].item())
        raise ValueError(f"anchor row {first} has no positive (NoPositivePolicy::Error)")


def _region(anchors: int) -> int:
    """Bytes of one ``float32[R]`` region of the CUDA workspace."""
    return (4 * anchors + _CUDA_ALIGN - 1) // _CUDA_ALIGN * _CUDA_ALIGN


@_forward.register_fake
def _(features, labels, mask, label_sets, temperature, base_temperature, contrast_mode,
      summation, denominator, positives_cap, no_positive, reduction, label_set_weight,
      normalize, backend):
    batch, views = features.shape[0], features.shape[1]
    anchors = batch * views if contrast_mode == "all" else batch
    output = features.new_empty((anchors,) if reduction == "none" else ())
    on_kernels = _on_kernels(features, backend)
    set_classes = None if label_sets is None else label_sets.shape[1]
    scaled_rows = batch * views if normalize else None
    state_bytes = _state_bytes(anchors, on_kernels, batch, set_classes, positives_cap != _NO_CAP,
                               scaled_rows)
    state = torch.empty((state_bytes,), dtype=torch.uint8,
                        device=features.device if on_kernels else "cpu")
    return output, state


@torch.library.custom_op("supcon::backward", mutates_args=())
def _backward(
    grad_output: torch.Tensor,
    features: torch.Tensor,
    labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    label_sets: Optional[torch.Tensor],
    state: torch.Tensor,
    temperature: float,
    base_temperature: float,
    contrast_mode: str,
    summation: str,
    denominator: str,
    positives_cap: int,
    no_positive: str,
    reduction: str,
    label_set_weight: str,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    """∂(objective)/∂features, in the features' shape, dtype and device."""
    options = _options(temperature, base_temperature, contrast_mode, summation, denominator,
                       positives_cap, no_positive, reduction, label_set_weight, normalize)
    if _on_kernels(features, backend):
        return _backward_cuda(options, grad_output, features, labels, mask, label_sets, state)
    grad = _backward_host(options, _host(grad_output), _host(features), _host(labels),
                          _host(mask), _host(label_sets), state, backend)
    return grad.to(features.device)


def _backward_cuda(options, grad_output, features, labels, mask, label_sets, state):
    """The backward pass on the device: R doubles of upstream (R copies of a reduced loss's
    scalar), R floats of scratch and the float32 gradient, all from PyTorch's allocator;
    nothing is read back."""
    z, dtype, anchors, positives, keep = _prepare(options, features, labels, mask, label_sets)
    device = features.device
    upstream = grad_output.to(torch.float64).expand(anchors).contiguous()
    scratch = torch.empty(4 * anchors, dtype=torch.uint8, device=device)
    grad = torch.empty(z.shape, dtype=torch.float32, device=device)
    _supcon.backward_cuda(
        device.index, _stream(device), options.as_tuple(), _address(z, dtype),
        tuple(z.shape), positives, _core.array(state.data_ptr(), "uint8", state.numel()),
        _f64(upstream), _core.array(scratch.data_ptr(), "uint8", scratch.numel()),
        _address(grad, "float32"),
    )
    del keep
    return grad.to(features.dtype).reshape(features.shape)


def _backward_host(options, grad_output, features, labels, mask, label_sets, state, backend):
    z, dtype, anchors, positives, keep = _prepare(options, features, labels, mask, label_sets)
    lse, lse_positive, positive_weight, meta, fingerprint_bits = _cpu_state_views(
        state.contiguous(), anchors)
    mean_denominator, has_fingerprint = meta.tolist()
    fingerprint = int(fingerprint_bits.item()) % (1 << 64) if has_fingerprint else None
    if options.reduction == "none":
        u = grad_output.to(torch.float64).contiguous()
        upstream = _f64(u)
    else:
        u = None
        upstream = float(grad_output)
    grad_dtype = torch.float64 if dtype == "float64" else torch.float32
    grad = torch.empty(z.shape, dtype=grad_dtype)
    _core.backward(
        _core.host_backend(backend, dtype), options, _address(z, dtype), tuple(z.shape),
        positives, [_f64(s) for s in (lse, lse_positive, positive_weight)], mean_denominator,
        fingerprint, upstream, _address(grad, "float64" if dtype == "float64" else "float32"),
    )
    del keep, u
    return _in_dtype(grad, features.dtype, "gradient").reshape(features.shape)


@_backward.register_fake
def _(grad_output, features, *rest):
    return torch.empty_like(features)


_OPTION_NAMES = ("temperature", "base_temperature", "contrast_mode", "summation", "denominator",
                 "positives_cap", "no_positive", "reduction", "label_set_weight", "normalize",
                 "backend")


def _setup_context(ctx, inputs, output):
    features, labels, mask, label_sets = inputs[:4]
    _, state = output
    ctx.save_for_backward(features, labels, mask, label_sets, state)
    ctx.options = inputs[4:]
    ctx.mark_non_differentiable(state)


def _autograd_backward(ctx, grad_output, _state_grad):
    saved = ctx.saved_tensors
    grad = torch.ops.supcon.backward(grad_output, *saved, *ctx.options)
    return (grad, None, None, None) + (None,) * len(_OPTION_NAMES)


torch.library.register_autograd("supcon::forward", _autograd_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "supcon: the SupCon gradient cannot be differentiated again (double backward is not "
        "supported)"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "supcon::backward", _no_double_backward, setup_context=_setup_backward_context
)


def _checked_inputs(features: torch.Tensor, labels: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor], sharded: bool):
    """A call's checked inputs: ``(labels, mask, label_sets)``, at most one of them given, on
    the features' device (label sets told apart from class labels). Under the sharded loss
    (``sharded``) the features may hold no samples, and the mask holds the rank's rows of the
    whole batch's mask, ``[B_r, B]``: its columns are checked once the ranks' sizes are
    known."""
    if features.dim() < 3:
        raise ValueError(
            "`features` needs to be [bsz, n_views, ...], at least 3 dimensions are required"
        )
    if features.dtype not in _DTYPES:
        raise ValueError(
            f"features must be float32, float16, bfloat16 or float64, got {features.dtype}"
        )
    empty = 0 in features.shape[1:] if sharded else features.numel() == 0
    if empty:
        raise ValueError(f"features have an empty dimension: shape {list(features.shape)}")
    batch = features.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    label_sets = None
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if _core.is_label_sets(labels.dim(), labels.shape, labels.dtype == torch.bool):
            if labels.shape[0] != batch:
                raise ValueError(
                    f"label sets (2-D labels) must be [{batch}, K], got {list(labels.shape)}"
                )
            # Their values (0 or 1) are checked inside the operator: here a data-dependent
            # check would break a torch.compile graph.
            label_sets, labels = labels.detach().to(features.device), None
        else:
            if labels.numel() != batch:
                raise ValueError("Num of labels does not match num of features")
            labels = labels.to(features.device)
    if mask is not None:
        if sharded:
            if mask.dim() != 2 or mask.shape[0] != batch:
                raise ValueError(
                    f"a rank's mask must be [{batch}, B], its samples' rows of the whole "
                    f"batch's mask, got {list(mask.shape)}"
                )
        elif tuple(mask.shape) != (batch, batch):
            raise ValueError(f"mask must be [{batch}, {batch}], got {list(mask.shape)}")
        mask = mask.detach().to(features.device)
    return labels, mask, label_sets


_KERNELS = "cuda"  # the shard path's backend on the CUDA kernels


def _shard_backend(backend: str, features: torch.Tensor) -> str:
    """The backend of the shard path (the sharded loss, the memory bank), chosen as on the
    single-process path: the CUDA kernels for CUDA features they take, else a host backend (on
    a host copy of CUDA features)."""
    if _on_kernels(features, backend):
        return _KERNELS
    return _core.host_backend(backend, _DTYPES.get(features.dtype, "float32"))


def _collective_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU under NCCL, else the
    host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape and dtype on every rank), in rank order, on
    ``tensor``'s device; the collective runs on the group's device."""
    sent = tensor.to(_collective_device(group))
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sent, group=group)
    return [part.to(tensor.device) for part in parts]


def _gather_rows(tensor: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Every rank's ``tensor`` (``sizes[rank]`` rows; the same trailing shape and dtype on every
    rank) concatenated in rank order. The rows travel as bytes, padded to the largest rank's
    count: one all-gather of equal shapes carries ragged sizes and any dtype (bool and bfloat16
    included, which not every backend reduces or gathers)."""
    width = math.prod(tensor.shape[1:])
    shape = (sum(sizes), *tensor.shape[1:])
    if width == 0:
        return tensor.new_empty(shape)
    # Flattened first: a [n, 1] tensor may count as contiguous with a stride other than 1.
    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    data = data.reshape(tensor.shape[0], width * tensor.element_size())
    padded = data.new_zeros((max(sizes), data.shape[1]))
    padded[: data.shape[0]] = data
    parts = _all_gather(padded, group)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return gathered.view(tensor.dtype).reshape(shape)


_KINDS = ("simclr", "labels", "mask", "label_sets")


def _agree(group, features: torch.Tensor, kind: str, rows: Optional[torch.Tensor],
           problem: Optional[ValueError]) -> List[int]:
    """Every rank's number of samples, once the ranks have checked that they agree: one
    all-gather of a header per rank (whether its inputs are valid, B_r, V, D, the kind of
    positives, their width (the mask's columns, the label sets' classes) and the dtype).
    Every rank sees every header, so where one rank's inputs are wrong or the ranks disagree,
    all of them raise a ValueError, rather than some waiting in a later collective."""
    if problem is None:
        width = 0 if rows is None or kind == "labels" else rows.shape[1]
        header = [1, features.shape[0], features.shape[1], math.prod(features.shape[2:]),
                  _KINDS.index(kind), width, list(_DTYPES).index(features.dtype)]
    else:
        header = [0] * 7
    headers = [part.tolist() for part in _all_gather(torch.tensor(header, dtype=torch.int64), group)]
    if problem is not None:
        raise problem
    failed = [rank for rank, other in enumerate(headers) if not other[0]]
    if failed:
        raise ValueError(
            f"the sharded loss's inputs are invalid on rank(s) {failed} (each raises its error)"
        )
    if any(other[2:] != header[2:] for other in headers):
        described = "; ".join(
            f"rank {rank}: V={other[2]}, D={other[3]}, {_KINDS[other[4]]} of width "
            f"{other[5]}, {list(_DTYPES)[other[6]]}" for rank, other in enumerate(headers)
        )
        raise ValueError(
            f"the ranks' features and positives must agree in views, dim, kind of positives, "
            f"their width and dtype: {described}"
        )
    sizes = [other[1] for other in headers]
    batch = sum(sizes)
    if batch == 0:
        raise ValueError("no rank has samples: the whole batch is empty")
    if kind == "mask" and header[5] != batch:
        raise ValueError(
            f"each rank's mask must be [B_r, {batch}], its rows of the whole batch's mask, "
            f"got {header[5]} columns"
        )
    return sizes


class _Group:
    """The sharded loss's exchange over a process group: each rank's samples are its shard of
    the ranks' samples concatenated in rank order."""

    def __init__(self, group, sizes: List[int]) -> None:
        self.group, self.sizes = group, sizes
        starts = [sum(sizes[:rank]) for rank in range(len(sizes))]
        self.shards = [(start, start + size) for start, size in zip(starts, sizes)]
        self.samples = self.shards[dist.get_rank(group)]

    def batch(self, z: torch.Tensor, rows: Optional[torch.Tensor]):
        """The whole batch: every rank's features and positives' rows, gathered."""
        gathered = None if rows is None else _gather_rows(rows, self.sizes, self.group)
        return _gather_rows(z, self.sizes, self.group), gathered

    def gather(self, values: torch.Tensor):
        """Every shard's ``values`` (one row per sample of the shard) as ``(b0, b1, rows)``,
        for each shard that has samples."""
        gathered = _gather_rows(values, self.sizes, self.group)
        return [(b0, b1, gathered[b0:b1]) for b0, b1 in self.shards if b1 > b0]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``value`` (float64), on ``value``'s device."""
        total = value.to(_collective_device(self.group))
        dist.all_reduce(total, group=self.group)
        return total.to(value.device)


class _Appended:
    """The memory bank's exchange: the bank's samples (``features``, ``rows`` of positives:
    lists of parts, oldest first) follow the batch's, which are the one shard."""

    def __init__(self, batch: int, features: List[torch.Tensor],
                 rows: List[torch.Tensor]) -> None:
        self.features, self.rows = features, rows
        self.samples = (0, batch)

    def batch(self, z: torch.Tensor, rows: Optional[torch.Tensor]):
        """The batch followed by the bank, on the batch's device, in its dtypes."""
        bank = [part.to(z.device, z.dtype) for part in self.features]
        if rows is not None:
            rows = torch.cat([rows, *(part.to(rows.device, rows.dtype) for part in self.rows)])
        return torch.cat([z, *bank]), rows

    def gather(self, values: torch.Tensor):
        """The one shard's ``values``, as ``_Group.gather`` gives them."""
        return [(0, values.shape[0], values)]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The one shard's ``value``: its upstream gradient is the whole batch's."""
        return value


class _ShardedLoss(torch.autograd.Function):
    """The loss of one shard of a whole batch that ``exchange`` puts together (a process
    group's samples, or a batch and a memory bank): the statistics of the shard's samples
    against the whole batch, the shards' statistics assembled (every shard gets the whole
    batch's loss), and in the backward the shard's rows of the gradient from the whole batch's
    state. It keeps the whole batch's features and positives (O(N·D)) and the O(N) state.
    On the host backends the state is ``forward_shard``'s statistics assembled by
    ``assemble``; on the CUDA kernels it is a workspace of the whole batch on the device
    (``_forward_kernels``)."""

    @staticmethod
    def forward(ctx, features, kind, rows, options, backend, exchange):
        """``kind`` and ``rows``: the positives of ``features``' samples (``_positive_rows``)."""
        ctx.options, ctx.backend, ctx.exchange, ctx.kind = options, backend, exchange, kind
        ctx.features = (features.shape, features.dtype, features.device)
        if backend == _KERNELS:
            return _ShardedLoss._forward_kernels(ctx, features, rows)
        z, rows = exchange.batch(_as_batch(_host(features)), _host(rows))
        shape = tuple(z.shape)
        views = options.anchors(1, shape[1])  # anchor views: V under "all", 1 under "one"
        b0, b1 = exchange.samples
        dtype = _DTYPES[z.dtype]
        positives = _as_positives(kind, rows, options.label_set_weight)
        # ℓ, LSE, LSE^P and P of the shard's anchors, in shard order: [views, b1 - b0] each.
        own = torch.empty(4, views, b1 - b0, dtype=torch.float64)
        if b1 > b0:
            _core.forward_shard(backend, options, _address(z, dtype), shape, positives,
                                (b0, b1), [_f64(part) for part in own])
        shards = [(s0, s1, values.permute(1, 2, 0).contiguous())
                  for s0, s1, values in exchange.gather(own.permute(2, 0, 1))]
        per_anchor = torch.empty(views * shape[0], dtype=torch.float64)
        state = torch.empty(3, views * shape[0], dtype=torch.float64)
        statistics = [(s0, s1, [_f64(part) for part in values]) for s0, s1, values in shards]
        loss, mean_denominator = _core.assemble(options, shape, statistics, _f64(per_anchor),
                                                [_f64(part) for part in state])
        ctx.batch, ctx.rows, ctx.state = z, rows, state
        ctx.mean_denominator, ctx.views = mean_denominator, views
        if options.reduction == "none":
            output = per_anchor.view(views, shape[0])[:, b0:b1].reshape(-1)
        else:
            output = torch.tensor(loss, dtype=torch.float64)
        return _in_dtype(output, features.dtype, "loss").to(features.device)

    @staticmethod
    def _forward_kernels(ctx, features, rows):
        """The forward pass on the CUDA kernels, on the features' device and PyTorch's current
        stream: the whole batch gathered on the device; the shard's anchors' statistics
        written into a workspace of the whole batch (``forward_cuda`` with ``samples``);
        every shard's entries of the nine per-anchor statistics gathered into it; the loss
        reduced there (``finalize_cuda``), the same bits on every rank. Nothing is read back
        except under the no-positive policy ``error``."""
        options, exchange = ctx.options, ctx.exchange
        z, rows = exchange.batch(_as_batch(features.detach()), rows)
        shape, device, dtype = tuple(z.shape), z.device, _DTYPES[z.dtype]
        views = options.anchors(1, shape[1])
        anchors = views * shape[0]
        b0, b1 = exchange.samples
        set_classes = rows.shape[1] if ctx.kind == "label_sets" else None
        cuda_options = options.as_tuple()
        size, loss_offset, per_anchor_offset, count_offset, _, stride = _supcon.cuda_workspace(
            cuda_options, shape, set_classes)
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
        positives = _as_positives(ctx.kind, rows, options.label_set_weight)
        stream = _stream(device)
        workspace_array = _core.array(workspace.data_ptr(), "uint8", size)
        if b1 > b0:
            _supcon.forward_cuda(device.index, stream, cuda_options, _address(z, dtype), shape,
                                 positives, workspace_array, (b0, b1))
        # The nine float32[R] statistics, every `stride` bytes: [9, views, B] (anchor v·B + b).
        statistics = workspace[per_anchor_offset : per_anchor_offset + 9 * stride]
        statistics = statistics.view(torch.float32).view(9, stride // 4)[:, :anchors]
        statistics = statistics.view(9, views, shape[0])
        own = statistics[:, :, b0:b1].permute(2, 0, 1).contiguous()  # a row per sample
        for s0, s1, values in exchange.gather(own):
            statistics[:, :, s0:s1] = values.permute(1, 2, 0)
        _supcon.finalize_cuda(device.index, stream, cuda_options, shape, set_classes,
                              workspace_array)
        _check_positives(options, workspace, count_offset, per_anchor_offset, anchors)
        ctx.batch, ctx.rows, ctx.state, ctx.views = z, rows, workspace, views
        if options.reduction == "none":
            output = statistics[0, :, b0:b1].reshape(-1)
        else:
            output = workspace[loss_offset : loss_offset + 8].view(torch.float64)[0]
        # A copy: the workspace is the backward's state.
        return output.to(features.dtype, copy=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        options, z, views = ctx.options, ctx.batch, ctx.views
        b0, b1 = ctx.exchange.samples
        anchors = views * z.shape[0]
        device = z.device
        if options.reduction == "none":
            # Every shard's upstream values, placed at the whole batch's anchor rows.
            u = grad_output.detach().to(device, torch.float64).reshape(views, b1 - b0)
            placed = torch.zeros(views, z.shape[0], dtype=torch.float64, device=device)
            for s0, s1, values in ctx.exchange.gather(u.T.contiguous()):
                placed[:, s0:s1] = values.T
            placed = placed.reshape(-1)
        else:
            total = grad_output.detach().to(device, torch.float64).reshape(1)
            placed = ctx.exchange.sum(total)
        dtype = _DTYPES[z.dtype]
        grad_dtype = "float64" if dtype == "float64" else "float32"
        grad = torch.empty((b1 - b0, *z.shape[1:]), dtype=getattr(torch, grad_dtype),
                           device=device)
        positives = _as_positives(ctx.kind, ctx.rows, options.label_set_weight)
        if b1 > b0 and ctx.backend == _KERNELS:
            upstream = placed.expand(anchors).contiguous()
            scratch = torch.empty(4 * anchors, dtype=torch.uint8, device=device)
            _supcon.backward_cuda(
                device.index, _stream(device), options.as_tuple(), _address(z, dtype),
                tuple(z.shape), positives,
                _core.array(ctx.state.data_ptr(), "uint8", ctx.state.numel()), _f64(upstream),
                _core.array(scratch.data_ptr(), "uint8", scratch.numel()),
                _address(grad, "float32"), (b0, b1),
            )
        elif b1 > b0:
            upstream = _f64(placed) if options.reduction == "none" else float(placed)
            _core.backward_shard(
                ctx.backend, options, _address(z, dtype), tuple(z.shape), positives,
                [_f64(part) for part in ctx.state], ctx.mean_denominator, upstream, (b0, b1),
                _address(grad, grad_dtype),
            )
        shape, features_dtype, features_device = ctx.features
        if ctx.backend == _KERNELS:
            grad = grad.to(features_dtype)
        else:
            grad = _in_dtype(grad, features_dtype, "gradient")
        grad = grad.reshape(shape).to(features_device)
        return grad, None, None, None, None, None


def _sharded_loss(features, labels, mask, options, backend, process_group):
    """This rank's part of the sharded loss (see :class:`SupConLoss`) over ``process_group``
    (``None``: the default group). The ranks agree on their inputs before anything else, so
    that a bad input raises on every rank."""
    backend = _shard_backend(backend, features)
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs torch.distributed's default process group: call "
                "torch.distributed.init_process_group first"
            )
        process_group = dist.group.WORLD
    kind, rows, problem = "simclr", None, None
    try:
        labels, mask, label_sets = _checked_inputs(features, labels, mask, sharded=True)
        # Label sets' values are checked here, before the ranks agree, like their shape.
        kind, rows = _positive_rows(labels, mask, label_sets)
    except ValueError as error:
        problem = error
    sizes = _agree(process_group, features, kind, rows, problem)
    return _ShardedLoss.apply(features, kind, rows, options, backend,
                              _Group(process_group, sizes))


def supcon_loss(
    features: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
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
    backend: str = "auto",
    process_group=None,
    distributed: bool = False,
    memory_bank: Optional["MemoryBank"] = None,
) -> torch.Tensor:
    """The SupCon loss of ``features`` ``[bsz, n_views, ...]``; see :class:`SupConLoss` for
    the arguments (``labels`` as class labels or, 2-D, as label sets), the options, the sharded
    loss (``process_group``, ``distributed``) and ``memory_bank``."""
    options = _core.Options(temperature, base_temperature, contrast_mode, summation,
                            denominator, positives_cap, no_positive, reduction,
                            label_set_weight, normalize)
    _core.check_backend(backend)
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True or False, got {distributed!r}")
    sharded = distributed or process_group is not None
    if memory_bank is not None and sharded:
        raise ValueError("a memory bank with the sharded loss is not supported yet")
    if sharded:
        return _sharded_loss(features, labels, mask, options, backend, process_group)
    given_labels = labels
    labels, mask, label_sets = _checked_inputs(features, labels, mask, sharded=False)
    if memory_bank is not None:
        if mask is not None:
            raise ValueError(
                "a memory bank takes labels, label sets or neither (SimCLR), not a mask: its "
                "samples have no mask columns"
            )
        # Checked before the loss, so that a batch the bank refuses leaves everything as it was.
        entries = memory_bank._entries(features, given_labels)
        kind, rows = _positive_rows(labels, None, label_sets)
        loss = _ShardedLoss.apply(
            features, kind, rows, options, _shard_backend(backend, features),
            _Appended(features.shape[0], *memory_bank._contents()),
        )
        memory_bank._write(*entries)
        return loss
    # [B, V, D], contiguous: a view of contiguous features, else their one copy (autograd
    # carries the gradient back through it), which the backward pass then reads in place too.
    output, _state = torch.ops.supcon.forward(
        _as_batch(features), labels, mask, label_sets, float(options.temperature),
        float(options.base_temperature), options.contrast_mode, options.summation,
        options.denominator, _NO_CAP if options.positives_cap is None else options.positives_cap,
        options.no_positive, options.reduction, options.label_set_weight, options.normalize,
        backend,
    )
    return output


class SupConLoss(torch.nn.Module):
    """Supervised Contrastive Learning (https://arxiv.org/abs/2004.11362), also SimCLR: a
    drop-in replacement for the original ``SupConLoss`` with the same constructor and
    ``forward(features, labels=None, mask=None)``.

    ``features`` is ``[bsz, n_views, ...]`` (trailing dimensions are flattened). Positives come
    from one of:

    - ``labels``: class labels, ``[bsz]`` integers (any shape of bsz elements, ``[bsz, 1]``
      included, as the original takes them);
    - ``labels`` as label sets, multi-hot ``[bsz, K]`` (values 0 or 1, any integer or bool
      dtype, any K ≥ 0; docs/math.md, "Label sets"): a 2-D tensor with K ≠ 1, or any 2-D bool
      tensor. (A ``[bsz, 1]`` tensor of another dtype stays class labels, for compatibility
      with the original.) The other views of a sample weigh 1; two different samples weigh by
      how their sets overlap, as ``label_set_weight`` says: ``"any"`` (1 if they share a
      label), ``"jaccard"`` (|Y_i ∩ Y_j| / |Y_i ∪ Y_j|) or ``"fraction"``
      (|Y_i ∩ Y_j| / |Y_i|, asymmetric);
    - ``mask``, ``[bsz, bsz]`` weights;
    - neither (SimCLR: only the other views of a sample are positives).

    The keyword-only options go beyond the original (docs/math.md): ``summation``
    (``"outside"``, the paper's L_out, or ``"inside"``), ``denominator`` (``"all"``,
    ``"only_negatives"``, ``"one_positive"``), ``positives_cap``, ``no_positive``
    (``"zero_and_count"`` as the original, ``"exclude"``, ``"error"``), ``reduction``
    (``"mean"``, ``"sum"``, ``"none"`` for one loss per anchor), ``label_set_weight`` (above;
    used only with label sets), ``normalize`` (``True``: the loss of
    ``torch.nn.functional.normalize(features, dim=-1)``, fused, with the exact gradient with
    respect to the raw features) and ``backend`` (``"auto"``, ``"cpu"``, ``"reference"``,
    ``"cuda"``).

    Where the original is finite, the loss and gradient are the same; where it returns NaN
    (un-normalised features, small temperatures), this one stays finite.

    **Sharded over ranks** (``distributed=True``: the default ``torch.distributed`` group;
    ``process_group=g``: the group g). Each rank passes its own samples: features
    ``[B_r, V, ...]`` (B_r may differ between ranks, 0 included) and labels ``[B_r]``, label
    sets ``[B_r, K]``, its rows of the whole batch's mask ``[B_r, B]`` (columns in the
    concatenated order) or nothing (SimCLR). The loss is exactly one process's on the ranks'
    samples concatenated in rank order: every rank returns the whole batch's reduced loss, or
    under ``reduction="none"`` ℓ of its own anchors in shard order (for each anchor view v, the
    rank's samples b in order: the entries v·B + b of the one-process result). The forward
    all-gathers the features and positives (kept for the backward: O(N·D)) and 4 doubles per
    anchor; the backward all-reduces the upstream gradient (all-gathers it under reduction
    none) and computes only this rank's rows of the gradient. Every rank must call the forward
    and the backward pass (they run collectives; so features require a gradient on every rank,
    one without samples included, or on none), with the same options. Where a rank's inputs
    are invalid, or the ranks' V, D, dtype or kind of positives differ, every rank raises a
    ValueError. CUDA tensors run the kernels on the device: the batch is gathered there, each
    rank writes its anchors' statistics into a workspace of the whole batch, the workspaces are
    completed with one all-gather and the loss reduced on the device, nothing read back. The
    collectives run on the group's device (the GPU under NCCL, the host under gloo, with a
    copy each way).

    The gradient is that of the sum of every rank's objective. For a reduced loss L that is
    Σ_r u_r·L, with u_r rank r's upstream gradient (1 for a plain ``loss.backward()``): rank r
    gets its rows of (Σ_r u_r)·∂L/∂Z, which is W·∂L/∂Z when each of W ranks calls
    ``loss.backward()``. ``DistributedDataParallel`` averages the parameter gradients over the
    W ranks, dividing by W, so a plain ``loss.backward()`` under DDP gives exactly the
    one-process gradient of the whole batch's loss: do not scale the loss by the world size.

    **Memory bank** (``forward(..., memory_bank=bank)``, a :class:`MemoryBank`): the anchors
    are the batch's, the contrasts the batch's rows followed by the bank's (oldest first), with
    positives by the same rule (labels, label sets or SimCLR). The bank's samples are contrasts
    only: not anchors, not counted in the mean, and without gradient. The batch joins the bank
    after its loss is computed, as pytorch-metric-learning's CrossBatchMemory does.
    ``reduction="none"`` returns ℓ of the batch's anchors in the usual order. A mask, or a
    memory bank with the sharded loss (not supported yet), raises ValueError. On CUDA tensors
    the loss runs the host backends on a host copy.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        *,
        summation: str = "outside",
        denominator: str = "all",
        positives_cap: Optional[int] = None,
        no_positive: str = "zero_and_count",
        reduction: str = "mean",
        label_set_weight: str = "any",
        normalize: bool = False,
        backend: str = "auto",
        process_group=None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        # Checked now, so that a bad option fails at construction, not in the training loop.
        _core.Options(temperature, base_temperature, contrast_mode, summation, denominator,
                      positives_cap, no_positive, reduction, label_set_weight, normalize)
        _core.check_backend(backend)
        if not isinstance(distributed, bool):
            raise ValueError(f"distributed must be True or False, got {distributed!r}")
        # The group is looked up at each call, so that a module may be made before
        # torch.distributed.init_process_group runs.
        self.process_group = process_group
        self.distributed = distributed
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.summation = summation
        self.denominator = denominator
        self.positives_cap = positives_cap
        self.no_positive = no_positive
        self.reduction = reduction
        self.label_set_weight = label_set_weight
        self.normalize = normalize
        self.backend = backend

    def forward(
        self,
        features: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        *,
        memory_bank: Optional["MemoryBank"] = None,
    ) -> torch.Tensor:
        return supcon_loss(
            features, labels, mask, temperature=self.temperature,
            contrast_mode=self.contrast_mode, base_temperature=self.base_temperature,
            summation=self.summation, denominator=self.denominator,
            positives_cap=self.positives_cap, no_positive=self.no_positive,
            reduction=self.reduction, label_set_weight=self.label_set_weight,
            normalize=self.normalize, backend=self.backend, process_group=self.process_group,
            distributed=self.distributed, memory_bank=memory_bank,
        )

    def backend_for(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> str:
        """The backend that a call on ``features`` runs: ``"cuda"`` (the kernels), ``"cpu"``
        or ``"reference"`` (host backends, on a host copy of CUDA features). ``labels`` does
        not change it (label sets run on the kernels too); it is kept for the callers that
        pass it."""
        del labels
        if _on_kernels(features, self.backend):
            return "cuda"
        return _core.host_backend(self.backend, _DTYPES.get(features.dtype, "float32"))

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
            f"base_temperature={self.base_temperature}, summation={self.summation!r}, "
            f"denominator={self.denominator!r}, positives_cap={self.positives_cap}, "
            f"no_positive={self.no_positive!r}, reduction={self.reduction!r}, "
            f"label_set_weight={self.label_set_weight!r}, normalize={self.normalize}, "
            f"backend={self.backend!r}, "
            f"distributed={self.distributed or self.process_group is not None}"
        )


class MemoryBank:
    """A FIFO memory bank of past embeddings, the extra contrasts of
    ``SupConLoss.forward(..., memory_bank=bank)``: up to ``size`` samples, each ``[V, dim]``
    detached features with its labels or label sets (a bank holds one kind of positives; a
    SimCLR bank holds none).

    ``push(features, labels=None)`` appends a batch ``[n, V, ...]`` (trailing dimensions
    flattened to ``dim``); when the bank is full the oldest samples drop out, and a push of more
    than ``size`` samples keeps its newest ``size``. The first push fixes V, the kind of
    positives (and the label sets' K), the dtype and the device; later pushes with another V,
    dim or kind raise ValueError, and their values are converted to the bank's dtype and
    device. ``features`` and ``labels`` are copies of the contents, oldest first (``None``
    before the first push, and ``labels`` of a SimCLR bank). ``clear()`` empties the bank and
    keeps what the first push fixed.

    The storage is one ring buffer, allocated by the first push: a push writes its samples in
    place of the oldest (wrapping around the end), without reallocating or concatenating.
    """

    def __init__(self, size: int, dim: int) -> None:
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        self.size, self.dim = size, dim
        self._features: Optional[torch.Tensor] = None  # [size, V, dim], from the first push
        self._labels: Optional[torch.Tensor] = None  # [size] int64 or [size, K] bool
        self._kind: Optional[str] = None  # "simclr", "labels" or "label_sets"
        self._start = 0  # the slot of the oldest sample
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def features(self) -> Optional[torch.Tensor]:
        """The bank's features, ``[len(bank), V, dim]``, oldest first."""
        return None if self._features is None else torch.cat(self._parts(self._features))

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The bank's labels (``[len(bank)]``) or label sets (``[len(bank), K]``, bool),
        oldest first; ``None`` for a SimCLR bank."""
        return None if self._labels is None else torch.cat(self._parts(self._labels))

    def push(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Appends the samples of ``features`` ``[n, V, ...]`` (detached) and their labels
        (``[n]``), label sets (``[n, K]``) or nothing (a SimCLR bank)."""
        self._write(*self._entries(features, labels))

    def clear(self) -> None:
        """Empties the bank."""
        self._start = self._count = 0

    def _entries(self, features: torch.Tensor, labels: Optional[torch.Tensor]):
        """A push's samples as ``([n, V, dim] features, their positives' rows or None, kind)``,
        checked against what the bank holds."""
        if features.dim() < 3 or math.prod(features.shape[2:]) != self.dim:
            raise ValueError(
                f"the bank holds [n, V, {self.dim}] features (trailing dimensions flattened), "
                f"got {list(features.shape)}"
            )
        n, views = features.shape[0], features.shape[1]
        z = features.detach().reshape(n, views, self.dim)
        if labels is None:
            kind, rows = "simclr", None
        else:
            if labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"labels must be integers, got {labels.dtype}")
            is_sets = _core.is_label_sets(labels.dim(), labels.shape, labels.dtype == torch.bool)
            if (labels.shape[0] if is_sets else labels.numel()) != n:
                raise ValueError(f"the bank needs one label or label set per sample, got "
                                 f"{list(labels.shape)} for {n} samples")
            kind, rows = _positive_rows(None if is_sets else labels.detach(), None,
                                        labels.detach() if is_sets else None)
        if self._features is not None:
            held = self._features.shape[1]
            if views != held:
                raise ValueError(f"the bank holds samples of {held} views, got {views}")
            if kind != self._kind:
                raise ValueError(f"the bank holds {self._kind} positives, got {kind}")
            if kind == "label_sets" and rows.shape[1] != self._labels.shape[1]:
                raise ValueError(f"the bank holds label sets of {self._labels.shape[1]} "
                                 f"classes, got {rows.shape[1]}")
        return z, rows, kind

    def _write(self, z: torch.Tensor, rows: Optional[torch.Tensor], kind: str) -> None:
        if self._features is None:
            self._features = z.new_empty((self.size, *z.shape[1:]))
            if rows is not None:
                self._labels = torch.empty((self.size, *rows.shape[1:]), dtype=rows.dtype,
                                           device=z.device)
            self._kind = kind
        # Only the newest `size` samples of a push can stay.
        n = min(z.shape[0], self.size)
        z = z[z.shape[0] - n:]
        rows = None if rows is None else rows[rows.shape[0] - n:]
        free = (self._start + self._count) % self.size  # the first free slot, or the oldest
        first = min(n, self.size - free)  # what fits before the end; the rest wraps to slot 0
        for buffer, values in ((self._features, z), (self._labels, rows)):
            if values is not None:
                buffer[free:free + first] = values[:first]
                buffer[:n - first] = values[first:]
        dropped = max(0, self._count + n - self.size)
        self._start = (self._start + dropped) % self.size
        self._count = min(self.size, self._count + n)

    def _parts(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        """The held part of a ring buffer as one or two views, oldest first."""
        end = self._start + self._count
        if end <= self.size:
            return [buffer[self._start:end]]
        return [buffer[self._start:], buffer[:end - self.size]]

    def _contents(self):
        """The features' and the positives' rows as lists of parts, oldest first."""
        if self._features is None:
            return [], []
        labels = [] if self._labels is None else self._parts(self._labels)
        return self._parts(self._features), labels
