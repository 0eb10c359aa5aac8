"""The ATA register interface of a primary IDE channel: ports, status and error bits, commands, IDENTIFY.

The numbers are ATA/ATAPI-6 (T13 1410D) §7, "Register descriptions", and Table 27 (IDENTIFY DEVICE data),
as QEMU hw/ide (include/hw/ide/internal.h: ``BUSY_STAT`` ... ``ABRT_ERR``, ``WIN_READ``) and Linux
include/linux/ata.h (``ATA_BUSY``, ``ATA_CMD_PIO_READ``, ``ATA_ID_LBA_CAPACITY``) name them. The legacy
primary channel decodes 0x1F0-0x1F7 (command block) and 0x3F6 (control block).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

SECTOR = 512
WORDS_PER_SECTOR = SECTOR // 2
LBA28_MAX = 1 << 28  # sectors LBA28 addresses (128 GiB)
CHS_HEADS, CHS_SECTORS = 16, 63  # the default translation (IDENTIFY words 3 and 6)

# Primary channel ports: the command block, then the control block.
CMD_BASE = 0x1F0
DATA, ERROR, NSECTOR, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS = range(CMD_BASE, CMD_BASE + 8)
FEATURES, COMMAND = ERROR, STATUS  # the same ports, written
CTRL = 0x3F6  # read: alternate status (no interrupt acknowledge); write: device control
CMD_PORTS = 8


class Status(enum.IntFlag):
    ERR = 0x01  # the previous command ended in error: see the error register
    IDX = 0x02  # obsolete
    CORR = 0x04  # obsolete
    DRQ = 0x08  # data request: the data port is ready for a PIO transfer
    DSC = 0x10  # seek complete (obsolete in ATA-6, still set by drives and QEMU)
    DF = 0x20  # device fault
    DRDY = 0x40  # the device accepts commands
    BSY = 0x80  # busy: every other bit is invalid


class Error(enum.IntFlag):
    AMNF = 0x01
    TK0NF = 0x02
    ABRT = 0x04  # command aborted: not supported, bad parameter, or an error with no better bit
    MCR = 0x08
    IDNF = 0x10  # ID not found: the address is outside the user-accessible sectors
    MC = 0x20
    UNC = 0x40  # uncorrectable data error: the media failed the read
    ICRC = 0x80


class Command(enum.IntEnum):
    READ_SECTORS = 0x20
    READ_SECTORS_NORETRY = 0x21
    WRITE_SECTORS = 0x30
    WRITE_SECTORS_NORETRY = 0x31
    FLUSH_CACHE = 0xE7
    IDENTIFY_DEVICE = 0xEC
    SET_FEATURES = 0xEF


class Feature(enum.IntEnum):
    """SET FEATURES subcommands this drive takes (ATA/ATAPI-6 Table 33)."""

    ENABLE_WRITE_CACHE = 0x02
    SET_TRANSFER_MODE = 0x03
    DISABLE_WRITE_CACHE = 0x82


DEV_LBA = 0x40  # device register: LBA addressing (clear: CHS)
DEV_SLAVE = 0x10  # device register: device 1
DEV_OBSOLETE = 0xA0  # bits 7 and 5, set by every driver
CTRL_NIEN = 0x02  # device control: interrupts disabled
CTRL_SRST = 0x04  # device control: software reset


def lba28(device: int, high: int, mid: int, low: int) -> int:
    return (device & 0x0F) << 24 | high << 16 | mid << 8 | low


def chs_to_lba(cylinder: int, head: int, sector: int) -> int | None:
    """The LBA of a CHS address under the default translation (sector numbers start at 1; 0 is none)."""
    if not 1 <= sector <= CHS_SECTORS:
        return None
    return (cylinder * CHS_HEADS + head) * CHS_SECTORS + sector - 1


# ---- IDENTIFY DEVICE ----------------------------------------------------------------------------------

def _ata_string(text: str, words: int) -> list[int]:
    """An IDENTIFY string: space-padded ASCII, two characters a word, the first in the high byte."""
    raw = text.encode("ascii")[:2 * words].ljust(2 * words, b" ")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]


def identify_data(sectors: int, *, serial: str, model: str, firmware: str, write_cache: bool = True) -> bytes:
    """The 256 IDENTIFY DEVICE words (ATA/ATAPI-6 Table 27) of a fixed ATA disk of ``sectors`` sectors with
    LBA28, PIO only, and a volatile write cache that FLUSH CACHE empties; word 255 carries the checksum."""
    w = [0] * 256
    w[0] = 0x0040  # ATA device, fixed
    cylinders = min(sectors // (CHS_HEADS * CHS_SECTORS), 16383)
    w[1], w[3], w[6] = cylinders, CHS_HEADS, CHS_SECTORS
    w[10:20] = _ata_string(serial, 10)
    w[23:27] = _ata_string(firmware, 4)
    w[27:47] = _ata_string(model, 20)
    w[47] = 0x8000  # READ/WRITE MULTIPLE: not supported (0 sectors)
    w[49] = 0x0200  # LBA supported (no DMA: this controller is PIO only)
    w[50] = 0x4000
    w[53] = 0x0003  # words 54-58 and 64-70 are valid
    chs = cylinders * CHS_HEADS * CHS_SECTORS
    w[54], w[55], w[56], w[57], w[58] = cylinders, CHS_HEADS, CHS_SECTORS, chs & 0xFFFF, chs >> 16
    user = min(sectors, LBA28_MAX - 1)
    w[60], w[61] = user & 0xFFFF, user >> 16
    w[64] = 0x0003  # PIO modes 3 and 4
    w[80] = 0x007E  # ATA-1 to ATA-6
    w[82] = 0x0020  # write cache supported
    w[83] = 0x4000 | 0x1000  # FLUSH CACHE supported
    w[84] = 0x4000
    w[85] = 0x0020 if write_cache else 0
    w[86] = 0x1000
    w[87] = 0x4000
    w[255] = 0x00A5  # integrity word: signature; checksum below
    raw = bytearray(struct.pack("<256H", *w))
    raw[511] = -sum(raw[:511]) & 0xFF  # every byte of the 512 sums to 0 (mod 256)
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class IdentifyInfo:
    model: str
    serial: str
    firmware: str
    sectors: int  # LBA28 user-addressable sectors (words 60-61)
    lba: bool
    flush_cache: bool
    write_cache: bool


def _text(words: tuple[int, ...]) -> str:
    return b"".join(bytes((v >> 8, v & 0xFF)) for v in words).decode("ascii", "replace").strip()


def parse_identify(data: bytes) -> IdentifyInfo:
    """What a driver reads from IDENTIFY DEVICE data (Linux ``ata_id_*``); ValueError if it is not valid."""
    if len(data) != SECTOR:
        raise ValueError(f"IDENTIFY data is {len(data)} bytes, not {SECTOR}")
    w = struct.unpack("<256H", data)
    if w[0] & 0x8000:
        raise ValueError("IDENTIFY word 0 says this is not an ATA device")
    if w[255] & 0xFF == 0xA5 and sum(data) & 0xFF:
        raise ValueError("IDENTIFY checksum (word 255) does not match")
    return IdentifyInfo(model=_text(w[27:47]), serial=_text(w[10:20]), firmware=_text(w[23:27]),
                        sectors=w[60] | w[61] << 16, lba=bool(w[49] & 0x0200), flush_cache=bool(w[83] & 0x1000),
                        write_cache=bool(w[85] & 0x0020))
