"""Disk backend: one raw image file behind a SCSI disk, with all file I/O off the event loop.

Mirrors the backend half of OpenVMM's storage stack (vm/devices/storage/disk_backend ``DiskIo``:
``read_vectored``, ``write_vectored(fua)``, ``sync_cache``, ``unmap``; the file-backed disk in
vm/devices/storage/disk_file) for a plain raw image: byte ``n`` of the image is byte ``n`` of the disk.
The image is created sparse (``ftruncate``) at its configured size on first use; an existing image keeps
its size. UNMAP punches holes (``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``, Linux
fallocate(2)); where the filesystem cannot, the range is overwritten with zeros instead, so a deallocated
range always reads as zeros (the target may report LBPRZ). Zeroing that must keep the range allocated
(WRITE SAME without UNMAP) uses ``FALLOC_FL_ZERO_RANGE``, or writes zeros. Which ranges are allocated
(GET LBA STATUS) comes from ``lseek(SEEK_DATA / SEEK_HOLE)`` on the image (lseek(2)).

Durability follows SBC-3 with the write cache enabled: a plain write returns once the data is in the
host's page cache; a write with FUA, and ``flush`` (SYNCHRONIZE CACHE), return only after ``fdatasync``.

Nothing that can wait for a disk runs on the event loop's thread. A read first tries
``preadv2(RWF_NOWAIT)``, which copies data already in the page cache and says EAGAIN rather than wait for
the device (the fast path QEMU and io_uring users take); likewise a write where the filesystem supports
it. Everything else (uncached reads, writes, fdatasync, fallocate, open, close) goes to a bounded thread
pool shared by all disks, through a per-disk submission queue that pool workers drain in batches (one
thread hop per batch). Each disk may occupy at most ``max_inflight`` workers, so one slow image cannot
starve every other partition's disk.

Each disk counts how its I/O went (:meth:`DiskBackend.stats`: reads answered inline, refused by
``RWF_NOWAIT`` and sent to the pool, writes inline and pooled) and logs the counts when it closes
(``disk closed``), so a slow run can be told apart from a cold page cache or a filesystem without
non-blocking buffered I/O (tmpfs answers EOPNOTSUPP: then every read takes the pool).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmbus_proto.aio import logs
from vmbus_proto.packets import Buffer

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_POOL_WORKERS",
    "DiskBackend",
    "DiskError",
    "default_executor",
    "shutdown_default_executor",
]

BLOCK_SIZE = 512
DEFAULT_POOL_WORKERS = 8
DEFAULT_MAX_INFLIGHT = 4  # per disk: half the default pool, so one slow image leaves room for the rest
_ZERO_CHUNK = 1 << 20  # zero-fill fallback for discard writes at most this much per syscall

_FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
# Filesystems without hole punching answer with one of these.
_NO_PUNCH = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})

_T = TypeVar("_T")


class DiskError(OSError):
    """A disk operation failed: ``errno`` is the OS error number, ``strerror`` says what and where."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def default_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The module-wide disk I/O pool (``DEFAULT_POOL_WORKERS`` threads), created on first use."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=DEFAULT_POOL_WORKERS, thread_name_prefix="disk-io")
        return _executor


def shutdown_default_executor(wait: bool = True) -> None:
    """Stop the module-wide pool; a later ``default_executor()`` starts a fresh one."""
    global _executor
    with _executor_lock:
        pool, _executor = _executor, None
    if pool is not None:
        pool.shutdown(wait=wait)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc ``fallocate`` (the 64-bit-offset entry point when libc has one), or None off Linux."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    result: Callable[[int, int, int, int], int] = func
    return result


_fallocate = _load_fallocate()


_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def _settle(batch: list[tuple[asyncio.Future[Any], object, BaseException | None]]) -> None:
    for fut, result, exc in batch:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _oserror(op: str, exc: OSError) -> DiskError:
    code = exc.errno if exc.errno else errno.EIO
    return DiskError(code, f"{op}: {exc.strerror or os.strerror(code)}")


