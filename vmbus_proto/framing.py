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
ENVELOPE_VERSION = 2  # 2: per-channel data windows (HELLO data_window, SIGNAL data_read_index)


class FrameKind(enum.IntEnum):
    HELLO = 1  # envelope handshake: partition name, authentication method and nonce
    CONTROL = 2  # one VMBus channel message (CHANNELMSG_*)
    PACKET = 3  # one ring packet of channel ``relid``
    SIGNAL = 4  # ring header fields a peer cannot see in shared memory: indices, pending_send_sz, mask
    CLOSE = 5  # the sender is closing the connection, with a reason
    AUTH = 6  # the challenge-response proof of a partition's secret (vmbus_proto.auth)
    IOPORT = 7  # one trapped IN/OUT and its answer, for the emulated devices (vmbus_proto.ioport)
    EVENT = 8  # a channel's event (HvSignalEvent / SynIC event flag) when its rings are in shared memory


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


CHUNK = 256 * 1024  # the largest chunk a socket read lands in: frames are cut out of it as views
BIG_FRAME = 64 * 1024  # a frame at least this large gets a buffer of its own, read into directly
MIN_READ = 4096  # the smallest chunk; one with less room left than this is replaced before the next read


class FrameDecoder:
    """Streaming decoder in the shape of ``asyncio.BufferedProtocol``: ``get_buffer()`` says where the next
    read goes, ``buffer_updated(n)`` returns the frames completed by those ``n`` bytes; ``feed(bytes)`` does
    both for a caller that already holds the bytes. Bad input raises ``FrameError``.

    Reads land in a chunk; complete frames are cut out of it as zero-copy views, and the chunk is never
    written again below what was handed out (a full chunk is replaced, and the partial frame at its end, at
    most ``BIG_FRAME`` bytes, copied to the new one). Chunks start at ``MIN_READ`` and double, up to
    ``CHUNK``, while reads fill them, and halve when reads come in small, so an idle connection holds
    4 KiB. A bulk frame (``BIG_FRAME`` or more) gets a buffer of exactly its size and the reads go straight
    into it, so its data is copied by the kernel only. A header that announces more than ``max_frame``
    bytes fails at once, before anything is allocated for it, so a peer can never make us hold more than
    one maximal frame.
    """

    __slots__ = ("_big", "_big_fill", "_chunk", "_end", "_error", "_need", "_offered", "_size", "_start",
                 "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._size = MIN_READ  # the next chunk's size
        self._chunk = bytearray(0)
        self._offered = 0  # the size of the buffer the last get_buffer returned
        self._start = 0  # where the first incomplete frame begins
        self._end = 0  # bytes of the chunk filled
        self._need = 0  # total size of the incomplete frame at _start, once its header is in
        self._big: bytearray | None = None
        self._big_fill = 0
        self._error: FrameError | None = None
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not complete yet."""
        return self._big_fill if self._big is not None else self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read should go (never empty)."""
        big = self._big
        if big is not None:
            return memoryview(big)[self._big_fill:]
        size = len(self._chunk)
        if self._start + max(self._need, HEADER_SIZE) > size or size - self._end < MIN_READ:
            left = self._chunk[self._start:self._end]  # the partial frame: a copy, under BIG_FRAME bytes
            self._chunk = bytearray(max(self._size, len(left) + MIN_READ, self._need))
            self._chunk[:len(left)] = left
            self._start, self._end = 0, len(left)
        buf = memoryview(self._chunk)[self._end:]
        self._offered = len(buf)
        return buf

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were read into the last ``get_buffer()``. After an error the stream is dead: every
        later call raises it again."""
        if self._error is not None:
            raise self._error
        try:
            return self._updated(nbytes)
        except FrameError as exc:
            self._error = exc
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode every complete frame in ``data`` (copied into the decoder's buffers, as a read would be)."""
        if self._error is not None:
            raise self._error
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            buf = self.get_buffer()
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos:pos + n]
            pos += n
            frames += self.buffer_updated(n)
        return frames

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

    def _updated(self, nbytes: int) -> list[Frame]:
        frames: list[Frame] = []
        big = self._big
        if big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(big):
                self._big, self._big_fill = None, 0
                self._cut(big, 0, len(big), frames)
            return frames
        self._end += nbytes
        if nbytes == self._offered:  # the read filled what it had: give the next one more room
            self._size = min(CHUNK, self._size * 2)
        elif nbytes < self._offered // 4:
            self._size = max(MIN_READ, self._size // 2)
        chunk = self._chunk
        pos = self._start = self._cut(chunk, self._start, self._end, frames)
        self._need = 0
        if self._end - pos >= HEADER_SIZE:
            self._need = total = HEADER_SIZE + self._check(chunk, pos)[0]
            if total >= BIG_FRAME and pos + total > self._end:
                # A bulk frame: the rest of it is read straight into a buffer of its own.
                self._big = bytearray(total)
                self._big[:self._end - pos] = chunk[pos:self._end]
                self._big_fill = self._end - pos
                self._start = self._end
                self._need = 0
        return frames

    def _cut(self, src: bytearray, pos: int, end: int, frames: list[Frame]) -> int:
        """Append every complete frame of ``src[pos:end]`` as zero-copy views; return where the first
        incomplete one starts."""
        view = memoryview(src)
        unpack, max_frame, new, append = HEADER.unpack_from, self.max_frame, tuple.__new__, frames.append
        while end - pos >= HEADER_SIZE:
            length, kind, flags, reserved, relid, data_len = unpack(src, pos)
            if length > max_frame or not _FIRST_KIND <= kind <= _LAST_KIND or data_len > length or reserved:
                self._check(src, pos)  # raises the error that names what is wrong
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            split = stop - data_len
            # tuple.__new__ builds the Frame without the named tuple's Python-level __new__
            append(new(Frame, (kind, relid, view[start:split], view[split:stop] if data_len else b"", flags)))
            pos = stop
        return pos


_FIRST_KIND, _LAST_KIND = int(FrameKind.HELLO), int(FrameKind.EVENT)
