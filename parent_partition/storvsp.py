"""StorVSP: the synthetic SCSI controller's host half, serving VSTOR over VMBus onto disk images.

Mirrors OpenVMM vm/devices/storage/storvsp/src/lib.rs: after the VSTOR handshake (``VspHandshake``) every
EXECUTE_SRB is parsed (``parse_packet``), its data buffer checked (0 or 1 GPA range, at least
``data_transfer_length`` long), run against the partition's SCSI controller, and completed with a
COMPLETE_IO that echoes the transaction id and carries SRB status, SCSI status, the bytes transferred
and fixed-format sense (``send_vmbus_packet``; completions sized 12 + min(request, 52)). At most
``queue_depth`` requests are in flight per channel (OpenVMM ``io_queue_depth``, default 256): at the cap
the VSP stops reading the ring, so the guest's ring fills and it blocks. RESET_LUN/ADAPTER/BUS complete
with SUCCESS as no-ops.

Over a stream the READ data rides with the completion and WRITE data with the request (DESIGN.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices import storage as vstor
from vmbus_proto.devices.base import Handshake
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import Packet, PacketType, data_length

from .scsi import LunConfig, ScsiController, open_disks
from .vsp import HandshakeVsp, OpenChannelInfo

DEFAULT_QUEUE_DEPTH = 256


class StorageVsp(HandshakeVsp):
    module = vstor

    def __init__(self, data_dir: Path | None = None, luns_for: Callable[[str], list[LunConfig]] | None = None,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH, max_transfer_bytes: int = vstor.DEFAULT_MAX_TRANSFER_BYTES,
                 idle_close: float = 30.0, **handshake_args: Any) -> None:
        super().__init__(max_transfer_bytes=max_transfer_bytes, **handshake_args)
        self.data_dir = data_dir or Path("var")
        self.luns_for = luns_for or (lambda partition: [LunConfig(lun=0)])
        self.queue_depth = queue_depth
        self.max_transfer_bytes = max_transfer_bytes
        self.controllers: dict[str, ScsiController] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}  # open storage channels per partition
        self._partition_of: dict[Channel, str] = {}
        self.idle_close = idle_close
        self.requests = 0
        self.log = logs.get(component="storvsp")

    async def controller(self, partition: str) -> ScsiController:
        """The partition's own disks, opened on its first channel open and kept across reconnects."""
        lock = self._opening.setdefault(partition, asyncio.Lock())
        async with lock:
            ctl = self.controllers.get(partition)
            if ctl is None:
                luns = self.luns_for(partition)
                ctl = await open_disks(self.data_dir, partition, luns, max_transfer_bytes=self.max_transfer_bytes)
                self.controllers[partition] = ctl
            return ctl

    async def open(self, channel: Channel, info: OpenChannelInfo) -> None:
        await self.controller(info.partition)  # an unopenable disk fails the OPENCHANNEL
        self._users[info.partition] = self._users.get(info.partition, 0) + 1
        self._partition_of[channel] = info.partition
        await super().open(channel, info)

    async def close(self, channel: Channel) -> None:
        await super().close(channel)
        partition = self._partition_of.pop(channel, None)
        if partition is None:
            return
        self._users[partition] -= 1
        if not self._users[partition]:
            # Keep the disks open a while for a reconnect; then flush and close them.
            asyncio.get_running_loop().call_later(self.idle_close, self._close_if_idle, partition)

    def _close_if_idle(self, partition: str) -> None:
        if self._users.get(partition) == 0 and partition in self.controllers:
            asyncio.get_running_loop().create_task(self._close_disks(partition))

    async def _close_disks(self, partition: str) -> None:
        lock = self._opening.setdefault(partition, asyncio.Lock())
        async with lock:
            if self._users.get(partition) != 0:
                return
            ctl = self.controllers.pop(partition, None)
            self._users.pop(partition, None)
            self._opening.pop(partition, None)
            if ctl is not None:
                for err in await ctl.close():
                    self.log.error("disk flush failed on close", partition=partition, error=str(err))

    async def after_handshake(self, channel: Channel, info: OpenChannelInfo, hs: Handshake) -> None:
        ctl = await self.controller(info.partition)
        slots = asyncio.Semaphore(self.queue_depth)
        inflight: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()  # at the cap, stop reading the ring
                pkt = await channel.recv()
                op, srb = parse_request(pkt)
                if op == vstor.Operation.EXECUTE_SRB:
                    assert srb is not None
                    if srb.data_in == vstor.DataDirection.READ and not (srb.path_id or srb.target_id):
                        # A READ whose data is in the page cache completes right here, without a task.
                        cached = ctl.read_cached(srb.lun, srb.cdb, srb.data_transfer_length)
                        if cached is not None:
                            self.requests += 1
                            try:
                                await self._complete(channel, pkt, _answer(srb, cached.srb_status, cached.scsi_status,
                                                                           cached.transferred, b""), cached.data)
                            finally:
                                slots.release()
                            continue
                    task = asyncio.get_running_loop().create_task(self._execute(channel, ctl, pkt, srb, slots))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    continue
                try:
                    await channel.complete(pkt.trans_id, self._control_answer(op, pkt))
                finally:
                    slots.release()
        finally:
            # Drain: every request already taken off the ring is answered before the channel goes.
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    def _control_answer(self, op: int, pkt: Packet) -> bytes:
        if op in (vstor.Operation.RESET_LUN, vstor.Operation.RESET_ADAPTER, vstor.Operation.RESET_BUS):
            return vstor.pack_completion(vstor.NtStatus.SUCCESS, request_payload_len=len(pkt.payload))
        # Initialization packets after Ready are out of order (OpenVMM: INVALID_DEVICE_STATE).
        return vstor.pack_completion(vstor.NtStatus.INVALID_DEVICE_STATE, request_payload_len=len(pkt.payload))

    async def _execute(self, channel: Channel, ctl: ScsiController, pkt: Packet, srb: vstor.VmscsiRequest,
                       slots: asyncio.Semaphore) -> None:
        try:
            self.requests += 1
            want = srb.data_transfer_length
            data_out: bytes | memoryview | None = None
            if srb.path_id != 0 or srb.target_id != 0:
                await self._complete(channel, pkt, _answer(srb, vstor.SrbStatus.INVALID_TARGET_ID, 0, 0, b""), b"")
                return
            if srb.data_in == vstor.DataDirection.WRITE and want:
                data_out = pkt.data
            result = await ctl.execute(srb.lun, srb.cdb, data_out,
                                       want if srb.data_in == vstor.DataDirection.READ else 0)
            sense = result.sense[:vstor.SENSE_BUFFER_SIZE] if result.sense else b""
            result_srb = _answer(srb, result.srb_status, result.scsi_status, result.transferred, sense)
            data_in = result.data if srb.data_in == vstor.DataDirection.READ else b""
            await self._complete(channel, pkt, result_srb, data_in)
        finally:
            slots.release()

    async def _complete(self, channel: Channel, pkt: Packet, srb: vstor.VmscsiRequest, data: bytes) -> None:
        status = vstor.srb_status_to_nt_status(srb.srb_status)
        payload = vstor.pack_completion(status, srb.pack(), request_payload_len=len(pkt.payload))
        await channel.complete(pkt.trans_id, payload, data)

    async def shutdown(self) -> None:
        """Flush every partition's disks (fdatasync) and close them."""
        for partition, ctl in self.controllers.items():
            for err in await ctl.close():
                self.log.error("disk flush failed at shutdown", partition=partition, error=str(err))
        self.controllers.clear()


