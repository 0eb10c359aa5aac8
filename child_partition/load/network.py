"""``child-partition load network``: a traffic generator between guests on the parent's virtual switch, in the
manner of pktgen and iperf3's UDP mode.

Each partition is a real guest on its own VMBus connection: it negotiates, binds only the NetVSC (the other
offers are left unopened, as a guest without those drivers would, so the parent creates no disks for it) and
waits for carrier. Then every partition sends Ethernet frames to its peers (``--flows``: a ring, pairs, or
all to all) through the parent's switch, at a fixed rate or as fast as its NIC takes them, and counts what
it receives. The frames carry a private EtherType (0x88B5, IEEE 802 local experimental) and, in their
payload, the sender's and receiver's index, a per-flow sequence number and the send time; all partitions
share this process's monotonic clock, so the receiver measures one-way latency exactly.

Frames sent during ``--ramp`` are not counted. After the sending stops the receivers get a short drain;
what was sent in the measured window and did not arrive is lost (dropped by the switch's port queues, the
parent's receive buffers or a NIC's receive queue; the NICs' own counters are reported too). Everything
is bounded in time and in frames, and every partition leaves with RNDIS HALT, CLOSECHANNEL and UNLOAD.
SIGINT or SIGTERM ends the run early with the results so far and status 130 or 143 (``interrupt.py``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.devices.network import nvsp

from ..bus import GuestBus
from ..devices import vsc_classes
from ..devices.network.nic import ETH_HEADER, Nic
from ..guest_memory import GuestMemory
from ..interrupt import Interrupt
from ..runner import open_bus
from ..vsc import Vsc
from .storage import PERCENTILES, Direction

ETHERTYPE = 0x88B5  # IEEE Std 802 "local experimental EtherType 1"
MAGIC = b"VMBL"
# After the Ethernet header: magic, sender index, receiver index, sequence number, send time (ns, monotonic).
ROUTE = struct.Struct("!4sHH")
STAMP = struct.Struct("!QQ")
HEADER_BYTES = ETH_HEADER + ROUTE.size + STAMP.size
MIN_FRAME, MAX_FRAME = 64, 1514  # without the FCS, as the NIC takes them
FLOWS = ("ring", "pairs", "all-to-all")
BURST = 32  # frames handed to the NIC before the sender yields to the loop
DRAIN = 1.0  # seconds the receivers get after the senders stop
LOST_AFTER = 0.2  # seconds a full window waits for its frames before counting them as gone
MAX_FRAMES = 1_000_000_000  # per partition: a count bound on top of the time bound
GUEST_MEMORY = 64 * 1024 * 1024  # ring + 16 MiB receive buffer + 1 MiB send buffer fit with room


def peers(flows: str, n: int) -> list[list[int]]:
    """Who each of ``n`` partitions sends to."""
    if n < 2:
        raise ValueError("network load needs at least 2 partitions")
    if flows == "ring":
        return [[(i + 1) % n] for i in range(n)]
    if flows == "pairs":
        if n % 2:
            raise ValueError(f"--flows pairs needs an even number of partitions, not {n}")
        return [[i ^ 1] for i in range(n)]
    if flows == "all-to-all":
        return [[j for j in range(n) if j != i] for i in range(n)]
    raise ValueError(f"unknown --flows {flows!r}: one of {', '.join(FLOWS)}")


class FrameTemplate:
    """Frames of one flow (sender ``src`` to receiver ``dst``), ``size`` bytes each."""

    def __init__(self, dst_mac: bytes, src_mac: bytes, src: int, dst: int, size: int) -> None:
        if not MIN_FRAME <= size <= MAX_FRAME:
            raise ValueError(f"frame size {size} is outside {MIN_FRAME}-{MAX_FRAME}")
        self.dst = dst
        self.prefix = dst_mac + src_mac + ETHERTYPE.to_bytes(2, "big") + ROUTE.pack(MAGIC, src, dst)
        self.pad = bytes(size - HEADER_BYTES)

    def frame(self, seq: int, sent_ns: int) -> bytes:
        return self.prefix + STAMP.pack(seq, sent_ns) + self.pad


def parse_frame(frame: bytes) -> tuple[int, int, int, int] | None:
    """(sender, receiver, sequence, send time in ns) of one of our frames; None for anything else."""
    if len(frame) < HEADER_BYTES or frame[12:14] != b"\x88\xb5" or frame[14:18] != MAGIC:
        return None
    _, src, dst = ROUTE.unpack_from(frame, ETH_HEADER)
    seq, sent_ns = STAMP.unpack_from(frame, ETH_HEADER + ROUTE.size)
    return src, dst, seq, sent_ns


class Window:
    """``--window``: at most ``size`` frames of each sender on their way (sent, not yet received). The
    receivers are in this process, so they tell the senders directly; frames that never arrive (dropped
    on the way) are written off after ``LOST_AFTER`` seconds so the window cannot stall."""

    def __init__(self, partitions: int, size: int) -> None:
        self.size = size
        self.delivered = [0] * partitions
        self.written_off = [0] * partitions
        self.events = [asyncio.Event() for _ in range(partitions)]
        self.stopped = False

    def stop(self) -> None:
        """The run is over: no sender waits any more."""
        self.stopped = True
        for event in self.events:
            event.set()

    def arrived(self, src: int) -> None:
        self.delivered[src] += 1
        self.events[src].set()

    async def room(self, src: int, sent: int, deadline: float) -> None:
        """Wait until sender ``src`` (``sent`` frames so far) may send one more, or the deadline passes."""
        event = self.events[src]
        while not self.stopped and sent - self.delivered[src] - self.written_off[src] >= self.size:
            wait = min(LOST_AFTER, deadline - time.monotonic())
            if wait <= 0:
                return
            event.clear()
            fired: list[bool] = []
            # A timer rather than asyncio.wait_for, which on 3.11 can swallow a cancellation.
            timer = asyncio.get_running_loop().call_later(wait, _expire, fired, event)
            try:
                await event.wait()
            finally:
                timer.cancel()
            if fired:
                self.written_off[src] = sent - self.delivered[src]


def _expire(fired: list[bool], event: asyncio.Event) -> None:
    fired.append(True)
    event.set()


@dataclass(slots=True)
class Received:
    """One partition's receive side: measured frames, their one-way latencies, order, and strays."""

    index: int
    measure_from_ns: int = 0
    rx: Direction = field(default_factory=Direction)  # ios = frames, bytes, latencies in µs
    live: int = 0  # every frame of ours, ramp included (for the progress line)
    reordered: int = 0  # a sequence number below one already seen from that sender
    misdelivered: int = 0  # ours, but addressed to another partition (flooded before the switch learned)
    foreign: int = 0  # not a frame of this tool (another guest's ARP, say)
    last_seq: dict[int, int] = field(default_factory=dict)
    window: Window | None = None

    def account(self, frame: bytes, now_ns: int) -> None:
        parsed = parse_frame(frame)
        if parsed is None:
            self.foreign += 1
            return
        src, dst, seq, sent_ns = parsed
        if dst != self.index:
            self.misdelivered += 1
            return
        self.live += 1
        if self.window is not None:
            self.window.arrived(src)
        last = self.last_seq.get(src, -1)
        if seq < last:
            self.reordered += 1
        else:
            self.last_seq[src] = seq
        if sent_ns >= self.measure_from_ns:
            rx = self.rx
            rx.ios += 1
            rx.bytes += len(frame)
            rx.latencies[max(1, (now_ns - sent_ns) // 1000)] += 1


@dataclass(slots=True)
class NetJob:
    partitions: int = 2
    frame_size: int = 64
    rate: float = 0.0  # frames/s per partition; 0 = as fast as the NIC takes them
    window: int = 0  # frames of each partition on their way at most; 0 = no limit
    flows: str = "ring"
    runtime: float = 10.0
    ramp: float = 0.5
    max_frames: int = MAX_FRAMES


class NetPartition:
    """One traffic-generating guest: a VMBus connection with only its NetVSC bound."""

    def __init__(self, url: str, name: str, index: int, log: Any) -> None:
        self.url, self.name, self.index, self.log = url, name, index, log
        self.memory = GuestMemory(GUEST_MEMORY)
        self.bus: GuestBus | None = None
        self.vsc: Vsc | None = None
        self.nic: Nic | None = None
        self.received = Received(index)
        self.sent = 0  # frames sent in the measured window
        self.sent_per_flow: list[int] = []
        self.sent_bytes = 0
        self.live_sent = 0
        self.send_error: str | None = None
        self.stopping = False  # the run was cut short: the sender returns at its next frame

    async def start(self) -> None:
        self.bus = await asyncio.wait_for(open_bus(self.url, self.name, log=self.log, memory=self.memory), 30)
        offers: dict[int, m.OfferChannel] = await asyncio.wait_for(self.bus.negotiate(), 30)
        offer = next((o for o in offers.values() if o.if_type == nvsp.SPEC.class_id and o.sub_channel_index == 0),
                     None)
        if offer is None:
            raise RuntimeError("the parent offers no network adapter")
        self.vsc = vsc_classes()[nvsp.SPEC.class_id](self.bus, self.memory, offer, self.log)
        await self.vsc.attach()
        nic = getattr(self.vsc, "nic", None)
        if not isinstance(nic, Nic):
            raise RuntimeError("the NetVSC came up without a NIC")
        self.nic = nic
        await asyncio.wait_for(nic.wait_link(), 30)

    async def send(self, flows: list[FrameTemplate], job: NetJob, deadline: float, measure_from: float,
                   window: Window | None = None) -> None:
        """Round-robin over this partition's flows until the deadline or ``job.max_frames``."""
        nic = self.nic
        assert nic is not None
        clock, clock_ns, send_nowait = time.monotonic, time.monotonic_ns, nic.send_nowait
        measure_from_ns = int(measure_from * 1e9)
        seqs = [0] * len(flows)
        self.sent_per_flow = per_flow = [0] * len(flows)
        nflows, size, budget = len(flows), job.frame_size, job.max_frames
        start = clock()
        k = 0
        while budget > 0:
            now = clock()
            if now >= deadline or self.stopping:
                return
            if job.rate > 0:
                due = min(BURST, int((now - start) * job.rate) - self.live_sent, budget)
                if due <= 0:
                    await asyncio.sleep(min(0.01, max(0.0005, 1 / job.rate)))
                    continue
            else:
                due = min(BURST, budget)
            for _ in range(due):
                f = k % nflows
                k += 1
                if window is not None:
                    await window.room(self.index, self.live_sent, deadline)
                    if window.stopped:
                        return
                ns = clock_ns()
                frame = flows[f].frame(seqs[f], ns)
                seqs[f] += 1
                if not send_nowait(frame):
                    await nic.send(frame)  # the ring is full: wait for room, as a qdisc would
                budget -= 1
                self.live_sent += 1
                if ns >= measure_from_ns:
                    self.sent += 1
                    per_flow[f] += 1
                    self.sent_bytes += size
            await asyncio.sleep(0)  # let the receivers and the NetVSC's flusher run

    async def receive(self) -> None:
        """Account every frame until cancelled (the run's end) or the NIC closes."""
        nic = self.nic
        assert nic is not None
        account, clock_ns = self.received.account, time.monotonic_ns
        while not nic.closed:
            batch = await nic.recv_batch(256)
            now = clock_ns()
            for frame in batch:
                account(frame, now)

    async def stop(self) -> None:
        if self.vsc is not None:
            await self.vsc.detach()
        if self.bus is not None and not self.bus.closing:
            await asyncio.wait_for(self.bus.unload(), 30)
            self.bus.close()
        self.memory.close()


@dataclass(slots=True)
class NetTotals:
    seconds: float = 0.0
    sent: int = 0
    sent_bytes: int = 0
    rx: Direction = field(default_factory=Direction)
    reordered: int = 0
    misdelivered: int = 0
    foreign: int = 0
    nic: collections.Counter[str] = field(default_factory=collections.Counter)
    partitions_ok: int = 0
    errors: list[str] = field(default_factory=list)
    per_partition: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.rx.ios)


def _flows_of(parts: list[NetPartition], job: NetJob) -> list[list[FrameTemplate]]:
    macs = [p.nic.mac if p.nic else bytes(6) for p in parts]
    return [[FrameTemplate(macs[d], macs[i], i, d, job.frame_size) for d in dests]
            for i, dests in enumerate(peers(job.flows, len(parts)))]


async def run_network(url: str, job: NetJob, console: Console, live: bool,
                      stop: asyncio.Event | None = None) -> NetTotals:
    """Bring the partitions up, run the traffic until the runtime is over or ``stop`` is set (SIGINT: the
    results so far are reported, as iperf3 does), and unload them all."""
    log = logs.get(component="load")
    parts = [NetPartition(url, f"netload-{os.getpid()}-{i}", i, log.bind(partition=f"netload-{i}"))
             for i in range(job.partitions)]
    totals = NetTotals()
    started = await asyncio.gather(*(p.start() for p in parts), return_exceptions=True)
    for p, res in zip(parts, started, strict=True):
        if isinstance(res, BaseException):
            totals.errors.append(f"{p.name}: {type(res).__name__}: {res}")
    try:
        if not totals.errors:  # the flows join every partition: all of them must be up
            await _traffic(parts, job, console, live, totals, stop or asyncio.Event())
    finally:
        await asyncio.gather(*(p.stop() for p in parts), return_exceptions=True)
    return totals


async def _traffic(parts: list[NetPartition], job: NetJob, console: Console, live: bool, totals: NetTotals,
                   stop: asyncio.Event) -> None:
    flows = _flows_of(parts, job)
    t_start = time.monotonic()
    measure_from = t_start + job.ramp
    deadline = measure_from + job.runtime
    window = Window(len(parts), job.window) if job.window else None
    for p in parts:
        p.received.measure_from_ns = int(measure_from * 1e9)
        p.received.window = window
    loop = asyncio.get_running_loop()
    receivers = [loop.create_task(p.receive()) for p in parts]
    send_tasks = [loop.create_task(p.send(f, job, deadline, measure_from, window))
                  for p, f in zip(parts, flows, strict=True)]
    senders = asyncio.gather(*send_tasks, return_exceptions=True)
    stopped = loop.create_task(stop.wait())
    try:
        await _progress(senders, [*receivers, stopped], parts, job, console, live, t_start, deadline)
    except BaseException:  # cancelled from outside: no drain, no accounting
        for r in receivers:
            r.cancel()
        raise
    finally:
        stopped.cancel()
        for p in parts:  # the runtime is over, interrupted, or a receiver failed: stop sending
            p.stopping = True
        if window is not None:
            window.stop()
        for task in send_tasks:
            task.cancel()
        await asyncio.wait(send_tasks)
    # Drain: wait (bounded) until every measured frame arrived or nothing more is on its way.
    sent = sum(p.sent for p in parts)
    for _ in range(int(DRAIN / 0.01)):
        if sum(p.received.rx.ios for p in parts) >= sent or any(r.done() for r in receivers):
            break
        await asyncio.sleep(0.01)
    for r in receivers:
        r.cancel()
    outcomes = await asyncio.gather(*receivers, return_exceptions=True)
    totals.seconds = max(1e-9, min(time.monotonic(), deadline) - measure_from)
    expected = [0] * len(parts)  # measured frames sent to each partition
    for p, fl in zip(parts, flows, strict=True):
        for template, count in zip(fl, p.sent_per_flow, strict=False):
            expected[template.dst] += count
    for p, sent_res, recv_res in zip(parts, senders.result(), outcomes, strict=True):
        failed = [r for r in (sent_res, recv_res)
                  if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        for exc in failed:
            totals.errors.append(f"{p.name}: {type(exc).__name__}: {exc}")
        totals.partitions_ok += not failed
        _add(totals, p, expected[p.index])


def _add(totals: NetTotals, p: NetPartition, expected: int) -> None:
    r = p.received
    totals.sent += p.sent
    totals.sent_bytes += p.sent_bytes
    totals.rx.merge(r.rx)
    totals.reordered += r.reordered
    totals.misdelivered += r.misdelivered
    totals.foreign += r.foreign
    counters = vars(p.nic.counters) if p.nic is not None else {}
    totals.nic.update(counters)
    h = r.rx.histogram()
    totals.per_partition.append({
        "index": p.index, "name": p.name, "mac": p.nic.mac.hex(":") if p.nic else "", "sent": p.sent,
        "received": r.rx.ios,
        "lost": max(0, expected - r.rx.ios),
        "frames_per_s_received": r.rx.ios / totals.seconds, "reordered": r.reordered,
        "latency_us": {f"p{q:g}": h.get_value_at_percentile(q) if r.rx.ios else 0 for q in (50, 99, 99.9)},
        "nic": dict(counters)})


async def _progress(senders: asyncio.Future[Any], watch: list[asyncio.Task[Any]], parts: list[NetPartition],
                    job: NetJob, console: Console, live: bool, t_start: float, deadline: float) -> None:
    last_tx = last_rx = 0
    last_t = time.monotonic()

    def table() -> Table:
        nonlocal last_tx, last_rx, last_t
        now = time.monotonic()
        tx, rx = sum(p.live_sent for p in parts), sum(p.received.live for p in parts)
        dt = max(1e-9, now - last_t)
        tx_rate, rx_rate = (tx - last_tx) / dt, (rx - last_rx) / dt
        last_tx, last_rx, last_t = tx, rx, now
        t = Table(show_header=True, header_style="bold")
        for col in ("elapsed", "remaining", "sent/s", "received/s", "Mbit/s", "in flight or lost", "partitions"):
            t.add_column(col, justify="right")
        t.add_row(f"{now - t_start:5.1f}s", f"{max(0.0, deadline - now):5.1f}s", f"{tx_rate:,.0f}", f"{rx_rate:,.0f}",
                  f"{rx_rate * job.frame_size * 8 / 1e6:,.1f}", f"{tx - rx:,}", str(len(parts)))
        return t

    def going() -> bool:
        return not senders.done() and not any(r.done() for r in watch)  # a receiver failed, or interrupted

    if live:
        with Live(table(), console=console, refresh_per_second=4, transient=True) as view:
            while going():
                await asyncio.wait([senders, *watch], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                view.update(table())
    else:
        while going():
            await asyncio.wait([senders, *watch], timeout=2.0, return_when=asyncio.FIRST_COMPLETED)


def latency_json(d: Direction) -> dict[str, Any]:
    h = d.histogram()
    return {"min": h.get_min_value() if d.ios else 0, "max": h.get_max_value() if d.ios else 0,
            "mean": h.get_mean_value() if d.ios else 0.0, "stddev": h.get_stddev() if d.ios else 0.0,
            "percentiles": {f"{p:g}": h.get_value_at_percentile(p) if d.ios else 0 for p in PERCENTILES}}


def results_json(url: str, job: NetJob, t: NetTotals) -> dict[str, Any]:
    s = t.seconds
    return {"job": {"partitions": job.partitions, "frame_size": job.frame_size, "rate": job.rate or "max",
                    "window": job.window or None,
                    "flows": job.flows, "runtime": job.runtime, "ramp": job.ramp, "connect": url},
            "seconds": s, "partitions_ok": t.partitions_ok, "errors": t.errors,
            "sent": t.sent, "received": t.rx.ios, "lost": t.lost, "loss_frac": t.lost / t.sent if t.sent else 0.0,
            "frames_per_s_sent": t.sent / s, "frames_per_s": t.rx.ios / s, "mbit_per_s": t.rx.bytes * 8 / s / 1e6,
            "reordered": t.reordered, "misdelivered": t.misdelivered, "foreign": t.foreign,
            "nic": dict(t.nic), "latency_us": latency_json(t.rx), "per_partition": t.per_partition}


def render(url: str, job: NetJob, t: NetTotals, console: Console) -> None:
    rate = f"{job.rate:g} frames/s each" if job.rate else "as fast as possible"
    rate += f", window {job.window}" if job.window else ""
    console.print(f"network: flows={job.flows}, partitions={job.partitions}, frame={job.frame_size} B, {rate}, "
                  f"connect={url}")
    s = t.seconds
    table = Table(show_header=True, header_style="bold")
    for col in ("#", "sent/s", "recv/s", "Mbit/s", "lost", "p50 µs", "p99 µs", "p99.9 µs", "rx drops"):
        table.add_column(col, justify="right")
    for row in t.per_partition:
        lat = row["latency_us"]
        table.add_row(str(row["index"]), f"{row['sent'] / s:,.0f}", f"{row['frames_per_s_received']:,.0f}",
                      f"{row['frames_per_s_received'] * job.frame_size * 8 / 1e6:,.1f}", f"{row['lost']:,}",
                      str(lat["p50"]), str(lat["p99"]), str(lat["p99.9"]), f"{row['nic'].get('rx_drops', 0):,}")
    h = t.rx.histogram()

    def pct(q: float) -> str:
        return str(h.get_value_at_percentile(q)) if t.rx.ios else "-"

    table.add_row("total", f"{t.sent / s:,.0f}", f"{t.rx.ios / s:,.0f}", f"{t.rx.bytes * 8 / s / 1e6:,.1f}",
                  f"{t.lost:,}", pct(50), pct(99), pct(99.9), f"{t.nic.get('rx_drops', 0):,}", style="bold")
    if t.per_partition:
        console.print(table)
    loss = t.lost / t.sent if t.sent else 0.0
    console.print(f"  frames: {t.sent:,} sent, {t.rx.ios:,} received, {t.lost:,} lost ({loss:.2%}) in {s:.2f}s; "
                  f"{t.reordered:,} reordered, {t.misdelivered:,} misdelivered, {t.foreign:,} foreign")
    if t.rx.ios:
        console.print(f"  one-way latency (usec): min={h.get_min_value()}, max={h.get_max_value()}, "
                      f"avg={h.get_mean_value():.1f}, stdev={h.get_stddev():.1f}")
    nic = t.nic
    console.print(f"  NIC counters: tx {nic.get('tx_frames', 0):,} frames ({nic.get('tx_drops', 0):,} dropped), "
                  f"rx {nic.get('rx_frames', 0):,} frames ({nic.get('rx_drops', 0):,} dropped)")
    console.print(f"  partitions: {t.partitions_ok} ok, {len(t.errors)} failed")
    for err in t.errors[:10]:
        console.print(f"  [red]error[/]: {err}")


def main(args: Any) -> int:
    import uvloop  # noqa: PLC0415 - the load tool's loop

    job = NetJob(partitions=args.partitions, frame_size=args.frame_size, rate=args.rate or 0.0, flows=args.flows,
                 runtime=args.runtime, ramp=args.ramp, window=args.window or 0)
    try:
        peers(job.flows, job.partitions)
    except ValueError as exc:
        print(f"child-partition load network: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 120)
    logs.setup("warning")

    interrupt = Interrupt()

    async def interruptible() -> NetTotals:
        return await run_network(args.connect, job, console, console.is_terminal, interrupt.install().event)

    totals = uvloop.run(interruptible())
    interrupt.announce("child-partition load network")
    render(args.connect, job, totals, console)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results_json(args.connect, job, totals), fh, indent=1)
    return interrupt.status(0 if not totals.errors and totals.partitions_ok == job.partitions else 1)

