"""Does a busy partition stall the others? One probe partition's 4 KiB reads at queue depth 1, alone and beside a
hog partition reading at queue depth 32, with the parent's partitions in one worker process and in two.

Each partition is a real ``child-partition load storage`` process on the parent's Unix socket (shared memory),
both on the same 1 GiB image, cached. With one worker the probe's requests wait in the event loop behind the
hog's batches; with two the probe is on the other worker (the parent's log says where each partition landed;
a probe that lands beside the hog is run again, a bounded number of times) and shares only the machine's cores.
Reported per case: the probe's IOPS and latency p50/p99/p99.9 (its load engine's HDR histogram), the hog's
IOPS, and where each ran. Nothing here is a test: the figures move with the machine.

    python -m bench.workers_isolation [--seconds 5] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .machine import describe
from .parent import REPO_ROOT, ParentProcess, child_env, start_parent
from .storage import before_run, load_cmd, prepare_image

PLACEMENT_TRIES = 6  # probe runs at most this often to land on the worker the hog is not on
SETTLE = 1.5  # seconds the hog runs before the probe starts


def _load(url: str, name: str, depth: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    cmd = load_cmd(url, "randread", "4k", depth, seconds, "shared", out, "--name-prefix", name)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _case(workers: int, hog: bool) -> str:
    return f"{workers}w-{'hog' if hog else 'alone'}"


def _finish(proc: subprocess.Popen[bytes], out: Path, seconds: float, ok: int = 0) -> dict[str, Any]:
    """The run's figures; ``ok``: its exit status when it ends well (143: stopped by SIGTERM, results kept)."""
    _, err = proc.communicate(timeout=seconds + 120)
    if proc.returncode != ok:
        raise RuntimeError(f"load storage exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    side = json.loads(out.read_text())["workloads"]["storage"]["ops"]["read"]
    pct = side["latency_us"]["percentiles"]
    return {"iops": round(side["ops_per_s"]), "p50_us": pct["50"], "p99_us": pct["99"], "p999_us": pct.get("99.9")}


def _worker_of(parent: ParentProcess, prefix: str) -> int | None:
    for line in reversed(parent.log_lines()):
        if line.get("event") == "partition connected" and str(line.get("partition", "")).startswith(prefix):
            worker = line.get("worker")
            return int(worker) if isinstance(worker, int) else 0
    return None


def _wait_worker(parent: ParentProcess, prefix: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while (w := _worker_of(parent, prefix)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the parent never logged {prefix}'s connection")
        time.sleep(0.05)
    return w


def run_case(workdir: Path, image: Path, workers: int, hog: bool, seconds: float, index: int) -> dict[str, Any]:
    """One parent with ``workers`` workers; the probe alone or beside the hog."""
    parent = start_parent(workdir / f"parent-{workers}-{int(hog)}-{index}", {"storage"}, workers=workers,
                          extra_config=f'\n[storage]\nidle_close = 0\n\n[[storage.lun]]\nlun = 0\npath = "{image}"\n')
    url = parent.endpoint("shared")
    try:
        before_run(image, "warm")
        row: dict[str, Any] = {"workers": workers, "with_hog": hog, "hog": None}
        hog_proc = None
        if hog:
            hog_proc = _load(url, "hog", 32, seconds + SETTLE + PLACEMENT_TRIES * (seconds + 3), workdir / "hog.json")
            row["hog_worker"] = _wait_worker(parent, "hog")
            time.sleep(SETTLE)
        for attempt in range(PLACEMENT_TRIES):
            name = f"probe{attempt}-"
            out = workdir / f"probe-{attempt}.json"
            probe = _load(url, name, 1, seconds, out)
            where = _wait_worker(parent, name)
            result = _finish(probe, out, seconds)
            if not hog or workers == 1 or where != row["hog_worker"]:
                row.update(probe=result, probe_worker=where, probe_attempts=attempt + 1)
                break
        else:
            row["error"] = f"the probe landed beside the hog {PLACEMENT_TRIES} times"
        if hog_proc is not None:
            hog_proc.terminate()  # SIGTERM: it stops early and still reports its figures (exit 143)
            try:
                row["hog"] = _finish(hog_proc, workdir / "hog.json", 0, ok=143)
            except (RuntimeError, json.JSONDecodeError, FileNotFoundError, KeyError) as exc:
                row["hog"] = {"error": str(exc)[:300]}
        return row
    finally:
        parent.stop()


def _median(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    vals = [r["probe"][key] for r in rows if "probe" in r and r["probe"].get(key) is not None]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="the probe's measured seconds (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case, interleaved (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    args = ap.parse_args(argv)
    cases = [(1, False), (1, True), (2, False), (2, True)]
    results: dict[str, Any] = {"bench": "workers_isolation", "seconds": args.seconds, "repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="vmbus-isolation-") as tmp:
        workdir = Path(tmp)
        results["machine"] = describe(workdir)
        image, _ = prepare_image(workdir)
        runs: dict[str, list[dict[str, Any]]] = {_case(w, h): [] for w, h in cases}
        for i in range(args.repeat):
            for workers, hog in cases[i % len(cases):] + cases[:i % len(cases)]:
                row = run_case(workdir, image, workers, hog, args.seconds, i)
                runs[_case(workers, hog)].append(row)
                print(json.dumps(row), flush=True)
    results["runs"] = runs
    results["summary"] = {case: {k: _median(rows, k) for k in ("iops", "p50_us", "p99_us", "p999_us")}
                          for case, rows in runs.items()}
    print(f"{'case':<12} {'probe IOPS':>22} {'p50 µs':>18} {'p99 µs':>20}")
    for case, s in results["summary"].items():
        def cell(k: str, s: dict[str, dict[str, float]] = s) -> str:
            v = s.get(k)
            return f"{v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f})" if v else "-"
        print(f"{case:<12} {cell('iops'):>22} {cell('p50_us'):>18} {cell('p99_us'):>20}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
