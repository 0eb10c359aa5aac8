"""The shell tier's device tests run in both memory modes (docs/protocol.md §14): over the stream, and with the
rings and GPA data in guest memory both ends share (``adapters.attach`` reads the mode)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import adapters


@pytest.fixture(params=["stream", "shared"])
def memory_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    adapters.MEMORY_MODE = request.param
    try:
        yield request.param
    finally:
        adapters.MEMORY_MODE = "stream"
