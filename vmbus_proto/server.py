"""The host (parent partition) side of the VMBus control plane, sans-IO: connection, channel and GPADL
state machines for one guest.

Mirrors OpenVMM vm/devices/vmbus/vmbus_server/src/channels.rs (``ConnectionState``, ``ChannelState``,
``GpadlState`` and their handlers) and the error policy of vmbus_server/src/lib.rs
``handle_synic_message``: an invalid message is logged and dropped, except GPADL errors (a failed
GPADL_CREATED; a GPADL_BODY for an id not in progress names no relid, so it is dropped) and MODIFYCHANNEL
errors (a failed MODIFYCHANNEL_RESPONSE from 5.3). Where OpenVMM drops a request that a Linux guest waits
on forever (OPENCHANNEL in a wrong state), we answer it with a failure instead (reference/vmbus-core.md §10).

A channel's state is one of the variants below (OpenVMM ``ChannelState``), each carrying only the data that
state has, so an impossible combination cannot be built. Inputs are method calls (``receive``,
``open_complete``, ``close_complete``, ``gpadl_released``, ``add_offer``, ``rescind``); outputs are pulled
with ``actions()``: messages to send, device requests (open, close, GPADL teardown; OpenVMM ``Action``),
and diagnostics. Device answers carry the sequence number (or GPADL id) of the request they answer; stale
answers are dropped.

Relids are given as OpenVMM gives channel ids: when the offers go out (the first REQUESTOFFERS of a
connection), in the order of (interface GUID, instance GUID, sub-channel index), lowest free relid first,
so the same devices get the same relids on every connection; a hot-added offer takes the lowest free relid.
"""

from __future__ import annotations

import array
import enum
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar, assert_never, overload

from . import messages as m
from .errors import MessageError
from .gpadl import Gpadl, GpadlAssembly
from .limits import Budget
from .messages import STATUS_SUCCESS, STATUS_UNSUCCESSFUL, VP_INDEX_DISABLE_INTERRUPT, ConnectionState, MsgType
from .pipe import PIPE_TYPE_MESSAGE
from .ring import ring_data_size
from .versions import HOST_SUPPORTED, VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_SINT, Version

MAX_CHANNELS = 2047  # OpenVMM channels.rs; Linux MAX_CHANNEL_RELIDS is 2048
FEATURES_SUPPORTED = 0  # Copper feature flags we implement (none of the optional ones yet)


class ConnState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    DISCONNECTING = "disconnecting"


class ChanState(enum.Enum):
    """The names of the channel state variants, for logs, traces and tables."""

    CLIENT_RELEASED = "client_released"  # offer not sent, or the guest released it
    CLOSED = "closed"  # offered, not open
    OPENING = "opening"  # device asked to open
    OPEN = "open"
    CLOSING = "closing"  # device asked to close
    CLOSING_REOPEN = "closing_reopen"  # guest re-opened while the close was pending
    REVOKED = "revoked"  # RESCIND sent, guest still holds the relid
    REOFFERED = "reoffered"  # revoked, then offered again before the guest released it
    CLOSING_CLIENT_RELEASE = "closing_client_release"
    OPENING_CLIENT_RELEASE = "opening_client_release"


class GpadlState(enum.Enum):
    IN_PROGRESS = "in_progress"
    ACCEPTED = "accepted"
    TEARDOWN_DEFERRED = "teardown_deferred"  # torn down while the ring of a live channel: waits for its close
    TEARING_DOWN = "tearing_down"  # the device was asked (TeardownGpadl): waits for gpadl_released


class DropKind(enum.Enum):
    """Why a guest message was dropped (OpenVMM ``ChannelError`` where it has one), for logs and counters."""

    WRONG_DIRECTION = "wrong_direction"  # a host-to-guest message sent by the guest
    NOT_CONNECTED = "not_connected"  # anything but INITIATE_CONTACT while not connected
    VERSION_TOO_OLD = "version_too_old"  # the message needs a newer negotiated version
    MALFORMED = "malformed"  # did not decode (OpenVMM ParseError)
    UNKNOWN_RELID = "unknown_relid"  # OpenVMM UnknownChannelId
    RELEASED_RELID = "released_relid"  # the guest released this relid (OpenVMM ChannelReleased)
    REVOKED_RELID = "revoked_relid"  # the host rescinded this relid
    WRONG_STATE = "wrong_state"  # OpenVMM InvalidChannelState / ChannelAlreadyOpen / ChannelNotOpen
    DUPLICATE_REQUEST_OFFERS = "duplicate_request_offers"  # OpenVMM OffersAlreadySent
    BAD_RING = "bad_ring"  # OPENCHANNEL's ring GPADL or offset is unusable
    GPADL_DUPLICATE_ID = "gpadl_duplicate_id"  # OpenVMM DuplicateGpadlId
    GPADL_LIMIT = "gpadl_limit"  # too many GPADLs on this connection
    GPADL_PAGES_LIMIT = "gpadl_pages_limit"  # the connection's GPADLs would describe too many pages
    MEMORY_BUDGET = "memory_budget"  # the parent-wide memory budget is spent
    GPADL_INVALID = "gpadl_invalid"  # bad header, ranges or size (OpenVMM InvalidGpaRange)
    GPA_OUTSIDE_MEMORY = "gpa_outside_memory"  # a GPADL names a page beyond the partition's memory map
    GPADL_UNKNOWN_ID = "gpadl_unknown_id"  # GPADL_BODY for an id not in progress (OpenVMM UnknownGpadlId)
    GPADL_NOT_ACCEPTED = "gpadl_not_accepted"  # teardown of a GPADL that is not accepted (InvalidGpadlState)
    GPADL_ON_REVOKED = "gpadl_on_revoked"  # a GPADL completed on a rescinded channel
    MODIFY_REJECTED = "modify_rejected"  # MODIFYCHANNEL refused (InvalidTargetVp, InterruptsDisabled, ...)


class DisconnectReason(enum.Enum):
    UNLOAD = "unload"  # the guest sent UNLOAD
    RESET = "reset"  # a new INITIATE_CONTACT while connected (OpenVMM request_disconnect(Reconnect))


