"""SYNTHVID: the synthetic video protocol between the framebuffer VSC and the video VSP: every message's codec
and the version handshake (the steady state is ``host.py`` and ``guest.py``).

Mirrors Linux drivers/video/fbdev/hyperv_fb.c (``struct synthvid_msg``, ``synthvid_send``,
``synthvid_negotiate_ver``, ``synthvid_connect_vsp``) and OpenVMM vm/devices/uidevices/src/video/mod.rs
(``process_channel``, ``offer``) and video/protocol.rs (message numbers and every message struct). The
channel is in pipe message mode: pipe header ``{1, n}``, then ``{type u32, size u32}``, then the payload.
Linux puts ``8 + payload`` in the synthvid ``size``; OpenVMM's VSP puts only the payload. Linux never reads
that field, so the decoder here does not either.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from ... import guids
from ...errors import DeviceProtocolError, LocalProtocolError
from ...packets import PacketType
from ...pipe import pipe_unwrap, pipe_wrap
from ...ring import VMBUS_DEFAULT_MAX_PKT_SIZE
from ...versions import Version as VmbusVersion
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, VscVersionHandshake, name_text

__all__ = [
    "ACCEPTED_WITH_VERSION_EXCHANGE",
    "CURSOR_COMPLETE",
    "CURSOR_MAX_PAYLOAD",
    "CURSOR_MAX_XY",
    "DEFAULT_SUPPORTED",
    "EDID",
    "LINUX_VERSIONS",
    "MAX_DIRT_RECTS",
    "MAX_RESOLUTIONS",
    "MAX_VMBUS_PACKET_SIZE",
    "SPEC",
    "SYNTHVID_HEADER_SIZE",
    "VERSION_MAJOR",
    "VRAM_SIZE",
    "BiosInfoRequest",
    "BiosInfoResponse",
    "CapabilityRequest",
    "CapabilityResponse",
    "Dirt",
    "FeatureChange",
    "Message",
    "MessageType",
    "PointerPosition",
    "PointerShape",
    "Rect",
    "ResolutionRequest",
    "ResolutionResponse",
    "SituationUpdate",
    "SituationUpdateAck",
    "Version",
    "VersionRequest",
    "VersionResponse",
    "VramLocation",
    "VramLocationAck",
    "VscHandshake",
    "VspHandshake",
    "decode",
    "describe",
    "encode",
    "linux_versions",
    "make_edid",
    "make_version",
    "pack_message",
    "traced",
    "unpack_message",
    "version_major",
    "version_minor",
    "version_text",
]


class MessageType(enum.IntEnum):
    """``enum synthvid_msg_type`` (Linux hyperv_fb.c; OpenVMM ``MESSAGE_*``)."""

    ERROR = 0
    VERSION_REQUEST = 1
    VERSION_RESPONSE = 2
    VRAM_LOCATION = 3
    VRAM_LOCATION_ACK = 4
    SITUATION_UPDATE = 5
    SITUATION_UPDATE_ACK = 6
    POINTER_POSITION = 7
    POINTER_SHAPE = 8
    FEATURE_CHANGE = 9
    DIRT = 10
    BIOS_INFO_REQUEST = 11
    BIOS_INFO_RESPONSE = 12
    RESOLUTION_REQUEST = 13
    RESOLUTION_RESPONSE = 14
    CAPABILITY_REQUEST = 15
    CAPABILITY_RESPONSE = 16


class Version(enum.IntEnum):
    """``SYNTHVID_VERSION(major, minor)`` = ``minor << 16 | major``."""

    WIN7 = 0x00000003  # 3.0, dropped by Linux
    WIN8 = 0x00020003  # 3.2
    BLUE = 0x00030003  # 3.3, BIOS info
    THRESHOLD_M1 = 0x00040003  # 3.4, resolution set by host
    WIN10 = 0x00050003  # 3.5


VERSION_MAJOR = 3
ACCEPTED_WITH_VERSION_EXCHANGE = 2  # OpenVMM's is_accepted
MAX_VMBUS_PACKET_SIZE = 0x4000  # hyperv_fb MAX_VMBUS_PKT_SIZE: its receive buffer, not the channel's max_pkt_size
SYNTHVID_HEADER_SIZE = 8

# hyperv_fb on a WIN10 (4.0) or WIN10_V5 (5.0) host: 3.5, then 3.2.
LINUX_VERSIONS: tuple[int, ...] = (Version.WIN10, Version.WIN8)


def linux_versions(vmbus_version: int) -> tuple[int, ...]:
    """The synthvid versions hyperv_fb ``synthvid_connect_vsp`` tries, by the negotiated VMBus version: 4.0 and
    5.0 try 3.5 then 3.2; 2.4 and 3.0 try 3.2 only; every other version (4.1, 5.1 to 6.0) tries 3.5 only."""
    if vmbus_version in (VmbusVersion.WIN10, VmbusVersion.WIN10_V5):
        return LINUX_VERSIONS
    if vmbus_version in (VmbusVersion.WIN8, VmbusVersion.WIN8_1):
        return (Version.WIN8,)
    return (Version.WIN10,)

DEFAULT_SUPPORTED: frozenset[int] = frozenset(Version)

_HEADER = struct.Struct("<II")
_U32 = struct.Struct("<I")
_VERSION_RESPONSE = struct.Struct("<IBB")


def make_version(major: int, minor: int) -> int:
    return (minor & 0xFFFF) << 16 | (major & 0xFFFF)


def version_major(version: int) -> int:
    return version & 0xFFFF


def version_minor(version: int) -> int:
    return (version >> 16) & 0xFFFF


def pack_message(msg_type: int, body: bytes, *, size_includes_header: bool = False) -> bytes:
    """Pipe header + synthvid header + body. ``size_includes_header`` gives Linux's ``vid_hdr.size``
    (8 + body); the default is OpenVMM's VSP (body only)."""
    size = len(body) + (SYNTHVID_HEADER_SIZE if size_includes_header else 0)
    return pipe_wrap(_HEADER.pack(msg_type, size) + body)


