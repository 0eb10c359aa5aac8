"""The scale benchmark's coordinator: N child partitions from a few processes against one parent.

One parent daemon runs with its real devices (every device the registry enables by default: storage,
network, video, keyboard, mouse, heartbeat). ``workers`` processes (``bench.scale_worker``) each bring up
their share of partitions over TCP, every partition opening all their channels. Measured: channels opened
per second (all channels / wall time from the first connect to the last partition with all channels open),
errors, the parent's RSS before any partition and with all N connected (and the difference per partition),
and the time for all partitions to shut down cleanly.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from vmbus_proto.devices.registry import ALL

from .parent import REPO_ROOT, ParentProcess, child_env, raise_nofile, start_parent

REAL_DEVICES = {spec.name for spec in ALL}


class Worker:
    def __init__(self, index: int, url: str, count: int, concurrency: int, timeout: float, workdir: Path) -> None:
        self.index = index
        self.stderr_path = workdir / f"worker{index}.log"
        raise_nofile()  # inherited by the worker (which raises it again itself)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scale_worker", "--url", url, "--count", str(count),
                 "--prefix", f"w{index}", "--channels", str(len(REAL_DEVICES)), "--concurrency", str(concurrency),
                 "--timeout", str(timeout)],
                cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def send(self, command: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line, which must be ``event``, within ``timeout`` seconds."""
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"scale worker {self.index} sent no {event!r} within {timeout:g}s")
        line = stdout.readline()  # the worker writes each JSON line whole, with one flush
        if not line:
            code = self.proc.wait(30)
            raise RuntimeError(f"scale worker {self.index} exited with {code} before {event!r}: "
                               f"{self.stderr_path.read_text(errors='replace')[-1500:]}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"scale worker {self.index} sent {msg!r}, expected {event!r}")
        return msg

    def finish(self) -> int:
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def run_scale(workdir: Path, partitions: int, workers: int, concurrency: int, timeout: float = 120.0,
              parent_log_level: str = "info") -> dict[str, Any]:
    parent: ParentProcess = start_parent(workdir / "parent", REAL_DEVICES, log_level=parent_log_level)
    procs: list[Worker] = []
    try:
        url = parent.endpoint("tcp")
        time.sleep(0.5)  # let the daemon settle before the baseline
        rss0, fds0 = parent.rss(), parent.ps.num_fds()
        shares = [partitions // workers + (1 if i < partitions % workers else 0) for i in range(workers)]
        procs = [Worker(i, url, n, concurrency, timeout, workdir) for i, n in enumerate(shares) if n]
        for w in procs:
            w.expect("hello", 60.0)
        cpu0 = parent.cpu_seconds()
        for w in procs:
            w.send("go")
        ready = [w.expect("ready", timeout + 30.0) for w in procs]
        cpu1 = parent.cpu_seconds()
        time.sleep(1.0)  # let allocations settle before reading RSS
        rss_n, fds_n = parent.rss(), parent.ps.num_fds()
        for w in procs:
            w.send("stop")
        done = [w.expect("done", timeout + 30.0) for w in procs]
        worker_codes = [w.finish() for w in procs]
        t_first = min(r["t_first"] for r in ready)
        t_last = max(r["t_last"] for r in ready)
        channels = sum(int(r["channels"]) for r in ready)
        ok = sum(int(r["ok"]) for r in ready)
        time.sleep(0.2)
        rss_after, fds_after = parent.rss(), parent.ps.num_fds()
    finally:
        for w in procs:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)
        parent_code = parent.stop()
    lines = parent.log_lines()
    parent_errors = [str(x.get("event")) + ": " + str(x.get("error", "")) for x in lines if x.get("level") == "error"]
    parent_opened = sum(1 for x in lines if x.get("event") == "channel open")
    errors = [e for r in ready for e in r["errors"]] + [e for d in done for e in d["errors"]] + parent_errors[:20]
    error_count = (sum(int(r["error_count"]) for r in ready) + sum(int(d["error_count"]) for d in done)
                   + len(parent_errors) + sum(1 for c in worker_codes if c != 0) + (1 if parent_code != 0 else 0))
    wall = t_last - t_first
    return {
        "transport": "tcp",
        "partitions": partitions,
        "workers": len(procs),
        "concurrency_per_worker": concurrency,
        "partitions_ready": ok,
        "channels_opened": channels,
        "channels_opened_parent_log": parent_opened,
        "open_wall_s": wall,
        "channels_per_s": channels / wall if wall > 0 else 0.0,
        "partitions_per_s": ok / wall if wall > 0 else 0.0,
        "parent_cpu_during_open": (cpu1 - cpu0) / wall if wall > 0 else 0.0,
        "rss_before_bytes": rss0,
        "rss_connected_bytes": rss_n,
        "rss_after_teardown_bytes": rss_after,
        "rss_per_partition_bytes": (rss_n - rss0) / partitions if partitions else 0.0,
        "parent_fds_before": fds0,
        "parent_fds_connected": fds_n,
        "parent_fds_after_teardown": fds_after,
        "teardown_s": max(float(d["teardown_s"]) for d in done),
        "errors": error_count,
        "error_samples": errors[:20],
        "parent_warnings": sum(1 for x in lines if x.get("level") == "warning"),
        "parent_exit_code": parent_code,
    }
