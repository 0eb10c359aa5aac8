"""The video device's service to the rest of the guest: the framebuffer of the open video channel, for a
console to draw into (what /dev/fb0 is to a Linux guest's console).

Until a console takes the screen over, the child shows what a VM's boot screen would: its partition name,
the VMBus version and its channels, drawn with Pillow into the framebuffer (``splash``), so the parent's
screen of this partition is a real picture from the start. ``--video-mode WxH`` asks for a mode other than
the host's default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from vmbus_proto.devices.registry import BY_CLASS
from vmbus_proto.versions import version_text

from ...vsc import GuestContext, GuestService, Vsc
from .framebuffer import Framebuffer

if TYPE_CHECKING:
    from .vsc import VideoVsc

BACKGROUND = (16, 32, 64)
FOREGROUND = (230, 236, 245)
ACCENT = (110, 190, 255)
FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",)


def mode_arg(text: str) -> tuple[int, int]:
    """argparse type: WIDTHxHEIGHT."""
    w, _, h = text.lower().partition("x")
    try:
        mode = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode such as 1280x1024") from None
    if mode[0] < 640 or mode[1] < 480:
        raise argparse.ArgumentTypeError(f"{text!r}: the smallest mode is 640x480")
    return mode


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A monospace font of ``size`` pixels: DejaVu Sans Mono when installed, else Pillow's own."""
    for path in FONT_PATHS:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


class VideoService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        self.mode: tuple[int, int] | None = ctx.options.get("video_mode")
        self.splash: bool = ctx.options.get("video_splash", True)  # a console that draws its own sets it False
        self.framebuffer: Framebuffer | None = None
        self.ready = asyncio.Event()  # a framebuffer is open
        self.listeners: list[Callable[[Framebuffer | None], None]] = []  # told of each new framebuffer (None: gone)
        self._vsc: VideoVsc | None = None
        self._session = False  # the session's channels are all up (the boot screen lists them)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--video-mode", metavar="WxH", type=mode_arg,
                            help="the screen mode to set instead of the host's default (for example 1280x1024)")
        parser.add_argument("--no-splash", dest="video_splash", action="store_false",
                            help="leave the screen black instead of drawing the boot screen (name and channels)")

    async def on_ready(self, vsc: Vsc) -> None:
        video: VideoVsc = vsc  # type: ignore[assignment]  # this service's VSC is the video VSC
        fb = video.framebuffer
        if fb is None:
            return
        self._vsc = video
        if self.mode is not None and self.mode != fb.size:
            try:
                fb.set_mode(*self.mode)
            except ValueError as exc:
                self.log.warning("video mode refused; keeping the host's default", error=str(exc))
        self.framebuffer = fb
        self.ready.set()
        self.log.info("framebuffer ready", width=fb.width, height=fb.height, modes=len(fb.modes))
        if self.splash and self._session:  # a device re-added: otherwise session_ready draws it
            self.draw_splash()
        for listener in list(self.listeners):
            listener(fb)

    async def session_ready(self) -> None:
        self._session = True
        if self.splash and self.framebuffer is not None:
            self.draw_splash()  # now with every channel of the session

    def on_lost(self, vsc: Vsc) -> None:
        self._session = False
        if self._vsc is vsc:
            self._vsc = None
            self.framebuffer = None
            self.ready.clear()
            for listener in list(self.listeners):
                listener(None)

    def channel_lines(self) -> list[str]:
        """One line per offered channel: relid, device, state."""
        vsc = self._vsc
        if vsc is None:
            return []
        lines = []
        channels = vsc.bus.core.channels
        for relid, offer in sorted(vsc.bus.offers.items()):
            entry = BY_CLASS.get(offer.if_type)
            name = entry.name if entry is not None else str(offer.if_type)
            ch = channels.get(relid)
            state = ch.state.name.lower() if ch is not None else "?"
            sub = f" sub-channel {offer.sub_channel_index}" if offer.sub_channel_index else ""
            lines.append(f"  relid {relid:<3} {name:<10} {state}{sub}")
        return lines

    def draw_splash(self) -> None:
        """The boot screen: the partition's name, its VMBus version and channels."""
        fb, vsc = self.framebuffer, self._vsc
        if fb is None or vsc is None:
            return
        img = Image.new("RGB", fb.size, BACKGROUND)
        d = ImageDraw.Draw(img)
        d.rectangle((0, 0, fb.width, 56), fill=(24, 48, 96))
        d.text((24, 12), f"vmbus-emu  {self.ctx.name}", font=font(28), fill=ACCENT)
        body = font(18)
        lines = [f"VMBus {version_text(vsc.bus.core.version)}, screen {fb.width}x{fb.height}x32", "",
                 "channels:", *self.channel_lines()]
        for i, line in enumerate(lines):
            d.text((24, 80 + i * 26), line, font=body, fill=FOREGROUND)
        fb.draw(img)