def unpack_message(packet: bytes) -> tuple[int, bytes]:
    """``(type, body)`` of a pipe DATA packet; the body is everything after the synthvid header."""
    data = pipe_unwrap(packet)
    if len(data) < SYNTHVID_HEADER_SIZE:
        raise DeviceProtocolError(f"synthvid message of {len(data)} bytes is shorter than its header")
    msg_type, _size = _HEADER.unpack_from(data)
    return msg_type, data[SYNTHVID_HEADER_SIZE:]


@dataclass(frozen=True, slots=True)
class VersionRequest:
    """``struct synthvid_version_req``."""

    version: int

    def pack(self) -> bytes:
        return _U32.pack(self.version)

    @classmethod
    def unpack(cls, body: bytes) -> VersionRequest:
        if len(body) < _U32.size:
            raise DeviceProtocolError(f"synthvid VERSION_REQUEST body of {len(body)} bytes, need 4")
        return cls(*_U32.unpack_from(body))


@dataclass(frozen=True, slots=True)
class VersionResponse:
    """``struct synthvid_version_resp`` (6 bytes, packed)."""

    version: int
    is_accepted: int
    max_video_outputs: int = 1

    def pack(self) -> bytes:
        return _VERSION_RESPONSE.pack(self.version, self.is_accepted, self.max_video_outputs)

    @classmethod
    def unpack(cls, body: bytes) -> VersionResponse:
        if len(body) < _VERSION_RESPONSE.size:
            raise DeviceProtocolError(f"synthvid VERSION_RESPONSE body of {len(body)} bytes, need 6")
        return cls(*_VERSION_RESPONSE.unpack_from(body))


# ---- every message after the handshake (video/protocol.rs; Linux ``struct synthvid_msg``) ---------------------

