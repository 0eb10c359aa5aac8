"""The browser's keys as PC/AT set-1 scan codes: ``KeyboardEvent.code`` (the physical key, whatever the layout)
to the key of ``vmbus_proto.devices.input.keymap``.

What a VNC or RDP web client does before its server injects keys (noVNC's ``vkeys``/``xtscancodes``, QEMU's
``ui/keycodemapdb`` ``web`` column): the physical key is sent, so Shift, Ctrl and Alt are keys of their own
and the guest's layout decides which character it types.
"""

from __future__ import annotations

from vmbus_proto.devices.input.keyboard import KeyEvent
from vmbus_proto.devices.input.keymap import PAUSE, Key, combo_events, key_events, key_named

_PUNCTUATION = {
    "Minus": "-", "Equal": "=", "BracketLeft": "[", "BracketRight": "]", "Backslash": "\\", "Semicolon": ";",
    "Quote": "'", "Backquote": "`", "Comma": ",", "Period": ".", "Slash": "/",
}
_NAMED = {
    "Escape": "Escape", "Backspace": "Backspace", "Tab": "Tab", "Enter": "Enter", "Space": "Space",
    "ControlLeft": "LeftCtrl", "ControlRight": "RightCtrl", "ShiftLeft": "LeftShift", "ShiftRight": "RightShift",
    "AltLeft": "LeftAlt", "AltRight": "RightAlt", "MetaLeft": "LeftMeta", "MetaRight": "RightMeta",
    "OSLeft": "LeftMeta", "OSRight": "RightMeta", "ContextMenu": "Menu",
    "CapsLock": "CapsLock", "NumLock": "NumLock", "ScrollLock": "ScrollLock", "PrintScreen": "PrintScreen",
    "Insert": "Insert", "Delete": "Delete", "Home": "Home", "End": "End", "PageUp": "PageUp", "PageDown": "PageDown",
    "ArrowUp": "Up", "ArrowDown": "Down", "ArrowLeft": "Left", "ArrowRight": "Right",
    "NumpadEnter": "KPEnter", "NumpadAdd": "KPPlus", "NumpadSubtract": "KPMinus", "NumpadMultiply": "KPAsterisk",
    "NumpadDivide": "KPSlash", "NumpadDecimal": "KPDot",
}


def _table() -> dict[str, Key]:
    names: dict[str, str] = {**_PUNCTUATION, **_NAMED}
    names.update({f"Key{c}": c.lower() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})
    names.update({f"Digit{d}": str(d) for d in range(10)})
    names.update({f"Numpad{d}": f"KP{d}" for d in range(10)})
    names.update({f"F{i}": f"F{i}" for i in range(1, 13)})
    table = {}
    for code, name in names.items():
        key = key_named(name)
        assert key is not None, name
        table[code] = key
    return table


DOM_KEYS: dict[str, Key] = _table()


def dom_key_events(code: str, down: bool) -> list[KeyEvent] | None:
    """The set-1 events of the browser key ``code`` going down (or up); None for a key with no scan code."""
    if code == PAUSE:  # E1 1D 45 E1 9D C5 at press, nothing at release (the key itself sends no break)
        return combo_events(PAUSE) if down else []
    key = DOM_KEYS.get(code)
    if key is None:
        return None
    return [key_events(key, release=not down)]
