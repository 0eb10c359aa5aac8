"""Tier 3: the web console in real headless Chromium (Debian's ``chromium``, driven by playwright over CDP).

The daemon, its WebServer with the console plugin, and playwright all run in this test's event loop; the child
is a real ``child-partition run`` process drawing its text console into its framebuffer. What the browser shows
is read back from its canvas (``toDataURL``) and compared with the parent's copy of the screen; what the browser
typed is checked in the child's log (``console command``); the mouse where the parent's screen keeps the guest's
pointer. Every test fails on any JavaScript error or console error the pages produced.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageChops

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.input.vsp import KeyboardVsp, MouseVsp
from parent_partition.devices.video.screen import Screen
from parent_partition.devices.video.vsp import VideoVsp
from parent_partition.web import console
from parent_partition.web.server import WebServer
from parent_partition.web.settings import HttpSettings
from vmbus_proto.aio import logs
from vmbus_proto.devices.video.synthvid import Rect

from ..shell.waits import until
from .conftest import Proc, child

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package (make sysdeps installs it)
DEADLINE = 60.0  # seconds: a loaded 2-core machine runs a browser, a parent and a child here
TABLE = Rect(0, 110, 1024, 290)  # the console's channel table: still while nothing opens or closes
EVENTS = Rect(0, 300, 1024, 640)  # its event lines, which a command's output scrolls


class Browser:
    """One Chromium page with the JavaScript errors and console errors it produced."""

    def __init__(self, page: Any, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)

    async def wait(self, expression: str, what: str, timeout: float = DEADLINE) -> None:
        try:
            await self.page.wait_for_function(expression, timeout=timeout * 1000)
        except Exception as exc:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what} ({expression}); "
                                 f"page errors: {self.errors}") from exc

    async def canvas(self, rect: Rect) -> Image.Image:
        """What the page's canvas shows in ``rect``, as RGB."""
        url = await self.page.evaluate("""([x, y, w, h]) => {
            const src = document.getElementById("screen");
            const c = document.createElement("canvas");
            c.width = w; c.height = h;
            c.getContext("2d").drawImage(src, -x, -y);
            return c.toDataURL("image/png");
        }""", [rect.x1, rect.y1, rect.width, rect.height])
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")

    def assert_clean(self) -> None:
        assert not self.errors, f"the page reported errors: {self.errors}"


def parent_view(screen: Screen, rect: Rect) -> Image.Image:
    return Image.frombuffer("RGB", (rect.width, rect.height), screen.pixels(rect), "raw", "BGRX", 0, 1)


