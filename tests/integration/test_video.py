"""The synthetic video device end to end: a real child process draws its boot screen into guest memory, the
DIRT messages carry the pixels over a Unix socket to the parent daemon (in this test's event loop), and the
parent's PNG of that partition's screen shows them where the child drew them."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from child_partition.devices.video.service import BACKGROUND
from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.video.screen import Screen
from parent_partition.devices.video.vsp import VideoVsp
from vmbus_proto.aio import logs

from .conftest import Proc, child

pytestmark = pytest.mark.integration
HEADER = (24, 48, 96)  # the boot screen's title band (child_partition/devices/video/service.py)


async def _until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting until {what}") from None


def _png(screen: Screen) -> Image.Image:
    return Image.open(io.BytesIO(screen.png())).convert("RGB")


def _boot_screen_shown(screen: Screen, size: tuple[int, int]) -> bool:
    if not screen.active or (screen.width, screen.height) != size:
        return False
    img = screen.image(with_pointer=False)
    w, h = size
    return img.getpixel((2, 2)) == HEADER and img.getpixel((w - 3, h - 3)) == BACKGROUND


async def _run_child(tmp_path: Path, *extra: str) -> tuple[ParentDaemon, VideoVsp, Proc]:
    logs.setup("warning", json=True)
    sock = tmp_path / "vmbus.sock"
    daemon = ParentDaemon(Config(listen=[f"unix:{sock}"], data_dir=str(tmp_path / "var")))
    await daemon.start()
    video = daemon.device("video")
    assert isinstance(video, VideoVsp), "the daemon offers no video device"
    return daemon, video, child(tmp_path, f"unix:{sock}", "vm1", "--no-console", *extra)  # the boot screen


async def test_the_childs_boot_screen_reaches_the_parents_png(tmp_path: Path) -> None:
    daemon, video, vm = await _run_child(tmp_path)
    try:
        await _until(lambda: "vm1" in video.screens, "the parent has a screen for vm1")
        screen = video.screens["vm1"]
        await _until(lambda: _boot_screen_shown(screen, (1024, 768)), "vm1's boot screen fills its 1024x768 screen")
        img = _png(screen)
        assert img.size == (1024, 768), f"PNG of {img.size}"
        assert img.getpixel((2, 2)) == HEADER and img.getpixel((1020, 765)) == BACKGROUND, "colours out of place"
        # The title "vmbus-emu  vm1" is drawn in the header band: light text pixels there, none below the band.
        title = img.crop((20, 8, 400, 50)).getcolors(1 << 16) or []
        assert any(sum(c) > 400 for _, c in title), f"no title text in the header band: {title[:5]}"
        assert screen.serial > 0 and video.errors == 0
        thumb = Image.open(io.BytesIO(screen.png(scale=0.25)))
        assert thumb.size == (256, 192), f"thumbnail of {thumb.size}"
        assert await asyncio.to_thread(vm.stop) == 0
        await _until(lambda: "vm1" not in video.screens, "the screen is gone with the channel")
    finally:
        await asyncio.to_thread(vm.stop)  # off the loop: the daemon answers the child's UNLOAD meanwhile
        await daemon.shutdown()


async def test_a_mode_set_by_the_guest_resizes_the_parents_screen(tmp_path: Path) -> None:
    daemon, video, vm = await _run_child(tmp_path, "--video-mode", "1280x1024")
    try:
        await _until(lambda: "vm1" in video.screens, "the parent has a screen for vm1")
        screen = video.screens["vm1"]
        await _until(lambda: _boot_screen_shown(screen, (1280, 1024)), "vm1's boot screen fills 1280x1024")
        img = _png(screen)
        assert img.size == (1280, 1024) and img.getpixel((1275, 1020)) == BACKGROUND, f"PNG of {img.size}"
        assert screen.pitch == 1280 * 4
        assert await asyncio.to_thread(vm.stop) == 0
    finally:
        await asyncio.to_thread(vm.stop)  # off the loop: the daemon answers the child's UNLOAD meanwhile
        await daemon.shutdown()
