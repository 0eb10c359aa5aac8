"""What a partition of the scale benchmark does once it is up: a light, steady mix over every device.

Each partition has one timer. Every ``period / 6`` seconds it does the next of six activities, so each comes
once per period, at a random phase per partition and starting with a different activity per partition (a thousand
partitions do not tick together, and a short window still sees every kind):

* ``storage_write`` / ``storage_read``: a 4 KiB WRITE, then a 4 KiB READ of the same block (StorVSC → StorVSP
  → the partition's disk image, a sparse file the parent creates);
* ``ping``: one ICMP echo to its neighbour partition through the NetVSC and the parent's switch (the first,
  with its ARP, falls in the warm-up);
* ``video``: 16x16 pixels drawn, DIRT sent, and a BIOS_INFO round trip so the parent has applied it;
* ``key`` / ``mouse``: the parent types (a set-1 make or break code) or moves the pointer through its web API,
  ``POST /api/partitions/NAME/input/key`` and ``/input/mouse``, as the web console does; the time runs until
  the event reaches the partition's input service.

The heartbeat the parent sends every 2 s runs on its own. Each activity's latency goes into the worker's HDR
histogram of that kind; activity due before the measured window is not recorded. An activity that fails or
takes longer than ``OP_TIMEOUT`` is an error of its kind. Ticks are open-loop (fixed times): when the worker
itself falls behind, how late a tick started is recorded as ``worker_lag``, so a saturated load generator
shows as such and not as the parent's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections import Counter
from typing import Any

import aiohttp

from child_partition.devices.input.service import InputService
from child_partition.devices.network.service import NetworkService
from child_partition.devices.network.stack import address_for_name
from child_partition.devices.storage.service import StorageService
from child_partition.devices.video.service import VideoService
from child_partition.runner import ChildPartition
from vmbus_proto.devices.input.keymap import KeyStroke
from vmbus_proto.devices.input.mouse import MouseReport

from .scale_stats import KINDS, LAG, Latencies

OP_TIMEOUT = 5.0
BLOCK = 4096
DISK_SPAN = 16 * 1024 * 1024  # the writes stay within the first 16 MiB of each disk
RECT = 16
KEY_A = 0x1E  # set-1 make code of A


class InputProbe:
    """Wraps a partition's input service: resolves a waiter when the next key or mouse report arrives."""

    def __init__(self, svc: InputService) -> None:
        self.key_waiter: asyncio.Future[None] | None = None
        self.report_waiter: asyncio.Future[None] | None = None
        key, report = svc.key, svc.report

        def on_key(stroke: KeyStroke) -> None:
            key(stroke)
            if self.key_waiter is not None and not self.key_waiter.done():
                self.key_waiter.set_result(None)

        def on_report(report_: MouseReport) -> None:
            report(report_)
            if self.report_waiter is not None and not self.report_waiter.done():
                self.report_waiter.set_result(None)

        svc.key = on_key  # type: ignore[method-assign]  # the VSCs call the sink's methods
        svc.report = on_report  # type: ignore[method-assign,assignment]


_PROBES: dict[str, InputProbe] = {}  # one per partition for the worker's life (phases must not wrap twice)


def probe_of(child: ChildPartition) -> InputProbe:
    probe = _PROBES.get(child.name)
    if probe is None:
        probe = _PROBES[child.name] = InputProbe(child.service(InputService))
    return probe


