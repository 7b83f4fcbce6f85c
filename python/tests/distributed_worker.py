"""One rank of test_distributed.py's process groups: ``python distributed_worker.py RANK WORLD
PORT SEED DIRECTORY`` joins a gloo group of WORLD processes on 127.0.0.1:PORT, runs every case
of that world size in order, and writes ``{case: None, or the failure's traceback}`` to
DIRECTORY/rank<RANK>.json. With ``SUPCON_TEST_DEVICE=cuda`` the group is NCCL's and the
comparisons' tensors live on the rank's GPU (the sharded CUDA path; one rank per GPU).

Every rank draws the same whole batch from the case's seed and takes its own samples (ragged
counts, and among 4 ranks one without samples). It checks its results against the package's
one-process loss on the whole batch, which it computes itself. A case runs all its collectives
before it checks anything, so that a failed check on one rank leaves no other rank waiting; a
collective that waits anyway times out with the group (60 s).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import helpers as h
from supcon.torch import SupConLoss

CASES = {}  # name -> (check(rank, world, gen), world sizes)
DEVICE = torch.device(os.environ.get("SUPCON_TEST_DEVICE", "cpu"))


def case(*worlds):
    """Registers a check for these world sizes (1, 2 and 4 unless given)."""

    def register(check):
        CASES[check.__name__] = (check, worlds or (1, 2, 4))
        return check

    return register


def cases(world: int):
    """The names of the cases that run on ``world`` ranks, in order."""
    return [name for name, (_, worlds) in CASES.items() if world in worlds]


def sizes(world, gen):
    """Ragged sample counts, 3 to 9 per rank; among 4 ranks a random one holds none."""
    counts = torch.randint(3, 10, (world,), generator=gen).tolist()
    if world == 4:
        counts[int(torch.randint(world, (), generator=gen))] = 0
    return counts


def span(rank, counts):
    """Rank ``rank``'s samples ``(b0, b1)`` in the concatenated batch."""
    start = sum(counts[:rank])
    return start, start + counts[rank]


def whole_positives(kind, batch, gen):
    """The whole batch's (labels, mask): class labels (about B/2 classes), label sets
    (``[B, 5]`` bool, some samples in no set), a soft mask, or neither (SimCLR)."""
    if kind == "labels":
        return h.labels(batch, gen=gen), None
    if kind == "label_sets":
        return torch.rand(batch, 5, generator=gen) < 0.3, None
    if kind == "mask":
        return None, h.soft_mask(batch, gen=gen)
    return None, None


def compare(rank, world, gen, positives="labels", dtype=torch.float64, views=2, dim=11,
            norm=1.0, plain=False, **options):
    """This rank's loss and gradient against one process on the whole batch. The upstream
    gradient is rank + 1 on each rank (one process: their sum; ``plain``: a plain
    ``loss.backward()`` on each rank, one process: W), or under reduction none per-anchor
    values, each rank's at its anchors' entries of the whole batch's. float64 within 1e-12,
    other dtypes within the package's tolerance for them."""
    counts = sizes(world, gen)
    batch = sum(counts)
    z = h.features(batch, views, dim, dtype, norm=norm, gen=gen)
    labels, mask = whole_positives(positives, batch, gen)
    anchor_views = views if options.get("contrast_mode", "all") == "all" else 1
    per_anchor = torch.randn(anchor_views, batch, generator=gen, dtype=torch.float64).to(dtype)
    b0, b1 = span(rank, counts)
    host_z = z
    z, labels, mask, per_anchor = (None if t is None else t.to(DEVICE)
                                   for t in (z, labels, mask, per_anchor))

    def own(tensor):
        return None if tensor is None else tensor[b0:b1]

    leaf = z[b0:b1].clone().requires_grad_(True)
    loss = SupConLoss(distributed=True, **options)(leaf, own(labels), own(mask))
    whole = z.clone().requires_grad_(True)
    expected = SupConLoss(**options)(whole, labels, mask)
    if options.get("reduction") == "none":
        loss.backward(gradient=per_anchor[:, b0:b1].reshape(-1))
        expected.backward(gradient=per_anchor.reshape(-1))
        expected_loss = expected.detach().view(anchor_views, batch)[:, b0:b1].reshape(-1)
        upstream = per_anchor
    else:
        if plain:
            loss.backward()
            total = world
        else:
            (loss * (rank + 1)).backward()
            total = world * (world + 1) // 2
        (expected * total).backward()
        expected_loss = expected.detach()
        upstream = torch.tensor(float(total))
    tol = 1e-12 if dtype == torch.float64 else h.tolerance(dtype)
    assert loss.shape == expected_loss.shape and loss.dtype == dtype, (loss.shape, loss.dtype)
    assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
    assert loss.device == leaf.grad.device == DEVICE, (loss.device, leaf.grad.device)
    h.assert_close(loss.cpu(), expected_loss.cpu(), tol, "loss", floor=h.LOSS_FLOOR)
    floor = h.gradient_floor(host_z, upstream, **options)
    h.assert_close(leaf.grad.cpu(), whole.grad[b0:b1].cpu(), tol, "gradient", floor=floor)


