"""SCSI as it travels inside VSTOR: operation codes, status and sense definitions, and the CDBs a guest sends.

Shared by both ends of the synthetic SCSI controller: the host's SCSI target (parent_partition, after
OpenVMM vm/devices/storage/scsidisk and scsi_defs) parses what the guest's StorVSC (child_partition, after
Linux drivers/scsi/sd.c and scsi_scan.c) builds here. Numbers and field layouts are T10 SPC-3 / SBC-3;
fixed-format sense is SPC-3 4.5.3 (OpenVMM ``scsi::SenseData``). Sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "ASCQ_CAPACITY_DATA_CHANGED",
    "ASCQ_SPACE_ALLOCATION_FAILED",
    "CDB_LENGTH",
    "DEVICE_NOT_PRESENT",
    "DEVICE_TYPE_DISK",
    "INQUIRY_CMDQUE",
    "SA_GET_LBA_STATUS",
    "SA_READ_CAPACITY16",
    "SENSE_LENGTH",
    "Asc",
    "Op",
    "ScsiStatus",
    "SenseKey",
    "fixed_sense",
    "get_lba_status_cdb",
    "inquiry_cdb",
    "inquiry_tagged",
    "mode_sense6_cdb",
    "read_capacity16_cdb",
    "read_write_cdb",
    "report_luns",
    "report_luns_cdb",
    "sense_fields",
    "synchronize_cache10_cdb",
    "test_unit_ready_cdb",
    "unmap_cdb",
    "unmap_parameters",
    "write_same16_cdb",
]


class Op(enum.IntEnum):
    """Operation codes the synthetic disk answers and the guest sends (SPC-3 / SBC-3 numbering)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SENSE6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY10 = 0x25
    READ10 = 0x28
    WRITE10 = 0x2A
    SYNCHRONIZE_CACHE10 = 0x35
    UNMAP = 0x42
    MODE_SENSE10 = 0x5A
    READ16 = 0x88
    WRITE16 = 0x8A
    SYNCHRONIZE_CACHE16 = 0x91
    WRITE_SAME16 = 0x93
    SERVICE_ACTION_IN16 = 0x9E
    REPORT_LUNS = 0xA0


# Shortest CDB each command needs; a shorter one is ILLEGAL REQUEST / INVALID FIELD IN CDB.
# Longer ones are fine: VSTOR carries CDBs in a 16-byte field.
CDB_LENGTH: dict[int, int] = {
    Op.TEST_UNIT_READY: 6, Op.REQUEST_SENSE: 6, Op.INQUIRY: 6, Op.MODE_SENSE6: 6, Op.START_STOP_UNIT: 6,
    Op.PREVENT_ALLOW_MEDIUM_REMOVAL: 6, Op.READ_CAPACITY10: 10, Op.READ10: 10, Op.WRITE10: 10,
    Op.SYNCHRONIZE_CACHE10: 10, Op.UNMAP: 10, Op.MODE_SENSE10: 10, Op.READ16: 16, Op.WRITE16: 16,
    Op.SYNCHRONIZE_CACHE16: 16, Op.SERVICE_ACTION_IN16: 16, Op.REPORT_LUNS: 12, Op.WRITE_SAME16: 16,
}


class ScsiStatus(enum.IntEnum):
    """SAM status byte values."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    RESERVATION_CONFLICT = 0x18


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7


class Asc(enum.IntEnum):
    """Additional sense codes (SPC-3 Annex D)."""

    NO_ADDITIONAL_SENSE = 0x00
    WRITE_ERROR = 0x0C
    UNRECOVERED_READ_ERROR = 0x11
    PARAMETER_LIST_LENGTH_ERROR = 0x1A
    INVALID_COMMAND_OPERATION_CODE = 0x20
    LBA_OUT_OF_RANGE = 0x21
    INVALID_FIELD_IN_CDB = 0x24
    INVALID_FIELD_IN_PARAMETER_LIST = 0x26
    WRITE_PROTECTED = 0x27
    PARAMETERS_CHANGED = 0x2A
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x39
    INTERNAL_TARGET_FAILURE = 0x44


ASCQ_SPACE_ALLOCATION_FAILED = 0x07  # with ASC 0x27: a thin disk whose host filesystem is full
ASCQ_CAPACITY_DATA_CHANGED = 0x09  # with ASC 0x2A

SENSE_LENGTH = 18
DEVICE_TYPE_DISK = 0x00
DEVICE_NOT_PRESENT = 0x7F  # INQUIRY byte 0: peripheral qualifier 011b, type 0x1F
INQUIRY_CMDQUE = 0x02  # INQUIRY byte 7: the device queues commands (tagged queuing)
SA_READ_CAPACITY16 = 0x10  # SERVICE ACTION IN (16) service actions (SBC-3)
SA_GET_LBA_STATUS = 0x12

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CDB6 = struct.Struct(">BBBBBB")
_CDB10 = struct.Struct(">BBIBHB")
_CDB16 = struct.Struct(">BBQIBB")
_CDB12_ALLOC = struct.Struct(">BBBBBBIBB")
_PACK10, _PACK16 = _CDB10.pack, _CDB16.pack  # READ/WRITE: every I/O builds one
_READ10, _WRITE10, _READ16, _WRITE16 = int(Op.READ10), int(Op.WRITE10), int(Op.READ16), int(Op.WRITE16)


def fixed_sense(key: int, asc: int, ascq: int = 0) -> bytes:
    """18 bytes of fixed-format sense (SPC-3 4.5.3): response code 0x70, additional length 10."""
    sense = bytearray(SENSE_LENGTH)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    sense[7] = SENSE_LENGTH - 8
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


def sense_fields(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed-format sense; zeros where the bytes are missing."""
    key = sense[2] & 0x0F if len(sense) > 2 else 0
    return (key, sense[12], sense[13]) if len(sense) > 13 else (key, 0, 0)


