"""RNDIS as NetVSC and NetVSP speak it inside NVSP SEND_RNDIS_PKT: messages, OIDs and per-packet info.

Mirrors Linux include/linux/rndis.h (message types, status codes, OIDs, packet filter bits),
drivers/net/hyperv/hyperv_net.h (``struct rndis_message`` and its bodies, ``struct rndis_per_packet_info``,
``ndis_per_pkt_info_type``, ``ndis_tcp_ip_checksum_info``, ``ndis_tcp_lso_info``, ``ndis_pkt_8021q_info``,
``rndis_pktinfo_id``, ``ndis_offload``, ``ndis_recv_scale_cap``/``_param``, ``ndis_offload_params``) and
rndis_filter.c (offsets measured from the body, i.e. 8 bytes past the message start); OpenVMM
vm/devices/net/netvsp/src/rndisprot.rs (the same structs) and lib.rs ``handle_oid_query`` /
``handle_oid_set`` (the answers a host gives: ``nic_query``, ``OidError`` statuses).

Every parser here validates lengths and offsets against the bytes it was given and raises ``RndisError``
(a ``DeviceProtocolError``); nothing else escapes it.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ...errors import DeviceProtocolError
from ..base import name_text

__all__ = [
    "HEADER_SIZE",
    "PACKET_BODY_SIZE",
    "PPI_HEADER_SIZE",
    "Halt",
    "IndicateStatus",
    "Initialize",
    "InitializeComplete",
    "Keepalive",
    "KeepaliveComplete",
    "LsoV2",
    "MessageType",
    "NicProperties",
    "Oid",
    "OidError",
    "PacketFilter",
    "PacketInfo",
    "PacketMessage",
    "Ppi",
    "PpiType",
    "Query",
    "QueryComplete",
    "Reset",
    "ResetComplete",
    "RndisError",
    "RscId",
    "Set",
    "SetComplete",
    "Status",
    "TxChecksum",
    "Vlan",
    "decode",
    "describe",
    "encode",
    "iter_packet_messages",
    "ndis_offload",
    "query_oid",
    "rss_capabilities",
]


class RndisError(DeviceProtocolError):
    """An RNDIS message, its lengths/offsets or its per-packet-info chain is malformed."""


class MessageType(enum.IntEnum):
    """``RNDIS_MSG_*`` (include/linux/rndis.h); completions have bit 31 set."""

    PACKET = 0x1
    INIT = 0x2
    HALT = 0x3
    QUERY = 0x4
    SET = 0x5
    RESET = 0x6
    INDICATE = 0x7
    KEEPALIVE = 0x8
    SET_EX = 0x9
    INIT_C = 0x80000002
    QUERY_C = 0x80000004
    SET_C = 0x80000005
    RESET_C = 0x80000006
    KEEPALIVE_C = 0x80000008
    SET_EX_C = 0x80000009


class Status(enum.IntEnum):
    """``RNDIS_STATUS_*`` used by NetVSC/NetVSP."""

    SUCCESS = 0x00000000
    MEDIA_CONNECT = 0x4001000B
    MEDIA_DISCONNECT = 0x4001000C
    LINK_SPEED_CHANGE = 0x40010013
    NETWORK_CHANGE = 0x40010018
    TASK_OFFLOAD_CURRENT_CONFIG = 0x40020006
    BUFFER_OVERFLOW = 0x80000005
    FAILURE = 0xC0000001
    INVALID_DATA = 0xC0010015
    NOT_SUPPORTED = 0xC00000BB
    BAD_VERSION = 0xC0010004


class Oid(enum.IntEnum):
    """``RNDIS_OID_*`` / ``OID_*`` a Linux guest or OpenVMM uses."""

    GEN_SUPPORTED_LIST = 0x00010101
    GEN_HARDWARE_STATUS = 0x00010102
    GEN_MEDIA_SUPPORTED = 0x00010103
    GEN_MEDIA_IN_USE = 0x00010104
    GEN_MAXIMUM_LOOKAHEAD = 0x00010105
    GEN_MAXIMUM_FRAME_SIZE = 0x00010106
    GEN_LINK_SPEED = 0x00010107
    GEN_TRANSMIT_BUFFER_SPACE = 0x00010108
    GEN_RECEIVE_BUFFER_SPACE = 0x00010109
    GEN_TRANSMIT_BLOCK_SIZE = 0x0001010A
    GEN_RECEIVE_BLOCK_SIZE = 0x0001010B
    GEN_VENDOR_ID = 0x0001010C
    GEN_VENDOR_DESCRIPTION = 0x0001010D
    GEN_CURRENT_PACKET_FILTER = 0x0001010E
    GEN_CURRENT_LOOKAHEAD = 0x0001010F
    GEN_DRIVER_VERSION = 0x00010110
    GEN_MAXIMUM_TOTAL_SIZE = 0x00010111
    GEN_PROTOCOL_OPTIONS = 0x00010112
    GEN_MAC_OPTIONS = 0x00010113
    GEN_MEDIA_CONNECT_STATUS = 0x00010114
    GEN_MAXIMUM_SEND_PACKETS = 0x00010115
    GEN_VENDOR_DRIVER_VERSION = 0x00010116
    GEN_NETWORK_LAYER_ADDRESSES = 0x00010118
    GEN_RECEIVE_SCALE_CAPABILITIES = 0x00010203
    GEN_RECEIVE_SCALE_PARAMETERS = 0x00010204
    GEN_MAX_LINK_SPEED = 0x00010206
    GEN_LINK_STATE = 0x00010207
    GEN_LINK_PARAMETERS = 0x00010208
    GEN_RNDIS_CONFIG_PARAMETER = 0x0001021B
    GEN_FRIENDLY_NAME = 0x00020216
    GEN_BYTES_RCV = 0x00020219
    GEN_BYTES_XMIT = 0x0002021A
    P802_3_PERMANENT_ADDRESS = 0x01010101
    P802_3_CURRENT_ADDRESS = 0x01010102
    P802_3_MULTICAST_LIST = 0x01010103
    P802_3_MAXIMUM_LIST_SIZE = 0x01010104
    P802_3_RCV_ERROR_ALIGNMENT = 0x01020101
    P802_3_XMIT_ONE_COLLISION = 0x01020102
    P802_3_XMIT_MORE_COLLISIONS = 0x01020103
    OFFLOAD_ENCAPSULATION = 0x0101010A
    TCP_OFFLOAD_PARAMETERS = 0xFC01020C
    TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D
    TCP_OFFLOAD_CURRENT_CONFIG = 0xFC01020B


def oid_text(oid: int) -> str:
    """``OID_802_3_CURRENT_ADDRESS`` style, as Linux names it."""
    try:
        return "OID_" + Oid(oid).name.replace("P802_3", "802_3")
    except ValueError:
        return f"OID {oid:#010x}"


class PacketFilter(enum.IntFlag):
    """``RNDIS_PACKET_TYPE_*`` (OID_GEN_CURRENT_PACKET_FILTER)."""

    DIRECTED = 0x1
    MULTICAST = 0x2
    ALL_MULTICAST = 0x4
    BROADCAST = 0x8
    PROMISCUOUS = 0x20


# NETVSC_PACKET_FILTER: what Linux sets on ifup
LINUX_PACKET_FILTER = PacketFilter.DIRECTED | PacketFilter.ALL_MULTICAST | PacketFilter.BROADCAST


class PpiType(enum.IntEnum):
    """``enum ndis_per_pkt_info_type``; RSC's ``RNDIS_PKTINFO_ID`` is the internal type 1 (bit 31 set)."""

    TCPIP_CHKSUM = 0
    IPSEC = 1
    TCP_LARGESEND = 2
    CLASSIFICATION_HANDLE = 3
    SG_LIST = 5
    IEEE_8021Q = 6
    ORIGINAL = 7
    NBL_HASH_VALUE = 8
    ORIGINAL_NET_BUFLIST = 9
    CACHED_NET_BUFLIST = 10
    SHORT_PKT_PAD = 11


