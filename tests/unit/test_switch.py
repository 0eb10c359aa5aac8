"""The virtual switch: learning, aging (driven clock), flooding, bounded queues, MTU, counters, detach."""

from __future__ import annotations

import asyncio
import socket

import pytest

from parent_partition.devices.network.stats import switch_fields
from parent_partition.devices.network.switch import (
    DROP_REASONS,
    MAX_LARGE_FRAME,
    PortDetached,
    Switch,
    mac_for,
    parse_mac,
    port_fields,
)
from parent_partition.devices.network.trunk import TrunkLink
from vmbus_proto.devices.network import vnet

from .test_vnet import ipv4_tcp


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def eth(dst: bytes, src: bytes, size: int = 60, ethertype: bytes = b"\x08\x00") -> bytes:
    return dst + src + ethertype + bytes(size - 14)


BCAST = b"\xff" * 6
X = bytes.fromhex("02aa00000001")  # a MAC behind port a that the switch has to learn
Y = bytes.fromhex("02bb00000001")


def test_mac_for_is_stable_unicast_and_distinct() -> None:
    assert mac_for("vm1") == mac_for("vm1")
    assert mac_for("vm1")[0] == 0x02 and len(mac_for("vm1")) == 6
    assert mac_for("vm1", "hyperv")[:3] == b"\x00\x15\x5d"
    macs = {mac_for(f"vm{i}") for i in range(20000)}
    assert len(macs) == 20000, "two of 20,000 partition names got the same MAC"
    assert parse_mac("02-00-5E-10-00-01") == bytes.fromhex("02005e100001")
    for bad in ("02:00:5e:10:00", "zz:00:5e:10:00:01", "01:00:5e:00:00:01"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError, match="unknown MAC style"):
        mac_for("vm1", "ieee")


def test_attach_refuses_duplicates() -> None:
    sw = Switch()
    a = sw.attach("a")
    with pytest.raises(ValueError, match="already attached"):
        sw.attach("a")
    with pytest.raises(ValueError, match="already port 'a'"):
        sw.attach("b", a.mac)
    with pytest.raises(ValueError, match="not a unicast"):
        sw.attach("c", BCAST)
    with pytest.raises(ValueError, match="max_frame"):
        sw.attach("d", max_frame=MAX_LARGE_FRAME + 1)


def test_learning_and_unicast_forwarding() -> None:
    sw = Switch()
    a, b, c = sw.attach("a"), sw.attach("b"), sw.attach("c")
    # Unknown destination Y: flooded to b and c.
    assert a.send_nowait(eth(Y, X))
    assert (b.pending(), c.pending()) == (1, 1)
    assert sw.counters.flooded == 1 and sw.counters.learned == 1
    b.recv_nowait(), c.recv_nowait()
    # X is now known on a: a frame for X goes only to a.
    assert b.send_nowait(eth(X, b.mac))
    assert (a.pending(), c.pending()) == (1, 0)
    assert sw.counters.unicast == 1
    # The port's own MAC is known from attach: c -> b's MAC reaches only b.
    c.send_nowait(eth(b.mac, c.mac))
    assert (a.pending(), b.pending()) == (1, 1)
    # A destination learned on the sending port is filtered, not sent back.
    a.send_nowait(eth(X, a.mac))
    assert sw.counters.filtered == 1 and a.pending() == 1
    # X moves to c.
    c.send_nowait(eth(BCAST, X))
    assert sw.counters.moved == 1 and sw.lookup(X) is c


def test_aging_with_a_driven_clock() -> None:
    clock = Clock()
    sw = Switch(aging_s=10.0, clock=clock)
    a, b, c = sw.attach("a"), sw.attach("b"), sw.attach("c")
    a.send_nowait(eth(BCAST, X))
    b.recv_nowait(), c.recv_nowait()
    clock.now += 9.0
    assert sw.lookup(X) is a
    b.send_nowait(eth(X, b.mac))
    assert (a.pending(), c.pending()) == (1, 0)
    clock.now += 10.5  # 10.5 s since X was last seen
    assert sw.lookup(X) is None and sw.counters.aged_out == 1
    b.send_nowait(eth(X, b.mac))
    assert (a.pending(), c.pending()) == (2, 1), "an aged-out MAC is unknown unicast again: flooded"
    assert sw.lookup(a.mac) is a, "a port's own MAC is static and never ages"
    a.send_nowait(eth(BCAST, Y))
    clock.now += 11
    assert sw.expire() == 1


