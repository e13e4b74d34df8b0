import functools
import time

import pytest

import harness


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