VRAM_SIZE = 8 << 20  # the offer's mmio_megabytes (OpenVMM FRAMEBUFFER_SIZE)
MAX_DIRT_RECTS = 255  # dirt_count is a u8 (OpenVMM MAX_DIRTY_REGIONS)
MAX_RESOLUTIONS = 64  # SYNTHVID_MAX_RESOLUTION_COUNT (OpenVMM MAXIMUM_RESOLUTIONS_COUNT)
CURSOR_MAX_XY = 96  # CURSOR_MAX_X, CURSOR_MAX_Y
CURSOR_MAX_PAYLOAD = MAX_VMBUS_PACKET_SIZE // 2  # a pointer-shape part carries at most 8 KiB of pixels
CURSOR_COMPLETE = 0xFF  # part_idx of the last (or only) part
EDID_SIZE = 128

_U8 = struct.Struct("<B")
_U64 = struct.Struct("<Q")
_VRAM_LOCATION = struct.Struct("<QBQ")
_SITUATION = struct.Struct("<QBBIBIII")  # user_ctx, video_output_count, {active, vram_offset, depth, w, h, pitch}
_POINTER_POSITION = struct.Struct("<BBii")
_POINTER_SHAPE = struct.Struct("<BBIIII")
_FEATURE_CHANGE = struct.Struct("<BBBB")
_DIRT = struct.Struct("<BB")
_RECT = struct.Struct("<iiii")
_RESOLUTION_RESPONSE = struct.Struct(f"<{EDID_SIZE}sBBB")
_SCREEN_INFO = struct.Struct("<HH")
_BIOS_INFO_RESPONSE = struct.Struct("<I12x")
_CAPABILITY_RESPONSE = struct.Struct("<I60x")
_RECTS = [struct.Struct(f"<{4 * n}i") for n in range(MAX_DIRT_RECTS + 1)]  # a DIRT's rectangles in one unpack


def _need(name: str, body: bytes, size: int) -> None:
    if len(body) < size:
        raise DeviceProtocolError(f"synthvid {name} body of {len(body)} bytes, need {size}")


class Rect(NamedTuple):
    """``struct rect`` (OpenVMM ``Rectangle``): x2 and y2 are exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


@dataclass(frozen=True, slots=True)
class VramLocation:
    """``struct synthvid_vram_location``: Linux sends the GPA as ``user_ctx`` too and checks the ACK's echo."""

    TYPE: ClassVar[int] = 3
    user_ctx: int
    is_vram_gpa_specified: int
    vram_gpa: int

    def pack(self) -> bytes:
        return _VRAM_LOCATION.pack(self.user_ctx, self.is_vram_gpa_specified, self.vram_gpa)

    @classmethod
    def unpack(cls, body: bytes) -> VramLocation:
        _need("VRAM_LOCATION", body, _VRAM_LOCATION.size)
        return cls(*_VRAM_LOCATION.unpack_from(body))


@dataclass(frozen=True, slots=True)
class VramLocationAck:
    """``struct synthvid_vram_location_ack``."""

    TYPE: ClassVar[int] = 4
    user_ctx: int

    def pack(self) -> bytes:
        return _U64.pack(self.user_ctx)

    @classmethod
    def unpack(cls, body: bytes) -> VramLocationAck:
        _need("VRAM_LOCATION_ACK", body, 8)
        return cls(*_U64.unpack_from(body))


@dataclass(frozen=True, slots=True)
class SituationUpdate:
    """``struct synthvid_situation_update`` with its one ``video_output_situation``."""

    TYPE: ClassVar[int] = 5
    user_ctx: int
    active: int
    width: int
    height: int
    pitch: int
    depth_bits: int = 32
    vram_offset: int = 0
    video_output_count: int = 1

    def pack(self) -> bytes:
        return _SITUATION.pack(self.user_ctx, self.video_output_count, self.active, self.vram_offset,
                               self.depth_bits, self.width, self.height, self.pitch)

    @classmethod
    def unpack(cls, body: bytes) -> SituationUpdate:
        _need("SITUATION_UPDATE", body, _SITUATION.size)
        ctx, count, active, offset, depth, w, h, pitch = _SITUATION.unpack_from(body)
        return cls(ctx, active, w, h, pitch, depth, offset, count)


