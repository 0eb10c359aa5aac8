"""Tier 1: the host and guest control-plane state machines (vmbus_proto.server, vmbus_proto.client).

1. ``HostFuzz`` (test_host_core_under_random_guest_input): Hypothesis drives ``HostConnection`` with random
   guest messages, valid and invalid -- every type in ``messages.GUEST_TO_HOST``, each passed through the
   real codec first; relids real, unknown and 0; colliding GPADL ids; GPADL headers and bodies with random
   PFN counts and broken range descriptors; OPENCHANNEL with good and bad ring GPADLs and offsets; UNLOAD;
   INITIATE_CONTACT with supported and unsupported versions, SINTs and monitor pages; MODIFYCHANNEL;
   host-to-guest messages sent the wrong way; bodies that do not decode (``receive_malformed``) -- with
   device answers that come late, out of order, failed, or stale (replayed or never-issued sequence
   numbers), and host-side ``rescind()`` / ``add_offer()`` (re-offers). The host must never raise for
   guest input (not even ``ProtocolError``: it logs and drops). A *guest ledger* records what a guest that
   sent those messages is owed, from what it sent and received (rule below), and structural invariants
   are checked after every step: each channel state is a ``ChanState``, relids in 1..2047, 0 <= ring_users
   <= 1, no GPADL on a freed or client-released relid, one device request in flight per channel, a stale
   device answer changes nothing, no GPADL_TORNDOWN for a ring a live channel still maps, and after
   UNLOAD_RESPONSE the host is DISCONNECTED with no GPADLs.
2. ``test_channel_state_table``: each host channel state x each guest message, against
   reference/vmbus-core.md §4.2 as implemented (deviations are listed next to the table), plus the
   device-answer transitions and the connection-level rules (versions, SINT, monitor pages, features,
   REQUESTOFFERS once, UNLOAD_RESPONSE from WIN7, MODIFYCHANNEL by version, reset by INITIATE_CONTACT).
3. ``BusFuzz`` (test_host_and_guest_cores_with_a_well_behaved_guest): host core + guest core wired in memory
   (tests/unit/inmemory.py) under a Linux-like guest, with delayed device answers and host rescinds /
   re-offers: the guest core never sees ``Unexpected``, the host never drops a message, nothing is left
   outstanding once everything settles, and both sides agree on every channel and GPADL.
4. Pinned known bugs (strict xfail) and regression tests for bugs already fixed.

**Answer rule** (what the host owes a guest; derived from server.py and vmbus-core.md §4.1-4.3, §10). A
*connection epoch* starts with each INITIATE_CONTACT the guest sends and ends with the next INITIATE_CONTACT
or an UNLOAD sent while connected; nothing from an earlier epoch is owed afterwards, and the host must not
send anything about it (the guest reset). Within an epoch, once every pending device request is answered:

* the latest INITIATE_CONTACT gets exactly one VERSION_RESPONSE (contacts sent while the host is still
  tearing the previous connection down are coalesced: the newest one is answered);
* an UNLOAD sent while connected gets UNLOAD_RESPONSE iff the negotiated version is >= WIN7 (1.1); a new
  INITIATE_CONTACT before that answer supersedes it. The host is then DISCONNECTED with no GPADLs;
* the first REQUESTOFFERS gets the offers and ALLOFFERS_DELIVERED;
* an OPENCHANNEL for a relid the guest holds (offered, not rescinded, not released) gets an
  OPENCHANNEL_RESULT, unless a RESCIND for that relid arrives first. A second OPENCHANNEL while one is
  pending needs no answer of its own (the host drops it while OPENING);
* each GPADL_HEADER sent while connected gets a GPADL_CREATED for (relid, gpadl) -- failure for bad headers,
  unknown/released relids and duplicate in-progress ids; success or failure as soon as its bodies
  complete it (or overflow it) -- failure if it completes on a rescinded (REVOKED/REOFFERED) channel, as
  OpenVMM gpadl_updated, so the guest never sees a GPADL created on a relid it holds rescinded; failure if
  the channel is rescinded while it is in progress -- unless the guest releases the relid first
  (RELID_RELEASED accepted by the host) or the epoch ends. At rest, a header still unanswered must be an
  incomplete in-progress assembly;
* a malformed GPADL_HEADER (one that does not decode) whose child_relid and gpadl still read as u32s gets
  a failed GPADL_CREATED for that pair, like any other bad header;
* a GPADL_TEARDOWN of a GPADL the guest saw created (and did not tear down yet) gets GPADL_TORNDOWN: at
  once; or, when it is the ring of a channel that is opening/open/closing, when that ring is released
  (device close or failed open); or at once when the channel is rescinded (and, per §4.2, at once for a
  channel already REVOKED/REOFFERED, though its device may still map the ring). No TORNDOWN is owed (and
  none may be sent) once the guest released the relid (RELID_RELEASED accepted, UNLOAD, reset): OpenVMM
  sends no GPADL_TORNDOWN for client-released channels. GPADL_TORNDOWN names only the GPADL id, so
  teardowns of one id on two relids are told apart by which one the host no longer holds. At rest, an
  unanswered teardown must be for the ring of a channel still OPEN (it is answered when that closes);
* a GPADL_BODY for an id not in progress (unknown, or already complete) gets nothing (OpenVMM
  UnknownGpadlId: a body names no relid to answer), and a completed GPADL it names stays as it was;
* a MODIFYCHANNEL gets MODIFYCHANNEL_RESPONSE iff the version is >= 5.3 (at once; failure if the channel
  is not open, was opened with target_vp 0xFFFFFFFF, or the new target_vp is 0xFFFFFFFF);
* CLOSECHANNEL and RELID_RELEASED get no answer; a RELID_RELEASED for a relid the guest holds rescinded
  must always be honoured (the guest never sends it again).

Besides, the host never sends an answer nobody asked for, never offers a relid the guest holds or a relid
>= 2048, and at rest its channel table matches what the guest holds.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmbus_proto import client as c
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto.errors import MessageError
from vmbus_proto.gpadl import Gpadl, split
from vmbus_proto.guids import NETWORK, SCSI, SYNTH_KEYBOARD, SYNTHVID
from vmbus_proto.messages import STATUS_SUCCESS, STATUS_UNSUCCESSFUL, MsgType
from vmbus_proto.server import ChanState, ConnState, GpadlState
from vmbus_proto.state_table import CR, FAIL_RESULT, INPUTS, STATE_OF_ROW, STATE_TABLE, STATES, TD, Row
from vmbus_proto.versions import GUEST_ORDER, Version

from .inmemory import Bus

# Known bugs (each has a strict-xfail test below). While a bug stands, the fuzzers steer around its trigger
# so the rest of the state space keeps being checked. Fix the bug, remove its name here and its xfail mark.
KNOWN_BUGS: frozenset[str] = frozenset()

POOL = [
    s.OfferSpec("storage", SCSI, uuid.UUID(int=1)),
    s.OfferSpec("network", NETWORK, uuid.UUID(int=2)),
    s.OfferSpec("video", SYNTHVID, uuid.UUID(int=3), pipe_mode=True, mmio_megabytes=8),
    s.OfferSpec("keyboard", SYNTH_KEYBOARD, uuid.UUID(int=4)),
    s.OfferSpec("storage-sub1", SCSI, uuid.UUID(int=1), sub_channel_index=1),
]
INITIAL = POOL[:3]

BAD_RELIDS = st.sampled_from([0, 1, 9, 2047, 0xFFFFFFFF])
VERSIONS = st.sampled_from([*Version, *Version, 0, 0x00020000, 0x00050004, 0xFFFFFFFF])
RELEASED_STATES = (ChanState.CLOSING_CLIENT_RELEASE, ChanState.OPENING_CLIENT_RELEASE)
SIGNED_UNSUCCESSFUL = STATUS_UNSUCCESSFUL - (1 << 32)
HOST_MESSAGES = [m.OfferChannel(if_type=SCSI, if_instance=SCSI, child_relid=1, connection_id=1),
                 m.RescindChannelOffer(child_relid=1), m.AllOffersDelivered(),
                 m.OpenChannelResult(child_relid=1, openid=1, status=0),
                 m.GpadlCreated(child_relid=1, gpadl=1, creation_status=0), m.GpadlTorndown(gpadl=1),
                 m.VersionResponse(version_supported=1), m.UnloadResponse(),
                 m.ModifyChannelResponse(child_relid=1, status=0)]

Key = tuple[uuid.UUID, uuid.UUID, int]


def offer_key(o: s.OfferSpec | m.OfferChannel) -> Key:
    return (o.if_type, o.if_instance, o.sub_channel_index)


def sends(acts: list[s.Action]) -> list[m.Message]:
    return [a.message for a in acts if isinstance(a, s.Send)]


def conn_state(host: s.HostConnection) -> ConnState:
    """``host.state`` read through a call, so mypy does not keep an earlier narrowing of the attribute."""
    return host.state


def wire(msg: m.Message) -> m.Message:
    """Every message crosses the real codec, as on the stream."""
    out = m.decode(msg.encode())
    assert out == msg
    return out


Request = s.DeviceOpen | s.DeviceClose | s.TeardownGpadl


def open_close_relids(pending: list[Request]) -> list[int]:
    return [p.params.relid if isinstance(p, s.DeviceOpen) else p.relid
            for p in pending if isinstance(p, s.DeviceOpen | s.DeviceClose)]


def answer(host: s.HostConnection, act: Request, ok: bool) -> None:
    """The device answers one request (a GPADL teardown always succeeds)."""
    if isinstance(act, s.DeviceOpen):
        host.open_complete(act.params.relid, act.seq, ok)
    elif isinstance(act, s.DeviceClose):
        host.close_complete(act.relid, act.seq)
    else:
        host.gpadl_released(act.relid, act.gpadl)


def primary_of(host: s.HostConnection, spec: s.OfferSpec) -> tuple[int | None, bool]:
    """The primary relid to pass to ``add_offer(spec, primary)``, and whether the host must accept it: a
    sub-channel's primary must be offered or open (closed, opening, open)."""
    if not spec.sub_channel_index:
        return None, True
    prim = [ch for ch in host.channels.values() if offer_key(ch.offer) == (spec.if_type, spec.if_instance, 0)]
    if not prim:
        return 9, False
    return prim[0].relid, prim[0].kind in (ChanState.CLOSED, ChanState.OPENING, ChanState.OPEN)


# ---- the guest ledger ----------------------------------------------------------------------------------

