"""The contract between ``child-partition load``'s engine and its device workloads.

A workload is what one kind of guest does to one device class (storage I/O through a StorVSC, frames through
a NetVSC and the parent's switch, SYNTHVID frames and DIRT, HID events, control-plane churn). The engine owns
everything the workloads share: bringing partitions up at a bounded concurrency, closed-loop and open-loop
pacing (``--rate``: latency counted from the intended send time, so coordinated omission cannot hide a stall),
warm-up, the bounded ``--runtime``, HDR histograms, the live progress line, the summary table, JSON, merging
across processes and machines, and the exit status. A workload only says how to start a partition, how to do
one operation on it, and how to leave.

Operations are named (``read``, ``write``, ``frame``, ``dirt``, ``key``, ``cycle`` ...): each name gets its own
counters and latency histogram in the results. An operation that raises ``OpError(op, message)`` counts as an
error of that name; any other exception counts as an error of the name ``operation``.

Optional, looked up with ``getattr`` so a workload without them still satisfies the protocol:

- class attributes ``default_concurrency`` (workers per partition, default 1), ``concurrency_aliases`` (extra
  option strings for ``--concurrency``, as storage's ``--iodepth``), ``default_partitions`` and
  ``min_partitions`` (default 1), ``prefix`` (partition names start with it; default the workload's name) and
  ``one_process`` (True when the partitions talk to each other, so ``--processes`` never splits them);
- ``async def ready(self, partitions: list[PartitionLoad]) -> None``: once, after every partition of this
  process started and before the first operation (network: the flows between the partitions); raising ends
  the workload before it starts;
- ``async def finish(self) -> None``: once, after the last operation and before any partition stops
  (network: let the frames still on their way arrive);
- ``render(section, console)`` (a classmethod): extra lines after the summary table from the workload's part
  of the results document (storage: fio's clat percentiles); works on merged results, so only from the JSON.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


@dataclass(slots=True, frozen=True)
class Done:
    """What one operation did: its name and the payload bytes it moved (0 where bytes mean nothing)."""

    op: str
    nbytes: int = 0


@dataclass(slots=True, frozen=True)
class LoadOptions:
    """What the engine tells every workload (from the common command-line options)."""

    connect: str  # the parent's VMBus URL (tcp://HOST:PORT or unix:PATH)
    http: str | None  # the parent's web API base URL (http://HOST:PORT), for workloads that drive it
    partitions: int  # partitions in this process
    first_index: int  # this process's first partition index (unique across --processes)
    prefix: str  # partition names are f"{prefix}-{index}", unique per run, host and process
    tag: str  # this client's tag in merged results (default: hostname)
    secret: bytes | None = None  # every partition's secret (--secret-file), proved to the parent on connect
    http_token: str | None = None  # the web API's token (--http-token-file), sent as a Bearer token


class Recorder(Protocol):
    """Where a workload records what the engine cannot time itself (a one-way latency seen by a receiver,
    the steps inside a churn cycle)."""

    def record(self, op: str, usec: int, nbytes: int = 0, *, started: float | None = None) -> None:
        """Count one ``op`` of ``usec`` µs; it counts when it began in the measured window: at monotonic time
        ``started`` if given (a frame's send time), else ``usec`` before now."""
        ...

    def error(self, op: str, message: str) -> None: ...

    def measuring(self, at: float | None = None) -> bool:
        """Whether something that began at monotonic time ``at`` (default: now) falls in the measured window
        (after the warm-up, before the end). ``record`` applies it itself."""
        ...


class OpError(Exception):
    """An operation failed: counted as an error of ``op`` (its first messages are kept in the results)."""

    def __init__(self, op: str, message: str) -> None:
        super().__init__(message)
        self.op = op


class PartitionLoad(Protocol):
    """One load-generating guest on its own VMBus connection, already up."""

    name: str

    async def operation(self, rec: Recorder) -> Done:
        """Do one operation and return when it is complete; the engine times it (from the intended send time
        in open-loop mode). Called by ``concurrency`` workers of this partition at once."""
        ...

    async def stop(self) -> None:
        """Leave as a guest does: close channels, tear down GPADLs, UNLOAD. Bounded in time."""
        ...


class Workload(Protocol):
    """One device's load: a class per device, registered in ``child_partition.load.WORKLOADS``."""

    name: ClassVar[str]  # the subcommand and the key in a workload file: storage, network, video, input, churn
    description: ClassVar[str]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The workload's own options (the engine adds the common ones)."""
        ...

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> Workload:
        """Build from parsed options (``args`` has the workload's own options; a workload file gives them as
        a mapping turned into a Namespace with the same names)."""
        ...

    async def setup(self) -> None:
        """Once per process before any partition (an HTTP session, shared state between partitions)."""
        ...

    async def start_partition(self, index: int) -> PartitionLoad:
        """Connect, negotiate, bind the device's VSC and finish its handshake; raise if it cannot."""
        ...

    async def teardown(self) -> dict[str, Any]:
        """Once per process after every partition stopped; extra results for the JSON (may be empty)."""
        ...
