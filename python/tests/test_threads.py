"""The extension releases the GIL while the crate computes: another Python thread runs
during a call, through NumPy and through the torch operators."""

import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

import supcon
from supcon.torch import supcon_loss


def ticks_per_second(call) -> float:
    """How often per second another Python thread ran (it sleeps 0.1 ms between ticks,
    releasing the GIL each time) while ``call`` ran in this one. Measured on a 2-core machine:
    ~5000 while this thread sleeps, ~17 while it runs C code that holds the GIL (the
    interpreter's switch requests), so the tests ask for 200."""
    ticks = 0
    running = threading.Event()
    stop = threading.Event()

    def count():
        nonlocal ticks
        running.set()
        while not stop.is_set():
            ticks += 1
            time.sleep(1e-4)

    thread = threading.Thread(target=count)
    thread.start()
    running.wait()
    try:
        before, start = ticks, time.perf_counter()
        call()
        return (ticks - before) / (time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()


def batch(gen):
    # N = 4096, D = 128: tens of milliseconds of computation.
    z = F.normalize(torch.randn(2048, 2, 128, generator=gen), dim=-1)
    return z, torch.randint(0, 50, (2048,), generator=gen)


def test_numpy_call_releases_the_gil(gen):
    z, labels = batch(gen)
    features, y = z.numpy(), labels.numpy()
    assert ticks_per_second(lambda: supcon.loss_and_grad(features, y)) >= 200


def test_torch_operators_release_the_gil(gen):
    z, labels = batch(gen)
    x = z.requires_grad_()
    assert ticks_per_second(lambda: supcon_loss(x, labels).backward()) >= 200


def test_numpy_results_do_not_depend_on_threads_running_alongside(gen):
    """Python threads running alongside a call change nothing in its result."""
    z, labels = batch(gen)
    features, y = z.numpy(), labels.numpy()
    alone = supcon.loss_and_grad(features, y)
    results = []
    threads = [threading.Thread(target=lambda: results.append(supcon.loss_and_grad(features, y)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for loss, grad in results:
        assert loss == alone[0]
        assert np.array_equal(grad, alone[1])
