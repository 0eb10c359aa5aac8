"""A child partition whose rescind handler is yours: ``child-partition`` with ``on_rescind`` from a lab folder.

    .venv/bin/python labs/04-hot-remove/guest.py [--code DIR] run --connect URL --name NAME [child-partition run
    options]

``DIR`` is the folder with ``rescind.py`` (default: this lab's ``starter/``). Everything after it is
``child-partition``'s own command line. The child is the real one (child_partition.runner.ChildPartition); only
its reaction to CHANNELMSG_RESCIND_CHANNELOFFER is your function, as a Linux guest's is
``vmbus_onoffer_rescind()`` and the driver's remove (drivers/hv/channel_mgmt.c). Around each call this logs
``on_rescind returned`` (with what the grader checks: whether a driver is still bound to the relid and the guest
pages in use) or ``on_rescind failed`` with the exception.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from child_partition import cli
from child_partition.guest_memory import GuestMemory
from child_partition.runner import ChildPartition

HERE = Path(__file__).resolve().parent
Handler = Callable[[ChildPartition, int], Awaitable[None]]


def pages_in_use(memory: GuestMemory) -> int:
    return memory.pages - sum(n for _, n in memory._free)  # the grader's view of guest memory


def load_handler(code: Path) -> Handler:
    path = code / "rescind.py"
    spec = importlib.util.spec_from_file_location("lab4_rescind", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"guest.py: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    handler: Handler = module.on_rescind
    return handler


def install(handler: Handler) -> None:
    """Make ``handler`` every ChildPartition's reaction to a rescind (the runner calls ``_rescinded``)."""

    async def rescinded(self: ChildPartition, relid: int) -> None:
        self.log.info("on_rescind called", relid=relid, pages_in_use=pages_in_use(self.memory))
        try:
            await handler(self, relid)
        except Exception as exc:
            self.log.error("on_rescind failed", relid=relid, error=f"{type(exc).__name__}: {exc}")
            raise
        bound = relid in self.vscs or any(relid in v.subchannels for v in self.vscs.values())
        self.log.info("on_rescind returned", relid=relid, still_bound=bound, pages_in_use=pages_in_use(self.memory))

    setattr(ChildPartition, "_rescinded", rescinded)  # noqa: B010 - replacing the runner's own handler


def main(argv: list[str]) -> int:
    code = HERE / "starter"
    if argv[:1] == ["--code"]:
        if len(argv) < 2:
            raise SystemExit("guest.py: --code needs a folder")
        code, argv = Path(argv[1]), argv[2:]
    install(load_handler(code))
    status: Any = cli.main(argv)
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
