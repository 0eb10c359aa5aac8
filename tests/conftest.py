"""Fixtures for every tier."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that configures logging (as the CLIs do) must not change what the next one sees."""
    yield
    structlog.reset_defaults()


# `make test` runs the suite in parallel processes (pytest-xdist). These tests start a parent on the embedded
# defaults (127.0.0.1:6464 and :8080), or fail one that would: they take a lock on the machine, so that no two
# of them want those ports at once, in this run or another. The wait for it comes before the test's timeout.
DEFAULT_PORTS = ("tests/labs/test_handouts.py", "tests/integration/test_demo.py",
                 "tests/integration/test_cli_errors.py",
                 "tests/integration/test_storage.py::test_unknown_storage_protocol_version_is_a_config_error",
                 "tests/integration/test_network_tap.py::test_external_tap_that_cannot_be_created_is_a_config_error",
                 "tests/integration/test_send_keys.py")
DEFAULT_PORTS_LOCK = Path(tempfile.gettempdir()) / "vmbus-emu-default-ports.lock"
LONGEST = ("tests/integration/test_bench_smoke.py", "tests/integration/test_soak.py")  # started first, not last


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest-timeout's timer
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if not item.nodeid.startswith(DEFAULT_PORTS):
        yield
        return
    with DEFAULT_PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST))  # stable: the rest keep their order