class Activity:
    """One partition's activities; ``neighbour`` is the partition it pings."""

    def __init__(self, child: ChildPartition, neighbour: str, api: str, http: aiohttp.ClientSession,
                 index: int) -> None:
        self.child = child
        self.neighbour = address_for_name(neighbour).ip
        self.url = f"{api}/api/partitions/{child.name}/input"
        self.http = http
        self.index = index
        self.probe = probe_of(child)

    def _offset(self, k: int) -> int:
        return ((self.index * 37 + k) * BLOCK) % DISK_SPAN

    async def storage_write(self, k: int) -> None:
        await self.child.service(StorageService).disk.write(self._offset(k), k.to_bytes(8, "little") * (BLOCK // 8))

    async def storage_read(self, k: int) -> None:
        await self.child.service(StorageService).disk.read(self._offset(k), BLOCK)

    async def ping(self, k: int) -> None:
        stack = self.child.service(NetworkService).stack
        if stack is None:
            raise RuntimeError("no network stack")
        reply = await stack.echo(self.neighbour, k & 0xFFFF, b"scale-bench", ident=self.index & 0xFFFF,
                                 timeout=OP_TIMEOUT)
        if reply is None:
            raise RuntimeError(f"no echo reply from {self.neighbour}")

    async def video(self, k: int) -> None:
        fb = self.child.service(VideoService).framebuffer
        if fb is None:
            raise RuntimeError("no framebuffer")
        x = (k * RECT) % (fb.width - RECT)
        y = (self.index * RECT) % (fb.height - RECT)
        view, pitch = fb.pixels, fb.pitch
        row = bytes([k & 0xFF, 0x80, 0x40, 0]) * RECT
        for line in range(y, y + RECT):
            view[line * pitch + x * 4:line * pitch + (x + RECT) * 4] = row
        fb.dirty([(x, y, x + RECT, y + RECT)])
        await fb.flush()
        await fb.sync()

    async def _post(self, what: str, body: dict[str, Any], waiter_attr: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        setattr(self.probe, waiter_attr, fut)
        try:
            async with self.http.post(f"{self.url}/{what}", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{what}: HTTP {resp.status} {(await resp.text())[:200]}")
            await fut
        finally:
            setattr(self.probe, waiter_attr, None)

    async def key(self, k: int) -> None:
        await self._post("key", {"make_code": KEY_A, "release": bool(k % 2)}, "key_waiter")

    async def mouse(self, k: int) -> None:
        await self._post("mouse", {"x": (k * 7) % 1024, "y": (self.index * 3) % 768, "width": 1024, "height": 768},
                         "report_waiter")


class GcPauses:
    """The worker's own garbage-collector pauses while active (each one stops every partition of the worker)."""

    def __init__(self) -> None:
        self.max_ms = self.total_ms = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._t) * 1000
            self.total_ms += ms
            self.max_ms = max(self.max_ms, ms)


class Results:
    def __init__(self) -> None:
        self.latencies = Latencies()
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < 20:
            self.samples.append(f"{kind}: {text}")


async def run_partition(act: Activity, period: float, t_start: float, t_measure: float, t_end: float,
                        res: Results) -> None:
    """Open-loop ticks from ``t_start`` to ``t_end`` (monotonic); recorded from ``t_measure`` on."""
    step = period / len(KINDS)
    phase = random.random() * step
    first = act.index % len(KINDS)  # partitions start at different kinds: a short window still sees every kind
    n = 0
    while True:
        due = t_start + phase + n * step
        if due >= t_end:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = KINDS[(first + n) % len(KINDS)]
        k = (first + n) // len(KINDS)
        n += 1
        record = due >= t_measure
        started = time.perf_counter()
        if record:
            res.latencies.record(LAG, int((time.monotonic() - due) * 1e6))
        try:
            await asyncio.wait_for(getattr(act, kind)(k), OP_TIMEOUT)
        except Exception as exc:  # every failure of an activity is counted as an error of its kind
            if record:
                res.error(kind, f"{act.child.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        if record:
            res.latencies.record(kind, int((time.perf_counter() - started) * 1e6))
            res.done[kind] += 1


async def prime(children: list[ChildPartition], concurrency: int = 16) -> dict[str, Any]:
    """Each partition learns its neighbour's MAC (ARP through the switch, a broadcast to every port) before a
    phase, a few at a time: the first pings would otherwise flood the switch all at once and carry ARP's
    one-second retransmits into the measured window. Returns the time taken and the failures."""
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []
    t0 = time.monotonic()

    async def one(i: int, child: ChildPartition) -> None:
        neighbour = address_for_name(children[(i + 1) % len(children)].name).ip
        async with sem:
            stack = child.service(NetworkService).stack
            try:
                if stack is None:
                    raise RuntimeError("no network stack")
                if await stack.resolve(neighbour, OP_TIMEOUT) is None:
                    raise RuntimeError("no ARP answer")
            except Exception as exc:  # a failure here shows again as the ping's errors; kept for the record
                failures.append(f"{child.name}: ARP {neighbour}: {type(exc).__name__}: {exc}"[:300])

    await asyncio.gather(*(one(i, c) for i, c in enumerate(children)))
    return {"seconds": time.monotonic() - t0, "failures": len(failures), "failure_samples": failures[:5]}


async def run_activity(children: list[ChildPartition], api: str, period: float, t_start: float, t_measure: float,
                       t_end: float, first_index: int) -> dict[str, Any]:
    """Every partition active from ``t_start`` to ``t_end``; the measured counts, errors and histograms."""
    res = Results()
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=OP_TIMEOUT)) as http:
        acts = [Activity(c, children[(i + 1) % len(children)].name, api, http, first_index + i)
                for i, c in enumerate(children)]
        gc.freeze()  # as after the bring-up (bench.scale_worker): only the phase's own garbage is collected
        tasks = [asyncio.ensure_future(run_partition(a, period, t_start, t_measure, t_end, res)) for a in acts]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            gc.callbacks.remove(pauses)
    return {"gc": {"max_ms": round(pauses.max_ms, 2), "total_ms": round(pauses.total_ms, 1)},
            "histograms": res.latencies.encode(), "done": dict(res.done), "errors": dict(res.errors),
            "error_samples": res.samples, "cpu_s": time.process_time() - cpu0}
