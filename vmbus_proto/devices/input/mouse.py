"""SYNTHHID: the synthetic HID mouse protocol between the mouse VSC and the input VSP, up to its handshake.

Mirrors Linux drivers/hid/hid-hyperv.c (``struct synthhid_msg_hdr``, ``struct hv_input_dev_info``,
``struct synthhid_device_info``, ``mousevsc_connect_to_vsp``, ``mousevsc_on_receive_device_info``) and
OpenVMM vm/devices/uidevices/src/mouse/mod.rs (``MouseChannel::process``) and mouse/protocol.rs
(``REPORT_DESCRIPTOR``, ``MessageDeviceInfo``, ``MousePacket``). The channel is in pipe message mode:
pipe header ``{1, n}``, then ``{type u32, size u32}`` (size = payload bytes), then the payload.

INITIAL_DEVICE_INFO is padded as OpenVMM does: the report-descriptor area is 128 bytes (169 payload bytes),
while the header's size stays 32 + 9 + 67 = 108; a guest reads the descriptor length from the HID descriptor.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ... import guids
from ...errors import DeviceProtocolError, LocalProtocolError
from ...packets import PacketType
from ...pipe import pipe_unwrap, pipe_wrap
from ...ring import VMBUS_DEFAULT_MAX_PKT_SIZE, vmbus_ring_size
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, VscVersionHandshake, major_minor_text, name_text

__all__ = [
    "DEFAULT_DEVICE_INFO",
    "DEFAULT_SUPPORTED",
    "HID_DESCRIPTOR_SIZE",
    "INPUT_DEV_INFO_SIZE",
    "LINUX_VERSIONS",
    "REPORT_DESCRIPTOR",
    "REPORT_DESCRIPTOR_AREA",
    "SPEC",
    "SYNTHHID_HEADER_SIZE",
    "DeviceInfoAck",
    "HidDescriptor",
    "InitialDeviceInfo",
    "InputDevInfo",
    "MessageType",
    "MouseButton",
    "MouseReport",
    "ProtocolRequest",
    "ProtocolResponse",
    "Version",
    "VscHandshake",
    "VspHandshake",
    "describe",
    "pack_message",
    "unpack_message",
    "version_text",
]


class MessageType(enum.IntEnum):
    """``enum synthhid_msg_type``."""

    PROTOCOL_REQUEST = 0
    PROTOCOL_RESPONSE = 1
    INITIAL_DEVICE_INFO = 2
    INITIAL_DEVICE_INFO_ACK = 3
    INPUT_REPORT = 4


class Version(enum.IntEnum):
    """``SYNTHHID_INPUT_VERSION``: ``major << 16 | minor``."""

    V1_0 = 0x00010000  # Beta/RC before 2008-01-22
    V2_0 = 0x00020000


class MouseButton(enum.IntFlag):
    """``MouseReport.buttons`` bits (OpenVMM ``HID_MOUSE_BUTTON_*``; buttons 4 and 5 per the descriptor)."""

    LEFT = 0x01
    RIGHT = 0x02
    MIDDLE = 0x04
    BUTTON4 = 0x08
    BUTTON5 = 0x10


SYNTHHID_HEADER_SIZE = 8
INPUT_DEV_INFO_SIZE = 32
HID_DESCRIPTOR_SIZE = 9
REPORT_DESCRIPTOR_AREA = 128  # OpenVMM MessageDeviceInfo.report_descriptor

LINUX_VERSIONS: tuple[int, ...] = (Version.V2_0,)
DEFAULT_SUPPORTED: frozenset[int] = frozenset({Version.V2_0})  # OpenVMM accepts only 2.0

# OpenVMM REPORT_DESCRIPTOR: mouse, 5 buttons + 3 pad bits, absolute X/Y 0..32767, relative 16-bit wheel.
REPORT_DESCRIPTOR = bytes.fromhex(
    "05 01 09 02 A1 01 09 01 A1 00 05 09 19 01 29 05 15 00 25 01 95 05 75 01 81 02 95 01 75 03 81 01"
    " 05 01 09 30 09 31 15 00 26 FF 7F 75 10 95 02 81 02 05 01 09 38 16 01 80 26 FF 7F 75 10 95 01"
    " 81 06 C0 C0")

_HEADER = struct.Struct("<II")
_U32 = struct.Struct("<I")
_RESPONSE = struct.Struct("<IB")
_DEV_INFO = struct.Struct("<IHHH22s")
_HID_DESCRIPTOR = struct.Struct("<BBHBBBH")
_REPORT = struct.Struct("<BHHh")


def pack_message(msg_type: int, body: bytes, size: int | None = None) -> bytes:
    """Pipe header + synthhid header + body; ``size`` defaults to ``len(body)``."""
    return pipe_wrap(_HEADER.pack(msg_type, len(body) if size is None else size) + body)


def unpack_message(packet: bytes) -> tuple[int, bytes]:
    """``(type, body)`` of a pipe DATA packet, the body cut to the header's size."""
    data = pipe_unwrap(packet)
    if len(data) < SYNTHHID_HEADER_SIZE:
        raise DeviceProtocolError(f"synthhid message of {len(data)} bytes is shorter than its header")
    msg_type, size = _HEADER.unpack_from(data)
    body = data[SYNTHHID_HEADER_SIZE:]
    if size > len(body):
        raise DeviceProtocolError(f"synthhid header says {size} bytes, message has {len(body)}")
    return msg_type, body[:size]


