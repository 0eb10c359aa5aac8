"""SYNTH_KBD: the synthetic keyboard protocol between the keyboard VSC and the input VSP.

Mirrors Linux drivers/input/serio/hyperv-keyboard.c (``struct synth_kbd_msg_hdr``,
``struct synth_kbd_protocol_request/response``, ``struct synth_kbd_keystroke``, ``hv_kbd_connect_to_vsp``,
``hv_kbd_on_receive``) and OpenVMM vm/devices/uidevices/src/keyboard/mod.rs and keyboard/protocol.rs.
The channel is raw (no pipe header) and the message header is only ``type u32``: there is no size field.
Key codes are PC/AT set-1 make codes.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ... import guids
from ...errors import DeviceProtocolError
from ...packets import PacketType
from ...ring import VMBUS_DEFAULT_MAX_PKT_SIZE, vmbus_ring_size
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, VscVersionHandshake, major_minor_text, name_text

__all__ = [
    "DEFAULT_SUPPORTED",
    "KBD_HEADER_SIZE",
    "LINUX_VERSIONS",
    "SPEC",
    "KeyEvent",
    "KeystrokeFlags",
    "LedFlags",
    "LedIndicators",
    "MessageType",
    "ProtocolRequest",
    "ProtocolResponse",
    "ProtocolStatus",
    "Version",
    "VscHandshake",
    "VspHandshake",
    "describe",
    "pack_message",
    "unpack_message",
    "version_text",
]


class MessageType(enum.IntEnum):
    """``enum synth_kbd_msg_type``."""

    PROTOCOL_REQUEST = 1
    PROTOCOL_RESPONSE = 2
    EVENT = 3
    LED_INDICATORS = 4  # "SET_LED_INDICATORS": Windows guests only


class Version(enum.IntEnum):
    """``SYNTH_KBD_VERSION``: ``major << 16 | minor``."""

    WIN8 = 0x00010000  # 1.0


class ProtocolStatus(enum.IntFlag):
    """``synth_kbd_protocol_response.proto_status``."""

    ACCEPTED = 0x1


class KeystrokeFlags(enum.IntFlag):
    """``synth_kbd_keystroke.info``."""

    IS_UNICODE = 0x1
    IS_BREAK = 0x2
    IS_E0 = 0x4
    IS_E1 = 0x8


class LedFlags(enum.IntFlag):
    """``led_flags`` of LED_INDICATORS: Windows ``KEYBOARD_INDICATOR_PARAMETERS.LedFlags``."""

    SCROLL_LOCK = 0x1
    NUM_LOCK = 0x2
    CAPS_LOCK = 0x4


KBD_HEADER_SIZE = 4
LINUX_VERSIONS: tuple[int, ...] = (Version.WIN8,)
DEFAULT_SUPPORTED: frozenset[int] = frozenset({Version.WIN8})

_U32 = struct.Struct("<I")
_KEYSTROKE = struct.Struct("<HHI")
_LED = struct.Struct("<HH")


def pack_message(msg_type: int, body: bytes) -> bytes:
    return _U32.pack(msg_type) + body


def unpack_message(payload: bytes) -> tuple[int, bytes]:
    """``(type, body)`` of a keyboard packet."""
    if len(payload) < KBD_HEADER_SIZE:
        raise DeviceProtocolError(f"keyboard message of {len(payload)} bytes is shorter than its header")
    (msg_type,) = _U32.unpack_from(payload)
    return msg_type, bytes(payload[KBD_HEADER_SIZE:])


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise DeviceProtocolError(f"keyboard {what} body of {len(body)} bytes, need {size}")


@dataclass(frozen=True, slots=True)
class ProtocolRequest:
    """``struct synth_kbd_protocol_request`` body."""

    version: int

    def pack(self) -> bytes:
        return _U32.pack(self.version)

    @classmethod
    def unpack(cls, body: bytes) -> ProtocolRequest:
        _need(body, _U32.size, "PROTOCOL_REQUEST")
        return cls(*_U32.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ProtocolResponse:
    """``struct synth_kbd_protocol_response`` body."""

    proto_status: int

    @property
    def accepted(self) -> bool:
        return bool(self.proto_status & ProtocolStatus.ACCEPTED)

    def pack(self) -> bytes:
        return _U32.pack(self.proto_status)

    @classmethod
    def unpack(cls, body: bytes) -> ProtocolResponse:
        _need(body, _U32.size, "PROTOCOL_RESPONSE")
        return cls(*_U32.unpack_from(body))


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """``struct synth_kbd_keystroke`` body: ``make_code u16, reserved u16, info u32``."""

    make_code: int
    info: int = 0
    reserved: int = 0

    @property
    def is_break(self) -> bool:
        return bool(self.info & KeystrokeFlags.IS_BREAK)

    def scancodes(self) -> bytes:
        """The set-1 bytes Linux injects into its serio port for this event."""
        prefix = b""
        if self.info & KeystrokeFlags.IS_E0:
            prefix += b"\xe0"
        if self.info & KeystrokeFlags.IS_E1:
            prefix += b"\xe1"
        code = self.make_code | 0x80 if self.is_break else self.make_code
        return prefix + bytes([code & 0xFF])

    def pack(self) -> bytes:
        return _KEYSTROKE.pack(self.make_code, self.reserved, self.info)

    @classmethod
    def unpack(cls, body: bytes) -> KeyEvent:
        _need(body, _KEYSTROKE.size, "EVENT")
        make_code, reserved, info = _KEYSTROKE.unpack_from(body)
        return cls(make_code, info, reserved)


@dataclass(frozen=True, slots=True)
class LedIndicators:
    """``LED_INDICATORS`` body: ``led_flags u16, padding u16``."""

    led_flags: int
    padding: int = 0

    def pack(self) -> bytes:
        return _LED.pack(self.led_flags, self.padding)

    @classmethod
    def unpack(cls, body: bytes) -> LedIndicators:
        _need(body, _LED.size, "LED_INDICATORS")
        return cls(*_LED.unpack_from(body))


version_text = major_minor_text  # SYNTH_KBD_VERSION: 0x10000 -> "1.0"


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a synthetic keyboard message."""
    msg_type, body = unpack_message(payload)
    text = name_text("SYNTH_KBD_", MessageType, msg_type)
    if msg_type == MessageType.PROTOCOL_REQUEST:
        return f"{text} version={version_text(ProtocolRequest.unpack(body).version)}"
    if msg_type == MessageType.PROTOCOL_RESPONSE:
        r = ProtocolResponse.unpack(body)
        return f"{text} proto_status={r.proto_status:#x}" + (" (ACCEPTED)" if r.accepted else " (refused)")
    if msg_type == MessageType.EVENT:
        ev = KeyEvent.unpack(body)
        return f"{text} make_code={ev.make_code:#04x} info={ev.info:#x}"
    if msg_type == MessageType.LED_INDICATORS:
        return f"{text} led_flags={LedIndicators.unpack(body).led_flags:#x}"
    return text