@dataclass(frozen=True, slots=True)
class SituationUpdateAck:
    """``struct synthvid_situation_update_ack`` (OpenVMM sends it; Linux does not wait for it)."""

    TYPE: ClassVar[int] = 6
    user_ctx: int

    def pack(self) -> bytes:
        return _U64.pack(self.user_ctx)

    @classmethod
    def unpack(cls, body: bytes) -> SituationUpdateAck:
        _need("SITUATION_UPDATE_ACK", body, 8)
        return cls(*_U64.unpack_from(body))


@dataclass(frozen=True, slots=True)
class PointerPosition:
    """``struct synthvid_pointer_position``: the pointer image's upper-left pixel."""

    TYPE: ClassVar[int] = 7
    is_visible: int
    x: int
    y: int
    video_output: int = 0

    def pack(self) -> bytes:
        return _POINTER_POSITION.pack(self.is_visible, self.video_output, self.x, self.y)

    @classmethod
    def unpack(cls, body: bytes) -> PointerPosition:
        _need("POINTER_POSITION", body, _POINTER_POSITION.size)
        visible, output, x, y = _POINTER_POSITION.unpack_from(body)
        return cls(visible, x, y, output)


@dataclass(frozen=True, slots=True)
class PointerShape:
    """``struct synthvid_pointer_shape``, one part: ``part_idx`` counts from 0, the last part is 0xFF. ARGB
    pixels are w*h*4 bytes; monochrome (``is_argb`` 0) is an AND mask then an XOR mask, ((w+7)/8)*h each."""

    TYPE: ClassVar[int] = 8
    part_idx: int
    is_argb: int
    width: int
    height: int
    hot_x: int
    hot_y: int
    data: bytes

    def pack(self) -> bytes:
        return _POINTER_SHAPE.pack(self.part_idx, self.is_argb, self.width, self.height, self.hot_x,
                                   self.hot_y) + self.data

    @classmethod
    def unpack(cls, body: bytes) -> PointerShape:
        _need("POINTER_SHAPE", body, _POINTER_SHAPE.size)
        part, argb, w, h, hx, hy = _POINTER_SHAPE.unpack_from(body)
        return cls(part, argb, w, h, hx, hy, bytes(body[_POINTER_SHAPE.size:]))

    @property
    def shape_bytes(self) -> int:
        """The whole shape's pixel bytes, by its format."""
        if self.is_argb:
            return self.width * self.height * 4
        return (self.width + 7) // 8 * self.height * 2


@dataclass(frozen=True, slots=True)
class FeatureChange:
    """``struct synthvid_feature_change``; the V2 form adds an EDID."""

    TYPE: ClassVar[int] = 9
    is_dirt_needed: int
    is_ptr_pos_needed: int = 0
    is_ptr_shape_needed: int = 0
    is_situ_needed: int = 0
    edid: bytes | None = None

    def pack(self) -> bytes:
        head = _FEATURE_CHANGE.pack(self.is_dirt_needed, self.is_ptr_pos_needed, self.is_ptr_shape_needed,
                                    self.is_situ_needed)
        return head if self.edid is None else head + self.edid

    @classmethod
    def unpack(cls, body: bytes) -> FeatureChange:
        _need("FEATURE_CHANGE", body, _FEATURE_CHANGE.size)
        edid = bytes(body[4:4 + EDID_SIZE]) if len(body) >= 4 + EDID_SIZE else None
        dirt, pos, shape, situ = _FEATURE_CHANGE.unpack_from(body)
        return cls(dirt, pos, shape, situ, edid)


