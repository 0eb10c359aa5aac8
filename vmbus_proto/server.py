"""The host (parent partition) side of the VMBus control plane, sans-IO: connection, channel and GPADL
state machines for one guest.

Mirrors OpenVMM vm/devices/vmbus/vmbus_server/src/channels.rs (``ConnectionState``, ``ChannelState``,
``GpadlState`` and their handlers) and the error policy of vmbus_server/src/lib.rs
``handle_synic_message``: an invalid message is logged and dropped, except GPADL errors (a failed
GPADL_CREATED; a GPADL_BODY for an id not in progress names no relid, so it is dropped) and MODIFYCHANNEL
errors (a failed MODIFYCHANNEL_RESPONSE from 5.3). Where OpenVMM drops a request that a Linux guest waits
on forever (OPENCHANNEL in a wrong state), we answer it with a failure instead (reference/vmbus-core.md §10).

Inputs are method calls (``receive``, ``open_complete``, ``close_complete``, ``add_offer``, ``rescind``);
outputs are pulled with ``actions()``: messages to send, device open/close requests, and diagnostics.
Device answers carry the sequence number of the request they answer; stale answers are dropped.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from . import messages as m
from .errors import MessageError
from .gpadl import Gpadl, GpadlAssembly
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
    TEARING_DOWN = "tearing_down"  # teardown received while an open ring uses it: deferred


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
class Dropped:
    """A guest message that is invalid here; logged, and answered only where the protocol answers."""

    message: m.Message | None
    reason: str


@dataclass(frozen=True, slots=True)
class Connected:
    version: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str  # "unload" or "reset"


@dataclass(frozen=True, slots=True)
class ChannelFreed:
    """A rescinded channel's relid was released by the guest and is free again."""

    relid: int
    name: str


Action = Send | DeviceOpen | DeviceClose | Dropped | Connected | Disconnected | ChannelFreed


@dataclass(slots=True)
class HostGpadl:
    gpadl: Gpadl
    state: GpadlState = GpadlState.ACCEPTED
    ring_users: int = 0


@dataclass(slots=True)
class HostChannel:
    offer: OfferSpec
    relid: int
    state: ChanState = ChanState.CLIENT_RELEASED
    params: OpenParams | None = None  # while opening/open/closing
    reopen: m.OpenChannel | None = None  # the OPENCHANNEL queued by CLOSING_REOPEN
    seq: int = 0  # sequence number of the device request in flight
    device_busy: bool = False  # a device open or close is in flight
    device_open: bool = False  # the device holds the channel open
    reoffer: OfferSpec | None = None
    released: bool = False  # a revoked channel's relid was released by the guest
    target_vp: int = 0


