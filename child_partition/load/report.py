"""What ``child-partition load`` shows and writes: the results document (JSON, mergeable across processes and
machines), the summary table (per workload and operation: ops, ops/s, MB/s, errors, latency p50/p90/p99/p99.9/max,
as wrk and fio print them), and the live progress line (rich on a terminal, a plain line every few seconds
otherwise, on stderr so stdout keeps only the results)."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vmbus_proto.aio.cli import package_version

from .stats import FORMAT, SUMMARY, MergeError, WorkloadStats, union_seconds

TOOL = "child-partition load"
PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
SHOW_ERRORS = 10


def machine() -> dict[str, Any]:
    """The CPU model and core count, as fio's and wrk's reports name the machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count() or 1, "platform": platform.platform()}


def versions() -> dict[str, str]:
    def of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"vmbus-emu": package_version(), "python": platform.python_version(), "hdrh": of("hdrh"),
            "uvloop": of("uvloop")}


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


def this_run(tag: str, start: float, end: float, window: tuple[float, float]) -> dict[str, Any]:
    """One process's run: who, where, when (wall clock, seconds since the epoch) and its measured window."""
    return {"tag": tag, "host": socket.gethostname(), "pid": os.getpid(), "start": start, "end": end,
            "window": list(window), "machine": machine(), "versions": versions()}


@dataclass(slots=True)
class Results:
    """A run's results: one process's, or merged from several processes or machines."""

    job: dict[str, Any]
    workloads: dict[str, WorkloadStats]
    runs: list[dict[str, Any]]
    tag: str
    interrupted: str | None = None
    notes: list[str] = field(default_factory=list)  # run-level errors (a child process that failed)

    @property
    def seconds(self) -> float:
        return union_seconds([(float(r["window"][0]), float(r["window"][1])) for r in self.runs])

    def errors(self) -> list[str]:
        out = list(self.notes)
        for key, w in self.workloads.items():
            out += [f"{key}: {e}" for e in w.errors]
            out += [f"{key}: {op}: {m}" for op, s in w.ops.items() for m in s.messages]
        return out

    @property
    def failed(self) -> bool:
        return bool(self.notes) or any(w.error_count or w.failed_ops or w.partitions_ok < w.partitions
                                       for w in self.workloads.values())

    def to_json(self) -> dict[str, Any]:
        seconds = self.seconds
        return {"tool": TOOL, "format": FORMAT, "job": self.job, "tag": self.tag, "host": socket.gethostname(),
                "pid": os.getpid(), "versions": versions(), "machine": machine(),
                "start": iso(min((r["start"] for r in self.runs), default=time.time())),
                "end": iso(max((r["end"] for r in self.runs), default=time.time())),
                "seconds": seconds, "interrupted": self.interrupted, "errors": self.errors(),
                "tags": sorted({str(r["tag"]) for r in self.runs}), "runs": self.runs, "notes": self.notes,
                "workloads": {k: w.to_json(seconds) for k, w in self.workloads.items()}}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Results:
        if not isinstance(doc, dict) or doc.get("tool") != TOOL:
            raise MergeError(f"{where}: not a results file of {TOOL} (written with --json)")
        if doc.get("format") != FORMAT:
            raise MergeError(f"{where}: results format {doc.get('format')!r}, this version reads {FORMAT}")
        try:
            return cls(job=dict(doc["job"]), runs=list(doc["runs"]), tag=str(doc["tag"]),
                       interrupted=doc.get("interrupted"), notes=[str(n) for n in doc.get("notes", [])],
                       workloads={str(k): WorkloadStats.from_json(v) for k, v in doc["workloads"].items()})
        except MergeError as exc:
            raise MergeError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MergeError(f"{where}: the results are incomplete ({type(exc).__name__}: {exc})") from None

    def merge(self, other: Results, where: str = "") -> None:
        """Add another run of the same job (its counts, histograms, measured window)."""
        if other.job != self.job:
            diff = ", ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in differences(self.job, other.job)[:4])
            raise MergeError(f"{where or 'results'}: a different job ({diff}): only runs of the same job merge")
        for key, w in other.workloads.items():
            if key in self.workloads:
                self.workloads[key].merge(w)
            else:
                self.workloads[key] = w
        self.runs += other.runs
        self.notes += other.notes
        self.interrupted = self.interrupted or other.interrupted


def differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where two jobs differ: (dotted path, one value, the other)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [(path, a, b)]


def human_us(usec: float) -> str:
    if usec >= 1_000_000:
        return f"{usec / 1e6:.2f}s"
    if usec >= 1000:
        return f"{usec / 1000:.2f}ms"
    return f"{usec:.0f}µs"


def summary(doc: dict[str, Any], console: Console,
            renderers: dict[str, Callable[[dict[str, Any], Console], None]]) -> None:
    """The summary table from a results document, then each workload's own lines and the errors."""
    seconds = doc["seconds"]
    tags = ", ".join(doc["tags"])
    runs = len(doc["runs"])
    console.print(f"{TOOL}: {seconds:.2f}s measured, {runs} process{'es' if runs != 1 else ''}, tag {tags}"
                  + (f", interrupted by {doc['interrupted']}" if doc["interrupted"] else ""))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("workload", "op", "ops", "ops/s", "MB/s", "errors", *(f"p{q:g}" for q in SUMMARY), "max"):
        table.add_column(col, justify="left" if col in ("workload", "op") else "right")
    for key, w in doc["workloads"].items():
        for op, s in w["ops"].items():
            lat = s["latency_us"]
            table.add_row(key, op, f"{s['ops']:,}", f"{s['ops_per_s']:,.1f}", f"{s['bytes_per_s'] / 1e6:,.2f}",
                          f"{s['errors']:,}", *(human_us(lat[f"p{q:g}"]) for q in SUMMARY), human_us(lat["max"]))
    console.print(table)
    for key, w in doc["workloads"].items():
        render = renderers.get(key)
        if render is not None:
            render(w, console)
        late = sum(s["late"] for s in w["ops"].values())
        console.print(f"{key}: partitions: {w['partitions_ok']} ok, {w['partitions'] - w['partitions_ok']} failed"
                      + (f"; {late:,} operations sent late (their latency counts from the intended time)"
                         if late else ""))
    errors = doc["errors"]
    for err in errors[:SHOW_ERRORS]:
        console.print(Text(f"error: {err}", style="red"))
    if len(errors) > SHOW_ERRORS:
        console.print(f"... and {len(errors) - SHOW_ERRORS} more errors (all of them with --json)")


class Progress:
    """The live line: elapsed and remaining time, and per workload ops/s, MB/s and errors since the last
    update. ``snapshot`` gives the live totals (warm-up included) as {key: (ops, bytes, errors)}."""

    def __init__(self, quiet: bool, snapshot: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        self.console = Console(file=sys.stderr, highlight=False)
        self.quiet = quiet
        self.snapshot = snapshot
        self.live: Live | None = None
        self.last: dict[str, tuple[int, int, int]] = {}
        self.last_t = time.monotonic()
        self.last_plain = 0.0
        self.phase = "starting"
        self.deadline: float | None = None
        self.t0 = time.monotonic()

    def __enter__(self) -> Progress:
        if not self.quiet and self.console.is_terminal:
            self.live = Live(Text(""), console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def line(self) -> str:
        now = time.monotonic()
        snap = self.snapshot()
        dt = max(1e-9, now - self.last_t)
        parts = [f"{now - self.t0:6.1f}s {self.phase}"]
        if self.deadline is not None:
            parts[0] += f", {max(0.0, self.deadline - now):.1f}s left"
        for key, (ops, nbytes, errors) in snap.items():
            o, b, _ = self.last.get(key, (0, 0, 0))
            parts.append(f"{key}: {(ops - o) / dt:,.0f} ops/s {(nbytes - b) / dt / 1e6:,.1f} MB/s"
                         + (f" {errors:,} errors" if errors else ""))
        self.last, self.last_t = snap, now
        return " | ".join(parts)

    def update(self) -> None:
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(Text(self.line()))
        elif time.monotonic() - self.last_plain >= PLAIN_EVERY:
            self.last_plain = time.monotonic()
            print(f"{TOOL}: {self.line()}", file=sys.stderr, flush=True)
