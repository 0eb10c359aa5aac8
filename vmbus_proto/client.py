"""The guest (child partition) side of the VMBus control plane, sans-IO.

Mirrors Linux drivers/hv/connection.c (``vmbus_connect``: INITIATE_CONTACT for each of ``vmbus_versions[]``
newest first, falling back on a not-supported VERSION_RESPONSE; ``vmbus_negotiate_version``: the interrupt
page below 5.0, msg_sint from 5.0, both monitor pages always, and only ``version_supported`` decides),
drivers/hv/channel_mgmt.c (offers, rescind, ``vmbus_onoffer`` and friends, ``enum vmbus_channel_state``
OFFER → OPENING → OPENED; ``vmbus_initiate_unload``: no UNLOAD below 3.0) and drivers/hv/channel.c
(``__vmbus_open``, ``vmbus_close_internal``: CLOSECHANNEL, then GPADL_TEARDOWN; a rescinded channel skips
the teardown and sends RELID_RELEASED), and OpenVMM vmbus_client/src/lib.rs.

Time is passed in (aioquic style): every request the guest waits on is recorded with its deadline;
``get_timer()`` tells when to call ``handle_timer(now)``, which reports requests the host never answered.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import messages as m
from .errors import LocalProtocolError
from .gpadl import FIRST_GPADL_HANDLE, split
from .messages import STATUS_SUCCESS, MsgType
from .versions import GUEST_ORDER, VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_SINT, Version, version_text

DEFAULT_TIMEOUT = 30.0


class GuestConnState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONTACTING = "contacting"  # INITIATE_CONTACT sent, waiting for VERSION_RESPONSE
    REQUESTING_OFFERS = "requesting_offers"
    READY = "ready"  # ALLOFFERS_DELIVERED seen
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"  # no version accepted


class GuestChanState(enum.Enum):
    OFFERED = "offered"  # Linux CHANNEL_OFFER_STATE / CHANNEL_OPEN_STATE: ready to open
    OPENING = "opening"
    OPEN = "open"


class GpadlState(enum.StrEnum):
    """A GPADL of one channel, as the guest sees it."""

    CREATING = "creating"  # GPADL_HEADER (+ BODY) sent, waiting for GPADL_CREATED
    CREATED = "created"
    TEARING_DOWN = "tearing_down"  # GPADL_TEARDOWN sent, waiting for GPADL_TORNDOWN


class Request(enum.StrEnum):
    """What a guest request waits for (the host's answer); the key of a deadline and of ``TimedOut``."""

    VERSION = "version"  # VERSION_RESPONSE, keyed by the version asked for
    OFFERS = "offers"  # ALLOFFERS_DELIVERED
    GPADL = "gpadl"  # GPADL_CREATED, keyed by GPADL id
    OPEN = "open"  # OPENCHANNEL_RESULT, keyed by relid
    TEARDOWN = "teardown"  # GPADL_TORNDOWN, keyed by GPADL id
    MODIFY = "modify"  # MODIFYCHANNEL_RESPONSE, keyed by relid
    UNLOAD = "unload"  # UNLOAD_RESPONSE


@dataclass(frozen=True, slots=True)
class ConnectionPages:
    """The guest pages ``vmbus_connect`` allocates and names in INITIATE_CONTACT, as guest physical addresses:
    the interrupt page (sent below 5.0 only) and the two monitor pages (parent→child, child→parent)."""

    int_page: int
    monitor_page1: int
    monitor_page2: int

    @classmethod
    def from_pfns(cls, int_page: int, monitor_page1: int, monitor_page2: int) -> ConnectionPages:
        return cls(int_page << 12, monitor_page1 << 12, monitor_page2 << 12)


# ---- events --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VersionNegotiated:
    version: int
    msg_conn_id: int


@dataclass(frozen=True, slots=True)
class VersionRefused:
    """Every version was refused, or the host reported a connection failure."""

    reason: str


@dataclass(frozen=True, slots=True)
class OfferReceived:
    offer: m.OfferChannel


@dataclass(frozen=True, slots=True)
class AllOffersDelivered:
    pass


@dataclass(frozen=True, slots=True)
class GpadlCreated:
    relid: int
    gpadl: int
    ok: bool
    status: int


@dataclass(frozen=True, slots=True)
class OpenResult:
    relid: int
    ok: bool
    status: int


@dataclass(frozen=True, slots=True)
class GpadlTorndown:
    relid: int
    gpadl: int


@dataclass(frozen=True, slots=True)
class Rescinded:
    relid: int


@dataclass(frozen=True, slots=True)
class UnloadComplete:
    pass


@dataclass(frozen=True, slots=True)
class ModifyChannelResult:
    relid: int
    status: int


@dataclass(frozen=True, slots=True)
class Unexpected:
    """A host message that makes no sense here; logged and dropped."""

    message: m.Message
    reason: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    """A request the host never answered, and ``key`` the version, GPADL id or relid it was about."""

    what: Request
    key: int


Event = (VersionNegotiated | VersionRefused | OfferReceived | AllOffersDelivered | GpadlCreated | OpenResult
         | GpadlTorndown | Rescinded | UnloadComplete | ModifyChannelResult | Unexpected | TimedOut)


@dataclass(slots=True)
class GuestChannel:
    offer: m.OfferChannel
    state: GuestChanState = GuestChanState.OFFERED
    rescinded: bool = False
    openid: int = 0
    ring_gpadl: int | None = None
    gpadls: dict[int, GpadlState] = field(default_factory=dict)

    @property
    def relid(self) -> int:
        return self.offer.child_relid


class GuestConnection:
    """The guest's VMBus state. Commands queue messages; ``receive`` turns host messages into events."""

    def __init__(self, pages: ConnectionPages, versions: Iterable[int] = GUEST_ORDER,
                 timeout: float = DEFAULT_TIMEOUT, first_gpadl: int = FIRST_GPADL_HANDLE) -> None:
        self.versions = [int(v) for v in versions]
        if not self.versions:
            raise ValueError("at least one VMBus version to try")
        if not (pages.int_page and pages.monitor_page1 and pages.monitor_page2):
            raise ValueError("the interrupt page and both monitor pages need a guest physical address")
        self.pages = pages
        self.timeout = timeout
        self.state = GuestConnState.DISCONNECTED
        self.version = 0
        self.msg_conn_id = 0
        self.channels: dict[int, GuestChannel] = {}
        self._try = 0
        self._next_gpadl = first_gpadl
        self._deadlines: dict[tuple[Request, int], float] = {}
        self._out: list[m.Message] = []
        self._events: list[Event] = []
        self._now = 0.0

    # ---- outputs ---------------------------------------------------------------------------------------

    def messages(self) -> list[m.Message]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _wait(self, what: Request, key: int) -> None:
        self._deadlines[(what, key)] = self._now + self.timeout

    def _done(self, what: Request, key: int) -> bool:
        return self._deadlines.pop((what, key), None) is not None

    def get_timer(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> None:
        self._now = now
        for key, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[key]
                self._events.append(TimedOut(*key))

    @property
    def outstanding(self) -> list[tuple[Request, int]]:
        """Requests still waiting for the host's answer."""
        return list(self._deadlines)

    # ---- commands --------------------------------------------------------------------------------------

    def connect(self, now: float = 0.0) -> None:
        """Start (or restart: a new INITIATE_CONTACT resets the host) version negotiation."""
        self._now = now
        self.channels.clear()
        self._deadlines.clear()
        self._try = 0
        self._contact()

    @property
    def contacting_version(self) -> int | None:
        """The version the INITIATE_CONTACT in flight asks for (what a VERSION_RESPONSE answers), else None."""
        return self.versions[self._try] if self.state == GuestConnState.CONTACTING else None

    def _contact(self) -> None:
        v = self.versions[self._try]
        # Below 5.0 the union is the interrupt page's GPA; from 5.0 byte 0 is msg_sint (Linux sends
        # VMBUS_MESSAGE_SINT) and byte 1 msg_vtl (0: this guest runs in VTL0). The monitor pages go always,
        # target_vcpu is the VP of VMBUS_CONNECT_CPU (0).
        union = VMBUS_MESSAGE_SINT if v >= Version.WIN10_V5 else self.pages.int_page
        self.state = GuestConnState.CONTACTING
        self._out.append(m.InitiateContact(vmbus_version_requested=v, interrupt_page=union,
                                           monitor_page1=self.pages.monitor_page1,
                                           monitor_page2=self.pages.monitor_page2))
        self._wait(Request.VERSION, v)

    def create_gpadl(self, relid: int, pfns: list[int], now: float | None = None) -> int:
        ch = self._open_channel_obj(relid)
        gid = self._next_gpadl
        self._next_gpadl += 1
        header, bodies = split(relid, gid, pfns)
        self._out.append(header)
        self._out.extend(bodies)
        ch.gpadls[gid] = GpadlState.CREATING
        self._tick(now)
        self._wait(Request.GPADL, gid)
        return gid

    def open_channel(self, relid: int, gpadl: int, downstream_offset: int, userdata: bytes = b"",
                     target_vp: int = 0, now: float | None = None) -> None:
        ch = self._open_channel_obj(relid)
        if ch.state != GuestChanState.OFFERED:
            raise LocalProtocolError(f"relid {relid} is {ch.state.value}")
        ch.state = GuestChanState.OPENING
        ch.openid = relid  # Linux uses openid = child_relid
        ch.ring_gpadl = gpadl
        self._out.append(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gpadl,
                                       downstream_ringbuffer_pageoffset=downstream_offset,
                                       target_vp=target_vp, userdata=userdata))
        self._tick(now)
        self._wait(Request.OPEN, relid)

    def close_channel(self, relid: int) -> None:
        """CLOSECHANNEL (no reply); the channel is ready to open again at once."""
        ch = self.channels[relid]
        if ch.state == GuestChanState.OFFERED:
            return
        ch.state = GuestChanState.OFFERED
        self._done(Request.OPEN, relid)
        self._out.append(m.CloseChannel(child_relid=relid))

    def teardown_gpadl(self, relid: int, gpadl: int, now: float | None = None) -> bool:
        """GPADL_TEARDOWN; skipped (False) for a rescinded channel, as Linux does."""
        ch = self.channels[relid]
        if ch.rescinded:
            ch.gpadls.pop(gpadl, None)
            return False
        ch.gpadls[gpadl] = GpadlState.TEARING_DOWN
        if ch.ring_gpadl == gpadl and ch.state == GuestChanState.OFFERED:
            ch.ring_gpadl = None
        self._out.append(m.GpadlTeardown(child_relid=relid, gpadl=gpadl))
        self._tick(now)
        self._wait(Request.TEARDOWN, gpadl)
        return True

    def release_relid(self, relid: int) -> None:
        """RELID_RELEASED, after a rescinded channel was closed (Linux ``hv_process_channel_removal``)."""
        ch = self.channels.pop(relid)
        for gid in ch.gpadls:
            self._deadlines.pop((Request.GPADL, gid), None)
            self._deadlines.pop((Request.TEARDOWN, gid), None)
        self._deadlines.pop((Request.OPEN, relid), None)
        self._out.append(m.RelidReleased(child_relid=relid))

    def modify_channel(self, relid: int, target_vp: int) -> None:
        if self.version < Version.WIN10_V4_1:
            raise LocalProtocolError("MODIFYCHANNEL needs VMBus 4.1")
        self._out.append(m.ModifyChannel(child_relid=relid, target_vp=target_vp))
        if self.version >= Version.WIN10_V5_3:
            self._wait(Request.MODIFY, relid)

    def unload(self, now: float | None = None) -> None:
        """UNLOAD, answered by UNLOAD_RESPONSE. Linux ``vmbus_initiate_unload``: "Pre-Win2012R2 hosts don't
        support reconnect", so below 3.0 nothing is sent and the guest is unloaded at once (it just closes)."""
        self._tick(now)
        if self.version < Version.WIN8_1:
            self._unloaded()
            return
        self.state = GuestConnState.UNLOADING
        self._out.append(m.Unload())
        self._wait(Request.UNLOAD, 0)

    def _unloaded(self) -> None:
        self._deadlines.clear()
        self.channels.clear()
        self.state = GuestConnState.UNLOADED
        self._events.append(UnloadComplete())

    def _tick(self, now: float | None) -> None:
        if now is not None:
            self._now = now

    def _open_channel_obj(self, relid: int) -> GuestChannel:
        ch = self.channels.get(relid)
        if ch is None:
            raise LocalProtocolError(f"no offer for relid {relid}")
        if ch.rescinded:
            raise LocalProtocolError(f"relid {relid} was rescinded")
        return ch

    # ---- host messages ---------------------------------------------------------------------------------

    def receive(self, msg: m.Message, now: float | None = None) -> None:
        self._tick(now)
        t = msg.MSGTYPE
        if t not in m.HOST_TO_GUEST:
            self._unexpected(msg, f"{t.name} is a guest-to-host message")
            return
        handler = _HANDLERS.get(t)
        if handler is None:
            self._unexpected(msg, f"{t.name} is not handled by this guest")
            return
        handler(self, msg)

    def _unexpected(self, msg: m.Message, reason: str) -> None:
        self._events.append(Unexpected(msg, reason))

    def _on_version_response(self, msg: m.Message) -> None:
        assert isinstance(msg, m.VersionResponse)
        if self.state != GuestConnState.CONTACTING:
            self._unexpected(msg, f"VERSION_RESPONSE while {self.state.value}")
            return
        v = self.versions[self._try]
        self._done(Request.VERSION, v)
        # Linux vmbus_negotiate_version checks version_supported alone; connection_state is not read.
        if msg.version_supported:
            self.version = v
            self.msg_conn_id = msg.msg_conn_id if v >= Version.WIN10_V5 else VMBUS_MESSAGE_CONNECTION_ID
            self.state = GuestConnState.REQUESTING_OFFERS
            self._events.append(VersionNegotiated(v, self.msg_conn_id))
            self._out.append(m.RequestOffers())
            self._wait(Request.OFFERS, 0)
            return
        self._try += 1
        if self._try >= len(self.versions):
            self.state = GuestConnState.FAILED
            tried = ", ".join(version_text(x) for x in self.versions)
            self._events.append(VersionRefused(f"host refused every VMBus version tried ({tried})"))
            return
        self._contact()

    def _on_offer(self, msg: m.Message) -> None:
        assert isinstance(msg, m.OfferChannel)
        if self.state not in (GuestConnState.REQUESTING_OFFERS, GuestConnState.READY):
            self._unexpected(msg, f"OFFERCHANNEL while {self.state.value}")
            return
        relid = msg.child_relid
        if relid == 0 or relid >= 2048:
            self._unexpected(msg, f"relid {relid} outside 1..2047")
            return
        if relid in self.channels:
            self._unexpected(msg, f"second offer for relid {relid}")
            return
        key = (msg.if_type, msg.if_instance, msg.sub_channel_index)
        if any((c.offer.if_type, c.offer.if_instance, c.offer.sub_channel_index) == key
               for c in self.channels.values()):
            self._unexpected(msg, f"duplicate offer {msg.if_type}/{msg.if_instance}")
            return
        self.channels[relid] = GuestChannel(msg)
        self._events.append(OfferReceived(msg))

    def _on_all_offers(self, msg: m.Message) -> None:
        if self.state != GuestConnState.REQUESTING_OFFERS:
            self._unexpected(msg, f"ALLOFFERS_DELIVERED while {self.state.value}")
            return
        self._done(Request.OFFERS, 0)
        self.state = GuestConnState.READY
        self._events.append(AllOffersDelivered())

    def _on_rescind(self, msg: m.Message) -> None:
        assert isinstance(msg, m.RescindChannelOffer)
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.rescinded:
            self._unexpected(msg, f"RESCIND for unknown relid {msg.child_relid}")
            return
        ch.rescinded = True
        # Linux wakes every request waiting on the channel (open, GPADL, modify).
        self._deadlines.pop((Request.OPEN, ch.relid), None)
        self._deadlines.pop((Request.MODIFY, ch.relid), None)
        for gid in ch.gpadls:
            self._deadlines.pop((Request.GPADL, gid), None)
        self._events.append(Rescinded(ch.relid))

    def _on_gpadl_created(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlCreated)
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.gpadls.get(msg.gpadl) != GpadlState.CREATING:
            self._unexpected(msg, f"GPADL_CREATED for GPADL {msg.gpadl:#x} not being created")
            return
        self._done(Request.GPADL, msg.gpadl)
        ok = msg.creation_status == STATUS_SUCCESS
        if ok:
            ch.gpadls[msg.gpadl] = GpadlState.CREATED
        else:
            del ch.gpadls[msg.gpadl]
        self._events.append(GpadlCreated(ch.relid, msg.gpadl, ok, msg.creation_status))

    def _on_open_result(self, msg: m.Message) -> None:
        assert isinstance(msg, m.OpenChannelResult)
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.state != GuestChanState.OPENING or msg.openid != ch.openid:
            self._unexpected(msg, f"OPENCHANNEL_RESULT for relid {msg.child_relid} not opening")
            return
        self._done(Request.OPEN, ch.relid)
        ok = msg.status == STATUS_SUCCESS
        ch.state = GuestChanState.OPEN if ok else GuestChanState.OFFERED
        self._events.append(OpenResult(ch.relid, ok, msg.status))

    def _on_gpadl_torndown(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlTorndown)
        for ch in self.channels.values():
            if ch.gpadls.get(msg.gpadl) == GpadlState.TEARING_DOWN:
                del ch.gpadls[msg.gpadl]
                self._done(Request.TEARDOWN, msg.gpadl)
                self._events.append(GpadlTorndown(ch.relid, msg.gpadl))
                return
        self._unexpected(msg, f"GPADL_TORNDOWN for GPADL {msg.gpadl:#x} not being torn down")

    def _on_unload_response(self, msg: m.Message) -> None:
        if self.state != GuestConnState.UNLOADING:
            self._unexpected(msg, f"UNLOAD_RESPONSE while {self.state.value}")
            return
        self._unloaded()

    def _on_modify_response(self, msg: m.Message) -> None:
        assert isinstance(msg, m.ModifyChannelResponse)
        if not self._done(Request.MODIFY, msg.child_relid):
            self._unexpected(msg, f"MODIFYCHANNEL_RESPONSE for relid {msg.child_relid} not modifying")
            return
        self._events.append(ModifyChannelResult(msg.child_relid, msg.status))


_HANDLERS = {
    MsgType.VERSION_RESPONSE: GuestConnection._on_version_response,
    MsgType.OFFERCHANNEL: GuestConnection._on_offer,
    MsgType.ALLOFFERS_DELIVERED: GuestConnection._on_all_offers,
    MsgType.RESCIND_CHANNELOFFER: GuestConnection._on_rescind,
    MsgType.GPADL_CREATED: GuestConnection._on_gpadl_created,
    MsgType.OPENCHANNEL_RESULT: GuestConnection._on_open_result,
    MsgType.GPADL_TORNDOWN: GuestConnection._on_gpadl_torndown,
    MsgType.UNLOAD_RESPONSE: GuestConnection._on_unload_response,
    MsgType.MODIFYCHANNEL_RESPONSE: GuestConnection._on_modify_response,
}