PPI_INTERNAL = 0x80000000  # ``rndis_per_packet_info.internal``
RNDIS_PKTINFO_ID = 1  # internal type of ``struct rndis_pktinfo_id``
RSC_SUBALLOC, RSC_FIRST_FRAG, RSC_LAST_FRAG = 0x1, 0x2, 0x4  # RNDIS_PKTINFO_{SUBALLOC,1ST_FRAG,LAST_FRAG}

MAJOR_VERSION, MINOR_VERSION = 1, 0  # RNDIS_MAJOR_VERSION / RNDIS_MINOR_VERSION
LINUX_MAX_TRANSFER = 0x4000  # rndis_filter_init_device: max_xfer_size
HOST_MAX_TRANSFER = 0xEFFFFFFF  # OpenVMM INITIALIZE_CMPLT values ...
HOST_MAX_PACKETS_PER_MESSAGE = 8
HOST_PACKET_ALIGNMENT_FACTOR = 3  # 1 << 3 = 8-byte alignment
DF_CONNECTIONLESS = 0x1  # RNDIS_DF_CONNECTIONLESS
MEDIUM_802_3 = 0  # RNDIS_MEDIUM_802_3
MEDIA_STATE_CONNECTED, MEDIA_STATE_DISCONNECTED = 0, 1

HEADER_SIZE = 8  # msg_type, msg_len
PACKET_BODY_SIZE = 36  # struct rndis_packet
PPI_HEADER_SIZE = 12  # struct rndis_per_packet_info
ETH_HEADER_LEN = 14

_HEADER = struct.Struct("<II")
_PACKET = struct.Struct("<9I")
_PPI = struct.Struct("<III")
_U32 = struct.Struct("<I")


def _take(layout: struct.Struct, body: bytes | memoryview, what: str, offset: int = 0) -> tuple[int, ...]:
    if offset + layout.size > len(body):
        raise RndisError(f"RNDIS {what} of {len(body) - offset} bytes, need {layout.size}")
    return layout.unpack_from(body, offset)


def _info(body: bytes | memoryview, length: int, offset: int, what: str, fixed: int) -> bytes:
    """An information buffer ``length`` bytes at ``offset`` from the body start; must lie inside the body
    and not overlap the fixed fields (an empty buffer may have any offset, as Linux sends 0 then)."""
    if length == 0:
        return b""
    if offset < fixed or offset + length > len(body):
        raise RndisError(f"RNDIS {what} buffer of {length} bytes at offset {offset} lies outside its "
                         f"{len(body)}-byte body")
    return bytes(body[offset:offset + length])


# ---- control messages ------------------------------------------------------------------------------------


class _Simple:
    """A message body of fixed u32 fields in dataclass order."""

    __slots__ = ()
    TYPE: ClassVar[int]
    _LAYOUT: ClassVar[struct.Struct]
    _NAMES: ClassVar[tuple[str, ...]]

    def pack_body(self) -> bytes:
        return self._LAYOUT.pack(*(getattr(self, n) for n in self._NAMES))

    @classmethod
    def unpack_body(cls, body: bytes) -> _Simple:
        return cls(*_take(cls._LAYOUT, body, MessageType(cls.TYPE).name))

    def text(self) -> str:
        return " ".join(f"{n}={_value_text(n, getattr(self, n))}" for n in self._NAMES)


def _value_text(name: str, value: int) -> str:
    if name == "status":
        return name_text("RNDIS_STATUS_", Status, value)
    return f"{value:#x}" if value > 0xFFFF else str(value)


@dataclass(frozen=True, slots=True)
class Initialize(_Simple):
    """``struct rndis_initialize_request``."""

    TYPE = MessageType.INIT
    _LAYOUT = struct.Struct("<4I")
    _NAMES = ("req_id", "major_ver", "minor_ver", "max_xfer_size")
    req_id: int
    major_ver: int = MAJOR_VERSION
    minor_ver: int = MINOR_VERSION
    max_xfer_size: int = LINUX_MAX_TRANSFER


@dataclass(frozen=True, slots=True)
class InitializeComplete(_Simple):
    """``struct rndis_initialize_complete`` (OpenVMM's values as defaults)."""

    TYPE = MessageType.INIT_C
    _LAYOUT = struct.Struct("<11I")
    _NAMES = ("req_id", "status", "major_ver", "minor_ver", "dev_flags", "medium", "max_pkt_per_msg",
              "max_xfer_size", "pkt_alignment_factor", "af_list_offset", "af_list_size")
    req_id: int
    status: int = Status.SUCCESS
    major_ver: int = MAJOR_VERSION
    minor_ver: int = MINOR_VERSION
    dev_flags: int = DF_CONNECTIONLESS
    medium: int = MEDIUM_802_3
    max_pkt_per_msg: int = HOST_MAX_PACKETS_PER_MESSAGE
    max_xfer_size: int = HOST_MAX_TRANSFER
    pkt_alignment_factor: int = HOST_PACKET_ALIGNMENT_FACTOR
    af_list_offset: int = 0
    af_list_size: int = 0


@dataclass(frozen=True, slots=True)
class Halt(_Simple):
    """``struct rndis_halt_request`` (no answer)."""

    TYPE = MessageType.HALT
    _LAYOUT = struct.Struct("<I")
    _NAMES = ("req_id",)
    req_id: int


@dataclass(frozen=True, slots=True)
class Keepalive(_Simple):
    """``struct rndis_keepalive_request``."""

    TYPE = MessageType.KEEPALIVE
    _LAYOUT = struct.Struct("<I")
    _NAMES = ("req_id",)
    req_id: int


@dataclass(frozen=True, slots=True)
class KeepaliveComplete(_Simple):
    """``struct rndis_keepalive_complete``."""

    TYPE = MessageType.KEEPALIVE_C
    _LAYOUT = struct.Struct("<II")
    _NAMES = ("req_id", "status")
    req_id: int
    status: int = Status.SUCCESS


