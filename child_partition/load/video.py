"""``child-partition load video``: frames and DIRT through real SYNTHVID channels, as a guest's display driver
sends them.

Each partition is a guest on its own VMBus connection that binds only the synthetic video driver (Linux
drivers/video/fbdev/hyperv_fb.c ``hvfb_probe``): the SYNTHVID version, the 8 MiB VRAM shared by GPADL and named
in VRAM_LOCATION, the mode in SITUATION_UPDATE, and the host's FEATURE_CHANGE asking for DIRT. Then each
operation is one frame: the guest writes new pixels into its VRAM (``--frame full``: the whole screen;
``--frame rects``: ``--rects N`` rectangles) and reports them in DIRT, whose pixels ride along over the stream
(docs/protocol.md §10.3). Every frame paints pixel (0, 0) with its own colour, the frame number, so a viewer
can tell which frame it sees. Operations: ``frame`` (bytes: the pixels the frame changed) and ``dirt`` (one
per DIRT message, bytes: the pixels it carried; a full 1024x768 frame needs three, as one DIRT carries at most
1 MiB of pixels). Frames of one partition are drawn one at a time (one VRAM, one damage list), whatever the
number of workers.

What the protocol allows, measured rather than assumed: SYNTHVID has no rate limit. The host (Hyper-V, OpenVMM's
``process_channel``, this parent's VSP) applies every DIRT as it arrives and answers none; the only pacing is
the ring's. The 50 ms in hyperv_fb is the guest's own policy: ``hvfb_update_work`` runs at most every HZ/20 and
sends the damage merged since, so an fbdev guest shows at most 20 DIRT a second however fast it draws, while
hyperv_drm (drivers/gpu/drm/hyperv) sends DIRT from each atomic commit at once. ``--dirt now`` (the default)
sends each frame's DIRT at once, as hyperv_drm does, and measures what the channel and the parent sustain;
``--dirt fbdev`` leaves the damage to the VSC's 50 ms work as hyperv_fb does: frames drawn meanwhile ride in one
DIRT, and the results count them (``coalesced``). On the parent the only other merging is the web console's:
a browser gets one update in flight, and changes made meanwhile merge into it.

``--measure screen`` (needs ``--http``) watches the parent's web console of each partition
(``/ws/partitions/NAME``, as a browser does: it acknowledges every update) and records ``visible``: from the
frame's first pixel written to the console showing that frame or a later one. A frame then completes only
once it is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType
from PIL import Image

from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.devices.video import synthvid
from vmbus_proto.devices.video.guest import merge_rects
from vmbus_proto.devices.video.host import pixel_bytes
from vmbus_proto.devices.video.synthvid import Rect
from vmbus_proto.packets import Packet

from ..devices.video.framebuffer import Framebuffer
from ..devices.video.service import mode_arg
from ..devices.video.vsc import VideoVsc
from .guest import STEP_TIMEOUT, LoadGuest, http_session, need_http
from .workload import Done, LoadOptions, Recorder

FRAMES = ("full", "rects")
PACING = ("now", "fbdev")
MARKER_MASK = 0xFFFFFF  # a frame's number in the colour of its pixels (B, G, R)
WS_RECT = "<BxHHHH"  # the console's rectangle header: encoding, x, y, width, height (parent web/console/live.py)
WS_HEADER = 10
WS_RAW, WS_PNG = 0, 1
WS_PNG_BYTE = bytes((WS_PNG,))
_DIRT_TYPE = int(synthvid.MessageType.DIRT).to_bytes(4, "little")


def marker(n: int) -> bytes:
    """Frame ``n``'s pixel, BGRX: its number's low 24 bits as blue, green, red."""
    n &= MARKER_MASK
    return bytes((n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF, 0))


def marker_value(bgrx: bytes) -> int:
    return bgrx[0] | bgrx[1] << 8 | bgrx[2] << 16


def unwrap(low: int, latest: int) -> int:
    """The frame number at most ``latest`` whose low 24 bits are ``low``."""
    return latest - ((latest - low) & MARKER_MASK)


def frame_rects(rnd: random.Random, width: int, height: int, count: int) -> list[Rect]:
    """``count`` rectangles inside a ``width`` x ``height`` screen, up to an eighth of it each way; the first
    starts at (0, 0) so every frame repaints the pixel that carries its number."""
    out = []
    for i in range(count):
        w = rnd.randint(8, max(8, width // 8))
        h = rnd.randint(8, max(8, height // 8))
        x = 0 if i == 0 else rnd.randrange(0, width - w + 1)
        y = 0 if i == 0 else rnd.randrange(0, height - h + 1)
        out.append(Rect(x, y, x + w, y + h))
    return out


def carried(rects: list[Rect]) -> int:
    """The pixel bytes one DIRT batch of ``rects`` carries: overlapping or touching ones merge first (as the
    guest merges its damage)."""
    merged: list[Rect] = []
    for r in rects:
        merge_rects(merged, r)
    return pixel_bytes(merged)


def paint(pixels: memoryview, pitch: int, rects: list[Rect], pixel: bytes) -> None:
    """Fill ``rects`` of an XRGB8888 framebuffer with one BGRX ``pixel``."""
    for x1, y1, x2, y2 in rects:
        row = pixel * (x2 - x1)
        if x1 == 0 and len(row) == pitch:
            pixels[y1 * pitch:y2 * pitch] = row * (y2 - y1)
            continue
        for y in range(y1, y2):
            at = y * pitch + x1 * 4
            pixels[at:at + len(row)] = row


def ws_marker(message: bytes) -> int | None:
    """The low 24 bits of the frame number a console rectangle message shows at (0, 0), or None when the
    rectangle does not start there."""
    if len(message) < WS_HEADER + 4:
        return None
    enc, x, y = message[0], int.from_bytes(message[2:4], "little"), int.from_bytes(message[4:6], "little")
    if x or y:
        return None
    if enc == WS_RAW:
        return marker_value(message[WS_HEADER:WS_HEADER + 4])
    if enc == WS_PNG:
        with Image.open(io.BytesIO(message[WS_HEADER:])) as img:
            b, g, r = img.convert("RGB").getpixel((0, 0))[::-1]  # type: ignore[index]
        return marker_value(bytes((b, g, r)))
    return None


@dataclass(slots=True)
class VideoConfig:
    frame: str = "full"
    rects: int = 8
    mode: tuple[int, int] | None = None
    dirt: str = "now"
    measure: str = "send"


class ScreenWatch:
    """The parent's web console of one partition, read as a browser reads it: the frame number shown at (0, 0)."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.shown_low = 0  # low 24 bits of the frame number last shown
        self.updates = 0
        self.changed = asyncio.Condition()
        self.error: str | None = None
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    data = msg.data  # a PNG (a big rectangle) is decoded off the loop
                    low = await asyncio.to_thread(ws_marker, data) if data[:1] == WS_PNG_BYTE else ws_marker(data)
                    if low is not None:
                        async with self.changed:
                            self.shown_low = low
                            self.updates += 1
                            self.changed.notify_all()
                elif msg.type == WSMsgType.TEXT:
                    obj = json.loads(msg.data)
                    if obj.get("t") == "frame":
                        await self.ws.send_str('{"t": "ack"}')  # drawn: the next update may come
                    elif obj.get("t") == "error":
                        self.error = str(obj.get("message"))
        finally:
            async with self.changed:
                self.error = self.error or f"the console socket closed ({self.ws.close_code})"
                self.changed.notify_all()

    async def wait_shown(self, n: int, latest: Callable[[], int]) -> None:
        """Until the console shows frame ``n`` or a later one (``latest()``: the newest drawn, read at each look,
        since other operations go on drawing meanwhile)."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(
                    lambda: unwrap(self.shown_low, latest()) >= n or self.error is not None), STEP_TIMEOUT)
            except TimeoutError:
                raise TimeoutError(f"frame {n} not shown on the console in {STEP_TIMEOUT:g}s: it shows frame "
                                   f"{unwrap(self.shown_low, latest())} after {self.updates} updates") from None
            if unwrap(self.shown_low, latest()) < n:
                raise RuntimeError(f"frame {n} never shown on the console: {self.error}")

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class VideoPartition:
    """One guest drawing frames into its VRAM."""

    def __init__(self, guest: LoadGuest, vsc: VideoVsc, fb: Framebuffer, config: VideoConfig, seed: int) -> None:
        self.name = guest.name
        self.guest, self.vsc, self.fb, self.config = guest, vsc, fb, config
        self.rnd = random.Random(seed)
        self.draw = asyncio.Lock()  # frames are drawn one at a time (one VRAM, one damage list)
        self.frames = 0  # frames drawn
        self.dirt_messages = 0  # DIRT the channel took
        self.dirt_bytes = 0
        self.flushes = 0  # sends that carried DIRT (several frames ride in one under --dirt fbdev)
        self._unrecorded: list[int] = []  # bytes of each DIRT not yet recorded as a "dirt" operation
        self._sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.watch: ScreenWatch | None = None
        self.visible_waits = 0
        vsc.on_sent = self._on_sent
        assert vsc.guest is not None
        self.created = vsc.guest.dirt_sent  # DIRT messages the guest state machine has made
        self.dirt_messages = self.created  # all of them sent: nothing is pending after setup

    def _on_sent(self, packets: list[Packet]) -> None:
        dirts = [len(p.data) for p in packets if p.payload[8:12] == _DIRT_TYPE]  # after the pipe header
        if not dirts:
            return
        self.dirt_messages += len(dirts)
        self.dirt_bytes += sum(dirts)
        self.flushes += 1
        self._unrecorded += dirts
        sent, self._sent = self._sent, asyncio.get_running_loop().create_future()
        sent.set_result(None)

    async def operation(self, rec: Recorder) -> Done:
        fb, config = self.fb, self.config
        t0 = time.monotonic()
        async with self.draw:
            if not fb.open:
                raise ChannelClosed(f"{self.name}: the video channel is closed")
            self.frames = n = self.frames + 1
            rects = ([Rect(0, 0, fb.width, fb.height)] if config.frame == "full"
                     else frame_rects(self.rnd, fb.width, fb.height, config.rects))
            paint(fb.pixels, fb.pitch, rects, marker(n))
            assert self.vsc.guest is not None
            target = self.vsc.guest.dirt_sent + 1  # the first DIRT made from now on carries this frame
            fb.dirty(rects)
            if config.dirt == "now":
                await fb.flush()
        while self.dirt_messages < target:  # --dirt fbdev: the VSC's 50 ms work sends it
            await asyncio.wait_for(asyncio.shield(self._sent), STEP_TIMEOUT)
        usec = int((time.monotonic() - t0) * 1e6)
        dirts, self._unrecorded = self._unrecorded, []
        for nbytes in dirts:
            rec.record("dirt", usec, nbytes)
        if self.watch is not None:
            await self.watch.wait_shown(n, lambda: self.frames)
            rec.record("visible", int((time.monotonic() - t0) * 1e6))
        return Done("frame", carried(rects))

    def results(self) -> dict[str, int]:
        return {"frames": self.frames, "dirt_messages": self.dirt_messages - self.created,
                "dirt_bytes": self.dirt_bytes, "dirt_sends": self.flushes,
                "coalesced": max(0, self.frames - self.flushes)}

    async def stop(self) -> None:
        self.vsc.on_sent = None
        if not self._sent.done():  # a frame still waiting for its DIRT ends now, not at its timeout
            self._sent.set_exception(ChannelClosed(f"{self.name}: stopped before the DIRT was sent"))
            self._sent.exception()  # retrieved: nobody need be waiting
        try:
            if self.watch is not None:
                await self.watch.close()
        finally:
            await self.guest.leave()


class VideoWorkload:
    name: ClassVar[str] = "video"
    description: ClassVar[str] = "frames and DIRT through SYNTHVID: each partition draws into its VRAM"

    def __init__(self, options: LoadOptions, config: VideoConfig) -> None:
        self.options, self.config = options, config
        self.http = need_http("--measure screen", options.http) if config.measure == "screen" else None
        self.session: ClientSession | None = None
        self.parts: list[VideoPartition] = []
        self.log = logs.get(component="load video")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--frame", choices=FRAMES, default="full",
                            help="what a frame repaints: the whole screen, or --rects rectangles (default full)")
        parser.add_argument("--rects", type=int, default=8, metavar="N",
                            help="rectangles a frame repaints with --frame rects (1-255, default 8)")
        parser.add_argument("--mode", type=mode_arg, default=None, metavar="WxH",
                            help="the screen mode to set (default: the parent's default mode)")
        parser.add_argument("--dirt", choices=PACING, default="now",
                            help="now: each frame's DIRT at once (hyperv_drm); fbdev: at most every 50 ms, frames "
                                 "drawn meanwhile merged (hyperv_fb) (default now)")
        parser.add_argument("--measure", choices=("send", "screen"), default="send",
                            help="screen: also wait until the parent's web console shows each frame and record "
                                 "'visible' latency (needs --http)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> VideoWorkload:
        mode = args.mode
        if isinstance(mode, str):  # a workload file gives it as text
            mode = mode_arg(mode)
        if not 1 <= args.rects <= synthvid.MAX_DIRT_RECTS:
            raise ValueError(f"--rects must be 1 to {synthvid.MAX_DIRT_RECTS}, not {args.rects}")
        return cls(options, VideoConfig(frame=args.frame, rects=args.rects, mode=mode, dirt=args.dirt,
                                        measure=args.measure))

    async def setup(self) -> None:
        if self.http is not None:
            self.session = http_session(self.options.http_token)

    async def start_partition(self, index: int) -> VideoPartition:
        guest = LoadGuest(self.options.connect, f"{self.options.prefix}-{index}", self.log, secret=self.options.secret)
        try:
            await guest.connect()
            vsc = await guest.bind(guest.offer_of(synthvid.SPEC))
            assert isinstance(vsc, VideoVsc)
            fb = vsc.framebuffer
            if fb is None:
                raise RuntimeError(f"{guest.name}: the video driver came up without a framebuffer")
            if self.config.mode is not None and self.config.mode != fb.size:
                fb.set_mode(*self.config.mode)
            await fb.sync()  # the host has the mode and has asked for DIRT (FEATURE_CHANGE) by now
            if not fb.dirt_enabled:
                raise RuntimeError(f"{guest.name}: the parent never asked for DIRT (no FEATURE_CHANGE)")
            await fb.flush()
            part = VideoPartition(guest, vsc, fb, self.config, seed=index)
            if self.session is not None and self.http is not None:
                ws = await self.session.ws_connect(f"{self.http}/ws/partitions/{guest.name}")
                part.watch = ScreenWatch(ws)
        except BaseException:
            await guest.leave()
            raise
        self.parts.append(part)
        return part

    async def teardown(self) -> dict[str, Any]:
        if self.session is not None:
            await self.session.close()
        totals: dict[str, int] = {}
        for p in self.parts:
            for k, v in p.results().items():
                totals[k] = totals.get(k, 0) + v
        return {"video": {"frame": self.config.frame, "dirt": self.config.dirt, "measure": self.config.measure,
                          **totals}}
