"""The console's terminal: a grid of character cells with colours and a cursor, and its renderer into a
framebuffer, as Linux's fbcon is to the VT layer (drivers/video/fbdev/core/fbcon.c draws only the cells the
VT marks changed, each glyph from the console font at its cell, and the cursor as an inverted cell).

Writing into the :class:`Grid` marks only the cells whose character or colours actually change; the
:class:`Renderer` turns those cells into pixels (glyphs cached per character and colours), copies them into the
framebuffer and reports all of it as one damage list, so DIRT covers what changed and nothing more. The grid sits
centred on the screen; cells in the first or last column or row paint the margin beside them in their own
background, so bands of colour (the title bar) reach the screen's edges.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageDraw, ImageFont

from vmbus_proto.devices.video.synthvid import Rect

RGB = tuple[int, int, int]

# The palette (Catppuccin Mocha): one dark background, text, and a few accents that mean the same everywhere.
BG: RGB = (24, 24, 37)
PANEL: RGB = (30, 30, 46)
TITLE_BG: RGB = (49, 50, 68)
FG: RGB = (205, 214, 244)
DIM: RGB = (127, 132, 156)
ACCENT: RGB = (137, 180, 250)
GREEN: RGB = (166, 227, 161)
YELLOW: RGB = (249, 226, 175)
RED: RGB = (243, 139, 168)
CYAN: RGB = (148, 226, 213)
MAUVE: RGB = (203, 166, 247)
CURSOR: RGB = (245, 224, 220)

FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"  # Debian fonts-dejavu-core
BOLD_FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"
FONT_SIZE = 16
MARGIN = 12  # least padding around the grid, pixels

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.cache
def load_font(size: int, bold: bool = False) -> tuple[Font, bool]:
    """The console font and whether it is the TTF (False: Pillow's built-in font, the TTF is missing)."""
    for path in ((BOLD_FONT_PATH, FONT_PATH) if bold else (FONT_PATH,)):
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size), True
    return ImageFont.load_default(size), False


@dataclass(frozen=True, slots=True)
class Style:
    fg: RGB = FG
    bg: RGB = BG
    bold: bool = False


PLAIN = Style()


class Grid:
    """``cols`` x ``rows`` cells (a character and its style) and a cursor; remembers which cells changed."""

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.chars = [[" "] * cols for _ in range(rows)]
        self.styles = [[PLAIN] * cols for _ in range(rows)]
        self.damage: dict[int, set[int]] = {}  # row -> changed columns
        self.cursor: tuple[int, int] | None = None  # (row, col), or hidden
        self.cursor_on = True  # the blink phase: drawn inverted when on
        self.touch_all()  # a new grid has never been drawn

    def put(self, row: int, col: int, text: str, style: Style = PLAIN) -> None:
        """Write ``text`` from (row, col) on, clipped at the row's end; only changed cells become damage."""
        if not 0 <= row < self.rows:
            return
        chars, styles = self.chars[row], self.styles[row]
        for i, ch in enumerate(text[:max(0, self.cols - col)]):
            c = col + i
            if c < 0:
                continue
            if chars[c] != ch or styles[c] != style:
                chars[c], styles[c] = ch, style
                self.damage.setdefault(row, set()).add(c)

    def line(self, row: int, text: str, style: Style = PLAIN, col: int = 0, width: int | None = None) -> None:
        """Write ``text`` padded with blanks to ``width`` cells (to the end of the row by default)."""
        width = self.cols - col if width is None else width
        self.put(row, col, text[:width].ljust(width), style)

    def text(self, row: int) -> str:
        return "".join(self.chars[row])

    def fill(self, rows: Iterable[int], style: Style = PLAIN) -> None:
        for row in rows:
            self.line(row, "", style)

    def touch_all(self) -> None:
        """Everything is damage (a new framebuffer, Ctrl-L)."""
        self.damage = {row: set(range(self.cols)) for row in range(self.rows)}

    def touch(self, row: int, col: int) -> None:
        if 0 <= row < self.rows and 0 <= col < self.cols:
            self.damage.setdefault(row, set()).add(col)

    def set_cursor(self, where: tuple[int, int] | None, on: bool | None = None) -> None:
        """Move (or hide) the cursor and set its blink phase; the cells it leaves and enters become damage."""
        if where == self.cursor and (on is None or on == self.cursor_on):
            return
        if self.cursor is not None:
            self.touch(*self.cursor)
        self.cursor = where
        if on is not None:
            self.cursor_on = on
        if where is not None:
            self.touch(*where)

    def take_damage(self) -> list[tuple[int, int, int]]:
        """The changed cells as (row, first col, end col) runs, and forget them."""
        runs = []
        for row, cols in sorted(self.damage.items()):
            for start, end in _runs(sorted(cols)):
                runs.append((row, start, end))
        self.damage = {}
        return runs