@dataclass(frozen=True, slots=True)
class Dirt:
    """``struct synthvid_dirt``: up to 255 rectangles of output 0 that changed."""

    TYPE: ClassVar[int] = 10
    rects: tuple[Rect, ...]
    video_output: int = 0

    def pack(self) -> bytes:
        n = len(self.rects)
        if n > MAX_DIRT_RECTS:
            raise LocalProtocolError(f"a DIRT carries at most {MAX_DIRT_RECTS} rectangles, not {n}")
        return _DIRT.pack(self.video_output, n) + _RECTS[n].pack(*(v for r in self.rects for v in r))

    @classmethod
    def unpack(cls, body: bytes) -> Dirt:
        _need("DIRT", body, _DIRT.size)
        output, n = _DIRT.unpack_from(body)
        if len(body) != _DIRT.size + n * _RECT.size:
            raise DeviceProtocolError(f"synthvid DIRT of {len(body)} bytes does not hold exactly its {n} "
                                      f"rectangles ({_DIRT.size + n * _RECT.size} bytes)")
        flat = _RECTS[n].unpack_from(body, _DIRT.size)
        return cls(tuple(Rect(*flat[i:i + 4]) for i in range(0, 4 * n, 4)), output)


@dataclass(frozen=True, slots=True)
class BiosInfoRequest:
    TYPE: ClassVar[int] = 11

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes) -> BiosInfoRequest:
        return cls()


