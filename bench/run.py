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
    request and its completion, driven from the completions as the raw client is (``on_packet``,
    ``try_sendpacket``). 64 KiB: a GPA-direct request (16 guest pages; the data travels with the
    request and comes back with the completion into guest memory). Same transports, same duration.
    Printed: rate (b), rate (a), ratio (b)/(a). Aim: ratio >= 0.5 at 1 KiB.
Scale: one parent with its real devices; ``--workers`` processes bring up ``--partitions`` child
    partitions over TCP, each opening all their channels. Reported: channels opened per second, errors,
    parent RSS before / with all partitions / per partition, and the clean teardown time. Then every
    partition is lightly active for ``--scale-seconds`` (one 4 KiB write and read, ping, small DIRT, key and
    mouse event each per ``--scale-period``): latency p50/p99/max per kind, packets/s, CPU of the parent and
    of the workers. Aim: 1,000 partitions with zero errors. The search for the largest load held is
    ``python -m bench.scale_search``.

Every result file and the printed summary start with what tells machines apart (``bench/machine.py``: CPU,
kernel, mitigations, clocksource, filesystem, Python build, and calibrations of Python speed, syscall cost and
process wake-up), and every measurement carries each process's CPU, syscalls and context switches per
operation (``bench/meter.py``) and the steal time. Rates are medians over ``--repeat`` runs, with the range.

Nothing here asserts on timing; numbers are reported as measured on the machine at hand.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

from vmbus_proto.aio import logs, malloc

from . import echo_raw, emulated_vs_synthetic, machine, net_frames, net_tap, net_veth, video, vmbus_echo, web
from .input import input_table, run_input
from .parent import REPO_ROOT, raise_nofile, start_parent
from .profile import profile_vmbus
from .scale import run_scale
from .scale_search import steps_table
from .scale_stats import KINDS
from .storage import CACHE_MODES, JOBS, run_storage

