"""A guest disk as the guest's block layer sees it: the interface the NBD server (``nbd.py``) exports and that the
StorVSC will implement over VMBus, plus two plain implementations used by tests.

The contract is the Linux block layer's, which is also what NBD is modelled on (NBD protocol spec,
NetworkBlockDevice/nbd doc/proto.md, "Ordering of messages and writes"; the kernel's
Documentation/block/writeback_cache_control.rst):

* requests are whole logical blocks (``offset`` and ``length`` multiples of ``block_size``), lie inside
  ``size``, are at most ``max_transfer`` bytes and are never empty; a caller with larger or unaligned requests
  splits and aligns them first (``nbd.py`` does);
* a write may complete into a volatile cache; ``write(fua=True)`` (``REQ_FUA``, SCSI WRITE with FUA=1) does
  not complete until its data is durable; ``flush()`` (``REQ_PREFLUSH``, SCSI SYNCHRONIZE CACHE) makes every
  write that completed before it was called durable, whoever issued it (the cache is the device's, so one
  flush covers all callers);
* after ``discard()`` (``REQ_OP_DISCARD``, SCSI UNMAP or WRITE SAME with UNMAP) the range's contents are
  unspecified until rewritten;
* ``write_zeroes(may_unmap=...)`` (``REQ_OP_WRITE_ZEROES``; ``REQ_NOUNMAP`` is ``may_unmap=False``) makes the
  range read as zeros; with ``may_unmap`` the device may deallocate it instead of writing (a hole);
* discard and write_zeroes take any whole-block range inside the disk, however long (the device splits it);
* ``block_status()`` says which ranges are allocated: extents ``(length, flags)`` from ``offset`` on, flags
  ``EXTENT_HOLE`` (deallocated) and ``EXTENT_ZERO`` (reads as zeros), the NBD ``base:allocation`` bits; a
  device that cannot tell reports everything allocated;
* failures raise ``BlockDeviceError`` with ``EIO`` (medium or transport error), ``EPERM`` (write to a
  read-only disk), ``ENOSPC`` (out of space, e.g. a thin backing store) or ``EINVAL`` (a request that breaks
  the rules above).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

SECTOR = 512
DEFAULT_MAX_TRANSFER = 1024 * 1024
EXTENT_HOLE = 1 << 0
EXTENT_ZERO = 1 << 1

T = TypeVar("T")


class BlockDeviceError(Exception):
    """A failed block request; ``errno`` is EIO, EPERM, ENOSPC or EINVAL."""

    def __init__(self, code: int, message: str = "") -> None:
        self.errno = code
        super().__init__(message or os.strerror(code))


@runtime_checkable
class BlockDevice(Protocol):
    """A disk of ``size`` bytes in ``block_size`` logical blocks (see the module docstring for the rules)."""

    size: int
    block_size: int
    read_only: bool
    max_transfer: int
    supports_discard: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]: ...


def check_geometry(size: int, block_size: int, max_transfer: int) -> None:
    """Raise ValueError unless the numbers describe a disk a caller can split requests for."""
    if block_size <= 0 or block_size & (block_size - 1) or block_size > 64 * 1024:
        raise ValueError(f"block size {block_size}: expected a power of two up to 64 KiB")
    if size < 0 or size % block_size:
        raise ValueError(f"size {size}: expected a whole number of {block_size}-byte blocks")
    if max_transfer < block_size or max_transfer % block_size:
        raise ValueError(f"max transfer {max_transfer}: expected a positive multiple of {block_size}")


def check_request(dev: BlockDevice, offset: int, length: int, *, writing: bool = False,
                  bounded: bool = True) -> None:
    """Enforce the request rules of the module docstring (``bounded``: at most ``max_transfer`` bytes); raise
    BlockDeviceError (EPERM or EINVAL)."""
    if writing and dev.read_only:
        raise BlockDeviceError(errno.EPERM, "read-only disk")
    if length <= 0 or (bounded and length > dev.max_transfer):
        raise BlockDeviceError(errno.EINVAL, f"length {length} outside 1..{dev.max_transfer}")
    if offset < 0 or offset % dev.block_size or length % dev.block_size:
        raise BlockDeviceError(errno.EINVAL, f"request {offset}+{length} not aligned to {dev.block_size}")
    if offset + length > dev.size:
        raise BlockDeviceError(errno.EINVAL, f"request {offset}+{length} beyond the {dev.size}-byte disk")


class MemoryBlockDevice:
    """A disk in a bytearray. Discarded ranges read back as zeroes; block status says all is allocated.
    ``counts`` tallies requests by kind (``read``, ``write``, ``fua_write``, ``flush``, ``discard``,
    ``write_zeroes``, ``write_zeroes_unmap``) so tests can see what reached the device."""

    def __init__(self, size: int, read_only: bool = False, *, block_size: int = SECTOR,
                 max_transfer: int = DEFAULT_MAX_TRANSFER, supports_discard: bool = True) -> None:
        check_geometry(size, block_size, max_transfer)
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.max_transfer = max_transfer
        self.supports_discard = supports_discard
        self.data = bytearray(size)
        self.counts: collections.Counter[str] = collections.Counter()

    async def read(self, offset: int, length: int) -> bytes:
        check_request(self, offset, length)
        self.counts["read"] += 1
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        check_request(self, offset, len(data), writing=True)
        self.counts["fua_write" if fua else "write"] += 1
        self.data[offset:offset + len(data)] = data

    async def flush(self) -> None:
        self.counts["flush"] += 1

    async def discard(self, offset: int, length: int) -> None:
        check_request(self, offset, length, writing=True, bounded=False)
        if not self.supports_discard:
            raise BlockDeviceError(errno.EINVAL, "discard not supported")
        self.counts["discard"] += 1
        self.data[offset:offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        check_request(self, offset, length, writing=True, bounded=False)
        self.counts["write_zeroes_unmap" if may_unmap else "write_zeroes"] += 1
        self.data[offset:offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        check_request(self, offset, length, bounded=False)
        return [(length, 0)]


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


_fallocate: Callable[[int, int, int, int], int] | None = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Python only wraps posix_fallocate)."""
    global _fallocate
    if _fallocate is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if fn is None:
            raise OSError(errno.ENOSYS, "no fallocate in libc")
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _pwrite_all(fd: int, view: memoryview, offset: int, flags: int = 0) -> None:
    done = 0
    while done < len(view):
        if flags:
            done += os.pwritev(fd, [view[done:]], offset + done, flags)
        else:
            done += os.pwrite(fd, view[done:], offset + done)


