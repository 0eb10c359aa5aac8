"""The framed stream connection both partitions run on (asyncio Protocol API, not streams).

It stands in for the SynIC message and event plumbing of Hyper-V (Linux drivers/hv/connection.c
``vmbus_post_msg`` / ``vmbus_set_event``): one connection per child partition carries every control
message and every channel's packets, multiplexed by relid the way asyncssh multiplexes channels.

Flow control never needs the socket (docs/protocol.md §7.6): every byte a peer may send on a channel is
covered by credit it can see, its ring for descriptors and its data window for inline data, so a
connection always reads; what it holds for a peer is bounded by the credit it granted. Only output beyond
what credit can explain (control replies a peer does not read) stops reading, and a peer that leaves us
so for ``stall_timeout`` is disconnected. TCP keepalive finds a peer that vanished without a FIN or RST.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import Any, cast

import structlog

from ..envelope import (
    DEFAULT_DATA_WINDOW,
    NO_PFN_BOUND,
    Signal,
    decode_close_code,
    decode_packet,
    encode_close,
    encode_packet,
)
from ..errors import FrameError, ProtocolError
from ..framing import DEFAULT_MAX_FRAME, HEADER, Frame, FrameDecoder, FrameKind, frame_parts
from ..packets import Buffer, Packet
from .channel import Channel

CONTROL_WRITE_HIGH = 1024 * 1024  # output allowed beyond what the open channels' credit can explain
KEEPALIVE = (10, 5, 3)  # TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT: a silent dead peer found in ~25 s
_DISCARD = bytearray(64 * 1024)
FLUSH_PARTS = 16  # buffers queued before writing out without waiting for the end of the loop iteration
BULK_WRITE = 64 * 1024  # from this size a flush hands its buffers over without joining them
_PACKET = int(FrameKind.PACKET)
#: Frames of one connection handled per turn of the event loop; the rest wait (reading paused) for the next
#: turn, so one peer's flood of small frames cannot hold up every other connection (fairness).
FRAMES_PER_TURN = 256
_WRITES, _BACKLOG = "the peer is not reading", "frames wait for their turn"
_pack_header = HEADER.pack


class FramedConnection(asyncio.BufferedProtocol):
    """Frame decoding, batched writes, flow control and channel packet routing for one peer.

    A ``BufferedProtocol``: the transport reads straight into the decoder's buffers (``get_buffer``), so
    bulk data is copied once, by the kernel, on its way to the frame that carries it."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME, write_high: int = CONTROL_WRITE_HIGH,
                 stall_timeout: float = 60.0, max_payload: int = 64 * 1024,
                 data_window: int = DEFAULT_DATA_WINDOW, log: Any = None) -> None:
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.log: Any = log if log is not None else structlog.get_logger()
        self.closing = False
        self.max_payload = max_payload
        self.pfn_bound = NO_PFN_BOUND  # GPA ranges name pages below this (the partition's memory map; docs §7.4)
        self.stall_timeout = stall_timeout
        self.data_window = data_window  # what we accept in flight per channel (our HELLO says it)
        self.peer_data_window = DEFAULT_DATA_WINDOW  # what the peer accepts (its HELLO says it)
        self._write_high = write_high
        self._wbuf: list[Buffer] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._stall_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        self.closed_future: asyncio.Future[str] = self._loop.create_future()
        self.bytes_in = 0
        self.bytes_out = 0
        self._backlog: collections.deque[Frame] = collections.deque()  # decoded, waiting for a turn
        self._read_holds: set[str] = set()  # why reading is paused (_WRITES, _BACKLOG)
        self.ioport: Callable[[Frame], None] | None = None  # takes IOPORT frames (emulated devices)

    # ---- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._set_write_limits()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle, interval, count = KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)

    # ---- channels ---------------------------------------------------------------------------------------

    def add_channel(self, ch: Channel) -> None:
        """Route ``ch``'s frames to it; its credit raises what we may buffer for the peer."""
        self.channels[ch.relid] = ch
        self._set_write_limits()

    def remove_channel(self, relid: int) -> Channel | None:
        ch = self.channels.pop(relid, None)
        if ch is not None:
            self._set_write_limits()
        return ch

    @property
    def write_limit(self) -> int:
        """Output we buffer before we stop reading: what the open channels' credit lets us send (each
        packet's frame at most twice its ring size, plus the peer's data window) and ``write_high`` more."""
        return self._write_high + sum(2 * ch.rings.writer.data_size + ch.rings.data_writer.data_size
                                      for ch in self.channels.values())

    def _set_write_limits(self) -> None:
        if self.transport is not None and not self.closing:
            high = self.write_limit
            self.transport.set_write_buffer_limits(high=high, low=high // 2)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closing:
            return memoryview(_DISCARD)  # the connection is going: whatever still arrives is dropped
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        closed = self.closing  # (a local, so the check below is not narrowed away)
        if closed:
            return
        self.bytes_in += nbytes
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except Exception as exc:
            self._failed(exc)
            return
        backlog = self._backlog
        if backlog:  # earlier frames still wait for their turn: these go behind them
            backlog.extend(frames)
            return
        if len(frames) > FRAMES_PER_TURN:
            # One read can hold thousands of small frames: handle a turn's worth, and the rest in later turns
            # of the loop, with reading paused meanwhile, so other connections are served in between.
            backlog.extend(frames[FRAMES_PER_TURN:])
            del frames[FRAMES_PER_TURN:]
            self._hold_reading(_BACKLOG)
            self._loop.call_soon(self._next_turn)
        self._handle(frames)

    def _next_turn(self) -> None:
        backlog = self._backlog
        if self.closing:
            backlog.clear()
            return
        n = min(len(backlog), FRAMES_PER_TURN)
        frames = [backlog.popleft() for _ in range(n)]
        if backlog:
            self._loop.call_soon(self._next_turn)
        else:
            self._release_reading(_BACKLOG)
        self._handle(frames)

    def _handle(self, frames: list[Frame]) -> None:
        try:
            dispatch, channels, max_payload, bound = self._dispatch, self.channels, self.max_payload, self.pfn_bound
            for frame in frames:
                if self.closing:  # a frame before this one closed the connection
                    self._backlog.clear()
                    return
                if frame[0] == _PACKET:  # the hot path, inline: (kind, relid, body, data, flags)
                    pkt = decode_packet(frame[2], frame[3], max_payload, bound)  # garbage refused on any relid
                    ch = channels.get(frame[1])
                    if ch is None or ch.closed:
                        self.on_unknown_channel(frame)
                    else:
                        ch._arrive(pkt)
                else:
                    dispatch(frame)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A frame was bad (the peer's fault: closed with the reason) or our handler failed (our bug: it costs
        this connection only, with the traceback in our log)."""
        self._backlog.clear()
        if isinstance(exc, ProtocolError):
            self.fail(f"{type(exc).__name__}: {exc}")
        else:
            self.log.exception("internal error while handling a frame; closing the connection")
            self._close_with(f"internal error: {type(exc).__name__}")

    def _hold_reading(self, why: str) -> None:
        """Stop reading the peer until every reason given here is released."""
        if not self._read_holds and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self._read_holds.add(why)

    def _release_reading(self, why: str) -> None:
        self._read_holds.discard(why)
        if not self._read_holds and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.decoder.buffered:
            self.log.warning("peer closed mid-frame", buffered=self.decoder.buffered)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        for ch in list(self.channels.values()):
            ch.close()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(str(exc) if exc else "closed")
        self.on_connection_lost(exc)

    def pause_writing(self) -> None:
        """More output waits than credit explains: the peer is not reading. Stop reading it (nothing it
        sends may add to the pile) and drop it if it stays so for ``stall_timeout``."""
        self._write_paused = True
        if self.transport is not None and not self.closing:
            self._hold_reading(_WRITES)
            self._stall_timer = asyncio.get_event_loop().call_later(self.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._release_reading(_WRITES)
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ---- hooks ------------------------------------------------------------------------------------------

    def on_control(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_hello(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_auth(self, frame: Frame) -> None:
        raise FrameError("AUTH frame when no authentication was negotiated")

    def on_ioport(self, frame: Frame) -> None:
        if self.ioport is None:
            raise FrameError("IOPORT frame on a connection with no emulated devices")
        self.ioport(frame)

    def on_close_frame(self, reason: str, code: str | None) -> None:
        self.log.info("peer closed the connection", reason=reason, code=code)
        self.close()

    def on_unknown_channel(self, frame: Frame) -> None:
        self.log.warning("frame for a channel that is not open dropped", relid=frame.relid,
                         kind=FrameKind(frame.kind).name)

    def on_connection_lost(self, exc: Exception | None) -> None:
        pass

    # ---- dispatch ---------------------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        """Every frame but PACKET, which ``buffer_updated`` hands to its channel itself."""
        kind = frame.kind
        if kind == FrameKind.SIGNAL:
            sig = Signal.decode(frame.body)
            ch = self.channels.get(frame.relid)
            if ch is None or ch.closed:
                self.on_unknown_channel(frame)
                return
            ch._on_signal(sig)
        elif kind == FrameKind.CONTROL:
            self.on_control(frame)
        elif kind == FrameKind.HELLO:
            self.on_hello(frame)
        elif kind == FrameKind.CLOSE:
            self.on_close_frame(*decode_close_code(frame.body))
        elif kind == FrameKind.AUTH:
            self.on_auth(frame)
        elif kind == FrameKind.IOPORT:
            self.on_ioport(frame)

    def _stalled(self) -> None:
        """The peer read nothing for ``stall_timeout``. A CLOSE frame would queue behind what it does not
        read, so it is reset instead: the reason is in our log, and our buffers go at once."""
        if not self._write_paused or self.closing or self.transport is None:
            return
        self.log.error("protocol error, closing connection",
                       error=f"peer has not read for {self.stall_timeout:g}s with "
                             f"{self.transport.get_write_buffer_size()} bytes waiting (limit {self.write_limit})")
        self.closing = True
        self.transport.abort()

    # ---- output -----------------------------------------------------------------------------------------

    def send_frame(self, kind: int, relid: int, body: bytes, data: Buffer = b"") -> None:
        if self.closing:
            return
        wbuf = self._wbuf
        n = len(data)
        head = _pack_header(len(body) + n, kind, 0, 0, relid, n) + body  # framing.frame_parts, inline
        if n:
            wbuf += (head, data)
        else:
            wbuf.append(head)
        if len(wbuf) >= FLUSH_PARTS:
            self.flush()  # write out early so the peer starts on these while we make more
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.send_frame(_PACKET, relid, encode_packet(pkt), pkt.data)

    def send_signal(self, relid: int, sig: Signal) -> None:
        self.send_frame(FrameKind.SIGNAL, relid, sig.encode())

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._wbuf or self.transport is None or self.transport.is_closing():
            self._wbuf.clear()
            return
        buf, self._wbuf = self._wbuf, []
        size = sum(map(len, buf))
        self.bytes_out += size
        if len(buf) == 1:
            self.transport.write(buf[0])
        elif size >= BULK_WRITE:
            self.transport.writelines(buf)  # one vectored write, bulk data not copied
        else:
            self.transport.write(b"".join(buf))

    async def drain(self) -> None:
        if not self._write_paused or self.closing:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    def fail(self, reason: str) -> None:
        """The peer broke the protocol: say why in a CLOSE frame, log it, and drop the connection."""
        if self.closing:
            return
        self.log.error("protocol error, closing connection", error=reason)
        self._close_with(reason)

    def close(self, reason: str = "", code: str | None = None) -> None:
        """Close, telling the peer ``reason`` (and a machine-readable ``code``) in a CLOSE frame if given."""
        if self.closing:
            return
        self._close_with(reason, code)

    def _close_with(self, reason: str, code: str | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reason:
                self._wbuf.extend(frame_parts(FrameKind.CLOSE, 0, encode_close(reason, code)))
            self.flush()
            self.closing = True
            self.transport.close()
            # A peer that never reads must not hold us: abort if the close does not finish.
            asyncio.get_event_loop().call_later(5.0, _abort_if_open, self.transport)
        self.closing = True
        for ch in list(self.channels.values()):
            ch.close()


def _abort_if_open(transport: asyncio.Transport) -> None:
    if transport.get_extra_info("socket") is not None and transport.is_closing():
        transport.abort()
