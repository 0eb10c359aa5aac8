"""Input events per second from the parent to a child (keys and mouse reports), beside the raw uvloop echo.

Ours: the parent daemon runs in this process with only the keyboard and mouse devices (``ParentDaemon``, the
same object the web console will drive) and a real ``child-partition run`` connects over a Unix socket. For
``seconds`` this process types through ``KeyboardVsp.send_events`` (batches of text: letters, Shift, digits,
as ``type_text`` makes them) or moves the mouse through ``MouseVsp.send_mouse``; the ring's backpressure
paces it to what the child takes. The run ends with a Caps Lock press: the child answers it with
LED_INDICATORS, so when the parent sees the LED every key before it has been decoded by the child (same
channel, in order). The mouse channel has no answer of its own; the same keyboard round trip closes its run,
so up to one ring of reports (36 KiB, about 750) may still be in the child's channel then; the child's
counts at close are checked against what was sent.

Baseline: ``bench/echo_raw.py`` (a uvloop echo server process, a uvloop client here) with messages of the
same payload size (12 bytes: a keyboard EVENT; 23: a pipe-framed INPUT_REPORT) and a window of 64 over the
Unix socket; its messages per second count both directions (2 x round trips), as ``net_frames`` does.
Reported: events per second, the ratio, CPU microseconds per event of each process (``bench/meter.py``).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop
from rich.table import Table

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.input.vsp import KeyboardVsp, MouseVsp
from vmbus_proto.aio import logs
from vmbus_proto.devices.input import keymap
from vmbus_proto.devices.input.keyboard import LedFlags

from . import echo_raw
from .meter import ProcMeter
from .parent import REPO_ROOT, child_env

WINDOW = 64
RAMP = 0.3
SIZES = {"keys": 12, "mouse": 8 + 8 + 7}  # keyboard EVENT; pipe header + synthhid header + report
TEXT = "The quick brown fox jumps over the lazy dog 0123456789!\n"


async def _until(pred: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.001)


async def _led_round_trip(kbd: KeyboardVsp, name: str) -> None:
    """Caps Lock toggled and its LED_INDICATORS back: the child has decoded everything sent before."""
    before = kbd.led_flags(name) & LedFlags.CAPS_LOCK
    await kbd.send_keys(name, "CapsLock")
    await _until(lambda: (kbd.led_flags(name) & LedFlags.CAPS_LOCK) != before)


def _spawn_child(sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "child_partition", "run", "--connect", f"unix:{sock}",
                             "--name", "bench", "--json-logs", "--no-reconnect", "--no-console"], cwd=str(REPO_ROOT),
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def _ours(workdir: Path, seconds: float, kind: str) -> dict[str, Any]:
    logs.setup("warning", json=True)
    sock = workdir / "vmbus.sock"
    devices = {name: name in ("keyboard", "mouse") for name in Config().devices}
    daemon = ParentDaemon(Config(listen=[f"unix:{sock}"], data_dir=str(workdir / "var"), devices=devices))
    await daemon.start()
    child = await asyncio.to_thread(_spawn_child, sock)
    try:
        kbd, mouse = daemon.device("keyboard"), daemon.device("mouse")
        assert isinstance(kbd, KeyboardVsp) and isinstance(mouse, MouseVsp)
        await _until(lambda: all("bench" in v.sessions and v.sessions["bench"].host.active for v in (kbd, mouse)))
        events = keymap.text_events(TEXT)
        meter = ProcMeter({"parent": psutil.Process(), "child": psutil.Process(child.pid)})
        sent, i = 0, 0
        meter.start()
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            if kind == "keys":
                sent += await kbd.send_events("bench", events)
            else:
                for _ in range(64):
                    i = (i + 97) & 0x7FFF
                    sent += await mouse.send_mouse("bench", i, 0x7FFF - i, i & 7)
        await _led_round_trip(kbd, "bench")
        elapsed = time.perf_counter() - t0
        cpu = meter.stop(sent)
    finally:
        child.send_signal(2)
        _, err = await asyncio.to_thread(child.communicate, timeout=30)
        await daemon.shutdown()
    stopped = [line for line in err.splitlines() if "input service stopped" in line]
    return {"events": sent, "seconds": round(elapsed, 3), "events_per_s": sent / elapsed,
            "child_counts": stopped[-1] if stopped else None,
            **{f"{who}_us_per_event": cpu["per_op"][who].get("cpu_us", 0.0) for who in ("parent", "child")}}


def _baseline(url: str, size: int, seconds: float, server_pid: int) -> dict[str, Any]:
    r = uvloop.run(echo_raw.measure(url, size, WINDOW, seconds, RAMP, server_pid))
    return {"messages_per_s": 2 * r["rtt_per_s"]}


def _med(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def run_input(workdir: Path, seconds: float, repeat: int) -> dict[str, Any]:
    """``repeat`` interleaved runs of the echo baseline and ours, for keys and for mouse reports."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = echo_raw.EchoServerProcess(workdir / "echo")
    out: dict[str, Any] = {"window": WINDOW, "transport": "unix", "repeat": repeat}
    try:
        for kind, size in SIZES.items():
            ours: list[dict[str, Any]] = []
            raw: list[dict[str, Any]] = []
            for i in range(repeat):
                raw.append(_baseline(server.urls["unix"], size, seconds, server.pid))
                ours.append(uvloop.run(_ours(workdir / f"{kind}-{i}", seconds, kind)))
            ratios = [o["events_per_s"] / r["messages_per_s"] for o, r in zip(ours, raw, strict=True)]
            out[kind] = {"payload_bytes": size, "events_per_s": _med([o["events_per_s"] for o in ours]),
                         "echo_messages_per_s": _med([r["messages_per_s"] for r in raw]),
                         "ratio": _med(ratios, 4),
                         "parent_us_per_event": _med([o["parent_us_per_event"] for o in ours]),
                         "child_us_per_event": _med([o["child_us_per_event"] for o in ours]),
                         "samples": ours}
    finally:
        server.stop()
    return out


def input_table(res: dict[str, Any]) -> Table:
    t = Table(title=f"input: events per second parent -> child vs the raw uvloop echo of the same payload size "
                    f"(unix, echo window {res['window']}; medians, range over {res['repeat']})")
    for col in ("events", "bytes", "events/s", "range", "echo msgs/s", "ratio", "CPU µs/event"):
        t.add_column(col, justify="left" if col == "events" else "right")
    for kind, label in (("keys", "keyboard EVENTs"), ("mouse", "mouse INPUT_REPORTs")):
        r = res[kind]
        e = r["events_per_s"]
        t.add_row(label, str(r["payload_bytes"]), f"{e['median']:,.0f}", f"{e['min']:,.0f}-{e['max']:,.0f}",
                  f"{r['echo_messages_per_s']['median']:,.0f}", f"{r['ratio']['median']:.4f}",
                  f"parent {r['parent_us_per_event']['median']:.1f}, child {r['child_us_per_event']['median']:.1f}")
    return t
