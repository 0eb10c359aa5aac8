"""One load process of the scale benchmark: brings up ``--count`` child partitions against one parent.

Each partition is a real ``child_partition.runner.ChildPartition`` (reconnect off): it connects over the
given URL, negotiates, and binds a VSC to every offer (ring GPADL, OPENCHANNEL, device handshake). At most
``--concurrency`` partitions are coming up at a time. Talks to the coordinator in JSON lines: it prints
``hello``, waits for ``go`` on stdin, prints ``ready`` with its counts and times once every partition is up
(or failed); on ``prime`` each partition resolves its ping neighbour (``primed``); then, for each
``active PERIOD T_START T_MEASURE T_END`` line, runs the light mix of
``bench.scale_activity`` on every partition and prints ``activity`` with its encoded histograms; on ``stop``
it shuts every partition down cleanly (CLOSECHANNEL, GPADL_TEARDOWN, UNLOAD) and prints ``done``. Times are
``time.monotonic()``, which is system-wide on Linux.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from typing import Any

import uvloop

from child_partition.runner import ChildPartition
from vmbus_proto.aio import logs
from vmbus_proto.devices.registry import ALL

from .parent import raise_nofile
from .scale_activity import prime, run_activity


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Slot:
    """One partition: its runner, its task and what happened to it."""

    def __init__(self, child: ChildPartition, stop: asyncio.Event) -> None:
        self.child = child
        self.task = asyncio.ensure_future(child.run(stop))
        self.error: str | None = None

    def channels_open(self) -> int:
        return sum(1 for v in self.child.vscs.values() if v.channel is not None and not v.channel.closed)


async def bring_up(slot: Slot, expect: int, timeout: float) -> None:
    ready = asyncio.ensure_future(slot.child.ready.wait())
    try:
        done, _ = await asyncio.wait([ready, slot.task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if slot.task in done:
        exc = slot.task.exception()
        slot.error = f"{slot.child.name}: runner ended early ({exc!r})" if exc else \
            f"{slot.child.name}: runner ended early with status {slot.task.result()}: {slot.child.failure}"
    elif not done:
        slot.error = f"{slot.child.name}: not ready within {timeout:g}s ({slot.channels_open()} channels open)"
    elif slot.channels_open() != expect:
        failed = sorted(slot.child.failed_devices.values())
        slot.error = f"{slot.child.name}: {slot.channels_open()} of {expect} channels open (failed: {failed})"


async def read_command(reader: asyncio.StreamReader, timeout: float) -> str:
    line = await asyncio.wait_for(reader.readline(), timeout)
    return line.decode().strip()


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("hello")
    if await read_command(reader, args.timeout) != "go":
        return
    stop = asyncio.Event()
    sem = asyncio.Semaphore(args.concurrency)
    slots: list[Slot] = []
    t_first = time.monotonic()

    async def one(i: int) -> None:
        async with sem:
            child = ChildPartition(args.url, f"{args.prefix}-{i:05d}", reconnect=False, memory=args.memory,
                                   video_splash=False)  # no boot screen: thousands of 3 MiB pictures
            slot = Slot(child, stop)
            slots.append(slot)
            await bring_up(slot, args.channels, args.timeout)

    await asyncio.gather(*(one(i) for i in range(args.count)))
    t_last = time.monotonic()
    errors = [s.error for s in slots if s.error]
    emit("ready", partitions=len(slots), ok=len(slots) - len(errors), channels=sum(s.channels_open() for s in slots),
         errors=errors[:20], error_count=len(errors), t_first=t_first, t_last=t_last)
    # Keep every partition connected until the coordinator has measured the parent; "active" phases on request.
    up = [s.child for s in slots if not s.error]
    # These partitions stand in for separate VMs: their (long-lived) state is kept out of the collector's full
    # passes, which otherwise stop all of this worker's partitions at once for up to half a second.
    gc.freeze()
    while True:
        try:
            command = (await read_command(reader, args.timeout)).split()
        except TimeoutError:
            break
        if command == ["prime"]:
            emit("primed", **await prime(up))
            continue
        if not command or command[0] != "active":
            break
        period, t_start, t_measure, t_end = (float(x) for x in command[1:5])
        result = await run_activity(up, args.api, period, t_start, t_measure, t_end, args.first)
        emit("activity", **result)
    t_stop = time.monotonic()
    stop.set()
    _, pending = await asyncio.wait([s.task for s in slots], timeout=args.timeout)
    for task in pending:
        task.cancel()
    bad = []
    for s in slots:
        if s.error:
            continue  # already counted when it failed to come up
        if s.task in pending:
            bad.append(f"{s.child.name}: shutdown did not finish within {args.timeout:g}s")
        elif s.task.cancelled():
            bad.append(f"{s.child.name}: shutdown cancelled")
        elif s.task.exception() is not None:
            bad.append(f"{s.child.name}: shutdown failed ({s.task.exception()!r})")
        elif s.task.result() != 0:
            bad.append(f"{s.child.name}: exit status {s.task.result()}")
    emit("done", teardown_s=time.monotonic() - t_stop, errors=bad[:20], error_count=len(bad))


def main() -> None:
    p = argparse.ArgumentParser(description="scale benchmark load process")
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--index", type=int, default=0, help="this worker's number")
    p.add_argument("--first", type=int, default=0, help="the global number of this worker's first partition")
    p.add_argument("--api", default="", help="the parent's web console, http://HOST:PORT (for input events)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--channels", type=int, default=len(ALL), help="channels each partition must open")
    p.add_argument("--memory", type=int, default=32 * 1024 * 1024,
                   help="guest memory per partition (bytes; the NetVSC shares 17 MiB of it as its buffers)")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on each phase (s)")
    args = p.parse_args()
    raise_nofile()
    logs.setup("warning")  # info lines from a thousand partitions would cost more than they tell
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
