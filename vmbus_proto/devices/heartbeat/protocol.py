"""The heartbeat integration service: the host asks "are you alive?" every few seconds and the guest answers.

After the IC NEGOTIATE (``ic.py``) the host sends ``ICMSGTYPE_HEARTBEAT`` requests carrying a sequence number;
the guest answers each in place with ``seq_num + 1``, flags TRANSACTION|RESPONSE and status S_OK. A guest that
stops answering is reported lost; one that answers again, resumed.

Mirrors Linux drivers/hv/hv_util.c (``heartbeat_onchannelcallback``, ``hb_versions`` 3.0 and 1.0, ``util_probe``
opening ``HV_UTIL_RING_SEND_SIZE`` = ``VMBUS_RING_SIZE(3 * HV_HYP_PAGE_SIZE)`` rings; "Every two seconds, Hyper-V
send us a heartbeat request message"), include/linux/hyperv.h (``HV_HEART_BEAT_GUID``,
``struct heartbeat_msg_data``) and OpenVMM vm/devices/hyperv_ic_protocol/src/heartbeat.rs
(``HeartbeatMessage``: ``sequence_number u64, application_state u32, reserved``; Linux names the same bytes
``u64 seq_num, u32 reserved[8]`` and checks only the first 8 of them). The offer is OpenVMM's IC offer
(hyperv_ic ``offer()``): a pipe in message mode, with Hyper-V's heartbeat instance id (as ``lsvmbus`` shows it
on Hyper-V guests).

The host side is sans-IO in aioquic's style: ``HeartbeatHost`` takes ``now`` and says when it next needs the
clock (``get_timer``/``handle_timer``); it keeps one request in flight, as OpenVMM's ICs do, so a guest that hangs
never has its ring filled with unanswered heartbeats.
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
from ...ring import vmbus_ring_size
from ..base import DeviceSpec, Incoming, Outgoing, major_minor_text
from .ic import (
    FRAMEWORK_VERSIONS_HOST,
    HV_S_OK,
    UTIL_FW_VERSIONS,
    IcFlags,
    IcGuest,
    IcHeader,
    IcHostNegotiation,
    IcMessageType,
    IcVscHandshake,
    describe_ic,
    pack_ic,
    parse_response,
    version,
)

__all__ = [
    "HB_VERSIONS",
    "HOST_VERSIONS",
    "SPEC",
    "ApplicationState",
    "HeartbeatEvent",
    "HeartbeatGuest",
    "HeartbeatHost",
    "HeartbeatMessage",
    "VscHandshake",
    "VspHandshake",
    "describe",
    "version_text",
]

HB_VERSIONS: tuple[int, ...] = (version(3, 0), version(1, 0))  # hv_util.c hb_versions: HB_VERSION, HB_VERSION_1
HOST_VERSIONS: tuple[int, ...] = (version(1, 0), version(3, 0))  # what our host offers, oldest first like OpenVMM
SEQ_MASK = (1 << 64) - 1
version_text = major_minor_text


class ApplicationState(enum.IntEnum):
    """OpenVMM ``ApplicationState`` (Linux leaves these bytes as the host sent them)."""

    UNKNOWN = 0
    HEALTHY = 1
    CRITICAL = 2
    STOPPED = 3


_HEARTBEAT = struct.Struct("<QII")
_SEQ = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class HeartbeatMessage:
    """The heartbeat body: OpenVMM ``HeartbeatMessage`` (16 bytes); Linux reads only ``seq_num``."""

    seq_num: int
    application_state: int = ApplicationState.UNKNOWN
    reserved: int = 0

    def pack(self) -> bytes:
        return _HEARTBEAT.pack(self.seq_num, self.application_state, self.reserved)

    @classmethod
    def unpack(cls, body: bytes) -> HeartbeatMessage:
        if len(body) < _SEQ.size:
            raise DeviceProtocolError(f"heartbeat body of {len(body)} bytes has no seq_num")
        if len(body) < _HEARTBEAT.size:
            return cls(_SEQ.unpack_from(body)[0])  # the host may not fill the rest (hv_util.c)
        return cls(*_HEARTBEAT.unpack_from(body))


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a heartbeat channel packet."""
    header, body, text = describe_ic(payload)
    if header.message_type == IcMessageType.HEARTBEAT:
        text += f" seq_num={HeartbeatMessage.unpack(body).seq_num}"
    return text


