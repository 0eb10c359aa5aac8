"""Structure from fuzz bytes: a reader that never fails (it pads with zeros), and the packet-sequence format
the device targets share, with its encoder so seeds from real traffic are written in the same format."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, PAGE_SIZE, GpaRange, Packet, PacketType, pages_spanned


class Reader:
    """Reads integers and byte strings off fuzz input; past its end every read is zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.left)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)


# ---- packet sequences ------------------------------------------------------------------------------------
# Each packet: kind u8 (low 2 bits: in-band, completion, GPA direct, transfer pages; bit 2: completion
# requested; bit 3: the range's data travels with the packet; bit 4: a u64 trans_id follows the head),
# trans_id u8, payload length u16, then the payload, and for GPA direct the range's byte count u16 (its data
# is zeros: what the range points at, carried with the packet on a stream for a write).

_KINDS = (PacketType.DATA_INBAND, PacketType.COMP, PacketType.DATA_USING_GPA_DIRECT, PacketType.DATA_USING_XFER_PAGES)
_HEAD = struct.Struct("<BBH")
MAX_PACKETS = 64


@dataclass(frozen=True, slots=True)
class Seq:
    """One packet of a sequence, as the encoder takes it."""

    type: int
    payload: bytes
    completion_requested: bool = False
    trans_id: int = 0
    range_len: int = 0  # GPA direct: the range's byte count
    carries_data: bool = False  # GPA direct: the range's bytes travel with the packet (a write)


def packets(data: bytes) -> Iterator[Packet]:
    """The packets encoded in ``data`` (at most ``MAX_PACKETS``)."""
    r = Reader(data)
    for _ in range(MAX_PACKETS):
        if r.left < _HEAD.size:
            return
        kind, trans_id, length = r.u8(), r.u8(), r.u16()
        if kind & 16:
            trans_id = r.u64()
        ptype = _KINDS[kind & 3]
        flags = FLAG_COMPLETION_REQUESTED if kind & 4 else 0
        payload = r.take(length)
        if ptype == PacketType.DATA_USING_GPA_DIRECT:
            count = r.u16() or 1
            rng = GpaRange(count, 0, tuple(range(0x1000, 0x1000 + pages_spanned(0, count))))
            yield Packet(ptype, flags, trans_id, payload, (rng,), bytes(count if kind & 8 else 0))
        elif ptype == PacketType.DATA_USING_XFER_PAGES:
            yield Packet(ptype, flags, trans_id, payload, xfer_pageset_id=1, xfer_ranges=((len(payload), 0),))
        else:
            yield Packet(ptype, flags, trans_id, payload)


def encode_packets(seq: Iterable[Seq]) -> bytes:
    out = bytearray()
    for p in seq:
        kind = _KINDS.index(PacketType(p.type)) | (4 if p.completion_requested else 0)
        if p.carries_data:
            kind |= 8
        if p.trans_id > 0xFF:
            kind |= 16
        out += _HEAD.pack(kind, p.trans_id & 0xFF, len(p.payload))
        if p.trans_id > 0xFF:
            out += struct.pack("<Q", p.trans_id)
        out += p.payload
        if p.type == PacketType.DATA_USING_GPA_DIRECT:
            out += struct.pack("<H", min(p.range_len or PAGE_SIZE, 0xFFFF))
    return bytes(out)
