"""The guest console: the program a VM shows on its screen, here a small text console on the synthetic video
framebuffer (what getty and a shell on Linux's fbcon are to a Hyper-V guest's Video Connect window).

It shows the partition's name, VMBus version and uptime, its channels and their states as they change, recent
events (channels opening and closing, the NIC's link, disk I/O, ping replies) and a prompt where what is typed on
the synthetic keyboard appears; Enter runs a built-in command (``commands.py``). The mouse moves a real pointer
(POINTER_SHAPE, an arrow; POINTER_POSITION as reports arrive). Only the cells that changed are drawn and sent as
DIRT (``terminal.py``). On by default in ``child-partition run``, instead of the video service's boot screen;
``--no-console`` turns it off. Every line it prints is logged as ``console line`` (debug), every command as
``console command`` (info).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vmbus_proto.client import GuestChanState
from vmbus_proto.devices.input.keymap import KeyStroke
from vmbus_proto.devices.input.mouse import MouseReport
from vmbus_proto.devices.registry import BY_CLASS
from vmbus_proto.versions import version_text

from ..devices.input.service import InputService
from ..devices.network.service import NetworkService
from ..devices.storage.service import StorageService
from ..devices.video.framebuffer import Framebuffer
from ..devices.video.service import VideoService
from ..vsc import GuestContext, GuestService
from .commands import Shell, human
from .screen import SCROLLBACK, ChannelRow, ConsoleScreen
from .terminal import CYAN, DIM, FG, FONT_PATH, GREEN, RED, RGB, YELLOW, Grid, Renderer

S = TypeVar("S", bound=GuestService)

TICK = 0.25  # seconds between looks at the channels, the NIC and the clock
BLINK = 0.5  # the cursor's blink half-period
DISK_SUMMARY = 5.0  # seconds between disk I/O summaries (when there was I/O)
MOUSE_MAX = 0x7FFF  # the mouse's absolute range

# The pointer: a white arrow with a black outline ('X' black, '.' white, ' ' transparent), hot spot at its tip.
ARROW = (
    "X", "XX", "X.X", "X..X", "X...X", "X....X", "X.....X", "X......X", "X.......X", "X........X", "X.........X",
    "X......XXXXX", "X...X..X", "X..XX..X", "X.X  X..X", "XX   X..X", "X     X..X", "      X..X", "       XX",
)


def arrow_shape() -> tuple[int, int, int, int, bytes]:
    """The arrow as POINTER_SHAPE wants it: width, height, hot spot x and y, B, G, R, A bytes a pixel."""
    width, height = max(len(r) for r in ARROW), len(ARROW)
    px = {"X": b"\x00\x00\x00\xff", ".": b"\xff\xff\xff\xff", " ": b"\x00\x00\x00\x00"}
    return width, height, 0, 0, b"".join(px[c] for row in ARROW for c in row.ljust(width))


class ConsoleService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        # ``child-partition run`` turns it on (--no-console: off); a ChildPartition made in code asks with console=True
        self.enabled: bool = ctx.options.get("console", False)
        self.fb: Framebuffer | None = None
        self.renderer: Renderer | None = None
        self.screen = ConsoleScreen(Grid(80, 24), ctx.name)  # re-laid out on the real framebuffer
        self.lines: collections.deque[tuple[str, str, RGB]] = collections.deque(maxlen=SCROLLBACK)
        self.shell = Shell(self)
        self.job: asyncio.Task[None] | None = None  # the command running in the foreground
        self.job_stop = asyncio.Event()  # Ctrl-C: the running command should stop
        self.history: list[str] = []
        self._history_at = 0
        self.started = time.monotonic()
        self.renders = 0  # render passes that drew something
        self._last_key = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._render_handle: asyncio.Handle | None = None
        self._seen: dict[int, ChannelRow] = {}
        self._session: tuple[int, int] = (0, 0)  # (sessions, VMBus version) last reported
        self._nic: tuple[int, bool] | None = None  # (id of the NIC, link up) last reported
        self._disk_counts: dict[int, tuple[int, int, int, int]] = {}
        self._disk_at = time.monotonic()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-console", dest="console", action="store_false",
                            help="do not run the text console on the screen (the video device's boot screen is "
                                 "drawn instead, unless --no-splash)")

    def peer(self, cls: type[S]) -> S | None:
        """Another guest service of this partition."""
        p = self.ctx.partition
        svc = p.services.get(cls) if p is not None else None
        return svc if isinstance(svc, cls) else None

    # ---- life ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            return
        video = self.peer(VideoService)
        if video is not None:
            video.splash = False
            video.listeners.append(self._on_framebuffer)
        inp = self.peer(InputService)
        if inp is not None:
            self._spawn(self._read_keys(inp))
            self._spawn(self._read_mouse(inp))
        self._spawn(self._tick())
        self.say(f"console of partition {self.ctx.name}: type 'help' for the commands", CYAN)

    async def close(self) -> None:
        video = self.peer(VideoService)
        if video is not None and self._on_framebuffer in video.listeners:
            video.listeners.remove(self._on_framebuffer)
        tasks = [t for t in (*self._tasks, self.job) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._render_handle is not None:
            self._render_handle.cancel()
            self._render_handle = None
        self.fb = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the screen ------------------------------------------------------------------------------------------

    def _on_framebuffer(self, fb: Framebuffer | None) -> None:
        """A new framebuffer (or mode): lay out for its size and draw everything once; None: it went."""
        self.fb = fb
        if fb is None:
            return
        self.renderer = Renderer(fb.width, fb.height)
        if not self.renderer.ttf:
            self.log.warning("console font missing; using Pillow's built-in font", font=FONT_PATH,
                             hint="apt-get install fonts-dejavu-core")
        grid = Grid(self.renderer.cols, self.renderer.rows)
        line, pos = self.screen.line, self.screen.pos
        self.screen = screen = ConsoleScreen(grid, self.ctx.name)
        for when, text, colour in self.lines:
            screen.add_line(when, text, colour, draw=False)
        screen.line, screen.pos = line, pos
        self._refresh()
        screen.draw_all()
        fb.set_pointer_shape(*arrow_shape())
        self._move_pointer(fb)
        self._render()
        self.log.info("console drawn", width=fb.width, height=fb.height, cols=grid.cols, rows=grid.rows)

    def _move_pointer(self, fb: Framebuffer) -> None:
        inp = self.peer(InputService)
        at = inp.pointer if inp is not None else None
        x, y = (at.x, at.y) if at is not None else (MOUSE_MAX // 2, MOUSE_MAX // 2)
        fb.set_pointer(x * (fb.width - 1) // MOUSE_MAX, y * (fb.height - 1) // MOUSE_MAX, True)

    def render_soon(self) -> None:
        """Draw the damage once this loop iteration's changes are all in (one DIRT list for all of them)."""
        if self._render_handle is None:
            self._render_handle = asyncio.get_running_loop().call_soon(self._render)

    def _render(self) -> None:
        self._render_handle = None
        fb, renderer = self.fb, self.renderer
        if fb is None or renderer is None or not fb.open:
            return
        if fb.size != (renderer.width, renderer.height):  # the mode changed under us
            self._on_framebuffer(fb)
            return
        if renderer.render(self.screen.grid, fb):
            self.renders += 1

    # ---- output ----------------------------------------------------------------------------------------------

    def say(self, text: str, colour: RGB = FG) -> None:
        """One line in the events pane (logged as ``console line``)."""
        when = time.strftime("%H:%M:%S") if text.strip() else ""
        self.lines.append((when, text, colour))
        self.screen.add_line(when, text, colour)
        self.log.debug("console line", text=text)
        self.render_soon()

    def clear(self) -> None:
        self.lines.clear()
        self.screen.clear_events()
        self.render_soon()

    def uptime(self) -> str:
        s = int(time.monotonic() - self.started)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def vmbus_version(self) -> str:
        p = self.ctx.partition
        return version_text(p.version) if p is not None and p.bus is not None and p.version else ""

    # ---- keyboard and mouse ----------------------------------------------------------------------------------

    async def _read_keys(self, inp: InputService) -> None:
        async for stroke in inp.keys():
            if stroke.pressed:
                self.key(stroke)

    async def _read_mouse(self, inp: InputService) -> None:
        async for report in inp.reports():
            self.mouse(report)

    def mouse(self, report: MouseReport) -> None:
        if self.fb is not None and self.fb.open:
            self._move_pointer(self.fb)
        if report.wheel:
            self.screen.scroll_by(3 * report.wheel)
            self.render_soon()

    def key(self, k: KeyStroke) -> None:
        """A key press: edit the prompt, run a line, scroll, or a Ctrl shortcut."""
        s = self.screen
        self._last_key = time.monotonic()
        s.grid.set_cursor(s.grid.cursor, on=True)  # typing shows the cursor steadily
        name = k.key.lower()
        if k.ctrl and not (k.alt or k.meta):
            shortcuts: dict[str, Callable[[], None]] = {
                "c": self.interrupt, "l": s.grid.touch_all, "u": lambda: s.edit("", 0), "a": lambda: s.move(0),
                "e": lambda: s.move(len(s.line))}
            ctrl = shortcuts.get(name)
            if ctrl is not None:
                ctrl()
        elif k.key in _MOVES:
            _MOVES[k.key](self)
        elif k.char == "\n":
            self.enter()
        elif k.char == "\b":
            s.backspace()
        elif k.char is not None and k.char.isprintable():
            s.insert(k.char)
        self.render_soon()

    def enter(self) -> None:
        line = self.screen.take_line()
        self.say(f"{self.screen.prompt}{line}", CYAN)
        if not line.strip():
            return
        if not self.history or self.history[-1] != line:
            self.history.append(line)
        self._history_at = len(self.history)
        self.log.info("console command", text=line)
        if self.job is not None and not self.job.done():
            self.say("busy: a command is still running (Ctrl-C stops it)", YELLOW)
            return
        self.job_stop.clear()
        self.job = asyncio.get_running_loop().create_task(self._run(line))

    async def _run(self, line: str) -> None:
        try:
            await self.shell.run(line)
        except Exception as exc:  # a command's own failure is its output, never the console's end
            self.log.warning("console command failed", text=line, error=repr(exc))
            self.say(f"{line.split(maxsplit=1)[0]}: {exc or type(exc).__name__}", RED)

    def interrupt(self) -> None:
        """Ctrl-C: stop the running command, or drop the line being typed."""
        if self.job is not None and not self.job.done():
            self.job_stop.set()
            self.say("^C", YELLOW)
        else:
            line = self.screen.take_line()
            self.say(f"{self.screen.prompt}{line}^C", DIM)

    def recall(self, step: int) -> None:
        """Up/Down: the history."""
        at = max(0, min(len(self.history), self._history_at + step))
        if at != self._history_at:
            self._history_at = at
            text = self.history[at] if at < len(self.history) else ""
            self.screen.edit(text, len(text))

    # ---- what is shown: channels, status, NIC, disks ---------------------------------------------------------

    def channel_rows(self, detail: bool = False) -> list[ChannelRow]:
        """A row per primary channel (with ``detail``, one per sub-channel after it)."""
        p = self.ctx.partition
        bus = p.bus if p is not None else None
        if p is None or bus is None or bus.closed_future.done():
            return []
        chans = bus.core.channels

        def state(relid: int) -> str:
            ch = chans.get(relid)
            return "failed" if relid in p.failed_devices else ch.state.value if ch is not None else "closed"

        rows = []
        offers = sorted(bus.offers.values(), key=lambda o: o.child_relid)
        for o in offers:
            if o.sub_channel_index:
                continue
            entry = BY_CLASS.get(o.if_type)
            device = entry.name if entry is not None else str(o.if_type)[:8]
            vsc = p.vscs.get(o.child_relid)
            version = vsc.spec.version_text(vsc.version) if vsc is not None and vsc.version is not None else ""
            subs = [s for s in offers if s.sub_channel_index and (s.if_type, s.if_instance) == (o.if_type,
                                                                                                 o.if_instance)]
            up = sum(1 for s in subs if (ch := chans.get(s.child_relid)) and ch.state is GuestChanState.OPEN)
            rows.append(ChannelRow(o.child_relid, device, state(o.child_relid), version,
                                   f"{up}/{len(subs)} open" if subs else ""))
            if detail:
                rows.extend(ChannelRow(s.child_relid, f"{device}#{s.sub_channel_index}", state(s.child_relid),
                                       "", "sub-channel") for s in subs)
        return rows

    async def _tick(self) -> None:
        blink_at = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            self._refresh()
            now = time.monotonic()
            if now - blink_at >= BLINK:
                blink_at = now
                g = self.screen.grid
                g.set_cursor(g.cursor, on=now - self._last_key < BLINK or not g.cursor_on)
            self.render_soon()

    def _refresh(self) -> None:
        """Look at the partition: channel changes, the session, the NIC and disk I/O become events."""
        self._watch_session()
        rows = self.channel_rows()
        seen = {r.relid: r for r in rows}
        for relid, row in seen.items():
            old = self._seen.get(relid)
            if old is None or old.state != row.state:
                what = f"channel {relid} {row.device}: {row.state}" + (f" ({row.version})" if row.version else "")
                self.say(what, GREEN if row.state == "open" else RED if row.state == "failed" else YELLOW)
            elif old.subchannels != row.subchannels and row.subchannels:
                self.say(f"channel {relid} {row.device}: sub-channels {row.subchannels}", GREEN)
        for relid, old in self._seen.items():
            if relid not in seen:
                self.say(f"channel {relid} {old.device}: closed", YELLOW)
        self._seen = seen
        self.screen.set_channels(rows)
        fb = self.fb
        mode = f"{fb.width}x{fb.height} · " if fb is not None else ""
        version = self.vmbus_version()
        self.screen.set_status(f"{'VMBus ' + version if version else 'not connected'} · {mode}up {self.uptime()}")
        self._watch_nic()
        self._watch_disks()

    def _watch_session(self) -> None:
        p = self.ctx.partition
        if p is None:
            return
        now = (p.sessions, p.version if p.bus is not None and not p.bus.closed_future.done() else 0)
        if now != self._session:
            if now[1]:
                self.say(f"VMBus {version_text(now[1])} negotiated with the parent (session {now[0]})", GREEN)
            elif self._session[1]:
                self.say("the connection to the parent is lost; reconnecting", RED)
            self._session = now

    def _watch_nic(self) -> None:
        net = self.peer(NetworkService)
        nic = net.nic if net is not None else None
        now = (id(nic), nic.link_up) if nic is not None else None
        if now == self._nic or net is None:
            return
        if nic is not None and nic.link_up:
            self.say(f"network: link up, {net.address}, MAC {nic.mac.hex(':')}", GREEN)
        elif nic is not None and self._nic is not None:
            self.say("network: link down", YELLOW)
        elif nic is None and self._nic is not None:
            self.say("network: the NIC went away", YELLOW)
        self._nic = now

    def _watch_disks(self) -> None:
        now = time.monotonic()
        if now - self._disk_at < DISK_SUMMARY:
            return
        elapsed, self._disk_at = now - self._disk_at, now
        storage = self.peer(StorageService)
        for lun, d in sorted(storage.disks.items()) if storage is not None else []:
            counts = (d.reads, d.bytes_read, d.writes, d.bytes_written)
            old = self._disk_counts.get(lun, (0, 0, 0, 0))
            self._disk_counts[lun] = counts
            r, rb, w, wb = (a - b for a, b in zip(counts, old, strict=True))
            if r or w:
                self.say(f"disk lun {lun}: {r} reads ({human(rb)}), {w} writes ({human(wb)}) in {elapsed:.0f} s", FG)


Move = Callable[[ConsoleService], None]


def _history(step: int) -> Move:
    return lambda c: c.recall(step)


def _scroll(pages: int) -> Move:
    return lambda c: c.screen.scroll_by(pages * max(1, c.screen.events_rows // 2))


_MOVES: dict[str, Move] = {  # keys that move the cursor, recall the history or scroll
    "Left": lambda c: c.screen.move(c.screen.pos - 1),
    "Right": lambda c: c.screen.move(c.screen.pos + 1),
    "Home": lambda c: c.screen.move(0),
    "End": lambda c: c.screen.move(len(c.screen.line)),
    "Delete": lambda c: c.screen.delete(),
    "Up": _history(-1), "Down": _history(1),
    "PageUp": _scroll(1), "PageDown": _scroll(-1),
}
