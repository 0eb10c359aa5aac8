"""The guest console end to end: a real ``child-partition run`` process draws its console into its framebuffer, the
parent daemon (in this test's event loop) receives it as DIRT over a Unix socket, and keys typed through the
parent's keyboard VSP edit the prompt and run commands. What is checked is the parent's copy of the screen, its
DIRT rectangles (``Screen.subscribe``) and the child's log (``console command``, ``console line``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from child_partition.console.screen import ConsoleScreen
from child_partition.console.terminal import FG, TITLE_BG, Grid, Renderer, Style
from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.input.vsp import KeyboardVsp, MouseVsp
from parent_partition.devices.video.screen import Screen
from parent_partition.devices.video.vsp import VideoVsp
from vmbus_proto.aio import logs
from vmbus_proto.devices.video.synthvid import Rect

from .conftest import Proc, child

pytestmark = pytest.mark.integration
W, H = 1024, 768


async def _until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting until {what}") from None


def _cells(r: Renderer, row: int, col: int, n: int) -> Rect:
    a, b = r.cell_rect(row, col), r.cell_rect(row, col + n - 1)
    return Rect(a.x1, a.y1, b.x2, b.y2)


def _expected(r: Renderer, text: str, style: Style) -> Image.Image:
    """``text`` as the console's font draws it, a glyph per cell."""
    img = Image.new("RGB", (len(text) * r.cell_w, r.cell_h))
    for i, ch in enumerate(text):
        img.paste(r.glyph(ch, style), (i * r.cell_w, 0))
    return img


def _shows(screen: Screen, rect: Rect, want: Image.Image) -> bool:
    if not screen.active or (screen.width, screen.height) != (W, H):
        return False
    return ImageChops.difference(screen.image(with_pointer=False).crop(rect), want).getbbox() is None


class Setup:
    def __init__(self, daemon: ParentDaemon, video: VideoVsp, kbd: KeyboardVsp, mouse: MouseVsp) -> None:
        self.daemon, self.video, self.kbd, self.mouse = daemon, video, kbd, mouse


