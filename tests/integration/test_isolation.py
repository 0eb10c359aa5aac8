"""Isolation between partitions over real sockets (issue 12): each connection has its own relid space and its
own GPADL ids, so a child cannot open, close, signal, send packets on or tear down another partition's
channels and GPADLs. The module's bystander child must never notice."""

from __future__ import annotations

import itertools

import pytest

from vmbus_proto import messages as m
from vmbus_proto.envelope import Signal
from vmbus_proto.guids import SYNTH_KEYBOARD
from vmbus_proto.packets import Packet, PacketType

from .conftest import Parent, Proc
from .rawclient import RawClient

pytestmark = pytest.mark.integration
PAGES = 10  # ring pages per direction
RING = 0xA1  # both partitions use this GPADL id for their own ring
_names = itertools.count(1)


@pytest.fixture
def p(survived_parent: Parent) -> Parent:
    return survived_parent


def _keyboard(c: RawClient, name: str) -> int:
    offers = c.negotiate(name)
    return next(r for r, o in offers.items() if o.if_type == SYNTH_KEYBOARD)


def _a_with_open_keyboard(p: Parent) -> tuple[RawClient, str, int]:
    name = f"iso-a-{next(_names)}"
    a = RawClient(p.tcp)
    relid = _keyboard(a, name)
    a.open(relid, PAGES, RING)
    return a, name, relid


def _still_open(p: Parent, a: RawClient, name: str, relid: int, mark: int) -> None:
    """A closes its channel and the parent closes it: it was A's and open until now."""
    a.send(m.CloseChannel(child_relid=relid))
    p.wait_event("channel closed", start=mark, partition=name, relid=relid)
    a.close()


def test_relids_and_gpadl_ids_belong_to_their_connection(p: Parent) -> None:
    a, name_a, relid = _a_with_open_keyboard(p)
    mark = p.mark()
    b = RawClient(p.tcp)
    name_b = f"iso-b-{next(_names)}"
    assert _keyboard(b, name_b) == relid, "both partitions are offered the keyboard under the same relid"
    # A's GPADL id is unknown on B's connection: opening with it fails, tearing it down is dropped.
    b.send(m.OpenChannel(child_relid=relid, openid=1, ringbuffer_gpadlhandle=RING,
                         downstream_ringbuffer_pageoffset=PAGES))
    assert b.expect(m.OpenChannelResult).status != 0, "B opened a channel with A's ring GPADL"
    b.send(m.GpadlTeardown(child_relid=relid, gpadl=RING))
    p.wait_event("control message dropped", start=mark, partition=name_b, kind="gpadl_not_accepted")
    b.send(m.CloseChannel(child_relid=relid))
    p.wait_event("control message dropped", start=mark, partition=name_b, kind="wrong_state")
    # The same relid and GPADL id on B are B's own: its open succeeds while A's channel stays open.
    b.open(relid, PAGES, RING)
    p.wait_event("channel open", start=mark, partition=name_b, relid=relid)
    _still_open(p, a, name_a, relid, mark)
    b.close()


def test_packets_and_signals_on_anothers_channel_never_reach_it(p: Parent) -> None:
    a, name_a, relid = _a_with_open_keyboard(p)
    mark = p.mark()
    b = RawClient(p.tcp)
    name_b = f"iso-b-{next(_names)}"
    _keyboard(b, name_b)
    b.signal(relid, Signal(ring=0, write_index=64))
    b.send_packet(relid, Packet(PacketType.DATA_INBAND, 0, 1, b"\x00" * 16))
    # Dropped as frames for B's own channel, which B never opened.
    for kind in ("SIGNAL", "PACKET"):
        p.wait_event("frame for a channel that is not open dropped", start=mark, partition=name_b, relid=relid,
                     kind=kind)
    _still_open(p, a, name_a, relid, mark)
    b.close()


def test_the_bystander_never_noticed(p: Parent, bystander: Proc) -> None:
    assert bystander.proc.poll() is None and not bystander.events("session with the parent ended")
