"""Tier 1: the host core's typed API (vmbus_proto.server): channel state variants, drop kinds, the
device-acknowledged GPADL teardown, sub-channel offers, the offer order, the parent's action dispatcher,
and the generated state table in docs/architecture.md."""

from __future__ import annotations

import asyncio
import dataclasses
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from parent_partition.config import Config
from parent_partition.connection import PartitionConnection
from parent_partition.counters import Totals
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto import state_table
from vmbus_proto.devices import registry
from vmbus_proto.gpadl import Gpadl, split
from vmbus_proto.guids import NETWORK, SCSI, SYNTHVID
from vmbus_proto.limits import MemoryBudget
from vmbus_proto.messages import STATUS_SUCCESS
from vmbus_proto.versions import Version

STORAGE = s.OfferSpec("storage", SCSI, uuid.UUID(int=1))
NET = s.OfferSpec("network", NETWORK, uuid.UUID(int=2))
VIDEO = s.OfferSpec("video", SYNTHVID, uuid.UUID(int=3))
SUB1 = s.OfferSpec("storage-sub1", SCSI, uuid.UUID(int=1), sub_channel_index=1)
SUB2 = s.OfferSpec("storage-sub2", SCSI, uuid.UUID(int=1), sub_channel_index=2)
RING, SPARE = 10, 11


def sends(acts: list[s.Action]) -> list[m.Message]:
    return [a.message for a in acts if isinstance(a, s.Send)]


def state(h: Host, relid: int) -> s.ChannelState:
    """Read through a call, so mypy keeps no earlier narrowing of the attribute."""
    return h.core.channels[relid].state


def kinds(acts: list[s.Action]) -> list[s.DropKind]:
    return [a.kind for a in acts if isinstance(a, s.Dropped)]


class Host:
    """A host core connected at 5.3 with its offers delivered."""

    def __init__(self, offers: list[s.OfferSpec] | None = None) -> None:
        self.core = s.HostConnection([STORAGE, NET] if offers is None else offers)
        self.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
        self.offers = sends(self.recv(m.RequestOffers()))

    def recv(self, msg: m.Message) -> list[s.Action]:
        self.core.receive(m.decode(msg.encode()))
        return self.core.actions()

    def gpadl(self, relid: int, gid: int, pages: int = 8) -> None:
        header, bodies = split(relid, gid, list(range(gid * 100, gid * 100 + pages)))
        for msg in (header, *bodies):
            acts = self.recv(msg)
        assert m.GpadlCreated(child_relid=relid, gpadl=gid, creation_status=STATUS_SUCCESS) in sends(acts)

    def open(self, relid: int, gid: int = RING) -> s.DeviceOpen:
        acts = self.recv(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                                       downstream_ringbuffer_pageoffset=4))
        dev = [a for a in acts if isinstance(a, s.DeviceOpen)]
        assert len(dev) == 1, acts
        return dev[0]

    def bring_up(self, relid: int) -> None:
        self.gpadl(relid, RING)
        op = self.open(relid)
        self.core.open_complete(relid, op.seq, True)
        assert m.OpenChannelResult(child_relid=relid, openid=relid, status=STATUS_SUCCESS) in sends(
            self.core.actions())

    def teardown(self, relid: int, gid: int) -> list[s.Action]:
        return self.recv(m.GpadlTeardown(child_relid=relid, gpadl=gid))


# ---- 1. channel states as variants ---------------------------------------------------------------------

def test_every_state_variant_is_frozen_and_named() -> None:
    assert {v.kind for v in s.CHANNEL_STATES} == set(s.ChanState)
    assert set(typing.get_args(s.ChannelState)) == set(s.CHANNEL_STATES)
    st = s.Revoked()
    assert st.name == "revoked" and st.kind == s.ChanState.REVOKED
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.released = True  # type: ignore[misc]


