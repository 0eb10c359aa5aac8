"""Lab 6, part A: the guest's ATA PIO read, register by register.

``read_sectors(io, lba, count, pio)`` reads ``count`` sectors from LBA ``lba`` of device 0 on the primary
IDE channel, polling (interrupts are off), the way a BIOS or Linux libata's polled SFF path does
(drivers/ata/libata-sff.c): wait for BSY to clear, load the task file, write READ SECTORS, then per sector
wait for DRQ and move 256 words through the data port, and at the end check the status once more. ``io`` is
the vCPU's port I/O (``emulab.TracedPortIo``); every call on it is one VM exit, except ``rep_ins``, which
costs what KVM's string-I/O emulation costs (one exit for a whole 512-byte sector).
"""

from __future__ import annotations

from typing import Any

from vmbus_proto.devices.ata.registers import (  # noqa: F401  (what read_sectors needs)
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


class AtaReadError(OSError):
    """The drive ended the command with ERR; ``error`` is its error register."""

    def __init__(self, message: str, error: int) -> None:
        super().__init__(message)
        self.error = error


async def read_sectors(io: Any, lba: int, count: int, pio: str = "string") -> bytes:
    """``count`` (1-256) sectors from ``lba`` (LBA28); ``pio`` "string" (``rep insw``) or "word" (``inw``).

    1. Read STATUS (``await io.inb(STATUS)``) until BSY is clear.
    2. Load the task file with ``await io.outb(port, value)``: NSECTOR (the count; 256 is written as 0),
       LBA_LOW, LBA_MID, LBA_HIGH (bits 0-23 of the LBA), DEVICE (DEV_OBSOLETE | DEV_LBA | bits 24-27).
    3. Write Command.READ_SECTORS to COMMAND.
    4. For each sector: read STATUS until BSY is clear; ERR set: read ERROR and raise AtaReadError; no DRQ:
       raise too; else move the sector: ``await io.rep_ins(DATA, 2, WORDS_PER_SECTOR)`` (string) or
       WORDS_PER_SECTOR times ``await io.inw(DATA)`` (word; each a little-endian 16-bit value).
    5. Read STATUS until BSY is clear once more: ERR (read ERROR, raise) or DRQ still set is an error.
    """
    raise NotImplementedError("read_sectors()")
