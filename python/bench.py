#!/usr/bin/env python3
"""Forward+backward time and peak memory of the SupCon loss: PyTorch baselines against
``supcon.torch.SupConLoss``, in one run so that the ratios are comparable.

Variants, all on the same L2-normalised float32 features ``[N/2, 2, D]`` with labels of
``--classes`` classes (contrast mode "all", summation outside, tau = base tau = 0.07):

- ``original``: the math of the original ``SupConLoss.forward`` (Khosla et al.'s SupContrast
  code, with its Dec 2023 fix for anchors without positives) written out: N x N logits, the row
  max (self included) subtracted, ``logits_mask``, the label mask tiled ``V x V``, ``log_prob``,
  ``mean_log_prob_pos``, the loss; autograd for the backward.
- ``lean``: a masked log-sum-exp in PyTorch: N x N logits with the diagonal set to -inf,
  ``torch.logsumexp``, positives by label equality; autograd.
- ``supcon``: ``supcon.torch.SupConLoss`` (the crate's fused kernels; nothing N x N).
- with ``--compile``: ``torch.compile`` of ``original`` and ``lean`` too (meant for GPU runs;
  on CPU it needs a C++ compiler and compiles once per cell).

Time: the median of the timed calls after one full-size warm-up call: ``--repeats`` of them,
more (up to 50) while they add up to less than a second, fewer (at least one) once the cell has
taken ``--cap-s``. Peak memory, of the full-size calls
(the gradient included; one-off costs such as thread pools left out by a first call on a tiny
batch): on CPU each (variant, N) cell runs in a fresh child process, which resets its peak RSS
(``/proc/self/clear_refs``) once the inputs exist and reports VmHWM minus VmRSS at that point,
i.e. what the calls add on top of the inputs; on CUDA the cells run in this process and report
``torch.cuda.max_memory_allocated`` minus the memory allocated before the calls. A child's
address space is capped near the memory available, so that running out of memory is a clean
``OOM`` in the table (and larger N are skipped for that variant) rather than the kernel's OOM
killer.

Also: a check at N = 512 that the three variants agree on the loss (relative 1e-4), and the
per-call overhead of the Python front ends at N = 512 and N = 2 (where the arithmetic is
negligible, so the time is the fixed cost of one call).

Threads: ``--threads`` (default 2) sets ``torch.set_num_threads`` and ``RAYON_NUM_THREADS``
(the crate's pool, read when the extension first runs; set here before ``supcon`` is imported).

Usage: ``python python/bench.py [--device cpu|cuda] [--sizes 2048,4096,8192,16384]
[--threads 2] [--compile]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time


def _early_threads(argv) -> str:
    """The --threads value, read before torch, numpy and supcon start their thread pools."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "2"


# This script sits next to the package's sources (python/supcon, without the compiled
# extension): import the installed package, not that folder. (An editable install still
# puts python/ on the path through its .pth entry.)
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

_THREADS = _early_threads(sys.argv[1:])
for _name in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = _THREADS

import torch  # noqa: E402

import supcon  # noqa: E402
import supcon.torch  # noqa: E402

TAU = 0.07
DIM = 128
VIEWS = 2


# ----------------------------------------------------------------------------- the variants

def supcon_original(features, labels, temperature=TAU, base_temperature=TAU):
    """The original SupConLoss.forward, contrast mode "all", with labels."""
    device = features.device
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float().to(device)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature = contrast_feature
    anchor_count = contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    # for numerical stability
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1,
        torch.arange(batch_size * anchor_count).view(-1, 1).to(device), 0,
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, torch.ones_like(mask_pos_pairs),
                                 mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def supcon_lean(features, labels, temperature=TAU, base_temperature=TAU):
    """The same loss as a masked log-sum-exp: one N x N logits matrix (diagonal -inf), an N x N
    boolean positive mask, and what autograd keeps for them."""
    views = features.shape[1]
    z = torch.cat(torch.unbind(features, dim=1), dim=0)  # [N, D], view-major as the original
    rows = labels.reshape(-1).repeat(views)  # [N]
    logits = torch.matmul(z, z.T).div_(temperature)
    logits.fill_diagonal_(float("-inf"))
    lse = torch.logsumexp(logits, dim=1)  # over all j != i
    positive = rows[:, None] == rows[None, :]
    positive.fill_diagonal_(False)
    count = positive.sum(1)
    positive_logits = torch.where(positive, logits, torch.zeros((), dtype=logits.dtype,
                                                                  device=logits.device)).sum(1)
    # sum_p (s_ip - lse_i) / |P(i)|; anchors without positives contribute 0 (as the original).
    mean_log_prob_pos = (positive_logits - count * lse) / count.clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


_SUPCON_MODULE = supcon.torch.SupConLoss(temperature=TAU, base_temperature=TAU)


