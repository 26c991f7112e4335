"""Session fixtures of the microbenchmarks: the device, the dtype, and the recorder that writes the results."""
from pathlib import Path

import pytest

import harness
from kangaroo_fast.models import default_dtype


def pytest_addoption(parser):
    parser.addoption("--micro-output", default=None,
                     help="file stem for the results (default: bench/results/micro-<device>)")


@pytest.fixture(scope="session")
def device():
    return harness.bench_device()


@pytest.fixture(scope="session")
def dtype(device):
    return default_dtype(device)


@pytest.fixture(scope="session")
def recorder(request, device, dtype):
    rec = harness.Recorder(device, dtype)
    yield rec
    if rec.measurements:
        stem = request.config.getoption("--micro-output") or harness.RESULTS / f"micro-{device.type}"
        rec.write(Path(stem))
