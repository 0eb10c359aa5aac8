"""The guest's framebuffer: what Linux's fbdev gives user space on top of hyperv_fb (``/dev/fb0``: a mapping of
the VRAM, its mode, and the deferred-I/O damage that becomes DIRT), for the child's console to draw into.

Pixels are XRGB8888, little-endian (B, G, R, X in memory), ``pitch`` bytes a row, at VRAM offset 0. Drawing is
writing into ``pixels``; ``dirty(rects)`` reports what changed. DIRT goes out at most every 50 ms (hyperv_fb
``hvfb_update_work``), merged, and only once the host asked for it (FEATURE_CHANGE); ``await flush()`` sends
the damage now and waits until the channel took it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from vmbus_proto.devices.video.guest import SynthvidGuest
from vmbus_proto.devices.video.synthvid import Rect

if TYPE_CHECKING:
    from .vsc import VideoVsc


class Framebuffer:
    """One open video channel's screen, as the guest draws it."""

    def __init__(self, vsc: VideoVsc, guest: SynthvidGuest) -> None:
        self._vsc = vsc
        self._guest = guest

    @property
    def width(self) -> int:
        return self._guest.width

    @property
    def height(self) -> int:
        return self._guest.height

    @property
    def pitch(self) -> int:
        return self._guest.pitch

    @property
    def size(self) -> tuple[int, int]:
        return self._guest.width, self._guest.height

    @property
    def modes(self) -> tuple[tuple[int, int], ...]:
        """The modes the host offered (RESOLUTION_RESPONSE; empty before SYNTHVID 3.5)."""
        return self._guest.modes

    @property
    def dirt_enabled(self) -> bool:
        """The host asked for DIRT (FEATURE_CHANGE); until then damage only accumulates."""
        return self._guest.dirt_enabled

    @property
    def pixels(self) -> memoryview:
        """The VRAM bytes of the current mode (``pitch * height``), writable."""
        return self._guest.vram[:self._guest.pitch * self._guest.height]

    @property
    def open(self) -> bool:
        return self._vsc.framebuffer is self

    def dirty(self, rects: Iterable[Rect | Sequence[int]]) -> None:
        """These rectangles (x1, y1, x2, y2; exclusive ends) were drawn: DIRT within the throttle period."""
        self._guest.add_damage(rects)
        self._vsc.schedule()

    def dirty_all(self) -> None:
        self.dirty([Rect(0, 0, self.width, self.height)])

    async def flush(self) -> None:
        """Send the damage now (when the host wants DIRT) and wait until the channel has taken it."""
        await self._vsc.flush_now()

    async def sync(self) -> None:
        """Wait until the host has handled everything sent so far (its screen shows what was flushed)."""
        await self._vsc.sync()

    def set_pointer(self, x: int, y: int, visible: bool = True) -> None:
        """POINTER_POSITION: the pointer image's upper-left pixel."""
        self._guest.set_pointer(x, y, visible)
        self._vsc.schedule()

    def set_pointer_shape(self, width: int, height: int, hot_x: int, hot_y: int, argb: bytes) -> None:
        """POINTER_SHAPE: a 32-bit ARGB image (B, G, R, A bytes), up to 96x96."""
        self._guest.set_pointer_shape(width, height, hot_x, hot_y, argb)
        self._vsc.schedule()

    def set_mode(self, width: int, height: int) -> None:
        """A new mode (pitch width*4), sent as SITUATION_UPDATE; the whole screen is damaged."""
        self._guest.set_mode(width, height)
        self._vsc.schedule()

    # ---- Pillow helpers ----------------------------------------------------------------------------------

    def draw(self, image: Image.Image, x: int = 0, y: int = 0) -> Rect | None:
        """Copy ``image`` into the framebuffer at (x, y), clipped; marks and returns the damaged rectangle."""
        rect = self.blit(image, x, y)
        if rect is not None:
            self.dirty([rect])
        return rect

    def blit(self, image: Image.Image, x: int = 0, y: int = 0) -> Rect | None:
        """Copy ``image`` into the framebuffer at (x, y), clipped, without marking it: a caller drawing many
        pieces reports them together with one ``dirty``. Returns the rectangle written."""
        x1, y1 = max(0, x), max(0, y)
        x2, y2 = min(self.width, x + image.width), min(self.height, y + image.height)
        if x1 >= x2 or y1 >= y2:
            return None
        if (x1, y1, x2, y2) != (x, y, x + image.width, y + image.height):
            image = image.crop((x1 - x, y1 - y, x2 - x, y2 - y))
        raw = image.convert("RGB").tobytes("raw", "BGRX")
        row, pitch, view = (x2 - x1) * 4, self.pitch, self.pixels
        if row == pitch:
            view[y1 * pitch:y2 * pitch] = raw
        else:
            for i in range(y2 - y1):
                at = (y1 + i) * pitch + x1 * 4
                view[at:at + row] = raw[i * row:(i + 1) * row]
        return Rect(x1, y1, x2, y2)

    def image(self) -> Image.Image:
        """What the framebuffer holds now, as an RGB image."""
        return Image.frombuffer("RGB", self.size, bytes(self.pixels), "raw", "BGRX", self.pitch, 1)
