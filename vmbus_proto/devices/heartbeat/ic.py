"""The Hyper-V integration-component (IC) message framework: what heartbeat, shutdown, timesync and KVP share.

Every IC channel is offered in named-pipe message mode, and every message is
``[vmbuspipe_hdr (8)][icmsg_hdr (20)][body]``. The host opens with an ``ICMSGTYPE_NEGOTIATE`` listing the
framework and service versions it can speak; the guest answers in place with the one of each it chose. After
that the host sends one request at a time (flags TRANSACTION|REQUEST) and the guest echoes the same buffer
back with flags TRANSACTION|RESPONSE and a status.

Mirrors Linux include/linux/hyperv.h (``struct vmbuspipe_hdr``, ``struct ic_version``, ``struct icmsg_hdr``,
``struct icmsg_negotiate``, ``ICMSGTYPE_*``, ``ICMSGHDRFLAG_*``, ``ICMSG_HDR``,
``IC_VERSION_NEGOTIATION_MAX_VER_COUNT``, ``UTIL_FW_VERSION``), include/linux/hyperv.h ``HV_S_OK`` and
``HV_E_FAIL``, drivers/hv/channel_mgmt.c ``vmbus_prep_negotiate_resp`` (the guest's answer), and OpenVMM
vm/devices/hyperv_ic_protocol/src/lib.rs (``Header``, ``NegotiateMessage``, ``MAX_MESSAGE_SIZE``) with
vm/devices/hyperv_ic/src/common.rs ``IcPipe::negotiate`` (the host's request and its checks of the answer).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ...errors import DeviceProtocolError, LocalProtocolError
from ...packets import PacketType
from ...pipe import PIPE_HEADER, pipe_unwrap, pipe_wrap
from ..base import Handshake, Incoming, Outgoing, major_minor_text, name_text

__all__ = [
    "FRAMEWORK_VERSIONS_HOST",
    "HV_E_FAIL",
    "HV_S_OK",
    "ICMSG_HDR",
    "IC_HEADER",
    "MAX_MESSAGE_SIZE",
    "MAX_VERSION_COUNT",
    "UTIL_FW_VERSIONS",
    "IcFlags",
    "IcGuest",
    "IcHeader",
    "IcHostNegotiation",
    "IcMessageType",
    "IcVscHandshake",
    "Negotiate",
    "describe_ic",
    "pack_ic",
    "prep_negotiate_resp",
    "unpack_ic",
    "version",
]


class IcMessageType(enum.IntEnum):
    """``ICMSGTYPE_*`` (Linux hyperv.h; OpenVMM ``MessageType``)."""

    NEGOTIATE = 0
    HEARTBEAT = 1
    KVPEXCHANGE = 2
    SHUTDOWN = 3
    TIMESYNC = 4
    VSS = 5
    FCOPY = 7


class IcFlags(enum.IntFlag):
    """``ICMSGHDRFLAG_*``."""

    TRANSACTION = 1
    REQUEST = 2
    RESPONSE = 4


HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005

IC_HEADER = struct.Struct("<HHHHHHIBBH")  # struct icmsg_hdr: 20 bytes, packed
ICMSG_HDR = PIPE_HEADER.size + IC_HEADER.size  # 28: where an IC message body starts in a packet
_NEGOTIATE = struct.Struct("<HHI")  # struct icmsg_negotiate without its version array
_IC_VERSION = struct.Struct("<HH")  # struct ic_version
MAX_VERSION_COUNT = 100  # IC_VERSION_NEGOTIATION_MAX_VER_COUNT
MAX_MESSAGE_SIZE = 13312  # OpenVMM hyperv_ic_protocol MAX_MESSAGE_SIZE: the largest IC message either side sends
NEGOTIATE_RESPONSE_SIZE = 0x10  # vmbus_prep_negotiate_resp sets icmsgsize to this: counts, reserved, 2 versions


def version(major: int, minor: int) -> int:
    """An IC version as Linux holds it: ``major << 16 | minor`` (on the wire: ``u16 major, u16 minor``)."""
    return major << 16 | minor


# The host offers framework versions oldest first (OpenVMM common.rs FRAMEWORK_VERSIONS); a Linux guest
# walks its own list newest first (hv_util.c fw_versions: UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION).
FRAMEWORK_VERSIONS_HOST: tuple[int, ...] = (version(1, 0), version(3, 0))
UTIL_FW_VERSIONS: tuple[int, ...] = (version(3, 0), version(1, 0))


@dataclass(frozen=True, slots=True)
class IcHeader:
    """``struct icmsg_hdr``; versions are ``major << 16 | minor``."""

    framework_version: int
    message_type: int
    message_version: int
    message_size: int
    status: int = HV_S_OK
    transaction_id: int = 0
    flags: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        fw, msg = self.framework_version, self.message_version
        return IC_HEADER.pack(fw >> 16, fw & 0xFFFF, self.message_type, msg >> 16, msg & 0xFFFF,
                              self.message_size, self.status, self.transaction_id, self.flags, self.reserved)

    @classmethod
    def unpack(cls, raw: bytes) -> IcHeader:
        if len(raw) < IC_HEADER.size:
            raise DeviceProtocolError(f"IC message of {len(raw)} bytes is shorter than icmsg_hdr ({IC_HEADER.size})")
        fw_major, fw_minor, msg_type, msg_major, msg_minor, size, status, trans, flags, reserved = \
            IC_HEADER.unpack_from(raw)
        return cls(version(fw_major, fw_minor), msg_type, version(msg_major, msg_minor), size, status, trans,
                   flags, reserved)

    @property
    def is_response(self) -> bool:
        return self.flags & (IcFlags.TRANSACTION | IcFlags.RESPONSE) == IcFlags.TRANSACTION | IcFlags.RESPONSE


def pack_ic(header: IcHeader, body: bytes) -> bytes:
    """A whole IC packet payload: pipe header, icmsg_hdr, body."""
    return pipe_wrap(header.pack() + body)


def unpack_ic(payload: bytes) -> tuple[IcHeader, bytes]:
    """(header, body) of an IC packet, the body cut to ``icmsgsize``. A missing pipe header, a short header or
    a body shorter than ``icmsgsize`` is a DeviceProtocolError."""
    message = pipe_unwrap(payload)
    header = IcHeader.unpack(message)
    body = message[IC_HEADER.size:]
    if header.message_size > len(body):
        raise DeviceProtocolError(f"icmsg_hdr says {header.message_size} body bytes, the packet has {len(body)}")
    return header, body[:header.message_size]


@dataclass(frozen=True, slots=True)
class Negotiate:
    """``struct icmsg_negotiate``: the framework versions, then the service (message) versions."""

    framework_versions: tuple[int, ...]
    message_versions: tuple[int, ...]
    reserved: int = 0

    def pack(self) -> bytes:
        versions = (*self.framework_versions, *self.message_versions)
        return _NEGOTIATE.pack(len(self.framework_versions), len(self.message_versions), self.reserved) + \
            b"".join(_IC_VERSION.pack(v >> 16, v & 0xFFFF) for v in versions)

    @classmethod
    def unpack(cls, body: bytes) -> Negotiate:
        if len(body) < _NEGOTIATE.size:
            raise DeviceProtocolError(f"icmsg_negotiate of {len(body)} bytes is shorter than {_NEGOTIATE.size}")
        fw_count, msg_count, reserved = _NEGOTIATE.unpack_from(body)
        if fw_count > MAX_VERSION_COUNT or msg_count > MAX_VERSION_COUNT:
            raise DeviceProtocolError(f"icmsg_negotiate counts {fw_count}/{msg_count} exceed {MAX_VERSION_COUNT}")
        need = _NEGOTIATE.size + (fw_count + msg_count) * _IC_VERSION.size
        if len(body) < need:
            raise DeviceProtocolError(f"icmsg_negotiate lists {fw_count}+{msg_count} versions ({need} bytes) "
                                      f"in {len(body)} bytes")
        versions = [version(*_IC_VERSION.unpack_from(body, _NEGOTIATE.size + i * _IC_VERSION.size))
                    for i in range(fw_count + msg_count)]
        return cls(tuple(versions[:fw_count]), tuple(versions[fw_count:]), reserved)


def _first_common(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """Linux's choice: the first of our versions (newest first) that the host listed."""
    return next((v for v in ours if v in theirs), None)


