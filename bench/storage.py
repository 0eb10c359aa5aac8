"""Storage throughput through the whole StorVSC -> VMBus -> StorVSP -> SCSI -> image-file path, with fio on the
same image file run side by side as the baseline.

The image (a raw file, prefilled by fio so reads return real data) is given to the parent as LUN 0 of every
partition. ``child-partition load storage`` drives one partition over TCP and over the Unix socket; fio
runs the same job shape directly on the file (io_uring, buffered, same block size and queue depth). Both
read through the host's page cache, so the ratio measures what the emulated VMBus path costs on top of the
file I/O itself. Jobs: 4 KiB random read and write at iodepth 32, and 1 MiB sequential read and write at iodepth 8.
Each job is repeated (fio, TCP, Unix streaming and Unix with shared memory interleaved, in a rotating order) and
the medians reported, with the CPU each process spent per I/O (parent and guest), which moves less with the
machine's load than the rates.

The page cache (``cache="warm"``, the default): fio runs with ``--invalidate=0`` and the image is read
through before any run that finds it less than fully resident, so every run starts with the whole image
cached; the resident share before each run is recorded. With ``cache="fio-default"`` fio drops the image's
pages before each of its runs (its default ``invalidate=1``, and this benchmark's behaviour before
2026-12-02) and nothing re-warms it: the runs after a fio run then start partly cold, and how much that
costs depends on the machine's virtual disk. Each VMBus run's disk counters (reads answered inline from the
page cache, refused by ``RWF_NOWAIT``, sent to the pool) come from the parent's ``disk closed`` log line:
the parent closes a partition's disk as soon as the partition goes (``idle_close = 0``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from . import pagecache
from .machine import fs_type
from .meter import ProcMeter
from .parent import REPO_ROOT, ParentProcess, child_env, start_parent

JOBS = [("randread", "4k", 32), ("randwrite", "4k", 32), ("read", "1M", 8), ("write", "1M", 8)]
# "unix" streams over the Unix socket, "shared" shares the guest's memory on it (docs/protocol.md §14)
TRANSPORTS = ("tcp", "unix", "shared")
CACHE_MODES = ("warm", "fio-default")
IMAGE_BYTES = 1 << 30
SETUP = 1.0  # seconds of a run's measured window left unsampled (the sampling may start that late)
SCAN = 0.25  # seconds from the storage handshake (the parent's log) to the workload's start: the disk scan
RAMP = 0.5
SETUP_TRIES = 3
NEGOTIATE_WAIT = 60.0  # seconds for a load run to connect and finish its storage handshake
HANDSHAKE = "device protocol negotiated"  # the parent's log line when a device's handshake is done
SLACK = 0.05  # seconds the sampling window may stick out of the measured one (the clocks are read apart)
DISK_LOG_WAIT = 60.0  # seconds to wait for the parent's "disk closed" line (it flushes the run's writes first)


def fio(image: Path, rw: str, bs: str, iodepth: int, seconds: float, invalidate: bool) -> dict[str, Any]:
    cmd = ["fio", "--name=baseline", f"--filename={image}", f"--size={IMAGE_BYTES}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", "--ioengine=io_uring", "--direct=0", f"--invalidate={int(invalidate)}",
           "--time_based", f"--runtime={seconds}", "--ramp_time=0.5", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 60).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    row = {"iops": side["iops"], "bw_bytes": side["bw_bytes"],
           "clat_us_p50": side["clat_ns"]["percentile"].get("50.000000", 0) / 1000,
           "clat_us_p99": side["clat_ns"]["percentile"].get("99.000000", 0) / 1000}
    if side["iops"] and side.get("total_ios"):
        # fio's own accounting: usr/sys in % of its run, context switches over the run.
        row["fio_us_per_io"] = (job["usr_cpu"] + job["sys_cpu"]) / 100 / side["iops"] * 1e6
        row["fio_ctx_per_io"] = job["ctx"] / side["total_ios"]
    return row


def _disk_stats(parent: ParentProcess, seen: int) -> dict[str, Any]:
    """The counters of the disk the last run used: the parent's next ``disk closed`` line."""
    deadline = time.monotonic() + DISK_LOG_WAIT
    while True:
        lines = parent.events("disk closed")
        if len(lines) > seen:
            return {k: v for k, v in lines[seen].items() if k.startswith(("reads_", "writes_", "nowait_"))}
        if time.monotonic() > deadline:
            return {"error": f"no 'disk closed' line from the parent within {DISK_LOG_WAIT:g}s"}
        time.sleep(0.05)


