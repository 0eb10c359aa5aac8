"""VMBus channel messages (the control plane): CHANNELMSG numbers, fields, codec and the teaching trace.

Linux include/linux/hyperv.h (``enum vmbus_channel_message_type`` and the ``vmbus_channel_*`` structs);
OpenVMM vm/devices/vmbus/vmbus_core/src/protocol.rs (``vmbus_messages!``). Every message keeps its real
number and its fields in the real order with the real widths. On our stream the body is a msgpack map of
those fields (docs/protocol.md); ``to_binary()`` gives the packed Hyper-V layout as a guest would post it.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import msgpack

from .errors import MessageError
from .guids import CLASS_NAMES
from .versions import Version, version_text

MAX_MESSAGE_SIZE = 240  # HV_MESSAGE_PAYLOAD_SIZE: a SynIC message payload, VMBus header included
GPADL_HEADER_MAX_PFNS = 26  # one of 27 u64 slots goes to the range header
GPADL_BODY_MAX_PFNS = 28
STATUS_SUCCESS = 0
STATUS_UNSUCCESSFUL = 0x8000FFFF
VP_INDEX_DISABLE_INTERRUPT = 0xFFFFFFFF  # target_vp: no host-to-guest interrupts (OpenVMM protocol.rs)


class MsgType(enum.IntEnum):
    """``enum vmbus_channel_message_type``."""

    INVALID = 0
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17
    OPEN_RESERVED_CHANNEL = 18
    CLOSE_RESERVED_CHANNEL = 19
    CLOSE_RESERVED_RESPONSE = 20
    TL_CONNECT_REQUEST = 21
    MODIFYCHANNEL = 22
    TL_CONNECT_RESULT = 23
    MODIFYCHANNEL_RESPONSE = 24
    MODIFY_CONNECTION = 25
    MODIFY_CONNECTION_RESPONSE = 26
    PAUSE = 27
    PAUSE_RESPONSE = 28
    RESUME = 29


class ConnectionState(enum.IntEnum):
    """VERSION_RESPONSE connection_state (OpenVMM protocol.rs ``ConnectionState``)."""

    SUCCESSFUL = 0
    FAILED_LOW_RESOURCES = 1
    FAILED_UNKNOWN_FAILURE = 2


# Offer flags (chn_flags), Linux hyperv.h VMBUS_CHANNEL_*.
OFFER_ENUMERATE_DEVICE_INTERFACE = 0x1
OFFER_NAMED_PIPE_MODE = 0x10
OFFER_REQUEST_MONITORED_NOTIFICATION = 0x400
MONITOR_ID_INVALID = 0xFF

# Field kinds: struct code for fixed-width integers, or a special kind.
_INT_RANGES = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 0xFFFFFFFFFFFFFFFF}
_U64 = _INT_RANGES["Q"]
_HEADER = struct.Struct("<II")  # vmbus_channel_message_header: msgtype, padding


@dataclass(slots=True)
class Message:
    """Base of every channel message. ``LAYOUT`` lists (field, kind) in the real struct order."""

    MSGTYPE: ClassVar[MsgType]
    LAYOUT: ClassVar[tuple[tuple[str, str], ...]] = ()

    @property
    def msgtype(self) -> MsgType:
        return self.MSGTYPE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"msgtype": int(self.MSGTYPE)}
        for name, kind in self.LAYOUT:
            value = getattr(self, name)
            if kind == "guid":
                value = value.bytes_le
            elif kind == "ranges":
                value = [list(r) for r in value]
            elif kind == "pfns":
                value = list(value)
            out[name] = value
        return out

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    def to_binary(self, version: int | None = None) -> bytes:
        """The packed Hyper-V layout (header + payload), as posted through HvPostMessage. ``version`` is the
        negotiated VMBus version (for VERSION_RESPONSE, the version it answers), for layouts that depend on it."""
        body = bytearray(_HEADER.pack(int(self.MSGTYPE), 0))
        for name, kind in self._binary_layout(version):
            value = getattr(self, name)
            if kind in _INT_RANGES:
                body += struct.pack("<" + kind, value)
            elif kind == "i":
                body += struct.pack("<i", value)
            elif kind == "guid":
                body += value.bytes_le
            elif kind.startswith("bytes"):
                body += value.ljust(int(kind[5:]), b"\0")
            elif kind == "ranges":
                # GPADL_HEADER: each range is {byte_count, byte_offset} then its PFNs; our ranges only
                # carry the range headers and ``pfns`` the PFN stream, so interleave them back.
                pfns = list(self.pfns)  # type: ignore[attr-defined]
                for byte_count, byte_offset in value:
                    n = (byte_offset + byte_count + 4095) // 4096
                    body += struct.pack("<II", byte_count, byte_offset)
                    chunk, pfns = pfns[:n], pfns[n:]
                    body += struct.pack(f"<{len(chunk)}Q", *chunk)
            elif kind == "pfns" and not isinstance(self, GpadlHeader):
                body += struct.pack(f"<{len(value)}Q", *value)
        return bytes(body)

    def _binary_layout(self, version: int | None) -> tuple[tuple[str, str], ...]:
        return self.LAYOUT

    def describe(self, version: int | None = None) -> str:
        """One line for ``--trace``: real name, number and the fields the real message has. ``version`` is as
        for ``to_binary``: a VERSION_RESPONSE shows ``supported_features`` only when it answers 6.0 or later."""
        parts = []
        for name, kind in self._binary_layout(version):
            value = getattr(self, name)
            if kind == "guid":
                text = str(value)
                if value in CLASS_NAMES:
                    text += f"({CLASS_NAMES[value]})"
            elif kind.startswith("bytes"):
                stripped = bytes(value).rstrip(b"\0")
                text = stripped.hex() if stripped else "0"
            elif kind == "pfns":
                text = _pfn_text(value)
            elif name == "vmbus_version_requested":
                text = f"{value:#x}({version_text(value)})"
            elif name in _HEX_FIELDS:
                text = f"{value:#x}"
            else:
                text = str(value)
            parts.append(f"{name}={text}")
        return f"CHANNELMSG_{self.MSGTYPE.name}({int(self.MSGTYPE)}) " + " ".join(parts)


_HEX_FIELDS = {"vmbus_version_requested", "gpadl", "ringbuffer_gpadlhandle", "creation_status", "status",
               "chn_flags", "interrupt_page", "monitor_page1", "monitor_page2", "msg_conn_id",
               "connection_id", "supported_features"}


def _pfn_text(pfns: tuple[int, ...]) -> str:
    if not pfns:
        return "[]"
    if len(pfns) <= 4:
        return "[" + ",".join(f"{p:#x}" for p in pfns) + "]"
    return f"[{pfns[0]:#x}..{pfns[-1]:#x} ({len(pfns)} pfns)]"


def _message(cls: type[Message]) -> type[Message]:
    _REGISTRY[int(cls.MSGTYPE)] = cls
    return cls


_REGISTRY: dict[int, type[Message]] = {}


@_message
@dataclass(slots=True)
class OfferChannel(Message):
    MSGTYPE = MsgType.OFFERCHANNEL
    LAYOUT = (("if_type", "guid"), ("if_instance", "guid"), ("reserved1", "Q"), ("reserved2", "Q"),
              ("chn_flags", "H"), ("mmio_megabytes", "H"), ("user_def", "bytes120"),
              ("sub_channel_index", "H"), ("mmio_megabytes_optional", "H"), ("child_relid", "I"),
              ("monitorid", "B"), ("monitor_allocated", "B"), ("is_dedicated_interrupt", "H"),
              ("connection_id", "I"))
    if_type: uuid.UUID
    if_instance: uuid.UUID
    child_relid: int
    connection_id: int
    chn_flags: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = b""
    sub_channel_index: int = 0
    mmio_megabytes_optional: int = 0
    monitorid: int = MONITOR_ID_INVALID
    monitor_allocated: int = 0
    is_dedicated_interrupt: int = 1
    reserved1: int = 0
    reserved2: int = 0


@_message
@dataclass(slots=True)
class RescindChannelOffer(Message):
    MSGTYPE = MsgType.RESCIND_CHANNELOFFER
    LAYOUT = (("child_relid", "I"),)
    child_relid: int


@_message
@dataclass(slots=True)
class RequestOffers(Message):
    MSGTYPE = MsgType.REQUESTOFFERS


@_message
@dataclass(slots=True)
class AllOffersDelivered(Message):
    MSGTYPE = MsgType.ALLOFFERS_DELIVERED


@_message
@dataclass(slots=True)
class OpenChannel(Message):
    MSGTYPE = MsgType.OPENCHANNEL
    LAYOUT = (("child_relid", "I"), ("openid", "I"), ("ringbuffer_gpadlhandle", "I"), ("target_vp", "I"),
              ("downstream_ringbuffer_pageoffset", "I"), ("userdata", "bytes120"))
    child_relid: int
    openid: int
    ringbuffer_gpadlhandle: int
    downstream_ringbuffer_pageoffset: int
    target_vp: int = 0
    userdata: bytes = b""


@_message
@dataclass(slots=True)
class OpenChannelResult(Message):
    MSGTYPE = MsgType.OPENCHANNEL_RESULT
    LAYOUT = (("child_relid", "I"), ("openid", "I"), ("status", "I"))
    child_relid: int
    openid: int
    status: int


@_message
@dataclass(slots=True)
class CloseChannel(Message):
    MSGTYPE = MsgType.CLOSECHANNEL
    LAYOUT = (("child_relid", "I"),)
    child_relid: int


@_message
@dataclass(slots=True)
class GpadlHeader(Message):
    """GPADL_HEADER. ``ranges`` holds each range's (byte_count, byte_offset); ``pfns`` the first PFNs
    of the concatenated page arrays (at most 27 u64 slots with the range headers, so 26 for one range)."""

    MSGTYPE = MsgType.GPADL_HEADER
    LAYOUT = (("child_relid", "I"), ("gpadl", "I"), ("range_buflen", "H"), ("rangecount", "H"),
              ("ranges", "ranges"), ("pfns", "pfns"))
    child_relid: int
    gpadl: int
    range_buflen: int
    rangecount: int
    ranges: tuple[tuple[int, int], ...] = ()
    pfns: tuple[int, ...] = ()


@_message
@dataclass(slots=True)
class GpadlBody(Message):
    MSGTYPE = MsgType.GPADL_BODY
    LAYOUT = (("msgnumber", "I"), ("gpadl", "I"), ("pfns", "pfns"))
    msgnumber: int
    gpadl: int
    pfns: tuple[int, ...] = ()


@_message
@dataclass(slots=True)
class GpadlCreated(Message):
    MSGTYPE = MsgType.GPADL_CREATED
    LAYOUT = (("child_relid", "I"), ("gpadl", "I"), ("creation_status", "I"))
    child_relid: int
    gpadl: int
    creation_status: int


@_message
@dataclass(slots=True)
class GpadlTeardown(Message):
    MSGTYPE = MsgType.GPADL_TEARDOWN
    LAYOUT = (("child_relid", "I"), ("gpadl", "I"))
    child_relid: int
    gpadl: int


@_message
@dataclass(slots=True)
class GpadlTorndown(Message):
    MSGTYPE = MsgType.GPADL_TORNDOWN
    LAYOUT = (("gpadl", "I"),)
    gpadl: int


@_message
@dataclass(slots=True)
class RelidReleased(Message):
    MSGTYPE = MsgType.RELID_RELEASED
    LAYOUT = (("child_relid", "I"),)
    child_relid: int


@_message
@dataclass(slots=True)
class InitiateContact(Message):
    """INITIATE_CONTACT. ``interrupt_page`` is the u64 union: a GPA before 5.0; from 5.0 byte 0 is
    msg_sint, byte 1 msg_vtl and bytes 4-7 feature_flags (6.0+)."""

    MSGTYPE = MsgType.INITIATE_CONTACT
    LAYOUT = (("vmbus_version_requested", "I"), ("target_vcpu", "I"), ("interrupt_page", "Q"),
              ("monitor_page1", "Q"), ("monitor_page2", "Q"))
    vmbus_version_requested: int
    target_vcpu: int = 0
    interrupt_page: int = 0
    monitor_page1: int = 0
    monitor_page2: int = 0

    @property
    def msg_sint(self) -> int:
        return self.interrupt_page & 0xFF

    @property
    def feature_flags(self) -> int:
        return (self.interrupt_page >> 32) & 0xFFFFFFFF


@_message
@dataclass(slots=True)
class VersionResponse(Message):
    """VERSION_RESPONSE (16 bytes); ``supported_features`` makes it VersionResponse2 (20 bytes), which the
    host sends only when it accepts 6.0 or later (OpenVMM channels.rs ``send_version_response_with_target``).
    Our map always carries the field; ``to_binary(version)`` gives the real size for the version answered and
    ``describe(version)`` the real fields (a guest knows the version it asked for, as it knows the length)."""

    MSGTYPE = MsgType.VERSION_RESPONSE
    LAYOUT = (("version_supported", "B"), ("connection_state", "B"), ("padding", "H"),
              ("msg_conn_id", "I"), ("supported_features", "I"))
    version_supported: int
    connection_state: int = ConnectionState.SUCCESSFUL
    msg_conn_id: int = 0
    supported_features: int = 0
    padding: int = 0

    def _binary_layout(self, version: int | None) -> tuple[tuple[str, str], ...]:
        if self.version_supported and version is not None and version >= Version.WIN10_V6_0:
            return self.LAYOUT
        return self.LAYOUT[:-1]  # without supported_features


@_message
@dataclass(slots=True)
class Unload(Message):
    MSGTYPE = MsgType.UNLOAD


@_message
@dataclass(slots=True)
class UnloadResponse(Message):
    MSGTYPE = MsgType.UNLOAD_RESPONSE


@_message
@dataclass(slots=True)
class ModifyChannel(Message):
    MSGTYPE = MsgType.MODIFYCHANNEL
    LAYOUT = (("child_relid", "I"), ("target_vp", "I"))
    child_relid: int
    target_vp: int


@_message
@dataclass(slots=True)
class ModifyChannelResponse(Message):
    MSGTYPE = MsgType.MODIFYCHANNEL_RESPONSE
    LAYOUT = (("child_relid", "I"), ("status", "i"))
    child_relid: int
    status: int


class UnsupportedMessage(MessageError):
    """A well-formed envelope around a CHANNELMSG number we do not implement (logged and dropped)."""

    def __init__(self, msgtype: int) -> None:
        name = MsgType(msgtype).name if msgtype in MsgType._value2member_map_ else "unknown"
        super().__init__(f"unsupported channel message type {msgtype} ({name})", msgtype)


def decode(body: bytes | memoryview) -> Message:
    """Decode one control-message body. Raises ``MessageError`` (``UnsupportedMessage`` for a number
    we do not implement)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError(f"control message body is not msgpack: {exc}") from None
    if not isinstance(obj, Mapping):
        raise MessageError(f"control message body is a {type(obj).__name__}, not a map")
    return from_dict(obj)


