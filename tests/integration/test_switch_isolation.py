"""Switch-port isolation over real sockets (issue 12): a real parent process, real ``child-partition run``
children pinging each other, and child partitions run in the test's process whose NetVSC NICs (no guest
stack on them) show exactly the frames the parent's learning switch delivered to their port.

What a port receives is what Hyper-V's vmswitch delivers: unicast to its own MAC, broadcast and multicast,
and unknown unicast (flooded); never unicast for another partition's MAC. What a port sends comes from its
NIC's MAC only (``[network] mac_spoofing = false``, the default). A partition's NVSP and RNDIS reach only its
own NIC: another partition's sub-channel relids and buffer GPADL ids do not exist on its connection.

"Never" is proved without sleeping: the receiving NIC has one channel and the sender one, so the switch's
per-port queue keeps their order, and a last frame closes each capture; anything dropped before it would
have arrived before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from child_partition.devices.network.nic import Nic
from child_partition.devices.network.service import NetworkService
from child_partition.devices.network.vsc import NetworkVsc
from child_partition.runner import ChildPartition
from parent_partition.devices.network.switch import BROADCAST, mac_for
from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.devices.network import guest as netguest
from vmbus_proto.devices.network import nvsp
from vmbus_proto.devices.network.buffers import ByteBuffer
from vmbus_proto.envelope import Signal
from vmbus_proto.gpadl import split
from vmbus_proto.packets import Packet, PacketType

from .conftest import Parent, Proc, child
from .rawclient import RawClient
from .test_network import ping
from .test_network_subchannels import until

pytestmark = pytest.mark.integration
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: no stack on either side acts on these frames
UNKNOWN = bytes.fromhex("02aabbccdd99")  # a unicast MAC no port has
MULTICAST = bytes.fromhex("01005e000001")


def frame(dst: bytes, src: bytes, marker: str) -> bytes:
    return (dst + src + ETHERTYPE + marker.encode()).ljust(60, b"\0")


def marker(data: bytes) -> str | None:
    return data[14:60].rstrip(b"\0").decode() if data[12:14] == ETHERTYPE else None


class Guest:
    """A child partition in the test's process: its NetVSC and NIC, and every frame the NIC received."""

    def __init__(self, vm: ChildPartition, vsc: NetworkVsc, nic: Nic) -> None:
        self.vm, self.vsc, self.nic = vm, vsc, nic
        self.frames: list[bytes] = []

    async def capture(self) -> None:
        while True:
            self.frames += await self.nic.recv_batch()

    async def received(self, end: str) -> list[bytes]:
        """The frames received until the one with marker ``end`` (which is not among them)."""
        await until(lambda: any(marker(f) == end for f in self.frames), f"frame {end!r} at {self.vm.name}")
        return self.frames[:next(i for i, f in enumerate(self.frames) if marker(f) == end)]


@contextlib.asynccontextmanager
async def guest(url: str, name: str, **options: Any) -> AsyncIterator[Guest]:
    stop = asyncio.Event()
    vm = ChildPartition(url, name, reconnect=False, **options)
    running = asyncio.get_running_loop().create_task(vm.run(stop))
    capture: asyncio.Task[None] | None = None
    try:
        net = vm.service(NetworkService)
        await asyncio.wait_for(net.nic_ready.wait(), 60.0)
        assert net.nic is not None
        g = Guest(vm, next(v for v in vm.vscs.values() if isinstance(v, NetworkVsc)), net.nic)
        if not options.get("guest_stack", True):
            capture = asyncio.get_running_loop().create_task(g.capture())
        yield g
    finally:
        if capture is not None:
            capture.cancel()
        stop.set()
        assert await asyncio.wait_for(running, 60.0) == 0, f"{name} did not unload cleanly"


def sniffer(url: str, name: str) -> contextlib.AbstractAsyncContextManager[Guest]:
    """A partition that only listens (no guest stack), on one channel so its frames keep the switch's order."""
    return guest(url, name, guest_stack=False, net_queues=1)


@pytest.fixture(autouse=True)
def _logs() -> None:
    logs.setup("warning", json=True)


def _summary(frames: list[bytes]) -> list[str]:
    return [f"{f[6:12].hex(':')}>{f[:6].hex(':')} {marker(f) or f[12:14].hex()}" for f in frames]


# ---- what a port receives ------------------------------------------------------------------------------

