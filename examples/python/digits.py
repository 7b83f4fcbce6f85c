#!/usr/bin/env python3
"""Supervised contrastive learning on scikit-learn's digits, with ``supcon.torch.SupConLoss``.

A small MLP encoder (64 -> 256 -> 128, with a 128 -> 64 projection head for the loss, as in the
paper) is trained with the SupCon loss on two augmented views of each image (shifts of up to one
pixel and Gaussian noise); then a linear classifier (logistic regression) is fitted on the frozen
encoder's embeddings of the un-augmented images. The same encoder with a linear head, trained end
to end with cross-entropy on the same augmentation for the same number of epochs, is the
baseline. It prints the per-epoch losses, the test accuracy of both, the supcon backend that ran
and the total time, and saves a PNG with the loss curves and a 2-D PCA projection of the SupCon
test embeddings coloured by class.

Runs on CPU (a couple of cores, well under two minutes) and, with ``--device cuda``, on a GPU.

Data: Optical Recognition of Handwritten Digits, UCI Machine Learning Repository,
E. Alpaydin and C. Kaynak (1998), https://doi.org/10.24432/C50P49, CC BY 4.0; bundled with
scikit-learn (``sklearn.datasets.load_digits``: 1797 8x8 images, nothing is downloaded).

Usage: ``python examples/python/digits.py [--epochs 100] [--seed 0] [--out digits.png]
[--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from supcon.torch import SupConLoss  # noqa: E402

BATCH_SIZE = 256
TEMPERATURE = 0.1
LEARNING_RATE = 3e-3
SHIFT = 1  # pixels
NOISE = 0.1  # standard deviation, on inputs in [0, 1]


class Encoder(torch.nn.Module):
    """64 -> 256 -> 128: the embedding the classifiers use."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def projection_head() -> torch.nn.Module:
    """128 -> 128 -> 64, used by the SupCon loss only and discarded afterwards (as in the paper)."""
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


def augment(images: torch.Tensor) -> torch.Tensor:
    """One random view of each [n, 8, 8] image: a shift of up to SHIFT pixels in each direction
    (zero padding, then an 8x8 crop) and Gaussian noise, clamped back to [0, 1]."""
    n, height, width = images.shape
    device = images.device
    padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
    dy = torch.randint(0, 2 * SHIFT + 1, (n, 1), device=device)
    dx = torch.randint(0, 2 * SHIFT + 1, (n, 1), device=device)
    rows = torch.arange(height, device=device) + dy  # [n, 8]
    cols = torch.arange(width, device=device) + dx  # [n, 8]
    index = torch.arange(n, device=device)[:, None, None]
    view = padded[index, rows[:, :, None], cols[:, None, :]]
    return (view + NOISE * torch.randn_like(view)).clamp_(0.0, 1.0)


def batches(n: int, device: torch.device):
    """Shuffled index batches of BATCH_SIZE (the last one smaller)."""
    order = torch.randperm(n, device=device)
    for start in range(0, n, BATCH_SIZE):
        yield order[start:start + BATCH_SIZE]


def train(name: str, modules: Sequence[torch.nn.Module], batch_loss, n: int,
          device: torch.device, epochs: int) -> List[float]:
    """Adam on the parameters of ``modules`` for ``epochs`` epochs of shuffled batches, where
    ``batch_loss(index)`` is the loss of the images ``index``; returns each epoch's mean loss."""
    optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=LEARNING_RATE)
    losses = []
    bar = tqdm(range(epochs), desc=name, unit="epoch", file=sys.stderr)
    for epoch in bar:
        for module in modules:
            module.train()
        total = 0.0
        for index in batches(n, device):
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        tqdm.write(f"{name:13s} epoch {epoch + 1:3d}/{epochs}  loss {losses[-1]:.4f}",
                   file=sys.stdout)
    return losses


def train_supcon(x: torch.Tensor, y: torch.Tensor, epochs: int, criterion: SupConLoss) -> tuple:
    encoder, head = Encoder().to(x.device), projection_head().to(x.device)

    def batch_loss(index):
        images = x[index]
        views = torch.cat([augment(images), augment(images)])  # [2b, 8, 8]
        z = F.normalize(head(encoder(views)), dim=1)
        return criterion(torch.stack(z.chunk(2), dim=1), y[index])  # features [b, 2, 64]

    return encoder, train("supcon", (encoder, head), batch_loss, len(x), x.device, epochs)