async def shows_parent(browser: Browser, screen: Screen, rect: Rect, what: str) -> Image.Image:
    """Wait until the canvas shows exactly the parent's pixels in ``rect``; returns that picture."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        seen = await browser.canvas(rect)
        if ImageChops.difference(seen, parent_view(screen, rect)).getbbox() is None:
            return seen
        if loop.time() > end:
            box = ImageChops.difference(seen, parent_view(screen, rect)).getbbox()
            raise AssertionError(f"the canvas never matched the parent's screen in {what} {rect} "
                                 f"(differs in {box}); page errors: {browser.errors}")
        await asyncio.sleep(0.1)


class Setup:
    def __init__(self, daemon: ParentDaemon, web: WebServer, url: str, vm: Proc, browser: Browser) -> None:
        self.daemon, self.web, self.url, self.vm, self.browser = daemon, web, url, vm, browser

    @property
    def screen(self) -> Screen:
        video = self.daemon.device("video")
        assert isinstance(video, VideoVsp)
        return video.screens["vm1"]


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no browser at {CHROMIUM}: install Debian's chromium (make sysdeps, or apt-get install chromium)")
    from playwright.async_api import async_playwright  # noqa: PLC0415 - a dev dependency

    # As root (a container, CI) Chromium's sandbox cannot start: --no-sandbox, as its error message says.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args, timeout=DEADLINE * 1000)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def running(tmp_path: Path, chromium: Any) -> AsyncIterator[Setup]:
    logs.setup("warning", json=True)
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    daemon = ParentDaemon(cfg)
    await daemon.start()
    web = WebServer(daemon, HttpSettings(listen="127.0.0.1:0", explicit=True), plugins=[console.setup])
    url = await web.start()
    assert url is not None
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1")
    try:
        await asyncio.to_thread(vm.wait_event, "console drawn", DEADLINE)
        await asyncio.to_thread(vm.wait_event, "all offered channels open", DEADLINE)
        kbd, mouse = daemon.device("keyboard"), daemon.device("mouse")
        assert isinstance(kbd, KeyboardVsp) and isinstance(mouse, MouseVsp)
        await until(lambda: all("vm1" in d.sessions and d.sessions["vm1"].host.active for d in (kbd, mouse)),
                    "vm1's keyboard and mouse are active", DEADLINE)
        context = await chromium.new_context(viewport={"width": 1440, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(DEADLINE * 1000)
        yield Setup(daemon, web, url, vm, Browser(page, url))
        await context.close()
        assert await asyncio.to_thread(vm.stop) == 0, "the child did not shut down cleanly"
    finally:
        await asyncio.to_thread(vm.stop)
        await web.stop()
        await daemon.shutdown()


async def test_index_lists_the_child_with_a_live_thumbnail(running: Setup) -> None:
    b = running.browser
    await b.page.goto(running.url + "/")
    card = '[data-partition="vm1"]'
    await b.wait(f'document.querySelector(\'{card} img\') && document.querySelector(\'{card} img\').naturalWidth > 0',
                 "vm1's card shows a thumbnail of its screen")
    width = await b.page.evaluate(f"document.querySelector('{card} img').naturalWidth")
    assert width == running.screen.width // 2, f"the thumbnail is {width} pixels wide, not half the screen's"
    pills = await b.page.eval_on_selector_all(f"{card} .pill", "ps => ps.map(p => [p.textContent, p.className])")
    assert ["video", "pill st-open"] in pills and ["keyboard", "pill st-open"] in pills, pills
    link = await b.page.eval_on_selector(f"{card} .title a", "a => a.getAttribute('href')")
    assert link == "/partitions/vm1", link
    # The thumbnail follows the screen: typing changes the screen, and a newer thumbnail is fetched.
    before = await b.page.evaluate("window.vmbusIndex.thumbnails")
    mark = running.vm.mark()
    kbd = running.daemon.device("keyboard")
    assert isinstance(kbd, KeyboardVsp)
    await kbd.type_text("vm1", "uptime\n")
    await asyncio.to_thread(running.vm.wait_event, "console command", DEADLINE, mark, text="uptime")
    await b.wait(f"window.vmbusIndex.thumbnails > {before}", "a newer thumbnail is loaded after the screen changed")
    # The partition leaves: its card goes, and the page says how to start one.
    assert await asyncio.to_thread(running.vm.stop) == 0, "the child did not shut down cleanly"
    await b.wait(f"document.querySelector('{card}') === null && !document.getElementById('empty').hidden",
                 "vm1's card is gone and the page says no partition is connected")
    b.assert_clean()


async def test_partition_page_shows_the_screen_and_types_into_it(running: Setup) -> None:
    b, vm = running.browser, running.vm
    await b.page.goto(running.url + "/partitions/vm1")
    await b.wait("window.vmbusScreen.active && window.vmbusScreen.frames > 0", "the first frame is drawn")
    size = await b.page.evaluate("[document.getElementById('screen').width, document.getElementById('screen').height]")
    assert size == [running.screen.width, running.screen.height], f"canvas {size} is not the screen's size"
    await shows_parent(b, running.screen, TABLE, "the channel table")
    events_before = await shows_parent(b, running.screen, EVENTS, "the event lines")

    mark = vm.mark()
    await b.page.click("#screen")
    await b.page.keyboard.type("channels")
    await b.page.keyboard.press("Enter")
    await asyncio.to_thread(vm.wait_event, "console command", DEADLINE, mark, text="channels")
    # The child printed the channel list: the DIRT reached the canvas, which now differs from before.
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        events_after = await shows_parent(b, running.screen, EVENTS, "the event lines after the command")
        if ImageChops.difference(events_before, events_after).getbbox() is not None:
            break
        assert loop.time() < end, "the canvas's event lines never changed after typing 'channels' + Enter"
        await asyncio.sleep(0.1)

    # Shift is a key of its own, pressed around the letter: the guest's layout makes it "A".
    mark = vm.mark()
    await b.page.keyboard.type("echo ")
    await b.page.keyboard.press("Shift+KeyA")
    await b.page.keyboard.press("Enter")
    await asyncio.to_thread(vm.wait_event, "console command", DEADLINE, mark, text="echo A")
    b.assert_clean()


async def test_the_mouse_moves_the_childs_pointer(running: Setup) -> None:
    b = running.browser
    await b.page.goto(running.url + "/partitions/vm1")
    await b.wait("window.vmbusScreen.active && window.vmbusScreen.frames > 0", "the first frame is drawn")
    box = await b.page.eval_on_selector("#screen", "c => { const r = c.getBoundingClientRect(); "
                                        "return [r.left, r.top, r.width, r.height]; }")
    screen = running.screen
    for want_x, want_y in ((200, 150), (800, 600)):
        # The middle of screen pixel (want_x, want_y), wherever CSS scaled the canvas to.
        await b.page.mouse.move(box[0] + (want_x + 0.5) * box[2] / screen.width,
                                box[1] + (want_y + 0.5) * box[3] / screen.height)
        # Within 3 pixels: a CSS pixel of the scaled canvas is ~1.2 screen pixels, and the child rounds down.
        await until(lambda x=want_x, y=want_y: abs(screen.pointer.x - x) <= 3 and abs(screen.pointer.y - y) <= 3,
                    f"the child's pointer is at ({want_x}, {want_y}) within 3 pixels", DEADLINE)
        await b.wait(f"(() => {{ const p = document.getElementById('pointer'); return p.style.display === 'block' "
                     f"&& Math.abs(parseFloat(p.style.left) - {100 * want_x / screen.width}) < 0.5; }})()",
                     "the page draws the guest's pointer where the child put it")
    b.assert_clean()


async def test_hot_remove_and_add_buttons(running: Setup) -> None:
    b, vm = running.browser, running.vm
    await b.page.goto(running.url + "/partitions/vm1")
    remove = 'button[data-action="remove"][data-device="network"]'
    add = 'button[data-action="add"][data-device="network"]'
    await b.page.click(remove)
    await asyncio.to_thread(vm.wait_event, "offer rescinded", DEADLINE, device="network")
    await b.wait(f"document.querySelector('{add}') !== null", "the panel offers to add the network back")
    assert await b.page.locator('tr[data-device="network"] .badge').inner_text() == "removed"
    mark = vm.mark()
    await b.page.click(add)
    await asyncio.to_thread(vm.wait_event, "device ready", DEADLINE, mark, device="network")
    await b.wait(f"document.querySelector('{remove}') !== null && !document.querySelector('{remove}').disabled",
                 "the network is back in the channel table")
    b.assert_clean()


async def test_websockets_refuse_other_sites_and_bad_messages(running: Setup) -> None:
    """Not the browser: what a hostile page or a broken client could send, costing only its own socket."""
    url = running.url.replace("http://", "ws://") + "/ws/partitions/vm1"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403, refused.value
        for bad, needle in (("not json", "not JSON"), ('{"t": "key", "code": 5}', "'code'"),
                            ('{"t": "mouse", "x": 1.5, "y": 0}', "integer"), ('{"t": "launch"}', "unknown")):
            async with session.ws_connect(url, headers={"Origin": running.url}) as ws:
                errors = []
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["t"] == "frame":
                        await ws.send_str(bad)
                    elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["t"] == "error":
                        errors.append(json.loads(msg.data)["message"])
                assert ws.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA and any(needle in e for e in errors), \
                    f"{bad!r}: closed {ws.close_code}, errors {errors}"
        # An unknown key is said, not fatal; the socket and the partition stay.
        async with session.ws_connect(url, headers={"Origin": running.url}) as ws:
            await ws.send_str('{"t": "key", "code": "Launch42", "down": true}')
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["t"] == "error":
                    assert "no PC scan code" in json.loads(msg.data)["message"], msg.data
                    break
            assert not ws.closed
        async with session.get(running.url + "/api/partitions/vm1/screen.png?scale=7") as resp:
            assert resp.status == 400 and "scale" in (await resp.json())["error"], resp
    assert "vm1" in running.daemon.partitions, "a bad console client cost the partition"


async def test_stopping_the_server_closes_the_console_sockets(running: Setup) -> None:
    """Shutdown closes every console websocket itself (1001, saying why) instead of waiting them out."""
    b = running.browser
    await b.page.goto(running.url + "/partitions/vm1")
    await b.wait("window.vmbusScreen.frames > 0", "the first frame is drawn")
    url = running.url.replace("http://", "ws://")
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url + "/ws/partitions", headers={"Origin": running.url}) as ws:
        first = await ws.receive_json(timeout=DEADLINE)
        assert first["t"] == "partitions" and [p["name"] for p in first["partitions"]] == ["vm1"], first
        await running.web.stop()
        msg = await ws.receive(timeout=DEADLINE)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=DEADLINE)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY, msg
        assert msg.extra == "the parent is shutting down", msg
    await b.wait("document.getElementById('ws-dot').className === 'dot down'", "the page shows its socket is down")


def test_chromium_is_installed() -> None:
    """The browser tests need it; say so plainly rather than skip."""
    assert shutil.which("chromium") or os.access(CHROMIUM, os.X_OK), \
        f"no chromium on PATH or at {CHROMIUM}: make sysdeps installs Debian's chromium"
