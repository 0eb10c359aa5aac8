"""An open channel whose rings live in shared guest memory (docs/protocol.md §14): packets are written into and
read out of the real ``hv_ring_buffer`` pages, and only the channel's event crosses the socket, when due.

The asyncio face of ``vmbus_proto.shm_ring``, the same awaitable pipe as ``Channel``: Linux's
``vmbus_sendpacket*`` (write, signal on empty to non-empty), its channel callback (drain with interrupts
masked, unmask, re-check) and ``hv_pkt_iter_close`` (wake a blocked writer when its pending_send_sz is
crossed). GPA data is never sent: the host reads a request's pages and writes a completion's data straight
into the guest's memory, so a device sees ``Packet.data`` exactly as over a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, NoReturn

from ..envelope import Signal
from ..errors import FrameError, LocalProtocolError, ProtocolError
from ..packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType
from ..ring import RingReader, RingWriter
from ..shm_ring import W_MASK, W_PENDING, W_READ, W_WRITE, GuestPages, RingIn, RingOut, encode
from .channel import Channel, ChannelClosed

if TYPE_CHECKING:
    from .transport import FramedConnection

_COMP, _GPA_DIRECT = int(PacketType.COMP), int(PacketType.DATA_USING_GPA_DIRECT)
_INBAND = int(PacketType.DATA_INBAND)
_TRAILER = 8


class SharedRings:
    """``ChannelRings``' face for counters and the API: the two shared rings, and no data window (the data
    stays in guest memory)."""

    __slots__ = ("data_reader", "data_writer", "reader", "relid", "writer")

    def __init__(self, relid: int, writer: RingOut, reader: RingIn) -> None:
        self.relid = relid
        self.writer, self.reader = writer, reader
        self.data_writer, self.data_reader = RingWriter(8), RingReader(8)  # counts GPA data moved, holds none


class SharedChannel(Channel):
    """One open channel on shared rings. ``host``: this side is the parent (it moves GPA data in guest memory
    for the guest's requests); else the guest (its requests' data is already in its pages)."""

    shared = True

    def __init__(self, conn: FramedConnection, relid: int, out_ring: RingOut, in_ring: RingIn, pages: GuestPages,
                 *, host: bool, name: str = "", log: Any = None, trace: bool = False) -> None:
        """``trace``: log each event in and out with both rings' header fields (``--trace``)."""
        super().__init__(conn, relid, SharedRings(relid, out_ring, in_ring), name, log)  # type: ignore[arg-type]
        self.out_ring, self.in_ring, self.pages, self.host = out_ring, in_ring, pages, host
        self.trace = trace and log is not None
        self._queued = 0  # ring bytes of packets delivered to the queue and not yet taken by recv
        self._ranges: dict[int, tuple[GpaRange, ...]] = {}  # GPA ranges of requests awaiting their completion
        self._bounce: dict[int, memoryview] = {}  # dma() bounce buffers, copied back with the completion
        self.events_in = 0
        self.events_out = 0
        self._repoll = False  # a second look at the inbound ring is scheduled
        self._loop = asyncio.get_event_loop()

    @property
    def credit_bytes(self) -> int:
        return 0  # only events, 16 bytes each, ever leave for a shared channel

    # ---- receive ----------------------------------------------------------------------------------------

    def _arrive(self, pkt: Packet) -> None:
        raise FrameError(f"PACKET frame for channel {self.relid}, whose rings are in shared memory")

    def _on_signal(self, sig: Signal) -> None:
        raise FrameError(f"SIGNAL frame for channel {self.relid}, whose ring headers are in shared memory")

    def _on_event(self) -> None:
        """The peer's event: it wrote to our inbound ring when it was empty, or freed space we wait for."""
        self.events_in += 1
        if self.trace:
            self._trace("ring event in", "from the peer")
        self._poll()
        w = self._space_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _poll(self) -> None:
        if self.closed:
            return
        ring = self.in_ring
        budget = ring.size - self._queued  # what the queue may hold: one ring's worth, as a stream's credit
        if budget <= 0:
            ring.held = True
            return
        pkts, due = ring.read_batch(budget, linger=True)
        if due:
            self._event("pending_send_sz crossed")
        if pkts:
            ring.stats.interrupts += 1
            if not self._repoll:  # interrupts stay masked until one more look on the loop's next turn
                self._repoll = True
                self._loop.call_soon(self._poll_again)
        on_packet = self.on_packet
        if on_packet is not None and not self._pending and not self._ranges:
            for pkt in pkts:  # _route's end, straight to the driver: no future waits, no GPA ranges are held
                if pkt.type == _GPA_DIRECT:
                    self._route(pkt, pkt.size, 0)
                else:
                    on_packet(pkt)
            return
        for pkt in pkts:
            self._route(pkt, pkt.size, 0)

    def _poll_again(self) -> None:
        """The NAPI-style second look: packets written while we were busy came without an event; none means
        the ring is unmasked (and checked once more) before we sleep."""
        self._repoll = False
        with contextlib.suppress(ChannelClosed):  # (its rings were found broken: the connection is closing)
            self._checked_poll()

    def _checked_poll(self) -> None:
        """``_poll`` outside a frame's dispatch (a device's recv, the second look): a broken ring ends the
        connection here, as a bad frame would in the transport."""
        try:
            self._poll()
        except ProtocolError as exc:
            self._corrupt(exc)

    def _route(self, pkt: Packet, size: int, data: int) -> None:
        ptype = pkt.type
        if ptype == _COMP:
            if not self.host and self._ranges:  # our request's pages: what the host wrote is there
                ranges = self._ranges.pop(pkt.trans_id, None)
                if ranges is not None:
                    pkt.data = self.pages.read(ranges)
            fut = self._pending.pop(pkt.trans_id, None) if self._pending else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(pkt)
                return
        elif ptype == _GPA_DIRECT and self.host and pkt.flags & FLAG_COMPLETION_REQUESTED:
            self._ranges[pkt.trans_id] = pkt.ranges  # where the completion's data goes
        if self.on_packet is not None:
            self.on_packet(pkt)
            return
        self._queued += size
        self._queue.append(pkt)
        w = self._recv_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def dma(self, pkt: Packet) -> memoryview | None:
        """The guest pages ``pkt``'s GPA ranges name, as one buffer the device reads and writes in place: a view
        of the mapping when they are one run of consecutive pages, else a bounce buffer (swiotlb's way) filled
        from them now and copied back into them with the completion. A PacketError if a page is outside the
        guest's memory; None for a packet without ranges."""
        ranges = pkt.ranges
        if not ranges:
            return None
        if len(ranges) == 1:
            view = self.pages.slice(ranges[0])
            if view is not None:
                return view
        bounce = memoryview(bytearray(self.pages.read(ranges)))
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            self._bounce[pkt.trans_id] = bounce
        return bounce

    def moved(self, data_in: int = 0, data_out: int = 0) -> None:
        self.rings.data_reader.stats.bytes += data_in
        self.rings.data_writer.stats.bytes += data_out

    def _consume(self, pkt: Packet) -> None:
        self._queued -= pkt.size
        if self.in_ring.held and self._queued <= self.in_ring.size >> 1:
            self._checked_poll()

    def _corrupt(self, exc: ProtocolError) -> NoReturn:
        """The peer broke a ring in shared memory (found by a device's send or receive, not by a frame): its
        connection ends with the reason, and this device's call ends as on any close."""
        self.conn.fail(f"{type(exc).__name__}: {exc}")
        self.close()
        raise ChannelClosed(f"channel {self.relid} closed: {exc}")

    def recv_nowait(self) -> Packet | None:
        queue = self._queue
        if not queue:
            return None
        pkt = queue.popleft()
        self._consume(pkt)
        return pkt

    # ---- send -------------------------------------------------------------------------------------------

    def _event(self, why: str = "empty to non-empty") -> None:
        self.events_out += 1
        if self.trace:
            self._trace("ring event out", why)
        self.conn.send_event(self.relid)
        self.conn.flush()  # at once, not at the end of this turn: the peer starts on it while we go on

    def _trace(self, what: str, why: str) -> None:
        """One ``--trace`` line: the event and both rings' header fields as they stand (docs/protocol.md §14)."""
        fields: dict[str, Any] = {}
        for side, ring in (("in", self.in_ring.mem.words), ("out", self.out_ring.mem.words)):
            fields[side] = (f"w={ring[W_WRITE]} r={ring[W_READ]} mask={ring[W_MASK]} "
                            f"pending={ring[W_PENDING]}")
        self.log.info(what, why=why, **fields)

    def _prepare(self, pkt: Packet) -> bytes:
        """The packet's ring bytes; GPA data moves in guest memory instead of with the packet."""
        if self._bounce and pkt.type == _COMP:
            bounce = self._bounce.pop(pkt.trans_id, None)
            ranges = self._ranges.get(pkt.trans_id)
            if bounce is not None and ranges is not None:
                self.pages.write(ranges, bounce)
        if pkt.data:
            if self.host and pkt.type == _COMP:
                ranges = self._ranges.get(pkt.trans_id)
                if ranges is None:
                    raise LocalProtocolError(f"completion {pkt.trans_id:#x} with data answers no GPA-direct request")
                self.rings.data_writer.stats.bytes += self.pages.write(ranges, pkt.data)
            elif not self.host and pkt.ranges:
                data = pkt.data
                if not (isinstance(data, memoryview) and data.obj is self.pages.view.obj):
                    self.pages.write(pkt.ranges, data)  # (a VSC normally stages it there itself)
        if not self.host and pkt.ranges and pkt.flags & FLAG_COMPLETION_REQUESTED:
            self._ranges[pkt.trans_id] = pkt.ranges
        return encode(pkt)

    def _written(self, pkt: Packet, due: bool) -> None:
        if self.host and pkt.type == _COMP:
            self._ranges.pop(pkt.trans_id, None)
        if due:
            self._event()

    def try_send(self, pkt: Packet) -> bool:
        if not (pkt.data or pkt.ranges or pkt.xfer_ranges or self._ranges):  # nothing in guest memory to move
            return self.try_sendpacket(pkt.payload, pkt.trans_id, pkt.type, pkt.flags)
        if self.closed or self._blocked_writers:
            return False
        try:
            due = self.out_ring.write(self._prepare(pkt))
        except ProtocolError as exc:
            self._corrupt(exc)
        if due is None:
            return False
        self._written(pkt, due)
        return True

    def try_sendpacket(self, payload: bytes, trans_id: int, ptype: int = _INBAND, flags: int = 0) -> bool:
        if self.closed or self._blocked_writers:
            return False
        if self._ranges:  # a completion may answer a GPA-direct request whose ranges it must forget
            return super().try_sendpacket(payload, trans_id, ptype, flags)
        try:
            due = self.out_ring.write_inband(ptype, flags, trans_id, payload)
        except ProtocolError as exc:
            self._corrupt(exc)
        if due is None:
            return False
        if due:
            self._event()
        return True

    async def send(self, pkt: Packet) -> None:
        try:
            await self._send(pkt)
        except ProtocolError as exc:
            self._corrupt(exc)

    async def _send(self, pkt: Packet) -> None:
        if self.closed:  # (before _prepare: the close forgot the GPA ranges a late completion would look up)
            raise ChannelClosed(f"channel {self.relid} closed")
        raw = self._prepare(pkt)
        if not self.out_ring.fits_ever(len(raw) + _TRAILER):
            raise LocalProtocolError(f"a {len(raw) + _TRAILER}-byte packet can never fit a "
                                     f"{self.out_ring.size}-byte ring")
        if not self._blocked_writers:
            due = self.out_ring.write(raw)
            if due is not None:
                self._written(pkt, due)
                return
        self._blocked_writers += 1
        try:
            async with self._send_lock:
                await self._write_blocked(pkt, raw)
        finally:
            self._blocked_writers -= 1

    async def _write_blocked(self, pkt: Packet, raw: bytes) -> None:
        ring = self.out_ring
        while (due := ring.write(raw)) is None:
            if self.closed:
                raise ChannelClosed(f"channel {self.relid} closed")
            if ring.block(len(raw) + _TRAILER):
                continue  # the reader freed space between our write and our pending_send_sz
            self._space_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._space_waiter
            finally:
                self._space_waiter = None
        ring.unblock()
        if self.closed:
            raise ChannelClosed(f"channel {self.relid} closed")
        self._written(pkt, due)

    def close(self) -> None:
        super().close()
        self._ranges.clear()
        self._bounce.clear()

