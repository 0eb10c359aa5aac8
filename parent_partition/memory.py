"""The host's view of a partition's guest memory, and the GPADLs a device holds.

Mirrors OpenVMM's ``GuestMemory`` and ``GpadlMap`` (vm/devices/vmbus/vmbus_channel ``gpadl.rs``): a device
looks a GPADL up by id (netvsc names its receive and send buffers by GPADL id, NVSP SEND_RECV_BUF), reads
and writes the guest pages it names, and holds it while it uses it; a GPADL_TEARDOWN asks the device to let
go, and GPADL_TORNDOWN goes out only once every hold is released (``GpadlMap::remove`` with its callback).

Over a stream the host cannot map guest pages, so the view is a shadow: guest data reaches it with the
packet that names it (``absorb``), and what the host writes leaves with the packet that tells the guest
(``take_written``) -- the rule storage already follows for GPA-direct data (docs/protocol.md §7.4). In
shared-memory mode (§14) ``MappedMemory`` puts the guest's own pages, mapped from its memfd, behind the same
methods: nothing is shadowed and nothing travels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from vmbus_proto.errors import DeviceProtocolError, PacketError
from vmbus_proto.gpadl import Gpadl
from vmbus_proto.limits import SHADOW, PartitionBytes
from vmbus_proto.packets import PAGE_SIZE, GpaRange
from vmbus_proto.shm_ring import GuestPages

MAX_SHADOW_BYTES = 64 << 20  # per partition: a netvsc receive buffer (16 MiB) and a VRAM fit


class GuestMemoryView(Protocol):
    """Read and write guest pages named by GPA ranges (``struct gpa_range``)."""

    def read(self, ranges: Iterable[GpaRange]) -> bytes: ...

    def write(self, ranges: Iterable[GpaRange], data: bytes) -> None: ...


class ShadowMemory:
    """A partition's guest pages as far as the host has seen them over a stream, page by page.

    Pages the guest never sent read as zeros. ``limit`` bounds the pages kept (a guest cannot make the host
    keep more by naming more pages: beyond the limit a write is refused as the guest's protocol error).
    """

    def __init__(self, limit: int = MAX_SHADOW_BYTES, account: PartitionBytes | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        """``account``: the partition's bytes, charged a page for every page kept (a page past its cap or the
        parent's budget is refused like one past ``limit``, and ``on_refused`` hears why)."""
        self.limit_pages = limit // PAGE_SIZE
        self.shared = False
        self.account = account
        self.on_refused = on_refused
        self._pages: dict[int, bytearray] = {}
        self._written: dict[int, None] = {}  # pages the host wrote that the guest has not been sent

    @property
    def resident_bytes(self) -> int:
        return len(self._pages) * PAGE_SIZE

    def read(self, ranges: Iterable[GpaRange]) -> bytes:
        out = bytearray()
        for pfn, start, end in _pieces(ranges):
            page = self._pages.get(pfn)
            out += page[start:end] if page is not None else bytes(end - start)
        return bytes(out)

    def write(self, ranges: Iterable[GpaRange], data: bytes) -> None:
        """The host writes guest memory; the pages are sent with the next packet that names them."""
        self._store(ranges, data, written=True)

    def absorb(self, ranges: Iterable[GpaRange], data: bytes) -> None:
        """Guest data that travelled with a packet naming ``ranges``."""
        self._store(ranges, data, written=False)

    def take_written(self, ranges: Iterable[GpaRange]) -> bytes:
        """The bytes of ``ranges`` to send with the packet that names them; they are no longer pending."""
        ranges = tuple(ranges)
        for pfn, _, _ in _pieces(ranges):
            self._written.pop(pfn, None)
        return self.read(ranges)

    def forget(self, pfns: Iterable[int]) -> None:
        """Drop pages (their GPADL was torn down)."""
        dropped = 0
        for pfn in pfns:
            dropped += self._pages.pop(pfn, None) is not None
            self._written.pop(pfn, None)
        if self.account is not None and dropped:
            self.account.give(dropped * PAGE_SIZE, SHADOW)

    def _store(self, ranges: Iterable[GpaRange], data: bytes, written: bool) -> None:
        ranges = tuple(ranges)
        total = sum(r.byte_count for r in ranges)
        if len(data) != total:
            raise DeviceProtocolError(f"{len(data)} bytes of data for GPA ranges of {total} bytes")
        pos = 0
        view = memoryview(data)
        for pfn, start, end in _pieces(ranges):
            page = self._pages.get(pfn)
            if page is None:
                if len(self._pages) >= self.limit_pages:
                    raise DeviceProtocolError(f"guest memory shadow limit of {self.limit_pages * PAGE_SIZE} "
                                              f"bytes reached")
                self._charge_page()
                page = self._pages[pfn] = bytearray(PAGE_SIZE)
            page[start:end] = view[pos:pos + end - start]
            pos += end - start
            if written:
                self._written[pfn] = None


    def _charge_page(self) -> None:
        account = self.account
        if account is None:
            return
        if not account.fits(PAGE_SIZE):
            why = f"guest memory page refused: {account.refusal(PAGE_SIZE)}"
            if self.on_refused is not None:
                self.on_refused(why)
            raise DeviceProtocolError(why)
        account.take(PAGE_SIZE, SHADOW)


class MappedMemory:
    """A partition's guest memory mapped from the memfd it passed (shared-memory mode): reads and writes go
    to its pages in place, each page checked to be inside it (a page outside is the guest's protocol error)."""

    shared = True
    resident_bytes = 0  # the guest's own pages: nothing held on its behalf

    def __init__(self, pages: GuestPages) -> None:
        self.pages = pages

    def read(self, ranges: Iterable[GpaRange]) -> bytes:
        try:
            return bytes(self.pages.read(tuple(ranges)))
        except PacketError as exc:
            raise DeviceProtocolError(str(exc)) from None

    def write(self, ranges: Iterable[GpaRange], data: bytes) -> None:
        ranges = tuple(ranges)
        total = sum(r.byte_count for r in ranges)
        if len(data) > total:
            raise DeviceProtocolError(f"{len(data)} bytes of data for GPA ranges of {total} bytes")
        try:
            self.pages.write(ranges, data)
        except PacketError as exc:
            raise DeviceProtocolError(str(exc)) from None

    def absorb(self, ranges: Iterable[GpaRange], data: bytes) -> None:
        """Nothing travels with packets in shared mode; the pages are already there."""

    def take_written(self, ranges: Iterable[GpaRange]) -> bytes:
        return b""  # what the host wrote is in the guest's pages already

    def forget(self, pfns: Iterable[int]) -> None:
        pass


HostMemory = ShadowMemory | MappedMemory  # a partition's guest memory as its devices see it


def _pieces(ranges: Iterable[GpaRange]) -> Iterator[tuple[int, int, int]]:
    """(pfn, start, end) for each page piece of ``ranges``, in order."""
    for r in ranges:
        offset, left = r.byte_offset, r.byte_count
        for pfn in r.pfns:
            n = min(PAGE_SIZE - offset, left)
            if n <= 0:
                break
            yield pfn, offset, offset + n
            offset, left = 0, left - n


class GpadlBuffer:
    """One GPADL as a flat buffer (a netvsc receive or send buffer, a VRAM): offsets into the bytes its
    ranges describe, in order, translated to GPA ranges of the partition's memory."""

    def __init__(self, gpadl: Gpadl, memory: HostMemory) -> None:
        self.gpadl = gpadl
        self.memory = memory
        self.size = sum(count for count, _ in gpadl.ranges)

    def ranges(self, offset: int, length: int) -> tuple[GpaRange, ...]:
        """The GPA ranges of bytes ``[offset, offset + length)``; a DeviceProtocolError if outside."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceProtocolError(f"bytes {offset}..{offset + length} are outside GPADL {self.gpadl.gpadl:#x} "
                                      f"of {self.size} bytes")
        out: list[GpaRange] = []
        base_pfn = 0
        for count, first in self.gpadl.ranges:
            npages = (first + count + PAGE_SIZE - 1) // PAGE_SIZE
            if length and offset < count:
                n = min(count - offset, length)
                start = first + offset
                pfns = self.gpadl.pfns[base_pfn + start // PAGE_SIZE: base_pfn + (start + n - 1) // PAGE_SIZE + 1]
                out.append(GpaRange(n, start % PAGE_SIZE, tuple(pfns)))
                length -= n
                offset = 0
            else:
                offset -= count
            base_pfn += npages
        return tuple(out)

    def read(self, offset: int, length: int) -> bytes:
        return self.memory.read(self.ranges(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        self.memory.write(self.ranges(offset, len(data)), data)


class GpadlHold:
    """A device's hold on a GPADL: the GPADL is not torn down until ``release`` (OpenVMM ``GpadlView``)."""

    def __init__(self, owner: GpadlMap, gpadl: Gpadl, on_teardown: Callable[[], None] | None) -> None:
        self.owner = owner
        self.gpadl = gpadl
        self.on_teardown = on_teardown
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._released(self)


class GpadlMap:
    """The GPADLs of one channel that its device may use, with holds and device-acknowledged teardown."""

    def __init__(self, lookup: Callable[[int], Gpadl | None], memory: HostMemory,
                 listing: Callable[[], Iterable[Gpadl]] = tuple) -> None:
        self._lookup = lookup
        self._listing = listing  # the channel's accepted GPADLs
        self.memory = memory
        self._holds: dict[int, list[GpadlHold]] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def get(self, gpadl_id: int) -> Gpadl:
        """The accepted GPADL ``gpadl_id`` of this channel; a DeviceProtocolError names what is wrong."""
        gpadl = self._lookup(gpadl_id)
        if gpadl is None or gpadl_id in self._waiters:
            raise DeviceProtocolError(f"GPADL {gpadl_id:#x} does not exist on this channel (or is being torn down)")
        return gpadl

    def containing(self, gpa: int) -> tuple[Gpadl, int] | None:
        """The accepted GPADL of this channel whose pages hold guest physical address ``gpa``, and the offset of
        ``gpa`` in the bytes it describes (the video VRAM_LOCATION names a GPA, not a GPADL)."""
        pfn, in_page = divmod(gpa, PAGE_SIZE)
        for gpadl in self._listing():
            if gpadl.gpadl in self._waiters:
                continue
            base = 0
            pages = 0
            for count, first in gpadl.ranges:
                npages = (first + count + PAGE_SIZE - 1) // PAGE_SIZE
                pfns = gpadl.pfns[pages:pages + npages]
                for i, p in enumerate(pfns):
                    offset = i * PAGE_SIZE + in_page - first
                    if p == pfn and 0 <= offset < count:
                        return gpadl, base + offset
                base += count
                pages += npages
        return None

    def hold(self, gpadl_id: int, on_teardown: Callable[[], None] | None = None) -> GpadlHold:
        """Use GPADL ``gpadl_id`` until the hold is released. ``on_teardown`` is called if the guest tears it
        down meanwhile: the device must then stop using it and release the hold."""
        hold = GpadlHold(self, self.get(gpadl_id), on_teardown)
        self._holds.setdefault(gpadl_id, []).append(hold)
        return hold

    def buffer(self, hold: GpadlHold) -> GpadlBuffer:
        return GpadlBuffer(hold.gpadl, self.memory)

    def held(self, gpadl_id: int) -> bool:
        return bool(self._holds.get(gpadl_id))

    async def teardown(self, gpadl_id: int) -> None:
        """The guest tears GPADL ``gpadl_id`` down: ask its holders to let go; return once they have."""
        holds = self._holds.get(gpadl_id)
        gpadl = self._lookup(gpadl_id)
        if holds:
            fut = self._waiters[gpadl_id] = asyncio.get_running_loop().create_future()
            for hold in list(holds):
                if hold.on_teardown is not None:
                    hold.on_teardown()
            try:
                await fut
            finally:
                self._waiters.pop(gpadl_id, None)
        if gpadl is not None:
            self.memory.forget(gpadl.pfns)

    def release_all(self) -> None:
        """The channel's device is gone: every hold it had ends."""
        for holds in list(self._holds.values()):
            for hold in list(holds):
                hold.release()

    def _released(self, hold: GpadlHold) -> None:
        gid = hold.gpadl.gpadl
        holds = self._holds.get(gid, [])
        if hold in holds:
            holds.remove(hold)
        if not holds:
            self._holds.pop(gid, None)
            fut = self._waiters.get(gid)
            if fut is not None and not fut.done():
                fut.set_result(None)
