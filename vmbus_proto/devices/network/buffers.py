"""The two GPADL-shared buffers of a NetVSC channel and the section allocators on each side.

Receive buffer (host allocates, guest frees by completing): OpenVMM vm/devices/net/netvsp/src/buffers.rs
(``sub_allocation_size_for_mtu`` = 256 header bytes + MTU + 36 bytes that a Windows netvsc bug makes
unusable: 1806 for the default frame size 1514), lib.rs (``RX_RESERVED_CONTROL_BUFFERS`` = 16 sub-allocations
kept for RNDIS control answers, ``RX_BATCH_SIZE`` = 375 ranges per transfer-page packet) and rx_bufs.rs (a
sub-allocation is free again only when the guest completes the transaction that carried it).
Send buffer (guest allocates, host completion frees): Linux drivers/net/hyperv/netvsc.c
(``netvsc_get_next_send_section``, ``netvsc_free_send_slot``) with 6144-byte sections (NETVSC_SEND_SECTION_SIZE).

Neither allocator grows: when every section is in use the caller is told "no room".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

from ...errors import LocalProtocolError
from .nvsp import NvspError

RX_HEADER_LEN = 256  # OpenVMM RX_HEADER_LEN: room for the RNDIS header and PPIs before the frame
RX_FOOTER_LEN = 36  # BROKEN_CO_NETVSC_FOOTER_LEN
RX_RESERVED_CONTROL = 16  # RX_RESERVED_CONTROL_BUFFERS
RX_BATCH_SIZE = 375  # ranges per transfer-page packet (NETVSC_MAX_XFER_PAGE_RANGES allows 375 + RSC)
DEFAULT_RECEIVE_BUFFER = 16 * 1024 * 1024  # Linux default (NETVSC_RECEIVE_BUFFER_DEFAULT)
DEFAULT_SEND_BUFFER = 1024 * 1024  # NETVSC_SEND_BUFFER_DEFAULT


def sub_allocation_size(mtu: int) -> int:
    """OpenVMM ``sub_allocation_size_for_mtu`` (``mtu`` is NDIS_CONFIG's frame size, 1514 by default)."""
    return RX_HEADER_LEN + mtu + RX_FOOTER_LEN


class BufferView(Protocol):
    """Byte access to one GPADL-backed buffer (the parent's GPADL view, or the child's own memory).

    A view of memory the caller may map can also have a ``mapping`` property: a memoryview of exactly its
    bytes, which the guest's receive path reads in place (as Linux netvsc reads its receive buffer) instead of
    copying each range out first. Nothing keeps such a view past the packet it was read for. A view may also
    have ``write_many(offsets, pieces)``, the same as ``write`` for each pair, which the host's receive path
    calls with all the pieces of a frame."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class ByteBuffer:
    """A ``BufferView`` over a bytearray: the child's buffers, and tests."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.size = size

    @property
    def mapping(self) -> memoryview:
        return memoryview(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NvspError(f"bytes {offset}..{offset + length} are outside a {self.size}-byte buffer")
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise NvspError(f"bytes {offset}..{offset + len(data)} are outside a {self.size}-byte buffer")
        self.data[offset:offset + len(data)] = data


class ReceiveBufferAllocator:
    """The host's sub-allocations of the guest's receive buffer, by id (byte offset ``id * size``).

    Ids below ``RX_RESERVED_CONTROL`` carry RNDIS control answers, the rest frames. A transaction (one
    transfer-page packet) holds its ids until ``complete(trans_id)``; OpenVMM uses the packet's first id as
    its transaction id, and so do we.
    """

    def __init__(self, buffer_size: int, sub_alloc_size: int) -> None:
        count = buffer_size // sub_alloc_size
        if count <= RX_RESERVED_CONTROL:
            raise NvspError(f"a receive buffer of {buffer_size} bytes holds {count} sub-allocations of "
                            f"{sub_alloc_size}; need more than {RX_RESERVED_CONTROL}")
        self.sub_alloc_size = sub_alloc_size
        self.count = count
        self._free_control: deque[int] = deque(range(RX_RESERVED_CONTROL))
        # Data ids never handed out are the range [_fresh, count), not a list: a 16 MiB buffer has ~9,300
        # ids, and a thousand partitions must not cost a third of a MiB each before a frame arrives.
        self._fresh = RX_RESERVED_CONTROL
        self._free_data: deque[int] = deque()  # ids given back, reused first
        self._held: dict[int, tuple[int, ...]] = {}

    @property
    def free_data(self) -> int:
        return len(self._free_data) + self.count - self._fresh

    @property
    def in_flight(self) -> int:
        """Transactions the guest has not completed yet."""
        return len(self._held)

    def allocate(self, n: int, control: bool = False) -> list[int] | None:
        """``n`` free ids, or None (no room: nothing is taken)."""
        if control:
            pool = self._free_control
            return [pool.popleft() for _ in range(n)] if n <= len(pool) else None
        if n > self.free_data:
            return None
        free = self._free_data
        out = [free.popleft() for _ in range(min(n, len(free)))]
        if len(out) < n:
            start = self._fresh
            self._fresh += n - len(out)
            out += range(start, self._fresh)
        return out

    def release(self, ids: Iterable[int]) -> None:
        """Give back ids that were allocated but never sent."""
        for i in ids:
            (self._free_control if i < RX_RESERVED_CONTROL else self._free_data).append(i)

    def hold(self, ids: list[int]) -> int:
        """Bind sent ids to a transaction; returns its transaction id."""
        if not ids:
            raise LocalProtocolError("a transfer-page packet needs at least one sub-allocation")
        trans_id = ids[0]
        self._held[trans_id] = tuple(ids)
        return trans_id

    def complete(self, trans_id: int) -> int:
        """The guest completed ``trans_id``: its ids are free again. Returns how many."""
        ids = self._held.pop(trans_id, None)
        if ids is None:
            raise NvspError(f"receive completion for transaction {trans_id:#x}, which is not outstanding")
        self.release(ids)
        return len(ids)


class SendBufferAllocator:
    """The guest's sections of its send buffer: one frame's RNDIS message per section (Linux may batch
    several; the host parser accepts that too), free again on SEND_RNDIS_PKT_COMPLETE."""

    def __init__(self, buffer_size: int, section_size: int) -> None:
        if section_size <= 0 or buffer_size // section_size == 0:
            raise NvspError(f"send-buffer section size {section_size} leaves no section in {buffer_size} bytes")
        self.section_size = section_size
        self.count = buffer_size // section_size
        self._free: deque[int] = deque(range(self.count))
        self._busy: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        index = self._free.popleft()
        self._busy.add(index)
        return index

    def release(self, index: int) -> None:
        if index not in self._busy:
            raise NvspError(f"send-buffer section {index} is not in use")
        self._busy.discard(index)
        self._free.append(index)
