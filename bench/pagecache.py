"""The page-cache state of the storage benchmark's image file: how much is resident, and warming it.

Both sides of the storage comparison are meant to read through a warm page cache. fio, by default
(``invalidate=1``), drops the file's cached pages (``POSIX_FADV_DONTNEED``) before every job, so a run that
follows a fio run starts partly cold: after a 2.5 s 4 KiB randread fio run only ~40% of a 1 GiB image was
resident. ``resident_fraction`` (mincore(2) over a read-only mapping, as util-linux ``fincore`` does) is
recorded before every run, and ``warm`` reads the file through once.

``nowait_probe`` times ``preadv2(RWF_NOWAIT)`` 4 KiB reads at random offsets, the parent's inline read, and
counts how many the kernel refused: EAGAIN (not cached), or EOPNOTSUPP (the filesystem has no non-blocking
buffered reads, e.g. tmpfs on Linux 6.18: then every read of the parent goes through its thread pool).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import random
import time
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
WARM_CHUNK = 1 << 20


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (0.0 to 1.0)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return (pages - vec.raw.count(0)) / pages  # low bit set: resident (the other bits are reserved)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def warm(path: Path) -> float:
    """Read the whole file once (into the page cache); returns the seconds it took."""
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(WARM_CHUNK)
        while os.readv(fd, [buf]) > 0:
            pass
    finally:
        os.close(fd)
    return time.monotonic() - t0


def nowait_probe(path: Path, reads: int = 20_000, block: int = 4096, seed: int = 7) -> dict[str, Any]:
    """``reads`` random ``preadv2(RWF_NOWAIT)`` of ``block`` bytes: outcome counts and ns per call."""
    flag = getattr(os, "RWF_NOWAIT", 0)
    out: dict[str, Any] = {"reads": reads, "ok": 0, "eagain": 0, "short": 0, "unsupported": 0}
    if not flag:
        out["unsupported"] = reads
        out["error"] = "os.RWF_NOWAIT missing"
        return out
    rnd = random.Random(seed)
    blocks = path.stat().st_size // block
    offsets = [rnd.randrange(blocks) * block for _ in range(reads)]
    buf = bytearray(block)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter_ns()
        for offset in offsets:
            try:
                if os.preadv(fd, [buf], offset, flag) == block:
                    out["ok"] += 1
                else:
                    out["short"] += 1
            except BlockingIOError:
                out["eagain"] += 1
            except OSError as exc:
                out["unsupported"] += 1
                out["error"] = f"{exc.strerror} (errno {exc.errno})"
        out["ns_per_read"] = round((time.perf_counter_ns() - t0) / reads)
    finally:
        os.close(fd)
    return out
