"""The parent's counters as plain data, read at scrape time: per-channel ring traffic, what closed channels and
gone connections carried (so totals never go down), control-plane latencies, and each device's own samples.

Nothing here runs on the data path: the rings already count packets and bytes (``vmbus_proto.ring.RingStats``,
the counters Linux keeps per ring in ``struct hv_ring_buffer_info`` and shows in sysfs
``/sys/bus/vmbus/devices/*/channels/*/``); a channel's counts are added to the retired totals once, when it
closes. ``parent_partition.web`` turns these into JSON and Prometheus metrics.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vmbus_proto.aio.channel import Channel

#: Latency bucket bounds in seconds: microsecond resolution at the low end (Prometheus ``le`` labels).
LATENCY_BUCKETS: tuple[float, ...] = (
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Sample:
    """One value a device reports: ``name`` in base units without the ``vmbus_<device>_`` prefix, a
    ``_total`` suffix for counters. ``partition`` is kept apart from ``labels``: metrics sum over it unless
    per-partition labels are asked for; a sample that must not be summed says ``aggregate=False``."""

    name: str
    value: float
    help: str
    kind: Literal["counter", "gauge"] = "counter"
    partition: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    aggregate: bool = True  # False: a per-partition value whose sum could go down (it goes with its partition)


class LatencyHistogram:
    """Bucket counts, sum and count of observed durations in seconds (cumulative at read time)."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        out, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass(slots=True)
class Traffic:
    """Ring traffic of one channel, or a sum of channels: ``in`` is guest to host, ``out`` host to guest.
    ``*_bytes`` are ring bytes (descriptor, padded payload, trailer); ``data_*`` the inline GPA data that
    travelled with the packets."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    data_in: int = 0
    data_out: int = 0
    interrupts_in: int = 0  # signals that woke us (empty -> non-empty, unmasked)
    blocked_out: int = 0  # times we had to wait for ring space (pending_send_sz set)

    @classmethod
    def of(cls, ch: Channel) -> Traffic:
        r = ch.rings
        return cls(r.reader.stats.packets, r.writer.stats.packets, r.reader.stats.bytes, r.writer.stats.bytes,
                   r.data_reader.stats.bytes, r.data_writer.stats.bytes, r.reader.stats.interrupts,
                   r.writer.stats.blocked)

    def add(self, other: Traffic) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ring_fill(ch: Channel) -> dict[str, int]:
    """How full each ring of an open channel is right now, as this side knows it (bytes)."""
    r = ch.rings
    return {"in_size": r.reader.data_size, "in_used": r.reader.used,
            "out_size": r.writer.data_size, "out_used": r.writer.data_size - r.writer.free,
            "outstanding_requests": ch.outstanding}


@dataclass(slots=True)
class Totals:
    """What the daemon's closed channels and gone connections carried, by device and in all."""

    retired: dict[str, Traffic] = field(default_factory=lambda: collections.defaultdict(Traffic))
    retired_by_partition: dict[tuple[str, str], Traffic] = field(
        default_factory=lambda: collections.defaultdict(Traffic))
    transport_bytes_in: int = 0  # of connections that are gone
    transport_bytes_out: int = 0
    dropped_messages: int = 0
    connections: int = 0  # partitions that said HELLO and were accepted, since start
    channels_opened: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    open_latency: dict[str, LatencyHistogram] = field(
        default_factory=lambda: collections.defaultdict(LatencyHistogram))

    def retire(self, partition: str, ch: Channel) -> None:
        """``ch`` closed: keep what it carried."""
        t = Traffic.of(ch)
        self.retired[ch.name].add(t)
        self.retired_by_partition[(partition, ch.name)].add(t)

    def forget(self, partition: str) -> None:
        """A partition went: its per-partition history folds into the device totals only."""
        for key in [k for k in self.retired_by_partition if k[0] == partition]:
            del self.retired_by_partition[key]


def counters_json(samples: list[Sample]) -> dict[str, Any]:
    """A device's samples as JSON: ``totals`` summed over partitions, and ``partitions`` each on its own
    (a sample with labels is keyed ``name{k=v,...}``)."""
    totals: dict[str, float] = collections.defaultdict(float)
    per: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for s in samples:
        key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in s.labels) + "}" if s.labels else "")
        totals[key] += s.value
        if s.partition is not None:
            per[s.partition][key] += s.value
    return {"totals": dict(totals), "partitions": {p: dict(v) for p, v in per.items()}}