def test_a_released_idle_revoked_channel_cannot_be_represented() -> None:
    with pytest.raises(ValueError, match="freed"):
        s.Revoked(op=None, released=True)
    with pytest.raises(ValueError, match="offered again"):
        s.Reoffered(STORAGE, op=None, released=True)


def test_states_carry_their_data() -> None:
    h = Host()
    h.gpadl(1, RING)
    op = h.open(1)
    assert state(h, 1) == s.Opening(op.params, op.seq)
    h.core.open_complete(1, op.seq, True)
    assert state(h, 1) == s.Open(op.params, target_vp=0)
    h.recv(m.ModifyChannel(child_relid=1, target_vp=3))
    assert state(h, 1) == s.Open(op.params, target_vp=3)
    acts = h.recv(m.CloseChannel(child_relid=1))
    close = next(a for a in acts if isinstance(a, s.DeviceClose))
    assert state(h, 1) == s.Closing(op.params, close.seq)
    reopen = m.OpenChannel(child_relid=1, openid=9, ringbuffer_gpadlhandle=RING, downstream_ringbuffer_pageoffset=4)
    h.recv(reopen)
    assert state(h, 1) == s.ClosingReopen(op.params, close.seq, reopen)


# ---- 2. typed drops and reasons ------------------------------------------------------------------------

@pytest.mark.parametrize(("msg", "kind"), [
    (m.CloseChannel(child_relid=99), s.DropKind.UNKNOWN_RELID),
    (m.CloseChannel(child_relid=1), s.DropKind.WRONG_STATE),
    (m.RequestOffers(), s.DropKind.DUPLICATE_REQUEST_OFFERS),
    (m.GpadlBody(msgnumber=0, gpadl=0x4242, pfns=(1,)), s.DropKind.GPADL_UNKNOWN_ID),
    (m.GpadlTeardown(child_relid=1, gpadl=0x4242), s.DropKind.GPADL_NOT_ACCEPTED),
    (m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=0x4242, downstream_ringbuffer_pageoffset=4),
     s.DropKind.BAD_RING),
    (m.ModifyChannel(child_relid=1, target_vp=1), s.DropKind.MODIFY_REJECTED),
    (m.UnloadResponse(), s.DropKind.WRONG_DIRECTION),
])
def test_each_drop_names_its_kind(msg: m.Message, kind: s.DropKind) -> None:
    acts = Host().recv(msg)
    drops = [a for a in acts if isinstance(a, s.Dropped)]
    assert [d.kind for d in drops] == [kind], f"{msg.MSGTYPE.name}: dropped as {kinds(acts)}, not {kind}"
    assert drops[0].reason and drops[0].message == msg


def test_gpadl_errors_have_their_own_kinds() -> None:
    h = Host()
    h.gpadl(1, RING)
    header = split(1, RING, list(range(8)))[0]
    assert kinds(h.recv(header)) == [s.DropKind.GPADL_DUPLICATE_ID]
    h.recv(m.RelidReleased(child_relid=2))
    assert kinds(h.recv(split(2, 5, list(range(8)))[0])) == [s.DropKind.RELEASED_RELID]


def test_version_and_connection_drops() -> None:
    core = s.HostConnection([STORAGE])
    core.receive(m.RequestOffers())
    assert kinds(core.actions()) == [s.DropKind.NOT_CONNECTED]
    core.receive(m.InitiateContact(vmbus_version_requested=Version.WIN8, interrupt_page=0))
    core.actions()
    core.receive(m.ModifyChannel(child_relid=1, target_vp=1))  # needs 4.1
    assert kinds(core.actions()) == [s.DropKind.VERSION_TOO_OLD]


def test_disconnected_carries_an_enum_reason() -> None:
    h = Host()
    assert s.Disconnected(s.DisconnectReason.UNLOAD) in h.recv(m.Unload())
    h.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    acts = h.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    assert s.Disconnected(s.DisconnectReason.RESET) in acts


# ---- 3. device-acknowledged GPADL teardown -------------------------------------------------------------

