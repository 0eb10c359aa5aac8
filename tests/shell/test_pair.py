"""Shell tier: the in-memory channel pair itself (``vmbus_proto.aio.pair``).

Real connections, real ring and data-window accounting, real SIGNAL credit; only the socket is in memory.
"""

from __future__ import annotations

import asyncio

import pytest

from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.aio.pair import ChannelPair, MemoryLink
from vmbus_proto.envelope import Signal
from vmbus_proto.framing import FrameKind
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, PAGE_SIZE, GpaRange, Packet, PacketType
from vmbus_proto.shm_ring import GuestPages

from .waits import until

INBAND, GPA_DIRECT, COMP = int(PacketType.DATA_INBAND), int(PacketType.DATA_USING_GPA_DIRECT), int(PacketType.COMP)


def inband(payload: bytes, trans_id: int = 0) -> Packet:
    return Packet(INBAND, 0, trans_id, payload)


def small_pair(**kw: object) -> tuple[MemoryLink, ChannelPair]:
    """Rings of one data page each way (a 4-page ring GPADL, downstream offset 2)."""
    link = MemoryLink(**kw)  # type: ignore[arg-type]
    return link, link.open(1, pages=4, downstream_offset=2)


async def test_rings_are_sized_from_the_open_parameters() -> None:
    link = MemoryLink()
    pair = link.open(3, pages=20, downstream_offset=8)
    assert pair.host.rings.reader.data_size == pair.guest.rings.writer.data_size == 7 * PAGE_SIZE
    assert pair.host.rings.writer.data_size == pair.guest.rings.reader.data_size == 11 * PAGE_SIZE
    assert pair.params.gpadl.page_count == 20 and pair.params.downstream_offset == 8
    with pytest.raises(ValueError, match="downstream offset"):
        link.open(4, pages=4, downstream_offset=1)
    with pytest.raises(ValueError, match="open already"):
        link.open(3)


async def test_a_packet_is_charged_its_real_ring_size() -> None:
    _, pair = small_pair()
    pkt = Packet(GPA_DIRECT, FLAG_COMPLETION_REQUESTED, 7, b"x" * 13, (GpaRange(100, 0, (0x300,)),), b"d" * 100)
    await pair.guest.send(pkt)
    got = await asyncio.wait_for(pair.host.recv(), 30)
    assert (got.type, got.trans_id, got.payload, got.ranges, bytes(got.data)) == \
        (pkt.type, pkt.trans_id, pkt.payload, pkt.ranges, pkt.data)
    # descriptor 16 + GPA-direct header 8 + one range (8 + 8 per pfn) + payload padded to 16 + trailer 8
    assert pkt.ring_size == 16 + 8 + 16 + 16 + 8
    assert pair.host.rings.reader.stats.bytes == pair.guest.rings.writer.stats.bytes == pkt.ring_size


async def test_a_writer_blocks_where_the_ring_accounting_says_and_resumes_when_the_reader_consumes() -> None:
    _, pair = small_pair()
    pkt = inband(b"p" * 1000)
    size, ring = pkt.ring_size, pair.host.rings.writer.data_size
    fit = (ring - 1) // size  # a writer needs strictly more free bytes than the packet: a ring is never full
    assert fit == 3
    sent = 0

    async def writer() -> None:
        nonlocal sent
        for i in range(fit + 2):
            await pair.host.send(inband(b"p" * 1000, i))
            sent += 1

    task = asyncio.create_task(writer())
    await until(lambda: pair.guest.rings.reader.pending_send_sz == size,
                "the guest's reader has the host writer's pending_send_sz")
    assert sent == fit, f"{sent} packets went into a ring that holds {fit}"
    assert pair.host.rings.writer.stats.blocked == 1 and not task.done()
    first = await pair.guest.recv()  # free space crosses pending_send_sz: the reader signals credit
    assert first.trans_id == 0
    await until(lambda: sent == fit + 1, "the blocked writer resumes after one packet was consumed")
    for i in range(1, fit + 2):
        assert (await asyncio.wait_for(pair.guest.recv(), 30)).trans_id == i
    await asyncio.wait_for(task, 30)
    assert pair.guest.rings.reader.stats.packets == fit + 2


async def test_the_data_window_blocks_a_writer_whose_ring_has_room() -> None:
    window = 16 * 1024
    link = MemoryLink(data_window=window)
    pair = link.open(1, pages=32)
    rng = GpaRange(6 * 1024, 0, (0x400, 0x401))
    sent = 0

    async def writer() -> None:
        nonlocal sent
        for i in range(3):
            await pair.guest.send(Packet(GPA_DIRECT, 0, i, b"w", (rng,), bytes([i]) * (6 * 1024)))
            sent += 1

    task = asyncio.create_task(writer())
    await until(lambda: pair.host.rings.data_reader.pending_send_sz == 6 * 1024,
                "the host knows the guest waits for data window")
    assert sent == 2 and pair.guest.rings.writer.can_write(64)
    assert (await pair.host.recv()).data == bytes(6 * 1024)
    await until(lambda: sent == 3, "the writer resumes once data was consumed")
    await asyncio.wait_for(task, 30)