@dataclass(frozen=True, slots=True)
class Reset(_Simple):
    """``struct rndis_reset_request``."""

    TYPE = MessageType.RESET
    _LAYOUT = struct.Struct("<I")
    _NAMES = ("reserved",)
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class ResetComplete(_Simple):
    """``struct rndis_reset_complete``."""

    TYPE = MessageType.RESET_C
    _LAYOUT = struct.Struct("<II")
    _NAMES = ("status", "addressing_reset")
    status: int = Status.SUCCESS
    addressing_reset: int = 0


@dataclass(frozen=True, slots=True)
class SetComplete(_Simple):
    """``struct rndis_set_complete``."""

    TYPE = MessageType.SET_C
    _LAYOUT = struct.Struct("<II")
    _NAMES = ("req_id", "status")
    req_id: int
    status: int = Status.SUCCESS


_QUERY = struct.Struct("<5I")  # req_id, oid, info_buflen, info_buf_offset, dev_vc_handle


@dataclass(frozen=True, slots=True)
class Query:
    """``struct rndis_query_request``: the information buffer follows the 20 fixed bytes (Linux puts an
    NDIS_OFFLOAD header there for OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES)."""

    TYPE: ClassVar[int] = MessageType.QUERY
    req_id: int
    oid: int
    info: bytes = b""

    def pack_body(self) -> bytes:
        return _QUERY.pack(self.req_id, self.oid, len(self.info), _QUERY.size, 0) + self.info

    @classmethod
    def unpack_body(cls, body: bytes) -> Query:
        req_id, oid, length, offset, _vc = _take(_QUERY, body, "QUERY")
        return cls(req_id, oid, _info(body, length, offset, "QUERY", _QUERY.size))

    def text(self) -> str:
        return f"req_id={self.req_id} {oid_text(self.oid)} info_buflen={len(self.info)}"


@dataclass(frozen=True, slots=True)
class Set:
    """``struct rndis_set_request``: like QUERY, the value follows the 20 fixed bytes."""

    TYPE: ClassVar[int] = MessageType.SET
    req_id: int
    oid: int
    info: bytes = b""

    def pack_body(self) -> bytes:
        return _QUERY.pack(self.req_id, self.oid, len(self.info), _QUERY.size, 0) + self.info

    @classmethod
    def unpack_body(cls, body: bytes) -> Set:
        req_id, oid, length, offset, _vc = _take(_QUERY, body, "SET")
        return cls(req_id, oid, _info(body, length, offset, "SET", _QUERY.size))

    def text(self) -> str:
        return f"req_id={self.req_id} {oid_text(self.oid)} info_buflen={len(self.info)}"


_QUERY_C = struct.Struct("<4I")  # req_id, status, info_buflen, info_buf_offset


@dataclass(frozen=True, slots=True)
class QueryComplete:
    """``struct rndis_query_complete``: OpenVMM puts the answer right after the 16 fixed bytes."""

    TYPE: ClassVar[int] = MessageType.QUERY_C
    req_id: int
    status: int
    info: bytes = b""

    def pack_body(self) -> bytes:
        return _QUERY_C.pack(self.req_id, self.status, len(self.info), _QUERY_C.size) + self.info

    @classmethod
    def unpack_body(cls, body: bytes) -> QueryComplete:
        req_id, status, length, offset = _take(_QUERY_C, body, "QUERY_CMPLT")
        return cls(req_id, status, _info(body, length, offset, "QUERY_CMPLT", _QUERY_C.size))

    def text(self) -> str:
        return f"req_id={self.req_id} status={_value_text('status', self.status)} info_buflen={len(self.info)}"


_INDICATE = struct.Struct("<3I")  # status, status_buflen, status_buf_offset


@dataclass(frozen=True, slots=True)
class IndicateStatus:
    """``struct rndis_indicate_status`` (host to guest): media connect/disconnect, link speed change (u32
    in 100 bps units), network change."""

    TYPE: ClassVar[int] = MessageType.INDICATE
    status: int
    buffer: bytes = b""

    def pack_body(self) -> bytes:
        return _INDICATE.pack(self.status, len(self.buffer), _INDICATE.size if self.buffer else 0) + self.buffer

    @classmethod
    def unpack_body(cls, body: bytes) -> IndicateStatus:
        status, length, offset = _take(_INDICATE, body, "INDICATE_STATUS")
        return cls(status, _info(body, length, offset, "INDICATE_STATUS", _INDICATE.size))

    def text(self) -> str:
        text = f"status={_value_text('status', self.status)}"
        if self.status == Status.LINK_SPEED_CHANGE and len(self.buffer) >= 4:
            text += f" speed={_U32.unpack_from(self.buffer)[0] * 100} bps"
        return text


