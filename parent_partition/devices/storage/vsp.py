"""StorVSP: the synthetic SCSI controller's host half, serving VSTOR over VMBus onto disk images.

Mirrors OpenVMM vm/devices/storage/storvsp/src/lib.rs: after the VSTOR handshake (``VspHandshake``) every
packet is parsed (``vstor.parse_request``, OpenVMM ``parse_packet``: an unrecognized operation is a protocol
error), an EXECUTE_SRB's data buffer checked (0 or 1 GPA range, at least ``data_transfer_length`` long), run
against the partition's SCSI controller at its (path, target, LUN), and completed with a COMPLETE_IO that
echoes the transaction id and carries a fresh vmscsi_request with the SRB status, SCSI status, the bytes
transferred and fixed-format sense (``handle_completion``, ``send_vmbus_packet``; completions sized
12 + min(request, 52)). At most ``queue_depth`` requests are in flight per channel (OpenVMM
``io_queue_depth``, default 256): at the cap the VSP stops reading the ring, so the guest's ring fills and it
blocks. RESET_LUN/ADAPTER/BUS complete with SUCCESS as no-ops; CREATE_SUB_CHANNELS goes to the handshake.

Over a stream the READ data rides with the completion and WRITE data with the request (DESIGN.md). One
wake-up serves every request already queued on the ring: a READ whose data is in the page cache is
answered on the spot, anything that may wait for the disk runs in its own task (docs/architecture.md §5.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.aio.cli import os_reason
from vmbus_proto.devices.base import Handshake
from vmbus_proto.devices.storage import vstor
from vmbus_proto.errors import DeviceProtocolError, PacketError
from vmbus_proto.packets import Buffer, Packet, PacketType

from ...counters import Sample
from ...settings import ConfigError
from ...vsp import ChannelResources, HandshakeVsp, HostContext, offer_subchannels
from .disk import DiskBackend, shutdown_default_executor
from .scsi import LunConfig, ScsiController, ScsiResult, open_disks
from .settings import LunEntry, StorageSettings

DEFAULT_QUEUE_DEPTH = 256


class StorageVsp(HandshakeVsp):
    module = vstor
    Settings = StorageSettings

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
        self._ready: dict[tuple[str, int], vstor.VspHandshake] = {}  # (partition, primary relid) -> handshake

    @classmethod
    def create(cls, settings: StorageSettings, host: HostContext) -> StorageVsp:
        def luns_for(partition: str) -> list[LunConfig]:
            return [LunConfig(lun=lun, size_bytes=size, path=path, read_only=ro)
                    for lun, size, path, ro in settings.luns_for(partition)]

        return cls(host.data_path, luns_for, queue_depth=settings.queue_depth,
                   max_transfer_bytes=settings.max_transfer_bytes, idle_close=settings.idle_close,
                   supported=settings.protocol_versions, max_channel_cnt=settings.subchannels)

    @classmethod
    def check(cls, settings: StorageSettings, host: HostContext) -> None:
        """Every configured LUN image exists and opens as configured (read-only or not)."""
        for entry in settings.lun:
            if entry.path is not None:
                _check_image(entry, host.source)

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

    async def hold(self, partition: str) -> ScsiController:
        """The partition's disks, kept open until ``release``: what a channel, or another device on the same
        disks (the emulated ATA disk), holds."""
        ctl = await self.controller(partition)  # an unopenable disk raises (and fails the OPENCHANNEL)
        self._users[partition] = self._users.get(partition, 0) + 1
        return ctl

    def release(self, partition: str) -> None:
        self._users[partition] -= 1
        if not self._users[partition]:
            # Keep the disks open a while for a reconnect; then flush and close them.
            asyncio.get_running_loop().call_later(self.idle_close, self._close_if_idle, partition)

    async def open(self, channel: Channel, res: ChannelResources) -> None:
        await self.hold(res.partition)
        self._partition_of[channel] = res.partition
        await super().open(channel, res)

    async def close(self, channel: Channel) -> None:
        await super().close(channel)
        partition = self._partition_of.pop(channel, None)
        if partition is not None:
            self.release(partition)

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

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        if not res.sub_channel_index:
            await super().serve(channel, res)  # the primary: VSTOR handshake first
            return
        # A sub-channel has no handshake of its own: it carries I/O under the primary's (OpenVMM storvsp).
        hs = self._ready.get((res.partition, res.primary_relid))
        if hs is None:
            raise DeviceProtocolError(f"sub-channel {res.relid} opened while its primary {res.primary_relid} "
                                      f"is not ready")
        await self.after_handshake(channel, res, hs)

    async def after_handshake(self, channel: Channel, res: ChannelResources, hs: Handshake) -> None:
        ctl = await self.controller(res.partition)
        assert isinstance(hs, vstor.VspHandshake)
        primary = not res.sub_channel_index
        if primary:
            self._ready[(res.partition, res.relid)] = hs
            if hs.sub_channel_count:  # asked for before END_INITIALIZATION
                offer_subchannels(res, hs.sub_channel_count)
        queue = _Inflight(self.queue_depth, hs)
        recv_nowait, try_send, send = channel.recv_nowait, channel.try_send, channel.send
        try:
            while True:
                await queue.room()  # at the cap, stop reading the ring
                pkt: Packet | None = await channel.recv()
                while pkt is not None:  # serve everything already queued without a coroutine switch each
                    answer = self._serve(channel, res, ctl, pkt, queue)
                    if answer is not None and not try_send(answer):
                        await send(answer)
                    pkt = recv_nowait() if not queue.full else None
        finally:
            if primary:
                self._ready.pop((res.partition, res.relid), None)
            await queue.drain()  # every request already taken off the ring is answered before the channel goes
            res.log.info("storage channel done", requests=queue.served, sub_channel=res.sub_channel_index)

    def _serve(self, channel: Channel, res: ChannelResources, ctl: ScsiController, pkt: Packet,
               queue: _Inflight) -> Packet | None:
        """Answer ``pkt`` now if that needs no waiting (the completion is returned); else start it, to be
        answered when it is done."""
        shared = channel.shared
        op, srb = parse_request(pkt, shared)
        if srb is None:
            return Packet(COMP, 0, pkt.trans_id, _control_answer(op, pkt, queue.hs, res))
        self.requests += 1
        queue.served += 1
        reading = srb.data_in == READ
        if not (srb.path_id or srb.target_id):  # our LUNs sit at path 0, target 0; the rest take the full path
            # In shared memory the data moves between the image and the guest's own pages (preadv/pwritev).
            dma = _dma(channel, pkt) if shared else None
            if reading:
                # A READ whose data is in the page cache completes right here.
                data = ctl.read_cached(srb.lun, srb.cdb, srb.data_transfer_length, dma)
                if data is not None:
                    if shared:
                        channel.moved(data_out=len(data))
                    return _completion(pkt, SUCCESS, 0, len(data), b"", b"" if shared else data)
            # A plain READ or WRITE goes to the disk's pool and is answered from its future's callback;
            # anything else (and every error case) runs the whole SCSI path in a task.
            out = (dma if shared else pkt.data) if srb.data_in == WRITE else None
            started = ctl.start_rw(srb.lun, srb.cdb, out, srb.data_transfer_length if reading else 0, dma)
            if started is not None:
                io, length = started
                if shared and not reading:
                    channel.moved(data_in=length)
                queue.add(io, lambda done: self._answer_rw(channel, res, ctl, queue, pkt, srb, done, length, reading))
                return None
        task = asyncio.get_running_loop().create_task(self._execute(channel, res, ctl, pkt, srb))
        queue.add(task, lambda done: _task_failed(done, channel, res, self.name))
        return None

    def _answer_rw(self, channel: Channel, res: ChannelResources, ctl: ScsiController, queue: _Inflight, pkt: Packet,
                   srb: vstor.ExecuteSrb, done: asyncio.Future[Any], length: int, reading: bool) -> None:
        if channel.closed or done.cancelled():
            return  # the guest went: nobody to answer
        result = ctl.rw_result(done, length, reading, res.log.bind(lun=srb.lun), srb.data, srb.lun)  # data: CDB
        answer = _result_completion(pkt, result, reading and not channel.shared)  # shared: read into its pages
        if reading and channel.shared:
            channel.moved(data_out=result.transferred)
        if not channel.try_send(answer):  # the guest's ring is full: wait for room like any blocked writer
            sending = asyncio.get_running_loop().create_task(_send_quietly(channel, answer))
            queue.add(sending, lambda t: _task_failed(t, channel, res, self.name))

    async def _execute(self, channel: Channel, res: ChannelResources, ctl: ScsiController, pkt: Packet,
                       srb: vstor.ExecuteSrb) -> None:
        want = srb.data_transfer_length
        reading = srb.data_in == READ
        data_out = (_dma(channel, pkt) if channel.shared else pkt.data) if srb.data_in == WRITE and want else None
        if channel.shared and data_out is not None:
            channel.moved(data_in=len(data_out))
        result = await ctl.execute(srb.lun, srb.cdb, data_out, want if reading else 0, path_id=srb.path_id,
                                   target_id=srb.target_id,
                                   log=res.log.bind(path_id=srb.path_id, target_id=srb.target_id, lun=srb.lun))
        await _send_quietly(channel, _result_completion(pkt, result, reading))

    def samples(self) -> list[Sample]:
        return [*super().samples(),
                Sample("requests_total", self.requests, "SCSI requests (EXECUTE_SRB) served, every partition"),
                *(Sample("luns_open", len(ctl.luns), "disks open for the partition", "gauge", partition=p)
                  for p, ctl in self.controllers.items())]

    async def shutdown(self) -> None:
        """Flush every partition's disks (fdatasync) and close them."""
        for partition, ctl in self.controllers.items():
            for err in await ctl.close():
                self.log.error("disk flush failed at shutdown", partition=partition, error=str(err))
        self.controllers.clear()
        shutdown_default_executor()


