"""The guest side of the network: the Nic API on the in-memory hub, and the ARP + ICMP echo stack (sans-IO
receive path with explicit time, and over a NIC pair), including arbitrary frames fed to it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from child_partition.devices.network import stack as stack_mod
from child_partition.devices.network.nic import LinkDown, LoopHub, NicClosed, nic_pair
from child_partition.devices.network.stack import (
    ARP,
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETH_ARP,
    ETH_IPV4,
    ICMP_ECHO_REQUEST,
    SUBNET,
    ArpCache,
    GuestStack,
    HostUnreachable,
    Neighbours,
    address_for_name,
    arp_packet,
    checksum,
    ethernet,
    icmp_echo,
    ipv4_packet,
    target_address,
)

MAC_A, MAC_B, MAC_C = bytes.fromhex("00155d000001"), bytes.fromhex("00155d000002"), bytes.fromhex("00155d000003")
IP_A, IP_B = IPv4Interface("10.0.0.1/8"), IPv4Interface("10.0.0.2/8")
DEADLINE = 30.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` with a generous deadline."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def frame_size(n: int) -> bytes:
    return MAC_B + MAC_A + b"\x88\xb5" + bytes(n - 14)


# -- the Nic API ------------------------------------------------------------------------------------------------

async def test_pair_carries_frames_both_ways_and_counts_them() -> None:
    a, b = nic_pair(MAC_A, MAC_B)
    await a.send(frame_size(60))
    assert a.send_nowait(frame_size(100)), "an empty transmit queue refused a frame"
    assert await b.recv() == frame_size(60), "first frame did not arrive first"
    assert await b.recv_batch() == [frame_size(100)], "batch receive lost the second frame"
    await b.send(frame_size(64))
    assert await a.recv() == frame_size(64), "B to A frame lost"
    assert (a.counters.tx_frames, a.counters.tx_bytes, a.counters.rx_frames) == (2, 160, 1), a.counters
    assert (b.counters.rx_frames, b.counters.rx_bytes, b.counters.tx_frames) == (2, 160, 1), b.counters


async def test_full_transmit_queue_refuses_then_send_waits_for_room() -> None:
    a, b = nic_pair(MAC_A, MAC_B, tx_queue=4, rx_queue=100)
    accepted = [a.send_nowait(frame_size(60)) for _ in range(5)]
    assert accepted == [True] * 4 + [False], f"send_nowait with a 4-frame queue: {accepted}"
    assert a.counters.tx_frames == 4, "a refused frame was counted as sent"
    await a.send(frame_size(61))  # waits until the hub drains the queue
    frames: list[bytes] = []
    while len(frames) < 5:
        frames += await b.recv_batch()
    assert frames[-1] == frame_size(61), "the frame sent after waiting did not arrive last"


async def test_full_receive_queue_drops_and_counts() -> None:
    a, b = nic_pair(MAC_A, MAC_B, rx_queue=3)
    for _ in range(5):
        await a.send(frame_size(60))
    await until(lambda: b.counters.rx_frames + b.counters.rx_drops == 5, "frames never reached B")
    assert (b.counters.rx_frames, b.counters.rx_drops) == (3, 2), f"3-frame rx queue: {b.counters}"
    assert len(await b.recv_batch(10)) == 3, "queued frames not all returned"


async def test_link_down_refuses_sends_and_notifies_listeners_once_per_change() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    changes: list[bool] = []
    unsubscribe = a.on_link_change(changes.append)
    a.set_link(False)
    a.set_link(False)
    with pytest.raises(LinkDown, match="link is down"):
        await a.send(frame_size(60))
    with pytest.raises(LinkDown):
        a.send_nowait(frame_size(60))
    assert not a.deliver(frame_size(60)) and a.counters.rx_drops == 1, "a down NIC accepted a received frame"
    waiter = asyncio.create_task(a.wait_link())
    a.set_link(True)
    await asyncio.wait_for(waiter, DEADLINE)
    unsubscribe()
    a.set_link(False)
    assert changes == [False, True], f"link listener saw {changes}"


async def test_send_blocked_on_room_raises_when_the_link_goes_down() -> None:
    a, _ = nic_pair(MAC_A, MAC_B, tx_queue=1)
    a.send_nowait(frame_size(60))
    a._transmit = lambda frame: False  # type: ignore[method-assign]  # a device that never frees room
    sender = asyncio.create_task(a.send(frame_size(60)))
    await asyncio.sleep(0)
    a.set_link(False)
    with pytest.raises(LinkDown):
        await asyncio.wait_for(sender, DEADLINE)


async def test_closed_nic_ends_receivers_and_senders() -> None:
    a, b = nic_pair(MAC_A, MAC_B)
    receiver = asyncio.create_task(b.recv())
    await asyncio.sleep(0)
    b.close()
    with pytest.raises(NicClosed):
        await asyncio.wait_for(receiver, DEADLINE)
    with pytest.raises(NicClosed):
        await b.send(frame_size(60))
    await a.send(frame_size(60))  # the peer is gone: A's frame goes nowhere, quietly
    assert not b.link_up and b.closed, "a closed NIC still reports its link up"


def test_frames_ethernet_cannot_carry_are_refused() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    for size in (0, 13, 1500 + 14 + 4 + 1):
        with pytest.raises(ValueError, match="does not fit Ethernet"):
            a.send_nowait(bytes(size))
    with pytest.raises(ValueError, match="6 bytes"):
        LoopHub().attach(b"\x01")


async def test_hub_floods_every_other_port() -> None:
    hub = LoopHub()
    a, b, c = hub.attach(MAC_A), hub.attach(MAC_B), hub.attach(MAC_C)
    await b.send(frame_size(60))
    assert await a.recv() == await c.recv() == frame_size(60), "hub did not flood"
    await until(lambda: b.counters.tx_frames == 1, "B's frame not counted")
    assert b.counters.rx_frames == 0, "the hub sent a frame back to its sender"


# -- addresses --------------------------------------------------------------------------------------------------

def test_name_addresses_are_stable_distinct_and_inside_the_subnet() -> None:
    assert address_for_name("vm1") == address_for_name("vm1"), "the address of a name changed"
    addresses = {address_for_name(f"vm{n}").ip for n in range(1, 1001)}
    assert len(addresses) == 1000, "two of vm1..vm1000 share an address"
    assert all(a in SUBNET and a not in (SUBNET.network_address, SUBNET.broadcast_address) for a in addresses)
    assert address_for_name("vm2").network == SUBNET, "the derived address has the wrong prefix"


def test_target_is_an_address_or_a_partition_name() -> None:
    assert target_address("10.1.2.3") == IPv4Address("10.1.2.3")
    assert target_address("vm2") == address_for_name("vm2").ip
    with pytest.raises(ValueError, match="only IPv4"):
        target_address("fe80::1")


# -- the stack, sans-IO -----------------------------------------------------------------------------------------

def arp_request_to(target: IPv4Address, sender_mac: bytes = MAC_B, sender_ip: IPv4Address = IP_B.ip) -> bytes:
    return ethernet(BROADCAST_MAC, sender_mac, ETH_ARP,
                    arp_packet(ARP_REQUEST, sender_mac, sender_ip, bytes(6), target))


def echo_request_to(dst: IPv4Address, *, ident: int = 7, seq: int = 1, data: bytes = b"hello") -> bytes:
    packet = ipv4_packet(IP_B.ip, dst, 1, icmp_echo(ICMP_ECHO_REQUEST, ident, seq, data))
    return ethernet(MAC_A, MAC_B, ETH_IPV4, packet)


def test_arp_request_for_us_is_answered_and_its_sender_learned() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    [reply] = stack.handle(arp_request_to(IP_A.ip), now=5.0)
    assert reply[:6] == MAC_B and reply[12:14] == b"\x08\x06", "ARP reply not addressed to the asker"
    *_, op, sha, spa, tha, tpa = ARP.unpack_from(reply, 14)
    assert (op, sha, spa, tha, tpa) == (ARP_REPLY, MAC_A, IP_A.ip.packed, MAC_B, IP_B.ip.packed), "wrong ARP reply"
    assert len(reply) == 60, "short frame not padded to Ethernet's minimum"
    assert stack.arp.lookup(IP_B.ip, 5.0) == MAC_B, "the asker was not learned"
    assert stack.handle(arp_request_to(IPv4Address("10.9.9.9")), now=5.0) == [], "answered for another address"
    assert stack.counters.ignored["arp not for us"] == 1


def test_arp_cache_entries_expire_after_their_lifetime() -> None:
    cache = ArpCache(lifetime=60.0)
    cache.learn(IP_B.ip, MAC_B, now=100.0)
    assert cache.lookup(IP_B.ip, 159.9) == MAC_B, "entry gone before its lifetime"
    cache.learn(IP_B.ip, MAC_B, now=150.0)  # confirmed again: the lifetime restarts
    assert cache.lookup(IP_B.ip, 209.9) == MAC_B, "refresh did not extend the entry"
    assert cache.lookup(IP_B.ip, 210.0) is None, "entry outlived its lifetime"
    cache.learn(IP_A.ip, MAC_A, now=0.0)
    assert cache.entries(now=61.0) == {}, "expire kept a stale entry"


def test_gratuitous_arp_refreshes_only_known_neighbours_and_conflicts_are_counted() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    garp = arp_request_to(IP_B.ip, MAC_C, IP_B.ip)  # B's address announced from a new MAC
    stack.handle(garp, now=0.0)
    assert IP_B.ip not in stack.arp, "an unknown neighbour's gratuitous ARP was learned"
    stack.arp.learn(IP_B.ip, MAC_B, now=0.0)
    stack.handle(garp, now=1.0)
    assert stack.arp.lookup(IP_B.ip, 1.0) == MAC_C, "a known neighbour's new MAC was not taken"
    stack.handle(arp_request_to(IP_A.ip, MAC_C, IP_A.ip), now=1.0)
    assert stack.counters.address_conflicts == 1, "another MAC claiming our address was not counted"


def test_neighbours_are_the_hosts_heard_lately_in_order_and_bounded() -> None:
    table = Neighbours(lifetime=30.0, limit=2)
    b, c, d = (IPv4Address(f"10.0.0.{i}") for i in (2, 3, 4))
    table.heard(c, now=0.0)
    table.heard(b, now=1.0)
    table.heard(d, now=2.0)  # full: not added, counted
    assert table.current(now=2.0) == [c, b] and table.overflow == 1, "order or limit wrong"
    table.heard(c, now=20.0)  # heard again: kept longer, keeps its place
    assert table.current(now=31.0) == [c], "a host not heard for the lifetime was kept (or a fresh one dropped)"
    table.heard(d, now=31.0)  # room again
    assert table.current(now=31.0) == [c, d]
    assert table.current(now=61.0) == [], "nothing heard for the lifetime, yet neighbours remain"


def test_the_stack_hears_neighbours_from_their_arp_and_their_traffic_to_it_only() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    stack.handle(arp_request_to(IPv4Address("10.7.7.7")), now=0.0)  # B asks about someone else: B is heard
    assert stack.neighbours.current(0.0) == [IP_B.ip], "an ARP request's sender was not heard"
    other = ethernet(MAC_A, MAC_C, ETH_IPV4, ipv4_packet(IPv4Address("10.0.0.3"), IPv4Address("10.0.0.9"), 1,
                                                         icmp_echo(ICMP_ECHO_REQUEST, 1, 1, b"")))
    stack.handle(other, now=0.0)  # IPv4 for another host: not a sign of a neighbour
    stack.handle(echo_request_to(IP_A.ip), now=0.0)
    stack.handle(arp_request_to(IP_A.ip, MAC_C, IP_A.ip), now=0.0)  # a conflict claiming our address
    stack.handle(arp_request_to(IP_A.ip, MAC_C, IPv4Address("192.168.1.1")), now=0.0)  # off our network
    assert stack.neighbours.current(0.0) == [IP_B.ip], "heard something that is no neighbour"


def test_echo_request_for_us_is_answered_with_the_same_id_seq_and_data() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    [reply] = stack.handle(echo_request_to(IP_A.ip, ident=0x1234, seq=9, data=b"payload!"), now=0.0)
    assert reply[:6] == MAC_B, "echo reply not sent back to the requester's MAC"
    ip = stack_mod.parse_ipv4(reply[14:])
    assert (ip.src, ip.dst, ip.ttl, ip.proto) == (IP_A.ip, IP_B.ip, 64, 1), f"reply header {ip}"
    assert checksum(ip.payload) == 0, "echo reply's ICMP checksum is wrong"
    assert ip.payload[4:] == struct.pack("!HH", 0x1234, 9) + b"payload!" and ip.payload[0] == 0, "echo reply body"
    assert stack.counters.echo_replies_sent == 1


def by_reason(cases: list[tuple[bytes, str]]) -> list[object]:
    """Parametrize cases named by their drop reason, not their bytes."""
    return [pytest.param(frame, reason, id=reason) for frame, reason in cases]


@pytest.mark.parametrize(("frame", "reason"), by_reason([
    (b"\x00" * 13, "runt"),
    (ethernet(MAC_A, MAC_B, ETH_ARP, b"\x00\x01")[:20], "arp truncated"),
    (ethernet(MAC_A, MAC_B, ETH_ARP, struct.pack("!HHBBH", 6, 0x0800, 6, 4, 1) + bytes(20)),
     "arp not ethernet/ipv4"),
    (ethernet(MAC_A, MAC_B, ETH_IPV4, b"\x45\x00")[:18], "ipv4 truncated"),
]))
def test_malformed_frames_are_counted_drops(frame: bytes, reason: str) -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    assert stack.handle(frame, now=0.0) == [], f"a malformed frame ({reason}) was answered"
    assert stack.counters.dropped == {reason: 1}, f"expected one {reason!r} drop, got {stack.counters.dropped}"


def corrupt_ipv4(edit: Callable[[bytearray], None], fix_checksum: bool = True) -> bytes:
    frame = bytearray(echo_request_to(IP_A.ip))
    edit(frame)
    if fix_checksum:
        header_len = min((frame[14] & 0xF) * 4, len(frame) - 14)
        frame[24:26] = b"\0\0"
        frame[24:26] = struct.pack("!H", checksum(bytes(frame[14:14 + header_len])))
    return bytes(frame)


@pytest.mark.parametrize(("frame", "reason"), by_reason([
    (corrupt_ipv4(lambda f: f.__setitem__(24, f[24] ^ 0xFF), fix_checksum=False), "ipv4 checksum"),
    (corrupt_ipv4(lambda f: f.__setitem__(14, 0x44)), "ipv4 header length"),
    (corrupt_ipv4(lambda f: f.__setitem__(14, 0x4F)), "ipv4 header length"),
    (corrupt_ipv4(lambda f: f.__setitem__(14, 0x65)), "ipv4 version"),
    (corrupt_ipv4(lambda f: f.__setitem__(slice(16, 18), b"\x05\xdc")), "ipv4 total length"),
    (corrupt_ipv4(lambda f: f.__setitem__(slice(16, 18), b"\x00\x10")), "ipv4 total length"),
    (corrupt_ipv4(lambda f: f.__setitem__(slice(20, 22), b"\x20\x00")), "ipv4 fragment"),
    (corrupt_ipv4(lambda f: f.__setitem__(36, f[36] ^ 1)), "icmp checksum"),
    (corrupt_ipv4(lambda f: f.__setitem__(slice(16, 18), b"\x00\x18")), "icmp truncated"),
]))
def test_bad_ipv4_and_icmp_are_counted_drops(frame: bytes, reason: str) -> None:
    test_malformed_frames_are_counted_drops(frame, reason)


def test_frames_this_stack_does_not_handle_are_ignored_and_counted() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    tcp = ipv4_packet(IP_B.ip, IP_A.ip, 6, bytes(20))
    frames = [
        ethernet(MAC_A, MAC_B, 0x86DD, bytes(40)),  # IPv6
        ethernet(MAC_A, MAC_B, ETH_IPV4, tcp),
        ethernet(MAC_C, MAC_B, ETH_IPV4, tcp),  # unicast to another MAC
        ethernet(BROADCAST_MAC, MAC_B, ETH_IPV4,  # echo to the broadcast address
                 ipv4_packet(IP_B.ip, SUBNET.broadcast_address, 1, icmp_echo(8, 1, 1, b""))),
        ethernet(MAC_A, MAC_B, ETH_IPV4, ipv4_packet(IP_B.ip, IP_A.ip, 1, icmp_echo(13, 1, 1, b""))),
        ethernet(MAC_A, MAC_B, ETH_IPV4, ipv4_packet(IP_B.ip, IP_A.ip, 1, icmp_echo(0, 1, 1, b""))),
    ]
    assert [stack.handle(f, now=0.0) for f in frames] == [[]] * len(frames), "an ignored frame was answered"
    assert stack.counters.ignored == {"ethertype 0x86dd": 1, "ip proto 6": 1, "not our MAC": 1,
                                      "ipv4 not for us": 1, "icmp type 13": 1, "echo reply unmatched": 1}
    assert not stack.counters.dropped, f"valid frames counted as malformed: {stack.counters.dropped}"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_frames_never_raise(frame: bytes) -> None:
    check_any_frame(frame)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([ETH_ARP, ETH_IPV4]), st.binary(max_size=120))
def test_arbitrary_arp_and_ipv4_payloads_never_raise(ethertype: int, payload: bytes) -> None:
    check_any_frame(MAC_A + MAC_B + struct.pack("!H", ethertype) + payload)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80))
def test_arbitrary_icmp_in_valid_ipv4_never_raises(kind: int, code: int, body: bytes) -> None:
    message = struct.pack("!BBH", kind, code, 0) + body
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    check_any_frame(ethernet(MAC_A, MAC_B, ETH_IPV4, ipv4_packet(IP_B.ip, IP_A.ip, 1, message)))


def check_any_frame(frame: bytes) -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    stack = GuestStack(a, IP_A)
    answers = stack.handle(frame, now=0.0)
    assert all(isinstance(f, bytes) and 60 <= len(f) <= a.max_frame for f in answers), "bad answer frame"
    c = stack.counters
    handled = c.arp_replies_sent + c.echo_replies_sent + c.address_conflicts + sum(c.ignored.values())
    assert handled + sum(c.dropped.values()) + (1 if stack.arp.entries(0.0) else 0) >= 1, \
        f"frame {frame.hex()} left no trace in the counters"


# -- the stack over a NIC pair ----------------------------------------------------------------------------------

async def test_echo_both_ways_resolves_arp_and_measures_rtt() -> None:
    a, b = nic_pair(MAC_A, MAC_B)
    ticks = iter(range(1, 10_000))

    def clock() -> float:  # each reading is a millisecond later
        return next(ticks) / 1000

    async with GuestStack(a, IP_A, clock=clock) as sa, GuestStack(b, IP_B) as sb:
        reply = await sa.echo(IP_B.ip, 1, b"abc", ident=5, timeout=DEADLINE)
        assert reply is not None, "A's ping to B got no reply"
        assert (reply.source, reply.seq, reply.ttl, reply.size) == (IP_B.ip, 1, 64, 11), f"reply {reply}"
        assert reply.rtt > 0, "RTT not measured on the stack's clock"
        assert sa.arp.lookup(IP_B.ip, clock()) == MAC_B and sb.arp.lookup(IP_A.ip, sb.now()) == MAC_A, \
            "ARP did not fill both caches"
        back = await sb.echo(IP_A.ip, 2, ident=6, timeout=DEADLINE)
        assert back is not None and back.source == IP_A.ip, "B's ping to A got no reply"
        assert sb.counters.arp_requests_sent == 0, "B asked ARP for a neighbour it had just learned"
        assert (sa.counters.echo_replies_sent, sb.counters.echo_replies_sent) == (1, 1)


async def test_gratuitous_arp_is_sent_when_the_link_comes_up() -> None:
    a, b = nic_pair(MAC_A, MAC_B)
    async with GuestStack(a, IP_A) as sa:
        await until(lambda: sa.counters.gratuitous_arps_sent == 1, "no gratuitous ARP at start")
        a.set_link(False)
        a.set_link(True)
        await until(lambda: sa.counters.gratuitous_arps_sent == 2, "no gratuitous ARP on link up")
    frames = await b.recv_batch()
    *_, op, sha, spa, _, tpa = ARP.unpack_from(frames[-1], 14)
    assert frames[-1][:6] == BROADCAST_MAC and (op, sha, spa, tpa) == (ARP_REQUEST, MAC_A, IP_A.ip.packed,
                                                                     IP_A.ip.packed), "not a gratuitous ARP"


async def test_nobody_answering_arp_is_host_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod, "ARP_RETRANSMIT", 0.02)
    a, _ = nic_pair(MAC_A, MAC_B)
    async with GuestStack(a, IP_A) as sa:
        with pytest.raises(HostUnreachable, match=r"no ARP reply from 10\.0\.0\.9"):
            await sa.echo(IPv4Address("10.0.0.9"), 1, ident=1, timeout=DEADLINE)
        assert sa.counters.arp_requests_sent == 3, "Linux gives up after three ARP requests"
        assert await sa.echo(IPv4Address("10.0.0.9"), 2, ident=1, timeout=0.01) is None, "timeout not honoured"


async def test_echo_outside_the_network_is_refused() -> None:
    a, _ = nic_pair(MAC_A, MAC_B)
    sa = GuestStack(a, IP_A)
    with pytest.raises(ValueError, match=r"not a host on 10\.0\.0\.0/8"):
        await sa.echo(IPv4Address("192.168.1.1"), 1, ident=1, timeout=1)
    reply = await sa.echo(IP_A.ip, 1, b"xy", ident=1, timeout=1)
    assert reply is not None and reply.source == IP_A.ip, "ping to our own address not answered locally"