def inquiry_tagged(data: bytes) -> bool:
    """Whether standard INQUIRY data lets Linux queue tagged commands (scsi_scan.c ``scsi_add_lun``:
    SCSI-2 or later and CmdQue set, ``sdev->tagged_supported``)."""
    return len(data) > 7 and (data[2] & 0x07) >= 2 and bool(data[7] & INQUIRY_CMDQUE)


# ---- the CDBs a guest sends (Linux scsi_scan.c / sd.c) ------------------------------------------------------

def test_unit_ready_cdb() -> bytes:
    return bytes(6)


def inquiry_cdb(allocation: int, page: int | None = None) -> bytes:
    """INQUIRY: standard data, or the VPD ``page`` (EVPD=1)."""
    return _CDB6.pack(Op.INQUIRY, 0 if page is None else 0x01, page or 0, allocation >> 8, allocation & 0xFF, 0)


def report_luns_cdb(allocation: int, select: int = 0) -> bytes:
    return _CDB12_ALLOC.pack(Op.REPORT_LUNS, 0, select, 0, 0, 0, allocation, 0, 0)


def report_luns(data: bytes) -> list[int]:
    """The LUN numbers in REPORT LUNS data (single-level, peripheral or flat addressing), as far as ``data``
    holds them."""
    if len(data) < 8:
        return []
    count = _U32.unpack_from(data)[0] // 8
    return [_U16.unpack_from(data, 8 + 8 * i)[0] & 0x3FFF for i in range(count) if 16 + 8 * i <= len(data)]


def read_capacity16_cdb(allocation: int) -> bytes:
    return _CDB16.pack(Op.SERVICE_ACTION_IN16, SA_READ_CAPACITY16, 0, allocation, 0, 0)


def get_lba_status_cdb(lba: int, allocation: int) -> bytes:
    return _CDB16.pack(Op.SERVICE_ACTION_IN16, SA_GET_LBA_STATUS, lba, allocation, 0, 0)


def mode_sense6_cdb(page: int, allocation: int, *, dbd: bool = False) -> bytes:
    return _CDB6.pack(Op.MODE_SENSE6, 0x08 if dbd else 0, page, 0, allocation, 0)


def read_write_cdb(write: bool, lba: int, blocks: int, fua: bool = False) -> bytes:
    """READ/WRITE(10) when the range fits its 32-bit LBA and 16-bit count, else (16), as sd.c chooses."""
    if lba + blocks <= 0xFFFFFFFF and blocks <= 0xFFFF:
        return _PACK10(_WRITE10 if write else _READ10, 0x08 if fua else 0, lba, 0, blocks, 0)
    return _PACK16(_WRITE16 if write else _READ16, 0x08 if fua else 0, lba, blocks, 0, 0)  # FUA is bit 3


def synchronize_cache10_cdb(lba: int = 0, blocks: int = 0) -> bytes:
    """SYNCHRONIZE CACHE(10); a count of 0 means "to the end"."""
    return _CDB10.pack(Op.SYNCHRONIZE_CACHE10, 0, lba, 0, blocks, 0)


def write_same16_cdb(lba: int, blocks: int, *, unmap: bool = False) -> bytes:
    return _CDB16.pack(Op.WRITE_SAME16, 0x08 if unmap else 0, lba, blocks, 0, 0)


def unmap_parameters(lba: int, blocks: int) -> bytes:
    """An UNMAP parameter list with one block descriptor (SBC-3 5.28.2)."""
    descriptor = struct.pack(">QI4x", lba, blocks)
    return struct.pack(">HH4x", 6 + len(descriptor), len(descriptor)) + descriptor


def unmap_cdb(parameter_length: int) -> bytes:
    return _CDB10.pack(Op.UNMAP, 0, 0, 0, parameter_length, 0)