def test_teardown_of_a_spare_gpadl_waits_for_the_device() -> None:
    h = Host()
    h.gpadl(1, SPARE)
    assert h.core.gpadl(1, SPARE) is not None
    acts = h.teardown(1, SPARE)
    assert acts == [s.TeardownGpadl(STORAGE, 1, SPARE)], "the device must be asked before GPADL_TORNDOWN"
    assert h.core.gpadl(1, SPARE) is None, "a GPADL being torn down is still looked up"
    # Not usable meanwhile: no OPENCHANNEL on it, its id is taken, a second teardown is dropped.
    acts = h.recv(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=SPARE,
                                downstream_ringbuffer_pageoffset=4))
    assert kinds(acts) == [s.DropKind.BAD_RING] and not any(isinstance(a, s.DeviceOpen) for a in acts)
    assert kinds(h.recv(split(1, SPARE, list(range(8)))[0])) == [s.DropKind.GPADL_DUPLICATE_ID]
    assert kinds(h.teardown(1, SPARE)) == [s.DropKind.GPADL_NOT_ACCEPTED]
    h.core.gpadl_released(1, SPARE)
    assert sends(h.core.actions()) == [m.GpadlTorndown(gpadl=SPARE)]
    h.core.gpadl_released(1, SPARE)  # repeated: stale
    h.core.gpadl_released(2, SPARE)  # never asked
    assert h.core.actions() == []
    h.gpadl(1, SPARE)  # the id is free again


def test_teardown_of_a_live_ring_is_still_deferred_to_the_close() -> None:
    h = Host()
    h.bring_up(1)
    assert h.teardown(1, RING) == []
    assert h.core.gpadls[(RING, 1)].state == s.GpadlState.TEARDOWN_DEFERRED
    close = next(a for a in h.recv(m.CloseChannel(child_relid=1)) if isinstance(a, s.DeviceClose))
    h.core.close_complete(1, close.seq)
    assert sends(h.core.actions()) == [m.GpadlTorndown(gpadl=RING)]


def test_no_torndown_once_the_guest_released_the_relid() -> None:
    """OpenVMM gpadl_teardown_complete: no GPADL_TORNDOWN for a released channel."""
    h = Host()
    h.gpadl(1, SPARE)
    h.teardown(1, SPARE)
    assert h.recv(m.RelidReleased(child_relid=1)) == []
    assert h.core.gpadls[(SPARE, 1)].state == s.GpadlState.TEARING_DOWN  # the device still holds it
    h.core.gpadl_released(1, SPARE)
    assert h.core.actions() == [] and (SPARE, 1) not in h.core.gpadls


def test_unload_waits_for_the_device_to_release_a_gpadl() -> None:
    h = Host()
    h.gpadl(1, SPARE)
    h.teardown(1, SPARE)
    assert h.recv(m.Unload()) == [], "UNLOAD answered while the device still holds a GPADL"
    assert h.core.state == s.ConnState.DISCONNECTING
    h.core.gpadl_released(1, SPARE)
    assert h.core.actions() == [s.Send(m.UnloadResponse()), s.Disconnected(s.DisconnectReason.UNLOAD)]


def test_rescind_of_a_released_channel_lets_a_waiting_unload_finish() -> None:
    """Found by the BusFuzz walk: the UNLOAD waited on a GPADL teardown that the rescind forgot."""
    h = Host()
    h.gpadl(2, SPARE)
    h.teardown(2, SPARE)
    assert h.recv(m.Unload()) == []
    h.core.rescind(2)
    acts = h.core.actions()
    assert s.Send(m.UnloadResponse()) in acts, f"UNLOAD still unanswered after the rescind: {acts}"
    h.core.gpadl_released(2, SPARE)
    assert h.core.actions() == []


