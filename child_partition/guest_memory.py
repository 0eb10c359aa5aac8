"""Guest physical memory: the pages a child partition owns and hands to the host by page number.

On Hyper-V a GPADL or a GPA-direct range names guest page frames (4 KiB Hyper-V pages, whatever the guest's
own page size; Linux include/linux/hyperv.h ``HV_HYP_PAGE_SIZE``). Here guest RAM is one mmap, committed by
the kernel only where touched, so ring pages that are only accounted for cost nothing. For shared-memory mode
(docs/protocol.md §14) it is a memfd, sealed against shrinking, that the child passes to the parent with
SCM_RIGHTS: the parent maps the same pages, as a Hyper-V host maps what a GPADL names.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

from vmbus_proto.packets import PAGE_SHIFT, PAGE_SIZE, Buffer, GpaRange, pages_spanned
from vmbus_proto.shm_ring import GuestPages

GUEST_PFN_BASE = 0x100  # the first megabyte stays unused, as on a PC


class OutOfGuestMemory(Exception):
    pass


#: Seals on a shared guest memory: its size is fixed, so a mapping of it can never fault past its end.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class GuestMemory:
    def __init__(self, size: int = 256 * 1024 * 1024, *, shared: bool = False) -> None:
        """``shared``: back the memory with a sealed memfd (``fd``) another process can map."""
        if size % PAGE_SIZE:
            raise ValueError("guest memory is whole pages")
        self.size = size
        self.pages = size >> PAGE_SHIFT
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create("vmbus-guest-memory", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            self.mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self.mem = mmap.mmap(-1, size, flags=flags)
        self.view = memoryview(self.mem)
        self._free: list[tuple[int, int]] = [(0, self.pages)]  # (first page index, count), sorted

    @property
    def end(self) -> int:
        """The GPA where this memory ends: every page frame it has is below ``end / PAGE_SIZE`` (the HELLO's
        ``memory``, docs/protocol.md §3)."""
        return (GUEST_PFN_BASE + self.pages) << PAGE_SHIFT

    def alloc(self, count: int) -> list[int]:
        """Allocate ``count`` contiguous pages; returns their page frame numbers."""
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                if n == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, n - count)
                return [GUEST_PFN_BASE + start + j for j in range(count)]
        raise OutOfGuestMemory(f"no {count} contiguous free pages")

    def free(self, pfns: list[int]) -> None:
        if not pfns:
            return
        start = pfns[0] - GUEST_PFN_BASE
        self._free.append((start, len(pfns)))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def offset_of(self, pfn: int) -> int:
        """Where page ``pfn`` starts in ``view``."""
        return self._offset(pfn)

    def _offset(self, pfn: int) -> int:
        idx = pfn - GUEST_PFN_BASE
        if not 0 <= idx < self.pages:
            raise ValueError(f"pfn {pfn:#x} is not guest memory")
        return idx << PAGE_SHIFT

    def range_for(self, pfns: list[int], offset: int, length: int) -> GpaRange:
        """A GPA range covering ``length`` bytes at byte ``offset`` of the buffer made of ``pfns``."""
        first = offset >> PAGE_SHIFT
        in_page = offset & (PAGE_SIZE - 1)
        n = pages_spanned(in_page, length)
        return GpaRange(length, in_page, tuple(pfns[first:first + n]))

    def _contiguous(self, rng: GpaRange) -> int | None:
        """The byte offset of ``rng`` in guest memory when its pages are consecutive, else None."""
        pfns = rng.pfns
        if pfns and pfns[-1] - pfns[0] == len(pfns) - 1 and (len(pfns) < 3 or pfns == tuple(
                range(pfns[0], pfns[0] + len(pfns)))):
            return self._offset(pfns[0]) + rng.byte_offset
        return None

    def write(self, rng: GpaRange, data: Buffer) -> None:
        """Copy ``data`` into the pages ``rng`` names (the host 'writing guest memory')."""
        n = min(len(data), rng.byte_count)
        base = self._contiguous(rng)
        if base is not None and base + n <= self.size:
            self.view[base:base + n] = data[:n]
            return
        pos = 0
        page_off = rng.byte_offset
        remaining = min(len(data), rng.byte_count)
        for pfn in rng.pfns:
            if remaining <= 0:
                break
            chunk = min(PAGE_SIZE - page_off, remaining)
            base = self._offset(pfn) + page_off
            self.view[base:base + chunk] = data[pos:pos + chunk]
            pos += chunk
            remaining -= chunk
            page_off = 0

    def read(self, rng: GpaRange) -> bytes:
        base = self._contiguous(rng)
        if base is not None and base + rng.byte_count <= self.size:
            return bytes(self.view[base:base + rng.byte_count])
        out = bytearray()
        page_off = rng.byte_offset
        remaining = rng.byte_count
        for pfn in rng.pfns:
            chunk = min(PAGE_SIZE - page_off, remaining)
            base = self._offset(pfn) + page_off
            out += self.view[base:base + chunk]
            remaining -= chunk
            page_off = 0
        return bytes(out)

    @property
    def base(self) -> int:
        """The GPA of the memory's first byte (the HELLO's ``memory_base``)."""
        return GUEST_PFN_BASE << PAGE_SHIFT

    def pages_view(self) -> GuestPages:
        """This memory as ``vmbus_proto.shm_ring`` reads rings and GPA ranges in it."""
        return GuestPages(self.view, GUEST_PFN_BASE)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still held (rings of shared channels): unmapped by the GC
            self.view.release()
            self.mem.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