class _Inflight:
    """Requests taken off the ring and not answered yet (tasks and disk futures): at most ``depth``. Kept per
    channel with the channel's handshake ``hs`` (the Ready state's CREATE_SUB_CHANNELS goes to it)."""

    def __init__(self, depth: int, hs: vstor.VspHandshake) -> None:
        self.depth = depth
        self.hs = hs
        self.served = 0  # requests taken off this channel's ring
        self.pending: set[asyncio.Future[Any]] = set()
        self._room = asyncio.Event()

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.depth

    def add(self, fut: asyncio.Future[Any], on_done: Callable[[asyncio.Future[Any]], None]) -> None:
        self.pending.add(fut)
        fut.add_done_callback(on_done)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.pending.discard(fut)
        self._room.set()

    async def room(self) -> None:
        while self.full:
            self._room.clear()
            await self._room.wait()

    async def drain(self) -> None:
        while self.pending:  # an answer that waits for ring room joins the set while we wait
            await asyncio.gather(*self.pending, return_exceptions=True)


async def _send_quietly(channel: Channel, answer: Packet) -> None:
    with contextlib.suppress(ChannelClosed):  # the guest went: nobody to answer
        await channel.send(answer)


def _dma(channel: Channel, pkt: Packet) -> memoryview | None:
    """The request's buffer in the guest's mapped pages; a page outside its memory is its protocol error."""
    try:
        return channel.dma(pkt)
    except PacketError as exc:
        raise DeviceProtocolError(f"EXECUTE_SRB buffer: {exc}") from None


