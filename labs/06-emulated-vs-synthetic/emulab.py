"""Lab 6's bench: one guest with both disk paths to the same image, and everything counted.

``async with emulab.guest(url, name) as g`` connects a real guest to a real parent, binds its StorVSC (the
synthetic path: one VMBus request and one completion per I/O) and sets up its vCPU's port I/O (the emulated
path: the IDE channel at 0x1F0-0x1F7 and 0x3F6, each IN or OUT one VM exit, docs/protocol.md §13). Then:

* ``g.io``: the vCPU's port instructions (``inb``, ``outb``, ``inw``, ``outw``, ``rep_ins``, ``rep_outs``); it
  records every exit in ``g.io.trace`` (what the grader checks your driver with).
* ``g.disk(path)``: a disk with ``read(offset, length)`` and ``write(offset, data)`` for ``path`` in
  ``PATHS``: ``"synthetic"`` (StorVSC), ``"emulated-string"`` (the project's ATA PIO driver with ``rep
  insw``/``rep outsw``) or ``"emulated-word"`` (one ``inw``/``outw`` a word).
* ``g.counts(path)``: a :class:`Counts` snapshot: the path's round trips so far (StorVSC requests, or VM
  exits), the status polls that found the drive busy, and the bytes the guest's connection carried both ways.
  Take one before and one after a run of operations; the difference is what the run cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from child_partition.devices.ata.driver import AtaDisk
from child_partition.devices.ata.portio import PortIo
from child_partition.devices.storage.vsc import ScsiLun, StorageVsc
from child_partition.load.guest import LoadGuest
from vmbus_proto.devices.ata.registers import STATUS, Status
from vmbus_proto.devices.storage import vstor
from vmbus_proto.ioport import Direction

PATHS = ("synthetic", "emulated-string", "emulated-word")
OPS = ("read", "write")


@dataclass(frozen=True, slots=True)
class Access:
    """One VM exit as the vCPU saw it: ``direction`` "in" or "out", ``size`` bytes a unit, ``count`` units."""

    direction: str
    port: int
    size: int
    count: int
    data: bytes  # what an IN read, or what an OUT wrote

    @property
    def busy(self) -> bool:
        """A status read that found BSY set (one more poll than the model's minimum)."""
        return self.direction == "in" and self.port == STATUS and self.size == 1 and bool(self.data[0] & Status.BSY)


class TracedPortIo(PortIo):
    """``PortIo`` that keeps a trace of its exits (``trace``) and counts busy status polls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace: list[Access] = []
        self.tracing = True
        self.busy_polls = 0

    async def _exit(self, direction: Direction, size: int, port: int, count: int = 1, data: bytes = b"") -> bytes:
        got = await super()._exit(direction, size, port, count, data)
        access = Access("in" if direction == Direction.IN else "out", port, size, count,
                        got if direction == Direction.IN else data)
        self.busy_polls += access.busy
        if self.tracing:
            self.trace.append(access)
        return got


@dataclass(frozen=True, slots=True)
class Counts:
    round_trips: int  # StorVSC: requests completed; emulated: VM exits
    busy_polls: int  # emulated: status reads that found BSY (0 for StorVSC)
    wire_bytes: int  # frame bytes on the guest's connection, both directions


class _CountedLun:
    """The StorVSC disk, counting its requests (each one EXECUTE_SRB packet and its COMPLETE_IO)."""

    def __init__(self, lun: ScsiLun) -> None:
        self.lun, self.requests = lun, 0

    async def read(self, offset: int, length: int) -> bytes:
        self.requests += 1
        return await self.lun.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self.requests += 1
        await self.lun.write(offset, data)


@dataclass
class LabGuest:
    guest: LoadGuest
    io: TracedPortIo
    lun: _CountedLun
    _ata: dict[str, AtaDisk] = field(default_factory=dict)

    def disk(self, path: str) -> Any:
        if path == "synthetic":
            return self.lun
        if path not in PATHS:
            raise ValueError(f"path {path!r}: one of {', '.join(PATHS)}")
        return self._ata[path]

    def counts(self, path: str) -> Counts:
        bus = self.guest.bus
        assert bus is not None
        wire = bus.bytes_in + bus.bytes_out
        if path == "synthetic":
            return Counts(self.lun.requests, 0, wire)
        return Counts(self.io.counters.exits, self.io.busy_polls, wire)


@contextlib.asynccontextmanager
async def guest(url: str, name: str) -> AsyncIterator[LabGuest]:
    """A guest on ``url`` with its StorVSC bound and the IDE disk probed (IDENTIFY DEVICE). It streams (every
    byte a path moves crosses the socket, where we count it), also on a Unix socket that could share memory."""
    g = LoadGuest(url, name, None, memory_mode="stream")
    await g.connect()
    try:
        vsc = await g.bind(g.offer_of(vstor.SPEC))
        assert isinstance(vsc, StorageVsc) and g.bus is not None
        io = TracedPortIo(g.bus)
        lab = LabGuest(g, io, _CountedLun(vsc.disks[0]))
        string = AtaDisk(io, "string")
        await string.probe()
        word = AtaDisk(io, "word")
        word.identify = string.identify
        lab._ata.update({"emulated-string": string, "emulated-word": word})
        io.trace.clear()
        yield lab
    finally:
        await g.leave()
