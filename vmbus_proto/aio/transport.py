"""The framed stream connection both partitions run on (asyncio Protocol API, not streams).

It stands in for the SynIC message and event plumbing of Hyper-V (Linux drivers/hv/connection.c
``vmbus_post_msg`` / ``vmbus_set_event``): one connection per child partition carries every control
message and every channel's packets, multiplexed by relid the way asyncssh multiplexes channels.

Backpressure is honest: a transport whose write buffer is over its high-water mark stops our reading
(nothing we read can make more output pile up), and bytes queued in channels that devices have not
consumed yet stop reading too. A peer that leaves us paused for ``stall_timeout`` is disconnected.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import structlog

from ..envelope import Signal, decode_close, decode_packet, encode_close, encode_packet
from ..errors import ProtocolError
from ..framing import DEFAULT_MAX_FRAME, Frame, FrameDecoder, FrameKind, frame_parts
from ..packets import Buffer, Packet
from .channel import Channel

DEFAULT_WRITE_HIGH = 4 * 1024 * 1024
DEFAULT_INBOUND_HIGH = 32 * 1024 * 1024
_DISCARD = bytearray(64 * 1024)
FLUSH_PARTS = 16  # buffers queued before writing out without waiting for the end of the loop iteration
BULK_WRITE = 64 * 1024  # from this size a flush hands its buffers over without joining them


class FramedConnection(asyncio.BufferedProtocol):
    """Frame decoding, batched writes, flow control and channel packet routing for one peer.

    A ``BufferedProtocol``: the transport reads straight into the decoder's buffers (``get_buffer``), so
    bulk data is copied once, by the kernel, on its way to the frame that carries it."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME, write_high: int = DEFAULT_WRITE_HIGH,
                 inbound_high: int = DEFAULT_INBOUND_HIGH, stall_timeout: float = 60.0,
                 max_payload: int = 64 * 1024, log: Any = None) -> None:
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.log: Any = log if log is not None else structlog.get_logger()
        self.closing = False
        self.max_payload = max_payload
        self.stall_timeout = stall_timeout
        self._write_high = write_high
        self._wbuf: list[Buffer] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._inbound = 0
        self._inbound_high = inbound_high
        self._reading_paused_by: set[str] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self.closed_future: asyncio.Future[str] = asyncio.get_event_loop().create_future()
        self.bytes_in = 0
        self.bytes_out = 0

    # ---- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.set_write_buffer_limits(high=self._write_high, low=self._write_high // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closing:
            return memoryview(_DISCARD)  # the connection is going: whatever still arrives is dropped
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        self.bytes_in += nbytes
        try:
            for frame in self.decoder.buffer_updated(nbytes):
                if self._stopped():
                    return
                self._dispatch(frame)
        except ProtocolError as exc:
            self.fail(f"{type(exc).__name__}: {exc}")

    def _stopped(self) -> bool:
        return self.closing

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
        self._write_paused = True
        self._pause_reading("write")

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_reading("write")
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ---- hooks ------------------------------------------------------------------------------------------

    def on_control(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_hello(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_close_frame(self, reason: str) -> None:
        self.log.info("peer closed the connection", reason=reason)
        self.close()

    def on_unknown_channel(self, frame: Frame) -> None:
        self.log.warning("frame for a channel that is not open dropped", relid=frame.relid,
                         kind=FrameKind(frame.kind).name)

    def on_connection_lost(self, exc: Exception | None) -> None:
        pass

    # ---- dispatch ---------------------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.kind
        if kind == FrameKind.PACKET:
            ch = self.channels.get(frame.relid)
            if ch is None or ch.closed:
                decode_packet(frame.body, frame.data, self.max_payload)  # still reject garbage
                self.on_unknown_channel(frame)
                return
            pkt = decode_packet(frame.body, frame.data, self.max_payload)
            ch.rings.reader.arrive(pkt.ring_size)
            if pkt.data:
                self.inbound_queued(len(pkt.data))
            ch._deliver(pkt)
        elif kind == FrameKind.SIGNAL:
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
            self.on_close_frame(decode_close(frame.body))

    # ---- inbound flow control ---------------------------------------------------------------------------

    def inbound_queued(self, n: int) -> None:
        self._inbound += n
        if self._inbound > self._inbound_high:
            self._pause_reading("inbound")

    def inbound_consumed(self, n: int) -> None:
        if not n:
            return
        self._inbound -= n
        if self._inbound <= self._inbound_high // 2:
            self._resume_reading("inbound")

    def _pause_reading(self, why: str) -> None:
        if not self._reading_paused_by and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        if why == "write" and self._stall_timer is None and not self.closing:
            self._stall_timer = asyncio.get_event_loop().call_later(self.stall_timeout, self._stalled)
        self._reading_paused_by.add(why)

    def _resume_reading(self, why: str) -> None:
        if why not in self._reading_paused_by:
            return
        self._reading_paused_by.discard(why)
        if why == "write" and self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if not self._reading_paused_by and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def _stalled(self) -> None:
        if self._write_paused and not self.closing:
            self.fail(f"peer has not read for {self.stall_timeout:g}s with "
                      f"{self.transport.get_write_buffer_size() if self.transport else 0} bytes waiting")

    # ---- output -----------------------------------------------------------------------------------------

    def send_frame(self, kind: int, relid: int, body: bytes, data: Buffer = b"") -> None:
        if self.closing:
            return
        wbuf = self._wbuf
        wbuf.extend(frame_parts(kind, relid, body, data))
        if len(wbuf) >= FLUSH_PARTS:
            self.flush()  # write out early so the peer starts on these while we make more
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_event_loop().call_soon(self.flush)

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.send_frame(FrameKind.PACKET, relid, encode_packet(pkt), pkt.data)

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

    def close(self, reason: str = "") -> None:
        if self.closing:
            return
        self._close_with(reason)

    def _close_with(self, reason: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reason:
                self._wbuf.extend(frame_parts(FrameKind.CLOSE, 0, encode_close(reason)))
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
