"""Lab 6, part B: the same 4 KiB random reads and writes at QD1 through StorVSC and through the emulated IDE
disk.

    python labs/06-emulated-vs-synthetic/starter/measure.py --connect tcp://127.0.0.1:6464 --out emu.csv

One guest (``emulab.guest``) runs ``--ops`` operations per path and direction (``--slow-ops`` on the paths
that cost thousands of exits an operation), one at a time, at random 4 KiB-aligned offsets in the first
``--span`` bytes, and writes one CSV row for each (the columns in ``COLUMNS``), then prints the rows as a
Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os  # noqa: F401
import random
import sys
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import emulab  # noqa: F401  (labs/06-emulated-vs-synthetic/emulab.py)

BS = 4096
COLUMNS = ("path", "op", "ops", "seconds", "ops_per_s", "p50_us", "p99_us", "round_trips_per_op",
           "busy_polls_per_op", "wire_bytes_per_op")


def percentile(latencies: list[float], p: float) -> float:
    """Nearest rank: the value ``int(n * p / 100)`` places into the sorted list (the last, at most)."""
    raise NotImplementedError("percentile()")


async def run_one(g: Any, path: str, op: str, ops: int, span: int, rnd: random.Random) -> dict[str, Any]:
    """``ops`` operations of ``op`` ("read" or "write": 4 KiB at ``rnd.randrange(span // BS) * BS``) on ``path``,
    one at a time, each timed (``time.perf_counter``); one row, a dict with every name in COLUMNS.
    ``g.disk(path)`` is the disk; ``g.counts(path)`` before and after the run gives the round trips, busy polls
    and wire bytes it cost: per op, rounded to 2 places (wire bytes to whole bytes); ``seconds`` to 4 places,
    ``ops_per_s`` to 1, latencies in whole microseconds."""
    raise NotImplementedError("run_one()")


async def measure(url: str, ops: int, slow_ops: int, span: int, seed: int = 1) -> list[dict[str, Any]]:
    """Six rows, in the order of ``emulab.PATHS`` then ``emulab.OPS``. In one ``async with emulab.guest(url,
    name) as g``: set ``g.io.tracing = False`` (no trace of thousands of exits), write the span once through
    StorVSC (``g.disk("synthetic").write(0, bytes(span))``: every path then reads real blocks), then
    ``run_one`` for each path and op with ``ops`` operations, or ``slow_ops`` where one operation costs
    thousands of exits (every emulated row but the rep insw reads), each with ``random.Random(seed)``."""
    raise NotImplementedError("measure()")


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """Write ``rows`` to ``out`` as CSV with the COLUMNS header; return them as a Markdown table."""
    raise NotImplementedError("write_table()")


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
