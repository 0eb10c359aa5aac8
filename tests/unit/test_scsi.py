"""The SCSI target: every supported command with golden bytes, the error senses, absent LUNs, disks from
configuration, concurrency, and random CDBs that must never crash it."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import random
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parent_partition.devices.storage.disk import DiskError
from parent_partition.devices.storage.scsi import (
    CDB_LENGTH,
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BLOCKS,
    LunConfig,
    Op,
    ScsiController,
    ScsiDisk,
    ScsiResult,
    disk_id_for,
    open_disks,
    partition_dir_name,
)
from vmbus_proto.aio import logs
from vmbus_proto.devices.storage import scsi as wire_scsi
from vmbus_proto.devices.storage.vstor import DEFAULT_MAX_TRANSFER_BYTES, SRB_STATUS_AUTOSENSE_VALID, SrbStatus

MiB = 1 << 20
DISK0 = 4 * MiB  # LUN 0: writable, 8192 blocks
DISK2 = 1 * MiB  # LUN 2: read-only, 2048 blocks
GOOD, CHECK = 0, 2
ILLEGAL, DATA_PROTECT, MEDIUM = 5, 7, 3
INVALID_REQUEST_SENSE = SrbStatus.INVALID_REQUEST | SRB_STATUS_AUTOSENSE_VALID
ERROR_SENSE = SrbStatus.ERROR | SRB_STATUS_AUTOSENSE_VALID


# -- CDB builders ----------------------------------------------------------------------------------

def rw10(op: int, lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, count, 0)


def rw16(op: int, lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, count, 0, 0)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", Op.INQUIRY, evpd, page, alloc, 0)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, subpage: int = 0) -> bytes:
    return bytes((Op.MODE_SENSE6, 0x08 if dbd else 0, pc << 6 | page, subpage, alloc, 0))


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 255) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBBBBBHB", Op.MODE_SENSE10, flags, pc << 6 | page, 0, 0, 0, 0, alloc, 0)


def read_capacity16(alloc: int = 32, action: int = 0x10) -> bytes:
    return struct.pack(">BBQIBB", Op.SERVICE_ACTION_IN16, action, 0, alloc, 0, 0)


def report_luns(alloc: int = 256, select: int = 0) -> bytes:
    return struct.pack(">BBBBBBIBB", Op.REPORT_LUNS, 0, select, 0, 0, 0, alloc, 0, 0)


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BBIBHB", Op.UNMAP, 1 if anchor else 0, 0, 0, length, 0)


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def sync10(lba: int = 0, count: int = 0) -> bytes:
    return rw10(Op.SYNCHRONIZE_CACHE10, lba, count)


def assert_good(r: ScsiResult) -> None:
    assert (r.srb_status, r.scsi_status, r.sense) == (SrbStatus.SUCCESS, GOOD, b""), r


def assert_sense(r: ScsiResult, key: int, asc: int, ascq: int = 0, srb: int = INVALID_REQUEST_SENSE) -> None:
    assert r.scsi_status == CHECK, r
    assert r.srb_status == srb, r
    assert len(r.sense) == 18 and r.sense[0] == 0x70 and r.sense[7] == 10
    assert (r.sense[2], r.sense[12], r.sense[13]) == (key, asc, ascq), r.sense.hex()
    assert r.data == b"" and r.transferred == 0


def record_fdatasync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def fake(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fake)
    return calls


class FakeBackend:
    """A backend with no file: reads zeros, records calls, and fails with ``fail`` when set."""

    def __init__(self, size: int, *, read_only: bool = False, fail: int | None = None) -> None:
        self._size = size
        self._read_only = read_only
        self.fail = fail
        self.calls: list[tuple[str, int, int]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return 512

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise DiskError(self.fail, os.strerror(self.fail))

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        self._maybe_fail()
        return bytes(length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.calls.append(("write", offset, len(data)))
        self._maybe_fail()

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0))
        self._maybe_fail()

    async def discard(self, offset: int, length: int) -> bool:
        self.calls.append(("discard", offset, length))
        self._maybe_fail()
        return True

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.calls.append(("write_zeroes", offset, length))
        self._maybe_fail()

    async def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        self.calls.append(("allocation", offset, length))
        self._maybe_fail()
        return [(offset, length, True)]

    async def close(self) -> None:
        self.calls.append(("close", 0, 0))


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[ScsiController]:
    controller = await open_disks(tmp_path, "p", [LunConfig(0, size_bytes=DISK0),
                                                  LunConfig(2, size_bytes=DISK2, read_only=True)])
    yield controller
    assert await controller.close() == []


def image(tmp_path: Path, lun: int = 0) -> Path:
    return tmp_path / "p" / f"lun{lun}.img"


# -- TEST UNIT READY, REQUEST SENSE, START STOP, PREVENT ALLOW -------------------------------------

async def test_test_unit_ready(ctl: ScsiController) -> None:
    r = await ctl.execute(0, bytes(6), None, 0)
    assert_good(r)
    assert (r.data, r.transferred) == (b"", 0)


async def test_request_sense_is_no_sense(ctl: ScsiController) -> None:
    r = await ctl.execute(0, bytes((Op.REQUEST_SENSE, 0, 0, 0, 252, 0)), None, 252)
    assert_good(r)
    assert r.data == bytes((0x70, 0, 0, 0, 0, 0, 0, 10)) + bytes(10)
    r = await ctl.execute(0, bytes((Op.REQUEST_SENSE, 0, 0, 0, 8, 0)), None, 252)
    assert len(r.data) == r.transferred == 8
    assert_sense(await ctl.execute(0, bytes((Op.REQUEST_SENSE, 1, 0, 0, 252, 0)), None, 252), ILLEGAL, 0x24)


async def test_start_stop_and_prevent_allow(ctl: ScsiController, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fdatasync(monkeypatch)
    assert_good(await ctl.execute(0, bytes((Op.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0)), None, 0))
    assert_good(await ctl.execute(0, bytes((Op.START_STOP_UNIT, 0, 0, 0, 1, 0)), None, 0))  # start
    assert calls == []
    assert_good(await ctl.execute(0, bytes((Op.START_STOP_UNIT, 0, 0, 0, 0, 0)), None, 0))  # stop: flush
    assert len(calls) == 1


# -- INQUIRY ---------------------------------------------------------------------------------------

async def test_standard_inquiry(ctl: ScsiController) -> None:
    r = await ctl.execute(0, inquiry(), None, 255)
    assert_good(r)
    d = r.data
    assert len(d) == r.transferred == 104
    assert d[0] == 0x00  # direct access, qualifier 0
    assert d[1] == 0x00  # not removable
    assert d[2] == 0x05  # SPC-3
    assert d[3] == 0x02  # response data format 2
    assert d[4] == 99  # additional length
    assert d[7] == 0x02  # CmdQue
    assert d[8:16] == b"Msft    "
    assert d[16:32] == b"Virtual Disk    "
    assert d[32:36] == b"1.0 "


async def test_inquiry_honours_allocation_length_and_buffer(ctl: ScsiController) -> None:
    r = await ctl.execute(0, inquiry(alloc=36), None, 255)
    assert len(r.data) == r.transferred == 36
    r = await ctl.execute(0, inquiry(alloc=255), None, 20)
    assert len(r.data) == 20
    r = await ctl.execute(0, inquiry(alloc=0), None, 255)
    assert_good(r)
    assert r.data == b""


async def test_inquiry_bad_fields(ctl: ScsiController) -> None:
    assert_sense(await ctl.execute(0, inquiry(evpd=0, page=0x80), None, 255), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, inquiry(evpd=2), None, 255), ILLEGAL, 0x24)  # CMDDT
    for page in (0x01, 0x8F, 0xB3, 0xC0, 0xCF, 0xFF):
        assert_sense(await ctl.execute(0, inquiry(1, page), None, 255), ILLEGAL, 0x24)


async def test_vpd_supported_pages(ctl: ScsiController) -> None:
    r = await ctl.execute(0, inquiry(1, 0x00), None, 255)
    assert_good(r)
    assert r.data == bytes((0, 0x00, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2))
    for page in r.data[4:]:
        page_data = (await ctl.execute(0, inquiry(1, page), None, 255)).data
        assert page_data[1] == page
        assert struct.unpack_from(">H", page_data, 2)[0] == len(page_data) - 4


async def test_vpd_serial_is_stable_and_derived_from_the_disk_id(ctl: ScsiController, tmp_path: Path) -> None:
    r = await ctl.execute(0, inquiry(1, 0x80), None, 255)
    assert r.data[:4] == bytes((0, 0x80, 0, 32))
    assert r.data[4:] == disk_id_for("p", 0).hex.upper().encode()
    other = await open_disks(tmp_path, "p", [LunConfig(0, size_bytes=DISK0)])
    try:
        assert (await other.execute(0, inquiry(1, 0x80), None, 255)).data == r.data
    finally:
        await other.close()
    assert disk_id_for("p", 0) != disk_id_for("p", 1) != disk_id_for("q", 1)


async def test_vpd_device_identification(ctl: ScsiController) -> None:
    d = (await ctl.execute(0, inquiry(1, 0x83), None, 255)).data
    raw = disk_id_for("p", 0).bytes_le
    assert d[:4] == bytes((0, 0x83, 0, 48))
    t10, naa = d[4:32], d[32:52]
    assert t10[:4] == bytes((0x01, 0x01, 0x00, 24))  # binary, T10 vendor ID, 24 bytes
    assert t10[4:12] == b"Msft    " and t10[12:] == raw
    assert naa[:4] == bytes((0x01, 0x03, 0x00, 16))  # binary, NAA, 16 bytes
    assert naa[4] >> 4 == 6  # NAA IEEE registered extended
    assert naa[4:8] == bytes((0x60, 0x02, 0x24, 0x80))  # Microsoft OUI 00-22-48
    assert naa[8:] == raw[:6] + raw[10:]


async def test_vpd_block_limits(ctl: ScsiController) -> None:
    d = (await ctl.execute(0, inquiry(1, 0xB0), None, 255)).data
    assert d[:4] == bytes((0, 0xB0, 0, 0x3C)) and len(d) == 64
    assert struct.unpack_from(">H", d, 6)[0] == 8  # optimal transfer length granularity (4 KiB)
    assert struct.unpack_from(">I", d, 8)[0] == DEFAULT_MAX_TRANSFER_BYTES // 512 == 512  # max transfer
    assert struct.unpack_from(">I", d, 20)[0] == MAX_UNMAP_LBA_COUNT
    assert struct.unpack_from(">I", d, 24)[0] == MAX_UNMAP_DESCRIPTORS
    assert struct.unpack_from(">I", d, 28)[0] == 8  # optimal unmap granularity
    assert struct.unpack_from(">I", d, 32)[0] == 0x80000000  # UGAVALID, alignment 0
    assert struct.unpack_from(">Q", d, 36)[0] == MAX_WRITE_SAME_BLOCKS
    assert d[4] & 0x01  # WSNZ
    ro = (await ctl.execute(2, inquiry(1, 0xB0), None, 255)).data
    assert struct.unpack_from(">I", ro, 8)[0] == 512
    assert ro[20:44] == bytes(24)  # no unmap and no WRITE SAME on a read-only disk


async def test_vpd_block_limits_follow_the_controller(tmp_path: Path) -> None:
    c = await open_disks(tmp_path, "m", [LunConfig(0, size_bytes=MiB)], max_transfer_bytes=MiB)
    try:
        assert c.max_transfer_bytes == MiB
        d = (await c.execute(0, inquiry(1, 0xB0), None, 255)).data
        assert struct.unpack_from(">I", d, 8)[0] == 2048
    finally:
        await c.close()


async def test_vpd_characteristics_and_provisioning(ctl: ScsiController) -> None:
    d = (await ctl.execute(0, inquiry(1, 0xB1), None, 255)).data
    assert d[:4] == bytes((0, 0xB1, 0, 0x3C))
    assert struct.unpack_from(">H", d, 4)[0] == 1  # non-rotating
    d = (await ctl.execute(0, inquiry(1, 0xB2), None, 255)).data
    assert d[:4] == bytes((0, 0xB2, 0, 4))
    assert d[4] == 1  # threshold exponent
    assert d[5] == 0xC4  # LBPU=1, LBPWS=1, LBPWS10=0, LBPRZ=1
    assert d[6] & 0x07 == 2  # thin
    ro = (await ctl.execute(2, inquiry(1, 0xB2), None, 255)).data
    assert ro[5] == 0 and ro[6] == 0
    r = await ctl.execute(0, inquiry(1, 0xB1, alloc=10), None, 255)
    assert len(r.data) == 10


# -- READ CAPACITY ---------------------------------------------------------------------------------

async def test_read_capacity10(ctl: ScsiController) -> None:
    r = await ctl.execute(0, bytes((Op.READ_CAPACITY10,)) + bytes(9), None, 8)
    assert_good(r)
    assert r.data == struct.pack(">II", DISK0 // 512 - 1, 512)
    r = await ctl.execute(2, bytes((Op.READ_CAPACITY10,)) + bytes(9), None, 8)
    assert r.data == struct.pack(">II", DISK2 // 512 - 1, 512)
    bad = bytes((Op.READ_CAPACITY10, 0, 0, 0, 0, 1, 0, 0, 0, 0))  # LBA without PMI
    assert_sense(await ctl.execute(0, bad, None, 8), ILLEGAL, 0x24)


async def test_read_capacity16(ctl: ScsiController) -> None:
    r = await ctl.execute(0, read_capacity16(), None, 32)
    assert_good(r)
    assert len(r.data) == 32
    last, block = struct.unpack_from(">QI", r.data)
    assert (last, block) == (DISK0 // 512 - 1, 512)
    assert r.data[13] & 0x0F == 0  # one logical block per physical block
    assert r.data[14] & 0x80  # LBPME
    assert r.data[14] & 0x40  # LBPRZ: a hole in the image reads as zeros
    ro = await ctl.execute(2, read_capacity16(), None, 32)
    assert struct.unpack_from(">Q", ro.data)[0] == DISK2 // 512 - 1
    assert ro.data[14] == 0
    assert len((await ctl.execute(0, read_capacity16(alloc=12), None, 32)).data) == 12
    assert_sense(await ctl.execute(0, read_capacity16(action=0x11), None, 32), ILLEGAL, 0x24)


async def test_capacity_beyond_32_bits() -> None:
    size = 3 << 40  # 3 TiB: 6 Gi blocks
    d = ScsiDisk(FakeBackend(size), disk_id=uuid.uuid4())
    r = await d.execute(bytes((Op.READ_CAPACITY10,)) + bytes(9), None, 8)
    assert r.data == struct.pack(">II", 0xFFFFFFFF, 512)
    r = await d.execute(read_capacity16(), None, 32)
    assert struct.unpack_from(">Q", r.data)[0] == size // 512 - 1
    r = await d.execute(rw16(Op.READ16, size // 512 - 1, 1), None, 512)
    assert_good(r)
    b2 = (await d.execute(inquiry(1, 0xB2), None, 255)).data
    assert ((size // 512) >> b2[4]) < 1 << 32 <= ((size // 512) >> (b2[4] - 1))


# -- READ / WRITE ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("read", "write", "cdb"), [(Op.READ10, Op.WRITE10, rw10), (Op.READ16, Op.WRITE16, rw16)])
async def test_read_write_round_trip(ctl: ScsiController, read: int, write: int, cdb: type) -> None:
    rng = random.Random(read)
    model = bytearray(DISK0)
    for _ in range(40):
        count = rng.randrange(1, 65)
        lba = rng.randrange(0, DISK0 // 512 - count + 1)
        data = rng.randbytes(count * 512)
        r = await ctl.execute(0, cdb(write, lba, count), data, 0)
        assert_good(r)
        assert (r.transferred, r.data) == (count * 512, b"")
        model[lba * 512:(lba + count) * 512] = data
    for _ in range(40):
        count = rng.randrange(1, 129)
        lba = rng.randrange(0, DISK0 // 512 - count + 1)
        r = await ctl.execute(0, cdb(read, lba, count), None, count * 512)
        assert_good(r)
        assert r.transferred == count * 512
        assert r.data == model[lba * 512:(lba + count) * 512]


async def test_fua_write_and_synchronize_cache_fdatasync(ctl: ScsiController, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fdatasync(monkeypatch)
    assert_good(await ctl.execute(0, rw10(Op.WRITE10, 0, 1), b"a" * 512, 0))
    assert calls == []
    assert_good(await ctl.execute(0, rw10(Op.WRITE10, 1, 1, flags=0x08), b"b" * 512, 0))
    assert len(calls) == 1
    assert_good(await ctl.execute(0, rw16(Op.WRITE16, 2, 1, flags=0x08), b"c" * 512, 0))
    assert len(calls) == 2
    assert_good(await ctl.execute(0, rw10(Op.READ10, 0, 1, flags=0x08), None, 512))  # FUA read: no sync
    assert len(calls) == 2
    assert_good(await ctl.execute(0, sync10(), None, 0))
    assert len(calls) == 3
    assert_good(await ctl.execute(0, rw16(Op.SYNCHRONIZE_CACHE16, 0, 0), None, 0))
    assert len(calls) == 4
    assert_good(await ctl.execute(0, bytes((Op.SYNCHRONIZE_CACHE10, 0x02)) + bytes(8), None, 0))  # IMMED
    assert len(calls) == 5
    assert image(tmp_path).read_bytes()[:1536] == b"a" * 512 + b"b" * 512 + b"c" * 512


async def test_synchronize_cache_range(ctl: ScsiController) -> None:
    assert_good(await ctl.execute(0, sync10(8000, 192), None, 0))
    assert_sense(await ctl.execute(0, sync10(8000, 193), None, 0), ILLEGAL, 0x21)
    assert_sense(await ctl.execute(0, sync10(8192, 0), None, 0), ILLEGAL, 0x21)


async def test_transfer_length_zero(ctl: ScsiController, tmp_path: Path) -> None:
    for cdb in (rw10(Op.READ10, 5, 0), rw16(Op.READ16, 5, 0), rw10(Op.WRITE10, 5, 0), rw16(Op.WRITE16, 5, 0)):
        r = await ctl.execute(0, cdb, b"x" * 512, 512)
        assert_good(r)
        assert (r.data, r.transferred) == (b"", 0)
    assert image(tmp_path).stat().st_blocks == 0


async def test_lba_out_of_range(ctl: ScsiController) -> None:
    blocks = DISK0 // 512
    cases = [rw10(Op.READ10, blocks, 1), rw10(Op.READ10, blocks - 1, 2), rw16(Op.READ16, 2**64 - 1, 1),
             rw16(Op.READ16, 2**63, 2**32 - 1), rw10(Op.READ10, blocks, 0)]
    for cdb in cases:
        r = await ctl.execute(0, cdb, None, 2**20)
        assert_sense(r, ILLEGAL, 0x21)
    r = await ctl.execute(0, rw10(Op.WRITE10, blocks - 1, 2), bytes(1024), 0)
    assert_sense(r, ILLEGAL, 0x21)
    assert_good(await ctl.execute(0, rw10(Op.READ10, blocks - 1, 1), None, 512))


async def test_data_length_rules(ctl: ScsiController, tmp_path: Path) -> None:
    # Too little data for the blocks the CDB names: ILLEGAL REQUEST / 0x21, as OpenVMM's validate_data_cdb*
    # (``len > max`` is ILLEGAL_BLOCK) with SRB INVALID_REQUEST.
    assert_sense(await ctl.execute(0, rw10(Op.WRITE10, 0, 2), b"x" * 1023, 0), ILLEGAL, 0x21)
    assert_sense(await ctl.execute(0, rw10(Op.WRITE10, 0, 1), None, 0), ILLEGAL, 0x21)
    assert_sense(await ctl.execute(0, rw10(Op.READ10, 0, 2), None, 1023), ILLEGAL, 0x21)
    assert image(tmp_path).stat().st_blocks == 0
    # More than needed: only the CDB's blocks move (as OpenVMM's subrange(0, tx)).
    r = await ctl.execute(0, rw10(Op.WRITE10, 0, 1), b"y" * 512 + b"z" * 512, 0)
    assert_good(r)
    assert r.transferred == 512
    r = await ctl.execute(0, rw10(Op.READ10, 0, 2), None, 4096)
    assert r.data == b"y" * 512 + bytes(512) and r.transferred == 1024


async def test_transfer_above_the_maximum(ctl: ScsiController) -> None:
    r = await ctl.execute(0, rw10(Op.READ10, 0, 513), None, 513 * 512)
    assert_sense(r, ILLEGAL, 0x24)
    assert_good(await ctl.execute(0, rw10(Op.READ10, 0, 512), None, 512 * 512))


async def test_protection_and_reladr_bits(ctl: ScsiController) -> None:
    assert_sense(await ctl.execute(0, rw10(Op.READ10, 0, 1, flags=0x20), None, 512), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, rw16(Op.WRITE16, 0, 1, flags=0x40), bytes(512), 0), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, rw10(Op.READ10, 0, 1, flags=0x01), None, 512), ILLEGAL, 0x24)


async def test_read_only_disk(ctl: ScsiController, tmp_path: Path) -> None:
    before = image(tmp_path, 2).read_bytes()
    for cdb in (rw10(Op.WRITE10, 0, 1), rw16(Op.WRITE16, 0, 1), rw10(Op.WRITE10, 0, 1, flags=0x08)):
        r = await ctl.execute(2, cdb, b"w" * 512, 0)
        assert_sense(r, DATA_PROTECT, 0x27, 0, srb=ERROR_SENSE)
    r = await ctl.execute(2, unmap_cdb(24), unmap_params([(0, 8)]), 0)
    assert_sense(r, DATA_PROTECT, 0x27, 0, srb=ERROR_SENSE)
    assert_good(await ctl.execute(2, rw10(Op.READ10, 0, 1), None, 512))
    assert_good(await ctl.execute(2, sync10(), None, 0))
    assert image(tmp_path, 2).read_bytes() == before


# -- MODE SENSE ------------------------------------------------------------------------------------

async def test_mode_sense6_caching_page(ctl: ScsiController) -> None:
    for page in (0x08, 0x3F):
        r = await ctl.execute(0, mode_sense6(page), None, 255)
        assert_good(r)
        d = r.data
        assert len(d) == 4 + 8 + 20
        assert d[0] == len(d) - 1  # mode data length
        assert d[2] == 0x10  # DPOFUA, not write protected
        assert d[3] == 8  # one short block descriptor
        assert struct.unpack_from(">II", d, 4) == (DISK0 // 512, 512)
        assert d[12] == 0x08 and d[13] == 0x12  # caching page, 18 bytes follow
        assert d[14] & 0x04  # WCE
        assert not d[14] & 0x01  # RCD clear


async def test_mode_sense_write_protect_and_dbd(ctl: ScsiController) -> None:
    r = await ctl.execute(2, mode_sense6(0x3F, dbd=True), None, 255)
    d = r.data
    assert d[2] & 0x80  # WP
    assert d[3] == 0 and len(d) == 24 and d[4] == 0x08
    r = await ctl.execute(0, mode_sense6(0x3F, alloc=4), None, 255)  # Linux's first probe
    assert len(r.data) == 4 and r.data[0] == 31


async def test_mode_sense10(ctl: ScsiController) -> None:
    d = (await ctl.execute(0, mode_sense10(0x08), None, 255)).data
    assert struct.unpack_from(">H", d, 0)[0] == len(d) - 2 == 8 + 8 + 20 - 2
    assert d[3] == 0x10 and d[4] == 0 and struct.unpack_from(">H", d, 6)[0] == 8
    assert struct.unpack_from(">II", d, 8) == (DISK0 // 512, 512)
    assert d[16] == 0x08 and d[18] & 0x04
    d = (await ctl.execute(0, mode_sense10(0x08, llbaa=True), None, 255)).data
    assert d[4] & 0x01 and struct.unpack_from(">H", d, 6)[0] == 16
    assert struct.unpack_from(">Q", d, 8)[0] == DISK0 // 512
    assert struct.unpack_from(">I", d, 20)[0] == 512
    d = (await ctl.execute(2, mode_sense10(0x08, dbd=True), None, 255)).data
    assert d[3] & 0x80 and struct.unpack_from(">H", d, 6)[0] == 0 and len(d) == 28


async def test_mode_sense_page_control(ctl: ScsiController) -> None:
    changeable = (await ctl.execute(0, mode_sense6(0x08, pc=1, dbd=True), None, 255)).data
    assert changeable[4:6] == bytes((0x08, 0x12)) and changeable[6:] == bytes(18)
    default = (await ctl.execute(0, mode_sense6(0x08, pc=2, dbd=True), None, 255)).data
    assert default[6] & 0x04
    assert_sense(await ctl.execute(0, mode_sense6(0x08, pc=3), None, 255), ILLEGAL, 0x39)


async def test_mode_sense_unsupported_pages(ctl: ScsiController) -> None:
    for page in (0x00, 0x01, 0x0A, 0x1C):
        assert_sense(await ctl.execute(0, mode_sense6(page), None, 255), ILLEGAL, 0x24)
        assert_sense(await ctl.execute(0, mode_sense10(page), None, 255), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, mode_sense6(0x08, subpage=1), None, 255), ILLEGAL, 0x24)
    assert_good(await ctl.execute(0, mode_sense6(0x3F, subpage=0xFF), None, 255))
    r = await ctl.execute(0, mode_sense6(0x08, alloc=0), None, 255)
    assert_good(r)
    assert r.data == b""


# -- REPORT LUNS and absent LUNs -------------------------------------------------------------------

async def test_report_luns(ctl: ScsiController) -> None:
    for lun in (0, 2, 7):  # any LUN, present or not, gets the controller's answer
        r = await ctl.execute(lun, report_luns(), None, 256)
        assert_good(r)
        assert r.data == struct.pack(">I4x", 16) + bytes((0, 0)) + bytes(6) + bytes((0, 2)) + bytes(6)
    r = await ctl.execute(0, report_luns(alloc=16), None, 256)
    assert r.data == struct.pack(">I4x", 16) + bytes(8)
    r = await ctl.execute(0, report_luns(), None, 12)
    assert len(r.data) == r.transferred == 12
    r = await ctl.execute(0, report_luns(select=1), None, 256)
    assert r.data == bytes(8)
    assert (await ctl.execute(0, report_luns(select=2), None, 256)).data[3] == 16
    assert_sense(await ctl.execute(0, report_luns(alloc=15), None, 256), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, report_luns(select=3), None, 256), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, report_luns()[:10], None, 256), ILLEGAL, 0x24)


async def test_report_luns_with_no_disks() -> None:
    r = await ScsiController().execute(0, report_luns(), None, 256)
    assert_good(r)
    assert r.data == bytes(8)


async def test_inquiry_to_an_absent_lun(ctl: ScsiController) -> None:
    r = await ctl.execute(1, inquiry(), None, 255)
    assert_good(r)
    d = r.data
    assert len(d) == 104 and d[0] == 0x7F
    assert d[2:5] == bytes((0x05, 0x02, 99))
    assert d[8:36] == bytes(28)  # vendor, product, revision zeroed for LUN != 0
    r = await ctl.execute(1, inquiry(alloc=36), None, 255)
    assert len(r.data) == 36


async def test_inquiry_to_absent_lun_zero_keeps_identity() -> None:
    c = ScsiController({1: ScsiDisk(FakeBackend(MiB), disk_id=uuid.uuid4())})
    d = (await c.execute(0, inquiry(), None, 255)).data
    assert d[0] == 0x7F and d[8:16] == b"Msft    " and d[16:32] == b"Virtual Disk    "
    assert d[7] == 0  # no CmdQue, as OpenVMM's template


async def test_vpd_to_an_absent_lun(ctl: ScsiController) -> None:
    for cdb in (inquiry(1, 0x00), inquiry(1, 0x83), inquiry(0, 0x80)):
        assert_sense(await ctl.execute(1, cdb, None, 255), ILLEGAL, 0x24)


@pytest.mark.parametrize("lun", [1, 3, 254, 255, 300, -1])
async def test_other_commands_to_an_absent_lun(ctl: ScsiController, lun: int) -> None:
    for cdb in (bytes(6), rw10(Op.READ10, 0, 1), read_capacity16(), b"", b"\xff" * 16):
        r = await ctl.execute(lun, cdb, None, 512)
        assert r == ScsiResult(SrbStatus.INVALID_LUN, CHECK)
        assert not r.srb_status & SRB_STATUS_AUTOSENSE_VALID and r.sense == b""


@pytest.mark.parametrize(("path", "target"), [(0, 1), (3, 0)])
async def test_another_path_or_target_is_absent(ctl: ScsiController, path: int, target: int) -> None:
    """OpenVMM keys disks by (path, target, lun): a present LUN number elsewhere is absent, REPORT LUNS empty."""
    where = {"path_id": path, "target_id": target}
    assert (await ctl.execute(0, report_luns(), None, 256, **where)).data == bytes(8)
    assert (await ctl.execute(0, inquiry(), None, 255, **where)).data[0] == 0x7F
    r = await ctl.execute(0, rw10(Op.READ10, 0, 1), None, 512, **where)
    assert r == ScsiResult(SrbStatus.INVALID_LUN, CHECK), "a READ to another target reached the disk"


def test_the_guest_cdb_builders_are_what_the_target_parses() -> None:
    """vmbus_proto's CDBs (what StorVSC sends) match this file's independent golden builders."""
    assert wire_scsi.read_write_cdb(False, 0x1234, 8) == rw10(Op.READ10, 0x1234, 8)
    assert wire_scsi.read_write_cdb(True, 7, 1, fua=True) == rw10(Op.WRITE10, 7, 1, 0x08)
    assert wire_scsi.read_write_cdb(False, 1 << 32, 8) == rw16(Op.READ16, 1 << 32, 8)
    assert wire_scsi.read_write_cdb(True, 0, 0x10000) == rw16(Op.WRITE16, 0, 0x10000)
    assert wire_scsi.inquiry_cdb(96) == inquiry(alloc=96)
    assert wire_scsi.inquiry_cdb(64, page=0xB0) == inquiry(1, 0xB0, 64)
    assert wire_scsi.mode_sense6_cdb(0x08, 255, dbd=True) == mode_sense6(0x08, dbd=True)
    assert wire_scsi.read_capacity16_cdb(32) == read_capacity16()
    assert wire_scsi.report_luns_cdb(256) == report_luns()
    assert wire_scsi.synchronize_cache10_cdb() == sync10()
    assert wire_scsi.unmap_cdb(24) == unmap_cdb(24) and wire_scsi.unmap_parameters(5, 9) == unmap_params([(5, 9)])
    two = struct.pack(">I4x", 16) + bytes((0, 0)) + bytes(6) + bytes((0, 2)) + bytes(6)
    assert wire_scsi.report_luns(two) == [0, 2]
    assert wire_scsi.report_luns(struct.pack(">I4x", 16) + bytes(8)) == [0]  # cut to the allocation length


async def test_an_unexpected_backend_failure_is_logged_before_hardware_error() -> None:
    out = io.StringIO()
    logs.setup("debug", stream=out, json=True)
    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    fut.set_exception(ValueError("pool worker bug"))
    r = ScsiController().rw_result(fut, 4096, True, logs.get(partition="vm1", relid=1), rw10(Op.READ10, 0, 8))
    assert_sense(r, 0x4, 0x44, srb=ERROR_SENSE)
    (line,) = [json.loads(x) for x in out.getvalue().splitlines() if "HARDWARE ERROR" in x]
    assert (line["partition"], line["relid"], line["opcode"]) == ("vm1", 1, "0x28")
    assert "pool worker bug" in line["exception"] and "ValueError" in line["exception"], line


async def test_controller_attach_detach() -> None:
    c = ScsiController()
    disk = ScsiDisk(FakeBackend(MiB), disk_id=uuid.uuid4())
    c.attach(5, disk)
    assert c.luns == [5] and c.disk(5) is disk
    with pytest.raises(ValueError):
        c.attach(5, disk)
    with pytest.raises(ValueError):
        c.attach(255, disk)
    assert c.detach(5) is disk
    assert (await c.execute(5, bytes(6), None, 0)).srb_status == SrbStatus.INVALID_LUN
    with pytest.raises(ValueError):
        c.detach(5)


# -- UNMAP -----------------------------------------------------------------------------------------

async def test_unmap_punches_holes(ctl: ScsiController, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(2 * MiB)
    assert_good(await ctl.execute(0, rw10(Op.WRITE10, 0, 512), data[:256 * 1024], 0))
    for i in range(1, 8):
        chunk = data[i * 256 * 1024:(i + 1) * 256 * 1024]
        assert_good(await ctl.execute(0, rw10(Op.WRITE10, i * 512, 512), chunk, 0))
    assert_good(await ctl.execute(0, sync10(), None, 0))
    before = image(tmp_path).stat().st_blocks
    params = unmap_params([(256, 1024), (3000, 0), (2048, 512)])
    r = await ctl.execute(0, unmap_cdb(len(params)), params, 0)
    assert_good(r)
    assert r.transferred == len(params)
    assert before - image(tmp_path).stat().st_blocks >= 1536
    back = b"".join([(await ctl.execute(0, rw10(Op.READ10, i * 512, 512), None, 256 * 1024)).data
                     for i in range(8)])
    assert back[:128 * 1024] == data[:128 * 1024]
    assert back[128 * 1024:640 * 1024] == bytes(512 * 1024)
    assert back[640 * 1024:MiB] == data[640 * 1024:MiB]
    assert back[MiB:MiB + 256 * 1024] == bytes(256 * 1024)
    assert back[MiB + 256 * 1024:] == data[MiB + 256 * 1024:]


async def test_unmap_validation(ctl: ScsiController, tmp_path: Path) -> None:
    assert_good(await ctl.execute(0, rw10(Op.WRITE10, 0, 8), b"k" * 4096, 0))
    blocks = DISK0 // 512
    params = unmap_params([(0, 8), (blocks - 4, 5)])  # the second is out of range: nothing is unmapped
    assert_sense(await ctl.execute(0, unmap_cdb(len(params)), params, 0), ILLEGAL, 0x21)
    assert (await ctl.execute(0, rw10(Op.READ10, 0, 8), None, 4096)).data == b"k" * 4096
    assert_good(await ctl.execute(0, unmap_cdb(0), None, 0))  # empty parameter list
    assert_sense(await ctl.execute(0, unmap_cdb(6), bytes(6), 0), ILLEGAL, 0x1A)
    params = unmap_params([(0, 8)])
    assert_sense(await ctl.execute(0, unmap_cdb(len(params)), params[:-1], 0), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, unmap_cdb(len(params), anchor=True), params, 0), ILLEGAL, 0x24)
    many = unmap_params([(i, 1) for i in range(MAX_UNMAP_DESCRIPTORS + 1)])
    assert_sense(await ctl.execute(0, unmap_cdb(len(many)), many, 0), ILLEGAL, 0x26)
    assert (await ctl.execute(0, rw10(Op.READ10, 0, 8), None, 4096)).data == b"k" * 4096
    # A header with no descriptors, and a truncated trailing descriptor, are not errors.
    assert_good(await ctl.execute(0, unmap_cdb(8), unmap_params([]), 0))
    assert_good(await ctl.execute(0, unmap_cdb(20), unmap_params([(0, 8)])[:20], 0))


async def test_unmap_lba_count_limit() -> None:
    backend = FakeBackend(16 << 30)
    d = ScsiDisk(backend, disk_id=uuid.uuid4())
    params = unmap_params([(0, MAX_UNMAP_LBA_COUNT), (MAX_UNMAP_LBA_COUNT, 1)])
    assert_sense(await d.execute(unmap_cdb(len(params)), params, 0), ILLEGAL, 0x26)
    assert backend.calls == []
    params = unmap_params([(0, MAX_UNMAP_LBA_COUNT)])
    assert_good(await d.execute(unmap_cdb(len(params)), params, 0))
    assert backend.calls == [("discard", 0, MAX_UNMAP_LBA_COUNT * 512)]


# -- unsupported and malformed ---------------------------------------------------------------------

async def test_invalid_opcodes(ctl: ScsiController) -> None:
    for op in (0x08, 0x0A, 0x15, 0x2F, 0x41, 0x4D, 0x5E, 0x92, 0xA3, 0xA8, 0xFF):
        assert_sense(await ctl.execute(0, bytes((op,)) + bytes(15), None, 512), ILLEGAL, 0x20)
    assert_sense(await ctl.execute(0, b"", None, 0), ILLEGAL, 0x20)


async def test_short_cdbs(ctl: ScsiController) -> None:
    for op, length in CDB_LENGTH.items():
        if op == Op.REPORT_LUNS:
            continue
        r = await ctl.execute(0, bytes((op,)) + bytes(length - 2), bytes(512), 512)
        assert_sense(r, ILLEGAL, 0x24)


# -- backend failures ------------------------------------------------------------------------------

async def test_backend_errors_are_medium_errors() -> None:
    backend = FakeBackend(MiB, fail=errno.EIO)
    d = ScsiDisk(backend, disk_id=uuid.uuid4())
    assert_sense(await d.execute(rw10(Op.READ10, 0, 1), None, 512), MEDIUM, 0x11, srb=ERROR_SENSE)
    assert_sense(await d.execute(rw10(Op.WRITE10, 0, 1), bytes(512), 0), MEDIUM, 0x0C, srb=ERROR_SENSE)
    assert_sense(await d.execute(sync10(), None, 0), MEDIUM, 0x0C, srb=ERROR_SENSE)
    params = unmap_params([(0, 1)])
    assert_sense(await d.execute(unmap_cdb(len(params)), params, 0), MEDIUM, 0x0C, srb=ERROR_SENSE)
    backend.fail = errno.ENOSPC  # thin disk, host filesystem full
    assert_sense(await d.execute(rw10(Op.WRITE10, 0, 1), bytes(512), 0), DATA_PROTECT, 0x27, 0x07,
                 srb=ERROR_SENSE)


async def test_backend_failures_are_logged_once_per_burst() -> None:
    out = io.StringIO()
    logs.setup("debug", stream=out, json=True)
    backend = FakeBackend(MiB, fail=errno.ENOSPC)
    d = ScsiDisk(backend, disk_id=uuid.uuid4())
    log = logs.get(partition="vm1", lun=0)
    for _ in range(5):  # a guest retrying into a full disk
        assert_sense(await d.execute(rw10(Op.WRITE10, 0, 1), bytes(512), 0, log), DATA_PROTECT, 0x27, 0x07,
                     srb=ERROR_SENSE)
    assert_good(await d.execute(bytes(6), None, 0, log))  # TEST UNIT READY, no backend I/O: the burst goes on
    backend.fail = None
    assert_good(await d.execute(rw10(Op.READ10, 0, 1), None, 512, log))  # reads work on a full disk: goes on
    assert_good(await d.execute(sync10(), None, 0, log))  # so does a flush with nothing dirty
    assert_good(await d.execute(rw10(Op.WRITE10, 0, 1), bytes(512), 0, log))  # a write that lands ends it
    backend.fail = errno.EIO  # a second burst
    assert_sense(await d.execute(rw10(Op.READ10, 0, 1), None, 512, log), MEDIUM, 0x11, srb=ERROR_SENSE)
    assert_sense(await d.execute(rw10(Op.READ10, 0, 1), None, 512, log), MEDIUM, 0x11, srb=ERROR_SENSE)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    failing = [x for x in lines if x["event"].startswith("disk I/O failing")]
    recovered = [x for x in lines if x["event"] == "disk I/O recovered"]
    assert [(x["errno"], x["sense"], x["opcode"]) for x in failing] == [
        ("ENOSPC", "0x7/0x27/0x07", "0x2a"), ("EIO", "0x3/0x11/0x00", "0x28")], failing
    assert [(x["failed_commands"], x["writes"], x["partition"]) for x in recovered] == [(5, True, "vm1")], recovered


async def test_real_io_error_through_the_file(ctl: ScsiController, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*args: object) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", eio)
    monkeypatch.setattr(os, "preadv", _not_cached)  # take the pool path, not the cached fast path
    assert_sense(await ctl.execute(0, rw10(Op.READ10, 0, 1), None, 512), MEDIUM, 0x11, srb=ERROR_SENSE)


# -- configuration ---------------------------------------------------------------------------------

async def test_open_disks_defaults(tmp_path: Path) -> None:
    c = await open_disks(tmp_path, "vm1")
    try:
        assert c.luns == [0]
        st = (tmp_path / "vm1" / "lun0.img").stat()
        assert st.st_size == 1 << 30 and st.st_blocks == 0
        r = await c.execute(0, read_capacity16(), None, 32)
        assert struct.unpack_from(">Q", r.data)[0] == (1 << 30) // 512 - 1
    finally:
        await c.close()
    assert (await open_disks(tmp_path, "vm2", [])).luns == []


async def test_open_disks_existing_image(tmp_path: Path) -> None:
    existing = tmp_path / "golden.img"
    existing.write_bytes(b"\x42" * 8192)
    c = await open_disks(tmp_path, "vm", [LunConfig(0, path=existing, read_only=True),
                                          LunConfig(3, size_bytes=2 * MiB)])
    try:
        assert c.luns == [0, 3]
        r = await c.execute(0, rw10(Op.READ10, 15, 1), None, 512)
        assert r.data == b"\x42" * 512
        assert_sense(await c.execute(0, rw10(Op.WRITE10, 0, 1), bytes(512), 0), DATA_PROTECT, 0x27,
                     srb=ERROR_SENSE)
        assert (tmp_path / "vm" / "lun3.img").stat().st_size == 2 * MiB
    finally:
        await c.close()


async def test_open_disks_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskError):
        await open_disks(tmp_path, "vm", [LunConfig(0, size_bytes=MiB), LunConfig(1, path=tmp_path / "missing")])
    with pytest.raises(ValueError):
        await open_disks(tmp_path, "vm", [LunConfig(0), LunConfig(0)])
    with pytest.raises(ValueError):
        LunConfig(255)
    with pytest.raises(ValueError):
        LunConfig(0, size_bytes=1000)


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs", ".hidden", "ü", "x" * 64, "é" * 64])
async def test_partition_names_stay_inside_the_data_dir(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    c = await open_disks(data, name, [LunConfig(0, size_bytes=4096)])
    await c.close()
    images = list(tmp_path.rglob("*.img"))
    assert len(images) == 1 and images[0].parent.parent == data
    assert "/" not in partition_dir_name(name) and partition_dir_name(name) not in (".", "..")
    assert len(partition_dir_name(name)) <= 200


def test_partition_dir_names_do_not_collide() -> None:
    names = ["a", "a.b", "a%2Eb", "a/b", "a%2Fb", ".a", "%2Ea", "a b", "a_b", "A"]
    dirs = [partition_dir_name(n) for n in names]
    assert len(set(dirs)) == len(dirs)
    assert partition_dir_name("vm-1.test") == "vm-1.test"


# -- concurrency -----------------------------------------------------------------------------------

async def test_concurrent_io_on_two_disks(tmp_path: Path) -> None:
    a = await open_disks(tmp_path, "a", [LunConfig(0, size_bytes=8 * MiB)])
    b = await open_disks(tmp_path, "b", [LunConfig(0, size_bytes=8 * MiB)])
    rng = random.Random(3)
    writes = {(c, i): rng.randbytes(64 * 512) for c in range(2) for i in range(32)}
    ctls = (a, b)
    try:
        results = await asyncio.gather(*(ctls[c].execute(0, rw10(Op.WRITE10, i * 128, 64, 0x08 if i % 5 else 0),
                                                         data, 0) for (c, i), data in writes.items()))
        assert all(r.scsi_status == GOOD and r.transferred == 64 * 512 for r in results)
        # Reads of the written ranges mixed with writes to other ranges, all in flight together.
        fresh = {(c, i): rng.randbytes(64 * 512) for c in range(2) for i in range(32, 48)}
        jobs = [ctls[c].execute(0, rw10(Op.READ10, i * 128, 64), None, 64 * 512) for (c, i) in writes]
        jobs += [ctls[c].execute(0, rw10(Op.WRITE10, i * 128, 64), data, 0) for (c, i), data in fresh.items()]
        results = await asyncio.gather(*jobs)
        assert [r.data for r in results[:64]] == list(writes.values())
        assert all(r.scsi_status == GOOD for r in results)
        for (c, i), data in fresh.items():
            assert (await ctls[c].execute(0, rw10(Op.READ10, i * 128, 64), None, 64 * 512)).data == data
    finally:
        await a.close()
        await b.close()


# -- fuzz ------------------------------------------------------------------------------------------

OPCODES = sorted(set(CDB_LENGTH) | {0x08, 0x0A, 0x41, 0x93, 0xFF})

cdbs = st.one_of(
    st.binary(min_size=0, max_size=32),
    st.builds(lambda op, rest: bytes((op,)) + rest, st.sampled_from(OPCODES), st.binary(min_size=0, max_size=31)),
    st.builds(rw10, st.sampled_from([0x28, 0x2A, 0x35]),
              st.integers(0, 2**32 - 1) | st.integers(0, 3000), st.integers(0, 2**16 - 1) | st.integers(0, 8),
              st.integers(0, 255)),
    st.builds(rw16, st.sampled_from([0x88, 0x8A, 0x91]),
              st.integers(0, 2**64 - 1) | st.integers(0, 3000), st.integers(0, 2**32 - 1) | st.integers(0, 8),
              st.integers(0, 255)),
    st.builds(unmap_cdb, st.integers(0, 2**16 - 1) | st.integers(0, 64), st.booleans()),
)


def check_result(r: ScsiResult, data_in_length: int) -> None:
    assert isinstance(r, ScsiResult)
    assert r.scsi_status in (GOOD, CHECK)
    assert isinstance(r.data, bytes) and len(r.data) <= max(0, data_in_length)
    assert r.transferred >= 0
    if r.scsi_status == GOOD:
        assert r.srb_status == SrbStatus.SUCCESS and r.sense == b""
    elif r.sense:
        assert len(r.sense) == 18 and r.sense[0] == 0x70
        assert r.srb_status & SRB_STATUS_AUTOSENSE_VALID
        assert r.sense[2] != 0x4, "internal target failure: an unexpected exception inside the target"
    else:
        assert r.srb_status == SrbStatus.INVALID_LUN


def test_random_cdbs_never_crash(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    controller = loop.run_until_complete(open_disks(tmp_path, "fuzz", [
        LunConfig(0, size_bytes=MiB), LunConfig(1, size_bytes=64 * 1024, read_only=True)]))

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(lun=st.sampled_from([0, 0, 0, 1, 1, 2, 255, -3]), cdb=cdbs,
           data_out=st.none() | st.binary(max_size=2048) | st.builds(bytes, st.integers(0, 70000)),
           data_in_length=st.integers(-5, 300000))
    def run(lun: int, cdb: bytes, data_out: bytes | None, data_in_length: int) -> None:
        r = loop.run_until_complete(controller.execute(lun, cdb, data_out, data_in_length))
        check_result(r, data_in_length)

    try:
        run()
    finally:
        loop.run_until_complete(controller.close())
        loop.close()


def _not_cached(*args: object) -> int:
    raise BlockingIOError(11, "would block (not in the page cache)")


# -- WRITE SAME (16) and GET LBA STATUS ------------------------------------------------------------

def write_same16(lba: int, count: int, unmap: bool = False, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", Op.WRITE_SAME16, (0x08 if unmap else 0) | flags, lba, count, 0, 0)


def get_lba_status(lba: int, alloc: int = 8 + 16 * 32) -> bytes:
    return struct.pack(">BBQIBB", Op.SERVICE_ACTION_IN16, 0x12, lba, alloc, 0, 0)


async def fill(ctl: ScsiController, lba: int, data: bytes) -> None:
    """WRITE(10)s of at most the maximum transfer length."""
    step = DEFAULT_MAX_TRANSFER_BYTES
    for pos in range(0, len(data), step):
        piece = data[pos:pos + step]
        assert_good(await ctl.execute(0, rw10(Op.WRITE10, lba + pos // 512, len(piece) // 512), piece, 0))


async def read_back(ctl: ScsiController, lba: int, length: int) -> bytes:
    step = DEFAULT_MAX_TRANSFER_BYTES
    parts = [(await ctl.execute(0, rw10(Op.READ10, lba + pos // 512, min(step, length - pos) // 512), None,
                                step)).data for pos in range(0, length, step)]
    return b"".join(parts)


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    assert len(data) >= 8 + 16 * n, "parameter data length beyond the data"
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


async def test_write_same_unmap_punches_and_without_unmap_zeroes_allocated(ctl: ScsiController,
                                                                           tmp_path: Path) -> None:
    path = image(tmp_path)
    blocks = DISK0 // 512
    await fill(ctl, 0, b"\xab" * MiB)
    await fill(ctl, 4096, b"\xcd" * MiB)
    await ctl.flush()
    allocated = os.stat(path).st_blocks
    assert allocated >= 2 * MiB // 512
    # UNMAP=1 with a zero block: deallocated (a hole), reads back as zeros.
    r = await ctl.execute(0, write_same16(0, 2048, unmap=True), bytes(512), 0)
    assert_good(r)
    assert os.stat(path).st_blocks <= allocated - MiB // 512
    assert await read_back(ctl, 0, MiB) == bytes(MiB)
    assert lba_status((await ctl.execute(0, get_lba_status(0), None, 8 + 16 * 32)).data)[0] == (0, 4096, 1)
    # UNMAP=0 with a zero block: zeros that stay allocated (NO_HOLE).
    assert_good(await ctl.execute(0, write_same16(4096, 2048), bytes(512), 0))
    assert await read_back(ctl, 4096, MiB) == bytes(MiB)
    descriptors = lba_status((await ctl.execute(0, get_lba_status(4096), None, 8 + 16 * 32)).data)
    assert descriptors[0] == (4096, 2048, 0), descriptors
    # A pattern is repeated over the range, UNMAP or not (it cannot be a hole).
    assert_good(await ctl.execute(0, write_same16(10, 3, unmap=True), b"\x5a" * 512, 0))
    assert (await ctl.execute(0, rw10(Op.READ10, 9, 5), None, 2560)).data == bytes(512) + b"\x5a" * 1536 + bytes(512)
    # Refusals: 0 blocks (WSNZ), past the end, no data block, ANCHOR/NDOB/WRPROTECT, read-only.
    assert_sense(await ctl.execute(0, write_same16(0, 0), bytes(512), 0), ILLEGAL, 0x24)
    assert_sense(await ctl.execute(0, write_same16(blocks - 1, 2), bytes(512), 0), ILLEGAL, 0x21)
    assert_sense(await ctl.execute(0, write_same16(0, 1), bytes(100), 0), ILLEGAL, 0x24)
    for flag in (0x10, 0x01, 0x20):
        assert_sense(await ctl.execute(0, write_same16(0, 1, flags=flag), bytes(512), 0), ILLEGAL, 0x24)
    r = await ctl.execute(2, write_same16(0, 1, unmap=True), bytes(512), 0)
    assert_sense(r, DATA_PROTECT, 0x27, srb=ERROR_SENSE)


async def test_get_lba_status_reports_the_images_holes(ctl: ScsiController, tmp_path: Path) -> None:
    blocks = DISK0 // 512
    # A fresh sparse image is one deallocated extent.
    r = await ctl.execute(0, get_lba_status(0), None, 8 + 16 * 32)
    assert_good(r)
    assert lba_status(r.data) == [(0, blocks, 1)]
    # Data at 1 MiB..2 MiB (LBA 2048..4095) and in the last 4 KiB.
    await fill(ctl, 2048, b"\x01" * MiB)
    await fill(ctl, blocks - 8, b"\x02" * 4096)
    r = await ctl.execute(0, get_lba_status(0), None, 8 + 16 * 32)
    assert lba_status(r.data) == [(0, 2048, 1), (2048, 2048, 0), (4096, blocks - 8 - 4096, 1), (blocks - 8, 8, 0)]
    # From an LBA inside an extent; and an allocation length with room for only one descriptor.
    assert lba_status((await ctl.execute(0, get_lba_status(3000), None, 8 + 16 * 32)).data)[0] == (3000, 1096, 0)
    r = await ctl.execute(0, get_lba_status(0, alloc=24), None, 24)
    assert len(r.data) == 24 and struct.unpack_from(">QIB", r.data, 8) == (0, 2048, 1)
    # Out of range; and the read-only disk still answers (everything it has is mapped or a hole).
    assert_sense(await ctl.execute(0, get_lba_status(blocks), None, 64), ILLEGAL, 0x21)
    r = await ctl.execute(2, get_lba_status(0), None, 64)
    assert_good(r)
    assert lba_status(r.data)[0][0] == 0
