"""The stream envelope that carries VMBus over TCP or a Unix socket (docs/protocol.md).

On Hyper-V, control messages travel as 240-byte SynIC messages and packets through shared-memory rings
signalled by SynIC events (Linux drivers/hv/connection.c, ring_buffer.c). A stream has neither, so each
item is one frame: a fixed 16-byte header, a msgpack body, and raw trailing data (the bytes a packet's GPA
ranges point at) that is never re-encoded. Frames have a hard size limit and the decoder never buffers
more than one frame of it.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from .errors import FrameError
from .packets import Buffer

# length u32 (bytes after this header), kind u8, flags u8, reserved u16, relid u32, data_len u32
HEADER = struct.Struct("<IBBHII")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 4 * 1024 * 1024 + 64 * 1024  # a 4 MiB transfer plus its descriptor
ENVELOPE_VERSION = 1


class FrameKind(enum.IntEnum):
    HELLO = 1  # envelope handshake: partition name, later authentication
    CONTROL = 2  # one VMBus channel message (CHANNELMSG_*)
    PACKET = 3  # one ring packet of channel ``relid``
    SIGNAL = 4  # ring header fields a peer cannot see in shared memory: indices, pending_send_sz, mask
    CLOSE = 5  # the sender is closing the connection, with a reason


class Frame(NamedTuple):
    """One decoded frame: its body and data are views of the bytes it arrived in."""

    kind: int
    relid: int
    body: memoryview | bytes
    data: memoryview | bytes = b""
    flags: int = 0


def encode_frame(kind: int, relid: int, body: bytes, data: Buffer = b"", flags: int = 0) -> bytes:
    """Header and msgpack body; the header counts ``data`` but the caller writes it (see ``frame_parts``)."""
    return HEADER.pack(len(body) + len(data), kind, flags, 0, relid, len(data)) + body


def frame_parts(kind: int, relid: int, body: bytes, data: Buffer = b"",
                flags: int = 0) -> list[Buffer]:
    """A frame as buffers for ``transport.writelines``, so bulk data is not copied into the header."""
    head = HEADER.pack(len(body) + len(data), kind, flags, 0, relid, len(data)) + body
    return [head, data] if data else [head]


class FrameDecoder:
    """Streaming decoder: ``feed(bytes)`` returns the complete frames; bad input raises ``FrameError``.

    A header that announces more than ``max_frame`` bytes fails at once, before anything is buffered,
    so a peer can never make us hold more than one maximal frame.
    """

    __slots__ = ("_buf", "_error", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Decode every complete frame in what has arrived. Bodies and data are zero-copy views of the
        immutable chunk they arrived in; only a frame split across reads is copied (once). After an error
        the stream is dead: every later call raises it again."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except FrameError as exc:
            self._error = exc
            raise

    def _check(self, src: bytes | bytearray, pos: int) -> tuple[int, int, int, int, int]:
        """The header at ``pos``: (length, kind, flags, relid, data_len), validated."""
        length, kind, flags, reserved, relid, data_len = HEADER.unpack_from(src, pos)
        if length > self.max_frame:
            raise FrameError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        if not _FIRST_KIND <= kind <= _LAST_KIND:
            raise FrameError(f"unknown frame kind {kind}")
        if data_len > length or reserved:
            raise FrameError(f"bad frame header (data_len {data_len} of {length}, reserved {reserved})")
        return length, kind, flags, relid, data_len

    def _feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        if buf:
            # A frame split across reads: copy in only the bytes it still lacks.
            if len(buf) < HEADER_SIZE:
                pos = min(HEADER_SIZE - len(buf), len(data))
                buf += data[:pos]
                if len(buf) < HEADER_SIZE:
                    return frames
            length = self._check(buf, 0)[0]
            take = min(HEADER_SIZE + length - len(buf), len(data) - pos)
            buf += memoryview(data)[pos:pos + take]
            pos += take
            if len(buf) < HEADER_SIZE + length:
                return frames
            whole = bytes(buf)
            buf.clear()
            self._cut(whole, 0, frames)
        pos = self._cut(data, pos, frames)
        if pos < len(data):
            buf += memoryview(data)[pos:]
        return frames

    def _cut(self, src: bytes, pos: int, frames: list[Frame]) -> int:
        """Append every complete frame of ``src`` from ``pos`` as zero-copy views; return where the first
        incomplete one starts."""
        end = len(src)
        view = memoryview(src)
        check = self._check
        while end - pos >= HEADER_SIZE:
            length, kind, flags, relid, data_len = check(src, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            split = stop - data_len
            frames.append(Frame(kind, relid, view[start:split], view[split:stop] if data_len else b"", flags))
            pos = stop
        return pos


_FIRST_KIND, _LAST_KIND = int(FrameKind.HELLO), int(FrameKind.CLOSE)
