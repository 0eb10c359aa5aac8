"""StorVSC: the guest's synthetic SCSI driver and the block device it gives the guest.

Mirrors Linux drivers/scsi/storvsc_drv.c: after ``storvsc_channel_init`` (the VSTOR handshake) the SCSI
midlayer scans the target (REPORT LUNS, INQUIRY, READ CAPACITY(16), MODE SENSE for write-protect and the
caching page; drivers/scsi/sd.c), then ``storvsc_queuecommand`` sends each command as EXECUTE_SRB: an
in-band packet without data, or a GPA-direct packet with exactly one range over the guest buffer
(``storvsc_do_io``), COMPLETION_REQUESTED, and a bounded number outstanding. Requests are split at the
``max_transfer_bytes`` the host advertised (rounded down to 4 KiB, as ``storvsc_probe`` does).

Guest buffers are guest pages: WRITE data is copied into them and travels with the request, READ data
arrives with the completion and is written into them, exactly where the host would have DMA'd it.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from dataclasses import dataclass
from typing import Any

from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.storage import vstor
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE, Buffer, GpaRange, PacketType

from ...guest_memory import GuestMemory
from ...vsc import HandshakeVsc
from .blockdev import EXTENT_HOLE, EXTENT_ZERO, BlockDeviceError
from .disk import DiskFacts
from .service import StorageService

MAX_OUTSTANDING = 256
# One EXECUTE_SRB as Linux storvsc_queuecommand fills it: vstor_packet (operation, flags, status) and its
# 52-byte vmscsi_request (length, srb/scsi status, port, path, target, lun, cdb_length, sense_info_length,
# data_in, reserved, data_transfer_length, cdb[20], reserve, queue_tag 0xFF, queue_action SIMPLE_TAG,
# srb_flags, time_out_value 60, queue_sort_key), packed in one go (vstor.SRB_PACKET): the per-I/O hot path.
_PACK_SRB = vstor.SRB_PACKET.pack
_OP_EXECUTE_SRB = int(vstor.Operation.EXECUTE_SRB)
_SYNC = int(vstor.SrbFlags.DISABLE_SYNCH_TRANSFER)
_WRITE = (int(vstor.DataDirection.WRITE), _SYNC | int(vstor.SrbFlags.DATA_OUT))
_READ = (int(vstor.DataDirection.READ), _SYNC | int(vstor.SrbFlags.DATA_IN))
_NO_DATA = (int(vstor.DataDirection.UNKNOWN), _SYNC)
# The fields of a COMPLETE_IO the guest reads: operation, then srb_status, scsi_status, sense_info_length,
# data_transfer_length and the sense bytes of the returned vmscsi_request.
_COMPLETION = struct.Struct("<I10xBB5xB2xI20s")
_COMPLETION_STATUS = struct.Struct("<I10xBB").unpack_from
_SRB_SUCCESS = int(vstor.SrbStatus.SUCCESS)
_COMP = int(PacketType.COMP)
_READ_DIRECTION = int(vstor.DataDirection.READ)
_OP_COMPLETE_IO = int(vstor.Operation.COMPLETE_IO)
SD_MAX_WS16_BLOCKS = 0x7FFFFF  # Linux sd's cap on one WRITE SAME(16)
LBA_STATUS_ALLOCATION = 8 + 16 * 256  # GET LBA STATUS: header and up to 256 descriptors
SENSE_KEY_NAMES = {0x2: "NOT READY", 0x3: "MEDIUM ERROR", 0x4: "HARDWARE ERROR", 0x5: "ILLEGAL REQUEST",
                   0x6: "UNIT ATTENTION", 0x7: "DATA PROTECT"}


@dataclass(frozen=True, slots=True)
class ScsiReply:
    srb_status: int
    scsi_status: int
    transferred: int
    sense: bytes
    data: bytes

    @property
    def ok(self) -> bool:
        return (self.srb_status & 0x3F) == vstor.SrbStatus.SUCCESS and self.scsi_status == 0

    def error(self, what: str) -> BlockDeviceError:
        key = self.sense[2] & 0x0F if len(self.sense) > 2 else 0
        asc = (self.sense[12], self.sense[13]) if len(self.sense) > 13 else (0, 0)
        code = errno.EPERM if key == 0x7 else errno.EINVAL if key == 0x5 else errno.EIO
        text = (f"{what}: srb_status {self.srb_status:#x} scsi_status {self.scsi_status:#x}"
                + (f" sense {SENSE_KEY_NAMES.get(key, hex(key))} asc/ascq {asc[0]:#04x}/{asc[1]:#04x}"
                   if key else ""))
        return BlockDeviceError(code, text)


class DmaBuffer:
    """Contiguous guest pages a request's data lives in, with the GPA range for each transfer size it has
    served (a driver's bounce buffer: the range names these pages, the host moves data in and out of them)."""

    __slots__ = ("_mem", "_ranges", "base", "pfns")

    def __init__(self, memory: GuestMemory, pfns: list[int]) -> None:
        self.pfns = tuple(pfns)
        self.base = memory.offset_of(pfns[0])
        self._mem = memory.mem
        self._ranges: dict[int, GpaRange] = {}

    def range(self, length: int) -> GpaRange:
        rng = self._ranges.get(length)
        if rng is None:
            rng = self._ranges[length] = GpaRange(length, 0, self.pfns[:(length + PAGE_SIZE - 1) // PAGE_SIZE])
        return rng

    def stage(self, data: Buffer) -> bytes:
        """``data`` is written into the pages (by the guest before a WRITE, by the host's DMA for a READ);
        returns the bytes as they now stand there, for the other side to take."""
        base, end = self.base, self.base + len(data)
        self._mem[base:end] = data
        return self._mem[base:end]


class BufferPool:
    """DMA buffers in guest memory, one per outstanding request, kept in power-of-two size classes so a
    4 KiB read does not hold a whole max-transfer buffer (like a driver's bounce buffers)."""

    def __init__(self, memory: GuestMemory, max_size: int) -> None:
        self.memory = memory
        self.size = max_size
        self._free: dict[int, list[DmaBuffer]] = {}
        self._class: dict[int, int] = {}  # transfer length -> pages in its size class
        self._owned: list[DmaBuffer] = []

    def take(self, length: int) -> DmaBuffer:
        pages = self._class.get(length)
        if pages is None:
            pages = 1
            while pages * PAGE_SIZE < length:
                pages *= 2
            self._class[length] = pages
        free = self._free.get(pages)
        if free:
            return free.pop()
        buf = DmaBuffer(self.memory, self.memory.alloc(pages))
        self._owned.append(buf)
        return buf

    def give(self, buf: DmaBuffer) -> None:
        self._free.setdefault(len(buf.pfns), []).append(buf)

    def release(self) -> None:
        for buf in self._owned:
            self.memory.free(list(buf.pfns))
        self._owned.clear()
        self._free.clear()


class StorageVsc(HandshakeVsc):
    """The VSC; ``disks`` holds the guest's view of each LUN it found as a ``BlockDevice`` (:class:`ScsiLun`)."""

    module = vstor
    Service = StorageService

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_transfer = vstor.DEFAULT_MAX_TRANSFER_BYTES
        self.luns: list[int] = []
        self.disks: dict[int, ScsiLun] = {}
        self.pool: BufferPool | None = None
        self._slots: asyncio.Semaphore | None = None

    def open_userdata(self) -> bytes:
        return bytes(24)  # Linux passes a zeroed vmstorage_channel_properties

    async def handshake(self, channel: Channel) -> None:
        await super().handshake(channel)
        hs = self.hs
        assert isinstance(hs, vstor.VscHandshake)
        max_xfer = (hs.max_transfer_bytes or vstor.DEFAULT_MAX_TRANSFER_BYTES) & ~(PAGE_SIZE - 1)
        self.max_transfer = max(PAGE_SIZE, max_xfer)
        # Outstanding requests are bounded by what the outbound ring can hold (Linux storvsc_drv_init).
        per_request = (16 + 8 + 8 * (self.max_transfer // PAGE_SIZE + 1)) + vstor.VSTOR_PACKET_SIZE + 8
        ring_slots = max(1, (channel.rings.writer.data_size // per_request) * 9 // 10)
        slots = min(MAX_OUTSTANDING, ring_slots)
        self._slots = asyncio.Semaphore(slots)
        self.pool = BufferPool(self.memory, self.max_transfer)
        channel.on_packet = self._unsolicited
        await self.scan()

    def _unsolicited(self, pkt: Any) -> None:
        # ENUMERATE_BUS / REMOVE_DEVICE arrive in-band with trans_id 0 (Linux rescans; we log).
        self.log.info("unsolicited storage packet", length=len(pkt.payload))

    async def run(self, channel: Channel) -> None:
        """Nothing to poll: completions are routed to their requests by transaction id."""

    def forget(self) -> None:
        super().forget()
        if self.pool is not None:
            self.pool.release()
            self.pool = None

    # ---- SCSI -------------------------------------------------------------------------------------------

    async def command(self, cdb: bytes, data_out: Buffer | None = None, data_in: int = 0,
                      lun: int | None = None) -> ScsiReply:
        """One EXECUTE_SRB. ``data_out`` bytes are written to the device; ``data_in`` bytes are read."""
        payload, data = await self._srb(cdb, data_out, data_in, 0 if lun is None else lun)
        return self._reply(payload, data)

    async def _srb(self, cdb: bytes, data_out: Buffer | None, data_in: int, lun: int) -> tuple[bytes, bytes]:
        """Send one EXECUTE_SRB (``storvsc_queuecommand``); returns the completion's payload and the READ data
        as it landed in our pages. The per-I/O hot path."""
        channel, pool, slots = self.channel, self.pool, self._slots
        if channel is None or slots is None or pool is None:
            raise ChannelClosed("storage channel is not open")
        length = len(data_out) if data_out is not None else data_in
        if length > pool.size:
            raise BlockDeviceError(errno.EINVAL, f"{length}-byte transfer exceeds {pool.size}")
        direction, flags = _WRITE if data_out is not None else _READ if data_in else _NO_DATA
        payload = _PACK_SRB(
            _OP_EXECUTE_SRB, vstor.REQUEST_COMPLETION_FLAG, 0,  # vstor_packet header
            vstor.VMSCSI_REQUEST_SIZE, 0, 0, 0, 0, 0, lun, len(cdb),
            vstor.SENSE_BUFFER_SIZE, direction, 0, length, cdb, 0, 0xFF, 0x20, flags, 60, 0)
        async with slots:
            if not length:
                reply = await channel.request(payload)
                return reply.payload, b""
            buf = pool.take(length)
            try:
                out = buf.stage(data_out) if data_out is not None else b""  # what the host DMAs out of our pages
                reply = await channel.request(payload, (buf.range(length),), out)
                if reply.type != _COMP:
                    raise DeviceProtocolError("storage answer is not a completion")
                if direction != _READ_DIRECTION or not reply.data:
                    return reply.payload, b""
                if len(reply.data) > length:
                    raise DeviceProtocolError(f"host returned {len(reply.data)} bytes for a {length}-byte read")
                return reply.payload, buf.stage(reply.data)  # the host's DMA into our pages, then our read
            finally:
                pool.give(buf)

    @staticmethod
    def _reply(payload: bytes, data: bytes) -> ScsiReply:
        # Linux storvsc drops completions shorter than sizeof(vstor_packet); we need at least the fields.
        if len(payload) < _COMPLETION.size:
            raise DeviceProtocolError(f"storage completion of {len(payload)} bytes")
        op, srb_status, scsi_status, sense_len, transferred, sense = _COMPLETION.unpack_from(payload)
        if op != _OP_COMPLETE_IO:
            raise DeviceProtocolError(f"storage completion with operation {op}")
        if scsi_status == 2 and srb_status & vstor.SRB_STATUS_AUTOSENSE_VALID:
            return ScsiReply(srb_status, scsi_status, transferred, sense[:min(sense_len, 20)], data)
        return ScsiReply(srb_status, scsi_status, transferred, b"", data)

    @staticmethod
    def _succeeded(payload: bytes) -> bool:
        """Whether a COMPLETE_IO says SUCCESS and GOOD (the common case, checked without building a reply)."""
        if len(payload) < _COMPLETION.size:
            return False
        op, srb_status, scsi_status = _COMPLETION_STATUS(payload)
        return bool(op == _OP_COMPLETE_IO and srb_status & 0x3F == _SRB_SUCCESS and scsi_status == 0)

    async def scan(self) -> None:
        """What the Linux SCSI midlayer does on a new target (scsi_scan.c): REPORT LUNS, then sd probes each
        LUN that answers INQUIRY as a disk. LUN 0 is probed even if REPORT LUNS fails."""
        luns = await self.command(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 4096) + b"\0\0", data_in=4096)
        found = [0]
        if luns.ok and len(luns.data) >= 8:
            n = struct.unpack_from(">I", luns.data)[0] // 8
            found = [struct.unpack_from(">H", luns.data, 8 + 8 * i)[0] & 0x3FFF for i in range(n)
                     if 16 + 8 * i <= len(luns.data)] or [0]
        self.luns = found
        self.disks = {}
        first_error: BlockDeviceError | None = None
        for lun in found:
            disk = ScsiLun(self, lun)
            try:
                if await disk.probe():
                    self.disks[lun] = disk
            except BlockDeviceError as exc:
                self.log.warning("LUN probe failed", lun=lun, error=str(exc))
                first_error = first_error or exc
        if not self.disks and first_error is not None:
            raise first_error
        for disk in self.disks.values():
            self.log.info("disk attached", lun=disk.lun, vendor=disk.vendor, product=disk.product, size=disk.size,
                          read_only=disk.read_only, discard=disk.provisioning, max_transfer=disk.max_transfer)


class ScsiLun(DiskFacts):
    """One LUN as the guest's block layer sees it: a Linux sd disk (drivers/scsi/sd.c) on the StorVSC.

    ``probe`` is sd's revalidate: INQUIRY, READ CAPACITY(16) (LBPME, LBPRZ), MODE SENSE for write-protect and
    the caching page, and with LBPME the Block Limits and Logical Block Provisioning VPD pages (0xB0, 0xB2).
    Discard and write-zeroes follow ``sd_discard_mode`` / ``sd_setup_write_zeroes_cmnd``: WRITE SAME(16) with
    UNMAP=1 when the target says LBPWS (and for write-zeroes only when it also says LBPRZ, since the hole must
    read as zeros), UNMAP when it says only LBPU, and WRITE SAME(16) without UNMAP for a write-zeroes that must
    stay allocated (``REQ_NOUNMAP``). Block status is GET LBA STATUS (SBC-3), which Linux does not send but
    a target with LBPME must answer.
    """

    def __init__(self, vsc: StorageVsc, lun: int) -> None:
        self.vsc = vsc
        self.lun = lun
        self.max_transfer = vsc.max_transfer
        self.write_cache = True
        self.lbpme = False
        self.lbprz = False
        self.provisioning: str | None = None  # "ws16", "unmap" or None: how discards are sent
        self.max_discard_blocks = 0
        self.max_ws_blocks = 0
        self.block_status_supported = True

    @property
    def supports_discard(self) -> bool:
        return self.provisioning is not None

    async def command(self, cdb: bytes, data_out: Buffer | None = None, data_in: int = 0) -> ScsiReply:
        return await self.vsc.command(cdb, data_out, data_in, lun=self.lun)

    async def probe(self) -> bool:
        """Read the LUN's geometry and capabilities; False if it is not a disk that is present."""
        inq = await self.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
        if not inq.ok:
            raise inq.error(f"INQUIRY of LUN {self.lun}")
        if not inq.data or inq.data[0] & 0x1F != 0x00 or inq.data[0] >> 5:
            return False  # not a direct-access device, or not present (qualifier 011b)
        self.vendor = inq.data[8:16].decode("ascii", "replace").strip()
        self.product = inq.data[16:32].decode("ascii", "replace").strip()
        cap = await self.command(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0", data_in=32)
        if not cap.ok:
            raise cap.error(f"READ CAPACITY(16) of LUN {self.lun}")
        last_lba, block = struct.unpack_from(">QI", cap.data)
        self.block_size = block
        self.size = (last_lba + 1) * block
        self.lbpme, self.lbprz = bool(cap.data[14] & 0x80), bool(cap.data[14] & 0x40)
        sense = await self.command(bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_in=255)
        if sense.ok and len(sense.data) >= 4:
            self.read_only = bool(sense.data[2] & 0x80)
        cache = await self.command(bytes([0x1A, 0x08, 0x08, 0, 255, 0]), data_in=255)
        if cache.ok and len(cache.data) >= 7:
            self.write_cache = bool(cache.data[4 + 2] & 0x04)
        if self.lbpme and not self.read_only:
            await self._provisioning()
        return True

    async def _provisioning(self) -> None:
        limits = await self.command(bytes([0x12, 0x01, 0xB0, 0, 64, 0]), data_in=64)
        lbp = await self.command(bytes([0x12, 0x01, 0xB2, 0, 8, 0]), data_in=8)
        if not (limits.ok and len(limits.data) >= 44 and lbp.ok and len(lbp.data) >= 6):
            return
        max_unmap = struct.unpack_from(">I", limits.data, 20)[0]
        self.max_ws_blocks = min(struct.unpack_from(">Q", limits.data, 36)[0], SD_MAX_WS16_BLOCKS)
        lbpu, lbpws = bool(lbp.data[5] & 0x80), bool(lbp.data[5] & 0x40)
        self.lbprz = self.lbprz and bool(lbp.data[5] & 0x04)
        if lbpws and self.max_ws_blocks:
            self.provisioning, self.max_discard_blocks = "ws16", self.max_ws_blocks
        elif lbpu and max_unmap:
            self.provisioning, self.max_discard_blocks = "unmap", min(max_unmap, 0xFFFFFFFF)

    # ---- BlockDevice ------------------------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockDeviceError(errno.EINVAL, f"{offset}+{length} is outside the {self.size}-byte disk")
        if offset % self.block_size or length % self.block_size:
            raise BlockDeviceError(errno.EINVAL, f"I/O must be in whole {self.block_size}-byte blocks")

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.read_only:
            raise BlockDeviceError(errno.EPERM, "the disk is write-protected")

    def _rw_cdb(self, write: bool, offset: int, length: int, fua: bool) -> bytes:
        lba, blocks = offset // self.block_size, length // self.block_size
        if lba + blocks <= 0xFFFFFFFF and blocks <= 0xFFFF:
            return struct.pack(">BBIBHB", 0x2A if write else 0x28, 0x08 if fua else 0, lba, 0, blocks, 0)
        return struct.pack(">BBQIBB", 0x8A if write else 0x88, 0x08 if fua else 0, lba, blocks, 0, 0)

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length <= self.max_transfer:
            return await self._read_chunk(offset, length)
        chunks = [(o, min(self.max_transfer, offset + length - o)) for o in range(offset, offset + length,
                                                                                    self.max_transfer)]
        parts = await asyncio.gather(*(self._read_chunk(o, n) for o, n in chunks))
        return b"".join(parts)

    async def _read_chunk(self, offset: int, length: int) -> bytes:
        vsc = self.vsc
        payload, data = await vsc._srb(self._rw_cdb(False, offset, length, False), None, length, self.lun)
        if len(data) != length or not vsc._succeeded(payload):
            raise vsc._reply(payload, data).error(f"READ at {offset}")
        return data

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        view = memoryview(data)
        if len(view) <= self.max_transfer:
            await self._write_chunk(offset, view, fua)
            return
        await asyncio.gather(*(self._write_chunk(o, view[o - offset:o - offset + self.max_transfer], fua)
                               for o in range(offset, offset + len(data), self.max_transfer)))

    async def _write_chunk(self, offset: int, data: memoryview, fua: bool) -> None:
        vsc = self.vsc
        payload, _ = await vsc._srb(self._rw_cdb(True, offset, len(data), fua), data, 0, self.lun)
        if not vsc._succeeded(payload):
            raise vsc._reply(payload, b"").error(f"WRITE at {offset}")

    async def flush(self) -> None:
        reply = await self.command(bytes([0x35]) + bytes(9))
        if not reply.ok:
            raise reply.error("SYNCHRONIZE CACHE")

    async def _write_same(self, offset: int, length: int, unmap: bool) -> None:
        """WRITE SAME(16) of a zero block over the range, in commands of at most MAXIMUM WRITE SAME LENGTH."""
        bs = self.block_size
        zero = bytes(bs)
        for pos in range(offset, offset + length, self.max_ws_blocks * bs):
            blocks = min(self.max_ws_blocks, (offset + length - pos) // bs)
            cdb = struct.pack(">BBQIBB", 0x93, 0x08 if unmap else 0, pos // bs, blocks, 0, 0)
            reply = await self.command(cdb, data_out=zero)
            if not reply.ok:
                raise reply.error(f"WRITE SAME(16){' UNMAP' if unmap else ''} at {pos}")

    async def _unmap(self, offset: int, length: int) -> None:
        bs = self.block_size
        for pos in range(offset, offset + length, self.max_discard_blocks * bs):
            blocks = min(self.max_discard_blocks, (offset + length - pos) // bs)
            descriptor = struct.pack(">QI4x", pos // bs, blocks)
            params = struct.pack(">HH4x", 6 + len(descriptor), len(descriptor)) + descriptor
            reply = await self.command(struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), data_out=params)
            if not reply.ok:
                raise reply.error(f"UNMAP at {pos}")

    async def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if self.provisioning == "ws16":
            await self._write_same(offset, length, unmap=True)
        elif self.provisioning == "unmap":
            await self._unmap(offset, length)
        else:
            raise BlockDeviceError(errno.EOPNOTSUPP, "the disk does not support discard")

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_write(offset, length)
        if may_unmap and self.lbprz and self.provisioning == "ws16":
            await self._write_same(offset, length, unmap=True)  # the target punches a hole
        elif self.max_ws_blocks:
            await self._write_same(offset, length, unmap=False)
        else:
            zeroes = memoryview(bytes(min(length, self.max_transfer)))
            for pos in range(offset, offset + length, len(zeroes)):
                await self.write(pos, zeroes[:min(len(zeroes), offset + length - pos)])

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents from ``offset`` (at most ``length`` bytes) from one GET LBA STATUS."""
        self._check(offset - offset % self.block_size, 0)  # a length may end anywhere: NBD clips it
        if not self.block_status_supported or length <= 0:
            return [(length, 0)]
        bs = self.block_size
        cdb = struct.pack(">BBQIBB", 0x9E, 0x12, offset // bs, LBA_STATUS_ALLOCATION, 0, 0)
        reply = await self.command(cdb, data_in=LBA_STATUS_ALLOCATION)
        if not reply.ok:
            key = reply.sense[2] & 0x0F if len(reply.sense) > 2 else 0
            if key == 0x5 and len(reply.sense) > 12 and reply.sense[12] in (0x20, 0x24):
                self.block_status_supported = False  # not a service action this target knows
                return [(length, 0)]
            raise reply.error(f"GET LBA STATUS at {offset}")
        end = offset + length
        extents: list[tuple[int, int]] = []
        pos = offset
        count = (min(struct.unpack_from(">I", reply.data)[0] + 4, len(reply.data)) - 8) // 16
        for i in range(max(0, count)):
            lba, blocks, status = struct.unpack_from(">QIB", reply.data, 8 + 16 * i)
            d_end = min((lba + blocks) * bs, end)
            if lba * bs > pos or d_end <= pos:
                break  # not contiguous with what we have: stop here
            flags = (EXTENT_HOLE | (EXTENT_ZERO if self.lbprz else 0)) if status == 1 else 0
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + d_end - pos, flags)
            else:
                extents.append((d_end - pos, flags))
            pos = d_end
            if pos >= end:
                break
        if not extents:
            raise BlockDeviceError(errno.EIO, f"GET LBA STATUS at {offset} described nothing there")
        return extents