@dataclass(frozen=True, slots=True)
class ProtocolRequest:
    """``struct synthhid_protocol_request`` body."""

    version: int

    def pack(self) -> bytes:
        return _U32.pack(self.version)

    @classmethod
    def unpack(cls, body: bytes) -> ProtocolRequest:
        if len(body) < _U32.size:
            raise DeviceProtocolError(f"synthhid PROTOCOL_REQUEST body of {len(body)} bytes, need 4")
        return cls(*_U32.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ProtocolResponse:
    """``struct synthhid_protocol_response`` body (5 bytes, packed)."""

    version_requested: int
    approved: int

    def pack(self) -> bytes:
        return _RESPONSE.pack(self.version_requested, self.approved)

    @classmethod
    def unpack(cls, body: bytes) -> ProtocolResponse:
        if len(body) < _RESPONSE.size:
            raise DeviceProtocolError(f"synthhid PROTOCOL_RESPONSE body of {len(body)} bytes, need 5")
        return cls(*_RESPONSE.unpack_from(body))


@dataclass(frozen=True, slots=True)
class InputDevInfo:
    """``struct hv_input_dev_info`` (32 bytes)."""

    vendor: int
    product: int
    version: int
    size: int = INPUT_DEV_INFO_SIZE

    def pack(self) -> bytes:
        return _DEV_INFO.pack(self.size, self.vendor, self.product, self.version, bytes(22))

    @classmethod
    def unpack(cls, body: bytes) -> InputDevInfo:
        if len(body) < INPUT_DEV_INFO_SIZE:
            raise DeviceProtocolError(f"hv_input_dev_info of {len(body)} bytes, need 32")
        size, vendor, product, version, _ = _DEV_INFO.unpack_from(body)
        return cls(vendor, product, version, size)


@dataclass(frozen=True, slots=True)
class HidDescriptor:
    """The USB HID class descriptor with one report descriptor entry (9 bytes)."""

    report_length: int
    length: int = HID_DESCRIPTOR_SIZE
    descriptor_type: int = 0x21
    bcd_hid: int = 0x0101
    country_code: int = 0
    num_descriptors: int = 1
    report_type: int = 0x22

    def pack(self) -> bytes:
        return _HID_DESCRIPTOR.pack(self.length, self.descriptor_type, self.bcd_hid, self.country_code,
                                    self.num_descriptors, self.report_type, self.report_length)

    @classmethod
    def unpack(cls, body: bytes) -> HidDescriptor:
        if len(body) < HID_DESCRIPTOR_SIZE:
            raise DeviceProtocolError(f"HID descriptor of {len(body)} bytes, need 9")
        length, dtype, bcd, country, num, rtype, rlen = _HID_DESCRIPTOR.unpack_from(body)
        return cls(rlen, length, dtype, bcd, country, num, rtype)


@dataclass(frozen=True, slots=True)
class InitialDeviceInfo:
    """``struct synthhid_device_info`` body: device info, HID descriptor, then the report descriptor."""

    info: InputDevInfo
    descriptor: HidDescriptor
    report_descriptor: bytes

    @property
    def size(self) -> int:
        """The synthhid header's size for this message (unpadded)."""
        return INPUT_DEV_INFO_SIZE + self.descriptor.length + len(self.report_descriptor)

    def pack(self, report_area: int = REPORT_DESCRIPTOR_AREA) -> bytes:
        """The body with the report descriptor zero-padded to ``report_area`` bytes (OpenVMM: 128)."""
        if self.descriptor.length != HID_DESCRIPTOR_SIZE:
            raise LocalProtocolError(f"HID descriptor bLength {self.descriptor.length} is not 9")
        pad = max(0, report_area - len(self.report_descriptor))
        return self.info.pack() + self.descriptor.pack() + self.report_descriptor + bytes(pad)

    @classmethod
    def unpack(cls, body: bytes) -> InitialDeviceInfo:
        """As Linux ``mousevsc_on_receive_device_info``: the report descriptor starts ``bLength`` bytes into
        the HID descriptor and is ``wDescriptorLength`` long."""
        info = InputDevInfo.unpack(body)
        descriptor = HidDescriptor.unpack(body[INPUT_DEV_INFO_SIZE:])
        if descriptor.length < HID_DESCRIPTOR_SIZE:
            raise DeviceProtocolError(f"HID descriptor bLength {descriptor.length} is below 9")
        if descriptor.num_descriptors < 1 or descriptor.report_length == 0:
            raise DeviceProtocolError("HID descriptor has no report descriptor")
        start = INPUT_DEV_INFO_SIZE + descriptor.length
        end = start + descriptor.report_length
        if end > len(body):
            raise DeviceProtocolError(
                f"report descriptor of {descriptor.report_length} bytes overruns INITIAL_DEVICE_INFO "
                f"({len(body)} bytes)")
        return cls(info, descriptor, bytes(body[start:end]))


@dataclass(frozen=True, slots=True)
class DeviceInfoAck:
    """``struct synthhid_device_info_ack`` body (one reserved byte)."""

    reserved: int = 0

    def pack(self) -> bytes:
        return bytes([self.reserved])

    @classmethod
    def unpack(cls, body: bytes) -> DeviceInfoAck:
        if len(body) < 1:
            raise DeviceProtocolError("synthhid INITIAL_DEVICE_INFO_ACK with an empty body")
        return cls(body[0])


@dataclass(frozen=True, slots=True)
class MouseReport:
    """The 7-byte INPUT_REPORT the report descriptor defines (OpenVMM ``MousePacket``)."""

    buttons: int = 0
    x: int = 0  # 0..0x7FFF, absolute over the screen
    y: int = 0
    wheel: int = 0  # relative, signed

    def pack(self) -> bytes:
        return _REPORT.pack(self.buttons, self.x, self.y, self.wheel)

    @classmethod
    def unpack(cls, body: bytes) -> MouseReport:
        if len(body) < _REPORT.size:
            raise DeviceProtocolError(f"mouse input report of {len(body)} bytes, need 7")
        return cls(*_REPORT.unpack_from(body))


DEFAULT_DEVICE_INFO = InitialDeviceInfo(
    info=InputDevInfo(vendor=0x045E, product=0x0621, version=0x0001),
    descriptor=HidDescriptor(report_length=len(REPORT_DESCRIPTOR)),
    report_descriptor=REPORT_DESCRIPTOR,
)

version_text = major_minor_text  # SYNTHHID_INPUT_VERSION: 0x20000 -> "2.0"


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a synthhid message."""
    msg_type, body = unpack_message(payload)
    text = name_text("SYNTH_HID_", MessageType, msg_type)
    if msg_type == MessageType.PROTOCOL_REQUEST:
        return f"{text} version={version_text(ProtocolRequest.unpack(body).version)}"
    if msg_type == MessageType.PROTOCOL_RESPONSE:
        r = ProtocolResponse.unpack(body)
        return f"{text} version_requested={version_text(r.version_requested)} approved={r.approved}"
    if msg_type == MessageType.INITIAL_DEVICE_INFO:
        info = InitialDeviceInfo.unpack(body)
        return (f"{text} vendor={info.info.vendor:#06x} product={info.info.product:#06x}"
                f" report_descriptor={len(info.report_descriptor)} bytes")
    if msg_type == MessageType.INPUT_REPORT:
        rep = MouseReport.unpack(body)
        return f"{text} buttons={rep.buttons:#x} x={rep.x} y={rep.y} wheel={rep.wheel}"
    return text


SPEC = DeviceSpec(
    name="mouse",
    class_id=guids.SYNTHHID_MOUSE,
    default_instance=uuid.UUID("58f75a6d-d949-4320-99e1-a2a2576d581c"),  # OpenVMM mouse INSTANCE_GUID
    pipe_mode=True,
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(36 * 1024),  # INPUTVSC_SEND/RECV_RING_BUFFER_SIZE = VMBUS_RING_SIZE(36 KiB): 9 pages
    max_packet=VMBUS_DEFAULT_MAX_PKT_SIZE,  # hid-hyperv leaves max_pkt_size at VMBUS_DEFAULT_MAX_PKT_SIZE
    protocol="SYNTHHID",
    version_text=version_text,
    title="mouse: ring, open and the SYNTHHID handshake",
    explain=(
        "The mouse VSC asks for SYNTHHID 2.0. On approval the host sends INITIAL_DEVICE_INFO, a USB HID "
        "descriptor and report descriptor, and the guest acknowledges it: the mouse is then an ordinary HID "
        "device fed by INPUT_REPORTs."),
)


class VscHandshake(VscVersionHandshake):
    """hid-hyperv ``mousevsc_connect_to_vsp``: PROTOCOL_REQUEST (completion requested), PROTOCOL_RESPONSE with
    ``approved != 0``, INITIAL_DEVICE_INFO, then INITIAL_DEVICE_INFO_ACK (completion requested).

    Completion packets and early INPUT_REPORTs are dropped, as Linux does.
    """

    protocol = "synthhid"
    request_name = "PROTOCOL_REQUEST"

    def __init__(self, versions: Sequence[int] = LINUX_VERSIONS) -> None:
        super().__init__(versions)
        self.device_info: InitialDeviceInfo | None = None

    @property
    def report_descriptor(self) -> bytes | None:
        return None if self.device_info is None else self.device_info.report_descriptor

    def _request(self) -> Outgoing:
        return self._send(MessageType.PROTOCOL_REQUEST, ProtocolRequest(self.candidate).pack())

    def _send(self, msg_type: MessageType, body: bytes) -> Outgoing:
        return Outgoing(pack_message(msg_type, body), PacketType.DATA_INBAND, self._trans_id(), True)

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if not self._receiving():
            return []
        if packet.type == PacketType.COMP:
            return []  # the host may complete our requests; Linux ignores VM_PKT_COMP
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthhid packet type {packet.type:#x}")
        msg_type, body = unpack_message(packet.payload)
        if msg_type == MessageType.INPUT_REPORT:
            return []
        if self.negotiated_version is None:
            if msg_type != MessageType.PROTOCOL_RESPONSE:
                raise DeviceProtocolError(f"synthhid message type {msg_type} while waiting for PROTOCOL_RESPONSE")
            response = ProtocolResponse.unpack(body)
            if response.approved:
                self.negotiated_version = self.candidate
                return []
            offered = ", ".join(version_text(v) for v in self.versions)
            return self._refused(f"host refused every synthhid version ({offered})")
        if msg_type != MessageType.INITIAL_DEVICE_INFO:
            raise DeviceProtocolError(f"synthhid message type {msg_type} while waiting for INITIAL_DEVICE_INFO")
        self.device_info = InitialDeviceInfo.unpack(body)
        self._done = True
        return [self._send(MessageType.INITIAL_DEVICE_INFO_ACK, DeviceInfoAck().pack())]


class _VspState(enum.Enum):
    READ_VERSION = "read_version"
    READ_DEVICE_INFO_ACK = "read_device_info_ack"
    ACTIVE = "active"


class VspHandshake(Handshake):
    """OpenVMM's mouse VSP until Active: PROTOCOL_RESPONSE ``{version_requested, approved}``; on approval
    INITIAL_DEVICE_INFO right after it; done when the ACK arrives. A refused version waits for a new request."""

    def __init__(self, supported: Iterable[int] = DEFAULT_SUPPORTED, *,
                 device_info: InitialDeviceInfo = DEFAULT_DEVICE_INFO) -> None:
        self.supported: frozenset[int] = frozenset(int(v) for v in supported)
        self.device_info = device_info
        self.negotiated_version = None
        self._state = _VspState.READ_VERSION

    @property
    def done(self) -> bool:
        return self._state is _VspState.ACTIVE

    def start(self) -> list[Outgoing]:
        return []

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self._state is _VspState.ACTIVE:
            raise DeviceProtocolError("synthhid handshake is over: this packet belongs to the running device")
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthhid VSP got packet type {packet.type:#x}")
        msg_type, body = unpack_message(packet.payload)
        if self._state is _VspState.READ_VERSION:
            if msg_type != MessageType.PROTOCOL_REQUEST:
                raise DeviceProtocolError(f"synthhid message type {msg_type} before PROTOCOL_REQUEST")
            version = ProtocolRequest.unpack(body).version
            approved = version in self.supported
            response = ProtocolResponse(version, int(approved))
            out = [Outgoing(pack_message(MessageType.PROTOCOL_RESPONSE, response.pack()))]
            if approved:
                self.negotiated_version = version
                self._state = _VspState.READ_DEVICE_INFO_ACK
                info = self.device_info
                out.append(Outgoing(pack_message(MessageType.INITIAL_DEVICE_INFO, info.pack(), info.size)))
            return out
        if msg_type != MessageType.INITIAL_DEVICE_INFO_ACK:
            raise DeviceProtocolError(f"synthhid message type {msg_type} while waiting for INITIAL_DEVICE_INFO_ACK")
        DeviceInfoAck.unpack(body)
        self._state = _VspState.ACTIVE
        return []
