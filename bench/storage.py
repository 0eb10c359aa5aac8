"""Storage throughput through the whole StorVSC -> VMBus -> StorVSP -> SCSI -> image-file path, with fio on the
same image file run side by side as the baseline.

The image (a raw file, prefilled by fio so reads return real data) is given to the parent as LUN 0 of every
partition. ``child-partition load storage`` drives one partition over TCP and over the Unix socket; fio
runs the same job shape directly on the file (io_uring, buffered, same block size and queue depth). Both
read through the host's page cache, so the ratio measures what the emulated VMBus path costs on top of the
file I/O itself. Jobs: 4 KiB random read and write at iodepth 32, and 1 MiB sequential read and write at iodepth 8.
Each job is repeated (fio, TCP, Unix interleaved, in a rotating order) and the medians reported, with the
CPU each process spent per I/O (parent and guest), which moves less with the machine's load than the rates.
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

from .parent import REPO_ROOT, ParentProcess, child_env, start_parent

JOBS = [("randread", "4k", 32), ("randwrite", "4k", 32), ("read", "1M", 8), ("write", "1M", 8)]
TRANSPORTS = ("tcp", "unix")
IMAGE_BYTES = 1 << 30
SETUP = 1.0  # seconds a load run takes to connect, negotiate and scan its disk
RAMP = 0.5


def fio(image: Path, rw: str, bs: str, iodepth: int, seconds: float) -> dict[str, Any]:
    cmd = ["fio", "--name=baseline", f"--filename={image}", f"--size={IMAGE_BYTES}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", "--ioengine=io_uring", "--direct=0", "--time_based", f"--runtime={seconds}",
           "--ramp_time=0.5", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 60).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"],
            "clat_us_p50": side["clat_ns"]["percentile"].get("50.000000", 0) / 1000,
            "clat_us_p99": side["clat_ns"]["percentile"].get("99.000000", 0) / 1000}


def ours(url: str, rw: str, bs: str, iodepth: int, seconds: float, out: Path,
         parent: ParentProcess) -> dict[str, Any]:
    """One ``child-partition load storage`` run; CPU of both processes sampled inside its measured window."""
    cmd = [sys.executable, "-m", "child_partition", "load", "storage", "--connect", url, "--rw", rw, "--bs", bs,
           "--iodepth", str(iodepth), "--runtime", str(seconds), "--ramp", str(RAMP), "--size", str(IMAGE_BYTES),
           "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=child_env())
    cpu: dict[str, float] = {}
    try:
        guest = psutil.Process(proc.pid)
        time.sleep(SETUP + RAMP)  # connect, negotiate, scan, ramp: then the measured part
        t0, p0, g0 = time.monotonic(), parent.cpu_seconds(), sum(guest.cpu_times()[:2])
        time.sleep(max(0.5, seconds - 1.0))
        t1, p1, g1 = time.monotonic(), parent.cpu_seconds(), sum(guest.cpu_times()[:2])
        cpu = {"parent_cores": (p1 - p0) / (t1 - t0), "guest_cores": (g1 - g0) / (t1 - t0)}
    except psutil.Error:
        pass  # the run ended early; its exit status says why
    _, err = proc.communicate(timeout=seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load storage exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    res = json.loads(out.read_text())
    side = res["write"] if "write" in rw else res["read"]
    pct = side["clat_us"]["percentiles"]
    row = {"iops": side["iops"], "bw_bytes": side["bw_bytes"], "clat_us_p50": pct["50"], "clat_us_p99": pct["99"],
           "errors": res["errors"]}
    if cpu and side["iops"]:
        row["parent_us_per_io"] = cpu["parent_cores"] / side["iops"] * 1e6
        row["guest_us_per_io"] = cpu["guest_cores"] / side["iops"] * 1e6
    return row


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the repeats, with every sample's IOPS."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    out["samples_iops"] = [round(r["iops"]) for r in runs]
    out["errors"] = [e for r in runs for e in r.get("errors", [])]
    return out


def run_storage(workdir: Path, seconds: float, repeat: int = 1) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    subprocess.run(["fio", "--name=prefill", f"--filename={image}", f"--size={IMAGE_BYTES}", "--rw=write",
                    "--bs=1M", "--ioengine=psync", "--end_fsync=1", "--output-format=terse"],
                   check=True, capture_output=True, timeout=300)
    parent = start_parent(workdir / "parent", {"storage"}, log_level="warning",
                          extra_config=f'\n[[storage.lun]]\nlun = 0\npath = "{image}"\n')
    rows: list[dict[str, Any]] = []
    try:
        for rw, bs, depth in JOBS:
            base: list[dict[str, Any]] = []
            mine: dict[str, list[dict[str, Any]]] = {t: [] for t in TRANSPORTS}
            ratios: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            # fio, TCP and Unix interleaved, the order rotated each repeat, so the machine's drift (and whatever
            # a run leaves behind for the next) hits all three alike.
            for i in range(repeat):
                order = ["fio", *TRANSPORTS]
                order = order[i % 3:] + order[:i % 3]
                runs: dict[str, dict[str, Any]] = {}
                for what in order:
                    if what == "fio":
                        runs[what] = fio(image, rw, bs, depth, seconds)
                    else:
                        runs[what] = ours(parent.endpoint(what), rw, bs, depth, seconds,
                                          workdir / f"{rw}-{what}-{i}.json", parent)
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
    return rows