# ---- per-packet info and PACKET_MSG ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ppi:
    """One ``struct rndis_per_packet_info`` record: ``type`` with bit 31 for the internal types, then data."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        return _PPI.pack(PPI_HEADER_SIZE + len(self.data), self.type, PPI_HEADER_SIZE) + self.data


def pack_ppis(ppis: Sequence[Ppi]) -> bytes:
    return b"".join(p.pack() for p in ppis)


def unpack_ppis(chain: bytes) -> tuple[Ppi, ...]:
    """Walk a PPI chain (Linux ``rndis_get_ppi``, OpenVMM ``handle_rndis_packet_message``): every record's
    size must cover its header and stay inside the chain, its data offset inside the record."""
    out: list[Ppi] = []
    pos = 0
    while pos < len(chain):
        if pos + PPI_HEADER_SIZE > len(chain):
            raise RndisError(f"per-packet info at {pos} has {len(chain) - pos} bytes, less than its 12-byte header")
        size, ppi_type, data_offset = _PPI.unpack_from(chain, pos)
        if size < PPI_HEADER_SIZE or pos + size > len(chain):
            raise RndisError(f"per-packet info at {pos} of size {size} overruns its {len(chain)}-byte chain")
        if not PPI_HEADER_SIZE <= data_offset <= size:
            raise RndisError(f"per-packet info at {pos} has data offset {data_offset} outside its {size} bytes")
        out.append(Ppi(ppi_type, bytes(chain[pos + data_offset:pos + size])))
        pos += size
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TxChecksum:
    """``ndis_tcp_ip_checksum_info.transmit``: is_ipv4 0, is_ipv6 1, tcp 2, udp 3, ip_header 4, and the
    10-bit tcp_header_offset at bit 16."""

    is_ipv4: bool = False
    is_ipv6: bool = False
    tcp: bool = False
    udp: bool = False
    ip_header: bool = False
    tcp_header_offset: int = 0

    def value(self) -> int:
        return (self.is_ipv4 | self.is_ipv6 << 1 | self.tcp << 2 | self.udp << 3 | self.ip_header << 4
                | (self.tcp_header_offset & 0x3FF) << 16)

    @classmethod
    def from_value(cls, v: int) -> TxChecksum:
        return cls(bool(v & 1), bool(v & 2), bool(v & 4), bool(v & 8), bool(v & 16), (v >> 16) & 0x3FF)


# ``ndis_tcp_ip_checksum_info.receive`` bits.
RX_TCP_FAILED, RX_UDP_FAILED, RX_IP_FAILED = 0x1, 0x2, 0x4
RX_TCP_OK, RX_UDP_OK, RX_IP_OK, RX_LOOPBACK = 0x8, 0x10, 0x20, 0x40

LSO_V2_TYPE = 1  # NDIS_TCP_LARGE_SEND_OFFLOAD_V2_TYPE
LSO_IPV4, LSO_IPV6 = 0, 1  # NDIS_TCP_LARGE_SEND_OFFLOAD_IPV4 / _IPV6


@dataclass(frozen=True, slots=True)
class LsoV2:
    """``ndis_tcp_lso_info.lso_v2_transmit``: mss:20, tcp_header_offset:10, type:1, ip_version:1."""

    mss: int
    tcp_header_offset: int
    ipv6: bool = False

    def value(self) -> int:
        return (self.mss & 0xFFFFF) | (self.tcp_header_offset & 0x3FF) << 20 | LSO_V2_TYPE << 30 | self.ipv6 << 31

    @classmethod
    def from_value(cls, v: int) -> LsoV2:
        return cls(v & 0xFFFFF, (v >> 20) & 0x3FF, bool(v >> 31))


@dataclass(frozen=True, slots=True)
class Vlan:
    """``ndis_pkt_8021q_info``: pri:3, cfi:1, vlanid:12."""

    vlan_id: int
    priority: int = 0
    cfi: bool = False

    def value(self) -> int:
        return (self.priority & 7) | self.cfi << 3 | (self.vlan_id & 0xFFF) << 4

    @classmethod
    def from_value(cls, v: int) -> Vlan:
        return cls((v >> 4) & 0xFFF, v & 7, bool(v & 8))


_RSC_ID = struct.Struct("<BBH")


@dataclass(frozen=True, slots=True)
class RscId:
    """``struct rndis_pktinfo_id`` (internal PPI 1, v6.1 RSC): ver 1, flags (1ST/LAST_FRAG), pkt_id."""

    flags: int
    pkt_id: int = 0


@dataclass(frozen=True, slots=True)
class PacketInfo:
    """The per-packet info of one frame, decoded. ``checksum`` is the raw u32: TX bits guest to host
    (``TxChecksum.from_value``), RX_* bits host to guest."""

    checksum: int | None = None
    lso: LsoV2 | None = None
    vlan: Vlan | None = None
    hash_value: int | None = None
    rsc: RscId | None = None

    def ppis(self) -> list[Ppi]:
        out: list[Ppi] = []
        if self.checksum is not None:
            out.append(Ppi(PpiType.TCPIP_CHKSUM, _U32.pack(self.checksum)))
        if self.lso is not None:
            out.append(Ppi(PpiType.TCP_LARGESEND, _U32.pack(self.lso.value())))
        if self.vlan is not None:
            out.append(Ppi(PpiType.IEEE_8021Q, _U32.pack(self.vlan.value())))
        if self.hash_value is not None:
            out.append(Ppi(PpiType.NBL_HASH_VALUE, _U32.pack(self.hash_value)))
        if self.rsc is not None:
            out.append(Ppi(PPI_INTERNAL | RNDIS_PKTINFO_ID, _RSC_ID.pack(1, self.rsc.flags, self.rsc.pkt_id)))
        return out

    @classmethod
    def from_ppis(cls, ppis: Sequence[Ppi]) -> PacketInfo:
        """Known PPIs must carry at least their u32 (Linux ``rndis_get_ppi`` size check); others are ignored."""
        fields: dict[str, object] = {}
        for ppi in ppis:
            if ppi.type == PPI_INTERNAL | RNDIS_PKTINFO_ID:
                _ver, flags, pkt_id = _take(_RSC_ID, ppi.data, "RSC packet-id PPI")
                fields["rsc"] = RscId(flags, pkt_id)
                continue
            name = _U32_PPIS.get(ppi.type)
            if name is None:
                continue
            (value,) = _take(_U32, ppi.data, f"{name} PPI")
            fields[name] = {"lso": LsoV2.from_value, "vlan": Vlan.from_value}.get(name, int)(value)
        return cls(**fields)  # type: ignore[arg-type]


NO_INFO = PacketInfo()  # a frame without per-packet info


@functools.lru_cache(maxsize=256)
def _packet_info(chain: bytes) -> PacketInfo:
    """A PPI chain decoded; data frames repeat a handful of chains (checksum bits, RSC flags), so they are
    decoded once (a chain that does not decode raises and is not cached)."""
    return PacketInfo.from_ppis(unpack_ppis(chain))

_U32_PPIS: dict[int, str] = {PpiType.TCPIP_CHKSUM: "checksum", PpiType.TCP_LARGESEND: "lso", PpiType.IEEE_8021Q: "vlan",
             PpiType.NBL_HASH_VALUE: "hash_value"}


@dataclass(frozen=True, slots=True)
class PacketMessage:
    """``RNDIS_MSG_PACKET`` (``struct rndis_packet``): 9 u32 fields, the PPI chain at 36 (offsets from the
    body start), then the frame. ``pad`` zero bytes after the frame are counted in msg_len (Linux pads
    batched packets to the 8-byte alignment the host asked for)."""

    TYPE: ClassVar[int] = MessageType.PACKET
    data: bytes
    info: PacketInfo = PacketInfo()

    def pack_body(self, pad: int = 0) -> bytes:
        return pack_packet(self.data, pack_ppis(self.info.ppis()), pad)[HEADER_SIZE:]

    @classmethod
    def unpack_body(cls, body: bytes | memoryview) -> PacketMessage:
        """Strict, as OpenVMM's TX path: no OOB data, vc_handle 0, frame and PPIs inside the message."""
        return cls(*_packet_parts(body, _take(_PACKET, body, "PACKET_MSG")))

    def text(self) -> str:
        parts = [f"data_len={len(self.data)}"]
        info = self.info
        if info.checksum is not None:
            parts.append(f"checksum={info.checksum:#x}")
        if info.lso is not None:
            parts.append(f"lso_mss={info.lso.mss}")
        if info.vlan is not None:
            parts.append(f"vlan={info.vlan.vlan_id}")
        if info.hash_value is not None:
            parts.append(f"hash={info.hash_value:#x}")
        if info.rsc is not None:
            parts.append(f"rsc_flags={info.rsc.flags:#x}")
        return " ".join(parts)


RndisMessage = (PacketMessage | Initialize | InitializeComplete | Halt | Query | QueryComplete | Set
                | SetComplete | Reset | ResetComplete | IndicateStatus | Keepalive | KeepaliveComplete)

