"""Shell tier: the StorVSP's I/O loop on an in-memory channel (no socket), and its packet parser.

The connection under the channel is a recorder of what the VSP sends; disks are real image files or a
backend whose writes wait until the test lets them go, so the queue-depth cap can be watched at work.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import threading
import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from parent_partition.devices.storage.scsi import LunConfig, ScsiController, ScsiDisk, open_disks
from parent_partition.devices.storage.vsp import StorageVsp
from parent_partition.vsp import ChannelResources
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.channel import ChannelRings
from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.storage import vstor
from vmbus_proto.devices.storage.vstor import parse_request
from vmbus_proto.envelope import Signal
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType

RING = 64 * 4096


class Recorder:
    """What a ``FramedConnection`` does for a channel, minus the socket: it keeps what was sent."""

    def __init__(self) -> None:
        self.packets: list[Packet] = []
        self.signals: list[Signal] = []

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.packets.append(pkt)

    def send_signal(self, relid: int, sig: Signal) -> None:
        self.signals.append(sig)


def host_channel() -> tuple[Channel, Recorder]:
    conn = Recorder()
    rings = ChannelRings(1, host=True, guest_to_host_data=RING, host_to_guest_data=RING)
    return Channel(cast(Any, conn), 1, rings, name="storage"), conn


def deliver(ch: Channel, pkt: Packet) -> None:
    """What the connection does with a PACKET frame for an open channel."""
    ch.rings.arrive(pkt.ring_size, len(pkt.data))
    ch._deliver(pkt)


def srb(op: int, lba: int, blocks: int, *, trans_id: int, data: bytes = b"", lun: int = 0) -> Packet:
    """A READ(10) or WRITE(10) EXECUTE_SRB as Linux storvsc sends it."""
    writing = op == 0x2A
    length = blocks * 512
    cdb = struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)
    payload = vstor.SRB_PACKET.pack(
        vstor.Operation.EXECUTE_SRB, vstor.REQUEST_COMPLETION_FLAG, 0, vstor.VMSCSI_REQUEST_SIZE, 0, 0, 0, 0, 0,
        lun, len(cdb), vstor.SENSE_BUFFER_SIZE,
        vstor.DataDirection.WRITE if writing else vstor.DataDirection.READ, 0, length, cdb, 0, 0xFF, 0x20, 0, 60, 0)
    rng = GpaRange(length, 0, tuple(range(0x200, 0x200 + (length + 4095) // 4096)))
    return Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, trans_id, payload, (rng,), data)


def completion_status(pkt: Packet) -> tuple[int, int, int, int]:
    """(operation, NTSTATUS, srb_status, data_transfer_length) of a COMPLETE_IO."""
    fields = vstor.SRB_PACKET.unpack(pkt.payload)
    return fields[0], fields[2], fields[4], fields[14]


class GatedBackend:
    """A 1 MiB disk whose writes wait for ``gate``; ``writing`` counts the writes waiting now."""

    def __init__(self) -> None:
        self.data = bytearray(1 << 20)
        self.gate = asyncio.Event()
        self.writing = 0

    size = property(lambda self: len(self.data))
    block_size = property(lambda self: 512)
    read_only = property(lambda self: False)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.writing += 1
        await self.gate.wait()
        self.writing -= 1
        self.data[offset:offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def discard(self, offset: int, length: int) -> bool:
        return True

    async def close(self) -> None:
        pass


def resources(partition: str) -> ChannelResources:
    return ChannelResources.standalone(partition, StorageVsp().offer(partition), cast(Any, None), logs.get())


def ready_handshake(version: int = vstor.Version.WIN10, max_channel_cnt: int = 0) -> vstor.VspHandshake:
    """A StorVSP handshake taken to Ready as a Linux guest does (BEGIN, version, properties, END)."""
    hs = vstor.VspHandshake(max_channel_cnt=max_channel_cnt)
    steps = [(vstor.Operation.BEGIN_INITIALIZATION, b""),
             (vstor.Operation.QUERY_PROTOCOL_VERSION, vstor.ProtocolVersion(version).pack()),
             (vstor.Operation.QUERY_PROPERTIES, b""), (vstor.Operation.END_INITIALIZATION, b"")]
    for op, body in steps:
        hs.receive(Incoming(PacketType.DATA_INBAND, vstor.VMBUS_RQST_INIT, True, vstor.pack_request(op, body)))
    assert hs.done
    return hs


async def serve(vsp: StorageVsp, ch: Channel, ctl: ScsiController, hs: vstor.VspHandshake | None = None
                ) -> asyncio.Task[None]:
    vsp.controllers["vm1"] = ctl
    info = resources("vm1")
    return asyncio.get_running_loop().create_task(vsp.after_handshake(ch, info, hs or ready_handshake()))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_queue_depth_caps_the_requests_taken_off_the_ring() -> None:
    backend = GatedBackend()
    ctl = ScsiController({0: ScsiDisk(backend, disk_id=vstor.SPEC.default_instance)})
    vsp = StorageVsp(queue_depth=4)
    ch, sent = host_channel()
    task = await serve(vsp, ch, ctl)
    for i in range(10):
        deliver(ch, srb(0x2A, 8 * i, 8, trans_id=100 + i, data=bytes([i]) * 4096))
    await settle()
    assert backend.writing == 4  # the cap: four requests in the backend ...
    assert len(ch._queue) == 6  # ... and the rest still in the ring, unread
    assert sent.packets == []
    backend.gate.set()
    await settle()
    assert sorted(p.trans_id for p in sent.packets) == list(range(100, 110))
    for p in sent.packets:
        assert p.type == PacketType.COMP and completion_status(p) == (vstor.Operation.COMPLETE_IO, 0, 1, 4096)
    assert bytes(backend.data[8 * 512 * 9:8 * 512 * 10]) == bytes([9]) * 4096
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_cached_reads_complete_in_order_with_their_data(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([i]) * 4096 for i in range(16)))
    ctl = await open_disks(tmp_path, "vm1", [LunConfig(lun=0, path=str(image))])
    vsp = StorageVsp()
    ch, sent = host_channel()
    task = await serve(vsp, ch, ctl)
    for i in range(16):
        deliver(ch, srb(0x28, 8 * (15 - i), 8, trans_id=i + 1))
    await settle()
    assert [p.trans_id for p in sent.packets] == list(range(1, 17))
    for i, p in enumerate(sent.packets):
        assert completion_status(p) == (vstor.Operation.COMPLETE_IO, 0, 1, 4096)
        assert bytes(p.data) == bytes([15 - i]) * 4096
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


async def test_a_read_past_the_end_is_check_condition_not_a_crash(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 1024))
    ctl = await open_disks(tmp_path, "vm1", [LunConfig(lun=0, path=str(image))])
    vsp = StorageVsp()
    ch, sent = host_channel()
    task = await serve(vsp, ch, ctl)
    deliver(ch, srb(0x28, 128, 8, trans_id=7))  # LBA 128 of a 128-block disk
    deliver(ch, srb(0x28, 0, 8, trans_id=8, lun=3))  # no such LUN
    await settle()
    by_id = {p.trans_id: vstor.SRB_PACKET.unpack(p.payload) for p in sent.packets}
    past_end, no_lun = by_id[7], by_id[8]
    # OpenVMM scsidisk validate_data_cdb*: an LBA range past the end is ScsiError::IllegalRequest(ILLEGAL_BLOCK),
    # which process_result answers INVALID_REQUEST (not ERROR: that is for a backend's DiskError::IllegalBlock).
    assert past_end[4] == vstor.SrbStatus.INVALID_REQUEST | vstor.SRB_STATUS_AUTOSENSE_VALID
    assert past_end[5] == 2 and past_end[11] == 0x14  # CHECK CONDITION; the sense field's size, as OpenVMM
    sense = past_end[15]
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x05, 0x21, 0x00)  # ILLEGAL REQUEST, LBA OUT OF RANGE
    assert no_lun[4] == vstor.SrbStatus.INVALID_LUN and no_lun[2] == vstor.NtStatus.DEVICE_DOES_NOT_EXIST
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


async def test_a_stuck_disk_of_one_partition_does_not_stall_another(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Partition A's image hangs in pwrite (a dying disk, in the pool threads); partition B, on the same VSP
    and the same pool, still gets every write and read answered meanwhile."""
    images = {name: tmp_path / f"{name}.img" for name in ("a", "b")}
    for image in images.values():
        image.write_bytes(bytes(1 << 20))
    ctls = {name: await open_disks(tmp_path, name, [LunConfig(lun=0, path=str(image))])
            for name, image in images.items()}
    disk_a = ctls["a"].disk(0)
    assert disk_a is not None
    stuck_fd = disk_a.backend._fd  # type: ignore[attr-defined]
    release = threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fd == stuck_fd:
            release.wait(10)
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if fd == stuck_fd:
            raise BlockingIOError  # RWF_NOWAIT: "would block", so the write goes to the pool
        return real_pwritev(fd, buffers, offset, flags)

    real_pwritev = os.pwritev
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    vsp = StorageVsp()
    channels = {name: host_channel() for name in ("a", "b")}
    tasks = []
    for name, (ch, _) in channels.items():
        vsp.controllers[name] = ctls[name]
        info = resources(name)
        tasks.append(asyncio.get_running_loop().create_task(vsp.after_handshake(ch, info, ready_handshake())))
    (ch_a, sent_a), (ch_b, sent_b) = channels["a"], channels["b"]
    for i in range(10):
        deliver(ch_a, srb(0x2A, 8 * i, 8, trans_id=i + 1, data=b"A" * 4096))
    for i in range(20):
        deliver(ch_b, srb(0x2A, 8 * i, 8, trans_id=i + 1, data=bytes([i]) * 4096))
    try:
        async with asyncio.timeout(30):
            while len(sent_b.packets) < 20:
                await asyncio.sleep(0.01)
        for i in range(20):
            deliver(ch_b, srb(0x28, 8 * i, 8, trans_id=100 + i))
        async with asyncio.timeout(30):
            while len(sent_b.packets) < 40:
                await asyncio.sleep(0.01)
        assert [bytes(p.data) for p in sent_b.packets[20:]] == [bytes([i]) * 4096 for i in range(20)]
        assert sent_a.packets == []  # A is still stuck, and only A
    finally:
        release.set()
    async with asyncio.timeout(30):
        while len(sent_a.packets) < 10:
            await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ctl in ctls.values():
        await ctl.close()