def prep_negotiate_resp(buf: bytearray, fw_versions: Sequence[int], srv_versions: Sequence[int]
                        ) -> tuple[bool, int, int]:
    """Linux ``vmbus_prep_negotiate_resp``: turn the host's NEGOTIATE in ``buf`` (the whole packet payload,
    pipe header included) into the answer, in place. Returns (found, framework version, service version).

    As in Linux: icmsgsize becomes 0x10, the counts become 1/1 (0/0 when nothing matched) and the first two
    version slots hold the choice; the buffer keeps its length, so a request listing fewer than two versions
    gets the slots that fit (Linux writes past ``recvlen`` and sends ``recvlen`` bytes)."""
    if len(buf) < ICMSG_HDR + 4:
        return False, 0, 0  # too short for the counts: Linux answers it unchanged
    struct.pack_into("<H", buf, PIPE_HEADER.size + 10, NEGOTIATE_RESPONSE_SIZE)  # icmsgsize
    fw_count, msg_count = struct.unpack_from("<HH", buf, ICMSG_HDR)
    need = ICMSG_HDR + _NEGOTIATE.size + (fw_count + msg_count) * _IC_VERSION.size
    fw: int | None = None
    srv: int | None = None
    chosen_fw, chosen_srv = version(fw_count, 0), version(msg_count, 0)  # Linux's values when it bails early
    if fw_count <= MAX_VERSION_COUNT and msg_count <= MAX_VERSION_COUNT and need <= len(buf):
        offered = Negotiate.unpack(bytes(buf[ICMSG_HDR:]))
        fw = _first_common(fw_versions, offered.framework_versions)
        if fw is not None:
            chosen_fw = fw
            srv = _first_common(srv_versions, offered.message_versions)
            if srv is not None:
                chosen_srv = srv
    found = fw is not None and srv is not None
    padded = buf + bytes(max(0, ICMSG_HDR + _NEGOTIATE.size + 2 * _IC_VERSION.size - len(buf)))
    struct.pack_into("<HH", padded, ICMSG_HDR, int(found), int(found))
    struct.pack_into("<HHHH", padded, ICMSG_HDR + _NEGOTIATE.size, chosen_fw >> 16, chosen_fw & 0xFFFF,
                     chosen_srv >> 16, chosen_srv & 0xFFFF)
    buf[:] = padded[:len(buf)]
    return found, chosen_fw, chosen_srv


