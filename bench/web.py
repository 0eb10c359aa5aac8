"""Screen updates delivered to one web console client, beside what the parent receives from the child.

A real ``parent-partition serve`` with the video device and its HTTP server (the web console's websocket,
``/ws/partitions/NAME``), one child partition in this process drawing as fast as it can (as ``bench/video.py``
does: whole 1024x768 frames, then 64x64 DIRT at moving places), and one websocket client in its own process
that acks every update the moment it has read it (a browser acks once it has drawn; its decoding is not in this
number). The parent's feed sends one update at a time and merges the rest (``ScreenSubscription``), so the
client sees fewer updates than the parent receives when the parent cannot encode and send as fast as the
child draws: the ratio is that merging, and MB/s is what went over the websocket (PNG for large rectangles,
raw BGRX for small ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from rich.table import Table

from .parent import ParentProcess, _free_port, start_parent
from .video import SMALL, _framebuffer, draw

NAME = "bench-video"  # the child _framebuffer starts
SETUP_TIMEOUT = 30.0


Event = multiprocessing.synchronize.Event


async def _count(url: str, seconds: float, ready: Event, go: Event, done: Event, out: Any) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        frames = rects = nbytes = 0
        started = end = 0.0
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                rects += 1
                nbytes += len(msg.data)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            if json.loads(msg.data)["t"] != "frame":
                continue
            await ws.send_str('{"t": "ack"}')
            ready.set()
            now = time.perf_counter()
            if not started and go.is_set():
                started, end = now, now + seconds
                frames = rects = nbytes = 0
            elif started:
                frames += 1
                if now >= end:
                    break
        elapsed = time.perf_counter() - started if started else 0.0
        done.set()
        out.put({"frames": frames, "rects": rects, "bytes": nbytes, "seconds": elapsed})


def _client(url: str, seconds: float, ready: Event, go: Event, done: Event, out: Any) -> None:
    uvloop.run(_count(url, seconds, ready, go, done, out))


async def _drive(parent: ParentProcess, url: str, small: bool, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, go, done, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    stop, task, fb = await _framebuffer(parent)
    proc = ctx.Process(target=_client, args=(url, seconds, ready, go, done, out), daemon=True)
    try:
        fb.pixels[:] = bytes(range(256)) * (len(fb.pixels) // 256)
        await fb.flush()
        await fb.sync()
        proc.start()
        if not await asyncio.to_thread(ready.wait, SETUP_TIMEOUT):  # connected, its first full frame taken
            raise RuntimeError(f"the websocket client got no frame from {url}")
        go.set()
        count = 0
        t0 = time.perf_counter()
        end = t0 + seconds + SETUP_TIMEOUT
        # Until the client has counted its window (from its first update after ``go``), or a hard deadline.
        while not done.is_set() and time.perf_counter() < end:
            await draw(fb, small, count)
            count += 1
        await fb.sync()
        parent_rate = count / (time.perf_counter() - t0)
        result = await asyncio.to_thread(out.get, True, SETUP_TIMEOUT + seconds)
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, SETUP_TIMEOUT)
    secs = result["seconds"] or 1.0
    return {"parent_per_s": parent_rate, "client_per_s": result["frames"] / secs,
            "client_rects_per_s": result["rects"] / secs, "client_mb_per_s": result["bytes"] / secs / 1e6}


def _med(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def run_web(workdir: Path, seconds: float, repeat: int) -> dict[str, Any]:
    port = _free_port()
    parent = start_parent(workdir / "parent", {"video"}, log_level="info",
                          extra_config=f'\n[http]\nlisten = "127.0.0.1:{port}"\n')
    url = f"ws://127.0.0.1:{port}/ws/partitions/{NAME}"
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(repeat):
            runs.append({kind: uvloop.run(_drive(parent, url, kind == "small", seconds))
                         for kind in ("full", "small")})
    finally:
        parent.stop()
    out: dict[str, Any] = {"mode": "1024x768", "small_rect": f"{SMALL}x{SMALL}", "repeat": repeat,
                           "seconds": seconds, "samples": runs}
    for kind in ("full", "small"):
        out[kind] = {key: _med([r[kind][key] for r in runs])
                     for key in ("parent_per_s", "client_per_s", "client_rects_per_s", "client_mb_per_s")}
    return out


def web_table(res: dict[str, Any]) -> Table:
    t = Table(title=f"web console: screen updates to one websocket client (medians, range over {res['repeat']})")
    for col in ("update", "parent receives /s", "client gets /s", "range", "rects /s", "MB/s to client"):
        t.add_column(col, justify="left" if col == "update" else "right")
    for kind, label in (("full", f"full frame {res['mode']}"), ("small", f"DIRT {res['small_rect']}")):
        r = res[kind]
        c = r["client_per_s"]
        t.add_row(label, f"{r['parent_per_s']['median']:,.1f}", f"{c['median']:,.1f}",
                  f"{c['min']:,.1f}-{c['max']:,.1f}", f"{r['client_rects_per_s']['median']:,.1f}",
                  f"{r['client_mb_per_s']['median']:,.1f}")
    return t
