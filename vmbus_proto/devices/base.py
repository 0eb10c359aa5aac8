"""The sans-IO contract between a device protocol and its channel.

Follows OpenVMM's split (vm/devices/vmbus/vmbus_channel ``VmbusDevice`` / ``SimpleVmbusDevice``): a device
never sees control messages, only its offer, the open/close of its channel, and packets. Each device's wire
protocol and handshake state machine live once, in its module here, and both its VSP (parent) and VSC
(child) drive it.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceProtocolError, LocalProtocolError
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
