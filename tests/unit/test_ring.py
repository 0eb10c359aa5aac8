"""Tier 1: ring accounting (vmbus_proto.ring, vmbus_proto.channel, packets.packet_ring_size).

The rules under test are reference/vmbus-core.md §6: a packet costs a 16-byte descriptor, its extension,
its payload padded to 8 and an 8-byte trailer; a writer never fills a ring (it needs strictly more free
bytes than the packet); a writer signals only on empty -> non-empty with the reader's mask clear; a reader
signals a blocked writer only when free space crosses pending_send_sz. Over a stream the reader also returns
credit in batches (half a ring) and at once when a writer blocks on stale credit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vmbus_proto.channel import ChannelRings
from vmbus_proto.envelope import Signal
from vmbus_proto.errors import FrameError, RingOverrunError
from vmbus_proto.packets import (
    DESCRIPTOR_SIZE,
    TRAILER_SIZE,
    GpaRange,
    Packet,
    PacketType,
    align8,
    offset8,
    packet_ring_size,
)
from vmbus_proto.ring import GUEST_TO_HOST, HOST_TO_GUEST, RingReader, RingWriter, ring_data_size

# ---- packet sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "size"), [(0, 24), (1, 32), (7, 32), (8, 32), (9, 40), (16, 40),
                                               (4096, 16 + 4096 + 8), (4097, 16 + 4104 + 8)])
def test_inband_packet_ring_size(payload: int, size: int) -> None:
    assert packet_ring_size(payload) == size
    assert Packet(PacketType.DATA_INBAND, 0, 1, b"x" * payload).ring_size == size
    assert offset8() == 2


def test_gpa_direct_packet_ring_size() -> None:
    one = GpaRange(4096, 0, (7,))
    two = GpaRange(8192, 100, (1, 2, 3))
    # descriptor + (reserved u32, range_cnt u32) + per range (byte_count, byte_offset, pfns) + payload + trailer
    assert packet_ring_size(20, (one,)) == 16 + 8 + (8 + 8) + 24 + 8
    assert packet_ring_size(20, (one, two)) == 16 + 8 + (8 + 8) + (8 + 24) + 24 + 8
    assert offset8((one,)) == (16 + 8 + 16) // 8
    assert offset8((one, two)) == (16 + 8 + 16 + 32) // 8
    pkt = Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 5, b"p" * 20, (one, two), data=b"z" * 12288)
    assert pkt.ring_size == packet_ring_size(20, (one, two))  # GPA data lives in guest memory, uncharged


def test_transfer_page_packet_ring_size() -> None:
    # vmtransfer_page_packet_header: pageset id u16, sender_owns u8, reserved u8, range_cnt u32, 8 per range
    assert packet_ring_size(10, xfer_ranges=3) == 16 + 8 + 24 + 16 + 8
    assert offset8(xfer_ranges=3) == (16 + 8 + 24) // 8
    pkt = Packet(PacketType.DATA_USING_XFER_PAGES, 1, 1, b"", xfer_pageset_id=0xCAFE,
                 xfer_ranges=((10, 0), (20, 16)))
    assert pkt.ring_size == 16 + 8 + 16 + 0 + 8


@given(st.integers(0, 1 << 16), st.lists(st.integers(1, 5), max_size=4))
@settings(max_examples=50, deadline=None)
def test_packet_ring_size_is_aligned_and_monotonic(payload: int, pages: list[int]) -> None:
    ranges = tuple(GpaRange(n * 4096, 0, tuple(range(n))) for n in pages)
    size = packet_ring_size(payload, ranges)
    assert size % 8 == 0
    assert size >= DESCRIPTOR_SIZE + align8(payload) + TRAILER_SIZE
    assert size - payload <= DESCRIPTOR_SIZE + 7 + TRAILER_SIZE + (8 + sum(8 + 8 * n for n in pages) if pages else 0)
    assert packet_ring_size(payload + 1, ranges) >= size


def test_ring_data_size() -> None:
    assert ring_data_size(2) == 4096
    assert ring_data_size(129) == 128 * 4096  # netvsc default: 128 data pages + the header page


# ---- writer / reader rules -----------------------------------------------------------------------------

def test_writer_rejects_bad_sizes() -> None:
    for bad in (0, -8, 4095, 12):
        with pytest.raises(ValueError, match="positive multiple of 8"):
            RingWriter(bad)


def test_a_ring_is_never_filled() -> None:
    w, r = RingWriter(4096), RingReader(4096)
    assert w.fits_ever(4088) and not w.fits_ever(4096)
    w.write(4000)
    assert r.arrive(4000)
    assert w.free == r.free == 96
    assert not w.can_write(96)  # exactly the free space: refused
    assert w.can_write(88)
    with pytest.raises(RingOverrunError, match="96 bytes with 96 free"):
        w.write(96)
    with pytest.raises(RingOverrunError, match="overran its ring credit"):
        r.arrive(96)
    assert r.used == 4000  # the refused packet was not counted
    assert not r.arrive(88)  # 8 bytes stay free: allowed (and no interrupt: ring was not empty)
    assert r.free == 8


def test_writer_cannot_fill_an_empty_ring_with_one_packet() -> None:
    w, r = RingWriter(8192), RingReader(8192)
    assert not w.can_write(8192)
    with pytest.raises(RingOverrunError):
        r.arrive(8192)


def test_interrupt_only_on_empty_to_non_empty_with_mask_clear() -> None:
    r = RingReader(4096)
    assert r.arrive(24)  # empty -> non-empty
    assert not r.arrive(24)  # already non-empty
    r.consume(24)
    assert not r.arrive(24)  # still one packet in: not empty before
    r.consume(24)
    r.consume(24)
    assert r.used == 0
    r.interrupt_mask = 1  # the reader is draining: it polls, no interrupts
    assert not r.arrive(24)
    r.consume(24)
    r.interrupt_mask = 0
    assert r.arrive(32)
    assert r.stats.interrupts == 2
    assert r.stats.packets == 5


def test_credit_is_returned_at_half_ring() -> None:
    r = RingReader(4096)
    for _ in range(20):
        r.arrive(200)
    due = [r.consume(200) for _ in range(10)]  # 2000 bytes: not yet half of 4096
    assert not any(due)
    assert r.consume(200)  # 2200 >= 2048
    assert r.credit() == 2200
    assert r.stats.credit_updates == 1
    assert not any(r.consume(200) for _ in range(9))  # 1800 since the last credit


def test_pending_send_sz_signals_only_on_the_crossing() -> None:
    r = RingReader(8192)
    for _ in range(10):
        r.arrive(800)  # 8000 used, 192 free
    assert not r.writer_pending(1000)  # nothing consumed since the last credit: wait for the crossing
    assert r.pending_send_sz == 1000
    assert not r.consume(800)  # free 992: still below 1000
    assert r.consume(800)  # free 1792 > 1000: the transition
    r.credit()
    assert r.pending_send_sz == 0  # satisfied by that credit
    assert not r.consume(800)  # no pending writer, far from half a ring


def test_crossing_needs_strictly_more_than_pending() -> None:
    r = RingReader(4096)
    r.arrive(2000)
    r.arrive(2000)  # 96 free
    r.writer_pending(2096)
    assert not r.consume(2000)  # free == 2096 == pending: a packet of that size still does not fit
    assert r.consume(2000)  # free 4096 > 2096; that consume crossed


def test_crossing_fires_once_not_on_every_read_above_pending() -> None:
    # Linux hv_pkt_iter_close: signal iff (free - just_read) <= pending < free.
    r = RingReader(65536)
    for _ in range(8):
        r.arrive(1000)  # 57536 free
    assert not r.writer_pending(58000)
    assert r.consume(1000)  # 57536 -> 58536 crosses 58000
    assert not r.consume(1000)  # already above: no second signal (the credit was not even taken)
    assert not r.consume(1000)


def test_no_crossing_when_free_was_already_above_pending() -> None:
    r = RingReader(65536)
    r.arrive(1000)
    assert not r.writer_pending(8)  # no stale credit: the writer waits for one already in flight
    assert not r.consume(1000)  # free was above 8 before and after: no transition


def test_writer_pending_with_stale_credit_is_answered_at_once() -> None:
    r = RingReader(4096)
    for _ in range(3):
        r.arrive(1000)
    assert not r.consume(1000)  # consumed, but under half: credit not sent yet (stale at the writer)
    assert r.writer_pending(1200)  # the writer blocked on stale credit: answer now
    assert r.credit() == 1000
    assert r.pending_send_sz == 0  # 2096 free > 1200: that credit satisfies it
    assert not r.writer_pending(1200)  # nothing new consumed since: wait for the crossing


def test_writer_blocked_on_stale_credit_below_half_ring_is_unblocked() -> None:
    """1528 bytes written and read (under half of 4096, so no batch credit); the writer still believes only
    2568 bytes are free and blocks for 2728. The reader has 4096 free, so free space will never *cross* the
    pending size: without the stale-credit rule this writer would wait forever."""
    host, guest = _pair(g2h=4096)
    guest.sent(1528)
    host.arrive(1528)
    assert host.consume(1528) is None
    assert not guest.can_send(2728)
    credit = host.on_signal(guest.block(2728))
    assert credit == Signal(GUEST_TO_HOST, read_index=1528, interrupt_mask=0)
    guest.on_signal(credit)
    assert guest.can_send(2728) and guest.writer.pending_send_sz == 0


def test_credit_clears_a_satisfied_pending() -> None:
    r = RingReader(4096)
    for _ in range(3):
        r.arrive(1000)
    r.consume(1000)
    r.writer_pending(1000)  # 2096 free > 1000
    r.credit()
    assert r.pending_send_sz == 0
    r.writer_pending(2200)  # not satisfiable yet: kept
    r.credit()
    assert r.pending_send_sz == 2200


def test_writer_pending_validation() -> None:
    r = RingReader(4096)
    assert not r.writer_pending(0)  # clearing is fine
    for bad in (-8, 4096, 5000, 12):
        with pytest.raises(RingOverrunError, match="pending_send_sz"):
            r.writer_pending(bad)


def test_reader_cannot_consume_what_never_arrived() -> None:
    r = RingReader(4096)
    r.arrive(100)
    with pytest.raises(RingOverrunError, match="consumed more"):
        r.consume(200)


def test_writer_update_validation() -> None:
    w = RingWriter(4096)
    w.write(1000)
    for bad in (4096, 5000, -8, 4):
        with pytest.raises(RingOverrunError, match="8-aligned offset"):
            w.update(bad, 0)
    w.update(504, 0)
    assert w.free == 4096 - 496
    with pytest.raises(RingOverrunError, match="backwards"):
        w.update(496, 0)  # would mean 8 bytes un-read


def test_writer_unblocks_when_credit_arrives() -> None:
    w = RingWriter(4096)
    w.write(4000)
    assert not w.can_write(200)
    assert w.block(197) == 200  # pending_send_sz rounded up to 8
    assert w.pending_send_sz == 200 and w.stats.blocked == 1
    w.update(96, 1)  # 96 consumed: 192 free, still not enough
    assert w.pending_send_sz == 200 and w.peer_interrupt_mask == 1
    w.update(200, 0)
    assert w.pending_send_sz == 0
    w.write(200)


@pytest.mark.parametrize("size", [24, 200, 1000, 2040, 4088])
def test_indices_wrap_around_over_many_cycles(size: int) -> None:
    data = 8192
    w, r = RingWriter(data), RingReader(data)
    total = 0
    while total < 12 * data:
        w.write(size)
        r.arrive(size)
        total += size
        if r.consume(size):
            w.update(r.credit(), 0)
        assert w.write_index == total % data
        assert r.read_index == total % data
        assert r.used == 0
        assert w.free <= r.free
    w.update(r.credit(), 0)
    assert w.free == data


# ---- both rings of a channel ---------------------------------------------------------------------------

def _pair(g2h: int = 4096, h2g: int = 8192) -> tuple[ChannelRings, ChannelRings]:
    host = ChannelRings(5, host=True, guest_to_host_data=g2h, host_to_guest_data=h2g)
    guest = ChannelRings(5, host=False, guest_to_host_data=g2h, host_to_guest_data=h2g)
    return host, guest


def test_channel_ring_directions() -> None:
    host, guest = _pair()
    assert (host.out_ring, host.in_ring) == (HOST_TO_GUEST, GUEST_TO_HOST)
    assert (guest.out_ring, guest.in_ring) == (GUEST_TO_HOST, HOST_TO_GUEST)
    assert host.writer.data_size == guest.reader.data_size == 8192
    assert host.reader.data_size == guest.writer.data_size == 4096


def test_channel_signals_and_misdirected_fields() -> None:
    host, guest = _pair()
    block = guest.block(4096)  # more than the 4096-byte ring can ever hold... block() just announces it
    assert block == Signal(GUEST_TO_HOST, write_index=0, pending_send_sz=4096)
    with pytest.raises(RingOverrunError):
        host.on_signal(block)  # pending_send_sz must be below the ring size
    guest.sent(1000)
    host.arrive(1000)
    assert host.consume(1000) is None
    credit = host.on_signal(Signal(GUEST_TO_HOST, write_index=1000, pending_send_sz=3200))
    assert credit == Signal(GUEST_TO_HOST, read_index=1000, interrupt_mask=0)
    assert guest.on_signal(credit) is None
    assert guest.writer.free == 4096
    # A peer may only send the fields it owns for each ring.
    with pytest.raises(FrameError, match="writer fields"):
        guest.on_signal(Signal(GUEST_TO_HOST, write_index=0))
    with pytest.raises(FrameError, match="reader fields"):
        guest.on_signal(Signal(HOST_TO_GUEST, read_index=0))
    guest.on_signal(Signal(GUEST_TO_HOST, interrupt_mask=1))
    assert guest.writer.peer_interrupt_mask == 1


# ---- the data window: inline GPA data in flight per channel and direction ------------------------------

WINDOW = 1 << 20


def _windowed() -> tuple[ChannelRings, ChannelRings]:
    host = ChannelRings(5, host=True, guest_to_host_data=1 << 16, host_to_guest_data=1 << 16,
                        window_in=WINDOW, window_out=2 * WINDOW)
    guest = ChannelRings(5, host=False, guest_to_host_data=1 << 16, host_to_guest_data=1 << 16,
                         window_in=2 * WINDOW, window_out=WINDOW)
    return host, guest


def test_data_window_bounds_inline_data_the_ring_would_admit() -> None:
    host, guest = _windowed()
    chunk = 64 * 1024
    sent = 0
    while guest.can_send(176, chunk):  # a GPA-direct descriptor is small; its data is not
        guest.sent(176, chunk)
        host.arrive(176, chunk)
        sent += 1
    assert sent == WINDOW // chunk - 1  # a window, like a ring, is never filled
    assert guest.writer.can_write(176)  # the ring alone would have taken more
    block = guest.block(176, chunk)
    assert block.pending_send_sz == 0 and block.data_pending_sz == chunk
    assert host.on_signal(block) is None  # nothing consumed yet: no credit to give
    credit = None
    for _ in range(sent):  # the device takes the packets: the first that frees enough space credits
        credit = credit or host.consume(176, chunk)
    assert credit is not None and credit.data_read_index is not None
    guest.on_signal(credit)
    assert guest.can_send(176, chunk)


def test_data_window_overrun_is_a_ring_overrun() -> None:
    host, _ = _windowed()
    host.arrive(176, WINDOW - 4096)
    with pytest.raises(RingOverrunError, match="overran"):
        host.arrive(176, 8192)


def test_data_too_large_for_the_window_never_fits() -> None:
    _, guest = _windowed()
    assert guest.fits_ever(176, WINDOW - 8)
    assert not guest.fits_ever(176, WINDOW)


def test_data_credit_rides_with_ring_credit_and_only_when_it_moved() -> None:
    host, guest = _windowed()
    guest.sent(100, 0)
    host.arrive(100)
    assert host.consume(100) is None
    credit = host.on_signal(Signal(GUEST_TO_HOST, write_index=100, pending_send_sz=60000))
    assert credit == Signal(GUEST_TO_HOST, read_index=100, interrupt_mask=0)  # no data moved: no data index
    half = WINDOW // 2
    guest.sent(200, half)
    host.arrive(200, half)
    credit = host.consume(200, half)  # half the window consumed: a batch return, as for a ring
    assert credit is not None and credit.data_read_index == half
    with pytest.raises(FrameError, match="reader fields"):
        guest.on_signal(Signal(HOST_TO_GUEST, data_read_index=0))
    with pytest.raises(FrameError, match="writer fields"):
        guest.on_signal(Signal(GUEST_TO_HOST, data_pending_sz=8))


# ---- a writer and a reader over a stream, with delays (Hypothesis) -------------------------------------

@dataclass
class _Link:
    """The guest-to-host ring of one channel over an ordered stream, with both peers' views."""

    data: int
    guest: ChannelRings = field(init=False)
    host: ChannelRings = field(init=False)
    to_host: deque[tuple[str, int | Signal]] = field(default_factory=deque)
    to_guest: deque[Signal] = field(default_factory=deque)
    unread: deque[int] = field(default_factory=deque)  # packets in the ring, not yet consumed
    blocked: int = 0  # size of the packet the writer waits to send
    written: int = 0
    consumed: int = 0
    interrupts: int = 0

    def __post_init__(self) -> None:
        self.host, self.guest = _pair(g2h=self.data, h2g=4096)

    def write(self, size: int) -> None:
        if self.blocked:
            return
        if self.guest.can_send(size):
            self._put(size)
        else:
            self.blocked = size
            self.to_host.append(("signal", self.guest.block(size)))

    def _put(self, size: int) -> None:
        self.guest.sent(size)
        self.written += size
        self.to_host.append(("packet", size))

    def deliver_to_host(self) -> None:
        kind, item = self.to_host.popleft()
        if kind == "packet":
            assert isinstance(item, int)
            was_empty = not self.unread
            if self.host.arrive(item):
                assert was_empty
                self.interrupts += 1
            else:
                assert not was_empty or self.host.reader.interrupt_mask
            self.unread.append(item)
        else:
            assert isinstance(item, Signal)
            credit = self.host.on_signal(item)
            if credit is not None:
                self.to_guest.append(credit)

    def consume(self) -> None:
        size = self.unread.popleft()
        self.consumed += size
        credit = self.host.consume(size)
        if credit is not None:
            self.to_guest.append(credit)

    def deliver_to_guest(self) -> None:
        assert self.guest.on_signal(self.to_guest.popleft()) is None
        if self.blocked:
            if self.guest.can_send(self.blocked):
                size, self.blocked = self.blocked, 0
                self._put(size)
            else:  # the aio writer re-announces after every signal that did not free enough
                self.to_host.append(("signal", self.guest.block(self.blocked)))

    def check(self) -> None:
        real_free = self.data - (self.written - self.consumed)
        # The writer's view is never more optimistic than the truth, and the truth never overflows.
        assert self.guest.writer.free <= real_free
        assert real_free > 0
        assert self.host.reader.used == sum(self.unread)
        assert self.host.reader.free >= real_free


