"""Shell tier: the StorVSC against the real StorVSP on a pair of in-memory channels (no socket, no bus).

The two channels are wired back to back: each packet or ring signal one side sends is delivered to the other on
the next loop turn, as the connection would after its ring accounting. The host side is the daemon's
``StorageVsp`` over real image files, so what the guest sees is what the host really answers. The host side
also sends unsolicited VSTOR packets (ENUMERATE_BUS) the way OpenVMM's worker does.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from child_partition.devices.storage.vsc import TAGGED, UNTAGGED, ScsiReply, StorageVsc
from child_partition.guest_memory import GuestMemory
from parent_partition.devices.storage.disk import DiskBackend
from parent_partition.devices.storage.scsi import LunConfig, ScsiController, ScsiDisk, disk_id_for, open_disks
from parent_partition.devices.storage.vsp import StorageVsp
from parent_partition.vsp import ChannelResources
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.channel import ChannelRings
from vmbus_proto.devices.storage import scsi, vstor
from vmbus_proto.envelope import Signal
from vmbus_proto.packets import Packet, PacketType

RING = 128 * 1024
MiB = 1 << 20


class Link:
    """One side's connection: what it sends arrives at ``peer`` on the next loop turn."""

    def __init__(self) -> None:
        self.peer: Channel | None = None
        self.sent: list[Packet] = []
        self.failed: str | None = None

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.sent.append(pkt)
        asyncio.get_running_loop().call_soon(_arrive, self.peer, pkt)

    def send_signal(self, relid: int, sig: Signal) -> None:
        peer = self.peer
        assert peer is not None
        asyncio.get_running_loop().call_soon(peer._on_signal, sig)

    def fail(self, reason: str) -> None:
        self.failed = reason


def _arrive(ch: Channel | None, pkt: Packet) -> None:
    assert ch is not None
    if not ch.closed:
        ch.rings.arrive(pkt.ring_size, len(pkt.data))
        ch._deliver(pkt)


class Pair:
    def __init__(self) -> None:
        self.guest_link, self.host_link = Link(), Link()
        self.guest = Channel(cast(Any, self.guest_link), 1,
                             ChannelRings(1, host=False, guest_to_host_data=RING, host_to_guest_data=RING))
        self.host = Channel(cast(Any, self.host_link), 1,
                            ChannelRings(1, host=True, guest_to_host_data=RING, host_to_guest_data=RING))
        self.guest_link.peer, self.host_link.peer = self.host, self.guest


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[ScsiController]:
    ctl = await open_disks(tmp_path, "vm1", [LunConfig(lun=0, size_bytes=MiB)])
    yield ctl
    await ctl.close()


async def start(ctl: ScsiController) -> tuple[StorageVsc, Pair, asyncio.Task[None]]:
    """The host serving one channel (handshake and I/O) and a guest StorVSC that has scanned it."""
    pair = Pair()
    vsp = StorageVsp()
    vsp.controllers["vm1"] = ctl
    host = asyncio.get_running_loop().create_task(
        vsp.serve(pair.host, ChannelResources.standalone("vm1", vsp.offer("vm1"), cast(Any, None),
                                                         logs.get(partition="vm1", relid=1))))
    offer = SimpleNamespace(child_relid=1)
    vsc = StorageVsc(cast(Any, SimpleNamespace(trace=False)), GuestMemory(64 * MiB), cast(Any, offer), logs.get())
    vsc.channel = pair.guest
    await asyncio.wait_for(vsc.handshake(pair.guest), 10)
    return vsc, pair, host


async def stop(vsc: StorageVsc, pair: Pair, host: asyncio.Task[None]) -> None:
    vsc.forget()
    pair.host.close()
    pair.guest.close()
    host.cancel()
    await asyncio.gather(host, return_exceptions=True)


def srbs(pair: Pair) -> list[vstor.ExecuteSrb]:
    return [vstor.unpack_execute_srb(p.payload) for p in pair.guest_link.sent
            if vstor.VstorPacket.unpack(p.payload).operation == vstor.Operation.EXECUTE_SRB]


async def test_a_cmdque_disk_gets_tagged_srbs_as_linux_sends_them(controller: ScsiController) -> None:
    """storvsc_queuecommand: QUEUE_ACTION_ENABLE | NO_QUEUE_FREEZE, queue tag SP_UNTAGGED and SIMPLE_TAG only
    once the device is tagged (INQUIRY CmdQue, which the host's disk reports, as OpenVMM's does); the scan's
    first commands go untagged."""
    vsc, pair, host = await start(controller)
    try:
        disk = vsc.disks[0]
        assert disk.modes is TAGGED, "the disk's INQUIRY CmdQue did not make it tagged"
        await disk.write(0, b"x" * 4096)
        assert await disk.read(0, 4096) == b"x" * 4096, "the host refused or garbled a tagged READ/WRITE"
        sent = srbs(pair)
        report_luns, inquiry = sent[0], sent[1]
        assert (report_luns.srb_flags, report_luns.queue_tag, report_luns.queue_action) == (0x48, 0, 0)
        assert (inquiry.srb_flags, inquiry.queue_tag, inquiry.queue_action) == (0x48, 0, 0)
        write, read = sent[-2], sent[-1]
        assert (write.data[0], write.srb_flags, write.queue_tag, write.queue_action) == (0x2A, 0x18A, 0xFF, 0x20)
        assert (read.data[0], read.srb_flags, read.queue_tag, read.queue_action) == (0x28, 0x14A, 0xFF, 0x20)
        assert UNTAGGED[2][1] == vstor.SrbFlags.DISABLE_SYNCH_TRANSFER  # no data: SRB_FLAGS_NO_DATA_TRANSFER is 0
    finally:
        await stop(vsc, pair, host)