def supcon_fused(features, labels):
    return _SUPCON_MODULE(features, labels)


_COMPILED = {}


def variant_function(name: str):
    if name == "supcon":
        return supcon_fused
    base, _, compiled = name.partition("+")
    function = {"original": supcon_original, "lean": supcon_lean}[base]
    if compiled:
        # dynamic=True: one compilation serves every N (and the tiny warm-up batch).
        if base not in _COMPILED:
            _COMPILED[base] = torch.compile(function, dynamic=True)
        function = _COMPILED[base]
    return function


def variant_names(compile_baselines: bool):
    names = ["original", "lean"]
    if compile_baselines:
        names += ["original+compile", "lean+compile"]
    return names + ["supcon"]


# ----------------------------------------------------------------------------- measurement

def make_batch(rows: int, classes: int, device: str, seed: int):
    """L2-normalised float32 features [N/2, 2, D] and int64 labels [N/2], the same per seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    features = torch.randn(rows // VIEWS, VIEWS, DIM, generator=generator)
    features = torch.nn.functional.normalize(features, dim=2)
    labels = torch.randint(0, classes, (rows // VIEWS,), generator=generator)
    return features.to(device), labels.to(device)


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return (isinstance(error, MemoryError) or "out of memory" in text
            or "not enough memory" in text or "can't allocate memory" in text
            or type(error).__name__ == "OutOfMemoryError")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(function, features, labels, device: str, repeats: int, cap_s: float) -> dict:
    """Median fwd+bwd seconds after a warm-up, and the peak extra memory of the calls."""

    def step(x):
        x.grad = None
        function(x, labels[:x.shape[0]]).backward()

    # A call on a tiny batch first: one-off costs (thread pools, dispatch caches, compilation
    # for dynamic shapes) are then left out of the peak.
    step(features[:32].detach().requires_grad_())
    _synchronize(device)
    gc.collect()
    x = features.detach().requires_grad_()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_reset = _reset_peak_rss()
        base = _status_kib("VmRSS")
    start = time.perf_counter()
    step(x)  # the full-size warm-up: its fresh pages make the RSS peak a true one
    _synchronize(device)
    first = time.perf_counter() - start
    times = []
    while not times or (first + sum(times) < cap_s
                        and (len(times) < repeats or (sum(times) < 1.0 and len(times) < 50))):
        start = time.perf_counter()
        step(x)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_status_kib("VmHWM") - base) / 1024 if base_reset else float("nan")
    seconds = sorted(times)[len(times) // 2]
    return {"status": "ok", "ms": seconds * 1e3, "peak_mb": peak_mb, "calls": len(times),
            "warmup_ms": first * 1e3}


def run_cell(name: str, rows: int, args) -> dict:
    """One (variant, N) measurement in this process."""
    features = labels = None
    try:
        function = variant_function(name)
        features, labels = make_batch(rows, args.classes, args.device, seed=rows)
        return measure(function, features, labels, args.device, args.repeats, args.cap_s)
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            return {"status": "OOM"}
        return {"status": "error", "message": str(error).splitlines()[0][:120]}
    finally:
        features = labels = None
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _cap_address_space() -> None:
    """Caps this child's address space at its current size plus ~90 % of the memory available,
    so that an allocation past it fails (a clean OOM) before the kernel's OOM killer acts."""
    import resource

    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) for line in meminfo
                         if line.startswith("MemAvailable:"))
    limit = (_status_kib("VmSize") + int(available * 0.9)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def child_main(args) -> int:
    """--child VARIANT N: one cell in a fresh process; prints one JSON line."""
    name, rows = args.child[0], int(args.child[1])
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        _cap_address_space()
    result = run_cell(name, rows, args)
    print(json.dumps(result), flush=True)
    return 0


def run_cell_in_child(name: str, rows: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, str(rows),
               "--device", args.device, "--threads", str(args.threads), "--classes",
               str(args.classes), "--repeats", str(args.repeats), "--cap-s", str(args.cap_s)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if done.returncode in (-9, 137):  # SIGKILL: the OOM killer
        return {"status": "OOM"}
    tail = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    return {"status": "error", "message": f"child exit {done.returncode}: {tail}"}


# ----------------------------------------------------------------------------- the checks

def agreement(args) -> bool:
    """The three variants' losses (and gradients) at N = 512."""
    features, labels = make_batch(512, args.classes, args.device, seed=7)
    results = {}
    for name in ("original", "lean", "supcon"):
        x = features.detach().requires_grad_()
        try:
            loss = variant_function(name)(x, labels)
            loss.backward()
            results[name] = (loss.item(), x.grad.detach().cpu().double())
        except RuntimeError as error:
            results[name] = (None, str(error).splitlines()[0][:100])
    reference, reference_grad = results["original"]
    ok = True
    parts = []
    for name in ("lean", "supcon"):
        loss, grad = results[name]
        if loss is None:
            parts.append(f"{name}: not run ({grad})")
            ok = False
            continue
        rel = abs(loss - reference) / abs(reference)
        grad_rel = float((grad - reference_grad).abs().max() / reference_grad.abs().max())
        ok &= rel < 1e-4
        parts.append(f"{name} {loss:.7f} (rel {rel:.1e}, max grad rel {grad_rel:.1e})")
    print(f"Agreement at N = 512 (f32, {args.device}): original {reference:.7f}; "
          + "; ".join(parts) + f": {'OK' if ok else 'MISMATCH'} (loss within rel 1e-4)")
    return ok


def _median_seconds(call, repeats: int) -> float:
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def overhead(args) -> None:
    """Per-call time of the two front ends at N = 512 and N = 2 (CPU only)."""
    print("\nPer-call time of the Python front ends (CPU, f32, D = 128, median):\n")
    print("| N | SupConLoss fwd+bwd (torch autograd) µs | supcon.loss_and_grad (NumPy) µs "
          "| torch - NumPy µs |")
    print("|---:|---:|---:|---:|")
    for rows, repeats in ((512, 101), (2, 1001)):
        features, labels = make_batch(rows, args.classes, "cpu", seed=rows)
        x = features.detach().requires_grad_()

        def torch_call():
            x.grad = None
            supcon_fused(x, labels).backward()

        z, y = features.numpy(), labels.numpy()

        def numpy_call():
            supcon.loss_and_grad(z, y, temperature=TAU, base_temperature=TAU)

        t_torch = _median_seconds(torch_call, repeats) * 1e6
        t_numpy = _median_seconds(numpy_call, repeats) * 1e6
        print(f"| {rows} | {t_torch:.1f} | {t_numpy:.1f} | {t_torch - t_numpy:.1f} |")
    print("\nN = 2 (one sample, two views) costs next to nothing to compute: its time is the "
          "fixed cost of a call (option checks, the custom operators and autograd for torch, "
          "one forward and one backward crossing into the extension for both). The last column "
          "is what the torch front end adds over the NumPy one.")


# ----------------------------------------------------------------------------- main

def _load() -> str:
    """The load average: other work on the machine skews the times."""
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "?"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default="2048,4096,8192,16384", help="N = B * V values")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads and RAYON_NUM_THREADS (default 2)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile variants of the two PyTorch baselines")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls after the warm-up (more for fast cells)")
    parser.add_argument("--cap-s", type=float, default=20.0,
                        help="stop timing a cell after this many seconds (at least 1 call)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.sizes.split(",")]
    names = variant_names(args.compile)
    started = time.perf_counter()
    load_start = _load()
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU, {os.cpu_count()} cores visible")
    print(f"SupCon fwd+bwd: D = {DIM}, V = {VIEWS}, {args.classes} classes, f32, tau = {TAU}, "
          f"{args.threads} threads (torch {torch.__version__}, {where}); "
          f"RAYON_NUM_THREADS = {os.environ['RAYON_NUM_THREADS']}")
    ok = agreement(args)

    print(f"\nfwd+bwd: the median of {args.repeats} calls (up to 50 for fast cells, fewer past "
          f"{args.cap_s:.0f} s a cell) after a warm-up. Peak MB: "
          + ("the peak RSS of a fresh process during the calls minus its RSS with the inputs "
             "built (MiB)" if args.device == "cpu"
             else "torch.cuda.max_memory_allocated during the calls over the inputs (MiB)")
          + "\n")
    print("| N | variant | fwd+bwd ms (median) | peak MB | speedup vs original |")
    print("|---:|---|---:|---:|---:|")
    dead = {}  # variant -> why larger N are skipped
    ms = {}
    for rows in sizes:
        for name in names:
            if name in dead:
                print(f"| {rows} | {name} | {dead[name]} | {dead[name]} | — |", flush=True)
                continue
            if args.device == "cpu":
                result = run_cell_in_child(name, rows, args)
            else:
                result = run_cell(name, rows, args)
            if result["status"] == "OOM":
                dead[name] = "OOM"
                print(f"| {rows} | {name} | OOM | OOM | — |", flush=True)
                continue
            if result["status"] != "ok":
                print(f"| {rows} | {name} | error: {result['message']} | — | — |", flush=True)
                continue
            ms[rows, name] = result["ms"]
            original = ms.get((rows, "original"))
            speedup = f"{original / result['ms']:.1f}×" if original else "—"
            print(f"| {rows} | {name} | {result['ms']:.1f} | {result['peak_mb']:.0f} | "
                  f"{speedup} |", flush=True)

    if args.device == "cpu":
        overhead(args)
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average (1, 5, 15 min) at the "
          f"start {load_start}, at the end {_load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
