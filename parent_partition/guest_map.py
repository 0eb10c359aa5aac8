"""A child's guest memory, taken from the memfd it passed with its HELLO (docs/protocol.md §14).

The socket form of the Hyper-V host mapping a partition's memory: the parent maps the child's pages once,
and rings and GPA ranges are read and written in place (``vmbus_proto.shm_ring.GuestPages``). The memfd must
be sealed against shrinking (``F_SEAL_SHRINK``): a file that shrank under a mapping would fault the parent
(SIGBUS) on the next access, so an unsealed one is refused before it is mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat

from vmbus_proto.packets import PAGE_SHIFT, PAGE_SIZE
from vmbus_proto.shm_ring import GuestPages


class SharedMemoryError(Exception):
    """The memfd a child passed cannot be its guest memory (the message says why)."""


class SharedGuestMemory:
    def __init__(self, fd: int, size: int, base: int) -> None:
        self.fd: int | None = fd
        self.size = size
        self.base = base
        self._map: mmap.mmap | None = None
        self.pages = GuestPages(memoryview(b""), base >> PAGE_SHIFT)

    @classmethod
    def check(cls, fd: int, size: int, base: int) -> SharedGuestMemory:
        """Take ``fd`` as ``size`` bytes of guest memory from GPA ``base``, or close it and raise."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SharedMemoryError("the fd is not a memory file (memfd)")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise SharedMemoryError("the fd is not a memfd (it takes no seals)") from None
            if not seals & fcntl.F_SEAL_SHRINK:
                raise SharedMemoryError("the memfd is not sealed against shrinking (F_SEAL_SHRINK)")
            if size <= 0 or size % PAGE_SIZE:
                raise SharedMemoryError(f"{size} bytes of guest memory is not whole pages")
            if st.st_size < size:
                raise SharedMemoryError(f"the memfd holds {st.st_size} bytes; the HELLO declares {size}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, base)

    def map(self) -> None:
        """Map the memory (once the partition is admitted) and close the fd: the mapping keeps the pages."""
        if self.fd is None:
            return
        try:
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        finally:
            os.close(self.fd)
            self.fd = None
        self.pages = GuestPages(memoryview(self._map), self.base >> PAGE_SHIFT)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(BufferError):
            self.pages.view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a device still holds a view: the GC unmaps it with the last
                self._map.close()
            self._map = None