_BY_TYPE: dict[int, type[RndisMessage]] = {cls.TYPE: cls for cls in (
    PacketMessage, Initialize, InitializeComplete, Halt, Query, QueryComplete, Set, SetComplete, Reset,
    ResetComplete, IndicateStatus, Keepalive, KeepaliveComplete)}


_PACKET_MSG = struct.Struct("<II9I")  # the header and the PACKET_MSG body fields
_PACKET_TYPE = int(MessageType.PACKET)
PACKET_MSG_TYPE = _U32.pack(_PACKET_TYPE)  # the first 4 bytes of every PACKET_MSG


def pack_packet(data: bytes | memoryview, chain: bytes, pad: int = 0) -> bytes:
    """A whole PACKET_MSG from the frame (or an RSC piece of it) and its already packed PPI chain: the fast
    path for data, which packs the chain once for many frames or fragments."""
    if pad:
        return b"".join((packet_head(len(data) + pad, chain, pad), data, bytes(pad)))
    return packet_head(len(data), chain) + data


def packet_head(data_len: int, chain: bytes, pad: int = 0) -> bytes:
    """The header, PACKET_MSG fields and PPI chain of a PACKET_MSG whose frame (and ``pad``) is ``data_len``
    bytes: what goes before the frame."""
    data_offset = PACKET_BODY_SIZE + len(chain)
    return _PACKET_MSG.pack(_PACKET_TYPE, HEADER_SIZE + data_offset + data_len, data_offset, data_len - pad, 0, 0,
                            0, PACKET_BODY_SIZE if chain else 0, len(chain), 0, 0) + chain


def _packet_parts(body: bytes | memoryview, fields: tuple[int, ...]) -> tuple[bytes, PacketInfo]:
    """The frame and per-packet info of a PACKET_MSG body whose 9 fields are ``fields``, checked."""
    data_offset, data_len, oob_offset, oob_len, oob_count, ppi_offset, ppi_len, vc_handle, _reserved = fields
    if oob_len or oob_count or vc_handle:
        raise RndisError(f"RNDIS PACKET_MSG with OOB data ({oob_count} elements, {oob_len} bytes at "
                         f"{oob_offset}) or vc_handle {vc_handle}")
    if data_len == 0:
        raise RndisError("RNDIS PACKET_MSG with no frame (data_len 0)")
    if data_offset < PACKET_BODY_SIZE or data_offset + data_len > len(body):
        raise RndisError(f"RNDIS PACKET_MSG frame of {data_len} bytes at offset {data_offset} lies outside "
                         f"its {len(body)}-byte body")
    chain = _info(body, ppi_len, ppi_offset, "PACKET_MSG per-packet-info", PACKET_BODY_SIZE)
    return bytes(body[data_offset:data_offset + data_len]), _packet_info(chain) if chain else NO_INFO




def unpack_packet(data: bytes | memoryview) -> tuple[bytes, PacketInfo]:
    """The frame and per-packet info of the PACKET_MSG at the start of ``data`` in one pass: ``decode`` for the
    receive data path, with the same checks (bytes after msg_len ignored)."""
    frame, info = unpack_packet_view(data)
    return bytes(frame), info


def unpack_packet_view(data: bytes | memoryview) -> tuple[memoryview, PacketInfo]:
    """``unpack_packet`` without copying the frame: a view into ``data`` (for RSC fragments, joined once).
    Data frames repeat a handful of headers (every RSC piece of a size has the same one): a header seen before
    is looked up with its checks done, only its length against ``data`` is checked again."""
    view = memoryview(data)
    layout = _LAYOUTS.get(bytes(view[:_PACKET_HEAD]))
    if layout is None:
        layout = _packet_layout(view)
    msg_len, start, end, chain_start, chain_end = layout
    if msg_len > len(view):
        raise RndisError(f"RNDIS message length {msg_len} does not fit the {len(view)} bytes received")
    if chain_start == chain_end:
        return view[start:end], NO_INFO
    return view[start:end], _packet_info(bytes(view[chain_start:chain_end]))


_PACKET_HEAD = HEADER_SIZE + PACKET_BODY_SIZE
_LAYOUTS: dict[bytes, tuple[int, int, int, int, int]] = {}  # checked PACKET_MSG headers (at most 1024 kept)


def _packet_layout(view: memoryview) -> tuple[int, int, int, int, int]:
    """A PACKET_MSG header checked (all but msg_len against the bytes there): (msg_len, frame start, frame end,
    PPI chain start, chain end) from the message start."""
    if len(view) < _PACKET_HEAD:
        raise RndisError(f"RNDIS PACKET_MSG of {len(view)} bytes, need {_PACKET_HEAD}")
    (msg_type, msg_len, data_offset, data_len, _oob_offset, oob_len, oob_count, ppi_offset, ppi_len, vc_handle,
     _reserved) = fields = _PACKET_MSG.unpack_from(view)
    if msg_type != _PACKET_TYPE:
        raise RndisError(f"RNDIS message type {msg_type:#x} is not PACKET_MSG")
    if msg_len < _PACKET_HEAD or msg_len > len(view):
        raise RndisError(f"RNDIS message length {msg_len} does not fit the {len(view)} bytes received")
    body_len = msg_len - HEADER_SIZE
    if oob_len or oob_count or vc_handle or data_len == 0 or data_offset < PACKET_BODY_SIZE \
            or data_offset + data_len > body_len:
        _packet_parts(view[HEADER_SIZE:msg_len], fields[2:])
        raise AssertionError("unreachable: _packet_parts raises for these fields")  # pragma: no cover
    if ppi_len and (ppi_offset < PACKET_BODY_SIZE or ppi_offset + ppi_len > body_len):
        raise RndisError(f"RNDIS PACKET_MSG per-packet-info buffer of {ppi_len} bytes at offset {ppi_offset} lies "
                         f"outside its {body_len}-byte body")
    chain = HEADER_SIZE + ppi_offset if ppi_len else 0
    layout = (msg_len, HEADER_SIZE + data_offset, HEADER_SIZE + data_offset + data_len, chain, chain + ppi_len)
    if len(_LAYOUTS) >= 1024:
        _LAYOUTS.clear()
    _LAYOUTS[bytes(view[:_PACKET_HEAD])] = layout
    return layout


@functools.lru_cache(maxsize=256)
def packed_ppis(info: PacketInfo) -> bytes:
    """The PPI chain of ``info``, packed once per distinct info (data frames repeat a handful)."""
    return pack_ppis(info.ppis())


def info_chain(info: PacketInfo) -> bytes:
    """``packed_ppis``, with frames without per-packet info (``NO_INFO`` itself) not even looked up."""
    return b"" if info is NO_INFO else packed_ppis(info)