def raised(call) -> str:
    """The message of the ValueError that ``call`` raises."""
    try:
        call()
    except ValueError as error:
        return str(error)
    raise AssertionError("no ValueError was raised")


@case()
def labels_f64(rank, world, gen):
    compare(rank, world, gen)


@case()
def labels_f32(rank, world, gen):
    compare(rank, world, gen, dtype=torch.float32)


@case()
def labels_bf16(rank, world, gen):
    compare(rank, world, gen, dtype=torch.bfloat16)


@case()
def plain_backward_f64(rank, world, gen):
    compare(rank, world, gen, plain=True)


@case()
def simclr_f64(rank, world, gen):
    compare(rank, world, gen, positives="simclr", views=3)


@case()
def simclr_f32(rank, world, gen):
    compare(rank, world, gen, positives="simclr", dtype=torch.float32)


@case()
def label_sets_jaccard_f64(rank, world, gen):
    compare(rank, world, gen, positives="label_sets", label_set_weight="jaccard")


@case()
def label_sets_f32(rank, world, gen):
    compare(rank, world, gen, positives="label_sets", dtype=torch.float32)


@case()
def mask_rows_f64(rank, world, gen):
    compare(rank, world, gen, positives="mask")


@case()
def mask_rows_inside_f32(rank, world, gen):
    compare(rank, world, gen, positives="mask", dtype=torch.float32, summation="inside")


@case()
def contrast_one_f64(rank, world, gen):
    compare(rank, world, gen, views=3, contrast_mode="one")


@case()
def none_f64(rank, world, gen):
    compare(rank, world, gen, reduction="none")


@case()
def none_f32(rank, world, gen):
    compare(rank, world, gen, dtype=torch.float32, reduction="none")


@case()
def none_one_mask_f64(rank, world, gen):
    compare(rank, world, gen, positives="mask", reduction="none", contrast_mode="one")


@case()
def sum_cap_inside_f64(rank, world, gen):
    compare(rank, world, gen, reduction="sum", positives_cap=2, summation="inside")


@case()
def exclude_one_view_f64(rank, world, gen):
    """V = 1: anchors without positives, which the mean excludes."""
    compare(rank, world, gen, views=1, no_positive="exclude")


@case()
def one_positive_f64(rank, world, gen):
    compare(rank, world, gen, denominator="one_positive", temperature=0.2)


@case()
def normalize_f32(rank, world, gen):
    compare(rank, world, gen, dtype=torch.float32, norm=None, normalize=True)


