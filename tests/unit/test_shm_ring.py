"""Tier 1: rings in shared memory (vmbus_proto.shm_ring): the real hv_ring_buffer layout and packet format,
the signalling rules, and a peer that scribbles on its rings (reference/vmbus-core.md §6)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto.errors import PacketError
from vmbus_proto.packets import PAGE_SIZE, GpaRange, Packet, PacketType, packet_ring_size
from vmbus_proto.shm_ring import (
    FEAT_PENDING_SEND_SZ,
    W_FEATURES,
    W_MASK,
    W_PENDING,
    W_READ,
    W_WRITE,
    GuestPages,
    RingCorruptError,
    RingIn,
    RingMemory,
    RingOut,
    decode,
    encode,
    ring_memory,
)

INBAND, COMP, GPA = PacketType.DATA_INBAND, PacketType.COMP, PacketType.DATA_USING_GPA_DIRECT
XFER = PacketType.DATA_USING_XFER_PAGES
BOUND = 1 << 40


def _ring(pages: int = 3, order: list[int] | None = None) -> tuple[RingOut, RingIn, memoryview]:
    """A ring of ``pages`` pages (header first) in a fresh buffer; ``order``: which buffer page each ring page is
    (a GPADL need not list consecutive pages)."""
    order = order or list(range(pages))
    buf = memoryview(bytearray(PAGE_SIZE * (max(order) + 1)))
    mem = ring_memory(buf, [i * PAGE_SIZE for i in order])
    mem.init()
    return RingOut(mem), RingIn(mem, 64 * 1024, BOUND), buf


def test_header_layout_is_struct_hv_ring_buffer() -> None:
    out, _, buf = _ring()
    assert (W_WRITE, W_READ, W_MASK, W_PENDING, W_FEATURES) == (0, 1, 2, 3, 16)  # byte offsets 0, 4, 8, 12, 64
    assert struct.unpack_from("<I", buf, 64)[0] == FEAT_PENDING_SEND_SZ  # hv_ringbuffer_init sets it
    out.write(encode(Packet(INBAND, 0, 7, b"abc")))
    desc = struct.unpack_from("<HHHHQ", buf, PAGE_SIZE)
    assert desc == (INBAND, 2, 3, 0, 7)  # type, offset8, len8 (16 + 8 padded), flags, trans_id
    assert bytes(buf[PAGE_SIZE + 16:PAGE_SIZE + 24]) == b"abc" + bytes(5)
    assert struct.unpack_from("<Q", buf, PAGE_SIZE + 24)[0] == 0 << 32  # trailer: where the packet started
    assert struct.unpack_from("<I", buf, 0)[0] == 32  # write_index


@given(payload=st.binary(max_size=300), flags=st.sampled_from([0, 1]), tid=st.integers(0, (1 << 64) - 1),
       ranges=st.lists(st.tuples(st.integers(1, 3 * PAGE_SIZE), st.integers(0, PAGE_SIZE - 1)), max_size=3),
       xfer=st.lists(st.tuples(st.integers(0, 1 << 31), st.integers(0, 1 << 31)), min_size=1, max_size=5),
       kind=st.sampled_from(["inband", "gpa", "xfer"]))
@settings(max_examples=200, deadline=None)
def test_encode_decode_round_trip(payload: bytes, flags: int, tid: int, ranges: list[tuple[int, int]],
                                  xfer: list[tuple[int, int]], kind: str) -> None:
    if kind == "gpa" and ranges:
        gpa = tuple(GpaRange(n, off, tuple(range(100, 100 + (off + n + PAGE_SIZE - 1) // PAGE_SIZE)))
                    for n, off in ranges)
        pkt = Packet(GPA, flags, tid, payload, gpa)
    elif kind == "xfer":
        pkt = Packet(XFER, flags, tid, payload, xfer_pageset_id=0xCAFE, xfer_ranges=tuple(xfer))
    else:
        pkt = Packet(INBAND, flags, tid, payload)
    raw = encode(pkt)
    assert len(raw) + 8 == packet_ring_size(len(payload), pkt.ranges, len(pkt.xfer_ranges)) == pkt.ring_size
    got = decode(raw, 64 * 1024, BOUND)
    padded = payload + bytes(-len(payload) & 7)  # a ring does not say a payload's exact length
    assert (got.type, got.flags, got.trans_id, got.payload, got.ranges, got.xfer_ranges) == (
        pkt.type, flags, tid, padded, pkt.ranges, pkt.xfer_ranges)
    assert got.size == pkt.ring_size


@pytest.mark.parametrize("order", [None, [0, 5, 2, 3, 9]], ids=["consecutive", "scattered-pages"])
def test_packets_wrap_around_the_ring(order: list[int] | None) -> None:
    out, inn, _ = _ring(5, order)
    sent: list[bytes] = []
    got: list[bytes] = []
    for i in range(500):  # far past the 16 KiB data area, with packets of every size
        payload = bytes([i % 251]) * (i * 37 % 1500)
        while out.write(encode(Packet(INBAND, 0, i, payload))) is None:
            pkts, _ = inn.read_batch(1 << 20)
            got += [p.payload for p in pkts]
        sent.append(payload + bytes(-len(payload) & 7))
    got += [p.payload for p in inn.read_batch(1 << 20)[0]]
    assert got == sent


def test_writer_signals_only_on_empty_to_non_empty_when_unmasked() -> None:
    out, inn, _ = _ring()
    pkt = encode(Packet(INBAND, 0, 1, b"x"))
    assert out.write(pkt) is True  # empty -> non-empty
    assert out.write(pkt) is False  # already non-empty
    inn.read_batch(1 << 20)
    inn.mem.words[W_MASK] = 1  # the reader is polling (hv_begin_read)
    assert out.write(pkt) is False
    assert out.stats.interrupts == 1


def test_reader_wakes_a_blocked_writer_only_when_pending_send_sz_is_crossed() -> None:
    out, inn, _ = _ring(2)  # 4 KiB of data
    big = encode(Packet(INBAND, 0, 1, bytes(1000)))  # 1024 bytes in the ring
    assert all(out.write(big) is not None for _ in range(3))
    assert out.write(big) is None  # 3072 used: a 4th needs strictly more than 1024 free
    assert not out.block(len(big) + 8)
    assert inn.mem.words[W_PENDING] == 1024
    pkts, due = inn.read_batch(1024)  # one packet: free goes 1024 -> 2048, crossing 1024
    assert len(pkts) == 1 and due and inn.held
    out.unblock()
    assert out.write(big) is not None


def test_read_batch_stops_at_its_budget_and_keeps_the_rest() -> None:
    out, inn, _ = _ring()
    for i in range(10):
        out.write(encode(Packet(INBAND, 0, i, bytes(100))))
    pkts, _ = inn.read_batch(3 * 128)
    assert [p.trans_id for p in pkts] == [0, 1, 2] and inn.held and inn.mem.words[W_MASK] == 1
    pkts, _ = inn.read_batch(1 << 20)
    assert [p.trans_id for p in pkts] == list(range(3, 10)) and not inn.held and inn.mem.words[W_MASK] == 0


@pytest.mark.parametrize(("scribble", "match"), [
    (lambda w: w.__setitem__(W_WRITE, 100_000), "write_index"),
    (lambda w: w.__setitem__(W_WRITE, 12), "write_index"),
    (lambda w: w.__setitem__(W_WRITE, 8), "less than a packet"),
])
def test_reader_refuses_a_scribbled_write_index(scribble: object, match: str) -> None:
    _, inn, _ = _ring()
    scribble(inn.mem.words)  # type: ignore[operator]
    with pytest.raises(RingCorruptError, match=match):
        inn.read_batch(1 << 20)


def test_writer_refuses_a_scribbled_read_index() -> None:
    out, _, _ = _ring()
    out.mem.words[W_READ] = 4097 * 3
    with pytest.raises(RingCorruptError, match="read_index"):
        out.write(encode(Packet(INBAND, 0, 1, b"x")))


@pytest.mark.parametrize(("desc", "match"), [
    ((INBAND, 1, 3, 0, 1), "offset8"),  # offset8 < 2
    ((INBAND, 4, 3, 0, 1), "offset8"),  # offset8 > len8
    ((0x5, 2, 3, 0, 1), "type"),  # TEARDOWN_GPADL is not accepted on a ring
    ((INBAND, 2, 3, 0x2, 1), "flags"),
])
def test_reader_refuses_bad_descriptors(desc: tuple[int, ...], match: str) -> None:
    out, inn, buf = _ring()
    out.write(encode(Packet(INBAND, 0, 1, b"abc")))
    struct.pack_into("<HHHHQ", buf, PAGE_SIZE, *desc)
    with pytest.raises(PacketError, match=match):
        inn.read_batch(1 << 20)


def test_reader_refuses_a_len8_past_what_was_published() -> None:
    out, inn, buf = _ring()
    out.write(encode(Packet(INBAND, 0, 1, b"abc")))
    struct.pack_into("<H", buf, PAGE_SIZE + 4, 200)
    with pytest.raises(RingCorruptError, match="published"):
        inn.read_batch(1 << 20)


def test_gpa_ranges_beyond_the_guest_memory_are_refused() -> None:
    out, _, buf = _ring()
    mem = ring_memory(buf, [0, PAGE_SIZE, 2 * PAGE_SIZE])
    inn = RingIn(mem, 4096, pfn_bound=0x200)
    out.write(encode(Packet(GPA, 1, 1, b"r", (GpaRange(4096, 0, (0x200,)),))))
    with pytest.raises(PacketError, match="outside the partition's guest memory"):
        inn.read_batch(1 << 20)


def test_guest_pages_views_copies_and_bounds() -> None:
    buf = memoryview(bytearray(8 * PAGE_SIZE))
    pages = GuestPages(buf, 0x100)
    one = GpaRange(6000, 100, (0x101, 0x102))
    view = pages.slice(one)
    assert view is not None and view.nbytes == 6000
    pages.write((one,), b"\x07" * 6000)
    assert bytes(buf[PAGE_SIZE + 100:PAGE_SIZE + 6100]) == b"\x07" * 6000
    scattered = GpaRange(5000, 0, (0x105, 0x103))
    assert pages.slice(scattered) is None
    pages.write((scattered,), b"a" * 4096 + b"b" * 904)
    assert bytes(pages.read((scattered,))) == b"a" * 4096 + b"b" * 904
    assert bytes(buf[3 * PAGE_SIZE:3 * PAGE_SIZE + 904]) == b"b" * 904
    with pytest.raises(PacketError, match="outside"):
        pages.read((GpaRange(10, 0, (0x108,)),))
    with pytest.raises(PacketError, match="outside"):
        pages.slice(GpaRange(10, 0, (0xFF,)))


def test_a_reader_that_empties_the_ring_during_a_write_still_gets_its_signal() -> None:
    """The writer decides on the signal with read_index read again after publishing (``hv_signal_on_write``):
    a reader that drained the ring and went to sleep meanwhile would otherwise never hear of this packet."""
    buf = memoryview(bytearray(3 * PAGE_SIZE))
    inn: list[RingIn] = []

    class Racing(RingMemory):
        def copy_in(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            if inn and inn[0].used:
                inn[0].read_batch(1 << 20)  # the reader takes what is there, unmasks, finds nothing more
            super().copy_in(offset, data)

    mem = Racing(buf[:PAGE_SIZE], [buf[PAGE_SIZE:]])
    mem.init()
    out = RingOut(mem)
    inn.append(RingIn(mem, 4096, BOUND))
    assert out.write(encode(Packet(INBAND, 0, 1, b"first"))) is True
    assert out.write(encode(Packet(INBAND, 0, 2, b"second"))) is True  # the ring was empty when it landed
    assert [p.trans_id for p in inn[0].read_batch(1 << 20)[0]] == [2]


@given(payload=st.binary(max_size=300), ptype=st.sampled_from([INBAND, COMP]), flags=st.sampled_from([0, 1]),
       tid=st.integers(0, (1 << 64) - 1), start=st.integers(0, 4096 // 8 - 1))
@settings(max_examples=200, deadline=None)
def test_write_inband_puts_the_same_bytes_as_write_of_the_encoded_packet(
        payload: bytes, ptype: int, flags: int, tid: int, start: int) -> None:
    """The hot path (``write_inband``: fields straight into the ring) against ``write(encode(pkt))``, from the
    same write_index, wrapping around the ring's end or not, and with the same signal."""
    fast, _, fast_buf = _ring(2)
    slow, _, slow_buf = _ring(2)
    for ring in (fast, slow):
        ring.mem.words[W_WRITE] = ring.mem.words[W_READ] = start * 8
    due_fast = fast.write_inband(ptype, flags, tid, payload)
    due_slow = slow.write(encode(Packet(ptype, flags, tid, payload)))
    assert due_fast == due_slow is True
    assert bytes(fast_buf) == bytes(slow_buf)
    assert (fast.stats.packets, fast.stats.bytes, fast.stats.interrupts) == (
        slow.stats.packets, slow.stats.bytes, slow.stats.interrupts)


def test_write_inband_says_when_the_ring_is_full_and_refuses_a_scribbled_read_index() -> None:
    out, inn, _ = _ring(2)  # 4 KiB of data
    assert out.write_inband(INBAND, 0, 1, bytes(2100)) is True
    assert out.write_inband(INBAND, 0, 2, bytes(2100)) is None  # 2,128 + 2,128 bytes do not fit in 4,096
    assert [p.trans_id for p in inn.read_batch(1 << 20)[0]] == [1]
    assert out.write_inband(INBAND, 0, 2, bytes(2100)) is True
    out.mem.words[W_READ] = 4 * PAGE_SIZE + 3  # the peer scribbled on its read_index
    with pytest.raises(RingCorruptError, match="read_index"):
        out.write_inband(COMP, 0, 3, b"x")
