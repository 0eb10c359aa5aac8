"""Fixtures for every tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that configures logging (as the CLIs do) must not change what the next one sees."""
    yield
    structlog.reset_defaults()