def _task_failed(task: asyncio.Future[Any], channel: Channel, res: ChannelResources, name: str) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        res.log.error("storage request failed; closing the partition's connection", exc_info=exc)
        res.fail(f"{name} relid {channel.relid}: internal device error")


def _control_answer(op: int, pkt: Packet, hs: vstor.VspHandshake, res: ChannelResources) -> bytes:
    """The completion of a recognized operation other than EXECUTE_SRB once the channel is Ready (OpenVMM
    ``handle_packet``): the resets are no-ops that succeed; CREATE_SUB_CHANNELS goes to the handshake
    (INVALID_PARAMETER when refused); initialization packets are out of order (INVALID_DEVICE_STATE)."""
    size = len(pkt.payload)
    if op in (vstor.Operation.RESET_LUN, vstor.Operation.RESET_ADAPTER, vstor.Operation.RESET_BUS):
        return vstor.pack_completion(vstor.NtStatus.SUCCESS, request_payload_len=size)
    if op == vstor.Operation.CREATE_SUB_CHANNELS:
        count = vstor.parse_create_sub_channels(pkt.payload[vstor.VSTOR_HEADER_SIZE:])
        status = hs.create_sub_channels(count)
        if status != vstor.NtStatus.SUCCESS:
            res.log.warning("cannot create sub-channels", requested=count, maximum=hs.max_channel_cnt)
        else:
            offer_subchannels(res, count)
        return vstor.pack_completion(status, request_payload_len=size)
    res.log.warning("unexpected VSTOR packet on a ready channel", operation=op)
    return vstor.pack_completion(vstor.NtStatus.INVALID_DEVICE_STATE, request_payload_len=size)


def _completion(pkt: Packet, srb_status: int, scsi_status: int, transferred: int, sense: bytes,
                data: Buffer) -> Packet:
    """The VM_PKT_COMP answering ``pkt``: COMPLETE_IO, with READ data riding along into its GPA range."""
    return Packet(COMP, 0, pkt.trans_id, pack_complete_io(srb_status, scsi_status, transferred, sense,
                                                          len(pkt.payload)), data=data)


def _result_completion(pkt: Packet, result: ScsiResult, reading: bool) -> Packet:
    """The completion of a command the SCSI target ran: its outcome, and its data for a READ."""
    return _completion(pkt, result.srb_status, result.scsi_status, result.transferred, result.sense,
                       result.data if reading else b"")


COMP = int(PacketType.COMP)
READ, WRITE = int(vstor.DataDirection.READ), int(vstor.DataDirection.WRITE)
SUCCESS = int(vstor.SrbStatus.SUCCESS)
parse_request, pack_complete_io = vstor.parse_request, vstor.pack_complete_io


def _check_image(entry: LunEntry, source: str | None) -> None:
    path = entry.path
    assert path is not None
    where = f"{source + ': ' if source else ''}[[storage.lun]] lun {entry.lun}: path {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; create the image (qemu-img create -f raw {path} 1G) "
                          f"or fix the path") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {os_reason(exc)}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"{where} is not a regular file or block device")
    try:
        DiskBackend.open(path, None, False, entry.read_only).close_sync()
    except OSError as exc:
        hint = ("; make it writable or set read_only = true"
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not entry.read_only else "")
        why = (exc.strerror or str(exc)).removeprefix(f"{path}: ").removeprefix(f"open {path}: ")
        raise ConfigError(f"{where}: {why}{hint}") from None