@case()
def no_positive_error(rank, world, gen):
    """An anchor without positives under no_positive="error" raises on every rank, and names
    the whole batch's anchor row, as one process does."""
    counts = sizes(world, gen)
    batch = sum(counts)
    z = h.features(batch, 1, 4, torch.float64, gen=gen)
    labels = torch.arange(batch)
    labels[1] = labels[0]  # row 0 and 1 have a positive, row 2 is the first without
    b0, b1 = span(rank, counts)
    loss = SupConLoss(distributed=True, no_positive="error")
    message = raised(lambda: loss(z[b0:b1], labels[b0:b1]))
    expected = raised(lambda: SupConLoss(no_positive="error")(z, labels))
    assert message == expected and "2" in message, (message, expected)


@case(2, 4)
def mismatched_dim(rank, world, gen):
    """Rank 0's features have another D: every rank raises a ValueError naming the ranks'
    shapes (they agree on their inputs before any other collective)."""
    counts = sizes(world, gen)
    z = h.features(counts[rank], 2, 7 if rank == 0 else 6, torch.float32, gen=gen)
    labels = h.labels(counts[rank], gen=gen)
    message = raised(lambda: SupConLoss(distributed=True)(z, labels))
    assert "must agree" in message and "D=7" in message and "D=6" in message, message


@case()
def invalid_on_one_rank(rank, world, gen):
    """The last rank's labels do not match its features: it raises its own ValueError, and
    every other rank one that names it."""
    counts = sizes(world, gen)
    z = h.features(counts[rank], 2, 6, torch.float32, gen=gen)
    extra = 1 if rank == world - 1 else 0
    labels = h.labels(counts[rank] + extra, gen=gen)
    message = raised(lambda: SupConLoss(distributed=True)(z, labels))
    if rank == world - 1:
        assert "Num of labels" in message, message
    else:
        assert f"invalid on rank(s) [{world - 1}]" in message, message


@case()
def mask_columns(rank, world, gen):
    """Mask rows with more columns than the whole batch has samples raise on every rank."""
    counts = sizes(world, gen)
    batch = sum(counts)
    z = h.features(counts[rank], 2, 6, torch.float32, gen=gen)
    mask = h.soft_mask(batch + 1, gen=gen)[: counts[rank]]
    message = raised(lambda: SupConLoss(distributed=True)(z, mask=mask))
    assert f"[B_r, {batch}]" in message, message


@case(2)
def ddp_step(rank, world, gen):
    """One SGD step of a float64 2-layer MLP under DistributedDataParallel, with the sharded
    loss (normalize, labels) on each rank's part of a batch, leaves the parameters that one
    process leaves stepping on the whole batch with the plain loss: a plain loss.backward(),
    no scaling by the world size."""
    counts = sizes(world, gen)
    batch = sum(counts)
    x = torch.randn(batch, 2, 6, generator=gen, dtype=torch.float64)
    labels = h.labels(batch, gen=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 8)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=gen,
                                              dtype=torch.float64))
    alone = copy.deepcopy(model)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    b0, b1 = span(rank, counts)
    ddp = DistributedDataParallel(model)
    step = torch.optim.SGD(ddp.parameters(), lr=0.5)
    SupConLoss(normalize=True, distributed=True)(ddp(x[b0:b1]), labels[b0:b1]).backward()
    step.step()
    step_alone = torch.optim.SGD(alone.parameters(), lr=0.5)
    SupConLoss(normalize=True)(alone(x), labels).backward()
    step_alone.step()
    for old, new, expected in zip(before, model.parameters(), alone.parameters()):
        assert float((expected - old).abs().max()) > 1e-3, "the step moved nothing"
        error = float((new - expected).abs().max())
        assert error <= 1e-6, f"parameters differ by {error:.3e}"


def main(rank: int, world: int, port: int, seed: int, directory: str) -> None:
    torch.set_num_threads(1)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    outcomes = {}
    for name in cases(world):
        gen = torch.Generator()
        gen.manual_seed((seed + zlib.crc32(name.encode())) % (1 << 31))
        try:
            CASES[name][0](rank, world, gen)
            outcomes[name] = None
        except Exception:  # noqa: BLE001 - every failure is reported, per case
            outcomes[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as file:
        json.dump(outcomes, file)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]), sys.argv[5])