class GuestLedger:
    """What a guest that sent these messages and received these answers is owed (see the module docstring).
    ``received`` raises AssertionError for an answer nobody asked for."""

    def __init__(self, still_tearing_down: Callable[[int, int], bool] = lambda relid, gid: False) -> None:
        # GPADL_TORNDOWN names only the GPADL id; when one id is being torn down on two relids, the answer
        # belongs to the one the host no longer holds as tearing down.
        self.still_tearing_down = still_tearing_down
        self.requested_version = 0
        self.version = 0
        self.contact_waiting = False
        self.unload_waiting = False
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.connected = False
        self.offers_requested = False
        self.offers_waiting = False
        self.modify_waiting = 0
        self.known: dict[int, str] = {}  # relid -> "live" | "rescinded"
        self.keys: dict[int, Key] = {}
        self.open_waiting: set[int] = set()
        self.opens_sent: Counter[int] = Counter()
        self.open_results: Counter[int] = Counter()
        self.gpadl_waiting: Counter[tuple[int, int]] = Counter()  # (relid, gpadl)
        self.accepted: set[tuple[int, int]] = set()
        self.teardown_waiting: Counter[tuple[int, int]] = Counter()

    def _forget_relid(self, relid: int) -> None:
        self.known.pop(relid, None)
        self.keys.pop(relid, None)
        self.open_waiting.discard(relid)
        for d in (self.gpadl_waiting, self.teardown_waiting):
            for k in [k for k in d if k[0] == relid]:
                del d[k]
        self.accepted = {k for k in self.accepted if k[0] != relid}

    # guest -> host
    def sent(self, msg: m.Message, dropped: bool) -> None:
        if isinstance(msg, m.InitiateContact):
            self._new_epoch()
            self.unload_waiting = False
            self.contact_waiting = True
            self.requested_version = msg.vmbus_version_requested
            return
        if not self.connected:
            return
        if isinstance(msg, m.RequestOffers):
            if not self.offers_requested:
                self.offers_requested = self.offers_waiting = True
        elif isinstance(msg, m.GpadlHeader):
            self.gpadl_waiting[(msg.child_relid, msg.gpadl)] += 1
        elif isinstance(msg, m.GpadlTeardown):
            key = (msg.child_relid, msg.gpadl)
            if key in self.accepted:
                self.accepted.discard(key)
                self.teardown_waiting[key] += 1
        elif isinstance(msg, m.OpenChannel):
            self.opens_sent[msg.child_relid] += 1
            if self.known.get(msg.child_relid) == "live":
                self.open_waiting.add(msg.child_relid)
        elif isinstance(msg, m.RelidReleased):
            if self.known.get(msg.child_relid) == "rescinded":
                assert not dropped, f"RELID_RELEASED of rescinded relid {msg.child_relid} was dropped"
            if not dropped:
                self._forget_relid(msg.child_relid)
        elif isinstance(msg, m.Unload):
            version = self.version
            self._new_epoch()
            self.unload_waiting = version >= Version.WIN7
        elif isinstance(msg, m.ModifyChannel) and self.version >= Version.WIN10_V5_3:
            self.modify_waiting += 1

    # host -> guest
    def received(self, msg: m.Message) -> None:
        if isinstance(msg, m.VersionResponse):
            assert self.contact_waiting, "VERSION_RESPONSE without an INITIATE_CONTACT"
            self.contact_waiting = False
            if msg.version_supported and msg.connection_state == m.ConnectionState.SUCCESSFUL:
                self.connected = True
                self.version = self.requested_version
            return
        assert self.connected, f"{msg.MSGTYPE.name} while the guest is not connected"
        if isinstance(msg, m.OfferChannel):
            relid = msg.child_relid
            assert self.offers_requested, "OFFERCHANNEL before REQUESTOFFERS"
            assert 0 < relid < 2048
            assert relid not in self.known, f"relid {relid} offered while the guest holds it"
            assert offer_key(msg) not in self.keys.values(), "two offers with the same class/instance"
            self.known[relid] = "live"
            self.keys[relid] = offer_key(msg)
        elif isinstance(msg, m.AllOffersDelivered):
            assert self.offers_waiting, "ALLOFFERS_DELIVERED twice"
            self.offers_waiting = False
        elif isinstance(msg, m.RescindChannelOffer):
            assert self.known.get(msg.child_relid) == "live", f"RESCIND of relid {msg.child_relid}"
            self.known[msg.child_relid] = "rescinded"
            self.open_waiting.discard(msg.child_relid)
        elif isinstance(msg, m.OpenChannelResult):
            relid = msg.child_relid
            assert self.known.get(relid) == "live", f"OPENCHANNEL_RESULT for relid {relid} the guest does not hold"
            assert self.open_results[relid] < self.opens_sent[relid], "more OPENCHANNEL_RESULTs than requests"
            self.open_results[relid] += 1
            self.open_waiting.discard(relid)
        elif isinstance(msg, m.GpadlCreated):
            key = (msg.child_relid, msg.gpadl)
            assert self.gpadl_waiting[key] > 0, f"GPADL_CREATED for {key} nobody waits for"
            self.gpadl_waiting[key] -= 1
            if msg.creation_status == STATUS_SUCCESS:
                assert self.known.get(msg.child_relid) != "rescinded", f"GPADL {key} created on a rescinded relid"
                self.accepted.add(key)
        elif isinstance(msg, m.GpadlTorndown):
            owed = sorted((k for k, n in self.teardown_waiting.items() if n and k[1] == msg.gpadl),
                          key=lambda k: self.still_tearing_down(*k))
            assert owed, f"GPADL_TORNDOWN {msg.gpadl:#x} not owed"
            self.teardown_waiting[owed[0]] -= 1
        elif isinstance(msg, m.UnloadResponse):
            raise AssertionError("UNLOAD_RESPONSE while connected")
        elif isinstance(msg, m.ModifyChannelResponse):
            assert self.modify_waiting > 0, "MODIFYCHANNEL_RESPONSE nobody waits for"
            self.modify_waiting -= 1
        else:
            raise AssertionError(f"unexpected host message {msg!r}")

    def sent_malformed(self, err: MessageError) -> None:
        """A guest message that failed to decode: a GPADL_HEADER whose relid and gpadl id still read as u32s
        is owed a failed GPADL_CREATED (the guest waits on that pair); anything else is owed nothing."""
        raw = err.raw or {}
        relid, gid = raw.get("child_relid"), raw.get("gpadl")
        if (self.connected and err.msgtype == MsgType.GPADL_HEADER and isinstance(relid, int)
                and isinstance(gid, int) and not isinstance(relid, bool) and not isinstance(gid, bool)
                and 0 <= relid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF):
            self.gpadl_waiting[(relid, gid)] += 1

    def received_unload_response(self) -> None:
        assert self.unload_waiting, "UNLOAD_RESPONSE without an UNLOAD"
        self.unload_waiting = False


def check_at_rest(host: s.HostConnection, ledger: GuestLedger) -> None:
    """Every device request answered: what the guest waits on is answered, and both sides agree."""
    assert host.state != ConnState.DISCONNECTING, "still disconnecting with no device request pending"
    assert not ledger.contact_waiting, "INITIATE_CONTACT never answered"
    assert not ledger.unload_waiting, "UNLOAD never answered"
    assert not ledger.offers_waiting, "REQUESTOFFERS never answered"
    assert ledger.modify_waiting == 0
    assert not ledger.open_waiting, f"OPENCHANNEL never answered for relids {sorted(ledger.open_waiting)}"
    for (relid, gid), n in ledger.gpadl_waiting.items():
        if n:
            asm = host.in_progress.get(gid)
            assert n == 1 and asm is not None and asm.relid == relid and not asm.complete, \
                f"GPADL_HEADER {(relid, gid)} never answered and not in progress"
    for (relid, gid), n in ledger.teardown_waiting.items():
        if n:
            g = host.gpadls.get((gid, relid))
            ch = host.channels.get(relid)
            assert g is not None and g.state == GpadlState.TEARDOWN_DEFERRED, f"GPADL_TEARDOWN {(relid, gid)} lost"
            assert ch is not None and ch.kind == ChanState.OPEN and ch.params is not None \
                and ch.params.gpadl.gpadl == gid, f"GPADL_TEARDOWN {(relid, gid)} deferred with no open ring"
    for relid, gid in ledger.accepted:
        g = host.gpadls.get((gid, relid))
        assert g is not None and g.state == GpadlState.ACCEPTED, f"GPADL {(relid, gid)} vanished on the host"
    for ch in host.channels.values():
        assert not ch.device_busy
        assert ch.kind not in (ChanState.OPENING, ChanState.CLOSING, ChanState.CLOSING_REOPEN, *RELEASED_STATES)
    assert (host.state == ConnState.CONNECTED) == ledger.connected
    if host.state == ConnState.DISCONNECTED:
        assert not host.gpadls and not host.in_progress
        assert all(ch.kind == ChanState.CLIENT_RELEASED for ch in host.channels.values())
        return
    assert host.offers_sent == ledger.offers_requested
    for relid, ch in host.channels.items():
        held = ledger.known.get(relid)
        if ch.kind in (ChanState.CLOSED, ChanState.OPEN):
            assert held == "live" and ledger.keys[relid] == offer_key(ch.offer), f"relid {relid} not held live"
        elif ch.kind in (ChanState.REVOKED, ChanState.REOFFERED):
            assert held == "rescinded", f"relid {relid} {ch.state.name} but the guest holds it {held}"
            assert not ch.released
        else:
            assert ch.kind == ChanState.CLIENT_RELEASED
            assert held is None, f"relid {relid} is client-released but the guest holds it"
    assert set(ledger.known) <= set(host.channels)


def check_structure(host: s.HostConnection) -> None:
    for relid, ch in host.channels.items():
        assert isinstance(ch.state, s.CHANNEL_STATES) and isinstance(ch.kind, ChanState)
        assert 1 <= relid <= s.MAX_CHANNELS < 2048 and ch.relid == relid
        if ch.kind == ChanState.REOFFERED:
            assert ch.reoffer is not None
        if ch.kind in (ChanState.OPENING, ChanState.OPEN, ChanState.CLOSING, ChanState.CLOSING_REOPEN):
            assert ch.params is not None
        if ch.kind == ChanState.CLOSING_REOPEN:
            assert ch.reopen is not None
    for (gid, relid), g in host.gpadls.items():
        assert g.gpadl.gpadl == gid and g.gpadl.relid == relid
        assert g.ring_users in (0, 1), f"GPADL {gid:#x} ring_users {g.ring_users}"
        assert (g.state == GpadlState.TEARDOWN_DEFERRED) <= (g.ring_users == 1)
        assert (g.state == GpadlState.TEARING_DOWN) <= (g.ring_users == 0)
        assert g.state != GpadlState.IN_PROGRESS
        assert relid in host.channels, f"GPADL {gid:#x} on freed relid {relid}"
        ch = host.channels[relid]
        if g.state == GpadlState.TEARING_DOWN:  # waits for the device, whatever the guest did since
            assert not ch.revoked, f"GPADL {gid:#x} tearing down on rescinded relid {relid}"
        else:
            assert ch.kind != ChanState.CLIENT_RELEASED, f"GPADL {gid:#x} on released {relid}"
    for gid, asm in host.in_progress.items():
        assert asm.gpadl == gid and not asm.complete
        assert asm.relid in host.channels, f"in-progress GPADL {gid:#x} on freed relid {asm.relid}"
    if host.state == ConnState.DISCONNECTED:
        assert not host.gpadls and not host.in_progress


def snapshot(host: s.HostConnection) -> Any:
    return (host.state, host.version, host.offers_sent,
            {r: (ch.state, ch.seq, ch.device_busy, ch.device_open, ch.released, ch.params, ch.reopen, ch.offer,
                 ch.reoffer) for r, ch in host.channels.items()},
            {k: (g.state, g.ring_users) for k, g in host.gpadls.items()},
            {k: (a.relid, tuple(a.pfns)) for k, a in host.in_progress.items()})


# ---- part 1: the host core under random guest input ----------------------------------------------------

