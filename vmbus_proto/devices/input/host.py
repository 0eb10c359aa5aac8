"""The input VSPs' sans-IO state machines: the synthetic keyboard and the SynthHID mouse, host side.

Mirrors OpenVMM vm/devices/uidevices/src/keyboard/mod.rs and mouse/mod.rs (``KeyboardChannel::process``,
``MouseChannel::process``): the version handshake (a refused version is answered not-accepted and the host
waits for a new request; the mouse then sends INITIAL_DEVICE_INFO and waits for its ACK), then Active. Only
an Active device takes input, as OpenVMM's input source is ``set_active(true)`` only then: a key or a mouse
report before that is refused (:class:`InputNotReady`), never queued, like input to a device that is not
there yet. In Active the keyboard accepts LED_INDICATORS (and keeps the LED state); the mouse accepts
nothing (OpenVMM: any packet is "received out of order packet"); anything else is a DeviceProtocolError.
"""

from __future__ import annotations

from collections.abc import Iterable

from ...errors import DeviceProtocolError, LocalProtocolError
from ...packets import PacketType
from ..base import Incoming, Outgoing, name_text
from . import keyboard, mouse

__all__ = ["InputNotReady", "KeyboardHost", "MouseHost", "check_report"]

MAX_AXIS = 0x7FFF  # the report descriptor's logical maximum for X and Y
MAX_WHEEL = 0x7FFF  # logical -32767..32767
MAX_BUTTONS = 0x1F  # five buttons


class InputNotReady(LocalProtocolError):
    """Input for a device that cannot take it yet (no channel, or its handshake is not finished)."""


class KeyboardHost:
    """One keyboard channel, host side: handshake, LED state, and EVENT packets for keys."""

    def __init__(self, handshake: keyboard.VspHandshake | None = None) -> None:
        self.handshake = handshake or keyboard.VspHandshake()
        self.led_flags = 0
        self.leds_received = 0
        self.refused = 0  # PROTOCOL_REQUESTs answered not-accepted
        self.events_sent = 0

    @property
    def active(self) -> bool:
        return self.handshake.done

    @property
    def state(self) -> str:
        return "active" if self.active else "waiting for PROTOCOL_REQUEST"

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if not self.active:
            out = self.handshake.receive(packet)
            if not self.active:
                self.refused += 1
            return out
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"keyboard VSP got packet type {packet.type:#x}")
        msg_type, body = keyboard.unpack_message(packet.payload)
        if msg_type == keyboard.MessageType.LED_INDICATORS:
            self.led_flags = keyboard.LedIndicators.unpack(body).led_flags
            self.leds_received += 1
            return []
        name = name_text("SYNTH_KBD_", keyboard.MessageType, msg_type)
        raise DeviceProtocolError(f"keyboard message {name} while active (only LED_INDICATORS is expected)")

    @property
    def caps_lock(self) -> bool:
        """The guest's Caps Lock, as its last LED_INDICATORS told."""
        return bool(self.led_flags & keyboard.LedFlags.CAPS_LOCK)

    def events(self, events: Iterable[keyboard.KeyEvent]) -> list[Outgoing]:
        """EVENT packets for ``events``; InputNotReady before the handshake is done."""
        if not self.active:
            raise InputNotReady(f"keyboard handshake not finished ({self.state})")
        out = []
        for ev in events:
            if not ev.info & keyboard.KeystrokeFlags.IS_UNICODE and not 0 <= ev.make_code <= 0x7F:
                raise ValueError(f"make code {ev.make_code:#x} is not a 7-bit set-1 make code")
            out.append(Outgoing(keyboard.pack_message(keyboard.MessageType.EVENT, ev.pack())))
        self.events_sent += len(out)
        return out


def check_report(buttons: int, x: int, y: int, wheel: int) -> mouse.MouseReport:
    """A report within the descriptor's ranges, or ValueError saying which value is out of range."""
    if not 0 <= x <= MAX_AXIS or not 0 <= y <= MAX_AXIS:
        raise ValueError(f"mouse position ({x}, {y}) is outside 0..{MAX_AXIS}")
    if not 0 <= buttons <= MAX_BUTTONS:
        raise ValueError(f"mouse buttons {buttons:#x} are outside 0..{MAX_BUTTONS:#x} (five buttons)")
    if not -MAX_WHEEL <= wheel <= MAX_WHEEL:
        raise ValueError(f"mouse wheel {wheel} is outside -{MAX_WHEEL}..{MAX_WHEEL}")
    return mouse.MouseReport(buttons, x, y, wheel)


class MouseHost:
    """One mouse channel, host side: handshake with INITIAL_DEVICE_INFO and its ACK, then INPUT_REPORTs."""

    def __init__(self, handshake: mouse.VspHandshake | None = None) -> None:
        self.handshake = handshake or mouse.VspHandshake()
        self.refused = 0
        self.reports_sent = 0
        self.last: mouse.MouseReport | None = None

    @property
    def active(self) -> bool:
        return self.handshake.done

    @property
    def state(self) -> str:
        if self.active:
            return "active"
        if self.handshake.negotiated_version is None:
            return "waiting for PROTOCOL_REQUEST"
        return "waiting for INITIAL_DEVICE_INFO_ACK"

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self.active:
            what = packet.type if packet.type != PacketType.DATA_INBAND else _describe(packet.payload)
            raise DeviceProtocolError(f"synthhid packet {what} while active (OpenVMM: out of order)")
        out = self.handshake.receive(packet)
        if self.handshake.negotiated_version is None:
            self.refused += 1
        return out

    def report(self, buttons: int, x: int, y: int, wheel: int = 0) -> Outgoing:
        """An INPUT_REPORT; InputNotReady before the guest acknowledged the device info."""
        rep = check_report(buttons, x, y, wheel)
        if not self.active:
            raise InputNotReady(f"mouse handshake not finished ({self.state})")
        self.reports_sent += 1
        self.last = rep
        body = rep.pack()
        return Outgoing(mouse.pack_message(mouse.MessageType.INPUT_REPORT, body))


def _describe(payload: bytes) -> str:
    try:
        return mouse.describe(payload)
    except DeviceProtocolError as exc:
        return f"({exc})"
