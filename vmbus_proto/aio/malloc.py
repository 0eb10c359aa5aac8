"""Keep bulk buffers off mmap(2): glibc's allocator set up for a process that moves frames of up to 4 MiB.

What a real VSP never pays: on Hyper-V the data of an I/O is DMA'd into pages that stay mapped. Here every
READ or WRITE carries its data in a fresh Python buffer (a socket read, a disk read, a copy out of guest
pages), and glibc serves an allocation above ``M_MMAP_THRESHOLD`` (128 KiB, until its dynamic adjustment
kicks in, which depends on the order of earlier frees) with a new mmap and unmaps it on free. Each 256 KiB
transfer then costs 64 page faults and the kernel zeroing those pages, several times over: measured on the
project's machines, ~500 minor faults per MiB read and a third of the 1 MiB throughput, in runs that
switched between the two modes at random. A fixed threshold above the largest frame keeps such buffers on
the heap, and a high trim threshold keeps freed heap mapped for the next one (glibc mallopt(3)).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2), above any frame
TRIM_THRESHOLD = 128 * 1024 * 1024  # freed memory kept mapped at the heap top before it is returned

_done: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; False where there is no glibc ``mallopt`` (then nothing changes)."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (AttributeError, OSError):
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
