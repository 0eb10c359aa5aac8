"""A polling ATA PIO driver for the primary IDE channel: the register sequence a real driver issues.

What Linux libata's SFF PIO path does for one command (drivers/ata/libata-sff.c: ``ata_sff_busy_wait`` /
``ata_wait_idle`` poll the status register until BSY clears, ``ata_sff_tf_load`` writes sector count,
LBA low/mid/high and the device register, ``ata_sff_exec_command`` the command; then per DRQ block
``ata_pio_sector`` moves 256 words through the data port, ``ata_sff_data_xfer`` with ``ioread16_rep`` /
``iowrite16_rep``, i.e. ``rep insw`` / ``rep outsw``), polled with interrupts off (nIEN), as a BIOS or
libata's polling mode does. Every one of those register accesses is a trapped port access
(``portio.PortIo``): that is what this path costs, and what the exit counters show.

``pio="string"`` moves data with ``rep insw``/``rep outsw`` (KVM: a read of a sector is one exit, a write of
one 256 exits); ``pio="word"`` with one ``inw``/``outw`` per word, the textbook loop (256 exits a sector
either way). The disk has the block interface the storage workload uses (``size``, ``read``, ``write``,
``flush``), so ``child-partition load storage --path emulated`` runs the same workload over it.
"""

from __future__ import annotations

import asyncio

from vmbus_proto.devices.ata.registers import (
    CTRL,
    CTRL_NIEN,
    DATA,
    DEV_LBA,
    DEV_OBSOLETE,
    DEVICE,
    ERROR,
    LBA28_MAX,
    LBA_HIGH,
    LBA_LOW,
    LBA_MID,
    NSECTOR,
    SECTOR,
    STATUS,
    WORDS_PER_SECTOR,
    Command,
    Error,
    IdentifyInfo,
    Status,
    parse_identify,
)

from .portio import PortIo

PIO_MODES = ("string", "word")
READY_TIMEOUT = 30.0  # a drive that stays BSY this long is broken
MAX_SECTORS = 256  # one READ/WRITE SECTORS (sector count 0)


class AtaError(OSError):
    """A command ended with ERR (``error`` is the error register) or the drive misbehaved."""

    def __init__(self, message: str, error: int = 0) -> None:
        super().__init__(message)
        self.error = error