@dataclass(frozen=True, slots=True)
class OfferSpec:
    """One device channel as the host offers it."""

    name: str
    if_type: uuid.UUID
    if_instance: uuid.UUID
    pipe_mode: bool = False
    mmio_megabytes: int = 0
    sub_channel_index: int = 0

    def message(self, relid: int) -> m.OfferChannel:
        user_def = PIPE_TYPE_MESSAGE.to_bytes(4, "little") if self.pipe_mode else b""
        flags = m.OFFER_NAMED_PIPE_MODE if self.pipe_mode else 0
        return m.OfferChannel(if_type=self.if_type, if_instance=self.if_instance, child_relid=relid,
                              connection_id=relid | (VMBUS_MESSAGE_SINT << 12), chn_flags=flags,
                              mmio_megabytes=self.mmio_megabytes, user_def=user_def,
                              sub_channel_index=self.sub_channel_index)

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID, int]:
        """OpenVMM ``OfferKey``, also the order offers go out in (channels.rs handle_request_offers sorts by
        interface id, then instance id; sub-channels share both and follow their primary by index)."""
        return (self.if_type, self.if_instance, self.sub_channel_index)


@dataclass(frozen=True, slots=True)
class OpenParams:
    """What a device needs to open its channel: the rings, from the OPENCHANNEL request."""

    relid: int
    openid: int
    gpadl: Gpadl
    downstream_offset: int  # pages of the guest-to-host ring, header page included
    target_vp: int
    userdata: bytes

    @property
    def guest_to_host_data(self) -> int:
        return ring_data_size(self.downstream_offset)

    @property
    def host_to_guest_data(self) -> int:
        return ring_data_size(self.gpadl.page_count - self.downstream_offset)


# ---- channel states (OpenVMM channels.rs ChannelState) ------------------------------------------------

class _State:
    __slots__ = ()
    kind: ClassVar[ChanState]

    @property
    def name(self) -> str:
        return self.kind.value


@dataclass(frozen=True, slots=True)
class DeviceOp:
    """A device request in flight on a rescinded channel: an open (``closing`` False) or a close."""

    seq: int
    params: OpenParams
    closing: bool


@dataclass(frozen=True, slots=True)
class ClientReleased(_State):
    """Not offered on this connection, or released by the guest."""

    kind: ClassVar[ChanState] = ChanState.CLIENT_RELEASED


@dataclass(frozen=True, slots=True)
class Closed(_State):
    """Offered to the guest, not open."""

    kind: ClassVar[ChanState] = ChanState.CLOSED


@dataclass(frozen=True, slots=True)
class Opening(_State):
    """The guest asked to open; the device was asked (request ``seq``)."""

    params: OpenParams
    seq: int
    kind: ClassVar[ChanState] = ChanState.OPENING


@dataclass(frozen=True, slots=True)
class Open(_State):
    params: OpenParams
    target_vp: int  # from OPENCHANNEL, changed by MODIFYCHANNEL
    kind: ClassVar[ChanState] = ChanState.OPEN


@dataclass(frozen=True, slots=True)
class Closing(_State):
    """The guest closed; the device was asked to close (request ``seq``)."""

    params: OpenParams
    seq: int
    kind: ClassVar[ChanState] = ChanState.CLOSING


@dataclass(frozen=True, slots=True)
class ClosingReopen(_State):
    """Closing, and the guest asked to open again: ``reopen`` runs once the close is done."""

    params: OpenParams
    seq: int
    reopen: m.OpenChannel
    kind: ClassVar[ChanState] = ChanState.CLOSING_REOPEN


@dataclass(frozen=True, slots=True)
class Revoked(_State):
    """RESCIND sent (or the guest had already released the relid). ``op`` is a device request still in
    flight; ``released``: the guest released the relid, so the channel is freed once ``op`` is answered."""

    op: DeviceOp | None = None
    released: bool = False
    kind: ClassVar[ChanState] = ChanState.REVOKED

    def __post_init__(self) -> None:
        if self.released and self.op is None:
            raise ValueError("a released, idle revoked channel is freed, not kept")


@dataclass(frozen=True, slots=True)
class Reoffered(_State):
    """Revoked, then offered again (``offer``) before the guest released the relid: offered under the same
    relid once the guest released it and the device is idle."""

    offer: OfferSpec
    op: DeviceOp | None = None
    released: bool = False
    kind: ClassVar[ChanState] = ChanState.REOFFERED

    def __post_init__(self) -> None:
        if self.released and self.op is None:
            raise ValueError("a released, idle reoffered channel is offered again, not kept")


@dataclass(frozen=True, slots=True)
class ClosingClientRelease(_State):
    """The guest released the relid (or unloaded) while the device's close (``seq``) is pending."""

    params: OpenParams
    seq: int
    kind: ClassVar[ChanState] = ChanState.CLOSING_CLIENT_RELEASE


@dataclass(frozen=True, slots=True)
class OpeningClientRelease(_State):
    """The guest unloaded while the device's open (``seq``) is pending: a successful open is closed again."""

    params: OpenParams
    seq: int
    kind: ClassVar[ChanState] = ChanState.OPENING_CLIENT_RELEASE


ChannelState = (ClientReleased | Closed | Opening | Open | Closing | ClosingReopen | Revoked | Reoffered
                | ClosingClientRelease | OpeningClientRelease)
CHANNEL_STATES: tuple[type[_State], ...] = (ClientReleased, Closed, Opening, Open, Closing, ClosingReopen,
                                            Revoked, Reoffered, ClosingClientRelease, OpeningClientRelease)


# ---- actions (outputs) ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    message: m.Message


@dataclass(frozen=True, slots=True)
class DeviceOpen:
    offer: OfferSpec
    params: OpenParams
    seq: int


@dataclass(frozen=True, slots=True)
class DeviceClose:
    offer: OfferSpec
    relid: int
    seq: int


@dataclass(frozen=True, slots=True)
class TeardownGpadl:
    """The guest tore down GPADL ``gpadl`` of ``relid`` (not the ring of a live channel): the device lets go of
    it and answers with ``HostConnection.gpadl_released(relid, gpadl)``; only then GPADL_TORNDOWN goes out
    (OpenVMM ``Action::TeardownGpadl`` / ``gpadl_teardown_complete``)."""

    offer: OfferSpec
    relid: int
    gpadl: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """A guest message that is invalid here; logged, and answered only where the protocol answers."""

    message: m.Message | None
    kind: DropKind
    reason: str  # the human text


@dataclass(frozen=True, slots=True)
class Connected:
    version: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: DisconnectReason


@dataclass(frozen=True, slots=True)
class ChannelFreed:
    """A rescinded channel's relid was released by the guest and is free again."""

    relid: int
    name: str


Action = Send | DeviceOpen | DeviceClose | TeardownGpadl | Dropped | Connected | Disconnected | ChannelFreed


@dataclass(slots=True)
class HostGpadl:
    gpadl: Gpadl
    state: GpadlState = GpadlState.ACCEPTED
    ring_users: int = 0


