"""SYNTHVID: the synthetic video protocol between the framebuffer VSC and the video VSP, up to its handshake.

Mirrors Linux drivers/video/fbdev/hyperv_fb.c (``struct synthvid_msg``, ``synthvid_send``,
``synthvid_negotiate_ver``, ``synthvid_connect_vsp``) and OpenVMM vm/devices/uidevices/src/video/mod.rs
(``process_channel``, ``offer``) and video/protocol.rs (message numbers, ``VersionResponseMessage``). The
channel is in pipe message mode: pipe header ``{1, n}``, then ``{type u32, size u32}``, then the payload.
Linux puts ``8 + payload`` in the synthvid ``size``; OpenVMM's VSP puts only the payload. Linux never reads
that field, so the decoder here does not either.
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
from ...pipe import pipe_unwrap, pipe_wrap
from ...ring import VMBUS_DEFAULT_MAX_PKT_SIZE
from ...versions import Version as VmbusVersion
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, VscVersionHandshake, name_text

__all__ = [
    "ACCEPTED_WITH_VERSION_EXCHANGE",
    "DEFAULT_SUPPORTED",
    "LINUX_VERSIONS",
    "MAX_VMBUS_PACKET_SIZE",
    "SPEC",
    "SYNTHVID_HEADER_SIZE",
    "VERSION_MAJOR",
    "MessageType",
    "Version",
    "VersionRequest",
    "VersionResponse",
    "VscHandshake",
    "VspHandshake",
    "describe",
    "linux_versions",
    "make_version",
    "pack_message",
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


def version_text(version: int) -> str:
    """``SYNTHVID_VERSION(major, minor)`` as people write it: 0x50003 -> "3.5"."""
    return f"{version_major(version)}.{version_minor(version)}"


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a synthvid message."""
    msg_type, body = unpack_message(payload)
    text = name_text("SYNTHVID_", MessageType, msg_type)
    if msg_type == MessageType.VERSION_REQUEST:
        return f"{text} version={version_text(VersionRequest.unpack(body).version)}"
    if msg_type == MessageType.VERSION_RESPONSE:
        r = VersionResponse.unpack(body)
        return (f"{text} version={version_text(r.version)} is_accepted={r.is_accepted}"
                f" max_video_outputs={r.max_video_outputs}")
    return text


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
