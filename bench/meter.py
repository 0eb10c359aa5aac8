"""CPU and kernel accounting around one measurement: each measured process, and everything else.

The machine is shared (2 cores), so each measurement also records how much CPU other processes used
(``other_cpu``, in cores) and the hypervisor's steal time (``steal_frac``, /proc/stat): a rate measured
while something else was busy is not comparable.

Per process and per operation (``per_op``), from /proc only (no ptrace, no root, so it works in CI):

* ``user_us`` / ``sys_us``: CPU time (/proc/PID/stat);
* ``read_syscalls`` / ``write_syscalls``: /proc/PID/io ``syscr`` / ``syscw``, the read- and write-family
  syscalls (read, readv, pread, preadv2 and write, writev, pwrite, ...), failed ones (EAGAIN) included.
  uvloop reads and writes its sockets with read/write/writev, so these are most of its I/O syscalls;
  epoll_wait is not counted, but each blocking one is a voluntary context switch;
* ``vol_cs`` / ``invol_cs``: voluntary (the process slept: nothing to do) and involuntary (preempted)
  context switches, /proc/PID/status. Few voluntary switches per operation means the process batches;
* ``runq_wait_us``: time runnable but waiting for a CPU (/proc/PID/schedstat), summed over its threads;
* ``minor_faults``: minor page faults (/proc/PID/stat): fresh memory touched, e.g. glibc serving bulk
  buffers with new mmaps (what made the 64 KiB and 1 MiB runs bimodal before ``vmbus_proto/aio/malloc.py``).

Threads are included in all of them (the parent's disk pool threads count as the parent).
"""

from __future__ import annotations

import time
from typing import Any

import psutil

COUNTERS = ("user_us", "sys_us", "read_syscalls", "write_syscalls", "vol_cs", "invol_cs", "runq_wait_us",
            "minor_faults")


def _busy(t: Any) -> float:
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                 + getattr(t, "steal", 0.0))


def _runq_wait_us(pid: int) -> float:
    """Summed run-queue wait of every thread of ``pid`` (schedstat field 2, ns), in µs; 0 if unavailable."""
    total = 0
    try:
        tasks = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t.id}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1000


def _minor_faults(pid: int) -> float:
    """Field 10 of /proc/PID/stat (after the parenthesised command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return float(fh.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return float("nan")


def sample(proc: psutil.Process) -> dict[str, float]:
    """Cumulative counters of one process (all its threads)."""
    with proc.oneshot():
        cpu = proc.cpu_times()
        ctx = proc.num_ctx_switches()
        try:
            io = proc.io_counters()
            reads, writes = float(io.read_count), float(io.write_count)
        except (psutil.AccessDenied, AttributeError):
            reads = writes = float("nan")
    return {"user_us": cpu.user * 1e6, "sys_us": cpu.system * 1e6, "read_syscalls": reads, "write_syscalls": writes,
            "vol_cs": float(ctx.voluntary), "invol_cs": float(ctx.involuntary), "runq_wait_us": _runq_wait_us(proc.pid),
            "minor_faults": _minor_faults(proc.pid)}


def per_op(before: dict[str, float], after: dict[str, float], operations: int) -> dict[str, float]:
    """Each counter's increase divided by ``operations``, plus ``cpu_us`` (user + sys)."""
    out = {k: round((after[k] - before[k]) / operations, 3) for k in COUNTERS}
    out["cpu_us"] = round(out["user_us"] + out["sys_us"], 3)
    return out


def steal_frac(t0: Any, t1: Any) -> float:
    """Share of all CPU time the hypervisor stole between two ``psutil.cpu_times()``."""
    total = sum(t1) - sum(t0)
    return max(0.0, (getattr(t1, "steal", 0.0) - getattr(t0, "steal", 0.0)) / total) if total > 0 else 0.0


class ProcMeter:
    """Counters of named processes (and the machine's steal time) between ``start`` and ``stop``."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self._before: dict[str, dict[str, float]] = {}
        self._sys0: Any = None

    def start(self) -> None:
        self._sys0 = psutil.cpu_times()
        self._before = {name: sample(p) for name, p in self.procs.items()}

    def stop(self, operations: int) -> dict[str, Any]:
        after = {name: sample(p) for name, p in self.procs.items()}
        out: dict[str, Any] = {"steal_frac": round(steal_frac(self._sys0, psutil.cpu_times()), 4)}
        if operations:
            out["per_op"] = {name: per_op(self._before[name], after[name], operations) for name in self.procs}
        return out


class CpuMeter:
    """CPU in cores of a server process, this process and the rest, with ``ProcMeter``'s counters."""

    def __init__(self, server_pid: int | None) -> None:
        self.server = psutil.Process(server_pid) if server_pid else None
        self.me = psutil.Process()
        procs = {"client": self.me} | ({"server": self.server} if self.server else {})
        self.procs = ProcMeter(procs)
        self._start = (0.0, 0.0, 0.0, 0.0)

    def _sample(self) -> tuple[float, float, float, float]:
        s = sum(self.server.cpu_times()[:2]) if self.server else 0.0
        m = sum(self.me.cpu_times()[:2])
        return time.perf_counter(), s, m, _busy(psutil.cpu_times())

    def start(self) -> None:
        self.procs.start()
        self._start = self._sample()

    def stop(self, operations: int = 0) -> dict[str, Any]:
        """CPU in cores over the interval; with ``operations``, also CPU microseconds and counters per operation."""
        t1, s1, m1, b1 = self._sample()
        counters = self.procs.stop(operations)
        t0, s0, m0, b0 = self._start
        dt = t1 - t0
        server, client = (s1 - s0) / dt, (m1 - m0) / dt
        out: dict[str, Any] = {"server_cpu": server, "client_cpu": client,
                               "other_cpu": max(0.0, (b1 - b0) / dt - server - client), **counters}
        if operations:
            # CPU per round trip is much less disturbed by other load on a shared machine than the rate.
            out["server_us_per_rt"] = (s1 - s0) * 1e6 / operations
            out["client_us_per_rt"] = (m1 - m0) * 1e6 / operations
        return out
