"""The guest console's terminal model, its damage tracking and rendering, its line editor and built-in commands,
against a Pillow image standing in for the framebuffer (the real one: tests/integration/test_console.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont

from child_partition.console import terminal
from child_partition.console.screen import ConsoleScreen
from child_partition.console.service import ConsoleService, arrow_shape
from child_partition.console.terminal import (
    BG,
    CURSOR,
    FG,
    FONT_PATH,
    FONT_SIZE,
    TITLE_BG,
    Grid,
    Renderer,
    Style,
    load_font,
)
from child_partition.vsc import GuestContext
from vmbus_proto.aio import logs
from vmbus_proto.devices.input.keymap import KeyStroke
from vmbus_proto.devices.video.synthvid import Rect

W, H = 1024, 768


class Canvas:
    """A screen as a Pillow image: what ``Renderer.render`` writes to, with every ``dirty`` call recorded."""

    def __init__(self, width: int = W, height: int = H) -> None:
        self.width, self.height = width, height
        self.img = Image.new("RGB", (width, height), (255, 0, 255))  # magenta: never drawn
        self.dirty_calls: list[list[Rect]] = []

    def blit(self, image: Image.Image, x: int = 0, y: int = 0) -> Rect | None:
        self.img.paste(image, (x, y))
        return Rect(max(0, x), max(0, y), min(self.width, x + image.width), min(self.height, y + image.height))

    def dirty(self, rects: Iterable[Rect | Sequence[int]]) -> None:
        self.dirty_calls.append([Rect(*r) for r in rects])


def drawn_screen(name: str = "vm1") -> tuple[Renderer, ConsoleScreen, Canvas]:
    r = Renderer(W, H)
    screen = ConsoleScreen(Grid(r.cols, r.rows), name)
    screen.draw_all()
    canvas = Canvas()
    r.render(screen.grid, canvas)
    return r, screen, canvas


def _undrawn(img: Image.Image) -> int:
    return sum(n for n, c in img.getcolors(1 << 24) or [] if c == (255, 0, 255))


def area(rect: Rect) -> int:
    return (rect.x2 - rect.x1) * (rect.y2 - rect.y1)


def test_the_grid_damages_only_cells_that_change() -> None:
    g = Grid(20, 3)
    assert len(g.take_damage()) == 3, "a new grid is all damage"
    g.put(1, 2, "hello")
    assert g.take_damage() == [(1, 2, 7)]
    g.put(1, 2, "hello")
    assert g.take_damage() == [], "rewriting the same text is no damage"
    g.put(1, 2, "help!")
    assert g.take_damage() == [(1, 5, 7)], "only the cells whose character changed"
    g.put(1, 2, "help!", Style(fg=(1, 2, 3)))
    assert g.take_damage() == [(1, 2, 7)], "a colour change is damage"
    g.put(2, 18, "abcdef")
    assert g.text(2).endswith("ab") and g.take_damage() == [(2, 18, 20)], "clipped at the row's end"
    g.put(0, 1, "x")
    g.put(0, 10, "y")
    assert g.take_damage() == [(0, 1, 2), (0, 10, 11)], "distant cells are separate runs"


def test_the_cursor_moving_or_blinking_damages_only_its_cells() -> None:
    g = Grid(10, 2)
    g.take_damage()
    g.set_cursor((1, 3))
    assert g.take_damage() == [(1, 3, 4)]
    g.set_cursor((1, 3), on=False)
    assert g.take_damage() == [(1, 3, 4)], "a blink is the cursor's cell"
    g.set_cursor((1, 3), on=False)
    assert g.take_damage() == []
    g.set_cursor((1, 8))
    assert g.take_damage() == [(1, 3, 4), (1, 8, 9)], "the cell left and the cell entered"


def test_a_keystroke_damages_only_the_prompt_row_and_renders_a_small_rect() -> None:
    r, screen, canvas = drawn_screen()
    assert canvas.dirty_calls and not screen.grid.damage
    full = canvas.dirty_calls[-1]
    union = Rect(min(x.x1 for x in full), min(x.y1 for x in full), max(x.x2 for x in full), max(x.y2 for x in full))
    assert union == Rect(0, 0, W, H), f"the first draw covers the screen, margins included: {union}"
    assert _undrawn(canvas.img) == 0, f"{_undrawn(canvas.img)} pixels left undrawn"
    canvas.dirty_calls.clear()
    screen.insert("l")
    assert set(screen.grid.damage) == {screen.prompt_row}, f"rows damaged: {sorted(screen.grid.damage)}"
    rects = r.render(screen.grid, canvas)
    assert len(canvas.dirty_calls) == 1, "one dirty() per change set"
    assert all(area(x) <= 3 * r.cell_w * r.cell_h for x in rects), f"a keystroke drew {rects}"
    prompt_cell = r.cell_rect(screen.prompt_row, 0)
    assert all(x.y1 == prompt_cell.y1 and x.y2 == prompt_cell.y2 for x in rects), rects


def test_a_cell_renders_as_the_font_draws_that_glyph() -> None:
    r, screen, canvas = drawn_screen()
    screen.insert("Q")
    screen.grid.set_cursor(None)
    r.render(screen.grid, canvas)
    col = len(screen.prompt) + 1
    cell = r.cell_rect(screen.prompt_row, col)
    got = canvas.img.crop(cell)
    # The reference: the glyph drawn on its own with the TTF, its baseline where the renderer puts it.
    font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
    ascent, _ = font.getmetrics()
    want = Image.new("RGB", got.size, BG)
    ImageDraw.Draw(want).text((0, 1 + ascent), "Q", font=font, fill=FG, anchor="ls")
    assert ImageChops.difference(got, want).getbbox() is None, "the rendered Q differs from the font's Q"
    assert want.getcolors(1 << 16) is not None and len(want.getcolors(1 << 16) or []) > 2, "the reference is blank"


def test_the_cursor_is_drawn_inverted_and_the_title_band_reaches_the_edges() -> None:
    r, screen, canvas = drawn_screen()
    row, col = screen.grid.cursor or (0, 0)
    cell = r.cell_rect(row, col)
    assert canvas.img.getpixel((cell.x1 + 1, cell.y1 + 1)) == CURSOR, "the cursor cell is not drawn"
    screen.grid.set_cursor((row, col), on=False)
    r.render(screen.grid, canvas)
    assert canvas.img.getpixel((cell.x1 + 1, cell.y1 + 1)) == BG, "the blinked-off cursor still shows"
    assert canvas.img.getpixel((0, 0)) == TITLE_BG and canvas.img.getpixel((W - 1, 2)) == TITLE_BG


def test_events_wrap_scroll_and_clear() -> None:
    _, screen, _ = drawn_screen()
    for i in range(screen.events_rows + 5):
        screen.add_line("12:00:00", f"event {i}")
    last = screen.grid.text(screen.events_top + screen.events_rows - 1)
    assert f"event {screen.events_rows + 4}" in last, last
    screen.grid.take_damage()
    screen.scroll_by(3)
    assert "newer lines below" in screen.grid.text(screen.events_top + screen.events_rows - 1)
    assert set(screen.grid.damage) <= set(range(screen.events_top, screen.events_top + screen.events_rows))
    screen.add_line("12:00:01", "x" * (screen.grid.cols * 2))
    assert len(screen.events) == screen.events_rows + 5 + 3, "a long line wraps over three rows"
    screen.clear_events()
    assert "event" not in "".join(screen.grid.text(screen.events_top + i) for i in range(screen.events_rows))


def test_the_prompt_edits_like_readline() -> None:
    _, screen, _ = drawn_screen()
    screen.insert("pnigx")
    screen.backspace()
    screen.move(1)
    screen.delete()
    screen.move(2)
    screen.insert("n")
    screen.move(len(screen.line))
    assert screen.line == "ping", screen.line
    start = len(screen.prompt) + 1
    assert screen.grid.text(screen.prompt_row)[start:start + 4] == "ping"
    assert screen.grid.cursor == (screen.prompt_row, start + 4)
    assert screen.take_line() == "ping" and screen.line == "" and screen.grid.cursor == (screen.prompt_row, start)
    screen.insert("x" * 500)
    assert screen.grid.cursor is not None and screen.grid.cursor[1] < screen.grid.cols, "the cursor stays on screen"


def test_the_console_font_is_the_ttf_and_the_smallest_mode_fits() -> None:
    _, ttf = load_font(FONT_SIZE)
    assert ttf, f"{FONT_PATH} is missing (Debian fonts-dejavu-core)"
    r = Renderer(640, 480)
    assert r.cols * r.cell_w <= 640 and r.rows * r.cell_h <= 480 and r.cols >= 60 and r.rows >= 20


def test_without_the_ttf_pillows_font_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal, "FONT_PATH", "/nonexistent/NoSuchMono.ttf")
    monkeypatch.setattr(terminal, "BOLD_FONT_PATH", "/nonexistent/NoSuchMono-Bold.ttf")
    load_font.cache_clear()
    try:
        r = Renderer(W, H)
        screen = ConsoleScreen(Grid(r.cols, r.rows), "vm1")
        screen.draw_all()
        canvas = Canvas()
        r.render(screen.grid, canvas)
    finally:
        load_font.cache_clear()
    assert not r.ttf, "a missing TTF is not reported"
    assert _undrawn(canvas.img) == 0 and r.cols >= 60


def test_the_pointer_is_an_outlined_arrow() -> None:
    w, h, hx, hy, argb = arrow_shape()
    assert len(argb) == w * h * 4 and (hx, hy) == (0, 0) and w <= 96 and h <= 96
    assert argb[3] == 255 and argb[:3] == b"\x00\x00\x00", "the tip is opaque black"
    alphas = argb[3::4]
    assert 0 in alphas and alphas.count(255) > 40, "the arrow has a transparent surround and an opaque body"


def _press(svc: ConsoleService, text: str) -> None:
    for ch in text:
        key = {"\n": "Enter", "\b": "Backspace"}.get(ch, ch)
        svc.key(KeyStroke(key, True, ch))


async def _finished(svc: ConsoleService) -> None:
    if svc.job is not None:
        await asyncio.wait_for(svc.job, 10)


async def test_typed_lines_run_built_in_commands() -> None:
    logs.setup("warning", json=True)
    svc = ConsoleService(GuestContext("vm1", logs.get(partition="vm1"), {"console": True}))
    _press(svc, "help\n")
    await _finished(svc)
    texts = [t for _, t, _ in svc.lines]
    assert "vm1$ help" in texts and any(t.startswith("ping") for t in texts), texts
    _press(svc, "frobnicate\n")
    await _finished(svc)
    assert svc.lines[-1][1] == "frobnicate: command not found (type 'help')", svc.lines[-1]
    _press(svc, "ping\n")
    await _finished(svc)
    assert svc.lines[-1][1].startswith("ping: the following arguments are required: target"), svc.lines[-1]
    _press(svc, "ping vm2 -c 0\n")
    await _finished(svc)
    assert "usage: ping NAME|ADDR [-c N]" in svc.lines[-1][1], svc.lines[-1]
    _press(svc, "ping vm2\n")
    await _finished(svc)
    assert svc.lines[-1][1].startswith("ping: no network"), svc.lines[-1]
    _press(svc, "whoami\n")
    await _finished(svc)
    assert ("partition vm1" in [t for _, t, _ in svc.lines]), list(svc.lines)[-3:]
    _press(svc, "half a line")
    svc.key(KeyStroke("c", True, None, ctrl=True))
    assert svc.screen.line == "" and svc.lines[-1][1] == "vm1$ half a line^C"
    svc.key(KeyStroke("Up", True))
    assert svc.screen.line == "whoami", "Up recalls the last command"
    _press(svc, "\b\b\b\b\b\b" + "clear\n")
    await _finished(svc)
    assert not svc.lines and svc.history[-1] == "clear"
    await svc.close()


@pytest.mark.parametrize("mode", [(640, 480), (1024, 768), (1920, 1080)])
def test_every_mode_lays_out_without_overlap(mode: tuple[int, int]) -> None:
    r = Renderer(*mode)
    screen = ConsoleScreen(Grid(r.cols, r.rows), "a-partition-with-a-long-name")
    screen.draw_all()
    assert screen.channels_top + screen.channel_rows < screen.events_header < screen.events_top
    assert screen.events_top + screen.events_rows < screen.prompt_row < screen.hint_row == r.rows - 1
    assert "a-partition-with-a-long-name" in screen.grid.text(0)


class FakeFramebuffer(Canvas):
    """The parts of ``Framebuffer`` the console uses, on a Pillow image."""

    open = True

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self.pointer: tuple[int, int, bool] | None = None
        self.shape: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def set_pointer(self, x: int, y: int, visible: bool = True) -> None:
        self.pointer = (x, y, visible)

    def set_pointer_shape(self, width: int, height: int, hot_x: int, hot_y: int, argb: bytes) -> None:
        self.shape = (width, height)


async def test_a_new_mode_lays_out_again_and_draws_everything_once() -> None:
    logs.setup("warning", json=True)
    svc = ConsoleService(GuestContext("vm1", logs.get(partition="vm1"), {"console": True}))
    small = FakeFramebuffer(1024, 768)
    svc._on_framebuffer(small)  # type: ignore[arg-type]  # the framebuffer's interface, on an image
    assert len(small.dirty_calls) == 1 and _undrawn(small.img) == 0, "the first frame is not drawn in one go"
    assert small.pointer == (511, 383, True) and small.shape == arrow_shape()[:2]
    big = FakeFramebuffer(1280, 1024)
    svc._on_framebuffer(big)  # type: ignore[arg-type]
    assert len(big.dirty_calls) == 1 and _undrawn(big.img) == 0, "the new mode is not drawn fully, once"
    r = svc.renderer
    assert r is not None and (svc.screen.grid.cols, svc.screen.grid.rows) == (r.cols, r.rows) and r.cols > 120
    _press(svc, "x")
    svc._render()
    assert len(big.dirty_calls) == 2 and len(small.dirty_calls) == 1, "drawn into the old framebuffer"
    svc._on_framebuffer(None)
    _press(svc, "y")
    svc._render()
    assert len(big.dirty_calls) == 2 and svc.screen.line == "xy", "typing without a screen"
    await svc.close()
