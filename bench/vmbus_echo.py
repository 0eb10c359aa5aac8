"""Path (b): channel packet round trips through the parent daemon's VMBus path to the echo VSP.

The benchmark process is a guest: it connects with ``child_partition.runner.open_bus``, negotiates,
shares a ring GPADL out of its ``GuestMemory`` and opens the echo channel exactly as ``Vsc.attach`` does,
then keeps ``window`` requests in flight. At 1 KiB each request is an in-band packet whose completion
echoes the payload. At 64 KiB the data rides GPA-direct, as real devices carry bulk: a small in-band
header plus one GPA range over 16 guest pages; the data travels with the request and comes back with the
completion, and is written into the guest pages the range names (as a storage READ would land).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import Any

from child_partition.bus import GuestBus
from child_partition.guest_memory import GUEST_PFN_BASE, GuestMemory
from child_partition.runner import open_bus
from vmbus_proto.aio.channel import Channel
from vmbus_proto.aio.shared import SharedChannel
from vmbus_proto.devices.echo import protocol as echo
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, PAGE_SIZE, Packet, PacketType

from .meter import CpuMeter

INBAND_MAX = 1024  # sizes up to this go in-band; larger ones GPA-direct
HEADER = struct.Struct("<II")  # (slot, length): the small in-band header of a GPA-direct request
CHECK_EVERY = 256  # compare the echoed bytes on every 256th round trip
MAX_ROUND_TRIPS = 20_000_000  # a count bound on top of the time bound; a capped run is flagged
TRANS_ID_LIMIT = 1 << 32  # the driver-style guest's request ids wrap here


async def _open_echo(bus: GuestBus, memory: GuestMemory) -> tuple[Channel, int, list[int]]:
    offers = await asyncio.wait_for(bus.negotiate(), 30.0)
    offer = next((o for o in offers.values() if o.if_type == echo.SPEC.class_id), None)
    if offer is None:
        raise RuntimeError("the parent offers no echo device")
    pages = echo.SPEC.ring_bytes // PAGE_SIZE
    ring_pfns = memory.alloc(2 * pages)
    gpadl = await bus.create_gpadl(offer.child_relid, ring_pfns)
    ch = await bus.open_channel(offer.child_relid, gpadl, 2 * pages, pages, name="echo")
    return ch, gpadl, ring_pfns


async def measure(url: str, size: int, window: int, seconds: float, warmup: float,
                  parent_pid: int | None = None, name: str = "bench-echo", shared: bool = False) -> dict[str, Any]:
    """Completed requests per second over ``seconds`` after ``warmup``, ``window`` in flight. ``shared``: the
    guest's memory is a memfd the parent maps (a Unix ``url``): rings and data stay in it (docs/protocol.md §14)."""
    data_pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    memory = GuestMemory((2 * (echo.SPEC.ring_bytes // PAGE_SIZE) + window * data_pages + 16) * PAGE_SIZE,
                         shared=shared)
    bus = await asyncio.wait_for(open_bus(url, name, memory=memory), 30.0)
    ch, gpadl, _ = await asyncio.wait_for(_open_echo(bus, memory), 60.0)
    if bus.shared != shared:
        raise RuntimeError(f"asked for {'shared' if shared else 'stream'} memory, the parent chose otherwise")
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    completed = 0
    stop = False
    errors: list[str] = []

    async def inband() -> None:
        """Driver-style, as the raw echo's client is (and Linux's channel callback): each completion, delivered
        by the channel (``on_packet``), is checked and answered by the next request at once; this task only
        starts the window and waits for the end."""
        nonlocal completed
        finished = asyncio.get_running_loop().create_future()
        next_tid = 0
        inband, flags = int(PacketType.DATA_INBAND), FLAG_COMPLETION_REQUESTED
        try_sendpacket = ch.try_sendpacket

        def send_next() -> None:
            nonlocal next_tid
            next_tid = next_tid + 1 if next_tid < TRANS_ID_LIMIT else 1
            if not try_sendpacket(payload, next_tid, inband, flags) and not finished.done():
                finished.set_result(None)
                errors.append("the echo ring had no room for a request within the window")

        def on_completion(pkt: Packet) -> None:
            nonlocal completed
            if finished.done():
                return
            # Check the echo: its length always, its bytes every so often (cheap but not free).
            if len(pkt.payload) != size or (not completed % CHECK_EVERY and pkt.payload != payload):
                errors.append(f"echo returned {len(pkt.payload)} different bytes for {size}")
                finished.set_result(None)
                return
            completed += 1
            if stop or completed >= MAX_ROUND_TRIPS:
                finished.set_result(None)
                return
            send_next()

        ch.on_packet = on_completion
        for _ in range(window):
            send_next()
        await finished

    async def gpa_direct(slot: int) -> None:
        nonlocal completed
        # Each in-flight request owns its own guest buffer; the request's data is read from those
        # pages without a copy (a view of guest memory) and the completion's data is written back.
        pfns = memory.alloc(data_pages)
        rng = memory.range_for(pfns, 0, size)
        base = (pfns[0] - GUEST_PFN_BASE) * PAGE_SIZE
        memory.view[base:base + size] = payload
        buf = memory.view[base:base + size]
        header = HEADER.pack(slot, size)
        ranges = (rng,)
        request = ch.request
        write = memory.write
        while not stop and completed < MAX_ROUND_TRIPS:
            pkt = await request(header, ranges=ranges, data=buf)
            if len(pkt.data) != size or (not completed % CHECK_EVERY and pkt.data != payload):
                errors.append(f"echo returned {len(pkt.data)} different data bytes for {size}")
                return
            if not shared:  # (shared: the host's data is in these pages already)
                write(rng, pkt.data)
            completed += 1

    workers = ([asyncio.ensure_future(inband())] if size <= INBAND_MAX
               else [asyncio.ensure_future(gpa_direct(i)) for i in range(window)])
    meter = CpuMeter(parent_pid)
    try:
        await asyncio.sleep(warmup)
        c0, t0 = completed, time.perf_counter()
        meter.start()
        await asyncio.sleep(seconds)
        c1, t1 = completed, time.perf_counter()
        cpu = meter.stop(c1 - c0)
        stop = True
        await asyncio.wait_for(asyncio.gather(*workers), 30.0)
    finally:
        for w in workers:
            w.cancel()
    # Clean teardown as a guest does it: CLOSECHANNEL, GPADL_TEARDOWN, UNLOAD.
    bus.close_channel(ch.relid)
    await asyncio.wait_for(bus.teardown_gpadl(ch.relid, gpadl), 10.0)
    await asyncio.wait_for(bus.unload(), 10.0)
    bus.close()
    await asyncio.wait_for(asyncio.shield(bus.closed_future), 10.0)
    with contextlib.suppress(BufferError):  # a packet may still hold a view of guest memory
        memory.close()
    if errors:
        raise RuntimeError(errors[0])
    elapsed = t1 - t0
    rate = (c1 - c0) / elapsed
    events: dict[str, float] = {}
    if isinstance(ch, SharedChannel):  # signals that crossed the socket, per round trip (the rest were batched)
        done = max(completed, 1)
        events = {"events_in_per_rt": ch.events_in / done, "events_out_per_rt": ch.events_out / done}
    return {"round_trips": c1 - c0, "seconds": elapsed, "rtt_per_s": rate, "mb_per_s": rate * size / 1e6,
            "capped": completed >= MAX_ROUND_TRIPS, **events,
            **cpu,
            "packet": "inband" if size <= INBAND_MAX else "gpa_direct"}