class HostFuzz(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.host = s.HostConnection(INITIAL)
        self.ledger = GuestLedger(self._tearing_down)
        self.pending: list[Request] = []
        self.answered: list[Request] = []

    # -- plumbing

    def _process(self, acts: list[s.Action], sent: m.Message | None = None) -> None:
        if sent is not None:
            dropped = any(isinstance(a, s.Dropped) and a.message is sent for a in acts)
            self.ledger.sent(sent, dropped)
        unloaded = False
        for act in acts:
            if isinstance(act, s.Send):
                msg = wire(act.message)
                assert msg.MSGTYPE in m.HOST_TO_GUEST
                if isinstance(msg, m.UnloadResponse):
                    self.ledger.received_unload_response()
                    unloaded = True
                else:
                    self.ledger.received(msg)
            elif isinstance(act, s.DeviceOpen | s.DeviceClose):
                relid = act.params.relid if isinstance(act, s.DeviceOpen) else act.relid
                assert relid not in open_close_relids(self.pending), f"two device requests in flight on relid {relid}"
                self.pending.append(act)
            elif isinstance(act, s.TeardownGpadl):
                g = self.host.gpadls.get((act.gpadl, act.relid))
                assert g is not None and g.state == GpadlState.TEARING_DOWN and g.ring_users == 0
                self.pending.append(act)
            elif isinstance(act, s.Dropped):
                assert act.reason and isinstance(act.kind, s.DropKind)
            elif isinstance(act, s.Disconnected):
                assert isinstance(act.reason, s.DisconnectReason)
        if unloaded:
            assert self.host.state == ConnState.DISCONNECTED
            assert not self.host.gpadls and not self.host.in_progress
            assert all(ch.kind == ChanState.CLIENT_RELEASED for ch in self.host.channels.values())

    def guest_sends(self, msg: m.Message) -> None:
        msg = wire(msg)
        self.host.receive(msg)
        acts = self.host.actions()
        self._process(acts, msg)
        if isinstance(msg, m.GpadlTeardown) and m.GpadlTorndown(gpadl=msg.gpadl) in [
                a.message for a in acts if isinstance(a, s.Send)]:
            # Answered at once: never while a live channel's device still maps that GPADL as its ring.
            ch = self.host.channels.get(msg.child_relid)
            assert ch is None or ch.kind in (ChanState.REVOKED, ChanState.REOFFERED) or ch.params is None \
                or ch.params.gpadl.gpadl != msg.gpadl, "GPADL_TORNDOWN for a ring still in use"

    def _answer(self, act: Request, ok: bool) -> None:
        answer(self.host, act, ok)
        self._process(self.host.actions())

    def settle(self, oks: list[bool] | None = None) -> None:
        for i in range(1000):
            if not self.pending:
                return
            act = self.pending.pop(0)
            self.answered.append(act)
            self._answer(act, oks[i % len(oks)] if oks else True)
        raise AssertionError("device requests never settle")

    def _tearing_down(self, relid: int, gid: int) -> bool:
        g = self.host.gpadls.get((gid, relid))
        return g is not None and g.state in (GpadlState.TEARDOWN_DEFERRED, GpadlState.TEARING_DOWN)

    def _ch(self, relid: int) -> s.HostChannel | None:
        return self.host.channels.get(relid)

    # -- drawing relids and GPADL ids: mostly real ones, sometimes unknown ones

    def _relid(self, data: st.DataObject) -> int:
        real = sorted(self.host.channels)
        return data.draw(st.sampled_from(real * 4 + [0, 9, 2047, 0xFFFFFFFF]) if real else BAD_RELIDS)

    def _relid_in(self, data: st.DataObject, *states: ChanState) -> int:
        """Usually a relid in one of ``states`` (if any), else any relid."""
        match = sorted(r for r, ch in self.host.channels.items() if ch.kind in states)
        if bool(match) and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(match))
        return self._relid(data)

    def _gid(self, data: st.DataObject) -> int:
        ids = sorted({g for g, _ in self.host.gpadls} | set(self.host.in_progress))
        return data.draw(st.sampled_from(ids * 2 + [1, 2, 0xE1E10]))

    # -- connection

    @initialize(version=st.sampled_from([Version.WIN10_V6_0, Version.WIN10_V5_3, Version.WIN10_V5_2,
                                         Version.WIN10_V4_1, Version.WIN8_1, Version.WIN7, Version.WS2008]),
                request=st.booleans())
    def connect(self, version: Version, request: bool) -> None:
        sint = 2 if version >= Version.WIN10_V5 else 0
        self.guest_sends(m.InitiateContact(vmbus_version_requested=version, interrupt_page=sint))
        assert self.host.state == ConnState.CONNECTED
        if request:
            self.guest_sends(m.RequestOffers())

    @precondition(lambda self: self.host.state != ConnState.CONNECTED)
    @rule(version=st.sampled_from([Version.WIN10_V6_0, Version.WIN10_V5_3, Version.WIN8, Version.WIN7]))
    def reconnect(self, version: Version) -> None:
        """A well-behaved guest (re)connects: INITIATE_CONTACT then, once accepted, REQUESTOFFERS."""
        self.guest_sends(m.InitiateContact(vmbus_version_requested=version,
                                           interrupt_page=2 if version >= Version.WIN10_V5 else 0))
        if self.host.state == ConnState.CONNECTED:
            self.guest_sends(m.RequestOffers())

    @rule(version=VERSIONS, sint=st.sampled_from([2, 2, 2, 0, 3]),
          monitors=st.sampled_from([(0, 0), (0, 0), (0x1000, 0x2000), (0x1000, 0), (0, 0x2000)]),
          features=st.sampled_from([0, 0xFF]))
    def initiate_contact(self, version: int, sint: int, monitors: tuple[int, int], features: int) -> None:
        self.guest_sends(m.InitiateContact(vmbus_version_requested=version, interrupt_page=(features << 32) | sint,
                                           monitor_page1=monitors[0], monitor_page2=monitors[1]))

    @precondition(lambda self: self.host.state != ConnState.CONNECTED)
    @rule(data=st.data())
    def message_while_not_connected(self, data: st.DataObject) -> None:
        relid, gid = self._relid(data), self._gid(data)
        msg = data.draw(st.sampled_from([
            m.RequestOffers(), m.Unload(), m.CloseChannel(child_relid=relid), m.RelidReleased(child_relid=relid),
            m.GpadlTeardown(child_relid=relid, gpadl=gid), m.ModifyChannel(child_relid=relid, target_vp=1),
            m.GpadlBody(msgnumber=0, gpadl=gid, pfns=(1,)),
            m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                          downstream_ringbuffer_pageoffset=2),
            split(relid, gid, list(range(8)))[0]]))
        before = snapshot(self.host)
        self.guest_sends(msg)
        assert snapshot(self.host) == before  # dropped: nothing changes while not connected

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule()
    def request_offers(self) -> None:
        self.guest_sends(m.RequestOffers())

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule()
    def unload(self) -> None:
        self.guest_sends(m.Unload())

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data(), vp=st.sampled_from([0, 1, 0xFFFFFFFF]))
    def modify_channel(self, data: st.DataObject, vp: int) -> None:
        self.guest_sends(m.ModifyChannel(child_relid=self._relid(data), target_vp=vp))

    def host_message_from_guest(self, data: st.DataObject) -> None:
        msg = data.draw(st.sampled_from(HOST_MESSAGES))
        before = snapshot(self.host)
        self.host.receive(wire(msg))
        acts = self.host.actions()
        assert len(acts) == 1 and isinstance(acts[0], s.Dropped)
        assert snapshot(self.host) == before

    @rule(data=st.data(), kind=st.sampled_from(["host_message", "malformed", "stale"]))
    def noise(self, data: st.DataObject, kind: str) -> None:
        """Input that must change nothing (or only be answered): a host-to-guest message sent by the guest,
        an undecodable message, a device answer with a stale or never-issued sequence number."""
        {"host_message": self.host_message_from_guest, "malformed": self.malformed,
         "stale": self.stale_device_answer}[kind](data)

    # -- GPADLs

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data(), pages=st.integers(1, 70),
          variant=st.sampled_from(["ring"] * 6 + ["buflen", "offset", "rangecount", "slots", "not_ring",
                                                  "unaligned", "two_ranges", "empty", "extra_pfn"]))
    def gpadl_header(self, data: st.DataObject, pages: int, variant: str) -> None:
        relid, gid = self._relid(data), self._gid(data)
        pfns = list(range(0x5000 + 100 * gid, 0x5000 + 100 * gid + pages))
        header, _ = split(relid, gid, pfns)
        if variant == "buflen":
            header.range_buflen = (header.range_buflen + 8) & 0xFFFF
        elif variant == "offset":
            header.ranges = ((pages * 4096, 4096),)
        elif variant == "rangecount":
            header.rangecount = 2
        elif variant == "slots":
            header.ranges = ((pages * 4096, 0), (4096, 0))
            header.rangecount = 2
            header.range_buflen = 16 + 8 * (pages + 1)
            header.pfns = tuple(range(26))
        elif variant == "not_ring":
            header.ranges = ((pages * 4096 - 100, 0),)
        elif variant == "unaligned":
            header.ranges = ((pages * 4096 - 100, 100),)
        elif variant == "two_ranges" and pages >= 2:
            half = pages // 2
            header.ranges = ((half * 4096, 0), ((pages - half) * 4096, 0))
            header.rangecount = 2
            header.range_buflen = 16 + 8 * pages
            header.pfns = tuple(pfns[:25])
        elif variant == "empty":
            header.ranges = ((0, 0),)
        elif variant == "extra_pfn" and pages < 26:
            header.pfns = (*header.pfns, 1)
        self.guest_sends(header)

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data(), n=st.integers(0, 28))
    def gpadl_body(self, data: st.DataObject, n: int) -> None:
        self.guest_sends(m.GpadlBody(msgnumber=0, gpadl=self._gid(data), pfns=tuple(range(0x9000, 0x9000 + n))))

    def malformed(self, data: st.DataObject) -> None:
        """A message that does not decode (one field corrupted, or an unknown extra field)."""
        kind = data.draw(st.sampled_from(["header", "header", "body", "open", "teardown"]))
        bad = data.draw(st.sampled_from([-1, "x", None, 2**40, [1] * 30, True, b"\0" * 200]))
        relid, gid = self._relid(data), self._gid(data)
        msg = {"header": split(relid, gid, list(range(30)))[0], "body": m.GpadlBody(msgnumber=0, gpadl=gid),
               "open": m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                                     downstream_ringbuffer_pageoffset=2),
               "teardown": m.GpadlTeardown(child_relid=relid, gpadl=gid)}[kind]
        obj = msg.to_dict()
        name = data.draw(st.sampled_from([*sorted(k for k in obj if k != "msgtype"), "extra"]))
        obj[name] = bad
        with pytest.raises(MessageError) as info:
            m.decode(msgpack.packb(obj, use_bin_type=True))
        err = info.value
        assert err.msgtype == msg.MSGTYPE and err.raw == obj
        self.ledger.sent_malformed(err)
        self.host.receive_malformed(err)
        acts = self.host.actions()
        assert any(isinstance(a, s.Dropped) for a in acts)
        self._process(acts)

    @precondition(lambda self: bool(self.host.in_progress))
    @rule(data=st.data())
    def finish_gpadl(self, data: st.DataObject) -> None:
        gid = data.draw(st.sampled_from(sorted(self.host.in_progress)))
        asm = self.host.in_progress[gid]
        left = asm.expected_pfns - len(asm.pfns)
        for i in range(0, left, 28):
            self.guest_sends(m.GpadlBody(msgnumber=0, gpadl=gid, pfns=tuple(range(i, min(left, i + 28)))))

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data())
    def gpadl_teardown(self, data: st.DataObject) -> None:
        if bool(self.host.gpadls) and data.draw(st.booleans()):
            gid, relid = data.draw(st.sampled_from(sorted(self.host.gpadls)))
        else:
            relid, gid = self._relid(data), self._gid(data)
        ch = self._ch(relid)
        if "teardown-on-released-relid" in KNOWN_BUGS and ch is not None and ch.released:
            return
        self.guest_sends(m.GpadlTeardown(child_relid=relid, gpadl=gid))

    # -- channels

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data(), offset=st.integers(0, 40), openid=st.sampled_from([0, 1, 2, 3, 77]))
    def open_channel(self, data: st.DataObject, offset: int, openid: int) -> None:
        self.guest_sends(m.OpenChannel(child_relid=self._relid(data), openid=openid,
                                       ringbuffer_gpadlhandle=self._gid(data),
                                       downstream_ringbuffer_pageoffset=offset, target_vp=0))

    @precondition(lambda self: any(g.state == GpadlState.ACCEPTED for g in self.host.gpadls.values()))
    @rule(data=st.data(), vp=st.sampled_from([0, 0, 2, m.VP_INDEX_DISABLE_INTERRUPT]))
    def open_with_ring(self, data: st.DataObject, vp: int) -> None:
        gid, relid = data.draw(st.sampled_from(sorted(k for k, g in self.host.gpadls.items()
                                                      if g.state == GpadlState.ACCEPTED)))
        pages = self.host.gpadls[(gid, relid)].gpadl.page_count
        offset = data.draw(st.integers(min(2, pages), max(2, pages - 2)))
        self.guest_sends(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                                       downstream_ringbuffer_pageoffset=offset, target_vp=vp))

    @precondition(lambda self: any(ch.kind == ChanState.CLOSED for ch in self.host.channels.values()))
    @rule(data=st.data(), pages=st.sampled_from([4, 8, 40]))
    def create_gpadl_and_open(self, data: st.DataObject, pages: int) -> None:
        """What Linux does to open a channel: the ring GPADL (header + bodies), then OPENCHANNEL."""
        relid = data.draw(st.sampled_from(sorted(r for r, ch in self.host.channels.items()
                                                 if ch.kind == ChanState.CLOSED)))
        gid = data.draw(st.sampled_from([1, 2, 3, 0xE1E10]))
        header, bodies = split(relid, gid, list(range(0x7000, 0x7000 + pages)))
        for msg in (header, *bodies):
            self.guest_sends(msg)
        self.guest_sends(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                                       downstream_ringbuffer_pageoffset=pages // 2))

    @precondition(lambda self: any(ch.kind == ChanState.CLOSED for ch in self.host.channels.values()))
    @rule(data=st.data(), pages=st.sampled_from([4, 8, 40]))
    def bring_up(self, data: st.DataObject, pages: int) -> None:
        """A channel all the way to OPEN in one step: ring GPADL, OPENCHANNEL, and the device says yes."""
        self.create_gpadl_and_open(data, pages)
        opens = [p for p in self.pending if isinstance(p, s.DeviceOpen)]
        if opens:
            self.pending.remove(opens[-1])
            self.answered.append(opens[-1])
            self._answer(opens[-1], True)

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data())
    def close_channel(self, data: st.DataObject) -> None:
        self.guest_sends(m.CloseChannel(child_relid=self._relid_in(data, ChanState.OPEN)))

    @precondition(lambda self: any(ch.kind == ChanState.OPEN for ch in self.host.channels.values()))
    @rule(data=st.data(), teardown_first=st.booleans())
    def linux_close(self, data: st.DataObject, teardown_first: bool) -> None:
        """Linux vmbus_close: CLOSECHANNEL, then GPADL_TEARDOWN of the ring (or, out of order, the reverse)."""
        relid = data.draw(st.sampled_from(sorted(r for r, ch in self.host.channels.items()
                                                 if ch.kind == ChanState.OPEN)))
        params = self.host.channels[relid].params
        assert params is not None
        msgs: list[m.Message] = [m.CloseChannel(child_relid=relid),
                                 m.GpadlTeardown(child_relid=relid, gpadl=params.gpadl.gpadl)]
        for msg in reversed(msgs) if teardown_first else msgs:
            self.guest_sends(msg)

    @precondition(lambda self: self.host.state == ConnState.CONNECTED)
    @rule(data=st.data())
    def relid_released(self, data: st.DataObject) -> None:
        relid = self._relid_in(data, ChanState.REVOKED, ChanState.REOFFERED, ChanState.CLOSING)
        self.guest_sends(m.RelidReleased(child_relid=relid))

    # -- devices

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def device_answers(self, data: st.DataObject) -> None:
        act = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self.answered.append(act)
        self._answer(act, data.draw(st.sampled_from([True, True, True, False])))

    def stale_device_answer(self, data: st.DataObject) -> None:
        # A GPADL id is the teardown's only token (as in OpenVMM): a replay for an id the guest created and
        # tore down again is not stale, so it is not replayed here.
        choices: list[Request] = [
            *(a for a in self.answered
              if not (isinstance(a, s.TeardownGpadl) and self._tearing_down(a.relid, a.gpadl))),
            s.DeviceOpen(POOL[0], s.OpenParams(1, 1, _ring_gpadl(1, 1), 4, 0, b""), 10**6),
            s.DeviceClose(POOL[0], 2, 10**6 + 1), s.TeardownGpadl(POOL[0], 1, 0xE1E1E)]  # never issued
        act = data.draw(st.sampled_from(choices))
        before = snapshot(self.host)
        answer(self.host, act, data.draw(st.booleans()))
        assert self.host.actions() == []
        assert snapshot(self.host) == before

    @rule(oks=st.lists(st.booleans(), min_size=1, max_size=4))
    def settle_and_check(self, oks: list[bool]) -> None:
        self.settle(oks)
        check_at_rest(self.host, self.ledger)

    # -- host side

    @precondition(lambda self: bool(self.host.channels))
    @rule(data=st.data())
    def rescind(self, data: st.DataObject) -> None:
        busy = sorted(r for r, ch in self.host.channels.items()
                      if ch.kind not in (ChanState.CLOSED, ChanState.CLIENT_RELEASED))
        prefer_busy = bool(busy) and data.draw(st.booleans())
        relid = data.draw(st.sampled_from(busy if prefer_busy else sorted(self.host.channels)))
        ch = self.host.channels[relid]
        if "torndown-after-release" in KNOWN_BUGS and ch.kind in RELEASED_STATES and any(
                r == relid and g.state == GpadlState.TEARDOWN_DEFERRED for (_, r), g in self.host.gpadls.items()):
            return
        kind, op, released = ch.kind, ch.seq, ch.released
        before = snapshot(self.host) if kind == ChanState.REVOKED else None
        self.host.rescind(relid)
        acts = self.host.actions()
        if kind == ChanState.REOFFERED:  # OpenVMM revoke: the pending re-offer is withdrawn, nothing is sent
            assert acts == [] and self.host.channels[relid].kind == ChanState.REVOKED
            assert (self.host.channels[relid].seq, self.host.channels[relid].released) == (op, released)
        self._process(acts)
        if before is not None:
            assert snapshot(self.host) == before  # rescinding twice changes nothing

    @rule(data=st.data())
    def add_offer(self, data: st.DataObject) -> None:
        revoked = [ch.offer for ch in self.host.channels.values() if ch.kind == ChanState.REVOKED]
        prefer_revoked = bool(revoked) and data.draw(st.booleans())
        spec = data.draw(st.sampled_from(revoked if prefer_revoked else POOL))
        primary, primary_ok = primary_of(self.host, spec)
        if not primary_ok:
            with pytest.raises(ValueError, match="primary"):
                self.host.add_offer(spec, primary)
            assert self.host.actions() == []
            return
        same = [ch for ch in self.host.channels.values() if offer_key(ch.offer) == offer_key(spec)]
        if any(ch.kind != ChanState.REVOKED for ch in same):
            with pytest.raises(ValueError, match="exists"):
                self.host.add_offer(spec, primary)
            assert self.host.actions() == []
            return
        relid = self.host.add_offer(spec, primary)
        assert 1 <= relid <= s.MAX_CHANNELS
        if same:
            assert relid == same[0].relid and self.host.channels[relid].kind == ChanState.REOFFERED
        self._process(self.host.actions())

    # -- invariants

    @invariant()
    def structure(self) -> None:
        check_structure(self.host)
        busy = {r for r, ch in self.host.channels.items() if ch.device_busy}
        assert busy == set(open_close_relids(self.pending))
        for p in self.pending:
            if isinstance(p, s.DeviceOpen | s.DeviceClose):
                relid = p.params.relid if isinstance(p, s.DeviceOpen) else p.relid
                assert self.host.channels[relid].seq == p.seq
        tearing = {k for k, g in self.host.gpadls.items() if g.state == GpadlState.TEARING_DOWN}
        assert tearing <= {(p.gpadl, p.relid) for p in self.pending if isinstance(p, s.TeardownGpadl)}
        assert (self.host.state == ConnState.CONNECTED) == self.ledger.connected

    def teardown(self) -> None:
        # Everything settles and every owed answer arrives; then the guest closes what is open, and unloads.
        self.settle()
        check_at_rest(self.host, self.ledger)
        if self.host.state == ConnState.CONNECTED:
            for relid, held in sorted(self.ledger.known.items()):
                if held == "live" and self.host.channels[relid].kind == ChanState.OPEN:
                    self.guest_sends(m.CloseChannel(child_relid=relid))
            self.settle()
            check_at_rest(self.host, self.ledger)
            assert not +self.ledger.teardown_waiting, "GPADL_TEARDOWN unanswered after every channel closed"
            self.guest_sends(m.Unload())
            self.settle()
            check_at_rest(self.host, self.ledger)
            assert conn_state(self.host) == ConnState.DISCONNECTED and self.host.version == 0
        assert not self.host.gpadls and not self.host.in_progress
        assert all(ch.kind == ChanState.CLIENT_RELEASED for ch in self.host.channels.values())


