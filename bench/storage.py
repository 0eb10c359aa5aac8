"""Storage throughput through the whole StorVSC -> VMBus -> StorVSP -> SCSI -> image-file path, with fio on the
same image file run side by side as the baseline.

The image (a raw file, prefilled by fio so reads return real data) is given to the parent as LUN 0 of every
partition. ``child-partition load storage`` drives one partition over TCP and over the Unix socket; fio
runs the same job shape directly on the file (io_uring, buffered, same block size and queue depth). Both
read through the host's page cache, so the ratio measures what the emulated VMBus path costs on top of the
file I/O itself. Jobs: 4 KiB random read at iodepth 32, and 1 MiB sequential read and write at iodepth 8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .parent import REPO_ROOT, child_env, start_parent

JOBS = [("randread", "4k", 32), ("read", "1M", 8), ("write", "1M", 8)]
TRANSPORTS = ("tcp", "unix")
IMAGE_BYTES = 1 << 30


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


def ours(url: str, rw: str, bs: str, iodepth: int, seconds: float, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "child_partition", "load", "storage", "--connect", url, "--rw", rw, "--bs", bs,
           "--iodepth", str(iodepth), "--runtime", str(seconds), "--size", str(IMAGE_BYTES), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 120, cwd=REPO_ROOT,
                   env=child_env())
    res = json.loads(out.read_text())
    side = res["write"] if "write" in rw else res["read"]
    pct = side["clat_us"]["percentiles"]
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"], "clat_us_p50": pct["50"], "clat_us_p99": pct["99"],
            "errors": res["errors"]}


def run_storage(workdir: Path, seconds: float) -> list[dict[str, Any]]:
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
            base = fio(image, rw, bs, depth, seconds)
            for transport in TRANSPORTS:
                mine = ours(parent.endpoint(transport), rw, bs, depth, seconds, workdir / f"{rw}-{transport}.json")
                rows.append({"rw": rw, "bs": bs, "iodepth": depth, "transport": transport, "fio": base,
                             "vmbus": mine, "ratio_iops": mine["iops"] / base["iops"]})
    finally:
        parent.stop()
    return rows
