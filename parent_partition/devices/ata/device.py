"""The emulated IDE disk's host half: one ``AtaController`` per partition on ports 0x1F0-0x1F7 and 0x3F6.

The non-VMBus device of the parent (``vmbus_proto.devices.registry.EMULATED``), the way QEMU's PIIX IDE sits
beside virtio devices: every register access of the guest's driver is a trapped port access
(``parent_partition.ioports``) handed to the sans-IO controller (``vmbus_proto.devices.ata.controller``,
after QEMU hw/ide/core.c); the disk work it asks for runs here, on the partition's LUN 0, the very
``DiskBackend`` its StorVSP serves (held through ``StorageVsp.hold``, so either path sees the other's
writes at once), opened on the guest's first access to the channel. A READ the page cache answers
completes inside the exit that asked for it; anything that waits for the disk runs in the disk pool while
the drive reads BSY, as QEMU's AIO leaves it. FLUSH CACHE is a real ``fdatasync``. Until the disk is open
the drive reads BSY (spin-up); if it cannot be opened the channel reads as empty (status 0). Without a
StorVSP offered, the device opens the same images itself.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from vmbus_proto.aio import logs
from vmbus_proto.devices.ata.controller import PORTS, AtaController, DiskOp, OpKind
from vmbus_proto.devices.ata.registers import SECTOR
from vmbus_proto.ioport import Direction, PortBus

from ...counters import Sample
from ...vsp import HostContext, Vsp
from ..storage.disk import DiskError
from ..storage.scsi import ScsiDisk, disk_id_for
from ..storage.settings import StorageSettings
from ..storage.vsp import StorageVsp

DISK_LUN = 0
CountKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and labels
COUNTER_HELP = {
    "commands_total": "ATA commands executed",
    "errors_total": "ATA commands ended with ERR (ABRT, IDNF, UNC)",
    "read_bytes_total": "bytes read from the disk by PIO (sectors of READ SECTORS)",
    "written_bytes_total": "bytes written to the disk by PIO (sectors of WRITE SECTORS)",
    "flushes_total": "FLUSH CACHE commands completed",
    "exits_total": "VM exits (IOPORT frames) to the IDE channel's ports, by port and direction",
    "port_bytes_total": "bytes the exits to the IDE channel's ports moved, by direction",
}
_CONTROLLER = (("commands", "commands_total", 1), ("aborted", "errors_total", 1),
               ("sectors_read", "read_bytes_total", SECTOR), ("sectors_written", "written_bytes_total", SECTOR),
               ("flushes", "flushes_total", 1))


class AtaDevice:
    """The emulated disk of every partition (one object per daemon, like a VSP)."""

    name = "ata"

    def __init__(self, storage: StorageVsp) -> None:
        self.storage = storage
        self.log = logs.get(component="ata")
        self.partitions: dict[str, AtaAttachment] = {}
        self.retired: collections.Counter[CountKey] = collections.Counter()  # what detached partitions counted

    @classmethod
    def create(cls, vsps: list[Vsp], storage: StorageSettings, host: HostContext) -> AtaDevice:
        """On the offered StorVSP's disks; with storage not offered, on disks of its own, opened alike."""
        shared = next((v for v in vsps if isinstance(v, StorageVsp)), None)
        return cls(shared if shared is not None else StorageVsp.create(storage, host))

    def attach(self, partition: str, bus: PortBus, log: Any) -> AtaAttachment:
        att = AtaAttachment(self, partition, bus, log.bind(device=self.name))
        for first, count in PORTS:
            bus.register(first, count, att)
        self.partitions[partition] = att
        return att

    def detached(self, att: AtaAttachment) -> None:
        if self.partitions.get(att.partition) is att:
            del self.partitions[att.partition]
        self.retired.update(att.counts())

    def samples(self) -> list[Sample]:
        """What /metrics and the API show: per partition (live) and what detached partitions counted."""
        out = [Sample("partitions_attached", len(self.partitions), "partitions with the IDE channel", "gauge")]
        for partition, counts in [(None, self.retired), *((a.partition, a.counts()) for a in self.partitions.values())]:
            out += [Sample(name, value, COUNTER_HELP[name], partition=partition, labels=labels)
                    for (name, labels), value in sorted(counts.items())]
        return out

    async def shutdown(self) -> None:
        for att in list(self.partitions.values()):
            att.close()


