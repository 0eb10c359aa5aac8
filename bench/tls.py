"""What TLS costs the VMBus path: echo round trips over ``tcp://`` and ``tls://`` (mutual TLS: a client certificate
names the partition), side by side against one parent, cells interleaved so that load from other processes
on the machine falls on both alike.

The same measurement as ``bench.vmbus_echo`` (1 KiB in-band requests, and 64 KiB GPA-direct ones whose data
crosses the connection both ways), only the URL differs. Certificates come from ``openssl`` (P-256 keys, as
``tests/tlscerts.py`` makes them). Bounded: ``--seconds`` per cell, ``--rounds`` rounds.

    python -m bench.tls [--seconds 4] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from tests.tlscerts import Ca
from vmbus_proto.aio.tls import client_url

from . import vmbus_echo
from .machine import calibration_line, describe

CELLS = ((1024, 16), (64 * 1024, 8))  # (request bytes, requests in flight)


def _cell(url: str, size: int, window: int, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    return uvloop.run(vmbus_echo.measure(url, size, window, args.seconds, args.warmup, pid, name="bench-tls"))


def main(argv: list[str] | None = None) -> int:
    from .parent import start_parent  # noqa: PLC0415 - after argparse, as the other bench scripts

    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell is measured")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every cell on both transports")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        where = Path(tmp)
        ca = Ca.make(where / "pki")
        cert, key = ca.issue("parent", "parent", server=True)
        client_cert, client_key = ca.issue("bench", "bench-*")
        config = f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{ca.pem}"\n'
        parent = start_parent(where / "parent", {"echo"}, log_level="info", extra_config=config,
                              extra_listen=("tls://127.0.0.1:0",))
        machine = describe(where)
        try:
            urls = {"tcp": parent.endpoint("tcp"),
                    "tls": client_url(parent.endpoint("tls"), ca=str(ca.pem), cert=str(client_cert),
                                      key=str(client_key))}
            cells: dict[str, list[dict[str, Any]]] = {}
            for r in range(args.rounds):
                for size, window in CELLS:
                    order = ("tcp", "tls") if r % 2 == 0 else ("tls", "tcp")
                    for transport in order:
                        res = _cell(urls[transport], size, window, args, parent.pid)
                        cells.setdefault(f"{transport} {size // 1024}KiB w{window}", []).append(res)
                        print(f"round {r + 1} {transport} {size // 1024:>3} KiB w{window}: "
                              f"{res['rtt_per_s']:>9,.0f} rt/s {res['mb_per_s']:>8.1f} MB/s", flush=True)
        finally:
            parent.stop()
    rows = []
    for size, window in CELLS:
        label = f"{size // 1024}KiB w{window}"
        tcp = statistics.median(c["rtt_per_s"] for c in cells[f"tcp {label}"])
        tls = statistics.median(c["rtt_per_s"] for c in cells[f"tls {label}"])
        rows.append({"cell": label, "size": size, "window": window, "tcp_rtt_per_s": round(tcp),
                     "tls_rtt_per_s": round(tls), "tcp_mb_per_s": round(tcp * size / 1e6, 1),
                     "tls_mb_per_s": round(tls * size / 1e6, 1), "tls_over_tcp": round(tls / tcp, 3)})
    print(f"\nmachine: {machine['cpu'].get('model_name', '?')}; {calibration_line(machine['calibration'])}")
    print(f"{'cell':<12} {'tcp rt/s':>10} {'tls rt/s':>10} {'tcp MB/s':>9} {'tls MB/s':>9} {'tls/tcp':>8}")
    for row in rows:
        print(f"{row['cell']:<12} {row['tcp_rtt_per_s']:>10,} {row['tls_rtt_per_s']:>10,} {row['tcp_mb_per_s']:>9} "
              f"{row['tls_mb_per_s']:>9} {row['tls_over_tcp']:>8}")
    if args.json:
        doc = {"meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "machine": machine,
                        "openssl": ssl.OPENSSL_VERSION, "loadavg": list(os.getloadavg()),
                        "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds},
               "summary": rows, "cells": cells}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
