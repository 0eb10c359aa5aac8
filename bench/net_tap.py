"""Network through VMBus: the kernel's iperf3 between two TAP-attached children across the parent's switch.

The same bounded ``iperf3 -t SECONDS`` runs as ``net_veth`` (both directions, ``--repeat`` times), between two
network namespaces whose interfaces are TAP devices of two ``child-partition run --tap NAME --tap-netns NS``
processes: each child bridges its TAP to its NetVSC, the parent's NetVSP joins both NICs on its learning
switch. Large segments travel whole where both ends negotiated them (LSOv2 on transmit, RSC at NVSP 6.1 on
receive, virtio-net headers on the TAPs). Reported beside the Gbit/s: the CPU seconds per Gbit of the parent
and of each child, from /proc (``meter.sample``), and the average frame the receiving TAP got.

``python -m bench.net_tap`` prints the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.integration import netns

from . import meter
from .parent import REPO_ROOT, child_env, start_parent, stop_process

A_IP, B_IP = "169.254.89.1", "169.254.89.2"


def _cpu_s(before: dict[str, float], after: dict[str, float]) -> float:
    return (after["user_us"] - before["user_us"] + after["sys_us"] - before["sys_us"]) / 1e6


@contextlib.contextmanager
def _tap_child(workdir: Path, url: str, name: str, ns: netns.Netns,
               mode: str = "stream") -> Iterator[tuple[psutil.Process, str]]:
    tap = netns.tap_name()
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "child_partition", "run", "--connect", url, "--name", name,
                                 "--json-logs", "--tap", tap, "--tap-netns", ns.name, "--memory-mode", mode],
                                cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        netns.wait_until(lambda: proc.poll() is not None or "TAP bridged to the NIC" in log_path.read_text(),
                         f"child {name}'s TAP bridge", timeout=60)
        if proc.poll() is not None:
            raise RuntimeError(f"child {name} exited {proc.returncode}: {log_path.read_text()[-1500:]}")
        yield psutil.Process(proc.pid), tap
    finally:
        stop_process(proc, signal.SIGINT, 20)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    gbps = [r["received_bps"] / 1e9 for r in runs]
    pick = sorted(runs, key=lambda r: r["received_bps"])[(len(runs) - 1) // 2]
    return {"gbit_per_s": round(statistics.median(gbps), 3), "gbit_per_s_min": round(min(gbps), 3),
            "gbit_per_s_max": round(max(gbps), 3), "retransmits": pick["retransmits"],
            "cpu_s_per_gbit": pick["cpu_s_per_gbit"], "cores": pick["cores"], "sys_share": pick["sys_share"],
            "samples_gbit_per_s": [round(g, 3) for g in gbps]}


BUSY = ("the server is busy", "Connection reset by peer")  # iperf3 -s still ending the previous test
BUSY_TRIES = 3


def _iperf3(ns: netns.Netns, reverse: bool, seconds: float) -> dict[str, Any]:
    """One iperf3 run; a server still closing the previous test (it refuses the next client with ACCESS_DENIED,
    which a loaded machine makes likelier) is asked again, twice at most, after a moment."""
    for attempt in range(BUSY_TRIES):
        try:
            return netns.iperf3(ns, B_IP, seconds=seconds, reverse=reverse)
        except netns.NetnsError as exc:
            if attempt == BUSY_TRIES - 1 or not any(b in str(exc) for b in BUSY):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def run_tap(seconds: float = 2.0, repeat: int = 1, workdir: Path | None = None, mode: str = "stream") -> dict[str, Any]:
    """iperf3 both ways between two TAP-attached children on the Unix socket in memory mode ``mode`` ("stream" or
    "shared", docs/protocol.md §14); ``{"error": why}`` where it cannot run here."""
    why = netns.unavailable() or netns.tap_unavailable()
    if why is not None:
        return {"error": why}
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bench-net-tap-"))
    parent = start_parent(workdir / "parent", {"network"}, log_level="info")
    runs: dict[str, list[dict[str, Any]]] = {"forward": [], "reverse": []}
    try:
        url = parent.endpoint("unix")
        with netns.namespace() as a, netns.namespace() as b, \
                _tap_child(workdir, url, "bench-tap-a", a, mode) as (ca, tap_a), \
                _tap_child(workdir, url, "bench-tap-b", b, mode) as (cb, tap_b):
            a.address(tap_a, f"{A_IP}/24")
            b.address(tap_b, f"{B_IP}/24")
            netns.wait_until(lambda: netns.ping(a, B_IP, count=1, timeout=10)["received"] == 1,
                             "the first ping across the switch", timeout=60)
            procs = {"parent": parent.ps, "child_a": ca, "child_b": cb}
            with netns.iperf3_server(b, B_IP):
                for _ in range(repeat):
                    for reverse in (False, True):
                        before = {k: meter.sample(p) for k, p in procs.items()}
                        t0 = time.monotonic()
                        r = _iperf3(a, reverse, seconds)
                        wall = time.monotonic() - t0
                        after = {k: meter.sample(p) for k, p in procs.items()}
                        gbit = r["received_bps"] * seconds / 1e9
                        cpu = {k: _cpu_s(before[k], after[k]) for k in procs}
                        r["cores"] = {k: round(v / wall, 3) for k, v in cpu.items()}
                        r["cpu_s_per_gbit"] = {k: round(v / gbit, 3) if gbit else None for k, v in cpu.items()}
                        sys_s = {k: (after[k]["sys_us"] - before[k]["sys_us"]) / 1e6 for k in procs}
                        r["sys_share"] = {k: round(sys_s[k] / v, 3) if v else None
                                          for k, v in cpu.items()}  # kernel time: TAP and socket I/O
                        runs["reverse" if reverse else "forward"].append(r)
    finally:
        parent.stop()
    return {"seconds": seconds, "repeat": repeat, "path": "VMBus switch (TAP children)", "memory_mode": mode,
            **{k: _summary(v) for k, v in runs.items()}, "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.net_tap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="iperf3 -t per run (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per direction (default 1)")
    args = p.parse_args()
    print(json.dumps(run_tap(args.seconds, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
