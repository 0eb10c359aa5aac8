"""Tier 1: the whole channel lifecycle with the host core wired to the guest core in memory."""

from __future__ import annotations

from vmbus_proto import client as c
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto.versions import GUEST_ORDER, Version

from .inmemory import Bus


def test_negotiates_newest_version_and_gets_offers_in_order() -> None:
    bus = Bus()
    bus.connect()
    assert bus.guest.version == Version.WIN10_V5_3  # a current Linux guest starts at 5.3 (max_version)
    assert bus.guest.state == c.GuestConnState.READY
    offers = bus.of(c.OfferReceived)
    assert [o.offer.child_relid for o in offers] == sorted(o.offer.child_relid for o in offers)
    assert len(offers) == 3
    assert bus.trace[0].startswith("G>H CHANNELMSG_INITIATE_CONTACT(14) vmbus_version_requested=0x50003")
    assert bus.trace[-1] == "H>G CHANNELMSG_ALLOFFERS_DELIVERED(4) "
    assert not bus.guest.outstanding


def test_guest_falls_back_when_host_supports_older_versions() -> None:
    bus = Bus(host_versions={Version.WIN8_1, Version.WIN8})
    bus.connect()
    assert bus.guest.version == Version.WIN8_1
    contacts = [t for t in bus.trace if "INITIATE_CONTACT" in t]
    assert len(contacts) == GUEST_ORDER.index(Version.WIN8_1) + 1
    refusals = [t for t in bus.trace if "VERSION_RESPONSE" in t and "version_supported=0" in t]
    assert len(refusals) == len(contacts) - 1


def test_no_common_version_fails_cleanly() -> None:
    bus = Bus(host_versions={Version.WIN7}, guest_versions=[Version.WIN10_V5_3, Version.WIN10_V5])
    bus.connect()
    assert bus.guest.state == c.GuestConnState.FAILED
    assert "refused every VMBus version" in bus.of(c.VersionRefused)[0].reason


def test_open_close_teardown_unload() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.open(relid)
    assert bus.of(c.GpadlCreated)[0].ok
    assert bus.of(c.OpenResult)[0].ok
    assert bus.host.channels[relid].kind == s.ChanState.OPEN
    params = bus.device_ops[0].params  # type: ignore[union-attr]
    assert params.guest_to_host_data == 3 * 4096 and params.host_to_guest_data == 3 * 4096
    bus.guest.close_channel(relid)
    bus.guest.teardown_gpadl(relid, gid)
    bus.pump()
    assert bus.host.channels[relid].kind == s.ChanState.CLOSED
    assert bus.of(c.GpadlTorndown) == [c.GpadlTorndown(relid, gid)]
    bus.guest.unload()
    bus.pump()
    assert bus.of(c.UnloadComplete)
    assert bus.host.state == s.ConnState.DISCONNECTED
    assert not bus.guest.outstanding and not bus.dropped


def test_gpadl_split_into_header_and_bodies() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.guest.create_gpadl(relid, list(range(100, 100 + 26 + 28 + 5)))
    sent = bus.guest.messages()
    assert [type(x).__name__ for x in sent] == ["GpadlHeader", "GpadlBody", "GpadlBody"]
    assert [len(x.pfns) for x in sent] == [26, 28, 5]  # type: ignore[attr-defined]
    for msg in sent:
        bus.host.receive(msg)
    acts = bus.host.actions()
    assert [a.message for a in acts if isinstance(a, s.Send)] == [
        m.GpadlCreated(child_relid=relid, gpadl=gid, creation_status=0)]
    assert tuple(bus.host.gpadls[(gid, relid)].gpadl.pfns) == tuple(range(100, 159))


def test_teardown_of_ring_in_use_is_deferred_until_close() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.open(relid)
    bus.guest.teardown_gpadl(relid, gid)  # out of order: ring still open
    bus.pump()
    assert not bus.of(c.GpadlTorndown)
    bus.guest.close_channel(relid)
    bus.pump()
    assert bus.of(c.GpadlTorndown) == [c.GpadlTorndown(relid, gid)]


def test_duplicate_in_progress_gpadl_id_fails() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    header = m.GpadlHeader(child_relid=relid, gpadl=7, range_buflen=8 + 8 * 30, rangecount=1,
                           ranges=((30 * 4096, 0),), pfns=tuple(range(26)))
    bus.host.receive(header)
    bus.host.receive(header)
    sends = [a.message for a in bus.host.actions() if isinstance(a, s.Send)]
    assert sends == [m.GpadlCreated(child_relid=relid, gpadl=7, creation_status=m.STATUS_UNSUCCESSFUL)]


def test_reopen_while_closing() -> None:
    bus = Bus(auto_device=False)
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.guest.create_gpadl(relid, list(range(8)))
    bus.pump()
    bus.guest.open_channel(relid, gid, 4)
    bus.pump()
    bus.complete(bus.device_ops[-1])
    bus.pump()
    bus.guest.close_channel(relid)
    bus.pump()
    assert bus.host.channels[relid].kind == s.ChanState.CLOSING
    bus.guest.open_channel(relid, gid, 4)
    bus.pump()
    assert bus.host.channels[relid].kind == s.ChanState.CLOSING_REOPEN
    bus.complete(bus.device_ops[-1])  # the close
    bus.pump()
    assert isinstance(bus.device_ops[-1], s.DeviceOpen)
    bus.complete(bus.device_ops[-1])
    bus.pump()
    assert [e.ok for e in bus.of(c.OpenResult)] == [True, True]
    assert bus.host.channels[relid].kind == s.ChanState.OPEN