SPEC = DeviceSpec(
    name="heartbeat",
    class_id=guids.HEARTBEAT,
    default_instance=uuid.UUID("fd149e91-82e0-4a7d-afa6-2a4166cbd7c0"),  # Hyper-V's heartbeat instance (lsvmbus)
    pipe_mode=True,  # OpenVMM IC offer(): ChannelType::Pipe { message_mode: true }
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(3 * 4096),  # HV_UTIL_RING_SEND_SIZE = VMBUS_RING_SIZE(3 * HV_HYP_PAGE_SIZE)
    max_packet=4096,  # hv_util reads HV_HYP_PAGE_SIZE at most; max_pkt_size stays VMBUS_DEFAULT_MAX_PKT_SIZE
    protocol="IC",
    version_text=version_text,
    title="heartbeat: ring, open and the IC NEGOTIATE",
    explain=(
        "An integration service (Linux hv_util). The host speaks first: ICMSGTYPE_NEGOTIATE lists the "
        "framework and heartbeat versions it knows, and the guest answers in the same buffer with the newest "
        "of each it shares. Then every two seconds the host sends ICMSGTYPE_HEARTBEAT with a sequence number "
        "and the guest answers with that number plus one; a guest that stops answering is reported lost."),
)


# ---- the guest: hv_util.c heartbeat_onchannelcallback -------------------------------------------------------


class HeartbeatGuest(IcGuest):
    """hv_util's heartbeat service: NEGOTIATE through ``vmbus_prep_negotiate_resp`` with ``fw_versions`` and
    ``hb_versions``; each HEARTBEAT answered with ``seq_num += 1``. A heartbeat body shorter than its seq_num is
    dropped unanswered (Linux: "Invalid heartbeat msg data. Length too small")."""

    message_type = IcMessageType.HEARTBEAT
    service_versions = HB_VERSIONS
    name = "heartbeat"

    def __init__(self, fw_versions: Sequence[int] = UTIL_FW_VERSIONS,
                 service_versions: Sequence[int] | None = None) -> None:
        super().__init__(fw_versions, service_versions)
        self.last_seq: int | None = None  # the seq_num of the last answer
        self.answered = 0

    def on_message(self, body: bytearray) -> int | None:
        if len(body) < _SEQ.size:
            self.dropped.append(f"invalid heartbeat msg data: {len(body)} bytes, too small for seq_num")
            return None
        seq = (_SEQ.unpack_from(body)[0] + 1) & SEQ_MASK
        _SEQ.pack_into(body, 0, seq)
        self.last_seq = seq
        self.answered += 1
        return HV_S_OK


class VscHandshake(IcVscHandshake[HeartbeatGuest]):
    """The guest's side of the IC NEGOTIATE (``ic.IcVscHandshake``); the same ``guest`` then answers every
    heartbeat."""

    def __init__(self, fw_versions: Sequence[int] = UTIL_FW_VERSIONS,
                 versions: Sequence[int] = HB_VERSIONS) -> None:
        super().__init__(HeartbeatGuest(fw_versions, versions))


class VspHandshake(IcHostNegotiation):
    """The host's heartbeat NEGOTIATE (framework 1.0 and 3.0, heartbeat 1.0 and 3.0)."""

    def __init__(self, versions: Iterable[int] = HOST_VERSIONS,
                 framework_versions: Iterable[int] = FRAMEWORK_VERSIONS_HOST) -> None:
        super().__init__("heartbeat", versions, framework_versions)


# ---- the host: a heartbeat every ``interval`` seconds, one in flight ------------------------------------------


class HeartbeatEvent(enum.Enum):
    """What a ``HeartbeatHost`` reports, pulled with ``events()``."""

    NEGOTIATED = "negotiated"  # the versions are agreed; heartbeats start
    REFUSED = "refused"  # the guest knows none of our versions: no heartbeats on this channel
    STARTED = "started"  # the first answer
    ANSWERED = "answered"  # any later answer
    LOST = "lost"  # ``lost_after`` heartbeats in a row went unanswered
    RESUMED = "resumed"  # an answer after LOST