def _ring_gpadl(relid: int, gid: int) -> Gpadl:
    return Gpadl(relid, gid, ((8 * 4096, 0),), tuple(range(8)))


HostFuzz.TestCase.settings = settings(max_examples=400, stateful_step_count=50, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
test_host_core_under_random_guest_input = HostFuzz.TestCase


# ---- part 2: the channel state x message table ---------------------------------------------------------

RING, SPARE, NEW = 10, 11, 20  # the ring GPADL, a second accepted GPADL, a GPADL created by the message
TABLE_STATE = {row: ChanState(state) for row, state in STATE_OF_ROW.items()}  # table row -> its state


class Table:
    """A host connected at 5.3 with relid 1 (storage) driven into one channel state.

    Relid 1 holds two accepted 8-page GPADLs: RING (used as the ring by every open) and SPARE."""

    def __init__(self, state: str) -> None:
        self.host = s.HostConnection(POOL[:2])
        self.pending: list[Request] = []
        self.device: list[str] = []
        self.send(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
        self.send(m.RequestOffers())
        for gid in (RING, SPARE):
            self.send(split(1, gid, list(range(gid * 100, gid * 100 + 8)))[0])
        steps = {
            "closed": [], "client_released": ["release"], "opening": ["open"], "open": ["open", "ok"],
            "closing": ["open", "ok", "close"], "closing_reopen": ["open", "ok", "close", "open"],
            "revoked": ["rescind"], "revoked_busy": ["open", "ok", "rescind"],
            "reoffered": ["rescind", "reoffer"], "reoffered_busy": ["open", "ok", "rescind", "reoffer"],
            "revoked_released_busy": ["open", "ok", "rescind", "release"],
            "closing_client_release": ["open", "ok", "close", "release"],
        }[state]
        for step in steps:
            if step == "open":
                self.send(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=RING,
                                        downstream_ringbuffer_pageoffset=4))
            elif step == "ok":
                self.answer()
            elif step == "close":
                self.send(m.CloseChannel(child_relid=1))
            elif step == "release":
                self.send(m.RelidReleased(child_relid=1))
            elif step == "rescind":
                self.host.rescind(1)
                self.take(self.host.actions())
            elif step == "reoffer":
                assert self.host.add_offer(POOL[0]) == 1
        assert self.state() == TABLE_STATE[state].value
        assert bool(self.pending) == (state.endswith("_busy") or state in ("opening", "closing", "closing_reopen",
                                                                           "closing_client_release"))
        self.device.clear()

    def take(self, acts: list[s.Action]) -> list[s.Action]:
        for act in acts:
            if isinstance(act, s.DeviceOpen | s.DeviceClose | s.TeardownGpadl):
                self.pending.append(act)
                self.device.append({s.DeviceOpen: "open", s.DeviceClose: "close", s.TeardownGpadl: TD}[type(act)])
        return acts

    def send(self, msg: m.Message) -> list[s.Action]:
        self.host.receive(wire(msg))
        return self.take(self.host.actions())

    def answer(self) -> list[s.Action]:
        answer(self.host, self.pending.pop(0), True)
        return self.take(self.host.actions())

    def state(self) -> str:
        ch = self.host.channels.get(1)
        return "freed" if ch is None else ch.state.name


def _describe(msg: m.Message) -> str:
    if isinstance(msg, m.OpenChannelResult):
        return "OPEN_RESULT:" + ("ok" if msg.status == STATUS_SUCCESS else "fail")
    if isinstance(msg, m.GpadlCreated):
        return "CREATED:" + ("ok" if msg.creation_status == STATUS_SUCCESS else "fail")
    if isinstance(msg, m.ModifyChannelResponse):
        assert msg.status in (0, SIGNED_UNSUCCESSFUL)
        return "MODIFY:" + ("ok" if msg.status == 0 else "fail")
    return {m.GpadlTorndown: "TORNDOWN", m.OfferChannel: "OFFER", m.RescindChannelOffer: "RESCIND"}.get(
        type(msg), msg.MSGTYPE.name)


TABLE_MESSAGES: dict[str, list[m.Message]] = {
    "open": [m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=SPARE, downstream_ringbuffer_pageoffset=4)],
    "close": [m.CloseChannel(child_relid=1)],
    "release": [m.RelidReleased(child_relid=1)],
    "gpadl": [split(1, NEW, list(range(30)))[0], split(1, NEW, list(range(30)))[1][0]],  # header + 1 body
    "teardown": [m.GpadlTeardown(child_relid=1, gpadl=SPARE)],
    "teardown_ring": [m.GpadlTeardown(child_relid=1, gpadl=RING)],
    "modify": [m.ModifyChannel(child_relid=1, target_vp=1)],
    "late_body": [m.GpadlBody(msgnumber=0, gpadl=SPARE, pfns=(1,))],  # SPARE is complete: not in progress
}