class AtaDisk:
    """Device 0 of the primary channel, driven by PIO over trapped port I/O."""

    supports_discard = False  # ATA TRIM is DATA SET MANAGEMENT (DMA); this drive has none

    def __init__(self, io: PortIo, pio: str = "string", timeout: float = READY_TIMEOUT) -> None:
        if pio not in PIO_MODES:
            raise ValueError(f"pio must be one of {', '.join(PIO_MODES)}, not {pio!r}")
        self.io, self.pio, self.timeout = io, pio, timeout
        self.identify: IdentifyInfo | None = None
        self.polls = 0  # status reads that found the drive busy
        self._lock = asyncio.Lock()  # one command at a time: the channel has no queue

    @property
    def size(self) -> int:
        return (self.identify.sectors if self.identify else 0) * SECTOR

    async def probe(self) -> IdentifyInfo:
        """Interrupts off, wait for the drive, IDENTIFY DEVICE (``ata_dev_read_id``)."""
        async with self._lock:
            await self.io.outb(CTRL, CTRL_NIEN)
            await self.io.outb(DEVICE, DEV_OBSOLETE)
            status = await self._wait()
            if status in (0, 0xFF):
                raise AtaError(f"no ATA device on the primary channel (status {status:#04x})")
            await self._issue(Command.IDENTIFY_DEVICE, 0, 0)
            data = await self._data_in()
            await self._finish("IDENTIFY DEVICE")
        try:
            info = parse_identify(data)
        except ValueError as exc:
            raise AtaError(f"bad IDENTIFY data: {exc}") from None
        if not info.lba or not info.sectors:
            raise AtaError("the drive does not support LBA addressing")
        self.identify = info
        return info

    # ---- the block interface ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        lba, count = self._range(offset, length)
        out = bytearray()
        async with self._lock:
            while count:
                n = min(count, MAX_SECTORS)
                await self._issue(Command.READ_SECTORS, lba, n)
                for _ in range(n):
                    out += await self._data_in()
                await self._finish(f"READ SECTORS at LBA {lba}")
                lba, count = lba + n, count - n
        return bytes(out)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        lba, count = self._range(offset, len(data))
        view = memoryview(data).cast("B")
        async with self._lock:
            while count:
                n = min(count, MAX_SECTORS)
                await self._issue(Command.WRITE_SECTORS, lba, n)
                for i in range(n):
                    await self._data_out(bytes(view[i * SECTOR:(i + 1) * SECTOR]))
                await self._finish(f"WRITE SECTORS at LBA {lba}")
                view, lba, count = view[n * SECTOR:], lba + n, count - n
            if fua:
                await self._flush()

    async def flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        await self._issue(Command.FLUSH_CACHE, 0, 0)
        await self._finish("FLUSH CACHE")

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        if offset % SECTOR or length % SECTOR or offset < 0:
            raise ValueError(f"offset {offset} and length {length} must be multiples of {SECTOR}")
        if offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset} go past the end of the {self.size}-byte disk")
        return offset // SECTOR, length // SECTOR

    # ---- the register protocol --------------------------------------------------------------------------

    async def _wait(self) -> int:
        """Poll the status register until BSY clears (``ata_sff_busy_wait``); the status."""
        io = self.io
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            status = await io.inb(STATUS)
            if not status & Status.BSY or status == 0xFF:  # 0xFF: nothing decodes the port (a floating bus)
                return status
            self.polls += 1
            if asyncio.get_running_loop().time() > deadline:
                raise AtaError(f"the drive stayed busy for {self.timeout:g}s (status {status:#04x})")

    async def _issue(self, cmd: Command, lba: int, count: int) -> None:
        """The task file, then the command (``ata_sff_tf_load`` + ``ata_sff_exec_command``)."""
        if lba + count > LBA28_MAX:
            raise AtaError(f"LBA {lba}+{count} is beyond LBA28")
        status = await self._wait()
        if status & Status.DRQ:
            raise AtaError(f"the drive still wants data (status {status:#04x}) before {cmd.name}")
        io = self.io
        await io.outb(NSECTOR, count & 0xFF)
        await io.outb(LBA_LOW, lba & 0xFF)
        await io.outb(LBA_MID, lba >> 8 & 0xFF)
        await io.outb(LBA_HIGH, lba >> 16 & 0xFF)
        await io.outb(DEVICE, DEV_OBSOLETE | DEV_LBA | lba >> 24 & 0x0F)
        await io.outb(STATUS, cmd)

    async def _drq(self, what: str) -> None:
        """Wait for the next DRQ block; ERR (or no DRQ) ends the command with the error register's reason."""
        status = await self._wait()
        if status & Status.ERR or not status & Status.DRQ:
            raise await self._error(status, what)

    async def _data_in(self) -> bytes:
        await self._drq("data in")
        if self.pio == "string":
            return await self.io.rep_ins(DATA, 2, WORDS_PER_SECTOR)
        words = [await self.io.inw(DATA) for _ in range(WORDS_PER_SECTOR)]
        return b"".join(w.to_bytes(2, "little") for w in words)

    async def _data_out(self, sector: bytes) -> None:
        await self._drq("data out")
        if self.pio == "string":
            await self.io.rep_outs(DATA, 2, sector)
            return
        for i in range(0, SECTOR, 2):
            await self.io.outw(DATA, int.from_bytes(sector[i:i + 2], "little"))

    async def _finish(self, what: str) -> None:
        status = await self._wait()
        if status & (Status.ERR | Status.DRQ) or not status & Status.DRDY:
            raise await self._error(status, what)

    async def _error(self, status: int, what: str) -> AtaError:
        error = await self.io.inb(ERROR) if status & Status.ERR else 0
        names = "|".join(e.name or "" for e in Error if error & e) or "none"
        return AtaError(f"{what}: status {status:#04x}, error {error:#04x} ({names})", error)
