"""Lab 6, part B: the same 4 KiB random reads and writes at QD1 through StorVSC and through the emulated IDE
disk (reference solution).

    python labs/06-emulated-vs-synthetic/solution/measure.py --connect tcp://127.0.0.1:6464 --out emu.csv

One guest (``emulab.guest``) runs ``--ops`` operations per path and direction (``--slow-ops`` on the paths
that cost thousands of exits an operation), one at a time, at random 4 KiB-aligned offsets in the first
``--span`` bytes, and writes one CSV row for each (the columns in ``COLUMNS``), then prints the rows as a
Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import emulab  # labs/06-emulated-vs-synthetic/emulab.py

BS = 4096
COLUMNS = ("path", "op", "ops", "seconds", "ops_per_s", "p50_us", "p99_us", "round_trips_per_op",
           "busy_polls_per_op", "wire_bytes_per_op")


def percentile(latencies: list[float], p: float) -> float:
    """Nearest rank: the value ``int(n * p / 100)`` places into the sorted list (the last, at most)."""
    s = sorted(latencies)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


async def run_one(g: Any, path: str, op: str, ops: int, span: int, rnd: random.Random) -> dict[str, Any]:
    """``ops`` operations of ``op`` on ``path``, one at a time; one row."""
    disk = g.disk(path)
    payload = os.urandom(BS)
    before = g.counts(path)
    latencies = []
    start = time.perf_counter()
    for _ in range(ops):
        offset = rnd.randrange(span // BS) * BS
        t = time.perf_counter()
        if op == "read":
            await disk.read(offset, BS)
        else:
            await disk.write(offset, payload)
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - start
    after = g.counts(path)
    return {"path": path, "op": op, "ops": ops, "seconds": round(seconds, 4), "ops_per_s": round(ops / seconds, 1),
            "p50_us": round(percentile(latencies, 50) * 1e6), "p99_us": round(percentile(latencies, 99) * 1e6),
            "round_trips_per_op": round((after.round_trips - before.round_trips) / ops, 2),
            "busy_polls_per_op": round((after.busy_polls - before.busy_polls) / ops, 2),
            "wire_bytes_per_op": round((after.wire_bytes - before.wire_bytes) / ops)}


async def measure(url: str, ops: int, slow_ops: int, span: int, seed: int = 1) -> list[dict[str, Any]]:
    """Six rows, in the order of ``emulab.PATHS`` then ``emulab.OPS``."""
    rows = []
    async with emulab.guest(url, f"lab6-measure-{os.getpid()}") as g:
        g.io.tracing = False  # thousands of exits: keep no trace
        await g.disk("synthetic").write(0, bytes(span))  # the span written once: every path reads real blocks
        for path in emulab.PATHS:
            for op in emulab.OPS:
                n = ops if path == "synthetic" or (path, op) == ("emulated-string", "read") else slow_ops
                rows.append(await run_one(g, path, op, n, span, random.Random(seed)))
    return rows


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """Write ``rows`` to ``out`` as CSV with the COLUMNS header; return them as a Markdown table."""
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:6464", help="the parent's URL")
    ap.add_argument("--ops", type=int, default=200, help="operations per row (StorVSC, and emulated reads with "
                                                          "rep insw)")
    ap.add_argument("--slow-ops", type=int, default=20, help="operations per row where one costs thousands of "
                                                             "exits")
    ap.add_argument("--span", type=int, default=16 << 20, help="bytes of the disk the offsets fall in")
    ap.add_argument("--out", type=Path, default=Path("emu.csv"), help="the CSV to write")
    args = ap.parse_args()
    logs.setup("warning")  # the guest's own log lines would fill the table
    rows = asyncio.run(measure(args.connect, args.ops, args.slow_ops, args.span))
    print(write_table(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