@dataclass(slots=True)
class HostChannel:
    offer: OfferSpec
    relid: int
    state: ChannelState = ClientReleased()
    primary: int | None = None  # a sub-channel's primary relid

    # Read-only views of the state, for shells, logs and tests.
    @property
    def kind(self) -> ChanState:
        return self.state.kind

    @property
    def params(self) -> OpenParams | None:
        """The rings while opening, open or closing (or while a rescinded channel's device holds them)."""
        match self.state:
            case Opening(params=p) | Open(params=p) | Closing(params=p) | ClosingReopen(params=p):
                return p
            case ClosingClientRelease(params=p) | OpeningClientRelease(params=p):
                return p
            case Revoked(op=op) | Reoffered(op=op):
                return op.params if op is not None else None
            case ClientReleased() | Closed():
                return None
            case _:
                assert_never(self.state)

    @property
    def seq(self) -> int:
        """The sequence number of the device open/close in flight, 0 if none."""
        match self.state:
            case Opening(seq=s) | Closing(seq=s) | ClosingReopen(seq=s):
                return s
            case ClosingClientRelease(seq=s) | OpeningClientRelease(seq=s):
                return s
            case Revoked(op=op) | Reoffered(op=op):
                return op.seq if op is not None else 0
            case ClientReleased() | Closed() | Open():
                return 0
            case _:
                assert_never(self.state)

    @property
    def device_busy(self) -> bool:
        """A device open or close is in flight."""
        return self.seq != 0

    @property
    def device_open(self) -> bool:
        """The device holds the channel open (open, or its close is still pending)."""
        match self.state:
            case Open() | Closing() | ClosingReopen() | ClosingClientRelease():
                return True
            case Revoked(op=op) | Reoffered(op=op):
                return op is not None and op.closing
            case ClientReleased() | Closed() | Opening() | OpeningClientRelease():
                return False
            case _:
                assert_never(self.state)

    @property
    def revoked(self) -> bool:
        return isinstance(self.state, Revoked | Reoffered)

    @property
    def released(self) -> bool:
        """The guest no longer holds the relid."""
        match self.state:
            case ClientReleased() | ClosingClientRelease() | OpeningClientRelease():
                return True
            case Revoked(released=r) | Reoffered(released=r):
                return r
            case Closed() | Opening() | Open() | Closing() | ClosingReopen():
                return False
            case _:
                assert_never(self.state)

    @property
    def reoffer(self) -> OfferSpec | None:
        return self.state.offer if isinstance(self.state, Reoffered) else None

    @property
    def reopen(self) -> m.OpenChannel | None:
        return self.state.reopen if isinstance(self.state, ClosingReopen) else None

    @property
    def target_vp(self) -> int | None:
        return self.state.target_vp if isinstance(self.state, Open) else None


# Drops that are a guest exceeding a limit (a strike toward ending its connection), not a protocol slip.
LIMIT_KINDS = frozenset({DropKind.GPADL_LIMIT, DropKind.GPADL_PAGES_LIMIT, DropKind.MEMORY_BUDGET})
PFN_BYTES = 40  # what the host holds per GPADL page: its PFN, a Python int (32 bytes) in a list (8)


@dataclass(slots=True)
class Limits:
    max_gpadls: int = 256  # per connection, in progress or complete
    max_gpadl_pages: int = 1 << 18  # 1 GiB of 4 KiB pages in one GPADL
    total_gpadl_pages: int = 1 << 18  # all of a connection's GPADLs together, in progress or complete
    budget: Budget | None = None  # parent-wide, or one partition's bytes charged to it (limits.py)
    pfn_bound: int = 1 << 64  # the partition's memory map ends at this page frame (its HELLO ``memory``)


K = TypeVar("K")
V = TypeVar("V")


class _PageTable(dict[K, V], Generic[K, V]):
    """GPADLs (accepted or in progress) that keep a count of the pages they describe and charge the PFN
    bytes to the memory budget; every way of removing an entry gives them back."""

    def __init__(self, pages_of: Callable[[V], int], budget: Budget | None) -> None:
        super().__init__()
        self.pages = 0
        self._pages_of = pages_of
        self._budget = budget

    def _count(self, value: V, sign: int) -> None:
        n = self._pages_of(value)
        self.pages += sign * n
        if self._budget is not None:
            (self._budget.take if sign > 0 else self._budget.give)(n * PFN_BYTES)

    def __setitem__(self, key: K, value: V) -> None:
        old = super().get(key)
        if old is not None:
            self._count(old, -1)
        super().__setitem__(key, value)
        self._count(value, 1)

    def __delitem__(self, key: K) -> None:
        self._count(self[key], -1)
        super().__delitem__(key)

    @overload  # type: ignore[override]
    def pop(self, key: K, /) -> V: ...

    @overload
    def pop(self, key: K, default: None, /) -> V | None: ...

    def pop(self, key: K, *default: None) -> V | None:
        if key in self:
            value = super().pop(key)
            self._count(value, -1)
            return value
        return default[0] if default else super().pop(key)

    def clear(self) -> None:
        for value in self.values():
            self._count(value, -1)
        super().clear()


