"""The web console's pure parts: browser key codes to set-1 scan codes, and the rectangle and pointer encodings."""

from __future__ import annotations

import io

from PIL import Image

from parent_partition.web.console.keys import DOM_KEYS, dom_key_events
from parent_partition.web.console.live import PNG, RAW, RAW_MAX, RECT, encode_rect, shape_png
from vmbus_proto.devices.input.keyboard import KeystrokeFlags
from vmbus_proto.devices.video.host import PointerShapeChanged
from vmbus_proto.devices.video.synthvid import Rect


def test_physical_keys_map_to_set1_codes() -> None:
    cases = {"KeyA": (0x1E, False), "Digit1": (0x02, False), "Enter": (0x1C, False), "ShiftLeft": (0x2A, False),
             "ControlLeft": (0x1D, False), "AltRight": (0x38, True), "ArrowUp": (0x48, True),
             "Delete": (0x53, True), "NumpadEnter": (0x1C, True), "Backquote": (0x29, False), "F12": (0x58, False)}
    for code, (make, e0) in cases.items():
        [press] = dom_key_events(code, True) or []
        [release] = dom_key_events(code, False) or []
        assert (press.make_code, bool(press.info & KeystrokeFlags.IS_E0)) == (make, e0), code
        assert not press.info & KeystrokeFlags.IS_BREAK and release.info & KeystrokeFlags.IS_BREAK, code
    assert len(DOM_KEYS) > 100
    assert dom_key_events("Launch42", True) is None
    pause = dom_key_events("Pause", True) or []
    assert [e.make_code for e in pause] == [0x1D, 0x45, 0x1D, 0x45] and pause[0].info & KeystrokeFlags.IS_E1
    assert dom_key_events("Pause", False) == []


def _bgrx(w: int, h: int) -> bytes:
    return b"".join(bytes((x % 256, y % 256, (x + y) % 256, 0)) for y in range(h) for x in range(w))


def test_small_rectangles_go_raw_and_large_ones_as_png() -> None:
    small = Rect(3, 4, 3 + 16, 4 + 24)
    msg = encode_rect(small, _bgrx(16, 24))
    assert RECT.unpack_from(msg) == (RAW, 3, 4, 16, 24) and msg[RECT.size:] == _bgrx(16, 24)
    w, h = 200, RAW_MAX // 200 + 1
    big = encode_rect(Rect(0, 0, w, h), _bgrx(w, h))
    assert RECT.unpack_from(big) == (PNG, 0, 0, w, h)
    img = Image.open(io.BytesIO(big[RECT.size:])).convert("RGB")
    assert img.size == (w, h) and img.getpixel((5, 7)) == (12, 7, 5)  # B,G,R,X -> R,G,B


def test_pointer_shapes_become_rgba_pngs() -> None:
    argb = PointerShapeChanged(True, 2, 1, 0, 0, bytes((0, 0, 255, 255, 0, 0, 0, 0)))
    img = Image.open(io.BytesIO(shape_png(argb)))
    assert img.mode == "RGBA" and img.getpixel((0, 0)) == (255, 0, 0, 255) and img.getpixel((1, 0))[3] == 0
    # Monochrome 8x1: AND then XOR mask. Pixel 0: black (and 0, xor 0); 1: white (and 0, xor 1); 2: transparent.
    mono = PointerShapeChanged(False, 8, 1, 0, 0, bytes((0b00111111, 0b01000000)))
    img = Image.open(io.BytesIO(shape_png(mono)))
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0, 255), (255, 255, 255, 255), (0, 0, 0, 0)]
