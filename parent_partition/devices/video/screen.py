"""A partition's screen as the parent sees it: the VRAM shadow, the mode, the pointer, PNG rendering, and
dirty-rectangle subscriptions for consoles.

What OpenVMM keeps in vm/devices/framebuffer (the VRAM mapping and its format) and gives its VNC server
(vm/devices/uidevices/src/video ``process_channel`` forwards each DIRT rectangle): here the framebuffer is the
host's shadow of the guest's VRAM. On Hyper-V the host maps the VRAM GPA; over a stream the bytes of each
dirty rectangle arrive with its DIRT (docs/protocol.md §10.3) and are written into the shadow, one flat
buffer the size of the VRAM, so a row of the screen is one slice (a shared-memory transport would map the
GPADL's pages here instead). Pixels are XRGB8888, little-endian: B, G, R, X in memory.
"""

from __future__ import annotations

import asyncio
import io
import mmap
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image

from vmbus_proto.devices.video.guest import merge_rects
from vmbus_proto.devices.video.host import PointerShapeChanged
from vmbus_proto.devices.video.synthvid import Rect
from vmbus_proto.packets import Buffer

NO_SIGNAL = (640, 480)  # what an inactive or never-set screen renders as (black)
MAX_SUBSCRIPTION_RECTS = 64  # pending rectangles per subscriber before they merge into one box


@dataclass(slots=True)
class Pointer:
    """The guest's pointer: its image's upper-left pixel at (x, y) (POINTER_POSITION), and its shape."""

    x: int = 0
    y: int = 0
    visible: bool = False
    shape: PointerShapeChanged | None = None


@dataclass(frozen=True, slots=True)
class ScreenUpdate:
    """What changed since a subscriber's last update: ``rects`` of pixels (the whole screen after a mode
    change, ``resized``), and whether the pointer moved or changed shape. ``serial`` is the screen's change
    counter at the time."""

    rects: tuple[Rect, ...]
    width: int
    height: int
    resized: bool
    pointer: bool
    serial: int


class ScreenSubscription:
    """A console's feed of a screen's changes: an async iterator of :class:`ScreenUpdate`. Bounded: while the
    consumer is slow, changes merge (overlapping rectangles into their union, past 64 into one box); nothing
    queues without bound. Ends when the screen goes (its channel closed) or ``close()`` is called."""

    def __init__(self, screen: Screen, limit: int = MAX_SUBSCRIPTION_RECTS) -> None:
        self.screen = screen
        self.limit = limit
        self._rects: list[Rect] = []
        self._resized = False
        self._pointer = False
        self._closed = False
        self._wake = asyncio.Event()

    def _damage(self, rects: tuple[Rect, ...]) -> None:
        for r in rects:
            merge_rects(self._rects, r, self.limit)
        self._wake.set()

    def _resize(self) -> None:
        self._resized = True
        self._rects = []
        self._wake.set()

    def _pointer_changed(self) -> None:
        self._pointer = True
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.screen._subscribers.discard(self)

    @property
    def pending(self) -> bool:
        return bool(self._rects or self._resized or self._pointer)

    def get_nowait(self) -> ScreenUpdate | None:
        """The merged changes so far, or None when there are none."""
        if not self.pending:
            return None
        s = self.screen
        rects = (Rect(0, 0, s.width, s.height),) if self._resized else tuple(self._rects)
        update = ScreenUpdate(rects, s.width, s.height, self._resized, self._pointer, s.serial)
        self._rects, self._resized, self._pointer = [], False, False
        self._wake.clear()
        return update

    def __aiter__(self) -> AsyncIterator[ScreenUpdate]:
        return self

    async def __anext__(self) -> ScreenUpdate:
        while True:
            update = self.get_nowait()
            if update is not None:
                return update
            if self._closed:
                raise StopAsyncIteration
            await self._wake.wait()
            self._wake.clear()


