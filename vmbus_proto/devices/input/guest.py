"""The input VSCs' sans-IO state after their handshakes: keys and mouse reports out of packets.

Keyboard: Linux drivers/input/serio/hyperv-keyboard.c ``hv_kbd_on_receive``: an EVENT becomes its set-1
bytes (``KeyEvent.scancodes``) and then a key (``keymap.KeyDecoder``, the part atkbd plays); payloads of
4 bytes or fewer and EVENTs shorter than 12 bytes are dropped; unknown message types are logged and
dropped; a late PROTOCOL_RESPONSE is ignored. Like a Windows guest (Linux never sends it), the guest tells
the host its lock LEDs with LED_INDICATORS whenever Caps, Num or Scroll Lock toggles.

Mouse: Linux drivers/hid/hid-hyperv.c ``mousevsc_on_receive``: only pipe DATA packets count, an INPUT_REPORT
goes to the HID core, other message types are logged and dropped. A report shorter than the 7 bytes the
descriptor defines is dropped here (the HID core would reject it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import DeviceProtocolError
from ...packets import PacketType
from ..base import Incoming, Outgoing
from . import keyboard, mouse
from .keymap import KeyDecoder, KeyStroke

__all__ = ["GuestCounters", "KeyboardGuest", "MouseGuest"]

_EVENT_PACKET = keyboard.KBD_HEADER_SIZE + 8  # hyperv-keyboard: an EVENT is at least 12 bytes


@dataclass(slots=True)
class GuestCounters:
    received: int = 0  # keys (keyboard) or reports (mouse) delivered
    dropped_malformed: int = 0  # short packets, wrong pipe type
    dropped_unknown: int = 0  # unknown message types
    leds_sent: int = 0
    unknown_types: list[int] = field(default_factory=list)  # the first few, for the log


class KeyboardGuest:
    """The keyboard VSC after its handshake: EVENT packets in, keystrokes out (and LED_INDICATORS back)."""

    def __init__(self, counters: GuestCounters | None = None) -> None:
        self.decoder = KeyDecoder()
        self.counters = counters or GuestCounters()
        self.events = 0

    def receive(self, packet: Incoming) -> tuple[list[KeyStroke], list[Outgoing]]:
        c = self.counters
        if packet.type == PacketType.COMP:
            return [], []
        if packet.type != PacketType.DATA_INBAND or len(packet.payload) <= keyboard.KBD_HEADER_SIZE:
            c.dropped_malformed += 1
            return [], []
        msg_type, body = keyboard.unpack_message(packet.payload)
        if msg_type == keyboard.MessageType.PROTOCOL_RESPONSE:
            return [], []
        if msg_type != keyboard.MessageType.EVENT:
            _unknown(c, msg_type)
            return [], []
        if len(packet.payload) < _EVENT_PACKET:
            c.dropped_malformed += 1
            return [], []
        self.events += 1
        leds = self.decoder.leds
        stroke = self.decoder.feed(keyboard.KeyEvent.unpack(body))
        out: list[Outgoing] = []
        if self.decoder.leds != leds:
            c.leds_sent += 1
            led = keyboard.LedIndicators(self.decoder.leds)
            out.append(Outgoing(keyboard.pack_message(keyboard.MessageType.LED_INDICATORS, led.pack())))
        if stroke is None:
            return [], out
        c.received += 1
        return [stroke], out


class MouseGuest:
    """The mouse VSC after its handshake: INPUT_REPORT packets in, reports out."""

    def __init__(self, counters: GuestCounters | None = None) -> None:
        self.counters = counters or GuestCounters()

    def receive(self, packet: Incoming) -> mouse.MouseReport | None:
        c = self.counters
        if packet.type == PacketType.COMP:
            return None
        try:
            if packet.type != PacketType.DATA_INBAND:
                raise DeviceProtocolError(f"packet type {packet.type:#x}")
            msg_type, body = mouse.unpack_message(packet.payload)
            if msg_type != mouse.MessageType.INPUT_REPORT:
                _unknown(c, msg_type)
                return None
            report = mouse.MouseReport.unpack(body)
        except (DeviceProtocolError, struct.error):
            c.dropped_malformed += 1
            return None
        c.received += 1
        return report


def _unknown(c: GuestCounters, msg_type: int) -> None:
    c.dropped_unknown += 1
    if len(c.unknown_types) < 8:
        c.unknown_types.append(msg_type)