def load_cmd(url: str, rw: str, bs: str, iodepth: int, runtime: float, mode: str, out: Path,
             *extra: str) -> list[str]:
    """``child-partition load storage`` on the whole image, its results as JSON in ``out``."""
    return [sys.executable, "-m", "child_partition", "load", "storage", "--connect", url, "--rw", rw, "--bs", bs,
            "--iodepth", str(iodepth), "--runtime", str(runtime), "--ramp", str(RAMP), "--size", str(IMAGE_BYTES),
            "--memory-mode", mode, "--json", str(out), *extra]


def ours(url: str, rw: str, bs: str, iodepth: int, seconds: float, out: Path,
         parent: ParentProcess, mode: str = "stream") -> dict[str, Any]:
    """One ``child-partition load storage`` run; both processes' counters sampled inside its measured window.
    The sampling starts ``SCAN`` + ``RAMP`` after the parent logs the run's storage handshake. A busy machine
    can make the scan take longer: a run whose measured window did not contain the sampling window is run again
    with twice the scan allowance, and as much longer (at most ``SETUP_TRIES`` runs)."""
    scan = SCAN
    for _ in range(SETUP_TRIES):
        res, counters, window, inside = _run_load(url, rw, bs, iodepth, seconds, out, parent, mode, scan)
        if inside:
            break
        scan *= 2
    else:
        counters = {}  # never sampled inside a measured window: no CPU per I/O rather than a wrong one
    return _row(res, counters, window, rw)


def _run_load(url: str, rw: str, bs: str, iodepth: int, seconds: float, out: Path, parent: ParentProcess,
              mode: str, scan: float) -> tuple[dict[str, Any], dict[str, Any], float, bool]:
    runtime = seconds + scan - SCAN  # a longer scan allowance, a longer run: the sampling still ends inside it
    cmd = load_cmd(url, rw, bs, iodepth, runtime, mode, out)
    seen = len(parent.events("disk closed"))
    handshakes = len(parent.events(HANDSHAKE, device="storage"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=child_env())
    counters: dict[str, Any] = {}
    window = 0.0
    sampled = (0.0, 0.0)  # wall clock
    try:
        meter = ProcMeter({"parent": parent.ps, "guest": psutil.Process(proc.pid)})
        deadline = time.monotonic() + NEGOTIATE_WAIT  # connect and negotiate (as long as that takes), then
        while (len(parent.events(HANDSHAKE, device="storage")) == handshakes and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        time.sleep(scan + RAMP)  # scan and ramp: then the measured part
        t0, wall0 = time.monotonic(), time.time()
        meter.start()
        time.sleep(max(0.5, seconds - SETUP))
        window = time.monotonic() - t0
        counters = meter.stop(1)  # totals over the window; divided by the run's I/O count below
        sampled = (wall0, wall0 + window)
    except psutil.Error:
        pass  # the run ended early; its exit status says why
    _, err = proc.communicate(timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load storage exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    res = json.loads(out.read_text())  # the load engine's results document (child_partition/load/report.py)
    res["disk"] = _disk_stats(parent, seen)
    start, end = res["runs"][0]["window"]
    inside = bool(counters) and start - SLACK <= sampled[0] and sampled[1] <= end + SLACK
    return res, counters, window, inside


def _row(res: dict[str, Any], counters: dict[str, Any], window: float, rw: str) -> dict[str, Any]:
    side = res["workloads"]["storage"]["ops"]["write" if "write" in rw else "read"]
    pct = side["latency_us"]["percentiles"]
    row: dict[str, Any] = {"iops": side["ops_per_s"], "bw_bytes": side["bytes_per_s"], "clat_us_p50": pct["50"],
                           "clat_us_p99": pct["99"], "errors": res["errors"], "disk": res["disk"]}
    if counters and side["ops_per_s"]:
        ios = side["ops_per_s"] * window
        per_io = {name: {k: round(v / ios, 3) for k, v in c.items()} for name, c in counters["per_op"].items()}
        row.update(per_io=per_io, steal_frac=counters["steal_frac"],
                   parent_us_per_io=per_io["parent"]["cpu_us"], guest_us_per_io=per_io["guest"]["cpu_us"])
    return row


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the repeats, the IOPS of every run and their range."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]
                           if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)}
    out["samples_iops"] = [round(r["iops"]) for r in runs]
    out["iops_min"], out["iops_max"] = min(r["iops"] for r in runs), max(r["iops"] for r in runs)
    out["errors"] = [e for r in runs for e in r.get("errors", [])]
    if "per_io" in runs[0]:
        out["per_io"] = {name: {k: statistics.median(r["per_io"][name][k] for r in runs if "per_io" in r)
                                for k in runs[0]["per_io"][name]} for name in runs[0]["per_io"]}
    for extra in ("disk", "cache_resident_before"):
        if extra in runs[0]:
            out[f"samples_{extra}"] = [r.get(extra) for r in runs]
    return out


def before_run(image: Path, cache: str) -> float:
    """Re-warm the image if it is not all cached (``warm`` mode); the resident share the run starts with."""
    if cache == "warm" and pagecache.resident_fraction(image) < 0.999:
        pagecache.warm(image)
    return round(pagecache.resident_fraction(image), 4)


def prepare_image(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The prefilled 1 GiB image, read through once; what the page cache and RWF_NOWAIT do with it here."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    subprocess.run(["fio", "--name=prefill", f"--filename={image}", f"--size={IMAGE_BYTES}", "--rw=write",
                    "--bs=1M", "--ioengine=psync", "--end_fsync=1", "--output-format=terse"],
                   check=True, capture_output=True, timeout=300)
    info: dict[str, Any] = {"fs": fs_type(image.parent),
                            "resident_after_prefill": round(pagecache.resident_fraction(image), 4)}
    info["warm_s"] = round(pagecache.warm(image), 3)
    info["resident_after_warm"] = round(pagecache.resident_fraction(image), 4)
    info["nowait_probe"] = pagecache.nowait_probe(image)
    return image, info


