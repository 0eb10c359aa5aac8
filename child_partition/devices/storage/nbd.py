"""NBD server: exports a child partition's disks (``BlockDevice``s, one export per LUN) so that real NBD clients --
qemu-img, qemu-io, nbdcopy, nbdinfo, the kernel's nbd-client -- can act as the guest's block layer.

What is mirrored is the NBD protocol as defined in the NBD protocol spec, NetworkBlockDevice/nbd doc/proto.md
(section names below are that document's):

* "Fixed newstyle negotiation": NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES; client flags
  other than C_FIXED_NEWSTYLE | C_NO_ZEROES drop the connection. Option haggling ("Option types"):
  NBD_OPT_EXPORT_NAME (old-style end, 124 zero bytes unless C_NO_ZEROES; an unknown name is a hard
  disconnect because this option cannot fail), NBD_OPT_ABORT, NBD_OPT_LIST (every export, with its
  description), NBD_OPT_INFO and NBD_OPT_GO with NBD_INFO_EXPORT always, NBD_INFO_BLOCK_SIZE always (a server
  may send it unrequested), NBD_INFO_NAME and NBD_INFO_DESCRIPTION when requested. NBD_OPT_STRUCTURED_REPLY is
  acknowledged. NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT ("Metadata querying") know one
  context, ``base:allocation``; SET needs structured replies first, and a selection made for one export does
  not carry over to another. NBD_OPT_STARTTLS, NBD_OPT_EXTENDED_HEADERS and every unknown option get
  NBD_REP_ERR_UNSUP (NOTLS mode); an unknown export gets NBD_REP_ERR_UNKNOWN; oversized option data is
  skipped and answered NBD_REP_ERR_TOO_BIG. The empty name is the default export: the first one added.
* "Transmission": NBD_CMD_READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE), BLOCK_STATUS (with REQ_ONE,
  once base:allocation is selected) and DISC. Replies are simple ("Simple reply message") unless structured
  replies were negotiated; then a READ is always one structured chunk (OFFSET_DATA, or ERROR with a message),
  so is any failure, and BLOCK_STATUS is one BLOCK_STATUS chunk; other successes stay simple, as the spec
  allows. Transmission flags HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM (if the device discards),
  SEND_WRITE_ZEROES, CAN_MULTI_CONN, and READ_ONLY (which drops TRIM and WRITE_ZEROES). CAN_MULTI_CONN holds
  because every connection reaches the one device, whose flush covers every completed write whoever issued
  it, and the read-modify-write locks are shared by all connections. NBD_CMD_FLAG_FUA reaches the device
  as ``write(fua=True)`` on every piece of the request (and as a flush after a TRIM or WRITE_ZEROES).
  Requests are served concurrently and replied to out of order, bounded per connection by request count
  and by payload bytes (the socket stops being read when the budget is spent). NBD_CMD_DISC and server
  shutdown finish the requests in flight before closing ("Terminating the transmission phase").
* Sparseness: TRIM is one device ``discard`` of the whole blocks inside the range; WRITE_ZEROES is one device
  ``write_zeroes`` of its whole blocks, which may deallocate them unless the client set NO_HOLE (edge blocks
  by read-modify-write). BLOCK_STATUS reports the device's ``block_status`` as base:allocation extents
  (NBD_STATE_HOLE, NBD_STATE_ZERO), clipped to the request.
* "Block size constraints": minimum 1 -- unaligned requests are served by read-modify-write of the edge
  blocks, serialised per block across all connections, so clients that never ask (NBD_OPT_EXPORT_NAME,
  or GO without NBD_INFO_BLOCK_SIZE) get the spec's defaults; preferred max(4096, device block); maximum
  the device's ``max_transfer`` raised to the spec's 1 MiB floor and capped at 32 MiB. Reads and writes
  reach the device split into aligned pieces of at most ``max_transfer``. The advertised maximum binds READ
  and WRITE only for a client that asked for NBD_INFO_BLOCK_SIZE in its NBD_OPT_GO; other clients may send
  them up to 2^25 bytes, which the spec says must not be treated as abuse. TRIM, WRITE_ZEROES and
  BLOCK_STATUS carry no payload and are served at any length inside the export: the spec would let
  WRITE_ZEROES over the maximum fail with NBD_EINVAL, but nbdcopy (libnbd 1.14) zeroes whole holes of tens of
  MiB in one request.
* "Error values": out of range is NBD_EINVAL for READ, TRIM and BLOCK_STATUS and NBD_ENOSPC for WRITE and
  WRITE_ZEROES; writes to a read-only export NBD_EPERM; unknown commands, flags not valid for the command
  (DF, FAST_ZERO: never advertised), a FLUSH with offset or length, BLOCK_STATUS without a selected context,
  and lengths over the limit NBD_EINVAL. The payload of a refused WRITE is still read and dropped, so the
  stream stays in step. A request with bad magic is a hard disconnect.

Not implemented: TLS, extended headers, DF (READ is always one chunk anyway), NBD_CMD_CACHE, fast zero,
oldstyle negotiation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote

from vmbus_proto.aio import logs

from .blockdev import BlockDevice, BlockDeviceError, check_geometry

T = TypeVar("T")

# Handshake ("Newstyle negotiation", "Fixed newstyle negotiation").
NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Option types.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# Option reply types.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REP_ERR_POLICY = (1 << 31) + 2
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_REP_ERR_PLATFORM = (1 << 31) + 4
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6
NBD_REP_ERR_SHUTDOWN = (1 << 31) + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
NBD_REP_ERR_TOO_BIG = (1 << 31) + 9

# Information types (NBD_REP_INFO).
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Transmission flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Transmission: requests and simple replies.
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_DISC: "disc", NBD_CMD_FLUSH: "flush",
                 NBD_CMD_TRIM: "trim", NBD_CMD_CACHE: "cache", NBD_CMD_WRITE_ZEROES: "write_zeroes",
                 NBD_CMD_BLOCK_STATUS: "block_status"}

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Structured replies ("Structured reply chunk message") and the base:allocation context.
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our context id for it
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
MAX_EXTENTS = 1024  # descriptors in one block status reply

# Error values: the wire numbers are the spec's, whatever this platform's errno numbering. NBD_EOVERFLOW and
# NBD_ENOTSUP are reserved for DF and fast zero, which this server never advertises.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
_ERRNO_TO_NBD = {errno.EPERM: NBD_EPERM, errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM,
                 errno.EINVAL: NBD_EINVAL, errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC,
                 errno.EFBIG: NBD_ENOSPC, errno.EOVERFLOW: NBD_EINVAL, errno.ENOTSUP: NBD_EINVAL,
                 errno.ESHUTDOWN: NBD_ESHUTDOWN, errno.EROFS: NBD_EPERM}

HANDSHAKE = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")

# Limits.
MAX_REQUEST = 32 * 1024 * 1024  # 2^25: the spec's portable READ/WRITE limit, never to be treated as abuse
MIN_ADVERTISED_MAX = 1024 * 1024  # the spec's SHOULD floor for the maximum block size
PREFERRED_BLOCK = 4096
MAX_STRING = 4096  # the spec's ceiling for names and messages
MAX_OPTION_DATA = 64 * 1024
MAX_OPTIONS = 1024  # option haggling longer than this is a denial of service
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
CHUNK_CONCURRENCY = 8  # device requests in flight for one large NBD request
STREAM_LIMIT = 4 * 1024 * 1024
SKIP_CHUNK = 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0
SHUTDOWN_GRACE = 10.0


class NbdProtocolError(Exception):
    """The client broke a MUST of the protocol; the server hangs up (a hard disconnect)."""


def parse_listen(url: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> ("tcp", host, port); ``unix:PATH`` -> ("unix", path,
    0)."""
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{url}: expected unix:PATH")
        return "unix", path, 0
    rest = url[6:] if url.startswith("tcp://") else url
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or "/" in rest:
        raise ValueError(f"{url}: expected tcp://HOST:PORT, HOST:PORT or unix:PATH")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{url}: bad port {port!r}")
    return "tcp", host, int(port)


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value for a failed device request (NBD_EIO for anything unrecognised)."""
    code = exc.errno if isinstance(exc, (BlockDeviceError, OSError)) else None
    return _ERRNO_TO_NBD.get(code or errno.EIO, NBD_EIO)


class _Budget:
    """Requests and payload bytes in flight on one connection. Only the connection's reader waits."""

    def __init__(self, requests: int, nbytes: int) -> None:
        self.requests = requests
        self.bytes = nbytes
        self.cap = nbytes
        self._waiter: asyncio.Future[None] | None = None

    async def acquire(self, nbytes: int) -> int:
        charge = min(nbytes, self.cap)  # one huge request may use the whole budget, alone
        while self.requests <= 0 or self.bytes < charge:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self.requests -= 1
        self.bytes -= charge
        return charge

    def release(self, charge: int) -> None:
        self.requests += 1
        self.bytes += charge
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _BlockLocks:
    """Per-block exclusion for read-modify-write: two unaligned writes sharing a block (disjoint bytes, so
    no overlap the client can see) must not both write back a stale copy of it."""

    def __init__(self) -> None:
        self._held: dict[int, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def hold(self, blocks: Iterable[int]) -> AsyncIterator[None]:
        mine: list[int] = []
        try:
            for block in sorted(set(blocks)):  # one global order, so no deadlock
                while (busy := self._held.get(block)) is not None:
                    await busy.wait()
                self._held[block] = asyncio.Event()
                mine.append(block)
            yield
        finally:
            for block in mine:
                self._held.pop(block).set()


class _Export:
    """The device as NBD sees it: any byte range, any length; requests become aligned device requests of at
    most ``max_transfer`` bytes, with read-modify-write at unaligned edges. Shared by all connections."""

    def __init__(self, device: BlockDevice, name: str, description: str) -> None:
        check_geometry(device.size, device.block_size, device.max_transfer)
        self.device = device
        self.name = name
        self.description = description
        self.size = device.size
        self.block = device.block_size
        self.step = device.max_transfer
        self.read_only = device.read_only
        self.min_block = 1
        self.preferred_block = max(PREFERRED_BLOCK, self.block)
        self.max_block = min(MAX_REQUEST, max(self.step, MIN_ADVERTISED_MAX, self.preferred_block))
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_WRITE_ZEROES
            if device.supports_discard:
                flags |= NBD_FLAG_SEND_TRIM
        self.flags = flags
        # The commands this export serves and the command flags valid for each.
        self.command_flags = {NBD_CMD_READ: NBD_CMD_FLAG_FUA, NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
                              NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA}
        if flags & NBD_FLAG_SEND_TRIM:
            self.command_flags[NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA
        if flags & NBD_FLAG_SEND_WRITE_ZEROES:
            self.command_flags[NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE
        self.locks = _BlockLocks()
        if self.size:  # NBD_CMD_BLOCK_STATUS, once a client has selected base:allocation
            self.command_flags[NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_REQ_ONE


    async def _pieces(self, offset: int, length: int, fn: Callable[[int, int], Awaitable[T]]) -> list[T]:
        """``fn(offset, length)`` over ``max_transfer`` pieces, a few at a time; results in order."""
        if length <= self.step:
            return [await fn(offset, length)]
        end = offset + length
        starts = iter(enumerate(range(offset, end, self.step)))
        results: list[Any] = [None] * ((length + self.step - 1) // self.step)
        errors: list[BaseException] = []

        async def worker() -> None:
            for i, start in starts:
                if errors:
                    return
                try:
                    results[i] = await fn(start, min(self.step, end - start))
                except Exception as exc:
                    errors.append(exc)
                    return

        await asyncio.gather(*(worker() for _ in range(min(CHUNK_CONCURRENCY, len(results)))))
        if errors:
            raise errors[0]
        return results

    async def _device_read(self, offset: int, length: int) -> bytes:
        data = await self.device.read(offset, length)
        if len(data) != length:
            raise BlockDeviceError(errno.EIO, f"device returned {len(data)} of {length} bytes")
        return data

    async def read(self, offset: int, length: int) -> list[bytes | memoryview]:
        """The bytes at offset..offset+length, as buffers to send in order."""
        if length == 0:
            return []
        start = offset - offset % self.block
        end = -(-(offset + length) // self.block) * self.block
        parts: list[bytes | memoryview] = list(await self._pieces(start, end - start, self._device_read))
        if start != offset or end != offset + length:
            head, tail = offset - start, end - offset - length
            if len(parts) == 1:
                parts[0] = memoryview(parts[0])[head:len(parts[0]) - tail]
            else:
                parts[0] = memoryview(parts[0])[head:]
                parts[-1] = memoryview(parts[-1])[:len(parts[-1]) - tail]
        return parts

    async def _write_aligned(self, offset: int, data: memoryview, fua: bool) -> None:
        async def piece(start: int, n: int) -> None:
            await self.device.write(start, data[start - offset:start - offset + n], fua)

        await self._pieces(offset, len(data), piece)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        length = len(data)
        view = memoryview(data).cast("B")
        if length == 0:
            return
        if offset % self.block == 0 and length % self.block == 0:
            await self._write_aligned(offset, view, fua)
            return
        start = offset - offset % self.block
        end = -(-(offset + length) // self.block) * self.block
        first, last = start // self.block, end // self.block - 1
        edges = [b for b, partial in ((first, offset != start), (last, offset + length != end)) if partial]
        async with self.locks.hold(edges):
            span = bytearray(end - start)
            for block in sorted(set(edges)):
                pos = block * self.block - start
                span[pos:pos + self.block] = await self._device_read(block * self.block, self.block)
            span[offset - start:offset - start + length] = view
            await self._write_aligned(start, memoryview(span), fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_unmap: bool) -> None:
        """Zero the range: whole blocks as one device write-zeroes (which may punch a hole unless the client
        said NO_HOLE), partial edge blocks by read-modify-write."""
        if length == 0:
            return
        start = -(-offset // self.block) * self.block
        end = (offset + length) // self.block * self.block
        if start >= end:  # inside one block
            await self.write(offset, bytes(length), fua)
            return
        if offset < start:
            await self.write(offset, bytes(start - offset), fua)
        await self.device.write_zeroes(start, end - start, may_unmap)
        if end < offset + length:
            await self.write(end, bytes(offset + length - end), fua)
        if fua:
            await self.device.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard the whole blocks inside the range (the spec lets a server round a TRIM inwards)."""
        start = -(-offset // self.block) * self.block
        end = (offset + length) // self.block * self.block
        if start < end:
            await self.device.discard(start, end - start)
        if fua:
            await self.device.flush()

    async def block_status(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """base:allocation extents from ``offset``: (length, NBD_STATE_* flags), none past the request."""
        start = offset - offset % self.block
        end = min(-(-(offset + length) // self.block) * self.block, self.size)
        extents: list[tuple[int, int]] = []
        pos, cursor = offset, start
        for n, flags in await self.device.block_status(start, end - start):
            cursor += n
            piece = min(cursor, offset + length) - pos
            if piece <= 0:
                continue
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + piece, flags)
            else:
                extents.append((piece, flags))
            pos += piece
            if len(extents) >= MAX_EXTENTS or pos >= offset + length:
                break
        return extents[:1] if one else extents[:MAX_EXTENTS]

    async def flush(self) -> None:
        await self.device.flush()


class _Connection:
    """One client: handshake, then requests until DISC, a hard disconnect, or server shutdown."""

    def __init__(self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 log: Any) -> None:
        self.server = server
        self.export: _Export | None = None  # chosen by NBD_OPT_GO / NBD_OPT_EXPORT_NAME
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self.contexts: tuple[str, list[int]] | None = None  # export name and selected meta context ids
        self.reader = reader
        self.writer = writer
        self.log = log
        self.task: asyncio.Task[None] | None = None
        self.block_size_acked = False
        self.max_payload = MAX_REQUEST
        self.inflight: set[asyncio.Task[None]] = set()
        self.budget = _Budget(server.max_inflight, server.max_inflight_bytes)
        self.requests = 0

    # -- plumbing ---------------------------------------------------------------------------------------------

    async def _send(self, *parts: bytes | memoryview) -> None:
        if self.writer.is_closing():
            return
        for part in parts:
            self.writer.write(part)
        try:
            await self.writer.drain()
        except ConnectionError:
            self.writer.transport.abort()

    async def _skip(self, length: int) -> None:
        while length > 0:
            n = min(length, SKIP_CHUNK)
            await self.reader.readexactly(n)
            length -= n

    async def run(self) -> None:
        reason = "client closed"
        try:
            async with asyncio.timeout(self.server.handshake_timeout):
                ok = await self._handshake()
            if not ok:
                reason = "client aborted negotiation"
                return
            assert self.export is not None
            self.log.info("nbd transmission", export=self.export.name, flags=hex(self.export.flags),
                          size=self.export.size, block_size_acked=self.block_size_acked,
                          structured=self.structured, contexts=self.contexts[1] if self.contexts else [])
            reason = await self._transmission()
        except NbdProtocolError as exc:
            reason = f"protocol violation: {exc}"
            self.log.warning("nbd hard disconnect", reason=str(exc))
        except TimeoutError:
            reason = "handshake timed out"
            self.log.warning("nbd hard disconnect", reason=reason)
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = "client went away"
        except asyncio.CancelledError:
            reason = "server shutdown"
            raise
        finally:
            await self._finish(reason)

    async def _finish(self, reason: str) -> None:
        try:
            if self.inflight:
                await asyncio.gather(*self.inflight, return_exceptions=True)
        except asyncio.CancelledError:
            for task in self.inflight:
                task.cancel()
            self.writer.transport.abort()
            raise
        finally:
            self.log.info("nbd connection closed", reason=reason, requests=self.requests)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    # -- handshake ("Fixed newstyle negotiation") ------------------------------------------------------------

    async def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        await self._send(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data)) + data)

    async def _opt_error(self, opt: int, rep: int, message: str) -> None:
        self.log.debug("nbd option refused", option=opt, reply=hex(rep), message=message)
        await self._opt_reply(opt, rep, message.encode()[:MAX_STRING])

    @staticmethod
    def _export_info(export: _Export) -> bytes:
        return struct.pack(">QH", export.size, export.flags)

    async def _handshake(self) -> bool:
        """Option haggling; True once transmission is to start, False after NBD_OPT_ABORT."""
        await self._send(HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self.reader.readexactly(4))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise NbdProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = OPTION_HEADER.unpack(await self.reader.readexactly(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic {magic:#x}")
            if opt == NBD_OPT_EXPORT_NAME:
                if length > MAX_STRING:
                    raise NbdProtocolError(f"export name of {length} bytes")
                name = (await self.reader.readexactly(length)).decode(errors="replace")
                export = self.server.lookup(name)
                if export is None:
                    raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
                await self._send(self._export_info(export) + (b"" if no_zeroes else bytes(124)))
                self._enter(export)
                return True
            if length > MAX_OPTION_DATA:
                await self._skip(length)
                await self._opt_error(opt, NBD_REP_ERR_TOO_BIG, f"option data of {length} bytes")
                continue
            data = await self.reader.readexactly(length)
            if opt == NBD_OPT_ABORT:
                await self._opt_reply(opt, NBD_REP_ACK)
                return False
            if opt == NBD_OPT_LIST:
                await self._opt_list(data)
            elif opt in (NBD_OPT_INFO, NBD_OPT_GO):
                if await self._opt_info(opt, data) and opt == NBD_OPT_GO:
                    return True
            elif opt == NBD_OPT_STRUCTURED_REPLY:
                if data:
                    await self._opt_error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                else:
                    self.structured = True
                    await self._opt_reply(opt, NBD_REP_ACK)
            elif opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                await self._opt_meta_context(opt, data)
            elif opt == NBD_OPT_STARTTLS:
                await self._opt_error(opt, NBD_REP_ERR_UNSUP, "TLS is not supported")
            else:
                await self._opt_error(opt, NBD_REP_ERR_UNSUP, f"option {opt} is not supported")
        raise NbdProtocolError(f"more than {MAX_OPTIONS} options")

    async def _opt_list(self, data: bytes) -> None:
        if data:
            await self._opt_error(NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for export in self.server.exports.values():
            name = export.name.encode()
            await self._opt_reply(NBD_OPT_LIST, NBD_REP_SERVER,
                                  struct.pack(">I", len(name)) + name + export.description.encode())
        await self._opt_reply(NBD_OPT_LIST, NBD_REP_ACK)

    @staticmethod
    def _strings(data: bytes, pos: int, count: int) -> list[str] | None:
        """``count`` length-prefixed UTF-8 strings from ``pos`` filling the rest of ``data``, or None."""
        out: list[str] = []
        for _ in range(count):
            if pos + 4 > len(data):
                return None
            (n,) = struct.unpack_from(">I", data, pos)
            if n > MAX_STRING or pos + 4 + n > len(data):
                return None
            try:
                out.append(data[pos + 4:pos + 4 + n].decode())
            except UnicodeDecodeError:
                return None
            pos += 4 + n
        return out if pos == len(data) else None

    async def _opt_meta_context(self, opt: int, data: bytes) -> None:
        """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT ("Metadata querying"): one context,
        base:allocation; SET needs structured replies first and replaces any earlier selection."""
        if opt == NBD_OPT_SET_META_CONTEXT and not self.structured:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = None
        if len(data) >= 8:
            (name_len,) = struct.unpack_from(">I", data)
            if name_len <= min(MAX_STRING, len(data) - 8):
                (count,) = struct.unpack_from(">I", data, 4 + name_len)
                queries = self._strings(data, 8 + name_len, count)
                if queries is not None:
                    try:
                        parsed = (data[4:4 + name_len].decode(), queries)
                    except UnicodeDecodeError:
                        parsed = None
        if parsed is None:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        if self.server.lookup(name) is None:
            await self._opt_error(opt, NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == NBD_OPT_LIST_META_CONTEXT:
            chosen = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            chosen = BASE_ALLOCATION in queries
        if chosen:
            await self._opt_reply(opt, NBD_REP_META_CONTEXT,
                                  struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        if opt == NBD_OPT_SET_META_CONTEXT:
            self.contexts = (name, [BASE_ALLOCATION_ID] if chosen else [])
        await self._opt_reply(opt, NBD_REP_ACK)

    def _enter(self, export: _Export) -> None:
        """Transmission on ``export``; meta contexts selected for another export do not carry over."""
        self.export = export
        if self.contexts is not None and self.server.lookup(self.contexts[0]) is not export:
            self.contexts = None

    async def _opt_info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO; True if the export was accepted."""
        if len(data) < 6:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "option data too short")
            return False
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "export name overruns the option")
            return False
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "information request list does not fit the option")
            return False
        try:
            name = data[4:4 + name_len].decode()
        except UnicodeDecodeError:
            await self._opt_error(opt, NBD_REP_ERR_INVALID, "export name is not UTF-8")
            return False
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        e = self.server.lookup(name)
        if e is None:
            await self._opt_error(opt, NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        info = struct.pack(">H", NBD_INFO_EXPORT) + self._export_info(e)
        await self._opt_reply(opt, NBD_REP_INFO, info)
        if NBD_INFO_NAME in wanted:
            await self._opt_reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + e.name.encode())
        if NBD_INFO_DESCRIPTION in wanted and e.description:
            await self._opt_reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION) + e.description.encode())
        await self._opt_reply(opt, NBD_REP_INFO,
                              struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, e.min_block, e.preferred_block, e.max_block))
        await self._opt_reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            self._enter(e)
            if NBD_INFO_BLOCK_SIZE in wanted:
                self.block_size_acked = True
                self.max_payload = e.max_block
        return True

    # -- transmission ------------------------------------------------------------------------------------------

    def _check(self, e: _Export, cmd: int, flags: int, offset: int, length: int) -> int:
        """The error for a request that must not reach the device, or 0."""
        writes = cmd in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)
        if writes and e.read_only:
            return NBD_EPERM
        allowed = e.command_flags.get(cmd)
        if allowed is None:
            return NBD_EINVAL  # unknown or never advertised (CACHE, BLOCK_STATUS, ...)
        if flags & ~allowed:
            return NBD_EINVAL
        if cmd == NBD_CMD_FLUSH:
            return NBD_EINVAL if offset or length else 0
        if cmd == NBD_CMD_BLOCK_STATUS and (not self.contexts or not self.contexts[1] or not length):
            return NBD_EINVAL  # no context selected (the spec's SHOULD), or nothing asked
        if offset + length > e.size:
            return NBD_ENOSPC if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
        if cmd in (NBD_CMD_READ, NBD_CMD_WRITE) and length > self.max_payload:
            return NBD_EINVAL
        return 0

    async def _reply(self, handle: int, error: int, data: Iterable[bytes | memoryview] = (), *,
                     cmd: int = NBD_CMD_WRITE, offset: int = 0, message: str = "") -> None:
        """The reply to one request: simple, except that with structured replies a READ (data or error) is
        always structured ("Structured reply chunk message"), and so is a failure, to carry its message."""
        if not self.structured or (cmd != NBD_CMD_READ and not error):
            await self._send(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle), *data)
        elif error:
            text = message.encode()[:MAX_STRING]
            await self._chunk(handle, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", error, len(text)), text)
        else:
            parts = list(data)
            n = sum(len(part) for part in parts)
            if n:
                await self._chunk(handle, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset), *parts)
            else:
                await self._chunk(handle, NBD_REPLY_TYPE_NONE)

    async def _chunk(self, handle: int, kind: int, *payload: bytes | memoryview) -> None:
        """One structured reply chunk, the final one (every reply here is a single chunk)."""
        n = sum(len(part) for part in payload)
        await self._send(CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, kind, handle, n), *payload)

    async def _transmission(self) -> str:
        read = self.reader.readexactly
        while True:
            header = await read(REQUEST.size)
            magic, flags, cmd, handle, offset, length = REQUEST.unpack(header)
            if magic != NBD_REQUEST_MAGIC:
                raise NbdProtocolError(f"bad request magic {magic:#x}")
            self.requests += 1
            if cmd == NBD_CMD_DISC:
                return "NBD_CMD_DISC"
            assert self.export is not None
            error = self._check(self.export, cmd, flags, offset, length)
            if error:
                if cmd == NBD_CMD_WRITE:
                    await self._skip(length)  # keep the stream in step
                self.log.debug("nbd request refused", cmd=COMMAND_NAMES.get(cmd, cmd), offset=offset,
                               length=length, flags=flags, error=error)
                await self._reply(handle, error, cmd=cmd, message=f"{COMMAND_NAMES.get(cmd, cmd)} refused")
                continue
            charge = await self.budget.acquire(length if cmd in (NBD_CMD_READ, NBD_CMD_WRITE) else 0)
            payload = b""
            if cmd == NBD_CMD_WRITE:
                try:
                    payload = await read(length)
                except BaseException:
                    self.budget.release(charge)
                    raise
            task = asyncio.create_task(self._serve(cmd, flags, handle, offset, length, payload, charge))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _serve(self, cmd: int, flags: int, handle: int, offset: int, length: int, payload: bytes,
                     charge: int) -> None:
        e = self.export
        assert e is not None
        fua = bool(flags & NBD_CMD_FLAG_FUA)
        try:
            data: list[bytes | memoryview] = []
            message = ""
            try:
                if cmd == NBD_CMD_READ:
                    data = await e.read(offset, length)
                elif cmd == NBD_CMD_WRITE:
                    await e.write(offset, payload, fua)
                elif cmd == NBD_CMD_FLUSH:
                    await e.flush()
                elif cmd == NBD_CMD_TRIM:
                    await e.trim(offset, length, fua)
                elif cmd == NBD_CMD_BLOCK_STATUS:
                    extents = await e.block_status(offset, length, bool(flags & NBD_CMD_FLAG_REQ_ONE))
                    body = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
                        struct.pack(">II", n, f) for n, f in extents)
                    await self._chunk(handle, NBD_REPLY_TYPE_BLOCK_STATUS, body)
                    return
                else:
                    await e.write_zeroes(offset, length, fua, not flags & NBD_CMD_FLAG_NO_HOLE)
                error = 0
            except Exception as exc:
                error = nbd_errno(exc)
                data = []
                message = str(exc)
                # A device error is the guest's answer; anything else is a bug of ours: keep its traceback.
                self.log.warning("nbd request failed", cmd=COMMAND_NAMES.get(cmd, cmd), offset=offset,
                                 length=length, error=error, exc=repr(exc),
                                 exc_info=None if isinstance(exc, (BlockDeviceError, OSError)) else exc)
            await self._reply(handle, error, data, cmd=cmd, offset=offset, message=message)
        finally:
            self.budget.release(charge)


