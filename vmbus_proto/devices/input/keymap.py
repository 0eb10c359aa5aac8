"""PC/AT scan code set 1 and the US keyboard layout: text and named keys to SYNTH_KBD events, and back.

What the host side of Hyper-V's keyboard does when it types for you (Hyper-V Manager's "Type clipboard
text", OpenVMM's VNC server turning key symbols into ``KeyboardData {code, make}``): a character of the
US layout becomes its key's set-1 make code, with Left Shift pressed around it when the character needs it;
Enter, Tab, Backspace and Escape are keys; navigation keys carry the E0 prefix (``IS_E0``); Pause is the
E1 sequence. A character outside the layout is sent as two ``IS_UNICODE`` events (make and break) whose
``make_code`` is a UTF-16 code unit (two units for characters beyond the BMP).

The other direction is what a guest's keyboard driver does (Linux drivers/input/keyboard/atkbd.c after
hyperv-keyboard.c injects the bytes ``KeyEvent.scancodes`` returns): :class:`KeyDecoder` tracks Shift, Ctrl,
Alt, Meta and the three lock keys and turns events back into keys and the characters they type.
Public sources for the codes: the IBM PC/AT technical reference, set 1 (as Linux ``atkbd_set2_keycode``'s
set-1 translation and QEMU ``ui/keycodemapdb`` list them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ...errors import LocalProtocolError
from .keyboard import KeyEvent, KeystrokeFlags, LedFlags

__all__ = [
    "KEYS",
    "Key",
    "KeyDecoder",
    "KeyStroke",
    "combo_events",
    "key_events",
    "key_named",
    "keys_events",
    "text_events",
    "unicode_events",
]


@dataclass(frozen=True, slots=True)
class Key:
    """One physical key: its name and set-1 make code (7 bits) with its prefix."""

    name: str
    code: int
    e0: bool = False
    char: str | None = None  # what it types unshifted
    shifted: str | None = None  # what it types with Shift

    @property
    def flags(self) -> int:
        return KeystrokeFlags.IS_E0 if self.e0 else 0


def _k(name: str, code: int, char: str | None = None, shifted: str | None = None, e0: bool = False) -> Key:
    return Key(name, code, e0, char, shifted)


_ROWS = (  # (first code, unshifted row, shifted row)
    (0x02, "1234567890-=", "!@#$%^&*()_+"),
    (0x10, "qwertyuiop[]", "QWERTYUIOP{}"),
    (0x1E, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    (0x2B, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
)

KEYS: tuple[Key, ...] = (
    *(_k(c, code + i, c, s) for code, row, shifted in _ROWS for i, (c, s) in enumerate(zip(row, shifted, strict=True))),
    _k("Escape", 0x01, "\x1b"), _k("Backspace", 0x0E, "\b"), _k("Tab", 0x0F, "\t"), _k("Enter", 0x1C, "\n"),
    _k("LeftCtrl", 0x1D), _k("LeftShift", 0x2A), _k("RightShift", 0x36), _k("KPAsterisk", 0x37, "*", "*"),
    _k("LeftAlt", 0x38), _k("Space", 0x39, " ", " "), _k("CapsLock", 0x3A), _k("NumLock", 0x45),
    _k("ScrollLock", 0x46),
    *(_k(f"F{i + 1}", 0x3B + i) for i in range(10)), _k("F11", 0x57), _k("F12", 0x58),
    _k("KP7", 0x47), _k("KP8", 0x48), _k("KP9", 0x49), _k("KPMinus", 0x4A, "-", "-"), _k("KP4", 0x4B),
    _k("KP5", 0x4C), _k("KP6", 0x4D), _k("KPPlus", 0x4E, "+", "+"), _k("KP1", 0x4F), _k("KP2", 0x50),
    _k("KP3", 0x51), _k("KP0", 0x52), _k("KPDot", 0x53), _k("SysRq", 0x54),
    # E0-prefixed keys
    _k("KPEnter", 0x1C, "\n", e0=True), _k("RightCtrl", 0x1D, e0=True), _k("KPSlash", 0x35, "/", "/", e0=True),
    _k("PrintScreen", 0x37, e0=True), _k("RightAlt", 0x38, e0=True), _k("Home", 0x47, e0=True),
    _k("Up", 0x48, e0=True), _k("PageUp", 0x49, e0=True), _k("Left", 0x4B, e0=True), _k("Right", 0x4D, e0=True),
    _k("End", 0x4F, e0=True), _k("Down", 0x50, e0=True), _k("PageDown", 0x51, e0=True),
    _k("Insert", 0x52, e0=True), _k("Delete", 0x53, e0=True), _k("LeftMeta", 0x5B, e0=True),
    _k("RightMeta", 0x5C, e0=True), _k("Menu", 0x5D, e0=True),
)

PAUSE = "Pause"  # E1 1D 45 / E1 9D C5: no break of its own, and not in KEYS (no single code)
_PAUSE_CODES = (0x1D, 0x45)

_BY_CODE: dict[tuple[bool, int], Key] = {(k.e0, k.code): k for k in KEYS}
_BY_NAME: dict[str, Key] = {k.name.lower(): k for k in KEYS}
_ALIASES = {
    "ctrl": "LeftCtrl", "control": "LeftCtrl", "lctrl": "LeftCtrl", "rctrl": "RightCtrl",
    "shift": "LeftShift", "lshift": "LeftShift", "rshift": "RightShift",
    "alt": "LeftAlt", "lalt": "LeftAlt", "ralt": "RightAlt", "altgr": "RightAlt",
    "win": "LeftMeta", "meta": "LeftMeta", "super": "LeftMeta", "cmd": "LeftMeta",
    "esc": "Escape", "return": "Enter", "ret": "Enter", "del": "Delete", "ins": "Insert", "bksp": "Backspace",
    "backspace": "Backspace", "pgup": "PageUp", "pgdn": "PageDown", "space": "Space", "spacebar": "Space",
    "caps": "CapsLock", "capslock": "CapsLock", "prtsc": "PrintScreen", "plus": "=", "minus": "-",
}
# Each character of the layout: its key and whether Shift is needed. A key's unshifted char wins.
_BY_CHAR: dict[str, tuple[Key, bool]] = {}
for _key in KEYS:
    if _key.shifted is not None and _key.shifted != _key.char:
        _BY_CHAR.setdefault(_key.shifted, (_key, True))
for _key in KEYS:
    if _key.char is not None and not _key.name.startswith("KP"):
        _BY_CHAR[_key.char] = (_key, False)
_BY_CHAR["\r"] = _BY_CHAR["\n"]

_SHIFT = _BY_NAME["leftshift"]
_LOCKS = {"CapsLock": LedFlags.CAPS_LOCK, "NumLock": LedFlags.NUM_LOCK, "ScrollLock": LedFlags.SCROLL_LOCK}
_MODIFIER_NAMES = frozenset({"LeftCtrl", "RightCtrl", "LeftShift", "RightShift", "LeftAlt", "RightAlt", "LeftMeta",
                             "RightMeta"})


def key_named(name: str) -> Key | None:
    """The key called ``name`` (case-insensitive; "ctrl", "esc", "del" and friends too), or None."""
    lowered = name.lower()
    key = _BY_NAME.get(lowered)
    if key is None and lowered in _ALIASES:
        alias = _ALIASES[lowered]
        key = _BY_NAME.get(alias.lower()) or _BY_CHAR[alias][0]
    return key


def key_events(key: Key, *, release: bool) -> KeyEvent:
    """One make (or break) event of ``key``."""
    return KeyEvent(key.code, key.flags | (KeystrokeFlags.IS_BREAK if release else 0))


def _tap(key: Key) -> list[KeyEvent]:
    return [key_events(key, release=False), key_events(key, release=True)]


def _pause() -> list[KeyEvent]:
    """Pause/Break: E1 1D 45, E1 9D C5 (make and break at once, as the key sends them)."""
    first, second = _PAUSE_CODES
    e1, brk = KeystrokeFlags.IS_E1, KeystrokeFlags.IS_BREAK
    return [KeyEvent(first, e1), KeyEvent(second), KeyEvent(first, e1 | brk), KeyEvent(second, brk)]


def unicode_events(char: str) -> list[KeyEvent]:
    """A character as IS_UNICODE make and break events, one pair per UTF-16 code unit."""
    data = char.encode("utf-16-le", "surrogatepass")
    out: list[KeyEvent] = []
    for i in range(0, len(data), 2):
        unit = int.from_bytes(data[i:i + 2], "little")
        out += [KeyEvent(unit, KeystrokeFlags.IS_UNICODE),
                KeyEvent(unit, KeystrokeFlags.IS_UNICODE | KeystrokeFlags.IS_BREAK)]
    return out


def text_events(text: str, *, caps_lock: bool = False) -> list[KeyEvent]:
    """``text`` typed on a US keyboard: each character of the layout as its key (Left Shift around it when
    needed; with the guest's Caps Lock on, letters take the opposite shift so they come out as written),
    "\\r\\n" and "\\r" as one Enter, anything else as IS_UNICODE events."""
    out: list[KeyEvent] = []
    prev = ""
    for char in text:
        if char == "\n" and prev == "\r":
            prev = char
            continue
        prev = char
        hit = _BY_CHAR.get(char)
        if hit is None:
            out += unicode_events(char)
            continue
        key, shift = hit
        if caps_lock and char.isalpha():
            shift = not shift
        if shift:
            out += [key_events(_SHIFT, release=False), *_tap(key), key_events(_SHIFT, release=True)]
        else:
            out += _tap(key)
    return out


def combo_events(combo: str) -> list[KeyEvent]:
    """One chord as "ctrl+alt+Delete", "shift+Tab", "Enter", "F5", "ctrl++": the modifiers pressed in order, the
    last key pressed and released, the modifiers released in reverse. LocalProtocolError names an unknown key."""
    parts = combo.split("+")
    if combo.endswith("++"):
        parts = [*parts[:-2], "+"]
    if not combo or any(not p for p in parts):
        raise LocalProtocolError(f"key combination {combo!r} is empty or has an empty part")
    *mods, last = parts
    held: list[Key] = []
    for name in mods:
        key = key_named(name)
        if key is None:
            raise LocalProtocolError(f"unknown key {name!r} in {combo!r}")
        held.append(key)
    out = [key_events(k, release=False) for k in held]
    if last.lower() == PAUSE.lower():
        out += _pause()
    else:
        key = key_named(last)
        shift = False
        if key is None and len(last) == 1 and last in _BY_CHAR:
            key, shift = _BY_CHAR[last]
        if key is None:
            raise LocalProtocolError(f"unknown key {last!r} in {combo!r}")
        tap = _tap(key)
        out += [key_events(_SHIFT, release=False), *tap, key_events(_SHIFT, release=True)] if shift else tap
    out += [key_events(k, release=True) for k in reversed(held)]
    return out


def keys_events(spec: str) -> list[KeyEvent]:
    """Whitespace-separated chords, one after another: "ctrl+c", "ctrl+alt+del", "Escape : w q Enter"."""
    chords = spec.split()
    if not chords:
        raise LocalProtocolError("no keys given")
    return [ev for chord in chords for ev in combo_events(chord)]


@dataclass(frozen=True, slots=True)
class KeyStroke:
    """A key as the guest's keyboard driver sees it: which key, pressed or released, what it types.

    ``char`` is set on a press that types something: a character of the layout (Shift and Caps Lock
    applied), "\\n", "\\t", "\\b", "\\x1b", or a unicode event's character; never while Ctrl, Alt or Meta is
    held (those are shortcuts, read ``key`` and the modifiers)."""

    key: str
    pressed: bool
    char: str | None = None
    shift: bool = False
    ctrl: bool = False
    alt: bool = False
    meta: bool = False
    unicode: bool = False


class KeyDecoder:
    """Set-1 events back to keys, with the modifier and lock state a keyboard driver keeps."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.leds = 0  # LedFlags: what the lock keys have toggled
        self._e1: int | None = None  # the code after an E1 prefix, waiting for its second half
        self._high: int | None = None  # a UTF-16 high surrogate waiting for its low half

    def _held(self, modifier: str) -> bool:
        return f"Left{modifier}" in self.down or f"Right{modifier}" in self.down

    @property
    def shift(self) -> bool:
        return self._held("Shift")

    @property
    def ctrl(self) -> bool:
        return self._held("Ctrl")

    @property
    def alt(self) -> bool:
        return self._held("Alt")

    @property
    def meta(self) -> bool:
        return self._held("Meta")

    @property
    def caps_lock(self) -> bool:
        return bool(self.leds & LedFlags.CAPS_LOCK)

    def feed(self, event: KeyEvent) -> KeyStroke | None:
        """One EVENT; returns the key it completes (None for a prefix half or a unicode release)."""
        if event.info & KeystrokeFlags.IS_UNICODE:
            return self._unicode(event)
        release = event.is_break
        if event.info & KeystrokeFlags.IS_E1:
            self._e1 = event.make_code & 0x7F
            return None
        if self._e1 is not None:
            first, self._e1 = self._e1, None
            if (first, event.make_code & 0x7F) == _PAUSE_CODES:
                return KeyStroke(PAUSE, not release)
            return KeyStroke(f"E1-{first:02X}-{event.make_code & 0x7F:02X}", not release)
        key = _BY_CODE.get((bool(event.info & KeystrokeFlags.IS_E0), event.make_code & 0x7F))
        if key is None:
            prefix = "E0-" if event.info & KeystrokeFlags.IS_E0 else ""
            return self._stroke(f"{prefix}{event.make_code & 0x7F:02X}", not release)
        if release:
            self.down.discard(key.name)
            return self._stroke(key.name, False)
        repeat = key.name in self.down
        self.down.add(key.name)
        if not repeat:
            self._toggle(key.name)
        return self._stroke(key.name, True, self._char(key))

    def _stroke(self, name: str, pressed: bool, char: str | None = None) -> KeyStroke:
        return KeyStroke(name, pressed, char, self.shift, self.ctrl, self.alt, self.meta)

    def _toggle(self, name: str) -> None:
        bit = _LOCKS.get(name)
        if bit is not None:
            self.leds ^= bit

    def _char(self, key: Key) -> str | None:
        if key.char is None or key.name in _MODIFIER_NAMES or self.ctrl or self.alt or self.meta:
            return None
        shifted = self.shift
        if key.char.isalpha() and self.caps_lock:
            shifted = not shifted
        return key.shifted if shifted and key.shifted is not None else key.char

    def _unicode(self, event: KeyEvent) -> KeyStroke | None:
        if event.is_break:
            return None
        unit = event.make_code
        if 0xD800 <= unit < 0xDC00:
            self._high = unit
            return None
        if 0xDC00 <= unit < 0xE000:
            high, self._high = self._high, None
            char = "\ufffd" if high is None else chr(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00))
        else:
            if self._high is not None:
                self._high = None  # a high surrogate without its low half: dropped
            char = chr(unit)
        return KeyStroke("Unicode", True, char, unicode=True)


def typed_text(strokes: Iterable[KeyStroke]) -> str:
    """The characters a run of keystrokes typed (unit tests and the guest's line reader)."""
    return "".join(s.char for s in strokes if s.pressed and s.char is not None)
