"""Tier 3: typing into a real child partition. The parent daemon runs in this process (its input API is what the
web console and ``send-keys`` will call: ``ParentDaemon.device("keyboard").type_text``) and a real
``child-partition run`` process connects over a Unix socket; the child's InputService logs each completed line
and mouse report at debug, which is what is checked."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.input.vsp import InputNotReady, KeyboardVsp, MouseVsp
from vmbus_proto.aio import logs

from ..shell.waits import until
from .conftest import child

pytestmark = pytest.mark.integration

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


async def test_text_and_mouse_reports_typed_from_the_parent_reach_the_child(tmp_path: Path) -> None:
    logs.setup("warning", json=True)
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    daemon = ParentDaemon(cfg)
    await daemon.start()
    kbd, mouse = daemon.device("keyboard"), daemon.device("mouse")
    assert isinstance(kbd, KeyboardVsp) and isinstance(mouse, MouseVsp)
    with pytest.raises(InputNotReady, match="'vm1' has no open keyboard channel"):
        await kbd.type_text("vm1", "too early")
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1", "--log-level", "debug")
    try:
        await asyncio.to_thread(vm.wait_event, "all offered channels open")
        await until(lambda: "vm1" in kbd.sessions and kbd.sessions["vm1"].host.active, "the keyboard is active")
        await until(lambda: "vm1" in mouse.sessions and mouse.sessions["vm1"].host.active, "the mouse is active")
        lines = [PRINTABLE, "naïve café ✓ 😀", "second line"]
        for line in lines:
            await kbd.type_text("vm1", line + "\n")
        await kbd.send_keys("vm1", "x Backspace y Enter")
        got = []
        for expected in [*lines, "y"]:
            rec = await asyncio.to_thread(vm.wait_event, "line typed", 30.0, 0 if not got else got[-1][0] + 1)
            got.append((vm.lines.index(rec), rec["text"]))
            assert rec["text"] == expected, f"typed {expected!r}, the child read {rec['text']!r}"
        for x, y, buttons in [(100, 200, 0), (32767, 0, 1), (16384, 16384, 2)]:
            await mouse.send_mouse("vm1", x, y, buttons)
        rec = await asyncio.to_thread(vm.wait_event, "mouse report", 30.0, 0, x=16384, y=16384, buttons=2)
        reports = [(r["x"], r["y"], r["buttons"]) for r in vm.events("mouse report")]
        assert reports == [(100, 200, 0), (32767, 0, 1), (16384, 16384, 2)], reports
        await kbd.send_keys("vm1", "CapsLock")
        await until(lambda: kbd.led_flags("vm1") == 4, "the child reported Caps Lock on")
        assert await asyncio.to_thread(vm.stop, signal.SIGINT) == 0
        await until(lambda: "vm1" not in kbd.sessions and "vm1" not in mouse.sessions, "the sessions went")
        stopped = vm.events("input service stopped")
        assert stopped and stopped[0]["keys_dropped"] == 0 and stopped[0]["reports"] == 3, stopped
        closed = {r["device"]: r for r in vm.events("keyboard closed") + vm.events("mouse closed")}
        assert closed["mouse"]["received"] == 3 and closed["keyboard"]["leds_sent"] == 1, closed
        with pytest.raises(InputNotReady, match="no open mouse channel"):
            await mouse.send_mouse("vm1", 0, 0)
        assert kbd.errors == 0 and mouse.errors == 0
    finally:
        vm.stop()
        await daemon.shutdown()
