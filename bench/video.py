"""Screen updates from one child to the parent through the synthetic video device, beside the raw uvloop echo.

Ours: a real ``parent-partition serve`` with only the video device, and one child partition in this process
(``ChildPartition``, the same code ``child-partition run`` runs, over the Unix socket; its boot screen off).
Full frames: the child marks its whole 1024x768 screen dirty and flushes, over and over; each frame is DIRT
messages carrying 3 MiB of pixels (cut at 1 MiB per DIRT) into the parent's VRAM shadow. Small updates: one
64x64 rectangle (16 KiB of pixels) per DIRT, at moving places. A flush returns once the channel took the
DIRT (ring and data-window credit: the parent consumed what was before), and the run ends with a
BIOS_INFO_REQUEST round trip, so every counted update has reached the parent's screen.

Baseline: ``bench/echo_raw.py``, a uvloop echo server process and a uvloop client in this process, echoing
messages of the same size (one frame's pixels; one small update's) with a window like ours; its round trips
per second stand beside our updates per second (the echo moves each message both ways, we move it once).
Reported: medians over the repeats with the range, the ratios, and the CPU microseconds per update of the
parent and of the child's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop
from rich.table import Table

from child_partition.devices.video.framebuffer import Framebuffer
from child_partition.devices.video.service import VideoService
from child_partition.runner import ChildPartition
from vmbus_proto.devices.video.synthvid import Rect
from vmbus_proto.envelope import MEMORY_MODES

from . import echo_raw
from .meter import ProcMeter
from .parent import ParentProcess, start_parent

MODE = (1024, 768)
SMALL = 64
FULL_WINDOW = 2  # full frames the data window (8 MiB) holds at once
SMALL_WINDOW = 64
SETUP_TIMEOUT = 30.0
AIM_FULL_FPS = 30


async def _framebuffer(parent: ParentProcess,
                       mode: str | None = None) -> tuple[asyncio.Event, asyncio.Task[int], Framebuffer]:
    """A child on the Unix socket, in memory mode ``mode`` (None: the default, shared there)."""
    child = ChildPartition(parent.endpoint("unix"), "bench-video", reconnect=False,
                           memory_mode=mode)
    video = child.service(VideoService)
    video.splash = False
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(child.run(stop))
    await asyncio.wait_for(video.ready.wait(), SETUP_TIMEOUT)
    fb = video.framebuffer
    assert fb is not None
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not fb.dirt_enabled:  # the host asks for DIRT right after the screen is set
        if time.monotonic() > deadline:
            raise RuntimeError("the parent never asked for DIRT")
        await asyncio.sleep(0.01)
    return stop, task, fb


async def draw(fb: Framebuffer, small: bool, count: int) -> None:
    """Update number ``count``: the whole screen, or a 64x64 rectangle at a moving place; flushed as DIRT."""
    w, h = fb.size
    if small:
        x, y = (count * 67) % (w - SMALL), (count * 31) % (h - SMALL)
        fb.dirty([Rect(x, y, x + SMALL, y + SMALL)])
    else:
        fb.dirty_all()
    await fb.flush()


async def _updates(fb: Framebuffer, small: bool, seconds: float, meter: ProcMeter) -> dict[str, Any]:
    w, h = fb.size
    fb.pixels[:] = bytes(range(256)) * (len(fb.pixels) // 256)  # something to show
    await fb.flush()
    await fb.sync()
    count = 0
    meter.start()
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        await draw(fb, small, count)
        count += 1
    await fb.sync()  # every update counted has reached the parent
    elapsed = time.perf_counter() - t0
    cpu = meter.stop(count)
    per_op = cpu.get("per_op", {})
    return {"updates": count, "seconds": round(elapsed, 3), "updates_per_s": count / elapsed,
            "mb_per_s": count * (SMALL * SMALL if small else w * h) * 4 / elapsed / 1e6,
            "parent_us_per_update": per_op.get("parent", {}).get("cpu_us"),
            "child_us_per_update": per_op.get("child", {}).get("cpu_us"), "steal_frac": cpu["steal_frac"]}


async def _ours(parent: ParentProcess, seconds: float, mode: str) -> dict[str, Any]:
    stop, task, fb = await _framebuffer(parent, mode)
    try:
        meter = ProcMeter({"parent": parent.ps, "child": psutil.Process()})
        full = await _updates(fb, False, seconds, meter)
        small = await _updates(fb, True, seconds, meter)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, SETUP_TIMEOUT)
    return {"full": full, "small": small}


def _echo(url: str, size: int, window: int, seconds: float, server_pid: int) -> dict[str, Any]:
    r = uvloop.run(echo_raw.measure(url, size, window, seconds, 0.5, server_pid))
    return {"messages_per_s": r["rtt_per_s"], "mb_per_s": r["mb_per_s"]}


def _med(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def run_video(workdir: Path, seconds: float, repeat: int) -> dict[str, Any]:
    """``repeat`` interleaved runs of the echo baselines and ours (full frames, then small updates)."""
    server = echo_raw.EchoServerProcess(workdir / "echo")
    parent = start_parent(workdir / "parent", {"video"}, log_level="info")
    frame_bytes, small_bytes = MODE[0] * MODE[1] * 4, SMALL * SMALL * 4
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(repeat):
            echo_full = _echo(server.urls["unix"], frame_bytes, FULL_WINDOW, seconds, server.pid)
            echo_small = _echo(server.urls["unix"], small_bytes, SMALL_WINDOW, seconds, server.pid)
            ours = {mode: uvloop.run(_ours(parent, seconds, mode)) for mode in MEMORY_MODES}
            runs.append({"ours": ours["stream"], "ours_shared": ours["shared"], "echo_full": echo_full,
                         "echo_small": echo_small})
    finally:
        server.stop()
        parent.stop()
    out: dict[str, Any] = {"mode": f"{MODE[0]}x{MODE[1]}", "small_rect": f"{SMALL}x{SMALL}", "transport": "unix",
                           "repeat": repeat, "seconds": seconds, "aim_full_fps": AIM_FULL_FPS, "samples": runs}
    out.update(_summary(runs, "ours"))  # streaming: the pixels travel with each DIRT
    out["shared"] = _summary(runs, "ours_shared")  # shared memory: the parent's screen is the guest's VRAM
    out["meets_aim"] = out["full"]["updates_per_s"]["median"] >= AIM_FULL_FPS
    return out


def _summary(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, echo in (("full", "echo_full"), ("small", "echo_small")):
        ours_rates = [r[key][kind]["updates_per_s"] for r in runs]
        echo_rates = [r[echo]["messages_per_s"] for r in runs]
        out[kind] = {
            "updates_per_s": _med(ours_rates),
            "mb_per_s": _med([r[key][kind]["mb_per_s"] for r in runs]),
            "echo_per_s": _med(echo_rates),
            "ratio": _med([o / e for o, e in zip(ours_rates, echo_rates, strict=True)]),
            "parent_us_per_update": _med([r[key][kind]["parent_us_per_update"] or 0 for r in runs]),
            "child_us_per_update": _med([r[key][kind]["child_us_per_update"] or 0 for r in runs]),
        }
    return out


def video_table(res: dict[str, Any]) -> Table:
    t = Table(title=f"video: screen updates from one child to the parent ({res['transport']}, streaming and in "
                    f"shared memory; medians, range over {res['repeat']}; beside the raw uvloop echo of the same "
                    f"message size)")
    for col in ("update", "memory", "ours /s", "range", "MB/s", "echo /s", "ratio", "CPU µs/update"):
        t.add_column(col, justify="left" if col in ("update", "memory") else "right")
    kinds = (("full", f"full frame {res['mode']} (3 MiB)"), ("small", f"DIRT {res['small_rect']} (16 KiB)"))
    for (kind, label), (mode, rows) in itertools.product(kinds, (("stream", res), ("shared", res.get("shared")))):
        if rows is None:
            continue
        r = rows[kind]
        u = r["updates_per_s"]
        t.add_row(label, mode, f"{u['median']:,.1f}", f"{u['min']:,.1f}-{u['max']:,.1f}",
                  f"{r['mb_per_s']['median']:,.0f}",
                  f"{r['echo_per_s']['median']:,.1f}", f"{r['ratio']['median']:.2f}",
                  f"parent {r['parent_us_per_update']['median']:,.0f}, child {r['child_us_per_update']['median']:,.0f}")
    return t