def _set_response_flags(buf: bytearray) -> None:
    """``icmsghdrp->icflags = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE``."""
    buf[PIPE_HEADER.size + 17] = IcFlags.TRANSACTION | IcFlags.RESPONSE


def _set_status(buf: bytearray, status: int) -> None:
    struct.pack_into("<I", buf, PIPE_HEADER.size + 12, status)


# ---- the guest: hv_util's per-service channel callback -----------------------------------------------------


class IcGuest:
    """One IC service's guest half, as Linux hv_util's ``*_onchannelcallback`` answers: every packet of at
    least ``ICMSG_HDR`` bytes is answered in place and sent back whole, with the same request id; a NEGOTIATE
    through ``prep_negotiate_resp``, the service's own message through ``on_message``, any other type with
    status HV_E_FAIL. Shorter packets are dropped (Linux logs them ratelimited).

    Subclasses set ``message_type``, ``service_versions`` (newest first) and ``name``, and implement
    ``on_message(body)``: change the body in place and return the status."""

    message_type: int
    service_versions: tuple[int, ...]
    name: str = "IC"

    def __init__(self, fw_versions: Sequence[int] = UTIL_FW_VERSIONS,
                 service_versions: Sequence[int] | None = None) -> None:
        self.fw_versions = tuple(fw_versions)
        if service_versions is not None:
            self.service_versions = tuple(service_versions)
        self.framework_version: int | None = None
        self.service_version: int | None = None
        self.negotiated = False
        self.dropped: list[str] = []  # why packets were dropped (the caller logs and clears)

    def answer(self, packet: Incoming) -> Outgoing | None:
        """The answer to one packet from the host, or None (dropped: see ``dropped``)."""
        buf = bytearray(packet.payload)
        if len(buf) < ICMSG_HDR:
            self.dropped.append(f"{self.name} packet of {len(buf)} bytes is shorter than ICMSG_HDR ({ICMSG_HDR})")
            return None
        header = IcHeader.unpack(bytes(buf[PIPE_HEADER.size:ICMSG_HDR]))
        if header.message_type == IcMessageType.NEGOTIATE:
            found, fw, srv = prep_negotiate_resp(buf, self.fw_versions, self.service_versions)
            if found:
                self.framework_version, self.service_version, self.negotiated = fw, srv, True
        elif header.message_type == self.message_type:
            body = buf[ICMSG_HDR:]
            status = self.on_message(body)
            if status is None:
                return None
            buf[ICMSG_HDR:] = body
            _set_status(buf, status)
        else:
            _set_status(buf, HV_E_FAIL)
            self.dropped.append(f"{self.name}: invalid msg type {header.message_type}; answered HV_E_FAIL")
        _set_response_flags(buf)
        return Outgoing(bytes(buf), PacketType.DATA_INBAND, packet.trans_id, False)

    def on_message(self, body: bytearray) -> int | None:
        """Handle the service's own message in place; the status to answer with, or None to drop it."""
        raise NotImplementedError


