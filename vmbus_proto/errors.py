"""Error types of the VMBus protocol core.

Modelled on h11: one error type for a broken protocol, and the connection wrapper decides the blame.
``ProtocolError`` ends a peer's connection (a malformed frame, ring credit overrun); control messages that
are merely invalid in the current state are *not* errors here: the host core logs and drops them, as
OpenVMM vmbus_server/src/lib.rs ``handle_synic_message`` does.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the wire protocol; its connection must be closed."""


class FrameError(ProtocolError):
    """A frame could not be decoded: bad length, unknown kind, or an undecodable body."""


class MessageError(ProtocolError):
    """A control message body is malformed (missing or mistyped fields).

    ``msgtype`` and ``raw`` keep what could be decoded, so a host can still answer a request that a
    guest would otherwise wait on forever (a failed GPADL_CREATED for a malformed GPADL_HEADER).
    """

    def __init__(self, message: str, msgtype: int | None = None, raw: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.msgtype = msgtype
        self.raw = raw


class RingOverrunError(ProtocolError):
    """A writer put more bytes into a ring than the reader's credit allowed."""


class PacketError(ProtocolError):
    """A channel packet's descriptor or GPA ranges are malformed."""


class DeviceProtocolError(ProtocolError):
    """A device-level message (VSTOR, NVSP, SYNTHVID, SYNTHHID, keyboard) is malformed or out of order."""


class LocalProtocolError(Exception):
    """This side's own code tried something the protocol forbids (a bug, never the peer's fault)."""
