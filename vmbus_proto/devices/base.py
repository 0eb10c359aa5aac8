"""The sans-IO contract between a device protocol and its channel.

Follows OpenVMM's split (vm/devices/vmbus/vmbus_channel ``VmbusDevice`` / ``SimpleVmbusDevice``): a device
never sees control messages, only its offer, the open/close of its channel, and packets. Each device's wire
protocol and handshake state machine live once, in its module here, and both its VSP (parent) and VSC
(child) drive it.
"""

from __future__ import annotations

import abc
import enum
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..errors import DeviceProtocolError, LocalProtocolError, ProtocolError
from ..packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What a VSP offers and what a VSC expects of one device class."""

    name: str
    class_id: uuid.UUID
    default_instance: uuid.UUID
    pipe_mode: bool  # offered in named-pipe message mode (offer flag 0x10, user_def pipe_type 4)
    mmio_megabytes: int
    ring_bytes: int  # per-direction ring size a Linux guest opens with, header page included
    max_packet: int  # the guest driver's max_pkt_size: hosts must not send bigger in-band packets
    protocol: str = ""  # the device protocol's name as its README and trace print it: "VSTOR", "NVSP", ...
    version_text: Callable[[int], str] = hex  # a negotiated protocol version as people write it ("6.2")
    title: str = ""  # the teaching view (the demo's narration): what this channel's setup is called ...
    explain: str = ""  # ... and what happens in it, in a few sentences


def major_minor_text(version: int) -> str:
    """``major << 16 | minor`` as "major.minor" (NVSP, SYNTHHID, keyboard, VMBus itself)."""
    return f"{version >> 16}.{version & 0xFFFF}"


def name_text(prefix: str, names: type[enum.IntEnum], value: int) -> str:
    """A device message number as the Linux driver names it, with the number: ``SYNTHVID_VERSION_REQUEST(1)``."""
    try:
        return f"{prefix}{names(value).name}({value})"
    except ValueError:
        return f"{prefix}UNKNOWN({value})"


@dataclass(frozen=True, slots=True)
class Incoming:
    """One packet read off a channel's ring, as a device sees it."""

    type: int
    trans_id: int
    completion_requested: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One packet a device wants written to its channel's ring."""

    payload: bytes
    type: int = PacketType.DATA_INBAND
    trans_id: int = 0
    completion_requested: bool = False

    def to_packet(self) -> Packet:
        return Packet(self.type, FLAG_COMPLETION_REQUESTED if self.completion_requested else 0, self.trans_id,
                      self.payload)


class Handshake(abc.ABC):
    """One side (VSP or VSC) of a device's protocol-version handshake on one open channel.

    ``start()`` yields what this side sends first (a VSC's first request; usually nothing for a VSP).
    ``receive()`` consumes one packet and yields the replies. Malformed or out-of-order packets raise
    ``DeviceProtocolError`` unless the real protocol answers them (then the answer is returned).
    """

    negotiated_version: int | None = None

    @abc.abstractmethod
    def start(self) -> list[Outgoing]: ...

    @abc.abstractmethod
    def receive(self, packet: Incoming) -> list[Outgoing]: ...

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """The handshake finished successfully."""

    @property
    def failed(self) -> str | None:
        """Why the handshake can never finish (for a VSC: every version refused), else None."""
        return None