def run_storage(workdir: Path, seconds: float, repeat: int = 1, cache: str = "warm",
                jobs: list[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per job and transport, and what the image looked like (``prepare_image``)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}")
    image, info = prepare_image(workdir)
    info["cache_mode"] = cache
    parent = start_parent(workdir / "parent", {"storage"}, log_level="info",
                          extra_config=f'\n[storage]\nidle_close = 0\n\n[[storage.lun]]\nlun = 0\npath = "{image}"\n')
    rows: list[dict[str, Any]] = []
    try:
        for rw, bs, depth in JOBS:
            if jobs and rw not in jobs:
                continue
            base: list[dict[str, Any]] = []
            mine: dict[str, list[dict[str, Any]]] = {t: [] for t in TRANSPORTS}
            ratios: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            # fio, TCP and Unix interleaved, the order rotated each repeat, so the machine's drift (and whatever
            # a run leaves behind for the next) hits all three alike.
            for i in range(repeat):
                order = ["fio", *TRANSPORTS]
                order = order[i % len(order):] + order[:i % len(order)]
                runs: dict[str, dict[str, Any]] = {}
                for what in order:
                    resident = before_run(image, cache)
                    if what == "fio":
                        runs[what] = fio(image, rw, bs, depth, seconds, invalidate=cache == "fio-default")
                    else:
                        runs[what] = ours(parent.endpoint(what), rw, bs, depth,
                                          seconds, workdir / f"{rw}-{what}-{i}.json", parent,
                                          "shared" if what == "shared" else "stream")
                    runs[what]["cache_resident_before"] = resident
                base.append(runs["fio"])
                for transport in TRANSPORTS:
                    mine[transport].append(runs[transport])
                    ratios[transport].append(runs[transport]["iops"] / runs["fio"]["iops"])
            fio_row = _median(base)
            for transport in TRANSPORTS:
                rows.append({"rw": rw, "bs": bs, "iodepth": depth, "transport": transport, "fio": fio_row,
                             "vmbus": _median(mine[transport]), "ratio_iops": statistics.median(ratios[transport]),
                             "samples_ratio": [round(r, 3) for r in ratios[transport]]})
    finally:
        parent.stop()
    return rows, info
