"""SCSI target for the synthetic SCSI controller: a direct-access disk per LUN, and the controller that
owns one (path, target) and answers REPORT LUNS and absent LUNs.

Mirrors OpenVMM vm/devices/storage/scsidisk (``SimpleScsiDisk``: ``execute_scsi``, ``process_result``,
inquiry.rs, unmap.rs) and the controller half of vm/devices/storage/storvsp/src/lib.rs
(``ScsiCommandQueue::execute_scsi``: REPORT LUNS, INQUIRY to an absent LUN, INVALID_LUN), shaped by what
Linux sd/scsi_scan expect (drivers/scsi/sd.c, scsi_scan.c) and by T10 SPC-3 / SBC-3 for field layouts.

Commands a disk answers (anything else is CHECK CONDITION, ILLEGAL REQUEST, ASC 0x20):

* TEST UNIT READY (0x00), PREVENT ALLOW MEDIUM REMOVAL (0x1E): GOOD, nothing done.
* START STOP UNIT (0x1B): GOOD; a stop (START=0) flushes first, as OpenVMM does.
* REQUEST SENSE (0x03): fixed-format NO SENSE. Sense always travels with its command (autosense), so
  there is never deferred sense to report.
* INQUIRY (0x12): standard data (104 bytes, OpenVMM's ``INQUIRY_DATA_TEMPLATE`` layout: SPC-3, response
  format 2, CmdQue, "Msft" / "Virtual Disk" / "1.0 ") and VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2.
* READ CAPACITY (10) (0x25) and SERVICE ACTION IN (16) / READ CAPACITY (16) (0x9E/0x10): LBPME and LBPRZ
  on a writable disk (a deallocated block reads as zeros: a punched hole, or zeros where none can be punched).
* SERVICE ACTION IN (16) / GET LBA STATUS (0x9E/0x12): mapped and deallocated extents from the image's
  SEEK_DATA / SEEK_HOLE (SBC-3 5.5; a device with LBPME must support it).
* READ (10) / (16) (0x28 / 0x88), WRITE (10) / (16) (0x2A / 0x8A); FUA on a WRITE means durable on return.
* SYNCHRONIZE CACHE (10) / (16) (0x35 / 0x91): GOOD only after ``fdatasync``.
* MODE SENSE (6) / (10) (0x1A / 0x5A): the caching page (0x08, WCE=1) and all pages (0x3F).
* UNMAP (0x42): punches holes.
* WRITE SAME (16) (0x93): the block repeated over the range; with UNMAP=1 and a zero block the range is
  deallocated (a hole, which reads back as that zero block), as Linux sd sends for a discard or a
  REQ_OP_WRITE_ZEROES that may unmap once VPD 0xB2 says LBPWS (sd.c ``sd_setup_write_same16_cmnd``); a zero
  block without UNMAP zeroes the range and keeps it allocated (ZERO_RANGE). VPD 0xB0 sets WSNZ (a count of
  0 is refused) and the MAXIMUM WRITE SAME LENGTH.

REPORT LUNS (0xA0) is answered by :class:`ScsiController` for every LUN, present or not.

Opcodes, statuses and sense codes are the protocol package's (vmbus_proto/devices/storage/scsi.py), the
same definitions the guest builds its CDBs from.

Result rules (OpenVMM ``process_result``): a bad CDB or parameter field, an unsupported command or page,
and an LBA out of range are ILLEGAL REQUEST with SRB INVALID_REQUEST (OpenVMM validates the range from the
CDB: ``ScsiError::IllegalRequest(ILLEGAL_BLOCK)``); a write to a read-only disk is DATA PROTECT / WRITE
PROTECTED with SRB ERROR; a backend failure is MEDIUM ERROR (ASC 0x11 reading, 0x0C writing) with SRB
ERROR, and a full host filesystem (ENOSPC) DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (0x27/0x07),
each logged once per burst (:class:`FailureBurst`); a failure of our own (a bug, an unexpected exception) is
logged with its traceback and answered HARDWARE ERROR / INTERNAL TARGET FAILURE with SRB ERROR. Whenever sense
is returned the SRB status carries AUTOSENSE_VALID (0x80), as OpenVMM's storvsp sets it. Nothing a guest sends
makes ``execute`` raise.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import re
import struct
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmbus_proto.aio import logs
from vmbus_proto.devices.storage.scsi import (
    ASCQ_SPACE_ALLOCATION_FAILED,
    CDB_LENGTH,
    DEVICE_NOT_PRESENT,
    DEVICE_TYPE_DISK,
    INQUIRY_CMDQUE,
    SA_GET_LBA_STATUS,
    SA_READ_CAPACITY16,
    SENSE_LENGTH,
    Asc,
    Op,
    ScsiStatus,
    SenseKey,
    fixed_sense,
)
from vmbus_proto.devices.storage.vstor import DEFAULT_MAX_TRANSFER_BYTES, SRB_STATUS_AUTOSENSE_VALID, SrbStatus
from vmbus_proto.packets import Buffer

from .disk import BLOCK_SIZE, DiskBackend, DiskError, default_executor

__all__ = [
    "ASCQ_SPACE_ALLOCATION_FAILED",
    "CDB_LENGTH",
    "DEFAULT_DISK_BYTES",
    "DEVICE_NOT_PRESENT",
    "INQUIRY_DATA_LENGTH",
    "MAX_LUNS",
    "MAX_UNMAP_DESCRIPTORS",
    "MAX_UNMAP_LBA_COUNT",
    "MAX_WRITE_SAME_BLOCKS",
    "PRODUCT_ID",
    "PRODUCT_REVISION",
    "SENSE_LENGTH",
    "VENDOR_ID",
    "VPD_PAGES",
    "Asc",
    "BlockBackend",
    "LunConfig",
    "Op",
    "ScsiController",
    "ScsiDisk",
    "ScsiResult",
    "ScsiStatus",
    "SenseKey",
    "default_luns",
    "disk_id_for",
    "fixed_sense",
    "inquiry_data",
    "legacy_partition_dir_name",
    "open_disks",
    "partition_dir_name",
]


VENDOR_ID = b"Msft    "
PRODUCT_ID = b"Virtual Disk    "
PRODUCT_REVISION = b"1.0 "
INQUIRY_DATA_LENGTH = 104  # OpenVMM scsi_defs InquiryData (Windows INQUIRYDATA): additional length 99
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
OPTIMAL_GRANULARITY_BLOCKS = 8  # 4 KiB: the host filesystem's block, the unit a hole is punched in
MAX_UNMAP_LBA_COUNT = 1 << 22  # 2 GiB per UNMAP, so even the zero-filling fallback finishes promptly
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = MAX_UNMAP_LBA_COUNT  # VPD 0xB0 MAXIMUM WRITE SAME LENGTH
LBA_STATUS_MAPPED = 0x0  # GET LBA STATUS provisioning status (SBC-3 table 62)
LBA_STATUS_DEALLOCATED = 0x1
_WRITE_SAME_CHUNK = 1 << 20  # a non-zero WRITE SAME pattern is written this many bytes at a time
MAX_LUNS = 255  # Linux storvsc: LUNs 0..254 per target
DEFAULT_DISK_BYTES = 1 << 30

_DSP_WRITE_PROTECT = 0x80  # MODE SENSE device-specific parameter bits (SBC-3 6.3.1)
_DSP_DPOFUA = 0x10
_CACHING_PAGE = 0x08
_ALL_PAGES = 0x3F
_WCE = 0x04

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What one command did: the SRB status (with AUTOSENSE_VALID when ``sense`` is set), the SAM status,
    fixed-format sense, the bytes for the guest (already cut to the allocation and buffer lengths) and the
    number of bytes moved in either direction."""

    srb_status: int
    scsi_status: int
    sense: bytes = b""
    data: Buffer = b""
    transferred: int = 0
    failure: DiskError | None = field(default=None, compare=False, repr=False)  # the backend error, if one

    @property
    def sense_key(self) -> int | None:
        return self.sense[2] & 0x0F if len(self.sense) >= 3 else None

    @property
    def asc(self) -> int | None:
        return self.sense[12] if len(self.sense) >= 14 else None

    @property
    def ascq(self) -> int | None:
        return self.sense[13] if len(self.sense) >= 14 else None


