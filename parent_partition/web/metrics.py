"""``/metrics`` for Prometheus: one custom collector that reads the daemon's live counters at scrape time.

Nothing is updated on the data path for Prometheus: the rings already count packets and bytes, the devices
keep their own counters (``Vsp.samples``), and the connection keeps what closed channels carried
(``counters.Totals``), so every ``_total`` only goes up. Names follow Prometheus practice: a ``vmbus_`` prefix,
base units (seconds, bytes), ``_total`` on counters, histograms with microsecond buckets. Series carry a
``device`` label (a handful); a ``partition`` label only with ``[http] partition_labels = true``, since there
may be thousands of partitions.

The daemon's own health for leak checks (bench/soak.py): ``vmbus_parent_tasks`` (asyncio tasks alive in its
event loop) next to the standard ``process_open_fds`` and ``process_resident_memory_bytes`` of
prometheus_client's process collector; ``process_status`` gives the same three to the JSON API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from vmbus_proto.packets import PAGE_SIZE

from ..counters import LatencyHistogram, Sample, Traffic, ring_fill
from ..daemon import ParentDaemon

LAG_INTERVAL = 0.25  # seconds between event-loop lag probes

_TRAFFIC = (  # Traffic field, family, help, direction
    ("packets_in", "vmbus_channel_packets", "packets through channel rings", "in"),
    ("packets_out", "vmbus_channel_packets", "packets through channel rings", "out"),
    ("bytes_in", "vmbus_channel_ring_bytes", "ring bytes (descriptor, padded payload, trailer) through channel rings",
     "in"),
    ("bytes_out", "vmbus_channel_ring_bytes", "ring bytes (descriptor, padded payload, trailer) through channel "
     "rings", "out"),
    ("data_in", "vmbus_channel_data_bytes", "GPA data bytes that travelled with channel packets", "in"),
    ("data_out", "vmbus_channel_data_bytes", "GPA data bytes that travelled with channel packets", "out"),
)


class LoopLag:
    """Event-loop lag: how late a timer set for ``interval`` seconds fires (every handler's latency floor)."""

    def __init__(self, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.histogram = LatencyHistogram()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.histogram.observe(max(0.0, loop.time() - due))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _histogram(name: str, help_: str, labels: list[str],
               series: Iterable[tuple[list[str], LatencyHistogram]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, help_, labels=labels)
    for values, h in series:
        fam.add_metric(values, h.cumulative(), h.sum)
    return fam


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs
        return None


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def task_count() -> int:
    """asyncio tasks alive in the running loop (the daemon's: connections, channels, timers, HTTP requests)."""
    return len(asyncio.all_tasks())


def process_status() -> dict[str, int | None]:
    """The daemon's tasks, open file descriptors and resident memory now (``None`` where /proc is missing):
    cheap, read on request."""
    return {"tasks": task_count(), "open_fds": _open_fds(), "resident_memory_bytes": _resident_bytes()}


def _metric_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


class VmbusCollector(Collector):
    """Every ``vmbus_`` family, built from the daemon's state when Prometheus scrapes."""

    def __init__(self, daemon: ParentDaemon, partition_labels: bool, lag: LoopLag,
                 http_latency: dict[str, LatencyHistogram]) -> None:
        self.daemon = daemon
        self.partition_labels = partition_labels
        self.lag = lag
        self.http_latency = http_latency

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("vmbus_parent_tasks", "asyncio tasks alive in the daemon's event loop",
                                value=task_count())
        yield from self._partitions()
        yield from self._channels()
        for vsp in self.daemon.vsps:
            yield from self._device(vsp.name, vsp.samples())
        for dev in self.daemon.emulated:  # the devices on trapped I/O ports: vmbus_ata_exits_total, ...
            yield from self._device(dev.name, dev.samples())
        yield _histogram("vmbus_channel_open_duration_seconds",
                         "OPENCHANNEL to the device's answer (the VSP's open)", ["device"],
                         [([d], h) for d, h in sorted(self.daemon.totals.open_latency.items())])
        yield _histogram("vmbus_event_loop_lag_seconds",
                         f"how late a {self.lag.interval:g} s timer fires on the daemon's event loop", [],
                         [([], self.lag.histogram)])
        yield _histogram("vmbus_http_request_duration_seconds", "time to answer an HTTP request, by route",
                         ["route"], [([r], h) for r, h in sorted(self.http_latency.items())])

    def _partitions(self) -> Iterator[Metric]:
        d, t = self.daemon, self.daemon.totals
        yield GaugeMetricFamily("vmbus_partitions_connected", "child partitions connected now",
                                value=len(d.partitions))
        yield CounterMetricFamily("vmbus_partition_connections_total", "partitions accepted since start",
                                  value=t.connections)
        live = list(d.partitions.values())
        transport = CounterMetricFamily("vmbus_transport_bytes_total",
                                        "bytes on the partitions' streams (frames, every channel)",
                                        labels=["direction"])
        transport.add_metric(["in"], t.transport_bytes_in + sum(c.bytes_in for c in live))
        transport.add_metric(["out"], t.transport_bytes_out + sum(c.bytes_out for c in live))
        yield transport
        yield CounterMetricFamily("vmbus_control_messages_dropped_total",
                                  "guest control messages dropped as invalid (logged)",
                                  value=t.dropped_messages + sum(c.dropped_messages for c in live))
        gpadls = GaugeMetricFamily("vmbus_gpadls", "GPADLs the partitions hold now")
        pages = GaugeMetricFamily("vmbus_gpadl_bytes", "guest memory described by the GPADLs held now")
        gpadls.add_metric([], sum(len(c.core.gpadls) for c in live if c.core))
        pages.add_metric([], PAGE_SIZE * sum(c.core.gpadls.pages for c in live if c.core))
        yield gpadls
        yield pages
        yield GaugeMetricFamily("vmbus_memory_budget_bytes",
                                "bytes the parent may hold for all partitions together ([limits] memory_budget)",
                                value=d.budget.capacity)
        yield GaugeMetricFamily("vmbus_memory_budget_used_bytes",
                                "bytes of the memory budget in use now (all partitions' bytes held)",
                                value=d.budget.used)
        labels = ["kind", "partition"] if self.partition_labels else ["kind"]
        held = GaugeMetricFamily("vmbus_partition_bytes_held", "bytes the parent holds for partitions, by kind "
                                 "(GPADL page lists, shadow guest pages, output not read yet)", labels=labels)
        by_kind: collections.Counter[tuple[str, ...]] = collections.Counter()
        for name, conn in d.partitions.items():
            for kind, n in conn.account.by_kind.items():
                by_kind[(kind, name) if self.partition_labels else (kind,)] += n
        for key, n in sorted(by_kind.items()):
            held.add_metric(list(key), n)
        yield held
        yield CounterMetricFamily("vmbus_limit_refusals_total",
                                  "requests refused for a [limits] limit, connected partitions",
                                  value=sum(c.limit_refusals for c in live))

    def _channels(self) -> Iterator[Metric]:
        """Ring traffic by device (and partition, when asked): what closed channels carried plus live ones."""
        per_label = self.partition_labels
        traffic: dict[tuple[str, ...], Traffic] = collections.defaultdict(Traffic)
        fill: dict[tuple[str, ...], collections.Counter[str]] = collections.defaultdict(collections.Counter)
        opened = CounterMetricFamily("vmbus_channels_opened_total", "channels opened since start", labels=["device"])
        for device, n in sorted(self.daemon.totals.channels_opened.items()):
            opened.add_metric([device], n)
        yield opened
        if per_label:
            for (part, device), t in self.daemon.totals.retired_by_partition.items():
                traffic[(device, part)].add(t)
        else:
            for device, t in self.daemon.totals.retired.items():
                traffic[(device,)].add(t)
        for name, conn in self.daemon.partitions.items():
            for ch in conn.channels.values():
                key: tuple[str, ...] = (ch.name, name) if per_label else (ch.name,)
                traffic[key].add(Traffic.of(ch))
                fill[key].update(ring_fill(ch))
                fill[key]["channels"] += 1
        labels = ["device", "partition"] if per_label else ["device"]
        families: dict[str, CounterMetricFamily] = {}
        for attr, fam_name, help_, direction in _TRAFFIC:
            fam = families.get(fam_name)
            if fam is None:
                fam = families[fam_name] = CounterMetricFamily(fam_name, help_, labels=[*labels, "direction"])
            for key, t in sorted(traffic.items()):
                fam.add_metric([*key, direction], getattr(t, attr))
        yield from families.values()
        interrupts = CounterMetricFamily("vmbus_channel_interrupts_total",
                                         "guest signals that found an empty, unmasked inbound ring", labels=labels)
        blocked = CounterMetricFamily("vmbus_channel_send_blocked_total",
                                      "times the parent waited for outbound ring space (pending_send_sz)",
                                      labels=labels)
        for key, t in sorted(traffic.items()):
            interrupts.add_metric(list(key), t.interrupts_in)
            blocked.add_metric(list(key), t.blocked_out)
        yield interrupts
        yield blocked
        open_now = GaugeMetricFamily("vmbus_channels_open", "channels open now", labels=labels)
        size = GaugeMetricFamily("vmbus_ring_size_bytes", "data bytes of the open channels' rings",
                                 labels=[*labels, "direction"])
        used = GaugeMetricFamily("vmbus_ring_used_bytes", "bytes in the open channels' rings now",
                                 labels=[*labels, "direction"])
        for key, f in sorted(fill.items()):
            open_now.add_metric(list(key), f["channels"])
            for direction in ("in", "out"):
                size.add_metric([*key, direction], f[f"{direction}_size"])
                used.add_metric([*key, direction], f[f"{direction}_used"])
        yield open_now
        yield size
        yield used

    def _device(self, device: str, samples: list[Sample]) -> Iterator[Metric]:
        """A device's own samples as ``vmbus_<device>_<name>``: summed over partitions unless asked not to."""
        grouped: dict[str, list[Sample]] = collections.defaultdict(list)
        for s in samples:
            grouped[s.name].append(s)
        prefix = f"vmbus_{_metric_name(device)}_"
        for name, all_of_name in grouped.items():
            first = all_of_name[0]
            per = self.partition_labels and any(s.partition is not None for s in all_of_name)
            group = all_of_name if per else [s for s in all_of_name if s.aggregate]
            if not group:
                continue
            label_names = [k for k, _ in first.labels] + (["partition"] if per else [])
            values: dict[tuple[str, ...], float] = collections.defaultdict(float)
            for s in group:
                values[tuple(v for _, v in s.labels) + ((s.partition or "",) if per else ())] += s.value
            cls: Any = CounterMetricFamily if first.kind == "counter" else GaugeMetricFamily
            fam = cls(prefix + _metric_name(name), first.help, labels=label_names)
            for key, value in sorted(values.items()):
                fam.add_metric(list(key), value)
            yield fam


def registry(collector: VmbusCollector) -> CollectorRegistry:
    """A registry of its own (not the global one): ours, and the process's CPU, memory and file descriptors."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg
