"""``child-partition load input``: keyboard and mouse events from the parent's API to the guests' HID drivers.

HID input flows host to guest, so the load is driven where input starts: the parent's JSON API
(``POST /api/partitions/NAME/input/key``: one set-1 key event; ``.../input/mouse``: one absolute INPUT_REPORT),
what Hyper-V's console and its "Type clipboard text" feed the synthetic keyboard (hyperv-keyboard.c) and mouse
(hid-hyperv.c). Each partition is a guest on its own VMBus connection that binds only those two drivers and
watches what they decode. One operation is one event (``--events keys``, ``mouse``, or ``mixed``:
alternately), complete when the guest's driver has received it, recognised by its content:

- a key event is a press or the release of one of the layout's non-modifier keys (letters, digits,
  punctuation, F1-F12), each key alternating press and release so the guest's keyboard state stays sane;
  the keys in flight on a partition at once are all different, so a keystroke names its event (past 59
  key events in flight on one partition, the next waits for a key to come free);
- a mouse report goes to a position no other report of the partition went to (a counter over the
  32768 x 32768 absolute grid), so the position names it.

Operations ``key`` and ``mouse`` are timed by the engine from the API request to the later of the guest's
receipt and the API's answer; ``key-delivered`` and ``mouse-delivered`` record exactly the API request to the
guest's receipt. Events the API accepted that the guest never received within the timeout are ``missed``;
receipts that match nothing sent (another client typing into the same partition) are ``unexpected``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import ClientSession

from vmbus_proto.aio import logs
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.input.keymap import KEYS, Key, KeyStroke
from vmbus_proto.devices.input.mouse import MouseReport

from ..devices.input.vsc import KeyboardVsc, MouseVsc
from .guest import STEP_TIMEOUT, LoadGuest, api, http_session, need_http
from .workload import Done, LoadOptions, Recorder

EVENTS = ("keys", "mouse", "mixed")
GRID = 0x8000  # absolute mouse positions per axis
# Keys whose events change nothing but themselves: no modifier, no lock, no prefix.
KEY_POOL: tuple[Key, ...] = tuple(k for k in KEYS if not k.e0 and (
    (k.char is not None and len(k.char) == 1 and k.char.isprintable() and k.char != " " and not k.name.startswith("KP"))
    or (k.name.startswith("F") and k.name[1:].isdigit())))
READY_POLL = (0.01, 0.25)  # seconds between looks at the parent's input sessions: first, at most


def key_token(key: Key, pressed: bool) -> tuple[str, str, bool]:
    return ("key", key.name, pressed)


def stroke_token(stroke: KeyStroke) -> tuple[str, str, bool]:
    return ("key", stroke.key, stroke.pressed)


def mouse_position(n: int) -> tuple[int, int]:
    """The ``n``-th distinct absolute position of a partition's pointer."""
    n %= GRID * GRID
    return n % GRID, n // GRID


def report_token(report: MouseReport) -> tuple[str, int, int]:
    return ("mouse", report.x, report.y)


@dataclass(slots=True)
class Matcher:
    """What the guest's drivers received, matched to the events waiting for it (the drivers' sink)."""

    waiting: dict[tuple[Any, ...], asyncio.Future[float]] = field(default_factory=dict)
    received: int = 0
    unexpected: int = 0

    def expect(self, token: tuple[Any, ...]) -> asyncio.Future[float]:
        if token in self.waiting:
            raise RuntimeError(f"two events in flight look alike: {token}")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[token] = fut
        return fut

    def forget(self, token: tuple[Any, ...]) -> None:
        self.waiting.pop(token, None)

    def arrived(self, token: tuple[Any, ...]) -> None:
        fut = self.waiting.pop(token, None)
        if fut is None or fut.done():
            self.unexpected += 1
            return
        self.received += 1
        fut.set_result(time.monotonic())

    def key(self, stroke: KeyStroke) -> None:
        self.arrived(stroke_token(stroke))

    def report(self, report: MouseReport) -> None:
        self.arrived(report_token(report))


