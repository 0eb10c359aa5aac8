"""The console's screen layout on a :class:`~.terminal.Grid`: what a small VM console shows, top to bottom.

- the title bar: the partition's name, then its VMBus version, screen mode and uptime on the right;
- CHANNELS: one row per offered primary channel (relid, device, state, protocol version, sub-channels), kept
  current as channels open, close and are rescinded;
- EVENTS: a scrollback of timestamped lines (channels opening and closing, the NIC, disk I/O, and the typed
  commands with their output), PageUp/PageDown scroll it;
- the prompt with the line being typed (a readline-like editor: Left, Right, Home, End, Delete) and the cursor;
- a hint line with the built-in commands.

Every change rewrites only its part of the grid, and the grid keeps only the cells that really changed as
damage, so a keystroke costs the prompt's changed cells and the cursor.
"""

from __future__ import annotations

import collections
import textwrap
from dataclasses import dataclass

from .terminal import ACCENT, BG, CYAN, DIM, FG, GREEN, MAUVE, PANEL, RED, RGB, TITLE_BG, YELLOW, Grid, Style

SCROLLBACK = 1000  # event lines kept
HINT = "help · channels · disk · ping NAME · uptime · whoami · clear      ^C stop · ^L redraw · PgUp/PgDn"
CHANNEL_COLUMNS = (2, 10, 23, 35, 48)  # where RELID, DEVICE, STATE, VERSION and SUB-CHANNELS start
STATE_COLOURS = {"open": GREEN, "opening": YELLOW, "offered": YELLOW, "closing": YELLOW, "failed": RED}


@dataclass(frozen=True, slots=True)
class ChannelRow:
    relid: int
    device: str
    state: str  # open, opening, offered, failed
    version: str = ""
    subchannels: str = ""  # "3 open" or ""


@dataclass(frozen=True, slots=True)
class EventLine:
    when: str  # HH:MM:SS, or "" for a continuation
    text: str
    colour: RGB = FG


