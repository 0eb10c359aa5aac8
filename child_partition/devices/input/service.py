"""The input devices' service to the rest of the guest: keys and mouse reports for the guest's console.

What Linux's input core is to its programs (the keystrokes hyperv-keyboard and atkbd produce, the reports
hid-hyperv hands the HID core): the keyboard and mouse VSCs deliver here, and a console reads
``async for stroke in service.keys()`` and ``async for report in service.reports()``. Each stream is a
bounded queue: when nobody reads (or reads too slowly) the newest input is dropped and counted, never
buffered without bound. The service also keeps what a terminal's line discipline would: the line being
typed (Backspace edits it) and the last completed lines, and where the pointer is.
Typed keys and mouse reports are logged at debug ("key typed", "line typed", "mouse report"), the counts at
info when a device goes.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from vmbus_proto.devices.input.guest import GuestCounters
from vmbus_proto.devices.input.keymap import KeyStroke
from vmbus_proto.devices.input.mouse import MouseReport

from ...vsc import GuestContext, GuestService, Vsc

if TYPE_CHECKING:
    from .vsc import _InputVsc

KEY_QUEUE = 4096  # keystrokes waiting for a reader
REPORT_QUEUE = 1024  # mouse reports waiting for a reader
LINES_KEPT = 100


class InputSink(Protocol):
    """What an input VSC delivers to."""

    def key(self, stroke: KeyStroke) -> None: ...

    def report(self, report: MouseReport) -> None: ...


def counters_text(c: GuestCounters) -> dict[str, Any]:
    out = asdict(c)
    if not out["unknown_types"]:
        del out["unknown_types"]
    return out


class InputService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        self._keys: asyncio.Queue[KeyStroke] = asyncio.Queue(KEY_QUEUE)
        self._reports: asyncio.Queue[MouseReport] = asyncio.Queue(REPORT_QUEUE)
        self.keys_received = 0
        self.keys_dropped = 0
        self.reports_received = 0
        self.reports_dropped = 0
        self.line = ""  # the line being typed
        self.lines: collections.deque[str] = collections.deque(maxlen=LINES_KEPT)
        self.pointer: MouseReport | None = None  # the last report: position and buttons
        self.keyboard_ready = asyncio.Event()
        self.mouse_ready = asyncio.Event()
        self._drivers: set[Vsc] = set()

    # ---- the guest's side: read input ------------------------------------------------------------------

    async def keys(self) -> AsyncIterator[KeyStroke]:
        """Every keystroke (presses and releases) from now on, in order."""
        while True:
            yield await self._keys.get()

    async def reports(self) -> AsyncIterator[MouseReport]:
        """Every mouse report from now on, in order."""
        while True:
            yield await self._reports.get()

    # ---- the drivers' side ------------------------------------------------------------------------------

    def key(self, stroke: KeyStroke) -> None:
        self.keys_received += 1
        if stroke.pressed:
            self.log.debug("key typed", key=stroke.key, char=stroke.char, ctrl=stroke.ctrl, alt=stroke.alt)
            self._edit(stroke)
        try:
            self._keys.put_nowait(stroke)
        except asyncio.QueueFull:
            self.keys_dropped += 1

    def _edit(self, stroke: KeyStroke) -> None:
        char = stroke.char
        if char is None:
            return
        if char == "\n":
            self.lines.append(self.line)
            self.log.debug("line typed", text=self.line)
            self.line = ""
        elif char == "\b":
            self.line = self.line[:-1]
        else:
            self.line += char

    def report(self, report: MouseReport) -> None:
        self.reports_received += 1
        self.pointer = report
        self.log.debug("mouse report", x=report.x, y=report.y, buttons=report.buttons, wheel=report.wheel)
        try:
            self._reports.put_nowait(report)
        except asyncio.QueueFull:
            self.reports_dropped += 1

    def _ready_event(self, vsc: Vsc) -> asyncio.Event:
        return self.keyboard_ready if vsc.spec.name == "keyboard" else self.mouse_ready

    async def on_ready(self, vsc: Vsc) -> None:
        driver: _InputVsc = vsc  # type: ignore[assignment]  # this service's VSCs are the input VSCs
        driver.sink = self
        self._drivers.add(vsc)
        self._ready_event(vsc).set()

    def on_lost(self, vsc: Vsc) -> None:
        if vsc in self._drivers:
            self._drivers.discard(vsc)
            self._ready_event(vsc).clear()

    async def close(self) -> None:
        self.log.info("input service stopped", keys=self.keys_received, keys_dropped=self.keys_dropped,
                      reports=self.reports_received, reports_dropped=self.reports_dropped, lines=len(self.lines))
