"""Run ``child-partition load``'s engine in this process over test workloads (no parent): the real command
line parsing, the real engine, the real results document."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from child_partition.load.command import build_parser
from child_partition.load.engine import entry_from, run_process, spec_from
from child_partition.load.report import Results

POLL = 0.01


def run(cls: Any, argv: list[str], *, stop_when: Callable[[], bool] | None = None,
        timeout: float = 120.0) -> Results:
    """Parse ``argv`` as ``child-partition load <cls.name> ...`` and run it in one process; ``stop_when``: set the
    stop (as SIGINT does) once it holds."""
    args = build_parser({cls.name: cls}, {}).parse_args([cls.name, "--connect", "unix:/nowhere", "--processes", "1",
                                                         *argv])
    spec = spec_from(args, [entry_from(cls.name, cls, args)])

    async def go() -> Results:
        stop = asyncio.Event()

        async def watch() -> None:
            while stop_when is not None and not stop_when():
                await asyncio.sleep(POLL)
            if stop_when is not None:
                stop.set()

        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.wait_for(run_process(spec, stop), timeout)
        finally:
            watcher.cancel()

    return asyncio.run(go())