class DiskBackend:
    """One open raw image file. Construct with :meth:`open`; all I/O methods are coroutines."""

    def __init__(self, fd: int, path: Path, size: int, read_only: bool, *,
                 executor: concurrent.futures.Executor | None = None,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._fd = fd
        self._path = path
        self._size = size
        self._read_only = read_only
        self._executor = executor
        self._max_workers = max_inflight
        self._closed = False
        # The submission queue: the loop appends, pool workers drain it in batches and hand the results
        # back to the loop in one callback per batch (one thread hop per batch, not per request).
        self._queue: collections.deque[tuple[Callable[..., Any], tuple[object, ...], asyncio.Future[Any]]] = (
            collections.deque())
        self._lock = threading.Lock()
        self._workers = 0
        self._workers_gone = asyncio.Event()  # set (on the loop) by the last worker to leave once closed
        self._outstanding: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nowait_read = _RWF_NOWAIT != 0
        self._nowait_write = _RWF_NOWAIT != 0
        # How the I/O went (plain ints: only the loop's thread counts).
        self.reads_inline = 0  # answered from the page cache on the loop's thread
        self.reads_nowait_refused = 0  # RWF_NOWAIT said EAGAIN or read short: not (all) cached
        self.reads_pool = 0  # handed to a pool thread (after a refusal, or with no RWF_NOWAIT at all)
        self.writes_inline = 0
        self.writes_pool = 0

    # -- opening and closing ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None, create: bool = True,
             read_only: bool = False, *, executor: concurrent.futures.Executor | None = None,
             max_inflight: int = DEFAULT_MAX_INFLIGHT) -> DiskBackend:
        """Open (and if missing and ``create``, first create sparse at ``size`` bytes) a raw image.

        Blocking: call it at startup or from the pool (``open_disks`` does the latter). An existing image
        keeps its own size whatever ``size`` says; its size must be a non-zero multiple of 512.
        """
        image = Path(path)
        if size is not None and (size <= 0 or size % BLOCK_SIZE):
            raise DiskError(errno.EINVAL, f"{image}: size {size} is not a positive multiple of {BLOCK_SIZE}")
        if create and not image.exists():
            if size is None:
                raise DiskError(errno.EINVAL, f"{image}: no size given to create the image with")
            cls._create(image, size)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(image, flags)
        except OSError as exc:
            raise _oserror(f"open {image}", exc) from exc
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise _oserror(f"stat {image}", exc) from exc
        if actual <= 0 or actual % BLOCK_SIZE:
            os.close(fd)
            raise DiskError(errno.EINVAL, f"{image}: image size {actual} is not a positive multiple of {BLOCK_SIZE}")
        return cls(fd, image, actual, read_only, executor=executor, max_inflight=max_inflight)

    @staticmethod
    def _create(image: Path, size: int) -> None:
        try:
            image.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return  # someone else created it meanwhile: use theirs
        except OSError as exc:
            raise _oserror(f"create {image}", exc) from exc
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(image)
            raise _oserror(f"ftruncate {image} to {size}", exc) from exc
        os.close(fd)

    async def close(self) -> None:
        """Refuse new I/O, wait for every operation already in a pool thread, then close the file."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        jobs = list(self._outstanding)
        if jobs:
            # Shielded: a cancelled closer must not cancel the wait, or the fd could go while a thread uses it.
            await asyncio.shield(asyncio.gather(*jobs, return_exceptions=True))
        while True:  # a worker may still be handing its last batch back: the last one out says so
            with self._lock:
                if not self._workers:
                    break
                self._workers_gone.clear()
            await self._workers_gone.wait()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            await asyncio.get_running_loop().run_in_executor(self._pool(), _close_quietly, fd)
        logs.get(component="disk").info("disk closed", path=str(self._path), **self.stats())

    def close_sync(self) -> None:
        """Close without a loop (startup error paths, tests); only valid when no I/O is in flight."""
        if self._outstanding or self._workers:
            raise DiskError(errno.EBUSY, f"{self._path}: I/O in flight; use close()")
        self._closed = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _close_quietly(fd)

    # -- properties ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        """Disk size in bytes (fixed at open)."""
        return self._size

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int | bool]:
        """How this disk's I/O went so far, and whether non-blocking reads and writes are still tried."""
        return {"reads_inline": self.reads_inline, "reads_nowait_refused": self.reads_nowait_refused,
                "reads_pool": self.reads_pool, "writes_inline": self.writes_inline, "writes_pool": self.writes_pool,
                "nowait_read": self._nowait_read, "nowait_write": self._nowait_write}

    # -- I/O -------------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; anything the file no longer holds reads as zeros."""
        self._check_range("read", offset, length)
        if length == 0:
            return b""
        data = self.read_cached(offset, length)
        if data is not None:
            return bytes(data)
        self.reads_pool += 1
        return await self._run(self._pread, offset, length)

    def read_soon(self, offset: int, length: int, into: memoryview | None = None) -> asyncio.Future[Buffer]:
        """An uncached ``read`` without a coroutine: a future that the pool completes with the data (or a
        ``DiskError``). For a caller that answers in a done callback instead of a task per request. ``into``:
        read straight into that buffer (a guest's mapped pages) and complete with ``into[:length]``."""
        self._check_range("read", offset, length)
        self.reads_pool += 1
        if into is not None:
            return self._submit(self._pread_into, offset, into[:length])
        return self._submit(self._pread, offset, length)

    def read_cached(self, offset: int, length: int, into: memoryview | None = None) -> Buffer | None:
        """The bytes if they are all in the page cache, else None, without ever waiting for the disk:
        preadv2(RWF_NOWAIT) says EAGAIN instead (the fast path QEMU and io_uring users take). ``into``: read
        into that buffer (then returned as ``into[:length]``)."""
        if not self._nowait_read or self._closed or length <= 0:
            return None
        buf: bytearray | memoryview = bytearray(length) if into is None else into[:length]
        try:
            if os.preadv(self._fd, [buf], offset, _RWF_NOWAIT) == length:
                self.reads_inline += 1
                return buf
            self.reads_nowait_refused += 1
        except BlockingIOError:
            self.reads_nowait_refused += 1
        except OSError:
            self._nowait_read = False  # not supported here: always use the pool
        return None

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` return only after ``fdatasync``."""
        await self.write_soon(offset, data, fua)

    def write_soon(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> asyncio.Future[None]:
        """``write`` without a coroutine: a future done once the data is written (durable, with ``fua``);
        already done when the write could not block. Raises ``DiskError`` at once for a bad request."""
        if self._read_only:
            raise DiskError(errno.EROFS, f"{self._path}: write to a read-only image")
        view = memoryview(data).cast("B")
        self._check_range("write", offset, len(view))
        if (len(view) == 0 and not fua) or self._write_nowait(offset, view, fua):
            self.writes_inline += 1
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self.writes_pool += 1
        return self._submit(self._pwrite, offset, view, fua)

    def _write_nowait(self, offset: int, view: memoryview, fua: bool) -> bool:
        """Write now if it cannot block (``RWF_NOWAIT``), as reads do; ext4 refuses it for buffered writes
        (EOPNOTSUPP), and then every write goes to the pool."""
        if not self._nowait_write or fua or self._closed or not view:
            return False
        try:
            return bool(os.pwritev(self._fd, [view], offset, _RWF_NOWAIT) == len(view))
        except BlockingIOError:
            return False
        except OSError:
            self._nowait_write = False
            return False

    async def flush(self) -> None:
        """Make every completed write durable (``fdatasync``)."""
        if self._read_only:
            return  # nothing of ours can be dirty
        await self._run(self._fdatasync)

    async def discard(self, offset: int, length: int) -> bool:
        """Deallocate a range (it then reads as zeros). True if a hole was punched, False if the filesystem
        cannot punch holes and the range was overwritten with zeros instead."""
        if self._read_only:
            raise DiskError(errno.EROFS, f"{self._path}: discard on a read-only image")
        self._check_range("discard", offset, length)
        if length == 0:
            return True
        return await self._run(self._punch, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range and keep it allocated (``FALLOC_FL_ZERO_RANGE``; zeros written where the filesystem
        cannot)."""
        if self._read_only:
            raise DiskError(errno.EROFS, f"{self._path}: write to a read-only image")
        self._check_range("write zeroes", offset, length)
        if length:
            await self._run(self._zero_range, offset, length)

    async def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        """At most ``limit`` extents (start, length, allocated) covering ``offset``.. in order, from the image's
        SEEK_DATA / SEEK_HOLE; they stop at ``offset + length``. A filesystem without them reports one
        allocated extent."""
        self._check_range("map", offset, length)
        if length == 0 or limit <= 0:
            return []
        return await self._run(self._map, offset, length, limit)

    # -- machinery -------------------------------------------------------------------------------

    def _pool(self) -> concurrent.futures.Executor:
        return self._executor if self._executor is not None else default_executor()

    def _check_range(self, op: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DiskError(errno.EINVAL,
                            f"{self._path}: {op} of {length} bytes at {offset} outside the {self._size}-byte disk")

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        return await self._submit(func, *args)

    def _submit(self, func: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """Queue ``func(*args)`` for the disk's pool workers; the future carries its result or exception."""
        if self._closed:
            raise DiskError(errno.EBADF, f"{self._path}: disk is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._outstanding.add(fut)
        fut.add_done_callback(self._outstanding.discard)
        with self._lock:
            self._queue.append((func, args, fut))
            # One worker per disk, plus more (up to max_inflight) only while a backlog builds up, so cached
            # I/O is not spread over threads that fight for the GIL, and a slow disk still gets parallelism.
            start = self._workers == 0 or (self._workers < self._max_workers
                                           and len(self._queue) > 8 * self._workers)
            if start:
                self._workers += 1
        if start:
            self._pool().submit(self._drain)
        return fut

    def _drain(self) -> None:
        """A pool worker: run queued requests until the queue is empty, returning results in batches."""
        assert self._loop is not None
        batch: list[tuple[asyncio.Future[Any], object, BaseException | None]] = []
        while True:
            with self._lock:
                if not self._queue:
                    self._workers -= 1
                    last_at_close = self._closed and not self._workers
                    break
                func, args, fut = self._queue.popleft()
            try:
                batch.append((fut, func(*args), None))
            except BaseException as exc:  # handed to the awaiting coroutine
                batch.append((fut, None, exc))
            if len(batch) >= 32:
                self._loop.call_soon_threadsafe(_settle, batch)
                batch = []
        if batch:
            self._loop.call_soon_threadsafe(_settle, batch)
        if last_at_close:  # close() is waiting for the workers (only then: no wake-up per idle worker)
            self._loop.call_soon_threadsafe(self._workers_gone.set)

    # The following run in a pool thread.

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    parts.append(bytes(length - got))  # past the file's end: zeros, as a sparse disk reads
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise _oserror(f"{self._path}: read of {length} bytes at {offset}", exc) from exc

    def _pread_into(self, offset: int, view: memoryview) -> memoryview:
        """``_pread`` into ``view`` (preadv into the guest's pages: the data is copied once, by the kernel)."""
        try:
            got, length = 0, len(view)
            while got < length:
                n = os.preadv(self._fd, [view[got:]], offset + got)
                if not n:
                    view[got:] = bytes(length - got)  # past the file's end: zeros, as a sparse disk reads
                    break
                got += n
            return view
        except OSError as exc:
            raise _oserror(f"{self._path}: read of {len(view)} bytes at {offset}", exc) from exc

    def _pwrite(self, offset: int, view: memoryview, fua: bool) -> None:
        try:
            done = 0
            while done < len(view):
                wrote = os.pwrite(self._fd, view[done:], offset + done)
                if wrote <= 0:
                    raise DiskError(errno.EIO, f"{self._path}: write at {offset + done} made no progress")
                done += wrote
            if fua:
                os.fdatasync(self._fd)
        except DiskError:
            raise
        except OSError as exc:
            raise _oserror(f"{self._path}: write of {len(view)} bytes at {offset}", exc) from exc

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _oserror(f"{self._path}: fdatasync", exc) from exc

    def _punch(self, offset: int, length: int) -> bool:
        if _fallocate is not None:
            rc = _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                return True
            code = ctypes.get_errno() or errno.EIO
            if code not in _NO_PUNCH:
                raise DiskError(code, f"{self._path}: punch hole of {length} bytes at {offset}: "
                                      f"{os.strerror(code)}")
        self._pwrite_zeros(offset, length)
        return False

    def _zero_range(self, offset: int, length: int) -> None:
        if _fallocate is not None:
            if _fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            code = ctypes.get_errno() or errno.EIO
            if code not in _NO_PUNCH:
                raise DiskError(code, f"{self._path}: zero range of {length} bytes at {offset}: "
                                      f"{os.strerror(code)}")
        self._pwrite_zeros(offset, length)

    def _map(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        end = offset + length
        extents: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end and len(extents) < limit:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data at or after pos (a hole to the end)
                        raise
                    data = end
                if data > pos:
                    extents.append((pos, min(data, end) - pos, False))
                    pos = min(data, end)
                    continue
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                extents.append((pos, hole - pos, True))
                pos = hole
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and not extents:
                return [(offset, length, True)]  # no SEEK_DATA here: everything counts as allocated
            raise _oserror(f"{self._path}: map at {pos}", exc) from exc
        return extents

    def _pwrite_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        done = 0
        while done < length:
            self._pwrite(offset + done, zeros[:min(len(zeros), length - done)], False)
            done += min(len(zeros), length - done)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