class ReadCached(Protocol):
    """A backend's ``read_cached(offset, length, into=None)``: the data now, or None if it is not cached."""

    def __call__(self, offset: int, length: int, into: memoryview | None = None) -> Buffer | None: ...


class ReadSoon(Protocol):
    """A backend's ``read_soon(offset, length, into=None)``: a future of the data (``into[:length]`` if given)."""

    def __call__(self, offset: int, length: int, into: memoryview | None = None) -> asyncio.Future[Buffer]: ...


def _good(data: Buffer = b"", transferred: int | None = None) -> ScsiResult:
    return ScsiResult(SrbStatus.SUCCESS, ScsiStatus.GOOD, b"", data, len(data) if transferred is None else transferred)


def _check(srb: int, key: int, asc: int, ascq: int = 0) -> ScsiResult:
    return ScsiResult(srb | SRB_STATUS_AUTOSENSE_VALID, ScsiStatus.CHECK_CONDITION, fixed_sense(key, asc, ascq))


class _Check(Exception):
    """Raised inside a handler to end the command with CHECK CONDITION."""

    def __init__(self, srb: int, key: int, asc: int, ascq: int = 0) -> None:
        super().__init__(f"sense {key:#x}/{asc:#04x}/{ascq:#04x}")
        self.result = _check(srb, key, asc, ascq)


class _Raised(_Check):
    """A ready-made result (a backend failure) carried out of a helper like a check condition."""

    def __init__(self, result: ScsiResult) -> None:
        Exception.__init__(self, "backend failure")
        self.result = result


def _illegal(asc: int, ascq: int = 0) -> _Check:
    return _Check(SrbStatus.INVALID_REQUEST, SenseKey.ILLEGAL_REQUEST, asc, ascq)


def _write_protected() -> _Check:
    return _Check(SrbStatus.ERROR, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def _io_failure(exc: DiskError, writing: bool) -> ScsiResult:
    """A backend error as the guest sees it (Linux's target, target_core_transport.c ``sense_detail_table``:
    a full thin store is TCM_SPACE_ALLOCATION_FAILED_WRITE_PROTECT, DATA PROTECT 0x27/0x07; a failed read or
    write is MEDIUM ERROR, 0x11 or 0x0C)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        result = _check(SrbStatus.ERROR, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED, ASCQ_SPACE_ALLOCATION_FAILED)
    elif exc.errno == errno.EROFS:
        result = _check(SrbStatus.ERROR, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    else:
        asc = Asc.WRITE_ERROR if writing else Asc.UNRECOVERED_READ_ERROR
        result = _check(SrbStatus.ERROR, SenseKey.MEDIUM_ERROR, asc)
    return ScsiResult(result.srb_status, result.scsi_status, result.sense, failure=exc)


# Commands whose GOOD answer ends a burst of backend failures in their direction (a SYNCHRONIZE CACHE with
# nothing dirty succeeds on a full disk, so it ends nothing).
_READS = frozenset({Op.READ10, Op.READ16})
_WRITES = frozenset({Op.WRITE10, Op.WRITE16, Op.UNMAP, Op.WRITE_SAME16})
_READING = _READS | {Op.SERVICE_ACTION_IN16}  # a failure of one of these is a read failure


class FailureBurst:
    """Backend failures of one disk, logged once per burst and direction (Linux ratelimits its "critical medium
    error" and "Buffer I/O error" lines the same way): the first failed read or write is a warning with its errno
    and the sense the guest gets; the rest are only counted until a read (or write) to the disk succeeds, which
    logs how many failed. A guest retrying into a full or broken disk so costs two lines, not one per command."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = {False: 0, True: 0}  # writing -> failed commands in the current burst

    def note(self, result: ScsiResult, opcode: int, log: Any) -> ScsiResult:
        exc = result.failure
        if exc is not None:
            writing = opcode not in _READING
            if not self.failed[writing]:
                (log if log is not None else logs.get(component="scsi")).warning(
                    "disk I/O failing; answering CHECK CONDITION until it recovers", opcode=f"{opcode:#04x}",
                    errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)), error=exc.strerror,
                    sense=f"{result.sense_key:#x}/{result.asc:#04x}/{result.ascq:#04x}")
            self.failed[writing] += 1
        elif result.scsi_status == ScsiStatus.GOOD and (opcode in _READS or opcode in _WRITES):
            writing = opcode in _WRITES
            if self.failed[writing]:
                (log if log is not None else logs.get(component="scsi")).info(
                    "disk I/O recovered", writes=writing, failed_commands=self.failed[writing])
                self.failed[writing] = 0
        return result