class AtaAttachment:
    """One partition's IDE channel: the port device on its bus, and the disk work of its controller."""

    def __init__(self, device: AtaDevice, partition: str, bus: PortBus, log: Any) -> None:
        self.device, self.partition, self.bus, self.log = device, partition, bus, log
        self.ctl = AtaController(serial=disk_id_for(partition, DISK_LUN).hex[:20].upper())
        self.disk: ScsiDisk | None = None
        self.closed = False
        self._held = False
        self._opening: asyncio.Task[None] | None = None  # started by the guest's first access

    async def _open(self) -> None:
        storage = self.device.storage
        try:
            ctl = await storage.hold(self.partition)
        except (OSError, ValueError) as exc:
            self.log.error("emulated disk cannot be opened; the IDE channel reads empty", error=str(exc))
            self.ctl.attach_failed()
            return
        self._held = True
        disk = ctl.disk(DISK_LUN)
        if self.closed or disk is None:
            if disk is None:
                self.ctl.attach_failed()
            self._release()
            return
        self.disk = disk
        self.ctl.attach(disk.blocks if disk.block_size == 512 else 0, disk.read_only)
        self.log.info("emulated disk ready", sectors=disk.blocks, path=str(getattr(disk.backend, "path", "?")))

    def counts(self) -> collections.Counter[CountKey]:
        """The controller's counters and the exits to its ports, as sample names and labels."""
        c = self.ctl.counters
        out: collections.Counter[CountKey] = collections.Counter(
            {(name, ()): getattr(c, attr) * scale for attr, name, scale in _CONTROLLER})
        for first, count in PORTS:
            for port in range(first, first + count):
                for direction in Direction:
                    way = (("direction", direction.name.lower()),)
                    if exits := self.bus.exits[(port, direction)]:
                        out[("exits_total", (("port", f"{port:#x}"), *way))] += exits
                        out[("port_bytes_total", way)] += self.bus.data_bytes[(port, direction)]
        return out

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.device.storage.release(self.partition)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._opening is not None:
            self._opening.cancel()  # a hold still being opened is released by _open's own check
        self._release()
        self.device.detached(self)

    # ---- ioport.PortDevice ------------------------------------------------------------------------------

    def width(self, port: int, size: int) -> bool:
        return self.ctl.width(port, size)

    def _power_on(self) -> None:
        """The disk is opened on the guest's first access to the channel; the drive reads BSY meanwhile."""
        if self._opening is None and not self.closed:
            self._opening = asyncio.get_running_loop().create_task(self._open())

    def io_read(self, port: int, size: int) -> int:
        self._power_on()
        value = self.ctl.io_read(port, size)
        self._kick()
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        self._power_on()
        self.ctl.io_write(port, size, value)
        self._kick()

    # ---- disk work --------------------------------------------------------------------------------------

    def _kick(self) -> None:
        op = self.ctl.take_op()
        disk = self.disk
        if op is None or disk is None:
            return
        try:
            if op.kind is OpKind.READ:
                cached = disk.read_cached(op.offset, op.length) if disk.read_cached is not None else None
                if cached is not None:
                    self.ctl.complete(op, bytes(cached))  # inside this exit: no BSY seen
                    return
                fut: asyncio.Future[Any] = (disk.read_soon(op.offset, op.length) if disk.read_soon is not None
                                            else asyncio.ensure_future(disk.backend.read(op.offset, op.length)))
            elif op.kind is OpKind.WRITE:
                fut = (disk.write_soon(op.offset, memoryview(op.data), op.fua) if disk.write_soon is not None
                       else asyncio.ensure_future(disk.backend.write(op.offset, op.data, op.fua)))
            else:
                fut = asyncio.ensure_future(disk.backend.flush())
        except DiskError as exc:
            self._failed(op, exc)
            return
        if fut.done():
            self._finished(op, fut)
        else:
            fut.add_done_callback(lambda f: self._finished(op, f))

    def _finished(self, op: DiskOp, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.ctl.complete(op, failed=True)
        elif (exc := fut.exception()) is not None:
            self._failed(op, exc)
        else:
            self.ctl.complete(op, bytes(fut.result()) if op.kind is OpKind.READ else b"")
        self._kick()

    def _failed(self, op: DiskOp, exc: BaseException) -> None:
        self.log.warning("emulated disk I/O failed", op=op.kind.value, lba=op.lba, error=str(exc))
        self.ctl.complete(op, failed=True)
