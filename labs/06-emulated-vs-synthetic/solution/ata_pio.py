"""Lab 6, part A: the guest's ATA PIO read, register by register (reference solution).

``read_sectors(io, lba, count, pio)`` reads ``count`` sectors from LBA ``lba`` of device 0 on the primary
IDE channel, polling (interrupts are off), the way a BIOS or Linux libata's polled SFF path does
(drivers/ata/libata-sff.c): wait for BSY to clear, load the task file, write READ SECTORS, then per sector
wait for DRQ and move 256 words through the data port, and at the end check the status once more. ``io`` is
the vCPU's port I/O (``emulab.TracedPortIo``); every call on it is one VM exit, except ``rep_ins``, which
costs what KVM's string-I/O emulation costs (one exit for a whole 512-byte sector).
"""

from __future__ import annotations

from typing import Any

from vmbus_proto.devices.ata.registers import (
    DATA,
    DEV_LBA,
    DEV_OBSOLETE,
    DEVICE,
    ERROR,
    LBA_HIGH,
    LBA_LOW,
    LBA_MID,
    NSECTOR,
    STATUS,
    WORDS_PER_SECTOR,
    Command,
    Status,
)

COMMAND = STATUS  # the same port: read, it is the status; written, the command
MAX_POLLS = 1_000_000  # a drive that stays busy this long is broken


class AtaReadError(OSError):
    """The drive ended the command with ERR; ``error`` is its error register."""

    def __init__(self, message: str, error: int) -> None:
        super().__init__(message)
        self.error = error


async def wait_not_busy(io: Any) -> int:
    """Read the status register until BSY is clear; the status."""
    for _ in range(MAX_POLLS):
        status: int = await io.inb(STATUS)
        if not status & Status.BSY:
            return status
    raise TimeoutError(f"the drive stayed busy for {MAX_POLLS} polls")


async def check(io: Any, status: int, what: str) -> None:
    """ERR set: read the error register and raise."""
    if status & Status.ERR:
        error = await io.inb(ERROR)
        raise AtaReadError(f"{what}: status {status:#04x}, error {error:#04x}", error)


async def read_sectors(io: Any, lba: int, count: int, pio: str = "string") -> bytes:
    """``count`` (1-256) sectors from ``lba`` (LBA28); ``pio`` "string" (``rep insw``) or "word" (``inw``)."""
    if not 1 <= count <= 256 or not 0 <= lba < 1 << 28:
        raise ValueError(f"LBA {lba} count {count}: LBA28 and 1-256 sectors")
    await wait_not_busy(io)
    await io.outb(NSECTOR, count & 0xFF)  # 256 is written as 0
    await io.outb(LBA_LOW, lba & 0xFF)
    await io.outb(LBA_MID, lba >> 8 & 0xFF)
    await io.outb(LBA_HIGH, lba >> 16 & 0xFF)
    await io.outb(DEVICE, DEV_OBSOLETE | DEV_LBA | lba >> 24 & 0x0F)
    await io.outb(COMMAND, Command.READ_SECTORS)
    out = bytearray()
    for i in range(count):
        status = await wait_not_busy(io)
        await check(io, status, f"READ SECTORS at LBA {lba}, sector {i}")
        if not status & Status.DRQ:
            raise AtaReadError(f"READ SECTORS at LBA {lba}: no DRQ for sector {i} (status {status:#04x})", 0)
        if pio == "string":
            out += await io.rep_ins(DATA, 2, WORDS_PER_SECTOR)
        else:
            for _ in range(WORDS_PER_SECTOR):
                out += (await io.inw(DATA)).to_bytes(2, "little")
    status = await wait_not_busy(io)
    await check(io, status, f"READ SECTORS at LBA {lba}")
    if status & Status.DRQ:
        raise AtaReadError(f"READ SECTORS at LBA {lba}: the drive has more data (status {status:#04x})", 0)
    return bytes(out)