async def send_enumerate_bus(pair: Pair) -> None:
    """What OpenVMM's primary worker sends on a rescan notification: ENUMERATE_BUS, in-band, trans_id 0."""
    await pair.host.send(Packet(PacketType.DATA_INBAND, 0, 0, vstor.pack_host_notification(
        vstor.Operation.ENUMERATE_BUS)))


async def rescan_done(vsc: StorageVsc, before: asyncio.Task[None] | None) -> None:
    """Wait for a rescan started after ``before`` (the rescan task seen before the notice was sent) to end."""
    while vsc._rescan_task is before:
        await asyncio.sleep(0.005)
    assert vsc._rescan_task is not None
    await vsc._rescan_task


async def test_enumerate_bus_rescans_adds_new_luns_and_drops_vanished_ones(controller: ScsiController,
                                                                          tmp_path: Path) -> None:
    vsc, pair, host = await start(controller)
    changes: asyncio.Queue[tuple[list[int], list[int]]] = asyncio.Queue()
    vsc.on_luns_changed = lambda added, removed: changes.put_nowait((added, removed))
    new = DiskBackend.open(tmp_path / "lun3.img", 2 * MiB, True, False)
    try:
        assert sorted(vsc.disks) == [0]
        controller.attach(3, ScsiDisk(new, disk_id=disk_id_for("vm1", 3)))
        gone = controller.detach(0)
        await send_enumerate_bus(pair)
        added, removed = await asyncio.wait_for(changes.get(), 10)
        assert (added, removed) == ([3], [0]), "the rescan did not see LUN 3 come and LUN 0 go"
        assert sorted(vsc.disks) == [3] and vsc.disks[3].size == 2 * MiB
        assert vsc.luns == [3]
        await vsc.disks[3].write(4096, b"y" * 512)
        assert await vsc.disks[3].read(4096, 512) == b"y" * 512
        await gone.close()
        # Nothing changed: the next ENUMERATE_BUS rescans without telling anyone.
        before = vsc._rescan_task
        await send_enumerate_bus(pair)
        await asyncio.wait_for(rescan_done(vsc, before), 10)
        assert changes.empty(), "a rescan that found nothing new reported a change"
        assert sorted(vsc.disks) == [3]
    finally:
        await stop(vsc, pair, host)


async def test_unsolicited_packets_that_are_not_a_bus_change_are_ignored(controller: ScsiController) -> None:
    """Linux rejects COMPLETE_IO with trans_id 0 (no request to complete) and ignores other operations."""
    vsc, pair, host = await start(controller)
    try:
        await pair.host.send(Packet(PacketType.DATA_INBAND, 0, 0, vstor.pack_completion(0)))
        await pair.host.send(Packet(PacketType.DATA_INBAND, 0, 0, b"\x0b\0"))  # too short for an operation
        await pair.host.send(Packet(PacketType.DATA_INBAND, 0, 0, vstor.pack_host_notification(
            vstor.Operation.REMOVE_DEVICE)))
        await asyncio.wait_for(rescan_done(vsc, None), 10)  # REMOVE_DEVICE asks for a rescan too
        assert sorted(vsc.disks) == [0]
        assert await vsc.disks[0].read(0, 512) == bytes(512)
    finally:
        await stop(vsc, pair, host)


def test_sense_becomes_the_errno_linux_gives_the_block_layer() -> None:
    """A full thin store (DATA PROTECT 0x27/0x07) is ENOSPC, as Linux scsi_check_sense makes it (DID_ALLOC_FAILURE);
    write protect is EPERM, a medium error EIO, an illegal request EINVAL."""
    def code(key: int, asc: int, ascq: int = 0) -> int:
        return ScsiReply(0x84, 2, 0, scsi.fixed_sense(key, asc, ascq), b"").error("WRITE(10)").errno

    assert code(scsi.SenseKey.DATA_PROTECT, 0x27, 0x07) == errno.ENOSPC
    assert code(scsi.SenseKey.DATA_PROTECT, 0x27) == errno.EPERM
    assert code(scsi.SenseKey.MEDIUM_ERROR, 0x0C) == errno.EIO
    assert code(scsi.SenseKey.ILLEGAL_REQUEST, 0x21) == errno.EINVAL