XFAIL_CELLS: dict[tuple[str, str], str] = {}


def _cells() -> list[Any]:
    out = []
    for state, row in STATE_TABLE.items():
        for msg in INPUTS:
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL_CELLS[(state, msg)])] \
                if (state, msg) in XFAIL_CELLS else []
            out.append(pytest.param(state, msg, row[msg], id=f"{state}-{msg}", marks=marks))
    return out


def test_state_table_is_complete() -> None:
    assert set(ChanState) - {ChanState.OPENING_CLIENT_RELEASE} == set(TABLE_STATE.values())
    assert set(TABLE_STATE) == set(STATE_TABLE) == set(STATES)
    assert all(set(row) == set(TABLE_MESSAGES) | {"rescind"} == set(INPUTS) for row in STATE_TABLE.values())
    assert {type(x).MSGTYPE for xs in TABLE_MESSAGES.values() for x in xs} == \
        m.GUEST_TO_HOST - {MsgType.INITIATE_CONTACT, MsgType.REQUESTOFFERS, MsgType.UNLOAD}


@pytest.mark.parametrize(("state", "msg", "expected"), _cells())
def test_channel_state_table(state: str, msg: str, expected: Row) -> None:
    t = Table(state)
    acts: list[s.Action] = []
    dropped = False
    if msg == "rescind":
        t.host.rescind(1)
        acts += t.take(t.host.actions())
    for x in TABLE_MESSAGES.get(msg, []):
        got = t.send(x)
        dropped |= any(isinstance(a, s.Dropped) and a.message == x for a in got)
        acts += got
    now = t.state()
    for _ in range(10):
        if not t.pending:
            break
        acts += t.answer()
    sent = tuple(_describe(a.message) for a in acts if isinstance(a, s.Send))
    assert (now, t.state(), sent, dropped, tuple(t.device)) == expected
    check_structure(t.host)


def test_opening_client_release_only_during_disconnect() -> None:
    """OPENING_CLIENT_RELEASE exists only while an UNLOAD / reset waits for the device; every guest message
    but INITIATE_CONTACT is dropped then, and the device's late open is turned into a close."""
    t = Table("opening")
    t.send(m.Unload())
    assert t.state() == "opening_client_release" and t.host.state == ConnState.DISCONNECTING
    for msgs in TABLE_MESSAGES.values():
        for x in msgs:
            before = snapshot(t.host)
            acts = t.send(x)
            assert [type(a) for a in acts] == [s.Dropped]
            assert snapshot(t.host) == before
    acts = t.answer()  # the open succeeds: the host closes it again at once
    assert t.device == ["close"] and not any(isinstance(a, s.Send) for a in acts)
    acts = t.answer()
    assert [a.message for a in acts if isinstance(a, s.Send)] == [m.UnloadResponse()]
    assert t.state() == CR and conn_state(t.host) == ConnState.DISCONNECTED and not t.host.gpadls


@pytest.mark.parametrize("ok", [True, False])
def test_device_open_answers(ok: bool) -> None:
    t = Table("opening")
    acts = t.answer() if ok else _fail_open(t)
    assert [a.message for a in acts if isinstance(a, s.Send)] == [
        m.OpenChannelResult(child_relid=1, openid=1, status=STATUS_SUCCESS if ok else STATUS_UNSUCCESSFUL)]
    assert t.state() == ("open" if ok else "closed")
    assert t.host.gpadls[(RING, 1)].ring_users == int(ok)


def _fail_open(t: Table) -> list[s.Action]:
    act = t.pending.pop(0)
    assert isinstance(act, s.DeviceOpen)
    assert (act.params.downstream_offset, act.params.guest_to_host_data, act.params.host_to_guest_data) == \
        (4, 3 * 4096, 3 * 4096)
    t.host.open_complete(1, act.seq, False)
    return t.take(t.host.actions())


def test_failed_open_releases_a_deferred_ring_teardown() -> None:
    t = Table("opening")
    assert t.send(m.GpadlTeardown(child_relid=1, gpadl=RING)) == []
    acts = _fail_open(t)
    assert [_describe(a.message) for a in acts if isinstance(a, s.Send)] == ["TORNDOWN", FAIL_RESULT]
    assert (RING, 1) not in t.host.gpadls


@pytest.mark.parametrize(("state", "ok"), [("opening", True), ("opening", False), ("revoked_busy", True)])
def test_rescind_while_device_busy_frees_after_release(state: str, ok: bool) -> None:
    t = Table(state)
    if state == "opening":
        t.host.rescind(1)
        assert [_describe(a.message) for a in t.take(t.host.actions()) if isinstance(a, s.Send)] == [
            "RESCIND"]
    t.send(m.RelidReleased(child_relid=1))
    assert t.state() == "revoked"
    act = t.pending.pop(0)
    if isinstance(act, s.DeviceOpen):
        t.host.open_complete(1, act.seq, ok)
        acts = t.take(t.host.actions())
        if ok:  # the late open becomes a close, and nothing reaches the guest
            assert t.device == ["close"] and not any(isinstance(a, s.Send) for a in acts)
            t.answer()
    else:
        assert isinstance(act, s.DeviceClose)
        t.host.close_complete(1, act.seq)
    assert t.state() == "freed" and not any(k[1] == 1 for k in t.host.gpadls)


def test_rescind_of_open_channel_answers_pending_gpadl_requests() -> None:
    t = Table("open")
    t.send(m.GpadlTeardown(child_relid=1, gpadl=RING))  # deferred: the ring is in use
    header, _ = split(1, NEW, list(range(40)))
    t.send(header)  # in progress
    t.host.rescind(1)
    sent = [a.message for a in t.take(t.host.actions()) if isinstance(a, s.Send)]
    assert sent == [m.RescindChannelOffer(child_relid=1),
                    m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=STATUS_UNSUCCESSFUL),
                    m.GpadlTorndown(gpadl=RING)]
    assert t.device == ["close"] and not t.host.in_progress
    assert (SPARE, 1) in t.host.gpadls  # accepted GPADLs stay until the guest releases the relid


@pytest.mark.parametrize("state", ["revoked", "revoked_busy", "reoffered"])
@pytest.mark.parametrize("bodies", [0, 2])
def test_gpadl_completing_on_a_revoked_channel_fails(state: str, bodies: int) -> None:
    """OpenVMM channels.rs gpadl_updated (called when a GPADL_HEADER needs no body and when the last
    GPADL_BODY arrives): on a revoked channel it sends GPADL_CREATED(protocol::STATUS_UNSUCCESSFUL =
    0x8000ffff) and the GPADL is removed from the map, so a later GPADL_TEARDOWN of it is UnknownGpadlId:
    logged and dropped, no GPADL_TORNDOWN."""
    t = Table(state)
    header, rest = split(1, NEW, list(range(0x700, 0x700 + (8 if bodies == 0 else 26 + 28 + 5))))
    assert len(rest) == bodies
    *first, last = [header, *rest]
    for x in first:
        assert sends(t.send(x)) == []  # in progress: accepted on a revoked channel, as in OpenVMM
    acts = t.send(last)
    assert sends(acts) == [m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=0x8000FFFF)]
    assert [a.reason for a in acts if isinstance(a, s.Dropped)] == [
        f"GPADL {NEW:#x} completed on rescinded relid 1"]
    assert (NEW, 1) not in t.host.gpadls and NEW not in t.host.in_progress
    # A teardown of it is one of an unknown GPADL: dropped, never answered.
    acts = t.send(m.GpadlTeardown(child_relid=1, gpadl=NEW))
    assert sends(acts) == [] and [a.reason for a in acts if isinstance(a, s.Dropped)] == [
        f"GPADL {NEW:#x} on relid 1 is not an accepted GPADL"]
    # GPADLs accepted before the rescind are untouched, and the id can be tried again (and fails again).
    assert (SPARE, 1) in t.host.gpadls
    assert [_describe(x) for x in sends(t.send(split(1, NEW, list(range(8)))[0]))] == ["CREATED:fail"]
    check_structure(t.host)


