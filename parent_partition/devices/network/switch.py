"""The parent's virtual switch: an L2 learning switch joining every partition's NIC (and optionally a TAP).

Mirrors what Hyper-V's vmswitch does for synthetic NICs (and any 802.1D transparent bridge): source MACs are
learned per port with aging, known unicast goes to one port, broadcast, multicast and unknown unicast are
flooded to every other port, and frames over the MTU are dropped. No VMBus here: a port is a pair of queues
the NetVSP device (or a TAP forwarder) feeds and drains.

Memory is bounded everywhere: each port's outbound queue has a frame and a byte limit (a full queue drops the
frame and counts it, forwarding never awaits a slow port), and the MAC table has a size limit (a port that
sends from many MACs cannot grow it without bound).

A partition's port drops frames whose source MAC is not its NIC's (``drops['mac_spoofed']``), as a Hyper-V
vSwitch does unless MAC address spoofing is enabled for that vNIC (``[network] mac_spoofing``).

Large segments (LSO on transmit, RSC on receive, GSO/GRO on a TAP with virtio-net headers) travel as one
frame of up to 64 KiB with their offload metadata (``vnet.VnetHdr``) beside it, between ports whose
``max_frame`` allows them; towards a port that cannot take them a TCP segment is cut into MTU-sized frames in
software (``vnet.segment_tcp``) and anything else too large is dropped and counted.

MAC addresses: ``mac_for(partition)`` gives each partition name a stable address (see its docstring).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import NamedTuple

from vmbus_proto.aio.tap import Tap
from vmbus_proto.devices.network import vnet

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_8021Q = 0x8100
# The largest frame a port may declare: a 64 KiB IP datagram (LSO/GSO/RSC) behind an 802.1Q-tagged header.
MAX_LARGE_FRAME = 65535 + ETH_HLEN + VLAN_HLEN
BROADCAST = b"\xff" * 6
# Microsoft's OUI, the prefix of Hyper-V's dynamic MAC pool (00:15:5D:xx:yy:zz).
HYPERV_OUI = b"\x00\x15\x5d"


def mac_for(partition: str, style: str = "local") -> bytes:
    """A stable unicast MAC address for a partition name, from its SHA-256.

    ``style="local"`` (the default): a locally administered address, ``02:`` and 40 bits of the hash. That is
    the address class reserved for software-assigned MACs, so it can never clash with a real NIC's, and 40
    bits keep collisions negligible (about 1 in 2 million for a thousand partitions on one switch).
    ``style="hyperv"``: ``00:15:5d:`` and 24 bits of the hash, as Hyper-V's dynamic MACs look. It is
    Microsoft's registered OUI (a real Hyper-V VM on a bridged LAN may hold the same address) and 24 bits
    collide for about 3 % of thousand-partition switches; the switch refuses a second port with a MAC already
    attached, so a collision is an error at attach, never silent misdelivery.
    """
    digest = hashlib.sha256(partition.encode("utf-8")).digest()
    if style == "local":
        return b"\x02" + digest[:5]
    if style == "hyperv":
        return HYPERV_OUI + digest[:3]
    raise ValueError(f"unknown MAC style {style!r} (expected 'local' or 'hyperv')")


def parse_mac(text: str) -> bytes:
    """``'02:00:5e:10:00:01'`` (or with ``-``) to six bytes; ValueError says what is wrong."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r}: expected six two-digit hex groups like 02:00:5e:10:00:01")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r}: not hexadecimal") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address; a NIC needs a unicast one")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Frame(NamedTuple):
    """An Ethernet frame (destination MAC first, no FCS) and its checksum/GSO metadata, if any."""

    data: bytes
    offload: vnet.VnetHdr | None = None


class PortDetached(RuntimeError):
    """The port was detached from its switch: it neither sends nor receives any more."""


