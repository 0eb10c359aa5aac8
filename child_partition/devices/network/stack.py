"""A minimal IPv4 guest stack for the demo: ARP (RFC 826) and ICMP echo (RFC 792), what a guest needs to
answer and send ``ping`` over its NIC, and nothing more. The behaviour follows Linux's where it matters:
three ARP requests one second apart before "Destination Host Unreachable", a gratuitous ARP when the link
comes up, echo requests to a broadcast address ignored (``icmp_echo_ignore_broadcasts``), TTL 64.

Everything else (IPv6, TCP, UDP, fragments, VLAN tags) is ignored and counted. Every received frame is
checked (lengths, IPv4 header length and checksum, ICMP checksum): a bad one is a counted drop, never an
exception.

The receive path is sans-IO: :meth:`GuestStack.handle` takes a frame and the time and returns the frames to
send. :meth:`GuestStack.run` is the loop that feeds it from a :class:`~.nic.Nic`.

Addresses: a partition's IPv4 address is derived from its name (:func:`address_for_name`), so any partition
can compute any other's address from the name alone; configuration may override it.

Neighbours: the stack remembers which hosts of its network it has heard from lately (any ARP packet they sent,
any IPv4 packet they sent to it), as ``arpwatch`` or ``ip neigh`` would see them: :class:`Neighbours`, bounded
in size and age. ``run --ping neighbours`` pings whatever is in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from types import TracebackType

from .nic import ETH_HEADER, Nic, NicError

# -- the address scheme -----------------------------------------------------------------------------------------

#: All partitions share one flat private network. A /8 gives names 2**24 - 2 host numbers to hash into, so
#: two names collide with odds of about n**2 / 2**25 (1 in 3,400 for a hundred partitions; vm1..vm1000 are
#: checked to be distinct). The address is configurable where a collision must be avoided for certain.
SUBNET = IPv4Network("10.0.0.0/8")


def address_for_name(name: str) -> IPv4Interface:
    """The partition's address: the first 3 bytes of SHA-256(name) as the host number in :data:`SUBNET`,
    skipping the network and broadcast addresses (1 .. 2**24 - 2)."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:3], "big")
    host = 1 + digest % (SUBNET.num_addresses - 2)
    return IPv4Interface((int(SUBNET.network_address) + host, SUBNET.prefixlen))


def target_address(target: str) -> IPv4Address:
    """An IPv4 address as written, or the address of the partition called ``target``."""
    try:
        address = ip_address(target)
    except ValueError:
        return address_for_name(target).ip
    if not isinstance(address, IPv4Address):
        raise ValueError(f"{target}: only IPv4 is supported")
    return address


# -- wire formats -----------------------------------------------------------------------------------------------

BROADCAST_MAC = b"\xff" * 6
ETH_IPV4, ETH_ARP = 0x0800, 0x0806
ETH_MIN = 60  # shortest Ethernet frame without FCS; shorter frames are padded on send
ARP_REQUEST, ARP_REPLY = 1, 2
ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total length, id, flags/frag, ttl, proto, checksum, src, dst
ICMP = struct.Struct("!BBHHH")  # type, code, checksum, id, seq
PROTO_ICMP = 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
DEFAULT_TTL = 64
ARP_LIFETIME = 60.0  # seconds an ARP entry is trusted (Linux: stale after ~30 s, collected after 60 s)
ARP_RETRANSMIT = 1.0  # Linux: neigh retrans_time 1 s
ARP_ATTEMPTS = 3  # Linux: mcast_solicit 3


class Malformed(ValueError):
    """A received frame that breaks its protocol's rules; the message is the drop reason counted."""


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    return frame.ljust(ETH_MIN, b"\0")


def arp_packet(op: int, sha: bytes, spa: IPv4Address, tha: bytes, tpa: IPv4Address) -> bytes:
    return ARP.pack(1, ETH_IPV4, 6, 4, op, sha, spa.packed, tha, tpa.packed)