class NbdServer:
    """Serves exports of block devices over TCP or a Unix socket to any number of clients: ``device`` (if
    given) as ``export_name``, and more with :meth:`add_export`. The first export is also the default one
    (the empty name)."""

    def __init__(self, device: BlockDevice | None = None, export_name: str = "", *, description: str = "",
                 log: Any = None, max_inflight: int = MAX_INFLIGHT, max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError("in-flight limits must be positive")
        self.exports: dict[str, _Export] = {}
        if device is not None:
            self.add_export(device, export_name, description)
        self.log = log if log is not None else logs.get(component="nbd", export=export_name)
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self.address = ""
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None
        self._unix_ino: tuple[int, int] | None = None
        self._next_id = 0
        self._closing = False

    def add_export(self, device: BlockDevice, name: str, description: str = "") -> None:
        """Serve ``device`` as ``name`` to clients that connect from now on."""
        for what, text in (("export name", name), ("description", description)):
            if len(text.encode()) > MAX_STRING or "\0" in text:
                raise ValueError(f"{what}: at most {MAX_STRING} UTF-8 bytes, no NUL")
        if name in self.exports or (not name and self.exports):
            raise ValueError(f"export name {name!r} is taken (the empty name is the first export's)")
        self.exports[name] = _Export(device, name, description)

    def lookup(self, name: str) -> _Export | None:
        """The export a client names; the empty name is the default (first) export."""
        if not name:
            return next(iter(self.exports.values()), None)
        return self.exports.get(name)

    @property
    def export(self) -> _Export:
        """The default export."""
        export = self.lookup("")
        if export is None:
            raise LookupError("no exports")
        return export

    @property
    def uri(self) -> str:
        """The default export's NBD URI (``nbd://HOST:PORT/NAME`` or ``nbd+unix:///NAME?socket=PATH``)."""
        return self.uri_for(self.export.name)

    def uri_for(self, export_name: str) -> str:
        """An export's NBD URI."""
        kind, where, port = parse_listen(self.address)
        name = quote(export_name, safe="")
        if kind == "unix":
            return f"nbd+unix:///{name}?socket={quote(where, safe='/')}"
        host = f"[{where}]" if ":" in where else where
        return f"nbd://{host}:{port}/{name}"

    async def start(self, url: str, serving: bool = True) -> str:
        """Listen on ``tcp://HOST:PORT`` (port 0 picks one), ``HOST:PORT`` or ``unix:PATH``; returns the bound
        address in the same form (also in ``.address``). With ``serving=False`` the address is bound (so a
        busy port fails here) but connections wait in the backlog until :meth:`serve`."""
        if self._server is not None:
            raise RuntimeError("already started")
        kind, where, port = parse_listen(url)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(where).st_mode):
                    os.unlink(where)  # a stale socket from a previous run
            self._server = await asyncio.start_unix_server(self._accept, where, limit=STREAM_LIMIT,
                                                           start_serving=serving)
            st = os.lstat(where)
            self._unix_path, self._unix_ino = where, (st.st_dev, st.st_ino)
            self.address = f"unix:{where}"
        else:
            self._server = await asyncio.start_server(self._accept, where, port, limit=STREAM_LIMIT,
                                                      reuse_address=True, start_serving=serving)
            host, bound = self._server.sockets[0].getsockname()[:2]
            self.address = f"tcp://[{host}]:{bound}" if ":" in host else f"tcp://{host}:{bound}"
        if serving:
            self._listening()
        return self.address

    async def serve(self) -> None:
        """Start accepting connections on the address bound by ``start(url, serving=False)``."""
        if self._server is None:
            raise RuntimeError("not started")
        if not self._server.is_serving():
            await self._server.start_serving()
            self._listening()

    def _listening(self) -> None:
        self.log.info("nbd server listening", address=self.address,
                      exports={e.name: {"uri": self.uri_for(e.name), "size": e.size, "read_only": e.read_only}
                               for e in self.exports.values()})

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before close() stopped listening
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the spec's SHOULD
        self._next_id += 1
        peer = writer.get_extra_info("peername")
        conn = _Connection(self, reader, writer, self.log.bind(conn=self._next_id, peer=str(peer or "unix")))
        conn.task = asyncio.current_task()
        self.connections.add(conn)
        conn.log.info("nbd connection")
        try:
            # Cancellation is close() ending this connection; a cancelled stream callback task would be
            # reported by asyncio as an error, so it ends here.
            with contextlib.suppress(asyncio.CancelledError):
                await conn.run()
        finally:
            self.connections.discard(conn)

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop listening; connections stop reading, finish the requests in flight (up to ``grace`` seconds)
        and close; connections still negotiating are dropped."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self._unix_path)
            self._unix_path = None
        self.log.info("nbd server closed", address=self.address)

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