@dataclasses.dataclass
class PortCounters:
    """``rx``: frames the port's owner handed to the switch; ``tx``: frames the switch queued for the owner."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_flooded: int = 0  # of rx_frames, those sent to every other port (broadcast, multicast, unknown unicast)
    # Ingress: runt (< 14 bytes), oversize (over the MTU / the port's max_frame), bad_source (multicast source),
    # mac_spoofed (a source MAC not the port's NIC's, unless [network] mac_spoofing).
    # Egress: queue_full (the owner is not taking frames), too_big (over the receiving port's max_frame).
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class SwitchCounters:
    frames: int = 0            # frames accepted at ingress
    unicast: int = 0           # forwarded to the one port their destination was learned on
    flooded: int = 0           # broadcast, multicast or unknown unicast sent to every other port
    filtered: int = 0          # destination learned on the port the frame came from: not sent back
    segmented: int = 0         # large TCP segments cut into MTU-sized frames for a port that cannot take them
    learned: int = 0
    moved: int = 0             # a MAC seen on another port than the one it was learned on
    aged_out: int = 0
    table_full: int = 0        # sources not learned because the table was full
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


def counters_dict(c: PortCounters | SwitchCounters) -> dict[str, object]:
    """A counters dataclass as plain data (its drop Counter as a dict)."""
    return {**{f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "drops"},
            "drops": dict(c.drops)}


#: Every reason a port's frames are dropped: where each is counted is in :class:`PortCounters`.
DROP_REASONS = ("queue_full", "too_big", "oversize", "runt", "bad_source", "mac_spoofed")


def port_fields(c: PortCounters) -> dict[str, int]:
    """A port's counters as flat log fields, every drop reason included (0 when none): ``port_`` says the
    switch counted them (``rx``: from the partition into the switch, ``tx``: from the switch to it)."""
    return {"port_rx_frames": c.rx_frames, "port_rx_bytes": c.rx_bytes, "port_tx_frames": c.tx_frames,
            "port_tx_bytes": c.tx_bytes, "port_rx_flooded": c.rx_flooded,
            **{f"port_dropped_{reason}": c.drops[reason] for reason in DROP_REASONS}}


class _Entry:
    __slots__ = ("port", "seen", "static")

    def __init__(self, port: Port, seen: float, static: bool) -> None:
        self.port = port
        self.seen = seen
        self.static = static


class Port:
    """One switch port: ``send``/``send_nowait`` into the switch, ``recv``/``recv_batch`` what it forwards here.

    The outbound queue is bounded (``queue_frames`` and ``queue_bytes``); frames arriving for a full queue
    are dropped and counted (``counters.drops['queue_full']``). One consumer at a time may wait on it.
    """

    def __init__(self, switch: Switch, name: str, mac: bytes, max_frame: int, queue_frames: int,
                 queue_bytes: int, spoof_check: bool = False) -> None:
        self.switch = switch
        self.name = name
        self.mac = mac
        self.spoof_check = spoof_check  # frames from another source MAC are dropped
        self.trunk = False  # the switch of another worker process (trunk.py): never forwarded to another trunk
        self.max_frame = max_frame
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.counters = PortCounters()
        self.attached = True
        self._queue: collections.deque[Frame] = collections.deque()
        self._queued_bytes = 0
        self._ready = asyncio.Event()
        self._wakeup: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<Port {self.name} {format_mac(self.mac)}>"

    @property
    def large(self) -> bool:
        """Whether this port sends and accepts frames larger than the switch's MTU (large segments)."""
        return self.max_frame > self.switch.mtu + ETH_HLEN + VLAN_HLEN

    # -- into the switch ---------------------------------------------------------------------------------
    def send_nowait(self, frame: bytes, offload: vnet.VnetHdr | None = None) -> bool:
        """Hand one frame to the switch; False when it was dropped at ingress (counted). Never blocks."""
        if not self.attached:
            raise PortDetached(f"port {self.name} is detached")
        return self.switch._ingress(self, frame, offload)

    async def send(self, frame: bytes, offload: vnet.VnetHdr | None = None) -> bool:
        """As ``send_nowait``: the switch never waits for a receiving port, so neither does the sender."""
        return self.send_nowait(frame, offload)

    # -- out of the switch -------------------------------------------------------------------------------
    def set_wakeup(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (synchronously, from forwarding) whenever the empty queue gets a frame."""
        self._wakeup = callback

    def pending(self) -> int:
        return len(self._queue)

    def recv_nowait(self, max_frames: int = 64) -> list[Frame]:
        """Up to ``max_frames`` queued frames, oldest first; an empty list when none are waiting."""
        q = self._queue
        n = min(max_frames, len(q))
        out = [q.popleft() for _ in range(n)]
        self._queued_bytes -= sum(len(f.data) for f in out)
        if not q:
            self._ready.clear()
        return out

    async def recv_batch(self, max_frames: int = 64) -> list[Frame]:
        """Wait for at least one frame, then return up to ``max_frames``. Raises PortDetached after detach."""
        while not self._queue:
            if not self.attached:
                raise PortDetached(f"port {self.name} is detached")
            await self._ready.wait()
        return self.recv_nowait(max_frames)

    async def recv(self) -> Frame:
        """The next frame forwarded to this port (waits for one)."""
        return (await self.recv_batch(1))[0]

    def detach(self) -> None:
        """Leave the switch: learned MACs are forgotten, queued frames discarded, waiting receivers woken."""
        self.switch._detach(self)

    def _enqueue(self, frame: Frame) -> None:
        size = len(frame.data)
        c = self.counters
        if len(self._queue) >= self.queue_frames or self._queued_bytes + size > self.queue_bytes:
            c.drops["queue_full"] += 1
            self.switch.counters.drops["queue_full"] += 1
            return
        was_empty = not self._queue
        self._queue.append(frame)
        self._queued_bytes += size
        c.tx_frames += 1
        c.tx_bytes += size
        if was_empty:
            self._ready.set()
            if self._wakeup is not None:
                self._wakeup()


class Switch:
    """An L2 learning switch. ``clock`` (seconds, monotonic) drives aging; tests pass one they control."""

    def __init__(self, *, mtu: int = 1500, aging_s: float = 300.0, max_macs: int = 8192,
                 queue_frames: int = 1024, queue_bytes: int = 4 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu}: expected 68..65535")
        if aging_s <= 0 or max_macs < 1 or queue_frames < 1 or queue_bytes < MAX_LARGE_FRAME:
            raise ValueError("aging_s must be > 0, max_macs and queue_frames >= 1, "
                             f"queue_bytes >= {MAX_LARGE_FRAME} (one largest frame)")
        self.mtu = mtu
        self.aging_s = aging_s
        self.max_macs = max_macs
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.clock = clock
        self.counters = SwitchCounters()
        self.ports: dict[str, Port] = {}
        self._table: dict[bytes, _Entry] = {}

    # -- ports -------------------------------------------------------------------------------------------
    def attach(self, name: str, mac: bytes | None = None, *, max_frame: int | None = None,
               queue_frames: int | None = None, queue_bytes: int | None = None,
               spoof_check: bool = False) -> Port:
        """A new port named ``name`` (unique) whose owner's MAC is ``mac`` (default ``mac_for(name)``).

        ``max_frame``: the largest frame the port sends and accepts, Ethernet header included; default the
        MTU plus a tagged header; up to ``MAX_LARGE_FRAME`` for a port that carries large segments.
        The port's own MAC is known from the start (a static table entry, as Hyper-V knows a vNIC's MAC).
        ``spoof_check``: frames sent from any other source MAC are dropped (a vNIC without MAC spoofing).
        """
        if name in self.ports:
            raise ValueError(f"switch port {name!r} is already attached")
        mac = mac_for(name) if mac is None else bytes(mac)
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"port {name!r}: MAC {mac.hex(':')} is not a unicast 6-byte address")
        entry = self._table.get(mac)
        if entry is not None and entry.static:
            raise ValueError(f"port {name!r}: MAC {format_mac(mac)} is already port {entry.port.name!r}'s")
        standard = self.mtu + ETH_HLEN + VLAN_HLEN
        max_frame = standard if max_frame is None else max_frame
        if not standard <= max_frame <= MAX_LARGE_FRAME:
            raise ValueError(f"port {name!r}: max_frame {max_frame} outside {standard}..{MAX_LARGE_FRAME}")
        port = Port(self, name, mac, max_frame, queue_frames or self.queue_frames, queue_bytes or self.queue_bytes,
                    spoof_check)
        self.ports[name] = port
        self._table[mac] = _Entry(port, self.clock(), static=True)
        return port

    def _detach(self, port: Port) -> None:
        if not port.attached:
            return
        port.attached = False
        del self.ports[port.name]
        for mac in [m for m, e in self._table.items() if e.port is port]:
            del self._table[mac]
        port._queue.clear()
        port._queued_bytes = 0
        port._ready.set()  # a receiver waiting sees the detach

    # -- the MAC table -----------------------------------------------------------------------------------
    def lookup(self, mac: bytes) -> Port | None:
        """The port ``mac`` was learned on, None when unknown or aged out."""
        entry = self._table.get(mac)
        if entry is None:
            return None
        if not entry.static and self.clock() - entry.seen > self.aging_s:
            del self._table[mac]
            self.counters.aged_out += 1
            return None
        return entry.port

    def expire(self) -> int:
        """Forget every learned entry older than the aging time now; returns how many went."""
        now = self.clock()
        old = [m for m, e in self._table.items() if not e.static and now - e.seen > self.aging_s]
        for mac in old:
            del self._table[mac]
        self.counters.aged_out += len(old)
        return len(old)

    def table(self) -> dict[str, str]:
        """MAC (text) to port name, for diagnostics."""
        return {format_mac(m): e.port.name for m, e in self._table.items()}

    def _learn(self, src: bytes, port: Port, now: float) -> None:
        entry = self._table.get(src)
        if entry is not None:
            if entry.port is not port and not entry.static:
                entry.port = port
                self.counters.moved += 1
            entry.seen = now
            return
        if len(self._table) >= self.max_macs and self.expire() == 0:
            self.counters.table_full += 1
            return
        self._table[src] = _Entry(port, now, static=False)
        self.counters.learned += 1

    # -- forwarding --------------------------------------------------------------------------------------
    def _ingress(self, port: Port, data: bytes, offload: vnet.VnetHdr | None) -> bool:
        size = len(data)
        pc = port.counters
        if size < ETH_HLEN:
            return self._drop_in(port, "runt")
        if not self._fits(port, data):
            return self._drop_in(port, "oversize")
        src = data[6:12]
        if src[0] & 1:
            return self._drop_in(port, "bad_source")
        if port.spoof_check and src != port.mac:
            return self._drop_in(port, "mac_spoofed")
        pc.rx_frames += 1
        pc.rx_bytes += size
        self.counters.frames += 1
        self._learn(src, port, self.clock())
        frame = Frame(data, offload)
        dst = data[:6]
        if not dst[0] & 1:
            out = self.lookup(dst)
            if out is not None:
                if out is port or (out.trunk and port.trunk):  # split horizon: every worker has its own trunk
                    self.counters.filtered += 1
                else:
                    self.counters.unicast += 1
                    self._egress(out, frame)
                return True
        self.counters.flooded += 1
        pc.rx_flooded += 1
        for other in list(self.ports.values()):
            if other is not port and not (other.trunk and port.trunk):
                self._egress(other, frame)
        return True

    def _fits(self, port: Port, data: bytes) -> bool:
        """Within the port's limit: MTU + 14 (+ 4 when 802.1Q-tagged), or its max_frame for a large port."""
        size = len(data)
        if port.large:
            return size <= port.max_frame
        limit = self.mtu + ETH_HLEN
        return size <= limit or (size <= limit + VLAN_HLEN and data[12] == 0x81 and data[13] == 0x00)

    def _drop_in(self, port: Port, reason: str) -> bool:
        port.counters.drops[reason] += 1
        self.counters.drops[reason] += 1
        return False

    def _egress(self, port: Port, frame: Frame) -> None:
        if self._fits(port, frame.data):
            port._enqueue(frame)
            return
        # A large segment for a port that cannot take it: cut a TCP one into MTU-sized frames, drop the rest.
        hdr = frame.offload
        if hdr is not None and hdr.gso_type & ~vnet.GSO_ECN in (vnet.GSO_TCPV4, vnet.GSO_TCPV6):
            try:
                segments = vnet.segment_tcp(frame.data, hdr, self.mtu)
            except ValueError:
                segments = []
            if segments:
                self.counters.segmented += 1
                for seg in segments:
                    port._enqueue(Frame(seg))
                return
        port.counters.drops["too_big"] += 1
        self.counters.drops["too_big"] += 1

    def stats(self) -> dict[str, object]:
        """Switch-wide and per-port counters, and the table size, as plain data."""
        return {"switch": counters_dict(self.counters), "macs": len(self._table),
                "ports": {n: {"mac": format_mac(p.mac), "queued": p.pending(), **counters_dict(p.counters)}
                          for n, p in self.ports.items()}}


