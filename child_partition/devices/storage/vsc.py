"""StorVSC: the guest's synthetic SCSI driver and the block device it gives the guest.

Mirrors Linux drivers/scsi/storvsc_drv.c: after ``storvsc_channel_init`` (the VSTOR handshake) the SCSI
midlayer scans the target (REPORT LUNS, INQUIRY, READ CAPACITY(16), MODE SENSE for write-protect and the
caching page; drivers/scsi/sd.c), then ``storvsc_queuecommand`` sends each command as EXECUTE_SRB: an
in-band packet without data, or a GPA-direct packet with exactly one range over the guest buffer
(``storvsc_do_io``), COMPLETION_REQUESTED, and a bounded number outstanding. Requests are split at the
``max_transfer_bytes`` the host advertised (rounded down to 4 KiB, as ``storvsc_probe`` does). A LUN whose
INQUIRY says CmdQue gets tagged SRBs (QUEUE_ACTION_ENABLE | NO_QUEUE_FREEZE, SP_UNTAGGED, SIMPLE_TAG), as
``sdev->tagged_supported`` makes ``storvsc_queuecommand`` send. An ENUMERATE_BUS or REMOVE_DEVICE from the
host (trans_id 0) starts ``storvsc_host_scan``'s rescan. CDBs come from vmbus_proto/devices/storage/scsi.py,
the definitions the host's SCSI target parses.

Guest buffers are guest pages: WRITE data is copied into them and travels with the request, READ data
arrives with the completion and is written into them, exactly where the host would have DMA'd it.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.storage import scsi, vstor
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE, Buffer, GpaRange, PacketType
from vmbus_proto.versions import Version

from ...guest_memory import GuestMemory
from ...vsc import HandshakeVsc
from .blockdev import EXTENT_HOLE, EXTENT_ZERO, BlockDeviceError
from .disk import DiskFacts
from .service import StorageService

MAX_OUTSTANDING = 256
MAX_SUBCHANNELS = 64  # at most this many asked for (Linux: one per online CPU but the first)
# One EXECUTE_SRB as Linux storvsc_queuecommand fills it: vstor_packet (operation, flags, status) and its
# 52-byte vmscsi_request (length, srb/scsi status, port, path, target, lun, cdb_length, sense_info_length,
# data_in, reserved, data_transfer_length, cdb[20], reserve, queue_tag, queue_action, srb_flags,
# time_out_value 60, queue_sort_key), packed in one go (vstor.SRB_PACKET): the per-I/O hot path.
_PACK_SRB = vstor.SRB_PACKET.pack
_OP_EXECUTE_SRB = int(vstor.Operation.EXECUTE_SRB)
SP_UNTAGGED = 0xFF  # queue_tag of a tagged device's request (Linux storvsc_drv.c)
SRB_SIMPLE_TAG_REQUEST = 0x20  # its queue_action


def _srb_modes(tagged: bool) -> tuple[tuple[int, int, int, int], ...]:
    """(data_in, srb_flags, queue_tag, queue_action) for a write, a read and a command without data, as
    ``storvsc_queuecommand`` sets them: DISABLE_SYNCH_TRANSFER always; QUEUE_ACTION_ENABLE | NO_QUEUE_FREEZE
    with SP_UNTAGGED / SIMPLE_TAG when the device is tagged (``sdev->tagged_supported``, from INQUIRY CmdQue);
    DATA_OUT / DATA_IN by direction (SRB_FLAGS_NO_DATA_TRANSFER is 0)."""
    flags = int(vstor.SrbFlags.DISABLE_SYNCH_TRANSFER)
    tag = action = 0
    if tagged:
        flags |= vstor.SrbFlags.QUEUE_ACTION_ENABLE | vstor.SrbFlags.NO_QUEUE_FREEZE
        tag, action = SP_UNTAGGED, SRB_SIMPLE_TAG_REQUEST
    return ((int(vstor.DataDirection.WRITE), flags | vstor.SrbFlags.DATA_OUT, tag, action),
            (int(vstor.DataDirection.READ), flags | vstor.SrbFlags.DATA_IN, tag, action),
            (int(vstor.DataDirection.UNKNOWN), flags, tag, action))


UNTAGGED, TAGGED = _srb_modes(False), _srb_modes(True)
# The fields of a COMPLETE_IO the guest reads: operation, then srb_status, scsi_status, sense_info_length,
# data_transfer_length and the sense bytes of the returned vmscsi_request.
_COMPLETION = struct.Struct("<I10xBB5xB2xI20s")
_COMPLETION_STATUS = struct.Struct("<I10xBB").unpack_from
_SRB_SUCCESS = int(vstor.SrbStatus.SUCCESS)
_COMP = int(PacketType.COMP)
_READ_DIRECTION = int(vstor.DataDirection.READ)
_OP_COMPLETE_IO = int(vstor.Operation.COMPLETE_IO)
_SRB_INVALID_LUN = int(vstor.SrbStatus.INVALID_LUN)
SD_MAX_WS16_BLOCKS = 0x7FFFFF  # Linux sd's cap on one WRITE SAME(16)
LBA_STATUS_ALLOCATION = 8 + 16 * 256  # GET LBA STATUS: header and up to 256 descriptors
REPORT_LUNS_ALLOCATION = 4096
ILLEGAL = int(scsi.SenseKey.ILLEGAL_REQUEST)
_SENSE_KEYS = frozenset(int(k) for k in scsi.SenseKey)
_HOST_SCAN = frozenset({int(vstor.Operation.ENUMERATE_BUS), int(vstor.Operation.REMOVE_DEVICE)})
_OPERATION = struct.Struct("<I")
_rw_cdb = scsi.read_write_cdb


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
        key, asc, ascq = scsi.sense_fields(self.sense)
        code = errno.EPERM if key == scsi.SenseKey.DATA_PROTECT else errno.EINVAL if key == ILLEGAL else errno.EIO
        if key == scsi.SenseKey.DATA_PROTECT and (asc, ascq) == (scsi.Asc.WRITE_PROTECTED,
                                                                 scsi.ASCQ_SPACE_ALLOCATION_FAILED):
            code = errno.ENOSPC  # a full thin store: Linux scsi_check_sense -> DID_ALLOC_FAILURE -> BLK_STS_NOSPC
        name = scsi.SenseKey(key).name.replace("_", " ") if key in _SENSE_KEYS else hex(key)
        text = (f"{what}: srb_status {self.srb_status:#x} scsi_status {self.scsi_status:#x}"
                + (f" sense {name} asc/ascq {asc:#04x}/{ascq:#04x}" if key else ""))
        return BlockDeviceError(code, text)


class DmaBuffer:
    """Contiguous guest pages a request's data lives in, with the GPA range for each transfer size it has
    served (a driver's bounce buffer: the range names these pages, the host moves data in and out of them)."""

    __slots__ = ("_mem", "_ranges", "_view", "base", "pfns")

    def __init__(self, memory: GuestMemory, pfns: list[int]) -> None:
        self.pfns = tuple(pfns)
        self.base = memory.offset_of(pfns[0])
        self._mem = memory.mem
        self._view = memory.view
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
        if not (isinstance(data, memoryview) and data.obj is self._mem):  # shared memory: already in place
            self._mem[base:end] = data
        return self._mem[base:end]

    def put(self, data: Buffer) -> memoryview:
        """A WRITE's data into the pages, returned as a view of them (what the host DMAs out; in shared memory
        the host reads the pages themselves, and nothing is copied again)."""
        base, end = self.base, self.base + len(data)
        self._mem[base:end] = data
        return self._view[base:end]


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
    """The VSC; ``disks`` holds the guest's view of each LUN it found as a ``BlockDevice`` (:class:`ScsiLun`).

    When the host says the bus changed (ENUMERATE_BUS or REMOVE_DEVICE, trans_id 0) the VSC rescans as Linux
    ``storvsc_host_scan`` does, and then calls ``on_luns_changed(added, removed)`` (LUN numbers) if set.
    """

    module = vstor
    Service = StorageService
    on_luns_changed: Callable[[list[int], list[int]], None] | None = None
    _rescan_task: asyncio.Task[None] | None = None
    _rescan_wanted = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_transfer = vstor.DEFAULT_MAX_TRANSFER_BYTES
        self.luns: list[int] = []
        self.disks: dict[int, ScsiLun] = {}
        self.pool: BufferPool | None = None
        self._io: list[tuple[Channel, asyncio.Semaphore]] = []  # the primary, then each open sub-channel
        self._next_io = 0
        self._per_request = 0  # ring bytes one request may take (sizes each channel's slots)

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
        self._per_request = per_request
        self._io = [(channel, self._io_slots(channel))]
        self.pool = BufferPool(self.memory, self.max_transfer)
        channel.on_packet = self._unsolicited
        if hs.supports_multi_channel and hs.max_channel_cnt and self.bus.core.version >= Version.WIN8:
            await self._create_subchannels(channel, hs.max_channel_cnt)
        await self.scan()

    def _io_slots(self, channel: Channel) -> asyncio.Semaphore:
        ring_slots = max(1, (channel.rings.writer.data_size // self._per_request) * 9 // 10)
        return asyncio.Semaphore(min(MAX_OUTSTANDING, ring_slots))

    async def _create_subchannels(self, channel: Channel, count: int) -> None:
        """Linux ``handle_multichannel_storage``: after END_INITIALIZATION ask for sub-channels with
        CREATE_SUB_CHANNELS (trans_id VMBUS_RQST_INIT). Linux asks for one per online CPU but the first, up to
        ``max_channel_cnt``; this guest asks for all the host allows, as one with that many CPUs would. The
        offers arrive later and are opened by ``on_subchannel_offer`` (``storvsc_sc_created``)."""
        count = min(count, MAX_SUBCHANNELS)
        request = vstor.pack_request(vstor.Operation.CREATE_SUB_CHANNELS, vstor.pack_create_sub_channels(count))
        reply = await channel.request(request, trans_id=vstor.VMBUS_RQST_INIT)
        status = vstor.VstorPacket.unpack(reply.payload).status
        if status != vstor.NtStatus.SUCCESS:
            self.log.warning("the host refused sub-channels; using the primary channel only", requested=count,
                             status=f"{status:#x}")
            return
        self.log.info("sub-channels requested", count=count)

    async def on_subchannel_offer(self, offer: m.OfferChannel) -> None:
        """``storvsc_sc_created``: open the sub-channel with the primary's ring size; I/O spreads over it."""
        if self.pool is None:
            return  # the primary is gone
        sc = await self.open_subchannel(offer)
        assert sc.channel is not None
        sc.channel.on_packet = self._unsolicited
        self._io.append((sc.channel, self._io_slots(sc.channel)))
        self.log.info("sub-channel open", subchannel=sc.relid, index=offer.sub_channel_index,
                      channels=len(self._io))

    async def on_subchannel_rescind(self, relid: int) -> None:
        sc = self.subchannels.get(relid)
        if sc is not None:
            self._io = [(ch, slots) for ch, slots in self._io if ch is not sc.channel]
        await super().on_subchannel_rescind(relid)

    def _unsolicited(self, pkt: Any) -> None:
        """A host packet that answers nothing (Linux ``storvsc_on_channel_callback`` with trans_id 0)."""
        payload = pkt.payload
        if len(payload) < _OPERATION.size:
            self.log.warning("storage packet too short to carry an operation", length=len(payload))
            return
        (op,) = _OPERATION.unpack_from(payload)
        if pkt.trans_id == 0 and op in _HOST_SCAN:
            self.request_rescan()  # storvsc_on_receive: queue_work(host_scan_work)
        else:
            self.log.warning("unexpected storage packet", operation=op, trans_id=pkt.trans_id, type=pkt.type)

    def request_rescan(self) -> None:
        """Schedule a rescan; requests that come while one is waiting or running fold into one more pass
        (a work item queued again while it runs, as Linux's workqueue does)."""
        self._rescan_wanted = True
        if self._rescan_task is None or self._rescan_task.done():
            self._rescan_task = asyncio.get_running_loop().create_task(self._rescan_worker())

    async def _rescan_worker(self) -> None:
        while self._rescan_wanted:
            self._rescan_wanted = False
            try:
                await self.rescan()
            except (ChannelClosed, ConnectionError):
                return  # the channel went: a new one scans from scratch
            except BlockDeviceError as exc:
                self.log.warning("storage rescan failed", error=str(exc))
            except DeviceProtocolError as exc:
                self.log.error("storage rescan got a malformed answer", error=str(exc))

    async def run(self, channel: Channel) -> None:
        """Nothing to poll: completions are routed to their requests by transaction id."""

    def forget(self) -> None:
        self._io = []
        super().forget()
        if self._rescan_task is not None:
            self._rescan_task.cancel()
            self._rescan_task = None
        if self.pool is not None:
            self.pool.release()
            self.pool = None

    # ---- SCSI -------------------------------------------------------------------------------------------

    async def command(self, cdb: bytes, data_out: Buffer | None = None, data_in: int = 0,
                      lun: int | None = None, modes: tuple[tuple[int, int, int, int], ...] = UNTAGGED) -> ScsiReply:
        """One EXECUTE_SRB. ``data_out`` bytes are written to the device; ``data_in`` bytes are read. ``modes``
        is the LUN's (:data:`TAGGED` once its INQUIRY said CmdQue)."""
        mode = modes[0] if data_out is not None else modes[1] if data_in else modes[2]
        payload, data = await self._srb(cdb, data_out, data_in, 0 if lun is None else lun, mode)
        return self._reply(payload, data)

    async def _srb(self, cdb: bytes, data_out: Buffer | None, data_in: int, lun: int,
                   mode: tuple[int, int, int, int]) -> tuple[bytes, bytes]:
        """Send one EXECUTE_SRB (``storvsc_queuecommand``); ``mode`` is (data_in, srb_flags, queue_tag,
        queue_action) from :data:`UNTAGGED` / :data:`TAGGED`. Returns the completion's payload and the READ data
        as it landed in our pages. The per-I/O hot path."""
        io, pool = self._io, self.pool
        if not io or pool is None or self.channel is None:
            raise ChannelClosed("storage channel is not open")
        # Spread over the primary and its sub-channels (storvsc picks by CPU; one CPU here: round robin).
        channel, slots = io[self._next_io % len(io)] if len(io) > 1 else io[0]
        self._next_io += 1
        length = len(data_out) if data_out is not None else data_in
        if length > pool.size:
            raise BlockDeviceError(errno.EINVAL, f"{length}-byte transfer exceeds {pool.size}")
        direction, flags, tag, action = mode
        payload = _PACK_SRB(
            _OP_EXECUTE_SRB, vstor.REQUEST_COMPLETION_FLAG, 0,  # vstor_packet header
            vstor.VMSCSI_REQUEST_SIZE, 0, 0, 0, 0, 0, lun, len(cdb),
            vstor.SENSE_BUFFER_SIZE, direction, 0, length, cdb, 0, tag, action, flags, 60, 0)
        async with slots:
            if not length:
                reply = await channel.request(payload)
                return reply.payload, b""
            buf = pool.take(length)
            try:
                out = buf.put(data_out) if data_out is not None else b""  # what the host DMAs out of our pages
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

    async def _report_luns(self) -> list[int]:
        """REPORT LUNS on the target (scsi_scan.c ``scsi_report_lun_scan``); LUN 0 if it fails or lists none."""
        reply = await self.command(scsi.report_luns_cdb(REPORT_LUNS_ALLOCATION), data_in=REPORT_LUNS_ALLOCATION)
        return (scsi.report_luns(reply.data) if reply.ok else []) or [0]

    async def _probe(self, luns: list[int]) -> tuple[dict[int, ScsiLun], BlockDeviceError | None]:
        """sd's probe of each LUN: the disks found, and the first error met."""
        found: dict[int, ScsiLun] = {}
        first_error: BlockDeviceError | None = None
        for lun in luns:
            disk = ScsiLun(self, lun)
            try:
                if await disk.probe():
                    found[lun] = disk
            except BlockDeviceError as exc:
                self.log.warning("LUN probe failed", lun=lun, error=str(exc))
                first_error = first_error or exc
        for disk in found.values():
            self.log.info("disk attached", lun=disk.lun, vendor=disk.vendor, product=disk.product, size=disk.size,
                          read_only=disk.read_only, discard=disk.provisioning, max_transfer=disk.max_transfer)
        return found, first_error

    async def scan(self) -> None:
        """What the Linux SCSI midlayer does on a new target (scsi_scan.c): REPORT LUNS, then sd probes each
        LUN that answers INQUIRY as a disk. LUN 0 is probed even if REPORT LUNS fails."""
        self.luns = await self._report_luns()
        self.disks, first_error = await self._probe(self.luns)
        if not self.disks and first_error is not None:
            raise first_error

    async def rescan(self) -> tuple[list[int], list[int]]:
        """Linux ``storvsc_host_scan``: TEST UNIT READY on every known LUN (one answered INVALID_LUN is removed,
        ``storvsc_handle_error``), then ``scsi_scan_host``: REPORT LUNS and a probe of each LUN not known yet.
        Returns (added, removed) and tells ``on_luns_changed`` when either is not empty."""
        removed: list[int] = []
        for lun, disk in list(self.disks.items()):
            reply = await disk.command(scsi.test_unit_ready_cdb())
            if reply.srb_status & 0x3F == _SRB_INVALID_LUN:
                removed.append(lun)
                del self.disks[lun]
                self.log.info("disk removed", lun=lun)
        self.luns = await self._report_luns()
        found, _ = await self._probe([lun for lun in self.luns if lun not in self.disks])
        self.disks.update(found)
        added = sorted(found)
        if (added or removed) and self.on_luns_changed is not None:
            self.on_luns_changed(added, removed)
        return added, removed


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
        self.modes = UNTAGGED  # TAGGED once INQUIRY says CmdQue (Linux sdev->tagged_supported)

    @property
    def supports_discard(self) -> bool:
        return self.provisioning is not None

    async def command(self, cdb: bytes, data_out: Buffer | None = None, data_in: int = 0) -> ScsiReply:
        return await self.vsc.command(cdb, data_out, data_in, lun=self.lun, modes=self.modes)

    async def probe(self) -> bool:
        """Read the LUN's geometry and capabilities; False if it is not a disk that is present."""
        inq = await self.command(scsi.inquiry_cdb(96), data_in=96)
        if not inq.ok:
            raise inq.error(f"INQUIRY of LUN {self.lun}")
        if not inq.data or inq.data[0] & 0x1F != scsi.DEVICE_TYPE_DISK or inq.data[0] >> 5:
            return False  # not a direct-access device, or not present (qualifier 011b)
        self.modes = TAGGED if scsi.inquiry_tagged(inq.data) else UNTAGGED
        self.vendor = inq.data[8:16].decode("ascii", "replace").strip()
        self.product = inq.data[16:32].decode("ascii", "replace").strip()
        cap = await self.command(scsi.read_capacity16_cdb(32), data_in=32)
        if not cap.ok:
            raise cap.error(f"READ CAPACITY(16) of LUN {self.lun}")
        last_lba, block = struct.unpack_from(">QI", cap.data)
        self.block_size = block
        self.size = (last_lba + 1) * block
        self.lbpme, self.lbprz = bool(cap.data[14] & 0x80), bool(cap.data[14] & 0x40)
        sense = await self.command(scsi.mode_sense6_cdb(0x3F, 255), data_in=255)
        if sense.ok and len(sense.data) >= 4:
            self.read_only = bool(sense.data[2] & 0x80)
        cache = await self.command(scsi.mode_sense6_cdb(0x08, 255, dbd=True), data_in=255)
        if cache.ok and len(cache.data) >= 7:
            self.write_cache = bool(cache.data[4 + 2] & 0x04)
        if self.lbpme and not self.read_only:
            await self._provisioning()
        return True

    async def _provisioning(self) -> None:
        limits = await self.command(scsi.inquiry_cdb(64, page=0xB0), data_in=64)
        lbp = await self.command(scsi.inquiry_cdb(8, page=0xB2), data_in=8)
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

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length <= self.max_transfer:
            return await self._read_chunk(offset, length)
        chunks = [(o, min(self.max_transfer, offset + length - o)) for o in range(offset, offset + length,
                                                                                    self.max_transfer)]
        parts = await asyncio.gather(*(self._read_chunk(o, n) for o, n in chunks))
        return b"".join(parts)

    async def _read_chunk(self, offset: int, length: int) -> bytes:
        vsc, bs = self.vsc, self.block_size
        payload, data = await vsc._srb(_rw_cdb(False, offset // bs, length // bs, False), None, length, self.lun,
                                       self.modes[1])
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
        vsc, bs = self.vsc, self.block_size
        payload, _ = await vsc._srb(_rw_cdb(True, offset // bs, len(data) // bs, fua), data, 0, self.lun,
                                    self.modes[0])
        if not vsc._succeeded(payload):
            raise vsc._reply(payload, b"").error(f"WRITE at {offset}")

    async def flush(self) -> None:
        reply = await self.command(scsi.synchronize_cache10_cdb())
        if not reply.ok:
            raise reply.error("SYNCHRONIZE CACHE")

    async def _write_same(self, offset: int, length: int, unmap: bool) -> None:
        """WRITE SAME(16) of a zero block over the range, in commands of at most MAXIMUM WRITE SAME LENGTH."""
        bs = self.block_size
        zero = bytes(bs)
        for pos in range(offset, offset + length, self.max_ws_blocks * bs):
            blocks = min(self.max_ws_blocks, (offset + length - pos) // bs)
            reply = await self.command(scsi.write_same16_cdb(pos // bs, blocks, unmap=unmap), data_out=zero)
            if not reply.ok:
                raise reply.error(f"WRITE SAME(16){' UNMAP' if unmap else ''} at {pos}")

    async def _unmap(self, offset: int, length: int) -> None:
        bs = self.block_size
        for pos in range(offset, offset + length, self.max_discard_blocks * bs):
            blocks = min(self.max_discard_blocks, (offset + length - pos) // bs)
            params = scsi.unmap_parameters(pos // bs, blocks)
            reply = await self.command(scsi.unmap_cdb(len(params)), data_out=params)
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
        reply = await self.command(scsi.get_lba_status_cdb(offset // bs, LBA_STATUS_ALLOCATION),
                                   data_in=LBA_STATUS_ALLOCATION)
        if not reply.ok:
            key, asc, _ = scsi.sense_fields(reply.sense)
            if key == ILLEGAL and asc in (scsi.Asc.INVALID_COMMAND_OPERATION_CODE, scsi.Asc.INVALID_FIELD_IN_CDB):
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