def test_rescind_answers_a_pending_teardown_at_once() -> None:
    """OpenVMM revoke: a TearingDown GPADL gets its GPADL_TORNDOWN with the RESCIND; the device's late
    answer is stale."""
    h = Host()
    h.gpadl(1, SPARE)
    h.teardown(1, SPARE)
    h.core.rescind(1)
    assert sends(h.core.actions()) == [m.RescindChannelOffer(child_relid=1), m.GpadlTorndown(gpadl=SPARE)]
    h.core.gpadl_released(1, SPARE)
    assert h.core.actions() == []


def test_gpadl_lookup_returns_only_accepted_gpadls_of_that_relid() -> None:
    h = Host()
    h.gpadl(1, SPARE)
    g = h.core.gpadl(1, SPARE)
    assert isinstance(g, Gpadl) and (g.relid, g.gpadl, g.page_count) == (1, SPARE, 8)
    assert h.core.gpadl(2, SPARE) is None
    header = split(1, 12, list(range(60)))[0]  # stays in progress: bodies missing
    h.recv(header)
    assert h.core.gpadl(1, 12) is None


# ---- 4. sub-channels -----------------------------------------------------------------------------------

def test_subchannel_offer_is_linked_and_hot_added() -> None:
    h = Host()
    h.bring_up(1)
    relid = h.core.add_offer(SUB1, primary=1)
    assert h.core.channels[relid].primary == 1 and h.core.subchannels(1) == [h.core.channels[relid]]
    assert sends(h.core.actions()) == [SUB1.message(relid)]


@pytest.mark.parametrize(("spec", "primary", "match"), [
    (SUB1, None, "relid of its primary"),
    (SUB1, 99, "relid of its primary"),
    (SUB1, 2, "class and instance"),
    (STORAGE, 1, "has no primary"),
])
def test_bad_subchannel_offers_are_refused(spec: s.OfferSpec, primary: int | None, match: str) -> None:
    h = Host()
    with pytest.raises(ValueError, match=match):
        h.core.add_offer(spec, primary)
    assert h.core.actions() == []


def test_subchannel_of_a_primary_not_offered_is_refused() -> None:
    core = s.HostConnection([STORAGE])  # not connected: the primary is not offered
    with pytest.raises(ValueError, match="not offered or open"):
        core.add_offer(SUB1, 1)
    h = Host()
    h.recv(m.RelidReleased(child_relid=1))
    with pytest.raises(ValueError, match="not offered or open"):
        h.core.add_offer(SUB1, 1)


def test_rescind_of_a_primary_rescinds_its_subchannels_first() -> None:
    h = Host()
    h.bring_up(1)
    r1, r2 = h.core.add_offer(SUB1, 1), h.core.add_offer(SUB2, 1)
    h.core.actions()
    h.core.rescind(1)
    rescinds = [x.child_relid for x in sends(h.core.actions()) if isinstance(x, m.RescindChannelOffer)]
    assert rescinds == [r1, r2, 1], f"RESCIND order {rescinds}: sub-channels must go before their primary"


def test_a_subchannel_can_be_rescinded_alone() -> None:
    h = Host()
    h.bring_up(1)
    r1 = h.core.add_offer(SUB1, 1)
    h.core.actions()
    h.core.rescind(r1)
    assert sends(h.core.actions()) == [m.RescindChannelOffer(child_relid=r1)]
    assert h.core.channels[1].kind == s.ChanState.OPEN
    h.recv(m.RelidReleased(child_relid=r1))
    assert r1 not in h.core.channels
    assert h.core.add_offer(SUB1, 1) == r1  # offered again by the device


def test_closing_the_primary_rescinds_its_subchannels() -> None:
    h = Host()
    h.bring_up(1)
    r1 = h.core.add_offer(SUB1, 1)
    h.gpadl(r1, 30)
    op = h.open(r1, 30)
    h.core.open_complete(r1, op.seq, True)
    h.core.actions()
    acts = h.recv(m.CloseChannel(child_relid=1))
    closes = [a.relid for a in acts if isinstance(a, s.DeviceClose)]
    assert closes == [r1, 1], f"device closes {closes}: the sub-channel closes before its primary"
    assert m.RescindChannelOffer(child_relid=r1) in sends(acts)
    assert h.core.channels[r1].kind == s.ChanState.REVOKED