class TapUplink:
    """A TAP device as a switch port (Hyper-V's external virtual switch: the host's own stack on the switch).

    Frames the kernel sends on the TAP enter the switch with their virtio-net metadata (a port taking
    large segments when the TAP has virtio-net headers); frames forwarded to the port are written to the TAP
    as soon as they arrive (from forwarding itself, no task hop). The TAP's MAC is the port's.
    """

    def __init__(self, switch: Switch, tap: Tap, name: str | None = None, batch: int = 64) -> None:
        self.tap = tap
        self.port = switch.attach(name or f"tap:{tap.name}", tap.mac(),
                                  max_frame=MAX_LARGE_FRAME if tap.vnet_hdr else None)
        self.port.set_wakeup(self._flush)
        tap.start(self._from_tap, batch)

    def _from_tap(self, frames: list[tuple[vnet.VnetHdr, bytes]]) -> None:
        send = self.port.send_nowait
        for hdr, frame in frames:
            send(frame, None if hdr == vnet.NO_OFFLOAD else hdr)

    def _flush(self) -> None:
        write = self.tap.write
        while frames := self.port.recv_nowait(256):
            for f in frames:
                write(f.data, f.offload)

    def close(self) -> None:
        """Stop reading the TAP and leave the switch (the TAP itself stays open: its owner closes it)."""
        self.tap.stop()
        self.port.detach()
