import functools
import time

import pytest
import torch

import harness


def pytest_configure(config):
    # torch.compile guards on dtype, grad mode, autocast and training mode: a suite compiles several variants of
    # one function, more than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def pytest_addoption(parser):
    parser.addoption("--bench-deadline", type=float, default=None,
                     help="unix time after which the remaining cases skip (the GPU report's time budget)")


def pytest_runtest_setup(item):
    deadline = item.config.getoption("--bench-deadline")
    if deadline is not None and time.time() > deadline:
        pytest.skip("the GPU report's time budget was spent before this case")


@pytest.fixture(scope="session")
def machine():
    """Measures a device's copy bandwidth, matmul rates and launch cost once per session, when first needed."""
    return functools.lru_cache(maxsize=None)(harness.measure_machine)


@pytest.fixture
def bench(benchmark, machine):
    """`bench(spec, op, fn, reads=..., leaves=..., reference=..., info=...)`: see `harness.run_case`."""
    return functools.partial(harness.run_case, benchmark, machine)
