"""``child-partition load network``: a traffic generator between guests on the parent's virtual switch, in the
manner of pktgen and iperf3's UDP mode.

Each partition is a real guest on its own VMBus connection: it negotiates, binds only the NetVSC (the other
offers are left unopened, as a guest without those drivers would, so the parent creates no disks for it) and
waits for carrier. Then every partition sends Ethernet frames to its peers (``--flows``: a ring, pairs, or
all to all) through the parent's switch, at a fixed rate or as fast as its NIC takes them, and counts what
it receives. The frames carry a private EtherType (0x88B5, IEEE 802 local experimental) and, in their
payload, the sender's and receiver's index, a per-flow sequence number and the send time; all partitions
share this process's monotonic clock, so the receiver measures one-way latency exactly.

It runs on the load engine (``engine.py``): a ``send`` operation hands one frame to the NIC (closed loop: as
fast as the NIC takes them; ``--rate``: frames/s per partition at fixed times), and the receivers record each
measured frame's one-way latency as a ``receive`` (``Recorder.record``, started at its send time). Frames sent
during the warm-up are not counted. After the sending stops the receivers get a short drain; what was sent in
the measured window and did not arrive is lost (dropped by the switch's port queues, the parent's receive
buffers or a NIC's receive queue; the NICs' own counters are reported too). The partitions send to each other,
so they all run in one process (``one_process``). Every partition leaves with RNDIS HALT, CLOSECHANNEL and
UNLOAD.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.console import Console
from rich.table import Table

from vmbus_proto.aio import logs
from vmbus_proto.devices.network import nvsp

from ..devices import vsc_classes
from ..devices.network.nic import ETH_HEADER, Nic
from .args import number
from .guest import CONNECT_TIMEOUT, Guest, started
from .stats import OpStats
from .workload import Done, LoadOptions, PartitionLoad, Recorder

ETHERTYPE = 0x88B5  # IEEE Std 802 "local experimental EtherType 1"
MAGIC = b"VMBL"
# After the Ethernet header: magic, sender index, receiver index, sequence number, send time (ns, monotonic).
ROUTE = struct.Struct("!4sHH")
STAMP = struct.Struct("!QQ")
HEADER_BYTES = ETH_HEADER + ROUTE.size + STAMP.size
MIN_FRAME, MAX_FRAME = 64, 1514  # without the FCS, as the NIC takes them
FLOWS = ("ring", "pairs", "all-to-all")
DRAIN = 1.0  # seconds the receivers get after the senders stop
LOST_AFTER = 0.2  # seconds a full window waits for its frames before counting them as gone
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
    """One partition's receive side: measured frames and their one-way latencies, order, and strays."""

    index: int
    box: list[Recorder | None] = field(default_factory=lambda: [None])  # the engine's recorder, once it runs
    frames: int = 0  # measured frames received
    latencies: OpStats = field(default_factory=OpStats)  # this partition's one-way latencies (its own row)
    live: int = 0  # every frame of ours, warm-up included
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
        rec = self.box[0]
        sent = sent_ns / 1e9
        if rec is not None and rec.measuring(sent):
            usec = max(1, (now_ns - sent_ns) // 1000)
            self.frames += 1
            self.latencies.record(usec, len(frame))
            rec.record("receive", usec, len(frame), started=sent)


class NetPartition(Guest):
    """One traffic-generating guest: a VMBus connection with only its NetVSC bound."""

    def __init__(self, url: str, name: str, index: int, log: Any, secret: bytes | None = None) -> None:
        super().__init__(url, name, GUEST_MEMORY, log, secret)
        self.index = index
        self.nic: Nic | None = None
        self.received = Received(index)
        self.flows: list[FrameTemplate] = []
        self.seqs: list[int] = []
        self.sent_per_flow: list[int] = []  # measured frames sent on each flow
        self.live_sent = 0
        self.next_flow = 0
        self.window: Window | None = None
        self.receiver: asyncio.Task[None] | None = None
        self.box: list[Recorder | None] = [None]

    @property
    def sent(self) -> int:
        return sum(self.sent_per_flow)

    async def start(self) -> None:
        offer = await self.offer(lambda o: o.if_type == nvsp.SPEC.class_id and o.sub_channel_index == 0,
                                 "network adapter")
        assert self.bus is not None
        self.vsc = vsc_classes()[nvsp.SPEC.class_id](self.bus, self.memory, offer, self.log)
        await self.vsc.attach()
        nic = getattr(self.vsc, "nic", None)
        if not isinstance(nic, Nic):
            raise RuntimeError("the NetVSC came up without a NIC")
        self.nic = nic
        await asyncio.wait_for(nic.wait_link(), CONNECT_TIMEOUT)

    def begin(self, flows: list[FrameTemplate], window: Window | None, box: list[Recorder | None]) -> None:
        """The run starts: this partition's flows, the window, and its receiver (recording into ``box``, shared
        by every partition and filled by the first operation)."""
        self.flows, self.window, self.box = flows, window, box
        self.seqs = [0] * len(flows)
        self.sent_per_flow = [0] * len(flows)
        self.received.window, self.received.box = window, box
        self.receiver = asyncio.get_running_loop().create_task(self.receive())

    async def operation(self, rec: Recorder) -> Done:
        """Send one frame, to the next of this partition's flows (round robin)."""
        nic = self.nic
        assert nic is not None and self.flows
        self.box[0] = rec
        if self.window is not None:
            await self.window.room(self.index, self.live_sent, time.monotonic() + CONNECT_TIMEOUT)
        f = self.next_flow
        self.next_flow = (f + 1) % len(self.flows)
        template = self.flows[f]
        ns = time.monotonic_ns()
        frame = template.frame(self.seqs[f], ns)
        self.seqs[f] += 1
        if not nic.send_nowait(frame):
            await nic.send(frame)  # the ring is full: wait for room, as a qdisc would
        self.live_sent += 1
        if rec.measuring(ns / 1e9):
            self.sent_per_flow[f] += 1
        return Done("send", len(frame))

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
        if self.receiver is not None:
            self.receiver.cancel()
        await self.leave()


class NetworkWorkload:
    """Frames between partitions through the parent's virtual switch."""

    name: ClassVar[str] = "network"
    description: ClassVar[str] = (
        "frames between partitions through the parent's virtual switch\n\n"
        "Each partition brings up its NetVSC, sends to its peers (--flows) and counts what arrives: loss,\n"
        "order and one-way latency (all partitions share this process's clock).")
    prefix: ClassVar[str] = "netload"
    one_process: ClassVar[bool] = True
    default_partitions: ClassVar[int] = 2
    min_partitions: ClassVar[int] = 2

    def __init__(self, options: LoadOptions, frame_size: int, window: int, flows: str) -> None:
        peers(flows, options.partitions)  # raises ValueError for a count the flows cannot use
        self.options, self.frame_size, self.window_size, self.flows = options, frame_size, window, flows
        self.parts: list[NetPartition] = []
        self.window: Window | None = None
        self.receive_errors: list[str] = []

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--frame-size", metavar="BYTES", type=number(int, MIN_FRAME, MAX_FRAME), default=64,
                            help=f"Ethernet frame length without the FCS, {MIN_FRAME}-{MAX_FRAME}")
        parser.add_argument("--window", metavar="FRAMES", type=number(int, 1),
                            help="at most FRAMES of each partition's frames on their way, as a TCP window "
                                 "(default: no limit)")
        parser.add_argument("--flows", default="ring", choices=FLOWS,
                            help="who sends to whom: each to the next, in pairs (even N), or each to every other")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> NetworkWorkload:
        return cls(options, frame_size=args.frame_size, window=args.window or 0, flows=args.flows)

    async def setup(self) -> None:
        return None

    async def start_partition(self, index: int) -> NetPartition:
        name = f"{self.options.prefix}-{index}"
        part = NetPartition(self.options.connect, name, index - self.options.first_index,
                            logs.get(component="load").bind(partition=name), self.options.secret)
        await started(part, part.start, part.stop)
        return part

    async def ready(self, partitions: list[PartitionLoad]) -> None:
        parts = [p for p in partitions if isinstance(p, NetPartition)]
        if len(parts) != self.options.partitions:
            raise RuntimeError(f"the flows join every partition: only {len(parts)} of {self.options.partitions} "
                               f"came up")
        parts.sort(key=lambda p: p.index)
        self.parts = parts
        self.window = Window(len(parts), self.window_size) if self.window_size else None
        box: list[Recorder | None] = [None]
        macs = [p.nic.mac if p.nic else bytes(6) for p in parts]
        for i, dests in enumerate(peers(self.flows, len(parts))):
            flows = [FrameTemplate(macs[d], macs[i], i, d, self.frame_size) for d in dests]
            parts[i].begin(flows, self.window, box)

    async def finish(self) -> None:
        """The senders stopped: let the measured frames still on their way arrive (bounded), then stop the
        receivers."""
        if self.window is not None:
            self.window.stop()
        sent = sum(p.sent for p in self.parts)
        receivers = [p.receiver for p in self.parts if p.receiver is not None]
        for _ in range(int(DRAIN / 0.01)):
            if sum(p.received.frames for p in self.parts) >= sent or any(r.done() for r in receivers):
                break
            await asyncio.sleep(0.01)
        for r in receivers:
            r.cancel()
        for p, outcome in zip(self.parts, await asyncio.gather(*receivers, return_exceptions=True), strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                self.receive_errors.append(f"{p.name}: receiving: {type(outcome).__name__}: {outcome}")

    async def teardown(self) -> dict[str, Any]:
        expected = [0] * len(self.parts)  # measured frames sent to each partition
        for p in self.parts:
            for template, count in zip(p.flows, p.sent_per_flow, strict=True):
                expected[template.dst] += count
        nic: collections.Counter[str] = collections.Counter()
        rows = []
        for p in self.parts:
            r = p.received
            counters = vars(p.nic.counters) if p.nic is not None else {}
            nic.update(counters)
            lat = r.latencies.to_json(0.0)["latency_us"]
            rows.append({"index": p.index, "name": p.name, "mac": p.nic.mac.hex(":") if p.nic else "",
                         "sent": p.sent, "received": r.frames, "lost": max(0, expected[p.index] - r.frames),
                         "reordered": r.reordered, "latency_us": {k: lat[k] for k in ("p50", "p99", "p99.9")},
                         "nic": dict(counters)})
        sent = sum(p.sent for p in self.parts)
        received = sum(p.received.frames for p in self.parts)
        return {"sent": sent, "received": received, "lost": max(0, sent - received),
                "reordered": sum(p.received.reordered for p in self.parts),
                "misdelivered": sum(p.received.misdelivered for p in self.parts),
                "foreign": sum(p.received.foreign for p in self.parts), "nic": dict(nic),
                "receive_errors": self.receive_errors, "per_partition": rows}

    @classmethod
    def render(cls, section: dict[str, Any], console: Console) -> None:
        """iperf3-style lines: per partition and in total, frames/s, Mbit/s, loss, one-way latency, NIC drops."""
        o, x, s = section["options"], section["extra"], section["seconds"] or 1e-9
        if not x:
            return
        rate = f"{o['rate']:g} frames/s each" if o["rate"] else "as fast as possible"
        rate += f", window {o['window']}" if o.get("window") else ""
        console.print(f"network: flows={o['flows']}, partitions={section['partitions']}, "
                      f"frame={o['frame_size']} B, {rate}")
        table = Table(show_header=True, header_style="bold")
        for col in ("#", "sent/s", "recv/s", "Mbit/s", "lost", "p50 µs", "p99 µs", "p99.9 µs", "rx drops"):
            table.add_column(col, justify="right")
        size = o["frame_size"]
        for row in x["per_partition"]:
            lat = row["latency_us"]
            table.add_row(str(row["index"]), f"{row['sent'] / s:,.0f}", f"{row['received'] / s:,.0f}",
                          f"{row['received'] / s * size * 8 / 1e6:,.1f}", f"{row['lost']:,}", str(lat["p50"]),
                          str(lat["p99"]), str(lat["p99.9"]), f"{row['nic'].get('rx_drops', 0):,}")
        rx = section["ops"].get("receive", {"latency_us": {"p50": 0, "p99": 0, "p99.9": 0}})
        lat = rx["latency_us"]
        nic = x["nic"]
        table.add_row("total", f"{x['sent'] / s:,.0f}", f"{x['received'] / s:,.0f}",
                      f"{x['received'] / s * size * 8 / 1e6:,.1f}", f"{x['lost']:,}", str(lat["p50"]),
                      str(lat["p99"]), str(lat["p99.9"]), f"{nic.get('rx_drops', 0):,}", style="bold")
        if x["per_partition"]:
            console.print(table)
        loss = x["lost"] / x["sent"] if x["sent"] else 0.0
        console.print(f"  frames: {x['sent']:,} sent, {x['received']:,} received, {x['lost']:,} lost ({loss:.2%}) "
                      f"in {s:.2f}s; {x['reordered']:,} reordered, {x['misdelivered']:,} misdelivered, "
                      f"{x['foreign']:,} foreign")
        if x["received"]:
            console.print(f"  one-way latency (usec): min={lat['min']}, max={lat['max']}, avg={lat['mean']:.1f}, "
                          f"stdev={lat['stddev']:.1f}")
        console.print(f"  NIC counters: tx {nic.get('tx_frames', 0):,} frames ({nic.get('tx_drops', 0):,} dropped), "
                      f"rx {nic.get('rx_frames', 0):,} frames ({nic.get('rx_drops', 0):,} dropped)")
        for line in x.get("receive_errors", []):
            console.print(f"  [red]error[/]: {line}")