SPEC = DeviceSpec(
    name="keyboard",
    class_id=guids.SYNTH_KEYBOARD,
    default_instance=uuid.UUID("d34b2567-b9b6-42b9-8778-0a4ec0b955bf"),  # OpenVMM keyboard instance
    pipe_mode=False,
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(36 * 1024),  # KBD_VSC_SEND_RING_BUFFER_SIZE = VMBUS_RING_SIZE(36 KiB): 9 pages
    max_packet=VMBUS_DEFAULT_MAX_PKT_SIZE,  # hyperv-keyboard leaves max_pkt_size at VMBUS_DEFAULT_MAX_PKT_SIZE
    protocol="SYNTH_KBD",
    version_text=version_text,
    title="keyboard: ring, open and the SYNTH_KBD handshake",
    explain=(
        "The keyboard VSC sends SYNTH_KBD_PROTOCOL_REQUEST for version 1.0; the ACCEPTED bit in the response "
        "makes it a keyboard, and key presses then arrive as SYNTH_KBD_EVENT scan codes."),
)


class VscHandshake(VscVersionHandshake):
    """hyperv-keyboard ``hv_kbd_connect_to_vsp``: PROTOCOL_REQUEST (completion requested), then a
    PROTOCOL_RESPONSE with the ACCEPTED bit. Completions and early EVENTs are dropped."""

    protocol = "keyboard"
    request_name = "PROTOCOL_REQUEST"

    def __init__(self, versions: Sequence[int] = LINUX_VERSIONS) -> None:
        super().__init__(versions)

    def _request(self) -> Outgoing:
        payload = pack_message(MessageType.PROTOCOL_REQUEST, ProtocolRequest(self.candidate).pack())
        return Outgoing(payload, PacketType.DATA_INBAND, self._trans_id(), True)

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if not self._receiving():
            return []
        if packet.type == PacketType.COMP:
            return []
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"keyboard packet type {packet.type:#x}")
        msg_type, body = unpack_message(packet.payload)
        if msg_type == MessageType.EVENT:
            return []
        if msg_type != MessageType.PROTOCOL_RESPONSE:
            raise DeviceProtocolError(f"keyboard message type {msg_type} while waiting for PROTOCOL_RESPONSE")
        if ProtocolResponse.unpack(body).accepted:
            self.negotiated_version = self.candidate
            self._done = True
            return []
        offered = ", ".join(version_text(v) for v in self.versions)
        return self._refused(f"host refused every keyboard protocol version ({offered})")


class VspHandshake(Handshake):
    """OpenVMM's keyboard VSP until Active: PROTOCOL_RESPONSE with ACCEPTED iff the version is supported;
    a refused version waits for a new request."""

    def __init__(self, supported: Iterable[int] = DEFAULT_SUPPORTED) -> None:
        self.supported: frozenset[int] = frozenset(int(v) for v in supported)
        self.negotiated_version = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def start(self) -> list[Outgoing]:
        return []

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self._done:
            raise DeviceProtocolError("keyboard handshake is over: this packet belongs to the running device")
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"keyboard VSP got packet type {packet.type:#x}")
        msg_type, body = unpack_message(packet.payload)
        if msg_type != MessageType.PROTOCOL_REQUEST:
            raise DeviceProtocolError(f"keyboard message type {msg_type} before PROTOCOL_REQUEST")
        version = ProtocolRequest.unpack(body).version
        accepted = version in self.supported
        if accepted:
            self.negotiated_version = version
            self._done = True
        status = ProtocolStatus.ACCEPTED if accepted else 0
        return [Outgoing(pack_message(MessageType.PROTOCOL_RESPONSE, ProtocolResponse(status).pack()))]