def ipv4_packet(src: IPv4Address, dst: IPv4Address, proto: int, payload: bytes, *, ttl: int = DEFAULT_TTL,
                ident: int = 0) -> bytes:
    header = IPV4.pack(0x45, 0, IPV4.size + len(payload), ident, 0x4000, ttl, proto, 0, src.packed, dst.packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    message = ICMP.pack(kind, 0, 0, ident, seq) + data
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


@dataclass(frozen=True)
class Ipv4Packet:
    src: IPv4Address
    dst: IPv4Address
    ttl: int
    proto: int
    payload: bytes


def parse_ipv4(packet: bytes) -> Ipv4Packet:
    """Check an IPv4 header (RFC 791) and cut the payload to the total length (Ethernet pads short ones)."""
    if len(packet) < IPV4.size:
        raise Malformed("ipv4 truncated")
    ver_ihl, _, total, _, frag, ttl, proto, _, src, dst = IPV4.unpack_from(packet)
    header_len = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4:
        raise Malformed("ipv4 version")
    if header_len < IPV4.size or header_len > len(packet):
        raise Malformed("ipv4 header length")
    if not header_len <= total <= len(packet):
        raise Malformed("ipv4 total length")
    if checksum(packet[:header_len]) != 0:
        raise Malformed("ipv4 checksum")
    if frag & 0x3FFF:  # more-fragments flag or an offset: this stack does not reassemble
        raise Malformed("ipv4 fragment")
    return Ipv4Packet(IPv4Address(src), IPv4Address(dst), ttl, proto, packet[header_len:total])


# -- the ARP cache ------------------------------------------------------------------------------------------------

class ArpCache:
    """IPv4 → MAC, each entry trusted for ``lifetime`` seconds from when it was last confirmed. Time is
    passed in, so tests move it by hand."""

    def __init__(self, lifetime: float = ARP_LIFETIME) -> None:
        self.lifetime = lifetime
        self._entries: dict[IPv4Address, tuple[bytes, float]] = {}

    def learn(self, ip: IPv4Address, mac: bytes, now: float) -> None:
        self._entries[ip] = (mac, now + self.lifetime)

    def lookup(self, ip: IPv4Address, now: float) -> bytes | None:
        entry = self._entries.get(ip)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[ip]
            return None
        return entry[0]

    def __contains__(self, ip: IPv4Address) -> bool:
        return ip in self._entries

    def expire(self, now: float) -> None:
        """Forget the entries whose lifetime has passed."""
        for ip in [ip for ip, (_, expires) in self._entries.items() if now >= expires]:
            del self._entries[ip]

    def entries(self, now: float) -> dict[IPv4Address, bytes]:
        self.expire(now)
        return {ip: mac for ip, (mac, _) in self._entries.items()}


# -- the neighbours heard on the link -------------------------------------------------------------------------

NEIGHBOUR_LIFETIME = 30.0  # seconds a neighbour not heard from is kept (Linux: an entry goes stale after ~30 s)
MAX_NEIGHBOURS = 1024  # hosts remembered at once; more are not added (and counted) until some age out


class Neighbours:
    """The hosts of this network heard from, each with when it was first and last heard. Time is passed in."""

    def __init__(self, lifetime: float = NEIGHBOUR_LIFETIME, limit: int = MAX_NEIGHBOURS) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self.overflow = 0  # hosts heard while the table was full
        self._heard: dict[IPv4Address, float] = {}  # in the order first heard

    def heard(self, ip: IPv4Address, now: float) -> None:
        if ip not in self._heard:
            self.expire(now)
            if len(self._heard) >= self.limit:
                self.overflow += 1
                return
        self._heard[ip] = now

    def expire(self, now: float) -> None:
        for ip in [ip for ip, last in self._heard.items() if now - last >= self.lifetime]:
            del self._heard[ip]

    def current(self, now: float) -> list[IPv4Address]:
        """The hosts heard from within the lifetime, in the order first heard."""
        self.expire(now)
        return list(self._heard)


# -- the stack ---------------------------------------------------------------------------------------------------

@dataclass
class StackCounters:
    """What the stack did with received frames, by kind; ``dropped`` and ``ignored`` count by reason."""

    arp_requests_sent: int = 0
    arp_replies_sent: int = 0
    gratuitous_arps_sent: int = 0
    echo_requests_sent: int = 0
    echo_replies_sent: int = 0
    echo_replies_received: int = 0
    address_conflicts: int = 0  # another MAC claims our address
    tx_drops: int = 0  # frames the NIC could not take (queue full, link down)
    dropped: Counter[str] = field(default_factory=Counter)  # malformed frames, by reason
    ignored: Counter[str] = field(default_factory=Counter)  # valid frames this stack does not handle


@dataclass(frozen=True)
class EchoReply:
    source: IPv4Address
    seq: int
    ttl: int
    size: int  # ICMP bytes (header + data), what ping prints as "N bytes from"
    rtt: float  # seconds, on the stack's clock


class HostUnreachable(Exception):
    """No ARP reply after :data:`ARP_ATTEMPTS` requests."""


class GuestStack:
    """ARP + ICMP echo on one NIC with one IPv4 address. Use as ``async with GuestStack(nic, address):``
    (or call :meth:`run`) so received frames are handled."""

    def __init__(self, nic: Nic, address: IPv4Interface, *, clock: Callable[[], float] | None = None,
                 arp_lifetime: float = ARP_LIFETIME, ttl: int = DEFAULT_TTL) -> None:
        self.nic = nic
        self.address = address
        self.ttl = ttl
        self.arp = ArpCache(arp_lifetime)
        self.neighbours = Neighbours()
        self.counters = StackCounters()
        self._clock = clock
        self._arp_learned = asyncio.Event()
        self._echoes: dict[tuple[int, int], tuple[IPv4Address, float, asyncio.Future[EchoReply]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe = nic.on_link_change(self._link_changed)

    @property
    def ip(self) -> IPv4Address:
        return self.address.ip

    def now(self) -> float:
        """The stack's clock: ``time.monotonic``, which asyncio's own loop uses too. (uvloop's ``loop.time()``
        is libuv's cached millisecond clock: too coarse for sub-millisecond round trips.)"""
        return self._clock() if self._clock else time.monotonic()

    # -- receive (sans-IO) ---------------------------------------------------------------------------------------

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """Process one received frame at time ``now``; returns the frames to send in answer."""
        try:
            return self._ethernet(frame, now)
        except Malformed as exc:
            self.counters.dropped[str(exc)] += 1
        except struct.error:  # a length check missed: still only this frame's loss
            self.counters.dropped["truncated"] += 1
        return []

    def _ethernet(self, frame: bytes, now: float) -> list[bytes]:
        if len(frame) < ETH_HEADER:
            raise Malformed("runt")
        dst, ethertype = frame[:6], int.from_bytes(frame[12:14], "big")
        if dst != self.nic.mac and not dst[0] & 1:  # unicast to someone else (broadcast/multicast have bit 0)
            self.counters.ignored["not our MAC"] += 1
            return []
        if ethertype == ETH_ARP:
            return self._arp(frame[ETH_HEADER:], now)
        if ethertype == ETH_IPV4:
            return self._ipv4(frame[6:12], frame[ETH_HEADER:], now)
        self.counters.ignored[f"ethertype 0x{ethertype:04x}"] += 1
        return []

    def _arp(self, packet: bytes, now: float) -> list[bytes]:
        if len(packet) < ARP.size:
            raise Malformed("arp truncated")
        htype, ptype, hlen, plen, op, sha, spa_b, _, tpa_b = ARP.unpack_from(packet)
        if (htype, ptype, hlen, plen) != (1, ETH_IPV4, 6, 4):
            raise Malformed("arp not ethernet/ipv4")
        if op not in (ARP_REQUEST, ARP_REPLY):
            self.counters.ignored[f"arp op {op}"] += 1
            return []
        spa, tpa = IPv4Address(spa_b), IPv4Address(tpa_b)
        if spa == self.ip and sha != self.nic.mac:
            self.counters.address_conflicts += 1
            return []
        self._heard(spa, now)
        # RFC 826: refresh a known sender; add it when the packet is for us. (A probe's sender is 0.0.0.0.)
        if not spa.is_unspecified and (spa in self.arp or tpa == self.ip):
            self.arp.learn(spa, sha, now)
            self._arp_learned.set()
        if tpa != self.ip:
            self.counters.ignored["arp not for us"] += 1
            return []
        if op == ARP_REQUEST:
            self.counters.arp_replies_sent += 1
            return [ethernet(sha, self.nic.mac, ETH_ARP, arp_packet(ARP_REPLY, self.nic.mac, self.ip, sha, spa))]
        return []

    def _ipv4(self, src_mac: bytes, packet: bytes, now: float) -> list[bytes]:
        ip = parse_ipv4(packet)
        if ip.dst != self.ip:
            self.counters.ignored["ipv4 not for us"] += 1  # includes broadcast echo requests, as Linux
            return []
        self._heard(ip.src, now)
        if ip.proto != PROTO_ICMP:
            self.counters.ignored[f"ip proto {ip.proto}"] += 1
            return []
        if len(ip.payload) < ICMP.size:
            raise Malformed("icmp truncated")
        if checksum(ip.payload) != 0:
            raise Malformed("icmp checksum")
        kind, code, _, ident, seq = ICMP.unpack_from(ip.payload)
        if kind == ICMP_ECHO_REQUEST and code == 0:
            # One flat link, no router: the reply goes straight back to the request's source MAC.
            self.counters.echo_replies_sent += 1
            reply = icmp_echo(ICMP_ECHO_REPLY, ident, seq, ip.payload[ICMP.size:])
            return [ethernet(src_mac, self.nic.mac, ETH_IPV4, ipv4_packet(self.ip, ip.src, PROTO_ICMP, reply,
                                                                       ttl=self.ttl))]
        if kind == ICMP_ECHO_REPLY and code == 0:
            self._echo_reply(ip, ident, seq, now)
            return []
        self.counters.ignored[f"icmp type {kind}"] += 1
        return []

    def _heard(self, ip: IPv4Address, now: float) -> None:
        """A host of our network (not us, not the network or broadcast address) sent something: a neighbour."""
        network = self.address.network
        if ip != self.ip and ip in network and ip not in (network.network_address, network.broadcast_address):
            self.neighbours.heard(ip, now)

    def _echo_reply(self, ip: Ipv4Packet, ident: int, seq: int, now: float) -> None:
        waiting = self._echoes.get((ident, seq))
        if waiting is None or waiting[0] != ip.src or waiting[2].done():
            self.counters.ignored["echo reply unmatched"] += 1
            return
        self.counters.echo_replies_received += 1
        waiting[2].set_result(EchoReply(ip.src, seq, ip.ttl, len(ip.payload), now - waiting[1]))

    # -- the loop ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Handle received frames until the NIC closes."""
        if self.nic.link_up:
            self.announce()
        with contextlib.suppress(NicError):
            while True:
                for frame in await self.nic.recv_batch():
                    for answer in self.handle(frame, self.now()):
                        self._send(answer)

    async def __aenter__(self) -> GuestStack:
        self._task = asyncio.create_task(self.run(), name=f"stack {self.ip}")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def close(self) -> None:
        self._unsubscribe()
        for _, _, waiter in self._echoes.values():
            waiter.cancel()

    def _send(self, frame: bytes) -> bool:
        try:
            if self.nic.send_nowait(frame):
                return True
        except NicError:
            pass
        self.counters.tx_drops += 1
        return False

    def _link_changed(self, up: bool) -> None:
        if up:
            self.announce()

    def announce(self) -> None:
        """Gratuitous ARP: a broadcast request for our own address, so neighbours refresh their caches."""
        packet = arp_packet(ARP_REQUEST, self.nic.mac, self.ip, bytes(6), self.ip)
        if self._send(ethernet(BROADCAST_MAC, self.nic.mac, ETH_ARP, packet)):
            self.counters.gratuitous_arps_sent += 1

    # -- sending -------------------------------------------------------------------------------------------------

    async def resolve(self, ip: IPv4Address, timeout: float) -> bytes | None:
        """The MAC for ``ip``: from the cache, else by ARP requests one second apart. None when ``timeout``
        passes first; raises :class:`HostUnreachable` after :data:`ARP_ATTEMPTS` requests go unanswered."""
        deadline = self.now() + timeout
        for _ in range(ARP_ATTEMPTS):
            if (mac := self.arp.lookup(ip, self.now())) is not None:
                return mac
            request = arp_packet(ARP_REQUEST, self.nic.mac, self.ip, bytes(6), ip)
            if self._send(ethernet(BROADCAST_MAC, self.nic.mac, ETH_ARP, request)):
                self.counters.arp_requests_sent += 1
            retry = min(self.now() + ARP_RETRANSMIT, deadline)
            while (mac := self.arp.lookup(ip, self.now())) is None and (left := retry - self.now()) > 0:
                learned = self._arp_learned
                learned.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(learned.wait(), left)
            if mac is not None:
                return mac
            if self.now() >= deadline:
                return None
        raise HostUnreachable(f"no ARP reply from {ip}")

    async def echo(self, dst: IPv4Address, seq: int, data: bytes = b"", *, ident: int,
                   timeout: float) -> EchoReply | None:
        """Send one echo request and wait for its reply; None when ``timeout`` passes first. The RTT counts
        from the request's start, ARP included, as ping's. Raises :class:`HostUnreachable`."""
        if dst not in self.address.network or dst in (self.address.network.network_address,
                                                       self.address.network.broadcast_address):
            raise ValueError(f"{dst} is not a host on {self.address.network}")
        sent = self.now()
        if dst == self.ip:  # our own address: the kernel answers on loopback without touching the NIC
            return EchoReply(dst, seq, self.ttl, ICMP.size + len(data), 0.0)
        waiter = asyncio.get_running_loop().create_future()
        key = (ident & 0xFFFF, seq & 0xFFFF)
        self._echoes[key] = (dst, sent, waiter)
        try:
            mac = await self.resolve(dst, timeout)
            if mac is None:
                return None
            request = icmp_echo(ICMP_ECHO_REQUEST, *key, data)
            packet = ipv4_packet(self.ip, dst, PROTO_ICMP, request, ttl=self.ttl, ident=seq & 0xFFFF)
            try:
                await self.nic.send(ethernet(mac, self.nic.mac, ETH_IPV4, packet))
            except NicError:
                self.counters.tx_drops += 1
                return None
            self.counters.echo_requests_sent += 1
            left = sent + timeout - self.now()
            try:
                return await asyncio.wait_for(waiter, max(left, 0))
            except TimeoutError:
                return None
        finally:
            if self._echoes.get(key, (None, None, None))[2] is waiter:
                del self._echoes[key]
