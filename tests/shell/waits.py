"""Waiting for a condition in shell-tier tests: a generous deadline, never a sleep-then-count."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DEADLINE = 30.0  # seconds; the machine is loaded, and a passing test never waits this long


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Return once ``condition()`` holds; fail with ``what`` (the condition in words) at the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        await asyncio.sleep(0.001)
