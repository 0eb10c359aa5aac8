"""Network baseline: the kernel's iperf3 TCP throughput over a plain veth pair between two namespaces.

What the VMBus switch figure (two TAP-attached children through the parent's switch) is set beside: the same
iperf3 between two network namespaces, joined here by nothing but the kernel's veth driver. Each run is a
bounded ``iperf3 -t SECONDS`` in both directions (A->B, then ``-R``), ``--repeat`` times; reported are the
medians and ranges in Gbit/s, the retransmits, and the CPU of each process: iperf3's own accounting of the
sender and the receiver (``cpu_utilization_percent``: host = the client, remote = the server, percent of one
core) and the server's CPU measured from /proc, per gigabit.

Needs root, ``ip``, ``iperf3`` (``make test``/``make bench`` install them); the namespaces are created under
random ``vmbt-`` names and deleted afterwards. ``python -m bench.net_veth`` prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import psutil

from tests.integration import netns

A_IP, B_IP = "169.254.88.1", "169.254.88.2"


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    gbps = [r["received_bps"] / 1e9 for r in runs]
    pick = sorted(runs, key=lambda r: r["received_bps"])[(len(runs) - 1) // 2]
    return {"gbit_per_s": round(statistics.median(gbps), 3), "gbit_per_s_min": round(min(gbps), 3),
            "gbit_per_s_max": round(max(gbps), 3), "retransmits": pick["retransmits"],
            "client_cpu_pct": round(pick["cpu_pct"].get("host_total", 0.0), 1),
            "server_cpu_pct": round(pick["cpu_pct"].get("remote_total", 0.0), 1),
            "server_cpu_measured_cores": pick["server_cores"],
            "server_cpu_s_per_gbit": pick["server_cpu_s_per_gbit"],
            "samples_gbit_per_s": [round(g, 3) for g in gbps]}


def run_veth(seconds: float = 2.0, repeat: int = 1) -> dict[str, Any]:
    """iperf3 over veth both ways; ``{"error": why}`` where namespaces cannot be used here."""
    why = netns.unavailable()
    if why is not None:
        return {"error": why}
    runs: dict[str, list[dict[str, Any]]] = {"forward": [], "reverse": []}
    with netns.namespace() as a, netns.namespace() as b:
        netns.veth(a, b, f"{A_IP}/24", f"{B_IP}/24")
        with netns.iperf3_server(b, B_IP) as server:
            srv = psutil.Process(server.pid)
            for _ in range(repeat):
                for reverse in (False, True):  # alternate so drift on the machine hits both alike
                    c0, t0 = sum(srv.cpu_times()[:2]), time.monotonic()
                    r = netns.iperf3(a, B_IP, seconds=seconds, reverse=reverse)
                    cores = (sum(srv.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
                    r["server_cores"] = round(cores, 3)
                    gbit = r["received_bps"] * seconds / 1e9
                    r["server_cpu_s_per_gbit"] = round(cores * seconds / gbit, 4) if gbit else None
                    runs["reverse" if reverse else "forward"].append(r)
    return {"seconds": seconds, "repeat": repeat, "path": "veth",
            **{k: _summary(v) for k, v in runs.items()}, "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.net_veth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="iperf3 -t per run (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per direction (default 1)")
    args = p.parse_args()
    print(json.dumps(run_veth(args.seconds, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