def test_unload_removes_subchannels_and_reconnect_does_not_offer_them() -> None:
    h = Host()
    h.bring_up(1)
    r1 = h.core.add_offer(SUB1, 1)
    h.core.actions()
    acts = h.recv(m.Unload())
    assert not any(isinstance(x, m.RescindChannelOffer) for x in sends(acts)), "RESCIND after UNLOAD"
    for a in list(acts):
        if isinstance(a, s.DeviceClose):
            h.core.close_complete(a.relid, a.seq)
    acts += h.core.actions()
    assert s.ChannelFreed(r1, SUB1.name) in acts and s.Send(m.UnloadResponse()) in acts
    h.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    offers = sends(h.recv(m.RequestOffers()))
    assert [o.child_relid for o in offers if isinstance(o, m.OfferChannel)] == [1, 2]
    assert all(o.sub_channel_index == 0 for o in offers if isinstance(o, m.OfferChannel))


def test_same_key_tells_subchannels_apart() -> None:
    h = Host()
    h.bring_up(1)
    r1 = h.core.add_offer(SUB1, 1)
    r2 = h.core.add_offer(SUB2, 1)
    assert r1 != r2
    with pytest.raises(ValueError, match="exists"):
        h.core.add_offer(SUB1, 1)


# ---- 5. offer order ------------------------------------------------------------------------------------

def test_default_devices_are_offered_in_interface_guid_order() -> None:
    specs = [s.OfferSpec(d.name, d.class_id, d.default_instance) for d in registry.ALL]
    h = Host(specs)
    names = [registry.BY_CLASS[o.if_type].name for o in h.offers if isinstance(o, m.OfferChannel)]
    assert names == ["heartbeat", "storage", "mouse", "video", "network", "keyboard"]
    assert [o.child_relid for o in h.offers if isinstance(o, m.OfferChannel)] == [1, 2, 3, 4, 5, 6]


