"""NetVSP (``NvspHost``) wired to NetVSC (``NvspGuest``) in memory: the whole setup in Linux's order, frames
both ways through the send and receive buffers, the packet-filter gate, link indications, sub-channels,
teardown order, and the protocol layer's bad-input cases from issue 9."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.network import guest as G
from vmbus_proto.devices.network import host as H
from vmbus_proto.devices.network import nvsp, rndis
from vmbus_proto.devices.network.buffers import RX_RESERVED_CONTROL, ByteBuffer, ReceiveBufferAllocator
from vmbus_proto.errors import DeviceProtocolError, LocalProtocolError
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType

from .test_rss import tcp_frame

MAC = bytes.fromhex("00155d000001")
RECV_SIZE = 2 * 1024 * 1024  # smaller than Linux's 16 MiB to keep the tests light; same layout
SEND_SIZE = 1024 * 1024


def frame(n: int, fill: int = 0x41) -> bytes:
    return b"\xff" * 6 + MAC + b"\x08\x00" + bytes([fill]) * (n - 14)


class Link:
    """The device layer both sides need, reduced to memory: GPADL lookups answered with shared
    ``ByteBuffer``s, sub-channels opened at once, every packet delivered in order."""

    def __init__(self, *, queues: int = 1, max_subchannels: int = 0, versions: tuple[int, ...] = nvsp.LINUX_VERSIONS,
                 recv_size: int = RECV_SIZE, supported: frozenset[int] = nvsp.DEFAULT_SUPPORTED,
                 auto_complete: bool = True, refuse_recv: bool = False) -> None:
        self.recv, self.send = ByteBuffer(recv_size), ByteBuffer(SEND_SIZE)
        self.host = H.NvspHost(MAC, max_subchannels=max_subchannels, supported=supported)
        self.guest = G.NvspGuest(recv_gpadl=0x10, recv_view=self.recv, recv_size=recv_size, send_gpadl=0x11,
                                 send_view=self.send, send_size=SEND_SIZE, queues=queues, versions=versions,
                                 auto_complete=auto_complete)
        self.refuse_recv = refuse_recv
        self.host_events: list[H.Event] = []
        self.guest_events: list[G.Event] = []
        self.to_host: list[Packet] = []  # every packet the guest sent
        self.to_guest: list[Packet] = []

    def pump(self) -> None:
        for _ in range(10_000):
            a, b = self.guest.data_to_send(), self.host.data_to_send()
            if not a and not b:
                return
            for packet in a:
                self.to_host.append(packet)
                for event in self.host.receive(packet):
                    self.host_events.append(event)
                    self._device(event)
            for packet in b:
                self.to_guest.append(packet)
                for guest_event in self.guest.receive(packet):
                    self.guest_events.append(guest_event)
                    if isinstance(guest_event, G.SubchannelsGranted):  # the NetVSC opened them all at once
                        self.guest_events += self.guest.subchannels_opened(guest_event.count)
        raise AssertionError("the link did not settle")

    def _device(self, event: H.Event) -> None:
        if isinstance(event, H.ReceiveBufferRequested):
            assert event.gpadl_handle == 0x10 and event.id == nvsp.RECEIVE_BUFFER_ID, event
            if self.refuse_recv:
                self.host.refuse_receive_buffer()
            else:
                self.host.attach_receive_buffer(self.recv, self.recv.size)
        elif isinstance(event, H.SendBufferRequested):
            self.host.attach_send_buffer(self.send, self.send.size)
        elif isinstance(event, H.SubchannelsRequested):
            for queue in range(1, event.count + 1):
                self.host.queue_opened(queue)
            self.host.subchannels_opened(event.count)

    def up(self) -> Link:
        self.guest.start()
        self.pump()
        assert self.guest.ready, f"guest not ready: {self.guest.failed}"
        return self

    def frames_at_host(self) -> list[bytes]:
        return [f for e in self.host_events if isinstance(e, H.FramesSent) for f, _ in e.frames]

    def frames_at_guest(self) -> list[bytes]:
        return [f for e in self.guest_events if isinstance(e, G.FramesReceived) for f, _ in e.frames]


def nvsp_types(packets: list[Packet]) -> list[str]:
    return [nvsp.MessageType(struct.unpack_from("<I", p.payload)[0]).name for p in packets
            if p.type != PacketType.COMP]


def rndis_requests(link: Link) -> list[str]:
    """The RNDIS requests the guest sent, read back out of the send buffer or the GPA-direct data."""
    out = []
    for p in link.to_host:
        if p.type == PacketType.COMP or struct.unpack_from("<I", p.payload)[0] != nvsp.MessageType.SEND_RNDIS_PKT:
            continue
        msg = nvsp.decode(p.payload)
        assert isinstance(msg, nvsp.SendRndisPacket)
        data = bytes(p.data) if msg.send_buf_section_index == nvsp.NO_SECTION else link.send.read(
            msg.send_buf_section_index * nvsp.SEND_SECTION_SIZE, msg.send_buf_section_size)
        m = rndis.decode(data)
        name = type(m).__name__
        out.append(f"{name} {rndis.oid_text(m.oid)}" if isinstance(m, (rndis.Query, rndis.Set)) else name)
    return out


# ---- the setup -------------------------------------------------------------------------------------------


def test_setup_in_linux_order_to_data_path_ready() -> None:
    link = Link(queues=4, max_subchannels=3).up()
    assert nvsp_types(link.to_host)[:5] == ["INIT", "SEND_NDIS_CONFIG", "SEND_NDIS_VER", "SEND_RECV_BUF",
                                            "SEND_SEND_BUF"]
    assert rndis_requests(link) == [
        "Initialize", "Query OID_GEN_MAXIMUM_FRAME_SIZE", "Query OID_802_3_PERMANENT_ADDRESS",
        "Query OID_GEN_FRIENDLY_NAME", "Query OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES",
        "Set OID_TCP_OFFLOAD_PARAMETERS", "Query OID_GEN_MEDIA_CONNECT_STATUS", "Query OID_GEN_LINK_SPEED",
        "Query OID_GEN_RECEIVE_SCALE_CAPABILITIES", "Set OID_GEN_CURRENT_PACKET_FILTER",
        "Set OID_GEN_RECEIVE_SCALE_PARAMETERS"]
    assert "SUBCHANNEL" in nvsp_types(link.to_host)
    g, h = link.guest, link.host
    assert g.version == h.version == 0x60001
    assert h.ready and g.mac == MAC and g.mtu == 1500 and g.friendly_name == "Network Device"
    assert g.link_speed == 10_000_000_000 and g.connected
    assert g.subchannels == 3 and g.send_table == tuple(i % 4 for i in range(16))
    assert h.packet_filter == rndis.LINUX_PACKET_FILTER and h.rss is not None
    assert h.capabilities == nvsp.linux_capabilities(0x60001) and h.mtu == 1514
    assert g.recv_section_size == 1806 and g.recv_sections == RECV_SIZE // 1806
    assert g.max_pkt_per_msg == 8 and g.pkt_alignment == 8
    assert [type(e).__name__ for e in link.host_events] == [
        "ReceiveBufferRequested", "SendBufferRequested", "DataPathReady", "SubchannelsRequested",
        "PacketFilterChanged", "RssChanged"]
    assert any(isinstance(e, G.Ready) for e in link.guest_events)


def test_init_completions_as_openvmm() -> None:
    link = Link().up()
    init_done = nvsp.decode(link.to_guest[0].payload, completion=True)
    assert init_done == nvsp.InitComplete(0xFFFFFFFF, 34, nvsp.Status.SUCCESS)
    assert len(link.to_guest[0].payload) == 40, "v6.1 host messages are 40 bytes"
    recv_done = next(nvsp.decode(p.payload, True) for p in link.to_guest
                     if p.type == PacketType.COMP and p.payload[:4] == struct.pack("<I", 102))
    assert recv_done == nvsp.SendReceiveBufferComplete(
        1, (nvsp.ReceiveBufferSection(0, 1806, RECV_SIZE // 1806, 1806 * (RECV_SIZE // 1806)),))


@pytest.mark.parametrize("version", [0x60000, 0x50000, 0x40000, 0x30002, 0x2])
def test_every_version_reaches_ready(version: int) -> None:
    link = Link(supported=frozenset({version})).up()
    assert link.guest.version == link.host.version == version
    sent = nvsp_types(link.to_host)
    assert ("SEND_NDIS_CONFIG" in sent) == (version >= 0x30002), sent
    assert ("Query OID_GEN_LINK_SPEED" in rndis_requests(link)) == (version >= 0x50000)
    assert link.host.ndis_version == nvsp.linux_ndis_version(version)
    assert len(link.to_guest[-1].payload) in (28, 0), "hosts below 6.1 send 28-byte messages"


def test_subchannels_granted_up_to_the_host_limit() -> None:
    link = Link(queues=8, max_subchannels=2).up()
    # The guest asks for min(queues, the host's RSS queue count) - 1 = 2.
    assert link.guest.subchannels == 2 and link.host.subchannels == 2
    link2 = Link(queues=8, max_subchannels=0).up()
    assert link2.guest.subchannels == 0 and "SUBCHANNEL" not in nvsp_types(link2.to_host)
    h = link.host
    request = Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 77,
                     nvsp.encode(nvsp.SubchannelRequest(nvsp.SUBCHANNEL_ALLOCATE, 9)))
    # OpenVMM: more than max_queues - 1 fails (Linux never asks for more than the RSS capabilities' count).
    assert h.receive(request) == []
    assert nvsp.decode(h.data_to_send()[0].payload, True) == nvsp.SubchannelComplete(nvsp.Status.FAIL, 0)
    request = Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 78,
                     nvsp.encode(nvsp.SubchannelRequest(nvsp.SUBCHANNEL_ALLOCATE, 2)))
    assert h.receive(request) == [H.SubchannelsRequested(2)]
    assert nvsp.decode(h.data_to_send()[0].payload, True) == nvsp.SubchannelComplete(nvsp.Status.SUCCESS, 2)


def test_keepalive_is_answered() -> None:
    link = Link().up()
    link.guest.keepalive()
    link.pump()
    assert rndis_requests(link)[-1] == "Keepalive" and link.host.counters.control_answers >= 10


# ---- frames ---------------------------------------------------------------------------------------------


def test_guest_transmit_through_send_buffer_and_gpa_direct() -> None:
    link = Link().up()
    g = link.guest
    assert g.sends is not None
    free = g.sends.free
    small, large = frame(60), frame(20000, 0x42)
    lso = rndis.PacketInfo(checksum=rndis.TxChecksum(is_ipv4=True, tcp=True, tcp_header_offset=34).value(),
                           lso=rndis.LsoV2(1448, 34))
    g.send_frame(small)
    g.send_frame(large, lso)
    sent = g.data_to_send()
    assert [p.type for p in sent] == [PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT]
    first, second = (nvsp.decode(p.payload) for p in sent)
    assert isinstance(first, nvsp.SendRndisPacket) and first.send_buf_section_index != nvsp.NO_SECTION
    assert second == nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0)
    assert sum(r.byte_count for r in sent[1].ranges) == len(sent[1].data)
    assert g.sends.free == free - 1 and g.tx_in_flight == 2
    link.guest._outbox[:0] = sent
    link.pump()
    assert link.frames_at_host() == [small, large]
    sent_info = [i for e in link.host_events if isinstance(e, H.FramesSent) for _, i in e.frames]
    assert sent_info[1] == lso
    assert g.sends.free == free and g.tx_in_flight == 0, "completions must free the send sections"
    assert g.counters.tx_section == 1 and g.counters.tx_direct == 1


def test_a_full_send_buffer_falls_back_to_gpa_direct() -> None:
    link = Link().up()
    g = link.guest
    assert g.sends is not None
    for _ in range(g.sends.count + 3):
        g.send_frame(frame(100))
    assert g.sends.free == 0 and g.counters.tx_direct == 3
    link.pump()
    assert g.sends.free == g.sends.count and len(link.frames_at_host()) == g.sends.count + 3


def test_host_receive_batches_frames_and_completions_free_sections() -> None:
    link = Link().up()
    h = link.host
    alloc = h.receive_allocator
    assert alloc is not None
    free = alloc.free_data
    frames = [frame(60 + i) for i in range(10)]
    result = h.deliver([(f, rndis.NO_INFO) for f in frames])
    assert result == H.RxResult(delivered=10)
    packets = h.data_to_send()
    assert len(packets) == 1, "queued frames go in one transfer-page packet"
    p = packets[0]
    assert p.type == PacketType.DATA_USING_XFER_PAGES and p.xfer_pageset_id == 0xCAFE
    assert p.completion_requested and len(p.xfer_ranges) == 10
    assert all(off % 1806 == 0 and off // 1806 >= RX_RESERVED_CONTROL for _, off in p.xfer_ranges)
    assert nvsp.decode(p.payload) == nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0)
    assert alloc.free_data == free - 10 and alloc.in_flight == 1
    link.guest_events += link.guest.receive(p)
    link.pump()
    assert link.frames_at_guest() == frames
    assert alloc.free_data == free and alloc.in_flight == 0, "the guest's completion must free the sections"


def test_batches_split_at_375_ranges() -> None:
    link = Link().up()
    result = link.host.deliver([(frame(60), rndis.NO_INFO)] * 400)
    assert result.delivered == 400
    assert [len(p.xfer_ranges) for p in link.host.data_to_send()] == [375, 25]


def test_a_guest_that_never_completes_fills_the_buffer_and_the_host_drops() -> None:
    link = Link(auto_complete=False).up()
    h, g = link.host, link.guest
    alloc = h.receive_allocator
    assert alloc is not None
    capacity = alloc.free_data
    delivered = dropped = 0
    rounds = capacity // 50 + 5
    for _ in range(rounds):
        r = h.deliver([(frame(100), rndis.NO_INFO)] * 50)
        delivered += r.delivered
        dropped += r.dropped
        link.pump()
    assert delivered == capacity and dropped == rounds * 50 - capacity, (delivered, dropped)
    assert h.counters.rx_dropped_no_room == dropped and alloc.free_data == 0
    assert alloc.in_flight <= alloc.count, "outstanding transactions are bounded by the buffer"
    g.complete_receives()
    link.pump()
    assert alloc.free_data == capacity
    assert h.deliver([(frame(100), rndis.NO_INFO)]).delivered == 1


def test_packet_filter_gate() -> None:
    link = Link().up()
    link.guest.set_packet_filter(0)
    link.pump()
    assert link.host.packet_filter == 0 and not link.host.ready
    r = link.host.deliver([(frame(60), rndis.NO_INFO)] * 3)
    assert r.delivered == 0 and r.dropped == 3 and link.host.counters.rx_dropped_filter == 3
    assert link.host.data_to_send() == []
    link.guest.set_packet_filter(rndis.PacketFilter.DIRECTED | rndis.PacketFilter.BROADCAST)
    link.pump()
    assert link.host.deliver([(frame(60), rndis.NO_INFO)]).delivered == 1


def test_rsc_coalesced_frame_at_61_and_drop_below() -> None:
    link = Link().up()
    big = frame(30000, 0x43)
    info = rndis.PacketInfo(checksum=rndis.RX_TCP_OK | rndis.RX_IP_OK)
    assert link.host.rsc and link.host.deliver([(big, info)]).delivered == 1
    packets = link.host.data_to_send()
    ranges = packets[0].xfer_ranges
    # 30000 bytes in fragments of at most 1806 - 36 (footer) - 44 (headers) - PPIs: 18 sub-allocations
    assert len(ranges) == 18 and all(n <= 1806 - 36 for n, _ in ranges), ranges
    for p in packets:
        link.guest_events += link.guest.receive(p)
    got = [(f, i) for e in link.guest_events if isinstance(e, G.FramesReceived) for f, i in e.frames]
    assert got == [(big, info)]
    old = Link(supported=frozenset({0x60000})).up()
    r = old.host.deliver([(big, info), (frame(1514), info), (b"runt", info)])
    assert r.delivered == 1 and r.dropped == 2 and old.host.counters.rx_dropped_bad_frame == 2


def test_link_status_indications() -> None:
    link = Link().up()
    link.host.set_link(False)
    link.host.set_link_speed(1_000_000_000)
    link.pump()
    changes = [e for e in link.guest_events if isinstance(e, G.LinkChanged)]
    assert changes == [G.LinkChanged(False, 10_000_000_000), G.LinkChanged(False, 1_000_000_000)]
    link.host.set_link(True)
    link.pump()
    assert link.guest.connected
    q = Link().up()
    q.host.set_link(False)
    q.guest.set_packet_filter(0)
    q.pump()
    assert rndis.query_oid(q.host._nic(), rndis.Oid.GEN_MEDIA_CONNECT_STATUS) == struct.pack("<I", 1)


def test_teardown_halt_then_revoke() -> None:
    link = Link().up()
    before = len(link.to_host)
    link.guest.close()
    link.pump()
    tail = link.to_host[before:]
    assert nvsp_types(tail) == ["SEND_RNDIS_PKT", "REVOKE_RECV_BUF", "REVOKE_SEND_BUF"]
    assert rndis_requests(link)[-1] == "Halt"
    assert [type(e).__name__ for e in link.host_events[-3:]] == ["Halted", "BufferRevoked", "BufferRevoked"]
    assert isinstance(link.guest_events[-1], G.TornDown)
    assert link.host.deliver([(frame(60), rndis.NO_INFO)]).dropped == 1


# ---- bad input (the protocol layer's part of issue 9's list) ---------------------------------------------


def started(version: int = 0x60001) -> H.NvspHost:
    host = H.NvspHost(MAC, version=version)
    return host


def inband(message: nvsp.NvspMessage, trans_id: int = 1, completion: bool = True) -> Packet:
    return Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED if completion else 0, trans_id,
                  nvsp.encode(message))


def test_rndis_before_send_recv_buf_is_refused() -> None:
    host = started()
    host.receive(inband(nvsp.SendNdisConfig(1514, 0, 8), completion=False))
    host.receive(inband(nvsp.SendNdisVersion(6, 30), completion=False))
    with pytest.raises(nvsp.NvspError, match="before NDIS_CONFIG, NDIS_VER and SEND_RECV_BUF"):
        host.receive(inband(nvsp.SendRndisPacket(1, nvsp.NO_SECTION, 0)))


@pytest.mark.parametrize("message", [nvsp.SendNdisVersion(6, 30), nvsp.SendNdisConfig(1514, 0, 8)])
def test_duplicates_while_initializing_are_refused(message: nvsp.NvspMessage) -> None:
    host = started()
    host.receive(inband(message, completion=False))
    with pytest.raises(nvsp.NvspError, match="twice"):
        host.receive(inband(message, completion=False))


def test_recv_buf_before_ndis_config_and_data_path_messages_before_init() -> None:
    with pytest.raises(nvsp.NvspError, match="before SEND_NDIS_CONFIG"):
        started().receive(inband(nvsp.SendReceiveBuffer(1, 0xCAFE)))
    with pytest.raises(DeviceProtocolError, match="before INIT"):
        H.NvspHost(MAC).receive(inband(nvsp.SendNdisVersion(6, 30)))


def test_ndis_config_mtu_out_of_range_uses_the_default() -> None:
    host = started()
    host.receive(inband(nvsp.SendNdisConfig(100_000, 0, 8), completion=False))
    assert host.mtu == 1514


def test_refused_receive_buffer_fails_the_guest_cleanly() -> None:
    link = Link(refuse_recv=True)
    link.guest.start()
    link.pump()
    assert not link.guest.ready and link.guest.failed and "refused the receive buffer" in link.guest.failed
    too_small = Link(recv_size=16 * 1806)
    too_small.guest.start()
    too_small.pump()
    assert too_small.guest.failed, "a buffer with no room beyond the control sections is refused"


def test_send_buffer_section_index_out_of_range() -> None:
    link = Link().up()
    assert link.guest.sends is not None
    bad = inband(nvsp.SendRndisPacket(0, link.guest.sends.count, 100), trans_id=0x55)
    with pytest.raises(nvsp.NvspError, match="outside the 170-section send buffer"):
        link.host.receive(bad)
    with pytest.raises(nvsp.NvspError, match="no GPA-direct data"):
        link.host.receive(inband(nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0)))


def test_malformed_rndis_costs_only_that_packet() -> None:
    link = Link().up()
    lying = struct.pack("<II", 1, 44) + struct.pack("<9I", 36, 5000, 0, 0, 0, 0, 0, 0, 0)
    link.send.write(0, lying)
    link.host.receive(inband(nvsp.SendRndisPacket(0, 0, len(lying)), trans_id=0x99))
    done = link.host.data_to_send()
    assert done[0].type == PacketType.COMP and done[0].trans_id == 0x99
    assert nvsp.decode(done[0].payload, True) == nvsp.SendRndisPacketComplete(nvsp.Status.FAIL)
    assert link.host.counters.tx_errors == 1
    link.guest.send_frame(frame(60))
    link.pump()
    assert link.frames_at_host() == [frame(60)], "the channel keeps working"


def test_runt_and_oversized_transmits_are_dropped_and_counted() -> None:
    link = Link().up()
    g = link.guest
    g.send_frame(b"runt")
    g.send_frame(frame(1515))  # one byte over the 1514-byte frame, no LSO
    g.send_frame(frame(1514))
    g.send_frame(frame(70000), rndis.PacketInfo(lso=rndis.LsoV2(1448, 34)))  # beyond any large send
    link.pump()
    assert link.frames_at_host() == [frame(1514)]
    assert link.host.counters.tx_dropped_bad_frame == 3 and g.tx_in_flight == 0, "every packet is completed"


def test_a_guest_that_floods_control_requests_without_completing_loses_its_channel() -> None:
    link = Link(auto_complete=False).up()
    with pytest.raises(nvsp.NvspError, match="control answers wait"):
        for req_id in range(200):
            data = rndis.encode(rndis.Keepalive(1000 + req_id))
            link.send.write(0, data)
            link.host.receive(inband(nvsp.SendRndisPacket(1, 0, len(data)), trans_id=5000 + req_id))
    assert len(link.host._control_queue) == H.MAX_QUEUED_CONTROL, "the queue is bounded"


def test_a_revoked_buffer_still_referenced() -> None:
    link = Link().up()
    link.host.receive(inband(nvsp.RevokeReceiveBuffer(0xCAFE), completion=False))
    with pytest.raises(nvsp.NvspError, match="after the guest revoked its receive buffer"):
        link.host.receive(inband(nvsp.SendRndisPacket(0, 0, 100)))
    assert link.host.deliver([(frame(60), rndis.NO_INFO)]).dropped == 1


def test_second_rndis_initialize_is_refused() -> None:
    link = Link().up()
    data = rndis.encode(rndis.Initialize(99))
    link.send.write(0, data)
    with pytest.raises(nvsp.NvspError, match="initialized adapter"):
        link.host.receive(inband(nvsp.SendRndisPacket(1, 0, len(data))))


def test_unknown_oid_and_set_answer_not_supported() -> None:
    link = Link().up()
    for request in (rndis.Query(50, 0x0DEADBEE), rndis.Set(51, rndis.Oid.P802_3_MULTICAST_LIST, bytes(12))):
        data = rndis.encode(request)
        link.send.write(0, data)
        link.host.receive(inband(nvsp.SendRndisPacket(1, 0, len(data))))
    answers = [rndis.decode(link.recv.read(off, n)) for p in link.host.data_to_send() for n, off in p.xfer_ranges]
    assert answers == [rndis.QueryComplete(50, rndis.Status.NOT_SUPPORTED),
                       rndis.SetComplete(51, rndis.Status.NOT_SUPPORTED)]


def test_guest_checks_transfer_page_ranges() -> None:
    link = Link().up()
    g = link.guest
    payload = nvsp.encode(nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0))
    outside = Packet(PacketType.DATA_USING_XFER_PAGES, 1, 700, payload, xfer_pageset_id=0xCAFE,
                     xfer_ranges=((100, RECV_SIZE - 10), (5000, 0)))
    wrong_set = Packet(PacketType.DATA_USING_XFER_PAGES, 1, 701, payload, xfer_pageset_id=0x1234,
                       xfer_ranges=((100, 0),))
    assert g.receive(outside) == [] and g.receive(wrong_set) == []
    assert g.counters.rx_errors == 3
    completions = g.data_to_send()
    assert [p.trans_id for p in completions] == [700, 701], "dropped packets are still completed"


def test_completion_for_an_unknown_transaction() -> None:
    link = Link().up()
    done = Packet(PacketType.COMP, 0, 0x4242, nvsp.encode(nvsp.SendRndisPacketComplete(1)))
    with pytest.raises(nvsp.NvspError, match="not outstanding"):
        link.host.receive(done)
    with pytest.raises(nvsp.NvspError, match="unknown transaction"):
        link.guest.receive(done)


def test_allocator_refuses_a_buffer_without_data_sections() -> None:
    with pytest.raises(nvsp.NvspError, match="need more than 16"):
        ReceiveBufferAllocator(16 * 1806, 1806)


_PACKET_TYPES = st.sampled_from([PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT, PacketType.COMP,
                                 PacketType.DATA_USING_XFER_PAGES])


@settings(max_examples=300, deadline=None)
@given(_PACKET_TYPES, st.binary(max_size=64), st.binary(max_size=200), st.integers(0, 200))
def test_fuzz_host_on_a_running_channel(ptype: int, payload: bytes, data: bytes, section: int) -> None:
    link = Link().up()
    if section < SEND_SIZE // nvsp.SEND_SECTION_SIZE:
        link.send.write(section * nvsp.SEND_SECTION_SIZE, data)
    with contextlib.suppress(DeviceProtocolError):
        link.host.receive(Packet(ptype, 1, 3, payload, data=data))
    with contextlib.suppress(DeviceProtocolError):  # an honest SEND_RNDIS_PKT around arbitrary RNDIS bytes
        link.host.receive(inband(nvsp.SendRndisPacket(0, section, len(data))))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.tuples(st.integers(0, RECV_SIZE + 10), st.integers(0, 4000)),
                                         min_size=1, max_size=4))
def test_fuzz_guest_receive_buffer_contents(data: bytes, ranges: list[tuple[int, int]]) -> None:
    link = Link().up()
    for _, offset in ranges:
        if offset + len(data) <= RECV_SIZE:
            link.recv.write(offset, data)
    payload = nvsp.encode(nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0))
    with contextlib.suppress(DeviceProtocolError):
        link.guest.receive(Packet(PacketType.DATA_USING_XFER_PAGES, 1, 9, payload, xfer_pageset_id=0xCAFE,
                                  xfer_ranges=tuple(ranges)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([PacketType.DATA_INBAND, PacketType.COMP]), st.binary(max_size=100))
def test_fuzz_guest_inband_and_completions(ptype: int, payload: bytes) -> None:
    link = Link().up()
    with contextlib.suppress(DeviceProtocolError):
        link.guest.receive(Packet(ptype, 0, 0x1001, payload))


def test_both_sides_can_start_after_the_handshake_modules() -> None:
    # The device classes run nvsp.VscHandshake / VspHandshake first; the state machines continue from there.
    vsc, vsp = nvsp.VscHandshake(), nvsp.VspHandshake()
    request = vsc.start()[0]
    reply = vsp.receive(Incoming(request.type, request.trans_id, request.completion_requested, request.payload))[0]
    vsc.receive(Incoming(reply.type, reply.trans_id, False, reply.payload))
    assert vsc.negotiated_version == vsp.negotiated_version == 0x60001
    link = Link()
    link.host = H.NvspHost(MAC, version=vsp.negotiated_version)
    link.guest = G.NvspGuest(recv_gpadl=0x10, recv_view=link.recv, recv_size=RECV_SIZE, send_gpadl=0x11,
                             send_view=link.send, send_size=SEND_SIZE, version=vsc.negotiated_version)
    link.up()
    assert nvsp_types(link.to_host)[0] == "SEND_NDIS_CONFIG" and link.host.ready


# ---- sub-channels and RSS ----------------------------------------------------------------------------------


def test_receives_spread_by_rss_each_on_its_channel_and_completed_there() -> None:
    link = Link(queues=4, max_subchannels=3).up()
    h, g = link.host, link.guest
    assert h.open_queues == [0, 1, 2, 3] and h.rss is not None and h.rss.table == tuple(i % 4 for i in range(128))
    table = [p for p in link.to_guest if p.payload[:4] == struct.pack("<I", nvsp.MessageType.SEND_INDIRECTION_TABLE)]
    assert len(table) == 1 and g.send_table == tuple(i % 4 for i in range(16))
    frames = [tcp_frame("10.0.0.1", "10.0.0.2", 30000 + i, 80) for i in range(64)]
    expected = {f: h.rss.queue(f) for f in frames}
    for f in frames:
        h.deliver([(f, rndis.NO_INFO)], h.queue_for(f))
    free = h.receive_allocator.free_data if h.receive_allocator else 0
    got: dict[int, list[bytes]] = {}
    for queue in h.open_queues:
        packets = h.data_to_send() if queue == 0 else h.queue_data(queue)
        assert all(p.type == PacketType.DATA_USING_XFER_PAGES for p in packets)
        for p in packets:
            for e in g.receive(p):
                if isinstance(e, G.FramesReceived):
                    got.setdefault(queue, []).extend(fr for fr, _ in e.frames)
            for done in g.data_to_send():  # the completion goes back on the channel the packet came on
                assert done.type == PacketType.COMP
                h.receive(done) if queue == 0 else h.receive_on_queue(done, queue)
    assert {q: sorted(fs) for q, fs in got.items()} == {
        q: sorted(f for f in frames if expected[f] == q) for q in set(expected.values())}
    assert len(got) == 4, f"64 flows used queues {sorted(got)}"
    assert h.receive_allocator is not None and h.receive_allocator.free_data == free + 64
    arp = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(28)
    assert h.queue_for(arp) == 0


def test_subchannel_carries_only_data_and_its_close_frees_what_it_held() -> None:
    link = Link(queues=4, max_subchannels=3).up()
    h, g = link.host, link.guest
    assert h.rss is not None and h.receive_allocator is not None
    flow = next(f for f in (tcp_frame("10.0.0.1", "10.0.0.2", 40000 + i, 80) for i in range(64))
                if h.queue_for(f) == 2)
    free = h.receive_allocator.free_data
    h.deliver([(flow, rndis.NO_INFO)] * 3, 2)
    assert len(h.queue_data(2)) == 1 and h.receive_allocator.free_data == free - 3  # sent, not completed
    h.deliver([(flow, rndis.NO_INFO)], 2)  # queued, never sent
    h.queue_closed(2)
    assert h.receive_allocator.free_data == free, "a closed queue keeps no sub-allocation"
    assert h.open_queues == [0, 1, 3] and h.queue_for(flow) == 0, "its flows fall back to queue 0"
    assert h.queue_data(2) == []
    # A transmit on a sub-channel is completed on it.
    g.send_frame(frame(60))
    (tx,) = g.data_to_send()
    assert h.receive_on_queue(tx, 1) and h.data_to_send() == []
    (done,) = h.queue_data(1)
    assert done.type == PacketType.COMP and done.trans_id == tx.trans_id
    # Anything but SEND_RNDIS_PKT and completions ends the channel; so does a queue that is not open.
    keepalive = Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 5,
                       nvsp.encode(nvsp.SubchannelRequest(nvsp.SUBCHANNEL_ALLOCATE, 1)))
    with pytest.raises(nvsp.NvspError, match="not valid on sub-channel 1"):
        h.receive_on_queue(keepalive, 1)
    with pytest.raises(nvsp.NvspError, match="not open"):
        h.receive_on_queue(tx, 2)
    with pytest.raises(nvsp.NvspError, match="outside"):
        h.queue_opened(4)


def test_guest_sets_rss_only_once_its_subchannels_are_open() -> None:
    recv, send = ByteBuffer(RECV_SIZE), ByteBuffer(SEND_SIZE)
    host = H.NvspHost(MAC, max_subchannels=3)
    guest = G.NvspGuest(recv_gpadl=0x10, recv_view=recv, recv_size=RECV_SIZE, send_gpadl=0x11, send_view=send,
                        send_size=SEND_SIZE, queues=2)
    guest.start()
    granted: list[G.Event] = []
    for _ in range(200):
        out_g, out_h = guest.data_to_send(), host.data_to_send()
        if not out_g and not out_h:
            break
        for p in out_g:
            for e in host.receive(p):
                if isinstance(e, H.ReceiveBufferRequested):
                    host.attach_receive_buffer(recv, RECV_SIZE)
                elif isinstance(e, H.SendBufferRequested):
                    host.attach_send_buffer(send, SEND_SIZE)
        for p in out_h:
            granted += guest.receive(p)
    assert G.SubchannelsGranted(1) in granted and guest.ready and host.rss is None, "RSS before the opens"
    with pytest.raises(LocalProtocolError, match="2 sub-channels opened, 1 were granted"):
        guest.subchannels_opened(2)
    assert guest.subchannels_opened(1) == [G.SendTableChanged(tuple(i % 2 for i in range(16)))]
    for p in guest.data_to_send():
        host.receive(p)
    assert host.rss is not None and set(host.rss.table) == {0, 1}


def test_direct_transmits_in_flight_hold_their_pages_until_each_completes() -> None:
    """A GPA-direct transmit names pages that stay its own until its completion (Linux: the skb's pages): in
    shared memory the host reads them after we move on, so two in flight must never share a page."""
    link = Link().up()
    g = link.guest
    assert g.sends is not None
    handed: list[tuple[GpaRange, ...]] = []
    done: list[tuple[GpaRange, ...]] = []

    def direct(length: int) -> tuple[GpaRange, ...]:
        first = 0x1000 + 32 * len(handed)
        handed.append((GpaRange(length, 0, tuple(range(first, first + (length + 4095) // 4096))),))
        return handed[-1]

    g.direct_ranges, g.direct_done = direct, done.append
    for _ in range(g.sends.count + 3):  # the send buffer fills: the last three go GPA-direct, all in flight
        g.send_frame(frame(100))
    pfns = [p for ranges in handed for r in ranges for p in r.pfns]
    assert len(handed) == 3 and len(pfns) == len(set(pfns)), "direct transmits in flight share pages"
    assert done == []
    link.pump()
    assert sorted(done) == sorted(handed), "each direct transmit's pages come back with its completion"
