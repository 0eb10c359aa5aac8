"""The scale benchmark's arithmetic: per-kind latency histograms, their merge, and the search for the largest load.

Latencies are HDR histograms (``hdrh``, microseconds, 3 significant digits), one per kind of activity, as
``child-partition load`` keeps them: each worker encodes its own (``HdrHistogram.encode``), the coordinator
decodes and adds them, so the merged percentiles are those of every sample, not an average of percentiles.

The search (:class:`StepSearch`) walks a list of loads (partition counts, or per-partition rates) and stops
at the first step that fails: any error, or a p99 at or above the bound in any kind. The largest load held
is the last step that passed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

MAX_LATENCY_US = 60_000_000  # one minute: anything longer is clipped to it
SIGNIFICANT = 3

#: Activities each partition does once per period, and what the worker's own scheduling costs it.
KINDS = ("storage_write", "storage_read", "ping", "video", "key", "mouse")
LAG = "worker_lag"  # how late a partition's tick started in its worker (the load generator's own saturation)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, SIGNIFICANT)


class Latencies:
    """One histogram per kind, in one process."""

    def __init__(self) -> None:
        self.hists: dict[str, HdrHistogram] = {}

    def record(self, kind: str, usec: int) -> None:
        hist = self.hists.get(kind)
        if hist is None:
            hist = self.hists[kind] = new_histogram()
        hist.record_value(min(max(usec, 1), MAX_LATENCY_US))

    def encode(self) -> dict[str, str]:
        return {kind: h.encode().decode("ascii") for kind, h in self.hists.items()}


def merge(encoded: Iterable[Mapping[str, str]]) -> dict[str, HdrHistogram]:
    """Add every worker's encoded histograms, kind by kind."""
    out: dict[str, HdrHistogram] = {}
    for one in encoded:
        for kind, text in one.items():
            hist = out.get(kind)
            if hist is None:
                hist = out[kind] = new_histogram()
            hist.decode_and_add(text.encode("ascii"))
    return out


def summary(hist: HdrHistogram) -> dict[str, float]:
    """Count and percentiles in milliseconds."""
    def ms(us: int) -> float:
        return round(us / 1000.0, 3)
    return {"count": int(hist.get_total_count()), "p50_ms": ms(hist.get_value_at_percentile(50)),
            "p90_ms": ms(hist.get_value_at_percentile(90)), "p99_ms": ms(hist.get_value_at_percentile(99)),
            "p999_ms": ms(hist.get_value_at_percentile(99.9)), "max_ms": ms(hist.get_max_value())}


def summarize(hists: Mapping[str, HdrHistogram]) -> dict[str, dict[str, float]]:
    return {kind: summary(h) for kind, h in sorted(hists.items()) if h.get_total_count()}


def worst_p99(kinds: Mapping[str, Mapping[str, float]], only: Iterable[str] = KINDS) -> tuple[str | None, float]:
    """The kind with the highest p99 among ``only`` (the device activities, not the worker's lag)."""
    wanted = set(only)
    worst: tuple[str | None, float] = (None, 0.0)
    for kind, s in kinds.items():
        if kind in wanted and s["count"] and s["p99_ms"] > worst[1]:
            worst = (kind, s["p99_ms"])
    return worst


def verdict(errors: int, kinds: Mapping[str, Mapping[str, float]], p99_bound_ms: float,
            required: Iterable[str] = ()) -> tuple[bool, str]:
    """Whether a step held: no error, every required kind measured, every kind's p99 below the bound."""
    if errors:
        return False, f"{errors} errors"
    missing = [k for k in required if not kinds.get(k, {}).get("count")]
    if missing:
        return False, f"no samples of {', '.join(missing)}"
    kind, p99 = worst_p99(kinds)
    if p99 >= p99_bound_ms:
        return False, f"{kind} p99 {p99:g} ms >= {p99_bound_ms:g} ms"
    return True, f"held (worst p99: {kind} {p99:g} ms)" if kind else "held"


def ladder(start: int, limit: int, steps: Iterable[int] = ()) -> list[int]:
    """Loads to try in order: the given steps within ``limit``, else doubling from ``start`` up to ``limit``
    (the last step is ``limit`` itself)."""
    given = sorted({s for s in steps if 0 < s <= limit})
    if given:
        return given
    out, n = [], max(start, 1)
    while n < limit:
        out.append(n)
        n *= 2
    out.append(limit)
    return out


@dataclass
class StepSearch:
    """Walk ``loads`` in order; stop at the first failed step. ``bisect`` more steps between the last pass and
    the first failure (each the midpoint, while they are more than ``resolution`` apart)."""

    loads: list[int]
    bisect: int = 0
    resolution: int = 1
    results: list[dict[str, Any]] = field(default_factory=list)
    _queue: list[int] = field(default_factory=list, init=False)
    _bisects_left: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._queue = list(self.loads)
        self._bisects_left = self.bisect

    @property
    def best(self) -> int | None:
        """The largest load that held."""
        held = [r["load"] for r in self.results if r["held"]]
        return max(held) if held else None

    @property
    def first_failure(self) -> int | None:
        failed = [r["load"] for r in self.results if not r["held"]]
        return min(failed) if failed else None

    def next(self) -> int | None:
        """The next load to try, or None when the search is over."""
        failure = self.first_failure
        if failure is None:
            return self._queue.pop(0) if self._queue else None
        low = self.best or 0
        if self._bisects_left <= 0 or failure - low <= self.resolution:
            return None
        self._bisects_left -= 1
        return (low + failure) // 2

    def record(self, load: int, held: bool, **info: Any) -> None:
        self.results.append({"load": load, "held": held, **info})
