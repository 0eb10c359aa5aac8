"""Both ends of a partition's VMBus stream joined in memory: the shell-tier test harness (DESIGN.md, tier 2).

Each end is the real ``FramedConnection`` (``vmbus_proto.aio.transport``): the same frame encoding, the
same batched flush, the same ``FrameDecoder`` and the same dispatch of PACKET frames (checked against the
rings with ``ChannelRings.arrive``, then ``Channel._deliver``) and SIGNAL frames (``Channel._on_signal``).
Only the socket is replaced, by :class:`MemoryTransport`: bytes written at one end are copied, as a socket
send copies them, and fed to the other end's ``get_buffer`` / ``buffer_updated`` on a later loop turn, so
packets are charged their real ring sizes, a writer without room really blocks on pending_send_sz, a peer
that writes past its credit fails the connection exactly as it would over TCP, and a buffer changed after
its packet went out does not change what the peer received.

A :class:`ChannelPair` is one open channel seen from both sides, with rings sized as an OPENCHANNEL sizes
them (``vmbus_proto.server.OpenParams``: the ring GPADL's pages and the downstream offset). Closing follows
the control plane, carried in real CONTROL frames behind the packets already sent: the guest's
CLOSECHANNEL (Linux ``vmbus_close``) closes the host's channel when it arrives, the host's
RESCINDCHANNELOFFER the guest's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .. import messages as m
from ..channel import ChannelRings
from ..envelope import DEFAULT_DATA_WINDOW
from ..framing import DEFAULT_MAX_FRAME, Frame, FrameKind
from ..gpadl import Gpadl
from ..packets import PAGE_SIZE, Buffer
from ..server import OpenParams
from ..shm_ring import GuestPages, RingIn, RingOut
from .channel import Channel
from .shared import SharedChannel
from .transport import CONTROL_WRITE_HIGH, FramedConnection

HOST, GUEST = "host", "guest"
DEFAULT_RING_PAGES = 16  # a ring GPADL of 16 pages: 8 each way (7 data pages and a header page)
FIRST_RING_PFN = 0x1000  # page numbers a pair names its ring GPADL with when a test gives none

Closer = Callable[[Channel], Awaitable[None]]


class Wire:
    """One direction of the in-memory stream. A test may ``pause()`` it to hold everything one side sends
    (packets, credit, control messages, the end of the stream) and ``resume()`` it to let it all through."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paused = False
        self.buffered = 0  # bytes written and not delivered yet
        self.delivered = 0
        self.sender: MemoryTransport | None = None
        self.receiver: MemoryTransport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._scheduled = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.schedule()

    def put(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.buffered += len(data)
            self.schedule()

    def finish(self) -> None:
        """The sender closed: the receiver sees the end of the stream after what was written."""
        self._eof = True
        self.schedule()

    def discard(self) -> None:
        self._chunks.clear()
        self.buffered = 0

    def schedule(self) -> None:
        if not self._scheduled and not self.paused and (self._chunks or self._eof):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        rx, tx = self.receiver, self.sender
        assert rx is not None and tx is not None
        while self._chunks and not self.paused:
            if rx.closing:  # a closed transport reads nothing more
                self.discard()
                break
            if not rx.reading:
                return  # resume_reading schedules the rest
            chunk = self._chunks.popleft()
            taken = rx.receive(chunk)
            self.buffered -= taken
            self.delivered += taken
            if taken < len(chunk):
                self._chunks.appendleft(chunk[taken:])
            tx.drained()
        tx.drained()
        if self._eof and not self._chunks and not self.paused:
            self._eof = False
            tx.lose(None)
            rx.eof()


class MemoryTransport(asyncio.Transport):
    """The socket under one end: what ``FramedConnection`` uses of an ``asyncio.Transport``, in memory.

    Writes are copied into the outbound wire; reads are the inbound wire's bytes, fed to the protocol's
    ``get_buffer``/``buffer_updated`` as a socket read would be, and held while reading is paused. Write
    buffer limits work as asyncio's do (``pause_writing`` above high, ``resume_writing`` at low)."""

    def __init__(self, protocol: asyncio.BufferedProtocol, out: Wire, inbound: Wire, name: str) -> None:
        super().__init__({"peername": name, "socket": None})
        self._protocol = protocol
        self._out, self._in = out, inbound
        out.sender = inbound.receiver = self
        self.closing = False
        self.reading = True
        self._lost = False
        self._high, self._low = 64 * 1024, 16 * 1024
        self._write_paused = False

    # ---- asyncio.Transport ----------------------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return self.reading

    def write(self, data: Buffer) -> None:
        if self.closing:
            return
        self._out.put(bytes(data))  # a socket send copies: later changes to ``data`` do not travel
        if not self._write_paused and self._out.buffered > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._out.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        self._in.schedule()

    def close(self) -> None:
        """Nothing more is read; what was written is delivered, then the peer sees the end of the stream."""
        if self.closing:
            return
        self.closing = True
        self._out.finish()

    def abort(self) -> None:
        """Drop at once, unsent bytes and all: the peer sees a reset."""
        self.closing = True
        self._out.discard()
        self.lose(None)
        peer = self._in.sender
        if peer is not None:
            peer.closing = True
            peer._out.discard()
            peer.lose(ConnectionResetError("connection reset by peer"))

    # ---- the wires' side ------------------------------------------------------------------------------

    def receive(self, chunk: bytes) -> int:
        """Feed ``chunk`` to the protocol as socket reads; returns how much it took before it paused."""
        protocol = self._protocol
        view, pos = memoryview(chunk), 0
        while pos < len(view) and self.reading and not self.closing:
            buf = memoryview(protocol.get_buffer(len(view) - pos))
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos:pos + n]
            pos += n
            protocol.buffer_updated(n)
        return len(view) if self.closing else pos

    def drained(self) -> None:
        if self._write_paused and self._out.buffered <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()

    def eof(self) -> None:
        """The peer closed its end: as asyncio does, close ours unless the protocol keeps it half open."""
        if self.closing:
            return
        if not self._protocol.eof_received():
            self.closing = True
            self._out.discard()  # the peer reads nothing more
            self.lose(None)

    def lose(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)