@given(data_pages=st.integers(1, 4),
       ops=st.lists(st.tuples(st.sampled_from("wwwhcg"), st.integers(0, 1000)), max_size=200),
       mask=st.booleans())
@example(data_pages=1, ops=[("w", 373), ("h", 0), ("c", 0), ("w", 666)], mask=False)  # blocked on stale credit
@example(data_pages=1, ops=[("w", 250), ("h", 0), ("w", 700)], mask=False)  # needs the crossing signal
@settings(max_examples=250, deadline=None)
def test_stream_flow_control_is_safe_and_live(data_pages: int, ops: list[tuple[str, int]], mask: bool) -> None:
    """Random writes (sized in thousandths of the ring, so the writer blocks often), deliveries in both
    directions with random delay (in order, as on a stream) and reads. Safety: no overrun, the writer's
    view of free space never exceeds the truth. Liveness: once the reader drains, no writer stays blocked."""
    data = data_pages * 4096
    link = _Link(data)
    link.host.reader.interrupt_mask = int(mask)
    for op, n in ops:
        if op == "w":
            size = packet_ring_size(max(0, n * data // 1000 - 24))
            if link.guest.writer.fits_ever(size):
                link.write(size)
        elif op == "h" and link.to_host:
            link.deliver_to_host()
        elif op == "c" and link.unread:
            link.consume()
        elif op == "g" and link.to_guest:
            link.deliver_to_guest()
        link.check()
    # Drain: the reader consumes everything and every signal is delivered; a blocked writer must get going.
    for _ in range(10_000):
        if link.to_host:
            link.deliver_to_host()
        elif link.unread:
            link.consume()
        elif link.to_guest:
            link.deliver_to_guest()
        else:
            break
        link.check()
    assert not link.blocked, "a blocked writer was never unblocked"
    assert link.written == link.consumed
    if mask:
        assert link.interrupts == 0