async def test_completions_are_matched_to_requests_by_transaction_id() -> None:
    _, pair = small_pair()
    requests = [asyncio.create_task(pair.guest.request(f"req{i}".encode())) for i in range(3)]
    got = [await asyncio.wait_for(pair.host.recv(), 30) for _ in range(3)]
    assert len({p.trans_id for p in got}) == 3 and all(p.completion_requested for p in got)
    for p in reversed(got):  # answered out of order
        await pair.host.complete(p.trans_id, b"re:" + p.payload)
    answers = await asyncio.wait_for(asyncio.gather(*requests), 30)
    assert [a.payload for a in answers] == [b"re:req0", b"re:req1", b"re:req2"]
    assert all(a.type == COMP for a in answers) and pair.guest.outstanding == 0


async def test_gpa_direct_data_travels_with_the_request_and_with_the_completion() -> None:
    _, pair = small_pair()
    rng = GpaRange(3 * PAGE_SIZE, 0, (0x500, 0x501, 0x502))
    out = bytes(range(256)) * 48
    request = asyncio.create_task(pair.guest.request(b"write-then-read", (rng,), out))
    pkt = await asyncio.wait_for(pair.host.recv(), 30)
    assert pkt.type == GPA_DIRECT and pkt.ranges == (rng,) and bytes(pkt.data) == out
    await pair.host.complete(pkt.trans_id, b"done", data=out[::-1])
    reply = await asyncio.wait_for(request, 30)
    assert reply.payload == b"done" and bytes(reply.data) == out[::-1]


async def test_a_buffer_changed_after_its_packet_went_out_does_not_change_what_arrives() -> None:
    link, pair = small_pair()
    link.to_host.pause()
    data = bytearray(b"original")
    await pair.guest.send(Packet(GPA_DIRECT, 0, 1, b"", (GpaRange(8, 0, (0x600,)),), data))
    await until(lambda: link.to_host.buffered > 0, "the packet is on the wire")
    data[:] = b"changed!"
    link.to_host.resume()
    assert bytes((await asyncio.wait_for(pair.host.recv(), 30)).data) == b"original"


async def test_credit_held_on_the_wire_keeps_the_writer_blocked() -> None:
    link, pair = small_pair()
    fit = (pair.host.rings.writer.data_size - 1) // inband(b"p" * 1000).ring_size
    for i in range(fit):
        await pair.host.send(inband(b"p" * 1000, i))
    link.to_host.pause()  # the guest's SIGNALs (its read_index) do not reach the host
    blocked = asyncio.create_task(pair.host.send(inband(b"p" * 1000, fit)))
    await until(lambda: pair.guest.rings.reader.stats.packets == fit, "the guest has every packet that fits")
    for _ in range(fit):
        await pair.guest.recv()
    await until(lambda: link.to_host.buffered > 0, "the guest's credit waits on the paused wire")
    assert not blocked.done() and pair.host.rings.writer.pending_send_sz
    link.to_host.resume()
    await asyncio.wait_for(blocked, 30)
    assert (await asyncio.wait_for(pair.guest.recv(), 30)).trans_id == fit


async def test_closing_the_guest_end_wakes_its_waiters_and_closes_the_host_end() -> None:
    link, pair = small_pair()
    for i in range(3):
        await pair.guest.send(inband(b"q" * 1000, i))
    guest_blocked = asyncio.create_task(pair.guest.send(inband(b"q" * 1000, 3)))
    guest_request = asyncio.create_task(pair.guest.request(b"never answered"))
    other = link.open(2)
    host_waiting = asyncio.create_task(other.host.recv())
    await until(lambda: pair.guest.rings.writer.pending_send_sz != 0, "the guest's writer is blocked")
    pair.close_guest()
    other.close_guest()
    for task in (guest_blocked, guest_request, host_waiting):
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(task, 30)
    await asyncio.wait_for(pair.closed(), 30)
    assert pair.host.closed and pair.guest.closed and not link.host.closing, "only the channel closes"
    assert 1 not in link.host.channels and 1 not in link.guest.channels
    with pytest.raises(ChannelClosed):
        await pair.host.recv()


async def test_closing_the_host_end_wakes_a_blocked_host_writer_and_the_guests_requests() -> None:
    _, pair = small_pair()
    for i in range(3):
        await pair.host.send(inband(b"h" * 1000, i))
    host_blocked = asyncio.create_task(pair.host.send(inband(b"h" * 1000, 3)))
    await until(lambda: pair.guest.rings.reader.pending_send_sz != 0, "the host's writer is blocked")
    guest_request = asyncio.create_task(pair.guest.request(b"in flight"))
    await until(lambda: pair.host.rings.reader.stats.packets == 1, "the host has the request")
    pair.close_host()
    for task in (host_blocked, guest_request):
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(task, 30)
    await asyncio.wait_for(pair.closed(), 30)
    with pytest.raises(ChannelClosed):
        await pair.guest.send(inband(b"after close"))