def test_relids_follow_the_sort_again_after_a_reconnect() -> None:
    """OpenVMM assigns channel ids at REQUESTOFFERS in sorted order: a device hot-added while connected gets
    the next free relid, and its sorted place on the next connection."""
    h = Host([NET])
    assert h.core.add_offer(VIDEO) == 2  # hot add
    assert h.core.add_offer(STORAGE) == 3
    h.recv(m.Unload())
    h.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    offers = [o for o in sends(h.recv(m.RequestOffers())) if isinstance(o, m.OfferChannel)]
    assert [(o.if_type, o.child_relid) for o in offers] == [(SCSI, 1), (SYNTHVID, 2), (NETWORK, 3)]
    assert {r: ch.offer.name for r, ch in h.core.channels.items()} == {1: "storage", 2: "video", 3: "network"}
    # ... and stays so on every later connection.
    h.recv(m.Unload())
    h.recv(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    again = [o for o in sends(h.recv(m.RequestOffers())) if isinstance(o, m.OfferChannel)]
    assert again == offers


# ---- 2. the parent's dispatcher handles every action ---------------------------------------------------

@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The connection's transport wants an event loop (not run here: device calls are captured)."""
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


def _connection() -> tuple[PartitionConnection, list[tuple[int, bytes]], list[Any]]:
    daemon: Any = SimpleNamespace(config=Config(), log=structlog.get_logger(), totals=Totals(),
                                  budget=MemoryBudget(1 << 30), partitions_changed=lambda: None)
    conn = PartitionConnection(daemon, "test")
    sent: list[tuple[int, bytes]] = []
    spawned: list[Any] = []
    conn.send_frame = lambda kind, relid, body, data=b"": sent.append((kind, body))  # type: ignore[method-assign]

    def spawn(coro: Any) -> None:
        spawned.append(coro)
        coro.close()

    conn._spawn = spawn  # type: ignore[method-assign]
    return conn, sent, spawned


def _one_of_each() -> list[s.Action]:
    params = s.OpenParams(1, 1, Gpadl(1, RING, ((8 * 4096, 0),), tuple(range(8))), 4, 0, b"")
    return [s.Send(m.AllOffersDelivered()), s.DeviceOpen(STORAGE, params, 1), s.DeviceClose(STORAGE, 1, 2),
            s.TeardownGpadl(STORAGE, 1, SPARE), s.Dropped(None, s.DropKind.MALFORMED, "x"),
            s.Connected(Version.WIN10_V5_3), s.Disconnected(s.DisconnectReason.UNLOAD), s.ChannelFreed(3, "x")]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.usefixtures("loop")
def test_the_parent_dispatches_every_action_type() -> None:
    conn, sent, spawned = _connection()
    h = Host()
    h.gpadl(1, SPARE)
    h.teardown(1, SPARE)
    conn.core = h.core
    examples = _one_of_each()
    assert {type(a) for a in examples} == set(typing.get_args(s.Action)), "an Action type has no example here"
    with structlog.testing.capture_logs() as logs:
        for act in examples:
            conn._run_action(act)
    assert sent[0][1] == m.AllOffersDelivered().encode()
    assert [c.__name__ for c in spawned] == ["_device_open", "_device_close", "_teardown_gpadl"]
    assert conn.dropped_messages == 1
    events = [e["event"] for e in logs]
    for event in ("control message dropped", "VMBus connected", "VMBus disconnected", "rescinded channel released"):
        assert event in events, f"{event!r} not logged"
    assert next(e for e in logs if e["event"] == "control message dropped")["kind"] == "malformed"


@pytest.mark.usefixtures("loop")
def test_the_dispatcher_refuses_an_unknown_action() -> None:
    conn, _, _ = _connection()
    conn.core = Host().core
    with pytest.raises(AssertionError):
        conn._run_action(object())  # type: ignore[arg-type]


async def test_a_teardown_waits_until_the_device_lets_go_then_torndown_goes_out() -> None:
    """TeardownGpadl goes to the channel's GPADL map: a device holding the GPADL is asked to let go, and
    GPADL_TORNDOWN goes out only once it has (OpenVMM Action::TeardownGpadl); an unheld GPADL goes at once."""
    conn, sent, _ = _connection()
    conn._spawn = PartitionConnection._spawn.__get__(conn)  # type: ignore[method-assign]  # real tasks
    h = Host()
    h.gpadl(1, SPARE)
    conn.core = h.core
    asked = asyncio.Event()
    hold = conn.gpadl_map(1).hold(SPARE, on_teardown=asked.set)
    h.core.receive(m.GpadlTeardown(child_relid=1, gpadl=SPARE))
    conn._run_actions()
    await asyncio.wait_for(asked.wait(), 10)
    assert not sent, "GPADL_TORNDOWN went out while the device still held the GPADL"
    hold.release()
    await asyncio.wait_for(_until(lambda: bool(sent)), 10)
    assert [m.decode(body) for _, body in sent] == [m.GpadlTorndown(gpadl=SPARE)]
    assert h.core.gpadl(1, SPARE) is None


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)


# ---- 6. the generated table ----------------------------------------------------------------------------

def test_docs_state_table_is_the_generated_one() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
    text = doc.read_text(encoding="utf-8")
    assert state_table.BEGIN in text and state_table.END in text, "docs/architecture.md lost its table markers"
    assert state_table.replace_in(text) == text, \
        "docs/architecture.md §4.2 is stale: run python -m vmbus_proto.state_table --write docs/architecture.md"


def test_state_table_renders_every_cell() -> None:
    out = state_table.render()
    rows = [line for line in out.splitlines() if line.startswith("| **")]
    assert len(rows) == len(state_table.STATES)
    assert all(line.count(" | ") == len(state_table.INPUTS) for line in rows)

