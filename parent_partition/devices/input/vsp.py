"""The synthetic keyboard and mouse (SYNTHHID) VSPs (Linux drivers/input/serio/hyperv-keyboard.c,
drivers/hid/hid-hyperv.c; OpenVMM uidevices). Today they run their protocol handshakes only."""

from __future__ import annotations

from vmbus_proto.devices.input import keyboard, mouse

from ...vsp import HandshakeVsp


class KeyboardVsp(HandshakeVsp):
    module = keyboard


class MouseVsp(HandshakeVsp):
    module = mouse