# ---- connection level ----------------------------------------------------------------------------------

def _contact(h: s.HostConnection, version: int, sint: int = 2, monitors: tuple[int, int] = (0, 0),
             features: int = 0) -> m.VersionResponse:
    h.receive(wire(m.InitiateContact(vmbus_version_requested=version, interrupt_page=(features << 32) | sint,
                                     monitor_page1=monitors[0], monitor_page2=monitors[1])))
    sends = [a.message for a in h.actions() if isinstance(a, s.Send)]
    assert len(sends) == 1 and isinstance(sends[0], m.VersionResponse)
    return sends[0]


@pytest.mark.parametrize("version", list(Version))
def test_initiate_contact_accepts_every_real_version(version: Version) -> None:
    h = s.HostConnection(INITIAL)
    resp = _contact(h, version, sint=2 if version >= Version.WIN10_V5 else 0x77)  # sint ignored before 5.0
    conn_id = 1 if version >= Version.WIN10_V5 else int(version)
    assert resp == m.VersionResponse(version_supported=1, msg_conn_id=conn_id)
    assert h.state == ConnState.CONNECTED and h.version == version


@pytest.mark.parametrize("version", [0, 1, 0x00020000, 0x00050004, 0x00070000, 0xFFFFFFFF])
def test_initiate_contact_refuses_unknown_versions(version: int) -> None:
    h = s.HostConnection(INITIAL)
    assert _contact(h, version) == m.VersionResponse(version_supported=0)
    assert h.state == ConnState.DISCONNECTED


def test_initiate_contact_refuses_versions_the_host_does_not_support() -> None:
    h = s.HostConnection(INITIAL, supported={Version.WIN8_1})
    assert _contact(h, Version.WIN10_V5_3).version_supported == 0
    assert _contact(h, Version.WIN8_1).version_supported == 1


@pytest.mark.parametrize("sint", [0, 1, 3, 0xFF])
def test_initiate_contact_from_5_0_needs_sint_2(sint: int) -> None:
    h = s.HostConnection(INITIAL)
    assert _contact(h, Version.WIN10_V5_3, sint=sint).version_supported == 0
    assert h.state == ConnState.DISCONNECTED


@pytest.mark.parametrize(("version", "resp"), [
    (Version.WIN7, m.VersionResponse(version_supported=0)),  # failures cannot be reported before WIN8
    (Version.WIN8, m.VersionResponse(version_supported=1, msg_conn_id=Version.WIN8,
                                     connection_state=m.ConnectionState.FAILED_UNKNOWN_FAILURE)),
    (Version.WIN10_V5_3, m.VersionResponse(version_supported=1, msg_conn_id=1,
                                           connection_state=m.ConnectionState.FAILED_UNKNOWN_FAILURE)),
])
def test_initiate_contact_with_one_monitor_page(version: Version, resp: m.VersionResponse) -> None:
    for monitors in ((0x1000, 0), (0, 0x2000)):
        h = s.HostConnection(INITIAL)
        assert _contact(h, version, monitors=monitors) == resp
        assert h.state == ConnState.DISCONNECTED
    assert _contact(s.HostConnection(INITIAL), version, monitors=(0x1000, 0x2000)).version_supported == 1


def test_feature_flags_are_intersected_from_6_0_only() -> None:
    assert _contact(s.HostConnection(INITIAL), Version.WIN10_V6_0, features=0xFF).supported_features == \
        0xFF & s.FEATURES_SUPPORTED
    assert _contact(s.HostConnection(INITIAL), Version.WIN10_V5_3, features=0xFF).supported_features == 0


@pytest.mark.parametrize("msg", [m.RequestOffers(), m.Unload(), m.CloseChannel(child_relid=1),
                                 m.RelidReleased(child_relid=1), m.ModifyChannel(child_relid=1, target_vp=0),
                                 m.GpadlTeardown(child_relid=1, gpadl=1), m.GpadlBody(msgnumber=0, gpadl=1),
                                 split(1, 1, [1])[0],
                                 m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=1,
                                               downstream_ringbuffer_pageoffset=2)],
                         ids=lambda x: x.MSGTYPE.name)
def test_everything_but_initiate_contact_is_dropped_while_disconnected(msg: m.Message) -> None:
    h = s.HostConnection(INITIAL)
    h.receive(wire(msg))
    acts = h.actions()
    assert len(acts) == 1 and isinstance(acts[0], s.Dropped) and "disconnected" in acts[0].reason


def test_request_offers_once_per_connection() -> None:
    h = s.HostConnection(INITIAL)
    _contact(h, Version.WIN10_V5_3)
    h.receive(m.RequestOffers())
    sent = [a.message for a in h.actions() if isinstance(a, s.Send)]
    assert [type(x) for x in sent] == [m.OfferChannel] * 3 + [m.AllOffersDelivered]
    assert [x.child_relid for x in sent[:3]] == [1, 2, 3]  # type: ignore[attr-defined]
    assert [x.connection_id for x in sent[:3]] == [0x2001, 0x2002, 0x2003]  # type: ignore[attr-defined]
    h.receive(m.RequestOffers())
    assert [type(a) for a in h.actions()] == [s.Dropped]
    h.add_offer(POOL[3])  # hot add: offered at once
    assert [a.message for a in h.actions()] == [POOL[3].message(4)]  # type: ignore[union-attr]


@pytest.mark.parametrize(("version", "answered"), [(Version.WS2008, False), (Version.WIN7, True),
                                                   (Version.WIN10_V6_0, True)])
def test_unload_response_from_win7(version: Version, answered: bool) -> None:
    h = s.HostConnection(INITIAL)
    _contact(h, version, sint=2)
    h.receive(m.Unload())
    acts = h.actions()
    assert ([a.message for a in acts if isinstance(a, s.Send)] == [m.UnloadResponse()]) == answered
    assert s.Disconnected(s.DisconnectReason.UNLOAD) in acts
    assert h.state == ConnState.DISCONNECTED and h.version == 0


@pytest.mark.parametrize(("version", "response"), [(Version.WIN10, None), (Version.WIN10_V4_1, False),
                                                   (Version.WIN10_V5_2, False), (Version.WIN10_V5_3, True)])
def test_modifychannel_by_version(version: Version, response: bool | None) -> None:
    """Below 4.1 MODIFYCHANNEL does not exist (dropped); 4.1-5.2 it works silently; from 5.3 it is answered."""
    h = s.HostConnection(INITIAL)
    _contact(h, version)
    h.receive(m.RequestOffers())
    h.receive(split(1, 1, list(range(8)))[0])
    h.receive(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=1, downstream_ringbuffer_pageoffset=4))
    op = next(a for a in h.actions() if isinstance(a, s.DeviceOpen))
    h.open_complete(1, op.seq, True)
    h.actions()
    h.receive(m.ModifyChannel(child_relid=1, target_vp=3))
    acts = h.actions()
    sends = [a.message for a in acts if isinstance(a, s.Send)]
    if response is None:
        assert [type(a) for a in acts] == [s.Dropped] and h.channels[1].target_vp == 0
    else:
        assert sends == ([m.ModifyChannelResponse(child_relid=1, status=0)] if response else [])
        assert h.channels[1].target_vp == 3


def _open_host(version: Version, target_vp: int) -> s.HostConnection:
    """A host connected at ``version`` with relid 1 open on an 8-page ring, opened with ``target_vp``."""
    h = s.HostConnection(INITIAL)
    _contact(h, version)
    h.receive(m.RequestOffers())
    h.receive(split(1, 1, list(range(8)))[0])
    h.receive(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=1, downstream_ringbuffer_pageoffset=4,
                            target_vp=target_vp))
    op = next(a for a in h.actions() if isinstance(a, s.DeviceOpen))
    h.open_complete(1, op.seq, True)
    h.actions()
    assert h.channels[1].kind == ChanState.OPEN
    return h


@pytest.mark.parametrize("version", [Version.WIN10_V4_1, Version.WIN10_V5_2, Version.WIN10_V5_3,
                                     Version.WIN10_V6_0])
def test_modifychannel_on_a_channel_opened_with_interrupts_disabled_fails(version: Version) -> None:
    """OpenVMM channels.rs modify_channel: a channel opened with target_vp VP_INDEX_DISABLE_INTERRUPT cannot
    be retargeted (InterruptsDisabled); the failure is answered from 5.3, dropped below."""
    h = _open_host(version, m.VP_INDEX_DISABLE_INTERRUPT)
    h.receive(m.ModifyChannel(child_relid=1, target_vp=2))
    acts = h.actions()
    assert [a.message for a in acts if isinstance(a, s.Send)] == (
        [m.ModifyChannelResponse(child_relid=1, status=SIGNED_UNSUCCESSFUL)] if version >= Version.WIN10_V5_3
        else [])
    dropped = [a for a in acts if isinstance(a, s.Dropped)]
    assert len(dropped) == 1 and "interrupts disabled" in dropped[0].reason
    assert h.channels[1].target_vp == m.VP_INDEX_DISABLE_INTERRUPT
    # Reopened with a real VP, the same channel can be retargeted.
    h.receive(m.CloseChannel(child_relid=1))
    h.close_complete(1, next(a for a in h.actions() if isinstance(a, s.DeviceClose)).seq)
    h.receive(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=1, downstream_ringbuffer_pageoffset=4,
                            target_vp=1))
    h.open_complete(1, next(a for a in h.actions() if isinstance(a, s.DeviceOpen)).seq, True)
    h.actions()
    h.receive(m.ModifyChannel(child_relid=1, target_vp=2))
    acts = h.actions()
    assert not any(isinstance(a, s.Dropped) for a in acts) and h.channels[1].target_vp == 2


@pytest.mark.parametrize("relid", [1, 9])
def test_modifychannel_cannot_disable_interrupts(relid: int) -> None:
    """OpenVMM modify_channel checks the new target first (InvalidTargetVp), before the channel."""
    h = _open_host(Version.WIN10_V5_3, 0)
    h.receive(m.ModifyChannel(child_relid=relid, target_vp=m.VP_INDEX_DISABLE_INTERRUPT))
    acts = h.actions()
    assert [a.message for a in acts if isinstance(a, s.Send)] == [
        m.ModifyChannelResponse(child_relid=relid, status=SIGNED_UNSUCCESSFUL)]
    assert [a.reason for a in acts if isinstance(a, s.Dropped)] == [
        f"MODIFYCHANNEL for relid {relid}: target_vp 0xFFFFFFFF cannot disable interrupts"]
    assert h.channels[1].target_vp == 0


