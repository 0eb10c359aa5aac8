"""Small frames between two children through the parent's virtual switch, beside the raw uvloop echo.

Ours: ``child-partition load network`` with two partitions in one process (``--flows pairs``: each sends
64-byte frames to the other through NetVSC -> VMBus -> NetVSP -> switch -> NetVSP -> VMBus -> NetVSC) and a
real ``parent-partition serve`` with only the network device; two processes. Each partition keeps
``window`` frames on their way (``--window``), so the figure is what the path carries without loss, as
the echo's fixed window is; one run per repeat also goes as fast as the NICs take frames (no window) and
records what then arrives and what is lost.

Baseline: ``bench/echo_raw.py``, a uvloop echo server process and a uvloop client in this process (two
processes too) with the same window of 64-byte messages over the Unix socket; each round trip carries one
message each way, so its messages per second (2 x round trips) stand beside our frames per second (both
directions). The stream carries the window's messages in a few large reads and writes, so the raw echo
never touches a message; the framed echo (the same server splitting the stream into length-prefixed messages
and copying each, bench (a')) is printed beside it as the cost of touching every message in Python at all.
Reported: medians over the repeats with the range, the ratios, and the CPU microseconds per frame (per
message) of each process, which moves less with the machine's load than the rates. The switch side's
drop counters come from the parent's ``NIC off the switch`` lines.
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
import uvloop
from rich.table import Table

from . import echo_raw
from .meter import ProcMeter
from .parent import REPO_ROOT, ParentProcess, child_env, start_parent

FRAME = 64
WINDOW = 64
SETUP = 1.0  # seconds two partitions take to connect, negotiate and bring their NICs up
RAMP = 0.5


def ours(parent: ParentProcess, seconds: float, window: int, out: Path) -> dict[str, Any]:
    """One ``child-partition load network`` run, both processes' counters sampled inside its measured window."""
    cmd = [sys.executable, "-m", "child_partition", "load", "network", "--connect", parent.endpoint("unix"),
           "--partitions", "2", "--flows", "pairs", "--frame-size", str(FRAME), "--runtime", str(seconds),
           "--ramp", str(RAMP), "--json", str(out), *(["--window", str(window)] if window else [])]
    seen = len(_switch_lines(parent))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=child_env())
    counters: dict[str, Any] = {}
    window_s = 0.0
    try:
        meter = ProcMeter({"parent": parent.ps, "guests": psutil.Process(proc.pid)})
        time.sleep(SETUP + RAMP)
        t0 = time.monotonic()
        meter.start()
        time.sleep(max(0.5, seconds - 1.0))
        window_s = time.monotonic() - t0
        counters = meter.stop(1)
    except psutil.Error:
        pass  # the run ended early; its exit status says why
    _, err = proc.communicate(timeout=seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load network exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    doc = json.loads(out.read_text())  # the load engine's results document (child_partition/load/report.py)
    net, res = doc["workloads"]["network"], doc["workloads"]["network"]["extra"]
    pct = net["ops"]["receive"]["latency_us"]["percentiles"] if "receive" in net["ops"] else \
        {"50": 0, "99": 0, "99.9": 0}
    seconds = doc["seconds"] or 1e-9
    row: dict[str, Any] = {"frames_per_s": res["received"] / seconds, "frames_per_s_sent": res["sent"] / seconds,
                           "loss_frac": res["lost"] / res["sent"] if res["sent"] else 0.0, "latency_us_p50": pct["50"],
                           "latency_us_p99": pct["99"], "latency_us_p99.9": pct["99.9"],
                           "nic_rx_drops": res["nic"].get("rx_drops", 0), "errors": doc["errors"],
                           "switch": _switch_drops(parent, seen)}
    if counters and row["frames_per_s"]:
        frames = row["frames_per_s"] * window_s
        per = {who: {k: round(v / frames, 3) for k, v in c.items()} for who, c in counters["per_op"].items()}
        row.update(per_frame=per, steal_frac=counters["steal_frac"],
                   parent_us_per_frame=per["parent"]["cpu_us"], guests_us_per_frame=per["guests"]["cpu_us"])
    return row


def _switch_lines(parent: ParentProcess) -> list[dict[str, object]]:
    return [x for x in parent.log_lines() if x.get("event") == "NIC off the switch"]


def _switch_drops(parent: ParentProcess, seen: int, wait: float = 10.0) -> dict[str, int]:
    """The parent's counters of the run's two NICs (its next two ``NIC off the switch`` lines), whole run:
    frames taken from the guests, frames put into their receive buffers, and the difference, which with two
    ports is what the switch dropped (its port queues full) or the parent refused."""
    deadline = time.monotonic() + wait
    lines = _switch_lines(parent)[seen:]
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = _switch_lines(parent)[seen:]
    keys = ("tx_frames", "rx_frames", "rx_dropped_no_room", "rx_dropped_filter")
    out = {k: sum(int(str(x.get(k, 0))) for x in lines[:2]) for k in keys}
    out["dropped_in_parent"] = out["tx_frames"] - out["rx_frames"]
    return out


def baseline(url: str, seconds: float, window: int, server_pid: int) -> dict[str, Any]:
    """The raw echo with 64-byte messages: messages/s both ways, and CPU per message of each process."""
    r = uvloop.run(echo_raw.measure(url, FRAME, window, seconds, RAMP, server_pid))
    return {"messages_per_s": 2 * r["rtt_per_s"], "server_us_per_message": r["server_us_per_rt"] / 2,
            "client_us_per_message": r["client_us_per_rt"] / 2, "steal_frac": r.get("steal_frac", 0.0)}


def _med(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in runs if key in r]
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)} if values else {}