def _answer(srb: vstor.VmscsiRequest, srb_status: int, scsi_status: int, transferred: int,
            sense: bytes) -> vstor.VmscsiRequest:
    """The request's vmscsi_request sent back with the outcome (OpenVMM copies the request and fills it)."""
    return vstor.VmscsiRequest(
        srb.length, srb_status, scsi_status, srb.port_number, srb.path_id, srb.target_id, srb.lun, srb.cdb_length,
        len(sense), srb.data_in, srb.reserved, transferred, sense.ljust(vstor.SENSE_BUFFER_SIZE, b"\0"),
        srb.reserve, srb.queue_tag, srb.queue_action, srb.srb_flags, srb.time_out_value, srb.queue_sort_key)


def parse_request(pkt: Packet) -> tuple[int, vstor.VmscsiRequest | None]:
    """Validate one guest packet the way OpenVMM ``parse_packet`` does; raise on a protocol violation."""
    if pkt.type == PacketType.COMP:
        raise DeviceProtocolError("unsolicited completion on the storage channel")
    if not pkt.completion_requested:
        raise DeviceProtocolError("storage request without COMPLETION_REQUESTED")
    packet = vstor.VstorPacket.unpack(pkt.payload)
    op = packet.operation
    if op != vstor.Operation.EXECUTE_SRB:
        if pkt.ranges or pkt.data:
            raise DeviceProtocolError(f"vstor operation {op} carries a data buffer")
        return op, None
    srb = vstor.VmscsiRequest.unpack(packet.body)
    if srb.cdb_length > vstor.MAX_CDB_LENGTH or srb.cdb_length == 0:
        raise DeviceProtocolError(f"EXECUTE_SRB with cdb_length {srb.cdb_length}")
    want = srb.data_transfer_length
    if len(pkt.ranges) > 1:
        raise DeviceProtocolError(f"EXECUTE_SRB with {len(pkt.ranges)} GPA ranges (at most 1)")
    have = data_length(pkt.ranges)
    if want and have < want:
        raise DeviceProtocolError(f"EXECUTE_SRB for {want} bytes with a {have}-byte buffer")
    if srb.data_in == vstor.DataDirection.WRITE and want and len(pkt.data) != want:
        raise DeviceProtocolError(f"WRITE of {want} bytes carried {len(pkt.data)} bytes of data")
    if srb.data_in != vstor.DataDirection.WRITE and pkt.data:
        raise DeviceProtocolError("data sent to the host with a request that does not write")
    return op, srb
