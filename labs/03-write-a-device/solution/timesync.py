"""Lab 3 (reference solution): the time synchronization integration service, sans-IO.

The host tells the guest what time it is. After the IC NEGOTIATE (``vmbus_proto.devices.heartbeat.ic``) the
host sends ``ICMSGTYPE_TIMESYNC`` messages carrying its wall clock in 100 ns units since 1601-01-01 (Windows
FILETIME): one with ``ICTIMESYNCFLAG_SYNC`` when the channel opens ("set your clock"), then one with
``ICTIMESYNCFLAG_SAMPLE`` every few seconds ("here is a sample, discipline your clock if you like"). The guest
answers each in place (flags TRANSACTION|RESPONSE, status S_OK), as it answers every IC message.

Mirrors Linux include/linux/hyperv.h (``HV_TS_GUID``, ``ICTIMESYNCFLAG_*``, ``WLTIMEDELTA``,
``struct ictimesync_data``, ``struct ictimesync_ref_data``), drivers/hv/hv_util.c (``ts_versions`` 4.0, 3.0,
1.0; ``timesync_onchannelcallback``, ``adj_guesttime``) and OpenVMM vm/devices/hyperv_ic_protocol/src/
timesync.rs (``TimesyncMessage``, ``TimesyncMessageV4``: the same fields, padded to 8 bytes) with
vm/devices/hyperv_ic/src/timesync.rs (a SYNC after negotiation, then a SAMPLE every 5 seconds).

"VM reference time" is the partition's reference counter (100 ns ticks that host and guest read alike: the
reference TSC page). Here it is CLOCK_MONOTONIC, which every process on the machine reads alike.
"""

from __future__ import annotations