def from_dict(obj: Mapping[str, Any]) -> Message:
    try:
        return _from_dict(obj)
    except MessageError as exc:
        if exc.msgtype is None and isinstance(obj.get("msgtype"), int):
            exc.msgtype, exc.raw = obj["msgtype"], dict(obj)
        raise


def _from_dict(obj: Mapping[str, Any]) -> Message:
    msgtype = obj.get("msgtype")
    if not isinstance(msgtype, int) or isinstance(msgtype, bool):
        raise MessageError("control message has no integer msgtype")
    cls = _REGISTRY.get(msgtype)
    if cls is None:
        raise UnsupportedMessage(msgtype)
    layout, allowed, optional = _shape(cls)
    kwargs: dict[str, Any] = {}
    for name, kind in layout:
        if name not in obj:
            if name in optional:
                continue
            raise MessageError(f"{cls.MSGTYPE.name}: missing field {name!r}")
        kwargs[name] = _check(cls, name, kind, obj[name])
    if len(obj) > len(kwargs) + 1 or "msgtype" not in obj:  # (only then can a field be unknown)
        extra = set(obj) - allowed
        if extra:
            raise MessageError(f"{cls.MSGTYPE.name}: unknown fields {sorted(map(repr, extra))}")
    return cls(**kwargs)