@dataclass(frozen=True, slots=True)
class BiosInfoResponse:
    """OpenVMM ``BiosInfoResponseMessage``: stop_device_supported = 1."""

    TYPE: ClassVar[int] = 12
    stop_device_supported: int = 1

    def pack(self) -> bytes:
        return _BIOS_INFO_RESPONSE.pack(self.stop_device_supported)

    @classmethod
    def unpack(cls, body: bytes) -> BiosInfoResponse:
        _need("BIOS_INFO_RESPONSE", body, _BIOS_INFO_RESPONSE.size)
        return cls(*_BIOS_INFO_RESPONSE.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ResolutionRequest:
    """``struct synthvid_supported_resolution_req``."""

    TYPE: ClassVar[int] = 13
    maximum_resolution_count: int = MAX_RESOLUTIONS

    def pack(self) -> bytes:
        return _U8.pack(self.maximum_resolution_count)

    @classmethod
    def unpack(cls, body: bytes) -> ResolutionRequest:
        _need("RESOLUTION_REQUEST", body, 1)
        return cls(*_U8.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ResolutionResponse:
    """``struct synthvid_supported_resolution_resp``: EDID, then the modes as {width u16, height u16}."""

    TYPE: ClassVar[int] = 14
    edid: bytes
    resolutions: tuple[tuple[int, int], ...]
    default_index: int = 0
    is_standard: int = 0

    def pack(self) -> bytes:
        n = len(self.resolutions)
        if n > MAX_RESOLUTIONS or len(self.edid) != EDID_SIZE:
            raise LocalProtocolError(f"RESOLUTION_RESPONSE of {n} modes (at most {MAX_RESOLUTIONS}) with an "
                                     f"EDID of {len(self.edid)} bytes ({EDID_SIZE})")
        return _RESOLUTION_RESPONSE.pack(self.edid, n, self.default_index, self.is_standard) + b"".join(
            _SCREEN_INFO.pack(w, h) for w, h in self.resolutions)

    @classmethod
    def unpack(cls, body: bytes) -> ResolutionResponse:
        _need("RESOLUTION_RESPONSE", body, _RESOLUTION_RESPONSE.size)
        edid, n, default, standard = _RESOLUTION_RESPONSE.unpack_from(body)
        if n > MAX_RESOLUTIONS:
            raise DeviceProtocolError(f"synthvid RESOLUTION_RESPONSE lists {n} modes, at most {MAX_RESOLUTIONS}")
        _need("RESOLUTION_RESPONSE", body, _RESOLUTION_RESPONSE.size + n * _SCREEN_INFO.size)
        modes = tuple(_SCREEN_INFO.unpack_from(body, _RESOLUTION_RESPONSE.size + i * _SCREEN_INFO.size)
                      for i in range(n))
        return cls(edid, modes, default, standard)


@dataclass(frozen=True, slots=True)
class CapabilityRequest:
    TYPE: ClassVar[int] = 15

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes) -> CapabilityRequest:
        return cls()


@dataclass(frozen=True, slots=True)
class CapabilityResponse:
    """OpenVMM ``CapabilityResponseMessage``: lock_on_disconnect, then 15 reserved u32."""

    TYPE: ClassVar[int] = 16
    lock_on_disconnect: int = 0

    def pack(self) -> bytes:
        return _CAPABILITY_RESPONSE.pack(self.lock_on_disconnect)

    @classmethod
    def unpack(cls, body: bytes) -> CapabilityResponse:
        _need("CAPABILITY_RESPONSE", body, _CAPABILITY_RESPONSE.size)
        return cls(*_CAPABILITY_RESPONSE.unpack_from(body))


Message = (VersionRequest | VersionResponse | VramLocation | VramLocationAck | SituationUpdate | SituationUpdateAck
           | PointerPosition | PointerShape | FeatureChange | Dirt | BiosInfoRequest | BiosInfoResponse
           | ResolutionRequest | ResolutionResponse | CapabilityRequest | CapabilityResponse)

_DECODERS: dict[int, Callable[[bytes], Message]] = {
    MessageType.VERSION_REQUEST: VersionRequest.unpack, MessageType.VERSION_RESPONSE: VersionResponse.unpack,
    VramLocation.TYPE: VramLocation.unpack, VramLocationAck.TYPE: VramLocationAck.unpack,
    SituationUpdate.TYPE: SituationUpdate.unpack, SituationUpdateAck.TYPE: SituationUpdateAck.unpack,
    PointerPosition.TYPE: PointerPosition.unpack, PointerShape.TYPE: PointerShape.unpack,
    FeatureChange.TYPE: FeatureChange.unpack, Dirt.TYPE: Dirt.unpack,
    BiosInfoRequest.TYPE: BiosInfoRequest.unpack, BiosInfoResponse.TYPE: BiosInfoResponse.unpack,
    ResolutionRequest.TYPE: ResolutionRequest.unpack, ResolutionResponse.TYPE: ResolutionResponse.unpack,
    CapabilityRequest.TYPE: CapabilityRequest.unpack, CapabilityResponse.TYPE: CapabilityResponse.unpack,
}


def decode(payload: bytes) -> Message:
    """One pipe packet as its message; an unknown type or a short body is a DeviceProtocolError."""
    msg_type, body = unpack_message(payload)
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise DeviceProtocolError(f"synthvid message type {msg_type} is unknown")
    return decoder(body)


def encode(msg: Message, *, guest: bool = False) -> bytes:
    """``msg`` with its pipe and synthvid headers; ``guest`` puts Linux's ``8 + body`` in the size field."""
    return pack_message(_TYPES[type(msg)], msg.pack(), size_includes_header=guest)


_TYPES: dict[type, int] = {VersionRequest: MessageType.VERSION_REQUEST, VersionResponse: MessageType.VERSION_RESPONSE,
                           **{cls: t for t, cls in ((c.TYPE, c) for c in (
                               VramLocation, VramLocationAck, SituationUpdate, SituationUpdateAck, PointerPosition,
                               PointerShape, FeatureChange, Dirt, BiosInfoRequest, BiosInfoResponse,
                               ResolutionRequest, ResolutionResponse, CapabilityRequest, CapabilityResponse))}}


def make_edid(name: str = "HyperVMonitor", preferred: tuple[int, int] = (1024, 768)) -> bytes:
    """A 128-byte EDID 1.4 block for the synthetic monitor: maker "MSH", the preferred mode as its first
    detailed timing (VESA 1024x768@60 timings; other sizes keep those blanking intervals), the monitor name
    descriptor, and the checksum byte that makes the block sum to 0 (VESA E-EDID)."""
    w, h = preferred
    maker = ((ord("M") - 64) << 10) | ((ord("S") - 64) << 5) | (ord("H") - 64)
    block = bytearray(b"\x00\xff\xff\xff\xff\xff\xff\x00")
    block += maker.to_bytes(2, "big") + (1).to_bytes(2, "little") + bytes(4)  # product 1, no serial
    block += bytes([0xFF, 2011 - 1990, 1, 4, 0x80, 0, 0, 0x78, 0x0A])  # model year, 1.4, digital, gamma 2.2
    block += bytes([0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54])  # sRGB chromaticity
    block += bytes([0x21, 0x08, 0x00])  # established: 640x480@60, 800x600@60, 1024x768@60
    block += b"\x01\x01" * 8  # no standard timings
    hblank, vblank, clock = 320, 38, 6500  # 10 kHz units
    block += clock.to_bytes(2, "little") + bytes([
        w & 0xFF, hblank & 0xFF, (w >> 8) << 4 | hblank >> 8, h & 0xFF, vblank & 0xFF, (h >> 8) << 4 | vblank >> 8,
        24, 136, 3 << 4 | 6, 0, 0, 0, 0, 0, 0, 0x18])
    block += b"\x00\x00\x00\xfc\x00" + name.encode()[:13].ljust(13, b" ")
    block += (b"\x00\x00\x00\x10" + bytes(14)) * 2  # dummy descriptors
    block += b"\x00"  # no extension blocks
    block.append(-sum(block) & 0xFF)
    return bytes(block)


EDID = make_edid()


def version_text(version: int) -> str:
    """``SYNTHVID_VERSION(major, minor)`` as people write it: 0x50003 -> "3.5"."""
    return f"{version_major(version)}.{version_minor(version)}"


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a synthvid message."""
    msg_type, _ = unpack_message(payload)
    text = name_text("SYNTHVID_", MessageType, msg_type)
    msg = decode(payload)
    match msg:
        case VersionRequest(version=v):
            return f"{text} version={version_text(v)}"
        case VersionResponse():
            return (f"{text} version={version_text(msg.version)} is_accepted={msg.is_accepted}"
                    f" max_video_outputs={msg.max_video_outputs}")
        case VramLocation() | VramLocationAck() | SituationUpdateAck():
            fields = ", ".join(f"{k}={getattr(msg, k):#x}" for k in msg.__slots__)
            return f"{text} {fields}"
        case SituationUpdate():
            return (f"{text} active={msg.active} {msg.width}x{msg.height}x{msg.depth_bits} pitch={msg.pitch}"
                    f" vram_offset={msg.vram_offset}")
        case PointerPosition():
            return f"{text} visible={msg.is_visible} x={msg.x} y={msg.y}"
        case PointerShape():
            return (f"{text} part={msg.part_idx:#x} {'argb' if msg.is_argb else 'mono'} {msg.width}x{msg.height}"
                    f" hot=({msg.hot_x},{msg.hot_y}) {len(msg.data)} bytes")
        case FeatureChange():
            return (f"{text} dirt={msg.is_dirt_needed} ptr_pos={msg.is_ptr_pos_needed}"
                    f" ptr_shape={msg.is_ptr_shape_needed} situ={msg.is_situ_needed}")
        case Dirt(rects=rects):
            return f"{text} {len(rects)} rects" + (f" first={tuple(rects[0])}" if rects else "")
        case ResolutionRequest():
            return f"{text} max={msg.maximum_resolution_count}"
        case ResolutionResponse():
            modes = " ".join(f"{w}x{h}" for w, h in msg.resolutions)
            return f"{text} default={msg.default_index} modes=[{modes}]"
    return text


# Left out of --trace on both sides: they never stop (the type after the 8-byte pipe header).
_UNTRACED = frozenset(int(t).to_bytes(4, "little") for t in (MessageType.DIRT, MessageType.POINTER_POSITION))


def traced(payload: bytes) -> bool:
    """Whether ``--trace`` shows this message (everything but DIRT and POINTER_POSITION)."""
    return bytes(payload[8:12]) not in _UNTRACED


SPEC = DeviceSpec(
    name="video",
    class_id=guids.SYNTHVID,
    default_instance=uuid.UUID("5620e0c7-8062-4dce-aeb7-520c7ef76171"),  # OpenVMM video offer()
    pipe_mode=True,
    mmio_megabytes=8,  # OpenVMM FRAMEBUFFER_SIZE
    ring_bytes=256 * 1024,  # RING_BUFSIZE, given to vmbus_open as is (no VMBUS_RING_SIZE): 64 pages
    max_packet=VMBUS_DEFAULT_MAX_PKT_SIZE,  # hyperv_fb leaves the channel's max_pkt_size at the default
    protocol="SYNTHVID",
    version_text=version_text,
    title="video: ring, open and the SYNTHVID handshake",
    explain=(
        "The framebuffer driver asks for the SYNTHVID version its VMBus version calls for (3.5 at VMBus 5.3; "
        "3.5 then 3.2 at 4.0 and 5.0; 3.2 at 2.4 and 3.0); VERSION_RESPONSE accepts one and says how many "
        "screens the host has. This channel is in pipe mode: each message carries a small pipe header before "
        "the SYNTHVID one."),
)


class VscHandshake(VscVersionHandshake):
    """hyperv_fb ``synthvid_connect_vsp``: VERSION_REQUEST per candidate until ``is_accepted != 0``; the
    candidates depend on the VMBus version (``for_vmbus``, ``linux_versions``).

    Like Linux ``synthvid_send``, requests go without COMPLETION_REQUESTED, numbered from 1.
    """

    protocol = "synthvid"
    request_name = "VERSION_REQUEST"

    def __init__(self, versions: Sequence[int] = LINUX_VERSIONS) -> None:
        super().__init__(versions)
        self.max_video_outputs = 0

    @classmethod
    def for_vmbus(cls, vmbus_version: int) -> VscHandshake:
        """What hyperv_fb offers once the bus negotiated ``vmbus_version``."""
        return cls(linux_versions(vmbus_version))

    def _request(self) -> Outgoing:
        body = VersionRequest(self.candidate).pack()
        payload = pack_message(MessageType.VERSION_REQUEST, body, size_includes_header=True)
        return Outgoing(payload, PacketType.DATA_INBAND, self._trans_id(), False)

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if not self._receiving():
            return []
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthvid packet type {packet.type:#x} while waiting for VERSION_RESPONSE")
        msg_type, body = unpack_message(packet.payload)
        if msg_type != MessageType.VERSION_RESPONSE:
            raise DeviceProtocolError(f"synthvid message type {msg_type} while waiting for VERSION_RESPONSE")
        response = VersionResponse.unpack(body)
        if response.is_accepted:
            self.negotiated_version = self.candidate
            self.max_video_outputs = response.max_video_outputs
            self._done = True
            return []
        offered = ", ".join(version_text(v) for v in self.versions)
        return self._refused(f"host refused every synthvid version ({offered})")


class VspHandshake(Handshake):
    """OpenVMM's video VSP until Active: a supported major-3 version is echoed with ``is_accepted = 2`` and
    ``max_video_outputs = 1``; anything else gets ``is_accepted = 0`` and the VSP waits for a new request."""

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
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthvid VSP got packet type {packet.type:#x}")
        msg_type, body = unpack_message(packet.payload)
        if msg_type != MessageType.VERSION_REQUEST:
            if self._done:
                raise DeviceProtocolError("synthvid handshake is over: this packet belongs to the running device")
            raise DeviceProtocolError(f"synthvid message type {msg_type} before the version was accepted")
        if self._done:
            raise DeviceProtocolError("second synthvid VERSION_REQUEST after the version was accepted")
        version = VersionRequest.unpack(body).version
        accepted = version_major(version) == VERSION_MAJOR and version in self.supported
        response = VersionResponse(version, ACCEPTED_WITH_VERSION_EXCHANGE if accepted else 0, 1)
        if accepted:
            self.negotiated_version = version
            self._done = True
        return [Outgoing(pack_message(MessageType.VERSION_RESPONSE, response.pack()))]