class VscVersionHandshake(Handshake):
    """The skeleton every VSC probe loop shares (Linux ``negotiate_nvsp_ver``, ``synthvid_connect_vsp``,
    ``mousevsc_connect_to_vsp``, ``hv_kbd_connect_to_vsp``): offer ``versions`` newest first, one request
    each, transaction ids counted from 1 (never 0); done once one is accepted, failed once all are refused.

    Subclasses name their protocol, build the request for the current candidate (``_request``) and parse
    the host's answers in ``receive`` after ``_receiving`` has checked the handshake's own state.
    """

    protocol: ClassVar[str]  # "NVSP", "synthvid", ...
    request_name: ClassVar[str]  # the request the guest sends first
    after_done: ClassVar[str] = "the running device"  # who owns packets once the handshake is over

    def __init__(self, versions: Sequence[int]) -> None:
        if not versions:
            raise LocalProtocolError(f"a VSC needs at least one {self.protocol} version to offer")
        self.versions: tuple[int, ...] = tuple(int(v) for v in versions)
        self.negotiated_version = None
        self._started = False
        self._done = False
        self._index = 0
        self._next_trans_id = 1
        self._failed: str | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> str | None:
        return self._failed

    @property
    def candidate(self) -> int:
        """The version currently offered."""
        return self.versions[self._index]

    def start(self) -> list[Outgoing]:
        if self._started:
            raise LocalProtocolError(f"{self.protocol} handshake already started")
        self._started = True
        return [self._request()]

    @abc.abstractmethod
    def _request(self) -> Outgoing:
        """The request offering ``candidate``."""

    def _trans_id(self) -> int:
        trans_id = self._next_trans_id
        self._next_trans_id += 1
        return trans_id

    def _receiving(self) -> bool:
        """Whether a packet is for this handshake: False once it failed (drop it); raises if it is over or
        has not started."""
        if self._failed is not None:
            return False
        if self._done:
            raise DeviceProtocolError(f"{self.protocol} handshake is over: this packet belongs to {self.after_done}")
        if not self._started:
            raise DeviceProtocolError(f"{self.protocol} packet before {self.request_name} was sent")
        return True

    def _refused(self, failure: str) -> list[Outgoing]:
        """The host refused ``candidate``: offer the next version, or fail with ``failure``."""
        self._index += 1
        if self._index < len(self.versions):
            return [self._request()]
        self._failed = failure
        return []


Describe = Callable[[bytes, int, "bytes | None"], str]


class HandshakeModule(Protocol):
    """What a device protocol module (``vmbus_proto.devices.<dev>.<protocol>``) gives its VSP and its VSC:
    the device's spec, the two sides of its handshake, and its packet decoder for ``--trace``."""

    @property
    def SPEC(self) -> DeviceSpec: ...

    @property
    def VspHandshake(self) -> Callable[..., Handshake]: ...

    @property
    def VscHandshake(self) -> Callable[..., Handshake]: ...

    @property
    def describe(self) -> Describe: ...


# ---- the teaching trace of a device's handshake packets ---------------------------------------------------


_PACKET_TEXT: dict[int, str] = {PacketType.DATA_INBAND: "VM_PKT_DATA_INBAND", PacketType.DATA_USING_GPA_DIRECT:
                "VM_PKT_DATA_USING_GPA_DIRECT", PacketType.DATA_USING_XFER_PAGES: "VM_PKT_DATA_USING_XFER_PAGES",
                PacketType.COMP: "VM_PKT_COMP"}
_MAX_REMEMBERED = 64


class HandshakeTrace:
    """One ``--trace`` line per device packet of a handshake, from either side of the channel.

    ``describe(payload, packet_type, request)`` is the device module's decoder; a completion is described
    together with the request it answers (matched by transaction id), since a VSTOR or NVSP completion
    means something only next to its request. Undecodable packets are described, never raised on.
    """

    def __init__(self, describe: Describe) -> None:
        self.describe = describe
        self._requests: dict[int, bytes] = {}

    def line(self, arrow: str, packet_type: int, trans_id: int, completion_requested: bool, payload: bytes) -> str:
        request = None
        if packet_type == PacketType.COMP:
            request = self._requests.pop(trans_id, None)
        elif completion_requested and len(self._requests) < _MAX_REMEMBERED:
            self._requests[trans_id] = bytes(payload)
        if packet_type == PacketType.COMP and not payload:
            text = "completion"  # hid-hyperv's and the keyboard's requests may get an empty one
        else:
            try:
                text = self.describe(payload, packet_type, request)
            except (ProtocolError, struct.error, ValueError) as exc:
                text = f"undecodable ({len(payload)} bytes: {exc})"
        kind = _PACKET_TEXT.get(packet_type, f"packet type {packet_type}")
        framing = f"{kind}, trans_id={trans_id:#x}" + (", completion requested" if completion_requested else "")
        return f"{arrow} {text}  [{framing}]"

    def sent(self, arrow: str, out: Outgoing) -> str:
        return self.line(arrow, out.type, out.trans_id, out.completion_requested, out.payload)

    def received(self, arrow: str, packet: Incoming) -> str:
        return self.line(arrow, packet.type, packet.trans_id, packet.completion_requested, packet.payload)
