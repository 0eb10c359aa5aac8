"""``child-partition load storage``: a load generator that drives real StorVSC channels like fio drives a disk.

Each partition is a real guest on its own VMBus connection: it negotiates, binds only the StorVSC (the
other offers are left unopened, as a guest without those drivers would), and then ``iodepth`` workers keep
requests in flight through the same block-device path that NBD uses: READ(10)/WRITE(10) EXECUTE_SRBs
with the data in guest pages. Results are reported the way fio reports them (IOPS, bandwidth, completion
latency percentiles from an HDR histogram), and as JSON with ``--json``. SIGINT (Ctrl-C) or SIGTERM ends the
run early, as fio's does: no new requests, the ones in flight finish (bounded), the results so far are reported
and the status is 130 or 143 (``interrupt.py``, shared with ``load network``).

The parent creates a sparse image for each new partition name (``<data_dir>/<name>/lun0.img``), and every run
uses fresh names, so the tool cleans up after itself unless ``--keep-disks``: before unloading, each guest
discards its whole disk (SCSI WRITE SAME/UNMAP, as ``blkdiscard`` would), which hands the space back to the
host; with ``--data-dir`` (the parent's, on this host) it also deletes the emptied images and their
directories, which nothing in VMBus can ask the parent to do.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.devices.storage import vstor

from ..bus import GuestBus
from ..devices.storage.vsc import ScsiLun, StorageVsc
from ..guest_memory import GuestMemory
from ..interrupt import Interrupt
from ..runner import open_bus

PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)
MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")
MAX_LATENCY_US = 60_000_000
DRAIN_TIMEOUT = 30.0  # seconds the requests in flight get to finish after an interrupt


def parse_size(text: str) -> int:
    """'4k', '1M', '1MiB', '512' -> bytes (binary units, as fio)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


@dataclass(slots=True)
class Job:
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    runtime: float = 10.0
    partitions: int = 1
    size: int = 0  # bytes of the disk to use; 0 = all of it
    rwmixread: int = 50
    ramp: float = 0.5
    max_ios: int = 100_000_000  # a count bound on top of the time bound
    keep_disks: bool = False
    data_dir: str | None = None  # the parent's data directory, to delete the images from


@dataclass(slots=True)
class Direction:
    # Completion latencies in whole microseconds, counted per value while the job runs (a dict increment
    # per I/O instead of an HDR record) and put into an HDR histogram at the end.
    latencies: collections.Counter[int] = field(default_factory=collections.Counter)
    ios: int = 0
    bytes: int = 0
    errors: int = 0

    def merge(self, other: Direction) -> None:
        self.latencies.update(other.latencies)
        self.ios += other.ios
        self.bytes += other.bytes
        self.errors += other.errors

    def histogram(self) -> HdrHistogram:
        hist = HdrHistogram(1, MAX_LATENCY_US, 3)
        for usec, count in self.latencies.items():
            hist.record_value(min(usec, MAX_LATENCY_US), count)
        return hist


@dataclass(slots=True)
class Totals:
    read: Direction = field(default_factory=Direction)
    write: Direction = field(default_factory=Direction)
    seconds: float = 0.0
    partitions_ok: int = 0
    errors: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)  # what happened to the partitions' disks


