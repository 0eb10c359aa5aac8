"""The synthetic keyboard and mouse VSCs (Linux drivers/input/serio/hyperv-keyboard.c,
drivers/hid/hid-hyperv.c). Today they run their protocol handshakes only."""

from __future__ import annotations

from vmbus_proto.devices.input import keyboard, mouse

from ...vsc import HandshakeVsc


class KeyboardVsc(HandshakeVsc):
    module = keyboard


class MouseVsc(HandshakeVsc):
    module = mouse