import enum
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vmbus_proto.devices.base import DeviceSpec, Incoming, Outgoing, major_minor_text
from vmbus_proto.devices.heartbeat.ic import (
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
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PacketType
from vmbus_proto.ring import vmbus_ring_size

CLASS_ID = uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")  # HV_TS_GUID
INSTANCE_ID = uuid.UUID("2dd1ce17-079e-403c-b352-a1921ee207ee")  # Hyper-V's timesync instance (lsvmbus)

TS_VERSIONS: tuple[int, ...] = (version(4, 0), version(3, 0), version(1, 0))  # hv_util.c ts_versions
HOST_VERSIONS: tuple[int, ...] = (version(1, 0), version(3, 0), version(4, 0))  # offered oldest first
TS_VERSION_3 = version(3, 0)  # newer than this: ictimesync_ref_data

WLTIMEDELTA = 116444736000000000  # 100 ns ticks from 1601-01-01 to 1970-01-01 (hyperv.h)
TICKS_PER_SECOND = 10_000_000


class TimesyncFlag(enum.IntEnum):
    """``ICTIMESYNCFLAG_*``."""

    PROBE = 0
    SYNC = 1
    SAMPLE = 2


_DATA = struct.Struct("<QQQB3x")  # OpenVMM TimesyncMessage: ictimesync_data and 3 reserved bytes
_DATA_MIN = 25  # sizeof(struct ictimesync_data), __packed: what Linux needs
_REF = struct.Struct("<QQBBB5x")  # OpenVMM TimesyncMessageV4: ictimesync_ref_data, padded to 24
_REF_MIN = 22  # sizeof(struct ictimesync_ref_data)


def to_wintime(unix_seconds: float) -> int:
    """Seconds since 1970 as 100 ns ticks since 1601 (what the host sends)."""
    return round(unix_seconds * TICKS_PER_SECOND) + WLTIMEDELTA


def from_wintime(ticks: int) -> float:
    """100 ns ticks since 1601 as seconds since 1970 (Linux ``reftime_to_ns``, in seconds)."""
    return (ticks - WLTIMEDELTA) / TICKS_PER_SECOND


def reference_time() -> int:
    """The partition reference counter, in 100 ns ticks."""
    return time.monotonic_ns() // 100


def host_clock(offset: float = 0.0) -> Callable[[], int]:
    """The host's wall clock as it sends it, ``offset`` seconds off the real one (a host whose clock is wrong)."""
    return lambda: to_wintime(time.time() + offset)


@dataclass(frozen=True, slots=True)
class TimesyncData:
    """``struct ictimesync_data`` (versions 1.0 and 3.0)."""

    parenttime: int
    childtime: int = 0
    roundtriptime: int = 0  # the host's last measured round trip, 100 ns ticks
    flags: int = TimesyncFlag.SYNC

    def pack(self) -> bytes:
        return _DATA.pack(self.parenttime, self.childtime, self.roundtriptime, self.flags)

    @classmethod
    def unpack(cls, body: bytes) -> TimesyncData:
        if len(body) < _DATA_MIN:
            raise DeviceProtocolError(f"ictimesync_data of {len(body)} bytes, need {_DATA_MIN}")
        parent, child, rtt = struct.unpack_from("<QQQ", body)
        return cls(parent, child, rtt, body[24])


@dataclass(frozen=True, slots=True)
class TimesyncRefData:
    """``struct ictimesync_ref_data`` (version 4.0)."""

    parenttime: int
    vmreferencetime: int  # the reference counter when the host read its clock
    flags: int = TimesyncFlag.SYNC
    leapflags: int = 0
    stratum: int = 0

    def pack(self) -> bytes:
        return _REF.pack(self.parenttime, self.vmreferencetime, self.flags, self.leapflags, self.stratum)

    @classmethod
    def unpack(cls, body: bytes) -> TimesyncRefData:
        if len(body) < _REF_MIN:
            raise DeviceProtocolError(f"ictimesync_ref_data of {len(body)} bytes, need {_REF_MIN}")
        return cls(*struct.unpack_from("<QQBBB", body))


TimesyncMessage = TimesyncData | TimesyncRefData


def encode_timesync(message: TimesyncMessage, framework_version: int, service_version: int) -> bytes:
    """A whole TIMESYNC request packet: pipe header, icmsg_hdr (TRANSACTION|REQUEST), body."""
    body = message.pack()
    header = IcHeader(framework_version, IcMessageType.TIMESYNC, service_version, len(body),
                      flags=IcFlags.TRANSACTION | IcFlags.REQUEST)
    return pack_ic(header, body)


def decode_timesync(body: bytes, service_version: int) -> TimesyncMessage:
    """A TIMESYNC body as the negotiated version lays it out; too short is a DeviceProtocolError."""
    if service_version > TS_VERSION_3:
        return TimesyncRefData.unpack(body)
    return TimesyncData.unpack(body)


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a timesync channel packet."""
    header, body, text = describe_ic(payload)
    if header.message_type == IcMessageType.TIMESYNC:
        msg = decode_timesync(body, header.message_version)
        flag = TimesyncFlag(msg.flags).name if msg.flags in iter(TimesyncFlag) else str(msg.flags)
        text += f" {flag} parenttime={msg.parenttime}"
    return text


SPEC = DeviceSpec(
    name="timesync",
    class_id=CLASS_ID,
    default_instance=INSTANCE_ID,
    pipe_mode=True,  # every IC is a message-mode pipe
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(3 * 4096),  # hv_util's HV_UTIL_RING_SEND_SIZE, as for every IC
    max_packet=4096,
    protocol="IC",
    version_text=major_minor_text,
    title="timesync: the IC NEGOTIATE, then SYNC and SAMPLE",
    explain="The host negotiates IC versions, sends its clock with ICTIMESYNCFLAG_SYNC, then a SAMPLE every "
            "few seconds; the guest answers each and computes how far its clock is from the host's.",
)


# ---- the guest: hv_util.c timesync_onchannelcallback ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeSample:
    """What the guest learned from one TIMESYNC message."""

    flags: int
    host_time: float  # the host's clock now, seconds since 1970 (adjusted for the time in flight)
    offset: float  # host clock minus guest clock, seconds


class TimesyncGuest(IcGuest):
    """hv_util's timesync service: answers every TIMESYNC with S_OK and keeps the host's time as
    ``adj_guesttime`` does, adding (on 4.0) the reference time that passed since the host read its clock.
    A body too short for the negotiated layout is dropped unanswered (Linux: "Invalid ictimesync data")."""

    message_type = IcMessageType.TIMESYNC
    service_versions = TS_VERSIONS
    name = "timesync"

    def __init__(self, fw_versions: Sequence[int] = UTIL_FW_VERSIONS, service_versions: Sequence[int] | None = None,
                 clock: Callable[[], float] = time.time, ref_clock: Callable[[], int] = reference_time) -> None:
        super().__init__(fw_versions, service_versions)
        self.clock, self.ref_clock = clock, ref_clock
        self.samples: list[TimeSample] = []  # new since the caller last took them

    def on_message(self, body: bytearray) -> int | None:
        """One TIMESYNC body (the answer is the same bytes): decode it in the negotiated layout, work out
        the host's time now and the offset from ``clock()``, append a TimeSample, return HV_S_OK. A body
        that does not decode: append why to ``dropped`` and return None (no answer)."""
        try:
            msg = decode_timesync(bytes(body), self.service_version or 0)
        except DeviceProtocolError as exc:
            self.dropped.append(f"invalid timesync message: {exc}")
            return None
        host = msg.parenttime
        if isinstance(msg, TimesyncRefData):
            host += self.ref_clock() - msg.vmreferencetime
        host_time = from_wintime(host)
        self.samples.append(TimeSample(msg.flags, host_time, host_time - self.clock()))
        return HV_S_OK


class VscHandshake(IcVscHandshake[TimesyncGuest]):
    """The guest's IC NEGOTIATE; its ``guest`` then answers every TIMESYNC."""

    def __init__(self, fw_versions: Sequence[int] = UTIL_FW_VERSIONS, versions: Sequence[int] = TS_VERSIONS) -> None:
        """A TimesyncGuest with these versions, handed to ``IcVscHandshake``."""
        super().__init__(TimesyncGuest(fw_versions, versions))


class VspHandshake(IcHostNegotiation):
    """The host's timesync NEGOTIATE (framework 1.0 and 3.0; timesync 1.0, 3.0 and 4.0)."""

    def __init__(self, versions: Iterable[int] = HOST_VERSIONS,
                 framework_versions: Iterable[int] = FRAMEWORK_VERSIONS_HOST) -> None:
        """``IcHostNegotiation`` for the service named "timesync"."""
        super().__init__("timesync", versions, framework_versions)


# ---- the host: OpenVMM hyperv_ic timesync -----------------------------------------------------------------


class TimesyncHost:
    """The host's timesync on one open channel, sans-IO: ``start(now)`` is the NEGOTIATE; once the guest has
    answered it, a SYNC goes out, then a SAMPLE every ``interval`` seconds (``get_timer``/``handle_timer``).
    One message is in flight at a time: a sample due while the last is unanswered is skipped. Each answer
    must be a TIMESYNC response with S_OK; its round trip is kept (and sent to pre-4.0 guests).

    ``clock()`` is the host's wall clock in 100 ns ticks since 1601, ``ref_clock()`` the reference counter."""

    def __init__(self, interval: float = 5.0, clock: Callable[[], int] | None = None,
                 ref_clock: Callable[[], int] = reference_time, versions: Iterable[int] = HOST_VERSIONS) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.negotiation = VspHandshake(versions)
        self.interval, self.clock, self.ref_clock = interval, clock or host_clock(), ref_clock
        self.outstanding: int | None = None  # the flags of the message in flight
        self.sent_at = 0.0
        self.round_trip: float | None = None  # seconds, the last answer's
        self.answered = 0
        self.skipped = 0
        self._timer: float | None = None
        self._answers: list[tuple[int, float]] = []

    @property
    def running(self) -> bool:
        return self.negotiation.done

    @property
    def version(self) -> int | None:
        return self.negotiation.negotiated_version

    def answers(self) -> list[tuple[int, float]]:
        """(flags, round trip in seconds) of each answer since the last call."""
        out, self._answers = self._answers, []
        return out

    def start(self, now: float) -> list[Outgoing]:
        return self.negotiation.start()

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> list[Outgoing]:
        """The timer ran out (``now`` >= ``get_timer()``): the next SAMPLE, or nothing (and count it in
        ``skipped``) while the last message is unanswered. Before the timer is due: nothing."""
        if self._timer is None or now < self._timer:
            return []
        if self.outstanding is not None:
            self.skipped += 1
            self._timer = now + self.interval
            return []
        return self._send(TimesyncFlag.SAMPLE, now)

    def receive(self, packet: Incoming, now: float) -> list[Outgoing]:
        """One packet from the guest. While negotiating it goes to ``negotiation`` (a guest that refuses every
        version is a DeviceProtocolError); once negotiated, send the SYNC (``_send``). After that it must
        answer the message in flight (``parse_response``: a TIMESYNC, status S_OK): keep its round trip
        and record ``(flags, round trip)`` for ``answers()``; anything else is a DeviceProtocolError."""
        if not self.running:
            self.negotiation.receive(packet)
            if self.negotiation.failed is not None:
                raise DeviceProtocolError(self.negotiation.failed)
            return self._send(TimesyncFlag.SYNC, now) if self.running else []
        header, _ = parse_response("timesync", packet)
        if header.message_type != IcMessageType.TIMESYNC:
            raise DeviceProtocolError(f"timesync channel answer of message type {header.message_type}")
        if self.outstanding is None:
            raise DeviceProtocolError("timesync answer with no message in flight")
        if header.status != HV_S_OK:
            raise DeviceProtocolError(f"guest answered timesync with status {header.status:#x}")
        self.round_trip = now - self.sent_at
        self._answers.append((self.outstanding, self.round_trip))
        self.outstanding = None
        self.answered += 1
        return []

    def message(self, flags: int) -> TimesyncMessage:
        """The message the host sends now, in the negotiated layout: after 3.0 a TimesyncRefData with the
        host's clock and the reference counter; else a TimesyncData with the clock and the last round trip
        in 100 ns ticks."""
        if (self.version or 0) > TS_VERSION_3:
            return TimesyncRefData(self.clock(), self.ref_clock(), flags)
        rtt = round((self.round_trip or 0.0) * TICKS_PER_SECOND)
        return TimesyncData(self.clock(), 0, rtt, flags)

    def _send(self, flags: int, now: float) -> list[Outgoing]:
        fw = self.negotiation.framework_version or 0
        payload = encode_timesync(self.message(flags), fw, self.version or 0)
        self.outstanding, self.sent_at, self._timer = flags, now, now + self.interval
        return [Outgoing(payload)]
