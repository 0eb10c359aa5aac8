"""The web console's websockets: a partition's screen streamed to a browser canvas with its keyboard and mouse
coming back, and the overview of all partitions for the index page.

The screen feed is what a VNC server does with a framebuffer (RFB's FramebufferUpdate of rectangles, raw or
compressed, the next update only once the client asked for it): OpenVMM's VNC server forwards each DIRT
rectangle the same way. Here each dirty rectangle is one binary message (a 10-byte header, then raw BGRX pixels
for a small rectangle or a PNG of just that rectangle), a JSON ``frame`` message closes an update, and the
browser answers ``ack`` once it has drawn it. Until then the screen's subscription merges further changes
(:class:`~parent_partition.devices.video.screen.ScreenSubscription`): one update in flight per client, never an
unbounded queue. A full frame goes out on connect and after every mode change.

Input is JSON on the same socket: ``{"t": "key", "code": KeyboardEvent.code, "down": bool}`` becomes set-1
events on the partition's synthetic keyboard, ``{"t": "mouse", "x", "y", "buttons", "wheel"}`` (screen pixels)
an absolute report on its synthetic mouse.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import weakref
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from PIL import Image

from vmbus_proto.devices.input.host import InputNotReady
from vmbus_proto.devices.input.keyboard import KeyEvent
from vmbus_proto.devices.video.host import PointerShapeChanged
from vmbus_proto.devices.video.synthvid import Rect

from ...daemon import ParentDaemon
from ...devices.input.vsp import to_absolute
from ...devices.video.screen import Screen, encode_png
from ..api import DAEMON, partition_json
from ..server import check_origin
from .keys import dom_key_events

SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("console_sockets")  # closed at shutdown
RECT = struct.Struct("<BxHHHH")  # encoding, x, y, width, height; then the pixels
RAW, PNG = 0, 1
RAW_MAX = 128 * 128  # pixels: a rectangle this small goes raw (a glyph cell is ~16x24); larger ones as PNG
LOOK = 0.25  # seconds between looks for a screen that is not there yet, and at the partitions for the index
MAX_MESSAGE = 4096  # bytes of one message from the browser (a key, a mouse report, an ack)
INPUT_QUEUE = 256  # input messages read ahead of the devices taking them (then the socket waits)


class ProtocolError(Exception):
    """A message from the browser this console does not understand: it closes that socket only."""


def _screen(daemon: ParentDaemon, name: str) -> Screen | None:
    screens: dict[str, Screen] | None = getattr(daemon.device("video"), "screens", None)
    return None if screens is None else screens.get(name)


async def _open(request: web.Request) -> web.WebSocketResponse:
    """The handshake, refused (403) from another site's page: a websocket is not bound by the same-origin policy."""
    check_origin(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    return ws


# ---- the partition page ---------------------------------------------------------------------------------------

def _clip(rect: Rect, width: int, height: int) -> Rect | None:
    x1, y1, x2, y2 = max(0, rect.x1), max(0, rect.y1), min(width, rect.x2), min(height, rect.y2)
    return Rect(x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def encode_rect(rect: Rect, pixels: bytes) -> bytes:
    """One rectangle's message: raw BGRX when small, else a PNG of it (CPU work: call it in a thread)."""
    w, h = rect.width, rect.height
    if w * h <= RAW_MAX:
        return RECT.pack(RAW, rect.x1, rect.y1, w, h) + pixels
    img = Image.frombuffer("RGB", (w, h), pixels, "raw", "BGRX", 0, 1)
    return RECT.pack(PNG, rect.x1, rect.y1, w, h) + encode_png(img)


def _encode_all(rects: list[tuple[Rect, bytes]]) -> list[bytes]:
    return [encode_rect(r, px) for r, px in rects]


def shape_png(shape: PointerShapeChanged) -> bytes:
    """The guest's pointer shape as an RGBA PNG (a monochrome AND/XOR mask: black, white or transparent)."""
    if shape.argb:
        img = Image.frombuffer("RGBA", (shape.width, shape.height), shape.data, "raw", "BGRA", 0, 1)
    else:
        stride = (shape.width + 7) // 8
        xor_at = stride * shape.height
        img = Image.new("RGBA", (shape.width, shape.height))
        for y in range(shape.height):
            for x in range(shape.width):
                bit = 0x80 >> (x & 7)
                and_ = shape.data[y * stride + x // 8] & bit
                xor = shape.data[xor_at + y * stride + x // 8] & bit
                if not and_:
                    img.putpixel((x, y), (255, 255, 255, 255) if xor else (0, 0, 0, 255))
                elif xor:  # inverts what is under it: drawn white on the dark console
                    img.putpixel((x, y), (255, 255, 255, 255))
    return encode_png(img)


class ScreenFeed:
    """One browser's view of one partition: the screen out, its keyboard and mouse in."""

    def __init__(self, daemon: ParentDaemon, name: str, ws: web.WebSocketResponse) -> None:
        self.daemon, self.name, self.ws = daemon, name, ws
        self.acked = asyncio.Event()
        self.acked.set()
        self.inputs: asyncio.Queue[list[KeyEvent] | tuple[int, int, int, int]] = asyncio.Queue(INPUT_QUEUE)
        self.width = self.height = 0
        self.shape: PointerShapeChanged | None = None
        self.log = daemon.log.bind(component="web console", partition=name)

    async def send(self, **msg: Any) -> None:
        await self.ws.send_str(json.dumps(msg))

    async def run_screen(self) -> None:
        """Follow the partition's screen, across its video channel closing and opening again."""
        while not self.ws.closed:
            screen = _screen(self.daemon, self.name)
            if screen is None or screen.closed:
                await self.send(t="mode", active=False, connected=self.name in self.daemon.partitions)
                while (screen := _screen(self.daemon, self.name)) is None or screen.closed:
                    await asyncio.sleep(LOOK)
            await self._follow(screen)

    async def _follow(self, screen: Screen) -> None:
        sub = screen.subscribe()
        try:
            await self._full(screen)
            while True:
                await self.acked.wait()  # the browser drew the last update; meanwhile changes merged in ``sub``
                update = await anext(sub, None)
                if update is None:
                    return
                if update.resized:
                    await self._full(screen)
                    continue
                await self._send(screen, list(update.rects), update.pointer, update.serial)
        finally:
            sub.close()

    async def _full(self, screen: Screen) -> None:
        self.width, self.height = screen.width, screen.height
        await self.send(t="mode", active=screen.active, width=screen.width, height=screen.height)
        rects = [Rect(0, 0, screen.width, screen.height)] if screen.active and screen.width else []
        await self._send(screen, rects, True, screen.serial)

    async def _send(self, screen: Screen, rects: list[Rect], pointer: bool, serial: int) -> None:
        # The pixels are copied here, in the loop (the VRAM shadow changes under a thread); encoded in a thread.
        clipped = [c for r in rects if (c := _clip(r, screen.width, screen.height)) is not None]
        shots = [(r, screen.pixels(r)) for r in clipped]
        big = any(r.width * r.height > RAW_MAX for r in clipped)  # a PNG to make: not in the loop
        for message in await asyncio.to_thread(_encode_all, shots) if big else _encode_all(shots):
            await self.ws.send_bytes(message)
        if pointer:
            await self._pointer(screen)
        self.acked.clear()
        await self.send(t="frame", serial=serial, rects=len(shots))

    async def _pointer(self, screen: Screen) -> None:
        p = screen.pointer
        msg: dict[str, Any] = {"t": "pointer", "x": p.x, "y": p.y, "visible": p.visible and p.shape is not None}
        if p.shape is not None and p.shape is not self.shape:
            self.shape = p.shape
            png = await asyncio.to_thread(shape_png, p.shape)
            msg["shape"] = "data:image/png;base64," + base64.b64encode(png).decode()
        await self.send(**msg)

    # ---- from the browser -----------------------------------------------------------------------------------

    async def run_input(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                raise ProtocolError(f"expected JSON text messages, got {msg.type.name}")
            try:
                obj = json.loads(msg.data)
            except ValueError:
                raise ProtocolError("a message is not JSON") from None
            if not isinstance(obj, dict):
                raise ProtocolError("a message must be a JSON object")
            await self.handle(obj)

    async def handle(self, obj: dict[str, Any]) -> None:
        """An ack at once (the screen feed waits for it); input checked here, then sent in order by
        ``run_devices``."""
        kind = obj.get("t")
        if kind == "ack":
            self.acked.set()
        elif kind == "key":
            events = _key_events(obj)
            if events is None:
                await self.send(t="error", message=f"the key {obj['code']!r} has no PC scan code; not sent")
            elif events:
                await self.inputs.put(events)
        elif kind == "mouse":
            await self.inputs.put(_mouse_report(obj))
        else:
            raise ProtocolError(f"unknown message type {kind!r} (ack, key, mouse)")

    async def run_devices(self) -> None:
        """The browser's keys and mouse reports to the partition's devices, one at a time, in order."""
        while True:
            item = await self.inputs.get()
            try:
                if isinstance(item, list):
                    await self._device("keyboard").send_events(self.name, item)
                else:
                    x, y, buttons, wheel = item
                    w, h = self.width or 1, self.height or 1
                    x, y = to_absolute(min(max(x, 0), w - 1), w), to_absolute(min(max(y, 0), h - 1), h)
                    await self._device("mouse").send_mouse(self.name, x, y, buttons, wheel)
            except InputNotReady as exc:  # the partition's keyboard or mouse is not open (yet, or any more)
                await self.send(t="error", message=str(exc))

    def _device(self, what: str) -> Any:
        vsp = self.daemon.device(what)
        if vsp is None:
            raise InputNotReady(f"this parent offers no {what} to {self.name}")
        return vsp


def _key_events(obj: dict[str, Any]) -> list[KeyEvent] | None:
    code, down = obj.get("code"), obj.get("down")
    if not isinstance(code, str) or not isinstance(down, bool):
        raise ProtocolError("a key message needs 'code' (a string) and 'down' (true or false)")
    return dom_key_events(code, down)


def _mouse_report(obj: dict[str, Any]) -> tuple[int, int, int, int]:
    vals = [obj.get(k, 0) for k in ("x", "y", "buttons", "wheel")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ProtocolError("a mouse message needs integer 'x', 'y' (screen pixels), 'buttons' and 'wheel'")
    x, y, buttons, wheel = vals
    if not (0 <= buttons <= 0x1F and -127 <= wheel <= 127):
        raise ProtocolError(f"buttons {buttons} or wheel {wheel} out of range (0..31, -127..127)")
    return x, y, buttons, wheel


async def screen_socket(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    name = request.match_info["name"]
    ws = await _open(request)
    feed = ScreenFeed(daemon, name, ws)
    tasks = [asyncio.create_task(feed.run_screen()), asyncio.create_task(feed.run_devices())]
    try:
        await feed.run_input()
    except ProtocolError as exc:
        feed.log.info("web console client refused", reason=str(exc), client=request.remote)
        with contextlib.suppress(ConnectionError):
            await feed.send(t="error", message=str(exc))
        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=str(exc)[:120].encode())
    except ConnectionError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
    return ws


# ---- the index ------------------------------------------------------------------------------------------------

def overview(daemon: ParentDaemon) -> list[dict[str, Any]]:
    """The partitions as the index shows them: what changes only when something happens (no counters)."""
    out = []
    for name, conn in sorted(daemon.partitions.items()):
        info = partition_json(conn, detail=False)
        screen = _screen(daemon, name)
        info["screen"] = None if screen is None else {
            "active": screen.active, "width": screen.width, "height": screen.height, "serial": screen.serial}
        for key in ("bytes_in", "bytes_out", "dropped_messages"):
            info.pop(key)
        out.append(info)
    return out


async def overview_socket(request: web.Request) -> web.StreamResponse:
    """The partitions, sent again whenever they change (at most every LOOK seconds): a screen's new serial is the
    browser's cue to fetch a new thumbnail."""
    daemon = request.app[DAEMON]
    ws = await _open(request)

    async def push() -> None:
        last = None
        while not ws.closed:
            now = json.dumps({"t": "partitions", "parent": daemon.name, "partitions": overview(daemon)})
            if now != last:
                await ws.send_str(now)
                last = now
            await asyncio.sleep(LOOK)

    task = asyncio.create_task(push())
    try:
        async for msg in ws:  # nothing is expected from the browser; the loop sees the close
            if msg.type == WSMsgType.TEXT:
                continue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
    return ws


async def close_sockets(app: web.Application) -> None:
    """Shutdown: close every console socket (the runner would otherwise wait for them)."""
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the parent is shutting down")