async def test_closing_the_connection_closes_every_channel_on_it() -> None:
    link = MemoryLink()
    pairs = [link.open(relid) for relid in (1, 2)]
    waiting = [asyncio.create_task(p.guest.recv()) for p in pairs]
    link.close("shutting down")
    for task in waiting:
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(task, 30)
    await asyncio.wait_for(link.closed(), 30)
    assert link.guest.peer_reason == "shutting down"
    await asyncio.wait_for(asyncio.gather(*(p.closed() for p in pairs)), 30)


async def test_a_reset_closes_both_ends() -> None:
    link, pair = small_pair()
    waiting = asyncio.create_task(pair.host.recv())
    link.abort()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 30)
    await asyncio.wait_for(link.closed(), 30)
    assert link.guest.closed_future.result() == "connection reset by peer"


async def test_a_peer_writing_past_its_ring_credit_fails_the_connection() -> None:
    link, pair = small_pair()
    pkt = inband(b"o" * 1000)
    fit = (pair.guest.rings.writer.data_size - 1) // pkt.ring_size
    waiting = asyncio.create_task(pair.guest.recv())
    for i in range(fit + 1):  # past the channel's accounting, straight onto the connection
        link.guest.send_packet(1, inband(b"o" * 1000, i))
    await asyncio.wait_for(link.closed(), 30)
    assert link.host.failure is not None and "overran its ring credit" in link.host.failure, link.host.failure
    assert link.guest.peer_reason == link.host.failure
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 30)
    assert pair.host.rings.reader.stats.packets == fit, "the overrunning packet was not delivered"


async def test_a_peer_sending_data_past_its_window_fails_the_connection() -> None:
    link = MemoryLink(data_window=16 * 1024)
    link.open(1, pages=32)
    rng = GpaRange(10 * 1024, 0, (0x700, 0x701, 0x702))
    for i in range(2):
        link.guest.send_packet(1, Packet(GPA_DIRECT, 0, i, b"", (rng,), bytes(10 * 1024)))
    await asyncio.wait_for(link.closed(), 30)
    assert link.host.failure is not None and "RingOverrunError" in link.host.failure, link.host.failure


async def test_a_signal_with_the_wrong_sides_fields_fails_the_connection() -> None:
    link, _ = small_pair()
    link.guest.send_frame(FrameKind.SIGNAL, 1, Signal(0, read_index=0).encode())  # the guest writes ring 0
    await asyncio.wait_for(link.closed(), 30)
    assert link.host.failure is not None and "reader fields" in link.host.failure, link.host.failure


async def test_output_the_peer_does_not_read_stops_reading_until_it_drains() -> None:
    link = MemoryLink(write_high=4096)  # no channels open: nothing the host sends is covered by credit
    transport = link.host.transport
    assert transport is not None
    link.to_guest.pause()  # the guest reads nothing
    for _ in range(1000):  # a SIGNAL frame is some 20 bytes: 4 KiB of them is a few hundred
        if not transport.is_reading():
            break
        link.host.send_frame(FrameKind.SIGNAL, 99, Signal(1, write_index=0).encode())
        link.host.flush()
    assert not transport.is_reading(), f"the host still reads with {transport.get_write_buffer_size()} bytes unread"
    assert transport.get_write_buffer_size() > 4096
    link.guest.send_frame(FrameKind.SIGNAL, 98, Signal(0, write_index=0).encode())
    await until(lambda: link.to_host.buffered > 0, "the guest's frame waits for the host to read")
    link.to_guest.resume()
    await until(lambda: link.to_host.buffered == 0, "the host reads again once its output drained")
    assert transport.is_reading() and not link.host.closing


async def test_shared_memory_a_completion_with_data_after_the_close_is_channel_closed() -> None:
    """A device answering a GPA-direct request after its channel closed (a rescind while the request ran) gets
    ChannelClosed, as over a stream, and the connection lives on; the close had forgotten the request's GPA
    ranges, and the late completion once ended the partition's connection with an internal error instead."""
    memory = memoryview(bytearray(64 * PAGE_SIZE))
    link = MemoryLink(pages=GuestPages(memory, 0))
    pair = link.open(1, pages=4, downstream_offset=2, pfns=(0, 1, 2, 3))
    rng = GpaRange(2 * PAGE_SIZE, 0, (10, 11))
    request = asyncio.create_task(pair.guest.request(b"read", (rng,)))
    pkt = await asyncio.wait_for(pair.host.recv(), 30)
    assert pkt.type == GPA_DIRECT and pkt.ranges == (rng,)
    pair.close_host()
    await until(lambda: pair.host.closed, "the host's channel closed")
    with pytest.raises(ChannelClosed):
        await pair.host.send(Packet(COMP, 0, pkt.trans_id, b"done", data=bytes(2 * PAGE_SIZE)))
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(request, 30)
    await asyncio.wait_for(pair.closed(), 30)
    assert link.host.failure is None and not link.host.closing
