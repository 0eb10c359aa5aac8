"""Ring-buffer accounting for one direction of one channel.

Linux drivers/hv/ring_buffer.c (``hv_get_bytes_to_write``, ``hv_signal_on_write``, ``hv_pkt_iter_close``),
include/linux/hyperv.h ``struct hv_ring_buffer``; OpenVMM vmbus_ring ``commit_write`` / ``commit_read``.

The ring's data lives nowhere on a stream; what is modelled is its header page. The writer owns
``write_index`` and ``pending_send_sz``, the reader owns ``read_index`` and ``interrupt_mask``. Packets
are charged their real ring size; the writer needs strictly more free bytes than a packet (a ring is
never filled). The writer cannot see the reader's index, so the reader sends it back in a SIGNAL frame:
when free space crosses the writer's pending_send_sz (the real rule), at once when the writer announces
a pending_send_sz while stale credit is outstanding (the writer's re-read after its barrier), and in
batches after about half the ring was consumed. Interrupts are decided where the truth is, at the
reader: a packet landing in an empty, unmasked ring raises one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RingOverrunError
from .packets import PAGE_SIZE, align8

GUEST_TO_HOST = 0  # the guest's outbound ring: pages [0, downstream_offset) of the ring GPADL
HOST_TO_GUEST = 1  # the guest's inbound ring: pages [downstream_offset, N)


def ring_data_size(pages: int) -> int:
    """Data bytes of a ring made of ``pages`` pages: one header page, the rest data."""
    return (pages - 1) * PAGE_SIZE


HV_RING_HEADER_SIZE = PAGE_SIZE  # sizeof(struct hv_ring_buffer): the header is padded to one page
VMBUS_DEFAULT_MAX_PKT_SIZE = 4096  # a channel's max_pkt_size unless its driver sets another


def vmbus_ring_size(payload: int) -> int:
    """Linux ``VMBUS_RING_SIZE(payload)`` with 4 KiB pages: a payload of 32 KiB or more holds its own header
    page (``VMBUS_HEADER_ADJ`` = 0, since commit b8209544296e), a smaller one gets an extra header page."""
    adjust = 0 if payload >= 8 * HV_RING_HEADER_SIZE else HV_RING_HEADER_SIZE
    return -(-(adjust + payload) // PAGE_SIZE) * PAGE_SIZE


@dataclass(slots=True)
class RingStats:
    packets: int = 0
    bytes: int = 0
    interrupts: int = 0
    blocked: int = 0  # times a writer had to set pending_send_sz
    credit_updates: int = 0


class RingWriter:
    """The writer's side of one ring."""

    __slots__ = ("_read_known", "_write_total", "data_size", "peer_interrupt_mask", "pending_send_sz",
                 "stats")

    def __init__(self, data_size: int) -> None:
        if data_size <= 0 or data_size % 8:
            raise ValueError(f"ring data size {data_size} must be a positive multiple of 8")
        self.data_size = data_size
        self._write_total = 0
        self._read_known = 0
        self.pending_send_sz = 0
        self.peer_interrupt_mask = 0
        self.stats = RingStats()

    @property
    def write_index(self) -> int:
        return self._write_total % self.data_size

    @property
    def free(self) -> int:
        return self.data_size - (self._write_total - self._read_known)

    def can_write(self, size: int) -> bool:
        return size < self.data_size - (self._write_total - self._read_known)

    def fits_ever(self, size: int) -> bool:
        return size < self.data_size

    def write(self, size: int) -> None:
        if not self.try_write(size):
            raise RingOverrunError(f"writer tried {size} bytes with {self.free} free")

    def try_write(self, size: int) -> bool:
        """``write(size)`` if it fits now (``can_write``); returns whether it did."""
        if size >= self.data_size - (self._write_total - self._read_known):
            return False
        self._write_total += size
        stats = self.stats
        stats.packets += 1
        stats.bytes += size
        return True

    def block(self, size: int) -> int:
        """The writer cannot fit ``size``: set pending_send_sz, to be sent to the reader."""
        self.pending_send_sz = align8(size)
        self.stats.blocked += 1
        return self.pending_send_sz

    def update(self, read_index: int, interrupt_mask: int) -> None:
        """The reader's header fields arrived (a SIGNAL frame)."""
        if not 0 <= read_index < self.data_size or read_index % 8:
            raise RingOverrunError(f"read_index {read_index} is not an 8-aligned offset below {self.data_size}")
        in_ring = (self.write_index - read_index) % self.data_size
        read_total = self._write_total - in_ring
        if read_total < self._read_known:
            raise RingOverrunError("read_index moved backwards")
        self._read_known = read_total
        self.peer_interrupt_mask = interrupt_mask
        if self.pending_send_sz and self.can_write(self.pending_send_sz):
            self.pending_send_sz = 0


class RingReader:
    """The reader's side of one ring: it sees every byte the writer put in and what it consumed."""

    __slots__ = ("_credited", "_read_total", "_recv_total", "data_size", "interrupt_mask",
                 "pending_send_sz", "stats")

    def __init__(self, data_size: int) -> None:
        self.data_size = data_size
        self._recv_total = 0
        self._read_total = 0
        self._credited = 0
        self.pending_send_sz = 0
        self.interrupt_mask = 0
        self.stats = RingStats()

    @property
    def read_index(self) -> int:
        return self._read_total % self.data_size

    @property
    def used(self) -> int:
        return self._recv_total - self._read_total

    @property
    def free(self) -> int:
        return self.data_size - self.used

    @property
    def uncredited(self) -> int:
        """Bytes consumed that the writer has not been told of yet."""
        return self._read_total - self._credited

    def arrive(self, size: int) -> bool:
        """A packet of ring size ``size`` was written; returns whether it raises an interrupt."""
        used = self._recv_total - self._read_total
        if size >= self.data_size - used:
            raise RingOverrunError(
                f"writer overran its ring credit: {size}-byte packet with {self.free} of "
                f"{self.data_size} bytes free")
        self._recv_total += size
        stats = self.stats
        stats.packets += 1
        stats.bytes += size
        if used or self.interrupt_mask:
            return False
        stats.interrupts += 1  # an empty, unmasked ring: the writer signals
        return True

    def consume(self, size: int) -> bool:
        """The reader took a packet off the ring; returns whether the writer must now be told."""
        read = self._read_total + size
        if read > self._recv_total:
            raise RingOverrunError("reader consumed more than was written")
        self._read_total = read
        pss = self.pending_send_sz
        if pss:
            free = self.data_size - (self._recv_total - read)
            if free - size <= pss < free:  # free space crossed the writer's mark
                return True
        return read - self._credited >= self.data_size >> 1

    def writer_pending(self, pending_send_sz: int) -> bool:
        """The writer blocked; returns whether credit must be sent right away."""
        if pending_send_sz < 0 or pending_send_sz >= self.data_size or pending_send_sz % 8:
            raise RingOverrunError(f"pending_send_sz {pending_send_sz} is invalid for a "
                                   f"{self.data_size}-byte ring")
        self.pending_send_sz = pending_send_sz
        return bool(pending_send_sz) and self._read_total != self._credited

    def credit(self) -> int:
        """Mark the current read_index as sent to the writer and return it."""
        self._credited = self._read_total
        self.stats.credit_updates += 1
        if self.pending_send_sz and self.pending_send_sz < self.free:
            self.pending_send_sz = 0
        return self.read_index
