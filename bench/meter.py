"""CPU accounting around one measurement: the server process, this process, and everything else.

The machine is shared (2 cores), so each measurement also records how much CPU other processes used
(``other_cpu``, in cores): a rate measured while something else was busy is not comparable.
"""

from __future__ import annotations

import time
from typing import Any

import psutil


def _busy(t: Any) -> float:
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                 + getattr(t, "steal", 0.0))


class CpuMeter:
    def __init__(self, server_pid: int | None) -> None:
        self.server = psutil.Process(server_pid) if server_pid else None
        self.me = psutil.Process()
        self._start = (0.0, 0.0, 0.0, 0.0)

    def _sample(self) -> tuple[float, float, float, float]:
        s = sum(self.server.cpu_times()[:2]) if self.server else 0.0
        m = sum(self.me.cpu_times()[:2])
        return time.perf_counter(), s, m, _busy(psutil.cpu_times())

    def start(self) -> None:
        self._start = self._sample()

    def stop(self, operations: int = 0) -> dict[str, float]:
        """CPU in cores over the interval; with ``operations``, also CPU microseconds per operation."""
        t1, s1, m1, b1 = self._sample()
        t0, s0, m0, b0 = self._start
        dt = t1 - t0
        server, client = (s1 - s0) / dt, (m1 - m0) / dt
        out = {"server_cpu": server, "client_cpu": client, "other_cpu": max(0.0, (b1 - b0) / dt - server - client)}
        if operations:
            # CPU per round trip is much less disturbed by other load on a shared machine than the rate.
            out["server_us_per_rt"] = (s1 - s0) * 1e6 / operations
            out["client_us_per_rt"] = (m1 - m0) * 1e6 / operations
        return out
