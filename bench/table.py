"""``python -m bench.table``: the README's Performance table and range line, from result files.

    python -m bench.table bench/results/latest.json            # the table from one run
    python -m bench.table A.json B.json                        # each job from the last file that has it
    python -m bench.table --ranges bench/results/*.json        # plus the range over all those runs

One row per job: the baseline (the raw uvloop echo for round trips, fio on the same file for storage), the
VMBus path, their ratio, and the parent's / the guest's CPU per operation, with the run each row comes
from. The range line gives, per headline job, the lowest and highest median seen over the given files and
how many runs and kernel builds (``uname -r``; older files name no CPU) they came from. Storage
results from before 2026-12-02, or run with ``--cache fio-default``, measured a partly cold page cache
(see bench/README.md) and are left out of the storage ranges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _run_label(meta: dict[str, Any]) -> str:
    load = meta.get("loadavg_at_start", [0.0])[0]
    return f"{meta.get('started', '?')[:16].replace('T', ' ')} (load {load:.1f})"


def kernel_of(meta: dict[str, Any]) -> str:
    """``uname -r`` of the run (older result files only have the platform string, which contains it)."""
    m = meta.get("machine", {})
    if m.get("kernel"):
        return str(m["kernel"])
    parts = str(m.get("platform", "?")).split("-")
    return "-".join(parts[1:-3]) if len(parts) > 4 else "?"


def warm_storage(results: dict[str, Any]) -> bool:
    """Storage rows measured on a warm page cache (the default since 2026-12-02)."""
    return bool(results.get("storage_image", {}).get("cache_mode") == "warm")


def rows_of(results: dict[str, Any]) -> dict[str, Row]:
    """Job name -> baseline, VMBus figure, unit, ratio, parent and guest CPU µs per operation."""
    out: dict[str, Row] = {}
    run = _run_label(results["meta"])
    for r in results.get("echo", []):
        a, b = r["raw"], r["vmbus"]
        out[f"echo {r['size'] // 1024} KiB {r['transport']}"] = {
            "baseline": a["rtt_per_s"], "vmbus": b["rtt_per_s"], "unit": "rt/s", "ratio": r["ratio"],
            "parent_us": b.get("server_us_per_rt"), "guest_us": b.get("client_us_per_rt"), "run": run}
    if warm_storage(results):
        for r in results.get("storage", []):
            f, v = r["fio"], r["vmbus"]
            mb = r["bs"] != "4k"
            out[f"{r['rw']} {r['bs']} qd{r['iodepth']} {r['transport']}"] = {
                "baseline": f["bw_bytes"] / 1e6 if mb else f["iops"], "vmbus": v["bw_bytes"] / 1e6 if mb else v["iops"],
                "unit": "MB/s" if mb else "IOPS", "ratio": r["ratio_iops"], "parent_us": v.get("parent_us_per_io"),
                "guest_us": v.get("guest_us_per_io"), "run": run}
    return out


def _num(x: float) -> str:
    return f"{x:,.0f}"


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def table(files: list[dict[str, Any]]) -> str:
    merged: dict[str, Row] = {}
    for results in files:
        merged.update(rows_of(results))
    lines = ["| job | baseline | VMBus | ratio | parent / guest CPU µs per op | run (UTC) |",
             "|---|---:|---:|---:|---:|---|"]
    for job, r in merged.items():
        lines.append(f"| {job} | {_num(r['baseline'])} {r['unit']} | {_num(r['vmbus'])} {r['unit']} | "
                     f"{r['ratio']:.2f} | {_us(r['parent_us'])} / {_us(r['guest_us'])} | {r['run']} |")
    return "\n".join(lines)


HEADLINE = ("echo 1 KiB tcp", "echo 1 KiB unix", "echo 64 KiB tcp", "randread 4k qd32 tcp", "randread 4k qd32 unix",
            "read 1M qd8 tcp", "read 1M qd8 unix")


def ranges(files: list[dict[str, Any]]) -> str:
    seen: dict[str, list[Row]] = {}
    kernels = {kernel_of(f["meta"]) for f in files}
    for results in files:
        for job, row in rows_of(results).items():
            seen.setdefault(job, []).append(row)
    parts = []
    for job in HEADLINE:
        rows = seen.get(job)
        if not rows:
            continue
        vm = [r["vmbus"] for r in rows]
        ratio = [r["ratio"] for r in rows]
        cpu = [r["parent_us"] for r in rows if r["parent_us"] is not None]
        cpu_part = f", parent {min(cpu):.0f}-{max(cpu):.0f} µs/op" if cpu else ""
        parts.append(f"{job}: {_num(min(vm))}-{_num(max(vm))} {rows[0]['unit']} (ratio {min(ratio):.2f}-"
                     f"{max(ratio):.2f}{cpu_part}; {len(rows)} runs)")
    names = ", ".join(sorted(kernels))
    return f"Range over {len(files)} result file(s) from {len(kernels)} kernel build(s) ({names}): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="result JSON files (later files win per job)")
    p.add_argument("--ranges", action="store_true", help="also print the range line over all the files")
    args = p.parse_args(argv)
    files = [json.loads(f.read_text(encoding="utf-8")) for f in args.files]
    print(table(files))
    if args.ranges:
        print()
        print(ranges(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