def run_frames(workdir: Path, seconds: float, repeat: int, window: int = WINDOW) -> dict[str, Any]:
    """``repeat`` interleaved runs of the echo baseline, ours with a window, and ours without one."""
    server = echo_raw.EchoServerProcess(workdir / "echo")
    parent = start_parent(workdir / "parent", {"network"}, log_level="info")
    raw: list[dict[str, Any]] = []
    framed: list[dict[str, Any]] = []
    windowed: list[dict[str, Any]] = []
    unbounded: list[dict[str, Any]] = []
    try:
        for i in range(repeat):
            raw.append(baseline(server.urls["unix"], seconds, window, server.pid))
            framed.append(baseline(server.urls["framed_unix"], seconds, window, server.pid))
            windowed.append(ours(parent, seconds, window, workdir / f"frames-w{window}-{i}.json"))
            unbounded.append(ours(parent, seconds, 0, workdir / f"frames-max-{i}.json"))
    finally:
        server.stop()
        parent.stop()
    ratios = [w["frames_per_s"] / r["messages_per_s"] for w, r in zip(windowed, raw, strict=True)]
    ratios_framed = [w["frames_per_s"] / r["messages_per_s"] for w, r in zip(windowed, framed, strict=True)]
    out: dict[str, Any] = {"frame_bytes": FRAME, "window": window, "transport": "unix", "repeat": repeat,
                           "ratio": {"median": round(statistics.median(ratios), 5), "min": round(min(ratios), 5),
                                     "max": round(max(ratios), 5)},
                           "ratio_vs_framed": {"median": round(statistics.median(ratios_framed), 3),
                                               "min": round(min(ratios_framed), 3),
                                               "max": round(max(ratios_framed), 3)}}
    for name, runs, keys in (
            ("raw", raw, ("messages_per_s", "server_us_per_message", "client_us_per_message")),
            ("framed", framed, ("messages_per_s", "server_us_per_message", "client_us_per_message")),
            ("vmbus", windowed, ("frames_per_s", "latency_us_p50", "latency_us_p99", "latency_us_p99.9",
                                 "parent_us_per_frame", "guests_us_per_frame", "loss_frac")),
            ("vmbus_max", unbounded, ("frames_per_s", "frames_per_s_sent", "loss_frac", "latency_us_p50",
                                      "parent_us_per_frame", "guests_us_per_frame"))):
        out[name] = {k: _med(runs, k) for k in keys}
        out[name]["samples"] = runs
    out["vmbus_max"]["lost_where"] = [{"sent": r["switch"]["tx_frames"], "in_parent": r["switch"]["dropped_in_parent"],
                                       "in_guest_nic_queues": r["nic_rx_drops"]} for r in unbounded]
    out["errors"] = [e for r in windowed + unbounded for e in r["errors"]]
    return out


def frames_table(res: dict[str, Any]) -> Table:
    t = Table(title=f"network: {res['frame_bytes']}-byte frames between two children through the switch vs the raw "
                    f"uvloop echo ({res['transport']}, window {res['window']}; medians, range over {res['repeat']}; "
                    "CPU µs per frame of each process)")
    for col in ("path", "frames/s", "range", "loss", "p50 / p99 µs", "CPU µs/frame"):
        t.add_column(col, justify="left" if col == "path" else "right")

    def rng(d: dict[str, float]) -> str:
        return f"{d['min']:,.0f}-{d['max']:,.0f}"

    v, m = res["vmbus"], res["vmbus_max"]
    for label, r in (("raw uvloop echo", res["raw"]), ("framed echo (a')", res["framed"])):
        t.add_row(label, f"{r['messages_per_s']['median']:,.0f}", rng(r["messages_per_s"]), "-", "-",
                  f"server {r['server_us_per_message']['median']:.2f}, "
                  f"client {r['client_us_per_message']['median']:.2f}")
    for label, row in ((f"switch, window {res['window']}", v), ("switch, no window", m)):
        cpu = (f"parent {row['parent_us_per_frame']['median']:.1f}, guests {row['guests_us_per_frame']['median']:.1f}"
               if row.get("parent_us_per_frame") else "-")
        lat = (f"{row['latency_us_p50']['median']:,.0f} / {row['latency_us_p99']['median']:,.0f}"
               if row.get("latency_us_p99") else f"{row['latency_us_p50']['median']:,.0f} / -")
        t.add_row(label, f"{row['frames_per_s']['median']:,.0f}", rng(row["frames_per_s"]),
                  f"{row['loss_frac']['median']:.1%}", lat, cpu)
    r, f = res["ratio"], res["ratio_vs_framed"]
    t.caption = (f"ratio (switch, window) / raw echo: {r['median']:.4f} ({r['min']:.4f}-{r['max']:.4f}); "
                 f"/ framed echo: {f['median']:.3f} ({f['min']:.3f}-{f['max']:.3f})\n"
                 "no window, frames lost in the parent / in the guests' NIC receive queues, per run: "
                 + ", ".join(f"{x['in_parent']:,} / {x['in_guest_nic_queues']:,} of {x['sent']:,}"
                             for x in m.get("lost_where", [])))
    return t


if __name__ == "__main__":
    import tempfile

    from rich.console import Console

    with tempfile.TemporaryDirectory(prefix="vmbus-bench-frames-") as tmp:
        result = run_frames(Path(tmp), float(sys.argv[1]) if len(sys.argv) > 1 else 2.0,
                            int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    Console(width=160).print(frames_table(result))
    print(json.dumps(result, indent=1))
