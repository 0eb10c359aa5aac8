"""Shell tier: every VSP against its VSC over an in-memory channel pair, no sockets.

The storage pair serves a real sparse image in a temporary directory; the other devices run their
protocol-version handshakes (what they do today).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from child_partition.bus import BusError
from child_partition.devices.echo.vsc import EchoVsc
from child_partition.devices.input.vsc import KeyboardVsc, MouseVsc
from child_partition.devices.network.nic import Nic
from child_partition.devices.network.vsc import NetworkVsc
from child_partition.devices.storage.vsc import StorageVsc
from child_partition.devices.video.vsc import VideoVsc
from child_partition.vsc import HandshakeVsc
from parent_partition.devices.echo.vsp import EchoVsp
from parent_partition.devices.input.vsp import KeyboardVsp, MouseVsp
from parent_partition.devices.network.vsp import RX_POLL, NetworkVsp
from parent_partition.devices.storage.scsi import LunConfig
from parent_partition.devices.storage.vsp import StorageVsp
from parent_partition.devices.video.vsp import VideoVsp
from parent_partition.vsp import HandshakeVsp
from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.devices.base import VscVersionHandshake
from vmbus_proto.devices.storage import vstor
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, PAGE_SIZE, GpaRange, Packet, PacketType

from .adapters import DevicePair, attach
from .waits import until

DISK = 8 * 1024 * 1024


pytestmark = pytest.mark.usefixtures("memory_mode")  # each test in both memory modes (conftest)

@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[DevicePair]:
    vsp = StorageVsp(data_dir=tmp_path, luns_for=lambda partition: [LunConfig(lun=0, size_bytes=DISK)])
    devices = await attach(vsp, StorageVsc)
    try:
        yield devices
    finally:
        await devices.close()
        await vsp.shutdown()


def image(tmp_path: Path) -> Path:
    return tmp_path / "vm1" / "lun0.img"


async def test_storage_handshake_negotiates_the_newest_version_and_scans_the_disk(storage: DevicePair) -> None:
    vsc, vsp = storage.vsc, storage.vsp
    assert isinstance(vsc, StorageVsc) and isinstance(vsp, StorageVsp)
    assert vsc.version == vstor.LINUX_VERSIONS[0], f"negotiated {vsc.version!r}"
    assert vsp.handshakes == 1 and vsp.errors == 0
    assert vsc.max_transfer == vstor.DEFAULT_MAX_TRANSFER_BYTES
    disk = vsc.disks[0]
    assert (disk.size, disk.block_size, disk.read_only) == (DISK, 512, False)
    # The rings are the ones the VSC asked for: its ring GPADL, half each way.
    pair = storage.pair
    assert pair.params.gpadl.pfns == tuple(vsc.ring_pfns)
    assert pair.guest.rings.writer.data_size == vstor.SPEC.ring_bytes - PAGE_SIZE
    assert pair.params.userdata == bytes(24)


async def test_storage_inquiry_and_read_capacity(storage: DevicePair) -> None:
    vsc = storage.vsc
    assert isinstance(vsc, StorageVsc)
    inq = await vsc.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
    assert inq.ok, inq
    assert (inq.data[0] & 0x1F, inq.data[8:16], inq.data[16:32].rstrip()) == (0, b"Msft    ", b"Virtual Disk")
    cap = await vsc.command(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0", data_in=32)
    assert cap.ok, cap
    last_lba, block = struct.unpack_from(">QI", cap.data)
    assert (last_lba + 1) * block == DISK
    bad = await vsc.command(bytes([0xFF]) + bytes(5))  # an opcode no target implements
    assert not bad.ok and bad.scsi_status == 2 and bad.sense[2] & 0x0F == 0x5, bad


async def test_storage_write_then_read_real_data(storage: DevicePair, tmp_path: Path) -> None:
    vsc = storage.vsc
    assert isinstance(vsc, StorageVsc)
    disk = vsc.disks[0]
    data = os.urandom(3 * vsc.max_transfer + 4096)  # split into several EXECUTE_SRBs in flight at once
    await disk.write(1024 * 1024, data)
    assert await disk.read(1024 * 1024, len(data)) == data
    await disk.flush()
    with image(tmp_path).open("rb") as f:
        f.seek(1024 * 1024)
        assert f.read(len(data)) == data, "the image file does not hold what the guest wrote"
    assert await disk.read(0, 4096) == bytes(4096)


async def test_storage_two_hundred_requests_at_once_each_complete_with_their_own_data(storage: DevicePair) -> None:
    vsc = storage.vsc
    assert isinstance(vsc, StorageVsc)
    disk = vsc.disks[0]
    blocks = [os.urandom(4096) for _ in range(200)]
    await asyncio.gather(*(disk.write(i * 4096, b) for i, b in enumerate(blocks)))
    got = await asyncio.gather(*(disk.read(i * 4096, 4096) for i in range(len(blocks))))
    assert got == blocks
    assert storage.pair.host.rings.reader.stats.packets >= 400 + 5


async def test_a_storage_request_after_the_host_closed_the_channel_fails(storage: DevicePair) -> None:
    vsc = storage.vsc
    assert isinstance(vsc, StorageVsc)
    disk = vsc.disks[0]
    storage.pair.close_host()
    await asyncio.wait_for(storage.pair.closed(), 30)
    with pytest.raises(ChannelClosed):
        await disk.read(0, 4096)
    assert storage.vsp.tasks == {}, "the VSP still serves a closed channel"


async def test_a_storage_request_after_the_guest_detached_fails(storage: DevicePair) -> None:
    vsc = storage.vsc
    assert isinstance(vsc, StorageVsc)
    disk = vsc.disks[0]
    pair = storage.pair
    await vsc.detach()
    await asyncio.wait_for(pair.closed(), 30)
    with pytest.raises(ChannelClosed):
        await disk.read(0, 4096)
    assert storage.bus.torn_down, "detach did not tear the ring GPADL down"


async def test_a_storage_protocol_error_fails_the_partitions_connection(storage: DevicePair) -> None:
    pair = storage.pair
    # A request without COMPLETION_REQUESTED breaks VSTOR (OpenVMM storvsp parse_packet).
    reset = vstor.VstorPacket(vstor.Operation.RESET_BUS).pack()
    await pair.guest.send(Packet(PacketType.DATA_INBAND, 0, 9, reset))
    await asyncio.wait_for(storage.link.closed(), 30)
    assert storage.link.guest.peer_reason == "storage relid 1: storage request without COMPLETION_REQUESTED"
    assert storage.vsp.errors == 1


async def test_a_disk_the_host_cannot_open_fails_the_open(tmp_path: Path) -> None:
    vsp = StorageVsp(data_dir=tmp_path, luns_for=lambda partition: [LunConfig(lun=0, path=tmp_path / "missing.img")])
    with pytest.raises(BusError, match="refused to open channel 1"):
        await attach(vsp, StorageVsc)
    assert vsp.tasks == {} and vsp.opened == 0


HANDSHAKES = [(VideoVsp, VideoVsc), (KeyboardVsp, KeyboardVsc), (MouseVsp, MouseVsc)]


@pytest.mark.parametrize(("vsp_cls", "vsc_cls"), HANDSHAKES, ids=lambda c: c.__name__)
async def test_device_handshake_over_the_pair(vsp_cls: type[HandshakeVsp], vsc_cls: type[HandshakeVsc]) -> None:
    vsp = vsp_cls()
    devices = await attach(vsp, vsc_cls)
    try:
        vsc = devices.vsc
        assert isinstance(vsc, HandshakeVsc) and isinstance(vsc.hs, VscVersionHandshake)
        supported = cast(Any, vsp.module).DEFAULT_SUPPORTED  # every handshake module has one
        expected = next(v for v in vsc.hs.versions if v in supported)
        assert vsc.version == expected, f"{vsp.name}: negotiated {vsc.version!r}, expected {expected:#x}"
        await until(lambda: vsp.handshakes == 1, f"the {vsp.name} VSP finished its handshake")
        assert vsp.errors == 0 and not devices.link.host.closing
        assert devices.pair.guest.rings.writer.data_size == vsc.spec.ring_bytes - PAGE_SIZE
    finally:
        await devices.close()
    assert vsp.tasks == {} and devices.bus.torn_down



async def test_echo_returns_gpa_direct_data_into_the_requests_range() -> None:
    devices = await attach(EchoVsp(), EchoVsc)
    try:
        channel = devices.vsc.channel
        assert channel is not None
        data = os.urandom(2 * PAGE_SIZE)
        reply = await asyncio.wait_for(channel.request(b"ping", (GpaRange(len(data), 0, (0x900, 0x901)),), data), 30)
        # A ring carries a payload padded to 8 bytes (len8): in shared memory the zeros arrive too.
        assert (reply.type, reply.payload.rstrip(b"\0"), bytes(reply.data)) == (PacketType.COMP, b"ping", data)
    finally:
        await devices.close()


async def test_echo_driver_style_completions_queue_in_order_while_the_guests_ring_is_full(memory_mode: str) -> None:
    """A driver sends with ``try_sendpacket`` and takes completions through ``on_packet``; the guest stops
    reading (its wire paused) so the echo VSP's completions fill the host-to-guest ring. Shared memory: the guest
    writes twice a ring's worth (the host reads them without any frame), so the VSP holds completions in its
    backlog and writes them as a blocked writer; over a stream the guest's credit stops it at one ring's worth.
    Either way every completion arrives once, in order, after the guest reads again."""
    devices = await attach(EchoVsp(), EchoVsc)
    try:
        guest = devices.vsc.channel
        host = devices.pair.host
        assert guest is not None
        got: list[int] = []
        guest.on_packet = lambda pkt: got.append(pkt.trans_id)
        payload = bytes(range(256)) * 4
        per_ring = guest.rings.writer.data_size // (16 + len(payload) + 8)
        want = 2 * per_ring if memory_mode == "shared" else per_ring + 100
        devices.link.to_guest.pause()
        flags = int(FLAG_COMPLETION_REQUESTED)
        sent = 0
        for _ in range(100 * want):  # bounded: shared memory yields on a refusal, so the host reads on
            if sent == want:
                break
            if guest.try_sendpacket(payload, sent + 1, PacketType.DATA_INBAND, flags):
                sent += 1
            elif memory_mode == "stream":
                break  # out of credit until the guest reads again
            else:
                await asyncio.sleep(0)
        if memory_mode == "shared":
            assert sent == want
            await until(lambda: host.out_ring.stats.blocked > 0, "the VSP blocked on the full ring")
        devices.link.to_guest.resume()
        while sent < want:  # (stream: the rest as credit returns)
            await guest.send(Packet(PacketType.DATA_INBAND, flags, sent + 1, payload))
            sent += 1
        await until(lambda: len(got) == want, f"all {want} completions arrived")
        assert got == list(range(1, want + 1))
        assert devices.vsp.errors == 0 and not devices.link.host.closing
    finally:
        await devices.close()


async def test_handshake_trace_lines_from_both_sides() -> None:
    with capture_logs() as logs:
        devices = await attach(VideoVsp(), VideoVsc, trace=True)
        await until(lambda: devices.vsp.handshakes == 1, "the video VSP finished its handshake")  # type: ignore[attr-defined]
        await devices.close()
    lines = [e["event"] for e in logs]
    assert any(line.startswith("G>H SYNTHVID_VERSION_REQUEST") for line in lines), lines
    assert any(line.startswith("H>G SYNTHVID_VERSION_RESPONSE") for line in lines), lines


PEER_MAC = bytes.fromhex("020000000099")


@contextlib.asynccontextmanager
async def nic_pair() -> AsyncIterator[tuple[NetworkVsp, NetworkVsc, Nic, DevicePair]]:
    """A NetVSP and a NetVSC attached over an in-memory pair, the guest's NIC up; closed afterwards."""
    vsp = NetworkVsp()
    devices = await attach(vsp, NetworkVsc)
    try:
        vsc = cast(NetworkVsc, devices.vsc)
        nic = vsc.nic
        assert nic is not None and nic.link_up, "the NIC did not come up"
        yield vsp, vsc, nic, devices
    finally:
        await devices.close()


