"""NVSP: the network VSP protocol between NetVSC (guest) and NetVSP (host), v1 to v6.1: every message.

Mirrors Linux drivers/net/hyperv/hyperv_net.h (``struct nvsp_message`` and its v1/v2/v4/v5 bodies,
``NVSP_MSG*_TYPE_*``, ``NVSP_STAT_*``, ``NVSP_PROTOCOL_VERSION_*``, ``struct ndis_config_capabilities``) and
netvsc.c (``negotiate_nvsp_ver``, ``netvsc_connect_vsp``, ``netvsc_send_table``), and OpenVMM
vm/devices/net/netvsp/src/protocol.rs and lib.rs (``initialize``: INIT_COMPLETE and its 28/40-byte packet
sizes; the main loop's SUBCHANNEL, OID_QUERY_EX, SWITCH_DATA_PATH, SEND_INDIRECTION_TABLE). The channel is
raw (no pipe header). RNDIS rides inside SEND_RNDIS_PKT (rndis.py); the state machines are host.py and
guest.py.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

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
    "pack_rndis_packet",
    "rndis_packet_complete",
    "unpack_message",
    "unpack_rndis_packet",
    "unpack_rndis_packet_complete",
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


class NvspError(DeviceProtocolError):
    """An NVSP message is malformed, too short, of an unknown type or out of order."""


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
        raise NvspError(f"NVSP message of {len(payload)} bytes is shorter than its header")
    (msg_type,) = _U32.unpack_from(payload)
    return msg_type, bytes(payload[NVSP_HEADER_SIZE:])


def _fields(layout: struct.Struct, body: bytes, what: str) -> tuple[int, ...]:
    if len(body) < layout.size:
        raise NvspError(f"NVSP {what} body of {len(body)} bytes, need {layout.size}")
    return layout.unpack_from(body)


@dataclass(frozen=True, slots=True)
class Init:
    """``struct nvsp_message_init`` (INIT, guest to host)."""

    TYPE: ClassVar[int] = MessageType.INIT
    min_protocol_ver: int
    max_protocol_ver: int

    def pack(self) -> bytes:
        return _INIT.pack(self.min_protocol_ver, self.max_protocol_ver)

    @classmethod
    def unpack(cls, body: bytes) -> Init:
        return cls(*_fields(_INIT, body, "INIT"))


@dataclass(frozen=True, slots=True)
class InitComplete:
    """``struct nvsp_message_init_complete`` (INIT_COMPLETE, the host's completion of INIT)."""

    TYPE: ClassVar[int] = MessageType.INIT_COMPLETE
    negotiated_protocol_ver: int
    max_mdl_chain_len: int
    status: int

    def pack(self) -> bytes:
        return _INIT_COMPLETE.pack(self.negotiated_protocol_ver, self.max_mdl_chain_len, self.status)

    @classmethod
    def unpack(cls, body: bytes) -> InitComplete:
        return cls(*_fields(_INIT_COMPLETE, body, "INIT_COMPLETE"))


# ---- the data-path messages (v1 ... v6.1) ------------------------------------------------------------------

RECEIVE_BUFFER_ID = 0xCAFE  # NETVSC_RECEIVE_BUFFER_ID: Linux's id, and the host's xfer_pageset_id
SEND_BUFFER_ID = 0  # NETVSC_SEND_BUFFER_ID
SEND_SECTION_SIZE = 6144  # NETVSC_SEND_SECTION_SIZE; OpenVMM reports the same
NO_SECTION = 0xFFFFFFFF  # NETVSC_INVALID_INDEX: SEND_RNDIS_PKT whose data is not in the send buffer
CHANNEL_DATA = 0  # SEND_RNDIS_PKT channel_type: RMC_DATA ...
CHANNEL_CONTROL = 1  # ... RMC_CONTROL
SUBCHANNEL_ALLOCATE = 1  # NVSP_SUBCHANNEL_ALLOCATE
INDIRECTION_TABLE_ENTRIES = 16  # VRSS_SEND_TAB_SIZE / VMS_SWITCH_RSS_MAX_SEND_INDIRECTION_TABLE_ENTRIES
DATAPATH_SYNTHETIC = 0  # NVSP_DATAPATH_SYNTHETIC
DATAPATH_VF = 1  # NVSP_DATAPATH_VF
RNDIS_STATUS_NOT_SUPPORTED = 0xC00000BB  # what OpenVMM answers OID_QUERY_EX with

# NDIS_CONFIG capability bits (``struct ndis_config_capabilities`` / OpenVMM ``NdisConfigCapabilities``).
CAP_VMQ = 1 << 0
CAP_CHIMNEY = 1 << 1
CAP_SRIOV = 1 << 2
CAP_IEEE8021Q = 1 << 3
CAP_CORRELATION_ID = 1 << 4
CAP_TEAMING = 1 << 5
CAP_VSUBNETID = 1 << 6
CAP_RSC = 1 << 7
_CAPABILITY_NAMES = ((CAP_VMQ, "vmq"), (CAP_CHIMNEY, "chimney"), (CAP_SRIOV, "sriov"),
                     (CAP_IEEE8021Q, "ieee8021q"), (CAP_CORRELATION_ID, "correlation_id"),
                     (CAP_TEAMING, "teaming"), (CAP_VSUBNETID, "vsubnetid"), (CAP_RSC, "rsc"))

NDIS_VERSION_6_1 = (6, 1)  # NDIS_VERSION_6_1: what Linux announces up to NVSP v4 ...
NDIS_VERSION_6_30 = (6, 30)  # ... and from v5 (NDIS_VERSION_6_30)


def linux_ndis_version(nvsp_version: int) -> tuple[int, int]:
    """The NDIS version Linux ``netvsc_connect_vsp`` announces for a negotiated NVSP version."""
    return NDIS_VERSION_6_1 if nvsp_version <= Version.V4 else NDIS_VERSION_6_30


def linux_capabilities(nvsp_version: int, isolated: bool = False) -> int:
    """The NDIS_CONFIG capabilities Linux sends: 802.1q; SR-IOV (not isolated) and teaming from v5; RSC at 6.1."""
    caps = CAP_IEEE8021Q
    if nvsp_version >= Version.V5:
        caps |= CAP_TEAMING | (0 if isolated else CAP_SRIOV)
    if nvsp_version >= Version.V61:
        caps |= CAP_RSC
    return caps


class _Fixed:
    """A message whose body is one fixed struct: the dataclass fields in ``_LAYOUT`` order."""

    __slots__ = ()
    TYPE: ClassVar[int]
    _LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        names = _FIELD_NAMES.get(type(self)) or _field_names(type(self))
        return self._LAYOUT.pack(*[getattr(self, n) for n in names])

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        return cls(*_fields(cls._LAYOUT, body, MessageType(cls.TYPE).name))

    def text(self) -> str:
        return " ".join(f"{f.name}={_field_text(f.name, getattr(self, f.name))}"
                        for f in dataclasses.fields(self))  # type: ignore[arg-type]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # a message class's field names, looked up once


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _field_text(name: str, value: int) -> str:
    if name == "status":
        return name_text("NVSP_STAT_", Status, value)
    if name in ("gpadl_handle", "id", "send_buf_section_index") or value > 0xFFFF:
        return f"{value:#x}"
    return str(value)


@dataclass(frozen=True, slots=True)
class SendNdisVersion(_Fixed):
    """``struct nvsp_1_message_send_ndis_version`` (no completion requested)."""

    TYPE = MessageType.SEND_NDIS_VER
    _LAYOUT = struct.Struct("<II")
    ndis_major_ver: int
    ndis_minor_ver: int


@dataclass(frozen=True, slots=True)
class SendNdisConfig(_Fixed):
    """``struct nvsp_2_send_ndis_config``: mtu (frame size: MTU + 14), reserved, capabilities u64."""

    TYPE = MessageType.SEND_NDIS_CONFIG
    _LAYOUT = struct.Struct("<IIQ")
    mtu: int
    reserved: int
    capabilities: int

    def text(self) -> str:
        names = [n for bit, n in _CAPABILITY_NAMES if self.capabilities & bit] or ["none"]
        return f"mtu={self.mtu} capabilities={'|'.join(names)}"


@dataclass(frozen=True, slots=True)
class SendReceiveBuffer(_Fixed):
    """``struct nvsp_1_message_send_receive_buffer`` (packed: gpadl_handle u32, id u16)."""

    TYPE = MessageType.SEND_RECV_BUF
    _LAYOUT = struct.Struct("<IH")
    gpadl_handle: int
    id: int


@dataclass(frozen=True, slots=True)
class ReceiveBufferSection:
    """``struct nvsp_1_receive_buffer_section``."""

    offset: int
    sub_alloc_size: int
    num_sub_allocs: int
    end_offset: int


_SECTION = struct.Struct("<IIII")
_RECV_COMPLETE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class SendReceiveBufferComplete:
    """``struct nvsp_1_message_send_receive_buffer_complete``: status, num_sections, sections[]."""

    TYPE: ClassVar[int] = MessageType.SEND_RECV_BUF_COMPLETE
    status: int
    sections: tuple[ReceiveBufferSection, ...]

    def pack(self) -> bytes:
        return _RECV_COMPLETE.pack(self.status, len(self.sections)) + b"".join(
            _SECTION.pack(s.offset, s.sub_alloc_size, s.num_sub_allocs, s.end_offset) for s in self.sections)

    @classmethod
    def unpack(cls, body: bytes) -> SendReceiveBufferComplete:
        status, count = _fields(_RECV_COMPLETE, body, "SEND_RECV_BUF_COMPLETE")
        if status != Status.SUCCESS:
            return cls(status, ())  # Linux reads the sections only on success
        if _RECV_COMPLETE.size + count * _SECTION.size > len(body):
            raise NvspError(f"NVSP SEND_RECV_BUF_COMPLETE claims {count} sections in a {len(body)}-byte body")
        return cls(status, tuple(ReceiveBufferSection(*_SECTION.unpack_from(body, _RECV_COMPLETE.size + i * 16))
                                 for i in range(count)))

    def text(self) -> str:
        parts = [f"status={_field_text('status', self.status)} num_sections={len(self.sections)}"]
        parts += [f"section(offset={s.offset} sub_alloc_size={s.sub_alloc_size} num_sub_allocs={s.num_sub_allocs}"
                  f" end_offset={s.end_offset})" for s in self.sections]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class RevokeReceiveBuffer(_Fixed):
    """``struct nvsp_1_message_revoke_receive_buffer``."""

    TYPE = MessageType.REVOKE_RECV_BUF
    _LAYOUT = struct.Struct("<H")
    id: int


@dataclass(frozen=True, slots=True)
class SendSendBuffer(_Fixed):
    """``struct nvsp_1_message_send_send_buffer`` (packed: gpadl_handle u32, id u16)."""

    TYPE = MessageType.SEND_SEND_BUF
    _LAYOUT = struct.Struct("<IH")
    gpadl_handle: int
    id: int


@dataclass(frozen=True, slots=True)
class SendSendBufferComplete(_Fixed):
    """``struct nvsp_1_message_send_send_buffer_complete``: status, section_size."""

    TYPE = MessageType.SEND_SEND_BUF_COMPLETE
    _LAYOUT = struct.Struct("<II")
    status: int
    section_size: int


@dataclass(frozen=True, slots=True)
class RevokeSendBuffer(_Fixed):
    """``struct nvsp_1_message_revoke_send_buffer``."""

    TYPE = MessageType.REVOKE_SEND_BUF
    _LAYOUT = struct.Struct("<H")
    id: int


@dataclass(frozen=True, slots=True)
class SendRndisPacket(_Fixed):
    """``struct nvsp_1_message_send_rndis_packet``: channel_type (0 data, 1 control), section index
    (NO_SECTION: the RNDIS message is in the packet's GPA ranges or transfer pages) and size."""

    TYPE = MessageType.SEND_RNDIS_PKT
    _LAYOUT = struct.Struct("<III")
    channel_type: int
    send_buf_section_index: int
    send_buf_section_size: int

    def text(self) -> str:
        kind = "control" if self.channel_type == CHANNEL_CONTROL else "data"
        if self.send_buf_section_index == NO_SECTION:
            return f"channel_type={kind} no send-buffer section"
        return (f"channel_type={kind} send_buf_section_index={self.send_buf_section_index}"
                f" send_buf_section_size={self.send_buf_section_size}")


@dataclass(frozen=True, slots=True)
class SendRndisPacketComplete(_Fixed):
    """``struct nvsp_1_message_send_rndis_packet_complete``."""

    TYPE = MessageType.SEND_RNDIS_PKT_COMPLETE
    _LAYOUT = struct.Struct("<I")
    status: int


@dataclass(frozen=True, slots=True)
class SendVfAssociation(_Fixed):
    """``struct nvsp_4_send_vf_association`` (host to guest, v4): allocated, serial."""

    TYPE = MessageType.SEND_VF_ASSOCIATION
    _LAYOUT = struct.Struct("<II")
    allocated: int
    serial: int


@dataclass(frozen=True, slots=True)
class SwitchDataPath(_Fixed):
    """``struct nvsp_4_sw_datapath`` (v4): active_datapath (0 synthetic, 1 VF)."""

    TYPE = MessageType.SWITCH_DATA_PATH
    _LAYOUT = struct.Struct("<I")
    active_datapath: int


@dataclass(frozen=True, slots=True)
class OidQueryEx(_Fixed):
    """``NvspMessage5TypeOidQueryEx`` (v5): an NDIS object header (type u8, revision u8, size u16) and the OID."""

    TYPE = MessageType.OID_QUERY_EX
    _LAYOUT = struct.Struct("<BBHI")
    header_type: int
    header_revision: int
    header_size: int
    oid: int


@dataclass(frozen=True, slots=True)
class OidQueryExComplete(_Fixed):
    """``NvspMessage5TypeOidQueryExComplete``: status (an RNDIS status), bytes."""

    TYPE = MessageType.OID_QUERY_EX_COMP
    _LAYOUT = struct.Struct("<II")
    status: int
    bytes: int

    def text(self) -> str:
        return f"status={self.status:#x} bytes={self.bytes}"


@dataclass(frozen=True, slots=True)
class SubchannelRequest(_Fixed):
    """``struct nvsp_5_subchannel_request``: op (1 = ALLOCATE), num_subchannels."""

    TYPE = MessageType.SUBCHANNEL
    _LAYOUT = struct.Struct("<II")
    op: int
    num_subchannels: int


@dataclass(frozen=True, slots=True)
class SubchannelComplete(_Fixed):
    """``struct nvsp_5_subchannel_complete``: status, num_subchannels granted (same message type)."""

    TYPE = MessageType.SUBCHANNEL
    _LAYOUT = struct.Struct("<II")
    status: int
    num_subchannels: int


_TABLE_HEADER = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class SendIndirectionTable:
    """``struct nvsp_5_send_indirect_table`` (host to guest, v5): count, offset from the start of the NVSP
    message, then ``u32 table[count]``; OpenVMM sends 16 entries at offset 12, entry i = i % channels."""

    TYPE: ClassVar[int] = MessageType.SEND_INDIRECTION_TABLE
    table: tuple[int, ...]

    def pack(self) -> bytes:
        offset = NVSP_HEADER_SIZE + _TABLE_HEADER.size
        return _TABLE_HEADER.pack(len(self.table), offset) + struct.pack(f"<{len(self.table)}I", *self.table)

    @classmethod
    def unpack(cls, body: bytes, version: int = Version.V61) -> SendIndirectionTable:
        """Linux ``netvsc_send_table``: only 16 entries; up to v6 the table is taken from the message's end."""
        count, offset = _fields(_TABLE_HEADER, body, "SEND_INDIRECTION_TABLE")
        if count != INDIRECTION_TABLE_ENTRIES:
            raise NvspError(f"NVSP SEND_INDIRECTION_TABLE with {count} entries, need {INDIRECTION_TABLE_ENTRIES}")
        start = len(body) - 4 * count if version <= Version.V6 else offset - NVSP_HEADER_SIZE
        if start < _TABLE_HEADER.size or start + 4 * count > len(body):
            raise NvspError(f"NVSP SEND_INDIRECTION_TABLE at offset {offset} overruns its {len(body)}-byte body")
        return cls(struct.unpack_from(f"<{count}I", body, start))

    def text(self) -> str:
        return f"count={len(self.table)} table={list(self.table)}"


NvspMessage = (Init | InitComplete | SendNdisVersion | SendNdisConfig | SendReceiveBuffer
               | SendReceiveBufferComplete | RevokeReceiveBuffer | SendSendBuffer | SendSendBufferComplete
               | RevokeSendBuffer | SendRndisPacket | SendRndisPacketComplete | SendVfAssociation
               | SwitchDataPath | OidQueryEx | OidQueryExComplete | SubchannelRequest | SubchannelComplete
               | SendIndirectionTable)

# Requests (what a packet that is not a completion carries) and completions, by type.
_REQUESTS: dict[int, type[_Fixed] | type[SendIndirectionTable] | type[Init]] = {
    MessageType.INIT: Init, MessageType.SEND_NDIS_VER: SendNdisVersion, MessageType.SEND_NDIS_CONFIG: SendNdisConfig,
    MessageType.SEND_RECV_BUF: SendReceiveBuffer, MessageType.REVOKE_RECV_BUF: RevokeReceiveBuffer,
    MessageType.SEND_SEND_BUF: SendSendBuffer, MessageType.REVOKE_SEND_BUF: RevokeSendBuffer,
    MessageType.SEND_RNDIS_PKT: SendRndisPacket, MessageType.SEND_VF_ASSOCIATION: SendVfAssociation,
    MessageType.SWITCH_DATA_PATH: SwitchDataPath, MessageType.OID_QUERY_EX: OidQueryEx,
    MessageType.SUBCHANNEL: SubchannelRequest, MessageType.SEND_INDIRECTION_TABLE: SendIndirectionTable,
}
_COMPLETIONS: dict[int, type[_Fixed] | type[SendReceiveBufferComplete] | type[InitComplete]] = {
    MessageType.INIT_COMPLETE: InitComplete, MessageType.SEND_RECV_BUF_COMPLETE: SendReceiveBufferComplete,
    MessageType.SEND_SEND_BUF_COMPLETE: SendSendBufferComplete,
    MessageType.SEND_RNDIS_PKT_COMPLETE: SendRndisPacketComplete,
    MessageType.OID_QUERY_EX_COMP: OidQueryExComplete, MessageType.SUBCHANNEL: SubchannelComplete,
}


# ---- the data path without message objects: SEND_RNDIS_PKT and its completion, one struct call each -------

_RNDIS_PKT = struct.Struct("<IIII")  # msg_type, channel_type, send_buf_section_index, send_buf_section_size
_RNDIS_PKT_COMPLETE = struct.Struct("<II")  # msg_type, status
_ZEROS = bytes(NVSP_MESSAGE_SIZE)


def pack_rndis_packet(channel_type: int, index: int, size: int, message_size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """``encode(SendRndisPacket(channel_type, index, size), message_size)`` in one call."""
    return _RNDIS_PKT.pack(MessageType.SEND_RNDIS_PKT, channel_type, index, size) + _ZEROS[:message_size - 16]


def unpack_rndis_packet(payload: bytes | memoryview) -> tuple[int, int, int] | None:
    """``(channel_type, section index, section size)`` of a whole SEND_RNDIS_PKT; None for any other message
    (or a short one: ``decode`` then says what is wrong with it)."""
    if len(payload) >= _RNDIS_PKT.size:
        msg_type, channel_type, index, size = _RNDIS_PKT.unpack_from(payload)
        if msg_type == MessageType.SEND_RNDIS_PKT:
            return channel_type, index, size
    return None


@functools.lru_cache(maxsize=64)
def rndis_packet_complete(status: int, message_size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """``encode(SendRndisPacketComplete(status), message_size)``, made once per status and size."""
    return encode(SendRndisPacketComplete(status), message_size)


def unpack_rndis_packet_complete(payload: bytes | memoryview) -> int | None:
    """The status of a SEND_RNDIS_PKT_COMPLETE; None for any other (or a short) completion."""
    if len(payload) >= _RNDIS_PKT_COMPLETE.size:
        msg_type, status = _RNDIS_PKT_COMPLETE.unpack_from(payload)
        if msg_type == MessageType.SEND_RNDIS_PKT_COMPLETE:
            return int(status)
    return None


def encode(message: NvspMessage, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """A whole NVSP message; a body longer than ``size`` (the indirection table) is sent at its own length."""
    body = message.pack()
    return pack_message(message.TYPE, body, max(size, NVSP_HEADER_SIZE + len(body)))


def decode(payload: bytes, completion: bool = False) -> NvspMessage:
    """Parse an NVSP message: ``completion`` says it came in a VM_PKT_COMP (SUBCHANNEL means either)."""
    msg_type, body = unpack_message(payload)
    table: dict[int, Any] = _COMPLETIONS if completion else _REQUESTS
    cls = table.get(msg_type)
    if cls is None:
        kind = "completion" if completion else "request"
        raise NvspError(f"NVSP {kind} of unknown or unsupported type {_type_text(msg_type)}")
    message: NvspMessage = cls.unpack(body)
    return message


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
    """One ``--trace`` line for any NVSP message (a completion is read next to the request it answers)."""
    completion = packet_type == PacketType.COMP
    msg_type, body = unpack_message(payload)
    text = _type_text(msg_type)
    if msg_type == MessageType.INIT:
        init = Init.unpack(body)
        return (f"{text} min_protocol_ver={version_text(init.min_protocol_ver)}"
                f" max_protocol_ver={version_text(init.max_protocol_ver)}")
    if msg_type == MessageType.INIT_COMPLETE:
        done = InitComplete.unpack(body)
        text += f" status={name_text('NVSP_STAT_', Status, done.status)} max_mdl_chain_len={done.max_mdl_chain_len}"
        if request is not None:
            asked_type, asked = unpack_message(request)
            if asked_type == MessageType.INIT:
                text += f" for version {version_text(Init.unpack(asked).max_protocol_ver)}"
        return text
    if msg_type == MessageType.SEND_NDIS_VER:
        ver = SendNdisVersion.unpack(body)
        return f"{text} ndis_version={ver.ndis_major_ver}.{ver.ndis_minor_ver}"
    if msg_type not in (_COMPLETIONS if completion else _REQUESTS):
        return text
    message = decode(payload, completion)
    if isinstance(message, (Init, InitComplete)):  # handled above
        return text
    detail = message.text()
    return f"{text} {detail}" if detail else text


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
    title="network: ring, open, NVSP and RNDIS",
    explain=(
        "Same GPADL and open as storage. NetVSC sends NVSP_MSG_TYPE_INIT with one version at a time (min = max), "
        "newest first, until INIT_COMPLETE says NVSP_STAT_SUCCESS. Then it shares a 16 MiB receive buffer and a "
        "1 MiB send buffer with two more GPADLs (SEND_RECV_BUF, SEND_SEND_BUF) and speaks RNDIS inside "
        "SEND_RNDIS_PKT: INITIALIZE, the queries for its MAC and link, the packet filter. Frames then travel as "
        "RNDIS packets: to the host from send-buffer sections, to the guest in transfer-page packets naming "
        "receive-buffer ranges, through the parent's virtual switch to the other VMs."),
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