def _runs(cols: Sequence[int], gap: int = 2) -> Iterable[tuple[int, int]]:
    """Sorted columns as [start, end) runs; runs closer than ``gap`` cells are joined (fewer, wider rects)."""
    start = prev = cols[0]
    for c in cols[1:]:
        if c - prev > gap:
            yield start, prev + 1
            start = c
        prev = c
    yield start, prev + 1


class Target(Protocol):
    """Where the renderer draws: the framebuffer (``Framebuffer.blit`` and ``dirty``)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def blit(self, image: Image.Image, x: int = 0, y: int = 0) -> Rect | None: ...

    def dirty(self, rects: Iterable[Rect | Sequence[int]]) -> None: ...


class Renderer:
    """Draws a grid's damaged cells into a screen of ``width`` x ``height`` pixels."""

    def __init__(self, width: int, height: int, size: int = FONT_SIZE) -> None:
        self.font, self.ttf = load_font(size)  # ttf False: Pillow's built-in font (the service says so)
        self.bold_font, _ = load_font(size, bold=True)
        self.cell_w = max(1, round(self.font.getlength("M")))
        ascent, descent = self.font.getmetrics() if isinstance(self.font, ImageFont.FreeTypeFont) else (size, 0)
        self.cell_h = ascent + descent + 2  # two pixels of leading
        self.baseline = 1 + ascent  # the text's baseline, from the cell's top
        self.width, self.height = width, height
        self.cols = max(1, (width - 2 * MARGIN) // self.cell_w)
        self.rows = max(1, (height - 2 * MARGIN) // self.cell_h)
        self.x0 = (width - self.cols * self.cell_w) // 2
        self.y0 = (height - self.rows * self.cell_h) // 2

    def cell_rect(self, row: int, col: int) -> Rect:
        x, y = self.x0 + col * self.cell_w, self.y0 + row * self.cell_h
        return Rect(x, y, x + self.cell_w, y + self.cell_h)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a renderer lives as long as its framebuffer
    def glyph(self, ch: str, style: Style) -> Image.Image:
        """One cell: ``ch`` in ``style`` on its background."""
        img = Image.new("RGB", (self.cell_w, self.cell_h), style.bg)
        if ch != " ":
            font = self.bold_font if style.bold else self.font
            ImageDraw.Draw(img).text((0, self.baseline), ch, font=font, fill=style.fg, anchor="ls")
        return img

    def _style_at(self, grid: Grid, row: int, col: int) -> Style:
        style = grid.styles[row][col]
        if grid.cursor == (row, col) and grid.cursor_on:
            return Style(BG, CURSOR, style.bold)
        return style

    def render(self, grid: Grid, target: Target) -> list[Rect]:
        """Draw the damaged cells into ``target`` and report them in one ``dirty`` call; returns the rects."""
        rects = []
        for row, start, end in grid.take_damage():
            img = Image.new("RGB", ((end - start) * self.cell_w, self.cell_h))
            for i, col in enumerate(range(start, end)):
                img.paste(self.glyph(grid.chars[row][col], self._style_at(grid, row, col)), (i * self.cell_w, 0))
            rect = self.cell_rect(row, start)
            x, y = rect.x1, rect.y1
            # Cells on the grid's edge paint the margin beside them in their background.
            left = x if start > 0 else 0
            right = x + img.width if end < grid.cols else self.width
            top = y if row > 0 else 0
            bottom = y + self.cell_h if row < grid.rows - 1 else self.height
            if (left, right, top, bottom) != (x, x + img.width, y, y + self.cell_h):
                framed = Image.new("RGB", (right - left, bottom - top), grid.styles[row][start].bg)
                if right > x + img.width:
                    framed.paste(grid.styles[row][end - 1].bg, (x + img.width - left, 0, right - left, bottom - top))
                framed.paste(img, (x - left, y - top))
                img, x, y = framed, left, top
            drawn = target.blit(img, x, y)
            if drawn is not None:
                rects.append(drawn)
        if rects:
            target.dirty(rects)
        return rects