async def test_a_port_gets_its_own_unicast_broadcast_and_floods_never_anothers_unicast(tmp_path: Path) -> None:
    """vm1 pings vm2 (real children); a third port sees vm1's ARP broadcast but none of their unicast; a
    fourth sends it unicast, broadcast, multicast and unknown unicast (received) and unicast to vm1, vm2 and
    itself (not received). Frames from another partition's MAC are dropped at the sender's port."""
    parent = Parent(tmp_path / "parent", "[network]\nstats_interval = 0.2\n")
    vms: list[Proc] = []
    try:
        async with sniffer(parent.unix, "sniff") as spy, sniffer(parent.unix, "sniff-tx") as tx:
            me, vm1, vm2 = spy.nic.mac, mac_for("vm1"), mac_for("vm2")
            assert me == mac_for("sniff") and tx.nic.mac == mac_for("sniff-tx")
            vms.append(child(tmp_path, parent.tcp, "vm2"))
            await asyncio.to_thread(vms[0].wait_event, "guest network stack up", 60.0)
            vms.append(child(tmp_path, parent.unix, "vm1", "--ping", "vm2", "--ping-interval", "0.2"))
            await asyncio.to_thread(vms[1].wait_for, lambda r: r.get("event") == "ping reply"
                                    and r.get("received", 0) >= 3, 90.0)
            # Every echo and reply between vm1 and vm2 so far has passed the switch; now the test's frames.
            for dst, text in ((me, "to-me"), (vm1, "to-vm1"), (vm2, "to-vm2"), (tx.nic.mac, "to-self"),
                              (UNKNOWN, "unknown-unicast"), (BROADCAST, "broadcast"), (MULTICAST, "multicast")):
                await tx.nic.send(frame(dst, tx.nic.mac, text))
            await tx.nic.send(frame(BROADCAST, vm2, "spoofed-vm2"))  # vm2's MAC, from sniff-tx's port
            await tx.nic.send(frame(BROADCAST, UNKNOWN, "spoofed-unknown"))
            await tx.nic.send(frame(BROADCAST, tx.nic.mac, "end"))
            got = await spy.received("end")
            seen = _summary(got)
            stray = [s for f, s in zip(got, seen, strict=True) if not f[0] & 1 and f[:6] not in (me, UNKNOWN)]
            assert not stray, f"sniff received unicast for another partition's MAC: {stray}"
            assert [marker(f) for f in got if marker(f)] == ["to-me", "unknown-unicast", "broadcast", "multicast"], \
                f"sniff got the wrong test frames: {seen}"
            arp = [f for f in got if f[6:12] == vm1 and f[:6] == BROADCAST and f[12:14] == b"\x08\x06"]
            assert arp, f"vm1's ARP broadcast was not flooded to sniff: {seen}"

            def spoof_drops(r: dict[str, Any]) -> bool:
                return (r.get("event") == "switch counters"
                        and r["switch"]["drops"].get("mac_spoofed", 0) == 2)
            await asyncio.to_thread(parent.wait_for, spoof_drops, 30.0)
        for vm in vms:
            assert vm.stop(signal.SIGINT) == 0, f"{vm.name} did not unload cleanly"
    finally:
        for vm in vms:
            vm.stop()
        parent.stop()


async def test_with_mac_spoofing_on_a_port_sends_from_any_mac(tmp_path: Path) -> None:
    """The control for the drop above: ``[network] mac_spoofing = true`` lets the same frames through."""
    parent = Parent(tmp_path / "parent", "[network]\nmac_spoofing = true\n")
    try:
        async with sniffer(parent.unix, "sniff") as spy, sniffer(parent.unix, "sniff-tx") as tx:
            await tx.nic.send(frame(BROADCAST, mac_for("vm2"), "spoofed-vm2"))
            await tx.nic.send(frame(BROADCAST, UNKNOWN, "spoofed-unknown"))
            await tx.nic.send(frame(BROADCAST, tx.nic.mac, "end"))
            got = [marker(f) for f in await spy.received("end")]
            assert got == ["spoofed-vm2", "spoofed-unknown"], f"with mac_spoofing on, sniff got {got}"
    finally:
        parent.stop()


# ---- what a partition's NVSP reaches -------------------------------------------------------------------

async def _answers_pings(parent: Parent, name: str) -> None:
    """A real child (``child-partition ping``) pings ``name`` through the switch: 3 sent, 3 received."""
    done = await asyncio.to_thread(ping, parent, "vm-c", name, "-c", "3", "-i", "0.2")
    assert done.returncode == 0 and "3 received" in done.stdout, f"ping {name}: {done.stdout}{done.stderr}"


def _network_relid(offers: dict[int, m.OfferChannel]) -> int:
    return next(r for r, o in offers.items() if o.if_type == nvsp.SPEC.class_id)


def _gpadl(c: RawClient, relid: int, gid: int, pages: int, first_pfn: int) -> None:
    header, bodies = split(relid, gid, list(range(first_pfn, first_pfn + pages)))
    for msg in [header, *bodies]:
        c.send(msg)
    created = c.expect(m.GpadlCreated)
    assert created.gpadl == gid and created.creation_status == 0, created


BUFFER_PAGES = 64  # 256 KiB: room for 146 receive sub-allocations, 42 send sections


