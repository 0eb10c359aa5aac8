"""The sans-IO contract between a device protocol and its channel.

Follows OpenVMM's split (vm/devices/vmbus/vmbus_channel ``VmbusDevice`` / ``SimpleVmbusDevice``): a device
never sees control messages, only its offer, the open/close of its channel, and packets. Each device's wire
protocol and handshake state machine live once, in its module here, and both its VSP (parent) and VSC
(child) drive it.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass

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