def encode(message: RndisMessage, pad: int = 0) -> bytes:
    """The whole message: ``{msg_type, msg_len}`` and the body (a PACKET_MSG may be padded)."""
    if isinstance(message, PacketMessage):
        return pack_packet(message.data, info_chain(message.info), pad)
    body = message.pack_body()
    return _HEADER.pack(message.TYPE, HEADER_SIZE + len(body)) + body


def _message_at(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """``(msg_type, msg_len)`` of the message at ``pos``, its length checked against the bytes there."""
    if pos + HEADER_SIZE > len(data):
        raise RndisError(f"RNDIS message of {len(data) - pos} bytes is shorter than its 8-byte header")
    msg_type, msg_len = _HEADER.unpack_from(data, pos)
    if msg_len < HEADER_SIZE or pos + msg_len > len(data):
        raise RndisError(f"RNDIS message length {msg_len} does not fit the {len(data) - pos} bytes received")
    return msg_type, msg_len


def decode(data: bytes | memoryview) -> RndisMessage:
    """One RNDIS message (bytes after its msg_len are ignored, as a section may be longer)."""
    msg_type, msg_len = _message_at(data, 0)
    cls = _BY_TYPE.get(msg_type)
    if cls is None:
        raise RndisError(f"RNDIS message type {msg_type:#x} is unknown or not implemented")
    if cls is PacketMessage:  # data: the frame is copied out once, not the whole body first
        return PacketMessage.unpack_body(memoryview(data)[HEADER_SIZE:msg_len])
    body = bytes(data[HEADER_SIZE:msg_len])
    message: RndisMessage = cls.unpack_body(body)  # type: ignore[assignment]
    return message


def message_type(data: bytes | memoryview) -> int:
    """The type of the (first) RNDIS message in ``data``, its length checked."""
    return _message_at(data, 0)[0]


def iter_packet_messages(data: bytes | memoryview) -> Iterator[PacketMessage]:
    """Every PACKET_MSG of a data transfer (Linux batches up to max_pkt_per_msg in one section; OpenVMM
    ``handle_rndis_packet_messages``); trailing zero bytes of a section are allowed."""
    for frame, info in packet_frames(data):
        yield PacketMessage(frame, info)


_ZERO_HEADER = bytes(HEADER_SIZE)


def packet_frames(data: bytes | memoryview) -> list[tuple[bytes, PacketInfo]]:
    """``iter_packet_messages`` as (frame, info) pairs, each frame copied out once: the transmit data path."""
    out: list[tuple[bytes, PacketInfo]] = []
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        if pos + HEADER_SIZE <= end and view[pos:pos + HEADER_SIZE] == _ZERO_HEADER:
            break  # the zero tail of a section
        msg_type, msg_len = _message_at(view, pos)
        if msg_type != _PACKET_TYPE:
            raise RndisError(f"RNDIS message type {msg_type:#x} on the data channel, need PACKET_MSG")
        body = view[pos + HEADER_SIZE:pos + msg_len]
        out.append(_packet_parts(body, _take(_PACKET, body, "PACKET_MSG")))
        pos += msg_len
    return out


def describe(data: bytes | memoryview) -> str:
    """A ``--trace`` text for an RNDIS message: ``RNDIS_MSG_QUERY req_id=2 OID_GEN_LINK_SPEED ...``."""
    message = decode(data)
    kind = name_text("RNDIS_MSG_", MessageType, message.TYPE)
    detail = message.text()
    return f"{kind} {detail}" if detail else kind


# ---- what the host answers (OpenVMM handle_oid_query) ----------------------------------------------------


class OidError(Exception):
    """A QUERY or SET the host answers with a non-success RNDIS status (not a protocol violation)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


NDIS_OBJECT_TYPE_DEFAULT = 0x80
NDIS_OBJECT_TYPE_RSS_CAPABILITIES = 0x88
NDIS_OBJECT_TYPE_RSS_PARAMETERS = 0x89
NDIS_OBJECT_TYPE_OFFLOAD = 0xA7
NDIS_OBJECT_TYPE_OFFLOAD_ENCAPSULATION = 0xA8
NDIS_OFFLOAD_SIZE_6_0 = 112  # NDIS_SIZEOF_NDIS_OFFLOAD_REVISION_1
NDIS_OFFLOAD_SIZE = 156  # ... _REVISION_3
NDIS_ENCAPSULATION_IEEE_802_3 = 2
LSO_MAX_OFFLOAD_SIZE = 0xF53C  # vmswitch's, as OpenVMM
LSO_MIN_SEGMENT_COUNT = 2
NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4 = 0x100
NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6 = 0x200
NDIS_HASH_FUNCTION_TOEPLITZ = 0x1
NDIS_HASH_FUNCTION_MASK = 0xFF
NDIS_RSS_PARAM_FLAG_DISABLE_RSS = 0x10
RSS_CAPABILITIES_SIZE = 18  # NDIS_SIZEOF_RECEIVE_SCALE_CAPABILITIES_REVISION_2
RSS_PARAMETERS_SIZE = 40  # struct ndis_recv_scale_param
RSS_KEY_SIZE = 40  # NETVSC_HASH_KEYLEN
DEFAULT_INDIRECTION_TABLE = 128  # ITAB_NUM; OpenVMM's answer when it has no table size
MAC_OPTIONS = 0x1 | 0x4 | 0x8 | 0x40 | 0x200  # COPY_LOOKAHEAD, TRANSFERS_NOT_PEND, NO_LOOPBACK, 802.1P, 802.1Q
SUPPORTED_COMMON = (
    Oid.GEN_SUPPORTED_LIST, Oid.GEN_HARDWARE_STATUS, Oid.GEN_MEDIA_SUPPORTED, Oid.GEN_MEDIA_IN_USE,
    Oid.GEN_MAXIMUM_LOOKAHEAD, Oid.GEN_CURRENT_LOOKAHEAD, Oid.GEN_MAXIMUM_FRAME_SIZE,
    Oid.GEN_MAXIMUM_TOTAL_SIZE, Oid.GEN_TRANSMIT_BLOCK_SIZE, Oid.GEN_RECEIVE_BLOCK_SIZE, Oid.GEN_LINK_SPEED,
    Oid.GEN_TRANSMIT_BUFFER_SPACE, Oid.GEN_RECEIVE_BUFFER_SPACE, Oid.GEN_VENDOR_ID, Oid.GEN_VENDOR_DESCRIPTION,
    Oid.GEN_VENDOR_DRIVER_VERSION, Oid.GEN_DRIVER_VERSION, Oid.GEN_CURRENT_PACKET_FILTER,
    Oid.GEN_PROTOCOL_OPTIONS, Oid.GEN_MAC_OPTIONS, Oid.GEN_MEDIA_CONNECT_STATUS, Oid.GEN_MAXIMUM_SEND_PACKETS,
    Oid.GEN_NETWORK_LAYER_ADDRESSES, Oid.GEN_FRIENDLY_NAME, Oid.P802_3_PERMANENT_ADDRESS,
    Oid.P802_3_CURRENT_ADDRESS, Oid.P802_3_MULTICAST_LIST, Oid.P802_3_MAXIMUM_LIST_SIZE,
    Oid.P802_3_RCV_ERROR_ALIGNMENT, Oid.P802_3_XMIT_ONE_COLLISION, Oid.P802_3_XMIT_MORE_COLLISIONS,
    Oid.GEN_RNDIS_CONFIG_PARAMETER)
SUPPORTED_6 = (Oid.GEN_LINK_PARAMETERS, Oid.GEN_LINK_STATE, Oid.GEN_MAX_LINK_SPEED, Oid.GEN_BYTES_RCV,
               Oid.GEN_BYTES_XMIT, Oid.TCP_OFFLOAD_PARAMETERS, Oid.OFFLOAD_ENCAPSULATION,
               Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, Oid.TCP_OFFLOAD_CURRENT_CONFIG)
SUPPORTED_630 = (Oid.GEN_RECEIVE_SCALE_CAPABILITIES, Oid.GEN_RECEIVE_SCALE_PARAMETERS)


@dataclass(frozen=True, slots=True)
class NicProperties:
    """What a host's OID answers depend on: the vNIC's MAC, the frame size from NDIS_CONFIG (MTU + 14),
    the link speed in bits/s, the queue count, the guest's NDIS version and link state."""

    mac: bytes
    mtu: int = 1514
    link_speed: int = 10_000_000_000  # net_backend's default: 10 Gbps
    max_queues: int = 1
    ndis_version: tuple[int, int] = (6, 30)
    connected: bool = True


def ndis_offload(checksum: bool = True, lso: bool = True) -> bytes:
    """``struct ndis_offload`` revision 3 (156 bytes) as OpenVMM's ``OffloadConfig::ndis_offload``: IPv4
    IP/TCP/UDP and IPv6 TCP/UDP checksums both ways, LSOv2 for both IP versions (max 0xF53C, 2 segments)."""
    on = 1  # NDIS_OFFLOAD_SUPPORTED; each field 2 bits: ip_options, tcp_options, tcp, udp, ip (v4)
    v4 = (on | on << 2 | on << 4 | on << 6 | on << 8) if checksum else 0
    v6 = (on | on << 2 | on << 4 | on << 6) if checksum else 0
    enc = NDIS_ENCAPSULATION_IEEE_802_3
    csum = struct.pack("<8I", enc, v4, enc, v4, enc, v6, enc, v6)
    lso_v2 = struct.pack("<7I", *((enc, LSO_MAX_OFFLOAD_SIZE, LSO_MIN_SEGMENT_COUNT) * 2), on | on << 2) \
        if lso else bytes(28)
    body = csum + bytes(16) + bytes(28) + lso_v2 + bytes(4) + bytes(32) + bytes(4) + bytes(8) + bytes(20) + bytes(4)
    return struct.pack("<BBH", NDIS_OBJECT_TYPE_OFFLOAD, 3, NDIS_OFFLOAD_SIZE) + body[:NDIS_OFFLOAD_SIZE - 4]


def rss_capabilities(max_queues: int, table_entries: int = DEFAULT_INDIRECTION_TABLE) -> bytes:
    """``NDIS_RECEIVE_SCALE_CAPABILITIES`` revision 2 (18 bytes), OpenVMM's values."""
    flags = NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV4 | NDIS_RSS_CAPS_HASH_TYPE_TCP_IPV6 | NDIS_HASH_FUNCTION_TOEPLITZ
    return struct.pack("<BBHIIIH", NDIS_OBJECT_TYPE_RSS_CAPABILITIES, 2, RSS_CAPABILITIES_SIZE, flags, 1,
                       max_queues, table_entries)


def _u32(v: int) -> bytes:
    return _U32.pack(v)


def query_oid(nic: NicProperties, oid: int, packet_filter: int = 0) -> bytes:
    """The information buffer OpenVMM's ``handle_oid_query`` answers ``oid`` with; ``OidError`` with
    NOT_SUPPORTED for an OID it does not know (OID_802_3_MULTICAST_LIST included, as OpenVMM)."""
    frame = nic.mtu - ETH_HEADER_LEN
    major, minor = nic.ndis_version
    if oid == Oid.GEN_SUPPORTED_LIST:
        if major not in (5, 6):
            raise OidError(Status.BAD_VERSION, f"NDIS version {major}.{minor}")
        oids = SUPPORTED_COMMON + (SUPPORTED_6 + (SUPPORTED_630 if minor >= 30 else ()) if major == 6 else ())
        return struct.pack(f"<{len(oids)}I", *oids)
    fixed: dict[int, bytes] = {
        Oid.GEN_HARDWARE_STATUS: _u32(0), Oid.GEN_MEDIA_SUPPORTED: _u32(MEDIUM_802_3),
        Oid.GEN_MEDIA_IN_USE: _u32(MEDIUM_802_3), Oid.GEN_MAXIMUM_LOOKAHEAD: _u32(frame),
        Oid.GEN_CURRENT_LOOKAHEAD: _u32(frame), Oid.GEN_MAXIMUM_FRAME_SIZE: _u32(frame),
        Oid.GEN_MAXIMUM_TOTAL_SIZE: _u32(nic.mtu), Oid.GEN_TRANSMIT_BLOCK_SIZE: _u32(nic.mtu),
        Oid.GEN_RECEIVE_BLOCK_SIZE: _u32(nic.mtu), Oid.GEN_LINK_SPEED: _u32(min(nic.link_speed // 100, 0xFFFFFFFF)),
        Oid.GEN_TRANSMIT_BUFFER_SPACE: _u32(256 * 1024), Oid.GEN_RECEIVE_BUFFER_SPACE: _u32(256 * 1024),
        Oid.GEN_VENDOR_ID: _u32(0x0000155D), Oid.GEN_VENDOR_DESCRIPTION: b"Microsoft Corporation",
        Oid.GEN_VENDOR_DRIVER_VERSION: struct.pack("<H", 0x0100), Oid.GEN_DRIVER_VERSION: struct.pack("<H", 0x0100),
        # OpenVMM answers 0 here whatever was set; we answer the filter in force.
        Oid.GEN_CURRENT_PACKET_FILTER: _u32(packet_filter), Oid.GEN_MAC_OPTIONS: _u32(MAC_OPTIONS),
        Oid.GEN_MEDIA_CONNECT_STATUS: _u32(MEDIA_STATE_CONNECTED if nic.connected else MEDIA_STATE_DISCONNECTED),
        Oid.GEN_MAXIMUM_SEND_PACKETS: _u32(0xFFFFFFFF),
        Oid.GEN_FRIENDLY_NAME: "Network Device".encode("utf-16-le").ljust(512, b"\0"),
        Oid.P802_3_PERMANENT_ADDRESS: nic.mac, Oid.P802_3_CURRENT_ADDRESS: nic.mac,
        Oid.P802_3_MAXIMUM_LIST_SIZE: _u32(0), Oid.P802_3_RCV_ERROR_ALIGNMENT: _u32(0),
        Oid.P802_3_XMIT_ONE_COLLISION: _u32(0), Oid.P802_3_XMIT_MORE_COLLISIONS: _u32(0),
        Oid.GEN_LINK_STATE: struct.pack("<BBHIIIQQII", NDIS_OBJECT_TYPE_DEFAULT, 1, 40,
                                        1 if nic.connected else 2, 0, 0, nic.link_speed, nic.link_speed, 0, 0),
        Oid.GEN_MAX_LINK_SPEED: struct.pack("<QQ", nic.link_speed, nic.link_speed),
        Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES: ndis_offload(),
        Oid.TCP_OFFLOAD_CURRENT_CONFIG: ndis_offload(),
        Oid.OFFLOAD_ENCAPSULATION: struct.pack("<BBH6I", NDIS_OBJECT_TYPE_OFFLOAD_ENCAPSULATION, 1, 28,
                                               1, NDIS_ENCAPSULATION_IEEE_802_3, ETH_HEADER_LEN,
                                               1, NDIS_ENCAPSULATION_IEEE_802_3, ETH_HEADER_LEN),
        Oid.GEN_RECEIVE_SCALE_CAPABILITIES: rss_capabilities(nic.max_queues),
    }
    answer = fixed.get(oid)
    if answer is None:
        raise OidError(Status.NOT_SUPPORTED, f"query for unknown {oid_text(oid)}")
    return answer


_OFFLOAD_PARAMS = struct.Struct("<BBH5B7BI")  # struct ndis_offload_params (revision 1: 20 bytes)
OFFLOAD_PARAMS_LSOV1_ENABLED = 2  # NDIS_OFFLOAD_PARAMETERS_LSOV1_ENABLED


def parse_offload_parameters(info: bytes) -> tuple[int, ...]:
    """SET OID_TCP_OFFLOAD_PARAMETERS (OpenVMM ``read_ndis_object``: type 0x80, revision >= 1, >= 20 bytes);
    returns (ip4, tcp4, udp4, tcp6, udp6 checksum settings, lsov1, lsov2_ipv4, lsov2_ipv6)."""
    if len(info) < _OFFLOAD_PARAMS.size:
        raise OidError(Status.INVALID_DATA, f"offload parameters of {len(info)} bytes, need {_OFFLOAD_PARAMS.size}")
    fields = _OFFLOAD_PARAMS.unpack_from(info)
    obj_type, revision, size = fields[:3]
    if obj_type != NDIS_OBJECT_TYPE_DEFAULT or revision < 1 or size < _OFFLOAD_PARAMS.size:
        raise OidError(Status.INVALID_DATA, f"offload parameters header {obj_type:#x} rev {revision} size {size}")
    ip4, tcp4, udp4, tcp6, udp6, lsov1, _ipsec, lso4, lso6 = fields[3:12]
    if lsov1 == OFFLOAD_PARAMS_LSOV1_ENABLED:
        raise OidError(Status.NOT_SUPPORTED, "LSOv1 is not supported")
    return ip4, tcp4, udp4, tcp6, udp6, lsov1, lso4, lso6


_RSS_PARAMS = struct.Struct("<BBHHHIH2xIH2xIIII")


def parse_rss_parameters(info: bytes, max_queues: int) -> tuple[int, bytes, tuple[int, ...]] | None:
    """SET OID_GEN_RECEIVE_SCALE_PARAMETERS as OpenVMM ``oid_set_rss_parameters``: None when it disables
    RSS, else (hash information, 40-byte key, indirection table); bad sizes or a queue >= ``max_queues`` ->
    INVALID_DATA."""
    padded = bytes(info[:_RSS_PARAMS.size]).ljust(_RSS_PARAMS.size, b"\0")  # OpenVMM reads what there is
    (_t, _rev, _size, flags, _cpu, hash_info, table_size, table_offset, key_size, key_offset,
     *_masks) = _RSS_PARAMS.unpack(padded)
    if flags & NDIS_RSS_PARAM_FLAG_DISABLE_RSS or not hash_info & NDIS_HASH_FUNCTION_MASK:
        return None
    if key_size != RSS_KEY_SIZE:
        raise OidError(Status.INVALID_DATA, f"RSS key of {key_size} bytes, need {RSS_KEY_SIZE}")
    if table_size == 0 or table_size % 4:
        raise OidError(Status.INVALID_DATA, f"RSS indirection table of {table_size} bytes")
    if key_offset + key_size > len(info) or table_offset + table_size > len(info):
        raise OidError(Status.INVALID_DATA, "RSS key or table lies outside the parameters")
    table = struct.unpack_from(f"<{table_size // 4}I", info, table_offset)
    if any(q >= max_queues for q in table):
        raise OidError(Status.INVALID_DATA, f"RSS indirection table names a queue >= {max_queues}")
    return hash_info, bytes(info[key_offset:key_offset + key_size]), table


_CONFIG_PARAM = struct.Struct("<5I")  # name_offset, name_length, parameter_type, value_offset, value_length
CONFIG_PARAM_STRING = 2  # NDIS_PARAMETER_TYPE_STRING


def parse_config_parameter(info: bytes) -> tuple[str, str]:
    """SET OID_GEN_RNDIS_CONFIG_PARAMETER (``struct rndis_config_parameter_info``): (name, string value);
    offsets are from the start of the parameter info, lengths in bytes of UTF-16."""
    if len(info) < _CONFIG_PARAM.size:
        raise OidError(Status.INVALID_DATA, f"config parameter of {len(info)} bytes")
    name_offset, name_length, ptype, value_offset, value_length = _CONFIG_PARAM.unpack_from(info)
    if name_length > 255 or value_length > 255:
        raise OidError(Status.INVALID_DATA, "config parameter name or value longer than 255 bytes")
    if name_offset + name_length > len(info) or value_offset + value_length > len(info):
        raise OidError(Status.INVALID_DATA, "config parameter name or value lies outside the buffer")
    try:
        name = info[name_offset:name_offset + name_length].decode("utf-16-le")
        value = info[value_offset:value_offset + value_length].decode("utf-16-le") \
            if ptype == CONFIG_PARAM_STRING else ""
    except UnicodeDecodeError as exc:
        raise OidError(Status.INVALID_DATA, f"config parameter is not UTF-16: {exc}") from None
    return name, value


def pack_config_parameter(name: str, value: str) -> bytes:
    """What Linux ``rndis_filter_set_device_mac`` sends: "NetworkAddress" = 12 hex digits, as a string."""
    n, v = name.encode("utf-16-le"), value.encode("utf-16-le")
    return _CONFIG_PARAM.pack(20, len(n), CONFIG_PARAM_STRING, 20 + len(n), len(v)) + n + v