class HeartbeatHost:
    """The host's heartbeat on one open channel.

    ``start(now)`` gives the NEGOTIATE; ``receive(packet, now)`` takes each guest packet; ``get_timer()`` is
    when ``handle_timer(now)`` must run next (it sends the next heartbeat, or counts one more unanswered).
    Every ``interval`` seconds one HEARTBEAT goes out carrying the last answer's seq_num (0 first); the answer
    must carry that number plus one. While a request is unanswered no other is sent: each interval it stays
    unanswered is one miss, and after ``lost_after`` misses in a row the guest is LOST until it answers.
    A malformed answer, a wrong seq_num, a failure status or an answer nobody asked for is a
    DeviceProtocolError."""

    def __init__(self, interval: float = 2.0, lost_after: int = 3, versions: Iterable[int] = HOST_VERSIONS,
                 framework_versions: Iterable[int] = FRAMEWORK_VERSIONS_HOST) -> None:
        if interval <= 0 or lost_after < 1:
            raise ValueError("interval must be positive and lost_after at least 1")
        self.negotiation = VspHandshake(versions, framework_versions)
        self.interval = interval
        self.lost_after = lost_after
        self.seq = 0  # the next request's seq_num: the last answer's
        self.outstanding: int | None = None  # seq_num of the request in flight
        self.sent_at: float | None = None
        self.last_answer: float | None = None
        self.lost_since: float | None = None  # when the guest was last heard, once LOST
        self.answered = 0
        self.missed = 0  # intervals the request in flight has gone unanswered
        self._timer: float | None = None
        self._events: list[tuple[HeartbeatEvent, int | None]] = []

    @property
    def running(self) -> bool:
        return self.negotiation.done

    @property
    def refused(self) -> str | None:
        return self.negotiation.failed

    @property
    def lost(self) -> bool:
        return self.lost_since is not None

    @property
    def healthy(self) -> bool:
        return self.answered > 0 and not self.lost

    @property
    def version(self) -> int | None:
        return self.negotiation.negotiated_version

    def events(self) -> list[tuple[HeartbeatEvent, int | None]]:
        """What happened since the last call, each with the seq_num it concerns."""
        out, self._events = self._events, []
        return out

    def start(self, now: float) -> list[Outgoing]:
        return self.negotiation.start()

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> list[Outgoing]:
        if self._timer is None or now < self._timer:
            return []
        if self.outstanding is None:
            return self._request(now)
        self.missed += 1
        self._timer = now + self.interval
        if self.missed >= self.lost_after and not self.lost:
            self.lost_since = self.last_answer if self.last_answer is not None else self.sent_at
            self._events.append((HeartbeatEvent.LOST, self.seq))
        return []

    def receive(self, packet: Incoming, now: float) -> list[Outgoing]:
        if not self.running:
            if self.refused is not None:
                raise DeviceProtocolError("heartbeat packet after the guest refused every version")
            self.negotiation.receive(packet)
            if self.negotiation.done:
                self._events.append((HeartbeatEvent.NEGOTIATED, None))
                return self._request(now)
            if self.negotiation.failed is not None:
                self._events.append((HeartbeatEvent.REFUSED, None))
            return []
        header, body = parse_response("heartbeat", packet)
        if header.message_type != IcMessageType.HEARTBEAT:
            raise DeviceProtocolError(f"heartbeat channel answer of message type {header.message_type}")
        if self.outstanding is None:
            raise DeviceProtocolError("heartbeat answer with no heartbeat in flight")
        if header.status != HV_S_OK:
            raise DeviceProtocolError(f"guest answered heartbeat {self.outstanding} with status {header.status:#x}")
        seq = HeartbeatMessage.unpack(body).seq_num
        expected = (self.outstanding + 1) & SEQ_MASK
        if seq != expected:
            raise DeviceProtocolError(f"heartbeat answer seq_num {seq}, expected {expected}")
        first = self.answered == 0
        self.seq, self.outstanding, self.last_answer, self.missed = seq, None, now, 0
        self.answered += 1
        if self.lost:
            self.lost_since = None
            self._events.append((HeartbeatEvent.RESUMED, seq))
        else:
            self._events.append((HeartbeatEvent.STARTED if first else HeartbeatEvent.ANSWERED, seq))
        if self._timer is not None and now >= self._timer:
            return self._request(now)  # an answer later than the interval: the next one is due already
        return []

    def _request(self, now: float) -> list[Outgoing]:
        version_ = self.version or 0
        fw = self.negotiation.framework_version or 0
        body = HeartbeatMessage(self.seq).pack()
        header = IcHeader(fw, IcMessageType.HEARTBEAT, version_, len(body),
                          flags=IcFlags.TRANSACTION | IcFlags.REQUEST)
        self.outstanding, self.sent_at, self._timer = self.seq, now, now + self.interval
        return [Outgoing(pack_ic(header, body))]
