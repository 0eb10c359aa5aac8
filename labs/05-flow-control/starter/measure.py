"""Lab 5, part B: throughput against ring size.

    python labs/05-flow-control/starter/measure.py --connect tcp://127.0.0.1:6464 --out flow.csv

Runs ``sender.send_all`` through the echo channel once per ring size (``flowlab.run``) and writes one CSV row
per run, then prints the same rows as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import flowlab  # noqa: E402, F401  (labs/05-flow-control/flowlab.py)
import sender  # noqa: E402, F401  (this folder's sender.py)

COLUMNS = ("ring_pages", "data_bytes", "packets", "payload", "seconds", "packets_per_s", "mb_per_s", "blocked",
           "wakeups", "lost", "duplicated")


async def measure(url: str, ring_pages: list[int], packets: int, payload: int) -> list[dict[str, Any]]:
    """One row per ring size, in the order given: a dict with every name in COLUMNS. Use
    ``await flowlab.run(url, pages, packets, payload, sender.send_all)`` for each size; ``packets_per_s`` is
    packets over seconds, ``mb_per_s`` the payload bytes per second in millions (10**6)."""
    raise NotImplementedError("measure()")


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """Write ``rows`` to ``out`` as CSV with the COLUMNS header; return them as a Markdown table."""
    raise NotImplementedError("write_table()")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:6464", help="the parent's URL")
    ap.add_argument("--ring-pages", default="2,4,16,64",
                    help="outbound ring sizes in pages, header page included (comma-separated)")
    ap.add_argument("--packets", type=int, default=3000, help="packets per run")
    ap.add_argument("--payload", type=int, default=256, help="payload bytes per packet (at least 8)")
    ap.add_argument("--out", type=Path, default=Path("flow.csv"), help="the CSV to write")
    args = ap.parse_args()
    pages = [int(p) for p in args.ring_pages.split(",")]
    rows = asyncio.run(measure(args.connect, pages, args.packets, args.payload))
    print(write_table(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