SIZES = (1024, 64 * 1024)
# "shared": the Unix socket with the guest's memory shared (docs/protocol.md §14): rings and data in the memfd,
# only events on the socket; "unix" streams over the same socket. The raw echo's baseline for both is Unix.
TRANSPORTS = ("tcp", "unix", "shared")
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
    p.add_argument("--scale-seconds", type=float,
                   help="measured seconds of the scale test's active phase (default 10, quick 3; 0: none)")
    p.add_argument("--scale-period", type=float,
                   help="seconds in which each partition does one of each activity (default 5, quick 1)")
    p.add_argument("--only", choices=["echo", "scale", "storage", "emulated", "network", "input", "video",
                                      "web"],
                   help="run one part only")
    p.add_argument("--storage-jobs", default=",".join(j[0] for j in JOBS),
                   help="storage jobs to run, comma-separated (default: all of randread,randwrite,read,write)")
    p.add_argument("--cache", choices=CACHE_MODES, default="warm",
                   help="storage page cache: 'warm' (default; fio --invalidate=0, the image re-read before any run "
                        "that finds it not all cached) or 'fio-default' (fio drops the cache before its runs, "
                        "nothing re-warms: the behaviour before 2026-12-02, kept to reproduce it)")
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
    args.scale_seconds = args.scale_seconds if args.scale_seconds is not None else (3.0 if args.quick else 10.0)
    args.scale_period = args.scale_period if args.scale_period is not None else (1.0 if args.quick else 5.0)
    args.storage_jobs = [j for j in args.storage_jobs.split(",") if j]
    unknown = set(args.storage_jobs) - {j[0] for j in JOBS}
    if unknown:
        p.error(f"unknown storage jobs: {', '.join(sorted(unknown))}")
    return args


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs (the rate's range too), every sample's rate, and each counter's median."""
    ordered = sorted(runs, key=lambda r: r["rtt_per_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    for key in ("rtt_per_s", "mb_per_s", "server_us_per_rt", "client_us_per_rt", "other_cpu", "steal_frac"):
        if key in pick:
            pick[key] = statistics.median(r[key] for r in runs)
    pick["samples_rtt_per_s"] = [round(r["rtt_per_s"], 1) for r in runs]
    pick["rtt_per_s_min"], pick["rtt_per_s_max"] = ordered[0]["rtt_per_s"], ordered[-1]["rtt_per_s"]
    if all("per_op" in r for r in runs):
        pick["per_op"] = {who: {k: statistics.median(r["per_op"][who][k] for r in runs) for k in pick["per_op"][who]}
                          for who in pick["per_op"]}
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
                    socket_kind = "unix" if transport == "shared" else transport
                    raw.append(uvloop.run(echo_raw.measure(server.urls[socket_kind], size, window, args.seconds,
                                                           args.warmup, server.pid)))
                    framed.append(uvloop.run(echo_raw.measure(server.urls[f"framed_{socket_kind}"], size, window,
                                                              args.seconds, args.warmup, server.pid)))
                    n += 1
                    vmbus.append(uvloop.run(vmbus_echo.measure(parent.endpoint(transport), size, window,
                                                               args.seconds, args.warmup, parent.pid,
                                                               name=f"bench-echo-{n}", shared=transport == "shared")))
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


def _k(x: float) -> str:
    return f"{x / 1000:,.1f}k" if x >= 10_000 else f"{x:,.0f}"


def echo_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Round trips: (a) raw uvloop echo vs (b) VMBus channel through the parent (medians, with the "
                    "range over the repeats; CPU µs per round trip; other CPU = cores used by other processes "
                    "meanwhile)")
    for col in ("size", "transport", "in flight", "(b) packet", "(a) raw rt/s", "(a) range", "(a') framed rt/s",
                "(b) VMBus rt/s", "(b) range", "(b) MB/s", "(b)/(a)", "(b)/(a')", "(a) server µs", "(b) parent µs",
                "(b) guest µs", "other CPU"):
        t.add_column(col, justify="left" if col in ("transport", "(b) packet") else "right")
    for r in rows:
        a, a2, b = r["raw"], r["framed"], r["vmbus"]
        t.add_row(f"{r['size'] // 1024} KiB", r["transport"], str(r["window"]), r["packet"],
                  f"{a['rtt_per_s']:,.0f}", f"{_k(a['rtt_per_s_min'])}-{_k(a['rtt_per_s_max'])}",
                  f"{a2['rtt_per_s']:,.0f}", f"{b['rtt_per_s']:,.0f}",
                  f"{_k(b['rtt_per_s_min'])}-{_k(b['rtt_per_s_max'])}",
                  f"{b['mb_per_s']:,.0f}", f"{r['ratio']:.3f}", f"{r['ratio_vs_framed']:.3f}",
                  f"{a.get('server_us_per_rt', 0):.2f}", f"{b.get('server_us_per_rt', 0):.2f}",
                  f"{b.get('client_us_per_rt', 0):.2f}", f"{max(a['other_cpu'], b['other_cpu']):.2f}")
    return t


def counters_table(results: dict[str, Any]) -> Table:
    """Per operation and process: CPU, read/write syscalls, context switches, run-queue wait (medians)."""
    t = Table(title="Per operation, each process (medians): CPU µs user/sys, read- and write-family syscalls "
                    "(/proc/PID/io), voluntary / involuntary context switches, run-queue wait µs, minor page "
                    "faults; steal")
    for col in ("job", "process", "CPU µs", "user / sys", "read sc", "write sc", "vol cs", "invol cs",
                "runq µs", "minor flt", "steal"):
        t.add_column(col, justify="left" if col in ("job", "process") else "right")

    def add(job: str, who: str, c: dict[str, float], steal: float) -> None:
        t.add_row(job, who, f"{c['cpu_us']:.1f}", f"{c['user_us']:.1f} / {c['sys_us']:.1f}",
                  f"{c['read_syscalls']:.2f}", f"{c['write_syscalls']:.2f}", f"{c['vol_cs']:.3f}",
                  f"{c['invol_cs']:.3f}", f"{c['runq_wait_us']:.1f}", f"{c['minor_faults']:.2f}", f"{steal:.1%}")

    for r in results.get("echo", []):
        job = f"echo {r['size'] // 1024} KiB {r['transport']}"
        for part, names in (("raw", {"server": "(a) echo server", "client": "(a) client"}),
                            ("vmbus", {"server": "(b) parent", "client": "(b) guest"})):
            for key, label in names.items():
                if key in r[part].get("per_op", {}):
                    add(job, label, r[part]["per_op"][key], r[part].get("steal_frac", 0.0))
    for r in results.get("storage", []):
        job = f"{r['rw']} {r['bs']} qd{r['iodepth']} {r['transport']}"
        for who, c in r["vmbus"].get("per_io", {}).items():
            add(job, who, c, r["vmbus"].get("steal_frac", 0.0))
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
    t = Table(title="storage: StorVSC over VMBus vs fio on the same file (medians; IOPS range over the repeats; "
                    "disk: reads inline / refused by RWF_NOWAIT / via the pool, all runs)")
    for col in ("job", "transport", "fio IOPS", "fio range", "fio µs/io", "VMBus IOPS", "VMBus range",
                "VMBus MB/s", "ratio", "p50 us", "p99 us", "parent µs/io", "guest µs/io", "cached before",
                "disk reads"):
        t.add_column(col, justify="right")
    for r in rows:
        f, v = r["fio"], r["vmbus"]
        disks = [d for d in v.get("samples_disk", []) if d and "reads_inline" in d]
        reads = "/".join(str(sum(int(d[k]) for d in disks)) for k in ("reads_inline", "reads_nowait_refused",
                                                                         "reads_pool")) if disks else "-"
        cached = v.get("samples_cache_resident_before", [])
        t.add_row(f"{r['rw']} {r['bs']} qd{r['iodepth']}", r["transport"], f"{f['iops']:,.0f}",
                  f"{_k(f['iops_min'])}-{_k(f['iops_max'])}", f"{f.get('fio_us_per_io', 0):,.1f}",
                  f"{v['iops']:,.0f}", f"{_k(v['iops_min'])}-{_k(v['iops_max'])}", f"{v['bw_bytes'] / 1e6:,.0f}",
                  f"{r['ratio_iops']:.3f}", f"{v['clat_us_p50']:,.0f}", f"{v['clat_us_p99']:,.0f}",
                  f"{v.get('parent_us_per_io', 0):,.1f}", f"{v.get('guest_us_per_io', 0):,.1f}",
                  f"{min(cached):.0%}-{max(cached):.0%}" if cached else "-", reads)
    return t


def network_table(net: dict[str, Any]) -> Table:
    t = Table(title="network: iperf3 TCP between two namespaces (medians, range over the repeats; CPU % of one "
                    "core per process, iperf3's accounting; server CPU s per Gbit from /proc)")
    for col in ("path", "direction", "Gbit/s", "range", "retransmits", "client CPU %", "server CPU %",
                "server CPU s/Gbit"):
        t.add_column(col, justify="left" if col in ("path", "direction") else "right")
    for direction in ("forward", "reverse"):
        r = net[direction]
        t.add_row(net["path"], "A->B" if direction == "forward" else "B->A (-R)", f"{r['gbit_per_s']:.2f}",
                  f"{r['gbit_per_s_min']:.2f}-{r['gbit_per_s_max']:.2f}", f"{r['retransmits']:,}",
                  f"{r['client_cpu_pct']:.0f}", f"{r['server_cpu_pct']:.0f}", f"{r['server_cpu_s_per_gbit']}")
    return t


def network_tap_table(taps: dict[str, dict[str, Any]], veth: dict[str, Any]) -> Table:
    t = Table(title="network: iperf3 TCP between two TAP-attached children through the VMBus switch, Unix socket in "
                    "each memory mode (medians, range; ratio to veth; CPU seconds per Gbit of each process)")
    for col in ("memory", "direction", "Gbit/s", "range", "ratio to veth", "retransmits", "parent s/Gbit",
                "sender child s/Gbit", "receiver child s/Gbit"):
        t.add_column(col, justify="left" if col in ("memory", "direction") else "right")
    for (mode, tap), direction in itertools.product(taps.items(), ("forward", "reverse")):
        if "error" in tap:
            continue
        r = tap[direction]
        base = veth.get(direction, {}).get("gbit_per_s")
        cpu = r["cpu_s_per_gbit"]
        send, recv = ("child_a", "child_b") if direction == "forward" else ("child_b", "child_a")
        t.add_row(mode, "A->B" if direction == "forward" else "B->A (-R)", f"{r['gbit_per_s']:.2f}",
                  f"{r['gbit_per_s_min']:.2f}-{r['gbit_per_s_max']:.2f}",
                  f"{r['gbit_per_s'] / base:.3f}" if base else "-", f"{r['retransmits']:,}",
                  f"{cpu['parent']}", f"{cpu[send]}", f"{cpu[recv]}")
    return t


def describe_machine(workdir: Path) -> dict[str, Any]:
    return {**machine.describe(workdir), "uvloop": importlib.metadata.version("uvloop"),
            "psutil": importlib.metadata.version("psutil")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    malloc.tune()  # the in-process guest of the echo measurements, like the CLIs
    logs.setup("warning")
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # keep the tables whole in logs and pipes
    started = time.monotonic()
    loadavg = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="vmbus-bench-") as tmp:
        workdir = Path(tmp)
        results: dict[str, Any] = {
            "meta": {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "loadavg_at_start": loadavg,
                     "machine": describe_machine(workdir),
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
            "aims": {"ratio_1k": AIM_RATIO_1K, "scale_partitions": args.partitions, "scale_errors": 0},
        }
        for line in machine.summary_lines(results["meta"]["machine"], loadavg):
            console.print(line)
        if args.only in (None, "echo"):
            rows = run_echo(args, workdir, console)
            results["echo"] = rows
            console.print(echo_table(rows))
        if args.only in (None, "scale"):
            console.log(f"scale: {args.partitions} partitions from {args.workers} processes over TCP")
            scale = run_scale(workdir / "scale", args.partitions, args.workers, args.concurrency,
                              parent_log_level=args.parent_log_level, period=args.scale_period,
                              seconds=args.scale_seconds, warmup=2.0 if args.quick else 5.0)
            results["scale"] = scale
            console.print(scale_table(scale))
            if scale["active"]:
                console.print(steps_table("scale: every partition lightly active (latency p50/p99/max)",
                                          scale["active"]))
            for e in scale["error_samples"][:5]:
                console.print(f"[red]scale error: {e}")
        if args.only in (None, "storage"):
            console.log("storage: child-partition load storage vs fio on the same image file")
            rows_st, image = run_storage(workdir / "storage", args.seconds * 2, args.repeat, args.cache,
                                         args.storage_jobs)
            results["storage"] = rows_st
            results["storage_image"] = image
            probe = image["nowait_probe"]
            console.log(f"image on {image['fs']['fstype']}: {image['resident_after_prefill']:.0%} cached after the "
                        "prefill, "
                        f"{image['resident_after_warm']:.0%} after reading it through ({image['warm_s']} s); "
                        f"RWF_NOWAIT probe: {probe['ok']:,} hits / {probe['eagain']:,} EAGAIN / "
                        f"{probe['unsupported']:,} unsupported of {probe['reads']:,}, "
                        f"{probe.get('ns_per_read', 0):,} ns per read")
            console.print(storage_table(rows_st))
        if args.only in (None, "emulated"):
            console.log("emulated: 4 KiB random reads and writes at QD1, the emulated IDE disk vs StorVSC (lab 6)")
            results["emulated"] = emu = emulated_vs_synthetic.run_emulated(workdir / "emulated",
                                                                           50 if args.quick else 200, args.repeat)
            console.print(emulated_vs_synthetic.emulated_table(emu))
        if args.only in (None, "network"):
            console.log(f"network: iperf3 over a veth pair between two namespaces, {args.seconds:g} s per run")
            veth = net_veth.run_veth(args.seconds, args.repeat)
            results["network"] = {"veth": veth}
            if "error" in veth:
                console.print(f"[red]network baseline not measured: {veth['error']}")
            else:
                console.print(network_table(veth))
            console.log("network: the same iperf3 between two TAP-attached children through the VMBus switch, "
                        "streaming and in shared memory")
            taps = {mode: net_tap.run_tap(args.seconds, args.repeat, workdir / f"net-tap-{mode}", mode)
                    for mode in ("stream", "shared")}
            results["network"]["vmbus_tap"], results["network"]["vmbus_tap_shared"] = taps["stream"], taps["shared"]
            for mode, tap in taps.items():
                if "error" in tap:
                    console.print(f"[red]VMBus network ({mode}) not measured: {tap['error']}")
            console.print(network_tap_table(taps, veth))
            console.log("network: 64-byte frames between two children through the switch vs the raw uvloop echo")
            results["network"]["frames"] = frames = net_frames.run_frames(workdir / "frames", args.seconds, args.repeat)
            console.print(net_frames.frames_table(frames))
        if args.only in (None, "input"):
            console.log("input: keyboard events and mouse reports parent -> child vs the raw uvloop echo")
            results["input"] = run_input(workdir / "input", args.seconds, args.repeat)
            console.print(input_table(results["input"]))
        if args.only in (None, "video"):
            console.log("video: full 1024x768 frames and 64x64 DIRT from one child to the parent vs the raw echo")
            results["video"] = video_res = video.run_video(workdir / "video", args.seconds, args.repeat)
            console.print(video.video_table(video_res))
        if args.only in (None, "web"):
            console.log("web: screen updates to one web console websocket client, beside what the parent receives")
            results["web"] = web_res = web.run_web(workdir / "web", args.seconds, args.repeat)
            console.print(web.web_table(web_res))
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
    if results.get("echo") or results.get("storage"):
        console.print(counters_table(results))
    summary: dict[str, Any] = {}
    for r in results.get("echo", []):
        summary[f"ratio_{r['size'] // 1024}k_{r['transport']}"] = round(r["ratio"], 4)
        summary[f"parent_us_{r['size'] // 1024}k_{r['transport']}"] = round(r["vmbus"].get("server_us_per_rt", 0), 2)
    for r in results.get("storage", []):
        key = f"storage_{r['rw']}_{r['bs']}_{r['transport']}"
        summary[f"{key}_iops"] = round(r["vmbus"]["iops"])
        summary[f"{key}_iops_range"] = [r["vmbus"]["iops_min"], r["vmbus"]["iops_max"]]
        summary[f"{key}_parent_us_per_io"] = round(r["vmbus"].get("parent_us_per_io", 0), 1)
    if "emulated" in results:
        summary["emulated_synthetic_over_string_pio"] = results["emulated"]["synthetic_over_emulated_string_ops_ratio"]
    veth = results.get("network", {}).get("veth", {})
    if "forward" in veth:
        summary["network_veth_gbit_per_s"] = [veth["forward"]["gbit_per_s"], veth["reverse"]["gbit_per_s"]]
    tap = results.get("network", {}).get("vmbus_tap", {})
    if "forward" in tap:
        summary["network_vmbus_tap_gbit_per_s"] = [tap["forward"]["gbit_per_s"], tap["reverse"]["gbit_per_s"]]
        if "forward" in veth:
            summary["network_vmbus_tap_ratio"] = [round(tap[d]["gbit_per_s"] / veth[d]["gbit_per_s"], 4)
                                                  for d in ("forward", "reverse")]
    cal = results["meta"]["machine"]["calibration"]
    summary["machine"] = (f"{results['meta']['machine']['cpu'].get('model_name', '?')}, kernel "
                          f"{results['meta']['machine']['kernel']}, {cal['python_loops_per_s']:,} Python loops/s, "
                          f"getppid {cal['syscall_getppid_ns']:.0f} ns, load {loadavg[0]:.2f}")
    if "scale" in results:
        summary["scale_errors"] = results["scale"]["errors"]
        summary["channels_per_s"] = round(results["scale"]["channels_per_s"], 1)
        for phase in results["scale"]["active"]:
            summary["scale_active_packets_per_s"] = phase["packets_per_s"]
            summary["scale_active_worst_p99_ms"] = max(s["p99_ms"] for k, s in phase["latency"].items()
                                                       if k in KINDS)
    results["summary"] = summary
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_at_end"] = list(os.getloadavg())
    results["meta"]["calibration_at_end"] = end = machine.calibrate()
    console.print(f"calibration at the end: {machine.calibration_line(end)}; load average "
                  f"{' '.join(f'{x:.2f}' for x in results['meta']['loadavg_at_end'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.log(f"results written to {args.json} ({results['meta']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