def _nvsp_setup(c: RawClient, relid: int, recv_gpadl: int, send_gpadl: int) -> str | None:
    """NetVSC's setup on ``relid`` (already open) with these buffer GPADL ids, until it is ready (None) or
    fails (why)."""
    views = {which: ByteBuffer(BUFFER_PAGES * 4096) for which in ("receive", "send")}
    g = netguest.NvspGuest(recv_gpadl=recv_gpadl, recv_view=views["receive"], recv_size=BUFFER_PAGES * 4096,
                           send_gpadl=send_gpadl, send_view=views["send"], send_size=BUFFER_PAGES * 4096)
    g.start()
    for _ in range(200):  # a bounded setup: INIT, NDIS, two buffers, the RNDIS queries and sets
        for pkt in g.data_to_send():
            c.send_packet(relid, pkt)
        for event in g.receive(c.recv_packet(relid)):
            if isinstance(event, netguest.Failed):
                return event.reason
        if g.ready:
            return None
    raise AssertionError("the NVSP setup neither finished nor failed in 200 packets")


async def test_another_partitions_sub_channel_relids_do_not_exist_on_this_connection(tmp_path: Path) -> None:
    """A's NIC has three sub-channels. On B's connection their relids are answered exactly as a relid that
    was never offered: OPENCHANNEL dropped as unknown, packets and signals dropped; A's NIC goes on."""
    parent = Parent(tmp_path / "parent")
    try:
        async with guest(parent.unix, "vm-a") as a:
            await until(lambda: a.vsc.spreading and len(a.vsc.queues) == 3, "vm-a's three sub-channels")
            subs = sorted(q.relid for q in a.vsc.queues.values())
            b = RawClient(parent.tcp)
            offers = b.negotiate("vm-b")
            never = max(offers) + 1000
            assert not set(subs) & set(offers), f"B was offered A's sub-channel relids {subs}"
            mark = parent.mark()
            for relid in [*subs, never]:
                b.send(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=1,
                                     downstream_ringbuffer_pageoffset=1))
                b.send_packet(relid, Packet(PacketType.DATA_INBAND, 0, 1,
                                            nvsp.pack_rndis_packet(0, 0xFFFFFFFF, 0)))
                b.signal(relid, Signal(ring=0, write_index=64))
            for relid in [*subs, never]:  # each answered as the never-offered relid is
                await asyncio.to_thread(parent.wait_event, "control message dropped", 30.0, mark,
                                        partition="vm-b", kind="unknown_relid", reason=f"unknown relid {relid}")
                for kind in ("PACKET", "SIGNAL"):
                    await asyncio.to_thread(parent.wait_event, "frame for a channel that is not open dropped",
                                            30.0, mark, partition="vm-b", relid=relid, kind=kind)
            b.close()
            # A's sub-channels are A's still: a real child pings A through them.
            assert sorted(q.relid for q in a.vsc.queues.values()) == subs, "vm-a lost a sub-channel"
            await _answers_pings(parent, "vm-a")
    finally:
        parent.stop()


async def test_another_partitions_buffer_gpadls_cannot_be_named_in_send_recv_buf(tmp_path: Path) -> None:
    """B names A's receive-buffer GPADL id in SEND_RECV_BUF, and A's send-buffer id in SEND_SEND_BUF: each
    is answered with NVSP's failure status. The same id created on B's own connection is B's to use."""
    parent = Parent(tmp_path / "parent")
    try:
        async with guest(parent.unix, "vm-a") as a:
            a_recv, a_send = a.vsc.buffers["receive"][0], a.vsc.buffers["send"][0]
            ring = max(a_recv, a_send) + 1  # B's own ring GPADL: no id of A's
            mark = parent.mark()
            b = RawClient(parent.tcp)
            relid = _network_relid(b.negotiate("vm-b"))
            b.open(relid, nvsp.SPEC.ring_bytes // 4096, ring)
            failed = _nvsp_setup(b, relid, recv_gpadl=a_recv, send_gpadl=ring + 1)
            assert failed == f"host refused the receive buffer (status {int(nvsp.Status.FAIL)})", failed
            await asyncio.to_thread(parent.wait_event, "receive buffer refused", 30.0, mark, partition="vm-b",
                                    gpadl=a_recv)
            b.close()
            # B2 creates its receive buffer under A's receive-buffer id (ids are per connection: it is B2's),
            # then names A's send-buffer id, which is nothing on B2's connection.
            b2 = RawClient(parent.tcp)
            relid = _network_relid(b2.negotiate("vm-b2"))
            b2.open(relid, nvsp.SPEC.ring_bytes // 4096, ring)
            _gpadl(b2, relid, a_recv, BUFFER_PAGES, 0x8000)
            failed = _nvsp_setup(b2, relid, recv_gpadl=a_recv, send_gpadl=a_send)
            assert failed == f"host refused the send buffer (status {int(nvsp.Status.FAIL)})", failed
            await asyncio.to_thread(parent.wait_event, "send buffer refused", 30.0, mark, partition="vm-b2",
                                    gpadl=a_send)
            b2.close()
            # A's NIC still has its buffers: a real child pings it.
            await _answers_pings(parent, "vm-a")
    finally:
        parent.stop()
