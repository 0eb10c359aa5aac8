"""NVSP: the network VSP protocol between NetVSC (guest) and NetVSP (host), up to its version handshake.

Mirrors Linux drivers/net/hyperv/hyperv_net.h (``struct nvsp_message``, ``NVSP_MSG*_TYPE_*``,
``NVSP_STAT_*``, ``NVSP_PROTOCOL_VERSION_*``) and netvsc.c (``negotiate_nvsp_ver``, ``netvsc_connect_vsp``),
and OpenVMM vm/devices/net/netvsp/src/protocol.rs and lib.rs (``initialize``: INIT_COMPLETE and its
28/40-byte packet sizes). The channel is raw (no pipe header). RNDIS, which rides inside SEND_RNDIS_PKT,
is not modelled here yet.
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
from ...ring import vmbus_ring_size
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, VscVersionHandshake, major_minor_text, name_text

__all__ = [
    "DEFAULT_SUPPORTED",
    "INVALID_PROTOCOL_VERSION",
    "LINUX_VERSIONS",
    "MAX_MDL_CHAIN_LEN",
    "NVSP_HEADER_SIZE",
    "NVSP_MESSAGE_SIZE",
    "PACKET_SIZE_V1",
    "PACKET_SIZE_V61",
    "SPEC",
    "Init",
    "InitComplete",
    "MessageType",
    "Status",
    "Version",
    "VscHandshake",
    "VspHandshake",
    "describe",
    "host_message_size",
    "pack_message",
    "unpack_message",
    "version_text",
]


class MessageType(enum.IntEnum):
    """``nvsp_message_header.msg_type`` (Linux hyperv_net.h anonymous enum)."""

    NONE = 0
    INIT = 1
    INIT_COMPLETE = 2
    # Version 1
    SEND_NDIS_VER = 100
    SEND_RECV_BUF = 101
    SEND_RECV_BUF_COMPLETE = 102
    REVOKE_RECV_BUF = 103
    SEND_SEND_BUF = 104
    SEND_SEND_BUF_COMPLETE = 105
    REVOKE_SEND_BUF = 106
    SEND_RNDIS_PKT = 107
    SEND_RNDIS_PKT_COMPLETE = 108
    # Version 2
    SEND_CHIMNEY_DELEGATED_BUF = 109
    SEND_CHIMNEY_DELEGATED_BUF_COMP = 110
    REVOKE_CHIMNEY_DELEGATED_BUF = 111
    RESUME_CHIMNEY_RX_INDICATION = 112
    TERMINATE_CHIMNEY = 113
    TERMINATE_CHIMNEY_COMP = 114
    INDICATE_CHIMNEY_EVENT = 115
    SEND_CHIMNEY_PKT = 116
    SEND_CHIMNEY_PKT_COMP = 117
    POST_CHIMNEY_RECV_REQ = 118
    POST_CHIMNEY_RECV_REQ_COMP = 119
    ALLOC_RXBUF = 120
    ALLOC_RXBUF_COMP = 121
    FREE_RXBUF = 122
    SEND_VMQ_RNDIS_PKT = 123
    SEND_VMQ_RNDIS_PKT_COMP = 124
    SEND_NDIS_CONFIG = 125
    ALLOC_CHIMNEY_HANDLE = 126
    ALLOC_CHIMNEY_HANDLE_COMP = 127
    # Version 4
    SEND_VF_ASSOCIATION = 128
    SWITCH_DATA_PATH = 129
    UPLINK_CONNECT_STATE_DEPRECATED = 130
    # Version 5
    OID_QUERY_EX = 131
    OID_QUERY_EX_COMP = 132
    SUBCHANNEL = 133
    SEND_INDIRECTION_TABLE = 134
    # Version 6
    PD_API = 135
    PD_POST_BATCH = 136


class Version(enum.IntEnum):
    """``NVSP_PROTOCOL_VERSION_*``: ``major << 16 | minor`` (v1 is plain 2)."""

    V1 = 0x00000002
    V2 = 0x00030002
    V4 = 0x00040000
    V5 = 0x00050000
    V6 = 0x00060000
    V61 = 0x00060001


class Status(enum.IntEnum):
    """``NVSP_STAT_*``."""

    NONE = 0
    SUCCESS = 1
    FAIL = 2
    PROTOCOL_TOO_NEW = 3
    PROTOCOL_TOO_OLD = 4
    INVALID_RNDIS_PKT = 5
    BUSY = 6
    PROTOCOL_UNSUPPORTED = 7


NVSP_HEADER_SIZE = 4
NVSP_MESSAGE_SIZE = 40  # sizeof(struct nvsp_message): what Linux always sends
PACKET_SIZE_V1 = 0x1C  # OpenVMM's host message size up to v6
PACKET_SIZE_V61 = 0x28  # ... and for v6.1
INVALID_PROTOCOL_VERSION = 0xFFFFFFFF  # NVSP_INVALID_PROTOCOL_VERSION
MAX_MDL_CHAIN_LEN = 34  # OpenVMM INIT_COMPLETE.max_mdl_chain_len

LINUX_VERSIONS: tuple[int, ...] = (Version.V61, Version.V6, Version.V5, Version.V4, Version.V2, Version.V1)
DEFAULT_SUPPORTED: frozenset[int] = frozenset(Version)

_U32 = struct.Struct("<I")
_INIT = struct.Struct("<II")
_INIT_COMPLETE = struct.Struct("<III")


def host_message_size(version: int) -> int:
    """Bytes OpenVMM's NetVSP sends per NVSP message for a negotiated version."""
    return PACKET_SIZE_V61 if version >= Version.V61 else PACKET_SIZE_V1


