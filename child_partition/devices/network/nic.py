"""The guest's network interface: what a Linux ``net_device`` offers the stack above it (``ndo_start_xmit``
with queue stop/wake for transmit, ``netif_receive_skb`` for receive, carrier on/off for the link), as an
async Python API.

:class:`Nic` is the API. A device driver (the NetVSC, or :class:`LoopNic` here) subclasses it and
implements one method, :meth:`Nic._transmit`; it hands received frames in with :meth:`Nic.deliver`, reports
carrier changes with :meth:`Nic.set_link` and wakes blocked senders with :meth:`Nic.tx_room`. Everything
above (the guest stack, ping, a TAP bridge) uses only the public methods.

Frames are whole Ethernet frames without the FCS: 14-byte header, then up to ``mtu`` bytes of payload
(18 with an 802.1Q tag). A frame may carry offload metadata, a ``vnet.VnetHdr`` as a TAP's virtio-net header
gives it (``skb->ip_summed`` and ``gso_size`` in Linux): on transmit a checksum left for the device
(``NEEDS_CSUM``) or a TCP segment of up to 64 KiB to cut (GSO); on receive a checksum already verified
(``DATA_VALID``) or a coalesced TCP segment. ``send``/``send_nowait`` take it as ``offload=``,
:meth:`Nic.recv_batch_meta` returns it; the plain ``recv``/``recv_batch`` give the bytes only. A device
without offloads (``_transmit_offload`` not overridden) gets checksums completed and segments cut in software.

:class:`LoopHub` joins any number of :class:`LoopNic` back to back in memory, like a hub: every frame
goes to every other port. It is for tests and the demo's unit tests.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vmbus_proto.devices.network import vnet

ETH_HEADER = 14
VLAN_TAG = 4
DEFAULT_MTU = 1500
DEFAULT_QUEUE = 256
MAX_GSO_FRAME = 65535 + ETH_HEADER + VLAN_TAG  # a 64 KiB IP datagram behind a tagged header

Offload = vnet.VnetHdr | None


class NicError(Exception):
    """The NIC cannot carry the frame (its link is down, or it has been closed)."""


class LinkDown(NicError):
    """Sending while the link is down (no carrier)."""


class NicClosed(NicError):
    """Using a NIC after it was closed (its device went away)."""


@dataclass
class NicCounters:
    """Per-interface counters, as ``ip -s link`` shows them."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0


LinkListener = Callable[[bool], None]