async def test_network_nic_comes_up_and_frames_cross_the_switch_both_ways() -> None:
    """NetVSC ⇄ NetVSP with no sockets: NVSP and RNDIS set up in Linux's order on the shared receive and send
    buffers, then a frame from the guest reaches another switch port and one from that port reaches the guest
    (a small one through a send-buffer section, a full-size one GPA-direct... whichever the NetVSC picks)."""
    async with nic_pair() as (vsp, _vsc, nic, devices):
        peer = vsp.switch.attach("peer", PEER_MAC)
        peer_mac = PEER_MAC
        for size in (60, 1514):
            out = peer_mac + nic.mac + b"\x88\xb5" + bytes(range(256)) * 6
            await nic.send(out[:size])
            got = await asyncio.wait_for(peer.recv(), 10)
            assert got.data == out[:size]
            back = nic.mac + peer_mac + b"\x88\xb5" + bytes([size % 251]) * (size - 14)
            assert peer.send_nowait(back)
            assert await asyncio.wait_for(nic.recv(), 10) == back
        host = vsp.hosts["vm1"]
        assert host.counters.tx_frames == 2 and host.counters.rx_frames == 2
    assert devices.bus.torn_down, "the buffer GPADLs were not torn down after close"


async def test_network_a_burst_longer_than_one_poll_batch_loses_no_frame() -> None:
    """The guest queues more frames at once than the NetVSP serves in one batch (RX_POLL): every one reaches
    the switch, in order, and every completion comes back through the NetVSC's receive batches (both once took
    the packet after their RX_POLL-th off the channel and dropped it)."""
    async with nic_pair() as (vsp, vsc, nic, _devices):
        peer_mac = PEER_MAC
        peer = vsp.switch.attach("peer", peer_mac, queue_frames=1024)
        count = 3 * RX_POLL + 1
        for i in range(count):  # no await between them while there is room: the host finds them queued at once
            frame = peer_mac + nic.mac + b"\x88\xb5" + i.to_bytes(2, "big") + bytes(44)
            if not nic.send_nowait(frame):
                await nic.send(frame)
        got = [await asyncio.wait_for(peer.recv(), 10) for _ in range(count)]
        assert [int.from_bytes(f.data[14:16], "big") for f in got] == list(range(count))
        assert vsp.hosts["vm1"].counters.tx_frames == count
        # Every transmit's completion came back: the guest's receive batches lose none either.
        guest = vsc.guest
        assert guest is not None
        await until(lambda: guest.tx_in_flight == 0, "every transmit completed")
