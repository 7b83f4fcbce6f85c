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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _core, _supcon

__all__ = ["SupConLoss", "supcon_loss"]

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
    """[bsz, n_views, ...] as a contiguous [B, V, D] tensor (a view where it already is one)."""
    return features.reshape(features.shape[0], features.shape[1], -1).contiguous()


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


def _positives(labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               label_sets: Optional[torch.Tensor], label_set_weight: str):
    """The positives as the extension takes them, and the tensors that must stay alive."""
    if label_sets is not None:
        sets = _memberships(label_sets)
        return ("label_sets", _address(sets, "bool"), label_set_weight), sets
    if labels is not None:
        labels = labels.reshape(-1).to(torch.int64).contiguous()
        return ("labels", _address(labels, "int64"), None), labels
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
        return ("mask", _address(mask, "float32"), None), mask
    return ("simclr", None, None), None


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
    size, loss_offset, per_anchor_offset, count_offset, _ = _supcon.cuda_workspace(
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
    if options.no_positive == "error":
        # The policy's error needs the count on the host: the one synchronisation of a step.
        count = int(workspace[count_offset : count_offset + 4].view(torch.int32).item())
        if count:
            weights = workspace[per_anchor_offset + 5 * _region(anchors):].view(torch.float32)[:anchors]
            first = int(torch.nonzero(weights <= 0)[0].item())
            raise ValueError(f"anchor row {first} has no positive (NoPositivePolicy::Error)")
    if options.reduction == "none":
        per_anchor = workspace[per_anchor_offset : per_anchor_offset + 4 * anchors]
        return per_anchor.view(torch.float32).to(features.dtype), workspace
    loss = workspace[loss_offset : loss_offset + 8].view(torch.float64)[0]
    return loss.to(features.dtype), workspace


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
) -> torch.Tensor:
    """The SupCon loss of ``features`` ``[bsz, n_views, ...]``; see :class:`SupConLoss` for
    the arguments (``labels`` as class labels or, 2-D, as label sets) and options."""
    options = _core.Options(temperature, base_temperature, contrast_mode, summation,
                            denominator, positives_cap, no_positive, reduction,
                            label_set_weight, normalize)
    _core.check_backend(backend)
    if features.dim() < 3:
        raise ValueError(
            "`features` needs to be [bsz, n_views, ...], at least 3 dimensions are required"
        )
    if features.dtype not in _DTYPES:
        raise ValueError(
            f"features must be float32, float16, bfloat16 or float64, got {features.dtype}"
        )
    if features.numel() == 0:
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
        if tuple(mask.shape) != (batch, batch):
            raise ValueError(f"mask must be [{batch}, {batch}], got {list(mask.shape)}")
        mask = mask.detach().to(features.device)
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
    ) -> None:
        super().__init__()
        # Checked now, so that a bad option fails at construction, not in the training loop.
        _core.Options(temperature, base_temperature, contrast_mode, summation, denominator,
                      positives_cap, no_positive, reduction, label_set_weight, normalize)
        _core.check_backend(backend)
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
    ) -> torch.Tensor:
        return supcon_loss(
            features, labels, mask, temperature=self.temperature,
            contrast_mode=self.contrast_mode, base_temperature=self.base_temperature,
            summation=self.summation, denominator=self.denominator,
            positives_cap=self.positives_cap, no_positive=self.no_positive,
            reduction=self.reduction, label_set_weight=self.label_set_weight,
            normalize=self.normalize, backend=self.backend,
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
            f"backend={self.backend!r}"
        )
