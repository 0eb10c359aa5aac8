"""The parent's Screen: DIRT pixels into the VRAM shadow, PNG with the pointer drawn, bounded subscriptions."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from parent_partition.config import Config, ConfigError
from parent_partition.devices.video.screen import NO_SIGNAL, Screen
from parent_partition.devices.video.vsp import VideoVsp
from parent_partition.vsp import HostContext
from vmbus_proto.devices.video.host import PointerShapeChanged
from vmbus_proto.devices.video.synthvid import Rect


def _screen(w: int = 64, h: int = 48) -> Screen:
    s = Screen("vm1")
    s.attach_vram(1 << 20)
    s.set_mode(True, w, h, w * 4)
    return s


def _xrgb(r: int, g: int, b: int) -> bytes:
    return bytes([b, g, r, 0])


def test_dirt_pixels_land_where_their_rectangles_say() -> None:
    s = _screen()
    s.apply((Rect(0, 0, 64, 2), Rect(10, 20, 12, 23)), _xrgb(255, 0, 0) * 128 + _xrgb(0, 0, 255) * 6)
    img = Image.open(io.BytesIO(s.png())).convert("RGB")
    assert img.size == (64, 48)
    assert img.getpixel((63, 1)) == (255, 0, 0) and img.getpixel((0, 2)) == (0, 0, 0)
    assert img.getpixel((11, 22)) == (0, 0, 255) and img.getpixel((12, 22)) == (0, 0, 0)
    assert s.pixels(Rect(10, 20, 12, 21)) == _xrgb(0, 0, 255) * 2
    assert Image.open(io.BytesIO(s.png(scale=0.5))).size == (32, 24)
    with pytest.raises(ValueError, match="scale"):
        s.png(scale=0)


def test_an_inactive_or_unset_screen_renders_black() -> None:
    assert Screen("x").image().size == NO_SIGNAL
    s = _screen()
    s.apply((Rect(0, 0, 1, 1),), _xrgb(9, 9, 9))
    s.set_mode(False, 0, 0, 0)
    assert s.image().getpixel((0, 0)) == (0, 0, 0) and s.image().size == (64, 48)


def test_the_pointer_is_drawn_where_the_guest_put_it() -> None:
    s = _screen()
    green = bytes([0, 255, 0, 255])  # B, G, R, A
    s.set_pointer_shape(PointerShapeChanged(True, 2, 2, 0, 0, green * 4))
    s.move_pointer(30, 40, True)
    img = s.image()
    assert img.getpixel((31, 41)) == (0, 255, 0) and img.getpixel((32, 41)) == (0, 0, 0)
    assert s.image(with_pointer=False).getpixel((31, 41)) == (0, 0, 0)
    s.move_pointer(30, 40, False)
    assert s.image().getpixel((31, 41)) == (0, 0, 0)
    # A monochrome pointer: AND 0 / XOR 1 is white, AND 1 / XOR 0 leaves the screen.
    s.set_pointer_shape(PointerShapeChanged(False, 2, 1, 0, 0, bytes([0b01000000, 0b10000000])))
    s.move_pointer(5, 5, True)
    img = s.image()
    assert img.getpixel((5, 5)) == (255, 255, 255) and img.getpixel((6, 5)) == (0, 0, 0)


async def test_subscriptions_merge_while_the_consumer_is_slow_and_end_with_the_screen() -> None:
    s = _screen()
    sub = s.subscribe(limit=4)
    for i in range(100):  # the consumer reads nothing meanwhile
        s.apply((Rect(i % 60, 0, i % 60 + 1, 1),), bytes(4))
    update = await asyncio.wait_for(sub.__anext__(), 30)
    assert len(update.rects) <= 4 and not update.resized, update
    s.move_pointer(1, 1, True)
    s.set_mode(True, 32, 32, 128)
    update = await asyncio.wait_for(sub.__anext__(), 30)
    assert update.resized and update.pointer and update.rects == (Rect(0, 0, 32, 32),), update
    assert sub.get_nowait() is None
    s.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(sub.__anext__(), 30)
    assert [u async for u in s.subscribe()] == []


def test_video_settings_from_toml(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[video]\nresolutions = ["800x600", "1280x1024"]\ndefault = "1280x1024"\n')
    cfg = Config.load(str(tmp_path / "p.toml"))
    vsp = VideoVsp.create(cfg.section("video"), HostContext())
    assert vsp.settings.resolutions == [(800, 600), (1280, 1024)] and vsp.default_index == 1
    for text, message in (('[video]\nresolutions = ["100x100"]\n', "must be at least 640x480"),
                          ('[video]\ndefault = "2560x1600"\n', "fit the 8 MiB VRAM"),
                          ('[video]\nresolutions = []\n', "a list of 1 to 64 modes")):
        (tmp_path / "p.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            Config.load(str(tmp_path / "p.toml"))
    (tmp_path / "p.toml").write_text('[video]\nresolutions = ["800x600"]\n')
    with pytest.raises(ConfigError, match=r'default = "1024x768" is not one of the resolutions \("800x600"\)'):
        VideoVsp.check(Config.load(str(tmp_path / "p.toml")).section("video"), HostContext())
