"""``python -m bench.run``: VMBus channel round trips against a raw uvloop echo, and partition scale.

What is measured (one invocation, results table on stdout and JSON in ``bench/results/latest.json``):

(a) Baseline: a raw uvloop ``asyncio.Protocol`` echo server (``transport.write(data)`` in
    ``data_received``) in its own process, and a uvloop client Protocol in this process keeping a fixed
    window of messages in flight (64 x 1 KiB, 16 x 64 KiB) for ``--seconds``. Round trips = echoed bytes /
    message size. Over 127.0.0.1 TCP and over a Unix socket. This is the baseline (b) is divided by.
(a') Context only: the same server splitting the stream into length-prefixed messages (per-message work in
    Python, one joined write per read), to separate "Python touches every message" from the VMBus stack.
(b) The parent's VMBus path: a real ``parent-partition serve`` daemon (only the diagnostic echo device
    enabled) in its own process; this process is the guest (``open_bus``, negotiate, ring GPADL,
    OPENCHANNEL) and keeps the same window of requests in flight on the echo channel. 1 KiB: an in-band
    request and its completion. 64 KiB: a GPA-direct request (16 guest pages; the data travels with the
    request and comes back with the completion into guest memory). Same transports, same duration.
    Printed: rate (b), rate (a), ratio (b)/(a). Aim: ratio >= 0.5 at 1 KiB.
Scale: one parent with its five real devices; ``--workers`` processes bring up ``--partitions`` child
    partitions over TCP, each opening all five channels. Reported: channels opened per second, errors,
    parent RSS before / with all partitions / per partition, and the clean teardown time. Aim: 1,000
    partitions with zero errors.

Nothing here asserts on timing; numbers are reported as measured on the machine at hand.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop
from rich.console import Console
from rich.table import Table

from vmbus_proto.aio import logs, malloc

from . import echo_raw, vmbus_echo
from .parent import REPO_ROOT, raise_nofile, start_parent
from .profile import profile_vmbus
from .scale import run_scale
from .storage import run_storage

SIZES = (1024, 64 * 1024)
TRANSPORTS = ("tcp", "unix")
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "latest.json"
AIM_RATIO_1K = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts and short runs (smoke test)")
    p.add_argument("--seconds", type=float, help="duration of each echo measurement (default 2, quick 1)")
    p.add_argument("--repeat", type=int, help="measurements per echo cell, median reported (default 3, quick 1)")
    p.add_argument("--window-small", type=int, default=64, help="1 KiB messages in flight (default 64)")
    p.add_argument("--window-large", type=int, default=16, help="64 KiB messages in flight (default 16)")
    p.add_argument("--partitions", type=int, help="child partitions in the scale test (default 1000, quick 50)")
    p.add_argument("--workers", type=int, default=4, help="load processes for the scale test (default 4)")
    p.add_argument("--concurrency", type=int, default=50, help="partitions coming up at once per worker")
    p.add_argument("--only", choices=["echo", "scale", "storage"], help="run one part only")
    p.add_argument("--profile", action="store_true",
                   help="also sample the parent and the guest with py-spy during an extra VMBus 1 KiB TCP run")
    p.add_argument("--parent-log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the daemons' log level (default info, as deployed)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 2.0)
    args.repeat = max(1, args.repeat if args.repeat is not None else (1 if args.quick else 3))
    args.partitions = args.partitions if args.partitions is not None else (50 if args.quick else 1000)
    args.warmup = 0.2 if args.quick else 0.5
    return args


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose rate is the median (lower median for an even count), with every sample's rate."""
    ordered = sorted(runs, key=lambda r: r["rtt_per_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["rtt_per_s"] = statistics.median(r["rtt_per_s"] for r in runs)
    pick["mb_per_s"] = statistics.median(r["mb_per_s"] for r in runs)
    pick["samples_rtt_per_s"] = [round(r["rtt_per_s"], 1) for r in runs]
    return pick


def run_echo(args: argparse.Namespace, workdir: Path, console: Console) -> list[dict[str, Any]]:
    server = echo_raw.EchoServerProcess(workdir / "echo")
    parent = None
    rows: list[dict[str, Any]] = []
    try:
        parent = start_parent(workdir / "echo-parent", {"echo"}, log_level=args.parent_log_level)
        n = 0
        for size in SIZES:
            window = args.window_small if size <= vmbus_echo.INBAND_MAX else args.window_large
            for transport in TRANSPORTS:
                raw, framed, vmbus = [], [], []
                # Interleave (a), (a') and (b) so slow drift on the machine hits all of them alike.
                for _ in range(args.repeat):
                    raw.append(uvloop.run(echo_raw.measure(server.urls[transport], size, window, args.seconds,
                                                           args.warmup, server.pid)))
                    framed.append(uvloop.run(echo_raw.measure(server.urls[f"framed_{transport}"], size, window,
                                                              args.seconds, args.warmup, server.pid)))
                    n += 1
                    vmbus.append(uvloop.run(vmbus_echo.measure(parent.endpoint(transport), size, window,
                                                               args.seconds, args.warmup, parent.pid,
                                                               name=f"bench-echo-{n}")))
                a, a2, b = _median_run(raw), _median_run(framed), _median_run(vmbus)
                row = {"size": size, "transport": transport, "window": window, "packet": b["packet"],
                       "raw": a, "framed": a2, "vmbus": b, "ratio": b["rtt_per_s"] / a["rtt_per_s"],
                       "ratio_vs_framed": b["rtt_per_s"] / a2["rtt_per_s"]}
                rows.append(row)
                console.log(f"{size // 1024} KiB {transport}: (a) {a['rtt_per_s']:,.0f}/s  "
                            f"(a') {a2['rtt_per_s']:,.0f}/s  (b) {b['rtt_per_s']:,.0f}/s  ratio {row['ratio']:.3f}")
    finally:
        server.stop()
        if parent is not None:
            code = parent.stop()
            errors = [x for x in parent.log_lines() if x.get("level") == "error"]
            if code != 0 or errors:
                console.log(f"[red]echo parent exited {code} with {len(errors)} error lines; see {parent.log_path}")
    return rows


def echo_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Round trips: (a) raw uvloop echo vs (b) VMBus channel through the parent "
                    "(CPU µs per round trip; other CPU = cores used by other processes meanwhile)")
    for col in ("size", "transport", "in flight", "(b) packet", "(a) raw rt/s", "(a') framed rt/s",
                "(b) VMBus rt/s", "(b) MB/s", "(b)/(a)", "(b)/(a')", "(a) server µs", "(b) parent µs",
                "(b) guest µs", "other CPU"):
        t.add_column(col, justify="left" if col in ("transport", "(b) packet") else "right")
    for r in rows:
        a, a2, b = r["raw"], r["framed"], r["vmbus"]
        t.add_row(f"{r['size'] // 1024} KiB", r["transport"], str(r["window"]), r["packet"],
                  f"{a['rtt_per_s']:,.0f}", f"{a2['rtt_per_s']:,.0f}", f"{b['rtt_per_s']:,.0f}",
                  f"{b['mb_per_s']:,.0f}", f"{r['ratio']:.3f}", f"{r['ratio_vs_framed']:.3f}",
                  f"{a.get('server_us_per_rt', 0):.2f}", f"{b.get('server_us_per_rt', 0):.2f}",
                  f"{b.get('client_us_per_rt', 0):.2f}", f"{max(a['other_cpu'], b['other_cpu']):.2f}")
    return t


def scale_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"Scale: {s['partitions']} child partitions, {s['workers']} processes, {s['transport']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    mib = 1024 * 1024
    for name, value in (
        ("partitions with all channels open", f"{s['partitions_ready']:,} / {s['partitions']:,}"),
        ("channels opened (guest / parent log)", f"{s['channels_opened']:,} / {s['channels_opened_parent_log']:,}"),
        ("wall time, first connect to last open", f"{s['open_wall_s']:.2f} s"),
        ("channels opened per second", f"{s['channels_per_s']:,.0f}"),
        ("parent CPU while opening", f"{s['parent_cpu_during_open']:.0%}"),
        ("parent RSS before", f"{s['rss_before_bytes'] / mib:.1f} MiB"),
        ("parent RSS with all connected", f"{s['rss_connected_bytes'] / mib:.1f} MiB"),
        ("parent RSS per partition", f"{s['rss_per_partition_bytes'] / 1024:.1f} KiB"),
        ("parent RSS after teardown", f"{s['rss_after_teardown_bytes'] / mib:.1f} MiB"),
        ("parent open files before / connected / after", f"{s['parent_fds_before']:,} / "
         f"{s['parent_fds_connected']:,} / {s['parent_fds_after_teardown']:,}"),
        ("clean teardown (all partitions)", f"{s['teardown_s']:.2f} s"),
        ("errors", str(s["errors"])),
    ):
        t.add_row(name, value)
    return t


def storage_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="storage: StorVSC over VMBus vs fio on the same file")
    for col in ("job", "transport", "fio IOPS", "fio MB/s", "VMBus IOPS", "VMBus MB/s", "ratio", "p50 us",
                "p99 us", "parent µs/io", "guest µs/io"):
        t.add_column(col, justify="right")
    for r in rows:
        f, v = r["fio"], r["vmbus"]
        t.add_row(f"{r['rw']} {r['bs']} qd{r['iodepth']}", r["transport"], f"{f['iops']:,.0f}",
                  f"{f['bw_bytes'] / 1e6:,.0f}", f"{v['iops']:,.0f}", f"{v['bw_bytes'] / 1e6:,.0f}",
                  f"{r['ratio_iops']:.3f}", f"{v['clat_us_p50']:,.0f}", f"{v['clat_us_p99']:,.0f}",
                  f"{v.get('parent_us_per_io', 0):,.1f}", f"{v.get('guest_us_per_io', 0):,.1f}")
    return t


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "uvloop": importlib.metadata.version("uvloop"), "memory_bytes": psutil.virtual_memory().total}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    malloc.tune()  # the in-process guest of the echo measurements, like the CLIs
    logs.setup("warning")
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # keep the tables whole in logs and pipes
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "loadavg_at_start": list(os.getloadavg()),
                 "machine": machine(),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "aims": {"ratio_1k": AIM_RATIO_1K, "scale_partitions": args.partitions, "scale_errors": 0},
    }
    with tempfile.TemporaryDirectory(prefix="vmbus-bench-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "echo"):
            rows = run_echo(args, workdir, console)
            results["echo"] = rows
            console.print(echo_table(rows))
        if args.only in (None, "scale"):
            console.log(f"scale: {args.partitions} partitions from {args.workers} processes over TCP")
            scale = run_scale(workdir / "scale", args.partitions, args.workers, args.concurrency,
                              parent_log_level=args.parent_log_level)
            results["scale"] = scale
            console.print(scale_table(scale))
            for e in scale["error_samples"][:5]:
                console.print(f"[red]scale error: {e}")
        if args.only in (None, "storage"):
            console.log("storage: child-partition load storage vs fio on the same image file")
            rows_st = run_storage(workdir / "storage", args.seconds * 2, args.repeat)
            results["storage"] = rows_st
            console.print(storage_table(rows_st))
        if args.profile:
            console.log("profiling the parent and the guest during a VMBus 1 KiB TCP run (py-spy)")
            results["profile"] = profile_vmbus(workdir, args.json.parent, max(args.seconds, 3.0),
                                               args.window_small)
            for who in ("parent", "guest"):
                prof = results["profile"].get(who, {})
                if "self" in prof:
                    console.print(f"[bold]{who}: top self samples")
                    for frame, pct in prof["self"][:12]:
                        console.print(f"  {pct:5.1f}%  {frame}")
                elif prof:
                    console.print(f"[red]{who} profile: {prof.get('error')}")
    summary: dict[str, Any] = {}
    for r in results.get("echo", []):
        summary[f"ratio_{r['size'] // 1024}k_{r['transport']}"] = round(r["ratio"], 4)
    for r in results.get("storage", []):
        summary[f"storage_{r['rw']}_{r['bs']}_{r['transport']}_iops"] = round(r["vmbus"]["iops"])
    if "scale" in results:
        summary["scale_errors"] = results["scale"]["errors"]
        summary["channels_per_s"] = round(results["scale"]["channels_per_s"], 1)
    results["summary"] = summary
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_at_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.log(f"results written to {args.json} ({results['meta']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