def train_cross_entropy(x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple:
    encoder = Encoder().to(x.device)
    classifier = torch.nn.Linear(128, 10).to(x.device)

    def batch_loss(index):
        return F.cross_entropy(classifier(encoder(augment(x[index]))), y[index])

    losses = train("cross-entropy", (encoder, classifier), batch_loss, len(x), x.device, epochs)
    return encoder, classifier, losses


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    encoder.eval()
    return F.normalize(encoder(x), dim=1).cpu().numpy()


def plot(path: str, supcon_losses: List[float], ce_losses: List[float],
         embeddings: np.ndarray, labels: np.ndarray, supcon_accuracy: float) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    epochs = np.arange(1, len(supcon_losses) + 1)
    left.plot(epochs, supcon_losses, color="tab:blue", marker=".", label="SupCon")
    left.set_xlabel("epoch")
    left.set_ylabel("SupCon loss", color="tab:blue")
    left.tick_params(axis="y", labelcolor="tab:blue")
    twin = left.twinx()  # the two losses have different scales
    twin.plot(epochs, ce_losses, color="tab:orange", marker=".", label="cross-entropy")
    twin.set_ylabel("cross-entropy loss", color="tab:orange")
    twin.tick_params(axis="y", labelcolor="tab:orange")
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper right")
    left.set_title("Training loss per epoch")

    projected = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    scatter = right.scatter(projected[:, 0], projected[:, 1], c=labels, cmap="tab10",
                            vmin=-0.5, vmax=9.5, s=12, alpha=0.8)
    figure.colorbar(scatter, ax=right, ticks=range(10), label="digit")
    right.set_xlabel("PC 1")
    right.set_ylabel("PC 2")
    right.set_title(f"SupCon test embeddings, PCA (linear probe accuracy {supcon_accuracy:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100, help="epochs of each training run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits.png", help="the PNG to write")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the example; returns the accuracies, the per-epoch losses, the backend and the time."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # base_temperature = temperature: the loss is exactly the paper's L_out (no tau/tau_b scale).
    criterion = SupConLoss(temperature=TEMPERATURE, base_temperature=TEMPERATURE)
    # backend="auto": the crate's CUDA kernels on CUDA tensors, its fused CPU backend on float32
    # CPU tensors.
    backend = criterion.backend_for(torch.empty(0, device=device))
    print(f"device {device}, supcon backend {backend!r} (backend='auto'), "
          f"torch threads {torch.get_num_threads()}")

    seed_everything(args.seed)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8], pixel values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=args.seed)
    print(f"digits: {len(x_train)} training and {len(x_test)} test images, 8x8, 10 classes")
    x_train_t = torch.from_numpy(x_train).to(device)
    y_train_t = torch.from_numpy(y_train).to(device)
    x_test_t = torch.from_numpy(x_test).to(device)

    # 1. SupCon pre-training, then a linear classifier on the frozen embeddings.
    encoder, supcon_losses = train_supcon(x_train_t, y_train_t, args.epochs, criterion)
    train_embeddings, test_embeddings = embed(encoder, x_train_t), embed(encoder, x_test_t)
    scaler = StandardScaler().fit(train_embeddings)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_embeddings), y_train)
    supcon_accuracy = float(probe.score(scaler.transform(test_embeddings), y_test))

    # 2. The cross-entropy baseline: the same encoder and a linear head, end to end.
    ce_encoder, ce_classifier, ce_losses = train_cross_entropy(x_train_t, y_train_t, args.epochs)
    ce_encoder.eval(), ce_classifier.eval()
    with torch.no_grad():
        predictions = ce_classifier(ce_encoder(x_test_t)).argmax(1).cpu().numpy()
    ce_accuracy = float((predictions == y_test).mean())

    plot(args.out, supcon_losses, ce_losses, test_embeddings, y_test, supcon_accuracy)
    seconds = time.perf_counter() - started

    print()
    print("| method | test accuracy |")
    print("|---|---:|")
    print(f"| SupCon ({backend}) + linear classifier | {supcon_accuracy:.4f} |")
    print(f"| cross-entropy | {ce_accuracy:.4f} |")
    print()
    print(f"{args.epochs} epochs each, batch {BATCH_SIZE}, tau {TEMPERATURE}; "
          f"supcon backend {backend}; total time {seconds:.1f} s; figure: {args.out}")
    return {
        "supcon_accuracy": supcon_accuracy,
        "ce_accuracy": ce_accuracy,
        "supcon_losses": supcon_losses,
        "ce_losses": ce_losses,
        "backend": backend,
        "device": str(device),
        "time_s": seconds,
        "out": args.out,
    }


if __name__ == "__main__":
    main()