def _internal_failure(log: Any, cdb: bytes, exc: BaseException | None = None) -> ScsiResult:
    """A bug of ours or an unexpected backend failure: logged with its traceback (``exc``, or the exception
    being handled), then answered as HARDWARE ERROR / INTERNAL TARGET FAILURE so the guest is never left
    waiting."""
    (log if log is not None else logs.get(component="scsi")).error(
        "SCSI command failed; answering HARDWARE ERROR", opcode=f"{cdb[0]:#04x}" if cdb else None,
        exc_info=exc if exc is not None else True)
    return _check(SrbStatus.ERROR, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


def inquiry_data(device_type: int = DEVICE_TYPE_DISK, *, identity: bool = True, cmdque: bool = True) -> bytes:
    """Standard INQUIRY data (OpenVMM ``INQUIRY_DATA_TEMPLATE``): not removable, version 0x05 (SPC-3),
    response data format 2, additional length 99; vendor/product/revision only with ``identity``."""
    data = bytearray(INQUIRY_DATA_LENGTH)
    data[0] = device_type
    data[2] = 0x05
    data[3] = 0x02
    data[4] = INQUIRY_DATA_LENGTH - 5
    data[7] = INQUIRY_CMDQUE if cmdque else 0x00
    if identity:
        data[8:16] = VENDOR_ID
        data[16:32] = PRODUCT_ID
        data[32:36] = PRODUCT_REVISION
    return bytes(data)


def _vpd_page(page: int, body: bytes) -> bytes:
    return bytes((DEVICE_TYPE_DISK, page)) + _U16.pack(len(body)) + body


class BlockBackend(Protocol):
    """What :class:`ScsiDisk` needs from its storage (:class:`parent_partition.disk.DiskBackend` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> bool: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Request:
    cdb: bytes
    data_out: bytes | bytearray | memoryview
    data_in_length: int

    def reply(self, payload: bytes, allocation_length: int) -> ScsiResult:
        """GOOD with ``payload`` cut to the CDB's allocation length and the guest's buffer."""
        n = min(len(payload), allocation_length, self.data_in_length)
        return _good(payload[:n])


_Handler = Callable[[_Request], Awaitable[ScsiResult]]


class ScsiDisk:
    """A SCSI direct-access block device (OpenVMM ``SimpleScsiDisk``) over a :class:`BlockBackend`.

    ``disk_id`` names the disk: the unit serial number (VPD 0x80) and both device identifiers (VPD 0x83)
    derive from it, so keep it stable across restarts. ``max_transfer_bytes`` is the controller's limit
    (VSTOR ``max_transfer_bytes``), reported in VPD 0xB0 and enforced on READ/WRITE.
    """

    def __init__(self, backend: BlockBackend, *, disk_id: uuid.UUID,
                 max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES, serial: str | None = None) -> None:
        block = backend.block_size
        if block < 512 or block & (block - 1):
            raise ValueError(f"block size {block} is not a power of two >= 512")
        if backend.size < block or backend.size % block:
            raise ValueError(f"disk size {backend.size} is not a positive multiple of {block}")
        if max_transfer_bytes < block:
            raise ValueError(f"max_transfer_bytes {max_transfer_bytes} is below one {block}-byte block")
        text = serial if serial is not None else disk_id.hex.upper()
        if not text or not text.isascii() or not text.isprintable():
            raise ValueError(f"serial {text!r} must be printable ASCII")
        self.backend = backend
        self.disk_id = disk_id
        self.serial = text
        self.block_size = block
        self.blocks = backend.size // block
        self.max_transfer_bytes = max_transfer_bytes
        self.max_transfer_blocks = max_transfer_bytes // block
        self.read_only = backend.read_only
        self.unmap_supported = not backend.read_only
        self.failures = FailureBurst()
        # Optional in the BlockBackend protocol: a read that never waits (None when the data is not cached),
        # and reads and writes started without a coroutine (a future each).
        self.read_cached: ReadCached | None = getattr(backend, "read_cached", None)
        self.read_soon: ReadSoon | None = getattr(backend, "read_soon", None)
        self.write_soon: Callable[[int, memoryview, bool], asyncio.Future[None]] | None = getattr(
            backend, "write_soon", None)
        self._handlers: dict[int, _Handler] = {
            Op.TEST_UNIT_READY: self._no_op,
            Op.PREVENT_ALLOW_MEDIUM_REMOVAL: self._no_op,
            Op.REQUEST_SENSE: self._request_sense,
            Op.INQUIRY: self._inquiry,
            Op.MODE_SENSE6: self._mode_sense,
            Op.MODE_SENSE10: self._mode_sense,
            Op.START_STOP_UNIT: self._start_stop,
            Op.READ_CAPACITY10: self._read_capacity10,
            Op.SERVICE_ACTION_IN16: self._service_action_in16,
            Op.READ10: self._read_write,
            Op.READ16: self._read_write,
            Op.WRITE10: self._read_write,
            Op.WRITE16: self._read_write,
            Op.SYNCHRONIZE_CACHE10: self._synchronize_cache,
            Op.SYNCHRONIZE_CACHE16: self._synchronize_cache,
            Op.UNMAP: self._unmap,
            Op.WRITE_SAME16: self._write_same,
        }

    async def execute(self, cdb: bytes, data_out: bytes | bytearray | memoryview | None,
                      data_in_length: int, log: Any = None) -> ScsiResult:
        """Run one command. ``data_out`` is what the guest sent (WRITE data, UNMAP parameters);
        ``data_in_length`` is the size of the guest's buffer for data coming back. A failure of our own is
        logged on ``log`` (bound to the partition, relid and LUN) with its traceback, then answered as
        HARDWARE ERROR / INTERNAL TARGET FAILURE."""
        try:
            cdb = bytes(cdb)
            if not cdb:
                return _illegal(Asc.INVALID_COMMAND_OPERATION_CODE).result
            handler = self._handlers.get(cdb[0])
            if handler is None:
                return _illegal(Asc.INVALID_COMMAND_OPERATION_CODE).result
            if len(cdb) < CDB_LENGTH[cdb[0]]:
                return _illegal(Asc.INVALID_FIELD_IN_CDB).result
            result = await handler(_Request(cdb, data_out if data_out is not None else b"", max(0, data_in_length)))
        except _Check as check:
            result = check.result
        except Exception:
            return _internal_failure(log, cdb)
        return self.failures.note(result, cdb[0], log)

    async def flush(self) -> None:
        if not self.read_only:
            await self.backend.flush()

    async def close(self) -> None:
        await self.backend.close()

    # -- the simple ones ---------------------------------------------------------------------------

    async def _no_op(self, req: _Request) -> ScsiResult:
        return _good()

    async def _request_sense(self, req: _Request) -> ScsiResult:
        if req.cdb[1] & 0x01:  # DESC: descriptor-format sense, which we do not produce
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        return req.reply(fixed_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE), req.cdb[4])

    async def _start_stop(self, req: _Request) -> ScsiResult:
        start = req.cdb[4] & 0x01
        power_condition = req.cdb[4] >> 4
        if not start and power_condition == 0:
            await self._flush_or_fail()
        return _good()

    async def _flush_or_fail(self) -> None:
        try:
            await self.flush()
        except DiskError as exc:
            raise _Raised(_io_failure(exc, writing=True)) from exc

    # -- INQUIRY -----------------------------------------------------------------------------------

    async def _inquiry(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        evpd, cmddt, page = cdb[1] & 0x01, cdb[1] & 0x02, cdb[2]
        allocation = _U16.unpack_from(cdb, 3)[0]
        if cmddt or (not evpd and page):
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        if not evpd:
            return req.reply(inquiry_data(), allocation)
        return req.reply(self.vpd_page(page), allocation)

    def vpd_page(self, page: int) -> bytes:
        """One whole VPD page, header included; ILLEGAL REQUEST for a page we do not have."""
        if page == 0x00:
            body = bytes(VPD_PAGES)
        elif page == 0x80:
            body = self.serial.encode("ascii")
        elif page == 0x83:
            body = self._device_identifiers()
        elif page == 0xB0:
            body = self._block_limits()
        elif page == 0xB1:
            body = _U16.pack(1) + bytes(58)  # medium rotation rate 1: non-rotating
        elif page == 0xB2:
            body = self._provisioning()
        else:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        return _vpd_page(page, body)

    def _device_identifiers(self) -> bytes:
        """OpenVMM ``handle_vpd_device_identifiers``: a T10 vendor ID designator ("Msft" + the disk id) and
        an NAA 6 (IEEE registered extended) designator under Microsoft's OUI 00-22-48, both binary."""
        raw = self.disk_id.bytes_le
        t10 = bytes((0x01, 0x01, 0x00, 24)) + VENDOR_ID + raw
        naa = bytes((0x01, 0x03, 0x00, 16)) + bytes((0x60, 0x02, 0x24, 0x80)) + raw[:6] + raw[10:]
        return t10 + naa

    def _block_limits(self) -> bytes:
        body = bytearray(60)
        body[0] = 0x01  # WSNZ: a WRITE SAME of 0 blocks is refused, not "to the end"
        _U16.pack_into(body, 2, OPTIMAL_GRANULARITY_BLOCKS)  # optimal transfer length granularity
        _U32.pack_into(body, 4, self.max_transfer_blocks)  # maximum transfer length
        if self.unmap_supported:
            _U32.pack_into(body, 16, MAX_UNMAP_LBA_COUNT)
            _U32.pack_into(body, 20, MAX_UNMAP_DESCRIPTORS)
            _U32.pack_into(body, 24, OPTIMAL_GRANULARITY_BLOCKS)  # optimal unmap granularity
            _U32.pack_into(body, 28, 0x80000000)  # UGAVALID, alignment 0
        if not self.read_only:
            _U64.pack_into(body, 32, MAX_WRITE_SAME_BLOCKS)  # maximum WRITE SAME length
        return bytes(body)

    def _provisioning(self) -> bytes:
        # Threshold exponent: the smallest e >= 1 with (blocks >> e) < 2**32 (SBC-3 6.5.8).
        exponent = max(1, (self.blocks >> 32).bit_length())
        if self.unmap_supported:
            return bytes((exponent, 0xC4, 0x02, 0x00))  # LBPU, LBPWS, LBPRZ; provisioning type thin
        return bytes((exponent, 0x00, 0x00, 0x00))

    # -- capacity ----------------------------------------------------------------------------------

    async def _read_capacity10(self, req: _Request) -> ScsiResult:
        pmi = req.cdb[8] & 0x01
        if not pmi and _U32.unpack_from(req.cdb, 2)[0]:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        last = min(self.blocks - 1, 0xFFFFFFFF)
        return req.reply(_U32.pack(last) + _U32.pack(self.block_size), 8)

    async def _service_action_in16(self, req: _Request) -> ScsiResult:
        action = req.cdb[1] & 0x1F
        if action == SA_GET_LBA_STATUS:
            return await self._get_lba_status(req)
        if action != SA_READ_CAPACITY16:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        allocation = _U32.unpack_from(req.cdb, 10)[0]
        data = bytearray(32)
        _U64.pack_into(data, 0, self.blocks - 1)
        _U32.pack_into(data, 8, self.block_size)
        if self.unmap_supported:
            # LBPME and LBPRZ: unlike OpenVMM's generic disks, a deallocated block here is a hole in a file
            # (or zeros written where no hole can be punched), which reads as zeros.
            data[14] = 0xC0
        return req.reply(bytes(data), allocation)

    async def _get_lba_status(self, req: _Request) -> ScsiResult:
        """GET LBA STATUS (SBC-3 5.5): descriptors from the starting LBA on, as many as the allocation length
        holds; each extent is mapped or deallocated as the image's SEEK_DATA / SEEK_HOLE say."""
        lba, allocation = _U64.unpack_from(req.cdb, 2)[0], _U32.unpack_from(req.cdb, 10)[0]
        if lba >= self.blocks:
            raise _illegal(Asc.LBA_OUT_OF_RANGE)
        room = (min(allocation, req.data_in_length) - 8) // 16
        bs = self.block_size
        body = b""
        if room > 0:
            try:
                extents = await self.backend.allocation(lba * bs, (self.blocks - lba) * bs, room)
            except DiskError as exc:
                return _io_failure(exc, writing=False)
            descriptors = []
            for start, length, allocated in extents:
                end = start + length
                # A block that is partly data is mapped: data rounds outwards, holes inwards.
                if allocated:
                    first, last = start // bs, -(-end // bs)
                else:
                    first, last = -(-start // bs), end // bs
                first, last = max(first, lba), min(last, self.blocks)
                if last > first:
                    status = LBA_STATUS_MAPPED if allocated else LBA_STATUS_DEALLOCATED
                    descriptors.append((first, last - first, status))
            body = b"".join(_U64.pack(first) + _U32.pack(n) + bytes((status, 0, 0, 0))
                            for first, n, status in descriptors)
        # PARAMETER DATA LENGTH counts the bytes after itself, had the allocation length held them all.
        payload = _U32.pack(4 + len(body)) + bytes(4) + body
        return req.reply(payload, allocation)

    # -- MODE SENSE --------------------------------------------------------------------------------

    async def _mode_sense(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        ten = cdb[0] == Op.MODE_SENSE10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        allocation = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
        if pc == 3:
            raise _illegal(Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
        if not ((page == _CACHING_PAGE and subpage == 0) or (page == _ALL_PAGES and subpage in (0x00, 0xFF))):
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        caching = bytearray(20)  # SBC-3 caching mode page
        caching[0], caching[1] = _CACHING_PAGE, len(caching) - 2
        if pc != 1:  # current and default values; PC=1 (changeable) reports nothing changeable
            caching[2] = _WCE
        descriptor = b""
        if not dbd:
            if llbaa:
                descriptor = _U64.pack(self.blocks) + bytes(4) + _U32.pack(self.block_size)
            else:
                descriptor = _U32.pack(min(self.blocks, 0xFFFFFFFF)) + _U32.pack(self.block_size & 0xFFFFFF)
        dsp = _DSP_DPOFUA | (_DSP_WRITE_PROTECT if self.read_only else 0)
        if ten:
            total = 8 + len(descriptor) + len(caching)
            header = _U16.pack(total - 2) + bytes((0, dsp, 0x01 if llbaa and descriptor else 0x00, 0))
            header += _U16.pack(len(descriptor))
        else:
            total = 4 + len(descriptor) + len(caching)
            header = bytes((total - 1, 0, dsp, len(descriptor)))
        return req.reply(header + descriptor + bytes(caching), allocation)

    # -- data transfer -----------------------------------------------------------------------------

    def _lba_range(self, lba: int, count: int) -> None:
        if lba >= self.blocks or count > self.blocks - lba:
            raise _illegal(Asc.LBA_OUT_OF_RANGE)

    async def _read_write(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        op = cdb[0]
        writing = op in (Op.WRITE10, Op.WRITE16)
        if cdb[1] & 0xE0:  # RDPROTECT / WRPROTECT: we have no protection information
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        if op in (Op.READ10, Op.WRITE10):
            if cdb[1] & 0x01:  # obsolete RELADR; OpenVMM refuses it too
                raise _illegal(Asc.INVALID_FIELD_IN_CDB)
            lba, count = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
        else:
            lba, count = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        fua = bool(cdb[1] & 0x08)
        self._lba_range(lba, count)
        if count == 0:
            return _good()
        if count > self.max_transfer_blocks:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        offset, length = lba * self.block_size, count * self.block_size
        # A guest buffer shorter than the blocks asked for: OpenVMM validate_data_cdb* says ILLEGAL_BLOCK (0x21).
        if writing:
            if len(req.data_out) < length:
                raise _illegal(Asc.LBA_OUT_OF_RANGE)
            if self.read_only:
                raise _write_protected()
            try:
                await self.backend.write(offset, memoryview(req.data_out).cast("B")[:length], fua)
            except DiskError as exc:
                return _io_failure(exc, writing=True)
            return _good(transferred=length)
        if req.data_in_length < length:
            raise _illegal(Asc.LBA_OUT_OF_RANGE)
        try:
            data = await self.backend.read(offset, length)
        except DiskError as exc:
            return _io_failure(exc, writing=False)
        return _good(data)

    async def _synchronize_cache(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        if cdb[0] == Op.SYNCHRONIZE_CACHE10:
            lba, count = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
        else:
            lba, count = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        self._lba_range(lba, count)  # count 0 means "to the end"
        # IMMED is honoured by not honouring it: GOOD always means the data is durable.
        await self._flush_or_fail()
        return _good()

    async def _unmap(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        if cdb[1] & 0x01:  # ANCHOR: anchored LBAs are not supported (ANC_SUP = 0)
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        if not self.unmap_supported:
            raise _write_protected()
        length = _U16.unpack_from(cdb, 7)[0]
        if length == 0:
            return _good()
        if length < 8:
            raise _illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        if len(req.data_out) < length:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        params = bytes(memoryview(req.data_out).cast("B")[:length])
        # A partial trailing descriptor is ignored (SBC-3 5.28.2); so is anything past the parameter list.
        count = min(_U16.unpack_from(params, 2)[0], length - 8) // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            lba = _U64.unpack_from(params, 8 + 16 * i)[0]
            blocks = _U32.unpack_from(params, 16 + 16 * i)[0]
            if blocks == 0:
                continue  # not an error (SBC-3)
            self._lba_range(lba, blocks)
            total += blocks
            ranges.append((lba, blocks))
        if total > MAX_UNMAP_LBA_COUNT:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        try:
            for lba, blocks in ranges:
                await self.backend.discard(lba * self.block_size, blocks * self.block_size)
        except DiskError as exc:
            return _io_failure(exc, writing=True)
        return _good(transferred=length)


    async def _write_same(self, req: _Request) -> ScsiResult:
        cdb = req.cdb
        if cdb[1] & 0xE0 or cdb[1] & 0x10 or cdb[1] & 0x01:  # WRPROTECT, ANCHOR, NDOB: not supported
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        unmap = bool(cdb[1] & 0x08)
        lba, count = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        if count == 0 or count > MAX_WRITE_SAME_BLOCKS:  # WSNZ=1
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        self._lba_range(lba, count)
        bs = self.block_size
        if len(req.data_out) < bs:
            raise _illegal(Asc.INVALID_FIELD_IN_CDB)
        if self.read_only:
            raise _write_protected()
        block = bytes(memoryview(req.data_out).cast("B")[:bs])
        offset, length = lba * bs, count * bs
        try:
            if block.count(0) == bs:
                if unmap and self.unmap_supported:
                    await self.backend.discard(offset, length)  # LBPRZ: the hole reads as this block
                else:
                    await self.backend.write_zeroes(offset, length)
            else:
                pattern = block * max(1, min(count, _WRITE_SAME_CHUNK // bs))
                for pos in range(offset, offset + length, len(pattern)):
                    await self.backend.write(pos, pattern[:min(len(pattern), offset + length - pos)])
        except DiskError as exc:
            return _io_failure(exc, writing=True)
        return _good(transferred=bs)


class ScsiController:
    """The LUNs behind one (path, target) of the synthetic SCSI controller.

    REPORT LUNS is answered here for any LUN (listing nothing at another path or target). A LUN with no disk,
    and any LUN at another (path, target), answers as OpenVMM storvsp does: INQUIRY gets standard data with
    peripheral type 0x7F (not present; vendor/product/revision zeroed unless LUN 0) and SUCCESS, a VPD
    request gets INVALID_REQUEST, and anything else CHECK CONDITION with SRB INVALID_LUN and no sense (Linux
    then removes the LUN).
    """

    def __init__(self, disks: Mapping[int, ScsiDisk] | None = None, *, path_id: int = 0, target_id: int = 0,
                 max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> None:
        self.path_id = path_id
        self.target_id = target_id
        self.max_transfer_bytes = max_transfer_bytes
        self._disks: dict[int, ScsiDisk] = {}
        for lun, disk in (disks or {}).items():
            self.attach(lun, disk)

    @property
    def luns(self) -> list[int]:
        return sorted(self._disks)

    def disk(self, lun: int) -> ScsiDisk | None:
        return self._disks.get(lun)

    def attach(self, lun: int, disk: ScsiDisk) -> None:
        if not 0 <= lun < MAX_LUNS:
            raise ValueError(f"LUN {lun} is outside 0..{MAX_LUNS - 1}")
        if lun in self._disks:
            raise ValueError(f"LUN {lun} is already attached")
        self._disks[lun] = disk

    def detach(self, lun: int) -> ScsiDisk:
        """Remove a LUN (its disk stays open: close it once its in-flight commands are done)."""
        try:
            return self._disks.pop(lun)
        except KeyError:
            raise ValueError(f"LUN {lun} is not attached") from None

    async def execute(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview | None,
                      data_in_length: int, *, path_id: int = 0, target_id: int = 0, log: Any = None) -> ScsiResult:
        """Run one command for ``lun`` at (``path_id``, ``target_id``); never raises for anything the guest can
        send. Every LUN of another path or target is absent, as in OpenVMM (its disks are keyed by path,
        target and LUN). A failure of our own is logged on ``log`` with its traceback (see
        :meth:`ScsiDisk.execute`)."""
        try:
            cdb = bytes(cdb)
            here = path_id == self.path_id and target_id == self.target_id
            if cdb[:1] == bytes((Op.REPORT_LUNS,)):
                return self._report_luns(cdb, max(0, data_in_length), self.luns if here else [])
            disk = self._disks.get(lun) if here else None
            if disk is not None:
                return await disk.execute(cdb, data_out, data_in_length, log)
            return self._absent(lun, cdb, max(0, data_in_length))
        except Exception:
            return _internal_failure(log, cdb)

    def _plain_transfer(self, lun: int, cdb: bytes) -> tuple[ScsiDisk, int, int, int] | None:
        """(disk, opcode, offset, length) of a READ or WRITE (10)/(16) whose CDB passes every check
        ``execute`` makes, or None when the command needs the full path (which says what is wrong)."""
        disk = self._disks.get(lun)
        if disk is None or len(cdb) < 10 or cdb[1] & 0xE1:  # RD/WRPROTECT, RELADR: the full path says why
            return None
        op = cdb[0]
        if op in (Op.READ10, Op.WRITE10):
            lba, count = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
        elif op in (Op.READ16, Op.WRITE16) and len(cdb) >= 16:
            lba, count = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        else:
            return None
        if not 0 < count <= disk.max_transfer_blocks or lba >= disk.blocks or count > disk.blocks - lba:
            return None
        return disk, op, lba * disk.block_size, count * disk.block_size

    def read_cached(self, lun: int, cdb: bytes, data_in_length: int, into: memoryview | None = None) -> Buffer | None:
        """The data of a plain READ(10)/(16) served from the page cache without awaiting anything (the command
        is then GOOD), or None when it needs the full path (``execute``): not a READ, an error to report,
        or data not cached. ``into``: the guest's pages to read into (shared memory)."""
        plain = self._plain_transfer(lun, cdb)
        if plain is None:
            return None
        disk, op, offset, length = plain
        if op not in (Op.READ10, Op.READ16) or data_in_length < length or disk.read_cached is None:
            return None
        return disk.read_cached(offset, length) if into is None else disk.read_cached(offset, length, into)

    def start_rw(self, lun: int, cdb: bytes, data_out: bytes | bytearray | memoryview | None,
                 data_in_length: int, into: memoryview | None = None) -> tuple[asyncio.Future[Any], int] | None:
        """A plain READ or WRITE (10)/(16) that passes every check ``execute`` makes, started on the backend
        without a coroutine: (a future for its data or its completion, the bytes it moves). None when the
        command needs the full path: not a READ/WRITE, an error to report, or a backend without
        ``read_soon``/``write_soon``. Finish it with :meth:`rw_result`."""
        plain = self._plain_transfer(lun, cdb)
        if plain is None:
            return None
        disk, op, offset, length = plain
        try:
            if op in (Op.READ10, Op.READ16):
                if data_in_length < length or disk.read_soon is None:
                    return None
                read = disk.read_soon(offset, length) if into is None else disk.read_soon(offset, length, into)
                return read, length
            if disk.read_only or data_out is None or len(data_out) < length or disk.write_soon is None:
                return None
            return disk.write_soon(offset, memoryview(data_out).cast("B")[:length], bool(cdb[1] & 0x08)), length
        except DiskError:
            return None  # the full path turns it into the right sense

    def rw_result(self, started: asyncio.Future[Any], length: int, reading: bool, log: Any = None,
                  cdb: bytes = b"", lun: int = 0) -> ScsiResult:
        """The outcome of a command begun with :meth:`start_rw` on ``lun``, once its future is done (an exception
        that is not a ``DiskError`` is logged on ``log`` with its traceback; backend failures once per burst)."""
        exc = started.exception()
        if exc is None:
            result = _good(started.result()) if reading else _good(transferred=length)
        elif isinstance(exc, DiskError):
            result = _io_failure(exc, writing=not reading)
        else:
            return _internal_failure(log, cdb, exc)
        disk = self._disks.get(lun)
        return disk.failures.note(result, cdb[0], log) if disk is not None and cdb else result

    def _report_luns(self, cdb: bytes, data_in_length: int, luns: list[int]) -> ScsiResult:
        if len(cdb) < CDB_LENGTH[Op.REPORT_LUNS]:
            return _illegal(Asc.INVALID_FIELD_IN_CDB).result
        select, allocation = cdb[2], _U32.unpack_from(cdb, 6)[0]
        if allocation < 16 or select not in (0x00, 0x01, 0x02):
            return _illegal(Asc.INVALID_FIELD_IN_CDB).result
        luns = luns if select != 0x01 else []  # 0x01: well-known LUNs only, and we have none
        body = b"".join(_U16.pack(lun) + bytes(6) for lun in luns)  # single-level, peripheral addressing
        payload = _U32.pack(len(body)) + bytes(4) + body
        return _Request(cdb, b"", data_in_length).reply(payload, allocation)

    def _absent(self, lun: int, cdb: bytes, data_in_length: int) -> ScsiResult:
        if cdb[:1] != bytes((Op.INQUIRY,)):
            return ScsiResult(SrbStatus.INVALID_LUN, ScsiStatus.CHECK_CONDITION)
        if len(cdb) < CDB_LENGTH[Op.INQUIRY] or cdb[1] & 0x03 or cdb[2]:
            return _illegal(Asc.INVALID_FIELD_IN_CDB).result  # no VPD for a LUN that is not there
        data = inquiry_data(DEVICE_NOT_PRESENT, identity=lun == 0, cmdque=False)
        return _Request(cdb, b"", data_in_length).reply(data, _U16.unpack_from(cdb, 3)[0])

    async def flush(self) -> list[DiskError]:
        """``fdatasync`` every writable disk; returns the failures (empty when all went well)."""
        failures: list[DiskError] = []
        for disk in self._disks.values():
            try:
                await disk.flush()
            except DiskError as exc:
                failures.append(exc)
        return failures

    async def close(self) -> list[DiskError]:
        """Flush, then close every disk (in-flight I/O finishes first); returns the flush/close failures."""
        failures = await self.flush()
        disks, self._disks = list(self._disks.values()), {}
        for disk in disks:
            try:
                await disk.close()
            except DiskError as exc:
                failures.append(exc)
        return failures


# -- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LunConfig:
    """One LUN of a partition: a sparse image under the data directory (created at ``size_bytes`` on first
    use), or the existing image at ``path``; ``read_only`` opens it O_RDONLY and writes get DATA PROTECT."""

    lun: int = 0
    size_bytes: int = DEFAULT_DISK_BYTES
    path: Path | str | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.lun < MAX_LUNS:
            raise ValueError(f"LUN {self.lun} is outside 0..{MAX_LUNS - 1}")
        if self.size_bytes <= 0 or self.size_bytes % BLOCK_SIZE:
            raise ValueError(f"LUN {self.lun}: size_bytes {self.size_bytes} is not a positive multiple of "
                             f"{BLOCK_SIZE}")


_DISK_NAMESPACE = uuid.UUID("8f6a3b0e-5d0c-4f63-9c55-0b1c3e7a2d41")
# A name is its own directory name only when it stays distinct on a case-insensitive file system (macOS, a
# Docker bind mount from one) and on one that drops a trailing '.' (Windows): lower case, no trailing dot.
_SAFE_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9._-]*[a-z0-9_-])?")
_MAX_DIR_NAME = 200
_SAFE_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-")
_LEGACY_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # before case-insensitive file systems counted
_LEGACY_SAFE_CHARS = _SAFE_CHARS | frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def partition_dir_name(partition: str) -> str:
    """A directory name for a partition: the name itself when it is plainly safe, else its UTF-8 bytes with
    everything but lower-case letters, digits, '_' and '-' written as %XX (never '/', '.' or '..'; never
    colliding, even where case is ignored), or a hash of the name when that would be too long."""
    return _dir_name(partition, _SAFE_NAME, _SAFE_CHARS)


def legacy_partition_dir_name(partition: str) -> str:
    """The directory name earlier releases gave: upper case kept, so 'vm1' and 'VM1' were one directory
    where case is ignored. ``open_disks`` moves such a directory to its new name."""
    return _dir_name(partition, _LEGACY_SAFE_NAME, _LEGACY_SAFE_CHARS)


def _dir_name(partition: str, plain: re.Pattern[str], safe: frozenset[int]) -> str:
    if not partition:
        raise ValueError("empty partition name")
    if plain.fullmatch(partition) and len(partition) <= _MAX_DIR_NAME:
        return partition
    raw = partition.encode("utf-8", "surrogatepass")
    quoted = "".join(chr(b) if b in safe else f"%{b:02X}" for b in raw)
    if len(quoted) <= _MAX_DIR_NAME:
        return quoted
    return "%%" + hashlib.sha256(raw).hexdigest()  # quoting never yields "%%"


def _adopt_legacy_dir(data_dir: Path, partition: str, log: Any) -> Path:
    """The partition's directory, moved from its legacy name if only that one exists (listed under exactly
    that name: where case is ignored, a directory listed as 'vm1' is not VM1's to take)."""
    directory = data_dir / partition_dir_name(partition)
    legacy = legacy_partition_dir_name(partition)
    if legacy == directory.name or directory.exists():
        return directory
    try:
        listed = legacy in os.listdir(data_dir)
    except FileNotFoundError:
        return directory
    if listed:
        os.rename(data_dir / legacy, directory)
        log.info("partition disk directory renamed", partition=partition, old=legacy, new=directory.name)
    return directory


def disk_id_for(partition: str, lun: int) -> uuid.UUID:
    """The stable identity of a partition's LUN (serial number and VPD 0x83 designators derive from it)."""
    return uuid.uuid5(_DISK_NAMESPACE, f"{partition}\0lun{lun}")


def default_luns() -> list[LunConfig]:
    """One 1 GiB disk at LUN 0."""
    return [LunConfig()]


async def open_disks(data_dir: Path | str, partition: str, luns: Sequence[LunConfig] | None = None, *,
                     max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> ScsiController:
    """Open (creating where needed) a partition's disks and put them behind one controller.

    A LUN without ``path`` uses ``data_dir/<partition>/lun<N>.img``, created sparse at ``size_bytes``; a
    LUN with ``path`` must name an existing image. The opens run in the disk I/O pool. ``None`` means one
    1 GiB disk at LUN 0; an empty list, a controller with no LUNs.
    """
    configs = default_luns() if luns is None else list(luns)
    seen = [cfg.lun for cfg in configs]
    if len(set(seen)) != len(seen):
        raise ValueError(f"partition {partition!r}: a LUN is configured twice in {seen}")
    loop = asyncio.get_running_loop()
    directory = await loop.run_in_executor(default_executor(), _adopt_legacy_dir, Path(data_dir), partition,
                                           logs.get(component="storage"))
    opened: dict[int, DiskBackend] = {}
    try:
        for cfg in configs:
            if cfg.path is None:
                opener = functools.partial(DiskBackend.open, directory / f"lun{cfg.lun}.img", cfg.size_bytes,
                                           True, cfg.read_only)
            else:
                opener = functools.partial(DiskBackend.open, Path(cfg.path), None, False, cfg.read_only)
            job = loop.run_in_executor(default_executor(), opener)
            try:
                opened[cfg.lun] = await asyncio.shield(job)
            except asyncio.CancelledError:
                job.add_done_callback(_close_if_opened)
                raise
        disks = {lun: ScsiDisk(backend, disk_id=disk_id_for(partition, lun), max_transfer_bytes=max_transfer_bytes)
                 for lun, backend in opened.items()}
    except BaseException:
        for backend in opened.values():
            backend.close_sync()  # nothing has been issued to them yet
        raise
    return ScsiController(disks, max_transfer_bytes=max_transfer_bytes)


def _close_if_opened(job: asyncio.Future[DiskBackend]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close_sync()