class PairConnection(FramedConnection):
    """One end of a :class:`MemoryLink`: the real connection, recording why it closed."""

    def __init__(self, side: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.side = side
        self.failure: str | None = None  # why this end failed the connection (the reason in its CLOSE)
        self.peer_reason: str | None = None  # the reason in the peer's CLOSE frame
        self.pairs: dict[int, ChannelPair] = {}

    def fail(self, reason: str) -> None:
        if not self.closing and self.failure is None:
            self.failure = reason
        super().fail(reason)

    def on_close_frame(self, reason: str, code: str | None) -> None:
        self.peer_reason = reason
        super().on_close_frame(reason, code)

    def on_hello(self, frame: Frame) -> None:
        self.fail("HELLO on a link that is connected already")

    def on_control(self, frame: Frame) -> None:
        """The two control messages that end a channel: CLOSECHANNEL (to the host), RESCIND (to the guest)."""
        msg = m.decode(frame.body)
        want = m.CloseChannel if self.side == HOST else m.RescindChannelOffer
        if not isinstance(msg, want):
            self.fail(f"{self.side} got {msg.describe()} on an in-memory link")
            return
        pair = self.pairs.pop(msg.child_relid, None)
        if pair is not None:
            pair._finish(self.side)

    def on_connection_lost(self, exc: Exception | None) -> None:
        # As the daemon releases a lost partition's devices: every channel still open is closed on its side.
        pairs, self.pairs = list(self.pairs.values()), {}
        for pair in pairs:
            pair._finish(self.side)


class MemoryLink:
    """A partition's stream with both ends in this process: ``host`` (the parent's connection) and ``guest``
    (the child's), joined by the wires ``to_host`` and ``to_guest``. Create it inside a running loop.

    ``data_window`` is what each side announces in its HELLO (inline GPA data in flight per channel);
    ``host_data_window``/``guest_data_window`` set one side's alone. ``max_frame``, ``max_payload`` and
    ``write_high`` are the connections' own limits (``FramedConnection``)."""

    def __init__(self, *, data_window: int = DEFAULT_DATA_WINDOW, host_data_window: int | None = None,
                 guest_data_window: int | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 max_payload: int = 64 * 1024, write_high: int = CONTROL_WRITE_HIGH, partition: str = "vm1",
                 log: Any = None, pages: GuestPages | None = None) -> None:
        """``pages``: the guest's memory, which both ends then share (docs/protocol.md §14): channels are
        ``SharedChannel``s on rings in it, and only EVENT frames cross for them."""
        log = log if log is not None else structlog.get_logger()
        self.partition = partition
        self.pages = pages
        hw = data_window if host_data_window is None else host_data_window
        gw = data_window if guest_data_window is None else guest_data_window
        conn = {"max_frame": max_frame, "max_payload": max_payload, "write_high": write_high}
        self.host = PairConnection(HOST, data_window=hw, log=log.bind(side=HOST, partition=partition), **conn)
        self.guest = PairConnection(GUEST, data_window=gw, log=log.bind(side=GUEST, partition=partition), **conn)
        self.host.peer_data_window, self.guest.peer_data_window = gw, hw  # as the HELLOs would have told
        self.to_host, self.to_guest = Wire("guest>host"), Wire("host>guest")
        self.host.connection_made(MemoryTransport(self.host, self.to_guest, self.to_host, "guest"))
        self.guest.connection_made(MemoryTransport(self.guest, self.to_host, self.to_guest, "host"))
        self._next_gpadl = 0xE1E10

    def open(self, relid: int = 1, *, pages: int = DEFAULT_RING_PAGES, downstream_offset: int | None = None,
             pfns: list[int] | tuple[int, ...] | None = None, gpadl: int | None = None, userdata: bytes = b"",
             name: str = "") -> ChannelPair:
        """Open channel ``relid`` on a ring GPADL of ``pages`` pages, the first ``downstream_offset`` of them
        (default: half) the guest-to-host ring, each ring one header page plus data."""
        offset = pages // 2 if downstream_offset is None else downstream_offset
        if not 2 <= offset <= pages - 2:
            raise ValueError(f"downstream offset {offset} leaves a ring of {pages} pages without data")
        if relid in self.host.channels or relid in self.guest.channels:
            raise ValueError(f"channel {relid} is open already")
        ring_pfns = tuple(range(FIRST_RING_PFN + relid * pages, FIRST_RING_PFN + (relid + 1) * pages)
                          if pfns is None else pfns)
        if len(ring_pfns) != pages:
            raise ValueError(f"{len(ring_pfns)} ring pfns for {pages} pages")
        if gpadl is None:
            gpadl, self._next_gpadl = self._next_gpadl, self._next_gpadl + 1
        ring = Gpadl(relid, gpadl, ((pages * PAGE_SIZE, 0),), ring_pfns)
        params = OpenParams(relid, relid, ring, offset, 0, userdata)
        return ChannelPair(self, params, name)

    def close(self, reason: str = "") -> None:
        """The host closes the connection (with ``reason`` in a CLOSE frame): every channel on it closes."""
        self.host.close(reason)

    def abort(self) -> None:
        """The stream breaks (a reset): both ends lose it at once."""
        transport = self.host.transport
        if transport is not None:
            transport.abort()

    async def closed(self) -> None:
        """Until both ends have lost the connection."""
        await asyncio.gather(self.host.closed_future, self.guest.closed_future)


class ChannelPair:
    """One open channel: ``host`` and ``guest`` are its two ``Channel`` ends; ``params`` what the host's
    OPENCHANNEL carried (the rings' sizes, the GPADL, the user data).

    ``on_host_close`` is what the host runs when the channel closes (the daemon awaits its VSP's
    ``close(channel)``), ``on_guest_close`` the guest's; by default each closes its ``Channel``. The futures
    ``host_closed``/``guest_closed`` are done once each side has finished closing."""

    def __init__(self, link: MemoryLink, params: OpenParams, name: str = "") -> None:
        self.link = link
        self.params = params
        self.relid = relid = params.relid
        g2h, h2g = params.guest_to_host_data, params.host_to_guest_data
        hc, gc = link.host, link.guest
        self.host: Channel
        self.guest: Channel
        if link.pages is not None:
            self.host, self.guest = _shared_ends(link.pages, params, hc, gc, name)
        else:
            self.host = Channel(hc, relid, ChannelRings(relid, host=True, guest_to_host_data=g2h,
                                                        host_to_guest_data=h2g, window_in=hc.data_window,
                                                        window_out=hc.peer_data_window),
                                name=name, log=hc.log.bind(relid=relid))
            self.guest = Channel(gc, relid, ChannelRings(relid, host=False, guest_to_host_data=g2h,
                                                         host_to_guest_data=h2g, window_in=gc.data_window,
                                                         window_out=gc.peer_data_window),
                                 name=name, log=gc.log.bind(relid=relid))
        for conn, ch in ((hc, self.host), (gc, self.guest)):
            conn.add_channel(ch)
            conn.pairs[relid] = self
        loop = asyncio.get_running_loop()
        self.on_host_close: Closer | None = None
        self.on_guest_close: Closer | None = None
        self.host_closed: asyncio.Future[None] = loop.create_future()
        self.guest_closed: asyncio.Future[None] = loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    def close_guest(self) -> None:
        """The guest closes the channel (CLOSECHANNEL): its end now, the host's when the message arrives."""
        self._close_side(GUEST, m.CloseChannel(child_relid=self.relid))

    def close_host(self) -> None:
        """The host takes the channel away (RESCINDCHANNELOFFER): its end now, the guest's on arrival."""
        self._close_side(HOST, m.RescindChannelOffer(child_relid=self.relid))

    def refuse(self) -> None:
        """The host's device refused the open (OPENCHANNEL_RESULT with an error): both ends drop the channel."""
        for conn in (self.link.host, self.link.guest):
            if conn.pairs.pop(self.relid, None) is not None:
                self._finish(conn.side)

    async def closed(self) -> None:
        """Until both ends have finished closing."""
        await asyncio.gather(self.host_closed, self.guest_closed)

    def _close_side(self, side: str, msg: m.Message) -> None:
        conn = self.link.host if side == HOST else self.link.guest
        if conn.pairs.pop(self.relid, None) is None:
            return  # closed already
        self._finish(side)
        conn.send_frame(FrameKind.CONTROL, 0, msg.encode())

    def _finish(self, side: str) -> None:
        conn, ch, closer, done = ((self.link.host, self.host, self.on_host_close, self.host_closed) if side == HOST
                                  else (self.link.guest, self.guest, self.on_guest_close, self.guest_closed))
        conn.remove_channel(self.relid)
        task = asyncio.get_running_loop().create_task(_run_closer(ch, closer, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _shared_ends(pages: GuestPages, params: OpenParams, hc: FramedConnection, gc: FramedConnection,
                 name: str) -> tuple[Channel, Channel]:
    """Both ends of a channel whose rings are the ring GPADL's pages in ``pages``, initialised by the guest."""
    pfns, offset, relid = list(params.gpadl.pfns), params.downstream_offset, params.relid
    g2h, h2g = pages.ring(pfns[:offset]), pages.ring(pfns[offset:])
    g2h.init()
    h2g.init()
    host = SharedChannel(hc, relid, RingOut(h2g), RingIn(g2h, hc.max_payload, hc.pfn_bound), pages, host=True,
                         name=name, log=hc.log.bind(relid=relid))
    guest = SharedChannel(gc, relid, RingOut(g2h), RingIn(h2g, gc.max_payload, gc.pfn_bound), pages, host=False,
                          name=name, log=gc.log.bind(relid=relid))
    return host, guest


async def _run_closer(ch: Channel, closer: Closer | None, done: asyncio.Future[None]) -> None:
    try:
        if closer is None:
            ch.close()
        else:
            await closer(ch)
    finally:
        ch.close()
        with contextlib.suppress(asyncio.InvalidStateError):
            done.set_result(None)