def test_rescind_of_open_channel_then_release_and_reoffer() -> None:
    bus = Bus()
    bus.connect()
    offer = bus.of(c.OfferReceived)[0].offer
    relid = offer.child_relid
    gid = bus.open(relid)
    spec = bus.host.channels[relid].offer
    bus.host.rescind(relid)
    bus.pump()
    assert bus.of(c.Rescinded) == [c.Rescinded(relid)]
    assert isinstance(bus.device_ops[-1], s.DeviceClose)
    bus.host.add_offer(spec)  # re-offer before the guest released: same relid later
    assert bus.host.channels[relid].kind == s.ChanState.REOFFERED
    bus.guest.close_channel(relid)
    assert not bus.guest.teardown_gpadl(relid, gid)  # rescinded: Linux skips the teardown
    bus.guest.release_relid(relid)
    bus.pump()
    reoffers = [e for e in bus.of(c.OfferReceived) if e.offer.child_relid == relid]
    assert len(reoffers) == 2
    assert bus.host.channels[relid].kind == s.ChanState.CLOSED
    bus.open(relid)
    assert bus.of(c.OpenResult)[-1].ok


def test_second_initiate_contact_is_a_full_reset() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    bus.open(relid)
    assert bus.host.open_channels()
    bus.guest.connect()
    bus.pump()
    assert bus.guest.state == c.GuestConnState.READY
    assert not bus.host.open_channels()
    assert bus.host.channels[relid].kind == s.ChanState.CLOSED
    assert not bus.host.gpadls
    assert isinstance(bus.device_ops[-1], s.DeviceClose)


def test_unload_waits_for_device_close() -> None:
    bus = Bus(auto_device=False)
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.guest.create_gpadl(relid, list(range(8)))
    bus.pump()
    bus.guest.open_channel(relid, gid, 4)
    bus.pump()
    bus.complete(bus.device_ops[-1])
    bus.pump()
    bus.guest.unload()
    bus.pump()
    assert not bus.of(c.UnloadComplete)
    bus.complete(bus.device_ops[-1])
    bus.pump()
    assert bus.of(c.UnloadComplete)


def test_open_with_bad_ring_gpadl_is_answered_with_failure() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    bus.guest.open_channel(relid, 0xDEAD, 4)
    bus.pump()
    assert bus.of(c.OpenResult) == [c.OpenResult(relid, False, m.STATUS_UNSUCCESSFUL)]
    assert "does not exist" in bus.dropped[0].reason


def test_messages_before_contact_are_dropped() -> None:
    bus = Bus()
    bus.host.receive(m.RequestOffers())
    assert isinstance(bus.host.actions()[0], s.Dropped)


def test_modifychannel_answered_from_5_3() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    bus.open(relid)
    bus.guest.modify_channel(relid, 1)
    bus.guest.modify_channel(relid + 1, 1)  # not open: failure
    bus.pump()
    assert [(e.relid, e.status) for e in bus.of(c.ModifyChannelResult)] == [
        (relid, 0), (relid + 1, m.STATUS_UNSUCCESSFUL - (1 << 32))]


def test_modifychannel_fails_on_a_channel_opened_with_interrupts_disabled() -> None:
    # OpenVMM channels.rs modify_channel (InterruptsDisabled, InvalidTargetVp), answered from 5.3.
    bus = Bus()
    bus.connect()
    relid, other = (o.offer.child_relid for o in bus.of(c.OfferReceived)[:2])
    gid = bus.guest.create_gpadl(relid, list(range(0x2000, 0x2008)))
    bus.pump()
    bus.guest.open_channel(relid, gid, 4, target_vp=m.VP_INDEX_DISABLE_INTERRUPT)
    bus.pump()
    bus.open(other)
    bus.guest.modify_channel(relid, 1)
    bus.guest.modify_channel(other, m.VP_INDEX_DISABLE_INTERRUPT)
    bus.pump()
    bus.guest.modify_channel(other, 2)  # from 5.3 a guest does not overlap two on one channel
    bus.pump()
    fail = m.STATUS_UNSUCCESSFUL - (1 << 32)
    assert [(e.relid, e.status) for e in bus.of(c.ModifyChannelResult)] == [(relid, fail), (other, fail), (other, 0)]
    assert (bus.host.channels[relid].target_vp, bus.host.channels[other].target_vp) == (0xFFFFFFFF, 2)
    assert not bus.guest.outstanding


def test_golden_binary_layouts() -> None:
    # OpenVMM vmbus_core unit test: CLOSE_CHANNEL for channel 5.
    assert m.CloseChannel(child_relid=5).to_binary() == bytes.fromhex("07000000000000000500000000")[:12]
    offer = s.OfferSpec("x", __import__("uuid").UUID(int=0), __import__("uuid").UUID(int=0)).message(1)
    assert len(offer.to_binary()) == 196
    assert len(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=2,
                             downstream_ringbuffer_pageoffset=3).to_binary()) == 148
    assert len(m.InitiateContact(vmbus_version_requested=0x50003).to_binary()) == 40
    assert len(m.VersionResponse(version_supported=1).to_binary(Version.WIN10_V5_3)) == 16
    assert len(m.VersionResponse(version_supported=1).to_binary(Version.WIN10_V6_0)) == 20  # VersionResponse2
    header = m.GpadlHeader(child_relid=1, gpadl=2, range_buflen=8 + 8 * 26, rangecount=1,
                           ranges=((26 * 4096, 0),), pfns=tuple(range(26)))
    assert len(header.to_binary()) == 20 + 27 * 8  # 27 u64 slots after the fixed part
    body = m.GpadlBody(msgnumber=0, gpadl=2, pfns=tuple(range(28)))
    assert len(body.to_binary()) == 240
