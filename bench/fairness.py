"""Fairness: what one partition's flood of small frames costs another partition's round trips.

A real parent (network device only), a VM (``child-partition run``) and a pinger (``child-partition ping``)
on its Unix socket; ping's round trips cross the parent twice (guest -> switch -> guest and back). They are
measured quiet, then while a raw client on TCP sends SIGNAL frames for a relid it never opened as fast as the
socket takes them (the cheapest junk a peer can send: the parent decodes each frame, finds no channel, logs
within its per-connection limit and drops it). Bounded: ``--count`` pings, the flood stops with the ping.

    python -m bench.fairness [--count 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.envelope import Hello, Signal
from vmbus_proto.framing import ENVELOPE_VERSION, FrameKind, encode_frame

from .machine import describe
from .parent import REPO_ROOT, child_env, start_parent

RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
FLOOD_SECONDS = 120.0  # the flood's own bound, whatever happens to the ping


def ping(url: str, count: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "child_partition", "ping", "--connect", url, "--name", "pinger",
                          "-c", str(count), "-i", "0.05", "-W", "10", "vm2"],
                         check=False, cwd=str(REPO_ROOT), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    found = RTT.search(out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"ping failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    lo, avg, hi, mdev = (float(x) for x in found.groups())
    return {"min_ms": lo, "avg_ms": avg, "max_ms": hi, "mdev_ms": mdev}


def flood(tcp: str, stop: threading.Event, sent: list[int]) -> None:
    host, port = tcp.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(encode_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION, "flooder").encode()))
        sock.sendall(encode_frame(FrameKind.CONTROL, 0,
                                  m.InitiateContact(vmbus_version_requested=0x50003, interrupt_page=2).encode()))
        block = encode_frame(FrameKind.SIGNAL, 99, Signal(0).encode()) * 4096
        sock.settimeout(1.0)
        deadline = time.monotonic() + FLOOD_SECONDS
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                sock.sendall(block)
                sent[0] += 4096
            except TimeoutError:
                continue
            except OSError:
                return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        parent = start_parent(Path(tmp), {"network"}, log_level="warning")
        tcp, unix = parent.endpoints
        vm = subprocess.Popen([sys.executable, "-m", "child_partition", "run", "--connect", unix, "--name", "vm2",
                               "--no-console"], cwd=str(REPO_ROOT), env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ping(unix, 3)  # vm2 is up and answering
            quiet = ping(unix, args.count)
            stop, sent = threading.Event(), [0]
            flooder = threading.Thread(target=flood, args=(tcp, stop, sent), daemon=True)
            flooder.start()
            t0 = time.monotonic()
            flooded = ping(unix, args.count)
            seconds = time.monotonic() - t0
            stop.set()
            flooder.join(10)
        finally:
            vm.terminate()
            try:
                vm.wait(30)
            except subprocess.TimeoutExpired:
                vm.kill()
            parent.stop()
    result: dict[str, Any] = {"quiet": quiet, "flooded": flooded, "flood_frames_per_s": sent[0] / seconds,
                              "machine": describe(Path(tempfile.gettempdir()))}
    print(f"ping vm2, quiet:    avg {quiet['avg_ms']:.2f} ms, max {quiet['max_ms']:.2f} ms")
    print(f"ping vm2, flooded:  avg {flooded['avg_ms']:.2f} ms, max {flooded['max_ms']:.2f} ms "
          f"(flooder: {sent[0] / seconds:,.0f} junk frames/s accepted by the socket)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