async def _image_vsp(tmp_path: Path, depth: int = 256) -> tuple[Channel, Recorder, ScsiController,
                                                              asyncio.Task[None]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    ctl = await open_disks(tmp_path, "vm1", [LunConfig(lun=0, path=str(image))])
    vsp = StorageVsp(queue_depth=depth)
    ch, sent = host_channel()
    return ch, sent, ctl, await serve(vsp, ch, ctl)


async def test_disk_pool_requests_count_against_the_queue_depth(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes (and uncached reads) are answered from their disk future, without a task each; they still
    count against the queue depth, and the data read back is what was written."""
    release = threading.Event()
    real_pwrite = os.pwrite
    entered: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        entered.append(offset)
        release.wait(30)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    ch, sent, ctl, task = await _image_vsp(tmp_path, depth=4)
    disk = ctl.disk(0)
    assert disk is not None
    disk.read_cached = None  # every read takes the pool path too
    try:
        for i in range(10):
            deliver(ch, srb(0x2A, 8 * i, 8, trans_id=i + 1, data=bytes([i + 1]) * 4096))
        async with asyncio.timeout(30):  # four go to the disk and stay there; the VSP then stops taking more
            while len(ch._queue) > 6 or not entered:
                await asyncio.sleep(0.01)
        assert len(ch._queue) == 6 and sent.packets == []
    finally:
        release.set()
    async with asyncio.timeout(30):
        while len(sent.packets) < 10:
            await asyncio.sleep(0.01)
    assert sorted(p.trans_id for p in sent.packets) == list(range(1, 11))
    assert all(completion_status(p) == (vstor.Operation.COMPLETE_IO, 0, 1, 4096) for p in sent.packets)
    for i in range(10):
        deliver(ch, srb(0x28, 8 * i, 8, trans_id=100 + i))
    async with asyncio.timeout(30):
        while len(sent.packets) < 20:
            await asyncio.sleep(0.01)
    assert {p.trans_id: bytes(p.data) for p in sent.packets[10:]} == {
        100 + i: bytes([i + 1]) * 4096 for i in range(10)}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


async def test_a_failed_disk_write_is_a_medium_error_and_the_channel_goes_on(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(5, "Input/output error")

    ch, sent, ctl, task = await _image_vsp(tmp_path)
    monkeypatch.setattr(os, "pwrite", pwrite)
    deliver(ch, srb(0x2A, 0, 8, trans_id=1, data=b"x" * 4096))
    async with asyncio.timeout(30):
        while not sent.packets:
            await asyncio.sleep(0.01)
    monkeypatch.undo()
    fields = vstor.SRB_PACKET.unpack(sent.packets[0].payload)
    assert fields[4] == vstor.SrbStatus.ERROR | vstor.SRB_STATUS_AUTOSENSE_VALID and fields[5] == 2
    sense = fields[15]
    assert (sense[2] & 0x0F, sense[12]) == (0x03, 0x0C)  # MEDIUM ERROR, WRITE ERROR
    deliver(ch, srb(0x2A, 0, 8, trans_id=2, data=b"y" * 4096))  # the next one works
    async with asyncio.timeout(30):
        while len(sent.packets) < 2:
            await asyncio.sleep(0.01)
    assert completion_status(sent.packets[1]) == (vstor.Operation.COMPLETE_IO, 0, 1, 4096)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


async def test_short_cdbs_are_check_condition_on_every_path(tmp_path: Path) -> None:
    """A READ or WRITE opcode in a CDB too short for it is ILLEGAL REQUEST / INVALID FIELD IN CDB, whichever
    fast path would otherwise have taken it, and the channel goes on."""
    ch, sent, ctl, task = await _image_vsp(tmp_path)
    for i, cdb in enumerate([b"\x28", b"\x2a\0", b"\x28" + bytes(8), b"\x88" + bytes(9), b"\x00"]):
        pkt = srb(0x28, 0, 8, trans_id=i + 1)
        fields = list(vstor.SRB_PACKET.unpack(pkt.payload))
        fields[10], fields[15] = len(cdb), cdb
        payload = vstor.SRB_PACKET.pack(*fields)
        deliver(ch, Packet(pkt.type, pkt.flags, pkt.trans_id, payload, pkt.ranges))
    async with asyncio.timeout(30):
        while len(sent.packets) < 5:
            await asyncio.sleep(0.01)
    for p in sent.packets:
        out = vstor.SRB_PACKET.unpack(p.payload)
        assert out[5] == 2 and out[15][2] & 0x0F == 0x05 and out[15][12] == 0x24, (p.trans_id, out)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


# ---- parse_request: what makes a storage packet a protocol error ------------------------------------------

def _read(**kw: Any) -> Packet:
    return srb(0x28, 0, 8, trans_id=1, **kw)


@pytest.mark.parametrize(("pkt", "match"), [
    (Packet(PacketType.COMP, 0, 1, _read().payload), "unsolicited completion"),
    (Packet(PacketType.DATA_USING_GPA_DIRECT, 0, 1, _read().payload, _read().ranges), "COMPLETION_REQUESTED"),
    (Packet(PacketType.DATA_INBAND, 1, 1, b"\x03\0\0"), "need 12"),
    (Packet(PacketType.DATA_INBAND, 1, 1, _read().payload[:40]), "vmscsi_request"),
    (Packet(PacketType.DATA_INBAND, 1, 1, vstor.pack_request(vstor.Operation.RESET_BUS), data=b"x"),
     "carries a data buffer"),
    (Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 1, _read().payload[:20] + b"\0" + _read().payload[21:],
            _read().ranges), "cdb_length 0"),
    (Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 1, _read().payload[:20] + b"\x11" + _read().payload[21:],
            _read().ranges), "cdb_length 17"),
    (Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 1, _read().payload, _read().ranges * 2), "2 GPA ranges"),
    (Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 1, _read().payload, (GpaRange(512, 0, (9,)),)), "512-byte buffer"),
    (_read(data=b"\0" * 4096), "does not write"),
    (srb(0x2A, 0, 8, trans_id=1, data=b"\0" * 100), "carried 100 bytes"),
])
def test_parse_request_rejects(pkt: Packet, match: str) -> None:
    with pytest.raises(DeviceProtocolError, match=match):
        parse_request(pkt)


def test_parse_request_reads_a_pre_win8_request_with_the_extension_as_zeros() -> None:
    full = _read()
    op, req = parse_request(Packet(full.type, 1, 1, full.payload[:vstor.VSTOR_PACKET_SIZE_V1], full.ranges))
    assert op == vstor.Operation.EXECUTE_SRB and req is not None
    assert (req.cdb, req.data_transfer_length, req.queue_tag, req.time_out_value) == (full.payload[28:38], 4096, 0, 0)
    assert vstor.pack_complete_io(1, 0, 4096, request_payload_len=vstor.VSTOR_PACKET_SIZE_V1)[:4] == b"\1\0\0\0"
    assert len(vstor.pack_complete_io(1, 0, 4096, request_payload_len=vstor.VSTOR_PACKET_SIZE_V1)) == 48


# ---- fidelity to OpenVMM storvsp: completions, absent paths and targets, control operations once Ready ---------

TAGGED_READ_FLAGS = 0x14A  # Linux storvsc_queuecommand, tagged device: SYNCH off, QUEUE_ACTION, NO_QUEUE_FREEZE, IN


def command(cdb: bytes, *, trans_id: int, data_in: int = 0, path: int = 0, target: int = 0, lun: int = 0,
            port: int = 0, flags: int = 0, tag: int = 0, action: int = 0) -> Packet:
    """An EXECUTE_SRB reading up to ``data_in`` bytes (or none) at (path, target, lun)."""
    direction = vstor.DataDirection.READ if data_in else vstor.DataDirection.UNKNOWN
    payload = vstor.SRB_PACKET.pack(
        vstor.Operation.EXECUTE_SRB, vstor.REQUEST_COMPLETION_FLAG, 0, vstor.VMSCSI_REQUEST_SIZE, 0, 0, port, path,
        target, lun, len(cdb), vstor.SENSE_BUFFER_SIZE, direction, 0, data_in, cdb, 0, tag, action, flags, 60, 0)
    if not data_in:
        return Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, trans_id, payload)
    rng = GpaRange(data_in, 0, tuple(range(0x300, 0x300 + (data_in + 4095) // 4096)))
    return Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, trans_id, payload, (rng,))


def control(op: int, body: bytes = b"", trans_id: int = 1) -> Packet:
    return Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, trans_id, vstor.pack_request(op, body))


async def answers(sent: Recorder, count: int) -> dict[int, Packet]:
    """The completions sent so far by trans_id, once there are ``count`` of them (10 s deadline)."""
    async def enough() -> None:
        while len(sent.packets) < count:
            await asyncio.sleep(0.005)
    await asyncio.wait_for(enough(), 10)
    return {p.trans_id: p for p in sent.packets}


async def one_disk(tmp_path: Path, size: int = 64 * 1024) -> ScsiController:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(size))
    return await open_disks(tmp_path, "vm1", [LunConfig(lun=0, path=str(image))])


async def test_complete_io_is_a_fresh_vmscsi_request_as_openvmm_builds_it(tmp_path: Path) -> None:
    """OpenVMM handle_completion: length 52, cdb_length 16, sense_info_ex_length 0x14, the outcome, all else 0 —
    nothing of the request (port, LUN, direction, queue tag, flags, timeout) is echoed. The tagged flags Linux
    sends for a CmdQue disk are taken as they are."""
    ctl = await one_disk(tmp_path)
    ch, sent = host_channel()
    task = await serve(StorageVsp(), ch, ctl)
    deliver(ch, command(bytes.fromhex("28000000000000000800"), trans_id=5, data_in=4096, port=2, lun=0,
                        flags=TAGGED_READ_FLAGS, tag=0xFF, action=0x20))
    deliver(ch, command(bytes.fromhex("28000000010000000800"), trans_id=6, data_in=4096))  # LBA 256 > 127
    got = await answers(sent, 2)
    assert vstor.SRB_PACKET.unpack(got[5].payload) == (
        vstor.Operation.COMPLETE_IO, 0, vstor.NtStatus.SUCCESS, 52, vstor.SrbStatus.SUCCESS, 0, 0, 0, 0, 0, 16, 0x14,
        0, 0, 4096, bytes(20), 0, 0, 0, 0, 0, 0), "a good READ's completion is not OpenVMM's fresh vmscsi_request"
    assert len(got[5].data) == 4096
    bad = vstor.SRB_PACKET.unpack(got[6].payload)
    assert (bad[3], bad[10], bad[11], bad[14]) == (52, 16, 0x14, 0), "a failed READ's completion fields differ"
    assert bad[15][:14] == bytes.fromhex("70000500000000 0a00000000 2100"), "sense is not ILLEGAL REQUEST/0x21"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


@pytest.mark.parametrize(("path", "target"), [(0, 1), (1, 0), (7, 1)])
async def test_another_path_or_target_answers_as_an_absent_lun(tmp_path: Path, path: int, target: int) -> None:
    """OpenVMM keys disks by (path, target, lun): elsewhere INQUIRY says 0x7F, REPORT LUNS lists nothing and any
    other command is INVALID_LUN (Linux then drops the LUN) — never INVALID_TARGET_ID."""
    ctl = await one_disk(tmp_path)
    ch, sent = host_channel()
    task = await serve(StorageVsp(), ch, ctl)
    where = {"path": path, "target": target}
    deliver(ch, command(bytes.fromhex("120000006000"), trans_id=1, data_in=96, **where))
    deliver(ch, command(bytes.fromhex("a000000000000000100000 00".replace(" ", "")), trans_id=2, data_in=16, **where))
    deliver(ch, command(bytes(6), trans_id=3, **where))  # TEST UNIT READY
    deliver(ch, command(bytes.fromhex("28000000000000000800"), trans_id=4, data_in=4096, **where))
    got = {tid: (vstor.SRB_PACKET.unpack(p.payload), p.data) for tid, p in (await answers(sent, 4)).items()}
    (inq, inq_data), (luns, luns_data) = got[1], got[2]
    assert inq[4] == vstor.SrbStatus.SUCCESS and inq_data[0] == 0x7F, f"INQUIRY at {where}: {inq[4]:#x}"
    assert luns[4] == vstor.SrbStatus.SUCCESS and luns_data[:4] == bytes(4), f"REPORT LUNS at {where} lists LUNs"
    for tid in (3, 4):
        fields = got[tid][0]
        assert (fields[4], fields[5], fields[2]) == (vstor.SrbStatus.INVALID_LUN, 2,
                                                     vstor.NtStatus.DEVICE_DOES_NOT_EXIST), f"command {tid}"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


async def test_control_operations_once_ready_answer_as_openvmm(tmp_path: Path) -> None:
    ctl = await one_disk(tmp_path)
    ch, sent = host_channel()
    hs = ready_handshake()
    task = await serve(StorageVsp(), ch, ctl, hs)
    deliver(ch, control(vstor.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 1), trans_id=1))  # above max 0
    deliver(ch, control(vstor.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 0), trans_id=2))  # 0 <= max 0
    deliver(ch, control(vstor.Operation.RESET_BUS, trans_id=3))
    deliver(ch, control(vstor.Operation.BEGIN_INITIALIZATION, trans_id=4))
    got = {tid: vstor.VstorPacket.unpack(p.payload) for tid, p in (await answers(sent, 4)).items()}
    assert got[1].status == vstor.NtStatus.INVALID_PARAMETER, "a refused CREATE_SUB_CHANNELS is not INVALID_PARAMETER"
    assert got[2].status == vstor.NtStatus.SUCCESS and hs.sub_channel_count == 0
    assert got[3].status == vstor.NtStatus.SUCCESS
    assert got[4].status == vstor.NtStatus.INVALID_DEVICE_STATE
    assert all(p.operation == vstor.Operation.COMPLETE_IO for p in got.values())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ctl.close()


@pytest.mark.parametrize("op", [vstor.Operation.REMOVE_DEVICE, vstor.Operation.ENUMERATE_BUS, 99])
async def test_an_unrecognized_operation_after_initialization_is_a_protocol_error(tmp_path: Path, op: int) -> None:
    """OpenVMM parse_packet: PacketError::UnrecognizedOperation stops the channel's worker, in any state."""
    ctl = await one_disk(tmp_path)
    ch, sent = host_channel()
    task = await serve(StorageVsp(), ch, ctl)
    deliver(ch, control(op))
    with pytest.raises(DeviceProtocolError, match="unrecognized VSTOR operation"):
        await asyncio.wait_for(task, 10)
    assert not sent.packets, "an unrecognized operation was answered"
    await ctl.close()


class FailingFlushBackend(GatedBackend):
    """A backend whose flush fails with something that is not a DiskError: a bug, as far as SCSI knows."""

    async def flush(self) -> None:
        raise RuntimeError("flush exploded")


async def test_an_internal_failure_is_logged_with_its_traceback_before_hardware_error() -> None:
    out = io.StringIO()
    logs.setup("debug", stream=out, json=True)
    ctl = ScsiController({0: ScsiDisk(cast(Any, FailingFlushBackend()), disk_id=uuid.uuid4())})
    ch, sent = host_channel()
    vsp = StorageVsp()
    vsp.controllers["vm1"] = ctl
    info = ChannelResources.standalone("vm1", vsp.offer("vm1"), cast(Any, None), logs.get(partition="vm1", relid=1))
    task = asyncio.get_running_loop().create_task(vsp.after_handshake(ch, info, ready_handshake()))
    deliver(ch, command(bytes.fromhex("35000000000000000000"), trans_id=9))  # SYNCHRONIZE CACHE(10)
    fields = vstor.SRB_PACKET.unpack((await answers(sent, 1))[9].payload)
    assert fields[4] == vstor.SrbStatus.ERROR | vstor.SRB_STATUS_AUTOSENSE_VALID
    assert (fields[15][2], fields[15][12]) == (0x4, 0x44), "not HARDWARE ERROR / INTERNAL TARGET FAILURE"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [line for line in lines if "HARDWARE ERROR" in line["event"]]
    assert failed, f"no log line for the failure in {lines}"
    line = failed[0]
    assert (line["partition"], line["relid"], line["lun"], line["opcode"]) == ("vm1", 1, 0, "0x35")
    assert "Traceback" in line["exception"] and "flush exploded" in line["exception"], "traceback missing"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