_SHAPES: dict[type[Message], tuple[tuple[tuple[str, str], ...], frozenset[str], frozenset[str]]] = {}


def _shape(cls: type[Message]) -> tuple[tuple[tuple[str, str], ...], frozenset[str], frozenset[str]]:
    """A message class's layout, the keys its map may have and the fields it may leave out (computed once)."""
    shape = _SHAPES.get(cls)
    if shape is None:
        optional = frozenset(f.name for f in fields(cls)
                             if f.default is not MISSING or f.default_factory is not MISSING)
        allowed = frozenset(n for n, _ in cls.LAYOUT) | {"msgtype"}
        shape = _SHAPES[cls] = (tuple(cls.LAYOUT), allowed, optional)
    return shape


def _int(cls: type[Message], name: str, value: Any, maximum: int, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise MessageError(f"{cls.MSGTYPE.name}.{name}: {value!r} is not an integer in [{minimum}, {maximum}]")
    return value


def _check(cls: type[Message], name: str, kind: str, value: Any) -> Any:
    if kind in _INT_RANGES:
        return _int(cls, name, value, _INT_RANGES[kind])
    if kind == "i":
        return _int(cls, name, value, 0x7FFFFFFF, -0x80000000)
    if kind == "guid":
        if not isinstance(value, bytes) or len(value) != 16:
            raise MessageError(f"{cls.MSGTYPE.name}.{name}: a GUID is 16 bytes")
        return uuid.UUID(bytes_le=value)
    if kind.startswith("bytes"):
        limit = int(kind[5:])
        if not isinstance(value, bytes) or len(value) > limit:
            raise MessageError(f"{cls.MSGTYPE.name}.{name}: at most {limit} bytes")
        return value
    if kind == "pfns":
        if not isinstance(value, list) or len(value) > GPADL_BODY_MAX_PFNS:
            raise MessageError(f"{cls.MSGTYPE.name}.{name}: a list of at most {GPADL_BODY_MAX_PFNS} PFNs")
        if all(type(v) is int for v in value) and (not value or (min(value) >= 0 and max(value) <= _U64)):
            return tuple(value)  # the common case, checked at C speed; otherwise name the bad one
        return tuple(_int(cls, name, v, _U64) for v in value)
    if kind == "ranges":
        if not isinstance(value, list) or len(value) > GPADL_HEADER_MAX_PFNS + 1:
            raise MessageError(f"{cls.MSGTYPE.name}.{name}: a list of [byte_count, byte_offset]")
        out = []
        for r in value:
            if not isinstance(r, list) or len(r) != 2:
                raise MessageError(f"{cls.MSGTYPE.name}.{name}: each range is [byte_count, byte_offset]")
            out.append((_int(cls, name, r[0], _INT_RANGES["I"]), _int(cls, name, r[1], _INT_RANGES["I"])))
        return tuple(out)
    raise AssertionError(kind)


# Guest-to-host and host-to-guest message sets, for direction checks.
GUEST_TO_HOST = frozenset({MsgType.REQUESTOFFERS, MsgType.OPENCHANNEL, MsgType.CLOSECHANNEL,
                           MsgType.GPADL_HEADER, MsgType.GPADL_BODY, MsgType.GPADL_TEARDOWN,
                           MsgType.RELID_RELEASED, MsgType.INITIATE_CONTACT, MsgType.UNLOAD,
                           MsgType.MODIFYCHANNEL})
HOST_TO_GUEST = frozenset({MsgType.OFFERCHANNEL, MsgType.RESCIND_CHANNELOFFER, MsgType.ALLOFFERS_DELIVERED,
                           MsgType.OPENCHANNEL_RESULT, MsgType.GPADL_CREATED, MsgType.GPADL_TORNDOWN,
                           MsgType.VERSION_RESPONSE, MsgType.UNLOAD_RESPONSE,
                           MsgType.MODIFYCHANNEL_RESPONSE})

# The minimum negotiated version at which each message is valid (OpenVMM vmbus_messages! table).
MIN_VERSION: dict[MsgType, int] = {
    MsgType.UNLOAD_RESPONSE: 0x00010001,
    MsgType.MODIFYCHANNEL: 0x00040001,
    MsgType.MODIFYCHANNEL_RESPONSE: 0x00050003,
}