class ConsoleScreen:
    """The layout's state and how it is written into its grid."""

    def __init__(self, grid: Grid, name: str) -> None:
        self.grid = grid
        self.name = name
        self.status = ""  # the title bar's right side
        self.channels: list[ChannelRow] = []
        self.events: collections.deque[EventLine] = collections.deque(maxlen=SCROLLBACK)
        self.scroll = 0  # event lines scrolled back from the newest
        self.line = ""  # the line being typed
        self.pos = 0  # the cursor's index in it
        self.prompt = f"{name[:24]}$ "
        self.layout()

    # ---- the layout ------------------------------------------------------------------------------------------

    def layout(self) -> None:
        """Row numbers for the grid's size (again after a resize)."""
        rows = self.grid.rows
        self.channel_rows = max(2, min(10, (rows - 12) // 3))
        self.channels_top = 4
        self.events_header = self.channels_top + self.channel_rows + 1
        self.prompt_row = rows - 2
        self.hint_row = rows - 1
        self.events_top = self.events_header + 1
        self.events_rows = max(1, self.prompt_row - 1 - self.events_top)

    def draw_all(self) -> None:
        """Write every part (a new grid); only cells that differ from what it held become damage."""
        g = self.grid
        g.fill(range(g.rows), Style(bg=BG))
        self.draw_title()
        self._section(2, "CHANNELS")
        g.line(3, "", Style(DIM, PANEL))
        for col, title in zip(CHANNEL_COLUMNS, ("RELID", "DEVICE", "STATE", "VERSION", "SUB-CHANNELS"), strict=True):
            g.put(3, col, title, Style(DIM, PANEL))
        self.draw_channels()
        self._section(self.events_header, "EVENTS")
        self.draw_events()
        g.line(self.prompt_row - 1, "", Style(bg=BG))
        self.draw_prompt()
        g.line(self.hint_row, f"  {HINT}", Style(DIM, TITLE_BG))

    def _section(self, row: int, title: str) -> None:
        g = self.grid
        g.line(row, "", Style(bg=BG))
        g.put(row, 1, f" {title} ", Style(BG, ACCENT, bold=True))
        g.put(row, len(title) + 3, " " + "─" * (g.cols - len(title) - 5), Style(TITLE_BG, BG))

    def draw_title(self) -> None:
        g = self.grid
        style = Style(FG, TITLE_BG)
        g.line(0, "", style)
        g.put(0, 1, "●", Style(GREEN, TITLE_BG))
        g.put(0, 3, self.name, Style(FG, TITLE_BG, bold=True))
        g.put(0, 4 + len(self.name), "· vmbus-emu child partition", Style(DIM, TITLE_BG))
        status = self.status[:max(0, g.cols - len(self.name) - 34)]
        g.put(0, g.cols - len(status) - 1, status, Style(ACCENT, TITLE_BG))

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.draw_title()

    # ---- channels --------------------------------------------------------------------------------------------

    def set_channels(self, channels: list[ChannelRow]) -> None:
        if channels != self.channels:
            self.channels = channels
            self.draw_channels()

    def draw_channels(self) -> None:
        g, shown = self.grid, self.channels
        if len(shown) > self.channel_rows:
            shown = shown[:self.channel_rows - 1]
        for i in range(self.channel_rows):
            row = self.channels_top + i
            g.line(row, "", Style(bg=PANEL))
            if i < len(shown):
                ch = shown[i]
                relid, device, state, version, subs = CHANNEL_COLUMNS
                g.put(row, relid, f"{ch.relid:>5}", Style(DIM, PANEL))
                g.put(row, device, ch.device[:10], Style(FG, PANEL, bold=True))
                g.put(row, state, "● " + ch.state, Style(STATE_COLOURS.get(ch.state, DIM), PANEL))
                g.put(row, version, ch.version[:12], Style(CYAN, PANEL))
                g.put(row, subs, ch.subchannels, Style(MAUVE, PANEL))
            elif i == len(shown) and len(self.channels) > len(shown):
                g.put(row, 9, f"… and {len(self.channels) - len(shown)} more (type 'channels')", Style(DIM, PANEL))
            elif not self.channels and i == 0:
                g.put(row, 9, "no channels yet: waiting for the parent's offers", Style(DIM, PANEL))

    # ---- events ----------------------------------------------------------------------------------------------

    def add_line(self, when: str, text: str, colour: RGB = FG, draw: bool = True) -> None:
        """Append an event (wrapped to the pane's width); the pane follows the newest unless scrolled back.
        ``draw=False``: only remember it (a replay before ``draw_all``)."""
        width = max(10, self.grid.cols - 13)
        for i, part in enumerate(textwrap.wrap(text, width, drop_whitespace=False, replace_whitespace=False) or [""]):
            self.events.append(EventLine(when if i == 0 else "", part, colour))
            if self.scroll:
                self.scroll = min(self.scroll + 1, max(0, len(self.events) - self.events_rows))
        if draw:
            self.draw_events()

    def clear_events(self) -> None:
        self.events.clear()
        self.scroll = 0
        self.draw_events()

    def scroll_by(self, lines: int) -> None:
        top = max(0, len(self.events) - self.events_rows)
        scroll = max(0, min(top, self.scroll + lines))
        if scroll != self.scroll:
            self.scroll = scroll
            self.draw_events()

    def draw_events(self) -> None:
        g, n = self.grid, self.events_rows
        end = len(self.events) - self.scroll
        visible = list(self.events)[max(0, end - n):end]
        for i in range(n):
            row = self.events_top + i
            g.line(row, "", Style(bg=BG))
            if i < len(visible):
                ev = visible[i]
                g.put(row, 2, ev.when, Style(DIM, BG))
                g.put(row, 12, ev.text, Style(ev.colour, BG))
        if self.scroll:
            note = f" ↑ {self.scroll} newer lines below (PgDn) "
            g.put(self.events_top + n - 1, g.cols - len(note) - 1, note, Style(BG, YELLOW))

    # ---- the prompt ------------------------------------------------------------------------------------------

    def draw_prompt(self) -> None:
        g = self.grid
        row, start = self.prompt_row, len(self.prompt) + 1
        room = max(1, g.cols - start - 1)
        first = max(0, self.pos - room + 1)  # scroll the line sideways to keep the cursor in view
        g.put(row, 0, " ", Style(bg=BG))
        g.put(row, 1, self.prompt, Style(GREEN, BG, bold=True))
        g.line(row, self.line[first:first + room], Style(FG, BG), col=start)
        g.set_cursor((row, start + self.pos - first))

    def edit(self, line: str, pos: int) -> None:
        self.line, self.pos = line, max(0, min(len(line), pos))
        self.draw_prompt()

    def insert(self, text: str) -> None:
        self.edit(self.line[:self.pos] + text + self.line[self.pos:], self.pos + len(text))

    def backspace(self) -> None:
        if self.pos:
            self.edit(self.line[:self.pos - 1] + self.line[self.pos:], self.pos - 1)

    def delete(self) -> None:
        self.edit(self.line[:self.pos] + self.line[self.pos + 1:], self.pos)

    def move(self, to: int) -> None:
        self.edit(self.line, to)

    def take_line(self) -> str:
        """Enter: the typed line, and an empty prompt."""
        line = self.line
        self.edit("", 0)
        return line
