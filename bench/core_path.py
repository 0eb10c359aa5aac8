"""The VMBus core's Python cost per round trip, without processes or sockets: the bench's echo device and
guest (``bench.vmbus_echo``) on both ends of one channel of an in-memory ``MemoryLink``
(``vmbus_proto.aio.pair``), so everything a packet costs in the shared core runs (``Channel``,
``ChannelRings``, envelope and frame encoding, ``FrameDecoder``, ``FramedConnection`` dispatch and batched
flush) and nothing else does.

Two shapes, as the echo benchmark runs them: ``1k``, an in-band request whose completion echoes 1 KiB, 64 in
flight; ``64k``, a GPA-direct request (16 pages) whose data rides with it and comes back with the
completion, 16 in flight. Reported: CPU microseconds (thread time) per round trip for both ends together,
median (and minimum) of ``--repeat`` runs. ``--profile`` prints the top cProfile entries of one more run.
``python -m bench.core_path`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import time
from typing import Any

import uvloop

from vmbus_proto.aio.pair import MemoryLink
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType
from vmbus_proto.shm_ring import GuestPages

SHAPES = {"1k": (1024, 64), "64k": (65536, 16)}
RING_PAGES = 2 * (260 * 1024 // 4096)  # the echo device's ring: 260 KiB each way


async def _echo(ch: Any) -> None:
    """``parent_partition.devices.echo.EchoVsp.serve``, without the daemon around it."""
    comp = int(PacketType.COMP)
    while True:
        pkt: Packet | None = await ch.recv()
        while pkt is not None:
            if pkt.flags & FLAG_COMPLETION_REQUESTED:
                out = Packet(comp, 0, pkt.trans_id, pkt.payload, data=pkt.data)
                if not ch.try_send(out):
                    await ch.send(out)
            pkt = ch.recv_nowait()


async def run(shape: str, round_trips: int, mode: str = "stream") -> float:
    """CPU µs per round trip (both ends) for ``round_trips`` round trips of ``shape``; ``mode`` "shared": the
    rings and the data in guest memory both ends share (docs/protocol.md §14)."""
    size, window = SHAPES[shape]
    memory = memoryview(bytearray((RING_PAGES + 32) * 4096)) if mode == "shared" else None
    link = MemoryLink(pages=GuestPages(memory, 0) if memory is not None else None)
    pair = link.open(1, pages=RING_PAGES, pfns=tuple(range(RING_PAGES)))
    server = asyncio.ensure_future(_echo(pair.host))
    left = round_trips
    ranges: tuple[GpaRange, ...]
    if size <= 1024:
        payload, ranges, data = bytes(size), (), b""
    else:
        first = RING_PAGES + 8  # the data's pages, after the rings
        payload, ranges, data = bytes(8), (GpaRange(size, 0, tuple(range(first, first + 16))),), bytes(size)

    async def worker() -> None:
        nonlocal left
        request = pair.guest.request
        while left > 0:
            left -= 1
            await request(payload, ranges, data)

    for _ in range(2):  # warm up
        await asyncio.gather(*(request_once(pair.guest, payload, ranges, data) for _ in range(window)))
    t0 = time.thread_time()
    await asyncio.gather(*(worker() for _ in range(window)))
    cpu = time.thread_time() - t0
    server.cancel()
    link.close()
    return cpu / round_trips * 1e6


async def request_once(ch: Any, payload: bytes, ranges: tuple[GpaRange, ...], data: bytes) -> None:
    await ch.request(payload, ranges, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--round-trips", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", choices=sorted(SHAPES), action="append")
    p.add_argument("--profile", action="store_true", help="print cProfile's top entries of one more run")
    p.add_argument("--mode", choices=["stream", "shared"], action="append",
                   help="memory mode(s) to run (default: both, side by side)")
    args = p.parse_args()
    out: dict[str, Any] = {}
    for shape in args.only or sorted(SHAPES):
        for mode in args.mode or ["stream", "shared"]:
            runs = [uvloop.run(run(shape, args.round_trips, mode)) for _ in range(args.repeat)]
            out[f"{shape} {mode}"] = {"us_per_rt": round(statistics.median(runs), 2), "min": round(min(runs), 2),
                                      "runs": [round(r, 2) for r in runs]}
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                uvloop.run(run(shape, args.round_trips, mode))
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                print(text.getvalue())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
