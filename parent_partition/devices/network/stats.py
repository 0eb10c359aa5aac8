"""``[network] stats_interval``: the virtual switch's counters in the parent's log, now and then.

What ``Get-VMSwitch``/``Get-VMNetworkAdapter`` statistics (or ``bridge -s link`` and ``ip -s link`` for a Linux
bridge) show an operator: per port, the frames and bytes in and out, the frames flooded, and the drops by
reason. One ``switch counters`` info line every interval while anything changed (an idle switch logs nothing),
and a last one at shutdown. The demo reads these lines for its live network view.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from vmbus_proto.aio import logs

from .switch import Switch, counters_dict, port_fields


def switch_fields(switch: Switch) -> dict[str, Any]:
    """The log fields of a ``switch counters`` line: switch-wide counters and one flat dict per port."""
    return {"switch": counters_dict(switch.counters), "macs": len(switch.table()),
            "ports": {name: {**port_fields(p.counters), "queued": p.pending()} for name, p in switch.ports.items()}}


class SwitchStatsLog:
    """Logs ``switch counters`` every ``interval`` seconds while they change. Start inside the event loop."""

    def __init__(self, switch: Switch, interval: float) -> None:
        self.switch = switch
        self.interval = interval
        self.log = logs.get(component="netvsp")
        self._last: dict[str, Any] | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.emit()

    def emit(self, force: bool = False) -> None:
        """One line if anything changed since the last (or ``force``)."""
        fields = switch_fields(self.switch)
        if force or fields != self._last:
            self._last = fields
            self.log.info("switch counters", **fields)

    async def stop(self) -> None:
        """Stop, with a last line if anything changed since the previous one."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.emit()
