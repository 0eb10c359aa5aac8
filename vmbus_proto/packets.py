"""Ring-buffer packets: the descriptor, packet types, GPA-direct ranges and each packet's real ring size.

Linux include/linux/hyperv.h (``struct vmpacket_descriptor``, ``enum vmbus_packet_type``,
``struct vmbus_channel_packet_multipage_buffer``), drivers/hv/ring_buffer.c (the 8-byte trailer);
OpenVMM vm/devices/vmbus/vmbus_ring/src/lib.rs (``parse_packet``) and ``gparange.rs``.

On a stream transport the packet's descriptor fields travel in our envelope (docs/protocol.md) and its
payload as raw bytes, but each packet is charged against its ring exactly what it would occupy in a real
ring: the 16-byte descriptor, any extension header, the payload padded to 8 bytes and the 8-byte trailer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import PacketError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
DESCRIPTOR_SIZE = 16
TRAILER_SIZE = 8
GPA_DIRECT_HEADER = 8  # reserved u32 + range_cnt u32 after the descriptor
XFER_PAGE_HEADER = 8  # xfer_pageset_id u16, sender_owns_set u8, reserved u8, range_cnt u32

FLAG_COMPLETION_REQUESTED = 0x1  # VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED

Buffer = bytes | bytearray | memoryview  # bulk data that rides with a packet, never re-encoded


class PacketType(enum.IntEnum):
    """``enum vmbus_packet_type`` (Linux hyperv.h)."""

    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPADL = 0x8
    DATA_USING_GPA_DIRECT = 0x9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


# The types a reader accepts off a ring (OpenVMM parse_packet): in-band, transfer pages, GPA direct, completion.
ACCEPTED_TYPES = frozenset({PacketType.DATA_INBAND, PacketType.DATA_USING_XFER_PAGES,
                            PacketType.DATA_USING_GPA_DIRECT, PacketType.COMP})


def align8(n: int) -> int:
    return (n + 7) & ~7


class GpaRange(NamedTuple):
    """``struct gpa_range``: byte_count, byte_offset into the first page, and the page numbers it spans.
    A named tuple: cheap to build per I/O, and msgpack writes it as the array the envelope carries."""

    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]

    def validate(self) -> None:
        # OpenVMM gparange::parse: EmptyByteCount / OffsetTooLarge / RangeTooSmall.
        if self.byte_count <= 0:
            raise PacketError("GPA range with byte_count 0")
        if not 0 <= self.byte_offset < PAGE_SIZE:
            raise PacketError(f"GPA range byte_offset {self.byte_offset} is not inside a page")
        if len(self.pfns) != pages_spanned(self.byte_offset, self.byte_count):
            raise PacketError(
                f"GPA range of {self.byte_count} bytes at offset {self.byte_offset} needs "
                f"{pages_spanned(self.byte_offset, self.byte_count)} pfns, has {len(self.pfns)}")

    @property
    def wire_size(self) -> int:
        """Bytes this range occupies in a GPA-direct header: byte_count, byte_offset, pfn_array."""
        return 8 + 8 * len(self.pfns)


def pages_spanned(byte_offset: int, byte_count: int) -> int:
    return (byte_offset + byte_count + PAGE_SIZE - 1) >> PAGE_SHIFT


def _extension_size(ranges: tuple[GpaRange, ...], xfer_ranges: int) -> int:
    """The GPA-direct or transfer-page header between the descriptor and the payload."""
    if len(ranges) == 1:  # every storage I/O
        return GPA_DIRECT_HEADER + 8 + 8 * len(ranges[0].pfns)
    if ranges:
        return GPA_DIRECT_HEADER + sum(r.wire_size for r in ranges)
    return XFER_PAGE_HEADER + 8 * xfer_ranges if xfer_ranges else 0


def packet_ring_size(payload_len: int, ranges: tuple[GpaRange, ...] = (), xfer_ranges: int = 0) -> int:
    """Bytes a packet occupies in a ring: descriptor + extension + padded payload + trailer."""
    return DESCRIPTOR_SIZE + _extension_size(ranges, xfer_ranges) + align8(payload_len) + TRAILER_SIZE


def offset8(ranges: tuple[GpaRange, ...] = (), xfer_ranges: int = 0) -> int:
    """The descriptor's offset8 (payload offset in 8-byte units) for a packet of this shape."""
    return (DESCRIPTOR_SIZE + _extension_size(ranges, xfer_ranges)) // 8


@dataclass(slots=True)
class Packet:
    """One ring packet as the envelope carries it.

    ``data`` is the bytes the GPA ranges point at when they travel with the packet (guest to host on a
    request, host to guest on a completion); it is not charged to the ring, as it lives in guest memory.
    """

    type: int
    flags: int
    trans_id: int
    payload: bytes
    ranges: tuple[GpaRange, ...] = ()
    data: Buffer = b""
    xfer_pageset_id: int = 0
    xfer_ranges: tuple[tuple[int, int], ...] = ()
    size: int = field(default=0, compare=False, repr=False)  # the ring size, once known

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)

    @property
    def ring_size(self) -> int:
        """What the packet occupies in a ring (computed once: a packet is not changed after it is sent)."""
        size = self.size
        if not size:
            if not self.ranges and not self.xfer_ranges:  # in-band and completions: the hot path
                size = 24 + ((len(self.payload) + 7) & ~7)
            else:
                size = packet_ring_size(len(self.payload), self.ranges, len(self.xfer_ranges))
            self.size = size
        return size

    def validate(self) -> None:
        """The checks OpenVMM's ring reader applies (vmbus_ring parse_packet)."""
        if self.type not in ACCEPTED_TYPES:
            raise PacketError(f"packet type {self.type:#x} is not accepted on a ring")
        if self.flags & ~FLAG_COMPLETION_REQUESTED:
            raise PacketError(f"packet flags {self.flags:#x} has bits other than COMPLETION_REQUESTED")
        if not 0 <= self.trans_id < 1 << 64:
            raise PacketError("transaction id out of u64 range")
        if self.type == PacketType.DATA_USING_GPA_DIRECT:
            if not self.ranges:
                raise PacketError("GPA-direct packet with range_count 0")
            for r in self.ranges:
                r.validate()
        elif self.ranges:
            raise PacketError(f"packet type {self.type:#x} cannot carry GPA ranges")
        if self.type == PacketType.DATA_USING_XFER_PAGES and not self.xfer_ranges:
            raise PacketError("transfer-page packet with range_count 0")


def data_length(ranges: tuple[GpaRange, ...]) -> int:
    return sum(r.byte_count for r in ranges)