class Partition:
    """One load-generating guest."""

    def __init__(self, url: str, name: str, job: Job, log: Any) -> None:
        self.url, self.name, self.job, self.log = url, name, job, log
        self.memory = GuestMemory(256 * 1024 * 1024)
        self.bus: GuestBus | None = None
        self.vsc: StorageVsc | None = None
        self.read = Direction()
        self.write = Direction()
        self.live_ios = 0

    async def start(self) -> None:
        self.bus = await asyncio.wait_for(open_bus(self.url, self.name, log=self.log, memory=self.memory), 30)
        offers: dict[int, m.OfferChannel] = await asyncio.wait_for(self.bus.negotiate(), 30)
        offer = next((o for o in offers.values() if o.if_type == vstor.SPEC.class_id), None)
        if offer is None:
            raise RuntimeError("the parent offers no storage controller")
        self.vsc = StorageVsc(self.bus, self.memory, offer, self.log)
        await self.vsc.attach()
        if 0 not in self.vsc.disks:
            raise RuntimeError("the storage controller has no disk at LUN 0")

    @property
    def disk(self) -> ScsiLun:
        assert self.vsc is not None
        return self.vsc.disks[0]

    async def run(self, deadline: float, measure_from: float, stop: asyncio.Event) -> None:
        job, vsc = self.job, self.disk
        span = min(job.size or vsc.size, vsc.size)
        blocks = max(1, span // job.bs)
        payload = os.urandom(job.bs)
        rnd = random.Random(hash(self.name))
        sequential = job.rw in ("read", "write", "rw")
        mixed = job.rw in ("randrw", "rw")
        all_reads = job.rw in ("read", "randread")
        read_share = job.rwmixread / 100
        bs = job.bs
        cursor = [0]
        budget = [job.max_ios]

        async def worker() -> None:
            clock, random_fraction, read, write = time.monotonic, rnd.random, vsc.read, vsc.write
            while budget[0] > 0:
                t0 = clock()
                if t0 >= deadline or stop.is_set():
                    return
                budget[0] -= 1
                if sequential:
                    offset = (cursor[0] % blocks) * bs
                    cursor[0] += 1
                else:
                    offset = int(random_fraction() * blocks) * bs
                is_read = random_fraction() < read_share if mixed else all_reads
                if is_read:
                    await read(offset, bs)
                else:
                    await write(offset, payload)
                t1 = clock()
                self.live_ios += 1
                if t0 >= measure_from:
                    d = self.read if is_read else self.write
                    d.latencies[int((t1 - t0) * 1e6) or 1] += 1
                    d.ios += 1
                    d.bytes += bs

        await asyncio.gather(*(worker() for _ in range(job.iodepth)))

    async def discard_disks(self) -> str:
        """Hand every writable disk's space back to the host (a whole-disk discard); what was done."""
        assert self.vsc is not None
        done = []
        for lun, disk in self.vsc.disks.items():
            if disk.supports_discard:
                await disk.discard(0, disk.size)
                done.append(f"LUN {lun} discarded")
        return ", ".join(done) or "nothing to discard"

    async def stop(self) -> None:
        if self.vsc is not None:
            await self.vsc.detach()
        if self.bus is not None and not self.bus.closing:
            await asyncio.wait_for(self.bus.unload(), 30)
            self.bus.close()
        self.memory.close()


async def run_storage(url: str, job: Job, console: Console, live: bool, stop: asyncio.Event | None = None) -> Totals:
    """Bring the partitions up, keep their requests in flight until the runtime is over or ``stop`` is set
    (then the requests in flight finish, bounded by DRAIN_TIMEOUT), clean up and unload."""
    stop = stop or asyncio.Event()
    log = logs.get(component="load")
    parts = [Partition(url, f"load-{os.getpid()}-{i}", job, log.bind(partition=f"load-{i}"))
             for i in range(job.partitions)]
    totals = Totals()
    started = await asyncio.gather(*(p.start() for p in parts), return_exceptions=True)
    ready = []
    for p, res in zip(parts, started, strict=True):
        if isinstance(res, BaseException):
            totals.errors.append(f"{p.name}: {type(res).__name__}: {res}")
        else:
            ready.append(p)
    if not ready:
        return totals
    t_start = time.monotonic()
    measure_from = t_start + job.ramp
    deadline = measure_from + job.runtime
    runs = asyncio.gather(*(p.run(deadline, measure_from, stop) for p in ready), return_exceptions=True)
    await _progress(runs, stop, ready, job, console, live, t_start, deadline)
    ended = min(time.monotonic(), deadline)
    await asyncio.wait([runs], timeout=DRAIN_TIMEOUT)  # interrupted: the requests in flight finish
    if not runs.done():
        runs.cancel()
        totals.errors.append(f"requests still in flight {DRAIN_TIMEOUT:g}s after the interrupt; abandoned")
    outcomes = [] if runs.cancelled() else runs.result()
    for p, res in zip(ready, outcomes or [None] * len(ready), strict=True):
        if isinstance(res, BaseException):
            totals.errors.append(f"{p.name}: {type(res).__name__}: {res}")
        elif outcomes:
            totals.partitions_ok += 1
        totals.read.merge(p.read)
        totals.write.merge(p.write)
    totals.seconds = max(1e-9, ended - measure_from)
    if not job.keep_disks:
        discarded = await asyncio.gather(*(p.discard_disks() for p in ready), return_exceptions=True)
        for p, outcome in zip(ready, discarded, strict=True):
            text = outcome if isinstance(outcome, str) else f"discard failed: {outcome}"
            totals.cleanup.append(f"{p.name}: {text}")
    await asyncio.gather(*(p.stop() for p in ready), return_exceptions=True)
    if not job.keep_disks and job.data_dir is not None:
        totals.cleanup.extend(remove_images(Path(job.data_dir), [p.name for p in parts]))
    return totals


def remove_images(data_dir: Path, names: list[str]) -> list[str]:
    """Delete the images the parent created for these partitions (``<data_dir>/<name>/lun<N>.img``) and the
    directories they leave empty; the names are the tool's own (``load-<pid>-<i>``), so nothing else is hit."""
    done = []
    for name in names:
        directory = data_dir / name
        images = sorted(directory.glob("lun*.img"))
        for image in images:
            image.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError as exc:
            if directory.exists():
                done.append(f"{name}: removed {len(images)} image(s), kept {directory}: {exc.strerror}")
                continue
        done.append(f"{name}: removed {len(images)} image(s) from {directory}")
    return done


async def _progress(runs: asyncio.Future[Any], stop: asyncio.Event, parts: list[Partition], job: Job,
                    console: Console, live: bool, t_start: float, deadline: float) -> None:
    """Show progress until the runs end or ``stop`` is set."""
    last_ios, last_t = 0, time.monotonic()

    def table() -> Table:
        nonlocal last_ios, last_t
        now = time.monotonic()
        ios = sum(p.live_ios for p in parts)
        rate = (ios - last_ios) / max(1e-9, now - last_t)
        last_ios, last_t = ios, now
        t = Table(show_header=True, header_style="bold")
        for col in ("elapsed", "remaining", "IOPS", "MiB/s", "partitions"):
            t.add_column(col, justify="right")
        t.add_row(f"{now - t_start:5.1f}s", f"{max(0.0, deadline - now):5.1f}s", f"{rate:,.0f}",
                  f"{rate * job.bs / (1 << 20):,.1f}", str(len(parts)))
        return t

    stopped = asyncio.ensure_future(stop.wait())
    try:
        if live:
            with Live(table(), console=console, refresh_per_second=4, transient=True) as view:
                while not runs.done() and not stop.is_set():
                    await asyncio.wait([runs, stopped], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    view.update(table())
        else:
            await asyncio.wait([runs, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()


def _dir_json(d: Direction, seconds: float, bs: int) -> dict[str, Any]:
    h = d.histogram()
    return {
        "io_bytes": d.bytes, "ios": d.ios, "iops": d.ios / seconds, "bw_bytes": d.bytes / seconds,
        "clat_us": {"min": h.get_min_value() if d.ios else 0, "max": h.get_max_value() if d.ios else 0,
                    "mean": h.get_mean_value() if d.ios else 0.0, "stddev": h.get_stddev() if d.ios else 0.0,
                    "percentiles": {f"{p:g}": h.get_value_at_percentile(p) if d.ios else 0 for p in PERCENTILES}},
    }


def results_json(url: str, job: Job, t: Totals) -> dict[str, Any]:
    return {"job": {"rw": job.rw, "bs": job.bs, "iodepth": job.iodepth, "runtime": job.runtime,
                    "partitions": job.partitions, "rwmixread": job.rwmixread, "size": job.size, "connect": url},
            "seconds": t.seconds, "partitions_ok": t.partitions_ok, "errors": t.errors, "disks": t.cleanup,
            "read": _dir_json(t.read, t.seconds, job.bs), "write": _dir_json(t.write, t.seconds, job.bs)}


def _human_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / (1 << 20):.1f}MiB/s ({bytes_per_s / 1e6:.1f}MB/s)"


def render(url: str, job: Job, t: Totals, console: Console) -> None:
    console.print(f"storage: (g=0): rw={job.rw}, bs={job.bs}, iodepth={job.iodepth}, "
                  f"partitions={job.partitions}, connect={url}")
    for name, d in (("read", t.read), ("write", t.write)):
        if not d.ios:
            continue
        h = d.histogram()
        iops = d.ios / t.seconds
        console.print(f"  {name}: IOPS={iops / 1000:.1f}k, BW={_human_rate(d.bytes / t.seconds)}"
                      f"({d.bytes / (1 << 20):.0f}MiB/{t.seconds * 1000:.0f}msec)")
        console.print(f"    clat (usec): min={h.get_min_value()}, max={h.get_max_value()}, "
                      f"avg={h.get_mean_value():.2f}, stdev={h.get_stddev():.2f}")
        console.print("    clat percentiles (usec):")
        cells = [f"{p:5.2f}th=[{h.get_value_at_percentile(p):6d}]" for p in PERCENTILES]
        for i in range(0, len(cells), 4):
            console.print("     | " + ", ".join(cells[i:i + 4]) + ("," if i + 4 < len(cells) else ""))
    console.print(f"  partitions: {t.partitions_ok} ok, {len(t.errors)} failed")
    for line in t.cleanup:
        console.print(f"  disks: {line}")
    for err in t.errors[:10]:
        console.print(f"  [red]error[/]: {err}")


def main(args: Any) -> int:
    import uvloop  # noqa: PLC0415 - the load tool's loop

    job = Job(rw=args.rw, bs=parse_size(args.bs), iodepth=args.iodepth, runtime=args.runtime,
              partitions=args.partitions, size=parse_size(args.size) if args.size else 0,
              rwmixread=args.rwmixread, ramp=args.ramp, keep_disks=args.keep_disks, data_dir=args.data_dir)
    if job.bs <= 0 or job.bs % 512:
        print("child-partition load: --bs must be a positive multiple of 512", file=sys.stderr)
        return 2
    console = Console(stderr=False, highlight=False)
    logs.setup("warning")
    interrupt = Interrupt()

    async def interruptible() -> Totals:
        return await run_storage(args.connect, job, console, console.is_terminal, interrupt.install().event)

    totals = uvloop.run(interruptible())
    interrupt.announce("child-partition load storage")
    render(args.connect, job, totals, console)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results_json(args.connect, job, totals), fh, indent=1)
    return interrupt.status(0 if not totals.errors and totals.partitions_ok == job.partitions else 1)
