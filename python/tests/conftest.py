"""Seeding: every run draws fresh random inputs. The base seed comes from the environment
variable SUPCON_TEST_SEED if set, else from the clock; it is printed in the header, in the
summary and with every failure. Each test derives its own seed from the base seed and its node
id, so one test's draws do not depend on which other tests ran."""

from __future__ import annotations

import os
import tempfile
import time
import zlib

# A fresh compile cache per run: inductor's on-disk cache does not key on a custom operator's
# fake implementation, so compiled code from an older build of the package would be reused.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="supcon-inductor-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

BASE_SEED = int(os.environ.get("SUPCON_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"supcon tests: SUPCON_TEST_SEED={BASE_SEED}")


def _reproduce() -> str:
    return f"SUPCON_TEST_SEED={BASE_SEED} (set it to reproduce this run)"


def pytest_report_header(config):
    return f"supcon tests: {_reproduce()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"supcon tests: {_reproduce()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("supcon seed", _reproduce()))


def _test_seed(nodeid: str) -> int:
    return (BASE_SEED + zlib.crc32(nodeid.encode())) % (1 << 31)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seeds torch's and NumPy's global generators for each test."""
    seed = _test_seed(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Runs torch's own ops on one thread: the tests' tensors are small, and on a loaded
    2-core machine torch's intra-op threads stall ~10 ms per op (the package's kernels are not
    affected: they do not use torch's thread pool)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A torch generator seeded for this test."""
    g = torch.Generator()
    g.manual_seed(_test_seed(request.node.nodeid))
    return g


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """A seed for a module-scoped fixture's inputs (shared by the module's tests), derived from
    the base seed and the module's node id as each test's is."""
    return _test_seed(request.node.nodeid)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded for this test."""
    return np.random.default_rng(_test_seed(request.node.nodeid))