class HostConnection:
    """The host's VMBus state for one guest connection."""

    def __init__(self, offers: Iterable[OfferSpec] = (), supported: Iterable[int] = HOST_SUPPORTED,
                 limits: Limits | None = None) -> None:
        self.supported = frozenset(int(v) for v in supported)
        self.limits = limits or Limits()
        self.state = ConnState.DISCONNECTED
        self.version = 0
        self.offers_sent = False
        self.channels: dict[int, HostChannel] = {}
        budget = self.limits.budget
        self.gpadls = _PageTable[tuple[int, int], HostGpadl](lambda g: g.gpadl.page_count, budget)  # (id, relid)
        self.in_progress = _PageTable[int, GpadlAssembly](lambda a: a.expected_pfns, budget)  # id -> assembly
        self._next_action: m.Message | None = None  # UNLOAD or INITIATE_CONTACT waiting for idle
        self._seq = 0
        self._out: list[Action] = []
        for offer in sorted(offers, key=lambda o: o.key):
            self.add_offer(offer)

    # ---- outputs ---------------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, msg: m.Message) -> None:
        self._out.append(Send(msg))

    def _drop(self, msg: m.Message | None, kind: DropKind, reason: str) -> None:
        self._out.append(Dropped(msg, kind, reason))

    # ---- read-only lookups -----------------------------------------------------------------------------

    def gpadl(self, relid: int, gpadl_id: int) -> Gpadl | None:
        """The accepted GPADL ``gpadl_id`` of ``relid``, or None (unknown, in progress or being torn down)."""
        g = self.gpadls.get((gpadl_id, relid))
        return g.gpadl if g is not None and g.state == GpadlState.ACCEPTED else None

    def channel_gpadls(self, relid: int) -> list[Gpadl]:
        """The accepted GPADLs of ``relid``."""
        return [g.gpadl for (_, rid), g in self.gpadls.items() if rid == relid and g.state == GpadlState.ACCEPTED]

    @property
    def gpadl_pages(self) -> int:
        """Pages described by this connection's GPADLs, accepted and in progress."""
        return self.gpadls.pages + self.in_progress.pages

    def release(self) -> None:
        """The connection is gone: its GPADLs go, and their bytes go back to the memory budget."""
        self.gpadls.clear()
        self.in_progress.clear()

    def subchannels(self, primary: int) -> list[HostChannel]:
        """The sub-channels linked to ``primary``, by sub-channel index."""
        return sorted((c for c in self.channels.values() if c.primary == primary),
                      key=lambda c: c.offer.sub_channel_index)

    # ---- host-side inputs ------------------------------------------------------------------------------

    def add_offer(self, offer: OfferSpec, primary: int | None = None) -> int:
        """Offer a device channel; returns its relid. Sent now if offers were already delivered (hot add).

        A sub-channel (``sub_channel_index`` >= 1) names its ``primary`` relid, which must be an offered or
        open primary of the same class and instance. Raises ValueError for an offer that cannot be made."""
        self._check_primary(offer, primary)
        for ch in self.channels.values():
            if ch.offer.key != offer.key:
                continue
            match ch.state:
                case Revoked(op=op, released=released):
                    ch.state, ch.primary = Reoffered(offer, op, released), primary
                    return ch.relid
                case _:
                    raise ValueError(f"{offer.name}: an offer with this class and instance exists")
        relid = self._free_relid()
        ch = HostChannel(offer, relid, primary=primary)
        self.channels[relid] = ch
        if self.state == ConnState.CONNECTED and self.offers_sent:
            ch.state = Closed()
            self._send(offer.message(relid))
        return relid

    def _check_primary(self, offer: OfferSpec, primary: int | None) -> None:
        if not offer.sub_channel_index:
            if primary is not None:
                raise ValueError(f"{offer.name}: a primary channel (sub-channel index 0) has no primary")
            return
        p = self.channels.get(primary) if primary is not None else None
        if p is None or p.primary is not None or p.offer.sub_channel_index:
            raise ValueError(f"{offer.name}: sub-channel {offer.sub_channel_index} needs the relid of its "
                             f"primary channel, not {primary}")
        if (p.offer.if_type, p.offer.if_instance) != (offer.if_type, offer.if_instance):
            raise ValueError(f"{offer.name}: a sub-channel has its primary's class and instance")
        if not isinstance(p.state, Closed | Opening | Open):
            raise ValueError(f"{offer.name}: primary relid {primary} is {p.state.name}, not offered or open")

    def _free_relid(self, taken: Iterable[int] = ()) -> int:
        used = set(self.channels) | set(taken)
        relid = next((i for i in range(1, MAX_CHANNELS + 1) if i not in used), 0)
        if not relid:
            raise ValueError("no free channel id")
        return relid

    def rescind(self, relid: int) -> None:
        """Hot-remove a device channel (OpenVMM ``revoke``). Its sub-channels are rescinded first, so the guest
        sees every sub-channel's RESCIND before the primary's (OpenVMM vmbus_channel channel.rs)."""
        ch = self.channels[relid]
        for sub in self.subchannels(relid):
            self.rescind(sub.relid)
        self._revoke(ch)
        self._check_disconnected()  # a disconnect may have waited on this channel's GPADL teardown

    def _revoke(self, ch: HostChannel) -> None:
        relid = ch.relid
        match ch.state:
            case Revoked():
                return
            case Reoffered(op=op, released=released):
                ch.state = Revoked(op, released)  # OpenVMM revoke: the pending re-offer is withdrawn
                return
            case ClientReleased():
                self._free(ch)
                return
            case ClosingClientRelease(params=p, seq=s) | OpeningClientRelease(params=p, seq=s):
                # The guest already let go; once the device answers, the channel is simply gone.
                self._revoke_gpadls(relid, guest_holds=False)
                ch.state = Revoked(DeviceOp(s, p, isinstance(ch.state, ClosingClientRelease)), released=True)
                return
            case Closed():
                ch.state = Revoked()
            case Opening(params=p, seq=s):
                ch.state = Revoked(DeviceOp(s, p, closing=False))  # the open's answer turns into a close
            case Open(params=p):
                ch.state = Revoked(DeviceOp(self._device_close(ch), p, closing=True))
            case Closing(params=p, seq=s) | ClosingReopen(params=p, seq=s):
                ch.state = Revoked(DeviceOp(s, p, closing=True))  # the close finishes, the re-open is dropped
            case _:
                assert_never(ch.state)
        self._send(m.RescindChannelOffer(child_relid=relid))
        self._revoke_gpadls(relid, guest_holds=True)

    def _revoke_gpadls(self, relid: int, guest_holds: bool) -> None:
        """OpenVMM ``revoke``: GPADLs in progress fail, teardowns waiting on the device are answered now."""
        for gid, asm in list(self.in_progress.items()):
            if asm.relid == relid:
                del self.in_progress[gid]
                if guest_holds:
                    self._send(m.GpadlCreated(child_relid=relid, gpadl=gid, creation_status=STATUS_UNSUCCESSFUL))
        for (gid, rid), g in list(self.gpadls.items()):
            if rid == relid and g.state in (GpadlState.TEARDOWN_DEFERRED, GpadlState.TEARING_DOWN):
                del self.gpadls[(gid, rid)]
                if guest_holds:
                    self._send(m.GpadlTorndown(gpadl=gid))

    def open_complete(self, relid: int, seq: int, ok: bool) -> None:
        """The device's answer to ``DeviceOpen`` number ``seq``."""
        ch = self.channels.get(relid)
        if ch is None or not seq:
            return
        match ch.state:
            case Opening(params=p, seq=s) if s == seq:
                if ok:
                    ch.state = Open(p, p.target_vp)
                    self._send(m.OpenChannelResult(child_relid=relid, openid=p.openid, status=STATUS_SUCCESS))
                else:
                    ch.state = Closed()
                    self._unuse_ring(ch, p)
                    self._send(m.OpenChannelResult(child_relid=relid, openid=p.openid,
                                                   status=STATUS_UNSUCCESSFUL))
            case OpeningClientRelease(params=p, seq=s) if s == seq:
                if ok:  # released while opening: the open turns into a close
                    ch.state = ClosingClientRelease(p, self._device_close(ch))
                else:
                    self._client_released(ch, p)
            case Revoked(op=DeviceOp(seq=s, params=p, closing=False), released=r) if s == seq:
                self._revoked_open_done(ch, None, p, r, ok)
            case Reoffered(offer=o, op=DeviceOp(seq=s, params=p, closing=False), released=r) if s == seq:
                self._revoked_open_done(ch, o, p, r, ok)
            case _:
                return  # stale

    def _revoked_open_done(self, ch: HostChannel, reoffer: OfferSpec | None, p: OpenParams, released: bool,
                           ok: bool) -> None:
        if ok:  # rescinded while opening: the open turns into a close
            self._set_revoked(ch, reoffer, DeviceOp(self._device_close(ch), p, closing=True), released)
        else:
            self._unuse_ring(ch, p)
            self._set_revoked(ch, reoffer, None, released)

    def close_complete(self, relid: int, seq: int) -> None:
        """The device's answer to ``DeviceClose`` number ``seq``."""
        ch = self.channels.get(relid)
        if ch is None or not seq:
            return
        match ch.state:
            case Closing(params=p, seq=s) if s == seq:
                ch.state = Closed()
                self._unuse_ring(ch, p)
            case ClosingReopen(params=p, seq=s, reopen=reopen) if s == seq:
                ch.state = Closed()
                self._unuse_ring(ch, p)
                self._open_channel(ch, reopen)
            case ClosingClientRelease(params=p, seq=s) if s == seq:
                self._client_released(ch, p)
            case Revoked(op=DeviceOp(seq=s, params=p, closing=True), released=r) if s == seq:
                self._unuse_ring(ch, p)
                self._set_revoked(ch, None, None, r)
            case Reoffered(offer=o, op=DeviceOp(seq=s, params=p, closing=True), released=r) if s == seq:
                self._unuse_ring(ch, p)
                self._set_revoked(ch, o, None, r)
            case _:
                return  # stale

    def gpadl_released(self, relid: int, gpadl: int) -> None:
        """The device's answer to ``TeardownGpadl``: it no longer uses the GPADL. GPADL_TORNDOWN goes out
        unless the guest released the relid meanwhile (OpenVMM ``gpadl_teardown_complete``). A stale or
        repeated call changes nothing."""
        g = self.gpadls.get((gpadl, relid))
        if g is None or g.state != GpadlState.TEARING_DOWN:
            return
        del self.gpadls[(gpadl, relid)]
        ch = self.channels.get(relid)
        if self.state == ConnState.CONNECTED and ch is not None and not ch.released:
            self._send(m.GpadlTorndown(gpadl=gpadl))
        self._check_disconnected()

    def _client_released(self, ch: HostChannel, params: OpenParams) -> None:
        """The device let go of a channel the guest released."""
        ch.state = ClientReleased()
        self._unuse_ring(ch, params)
        self._drop_channel_gpadls(ch.relid)
        self._check_disconnected()

    def _set_revoked(self, ch: HostChannel, reoffer: OfferSpec | None, op: DeviceOp | None,
                     released: bool) -> None:
        """A rescinded channel the guest released is freed, or re-offered under the same relid, once the
        device let go of it."""
        if op is not None or not released:
            ch.state = Revoked(op, released) if reoffer is None else Reoffered(reoffer, op, released)
        elif reoffer is None:
            self._free(ch)
        else:
            self._drop_channel_gpadls(ch.relid)
            ch.offer = reoffer
            if self.state == ConnState.CONNECTED and self.offers_sent:
                ch.state = Closed()
                self._send(ch.offer.message(ch.relid))
            else:
                ch.state = ClientReleased()
        self._check_disconnected()

    def _free(self, ch: HostChannel) -> None:
        self.channels.pop(ch.relid, None)
        for key in [k for k in self.gpadls if k[1] == ch.relid]:
            del self.gpadls[key]
        for sub in self.subchannels(ch.relid):
            sub.primary = None  # the relid may be reused; a leftover sub-channel is alone now
        self._out.append(ChannelFreed(ch.relid, ch.offer.name))

    def _device_close(self, ch: HostChannel) -> int:
        seq = self._next_seq()
        self._out.append(DeviceClose(ch.offer, ch.relid, seq))
        return seq

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _unuse_ring(self, ch: HostChannel, params: OpenParams) -> None:
        """The device no longer maps the ring: a teardown of it that waited is answered now."""
        key = (params.gpadl.gpadl, ch.relid)
        g = self.gpadls.get(key)
        if g is None or g.gpadl is not params.gpadl:
            return  # torn down meanwhile (a rescinded channel's ring), maybe its id already reused
        g.ring_users -= 1
        if g.ring_users == 0 and g.state == GpadlState.TEARDOWN_DEFERRED:
            del self.gpadls[key]
            if self.state == ConnState.CONNECTED and not ch.released:
                self._send(m.GpadlTorndown(gpadl=key[0]))

    # ---- guest messages --------------------------------------------------------------------------------

    def receive(self, msg: m.Message) -> None:
        """Handle one guest message. Never raises for the guest's mistakes: it drops and reports them."""
        t = msg.MSGTYPE
        if t not in m.GUEST_TO_HOST:
            self._drop(msg, DropKind.WRONG_DIRECTION, f"{t.name} is a host-to-guest message")
            return
        if t == MsgType.INITIATE_CONTACT:
            assert isinstance(msg, m.InitiateContact)
            self._on_initiate_contact(msg)
            return
        if self.state != ConnState.CONNECTED:
            self._drop(msg, DropKind.NOT_CONNECTED, f"{t.name} while {self.state.value}")
            return
        if self.version < m.MIN_VERSION.get(t, 0):
            self._drop(msg, DropKind.VERSION_TOO_OLD,
                       f"{t.name} needs a newer VMBus version than {Version(self.version).text}")
            return
        handler = _HANDLERS[t]
        handler(self, msg)

    def receive_malformed(self, err: MessageError) -> None:
        """A guest message that failed to decode. Dropped, but a GPADL the guest waits on is answered."""
        raw = err.raw or {}
        gid, relid = _u32(raw.get("gpadl")), _u32(raw.get("child_relid"))
        if self.state != ConnState.CONNECTED:
            gid = None  # no GPADL exists outside a connection: nothing to answer
        if err.msgtype == MsgType.GPADL_HEADER and gid is not None and relid is not None:
            self._send(m.GpadlCreated(child_relid=relid, gpadl=gid, creation_status=STATUS_UNSUCCESSFUL))
        elif err.msgtype == MsgType.GPADL_BODY and gid is not None and gid in self.in_progress:
            asm = self.in_progress.pop(gid)
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=gid, creation_status=STATUS_UNSUCCESSFUL))
        self._drop(None, DropKind.MALFORMED, str(err))

    def _channel(self, msg: m.Message, relid: int) -> HostChannel | None:
        ch = self.channels.get(relid)
        if ch is None:
            self._drop(msg, DropKind.UNKNOWN_RELID, f"unknown relid {relid}")
            return None
        return ch

    def _wrong_state(self, msg: m.Message, ch: HostChannel) -> None:
        kind = DropKind.RELEASED_RELID if ch.released else DropKind.WRONG_STATE
        self._drop(msg, kind, f"{msg.MSGTYPE.name} for relid {ch.relid} while {ch.state.name}")

    def _on_initiate_contact(self, msg: m.InitiateContact) -> None:
        if self.state == ConnState.DISCONNECTED:
            self._accept_contact(msg)
            return
        # A new INITIATE_CONTACT is an implicit reset (OpenVMM request_disconnect(Reconnect)).
        self._next_action = msg
        if self.state == ConnState.CONNECTED:
            self._begin_disconnect()
        else:
            self._check_disconnected()

    def _accept_contact(self, msg: m.InitiateContact) -> None:
        v = msg.vmbus_version_requested
        if v not in self.supported or v not in Version._value2member_map_:
            self._send(m.VersionResponse(version_supported=0))
            return
        if v >= Version.WIN10_V5 and msg.msg_sint != VMBUS_MESSAGE_SINT:
            self._send(m.VersionResponse(version_supported=0))
            return
        conn_id = VMBUS_MESSAGE_CONNECTION_ID if v >= Version.WIN10_V5 else v
        if (msg.monitor_page1 == 0) != (msg.monitor_page2 == 0):
            if v < Version.WIN8:  # failures cannot be reported before WIN8
                self._send(m.VersionResponse(version_supported=0))
            else:
                self._send(m.VersionResponse(version_supported=1, msg_conn_id=conn_id,
                                             connection_state=ConnectionState.FAILED_UNKNOWN_FAILURE))
            return
        features = msg.feature_flags & FEATURES_SUPPORTED if v >= Version.WIN10_V6_0 else 0
        self.state = ConnState.CONNECTED
        self.version = v
        self.offers_sent = False
        self._send(m.VersionResponse(version_supported=1, msg_conn_id=conn_id, supported_features=features))
        self._out.append(Connected(v))

    def _on_request_offers(self, msg: m.Message) -> None:
        if self.offers_sent:
            self._drop(msg, DropKind.DUPLICATE_REQUEST_OFFERS, "REQUESTOFFERS was already answered on this connection")
            return
        self.offers_sent = True
        self._assign_relids()
        for ch in sorted(self.channels.values(), key=lambda c: c.relid):
            if isinstance(ch.state, ClientReleased):
                ch.state = Closed()
                self._send(ch.offer.message(ch.relid))
        self._send(m.AllOffersDelivered())

    def _assign_relids(self) -> None:
        """OpenVMM handle_request_offers + prepare_channel: relids go to the channels in key order, lowest
        free relid first. Only channels no one holds are renumbered (at the first REQUESTOFFERS of a
        connection that is every channel: a disconnect releases them all)."""
        held = {r for r, ch in self.channels.items()
                if not isinstance(ch.state, ClientReleased) or any(k[1] == r for k in self.gpadls)}
        movable = sorted((ch for r, ch in self.channels.items() if r not in held), key=lambda c: c.offer.key)
        free = (i for i in range(1, MAX_CHANNELS + 1) if i not in held)
        new = {ch.relid: next(free) for ch in movable}
        for ch in movable:
            ch.relid = new[ch.relid]
        for ch in self.channels.values():
            if ch.primary is not None:
                ch.primary = new.get(ch.primary, ch.primary)
        self.channels = {ch.relid: ch for ch in self.channels.values()}

    def _on_gpadl_header(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlHeader)
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.released:
            self._gpadl_failed(msg, DropKind.UNKNOWN_RELID if ch is None else DropKind.RELEASED_RELID,
                               f"GPADL {msg.gpadl:#x} for unknown or released relid {msg.child_relid}")
            return
        if msg.gpadl in self.in_progress:
            self._gpadl_failed(msg, DropKind.GPADL_DUPLICATE_ID, f"duplicate in-progress GPADL id {msg.gpadl:#x}")
            return
        if (msg.gpadl, msg.child_relid) in self.gpadls:
            self._gpadl_failed(msg, DropKind.GPADL_DUPLICATE_ID,
                               f"GPADL id {msg.gpadl:#x} already exists on relid {msg.child_relid}")
            return
        if len(self.gpadls) + len(self.in_progress) >= self.limits.max_gpadls:
            self._gpadl_failed(msg, DropKind.GPADL_LIMIT, f"GPADL limit of {self.limits.max_gpadls} reached")
            return
        try:
            asm = GpadlAssembly.from_header(msg)
        except MessageError as exc:
            self._gpadl_failed(msg, DropKind.GPADL_INVALID, str(exc))
            return
        pages = asm.expected_pfns
        if pages > self.limits.max_gpadl_pages:
            self._gpadl_failed(msg, DropKind.GPADL_INVALID,
                               f"GPADL of {pages} pages exceeds {self.limits.max_gpadl_pages}")
            return
        held = self.gpadl_pages
        if held + pages > self.limits.total_gpadl_pages:
            self._gpadl_failed(msg, DropKind.GPADL_PAGES_LIMIT,
                               f"GPADL of {pages} pages would make {held + pages} pages on this connection; "
                               f"the limit is {self.limits.total_gpadl_pages}")
            return
        budget = self.limits.budget
        if budget is not None and not budget.fits(pages * PFN_BYTES):
            self._gpadl_failed(msg, DropKind.MEMORY_BUDGET,
                               f"GPADL of {pages} pages refused: {budget.refusal(pages * PFN_BYTES)}")
            return
        self._gpadl_progress(asm, msg)

    def _on_gpadl_body(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlBody)
        asm = self.in_progress.get(msg.gpadl)
        if asm is None:
            # OpenVMM handle_gpadl_body: UnknownGpadlId, no reply (there is no relid to answer). A GPADL that
            # completed has left the in-progress map, so a late body lands here too and leaves it intact.
            done = sorted(relid for gid, relid in self.gpadls if gid == msg.gpadl)
            note = f" (not in progress; complete on relid {', '.join(map(str, done))})" if done else ""
            self._drop(msg, DropKind.GPADL_UNKNOWN_ID, f"GPADL_BODY for unknown GPADL id {msg.gpadl:#x}{note}")
            return
        try:
            asm.add(msg.pfns)
        except MessageError as exc:
            del self.in_progress[msg.gpadl]
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=msg.gpadl, creation_status=STATUS_UNSUCCESSFUL))
            self._drop(msg, DropKind.GPADL_INVALID, str(exc))
            return
        self._gpadl_progress(asm, msg)

    def _gpadl_progress(self, asm: GpadlAssembly, msg: m.Message) -> None:
        if not asm.complete:
            self.in_progress[asm.gpadl] = asm
            return
        self.in_progress.pop(asm.gpadl, None)
        ch = self.channels.get(asm.relid)
        if ch is None or ch.revoked:
            # OpenVMM channels.rs gpadl_updated: a GPADL that completes on a revoked channel is answered
            # GPADL_CREATED(STATUS_UNSUCCESSFUL) and removed, so a later teardown of it is an unknown GPADL.
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=asm.gpadl, creation_status=STATUS_UNSUCCESSFUL))
            self._drop(msg, DropKind.GPADL_ON_REVOKED, f"GPADL {asm.gpadl:#x} completed on rescinded relid {asm.relid}")
            return
        pfns = array.array("Q", asm.pfns)  # 8 bytes a page: a netvsc receive buffer is 4,096 of them
        if pfns and max(pfns) >= self.limits.pfn_bound:
            # Hyper-V refuses a GPADL naming a page outside the guest's memory map (OpenVMM InvalidGpaRange).
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=asm.gpadl, creation_status=STATUS_UNSUCCESSFUL))
            self._drop(msg, DropKind.GPA_OUTSIDE_MEMORY,
                       f"GPADL {asm.gpadl:#x} names page {max(pfns):#x}, outside the partition's guest memory "
                       f"(pages below {self.limits.pfn_bound:#x})")
            return
        self.gpadls[(asm.gpadl, asm.relid)] = HostGpadl(Gpadl(asm.relid, asm.gpadl, asm.ranges, pfns))
        self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=asm.gpadl, creation_status=STATUS_SUCCESS))

    def _gpadl_failed(self, msg: m.GpadlHeader, kind: DropKind, reason: str) -> None:
        self._send(m.GpadlCreated(child_relid=msg.child_relid, gpadl=msg.gpadl, creation_status=STATUS_UNSUCCESSFUL))
        self._drop(msg, kind, reason)

    def _on_gpadl_teardown(self, msg: m.Message) -> None:
        """OpenVMM handle_gpadl_teardown: on a revoked channel answered at once; otherwise the device lets go
        first -- the ring of a live channel when that channel closes, any other GPADL via TeardownGpadl."""
        assert isinstance(msg, m.GpadlTeardown)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        if ch.released:
            self._drop(msg, DropKind.RELEASED_RELID,
                       f"GPADL_TEARDOWN for relid {ch.relid}, which the guest released")
            return
        key = (msg.gpadl, msg.child_relid)
        g = self.gpadls.get(key)
        if g is None or g.state != GpadlState.ACCEPTED:
            self._drop(msg, DropKind.GPADL_NOT_ACCEPTED,
                       f"GPADL {msg.gpadl:#x} on relid {msg.child_relid} is not an accepted GPADL")
            return
        if ch.revoked:
            del self.gpadls[key]
            self._send(m.GpadlTorndown(gpadl=msg.gpadl))
        elif g.ring_users:
            g.state = GpadlState.TEARDOWN_DEFERRED  # answered once the ring using it is closed
        else:
            g.state = GpadlState.TEARING_DOWN
            self._out.append(TeardownGpadl(ch.offer, ch.relid, msg.gpadl))

    def _on_open_channel(self, msg: m.Message) -> None:
        assert isinstance(msg, m.OpenChannel)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        match ch.state:
            case Closed():
                self._open_channel(ch, msg)
            case Closing(params=p, seq=s):
                ch.state = ClosingReopen(p, s, msg)
            case Revoked() | Reoffered():
                self._drop(msg, DropKind.REVOKED_RELID, f"OPENCHANNEL for rescinded relid {ch.relid} ignored")
            case Open() | ClosingReopen():
                self._open_failed(msg, DropKind.WRONG_STATE,
                                  f"OPENCHANNEL for relid {ch.relid} while {ch.state.name}")
            case Opening() | ClientReleased() | ClosingClientRelease() | OpeningClientRelease():
                # OPENING: the pending open will be answered; released: the guest does not know the relid.
                self._wrong_state(msg, ch)
            case _:
                assert_never(ch.state)

    def _open_channel(self, ch: HostChannel, msg: m.OpenChannel) -> None:
        g = self.gpadls.get((msg.ringbuffer_gpadlhandle, msg.child_relid))
        reason = None
        if g is None:
            reason = f"ring GPADL {msg.ringbuffer_gpadlhandle:#x} does not exist on relid {msg.child_relid}"
        elif g.state != GpadlState.ACCEPTED:
            reason = f"ring GPADL {msg.ringbuffer_gpadlhandle:#x} is being torn down"
        elif not g.gpadl.is_ring_shaped:
            reason = "ring GPADL must be one page-aligned range of whole pages"
        elif not 2 <= msg.downstream_ringbuffer_pageoffset <= g.gpadl.page_count - 2:
            reason = (f"downstream offset {msg.downstream_ringbuffer_pageoffset} leaves a ring without a "
                      f"header and a data page in {g.gpadl.page_count} pages")
        if reason is not None or g is None:
            self._open_failed(msg, DropKind.BAD_RING, reason or "")
            return
        g.ring_users += 1
        params = OpenParams(relid=ch.relid, openid=msg.openid, gpadl=g.gpadl,
                            downstream_offset=msg.downstream_ringbuffer_pageoffset,
                            target_vp=msg.target_vp, userdata=msg.userdata)
        ch.state = Opening(params, self._next_seq())
        self._out.append(DeviceOpen(ch.offer, params, ch.state.seq))

    def _open_failed(self, msg: m.OpenChannel, kind: DropKind, reason: str) -> None:
        self._send(m.OpenChannelResult(child_relid=msg.child_relid, openid=msg.openid, status=STATUS_UNSUCCESSFUL))
        self._drop(msg, kind, reason)

    def _on_close_channel(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CloseChannel)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        match ch.state:
            case Open(params=p):
                # OpenVMM: the device's close of a primary revokes its sub-channels first.
                self._rescind_subchannels(ch)
                ch.state = Closing(p, self._device_close(ch))
            case Revoked() | Reoffered():
                pass  # a rescinded guest still closes; nothing to do
            case _:
                self._wrong_state(msg, ch)

    def _rescind_subchannels(self, ch: HostChannel) -> None:
        for sub in self.subchannels(ch.relid):
            self.rescind(sub.relid)

    def _on_relid_released(self, msg: m.Message) -> None:
        assert isinstance(msg, m.RelidReleased)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        match ch.state:
            case Closed():
                self._rescind_subchannels(ch)
                ch.state = ClientReleased()
                self._drop_channel_gpadls(ch.relid)
            case Revoked(op=op) | Reoffered(op=op):
                self._drop_channel_gpadls(ch.relid)
                self._set_revoked(ch, ch.reoffer, op, True)
            case Closing(params=p, seq=s):
                ch.state = ClosingClientRelease(p, s)
                self._drop_channel_gpadls(ch.relid)
            case _:
                self._wrong_state(msg, ch)

    def _drop_channel_gpadls(self, relid: int) -> None:
        """The guest let go of a relid: its GPADLs go, except a ring still mapped and a teardown the device
        has not answered yet (OpenVMM client_release_channel keeps TearingDown)."""
        for gid in [g for g, a in self.in_progress.items() if a.relid == relid]:
            del self.in_progress[gid]
        for key in [k for k, g in self.gpadls.items()
                    if k[1] == relid and g.ring_users == 0 and g.state != GpadlState.TEARING_DOWN]:
            del self.gpadls[key]

    def _on_unload(self, msg: m.Message) -> None:
        self._next_action = msg
        self._begin_disconnect()

    def _on_modify_channel(self, msg: m.Message) -> None:
        """OpenVMM channels.rs ``modify_channel``: the new target may not disable interrupts, and the channel
        must be open, with interrupts enabled when it was opened. Answered (either way) only from 5.3."""
        assert isinstance(msg, m.ModifyChannel)
        ch = self.channels.get(msg.child_relid)
        reason = None
        if msg.target_vp == VP_INDEX_DISABLE_INTERRUPT:
            reason = "target_vp 0xFFFFFFFF cannot disable interrupts"  # OpenVMM InvalidTargetVp
        elif ch is None:
            reason = "unknown relid"
        elif not isinstance(ch.state, Open):
            reason = f"channel {ch.state.name}"  # OpenVMM InvalidChannelState
        elif ch.state.target_vp == VP_INDEX_DISABLE_INTERRUPT:
            reason = "channel opened with target_vp 0xFFFFFFFF (interrupts disabled)"  # OpenVMM InterruptsDisabled
        if reason is None and ch is not None and isinstance(ch.state, Open):
            ch.state = Open(ch.state.params, msg.target_vp)
        else:
            self._drop(msg, DropKind.MODIFY_REJECTED, f"MODIFYCHANNEL for relid {msg.child_relid}: {reason}")
        if self.version >= Version.WIN10_V5_3:
            self._send(m.ModifyChannelResponse(child_relid=msg.child_relid,
                                               status=0 if reason is None else STATUS_UNSUCCESSFUL - (1 << 32)))

    # ---- disconnect (UNLOAD / reset) -------------------------------------------------------------------

    def _begin_disconnect(self) -> None:
        self.state = ConnState.DISCONNECTING
        self.in_progress.clear()
        for ch in list(self.channels.values()):
            self._client_release(ch)
        # OpenVMM: closing a primary revokes its sub-channels; revoking a released channel removes it, so
        # sub-channels are not offered again on the next connection (the device offers them when asked).
        for ch in list(self.channels.values()):
            if ch.primary is not None and ch.relid in self.channels:
                self.rescind(ch.relid)
        self._check_disconnected()

    def _client_release(self, ch: HostChannel) -> None:
        match ch.state:
            case Closed():
                ch.state = ClientReleased()
            case Open(params=p):
                ch.state = ClosingClientRelease(p, self._device_close(ch))
            case Closing(params=p, seq=s) | ClosingReopen(params=p, seq=s):
                ch.state = ClosingClientRelease(p, s)
            case Opening(params=p, seq=s):
                ch.state = OpeningClientRelease(p, s)
            case Revoked(op=op) | Reoffered(op=op):
                self._set_revoked(ch, ch.reoffer, op, True)
            case ClientReleased() | ClosingClientRelease() | OpeningClientRelease():
                pass
            case _:
                assert_never(ch.state)
        self._drop_channel_gpadls(ch.relid)

    def _idle(self) -> bool:
        """Every relid released and no device request in flight: no channel open or being opened/closed, no
        GPADL teardown pending (OpenVMM are_channels_reset)."""
        return (all(ch.released and not (ch.device_busy or ch.device_open) for ch in self.channels.values())
                and not any(g.state == GpadlState.TEARING_DOWN for g in self.gpadls.values()))

    def _check_disconnected(self) -> None:
        if self.state != ConnState.DISCONNECTING or not self._idle():
            return
        for ch in list(self.channels.values()):
            if isinstance(ch.state, Revoked):
                self._free(ch)  # an unload or reset releases every relid the guest held
        self.gpadls.clear()
        self.in_progress.clear()
        self.state = ConnState.DISCONNECTED
        self.offers_sent = False
        action, self._next_action = self._next_action, None
        if isinstance(action, m.InitiateContact):
            self._out.append(Disconnected(DisconnectReason.RESET))
            self._accept_contact(action)
        else:
            if self.version >= Version.WIN7:
                self._send(m.UnloadResponse())
            self._out.append(Disconnected(DisconnectReason.UNLOAD))
            self.version = 0

    # ---- host shutdown / peer loss ---------------------------------------------------------------------

    def open_channels(self) -> list[HostChannel]:
        return [c for c in self.channels.values() if c.device_open or c.device_busy]


def _u32(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF else None


_HANDLERS = {
    MsgType.REQUESTOFFERS: HostConnection._on_request_offers,
    MsgType.GPADL_HEADER: HostConnection._on_gpadl_header,
    MsgType.GPADL_BODY: HostConnection._on_gpadl_body,
    MsgType.GPADL_TEARDOWN: HostConnection._on_gpadl_teardown,
    MsgType.OPENCHANNEL: HostConnection._on_open_channel,
    MsgType.CLOSECHANNEL: HostConnection._on_close_channel,
    MsgType.RELID_RELEASED: HostConnection._on_relid_released,
    MsgType.UNLOAD: HostConnection._on_unload,
    MsgType.MODIFYCHANNEL: HostConnection._on_modify_channel,
}