def test_table_is_bounded() -> None:
    clock = Clock()
    sw = Switch(max_macs=4, clock=clock, aging_s=5)
    a, _b = sw.attach("a"), sw.attach("b")
    for i in range(10):
        a.send_nowait(eth(BCAST, bytes([2, 0, 0, 0, 0, i])))
    assert len(sw.table()) == 4 and sw.counters.learned == 2 and sw.counters.table_full == 8
    clock.now += 6  # the two learned entries expire: room again
    a.send_nowait(eth(BCAST, bytes([2, 0, 0, 0, 1, 0])))
    assert sw.counters.learned == 3 and sw.counters.aged_out == 2


def test_flooding_broadcast_multicast() -> None:
    sw = Switch()
    ports = [sw.attach(f"p{i}") for i in range(4)]
    ports[0].send_nowait(eth(BCAST, ports[0].mac))
    ports[0].send_nowait(eth(bytes.fromhex("01005e000001"), ports[0].mac))
    assert [p.pending() for p in ports] == [0, 2, 2, 2]
    assert sw.counters.flooded == 2


def test_mtu_runts_and_tags() -> None:
    sw = Switch(mtu=1500)
    a, b = sw.attach("a"), sw.attach("b")
    assert a.send_nowait(eth(b.mac, a.mac, 1514))
    assert not a.send_nowait(eth(b.mac, a.mac, 1515))
    assert a.send_nowait(eth(b.mac, a.mac, 1518, ethertype=b"\x81\x00"))
    assert not a.send_nowait(eth(b.mac, a.mac, 1519, ethertype=b"\x81\x00"))
    assert not a.send_nowait(b"\x02" * 13)
    assert not a.send_nowait(eth(b.mac, BCAST))
    assert dict(a.counters.drops) == {"oversize": 2, "runt": 1, "bad_source": 1}
    assert (a.counters.rx_frames, a.counters.rx_bytes) == (2, 1514 + 1518)
    assert (b.counters.tx_frames, b.counters.tx_bytes) == (2, 1514 + 1518)
    assert sw.counters.drops["oversize"] == 2 and sw.counters.frames == 2
    stats = sw.stats()
    assert stats["ports"]["b"]["queued"] == 2  # type: ignore[index]


def test_full_queue_drops_and_counts() -> None:
    sw = Switch(queue_frames=4)
    a, b = sw.attach("a"), sw.attach("b")
    for _ in range(10):
        assert a.send_nowait(eth(b.mac, a.mac))
    assert b.pending() == 4 and b.counters.drops["queue_full"] == 6 and b.counters.tx_frames == 4
    assert len(b.recv_nowait(100)) == 4
    assert a.send_nowait(eth(b.mac, a.mac)) and b.pending() == 1


def test_queue_bytes_bound() -> None:
    sw = Switch(queue_bytes=MAX_LARGE_FRAME)
    a, b = sw.attach("a", max_frame=MAX_LARGE_FRAME), sw.attach("b", max_frame=MAX_LARGE_FRAME)
    big = eth(b.mac, a.mac, 40000)
    a.send_nowait(big), a.send_nowait(big)
    assert b.pending() == 1 and b.counters.drops["queue_full"] == 1


async def test_slow_port_does_not_stall_others() -> None:
    sw = Switch(queue_frames=8)
    a, fast, slow = sw.attach("a"), sw.attach("fast"), sw.attach("slow")
    got: list[int] = []

    async def consume() -> None:
        while len(got) < 1000:
            got.extend(len(f.data) for f in await fast.recv_batch(16))

    task = asyncio.create_task(consume())
    for i in range(1000):
        await a.send(eth(BCAST, a.mac))
        if i % 4 == 3:
            await asyncio.sleep(0)  # let the fast consumer run; nobody ever reads the slow port
    await asyncio.wait_for(task, 30)
    assert len(got) == 1000 and fast.counters.drops["queue_full"] == 0
    assert slow.pending() == 8 and slow.counters.drops["queue_full"] == 992


