"""Shell tier: the video VSP against its VSC over an in-memory channel pair: the VRAM shared by GPADL, the
guest's drawing in the parent's screen, a new mode, DIRT throttling, and removal."""

from __future__ import annotations

import pytest
from PIL import Image

from child_partition.devices.video.vsc import VideoVsc
from parent_partition.devices.video.vsp import VideoVsp
from vmbus_proto.devices.video.synthvid import VRAM_SIZE

from .adapters import attach
from .waits import until

pytestmark = pytest.mark.usefixtures("memory_mode")  # each test in both memory modes (conftest)

async def test_the_guests_drawing_reaches_the_hosts_screen_and_a_new_mode_resizes_it() -> None:
    vsp = VideoVsp()
    devices = await attach(vsp, VideoVsc)
    try:
        vsc = devices.vsc
        assert isinstance(vsc, VideoVsc) and vsc.framebuffer is not None
        fb = vsc.framebuffer
        assert fb.size == (1024, 768) and len(vsc.vram_pfns) * 4096 == VRAM_SIZE
        screen = vsp.screens["vm1"]
        await until(lambda: fb.dirt_enabled, "the host asked for DIRT")
        fb.draw(Image.new("RGB", (100, 50), (255, 0, 0)), 10, 20)
        await until(lambda: screen.image().getpixel((109, 69)) == (255, 0, 0), "the red box is on the host's screen")
        assert screen.image().getpixel((110, 70)) == (0, 0, 0)
        fb.set_mode(800, 600)
        fb.draw(Image.new("RGB", (800, 600), (0, 0, 200)))
        await fb.flush()
        await until(lambda: (screen.width, screen.height) == (800, 600)
                    and screen.image().getpixel((799, 599)) == (0, 0, 200), "the 800x600 blue screen")
        assert vsp.errors == 0 and vsp.hosts["vm1"].dirt_messages >= 2
    finally:
        await devices.close()
    assert "vm1" not in vsp.screens and devices.bus.torn_down and vsc.vram_pfns == []
