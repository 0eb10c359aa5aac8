"""The pure parts of the video, input and churn load workloads: frame rectangles and their markers, the
console's rectangle messages, event matching, key and position choice, device selection, option checks."""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import struct
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from child_partition.load import churn, video
from child_partition.load import input as inp
from child_partition.load.workload import LoadOptions
from vmbus_proto.devices.input.keyboard import KeyEvent, KeystrokeFlags
from vmbus_proto.devices.input.keymap import KEYS, KeyDecoder, KeyStroke
from vmbus_proto.devices.input.mouse import MouseReport
from vmbus_proto.devices.registry import BY_NAME
from vmbus_proto.devices.video.synthvid import Rect

OPTIONS = LoadOptions(connect="unix:/nowhere", http="http://127.0.0.1:1", partitions=2, first_index=0, prefix="t",
                      tag="test")


# ---- video ------------------------------------------------------------------------------------------------

@given(st.integers(0, 2**32), st.integers(640, 1920), st.integers(480, 1200), st.integers(1, 255))
def test_frame_rects_lie_inside_the_screen_and_the_first_covers_the_marker(seed: int, w: int, h: int, n: int) -> None:
    rects = video.frame_rects(random.Random(seed), w, h, n)
    assert len(rects) == n and rects[0][:2] == (0, 0)
    assert all(0 <= r.x1 < r.x2 <= w and 0 <= r.y1 < r.y2 <= h for r in rects), rects


@given(st.integers(1, 10**9), st.integers(0, video.MARKER_MASK))
def test_a_marker_names_its_frame_up_to_the_newest(n: int, behind: int) -> None:
    latest = n + behind
    assert video.marker_value(video.marker(n)) == n & video.MARKER_MASK
    assert video.unwrap(video.marker_value(video.marker(n)), latest) == n


def test_paint_fills_exactly_the_rectangles() -> None:
    w, h = 16, 8
    buf = bytearray(w * h * 4)
    rects = [Rect(0, 0, 16, 2), Rect(3, 4, 5, 7)]
    video.paint(memoryview(buf), w * 4, rects, video.marker(0x010203))
    for y in range(h):
        for x in range(w):
            inside = any(r.x1 <= x < r.x2 and r.y1 <= y < r.y2 for r in rects)
            px = bytes(buf[(y * w + x) * 4:(y * w + x) * 4 + 4])
            assert px == (b"\x03\x02\x01\x00" if inside else bytes(4)), (x, y, px)


def test_carried_counts_merged_pixels_once() -> None:
    assert video.carried([Rect(0, 0, 10, 10)]) == 400
    assert video.carried([Rect(0, 0, 10, 10), Rect(5, 5, 10, 10)]) == 400  # inside the first: merged
    assert video.carried([Rect(0, 0, 2, 2), Rect(100, 100, 102, 102)]) == 32


def _console_rect(enc: int, x: int, y: int, w: int, h: int, body: bytes) -> bytes:
    return struct.pack(video.WS_RECT, enc, x, y, w, h) + body


def test_console_messages_tell_the_frame_at_the_origin() -> None:
    raw = _console_rect(video.WS_RAW, 0, 0, 2, 1, video.marker(77) * 2)
    assert video.ws_marker(raw) == 77
    assert video.ws_marker(_console_rect(video.WS_RAW, 4, 0, 2, 1, video.marker(77) * 2)) is None
    img = Image.new("RGB", (300, 200), (0x12, 0x34, 0x56))  # R, G, B
    png = io.BytesIO()
    img.save(png, "PNG")
    assert video.ws_marker(_console_rect(video.WS_PNG, 0, 0, 300, 200, png.getvalue())) == 0x123456
    assert video.ws_marker(b"\x00" * 5) is None


