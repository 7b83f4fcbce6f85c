"""The sharded loss (``distributed=True``) on real processes and real collectives: gloo groups
of 1, 2 and 4 processes on the loopback interface, each rank with a ragged number of samples
(one of the 4 ranks with none); on a GPU, one NCCL rank on CUDA tensors. Each rank's loss must be the one-process loss of the concatenated
batch and its gradient the matching rows of the one-process gradient, for every kind of
positives and the options that change the assembly (contrast mode one, reduction none and sum,
exclude, a cap, normalize), with a distinct upstream gradient per rank; ranks whose inputs are
wrong or disagree must all raise; one DDP step must equal one process's step.

The cases live in ``distributed_worker.py``, which every process runs: starting processes costs
seconds on a small machine, so each world size starts its group once, runs every case, and
reports each case's outcome; each test here is one case's outcome on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed_worker as worker
from supcon.torch import SupConLoss

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
WORLDS = (1, 2, 4)
TIMEOUT_S = 180  # a whole group's run: process start-up, every case, shutdown


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(world: int, seed: int, directory, device: str = "cpu"):
    """Runs ``world`` worker processes in one group, their tensors on ``device``: every rank's
    ``{case: failure}``, or why the group failed (a string)."""
    # Loopback only; one thread per process (the batches are small, the cores few).
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "RAYON_NUM_THREADS": "1", "SUPCON_TEST_DEVICE": device}
    port = free_port()
    processes = [
        subprocess.Popen([sys.executable, WORKER, str(rank), str(world), str(port), str(seed),
                          str(directory)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        return f"the {world}-process group did not finish within {TIMEOUT_S} s"
    outcomes = []
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        path = os.path.join(directory, f"rank{rank}.json")
        if process.returncode != 0 or not os.path.exists(path):
            return f"rank {rank} of {world} exited with {process.returncode}:\n{output}"
        with open(path) as file:
            outcomes.append(json.load(file))
    return outcomes


@pytest.fixture(scope="module")
def outcomes(module_seed, tmp_path_factory):
    """Every rank's outcomes per world size; each group runs once, when a test first needs
    it (a group that fails fails each of its tests, without running again)."""
    runs = {}

    def of(world: int) -> list:
        if world not in runs:
            runs[world] = launch(world, module_seed, tmp_path_factory.mktemp(f"world{world}"))
        if isinstance(runs[world], str):
            pytest.fail(runs[world])
        return runs[world]

    return of


@pytest.mark.parametrize(
    "world,name",
    [(world, name) for world in WORLDS for name in worker.cases(world)],
    ids=lambda value: f"w{value}" if isinstance(value, int) else value,
)
def test_rank_matches_one_process(outcomes, world, name):
    """One case (``distributed_worker.<name>``, see its docstring) passed on every rank."""
    failures = {rank: outcome[name] for rank, outcome in enumerate(outcomes(world))
                if outcome[name] is not None}
    assert not failures, "\n".join(f"rank {rank} of {world}:\n{failure}"
                                   for rank, failure in failures.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_nccl_rank_on_cuda_tensors(module_seed, tmp_path):
    """The sharded CUDA path: one rank of an NCCL group (the GPU check's machine has one GPU)
    runs every one-rank case on CUDA tensors, each against the single-process loss on the
    device."""
    outcomes = launch(1, module_seed, tmp_path, device="cuda")
    assert not isinstance(outcomes, str), outcomes
    failures = {name: failure for name, failure in outcomes[0].items() if failure}
    assert len(outcomes[0]) == len(worker.cases(1)) and not failures, failures


def test_distributed_needs_an_initialised_group():
    """distributed=True without torch.distributed's default group is a clear RuntimeError;
    distributed must be a bool."""
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        SupConLoss(distributed=True)(torch.randn(4, 2, 8), torch.arange(4))
    with pytest.raises(ValueError, match="distributed must be True or False"):
        SupConLoss(distributed=1)