G = TypeVar("G", bound=IcGuest)


class IcVscHandshake(Handshake, Generic[G]):
    """The guest's side of an IC NEGOTIATE, for any IC service: nothing to send first; ``guest`` answers what
    the host sends (as hv_util answers any packet) and the handshake is done once a NEGOTIATE found versions
    both sides know. The same ``guest`` then answers the service's messages."""

    def __init__(self, guest: G) -> None:
        self.guest = guest
        self.negotiated_version = None
        self._failed: str | None = None

    @property
    def done(self) -> bool:
        return self.guest.negotiated

    @property
    def failed(self) -> str | None:
        return self._failed

    def start(self) -> list[Outgoing]:
        return []

    def receive(self, packet: Incoming) -> list[Outgoing]:
        out = self.guest.answer(packet)
        if self.guest.negotiated:
            self.negotiated_version = self.guest.service_version
        elif out is not None and IcHeader.unpack(out.payload[PIPE_HEADER.size:]).message_type == \
                IcMessageType.NEGOTIATE:
            offered = ", ".join(map(version_text, self.guest.service_versions))
            self._failed = f"host offered none of the {self.guest.name} versions this guest knows ({offered})"
        return [out] if out is not None else []


# ---- the host: OpenVMM IcPipe::negotiate ------------------------------------------------------------------