class Nic(ABC):
    """One network interface. Frames are ``bytes``; the receive queue is bounded and counts its drops."""

    def __init__(self, mac: bytes, mtu: int = DEFAULT_MTU, *, rx_queue: int = DEFAULT_QUEUE) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        if mtu < 68:
            raise ValueError(f"MTU {mtu} is below IPv4's minimum of 68")
        self.mac = bytes(mac)
        self.mtu = mtu
        self.counters = NicCounters()
        self._link_up = False
        self._closed = False
        self._rx: deque[tuple[bytes, Offload]] = deque()
        self._rx_limit = rx_queue
        self._rx_ready = asyncio.Event()
        self._tx_room = asyncio.Event()
        self._link_changed = asyncio.Event()
        self._listeners: list[LinkListener] = []

    # -- state -------------------------------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return self._link_up and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_frame(self) -> int:
        """Longest frame :meth:`send` takes: header + MTU + one 802.1Q tag."""
        return ETH_HEADER + VLAN_TAG + self.mtu

    def on_link_change(self, listener: LinkListener) -> Callable[[], None]:
        """Call ``listener(up)`` on every carrier change; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def wait_link(self, up: bool = True) -> None:
        """Wait until the link is ``up`` (or down); raises :class:`NicClosed` if the NIC closes first."""
        while self.link_up != up:
            self._check_open()
            self._link_changed.clear()
            await self._link_changed.wait()

    # -- transmit ----------------------------------------------------------------------------------------------

    def send_nowait(self, frame: bytes, offload: Offload = None) -> bool:
        """Queue ``frame`` for transmit; False when the device has no room now (nothing is counted then).
        ``offload``: its checksum/GSO metadata (a GSO frame may be up to 64 KiB). Raises
        :class:`LinkDown`/:class:`NicClosed`, or ValueError for a frame no Ethernet carries."""
        self._check_open()
        if not self._link_up:
            raise LinkDown("the link is down (no carrier)")
        limit = MAX_GSO_FRAME if offload is not None and offload.gso else self.max_frame
        if not ETH_HEADER <= len(frame) <= limit:
            raise ValueError(f"a {len(frame)}-byte frame does not fit Ethernet with MTU {self.mtu} "
                             f"({ETH_HEADER}-{limit} bytes)")
        if not (self._transmit(frame) if offload is None else self._transmit_offload(frame, offload)):
            return False
        self.counters.tx_frames += 1
        self.counters.tx_bytes += len(frame)
        return True

    async def send(self, frame: bytes, offload: Offload = None) -> None:
        """Transmit ``frame``, waiting for room in the device's queue; raises as :meth:`send_nowait`, also
        when the link goes down while waiting."""
        while not self.send_nowait(frame, offload):
            self._tx_room.clear()
            await self._tx_room.wait()

    # -- receive -----------------------------------------------------------------------------------------------

    async def _wait_rx(self) -> None:
        while not self._rx:
            self._check_open()
            self._rx_ready.clear()
            await self._rx_ready.wait()

    async def recv(self) -> bytes:
        """The next received frame; waits for one. Raises :class:`NicClosed` once closed and drained."""
        await self._wait_rx()
        return self._rx.popleft()[0]

    async def recv_batch(self, max_frames: int = 64) -> list[bytes]:
        """At least one and at most ``max_frames`` received frames (what NAPI polls in one go)."""
        return [frame for frame, _ in await self.recv_batch_meta(max_frames)]

    async def recv_batch_meta(self, max_frames: int = 64) -> list[tuple[bytes, Offload]]:
        """As :meth:`recv_batch`, each frame with its receive offload metadata (None when there is none)."""
        await self._wait_rx()
        rx = self._rx
        return [rx.popleft() for _ in range(min(max_frames, len(rx)))]

    def close(self) -> None:
        """The device went away: the link goes down, senders and receivers get :class:`NicClosed`."""
        if self._closed:
            return
        was_up = self.link_up
        self._closed = True
        self._wake_all()
        if was_up:
            self._notify(False)

    # -- for the device driver -----------------------------------------------------------------------------------

    @abstractmethod
    def _transmit(self, frame: bytes) -> bool:
        """Hand one valid frame to the device; False when it has no room (call :meth:`tx_room` later)."""

    def _transmit_offload(self, frame: bytes, offload: vnet.VnetHdr) -> bool:
        """A frame with offload metadata. This default is a device without offloads: the checksum completed,
        a TCP GSO frame cut into MTU-sized segments (all or none of them find room now; a segment the device
        refuses after the first is a counted drop); other GSO frames are dropped (counted)."""
        if not offload.gso:
            return self._transmit(vnet.complete(frame, offload))
        try:
            segments = vnet.segment_tcp(frame, offload, self.mtu)
        except ValueError:
            self.counters.tx_drops += 1
            return True
        if not self._transmit(segments[0]):
            return False
        for seg in segments[1:]:
            if not self._transmit(seg):
                self.counters.tx_drops += 1
        return True

    def deliver(self, frame: bytes, offload: Offload = None) -> bool:
        """A frame arrived from the wire (with its receive offload metadata). False (and a counted drop)
        when the queue is full, the link is down or the NIC is closed."""
        if not self.link_up or len(self._rx) >= self._rx_limit:
            self.counters.rx_drops += 1
            return False
        self._rx.append((frame, offload))
        self.counters.rx_frames += 1
        self.counters.rx_bytes += len(frame)
        self._rx_ready.set()
        return True

    def tx_room(self) -> None:
        """The device has room again: wake senders blocked in :meth:`send`."""
        self._tx_room.set()

    def set_link(self, up: bool) -> None:
        """Carrier on or off (RNDIS media connect status). Listeners run only on a change."""
        if self._closed or up == self._link_up:
            return
        self._link_up = up
        self._wake_all()
        self._notify(up)

    def _wake_all(self) -> None:
        self._link_changed.set()
        self._tx_room.set()
        self._rx_ready.set()

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            listener(up)

    def _check_open(self) -> None:
        if self._closed:
            raise NicClosed("the NIC is closed")


class LoopNic(Nic):
    """A NIC on a :class:`LoopHub`. Transmitted frames wait in a bounded queue that the hub empties on the
    next turn of the event loop, so a burst larger than ``tx_queue`` makes :meth:`send` wait as on a
    real device."""

    def __init__(self, hub: LoopHub, mac: bytes, *, rx_queue: int, tx_queue: int) -> None:
        super().__init__(mac, hub.mtu, rx_queue=rx_queue)
        self._hub = hub
        self._tx: deque[bytes] = deque()
        self._tx_limit = tx_queue

    def _transmit(self, frame: bytes) -> bool:
        if len(self._tx) >= self._tx_limit:
            return False
        self._tx.append(frame)
        self._hub.schedule_flush()
        return True

    def take_tx(self) -> list[bytes]:
        """The frames queued for transmit (the hub's side)."""
        frames = list(self._tx)
        self._tx.clear()
        if frames:
            self.tx_room()
        return frames

    def close(self) -> None:
        super().close()
        self._hub.detach(self)


class LoopHub:
    """An in-memory hub: every frame a port sends is delivered to every other port whose link is up
    (each port counts its own receive drops). Ports start with their link up."""

    def __init__(self, mtu: int = DEFAULT_MTU) -> None:
        self.mtu = mtu
        self.ports: list[LoopNic] = []
        self._flush_scheduled = False

    def attach(self, mac: bytes, *, rx_queue: int = DEFAULT_QUEUE, tx_queue: int = DEFAULT_QUEUE,
               link_up: bool = True) -> LoopNic:
        nic = LoopNic(self, mac, rx_queue=rx_queue, tx_queue=tx_queue)
        self.ports.append(nic)
        nic.set_link(link_up)
        return nic

    def detach(self, nic: LoopNic) -> None:
        if nic in self.ports:
            self.ports.remove(nic)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for sender in list(self.ports):
            for frame in sender.take_tx():
                for port in self.ports:
                    if port is not sender:
                        port.deliver(frame)


def nic_pair(mac_a: bytes, mac_b: bytes, *, mtu: int = DEFAULT_MTU, rx_queue: int = DEFAULT_QUEUE,
             tx_queue: int = DEFAULT_QUEUE) -> tuple[LoopNic, LoopNic]:
    """Two NICs joined back to back (a hub with two ports)."""
    hub = LoopHub(mtu)
    return (hub.attach(mac_a, rx_queue=rx_queue, tx_queue=tx_queue),
            hub.attach(mac_b, rx_queue=rx_queue, tx_queue=tx_queue))