async def test_recv_waits_and_detach_wakes() -> None:
    sw = Switch()
    a, b = sw.attach("a"), sw.attach("b")
    waiter = asyncio.create_task(b.recv())
    await asyncio.sleep(0)
    a.send_nowait(eth(b.mac, a.mac, 100))
    frame = await asyncio.wait_for(waiter, 30)
    assert len(frame.data) == 100 and frame.offload is None
    waiter = asyncio.create_task(b.recv())
    await asyncio.sleep(0)
    a.send_nowait(eth(BCAST, X))
    b.detach()
    with pytest.raises(PortDetached):
        await asyncio.wait_for(waiter, 30)
    assert "b" not in sw.ports and b.pending() == 0
    assert sw.lookup(b.mac) is None
    with pytest.raises(PortDetached):
        b.send_nowait(eth(a.mac, b.mac))
    a.send_nowait(eth(BCAST, a.mac))  # flooding now reaches nobody, without error
    b.detach()  # twice is harmless
    assert sw.attach("b").mac == b.mac, "a partition reattaching gets its MAC back"


def test_large_segments_between_large_ports_and_segmented_otherwise() -> None:
    sw = Switch()
    big_a = sw.attach("big_a", max_frame=MAX_LARGE_FRAME)
    big_b = sw.attach("big_b", max_frame=MAX_LARGE_FRAME)
    small = sw.attach("small")
    gso = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    frame = ipv4_tcp(b"z" * 30000)
    assert big_a.send_nowait(frame, gso)  # unknown destination: flooded to both
    [carried] = big_b.recv_nowait()
    assert carried == (frame, gso)
    segs = small.recv_nowait(100)
    assert len(segs) == 21 and all(len(s.data) <= 1514 and s.offload is None for s in segs)
    assert sw.counters.segmented == 1
    # A large non-TCP frame cannot be cut: dropped for the small port, counted.
    big_a.send_nowait(eth(BCAST, big_a.mac, 9000))
    assert small.counters.drops["too_big"] == 1 and big_b.pending() == 1
    # A standard port cannot send large frames.
    assert not small.send_nowait(frame, gso) and small.counters.drops["oversize"] == 1


def test_port_fields_count_floods_and_every_drop_reason() -> None:
    sw = Switch(queue_frames=16)
    a, b = sw.attach("a"), sw.attach("b")
    a.send_nowait(eth(b"\xff" * 6, a.mac))  # broadcast: flooded
    a.send_nowait(eth(b.mac, a.mac))  # known unicast
    a.send_nowait(b"\x00" * 10)  # runt
    fields = port_fields(a.counters)
    assert fields["port_rx_frames"] == 2 and fields["port_rx_flooded"] == 1 and fields["port_dropped_runt"] == 1
    assert {k for k in fields if k.startswith("port_dropped_")} == {f"port_dropped_{r}" for r in DROP_REASONS}
    assert port_fields(b.counters)["port_tx_frames"] == 2
    stats = switch_fields(sw)
    assert stats["ports"]["b"]["queued"] == 2 and stats["switch"]["flooded"] == 1, stats


async def test_a_burst_across_a_trunk_waits_for_the_other_worker_instead_of_being_dropped() -> None:
    """Two workers' switches joined by a trunk (a Unix datagram socketpair, as the supervisor makes): the socket
    buffers about ninety 1,500-byte frames for the reader, so a burst bigger than that, sent before the other
    worker reads, must wait in the trunk port's queue, not be dropped."""
    left, right = Switch(), Switch()
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    t1, t2 = TrunkLink(left, 2, s1), TrunkLink(right, 1, s2)
    a, b = left.attach("a"), right.attach("b")
    try:
        b.send_nowait(eth(BCAST, b.mac))  # flooded across: the left switch learns b behind its trunk
        await asyncio.wait_for(a.recv(), 10)
        count = 600  # far past the socket's buffer, within the trunk port's queue (1,024 frames, 4 MiB)
        for i in range(count):  # all at once: the right worker reads only when the loop turns
            assert a.send_nowait(eth(b.mac, a.mac, 1400 + i % 100))
        got = []
        while len(got) < count:
            got += await asyncio.wait_for(b.recv_batch(256), 10)
        assert [len(f.data) for f in got] == [1400 + i % 100 for i in range(count)]
        assert not t1.port.counters.drops["queue_full"] and not left.counters.drops["queue_full"]
    finally:
        t1.close()
        t2.close()