async def _parent(tmp_path: Path) -> Setup:
    logs.setup("warning", json=True)
    daemon = ParentDaemon(Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var")))
    await daemon.start()
    video, kbd, mouse = daemon.device("video"), daemon.device("keyboard"), daemon.device("mouse")
    assert isinstance(video, VideoVsp) and isinstance(kbd, KeyboardVsp) and isinstance(mouse, MouseVsp)
    return Setup(daemon, video, kbd, mouse)


async def _console_up(p: Setup, vm: Proc, name: str) -> Screen:
    await asyncio.to_thread(vm.wait_event, "console drawn", 60.0)
    await asyncio.to_thread(vm.wait_event, "all offered channels open", 60.0)
    await _until(lambda: name in p.kbd.sessions and p.kbd.sessions[name].host.active, f"{name}'s keyboard is active")
    return p.video.screens[name]


async def test_the_console_shows_the_partition_and_runs_typed_commands(tmp_path: Path) -> None:
    p = await _parent(tmp_path)
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1", "--log-level", "debug")
    try:
        screen = await _console_up(p, vm, "vm1")
        r = Renderer(W, H)
        layout = ConsoleScreen(Grid(r.cols, r.rows), "vm1")  # where the console puts things at this size
        title = _cells(r, 0, 3, 3)
        await _until(lambda: _shows(screen, title, _expected(r, "vm1", Style(FG, TITLE_BG, bold=True))),
                     "the title bar shows 'vm1' in the console's font")
        prompt_y = r.cell_rect(layout.prompt_row, 0)
        start = len(layout.prompt) + 1

        # A keystroke: only small rectangles on the prompt row change for it.
        sub = screen.subscribe()
        while sub.get_nowait() is not None:
            pass
        await p.kbd.type_text("vm1", "c")
        typed = _cells(r, layout.prompt_row, start, 1)
        await _until(lambda: _shows(screen, typed, _expected(r, "c", Style(FG))), "the typed 'c' is on the prompt")
        rects: list[Rect] = []

        def dirt_on_prompt() -> bool:
            while (update := sub.get_nowait()) is not None:
                rects.extend(update.rects)
            return any(x.y1 < prompt_y.y2 and x.y2 > prompt_y.y1 for x in rects)

        # In shared memory the screen is the guest's VRAM: the pixels can show before their DIRT arrives.
        await _until(dirt_on_prompt, "a DIRT on the prompt row for a keystroke")
        sub.close()
        on_prompt = [x for x in rects if x.y1 < prompt_y.y2 and x.y2 > prompt_y.y1]
        assert all((x.x2 - x.x1) * (x.y2 - x.y1) <= 4 * r.cell_w * r.cell_h for x in on_prompt), \
            f"a keystroke sent more than its cells: {on_prompt}"
        assert all((x.x2 - x.x1) * (x.y2 - x.y1) < W * H // 8 for x in rects), f"a keystroke sent a big rect: {rects}"

        # Enter runs it: the events pane changes and the child logs the command and its output.
        pane = _cells(r, layout.events_top, 0, r.cols)
        pane = Rect(pane.x1, pane.y1, pane.x2, r.cell_rect(layout.events_top + layout.events_rows - 1, 0).y2)
        before = screen.image(with_pointer=False).crop(pane)
        mark = vm.mark()
        await p.kbd.type_text("vm1", "hannels\n")
        rec = await asyncio.to_thread(vm.wait_event, "console command", 30.0, mark)
        assert rec["text"] == "channels", rec
        out = await asyncio.to_thread(vm.wait_for, lambda x: x.get("event") == "console line"
                                      and "keyboard" in x.get("text", "") and "open" in x["text"], 30.0, mark)
        assert out["text"].startswith("relid"), out
        await _until(lambda: ImageChops.difference(screen.image(with_pointer=False).crop(pane), before).getbbox()
                     is not None, "the events pane shows the command's output")
        await p.kbd.send_keys("vm1", "f r o b Enter")
        await asyncio.to_thread(vm.wait_event, "console line", 30.0, mark, text="frob: command not found (type 'help')")

        # The mouse moves the console's pointer, an arrow it set.
        await p.mouse.send_mouse("vm1", 16384, 8192)
        await _until(lambda: (screen.pointer.x, screen.pointer.y) == (16384 * (W - 1) // 32767, 8192 * (H - 1) // 32767)
                     and screen.pointer.visible, "the pointer follows the mouse")
        shape = screen.pointer.shape
        assert shape is not None and (shape.width, shape.height) != (1, 1), f"no arrow pointer shape: {shape}"
        assert await asyncio.to_thread(vm.stop) == 0
        assert p.video.errors == 0 and not vm.events("console command failed")
    finally:
        await asyncio.to_thread(vm.stop)  # off the loop: the daemon answers the child's UNLOAD meanwhile
        await p.daemon.shutdown()


async def test_ping_typed_on_the_console_prints_the_replies(tmp_path: Path) -> None:
    p = await _parent(tmp_path)
    url = f"unix:{tmp_path}/vmbus.sock"
    vm1 = child(tmp_path, url, "vm1", "--log-level", "debug")
    vm2 = child(tmp_path, url, "vm2", "--no-console")
    try:
        await _console_up(p, vm1, "vm1")
        await asyncio.to_thread(vm2.wait_event, "guest network stack up", 60.0)
        await asyncio.to_thread(vm1.wait_for, lambda x: x.get("event") == "console line"
                                and x.get("text", "").startswith("network: link up"), 60.0)
        mark = vm1.mark()
        await p.kbd.type_text("vm1", "ping vm2 -c 2\n")
        first = await asyncio.to_thread(vm1.wait_for, lambda x: x.get("event") == "console line"
                                        and x.get("text", "").startswith("64 bytes from "), 60.0, mark)
        assert "icmp_seq=" in first["text"] and "time=" in first["text"], first
        stats = await asyncio.to_thread(vm1.wait_for, lambda x: x.get("event") == "console line"
                                        and "packets transmitted" in x.get("text", ""), 60.0, mark)
        assert stats["text"].startswith("2 packets transmitted, 2 received"), stats
    finally:
        await asyncio.gather(asyncio.to_thread(vm1.stop), asyncio.to_thread(vm2.stop))
        await p.daemon.shutdown()
