"""``python -m bench.gc_probe OUT.json -m MODULE ARGS...``: run a module with its garbage-collector pauses timed.

A diagnostic wrapper for the benchmarks (``start_parent(wrap=...)``): every collection's duration by
generation is recorded through ``gc.callbacks``, and at exit the counts, total and longest pause per
generation and the pauses of 5 ms or more are written to OUT.json, in wall time and in the thread's CPU time
(which a busy machine's preemption does not inflate). A pause stops the whole event loop, so
this is what tells a GC stall from a slow handler. Creating the file ``OUT.json.freeze`` makes the process
call ``gc.freeze()`` (within 0.2 s; the file is removed): the experiment of moving every object alive then
out of the collector's reach.
"""

from __future__ import annotations

import atexit
import gc
import json
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

LONG_MS = 5.0


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.gc_probe OUT.json -m MODULE [ARGS...]")
    stats: dict[int, dict[str, float]] = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)}
    long_pauses: list[tuple[float, int, float, float]] = []  # (monotonic, generation, wall ms, CPU ms)
    started: list[float] = [0.0, 0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0], started[1] = time.perf_counter(), time.thread_time()
            return
        ms = (time.perf_counter() - started[0]) * 1000
        cpu_ms = (time.thread_time() - started[1]) * 1000
        s = stats[info["generation"]]
        s["count"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        s["cpu_ms"] = s.get("cpu_ms", 0.0) + cpu_ms
        s["max_cpu_ms"] = max(s.get("max_cpu_ms", 0.0), cpu_ms)
        if ms >= LONG_MS and len(long_pauses) < 10_000:
            long_pauses.append((round(time.monotonic(), 3), info["generation"], round(ms, 2), round(cpu_ms, 2)))

    def dump() -> None:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"generations": stats, "pauses_over_5ms": long_pauses, "threshold": gc.get_threshold()}, fh)

    def freezer() -> None:
        trigger = Path(out + ".freeze")
        while True:
            time.sleep(0.2)
            if trigger.exists():
                gc.freeze()
                trigger.unlink()

    gc.callbacks.append(callback)
    atexit.register(dump)
    threading.Thread(target=freezer, daemon=True, name="gc-freezer").start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