def _video_args(**kw: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    video.VideoWorkload.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class _SilentSocket:
    """A console websocket that says nothing until closed (the test sets what the console shows)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.close_code = None

    def __aiter__(self) -> _SilentSocket:
        return self

    async def __anext__(self) -> Any:
        await self.closed.wait()
        raise StopAsyncIteration

    async def close(self) -> None:
        self.closed.set()


async def test_a_frame_shown_then_passed_by_later_frames_still_counts_as_shown() -> None:
    """Frame 2 waits while the partition's other operation draws 3, 4, 5 and the console shows each: the wait
    reads the newest frame drawn at each look, not the one drawn when it began (a stale one made frame 5 read
    as 5 - 2**24, and the wait never ended)."""
    ws = _SilentSocket()
    watch = video.ScreenWatch(ws)  # type: ignore[arg-type]
    frames = [2]
    waiting = asyncio.get_running_loop().create_task(watch.wait_shown(2, lambda: frames[0]))
    await asyncio.sleep(0)
    for shown in (3, 4, 5):
        frames[0] = shown
        async with watch.changed:
            watch.shown_low = shown
            watch.updates += 1
        await asyncio.sleep(0)  # the waiter is not woken until the last one: it looks at frame 5 first
    async with watch.changed:
        watch.changed.notify_all()
    await asyncio.wait_for(waiting, 5)
    await watch.close()


def test_video_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--rects"):
        video.VideoWorkload.from_args(_video_args(rects=0), OPTIONS)
    with pytest.raises(ValueError, match="--http"):
        video.VideoWorkload.from_args(_video_args(measure="screen"), _no_http())
    wl = video.VideoWorkload.from_args(_video_args(mode="800x600", frame="rects"), OPTIONS)
    assert wl.config.mode == (800, 600) and wl.config.frame == "rects"


def _no_http() -> LoadOptions:
    return LoadOptions(connect=OPTIONS.connect, http=None, partitions=2, first_index=0, prefix="t", tag="test")


# ---- input ------------------------------------------------------------------------------------------------

def test_the_key_pool_changes_nothing_but_its_own_keys() -> None:
    names = [k.name for k in inp.KEY_POOL]
    assert len(names) == len(set(names)) >= 40
    decoder = KeyDecoder()
    for key in inp.KEY_POOL:  # press and release each: no modifier, lock or LED changes
        for release in (False, True):
            stroke = decoder.feed(KeyEvent(key.code, KeystrokeFlags.IS_BREAK if release else 0))
            assert stroke is not None and inp.stroke_token(stroke) == inp.key_token(key, not release)
    assert decoder.leds == 0 and not decoder.down
    assert not {k.name for k in KEYS if k.name.endswith(("Shift", "Ctrl", "Alt", "Meta", "Lock"))} & set(names)


def test_mouse_positions_are_distinct_and_on_the_grid() -> None:
    seen = {inp.mouse_position(n) for n in range(0, 5 * inp.GRID, 7)}
    assert len(seen) == len(range(0, 5 * inp.GRID, 7))
    assert all(0 <= x < inp.GRID and 0 <= y < inp.GRID for x, y in seen)


async def test_the_matcher_pairs_receipts_with_what_was_sent() -> None:
    m = inp.Matcher()
    key = inp.KEY_POOL[0]
    fut = m.expect(inp.key_token(key, True))
    with pytest.raises(RuntimeError, match="look alike"):
        m.expect(inp.key_token(key, True))
    mouse = m.expect(("mouse", 5, 6))
    m.key(KeyStroke(key.name, False))  # the release: nobody waits for it
    m.report(MouseReport(0, 5, 6, 0))
    m.key(KeyStroke(key.name, True, key.char))
    assert fut.done() and mouse.done() and (m.received, m.unexpected) == (2, 1)
    m.report(MouseReport(0, 5, 6, 0))  # a second time: unexpected
    assert m.unexpected == 2 and not m.waiting


def test_input_needs_the_api() -> None:
    with pytest.raises(ValueError, match="--http"):
        inp.InputWorkload.from_args(argparse.Namespace(events="keys"), _no_http())
    with pytest.raises(ValueError, match="--events"):
        inp.InputWorkload.from_args(argparse.Namespace(events="joystick"), OPTIONS)


# ---- churn ------------------------------------------------------------------------------------------------

def _offer(device: str, relid: int, sub: int = 0) -> Any:
    return SimpleNamespace(if_type=BY_NAME[device].spec.class_id, child_relid=relid, sub_channel_index=sub)


def test_churn_devices_default_to_all_but_storage() -> None:
    offers = {i + 1: _offer(d, i + 1) for i, d in enumerate(("storage", "network", "video", "heartbeat"))}
    offers[9] = _offer("network", 9, sub=1)
    offers[10] = SimpleNamespace(if_type=uuid.uuid4(), child_relid=10, sub_channel_index=0)  # no driver
    default = churn.chosen_offers(offers, None)
    assert [o.child_relid for o in default] == [2, 3, 4]
    assert [o.child_relid for o in churn.chosen_offers(offers, ("storage", "heartbeat"))] == [1, 4]
    with pytest.raises(RuntimeError, match="does not offer keyboard"):
        churn.chosen_offers(offers, ("keyboard",))


def test_churn_device_lists_are_checked() -> None:
    assert churn.parse_devices(None) is None and churn.parse_devices("default") is None
    assert churn.parse_devices("heartbeat, video,heartbeat") == ("heartbeat", "video")
    with pytest.raises(ValueError, match="unknown device floppy"):
        churn.parse_devices("floppy")
    with pytest.raises(ValueError, match="--http"):
        churn.ChurnWorkload.from_args(argparse.Namespace(devices=None, rescind=True, data_dir=None), _no_http())
    wl = churn.ChurnWorkload.from_args(argparse.Namespace(devices=["video"], rescind=False, data_dir=None), OPTIONS)
    assert wl.config.devices == ("video",)
