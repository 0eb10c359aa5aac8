"""``child-partition run --disk-writes SECONDS``: the guest writing to its own disk on its own, as a logging
daemon or a database checkpoint does, so a VM left running shows disk activity without a load tool.

Every SECONDS it writes one stamped 4 KiB block (SCSI WRITE through the StorVSC), flushes the disk's cache
(SYNCHRONIZE CACHE, what ``fsync`` sends), reads the block back (SCSI READ) and compares. The blocks go round a
fixed ring of :data:`SLOTS` blocks at the end of LUN 0, so the run never writes more than :data:`SLOTS` x 4 KiB
of the disk however long it lasts, and never touches its start. Each round is logged: ``disk write`` with its
offset, sequence number and how long the three requests took, or the error (the loop carries on: a VM whose
disk fails keeps running, as a guest's daemon logs EIO and retries).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import time

from ...vsc import GuestContext, GuestService
from ..network.service import interval_arg
from .blockdev import BlockDeviceError
from .disk import GuestDisk
from .service import StorageService

BLOCK = 4096
SLOTS = 256  # the ring: the last 1 MiB of the disk


def stamped_block(name: str, seq: int) -> bytes:
    """A block that says who wrote it and when, padded with a pattern derived from both (so a block read
    back from another slot, or another round, never matches)."""
    head = f"vmbus-emu {name} write {seq} at {time.time():.3f}\n".encode()
    fill = hashlib.sha256(f"{name}/{seq}".encode()).digest()
    return (head + fill * (BLOCK // len(fill) + 1))[:BLOCK]


class DiskWriteService(GuestService):
    """Writes, flushes and reads back a block of LUN 0 every ``--disk-writes`` seconds once the session is up."""

    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        self.interval: float | None = ctx.options.get("disk_writes")
        self.rounds = 0  # blocks written and read back intact
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--disk-writes", metavar="SECONDS", type=interval_arg,
                            help=f"every SECONDS, write a stamped {BLOCK // 1024} KiB block to the disk, flush it and "
                                 f"read it back, logging each round ('disk write'); the blocks go round the last "
                                 f"{SLOTS * BLOCK >> 20} MiB of LUN 0 (default: off)")

    async def session_ready(self) -> None:
        if self.interval is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(self.interval))

    async def _loop(self, interval: float) -> None:
        storage = self.ctx.partition.service(StorageService) if self.ctx.partition is not None else None
        if storage is None:
            return
        disk = storage.disk
        seq = 0
        self.log.info("writing to the disk periodically", interval=interval, lun=disk.lun)
        while True:
            started = time.monotonic()
            seq += 1
            await self._round(disk, seq)
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    async def _round(self, disk: GuestDisk, seq: int) -> None:
        if disk.size < SLOTS * BLOCK or disk.read_only:
            if seq == 1:
                self.log.warning("no disk writes: LUN 0 is too small or read-only", size=disk.size,
                                 read_only=disk.read_only)
            return
        offset = disk.size - (SLOTS - (seq - 1) % SLOTS) * BLOCK
        block = stamped_block(self.ctx.name, seq)
        t0 = time.perf_counter()
        try:
            await disk.write(offset, block)
            await disk.flush()
            back = await disk.read(offset, BLOCK)
        except BlockDeviceError as exc:
            self.errors += 1
            self.log.warning("disk write failed", seq=seq, offset=offset, error=str(exc), errors=self.errors)
            return
        ms = round((time.perf_counter() - t0) * 1000, 3)
        if back != block:
            self.errors += 1
            self.log.error("disk write read back differs", seq=seq, offset=offset, errors=self.errors)
            return
        self.rounds += 1
        self.log.info("disk write", seq=seq, offset=offset, bytes=BLOCK, flushed=True, verified=True, ms=ms)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
