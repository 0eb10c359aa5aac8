"""The guest's disks above the StorVSC: what a scan learns of a LUN, and the disk that outlives its channel.

A Linux SCSI disk survives a host adapter reset: its I/O waits while the adapter is down and is retried on the
new one. ``GuestDisk`` is that for one LUN across storage-channel losses and reconnects; the NBD export and
the demo use it as their block device.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.devices.storage import vstor

from .blockdev import BlockDeviceError

if TYPE_CHECKING:
    from .vsc import ScsiLun, StorageVsc

SECTOR = 512


class DiskFacts:
    """What the guest learns about a disk when it scans it: the ``BlockDevice`` geometry and the INQUIRY
    identity. Class-level defaults until a scan fills them in."""

    size: int = 0
    block_size: int = SECTOR
    read_only: bool = False
    max_transfer: int = vstor.DEFAULT_MAX_TRANSFER_BYTES
    vendor: str = ""
    product: str = ""


class GuestDisk(DiskFacts):
    """One LUN of the guest as a stable ``BlockDevice`` across reconnects, like a SCSI disk whose host adapter
    is reset: while the storage channel is down (or the LUN is missing from it), I/O waits (up to
    ``reattach_timeout``) for the driver to come back, and a request cut off by the loss is retried once on
    the new channel (block writes are idempotent)."""

    def __init__(self, lun: int = 0, reattach_timeout: float = 30.0) -> None:
        self.lun = lun
        self.vsc: StorageVsc | None = None
        self.disk: ScsiLun | None = None
        self._attached = asyncio.Event()
        self.reattach_timeout = reattach_timeout
        self.supports_discard = False
        self.reads = self.writes = self.bytes_read = self.bytes_written = 0  # completed I/O (the console shows it)

    def attach(self, vsc: StorageVsc) -> bool:
        """Bind to this LUN on ``vsc``; False (and left detached) if the controller has no such LUN."""
        disk = vsc.disks.get(self.lun)
        if disk is None:
            return False
        if self.size and disk.size != self.size:
            vsc.log.warning("disk size changed across reconnect", lun=self.lun, old=self.size, new=disk.size)
        self.vsc, self.disk = vsc, disk
        self.size, self.block_size, self.read_only = disk.size, disk.block_size, disk.read_only
        self.max_transfer, self.supports_discard = disk.max_transfer, disk.supports_discard
        self.vendor, self.product = disk.vendor, disk.product
        self._attached.set()
        return True

    def detach(self) -> None:
        self.vsc = self.disk = None
        self._attached.clear()

    async def _current(self) -> ScsiLun:
        if self.disk is None:
            try:
                await asyncio.wait_for(self._attached.wait(), self.reattach_timeout)
            except TimeoutError:
                raise BlockDeviceError(errno.EIO, "the storage channel did not come back") from None
        assert self.disk is not None
        return self.disk

    async def _do(self, op: Any) -> Any:
        disk = await self._current()
        try:
            return await op(disk)
        except (ChannelClosed, ConnectionError) as exc:
            if self.disk is disk:
                self.detach()
            disk = await self._current()
            try:
                return await op(disk)
            except (ChannelClosed, ConnectionError):
                raise BlockDeviceError(errno.EIO, f"storage channel lost: {exc}") from None

    async def read(self, offset: int, length: int) -> bytes:
        data: bytes = await self._do(lambda d: d.read(offset, length))
        self.reads += 1
        self.bytes_read += length
        return data

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self._do(lambda d: d.write(offset, data, fua))
        self.writes += 1
        self.bytes_written += len(data)

    async def flush(self) -> None:
        await self._do(lambda d: d.flush())

    async def discard(self, offset: int, length: int) -> None:
        await self._do(lambda d: d.discard(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await self._do(lambda d: d.write_zeroes(offset, length, may_unmap))

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        extents: list[tuple[int, int]] = await self._do(lambda d: d.block_status(offset, length))
        return extents
