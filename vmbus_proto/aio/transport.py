"""The framed stream connection both partitions run on (asyncio Protocol API, not streams).

It stands in for the SynIC message and event plumbing of Hyper-V (Linux drivers/hv/connection.c
``vmbus_post_msg`` / ``vmbus_set_event``): one connection per child partition carries every control
message and every channel's packets, multiplexed by relid the way asyncssh multiplexes channels.

Flow control never needs the socket (docs/protocol.md §7.6): every byte a peer may send on a channel is
covered by credit it can see, its ring for descriptors and its data window for inline data, so a
connection always reads; what it holds for a peer is bounded by the credit it granted. Only output beyond
what credit can explain (control replies a peer does not read) stops reading, and a peer that leaves us
so for ``stall_timeout`` is disconnected. TCP keepalive finds a peer that vanished without a FIN or RST.

Slow peers (docs/reliability.md, "Slow and silent peers"): once the first byte of a frame is in, the whole
frame must follow within ``frame_timeout``, or the connection is closed with CLOSE code ``frame-timeout`` (a
slow-loris peer that dribbles bytes would otherwise hold its buffers forever). The clock is read once per
socket read, and one timer per connection runs only while a frame is incomplete: nothing per frame.
"""

from __future__ import annotations

import asyncio
import collections
import errno
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
#: The default frame deadline. A maximal frame (4 MiB of data and its descriptor) in 30 s is 1.1 Mbit/s, slower
#: than any link a VM's disk is usefully served over; and 30 s is Linux's own SCSI command timeout (sd's
#: default), so a guest request whose frame takes longer has already failed for the guest.
FRAME_TIMEOUT = 30.0
FRAME_TIMEOUT_CODE = "frame-timeout"  # the CLOSE code of a connection whose frame did not complete in time
_DISCARD = bytearray(64 * 1024)
FLUSH_PARTS = 16  # buffers queued before writing out without waiting for the end of the loop iteration
BULK_WRITE = 64 * 1024  # from this size a flush hands its buffers over without joining them
_PACKET, _EVENT = int(FrameKind.PACKET), int(FrameKind.EVENT)
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
                 data_window: int = DEFAULT_DATA_WINDOW, frame_timeout: float = FRAME_TIMEOUT,
                 keepalive: tuple[int, int, int] = KEEPALIVE, log: Any = None) -> None:
        """``frame_timeout``: seconds a frame may take from its first byte to its last; ``keepalive``: TCP
        keepalive's idle, interval and count (TCP only; see ``set_keepalive``)."""
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.log: Any = log if log is not None else structlog.get_logger()
        self.closing = False
        self.max_payload = max_payload
        self.pfn_bound = NO_PFN_BOUND  # GPA ranges name pages below this (the partition's memory map; docs §7.4)
        self.stall_timeout = stall_timeout
        self.frame_timeout = frame_timeout
        self.keepalive = keepalive
        self._partial_since: float | None = None  # loop time the incomplete frame's first byte came (None: none)
        self._frame_timer: asyncio.TimerHandle | None = None  # armed only while a frame is incomplete
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
            set_keepalive(sock, self.keepalive)

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
        return self._write_high + sum(ch.credit_bytes for ch in self.channels.values())

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
        if self.decoder.buffered:  # a frame is incomplete: it began in this read if this read completed one
            if frames or self._partial_since is None:
                self._partial_since = self._loop.time()
                if self._frame_timer is None:
                    self._frame_timer = self._loop.call_later(self.frame_timeout, self._frame_deadline)
        elif self._partial_since is not None:
            self._partial_since = None  # the timer, when it fires, finds nothing pending and is not re-armed
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

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket before this protocol had it (a Unix child's first message)."""
        view, pos = memoryview(data), 0
        while pos < len(data) and not self.closing:
            buf = self.get_buffer(len(data) - pos)
            n = min(len(buf), len(data) - pos)
            buf[:n] = view[pos:pos + n]
            pos += n
            self.buffer_updated(n)

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
            if self._partial_since is not None:  # the time we did not read is not the peer's
                self._partial_since = self._loop.time()

    def _frame_deadline(self) -> None:
        """The frame timer: close the connection if its incomplete frame is older than ``frame_timeout``,
        else wait for that frame's own deadline. While we hold reading, the time is not counted against the
        peer (``_release_reading`` restarts it; a peer that does not read is ``stall_timeout``'s)."""
        self._frame_timer = None
        since = self._partial_since
        if since is None or self.closing:
            return
        now = self._loop.time()
        if self._read_holds or now - since < self.frame_timeout:
            due = now + self.frame_timeout if self._read_holds else since + self.frame_timeout
            self._frame_timer = self._loop.call_at(due, self._frame_deadline)
            return
        buffered = self.decoder.buffered
        # Info, not a warning: one line per connection, that the per-peer log limiter must never hide.
        self.log.info("frame deadline missed; closing the connection", buffered=buffered,
                      frame_timeout=self.frame_timeout)
        self.close(f"frame timeout: {buffered} bytes of a frame came, and not the rest within "
                   f"{self.frame_timeout:g}s", FRAME_TIMEOUT_CODE)

    def eof_received(self) -> bool | None:
        if self.decoder.buffered:
            self.log.warning("peer closed mid-frame", buffered=self.decoder.buffered)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for timer in (self._stall_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        for ch in list(self.channels.values()):
            ch.close()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(self.loss_reason(exc))
        self.on_connection_lost(exc)

    def loss_reason(self, exc: Exception | None) -> str:
        """Why the connection went, in words: a kernel timeout is a peer gone silent (no FIN, no RST)."""
        if exc is None:
            return "closed"
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            return (f"the peer went silent: TCP had no answer to keepalive probes or acknowledgement of data "
                    f"for {silence_limit(self.keepalive)}s (keepalive {list(self.keepalive)}): it is gone without "
                    f"a FIN or RST (a half-open connection), or its receive window stayed shut ({exc})")
        return str(exc)

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
        if kind == _EVENT:
            ch = self.channels.get(frame.relid)
            if frame.body:
                raise FrameError("EVENT frame with a body")
            if ch is None or ch.closed:
                self.on_unknown_channel(frame)
                return
            ch._on_event()
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

    def send_event(self, relid: int) -> None:
        """Channel ``relid``'s event, for rings in shared memory: a bare header, written with the next flush."""
        self.send_frame(_EVENT, relid, b"")

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


def silence_limit(keepalive: tuple[int, int, int]) -> int:
    """Seconds of silence after which the kernel gives a TCP connection up: idle + interval * count."""
    idle, interval, count = keepalive
    return idle + interval * count


KEEPALIVE_MAX = (32767, 32767, 127)  # Linux's limits of TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT


KEEPALIVE_RULE = ("seconds of silence before the first probe (1-32767), seconds between probes (1-32767) and "
                  "unanswered probes before the peer is given up (1-127)")


def check_keepalive(v: Any) -> tuple[int, int, int]:
    """A ``keepalive`` setting, ``[idle, interval, count]``, checked; a ValueError says what it must be."""
    if (not isinstance(v, list | tuple) or len(v) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= top
                       for x, top in zip(v, KEEPALIVE_MAX, strict=True))):
        raise ValueError(f"must be [idle, interval, count]: {KEEPALIVE_RULE}, as [10, 5, 3]; not {v!r}")
    return int(v[0]), int(v[1]), int(v[2])


def set_keepalive(sock: socket.socket, keepalive: tuple[int, int, int]) -> None:
    """TCP keepalive (``keepalive``: idle, interval, count) on ``sock``, and ``TCP_USER_TIMEOUT`` at the same
    total: keepalive probes only an idle connection, so without it a peer that vanished while our data was on
    its way (a heartbeat) would be retransmitted to for 15 minutes (``tcp_retries2``). The kernel then also
    gives up a peer whose receive window stays shut that long (tcp(7)): on TCP that may come before
    ``stall_timeout``, as the same ``ETIMEDOUT``."""
    idle, interval, count = keepalive
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, silence_limit(keepalive) * 1000)


def _abort_if_open(transport: asyncio.Transport) -> None:
    if transport.get_extra_info("socket") is not None and transport.is_closing():
        transport.abort()
