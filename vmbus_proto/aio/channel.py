"""An open VMBus channel as an awaitable pipe: send and receive ring packets with real ring flow control.

The asyncio face of ``vmbus_proto.channel.ChannelRings``. It plays the role of Linux's
``vmbus_sendpacket*`` / ``hv_pkt_iter_*`` pair (drivers/hv/channel.c, ring_buffer.c) and of OpenVMM's
``vmbus_async`` queue: a sender that lacks ring space sets pending_send_sz and waits; a receiver
consumes packets and returns credit.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..channel import ChannelRings
from ..envelope import Signal
from ..errors import FrameError, LocalProtocolError
from ..packets import FLAG_COMPLETION_REQUESTED, Buffer, GpaRange, Packet, PacketType

if TYPE_CHECKING:
    from .transport import FramedConnection

_INBAND, _GPA_DIRECT = int(PacketType.DATA_INBAND), int(PacketType.DATA_USING_GPA_DIRECT)
_COMP = int(PacketType.COMP)
TRANS_ID_MAX = (1 << 64) - 5  # above are Linux's special ids (VMBUS_RQST_ERROR and friends)


class ChannelClosed(Exception):
    """The channel was closed (by either side, or its connection was lost)."""


class Channel:
    """One open channel on a connection."""

    shared = False  # rings and GPA data in shared guest memory (``vmbus_proto.aio.shared.SharedChannel``)

    def __init__(self, conn: FramedConnection, relid: int, rings: ChannelRings, name: str = "",
                 log: Any = None) -> None:
        self.conn = conn
        self.relid = relid
        self.rings = rings
        self.name = name
        self.log = log
        self.closed = False
        self._queue: collections.deque[Packet] = collections.deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._space_waiter: asyncio.Future[None] | None = None
        self._send_lock = asyncio.Lock()
        self._blocked_writers = 0  # senders in (or queued for) the blocked path
        self._next_trans = 1
        self._pending: dict[int, asyncio.Future[Packet]] = {}
        self.on_packet: Callable[[Packet], None] | None = None  # optional push-style delivery

    @property
    def credit_bytes(self) -> int:
        """Output this channel's credit can explain: each packet's frame at most twice its ring size, plus the
        peer's data window (``FramedConnection.write_limit``)."""
        return 2 * self.rings.writer.data_size + self.rings.data_writer.data_size

    def dma(self, pkt: Packet) -> memoryview | None:
        """The guest pages ``pkt``'s GPA range names, mapped, when the rings are in shared memory (a device
        reads and writes them in place); None over a stream, where the data travels as ``pkt.data``."""
        return None

    def moved(self, data_in: int = 0, data_out: int = 0) -> None:
        """A device moved GPA data in guest memory itself (shared memory: ``dma``): count it as the data a stream
        would have carried. Over a stream the rings count what travels, so this does nothing."""

    def _on_event(self) -> None:
        raise FrameError(f"EVENT frame for channel {self.relid}, whose rings travel as frames")

    # ---- receive ----------------------------------------------------------------------------------------

    def _arrive(self, pkt: Packet) -> None:
        """A PACKET frame for this channel: charged to the inbound ring (RingOverrunError if the peer broke
        its credit), then delivered."""
        size, data = pkt.size or pkt.ring_size, len(pkt.data)  # (the envelope sets size as it decodes)
        if data:
            self.rings.arrive(size, data)
        else:
            self.rings.reader.arrive(size)  # ChannelRings.arrive without a data window to charge
        self._route(pkt, size, data)

    def _deliver(self, pkt: Packet) -> None:
        """A packet arrived (called by the connection after the ring accepted it)."""
        self._route(pkt, pkt.ring_size, len(pkt.data))

    def _route(self, pkt: Packet, size: int, data: int) -> None:
        """A completion to its waiting request, else to ``on_packet`` or the queue ``recv`` reads."""
        if pkt.type == _COMP and self._pending:
            fut = self._pending.pop(pkt.trans_id, None)
            if fut is not None:
                sig = self.rings.consume(size, data)
                if sig is not None:
                    self.conn.send_signal(self.relid, sig)
                if not fut.done():
                    fut.set_result(pkt)
                return
        if self.on_packet is not None:
            self._consume(pkt)
            self.on_packet(pkt)
            return
        self._queue.append(pkt)
        w = self._recv_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _consume(self, pkt: Packet) -> None:
        sig = self.rings.consume(pkt.size or pkt.ring_size, len(pkt.data))
        if sig is not None:
            self.conn.send_signal(self.relid, sig)

    async def recv(self) -> Packet:
        while not self._queue:
            if self.closed:
                raise ChannelClosed(f"channel {self.relid} closed")
            self._recv_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        pkt = self._queue.popleft()
        self._consume(pkt)
        return pkt

    def recv_nowait(self) -> Packet | None:
        queue = self._queue
        if not queue:
            return None
        pkt = queue.popleft()
        sig = self.rings.consume(pkt.size or pkt.ring_size, len(pkt.data))  # _consume, inline: once a packet
        if sig is not None:
            self.conn.send_signal(self.relid, sig)
        return pkt

    # ---- send -------------------------------------------------------------------------------------------

    def _on_signal(self, sig: Signal) -> None:
        credit = self.rings.on_signal(sig)
        if credit is not None:
            self.conn.send_signal(self.relid, credit)
        w = self._space_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def try_send(self, pkt: Packet) -> bool:
        """Write ``pkt`` now if the ring has room and no writer is waiting; False means ``await send(pkt)``."""
        if self.closed or self._blocked_writers:
            return False
        data = len(pkt.data)
        # ChannelRings.try_send; without data there is only the ring to charge
        if not (self.rings.try_send(pkt.ring_size, data) if data else self.rings.writer.try_write(pkt.ring_size)):
            return False
        self.conn.send_packet(self.relid, pkt)
        return True

    def try_sendpacket(self, payload: bytes, trans_id: int, ptype: int = _INBAND, flags: int = 0) -> bool:
        """``try_send`` of an in-band packet or completion given as its fields (Linux's ``vmbus_sendpacket``:
        buffer, request id, type, flags), for a driver's per-packet path; shared rings take it without building a
        ``Packet``. A request sent this way is answered through ``on_packet``, not ``request``."""
        return self.try_send(Packet(ptype, flags, trans_id, payload))

    async def send(self, pkt: Packet) -> None:
        """Write one packet, waiting for ring space like a blocked writer."""
        size, data, rings = pkt.ring_size, len(pkt.data), self.rings
        if not rings.fits_ever(size, data):
            raise LocalProtocolError(f"a {size}-byte packet with {data} bytes of data can never fit a "
                                     f"{rings.writer.data_size}-byte ring and a "
                                     f"{rings.data_writer.data_size}-byte data window")
        if self.closed:
            raise ChannelClosed(f"channel {self.relid} closed")
        if not self._blocked_writers and rings.try_send(size, data):
            self.conn.send_packet(self.relid, pkt)
            return
        self._blocked_writers += 1  # later packets queue behind this one, in order
        try:
            await self._send_blocked(pkt, size, data)
        finally:
            self._blocked_writers -= 1

    async def _send_blocked(self, pkt: Packet, size: int, data: int) -> None:
        async with self._send_lock:
            while not self.rings.can_send(size, data):
                if self.closed:
                    raise ChannelClosed(f"channel {self.relid} closed")
                self.conn.send_signal(self.relid, self.rings.block(size, data))
                self._space_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._space_waiter
                finally:
                    self._space_waiter = None
            if self.closed:
                raise ChannelClosed(f"channel {self.relid} closed")
            self.rings.sent(size, data)
            self.conn.send_packet(self.relid, pkt)

    async def complete(self, trans_id: int, payload: bytes, data: Buffer = b"") -> None:
        """VM_PKT_COMP echoing ``trans_id``; ``data`` rides along into the request's GPA ranges."""
        await self.send(Packet(PacketType.COMP, 0, trans_id, payload, data=data))

    def _trans_id(self) -> int:
        tid = self._next_trans
        while tid in self._pending:
            tid = tid + 1 if tid < TRANS_ID_MAX else 1
        self._next_trans = tid + 1 if tid < TRANS_ID_MAX else 1
        return tid

    async def request(self, payload: bytes, ranges: tuple[GpaRange, ...] = (), data: Buffer = b"",
                      trans_id: int | None = None) -> Packet:
        """Send a request with COMPLETION_REQUESTED and wait for its VM_PKT_COMP (the guest's requestor).
        ``trans_id`` names a fixed id (Linux's VMBUS_RQST_INIT for storvsc's control requests)."""
        if trans_id is not None and trans_id in self._pending:
            raise LocalProtocolError(f"transaction id {trans_id:#x} is already waiting for its completion")
        pending = self._pending
        if trans_id is not None:
            tid = trans_id
        else:
            tid = self._next_trans
            if tid in pending or tid >= TRANS_ID_MAX:
                tid = self._trans_id()
            else:
                self._next_trans = tid + 1
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        pending[tid] = fut
        pkt = Packet(_GPA_DIRECT if ranges else _INBAND, FLAG_COMPLETION_REQUESTED, tid, payload, ranges, data)
        try:
            if not self.try_send(pkt):
                await self.send(pkt)
            return await fut
        finally:
            pending.pop(tid, None)

    # ---- close ------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        for w in (self._recv_waiter, self._space_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"channel {self.relid} closed"))
        self._pending.clear()

    @property
    def outstanding(self) -> int:
        return len(self._pending)
