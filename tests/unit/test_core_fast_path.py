"""The core's per-packet fast paths say exactly what the general code says: the envelope's decoded packets
carry the ring size ``Packet.ring_size`` computes, the frame decoder's inline header check refuses what
``FrameDecoder._check`` refuses with the same words, ``ChannelRings.try_send`` is ``can_send`` then
``sent``, and a channel's transaction ids skip busy ones and wrap as ``Channel._trans_id`` does."""

from __future__ import annotations

import asyncio
import random
from typing import Any, cast

import pytest

from vmbus_proto.aio.channel import TRANS_ID_MAX, Channel
from vmbus_proto.channel import ChannelRings
from vmbus_proto.envelope import decode_packet, encode_packet
from vmbus_proto.errors import FrameError
from vmbus_proto.framing import HEADER, Frame, FrameDecoder, FrameKind
from vmbus_proto.packets import (
    FLAG_COMPLETION_REQUESTED,
    PAGE_SIZE,
    GpaRange,
    Packet,
    PacketType,
    packet_ring_size,
    pages_spanned,
)


def _range(offset: int, count: int) -> GpaRange:
    return GpaRange(count, offset, tuple(range(100, 100 + pages_spanned(offset, count))))


PACKETS = [
    Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 1, b""),
    Packet(PacketType.DATA_INBAND, 0, (1 << 64) - 1, bytes(range(256)) * 4),
    Packet(PacketType.COMP, 0, 77, bytes(13)),
    Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 9, bytes(8), (_range(0, 65536),)),
    Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 9, bytes(21), (_range(4095, 2),)),
    Packet(PacketType.DATA_USING_GPA_DIRECT, 0, 9, b"", (_range(7, 1), _range(0, PAGE_SIZE))),
    Packet(PacketType.DATA_USING_XFER_PAGES, 0, 3, bytes(40), xfer_pageset_id=1, xfer_ranges=((100, 0), (60, 4096))),
    Packet(PacketType.DATA_USING_XFER_PAGES, 1, 4, bytes(44), xfer_pageset_id=0xCAFE,  # an RSC'd 64 KiB segment
           xfer_ranges=tuple((1756, 6144 * i) for i in range(37))),
]


@pytest.mark.parametrize("pkt", PACKETS, ids=lambda p: f"type{p.type:#x}-{len(p.payload)}-{len(p.ranges)}")
def test_a_decoded_packet_is_the_packet_sent_with_its_ring_size(pkt: Packet) -> None:
    got = decode_packet(encode_packet(pkt), b"", 64 * 1024)
    assert got == pkt, "the envelope changed the packet"
    want = packet_ring_size(len(pkt.payload), pkt.ranges, len(pkt.xfer_ranges))
    assert got.ring_size == want, f"ring size {got.ring_size}, the general rule says {want}"
    assert all(type(r) is GpaRange for r in got.ranges), "a GPA range decoded as a plain tuple"


def _header(length: int, kind: int, reserved: int = 0, data_len: int = 0, relid: int = 1) -> bytes:
    return HEADER.pack(length, kind, 0, reserved, relid, data_len)


@pytest.mark.parametrize("header", [
    _header(5 * 1024 * 1024, FrameKind.PACKET),
    _header(4, 0),
    _header(4, 9),
    _header(4, FrameKind.PACKET, reserved=1),
    _header(4, FrameKind.PACKET, data_len=5),
], ids=["too-long", "kind-0", "kind-9", "reserved", "data-longer-than-frame"])
def test_the_inline_header_check_refuses_what_the_general_check_refuses(header: bytes) -> None:
    with pytest.raises(FrameError) as general:
        FrameDecoder()._check(header + bytes(4), 0)
    # A good frame first, so the bad header is met in the cutting loop, not by the partial-frame check.
    good = _header(3, FrameKind.CONTROL) + b"abc"
    with pytest.raises(FrameError) as inline:
        FrameDecoder().feed(good + header + bytes(4))
    assert str(inline.value) == str(general.value), "the inline check says something else"


def test_cut_frames_are_frames() -> None:
    frames = FrameDecoder().feed(_header(5, FrameKind.PACKET, data_len=2, relid=9) + b"abcde"
                                 + _header(1, FrameKind.SIGNAL, relid=2) + b"z")
    assert [type(f) for f in frames] == [Frame, Frame], "the decoder returned something other than Frame"
    assert [(f.kind, f.relid, bytes(f.body), bytes(f.data), f.flags) for f in frames] == [
        (FrameKind.PACKET, 9, b"abc", b"de", 0), (FrameKind.SIGNAL, 2, b"z", b"", 0)]


def test_try_send_is_can_send_then_sent() -> None:
    rnd = random.Random(5)
    fast = ChannelRings(1, host=True, guest_to_host_data=8192, host_to_guest_data=8192, window_out=1 << 20)
    slow = ChannelRings(1, host=True, guest_to_host_data=8192, host_to_guest_data=8192, window_out=1 << 20)
    for _ in range(2000):
        size, data = rnd.randrange(8, 2048, 8), rnd.choice([0, 0, rnd.randrange(1, 300_000)])
        ok = slow.can_send(size, data)
        if ok:
            slow.sent(size, data)
        assert fast.try_send(size, data) == ok, "try_send disagrees with can_send"
        assert (fast.writer.free, fast.data_writer.free) == (slow.writer.free, slow.data_writer.free)
        if rnd.random() < 0.3:  # the reader gives everything back
            for rings in (fast, slow):
                rings.writer.update(rings.writer.write_index, 0)
                rings.data_writer.update(rings.data_writer.write_index, 0)
    assert fast.writer.stats == slow.writer.stats, "try_send counted packets differently"


class _Conn:
    def __init__(self) -> None:
        self.sent: list[Packet] = []

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.sent.append(pkt)


async def test_transaction_ids_skip_busy_ones_and_wrap() -> None:
    conn = _Conn()
    ch = Channel(cast(Any, conn), 1, ChannelRings(1, host=False, guest_to_host_data=1 << 16,
                                                  host_to_guest_data=1 << 16))
    ch._next_trans = TRANS_ID_MAX - 1
    first = asyncio.ensure_future(ch.request(b"a"))
    busy = asyncio.ensure_future(ch.request(b"b", trans_id=1))  # a fixed id (VMBUS_RQST_INIT-like)
    rest = [asyncio.ensure_future(ch.request(b"c")) for _ in range(2)]
    for _ in range(100):
        if len(conn.sent) == 4:
            break
        await asyncio.sleep(0)
    assert [p.trans_id for p in conn.sent] == [TRANS_ID_MAX - 1, 1, TRANS_ID_MAX, 2], "ids not as _trans_id gives"
    ch.close()
    for fut in (first, busy, *rest):
        with pytest.raises(Exception, match="closed"):
            await fut