class InputPartition:
    """One guest whose keyboard and mouse the parent's API types into."""

    def __init__(self, guest: LoadGuest, workload: InputWorkload, index: int) -> None:
        self.name = guest.name
        self.guest, self.workload = guest, workload
        self.matcher = Matcher()
        self.keys: asyncio.Queue[Key] = asyncio.Queue()
        for i in range(len(KEY_POOL)):  # partitions start at different keys
            self.keys.put_nowait(KEY_POOL[(index + i) % len(KEY_POOL)])
        self.down: set[str] = set()  # keys this partition pressed and not yet released
        self.moves = 0
        self.ops = 0
        self.sent = 0
        self.missed = 0
        base = f"{workload.http}/api/partitions/{guest.name}/input"
        self.key_url, self.mouse_url = f"{base}/key", f"{base}/mouse"

    async def operation(self, rec: Recorder) -> Done:
        events = self.workload.events
        self.ops += 1
        kind = events if events != "mixed" else ("keys" if self.ops % 2 else "mouse")
        if kind == "mouse":
            n, self.moves = self.moves, self.moves + 1
            x, y = mouse_position(n)
            return await self._send("mouse", ("mouse", x, y), self.mouse_url, {"x": x, "y": y}, rec)
        key = await asyncio.wait_for(self.keys.get(), STEP_TIMEOUT)  # a key no other worker has in flight
        try:
            release = key.name in self.down
            done = await self._send("key", key_token(key, not release), self.key_url,
                                    {"make_code": key.code, "release": release}, rec)
            self.down.symmetric_difference_update({key.name})
            return done
        finally:
            self.keys.put_nowait(key)

    async def _send(self, op: str, token: tuple[Any, ...], url: str, body: dict[str, Any], rec: Recorder) -> Done:
        session = self.workload.session
        assert session is not None
        seen = self.matcher.expect(token)
        t0 = time.monotonic()
        try:
            await api(session, "POST", url, body)
            self.sent += 1
            try:
                at = await asyncio.wait_for(asyncio.shield(seen), STEP_TIMEOUT)
            except TimeoutError:
                self.missed += 1
                raise RuntimeError(f"{self.name}: the parent sent {token[1:]} but the guest never received it "
                                   f"within {STEP_TIMEOUT:g}s") from None
        finally:
            self.matcher.forget(token)
        rec.record(f"{op}-delivered", max(1, int((at - t0) * 1e6)))
        return Done(op)

    async def stop(self) -> None:
        await self.guest.leave()


async def wait_sessions_active(session: ClientSession, http: str, name: str) -> None:
    """Until the parent's keyboard and mouse both take input for ``name`` (the guest may finish its handshake a
    moment before the host has read its last message)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    delay, most = READY_POLL
    for device in ("keyboard", "mouse"):
        while True:
            info = await api(session, "GET", f"{http}/api/devices/{device}")
            if any(s.get("partition") == name and s.get("state") == "active" for s in info.get("sessions", [])):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the parent's {device} never became active for it")
            await asyncio.sleep(delay)
            delay = min(most, delay * 2)


class InputWorkload:
    name: ClassVar[str] = "input"
    description: ClassVar[str] = "keyboard and mouse events from the parent's API to each partition's HID drivers"

    def __init__(self, options: LoadOptions, events: str) -> None:
        self.options, self.events = options, events
        self.http = need_http("load input", options.http)
        self.session: ClientSession | None = None
        self.parts: list[InputPartition] = []
        self.log = logs.get(component="load input")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--events", choices=EVENTS, default="mixed",
                            help="what each operation sends: a key event, a mouse report, or alternately "
                                 "(default mixed)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> InputWorkload:
        if args.events not in EVENTS:
            raise ValueError(f"--events must be one of {', '.join(EVENTS)}, not {args.events!r}")
        return cls(options, args.events)

    async def setup(self) -> None:
        self.session = http_session(self.options.http_token)

    async def start_partition(self, index: int) -> InputPartition:
        assert self.session is not None, "setup() first"
        guest = LoadGuest(self.options.connect, f"{self.options.prefix}-{index}", self.log, secret=self.options.secret)
        try:
            await guest.connect()
            part = InputPartition(guest, self, index)
            for spec, cls in ((keyboard.SPEC, KeyboardVsc), (mouse.SPEC, MouseVsc)):
                vsc = await guest.bind(guest.offer_of(spec))
                assert isinstance(vsc, cls)
                vsc.sink = part.matcher
            await wait_sessions_active(self.session, self.http, guest.name)
        except BaseException:
            await guest.leave()
            raise
        self.parts.append(part)
        return part

    async def teardown(self) -> dict[str, Any]:
        if self.session is not None:
            await self.session.close()
        return {"input": {"events": self.events, "sent": sum(p.sent for p in self.parts),
                          "received": sum(p.matcher.received for p in self.parts),
                          "missed": sum(p.missed for p in self.parts),
                          "unexpected": sum(p.matcher.unexpected for p in self.parts)}}