class Screen:
    """One partition's screen: kept current by its video channel, read by consoles."""

    def __init__(self, partition: str) -> None:
        self.partition = partition
        self.width = 0
        self.height = 0
        self.pitch = 0
        self.active = False
        self.serial = 0  # bumped by every change (pixels, mode, pointer)
        self.pointer = Pointer()
        self.vram_size = 0
        self._vram: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._subscribers: set[ScreenSubscription] = set()
        self.closed = False

    # ---- kept current by the VSP ------------------------------------------------------------------------

    def attach_vram(self, size: int, guest: memoryview | None = None) -> None:
        """A new VRAM of ``size`` bytes (VRAM_LOCATION): zeros until the guest's DIRT brings its pixels (an
        anonymous mapping, so pages the screen never uses cost nothing); or ``guest``, the guest's own VRAM
        mapped (shared memory), which DIRT only says has changed."""
        self._release()
        if guest is not None:
            self._view = guest[:size]
        else:
            self._vram = mmap.mmap(-1, size)
            self._view = memoryview(self._vram)
        self.vram_size = size

    def detach_vram(self) -> None:
        """The guest's VRAM goes (torn down, or the channel closed): keep a copy of the last picture."""
        if self._vram is None and self._view is not None:
            copy = mmap.mmap(-1, self.vram_size)
            copy[:] = self._view
            self._release()
            self._vram, self._view = copy, memoryview(copy)

    def set_mode(self, active: bool, width: int, height: int, pitch: int) -> None:
        """SITUATION_UPDATE: the host state machine checked it fits the VRAM."""
        self.active = active
        if active:
            self.width, self.height, self.pitch = width, height, pitch
        self.serial += 1
        for sub in self._subscribers:
            sub._resize()

    def apply(self, rects: tuple[Rect, ...], pixels: Buffer) -> None:
        """DIRT: each rectangle's rows, in order, into the VRAM shadow (checked by the host state machine)."""
        view = self._view
        if view is None:
            return
        src = memoryview(pixels).cast("B")
        pitch, pos = self.pitch, 0
        for x1, y1, x2, y2 in (rects if pixels else ()):  # none: the VRAM is the guest's own, already there
            row = (x2 - x1) * 4
            if row == pitch:  # whole rows: one copy
                n = row * (y2 - y1)
                view[y1 * pitch:y1 * pitch + n] = src[pos:pos + n]
                pos += n
                continue
            at = y1 * pitch + x1 * 4
            for _ in range(y2 - y1):
                view[at:at + row] = src[pos:pos + row]
                pos += row
                at += pitch
        self.serial += 1
        for sub in self._subscribers:
            sub._damage(rects)

    def move_pointer(self, x: int, y: int, visible: bool) -> None:
        self.pointer.x, self.pointer.y, self.pointer.visible = x, y, visible
        self._pointer_changed()

    def set_pointer_shape(self, shape: PointerShapeChanged) -> None:
        self.pointer.shape = shape
        self._pointer_changed()

    def _pointer_changed(self) -> None:
        self.serial += 1
        for sub in self._subscribers:
            sub._pointer_changed()

    def close(self) -> None:
        """The channel closed: subscriptions end; the last picture stays readable."""
        self.closed = True
        self.detach_vram()
        for sub in list(self._subscribers):
            sub.close()

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        self._vram = None  # freed once no image still reads it

    # ---- read by consoles -------------------------------------------------------------------------------

    def subscribe(self, limit: int = MAX_SUBSCRIPTION_RECTS) -> ScreenSubscription:
        """A feed of this screen's changes (see :class:`ScreenSubscription`); ``close()`` it when done."""
        sub = ScreenSubscription(self, limit)
        if self.closed:
            sub._closed = True
        else:
            self._subscribers.add(sub)
        return sub

    def pixels(self, rect: Rect | None = None) -> bytes:
        """The XRGB8888 bytes of ``rect`` (default the whole screen), rows packed (pitch = width * 4)."""
        r = rect or Rect(0, 0, self.width, self.height)
        view = self._view
        if view is None or not self.active:
            return bytes(r.width * r.height * 4)
        a, b = r.x1 * 4, r.x2 * 4
        return b"".join(view[y * self.pitch + a:y * self.pitch + b] for y in range(r.y1, r.y2))

    def image(self, with_pointer: bool = True) -> Image.Image:
        """The screen as an RGB image (black "no signal" when inactive), the pointer drawn if visible."""
        view = self._view
        if view is None or not self.active or not self.width:
            w, h = (self.width, self.height) if self.width else NO_SIGNAL
            return Image.new("RGB", (w, h))
        # BGRX is converted, not shared: the image is detached from the VRAM shadow, which may change meanwhile.
        img = Image.frombuffer("RGB", (self.width, self.height), bytes(view[:self.pitch * self.height]), "raw",
                               "BGRX", self.pitch, 1)
        if with_pointer:
            self._draw_pointer(img)
        return img

    def _draw_pointer(self, img: Image.Image) -> None:
        p = self.pointer
        shape = p.shape
        if not p.visible or shape is None:
            return
        if shape.argb:
            cursor = Image.frombuffer("RGBA", (shape.width, shape.height), shape.data, "raw", "BGRA", 0, 1)
            img.paste(cursor, (p.x, p.y), cursor)
            return
        # Monochrome: an AND mask then an XOR mask, 1 bit a pixel, rows padded to bytes.
        stride = (shape.width + 7) // 8
        xor_at = stride * shape.height
        px = img.load()
        assert px is not None
        for yy in range(shape.height):
            for xx in range(shape.width):
                x, y = p.x + xx, p.y + yy
                if not (0 <= x < img.width and 0 <= y < img.height):
                    continue
                bit = 0x80 >> (xx & 7)
                and_ = shape.data[yy * stride + xx // 8] & bit
                xor = shape.data[xor_at + yy * stride + xx // 8] & bit
                old = px[x, y]
                assert isinstance(old, tuple)
                base = old if and_ else (0, 0, 0)
                px[x, y] = tuple(255 - c for c in base) if xor else base

    def png(self, scale: float | None = None) -> bytes:
        """The screen as PNG bytes; ``scale`` resizes it (0.25 for a thumbnail). CPU work: in an event loop, take
        ``image()`` there and give it to :func:`encode_png` in a thread."""
        return encode_png(self.image(), scale)


def encode_png(img: Image.Image, scale: float | None = None) -> bytes:
    """``img`` as PNG bytes (fast compression), resized by ``scale`` first if given."""
    if scale is not None and scale != 1:
        if scale <= 0:
            raise ValueError(f"scale must be positive, not {scale}")
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()