def _pwrite_zeros(fd: int, offset: int, length: int) -> None:
    zeroes = memoryview(bytes(min(length, DEFAULT_MAX_TRANSFER)))
    for pos in range(offset, offset + length, len(zeroes)):
        _pwrite_all(fd, zeroes[:min(len(zeroes), offset + length - pos)], pos)


class FileBlockDevice:
    """A disk in a regular file (or a block device node): pread/pwrite in the default executor, FUA as a
    ``RWF_DSYNC`` pwritev (``fdatasync`` where that flag is missing), flush as ``fdatasync``, discard as a
    punched hole (zeroes written where the file system cannot punch). Close it when done."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False, *, block_size: int = SECTOR,
                 max_transfer: int = DEFAULT_MAX_TRANSFER) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            check_geometry(size, block_size, max_transfer)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.block_size = block_size
        self.max_transfer = max_transfer
        self.supports_discard = not read_only
        self._punch = True

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, block_size: int = SECTOR,
               max_transfer: int = DEFAULT_MAX_TRANSFER) -> FileBlockDevice:
        """Create (or truncate) a sparse file of ``size`` bytes and open it read-write."""
        check_geometry(size, block_size, max_transfer)
        with open(path, "wb") as f:
            f.truncate(size)
        return cls(path, block_size=block_size, max_transfer=max_transfer)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _io(self, fn: Callable[[], T]) -> T:
        if self.fd < 0:
            raise BlockDeviceError(errno.EIO, "device closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code in (errno.EDQUOT, errno.EFBIG):
                code = errno.ENOSPC
            raise BlockDeviceError(code if code in (errno.ENOSPC, errno.EPERM) else errno.EIO, str(exc)) from exc

    async def read(self, offset: int, length: int) -> bytes:
        check_request(self, offset, length)

        def run() -> bytes:
            parts: list[bytes] = []
            done = 0
            while done < length:
                chunk = os.pread(self.fd, length - done, offset + done)
                if not chunk:
                    raise OSError(errno.EIO, "short read")
                parts.append(chunk)
                done += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)

        return await self._io(run)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        check_request(self, offset, len(data), writing=True)
        view = memoryview(data).cast("B")
        dsync = getattr(os, "RWF_DSYNC", 0) if fua else 0

        def run() -> None:
            _pwrite_all(self.fd, view, offset, dsync)
            if fua and not dsync:
                os.fdatasync(self.fd)

        await self._io(run)

    async def flush(self) -> None:
        await self._io(lambda: os.fdatasync(self.fd))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if may_unmap and self.supports_discard:
            await self.discard(offset, length)  # a punched hole reads as zeros, and so does the fallback
            return
        check_request(self, offset, length, writing=True, bounded=False)
        await self._io(lambda: _pwrite_zeros(self.fd, offset, length))

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        check_request(self, offset, length, bounded=False)
        return [(length, 0)]

    async def discard(self, offset: int, length: int) -> None:
        check_request(self, offset, length, writing=True, bounded=False)

        def run() -> None:
            if self._punch:
                try:
                    _punch_hole(self.fd, offset, length)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                        raise
                    self._punch = False
            _pwrite_zeros(self.fd, offset, length)

        await self._io(run)
