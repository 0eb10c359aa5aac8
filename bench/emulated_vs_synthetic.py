"""Emulated versus synthetic disk: the same 4 KiB random reads and writes at QD1 through StorVSC (VMBus) and
through the emulated IDE disk (trapped port I/O), in one guest, on one disk image, in one run.

For each path and direction: ops/s, latency percentiles, round trips per op (StorVSC: one request and its
completion; IDE: VM exits, counted by the guest's ``PortIo``), and bytes on the wire per op (every frame
of the guest's connection, both directions). The IDE path runs with string PIO (``rep insw``/``rep outsw``
under KVM's exit rule) and with word PIO (one ``inw``/``outw`` a word). Machine facts from
``bench.machine.describe``.

    python -m bench.emulated_vs_synthetic --ops 200 --runs 3 --out bench/results/2026-12-03-emulated/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from child_partition.devices.ata.driver import AtaDisk
from child_partition.devices.ata.portio import PortIo
from child_partition.devices.storage.vsc import StorageVsc
from child_partition.load.guest import LoadGuest
from vmbus_proto.aio import logs
from vmbus_proto.devices.storage import vstor

from .machine import describe
from .parent import start_parent

BS = 4096
SPAN = 64 << 20  # the random offsets fall in the first 64 MiB


def _percentiles(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {f"p{p}": round(s[min(len(s) - 1, int(len(s) * p / 100))] * 1e6, 1) for p in (50, 90, 99)}


async def _measure(guest: LoadGuest, disk: Any, op: str, n: int, rnd: random.Random,
                   trips: Any) -> dict[str, Any]:
    bus = guest.bus
    assert bus is not None
    payload = os.urandom(BS)
    lat: list[float] = []
    b0, t0, p0 = bus.bytes_in + bus.bytes_out, trips(), getattr(disk, "polls", 0)
    start = time.perf_counter()
    for _ in range(n):
        offset = rnd.randrange(SPAN // BS) * BS
        t = time.perf_counter()
        if op == "read":
            await disk.read(offset, BS)
        else:
            await disk.write(offset, payload)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"ops": n, "ops_per_s": round(n / wall, 1), "latency_us": _percentiles(lat),
            "mean_us": round(statistics.fmean(lat) * 1e6, 1),
            "round_trips_per_op": round((trips() - t0) / n, 1),
            "busy_polls_per_op": round((getattr(disk, "polls", 0) - p0) / n, 1),  # of the round trips
            "wire_bytes_per_op": round((bus.bytes_in + bus.bytes_out - b0) / n)}


async def one_run(url: str, name: str, ops: int, seed: int) -> dict[str, Any]:
    guest = LoadGuest(url, name, None, memory_mode="stream")  # both paths' bytes on the socket, counted alike
    await guest.connect()
    try:
        vsc = await guest.bind(guest.offer_of(vstor.SPEC))
        assert isinstance(vsc, StorageVsc) and guest.bus is not None
        lun = vsc.disks[0]
        io = PortIo(guest.bus)
        string, word = AtaDisk(io, "string"), AtaDisk(io, "word")
        await string.probe()
        word.identify = string.identify
        await lun.write(0, b"\0" * SPAN)  # the span allocated and in the page cache for every path alike
        served = [0]
        real_read, real_write = lun.read, lun.write

        async def counted_read(offset: int, length: int) -> bytes:
            served[0] += 1  # one EXECUTE_SRB and its COMPLETE_IO
            return await real_read(offset, length)

        async def counted_write(offset: int, data: bytes | memoryview, fua: bool = False) -> None:
            served[0] += 1
            await real_write(offset, data, fua)

        synthetic = argparse.Namespace(read=counted_read, write=counted_write)
        out: dict[str, Any] = {}
        few = max(10, ops // 10)  # a path that takes thousands of exits an op gets fewer ops
        counts = {"synthetic": (ops, ops), "emulated-string": (ops, few), "emulated-word": (few, few)}
        for path, disk, trips in (("synthetic", synthetic, lambda: served[0]),
                                  ("emulated-string", string, lambda: io.counters.exits),
                                  ("emulated-word", word, lambda: io.counters.exits)):
            out[path] = {op: await _measure(guest, disk, op, n, random.Random(seed), trips)
                         for op, n in zip(("read", "write"), counts[path], strict=True)}
        return out
    finally:
        await guest.leave()


def run_emulated(workdir: Path, ops: int, runs: int) -> dict[str, Any]:
    """``runs`` runs of every path and direction against one parent (its own, in ``workdir``); the result
    ``bench.run`` stores under ``emulated`` and this module's ``main`` writes as result.json."""
    parent = start_parent(workdir, {"storage"}, log_level="warning")
    try:
        results = [asyncio.run(one_run(parent.endpoint("unix"), f"emu-{i}", ops, i)) for i in range(runs)]
    finally:
        parent.stop()
    ratios = {op: [round(r["synthetic"][op]["ops_per_s"] / r["emulated-string"][op]["ops_per_s"], 1)
                   for r in results] for op in ("read", "write")}
    return {"meta": {"bench": "emulated_vs_synthetic", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "bs": BS,
                     "iodepth": 1, "transport": "unix"},
            "runs": results, "synthetic_over_emulated_string_ops_ratio": ratios}


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{lo:{fmt}}-{hi:{fmt}}"


def emulated_table(result: dict[str, Any]) -> Table:
    """One row per path and direction: the range over the runs of each figure (as lab 6's handout shows)."""
    runs = result["runs"]
    t = Table(title=f"emulated IDE vs StorVSC: {BS // 1024} KiB random I/O at QD1 (range over {len(runs)} "
                    "run(s); round trips: StorVSC requests or VM exits)")
    for col in ("path", "op", "ops/s", "p50 µs", "p99 µs", "round trips/op", "wire B/op"):
        t.add_column(col, justify="left" if col in ("path", "op") else "right")
    for path, ops in runs[0].items():
        for op in ops:
            cells = [r[path][op] for r in runs]
            t.add_row(path, op, _span([c["ops_per_s"] for c in cells], ",.1f"),
                      _span([c["latency_us"]["p50"] for c in cells], ",.0f"),
                      _span([c["latency_us"]["p99"] for c in cells], ",.0f"),
                      _span([c["round_trips_per_op"] for c in cells], ",.1f"),
                      _span([c["wire_bytes_per_op"] for c in cells], ",.0f"))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200,
                    help="ops per path and direction (a tenth where an op takes thousands of exits)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="directory for result.json")
    args = ap.parse_args()
    logs.setup("warning")
    with tempfile.TemporaryDirectory(prefix="bench-emulated-") as tmp:
        result = run_emulated(Path(tmp), args.ops, args.runs)
        result["meta"]["machine"] = describe(Path(tmp))
    Console(width=160).print(emulated_table(result))
    print("synthetic / emulated (string PIO) ops/s:", result["synthetic_over_emulated_string_ops_ratio"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