def test_gpadl_body_after_completion_is_dropped_without_an_answer() -> None:
    """OpenVMM channels.rs handle_gpadl_body looks the id up among incomplete GPADLs only; a completed one
    has left that map, so its late body is UnknownGpadlId: logged, no GPADL_CREATED (none is owed, and
    a body names no relid), and the completed GPADL is untouched."""
    t = Table("closed")
    header, bodies = split(1, NEW, list(range(0x500, 0x500 + 60)))  # header + 2 bodies
    t.send(header)
    assert [a.message for a in t.send(bodies[0]) if isinstance(a, s.Send)] == []
    assert [a.message for a in t.send(bodies[1]) if isinstance(a, s.Send)] == [
        m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=STATUS_SUCCESS)]
    before = snapshot(t.host)
    pfns = t.host.gpadls[(NEW, 1)].gpadl.pfns
    for late in (bodies[1], m.GpadlBody(msgnumber=0, gpadl=NEW, pfns=(1, 2, 3)), m.GpadlBody(msgnumber=7, gpadl=NEW)):
        acts = t.send(late)
        assert [type(a) for a in acts] == [s.Dropped]
        assert [a.reason for a in acts if isinstance(a, s.Dropped)] == [
            f"GPADL_BODY for unknown GPADL id {NEW:#x} (not in progress; complete on relid 1)"]
        assert snapshot(t.host) == before and tuple(t.host.gpadls[(NEW, 1)].gpadl.pfns) == tuple(pfns)
    # Still a usable ring, and an id never seen is dropped the same way.
    assert [x for x in t.send(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=NEW,
                                            downstream_ringbuffer_pageoffset=30)) if isinstance(x, s.DeviceOpen)]
    acts = t.send(m.GpadlBody(msgnumber=0, gpadl=0x4242, pfns=(1,)))
    assert [(type(a), getattr(a, "reason", "")) for a in acts] == [
        (s.Dropped, "GPADL_BODY for unknown GPADL id 0x4242")]


@pytest.mark.parametrize("version", [*Version])
def test_version_response_has_the_real_size_for_the_version_it_answers(version: Version) -> None:
    """OpenVMM send_version_response_with_target: VersionResponse2 (20 bytes, supported_features) only when
    a 6.0+ version is accepted, VersionResponse (16 bytes) otherwise -- refusals and failures included."""
    accepted = _contact(s.HostConnection(INITIAL), version).to_binary(version)
    assert len(accepted) == (20 if version >= Version.WIN10_V6_0 else 16)
    refused = _contact(s.HostConnection(INITIAL, supported=set(Version) - {version}), version)
    assert refused.version_supported == 0 and len(refused.to_binary(version)) == 16
    failed = _contact(s.HostConnection(INITIAL), version, monitors=(0x1000, 0))
    assert len(failed.to_binary(version)) == (20 if version >= Version.WIN10_V6_0 else 16)


def test_a_new_initiate_contact_resets_and_waits_for_devices() -> None:
    t = Table("open")
    t.send(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    assert t.host.state == ConnState.DISCONNECTING and t.device == ["close"]
    assert t.send(m.InitiateContact(vmbus_version_requested=Version.WIN10_V6_0, interrupt_page=2)) == []
    acts = t.answer()
    assert [a.message for a in acts if isinstance(a, s.Send)] == [m.VersionResponse(version_supported=1,
                                                                                     msg_conn_id=1)]
    # The newest contact is the one answered.
    assert s.Disconnected(s.DisconnectReason.RESET) in acts and s.Connected(Version.WIN10_V6_0) in acts
    assert conn_state(t.host) == ConnState.CONNECTED and not t.host.gpadls and not t.host.offers_sent
    assert t.state() == CR


# ---- malformed guest messages (HostConnection.receive_malformed) ----------------------------------------

def _malformed(msg: m.Message, **changes: object) -> MessageError:
    obj = msg.to_dict()
    obj.update(changes)
    with pytest.raises(MessageError) as info:
        m.decode(msgpack.packb(obj, use_bin_type=True))
    assert info.value.msgtype == msg.MSGTYPE and info.value.raw == obj
    return info.value


def test_malformed_gpadl_header_is_answered_with_a_failure() -> None:
    t = Table("closed")
    t.host.receive_malformed(_malformed(split(1, NEW, list(range(30)))[0], ranges="garbage"))
    acts = t.host.actions()
    assert [a.message for a in acts if isinstance(a, s.Send)] == [
        m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=STATUS_UNSUCCESSFUL)]
    assert [type(a) for a in acts] == [s.Send, s.Dropped]
    # Without a readable relid or gpadl id there is nobody to answer.
    for bad in ({"gpadl": -1}, {"child_relid": "1"}, {"gpadl": True}):
        t.host.receive_malformed(_malformed(split(1, NEW, list(range(30)))[0], **bad))
        assert [type(a) for a in t.host.actions()] == [s.Dropped]


def test_malformed_gpadl_body_fails_the_gpadl_in_progress() -> None:
    t = Table("closed")
    t.send(split(1, NEW, list(range(30)))[0])
    assert NEW in t.host.in_progress
    t.host.receive_malformed(_malformed(m.GpadlBody(msgnumber=0, gpadl=NEW), pfns=list(range(29))))
    assert [a.message for a in t.host.actions() if isinstance(a, s.Send)] == [
        m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=STATUS_UNSUCCESSFUL)]
    assert NEW not in t.host.in_progress
    # A malformed body for no GPADL in progress, and any other malformed message: dropped, no answer.
    for err in (_malformed(m.GpadlBody(msgnumber=0, gpadl=NEW), pfns="x"),
                _malformed(m.CloseChannel(child_relid=1), child_relid=-1),
                _malformed(m.GpadlTeardown(child_relid=1, gpadl=RING), extra=1)):
        before = snapshot(t.host)
        t.host.receive_malformed(err)
        assert [type(a) for a in t.host.actions()] == [s.Dropped]
        assert snapshot(t.host) == before


def test_malformed_gpadl_header_is_not_answered_while_disconnected() -> None:
    # Regression (fixed in 2dad665): receive_malformed answered GPADL_CREATED in any connection state.
    h = s.HostConnection(INITIAL)
    h.receive_malformed(_malformed(split(1, 5, list(range(30)))[0], ranges="garbage"))
    assert [type(a) for a in h.actions()] == [s.Dropped]


# ---- bugs found by these tests, fixed (regression tests) ---------------------------------------------

def test_gpadl_teardown_for_a_released_relid_is_dropped() -> None:
    t = Table("revoked_busy")
    t.send(m.RelidReleased(child_relid=1))
    acts = t.send(m.GpadlTeardown(child_relid=1, gpadl=RING))  # the ring the device still maps
    assert sends(acts) == [] and [type(a) for a in acts] == [s.Dropped]


def test_no_deferred_torndown_after_the_guest_released_the_relid() -> None:
    t = Table("open")
    t.send(m.CloseChannel(child_relid=1))
    assert sends(t.send(m.GpadlTeardown(child_relid=1, gpadl=RING))) == []  # deferred: the ring is closing
    t.send(m.RelidReleased(child_relid=1))  # the guest lets go of relid 1 (and of that teardown)
    t.host.rescind(1)
    assert sends(t.host.actions()) == []
    assert sends(t.answer()) == []
    assert t.state() == "freed"


# ---- regression tests for bugs found here and fixed ----------------------------------------------------

def test_gpadl_header_for_a_released_relid_fails() -> None:
    """Fixed in 2dad665: a relid the guest released while its device was busy took new GPADLs (CREATED
    success, then silently discarded), and an incomplete one outlived the freed channel in in_progress."""
    t = Table("closing_client_release")
    assert sends(t.send(split(1, NEW, list(range(8)))[0])) == [
        m.GpadlCreated(child_relid=1, gpadl=NEW, creation_status=STATUS_UNSUCCESSFUL)]
    t = Table("revoked_busy")
    t.send(m.RelidReleased(child_relid=1))  # released; freed when the device's close completes
    assert [_describe(x) for x in sends(t.send(split(1, NEW, list(range(40)))[0]))] == ["CREATED:fail"]
    t.answer()
    assert 1 not in t.host.channels and not t.host.in_progress


def test_ring_gpadl_torn_down_while_revoked_then_id_reused() -> None:
    """Fixed in 2dad665: the device's late close decremented a NEW GPADL with the torn-down ring's
    (id, relid) to ring_users -1, and that stale GPADL then leaked into the re-offered channel. A GPADL
    completing on the revoked channel now fails (OpenVMM gpadl_updated), so no such GPADL is ever kept."""
    t = Table("revoked_busy")  # the device still holds RING open; its close is pending
    assert [_describe(x) for x in sends(t.send(m.GpadlTeardown(child_relid=1, gpadl=RING)))] == ["TORNDOWN"]
    assert [_describe(x) for x in sends(t.send(split(1, RING, [7])[0]))] == ["CREATED:fail"]  # the id reused
    assert (RING, 1) not in t.host.gpadls
    t.answer()  # the device closes the old ring
    assert (RING, 1) not in t.host.gpadls
    assert t.host.add_offer(POOL[0]) == 1
    assert [_describe(x) for x in sends(t.send(m.RelidReleased(child_relid=1)))] == ["OFFER"]
    assert not [k for k in t.host.gpadls if k[1] == 1], "a GPADL of the old channel leaked into the re-offer"