@dataclass(slots=True)
class Limits:
    max_gpadls: int = 256  # per connection, in progress or complete
    max_gpadl_pages: int = 1 << 18  # 1 GiB of 4 KiB pages in one GPADL


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
        self.gpadls: dict[tuple[int, int], HostGpadl] = {}  # (gpadl id, relid)
        self.in_progress: dict[int, GpadlAssembly] = {}  # gpadl id -> assembly (globally unique)
        self._next_action: m.Message | None = None  # UNLOAD or INITIATE_CONTACT waiting for idle
        self._seq = 0
        self._out: list[Action] = []
        for offer in offers:
            self.add_offer(offer)

    # ---- outputs ---------------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, msg: m.Message) -> None:
        self._out.append(Send(msg))

    def _drop(self, msg: m.Message | None, reason: str) -> None:
        self._out.append(Dropped(msg, reason))

    # ---- host-side inputs ------------------------------------------------------------------------------

    def add_offer(self, offer: OfferSpec) -> int:
        """Offer a device channel. Sent now if offers were already delivered (hot add)."""
        for ch in self.channels.values():
            if ch.state == ChanState.REVOKED and self._same_key(ch.offer, offer):
                ch.state, ch.reoffer = ChanState.REOFFERED, offer
                return ch.relid
            if ch.state != ChanState.REVOKED and self._same_key(ch.offer, offer):
                raise ValueError(f"{offer.name}: an offer with this class and instance exists")
        relid = next((i for i in range(1, MAX_CHANNELS + 1) if i not in self.channels), 0)
        if not relid:
            raise ValueError("no free channel id")
        ch = HostChannel(offer, relid)
        self.channels[relid] = ch
        if self.state == ConnState.CONNECTED and self.offers_sent:
            ch.state = ChanState.CLOSED
            self._send(offer.message(relid))
        return relid

    @staticmethod
    def _same_key(a: OfferSpec, b: OfferSpec) -> bool:
        return (a.if_type, a.if_instance, a.sub_channel_index) == (b.if_type, b.if_instance, b.sub_channel_index)

    def rescind(self, relid: int) -> None:
        """Hot-remove a device channel (OpenVMM ``revoke``)."""
        ch = self.channels[relid]
        st = ch.state
        if st in (ChanState.REVOKED, ChanState.REOFFERED):
            return
        if st == ChanState.CLIENT_RELEASED:
            self._free(ch)
            return
        if st in (ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE):
            # The guest already let go; once the device answers, the channel is simply gone.
            ch.reoffer = None
            ch.state = ChanState.REVOKED
            ch.released = True
            self._maybe_free_revoked(ch)
            return
        if st == ChanState.OPEN:
            self._device_close(ch)
        # OPENING: the device's open answer is turned into a close; CLOSING(_REOPEN): the close finishes.
        ch.reopen = None
        ch.state = ChanState.REVOKED
        self._send(m.RescindChannelOffer(child_relid=relid))
        self._revoke_gpadls(relid)

    def _revoke_gpadls(self, relid: int) -> None:
        for gid, asm in list(self.in_progress.items()):
            if asm.relid == relid:
                del self.in_progress[gid]
                self._send(m.GpadlCreated(child_relid=relid, gpadl=gid, creation_status=STATUS_UNSUCCESSFUL))
        for (gid, rid), g in list(self.gpadls.items()):
            if rid == relid and g.state == GpadlState.TEARING_DOWN:
                del self.gpadls[(gid, rid)]
                self._send(m.GpadlTorndown(gpadl=gid))

    def open_complete(self, relid: int, seq: int, ok: bool) -> None:
        ch = self.channels.get(relid)
        if ch is None or seq != ch.seq or not ch.device_busy:
            return  # stale
        ch.device_busy = False
        params = ch.params
        assert params is not None
        if ch.state == ChanState.OPENING:
            if ok:
                ch.device_open = True
                ch.state = ChanState.OPEN
                self._send(m.OpenChannelResult(child_relid=relid, openid=params.openid, status=STATUS_SUCCESS))
            else:
                self._unuse_ring(ch)
                ch.state = ChanState.CLOSED
                self._send(m.OpenChannelResult(child_relid=relid, openid=params.openid,
                                               status=STATUS_UNSUCCESSFUL))
        elif ok:
            # Revoked or released while opening: the open turns into a close.
            ch.device_open = True
            self._device_close(ch)
        else:
            self._unuse_ring(ch)
            self._after_device_idle(ch)

    def close_complete(self, relid: int, seq: int) -> None:
        ch = self.channels.get(relid)
        if ch is None or seq != ch.seq or not ch.device_busy:
            return
        ch.device_busy = False
        ch.device_open = False
        self._unuse_ring(ch)
        if ch.state == ChanState.CLOSING:
            ch.state = ChanState.CLOSED
        elif ch.state == ChanState.CLOSING_REOPEN:
            reopen, ch.reopen = ch.reopen, None
            ch.state = ChanState.CLOSED
            assert reopen is not None
            self._open_channel(reopen)
        else:
            self._after_device_idle(ch)

    def _after_device_idle(self, ch: HostChannel) -> None:
        if ch.state in (ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE):
            ch.state = ChanState.CLIENT_RELEASED
            self._drop_channel_gpadls(ch.relid)
            self._check_disconnected()
        elif ch.state in (ChanState.REVOKED, ChanState.REOFFERED):
            self._maybe_free_revoked(ch)
        elif ch.state == ChanState.OPENING:
            ch.state = ChanState.CLOSED

    def _maybe_free_revoked(self, ch: HostChannel) -> None:
        """A rescinded channel the guest released is freed, or re-offered under the same relid, once the
        device let go of it."""
        if ch.device_busy or ch.device_open or not ch.released:
            self._check_disconnected()
            return
        if ch.state == ChanState.REVOKED:
            self._free(ch)
        elif ch.state == ChanState.REOFFERED:
            assert ch.reoffer is not None
            self._drop_channel_gpadls(ch.relid)
            ch.offer, ch.reoffer, ch.released = ch.reoffer, None, False
            if self.state == ConnState.CONNECTED and self.offers_sent:
                ch.state = ChanState.CLOSED
                self._send(ch.offer.message(ch.relid))
            else:
                ch.state = ChanState.CLIENT_RELEASED
        self._check_disconnected()

    def _free(self, ch: HostChannel) -> None:
        self.channels.pop(ch.relid, None)
        for key in [k for k in self.gpadls if k[1] == ch.relid]:
            del self.gpadls[key]
        self._out.append(ChannelFreed(ch.relid, ch.offer.name))

    def _device_close(self, ch: HostChannel) -> None:
        self._seq += 1
        ch.seq = self._seq
        ch.device_busy = True
        self._out.append(DeviceClose(ch.offer, ch.relid, ch.seq))

    def _unuse_ring(self, ch: HostChannel) -> None:
        params, ch.params = ch.params, None
        if params is None:
            return
        key = (params.gpadl.gpadl, ch.relid)
        g = self.gpadls.get(key)
        if g is None or g.gpadl is not params.gpadl:
            return  # torn down meanwhile (a rescinded channel's ring), maybe its id already reused
        g.ring_users -= 1
        if g.ring_users == 0 and g.state == GpadlState.TEARING_DOWN:
            del self.gpadls[key]
            if self.state == ConnState.CONNECTED and not ch.released and ch.state not in (
                    ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE):
                self._send(m.GpadlTorndown(gpadl=key[0]))

    # ---- guest messages --------------------------------------------------------------------------------

    def receive(self, msg: m.Message) -> None:
        """Handle one guest message. Never raises for the guest's mistakes: it drops and reports them."""
        t = msg.MSGTYPE
        if t not in m.GUEST_TO_HOST:
            self._drop(msg, f"{t.name} is a host-to-guest message")
            return
        if t == MsgType.INITIATE_CONTACT:
            assert isinstance(msg, m.InitiateContact)
            self._on_initiate_contact(msg)
            return
        if self.state != ConnState.CONNECTED:
            self._drop(msg, f"{t.name} while {self.state.value}")
            return
        if self.version < m.MIN_VERSION.get(t, 0):
            self._drop(msg, f"{t.name} needs a newer VMBus version than {Version(self.version).text}")
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
        self._drop(None, str(err))

    def _channel(self, msg: m.Message, relid: int) -> HostChannel | None:
        ch = self.channels.get(relid)
        if ch is None:
            self._drop(msg, f"unknown relid {relid}")
            return None
        return ch

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
            self._drop(msg, "REQUESTOFFERS was already answered on this connection")
            return
        self.offers_sent = True
        # Relids are given when a device is added, so they are stable across reconnects already
        # (OpenVMM sorts by interface id for that); offers go out in relid order.
        for ch in sorted(self.channels.values(), key=lambda c: c.relid):
            if ch.state == ChanState.CLIENT_RELEASED:
                ch.state = ChanState.CLOSED
                self._send(ch.offer.message(ch.relid))
        self._send(m.AllOffersDelivered())

    def _on_gpadl_header(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlHeader)
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.released or ch.state in _RELEASED:
            self._gpadl_failed(msg, f"GPADL {msg.gpadl:#x} for unknown or released relid {msg.child_relid}")
            return
        if msg.gpadl in self.in_progress:
            self._gpadl_failed(msg, f"duplicate in-progress GPADL id {msg.gpadl:#x}")
            return
        if (msg.gpadl, msg.child_relid) in self.gpadls:
            self._gpadl_failed(msg, f"GPADL id {msg.gpadl:#x} already exists on relid {msg.child_relid}")
            return
        if len(self.gpadls) + len(self.in_progress) >= self.limits.max_gpadls:
            self._gpadl_failed(msg, f"GPADL limit of {self.limits.max_gpadls} reached")
            return
        try:
            asm = GpadlAssembly.from_header(msg)
        except MessageError as exc:
            self._gpadl_failed(msg, str(exc))
            return
        if asm.expected_pfns > self.limits.max_gpadl_pages:
            self._gpadl_failed(msg, f"GPADL of {asm.expected_pfns} pages exceeds {self.limits.max_gpadl_pages}")
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
            self._drop(msg, f"GPADL_BODY for unknown GPADL id {msg.gpadl:#x}{note}")
            return
        try:
            asm.add(msg.pfns)
        except MessageError as exc:
            del self.in_progress[msg.gpadl]
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=msg.gpadl, creation_status=STATUS_UNSUCCESSFUL))
            self._drop(msg, str(exc))
            return
        self._gpadl_progress(asm, msg)

    def _gpadl_progress(self, asm: GpadlAssembly, msg: m.Message) -> None:
        if not asm.complete:
            self.in_progress[asm.gpadl] = asm
            return
        self.in_progress.pop(asm.gpadl, None)
        ch = self.channels.get(asm.relid)
        if ch is None or ch.state in (ChanState.REVOKED, ChanState.REOFFERED):
            # OpenVMM channels.rs gpadl_updated: a GPADL that completes on a revoked channel is answered
            # GPADL_CREATED(STATUS_UNSUCCESSFUL) and removed, so a later teardown of it is an unknown GPADL.
            self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=asm.gpadl, creation_status=STATUS_UNSUCCESSFUL))
            self._drop(msg, f"GPADL {asm.gpadl:#x} completed on rescinded relid {asm.relid}")
            return
        self.gpadls[(asm.gpadl, asm.relid)] = HostGpadl(Gpadl(asm.relid, asm.gpadl, asm.ranges, tuple(asm.pfns)))
        self._send(m.GpadlCreated(child_relid=asm.relid, gpadl=asm.gpadl, creation_status=STATUS_SUCCESS))

    def _gpadl_failed(self, msg: m.GpadlHeader, reason: str) -> None:
        self._send(m.GpadlCreated(child_relid=msg.child_relid, gpadl=msg.gpadl, creation_status=STATUS_UNSUCCESSFUL))
        self._drop(msg, reason)

    def _on_gpadl_teardown(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GpadlTeardown)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        if ch.released or ch.state in _RELEASED:
            self._drop(msg, f"GPADL_TEARDOWN for relid {ch.relid}, which the guest released")
            return
        key = (msg.gpadl, msg.child_relid)
        g = self.gpadls.get(key)
        if g is None or g.state != GpadlState.ACCEPTED:
            self._drop(msg, f"GPADL {msg.gpadl:#x} on relid {msg.child_relid} is not an accepted GPADL")
            return
        if ch.state in (ChanState.REVOKED, ChanState.REOFFERED) or g.ring_users == 0:
            del self.gpadls[key]
            self._send(m.GpadlTorndown(gpadl=msg.gpadl))
            return
        g.state = GpadlState.TEARING_DOWN  # answered once the ring using it is closed

    def _on_open_channel(self, msg: m.Message) -> None:
        assert isinstance(msg, m.OpenChannel)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        st = ch.state
        if st == ChanState.CLOSED:
            self._open_channel(msg)
        elif st == ChanState.CLOSING:
            ch.state, ch.reopen = ChanState.CLOSING_REOPEN, msg
        elif st in (ChanState.REVOKED, ChanState.REOFFERED):
            self._drop(msg, f"OPENCHANNEL for rescinded relid {ch.relid} ignored")
        elif st in (ChanState.OPEN, ChanState.CLOSING_REOPEN):
            self._open_failed(msg, f"OPENCHANNEL for relid {ch.relid} while {st.value}")
        else:
            # OPENING: the pending open will be answered; released: the guest does not know the relid.
            self._drop(msg, f"OPENCHANNEL for relid {ch.relid} while {st.value}")

    def _open_channel(self, msg: m.OpenChannel) -> None:
        ch = self.channels[msg.child_relid]
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
            self._open_failed(msg, reason or "")
            return
        g.ring_users += 1
        ch.params = OpenParams(relid=ch.relid, openid=msg.openid, gpadl=g.gpadl,
                               downstream_offset=msg.downstream_ringbuffer_pageoffset,
                               target_vp=msg.target_vp, userdata=msg.userdata)
        ch.target_vp = msg.target_vp
        ch.state = ChanState.OPENING
        self._seq += 1
        ch.seq = self._seq
        ch.device_busy = True
        self._out.append(DeviceOpen(ch.offer, ch.params, ch.seq))

    def _open_failed(self, msg: m.OpenChannel, reason: str) -> None:
        self._send(m.OpenChannelResult(child_relid=msg.child_relid, openid=msg.openid, status=STATUS_UNSUCCESSFUL))
        self._drop(msg, reason)

    def _on_close_channel(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CloseChannel)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        if ch.state == ChanState.OPEN:
            ch.state = ChanState.CLOSING
            self._device_close(ch)
        elif ch.state in (ChanState.REVOKED, ChanState.REOFFERED):
            pass  # a rescinded guest still closes; nothing to do
        else:
            self._drop(msg, f"CLOSECHANNEL for relid {ch.relid} while {ch.state.value}")

    def _on_relid_released(self, msg: m.Message) -> None:
        assert isinstance(msg, m.RelidReleased)
        ch = self._channel(msg, msg.child_relid)
        if ch is None:
            return
        if ch.state == ChanState.CLOSED:
            ch.state = ChanState.CLIENT_RELEASED
            self._drop_channel_gpadls(ch.relid)
        elif ch.state in (ChanState.REVOKED, ChanState.REOFFERED):
            ch.released = True
            self._drop_channel_gpadls(ch.relid)
            self._maybe_free_revoked(ch)
        elif ch.state == ChanState.CLOSING:
            ch.state = ChanState.CLOSING_CLIENT_RELEASE
            self._drop_channel_gpadls(ch.relid)
        else:
            self._drop(msg, f"RELID_RELEASED for relid {ch.relid} while {ch.state.value}")

    def _drop_channel_gpadls(self, relid: int) -> None:
        for gid in [g for g, a in self.in_progress.items() if a.relid == relid]:
            del self.in_progress[gid]
        for key in [k for k, g in self.gpadls.items() if k[1] == relid and g.ring_users == 0]:
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
        elif ch.state != ChanState.OPEN:
            reason = f"channel {ch.state.value}"  # OpenVMM InvalidChannelState
        elif ch.target_vp == VP_INDEX_DISABLE_INTERRUPT:
            reason = "channel opened with target_vp 0xFFFFFFFF (interrupts disabled)"  # OpenVMM InterruptsDisabled
        if reason is None and ch is not None:
            ch.target_vp = msg.target_vp
        else:
            self._drop(msg, f"MODIFYCHANNEL for relid {msg.child_relid}: {reason}")
        if self.version >= Version.WIN10_V5_3:
            self._send(m.ModifyChannelResponse(child_relid=msg.child_relid,
                                               status=0 if reason is None else STATUS_UNSUCCESSFUL - (1 << 32)))

    # ---- disconnect (UNLOAD / reset) -------------------------------------------------------------------

    def _begin_disconnect(self) -> None:
        self.state = ConnState.DISCONNECTING
        self.in_progress.clear()
        for ch in list(self.channels.values()):
            self._client_release(ch)
        self._check_disconnected()

    def _client_release(self, ch: HostChannel) -> None:
        st = ch.state
        if st == ChanState.CLOSED:
            ch.state = ChanState.CLIENT_RELEASED
        elif st == ChanState.OPEN:
            ch.state = ChanState.CLOSING_CLIENT_RELEASE
            self._device_close(ch)
        elif st in (ChanState.CLOSING, ChanState.CLOSING_REOPEN):
            ch.state, ch.reopen = ChanState.CLOSING_CLIENT_RELEASE, None
        elif st == ChanState.OPENING:
            ch.state = ChanState.OPENING_CLIENT_RELEASE
        elif st in (ChanState.REVOKED, ChanState.REOFFERED):
            ch.released = True
            self._maybe_free_revoked(ch)
        self._drop_channel_gpadls(ch.relid)

    def _idle(self) -> bool:
        return not any(ch.device_busy or ch.device_open for ch in self.channels.values())

    def _check_disconnected(self) -> None:
        if self.state != ConnState.DISCONNECTING or not self._idle():
            return
        for ch in list(self.channels.values()):
            if ch.state == ChanState.REOFFERED and ch.reoffer is not None:
                ch.offer, ch.reoffer, ch.state = ch.reoffer, None, ChanState.CLIENT_RELEASED
            elif ch.state in (ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE):
                ch.state = ChanState.CLIENT_RELEASED
            elif ch.state == ChanState.REVOKED:
                self._free(ch)  # an unload or reset releases every relid the guest held
        self.gpadls.clear()
        self.in_progress.clear()
        self.state = ConnState.DISCONNECTED
        self.offers_sent = False
        action, self._next_action = self._next_action, None
        if isinstance(action, m.InitiateContact):
            self._out.append(Disconnected("reset"))
            self._accept_contact(action)
        else:
            if self.version >= Version.WIN7:
                self._send(m.UnloadResponse())
            self._out.append(Disconnected("unload"))
            self.version = 0

    # ---- host shutdown / peer loss ---------------------------------------------------------------------

    def open_channels(self) -> list[HostChannel]:
        return [c for c in self.channels.values() if c.device_open or c.device_busy]


_RELEASED = (ChanState.CLIENT_RELEASED, ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE)


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