def pack_message(msg_type: int, body: bytes, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """``struct nvsp_message``: the u32 type, then ``body`` zero-padded to ``size`` bytes in all."""
    if NVSP_HEADER_SIZE + len(body) > size:
        raise LocalProtocolError(f"NVSP body of {len(body)} bytes does not fit a {size}-byte message")
    return _U32.pack(msg_type) + body + bytes(size - NVSP_HEADER_SIZE - len(body))


def unpack_message(payload: bytes) -> tuple[int, bytes]:
    """``(msg_type, union bytes)`` of an NVSP message."""
    if len(payload) < NVSP_HEADER_SIZE:
        raise DeviceProtocolError(f"NVSP message of {len(payload)} bytes is shorter than its header")
    (msg_type,) = _U32.unpack_from(payload)
    return msg_type, bytes(payload[NVSP_HEADER_SIZE:])


@dataclass(frozen=True, slots=True)
class Init:
    """``struct nvsp_message_init`` (INIT, guest to host)."""

    min_protocol_ver: int
    max_protocol_ver: int

    def pack(self) -> bytes:
        return _INIT.pack(self.min_protocol_ver, self.max_protocol_ver)

    @classmethod
    def unpack(cls, body: bytes) -> Init:
        if len(body) < _INIT.size:
            raise DeviceProtocolError(f"NVSP INIT body of {len(body)} bytes, need {_INIT.size}")
        return cls(*_INIT.unpack_from(body))


@dataclass(frozen=True, slots=True)
class InitComplete:
    """``struct nvsp_message_init_complete`` (INIT_COMPLETE, the host's completion of INIT)."""

    negotiated_protocol_ver: int
    max_mdl_chain_len: int
    status: int

    def pack(self) -> bytes:
        return _INIT_COMPLETE.pack(self.negotiated_protocol_ver, self.max_mdl_chain_len, self.status)

    @classmethod
    def unpack(cls, body: bytes) -> InitComplete:
        if len(body) < _INIT_COMPLETE.size:
            raise DeviceProtocolError(f"NVSP INIT_COMPLETE body of {len(body)} bytes, need {_INIT_COMPLETE.size}")
        return cls(*_INIT_COMPLETE.unpack_from(body))


def version_text(version: int) -> str:
    """An NVSP protocol version as people write it: 0x60001 -> "6.1"; versions 1 and 2 have odd codes (2, 0x30002)."""
    return _OLD_VERSIONS.get(version) or major_minor_text(version)


_OLD_VERSIONS: dict[int, str] = {Version.V1: "1", Version.V2: "2"}


# Linux names the message types by the NVSP version that introduced them: NVSP_MSG1_TYPE_SEND_NDIS_VER, ...
_GENERATIONS = ((135, "NVSP_MSG6_TYPE_"), (131, "NVSP_MSG5_TYPE_"), (128, "NVSP_MSG4_TYPE_"),
                (109, "NVSP_MSG2_TYPE_"), (100, "NVSP_MSG1_TYPE_"), (0, "NVSP_MSG_TYPE_"))


def _type_text(msg_type: int) -> str:
    prefix = next(p for first, p in _GENERATIONS if msg_type >= first)
    return name_text(prefix, MessageType, msg_type)


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for an NVSP message (INIT_COMPLETE is read next to the INIT it answers)."""
    msg_type, body = unpack_message(payload)
    text = _type_text(msg_type)
    if msg_type == MessageType.INIT:
        init = Init.unpack(body)
        return (f"{text} min_protocol_ver={version_text(init.min_protocol_ver)}"
                f" max_protocol_ver={version_text(init.max_protocol_ver)}")
    if msg_type != MessageType.INIT_COMPLETE:
        return text
    done = InitComplete.unpack(body)
    text += f" status={name_text('NVSP_STAT_', Status, done.status)} max_mdl_chain_len={done.max_mdl_chain_len}"
    if request is not None:
        asked_type, asked = unpack_message(request)
        if asked_type == MessageType.INIT:
            text += f" for version {version_text(Init.unpack(asked).max_protocol_ver)}"
    return text


# Our fixed instance id (OpenVMM takes a vNIC's instance id from its configuration).
_INSTANCE = uuid.UUID("4322ba74-7a19-4fb4-a8d7-81d2f0892bed")

SPEC = DeviceSpec(
    name="network",
    class_id=guids.NETWORK,
    default_instance=_INSTANCE,
    pipe_mode=False,
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(128 * 4096),  # netvsc_ring_bytes = VMBUS_RING_SIZE(ring_size = 128 pages): 128 pages
    # NETVSC_MAX_PKT_SIZE: transfer-page header with 562 ranges (16 + 8 + 562 * 8)
    # + sizeof(nvsp_message) (40) + the 16-entry u32 send table (64) = 4624.
    max_packet=16 + 8 + 562 * 8 + NVSP_MESSAGE_SIZE + 16 * 4,
    protocol="NVSP",
    version_text=version_text,
    title="network: ring, open and the NVSP handshake",
    explain=(
        "Same GPADL and open as storage. Then NetVSC sends NVSP_MSG_TYPE_INIT with one version at a time (min "
        "= max), newest first, until INIT_COMPLETE says NVSP_STAT_SUCCESS. In a full guest the receive and "
        "send buffers and RNDIS come next; this emulator's network stops at the handshake."),
)


class VscHandshake(VscVersionHandshake):
    """NetVSC ``negotiate_nvsp_ver`` loop: INIT with ``min = max = candidate``, newest first, until an
    INIT_COMPLETE (a completion packet) reports SUCCESS."""

    protocol = "NVSP"
    request_name = "INIT"
    after_done = "the data path"

    def __init__(self, versions: Sequence[int] = LINUX_VERSIONS) -> None:
        super().__init__(versions)
        self.max_mdl_chain_len = 0
        self._pending: int | None = None

    def _request(self) -> Outgoing:
        version = self.candidate
        self._pending = trans_id = self._trans_id()
        payload = pack_message(MessageType.INIT, Init(version, version).pack())
        return Outgoing(payload, PacketType.DATA_INBAND, trans_id, True)

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if not self._receiving():
            return []
        if packet.type != PacketType.COMP:
            raise DeviceProtocolError(f"NVSP packet type {packet.type:#x} while waiting for INIT_COMPLETE")
        if packet.trans_id != self._pending:
            raise DeviceProtocolError(f"NVSP completion for unknown transaction id {packet.trans_id}")
        msg_type, body = unpack_message(packet.payload)
        if msg_type != MessageType.INIT_COMPLETE:
            raise DeviceProtocolError(f"NVSP message type {msg_type} while waiting for INIT_COMPLETE")
        complete = InitComplete.unpack(body)
        self._pending = None
        if complete.status == Status.SUCCESS:
            self.negotiated_version = self.candidate
            self.max_mdl_chain_len = complete.max_mdl_chain_len
            self._done = True
            return []
        offered = ", ".join(version_text(v) for v in self.versions)
        return self._refused(f"host refused every NVSP protocol version ({offered}); last status {complete.status}")


class VspHandshake(Handshake):
    """NetVSP's answer to INIT (OpenVMM ``initialize``): INIT_COMPLETE as a completion echoing the trans_id,
    ``{0xFFFFFFFF (2 for v1), 34, SUCCESS or NONE}``; a refused version waits for the next INIT.

    Like OpenVMM it checks ``min_protocol_ver`` (Linux sends min = max).
    """

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
            raise DeviceProtocolError("NVSP handshake is over: this packet belongs to the data path")
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"NetVSP got packet type {packet.type:#x} before INIT")
        msg_type, body = unpack_message(packet.payload)
        if msg_type != MessageType.INIT:
            raise DeviceProtocolError(f"NVSP message type {msg_type} before INIT completed")
        if not packet.completion_requested:
            raise DeviceProtocolError("NVSP INIT without COMPLETION_REQUESTED")
        version = Init.unpack(body).min_protocol_ver
        accepted = version in self.supported
        complete = InitComplete(
            negotiated_protocol_ver=Version.V1 if accepted and version == Version.V1 else INVALID_PROTOCOL_VERSION,
            max_mdl_chain_len=MAX_MDL_CHAIN_LEN,
            status=Status.SUCCESS if accepted else Status.NONE)
        size = host_message_size(version) if accepted else PACKET_SIZE_V1
        if accepted:
            self.negotiated_version = version
            self._done = True
        payload = pack_message(MessageType.INIT_COMPLETE, complete.pack(), size)
        return [Outgoing(payload, PacketType.COMP, packet.trans_id)]