class IcHostNegotiation(Handshake):
    """The host's NEGOTIATE for one IC channel (OpenVMM ``IcPipe::negotiate``): one request listing its
    framework versions and the service's, flags TRANSACTION|REQUEST, transaction id 0; the answer must be a
    TRANSACTION|RESPONSE NEGOTIATE choosing one of each. Other answers that arrive first are stale and dropped
    (as OpenVMM drops them); a guest that chose nothing (counts 0/0) leaves ``failed`` set; a malformed answer,
    or one choosing a version that was not offered, is a DeviceProtocolError."""

    def __init__(self, name: str, message_versions: Iterable[int],
                 framework_versions: Iterable[int] = FRAMEWORK_VERSIONS_HOST) -> None:
        self.name = name
        self.framework_versions = tuple(framework_versions)
        self.message_versions = tuple(message_versions)
        self.negotiated_version = None
        self.framework_version: int | None = None
        self._started = False
        self._done = False
        self._failed: str | None = None
        self.stale = 0

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> str | None:
        return self._failed

    def start(self) -> list[Outgoing]:
        if self._started:
            raise LocalProtocolError(f"{self.name} NEGOTIATE already sent")
        self._started = True
        body = Negotiate(self.framework_versions, self.message_versions).pack()
        header = IcHeader(0, IcMessageType.NEGOTIATE, 0, len(body), flags=IcFlags.TRANSACTION | IcFlags.REQUEST)
        return [Outgoing(pack_ic(header, body))]

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self._done or self._failed is not None:
            raise DeviceProtocolError(f"{self.name} negotiation is over: this packet belongs to the running device")
        if not self._started:
            raise DeviceProtocolError(f"{self.name} packet before the host's NEGOTIATE")
        header, body = parse_response(self.name, packet)
        if header.message_type != IcMessageType.NEGOTIATE:
            self.stale += 1
            return []
        answer = Negotiate.unpack(body)
        counts = (len(answer.framework_versions), len(answer.message_versions))
        if counts == (0, 0):
            self._failed = (f"guest supports none of the offered {self.name} versions "
                            f"({', '.join(map(version_text, self.message_versions))})")
            return []
        if counts != (1, 1):
            raise DeviceProtocolError(f"{self.name} NEGOTIATE answer lists {counts[0]}+{counts[1]} versions, not 1+1")
        fw, msg = answer.framework_versions[0], answer.message_versions[0]
        if fw not in self.framework_versions or msg not in self.message_versions:
            raise DeviceProtocolError(f"{self.name} NEGOTIATE answer chose framework {version_text(fw)} / "
                                      f"service {version_text(msg)}, which were not offered")
        self.framework_version, self.negotiated_version, self._done = fw, msg, True
        return []


def parse_response(name: str, packet: Incoming) -> tuple[IcHeader, bytes]:
    """Check one guest answer as OpenVMM ``IcPipe::read_message`` does: in-band, pipe DATA, a whole header,
    flags TRANSACTION|RESPONSE, transaction id 0."""
    if packet.type != PacketType.DATA_INBAND:
        raise DeviceProtocolError(f"{name} packet type {packet.type:#x}; IC answers are in-band")
    header, body = unpack_ic(packet.payload)
    if not header.is_response or header.transaction_id != 0:
        raise DeviceProtocolError(f"{name} answer is not a transaction response (icflags={header.flags:#x}, "
                                  f"ictransaction_id={header.transaction_id})")
    return header, body


version_text = major_minor_text


def describe_ic(payload: bytes) -> tuple[IcHeader, bytes, str]:
    """The common part of an IC ``--trace`` line: the message type, flags, status and (for NEGOTIATE) the
    versions. Returns (header, body, text) so a service can add its own body's fields."""
    header, body = unpack_ic(payload)
    flags = "|".join(f.name or "" for f in IcFlags if header.flags & f) or "0"
    text = f"{name_text('ICMSGTYPE_', IcMessageType, header.message_type)} icflags={flags}"
    if header.status:
        text += f" status={header.status:#x}"
    if header.message_type == IcMessageType.NEGOTIATE:
        n = Negotiate.unpack(body)
        text += (f" framework=[{', '.join(map(version_text, n.framework_versions))}]"
                 f" service=[{', '.join(map(version_text, n.message_versions))}]")
    else:
        text += f" framework={version_text(header.framework_version)} service={version_text(header.message_version)}"
    return header, body, text
