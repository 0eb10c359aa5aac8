"""Counters and latency histograms of ``child-partition load``, and the results document they make.

Latencies go into HDR histograms (Gil Tene's HdrHistogram, the ``hdrh`` package; microseconds, 3 significant
digits), as wrk2 and fio's percentiles do. Results must merge exactly across processes and machines, so the JSON
carries every histogram in HdrHistogram's own compressed, base64 encoding beside the percentiles computed from
it: a merge decodes and adds histograms and recomputes the percentiles, never averages them, sums the counts, and
takes rates over the union of the runs' measured windows (wall-clock intervals, since the runs' monotonic
clocks are unrelated).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

MAX_LATENCY_US = 3_600_000_000  # an hour: anything slower is clamped
PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)
SUMMARY = (50, 90, 99, 99.9)  # the table's columns (and max)
KEEP_MESSAGES = 5  # first error messages kept per operation name
KEEP_ERRORS = 100  # partition-level error lines kept per workload
FORMAT = 1  # the results document's format number


class MergeError(ValueError):
    """Results that cannot be merged (different jobs, not a results document)."""


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


@dataclass(slots=True)
class OpStats:
    """One operation name's counts and latencies. Latencies are counted per whole microsecond while the run
    goes (a dict increment per operation is far cheaper than an HDR record in Python) and put into the
    histogram when the results are made; ``merged`` holds histograms decoded from other results."""

    ops: int = 0
    bytes: int = 0
    errors: int = 0
    late: int = 0  # open loop: sent after their intended time (their latency counts from it)
    messages: list[str] = field(default_factory=list)
    latencies: collections.Counter[int] = field(default_factory=collections.Counter)
    merged: HdrHistogram | None = None

    def record(self, usec: int, nbytes: int) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.latencies[usec if usec > 0 else 1] += 1

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < KEEP_MESSAGES:
            self.messages.append(message)

    def histogram(self) -> HdrHistogram:
        hist = new_histogram()
        for usec, count in self.latencies.items():
            hist.record_value(min(usec, MAX_LATENCY_US), count)
        if self.merged is not None:
            hist.add(self.merged)
        return hist

    def merge(self, other: OpStats) -> None:
        self.ops += other.ops
        self.bytes += other.bytes
        self.errors += other.errors
        self.late += other.late
        self.messages.extend(other.messages[:max(0, KEEP_MESSAGES - len(self.messages))])
        self.latencies.update(other.latencies)
        if other.merged is not None:
            if self.merged is None:
                self.merged = new_histogram()
            self.merged.add(other.merged)

    def to_json(self, seconds: float) -> dict[str, Any]:
        h = self.histogram()
        n = h.get_total_count()
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors, "late": self.late,
                "error_messages": self.messages, "ops_per_s": self.ops / seconds if seconds > 0 else 0.0,
                "bytes_per_s": self.bytes / seconds if seconds > 0 else 0.0,
                "latency_us": latency_json(h) if n else latency_json(None),
                "histogram": h.encode().decode("ascii")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpStats:
        try:
            stats = cls(ops=int(data["ops"]), bytes=int(data["bytes"]), errors=int(data["errors"]),
                        late=int(data.get("late", 0)), messages=[str(m) for m in data.get("error_messages", [])])
            stats.merged = HdrHistogram.decode(str(data["histogram"]).encode("ascii"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"an operation's results are incomplete ({type(exc).__name__}: {exc})") from None
        return stats


def latency_json(h: HdrHistogram | None) -> dict[str, Any]:
    """min/mean/max, the summary percentiles as p50..p99.9, and fio's full percentile list (µs)."""
    if h is None:
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, **{f"p{q:g}": 0 for q in SUMMARY},
                "percentiles": {f"{q:g}": 0 for q in PERCENTILES}}
    return {"min": h.get_min_value(), "max": h.get_max_value(), "mean": h.get_mean_value(),
            "stddev": h.get_stddev(), **{f"p{q:g}": h.get_value_at_percentile(q) for q in SUMMARY},
            "percentiles": {f"{q:g}": h.get_value_at_percentile(q) for q in PERCENTILES}}


@dataclass(slots=True)
class WorkloadStats:
    """One workload's part of the results (one process's, or merged)."""

    name: str  # the workload (storage, network ...)
    options: dict[str, Any] = field(default_factory=dict)
    partitions: int = 0
    partitions_ok: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    ops: dict[str, OpStats] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def op(self, name: str) -> OpStats:
        stats = self.ops.get(name)
        if stats is None:
            stats = self.ops[name] = OpStats()
        return stats

    def fail(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < KEEP_ERRORS:
            self.errors.append(message)

    def merge(self, other: WorkloadStats) -> None:
        self.partitions += other.partitions
        self.partitions_ok += other.partitions_ok
        self.error_count += other.error_count
        self.errors.extend(other.errors[:max(0, KEEP_ERRORS - len(self.errors))])
        for name, stats in other.ops.items():
            self.op(name).merge(stats)
        self.extra = merge_extra(self.extra, other.extra)

    @property
    def failed_ops(self) -> int:
        return sum(s.errors for s in self.ops.values())

    def to_json(self, seconds: float) -> dict[str, Any]:
        return {"workload": self.name, "options": self.options, "seconds": seconds, "partitions": self.partitions,
                "partitions_ok": self.partitions_ok, "errors": self.errors, "error_count": self.error_count,
                "ops": {name: s.to_json(seconds) for name, s in sorted(self.ops.items())}, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkloadStats:
        try:
            return cls(name=str(data["workload"]), options=dict(data["options"]),
                       partitions=int(data["partitions"]), partitions_ok=int(data["partitions_ok"]),
                       errors=[str(e) for e in data["errors"]], error_count=int(data["error_count"]),
                       ops={str(k): OpStats.from_json(v) for k, v in data["ops"].items()},
                       extra=dict(data.get("extra", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MergeError(f"a workload's results are incomplete ({type(exc).__name__}: {exc})") from None


def merge_extra(a: Any, b: Any) -> Any:
    """A workload's own extra results, merged: numbers add, lists concatenate, mappings merge key by key,
    anything else must agree (else both are kept, as a list)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge_extra(a[k], v) if k in a else v
        return out
    if isinstance(a, bool) or isinstance(b, bool):
        return a if a == b else [a, b]
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return a if a == b else [a, b]


def union_seconds(windows: list[tuple[float, float]]) -> float:
    """The length of the union of wall-clock intervals (overlapping runs count once, disjoint ones add up)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(windows):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total
