#!/usr/bin/env python3
"""PyTorch baseline for the GPU check: the unfused SupCon loss, as the original code computes it.

`supcon_unfused` is the math of the original `SupConLoss` (Khosla et al.'s reference code, with
its Dec 2023 fix for anchors without positives) for labelled features [B, V, D], contrast mode
"all", summation outside, denominator all, reduction mean (the crate's defaults): N x N logits, a
row max, an N x N mask, log-softmax over non-self entries, the mean over positives, and autograd
for the backward. Nothing is fused; that is the point of the comparison.

It prints one markdown row per (variant, dtype, N) in the same columns as `examples/cuda_table.rs`:
eager and `torch.compile`, f32 and bf16, stopping a variant at its first out-of-memory. Half
inputs follow what autocast does: the matmul runs in bf16, everything after it in f32.

`--verify-with BINARY` first checks this baseline against our CUDA backend at a small size: it
writes features and labels as .npy, runs `BINARY run --backend cuda ...` (the `supcon` command
line) and compares the loss and the gradient with this code run in float64.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


def supcon_unfused(features, labels, temperature, base_temperature):
    """The original SupConLoss forward for labelled [B, V, D] features (contrast mode all)."""
    batch, views = features.shape[0], features.shape[1]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    # View-major rows (row v*B + b), as the original's torch.cat(torch.unbind(...)).
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    # Half inputs: the matmul in half precision, the rest in f32 (what autocast does).
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    logits = torch.matmul(contrast, contrast.T).to(compute_dtype) / temperature
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    mask = mask.repeat(views, views)
    rows = batch * views
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(rows, device=features.device).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positives = mask.sum(1)
    positives = torch.where(positives < 1e-6, torch.ones_like(positives), positives)
    mean_log_prob_pos = (mask * log_prob).sum(1) / positives
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(views, batch).mean()


def make_batch(rows, dim, classes, dtype, device, seed):
    """L2-normalised features [N/2, 2, D] and labels [N/2], deterministic per seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch = rows // 2
    features = torch.randn(batch, 2, dim, generator=generator, dtype=torch.float64)
    features = torch.nn.functional.normalize(features, dim=2)
    labels = torch.randint(0, classes, (batch,), generator=generator, dtype=torch.int64)
    return features.to(device=device, dtype=dtype), labels.to(device)


def is_out_of_memory(error):
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def verify(binary, device, temperature):
    """Our CUDA backend (through the command line) against this code in float64, B = 256, V = 2."""
    features, labels = make_batch(512, 128, 10, torch.float32, "cpu", seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "features.npy"), features.numpy())
        np.save(os.path.join(tmp, "labels.npy"), labels.numpy())
        out = os.path.join(tmp, "out")
        subprocess.run(
            [binary, "run", "--backend", "cuda", "--temperature", str(temperature),
             "--base-temperature", str(temperature),
             "--features", os.path.join(tmp, "features.npy"),
             "--labels", os.path.join(tmp, "labels.npy"), "--out", out],
            check=True, stdout=subprocess.DEVNULL,
        )
        ours_loss = float(np.load(os.path.join(out, "loss.npy")))
        ours_grad = np.load(os.path.join(out, "grad.npy"))
    # The same f32 inputs, widened: the comparison measures our arithmetic, not input rounding.
    x = features.to(device=device, dtype=torch.float64).requires_grad_()
    loss = supcon_unfused(x, labels.to(device), temperature, temperature)
    loss.backward()
    torch_loss = loss.item()
    torch_grad = x.grad.cpu().numpy()
    loss_error = abs(ours_loss - torch_loss) / max(abs(torch_loss), 1e-3)
    grad_error = np.abs(ours_grad - torch_grad).max() / max(np.abs(torch_grad).max(), 1e-12)
    ok = loss_error < 1e-4 and grad_error < 1e-3
    print(f"verify: N = 512, D = 128, f32: supcon cuda loss {ours_loss:.9f}, torch (f64) "
          f"{torch_loss:.9f}, relative loss error {loss_error:.2e}, relative gradient error "
          f"{grad_error:.2e}: {'OK' if ok else 'MISMATCH'}", file=sys.stderr)
    return ok


def time_one(step, features, labels, cap_s, repeats):
    """Seconds per forward+backward (median of up to `repeats` after a warm-up) and peak bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step(features, labels)  # warm-up (and compilation for torch.compile)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        if sum(times) + first > cap_s:
            break
        start = time.perf_counter()
        step(features, labels)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2] if times else first
    return seconds, torch.cuda.max_memory_allocated()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384,65536,262144", help="N = B*V values")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--dtypes", default="f32,bf16")
    parser.add_argument("--variants", default="eager,compile")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cap-s", type=float, default=10.0, help="timing cap per row")
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip rows past this")
    parser.add_argument("--verify-with", metavar="BINARY", help="the supcon command line")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    ok = True
    if args.verify_with:
        ok = verify(args.verify_with, args.device, args.temperature)

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    started = time.perf_counter()
    tau = args.temperature

    def eager(features, labels):
        x = features.detach().requires_grad_()
        supcon_unfused(x, labels, tau, tau).backward()
        return x.grad

    # dynamic=True: one compilation serves every N (a compilation per size would not fit the
    # check's time budget).
    compiled_loss = torch.compile(supcon_unfused, dynamic=True)

    def compiled(features, labels):
        x = features.detach().requires_grad_()
        compiled_loss(x, labels, tau, tau).backward()
        return x.grad

    steps = {"eager": eager, "compile": compiled}
    for variant in args.variants.split(","):
        for dtype_name in args.dtypes.split(","):
            for rows in (int(n) for n in args.sizes.split(",")):
                label = f"| torch {variant} | {dtype_name} | {rows} | {args.dim} |"
                if time.perf_counter() - started > args.budget_s:
                    print(f"{label} skipped (time budget) | | |", flush=True)
                    continue
                result = None
                try:
                    features, labels = make_batch(
                        rows, args.dim, args.classes, dtypes[dtype_name], args.device, seed=rows)
                    result = time_one(steps[variant], features, labels, args.cap_s, args.repeats)
                except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
                    if not is_out_of_memory(error):
                        raise
                # Out of the handler: the exception's frames, which hold the N x N tensors, are
                # gone, so the cache can really be emptied.
                features = labels = None
                torch.cuda.empty_cache()
                if result is None:
                    print(f"{label} out of memory | | |", flush=True)
                    break  # larger N cannot fit either
                seconds, peak = result
                tflops = 6.0 * rows * rows * args.dim / seconds / 1e12
                print(f"{label} {seconds * 1e3:.3f} | {tflops:.1f} | {peak / 2**20:.0f} |",
                      flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