def test_fixed_release_races_stay_fixed() -> None:
    """The release/rescind races fixed in edb1c81 (HostFuzz found them before the fix)."""
    # Re-offer of a relid the guest released while the device was still closing.
    t = Table("revoked_busy")
    t.send(m.RelidReleased(child_relid=1))
    assert t.host.add_offer(POOL[0]) == 1
    assert [_describe(a.message) for a in t.answer() if isinstance(a, s.Send)] == ["OFFER"]
    assert t.state() == "closed"
    # Rescind of a channel the guest released while its close was pending: freed when the device answers.
    t = Table("closing_client_release")
    t.host.rescind(1)
    assert [a for a in t.host.actions() if isinstance(a, s.Send)] == []
    acts = t.answer()
    assert t.state() == "freed" and s.ChannelFreed(1, "storage") in acts
    # The ring GPADL of a channel released while closing goes with it.
    t = Table("closing_client_release")
    t.answer()
    assert t.state() == CR and not [k for k in t.host.gpadls if k[1] == 1]
    # Rescind during UNLOAD of a channel being closed: freed, and re-offered on the next connection.
    t = Table("open")
    t.send(m.Unload())
    t.host.rescind(1)
    t.answer()
    assert 1 not in t.host.channels and t.host.state == ConnState.DISCONNECTED
    assert t.host.add_offer(POOL[0]) == 1
    t.send(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    offers = [a.message.child_relid for a in t.send(m.RequestOffers())
              if isinstance(a, s.Send) and isinstance(a.message, m.OfferChannel)]
    assert offers == [1, 2]


# ---- part 3: host core + guest core, a well-behaved guest ---------------------------------------------

class BusFuzz(RuleBasedStateMachine):
    """Random guest commands (connect, create GPADL, open, close, teardown, release, unload, modify) as Linux
    would issue them, device answers late and out of order, host rescinds and re-offers. The guest core must
    never see an ``Unexpected`` host message, the host must never drop a guest message, and once everything
    settles no request may be left outstanding (a torn-down ring of a still-open channel aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus(offers=list(INITIAL), auto_device=False)
        self.pending: list[Request] = []
        self.seen_ops = 0
        self.seen_events = 0
        self.pages: dict[int, int] = {}

    @property
    def guest(self) -> c.GuestConnection:
        return self.bus.guest

    @property
    def host(self) -> s.HostConnection:
        return self.bus.host

    def pump(self) -> None:
        self.bus.pump()
        self.pending += self.bus.device_ops[self.seen_ops:]
        self.seen_ops = len(self.bus.device_ops)
        new, self.seen_events = self.bus.events[self.seen_events:], len(self.bus.events)
        bad = [e for e in new if isinstance(e, c.Unexpected | c.VersionRefused | c.TimedOut)]
        assert not bad, bad
        assert not self.bus.dropped, self.bus.dropped
        for e in new:
            if isinstance(e, c.GpadlCreated | c.OpenResult):
                assert e.ok or isinstance(e, c.OpenResult), e  # a well-behaved guest's GPADLs are fine

    def _chans(self, pred: Callable[[c.GuestChannel], bool]) -> list[int]:
        return sorted(r for r, ch in self.guest.channels.items() if pred(ch))

    def settle(self, oks: list[bool] | None = None) -> None:
        for i in range(1000):
            if not self.pending:
                return
            act = self.pending.pop(0)
            self.bus.complete(act, oks[i % len(oks)] if oks else True)
            self.pump()
        raise AssertionError("device requests never settle")

    def check_at_rest(self) -> None:
        g, h = self.guest, self.host
        for what, key in g.outstanding:
            assert what == c.Request.TEARDOWN, g.outstanding
            ring_of = [r for r, ch in h.channels.items() if ch.kind == ChanState.OPEN and ch.params is not None
                       and ch.params.gpadl.gpadl == key]
            assert ring_of, f"GPADL_TEARDOWN {key:#x} unanswered and not the ring of an open channel"
        check_structure(h)
        if g.state == c.GuestConnState.READY:
            assert h.state == ConnState.CONNECTED
            offered = {r for r, ch in h.channels.items() if ch.kind != ChanState.CLIENT_RELEASED}
            assert set(g.channels) == offered
            for relid, gch in g.channels.items():
                hch = h.channels[relid]
                assert gch.rescinded == (hch.kind in (ChanState.REVOKED, ChanState.REOFFERED))
                if not gch.rescinded:
                    assert (gch.state == c.GuestChanState.OPEN) == (hch.kind == ChanState.OPEN)
                    assert gch.offer == hch.offer.message(relid)
                for gid, st_ in gch.gpadls.items():
                    if st_ == c.GpadlState.CREATED:
                        assert h.gpadls[(gid, relid)].state == GpadlState.ACCEPTED
        elif g.state == c.GuestConnState.UNLOADED:
            assert h.state == ConnState.DISCONNECTED and not h.gpadls
        else:
            raise AssertionError(f"guest stuck in {g.state.value}")

    @initialize(versions=st.sampled_from([None, (Version.WIN10_V5_2, Version.WIN10_V4_1), (Version.WIN8_1,),
                                          (Version.WIN7,), (Version.WS2008,)]))
    def start(self, versions: tuple[Version, ...] | None) -> None:
        # A guest reaches a WIN7 or WS2008 host only when asked to offer those versions (older Linux's chain).
        old = versions is not None and min(versions) < Version.WIN8
        self.bus = Bus(offers=list(INITIAL), host_versions=None if versions is None else set(versions),
                       guest_versions=[*GUEST_ORDER, Version.WIN7, Version.WS2008] if old else None,
                       auto_device=False)
        self.bus.connect()
        self.pump()
        assert self.guest.state == c.GuestConnState.READY and len(self.guest.channels) == 3

    def _ready(self) -> bool:
        return self.guest.state == c.GuestConnState.READY

    @precondition(lambda self: self.guest.state in (c.GuestConnState.READY, c.GuestConnState.UNLOADED))
    @rule()
    def connect(self) -> None:
        self.guest.connect()
        self.pump()

    @precondition(lambda self: self._ready() and any(not ch.rescinded and len(ch.gpadls) < 3
                                                     for ch in self.guest.channels.values()))
    @rule(data=st.data(), pages=st.integers(4, 64))
    def create_gpadl(self, data: st.DataObject, pages: int) -> None:
        relid = data.draw(st.sampled_from(self._chans(lambda ch: not ch.rescinded and len(ch.gpadls) < 3)))
        self._create(relid, pages)

    def _create(self, relid: int, pages: int) -> int:
        gid = self.guest.create_gpadl(relid, list(range(relid << 20, (relid << 20) + pages)))
        self.pages[gid] = pages
        self.pump()
        return gid

    @precondition(lambda self: self._ready() and any(ch.state == c.GuestChanState.OFFERED and not ch.rescinded
                                                     for ch in self.guest.channels.values()))
    @rule(data=st.data(), pages=st.sampled_from([4, 8, 30, 64]))
    def open(self, data: st.DataObject, pages: int) -> None:
        """Linux vmbus_open: a ring GPADL (or, for a re-open, one created earlier), then OPENCHANNEL."""
        relid = data.draw(st.sampled_from(self._chans(
            lambda ch: ch.state == c.GuestChanState.OFFERED and not ch.rescinded)))
        gch = self.guest.channels[relid]
        created = sorted(g for g, x in gch.gpadls.items() if x == "created")
        if bool(created) and data.draw(st.booleans()):
            gid = data.draw(st.sampled_from(created))
        else:
            gid = self._create(relid, pages)
        offset = data.draw(st.integers(2, self.pages[gid] - 2))
        self.guest.open_channel(relid, gid, offset)
        self.pump()

    @precondition(lambda self: self._ready() and any(ch.state == c.GuestChanState.OPEN
                                                     for ch in self.guest.channels.values()))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        self.guest.close_channel(data.draw(st.sampled_from(self._chans(lambda ch: ch.state == c.GuestChanState.OPEN))))
        self.pump()

    @staticmethod
    def _can_tear_down(ch: c.GuestChannel) -> list[int]:
        """Created GPADLs a Linux guest may tear down: not the ring of an open still in progress (the ring of
        an OPEN channel may go: the host defers the answer until the close)."""
        return sorted(g for g, x in ch.gpadls.items() if x == "created" and not ch.rescinded
                      and not (ch.state == c.GuestChanState.OPENING and ch.ring_gpadl == g))

    @precondition(lambda self: self._ready() and any(self._can_tear_down(ch) for ch in self.guest.channels.values()))
    @rule(data=st.data())
    def teardown_gpadl(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(self._chans(lambda ch: bool(self._can_tear_down(ch)))))
        gch = self.guest.channels[relid]
        gid = data.draw(st.sampled_from(self._can_tear_down(gch)))
        assert self.guest.teardown_gpadl(relid, gid)
        self.pump()

    @precondition(lambda self: self._ready() and any(ch.rescinded for ch in self.guest.channels.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Linux vmbus_close + hv_process_channel_removal: CLOSECHANNEL, no teardowns, RELID_RELEASED."""
        relid = data.draw(st.sampled_from(self._chans(lambda ch: ch.rescinded)))
        gch = self.guest.channels[relid]
        if gch.state != c.GuestChanState.OFFERED:
            self.guest.close_channel(relid)
        for gid in list(gch.gpadls):
            assert not self.guest.teardown_gpadl(relid, gid)
        self.guest.release_relid(relid)
        self.pump()

    # Below 3.0 a guest sends no UNLOAD, it closes its connection: a peer loss this sans-IO pairing does not model.
    @precondition(lambda self: self._ready() and self.guest.version >= Version.WIN8_1)
    @rule()
    def unload(self) -> None:
        self.guest.unload()
        self.pump()

    @precondition(lambda self: self._ready() and self.guest.version >= Version.WIN10_V4_1 and any(
        ch.state == c.GuestChanState.OPEN and not ch.rescinded for ch in self.guest.channels.values()))
    @rule(data=st.data(), vp=st.integers(0, 3))
    def modify(self, data: st.DataObject, vp: int) -> None:
        relid = data.draw(st.sampled_from(self._chans(
            lambda ch: ch.state == c.GuestChanState.OPEN and not ch.rescinded)))
        self.guest.modify_channel(relid, vp)
        self.pump()
        if self.guest.version >= Version.WIN10_V5_3:
            assert self.bus.of(c.ModifyChannelResult)[-1] == c.ModifyChannelResult(relid, 0)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def device_answers(self, data: st.DataObject) -> None:
        act = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self.bus.complete(act, data.draw(st.sampled_from([True, True, True, False])))
        self.pump()

    @precondition(lambda self: bool(self.host.channels))
    @rule(data=st.data())
    def host_rescinds(self, data: st.DataObject) -> None:
        self.host.rescind(data.draw(st.sampled_from(sorted(self.host.channels))))
        self.pump()

    @rule(data=st.data())
    def host_offers(self, data: st.DataObject) -> None:
        revoked = [ch.offer for ch in self.host.channels.values() if ch.kind == ChanState.REVOKED]
        prefer_revoked = bool(revoked) and data.draw(st.booleans())
        spec = data.draw(st.sampled_from(revoked if prefer_revoked else POOL))
        primary, primary_ok = primary_of(self.host, spec)
        if not primary_ok or any(offer_key(ch.offer) == offer_key(spec) and ch.kind != ChanState.REVOKED
                                 for ch in self.host.channels.values()):
            return
        self.host.add_offer(spec, primary)
        self.pump()

    @rule(oks=st.lists(st.booleans(), min_size=1, max_size=3))
    def settle_and_check(self, oks: list[bool]) -> None:
        self.settle(oks)
        self.check_at_rest()

    def teardown(self) -> None:
        self.settle()
        self.check_at_rest()
        if self._ready():
            for relid in self._chans(lambda ch: ch.state == c.GuestChanState.OPEN):
                self.guest.close_channel(relid)
            self.pump()
            self.settle()
            assert not self.guest.outstanding, self.guest.outstanding
            self.check_at_rest()
            if self.guest.version < Version.WIN8_1:
                return  # no UNLOAD to send (see the unload rule)
            self.guest.unload()
            self.pump()
            self.settle()
        assert self.guest.state == c.GuestConnState.UNLOADED and not self.guest.outstanding
        self.check_at_rest()
        assert all(ch.kind == ChanState.CLIENT_RELEASED for ch in self.host.channels.values())


BusFuzz.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
test_host_and_guest_cores_with_a_well_behaved_guest = BusFuzz.TestCase


# Regression (fixed in 2dad665): unload() below WIN7 left the old connection's requests outstanding.
def test_guest_unload_below_win7_forgets_outstanding_requests() -> None:
    bus = Bus(host_versions={Version.WS2008}, guest_versions=[Version.WIN7, Version.WS2008], auto_device=False)
    bus.connect()
    assert bus.guest.version == Version.WS2008
    gid = bus.guest.create_gpadl(1, list(range(8)))
    bus.pump()
    bus.guest.open_channel(1, gid, 4)  # the device's answer is still pending
    bus.pump()
    bus.guest.unload()
    bus.pump()
    assert bus.guest.state == c.GuestConnState.UNLOADED
    assert bus.guest.outstanding == []
    bus.guest.handle_timer(1e9)
    assert not [e for e in bus.guest.events() if isinstance(e, c.TimedOut)]
