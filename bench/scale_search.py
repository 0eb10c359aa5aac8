"""``python -m bench.scale_search``: the largest load one parent holds with zero errors and p99 < 10 ms.

Two searches, each a ladder of bounded steps that stops at the first step that fails (any error, or any
activity's p99 at or above 10 ms; ``bench.scale_stats.verdict``), optionally bisected between the last pass
and the first failure:

* **partitions**: for each count, a fresh parent and ``--workers`` load processes bring that many partitions
  up with every channel open, then one active phase at one of each activity per ``--period`` seconds. With
  ``--criterion errors`` a step holds with zero errors whatever its latency (the p99 verdict is still recorded);
  the default, ``p99``, also needs every p99 under 10 ms;
* **rate**: at ``--rate-partitions`` partitions (one bring-up), active phases at ever shorter periods
  (``--periods``): the aggregate packet rate the parent moves while p99 stays under 10 ms.

Each step is bounded (``--warmup`` + ``--seconds`` of activity, bring-up and teardown within ``--timeout``)
and so is the whole run (``--max-minutes``: no new step starts after it). The JSON has the machine
(``bench/machine.py``), the load average at each step, and every step's figures; the table prints as it goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmbus_proto.aio import logs

from . import machine
from .scale import ScaleSession
from .scale_stats import KINDS, StepSearch, ladder


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def step_row(phase: dict[str, Any]) -> list[str]:
    lat = phase["latency"]

    def p(kind: str) -> str:
        s = lat.get(kind)
        return f"{s['p50_ms']:.1f}/{s['p99_ms']:.1f}/{s['max_ms']:.0f}" if s else "-"
    return [f"{phase['partitions']:,}", f"{phase['period_s']:g}", f"{phase['activities_per_s']:,.0f}",
            f"{phase['packets_per_s']:,.0f}", *(p(k) for k in (*KINDS, "worker_lag")), str(phase["error_count"]),
            f"{phase['parent_cpu_cores']:.2f}", f"{phase['workers_cpu_cores']:.2f}", f"{phase['other_cpu_cores']:.2f}",
            f"{phase['parent_rss_bytes'] / 2**20:,.0f}", f"{phase['loadavg_at_start'][0]:.1f}",
            ("p99 < 10 ms" if phase["held"] else phase["verdict"])
            + ("" if phase.get("zero_errors") else "; ERRORS")]


def steps_table(title: str, phases: list[dict[str, Any]]) -> Table:
    t = Table(title=title)
    for col in ("partitions", "period s", "activities/s", "packets/s", *(f"{k} p50/p99/max ms" for k in KINDS),
                "worker lag p50/p99/max ms", "errors", "parent cores", "workers cores", "other cores",
                "parent RSS MiB", "load", "verdict"):
        t.add_column(col, justify="right")
    for ph in phases:
        t.add_row(*step_row(ph))
    return t


def _session_phase(session: ScaleSession, period: float, args: argparse.Namespace) -> dict[str, Any]:
    phase = session.active(period, args.seconds, args.warmup)
    phase["bring_up"] = {k: session.record.get(k) for k in ("open_wall_s", "channels_per_s", "rss_connected_bytes",
                                                            "rss_per_partition_bytes", "partitions_ready",
                                                            "bring_up_switch", "bring_up_parent_cpu_s")}
    return phase


def search_partitions(args: argparse.Namespace, workdir: Path, console: Console, deadline: float) -> dict[str, Any]:
    search = StepSearch(ladder(args.start, args.max_partitions, args.steps), bisect=args.bisect,
                        resolution=args.resolution)
    phases: list[dict[str, Any]] = []
    while (n := search.next()) is not None and time.monotonic() < deadline:
        console.log(f"partitions: {n:,}, one of each activity per {args.period:g} s per partition")
        session = ScaleSession(workdir / f"p{n}", n, args.workers, args.concurrency, args.timeout,
                               args.parent_log_level)
        phase: dict[str, Any]
        try:
            session.start()
            if session.error_count:
                phase = {"partitions": n, "held": False, "verdict": f"{session.error_count} errors while opening",
                         "error_samples": session.errors[:20]}
            else:
                phase = _session_phase(session, args.period, args)
        except (TimeoutError, RuntimeError, OSError) as exc:
            phase = {"partitions": n, "held": False, "verdict": f"step failed: {exc}"[:500]}
        finally:
            record = session.finish()
        phase["teardown"] = {k: record.get(k) for k in ("teardown_s", "errors", "error_samples", "parent_exit_code")}
        if record["errors"]:
            for key, why in (("held", "verdict"), ("zero_errors", "verdict_errors")):
                if phase.get(key):
                    phase[key], phase[why] = False, f"{record['errors']} errors at teardown"
        phases.append(phase)
        key = "held" if args.criterion == "p99" else "zero_errors"
        search.record(n, bool(phase.get(key)), verdict=phase.get("verdict" if key == "held" else "verdict_errors"))
        if "latency" in phase:
            console.print(steps_table(f"step {n:,} partitions", [phase]))
        else:
            console.print(f"[red]{n:,} partitions: {phase['verdict']}")
    return {"period_s": args.period, "criterion": args.criterion, "steps": phases, "largest_held": search.best,
            "first_failure": search.first_failure, "search": search.results}


def search_rate(args: argparse.Namespace, workdir: Path, console: Console, deadline: float) -> dict[str, Any]:
    n = args.rate_partitions
    console.log(f"rate: {n:,} partitions, periods {args.periods}")
    session = ScaleSession(workdir / f"rate{n}", n, args.workers, args.concurrency, args.timeout,
                           args.parent_log_level)
    phases: list[dict[str, Any]] = []
    try:
        session.start()
        for period in args.periods:
            if time.monotonic() >= deadline or session.error_count:
                break
            phase = _session_phase(session, period, args)
            phases.append(phase)
            console.print(steps_table(f"{n:,} partitions, one of each activity per {period:g} s", [phase]))
            if not phase["held"]:
                break
    finally:
        record = session.finish()
    held = [p for p in phases if p["held"]]
    best = max(held, key=lambda p: p["packets_per_s"]) if held else None
    return {"partitions": n, "steps": phases, "teardown_errors": record["errors"],
            "teardown_error_samples": record["error_samples"],
            "largest_packets_per_s_held": best["packets_per_s"] if best else None,
            "largest_held_period_s": best["period_s"] if best else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--steps", type=_ints, default=[], help="partition counts to try, e.g. 100,250,500,750,1000 "
                   "(default: doubling from --start up to --max-partitions)")
    p.add_argument("--start", type=int, default=125)
    p.add_argument("--max-partitions", type=int, default=2000)
    p.add_argument("--bisect", type=int, default=0, help="extra steps between the last pass and the first failure")
    p.add_argument("--resolution", type=int, default=50, help="stop bisecting when the gap is this small")
    p.add_argument("--period", type=float, default=5.0,
                   help="seconds in which each partition does one of each activity (partition search)")
    p.add_argument("--criterion", choices=["p99", "errors"], default="p99",
                   help="what a partition step must meet to pass: zero errors and p99 < 10 ms, or zero errors")
    p.add_argument("--rate-partitions", type=int, default=0, help="partitions for the rate search (0: none)")
    p.add_argument("--periods", type=_floats, default=[5, 2.5, 1.25, 0.6, 0.3, 0.15, 0.08],
                   help="periods to try in the rate search, slowest first")
    p.add_argument("--no-partition-search", action="store_true")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=5.0, help="activity before the measured window (s)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=10,
                   help="partitions opening at once per load process (default 10: at 50, 750 failed to open)")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on bring-up and teardown (s)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="no step starts after this")
    p.add_argument("--parent-log-level", default="info")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    logs.setup("warning")
    console = Console(width=260)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    loadavg = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="vmbus-scale-") as tmp:
        workdir = Path(tmp)
        out: dict[str, Any] = {
            "meta": {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "loadavg_at_start": loadavg, "machine": machine.describe(workdir),
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "p99_bound_ms": 10.0}}
        for line in machine.summary_lines(out["meta"]["machine"], loadavg):
            console.print(line)
        if not args.no_partition_search:
            out["partitions"] = search_partitions(args, workdir, console, deadline)
            console.print(f"largest partition count held: {out['partitions']['largest_held']} "
                          f"(first failure: {out['partitions']['first_failure']})")
        if args.rate_partitions:
            out["rate"] = search_rate(args, workdir, console, deadline)
            console.print(f"largest packet rate held at {args.rate_partitions:,} partitions: "
                          f"{out['rate']['largest_packets_per_s_held']} packets/s")
    out["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    out["meta"]["loadavg_at_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    console.log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
